//! The relay's `ProxyHttp`: each hook is a few lines that call the pure stages.
//!
//! A request's path through the hooks:
//! 1. `request_filter`: request id, route, tenant; local 401/403/404/503 answers.
//! 2. `upstream_peer`: next upstream of the route (round robin, then failover).
//! 3. `upstream_request_filter`: tenant credentials out, provider key in, Host, path;
//!    `request_body_filter`: the body is copied (up to a cap) to learn the model, and a
//!    chat stream's body asks for usage (`ensure_usage`).
//! 4. `upstream_response_filter`: status, time to first byte, which tap reads the body.
//! 5. `upstream_response_body_filter`: bytes pass untouched into the tap; the total
//!    deadline is checked.
//! 6. `fail_to_connect` / `error_while_proxy`: which failures move to the next upstream.
//! 7. `fail_to_proxy`: the error answer in the provider's shape.
//! 8. `logging`: the one end-of-request sink, also for refusals and disconnects. A
//!    request whose task is dropped without it (a shutdown cut it, a panic) is ended by
//!    the context's `Drop` instead, so that it too has its row.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use log::warn;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::auth::{AuthFailure, TenantTable};
use crate::breaker::Transition;
use crate::cost::Pricing;
use crate::error::{ErrorShape, RelayError};
use crate::gate;
use crate::gate::InputLimits;
use crate::limits::Limits;
use crate::limits::{self, Admission, Limiter};
use crate::metrics::{Metrics, StreamHandles};
use crate::recorder::{End, Facts, Recorder};
use crate::request_id;
use crate::request_info::{self, BodyCollector, BodyStep, RequestInfo, Rewrite};
use crate::route::Pick;
use crate::route::{Route, RouteKey, RouteTable};
use crate::stall::{Deadline, StallGuard};
use crate::tap::strip::UsageStripper;
use crate::tap::{Tap, TapKind};

/// Per-request state shared by the hooks.
pub struct RequestCtx {
    pub start: Instant,
    /// Wall-clock time of the request head, for its row.
    started_at: SystemTime,
    /// Request body bytes received from the client.
    pub request_bytes: u64,
    /// The relay's own id of the request (unpredictable): its row, its Redis slot and
    /// the upstream's `x-request-id`.
    pub request_id: String,
    /// The client's `x-request-id`, when sane: echoed back and kept in its own column.
    pub client_request_id: Option<String>,
    pub route: Option<Arc<Route>>,
    pub tenant: Option<Arc<str>>,
    /// Upstreams and keys this request tried (bit i: index i).
    tried_upstreams: u64,
    tried_keys: u64,
    /// The current attempt's upstream and key.
    attempt: Option<Attempt>,
    /// The upstream answered a status tried again elsewhere; `error_while_proxy` lets
    /// Pingora retry.
    retry_status: Option<u16>,
    /// Upstream attempts made so far, and how many are allowed.
    pub attempts: usize,
    max_attempts: usize,
    /// Attempts sent again because their pooled connection was stale; they are not
    /// counted against `max_attempts` (nothing reached the upstream), but are bounded.
    stale_retries: u8,
    /// A refusal the relay answered itself.
    pub refusal: Option<RelayError>,
    pub upstream_status: Option<u16>,
    pub ttfb: Option<Duration>,
    pub response_bytes: u64,
    shape: ErrorShape,
    /// Time the relay spent before choosing an upstream.
    admitted_after: Duration,
    body: BodyCollector,
    pub request_info: Option<RequestInfo>,
    pub tap: Option<Tap>,
    stream: Option<StreamHandles>,
    /// Set when the relay added `include_usage` to the request: the response's usage
    /// chunk is removed on its way to the client.
    strip_usage: Option<UsageStripper>,
    /// The body was read in `request_filter`; `Some` holds what is sent instead of it.
    early_body: Option<Option<Bytes>>,
    /// The tenant's limits and what admission reserved (tokens, a concurrency slot).
    limits: Limits,
    admission: Option<Admission>,
    /// First-byte, gap and total deadlines, armed when an upstream connection is made.
    stall: Option<StallGuard>,
    /// The body must be JSON (see `gate::wants_json`).
    json_required: bool,
    /// The upstream answered in a content encoding the tap cannot read.
    encoded_answer: bool,
    /// Body bytes this attempt has passed (a retry replays from 0).
    attempt_body_offset: u64,
    /// When the current attempt was chosen.
    attempt_started: Instant,
    /// Body bytes kept for the row (the route's `capture`).
    captured_request: Vec<u8>,
    captured_response: Vec<u8>,
    /// The client's address, for a row written without the session (see `Drop`).
    client_addr: Option<std::net::SocketAddr>,
    /// The status of the response head sent to the client, once sent.
    client_status: Option<u16>,
    /// Taken by `logging`; still here when the request's task is dropped without it.
    recorder: Option<Arc<Recorder>>,
    /// Last field: the request counts as open (its row to come) until this drops.
    _open: Option<crate::rows::OpenRequest>,
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        let Some(recorder) = self.recorder.take() else {
            return;
        };
        if let Some(g) = &self.stall {
            g.done();
        }
        let (outcome, detail) = if std::thread::panicking() {
            ("internal", "the request's task panicked")
        } else {
            (
                "shutdown",
                "the relay stopped before the request ended (fast shutdown or end of the grace period)",
            )
        };
        if self.request_id.is_empty() {
            self.request_id = request_id::new_id();
        }
        recorder.record(
            &self.facts(),
            End {
                status: self.client_status.unwrap_or(0),
                outcome,
                detail: Some(&detail),
                client_addr: self.client_addr.map(|a| a.to_string()),
                user_agent: None,
            },
        );
    }
}

