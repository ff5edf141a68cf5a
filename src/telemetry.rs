//! OpenTelemetry, off by default (`telemetry.otlp`): one server span per request and a
//! client span per upstream attempt, with the GenAI semantic conventions' attributes and
//! the relay's own, exported over OTLP (HTTP with protobuf, or gRPC) in batches; and the
//! GenAI metrics (`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`,
//! `gen_ai.server.time_to_first_token`, `gen_ai.server.time_per_output_token`) every
//! `metrics_interval`.
//!
//! The request path only keeps ids and times: a W3C `traceparent` from the client is
//! continued (its trace id, with its span as the parent), the upstream gets one naming the
//! attempt's client span, and the spans are built when the request ends and handed to a
//! bounded queue (`try_send`: a full queue drops the span, counted). A thread of its own
//! batches them and calls the `opentelemetry-otlp` exporter.

use std::borrow::Cow;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use log::warn;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use opentelemetry_sdk::Resource;
use prometheus::{IntCounter, Registry};

/// `telemetry.otlp`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// The collector's traces URL (`/v1/traces` is added to a bare host).
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    /// The share of traces kept that no client decided (0..=1).
    pub sample_ratio: f64,
    /// A client's `traceparent` decides whether its trace is kept (`client_sampling:
    /// follow`); otherwise `sample_ratio` decides every trace, the client's too.
    pub follow_client: bool,
    /// PEM certificates an `https` collector may chain to, beside the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    pub service_name: String,
    /// Spans that may wait for export; past it they are dropped (counted).
    pub queue: usize,
    pub batch: usize,
    /// The longest a span waits for its batch.
    pub interval: Duration,
    /// Longest wait for one export.
    pub timeout: Duration,
    /// The collector's metrics URL, and how often the GenAI metrics go.
    pub metrics_endpoint: String,
    pub metrics_interval: Duration,
    /// OTLP over gRPC (the collector's port 4317) instead of HTTP with protobuf.
    pub grpc: bool,
}

/// The headers as gRPC metadata.
fn metadata(
    config: &OtlpConfig,
) -> Result<opentelemetry_otlp::tonic_types::metadata::MetadataMap, String> {
    let mut map = http::HeaderMap::new();
    for (k, v) in &config.headers {
        let name =
            http::HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header {k}: {e}"))?;
        let value = http::HeaderValue::from_str(v).map_err(|e| format!("header {k}: {e}"))?;
        map.insert(name, value);
    }
    Ok(opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(map))
}

/// The OTLP/HTTP exporters' client: plain http, or https verified against the system's
/// roots and `ca_file`'s certificates.
fn http_client(config: &OtlpConfig) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(config.timeout)
        .no_proxy();
    if let Some(pem) = &config.ca_pem {
        for cert in
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| format!("ca_file: {e}"))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().map_err(|e| format!("the OTLP/HTTP client: {e}"))
}

/// TLS for a gRPC collector at an `https://` endpoint: the system's roots and
/// `ca_file`'s certificates.
fn grpc_tls(
    config: &OtlpConfig,
) -> Option<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig> {
    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
    if !config.endpoint.starts_with("https://") {
        return None;
    }
    let tls = ClientTlsConfig::new().with_native_roots();
    Some(match &config.ca_pem {
        Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
        None => tls,
    })
}

/// An exporter's gRPC builder set up from `config`: the collector, the timeout, the
/// headers as metadata, and TLS for an `https://` endpoint.
fn grpc_set_up<B: WithExportConfig + WithTonicConfig>(
    b: B,
    config: &OtlpConfig,
) -> Result<B, String> {
    let b = b
        .with_endpoint(config.endpoint.clone())
        .with_timeout(config.timeout)
        .with_metadata(metadata(config)?);
    Ok(match grpc_tls(config) {
        Some(tls) => b.with_tls_config(tls),
        None => b,
    })
}

/// An exporter's HTTP builder set up from `config`, sending to `endpoint`.
fn http_set_up<B: WithExportConfig + WithHttpConfig>(
    b: B,
    config: &OtlpConfig,
    endpoint: &str,
) -> Result<B, String> {
    Ok(b.with_http_client(http_client(config)?)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(config.timeout)
        .with_headers(config.headers.iter().cloned().collect()))
}

/// The span exporter of the configured protocol. A gRPC one must be built inside a
/// runtime (its channel connects from it).
fn span_exporter(config: &OtlpConfig) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let built = if config.grpc {
        grpc_set_up(builder.with_tonic(), config)?.build()
    } else {
        http_set_up(builder.with_http(), config, &config.endpoint)?.build()
    };
    built.map_err(|e| e.to_string())
}

