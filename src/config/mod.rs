//! Configuration stage: the YAML file as written (raw serde structs) and the validated
//! [`Config`] the relay runs on. Every validation message names the key it is about,
//! for example `routes[2].upstreams[0]: ...`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::secret::{SecretRef, SecretState};

// ---------------------------------------------------------------------------------------
// Raw configuration, as written in the YAML file. Defaults are documented on each field
// and in conf/relay.yaml.
// ---------------------------------------------------------------------------------------

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
    /// HTTP interface, `http://host:8123`, or `env:NAME` / `file:/path` holding it.
    pub url: String,
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
    /// ClickHouse settings sent with every insert, e.g. `async_insert: 1` (servers that
    /// know them only).
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, serde_yaml::Value>,
}

fn validate_clickhouse(
    c: &RawClickHouse,
    base_dir: &std::path::Path,
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::rows::clickhouse::ClickHouseConfig, ConfigError> {
    let resolve = |key: &str, text: &str| -> Result<crate::secret::Secret, ConfigError> {
        let reference = SecretRef::parse(text).map_err(|m| err(key, m))?;
        match reference.resolve(lookup_env) {
            SecretState::Present(s) => Ok(s),
            SecretState::Missing { reference } => Err(err(key, format!("{reference} is not set"))),
        }
    };
    let url = if c.url.starts_with("env:") || c.url.starts_with("file:") {
        resolve("rows.clickhouse.url", &c.url)?.expose().to_string()
    } else {
        c.url.clone()
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(err(
            "rows.clickhouse.url",
            "must start with http:// (ClickHouse's HTTP interface)",
        ));
    }
    if url.starts_with("https://") {
        return Err(err(
            "rows.clickhouse.url",
            "https is not built in; reach ClickHouse over http on a private network",
        ));
    }
    let database = c.database.clone().unwrap_or_else(|| "stream_relay".into());
    if !crate::rows::schema::valid_database(&database) {
        return Err(err(
            "rows.clickhouse.database",
            "letters, digits and _ only, not starting with a digit",
        ));
    }
    let password = match &c.password {
        Some(p) => Some(resolve("rows.clickhouse.password", p)?),
        None => None,
    };
    let dur = |key: &str, v: &Option<String>, default: &str| {
        parse_duration(v.as_deref().unwrap_or(default))
            .map_err(|m| err(format!("rows.clickhouse.{key}"), m))
    };
    let at_least_one = |key: &str, v: Option<usize>, default: usize| match v {
        Some(0) => Err(err(format!("rows.clickhouse.{key}"), "must be at least 1")),
        v => Ok(v.unwrap_or(default)),
    };
    let mut settings = Vec::new();
    for (k, v) in &c.settings {
        let value = match v {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => u8::from(*b).to_string(),
            _ => {
                return Err(err(
                    format!("rows.clickhouse.settings.{k}"),
                    "must be a string, number or boolean",
                ))
            }
        };
        settings.push((k.clone(), value));
    }
    Ok(crate::rows::clickhouse::ClickHouseConfig {
        url,
        database,
        user: c.user.clone(),
        password,
        batch_rows: at_least_one("batch_rows", c.batch_rows, 10_000)?,
        batch_bytes: at_least_one("batch_bytes", c.batch_bytes, 4 << 20)?,
        batch_interval: dur("batch_interval", &c.batch_interval, "1s")?,
        timeout: dur("timeout", &c.timeout, "10s")?,
        retry_interval: dur("retry_interval", &c.retry_interval, "1s")?,
        spool_dir: base_dir.join(c.spool_dir.as_deref().unwrap_or("/tmp/stream-relay/spool")),
        spool_max_bytes: c.spool_max_bytes.unwrap_or(1 << 30),
        queue: at_least_one("queue", c.queue, 65536)?,
        settings,
    })
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
    /// `redis://[:password@]host:port[/db]`, or `env:NAME` / `file:/path` holding it.
    pub url: String,
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

pub use crate::limits::redis::RedisConfig;

fn validate_redis(
    r: &RawRedis,
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<RedisConfig, ConfigError> {
    let url = if r.url.starts_with("env:") || r.url.starts_with("file:") {
        let reference = SecretRef::parse(&r.url).map_err(|m| err("redis.url", m))?;
        match reference.resolve(lookup_env) {
            SecretState::Present(s) => s,
            SecretState::Missing { reference } => {
                return Err(err("redis.url", format!("{reference} is not set")))
            }
        }
    } else {
        crate::secret::Secret::new(r.url.clone())
    };
    if !url.expose().starts_with("redis://") && !url.expose().starts_with("rediss://") {
        return Err(err("redis.url", "must start with redis:// or rediss://"));
    }
    let dur = |key: &str, v: &Option<String>, default: &str| {
        parse_duration(v.as_deref().unwrap_or(default)).map_err(|m| err(format!("redis.{key}"), m))
    };
    let refuse_when_down = match r.on_failure.as_deref().unwrap_or("local") {
        "local" => false,
        "refuse" => true,
        other => {
            return Err(err(
                "redis.on_failure",
                format!("`{other}`: must be `local` or `refuse`"),
            ))
        }
    };
    Ok(RedisConfig {
        url,
        timeout: dur("timeout", &r.timeout, "50ms")?,
        refuse_when_down,
        key_prefix: r
            .key_prefix
            .clone()
            .unwrap_or_else(|| "stream-relay".into()),
        slot_ttl: dur("slot_ttl", &r.slot_ttl, "30m")?,
    })
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

pub use crate::limits::Limits;

fn validate_limits(l: &Limits, at: &str) -> Result<(), ConfigError> {
    for (name, v) in [
        ("requests_per_second", l.requests_per_second),
        ("requests_per_minute", l.requests_per_minute),
        ("tokens_per_minute", l.tokens_per_minute),
        ("concurrent_requests", l.concurrent_requests),
    ] {
        if v == Some(0) {
            return Err(err(
                format!("{at}.{name}"),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
    }
    Ok(())
}

pub use crate::cost::RawPrice;

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// Add a `tenant` label to the token and cost counters. Only for short tenant lists
    /// (at most 200): every tenant multiplies those series. Default false.
    pub tenant_label: bool,
}

/// Most tenants allowed with `metrics.tenant_label`.
pub const MAX_LABELLED_TENANTS: usize = 200;

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
    /// loopback `proxy` address, [`PER_ADDRESS_BEYOND_LOOPBACK`] on any other. Clients
    /// behind one NAT or balancer share an address: mind them (behind a balancer in TCP
    /// mode, set 0 and cap per client there).
    #[serde(default)]
    pub max_connections_per_address: Option<usize>,
}

/// The per-address cap when `listen.max_connections_per_address` is not set and the proxy
/// listens beyond loopback, where one address must not take the whole of
/// `max_connections`: 1000 is 2% of the default 50000, twice what `conf/haproxy.cfg`
/// allows a client address, and as many as the OpenAI Python SDK's connection pool opens
/// at most, so one ordinary client (or a small NAT) is never cut short.
pub const PER_ADDRESS_BEYOND_LOOPBACK: usize = 1000;

/// The per-address cap for a proxy on `proxy_listen` with `set` configured, and whether it
/// is the default for a listener beyond loopback. What is set (0 included) stays; unset,
/// loopback gets no cap (every client there is this machine) and any other address
/// [`PER_ADDRESS_BEYOND_LOOPBACK`]. An address that does not parse counts as beyond
/// loopback.
pub fn per_address_cap(proxy_listen: &str, set: Option<usize>) -> (usize, bool) {
    if let Some(n) = set {
        return (n, false);
    }
    let loopback = proxy_listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    if loopback {
        (0, false)
    } else {
        (PER_ADDRESS_BEYOND_LOOPBACK, true)
    }
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

fn capture_size(at: &str, c: &Option<CaptureSize>) -> Result<usize, ConfigError> {
    match c {
        None => Ok(0),
        Some(CaptureSize::Bytes(n)) => Ok(*n),
        Some(CaptureSize::Word(w)) if w == "off" => Ok(0),
        Some(CaptureSize::Word(w)) if w == "whole" => Ok(usize::MAX),
        Some(CaptureSize::Word(w)) => Err(err(
            at,
            format!("`{w}`: must be off, whole or a number of bytes"),
        )),
    }
}

pub use crate::provider::ProviderKind;

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
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            connect: "5s".into(),
            first_byte: "120s".into(),
            idle: "60s".into(),
            total: "30m".into(),
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
}

fn all_routes() -> Vec<String> {
    vec!["*".into()]
}

// ---------------------------------------------------------------------------------------
// Validated configuration.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    /// Pingora's process settings, validated.
    pub server: RawServer,
    pub proxy_listen: String,
    pub proxy_read_buffer: usize,
    pub input_limits: crate::gate::InputLimits,
    /// Client connection caps (0: none).
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// `max_connections_per_address` is the default for a listener beyond loopback (not
    /// set in the file): said in the log at start.
    pub per_address_defaulted: bool,
    pub admin_listen: Option<String>,
    pub mock_listen: Option<String>,
    pub routes: Vec<RouteConfig>,
    pub tenants: Vec<TenantConfig>,
    pub pricing: crate::cost::Pricing,
    pub metrics: RawMetrics,
    /// Output tokens assumed when a request sets no `max_tokens`.
    pub default_max_tokens: u64,
    pub redis: Option<RedisConfig>,
    pub rows_file: crate::rows::file::FileSinkConfig,
    /// Rows to ClickHouse instead of the file.
    pub rows_clickhouse: Option<crate::rows::clickhouse::ClickHouseConfig>,
    /// Rows that may wait for the file writer.
    pub rows_file_queue: usize,
    /// This relay's name in rows.
    pub instance: String,
}

pub use crate::route::{Balance, Capture, KeyConfig, RouteConfig};
pub use crate::stall::Timeouts;
pub use crate::upstream::{parse_upstream_url, HealthCheck, UpstreamUrl};

pub use crate::auth::TenantConfig;

/// A configuration error that names the offending key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Reads and validates a configuration file, resolving provider keys from the
    /// process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("", format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_yaml(&text, base, &|name| std::env::var(name).ok())
    }

    /// Parses and validates YAML. Relative file paths in it are taken from `base_dir`.
    pub fn from_yaml(
        text: &str,
        base_dir: &Path,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| {
            // serde_yaml names the path of the offending key in its message.
            err("", e.to_string())
        })?;
        raw.validate(base_dir, lookup_env)
    }

    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }
}

