//! Routing stage (`request_filter`, `upstream_request_filter`): which route serves a path,
//! the upstream path it maps to, and the provider key header. Pure functions.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::breaker::{Breaker, Pass, Transition};
use crate::provider::ProviderKind;
use crate::secret::SecretState;
use crate::stall::Timeouts;
use crate::upstream::Upstream;
use crate::upstream::UpstreamUrl;

/// Upper bound on connection attempts per request when names resolve to many addresses.
pub const MAX_ATTEMPTS: usize = 4;

/// A route ready for the request path: its key header is prebuilt once at load time.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub prefix: String,
    pub provider: ProviderKind,
    pub upstreams: Vec<Arc<Upstream>>,
    pub key: RouteKey,
    pub timeouts: Timeouts,
    /// Ask OpenAI-style upstreams for usage the client did not ask for (see config).
    pub ensure_usage: bool,
    /// Body bytes kept in the request's row.
    pub capture: Capture,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    pub balance: Balance,
    pub weights: Vec<u32>,
    /// Smooth weighted round robin state (`balance: weighted`).
    current_weights: Mutex<Vec<i64>>,
    pub max_attempts: Option<usize>,
    /// Upstream statuses tried again elsewhere.
    pub retry_on: Vec<u16>,
    pub retry_after_send: bool,
    /// Active health checks of the upstreams, if any.
    pub health_check: Option<crate::upstream::HealthCheck>,
    /// What the route serves and which headers it sets (see [`crate::policy`]).
    pub policy: crate::policy::RoutePolicy,
    /// The route's response cache, when it has one.
    pub cache: Option<crate::cache::RouteCache>,
    /// Round-robin cursors: each pick starts one upstream (key) further.
    next: AtomicUsize,
    next_key: AtomicUsize,
}

/// One provider key of a route's pool.
#[derive(Debug)]
pub struct KeySlot {
    /// `key1`, `key2`...: the key's place in the configuration, for logs and metrics.
    pub label: String,
    /// The full header value, e.g. `Bearer sk-...`.
    pub value: crate::secret::Secret,
    /// Set aside after the provider's 429 (for its Retry-After) or repeated 401/403.
    pub breaker: Breaker,
}

/// What one attempt uses: an upstream and, when the route injects keys, a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub upstream: usize,
    pub key: Option<usize>,
    /// This attempt is the half-open probe of the upstream (key).
    pub upstream_probe: bool,
    pub key_probe: bool,
    /// The breakers' generations when picked (see `Breaker::generation`).
    pub upstream_gen: u64,
    pub key_gen: u64,
}

/// The order upstreams are tried in for one pick; round robin needs no list.
enum Order {
    Rotate { start: usize, n: usize },
    List(Vec<usize>),
}

impl Order {
    fn iter(&self) -> impl Iterator<Item = usize> + Clone + '_ {
        let (rotate, list) = match self {
            Order::Rotate { start, n } => (Some((0..*n).map(move |k| (start + k) % n)), None),
            Order::List(v) => (None, Some(v.iter().copied())),
        };
        rotate
            .into_iter()
            .flatten()
            .chain(list.into_iter().flatten())
    }
}

/// A breaker state change seen while picking: (target label, transition).
pub type Seen = Vec<(String, Transition)>;

/// Picks, in `order`, the first index not in `tried` (unless all are) whose breaker lets
/// it through; when none does, the one that reopens first (better an attempt than a
/// refusal: the upstream may be back).
fn choose(
    order: impl Iterator<Item = usize> + Clone,
    tried: u64,
    breaker: impl Fn(usize) -> (Pass, Option<Transition>),
    label: impl Fn(usize) -> String,
    seen: &mut Seen,
) -> (usize, bool) {
    let all_tried = order.clone().all(|i| tried & (1 << i) != 0);
    let mut fallback: Option<(usize, Instant)> = None;
    for i in order.clone() {
        if !all_tried && tried & (1 << i) != 0 {
            continue;
        }
        let (pass, transition) = breaker(i);
        if let Some(t) = transition {
            seen.push((label(i), t));
        }
        match pass {
            Pass::Yes => return (i, false),
            Pass::Probe => return (i, true),
            Pass::No { until } => {
                if fallback.is_none_or(|(_, u)| until < u) {
                    fallback = Some((i, until));
                }
            }
        }
    }
    let first = order.clone().next().unwrap_or(0);
    (fallback.map_or(first, |(i, _)| i), false)
}

#[derive(Debug)]
pub enum RouteKey {
    None,
    /// Header name and the pool of its full values, e.g. (`authorization`,
    /// [`Bearer sk-...`]). Values are [`crate::secret::Secret`]s, never in a log line.
    Pool {
        header: String,
        keys: Vec<KeySlot>,
    },
    /// The configured key reference did not resolve; the route answers 503.
    Missing {
        reference: String,
    },
}

