//! Upstream stage (`upstream_peer`): resolved addresses of each upstream host and the
//! `HttpPeer` built from them.
//!
//! `HttpPeer::new` with a host name resolves DNS synchronously on the request path and
//! panics when resolution fails, so the relay never hands it a name: addresses are
//! resolved at start and refreshed by [`Resolver`], a background service, and the proxy
//! gets a socket address plus SNI and Host.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use log::{info, warn};
use pingora_core::protocols::ALPN;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{parse_x509, WrappedX509};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::stall::Timeouts;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// How long Pingora's own read timeout waits past the stall guard's deadlines.
const READ_TIMEOUT_MARGIN: Duration = Duration::from_secs(2);
/// How often upstream host names are resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// One upstream base URL with its current addresses.
pub struct Upstream {
    pub url: UpstreamUrl,
    addrs: RwLock<Arc<[SocketAddr]>>,
    next_addr: AtomicUsize,
    ca: Option<Arc<[WrappedX509]>>,
    /// Pool key part for the trust configuration; see [`Upstream::peer`].
    trust_group: u64,
    /// Set aside after repeated failures (connect errors, 5xx, timeouts).
    pub breaker: crate::breaker::Breaker,
    /// Attempts using it now (for `balance: least_in_flight`).
    pub in_flight: AtomicUsize,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url)
            .field("addrs", &self.addrs.read().map(|a| a.len()).unwrap_or(0))
            .field("custom_ca", &self.ca.is_some())
            .finish()
    }
}

impl Upstream {
    /// An upstream whose host is an IP literal needs no resolution; a name starts
    /// unresolved until [`Upstream::resolve_now`] runs.
    pub fn new(url: UpstreamUrl, ca: Option<(Arc<[WrappedX509]>, u64)>) -> Upstream {
        Upstream::with_breaker(url, ca, crate::breaker::BreakerConfig::default())
    }

    pub fn with_breaker(
        url: UpstreamUrl,
        ca: Option<(Arc<[WrappedX509]>, u64)>,
        breaker: crate::breaker::BreakerConfig,
    ) -> Upstream {
        let (ca, trust_group) = match ca {
            Some((certs, group)) => (Some(certs), group),
            None => (None, 0),
        };
        let addrs: Arc<[SocketAddr]> = match url.host.parse::<std::net::IpAddr>() {
            Ok(ip) => Arc::from([SocketAddr::new(ip, url.port)]),
            Err(_) => Arc::from([]),
        };
        Upstream {
            url,
            addrs: RwLock::new(addrs),
            next_addr: AtomicUsize::new(0),
            ca,
            trust_group,
            breaker: crate::breaker::Breaker::new(breaker),
            in_flight: AtomicUsize::new(0),
        }
    }

    pub fn is_literal(&self) -> bool {
        self.url.host.parse::<std::net::IpAddr>().is_ok()
    }

    /// Resolves the host (blocking). Keeps the previous addresses when resolution fails,
    /// so a DNS hiccup does not take a working upstream out.
    pub fn resolve_now(&self) -> Result<usize, ResolveError> {
        if self.is_literal() {
            return Ok(1);
        }
        match (self.url.host.as_str(), self.url.port).to_socket_addrs() {
            Ok(found) => {
                let found: Vec<SocketAddr> = found.collect();
                if found.is_empty() {
                    return Err(ResolveError::NoAddress(self.url.host.clone()));
                }
                let n = found.len();
                *self.addrs.write().expect("addrs lock") = Arc::from(found);
                Ok(n)
            }
            Err(error) => Err(ResolveError::Lookup {
                host: self.url.host.clone(),
                error,
            }),
        }
    }

    /// `host:port`, for logs and the breaker metrics.
    pub fn label(&self) -> String {
        format!("{}:{}", self.url.host, self.url.port)
    }

    pub fn addr_count(&self) -> usize {
        self.addrs.read().expect("addrs lock").len()
    }

    /// One of the resolved addresses, rotating between them.
    pub fn pick_addr(&self) -> Option<SocketAddr> {
        let addrs = self.addrs.read().expect("addrs lock").clone();
        if addrs.is_empty() {
            return None;
        }
        Some(addrs[self.next_addr.fetch_add(1, Ordering::Relaxed) % addrs.len()])
    }