impl RawConfig {
    pub fn validate(
        self,
        base_dir: &Path,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let s = &self.server;
        if s.threads == 0 || s.threads > 1024 {
            return Err(err("server.threads", "must be between 1 and 1024"));
        }
        if s.pid_file.is_empty() {
            return Err(err("server.pid_file", "must not be empty"));
        }
        if s.upgrade_sock.is_empty() {
            return Err(err("server.upgrade_sock", "must not be empty"));
        }
        check_socket_addr("listen.proxy", &self.listen.proxy)?;
        if self.listen.read_buffer_bytes > 1 << 20 {
            return Err(err("listen.read_buffer_bytes", "must be at most 1048576"));
        }
        if let Some(admin) = &self.listen.admin {
            check_socket_addr("listen.admin", admin)?;
            if admin == &self.listen.proxy {
                return Err(err("listen.admin", "must differ from listen.proxy"));
            }
        }
        if let Some(mock) = &self.mock {
            check_socket_addr("mock.listen", &mock.listen)?;
        }
        if self.routes.is_empty() {
            return Err(err("routes", "at least one route is needed"));
        }

        let mut names = HashSet::new();
        let mut prefixes = HashMap::new();
        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.into_iter().enumerate() {
            let at = format!("routes[{i}]");
            let route = validate_route(&at, r, base_dir, lookup_env)?;
            if !names.insert(route.name.clone()) {
                return Err(err(
                    format!("{at}.name"),
                    format!("`{}` is used by another route", route.name),
                ));
            }
            if let Some(other) = prefixes.insert(route.prefix.clone(), route.name.clone()) {
                return Err(err(
                    format!("{at}.prefix"),
                    format!(
                        "`{}` is already the prefix of route `{other}`",
                        route.prefix
                    ),
                ));
            }
            routes.push(route);
        }

        let mut tenant_ids = HashSet::new();
        let mut seen_hashes = HashMap::new();
        let mut tenants = Vec::with_capacity(self.tenants.len());
        for (i, t) in self.tenants.into_iter().enumerate() {
            let at = format!("tenants[{i}]");
            if t.id.is_empty() {
                return Err(err(format!("{at}.id"), "must not be empty"));
            }
            if !tenant_ids.insert(t.id.clone()) {
                return Err(err(
                    format!("{at}.id"),
                    format!("`{}` is used by another tenant", t.id),
                ));
            }
            if t.key_sha256.is_empty() {
                return Err(err(
                    format!("{at}.key_sha256"),
                    "at least one key hash is needed",
                ));
            }
            let mut key_hashes = Vec::with_capacity(t.key_sha256.len());
            for (k, h) in t.key_sha256.iter().enumerate() {
                let key_at = format!("{at}.key_sha256[{k}]");
                let digest = parse_sha256_hex(h).ok_or_else(|| {
                    err(
                        key_at.clone(),
                        "must be 64 hex characters (run `stream-relay hash-key`)",
                    )
                })?;
                if let Some(other) = seen_hashes.insert(digest, t.id.clone()) {
                    return Err(err(
                        key_at,
                        format!("the same key is also given to `{other}`"),
                    ));
                }
                key_hashes.push(digest);
            }
            let routes_allowed = if t.routes.iter().any(|r| r == "*") {
                None
            } else {
                for (k, r) in t.routes.iter().enumerate() {
                    if !names.contains(r) {
                        return Err(err(
                            format!("{at}.routes[{k}]"),
                            format!("no route is named `{r}`"),
                        ));
                    }
                }
                Some(t.routes.iter().cloned().collect())
            };
            if let Some(l) = &t.limits {
                validate_limits(l, &format!("{at}.limits"))?;
            }
            tenants.push(TenantConfig {
                id: t.id,
                key_hashes,
                routes: routes_allowed,
                limits: t.limits.unwrap_or(self.limits.default),
            });
        }

        for (model, p) in &self.pricing {
            let at = format!("pricing.{model}");
            for (name, v) in [
                ("input", Some(p.input)),
                ("cached_input", p.cached_input),
                ("output", Some(p.output)),
            ] {
                if let Some(v) = v {
                    if !v.is_finite() || v < 0.0 {
                        return Err(err(format!("{at}.{name}"), "must be a price of 0 or more"));
                    }
                }
            }
        }
        if self.metrics.tenant_label && tenants.len() > MAX_LABELLED_TENANTS {
            return Err(err(
                "metrics.tenant_label",
                format!(
                    "{} tenants are too many for a label (at most {MAX_LABELLED_TENANTS})",
                    tenants.len()
                ),
            ));
        }
        validate_limits(&self.limits.default, "limits.default")?;
        if self.limits.default_max_tokens == Some(0) {
            return Err(err("limits.default_max_tokens", "must be at least 1"));
        }
        let redis = match &self.redis {
            Some(r) => Some(validate_redis(r, lookup_env)?),
            None => None,
        };
        let f = &self.rows.file;
        if f.path.is_empty() {
            return Err(err("rows.file.path", "must not be empty"));
        }
        if f.max_bytes < 4096 {
            return Err(err("rows.file.max_bytes", "must be at least 4096"));
        }
        if f.queue == 0 {
            return Err(err("rows.file.queue", "must be at least 1"));
        }
        let rows_file = crate::rows::file::FileSinkConfig {
            path: base_dir.join(&f.path),
            max_bytes: f.max_bytes,
            keep: f.keep,
        };
        let rows_clickhouse = match &self.rows.clickhouse {
            Some(c) => Some(validate_clickhouse(c, base_dir, lookup_env)?),
            None => None,
        };
        let l = &self.listen;
        let listen_dur = |key: &str, v: &Option<String>| -> Result<Duration, ConfigError> {
            let default = if key == "head_timeout" { "10s" } else { "30s" };
            let d = parse_duration(v.as_deref().unwrap_or(default))
                .map_err(|m| err(format!("listen.{key}"), m))?;
            if d.is_zero() {
                return Err(err(format!("listen.{key}"), "must be more than zero"));
            }
            Ok(d)
        };
        let input_limits = crate::gate::InputLimits {
            max_header_bytes: match l.max_header_bytes {
                Some(n) if n < 1024 => {
                    return Err(err("listen.max_header_bytes", "must be at least 1024"))
                }
                Some(n) => n,
                None => 32 * 1024,
            },
            head_timeout: listen_dur("head_timeout", &l.head_timeout)?,
            client_read_timeout: listen_dur("client_read_timeout", &l.client_read_timeout)?,
            body_read_timeout: listen_dur("body_read_timeout", &l.body_read_timeout)?,
        };
        let instance = self.server.instance.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "stream-relay".into())
        });
        let (max_connections_per_address, per_address_defaulted) =
            per_address_cap(&self.listen.proxy, self.listen.max_connections_per_address);
        Ok(Config {
            rows_file_queue: f.queue,
            rows_file,
            rows_clickhouse,
            instance,
            redis,
            default_max_tokens: self.limits.default_max_tokens.unwrap_or(1024),
            pricing: crate::cost::Pricing::new(&self.pricing),
            metrics: self.metrics,
            server: self.server,
            proxy_listen: self.listen.proxy,
            proxy_read_buffer: self.listen.read_buffer_bytes,
            input_limits,
            // Fitted to the file limit at start (`fdlimit`, called from `main`).
            max_connections: self.listen.max_connections.unwrap_or(50_000),
            max_connections_per_address,
            per_address_defaulted,
            admin_listen: self.listen.admin,
            mock_listen: self.mock.map(|m| m.listen),
            routes,
            tenants,
        })
    }
}

