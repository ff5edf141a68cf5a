//! Rows in a ClickHouse cluster: two real servers as two shards of one cluster (a local
//! table on each, a `Distributed` table over them that the relay inserts into), one of
//! them stopped and started under traffic. (A current ClickHouse, for the current table
//! layout, is tested in tests/clickhouse.rs.)

use std::time::{Duration, Instant};

use common::*;

const CHAT: &str = "/openai/v1/chat/completions";

fn rows_config(mock: &MockProc, clickhouse: &str) -> String {
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"],
      capture: {{ request: whole, response: 64 }} }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
rows:
  clickhouse:
    database: relay_test
    retry_interval: 200ms
    timeout: 2s
    batch_interval: 100ms
    spool_dir: {spool}
{clickhouse}
"#,
        u = mock.url(),
        h = hash(TENANT_KEY),
        spool = temp_dir("spool").display(),
    )
}

fn send_many(relay: &RelayProc, tag: &str, n: usize, stream: bool) {
    let auth = format!("Bearer {TENANT_KEY}");
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let r = request(
            relay.addr,
            "POST",
            CHAT,
            &[("authorization", &auth), ("x-request-id", &id)],
            &chat_body(stream, stream),
        );
        assert_eq!(r.status, 200, "{id}");
    }
}

/// Waits until `query` answers `want` on `ch`; panics with the last answer after `within`.
fn wait_answer(ch: &ClickHouseProc, query: &str, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = ch.try_query(query).map(|t| t.trim().to_string());
        if got.as_deref() == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{query}` answers {got:?}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issue 17: two servers as two shards; the relay is given both. One node stops for a
/// while and starts again: every row lands exactly once across the two local tables,
/// and both nodes' `Distributed` table reads all of them.
#[test]
fn a_cluster_takes_every_row_once_while_a_node_stops_and_starts() {
    let mut nodes = ClickHouseProc::start_cluster(2);
    let mock = MockProc::start(None);
    let conf = rows_config(
        &mock,
        &format!(
            "    url: [{}, {}]\n    cluster: {{ name: relay_test }}",
            nodes[0].url(),
            nodes[1].url()
        ),
    );
    let relay = RelayProc::start(&conf, &[]);
    // Every node is migrated at start, before any batch: the Distributed table on one
    // writes the other shard's rows into the other's local table.
    for node in &nodes {
        wait_answer(
            node,
            "SELECT count() FROM system.tables WHERE database = 'relay_test' AND name IN ('stream_logs', 'stream_logs_local')",
            "2",
            Duration::from_secs(15),
        );
    }
    send_many(&relay, "before", 100, false);
    let total = "SELECT count(), uniqExact(request_id) FROM relay_test.stream_logs";
    wait_answer(&nodes[0], total, "100\t100", Duration::from_secs(30));
    for node in &nodes {
        // Both nodes were migrated and both shards got rows (rand() over 100 rows).
        let local: u64 = node
            .query("SELECT count() FROM relay_test.stream_logs_local")
            .trim()
            .parse()
            .unwrap();
        assert!(local > 0 && local < 100, "{local}");
        let engine = node.query(
            "SELECT engine FROM system.tables WHERE database = 'relay_test' AND name = 'stream_logs'",
        );
        assert_eq!(engine.trim(), "Distributed");
    }

    nodes[1].stop();
    send_many(&relay, "during", 100, true);
    nodes[1].restart();
    let back = Instant::now();
    send_many(&relay, "after", 100, false);
    // The rows meant for the stopped shard waited (in node 0's distributed queue or in the
    // relay's spool) and arrive once.
    wait_answer(&nodes[0], total, "300\t300", Duration::from_secs(90));
    eprintln!(
        "all 300 rows readable {:?} after the node came back",
        back.elapsed()
    );
    // The relay turned to the other node when the stopped one failed a batch.
    let said = relay.stderr();
    assert!(said.contains("failed ("), "{said}");
    wait_answer(&nodes[1], total, "300\t300", Duration::from_secs(10));
    let locals: u64 = nodes
        .iter()
        .map(|n| {
            n.query("SELECT count() FROM relay_test.stream_logs_local")
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(locals, 300);
    let streamed = nodes[0].query(
        "SELECT count(), sum(tokens_out > 0) FROM relay_test.stream_logs WHERE client_request_id LIKE 'during-%'",
    );
    assert_eq!(streamed.trim(), "100\t100");
    relay.metrics_with("\nstream_relay_clickhouse_up 1\n");
    // The batches the stopped node failed went through the spool, once each.
    let text = relay.metrics_with("\nstream_relay_rows_spool_bytes 0\n");
    let spooled = text
        .lines()
        .find_map(|l| l.strip_prefix("stream_relay_rows_spool_total{event=\"spooled\"} "))
        .unwrap_or("0");
    assert_ne!(spooled, "0", "no batch went through the spool");
    relay.metrics_with(&format!(
        "stream_relay_rows_spool_total{{event=\"replayed\"}} {spooled}\n"
    ));
    // The node that came back takes batches again. (Which batch first reaches it depends
    // on how many the requests above made: more are sent until one does, bounded.)
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut extra = 0;
    while !relay.stderr().contains("takes rows again") {
        assert!(
            Instant::now() < deadline,
            "the node that came back took no batch:\n{}",
            relay.stderr()
        );
        send_many(&relay, &format!("again-{extra}"), 1, false);
        extra += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// A table the relay made without `cluster` is not taken for the Distributed one: the
/// relay says what to do and keeps the rows in the spool.
#[test]
fn a_cluster_setting_over_a_plain_table_is_refused_with_a_reason() {
    let nodes = ClickHouseProc::start_cluster(1);
    nodes[0].query("CREATE DATABASE relay_test");
    nodes[0].query(
        "CREATE TABLE relay_test.stream_logs (time DateTime) ENGINE = MergeTree ORDER BY time",
    );
    let mock = MockProc::start(None);
    let conf = rows_config(
        &mock,
        &format!(
            "    url: [{}]\n    cluster: {{ name: relay_test }}",
            nodes[0].url()
        ),
    );
    let relay = RelayProc::start(&conf, &[]);
    send_many(&relay, "plain", 3, false);
    relay.metrics_with("\nstream_relay_clickhouse_up 0\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !relay
        .stderr()
        .contains("is a MergeTree table, not Distributed")
    {
        assert!(Instant::now() < deadline, "{}", relay.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
}
