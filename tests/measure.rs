//! What the relay measures for each stream equals what the mock sent: first token
//! time, tokens (from the provider's own counts) and cost, in the access log line and
//! in `/metrics`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

fn config(mock: &MockProc) -> String {
    let u = mock.url();
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"] }}
  - {{ name: anthropic, prefix: /anthropic, provider: anthropic, upstreams: ["{u}"] }}
  - {{ name: audio, prefix: /audio/v1, provider: audio, upstreams: ["{u}/v1"] }}
  - {{ name: plain, prefix: /plain/v1, provider: openai, upstreams: ["{u}/v1"], ensure_usage: false }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
pricing:
  gpt-4o-mini: {{ input: 0.15, cached_input: 0.075, output: 0.60 }}
  mock-claude: {{ input: 3.0, output: 15.0 }}
"#,
        h = hash(TENANT_KEY)
    )
}

/// The access log fields of one request, once `logging()` has written them.
fn access_line(relay: &RelayProc, request_id: &str) -> HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(line) = relay.stderr().lines().find(|l| l.contains(request_id)) {
            return line
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
        assert!(Instant::now() < deadline, "no access line for {request_id}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON of every `data:` line of a stream the client received that parses, in
/// order: what the mock sent, as the client saw it.
fn data_events(body: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

#[test]
fn openai_stream_ttft_tokens_and_cost() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let body = chat_body(true, true);
    let r = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("x-request-id", "measure-openai-1"),
            ("x-mock-first-delay-ms", "300"),
            ("x-mock-chunks", "5"),
            ("x-mock-interval-ms", "30"),
        ],
        &body,
    );
    assert_eq!(r.status, 200);
    // The usage chunk the mock sent, as the client received it.
    let sent = data_events(&r.body)
        .into_iter()
        .find_map(|e| e.get("usage").filter(|u| u.is_object()).cloned())
        .expect("usage chunk");
    let f = access_line(&relay, "measure-openai-1");
    let ttft: f64 = f["ttft_ms"].parse().unwrap();
    let ttfb: f64 = f["ttfb_ms"].parse().unwrap();
    // The mock sends headers and the role chunk after 300 ms, then the first content
    // delta at once: TTFT is at least the delay and not before the first byte.
    assert!(ttft >= 300.0 && ttft >= ttfb, "ttft {ttft} ttfb {ttfb}");
    assert!(ttft < 5000.0, "ttft {ttft}");
    let prompt = sent["prompt_tokens"].as_u64().unwrap();
    assert_eq!(sent["completion_tokens"], 5);
    assert_eq!(f["tokens_in"], prompt.to_string());
    assert_eq!(f["tokens_out"], "5");
    assert_eq!(f["tokens_cached"], "0");
    assert_eq!(f["model"], "gpt-4o-mini");
    assert_eq!(f["finish"], "stop");
    let cost: f64 = f["cost_usd"].parse().unwrap();
    let want = prompt as f64 * 0.15e-6 + 5.0 * 0.60e-6;
    assert!((cost - want).abs() < 1e-9, "cost {cost} want {want}");

    let text = relay.metrics_with(
        r#"stream_relay_tokens_total{direction="output",model="gpt-4o-mini",route="openai"} 5"#,
    );
    assert!(text.contains(&format!(
        r#"stream_relay_tokens_total{{direction="input",model="gpt-4o-mini",route="openai"}} {prompt}"#
    )));
    assert!(
        text.contains(r#"stream_relay_ttft_seconds_count{model="gpt-4o-mini",route="openai"} 1"#)
    );
    // Five content deltas: four gaps between them.
    assert!(
        text.contains(r#"stream_relay_event_gap_seconds_count{route="openai"} 4"#),
        "{text}"
    );
    // Released after the request's other metrics: waited for on its own.
    relay.metrics_with(r#"stream_relay_open_streams{route="openai"} 0"#);
}

#[test]
fn usage_not_asked_for_and_not_ensured_is_unknown_not_zero() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let r = request(
        relay.addr,
        "POST",
        "/plain/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("x-request-id", "measure-no-usage"),
        ],
        &chat_body(true, false),
    );
    assert_eq!(r.status, 200);
    let f = access_line(&relay, "measure-no-usage");
    assert_eq!(
        (f["tokens_in"].as_str(), f["tokens_out"].as_str()),
        ("-1", "-1")
    );
    assert_eq!(f["cost_usd"], "unknown");
    relay.metrics_with(r#"stream_relay_cost_unknown_requests_total{route="plain"} 1"#);
}

#[test]
fn anthropic_stream_json_and_audio() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let body = anthropic_body(true);
    let r = request(
        relay.addr,
        "POST",
        "/anthropic/v1/messages",
        &[
            ("x-api-key", TENANT_KEY),
            ("x-request-id", "measure-anthropic-1"),
            ("x-mock-chunks", "6"),
        ],
        &body,
    );
    assert_eq!(r.status, 200);
    let f = access_line(&relay, "measure-anthropic-1");
    let events = data_events(&r.body);
    let input = events[0]["message"]["usage"]["input_tokens"]
        .as_u64()
        .unwrap();
    let delta = events
        .iter()
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(delta["usage"]["output_tokens"], 6);
    assert_eq!(f["tokens_in"], input.to_string());
    assert_eq!(f["tokens_out"], "6");
    assert_eq!(f["finish"], "end_turn");
    let cost: f64 = f["cost_usd"].parse().unwrap();
    assert!((cost - (input as f64 * 3e-6 + 6.0 * 15e-6)).abs() < 1e-9);

    // Non-streaming JSON: usage from the body, and the relay's overhead header.
    let auth = format!("Bearer {TENANT_KEY}");
    let r = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth), ("x-request-id", "measure-json-1")],
        &chat_body(false, false),
    );
    assert_eq!(r.status, 200);
    let overhead: f64 = r.header("x-relay-overhead-ms").unwrap().parse().unwrap();
    assert!((0.0..1000.0).contains(&overhead), "{overhead}");
    let f = access_line(&relay, "measure-json-1");
    assert_eq!(f["tokens_out"], "8");
    assert_eq!(f["ttft_ms"], "-1.0", "a JSON answer has no first token");

    // Audio: time to first audio, in its own histogram.
    let r = request(
        relay.addr,
        "POST",
        "/audio/v1/audio/speech",
        &[
            ("authorization", &auth),
            ("x-mock-first-delay-ms", "100"),
            ("x-mock-chunks", "3"),
        ],
        br#"{"model":"tts-1","input":"hi","voice":"alloy"}"#,
    );
    assert_eq!(r.status, 200);
    // The bytes are the last of a request's metrics to be counted: a scrape may fall
    // between its time to first audio and its bytes, so the bytes are waited for.
    let text = relay.metrics_with(r#"stream_relay_response_bytes_total{route="audio"} 12288"#);
    assert!(
        text.contains(r#"stream_relay_ttfa_seconds_count{model="other",route="audio"} 1"#),
        "{text}"
    );
}

/// A client streaming without `include_usage` gets exactly the stream it asked for, and
/// the relay still knows the tokens; a client that asked gets its usage chunk.
#[test]
fn usage_is_asked_for_and_hidden_from_clients_that_did_not_ask() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    for (asked, id) in [(false, "ensure-usage-no"), (true, "ensure-usage-yes")] {
        let body = chat_body(true, asked);
        let direct = request(mock.addr, "POST", "/v1/chat/completions", &[], &body);
        let via = request(
            relay.addr,
            "POST",
            "/openai/v1/chat/completions",
            &[("authorization", &auth), ("x-request-id", id)],
            &body,
        );
        assert_eq!(via.status, 200);
        assert!(via.complete);
        assert_eq!(
            String::from_utf8_lossy(&via.body),
            String::from_utf8_lossy(&direct.body),
            "asked={asked}"
        );
        let f = access_line(&relay, id);
        assert_eq!(f["tokens_out"], "8", "asked={asked}");
        assert_ne!(f["tokens_in"], "-1");
        assert_ne!(f["cost_usd"], "unknown");
    }
    // The upstream saw the usage request in the first call.
    let seen = mock.stats();
    assert_eq!(seen["requests"], 4);
}

