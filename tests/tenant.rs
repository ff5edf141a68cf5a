//! A hostile tenant against the real relay, in front of an upstream that records exactly
//! what arrives: a relay key opens only what its route allows, and nothing the tenant
//! sends changes what the relay counts. Each case asserts what reached the upstream, not
//! only the client's status.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Headers a provider sends that a tenant must not see (or see twice).
const PROVIDER_HEADERS: &str = "set-cookie: session=operator\r\nserver: provider-edge\r\nopenai-organization: org-operator\r\nanthropic-organization-id: operator-org\r\nx-ratelimit-limit-requests: 99999\r\nx-request-id: req_provider_1\r\n";

/// An upstream that records every request and answers like a provider: chat streams
/// (with a usage chunk when asked for), JSON with usage otherwise, a gzip-encoded answer
/// when the client sent `x-test-gzip`.
fn recording_upstream() -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let seen = log.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                while let Some((head, len)) = read_upstream_request(&mut s, &mut buf) {
                    let mut req = parse(&buf[..head], &buf[head..head + len]);
                    buf.drain(..head + len);
                    if req.header("transfer-encoding") == Some("chunked") {
                        match read_chunked(&mut s, &mut buf) {
                            Some(body) => req.body = body,
                            None => {
                                seen.lock().unwrap().push(req);
                                return;
                            }
                        }
                    }
                    let answer = answer(&req);
                    seen.lock().unwrap().push(req);
                    if s.write_all(&answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
}

/// A chunked body from `s` (what is already read in `buf`); `None` when the relay
/// ended the request before its last chunk.
fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut body = Vec::new();
    let mut more = |buf: &mut Vec<u8>| {
        let mut b = [0u8; 65536];
        match s.read(&mut b) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&b[..n]);
                true
            }
        }
    };
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            if !more(buf) {
                return None;
            }
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).ok()?.trim(), 16).ok()?;
        while buf.len() < line_end + 2 + size + 2 {
            if !more(buf) {
                return None;
            }
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..line_end + 2 + size + 2);
        if size == 0 {
            return Some(body);
        }
    }
}

fn parse(head: &[u8], body: &[u8]) -> Seen {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap().split(' ');
    let method = first.next().unwrap().to_string();
    let path = first.next().unwrap().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Seen {
        method,
        path,
        headers,
        body: body.to_vec(),
    }
}

fn answer(req: &Seen) -> Vec<u8> {
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
    if req.header("x-test-gzip").is_some() {
        let b = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage";
        let mut out = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n{PROVIDER_HEADERS}\r\n", b.len()).into_bytes();
        out.extend_from_slice(b);
        return out;
    }
    if body["stream"] == true {
        let mut events = String::from(
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\n",
        );
        if body["stream_options"]["include_usage"] == true {
            events.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n");
        }
        events.push_str("data: [DONE]\n\n");
        return format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n{PROVIDER_HEADERS}\r\n{events}", events.len()).into_bytes();
    }
    let json = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{PROVIDER_HEADERS}\r\n{json}",
        json.len()
    )
    .into_bytes()
}

fn relay(up: SocketAddr, limits: &str) -> RelayProc {
    RelayProc::start(
        &format!(
            r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["http://{up}/v1"], upstream_headers: {{ OpenAI-Organization: org-route }} }}
  - {{ name: stored, prefix: /stored/v1, provider: openai, upstreams: ["http://{up}/v1"], store: force_off }}
  - {{ name: anthropic, prefix: /anthropic, provider: anthropic, upstreams: ["http://{up}"] }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"]{limits} }}
  - {{ id: chat-only, key_sha256: ["{h2}"], routes: [openai] }}
"#,
            h = hash(TENANT_KEY),
            h2 = hash("sk-chat-only"),
        ),
        &[],
    )
}

fn auth() -> String {
    format!("Bearer {TENANT_KEY}")
}

