//! Upstreams that stall: the route's first-byte, gap and total deadlines end the request
//! the way the client's SDK reports as an error (a 504 before the response head, an SSE
//! error event in the provider's shape inside a stream), the upstream connection is
//! closed so its work stops, and the row says which deadline it was.

use std::time::{Duration, Instant};

use common::*;

const CHAT: &str = "/openai/v1/chat/completions";

fn config(mock: &MockProc) -> String {
    let u = mock.url();
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"],
      timeouts: {{ first_byte: 400ms, idle: 400ms, total: 3s }} }}
  - {{ name: anthropic, prefix: /anthropic/v1, provider: anthropic, upstreams: ["{u}/v1"],
      timeouts: {{ first_byte: 5s, idle: 400ms, total: 30s }} }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
        h = hash(TENANT_KEY)
    )
}

/// The SSE events of a body, as (event name, data) pairs.
fn events(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = v.to_string();
                }
            }
            (name, data)
        })
        .collect()
}

#[test]
fn a_stream_that_stalls_after_its_first_event_ends_with_an_error_event() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let cancelled_before = mock.stats()["cancelled"].as_u64().unwrap();

    let r = request(
        relay.addr,
        "POST",
        CHAT,
        &[
            ("authorization", &auth),
            ("x-request-id", "stall-openai"),
            ("x-mock-stall-after", "1"),
        ],
        &chat_body(true, false),
    );
    assert_eq!(r.status, 200);
    assert!(r.complete, "the stream ends cleanly, not cut");
    let ev = events(&r.body);
    assert!(ev.len() >= 2, "{ev:?}");
    assert!(ev[0].1.contains("chat.completion.chunk"), "{ev:?}");
    let last: serde_json::Value = serde_json::from_str(&ev.last().unwrap().1).unwrap();
    assert_eq!(last["error"]["code"], "stream_stalled");
    assert_eq!(last["error"]["type"], "api_error");
    // The upstream connection was closed: the mock saw its client go.
    assert!(
        mock.wait_stat("cancelled", cancelled_before + 1, Duration::from_secs(5))
            > cancelled_before
    );
    let stalled = relay.row_for("stall-openai");
    assert_eq!(stalled["outcome"], "stream_stalled");
    assert_eq!(stalled["status"], 200);
    assert!(stalled["response_bytes"].as_u64().unwrap() > 0);

    // Anthropic's shape: an `error` event.
    let r = request(
        relay.addr,
        "POST",
        "/anthropic/v1/messages",
        &[
            ("x-api-key", TENANT_KEY),
            ("anthropic-version", "2023-06-01"),
            ("x-request-id", "stall-anthropic"),
            ("x-mock-stall-after", "2"),
        ],
        &anthropic_body(true),
    );
    assert_eq!(r.status, 200);
    assert!(r.complete);
    let ev = events(&r.body);
    let (name, data) = ev.last().unwrap();
    assert_eq!(name, "error");
    let data: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");
    assert_eq!(
        relay.row_for("stall-anthropic")["outcome"],
        "stream_stalled"
    );

    // A steady stream longer than the gap deadline is not touched.
    let r = request(
        relay.addr,
        "POST",
        CHAT,
        &[
            ("authorization", &auth),
            ("x-mock-chunks", "12"),
            ("x-mock-interval-ms", "50"),
        ],
        &chat_body(true, false),
    );
    assert!(r.complete);
    assert!(String::from_utf8_lossy(&r.body).ends_with("data: [DONE]\n\n"));
}

#[test]
fn no_first_byte_in_time_is_a_504_and_not_retried() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let before = mock.stats()["requests"].as_u64().unwrap();
    let t = Instant::now();
    let r = request(
        relay.addr,
        "POST",
        CHAT,
        &[
            ("authorization", &auth),
            ("x-request-id", "slow-head"),
            ("x-mock-first-delay-ms", "20000"),
        ],
        &chat_body(false, false),
    );
    assert_eq!(r.status, 504);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let v = r.json();
    assert_eq!(v["error"]["code"], "first_byte_timeout");
    assert_eq!(relay.row_for("slow-head")["outcome"], "first_byte_timeout");
    let after = mock.stats()["requests"].as_u64().unwrap();
    assert_eq!(after - before, 1, "the request was sent upstream once");
}

#[test]
fn the_total_deadline_ends_a_stream_that_keeps_going() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let r = request(
        relay.addr,
        "POST",
        CHAT,
        &[
            ("authorization", &auth),
            ("x-request-id", "too-long"),
            ("x-mock-chunks", "100"),
            ("x-mock-interval-ms", "100"),
        ],
        &chat_body(true, false),
    );
    assert_eq!(r.status, 200);
    let ev = events(&r.body);
    let last: serde_json::Value = serde_json::from_str(&ev.last().unwrap().1).unwrap();
    assert_eq!(last["error"]["code"], "total_timeout");
    assert!(ev.len() > 5 && ev.len() < 100, "{}", ev.len());
    assert_eq!(relay.row_for("too-long")["outcome"], "total_timeout");
}