fn metric_exporter(config: &OtlpConfig) -> Result<opentelemetry_otlp::MetricExporter, String> {
    let builder = opentelemetry_otlp::MetricExporter::builder();
    let built = if config.grpc {
        grpc_set_up(builder.with_tonic(), config)?.build()
    } else {
        http_set_up(builder.with_http(), config, &config.metrics_endpoint)?.build()
    };
    built.map_err(|e| e.to_string())
}

/// A request's trace: its ids, decided at its head.
#[derive(Debug, Clone)]
pub struct Trace {
    pub trace_id: TraceId,
    /// The client's span, when it sent a `traceparent`.
    pub parent: Option<SpanId>,
    pub server_span: SpanId,
    pub sampled: bool,
    /// Upstream attempts: their span and when each began.
    pub attempts: Vec<(SpanId, SystemTime)>,
}

impl Trace {
    /// A new attempt's span; the `traceparent` to send upstream with it.
    pub fn attempt(&mut self, ids: &Ids) -> String {
        let span = ids.span();
        self.attempts.push((span, SystemTime::now()));
        format!(
            "00-{}-{}-{}",
            self.trace_id,
            span,
            if self.sampled { "01" } else { "00" }
        )
    }
}

/// Random span and trace ids, from the request ids' generator (never zero, which W3C
/// reserves for "none").
#[derive(Default)]
pub struct Ids;

impl Ids {
    pub fn span(&self) -> SpanId {
        let (a, _) = crate::request_id::random_pair();
        SpanId::from_bytes(a.max(1).to_be_bytes())
    }

    fn trace(&self) -> TraceId {
        let (hi, lo) = crate::request_id::random_pair();
        let id = (u128::from(hi) << 64) | u128::from(lo.max(1));
        TraceId::from_bytes(id.to_be_bytes())
    }
}

/// Whether a trace is kept: as the client decided (`client`, when it sent a
/// `traceparent` and `follow_client`), else when `ratio` of all traces keeps it, by the
/// low 8 bytes of its id (random in a W3C trace id), so every relay decides alike.
fn kept(client: Option<bool>, follow_client: bool, trace_id: TraceId, ratio: f64) -> bool {
    if let Some(sampled) = client.filter(|_| follow_client) {
        return sampled;
    }
    let low = u64::from_be_bytes(trace_id.to_bytes()[8..].try_into().unwrap_or([0; 8]));
    (low as f64) < ratio * (u64::MAX as f64)
}

/// A W3C `traceparent` (`00-TRACE-SPAN-FLAGS`): its trace, span and sampled flag.
pub fn parse_traceparent(value: &[u8]) -> Option<(TraceId, SpanId, bool)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace, span, sampled))
}

/// What a finished request's spans say, gathered by the recorder.
pub struct Finished<'a> {
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub provider: Option<&'a str>,
    pub route: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub request_model: Option<&'a str>,
    pub response_model: Option<&'a str>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub finish_reason: Option<&'a str>,
    pub ttft: Option<Duration>,
    pub upstream_status: Option<u16>,
    /// A bounded model label for metrics (a priced model, or `other`).
    pub model_label: &'a str,
    pub stream: bool,
}

/// The GenAI metrics, by their convention names.
struct GenAiMetrics {
    /// Kept: dropping it stops the export.
    _provider: opentelemetry_sdk::metrics::SdkMeterProvider,
    tokens: opentelemetry::metrics::Histogram<u64>,
    duration: opentelemetry::metrics::Histogram<f64>,
    ttft: opentelemetry::metrics::Histogram<f64>,
    per_token: opentelemetry::metrics::Histogram<f64>,
}

/// The OTLP metric exporter on a runtime of its own: the SDK's periodic reader calls it
/// from a plain thread, and the HTTP client needs tokio.
struct OnRuntime {
    inner: opentelemetry_otlp::MetricExporter,
    runtime: tokio::runtime::Runtime,
}

impl opentelemetry_sdk::metrics::exporter::PushMetricExporter for OnRuntime {
    fn export(
        &self,
        metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        std::future::ready(self.runtime.block_on(self.inner.export(metrics)))
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        self.inner.temporality()
    }
}

