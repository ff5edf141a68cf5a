//! The Grafana dashboard is tested, not just written: a real Prometheus (the Debian
//! package, installed by scripts/test.sh) scrapes a relay under mixed traffic whose rows
//! go to a real ClickHouse; every PromQL expression of grafana/dashboards/stream-relay.json
//! must return data from Prometheus, and every SQL panel rows from ClickHouse.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let have = Command::new("sh")
        .args(["-c", "command -v prometheus"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus is required under CI"
        );
        eprintln!("SKIPPED: prometheus is not installed (scripts/test.sh installs it)");
        return;
    }
    let mock = MockProc::start(None);
    let ch = ClickHouseProc::start();
    let spool = temp_dir("spool");
    let u = mock.url();
    let dead = refused_port();
    let config = format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"], cache: {{ ttl: 1h }} }}
  - {{ name: audio, prefix: /audio/v1, provider: audio, upstreams: ["{u}/v1"] }}
  - {{ name: dead, prefix: /dead/v1, provider: openai, upstreams: ["http://127.0.0.1:{dead}/v1"] }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"], budget: {{ usd: 1000, per: day, route: openai }} }}
  - {{ id: small, key_sha256: ["{h2}"], limits: {{ requests_per_minute: 1 }} }}
rows:
  clickhouse: {{ url: "{ch_url}", batch_interval: 200ms, spool_dir: "{spool}" }}
"#,
        h = hash(TENANT_KEY),
        h2 = hash("sk-small"),
        ch_url = ch.url(),
        spool = spool.display(),
    );
    let relay = RelayProc::start(&config, &[]);

    let dir = temp_dir("prometheus");
    let prom_port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: stream-relay\n    static_configs:\n      - targets: ['{}']\n",
            relay.admin
        ),
    )
    .unwrap();
    let prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("start prometheus");
    let _prom = Proc::wrap(prom, "-TERM");
    // Prometheus may take a while to listen on a busy machine: wait for it to say it is
    // ready (bounded), and show its log if it never does.
    let prom_addr: std::net::SocketAddr = format!("127.0.0.1:{prom_port}").parse().unwrap();
    let ready_by = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(prom_addr).is_err()
        || request(prom_addr, "GET", "/-/ready", &[], b"").status != 200
    {
        assert!(
            Instant::now() < ready_by,
            "prometheus never became ready:\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Mixed traffic for a while: streams, JSON, audio, an upstream error, a dead route.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let addr = relay.addr;
        std::thread::spawn(move || {
            let auth = format!("Bearer {TENANT_KEY}");
            let h = |extra: &[(&'static str, &'static str)]| {
                let mut v = vec![("authorization", auth.clone())];
                v.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
                v
            };
            while !stop.load(Ordering::Relaxed) {
                for (path, headers, body) in [
                    (
                        "/openai/v1/chat/completions",
                        h(&[("x-mock-chunks", "5")]),
                        chat_body(true, false),
                    ),
                    (
                        "/openai/v1/chat/completions",
                        h(&[]),
                        chat_body(false, false),
                    ),
                    (
                        "/audio/v1/audio/speech",
                        h(&[("x-mock-chunks", "3")]),
                        b"{\"model\":\"tts-1\",\"input\":\"hi\"}".to_vec(),
                    ),
                    (
                        "/openai/v1/chat/completions",
                        h(&[("x-mock-status", "500")]),
                        chat_body(false, false),
                    ),
                    ("/dead/v1/chat/completions", h(&[]), chat_body(false, false)),
                    (
                        "/openai/v1/chat/completions",
                        vec![("authorization", "Bearer sk-small".to_string())],
                        chat_body(false, false),
                    ),
                ] {
                    let hs: Vec<(&str, &str)> =
                        headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    request(addr, "POST", path, &hs, &body);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let exprs: Vec<(String, String)> = dashboard_targets("expr")
        .into_iter()
        .map(|(t, e)| (t, e.replace("$__rate_interval", "30s")))
        .collect();
    assert!(exprs.len() >= 16);
    let sqls = dashboard_sql("stream_relay");
    assert!(sqls.len() >= 3);

    let query = |expr: &str| -> serde_json::Value {
        let r = request(
            prom_addr,
            "GET",
            &format!("/api/v1/query?query={}", percent_encode(expr)),
            &[],
            b"",
        );
        assert_eq!(
            r.status,
            200,
            "{expr}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    };
    // Every query must have data within a bounded wait (scrapes every second).
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut missing: Vec<(String, String)> = exprs.clone();
    std::thread::sleep(Duration::from_secs(4));
    while !missing.is_empty() && Instant::now() < deadline {
        missing.retain(|(_, expr)| {
            let v = query(expr);
            assert_eq!(v["status"], "success", "{expr}: {v}");
            v["data"]["result"].as_array().is_none_or(|r| r.is_empty())
        });
        if !missing.is_empty() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    if !missing.is_empty() {
        // What the relay itself said, to tell "no such traffic" from "not scraped".
        let metrics = request(relay.admin, "GET", "/metrics", &[], b"");
        let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
        let relevant: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.contains("route=\"dead\"") || l.contains("_requests_total"))
            })
            .collect();
        let log = relay.stderr();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "panels without data: {missing:#?}\nthe relay's metrics:\n{}\nthe end of its log:\n{}",
            relevant.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    // The ClickHouse panels, with Grafana's macros as the plugin expands them for the
    // last hour and the dashboard's default database.
    for (title, sql) in sqls {
        let rows = ch.rows(&sql);
        assert!(!rows.is_empty(), "{title}: no rows from\n{sql}");
    }
}