impl Route {
    /// Builds the route; fails only when its CA file cannot be loaded.
    pub fn from_config(c: &RouteConfig) -> Result<Route, crate::upstream::CaError> {
        let ca = match &c.ca_pem {
            Some(path) => Some(crate::upstream::load_ca(path)?),
            None => None,
        };
        let key = match &c.key {
            KeyConfig::None => RouteKey::None,
            KeyConfig::Injected {
                header,
                prefix,
                suffix,
                states,
            } => {
                let mut keys = Vec::new();
                let mut missing = Vec::new();
                for (i, state) in states.iter().enumerate() {
                    match state {
                        SecretState::Present(s) => keys.push(KeySlot {
                            label: format!("key{}", i + 1),
                            value: crate::secret::Secret::new(format!(
                                "{prefix}{}{suffix}",
                                s.expose()
                            )),
                            breaker: Breaker::new(c.breaker),
                        }),
                        SecretState::Missing { reference } => missing.push(reference.clone()),
                    }
                }
                if keys.is_empty() {
                    RouteKey::Missing {
                        reference: missing.join(", "),
                    }
                } else {
                    if !missing.is_empty() {
                        log::warn!(
                            "route `{}`: keys not set, left out of its pool: {}",
                            c.name,
                            missing.join(", ")
                        );
                    }
                    RouteKey::Pool {
                        header: header.clone(),
                        keys,
                    }
                }
            }
        };
        Ok(Route {
            name: c.name.clone(),
            prefix: c.prefix.clone(),
            provider: c.provider,
            upstreams: c
                .upstreams
                .iter()
                .map(|u| Arc::new(Upstream::with_breaker(u.clone(), ca.clone(), c.breaker)))
                .collect(),
            key,
            timeouts: c.timeouts,
            ensure_usage: c.ensure_usage,
            capture: c.capture,
            max_body_bytes: c.max_body_bytes,
            balance: c.balance,
            weights: c.weights.clone(),
            current_weights: Mutex::new(vec![0; c.upstreams.len()]),
            max_attempts: c.max_attempts,
            retry_on: c.retry_on.clone(),
            retry_after_send: c.retry_after_send,
            health_check: c.health_check.clone(),
            policy: c.policy.clone(),
            cache: c.cache.clone(),
            next: AtomicUsize::new(0),
            next_key: AtomicUsize::new(0),
        })
    }

    /// The first upstream index for a new request (round robin).
    pub fn first_upstream(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len()
    }

    fn key_count(&self) -> usize {
        match &self.key {
            RouteKey::Pool { keys, .. } => keys.len(),
            _ => 0,
        }
    }

    /// How many attempts one request may make: `max_attempts`, or one per resolved
    /// address (as each address of a name is a server of its own) or key, at least one
    /// per upstream, at most [`MAX_ATTEMPTS`] (or the count of upstreams or keys).
    pub fn attempt_budget(&self) -> usize {
        if let Some(n) = self.max_attempts {
            return n;
        }
        let addresses: usize = self.upstreams.iter().map(|u| u.addr_count().max(1)).sum();
        let keys = self.key_count();
        addresses
            .max(keys)
            .clamp(1, MAX_ATTEMPTS.max(self.upstreams.len()).max(keys))
    }

    /// Whether another attempt could change what answered `status`: an untried key for
    /// the key's refusals (429, 401, 403), an untried upstream for anything else.
    pub fn has_untried_for(&self, status: u16, tried_upstreams: u64, tried_keys: u64) -> bool {
        let untried = |n: usize, tried: u64| (0..n).any(|i| tried & (1 << i) == 0);
        match status {
            429 | 401 | 403 => untried(self.key_count(), tried_keys),
            _ => untried(self.upstreams.len(), tried_upstreams),
        }
    }

    /// The upstream order for one pick, by the route's policy.
    fn upstream_order(&self) -> Order {
        let n = self.upstreams.len();
        let start = self.first_upstream();
        match self.balance {
            Balance::RoundRobin => Order::Rotate { start, n },
            Balance::LeastInFlight => {
                let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
                order.sort_by_key(|&i| self.upstreams[i].in_flight.load(Ordering::Relaxed));
                Order::List(order)
            }
            Balance::Weighted => {
                // Smooth weighted round robin: the highest running weight goes first.
                let mut cw = self
                    .current_weights
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let total: i64 = self.weights.iter().map(|w| i64::from(*w)).sum();
                for (c, w) in cw.iter_mut().zip(&self.weights) {
                    *c += i64::from(*w);
                }
                let best = (0..n)
                    .max_by_key(|&i| (cw[i], std::cmp::Reverse(i)))
                    .unwrap_or(0);
                cw[best] -= total;
                let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
                order.retain(|&i| i != best);
                order.insert(0, best);
                Order::List(order)
            }
        }
    }

