//! Stream load generator for benchmarks: opens many concurrent SSE streams against the
//! mock provider (directly or through a proxy) and measures, per stream, the time to the
//! first event and, per content event, the delay from the mock's send stamp
//! (`x-mock-stamp: 1`) to its arrival here. Prints one JSON object.
//!
//! usage: relay-load --target 127.0.0.1:8080 --path /mock/openai/v1/chat/completions
//!        [--streams 1000] [--events 50] [--interval-ms 20] [--ramp-ms 500]
//!        [--header 'name: value']... [--timeout-s 120]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    target: SocketAddr,
    path: String,
    streams: usize,
    events: usize,
    interval_ms: u64,
    ramp: Duration,
    headers: Vec<String>,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        target: "127.0.0.1:8080".parse().unwrap(),
        path: "/mock/openai/v1/chat/completions".into(),
        streams: 1000,
        events: 50,
        interval_ms: 20,
        ramp: Duration::from_millis(500),
        headers: Vec::new(),
        timeout: Duration::from_secs(120),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number"))
        };
        match flag.as_str() {
            "--target" => a.target = v.parse().map_err(|_| "--target: IP:port".to_string())?,
            "--path" => a.path = v.clone(),
            "--streams" => a.streams = num(v)? as usize,
            "--events" => a.events = num(v)? as usize,
            "--interval-ms" => a.interval_ms = num(v)?,
            "--ramp-ms" => a.ramp = Duration::from_millis(num(v)?),
            "--header" => a.headers.push(v.clone()),
            "--timeout-s" => a.timeout = Duration::from_secs(num(v)?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

#[derive(Default)]
struct StreamResult {
    first_event_us: Option<u64>,
    event_delays_us: Vec<u64>,
    complete: bool,
    error: Option<String>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Streams open now, and the most open at once.
static OPEN: AtomicUsize = AtomicUsize::new(0);
static PEAK_OPEN: AtomicUsize = AtomicUsize::new(0);

struct OpenGuard;

impl OpenGuard {
    fn new() -> OpenGuard {
        let now = OPEN.fetch_add(1, Ordering::Relaxed) + 1;
        PEAK_OPEN.fetch_max(now, Ordering::Relaxed);
        OpenGuard
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn one_stream(args: Arc<Args>, request: Arc<Vec<u8>>) -> StreamResult {
    let mut r = StreamResult::default();
    let run = async {
        let _open = OpenGuard::new();
        let mut s = TcpStream::connect(args.target)
            .await
            .map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let sent = Instant::now();
        s.write_all(&request).await.map_err(|e| e.to_string())?;
        let mut raw: Vec<u8> = Vec::with_capacity(16384);
        let mut body: Vec<u8> = Vec::with_capacity(16384);
        let mut head_done = false;
        let mut scanned = 0usize;
        let mut buf = vec![0u8; 16384];
        loop {
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before the stream ended".to_string());
            }
            let arrived = now_ns();
            let arrived_at = Instant::now();
            raw.extend_from_slice(&buf[..n]);
            if !head_done {
                let mut slots = [httparse::EMPTY_HEADER; 32];
                let mut resp = httparse::Response::new(&mut slots);
                match resp.parse(&raw) {
                    Ok(httparse::Status::Complete(len)) => {
                        if resp.code != Some(200) {
                            return Err(format!("status {:?}", resp.code));
                        }
                        raw.drain(..len);
                        head_done = true;
                    }
                    Ok(httparse::Status::Partial) => continue,
                    Err(e) => return Err(e.to_string()),
                }
            }
            let ended = dechunk(&mut raw, &mut body)?;
            // Each complete event: the first one timed from the request, content events
            // timed from their stamp.
            while let Some(p) = memchr::memmem::find(&body[scanned..], b"\n\n") {
                let event = &body[scanned..scanned + p];
                scanned += p + 2;
                if r.first_event_us.is_none() {
                    r.first_event_us = Some((arrived_at - sent).as_micros() as u64);
                }
                if let Some(stamp) = content_stamp(event) {
                    r.event_delays_us
                        .push((arrived.saturating_sub(stamp) / 1000) as u64);
                }
            }
            if ended {
                return Ok(());
            }
        }
    };
    match tokio::time::timeout(args.timeout, run).await {
        Ok(Ok(())) => r.complete = true,
        Ok(Err(e)) => r.error = Some(e),
        Err(_) => r.error = Some("timeout".into()),
    }
    r
}

/// Moves whole chunks from `raw` to `body`; true once the terminal chunk arrived.
fn dechunk(raw: &mut Vec<u8>, body: &mut Vec<u8>) -> Result<bool, String> {
    let mut at = 0;
    let ended = loop {
        let Some(line) = memchr::memmem::find(&raw[at..], b"\r\n") else {
            break false;
        };
        let size_text = std::str::from_utf8(&raw[at..at + line]).map_err(|e| e.to_string())?;
        let size =
            usize::from_str_radix(size_text.trim(), 16).map_err(|e| format!("chunk size: {e}"))?;
        if size == 0 {
            break true;
        }
        let start = at + line + 2;
        if raw.len() < start + size + 2 {
            break false;
        }
        body.extend_from_slice(&raw[start..start + size]);
        at = start + size + 2;
    };
    raw.drain(..at);
    Ok(ended)
}

/// The nanosecond stamp the mock put in a content delta (`"content":"<digits>"`).
fn content_stamp(event: &[u8]) -> Option<u128> {
    let key = b"\"content\":\"";
    let i = memchr::memmem::find(event, key)? + key.len();
    let digits = event[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits < 10 {
        return None;
    }
    std::str::from_utf8(&event[i..i + digits])
        .ok()?
        .parse()
        .ok()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("relay-load: {e}");
            std::process::exit(2);
        }
    };
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"bench"}]}"#;
    let mut req = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-mock-stamp: 1\r\nx-mock-chunks: {}\r\nx-mock-interval-ms: {}\r\n",
        args.path,
        args.target,
        body.len(),
        args.events,
        args.interval_ms
    );
    for h in &args.headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    let request = Arc::new(req.into_bytes());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let results: Vec<StreamResult> = runtime.block_on(async {
        let mut tasks = Vec::with_capacity(args.streams);
        let gap = args.ramp / args.streams.max(1) as u32;
        for i in 0..args.streams {
            tokio::time::sleep_until(tokio::time::Instant::from_std(started + gap * i as u32))
                .await;
            tasks.push(tokio::spawn(one_stream(args.clone(), request.clone())));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.unwrap_or_default());
        }
        out
    });
    let elapsed = started.elapsed();
    let complete = results.iter().filter(|r| r.complete).count();
    let mut first: Vec<u64> = results.iter().filter_map(|r| r.first_event_us).collect();
    let mut delays: Vec<u64> = results
        .iter()
        .flat_map(|r| r.event_delays_us.iter().copied())
        .collect();
    first.sort_unstable();
    delays.sort_unstable();
    let errors: Vec<&str> = results
        .iter()
        .filter_map(|r| r.error.as_deref())
        .take(3)
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "streams": args.streams,
            "peak_open": PEAK_OPEN.load(Ordering::Relaxed),
            "complete": complete,
            "events": delays.len(),
            "seconds": elapsed.as_secs_f64(),
            "first_event_us": {"p50": percentile(&first, 0.5), "p99": percentile(&first, 0.99)},
            "event_delay_us": {"p50": percentile(&delays, 0.5), "p99": percentile(&delays, 0.99), "max": delays.last().copied().unwrap_or(0)},
            "sample_errors": errors,
        })
    );
}