fn validate_route(
    at: &str,
    r: RawRoute,
    base_dir: &Path,
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<RouteConfig, ConfigError> {
    if r.name.is_empty()
        || !r
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(err(
            format!("{at}.name"),
            "must be non-empty letters, digits, `-`, `_` or `.`",
        ));
    }
    let prefix = normalize_prefix(&r.prefix).ok_or_else(|| {
        err(
            format!("{at}.prefix"),
            "must start with `/`, e.g. `/openai/v1`",
        )
    })?;
    if r.upstreams.is_empty() {
        return Err(err(
            format!("{at}.upstreams"),
            "at least one upstream URL is needed",
        ));
    }
    let mut upstreams = Vec::with_capacity(r.upstreams.len());
    for (k, u) in r.upstreams.iter().enumerate() {
        upstreams.push(parse_upstream_url(u).map_err(|m| err(format!("{at}.upstreams[{k}]"), m))?);
    }

    let key_refs: Vec<String> = match (&r.key, &r.keys) {
        (Some(_), Some(_)) => {
            return Err(err(format!("{at}.keys"), "set `key` or `keys`, not both"));
        }
        (Some(k), None) => vec![k.clone()],
        (None, Some(ks)) if ks.is_empty() || ks.len() > 64 => {
            return Err(err(format!("{at}.keys"), "must list 1 to 64 keys"));
        }
        (None, Some(ks)) => ks.clone(),
        (None, None) => Vec::new(),
    };
    let key = match key_refs.first() {
        None => {
            if r.key_header.is_some() || r.key_format.is_some() {
                return Err(err(
                    format!("{at}.key"),
                    "key_header or key_format is set but no key is given",
                ));
            }
            KeyConfig::None
        }
        Some(_) => {
            let mut references = Vec::with_capacity(key_refs.len());
            for (i, text) in key_refs.iter().enumerate() {
                let key = if r.keys.is_some() {
                    format!("{at}.keys[{i}]")
                } else {
                    format!("{at}.key")
                };
                references.push(SecretRef::parse(text).map_err(|m| err(key, m))?);
            }
            let header = match &r.key_header {
                Some(h) => {
                    let h = h.to_ascii_lowercase();
                    if h.is_empty()
                        || !h
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    {
                        return Err(err(
                            format!("{at}.key_header"),
                            "is not a valid header name",
                        ));
                    }
                    h
                }
                None => match r.provider {
                    ProviderKind::Anthropic => "x-api-key".into(),
                    _ => "authorization".into(),
                },
            };
            let format = r.key_format.clone().unwrap_or_else(|| {
                if header == "authorization" {
                    "Bearer {key}".into()
                } else {
                    "{key}".into()
                }
            });
            let Some((prefix, suffix)) = format.split_once("{key}") else {
                return Err(err(format!("{at}.key_format"), "must contain `{key}`"));
            };
            if suffix.contains("{key}") {
                return Err(err(format!("{at}.key_format"), "must contain `{key}` once"));
            }
            KeyConfig::Injected {
                header,
                prefix: prefix.to_string(),
                suffix: suffix.to_string(),
                states: references.iter().map(|r| r.resolve(lookup_env)).collect(),
            }
        }
    };

    let ca_pem = match &r.ca_file {
        None => None,
        Some(p) => {
            let path = base_dir.join(p);
            let text = std::fs::read(&path).map_err(|e| {
                err(
                    format!("{at}.ca_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            if crate::upstream::parse_ca_pem(&text).is_none_or(|c| c.is_empty()) {
                return Err(err(
                    format!("{at}.ca_file"),
                    format!("{} holds no PEM certificate", path.display()),
                ));
            }
            Some(path)
        }
    };

    let t = &r.timeouts;
    let timeouts = Timeouts {
        connect: parse_duration(&t.connect)
            .map_err(|m| err(format!("{at}.timeouts.connect"), m))?,
        first_byte: parse_duration(&t.first_byte)
            .map_err(|m| err(format!("{at}.timeouts.first_byte"), m))?,
        idle: parse_duration(&t.idle).map_err(|m| err(format!("{at}.timeouts.idle"), m))?,
        total: parse_duration(&t.total).map_err(|m| err(format!("{at}.timeouts.total"), m))?,
    };
    for (name, d) in [
        ("connect", timeouts.connect),
        ("first_byte", timeouts.first_byte),
        ("idle", timeouts.idle),
        ("total", timeouts.total),
    ] {
        if d.is_zero() {
            return Err(err(
                format!("{at}.timeouts.{name}"),
                "must be more than zero",
            ));
        }
    }

    let openai_style = matches!(
        r.provider,
        ProviderKind::Openai | ProviderKind::OpenaiCompatible
    );
    if r.ensure_usage == Some(true) && !openai_style {
        return Err(err(
            format!("{at}.ensure_usage"),
            "only openai and openai_compatible routes stream OpenAI usage chunks",
        ));
    }
    let capture = Capture {
        request: capture_size(&format!("{at}.capture.request"), &r.capture.request)?,
        response: capture_size(&format!("{at}.capture.response"), &r.capture.response)?,
    };
    if r.upstreams.len() > 64 {
        return Err(err(format!("{at}.upstreams"), "at most 64 upstreams"));
    }
    let balance = match r.balance.as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_in_flight") => Balance::LeastInFlight,
        Some("weighted") => Balance::Weighted,
        Some(other) => {
            return Err(err(
                format!("{at}.balance"),
                format!("`{other}`: must be round_robin, least_in_flight or weighted"),
            ))
        }
    };
    let weights = match (&r.weights, balance) {
        (Some(w), Balance::Weighted)
            if w.len() == r.upstreams.len() && w.iter().all(|x| *x > 0) =>
        {
            w.clone()
        }
        (Some(_), Balance::Weighted) => {
            return Err(err(
                format!("{at}.weights"),
                "one weight above 0 per upstream",
            ))
        }
        (None, Balance::Weighted) => {
            return Err(err(
                format!("{at}.weights"),
                "balance: weighted needs weights",
            ))
        }
        (Some(_), _) => return Err(err(format!("{at}.weights"), "only with balance: weighted")),
        (None, _) => vec![1; r.upstreams.len()],
    };
    let breaker = match &r.breaker {
        None => crate::breaker::BreakerConfig::default(),
        Some(b) => crate::breaker::BreakerConfig {
            failures: match b.failures {
                Some(0) => return Err(err(format!("{at}.breaker.failures"), "must be at least 1")),
                Some(n) => n,
                None => 3,
            },
            open_for: parse_duration(b.open_for.as_deref().unwrap_or("30s"))
                .map_err(|m| err(format!("{at}.breaker.open_for"), m))?,
        },
    };
    if let Some(n) = r.max_attempts {
        // Pingora stops a request after 16 tries whatever the relay says.
        if !(1..=16).contains(&n) {
            return Err(err(format!("{at}.max_attempts"), "must be 1 to 16"));
        }
    }
    let retry_on = r
        .retry_on
        .clone()
        .unwrap_or_else(|| vec![429, 500, 502, 503, 504, 529]);
    if let Some(bad) = retry_on.iter().find(|s| !(400..600).contains(*s)) {
        return Err(err(
            format!("{at}.retry_on"),
            format!("{bad} is not an error status"),
        ));
    }
    let health_check = match &r.health_check {
        None => None,
        Some(h) => {
            if !h.path.starts_with('/') || h.path.bytes().any(|b| b.is_ascii_whitespace()) {
                return Err(err(
                    format!("{at}.health_check.path"),
                    "must start with / and have no spaces",
                ));
            }
            let dur = |key: &str, v: &Option<String>, default: &str| {
                parse_duration(v.as_deref().unwrap_or(default))
                    .map_err(|m| err(format!("{at}.health_check.{key}"), m))
            };
            let interval = dur("interval", &h.interval, "10s")?;
            let timeout = dur("timeout", &h.timeout, "2s")?;
            if interval.is_zero() || timeout.is_zero() {
                return Err(err(
                    format!("{at}.health_check"),
                    "interval and timeout must be more than zero",
                ));
            }
            Some(HealthCheck {
                path: h.path.clone(),
                interval,
                timeout,
            })
        }
    };
    if r.max_body_bytes == Some(0) {
        return Err(err(format!("{at}.max_body_bytes"), "must be at least 1"));
    }
    let policy = route_policy(at, &r, &upstreams)?;
    Ok(RouteConfig {
        policy,
        health_check,
        balance,
        weights,
        breaker,
        max_attempts: r.max_attempts,
        retry_on,
        retry_after_send: r.retry_after_send,
        max_body_bytes: r.max_body_bytes.unwrap_or(32 << 20),
        capture,
        ensure_usage: r.ensure_usage.unwrap_or(openai_style),
        name: r.name,
        prefix,
        provider: r.provider,
        upstreams,
        key,
        ca_pem,
        timeouts,
    })
}

/// A route's endpoints, store policy and upstream headers.
fn route_policy(
    at: &str,
    r: &RawRoute,
    upstreams: &[UpstreamUrl],
) -> Result<crate::policy::RoutePolicy, ConfigError> {
    use crate::policy::{Endpoint, Endpoints, Store};
    let endpoints = match &r.endpoints {
        None => Endpoints::defaults(r.provider),
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (k, e) in list.iter().enumerate() {
                out.push(Endpoint::parse(e).map_err(|m| err(format!("{at}.endpoints[{k}]"), m))?);
            }
            Endpoints(out)
        }
    };
    if endpoints.0.iter().any(Endpoint::is_anchored)
        && upstreams
            .iter()
            .any(|u| u.base_path != upstreams[0].base_path)
    {
        return Err(err(
            format!("{at}.endpoints"),
            "whole-path patterns (with a leading `/`) need every upstream to have the same base path",
        ));
    }
    let store = match r.store.as_deref() {
        None | Some("pass") => Store::Pass,
        Some("force_off") => Store::ForceOff,
        Some(_) => return Err(err(format!("{at}.store"), "must be `pass` or `force_off`")),
    };
    let mut upstream_headers = Vec::with_capacity(r.upstream_headers.len());
    for (name, value) in &r.upstream_headers {
        let key = format!("{at}.upstream_headers.{name}");
        let n = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| err(key.clone(), "not a valid header name"))?;
        if crate::policy::relay_owned_header(n.as_str()) {
            return Err(err(key, "this header is set by the relay itself"));
        }
        let v =
            http::HeaderValue::from_str(value).map_err(|_| err(key, "not a valid header value"))?;
        upstream_headers.push((n, v));
    }
    Ok(crate::policy::RoutePolicy {
        endpoints,
        store,
        upstream_headers,
    })
}