    /// Chooses the upstream and key for one attempt, avoiding those this request tried
    /// and those whose breaker is open. State changes seen are returned to be reported.
    pub fn pick(&self, tried_upstreams: u64, tried_keys: u64, now: Instant) -> (Pick, Seen) {
        let mut seen = Vec::new();
        let order = self.upstream_order();
        let (upstream, upstream_probe) = choose(
            order.iter(),
            tried_upstreams,
            |i| self.upstreams[i].breaker.check(now),
            |i| self.upstreams[i].label(),
            &mut seen,
        );
        let (key, key_probe) = match &self.key {
            RouteKey::Pool { keys, .. } => {
                let n = keys.len();
                let start = self.next_key.fetch_add(1, Ordering::Relaxed) % n;
                let (k, probe) = choose(
                    (0..n).map(|j| (start + j) % n),
                    tried_keys,
                    |j| keys[j].breaker.check(now),
                    |j| keys[j].label.clone(),
                    &mut seen,
                );
                (Some(k), probe)
            }
            _ => (None, false),
        };
        let upstream_gen = self.upstreams[upstream].breaker.generation();
        let key_gen = self.key_slot(key).map_or(0, |k| k.breaker.generation());
        (
            Pick {
                upstream,
                key,
                upstream_probe,
                key_probe,
                upstream_gen,
                key_gen,
            },
            seen,
        )
    }

    /// The key slot of a pick.
    pub fn key_slot(&self, key: Option<usize>) -> Option<&KeySlot> {
        match (&self.key, key) {
            (RouteKey::Pool { keys, .. }, Some(k)) => keys.get(k),
            _ => None,
        }
    }

    /// The path the provider sees for a request path, on the first upstream (the body
    /// rewrites are decided on it; every upstream was checked to serve the request).
    pub fn provider_path(&self, path: &str) -> String {
        self.upstream_target(&self.upstreams[0].url, path)
    }

