//! Routing around failing upstreams and keys: a flapping upstream (500, then 200, then
//! 500 again) and a key answering 429 are set aside by their breakers while every client
//! request still succeeds, and are put back once they recover.

use std::time::{Duration, Instant};

use common::*;

const CHAT: &str = "/openai/v1/chat/completions";

fn control(mock: &MockProc, body: &str) {
    let r = request(mock.addr, "POST", "/mock/control", &[], body.as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// A relay whose route `openai` has the upstreams `a` then `b`, with `extra` route fields.
fn two_upstreams(a: &MockProc, b: &MockProc, extra: &str) -> RelayProc {
    RelayProc::start(
        &format!(
            r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{a}/v1", "{b}/v1"],
      {extra} }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
            a = a.url(),
            b = b.url(),
            h = hash(TENANT_KEY)
        ),
        &[],
    )
}

fn requests_of(mock: &MockProc) -> u64 {
    mock.stats()["requests"].as_u64().unwrap()
}

fn chat(relay: &RelayProc) -> Response {
    let auth = format!("Bearer {TENANT_KEY}");
    request(
        relay.addr,
        "POST",
        CHAT,
        &[("authorization", &auth), ("x-mock-interval-ms", "1")],
        &chat_body(true, false),
    )
}

/// Sends until `done` says so (at most 10 s), every answer a complete 200.
fn until(relay: &RelayProc, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        let r = chat(relay);
        assert_eq!(
            r.status,
            200,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.complete);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_flapping_upstream_is_routed_around_and_taken_back() {
    let a = MockProc::start(None);
    let b = MockProc::start(None);
    let relay = two_upstreams(&a, &b, "breaker: { failures: 2, open_for: 500ms }");
    let target_a = a.url().trim_start_matches("http://").to_string();
    for round in 0..2 {
        // A answers 500: its requests are retried on B, and after two it is set aside.
        control(&a, r#"{"status": 500}"#);
        let before = requests_of(&a);
        for _ in 0..10 {
            let r = chat(&relay);
            assert_eq!(r.status, 200, "round {round}");
            assert!(r.complete);
        }
        let during = requests_of(&a) - before;
        assert!(
            (1..=3).contains(&during),
            "round {round}: A got {during} of 10 requests while failing"
        );
        relay.metrics_with(&format!(
            "stream_relay_breaker_state{{route=\"openai\",target=\"{target_a}\"}} 2"
        ));
        // A recovers: after open_for a request probes it, and it takes traffic again.
        control(&a, "{}");
        std::thread::sleep(Duration::from_millis(600));
        let before = requests_of(&a);
        until(&relay, "A back in use", || requests_of(&a) >= before + 3);
        relay.metrics_with(&format!(
            "stream_relay_breaker_state{{route=\"openai\",target=\"{target_a}\"}} 0"
        ));
    }
    relay.metrics_with(&format!(
        "stream_relay_breaker_transitions_total{{route=\"openai\",target=\"{target_a}\",to=\"open\"}} 2"
    ));
    relay.metrics_with(&format!(
        "stream_relay_breaker_transitions_total{{route=\"openai\",target=\"{target_a}\",to=\"closed\"}} 2"
    ));
    assert!(relay.stderr().contains("set aside (circuit open)"));
}

#[test]
fn a_key_answering_429_is_set_aside_for_its_retry_after() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(
        &format!(
            r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"],
      keys: ["env:KEY_ONE", "env:KEY_TWO"] }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
            u = mock.url(),
            h = hash(TENANT_KEY)
        ),
        &[("KEY_ONE", "sk-one"), ("KEY_TWO", "sk-two")],
    );
    // The mock keeps digests of the keys it saw, never the keys.
    let by_key = |k: &str| {
        mock.stats()["by_key"][stream_relay::mock::credential_digest(k)]
            .as_u64()
            .unwrap_or(0)
    };
    // Both keys take turns.
    for _ in 0..4 {
        assert_eq!(chat(&relay).status, 200);
    }
    assert!(by_key("sk-one") >= 1 && by_key("sk-two") >= 1);

    // sk-one hits its own rate limit, Retry-After 1 s: clients never see the 429.
    control(
        &mock,
        r#"{"key_status": {"sk-one": 429}, "retry_after": 1}"#,
    );
    let (one, two) = (by_key("sk-one"), by_key("sk-two"));
    for _ in 0..8 {
        let r = chat(&relay);
        assert_eq!(r.status, 200);
        assert!(r.complete);
    }
    assert!(by_key("sk-one") - one <= 1, "sk-one kept being used");
    assert!(by_key("sk-two") - two >= 8);
    relay.metrics_with(
        "stream_relay_breaker_transitions_total{route=\"openai\",target=\"key1\",to=\"open\"} 1",
    );

    // It recovers; after its Retry-After it is probed and used again.
    control(&mock, "{}");
    std::thread::sleep(Duration::from_millis(1100));
    let one = by_key("sk-one");
    until(&relay, "sk-one back in use", || by_key("sk-one") >= one + 2);
    relay.metrics_with("stream_relay_breaker_state{route=\"openai\",target=\"key1\"} 0");

    // With every key refused, the provider's 429 reaches the client as it came.
    control(&mock, r#"{"status": 429, "retry_after": 7}"#);
    let r = chat(&relay);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
}

#[test]
fn health_checks_set_a_failing_upstream_aside_without_client_traffic() {
    let a = MockProc::start(None);
    let b = MockProc::start(None);
    let relay = two_upstreams(
        &a,
        &b,
        "breaker: { failures: 2, open_for: 60s },
      health_check: { path: /v1/chat/completions, interval: 200ms, timeout: 1s }",
    );
    let target_a = a.url().trim_start_matches("http://").to_string();
    control(&a, r#"{"status": 503}"#);
    relay.metrics_with(&format!(
        "stream_relay_breaker_state{{route=\"openai\",target=\"{target_a}\"}} 2"
    ));
    // Clients never meet A while it is aside: none of their requests got A's 503 (which
    // would be counted as a retried status; health checks are not).
    for _ in 0..6 {
        assert_eq!(chat(&relay).status, 200);
    }
    let text = relay.metrics_with("stream_relay_breaker_state");
    assert!(!text.contains("kind=\"status_503\""), "{text}");
    // A recovers: the next check closes its breaker, long before open_for.
    control(&a, "{}");
    relay.metrics_with(&format!(
        "stream_relay_breaker_state{{route=\"openai\",target=\"{target_a}\"}} 0"
    ));
    let before = requests_of(&a);
    until(&relay, "A back in use", || requests_of(&a) >= before + 4);
}

#[test]
fn a_retried_body_is_counted_and_captured_once() {
    let mock = MockProc::start(None);
    let dead = refused_port();
    let relay = RelayProc::start(
        &format!(
            r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai,
      upstreams: ["http://127.0.0.1:{dead}/v1", "{u}/v1"], breaker: {{ failures: 100 }},
      capture: {{ request: whole }} }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
            u = mock.url(),
            h = hash(TENANT_KEY)
        ),
        &[],
    );
    // Chunked, so the relay streams it (no early read) and Pingora replays it to the
    // second upstream after the first refuses the connection.
    let body = chat_body(false, false);
    for id in ["replay-1", "replay-2"] {
        let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
        let head = format!(
            "POST {CHAT} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {TENANT_KEY}\r\nx-request-id: {id}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        use std::io::Write;
        s.write_all(head.as_bytes()).unwrap();
        for part in body.chunks(20) {
            s.write_all(format!("{:x}\r\n", part.len()).as_bytes())
                .unwrap();
            s.write_all(part).unwrap();
            s.write_all(b"\r\n").unwrap();
        }
        s.write_all(b"0\r\n\r\n").unwrap();
        let r = read_response(&mut s, Instant::now(), Duration::from_secs(10), usize::MAX);
        assert_eq!(r.status, 200, "{id}");
    }
    let rows = relay.rows_at_least(2);
    let attempts: Vec<u64> = rows
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap())
        .collect();
    assert!(
        attempts.contains(&2),
        "one request was retried: {attempts:?}"
    );
    for r in &rows {
        assert_eq!(r["request_bytes"], body.len() as u64, "{r}");
        assert_eq!(
            r["request_body"].as_str().unwrap().as_bytes(),
            &body[..],
            "{r}"
        );
    }
}

/// An upstream that answers the first request on each connection, keeps the connection
/// open, and closes it when the next request arrives: at once (`close_after: None`, an
/// idle keep-alive timeout racing the request) or after holding the request for a while
/// (it may have been working on it). Counts every request it received.
fn closes_reused_connections(
    close_after: Option<Duration>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let seen = counter.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                for served in 0.. {
                    // One request, head and announced body.
                    let Some((head, len)) = read_upstream_request(&mut s, &mut buf) else {
                        return;
                    };
                    seen.fetch_add(1, Ordering::SeqCst);
                    if served > 0 {
                        if let Some(after) = close_after {
                            std::thread::sleep(after);
                        }
                        return;
                    }
                    buf.drain(..head + len);
                    let body = br#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if s.write_all(head.as_bytes()).is_err() || s.write_all(body).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn plain_chat(relay: &RelayProc, id: &str) -> Response {
    let auth = format!("Bearer {TENANT_KEY}");
    request(
        relay.addr,
        "POST",
        CHAT,
        &[("authorization", &auth), ("x-request-id", id)],
        &chat_body(false, false),
    )
}

/// The `stale_pooled` count in the relay's metrics.
fn stale_retries(relay: &RelayProc) -> u64 {
    let text = relay.metrics_with("stream_relay_upstream_failures_total");
    let line = "stream_relay_upstream_failures_total{kind=\"stale_pooled\",route=\"openai\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(line))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn a_stale_pooled_connection_is_retried_even_with_one_upstream() {
    let (addr, seen) = closes_reused_connections(None);
    let relay = relay_to(addr);
    // The first request opens a connection the relay pools; a later one that takes it
    // from the pool (a busy machine may open a new one instead) finds it closed by the
    // upstream as the request arrives, and is sent again on a new connection.
    let mut sent = 0;
    while sent < 4 || (stale_retries(&relay) == 0 && sent < 20) {
        let r = plain_chat(&relay, &format!("stale-{sent}"));
        assert_eq!(
            r.status,
            200,
            "{sent}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.complete);
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let stale = stale_retries(&relay);
    assert!(
        stale > 0,
        "no request met a stale pooled connection in {sent}"
    );
    let rows = relay.rows_at_least(sent);
    assert_eq!(rows.len(), sent);
    let retried = rows.iter().filter(|r| r["attempts"] == 2).count() as u64;
    for r in &rows {
        assert_eq!(r["outcome"], "ok", "{r}");
        assert!(r["attempts"] == 1 || r["attempts"] == 2, "{r}");
    }
    assert_eq!(retried, stale, "one more attempt per stale connection met");
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst) as u64,
        sent as u64 + stale
    );
}

#[test]
fn a_reused_connection_that_held_the_request_is_not_sent_again() {
    let (addr, seen) = closes_reused_connections(Some(Duration::from_millis(1500)));
    let relay = relay_to(addr);
    // Until a request is sent on a pooled connection (a busy machine may open new ones):
    // the upstream holds it, then closes. It may have started paid work on it, so the
    // client gets the error and the request is not sent again.
    let mut held = None;
    for i in 0..10 {
        let before = seen.load(std::sync::atomic::Ordering::SeqCst);
        let id = format!("try-{i}");
        let r = plain_chat(&relay, &id);
        if r.status == 502 {
            assert_eq!(r.json()["error"]["code"], "upstream_unavailable");
            assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), before + 1);
            held = Some((id, i + 1));
            break;
        }
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (held, sent) = held.expect("no request was sent on a pooled connection in 10");
    let rows = relay.rows_at_least(sent);
    assert_eq!(rows.len(), sent);
    for r in &rows {
        // Served ones went once on a new connection; the held one was not retried.
        assert_eq!(r["attempts"], 1, "{r}");
    }
    let row = rows
        .iter()
        .find(|r| r["client_request_id"] == held)
        .unwrap();
    assert_eq!(row["outcome"], "upstream_unavailable", "{row}");
}
