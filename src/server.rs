//! Wiring: a Pingora `Server` with the proxy, admin, resolver and (optionally) mock
//! services, built from a validated [`Config`]. `main.rs` only parses the command line.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::{info, warn};
use pingora_core::apps::http_app::HttpServer;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use pingora_proxy::http_proxy;

use crate::admin::{Admin, DrainWatch, Draining};
use crate::auth::TenantTable;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mock::Mock;
use crate::proxy::RelayProxy;
use crate::reload::{Reloader, Tenants};
use crate::route::{RouteKey, RouteTable};
use crate::upstream::Resolver;

/// Pingora's process settings from the relay's configuration.
pub fn server_conf(config: &Config) -> ServerConf {
    let s = &config.server;
    ServerConf {
        threads: s.threads,
        daemon: s.daemon,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        error_log: s.error_log.clone(),
        grace_period_seconds: Some(s.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout_seconds),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        work_stealing: s.work_stealing,
        ..ServerConf::default()
    }
}

/// Why the server cannot be built from a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A route's CA file cannot be loaded.
    #[error(transparent)]
    Ca(#[from] crate::upstream::CaError),
    /// `redis.url` is not a URL the Redis client takes.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// The OTLP exporter cannot be built.
    #[error("telemetry.otlp: {0}")]
    Telemetry(String),
}

/// Builds the server. Upstream names are resolved here once, waiting at most 3 s, before any
/// runtime starts; the resolver service refreshes them afterwards.
pub fn build(
    config: &Config,
    config_path: &std::path::Path,
    opt: Opt,
) -> Result<(Server, crate::rows::Ending), BuildError> {
    let (routes, resolver) = routes_at_start(config)?;

    let mut server = Server::new_with_opt_and_conf(opt, server_conf(config));
    server.bootstrap();

    let metrics = Arc::new(Metrics::new(config.metrics.tenant_label));
    let draining = Arc::new(Draining::default());
    let tenants = Arc::new(Tenants::new(TenantTable::new(&config.tenants)));
    let (row_sender, ending) = add_row_writer(&mut server, config, &metrics);
    let (redis, budgets, cache) = fleet_state(config, &metrics)?;
    let shared = Shared {
        tenants: &tenants,
        metrics: &metrics,
        redis,
        budgets: budgets.clone(),
        cache,
        telemetry: match &config.otlp {
            Some(o) => Some(Arc::new(
                crate::telemetry::Telemetry::start(o, metrics.registry())
                    .map_err(BuildError::Telemetry)?,
            )),
            None => None,
        },
    };
    add_proxy(&mut server, config, &routes, &shared, row_sender);
    add_admin(&mut server, config, &shared, &draining);
    server.add_service(background_service("drain watch", DrainWatch(draining)));
    server.add_service(background_service("log flusher", crate::logsink::Flusher));
    server.add_service(background_service(
        "session closer",
        crate::websocket::SessionCloser {
            grace: std::time::Duration::from_secs(config.server.grace_period_seconds),
        },
    ));
    server.add_service(background_service("upstream resolver", resolver));
    server.add_service(background_service(
        "health checks",
        crate::health::HealthChecker {
            routes: routes.clone(),
            metrics: metrics.clone(),
        },
    ));
    server.add_service(background_service(
        "config reload",
        Reloader {
            path: config_path.to_path_buf(),
            tenants,
            metrics,
            route_names: config.route_names().map(str::to_string).collect(),
        },
    ));
    if let Some(mock_addr) = &config.mock_listen {
        server.add_service(background_service(
            "mock provider",
            MockService {
                listen: mock_addr.clone(),
            },
        ));
    }
    info!(
        "stream-relay: proxy on {}, admin on {}, {} routes, {} tenants",
        config.proxy_listen,
        config.admin_listen.as_deref().unwrap_or("(off)"),
        config.routes.len(),
        config.tenants.len()
    );
    Ok((server, ending))
}

