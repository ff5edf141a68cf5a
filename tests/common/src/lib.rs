//! Test harness: the real `stream-relay` binary and its mock provider as child
//! processes on free loopback ports, and a small HTTP/1.1 client that records when each
//! piece of a response arrived.
//!
//! A crate of its own (a dev-dependency of stream-relay), so it is compiled once rather
//! than once per test file. It does not depend on stream-relay: the relay is what it
//! runs, not what it links.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The `stream-relay` binary Cargo built for this test run.
///
/// `env!("CARGO_BIN_EXE_stream-relay")` exists only while an integration test itself is
/// compiled, not this crate. Cargo from 1.96 on also sets the variable when it runs the
/// test (1.95 does not); without it the relay is found beside the test binary's folder
/// (`target/debug/deps/relay-…` → `target/debug/stream-relay`). `tests/cli.rs` checks
/// that this is the path the test was compiled with.
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("CARGO_BIN_EXE_stream-relay") {
            return path;
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary is in target/<profile>/deps");
        let path = profile_dir.join(format!("stream-relay{}", std::env::consts::EXE_SUFFIX));
        path.into_os_string()
            .into_string()
            .expect("a UTF-8 path to stream-relay")
    })
}

pub const TENANT_KEY: &str = "sk-tenant-test-1";
pub const PROVIDER_KEY: &str = "sk-upstream-test-9";

