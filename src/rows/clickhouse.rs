//! The ClickHouse row sink: two tasks on the row writer's own runtime.
//!
//! The batcher takes rows from the request path's queue and cuts batches by count, bytes
//! or age. The shipper writes each batch with one `INSERT ... FORMAT RowBinary` (the
//! `clickhouse` crate, validation off, which 18.16 needs). A batch ClickHouse cannot take
//! (down, slow, a server error) goes to the disk spool and is replayed oldest first once
//! ClickHouse answers; while it is down, batches go straight to the spool and a probe runs
//! every `retry_interval`. A batch keeps its id from first attempt to replay and every row
//! carries it (`batch_id`), so a replay first asks whether an attempt that timed out got
//! in after all: a row is never written twice. A batch refused as malformed is split in
//! halves until the refused rows stand alone; those go to the dead letter file.
//!
//! Nothing in memory is lost at exit: the batcher and the shipper spool what they hold
//! when the runtime drops them (also on a fast shutdown), and the next relay replays it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clickhouse::Client;
use log::{error, info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Serialize;
use tokio::sync::mpsc;

use super::schema::{self, Cluster, Layout};
use super::spool::{Batch, Spool, Spooled};
use super::{FlushGuard, Flushed, RowReceiver};
use crate::metrics::Metrics;
use crate::record::Row;

/// Validated `rows.clickhouse` settings.
#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    /// `http://host:8123`: one, or a cluster's nodes.
    pub urls: Vec<String>,
    /// A `Distributed` table over local ones, when set.
    pub cluster: Option<Cluster>,
    /// The layout asked for; `None`: from the server's version.
    pub layout: Option<Layout>,
    /// Retention TTL of the current layout, set when the table is made.
    pub ttl_days: Option<u32>,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<crate::secret::Secret>,
    pub batch_rows: usize,
    pub batch_bytes: usize,
    pub batch_interval: Duration,
    /// Longest wait for one ClickHouse request.
    pub timeout: Duration,
    /// Pause between probes while ClickHouse is down.
    pub retry_interval: Duration,
    pub spool_dir: std::path::PathBuf,
    pub spool_max_bytes: u64,
    /// Rows that may wait for the writer.
    pub queue: usize,
    /// Sent with every insert (for example `async_insert`, on servers that know it).
    pub settings: Vec<(String, String)>,
    /// At exit, the longest time spent sending the spool to ClickHouse (zero: none).
    pub shutdown_flush: Duration,
}

/// A row as the table takes it. Column names come from the field names.
#[derive(clickhouse::Row, Serialize)]
struct ChRow<'a> {
    time: Time,
    time_ms: u64,
    request_id: &'a str,
    batch_id: &'a str,
    instance: &'a str,
    tenant: Option<&'a str>,
    route: Option<&'a str>,
    provider: Option<&'a str>,
    model: Option<&'a str>,
    stream: u8,
    status: u16,
    upstream_status: Option<u16>,
    outcome: &'a str,
    error: Option<&'a str>,
    attempts: u32,
    ttfb_ms: Option<f64>,
    ttft_ms: Option<f64>,
    ttfa_ms: Option<f64>,
    max_gap_ms: Option<f64>,
    duration_ms: f64,
    tokens_in: Option<u64>,
    tokens_out: Option<u64>,
    tokens_cached: Option<u64>,
    tokens_reasoning: Option<u64>,
    cost_usd: Option<f64>,
    request_bytes: u64,
    response_bytes: u64,
    finish_reason: Option<&'a str>,
    client_addr: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_body: Option<&'a str>,
    response_body: Option<&'a str>,
    client_request_id: Option<&'a str>,
    usage_unknown: u8,
    frames_from_client: Option<u64>,
    frames_from_server: Option<u64>,
    budget: Option<&'a str>,
    budget_decision: Option<&'a str>,
    budget_reserved_usd: Option<f64>,
    budget_settled_usd: Option<f64>,
    cache: Option<&'a str>,
    cache_saved_usd: Option<f64>,
}

