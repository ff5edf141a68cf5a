//! The exact response cache (admission, `request_filter`: lookup and the answer of a hit;
//! the client body filter: what the client got, kept; `logging`: the store).
//!
//! Opt-in per route. A request is keyed by its scope (its tenant, or the group a route
//! shares entries with), route, upstream path and query, format (stream or JSON) and its
//! body in canonical form (see [`key`]). Only deterministic requests are cached unless
//! the route says `when: always`. Only a complete success is stored: status 200, usage
//! known, and for a stream its terminating event seen; never an error, a cut or stalled
//! stream, or an answer larger than `max_entry_bytes`. A hit is replayed as the client
//! first got it, a stream event by event. Identical requests that arrive while the first
//! is still running wait for its entry, up to the route's `wait`, then go upstream.

pub mod key;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{info, warn};
use prometheus::{CounterVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::Notify;

use crate::limits::redis::RedisConnection;
pub use store::Entry;
use store::{MemoryStore, RedisStore};

/// Which requests of a route may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// `temperature` 0, or a `seed`.
    Deterministic,
    Always,
}

/// A route's `cache:` section, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteCache {
    pub ttl: Duration,
    pub max_entry_bytes: usize,
    pub when: When,
    /// Tenants of this group share entries (others keep their own).
    pub shared_by: Option<String>,
    /// How long an identical request waits for a running one's entry.
    pub wait: Duration,
}

/// The top-level `cache:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// Bytes the in-memory store holds (when entries are not in Redis).
    pub memory_bytes: usize,
    /// Entries go to the Redis of `redis:` instead of memory.
    pub in_redis: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            memory_bytes: 256 << 20,
            in_redis: false,
        }
    }
}

/// What a request does with the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Served from an entry when there is one; a miss is stored.
    Lookup,
    /// Not served from the cache; its answer replaces the entry (`x-relay-cache:
    /// refresh`, `Cache-Control: no-cache`).
    Refresh,
    /// Neither read nor stored: the client said so (`x-relay-cache: skip`,
    /// `Cache-Control: no-store`), or the request is not one the route caches.
    Bypass,
}

/// The request header that steers the cache for one request, and the answer header
/// that tells what the cache did (`hit`, `miss`, `refresh`, `bypass`).
pub const HEADER: &str = "x-relay-cache";

/// One request's use of the cache.
pub struct Plan {
    pub mode: Mode,
    pub key: String,
    pub route: Arc<str>,
    pub config: RouteCache,
    pub stream: bool,
    /// Set when this request is the one identical requests wait for.
    leader: Option<Leader>,
    /// The entry that answered it.
    pub hit: Option<Arc<Entry>>,
    /// Its answer was stored.
    pub stored: bool,
}

impl Plan {
    /// The row's and the answer header's word for what the cache did.
    pub fn result(&self) -> &'static str {
        match (self.mode, self.hit.is_some(), self.stored) {
            (_, true, _) => "hit",
            (Mode::Bypass, _, _) => "bypass",
            (_, _, true) => "store",
            (Mode::Refresh, _, false) => "refresh",
            (Mode::Lookup, _, false) => "miss",
        }
    }
}

/// What the client asked of the cache in its headers.
pub fn asked(headers: &http::HeaderMap) -> Mode {
    let own = headers.get(HEADER).map(|v| v.as_bytes());
    if own.is_some_and(|v| v.eq_ignore_ascii_case(b"skip")) {
        return Mode::Bypass;
    }
    let control = headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect::<Vec<_>>();
    if control.iter().any(|d| d == "no-store") {
        return Mode::Bypass;
    }
    if own.is_some_and(|v| v.eq_ignore_ascii_case(b"refresh"))
        || control.iter().any(|d| d == "no-cache")
    {
        return Mode::Refresh;
    }
    Mode::Lookup
}

/// Removes the key from the running requests when the leader ends, however it ends,
/// and wakes the identical requests waiting for it.
struct Leader {
    cache: Arc<Cache>,
    key: String,
}

