//! Observation stage (`logging`): Prometheus metric families owned by the proxy, with
//! bounded labels (route names come from the configuration, outcomes from a fixed set).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_failures: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "stream_relay_requests_total",
                "Requests finished, by route, status class and outcome.",
            ),
            &["route", "status_class", "outcome"],
        )
        .expect("metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "stream_relay_request_duration_seconds",
                "Time from request head to the end of the response, by route.",
            )
            .buckets(vec![
                0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            &["route"],
        )
        .expect("metric");
        let upstream_failures = IntCounterVec::new(
            Opts::new(
                "stream_relay_upstream_failures_total",
                "Upstream attempts that failed before a response, by route and kind.",
            ),
            &["route", "kind"],
        )
        .expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(upstream_failures.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            requests,
            duration,
            upstream_failures,
        }
    }

    pub fn request_done(&self, route: &str, status: u16, outcome: &str, seconds: f64) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        self.requests
            .with_label_values(&[route, class, outcome])
            .inc();
        self.duration.with_label_values(&[route]).observe(seconds);
    }

    pub fn upstream_failure(&self, route: &str, kind: &str) {
        self.upstream_failures
            .with_label_values(&[route, kind])
            .inc();
    }

    /// Prometheus text exposition of every family.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_carries_labels() {
        let m = Metrics::new();
        m.request_done("openai", 200, "ok", 0.2);
        m.request_done("openai", 401, "invalid_key", 0.001);
        m.upstream_failure("openai", "connect");
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains(
            r#"stream_relay_requests_total{outcome="ok",route="openai",status_class="2xx"} 1"#
        ));
        assert!(text
            .contains(r#"stream_relay_upstream_failures_total{kind="connect",route="openai"} 1"#));
        assert!(text.contains("stream_relay_request_duration_seconds_count{route=\"openai\"} 2"));
    }
}