impl<'a> ChRow<'a> {
    fn new(r: &'a Row, batch_id: &'a str, layout: Layout) -> ChRow<'a> {
        ChRow {
            time: Time::new(r.time_ms, layout),
            time_ms: r.time_ms,
            request_id: &r.request_id,
            batch_id,
            instance: &r.instance,
            tenant: r.tenant.as_deref(),
            route: r.route.as_deref(),
            provider: r.provider.as_deref(),
            model: r.model.as_deref(),
            stream: u8::from(r.stream),
            status: r.status,
            upstream_status: r.upstream_status,
            outcome: &r.outcome,
            error: r.error.as_deref(),
            attempts: r.attempts,
            ttfb_ms: r.ttfb_ms,
            ttft_ms: r.ttft_ms,
            ttfa_ms: r.ttfa_ms,
            max_gap_ms: r.max_gap_ms,
            duration_ms: r.duration_ms,
            tokens_in: r.tokens_in,
            tokens_out: r.tokens_out,
            tokens_cached: r.tokens_cached,
            tokens_reasoning: r.tokens_reasoning,
            cost_usd: r.cost_usd,
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
            finish_reason: r.finish_reason.as_deref(),
            client_addr: r.client_addr.as_deref(),
            user_agent: r.user_agent.as_deref(),
            request_body: r.request_body.as_deref(),
            response_body: r.response_body.as_deref(),
            client_request_id: r.client_request_id.as_deref(),
            usage_unknown: u8::from(r.usage_unknown),
            frames_from_client: r.frames_from_client,
            frames_from_server: r.frames_from_server,
            budget: r.budget.as_deref(),
            budget_decision: r.budget_decision.as_deref(),
            budget_reserved_usd: r.budget_reserved_usd,
            budget_settled_usd: r.budget_settled_usd,
            cache: r.cache.as_deref(),
            cache_saved_usd: r.cache_saved_usd,
        }
    }
}

/// The `time` column: `DateTime` (seconds, UInt32 in RowBinary) in the legacy layout,
/// `DateTime64(3)` (milliseconds, Int64) in the current one.
enum Time {
    Seconds(u32),
    Millis(i64),
}

impl Time {
    fn new(time_ms: u64, layout: Layout) -> Time {
        match layout {
            Layout::Legacy => Time::Seconds((time_ms / 1000) as u32),
            Layout::Current => Time::Millis(time_ms as i64),
        }
    }
}

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Time::Seconds(t) => s.serialize_u32(*t),
            Time::Millis(t) => s.serialize_i64(*t),
        }
    }
}

/// Why a ClickHouse request failed, and so what happens to its rows.
#[derive(Debug, PartialEq)]
enum Failure {
    /// No answer, or an answer saying "not now" (network, timeout, overload, the same
    /// batch still being written): spool and retry.
    Unavailable(String),
    /// The server answered with another error (a missing table, a setting it does not
    /// know, a memory limit): spool and retry, but not forever (see `MAX_REFUSALS`).
    Refused(String),
    /// The server refused the rows themselves: retrying cannot help.
    Malformed(String),
    /// The node answered, but a server behind it (another shard of a `Distributed`
    /// table) did not: the node stays in use, the rows wait in the spool.
    Elsewhere(String),
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::Unavailable(m)
            | Failure::Refused(m)
            | Failure::Malformed(m)
            | Failure::Elsewhere(m) => m,
        }
    }
}

/// Server error codes that refuse the data rather than the moment: parse and type errors,
/// and `throwIf` / constraint checks an operator put on the table.
const MALFORMED_CODES: &[u32] = &[
    6, 26, 27, 32, 33, 38, 41, 53, 69, 70, 72, 117, 131, 395, 469,
];
/// The table or database is missing: run the migrations again before the next write.
const MISSING_CODES: &[u32] = &[60, 81];
/// Passing trouble: timeouts, too many parts or queries, the same query id (batch) still
/// running, a replica or the server shutting down.
const TRANSIENT_CODES: &[u32] = &[159, 160, 202, 216, 241, 242, 252, 425];
/// The answering node could not reach another server: socket timeout, network error,
/// all connection tries failed (a shard of a `Distributed` table is down).
const ELSEWHERE_CODES: &[u32] = &[209, 210, 279];

