//! Configuration stage, errors: what can be wrong with a configuration file, typed.
//! A validation error is a [`Problem`] at a key, shown as `key: problem`, for example
//! `routes[2].upstreams[0]: ...`. The wording is what operators (and tests) read: it
//! changes only on purpose.

use std::path::PathBuf;

use crate::policy::EndpointError;
use crate::secret::SecretRefError;
use crate::upstream::UpstreamUrlError;

/// Why a configuration does not load.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file itself cannot be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not YAML, or not the configuration's shape; serde_yaml names the key.
    #[error("{0}")]
    Yaml(serde_yaml::Error),
    /// A value that does not validate, at the key that holds it.
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: Problem },
}

/// The problem at `key`.
pub(super) fn invalid(key: impl Into<String>, problem: impl Into<Problem>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// Why a duration (`250ms`, `5s`, `10m`, `1h`) does not parse; each names the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` needs a unit: ms, s, m or h")]
    NoUnit(String),
    #[error("`{0}` is not a duration like 500ms, 5s, 10m or 1h")]
    Number(String),
    #[error("`{0}`: unit must be ms, s, m or h")]
    Unit(String),
}

/// What is wrong with one value of the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    // Values of any section.
    #[error("must not be empty")]
    Empty,
    #[error("must be at least {0}")]
    AtLeast(u64),
    #[error("must be at most {0}")]
    AtMost(u64),
    #[error("must be more than zero")]
    Zero,
    #[error(transparent)]
    Duration(#[from] DurationError),
    #[error("`{0}` is not an IP:port address")]
    NotSocketAddr(String),
    #[error(transparent)]
    SecretRef(#[from] SecretRefError),
    /// Only where the secret is needed to start (Redis, ClickHouse); a route's missing
    /// key is not fatal.
    #[error("{0} is not set")]
    SecretNotSet(String),

    // server, listen, metrics, limits, pricing.
    #[error("must be between 1 and 1024")]
    Threads,
    #[error("must differ from listen.proxy")]
    SameAsProxy,
    #[error("{tenants} tenants are too many for a label (at most {max})")]
    TooManyLabelled { tenants: usize, max: usize },
    #[error("must be at least 1 (leave it out for no limit)")]
    ZeroLimit,
    #[error("must be a price of 0 or more")]
    Price,

    // tenants.
    #[error("`{0}` is used by another tenant")]
    TenantTaken(String),
    #[error("at least one key hash is needed")]
    NoKeyHashes,
    #[error("must be 64 hex characters (run `stream-relay hash-key`)")]
    KeyHash,
    #[error("the same key is also given to `{0}`")]
    KeyHashTaken(String),
    #[error("no route is named `{0}`")]
    NoSuchRoute(String),

    // budgets, groups.
    #[error("no tenant is named `{0}`")]
    NoSuchTenant(String),
    #[error("no group is named `{0}`")]
    NoSuchGroup(String),
    #[error("must start with http:// or https://")]
    OtlpScheme,
    #[error("must be between 0 and 1")]
    Ratio,
    #[error("must be a dollar amount of 0 or more")]
    Dollars,
    #[error("`{0}`: not a time zone name (IANA, such as UTC or Europe/Berlin)")]
    TimeZone(String),
    #[error("`{0}`: must be one of {1}")]
    OneOf(String, &'static str),
    #[error("must be above 0 and at most 1")]
    Percentile,
    #[error("another budget of the same owner has the same scope (`{0}`)")]
    BudgetScopeTaken(String),

    // redis, rows.
    #[error("must start with redis:// or rediss://")]
    RedisScheme,
    #[error("give `redis.url` or `redis.sentinel`, not both")]
    RedisUrlAndSentinel,
    #[error("`{0}`: must be `local` or `refuse`")]
    OnFailure(String),
    #[error("must start with http:// (ClickHouse's HTTP interface)")]
    ClickHouseScheme,
    #[error("https is not built in; reach ClickHouse over http on a private network")]
    ClickHouseHttps,
    #[error("letters, digits and _ only, not starting with a digit")]
    DatabaseName,
    #[error("`{0}`: must be `auto`, `legacy` or `current`")]
    ClickHouseLayout(String),
    #[error("must not contain `;`, quotes or backslashes")]
    SqlFragment,
    #[error("must be a string, number or boolean")]
    SettingValue,

    // routes.
    #[error("at least one route is needed")]
    NoRoutes,
    #[error("`{0}` is used by another route")]
    RouteTaken(String),
    #[error("`{prefix}` is already the prefix of route `{route}`")]
    PrefixTaken { prefix: String, route: String },
    #[error("must be non-empty letters, digits, `-`, `_` or `.`")]
    RouteName,
    #[error("must start with `/`, e.g. `/openai/v1`")]
    Prefix,
    #[error("at least one upstream URL is needed")]
    NoUpstreams,
    #[error("at most 64 upstreams")]
    TooManyUpstreams,
    #[error(transparent)]
    UpstreamUrl(#[from] UpstreamUrlError),
    #[error("set `key` or `keys`, not both")]
    KeyAndKeys,
    #[error("must list 1 to 64 keys")]
    KeyCount,
    #[error("key_header or key_format is set but no key is given")]
    KeySettingsWithoutKey,
    #[error("is not a valid header name")]
    KeyHeader,
    #[error("must contain `{{key}}`")]
    KeyFormat,
    #[error("must contain `{{key}}` once")]
    KeyFormatTwice,
    #[error("cannot read {}: {error}", path.display())]
    CaRead {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    CaEmpty(PathBuf),
    #[error("only openai and openai_compatible routes stream OpenAI usage chunks")]
    EnsureUsage,
    #[error("`{0}`: must be off, whole or a number of bytes")]
    Capture(String),
    #[error("`{0}`: must be round_robin, least_in_flight or weighted")]
    Balance(String),
    #[error("one weight above 0 per upstream")]
    Weights,
    #[error("balance: weighted needs weights")]
    WeightsMissing,
    #[error("only with balance: weighted")]
    WeightsUnweighted,
    #[error("must be 1 to 16")]
    MaxAttempts,
    #[error("{0} is not an error status")]
    NotErrorStatus(u16),
    #[error("must start with / and have no spaces")]
    HealthPath,
    #[error("interval and timeout must be more than zero")]
    HealthZero,

    // A route's policy: endpoints, store, upstream headers.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(
        "whole-path patterns (with a leading `/`) need every upstream to have the same base path"
    )]
    MixedBasePaths,
    #[error("must be `pass` or `force_off`")]
    Store,
    #[error("not a valid header name")]
    HeaderName,
    #[error("this header is set by the relay itself")]
    RelayOwnedHeader,
    #[error("not a valid header value")]
    HeaderValue,
}
