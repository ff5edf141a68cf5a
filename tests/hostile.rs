//! Hostile and broken input gets a clear 4xx in the provider's shape, costs nothing
//! upstream, is recorded, and the relay keeps serving everyone else meanwhile.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const CHAT: &str = "/openai/v1/chat/completions";

fn config(mock: &MockProc) -> String {
    let u = mock.url();
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"], max_body_bytes: 200000 }}
  - {{ name: anthropic, prefix: /anthropic/v1, provider: anthropic, upstreams: ["{u}/v1"], max_body_bytes: 1000 }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
        h = hash(TENANT_KEY)
    )
}

/// Sends raw bytes, then reads the answer until the relay closes or 15 s pass.
fn raw(relay: &RelayProc, parts: &[&[u8]]) -> (u16, String) {
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    for p in parts {
        if s.write_all(p).is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                // One answer is enough: stop at the end of a content-length body.
                let text = String::from_utf8_lossy(&out);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head.lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    });
                    if len.is_some_and(|l| body.len() >= l) {
                        break;
                    }
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn head(method: &str, path: &str, id: &str, extra: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {TENANT_KEY}\r\nx-request-id: {id}\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

/// An ordinary non-streaming chat request of the tenant.
fn ordinary_chat(relay: &RelayProc) -> Response {
    let auth = format!("Bearer {TENANT_KEY}");
    request(
        relay.addr,
        "POST",
        CHAT,
        &[("authorization", &auth)],
        &chat_body(false, false),
    )
}

/// A chunked JSON POST of `n` chunks of 10,000 `byte`s.
fn chunked_json(path: &str, id: &str, n: usize, byte: u8) -> Vec<Vec<u8>> {
    let mut parts = vec![head(
        "POST",
        path,
        id,
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
    )];
    parts.extend((0..n).map(|_| chunk(&[byte; 10_000])));
    parts.push(b"0\r\n\r\n".to_vec());
    parts
}

#[test]
fn each_hostile_input_gets_its_answer_while_others_are_served() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start_with_listen(
        &config(&mock),
        "  body_read_timeout: 1s\n  client_read_timeout: 2s\n  max_header_bytes: 8192\n",
    );

    // Ordinary traffic all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = {
        let (stop, ok, bad, addr) = (stop.clone(), ok.clone(), bad.clone(), relay.addr);
        std::thread::spawn(move || {
            let auth = format!("Bearer {TENANT_KEY}");
            while !stop.load(Ordering::Relaxed) {
                let r = request(
                    addr,
                    "POST",
                    CHAT,
                    &[("authorization", &auth)],
                    &chat_body(true, false),
                );
                if r.status == 200 && r.complete {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let upstream_before = mock.stats()["requests"].as_u64().unwrap();

    let json_ct = "Content-Type: application/json\r\n";
    let cases: Vec<(&str, Vec<Vec<u8>>, u16, &str)> = vec![
        (
            "big-length",
            vec![
                head(
                    "POST",
                    CHAT,
                    "big-length",
                    &format!("{json_ct}Content-Length: 1000000000\r\n"),
                ),
                b"{".to_vec(),
            ],
            413,
            "body_too_large",
        ),
        (
            "big-chunked",
            chunked_json("/openai/v1/embeddings", "big-chunked", 30, b' '),
            413,
            "body_too_large",
        ),
        (
            "not-json",
            vec![
                head(
                    "POST",
                    CHAT,
                    "not-json",
                    &format!("{json_ct}Content-Length: 9\r\n"),
                ),
                b"not json!".to_vec(),
            ],
            400,
            "invalid_json",
        ),
        (
            "bad-utf8",
            vec![
                head("POST", CHAT, "bad-utf8", "Content-Length: 14\r\n"),
                b"{\"model\":\"\xff\xfe\"}".to_vec(),
            ],
            400,
            "invalid_json",
        ),
        (
            "big-not-json",
            // Over the early-read size: held (chat completions) and checked at its end.
            chunked_json(CHAT, "big-not-json", 8, b'x'),
            400,
            "invalid_json",
        ),
        (
            "brew",
            vec![
                head("BREW", CHAT, "brew", "Content-Length: 2\r\n"),
                b"{}".to_vec(),
            ],
            405,
            "method_not_allowed",
        ),
        (
            "big-head",
            vec![
                head(
                    "POST",
                    CHAT,
                    "big-head",
                    &format!("X-Big: {}\r\nContent-Length: 2\r\n", "a".repeat(20_000)),
                ),
                b"{}".to_vec(),
            ],
            431,
            "headers_too_large",
        ),
        (
            "bad-head",
            // A space in a header name: Pingora's parser refuses it (Pingora's own
            // answer would be a plain 400 without a body).
            vec![
                head(
                    "POST",
                    CHAT,
                    "bad-head",
                    &format!("{json_ct}Bad Header: x\r\nContent-Length: 2\r\n"),
                ),
                b"{}".to_vec(),
            ],
            400,
            "bad_request",
        ),
        (
            "slow-body",
            // Announces 100 bytes, sends 10, then nothing: 408 after body_read_timeout.
            vec![
                head(
                    "POST",
                    CHAT,
                    "slow-body",
                    &format!("{json_ct}Content-Length: 100\r\n"),
                ),
                b"{\"model\":".to_vec(),
            ],
            408,
            "body_timeout",
        ),
    ];
    assert_eq!(b"{\"model\":\"\xff\xfe\"}".len(), 14);
    for (id, parts, status, outcome) in &cases {
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let (got, body) = raw(&relay, &refs);
        assert_eq!(got, *status, "{id}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{id}: {body}"));
        assert_eq!(v["error"]["type"], "invalid_request_error", "{id}: {body}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let row = loop {
            if let Some(r) = relay
                .rows()
                .into_iter()
                .find(|r| r["client_request_id"] == *id)
            {
                break r;
            }
            assert!(Instant::now() < deadline, "{id}: no row");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(row["outcome"], *outcome, "{id}");
    }
    // Anthropic's shape for a refused body.
    let (got, body) = raw(
        &relay,
        &[
            &head(
                "POST",
                "/anthropic/v1/messages",
                "anthropic-big",
                "anthropic-version: 2023-06-01\r\nContent-Length: 5000\r\n",
            ),
            &[b'{'; 5000],
        ],
    );
    assert_eq!(got, 413);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "request_too_large");

    // None of it reached the upstream, except the chunked bodies cut on the way (an
    // incomplete request the upstream cannot act on; the mock counts it).
    let upstream_after = mock.stats()["requests"].as_u64().unwrap();
    let ordinary = ok.load(Ordering::Relaxed) as u64 + bad.load(Ordering::Relaxed) as u64;
    assert!(
        upstream_after - upstream_before <= ordinary + 1,
        "{} upstream requests for {ordinary} ordinary ones",
        upstream_after - upstream_before
    );

    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "ordinary requests failed meanwhile"
    );
    assert!(ok.load(Ordering::Relaxed) > 10);
}

/// A provider that answers by the `x-fake` header: an event stream of garbage, a JSON
/// body cut short, or HTML where JSON was expected.
fn broken_upstream() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let Some((head_end, _)) = read_upstream_request(&mut s, &mut buf) else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let out: Vec<u8> = if head.contains("x-fake: garbage") {
                    let body: &[u8] = b"data: {not json\n\nevent: x\ndata: \xff\xfe\n\n: note\ndata: {\"usage\": 5}\n\nno newline at the end";
                    let mut o = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    o.extend_from_slice(&chunk(body));
                    o.extend_from_slice(b"0\r\n\r\n");
                    o
                } else if head.contains("x-fake: cut") {
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":\"x\",\"choices\":[{\"message\":".to_vec()
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 17\r\n\r\n<html>oops</html>".to_vec()
                };
                let _ = s.write_all(&out);
                // Closing ends the cut body early.
            });
        }
    });
    addr
}

