//! The request log in a real ClickHouse (the `clickhouse-server` these tests start):
//! exactly one row per request of every outcome, none lost and none twice while
//! ClickHouse goes away and comes back or the relay stops, malformed rows kept aside,
//! and the seed's queries answering with the expected figures. The outcome and outage
//! tests run twice: on 18.16 (the legacy layout) and on a current ClickHouse (26.9,
//! chdb-core behind tests/fixtures/chdb_http.py: the current layout).

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const CHAT: &str = "/openai/v1/chat/completions";

/// Routes, tenants and prices, and rows to `ch` with spool in `spool`.
fn config(mock: &MockProc, ch: &ClickHouseProc, spool: &Path, batch: &str) -> String {
    let u = mock.url();
    let dead = refused_port();
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"],
      capture: {{ request: whole, response: 64 }} }}
  - {{ name: dead, prefix: /dead/v1, provider: openai, upstreams: ["http://127.0.0.1:{dead}/v1"] }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
  - {{ id: small, key_sha256: ["{h2}"], routes: [dead], limits: {{ requests_per_minute: 1 }} }}
rows:
  clickhouse:
    url: {url}
    database: relay_test
    retry_interval: 200ms
    timeout: 2s
    spool_dir: {spool}
    {batch}
"#,
        h = hash(TENANT_KEY),
        h2 = hash("sk-small"),
        url = ch.url(),
        spool = spool.display(),
    )
}

