//! Configuration stage, validation of `routes`: each route's name, prefix, upstreams,
//! key, timeouts, breakers, retries, health check, capture and policy, checked in file
//! order and turned into the [`RouteConfig`] the route table is built from.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::error::{invalid, ConfigError, Problem};
use super::parse::{capture_size, normalize_prefix};
use super::raw::{
    ProviderKind, RawBreaker, RawCapture, RawHealthCheck, RawRoute, RawRouteCache, RawTimeouts,
};
use super::validate::{duration_at, LookupEnv};
use crate::breaker::BreakerConfig;
use crate::policy::{Endpoint, Endpoints, RoutePolicy, Store};
use crate::route::{Balance, Capture, KeyConfig, RouteConfig};
use crate::secret::SecretRef;
use crate::stall::Timeouts;
use crate::upstream::{parse_upstream_url, HealthCheck, UpstreamUrl};

/// Every route, with names and prefixes unique across them.
pub(super) fn validate_routes(
    raw: Vec<RawRoute>,
    base_dir: &Path,
    lookup_env: LookupEnv<'_>,
) -> Result<Vec<RouteConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid("routes", Problem::NoRoutes));
    }
    let mut names = HashSet::new();
    let mut prefixes = HashMap::new();
    let mut routes = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        let route = validate_route(&at, r, base_dir, lookup_env)?;
        if !names.insert(route.name.clone()) {
            return Err(invalid(
                format!("{at}.name"),
                Problem::RouteTaken(route.name),
            ));
        }
        if let Some(other) = prefixes.insert(route.prefix.clone(), route.name.clone()) {
            return Err(invalid(
                format!("{at}.prefix"),
                Problem::PrefixTaken {
                    prefix: route.prefix,
                    route: other,
                },
            ));
        }
        routes.push(route);
    }
    Ok(routes)
}

/// One route, its keys checked in the order they are written.
fn validate_route(
    at: &str,
    r: RawRoute,
    base_dir: &Path,
    lookup_env: LookupEnv<'_>,
) -> Result<RouteConfig, ConfigError> {
    check_route_name(at, &r.name)?;
    let prefix = normalize_prefix(&r.prefix)
        .ok_or_else(|| invalid(format!("{at}.prefix"), Problem::Prefix))?;
    let upstreams = route_upstreams(at, &r.upstreams)?;
    let key = route_key(at, &r, lookup_env)?;
    let ca_pem = route_ca_file(at, r.ca_file.as_deref(), base_dir)?;
    let timeouts = route_timeouts(at, &r.timeouts)?;
    let openai_style = matches!(
        r.provider,
        ProviderKind::Openai | ProviderKind::OpenaiCompatible
    );
    if r.ensure_usage == Some(true) && !openai_style {
        return Err(invalid(format!("{at}.ensure_usage"), Problem::EnsureUsage));
    }
    let capture = route_capture(at, &r.capture)?;
    if r.upstreams.len() > 64 {
        return Err(invalid(
            format!("{at}.upstreams"),
            Problem::TooManyUpstreams,
        ));
    }
    let (balance, weights) = route_balance(at, &r)?;
    let breaker = route_breaker(at, r.breaker.as_ref())?;
    let retry_on = route_retries(at, &r)?;
    let health_check = route_health_check(at, r.health_check.as_ref())?;
    if r.max_body_bytes == Some(0) {
        return Err(invalid(format!("{at}.max_body_bytes"), Problem::AtLeast(1)));
    }
    let policy = route_policy(at, &r, &upstreams)?;
    let cache = r.cache.as_ref().map(|c| route_cache(at, c)).transpose()?;
    Ok(RouteConfig {
        cache,
        policy,
        health_check,
        balance,
        weights,
        breaker,
        max_attempts: r.max_attempts,
        retry_on,
        retry_after_send: r.retry_after_send,
        max_body_bytes: r.max_body_bytes.unwrap_or(32 << 20),
        capture,
        ensure_usage: r.ensure_usage.unwrap_or(openai_style),
        name: r.name,
        prefix,
        provider: r.provider,
        upstreams,
        key,
        ca_pem,
        timeouts,
    })
}

