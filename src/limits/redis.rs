//! The fleet limiter: every relay asks one Redis, so a tenant has one budget however many
//! relays serve it. One atomic Lua script per decision, on Redis' own clock (`TIME`),
//! with an expiry on every key it writes and a versioned key prefix. Every call runs
//! under a timeout. When Redis is down or slow, the relay goes on under its local
//! limiter (or refuses, if so configured), says so once in its log, counts each fallback,
//! and goes back to Redis by itself: it asks again at most once a second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use log::{info, warn};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::OnceCell;

use super::local::LocalLimiter;
use super::Limits;
use super::{Admission, Budget, LimitKind, Limiter, Refused, SharedHold};
use crate::metrics::Metrics;

/// Script version: a change of the script's keys or meaning bumps it, so relays of two
/// versions never read each other's counters.
const VERSION: &str = "v1";

/// Admission. KEYS[1]: the tenant's key prefix. ARGV: requests/s, requests/min,
/// tokens/min, tokens asked, concurrency (0 = no limit), in-flight member, slot ttl ms.
/// Returns {1, 0, 0, rps_left, rpm_left, tpm_left, tokens_key, rpm_reset_ms,
/// tpm_reset_ms} or {0, kind, retry_ms, ...}, kind 1..4 = rps, rpm, tpm, concurrency.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function window(name, interval)
  local cur = math.floor(now / interval)
  local kc = KEYS[1] .. ':' .. name .. ':' .. cur
  local c = tonumber(redis.call('GET', kc) or '0')
  local p = tonumber(redis.call('GET', KEYS[1] .. ':' .. name .. ':' .. (cur - 1)) or '0')
  local into = now % interval
  return p * (1 - into / interval) + c, kc, interval - into, p, c, into
end
-- How long until `cost` more fits under `limit` with nothing else counted: the previous
-- window's weight fading within this one, or (when this window's own count leaves no
-- room) this window's count fading in the next. Whole ms, one more for rounding.
local function wait_ms(p, c, into, interval, cost, limit)
  if c + cost <= limit then
    if p <= 0 then return 1 end
    local at = interval * (1 - (limit - c - cost) / p)
    return math.max(1, math.ceil(at - into) + 1)
  end
  local u = 0
  if c > 0 then u = math.max(0, math.ceil(interval * (1 - (limit - cost) / c))) end
  return interval - into + u + 1
end
local limits = {
  {tonumber(ARGV[1]), 'rps', 1000, 1},
  {tonumber(ARGV[2]), 'rpm', 60000, 1},
  {tonumber(ARGV[3]), 'tpm', 60000, tonumber(ARGV[4])},
}
local left = {-1, -1, -1}
local keys = {'', '', ''}
local resets = {0, 0, 0}
-- Refused: the longest wait of the limits it does not fit, so that waiting it fits all.
local refused, wait = 0, 0
for i, l in ipairs(limits) do
  if l[1] > 0 then
    local used, key, reset, p, c, into = window(l[2], l[3])
    if used + l[4] > l[1] then
      local w = wait_ms(p, c, into, l[3], l[4], l[1])
      if w > wait then refused, wait = i, w end
    end
    left[i] = math.floor(l[1] - used - l[4])
    keys[i] = key
    resets[i] = reset
  end
end
if refused > 0 then
  return {0, refused, wait, 0, 0, 0, '', 0, 0}
end
local conc = tonumber(ARGV[5])
local inflight = KEYS[1] .. ':inflight'
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
  if redis.call('ZCARD', inflight) >= conc then
    return {0, 4, 1000, 0, 0, 0, '', 0, 0}
  end
  redis.call('ZADD', inflight, now + tonumber(ARGV[7]), ARGV[6])
  redis.call('PEXPIRE', inflight, tonumber(ARGV[7]))
end
for i, l in ipairs(limits) do
  if l[1] > 0 then
    redis.call('INCRBY', keys[i], l[4])
    redis.call('PEXPIRE', keys[i], l[3] * 2)
  end
end
return {1, 0, 0, left[1], left[2], left[3], keys[3], resets[2], resets[3]}
"#;

/// The admission script with its clock taken from ARGV[8] (Unix milliseconds) instead of
/// Redis' `TIME`, and otherwise the same: for tests that drive the windows through
/// chosen moments.
#[doc(hidden)]
pub fn admit_script_with_clock_argument() -> String {
    let clock = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";
    assert!(
        ADMIT.contains(clock),
        "the admission script reads its clock elsewhere"
    );
    ADMIT.replace(clock, "local now = tonumber(ARGV[8])\n")
}