fn send(
    relay: &RelayProc,
    id: &str,
    path: &str,
    key: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> u16 {
    let mut h: Vec<(&str, &str)> = vec![("x-request-id", id), ("user-agent", "ch-test/1")];
    if !key.is_empty() {
        h.push(("authorization", key));
    }
    h.extend_from_slice(extra);
    request(relay.addr, "POST", path, &h, body).status
}

/// Waits until `sql` (a count) answers `n`; panics with the last answer after 20 s.
fn wait_count(ch: &ClickHouseProc, sql: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = ch
            .try_query(sql)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        if got == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{sql}` stays at {got:?}, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const COUNT: &str = "SELECT count() FROM relay_test.stream_logs";

#[test]
fn every_outcome_lands_once_with_its_values_and_the_seed_queries_answer() {
    every_outcome_lands_once_with_its_values(ClickHouseProc::start());
}

/// The same on a current ClickHouse (26.9, chdb-core): the current layout's migrations,
/// the relay's RowBinary batches in it (the values read back are the ones sent), and the
/// seed's queries.
#[test]
fn on_a_current_clickhouse_the_current_layout_takes_every_value() {
    every_outcome_lands_once_with_its_values(ClickHouseProc::start_current());
}

fn every_outcome_lands_once_with_its_values(ch: ClickHouseProc) {
    let mock = MockProc::start(None);
    let spool = temp_dir("spool");
    let conf = config(
        &mock,
        &ch,
        &spool,
        "batch_interval: 200ms\n    ttl_days: 30",
    );
    let relay = RelayProc::start(&conf, &[]);
    let expected = send_every_outcome(&relay, "ch-test/1");
    let n = expected.len() as u64 + 1;
    wait_count(&ch, COUNT, n);
    // The current layout keeps the milliseconds in `time` (DateTime64(3)).
    let rows = ch.rows(if ch.current {
        "SELECT *, toUnixTimestamp64Milli(time) AS time_ms FROM relay_test.stream_logs"
    } else {
        "SELECT * FROM relay_test.stream_logs"
    });
    assert_eq!(rows.len() as u64, n);
    assert_every_outcome_row(&rows, &expected, "ch-test/1");
    assert!(rows
        .iter()
        .all(|r| !r["batch_id"].as_str().unwrap().is_empty()));
    let by_id = |id: &str| {
        rows.iter()
            .find(|r| r["client_request_id"] == id)
            .unwrap()
            .clone()
    };
    let stream = by_id("row-stream");
    assert_eq!(stream["tenant"], "acme");
    assert_eq!(stream["route"], "openai");
    assert_eq!(stream["provider"], "openai");
    assert_eq!(stream["model"], "gpt-4o-mini");
    assert_eq!(stream["stream"], 1);
    assert!(stream["tokens_in"].as_u64().unwrap() > 0);
    assert_eq!(stream["tokens_out"], 8);
    assert!(stream["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(stream["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(stream["finish_reason"], "stop");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let t = stream["time_ms"].as_u64().unwrap();
    assert!(t <= now_ms && now_ms - t < 120_000, "time_ms {t}");
    assert_eq!(by_id("row-500")["upstream_status"], 500);
    // The route keeps whole requests and the first 64 bytes of responses.
    let json = by_id("row-json");
    assert_eq!(
        json["request_body"].as_str().unwrap().as_bytes(),
        &chat_body(false, false)[..]
    );
    let answer = json["response_body"].as_str().unwrap();
    assert!(answer.len() == 64 && answer.starts_with('{'), "{answer}");
    assert_eq!(by_id("row-502")["request_body"], serde_json::Value::Null);
    assert_eq!(by_id("row-401")["tokens_in"], serde_json::Value::Null);
    assert_eq!(by_id("row-401")["tenant"], serde_json::Value::Null);
    let gone = by_id("row-gone");
    assert_eq!(gone["outcome"], "client_disconnect");
    assert!(gone["response_bytes"].as_u64().unwrap() > 0);

    // The seed's queries, on this table's column names.
    let p95 = ch.rows(
        "SELECT route, quantile(0.95)(ttft_ms) AS p95_ttft FROM relay_test.stream_logs \
         WHERE time > now() - INTERVAL 10 MINUTE AND ttft_ms IS NOT NULL GROUP BY route",
    );
    assert_eq!(p95.len(), 1, "{p95:?}");
    assert_eq!(p95[0]["route"], "openai");
    assert!(p95[0]["p95_ttft"].as_f64().unwrap() > 0.0);
    let tokens = ch.rows(
        "SELECT tenant, sum(tokens_in) AS total_in, sum(tokens_out) AS total_out \
         FROM relay_test.stream_logs WHERE time >= toDateTime(today()) AND tenant IS NOT NULL \
         GROUP BY tenant ORDER BY tenant",
    );
    let acme = tokens.iter().find(|r| r["tenant"] == "acme").unwrap();
    let sum_out: u64 = ["row-stream", "row-json", "row-gone", "row-500"]
        .iter()
        .filter_map(|id| by_id(id)["tokens_out"].as_u64())
        .sum();
    assert_eq!(acme["total_out"].as_u64().unwrap(), sum_out);
    // The dashboard's ClickHouse panels.
    let panels = dashboard_sql("relay_test");
    assert!(panels.len() >= 3);
    for (title, sql) in panels {
        assert!(!ch.rows(&sql).is_empty(), "{title}: no rows from\n{sql}");
    }
    let one = ch.rows(
        "SELECT client_request_id, outcome FROM relay_test.stream_logs WHERE client_request_id = 'row-404'",
    );
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["outcome"], "no_route");

    relay.metrics_with(&format!(
        "stream_relay_rows_written_total{{sink=\"clickhouse\"}} {n}"
    ));
    relay.metrics_with("\nstream_relay_rows_dropped_total 0\n");
    relay.metrics_with("\nstream_relay_clickhouse_up 1\n");
    relay.metrics_with("stream_relay_rows_spool_total{event=\"spooled\"} 0\n");
    // The migrations ran once each (the layout, the table, then the columns added to it).
    assert_eq!(
        ch.query("SELECT count() FROM relay_test.stream_relay_migrations")
            .trim(),
        "6"
    );
    let layout = ch.query("SELECT name FROM relay_test.stream_relay_migrations WHERE version = 0");
    let types = ch.query(
        "SELECT name, type FROM system.columns WHERE database = 'relay_test' AND table = 'stream_logs' AND name IN ('time', 'tenant') ORDER BY name",
    );
    let engine = ch.query(
        "SELECT engine_full FROM system.tables WHERE database = 'relay_test' AND name = 'stream_logs'",
    );
    if ch.current {
        assert!(
            layout.starts_with("layout current (ClickHouse 26."),
            "{layout}"
        );
        assert_eq!(
            types,
            "tenant\tLowCardinality(Nullable(String))\ntime\tDateTime64(3)\n"
        );
        assert!(
            engine.contains("TTL toDateTime(time) + toIntervalDay(30)"),
            "{engine}"
        );
    } else {
        assert_eq!(layout.trim(), "layout legacy (ClickHouse 18.16.1)");
        assert_eq!(types, "tenant\tNullable(String)\ntime\tDateTime\n");
        assert!(!engine.contains("TTL"), "{engine}");
        assert!(relay.stderr().contains("the legacy layout has no TTL"));
    }
    assert_eq!(
        ch.query("SELECT count() FROM system.columns WHERE database = 'relay_test' AND table = 'stream_logs' AND name IN ('client_request_id', 'usage_unknown', 'frames_from_client', 'frames_from_server')")
            .trim(),
        "4"
    );
}

#[test]
fn clickhouse_down_and_back_loses_no_row_and_doubles_none() {
    down_and_back_loses_no_row_and_doubles_none(ClickHouseProc::start());
}

/// The same on a current ClickHouse: the replay's check for rows already written reads
/// the current layout.
#[test]
fn a_current_clickhouse_down_and_back_loses_no_row_and_doubles_none() {
    down_and_back_loses_no_row_and_doubles_none(ClickHouseProc::start_current());
}

fn down_and_back_loses_no_row_and_doubles_none(mut ch: ClickHouseProc) {
    let mock = MockProc::start(None);
    let spool = temp_dir("spool");
    let relay = RelayProc::start(&config(&mock, &ch, &spool, "batch_interval: 100ms"), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let mut slowest = Duration::ZERO;
    let mut sent = 0u64;
    let run = |sent: &mut u64, slowest: &mut Duration, n: usize| {
        for _ in 0..n {
            let id = format!("flow-{sent}");
            let t = Instant::now();
            let status = send(
                &relay,
                &id,
                CHAT,
                &auth,
                &chat_body(true, false),
                &[("x-mock-interval-ms", "1")],
            );
            *slowest = (*slowest).max(t.elapsed());
            assert_eq!(status, 200);
            *sent += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    run(&mut sent, &mut slowest, 60);
    ch.stop();
    run(&mut sent, &mut slowest, 120);
    relay.metrics_with("\nstream_relay_clickhouse_up 0\n");
    ch.restart();
    run(&mut sent, &mut slowest, 60);

    wait_count(&ch, COUNT, sent);
    assert_eq!(
        ch.query("SELECT uniqExact(request_id) FROM relay_test.stream_logs")
            .trim(),
        sent.to_string(),
        "a row written twice"
    );
    let text = relay.metrics_with("\nstream_relay_rows_dropped_total 0\n");
    let value = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let spooled = value("stream_relay_rows_spool_total{event=\"spooled\"}");
    assert!(spooled > 0, "nothing went through the spool");
    relay.metrics_with(&format!(
        "stream_relay_rows_spool_total{{event=\"replayed\"}} {spooled}\n"
    ));
    relay.metrics_with("\nstream_relay_rows_spool_bytes 0\n");
    // The request path never waited for ClickHouse (its timeout here is 2 s); the
    // latency itself is compared in the bench (scripts/bench_rows.sh).
    assert!(
        slowest < Duration::from_secs(2),
        "a request took {slowest:?}"
    );
}

#[test]
fn a_relay_stopped_mid_traffic_leaves_no_row_behind() {
    let ch = ClickHouseProc::start();
    let mock = MockProc::start(None);
    let spool = temp_dir("spool");
    // Batches that would wait a minute: every row is still in memory at the stop.
    let conf = config(&mock, &ch, &spool, "batch_interval: 60s");
    let auth = format!("Bearer {TENANT_KEY}");
    for (round, signal) in [(0, "-TERM"), (1, "-INT")] {
        let mut relay = RelayProc::start(&conf, &[]);
        // Under SIGTERM, streams still open when the signal comes finish in the grace
        // period. SIGINT is Pingora's fast shutdown: its 10 s streams are cut, and their
        // rows (outcome `shutdown`) come after the writer has stopped.
        let chunks = if signal == "-TERM" { "10" } else { "200" };
        let streams: Vec<_> = (0..3)
            .map(|i| {
                let addr = relay.addr;
                let auth = auth.clone();
                let id = format!("open-{round}-{i}");
                std::thread::spawn(move || {
                    let r = request(
                        addr,
                        "POST",
                        CHAT,
                        &[
                            ("authorization", &auth),
                            ("x-request-id", &id),
                            ("x-mock-chunks", chunks),
                            ("x-mock-interval-ms", "30"),
                        ],
                        &chat_body(true, false),
                    );
                    r.status
                })
            })
            .collect();
        for i in 0..40 {
            let id = format!("stop-{round}-{i}");
            assert_eq!(
                send(&relay, &id, CHAT, &auth, &chat_body(false, false), &[]),
                200
            );
        }
        std::process::Command::new("kill")
            .args([signal, &relay.proc.pid().to_string()])
            .status()
            .unwrap();
        for s in streams {
            assert_eq!(s.join().unwrap(), 200);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while relay.proc.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "relay did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A new relay on the same spool replays what the stopped ones left.
    let _relay = RelayProc::start(&conf, &[]);
    wait_count(
        &ch,
        "SELECT count() FROM relay_test.stream_logs WHERE client_request_id LIKE 'stop-%'",
        80,
    );
    wait_count(
        &ch,
        "SELECT count() FROM relay_test.stream_logs WHERE client_request_id LIKE 'open-0-%' AND outcome = 'ok'",
        3,
    );
    wait_count(
        &ch,
        "SELECT count() FROM relay_test.stream_logs WHERE client_request_id LIKE 'open-1-%' AND outcome = 'shutdown' AND status = 200 AND response_bytes > 0",
        3,
    );
    assert_eq!(
        ch.query("SELECT count() - uniqExact(request_id) FROM relay_test.stream_logs")
            .trim(),
        "0"
    );
}

#[test]
fn rows_clickhouse_refuses_are_kept_aside_and_the_rest_written() {
    let ch = ClickHouseProc::start();
    let mock = MockProc::start(None);
    let spool = temp_dir("spool");
    let relay = RelayProc::start(&config(&mock, &ch, &spool, "batch_interval: 300ms"), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    assert_eq!(
        send(&relay, "before", CHAT, &auth, &chat_body(false, false), &[]),
        200
    );
    wait_count(&ch, COUNT, 1);
    // An operator's check on the table: rows for this model are refused.
    ch.query(
        "ALTER TABLE relay_test.stream_logs ADD COLUMN guard UInt8 \
         MATERIALIZED throwIf(ifNull(model, '') = 'poison-model')",
    );
    let poison = br#"{"model":"poison-model","messages":[{"role":"user","content":"x"}]}"#;
    for i in 0..6 {
        let id = format!("mixed-{i}");
        let body: &[u8] = if i == 3 {
            poison
        } else {
            &chat_body(false, false)
        };
        assert_eq!(send(&relay, &id, CHAT, &auth, body, &[]), 200);
    }
    wait_count(&ch, COUNT, 6);
    relay.metrics_with("stream_relay_rows_spool_total{event=\"dead_lettered\"} 1\n");
    let letters = std::fs::read_to_string(spool.join("dead_letter.jsonl")).unwrap();
    let entries: Vec<serde_json::Value> = letters
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 1, "{letters}");
    assert_eq!(entries[0]["row"]["client_request_id"], "mixed-3");
    assert!(
        entries[0]["error"].as_str().unwrap().contains("395"),
        "{letters}"
    );
    assert_eq!(
        ch.query("SELECT count() FROM relay_test.stream_logs WHERE client_request_id = 'mixed-3'")
            .trim(),
        "0"
    );
    relay.metrics_with("\nstream_relay_rows_dropped_total 0\n");
}

#[test]
fn a_graceful_upgrade_loses_no_row_and_doubles_none() {
    let ch = ClickHouseProc::start();
    let mock = MockProc::start(None);
    let spool = temp_dir("spool");
    let relay = RelayProc::start(&config(&mock, &ch, &spool, "batch_interval: 500ms"), &[]);
    let addr = relay.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flow = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let auth = format!("Bearer {TENANT_KEY}");
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("up-{sent}");
                let r = request(
                    addr,
                    "POST",
                    CHAT,
                    &[("authorization", &auth), ("x-request-id", &id)],
                    &chat_body(false, false),
                );
                assert_eq!(r.status, 200, "{id}");
                sent += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let mut new = relay.start_upgrade();
    std::thread::sleep(Duration::from_millis(500));
    std::process::Command::new("kill")
        .args(["-QUIT", &relay.proc.pid().to_string()])
        .status()
        .unwrap();
    // The old relay exits after its grace period; traffic goes on through the new one.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flow.join().unwrap();
    assert!(sent > 50, "{sent}");
    wait_count(&ch, COUNT, sent);
    assert_eq!(
        ch.query("SELECT uniqExact(request_id) FROM relay_test.stream_logs")
            .trim(),
        sent.to_string()
    );
    assert!(
        new.child.try_wait().unwrap().is_none(),
        "the new relay serves"
    );
}

#[test]
fn a_table_dropped_by_hand_comes_back_with_every_row() {
    let ch = ClickHouseProc::start();
    let mock = MockProc::start(None);
    let spool = temp_dir("spool");
    let relay = RelayProc::start(&config(&mock, &ch, &spool, "batch_interval: 100ms"), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    assert_eq!(
        send(&relay, "first", CHAT, &auth, &chat_body(false, false), &[]),
        200
    );
    wait_count(&ch, COUNT, 1);
    ch.query("DROP TABLE relay_test.stream_logs");
    for i in 0..5 {
        let id = format!("after-drop-{i}");
        assert_eq!(
            send(&relay, &id, CHAT, &auth, &chat_body(false, false), &[]),
            200
        );
    }
    wait_count(&ch, COUNT, 5);
    relay.metrics_with("\nstream_relay_rows_dropped_total 0\n");
}

/// Stops `relay` with `signal` and waits until it has exited.
fn stop_relay(relay: &mut RelayProc, signal: &str) {
    std::process::Command::new("kill")
        .args([signal, &relay.proc.pid().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.proc.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "relay did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 17's case: 300 requests with ClickHouse stopped for a while in the middle, then
/// SIGTERM a second after it came back. The relay's probe waits 30 s here, so it never
/// replays while running: what it spooled must leave with it, at exit.
#[test]
fn rows_spooled_during_an_outage_leave_with_the_relay() {
    let mut ch = ClickHouseProc::start();
    let mock = MockProc::start(None);
    let spool = temp_dir("spool");
    let conf = config(&mock, &ch, &spool, "batch_interval: 100ms")
        .replace("retry_interval: 200ms", "retry_interval: 30s");
    let mut relay = RelayProc::start(&conf, &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    let body = chat_body(false, false);
    let mut sent = 0;
    for phase in 0..3 {
        if phase == 1 {
            ch.stop();
        }
        if phase == 2 {
            relay.metrics_with("\nstream_relay_clickhouse_up 0\n");
            ch.restart();
        }
        for _ in 0..100 {
            let id = format!("outage-{sent}");
            assert_eq!(send(&relay, &id, CHAT, &auth, &body, &[]), 200);
            sent += 1;
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    stop_relay(&mut relay, "-TERM");
    // No relay runs now: what is in ClickHouse is what the stopped one left there.
    assert_eq!(ch.query(COUNT).trim(), "300", "{}", relay.stderr());
    assert_eq!(
        ch.query("SELECT uniqExact(request_id) FROM relay_test.stream_logs")
            .trim(),
        "300"
    );
    assert!(
        relay
            .stderr()
            .contains("spooled rows written to ClickHouse"),
        "{}",
        relay.stderr()
    );
}

/// `stream-relay rows replay` drains a stopped relay's spool: not while ClickHouse is
/// down (exit 1, nothing lost), then all of it (exit 0), and a second run sends nothing.
#[test]
fn rows_replay_drains_a_spool_once() {
    let mut ch = ClickHouseProc::start();
    let mock = MockProc::start(None);
    let spool = temp_dir("spool");
    let conf = config(
        &mock,
        &ch,
        &spool,
        "batch_interval: 100ms\n    shutdown_flush: 0s",
    );
    let mut relay = RelayProc::start(&conf, &[]);
    relay.metrics_with("\nstream_relay_clickhouse_up 1\n");
    ch.stop();
    let auth = format!("Bearer {TENANT_KEY}");
    for i in 0..50 {
        let id = format!("replay-{i}");
        assert_eq!(
            send(&relay, &id, CHAT, &auth, &chat_body(false, false), &[]),
            200
        );
    }
    stop_relay(&mut relay, "-TERM");
    let replay = || {
        std::process::Command::new(bin())
            .args(["rows", "replay", "-c"])
            .arg(relay.dir.join("relay.yaml"))
            .output()
            .unwrap()
    };
    let down = replay();
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    ch.restart();
    let out = replay();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        said.contains("(50 rows) sent to ClickHouse, 0 left"),
        "{said}"
    );
    assert_eq!(
        ch.query(
            "SELECT count() FROM relay_test.stream_logs WHERE client_request_id LIKE 'replay-%'"
        )
        .trim(),
        "50"
    );
    let again = replay();
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 batches (0 rows)"));
    assert_eq!(ch.query(COUNT).trim(), "50");
}
