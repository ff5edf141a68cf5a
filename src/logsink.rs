//! Logging (every stage): the lines env_logger formats, written to stderr. The access
//! line of each request (target `access`, at info) only joins a buffer on the request
//! path; the [`Flusher`]'s thread writes the buffer out every [`FLUSH_EVERY`], so a slow
//! stderr (a log file on a disk busy with writeback) never holds a request. Every other
//! line goes out at once, after what waits, in order. A write(2) of its own per access
//! line, and the ANSI styling pass, cost about 5% of the relay's CPU per request
//! (measured with perf). Past [`MAX_PENDING`] bytes waiting, the request path writes
//! them itself: the log slows requests down rather than grow without bound.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

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
        let may_wait = record.target() == "access"
            && record.level() >= log::Level::Info
            && BATCHING.load(Ordering::Relaxed);
        if !may_wait || lock(&PENDING).len() >= MAX_PENDING {
            flush();
        }
    }

    fn flush(&self) {
        flush();
    }
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
