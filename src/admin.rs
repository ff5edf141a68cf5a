//! Admin stage: the loopback listener for `/healthz` (alive), `/readyz` (ready for
//! traffic; 503 once a graceful shutdown or upgrade has begun), `/metrics` and
//! `/budgets` (every configured budget's spend, reservations and reset, as JSON).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::metrics::Metrics;

/// Set when the server broadcasts its graceful shutdown; read by `/readyz`.
#[derive(Default)]
pub struct Draining(AtomicBool);

impl Draining {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Background service that flips [`Draining`] when shutdown starts.
pub struct DrainWatch(pub Arc<Draining>);

#[async_trait]
impl BackgroundService for DrainWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let _ = shutdown.changed().await;
        self.0 .0.store(true, Ordering::Relaxed);
    }
}

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub draining: Arc<Draining>,
    pub budgets: Arc<crate::budget::Budgets>,
    pub tenants: Arc<crate::reload::Tenants>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            "/readyz" if self.draining.is_set() => (503, "text/plain", b"draining\n".to_vec()),
            "/readyz" => (200, "text/plain", b"ready\n".to_vec()),
            "/metrics" => (200, "text/plain; version=0.0.4", self.metrics.encode()),
            "/budgets" => {
                let specs = self.tenants.current().budgets();
                let report = self.budgets.report(&specs).await;
                (200, "application/json", report.to_string().into_bytes())
            }
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("static response parts are valid")
    }
}
