//! The SSE reader and each tap over the recorded-style streams in tests/fixtures, fed
//! whole and one byte at a time (the worst split). Criterion reports bytes per second;
//! divide the time per iteration by the events in the fixture for the cost per event.
//! Targets: at least 1 GB/s per core for the OpenAI tap fed whole, at most 1 µs per
//! event. The usage stripper is timed on the usage fixture and on one 4 MiB event in
//! 64 KiB pieces (far over its cap: linear, not quadratic, in the event's size).

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stream_relay::sse::SseReader;
use stream_relay::tap::strip::UsageStripper;
use stream_relay::tap::{Tap, TapKind};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The stripper over the usage fixture (whole, in 64-byte pieces) and over one event
/// of 4 MiB (one `data:` line) in 64 KiB pieces.
macro_rules! strip_benches {
    ($g:expr, $prefix:expr, $stripper:ty) => {{
        let usage = fixture("openai_usage.sse");
        let mut big = b"data: {\"choices\":[{\"delta\":{\"content\":\"".to_vec();
        big.resize(4 << 20, b'x');
        big.extend_from_slice(b"\"}}]}\n\ndata: [DONE]\n\n");
        for (name, s, piece) in [
            ("openai_usage/whole", &usage, usage.len()),
            ("openai_usage/64_byte_pieces", &usage, 64),
            ("one_4mib_event/64kib_pieces", &big, 64 << 10),
        ] {
            $g.throughput(Throughput::Bytes(s.len() as u64));
            $g.bench_function(format!("{}{name}", $prefix), |b| {
                b.iter(|| {
                    let mut st = <$stripper>::default();
                    let mut n = 0usize;
                    let pieces = s.chunks(piece);
                    let last = pieces.len();
                    for (i, p) in pieces.enumerate() {
                        n += st.feed(black_box(p), i + 1 == last).len();
                    }
                    n
                })
            });
        }
    }};
}

fn bench(c: &mut Criterion) {
    let cases = [
        ("openai_usage", TapKind::OpenAiSse),
        ("openai_no_usage", TapKind::OpenAiSse),
        ("openai_reasoning", TapKind::OpenAiSse),
        ("openai_tool_calls", TapKind::OpenAiSse),
        ("anthropic", TapKind::AnthropicSse),
    ];
    let mut g = c.benchmark_group("sse_reader");
    for (name, _) in cases {
        let s = fixture(&format!("{name}.sse"));
        g.throughput(Throughput::Bytes(s.len() as u64));
        g.bench_function(format!("{name}/whole"), |b| {
            b.iter(|| {
                let mut r = SseReader::new();
                let mut n = 0usize;
                r.feed(black_box(&s), |e| n += e.data.len());
                n
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("tap");
    let t0 = Instant::now();
    for (name, kind) in cases {
        let s = fixture(&format!("{name}.sse"));
        g.throughput(Throughput::Bytes(s.len() as u64));
        g.bench_function(format!("{name}/whole"), |b| {
            b.iter(|| {
                let mut tap = Tap::new(kind, t0);
                tap.feed(black_box(&s), t0, &mut |_| {});
                tap.finish();
                tap.measure.output_events
            })
        });
        g.bench_function(format!("{name}/byte_by_byte"), |b| {
            b.iter(|| {
                let mut tap = Tap::new(kind, t0);
                for byte in s.chunks(1) {
                    tap.feed(black_box(byte), t0, &mut |_| {});
                }
                tap.finish();
                tap.measure.output_events
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("usage_stripper");
    strip_benches!(g, "", UsageStripper);
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