fn route_cache(at: &str, c: &RawRouteCache) -> Result<crate::cache::RouteCache, ConfigError> {
    let at = format!("{at}.cache");
    let dur = |key: &str, set: &Option<String>, default: &str| {
        duration_at(format!("{at}.{key}"), set.as_deref().unwrap_or(default))
    };
    let ttl = dur("ttl", &c.ttl, "1h")?;
    if ttl.is_zero() {
        return Err(invalid(format!("{at}.ttl"), Problem::Zero));
    }
    let when = match c.when.as_deref().unwrap_or("deterministic") {
        "deterministic" => crate::cache::When::Deterministic,
        "always" => crate::cache::When::Always,
        other => {
            return Err(invalid(
                format!("{at}.when"),
                Problem::OneOf(other.into(), "deterministic, always"),
            ))
        }
    };
    Ok(crate::cache::RouteCache {
        ttl,
        max_entry_bytes: c.max_entry_bytes.unwrap_or(1 << 20),
        when,
        shared_by: c.shared_by.clone(),
        wait: dur("wait", &c.wait, "5s")?,
    })
}

fn check_route_name(at: &str, name: &str) -> Result<(), ConfigError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
    if name.is_empty() || !name.bytes().all(allowed) {
        return Err(invalid(format!("{at}.name"), Problem::RouteName));
    }
    Ok(())
}

fn route_upstreams(at: &str, urls: &[String]) -> Result<Vec<UpstreamUrl>, ConfigError> {
    if urls.is_empty() {
        return Err(invalid(format!("{at}.upstreams"), Problem::NoUpstreams));
    }
    let mut upstreams = Vec::with_capacity(urls.len());
    for (k, u) in urls.iter().enumerate() {
        upstreams
            .push(parse_upstream_url(u).map_err(|e| invalid(format!("{at}.upstreams[{k}]"), e))?);
    }
    Ok(upstreams)
}

/// The provider key (or pool of keys) and how it is sent. A key that is not set does not
/// fail here: the route answers 503 and says which.
fn route_key(at: &str, r: &RawRoute, lookup_env: LookupEnv<'_>) -> Result<KeyConfig, ConfigError> {
    let texts = key_references(at, r)?;
    if texts.is_empty() {
        if r.key_header.is_some() || r.key_format.is_some() {
            return Err(invalid(format!("{at}.key"), Problem::KeySettingsWithoutKey));
        }
        return Ok(KeyConfig::None);
    }
    let mut references = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let key = if r.keys.is_some() {
            format!("{at}.keys[{i}]")
        } else {
            format!("{at}.key")
        };
        references.push(SecretRef::parse(text).map_err(|e| invalid(key, e))?);
    }
    let header = key_header(at, r)?;
    let (prefix, suffix) = key_format(at, r.key_format.as_deref(), &header)?;
    Ok(KeyConfig::Injected {
        header,
        prefix,
        suffix,
        states: references.iter().map(|s| s.resolve(lookup_env)).collect(),
    })
}

/// `key` or `keys` (not both), as written.
fn key_references(at: &str, r: &RawRoute) -> Result<Vec<String>, ConfigError> {
    match (&r.key, &r.keys) {
        (Some(_), Some(_)) => Err(invalid(format!("{at}.keys"), Problem::KeyAndKeys)),
        (Some(k), None) => Ok(vec![k.clone()]),
        (None, Some(ks)) if ks.is_empty() || ks.len() > 64 => {
            Err(invalid(format!("{at}.keys"), Problem::KeyCount))
        }
        (None, Some(ks)) => Ok(ks.clone()),
        (None, None) => Ok(Vec::new()),
    }
}

/// The key's header, lowercase; by default the provider's.
fn key_header(at: &str, r: &RawRoute) -> Result<String, ConfigError> {
    let Some(h) = &r.key_header else {
        return Ok(match r.provider {
            ProviderKind::Anthropic => "x-api-key".into(),
            _ => "authorization".into(),
        });
    };
    let h = h.to_ascii_lowercase();
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if h.is_empty() || !h.bytes().all(allowed) {
        return Err(invalid(format!("{at}.key_header"), Problem::KeyHeader));
    }
    Ok(h)
}