/// The `Code: N` of a server error message.
fn server_code(message: &str) -> Option<u32> {
    let at = message.find("Code: ")? + "Code: ".len();
    let digits: String = message[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn classify(e: &clickhouse::error::Error) -> Failure {
    let text = e.to_string();
    match e {
        clickhouse::error::Error::BadResponse(m) => match server_code(m) {
            Some(c) if MALFORMED_CODES.contains(&c) => Failure::Malformed(text),
            Some(c) if TRANSIENT_CODES.contains(&c) => Failure::Unavailable(text),
            Some(c) if ELSEWHERE_CODES.contains(&c) => Failure::Elsewhere(text),
            Some(_) => Failure::Refused(text),
            None => Failure::Unavailable(text),
        },
        _ => Failure::Unavailable(text),
    }
}

fn is_missing_table(f: &Failure) -> bool {
    server_code(f.message()).is_some_and(|c| MISSING_CODES.contains(&c))
}

/// The background service: owns the queue's receiving end until it starts.
pub struct ClickHouseSink {
    /// The queue's receiving end and the exit guards, taken when the service starts.
    parts: Mutex<Option<(RowReceiver, FlushGuard, FlushGuard)>>,
    config: ClickHouseConfig,
    metrics: Arc<Metrics>,
}

impl ClickHouseSink {
    pub fn new(
        config: ClickHouseConfig,
        rx: RowReceiver,
        metrics: Arc<Metrics>,
        flushed: &Flushed,
    ) -> ClickHouseSink {
        ClickHouseSink {
            parts: Mutex::new(Some((rx, flushed.hold(), flushed.hold()))),
            config,
            metrics,
        }
    }
}

fn client(config: &ClickHouseConfig, url: &str) -> Client {
    let mut c = Client::default().with_url(url).with_validation(false);
    if let Some(user) = &config.user {
        c = c.with_user(user);
    }
    if let Some(password) = &config.password {
        c = c.with_password(password.expose());
    }
    c
}

#[async_trait]
impl BackgroundService for ClickHouseSink {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some((rx, batcher_guard, shipper_guard)) = self.parts.lock().expect("sink lock").take()
        else {
            return;
        };
        let spool = match Spool::open(
            &self.config.spool_dir,
            self.config.spool_max_bytes,
            self.metrics.clone(),
        ) {
            Ok(s) => Some(s),
            Err(e) => {
                error!(
                    "cannot open the row spool {}: {e}; rows ClickHouse cannot take now are dropped (counted)",
                    self.config.spool_dir.display()
                );
                None
            }
        };
        let spool = Arc::new(Mutex::new(spool));
        // Room for a few batches: beyond that the shipper is behind and batches go to disk.
        let (batch_tx, batch_rx) = mpsc::channel(4);
        let mut shipper = Shipper::new(
            &self.config,
            spool.clone(),
            self.metrics.clone(),
            batch_rx,
            shipper_guard,
        );
        self.metrics.clickhouse_up(false);
        tokio::spawn(async move { shipper.run().await });

        let mut batcher = Batcher {
            rx,
            rows: Vec::new(),
            bytes: 0,
            started: Instant::now(),
            out: batch_tx,
            spool,
            metrics: self.metrics.clone(),
            config: self.config.clone(),
            _flushed: batcher_guard,
        };
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut stopping = false;
        let mut rows = Vec::new();
        loop {
            tokio::select! {
                more = batcher.rx.recv_batch(&mut rows, 1024) => {
                    for row in rows.drain(..) {
                        batcher.push(row);
                    }
                    if !more {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if !batcher.rows.is_empty()
                        && batcher.started.elapsed() >= batcher.config.batch_interval
                    {
                        batcher.ship();
                    }
                }
                // Graceful shutdown: keep writing while requests finish; what is left is
                // spooled when the runtime drops the tasks.
                _ = shutdown.changed(), if !stopping => stopping = true,
            }
        }
    }
}

/// What [`drain_spool`] did.
#[derive(Debug, Default)]
pub struct Drained {
    /// Spooled batches sent (or found already in ClickHouse) and removed, and their rows.
    pub batches: u64,
    pub rows: u64,
    /// Batches still in the spool.
    pub left: usize,
    /// Why it stopped with batches left: ClickHouse failed, the time ran out, or another
    /// relay holds the spool.
    pub stopped: Option<String>,
}

/// Sends the spool to ClickHouse, oldest batch first and never a row twice (a batch's id
/// is looked up before it is sent), until the spool is empty, ClickHouse fails, or
/// `within` has passed: at exit (after the server stopped, so the rows a stopping relay
/// spooled leave with it) and for `stream-relay rows replay`. Blocks; runs its own
/// runtime.
pub fn drain_spool(config: &ClickHouseConfig, metrics: Arc<Metrics>, within: Duration) -> Drained {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            return Drained {
                stopped: Some(format!("cannot start a runtime: {e}")),
                ..Drained::default()
            }
        }
    };
    runtime.block_on(async {
        let spool = match Spool::open(&config.spool_dir, config.spool_max_bytes, metrics.clone()) {
            Ok(s) => s,
            Err(e) => {
                return Drained {
                    stopped: Some(format!(
                        "cannot open the spool {}: {e}",
                        config.spool_dir.display()
                    )),
                    ..Drained::default()
                }
            }
        };
        let mut shipper = Shipper::new(
            config,
            Arc::new(Mutex::new(Some(spool))),
            metrics,
            mpsc::channel(1).1,
            super::Flushed::default().hold(),
        );
        let mut drained = Drained::default();
        let run = shipper.drain(&mut drained);
        if tokio::time::timeout(within, run).await.is_err() {
            drained.stopped = Some(format!("not done within {within:?}"));
        }
        drained.rows = shipper.replayed_rows;
        drained.left = lock(&shipper.spool).as_mut().map_or(0, Spool::batches);
        drained
    })
}