    /// The peer for one attempt. `None` when the host has no address yet.
    pub fn peer(&self, timeouts: &Timeouts) -> Option<HttpPeer> {
        let addr = self.pick_addr()?;
        let mut peer = HttpPeer::new(addr, self.url.tls, self.url.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(timeouts.connect);
        o.total_connection_timeout = Some(timeouts.connect);
        // Pingora applies one read timeout to every read, so it cannot tell the first
        // byte from a gap; the stall guard (src/stall.rs) enforces each. This is only a
        // backstop behind it.
        o.read_timeout = Some(timeouts.first_byte.max(timeouts.idle) + READ_TIMEOUT_MARGIN);
        o.write_timeout = Some(timeouts.idle);
        o.idle_timeout = Some(POOL_IDLE);
        o.alpn = ALPN::H1;
        o.ca = self.ca.clone();
        // Pingora's connection pool key leaves the per-peer CA out: without this, a
        // connection verified against one route's private CA could be reused by a route
        // that trusts only the system roots.
        peer.group_key = self.trust_group;
        Some(peer)
    }
}

/// Why an upstream host has no new addresses.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0} resolved to no address")]
    NoAddress(String),
    #[error("cannot resolve {host}: {error}")]
    Lookup { host: String, error: std::io::Error },
}

/// Why a route's CA file cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: {error}", path.display())]
    Read {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{}: bad PEM", .0.display())]
    BadPem(std::path::PathBuf),
    #[error("{}: no certificate", .0.display())]
    NoCertificate(std::path::PathBuf),
    #[error("{}: a certificate does not parse", .0.display())]
    Unparsable(std::path::PathBuf),
}

/// Reads PEM certificates into DER blobs.
pub fn parse_ca_pem(pem: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        out.push(cert.ok()?.as_ref().to_vec());
    }
    Some(out)
}

/// Loads a route's CA file into the form Pingora's rustls connector takes per peer,
/// with a non-zero key that tells its trust configuration apart in the connection pool.
pub fn load_ca(path: &std::path::Path) -> Result<(Arc<[WrappedX509]>, u64), CaError> {
    let pem = std::fs::read(path).map_err(|error| CaError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let ders = parse_ca_pem(&pem).ok_or_else(|| CaError::BadPem(path.to_path_buf()))?;
    if ders.is_empty() {
        return Err(CaError::NoCertificate(path.to_path_buf()));
    }
    for der in &ders {
        // parse_x509 panics on a malformed certificate; check first.
        if x509_parser_ok(der).is_err() {
            return Err(CaError::Unparsable(path.to_path_buf()));
        }
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&ders, &mut hasher);
    let group = std::hash::Hasher::finish(&hasher) | 1;
    let certs = ders
        .into_iter()
        .map(|der| WrappedX509::new(der, parse_x509))
        .collect::<Vec<_>>()
        .into();
    Ok((certs, group))
}

fn x509_parser_ok(der: &[u8]) -> Result<(), ()> {
    // A DER certificate is a SEQUENCE; rustls' webpki parses it at handshake time. This
    // cheap check only protects parse_x509 from obviously broken input.
    if der.len() > 16 && der[0] == 0x30 {
        Ok(())
    } else {
        Err(())
    }
}

/// Background service: resolves every named upstream host every [`RESOLVE_INTERVAL`].
pub struct Resolver {
    pub upstreams: Vec<Arc<Upstream>>,
}

impl Resolver {
    /// Resolves all named hosts once, waiting at most `wait`: a slow resolver does not
    /// hold the relay's start; names still unresolved then fill in as their answers come.
    /// Returns the failures seen, or `Err` with the names not answered in time.
    pub fn resolve_at_start(&self, wait: Duration) -> Result<Vec<String>, Vec<String>> {
        let this = Resolver {
            upstreams: self.upstreams.clone(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(this.resolve_all());
        });
        rx.recv_timeout(wait).map_err(|_| {
            self.upstreams
                .iter()
                .filter(|u| u.addr_count() == 0)
                .map(|u| u.url.host.clone())
                .collect()
        })
    }

    /// Resolves all named hosts once; returns the failures to report.
    pub fn resolve_all(&self) -> Vec<String> {
        self.upstreams
            .iter()
            .filter(|u| !u.is_literal())
            .filter_map(|u| u.resolve_now().err().map(|e| e.to_string()))
            .collect()
    }
}

#[async_trait]
impl BackgroundService for Resolver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if self.upstreams.iter().all(|u| u.is_literal()) {
            return;
        }
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(RESOLVE_INTERVAL) => {}
            }
            let this = self.upstreams.clone();
            let failures =
                tokio::task::spawn_blocking(move || Resolver { upstreams: this }.resolve_all())
                    .await
                    .unwrap_or_default();
            match (failures.is_empty(), failing) {
                (false, false) => warn!("upstream resolution failing: {}", failures.join("; ")),
                (true, true) => info!("upstream resolution recovered"),
                _ => {}
            }
            failing = !failures.is_empty();
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix with no trailing slash ("" for none).
    pub base_path: String,
    /// [`UpstreamUrl::host_header`], made once.
    host_value: http::HeaderValue,
}

