//! Configuration stage, at run time: tenants and their limits are read again from the
//! configuration file on SIGHUP or when the file changes (checked every 2 s), and
//! swapped in whole. A file that does not validate is refused with a log line and a
//! metric, and the running table stays. Routes, listeners and server settings need a
//! restart (or a graceful upgrade).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use log::{error, info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::auth::TenantTable;
use crate::config::Config;
use crate::metrics::Metrics;

/// How often the file's modification time is checked.
const POLL: Duration = Duration::from_secs(2);

/// The tenant table requests read, replaced whole on reload.
pub struct Tenants(RwLock<Arc<TenantTable>>);

impl Tenants {
    pub fn new(table: TenantTable) -> Tenants {
        Tenants(RwLock::new(Arc::new(table)))
    }

    pub fn current(&self) -> Arc<TenantTable> {
        self.0.read().expect("tenants lock").clone()
    }

    fn replace(&self, table: TenantTable) {
        *self.0.write().expect("tenants lock") = Arc::new(table);
    }
}

pub struct Reloader {
    pub path: PathBuf,
    pub tenants: Arc<Tenants>,
    pub metrics: Arc<Metrics>,
    /// The routes running now, to warn when the file changes them.
    pub route_names: Vec<String>,
}

impl Reloader {
    /// Reads the file again and swaps the tenants in; returns whether it did.
    pub fn reload(&self) -> bool {
        match Config::load(&self.path) {
            Ok(config) => {
                let names: Vec<String> = config.route_names().map(str::to_string).collect();
                if names != self.route_names {
                    warn!(
                        "{}: route changes take effect after a restart or upgrade",
                        self.path.display()
                    );
                }
                let n = config.tenants.len();
                self.tenants.replace(TenantTable::new(&config.tenants));
                self.metrics.config_reload(true);
                info!("{}: reloaded {n} tenants", self.path.display());
                true
            }
            Err(e) => {
                self.metrics.config_reload(false);
                error!(
                    "{}: reload refused, the running tenants stay: {e}",
                    self.path.display()
                );
                false
            }
        }
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("no SIGHUP reload: {e}");
                None
            }
        };
        let mut seen = modified(&self.path);
        loop {
            let signalled = tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(POLL) => false,
                Some(_) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            let now = modified(&self.path);
            if signalled || now != seen {
                seen = now;
                self.reload();
            }
        }
    }
}
