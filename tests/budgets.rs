//! Spend budgets through the relay: a tenant's daily budget serves until it is spent and
//! then refuses in the provider's shape; a group's stops all its members; three relays
//! sharing a real Redis hold one budget under 50 concurrent requests; a long stream is
//! cut at the cap with an error event and settled to what it produced; audit mode serves
//! and counts; Redis stopped follows `on_failure`.
//!
//! Prices here are high so that a few requests spend a budget: $100 per million input
//! tokens and $400 per million output tokens. The bodies below ask for `max_tokens: 10`,
//! which with their ~110 bytes (28 tokens estimated) reserves about $0.0068; the mock's
//! answer costs about $0.0058. Each test reads both from a row.

use std::time::Duration;

use common::*;

const CHAT: &str = "/openai/v1/chat/completions";

/// What one chat request costs and reserves, from its row.
fn cost_and_reservation(row: &serde_json::Value) -> (f64, f64) {
    (
        row["cost_usd"].as_f64().unwrap(),
        row["budget_reserved_usd"].as_f64().unwrap(),
    )
}

/// Requests served one after another before a reservation no longer fits the cap.
fn fit(cap: f64, cost: f64, reservation: f64) -> usize {
    ((cap - reservation) / cost + 1e-9).floor() as usize + 1
}

fn body(stream: bool) -> Vec<u8> {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 10,
        "stream": stream,
    })
    .to_string()
    .into_bytes()
}

fn config(mock: &MockProc, tenants: &str, extra: &str) -> String {
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"] }}
pricing:
  gpt-4o-mini: {{ input: 100, output: 400 }}
limits:
  default_max_tokens: 50
tenants:
{tenants}
{extra}
"#,
        u = mock.url()
    )
}

fn tenant(id: &str, key: &str, budget: &str) -> String {
    format!(
        "  - {{ id: {id}, key_sha256: [\"{}\"]{} }}\n",
        hash(key),
        if budget.is_empty() {
            String::new()
        } else {
            format!(", budget: {budget}")
        }
    )
}

fn chat(relay: &RelayProc, key: &str, id: &str) -> Response {
    let auth = format!("Bearer {key}");
    request(
        relay.addr,
        "POST",
        CHAT,
        &[("authorization", &auth), ("x-request-id", id)],
        &body(false),
    )
}

fn budgets(relay: &RelayProc) -> serde_json::Value {
    request(relay.admin, "GET", "/budgets", &[], b"").json()
}

/// Waits until `id` holds no reservation: the last request's settlement (made as it
/// ends, a moment after its answer went out) is in.
fn settled(relay: &RelayProc, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while budget(&budgets(relay), id)["reserved_usd"] != 0.0 {
        assert!(std::time::Instant::now() < deadline, "{id} never settled");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn budget<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["budget"] == id)
        .unwrap_or_else(|| panic!("no budget {id} in {report}"))
}

