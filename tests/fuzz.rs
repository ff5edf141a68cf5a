//! Fuzzing with proptest: the SSE reader, each tap, the usage stripper, the request-body
//! reader, the JSON gate and the request-head gate take arbitrary bytes, cut anywhere,
//! without a panic, and give the same answer however the input is cut.
//!
//! CI runs `FUZZ_CASES` cases per target (default 2,000, a few seconds in all). A longer
//! run: `FUZZ_CASES=1000000 cargo test --release --test fuzz`. A failing input proptest
//! finds is printed minimized; add it to `regressions()` below.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use stream_relay::headgate;
use stream_relay::request_info::{self, BodyCollector, BodyStep};
use stream_relay::sse::SseReader;
use stream_relay::tap::strip::UsageStripper;
use stream_relay::tap::{Tap, TapKind};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Splits `data` at the given points (taken modulo its length, sorted).
fn pieces<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| {
            if data.is_empty() {
                0
            } else {
                c % (data.len() + 1)
            }
        })
        .collect();
    at.sort_unstable();
    let mut out = Vec::new();
    let mut last = 0;
    for c in at.into_iter().chain(std::iter::once(data.len())) {
        out.push(&data[last..c]);
        last = c;
    }
    out
}

/// Bytes that look like a provider's stream: SSE lines with JSON-ish payloads, comments,
/// `[DONE]`, both line ends, and some noise, so the fuzzer reaches past the line reader.
fn sse_like() -> impl Strategy<Value = Vec<u8>> {
    let json = prop_oneof![
        Just(r#"{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}"#.to_string()),
        Just(r#"{"usage":{"prompt_tokens":3,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":1}}}"#.to_string()),
        Just(r#"{"type":"message_start","message":{"usage":{"input_tokens":7}}}"#.to_string()),
        Just(r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"x"}}"#.to_string()),
        Just(r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":9}}"#.to_string()),
        Just(r#"{"error":{"message":"boom"}}"#.to_string()),
        Just("[DONE]".to_string()),
        "[ -~]{0,40}",
        "\\PC{0,20}",
    ];
    let line = prop_oneof![
        json.clone().prop_map(|j| format!("data: {j}")),
        json.prop_map(|j| format!("data:{j}")),
        "[a-z_]{0,12}".prop_map(|n| format!("event: {n}")),
        Just(": keep-alive".to_string()),
        Just(String::new()),
        "\\PC{0,30}",
    ];
    let ending = prop_oneof![Just("\n"), Just("\r\n"), Just("\r"), Just("")];
    proptest::collection::vec((line, ending), 0..40).prop_map(|ls| {
        ls.into_iter()
            .flat_map(|(l, e)| format!("{l}{e}").into_bytes())
            .collect()
    })
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![sse_like(), proptest::collection::vec(any::<u8>(), 0..2048),]
}

/// Bytes that look like a request head: lines of tokens, colons, spaces and the odd
/// control byte, with either line end, blank lines anywhere (also first).
fn head_like() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        Just("POST /openai/v1/chat/completions HTTP/1.1".to_string()),
        Just("x-request-id: abc-1".to_string()),
        Just("X-Request-Id:".to_string()),
        Just(String::new()),
        "[A-Za-z-]{1,12}: [ -~]{0,30}",
        "[ -~\\t\\x00\\x7f]{0,40}",
    ];
    let ending = prop_oneof![Just("\r\n"), Just("\n"), Just("\r"), Just("")];
    proptest::collection::vec((line, ending), 0..20).prop_map(|ls| {
        ls.into_iter()
            .flat_map(|(l, e)| format!("{l}{e}").into_bytes())
            .collect()
    })
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<usize>(), 0..24)
}

/// Every event the reader dispatches for `parts`, owned.
fn read_events(parts: &[&[u8]]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut r = SseReader::new();
    let mut out = Vec::new();
    for p in parts {
        r.feed(p, |e| out.push((e.name.to_vec(), e.data.to_vec())));
    }
    out
}

fn tap_measure(kind: TapKind, parts: &[&[u8]]) -> String {
    let t0 = Instant::now();
    let mut tap = Tap::new(kind, t0);
    let now = t0 + Duration::from_millis(3);
    for p in parts {
        tap.feed(p, now, &mut |_| {});
    }
    tap.finish();
    // Timings are the same instant for every piece; compare everything else.
    format!("{:?}", tap.measure)
}

/// An OpenAI-style stream the relay asked usage for, as whole events with LF or CRLF
/// ends: content chunks of any size up to `max_pad` (so some are far over a small
/// stripper cap), comments, multi-line events, `[DONE]`, and at most one usage-only
/// chunk. The stream, and the stream without that usage chunk.
fn usage_stream(max_pad: usize) -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    const USAGE: &str = r#"data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    let event = prop_oneof![
        (0..max_pad).prop_map(|n| format!(
            r#"data: {{"choices":[{{"delta":{{"content":"{}"}}}}]}}"#,
            "x".repeat(n)
        )),
        Just(": keep-alive".to_string()),
        (0..max_pad).prop_map(|n| format!("event: x\ndata: {}\ndata: b", "y".repeat(n))),
        Just("data: [DONE]".to_string()),
    ];
    let ending = prop_oneof![Just("\n"), Just("\r\n")];
    (
        proptest::collection::vec((event, ending.clone()), 0..12),
        proptest::option::of((any::<prop::sample::Index>(), ending)),
    )
        .prop_map(|(events, usage)| {
            let ended = |e: &str, end: &str| format!("{}{end}{end}", e.replace('\n', end));
            let mut with: Vec<String> = events.iter().map(|(e, end)| ended(e, end)).collect();
            let without = with.concat().into_bytes();
            if let Some((at, end)) = usage {
                with.insert(at.index(with.len() + 1), ended(USAGE, end));
            }
            (with.concat().into_bytes(), without)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn usage_stripper_removes_exactly_the_usage_chunk_any_cuts_any_cap(
        (stream, expected) in usage_stream(600),
        cuts in cuts(),
        cap in 128usize..1000,
    ) {
        let mut s = UsageStripper::with_max_event(cap);
        let parts = pieces(&stream, &cuts);
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            out.extend_from_slice(&s.feed(p, i + 1 == parts.len()));
        }
        prop_assert_eq!(String::from_utf8(out).unwrap(), String::from_utf8(expected).unwrap());
    }

    #[test]
    fn sse_reader_any_bytes_any_cuts(data in input(), cuts in cuts()) {
        let whole = read_events(&[&data]);
        let cut = read_events(&pieces(&data, &cuts));
        prop_assert_eq!(whole, cut);
    }

    #[test]
    fn sse_reader_with_a_small_cap_any_cuts(data in input(), cuts in cuts(), cap in 0usize..200) {
        let read = |parts: &[&[u8]]| {
            let mut r = SseReader::with_max_event(cap);
            let mut out = Vec::new();
            for p in parts {
                r.feed(p, |e| out.push((e.name.to_vec(), e.data.to_vec())));
            }
            (out, r.oversized())
        };
        let whole = read(&[&data]);
        prop_assert_eq!(&whole, &read(&pieces(&data, &cuts)));
        // Nothing read is larger than the cap.
        prop_assert!(whole.0.iter().all(|(_, d)| d.len() <= cap));
    }

    #[test]
    fn every_tap_any_bytes_any_cuts(data in input(), cuts in cuts()) {
        for kind in [TapKind::OpenAiSse, TapKind::AnthropicSse, TapKind::Json, TapKind::None] {
            let whole = tap_measure(kind, &[&data]);
            let cut = tap_measure(kind, &pieces(&data, &cuts));
            prop_assert_eq!(whole, cut, "{:?}", kind);
        }
        // Audio counts chunks as they come (each is audio sent): only no panic.
        tap_measure(TapKind::Audio, &pieces(&data, &cuts));
    }

    #[test]
    fn head_gate_any_bytes_any_cuts(
        data in prop_oneof![head_like(), proptest::collection::vec(any::<u8>(), 0..512)],
        cuts in cuts(),
    ) {
        // Read by read, the head is whole as soon as (and only if) it is whole at once.
        let at_once = headgate::HeadEnd::default().whole(&data);
        let mut end = headgate::HeadEnd::default();
        let mut buf = Vec::new();
        let mut whole = false;
        for p in pieces(&data, &cuts) {
            buf.extend_from_slice(p);
            if end.whole(&buf) {
                whole = true;
                break;
            }
        }
        prop_assert_eq!(whole, at_once);
        // What the gate reads from a head it refuses: no panic, and an id it would echo
        // is one the relay accepts.
        let _ = headgate::request_path(&data);
        let _ = headgate::unparseable(&data);
        if let Some(id) = headgate::client_request_id(&data) {
            prop_assert!(stream_relay::request_id::accept_client_id(id.as_bytes()).is_some());
        }
    }

    #[test]
    fn usage_stripper_any_bytes_any_cuts(data in input(), cuts in cuts()) {
        let run = |parts: &[&[u8]]| {
            let mut s = UsageStripper::default();
            let mut out = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                out.extend_from_slice(&s.feed(p, i + 1 == parts.len()));
            }
            out
        };
        let whole = run(&[&data]);
        let cut = run(&pieces(&data, &cuts));
        prop_assert_eq!(&whole, &cut);
        prop_assert!(whole.len() <= data.len());
    }

    #[test]
    fn request_body_reader_any_bytes_any_cuts(data in input(), cuts in cuts(), hold in any::<bool>()) {
        let parts = pieces(&data, &cuts);
        let mut c = BodyCollector::default();
        c.reset(request_info::Rewrite { usage: hold, store_off: false });
        let mut sent = Vec::new();
        let mut end = None;
        for (i, p) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let (step, e) = c.step(p, last);
            match step {
                BodyStep::Pass => sent.extend_from_slice(p),
                BodyStep::Replace(b) => sent.extend_from_slice(&b),
            }
            if last {
                end = e;
            }
        }
        let end = end.expect("the last chunk ends the body");
        if end.usage_added {
            // The only change the reader makes: include_usage added to a JSON object.
            let v: serde_json::Value = serde_json::from_slice(&sent).expect("still JSON");
            prop_assert_eq!(&v["stream_options"]["include_usage"], &serde_json::Value::Bool(true));
        } else {
            prop_assert_eq!(&sent, &data);
        }
        prop_assert_eq!(end.invalid_json, !stream_relay::gate::is_json(&data));
        // The early-read path parses the same bytes without a panic.
        let _ = request_info::parse(&data);
    }
}

