//! Configuration stage, raw: the YAML file as written, the serde structs it is read
//! into before anything is checked. Defaults that serde fills in live here; the ones
//! applied while validating are in `validate.rs`, each stated once. Every field's default
//! is also documented on it and in conf/relay.yaml.

use serde::Deserialize;

pub use crate::cost::RawPrice;
pub use crate::limits::Limits;
pub use crate::provider::ProviderKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Pingora's own process settings.
    #[serde(default)]
    pub server: RawServer,
    /// Listening addresses.
    pub listen: RawListen,
    /// The built-in mock provider, started inside the relay when present.
    #[serde(default)]
    pub mock: Option<RawMock>,
    /// Path-prefix routes to providers.
    pub routes: Vec<RawRoute>,
    /// Tenants and their relay keys.
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    /// Prices per model, USD per million tokens; models not listed get no cost.
    #[serde(default)]
    pub pricing: std::collections::BTreeMap<String, RawPrice>,
    /// Prometheus label choices.
    #[serde(default)]
    pub metrics: RawMetrics,
    /// Tenant limits: the default, and how tokens are estimated at admission.
    #[serde(default)]
    pub limits: RawLimitsSection,
    /// Redis for limits shared by a fleet of relays; absent: limits per relay.
    #[serde(default)]
    pub redis: Option<RawRedis>,
    /// Where the one row per request goes.
    #[serde(default)]
    pub rows: RawRows,
    /// Groups of tenants (a team, an organisation) with budgets of their own.
    #[serde(default)]
    pub groups: Vec<RawGroup>,
    /// How budgets reserve, and whether unpriced models may pass them.
    #[serde(default)]
    pub budgets: RawBudgets,
    /// Where the response cache keeps its entries.
    #[serde(default)]
    pub cache: RawCache,
    /// OpenTelemetry export. Absent: none.
    #[serde(default)]
    pub telemetry: RawTelemetry,
}

/// `telemetry:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    /// Traces over OTLP. Absent: off.
    pub otlp: Option<RawOtlp>,
}

/// `telemetry.otlp`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOtlp {
    /// The collector: `http://host:4318` (`/v1/traces` is added), or the traces URL; for
    /// gRPC `http://host:4317`.
    pub endpoint: String,
    /// `http/protobuf` (default) or `grpc`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Headers sent with every export (a vendor's API key: `env:` or `file:` values).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// The share of traces kept that no client's `traceparent` decided. Default 1.
    #[serde(default)]
    pub sample_ratio: Option<f64>,
    /// PEM file of the CAs an `https` collector's certificate may chain to, beside the
    /// system's roots (relative paths: from the config file's folder).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// `follow` (default): a client's `traceparent` decides whether its trace is kept;
    /// `ratio`: `sample_ratio` decides every trace (a client still names the trace).
    #[serde(default)]
    pub client_sampling: Option<String>,
    /// `service.name` of the spans. Default `stream-relay`.
    #[serde(default)]
    pub service_name: Option<String>,
    /// Spans that may wait for export (past it: dropped, counted). Default 8192.
    #[serde(default)]
    pub queue: Option<usize>,
    /// Spans per export. Default 512.
    #[serde(default)]
    pub batch: Option<usize>,
    /// The longest a span waits for its batch. Default `1s`.
    #[serde(default)]
    pub interval: Option<String>,
    /// Longest wait for one export. Default `5s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// How often the GenAI metrics are exported (to the collector's `/v1/metrics`).
    /// Default `10s`.
    #[serde(default)]
    pub metrics_interval: Option<String>,
}

/// `cache:` (top level).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    /// Bytes the in-memory store holds. Default 268435456 (256 MiB).
    pub memory_bytes: Option<usize>,
    /// Keep entries in the Redis of `redis:` instead of memory. Default false.
    pub in_redis: bool,
}

/// `routes[].cache`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    /// How long an entry answers. Default `1h`.
    #[serde(default)]
    pub ttl: Option<String>,
    /// Larger answers are not stored. Default 1048576 (1 MiB).
    #[serde(default)]
    pub max_entry_bytes: Option<usize>,
    /// `deterministic` (default: only requests with `temperature: 0` or a `seed`) or
    /// `always`.
    #[serde(default)]
    pub when: Option<String>,
    /// The id of a group (`groups:`) whose members share entries; others keep their own.
    #[serde(default)]
    pub shared_by: Option<String>,
    /// How long a request waits for an identical one still running. Default `5s`.
    #[serde(default)]
    pub wait: Option<String>,
}

