//! The ClickHouse writer's disk spool: batches ClickHouse could not take wait here, one
//! file per batch, and are replayed oldest first. A file appears whole or not at all
//! (written beside its final name, synced, renamed), so a crash never leaves half a
//! batch. File names sort by time, then process, then sequence, so batches spooled by
//! the two processes of a graceful upgrade interleave in the order they were made.
//!
//! A file: one header line `{"batch_id": ..., "rows": N}`, then N rows as JSON lines in
//! the file sink's shape. Rows ClickHouse refuses as malformed go to `dead_letter.jsonl`
//! beside the batches, with the server's message.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, warn};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::record::Row;

const SUFFIX: &str = ".rows";
pub const DEAD_LETTER: &str = "dead_letter.jsonl";
const LOCK: &str = "replay.lock";

/// Rows that travel to ClickHouse together. The id goes into every row's `batch_id`
/// column, which is how a replay tells whether an earlier attempt got in after all.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub id: String,
    pub rows: Vec<Row>,
}

impl Batch {
    pub fn new(rows: Vec<Row>) -> Batch {
        Batch {
            id: crate::request_id::new_id(),
            rows,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    batch_id: String,
    rows: usize,
}

/// A spooled batch, named by its file.
#[derive(Debug)]
pub struct Spooled {
    pub path: PathBuf,
    pub batch: Batch,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    metrics: Arc<Metrics>,
    full_logged: bool,
    /// Held by the one process that replays (the other waits: see [`Spool::try_lock`]).
    lock: Option<File>,
    /// Batch files waiting, oldest first, and their total size. Kept in memory so a long
    /// outage's thousands of files are not listed again for every batch; the directory
    /// is read again when the queue runs dry and every [`RESCAN`] (the other process of
    /// an upgrade may add files meanwhile).
    queue: VecDeque<PathBuf>,
    bytes: u64,
    scanned_at: Option<Instant>,
}

const RESCAN: Duration = Duration::from_secs(5);

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64, metrics: Arc<Metrics>) -> std::io::Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            metrics,
            full_logged: false,
            lock: None,
            queue: VecDeque::new(),
            bytes: 0,
            scanned_at: None,
        };
        spool.rescan()?;
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Batch files in the spool now (read again from the directory).
    pub fn batches(&mut self) -> usize {
        if let Err(e) = self.rescan() {
            error!("cannot read the spool {}: {e}", self.dir.display());
        }
        self.queue.len()
    }

    /// Lists the directory: the batch files, oldest first, and their total size.
    fn rescan(&mut self) -> std::io::Result<()> {
        let mut files = Vec::new();
        let mut bytes = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(SUFFIX) {
                bytes += entry.metadata().map_or(0, |m| m.len());
                files.push(entry.path());
            }
        }
        files.sort();
        self.queue = files.into();
        self.bytes = bytes;
        self.scanned_at = Some(Instant::now());
        self.metrics.spool_bytes(bytes);
        Ok(())
    }

    fn rescan_if_due(&mut self) {
        if self.scanned_at.is_none_or(|t| t.elapsed() >= RESCAN) {
            if let Err(e) = self.rescan() {
                error!("cannot read the spool {}: {e}", self.dir.display());
            }
        }
    }

    fn set_bytes(&mut self, bytes: u64) {
        self.bytes = bytes;
        self.metrics.spool_bytes(bytes);
    }

    /// Writes a batch to disk. `false`: the spool is full or the disk refused; the rows
    /// were counted as dropped and the reason logged.
    pub fn append(&mut self, batch: &Batch) -> bool {
        self.rescan_if_due();
        let n = batch.rows.len() as u64;
        let encoded = encode(batch);
        if self.bytes + encoded.len() as u64 > self.max_bytes {
            if !self.full_logged {
                self.full_logged = true;
                error!(
                    "row spool {} is full ({} of {} bytes): new rows are dropped until ClickHouse takes the backlog (counted in stream_relay_rows_dropped_total)",
                    self.dir.display(),
                    self.bytes,
                    self.max_bytes
                );
            }
            self.metrics.rows_dropped(n);
            return false;
        }
        self.full_logged = false;
        // Unique even if the clock stepped back and a pid came round again.
        let path = loop {
            let name = format!(
                "{:013}-{:07}-{:08}{SUFFIX}",
                crate::record::unix_ms(),
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let path = self.dir.join(name);
            if !path.exists() {
                break path;
            }
        };
        match write_atomically(&path, &encoded) {
            Ok(()) => {
                self.metrics.rows_spooled(n);
                let at = self.queue.partition_point(|p| p < &path);
                self.queue.insert(at, path);
                self.set_bytes(self.bytes + encoded.len() as u64);
                true
            }
            Err(e) => {
                error!("cannot spool {n} rows to {}: {e}", path.display());
                self.metrics.rows_dropped(n);
                false
            }
        }
    }

    /// Takes the replay lock if no other process holds it. Only the holder replays, so a
    /// batch is never sent twice by the two processes of an upgrade.
    pub fn try_lock(&mut self) -> bool {
        if self.lock.is_some() {
            return true;
        }
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(LOCK))
        {
            Ok(f) => f,
            Err(e) => {
                warn!("cannot open the spool's replay lock: {e}");
                return false;
            }
        };
        if file.try_lock().is_ok() {
            // What the other process spooled before it let go.
            self.scanned_at = None;
            self.lock = Some(file);
            true
        } else {
            false
        }
    }

    pub fn has_batches(&mut self) -> bool {
        if self.queue.is_empty() {
            self.rescan_if_due();
        }
        !self.queue.is_empty()
    }

    /// The oldest spooled batch. A file that cannot be read as a batch is renamed to
    /// `*.bad` and logged (it was not written by this relay) and the next one is given.
    pub fn oldest(&mut self) -> Option<Spooled> {
        while let Some(path) = self.queue.front().cloned() {
            match decode(&path) {
                Ok(batch) => return Some(Spooled { path, batch }),
                Err(e) => {
                    self.queue.pop_front();
                    if !path.exists() {
                        // Replayed by the other process before this one took the lock.
                        continue;
                    }
                    let bad = path.with_extension("bad");
                    error!(
                        "spool file {} is not a batch ({e}); moved to {}",
                        path.display(),
                        bad.display()
                    );
                    if let Err(e) = std::fs::rename(&path, &bad) {
                        error!("cannot move {}: {e}", path.display());
                    }
                }
            }
        }
        None
    }

    /// Deletes a replayed (or dead-lettered) batch. `false` if the file stays.
    pub fn remove(&mut self, spooled: &Spooled) -> bool {
        let size = std::fs::metadata(&spooled.path).map_or(0, |m| m.len());
        match std::fs::remove_file(&spooled.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                error!("cannot remove {}: {e}", spooled.path.display());
                return false;
            }
        }
        self.queue.retain(|p| p != &spooled.path);
        self.set_bytes(self.bytes.saturating_sub(size));
        true
    }

    /// Replaces a spooled batch by its two halves, each with its own id, named so that
    /// they sort where the batch was. `false` if that could not be done (logged; the
    /// batch stays as it was).
    pub fn split(&mut self, spooled: Spooled) -> bool {
        let stem = spooled
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .unwrap_or("split")
            .to_string();
        let mut rows = spooled.batch.rows.clone();
        let second = rows.split_off(rows.len() / 2);
        let mut written = Vec::new();
        let mut added = 0;
        // The halves are already counted as spooled; they only change files.
        for (suffix, half) in [("a", rows), ("b", second)] {
            let path = self.dir.join(format!("{stem}{suffix}{SUFFIX}"));
            let encoded = encode(&Batch::new(half));
            if let Err(e) = write_atomically(&path, &encoded) {
                error!("cannot split spool file {}: {e}", spooled.path.display());
                for p in &written {
                    let _ = std::fs::remove_file(p);
                }
                return false;
            }
            added += encoded.len() as u64;
            written.push(path);
        }
        if !self.remove(&spooled) {
            for p in &written {
                let _ = std::fs::remove_file(p);
            }
            return false;
        }
        for path in written {
            let at = self.queue.partition_point(|p| p < &path);
            self.queue.insert(at, path);
        }
        self.set_bytes(self.bytes + added);
        true
    }

    /// Keeps rows ClickHouse refused aside, with the reason, in one write. `false` if
    /// that failed (logged).
    pub fn dead_letter(&mut self, rows: &[Row], reason: &str) -> bool {
        #[derive(Serialize)]
        struct Entry<'a> {
            error: &'a str,
            row: &'a Row,
        }
        let mut lines = Vec::new();
        for row in rows {
            serde_json::to_writer(&mut lines, &Entry { error: reason, row }).expect("serializes");
            lines.push(b'\n');
        }
        let path = self.dir.join(DEAD_LETTER);
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&lines)?;
                f.sync_data()
            });
        match written {
            Ok(()) => true,
            Err(e) => {
                error!("cannot write to {}: {e}", path.display());
                false
            }
        }
    }
}