/// Bodies too large to read before choosing the upstream (over 60 KiB), and bodies sent
/// chunked, are held as they flow and sent chunked, with the same result.
#[test]
fn large_and_chunked_request_bodies_get_usage_too() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let big = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [{"role": "user", "content": "x".repeat(100 * 1024)}],
    })
    .to_string()
    .into_bytes();
    let direct = request(mock.addr, "POST", "/v1/chat/completions", &[], &big);
    let via = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth), ("x-request-id", "big-body-1")],
        &big,
    );
    assert_eq!(via.status, 200);
    assert_eq!(via.body, direct.body);
    let f = access_line(&relay, "big-body-1");
    // The mock counts a quarter of the bytes it received: the body plus the relay's
    // `,"stream_options":{"include_usage":true}`.
    let added = r#","stream_options":{"include_usage":true}"#.len();
    assert_eq!(f["tokens_in"], ((big.len() + added) / 4).to_string());
    assert_eq!(f["tokens_out"], "8");

    // A chunked request body (no content-length).
    let body = chat_body(true, false);
    let mut raw = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: {auth}\r\nx-request-id: chunked-body-1\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for part in body.chunks(20) {
        raw.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        raw.extend_from_slice(part);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
    std::io::Write::write_all(&mut s, &raw).unwrap();
    let via = read_response(&mut s, Instant::now(), Duration::from_secs(30), usize::MAX);
    let direct = request(mock.addr, "POST", "/v1/chat/completions", &[], &body);
    assert_eq!(via.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&via.body),
        String::from_utf8_lossy(&direct.body)
    );
    let f = access_line(&relay, "chunked-body-1");
    assert_eq!(f["tokens_out"], "8");
    assert_ne!(f["tokens_in"], "-1");
}

