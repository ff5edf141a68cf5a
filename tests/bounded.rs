//! Every buffer an upstream can grow has a cap (issue 18, items 8 and 10): one huge SSE
//! event, made of many short `data:` lines or of one long line, passes through the relay
//! unchanged and at once, while the relay's memory stays far below the event's size.
//!
//! The client asks for a stream without usage, so the relay adds
//! `stream_options.include_usage` and its usage stripper is in the path, as is the tap.

use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHAT: &str = "/openai/v1/chat/completions";
/// Bytes of the huge event the upstream sends before it waits for the client to have
/// received most of them: a relay that held the event would deliver none.
const FIRST_PART: usize = 3 << 20;
/// What the client must have received before the upstream sends the rest (more than the
/// relay's 1 MiB event cap).
const SEEN_BEFORE_REST: usize = 2 << 20;

const HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
const FIRST: &[u8] = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n";
const FIRST_STRIPPED: &[u8] = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
const USAGE: &[u8] = b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n";
const DONE: &[u8] = b"data: [DONE]\n\n";

/// ~50 MB: one event of many short `data:` lines.
fn many_lines_event() -> Vec<u8> {
    let line = b"data: {\"choices\":[{\"delta\":{\"content\":\"ab\"}}]}\n";
    let mut e = Vec::with_capacity(50 << 20);
    while e.len() < 50 << 20 {
        e.extend_from_slice(line);
    }
    e.push(b'\n');
    e
}

/// ~60 MB: one event of one `data:` line.
fn single_line_event() -> Vec<u8> {
    let mut e = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"".to_vec();
    e.resize(60 << 20, b'x');
    e.extend_from_slice(b"\"},\"finish_reason\":null}]}\n\n");
    e
}

/// What the fake upstream sends, and when it finished.
struct Plan {
    before: Vec<u8>,
    event: Vec<u8>,
    after: Vec<u8>,
}

struct Fake {
    addr: SocketAddr,
    plan: Arc<Mutex<Option<Plan>>>,
    /// Body bytes the client has received so far (set by the test's reader).
    client_has: Arc<AtomicUsize>,
    /// When the upstream wrote its last byte; whether it had to stop waiting for the
    /// client (the relay held the event).
    sent: Arc<Mutex<Option<(Instant, bool)>>>,
}

fn write_chunked(s: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    for piece in data.chunks(64 << 10) {
        s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())?;
        s.write_all(piece)?;
        s.write_all(b"\r\n")?;
    }
    Ok(())
}