/// A reused upstream connection that the upstream closes or resets this soon after its
/// attempt began, before any response byte, was stale (closed by the upstream while
/// pooled: the keep-alive race), not working on the request. Long enough for a round trip
/// to a distant region, short enough that a provider rarely has started billable work.
const STALE_POOLED_WITHIN: Duration = Duration::from_millis(500);

/// Stale pooled connections one request may meet and be sent again from, on top of the
/// route's attempt budget: a single-upstream route (budget one) must still survive an
/// upstream closing idle keep-alive connections. Pingora's pool drops connections it sees
/// closed, so meeting a second one at once is rare.
const STALE_RETRIES: u8 = 1;

/// One attempt's upstream and key. Dropping it (the next attempt, or the request's end)
/// ends its in-flight count and frees a half-open probe that got no verdict.
struct Attempt {
    route: Arc<Route>,
    pick: Pick,
    upstream_judged: bool,
    key_judged: bool,
}

impl Attempt {
    fn new(route: Arc<Route>, pick: Pick) -> Attempt {
        route.upstreams[pick.upstream]
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Attempt {
            route,
            pick,
            upstream_judged: false,
            key_judged: false,
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let upstream = &self.route.upstreams[self.pick.upstream];
        upstream
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if self.pick.upstream_probe && !self.upstream_judged {
            upstream.breaker.release_probe(self.pick.upstream_gen);
        }
        if let (true, false, Some(slot)) = (
            self.pick.key_probe,
            self.key_judged,
            self.route.key_slot(self.pick.key),
        ) {
            slot.breaker.release_probe(self.pick.key_gen);
        }
    }
}

/// Appends what fits under `limit` of `chunk` to `kept`.
fn keep_bytes(kept: &mut Vec<u8>, chunk: &[u8], limit: usize) {
    let room = limit.saturating_sub(kept.len());
    kept.extend_from_slice(&chunk[..room.min(chunk.len())]);
}

impl RequestCtx {
    /// What the request learned, for its record.
    fn facts(&self) -> Facts<'_> {
        Facts {
            request_id: &self.request_id,
            client_request_id: self.client_request_id.as_deref(),
            start: self.start,
            started_at: self.started_at,
            route: self.route.as_ref(),
            tenant: self.tenant.as_deref(),
            request_info: self.request_info.as_ref(),
            tap: self.tap.as_ref(),
            upstream_status: self.upstream_status,
            ttfb: self.ttfb,
            attempts: self.attempts,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            captured_request: &self.captured_request,
            captured_response: &self.captured_response,
            encoded_answer: self.encoded_answer,
        }
    }

    /// The id the client reads back: its own when it sent a sane one, else the relay's.
    pub fn answer_id(&self) -> &str {
        self.client_request_id
            .as_deref()
            .unwrap_or(&self.request_id)
    }

    fn new(now: Instant) -> RequestCtx {
        RequestCtx {
            start: now,
            started_at: SystemTime::now(),
            request_bytes: 0,
            request_id: String::new(),
            client_request_id: None,
            route: None,
            tenant: None,
            tried_upstreams: 0,
            tried_keys: 0,
            attempt: None,
            retry_status: None,
            attempts: 0,
            max_attempts: 1,
            stale_retries: 0,
            refusal: None,
            upstream_status: None,
            ttfb: None,
            response_bytes: 0,
            shape: ErrorShape::OpenAi,
            admitted_after: Duration::ZERO,
            body: BodyCollector::default(),
            request_info: None,
            tap: None,
            stream: None,
            strip_usage: None,
            early_body: None,
            stall: None,
            json_required: false,
            encoded_answer: false,
            attempt_body_offset: 0,
            attempt_started: now,
            captured_request: Vec::new(),
            captured_response: Vec::new(),
            limits: Limits::default(),
            admission: None,
            client_addr: None,
            client_status: None,
            recorder: None,
            _open: None,
        }
    }
}

/// What [`admit`] decided for a request.
pub struct Admitted {
    pub route: Arc<Route>,
    pub tenant: Arc<str>,
    pub limits: Limits,
}

/// A request the relay answers itself, with what was learned before refusing it.
pub struct Refusal {
    pub error: RelayError,
    pub shape: ErrorShape,
    pub route: Option<Arc<Route>>,
    pub tenant: Option<Arc<str>>,
}