/// The route table, with a warning for each route whose key is not set, and the resolver
/// after its first round (at most 3 s).
fn routes_at_start(config: &Config) -> Result<(Arc<RouteTable>, Resolver), BuildError> {
    let routes = Arc::new(RouteTable::new(&config.routes)?);
    for route in routes.iter() {
        if let RouteKey::Missing { reference } = &route.key {
            warn!(
                "route `{}` answers 503: its provider key ({reference}) is not set",
                route.name
            );
        }
    }
    let resolver = Resolver {
        upstreams: routes.all_upstreams(),
    };
    match resolver.resolve_at_start(Duration::from_secs(3)) {
        Ok(failures) => {
            for failure in failures {
                warn!("upstream resolution at start: {failure}");
            }
        }
        Err(pending) => warn!(
            "upstream resolution still running after 3s, continuing in the background: {}",
            pending.join(", ")
        ),
    }
    Ok((routes, resolver))
}

/// The row writer (ClickHouse when configured, else the file) as a background service;
/// returns the sender requests put their rows in and what `main` waits on at exit.
fn add_row_writer(
    server: &mut Server,
    config: &Config,
    metrics: &Arc<Metrics>,
) -> (crate::rows::RowSender, crate::rows::Ending) {
    let flushed = crate::rows::Flushed::default();
    let mut deliver: Option<crate::rows::Deliver> = None;
    let (row_sender, write_late): (_, crate::rows::WriteLate) = match &config.rows_clickhouse {
        Some(ch) => {
            let (sender, rx) = crate::rows::channel(ch.queue, metrics.clone());
            let sink = crate::rows::clickhouse::ClickHouseSink::new(
                ch.clone(),
                rx,
                metrics.clone(),
                &flushed,
            );
            server.add_service(background_service("row writer", sink));
            let (at_exit, m) = (ch.clone(), metrics.clone());
            deliver = Some(Box::new(move || {
                crate::rows::clickhouse::deliver_at_exit(&at_exit, m)
            }));
            let (ch, metrics) = (ch.clone(), metrics.clone());
            (
                sender,
                Box::new(move |rows| crate::rows::clickhouse::write_late(&ch, rows, metrics)),
            )
        }
        None => {
            let (sender, rx) = crate::rows::channel(config.rows_file_queue, metrics.clone());
            let sink = crate::rows::file::FileSink::new(
                config.rows_file.clone(),
                rx,
                metrics.clone(),
                &flushed,
            );
            server.add_service(background_service("row writer", sink));
            let (file, metrics) = (config.rows_file.clone(), metrics.clone());
            (
                sender,
                Box::new(move |rows| crate::rows::file::write_late(&file, &rows, &metrics)),
            )
        }
    };
    let ending = crate::rows::Ending::new(&row_sender, flushed, write_late, deliver);
    (row_sender, ending)
}

/// The proxy service: the relay's `ProxyHttp` behind the head gate, on `listen.proxy`
/// with its read buffer and connection caps.
/// The fleet's Redis connection (limits and budgets share it) and the budget engine.
fn fleet_state(config: &Config, metrics: &Metrics) -> Result<FleetState, BuildError> {
    let redis = match &config.redis {
        Some(r) => Some(Arc::new(crate::limits::redis::RedisConnection::open(r)?)),
        None => None,
    };
    let backend =
        redis
            .clone()
            .zip(config.redis.as_ref())
            .map(|(conn, r)| crate::budget::Backend {
                redis: conn,
                key_prefix: r.key_prefix.clone(),
                refuse_when_down: r.refuse_when_down,
            });
    let budgets = crate::budget::Budgets::new(
        backend,
        config.pricing.clone(),
        config.budget_settings.clone(),
        metrics.registry(),
    );
    let cache = crate::cache::Cache::new(
        &config.cache_settings,
        redis
            .clone()
            .zip(config.redis.as_ref())
            .map(|(conn, r)| (conn, r.key_prefix.clone())),
        metrics.registry(),
    );
    for route in config.routes.iter().filter(|r| r.cache.is_some()) {
        cache.declare_route(&route.name);
    }
    Ok((redis, Arc::new(budgets), Arc::new(cache)))
}

