//! Limits shared by a fleet through a real Redis the test starts: three relays admit,
//! together, the tenant's limit; a concurrency slot taken on one relay is seen by the
//! others; with Redis gone the relays keep serving (or refuse, if configured) and go
//! back to Redis when it returns.

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
    // About 270 tokens asked, with some 165 used in the window: over the budget's rest.
    let greedy = r#"{"model":"m","max_tokens":250,"messages":[]}"#;
    let r = request(
        relays[0].addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        greedy.as_bytes(),
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "tokens");
    // More than the whole budget can never be admitted: a 400, not a 429.
    let too_big = r#"{"model":"m","max_tokens":1000,"messages":[]}"#;
    let r = request(
        relays[1].addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        too_big.as_bytes(),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "tokens_exceed_limit");
    assert_eq!(mock.stats()["requests"], 5);
}

/// A limiter of this test's own on `redis`, asked directly (no relay in between).
fn direct_limiter(redis: &RedisProc) -> stream_relay::limits::redis::RedisLimiter {
    let config = stream_relay::config::RedisConfig {
        url: stream_relay::config::RedisUrl::Single(stream_relay::secret::Secret::new(redis.url())),
        timeout: Duration::from_secs(2),
        refuse_when_down: true,
        key_prefix: "settle-test".into(),
        slot_ttl: Duration::from_secs(60),
    };
    let metrics = std::sync::Arc::new(stream_relay::metrics::Metrics::new(false));
    stream_relay::limits::redis::RedisLimiter::new(&config, metrics).unwrap()
}

async fn get(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<i64> {
    redis::cmd("GET").arg(key).query_async(c).await.unwrap()
}

/// The window key after `key` (`...:tpm:N` -> `...:tpm:N+1`).
fn next_window(key: &str) -> String {
    let (head, n) = key.rsplit_once(':').unwrap();
    format!("{head}:{}", n.parse::<u64>().unwrap() + 1)
}

/// Unused tokens go back only into the window they were reserved in: never into a later
/// window, never below zero, and not at all once that window's key is gone.
#[test]
fn settlements_in_redis_credit_no_later_window_and_never_go_below_zero() {
    use stream_relay::limits::{LimitKind, Limiter};
    let redis = RedisProc::start();
    let l = direct_limiter(&redis);
    let lim = stream_relay::config::Limits {
        tokens_per_minute: Some(1000),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        // All of this runs within one minute window of Redis' clock: start afresh when
        // fewer than 5 s of the current one are left.
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
        let into = (secs * 1000 + micros / 1000) % 60_000;
        if into > 55_000 {
            tokio::time::sleep(Duration::from_millis(60_000 - into + 100)).await;
        }

        let Ok(a) = l.admit("t", "r1", &lim, 600).await else {
            panic!("r1 refused");
        };
        let key = a.shared.as_ref().unwrap().tokens_key.clone();
        assert!(key.contains(":tpm:"), "{key}");
        assert_eq!(get(&mut c, &key).await, Some(600));
        // A later window already holds tokens of its own (as when a long request ends
        // after its minute): its settlement must not touch them.
        let later = next_window(&key);
        let _: () = redis::cmd("SET")
            .arg(&later)
            .arg(300)
            .arg("PX")
            .arg(120_000)
            .query_async(&mut c)
            .await
            .unwrap();
        // As if it had reserved more than its window holds: the window stops at zero.
        let mut a = a;
        a.reserved_tokens = 5000;
        l.settle("t", &lim, a, Some(0)).await;
        assert_eq!(get(&mut c, &key).await, Some(0), "below zero");
        assert_eq!(
            get(&mut c, &later).await,
            Some(300),
            "later window credited"
        );

        // A window whose key is gone (expired after two windows) is not recreated and
        // nothing is credited elsewhere.
        let Ok(b) = l.admit("t", "r2", &lim, 200).await else {
            panic!("r2 refused");
        };
        let b_key = b.shared.as_ref().unwrap().tokens_key.clone();
        let _: i64 = redis::cmd("DEL")
            .arg(&b_key)
            .query_async(&mut c)
            .await
            .unwrap();
        l.settle("t", &lim, b, Some(0)).await;
        assert_eq!(get(&mut c, &b_key).await, None);
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("settle-test:*:tpm:*")
            .query_async(&mut c)
            .await
            .unwrap();
        for k in &keys {
            let v = get(&mut c, k).await.unwrap();
            assert!(v >= 0, "{k} = {v}");
        }
        assert_eq!(get(&mut c, &later).await, Some(300));

        // Used beyond the estimate still counts, in the reservation's window.
        let Ok(d) = l.admit("t", "r3", &lim, 100).await else {
            panic!("r3 refused");
        };
        let d_key = d.shared.as_ref().unwrap().tokens_key.clone();
        let before = get(&mut c, &d_key).await.unwrap();
        l.settle("t", &lim, d, Some(150)).await;
        assert_eq!(get(&mut c, &d_key).await, Some(before + 50));

        // An estimate over the limit itself is refused for good, without asking Redis
        // (nothing counted).
        let snapshot: Vec<Option<i64>> = {
            let mut v = Vec::new();
            for k in &keys {
                v.push(get(&mut c, k).await);
            }
            v
        };
        let r = l.admit("t", "r4", &lim, 1001).await.err().expect("refused");
        assert_eq!(r.kind, LimitKind::ExceedsLimit);
        assert_eq!(r.retry_after, Duration::ZERO);
        for (k, v) in keys.iter().zip(snapshot) {
            assert_eq!(get(&mut c, k).await, v, "{k}");
        }
    });
}