/// At exit: the spool (with what the writer saved as it stopped) to ClickHouse, within
/// `shutdown_flush`; what is left waits for the next relay or `rows replay`.
pub fn deliver_at_exit(config: &ClickHouseConfig, metrics: Arc<Metrics>) {
    if config.shutdown_flush.is_zero() {
        return;
    }
    let d = drain_spool(config, metrics, config.shutdown_flush);
    match (&d.stopped, d.left) {
        (_, 0) if d.batches > 0 => info!("at exit: {} spooled rows written to ClickHouse", d.rows),
        (_, 0) => {}
        (Some(why), left) => warn!(
            "at exit: {} spooled rows written to ClickHouse, {left} batches left in {} ({why}); the next relay on it or `stream-relay rows replay` sends them",
            d.rows,
            config.spool_dir.display()
        ),
        (None, left) => warn!("at exit: {left} batches left in {}", config.spool_dir.display()),
    }
}

/// Spools rows once the writer has stopped (see [`super::Ending`]); the next relay on
/// this spool directory writes them to ClickHouse.
pub fn write_late(config: &ClickHouseConfig, rows: Vec<Row>, metrics: Arc<Metrics>) {
    let n = rows.len() as u64;
    match Spool::open(&config.spool_dir, config.spool_max_bytes, metrics.clone()) {
        Ok(mut spool) => {
            spool.append(&Batch::new(rows));
        }
        Err(e) => {
            metrics.rows_dropped(n);
            error!(
                "cannot open the row spool {} at exit: {e}; {n} rows dropped",
                config.spool_dir.display()
            );
        }
    }
}

fn spool_batch(spool: &Mutex<Option<Spool>>, metrics: &Metrics, batch: &Batch) {
    match lock(spool).as_mut() {
        Some(s) => {
            s.append(batch);
        }
        None => metrics.rows_dropped(batch.rows.len() as u64),
    }
}

struct Batcher {
    rx: RowReceiver,
    rows: Vec<Row>,
    bytes: usize,
    started: Instant,
    out: mpsc::Sender<Batch>,
    spool: Arc<Mutex<Option<Spool>>>,
    metrics: Arc<Metrics>,
    config: ClickHouseConfig,
    /// Last field: released after `drop` has spooled what was left.
    _flushed: FlushGuard,
}

impl Batcher {
    fn push(&mut self, row: Row) {
        self.metrics.rows_dequeued(1);
        if self.rows.is_empty() {
            self.started = Instant::now();
        }
        self.bytes += row.approx_bytes();
        self.rows.push(row);
        if self.rows.len() >= self.config.batch_rows || self.bytes >= self.config.batch_bytes {
            self.ship();
        }
    }

    fn ship(&mut self) {
        let batch = Batch::new(std::mem::take(&mut self.rows));
        self.bytes = 0;
        if let Err(e) = self.out.try_send(batch) {
            // The shipper is behind (or gone): the batch waits on disk instead.
            let batch = match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
            };
            spool_batch(&self.spool, &self.metrics, &batch);
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        // Closed first: a row sent after this is kept by the sender for `Ending`, never
        // left unseen in the queue.
        self.rx.close();
        while let Ok(row) = self.rx.try_recv() {
            self.metrics.rows_dequeued(1);
            self.rows.push(row);
        }
        if !self.rows.is_empty() {
            let batch = Batch::new(std::mem::take(&mut self.rows));
            spool_batch(&self.spool, &self.metrics, &batch);
        }
    }
}

/// One server of `rows.clickhouse.url`.
struct Node {
    url: String,
    /// No default database: it may not exist yet.
    admin: Client,
    client: Client,
    /// The table's layout, once the migrations ran on this node.
    layout: Option<Layout>,
    /// After a failure, skipped until then.
    down_until: Option<Instant>,
    /// Failed since it last took a batch (logged once).
    failing: bool,
}

impl Node {
    fn usable(&self, now: Instant) -> bool {
        self.down_until.is_none_or(|t| now >= t)
    }
}

