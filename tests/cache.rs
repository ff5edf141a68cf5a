//! The response cache through the relay, against the mock: repeats reach the mock once
//! and come back byte for byte (a stream still event by event); tenants do not share
//! entries unless a route says so; what changes an answer misses; errors, cut streams and
//! `no-store` are never stored; the skip and refresh headers; Redis stopped serves
//! misses; TTL and size caps; identical requests in flight wait for the first.

use std::time::{Duration, Instant};

use common::*;

const CHAT: &str = "/openai/v1/chat/completions";

fn body(stream: bool, temperature: f64) -> Vec<u8> {
    let mut v = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello"}],
        "temperature": temperature,
        "stream": stream,
    });
    if stream {
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v.to_string().into_bytes()
}

fn config(mock: &MockProc, cache: &str, extra: &str) -> String {
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"],
      cache: {cache} }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
tenants:
  - {{ id: a, key_sha256: ["{ha}"] }}
  - {{ id: b, key_sha256: ["{hb}"] }}
  - {{ id: c, key_sha256: ["{hc}"] }}
{extra}
"#,
        u = mock.url(),
        ha = hash("sk-a"),
        hb = hash("sk-b"),
        hc = hash("sk-c"),
    )
}

fn send(relay: &RelayProc, key: &str, id: &str, body: &[u8], extra: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {key}");
    let mut h = vec![("authorization", auth.as_str()), ("x-request-id", id)];
    h.extend_from_slice(extra);
    request(relay.addr, "POST", CHAT, &h, body)
}

/// The chunks of a chunked answer as they were framed on the wire.
fn raw_chunks(relay: &RelayProc, key: &str, body: &[u8], extra: &[(&str, &str)]) -> Vec<String> {
    use std::io::{Read, Write};
    let auth = format!("Bearer {key}");
    let mut h = vec![("authorization", auth.as_str()), ("connection", "close")];
    h.extend_from_slice(extra);
    let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&build_request("POST", CHAT, &h, body)).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, mut rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase().contains("x-relay-cache: hit"),
        "{head}"
    );
    let mut chunks = Vec::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        chunks.push(after[..n].to_string());
        rest = &after[n + 2..];
    }
    chunks
}

fn requests(mock: &MockProc) -> u64 {
    mock.stats()["requests"].as_u64().unwrap()
}

/// Issue 15: a repeated JSON and a repeated stream request reach the mock once; the
/// second answers are byte-identical to the first, the stream's events still arrive
/// apart, and the rows say what the cache did and saved.
#[test]
fn a_repeat_is_answered_from_the_cache_byte_for_byte() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock, "{ ttl: 1h }", ""), &[]);
    let first = send(&relay, "sk-a", "json-1", &body(false, 0.0), &[]);
    assert_eq!(first.header("x-relay-cache"), Some("miss"));
    let second = send(&relay, "sk-a", "json-2", &body(false, 0.0), &[]);
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-relay-cache"), Some("hit"));
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("x-request-id"), Some("json-2"));
    assert_eq!(requests(&mock), 1);

    // Paced events: the replay must stream them too, not send one blob.
    let paced = [("x-mock-chunks", "6"), ("x-mock-interval-ms", "30")];
    let s1 = send(&relay, "sk-a", "sse-1", &body(true, 0.0), &paced);
    let s2 = send(&relay, "sk-a", "sse-2", &body(true, 0.0), &paced);
    assert_eq!(requests(&mock), 2);
    assert_eq!(s2.header("x-relay-cache"), Some("hit"));
    assert_eq!(s2.header("content-type"), s1.header("content-type"));
    assert_eq!(s2.body, s1.body);
    let text = String::from_utf8_lossy(&s2.body);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // Each event is its own HTTP chunk (however the reads coalesce them).
    let events = text.matches("\n\n").count();
    let chunks = raw_chunks(&relay, "sk-a", &body(true, 0.0), &paced);
    assert_eq!(chunks.len(), events, "{chunks:?}");
    assert!(chunks.iter().all(|c| c.ends_with("\n\n")));

    let hit = relay.row_for("json-2");
    let stored = relay.row_for("json-1");
    assert_eq!(stored["cache"], "store");
    assert_eq!(hit["cache"], "hit");
    assert_eq!(hit["outcome"], "ok");
    assert_eq!(hit["tokens_in"], stored["tokens_in"]);
    assert_eq!(hit["tokens_out"], stored["tokens_out"]);
    assert_eq!(hit["cost_usd"], 0.0);
    assert_eq!(hit["cache_saved_usd"], stored["cost_usd"]);
    assert_eq!(hit["upstream_status"], serde_json::Value::Null);
    let text =
        relay.metrics_with("stream_relay_cache_requests_total{result=\"hit\",route=\"openai\"} 3");
    assert!(text.contains("stream_relay_cache_saved_usd_total{route=\"openai\"}"));
    assert!(text.contains("stream_relay_cache_stores_total{route=\"openai\"} 2"));
}