/// Sends `method path` with the tenant's key and `headers`.
fn send(
    relay: &RelayProc,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let a = auth();
    let mut h = vec![("authorization", a.as_str())];
    h.extend_from_slice(headers);
    request(relay.addr, method, path, &h, body)
}

/// Asserts that nothing reached the upstream.
fn assert_untouched(log: &Log) {
    assert!(
        paths(log).is_empty(),
        "reached the upstream: {:?}",
        paths(log)
    );
}

fn paths(log: &Log) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect()
}

const CHAT: &str = "/openai/v1/chat/completions";

#[test]
fn a_route_serves_only_its_endpoints() {
    let (up, log) = recording_upstream();
    let relay = relay(up, "");
    // Refused before anything goes upstream: (method, path, status, outcome, id).
    let cases = [
        (
            "DELETE",
            "/openai/v1/chat/completions/chatcmpl-1",
            404,
            "endpoint_not_served",
        ),
        (
            "GET",
            "/openai/v1/chat/completions?limit=100",
            405,
            "endpoint_method_not_allowed",
        ),
        ("POST", "/openai/v1/files", 404, "endpoint_not_served"),
        ("POST", "/openai/v1/batches", 404, "endpoint_not_served"),
        (
            "POST",
            "/openai/v1/fine_tuning/jobs",
            404,
            "endpoint_not_served",
        ),
        (
            "GET",
            "/openai/v1/responses/resp_1",
            404,
            "endpoint_not_served",
        ),
        (
            "POST",
            "/anthropic/v1/messages/batches",
            404,
            "endpoint_not_served",
        ),
    ];
    for (i, (method, path, status, outcome)) in cases.iter().enumerate() {
        let id = format!("ep-{i}");
        let ct = if path.ends_with("/files") {
            "multipart/form-data; boundary=x"
        } else {
            "application/json"
        };
        let r = send(
            &relay,
            method,
            path,
            &[("x-request-id", &id), ("content-type", ct)],
            b"{}",
        );
        assert_eq!(
            r.status,
            *status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if path.starts_with("/anthropic") {
            assert_eq!(r.json()["type"], "error");
            assert_eq!(r.json()["error"]["type"], "not_found_error");
        } else {
            assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        }
        if *status == 405 {
            assert_eq!(r.header("allow"), Some("POST"));
        }
        assert_eq!(relay.row_for(&id)["outcome"], *outcome);
    }
    assert_untouched(&log);
    // The inference endpoints pass.
    assert_eq!(
        send(&relay, "POST", CHAT, &[], &chat_body(false, false)).status,
        200
    );
    assert_eq!(
        send(&relay, "GET", "/openai/v1/models", &[], b"").status,
        200
    );
    assert_eq!(
        send(
            &relay,
            "POST",
            "/openai/v1/embeddings",
            &[],
            br#"{"model":"e","input":"x"}"#
        )
        .status,
        200
    );
    assert_eq!(
        send(
            &relay,
            "POST",
            "/anthropic/v1/messages",
            &[],
            &anthropic_body(false)
        )
        .status,
        200
    );
    assert_eq!(
        paths(&log),
        [
            "POST /v1/chat/completions",
            "GET /v1/models",
            "POST /v1/embeddings",
            "POST /v1/messages"
        ]
    );

    // `store`: passed as sent by default; forced off where the route says so, including
    // the Responses API's own default (store unless told not to).
    log.lock().unwrap().clear();
    let stored =
        br#"{"model":"gpt-4o-mini","store":true,"messages":[{"role":"user","content":"x"}]}"#;
    assert_eq!(send(&relay, "POST", CHAT, &[], stored).status, 200);
    assert_eq!(
        send(&relay, "POST", "/stored/v1/chat/completions", &[], stored).status,
        200
    );
    assert_eq!(
        send(
            &relay,
            "POST",
            "/stored/v1/responses",
            &[],
            br#"{"model":"gpt-4o-mini","input":"x"}"#
        )
        .status,
        200
    );
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen[0].json()["store"], true);
    assert_eq!(seen[1].json()["store"], false);
    assert_eq!(seen[1].json()["messages"][0]["content"], "x");
    assert_eq!(seen[2].json()["store"], false);
    assert_eq!(seen[2].json()["input"], "x");
}

