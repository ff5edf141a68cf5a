//! The SSE reader and each tap over the recorded-style streams in tests/fixtures, fed
//! whole and one byte at a time (the worst split). Criterion reports bytes per second;
//! divide the time per iteration by the events in the fixture for the cost per event.
//! Targets: at least 1 GB/s per core for the OpenAI tap fed whole, at most 1 µs per
//! event.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stream_relay::sse::SseReader;
use stream_relay::tap::{Tap, TapKind};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