/// A fake upstream answering each request with the current plan: `before`, the first
/// [`FIRST_PART`] bytes of `event`, then (once the client has most of them, or after
/// 10 s) the rest of `event` and `after`.
fn fake_upstream() -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = Fake {
        addr: listener.local_addr().unwrap(),
        plan: Arc::default(),
        client_has: Arc::default(),
        sent: Arc::default(),
    };
    let (plan, client_has, sent) = (
        fake.plan.clone(),
        fake.client_has.clone(),
        fake.sent.clone(),
    );
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let (plan, client_has, sent) = (plan.clone(), client_has.clone(), sent.clone());
            // One thread per connection, each answering requests until the relay closes
            // it (it may keep a connection for the next request).
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                while let Some((head, len)) = read_upstream_request(&mut s, &mut buf) {
                    let chat = buf.starts_with(b"POST ");
                    buf.drain(..head + len);
                    if !chat {
                        // Not the request under test (a probe, say): no plan for it.
                        let no = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
                        if s.write_all(no).is_err() {
                            return;
                        }
                        continue;
                    }
                    let Some(p) = plan.lock().unwrap().take() else {
                        return;
                    };
                    match answer(&mut s, &p, &client_has) {
                        Ok(waited_out) => {
                            *sent.lock().unwrap() = Some((Instant::now(), waited_out))
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    fake
}

/// Writes the answer to one request; whether the upstream stopped waiting for the
/// client to have [`SEEN_BEFORE_REST`] bytes.
fn answer(s: &mut TcpStream, p: &Plan, client_has: &AtomicUsize) -> std::io::Result<bool> {
    s.write_all(HEAD)?;
    write_chunked(s, &p.before)?;
    write_chunked(s, &p.event[..FIRST_PART])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut waited_out = false;
    while client_has.load(Ordering::SeqCst) < SEEN_BEFORE_REST {
        if Instant::now() > deadline {
            waited_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    write_chunked(s, &p.event[FIRST_PART..])?;
    write_chunked(s, &p.after)?;
    s.write_all(b"0\r\n\r\n")?;
    Ok(waited_out)
}

/// Sends a streaming chat request and reads the chunked answer, publishing the body
/// length as it grows. The body and when it was complete.
fn stream(relay: &RelayProc, id: &str, client_has: &AtomicUsize) -> (Vec<u8>, Instant) {
    client_has.store(0, Ordering::SeqCst);
    let mut s = TcpStream::connect(relay.addr).unwrap();
    let auth = format!("Bearer {TENANT_KEY}");
    s.write_all(&build_request(
        "POST",
        CHAT,
        &[("authorization", &auth), ("x-request-id", id)],
        &chat_body(true, false),
    ))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut raw = Vec::new();
    let mut head_read = false;
    let mut at = 0; // Start of the next unread chunk-size line in `raw`.
    let mut body = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let now = Instant::now();
        assert!(now < deadline, "the answer did not end within 180 s");
        s.set_read_timeout(Some(deadline - now)).unwrap();
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "the relay closed before the terminal chunk");
        raw.extend_from_slice(&buf[..n]);
        if !head_read {
            let Some(h) = memchr::memmem::find(&raw, b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&raw[..h]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            at = h + 4;
            head_read = true;
        }
        // Decode every whole chunk now in `raw`.
        while let Some(e) = memchr::memmem::find(&raw[at..], b"\r\n") {
            let size =
                usize::from_str_radix(std::str::from_utf8(&raw[at..at + e]).unwrap().trim(), 16)
                    .unwrap();
            let data = at + e + 2;
            if raw.len() < data + size + 2 {
                break;
            }
            if size == 0 {
                return (body, Instant::now());
            }
            body.extend_from_slice(&raw[data..data + size]);
            at = data + size + 2;
        }
        client_has.store(body.len(), Ordering::SeqCst);
        // Drop what is decoded, now and then, so `raw` stays small.
        if at > 1 << 20 {
            raw.drain(..at);
            at = 0;
        }
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The first index where `a` and `b` differ, for a readable failure on 60 MB bodies.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    (0..a.len().min(b.len()))
        .find(|&i| a[i] != b[i])
        .or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

#[test]
fn a_huge_event_passes_unchanged_and_at_once_in_bounded_memory() {
    let fake = fake_upstream();
    let relay = relay_to(fake.addr);
    let pid = relay.proc.pid();
    let idle_kb = status_kb(pid, "VmRSS:");
    // (a) many short `data:` lines, then the usage chunk the relay asked for; (b) one
    // 60 MB line. Each with what follows the event.
    let cases = [
        ("many-lines", many_lines_event(), [USAGE, DONE].concat()),
        ("one-line", single_line_event(), DONE.to_vec()),
    ];
    let mut peaks = Vec::new();
    for (id, event, after) in cases {
        // Peak RSS from here (Linux: writing 5 to clear_refs resets VmHWM).
        let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        *fake.plan.lock().unwrap() = Some(Plan {
            before: FIRST.to_vec(),
            event: event.clone(),
            after: after.clone(),
        });
        *fake.sent.lock().unwrap() = None;
        let started = Instant::now();
        let (body, done_at) = stream(&relay, id, &fake.client_has);
        let (sent_at, waited_out) = fake.sent.lock().unwrap().expect("the upstream finished");
        let hwm_kb = status_kb(pid, "VmHWM:");
        eprintln!(
            "{id}: idle RSS {} MB, peak RSS {} MB (reset: {reset}), answer complete {:.2} s after the request, {:.2} s after the upstream's last byte, upstream waited out: {waited_out}",
            idle_kb / 1024,
            hwm_kb / 1024,
            (done_at - started).as_secs_f64(),
            done_at.saturating_duration_since(sent_at).as_secs_f64(),
        );
        // Every byte unchanged, except what the relay itself added upstream: the
        // `"usage":null` field and the usage chunk.
        let after_to_client = after.strip_prefix(USAGE).unwrap_or(&after);
        let expected = [FIRST_STRIPPED, &event[..], after_to_client].concat();
        assert!(
            body == expected,
            "{id}: body of {} bytes differs from the expected {} at {:?}",
            body.len(),
            expected.len(),
            first_difference(&body, &expected)
        );
        assert!(
            !waited_out,
            "{id}: the relay held the event: the client did not get {SEEN_BEFORE_REST} of its first {FIRST_PART} bytes within 10 s"
        );
        assert!(
            done_at.saturating_duration_since(sent_at) < Duration::from_secs(20),
            "{id}: the end of the event reached the client {:?} after the upstream sent it",
            done_at - sent_at
        );
        peaks.push((id, hwm_kb));
    }
    for (id, kb) in &peaks {
        assert!(
            *kb < 150 * 1024,
            "{id}: the relay's peak RSS was {} MB (idle {} MB)",
            kb / 1024,
            idle_kb / 1024
        );
    }
    let rows = relay.rows_at_least(2);
    let row = |id: &str| {
        rows.iter()
            .find(|r| r["client_request_id"] == id)
            .unwrap_or_else(|| panic!("no row for {id} in {rows:?}"))
            .clone()
    };
    let a = row("many-lines");
    assert_eq!(a["outcome"], "ok");
    assert_eq!(a["status"], 200);
    // The usage chunk after the huge event is read: the usage is known.
    assert_eq!(
        (a["tokens_in"].as_u64(), a["tokens_out"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(a["usage_unknown"], false);
    let b = row("one-line");
    assert_eq!(b["outcome"], "ok");
    assert!(b["response_bytes"].as_u64().unwrap() > 60 << 20);
    // No usage came after the skipped event: the row says so.
    assert_eq!(b["usage_unknown"], true);
    assert!(b["tokens_in"].is_null());
}
