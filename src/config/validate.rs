//! Configuration stage, validation: the raw structs of `raw.rs` checked section by
//! section and turned into the validated [`Config`] and the settings types the modules
//! own. Checks run in file order (server, listen, routes, tenants, ...), so the first
//! problem of a file is the one reported. Defaults applied here are stated once: the
//! ones a settings type owns come from its `Default`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use super::error::{invalid, ConfigError, Problem};
use super::parse::{check_socket_addr, parse_duration, parse_sha256_hex};
use super::raw::{
    Limits, RawClickHouse, RawClickHouseCluster, RawClickHouseUrl, RawConfig, RawListen,
    RawMetrics, RawMock, RawPrice, RawRedis, RawRedisUrl, RawRowsFile, RawServer, RawTenant,
};
use super::routes::validate_routes;
use super::Config;
use crate::auth::TenantConfig;
use crate::gate::InputLimits;
use crate::limits::redis::{RedisConfig, RedisUrl};
use crate::route::RouteConfig;
use crate::rows::clickhouse::ClickHouseConfig;
use crate::rows::file::FileSinkConfig;
use crate::rows::schema::{Cluster, Layout};
use crate::secret::{Secret, SecretRef, SecretState};

pub(super) type LookupEnv<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Most tenants allowed with `metrics.tenant_label`.
pub const MAX_LABELLED_TENANTS: usize = 200;

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

impl RawConfig {
    /// Checks every section, in file order, and builds the [`Config`]. Relative file
    /// paths are taken from `base_dir`; secrets are read through `lookup_env`.
    pub fn validate(
        mut self,
        base_dir: &Path,
        lookup_env: LookupEnv<'_>,
    ) -> Result<Config, ConfigError> {
        check_server(&self.server)?;
        check_listeners(&self.listen, self.mock.as_ref())?;
        let routes = validate_routes(self.routes, base_dir, lookup_env)?;
        let raw_budgets: Vec<_> = self
            .tenants
            .iter_mut()
            .map(|t| (t.id.clone(), t.budget.take()))
            .collect();
        let mut tenants = validate_tenants(self.tenants, &routes, self.limits.default)?;
        let names: HashSet<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        let mut budgets = super::budgets::by_tenant(&raw_budgets, &self.groups, &names)?;
        for t in &mut tenants {
            t.budgets = budgets.remove(&t.id).unwrap_or_default();
            t.groups = self
                .groups
                .iter()
                .filter(|g| g.members.contains(&t.id))
                .map(|g| g.id.clone())
                .collect();
        }
        let budget_settings = super::budgets::settings(&self.budgets)?;
        let cache_settings = cache_settings(&self.cache, &routes, &self.groups)?;
        let otlp = match &self.telemetry.otlp {
            Some(o) => Some(validate_otlp(o, base_dir, lookup_env)?),
            None => None,
        };
        check_pricing(&self.pricing)?;
        check_tenant_label(self.metrics, tenants.len())?;
        validate_limits(&self.limits.default, "limits.default")?;
        let default_max_tokens = match self.limits.default_max_tokens {
            Some(0) => return Err(invalid("limits.default_max_tokens", Problem::AtLeast(1))),
            set => set.unwrap_or(1024),
        };
        let redis = match &self.redis {
            Some(r) => Some(validate_redis(r, lookup_env)?),
            None => None,
        };
        let (rows_file, rows_file_queue) = validate_rows_file(&self.rows.file, base_dir)?;
        let rows_clickhouse = match &self.rows.clickhouse {
            Some(c) => Some(validate_clickhouse(c, base_dir, lookup_env)?),
            None => None,
        };
        let input_limits = validate_input_limits(&self.listen)?;
        let instance = instance_name(self.server.instance.as_deref());
        let (max_connections_per_address, per_address_defaulted) =
            per_address_cap(&self.listen.proxy, self.listen.max_connections_per_address);
        Ok(Config {
            rows_file_queue,
            rows_file,
            rows_clickhouse,
            instance,
            redis,
            default_max_tokens,
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
            budget_settings,
            cache_settings,
            otlp,
        })
    }
}

/// A duration at `key`.
pub(super) fn duration_at(key: impl Into<String>, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).map_err(|e| invalid(key, e))
}

