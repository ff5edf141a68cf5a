//! Refusal and failure stage (`request_filter`, `fail_to_proxy`): every answer the relay
//! writes itself, with its status, the provider's own error JSON shape (so SDKs raise
//! their usual exceptions) and a bounded label for logs and metrics.

use bytes::Bytes;
use serde_json::json;

use crate::provider::ProviderKind;

/// Which provider's error JSON to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// `{"error":{"message","type","param","code"}}`
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`
    Anthropic,
}

impl ErrorShape {
    pub fn for_provider(kind: ProviderKind) -> ErrorShape {
        match kind {
            ProviderKind::Anthropic => ErrorShape::Anthropic,
            _ => ErrorShape::OpenAi,
        }
    }

    /// With no route to go by, an `anthropic-version` header (always sent by the
    /// Anthropic SDK) picks the Anthropic shape.
    pub fn guess(has_anthropic_version: bool) -> ErrorShape {
        if has_anthropic_version {
            ErrorShape::Anthropic
        } else {
            ErrorShape::OpenAi
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayError {
    BadRequest,
    /// A method no provider API uses.
    MethodNotAllowed,
    /// The request line and headers are over `listen.max_header_bytes`.
    HeadersTooLarge,
    /// The body is over the route's `max_body_bytes`.
    BodyTooLarge {
        max: usize,
    },
    /// The body must be JSON and is not (invalid UTF-8 included).
    InvalidJson,
    /// The body did not arrive within `listen.body_read_timeout`.
    BodyTimeout,
    /// The request line and headers did not arrive whole within `listen.head_timeout`.
    HeadTimeout,
    NoRoute,
    /// The path has dot segments, encoded separators, empty segments or control
    /// characters (see `policy::check_path`).
    BadPath(&'static str),
    /// The route does not serve this path.
    EndpointNotServed {
        method: String,
        path: String,
    },
    /// The route serves this path with other methods (`allow` lists them).
    EndpointMethod {
        allow: String,
    },
    /// A protocol switch (`Upgrade`, e.g. WebSocket) on a route that does not meter one.
    UpgradeRefused,
    /// A field the relay reads from the body is there twice or has the wrong type.
    BodyField(String),
    /// `content-length` is there twice, or cannot be read.
    BadContentLength,
    MissingKey,
    InvalidKey,
    RouteForbidden {
        route: String,
    },
    /// A tenant limit refused the request; `tokens` tells a token limit from a request
    /// or concurrency limit.
    RateLimited {
        limit: &'static str,
        tokens: bool,
    },
    /// The request's token estimate alone is over the key's `tokens_per_minute`, so no
    /// wait would admit it: a bad request, never a retryable 429.
    TokensExceedLimit {
        estimate: u64,
        limit: u64,
    },
    ProviderKeyMissing {
        route: String,
    },
    /// Redis could not be asked and the policy is to refuse.
    LimiterUnavailable,
    /// A spend budget of the key (its own, or its group's) has nothing left for this
    /// request's worst-case cost until its window resets.
    BudgetExceeded,
    /// The key has a budget, and the request's model has no price (or could not be read
    /// before forwarding), so its cost cannot be held to the budget.
    BudgetUnpriced {
        model: Option<String>,
    },
    UpstreamUnavailable,
    UpstreamTimeout,
    /// A route deadline (first byte, gap between chunks, total) passed.
    Stalled(crate::stall::Deadline),
    Internal,
}

impl RelayError {
    pub fn status(&self) -> u16 {
        match self {
            RelayError::BadRequest
            | RelayError::InvalidJson
            | RelayError::TokensExceedLimit { .. } => 400,
            RelayError::MethodNotAllowed => 405,
            RelayError::BodyTimeout | RelayError::HeadTimeout => 408,
            RelayError::BodyTooLarge { .. } => 413,
            RelayError::HeadersTooLarge => 431,
            RelayError::NoRoute | RelayError::EndpointNotServed { .. } => 404,
            RelayError::EndpointMethod { .. } => 405,
            RelayError::BadPath(_)
            | RelayError::UpgradeRefused
            | RelayError::BodyField(_)
            | RelayError::BadContentLength => 400,
            RelayError::MissingKey | RelayError::InvalidKey => 401,
            RelayError::RouteForbidden { .. } => 403,
            RelayError::RateLimited { .. } | RelayError::BudgetExceeded => 429,
            RelayError::BudgetUnpriced { .. } => 400,
            RelayError::Stalled(crate::stall::Deadline::Budget) => 429,
            RelayError::ProviderKeyMissing { .. } | RelayError::LimiterUnavailable => 503,
            RelayError::UpstreamUnavailable => 502,
            RelayError::UpstreamTimeout | RelayError::Stalled(_) => 504,
            RelayError::Internal => 500,
        }
    }

    /// Bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RelayError::BadRequest => "bad_request",
            RelayError::MethodNotAllowed => "method_not_allowed",
            RelayError::HeadersTooLarge => "headers_too_large",
            RelayError::BodyTooLarge { .. } => "body_too_large",
            RelayError::InvalidJson => "invalid_json",
            RelayError::BodyTimeout => "body_timeout",
            RelayError::HeadTimeout => "head_timeout",
            RelayError::NoRoute => "no_route",
            RelayError::BadPath(_) => "bad_path",
            RelayError::EndpointNotServed { .. } => "endpoint_not_served",
            RelayError::EndpointMethod { .. } => "endpoint_method_not_allowed",
            RelayError::UpgradeRefused => "upgrade_refused",
            RelayError::BodyField(_) => "invalid_body",
            RelayError::BadContentLength => "bad_content_length",
            RelayError::MissingKey => "missing_key",
            RelayError::InvalidKey => "invalid_key",
            RelayError::RouteForbidden { .. } => "route_forbidden",
            RelayError::RateLimited { .. } => "rate_limited",
            RelayError::TokensExceedLimit { .. } => "tokens_exceed_limit",
            RelayError::ProviderKeyMissing { .. } => "provider_key_missing",
            RelayError::LimiterUnavailable => "limiter_unavailable",
            RelayError::BudgetExceeded => "budget_exceeded",
            RelayError::BudgetUnpriced { .. } => "budget_unpriced_model",
            RelayError::UpstreamUnavailable => "upstream_unavailable",
            RelayError::UpstreamTimeout => "upstream_timeout",
            RelayError::Stalled(d) => d.outcome(),
            RelayError::Internal => "internal",
        }
    }

    /// The message a client reads. It never names a tenant, a key or an upstream host.
    pub fn message(&self) -> String {
        match self {
            RelayError::BadRequest => "The request could not be read.".into(),
            RelayError::MethodNotAllowed => "This HTTP method is not supported.".into(),
            RelayError::HeadersTooLarge => "The request headers are too large.".into(),
            RelayError::BodyTooLarge { max } => {
                format!("The request body is too large: at most {max} bytes are accepted.")
            }
            RelayError::InvalidJson => {
                "The request body is not valid JSON (it must be UTF-8 encoded JSON).".into()
            }
            RelayError::BodyTimeout => "The request body did not arrive in time.".into(),
            RelayError::HeadTimeout => "The request headers did not arrive in time.".into(),
            RelayError::NoRoute => "No route serves this path on the relay.".into(),
            RelayError::BadPath(why) => format!("The request path is refused: {why}."),
            RelayError::EndpointNotServed { method, path } => {
                format!("This relay route does not serve {method} {path}.")
            }
            RelayError::EndpointMethod { allow } => {
                format!("This HTTP method is not served on this path; allowed: {allow}.")
            }
            RelayError::UpgradeRefused => {
                "Protocol upgrades (such as WebSocket) are not served on this route.".into()
            }
            RelayError::BodyField(why) => format!("The request body is refused: {why}."),
            RelayError::BadContentLength => {
                "The request has more than one Content-Length, or one that cannot be read.".into()
            }
            RelayError::MissingKey => {
                "No API key was provided: send it as `Authorization: Bearer KEY` or `x-api-key: KEY`.".into()
            }
            RelayError::InvalidKey => "Incorrect API key provided.".into(),
            RelayError::RouteForbidden { route } => {
                format!("This API key may not use the route `{route}`.")
            }
            RelayError::RateLimited { limit, .. } => format!(
                "Rate limit reached for this API key ({limit}); retry after the time in the Retry-After header."
            ),
            RelayError::TokensExceedLimit { estimate, limit } => format!(
                "This request's estimated tokens ({estimate}) exceed this API key's tokens_per_minute limit ({limit}), so it can never be admitted: lower max_tokens (the estimate is max_tokens, or the relay's default, plus a quarter of the request body's bytes)."
            ),
            RelayError::ProviderKeyMissing { route } => format!(
                "The route `{route}` is not available: the relay has no provider key configured for it."
            ),
            RelayError::LimiterUnavailable => {
                "The relay cannot check this key's limits right now; retry shortly.".into()
            }
            RelayError::BudgetExceeded => {
                "This API key's spend budget has no room for this request until it resets (see the x-budget-reset header).".into()
            }
            RelayError::BudgetUnpriced { model: Some(m) } => format!(
                "This API key has a spend budget, and the model `{m}` has no price on the relay, so its cost cannot be counted."
            ),
            RelayError::BudgetUnpriced { model: None } => {
                "This API key has a spend budget, and the relay could not read the request's model before forwarding it (a body without a length, or too large), so its cost cannot be counted.".into()
            }
            RelayError::UpstreamUnavailable => {
                "The upstream provider could not be reached.".into()
            }
            RelayError::UpstreamTimeout => "The upstream provider did not answer in time.".into(),
            RelayError::Stalled(crate::stall::Deadline::FirstByte) => {
                "The upstream provider did not start answering within the route's first-byte deadline.".into()
            }
            RelayError::Stalled(crate::stall::Deadline::Gap) => {
                "The upstream provider's stream stalled: no data within the route's gap deadline.".into()
            }
            RelayError::Stalled(crate::stall::Deadline::Total) => {
                "The request exceeded the route's total deadline.".into()
            }
            RelayError::Stalled(crate::stall::Deadline::Shutdown) => {
                "The relay is shutting down.".into()
            }
            RelayError::Stalled(crate::stall::Deadline::Budget) => {
                "The stream was ended: this API key's spend budget has no room for more output until it resets.".into()
            }
            RelayError::Internal => "The relay failed to handle the request.".into(),
        }
    }

    fn openai_type_and_code(&self) -> (&'static str, &'static str) {
        match self {
            RelayError::BadRequest => ("invalid_request_error", "bad_request"),
            RelayError::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
            RelayError::HeadersTooLarge => ("invalid_request_error", "headers_too_large"),
            RelayError::BodyTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            RelayError::InvalidJson => ("invalid_request_error", "invalid_json"),
            RelayError::BodyTimeout | RelayError::HeadTimeout => {
                ("invalid_request_error", "request_timeout")
            }
            RelayError::NoRoute | RelayError::EndpointNotServed { .. } => {
                ("invalid_request_error", "unknown_url")
            }
            RelayError::BadPath(_) => ("invalid_request_error", "invalid_path"),
            RelayError::EndpointMethod { .. } => ("invalid_request_error", "method_not_allowed"),
            RelayError::UpgradeRefused => ("invalid_request_error", "upgrade_not_supported"),
            RelayError::BodyField(_) => ("invalid_request_error", "invalid_body"),
            RelayError::BadContentLength => ("invalid_request_error", "bad_content_length"),
            RelayError::MissingKey => ("invalid_request_error", "missing_api_key"),
            RelayError::InvalidKey => ("invalid_request_error", "invalid_api_key"),
            RelayError::RouteForbidden { .. } => ("permission_error", "route_not_allowed"),
            RelayError::RateLimited { tokens: true, .. } => ("tokens", "rate_limit_exceeded"),
            RelayError::RateLimited { tokens: false, .. } => ("requests", "rate_limit_exceeded"),
            RelayError::TokensExceedLimit { .. } => {
                ("invalid_request_error", "tokens_exceed_limit")
            }
            RelayError::ProviderKeyMissing { .. } => ("api_error", "provider_key_missing"),
            RelayError::LimiterUnavailable => ("api_error", "limiter_unavailable"),
            RelayError::BudgetExceeded | RelayError::Stalled(crate::stall::Deadline::Budget) => {
                ("insufficient_quota", "budget_exceeded")
            }
            RelayError::BudgetUnpriced { .. } => ("invalid_request_error", "budget_unpriced_model"),
            RelayError::UpstreamUnavailable => ("api_error", "upstream_unavailable"),
            RelayError::UpstreamTimeout => ("api_error", "upstream_timeout"),
            RelayError::Stalled(d) => ("api_error", d.outcome()),
            RelayError::Internal => ("api_error", "internal_error"),
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self {
            RelayError::BadRequest
            | RelayError::MethodNotAllowed
            | RelayError::HeadersTooLarge
            | RelayError::InvalidJson
            | RelayError::BodyTimeout
            | RelayError::HeadTimeout
            | RelayError::BadPath(_)
            | RelayError::EndpointMethod { .. }
            | RelayError::UpgradeRefused
            | RelayError::BodyField(_)
            | RelayError::BadContentLength
            | RelayError::TokensExceedLimit { .. }
            | RelayError::BudgetUnpriced { .. } => "invalid_request_error",
            RelayError::BodyTooLarge { .. } => "request_too_large",
            RelayError::NoRoute | RelayError::EndpointNotServed { .. } => "not_found_error",
            RelayError::MissingKey | RelayError::InvalidKey => "authentication_error",
            RelayError::RouteForbidden { .. } => "permission_error",
            RelayError::RateLimited { .. }
            | RelayError::BudgetExceeded
            | RelayError::Stalled(crate::stall::Deadline::Budget) => "rate_limit_error",
            RelayError::ProviderKeyMissing { .. }
            | RelayError::LimiterUnavailable
            | RelayError::UpstreamUnavailable
            | RelayError::UpstreamTimeout
            | RelayError::Stalled(_)
            | RelayError::Internal => "api_error",
        }
    }

    /// The JSON body in the given provider's shape.
    pub fn body(&self, shape: ErrorShape) -> Bytes {
        let value = match shape {
            ErrorShape::OpenAi => {
                let (kind, code) = self.openai_type_and_code();
                json!({"error": {"message": self.message(), "type": kind, "param": null, "code": code}})
            }
            ErrorShape::Anthropic => {
                json!({"type": "error", "error": {"type": self.anthropic_type(), "message": self.message()}})
            }
        };
        Bytes::from(value.to_string())
    }

    /// The error as a server-sent event that ends a stream: OpenAI's SDKs raise on a
    /// `data:` chunk holding `error`, Anthropic's on an `error` event.
    pub fn sse_event(&self, shape: ErrorShape) -> Bytes {
        let body = self.body(shape);
        let mut out = Vec::with_capacity(body.len() + 24);
        if shape == ErrorShape::Anthropic {
            out.extend_from_slice(b"event: error\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn budget_answers_in_both_shapes() {
        let v: Value =
            serde_json::from_slice(&RelayError::BudgetExceeded.body(ErrorShape::OpenAi)).unwrap();
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["code"], "budget_exceeded");
        let a: Value =
            serde_json::from_slice(&RelayError::BudgetExceeded.body(ErrorShape::Anthropic))
                .unwrap();
        assert_eq!(a["error"]["type"], "rate_limit_error");
        let cut = RelayError::Stalled(crate::stall::Deadline::Budget);
        assert_eq!(cut.kind(), "budget_exceeded");
        let event = cut.sse_event(ErrorShape::Anthropic);
        assert!(event.starts_with(b"event: error\ndata: {"));
        assert!(String::from_utf8_lossy(&event).contains("rate_limit_error"));
        assert_eq!(RelayError::BudgetUnpriced { model: None }.status(), 400);
    }

    #[test]
    fn openai_shape() {
        let b = RelayError::InvalidKey.body(ErrorShape::OpenAi);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["message"].as_str().unwrap().contains("API key"));
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn anthropic_shape() {
        let b = RelayError::RouteForbidden {
            route: "anthropic".into(),
        }
        .body(ErrorShape::Anthropic);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "permission_error");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic"));
    }

    #[test]
    fn an_estimate_over_the_limit_says_both_numbers_in_both_shapes() {
        let e = RelayError::TokensExceedLimit {
            estimate: 5013,
            limit: 1000,
        };
        let v: Value = serde_json::from_slice(&e.body(ErrorShape::OpenAi)).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "tokens_exceed_limit");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("(5013)") && m.contains("tokens_per_minute limit (1000)"),
            "{m}"
        );
        assert!(m.contains("lower max_tokens"), "{m}");
        let v: Value = serde_json::from_slice(&e.body(ErrorShape::Anthropic)).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], m);
    }

    #[test]
    fn statuses_and_labels() {
        let all = [
            RelayError::BadRequest,
            RelayError::MethodNotAllowed,
            RelayError::HeadersTooLarge,
            RelayError::BodyTooLarge { max: 1 },
            RelayError::InvalidJson,
            RelayError::BodyTimeout,
            RelayError::HeadTimeout,
            RelayError::NoRoute,
            RelayError::BadPath("x"),
            RelayError::EndpointNotServed {
                method: "GET".into(),
                path: "/x".into(),
            },
            RelayError::EndpointMethod {
                allow: "POST".into(),
            },
            RelayError::UpgradeRefused,
            RelayError::BodyField("x".into()),
            RelayError::BadContentLength,
            RelayError::MissingKey,
            RelayError::InvalidKey,
            RelayError::RouteForbidden { route: "r".into() },
            RelayError::RateLimited {
                limit: "requests_per_minute",
                tokens: false,
            },
            RelayError::TokensExceedLimit {
                estimate: 5000,
                limit: 1000,
            },
            RelayError::ProviderKeyMissing { route: "r".into() },
            RelayError::LimiterUnavailable,
            RelayError::UpstreamUnavailable,
            RelayError::UpstreamTimeout,
            RelayError::Stalled(crate::stall::Deadline::Gap),
            RelayError::Internal,
        ];
        let statuses: Vec<u16> = all.iter().map(|e| e.status()).collect();
        assert_eq!(
            statuses,
            [
                400, 405, 431, 413, 400, 408, 408, 404, 400, 404, 405, 400, 400, 400, 401, 401,
                403, 429, 400, 503, 503, 502, 504, 504, 500
            ]
        );
        let mut kinds: Vec<&str> = all.iter().map(|e| e.kind()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), all.len());
    }
}