/// Route, authenticate and authorize a request. Pure: the whole `request_filter`
/// decision, tested without a runtime.
pub fn admit(
    routes: &RouteTable,
    tenants: &TenantTable,
    req: &RequestHeader,
) -> std::result::Result<Admitted, Refusal> {
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
    if !tenant.may_use(&route.name) {
        let e = RelayError::RouteForbidden {
            route: route.name.clone(),
        };
        return Err(refuse(e, Some(&tenant.id)));
    }
    if let RouteKey::Missing { .. } = route.key {
        let e = RelayError::ProviderKeyMissing {
            route: route.name.clone(),
        };
        return Err(refuse(e, Some(&tenant.id)));
    }
    if !gate::known_method(&req.method) {
        return Err(refuse(RelayError::MethodNotAllowed, Some(&tenant.id)));
    }
    if crate::policy::is_upgrade(req) {
        return Err(refuse(RelayError::UpgradeRefused, Some(&tenant.id)));
    }
    if let Err(e) = route.check_endpoint(&req.method, path) {
        return Err(refuse(e, Some(&tenant.id)));
    }
    Ok(Admitted {
        route: route.clone(),
        tenant: tenant.id.clone(),
        limits: tenant.limits,
    })
}

/// Headers that may carry the tenant's relay key; all are removed before forwarding.
const TENANT_CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// Rewrites the upstream request: drops tenant credentials and `accept-encoding`, injects
/// the provider key, sets the path, Host and request id. Pure.
pub fn prepare_upstream_request(
    req: &mut RequestHeader,
    route: &Route,
    upstream: &crate::upstream::UpstreamUrl,
    key: Option<usize>,
    request_id: &str,
) -> Result<()> {
    for h in TENANT_CREDENTIAL_HEADERS {
        req.remove_header(h);
    }
    crate::policy::scrub_request(req, &route.policy.upstream_headers)?;
    // Compressed event streams cannot be read as they pass, and gain little.
    req.remove_header("accept-encoding");
    if let (RouteKey::Pool { header, .. }, Some(slot)) = (&route.key, route.key_slot(key)) {
        req.insert_header(header.clone(), slot.value.expose())?;
    }
    let target = route.upstream_target(upstream, path_and_query(req));
    let uri = target
        .parse::<http::Uri>()
        .map_err(|e| Error::because(ErrorType::InternalError, "upstream uri", e))?;
    req.set_uri(uri);
    req.insert_header(http::header::HOST, upstream.host_header())?;
    req.insert_header(request_id::HEADER, request_id)?;
    Ok(())
}

fn path_and_query(req: &RequestHeader) -> &str {
    req.uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
}

/// Maps a Pingora error to the relay's answer; `None` when the client is gone and no
/// answer can be written.
pub fn classify_failure(e: &Error) -> Option<RelayError> {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => None,
        (ErrorSource::Downstream, ReadTimedout | WriteTimedout) => None,
        (_, ConnectTimedout | ReadTimedout | WriteTimedout) => Some(RelayError::UpstreamTimeout),
        (ErrorSource::Upstream, _) => Some(RelayError::UpstreamUnavailable),
        (ErrorSource::Downstream, HTTPStatus(code)) if (400..500).contains(code) => {
            Some(RelayError::BadRequest)
        }
        (ErrorSource::Downstream, _) => Some(RelayError::BadRequest),
        _ => Some(RelayError::Internal),
    }
}

/// The bounded outcome label for logs and metrics.
pub fn outcome(ctx: &RequestCtx, e: Option<&Error>) -> &'static str {
    if let Some(r) = &ctx.refusal {
        return r.kind();
    }
    if let Some(deadline) = ctx.stall.as_ref().and_then(StallGuard::fired) {
        return deadline.outcome();
    }
    match e {
        None => "ok",
        Some(e) => match classify_failure(e) {
            None => "client_disconnect",
            Some(r) => r.kind(),
        },
    }
}

pub struct RelayProxy {
    pub routes: Arc<RouteTable>,
    /// What a client may send (head size, read timeouts).
    pub input: InputLimits,
    /// Swapped whole when the configuration is reloaded.
    pub tenants: Arc<crate::reload::Tenants>,
    pub metrics: Arc<Metrics>,
    pub pricing: Arc<Pricing>,
    pub limiter: Arc<dyn Limiter>,
    /// Output tokens assumed for a request without `max_tokens`.
    pub default_max_tokens: u64,
    /// Where each request ends (shares `metrics` and `pricing`).
    pub recorder: Arc<Recorder>,
}

/// The response header a non-streaming answer carries: the relay's own time, in
/// milliseconds (routing, authentication and header handling; not the upstream's).
pub const OVERHEAD_HEADER: &str = "x-relay-overhead-ms";

