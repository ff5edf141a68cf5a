//! The shipped deployment files are valid: the systemd unit passes
//! `systemd-analyze verify`, the HAProxy example passes `haproxy -c`, and the Docker
//! image's configuration, paths and health check work (checked without a Docker engine).
//! Under CI a missing tool fails the test (scripts/test.sh installs both).

use std::process::Command;

fn tool_missing(name: &str) -> bool {
    let missing = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map_or(true, |o| !o.status.success());
    if missing {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required under CI"
        );
        eprintln!("SKIPPED: {name} is not installed (scripts/test.sh installs it)");
    }
    missing
}

#[test]
fn systemd_unit_verifies() {
    if tool_missing("systemd-analyze") {
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/stream-relay.service"
    ))
    .unwrap();
    // The unit names the installed binary; verify it against the one just built.
    let dir = common::temp_dir("systemd");
    let path = dir.join("stream-relay.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/stream-relay", common::bin()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}

#[test]
fn haproxy_example_is_valid() {
    if tool_missing("haproxy") {
        return;
    }
    let out = Command::new("haproxy")
        .args([
            "-c",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/haproxy.cfg"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the Dockerfile's runtime stage does to the shipped configuration, and the paths
/// and ports it relies on, read from the Dockerfile itself.
struct DockerRuntime {
    /// The `sed -e 's|from|to|'` rewrites of conf/relay.yaml, in order.
    rewrites: Vec<(String, String)>,
    /// Folders the image creates and gives to the relay user.
    owned: Vec<String>,
    exposed: String,
    /// The HEALTHCHECK's shell command.
    health: String,
}

fn docker_runtime() -> DockerRuntime {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let rewrites = text
        .split("-e 's|")
        .skip(1)
        .map(|rest| {
            let mut parts = rest.splitn(3, '|');
            (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            )
        })
        .collect();
    let owned = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("&& chown relay "))
        .expect("a chown of the relay's folders")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let exposed = text
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE")
        .trim()
        .to_string();
    let health = text
        .split("CMD bash -c '")
        .nth(1)
        .and_then(|r| r.split("'\n").next())
        .expect("a HEALTHCHECK with bash -c")
        .to_string();
    DockerRuntime {
        rewrites,
        owned,
        exposed,
        health,
    }
}

/// The image's configuration: the shipped one with the Dockerfile's rewrites (each the
/// first match on a line, as sed without `g` does).
fn image_config(rewrites: &[(String, String)]) -> String {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/relay.yaml")).unwrap();
    shipped
        .lines()
        .map(|line| {
            rewrites
                .iter()
                .fold(line.to_string(), |l, (from, to)| l.replacen(from, to, 1))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// No Docker engine runs here, so the image is checked piece by piece: its configuration
/// is valid, keeps every file the relay writes in the folders the image gives to the relay
/// user, listens on the exposed port for everyone; and the relay started on it (folders
/// moved into a temporary one, ports made free) serves a stream and passes the image's
/// own HEALTHCHECK command.
#[test]
fn the_docker_image_configuration_starts_serves_and_passes_its_health_check() {
    let docker = docker_runtime();
    assert!(docker.rewrites.len() >= 2, "{:?}", docker.rewrites);
    let conf = image_config(&docker.rewrites);
    assert!(!conf.contains("/tmp/"), "state left under /tmp:\n{conf}");
    for key in ["pid_file:", "upgrade_sock:", "path:"] {
        let value = conf
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in:\n{conf}"))
            .trim();
        assert!(
            docker
                .owned
                .iter()
                .any(|d| value.starts_with(&format!("{d}/"))),
            "{key} {value} is outside the relay user's folders {:?}",
            docker.owned
        );
    }
    assert!(
        conf.contains(&format!("proxy: 0.0.0.0:{}", docker.exposed)),
        "the proxy does not listen on the exposed port {} for everyone",
        docker.exposed
    );
    let admin_line = "admin: 127.0.0.1:9090";
    assert!(conf.contains(admin_line), "{conf}");
    assert!(
        docker.health.contains("/dev/tcp/127.0.0.1/9090"),
        "{}",
        docker.health
    );

    // Run it: the image's folders inside a temporary one, free ports.
    let dir = common::temp_dir("docker");
    let (proxy, admin) = (common::free_port(), common::free_port());
    let mut local = conf.replace(
        &format!("0.0.0.0:{}", docker.exposed),
        &format!("127.0.0.1:{proxy}"),
    );
    local = local.replace(admin_line, &format!("admin: 127.0.0.1:{admin}"));
    local = local.replace("18080", &common::free_port().to_string());
    for d in &docker.owned {
        local = local.replace(&format!("{d}/"), &format!("{}{d}/", dir.display()));
        std::fs::create_dir_all(format!("{}{d}", dir.display())).unwrap();
    }
    let path = dir.join("relay.yaml");
    std::fs::write(&path, &local).unwrap();
    let check = Command::new(common::bin())
        .args(["-t", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child = Command::new(common::bin())
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let _relay = common::Proc::wrap(child, "-INT");
    let health = docker
        .health
        .replace("127.0.0.1/9090", &format!("127.0.0.1/{admin}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let ok = Command::new("bash")
            .args(["-c", &health])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the HEALTHCHECK never passed:\n{}",
            std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The first stream, from the built-in mock (which may start a moment after the
    // proxy), with no provider key; its row in the relay user's folder.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let r = loop {
        let r = common::request(
            std::net::SocketAddr::from(([127, 0, 0, 1], proxy)),
            "POST",
            "/mock/openai/v1/chat/completions",
            &[("authorization", "Bearer sk-relay-demo")],
            &common::chat_body(true, false),
        );
        if r.status == 200 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.complete);
    let rows = local
        .lines()
        .find_map(|l| l.trim().strip_prefix("path:"))
        .unwrap()
        .trim()
        .to_string();
    while !std::fs::metadata(&rows).is_ok_and(|m| m.len() > 0) {
        assert!(std::time::Instant::now() < deadline, "no row in {rows}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