impl GenAiMetrics {
    fn start(config: &OtlpConfig, resource: Resource) -> Result<GenAiMetrics, String> {
        use opentelemetry::metrics::MeterProvider;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let inner = {
            let _in = runtime.enter();
            metric_exporter(config)?
        };
        let reader =
            opentelemetry_sdk::metrics::PeriodicReader::builder(OnRuntime { inner, runtime })
                .with_interval(config.metrics_interval)
                .build();
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        let meter = provider.meter("stream-relay");
        let seconds = vec![
            0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
        ];
        Ok(GenAiMetrics {
            tokens: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Input and output tokens of each request")
                .with_boundaries(vec![
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
                    1048576.0, 4194304.0,
                ])
                .build(),
            duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_boundaries(seconds.clone())
                .build(),
            ttft: meter
                .f64_histogram("gen_ai.server.time_to_first_token")
                .with_unit("s")
                .with_boundaries(seconds)
                .build(),
            per_token: meter
                .f64_histogram("gen_ai.server.time_per_output_token")
                .with_unit("s")
                .with_boundaries(vec![
                    0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                    0.75, 1.0, 2.5,
                ])
                .build(),
            _provider: provider,
        })
    }

    /// One request's figures; attributes are bounded (the model label is a priced
    /// model or `other`).
    fn record(&self, f: &Finished<'_>) {
        let Some(system) = f.provider else {
            return;
        };
        let mut attrs = vec![
            KeyValue::new("gen_ai.operation.name", operation(f.path)),
            KeyValue::new("gen_ai.system", system.to_string()),
            KeyValue::new("gen_ai.request.model", f.model_label.to_string()),
        ];
        let total = f
            .end
            .duration_since(f.start)
            .unwrap_or_default()
            .as_secs_f64();
        if f.outcome != "ok" {
            attrs.push(KeyValue::new("error.type", f.outcome.to_string()));
        }
        self.duration.record(total, &attrs);
        if f.outcome != "ok" {
            return;
        }
        for (kind, n) in [("input", f.input_tokens), ("output", f.output_tokens)] {
            if let Some(n) = n {
                let mut a = attrs.clone();
                a.push(KeyValue::new("gen_ai.token.type", kind));
                self.tokens.record(n, &a);
            }
        }
        if let (true, Some(ttft)) = (f.stream, f.ttft) {
            self.ttft.record(ttft.as_secs_f64(), &attrs);
            if let Some(out) = f.output_tokens.filter(|n| *n > 1) {
                let after = (total - ttft.as_secs_f64()).max(0.0);
                self.per_token.record(after / (out - 1) as f64, &attrs);
            }
        }
    }
}

/// The `gen_ai.operation.name` of an upstream path.
fn operation(path: &str) -> &'static str {
    if path.ends_with("/embeddings") {
        "embeddings"
    } else if path.ends_with("/completions") && !path.ends_with("/chat/completions") {
        "text_completion"
    } else if path.ends_with("/chat/completions")
        || path.ends_with("/messages")
        || path.ends_with("/responses")
        || path.ends_with("/realtime")
    {
        "chat"
    } else {
        "generate_content"
    }
}

/// The exporter's side: the queue's sending end and the counters.
pub struct Telemetry {
    tx: SyncSender<SpanData>,
    metrics: GenAiMetrics,
    pub ids: Ids,
    sample_ratio: f64,
    follow_client: bool,
    dropped: IntCounter,
    scope: InstrumentationScope,
}

