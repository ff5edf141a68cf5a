//! Zero-downtime upgrade under load: a new relay started with `-u` takes the listening
//! sockets over when the old one gets SIGQUIT; the old one finishes its open streams.
//! Three upgrades in a row, with streams open and requests flowing: nothing fails, every
//! stream is complete byte for byte.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn config(mock: &MockProc) -> String {
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{}/v1"] }}
tenants:
  - {{ id: acme, key_sha256: ["{}"] }}
"#,
        mock.url(),
        hash(TENANT_KEY)
    )
}

/// Opens `n` streams of `chunks` events 50 ms apart, each on its own thread, with the
/// request ids `{id}-{i}`; `include_usage` as the body asks for.
fn open_streams(
    addr: std::net::SocketAddr,
    n: usize,
    chunks: u32,
    id: &str,
    include_usage: bool,
) -> Vec<std::thread::JoinHandle<Response>> {
    (0..n)
        .map(|i| {
            let id = format!("{id}-{i}");
            std::thread::spawn(move || {
                let auth = format!("Bearer {TENANT_KEY}");
                request(
                    addr,
                    "POST",
                    "/openai/v1/chat/completions",
                    &[
                        ("authorization", &auth),
                        ("x-request-id", &id),
                        ("x-mock-chunks", &chunks.to_string()),
                        ("x-mock-interval-ms", "50"),
                    ],
                    &chat_body(true, include_usage),
                )
            })
        })
        .collect()
}

fn kill(signal: &str, pid: u32) {
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
}