#[test]
fn broken_upstream_answers_pass_through_as_they_came_and_are_recorded() {
    let fake = broken_upstream();
    let relay = relay_to(fake);
    let auth = format!("Bearer {TENANT_KEY}");
    let send = |id: &str, fake: &str, stream: bool| {
        request(
            relay.addr,
            "POST",
            CHAT,
            &[
                ("authorization", &auth),
                ("x-request-id", id),
                ("x-fake", fake),
            ],
            &chat_body(stream, false),
        )
    };
    let r = send("garbage", "garbage", true);
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(
        r.body,
        b"data: {not json\n\nevent: x\ndata: \xff\xfe\n\n: note\ndata: {\"usage\": 5}\n\nno newline at the end"
    );
    let r = send("cut", "cut", false);
    assert_eq!(r.status, 200);
    assert!(!r.complete, "the cut shows to the client");
    assert!(r.body.starts_with(b"{\"id\":\"x\""));
    let r = send("html", "html", false);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"<html>oops</html>");
    let rows = relay.rows_at_least(3);
    let row = |id: &str| {
        rows.iter()
            .find(|r| r["client_request_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(row("garbage")["outcome"], "ok");
    assert_eq!(
        row("garbage")["tokens_out"],
        serde_json::Value::Null,
        "no usage made up"
    );
    assert_eq!(row("cut")["outcome"], "upstream_unavailable");
    assert_eq!(row("html")["outcome"], "ok");
    // And the relay keeps serving.
    let r = send("after", "html", false);
    assert_eq!(r.status, 200);
}

#[test]
fn a_flood_of_idle_connections_is_capped_and_the_relay_recovers() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start_with_listen(&config(&mock), "  max_connections_per_address: 20\n");
    // Let the readiness probes' connections close before the flood.
    std::thread::sleep(Duration::from_millis(1200));
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(relay.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let open = idle
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut b = [0u8; 1];
            // Closed by the relay: reads 0 bytes (or a reset); open: times out.
            matches!((&**s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
        })
        .count();
    assert_eq!(open, 20, "idle connections kept");
    relay.metrics_with("stream_relay_connections_refused_total{cap=\"per_address\"} 20");
    // While the cap is full, a new client connection is closed unanswered.
    let (status, _) = raw(
        &relay,
        &[
            &head("POST", CHAT, "capped", "Content-Length: 2\r\n"),
            b"{}",
        ],
    );
    assert_eq!(status, 0);
    // The idle ones go; within a reading the relay serves again.
    drop(idle);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(ordinary_chat(&relay).status, 200);
}

/// Under a file limit of 256 the default cap of 50000 client connections could not be
/// held (past the limit `accept` fails for everyone): the relay says so and caps at what
/// fits, (256 - 64) / 2 = 96, closing connections beyond that at accept.
#[test]
fn max_connections_is_lowered_to_what_the_file_limit_holds() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start_with_file_limit(&config(&mock), 256);
    let log = relay.stderr();
    assert!(
        log.contains("listen.max_connections 50000 needs up to 100064 open files")
            && log.contains(
                "the file limit (RLIMIT_NOFILE) is 256: client connections are capped at 96"
            ),
        "{log}"
    );
    assert!(
        log.contains("client connections capped: 96 in all"),
        "{log}"
    );
    // Wait for a reading without the readiness probes' connections.
    std::thread::sleep(Duration::from_millis(1200));
    let idle: Vec<TcpStream> = (0..110)
        .map(|_| TcpStream::connect(relay.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Without waiting on each (110 reads of 100 ms would outlast the head timeout, which
    // closes idle connections too): open ones have nothing to read yet.
    let open = idle
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            matches!((&**s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    // 96 exactly unless a reading of the kernel's table fell amid the burst and saw
    // queued connections before they were accepted (then a few fewer): never more.
    assert!((86..=96).contains(&open), "{open} idle connections kept");
    let text = relay.metrics_with("stream_relay_connections_refused_total{cap=\"total\"}");
    let refused: u64 = text
        .lines()
        .find(|l| l.starts_with("stream_relay_connections_refused_total{cap=\"total\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(refused as usize, 110 - open, "{}", relay.stderr());
    drop(idle);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(ordinary_chat(&relay).status, 200);
}

/// A request head that trickles in gets 408 in its route's shape once `head_timeout` has
/// passed since accept (Pingora alone times out each read, so a byte every 100 ms would
/// hold the connection for good); a connection that sends nothing is closed quietly.
#[test]
fn a_trickling_request_head_gets_408_at_the_head_deadline() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start_with_listen(&config(&mock), "  head_timeout: 1s\n");
    let mut idle = TcpStream::connect(relay.addr).unwrap();
    // Blank lines first (the parser skips them before a request line): not a head.
    let mut blank = TcpStream::connect(relay.addr).unwrap();
    blank.write_all(b"\r\n\r\n\r\nPO").unwrap();
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.set_nodelay(true).unwrap();
    // The request line and the id at once, the rest a byte at a time.
    let first = head("POST", "/anthropic/v1/messages", "trickle", "");
    let first = &first[..first.len() - 2];
    s.write_all(first).unwrap();
    let rest = b"anthropic-version: 2023-06-01\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}".to_vec();
    let mut writer = s.try_clone().unwrap();
    let dripping = std::thread::spawn(move || {
        for b in rest {
            if writer.write_all(&[b]).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    });
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(
        !dripping.join().unwrap(),
        "the whole head was sent before the answer: {text}"
    );
    let body = text.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["type"], "error", "{body}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        text.to_ascii_lowercase().contains("x-request-id: trickle"),
        "{text}"
    );

    // The idle connection was closed without an answer.
    idle.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut b = [0u8; 16];
    assert!(
        matches!(idle.read(&mut b), Ok(0)),
        "idle connection still open"
    );

    blank
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = blank.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("\"request_timeout\""), "OpenAI shape: {text}");

    let rows = relay.rows_at_least(2);
    assert_eq!(rows.len(), 2, "none for the idle connection: {rows:?}");
    for row in &rows {
        assert_eq!(row["outcome"], "head_timeout", "{row}");
        assert_eq!(row["status"], 408, "{row}");
        assert!(row["client_addr"].is_string(), "{row}");
    }
    let trickle = rows
        .iter()
        .find(|r| r["client_request_id"] == "trickle")
        .unwrap();
    assert_eq!(trickle["route"], "anthropic");
    relay.metrics_with("stream_relay_connections_idle_closed_total 1\n");

    // Everyone else is served meanwhile and after.
    assert_eq!(ordinary_chat(&relay).status, 200);
}

/// A transcription upload naming two models could be priced as one while the provider
/// runs the other: it is refused before the provider sees it, as a JSON body with a
/// field twice is.
#[test]
fn an_upload_with_two_models_is_refused_before_the_provider() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let mut body = Vec::new();
    for model in ["whisper-1", "gpt-4o-transcribe"] {
        body.extend_from_slice(
            format!("--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF0000\r\n--b--\r\n");
    let r = request(
        relay.addr,
        "POST",
        "/openai/v1/audio/transcriptions",
        &[
            ("authorization", &format!("Bearer {TENANT_KEY}")),
            ("content-type", "multipart/form-data; boundary=b"),
        ],
        &body,
    );
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("`model` appears more than once"));
    assert_eq!(mock.stats()["requests"], 0);
}