impl Drop for Leader {
    fn drop(&mut self) {
        let notify = lock(&self.cache.running).remove(&self.key);
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct CacheMetrics {
    requests: IntCounterVec,
    stores: IntCounterVec,
    evictions: IntCounter,
    bytes: IntGauge,
    saved: CounterVec,
    failures: IntCounter,
}

impl CacheMetrics {
    fn new(registry: &Registry) -> CacheMetrics {
        fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            r.register(Box::new(m.clone())).expect("unique metric");
            m
        }
        CacheMetrics {
            requests: reg(registry, IntCounterVec::new(
                Opts::new("stream_relay_cache_requests_total", "Requests on caching routes by what the cache did: hit, miss, refresh, bypass."),
                &["route", "result"],
            ).expect("metric")),
            stores: reg(registry, IntCounterVec::new(
                Opts::new("stream_relay_cache_stores_total", "Answers stored in the cache."),
                &["route"],
            ).expect("metric")),
            evictions: reg(registry, IntCounter::new("stream_relay_cache_evictions_total", "Entries the in-memory cache evicted to stay within its bytes.").expect("metric")),
            bytes: reg(registry, IntGauge::new("stream_relay_cache_bytes", "Bytes of answers the in-memory cache holds.").expect("metric")),
            saved: reg(registry, CounterVec::new(
                Opts::new("stream_relay_cache_saved_usd_total", "What the answers served from the cache cost when they were first made."),
                &["route"],
            ).expect("metric")),
            failures: reg(registry, IntCounter::new("stream_relay_cache_redis_failures_total", "Cache reads or writes Redis did not answer; each read was served as a miss.").expect("metric")),
        }
    }
}

/// The cache: its store, the requests running for each key, the metrics.
pub struct Cache {
    memory: MemoryStore,
    redis: Option<RedisStore>,
    running: Mutex<HashMap<String, Arc<Notify>>>,
    metrics: CacheMetrics,
    down: AtomicBool,
    /// Milliseconds since `epoch` before which Redis is not asked again.
    retry_at_ms: AtomicU64,
    epoch: Instant,
}

/// What a lookup found.
pub enum Found {
    Hit(Arc<Entry>),
    Miss,
}

impl Cache {
    pub fn new(
        settings: &CacheSettings,
        redis: Option<(Arc<RedisConnection>, String)>,
        registry: &Registry,
    ) -> Cache {
        Cache {
            memory: MemoryStore::new(settings.memory_bytes),
            redis: redis
                .filter(|_| settings.in_redis)
                .map(|(conn, prefix)| RedisStore::new(conn, &prefix)),
            running: Mutex::new(HashMap::new()),
            metrics: CacheMetrics::new(registry),
            down: AtomicBool::new(false),
            retry_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A route that caches: its counters exist from the start, at 0.
    pub fn declare_route(&self, route: &str) {
        for result in ["hit", "miss", "refresh", "bypass"] {
            self.metrics.requests.with_label_values(&[route, result]);
        }
        self.metrics.stores.with_label_values(&[route]);
        self.metrics.saved.with_label_values(&[route]);
    }

    /// The request's plan: keyed, with what the client asked and what the route caches.
    pub fn plan(
        &self,
        config: &RouteCache,
        parts: &key::KeyParts<'_>,
        body: &[u8],
        asked: Mode,
    ) -> Plan {
        let canonical = key::canonical(body);
        let cacheable = canonical
            .as_ref()
            .is_some_and(|c| config.when == When::Always || c.deterministic);
        Plan {
            mode: if cacheable { asked } else { Mode::Bypass },
            key: canonical.map_or_else(String::new, |c| key::key(parts, &c)),
            route: parts.route.into(),
            config: config.clone(),
            stream: parts.format != "json",
            leader: None,
            hit: None,
            stored: false,
        }
    }

    /// Looks the plan's key up. On a miss while an identical request runs, waits for its
    /// entry up to the route's `wait`; a request that finds none running becomes the
    /// one others wait for.
    pub async fn lookup(self: &Arc<Self>, plan: &mut Plan) {
        if plan.mode == Mode::Lookup {
            if let Found::Hit(e) = self.get(&plan.key).await {
                plan.hit = Some(e);
                return;
            }
        }
        if plan.mode == Mode::Bypass {
            return;
        }
        // A leader that ends without an entry (an error, say) wakes its waiters: one of
        // them becomes the next leader, the others wait for it, all within `wait`.
        let deadline = Instant::now() + plan.config.wait;
        loop {
            let waiting = {
                let mut running = lock(&self.running);
                match running.get(&plan.key) {
                    Some(n) if plan.mode == Mode::Lookup => Some(n.clone()),
                    Some(_) => None,
                    None => {
                        running.insert(plan.key.clone(), Arc::new(Notify::new()));
                        plan.leader = Some(Leader {
                            cache: self.clone(),
                            key: plan.key.clone(),
                        });
                        None
                    }
                }
            };
            let Some(notify) = waiting else {
                return;
            };
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // The leader may have finished between the lookup and the registration.
            if let Found::Hit(e) = self.get(&plan.key).await {
                plan.hit = Some(e);
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, woken).await.is_err() {
                return;
            }
            if let Found::Hit(e) = self.get(&plan.key).await {
                plan.hit = Some(e);
                return;
            }
        }
    }

    async fn get(&self, key: &str) -> Found {
        let found = match &self.redis {
            None => self.memory.get(key, Instant::now()),
            Some(redis) if self.may_ask() => match redis.get(key).await {
                Ok(e) => {
                    self.answered();
                    e.map(Arc::new)
                }
                Err(e) => {
                    self.failed("read", &e);
                    None
                }
            },
            Some(_) => None,
        };
        match found {
            Some(e) => Found::Hit(e),
            None => Found::Miss,
        }
    }

    /// Stores a complete answer for the plan's key (one store per key at a time: the
    /// memory store replaces under its lock, Redis' SET is atomic).
    pub async fn store(&self, plan: &mut Plan, entry: Entry) {
        if entry.size() > plan.config.max_entry_bytes {
            return;
        }
        let ttl = plan.config.ttl;
        match &self.redis {
            None => {
                let evicted = self.memory.put(&plan.key, entry, ttl, Instant::now());
                self.metrics.evictions.inc_by(evicted.0);
                self.metrics.bytes.set(self.memory.bytes() as i64);
            }
            Some(redis) if self.may_ask() => {
                if let Err(e) = redis.put(&plan.key, &entry, ttl).await {
                    self.failed("write", &e);
                    return;
                }
                self.answered();
            }
            Some(_) => return,
        }
        plan.stored = true;
        self.metrics.stores.with_label_values(&[&plan.route]).inc();
    }

    /// A request on a caching route ended: counted by what the cache did.
    pub fn count(&self, plan: &Plan) {
        let result = plan.result();
        let result = if result == "store" { "miss" } else { result };
        self.metrics
            .requests
            .with_label_values(&[&plan.route, result])
            .inc();
        if let Some(cost) = plan.hit.as_ref().and_then(|e| e.cost) {
            self.metrics
                .saved
                .with_label_values(&[&plan.route])
                .inc_by(cost);
        }
    }

    fn may_ask(&self) -> bool {
        self.epoch.elapsed().as_millis() as u64 >= self.retry_at_ms.load(Ordering::Relaxed)
    }

    fn answered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            info!("cache: Redis answers again");
        }
    }