/// Two tenants never share an entry, unless the route shares it with a group they are
/// both in.
#[test]
fn tenants_share_entries_only_through_a_group() {
    let mock = MockProc::start(None);
    let groups = "groups:\n  - { id: team, members: [a, b], budget: { usd: 1000, per: day } }";
    let relay = RelayProc::start(&config(&mock, "{ shared_by: team }", groups), &[]);
    send(&relay, "sk-a", "a-1", &body(false, 0.0), &[]);
    let b = send(&relay, "sk-b", "b-1", &body(false, 0.0), &[]);
    assert_eq!(b.header("x-relay-cache"), Some("hit"));
    let c = send(&relay, "sk-c", "c-1", &body(false, 0.0), &[]);
    assert_eq!(c.header("x-relay-cache"), Some("miss"));
    assert_eq!(requests(&mock), 2);

    let mock2 = MockProc::start(None);
    let own = RelayProc::start(&config(&mock2, "{ ttl: 10m }", ""), &[]);
    send(&own, "sk-a", "a-1", &body(false, 0.0), &[]);
    let b = send(&own, "sk-b", "b-1", &body(false, 0.0), &[]);
    assert_eq!(b.header("x-relay-cache"), Some("miss"));
    assert_eq!(requests(&mock2), 2);
}

/// What changes the answer changes the key; a request that is not deterministic is not
/// cached unless the route says `when: always`.
#[test]
fn a_changed_temperature_or_tool_list_misses() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock, "{ when: always }", ""), &[]);
    send(&relay, "sk-a", "t0", &body(false, 0.0), &[]);
    let warm = send(&relay, "sk-a", "t7", &body(false, 0.7), &[]);
    assert_eq!(warm.header("x-relay-cache"), Some("miss"));
    let mut tools: serde_json::Value = serde_json::from_slice(&body(false, 0.0)).unwrap();
    tools["tools"] =
        serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let with_tools = send(&relay, "sk-a", "tools", tools.to_string().as_bytes(), &[]);
    assert_eq!(with_tools.header("x-relay-cache"), Some("miss"));
    assert_eq!(requests(&mock), 3);
    // A stream that asks for its usage chunk and one that does not get different bytes:
    // separate entries.
    send(&relay, "sk-a", "sse-usage", &body(true, 0.0), &[]);
    let mut plain: serde_json::Value = serde_json::from_slice(&body(true, 0.0)).unwrap();
    plain.as_object_mut().unwrap().remove("stream_options");
    let no_usage = send(
        &relay,
        "sk-a",
        "sse-plain",
        plain.to_string().as_bytes(),
        &[],
    );
    assert_eq!(no_usage.header("x-relay-cache"), Some("miss"));
    let again = send(
        &relay,
        "sk-a",
        "sse-plain-2",
        plain.to_string().as_bytes(),
        &[],
    );
    assert_eq!(again.header("x-relay-cache"), Some("hit"));
    assert_eq!(again.body, no_usage.body);
    assert!(!String::from_utf8_lossy(&again.body).contains("\"usage\":{"));
    // Whitespace, key order and `user` do not change the key.
    let mut same: serde_json::Value = serde_json::from_slice(&body(false, 0.0)).unwrap();
    same["user"] = "someone".into();
    let again = send(
        &relay,
        "sk-a",
        "same",
        serde_json::to_string_pretty(&same).unwrap().as_bytes(),
        &[],
    );
    assert_eq!(again.header("x-relay-cache"), Some("hit"));

    let mock2 = MockProc::start(None);
    let deterministic = RelayProc::start(&config(&mock2, "{ ttl: 1h }", ""), &[]);
    for id in ["w1", "w2"] {
        let r = send(&deterministic, "sk-a", id, &body(false, 0.7), &[]);
        assert_eq!(r.header("x-relay-cache"), Some("bypass"));
    }
    assert_eq!(requests(&mock2), 2);
}