/// Issue 14: a $0.10 daily budget on a priced model serves until its spend reaches the
/// cap, then refuses in OpenAI's shape with the budget's headers.
#[test]
fn a_daily_budget_serves_until_spent_then_refuses_in_the_providers_shape() {
    let mock = MockProc::start(None);
    let t = tenant("acme", TENANT_KEY, "{ usd: 0.10, per: day }");
    let relay = RelayProc::start(&config(&mock, &t, ""), &[]);
    let mut served = 0;
    let mut last_remaining = f64::MAX;
    let refused = loop {
        let r = chat(&relay, TENANT_KEY, &format!("daily-{served}"));
        if r.status != 200 {
            break r;
        }
        served += 1;
        settled(&relay, "tenant:acme");
        let remaining: f64 = r.header("x-budget-remaining-usd").unwrap().parse().unwrap();
        assert!(
            remaining < last_remaining,
            "{remaining} after {last_remaining}"
        );
        last_remaining = remaining;
        assert!(served < 40, "never refused");
    };
    let rows = relay.rows_at_least(served + 1);
    let row = |id: &str| rows.iter().find(|r| r["client_request_id"] == id).unwrap();
    let (cost, reservation) = cost_and_reservation(row("daily-0"));
    // Admitted while spend plus one reservation fits the cap.
    assert_eq!(served, fit(0.10, cost, reservation), "{cost} {reservation}");
    assert_eq!(refused.status, 429);
    let e = refused.json();
    assert_eq!(e["error"]["type"], "insufficient_quota");
    assert_eq!(e["error"]["code"], "budget_exceeded");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    assert_eq!(refused.header("x-budget-limit-usd"), Some("0.100000"));
    let reset = refused.header("x-budget-reset").unwrap();
    assert!(reset.ends_with("T00:00:00Z"), "{reset}");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 86_400, "{retry}");
    let report = budgets(&relay);
    let b = budget(&report, "tenant:acme");
    let spent = b["spent_usd"].as_f64().unwrap();
    assert!((spent - served as f64 * cost).abs() < 1e-7, "{b}");
    assert!(spent <= 0.10);
    assert_eq!(b["reserved_usd"].as_f64().unwrap(), 0.0);
    // The rows: what each request reserved and settled, and the refusal.
    let first = row("daily-0");
    assert_eq!(first["budget"], "tenant:acme");
    assert_eq!(first["budget_decision"], "ok");
    assert!(reservation > cost, "{reservation} {cost}");
    assert!((first["budget_settled_usd"].as_f64().unwrap() - cost).abs() < 1e-8);
    let last = row(&format!("daily-{served}"));
    assert_eq!(last["outcome"], "budget_exceeded");
    assert_eq!(last["budget_decision"], "refused");
    relay.metrics_with(
        "stream_relay_budget_refusals_total{budget=\"tenant:acme\",mode=\"block\"} 1",
    );
}

/// A group's budget counts every member's requests, and stops them all.
#[test]
fn a_group_budget_stops_all_its_tenants() {
    let mock = MockProc::start(None);
    let t = tenant("a", "sk-a", "{ usd: 1, per: day }")
        + &tenant("b", "sk-b", "")
        + &tenant("c", "sk-c", "");
    let groups = "groups:\n  - { id: team, members: [a, b], budget: { usd: 0.03, per: week, time_zone: Europe/Berlin } }";
    let relay = RelayProc::start(&config(&mock, &t, groups), &[]);
    let mut served = 0;
    for i in 0..10 {
        let key = if i % 2 == 0 { "sk-a" } else { "sk-b" };
        if chat(&relay, key, &format!("group-{i}")).status == 200 {
            served += 1;
            settled(&relay, "group:team");
        }
    }
    let (cost, reservation) = cost_and_reservation(&relay.row_for("group-0"));
    assert_eq!(served, fit(0.03, cost, reservation));
    for key in ["sk-a", "sk-b"] {
        let r = chat(&relay, key, "after");
        assert_eq!(r.status, 429, "{key}");
        assert_eq!(r.header("x-budget-limit-usd"), Some("0.030000"));
    }
    // A tenant outside the group is not held to it.
    assert_eq!(chat(&relay, "sk-c", "outside").status, 200);
    let report = budgets(&relay);
    let team = budget(&report, "group:team");
    assert_eq!(team["period"], "week");
    assert_eq!(team["time_zone"], "Europe/Berlin");
    let team_spent = team["spent_usd"].as_f64().unwrap();
    assert!((team_spent - served as f64 * cost).abs() < 1e-7);
    let own = budget(&report, "tenant:a");
    let a_served = served.div_ceil(2) as f64;
    assert!((own["spent_usd"].as_f64().unwrap() - a_served * cost).abs() < 1e-7);
}

