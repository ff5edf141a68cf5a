//! Observation stage (`upstream_response_filter`, `response_body_filter`, `logging`):
//! Prometheus metric families owned by the proxy. Labels stay bounded: routes come from
//! the configuration, models are the priced ones (others are `other`), outcomes and
//! error kinds from fixed sets, and tenants only when `metrics.tenant_label` is set for
//! a short tenant list. Handles are resolved once per request, never per chunk.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::tap::Usage;

/// Latency buckets (seconds) for first byte / first token: 5 ms to 2 minutes.
const FIRST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0,
    30.0, 60.0, 120.0,
];
/// Gaps between events: 1 ms to 30 s.
const GAP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 5.0,
    10.0, 30.0,
];
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    ttft: HistogramVec,
    ttfa: HistogramVec,
    gap: HistogramVec,
    tokens: IntCounterVec,
    cost: prometheus::CounterVec,
    cost_unknown: IntCounterVec,
    usage_unknown: IntCounterVec,
    errors: IntCounterVec,
    open_streams: IntGaugeVec,
    open_sessions: IntGaugeVec,
    session_frames: IntCounterVec,
    response_bytes: IntCounterVec,
    upstream_failures: IntCounterVec,
    limiter_redis_failures: prometheus::IntCounter,
    limiter_redis_up: IntGauge,
    config_reloads: IntCounterVec,
    rows_written: IntCounterVec,
    rows_dropped: prometheus::IntCounter,
    rows_queue: IntGauge,
    rows_spool: prometheus::IntCounterVec,
    spool_bytes: IntGauge,
    clickhouse_up: IntGauge,
    clickhouse_batch: HistogramVec,
    clickhouse_failures: IntCounterVec,
    breaker_state: IntGaugeVec,
    breaker_transitions: IntCounterVec,
    connections_refused: IntCounterVec,
    connections_idle_closed: prometheus::IntCounter,
    client_connections: IntGauge,
    tenant_label: bool,
}

/// Everything `logging()` knows about a finished request.
pub struct Finished<'a> {
    pub route: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    /// A bounded model label (a priced model, or `other`).
    pub model: &'a str,
    pub tenant: &'a str,
    pub duration: Duration,
    pub ttfb: Option<Duration>,
    pub first_output: Option<Duration>,
    /// True when `first_output` is time to first audio rather than first token.
    pub audio: bool,
    pub usage: Usage,
    pub cost: Option<f64>,
    pub response_bytes: u64,
    /// A bounded error kind, when the request failed or its stream carried an error.
    pub error: Option<&'a str>,
    /// A model request answered without a usage the relay could read.
    pub usage_unknown: bool,
}

/// Handles a streaming response keeps: its route's gap histogram, and its place in the
/// open-streams gauge, released when dropped (also on errors and disconnects).
pub struct StreamHandles {
    pub gap: Histogram,
    open: IntGauge,
}