/// What an OpenAI-compatible server streams, with and without `include_usage`, in each
/// of the shapes servers use: OpenAI's own chunk with `"choices":[]` and `"usage":null`
/// on the others; a last chunk whose choice carries nothing; the usage on the finish
/// chunk (with extra fields in it); a running count on every chunk.
fn server_stream(shape: &str, with_usage: bool) -> Vec<String> {
    let chunk = |delta: &str, finish: &str, usage: &str| {
        format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]{usage}}}\n\n")
    };
    let usage = |n: u32| {
        format!(",\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{n},\"total_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":0}},\"queue_time\":0.01}}", 5 + n)
    };
    let none = String::new();
    let null = if with_usage && shape == "openai" {
        ",\"usage\":null".to_string()
    } else {
        none.clone()
    };
    let running = |n| {
        if with_usage && shape == "running" {
            usage(n)
        } else {
            none.clone()
        }
    };
    let mut events = vec![
        chunk(
            r#"{"role":"assistant","content":""}"#,
            "null",
            &format!("{null}{}", running(0)),
        ),
        chunk(
            r#"{"content":"Hel"}"#,
            "null",
            &format!("{null}{}", running(1)),
        ),
        chunk(
            r#"{"content":"lo"}"#,
            "null",
            &format!("{null}{}", running(2)),
        ),
    ];
    let on_finish = if with_usage && shape == "finish" {
        usage(2)
    } else {
        running(2)
    };
    events.push(chunk("{}", r#""stop""#, &format!("{null}{on_finish}")));
    if with_usage {
        match shape {
            "openai" => events.push(format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[]{}}}\n\n",
                usage(2)
            )),
            "empty_choice" => events.push(chunk(r#"{"content":""}"#, "null", &usage(2))),
            _ => {}
        }
    }
    events.push("data: [DONE]\n\n".into());
    events
}

