//! One row per request, whatever became of it, with what the relay measured; none lost
//! when the relay stops at once.

use std::time::{Duration, Instant};

use common::*;

fn config(mock: &MockProc) -> String {
    let u = mock.url();
    let dead = refused_port();
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"] }}
  - {{ name: dead, prefix: /dead/v1, provider: openai, upstreams: ["http://127.0.0.1:{dead}/v1"] }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
  - {{ id: small, key_sha256: ["{h2}"], routes: [dead], limits: {{ requests_per_minute: 1 }} }}
"#,
        h = hash(TENANT_KEY),
        h2 = hash("sk-small")
    )
}

#[test]
fn every_outcome_yields_exactly_one_row() {
    let mock = MockProc::start(None);
    let relay = RelayProc::start(&config(&mock), &[]);
    let expected = send_every_outcome(&relay, "rows-test/1");
    let rows = relay.rows_at_least(expected.len() + 1);
    assert_eq!(rows.len(), expected.len() + 1, "{rows:#?}");
    assert_every_outcome_row(&rows, &expected, "rows-test/1");
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
    assert_eq!(stream["stream"], true);
    assert_eq!(stream["tokens_out"], 8);
    assert!(stream["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(stream["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(stream["finish_reason"], "stop");
    assert!(stream["request_bytes"].as_u64().unwrap() > 0);
    assert_eq!(by_id("row-500")["upstream_status"], 500);
    assert_eq!(by_id("row-401")["tokens_in"], serde_json::Value::Null);
    let gone = by_id("row-gone");
    assert_eq!(gone["outcome"], "client_disconnect");
    assert!(
        gone["response_bytes"].as_u64().unwrap() > 0,
        "what was streamed until then"
    );
    relay.metrics_with(&format!(
        "stream_relay_rows_written_total{{sink=\"file\"}} {}",
        expected.len() + 1
    ));
    relay.metrics_with("\nstream_relay_rows_dropped_total 0\n");
}

#[test]
fn a_relay_stopped_at_once_leaves_no_row_behind() {
    let mock = MockProc::start(None);
    let mut relay = RelayProc::start(&config(&mock), &[]);
    let auth = format!("Bearer {TENANT_KEY}");
    for i in 0..40 {
        let id = format!("stop-{i}");
        let r = request(
            relay.addr,
            "POST",
            "/openai/v1/chat/completions",
            &[("authorization", &auth), ("x-request-id", &id)],
            &chat_body(false, false),
        );
        assert_eq!(r.status, 200);
    }
    // SIGINT: Pingora's fast shutdown, no grace period.
    std::process::Command::new("kill")
        .args(["-INT", &relay.proc.pid().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.proc.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "relay did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rows = relay.rows();
    assert_eq!(rows.len(), 40, "rows lost at shutdown");
}