/// Issue 14: three relays sharing Redis, 50 concurrent requests against one budget. The
/// reservation is the worst case and the mock never uses more, so spend stays within
/// the cap (the stated bound: within one request's worst-case reservation of it).
#[test]
fn three_relays_sharing_redis_hold_one_budget_under_50_concurrent_requests() {
    let redis = RedisProc::start();
    let mock = MockProc::start(None);
    let t = tenant("fleet", TENANT_KEY, "{ usd: 0.05, per: day }");
    let extra = format!("redis:\n  url: \"{}\"\n  timeout: 500ms", redis.url());
    let conf = config(&mock, &t, &extra);
    let relays: Vec<RelayProc> = (0..3).map(|_| RelayProc::start(&conf, &[])).collect();
    let addrs: Vec<_> = relays.iter().map(|r| r.addr).collect();
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let addr = addrs[i % 3];
            std::thread::spawn(move || {
                let auth = format!("Bearer {TENANT_KEY}");
                (0..2)
                    .filter(|_| {
                        request(
                            addr,
                            "POST",
                            CHAT,
                            &[("authorization", &auth)],
                            &body(false),
                        )
                        .status
                            == 200
                    })
                    .count()
            })
        })
        .collect();
    let served: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    settled(&relays[0], "tenant:fleet");
    // Every request's row, once the writers have flushed them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let rows: Vec<serde_json::Value> = relays.iter().flat_map(|r| r.rows()).collect();
        if rows.len() >= 100 || std::time::Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(rows.len(), 100);
    let ok: Vec<&serde_json::Value> = rows.iter().filter(|r| r["status"] == 200).collect();
    assert_eq!(ok.len(), served);
    let (cost, reservation) = cost_and_reservation(ok[0]);
    let report = budgets(&relays[0]);
    let b = budget(&report, "tenant:fleet");
    assert_eq!(b["counted_in"], "redis");
    let spent = b["spent_usd"].as_f64().unwrap();
    // The bound; and here, where no request costs more than it reserved, the cap itself.
    assert!(spent <= 0.05 + reservation, "spent {spent} of 0.05");
    assert!(spent <= 0.05, "spent {spent} of 0.05");
    assert!(
        (spent - served as f64 * cost).abs() < 1e-7,
        "{served} served, {spent} spent"
    );
    // At least as many as fit at once, each holding its worst case while it ran.
    assert!(served >= (0.05 / reservation) as usize, "{served}");
    assert_eq!(b["reserved_usd"].as_f64().unwrap(), 0.0);
    // Every relay sees the same budget.
    for r in &relays[1..] {
        let other = budgets(r);
        assert_eq!(budget(&other, "tenant:fleet")["spent_usd"], b["spent_usd"]);
    }
}

/// Issue 14: a stream that outgrows its reservation asks for more; with none left it is
/// cut with an error event in OpenAI's shape, the upstream is cancelled, and its row
/// carries what it produced, settled.
#[test]
fn a_long_stream_is_cut_at_the_cap_with_an_error_event() {
    let mock = MockProc::start(None);
    // The first reservation (no max_tokens: 50 output tokens, $0.02, plus the input)
    // fits; one more (256 tokens, $0.1024) does not.
    let t = tenant("acme", TENANT_KEY, "{ usd: 0.05, per: day }");
    let relay = RelayProc::start(&config(&mock, &t, ""), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let r = request(
        relay.addr,
        "POST",
        CHAT,
        &[
            ("authorization", &auth),
            ("x-request-id", "long"),
            ("x-mock-chunks", "400"),
            ("x-mock-interval-ms", "2"),
        ],
        &chat_body(true, false),
    );
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let deltas = text.matches("\"content\":").count();
    assert!((40..=60).contains(&deltas), "{deltas} deltas");
    let last = text.trim_end().lines().last().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "budget_exceeded");
    assert_eq!(event["error"]["type"], "insufficient_quota");
    mock.wait_stat("cancelled", 1, Duration::from_secs(5));
    let row = relay.row_for("long");
    assert_eq!(row["outcome"], "budget_exceeded");
    assert_eq!(row["budget_decision"], "cut");
    let settled = row["budget_settled_usd"].as_f64().unwrap();
    let produced = settled - (row["request_bytes"].as_f64().unwrap() / 4.0).ceil() * 100e-6;
    assert!(
        (produced / 400e-6 - 51.0).abs() < 1.5,
        "settled {settled}: {row}"
    );
    relay.metrics_with("stream_relay_budget_cutoffs_total{budget=\"tenant:acme\"} 1");
    let b = budgets(&relay);
    assert!(budget(&b, "tenant:acme")["spent_usd"].as_f64().unwrap() <= 0.05);
}