/// Settlement. KEYS[1]: the tenant's key prefix. ARGV: tokens key ('' for none), token
/// delta, in-flight member ('' for none). The delta goes into the window the tokens were
/// reserved in (ARGV[1] names it), never into a later one, and only while that window's
/// key lives; unused tokens given back never take its count below zero.
const SETTLE: &str = r#"
local delta = tonumber(ARGV[2])
if ARGV[1] ~= '' and delta ~= 0 then
  local held = redis.call('GET', ARGV[1])
  if held then
    held = tonumber(held)
    if delta < 0 and -delta > held then
      delta = -math.max(held, 0)
    end
    if delta ~= 0 then
      redis.call('INCRBY', ARGV[1], delta)
    end
  end
end
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[1] .. ':inflight', ARGV[3])
end
return 1
"#;

/// The limiter's Redis client: one server, or a Redis Cluster (every script touches one
/// tenant's keys, which share a hash slot, so each call goes to that slot's master).
enum Client {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
    Sentinel(Arc<SentinelConn>),
}

/// A connection to the master the sentinels name. It is asked for again after any
/// failure, so a failover (the old master gone, or back as a read-only replica) costs
/// the calls until the sentinels name the new one.
pub struct SentinelConn {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    config: redis::AsyncConnectionConfig,
}

impl SentinelConn {
    /// Sends one packed command (or pipeline, `count` answers from `offset`).
    async fn call(
        &self,
        cmd: Option<&redis::Cmd>,
        pipeline: Option<(&redis::Pipeline, usize, usize)>,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        use redis::aio::ConnectionLike;
        let mut held = self.conn.lock().await;
        if held.is_none() {
            let c = self
                .client
                .lock()
                .await
                .get_async_connection_with_config(&self.config)
                .await?;
            *held = Some(c);
        }
        let conn = held.as_mut().expect("just set");
        let result = match (cmd, pipeline) {
            (Some(cmd), _) => conn.req_packed_command(cmd).await.map(|v| vec![v]),
            (None, Some((p, offset, count))) => conn.req_packed_commands(p, offset, count).await,
            (None, None) => Ok(Vec::new()),
        };
        if result.is_err() {
            *held = None;
        }
        result
    }
}

/// A connection of either kind; each reconnects by itself (and a cluster's follows a
/// failover to the promoted replica).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let mut v = s.call(Some(cmd), None).await?;
                Ok(v.pop().unwrap_or(redis::Value::Nil))
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => Box::pin(s.call(None, Some((pipeline, offset, count)))),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(_) => 0,
        }
    }
}

/// The fleet's Redis: one client and its connection, made on first use, shared by the
/// limiter and the budgets.
pub struct RedisConnection {
    client: Client,
    conn: OnceCell<Conn>,
    timeout: Duration,
}

impl RedisConnection {
    /// Fails only when the URL is not one the Redis client takes; nothing connects yet.
    pub fn open(config: &RedisConfig) -> Result<RedisConnection, redis::RedisError> {
        let connect = config.timeout.max(Duration::from_millis(200));
        let client = match &config.url {
            RedisUrl::Single(url) => Client::Single(redis::Client::open(url.expose())?),
            RedisUrl::Cluster(nodes) => Client::Cluster(Box::new(
                redis::cluster::ClusterClient::builder(nodes.iter().map(|n| n.expose()))
                    .connection_timeout(connect)
                    .response_timeout(config.timeout)
                    .retries(1)
                    .build()?,
            )),
            RedisUrl::Sentinel { nodes, service } => {
                let client = redis::sentinel::SentinelClient::build(
                    nodes.iter().map(|n| n.expose()).collect(),
                    service.clone(),
                    None,
                    redis::sentinel::SentinelServerType::Master,
                )?;
                Client::Sentinel(Arc::new(SentinelConn {
                    client: tokio::sync::Mutex::new(client),
                    conn: tokio::sync::Mutex::new(None),
                    config: redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(connect))
                        .set_response_timeout(Some(config.timeout)),
                }))
            }
        };
        Ok(RedisConnection {
            client,
            conn: OnceCell::new(),
            timeout: config.timeout,
        })
    }

    /// The connection, made on first use inside the proxy's runtime (after any fork).
    pub async fn get(&self) -> Result<Conn, String> {
        self.conn
            .get_or_try_init(|| async {
                match &self.client {
                    Client::Single(client) => {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(
                                self.timeout.max(Duration::from_millis(200)),
                            ))
                            .set_response_timeout(Some(self.timeout))
                            .set_number_of_retries(1);
                        ConnectionManager::new_with_config(client.clone(), config)
                            .await
                            .map(Conn::Single)
                    }
                    Client::Cluster(client) => {
                        client.get_async_connection().await.map(Conn::Cluster)
                    }
                    Client::Sentinel(s) => Ok(Conn::Sentinel(s.clone())),
                }
                .map_err(|e| e.to_string())
            })
            .await
            .cloned()
    }

    /// A call under the configured timeout.
    pub async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer in {:?}", self.timeout)),
        }
    }
}

