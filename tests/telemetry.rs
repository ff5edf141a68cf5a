//! OpenTelemetry through the relay: an OTLP/HTTP receiver of the test's own decodes the
//! official protobuf definitions (opentelemetry-proto) and checks one trace per request
//! with the GenAI attributes; a client's `traceparent` is continued, and the upstream gets
//! one naming the relay's client span; sampling; a collector that is down costs nothing
//! but the spans, counted.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

const CHAT: &str = "/openai/v1/chat/completions";
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// The spans a collector received, with the `service.name` each came under.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// The metrics a collector received: name, and each histogram point's attributes
/// (`key=value` text), count and sum.
type Metrics = Arc<Mutex<Vec<(String, Vec<(Vec<String>, u64, f64)>)>>>;

static METRICS: std::sync::OnceLock<Mutex<Vec<(u16, Metrics)>>> = std::sync::OnceLock::new();

/// The metrics the receiver on `port` got.
fn metrics_of(port: u16) -> Metrics {
    METRICS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, m)| m.clone())
        .unwrap()
}

fn keep_metrics(into: &Metrics, body: &[u8]) {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let request =
        ExportMetricsServiceRequest::decode(body).expect("an ExportMetricsServiceRequest");
    for rm in request.resource_metrics {
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                let points = match m.data {
                    Some(Data::Histogram(h)) => h
                        .data_points
                        .iter()
                        .map(|p| {
                            let attrs = p
                                .attributes
                                .iter()
                                .map(|kv| {
                                    let v = kv
                                        .value
                                        .as_ref()
                                        .and_then(|v| v.value.as_ref())
                                        .and_then(text);
                                    format!("{}={}", kv.key, v.unwrap_or_default())
                                })
                                .collect();
                            (attrs, p.count, p.sum.unwrap_or(0.0))
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                into.lock().unwrap().push((m.name, points));
            }
        }
    }
}

/// An OTLP/HTTP collector on a free port: every POST body decoded, its spans kept.
fn receiver() -> (u16, Received) {
    receiver_on(None)
}

/// The same collector, over TLS when `tls` is given.
fn receiver_on(tls: Option<Arc<rustls::ServerConfig>>) -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got: Received = Arc::default();
    let keep = got.clone();
    let metrics: Metrics = Arc::default();
    METRICS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap()
        .push((port, metrics.clone()));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(s) = conn else { continue };
            let (keep, metrics, tls) = (keep.clone(), metrics.clone(), tls.clone());
            std::thread::spawn(move || match tls {
                None => serve_collector(s, &keep, &metrics),
                Some(config) => {
                    let tls = rustls::ServerConnection::new(config).unwrap();
                    serve_collector(rustls::StreamOwned::new(tls, s), &keep, &metrics);
                }
            });
        }
    });
    (port, got)
}

/// One connection of the collector: each request's body decoded and kept, 200.
fn serve_collector(mut s: impl std::io::Read + std::io::Write, keep: &Received, metrics: &Metrics) {
    const OK: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
    let mut buf = Vec::new();
    while let Some((head, body)) = read_upstream_request(&mut s, &mut buf) {
        let line = String::from_utf8_lossy(&buf[..head])
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        if line.contains("/v1/metrics") {
            keep_metrics(metrics, &buf[head..head + body]);
        } else {
            keep_spans(keep, &buf[head..head + body]);
        }
        buf.drain(..head + body);
        let _ = s.write_all(OK);
        let _ = s.flush();
    }
}