/// A free loopback port for a server the test starts (bound then released).
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`), where a port asked
/// of bind(0) comes from and where every outgoing connection's own port comes from: a
/// port from there can be taken by any connection the suite opens between its release
/// and the server's bind (clickhouse-server then exits with "Address already in use").
/// Below the range, only another test choosing the same port at once can take it.
pub fn free_port() -> u16 {
    static N: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const FLOOR: u32 = 10_000;
    if low > FLOOR + 1000 {
        use std::hash::{BuildHasher, Hasher};
        for _ in 0..64 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(N.fetch_add(1, Ordering::Relaxed));
            h.write_u32(std::process::id());
            let port = FLOOR + (h.finish() % u64::from(low - FLOOR)) as u32;
            if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback port where every connection is refused, for as long as the test binary
/// runs: a TCP socket bound to it and never listening, held in a static (a new port on
/// each call). Unlike a port from [`free_port`], nothing else (another server of the
/// test, another job on the machine) can take it before the relay tries it, so a "dead
/// upstream" stays dead.
pub fn refused_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<socket2::Socket>> = std::sync::Mutex::new(Vec::new());
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a TCP socket");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    s.bind(&any.into()).expect("bind a loopback port");
    let port = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("the bound port")
        .port();
    HELD.lock().unwrap().push(s);
    port
}

/// A fresh temporary directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "stream-relay-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tenant key as `key_sha256` holds it: SHA-256, lower-case hex.
pub fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A child process stopped by pid when dropped.
pub struct Proc {
    pub child: Child,
    signal: &'static str,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Takes charge of a child started elsewhere; it gets `signal` when dropped.
    pub fn wrap(child: Child, signal: &'static str) -> Proc {
        Proc { child, signal }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Already exited (and reaped): its pid may be another process's by now.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args([self.signal, &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mock provider, started as `stream-relay mock` on a free port.
pub struct MockProc {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl MockProc {
    pub fn start(key: Option<&str>) -> MockProc {
        MockProc::start_with(key, None)
    }

    pub fn start_with(key: Option<&str>, tls: Option<(&Path, &Path)>) -> MockProc {
        let mut cmd = Command::new(bin());
        cmd.args(["mock", "--listen", "127.0.0.1:0"]);
        if let Some(k) = key {
            cmd.args(["--key", k]);
        }
        if let Some((cert, key)) = tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mock");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("mock listening on ")
            .unwrap_or_else(|| panic!("unexpected mock output: {line:?}"))
            .parse()
            .unwrap();
        MockProc {
            proc: Proc {
                child,
                signal: "-TERM",
            },
            addr,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> serde_json::Value {
        let r = request(self.addr, "GET", "/mock/stats", &[], b"");
        serde_json::from_slice(&r.body).unwrap()
    }

    /// Polls the stats until `field` reaches `at_least` or the deadline passes.
    pub fn wait_stat(&self, field: &str, at_least: u64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.stats()[field].as_u64().unwrap();
            if v >= at_least || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A relay process on free ports with the given `routes:` and `tenants:` YAML.
pub struct RelayProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub stderr_path: PathBuf,
}

impl RelayProc {
    /// `body` holds the `routes:` and `tenants:` sections. `env` is added to the
    /// relay's environment.
    pub fn start(body: &str, env: &[(&str, &str)]) -> RelayProc {
        RelayProc::start_with_grace(body, env, 1)
    }

    /// As [`RelayProc::start`], with `server.grace_period_seconds` set.
    pub fn start_with_grace(body: &str, env: &[(&str, &str)], grace_seconds: u64) -> RelayProc {
        RelayProc::start_full(body, env, grace_seconds, "", None)
    }

    /// As [`RelayProc::start`], with more `listen:` lines (each `  key: value\n`).
    pub fn start_with_listen(body: &str, listen_extra: &str) -> RelayProc {
        RelayProc::start_full(body, &[], 1, listen_extra, None)
    }

    /// As [`RelayProc::start`], under a file limit (`ulimit -n`, soft and hard) of
    /// `nofile`.
    pub fn start_with_file_limit(body: &str, nofile: u32) -> RelayProc {
        RelayProc::start_full(body, &[], 1, "", Some(nofile))
    }

    fn start_full(
        body: &str,
        env: &[(&str, &str)],
        grace_seconds: u64,
        listen_extra: &str,
        nofile: Option<u32>,
    ) -> RelayProc {
        let dir = temp_dir("relay");
        let port = free_port();
        let admin_port = free_port();
        // Rows to a file in the relay's directory, unless `body` says where they go.
        let rows = if body.lines().any(|l| l.starts_with("rows:")) {
            String::new()
        } else {
            format!("rows:\n  file: {{ path: {}/rows.jsonl }}\n", dir.display())
        };
        let yaml = format!(
            "server:\n  threads: 2\n  pid_file: {d}/relay.pid\n  upgrade_sock: {d}/upgrade.sock\n  grace_period_seconds: {grace_seconds}\n  graceful_shutdown_timeout_seconds: 1\n  instance: test-relay\nlisten:\n  proxy: 127.0.0.1:{port}\n  admin: 127.0.0.1:{admin_port}\n{listen_extra}{rows}{body}",
            d = dir.display()
        );
        let conf = dir.join("relay.yaml");
        std::fs::write(&conf, yaml).unwrap();
        let stderr_path = dir.join("stderr.log");
        // Under a file limit through the shell, which then becomes the relay (same pid).
        let mut cmd = match nofile {
            None => Command::new(bin()),
            Some(n) => {
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin());
                c
            }
        };
        cmd.arg("-c")
            .arg(&conf)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start relay");
        let relay = RelayProc {
            proc: Proc {
                child,
                signal: "-INT",
            },
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            dir,
            stderr_path,
        };
        relay.wait_ready();
        relay
    }

    /// Starts a second relay on the same configuration in upgrade mode (`-u`): it takes
    /// the listening sockets over when this one gets SIGQUIT.
    pub fn start_upgrade(&self) -> Proc {
        let stderr = std::fs::File::create(self.dir.join("stderr-upgrade.log")).unwrap();
        let child = Command::new(bin())
            .arg("-c")
            .arg(self.dir.join("relay.yaml"))
            .arg("-u")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start upgrading relay");
        Proc {
            child,
            signal: "-INT",
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr).is_ok() && TcpStream::connect(self.admin).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("relay did not start:\n{}", self.stderr());
    }

    /// The metrics text once it contains `line`: `logging()` runs after the response
    /// has gone out, so a client can be a moment ahead of the counters. Panics with the
    /// last text after 5 s.
    pub fn metrics_with(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = request(self.admin, "GET", "/metrics", &[], b"");
            let text = String::from_utf8(r.body).unwrap();
            if text.contains(line) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "metrics never showed `{line}`:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The rows written so far, parsed.
    pub fn rows(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("rows.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("each row is one JSON line"))
            .collect()
    }

    /// The rows once there are at least `n` (the writer flushes every 200 ms).
    pub fn rows_at_least(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = self.rows();
            if rows.len() >= n || Instant::now() > deadline {
                return rows;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The row of the request the client sent with `x-request-id: id`, once written
    /// (10 s at most).
    pub fn row_for(&self, id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self
                .rows()
                .into_iter()
                .find(|r| r["client_request_id"] == id)
            {
                return r;
            }
            assert!(Instant::now() < deadline, "no row for {id}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

pub type Headers = Vec<(String, String)>;

/// A response with the arrival time of every read of its body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Headers,
    /// The body with any chunked framing removed.
    pub body: Vec<u8>,
    /// True when the body ended properly (terminal chunk, full length, or close for
    /// close-delimited bodies).
    pub complete: bool,
    /// (arrival, decoded body length after this read).
    pub reads: Vec<(Instant, usize)>,
    pub sent_at: Instant,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Arrival time of each SSE event (blocks separated by a blank line).
    pub fn event_arrivals(&self) -> Vec<Instant> {
        let mut ends = Vec::new();
        let mut i = 0;
        while let Some(p) = find(&self.body[i..], b"\n\n") {
            i += p + 2;
            ends.push(i);
        }
        ends.iter()
            .map(|end| {
                self.reads
                    .iter()
                    .find(|(_, len)| len >= end)
                    .map(|(t, _)| *t)
                    .expect("event arrived")
            })
            .collect()
    }
}

/// Parsed headers as owned (lower-case name, value) pairs.
fn owned_headers(headers: &[httparse::Header]) -> Headers {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// For fake upstreams: reads from `s` into `buf` until a request head is whole, then
/// until the body its content-length announces is there too. The head's length and the
/// body's; `None` once the peer closes first.
pub fn read_upstream_request(s: &mut impl Read, buf: &mut Vec<u8>) -> Option<(usize, usize)> {
    let mut b = [0u8; 4096];
    let mut more = |buf: &mut Vec<u8>| match s.read(&mut b) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&b[..n]);
            true
        }
    };
    let (head, len) = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            break (i + 4, len);
        }
        if !more(buf) {
            return None;
        }
    };
    while buf.len() < head + len {
        if !more(buf) {
            return None;
        }
    }
    Some((head, len))
}

/// A relay whose one route, `openai` (prefix `/openai/v1`), goes to `upstream`, for the
/// tenant `acme` with [`TENANT_KEY`].
pub fn relay_to(upstream: SocketAddr) -> RelayProc {
    RelayProc::start(
        &format!(
            r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["http://{upstream}/v1"] }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
"#,
            h = hash(TENANT_KEY)
        ),
        &[],
    )
}

pub fn build_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: test\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends a request on a new connection and reads the whole response (30 s cap).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let sent_at = Instant::now();
    s.write_all(&build_request(method, path, headers, body))
        .unwrap();
    read_response(&mut s, sent_at, Duration::from_secs(30), usize::MAX)
}

/// Reads a response; stops after `max_events` SSE events (for tests that then hang up).
pub fn read_response(
    s: &mut TcpStream,
    sent_at: Instant,
    limit: Duration,
    max_events: usize,
) -> Response {
    let deadline = sent_at + limit;
    let mut raw: Vec<u8> = Vec::new();
    let mut buf = [0u8; 65536];
    let mut head: Option<(u16, Headers)> = None;
    let mut body = Vec::new();
    let mut reads = Vec::new();
    let mut decoder = Decoder::default();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        s.set_read_timeout(Some(deadline - now)).unwrap();
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let at = Instant::now();
        raw.extend_from_slice(&buf[..n]);
        if head.is_none() {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut slots);
            if let Ok(httparse::Status::Complete(len)) = resp.parse(&raw) {
                let headers = owned_headers(resp.headers);
                let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                decoder.chunked = h("transfer-encoding").is_some_and(|v| v.contains("chunked"));
                decoder.length = h("content-length").and_then(|v| v.parse().ok());
                head = Some((resp.code.unwrap(), headers));
                raw.drain(..len);
            } else {
                continue;
            }
        }
        decoder.feed(&mut raw, &mut body);
        reads.push((at, body.len()));
        if decoder.done || count(&body, b"\n\n") >= max_events {
            break;
        }
    }
    let (status, headers) = head.unwrap_or((0, Vec::new()));
    let complete = decoder.done || (!decoder.chunked && decoder.length.is_none() && status != 0);
    Response {
        status,
        headers,
        body,
        complete,
        reads,
        sent_at,
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

#[derive(Default)]
struct Decoder {
    chunked: bool,
    length: Option<usize>,
    done: bool,
}

impl Decoder {
    fn feed(&mut self, raw: &mut Vec<u8>, body: &mut Vec<u8>) {
        if !self.chunked {
            body.append(raw);
            if let Some(l) = self.length {
                self.done = body.len() >= l;
            }
            return;
        }
        loop {
            let Some(line_end) = find(raw, b"\r\n") else {
                return;
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&raw[..line_end])
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .trim(),
                16,
            )
            .unwrap();
            if size == 0 {
                if raw.len() >= line_end + 4 {
                    self.done = true;
                }
                return;
            }
            if raw.len() < line_end + 2 + size + 2 {
                return;
            }
            body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
            raw.drain(..line_end + 2 + size + 2);
        }
    }
}

/// The JSON body of an OpenAI chat request.
pub fn chat_body(stream: bool, include_usage: bool) -> Vec<u8> {
    let mut v = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": stream,
    });
    if include_usage {
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v.to_string().into_bytes()
}

pub fn anthropic_body(stream: bool) -> Vec<u8> {
    serde_json::json!({
        "model": "mock-claude",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hello"}],
        "stream": stream,
    })
    .to_string()
    .into_bytes()
}

/// A `redis-server` of the test's own, on a free loopback port with a temporary data
/// directory, stopped by pid. Under CI a missing server is a failure, not a skip.
pub struct RedisProc {
    pub proc: Proc,
    pub port: u16,
    pub dir: PathBuf,
}

impl RedisProc {
    pub fn start() -> RedisProc {
        RedisProc::start_on(free_port())
    }

    pub fn start_on(port: u16) -> RedisProc {
        let redis = RedisProc::spawn("redis", port, |dir| server_args(port, dir, &[]));
        redis.wait_listening();
        redis
    }

    /// `redis-server ARGS` in a new temporary directory (`args` gets it), not waited for.
    fn spawn(tag: &str, port: u16, args: impl FnOnce(&Path) -> Vec<String>) -> RedisProc {
        let dir = temp_dir(tag);
        let log = std::fs::File::create(dir.join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args(args(&dir))
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        RedisProc {
            proc: Proc {
                child,
                signal: "-TERM",
            },
            port,
            dir,
        }
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}; the end of its log:\n{}",
                self.port,
                {
                    let log =
                        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(15)..].join("\n")
                }
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// A plain server's arguments: loopback, no persistence, in `dir`, then `more`.
fn server_args(port: u16, dir: &Path, more: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
        .iter()
        .chain(&[
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
        ])
        .map(|s| s.to_string())
        .collect();
    a.push(dir.display().to_string());
    a.extend(more.iter().map(|s| s.to_string()));
    a
}

/// A Redis Cluster of `masters` masters with one replica each, on free loopback ports,
/// made with `redis-cli --cluster create`; every node is stopped by pid when dropped.
pub struct RedisClusterProc {
    pub nodes: Vec<RedisProc>,
}

impl RedisClusterProc {
    pub fn start(masters: usize) -> RedisClusterProc {
        let nodes: Vec<RedisProc> = (0..masters * 2)
            .map(|_| {
                let port = free_port();
                // The cluster bus on a port of its own, not port + 10000 (which may be
                // taken, or past 65535).
                let bus = free_port().to_string();
                RedisProc::spawn("redis-cluster", port, |dir| {
                    let cluster = [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-port",
                        &bus,
                    ];
                    let mut a = server_args(port, dir, &cluster);
                    a.extend([
                        "--cluster-config-file".into(),
                        dir.join("nodes.conf").display().to_string(),
                    ]);
                    a
                })
            })
            .collect();
        for n in &nodes {
            n.wait_listening();
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(out.status.success(), "cluster create: {out:?}");
        let cluster = RedisClusterProc { nodes };
        cluster.wait_ok(Duration::from_secs(20));
        // A replica that never synced with its master will not take over from it.
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &cluster.nodes {
            loop {
                let info = cluster.cli(n.port, &["info", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {} never synced:\n{info}",
                    n.port
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    /// `redis-cli -p PORT ARGS...`, its output.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every running node says the cluster is ok.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self
                .nodes
                .iter()
                .filter(|n| TcpStream::connect(("127.0.0.1", n.port)).is_ok())
                .all(|n| {
                    self.cli(n.port, &["cluster", "info"])
                        .contains("cluster_state:ok")
                });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster is not ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A node that accepts connections.
    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .map(|n| n.port)
            .find(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
            .expect("a live node")
    }

    /// The port of the master that serves `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        self.try_master_of(key)
            .unwrap_or_else(|| panic!("no master serves the slot of {key}"))
    }

    /// As [`RedisClusterProc::master_of`]; `None` while no healthy master serves it (a
    /// failover under way).
    pub fn try_master_of(&self, key: &str) -> Option<u16> {
        let port = self.live_port();
        let slot: u32 = self
            .cli(port, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        let nodes = self.cli(port, &["cluster", "nodes"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().any(|r| match r.split_once('-') {
                Some((a, b)) => {
                    (a.parse::<u32>().unwrap_or(u32::MAX)..=b.parse().unwrap_or(0)).contains(&slot)
                }
                None => r.parse::<u32>() == Ok(slot),
            });
            if serves {
                let addr = f[1].split('@').next().unwrap();
                return addr.rsplit(':').next().unwrap().parse().ok();
            }
        }
        None
    }

    /// The nodes' URLs, for `redis.url`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }
}

/// One Redis master, one replica and three sentinels watching it as `mymaster`, on free
/// loopback ports; every process is stopped by pid when dropped.
pub struct RedisSentinelProc {
    pub master: RedisProc,
    pub replica: RedisProc,
    pub sentinels: Vec<RedisProc>,
}

impl RedisSentinelProc {
    pub fn start() -> RedisSentinelProc {
        let master = RedisProc::start();
        let replica_port = free_port();
        let of = master.port.to_string();
        let replica = RedisProc::spawn("redis-replica", replica_port, |dir| {
            server_args(replica_port, dir, &["--replicaof", "127.0.0.1", &of])
        });
        replica.wait_listening();
        let synced = Instant::now() + Duration::from_secs(20);
        while !redis_cli(replica.port, &["info", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < synced, "the replica never synced");
            std::thread::sleep(Duration::from_millis(100));
        }
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                RedisProc::spawn("redis-sentinel", port, |dir| {
                    let conf = dir.join("sentinel.conf");
                    std::fs::write(
                        &conf,
                        format!(
                            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n",
                            dir.display(),
                            master.port
                        ),
                    )
                    .unwrap();
                    vec![conf.display().to_string(), "--sentinel".into()]
                })
            })
            .collect::<Vec<_>>();
        let ready = Instant::now() + Duration::from_secs(20);
        for s in &sentinels {
            // Each sentinel knows the master, its replica and the two other sentinels.
            while !redis_cli(s.port, &["sentinel", "master", "mymaster"])
                .lines()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w[0] == "num-other-sentinels" && w[1] == "2")
            {
                assert!(Instant::now() < ready, "sentinel {} not ready", s.port);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisSentinelProc {
            master,
            replica,
            sentinels,
        }
    }

    /// The sentinels' URLs, for `redis.sentinel.nodes`.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}/", s.port))
            .collect()
    }

    /// The master's port as the first sentinel names it now.
    pub fn master_port(&self) -> Option<u16> {
        let out = redis_cli(
            self.sentinels[0].port,
            &["sentinel", "get-master-addr-by-name", "mymaster"],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }
}