struct Shipper {
    /// Tried in turn, a batch each; a node that fails is skipped for `retry_interval`.
    nodes: Vec<Node>,
    /// The node the next request goes to.
    at: usize,
    config: ClickHouseConfig,
    rx: mpsc::Receiver<Batch>,
    spool: Arc<Mutex<Option<Spool>>>,
    metrics: Arc<Metrics>,
    /// The batch being delivered, spooled if the task is dropped meanwhile.
    in_flight: Option<Batch>,
    /// Some node answers.
    up: bool,
    /// `up` has been logged once.
    told: bool,
    /// A shard behind the nodes is unreachable (logged once until a batch gets in).
    shard_down: bool,
    /// While down: when the next probe may run.
    next_try: Instant,
    /// When the spool may be tried again after a step that made no progress.
    replay_after: Instant,
    /// Server-answered failures of the oldest spooled batch, by file.
    refusals: Option<(std::path::PathBuf, u32)>,
    /// Rows of the spooled batches replayed (or found already written).
    replayed_rows: u64,
    /// Last field: released after `drop` has spooled what was left.
    _flushed: FlushGuard,
}

/// A spooled batch the server keeps refusing (without calling it malformed) is treated
/// as malformed after this many tries, so one batch cannot hold the spool up forever.
const MAX_REFUSALS: u32 = 10;