pub struct RedisLimiter {
    redis: Arc<RedisConnection>,
    admit_script: Script,
    settle_script: Script,
    prefix: String,
    timeout: Duration,
    slot_ttl: Duration,
    refuse_when_down: bool,
    local: LocalLimiter,
    metrics: Arc<Metrics>,
    down: AtomicBool,
    /// Milliseconds since `epoch` before which Redis is not asked again.
    retry_after_ms: AtomicU64,
    epoch: Instant,
}

impl RedisLimiter {
    /// Fails only when the URL is not one the Redis client takes; nothing connects yet.
    pub fn new(
        config: &RedisConfig,
        metrics: Arc<Metrics>,
    ) -> Result<RedisLimiter, redis::RedisError> {
        let redis = Arc::new(RedisConnection::open(config)?);
        Ok(RedisLimiter::with_connection(redis, config, metrics))
    }

    /// A limiter on a connection shared with others (the budgets).
    pub fn with_connection(
        redis: Arc<RedisConnection>,
        config: &RedisConfig,
        metrics: Arc<Metrics>,
    ) -> RedisLimiter {
        RedisLimiter {
            redis,
            admit_script: Script::new(ADMIT),
            settle_script: Script::new(SETTLE),
            prefix: format!("{}:{VERSION}", config.key_prefix),
            timeout: config.timeout,
            slot_ttl: config.slot_ttl,
            refuse_when_down: config.refuse_when_down,
            local: LocalLimiter::default(),
            metrics,
            down: AtomicBool::new(false),
            retry_after_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn tenant_key(&self, tenant: &str) -> String {
        // The hash tag keeps a tenant's keys in one slot of a Redis cluster.
        format!("{}:{{{tenant}}}", self.prefix)
    }

    fn may_ask(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        now >= self.retry_after_ms.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, e: &str) {
        self.metrics.limiter_redis_failure();
        let later = self.epoch.elapsed().as_millis() as u64 + 1000;
        self.retry_after_ms.store(later, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            warn!(
                "redis limiter unavailable ({what}: {e}); {} until it answers again",
                if self.refuse_when_down {
                    "refusing limited requests"
                } else {
                    "using this relay's local limits"
                }
            );
            self.metrics.limiter_redis_up(false);
        }
    }

    fn answered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            info!("redis limiter answers again; fleet-wide limits resumed");
            self.metrics.limiter_redis_up(true);
        }
    }

    async fn ask_admit(
        &self,
        tenant: &str,
        member: &str,
        limits: &Limits,
        tokens: u64,
    ) -> Result<Vec<redis::Value>, String> {
        let mut conn = self.redis.get().await?;
        let mut call = self.admit_script.key(self.tenant_key(tenant));
        call.arg(limits.requests_per_second.unwrap_or(0))
            .arg(limits.requests_per_minute.unwrap_or(0))
            .arg(limits.tokens_per_minute.unwrap_or(0))
            .arg(tokens)
            .arg(limits.concurrent_requests.unwrap_or(0))
            .arg(member)
            .arg(self.slot_ttl.as_millis() as u64);
        match tokio::time::timeout(self.timeout, call.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer in {:?}", self.timeout)),
        }
    }

    fn fallback(&self, tenant: &str, limits: &Limits, tokens: u64) -> Result<Admission, Refused> {
        if self.refuse_when_down {
            return Err(Refused {
                kind: LimitKind::Unavailable,
                retry_after: Duration::from_secs(1),
                requests: None,
                tokens: None,
            });
        }
        self.local.admit_now(tenant, limits, tokens)
    }
}

fn int(v: &redis::Value) -> i64 {
    match v {
        redis::Value::Int(i) => *i,
        _ => 0,
    }
}

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    }
}