impl UpstreamUrl {
    /// The `Host` header value, made when the URL was parsed (it goes with every
    /// request).
    pub fn host_value(&self) -> &http::HeaderValue {
        &self.host_value
    }

    /// The `Host` header value: the port is left out when it is the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Why an upstream URL does not parse; each names the URL as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamUrlError {
    #[error("`{0}` must start with http:// or https://")]
    Scheme(String),
    #[error("`{0}`: query, fragment and credentials are not allowed")]
    Extras(String),
    #[error("`{0}`: unclosed `[`")]
    UnclosedBracket(String),
    #[error("`{0}`: bad port")]
    Port(String),
    #[error("`{0}`: bad authority")]
    Authority(String),
    #[error("`{0}`: needs a host and a port above 0")]
    NoHostOrPort(String),
}

/// Parses `http(s)://host[:port][/path]`.
pub fn parse_upstream_url(url: &str) -> Result<UpstreamUrl, UpstreamUrlError> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(UpstreamUrlError::Scheme(url.to_string()));
    };
    if rest.contains(['?', '#', '@']) {
        return Err(UpstreamUrlError::Extras(url.to_string()));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let default_port = if tls { 443 } else { 80 };
    let bad_port = |_| UpstreamUrlError::Port(url.to_string());
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| UpstreamUrlError::UnclosedBracket(url.to_string()))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(bad_port)?,
            None if after.is_empty() => default_port,
            None => return Err(UpstreamUrlError::Authority(url.to_string())),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse::<u16>().map_err(bad_port)?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() || port == 0 {
        return Err(UpstreamUrlError::NoHostOrPort(url.to_string()));
    }
    let mut parsed = UpstreamUrl {
        tls,
        host,
        port,
        base_path: path.trim_end_matches('/').to_string(),
        host_value: http::HeaderValue::from_static(""),
    };
    parsed.host_value = http::HeaderValue::from_str(&parsed.host_header())
        .map_err(|_| UpstreamUrlError::Authority(url.to_string()))?;
    Ok(parsed)
}

/// Active health checks of a route's upstreams (`routes[].health_check`), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            first_byte: Duration::from_secs(30),
            idle: Duration::from_secs(5),
            total: Duration::from_secs(60),
            session_idle: Duration::from_secs(300),
            session_max: Duration::from_secs(3600),
        }
    }

    #[test]
    fn literal_hosts_need_no_resolution() {
        let u = Upstream::new(parse_upstream_url("http://127.0.0.1:9").unwrap(), None);
        assert!(u.is_literal());
        let p = u.peer(&timeouts()).unwrap();
        assert_eq!(
            p.options.read_timeout,
            Some(Duration::from_secs(30) + READ_TIMEOUT_MARGIN)
        );
        assert_eq!(p.options.connection_timeout, Some(Duration::from_secs(1)));
    }

    #[test]
    fn unresolved_names_give_no_peer_and_localhost_resolves() {
        let u = Upstream::new(parse_upstream_url("https://localhost:8443").unwrap(), None);
        assert!(u.peer(&timeouts()).is_none());
        u.resolve_now().unwrap();
        let p = u.peer(&timeouts()).unwrap();
        assert_eq!(p.sni, "localhost");
        assert!(p.is_tls());
    }

    #[test]
    fn pem_parsing() {
        assert_eq!(parse_ca_pem(b"no pem here").unwrap().len(), 0);
    }
}