/// A secret (`env:NAME` or `file:/path`) that must be set for the relay to start.
fn required_secret(
    key: &str,
    text: &str,
    lookup_env: LookupEnv<'_>,
) -> Result<Secret, ConfigError> {
    let reference = SecretRef::parse(text).map_err(|e| invalid(key, e))?;
    match reference.resolve(lookup_env) {
        SecretState::Present(s) => Ok(s),
        SecretState::Missing { reference } => Err(invalid(key, Problem::SecretNotSet(reference))),
    }
}

/// Whether a URL setting is given as a secret reference rather than inline.
fn is_secret_reference(text: &str) -> bool {
    text.starts_with("env:") || text.starts_with("file:")
}

// ---------------------------------------------------------------------------------------
// server, listen, mock.
// ---------------------------------------------------------------------------------------

fn check_server(s: &RawServer) -> Result<(), ConfigError> {
    if s.threads == 0 || s.threads > 1024 {
        return Err(invalid("server.threads", Problem::Threads));
    }
    if s.pid_file.is_empty() {
        return Err(invalid("server.pid_file", Problem::Empty));
    }
    if s.upgrade_sock.is_empty() {
        return Err(invalid("server.upgrade_sock", Problem::Empty));
    }
    Ok(())
}

fn check_listeners(l: &RawListen, mock: Option<&RawMock>) -> Result<(), ConfigError> {
    check_socket_addr(&l.proxy).map_err(|p| invalid("listen.proxy", p))?;
    if l.read_buffer_bytes > 1 << 20 {
        return Err(invalid(
            "listen.read_buffer_bytes",
            Problem::AtMost(1 << 20),
        ));
    }
    if let Some(admin) = &l.admin {
        check_socket_addr(admin).map_err(|p| invalid("listen.admin", p))?;
        if admin == &l.proxy {
            return Err(invalid("listen.admin", Problem::SameAsProxy));
        }
    }
    if let Some(mock) = mock {
        check_socket_addr(&mock.listen).map_err(|p| invalid("mock.listen", p))?;
    }
    Ok(())
}

/// The client-side limits of `listen`; what is not set is [`InputLimits::default`].
fn validate_input_limits(l: &RawListen) -> Result<InputLimits, ConfigError> {
    let default = InputLimits::default();
    let max_header_bytes = match l.max_header_bytes {
        Some(n) if n < 1024 => {
            return Err(invalid("listen.max_header_bytes", Problem::AtLeast(1024)))
        }
        Some(n) => n,
        None => default.max_header_bytes,
    };
    Ok(InputLimits {
        max_header_bytes,
        head_timeout: listen_timeout("head_timeout", &l.head_timeout, default.head_timeout)?,
        client_read_timeout: listen_timeout(
            "client_read_timeout",
            &l.client_read_timeout,
            default.client_read_timeout,
        )?,
        body_read_timeout: listen_timeout(
            "body_read_timeout",
            &l.body_read_timeout,
            default.body_read_timeout,
        )?,
    })
}

fn listen_timeout(
    name: &str,
    set: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let key = format!("listen.{name}");
    let d = match set {
        Some(text) => duration_at(key.clone(), text)?,
        None => default,
    };
    if d.is_zero() {
        return Err(invalid(key, Problem::Zero));
    }
    Ok(d)
}

/// `server.instance`, or the host name.
fn instance_name(set: Option<&str>) -> String {
    match set {
        Some(name) => name.to_string(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "stream-relay".into()),
    }
}

// ---------------------------------------------------------------------------------------
// tenants, limits, pricing, metrics.
// ---------------------------------------------------------------------------------------

fn validate_tenants(
    raw: Vec<RawTenant>,
    routes: &[RouteConfig],
    default_limits: Limits,
) -> Result<Vec<TenantConfig>, ConfigError> {
    let names: HashSet<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    let mut ids = HashSet::new();
    let mut seen_hashes = HashMap::new();
    let mut tenants = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let at = format!("tenants[{i}]");
        if t.id.is_empty() {
            return Err(invalid(format!("{at}.id"), Problem::Empty));
        }
        if !ids.insert(t.id.clone()) {
            return Err(invalid(format!("{at}.id"), Problem::TenantTaken(t.id)));
        }
        let key_hashes = tenant_key_hashes(&at, &t, &mut seen_hashes)?;
        let routes = tenant_routes(&at, &t.routes, &names)?;
        if let Some(l) = &t.limits {
            validate_limits(l, &format!("{at}.limits"))?;
        }
        tenants.push(TenantConfig {
            id: t.id,
            key_hashes,
            routes,
            limits: t.limits.unwrap_or(default_limits),
            budgets: Vec::new(),
            groups: Vec::new(),
        });
    }
    Ok(tenants)
}

