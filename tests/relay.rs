//! The real relay binary in front of the mock provider, on free loopback ports.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use stream_relay::mock::credential_digest as digest;

const LIMITED_KEY: &str = "sk-tenant-limited";

/// Routes to `mock`, a route whose key variable is unset, one whose upstreams all
/// refuse connections, and one whose first upstream refuses.
fn config(mock: &MockProc) -> String {
    let u = mock.url();
    let (d1, d2) = (refused_port(), refused_port());
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"], key: "env:TEST_PROVIDER_KEY" }}
  - {{ name: anthropic, prefix: /anthropic, provider: anthropic, upstreams: ["{u}"], key: "env:TEST_PROVIDER_KEY" }}
  - {{ name: audio, prefix: /audio/v1, provider: audio, upstreams: ["{u}/v1"], key: "env:TEST_PROVIDER_KEY" }}
  - {{ name: azure, prefix: /azure, provider: openai, upstreams: ["{u}/openai"], key: "env:TEST_PROVIDER_KEY", key_header: api-key }}
  - {{ name: unset, prefix: /unset/v1, provider: openai, upstreams: ["{u}/v1"], key: "env:STREAM_RELAY_TEST_UNSET_VARIABLE" }}
  - {{ name: dead, prefix: /dead, provider: anthropic, upstreams: ["http://127.0.0.1:{d1}", "http://127.0.0.1:{d2}"], key: "env:TEST_PROVIDER_KEY" }}
  - {{ name: failover, prefix: /failover/v1, provider: openai, upstreams: ["http://127.0.0.1:{d1}/v1", "{u}/v1"], key: "env:TEST_PROVIDER_KEY" }}
tenants:
  - {{ id: acme, key_sha256: ["{h1}"] }}
  - {{ id: limited, key_sha256: ["{h2}"], routes: [anthropic] }}
"#,
        h1 = hash(TENANT_KEY),
        h2 = hash(LIMITED_KEY),
    )
}

fn start() -> (MockProc, RelayProc) {
    let mock = MockProc::start(Some(PROVIDER_KEY));
    let relay = RelayProc::start(&config(&mock), &[("TEST_PROVIDER_KEY", PROVIDER_KEY)]);
    (mock, relay)
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[test]
fn openai_streams_and_json_are_byte_identical_to_direct() {
    let (mock, relay) = start();
    let direct_auth = bearer(PROVIDER_KEY);
    let tenant_auth = bearer(TENANT_KEY);
    for (stream, usage) in [(true, true), (true, false), (false, false)] {
        let body = chat_body(stream, usage);
        let direct = request(
            mock.addr,
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", &direct_auth),
                ("content-type", "application/json"),
            ],
            &body,
        );
        let via = request(
            relay.addr,
            "POST",
            "/openai/v1/chat/completions",
            &[
                ("authorization", &tenant_auth),
                ("content-type", "application/json"),
            ],
            &body,
        );
        assert_eq!(direct.status, 200);
        assert_eq!(via.status, 200, "{}", String::from_utf8_lossy(&via.body));
        assert!(
            via.complete,
            "stream={stream} usage={usage}: body did not end properly"
        );
        assert_eq!(
            String::from_utf8_lossy(&via.body),
            String::from_utf8_lossy(&direct.body),
            "stream={stream} usage={usage}"
        );
        assert_eq!(via.header("content-type"), direct.header("content-type"));
        assert!(via.header("content-encoding").is_none());
        assert_eq!(via.header("x-request-id").map(str::len), Some(32));
        if stream {
            let text = String::from_utf8_lossy(&via.body).into_owned();
            assert!(text.ends_with("data: [DONE]\n\n"));
            assert_eq!(text.contains("\"prompt_tokens\""), usage);
        }
    }
}

