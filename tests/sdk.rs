//! The official OpenAI and Anthropic Python SDKs, unchanged, against the relay and its
//! mock (scripts/sdk_check.py). `scripts/test.sh` installs the SDKs; under CI a missing
//! SDK fails the test instead of skipping it.

use std::process::Command;

use common::*;

#[test]
fn official_sdks_work_through_the_relay() {
    let have_sdks = Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_sdks {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with the openai and anthropic packages is required under CI"
        );
        eprintln!("SKIPPED: python3 -m pip install openai anthropic (scripts/test.sh does)");
        return;
    }
    let mock = MockProc::start(None);
    let u = mock.url();
    let config = format!(
        r#"routes:
  - {{ name: mock-openai, prefix: /mock/openai/v1, provider: openai, upstreams: ["{u}/v1"] }}
  - {{ name: mock-anthropic, prefix: /mock/anthropic, provider: anthropic, upstreams: ["{u}"] }}
  - {{ name: mock-audio, prefix: /mock/audio/v1, provider: audio, upstreams: ["{u}/v1"] }}
tenants:
  - {{ id: demo, key_sha256: ["{h}"] }}
"#,
        h = hash(TENANT_KEY)
    );
    let relay = RelayProc::start(&config, &[]);
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/sdk_check.py"))
        .arg(format!("http://{}", relay.addr))
        .arg(TENANT_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("work through the relay"));
}
