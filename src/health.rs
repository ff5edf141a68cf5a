//! Active health checks (`routes[].health_check`): a background service that probes each
//! upstream of such a route and gives the answer to its breaker (see [`crate::breaker`]).

use std::time::{Duration, Instant};

use crate::upstream::HealthCheck;

/// Active health checks (`routes[].health_check`), a background service: each upstream
/// of such a route gets `GET path` every `interval`, through Pingora's connector (the
/// route's TLS and CA settings, a connection of its own), and the answer goes to its
/// breaker like live traffic's would.
pub struct HealthChecker {
    pub routes: std::sync::Arc<crate::route::RouteTable>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let checked: Vec<_> = self
            .routes
            .iter()
            .filter(|r| r.health_check.is_some())
            .cloned()
            .collect();
        if checked.is_empty() {
            return;
        }
        let connector = pingora_core::connectors::http::Connector::new(None);
        let mut due = vec![Instant::now(); checked.len()];
        loop {
            let now = Instant::now();
            for (route, due) in checked.iter().zip(due.iter_mut()) {
                let check = route.health_check.as_ref().expect("filtered");
                if now < *due {
                    continue;
                }
                *due = now + check.interval;
                for upstream in &route.upstreams {
                    let healthy = probe(&connector, route, upstream, check).await;
                    if let Err(e) = &healthy {
                        log::debug!("health check of {} failed: {e}", upstream.label());
                    }
                    let b = &upstream.breaker;
                    let t = b.verdict(healthy.is_ok(), None, b.generation());
                    if let Some(t) = t {
                        self.metrics
                            .breaker_report(&route.name, &upstream.label(), t);
                    }
                }
            }
            let next = due
                .iter()
                .min()
                .copied()
                .unwrap_or(now + Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Why a health request counts against its upstream.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("no resolved address")]
    NoAddress,
    /// Connecting, writing the request or reading the answer failed.
    #[error("{0}")]
    Pingora(#[from] Box<pingora_core::Error>),
    #[error("no response")]
    NoResponse,
    #[error("answered {0}")]
    ServerError(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One health request: the status when it is not a server error.
async fn probe(
    connector: &pingora_core::connectors::http::Connector,
    route: &crate::route::Route,
    upstream: &crate::upstream::Upstream,
    check: &HealthCheck,
) -> Result<u16, ProbeError> {
    let peer = upstream
        .peer(&route.timeouts)
        .ok_or(ProbeError::NoAddress)?;
    let run = async {
        let (mut session, _) = connector.get_http_session(&peer).await?;
        let mut req = pingora_http::RequestHeader::build("GET", check.path.as_bytes(), None)?;
        let _ = req.insert_header(http::header::HOST, upstream.url.host_value().clone());
        let _ = req.insert_header("user-agent", "stream-relay-health-check");
        if let (crate::route::RouteKey::Pool { header, .. }, Some(slot)) =
            (&route.key, route.key_slot(Some(0)))
        {
            let _ = req.insert_header(header.clone(), slot.value.expose());
        }
        session.write_request_header(Box::new(req)).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let status = session
            .response_header()
            .map(|h| h.status.as_u16())
            .ok_or(ProbeError::NoResponse)?;
        if status >= 500 {
            return Err(ProbeError::ServerError(status));
        }
        Ok(status)
    };
    match tokio::time::timeout(check.timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(check.timeout)),
    }
}