fn keep_spans(keep: &Received, body: &[u8]) {
    let request = ExportTraceServiceRequest::decode(body).expect("an ExportTraceServiceRequest");
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| text(kv.value.as_ref()?.value.as_ref()?))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                keep.lock().unwrap().push((service.clone(), span));
            }
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn config(mock: &MockProc, otlp: &str) -> String {
    format!(
        r#"routes:
  - {{ name: openai, prefix: /openai/v1, provider: openai, upstreams: ["{u}/v1"] }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
tenants:
  - {{ id: acme, key_sha256: ["{h}"] }}
telemetry:
  otlp: {otlp}
"#,
        u = mock.url(),
        h = hash(TENANT_KEY),
    )
}

fn chat(relay: &RelayProc, traceparent: Option<&str>, stream: bool) -> Response {
    let auth = format!("Bearer {TENANT_KEY}");
    let mut h = vec![("authorization", auth.as_str())];
    if let Some(tp) = traceparent {
        h.push(("traceparent", tp));
    }
    request(relay.addr, "POST", CHAT, &h, &chat_body(stream, stream))
}

fn wait_spans(got: &Received, n: usize) -> Vec<(String, Span)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spans = got.lock().unwrap().clone();
        if spans.len() >= n {
            return spans;
        }
        assert!(Instant::now() < deadline, "{} spans of {n}", spans.len());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 16: a request with a client's `traceparent` yields one trace at the collector:
/// a server span (the client's span its parent) with the GenAI attributes and the
/// relay's, and a client span for the upstream attempt, whose id the upstream got in
/// its own `traceparent`.
#[test]
fn a_request_yields_one_trace_with_the_gen_ai_attributes_and_continues_upstream() {
    let (port, got) = receiver();
    let mock = MockProc::start(None);
    let otlp = format!(
        "{{ endpoint: \"http://127.0.0.1:{port}\", interval: 100ms, metrics_interval: 200ms, service_name: relay-test }}"
    );
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_eq!(chat(&relay, Some(&tp), true).status, 200);
    let spans = wait_spans(&got, 2);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert!(spans.iter().all(|(service, _)| service == "relay-test"));
    let server = &spans
        .iter()
        .find(|(_, s)| s.kind == 2)
        .expect("a server span")
        .1;
    let client = &spans
        .iter()
        .find(|(_, s)| s.kind == 3)
        .expect("a client span")
        .1;
    assert_eq!(hex(&server.trace_id), CLIENT_TRACE);
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(hex(&client.trace_id), CLIENT_TRACE);
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(server.name, "chat gpt-4o-mini");
    let s = |k| attr(server, k).and_then(text);
    let i = |k| match attr(server, k) {
        Some(Value::IntValue(n)) => Some(*n),
        _ => None,
    };
    assert_eq!(s("gen_ai.system").as_deref(), Some("openai"));
    assert_eq!(s("gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(s("gen_ai.request.model").as_deref(), Some("gpt-4o-mini"));
    assert!(s("gen_ai.response.model").is_some());
    assert_eq!(i("gen_ai.usage.output_tokens"), Some(8));
    assert!(i("gen_ai.usage.input_tokens").unwrap() > 0);
    match attr(server, "gen_ai.response.finish_reasons") {
        Some(Value::ArrayValue(a)) => {
            assert_eq!(
                text(a.values[0].value.as_ref().unwrap()).as_deref(),
                Some("stop")
            )
        }
        other => panic!("finish reasons: {other:?}"),
    }
    assert_eq!(s("stream_relay.tenant").as_deref(), Some("acme"));
    assert_eq!(s("stream_relay.route").as_deref(), Some("openai"));
    assert_eq!(s("stream_relay.outcome").as_deref(), Some("ok"));
    assert_eq!(i("stream_relay.attempts"), Some(1));
    assert!(matches!(
        attr(server, "stream_relay.ttft_ms"),
        Some(Value::DoubleValue(_))
    ));
    assert_eq!(i("http.response.status_code"), Some(200));
    assert!(server.end_time_unix_nano >= server.start_time_unix_nano);
    // The upstream continued the trace from the client span.
    let sent = mock.stats()["last_headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        sent,
        format!("00-{CLIENT_TRACE}-{}-01", hex(&client.span_id))
    );
    relay.metrics_with("stream_relay_otlp_spans_exported_total 2\n");
    relay.metrics_with("stream_relay_otlp_spans_dropped_total 0\n");

    // The GenAI metrics, by their convention names.
    let metrics = metrics_of(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let names = [
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
    ];
    loop {
        let seen: Vec<String> = metrics
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        if names.iter().all(|n| seen.iter().any(|s| s == n)) {
            break;
        }
        assert!(Instant::now() < deadline, "metrics seen: {seen:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let all = metrics.lock().unwrap().clone();
    let (_, tokens) = all
        .iter()
        .rev()
        .find(|(n, _)| n == "gen_ai.client.token.usage")
        .unwrap();
    let output = tokens
        .iter()
        .find(|(a, _, _)| a.iter().any(|kv| kv == "gen_ai.token.type=output"))
        .expect("an output token point");
    assert_eq!((output.1, output.2), (1, 8.0), "{tokens:?}");
    assert!(
        output
            .0
            .iter()
            .any(|kv| kv == "gen_ai.request.model=gpt-4o-mini"),
        "{output:?}"
    );
    assert!(
        output.0.iter().any(|kv| kv == "gen_ai.system=openai"),
        "{output:?}"
    );

    // Without a traceparent: a trace of its own, its server span a root.
    assert_eq!(chat(&relay, None, false).status, 200);
    let spans = wait_spans(&got, 4);
    let root = &spans[2..].iter().find(|(_, s)| s.kind == 2).unwrap().1;
    assert!(root.parent_span_id.is_empty());
    assert_ne!(hex(&root.trace_id), CLIENT_TRACE);
}

/// `sample_ratio: 0` keeps no trace of its own, but a client's sampled `traceparent`
/// still decides; an unsampled one sends the upstream an unsampled `traceparent`.
#[test]
fn sampling_follows_the_ratio_and_the_clients_decision() {
    let (port, got) = receiver();
    let mock = MockProc::start(None);
    let otlp = format!(
        "{{ endpoint: \"http://127.0.0.1:{port}/v1/traces\", interval: 100ms, sample_ratio: 0 }}"
    );
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    for _ in 0..5 {
        assert_eq!(chat(&relay, None, false).status, 200);
    }
    let unsampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    assert_eq!(chat(&relay, Some(&unsampled), false).status, 200);
    let sent = mock.stats()["last_headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        sent.starts_with(&format!("00-{CLIENT_TRACE}-")) && sent.ends_with("-00"),
        "{sent}"
    );
    let sampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_eq!(chat(&relay, Some(&sampled), false).status, 200);
    let spans = wait_spans(&got, 2);
    std::thread::sleep(Duration::from_millis(500));
    let spans_now = got.lock().unwrap().len();
    assert_eq!(spans_now, 2, "{spans:#?}");
    assert!(spans.iter().all(|(_, s)| hex(&s.trace_id) == CLIENT_TRACE));
}

/// `client_sampling: ratio`: a tenant's sampled `traceparent` cannot make the relay
/// trace its requests; the trace is still the client's (the upstream gets its trace id,
/// marked as the relay decided), and the ratio still keeps the relay's own.
#[test]
fn with_client_sampling_ratio_a_client_cannot_force_a_trace() {
    let (port, got) = receiver();
    let mock = MockProc::start(None);
    let otlp = format!(
        "{{ endpoint: \"http://127.0.0.1:{port}/v1/traces\", interval: 100ms, sample_ratio: 0, client_sampling: ratio }}"
    );
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    let sampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    for _ in 0..5 {
        assert_eq!(chat(&relay, Some(&sampled), false).status, 200);
    }
    let sent = mock.stats()["last_headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        sent.starts_with(&format!("00-{CLIENT_TRACE}-")) && sent.ends_with("-00"),
        "{sent}"
    );
    // The exporter sends every 100 ms: a second is time for any span to arrive.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(got.lock().unwrap().len(), 0);
    let exported = relay.metrics_with("stream_relay_otlp_spans_exported_total");
    assert!(
        exported.contains("stream_relay_otlp_spans_exported_total 0"),
        "{exported}"
    );
    drop(relay);
    // The same with sample_ratio 1: every trace is kept, the client's included.
    let otlp = format!(
        "{{ endpoint: \"http://127.0.0.1:{port}/v1/traces\", interval: 100ms, sample_ratio: 1, client_sampling: ratio }}"
    );
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    let unsampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    assert_eq!(chat(&relay, Some(&unsampled), false).status, 200);
    let spans = wait_spans(&got, 2);
    assert!(spans.iter().all(|(_, s)| hex(&s.trace_id) == CLIENT_TRACE));
}

/// A CA, written to `ca.pem` in `dir`, and a certificate for 127.0.0.1 it signed: the
/// certificate's and its key's PEM.
fn test_pki(dir: &std::path::Path) -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    (leaf.pem(), leaf_key.serialize_pem())
}

/// [`test_pki`]'s certificate as a rustls server's config.
fn tls_collector_config(dir: &std::path::Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = test_pki(dir);
    let cert = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    Arc::new(config)
}

/// An `https` collector: its certificate verified against `ca_file`, spans delivered;
/// one the relay cannot verify gets nothing, and the failed exports are counted.
#[test]
fn an_https_collector_is_verified_against_the_ca_file() {
    let dir = temp_dir("otlp-tls");
    let tls = tls_collector_config(&dir);
    let (port, got) = receiver_on(Some(tls.clone()));
    let mock = MockProc::start(None);
    let ca = dir.join("ca.pem");
    let otlp = format!(
        "{{ endpoint: \"https://127.0.0.1:{port}\", interval: 100ms, ca_file: \"{}\" }}",
        ca.display()
    );
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    assert_eq!(chat(&relay, None, false).status, 200);
    let spans = wait_spans(&got, 2);
    assert!(
        spans.iter().any(|(_, s)| s.name == "chat gpt-4o-mini"),
        "{spans:#?}"
    );
    drop(relay);
    // The test CA is not among the system's roots: nothing is sent, failures counted.
    let (port, got) = receiver_on(Some(tls));
    let otlp =
        format!("{{ endpoint: \"https://127.0.0.1:{port}\", interval: 100ms, timeout: 1s }}");
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    assert_eq!(chat(&relay, None, false).status, 200);
    wait_export_failure(&relay);
    assert!(got.lock().unwrap().is_empty());
}

/// Waits (bounded) until the relay counts a failed export.
fn wait_export_failure(relay: &RelayProc) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = request(relay.admin, "GET", "/metrics", &[], b"");
        let text = String::from_utf8_lossy(&m.body).into_owned();
        let failed = text
            .lines()
            .find_map(|l| l.strip_prefix("stream_relay_otlp_export_failures_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if failed > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no failed export counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `protocol: grpc` to an `https` collector: TLS, verified against `ca_file`.
#[test]
fn a_grpc_collector_over_tls_is_verified_against_the_ca_file() {
    let dir = temp_dir("otlp-grpc-tls");
    let (cert, key) = test_pki(&dir);
    let (port, spans, _) = grpc_collector(Some((cert, key)));
    let mock = MockProc::start(None);
    let otlp = format!(
        "{{ endpoint: \"https://127.0.0.1:{port}\", protocol: grpc, interval: 100ms, ca_file: \"{}\" }}",
        dir.join("ca.pem").display()
    );
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    assert_eq!(chat(&relay, None, false).status, 200);
    let got = wait_spans(&spans, 2);
    assert!(
        got.iter().any(|(_, s)| s.name == "chat gpt-4o-mini"),
        "{got:#?}"
    );
    drop(relay);
    // Without the CA the collector cannot be verified: nothing arrives, failures counted.
    let before = spans.lock().unwrap().len();
    let otlp = format!(
        "{{ endpoint: \"https://127.0.0.1:{port}\", protocol: grpc, interval: 100ms, timeout: 1s }}"
    );
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    assert_eq!(chat(&relay, None, false).status, 200);
    wait_export_failure(&relay);
    assert_eq!(spans.lock().unwrap().len(), before);
}

/// A collector that is down: requests are served as ever; the failed exports are
/// counted.
#[test]
fn a_collector_down_costs_only_the_spans() {
    let closed = refused_port();
    let mock = MockProc::start(None);
    let otlp =
        format!("{{ endpoint: \"http://127.0.0.1:{closed}\", interval: 100ms, timeout: 1s }}");
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    for _ in 0..3 {
        assert_eq!(chat(&relay, None, true).status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = relay.metrics_with("stream_relay_otlp_export_failures_total");
        if !text.contains("stream_relay_otlp_export_failures_total 0\n") {
            break;
        }
        assert!(Instant::now() < deadline, "no failed export counted");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The gRPC side of a collector: what the TraceService and MetricsService receive.
struct GrpcCollector {
    spans: Received,
    metrics: Metrics,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for GrpcCollector
{
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for span in ss.spans {
                    self.spans.lock().unwrap().push((String::new(), span));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
    for GrpcCollector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
        >,
        tonic::Status,
    > {
        keep_metrics(&self.metrics, &request.into_inner().encode_to_vec());
        Ok(tonic::Response::new(Default::default()))
    }
}

/// A gRPC collector on a free port, over TLS with `tls` (certificate and key, PEM):
/// its port, and what it receives.
fn grpc_collector(tls: Option<(String, String)>) -> (u16, Received, Metrics) {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let port = free_port();
    let spans: Received = Arc::default();
    let metrics: Metrics = Arc::default();
    let (s2, m2) = (spans.clone(), metrics.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            let traces = TraceServiceServer::new(GrpcCollector {
                spans: s2.clone(),
                metrics: m2.clone(),
            });
            let metrics = MetricsServiceServer::new(GrpcCollector {
                spans: s2,
                metrics: m2,
            });
            let mut server = tonic::transport::Server::builder();
            if let Some((cert, key)) = tls {
                let identity = tonic::transport::Identity::from_pem(cert, key);
                server = server
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    .unwrap();
            }
            server
                .add_service(traces)
                .add_service(metrics)
                .serve(addr)
                .await
                .unwrap();
        });
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the gRPC collector did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (port, spans, metrics)
}

/// `protocol: grpc`: the same trace and metrics reach a gRPC collector.
#[test]
fn the_grpc_protocol_reaches_a_grpc_collector() {
    let (port, spans, metrics) = grpc_collector(None);
    let mock = MockProc::start(None);
    let otlp = format!(
        "{{ endpoint: \"http://127.0.0.1:{port}\", protocol: grpc, interval: 100ms, metrics_interval: 200ms }}"
    );
    let relay = RelayProc::start(&config(&mock, &otlp), &[]);
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_eq!(chat(&relay, Some(&tp), true).status, 200);
    let got = wait_spans(&spans, 2);
    let deadline = Instant::now();
    let server = &got
        .iter()
        .find(|(_, s)| s.kind == 2)
        .expect("a server span")
        .1;
    assert_eq!(hex(&server.trace_id), CLIENT_TRACE);
    assert_eq!(
        attr(server, "gen_ai.request.model")
            .and_then(text)
            .as_deref(),
        Some("gpt-4o-mini")
    );
    while !metrics
        .lock()
        .unwrap()
        .iter()
        .any(|(n, _)| n == "gen_ai.client.token.usage")
    {
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "no metrics over gRPC"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