/// The fleet's Redis connection, the budget engine and the response cache.
type FleetState = (
    Option<Arc<crate::limits::redis::RedisConnection>>,
    Arc<crate::budget::Budgets>,
    Arc<crate::cache::Cache>,
);

/// What the proxy and the admin service share.
struct Shared<'a> {
    tenants: &'a Arc<Tenants>,
    metrics: &'a Arc<Metrics>,
    /// The fleet's Redis, for limits and budgets.
    redis: Option<Arc<crate::limits::redis::RedisConnection>>,
    budgets: Arc<crate::budget::Budgets>,
    cache: Arc<crate::cache::Cache>,
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

fn add_proxy(
    server: &mut Server,
    config: &Config,
    routes: &Arc<RouteTable>,
    shared: &Shared<'_>,
    rows: crate::rows::RowSender,
) {
    let (tenants, metrics) = (shared.tenants, shared.metrics);
    let pricing = Arc::new(config.pricing.clone());
    let recorder = Arc::new(crate::recorder::Recorder {
        metrics: metrics.clone(),
        pricing: pricing.clone(),
        rows,
        instance: Arc::from(config.instance.as_str()),
        telemetry: shared.telemetry.clone(),
    });
    let limiter: Arc<dyn crate::limits::Limiter> = match (&config.redis, &shared.redis) {
        (Some(r), Some(conn)) => Arc::new(crate::limits::redis::RedisLimiter::with_connection(
            conn.clone(),
            r,
            metrics.clone(),
        )),
        _ => Arc::new(crate::limits::local::LocalLimiter::default()),
    };
    server.add_service(background_service(
        "limiter clock",
        crate::limits::LimiterClock(limiter.clone()),
    ));
    let proxy = RelayProxy {
        input: config.input_limits,
        routes: routes.clone(),
        tenants: tenants.clone(),
        metrics: metrics.clone(),
        pricing: pricing.clone(),
        limiter: limiter.clone(),
        default_max_tokens: config.default_max_tokens,
        recorder: recorder.clone(),
        budgets: shared.budgets.clone(),
        cache: shared.cache.clone(),
        telemetry: shared.telemetry.clone(),
    };
    let gate = crate::headgate::HeadGate::new(
        http_proxy(&server.configuration, proxy),
        config.input_limits.head_timeout,
        config.input_limits.max_header_bytes,
        routes.clone(),
        recorder,
        crate::conncap::ConnectionCap::new(
            config.max_connections,
            config.max_connections_per_address,
            metrics.clone(),
        ),
    );
    let mut proxy_service = Service::new("stream-relay proxy".to_string(), gate);
    proxy_service.add_listener(
        ListenerConfig::tcp(config.proxy_listen.as_str())
            .l4_buffer(L4BufferSettings::default().read(config.proxy_read_buffer)),
    );
    server.add_service(proxy_service);
}

/// The admin service (`/healthz`, `/readyz`, `/metrics`), when `listen.admin` is set.
fn add_admin(server: &mut Server, config: &Config, shared: &Shared<'_>, draining: &Arc<Draining>) {
    let Some(admin_addr) = &config.admin_listen else {
        return;
    };
    let mut admin = Service::new(
        "stream-relay admin".to_string(),
        HttpServer::new_app(Admin {
            metrics: shared.metrics.clone(),
            draining: draining.clone(),
            budgets: shared.budgets.clone(),
            tenants: shared.tenants.clone(),
        }),
    );
    admin.threads = Some(1);
    admin.add_tcp(admin_addr);
    server.add_service(admin);
}

/// The built-in mock provider as a background service of the relay (first-run demo).
struct MockService {
    listen: String,
}

#[async_trait]
impl BackgroundService for MockService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let listener = match tokio::net::TcpListener::bind(&self.listen).await {
            Ok(l) => l,
            Err(e) => {
                warn!("mock provider cannot listen on {}: {e}", self.listen);
                return;
            }
        };
        info!("mock provider listening on {}", self.listen);
        tokio::select! {
            _ = Mock::new(None).serve(listener, None) => {}
            _ = shutdown.changed() => {}
        }
    }
}