#[test]
fn anthropic_streams_and_json_are_byte_identical_to_direct() {
    let (mock, relay) = start();
    for stream in [true, false] {
        let body = anthropic_body(stream);
        let direct = request(
            mock.addr,
            "POST",
            "/v1/messages",
            &[
                ("x-api-key", PROVIDER_KEY),
                ("anthropic-version", "2023-06-01"),
            ],
            &body,
        );
        let via = request(
            relay.addr,
            "POST",
            "/anthropic/v1/messages",
            &[
                ("x-api-key", TENANT_KEY),
                ("anthropic-version", "2023-06-01"),
            ],
            &body,
        );
        assert_eq!((direct.status, via.status), (200, 200));
        assert!(via.complete);
        assert_eq!(via.body, direct.body, "stream={stream}");
        if stream {
            let text = String::from_utf8(via.body.clone()).unwrap();
            assert!(text.starts_with("event: message_start\n"));
            assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
        }
    }
}

#[test]
fn audio_is_byte_identical_to_direct() {
    let (mock, relay) = start();
    let knobs = [
        ("x-mock-chunks", "24"),
        ("x-mock-chunk-bytes", "32768"),
        ("x-mock-interval-ms", "5"),
    ];
    let body = br#"{"model":"tts-1","input":"Hello there","voice":"alloy"}"#;
    let direct_auth = bearer(PROVIDER_KEY);
    let mut h = knobs.to_vec();
    h.push(("authorization", &direct_auth));
    let direct = request(mock.addr, "POST", "/v1/audio/speech", &h, body);
    let tenant_auth = bearer(TENANT_KEY);
    let mut h = knobs.to_vec();
    h.push(("authorization", &tenant_auth));
    let via = request(relay.addr, "POST", "/audio/v1/audio/speech", &h, body);
    assert_eq!((direct.status, via.status), (200, 200));
    assert!(via.complete);
    assert_eq!(via.body.len(), 24 * 32768);
    assert!(via.body == direct.body, "audio bytes differ");
    assert_eq!(via.header("content-type"), Some("audio/mpeg"));
}

#[test]
fn pacing_is_preserved_not_batched() {
    let (_mock, relay) = start();
    let auth = bearer(TENANT_KEY);
    let via = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("x-mock-chunks", "6"),
            ("x-mock-interval-ms", "100"),
        ],
        &chat_body(true, false),
    );
    assert_eq!(via.status, 200);
    // Events: role, 6 content, finish, [DONE]. Content events 1..=6 are 100 ms apart.
    let arrivals = via.event_arrivals();
    assert_eq!(arrivals.len(), 9);
    let gaps: Vec<Duration> = arrivals[1..7].windows(2).map(|w| w[1] - w[0]).collect();
    // Batching would put events together (gaps near zero). Allow one gap squeezed by a
    // stall on a loaded machine.
    let spaced = gaps
        .iter()
        .filter(|g| **g >= Duration::from_millis(50))
        .count();
    assert!(spaced >= 4, "events were batched: gaps {gaps:?}");
    let span = arrivals[6] - arrivals[1];
    assert!(span >= Duration::from_millis(400), "span {span:?}");
}

