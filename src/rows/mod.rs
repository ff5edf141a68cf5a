//! Row stage (`logging` hands off, a background service writes): the one row per request
//! goes to ClickHouse when it is configured ([`clickhouse`]), otherwise to a local
//! JSON-lines file ([`file`]). The request path only puts the row in a bounded queue and
//! never waits; a full queue is counted and logged, never silent.

pub mod clickhouse;
pub mod file;
pub mod schema;
pub mod spool;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::warn;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::record::Row;

/// The hand-off the proxy holds.
pub struct RowSender {
    tx: mpsc::Sender<Row>,
    metrics: Arc<Metrics>,
    full_logged: AtomicBool,
}

impl RowSender {
    /// Never waits. A row that finds the queue full is counted as dropped.
    pub fn send(&self, row: Row) {
        match self.tx.try_send(row) {
            Ok(()) => {
                self.metrics.rows_queued(1);
                self.full_logged.store(false, Ordering::Relaxed);
            }
            Err(_) => {
                self.metrics.rows_dropped(1);
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    warn!("row queue full: rows are being dropped (counted in stream_relay_rows_dropped_total)");
                }
            }
        }
    }
}

/// The queue between the request path and a sink: `queue` rows may wait.
pub fn channel(queue: usize, metrics: Arc<Metrics>) -> (RowSender, mpsc::Receiver<Row>) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    (
        RowSender {
            tx,
            metrics,
            full_logged: AtomicBool::new(false),
        },
        rx,
    )
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