/// What became of a replay step.
enum Replay {
    Done,
    /// Nothing more now: ClickHouse is down, or the step made no progress (backed off).
    Stop,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shipper {
    fn new(
        config: &ClickHouseConfig,
        spool: Arc<Mutex<Option<Spool>>>,
        metrics: Arc<Metrics>,
        rx: mpsc::Receiver<Batch>,
        flushed: FlushGuard,
    ) -> Shipper {
        let nodes = config
            .urls
            .iter()
            .map(|url| Node {
                url: url.clone(),
                admin: client(config, url),
                client: client(config, url).with_database(&config.database),
                layout: None,
                down_until: None,
                failing: false,
            })
            .collect();
        Shipper {
            nodes,
            at: 0,
            config: config.clone(),
            rx,
            spool,
            metrics,
            in_flight: None,
            up: false,
            told: false,
            shard_down: false,
            next_try: Instant::now(),
            replay_after: Instant::now(),
            refusals: None,
            replayed_rows: 0,
            _flushed: flushed,
        }
    }

    async fn run(&mut self) {
        // The tables at once, and an honest `clickhouse_up` before the first batch.
        self.migrate_every_node().await;
        if self.ensure_migrated().await {
            self.set_up(true, None);
        }
        loop {
            let spool_due =
                self.may_try() && Instant::now() >= self.replay_after && self.has_spool_work();
            if spool_due
                && self.ensure_migrated().await
                && matches!(self.replay_oldest().await, Replay::Done)
            {
                // Take new batches between replayed ones so none waits long.
                if let Ok(batch) = self.rx.try_recv() {
                    self.deliver(batch).await;
                }
                continue;
            }
            // Down with the probe due but nothing to probe with: the next batch probes.
            let wait = if self.may_try() {
                self.config.retry_interval
            } else {
                self.next_try.saturating_duration_since(Instant::now())
            };
            tokio::select! {
                batch = self.rx.recv() => match batch {
                    Some(batch) => self.deliver(batch).await,
                    None => return,
                },
                _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
            }
        }
    }

    /// Replays the whole spool (see [`drain_spool`]).
    async fn drain(&mut self, drained: &mut Drained) {
        let locked = lock(&self.spool).as_mut().is_some_and(Spool::try_lock);
        if !locked {
            drained.stopped = Some("another relay is replaying this spool".into());
            return;
        }
        while self.has_spool_work() {
            if !self.ensure_migrated().await {
                drained.stopped = Some("ClickHouse did not answer".into());
                return;
            }
            match self.replay_oldest().await {
                Replay::Done => drained.batches += 1,
                Replay::Stop => {
                    drained.stopped = Some("ClickHouse did not take a batch".into());
                    return;
                }
            }
        }
    }

    /// Up, or down with its probe due.
    fn may_try(&self) -> bool {
        self.up || Instant::now() >= self.next_try
    }

    fn set_up(&mut self, up: bool, why: Option<&str>) {
        // The first state is told too: a relay that starts with ClickHouse down says so.
        if up != self.up || !self.told {
            self.told = true;
            match why {
                Some(why) => warn!("ClickHouse is unavailable, rows go to the spool: {why}"),
                None => info!("ClickHouse answers: writing rows and replaying the spool"),
            }
        }
        self.up = up;
        self.metrics.clickhouse_up(up);
        if !up {
            self.next_try = Instant::now() + self.config.retry_interval;
        }
    }

    fn node(&self) -> &Node {
        &self.nodes[self.at]
    }

    /// The first usable node after the current one (the current one last), if any.
    fn next_usable(&self) -> Option<usize> {
        let now = Instant::now();
        let n = self.nodes.len();
        (1..=n)
            .map(|k| (self.at + k) % n)
            .find(|&i| self.nodes[i].usable(now))
    }

    /// After a batch got in: the next one goes to the next node.
    fn rotate(&mut self) {
        let node = &mut self.nodes[self.at];
        if std::mem::take(&mut node.failing) && self.config.urls.len() > 1 {
            info!("ClickHouse node {} takes rows again", node.url);
        }
        if let Some(i) = self.next_usable() {
            self.at = i;
        }
    }

    /// The current node failed: skip it for a while; with no other node to turn to,
    /// ClickHouse is down.
    fn node_failed(&mut self, why: &str) {
        let failed = self.at;
        self.nodes[failed].down_until = Some(Instant::now() + self.config.retry_interval);
        let first = !std::mem::replace(&mut self.nodes[failed].failing, true);
        match self.next_usable() {
            Some(i) if i != failed => {
                if first {
                    warn!(
                        "ClickHouse node {} failed ({why}); the other nodes take the rows until it answers",
                        self.nodes[failed].url
                    );
                }
                self.at = i;
            }
            _ => self.set_up(false, Some(why)),
        }
    }

    fn unavailable(&mut self, failure: &Failure) {
        if is_missing_table(failure) {
            self.nodes[self.at].layout = None;
        }
        self.metrics.clickhouse_failure("unavailable");
        self.node_failed(failure.message());
    }

    /// A shard behind the node did not answer: the node stays, the rows wait.
    fn shard_unavailable(&mut self, failure: &Failure) {
        self.metrics.clickhouse_failure("shard_unavailable");
        if !self.shard_down {
            warn!(
                "ClickHouse node {} cannot reach a shard; rows it cannot take wait in the spool: {}",
                self.node().url,
                failure.message()
            );
            self.shard_down = true;
        }
    }

    /// The spool made no progress this step: leave it for a while.
    fn back_off(&mut self) {
        self.replay_after = Instant::now() + self.config.retry_interval;
    }

    /// The migrations on the node in use, once per node; a node that fails them is
    /// skipped for the next. False when no node could run them.
    async fn ensure_migrated(&mut self) -> bool {
        for _ in 0..self.nodes.len() {
            if !self.node().usable(Instant::now()) {
                match self.next_usable() {
                    Some(i) => self.at = i,
                    None => return false,
                }
            }
            if self.node().layout.is_some() {
                return true;
            }
            match self.migrate_current().await {
                Ok(()) => return true,
                Err(why) => {
                    self.metrics.clickhouse_failure("migration");
                    self.node_failed(&why);
                }
            }
            if !self.up && self.next_usable().is_none() {
                return false;
            }
        }
        false
    }

    /// At start, every node given is migrated, not only the first one used: in a
    /// cluster the `Distributed` table writes each shard's rows into that shard's local
    /// table, whichever node took the batch, so a node no batch has reached yet needs
    /// its table too. A node that fails is skipped as after a failed batch, and
    /// migrated when it is next used.
    async fn migrate_every_node(&mut self) {
        for i in 0..self.nodes.len() {
            self.at = i;
            if let Err(why) = self.migrate_current().await {
                self.metrics.clickhouse_failure("migration");
                self.node_failed(&why);
            }
        }
        self.at = self.next_usable().unwrap_or(0);
    }

    /// Runs the migrations on the node in use and records its layout.
    async fn migrate_current(&mut self) -> Result<(), String> {
        let target = schema::Target {
            database: &self.config.database,
            layout: self.config.layout,
            cluster: self.config.cluster.as_ref(),
            ttl_days: self.config.ttl_days,
        };
        let run = schema::migrate(&self.node().admin, &target);
        match tokio::time::timeout(self.config.timeout, run).await {
            Ok(Ok(m)) => {
                if !m.applied.is_empty() {
                    info!(
                        "ClickHouse migrations applied to `{}` on {} (ClickHouse {}, {} layout): {:?}",
                        self.config.database,
                        self.node().url,
                        m.server_version,
                        m.layout.name(),
                        m.applied
                    );
                }
                self.nodes[self.at].layout = Some(m.layout);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("migrations: {e}")),
            Err(_) => Err("migrations: timed out".to_string()),
        }
    }

    fn has_spool_work(&mut self) -> bool {
        match lock(&self.spool).as_mut() {
            Some(spool) => spool.try_lock() && spool.has_batches(),
            None => false,
        }
    }

    /// A new batch: to ClickHouse when it is up, to the spool otherwise.
    async fn deliver(&mut self, batch: Batch) {
        // Held where the drop at shutdown finds it, from here until it is written or
        // spooled.
        self.in_flight = Some(batch);
        let ready = self.may_try() && self.ensure_migrated().await;
        let result = if ready {
            let batch = self.in_flight.as_ref().expect("just set");
            Some(self.insert(batch).await)
        } else {
            None
        };
        let batch = self.in_flight.take().expect("still set");
        match result {
            None => spool_batch(&self.spool, &self.metrics, &batch),
            Some(Ok(())) => {
                self.metrics
                    .rows_written("clickhouse", batch.rows.len() as u64);
                self.set_up(true, None);
                self.rotate();
            }
            Some(Err(failure)) => {
                match &failure {
                    // The spool's replay bisects it and keeps the bad rows aside.
                    Failure::Malformed(m) => {
                        self.metrics.clickhouse_failure("malformed");
                        warn!(
                            "ClickHouse refused a batch of {} rows: {m}",
                            batch.rows.len()
                        );
                        self.set_up(true, None);
                    }
                    Failure::Elsewhere(_) => self.shard_unavailable(&failure),
                    _ => self.unavailable(&failure),
                }
                spool_batch(&self.spool, &self.metrics, &batch);
            }
        }
    }

    async fn insert(&self, batch: &Batch) -> Result<(), Failure> {
        self.insert_rows(&batch.id, batch.rows.iter()).await
    }

    /// One INSERT of `rows`. Its query id is the batch id: while an earlier attempt of
    /// the same batch still runs on the server (its answer lost or timed out), the
    /// server refuses this one (code 216) instead of writing the rows twice.
    async fn insert_rows<'a>(
        &self,
        batch_id: &str,
        rows: impl Iterator<Item = &'a Row>,
    ) -> Result<(), Failure> {
        let started = Instant::now();
        let t = Some(self.config.timeout);
        let layout = self.node().layout.unwrap_or(Layout::Legacy);
        let write = async {
            let mut insert = self
                .node()
                .client
                .insert::<ChRow<'_>>(schema::TABLE)
                .await?
                .with_timeouts(t, t)
                .with_setting("query_id", batch_id);
            for (k, v) in &self.config.settings {
                insert = insert.with_setting(k, v);
            }
            for row in rows {
                insert.write(&ChRow::new(row, batch_id, layout)).await?;
            }
            insert.end().await
        };
        // The crate's timeouts cover sending and the answer; this one also the connect.
        let result = match tokio::time::timeout(self.config.timeout * 2, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Failure::Unavailable("timed out".into())),
        };
        self.metrics
            .clickhouse_batch(result.is_ok(), started.elapsed());
        result
    }

    /// The `(request_id, time_ms)` of a batch's rows ClickHouse already has: an earlier
    /// attempt may have got in although its answer was lost.
    async fn rows_present(&self, batch: &Batch) -> Result<Vec<(String, u64)>, Failure> {
        let (lo, hi) = batch.rows.iter().fold((u64::MAX, 0), |(lo, hi), r| {
            (lo.min(r.time_ms), hi.max(r.time_ms))
        });
        let layout = self.node().layout.unwrap_or(Layout::Legacy);
        let query = self
            .node()
            .client
            .query(&format!(
                "SELECT request_id, {} FROM {} WHERE time >= toDateTime(?) AND time < toDateTime(?) + 1 AND batch_id = ?",
                layout.time_ms(),
                schema::TABLE
            ))
            .bind(lo / 1000)
            .bind(hi / 1000)
            .bind(batch.id.as_str());
        match tokio::time::timeout(self.config.timeout, query.fetch_all::<(String, u64)>()).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Failure::Unavailable("timed out".into())),
        }
    }

    async fn replay_oldest(&mut self) -> Replay {
        let oldest = lock(&self.spool).as_mut().and_then(Spool::oldest);
        let Some(spooled) = oldest else {
            self.back_off();
            return Replay::Stop;
        };
        let n = spooled.batch.rows.len() as u64;
        let present = match self.rows_present(&spooled.batch).await {
            Ok(p) => p,
            Err(f) => return self.replay_failed(&spooled, f),
        };
        // Usually all or none (one INSERT is one part per day it spans); a batch that
        // crossed midnight may have got in for one day only.
        let missing: Vec<&Row> = spooled
            .batch
            .rows
            .iter()
            .filter(|r| {
                !present
                    .iter()
                    .any(|(id, t)| *id == r.request_id && *t == r.time_ms)
            })
            .collect();
        if missing.is_empty() {
            info!(
                "spooled batch {} ({n} rows) was already written; not sending it again",
                spooled.batch.id
            );
            return self.replayed(&spooled, n);
        }
        let result = self
            .insert_rows(&spooled.batch.id, missing.iter().copied())
            .await;
        match result {
            Ok(()) => {
                self.set_up(true, None);
                self.metrics
                    .rows_written("clickhouse", missing.len() as u64);
                self.replayed(&spooled, n)
            }
            Err(f) => self.replay_failed(&spooled, f),
        }
    }

    fn replayed(&mut self, spooled: &Spooled, n: u64) -> Replay {
        self.refusals = None;
        self.shard_down = false;
        self.replayed_rows += n;
        self.metrics.rows_replayed(n);
        if lock(&self.spool)
            .as_mut()
            .is_some_and(|s| s.remove(spooled))
        {
            Replay::Done
        } else {
            self.back_off();
            Replay::Stop
        }
    }

    fn replay_failed(&mut self, spooled: &Spooled, failure: Failure) -> Replay {
        if let Failure::Elsewhere(_) = failure {
            self.shard_unavailable(&failure);
            self.back_off();
            return Replay::Stop;
        }
        let failure = match failure {
            Failure::Refused(m) => {
                let tries = match &mut self.refusals {
                    Some((path, n)) if *path == spooled.path => {
                        *n += 1;
                        *n
                    }
                    _ => {
                        self.refusals = Some((spooled.path.clone(), 1));
                        1
                    }
                };
                if tries < MAX_REFUSALS {
                    self.unavailable(&Failure::Refused(m));
                    return Replay::Stop;
                }
                error!(
                    "ClickHouse refused spooled batch {} {tries} times; treating its rows as malformed: {m}",
                    spooled.batch.id
                );
                Failure::Malformed(m)
            }
            other => other,
        };
        let Failure::Malformed(m) = failure else {
            self.unavailable(&failure);
            return Replay::Stop;
        };
        self.refusals = None;
        self.metrics.clickhouse_failure("malformed");
        self.set_up(true, None);
        let n = spooled.batch.rows.len();
        let mut guard = lock(&self.spool);
        let Some(spool) = guard.as_mut() else {
            return Replay::Stop;
        };
        let done = if n > 1 {
            spool.split(Spooled {
                path: spooled.path.clone(),
                batch: spooled.batch.clone(),
            })
        } else {
            warn!("ClickHouse refused a row; kept in the dead letter: {m}");
            spool.dead_letter(&spooled.batch.rows, &m) && {
                self.metrics.rows_dead_lettered(n as u64);
                spool.remove(spooled)
            }
        };
        drop(guard);
        if done {
            Replay::Done
        } else {
            self.back_off();
            Replay::Stop
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.rx.close();
        if let Some(batch) = self.in_flight.take() {
            spool_batch(&self.spool, &self.metrics, &batch);
        }
        while let Ok(batch) = self.rx.try_recv() {
            spool_batch(&self.spool, &self.metrics, &batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_decide_what_happens_to_rows() {
        let bad = |m: &str| classify(&clickhouse::error::Error::BadResponse(m.into()));
        assert!(matches!(
            bad("Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero"),
            Failure::Malformed(_)
        ));
        assert!(matches!(
            bad("Code: 33. DB::Exception: Cannot read all data"),
            Failure::Malformed(_)
        ));
        let missing =
            bad("Code: 60, e.displayText() = DB::Exception: Table x.stream_logs doesn't exist.");
        assert!(matches!(missing, Failure::Refused(_)) && is_missing_table(&missing));
        assert!(matches!(
            bad("Code: 252, Too many parts"),
            Failure::Unavailable(_)
        ));
        assert!(matches!(
            bad("Code: 216, Query with id = x is already running"),
            Failure::Unavailable(_)
        ));
        assert!(matches!(
            bad("Code: 115, Unknown setting async_insert"),
            Failure::Refused(_)
        ));
        assert!(matches!(bad("502 Bad Gateway"), Failure::Unavailable(_)));
        assert_eq!(server_code("Code: 241. DB::Exception"), Some(241));
        assert_eq!(server_code("no code"), None);
    }
}
