//! Logging (every stage): the lines env_logger formats, written to stderr. The access
//! line of each request (target `access`, at info) only joins a buffer on the request
//! path; the [`Flusher`]'s thread writes the buffer out every [`FLUSH_EVERY`], so a slow
//! stderr (a log file on a disk busy with writeback) never holds a request. Every other
//! line goes out at once, after what waits, in order. A write(2) of its own per access
//! line, and the ANSI styling pass, cost about 5% of the relay's CPU per request
//! (measured with perf). Past [`MAX_PENDING`] bytes waiting, the request path writes
//! them itself: the log slows requests down rather than grow without bound.
//!
//! Access lines are put together by [`access`] in env_logger's layout (`[time LEVEL
//! target] message`), with the time's text kept for the second it names: going through
//! env_logger's formatter cost 14,000 instructions a line (callgrind), a quarter of the
//! relay's own work per request.

use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

/// The longest an access line waits.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Waiting bytes past which the request path writes them itself.
pub const MAX_PENDING: usize = 4 << 20;

/// Lines formatted and not yet written.
static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Held while lines are written, so that they go out in the order they were taken.
static WRITING: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Access lines may wait: set while the flusher runs.
static BATCHING: AtomicBool = AtomicBool::new(false);

fn lock(m: &'static Mutex<Vec<u8>>) -> MutexGuard<'static, Vec<u8>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes what waits. The waiting lines are swapped out at once; the write runs without
/// holding up the lines being added meanwhile.
pub fn flush() {
    let mut out = lock(&WRITING);
    std::mem::swap(&mut *out, &mut *lock(&PENDING));
    if out.is_empty() {
        return;
    }
    // Nothing to do with an error writing the log but to drop the lines.
    let _ = std::io::stderr().lock().write_all(&out);
    out.clear();
}

/// Where env_logger puts each formatted line.
struct Pending;

impl Write for Pending {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        lock(&PENDING).extend_from_slice(line);
        Ok(line.len())
    }

    /// The logger below decides when lines go out.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// env_logger, with the access lines batched.
struct Logger {
    inner: env_logger::Logger,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.inner.matches(record) {
            return;
        }
        self.inner.log(record);
        let access = record.target() == "access" && record.level() >= log::Level::Info;
        written(access);
    }

    fn flush(&self) {
        flush();
    }
}

/// After a line joined the waiting ones: an access line may wait for the flusher while
/// it runs and the buffer is not full; any other line goes out at once, after them.
fn written(access: bool) {
    let may_wait = access && BATCHING.load(Ordering::Relaxed);
    if !may_wait || lock(&PENDING).len() >= MAX_PENDING {
        flush();
    }
}

/// Logs one access line (target `access`, at info, unless `RUST_LOG` turns it off):
/// `fill` writes its message.
pub fn access(fill: impl FnOnce(&mut Line)) {
    if !log::log_enabled!(target: "access", log::Level::Info) {
        return;
    }
    let mut line = Line(Vec::with_capacity(384));
    line.0.push(b'[');
    line.0.extend_from_slice(&utc_second(SystemTime::now()));
    line.0.extend_from_slice(b" INFO  access] ");
    fill(&mut line);
    line.0.push(b'\n');
    lock(&PENDING).extend_from_slice(&line.0);
    written(true);
}

/// An access line being written: words and `name=value` fields, space-separated.
pub struct Line(Vec<u8>);

impl Line {
    /// The first word.
    pub fn word(&mut self, w: &str) {
        self.0.extend_from_slice(w.as_bytes());
    }

    fn name(&mut self, name: &str) {
        self.0.push(b' ');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'=');
    }

    pub fn text(&mut self, name: &str, value: &str) {
        self.name(name);
        self.0.extend_from_slice(value.as_bytes());
    }

    pub fn int(&mut self, name: &str, value: i64) {
        self.name(name);
        self.0
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// A count, `-1` when unknown.
    pub fn count(&mut self, name: &str, value: Option<u64>) {
        self.int(name, value.map_or(-1, |v| v.min(i64::MAX as u64) as i64));
    }

    /// Milliseconds with one decimal, `-1.0` when unknown.
    pub fn millis(&mut self, name: &str, value: Option<Duration>) {
        self.name(name);
        let Some(d) = value else {
            self.0.extend_from_slice(b"-1.0");
            return;
        };
        let tenths = (d.as_micros() + 50) / 100;
        let mut b = itoa::Buffer::new();
        self.0.extend_from_slice(b.format(tenths / 10).as_bytes());
        self.0.push(b'.');
        self.0.extend_from_slice(b.format(tenths % 10).as_bytes());
    }

    /// Anything else, through `Display`.
    pub fn display(&mut self, name: &str, value: impl std::fmt::Display) {
        self.name(name);
        let _ = write!(self.0, "{value}");
    }
}

thread_local! {
    /// The last second formatted on this thread, and its text.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// `2026-12-02T03:11:42Z`: the UTC second of `t`, as env_logger writes it.
fn utc_second(t: SystemTime) -> [u8; 20] {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    SECOND.with(|c| {
        let (cached, text) = c.get();
        if cached == secs {
            return text;
        }
        let text = format_utc(secs);
        c.set((secs, text));
        text
    })
}

fn format_utc(secs: u64) -> [u8; 20] {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let mut out = [0u8; 20];
    let mut w = &mut out[..];
    let _ = write!(
        w,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    out
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Installs the logger: `RUST_LOG` filters as env_logger reads it (default `info`).
pub fn init() {
    let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(Pending)))
        .build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Logger { inner })).is_ok() {
        log::set_max_level(max);
    }
    // A panic's message follows the lines logged before it.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        report(info);
    }));
}

/// Writes waiting access lines every [`FLUSH_EVERY`] while the server runs; when it
/// stops, every line goes out at once again.
pub struct Flusher;

/// Ends the batching when the flusher's task is dropped with its runtime.
struct Batching;

impl Drop for Batching {
    fn drop(&mut self) {
        BATCHING.store(false, Ordering::Relaxed);
        flush();
    }
}

#[async_trait]
impl BackgroundService for Flusher {
    async fn start(&self, _shutdown: ShutdownWatch) {
        // It keeps flushing through a graceful shutdown, while requests finish.
        BATCHING.store(true, Ordering::Relaxed);
        let _batching = Batching;
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tick.tick().await;
            flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_written_as_env_logger_writes_them() {
        let at = |s: u64| String::from_utf8(format_utc(s).to_vec()).unwrap();
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_182_302), "2026-12-02T03:31:42Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
        let now = SystemTime::now();
        assert_eq!(utc_second(now), utc_second(now));
    }

    #[test]
    fn fields_are_written_as_before() {
        let mut l = Line(Vec::new());
        l.word("rid");
        l.text("tenant", "acme");
        l.count("tokens_in", Some(12));
        l.count("tokens_out", None);
        l.millis("ttfb_ms", Some(Duration::from_micros(146_249)));
        l.millis("ttft_ms", Some(Duration::from_micros(2_960)));
        l.millis("gap_ms", None);
        l.display("cost_usd", format_args!("{:.8}", 0.000123));
        assert_eq!(
            String::from_utf8(l.0).unwrap(),
            "rid tenant=acme tokens_in=12 tokens_out=-1 ttfb_ms=146.2 ttft_ms=3.0 gap_ms=-1.0 cost_usd=0.00012300"
        );
    }
}
