//! Tenant isolation (`request_filter`, `upstream_request_filter`, `response_filter`): what
//! a relay key opens of the operator's provider account. Pure functions.
//!
//! The provider key behind a route can do far more than one tenant should (list and
//! delete stored data, start batch jobs, choose a billed organisation). So before
//! anything goes upstream:
//! - the path is checked: no dot segments, no encoded separators, no empty segments, no
//!   control characters ([`check_path`]); what is checked is what is routed and sent;
//! - a route serves a list of endpoints, each a method and a path pattern
//!   ([`Endpoints`]); by default the provider's inference endpoints and nothing else;
//! - protocol switches (`Upgrade`) are refused, except a WebSocket on an endpoint
//!   listed as `WEBSOCKET` (OpenAI's `realtime` by default), which is metered;
//! - request and response headers pass by policy ([`scrub_request`], [`scrub_response`]).

use http::Method;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::provider::ProviderKind;

/// Why a path is refused; the message a client reads.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("the path must start with `/`");
    };
    if rest.is_empty() {
        return Ok(());
    }
    for segment in rest.split('/') {
        check_segment(segment.as_bytes())?;
    }
    Ok(())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn check_segment(seg: &[u8]) -> Result<(), &'static str> {
    if seg.is_empty() {
        return Err("the path has an empty segment (`//` or a trailing `/`)");
    }
    // The segment decoded once; `;` starts parameters some servers strip (`..;x`).
    let mut dots = 0usize;
    let mut other = false;
    let mut in_params = false;
    let mut i = 0;
    while i < seg.len() {
        let mut b = seg[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                seg.get(i + 1).copied().and_then(hex),
                seg.get(i + 2).copied().and_then(hex),
            ) else {
                return Err("the path has a malformed percent-encoding");
            };
            b = h << 4 | l;
            match b {
                b'/' | b'\\' => return Err("the path has an encoded `/` or `\\`"),
                // `%25` decodes to `%`: a second decoding elsewhere could make `%2e%2e`.
                b'%' => return Err("the path has an encoded `%`"),
                _ => {}
            }
            i += 2;
        }
        if b < 0x20 || b == 0x7f {
            return Err("the path has a control character");
        }
        if b == b'\\' {
            return Err("the path has a `\\`");
        }
        if b == b';' {
            in_params = true;
        }
        if !in_params {
            if b == b'.' {
                dots += 1;
            } else {
                other = true;
            }
        }
        i += 1;
    }
    if !other && (dots == 1 || dots == 2) {
        return Err("the path has a `.` or `..` segment");
    }
    Ok(())
}

/// One endpoint a route serves: a method and a path pattern. A pattern without a leading
/// `/` matches the last segments of the path the provider sees (`chat/completions` serves
/// `/v1/chat/completions` and Azure's `/openai/deployments/NAME/chat/completions`); with a
/// leading `/` it must match that whole path. `*` matches any one segment. The method
/// `WEBSOCKET` serves a `GET` with `Upgrade: websocket` (a session) and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub method: Method,
    /// The endpoint is a WebSocket's: only an upgrade is served.
    pub websocket: bool,
    anchored: bool,
    segments: Vec<String>,
}

/// Why an endpoint (`routes[].endpoints[]`) does not parse; each names it as written.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("`{0}`: expected `METHOD path`, e.g. `POST chat/completions`")]
    Shape(String),
    #[error("`{text}`: unknown method `{method}`")]
    UnknownMethod { text: String, method: String },
    /// Not reached for the methods listed, kept so that no parse can panic.
    #[error("{0}")]
    InvalidMethod(#[from] http::method::InvalidMethod),
    #[error("`{0}`: the path pattern is empty")]
    EmptyPattern(String),
    #[error("`{text}`: `{segment}` is not a plain path segment")]
    Segment { text: String, segment: String },
}