/// Audit mode serves past the cap, and counts and marks what passed it.
#[test]
fn audit_mode_serves_and_counts() {
    let mock = MockProc::start(None);
    let t = tenant("acme", TENANT_KEY, "{ usd: 0.02, per: month, mode: audit }");
    let relay = RelayProc::start(&config(&mock, &t, ""), &[]);
    for i in 0..6 {
        assert_eq!(chat(&relay, TENANT_KEY, &format!("audit-{i}")).status, 200);
    }
    settled(&relay, "tenant:acme");
    let rows = relay.rows_at_least(6);
    let decision = |id: &str| {
        rows.iter().find(|r| r["client_request_id"] == id).unwrap()["budget_decision"].clone()
    };
    assert_eq!(decision("audit-0"), "ok");
    assert_eq!(decision("audit-5"), "audit_over");
    let b = budgets(&relay);
    let spent = budget(&b, "tenant:acme")["spent_usd"].as_f64().unwrap();
    let (cost, _) = cost_and_reservation(&rows[0]);
    assert!((spent - 6.0 * cost).abs() < 1e-7);
    let text = relay
        .metrics_with("stream_relay_budget_refusals_total{budget=\"tenant:acme\",mode=\"audit\"}");
    assert!(text.contains("stream_relay_budget_spent_usd{budget=\"tenant:acme\"}"));
}

/// A model without a price cannot be held to a budget: refused with a clear error.
#[test]
fn an_unpriced_model_is_refused_on_a_budgeted_tenant() {
    let mock = MockProc::start(None);
    let t = tenant("acme", TENANT_KEY, "{ usd: 1, per: day }") + &tenant("free", "sk-free", "");
    let relay = RelayProc::start(&config(&mock, &t, ""), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let unpriced = br#"{"model":"gpt-unknown","messages":[{"role":"user","content":"hi"}]}"#;
    let r = request(
        relay.addr,
        "POST",
        CHAT,
        &[("authorization", &auth)],
        unpriced,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "budget_unpriced_model");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-unknown"));
    // A tenant without a budget is served; so is a bodiless call on a budgeted one.
    let free = request(
        relay.addr,
        "POST",
        CHAT,
        &[("authorization", "Bearer sk-free")],
        unpriced,
    );
    assert_eq!(free.status, 200);
    let models = request(
        relay.addr,
        "GET",
        "/openai/v1/models",
        &[("authorization", &auth), ("x-request-id", "bodiless")],
        b"",
    );
    // Forwarded (the mock has no such endpoint): the budgets did not refuse it.
    assert_eq!(models.status, 404);
    assert_eq!(relay.row_for("bodiless")["upstream_status"], 404);
}

/// Redis stopped: `on_failure: local` serves on this relay's counts, `refuse` refuses;
/// both are counted, and both go back to Redis when it returns.
#[test]
fn redis_stopped_follows_on_failure() {
    let redis = RedisProc::start();
    let port = redis.port;
    let mock = MockProc::start(None);
    let t = tenant("acme", TENANT_KEY, "{ usd: 1, per: day }");
    let relay_for = |policy: &str| {
        let extra = format!(
            "redis:\n  url: \"{}\"\n  timeout: 200ms\n  on_failure: {policy}",
            redis.url()
        );
        RelayProc::start(&config(&mock, &t, &extra), &[])
    };
    let local = relay_for("local");
    let refuse = relay_for("refuse");
    assert_eq!(chat(&local, TENANT_KEY, "up-1").status, 200);
    assert_eq!(chat(&refuse, TENANT_KEY, "up-2").status, 200);
    drop(redis);
    assert_eq!(chat(&local, TENANT_KEY, "down-1").status, 200);
    let refused = chat(&refuse, TENANT_KEY, "down-2");
    assert_eq!(
        refused.status,
        503,
        "{:?}",
        String::from_utf8_lossy(&refused.body)
    );
    for r in [&local, &refuse] {
        let text = r.metrics_with("\nstream_relay_budget_redis_up 0\n");
        assert!(!text.contains("stream_relay_budget_redis_failures_total 0\n"));
    }
    let redis = RedisProc::start_on(port);
    // Redis is asked again a second after a failure.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while chat(&refuse, TENANT_KEY, "back").status != 200 {
        assert!(std::time::Instant::now() < deadline, "never back on Redis");
        std::thread::sleep(Duration::from_millis(100));
    }
    refuse.metrics_with("\nstream_relay_budget_redis_up 1\n");
    drop(redis);
}