/// Reads the admission script's reply.
fn read_reply(
    v: &[redis::Value],
    limits: &Limits,
    tokens: u64,
    member: &str,
) -> Result<Admission, Refused> {
    let field = |i: usize| v.get(i).map_or(0, int);
    let budget = |limit: Option<u64>, left: i64, reset_ms: i64| {
        limit.map(|limit| Budget {
            limit,
            remaining: left.max(0) as u64,
            reset: Duration::from_millis(reset_ms.max(0) as u64),
        })
    };
    if field(0) == 0 {
        let kind = match field(1) {
            1 => LimitKind::RequestsPerSecond,
            2 => LimitKind::RequestsPerMinute,
            3 => LimitKind::TokensPerMinute,
            _ => LimitKind::Concurrency,
        };
        let wait = Duration::from_millis(field(2).max(1) as u64);
        let zero = |limit: Option<u64>| {
            limit.map(|limit| Budget {
                limit,
                remaining: 0,
                reset: wait,
            })
        };
        return Err(Refused {
            kind,
            retry_after: wait,
            requests: if kind.is_tokens() {
                None
            } else {
                zero(limits.requests_per_minute.or(limits.requests_per_second))
            },
            tokens: if kind.is_tokens() {
                zero(limits.tokens_per_minute)
            } else {
                None
            },
        });
    }
    let requests = match limits.requests_per_minute {
        Some(_) => budget(limits.requests_per_minute, field(4), field(7)),
        None => budget(limits.requests_per_second, field(3), 1000),
    };
    Ok(Admission {
        reserved_tokens: if limits.tokens_per_minute.is_some() {
            tokens
        } else {
            0
        },
        slot: None,
        window_ends: None,
        shared: Some(SharedHold {
            tokens_key: v.get(6).map(text).unwrap_or_default(),
            member: if limits.concurrent_requests.is_some() {
                member.to_string()
            } else {
                String::new()
            },
        }),
        requests,
        tokens: budget(limits.tokens_per_minute, field(5), field(8)),
    })
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn admit(
        &self,
        tenant: &str,
        request_id: &str,
        limits: &Limits,
        tokens: u64,
    ) -> Result<Admission, Refused> {
        // No shared count can change this answer: Redis is not asked.
        if let Some(refused) = super::exceeds_limit(limits, tokens) {
            return Err(refused);
        }
        if !self.may_ask() {
            return self.fallback(tenant, limits, tokens);
        }
        match self.ask_admit(tenant, request_id, limits, tokens).await {
            Ok(reply) => {
                self.answered();
                read_reply(&reply, limits, tokens, request_id)
            }
            Err(e) => {
                self.failed("admit", &e);
                self.fallback(tenant, limits, tokens)
            }
        }
    }

    async fn settle(
        &self,
        tenant: &str,
        limits: &Limits,
        admission: Admission,
        actual: Option<u64>,
    ) {
        let Some(hold) = &admission.shared else {
            // Admitted by the local fallback: settled there.
            self.local.settle_now(tenant, limits, &admission, actual);
            return;
        };
        let delta = match actual {
            Some(a) if admission.reserved_tokens > 0 => a as i64 - admission.reserved_tokens as i64,
            _ => 0,
        };
        if delta == 0 && hold.member.is_empty() {
            return;
        }
        let result = async {
            let mut conn = self.redis.get().await?;
            let mut call = self.settle_script.key(self.tenant_key(tenant));
            call.arg(&hold.tokens_key).arg(delta).arg(&hold.member);
            match tokio::time::timeout(self.timeout, call.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer in {:?}", self.timeout)),
            }
        }
        .await;
        // A lost settlement costs the tenant its estimate until the window passes, and
        // its slot until the slot's expiry: counted, never retried on the request path.
        if let Err(e) = result {
            self.failed("settle", &e);
        }
    }

    /// The local counts used while Redis is down keep their windows on schedule too.
    fn tick(&self) {
        self.local.tick();
    }
}
/// Where the limiter's Redis is (`redis.url`): one server's URL, or a list of a Redis
/// Cluster's nodes (any of them; the rest of the cluster is learned from them).
#[derive(Debug, Clone)]
pub enum RedisUrl {
    Single(crate::secret::Secret),
    Cluster(Vec<crate::secret::Secret>),
    /// The master `service` as the sentinels at `nodes` name it now.
    Sentinel {
        nodes: Vec<crate::secret::Secret>,
        service: String,
    },
}

/// Validated Redis settings (`redis`).
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: RedisUrl,
    pub timeout: Duration,
    pub refuse_when_down: bool,
    pub key_prefix: String,
    pub slot_ttl: Duration,
}