/// The header value around `{key}`: `Bearer {key}` for `authorization`, else `{key}`.
fn key_format(at: &str, set: Option<&str>, header: &str) -> Result<(String, String), ConfigError> {
    let default = if header == "authorization" {
        "Bearer {key}"
    } else {
        "{key}"
    };
    let Some((prefix, suffix)) = set.unwrap_or(default).split_once("{key}") else {
        return Err(invalid(format!("{at}.key_format"), Problem::KeyFormat));
    };
    if suffix.contains("{key}") {
        return Err(invalid(format!("{at}.key_format"), Problem::KeyFormatTwice));
    }
    Ok((prefix.to_string(), suffix.to_string()))
}

/// The CA file, which must hold at least one PEM certificate.
fn route_ca_file(
    at: &str,
    file: Option<&str>,
    base_dir: &Path,
) -> Result<Option<PathBuf>, ConfigError> {
    let Some(file) = file else {
        return Ok(None);
    };
    let key = format!("{at}.ca_file");
    let path = base_dir.join(file);
    let text = std::fs::read(&path).map_err(|error| {
        let path = path.clone();
        invalid(key.clone(), Problem::CaRead { path, error })
    })?;
    if crate::upstream::parse_ca_pem(&text).is_none_or(|c| c.is_empty()) {
        return Err(invalid(key, Problem::CaEmpty(path)));
    }
    Ok(Some(path))
}

fn route_timeouts(at: &str, t: &RawTimeouts) -> Result<Timeouts, ConfigError> {
    let key = |name: &str| format!("{at}.timeouts.{name}");
    let timeouts = Timeouts {
        connect: duration_at(key("connect"), &t.connect)?,
        first_byte: duration_at(key("first_byte"), &t.first_byte)?,
        idle: duration_at(key("idle"), &t.idle)?,
        total: duration_at(key("total"), &t.total)?,
        session_idle: duration_at(key("session_idle"), &t.session_idle)?,
        session_max: duration_at(key("session_max"), &t.session_max)?,
    };
    for (name, d) in [
        ("connect", timeouts.connect),
        ("first_byte", timeouts.first_byte),
        ("idle", timeouts.idle),
        ("total", timeouts.total),
        ("session_idle", timeouts.session_idle),
        ("session_max", timeouts.session_max),
    ] {
        if d.is_zero() {
            return Err(invalid(key(name), Problem::Zero));
        }
    }
    Ok(timeouts)
}

fn route_capture(at: &str, c: &RawCapture) -> Result<Capture, ConfigError> {
    let side =
        |name: &str, set| capture_size(set).map_err(|p| invalid(format!("{at}.capture.{name}"), p));
    Ok(Capture {
        request: side("request", &c.request)?,
        response: side("response", &c.response)?,
    })
}

/// How an upstream is chosen, and one weight per upstream (all 1 unless weighted).
fn route_balance(at: &str, r: &RawRoute) -> Result<(Balance, Vec<u32>), ConfigError> {
    let balance = match r.balance.as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_in_flight") => Balance::LeastInFlight,
        Some("weighted") => Balance::Weighted,
        Some(other) => {
            return Err(invalid(
                format!("{at}.balance"),
                Problem::Balance(other.into()),
            ))
        }
    };
    let key = format!("{at}.weights");
    let weights = match (&r.weights, balance) {
        (Some(w), Balance::Weighted)
            if w.len() == r.upstreams.len() && w.iter().all(|x| *x > 0) =>
        {
            w.clone()
        }
        (Some(_), Balance::Weighted) => return Err(invalid(key, Problem::Weights)),
        (None, Balance::Weighted) => return Err(invalid(key, Problem::WeightsMissing)),
        (Some(_), _) => return Err(invalid(key, Problem::WeightsUnweighted)),
        (None, _) => vec![1; r.upstreams.len()],
    };
    Ok((balance, weights))
}

/// The breaker of each upstream and key; what is not set is [`BreakerConfig::default`].
fn route_breaker(at: &str, set: Option<&RawBreaker>) -> Result<BreakerConfig, ConfigError> {
    let default = BreakerConfig::default();
    let Some(b) = set else {
        return Ok(default);
    };
    let failures = match b.failures {
        Some(0) => {
            return Err(invalid(
                format!("{at}.breaker.failures"),
                Problem::AtLeast(1),
            ))
        }
        Some(n) => n,
        None => default.failures,
    };
    let open_for = match &b.open_for {
        Some(text) => duration_at(format!("{at}.breaker.open_for"), text)?,
        None => default.open_for,
    };
    Ok(BreakerConfig { failures, open_for })
}

