//! Routing stage (`request_filter`, `upstream_request_filter`): which route serves a path,
//! the upstream path it maps to, and the provider key header. Pure functions.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::{KeyConfig, ProviderKind, RouteConfig, Timeouts, UpstreamUrl};
use crate::secret::SecretState;
use crate::upstream::Upstream;

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
    pub capture: crate::config::Capture,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Round-robin cursor: each request starts one upstream further.
    next: AtomicUsize,
}

#[derive(Debug)]
pub enum RouteKey {
    None,
    /// Header name and its full value, e.g. (`authorization`, `Bearer sk-...`). The value
    /// is a [`crate::secret::Secret`] so it never reaches a log line.
    Inject {
        header: String,
        value: crate::secret::Secret,
    },
    /// The configured key reference did not resolve; the route answers 503.
    Missing {
        reference: String,
    },
}

impl Route {
    /// Builds the route; fails only when its CA file cannot be loaded.
    pub fn from_config(c: &RouteConfig) -> Result<Route, String> {
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
                state,
            } => match state {
                SecretState::Present(s) => RouteKey::Inject {
                    header: header.clone(),
                    value: crate::secret::Secret::new(format!("{prefix}{}{suffix}", s.expose())),
                },
                SecretState::Missing { reference } => RouteKey::Missing {
                    reference: reference.clone(),
                },
            },
        };
        Ok(Route {
            name: c.name.clone(),
            prefix: c.prefix.clone(),
            provider: c.provider,
            upstreams: c
                .upstreams
                .iter()
                .map(|u| Arc::new(Upstream::new(u.clone(), ca.clone())))
                .collect(),
            key,
            timeouts: c.timeouts,
            ensure_usage: c.ensure_usage,
            capture: c.capture,
            max_body_bytes: c.max_body_bytes,
            next: AtomicUsize::new(0),
        })
    }

    /// The first upstream index for a new request (round robin).
    pub fn first_upstream(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len()
    }

    /// How many connection attempts one request may make: one per resolved address
    /// (as each address of a name is a server of its own), at least one per upstream,
    /// at most [`MAX_ATTEMPTS`].
    pub fn attempt_budget(&self) -> usize {
        let addresses: usize = self.upstreams.iter().map(|u| u.addr_count().max(1)).sum();
        addresses.clamp(1, MAX_ATTEMPTS.max(self.upstreams.len()))
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
        if rest.is_empty() || !rest.starts_with('/') {
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
    pub fn new(configs: &[RouteConfig]) -> Result<RouteTable, String> {
        let mut routes = configs
            .iter()
            .map(|c| Route::from_config(c).map(Arc::new))
            .collect::<Result<Vec<_>, String>>()?;
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
            "/v1/"
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
            RouteKey::Inject { header, value } => {
                assert_eq!(header, "authorization");
                assert_eq!(value.expose(), "Bearer sk-1");
                assert_eq!(format!("{value:?}"), "****");
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
