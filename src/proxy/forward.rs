//! Forwarding stage (`upstream_request_filter`): the request head the provider gets.
//! The tenant's credentials go out (also from a WebSocket's subprotocols), the provider
//! key comes in, and the path, Host and request id are the upstream's.

use pingora_core::{Error, ErrorType, Result};
use pingora_http::RequestHeader;

use crate::request_id;
use crate::route::{Route, RouteKey};
use crate::upstream::UpstreamUrl;

/// Headers removed before forwarding besides the policy's: those that may carry the
/// tenant's relay key, and `accept-encoding` (compressed event streams cannot be read as
/// they pass, and gain little).
const NOT_FORWARDED: [&str; 4] = ["authorization", "x-api-key", "api-key", "accept-encoding"];

/// Rewrites the upstream request: drops tenant credentials and `accept-encoding`, injects
/// the provider key, sets the path, Host and request id. Pure.
pub fn prepare_upstream_request(
    req: &mut RequestHeader,
    route: &Route,
    upstream: &UpstreamUrl,
    key: Option<usize>,
    request_id: &str,
) -> Result<()> {
    crate::policy::scrub_request(req, &route.policy.upstream_headers, &NOT_FORWARDED)?;
    if crate::websocket::is_websocket(req) {
        // The tenant's key out of the subprotocols; no compression of frames.
        crate::websocket::scrub_handshake(req)?;
    }
    if let (RouteKey::Pool { header, .. }, Some(slot)) = (&route.key, route.key_slot(key)) {
        req.insert_header(header.clone(), slot.value.expose())?;
    }
    let target = route.upstream_target(upstream, path_and_query(req));
    let uri = target
        .parse::<http::Uri>()
        .map_err(|e| Error::because(ErrorType::InternalError, "upstream uri", e))?;
    req.set_uri(uri);
    req.insert_header(http::header::HOST, upstream.host_value().clone())?;
    req.insert_header(request_id::HEADER, request_id)?;
    Ok(())
}

fn path_and_query(req: &RequestHeader) -> &str {
    req.uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::route::RouteTable;
    use std::path::Path;

    fn req(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    const YAML: &str = r#"
listen: { proxy: "127.0.0.1:1" }
routes:
  - { name: an, prefix: /anthropic, provider: anthropic, upstreams: ["https://api.anthropic.com"], key: "env:AN" }
"#;

    #[test]
    fn upstream_request_swaps_keys() {
        let c = Config::from_yaml(YAML, Path::new("."), &|_| Some("sk-an".into())).unwrap();
        let routes = RouteTable::new(&c.routes).unwrap();
        let route = routes.find("/anthropic/v1/messages").unwrap();
        let mut r = req(
            "/anthropic/v1/messages?beta=true",
            &[
                ("authorization", "Bearer foo"),
                ("x-api-key", "foo"),
                ("accept-encoding", "gzip"),
                ("anthropic-version", "2023-06-01"),
            ],
        );
        prepare_upstream_request(&mut r, route, &route.upstreams[0].url, Some(0), "rid-1").unwrap();
        assert_eq!(r.uri.to_string(), "/v1/messages?beta=true");
        assert_eq!(r.headers["x-api-key"], "sk-an");
        assert!(r.headers.get("authorization").is_none());
        assert!(r.headers.get("accept-encoding").is_none());
        assert_eq!(r.headers["host"], "api.anthropic.com");
        assert_eq!(r.headers["x-request-id"], "rid-1");
        assert_eq!(r.headers["anthropic-version"], "2023-06-01");
    }
}