/// Errors, cut streams and `no-store` requests are never stored; `x-relay-cache: skip`
/// neither reads nor stores, `refresh` stores without reading.
#[test]
fn only_complete_answers_are_stored_and_the_client_steers_the_rest() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock, "{ ttl: 1h }", ""), &[]);
    let error = [("x-mock-status", "500")];
    assert_eq!(
        send(&relay, "sk-a", "e1", &body(false, 0.0), &error).status,
        500
    );
    assert_eq!(
        send(&relay, "sk-a", "e2", &body(false, 0.0), &error).status,
        500
    );
    let cut = [("x-mock-chunks", "20"), ("x-mock-cut-after", "3")];
    send(&relay, "sk-a", "cut-1", &body(true, 0.0), &cut);
    let again = send(&relay, "sk-a", "cut-2", &body(true, 0.0), &cut);
    assert_ne!(again.header("x-relay-cache"), Some("hit"));
    assert_eq!(requests(&mock), 4);

    let no_store = [("cache-control", "no-store")];
    send(&relay, "sk-b", "ns-1", &body(false, 0.0), &no_store);
    let after = send(&relay, "sk-b", "ns-2", &body(false, 0.0), &[]);
    assert_eq!(
        after.header("x-relay-cache"),
        Some("miss"),
        "no-store was stored"
    );
    let skip = send(
        &relay,
        "sk-b",
        "skip",
        &body(false, 0.0),
        &[("x-relay-cache", "skip")],
    );
    assert_eq!(skip.header("x-relay-cache"), Some("bypass"));
    let refresh = send(
        &relay,
        "sk-b",
        "refresh",
        &body(false, 0.0),
        &[("x-relay-cache", "refresh")],
    );
    assert_eq!(refresh.header("x-relay-cache"), Some("refresh"));
    // The relay's own cache control never reaches the provider.
    let upstream = mock.stats()["last_headers"].clone();
    assert!(upstream.get("x-relay-cache").is_none(), "{upstream}");
    assert!(upstream.get("x-request-id").is_some(), "{upstream}");
    assert_eq!(relay.row_for("refresh")["cache"], "store");
    let hit = send(&relay, "sk-b", "hit", &body(false, 0.0), &[]);
    assert_eq!(hit.header("x-relay-cache"), Some("hit"));
    // The refresh's answer is the one served now.
    assert_eq!(hit.body, refresh.body);
    assert_eq!(requests(&mock), 8);
    assert_eq!(relay.row_for("e2")["cache"], "miss");
}

/// TTL and the size caps: an entry past its TTL misses; an answer over
/// `max_entry_bytes` is not stored; past `cache.memory_bytes` the least recently used
/// entries go.
#[test]
fn ttl_and_size_caps_evict() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock, "{ ttl: 1s }", ""), &[]);
    send(&relay, "sk-a", "t1", &body(false, 0.0), &[]);
    assert_eq!(
        send(&relay, "sk-a", "t2", &body(false, 0.0), &[]).header("x-relay-cache"),
        Some("hit")
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        send(&relay, "sk-a", "t3", &body(false, 0.0), &[]).header("x-relay-cache"),
        Some("miss")
    );

    let mock2 = MockProc::start(None);
    let small = RelayProc::start(&config(&mock2, "{ max_entry_bytes: 100 }", ""), &[]);
    send(&small, "sk-a", "s1", &body(false, 0.0), &[]);
    let s2 = send(&small, "sk-a", "s2", &body(false, 0.0), &[]);
    assert_eq!(s2.header("x-relay-cache"), Some("miss"));
    assert_eq!(small.row_for("s2")["cache"], "miss");

    let mock3 = MockProc::start(None);
    let lru = RelayProc::start(
        &config(&mock3, "{ ttl: 1h }", "cache: { memory_bytes: 1500 }"),
        &[],
    );
    for t in 0..6 {
        let temperature = 0.0;
        let mut v: serde_json::Value = serde_json::from_slice(&body(false, temperature)).unwrap();
        v["seed"] = t.into();
        send(
            &lru,
            "sk-a",
            &format!("l{t}"),
            v.to_string().as_bytes(),
            &[],
        );
    }
    let text = lru.metrics_with("stream_relay_cache_evictions_total");
    let evicted: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("stream_relay_cache_evictions_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(evicted > 0, "{text}");
    let bytes: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("stream_relay_cache_bytes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(bytes <= 1500 && bytes > 0, "{bytes}");
}

/// Identical requests that arrive while the first runs wait for its entry: the mock
/// sees one.
#[test]
fn identical_requests_in_flight_wait_for_the_first() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock, "{ wait: 5s }", ""), &[]);
    let addr = relay.addr;
    let slow = [("x-mock-chunks", "10"), ("x-mock-interval-ms", "50")];
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 100 }));
                let auth = "Bearer sk-a";
                let id = format!("w{i}");
                let mut h = vec![("authorization", auth), ("x-request-id", id.as_str())];
                h.extend_from_slice(&slow);
                let r = request(addr, "POST", CHAT, &h, &body(true, 0.0));
                (r.header("x-relay-cache").map(str::to_string), r.body)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        requests(&mock),
        1,
        "{:?}",
        results.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    let hits = results
        .iter()
        .filter(|r| r.0.as_deref() == Some("hit"))
        .count();
    assert_eq!(hits, 3);
    assert!(results.iter().all(|r| r.1 == results[0].1));
}

