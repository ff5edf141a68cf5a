//! Row stage (`logging` hands off, a background service writes): the one row per request
//! goes to ClickHouse when it is configured ([`clickhouse`]), otherwise to a local
//! JSON-lines file ([`file`]). The request path only puts the row in a bounded queue and
//! never waits; a full queue is counted and logged, never silent. A row wakes no other
//! thread: the writer looks at the queue every [`DRAIN_EVERY`], and is nudged only when
//! the queue is half full.

pub mod clickhouse;
pub mod file;
pub mod schema;
pub mod spool;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::warn;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::record::Row;

/// How often the writer takes what the queue holds. A wake-up of the writer's thread per
/// row cost about 5% of the relay's CPU per request (measured with perf); at this pace a
/// queue of 65,536 rows holds 10 ms of 6.5 million requests per second.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// The hand-off the proxy holds.
pub struct RowSender {
    tx: mpsc::Sender<Row>,
    /// Wakes the writer early, when the queue is half full.
    nudge: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
    full_logged: AtomicBool,
    late: Arc<Late>,
}

/// What the writer cannot see at the very end: rows sent after it stopped taking them (the
/// requests a shutdown cut, whose tasks are dropped as the runtimes stop), and how many
/// requests may still send one.
#[derive(Default)]
struct Late {
    rows: Mutex<Vec<Row>>,
    open: AtomicUsize,
    /// The queue's receiving end once the writer has let go of it: a send that had its
    /// slot before the writer closed the queue may land after the writer's last look.
    queue: Mutex<Option<mpsc::Receiver<Row>>>,
}

impl RowSender {
    /// Never waits. A row that finds the queue full is counted as dropped; one that finds
    /// the writer gone is kept for [`Ending::finish`].
    pub fn send(&self, row: Row) {
        match self.tx.try_send(row) {
            Ok(()) => {
                self.metrics.rows_queued(1);
                self.full_logged.store(false, Ordering::Relaxed);
                if self.tx.capacity() < self.tx.max_capacity() / 2 {
                    self.nudge.notify_one();
                }
            }
            Err(mpsc::error::TrySendError::Closed(row)) => {
                // Bounded like the queue, should the writer ever stop before the end.
                let mut late = self.late.rows.lock().expect("late rows lock");
                if late.len() < self.tx.max_capacity() {
                    late.push(row);
                } else {
                    self.metrics.rows_dropped(1);
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.rows_dropped(1);
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    warn!("row queue full: rows are being dropped (counted in stream_relay_rows_dropped_total)");
                }
            }
        }
    }

    /// Counts a request as open until the guard drops: at exit, [`Ending::finish`] waits
    /// for every open request's row.
    pub fn open_request(&self) -> OpenRequest {
        self.late.open.fetch_add(1, Ordering::Relaxed);
        OpenRequest(self.late.clone())
    }
}

/// A request whose row is still to come.
pub struct OpenRequest(Arc<Late>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Release);
    }
}

/// The queue between the request path and a sink: `queue` rows may wait.
pub fn channel(queue: usize, metrics: Arc<Metrics>) -> (RowSender, RowReceiver) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let late = Arc::<Late>::default();
    let nudge = Arc::new(tokio::sync::Notify::new());
    (
        RowSender {
            tx,
            nudge: nudge.clone(),
            metrics,
            full_logged: AtomicBool::new(false),
            late: late.clone(),
        },
        RowReceiver { rx, late, nudge },
    )
}

/// The writer's end of the queue. Dropped, it hands the queue to [`Ending`], which looks
/// at it once more after every request has ended.
pub struct RowReceiver {
    rx: mpsc::Receiver<Row>,
    late: Arc<Late>,
    nudge: Arc<tokio::sync::Notify>,
}

impl RowReceiver {
    /// Waits until rows are queued and moves them (at most `max`) to `out`; `false` once
    /// the queue is closed and empty. It waits on a timer, not on each send (see
    /// [`DRAIN_EVERY`]). Cancel-safe: what was taken is in `out`.
    pub async fn recv_batch(&mut self, out: &mut Vec<Row>, max: usize) -> bool {
        loop {
            while out.len() < max {
                match self.rx.try_recv() {
                    Ok(row) => out.push(row),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return !out.is_empty(),
                }
            }
            if !out.is_empty() {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(DRAIN_EVERY) => {}
                _ = self.nudge.notified() => {}
            }
        }
    }
}