fn check_socket_addr(key: &str, addr: &str) -> Result<(), ConfigError> {
    addr.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| err(key, format!("`{addr}` is not an IP:port address")))
}

/// `/openai/v1/` -> `/openai/v1`; `/` stays `/`.
fn normalize_prefix(p: &str) -> Option<String> {
    if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
        return None;
    }
    let trimmed = p.trim_end_matches('/');
    Some(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

/// Parses `250ms`, `5s`, `10m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` needs a unit: ms, s, m or h"))?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 500ms, 5s, 10m or 1h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{text}`: unit must be ms, s, m or h")),
    };
    Ok(d)
}

fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    if t.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in t.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, Path::new("."), &|n| {
            (n == "SET").then(|| "sk-provider".to_string())
        })
    }

    fn minimal(route_extra: &str, tenant: &str) -> String {
        format!(
            "listen: {{ proxy: 127.0.0.1:8080 }}\nroutes:\n  - name: openai\n    prefix: /openai/v1\n    provider: openai\n    upstreams: [https://api.openai.com/v1]\n{route_extra}tenants:\n{tenant}"
        )
    }

    #[test]
    fn per_address_cap_defaults_beyond_loopback_only_when_not_set() {
        assert_eq!(per_address_cap("127.0.0.1:8080", None), (0, false));
        assert_eq!(per_address_cap("127.0.0.2:8080", None), (0, false));
        assert_eq!(per_address_cap("[::1]:8080", None), (0, false));
        assert_eq!(per_address_cap("0.0.0.0:8080", None), (1000, true));
        assert_eq!(per_address_cap("[::]:8080", None), (1000, true));
        assert_eq!(per_address_cap("10.0.0.11:8080", None), (1000, true));
        // What is set stays, 0 (no cap) included, on any address.
        assert_eq!(per_address_cap("0.0.0.0:8080", Some(0)), (0, false));
        assert_eq!(per_address_cap("0.0.0.0:8080", Some(20)), (20, false));
        assert_eq!(per_address_cap("127.0.0.1:8080", Some(20)), (20, false));
        // Through the whole validation.
        let c = load(&minimal("", "  []\n").replace("127.0.0.1:8080", "0.0.0.0:8080")).unwrap();
        assert_eq!(
            (c.max_connections_per_address, c.per_address_defaulted),
            (1000, true)
        );
        let c = load(&minimal("", "  []\n")).unwrap();
        assert_eq!(
            (c.max_connections_per_address, c.per_address_defaulted),
            (0, false)
        );
        let c = load(&minimal("", "  []\n").replace(
            "proxy: 127.0.0.1:8080",
            "proxy: 0.0.0.0:8080, max_connections_per_address: 0",
        ))
        .unwrap();
        assert_eq!(
            (c.max_connections_per_address, c.per_address_defaulted),
            (0, false)
        );
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = load(&minimal(
            "    key: env:SET\n",
            &format!("  - id: a\n    key_sha256: [{HASH}]\n"),
        ))
        .unwrap();
        assert_eq!(c.admin_listen.as_deref(), Some("127.0.0.1:9090"));
        let r = &c.routes[0];
        assert_eq!(r.upstreams[0].base_path, "/v1");
        assert_eq!(r.upstreams[0].port, 443);
        assert_eq!(r.timeouts.connect, Duration::from_secs(5));
        match &r.key {
            KeyConfig::Injected {
                header,
                prefix,
                suffix,
                states,
            } => {
                let SecretState::Present(s) = &states[0] else {
                    panic!("{states:?}")
                };
                assert_eq!(header, "authorization");
                assert_eq!((prefix.as_str(), suffix.as_str()), ("Bearer ", ""));
                assert_eq!(s.expose(), "sk-provider");
            }
            other => panic!("{other:?}"),
        }
        assert!(c.tenants[0].routes.is_none());
    }

    #[test]
    fn unset_key_is_not_fatal() {
        let c = load(&minimal("    key: env:UNSET\n", "  []\n")).unwrap();
        match &c.routes[0].key {
            KeyConfig::Injected { states, .. } => {
                assert!(matches!(states[..], [SecretState::Missing { .. }]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (minimal("    key: sk-inline\n", "  []\n"), "routes[0].key:"),
            (
                minimal("    timeouts: { idle: 5 }\n", "  []\n"),
                "routes[0].timeouts.idle:",
            ),
            (
                minimal("", "  - id: a\n    key_sha256: [abc]\n"),
                "tenants[0].key_sha256[0]:",
            ),
            (
                minimal(
                    "",
                    &format!("  - id: a\n    key_sha256: [{HASH}]\n    routes: [nope]\n"),
                ),
                "tenants[0].routes[0]:",
            ),
            (
                minimal("    key_format: Bearer\n    key: env:SET\n", "  []\n"),
                "routes[0].key_format:",
            ),
            (
                minimal("", "  []\n").replace("https://api.openai.com/v1", "ftp://x"),
                "routes[0].upstreams[0]:",
            ),
            (
                minimal("", "  []\n").replace("127.0.0.1:8080", "localhost"),
                "listen.proxy:",
            ),
        ];
        for (yaml, want) in cases {
            let e = load(&yaml).unwrap_err().to_string();
            assert!(e.starts_with(want), "wanted `{want}`, got `{e}`");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let e = load(&minimal("    prefx: /x\n", "  []\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes[0]") && e.contains("prefx"), "{e}");
    }

    #[test]
    fn duplicate_names_prefixes_and_keys_are_refused() {
        let two = "listen: { proxy: 127.0.0.1:1 }\nroutes:\n  - { name: a, prefix: /x, provider: openai, upstreams: [http://h] }\n  - { name: a, prefix: /y, provider: openai, upstreams: [http://h] }\n";
        assert!(load(two)
            .unwrap_err()
            .to_string()
            .starts_with("routes[1].name"));
        let same = two.replace("name: a, prefix: /y", "name: b, prefix: /x/");
        assert!(load(&same)
            .unwrap_err()
            .to_string()
            .starts_with("routes[1].prefix"));
        let keys = minimal(
            "",
            &format!(
                "  - {{ id: a, key_sha256: [{HASH}] }}\n  - {{ id: b, key_sha256: [{HASH}] }}\n"
            ),
        );
        assert!(load(&keys)
            .unwrap_err()
            .to_string()
            .starts_with("tenants[1].key_sha256[0]"));
    }

    #[test]
    fn upstream_urls_parse() {
        let u = parse_upstream_url("http://127.0.0.1:9000").unwrap();
        assert_eq!((u.tls, u.port, u.base_path.as_str()), (false, 9000, ""));
        assert_eq!(u.host_header(), "127.0.0.1:9000");
        let u = parse_upstream_url("https://[::1]:8443/v1/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        assert_eq!(u.base_path, "/v1");
        assert_eq!(u.authority(), "[::1]:8443");
        let u = parse_upstream_url("https://api.anthropic.com").unwrap();
        assert_eq!(u.host_header(), "api.anthropic.com");
        assert!(parse_upstream_url("https://").is_err());
        assert!(parse_upstream_url("https://h:0").is_err());
        assert!(parse_upstream_url("https://u@h").is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/relay.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::from_yaml(&text, path.parent().unwrap(), &|_| None).unwrap();
        assert!(
            c.mock_listen.is_some(),
            "the first run needs the built-in mock"
        );
    }
}