/// `redis-cli -p PORT ARGS...`, its output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli must be installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Opens a long OpenAI stream through `relay` (`chunks` events 50 ms apart) and reads
/// its first two events; the stream stays open until the returned connection drops.
pub fn open_long_stream(relay: &RelayProc, key: &str, chunks: usize) -> TcpStream {
    let auth = format!("Bearer {key}");
    let chunks = chunks.to_string();
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.write_all(&build_request(
        "POST",
        "/openai/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("x-mock-chunks", &chunks),
            ("x-mock-interval-ms", "50"),
        ],
        &chat_body(true, false),
    ))
    .unwrap();
    let first = read_response(&mut s, Instant::now(), Duration::from_secs(10), 2);
    assert_eq!(first.status, 200);
    s
}

/// Sends with `send` until it is admitted, for up to 2 s: a token reservation is
/// settled in `logging()` a moment after its answer went out, and a client can be that
/// moment ahead. Only 429 is retried; without settlement no retry would help (token
/// windows are a minute long).
pub fn admitted_after_settlement(what: &str, mut send: impl FnMut() -> Response) -> Response {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let r = send();
        if r.status != 429 {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{what} stays refused: not settled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `clickhouse-server` of its own: temporary data dir, free loopback ports. It can be
/// stopped and started again on the same ports and data ([`ClickHouseProc::stop`],
/// [`ClickHouseProc::restart`]).
pub struct ClickHouseProc {
    pub proc: Option<Proc>,
    pub http_port: u16,
    pub dir: PathBuf,
    /// A current ClickHouse (chdb-core behind tests/fixtures/chdb_http.py), not the
    /// Debian `clickhouse-server`.
    pub current: bool,
}

impl ClickHouseProc {
    pub fn start() -> ClickHouseProc {
        ClickHouseProc::start_with(free_port(), "")
    }

    /// `shards` servers that form the cluster `relay_test`, one shard each (their native
    /// ports in `remote_servers`).
    pub fn start_cluster(shards: usize) -> Vec<ClickHouseProc> {
        let ports: Vec<u16> = (0..shards).map(|_| free_port()).collect();
        let replicas: String = ports
            .iter()
            .map(|p| {
                format!("<shard><replica><host>127.0.0.1</host><port>{p}</port></replica></shard>")
            })
            .collect();
        let remote =
            format!("<remote_servers><relay_test>{replicas}</relay_test></remote_servers>");
        ports
            .iter()
            .map(|&p| ClickHouseProc::start_with(p, &remote))
            .collect()
    }

    fn start_with(tcp_port: u16, extra: &str) -> ClickHouseProc {
        let dir = temp_dir("clickhouse");
        let http_port = free_port();
        std::fs::write(
            dir.join("config.xml"),
            format!(
                r#"<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/error.log</errorlog><console>0</console></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <users_config>{d}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709</mark_cache_size>
  <max_concurrent_queries>50</max_concurrent_queries>
  {extra}
</yandex>
"#,
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("users.xml"),
            r#"<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"#,
        )
        .unwrap();
        let mut ch = ClickHouseProc {
            proc: None,
            http_port,
            dir,
            current: false,
        };
        ch.restart();
        ch
    }

    /// A current ClickHouse (26.9): chdb-core, in-process, behind a small HTTP front
    /// (tests/fixtures/chdb_http.py; scripts/test.sh installs chdb-core).
    pub fn start_current() -> ClickHouseProc {
        let mut ch = ClickHouseProc {
            proc: None,
            http_port: free_port(),
            dir: temp_dir("chdb"),
            current: true,
        };
        ch.restart();
        ch
    }

    fn spawn(&self) -> Child {
        if self.current {
            let front = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/chdb_http.py");
            return Command::new("python3")
                .arg(front)
                .arg(self.http_port.to_string())
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.dir.join("error.log")).unwrap())
                .spawn()
                .expect("python3 must be installed");
        }
        // Debian puts it in /usr/sbin, which a user's PATH may not have.
        let bin = if Path::new("/usr/sbin/clickhouse-server").exists() {
            "/usr/sbin/clickhouse-server"
        } else {
            "clickhouse-server"
        };
        Command::new(bin)
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("stderr.log"))
                    .unwrap(),
            )
            .spawn()
            .expect("clickhouse-server must be installed (scripts/test.sh installs it)")
    }

    /// Starts the server (again) and waits until it answers a query.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "already running");
        let child = self.spawn();
        self.proc = Some(Proc {
            child,
            signal: "-TERM",
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(v) = self.try_query("SELECT 1") {
                if v.trim() == "1" {
                    return;
                }
            }
            let exited = self
                .proc
                .as_mut()
                .and_then(|p| p.child.try_wait().ok().flatten());
            assert!(
                Instant::now() < deadline && exited.is_none(),
                "clickhouse-server did not answer on {} ({}); the end of its logs:\n{}",
                self.http_port,
                exited.map_or("still running".to_string(), |s| format!("exited: {s}")),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the server's logs (the temporary dir goes with the test).
    fn log_tail(&self) -> String {
        ["error.log", "server.log", "stderr.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {f}\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the server (SIGTERM, then waits for it to exit).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Runs a query; the answer's body as text (TabSeparated unless the query says).
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "POST /?output_format_json_quote_64bit_integers=0 HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
            sql.len()
        );
        s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
        s.write_all(sql.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(format!("{}: {body}", head.lines().next().unwrap_or("")));
        }
        Ok(body.to_string())
    }

    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|e| panic!("query `{sql}` failed: {e}"))
    }

    /// Each answer row as a JSON object (`FORMAT JSONEachRow`).
    pub fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.query(&format!("{sql} FORMAT JSONEachRow"))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for ClickHouseProc {
    fn drop(&mut self) {
        self.proc = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends one request of every outcome through `relay`, whose configuration has the
/// routes `openai` (the mock) and `dead` (nothing listens) and the tenants `acme`
/// ([`TENANT_KEY`]) and `small` (`sk-small`: the dead route only, one request a minute);
/// then a client that hangs up mid-stream (`row-gone`). Returns each request's id, the
/// status it got and the outcome its row must say (`row-gone`: client_disconnect).
pub fn send_every_outcome(
    relay: &RelayProc,
    user_agent: &str,
) -> Vec<(&'static str, u16, &'static str)> {
    let auth = format!("Bearer {TENANT_KEY}");
    let small = "Bearer sk-small";
    let send = |id: &str, path: &str, key: &str, body: &[u8], extra: &[(&str, &str)]| {
        let mut h: Vec<(&str, &str)> = vec![("x-request-id", id), ("user-agent", user_agent)];
        if !key.is_empty() {
            h.push(("authorization", key));
        }
        h.extend_from_slice(extra);
        request(relay.addr, "POST", path, &h, body).status
    };
    let chat = "/openai/v1/chat/completions";
    let dead = "/dead/v1/chat/completions";
    let plain = chat_body(false, false);
    let sent = vec![
        (
            "row-stream",
            send("row-stream", chat, &auth, &chat_body(true, true), &[]),
            "ok",
        ),
        ("row-json", send("row-json", chat, &auth, &plain, &[]), "ok"),
        (
            "row-401",
            send("row-401", chat, "", &plain, &[]),
            "missing_key",
        ),
        (
            "row-403",
            send("row-403", chat, small, &plain, &[]),
            "route_forbidden",
        ),
        (
            "row-404",
            send("row-404", "/nope", &auth, b"{}", &[]),
            "no_route",
        ),
        (
            "row-502",
            send("row-502", dead, small, b"{}", &[]),
            "upstream_unavailable",
        ),
        (
            "row-429",
            send("row-429", dead, small, b"{}", &[]),
            "rate_limited",
        ),
        (
            "row-500",
            send("row-500", chat, &auth, &plain, &[("x-mock-status", "500")]),
            "ok",
        ),
    ];
    let statuses: Vec<u16> = sent.iter().map(|e| e.1).collect();
    assert_eq!(statuses, [200, 200, 401, 403, 404, 502, 429, 500]);
    let mut s = TcpStream::connect(relay.addr).unwrap();
    s.write_all(&build_request(
        "POST",
        chat,
        &[
            ("authorization", &auth),
            ("x-request-id", "row-gone"),
            ("x-mock-chunks", "100"),
            ("x-mock-interval-ms", "50"),
        ],
        &chat_body(true, false),
    ))
    .unwrap();
    read_response(&mut s, Instant::now(), Duration::from_secs(10), 3);
    drop(s);
    sent
}

/// Checks that `rows` hold exactly one row for each request [`send_every_outcome`] sent,
/// with its status and outcome, this relay's instance, the user agent and the client.
pub fn assert_every_outcome_row(
    rows: &[serde_json::Value],
    expected: &[(&str, u16, &str)],
    user_agent: &str,
) {
    for &(id, status, outcome) in expected {
        let matching: Vec<_> = rows
            .iter()
            .filter(|r| r["client_request_id"] == id)
            .collect();
        assert_eq!(matching.len(), 1, "{id}");
        let r = matching[0];
        assert_eq!(r["status"], status, "{id}");
        assert_eq!(r["outcome"], outcome, "{id}");
        assert_eq!(r["instance"], "test-relay");
        assert_eq!(r["user_agent"], user_agent);
        assert!(r["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
}

/// The dashboard's panel targets' `field` (`expr`, `rawSql`), with their panel's title.
pub fn dashboard_targets(field: &str) -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../grafana/dashboards/stream-relay.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        for target in panel["targets"].as_array().unwrap() {
            if let Some(text) = target[field].as_str() {
                out.push((title.to_string(), text.to_string()));
            }
        }
    }
    out
}

/// The dashboard's ClickHouse queries, with Grafana's macros as the plugin expands them
/// for the last hour, on `database`.
pub fn dashboard_sql(database: &str) -> Vec<(String, String)> {
    dashboard_targets("rawSql")
        .into_iter()
        .map(|(title, sql)| {
            let sql = sql.replace("${database}", database).replace(
                "$__timeFilter(time)",
                "time >= now() - INTERVAL 1 HOUR AND time <= now() + INTERVAL 1 MINUTE",
            );
            assert!(!sql.contains('$'), "{title}: a macro left in {sql}");
            (title, sql)
        })
        .collect()
}

/// Whether python3 imports `modules` (`"openai, anthropic"`); under CI a missing one
/// fails the test instead (scripts/test.sh installs them).
pub fn have_python_modules(modules: &str) -> bool {
    let have = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with {modules} is required under CI"
        );
        eprintln!("SKIPPED: python3 -m pip install {modules} (scripts/test.sh does)");
    }
    have
}

/// Runs `scripts/NAME` with the relay's base URL and `keys`; panics with its output when
/// it fails. Its standard output.
pub fn run_sdk_script(name: &str, relay: &RelayProc, keys: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(format!(
            "{}/../../scripts/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg(format!("http://{}", relay.addr))
        .args(keys)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name}: {said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    said
}
