//! The taps over recorded-style streams (tests/fixtures): what they learn, and that it is
//! the same however the stream is cut into chunks (every single split point, and random
//! multi-way splits).

use std::time::{Duration, Instant};

use proptest::prelude::*;
use stream_relay::tap::{Measure, Tap, TapKind, Usage};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Feeds `stream` cut at `cuts` (sorted), every chunk arriving at the same instant.
fn measure(kind: TapKind, stream: &[u8], cuts: &[usize]) -> Measure {
    let t0 = Instant::now();
    let now = t0 + Duration::from_millis(5);
    let mut tap = Tap::new(kind, t0);
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
        tap.feed(&stream[last..c], now, &mut |_| {});
        last = c;
    }
    tap.finish();
    tap.measure
}

const CASES: [(&str, TapKind); 5] = [
    ("openai_usage.sse", TapKind::OpenAiSse),
    ("openai_no_usage.sse", TapKind::OpenAiSse),
    ("openai_reasoning.sse", TapKind::OpenAiSse),
    ("openai_tool_calls.sse", TapKind::OpenAiSse),
    ("anthropic.sse", TapKind::AnthropicSse),
];

#[test]
fn what_each_fixture_yields() {
    let m = measure(TapKind::OpenAiSse, &fixture("openai_usage.sse"), &[]);
    assert_eq!(
        (m.output_events, m.finish_reason.as_deref()),
        (19, Some("stop"))
    );
    assert_eq!(
        m.usage,
        Usage {
            input: Some(42),
            output: Some(19),
            cached_input: Some(16),
            reasoning: Some(0)
        }
    );
    assert!(m.finished && m.first_output.is_some());

    let m = measure(TapKind::OpenAiSse, &fixture("openai_no_usage.sse"), &[]);
    assert_eq!(m.usage, Usage::default());
    assert_eq!(m.output_events, 19);

    let m = measure(TapKind::OpenAiSse, &fixture("openai_reasoning.sse"), &[]);
    // 6 reasoning deltas and 6 content deltas; the first (empty) one is not output.
    assert_eq!(m.output_events, 12);
    assert_eq!(m.usage.reasoning, Some(6));
    assert_eq!(m.model.as_deref(), Some("deepseek-reasoner"));

    let m = measure(TapKind::OpenAiSse, &fixture("openai_tool_calls.sse"), &[]);
    assert_eq!(
        m.output_events, 6,
        "the first tool-call delta counts as output"
    );
    assert_eq!(m.finish_reason.as_deref(), Some("tool_calls"));

    let m = measure(TapKind::AnthropicSse, &fixture("anthropic.sse"), &[]);
    assert_eq!(m.output_events, 19);
    assert_eq!((m.usage.input, m.usage.output), (Some(21), Some(19)));
    assert_eq!(m.finish_reason.as_deref(), Some("end_turn"));
}

#[test]
fn every_single_split_point_gives_the_same_measure() {
    for (name, kind) in CASES {
        let s = fixture(name);
        let whole = measure(kind, &s, &[]);
        for i in 0..=s.len() {
            assert_eq!(measure(kind, &s, &[i]), whole, "{name} split at {i}");
        }
    }
}

fn crlf(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 2);
    for &b in s {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_splits_give_the_same_measure(
        which in 0usize..CASES.len(),
        use_crlf in any::<bool>(),
        raw_cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let (name, kind) = CASES[which];
        let mut s = fixture(name);
        if use_crlf {
            s = crlf(&s);
        }
        let mut cuts: Vec<usize> = raw_cuts.iter().map(|i| i.index(s.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(measure(kind, &s, &cuts), measure(kind, &s, &[]));
    }
}