/// Percent-decodes once (invalid escapes are kept as they are).
fn decode(s: &[u8]) -> Vec<u8> {
    let h = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(a), Some(b)) = (h(s[i + 1]), h(s[i + 2])) {
                out.push(a * 16 + b);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// What a server that decodes (once or twice) and treats `\\` as `/` would resolve the
/// path to: its segments, with `;params` cut.
fn resolved_segments(path: &[u8], decodings: usize) -> Vec<Vec<u8>> {
    let mut p = path.to_vec();
    for _ in 0..decodings {
        p = decode(&p);
    }
    p.split(|b| *b == b'/' || *b == b'\\')
        .skip(1)
        .map(|s| s.split(|b| *b == b';').next().unwrap_or_default().to_vec())
        .collect()
}

fn path_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_-]{1,8}",
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2E%2e".to_string()),
        Just(".%2e".to_string()),
        Just("%252e%252e".to_string()),
        Just("a%2fb".to_string()),
        Just("a%5Cb".to_string()),
        Just("a\\b".to_string()),
        Just(String::new()),
        Just("%00".to_string()),
        Just("%0a".to_string()),
        Just("..;x".to_string()),
        Just("%".to_string()),
        Just("%g1".to_string()),
        Just("%20".to_string()),
        Just("...".to_string()),
        Just(".x".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// A path the checker lets through means the same to every server behind the relay:
    /// decoded once or twice, with `\\` taken as `/` and `;params` cut, it has no `.`,
    /// `..` or empty segment and no control byte; and a path of plain segments passes.
    #[test]
    fn path_checker_passes_only_paths_that_resolve_to_themselves(
        segs in proptest::collection::vec(path_segment(), 0..6)
    ) {
        let path = format!("/{}", segs.join("/"));
        let ok = stream_relay::policy::check_path(&path).is_ok();
        if ok {
            for d in 0..=2 {
                for seg in resolved_segments(path.as_bytes(), d) {
                    prop_assert!(!seg.is_empty() || path == "/", "{path}: empty segment after {d} decodings");
                    prop_assert!(seg != b"." && seg != b"..", "{path}: dot segment after {d} decodings");
                }
                let decoded = resolved_segments(path.as_bytes(), d.min(1)).concat();
                prop_assert!(!decoded.iter().any(|b| *b < 0x20 || *b == 0x7f), "{path}: control byte");
            }
        }
        let plain = segs.iter().all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        if plain {
            prop_assert!(ok, "{path} refused");
        }
    }
}

/// Inputs that once broke something (none yet): each stays a test.
#[test]
fn regressions() {
    let inputs: &[&[u8]] = &[b"data: {\"usage\":\r\r\n\n", b"\xff\xfe\n\n", b"event:\n\n"];
    for data in inputs {
        for kind in [TapKind::OpenAiSse, TapKind::AnthropicSse, TapKind::Json] {
            tap_measure(kind, &[data]);
        }
        read_events(&[data]);
    }
}