#[test]
fn three_upgrades_in_a_row_drop_nothing() {
    let mock = MockProc::start(None);
    let mut relay = RelayProc::start(&config(&mock), &[]);
    let addr = relay.addr;
    let auth = format!("Bearer {TENANT_KEY}");
    let stream_headers = [("x-mock-chunks", "50"), ("x-mock-interval-ms", "50")];
    let expected = request(
        mock.addr,
        "POST",
        "/v1/chat/completions",
        &stream_headers,
        &chat_body(true, true),
    )
    .body;

    // Requests keep flowing through both upgrades.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let flow = {
        let (stop, failures, done, auth) =
            (stop.clone(), failures.clone(), done.clone(), auth.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = request(
                    addr,
                    "POST",
                    "/openai/v1/chat/completions",
                    &[("authorization", &auth)],
                    &chat_body(false, false),
                );
                if r.status == 200 && r.complete {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    // What the client saw, for the failure message.
                    eprintln!(
                        "failed request: status {} complete {} after {:?}, {} body bytes: {:?}",
                        r.status,
                        r.complete,
                        r.sent_at.elapsed(),
                        r.body.len(),
                        String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                    );
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // The serving relay: the first one, then each that took over.
    let mut serving: Option<Proc> = None;
    for round in 0..3 {
        // Streams of 2.5 s open on the serving relay.
        let streams = open_streams(addr, 12, 50, &format!("round-{round}"), true);
        std::thread::sleep(Duration::from_millis(300));
        let new = relay.start_upgrade();
        std::thread::sleep(Duration::from_millis(500));
        let replaced = match &mut serving {
            None => &mut relay.proc,
            Some(p) => p,
        };
        kill("-QUIT", replaced.pid());
        for s in streams {
            let r = s.join().unwrap();
            assert_eq!(r.status, 200, "round {round}");
            assert!(r.complete, "round {round}: a stream was cut");
            assert!(r.body == expected, "round {round}: stream bytes differ");
        }
        // The replaced relay exits by itself: Pingora keeps it accepting for 5 s after
        // the handover, then it has its grace period.
        let deadline = Instant::now() + Duration::from_secs(20);
        while replaced.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "round {round}: the replaced relay still runs"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        serving = Some(new);
    }
    stop.store(true, Ordering::Relaxed);
    flow.join().unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during upgrades"
    );
    assert!(done.load(Ordering::Relaxed) > 100);
    let mut last = serving.expect("three upgrades");
    assert!(
        last.child.try_wait().unwrap().is_none(),
        "the last relay exited"
    );
    let r = request(
        addr,
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth)],
        &chat_body(false, false),
    );
    assert_eq!(r.status, 200);
    let t = Instant::now();
    drop(last);
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// SIGTERM: new connections are refused at once (a balancer's check fails and sends
/// them elsewhere) while the streams already open complete within the grace period.
#[test]
fn sigterm_refuses_new_connections_and_finishes_open_streams() {
    let mock = MockProc::start(None);
    let mut relay = RelayProc::start_with_grace(&config(&mock), &[], 5);
    let addr = relay.addr;
    let expected = request(
        mock.addr,
        "POST",
        "/v1/chat/completions",
        &[("x-mock-chunks", "30"), ("x-mock-interval-ms", "50")],
        &chat_body(true, false),
    )
    .body;
    let streams = open_streams(addr, 4, 30, "draining", false);
    std::thread::sleep(Duration::from_millis(300));
    kill("-TERM", relay.proc.pid());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting after SIGTERM"
    );
    assert!(
        std::net::TcpStream::connect(relay.admin).is_err(),
        "admin still accepting"
    );
    for s in streams {
        let r = s.join().unwrap();
        assert_eq!(r.status, 200);
        assert!(r.complete, "an open stream was cut by SIGTERM");
        assert!(r.body == expected);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.proc.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the relay did not exit after its grace period"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Streams a shutdown cuts (a SIGTERM whose grace period ends first, a SIGINT) still get
/// their rows, with what went out until then, each exactly once.
#[test]
fn streams_cut_by_a_shutdown_still_get_their_rows() {
    for (signal, grace) in [("-TERM", 1), ("-INT", 5)] {
        let mock = MockProc::start(None);
        let mut relay = RelayProc::start_with_grace(&config(&mock), &[], grace);
        let addr = relay.addr;
        // Streams of 10 s, well past the grace period.
        let streams = open_streams(addr, 4, 200, "cut", false);
        mock.wait_stat("requests", 4, Duration::from_secs(10));
        // Some events out (one every 50 ms) before the cut, even on a busy machine.
        std::thread::sleep(Duration::from_millis(1000));
        kill(signal, relay.proc.pid());
        let deadline = Instant::now() + Duration::from_secs(20);
        while relay.proc.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{signal}: the relay did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        for s in streams {
            let r = s.join().unwrap();
            assert_eq!(r.status, 200, "{signal}");
            assert!(!r.complete, "{signal}: the stream was not cut");
        }
        let rows = relay.rows();
        for i in 0..4 {
            let id = format!("cut-{i}");
            let mine: Vec<_> = rows
                .iter()
                .filter(|r| r["client_request_id"] == id)
                .collect();
            assert_eq!(mine.len(), 1, "{signal}: rows of {id}: {rows:?}");
            let row = mine[0];
            assert_eq!(row["outcome"], "shutdown", "{signal}: {row}");
            assert_eq!(row["status"], 200, "{signal}: {row}");
            assert_eq!(row["upstream_status"], 200, "{signal}: {row}");
            assert!(
                row["response_bytes"].as_u64().unwrap() > 0,
                "{signal}: {row}"
            );
            assert!(row["ttft_ms"].as_f64().is_some(), "{signal}: {row}");
            assert!(
                row["tokens_out"].is_null(),
                "{signal}: no usage made up: {row}"
            );
            assert_eq!(row["tenant"], "acme", "{signal}: {row}");
            assert!(row["client_addr"].is_string(), "{signal}: {row}");
        }
    }
}

/// A connection accepted just before SIGTERM whose request comes just after is served in
/// the grace period: Pingora on its own drops connections still waiting for a request
/// when shutdown starts, which loses this one (and, in an upgrade, requests on their way
/// to the old process).
#[test]
fn a_request_on_a_connection_accepted_before_sigterm_is_served() {
    let mock = MockProc::start(None);
    let mut relay = RelayProc::start_with_grace(&config(&mock), &[], 3);
    let mut s = std::net::TcpStream::connect(relay.addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    kill("-TERM", relay.proc.pid());
    std::thread::sleep(Duration::from_millis(300));
    let auth = format!("Bearer {TENANT_KEY}");
    use std::io::Write;
    s.write_all(&build_request(
        "POST",
        "/openai/v1/chat/completions",
        &[("authorization", &auth), ("x-request-id", "late-comer")],
        &chat_body(false, false),
    ))
    .unwrap();
    let r = read_response(&mut s, Instant::now(), Duration::from_secs(10), usize::MAX);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.complete);
    let deadline = Instant::now() + Duration::from_secs(15);
    while relay.proc.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the relay did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rows = relay.rows();
    let row = rows
        .iter()
        .find(|r| r["client_request_id"] == "late-comer")
        .unwrap();
    assert_eq!(row["outcome"], "ok", "{row}");
}