impl Drop for StreamHandles {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Metrics {
    pub fn new(tenant_label: bool) -> Metrics {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )
            .expect("metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let with_tenant = |labels: &[&'static str]| -> Vec<&'static str> {
            let mut l = labels.to_vec();
            if tenant_label {
                l.push("tenant");
            }
            l
        };
        let cost = prometheus::CounterVec::new(
            Opts::new(
                "stream_relay_cost_usd_total",
                "Cost of answered requests in US dollars, from the price table.",
            ),
            &with_tenant(&["route", "model"]),
        )
        .expect("metric");
        registry
            .register(Box::new(cost.clone()))
            .expect("unique metric");
        let open_streams = IntGaugeVec::new(
            Opts::new(
                "stream_relay_open_streams",
                "Responses being streamed to clients now, by route.",
            ),
            &["route"],
        )
        .expect("metric");
        registry
            .register(Box::new(open_streams.clone()))
            .expect("unique metric");
        let open_sessions = IntGaugeVec::new(
            Opts::new(
                "stream_relay_open_websocket_sessions",
                "WebSocket sessions (Realtime) open now, by route.",
            ),
            &["route"],
        )
        .expect("metric");
        registry
            .register(Box::new(open_sessions.clone()))
            .expect("unique metric");
        let limiter_redis_failures = prometheus::IntCounter::new(
            "stream_relay_limiter_redis_failures_total",
            "Limit decisions or settlements that Redis did not answer in time; each fell back to the configured policy.",
        )
        .expect("metric");
        registry
            .register(Box::new(limiter_redis_failures.clone()))
            .expect("unique metric");
        let limiter_redis_up = IntGauge::new(
            "stream_relay_limiter_redis_up",
            "Whether the Redis limiter answers: 1 while it does (or is not configured), 0 while the relay falls back.",
        )
        .expect("metric");
        limiter_redis_up.set(1);
        registry
            .register(Box::new(limiter_redis_up.clone()))
            .expect("unique metric");
        let rows_dropped = prometheus::IntCounter::new(
            "stream_relay_rows_dropped_total",
            "Request rows lost: the queue was full or the sink could not write them.",
        )
        .expect("metric");
        registry
            .register(Box::new(rows_dropped.clone()))
            .expect("unique metric");
        let rows_queue = IntGauge::new(
            "stream_relay_rows_queue",
            "Request rows waiting for the sink.",
        )
        .expect("metric");
        registry
            .register(Box::new(rows_queue.clone()))
            .expect("unique metric");
        let spool_bytes = IntGauge::new(
            "stream_relay_rows_spool_bytes",
            "Bytes of request rows waiting in the ClickHouse writer's disk spool.",
        )
        .expect("metric");
        registry
            .register(Box::new(spool_bytes.clone()))
            .expect("unique metric");
        let clickhouse_up = IntGauge::new(
            "stream_relay_clickhouse_up",
            "Whether the last ClickHouse write or probe succeeded (1, also when rows go to a file), or rows go to the spool (0).",
        )
        .expect("metric");
        clickhouse_up.set(1);
        registry
            .register(Box::new(clickhouse_up.clone()))
            .expect("unique metric");
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "stream_relay_breaker_state",
                "Circuit breaker of each upstream (host:port) and provider key (keyN) of a route: 0 closed, 1 half-open, 2 open. Present once a breaker has changed state.",
            ),
            &["route", "target"],
        )
        .expect("metric");
        registry
            .register(Box::new(breaker_state.clone()))
            .expect("unique metric");
        let client_connections = IntGauge::new(
            "stream_relay_client_connections",
            "Open client connections on the proxy port, counted when connection caps are on.",
        )
        .expect("metric");
        registry
            .register(Box::new(client_connections.clone()))
            .expect("unique metric");
        let connections_idle_closed = prometheus::IntCounter::new(
            "stream_relay_connections_idle_closed_total",
            "Client connections closed at listen.head_timeout without having sent a byte.",
        )
        .expect("metric");
        registry
            .register(Box::new(connections_idle_closed.clone()))
            .expect("unique metric");
        let metrics = Metrics {
            client_connections,
            connections_idle_closed,
            connections_refused: counter(
                "stream_relay_connections_refused_total",
                "Client connections closed at accept because a cap was reached, by cap (total, per_address).",
                &["cap"],
            ),
            breaker_state,
            breaker_transitions: counter(
                "stream_relay_breaker_transitions_total",
                "Circuit breaker state changes, by route, target and the state entered (open, half_open, closed).",
                &["route", "target", "to"],
            ),
            rows_spool: counter(
                "stream_relay_rows_spool_total",
                "Request rows through the ClickHouse writer's spool, by event: spooled (ClickHouse could not take them), replayed (written later), dead_lettered (refused as malformed, kept in dead_letter.jsonl).",
                &["event"],
            ),
            spool_bytes,
            clickhouse_up,
            clickhouse_batch: hist(
                "stream_relay_clickhouse_batch_seconds",
                "Time to write one batch of rows to ClickHouse, by result (ok, failed).",
                DURATION_BUCKETS,
                &["result"],
            ),
            clickhouse_failures: counter(
                "stream_relay_clickhouse_failures_total",
                "ClickHouse requests that failed, by kind: unavailable (network, timeout, server error; retried from the spool), malformed (rows refused; bisected to the dead letter), migration.",
                &["kind"],
            ),
            rows_written: counter(
                "stream_relay_rows_written_total",
                "Request rows written, by sink.",
                &["sink"],
            ),
            rows_dropped,
            rows_queue,
            config_reloads: counter(
                "stream_relay_config_reloads_total",
                "Configuration reloads (tenants and limits), by result: ok or refused.",
                &["result"],
            ),
            limiter_redis_failures,
            limiter_redis_up,
            requests: counter(
                "stream_relay_requests_total",
                "Requests finished, by route, status class and outcome.",
                &["route", "status_class", "outcome"],
            ),
            duration: hist(
                "stream_relay_request_duration_seconds",
                "Request head received to response end, by route.",
                DURATION_BUCKETS,
                &["route"],
            ),
            ttfb: hist(
                "stream_relay_ttfb_seconds",
                "Request head received to the upstream's response head.",
                FIRST_BUCKETS,
                &["route", "model"],
            ),
            ttft: hist(
                "stream_relay_ttft_seconds",
                "Request head received to the first event carrying generated output.",
                FIRST_BUCKETS,
                &["route", "model"],
            ),
            ttfa: hist(
                "stream_relay_ttfa_seconds",
                "Request head received to the first audio byte.",
                FIRST_BUCKETS,
                &["route", "model"],
            ),
            gap: hist(
                "stream_relay_event_gap_seconds",
                "Time between consecutive output events of a stream.",
                GAP_BUCKETS,
                &["route"],
            ),
            tokens: counter(
                "stream_relay_tokens_total",
                "Tokens as the provider counted them; direction is input, cached_input (part of input), output or reasoning (part of output).",
                &with_tenant(&["route", "model", "direction"]),
            ),
            cost,
            cost_unknown: counter(
                "stream_relay_cost_unknown_requests_total",
                "Answered requests whose cost is unknown (model without a price, or no usage from the provider).",
                &["route"],
            ),
            usage_unknown: counter(
                "stream_relay_usage_unknown_requests_total",
                "Model requests answered 2xx whose usage the provider never told (a cut stream, an unreadable or compressed answer): the tenant's token limit kept the estimate.",
                &["route"],
            ),
            errors: counter(
                "stream_relay_errors_total",
                "Failed requests and streams, by route and error kind.",
                &["route", "kind"],
            ),
            open_streams,
            open_sessions,
            session_frames: counter(
                "stream_relay_websocket_frames_total",
                "Frames of ended WebSocket sessions, by route and direction (client or server: who sent them).",
                &["route", "direction"],
            ),
            response_bytes: counter(
                "stream_relay_response_bytes_total",
                "Response body bytes relayed to clients.",
                &["route"],
            ),
            upstream_failures: counter(
                "stream_relay_upstream_failures_total",
                "Upstream attempts that failed before a response, by route and kind.",
                &["route", "kind"],
            ),
            registry,
            tenant_label,
        };
        // Present from the start, so dashboards and alerts see 0 rather than no data.
        for event in ["spooled", "replayed", "dead_lettered"] {
            metrics.rows_spool.with_label_values(&[event]);
        }
        metrics
    }

    /// Called once when a response starts streaming.
    pub fn stream_started(&self, route: &str) -> StreamHandles {
        let open = self.open_streams.with_label_values(&[route]);
        open.inc();
        StreamHandles {
            gap: self.gap.with_label_values(&[route]),
            open,
        }
    }

    /// Called once when a WebSocket session opens: the gap histogram (gaps within one
    /// response) and its place in the open-sessions gauge.
    pub fn session_started(&self, route: &str) -> StreamHandles {
        let open = self.open_sessions.with_label_values(&[route]);
        open.inc();
        StreamHandles {
            gap: self.gap.with_label_values(&[route]),
            open,
        }
    }

    /// The frames an ended session passed, each way.
    pub fn session_frames(&self, route: &str, from_client: u64, from_server: u64) {
        let f = &self.session_frames;
        f.with_label_values(&[route, "client"]).inc_by(from_client);
        f.with_label_values(&[route, "server"]).inc_by(from_server);
    }

    pub fn rows_queued(&self, n: i64) {
        self.rows_queue.add(n);
    }

    pub fn rows_dequeued(&self, n: i64) {
        self.rows_queue.sub(n);
    }

    pub fn rows_written(&self, sink: &str, n: u64) {
        self.rows_written.with_label_values(&[sink]).inc_by(n);
    }

    pub fn rows_dropped(&self, n: u64) {
        self.rows_dropped.inc_by(n);
    }

    pub fn rows_spooled(&self, n: u64) {
        self.rows_spool.with_label_values(&["spooled"]).inc_by(n);
    }

    pub fn rows_replayed(&self, n: u64) {
        self.rows_spool.with_label_values(&["replayed"]).inc_by(n);
    }

    pub fn rows_dead_lettered(&self, n: u64) {
        self.rows_spool
            .with_label_values(&["dead_lettered"])
            .inc_by(n);
    }

    pub fn spool_bytes(&self, bytes: u64) {
        self.spool_bytes.set(bytes as i64);
    }

    pub fn clickhouse_up(&self, up: bool) {
        self.clickhouse_up.set(i64::from(up));
    }

    pub fn clickhouse_batch(&self, ok: bool, took: Duration) {
        self.clickhouse_batch
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .observe(took.as_secs_f64());
    }

    pub fn clickhouse_failure(&self, kind: &str) {
        self.clickhouse_failures.with_label_values(&[kind]).inc();
    }

    pub fn connection_idle_closed(&self) {
        self.connections_idle_closed.inc();
    }

    pub fn connection_refused(&self, cap: &str) {
        self.connections_refused.with_label_values(&[cap]).inc();
    }

    pub fn client_connections(&self, n: usize) {
        self.client_connections.set(n as i64);
    }

    /// Logs and counts a breaker's state change.
    pub fn breaker_report(&self, route: &str, target: &str, t: crate::breaker::Transition) {
        use crate::breaker::Transition;
        match t {
            Transition::Opened => log::warn!("route `{route}`: {target} set aside (circuit open)"),
            Transition::HalfOpened => {
                log::info!("route `{route}`: {target} probed again (circuit half-open)")
            }
            Transition::Closed => {
                log::info!("route `{route}`: {target} back in use (circuit closed)")
            }
        }
        self.breaker_transition(route, target, t);
    }

    pub fn breaker_transition(&self, route: &str, target: &str, t: crate::breaker::Transition) {
        use crate::breaker::Transition;
        self.breaker_transitions
            .with_label_values(&[route, target, t.label()])
            .inc();
        let level = match t {
            Transition::Closed => 0,
            Transition::HalfOpened => 1,
            Transition::Opened => 2,
        };
        self.breaker_state
            .with_label_values(&[route, target])
            .set(level);
    }

    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "refused" }])
            .inc();
    }

    pub fn limiter_redis_failure(&self) {
        self.limiter_redis_failures.inc();
    }

    pub fn limiter_redis_up(&self, up: bool) {
        self.limiter_redis_up.set(i64::from(up));
    }

    pub fn upstream_failure(&self, route: &str, kind: &str) {
        self.upstream_failures
            .with_label_values(&[route, kind])
            .inc();
    }

    pub fn request_done(&self, f: &Finished<'_>) {
        self.requests
            .with_label_values(&[f.route, status_class(f.status), f.outcome])
            .inc();
        self.duration
            .with_label_values(&[f.route])
            .observe(f.duration.as_secs_f64());
        if let Some(t) = f.ttfb {
            self.ttfb
                .with_label_values(&[f.route, f.model])
                .observe(t.as_secs_f64());
        }
        if let Some(t) = f.first_output {
            let h = if f.audio { &self.ttfa } else { &self.ttft };
            h.with_label_values(&[f.route, f.model])
                .observe(t.as_secs_f64());
        }
        let u = &f.usage;
        for (direction, n) in [
            ("input", u.input),
            ("cached_input", u.cached_input),
            ("output", u.output),
            ("reasoning", u.reasoning),
        ] {
            if let Some(n) = n.filter(|n| *n > 0) {
                self.tokens
                    .with_label_values(&self.labels(&[f.route, f.model, direction], f.tenant))
                    .inc_by(n);
            }
        }
        let answered = (200..300).contains(&f.status);
        match f.cost {
            Some(c) => self
                .cost
                .with_label_values(&self.labels(&[f.route, f.model], f.tenant))
                .inc_by(c),
            None if answered => self.cost_unknown.with_label_values(&[f.route]).inc(),
            None => {}
        }
        if f.usage_unknown {
            self.usage_unknown.with_label_values(&[f.route]).inc();
        }
        if let Some(kind) = f.error {
            self.errors.with_label_values(&[f.route, kind]).inc();
        }
        if f.response_bytes > 0 {
            self.response_bytes
                .with_label_values(&[f.route])
                .inc_by(f.response_bytes);
        }
    }

    fn labels<'a>(&self, base: &[&'a str], tenant: &'a str) -> Vec<&'a str> {
        let mut l = base.to_vec();
        if self.tenant_label {
            l.push(tenant);
        }
        l
    }

    /// Prometheus text exposition of every family.
    /// The registry, for a module that owns its metrics (the budgets).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec does not fail");
        out
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished<'a>(model: &'a str, tenant: &'a str) -> Finished<'a> {
        Finished {
            route: "openai",
            status: 200,
            outcome: "ok",
            model,
            tenant,
            duration: Duration::from_millis(900),
            ttfb: Some(Duration::from_millis(80)),
            first_output: Some(Duration::from_millis(120)),
            audio: false,
            usage: Usage {
                input: Some(30),
                output: Some(8),
                cached_input: Some(0),
                reasoning: None,
            },
            cost: Some(0.5),
            response_bytes: 2000,
            error: None,
            usage_unknown: false,
        }
    }

    #[test]
    fn exposition_carries_timings_tokens_and_cost() {
        let m = Metrics::new(false);
        {
            let s = m.stream_started("openai");
            s.gap.observe(0.02);
            let text = String::from_utf8(m.encode()).unwrap();
            assert!(text.contains(r#"stream_relay_open_streams{route="openai"} 1"#));
        }
        m.request_done(&finished("gpt-4o-mini", "acme"));
        m.upstream_failure("openai", "connect");
        let text = String::from_utf8(m.encode()).unwrap();
        for line in [
            r#"stream_relay_requests_total{outcome="ok",route="openai",status_class="2xx"} 1"#,
            r#"stream_relay_open_streams{route="openai"} 0"#,
            r#"stream_relay_ttft_seconds_sum{model="gpt-4o-mini",route="openai"} 0.12"#,
            r#"stream_relay_ttfb_seconds_count{model="gpt-4o-mini",route="openai"} 1"#,
            r#"stream_relay_tokens_total{direction="input",model="gpt-4o-mini",route="openai"} 30"#,
            r#"stream_relay_tokens_total{direction="output",model="gpt-4o-mini",route="openai"} 8"#,
            r#"stream_relay_cost_usd_total{model="gpt-4o-mini",route="openai"} 0.5"#,
            r#"stream_relay_event_gap_seconds_count{route="openai"} 1"#,
            r#"stream_relay_response_bytes_total{route="openai"} 2000"#,
            r#"stream_relay_upstream_failures_total{kind="connect",route="openai"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
        assert!(!text.contains("acme"), "no tenant label unless configured");
    }

    #[test]
    fn tenant_label_only_when_asked_and_unknown_cost_counted() {
        let m = Metrics::new(true);
        let mut f = finished("other", "acme");
        f.cost = None;
        m.request_done(&f);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(
            r#"stream_relay_tokens_total{direction="input",model="other",route="openai",tenant="acme"} 30"#
        ));
        assert!(text.contains(r#"stream_relay_cost_unknown_requests_total{route="openai"} 1"#));
    }
}