/// Reads a body announced as `len` bytes (at most [`request_info::EARLY_READ_MAX`]) into
/// Pingora's retry buffer, from which Pingora sends it upstream.
async fn read_small_body(session: &mut Session, len: usize) -> Result<Vec<u8>> {
    let downstream = session.as_mut();
    // A client that waits for `100 Continue` gets it from the relay, which is the one
    // reading the body now (the upstream request goes without `expect`).
    if downstream
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        downstream.write_continue_response().await?;
    }
    downstream.enable_retry_buffering();
    let mut body = Vec::with_capacity(len);
    while let Some(chunk) = downstream.read_request_body().await? {
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What the route may change in this request's body: usage asked for on a chat stream
/// (`ensure_usage`), `store` turned off (`store: force_off`). `provider_path`: the path
/// the provider sees, which is what the endpoints were checked against.
fn body_rewrite(route: &Route, method: &http::Method, provider_path: &str) -> Rewrite {
    Rewrite {
        usage: route.ensure_usage
            && *method == http::Method::POST
            && provider_path.ends_with("/chat/completions"),
        store_off: route.policy.store == crate::policy::Store::ForceOff
            && crate::policy::stores(method, provider_path),
    }
}

/// Reads the early body's fields and, when the route rewrites it, the body to send
/// instead; a field read twice or of the wrong type refuses the request.
fn prepare_early_body(
    ctx: &mut RequestCtx,
    body: &[u8],
    rw: Rewrite,
) -> std::result::Result<(), RelayError> {
    let refuse = |p: request_info::FieldProblem| RelayError::BodyField(p.0);
    let info = request_info::read(body).map_err(refuse)?;
    let rewritten = match &info {
        Some(i) => request_info::rewrite(body, i, rw).map_err(refuse)?,
        // JSON that is no request object cannot be sent with `store: false`: refused
        // rather than sent as it is (JSON that does not parse is the JSON gate's).
        None if rw.store_off && gate::is_json(body) => {
            return Err(RelayError::BodyField(
                "the body is not a JSON object".into(),
            ))
        }
        None => None,
    };
    ctx.strip_usage = rewritten
        .as_ref()
        .filter(|r| r.usage_added)
        .map(|_| UsageStripper::default());
    ctx.early_body = Some(rewritten.map(|r| Bytes::from(r.body)));
    ctx.request_info = info;
    Ok(())
}

impl RelayProxy {
    fn report_transitions(&self, route: &Route, seen: crate::route::Seen) {
        for (target, t) in seen {
            self.report_transition(route, &target, t);
        }
    }

    fn report_transition(&self, route: &Route, target: &str, t: Transition) {
        self.metrics.breaker_report(&route.name, target, t);
    }

    /// The current attempt's upstream answered well or failed.
    fn judge_upstream(&self, ctx: &mut RequestCtx, ok: bool) {
        let Some(a) = ctx.attempt.as_mut() else {
            return;
        };
        a.upstream_judged = true;
        let upstream = &a.route.upstreams[a.pick.upstream];
        if let Some(t) = upstream.breaker.verdict(ok, None, a.pick.upstream_gen) {
            let route = a.route.clone();
            self.report_transition(&route, &route.upstreams[a.pick.upstream].label(), t);
        }
    }

    /// The current attempt's key was accepted or refused (`hold`: Retry-After).
    fn judge_key(&self, ctx: &mut RequestCtx, ok: bool, hold: Option<Duration>) {
        let Some(a) = ctx.attempt.as_mut() else {
            return;
        };
        let route = a.route.clone();
        let Some(slot) = route.key_slot(a.pick.key) else {
            return;
        };
        a.key_judged = true;
        if let Some(t) = slot.breaker.verdict(ok, hold, a.pick.key_gen) {
            self.report_transition(&route, &slot.label, t);
        }
    }

    /// What an upstream's status says about it and about the key: 5xx is the upstream's
    /// failure; 429 the key's (set aside for the Retry-After); 401 and 403 count against
    /// the key; anything else is a success for both.
    fn judge_response(&self, ctx: &mut RequestCtx, status: u16, resp: &ResponseHeader) {
        match status {
            429 => {
                let hold = resp
                    .headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| crate::breaker::retry_after(v.as_bytes()));
                self.judge_upstream(ctx, true);
                self.judge_key(ctx, false, hold.or(Some(Duration::from_secs(1))));
            }
            401 | 403 => {
                self.judge_upstream(ctx, true);
                self.judge_key(ctx, false, None);
            }
            500..=599 => self.judge_upstream(ctx, false),
            _ => {
                self.judge_upstream(ctx, true);
                self.judge_key(ctx, true, None);
            }
        }
    }

    /// Ends a request whose body the relay refuses while it flows: the refusal is the
    /// answer (`fail_to_proxy` writes it) and the row's outcome.
    fn refuse_body(&self, ctx: &mut RequestCtx, e: RelayError) -> Box<Error> {
        let status = e.status();
        ctx.refusal = Some(e);
        let mut err = Error::explain(ErrorType::HTTPStatus(status), "request body refused");
        err.set_retry(false);
        err
    }

    /// A deadline passed: before the response head, a 504 in the provider's shape; in
    /// an SSE stream, an error event in the provider's shape and a clean end, so the
    /// client's SDK raises an error instead of waiting or seeing a cut; otherwise (JSON
    /// or audio already under way) the connection is closed mid-body.
    async fn end_stalled(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        deadline: Deadline,
    ) -> FailToProxy {
        let error = RelayError::Stalled(deadline);
        let downstream = session.as_downstream_mut();
        let code = if downstream.response_written().is_none() {
            let body = error.body(ctx.shape);
            if let Ok(mut resp) = ResponseHeader::build(error.status(), Some(4)) {
                let _ = resp.insert_header(http::header::CONTENT_TYPE, "application/json");
                let _ = resp.insert_header(http::header::CONTENT_LENGTH, body.len());
                let _ = resp.insert_header(request_id::HEADER, ctx.answer_id());
                if let Err(we) = downstream.write_error_response(resp, body).await {
                    warn!("{}: cannot write the error answer: {we}", ctx.request_id);
                }
            }
            error.status()
        } else {
            let sse = ctx
                .tap
                .as_ref()
                .is_some_and(|t| matches!(t.kind(), TapKind::OpenAiSse | TapKind::AnthropicSse));
            if sse {
                let event = error.sse_event(ctx.shape);
                if let Err(we) = downstream.write_response_body(event, true).await {
                    warn!("{}: cannot write the stall event: {we}", ctx.request_id);
                }
            }
            0
        };
        warn!(
            "{}: upstream {} after {:.1}s; the request was ended",
            ctx.request_id,
            deadline.outcome(),
            ctx.start.elapsed().as_secs_f64()
        );
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Checks the tenant's limits; answers 429 itself and returns false when refused.
    async fn admit_within_limits(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body_bytes: usize,
    ) -> Result<bool> {
        let max_tokens = ctx.request_info.as_ref().and_then(|i| i.max_tokens);
        let estimate = limits::estimate_tokens(max_tokens, self.default_max_tokens, body_bytes);
        let tenant = ctx.tenant.clone().expect("admitted");
        match self
            .limiter
            .admit(&tenant, &ctx.request_id, &ctx.limits, estimate)
            .await
        {
            Ok(admission) => {
                ctx.admission = Some(admission);
                Ok(true)
            }
            Err(refused) if refused.kind == limits::LimitKind::ExceedsLimit => {
                // No wait would admit it: a 400 without Retry-After, nothing counted.
                let e = RelayError::TokensExceedLimit {
                    estimate,
                    limit: ctx.limits.tokens_per_minute.unwrap_or_default(),
                };
                self.answer_locally(session, ctx, e).await?;
                Ok(false)
            }
            Err(refused) => {
                let mut headers =
                    limits::headers(refused.requests.as_ref(), refused.tokens.as_ref());
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
                self.answer_locally_with(session, ctx, e, &headers).await?;
                Ok(false)
            }
        }
    }

    async fn answer_locally(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        e: RelayError,
    ) -> Result<()> {
        self.answer_locally_with(session, ctx, e, &[]).await
    }

    async fn answer_locally_with(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        e: RelayError,
        headers: &[(&'static str, String)],
    ) -> Result<()> {
        let body = e.body(ctx.shape);
        let mut resp = ResponseHeader::build(e.status(), Some(4 + headers.len()))?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len())?;
        resp.insert_header(request_id::HEADER, ctx.answer_id())?;
        for (name, value) in headers {
            resp.insert_header(*name, value.as_str())?;
        }
        ctx.refusal = Some(e);
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }
}

#[async_trait]
impl ProxyHttp for RelayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        let mut ctx = RequestCtx::new(Instant::now());
        ctx._open = Some(self.recorder.rows.open_request());
        ctx.recorder = Some(self.recorder.clone());
        ctx
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        session
            .as_downstream_mut()
            .set_read_timeout(Some(self.input.client_read_timeout));
        ctx.client_addr = session.client_addr().and_then(|a| a.as_inet()).copied();
        crate::policy::drop_h2c_offer(session.req_header_mut());
        let req = session.req_header();
        ctx.request_id = request_id::new_id();
        ctx.client_request_id = req
            .headers
            .get(request_id::HEADER)
            .and_then(|v| request_id::accept_client_id(v.as_bytes()));
        let tenants = self.tenants.current();
        match admit(&self.routes, &tenants, req) {
            Ok(a) => {
                ctx.shape = ErrorShape::for_provider(a.route.provider);
                ctx.max_attempts = a.route.attempt_budget();
                let max_body = a.route.max_body_bytes;
                ctx.route = Some(a.route);
                ctx.tenant = Some(a.tenant);
                ctx.limits = a.limits;
                let req = session.req_header();
                let announced = request_info::content_length(req);
                if let Err(e) = gate::check_head(req, &self.input)
                    .and_then(|()| gate::check_length(announced, max_body))
                {
                    self.answer_locally(session, ctx, e).await?;
                    return Ok(true);
                }
                ctx.json_required = gate::wants_json(req);
                let mut body_bytes = announced.unwrap_or(0);
                if let Some(len) = request_info::early_read_len(session.req_header()) {
                    let route = ctx.route.as_ref().expect("set");
                    let req = session.req_header();
                    let rw = body_rewrite(route, &req.method, &route.provider_path(req.uri.path()));
                    let read = read_small_body(session, len);
                    let body = match tokio::time::timeout(self.input.body_read_timeout, read).await
                    {
                        Ok(body) => body?,
                        Err(_) => {
                            self.answer_locally(session, ctx, RelayError::BodyTimeout)
                                .await?;
                            return Ok(true);
                        }
                    };
                    body_bytes = body.len();
                    ctx.request_bytes = body.len() as u64;
                    let limit = ctx.route.as_ref().expect("set").capture.request;
                    keep_bytes(&mut ctx.captured_request, &body, limit);
                    if let Err(e) = prepare_early_body(ctx, &body, rw) {
                        self.answer_locally(session, ctx, e).await?;
                        return Ok(true);
                    }
                    // A body that parsed as a request object is JSON once its bytes are
                    // UTF-8 (cheap to check); only others pay for a second parse.
                    if ctx.json_required
                        && (std::str::from_utf8(&body).is_err()
                            || (ctx.request_info.is_none() && !gate::is_json(&body)))
                    {
                        self.answer_locally(session, ctx, RelayError::InvalidJson)
                            .await?;
                        return Ok(true);
                    }
                }
                if !ctx.limits.is_empty()
                    && !self.admit_within_limits(session, ctx, body_bytes).await?
                {
                    return Ok(true);
                }
                ctx.admitted_after = ctx.start.elapsed();
                Ok(false)
            }
            Err(refusal) => {
                ctx.shape = refusal.shape;
                ctx.route = refusal.route;
                ctx.tenant = refusal.tenant;
                let allow = match &refusal.error {
                    RelayError::EndpointMethod { allow } => vec![("allow", allow.clone())],
                    _ => Vec::new(),
                };
                self.answer_locally_with(session, ctx, refusal.error, &allow)
                    .await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx.route.clone().expect("request_filter admitted a route");
        // The previous attempt (if any) ends here.
        ctx.attempt = None;
        ctx.attempt_started = Instant::now();
        if let Some(g) = &ctx.stall {
            g.between_attempts();
        }
        ctx.upstream_status = None;
        ctx.ttfb = None;
        let (pick, seen) = route.pick(ctx.tried_upstreams, ctx.tried_keys, Instant::now());
        self.report_transitions(&route, seen);
        ctx.tried_upstreams |= 1 << pick.upstream;
        if let Some(k) = pick.key {
            ctx.tried_keys |= 1 << k;
        }
        ctx.attempts += 1;
        ctx.attempt = Some(Attempt::new(route.clone(), pick));
        let upstream = &route.upstreams[pick.upstream];
        match upstream.peer(&route.timeouts) {
            Some(peer) => Ok(Box::new(peer)),
            None => {
                // No address yet counts against it like a refused connection.
                self.judge_upstream(ctx, false);
                self.metrics.upstream_failure(&route.name, "unresolved");
                let mut e = Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("upstream {} has no resolved address", upstream.url.host),
                );
                e.set_retry(ctx.attempts < ctx.max_attempts);
                e.as_up();
                Err(e)
            }
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let route = ctx.route.as_ref().expect("admitted");
        let pick = ctx.attempt.as_ref().expect("upstream_peer picked").pick;
        let upstream = &route.upstreams[pick.upstream].url;
        prepare_upstream_request(upstream_request, route, upstream, pick.key, &ctx.request_id)?;
        if let Some(early) = &ctx.early_body {
            // Read in request_filter (and `100 Continue` answered): the body goes at
            // once, and the new length is known.
            upstream_request.remove_header(&http::header::EXPECT);
            if let Some(rewritten) = early {
                upstream_request.insert_header(http::header::CONTENT_LENGTH, rewritten.len())?;
            }
            return Ok(());
        }
        // A larger body the route may rewrite is held and may grow (`stream_options`,
        // `store`): its length is not known yet, so it goes upstream chunked.
        let rw = body_rewrite(route, &upstream_request.method, upstream_request.uri.path());
        if rw.any() {
            upstream_request.remove_header(&http::header::CONTENT_LENGTH);
            upstream_request.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        // Each attempt (a retry replays the body) starts the body over.
        ctx.body.reset(rw);
        ctx.attempt_body_offset = 0;
        ctx.strip_usage = None;
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.early_body.is_none() {
            // A retry replays the body from its start: only bytes past what earlier
            // attempts saw are new.
            let len = body.as_ref().map_or(0, |b| b.len() as u64);
            let start = ctx.attempt_body_offset;
            ctx.attempt_body_offset += len;
            if ctx.attempt_body_offset > ctx.request_bytes {
                let fresh = (ctx.request_bytes - start) as usize;
                ctx.request_bytes = ctx.attempt_body_offset;
                if let (Some(route), Some(b)) = (&ctx.route, body.as_ref()) {
                    keep_bytes(
                        &mut ctx.captured_request,
                        &b[fresh..],
                        route.capture.request,
                    );
                }
            }
            let max = ctx.route.as_ref().map_or(usize::MAX, |r| r.max_body_bytes);
            if ctx.request_bytes > max as u64 {
                // A body without a length that outgrew the cap: what went upstream is an
                // incomplete request, which the upstream cannot act on.
                return Err(self.refuse_body(ctx, RelayError::BodyTooLarge { max }));
            }
        }
        if let Some(early) = &ctx.early_body {
            // Pingora replays the body read in request_filter as one piece.
            if let (Some(rewritten), Some(_)) = (early, body.as_ref()) {
                *body = Some(rewritten.clone());
            }
            return Ok(());
        }
        let (step, end) = ctx
            .body
            .step(body.as_deref().unwrap_or_default(), end_of_stream);
        if let BodyStep::Replace(b) = step {
            *body = Some(b);
        }
        if let Some(end) = end {
            if let Some(p) = end.problem {
                return Err(self.refuse_body(ctx, RelayError::BodyField(p.0)));
            }
            if end.unreadable {
                let max = request_info::MAX_READ;
                return Err(self.refuse_body(ctx, RelayError::BodyTooLarge { max }));
            }
            if end.invalid_json && ctx.json_required {
                return Err(self.refuse_body(ctx, RelayError::InvalidJson));
            }
            ctx.request_info = end.info;
            ctx.strip_usage = end.usage_added.then(UsageStripper::default);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if status < 200 {
            // An interim answer (100 Continue): the real one follows.
            return Ok(());
        }
        self.judge_response(ctx, status, upstream_response);
        let route = ctx.route.clone().expect("admitted");
        if route.retry_on.contains(&status)
            && ctx.attempts < ctx.max_attempts
            && route.has_untried_for(status, ctx.tried_upstreams, ctx.tried_keys)
            && !session.as_ref().retry_buffer_truncated()
        {
            // Nothing reached the client and the upstream did no work: try elsewhere.
            self.metrics
                .upstream_failure(&route.name, &format!("status_{status}"));
            ctx.retry_status = Some(status);
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                format!("upstream answered {status}; trying another upstream or key"),
            );
            e.as_up();
            e.set_retry(true);
            return Err(e);
        }
        ctx.upstream_status = Some(status);
        ctx.ttfb = Some(ctx.start.elapsed());
        if let Some(g) = &ctx.stall {
            g.response_started(Instant::now());
        }
        let route = ctx.route.as_ref().expect("admitted");
        let content_type = upstream_response
            .headers
            .get(http::header::CONTENT_TYPE)
            .map_or(&b""[..], |v| v.as_bytes());
        // The relay asks for no compression; an upstream that compresses anyway cannot be
        // read as it passes, and its row says so.
        let encoded = upstream_response
            .headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        ctx.encoded_answer = encoded;
        let kind = if encoded {
            TapKind::None
        } else {
            TapKind::choose(route.provider, content_type)
        };
        if matches!(
            kind,
            TapKind::OpenAiSse | TapKind::AnthropicSse | TapKind::Audio
        ) {
            ctx.stream = Some(self.metrics.stream_started(&route.name));
        }
        ctx.tap = Some(Tap::new(kind, ctx.start));
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let own_limits = ctx
            .admission
            .as_ref()
            .is_some_and(|a| a.requests.is_some() || a.tokens.is_some());
        crate::policy::scrub_response(upstream_response, own_limits);
        upstream_response.insert_header(request_id::HEADER, ctx.answer_id())?;
        ctx.client_status = Some(upstream_response.status.as_u16());
        if let Some(a) = &ctx.admission {
            limits::append_headers(upstream_response, a.requests.as_ref(), a.tokens.as_ref())?;
        }
        if ctx.stream.is_none() {
            let after_upstream = ctx.ttfb.map_or(Duration::ZERO, |t| ctx.start.elapsed() - t);
            let overhead = ctx.admitted_after + after_upstream;
            upstream_response.insert_header(
                OVERHEAD_HEADER,
                format!("{:.3}", overhead.as_secs_f64() * 1000.0),
            )?;
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(b) = body {
            ctx.response_bytes += b.len() as u64;
            let now = Instant::now();
            if let Some(g) = &ctx.stall {
                g.chunk(now);
            }
            if let Some(tap) = &mut ctx.tap {
                match &ctx.stream {
                    Some(s) => tap.feed(b, now, &mut |gap| s.gap.observe(gap.as_secs_f64())),
                    None => tap.feed(b, now, &mut |_| {}),
                }
            }
        }
        if end_of_stream {
            if let Some(g) = &ctx.stall {
                g.done();
            }
            if let Some(tap) = &mut ctx.tap {
                tap.finish();
            }
        }
        Ok(None)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        let is_sse = ctx
            .tap
            .as_ref()
            .is_some_and(|t| t.kind() == TapKind::OpenAiSse);
        if let (Some(stripper), true) = (&mut ctx.strip_usage, is_sse) {
            let out = stripper.feed(body.as_deref().unwrap_or_default(), end_of_stream);
            // Nothing to send yet is `None`: an empty chunk would end a chunked body.
            *body = (!out.is_empty()).then_some(out);
        }
        if let (Some(route), Some(b)) = (&ctx.route, body.as_ref()) {
            keep_bytes(&mut ctx.captured_response, b, route.capture.response);
        }
        Ok(None)
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let route = ctx.route.as_ref().expect("admitted");
        // Known once per connection (Pingora caches them), so a pooled connection costs
        // no syscall here.
        let addrs = digest
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|s| Some((*s.local_addr()?.as_inet()?, *s.peer_addr()?.as_inet()?)));
        ctx.stall
            .get_or_insert_with(|| StallGuard::new(ctx.start, &route.timeouts))
            .attempt(fd, addrs, Instant::now());
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.judge_upstream(ctx, false);
        let route = ctx.route.as_ref().expect("admitted");
        self.metrics.upstream_failure(&route.name, "connect");
        // Nothing reached the upstream: moving on to the next one is always safe.
        e.set_retry(ctx.attempts < ctx.max_attempts);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.retry_status.take().is_some() {
            e.set_retry(ctx.attempts < ctx.max_attempts);
            return e;
        }
        // A pooled connection the upstream had already closed fails at once, before any
        // response byte: the request was not processed, so it is sent again on a new
        // connection, even past the attempt budget. One that failed after a while may have
        // been working on the request; anything else may have started paid work upstream
        // and is never sent twice unless the route says so.
        let stalled = ctx.stall.as_ref().and_then(StallGuard::fired).is_some();
        // Pingora marks `ReusedOnly` the errors where a connection gave out while the
        // response head was awaited (closed, or reset); a write failing is a reset too.
        let gave_out = matches!(e.retry, pingora_core::RetryType::ReusedOnly)
            || e.etype() == &ErrorType::WriteError;
        let stale_pooled = client_reused
            && gave_out
            && e.esource() == &ErrorSource::Upstream
            && ctx.upstream_status.is_none()
            && ctx.attempt_started.elapsed() < STALE_POOLED_WITHIN
            && ctx.stale_retries < STALE_RETRIES
            && !session.as_ref().retry_buffer_truncated()
            && !stalled;
        if stale_pooled {
            ctx.stale_retries += 1;
            ctx.max_attempts += 1;
            let route = ctx.route.as_ref().expect("admitted");
            self.metrics.upstream_failure(&route.name, "stale_pooled");
            e.set_retry(true);
            return e;
        }
        if ctx.upstream_status.is_none() && e.esource() == &ErrorSource::Upstream {
            // It failed before answering: a mark against the upstream.
            self.judge_upstream(ctx, false);
        }
        let route = ctx.route.as_ref().expect("admitted");
        if route.retry_after_send
            && !stalled
            && ctx.upstream_status.is_none()
            && ctx.attempts < ctx.max_attempts
            && !session.as_ref().retry_buffer_truncated()
        {
            // The route accepts that the upstream may have started the work.
            e.set_retry(true);
        } else {
            e.set_retry(false);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if let Some(deadline) = ctx.stall.as_ref().and_then(StallGuard::fired) {
            return self.end_stalled(session, ctx, deadline).await;
        }
        let code = match ctx.refusal.clone().or_else(|| classify_failure(e)) {
            None => 0,
            Some(relay_error) => {
                let status = relay_error.status();
                let body = relay_error.body(ctx.shape);
                if let Ok(mut resp) = ResponseHeader::build(status, Some(4)) {
                    let _ = resp.insert_header(http::header::CONTENT_TYPE, "application/json");
                    let _ = resp.insert_header(http::header::CONTENT_LENGTH, body.len());
                    let _ = resp.insert_header(request_id::HEADER, ctx.answer_id());
                    // Writes nothing when the response header already went out (a stream
                    // cut mid-way): the connection is closed and the client sees the cut.
                    if let Err(we) = session
                        .as_downstream_mut()
                        .write_error_response(resp, body)
                        .await
                    {
                        warn!("{}: cannot write the error answer: {we}", ctx.request_id);
                    }
                }
                status
            }
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A refusal of the relay's own and a client that went away are in the row and the
    /// access line: an ERROR line for each (Pingora's, with the client's Host in it)
    /// would let any client fill the error log.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        ctx.refusal.is_some() || e.esource() == &ErrorSource::Downstream
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // Bodyless answers never reach the body filter's end: no deadline applies now.
        if let Some(g) = &ctx.stall {
            g.done();
        }
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let user_agent = session
            .req_header()
            .headers
            .get(http::header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let end = End {
            status,
            outcome: outcome(ctx, e),
            detail: e.map(|e| e as &(dyn std::fmt::Display + Sync)),
            client_addr: session.client_addr().map(|a| a.to_string()),
            user_agent,
        };
        let outcome = end.outcome;
        let usage = match ctx.recorder.take() {
            Some(recorder) => recorder.record(&ctx.facts(), end),
            None => Default::default(),
        };
        // The open-stream gauge is released here, whatever ended the request.
        ctx.stream = None;
        if let Some(admission) = ctx.admission.take() {
            // Settle the token reservation: with the provider's count when it gave one;
            // all of it back when no upstream could be reached; otherwise the estimate
            // stands (the upstream may have worked for a client that went away).
            let actual = match (usage.input, usage.output) {
                (Some(i), Some(o)) => Some(i + o),
                _ if outcome == "upstream_unavailable" => Some(0),
                _ => None,
            };
            if let Some(tenant) = &ctx.tenant {
                // The concurrency slot is freed here (or as `admission` drops).
                self.limiter
                    .settle(tenant, &ctx.limits, admission, actual)
                    .await;
            }
        }
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

    fn refusal(r: std::result::Result<Admitted, Refusal>) -> (u16, ErrorShape) {
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

    #[test]
    fn upstream_request_swaps_keys() {
        let (routes, _) = setup();
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

    #[test]
    fn failures_are_classified() {
        let mut up = Error::new(ErrorType::ConnectRefused);
        up.as_up();
        assert_eq!(classify_failure(&up), Some(RelayError::UpstreamUnavailable));
        let mut t = Error::new(ErrorType::ReadTimedout);
        t.as_up();
        assert_eq!(classify_failure(&t), Some(RelayError::UpstreamTimeout));
        let mut gone = Error::new(ErrorType::ConnectionClosed);
        gone.as_down();
        assert_eq!(classify_failure(&gone), None);
    }
}