/// Issue 17's `Retry-After`: a client refused by the Redis limiter that waits the time it
/// was told is admitted, whatever the moments of its requests. Bursts against limits per
/// second (a window of 1 s, so the test is quick) at pseudo-random offsets into Redis'
/// windows and with pseudo-random pauses: each refusal's wait is honoured and is enough,
/// and never more than the two windows a count can weigh in. Before the fix the wait was
/// the time to the end of the current window, which a burst within one window outlasts.
#[test]
fn a_client_that_waits_the_redis_retry_after_is_admitted() {
    use stream_relay::limits::Limiter;
    let redis = RedisProc::start();
    let l = direct_limiter(&redis);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seed: u64 = 0x005e_ed17;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    rt.block_on(async {
        let mut n = 0;
        for (round, limit) in [2u64, 3, 5, 2, 3, 5, 2, 3].into_iter().enumerate() {
            let lim = stream_relay::config::Limits {
                requests_per_second: Some(limit),
                ..Default::default()
            };
            let tenant = format!("ra-{round}");
            tokio::time::sleep(Duration::from_millis(next(900))).await;
            for burst in 0..3 {
                let refused = loop {
                    n += 1;
                    match l.admit(&tenant, &format!("r{n}"), &lim, 0).await {
                        Ok(_) => {}
                        Err(r) => break r,
                    }
                };
                let wait = refused.retry_after;
                assert!(
                    wait <= Duration::from_millis(2100),
                    "limit {limit}: wait {wait:?}"
                );
                tokio::time::sleep(wait).await;
                n += 1;
                assert!(
                    l.admit(&tenant, &format!("r{n}"), &lim, 0).await.is_ok(),
                    "limit {limit}, burst {burst}: refused after waiting {wait:?}"
                );
                tokio::time::sleep(Duration::from_millis(next(400))).await;
            }
        }
    });
}

/// Three tenants with `limits`, on the Redis that `where_` (a `url:` or `sentinel:` line)
/// names, serving on local counts while it cannot answer.
fn fleet_config(mock: &MockProc, where_: &str, limits: &str) -> String {
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"] }}
redis:
  {where_}
  timeout: 200ms
  on_failure: local
tenants:
  - {{ id: fleet, key_sha256: ["{h}"], limits: {limits} }}
  - {{ id: after, key_sha256: ["{h2}"], limits: {limits} }}
  - {{ id: later, key_sha256: ["{h3}"], limits: {limits} }}
"#,
        u = mock.url(),
        h = hash(KEY),
        h2 = hash("sk-tenant-after"),
        h3 = hash("sk-tenant-later"),
    )
}

