//! Admission stage (`request_filter`): route, authenticate and authorize the request
//! ([`admit`], pure), check its head and read a small body, then hold the tenant to its
//! limits (the pingora-limits or Redis estimate). Anything refused here is answered by
//! the relay itself.

use std::sync::Arc;

use pingora_core::Result;
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use super::body;
use super::ctx::{Admitted, RequestCtx};
use super::RelayProxy;
use crate::answer::LocalAnswer;
use crate::auth::{AuthFailure, TenantTable};
use crate::error::{ErrorShape, RelayError};
use crate::gate;
use crate::limits::{self, Limits};
use crate::request_info;
use crate::route::{Route, RouteKey, RouteTable};

/// Bodies a budgeted tenant sends (and bodies on a caching route) are read before they
/// are forwarded up to this size, so that their model and size are known (and their
/// cache key); larger ones (and bodies without a length) count as unpriced, and are not
/// cached.
const BUDGETED_READ_MAX: usize = 4 << 20;

/// The length of a body to read at admission, if it is to be read then.
fn early_read_len(req: &RequestHeader, a: &Admitted) -> Option<usize> {
    if a.budgets.is_empty() && a.route.cache.is_none() {
        request_info::early_read_len(req)
    } else {
        request_info::early_read_len_up_to(req, BUDGETED_READ_MAX.min(a.route.max_body_bytes))
    }
}

/// What [`admit`] let through.
pub struct Allowed {
    pub route: Arc<Route>,
    pub tenant: Arc<str>,
    pub limits: Limits,
    pub budgets: Arc<[Arc<crate::budget::BudgetSpec>]>,
    pub groups: Arc<[String]>,
}

/// A request the relay answers itself, with what was learned before refusing it.
pub struct Refusal {
    pub error: RelayError,
    pub shape: ErrorShape,
    pub route: Option<Arc<Route>>,
    pub tenant: Option<Arc<str>>,
}

/// Route, authenticate and authorize a request. Pure: the whole routing decision of
/// `request_filter`, tested without a runtime.
pub fn admit(
    routes: &RouteTable,
    tenants: &TenantTable,
    req: &RequestHeader,
) -> std::result::Result<Allowed, Refusal> {
    let path = req.uri.path();
    let unrouted = |error| Refusal {
        error,
        shape: ErrorShape::guess(req.headers.contains_key("anthropic-version")),
        route: None,
        tenant: None,
    };
    // What is checked here is what is routed and sent upstream.
    if let Err(why) = crate::policy::check_path(path) {
        return Err(unrouted(RelayError::BadPath(why)));
    }
    let Some(route) = routes.find(path) else {
        return Err(unrouted(RelayError::NoRoute));
    };
    let refuse = |error, tenant: Option<&Arc<str>>| Refusal {
        error,
        shape: ErrorShape::for_provider(route.provider),
        route: Some(route.clone()),
        tenant: tenant.cloned(),
    };
    let tenant = match tenants.authenticate(req) {
        Ok(t) => t,
        Err(AuthFailure::Missing) => return Err(refuse(RelayError::MissingKey, None)),
        Err(AuthFailure::Invalid) => return Err(refuse(RelayError::InvalidKey, None)),
    };
    if let Err(e) = authorize(route, req, |r| tenant.may_use(r)) {
        return Err(refuse(e, Some(&tenant.id)));
    }
    Ok(Allowed {
        route: route.clone(),
        tenant: tenant.id.clone(),
        limits: tenant.limits,
        budgets: tenant.budgets.clone(),
        groups: tenant.groups.clone(),
    })
}

/// What an authenticated tenant may not do on `route`, in the order it is checked.
fn authorize(
    route: &Route,
    req: &RequestHeader,
    may_use: impl Fn(&str) -> bool,
) -> std::result::Result<(), RelayError> {
    if !may_use(&route.name) {
        let route = route.name.clone();
        return Err(RelayError::RouteForbidden { route });
    }
    if let RouteKey::Missing { .. } = route.key {
        let route = route.name.clone();
        return Err(RelayError::ProviderKeyMissing { route });
    }
    if !gate::known_method(&req.method) {
        return Err(RelayError::MethodNotAllowed);
    }
    // A protocol switch is served only as a WebSocket, on an endpoint listed for one.
    let websocket = crate::websocket::is_websocket(req);
    if crate::policy::is_upgrade(req) && !websocket {
        return Err(RelayError::UpgradeRefused);
    }
    match route.check_endpoint(&req.method, req.uri.path(), websocket) {
        Err(_) if websocket => Err(RelayError::UpgradeRefused),
        checked => checked,
    }
}