#[test]
fn paths_are_checked_before_routing() {
    let (up, log) = recording_upstream();
    let relay = relay(up, "");
    let chat_only = "Bearer sk-chat-only";
    for (i, path) in [
        "/openai/v1/chat/../admin/keys",
        "/openai/v1/chat/%2e%2e/admin/keys",
        "/openai/v1/chat/.%2e/admin/keys",
        "/openai/v1//..//admin/keys",
        "/openai/v1/chat/completions/",
        "/openai/v1/a%2fb/chat/completions",
        "/openai/v1/a%5cb/chat/completions",
        "/openai/v1/%00/chat/completions",
        "/openai/v1/%252e%252e/chat/completions",
        "/stored/v1/../../openai/v1/chat/completions",
    ]
    .iter()
    .enumerate()
    {
        let id = format!("path-{i}");
        let r = request(
            relay.addr,
            "POST",
            path,
            &[("authorization", chat_only), ("x-request-id", &id)],
            &chat_body(false, false),
        );
        assert_eq!(
            r.status,
            400,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"]["code"], "invalid_path", "{path}");
        assert_eq!(relay.row_for(&id)["outcome"], "bad_path", "{path}");
    }
    assert_untouched(&log);
    // The checked path is the one routed and sent.
    let r = request(
        relay.addr,
        "POST",
        CHAT,
        &[("authorization", chat_only)],
        &chat_body(false, false),
    );
    assert_eq!(r.status, 200);
    assert_eq!(paths(&log), ["POST /v1/chat/completions"]);
}

#[test]
fn upgrades_are_refused_where_nothing_meters_them() {
    let (up, log) = recording_upstream();
    let relay = relay(up, "");
    let ws = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ];
    // A WebSocket is served only on an endpoint listed for one (`WEBSOCKET realtime`,
    // tests/websocket.rs); anywhere else it is refused before anything goes upstream.
    for (i, (method, path)) in [("GET", "/openai/v1/models"), ("POST", CHAT)]
        .iter()
        .enumerate()
    {
        let id = format!("ws-{i}");
        let mut h = ws.to_vec();
        h.push(("x-request-id", &id));
        let r = send(&relay, method, path, &h, b"");
        assert_eq!(
            r.status,
            400,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["error"]["code"], "upgrade_not_supported");
        assert_eq!(relay.row_for(&id)["outcome"], "upgrade_refused");
    }
    assert_untouched(&log);
    // An offer of cleartext HTTP/2 (curl --http2) is no tunnel: ignored, served as
    // HTTP/1.1, and nothing of it goes upstream.
    let r = send(
        &relay,
        "POST",
        CHAT,
        &[
            ("upgrade", "h2c"),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ],
        &chat_body(false, false),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = log.lock().unwrap()[0].clone();
    for h in ["upgrade", "http2-settings"] {
        assert!(seen.header(h).is_none(), "{h} went upstream");
    }
    assert!(!seen
        .header("connection")
        .unwrap_or("")
        .to_ascii_lowercase()
        .contains("upgrade"));
}

#[test]
fn bodies_are_read_as_the_provider_reads_them() {
    let (up, log) = recording_upstream();
    let relay = relay(up, ", limits: { tokens_per_minute: 3000 }");
    // The honest body is over the token limit (max_tokens 5000 > 3000).
    let honest = br#"{"model":"gpt-4o-mini","max_tokens":5000,"messages":[]}"#;
    assert_ne!(send(&relay, "POST", CHAT, &[], honest).status, 200);
    // The same with a second max_tokens that a first-key-wins reader would take as 10.
    for (i, body) in [
        &br#"{"model":"gpt-4o-mini","max_tokens":10,"max_tokens":5000,"messages":[]}"#[..],
        br#"{"model":"gpt-4o-mini","max_tokens":5000,"max_tokens":10,"messages":[]}"#,
        br#"{"model":"gpt-4o-mini","max_tokens":"5000","messages":[]}"#,
        br#"{"model":"gpt-4o-mini","stream":true,"stream":false,"messages":[]}"#,
    ]
    .iter()
    .enumerate()
    {
        let id = format!("dup-{i}");
        let r = send(&relay, "POST", CHAT, &[("x-request-id", &id)], body);
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["error"]["code"], "invalid_body");
        assert_eq!(relay.row_for(&id)["outcome"], "invalid_body");
    }
    assert_untouched(&log);

    // `stream_options: null` is no request for usage: the relay asks for it, and counts it.
    let body = br#"{"model":"gpt-4o-mini","stream":true,"stream_options":null,"max_tokens":20,"messages":[]}"#;
    let r = send(&relay, "POST", CHAT, &[("x-request-id", "null-opts")], body);
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        !text.contains("\"usage\""),
        "usage the client did not ask for: {text}"
    );
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.json()["stream_options"]["include_usage"], true);
    let row = relay.row_for("null-opts");
    assert_eq!(
        (row["tokens_in"].as_u64(), row["tokens_out"].as_u64()),
        (Some(7), Some(3))
    );
    assert_eq!(row["usage_unknown"], false);
}