impl Endpoint {
    /// Parses `METHOD pattern`, e.g. `POST chat/completions` or `GET /v1/models/*`.
    pub fn parse(text: &str) -> Result<Endpoint, EndpointError> {
        let (method, pattern) = text
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| EndpointError::Shape(text.to_string()))?;
        let websocket = method == "WEBSOCKET";
        let method = match method {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => {
                Method::from_bytes(method.as_bytes())?
            }
            "WEBSOCKET" => Method::GET,
            other => {
                return Err(EndpointError::UnknownMethod {
                    text: text.to_string(),
                    method: other.to_string(),
                })
            }
        };
        let pattern = pattern.trim();
        let anchored = pattern.starts_with('/');
        let body = pattern.trim_start_matches('/');
        if body.is_empty() {
            return Err(EndpointError::EmptyPattern(text.to_string()));
        }
        let segments: Vec<String> = body.split('/').map(str::to_string).collect();
        for s in &segments {
            if s != "*" && check_segment(s.as_bytes()).is_err() {
                return Err(EndpointError::Segment {
                    text: text.to_string(),
                    segment: s.clone(),
                });
            }
        }
        Ok(Endpoint {
            method,
            websocket,
            anchored,
            segments,
        })
    }

    pub fn is_anchored(&self) -> bool {
        self.anchored
    }

    /// Compares segments from the end of `path`, without splitting it into a list.
    fn matches(&self, path: &str) -> bool {
        let mut parts = path.trim_start_matches('/').rsplit('/');
        let tail_matches = self
            .segments
            .iter()
            .rev()
            .all(|p| parts.next().is_some_and(|s| p == "*" || p == s));
        tail_matches && (!self.anchored || parts.next().is_none())
    }
}

/// The provider's inference endpoints: what a route serves unless it lists its own.
pub fn default_endpoints(provider: ProviderKind) -> &'static [&'static str] {
    match provider {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => &[
            "POST chat/completions",
            "POST responses",
            "POST embeddings",
            "POST audio/speech",
            "POST audio/transcriptions",
            "WEBSOCKET realtime",
            "GET models",
            "GET models/*",
        ],
        ProviderKind::Anthropic => &[
            "POST messages",
            "POST messages/count_tokens",
            "GET models",
            "GET models/*",
        ],
        ProviderKind::Audio => &[
            "POST audio/speech",
            "POST audio/transcriptions",
            "GET models",
            "GET models/*",
        ],
    }
}

/// What a route says of a method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    Yes,
    /// The path is served, with other methods.
    WrongMethod,
    No,
}

/// The endpoints one route serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints(pub Vec<Endpoint>);

impl Endpoints {
    pub fn defaults(provider: ProviderKind) -> Endpoints {
        Endpoints(
            default_endpoints(provider)
                .iter()
                .map(|e| Endpoint::parse(e).expect("default endpoints parse"))
                .collect(),
        )
    }

    /// Checks `method` on `path`, the path the provider would see; `websocket`: the
    /// request asks for a WebSocket session.
    pub fn check(&self, method: &Method, path: &str, websocket: bool) -> Allowed {
        let mut path_served = false;
        for e in &self.0 {
            if e.matches(path) {
                if e.method == *method && e.websocket == websocket {
                    return Allowed::Yes;
                }
                path_served = true;
            }
        }
        if path_served {
            Allowed::WrongMethod
        } else {
            Allowed::No
        }
    }

    /// `Allow` header value for a path served with other methods.
    pub fn methods_for(&self, path: &str) -> String {
        let mut out: Vec<&str> = Vec::new();
        for e in &self.0 {
            if e.matches(path) && !out.contains(&e.method.as_str()) {
                out.push(e.method.as_str());
            }
        }
        out.join(", ")
    }
}

/// Whether a request asks to switch protocols (`Upgrade`, or `Connection: upgrade`).
pub fn is_upgrade(req: &RequestHeader) -> bool {
    req.headers.contains_key(http::header::UPGRADE)
        || req
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .any(|v| {
                v.as_bytes()
                    .split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
            })
}

/// A client's offer to switch to cleartext HTTP/2 (`Upgrade: h2c`, sent by `curl
/// --http2` on http:// URLs) may be ignored (RFC 9113 3.1 leaves it to the server): it is
/// removed, and the request is served over HTTP/1.1 as if it had not offered.
pub fn drop_h2c_offer(req: &mut RequestHeader) {
    let h2c = req
        .headers
        .get(http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"h2c"));
    if !h2c {
        return;
    }
    req.remove_header(&http::header::UPGRADE);
    req.remove_header("http2-settings");
    let _ = keep_list_items(req, http::header::CONNECTION, |t| {
        !t.eq_ignore_ascii_case("upgrade") && !t.eq_ignore_ascii_case("http2-settings")
    });
}

/// Rewrites the comma-separated list header `name` (all its lines) to the items `keep`
/// takes, in their order; removes the header when none is left.
pub fn keep_list_items(
    req: &mut RequestHeader,
    name: http::HeaderName,
    keep: impl Fn(&str) -> bool,
) -> pingora_core::Result<()> {
    let kept: Vec<String> = req
        .headers
        .get_all(&name)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or_default().split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && keep(t))
        .map(str::to_string)
        .collect();
    req.remove_header(&name);
    if !kept.is_empty() {
        req.insert_header(name, kept.join(", "))?;
    }
    Ok(())
}

