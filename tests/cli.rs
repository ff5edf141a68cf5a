//! The command line: configuration checks that name the offending key, key hashing, and
//! the shipped configuration serving a first stream from the built-in mock.

use std::process::Command;

use common::*;

fn check(yaml: &str) -> (i32, String) {
    let dir = temp_dir("check");
    let path = dir.join("relay.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(bin())
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

const GOOD: &str = "listen: { proxy: 127.0.0.1:8080 }\nroutes:\n  - { name: a, prefix: /a, provider: openai, upstreams: [http://127.0.0.1:1] }\n";

#[test]
fn check_accepts_a_valid_file_and_names_the_bad_key() {
    assert_eq!(check(GOOD).0, 0);
    let cases = [
        (
            GOOD.replace("provider: openai", "provider: gemini"),
            "routes[0].provider",
        ),
        (
            GOOD.replace("http://127.0.0.1:1", "127.0.0.1:1"),
            "routes[0].upstreams[0]",
        ),
        (
            GOOD.replace(
                "upstreams: [http://127.0.0.1:1]",
                "upstreams: [http://127.0.0.1:1], key: sk-live-inline",
            ),
            "routes[0].key",
        ),
        (
            GOOD.replace(
                "upstreams: [http://127.0.0.1:1]",
                "upstreams: [http://127.0.0.1:1], timeouts: { total: 0s }",
            ),
            "routes[0].timeouts.total",
        ),
        (
            GOOD.replace(
                "proxy: 127.0.0.1:8080",
                "proxy: 127.0.0.1:8080, admin: 127.0.0.1:8080",
            ),
            "listen.admin",
        ),
        (
            format!("{GOOD}tenants:\n  - {{ id: t, key_sha256: [zz] }}\n"),
            "tenants[0].key_sha256[0]",
        ),
        (format!("{GOOD}extra: 1\n"), "extra"),
    ];
    for (yaml, key) in cases {
        let (code, out) = check(&yaml);
        assert_eq!(code, 2, "{yaml}\n{out}");
        assert!(out.contains(key), "expected `{key}` in: {out}");
    }
    // The shipped configuration is valid, also through the `check` subcommand.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/relay.yaml");
    let out = Command::new(bin())
        .args(["check", "-c", shipped])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `-t` under a file limit of 256 warns that the default cap of 50000 connections would
/// be lowered to 96 (and still accepts the file); a cap that fits gets no warning.
#[test]
fn check_warns_when_the_file_limit_cannot_hold_max_connections() {
    let under_256 = |yaml: &str| {
        let dir = temp_dir("check-nofile");
        let path = dir.join("relay.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new("bash")
            .arg("-c")
            .arg("ulimit -n 256 && exec \"$0\" -t -c \"$1\"")
            .arg(bin())
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = under_256(GOOD);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("listen.max_connections 50000 needs up to 100064 open files")
            && err.contains("is 256: client connections are capped at 96"),
        "{err}"
    );
    let fits = GOOD.replace(
        "listen: { proxy: 127.0.0.1:8080 }",
        "listen: { proxy: 127.0.0.1:8080, max_connections: 96 }",
    );
    let (code, err) = under_256(&fits);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("capped at"), "{err}");
}

/// Off loopback, an unset per-address cap defaults to 1000 and the log says so; set (0
/// included) it stays, unmentioned; on loopback there is none.
#[test]
fn check_names_the_per_address_default_beyond_loopback() {
    let said = "listen.max_connections_per_address is not set and listen.proxy 0.0.0.0:8080 is beyond loopback: each client address may hold 1000 open connections";
    let open = GOOD.replace("127.0.0.1:8080", "0.0.0.0:8080");
    let (code, out) = check(&open);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(said), "{out}");
    let set = GOOD.replace(
        "listen: { proxy: 127.0.0.1:8080 }",
        "listen: { proxy: 0.0.0.0:8080, max_connections_per_address: 0 }",
    );
    let (code, out) = check(&set);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("max_connections_per_address is not set"),
        "{out}"
    );
    let (_, out) = check(GOOD);
    assert!(
        !out.contains("max_connections_per_address is not set"),
        "{out}"
    );
}

#[test]
fn hash_key_matches_the_library_and_reads_stdin() {
    // The harness hashes on its own; it must agree with the library the relay uses.
    assert_eq!(
        hash("sk-relay-demo"),
        stream_relay::auth::hash_key_hex("sk-relay-demo")
    );
    let out = Command::new(bin())
        .args(["hash-key", "sk-relay-demo"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        hash("sk-relay-demo")
    );
    let mut child = Command::new(bin())
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"sk-relay-demo\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        hash("sk-relay-demo")
    );

    let out = Command::new(bin()).arg("new-key").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("key:")
        .trim();
    assert!(key.starts_with("sk-relay-") && key.len() == 57, "{key}");
    assert!(text.contains(&hash(key)));
}

/// The shipped file, with only its ports and paths moved so tests can run side by side,
/// serves the demo tenant a stream from the built-in mock; real provider routes answer 503.
#[test]
fn shipped_configuration_serves_a_first_stream() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/relay.yaml")).unwrap();
    let mock_port = free_port().to_string();
    let body_start = shipped.find("\nroutes:").unwrap();
    let mut body = shipped[body_start..].replace("18080", &mock_port);
    body.insert_str(0, &format!("mock:\n  listen: 127.0.0.1:{mock_port}\n"));
    let relay = RelayProc::start(&body, &[]);
    // The mock inside the relay may start a moment after the proxy.
    let mut r = None;
    for _ in 0..50 {
        let resp = request(
            relay.addr,
            "POST",
            "/mock/openai/v1/chat/completions",
            &[("authorization", "Bearer sk-relay-demo")],
            &chat_body(true, true),
        );
        if resp.status == 200 {
            r = Some(resp);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let r = r.expect("the demo stream never came through");
    assert!(r.complete);
    assert!(String::from_utf8_lossy(&r.body).contains("\"content\":\"Hello\""));
    let r = request(
        relay.addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", "Bearer sk-relay-demo")],
        &chat_body(true, false),
    );
    assert_eq!(r.status, 403, "the demo key may only use the mock routes");
    // The public demo key cannot read the mock's stats (with the injected key and the
    // last request's headers) nor break it for everyone through a route.
    let demo = [("authorization", "Bearer sk-relay-demo")];
    let stats =
        |path: &str, method: &str| request(relay.addr, method, path, &demo, b"{\"status\":500}");
    for (method, path) in [
        ("GET", "/mock/openai/v1/mock/stats"),
        ("GET", "/mock/anthropic/mock/stats"),
        ("POST", "/mock/anthropic/mock/control"),
        ("POST", "/mock/audio/v1/mock/control"),
    ] {
        assert_eq!(stats(path, method).status, 404, "{method} {path}");
    }
    let r = request(
        relay.addr,
        "POST",
        "/mock/openai/v1/chat/completions",
        &demo,
        &chat_body(false, false),
    );
    assert_eq!(r.status, 200, "the mock still serves: nothing was broken");
}

/// The harness (tests/common, a crate of its own) finds the binary at run time; it must
/// be the one Cargo built for these tests.
#[test]
fn the_harness_runs_the_binary_cargo_built_for_the_tests() {
    assert_eq!(bin(), env!("CARGO_BIN_EXE_stream-relay"));
    assert!(std::path::Path::new(bin()).is_file(), "{}", bin());
}

/// Every command explains itself: `--help` on each names its options and the exit codes;
/// `--version` names the build's commit; a mistyped option is a usage error (exit 2).
#[test]
fn every_command_has_help_and_the_version_names_the_commit() {
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    for (args, mentions) in [
        (
            &["--help"][..],
            &["run", "check", "key", "mock", "rows", "-c", "Exit codes"][..],
        ),
        (&["run", "--help"], &["--conf", "--daemon", "--upgrade"]),
        (&["check", "--help"], &["--conf"]),
        (&["key", "--help"], &["new", "hash"]),
        (&["key", "hash", "--help"], &["stdin"]),
        (&["key", "new", "--help"], &["random"]),
        (
            &["mock", "--help"],
            &["--listen", "--key", "--control-key", "--tls-cert"],
        ),
        (&["rows", "--help"], &["replay"]),
        (
            &["rows", "replay", "--help"],
            &["--spool", "--conf", "batches are left"],
        ),
    ] {
        let (code, text) = run(args);
        assert_eq!(code, 0, "{args:?}: {text}");
        for m in mentions {
            assert!(text.contains(m), "{args:?} does not mention {m}:\n{text}");
        }
    }
    let (code, version) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(version.starts_with("stream-relay 0."), "{version}");
    assert!(version.contains("(commit "), "{version}");
    assert!(!version.contains("(commit )"), "{version}");
    let (code, text) = run(&["check", "--cnof", "x"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--conf"), "no suggestion: {text}");
    // The short forms of before keep working.
    let (code, _) = run(&["hash-key", "sk-x"]);
    assert_eq!(code, 0);
    let (code, text) = run(&["key", "hash", "sk-x"]);
    assert_eq!(
        (code, text.trim()),
        (0, stream_relay::auth::hash_key_hex("sk-x").as_str())
    );
}