#[test]
fn ids_are_the_relays_own() {
    let (up, log) = recording_upstream();
    let relay = relay(up, "");
    for _ in 0..2 {
        let r = send(
            &relay,
            "POST",
            CHAT,
            &[("x-request-id", "same-id")],
            &chat_body(false, false),
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-request-id"),
            Some("same-id"),
            "the client's id is echoed"
        );
    }
    let r = send(&relay, "POST", CHAT, &[], &chat_body(false, false));
    let own = r.header("x-request-id").unwrap().to_string();
    let seen = log.lock().unwrap().clone();
    let upstream_ids: Vec<&str> = seen
        .iter()
        .map(|s| s.header("x-request-id").unwrap())
        .collect();
    assert_eq!(upstream_ids[2], own);
    for id in &upstream_ids {
        assert_eq!(id.len(), 32);
        assert_ne!(*id, "same-id");
    }
    assert_ne!(upstream_ids[0], upstream_ids[1]);
    // Consecutive ids share no prefix or counter a client could predict from.
    assert_ne!(upstream_ids[1][..16], upstream_ids[2][..16]);
    let rows = relay.rows_at_least(3);
    let mine: Vec<_> = rows
        .iter()
        .filter(|r| r["client_request_id"] == "same-id")
        .collect();
    assert_eq!(mine.len(), 2);
    assert_ne!(mine[0]["request_id"], mine[1]["request_id"]);
    for (r, id) in mine.iter().zip(&upstream_ids) {
        assert_eq!(r["request_id"], *id);
    }
}

#[test]
fn a_chosen_request_id_does_not_share_a_redis_concurrency_slot() {
    let redis = RedisProc::start();
    let mock = MockProc::start(None);
    let relay = RelayProc::start(
        &format!(
            r#"redis: {{ url: "{r}" }}
routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"] }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"], limits: {{ concurrent_requests: 2 }} }}
"#,
            r = redis.url(),
            u = mock.url(),
            h = hash(TENANT_KEY)
        ),
        &[],
    );
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    send(
                        &relay,
                        "POST",
                        CHAT,
                        &[
                            ("x-request-id", "same"),
                            ("x-mock-chunks", "20"),
                            ("x-mock-interval-ms", "100"),
                        ],
                        &chat_body(true, true),
                    )
                    .status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        admitted <= 2,
        "{admitted} admitted under concurrent_requests 2: {statuses:?}"
    );
    assert!(admitted >= 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 6 - admitted);
}