/// A route's policy, from its configuration.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    pub endpoints: Endpoints,
    pub store: Store,
    /// Set on every upstream request (after the tenant's own values are removed).
    pub upstream_headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// Headers the relay writes itself, which a route may not set in `upstream_headers`.
pub fn relay_owned_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "upgrade"
            | "authorization"
            | "x-api-key"
            | "api-key"
            | "x-request-id"
    )
}

/// What a route does with a request that asks the provider to store it (`store: true`
/// on chat completions; Responses store by default), where anyone holding the provider
/// key could read it later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Store {
    /// Sent as the client wrote it.
    #[default]
    Pass,
    /// Sent with `"store": false`.
    ForceOff,
}

/// Whether a request is one `store` applies to: a POST to chat completions or responses.
pub fn stores(method: &Method, path: &str) -> bool {
    *method == Method::POST && (path.ends_with("/chat/completions") || path.ends_with("/responses"))
}

/// Request headers that never go upstream: the tenant's own cookies, the client's address
/// as other proxies write it (and every `x-forwarded-*`), the provider account selectors
/// (a route sets those itself, in `upstream_headers`), and method overrides, which some
/// servers obey in place of the method the endpoint list allowed; and the relay's own
/// cache control (`x-relay-cache`).
const REQUEST_DROP: [&str; 11] = [
    "x-relay-cache",
    "cookie",
    "forwarded",
    "x-real-ip",
    "proxy-authorization",
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The names in `headers` that `drop` picks, each once. One pass over the headers a
/// message has is cheaper than a lookup per name that might be there (each parses and
/// hashes the name), and most of the dropped names never are.
fn names_where(headers: &http::HeaderMap, drop: impl Fn(&str) -> bool) -> Vec<http::HeaderName> {
    headers
        .keys()
        .filter(|k| drop(k.as_str()))
        .cloned()
        .collect()
}

/// Removes what a tenant may not send upstream (see [`REQUEST_DROP`]; every
/// `x-forwarded-*` header included) and the headers named in `also`, then sets the
/// route's own headers.
pub fn scrub_request(
    req: &mut RequestHeader,
    route_headers: &[(http::HeaderName, http::HeaderValue)],
    also: &[&str],
) -> pingora_core::Result<()> {
    let dropped = names_where(&req.headers, |n| {
        REQUEST_DROP.contains(&n) || also.contains(&n) || n.starts_with("x-forwarded-")
    });
    for h in dropped {
        req.remove_header(&h);
    }
    for (name, value) in route_headers {
        req.insert_header(name.clone(), value.clone())?;
    }
    Ok(())
}

/// Response headers that never reach a tenant: the provider's cookies and server name,
/// and which of the operator's accounts answered.
const RESPONSE_DROP: [&str; 5] = [
    "set-cookie",
    "server",
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
];

/// The provider's rate-limit headers, dropped where the relay sends its own: one value
/// per header, and the tenant's budget is the relay's, not the operator's account.
pub fn is_provider_rate_limit_header(name: &str) -> bool {
    name.starts_with("x-ratelimit-") || name.starts_with("anthropic-ratelimit-")
}

/// Removes what a tenant may not see; `own_limits`: the relay sends its own
/// `x-ratelimit-*` headers, so the provider's go.
pub fn scrub_response(resp: &mut ResponseHeader, own_limits: bool) {
    let dropped = names_where(&resp.headers, |n| {
        RESPONSE_DROP.contains(&n) || (own_limits && is_provider_rate_limit_header(n))
    });
    for h in dropped {
        resp.remove_header(&h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_dot_segments_encoded_separators_or_control_bytes_are_refused() {
        for bad in [
            "/v1/chat/../admin/keys",
            "/v1/./chat",
            "/v1/%2e%2e/admin",
            "/v1/.%2e/admin",
            "/v1/%2E/x",
            "/v1//chat",
            "/v1/chat/",
            "/v1/a%2fb",
            "/v1/a%5Cb",
            "/v1/a\\b",
            "/v1/a%00b",
            "/v1/a%0ab",
            "/v1/a%7f",
            "/v1/%252e%252e/x",
            "/v1/..;x/admin",
            "/v1/a%zz",
            "/v1/a%2",
            "v1/x",
        ] {
            assert!(check_path(bad).is_err(), "{bad} passed");
        }
        for good in [
            "/",
            "/v1/chat/completions",
            "/openai/deployments/gpt-4o.mini/chat/completions",
            "/v1/models/ft:gpt-4o:org:x",
            "/v1/...",
            "/v1/a%20b",
            "/v1/.well-known",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn endpoints_match_by_suffix_or_whole_path() {
        let e = Endpoints::defaults(ProviderKind::Openai);
        assert_eq!(
            e.check(&Method::POST, "/v1/chat/completions", false),
            Allowed::Yes
        );
        assert_eq!(
            e.check(
                &Method::POST,
                "/openai/deployments/d/chat/completions",
                false
            ),
            Allowed::Yes
        );
        assert_eq!(
            e.check(&Method::GET, "/v1/chat/completions", false),
            Allowed::WrongMethod
        );
        assert_eq!(
            e.check(&Method::DELETE, "/v1/chat/completions/abc", false),
            Allowed::No
        );
        assert_eq!(e.check(&Method::POST, "/v1/files", false), Allowed::No);
        assert_eq!(e.check(&Method::GET, "/v1/models", false), Allowed::Yes);
        assert_eq!(
            e.check(&Method::GET, "/v1/models/gpt-4o", false),
            Allowed::Yes
        );
        assert_eq!(
            e.check(&Method::DELETE, "/v1/models/ft-x", false),
            Allowed::WrongMethod
        );
        assert_eq!(e.methods_for("/v1/chat/completions"), "POST");
        let anchored = Endpoints(vec![Endpoint::parse("GET /v1/files/*").unwrap()]);
        assert_eq!(
            anchored.check(&Method::GET, "/v1/files/f1", false),
            Allowed::Yes
        );
        assert_eq!(
            anchored.check(&Method::GET, "/x/v1/files/f1", false),
            Allowed::No
        );
        assert_eq!(
            anchored.check(&Method::GET, "/v1/files", false),
            Allowed::No
        );
        let a = Endpoints::defaults(ProviderKind::Anthropic);
        assert_eq!(a.check(&Method::POST, "/v1/messages", false), Allowed::Yes);
        assert_eq!(
            a.check(&Method::POST, "/v1/messages/batches", false),
            Allowed::No
        );
        // A WebSocket endpoint serves sessions only, and a session nothing else.
        assert_eq!(e.check(&Method::GET, "/v1/realtime", true), Allowed::Yes);
        assert_eq!(
            e.check(&Method::GET, "/v1/realtime", false),
            Allowed::WrongMethod
        );
        assert_eq!(
            e.check(&Method::GET, "/v1/models", true),
            Allowed::WrongMethod
        );
        assert_eq!(a.check(&Method::GET, "/v1/realtime", true), Allowed::No);
    }

    #[test]
    fn endpoint_patterns_are_checked() {
        assert!(Endpoint::parse("POST").is_err());
        assert!(Endpoint::parse("FETCH x").is_err());
        assert!(Endpoint::parse("GET /").is_err());
        assert!(Endpoint::parse("GET a/../b").is_err());
        assert!(Endpoint::parse("GET a//b").is_err());
        assert!(Endpoint::parse("GET */x").is_ok());
    }

    #[test]
    fn headers_are_scrubbed_both_ways() {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for h in [
            "cookie",
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-real-ip",
            "openai-organization",
            "openai-project",
        ] {
            req.insert_header(h, "tenant").unwrap();
        }
        req.insert_header("x-http-method-override", "DELETE")
            .unwrap();
        req.insert_header("openai-beta", "assistants=v2").unwrap();
        let route = [(
            http::HeaderName::from_static("openai-organization"),
            http::HeaderValue::from_static("org-route"),
        )];
        req.insert_header("authorization", "Bearer tenant").unwrap();
        scrub_request(&mut req, &route, &["authorization"]).unwrap();
        let names: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(req.headers["openai-organization"], "org-route");
        assert_eq!(req.headers["openai-beta"], "assistants=v2");

        let mut resp = ResponseHeader::build(200, None).unwrap();
        for h in [
            "set-cookie",
            "server",
            "openai-organization",
            "x-ratelimit-limit-requests",
            "anthropic-ratelimit-tokens-limit",
        ] {
            resp.insert_header(h, "provider").unwrap();
        }
        resp.insert_header("content-type", "text/event-stream")
            .unwrap();
        let mut kept = resp.clone();
        scrub_response(&mut kept, false);
        assert!(kept.headers.get("x-ratelimit-limit-requests").is_some());
        assert!(kept.headers.get("set-cookie").is_none());
        scrub_response(&mut resp, true);
        let names: Vec<&str> = resp.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }
}