/// The official OpenAI SDK raises on both: the cut stream while iterating, the refused
/// request at once, without retrying it (one row for it, not three); the Anthropic SDK
/// raises on its cut stream's `error` event.
#[test]
fn the_openai_sdk_raises_on_a_cut_stream_and_does_not_retry_a_refusal() {
    if !have_python_modules("openai, anthropic") {
        return;
    }
    let mock = MockProc::start(None);
    let t = tenant("acme", TENANT_KEY, "{ usd: 0.05, per: day }")
        + &tenant("anth", "sk-anth", "{ usd: 0.05, per: day }");
    let anthropic_route = format!(
        "  - {{ name: anthropic, prefix: /anthropic, provider: anthropic, upstreams: [\"{}\"] }}\npricing:\n  mock-claude: {{ input: 100, output: 400 }}\n",
        mock.url()
    );
    let conf = config(&mock, &t, "").replace("pricing:\n", &anthropic_route);
    let relay = RelayProc::start(&conf, &[]);
    let said = run_sdk_script("sdk_budget_check.py", &relay, &[TENANT_KEY, "sk-anth"]);
    assert!(said.contains("ok: the Anthropic stream raised"), "{said}");
    let cut = relay.row_for("sdk-anthropic-cut");
    assert_eq!(cut["outcome"], "budget_exceeded");
    assert_eq!(cut["budget_decision"], "cut");
    assert!(
        said.contains("ok: the stream raised APIError budget_exceeded"),
        "{said}"
    );
    assert_eq!(relay.row_for("sdk-cut")["budget_decision"], "cut");
    assert_eq!(relay.row_for("sdk-refused")["budget_decision"], "refused");
    std::thread::sleep(Duration::from_millis(300));
    let refused = relay
        .rows()
        .iter()
        .filter(|r| r["client_request_id"] == "sdk-refused")
        .count();
    assert_eq!(refused, 1, "the SDK retried a budget refusal");
}