/// Checks `max_attempts`; returns the statuses tried again.
fn route_retries(at: &str, r: &RawRoute) -> Result<Vec<u16>, ConfigError> {
    if let Some(n) = r.max_attempts {
        // Pingora stops a request after 16 tries whatever the relay says.
        if !(1..=16).contains(&n) {
            return Err(invalid(format!("{at}.max_attempts"), Problem::MaxAttempts));
        }
    }
    let retry_on = r
        .retry_on
        .clone()
        .unwrap_or_else(|| vec![429, 500, 502, 503, 504, 529]);
    if let Some(bad) = retry_on.iter().find(|s| !(400..600).contains(*s)) {
        return Err(invalid(
            format!("{at}.retry_on"),
            Problem::NotErrorStatus(*bad),
        ));
    }
    Ok(retry_on)
}

fn route_health_check(
    at: &str,
    set: Option<&RawHealthCheck>,
) -> Result<Option<HealthCheck>, ConfigError> {
    let Some(h) = set else {
        return Ok(None);
    };
    if !h.path.starts_with('/') || h.path.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(invalid(
            format!("{at}.health_check.path"),
            Problem::HealthPath,
        ));
    }
    let dur = |key: &str, set: &Option<String>, default: &str| {
        duration_at(
            format!("{at}.health_check.{key}"),
            set.as_deref().unwrap_or(default),
        )
    };
    let interval = dur("interval", &h.interval, "10s")?;
    let timeout = dur("timeout", &h.timeout, "2s")?;
    if interval.is_zero() || timeout.is_zero() {
        return Err(invalid(format!("{at}.health_check"), Problem::HealthZero));
    }
    Ok(Some(HealthCheck {
        path: h.path.clone(),
        interval,
        timeout,
    }))
}

/// A route's endpoints, store policy and upstream headers.
fn route_policy(
    at: &str,
    r: &RawRoute,
    upstreams: &[UpstreamUrl],
) -> Result<RoutePolicy, ConfigError> {
    let endpoints = route_endpoints(at, r, upstreams)?;
    let store = match r.store.as_deref() {
        None | Some("pass") => Store::Pass,
        Some("force_off") => Store::ForceOff,
        Some(_) => return Err(invalid(format!("{at}.store"), Problem::Store)),
    };
    Ok(RoutePolicy {
        endpoints,
        store,
        upstream_headers: upstream_headers(at, &r.upstream_headers)?,
    })
}

/// What the route serves: the provider's defaults, or the list given.
fn route_endpoints(
    at: &str,
    r: &RawRoute,
    upstreams: &[UpstreamUrl],
) -> Result<Endpoints, ConfigError> {
    let endpoints = match &r.endpoints {
        None => Endpoints::defaults(r.provider),
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (k, e) in list.iter().enumerate() {
                out.push(
                    Endpoint::parse(e).map_err(|e| invalid(format!("{at}.endpoints[{k}]"), e))?,
                );
            }
            Endpoints(out)
        }
    };
    let same_base = upstreams
        .iter()
        .all(|u| u.base_path == upstreams[0].base_path);
    if endpoints.0.iter().any(Endpoint::is_anchored) && !same_base {
        return Err(invalid(format!("{at}.endpoints"), Problem::MixedBasePaths));
    }
    Ok(endpoints)
}

/// `upstream_headers`, none of them one the relay sets itself.
fn upstream_headers(
    at: &str,
    headers: &BTreeMap<String, String>,
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, ConfigError> {
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let key = format!("{at}.upstream_headers.{name}");
        let n = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| invalid(key.clone(), Problem::HeaderName))?;
        if crate::policy::relay_owned_header(n.as_str()) {
            return Err(invalid(key, Problem::RelayOwnedHeader));
        }
        let v =
            http::HeaderValue::from_str(value).map_err(|_| invalid(key, Problem::HeaderValue))?;
        out.push((n, v));
    }
    Ok(out)
}