/// `[\"url\", ...]` for YAML.
fn yaml_list(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Requests `n` times through `relays` in turn with `key`: how many were admitted (every
/// answer is 200 or 429).
fn admitted(relays: &[RelayProc], key: &str, n: usize) -> usize {
    let auth = format!("Bearer {key}");
    (0..n)
        .filter(|i| {
            let r = request(
                relays[i % relays.len()].addr,
                "POST",
                "/openai/v1/chat/completions",
                &[("authorization", &auth)],
                &chat_body(false, false),
            );
            assert!(r.status == 200 || r.status == 429, "status {}", r.status);
            r.status == 200
        })
        .count()
}

/// After a master was killed (at `killed`): requests keep going through `relays` (tenant
/// `after`, served on local counts meanwhile) until `promoted()` says a replica has
/// taken over and every relay reports Redis up again. Returns how long that took, and
/// how many of how many requests were admitted meanwhile.
fn back_on_redis(
    relays: &[RelayProc],
    killed: Instant,
    promoted: impl Fn() -> bool,
) -> (Duration, usize, usize) {
    let deadline = killed + Duration::from_secs(40);
    let (mut sent, mut served) = (0, 0);
    loop {
        assert!(
            Instant::now() < deadline,
            "the relays never came back to Redis:\n{}",
            relays[0].stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
        sent += 3;
        served += admitted(relays, "sk-tenant-after", 3);
        if !promoted() {
            continue;
        }
        let up = relays.iter().all(|r| {
            let text =
                String::from_utf8(request(r.admin, "GET", "/metrics", &[], b"").body).unwrap();
            text.contains("\nstream_relay_limiter_redis_up 1\n")
        });
        if up {
            return (killed.elapsed(), served, sent);
        }
    }
}

/// Three relays on a Redis Cluster (3 masters, 3 replicas, started here) hold one budget;
/// the master of the tenant's slot is killed, its replica takes over, and the relays are
/// back on the cluster by themselves: a new tenant's budget is again exact fleet-wide.
#[test]
fn three_relays_share_one_budget_on_a_redis_cluster_through_a_failover() {
    let cluster = RedisClusterProc::start(3);
    let mock = MockProc::start(None);
    let conf = fleet_config(
        &mock,
        &format!("url: {}", yaml_list(&cluster.urls())),
        "{ requests_per_minute: 30 }",
    );
    let relays: Vec<RelayProc> = (0..3).map(|_| RelayProc::start(&conf, &[])).collect();
    assert_eq!(
        admitted(&relays, KEY, 45),
        30,
        "one budget of 30 for the fleet"
    );
    for relay in &relays {
        relay.metrics_with("\nstream_relay_limiter_redis_up 1\n");
    }
    // Each tenant's keys share one slot (the `{tenant}` hash tag): kill that slot's
    // master for the tenant `after`.
    let master = cluster.master_of("{after}");
    let node = cluster.nodes.iter().find(|n| n.port == master).unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &node.proc.pid().to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    // Served all along (local counts while the slot has no master), then exact again.
    let (back, served, sent) = back_on_redis(&relays, killed, || {
        cluster
            .try_master_of("{after}")
            .is_some_and(|m| m != master)
    });
    eprintln!(
        "failover: the relays were back on the cluster {back:?} after the master was killed; {served} of {sent} requests admitted meanwhile"
    );
    // Under `on_failure: local` each relay counts alone while the slot has no master: the
    // stated bound is a fleet of 3 admitting at most 3 x 30 in that time (and every
    // answer meanwhile was a 200 or a 429, never an error for lack of Redis).
    assert!(served <= 3 * 30, "{served}");
    // A budget spent only after the failover is one budget for the fleet again.
    assert_eq!(admitted(&relays, "sk-tenant-later", 45), 30);
}

/// Three relays on a Redis master behind three sentinels (with one replica), started
/// here: one budget; the master is killed, the sentinels promote the replica, and the
/// relays find it through them by themselves.
#[test]
fn three_relays_share_one_budget_through_a_sentinel_failover() {
    let redis = RedisSentinelProc::start();
    let mock = MockProc::start(None);
    let sentinel = format!(
        "sentinel: {{ nodes: {}, service: mymaster }}",
        yaml_list(&redis.urls())
    );
    let conf = fleet_config(&mock, &sentinel, "{ requests_per_minute: 30 }");
    let relays: Vec<RelayProc> = (0..3).map(|_| RelayProc::start(&conf, &[])).collect();
    assert_eq!(
        admitted(&relays, KEY, 45),
        30,
        "one budget of 30 for the fleet"
    );
    let old = redis.master.port;
    std::process::Command::new("kill")
        .args(["-KILL", &redis.master.proc.pid().to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    let (back, served, sent) = back_on_redis(&relays, killed, || {
        redis.master_port().is_some_and(|p| p != old)
    });
    eprintln!("sentinel failover: the relays were back on Redis {back:?} after the master was killed; {served} of {sent} requests admitted meanwhile");
    assert_eq!(redis.master_port(), Some(redis.replica.port));
    assert_eq!(admitted(&relays, "sk-tenant-later", 45), 30);
}

/// Issue 17: the Redis limiter's `Retry-After` is honest. The real admission script,
/// with its clock given as an argument, is driven through random limits, token costs
/// and request times: whenever it refuses with a wait of W ms, the same request W ms
/// later (nothing else in between) is admitted, and 3 ms short of W it is still refused,
/// so W is not longer than it needs to be (the script rounds up by at most 2 ms).
#[test]
fn the_redis_wait_given_is_enough_and_not_longer_than_needed() {
    use proptest::prelude::*;
    let redis = RedisProc::start();
    let script =
        redis::Script::new(&stream_relay::limits::redis::admit_script_with_clock_argument());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = std::cell::RefCell::new(
        rt.block_on(client.get_multiplexed_async_connection())
            .unwrap(),
    );
    let case = std::cell::Cell::new(0u64);
    let refusals = std::cell::Cell::new(0u64);
    let config = ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let limits = (0u64..4, 0u64..8, prop_oneof![Just(0u64), 40u64..300])
        .prop_filter("some limit", |(s, m, t)| s + m + t > 0);
    let steps = proptest::collection::vec((0u64..20_000, 1u64..120), 1..25);
    proptest!(config, |((rps, rpm, tpm) in limits, steps in steps, start in 0u64..120_000)| {
        case.set(case.get() + 1);
        let prefix = format!("{{wait-{}}}", case.get());
        let admit = |now: u64, tokens: u64| -> Vec<redis::Value> {
            let mut call = script.key(&prefix);
            call.arg(rps).arg(rpm).arg(tpm).arg(tokens).arg(0).arg("m").arg(60_000).arg(now);
            rt.block_on(call.invoke_async(&mut *conn.borrow_mut())).unwrap()
        };
        let int = |v: &redis::Value| match v {
            redis::Value::Int(i) => *i as u64,
            other => panic!("{other:?}"),
        };
        let mut now = 1_800_000_000_000 + start;
        for (gap, tokens) in steps {
            let tokens = if tpm > 0 { tokens.min(tpm) } else { tokens };
            now += gap;
            let first = admit(now, tokens);
            if int(&first[0]) == 1 {
                continue;
            }
            refusals.set(refusals.get() + 1);
            let wait = int(&first[2]);
            prop_assert!(wait <= 120_001, "wait {} ms", wait);
            if wait > 3 {
                let early = admit(now + wait - 3, tokens);
                prop_assert_eq!(int(&early[0]), 0, "admitted 3 ms before the {} ms it was told", wait);
            }
            now += wait;
            let again = admit(now, tokens);
            prop_assert_eq!(
                int(&again[0]), 1,
                "refused again (kind {}) after waiting {} ms (kind {})",
                int(&again[1]), wait, int(&first[1])
            );
        }
    });
    let refusals = refusals.get();
    assert!(
        refusals > 20,
        "only {refusals} refusals: the cases do not reach the limits"
    );
}