impl Telemetry {
    /// Builds the exporter and starts its thread.
    pub fn start(config: &OtlpConfig, registry: &Registry) -> Result<Telemetry, String> {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let dropped = counter(
            "stream_relay_otlp_spans_dropped_total",
            "Spans dropped because the export queue was full.",
        );
        let exported = counter(
            "stream_relay_otlp_spans_exported_total",
            "Spans the OTLP collector took.",
        );
        let failed = counter(
            "stream_relay_otlp_export_failures_total",
            "OTLP exports that failed; their spans are lost.",
        );
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let metrics = GenAiMetrics::start(config, resource.clone())?;
        let (tx, rx) = sync_channel(config.queue);
        // The exporter is built on its thread, inside the runtime it exports on.
        let (built_tx, built_rx) = sync_channel(1);
        let thread_config = config.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(&thread_config, resource, rx, built_tx, exported, failed))
            .map_err(|e| e.to_string())?;
        built_rx
            .recv()
            .map_err(|_| "the export thread ended".to_string())??;
        Ok(Telemetry {
            tx,
            metrics,
            ids: Ids,
            sample_ratio: config.sample_ratio,
            follow_client: config.follow_client,
            dropped,
            scope: InstrumentationScope::builder("stream-relay")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        })
    }

    /// A request's trace, from its `traceparent` when it has a sane one (its trace
    /// continued, kept as the client decided or by `sample_ratio`: see
    /// [`OtlpConfig::follow_client`]); otherwise a new trace, `sample_ratio` of them kept.
    pub fn trace(&self, traceparent: Option<&[u8]>) -> Trace {
        let (trace_id, parent, client) = match traceparent.and_then(parse_traceparent) {
            Some((trace_id, parent, sampled)) => (trace_id, Some(parent), Some(sampled)),
            None => (self.ids.trace(), None, None),
        };
        let sampled = kept(client, self.follow_client, trace_id, self.sample_ratio);
        Trace {
            trace_id,
            parent,
            server_span: self.ids.span(),
            sampled,
            attempts: Vec::new(),
        }
    }

    /// The request's metrics, and its spans to the export queue.
    pub fn finish(&self, trace: &Trace, f: &Finished<'_>) {
        self.metrics.record(f);
        if !trace.sampled {
            return;
        }
        let server = self.server_span(trace, f);
        let ends: Vec<SystemTime> = trace
            .attempts
            .iter()
            .skip(1)
            .map(|(_, start)| *start)
            .chain(std::iter::once(f.end))
            .collect();
        let last = trace.attempts.len().saturating_sub(1);
        for (i, ((span, start), end)) in trace.attempts.iter().zip(ends).enumerate() {
            let status = if i == last { f.upstream_status } else { None };
            self.send(self.client_span(trace, f, *span, *start, end, status));
        }
        self.send(server);
    }

    fn send(&self, span: SpanData) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(span) {
            self.dropped.inc();
        }
    }

    fn context(&self, trace: &Trace, span: SpanId) -> SpanContext {
        SpanContext::new(
            trace.trace_id,
            span,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    fn server_span(&self, trace: &Trace, f: &Finished<'_>) -> SpanData {
        let op = operation(f.path);
        let mut attributes = gen_ai_attributes(f, op);
        let text = |k: &'static str, v: Option<&str>| v.map(|v| KeyValue::new(k, v.to_string()));
        attributes.extend(
            [
                text("stream_relay.tenant", f.tenant),
                text("stream_relay.route", f.route),
                Some(KeyValue::new("stream_relay.outcome", f.outcome.to_string())),
                Some(KeyValue::new(
                    "stream_relay.attempts",
                    trace.attempts.len() as i64,
                )),
                f.ttft
                    .map(|t| KeyValue::new("stream_relay.ttft_ms", t.as_secs_f64() * 1000.0)),
                Some(KeyValue::new("http.request.method", f.method.to_string())),
                Some(KeyValue::new("url.path", f.path.to_string())),
                Some(KeyValue::new(
                    "http.response.status_code",
                    i64::from(f.status),
                )),
            ]
            .into_iter()
            .flatten(),
        );
        let failed = f.outcome != "ok" || f.status >= 500;
        SpanData {
            span_context: self.context(trace, trace.server_span),
            parent_span_id: trace.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: trace.parent.is_some(),
            span_kind: SpanKind::Server,
            name: span_name(op, f.request_model),
            start_time: f.start,
            end_time: f.end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if failed {
                Status::error(f.outcome.to_string())
            } else {
                Status::Unset
            },
            instrumentation_scope: self.scope.clone(),
        }
    }

    fn client_span(
        &self,
        trace: &Trace,
        f: &Finished<'_>,
        span: SpanId,
        start: SystemTime,
        end: SystemTime,
        status: Option<u16>,
    ) -> SpanData {
        let op = operation(f.path);
        let mut attributes = gen_ai_attributes(f, op);
        if let Some(s) = status {
            attributes.push(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        SpanData {
            span_context: self.context(trace, span),
            parent_span_id: trace.server_span,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: span_name(op, f.request_model),
            start_time: start,
            end_time: end.max(start),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match status {
                Some(s) if s >= 500 => Status::error(format!("upstream status {s}")),
                None => Status::error("no answer from the upstream".to_string()),
                _ => Status::Unset,
            },
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// `{operation} {model}`, as the GenAI conventions name spans.
fn span_name(op: &str, model: Option<&str>) -> Cow<'static, str> {
    match model {
        Some(m) => format!("{op} {m}").into(),
        None => op.to_string().into(),
    }
}

fn gen_ai_attributes(f: &Finished<'_>, op: &'static str) -> Vec<KeyValue> {
    let text = |k: &'static str, v: Option<&str>| v.map(|v| KeyValue::new(k, v.to_string()));
    let count = |k: &'static str, v: Option<u64>| v.map(|n| KeyValue::new(k, n as i64));
    [
        text("gen_ai.system", f.provider),
        Some(KeyValue::new("gen_ai.operation.name", op)),
        text("gen_ai.request.model", f.request_model),
        text("gen_ai.response.model", f.response_model),
        count("gen_ai.usage.input_tokens", f.input_tokens),
        count("gen_ai.usage.output_tokens", f.output_tokens),
        f.finish_reason.map(|r| {
            KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(vec![opentelemetry::StringValue::from(r.to_string())].into()),
            )
        }),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The export thread: batches of up to `batch` spans, each sent when full or `interval`
/// after its first span; a failed export is counted and its spans are lost.
fn export_loop(
    config: &OtlpConfig,
    resource: Resource,
    rx: Receiver<SpanData>,
    built: SyncSender<Result<(), String>>,
    exported: IntCounter,
    failed: IntCounter,
) {
    let (batch, interval) = (config.batch, config.interval);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = built.send(Err(e.to_string()));
            return;
        }
    };
    let exporter = {
        let _in = runtime.enter();
        span_exporter(config)
    };
    let mut exporter = match exporter {
        Ok(e) => {
            let _ = built.send(Ok(()));
            e
        }
        Err(e) => {
            let _ = built.send(Err(e));
            return;
        }
    };
    exporter.set_resource(&resource);
    let mut spans: Vec<SpanData> = Vec::with_capacity(batch);
    let mut since = Instant::now();
    let mut warned = false;
    loop {
        let wait = interval.saturating_sub(since.elapsed());
        let open = match rx.recv_timeout(if spans.is_empty() { interval } else { wait }) {
            Ok(span) => {
                if spans.is_empty() {
                    since = Instant::now();
                }
                spans.push(span);
                true
            }
            Err(RecvTimeoutError::Timeout) => true,
            Err(RecvTimeoutError::Disconnected) => false,
        };
        let due = spans.len() >= batch || (!spans.is_empty() && since.elapsed() >= interval);
        if due || (!open && !spans.is_empty()) {
            let n = spans.len() as u64;
            match runtime.block_on(exporter.export(std::mem::take(&mut spans))) {
                Ok(()) => {
                    exported.inc_by(n);
                    warned = false;
                }
                Err(e) => {
                    failed.inc();
                    if !warned {
                        warn!("OTLP export failed ({e}); its spans are lost, counted in stream_relay_otlp_export_failures_total");
                        warned = true;
                    }
                }
            }
        }
        if !open {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_decides_sampling_only_when_followed() {
        let low = |n: u64| {
            let mut b = [0u8; 16];
            b[8..].copy_from_slice(&n.to_be_bytes());
            TraceId::from_bytes(b)
        };
        let (small, large) = (low(1), low(u64::MAX - 1));
        // Followed: the client's flag, whatever the ratio.
        assert!(kept(Some(true), true, large, 0.0));
        assert!(!kept(Some(false), true, small, 1.0));
        // Not followed, or no client: the ratio, by the trace id.
        assert!(!kept(Some(true), false, large, 0.5));
        assert!(kept(Some(false), false, small, 0.5));
        assert!(kept(None, true, small, 0.5) && !kept(None, true, large, 0.5));
        assert!(!kept(Some(true), false, small, 0.0));
    }

    #[test]
    fn traceparents_are_read_as_w3c_says() {
        let (t, s, sampled) =
            parse_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(t.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s.to_string(), "b7ad6b7169203331");
        assert!(sampled);
        assert!(
            !parse_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
                .unwrap()
                .2
        );
        for bad in [
            &b"00-00000000000000000000000000000000-b7ad6b7169203331-01"[..],
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            b"garbage",
        ] {
            assert!(
                parse_traceparent(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn operations_follow_the_path() {
        assert_eq!(operation("/v1/chat/completions"), "chat");
        assert_eq!(operation("/v1/messages"), "chat");
        assert_eq!(operation("/v1/embeddings"), "embeddings");
        assert_eq!(operation("/v1/completions"), "text_completion");
        assert_eq!(operation("/v1/audio/speech"), "generate_content");
    }

    #[test]
    fn ids_are_distinct_and_never_zero() {
        let ids = Ids;
        let a: std::collections::HashSet<String> =
            (0..1000).map(|_| ids.span().to_string()).collect();
        assert_eq!(a.len(), 1000);
        assert!(!a.contains("0000000000000000"));
    }
}