#[test]
fn provider_key_is_injected_and_tenant_key_never_forwarded() {
    let (mock, relay) = start();
    let auth = bearer(TENANT_KEY);
    let via = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("x-api-key", TENANT_KEY),
            ("accept-encoding", "gzip, br"),
            ("x-request-id", "client-chosen-id-42"),
        ],
        &chat_body(false, false),
    );
    assert_eq!(via.status, 200);
    // The client reads back its own id; upstream goes the relay's own.
    assert_eq!(via.header("x-request-id"), Some("client-chosen-id-42"));
    let stats = mock.stats();
    assert_eq!(stats["auth_failures"], 0);
    let seen = stats["last_headers"].as_object().unwrap();
    // The mock keeps credentials as digests only.
    assert_eq!(
        seen["authorization"],
        digest(&format!("Bearer {PROVIDER_KEY}"))
    );
    let upstream_id = seen["x-request-id"].as_str().unwrap();
    assert_ne!(upstream_id, "client-chosen-id-42");
    assert_eq!(upstream_id.len(), 32);
    assert!(seen.get("accept-encoding").is_none());
    assert!(seen.get("x-api-key").is_none());
    assert_eq!(seen["host"], mock.addr.to_string());
    for (name, value) in seen {
        assert!(
            !value.as_str().unwrap().contains(TENANT_KEY)
                && value != &digest(TENANT_KEY)
                && value != &digest(&format!("Bearer {TENANT_KEY}")),
            "tenant key forwarded in {name}"
        );
    }

    // Azure style: the key goes in `api-key`.
    let via = request(
        relay.addr,
        "POST",
        "/azure/deployments/gpt/chat/completions?api-version=2024-10-21",
        &[("authorization", &auth)],
        &chat_body(false, false),
    );
    assert_eq!(via.status, 200);
    let seen = mock.stats()["last_headers"].clone();
    assert_eq!(seen["api-key"], digest(PROVIDER_KEY));
    assert!(seen.get("authorization").is_none());

    // Anthropic style: `x-api-key`, and the tenant's own x-api-key is replaced.
    let via = request(
        relay.addr,
        "POST",
        "/anthropic/v1/messages",
        &[
            ("x-api-key", TENANT_KEY),
            ("anthropic-version", "2023-06-01"),
        ],
        &anthropic_body(false),
    );
    assert_eq!(via.status, 200);
    let seen = mock.stats()["last_headers"].clone();
    assert_eq!(seen["x-api-key"], digest(PROVIDER_KEY));
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert_eq!(mock.stats()["auth_failures"], 0);
}

#[test]
fn refusals_use_the_provider_error_shape() {
    let (mock, relay) = start();
    let before = mock.stats()["requests"].as_u64().unwrap();
    let auth = bearer(TENANT_KEY);
    let wrong = bearer("sk-wrong");
    let anthropic = ("anthropic-version", "2023-06-01");
    let openai = "/openai/v1/chat/completions";
    // (path, headers, status, JSON pointer, expected value at the pointer)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str, &'a str);
    let cases: [Case; 8] = [
        (openai, vec![], 401, "/error/code", "missing_api_key"),
        (
            openai,
            vec![("authorization", &wrong)],
            401,
            "/error/code",
            "invalid_api_key",
        ),
        (
            "/anthropic/v1/messages",
            vec![("x-api-key", "sk-wrong"), anthropic],
            401,
            "/error/type",
            "authentication_error",
        ),
        (
            openai,
            vec![("x-api-key", LIMITED_KEY)],
            403,
            "/error/type",
            "permission_error",
        ),
        (
            "/nowhere/v1/chat",
            vec![("authorization", &auth)],
            404,
            "/error/code",
            "unknown_url",
        ),
        (
            "/nowhere/v1/messages",
            vec![("x-api-key", TENANT_KEY), anthropic],
            404,
            "/error/type",
            "not_found_error",
        ),
        (
            "/unset/v1/chat/completions",
            vec![("authorization", &auth)],
            503,
            "/error/code",
            "provider_key_missing",
        ),
        (
            "/anthropic/v1/messages",
            vec![anthropic],
            401,
            "/type",
            "error",
        ),
    ];
    for (path, headers, status, pointer, expected) in cases {
        let r = request(relay.addr, "POST", path, &headers, &chat_body(false, false));
        assert_eq!(r.status, status, "{path} {headers:?}");
        let body = r.json();
        assert_eq!(
            body.pointer(pointer).and_then(|v| v.as_str()),
            Some(expected),
            "{body}"
        );
        let message = body.pointer("/error/message").and_then(|m| m.as_str());
        assert!(message.is_some_and(|m| !m.is_empty()), "{body}");
        assert!(r.header("x-request-id").is_some());
    }

    // None of these reached the provider.
    assert_eq!(mock.stats()["requests"].as_u64().unwrap(), before);
    // The unset key was reported at start, naming the variable but no value.
    assert!(relay
        .stderr()
        .contains("route `unset` answers 503: its provider key (environment variable STREAM_RELAY_TEST_UNSET_VARIABLE) is not set"));
}