    fn failed(&self, what: &str, e: &str) {
        self.metrics.failures.inc();
        let later = self.epoch.elapsed().as_millis() as u64 + 1000;
        self.retry_at_ms.store(later, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            warn!("cache: Redis unavailable ({what}: {e}); requests are served as misses until it answers");
        }
    }
}

/// What the client got of an answer, kept for the cache: a stream's events one by one,
/// a JSON answer whole; dropped past `max` bytes.
#[derive(Debug)]
pub struct Capture {
    stream: bool,
    chunks: Vec<Bytes>,
    partial: Vec<u8>,
    bytes: usize,
    max: usize,
    pub overflow: bool,
}

impl Capture {
    pub fn new(stream: bool, max: usize) -> Capture {
        Capture {
            stream,
            chunks: Vec::new(),
            partial: Vec::new(),
            bytes: 0,
            max,
            overflow: false,
        }
    }

    pub fn feed(&mut self, b: &[u8]) {
        if self.overflow {
            return;
        }
        self.bytes += b.len();
        if self.bytes > self.max {
            self.overflow = true;
            self.chunks.clear();
            self.partial = Vec::new();
            return;
        }
        self.partial.extend_from_slice(b);
        if !self.stream {
            return;
        }
        while let Some(end) = event_end(&self.partial) {
            let rest = self.partial.split_off(end);
            let event = std::mem::replace(&mut self.partial, rest);
            self.chunks.push(Bytes::from(event));
        }
    }

    /// The body's pieces, once the answer is whole.
    pub fn finish(mut self) -> Option<Vec<Bytes>> {
        if self.overflow {
            return None;
        }
        if !self.partial.is_empty() {
            self.chunks.push(Bytes::from(self.partial));
        }
        Some(self.chunks)
    }
}

/// Where the first event in `b` ends: after its blank line, `\n\n` or `\r\n\r\n`.
fn event_end(b: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(b, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(b, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_ending_in_crlf_are_kept_one_by_one_too() {
        let mut c = Capture::new(true, 1000);
        c.feed(b"event: a\r\ndata: 1\r\n\r\nevent: b\r\ndata: 2\r\n\r\n");
        assert_eq!(
            c.finish().unwrap(),
            ["event: a\r\ndata: 1\r\n\r\n", "event: b\r\ndata: 2\r\n\r\n"]
        );
    }

    #[test]
    fn a_stream_is_kept_event_by_event_however_it_was_cut() {
        let mut c = Capture::new(true, 1000);
        for piece in [
            "data: {\"a\"",
            ":1}\n",
            "\ndata: {\"b\":2}\n\ndata: [DO",
            "NE]\n\n",
        ] {
            c.feed(piece.as_bytes());
        }
        let chunks = c.finish().unwrap();
        assert_eq!(
            chunks,
            [
                "data: {\"a\":1}\n\n",
                "data: {\"b\":2}\n\n",
                "data: [DONE]\n\n"
            ]
        );
        let mut json = Capture::new(false, 1000);
        json.feed(b"{\"id\":");
        json.feed(b"1}");
        assert_eq!(json.finish().unwrap(), ["{\"id\":1}"]);
        let mut big = Capture::new(true, 10);
        big.feed(b"data: 0123456789\n\n");
        assert!(big.finish().is_none());
    }

    #[test]
    fn the_client_steers_the_cache_with_its_headers() {
        let mode = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            asked(&h)
        };
        assert_eq!(mode(&[]), Mode::Lookup);
        assert_eq!(mode(&[(HEADER, "skip")]), Mode::Bypass);
        assert_eq!(mode(&[(HEADER, "refresh")]), Mode::Refresh);
        assert_eq!(mode(&[("cache-control", "no-cache")]), Mode::Refresh);
        assert_eq!(
            mode(&[("cache-control", "max-age=0, no-store")]),
            Mode::Bypass
        );
    }
}