impl RelayProxy {
    /// Writes the relay's own answer as the request's whole response; the request
    /// filter is done with it.
    pub(super) async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        a: LocalAnswer,
    ) -> Result<bool> {
        let written = a.write(session, ctx.shape, ctx.answer_id()).await;
        ctx.refusal = Some(a.error);
        written.map(|()| true)
    }

    /// The checks an admitted request passes before an upstream is chosen: its head and
    /// announced length, its body when it is small and has a length (read whole now),
    /// and the tenant's limits. `Ok(Err)`: the answer that refuses it.
    pub(super) async fn check_admitted(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<std::result::Result<(), LocalAnswer>> {
        let a = super::ctx::admitted(&mut ctx.admitted)?;
        let req = session.req_header();
        let announced = request_info::content_length(req);
        // A body comes, read now or not (then its model is unknown to the budgets).
        let has_body = announced.is_some_and(|n| n > 0)
            || req.headers.contains_key(http::header::TRANSFER_ENCODING);
        if let Err(e) = gate::check_head(req, &self.input)
            .and_then(|()| gate::check_length(announced, a.route.max_body_bytes))
        {
            return Ok(Err(e.into()));
        }
        a.json_required = gate::wants_json(req);
        let mut input_tokens = limits::input_tokens_of_len(announced.unwrap_or(0));
        if crate::websocket::is_websocket(req) {
            if announced.is_some_and(|n| n > 0)
                || req.headers.contains_key(http::header::TRANSFER_ENCODING)
            {
                let why = "a WebSocket handshake carries no body".to_string();
                return Ok(Err(RelayError::BodyField(why).into()));
            }
            a.websocket = Some(Box::new(crate::websocket::handshake_info(req)));
        } else if let Some(len) = early_read_len(req, a) {
            let rw = body::rewrite_for(
                &a.route,
                &req.method,
                &a.route.provider_path(req.uri.path()),
            );
            let read = body::read_small(session, len);
            let Ok(whole) = tokio::time::timeout(self.input.body_read_timeout, read).await else {
                return Ok(Err(RelayError::BodyTimeout.into()));
            };
            let whole = whole?;
            input_tokens = limits::input_tokens(&whole);
            match a.body.read_whole(&whole, rw, a.json_required) {
                Ok(ended) => {
                    a.answer.strip_usage = ended
                        .usage_added
                        .then(crate::tap::strip::UsageStripper::default);
                }
                Err(e) => return Ok(Err(e.into())),
            }
            self.plan_cache(a, session.req_header(), &whole).await;
        }
        let hit = a.cache.as_ref().is_some_and(|p| p.hit.is_some());
        // A hit costs a request against the limits, and no tokens and no budget.
        if !hit && !a.budgets.is_empty() && (has_body || a.websocket.is_some()) {
            if let Err(refused) = self.within_budgets(a, input_tokens).await {
                return Ok(Err(refused));
            }
        }
        if a.limits.is_empty() {
            return Ok(Ok(()));
        }
        let limited = self.within_limits(a, &ctx.request_id, input_tokens).await;
        if limited.is_err() {
            // Refused by a limit: the budgets get back what they reserved.
            if let Some(hold) = a.budget.take() {
                hold.settle(0, None).await;
            }
        }
        Ok(limited)
    }

    /// Reserves the request's worst-case cost in each of its budgets, or the answer that
    /// refuses it: 429 `insufficient_quota` with the budget's headers and the time to
    /// its reset (and `x-should-retry: false`, which the OpenAI and Anthropic SDKs obey:
    /// retrying cannot help before the reset); 400 for a model without a price.
    async fn within_budgets(
        &self,
        a: &mut Admitted,
        input_tokens: u64,
    ) -> std::result::Result<(), LocalAnswer> {
        let info = a.websocket.as_deref().or(a.body.info.as_ref());
        let ask = crate::budget::Ask {
            specs: &a.budgets,
            tenant: &a.tenant,
            route: &a.route.name,
            model: info.and_then(|i| i.model.as_deref()),
            max_tokens: info.and_then(|i| i.max_tokens),
            default_max_tokens: self.default_max_tokens,
            input_tokens,
        };
        match self.budgets.admit(&ask).await {
            Ok(hold) => {
                a.budget = hold;
                Ok(())
            }
            Err(crate::budget::Refusal::Exceeded(room)) => {
                let mut headers = room.headers();
                headers.push(("retry-after", room.retry_after().to_string()));
                headers.push(("x-should-retry", "false".into()));
                a.budget_refused = Some(room.budget);
                Err(LocalAnswer::with_headers(
                    RelayError::BudgetExceeded,
                    headers,
                ))
            }
            Err(crate::budget::Refusal::Unpriced) => {
                let model = ask.model.map(str::to_string);
                a.budget_refused = a.budgets.first().map(|b| b.id.clone());
                Err(RelayError::BudgetUnpriced { model }.into())
            }
            Err(crate::budget::Refusal::Unavailable) => Err(LocalAnswer::with_headers(
                RelayError::LimiterUnavailable,
                vec![("retry-after", "1".into())],
            )),
        }
    }

    /// Reserves the request's share of the tenant's limits, or the answer that refuses
    /// it (429 with the limit headers and Retry-After; 400 when no wait would admit it).
    async fn within_limits(
        &self,
        a: &mut Admitted,
        request_id: &str,
        input_tokens: u64,
    ) -> std::result::Result<(), LocalAnswer> {
        let max_tokens = a.body.info.as_ref().and_then(|i| i.max_tokens);
        let estimate = limits::estimate_tokens(max_tokens, self.default_max_tokens, input_tokens);
        let refused = match self
            .limiter
            .admit(&a.tenant, request_id, &a.limits, estimate)
            .await
        {
            Ok(admission) => {
                a.admission = Some(admission);
                return Ok(());
            }
            Err(refused) => refused,
        };
        if refused.kind == limits::LimitKind::ExceedsLimit {
            // No wait would admit it: a 400 without Retry-After, nothing counted.
            let limit = a.limits.tokens_per_minute.unwrap_or_default();
            return Err(RelayError::TokensExceedLimit { estimate, limit }.into());
        }
        let mut headers = limits::headers(refused.requests.as_ref(), refused.tokens.as_ref());
        let secs = refused.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        headers.push(("retry-after", secs.to_string()));
        let e = if refused.kind == limits::LimitKind::Unavailable {
            RelayError::LimiterUnavailable
        } else {
            RelayError::RateLimited {
                limit: refused.kind.label(),
                tokens: refused.kind.is_tokens(),
            }
        };
        Err(LocalAnswer::with_headers(e, headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    const YAML: &str = r#"
listen: { proxy: "127.0.0.1:1" }
routes:
  - { name: oa, prefix: /openai/v1, provider: openai, upstreams: ["https://api.openai.com/v1"], key: "env:OA" }
  - { name: an, prefix: /anthropic, provider: anthropic, upstreams: ["https://api.anthropic.com"], key: "env:AN" }
  - { name: nokey, prefix: /nokey, provider: openai, upstreams: ["http://127.0.0.1:9"], key: "env:UNSET" }
tenants:
  - { id: all, key_sha256: ["2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"] }
  - { id: only-an, key_sha256: ["fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9"], routes: [an] }
"#;

    fn setup() -> (RouteTable, TenantTable) {
        let c = Config::from_yaml(YAML, Path::new("."), &|n| match n {
            "OA" => Some("sk-oa".into()),
            "AN" => Some("sk-an".into()),
            _ => None,
        })
        .unwrap();
        (
            RouteTable::new(&c.routes).unwrap(),
            TenantTable::new(&c.tenants),
        )
    }

    fn req(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn refusal(r: std::result::Result<Allowed, Refusal>) -> (u16, ErrorShape) {
        match r {
            Ok(_) => panic!("admitted"),
            Err(r) => (r.error.status(), r.shape),
        }
    }

    #[test]
    fn admit_decides_every_refusal() {
        let (routes, tenants) = setup();
        // "foo" and "bar" are the keys whose hashes are configured above.
        let ok = admit(
            &routes,
            &tenants,
            &req(
                "/openai/v1/chat/completions",
                &[("authorization", "Bearer foo")],
            ),
        );
        assert_eq!(&*ok.ok().unwrap().tenant, "all");
        assert_eq!(
            refusal(admit(
                &routes,
                &tenants,
                &req("/nope", &[("authorization", "Bearer foo")])
            )),
            (404, ErrorShape::OpenAi)
        );
        assert_eq!(
            refusal(admit(
                &routes,
                &tenants,
                &req("/nope", &[("anthropic-version", "2023-06-01")])
            )),
            (404, ErrorShape::Anthropic)
        );
        assert_eq!(
            refusal(admit(
                &routes,
                &tenants,
                &req("/anthropic/v1/messages", &[])
            )),
            (401, ErrorShape::Anthropic)
        );
        assert_eq!(
            refusal(admit(
                &routes,
                &tenants,
                &req("/openai/v1/x", &[("x-api-key", "wrong")])
            )),
            (401, ErrorShape::OpenAi)
        );
        assert_eq!(
            refusal(admit(
                &routes,
                &tenants,
                &req("/openai/v1/x", &[("x-api-key", "bar")])
            )),
            (403, ErrorShape::OpenAi)
        );
        assert_eq!(
            refusal(admit(
                &routes,
                &tenants,
                &req("/nokey/x", &[("x-api-key", "foo")])
            )),
            (503, ErrorShape::OpenAi)
        );
        // A wrong key on an unconfigured route still reads as unauthenticated, not 503.
        assert_eq!(
            refusal(admit(
                &routes,
                &tenants,
                &req("/nokey/x", &[("x-api-key", "no")])
            )),
            (401, ErrorShape::OpenAi)
        );
    }
}