impl std::ops::Deref for RowReceiver {
    type Target = mpsc::Receiver<Row>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl std::ops::DerefMut for RowReceiver {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

impl Drop for RowReceiver {
    fn drop(&mut self) {
        self.rx.close();
        let rx = std::mem::replace(&mut self.rx, mpsc::channel(1).1);
        *self.late.queue.lock().expect("late queue lock") = Some(rx);
    }
}

/// Writes rows synchronously where the sink keeps them, once its writer has stopped.
pub type WriteLate = Box<dyn FnOnce(Vec<Row>) + Send>;

/// What `main` does once the server has stopped, so that no row is lost at exit: wait
/// for the requests still open (a shutdown drops their tasks, and each sends its row as it
/// drops), wait for the writer to save what it holds, then write the rows that came after
/// the writer stopped.
pub struct Ending {
    flushed: Flushed,
    late: Arc<Late>,
    write_late: WriteLate,
    /// Run last, once every row is saved: ClickHouse's sends the spool (`shutdown_flush`).
    deliver: Option<Deliver>,
}

/// A sink's last try at exit to put its saved rows where they belong.
pub type Deliver = Box<dyn FnOnce() + Send>;

impl Ending {
    pub fn new(
        sender: &RowSender,
        flushed: Flushed,
        write_late: WriteLate,
        deliver: Option<Deliver>,
    ) -> Ending {
        Ending {
            flushed,
            late: sender.late.clone(),
            write_late,
            deliver,
        }
    }

    /// Returns what could not be waited for within `max`, if anything.
    pub fn finish(self, max: Duration) -> Result<(), FinishError> {
        let deadline = Instant::now() + max;
        let mut open = self.late.open.load(Ordering::Acquire);
        while open > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            open = self.late.open.load(Ordering::Acquire);
        }
        let saved = self
            .flushed
            .wait(deadline.saturating_duration_since(Instant::now()));
        let mut rows = std::mem::take(&mut *self.late.rows.lock().expect("late rows lock"));
        // Every request has ended, so every send has finished: what is in the queue now
        // is all that will ever be.
        if let Some(mut queue) = self.late.queue.lock().expect("late queue lock").take() {
            while let Ok(row) = queue.try_recv() {
                rows.push(row);
            }
        }
        if !rows.is_empty() {
            (self.write_late)(rows);
        }
        if let Some(deliver) = self.deliver {
            deliver();
        }
        match (open, saved) {
            (0, true) => Ok(()),
            (0, false) => Err(FinishError::WriterSlow(max)),
            (open, _) => Err(FinishError::StillOpen { open, max }),
        }
    }
}

/// What [`Ending::finish`] could not wait for.
#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    #[error("the row writer did not finish saving its rows within {0:?}")]
    WriterSlow(Duration),
    #[error(
        "{open} requests were still open {max:?} after the server stopped; their rows are lost"
    )]
    StillOpen { open: usize, max: Duration },
}

/// Lets `main` wait, once the server has stopped, until the row writer has put its last
/// rows on disk. A fast shutdown does not wait for the runtimes' tasks to be dropped, and
/// the writer saves what it holds in its `Drop`; without this the process could exit in
/// the middle of that.
#[derive(Clone, Default)]
pub struct Flushed(Arc<(Mutex<usize>, Condvar)>);

/// Held by a part of the writer until it has saved what it holds.
pub struct FlushGuard(Flushed);

impl Flushed {
    pub fn hold(&self) -> FlushGuard {
        *self.0 .0.lock().expect("flush lock") += 1;
        FlushGuard(self.clone())
    }

    /// `true` once every guard is gone; `false` after `max`.
    pub fn wait(&self, max: Duration) -> bool {
        let deadline = Instant::now() + max;
        let (lock, cv) = &*self.0;
        let mut held = lock.lock().expect("flush lock");
        while *held > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            held = cv.wait_timeout(held, left).expect("flush lock").0;
        }
        true
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        let (lock, cv) = &*self.0 .0;
        *lock.lock().expect("flush lock") -= 1;
        cv.notify_all();
    }
}