/// Budgets reload with the tenants (SIGHUP): a cap raised mid-window keeps what was
/// spent, and the tenant is served again up to the new cap.
#[test]
fn a_budget_changed_mid_window_keeps_what_was_spent() {
    let mock = MockProc::start(None);
    let t = tenant("acme", TENANT_KEY, "{ usd: 0.02, per: day }");
    let relay = RelayProc::start(&config(&mock, &t, ""), &[]);
    let mut served = 0;
    while chat(&relay, TENANT_KEY, &format!("before-{served}")).status == 200 {
        served += 1;
        settled(&relay, "tenant:acme");
        assert!(served < 10);
    }
    let spent = |relay: &RelayProc| {
        budget(&budgets(relay), "tenant:acme")["spent_usd"]
            .as_f64()
            .unwrap()
    };
    let before = spent(&relay);
    assert!(before > 0.0);
    let path = relay.dir.join("relay.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("usd: 0.02", "usd: 0.04")).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &relay.proc.pid().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while budget(&budgets(&relay), "tenant:acme")["limit_usd"] != 0.04 {
        assert!(std::time::Instant::now() < deadline, "not reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(spent(&relay), before, "the spend was lost in the reload");
    assert_eq!(chat(&relay, TENANT_KEY, "after").status, 200);
    settled(&relay, "tenant:acme");
    assert!(spent(&relay) > before);
}

/// Issue 17 for budgets: on a Redis Cluster (three masters with replicas) the budget
/// scripts work as on one server.
#[test]
fn a_budget_on_a_redis_cluster_holds_its_cap() {
    let cluster = RedisClusterProc::start(3);
    let mock = MockProc::start(None);
    let t = tenant("acme", TENANT_KEY, "{ usd: 0.03, per: day }");
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let extra = format!("redis:\n  url: [{}]\n  timeout: 500ms", nodes.join(", "));
    let relay = RelayProc::start(&config(&mock, &t, &extra), &[]);
    let mut served = 0;
    while chat(&relay, TENANT_KEY, &format!("cluster-{served}")).status == 200 {
        served += 1;
        settled(&relay, "tenant:acme");
        assert!(served < 10);
    }
    let (cost, reservation) = cost_and_reservation(&relay.row_for("cluster-0"));
    assert_eq!(served, fit(0.03, cost, reservation));
    let report = budgets(&relay);
    let b = budget(&report, "tenant:acme");
    assert_eq!(b["counted_in"], "redis");
    assert!((b["spent_usd"].as_f64().unwrap() - served as f64 * cost).abs() < 1e-7);
}

/// A body sent without a length is not read before forwarding, so its model is unknown:
/// on a budgeted tenant it is refused as unpriced, never let through uncounted.
#[test]
fn a_chunked_body_cannot_pass_a_budget_uncounted() {
    use std::io::{Read, Write};
    let mock = MockProc::start(None);
    let t = tenant("acme", TENANT_KEY, "{ usd: 1, per: day }");
    let relay = RelayProc::start(&config(&mock, &t, ""), &[]);
    let body = body(false);
    let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {TENANT_KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    s.write_all(b"\r\n0\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("budget_unpriced_model"), "{answer}");
    assert_eq!(mock.stats()["requests"], 0);
}

/// A body of CJK text reserves a token per character, not a quarter of its UTF-8 bytes
/// (three a character), which would reserve less than its input costs.
#[test]
fn text_beyond_ascii_is_reserved_a_token_a_character() {
    let mock = MockProc::start(None);
    let t = tenant("acme", TENANT_KEY, "{ usd: 10, per: day }");
    let relay = RelayProc::start(&config(&mock, &t, ""), &[]);
    let text = "你好".repeat(200);
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 10,
    })
    .to_string();
    let ascii = body.bytes().filter(u8::is_ascii).count() as f64;
    let auth = format!("Bearer {TENANT_KEY}");
    let r = request(
        relay.addr,
        "POST",
        CHAT,
        &[("authorization", &auth), ("x-request-id", "cjk")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    let row = relay.row_for("cjk");
    let want = ((ascii / 4.0).ceil() + 400.0) * 100e-6 + 10.0 * 400e-6;
    let reserved = row["budget_reserved_usd"].as_f64().unwrap();
    assert!(
        (reserved - want).abs() < 1e-9,
        "reserved {reserved}, want {want}: {row}"
    );
    // A quarter of the bytes would have counted the 400 characters as 300 tokens.
    assert!(reserved > ((body.len() as f64 / 4.0).ceil() * 100e-6 + 10.0 * 400e-6));
}