#[test]
fn headers_pass_by_policy_both_ways() {
    let (up, log) = recording_upstream();
    let relay = relay(up, ", limits: { requests_per_minute: 1000 }");
    let tenant_headers = [
        ("openai-organization", "org-victim"),
        ("openai-project", "proj-victim"),
        ("cookie", "tenant=1"),
        ("forwarded", "for=10.0.0.1"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-host", "evil"),
        ("x-real-ip", "10.0.0.1"),
        ("x-http-method-override", "DELETE"),
        ("openai-beta", "assistants=v2"),
    ];
    let r = send(
        &relay,
        "POST",
        CHAT,
        &tenant_headers,
        &chat_body(false, false),
    );
    assert_eq!(r.status, 200);
    let seen = log.lock().unwrap()[0].clone();
    for (name, _) in &tenant_headers[1..8] {
        assert!(seen.header(name).is_none(), "{name} reached the upstream");
    }
    assert_eq!(
        seen.header("openai-organization"),
        Some("org-route"),
        "the route's organisation"
    );
    assert_eq!(seen.header("openai-beta"), Some("assistants=v2"));
    // Back to the client: no cookie, server name or operator account, one rate-limit
    // value per header (the relay's), and the provider's own id kept apart.
    for name in [
        "set-cookie",
        "server",
        "openai-organization",
        "anthropic-organization-id",
    ] {
        assert!(r.header(name).is_none(), "{name} reached the client");
    }
    let limits: Vec<&str> = r
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-ratelimit-limit-requests"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(limits, ["1000"]);
}

#[test]
fn content_length_is_one_number_and_a_compressed_answer_is_flagged() {
    let (up, log) = recording_upstream();
    let relay = relay(up, "");
    for (i, lengths) in [
        "content-length: 2\r\ncontent-length: 2",
        "content-length: 2, 2",
    ]
    .iter()
    .enumerate()
    {
        let id = format!("cl-{i}");
        let mut s = TcpStream::connect(relay.addr).unwrap();
        write!(
            s,
            "POST {CHAT} HTTP/1.1\r\nhost: relay\r\nauthorization: {}\r\nx-request-id: {id}\r\n{lengths}\r\n\r\n{{}}",
            auth()
        )
        .unwrap();
        let r = read_response(&mut s, Instant::now(), Duration::from_secs(10), usize::MAX);
        assert_eq!(
            r.status,
            400,
            "{lengths}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(relay.row_for(&id)["outcome"], "bad_content_length");
    }
    assert_untouched(&log);
    // An upstream that compresses although asked not to: passed on, its usage unreadable.
    let r = send(
        &relay,
        "POST",
        CHAT,
        &[("x-test-gzip", "1"), ("x-request-id", "gz")],
        &chat_body(false, false),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert!(log.lock().unwrap()[0].header("accept-encoding").is_none());
    let row = relay.row_for("gz");
    assert_eq!(row["usage_unknown"], true);
    assert!(row["tokens_in"].is_null());
    relay.metrics_with(r#"stream_relay_usage_unknown_requests_total{route="openai"} 1"#);
}

#[test]
fn the_mock_answers_its_controls_only_on_its_own_paths_and_keeps_no_key() {
    let mock = MockProc::start(Some(PROVIDER_KEY));
    let relay = RelayProc::start(
        &format!(
            r#"routes:
  - {{ name: a, prefix: /a, provider: anthropic, upstreams: ["{u}"], key: "env:K" }}
  - {{ name: o, prefix: /o/v1, provider: openai, upstreams: ["{u}/v1"], key: "env:K" }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
            u = mock.url(),
            h = hash(TENANT_KEY)
        ),
        &[("K", PROVIDER_KEY)],
    );
    assert_eq!(
        send(
            &relay,
            "POST",
            "/o/v1/chat/completions",
            &[],
            &chat_body(false, false)
        )
        .status,
        200
    );
    let before = mock.stats();
    // Through a route: the relay does not serve them, and the mock does not answer its
    // controls below another base path.
    for (method, path) in [
        ("GET", "/a/mock/stats"),
        ("POST", "/a/mock/control"),
        ("GET", "/o/v1/mock/stats"),
    ] {
        let r = send(&relay, method, path, &[], br#"{"status":500}"#);
        assert_eq!(r.status, 404, "{path}");
    }
    assert_eq!(
        request(mock.addr, "GET", "/v1/mock/stats", &[], b"").status,
        404
    );
    assert_eq!(mock.stats()["requests"], before["requests"]);
    // What it keeps: digests, never the key.
    let text = mock.stats().to_string();
    assert!(!text.contains(PROVIDER_KEY), "{text}");
    assert!(
        text.contains(&stream_relay::mock::credential_digest(&format!(
            "Bearer {PROVIDER_KEY}"
        )))
    );
}

/// An ordinary chat request on `s`, answered 200 in whole.
fn chat_on(s: &mut TcpStream) {
    let a = auth();
    s.write_all(&build_request(
        "POST",
        CHAT,
        &[("authorization", &a)],
        &chat_body(false, false),
    ))
    .unwrap();
    let r = read_response(s, Instant::now(), Duration::from_secs(10), usize::MAX);
    assert_eq!(r.status, 200);
    assert!(r.complete);
}

/// A kept-alive connection that has served one ordinary chat request.
fn kept_alive(relay: &RelayProc) -> TcpStream {
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_nodelay(true).unwrap();
    chat_on(&mut s);
    s
}

#[test]
fn every_head_of_a_kept_alive_connection_has_a_deadline() {
    let (up, log) = recording_upstream();
    let relay = RelayProc::start_with_listen(
        &format!(
            r#"routes:
  - {{ name: anthropic, prefix: /anthropic, provider: anthropic, upstreams: ["http://{up}"] }}
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["http://{up}/v1"] }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
            h = hash(TENANT_KEY)
        ),
        "  head_timeout: 2s\n",
    );
    // A second head trickled a byte every 100 ms (it would take 20 s) gets 408 about
    // 2 s after its first byte, in the route's shape, with a row.
    let mut s = kept_alive(&relay);
    // The request line and the id come at once (so the route, and the shape, are
    // known), the rest a byte at a time.
    let head = format!(
        "authorization: {}\r\n{}\r\n\r\n",
        auth(),
        "x-pad: ".to_string() + &"a".repeat(200)
    );
    let mut writer = s.try_clone().unwrap();
    let started = Instant::now();
    writer
        .write_all(
            b"POST /anthropic/v1/messages HTTP/1.1\r\nhost: relay\r\nx-request-id: trickle-2\r\n",
        )
        .unwrap();
    let drip = std::thread::spawn(move || {
        for b in head.as_bytes() {
            if writer.write_all(&[*b]).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    });
    let r = read_response(&mut s, started, Duration::from_secs(15), usize::MAX);
    let took = started.elapsed();
    assert_eq!(r.status, 408, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(
        r.json()["type"],
        "error",
        "Anthropic's shape: the route was known"
    );
    assert!(
        took < Duration::from_secs(12),
        "the answer came after {took:?}"
    );
    assert!(
        !drip.join().unwrap(),
        "the drip finished: no deadline cut it"
    );
    assert_eq!(relay.row_for("trickle-2")["outcome"], "head_timeout");

    // A malformed second head gets the relay's 400 and a row, not a bare answer.
    let mut s = kept_alive(&relay);
    s.write_all(b"POST /openai/v1/chat/completions HTTP/1.1\r\nhost: relay\r\nx-request-id: bad-2\r\nbad header line\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s, Instant::now(), Duration::from_secs(10), usize::MAX);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "bad_request");
    assert_eq!(relay.row_for("bad-2")["outcome"], "bad_request");

    // Waiting between requests is not a slow head: a kept-alive connection idle for
    // longer than head_timeout still serves its next request.
    let mut s = kept_alive(&relay);
    std::thread::sleep(Duration::from_millis(2500));
    chat_on(&mut s);
    assert_eq!(
        log.lock().unwrap().len(),
        4,
        "three first requests and the one after the idle wait"
    );
}

#[test]
fn a_refused_streamed_body_gets_its_answer_and_no_error_log_line() {
    let (up, log) = recording_upstream();
    let relay = relay(up, "");
    // A chunked body (read while it flows, not before) with a second max_tokens.
    let mut s = TcpStream::connect(relay.addr).unwrap();
    let body = br#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[],"max_tokens":99999}"#;
    write!(
        s,
        "POST {CHAT} HTTP/1.1\r\nhost: tenant-controlled.example\r\nauthorization: {}\r\nx-request-id: chunked-dup\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
        auth(),
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    s.write_all(b"\r\n0\r\n\r\n").unwrap();
    let r = read_response(&mut s, Instant::now(), Duration::from_secs(10), usize::MAX);
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "invalid_body");
    assert_eq!(relay.row_for("chunked-dup")["outcome"], "invalid_body");
    // The held body never went upstream.
    assert!(log.lock().unwrap().iter().all(|s| s.body.is_empty()));
    let stderr = relay.stderr();
    assert!(
        !stderr.lines().any(|l| l.contains("ERROR")),
        "an ERROR line for a tenant's bad request:\n{stderr}"
    );
}

#[test]
fn held_bodies_are_read_and_rewritten_as_small_ones_are() {
    let (up, log) = recording_upstream();
    let relay = relay(up, "");
    // Over 60 KiB, so read while it flows and sent upstream chunked.
    let pad = "x".repeat(100 * 1024);
    let stored = format!(
        r#"{{"model":"gpt-4o-mini","input":"{pad}","store":true,"z":1e2,"metadata":{{"b":1,"a":2}}}}"#
    );
    let r = send(
        &relay,
        "POST",
        "/stored/v1/responses",
        &[],
        stored.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = log.lock().unwrap()[0].clone();
    // Only the value of `store` changed: every other byte as the client sent it.
    assert_eq!(
        String::from_utf8(seen.body).unwrap(),
        stored.replace(r#""store":true"#, r#""store":false"#)
    );
    // A duplicate in a held body is refused at its end: the upstream gets no body.
    let dup =
        format!(r#"{{"model":"gpt-4o-mini","input":"{pad}","max_tokens":10,"max_tokens":99999}}"#);
    let r = send(
        &relay,
        "POST",
        CHAT,
        &[("x-request-id", "held-dup")],
        dup.as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "invalid_body");
    assert_eq!(relay.row_for("held-dup")["outcome"], "invalid_body");
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .skip(1)
            .all(|s| s.body.is_empty()),
        "the refused body reached the upstream"
    );
}

#[test]
fn a_route_whose_prefix_names_the_endpoint_sends_that_path() {
    let (up, log) = recording_upstream();
    // As in the benchmark's configuration: prefix and base path both name the endpoint.
    let relay = RelayProc::start(
        &format!(
            r#"routes:
  - {{ name: messages, prefix: /v1/messages, provider: anthropic, upstreams: ["http://{up}/v1/messages"] }}
  - {{ name: models, prefix: /v1/models, provider: openai, upstreams: ["http://{up}/v1/models"] }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
            h = hash(TENANT_KEY)
        ),
        &[],
    );
    assert_eq!(
        send(&relay, "POST", "/v1/messages", &[], &anthropic_body(false)).status,
        200
    );
    assert_eq!(
        send(&relay, "GET", "/v1/models?limit=5", &[], b"").status,
        200
    );
    assert_eq!(paths(&log), ["POST /v1/messages", "GET /v1/models?limit=5"]);
}