/// Entries in Redis: shared by relays; with Redis stopped, requests are served as
/// misses and counted, never refused.
#[test]
fn entries_in_redis_are_shared_and_redis_down_is_a_miss() {
    let redis = RedisProc::start();
    let mock = MockProc::start(None);
    let extra = format!(
        "redis:\n  url: \"{}\"\n  timeout: 200ms\ncache: {{ in_redis: true }}",
        redis.url()
    );
    let conf = config(&mock, "{ ttl: 1h }", &extra);
    let one = RelayProc::start(&conf, &[]);
    let two = RelayProc::start(&conf, &[]);
    let first = send(&one, "sk-a", "r1", &body(true, 0.0), &[]);
    let other = send(&two, "sk-a", "r2", &body(true, 0.0), &[]);
    assert_eq!(other.header("x-relay-cache"), Some("hit"));
    assert_eq!(other.body, first.body);
    assert_eq!(requests(&mock), 1);
    drop(redis);
    let down = send(&one, "sk-a", "r3", &body(true, 0.0), &[]);
    assert_eq!(down.status, 200);
    assert_ne!(down.header("x-relay-cache"), Some("hit"));
    assert_eq!(requests(&mock), 2);
    let text = one.metrics_with("stream_relay_cache_redis_failures_total");
    assert!(
        !text.contains("stream_relay_cache_redis_failures_total 0\n"),
        "{text}"
    );
    let started = Instant::now();
    assert_eq!(send(&two, "sk-a", "r4", &body(false, 0.0), &[]).status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// The official OpenAI SDK: a repeated JSON and a repeated stream request come from the
/// cache, byte for byte, and the SDK reads them as it read the first.
#[test]
fn the_openai_sdk_reads_cached_answers_as_the_first() {
    if !have_python_modules("openai") {
        return;
    }
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock, "{ ttl: 1h }", ""), &[]);
    let said = run_sdk_script("sdk_cache_check.py", &relay, &["sk-a"]);
    assert_eq!(requests(&mock), 2, "{said}");
}

/// A first request that fails wakes the identical ones waiting for it: one of them goes
/// upstream and the others wait for its entry, instead of all going at once.
#[test]
fn after_a_failed_first_request_one_waiter_goes_upstream_for_the_rest() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock, "{ wait: 5s }", ""), &[]);
    let addr = relay.addr;
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                // The first fails slowly; the others arrive while it runs.
                let extra: Vec<(&str, &str)> = if i == 0 {
                    vec![("x-mock-status", "500"), ("x-mock-first-delay-ms", "300")]
                } else {
                    std::thread::sleep(Duration::from_millis(100));
                    vec![("x-mock-first-delay-ms", "300")]
                };
                let mut h = vec![("authorization", "Bearer sk-a")];
                h.extend(extra);
                let r = request(addr, "POST", CHAT, &h, &body(false, 0.0));
                (r.status, r.header("x-relay-cache").map(str::to_string))
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(requests(&mock), 2, "{results:?}");
    let hits = results
        .iter()
        .filter(|r| r.1.as_deref() == Some("hit"))
        .count();
    assert_eq!(hits, 2, "{results:?}");
}