fn encode(batch: &Batch) -> Vec<u8> {
    let mut out = serde_json::to_vec(&Header {
        batch_id: batch.id.clone(),
        rows: batch.rows.len(),
    })
    .expect("serializes");
    out.push(b'\n');
    for row in &batch.rows {
        out.extend_from_slice(&row.to_json_line());
    }
    out
}

/// Why a spool file is not a batch this relay wrote.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("empty")]
    Empty,
    #[error("header: {0}")]
    Header(serde_json::Error),
    #[error("row {index}: {error}")]
    Row {
        index: usize,
        error: serde_json::Error,
    },
    #[error("{rows} rows, header says {header}")]
    Count { rows: usize, header: usize },
}

fn decode(path: &Path) -> Result<Batch, DecodeError> {
    let file = File::open(path)?;
    let mut lines = BufReader::new(file).lines();
    let header = lines.next().ok_or(DecodeError::Empty)??;
    let header: Header = serde_json::from_str(&header).map_err(DecodeError::Header)?;
    let mut rows = Vec::with_capacity(header.rows);
    for line in lines {
        let line = line?;
        let row = serde_json::from_str(&line).map_err(|error| DecodeError::Row {
            index: rows.len(),
            error,
        })?;
        rows.push(row);
    }
    if rows.len() != header.rows {
        return Err(DecodeError::Count {
            rows: rows.len(),
            header: header.rows,
        });
    }
    Ok(Batch {
        id: header.batch_id,
        rows,
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = BufWriter::new(File::create(&tmp)?);
        f.write_all(bytes)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::sample_row;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sr-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn batch(n: usize) -> Batch {
        Batch::new(
            (0..n)
                .map(|i| {
                    let mut r = sample_row();
                    r.request_id = format!("r{i}");
                    r
                })
                .collect(),
        )
    }

    #[test]
    fn batches_come_back_whole_and_in_order() {
        let dir = temp("order");
        let metrics = Arc::new(Metrics::new(false));
        let mut spool = Spool::open(&dir, 1 << 20, metrics).unwrap();
        let (a, b) = (batch(3), batch(2));
        assert!(spool.append(&a) && spool.append(&b));
        let first = spool.oldest().unwrap();
        assert_eq!(first.batch, a);
        spool.remove(&first);
        let second = spool.oldest().unwrap();
        assert_eq!(second.batch, b);
        spool.remove(&second);
        assert!(spool.oldest().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_spool_refuses_and_counts() {
        let dir = temp("full");
        let metrics = Arc::new(Metrics::new(false));
        let mut spool = Spool::open(&dir, 2000, metrics.clone()).unwrap();
        let mut refused = 0;
        for _ in 0..10 {
            if !spool.append(&batch(2)) {
                refused += 1;
            }
        }
        assert!(refused > 0 && refused < 10, "{refused}");
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(
            text.contains(&format!("stream_relay_rows_dropped_total {}", refused * 2)),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_split_keeps_its_place_and_every_row() {
        let dir = temp("split");
        let metrics = Arc::new(Metrics::new(false));
        let mut spool = Spool::open(&dir, 1 << 20, metrics).unwrap();
        let (a, b) = (batch(5), batch(1));
        assert!(spool.append(&a) && spool.append(&b));
        let first = spool.oldest().unwrap();
        spool.split(first);
        let h1 = spool.oldest().unwrap();
        assert_eq!(h1.batch.rows, a.rows[..2]);
        assert_ne!(h1.batch.id, a.id);
        spool.remove(&h1);
        let h2 = spool.oldest().unwrap();
        assert_eq!(h2.batch.rows, a.rows[2..]);
        spool.remove(&h2);
        assert_eq!(spool.oldest().unwrap().batch, b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_foreign_file_is_set_aside() {
        let dir = temp("bad");
        let metrics = Arc::new(Metrics::new(false));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0000000000000-x.rows"), b"not a batch\n").unwrap();
        let mut spool = Spool::open(&dir, 1 << 20, metrics).unwrap();
        let b = batch(1);
        assert!(spool.append(&b));
        assert_eq!(spool.oldest().unwrap().batch, b);
        assert!(dir.join("0000000000000-x.bad").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
