//! Tenant limits on one relay: refusals before the upstream is paid, their headers and
//! error shape, token reservations settled with the real usage, and concurrency slots
//! freed when a client goes away.

use std::time::{Duration, Instant};

use common::*;

const RPM_KEY: &str = "sk-tenant-rpm";
const TPM_KEY: &str = "sk-tenant-tpm";
const CONC_KEY: &str = "sk-tenant-conc";

/// The two routes to `mock` and `limits.default_max_tokens: 100`, then `tenants`.
fn config_with(mock: &MockProc, tenants: &str) -> String {
    let u = mock.url();
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"] }}
  - {{ name: anthropic, prefix: /anthropic, provider: anthropic, upstreams: ["{u}"] }}
limits:
  default_max_tokens: 100
tenants:
{tenants}"#
    )
}

fn start() -> (MockProc, RelayProc) {
    let mock = MockProc::start(None);
    let config = config_with(
        &mock,
        &format!(
            r#"  - {{ id: rpm, key_sha256: ["{h1}"], limits: {{ requests_per_minute: 3 }} }}
  - {{ id: tpm, key_sha256: ["{h2}"], limits: {{ tokens_per_minute: 300 }} }}
  - {{ id: conc, key_sha256: ["{h3}"], limits: {{ concurrent_requests: 1 }} }}
"#,
            h1 = hash(RPM_KEY),
            h2 = hash(TPM_KEY),
            h3 = hash(CONC_KEY),
        ),
    );
    let relay = RelayProc::start(&config, &[]);
    (mock, relay)
}

fn chat(relay: &RelayProc, key: &str, body: &[u8]) -> Response {
    let auth = format!("Bearer {key}");
    request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        body,
    )
}

#[test]
fn requests_per_minute_refuse_with_headers_and_provider_shape() {
    let (mock, relay) = start();
    let body = chat_body(false, false);
    for i in 0..3 {
        let r = chat(&relay, RPM_KEY, &body);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            Some((2 - i).to_string().as_str())
        );
        assert!(r.header("x-ratelimit-reset-requests").is_some());
    }
    let r = chat(&relay, RPM_KEY, &body);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r.json()["error"]["type"], "requests");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=120).contains(&retry), "{retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));

    let r = request(
        relay.addr,
        "POST",
        "/anthropic/v1/messages",
        &[("x-api-key", RPM_KEY), ("anthropic-version", "2023-06-01")],
        &anthropic_body(false),
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    // Only the three admitted requests reached the provider.
    assert_eq!(mock.stats()["requests"], 3);
    relay.metrics_with(
        r#"stream_relay_requests_total{outcome="rate_limited",route="openai",status_class="4xx"} 1"#,
    );
}

#[test]
fn token_reservations_are_settled_with_actual_usage() {
    let (mock, relay) = start();
    // Each request is admitted against 100 (default max_tokens) + body/4 tokens, about
    // 125, but uses about 25 + 8: with settlement five fit in 300 tokens, without it
    // only two would.
    let body = chat_body(false, false);
    for i in 0..5 {
        let r = admitted_after_settlement(&format!("request {i}"), || chat(&relay, TPM_KEY, &body));
        assert_eq!(r.status, 200, "request {i}");
    }
    // A request asking for more than the budget has left (about 270 of the 300, with
    // five settled requests in the window) is refused before the upstream.
    let before = mock.stats()["requests"].as_u64().unwrap();
    let greedy = serde_json::json!({
        "model": "gpt-4o-mini",
        "max_tokens": 250,
        "messages": [{"role": "user", "content": "Say hello"}],
    })
    .to_string();
    let r = chat(&relay, TPM_KEY, greedy.as_bytes());
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "tokens");
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("300"));
    assert_eq!(mock.stats()["requests"].as_u64().unwrap(), before);
}

