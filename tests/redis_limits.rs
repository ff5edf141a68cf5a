//! Limits shared by a fleet through a real Redis the test starts: three relays admit,
//! together, the tenant's limit; a concurrency slot taken on one relay is seen by the
//! others; with Redis gone the relays keep serving (or refuse, if configured) and go
//! back to Redis when it returns.

mod common;

use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "sk-tenant-fleet";

fn config(mock: &MockProc, redis_url: &str, limits: &str, on_failure: &str) -> String {
    let u = mock.url();
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"] }}
redis:
  url: "{redis_url}"
  timeout: 200ms
  on_failure: {on_failure}
limits:
  default_max_tokens: 100
tenants:
  - {{ id: fleet, key_sha256: ["{h}"], limits: {limits} }}
"#,
        h = hash(KEY)
    )
}

fn chat(relay: &RelayProc) -> Response {
    let auth = format!("Bearer {KEY}");
    request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        &chat_body(false, false),
    )
}

#[test]
fn three_relays_share_one_budget_and_one_concurrency_cap() {
    let redis = RedisProc::start();
    let mock = MockProc::start(None);
    let conf = config(&mock, &redis.url(), "{ requests_per_minute: 30 }", "local");
    let relays: Vec<RelayProc> = (0..3).map(|_| RelayProc::start(&conf, &[])).collect();
    let mut ok = 0;
    for i in 0..60 {
        let r = chat(&relays[i % 3]);
        match r.status {
            200 => ok += 1,
            429 => assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded"),
            s => panic!("status {s}"),
        }
    }
    // One budget of 30 for the fleet (per relay it would be 60 admitted).
    assert!((29..=31).contains(&ok), "admitted {ok}");
    assert_eq!(mock.stats()["requests"].as_u64().unwrap(), ok);
    for relay in &relays {
        relay.metrics_with("\nstream_relay_limiter_redis_up 1\n");
    }

    // Concurrency: a stream held open through relay 0 takes the only slot everywhere.
    let conf = config(&mock, &redis.url(), "{ concurrent_requests: 1 }", "local");
    let a = RelayProc::start(&conf, &[]);
    let b = RelayProc::start(&conf, &[]);
    let s = open_long_stream(&a, KEY, 400);
    assert_eq!(chat(&b).status, 429);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    while chat(&b).status != 200 {
        assert!(
            Instant::now() < deadline,
            "the slot was never released in Redis"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn redis_down_keeps_serving_then_recovers() {
    let mut redis = RedisProc::start();
    let port = redis.port;
    let mock = MockProc::start(None);
    let relay = RelayProc::start(
        &config(
            &mock,
            &redis.url(),
            "{ requests_per_minute: 1000 }",
            "local",
        ),
        &[],
    );
    let strict = RelayProc::start(
        &config(
            &mock,
            &redis.url(),
            "{ requests_per_minute: 1000 }",
            "refuse",
        ),
        &[],
    );
    assert_eq!(chat(&relay).status, 200);
    assert_eq!(chat(&strict).status, 200);

    drop(redis);
    // Local limits while Redis is gone.
    for _ in 0..5 {
        assert_eq!(chat(&relay).status, 200);
    }
    let text = relay.metrics_with("\nstream_relay_limiter_redis_up 0\n");
    assert!(
        !text.contains("\nstream_relay_limiter_redis_failures_total 0\n"),
        "{text}"
    );
    assert_eq!(
        relay.stderr().matches("redis limiter unavailable").count(),
        1,
        "logged once per incident"
    );
    // The strict relay refuses instead, in the provider's shape.
    let r = chat(&strict);
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "limiter_unavailable");

    redis = RedisProc::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(chat(&relay).status, 200);
        let text =
            String::from_utf8(request(relay.admin, "GET", "/metrics", &[], b"").body).unwrap();
        if text.contains("\nstream_relay_limiter_redis_up 1\n") {
            break;
        }
        assert!(Instant::now() < deadline, "never went back to Redis");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = relay.stderr();
    assert!(
        log.contains("redis limiter answers again"),
        "{}",
        &log[log.len().saturating_sub(3000)..]
    );
    drop(redis);
}

/// Token reservations taken on one relay are settled in Redis with the real usage, so a
/// budget that holds two estimates serves five short answers across two relays.
#[test]
fn token_reservations_settle_in_redis() {
    let redis = RedisProc::start();
    let mock = MockProc::start(None);
    let conf = config(&mock, &redis.url(), "{ tokens_per_minute: 300 }", "local");
    let relays = [RelayProc::start(&conf, &[]), RelayProc::start(&conf, &[])];
    for i in 0..5 {
        let r = admitted_after_settlement(&format!("request {i}"), || chat(&relays[i % 2]));
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("300"));
    }
    let auth = format!("Bearer {KEY}");
    let greedy = r#"{"model":"m","max_tokens":1000,"messages":[]}"#;
    let r = request(
        relays[0].addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        greedy.as_bytes(),
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "tokens");
    assert_eq!(mock.stats()["requests"], 5);
}