/// A tenant's key digests; `seen` holds every tenant's so far, so no key is given twice.
fn tenant_key_hashes(
    at: &str,
    t: &RawTenant,
    seen: &mut HashMap<[u8; 32], String>,
) -> Result<Vec<[u8; 32]>, ConfigError> {
    if t.key_sha256.is_empty() {
        return Err(invalid(format!("{at}.key_sha256"), Problem::NoKeyHashes));
    }
    let mut hashes = Vec::with_capacity(t.key_sha256.len());
    for (k, h) in t.key_sha256.iter().enumerate() {
        let key_at = format!("{at}.key_sha256[{k}]");
        let digest =
            parse_sha256_hex(h).ok_or_else(|| invalid(key_at.clone(), Problem::KeyHash))?;
        if let Some(other) = seen.insert(digest, t.id.clone()) {
            return Err(invalid(key_at, Problem::KeyHashTaken(other)));
        }
        hashes.push(digest);
    }
    Ok(hashes)
}

/// The routes a tenant may use; `None` for all (`*`).
fn tenant_routes(
    at: &str,
    listed: &[String],
    names: &HashSet<&str>,
) -> Result<Option<HashSet<String>>, ConfigError> {
    if listed.iter().any(|r| r == "*") {
        return Ok(None);
    }
    for (k, r) in listed.iter().enumerate() {
        if !names.contains(r.as_str()) {
            return Err(invalid(
                format!("{at}.routes[{k}]"),
                Problem::NoSuchRoute(r.clone()),
            ));
        }
    }
    Ok(Some(listed.iter().cloned().collect()))
}

fn validate_limits(l: &Limits, at: &str) -> Result<(), ConfigError> {
    for (name, v) in [
        ("requests_per_second", l.requests_per_second),
        ("requests_per_minute", l.requests_per_minute),
        ("tokens_per_minute", l.tokens_per_minute),
        ("concurrent_requests", l.concurrent_requests),
    ] {
        if v == Some(0) {
            return Err(invalid(format!("{at}.{name}"), Problem::ZeroLimit));
        }
    }
    Ok(())
}

fn check_pricing(pricing: &BTreeMap<String, RawPrice>) -> Result<(), ConfigError> {
    for (model, p) in pricing {
        for (name, v) in [
            ("input", Some(p.input)),
            ("cached_input", p.cached_input),
            ("output", Some(p.output)),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || v < 0.0 {
                    return Err(invalid(format!("pricing.{model}.{name}"), Problem::Price));
                }
            }
        }
    }
    Ok(())
}