#[test]
fn unreachable_upstreams_give_502_and_failover_uses_the_next() {
    let (mock, relay) = start();
    let r = request(
        relay.addr,
        "POST",
        "/dead/v1/messages",
        &[
            ("x-api-key", TENANT_KEY),
            ("anthropic-version", "2023-06-01"),
        ],
        &anthropic_body(true),
    );
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "api_error");

    let auth = bearer(TENANT_KEY);
    let before = mock.stats()["completed"].as_u64().unwrap();
    // Round robin starts on each upstream in turn; every request must succeed.
    for _ in 0..4 {
        let r = request(
            relay.addr,
            "POST",
            "/failover/v1/chat/completions",
            &[("authorization", &auth)],
            &chat_body(true, false),
        );
        assert_eq!(r.status, 200);
        assert!(r.complete);
        // The body replayed to the second upstream still asked for usage, and the
        // usage chunk was still removed for this client.
        let text = String::from_utf8_lossy(&r.body);
        assert!(
            text.ends_with("data: [DONE]\n\n") && !text.contains("usage"),
            "{text}"
        );
    }
    // The mock counts a stream after its last write, a moment after the client has it.
    let completed = mock.wait_stat("completed", before + 4, Duration::from_secs(5));
    assert_eq!(completed, before + 4);
    relay.metrics_with(
        r#"stream_relay_requests_total{outcome="upstream_unavailable",route="dead",status_class="5xx"} 1"#,
    );
    // The dead upstream failed three times in a row, and its breaker set it aside: the
    // fourth request went straight to the live one.
    let text = relay
        .metrics_with(r#"stream_relay_upstream_failures_total{kind="connect",route="failover"} 3"#);
    assert!(
        text.lines().any(|l| l.starts_with(
            r#"stream_relay_breaker_transitions_total{route="failover",target="127.0.0.1:"#
        ) && l.ends_with(r#"to="open"} 1"#)),
        "{text}"
    );
}

/// Opens a request, reads `events` SSE events (0: only wait), then hangs up.
fn hang_up_after(
    relay: &RelayProc,
    headers: &[(&str, &str)],
    body: &[u8],
    events: usize,
    wait: Duration,
) {
    let mut s = TcpStream::connect(relay.addr).unwrap();
    let auth = bearer(TENANT_KEY);
    let mut h = headers.to_vec();
    h.push(("authorization", &auth));
    s.write_all(&build_request(
        "POST",
        "/openai/v1/chat/completions",
        &h,
        body,
    ))
    .unwrap();
    if events > 0 {
        let r = read_response(&mut s, Instant::now(), Duration::from_secs(10), events);
        assert_eq!(r.status, 200);
    } else {
        std::thread::sleep(wait);
    }
    drop(s);
}

#[test]
fn client_disconnect_cancels_the_upstream_request() {
    let (mock, relay) = start();
    let within = Duration::from_secs(5);

    // While waiting for the first byte of a stream.
    hang_up_after(
        &relay,
        &[("x-mock-first-delay-ms", "20000")],
        &chat_body(true, false),
        0,
        Duration::from_millis(300),
    );
    let t = Instant::now();
    assert_eq!(
        mock.wait_stat("cancelled", 1, within),
        1,
        "first-byte wait not cancelled"
    );
    assert!(t.elapsed() < Duration::from_secs(3));

    // Mid-stream.
    hang_up_after(
        &relay,
        &[("x-mock-chunks", "200"), ("x-mock-interval-ms", "50")],
        &chat_body(true, false),
        3,
        Duration::ZERO,
    );
    assert_eq!(
        mock.wait_stat("cancelled", 2, within),
        2,
        "mid-stream not cancelled"
    );

    // A non-streaming request.
    hang_up_after(
        &relay,
        &[("x-mock-first-delay-ms", "20000")],
        &chat_body(false, false),
        0,
        Duration::from_millis(300),
    );
    assert_eq!(
        mock.wait_stat("cancelled", 3, within),
        3,
        "non-streaming not cancelled"
    );
    assert_eq!(mock.stats()["completed"], 0);
}

#[test]
fn a_stream_cut_upstream_ends_the_client_stream() {
    let (mock, relay) = start();
    let auth = bearer(TENANT_KEY);
    let t = Instant::now();
    let r = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("x-mock-chunks", "10"),
            ("x-mock-cut-after", "3"),
            ("x-mock-interval-ms", "10"),
        ],
        &chat_body(true, false),
    );
    assert!(t.elapsed() < Duration::from_secs(10), "client stream hung");
    assert_eq!(r.status, 200);
    assert!(
        !r.complete,
        "a cut stream must not look complete to the client"
    );
    let text = String::from_utf8_lossy(&r.body);
    assert_eq!(text.matches("\"content\":").count(), 4, "{text}");
    assert_eq!(mock.stats()["cut"], 1);
}