/// A request whose estimate alone is over the key's tokens_per_minute could never be
/// admitted: it gets a 400 saying so (not a 429 to retry), costs nothing upstream and is
/// recorded with its own outcome; an ordinary request of the same key is served.
#[test]
fn an_estimate_over_the_token_limit_is_a_bad_request_not_a_retry() {
    let mock = MockProc::start(None);
    let key = "sk-tenant-small-tpm";
    let relay = RelayProc::start(
        &config_with(
            &mock,
            &format!(
                "  - {{ id: small, key_sha256: [\"{h}\"], limits: {{ tokens_per_minute: 1000 }} }}\n",
                h = hash(key)
            ),
        ),
        &[],
    );
    let huge = serde_json::json!({
        "model": "gpt-4o-mini",
        "max_tokens": 5000,
        "messages": [{"role": "user", "content": "Say hello"}],
    })
    .to_string();
    let estimate = 5000 + huge.len().div_ceil(4);
    let auth = format!("Bearer {key}");
    let r = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth), ("x-request-id", "too-big")],
        huge.as_bytes(),
    );
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "tokens_exceed_limit");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains(&format!("estimated tokens ({estimate})")), "{m}");
    assert!(m.contains("tokens_per_minute limit (1000)"), "{m}");
    assert!(m.contains("lower max_tokens"), "{m}");
    assert_eq!(r.header("retry-after"), None);

    // The same in Anthropic's shape.
    let body = serde_json::json!({
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 5000,
        "messages": [{"role": "user", "content": "Say hello"}],
    })
    .to_string();
    let r = request(
        relay.addr,
        "POST",
        "/anthropic/v1/messages",
        &[("x-api-key", key), ("anthropic-version", "2023-06-01")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(mock.stats()["requests"], 0, "the upstream was asked");

    // The honest request of the same key goes through.
    let r = chat(&relay, key, &chat_body(false, false));
    assert_eq!(r.status, 200);
    assert_eq!(mock.stats()["requests"], 1);

    let rows = relay.rows_at_least(3);
    let row = rows
        .iter()
        .find(|r| r["client_request_id"] == "too-big")
        .expect("a row for the refused request");
    assert_eq!(row["outcome"], "tokens_exceed_limit");
    assert_eq!(row["status"], 400);
    relay.metrics_with(
        r#"stream_relay_requests_total{outcome="tokens_exceed_limit",route="openai",status_class="4xx"} 1"#,
    );
}

#[test]
fn concurrency_slot_is_freed_when_the_client_goes_away() {
    let (mock, relay) = start();
    // A long stream holds the tenant's only slot.
    let s = open_long_stream(&relay, CONC_KEY, 400);

    let r = chat(&relay, CONC_KEY, &chat_body(false, false));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");

    // The client hangs up: the upstream request is cancelled and the slot freed.
    drop(s);
    assert_eq!(mock.wait_stat("cancelled", 1, Duration::from_secs(5)), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = chat(&relay, CONC_KEY, &chat_body(false, false));
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {}", r.status);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Tenants and limits reload without a restart: on SIGHUP and when the file changes; a
/// broken file is refused and the running tenants stay.
#[test]
fn tenants_reload_on_sighup_and_file_change_and_broken_files_are_refused() {
    let (_mock, relay) = start();
    let conf_path = relay.dir.join("relay.yaml");
    let original = std::fs::read_to_string(&conf_path).unwrap();
    let new_key = "sk-tenant-added-later";
    assert_eq!(chat(&relay, new_key, &chat_body(false, false)).status, 401);

    // Added by editing the file and sending SIGHUP.
    let added = format!(
        "{original}  - {{ id: later, key_sha256: [\"{}\"], limits: {{ requests_per_minute: 1 }} }}\n",
        hash(new_key)
    );
    std::fs::write(&conf_path, &added).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &relay.proc.pid().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = chat(&relay, new_key, &chat_body(false, false));
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 401);
        assert!(Instant::now() < deadline, "the new tenant never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its limit came with it.
    assert_eq!(chat(&relay, new_key, &chat_body(false, false)).status, 429);

    // A broken file is refused; the tenants that run stay.
    std::fs::write(
        &conf_path,
        added.replace("requests_per_minute: 1", "requests_per_minute: 0"),
    )
    .unwrap();
    relay.metrics_with(r#"stream_relay_config_reloads_total{result="refused"} 1"#);
    assert!(relay
        .stderr()
        .contains("reload refused, the running tenants stay"));
    assert!(relay
        .stderr()
        .contains("requests_per_minute: must be at least 1"));
    assert_eq!(chat(&relay, RPM_KEY, &chat_body(false, false)).status, 200);

    // Removing the tenant from the file (no signal: the change is noticed) locks it out.
    std::fs::write(&conf_path, &original).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while chat(&relay, new_key, &chat_body(false, false)).status != 401 {
        assert!(Instant::now() < deadline, "the removed tenant still works");
        std::thread::sleep(Duration::from_millis(100));
    }
}
