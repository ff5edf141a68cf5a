//! Configuration stage: the YAML file as written (`raw`), checked and turned into the
//! validated [`Config`] the relay runs on (`validate`, with the small formats of `parse`).
//! Every validation error names the key it is about, for example
//! `routes[2].upstreams[0]: ...` (`error`). Only the wiring (`server`, `reload`, `main`)
//! reads this module; the settings types it builds live with the modules that own them.

use std::path::Path;

mod budgets;
mod error;
mod parse;
mod raw;
mod routes;
mod validate;

pub use error::{ConfigError, DurationError, Problem};
pub use parse::parse_duration;
pub use raw::*;
pub use validate::{per_address_cap, MAX_LABELLED_TENANTS, PER_ADDRESS_BEYOND_LOOPBACK};

pub use crate::auth::TenantConfig;
pub use crate::limits::redis::{RedisConfig, RedisUrl};
pub use crate::route::{Balance, Capture, KeyConfig, RouteConfig};
pub use crate::stall::Timeouts;
pub use crate::upstream::{parse_upstream_url, HealthCheck, UpstreamUrl};

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Pingora's process settings, validated.
    pub server: RawServer,
    pub proxy_listen: String,
    pub proxy_read_buffer: usize,
    pub input_limits: crate::gate::InputLimits,
    /// Client connection caps (0: none).
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// `max_connections_per_address` is the default for a listener beyond loopback (not
    /// set in the file): said in the log at start.
    pub per_address_defaulted: bool,
    pub admin_listen: Option<String>,
    pub mock_listen: Option<String>,
    pub routes: Vec<RouteConfig>,
    pub tenants: Vec<TenantConfig>,
    pub pricing: crate::cost::Pricing,
    pub metrics: RawMetrics,
    /// Output tokens assumed when a request sets no `max_tokens`.
    pub default_max_tokens: u64,
    pub redis: Option<RedisConfig>,
    pub rows_file: crate::rows::file::FileSinkConfig,
    /// Rows to ClickHouse instead of the file.
    pub rows_clickhouse: Option<crate::rows::clickhouse::ClickHouseConfig>,
    /// Rows that may wait for the file writer.
    pub rows_file_queue: usize,
    /// This relay's name in rows.
    pub instance: String,
    /// How budgets reserve (the budgets themselves are the tenants').
    pub budget_settings: crate::budget::BudgetSettings,
    /// Where the response cache keeps its entries.
    pub cache_settings: crate::cache::CacheSettings,
    /// OpenTelemetry export, when on.
    pub otlp: Option<crate::telemetry::OtlpConfig>,
}

impl Config {
    /// Reads and validates a configuration file, resolving provider keys from the
    /// process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_yaml(&text, base, &|name| std::env::var(name).ok())
    }

    /// Parses and validates YAML. Relative file paths in it are taken from `base_dir`.
    pub fn from_yaml(
        text: &str,
        base_dir: &Path,
        lookup_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        // serde_yaml names the path of the offending key in its message.
        let raw: RawConfig = serde_yaml::from_str(text).map_err(ConfigError::Yaml)?;
        raw.validate(base_dir, lookup_env)
    }

    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }
}

#[cfg(test)]
mod tests;