#[test]
fn upstream_errors_pass_through_unchanged() {
    let (mock, relay) = start();
    let auth = bearer(TENANT_KEY);
    let direct_auth = bearer(PROVIDER_KEY);
    let direct = request(
        mock.addr,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &direct_auth), ("x-mock-status", "429")],
        &chat_body(true, false),
    );
    let via = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth), ("x-mock-status", "429")],
        &chat_body(true, false),
    );
    assert_eq!((direct.status, via.status), (429, 429));
    assert_eq!(via.body, direct.body);
}

#[test]
fn admin_endpoints_answer() {
    let (_mock, relay) = start();
    let r = request(relay.admin, "GET", "/healthz", &[], b"");
    assert_eq!(r.status, 200);
    let r = request(relay.admin, "GET", "/readyz", &[], b"");
    assert_eq!(r.status, 200);
    let auth = bearer(TENANT_KEY);
    let ok = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        &chat_body(false, false),
    );
    assert_eq!(ok.status, 200);
    relay.metrics_with(
        r#"stream_relay_requests_total{outcome="ok",route="openai",status_class="2xx"} 1"#,
    );
}

/// A client that sends `Expect: 100-continue` and waits gets `100 Continue` from the
/// relay at once (the relay reads small bodies itself before choosing the upstream).
#[test]
fn expect_continue_is_answered_without_waiting() {
    use std::io::Read;
    let (_mock, relay) = start();
    let body = chat_body(false, false);
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {TENANT_KEY}\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let t = Instant::now();
    let n = s.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "the client was made to wait"
    );
    s.write_all(&body).unwrap();
    let r = read_response(&mut s, Instant::now(), Duration::from_secs(10), usize::MAX);
    assert_eq!(r.status, 200);
    assert!(r.complete);
}

/// Each request's access line reaches the log (they are written in batches, off the
/// request path): within a moment while the relay runs, in the order the requests
/// ended, and every one of them when the relay stops right after its last request.
#[test]
fn access_lines_reach_the_log_in_order_and_at_exit() {
    let (_mock, mut relay) = start();
    let auth = bearer(TENANT_KEY);
    let send = |id: &str| {
        let r = request(
            relay.addr,
            "POST",
            "/openai/v1/chat/completions",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("x-request-id", id),
            ],
            &chat_body(false, false),
        );
        assert_eq!(r.status, 200);
    };
    let ids: Vec<String> = (0..20).map(|i| format!("access-line-{i:02}")).collect();
    for id in &ids {
        send(id);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let logged = |log: &str, id: &str| log.find(&format!("client_id={id} "));
    let mut log = relay.stderr();
    while logged(&log, &ids[19]).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        log = relay.stderr();
    }
    let at: Vec<usize> = ids
        .iter()
        .map(|id| logged(&log, id).unwrap_or_else(|| panic!("no access line for {id}:\n{log}")))
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "access lines out of order"
    );
    // The last lines of a relay told to stop at once are written before it exits.
    send("access-line-last");
    let pid = relay.proc.pid().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let _ = relay.proc.child.wait();
    let log = relay.stderr();
    assert!(
        logged(&log, "access-line-last").is_some(),
        "the access line of the last request before exit is missing:\n{log}"
    );
}