    /// The same with the request's query, for the response cache's key.
    pub fn provider_path_and_query(&self, uri: &http::Uri) -> String {
        let path = self.provider_path(uri.path());
        match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        }
    }

    /// Whether the route serves `method` on `path`: `Ok`, or the refusal.
    pub fn check_endpoint(
        &self,
        method: &http::Method,
        path: &str,
        websocket: bool,
    ) -> Result<(), crate::error::RelayError> {
        use crate::error::RelayError;
        use crate::policy::Allowed;
        // Every upstream a request may fail over to must serve it: their base paths may
        // differ (suffix patterns allow that), and each sees its own path.
        for (i, u) in self.upstreams.iter().enumerate() {
            let base = &u.url.base_path;
            if self.upstreams[..i].iter().any(|v| v.url.base_path == *base) {
                continue;
            }
            let provider_path = self.upstream_target(&u.url, path);
            match self
                .policy
                .endpoints
                .check(method, &provider_path, websocket)
            {
                Allowed::Yes => {}
                Allowed::WrongMethod => {
                    return Err(RelayError::EndpointMethod {
                        allow: self.policy.endpoints.methods_for(&provider_path),
                    })
                }
                Allowed::No => {
                    return Err(RelayError::EndpointNotServed {
                        method: method.to_string(),
                        path: path.to_string(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Builds the upstream request target: the upstream's base path, then the request
    /// path after the route prefix, then the query unchanged.
    pub fn upstream_target(&self, upstream: &UpstreamUrl, path_and_query: &str) -> String {
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        let rest = if self.prefix == "/" {
            path
        } else {
            &path[self.prefix.len().min(path.len())..]
        };
        let mut target =
            String::with_capacity(upstream.base_path.len() + rest.len() + query.len() + 1);
        target.push_str(&upstream.base_path);
        // A request for the prefix itself goes to the base path itself (`/v1/messages`
        // on a route whose prefix and base both name the endpoint), not to a path with
        // a trailing `/` no provider serves.
        if (rest.is_empty() && upstream.base_path.is_empty())
            || (!rest.is_empty() && !rest.starts_with('/'))
        {
            target.push('/');
        }
        target.push_str(rest);
        target.push_str(query);
        target
    }
}

/// All routes, longest prefix first.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Fails only when a route's CA file cannot be loaded.
    pub fn new(configs: &[RouteConfig]) -> Result<RouteTable, crate::upstream::CaError> {
        let mut routes = configs
            .iter()
            .map(|c| Route::from_config(c).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(RouteTable { routes })
    }

    /// Every upstream of every route, for the resolver.
    pub fn all_upstreams(&self) -> Vec<Arc<Upstream>> {
        self.routes
            .iter()
            .flat_map(|r| r.upstreams.iter().cloned())
            .collect()
    }

    /// The route whose prefix matches `path` on a whole segment, longest first.
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| prefix_matches(&r.prefix, path))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// A validated route (`routes[]`), from which [`Route`] is built.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub prefix: String,
    pub provider: ProviderKind,
    pub upstreams: Vec<UpstreamUrl>,
    pub key: KeyConfig,
    pub ca_pem: Option<std::path::PathBuf>,
    pub timeouts: Timeouts,
    pub ensure_usage: bool,
    pub capture: Capture,
    pub max_body_bytes: usize,
    pub balance: Balance,
    /// One per upstream (all 1 unless weighted).
    pub weights: Vec<u32>,
    pub breaker: crate::breaker::BreakerConfig,
    pub max_attempts: Option<usize>,
    pub retry_on: Vec<u16>,
    pub retry_after_send: bool,
    pub health_check: Option<crate::upstream::HealthCheck>,
    pub policy: crate::policy::RoutePolicy,
    pub cache: Option<crate::cache::RouteCache>,
}

#[derive(Debug, Clone)]
pub enum KeyConfig {
    /// The upstream needs no key (the mock, a private vLLM).
    None,
    Injected {
        header: String,
        /// Value template split around `{key}`.
        prefix: String,
        suffix: String,
        /// One or more keys (`keys` is a pool), in order.
        states: Vec<SecretState>,
    },
}

/// How a route picks its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastInFlight,
    Weighted,
}

/// Bytes of a body kept in its row: 0 is off, `usize::MAX` the whole body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capture {
    pub request: usize,
    pub response: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn table() -> RouteTable {
        let yaml = "listen: { proxy: 127.0.0.1:1 }\nroutes:\n  - { name: root, prefix: /, provider: openai_compatible, upstreams: [http://vllm:8000] }\n  - { name: oa, prefix: /openai/v1, provider: openai, upstreams: [https://api.openai.com/v1, http://b:81/x], key: env:K }\n  - { name: az, prefix: /azure, provider: openai, upstreams: [https://r.openai.azure.com/openai], key: env:NO, key_header: api-key }\n";
        let c = Config::from_yaml(yaml, Path::new("."), &|n| (n == "K").then(|| "sk-1".into()))
            .unwrap();
        RouteTable::new(&c.routes).unwrap()
    }

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let t = table();
        assert_eq!(t.find("/openai/v1/chat/completions").unwrap().name, "oa");
        assert_eq!(t.find("/openai/v1").unwrap().name, "oa");
        assert_eq!(t.find("/openai/v10/x").unwrap().name, "root");
        assert_eq!(t.find("/azure/deployments/x").unwrap().name, "az");
        assert!(t.find("no-slash").is_none());
    }

    #[test]
    fn upstream_target_joins_base_path_rest_and_query() {
        let t = table();
        let oa = t.find("/openai/v1").unwrap();
        assert_eq!(
            oa.upstream_target(&oa.upstreams[0].url, "/openai/v1/chat/completions?x=1"),
            "/v1/chat/completions?x=1"
        );
        assert_eq!(
            oa.upstream_target(&oa.upstreams[0].url, "/openai/v1"),
            "/v1"
        );
        assert_eq!(
            oa.upstream_target(&oa.upstreams[0].url, "/openai/v1?x=1"),
            "/v1?x=1"
        );
        let root = t.find("/v1/models").unwrap();
        assert_eq!(
            root.upstream_target(&root.upstreams[0].url, "/v1/models"),
            "/v1/models"
        );
    }

    #[test]
    fn key_value_is_prebuilt_and_missing_keys_are_kept() {
        let t = table();
        match &t.find("/openai/v1").unwrap().key {
            RouteKey::Pool { header, keys } => {
                assert_eq!(header, "authorization");
                assert_eq!(keys.len(), 1);
                assert_eq!(keys[0].value.expose(), "Bearer sk-1");
                assert_eq!(format!("{:?}", keys[0].value), "****");
                assert_eq!(keys[0].label, "key1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.find("/azure").unwrap().key,
            RouteKey::Missing { .. }
        ));
    }

    #[test]
    fn round_robin_advances() {
        let t = table();
        let oa = t.find("/openai/v1").unwrap();
        let a = oa.first_upstream();
        let b = oa.first_upstream();
        assert_ne!(a, b);
    }
}
