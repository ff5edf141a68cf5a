//! The official OpenAI and Anthropic Python SDKs, unchanged, against the relay and its
//! mock (scripts/sdk_check.py): chat, the Responses API, embeddings, transcription,
//! speech (bytes and SSE), a Realtime WebSocket session and Anthropic messages, each
//! checked on its row.
//! `scripts/test.sh` installs the SDKs; under CI a missing SDK fails the test instead of
//! skipping it.

use std::collections::HashMap;
use std::process::Command;

use common::*;

const PRICING: &str = r#"pricing:
  gpt-4o-mini: { input: 0.15, cached_input: 0.075, output: 0.60 }
  text-embedding-3-small: { input: 0.02, output: 0 }
  gpt-4o-transcribe: { input: 2.5, output: 10 }
  gpt-4o-mini-tts: { input: 0.6, output: 12 }
  mock-claude: { input: 1, output: 5 }
  gpt-realtime: { input: 4, output: 16 }
"#;

fn have_sdks() -> bool {
    have_python_modules("openai, anthropic, websockets")
}

/// The request ids sdk_check.py reports: the relay's of each API call, and the
/// client's own of each WebSocket session.
struct Ids {
    requests: HashMap<String, String>,
    sessions: HashMap<String, String>,
}

/// Runs sdk_check.py against `relay` with the route prefixes given (none: its
/// defaults).
fn sdk_check(relay: &RelayProc, prefixes: &[&str]) -> Ids {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/sdk_check.py"))
        .arg(format!("http://{}", relay.addr))
        .arg(TENANT_KEY)
        .args(prefixes)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("work through the relay"), "{stdout}");
    let line = |prefix: &str| -> HashMap<String, String> {
        let ids = stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .expect("the request ids lines");
        serde_json::from_str(ids).unwrap()
    };
    Ids {
        requests: line("requests: "),
        sessions: line("sessions: "),
    }
}

/// The row of the request the relay answered with `x-request-id: id`.
fn row(relay: &RelayProc, id: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(r) = relay.rows().into_iter().find(|r| r["request_id"] == id) {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "no row for {id}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every call's row has its tokens and cost from the provider's own counts, and each
/// stream its time to first token (or audio).
fn check_rows(relay: &RelayProc, all: &Ids) {
    let ids = &all.requests;
    for (api, id) in ids {
        let row = row(relay, id);
        let what = format!("{api}: {row}");
        assert_eq!(row["status"], 200, "{what}");
        assert_eq!(row["outcome"], "ok", "{what}");
        assert_eq!(row["usage_unknown"], false, "{what}");
        assert!(row["tokens_in"].as_u64().is_some_and(|n| n > 0), "{what}");
        assert!(row["tokens_out"].as_u64().is_some(), "{what}");
        assert!(row["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{what}");
        let streamed = api.ends_with("_stream") || api.ends_with("_sse");
        let first = if api == "speech_sse" {
            "ttfa_ms"
        } else {
            "ttft_ms"
        };
        assert_eq!(row[first].as_f64().is_some(), streamed, "{what}");
        if streamed {
            assert_eq!(row["tokens_out"], 8, "{what}");
        }
    }
    assert_eq!(
        row(relay, &ids["embeddings"])["tokens_out"],
        0,
        "embeddings"
    );
    // The Realtime session: two responses summed, priced, its first audio timed.
    let session = relay.row_for(&all.sessions["realtime"]);
    let what = session.to_string();
    assert_eq!(session["status"], 101, "{what}");
    assert_eq!(session["outcome"], "ok", "{what}");
    assert_eq!(session["model"], "gpt-realtime", "{what}");
    assert_eq!(
        (
            session["tokens_in"].as_u64(),
            session["tokens_out"].as_u64()
        ),
        (Some(34), Some(48)),
        "{what}"
    );
    assert!(
        session["cost_usd"].as_f64().is_some_and(|c| c > 0.0),
        "{what}"
    );
    assert!(session["ttfa_ms"].as_f64().is_some(), "{what}");
    assert!(
        session["frames_from_client"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{what}"
    );
}

/// The relay with `routes` (in front of a mock `{u}` stands for), the demo tenant and
/// the prices, and its mock.
fn relay_with(routes: &str) -> (MockProc, RelayProc) {
    let mock = MockProc::start(None);
    let routes = routes.replace("{u}", &mock.url());
    let config = format!(
        "routes:\n{routes}tenants:\n  - {{ id: demo, key_sha256: [\"{h}\"] }}\n{PRICING}",
        h = hash(TENANT_KEY)
    );
    let relay = RelayProc::start(&config, &[]);
    (mock, relay)
}

#[test]
fn official_sdks_work_through_the_relay() {
    if !have_sdks() {
        return;
    }
    let (_mock, relay) = relay_with(
        r#"  - { name: mock-openai, prefix: /mock/openai/v1, provider: openai, upstreams: ["{u}/v1"] }
  - { name: mock-anthropic, prefix: /mock/anthropic, provider: anthropic, upstreams: ["{u}"] }
  - { name: mock-audio, prefix: /mock/audio/v1, provider: audio, upstreams: ["{u}/v1"] }
"#,
    );
    let ids = sdk_check(&relay, &[]);
    check_rows(&relay, &ids);
}

/// `OpenAI(base_url=RELAY/v1)` and `Anthropic(base_url=RELAY)` on one relay: the
/// messages endpoint is its own route, to its own provider, and the rest of `/v1` goes
/// to the OpenAI one; nothing is added to either path.
#[test]
fn both_sdks_share_one_base_url() {
    if !have_sdks() {
        return;
    }
    let (_mock, relay) = relay_with(
        r#"  - { name: anthropic, prefix: /v1/messages, provider: anthropic, upstreams: ["{u}/v1/messages"] }
  - { name: openai, prefix: /v1, provider: openai, upstreams: ["{u}/v1"] }
"#,
    );
    let ids = sdk_check(&relay, &["/v1", "-", "/v1"]);
    check_rows(&relay, &ids);
    assert_eq!(
        row(&relay, &ids.requests["anthropic_json"])["route"],
        "anthropic"
    );
    assert_eq!(
        row(&relay, &ids.requests["responses_json"])["route"],
        "openai"
    );
}