fn check_tenant_label(metrics: RawMetrics, tenants: usize) -> Result<(), ConfigError> {
    if metrics.tenant_label && tenants > MAX_LABELLED_TENANTS {
        return Err(invalid(
            "metrics.tenant_label",
            Problem::TooManyLabelled {
                tenants,
                max: MAX_LABELLED_TENANTS,
            },
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// redis, rows.
// ---------------------------------------------------------------------------------------

/// One Redis URL, inline or from a secret reference.
fn redis_url(key: &str, text: &str, lookup_env: LookupEnv<'_>) -> Result<Secret, ConfigError> {
    let url = if is_secret_reference(text) {
        required_secret(key, text, lookup_env)?
    } else {
        Secret::new(text.to_string())
    };
    if !url.expose().starts_with("redis://") && !url.expose().starts_with("rediss://") {
        return Err(invalid(key, Problem::RedisScheme));
    }
    Ok(url)
}

fn validate_redis(r: &RawRedis, lookup_env: LookupEnv<'_>) -> Result<RedisConfig, ConfigError> {
    let list = |key: &str, nodes: &[String]| -> Result<Vec<Secret>, ConfigError> {
        if nodes.is_empty() {
            return Err(invalid(key, Problem::Empty));
        }
        nodes
            .iter()
            .enumerate()
            .map(|(i, u)| redis_url(&format!("{key}[{i}]"), u, lookup_env))
            .collect()
    };
    let url = match (&r.url, &r.sentinel) {
        (Some(_), Some(_)) => return Err(invalid("redis.sentinel", Problem::RedisUrlAndSentinel)),
        (None, None) => return Err(invalid("redis.url", Problem::Empty)),
        (Some(RawRedisUrl::One(u)), None) => {
            RedisUrl::Single(redis_url("redis.url", u, lookup_env)?)
        }
        (Some(RawRedisUrl::Cluster(nodes)), None) => RedisUrl::Cluster(list("redis.url", nodes)?),
        (None, Some(s)) => {
            if s.service.is_empty() {
                return Err(invalid("redis.sentinel.service", Problem::Empty));
            }
            RedisUrl::Sentinel {
                nodes: list("redis.sentinel.nodes", &s.nodes)?,
                service: s.service.clone(),
            }
        }
    };
    let refuse_when_down = match r.on_failure.as_deref().unwrap_or("local") {
        "local" => false,
        "refuse" => true,
        other => {
            return Err(invalid(
                "redis.on_failure",
                Problem::OnFailure(other.into()),
            ))
        }
    };
    Ok(RedisConfig {
        url,
        timeout: duration_at("redis.timeout", r.timeout.as_deref().unwrap_or("50ms"))?,
        refuse_when_down,
        key_prefix: r
            .key_prefix
            .clone()
            .unwrap_or_else(|| "stream-relay".into()),
        slot_ttl: duration_at("redis.slot_ttl", r.slot_ttl.as_deref().unwrap_or("30m"))?,
    })
}

/// The file sink's settings and its queue length.
fn validate_rows_file(
    f: &RawRowsFile,
    base_dir: &Path,
) -> Result<(FileSinkConfig, usize), ConfigError> {
    if f.path.is_empty() {
        return Err(invalid("rows.file.path", Problem::Empty));
    }
    if f.max_bytes < 4096 {
        return Err(invalid("rows.file.max_bytes", Problem::AtLeast(4096)));
    }
    if f.queue == 0 {
        return Err(invalid("rows.file.queue", Problem::AtLeast(1)));
    }
    let sink = FileSinkConfig {
        path: base_dir.join(&f.path),
        max_bytes: f.max_bytes,
        keep: f.keep,
    };
    Ok((sink, f.queue))
}

fn validate_clickhouse(
    c: &RawClickHouse,
    base_dir: &Path,
    lookup_env: LookupEnv<'_>,
) -> Result<ClickHouseConfig, ConfigError> {
    let urls = match &c.url {
        RawClickHouseUrl::One(u) => vec![clickhouse_url("rows.clickhouse.url", u, lookup_env)?],
        RawClickHouseUrl::Nodes(nodes) if nodes.is_empty() => {
            return Err(invalid("rows.clickhouse.url", Problem::Empty))
        }
        RawClickHouseUrl::Nodes(nodes) => nodes
            .iter()
            .enumerate()
            .map(|(i, u)| clickhouse_url(&format!("rows.clickhouse.url[{i}]"), u, lookup_env))
            .collect::<Result<_, _>>()?,
    };
    let database = c.database.clone().unwrap_or_else(|| "stream_relay".into());
    if !crate::rows::schema::valid_database(&database) {
        return Err(invalid("rows.clickhouse.database", Problem::DatabaseName));
    }
    let password = match &c.password {
        Some(p) => Some(required_secret("rows.clickhouse.password", p, lookup_env)?),
        None => None,
    };
    let settings = clickhouse_settings(&c.settings)?;
    let dur = |key: &str, set: &Option<String>, default: &str| {
        duration_at(
            format!("rows.clickhouse.{key}"),
            set.as_deref().unwrap_or(default),
        )
    };
    let at_least_one = |key: &str, set: Option<usize>, default: usize| match set {
        Some(0) => Err(invalid(
            format!("rows.clickhouse.{key}"),
            Problem::AtLeast(1),
        )),
        set => Ok(set.unwrap_or(default)),
    };
    let layout = match c.layout.as_deref().unwrap_or("auto") {
        "auto" => None,
        "legacy" => Some(Layout::Legacy),
        "current" => Some(Layout::Current),
        other => {
            return Err(invalid(
                "rows.clickhouse.layout",
                Problem::ClickHouseLayout(other.into()),
            ))
        }
    };
    if c.ttl_days == Some(0) {
        return Err(invalid("rows.clickhouse.ttl_days", Problem::AtLeast(1)));
    }
    Ok(ClickHouseConfig {
        urls,
        cluster: c.cluster.as_ref().map(clickhouse_cluster).transpose()?,
        layout,
        ttl_days: c.ttl_days,
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
        shutdown_flush: duration_at(
            "rows.clickhouse.shutdown_flush",
            c.shutdown_flush.as_deref().unwrap_or("5s"),
        )?,
    })
}

/// `telemetry.otlp`: the collector, its protocol and sampling, secrets resolved.
fn validate_otlp(
    o: &super::raw::RawOtlp,
    base_dir: &Path,
    lookup_env: LookupEnv<'_>,
) -> Result<crate::telemetry::OtlpConfig, ConfigError> {
    let key = "telemetry.otlp";
    let grpc = match o.protocol.as_deref().unwrap_or("http/protobuf") {
        "http/protobuf" => false,
        "grpc" => true,
        other => {
            return Err(invalid(
                format!("{key}.protocol"),
                Problem::OneOf(other.into(), "http/protobuf, grpc"),
            ))
        }
    };
    let (endpoint, metrics_endpoint) = otlp_endpoints(&o.endpoint, grpc)?;
    let headers = otlp_headers(&o.headers, lookup_env)?;
    let ratio = o.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&ratio) {
        return Err(invalid(format!("{key}.sample_ratio"), Problem::Ratio));
    }
    let follow_client = match o.client_sampling.as_deref().unwrap_or("follow") {
        "follow" => true,
        "ratio" => false,
        other => {
            let why = Problem::OneOf(other.to_string(), "follow, ratio");
            return Err(invalid(format!("{key}.client_sampling"), why));
        }
    };
    let dur = |name: &str, set: &Option<String>, default: &str| {
        duration_at(format!("{key}.{name}"), set.as_deref().unwrap_or(default))
    };
    let positive = |name: &str, set: Option<usize>, default: usize| match set {
        Some(0) => Err(invalid(format!("{key}.{name}"), Problem::AtLeast(1))),
        set => Ok(set.unwrap_or(default)),
    };
    Ok(crate::telemetry::OtlpConfig {
        endpoint,
        headers,
        sample_ratio: ratio,
        follow_client,
        ca_pem: otlp_ca(o.ca_file.as_deref(), base_dir)?,
        service_name: o
            .service_name
            .clone()
            .unwrap_or_else(|| "stream-relay".into()),
        queue: positive("queue", o.queue, 8192)?,
        batch: positive("batch", o.batch, 512)?,
        interval: dur("interval", &o.interval, "1s")?,
        timeout: dur("timeout", &o.timeout, "5s")?,
        metrics_endpoint,
        metrics_interval: dur("metrics_interval", &o.metrics_interval, "10s")?,
        grpc,
    })
}

/// The traces and metrics URLs of `telemetry.otlp.endpoint`: `http://` or `https://`,
/// `/v1/traces` and `/v1/metrics` added to a bare host (for http/protobuf).
fn otlp_endpoints(endpoint: &str, grpc: bool) -> Result<(String, String), ConfigError> {
    let key = "telemetry.otlp";
    let Some(rest) =
        (endpoint.strip_prefix("http://")).or_else(|| endpoint.strip_prefix("https://"))
    else {
        return Err(invalid(format!("{key}.endpoint"), Problem::OtlpScheme));
    };
    let after_host = rest.split_once('/').map_or("", |(_, p)| p);
    let base = endpoint.trim_end_matches('/');
    let (endpoint, metrics_endpoint) = if grpc {
        // gRPC names the service, not a path: the collector's address is all.
        (base.to_string(), base.to_string())
    } else if after_host.is_empty() {
        (format!("{base}/v1/traces"), format!("{base}/v1/metrics"))
    } else if let Some(root) = base.strip_suffix("/v1/traces") {
        (base.to_string(), format!("{root}/v1/metrics"))
    } else {
        (base.to_string(), format!("{base}/v1/metrics"))
    };
    Ok((endpoint, metrics_endpoint))
}

/// `telemetry.otlp.headers`, secret references resolved.
fn otlp_headers(
    set: &BTreeMap<String, String>,
    lookup_env: LookupEnv<'_>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let key = "telemetry.otlp";
    let mut headers = Vec::with_capacity(set.len());
    for (name, value) in set {
        let at = format!("{key}.headers.{name}");
        let value = if is_secret_reference(value) {
            required_secret(&at, value, lookup_env)?
                .expose()
                .to_string()
        } else {
            value.clone()
        };
        headers.push((name.clone(), value));
    }
    Ok(headers)
}

/// `telemetry.otlp.ca_file`'s certificates, which must be at least one.
fn otlp_ca(file: Option<&str>, base_dir: &Path) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(file) = file else {
        return Ok(None);
    };
    let key = "telemetry.otlp.ca_file";
    let path = base_dir.join(file);
    let pem = std::fs::read(&path).map_err(|error| {
        let path = path.clone();
        invalid(key, Problem::CaRead { path, error })
    })?;
    if crate::upstream::parse_ca_pem(&pem).is_none_or(|c| c.is_empty()) {
        return Err(invalid(key, Problem::CaEmpty(path)));
    }
    Ok(Some(pem))
}

/// `cache:`, and every route's `cache.shared_by` naming a group.
fn cache_settings(
    raw: &super::raw::RawCache,
    routes: &[RouteConfig],
    groups: &[super::raw::RawGroup],
) -> Result<crate::cache::CacheSettings, ConfigError> {
    for (i, r) in routes.iter().enumerate() {
        let Some(group) = r.cache.as_ref().and_then(|c| c.shared_by.as_ref()) else {
            continue;
        };
        if !groups.iter().any(|g| &g.id == group) {
            return Err(invalid(
                format!("routes[{i}].cache.shared_by"),
                Problem::NoSuchGroup(group.clone()),
            ));
        }
    }
    if raw.memory_bytes == Some(0) {
        return Err(invalid("cache.memory_bytes", Problem::AtLeast(1)));
    }
    Ok(crate::cache::CacheSettings {
        memory_bytes: raw.memory_bytes.unwrap_or(256 << 20),
        in_redis: raw.in_redis,
    })
}

/// `rows.clickhouse.cluster`: names and SQL fragments that go into the DDL as written.
fn clickhouse_cluster(c: &RawClickHouseCluster) -> Result<Cluster, ConfigError> {
    let fragment = |key: &str, text: &str| {
        if text.trim().is_empty() {
            Err(invalid(
                format!("rows.clickhouse.cluster.{key}"),
                Problem::Empty,
            ))
        } else if text.contains([';', '\\']) || (key == "name" && text.contains(['\'', '"'])) {
            Err(invalid(
                format!("rows.clickhouse.cluster.{key}"),
                Problem::SqlFragment,
            ))
        } else {
            Ok(text.trim().to_string())
        }
    };
    Ok(Cluster {
        name: fragment("name", &c.name)?,
        engine: fragment("engine", c.engine.as_deref().unwrap_or("MergeTree"))?,
        sharding_key: fragment(
            "sharding_key",
            c.sharding_key.as_deref().unwrap_or("rand()"),
        )?,
    })
}

/// ClickHouse's HTTP URL, inline or from a secret reference; plain http only.
fn clickhouse_url(key: &str, text: &str, lookup_env: LookupEnv<'_>) -> Result<String, ConfigError> {
    let url = if is_secret_reference(text) {
        required_secret(key, text, lookup_env)?.expose().to_string()
    } else {
        text.to_string()
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(invalid(key, Problem::ClickHouseScheme));
    }
    if url.starts_with("https://") {
        return Err(invalid(key, Problem::ClickHouseHttps));
    }
    Ok(url)
}

/// `rows.clickhouse.settings` as the text ClickHouse takes (booleans as 0 or 1).
fn clickhouse_settings(
    settings: &BTreeMap<String, serde_yaml::Value>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::with_capacity(settings.len());
    for (k, v) in settings {
        let value = match v {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => u8::from(*b).to_string(),
            _ => {
                return Err(invalid(
                    format!("rows.clickhouse.settings.{k}"),
                    Problem::SettingValue,
                ))
            }
        };
        out.push((k.clone(), value));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// routes.
// ---------------------------------------------------------------------------------------
