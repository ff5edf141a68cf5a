//! The embedded row sink: request rows go to a local JSON-lines file with size-based
//! rotation, when no ClickHouse is configured. The writer flushes every 200 ms and drains
//! the queue on shutdown, also a fast one (the drain runs when its task is dropped).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use log::error;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::{FlushGuard, Flushed, RowReceiver};
use crate::metrics::Metrics;
use crate::record::Row;

const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Rows taken from the queue at a time.
const BATCH: usize = 1024;

/// Where rows go, from the configuration.
#[derive(Debug, Clone)]
pub struct FileSinkConfig {
    pub path: PathBuf,
    /// Rotate when the file passes this size.
    pub max_bytes: u64,
    /// Rotated files kept (`rows.jsonl.1` is the newest).
    pub keep: usize,
}

/// The background writer.
pub struct FileSink {
    parts: Mutex<Option<(RowReceiver, FlushGuard)>>,
    config: FileSinkConfig,
    metrics: Arc<Metrics>,
}

impl FileSink {
    pub fn new(
        config: FileSinkConfig,
        rx: RowReceiver,
        metrics: Arc<Metrics>,
        flushed: &Flushed,
    ) -> FileSink {
        FileSink {
            parts: Mutex::new(Some((rx, flushed.hold()))),
            config,
            metrics,
        }
    }
}

/// An open rows file that knows its size and rotates itself.
struct RowFile {
    config: FileSinkConfig,
    out: Option<BufWriter<File>>,
    size: u64,
}

impl RowFile {
    fn open(config: FileSinkConfig) -> std::io::Result<RowFile> {
        if let Some(dir) = config.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.path)?;
        let size = file.metadata()?.len();
        Ok(RowFile {
            config,
            out: Some(BufWriter::with_capacity(64 * 1024, file)),
            size,
        })
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.size + line.len() as u64 > self.config.max_bytes && self.size > 0 {
            self.rotate()?;
        }
        self.out
            .as_mut()
            .expect("open until dropped")
            .write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.as_mut().expect("open until dropped").flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.flush()?;
        self.out = None;
        let numbered = |n: usize| rotated_path(&self.config.path, n);
        if self.config.keep == 0 {
            std::fs::remove_file(&self.config.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.config.keep));
            for n in (1..self.config.keep).rev() {
                let _ = std::fs::rename(numbered(n), numbered(n + 1));
            }
            std::fs::rename(&self.config.path, numbered(1))?;
        }
        *self = RowFile::open(self.config.clone())?;
        Ok(())
    }
}

/// Appends rows to the file once the writer has stopped (see [`super::Ending`]).
pub fn write_late(config: &FileSinkConfig, rows: &[Row], metrics: &Metrics) {
    let written = RowFile::open(config.clone()).and_then(|mut f| {
        for row in rows {
            f.write(&row.to_json_line())?;
        }
        f.flush()
    });
    match written {
        Ok(()) => metrics.rows_written("file", rows.len() as u64),
        Err(e) => {
            metrics.rows_dropped(rows.len() as u64);
            error!(
                "cannot write {} rows to {} at exit: {e}",
                rows.len(),
                config.path.display()
            );
        }
    }
}

pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Owns the queue's receiving end; whatever is still queued when it is dropped (the
/// service's task ending, also at a fast shutdown) is written before the file closes.
struct Writer {
    rx: RowReceiver,
    file: RowFile,
    metrics: Arc<Metrics>,
    /// Last field: released after `drop` has written what was left.
    _flushed: FlushGuard,
}

impl Writer {
    fn write(&mut self, row: &Row) {
        self.metrics.rows_dequeued(1);
        match self.file.write(&row.to_json_line()) {
            Ok(()) => self.metrics.rows_written("file", 1),
            Err(e) => {
                self.metrics.rows_dropped(1);
                error!(
                    "cannot write a row to {}: {e}",
                    self.file.config.path.display()
                );
            }
        }
    }

    fn drain(&mut self) {
        // Closed first: a row sent after this is kept by the sender for `Ending`.
        self.rx.close();
        while let Ok(row) = self.rx.try_recv() {
            self.write(&row);
        }
        if let Err(e) = self.file.flush() {
            error!("cannot flush {}: {e}", self.file.config.path.display());
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.drain();
    }
}

#[async_trait]
impl BackgroundService for FileSink {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some((rx, guard)) = self.parts.lock().expect("sink lock").take() else {
            return;
        };
        let file = match RowFile::open(self.config.clone()) {
            Ok(f) => f,
            Err(e) => {
                error!(
                    "cannot open the rows file {}: {e}; rows are dropped and counted",
                    self.config.path.display()
                );
                let mut rx = rx;
                while rx.recv().await.is_some() {
                    self.metrics.rows_dequeued(1);
                    self.metrics.rows_dropped(1);
                }
                return;
            }
        };
        let mut w = Writer {
            rx,
            file,
            metrics: self.metrics.clone(),
            _flushed: guard,
        };
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        let mut stopping = false;
        let mut rows = Vec::new();
        loop {
            tokio::select! {
                more = w.rx.recv_batch(&mut rows, BATCH) => {
                    for row in rows.drain(..) {
                        w.write(&row);
                    }
                    if !more {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = w.file.flush() {
                        error!("cannot flush {}: {e}", w.file.config.path.display());
                    }
                }
                // Graceful shutdown: keep writing while requests finish; the last rows
                // are drained when the runtime drops this task.
                _ = shutdown.changed(), if !stopping => stopping = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, max_bytes: u64) -> FileSinkConfig {
        FileSinkConfig {
            path: dir.join("rows.jsonl"),
            max_bytes,
            keep: 2,
        }
    }

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = std::env::temp_dir().join(format!("sr-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut f = RowFile::open(config(&dir, 100)).unwrap();
        for i in 0..10 {
            f.write(format!("{{\"n\":{i:040}}}\n").as_bytes()).unwrap();
        }
        f.flush().unwrap();
        let current = std::fs::read_to_string(dir.join("rows.jsonl")).unwrap();
        assert!(current.len() <= 100);
        assert!(rotated_path(&dir.join("rows.jsonl"), 1).exists());
        assert!(rotated_path(&dir.join("rows.jsonl"), 2).exists());
        assert!(!rotated_path(&dir.join("rows.jsonl"), 3).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