/// A fake OpenAI-compatible server: the shape named by `x-test-shape`, with usage when
/// the body asks for it, each event in a chunk of its own.
fn shape_server() -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                while let Some((head, len)) = read_upstream_request(&mut s, &mut buf) {
                    let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
                    let shape = text
                        .lines()
                        .find_map(|l| l.strip_prefix("x-test-shape:"))
                        .unwrap_or("openai")
                        .trim()
                        .to_string();
                    let body: serde_json::Value =
                        serde_json::from_slice(&buf[head..head + len]).unwrap();
                    buf.drain(..head + len);
                    let asked = body["stream_options"]["include_usage"] == true;
                    let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    for e in server_stream(&shape, asked) {
                        out.extend_from_slice(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes());
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Whatever shape the server puts its usage in, a client that did not ask for usage
/// gets byte for byte the stream the server sends without the flag, and the relay still
/// counts the tokens.
#[test]
fn usage_is_removed_exactly_in_every_server_shape() {
    let up = shape_server();
    let relay = relay_to(up);
    let auth = format!("Bearer {TENANT_KEY}");
    for shape in ["openai", "empty_choice", "finish", "running"] {
        let id = format!("shape-{shape}");
        let resp = request(
            relay.addr,
            "POST",
            "/openai/v1/chat/completions",
            &[
                ("authorization", &auth),
                ("x-request-id", &id),
                ("x-test-shape", shape),
            ],
            &chat_body(true, false),
        );
        assert_eq!(resp.status, 200, "{shape}");
        assert_eq!(
            String::from_utf8_lossy(&resp.body),
            server_stream(shape, false).concat(),
            "{shape}"
        );
        let f = access_line(&relay, &id);
        assert_eq!(
            (f["tokens_in"].as_str(), f["tokens_out"].as_str()),
            ("5", "2"),
            "{shape}"
        );
        // A client that asked gets the server's own stream with usage, unchanged.
        let asked = request(
            relay.addr,
            "POST",
            "/openai/v1/chat/completions",
            &[("authorization", &auth), ("x-test-shape", shape)],
            &chat_body(true, true),
        );
        assert_eq!(
            String::from_utf8_lossy(&asked.body),
            server_stream(shape, true).concat(),
            "{shape}"
        );
    }
}

/// A Responses API stream through the relay: the bytes as the mock sent them (named
/// events, sequence numbers, padding), TTFT, tokens and cost from `response.completed`;
/// cut before its terminal event, its usage is unknown, never zero.
#[test]
fn responses_streams_are_measured_and_a_cut_one_is_unknown_not_zero() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let body = br#"{"model":"gpt-4o-mini","input":"Say hello","stream":true}"#;
    let direct = request(mock.addr, "POST", "/v1/responses", &[], body);
    let via = request(
        relay.addr,
        "POST",
        "/openai/v1/responses",
        &[
            ("authorization", &auth),
            ("x-request-id", "responses-whole"),
        ],
        body,
    );
    assert_eq!(via.status, 200);
    assert!(via.complete);
    assert_eq!(
        String::from_utf8_lossy(&via.body),
        String::from_utf8_lossy(&direct.body)
    );
    assert!(String::from_utf8_lossy(&via.body).contains("event: response.completed"));
    let f = access_line(&relay, "responses-whole");
    assert_eq!(f["tokens_out"], "8");
    assert_ne!(f["tokens_in"], "-1");
    assert_ne!(f["cost_usd"], "unknown");
    assert_ne!(f["ttft_ms"], "-1.0");
    assert_eq!(f["finish"], "completed");

    let cut = request(
        relay.addr,
        "POST",
        "/openai/v1/responses",
        &[
            ("authorization", &auth),
            ("x-request-id", "responses-cut"),
            ("x-mock-cut-after", "3"),
        ],
        body,
    );
    assert!(!cut.complete, "a cut stream must not look complete");
    let f = access_line(&relay, "responses-cut");
    assert_eq!(
        (f["tokens_in"].as_str(), f["tokens_out"].as_str()),
        ("-1", "-1")
    );
    assert_eq!(f["cost_usd"], "unknown");
    assert_ne!(f["ttft_ms"], "-1.0");
}