/// `budgets:` settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBudgets {
    /// `worst_case` (default: `max_tokens`, or the default) or `observed` (the smaller
    /// of that and a high percentile of the tenant's recent outputs for the model).
    pub reservation: Option<String>,
    /// The percentile of `observed`. Default 0.95.
    pub observed_percentile: Option<f64>,
    /// Serve budgeted requests for models without a price (their spend is not counted)
    /// instead of refusing them. Default false.
    pub allow_unpriced: bool,
}

/// One budget: `usd` per `per` (`day`, `week` from Monday, `month`) in `time_zone`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub usd: f64,
    pub per: String,
    /// IANA name. Default `UTC`.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// `block` (default: refuse past the cap) or `audit` (serve and count).
    #[serde(default)]
    pub mode: Option<String>,
    /// A stream running when the cap is reached: `cut` (default) or `finish`.
    #[serde(default)]
    pub running: Option<String>,
    /// Only requests for this model count against it.
    #[serde(default)]
    pub model: Option<String>,
    /// Only requests on this route count against it.
    #[serde(default)]
    pub route: Option<String>,
}

/// `budget:` one budget, or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawBudgetList {
    One(RawBudget),
    Many(Vec<RawBudget>),
}

impl RawBudgetList {
    pub fn as_slice(&self) -> &[RawBudget] {
        match self {
            RawBudgetList::One(b) => std::slice::from_ref(b),
            RawBudgetList::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    pub id: String,
    /// Tenant ids; a tenant may be in several groups.
    pub members: Vec<String>,
    pub budget: RawBudgetList,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRows {
    pub file: RawRowsFile,
    /// Rows to ClickHouse instead of the file. Absent: the file.
    pub clickhouse: Option<RawClickHouse>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClickHouse {
    /// HTTP interface, `http://host:8123`, or `env:NAME` / `file:/path` holding it; or a
    /// list of them, the nodes of a cluster (a node that fails is skipped for a while).
    pub url: RawClickHouseUrl,
    /// The table layout for a cluster: a local table on every node and a `Distributed`
    /// table over them that the relay inserts into. Absent: one table.
    #[serde(default)]
    pub cluster: Option<RawClickHouseCluster>,
    /// `auto` (default: from the server's version when the table is first made),
    /// `legacy` (the 18.16 types) or `current` (DateTime64, LowCardinality, codecs).
    #[serde(default)]
    pub layout: Option<String>,
    /// Rows older than this many days are deleted by ClickHouse (a table `TTL`, set when
    /// the table is made; current layout only). Default: kept.
    #[serde(default)]
    pub ttl_days: Option<u32>,
    /// Database of the `stream_logs` table, created when missing. Default `stream_relay`.
    #[serde(default)]
    pub database: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// `env:NAME` or `file:/path`.
    #[serde(default)]
    pub password: Option<String>,
    /// A batch is sent at this many rows... Default 10000.
    #[serde(default)]
    pub batch_rows: Option<usize>,
    /// ...or this many bytes... Default 4194304 (4 MiB).
    #[serde(default)]
    pub batch_bytes: Option<usize>,
    /// ...or when its first row is this old. Default `1s`.
    #[serde(default)]
    pub batch_interval: Option<String>,
    /// Longest wait for one ClickHouse request. Default `10s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Pause between probes while ClickHouse is down. Default `1s`.
    #[serde(default)]
    pub retry_interval: Option<String>,
    /// Where batches wait while ClickHouse cannot take them. Default
    /// `/tmp/stream-relay/spool`.
    #[serde(default)]
    pub spool_dir: Option<String>,
    /// Spool size cap; past it new rows are dropped (counted). Default 1073741824 (1 GiB).
    #[serde(default)]
    pub spool_max_bytes: Option<u64>,
    /// Rows that may wait for the writer. Default 65536.
    #[serde(default)]
    pub queue: Option<usize>,
    /// At exit (SIGTERM, SIGINT, the old process of an upgrade), once the server has
    /// stopped: the longest time spent sending the spool, with what the writer held, to
    /// ClickHouse, so rows leave with the relay. `0s`: leave them to the next relay on the
    /// spool, or `stream-relay rows replay`. Default `5s`.
    #[serde(default)]
    pub shutdown_flush: Option<String>,
    /// ClickHouse settings sent with every insert, e.g. `async_insert: 1` (servers that
    /// know them only).
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, serde_yaml::Value>,
}

/// `rows.clickhouse.url`: one URL, or a cluster's node URLs.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawClickHouseUrl {
    One(String),
    Nodes(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClickHouseCluster {
    /// The cluster's name in the servers' `remote_servers`.
    pub name: String,
    /// Engine of the local table. Default `MergeTree`; for replicas, for example
    /// `ReplicatedMergeTree('/clickhouse/tables/{shard}/stream_logs', '{replica}')`.
    #[serde(default)]
    pub engine: Option<String>,
    /// How the `Distributed` table spreads rows over shards. Default `rand()`.
    #[serde(default)]
    pub sharding_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRowsFile {
    /// JSON-lines file of request rows. Default `/tmp/stream-relay/rows.jsonl`.
    pub path: String,
    /// Rotate past this many bytes. Default 104857600 (100 MiB).
    pub max_bytes: u64,
    /// Rotated files kept (`.1` newest). Default 5.
    pub keep: usize,
    /// Rows that may wait for the writer before new ones are dropped (and counted).
    /// Default 65536.
    pub queue: usize,
}

impl Default for RawRowsFile {
    fn default() -> Self {
        RawRowsFile {
            path: "/tmp/stream-relay/rows.jsonl".into(),
            max_bytes: 100 << 20,
            keep: 5,
            queue: 65536,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// `redis://[:password@]host:port[/db]`, or `env:NAME` / `file:/path` holding it; or
    /// a list of such URLs, the nodes of a Redis Cluster (some of them suffice). Or
    /// `sentinel` instead.
    #[serde(default)]
    pub url: Option<RawRedisUrl>,
    /// A master watched by Redis Sentinel: `{ nodes: [redis://host:26379, ...], service:
    /// NAME }` (the sentinels' URLs and the master's name). Instead of `url`.
    #[serde(default)]
    pub sentinel: Option<RawSentinel>,
    /// Longest wait for Redis on the request path. Default `50ms`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// What to do while Redis is down or slow: `local` (serve under this relay's own
    /// limits) or `refuse` (503 for tenants that have limits). Default `local`.
    #[serde(default)]
    pub on_failure: Option<String>,
    /// Key prefix, before the script version. Default `stream-relay`.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// A concurrency slot whose relay died is freed after this. Default `30m`.
    #[serde(default)]
    pub slot_ttl: Option<String>,
}

/// `redis.sentinel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSentinel {
    /// The sentinels' URLs (`redis://host:26379`).
    pub nodes: Vec<String>,
    /// The name the sentinels know the master by.
    pub service: String,
}

/// `redis.url`: one URL, or a Redis Cluster's node URLs.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawRedisUrl {
    One(String),
    Cluster(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimitsSection {
    /// Limits of tenants that set none. Default: none.
    pub default: Limits,
    /// Output tokens assumed for a request that sets no `max_tokens`, when admitting it
    /// against a tokens-per-minute limit. Default 1024.
    pub default_max_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Add a `tenant` label to the token and cost counters. Only for short tenant lists
    /// (at most 200): every tenant multiplies those series. Default false.
    pub tenant_label: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Worker threads of the proxy service. Default 2.
    pub threads: usize,
    /// Fork into the background. Default false (`-d` on the command line also sets it).
    pub daemon: bool,
    /// Pid file, written at start. Default `/tmp/stream-relay.pid`.
    pub pid_file: String,
    /// Unix socket the old process hands its listeners over on during a graceful upgrade.
    /// Default `/tmp/stream-relay-upgrade.sock`.
    pub upgrade_sock: String,
    /// Where logs go when daemonized; null keeps stderr. Default null.
    pub error_log: Option<String>,
    /// After SIGTERM or SIGQUIT: seconds to keep serving open streams before shutting the
    /// services down. Set it to the longest stream you expect. Default 60.
    pub grace_period_seconds: u64,
    /// After the grace period: seconds to let services stop before exiting. Default 5.
    pub graceful_shutdown_timeout_seconds: u64,
    /// Idle upstream connections kept for reuse, over all upstreams. Default 256.
    pub upstream_keepalive_pool_size: usize,
    /// Let tokio move tasks between worker threads. Default true.
    pub work_stealing: bool,
    /// This relay's name in request rows. Default: the host name.
    pub instance: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            threads: 2,
            daemon: false,
            pid_file: "/tmp/stream-relay.pid".into(),
            upgrade_sock: "/tmp/stream-relay-upgrade.sock".into(),
            error_log: None,
            grace_period_seconds: 60,
            graceful_shutdown_timeout_seconds: 5,
            upstream_keepalive_pool_size: 256,
            work_stealing: true,
            instance: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// Address clients connect to, e.g. `0.0.0.0:8080`.
    pub proxy: String,
    /// Admin address (`/healthz`, `/readyz`, `/metrics`); null disables it.
    /// Default `127.0.0.1:9090`.
    #[serde(default = "default_admin")]
    pub admin: Option<String>,
    /// Read buffer per client connection, in bytes. Pingora's default is 64 KiB, zeroed
    /// at accept, which is most of an open stream's memory; requests to LLM APIs are
    /// small, so a few KiB cost no extra reads. Default 4096; 0 reads unbuffered.
    #[serde(default = "default_read_buffer")]
    pub read_buffer_bytes: usize,
    /// Request line and headers together; larger heads get 431. Default 32768.
    #[serde(default)]
    pub max_header_bytes: Option<usize>,
    /// Longest time from accept to a connection's whole first request head; later gets
    /// 408 (nothing at all: closed quietly). Default `10s`.
    #[serde(default)]
    pub head_timeout: Option<String>,
    /// Longest wait for one read from a client. Default `30s`.
    #[serde(default)]
    pub client_read_timeout: Option<String>,
    /// Longest time to receive a body of up to 60 KiB (read before the upstream is
    /// chosen); slower gets 408. Default `30s`.
    #[serde(default)]
    pub body_read_timeout: Option<String>,
    /// Open client connections in all; more are closed at accept. 0: no cap. Default
    /// 50000. At start it is checked against the file limit (RLIMIT_NOFILE): the soft
    /// limit is raised to the hard one when needed, and a cap that still does not fit
    /// (2 files per connection plus 64) is lowered, with a warning.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Open client connections per client address; 0: no cap. Default: none on a
    /// loopback `proxy` address, [`super::PER_ADDRESS_BEYOND_LOOPBACK`] on any other. Clients
    /// behind one NAT or balancer share an address: mind them (behind a balancer in TCP
    /// mode, set 0 and cap per client there).
    #[serde(default)]
    pub max_connections_per_address: Option<usize>,
}

fn default_read_buffer() -> usize {
    4096
}

fn default_admin() -> Option<String> {
    Some("127.0.0.1:9090".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMock {
    /// Address of the built-in mock provider, e.g. `127.0.0.1:18080`.
    pub listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique name; used in logs, metrics and tenant permissions.
    pub name: String,
    /// Path prefix this route serves, e.g. `/openai/v1`. Matches on whole path segments;
    /// the longest matching prefix wins.
    pub prefix: String,
    /// `openai`, `anthropic`, `audio` or `openai_compatible`: decides the error shape and
    /// the default key header.
    pub provider: ProviderKind,
    /// Upstream base URLs (`http://` or `https://`), tried in round-robin order; a
    /// connection failure moves to the next one. The request path minus `prefix` is
    /// appended to the URL's path.
    pub upstreams: Vec<String>,
    /// The provider key: `env:NAME` or `file:/path`. Omit for upstreams that need none.
    #[serde(default)]
    pub key: Option<String>,
    /// Header that carries the provider key. Default `authorization` for openai, audio
    /// and openai_compatible; `x-api-key` for anthropic. Azure uses `api-key`.
    #[serde(default)]
    pub key_header: Option<String>,
    /// Value template for `key_header`; `{key}` is replaced by the key. Default
    /// `Bearer {key}` for `authorization`, `{key}` for any other header.
    #[serde(default)]
    pub key_format: Option<String>,
    /// PEM file of CA certificates trusted for this route's https upstreams instead of
    /// the system roots. Default: system roots.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// OpenAI-style routes: when a client streams chat completions without
    /// `stream_options.include_usage`, ask the upstream for usage anyway and remove the
    /// usage chunk from what the client receives, so every stream's tokens are known.
    /// Default true for openai and openai_compatible routes; not allowed on others.
    #[serde(default)]
    pub ensure_usage: Option<bool>,
    /// Largest request body accepted; larger gets 413 before anything goes upstream.
    /// Default 33554432 (32 MiB).
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// A pool of provider keys (each `env:NAME` or `file:/path`) used in turn; a key
    /// the provider answers 429 (or 401/403) is set aside by its breaker. Instead of `key`.
    #[serde(default)]
    pub keys: Option<Vec<String>>,
    /// How an upstream is chosen: `round_robin` (default), `least_in_flight` or
    /// `weighted` (with `weights`).
    #[serde(default)]
    pub balance: Option<String>,
    /// One weight per upstream, for `balance: weighted`.
    #[serde(default)]
    pub weights: Option<Vec<u32>>,
    /// Circuit breaker of each upstream and key: `failures` in a row open it for
    /// `open_for`. Default `{ failures: 3, open_for: 30s }`.
    #[serde(default)]
    pub breaker: Option<RawBreaker>,
    /// Attempts one request may make (connection failures and retried statuses).
    /// Default: one per upstream address or key, at least 1, at most 4 (or the count of
    /// upstreams or keys when larger).
    #[serde(default)]
    pub max_attempts: Option<usize>,
    /// Upstream statuses that are tried again on another upstream or key, before
    /// anything reached the client. Default `[429, 500, 502, 503, 504, 529]`.
    #[serde(default)]
    pub retry_on: Option<Vec<u16>>,
    /// Also try again when the connection failed after the request was sent and before
    /// a response came (the upstream may have started the work). Default false.
    #[serde(default)]
    pub retry_after_send: bool,
    /// Active health checks: `GET path` on each upstream every `interval`; a connection
    /// failure, a timeout or a 5xx counts against its breaker, any other answer for it.
    #[serde(default)]
    pub health_check: Option<RawHealthCheck>,
    /// Keep request and response bodies in the request's row: each `off` (default),
    /// `whole`, or a number of bytes to keep from the start.
    #[serde(default)]
    pub capture: RawCapture,
    /// Answer repeated requests from the response cache. Absent: no caching.
    #[serde(default)]
    pub cache: Option<RawRouteCache>,
    /// What the route serves, each `METHOD path` (see [`crate::policy::Endpoint`]).
    /// Default: the provider's inference endpoints; anything else gets 404 or 405.
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
    /// `pass` (default) or `force_off`: requests that would have the provider store
    /// their data (`store: true`; Responses store by default) are sent with
    /// `"store": false`.
    #[serde(default)]
    pub store: Option<String>,
    /// Headers set on every upstream request of the route, e.g. `OpenAI-Organization`
    /// (a tenant's own value of such a header is never forwarded).
    #[serde(default)]
    pub upstream_headers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// Request path on the upstream host, e.g. `/v1/models`.
    pub path: String,
    /// Default `10s`.
    #[serde(default)]
    pub interval: Option<String>,
    /// Default `2s`.
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    #[serde(default)]
    pub failures: Option<u32>,
    #[serde(default)]
    pub open_for: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCapture {
    pub request: Option<CaptureSize>,
    pub response: Option<CaptureSize>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum CaptureSize {
    Bytes(usize),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTimeouts {
    /// TCP connect plus TLS handshake, per attempt. Default `5s`.
    pub connect: String,
    /// From request sent to first response byte. Default `120s`.
    pub first_byte: String,
    /// Longest silence between two response chunks. Default `60s`.
    pub idle: String,
    /// Whole request, first byte to last. Default `30m`.
    pub total: String,
    /// A WebSocket session with no frame either way for this long is closed. Default `5m`.
    pub session_idle: String,
    /// A WebSocket session's longest life. Default `1h`.
    pub session_max: String,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            connect: "5s".into(),
            first_byte: "120s".into(),
            idle: "60s".into(),
            total: "30m".into(),
            session_idle: "5m".into(),
            session_max: "1h".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    /// Tenant id, as it appears in logs.
    pub id: String,
    /// Hex SHA-256 of each relay key of this tenant (`stream-relay hash-key` prints it).
    pub key_sha256: Vec<String>,
    /// Route names this tenant may use; `["*"]` for all. Default all.
    #[serde(default = "all_routes")]
    pub routes: Vec<String>,
    /// This tenant's limits, replacing `limits.default` as a whole.
    #[serde(default)]
    pub limits: Option<Limits>,
    /// This tenant's spend budgets, in US dollars.
    #[serde(default)]
    pub budget: Option<RawBudgetList>,
}

fn all_routes() -> Vec<String> {
    vec!["*".into()]
}
