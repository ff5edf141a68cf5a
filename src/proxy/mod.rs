//! The relay's `ProxyHttp`: each hook is a short list of calls into the rooms of this
//! folder, in the order a request meets them.
//!
//! 1. `request_filter` ([`admit`]): request id, route, tenant, head checks, a small body
//!    read whole, the tenant's limits; the relay's own refusals.
//! 2. `upstream_peer` ([`attempt`]): the next upstream and key of the route (round robin,
//!    then failover).
//! 3. `upstream_request_filter` ([`forward`]): tenant credentials out, provider key in,
//!    Host, path; `request_body_filter` ([`body`]): the body read, kept and rewritten.
//! 4. `upstream_response_filter` and `response_filter` ([`response`]): status, time to
//!    first byte, the tap; the head the client gets.
//! 5. `upstream_response_body_filter`: the bytes as they came, into the tap (the stream
//!    measure); `response_body_filter`: the bytes as they go to the client.
//! 6. `fail_to_connect`, `error_while_proxy` ([`retry`]): which failures go again.
//! 7. `fail_to_proxy` ([`failure`]): the error answer in the provider's shape.
//! 8. `logging` ([`end`]): the one end of a request (`crate::recorder`), and the settlement of its
//!    limits. A request whose task is dropped without it is ended by its context's `Drop`
//!    ([`ctx`]).
//!
//! A WebSocket handshake is a request like any other up to the upstream's `101`; from
//! then on the body filters carry the session's frames (the client's in
//! `request_body_filter`, the server's in the response body filters), read by
//! `crate::websocket` and the Realtime tap, and the stall guard keeps its idle clock.

mod admit;
mod attempt;
mod body;
mod cached;
mod ctx;
mod end;
mod failure;
mod forward;
mod response;
mod retry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

pub use admit::{admit, Allowed, Refusal};
pub use ctx::RequestCtx;
pub use end::{outcome, settled_tokens};
pub use failure::classify_failure;
pub use forward::prepare_upstream_request;
pub use response::OVERHEAD_HEADER;

use crate::cost::Pricing;
use crate::gate::InputLimits;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::recorder::Recorder;
use crate::request_info::Rewrite;
use crate::route::RouteTable;
use ctx::{admitted, Admitted};

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
    /// The tenants' spend budgets.
    pub budgets: Arc<crate::budget::Budgets>,
    /// The routes' response cache.
    pub cache: Arc<crate::cache::Cache>,
    /// The OTLP exporter, when `telemetry.otlp` is set.
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

#[async_trait]
impl ProxyHttp for RelayProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        let mut ctx = RequestCtx::new(Instant::now());
        ctx.open = Some(self.recorder.rows.open_request());
        ctx.recorder = Some(self.recorder.clone());
        ctx
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.open(session, self.input.client_read_timeout);
        if let Some(t) = &self.telemetry {
            let parent = session.req_header().headers.get("traceparent");
            ctx.trace = Some(Box::new(t.trace(parent.map(|v| v.as_bytes()))));
        }
        match admit(&self.routes, &self.tenants.current(), session.req_header()) {
            Ok(allowed) => ctx.admit(allowed),
            Err(refusal) => {
                let error = ctx.refused(refusal);
                return self.answer(session, ctx, error.into()).await;
            }
        }
        if let Err(refused) = self.check_admitted(session, ctx).await? {
            return self.answer(session, ctx, refused).await;
        }
        let hit = ctx
            .admitted
            .as_ref()
            .and_then(|a| a.cache.as_ref()?.hit.clone());
        if let Some(entry) = hit {
            return self.serve_hit(session, ctx, &entry).await;
        }
        let a = admitted(&mut ctx.admitted)?;
        a.admitted_after = ctx.start.elapsed();
        if a.websocket.is_some() {
            // Only a handshake going upstream (see `websocket::hold_handshake_body`).
            crate::websocket::hold_handshake_body(session.req_header_mut())?;
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let a = admitted(&mut ctx.admitted)?;
        if let Some(g) = &a.stall {
            g.between_attempts();
        }
        a.answer.reset();
        let pick = a.tries.next(&a.route, &self.metrics);
        let upstream = &a.route.upstreams[pick.upstream];
        if let Some(mut peer) = upstream.peer(&a.timeouts()) {
            if a.websocket.is_some() {
                // A session's server may be silent while its client talks: the guard's
                // idle clock (frames either way) ends it, not a read timeout.
                peer.options.read_timeout = None;
            }
            return Ok(Box::new(peer));
        }
        Err(a.tries.unresolved(&a.route, pick, &self.metrics))
    }

    async fn upstream_request_filter(
        &self,
        _: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let a = admitted(&mut ctx.admitted)?;
        let pick = a
            .tries
            .pick()
            .ok_or_else(|| Error::new(ErrorType::InternalError))?;
        let upstream = &a.route.upstreams[pick.upstream].url;
        prepare_upstream_request(req, &a.route, upstream, pick.key, &ctx.request_id)?;
        if let (Some(t), Some(trace)) = (&self.telemetry, ctx.trace.as_mut()) {
            // The upstream continues the trace from this attempt's span.
            req.insert_header("traceparent", trace.attempt(&t.ids))?;
        }
        if a.body.was_read() {
            return a.body.start_attempt(req, Rewrite::default());
        }
        // Each attempt (a retry replays the body) reads it over.
        let rw = body::rewrite_for(&a.route, &req.method, req.uri.path());
        a.answer.strip_usage = None;
        a.body.start_attempt(req, rw)
    }

    async fn request_body_filter(
        &self,
        _: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let a = admitted(&mut ctx.admitted)?;
        if a.answer.in_session() {
            a.answer.client_frames(body, a.stall.as_ref());
            return Ok(());
        }
        match a.body.chunk(body, end_of_stream, a.json_required) {
            Ok(Some(ended)) => {
                a.answer.strip_usage = ended
                    .usage_added
                    .then(crate::tap::strip::UsageStripper::default);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(failure::refuse_body(ctx, e)),
        }
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if status == 101 {
            return self.session_started(session, resp, ctx);
        }
        if status < 200 {
            // An interim answer (100 Continue): the real one follows.
            return Ok(());
        }
        let a = admitted(&mut ctx.admitted)?;
        a.tries.judge_response(status, resp, &self.metrics);
        let again = retry::after_status(
            a.route.retry_on.contains(&status),
            &a.tries.budget,
            a.tries.untried_for(&a.route, status),
            !session.as_ref().retry_buffer_truncated(),
        );
        if again {
            // Nothing reached the client and the upstream did no work: try elsewhere.
            let label = format!("status_{status}");
            self.metrics.upstream_failure(&a.route.name, &label);
            a.tries.retry_status = Some(status);
            return Err(retry::status_error(status));
        }
        a.answer.head(resp, ctx.start, &a.route, &self.metrics);
        if let Some(g) = &a.stall {
            g.response_started(Instant::now());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let a = ctx.admitted.as_ref();
        let overhead = a.and_then(|a| a.overhead(ctx.start));
        let admission = a.and_then(|a| a.admission.as_ref());
        response::client_head(resp, ctx.answer_id(), admission, overhead)?;
        if let Some(room) = a.and_then(|a| a.budget.as_ref()?.headroom.as_ref()) {
            for (name, value) in room.headers() {
                resp.insert_header(name, value)?;
            }
        }
        if let Some(plan) = a.and_then(|a| a.cache.as_ref()) {
            resp.insert_header(crate::cache::HEADER, plan.result())?;
        }
        if let Some(a) = ctx.admitted.as_mut() {
            a.capture_for_cache();
        }
        ctx.client_status = Some(resp.status.as_u16());
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        let a = admitted(&mut ctx.admitted)?;
        a.answer
            .upstream_chunk(body, end_of_stream, a.stall.as_ref());
        a.watch_budget(body);
        Ok(None)
    }

    fn response_body_filter(
        &self,
        _: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        let a = admitted(&mut ctx.admitted)?;
        if end_of_stream && a.answer.in_session() {
            if let Some(deadline) = a.stalled() {
                let frame = failure::session_close_frame(Some(deadline));
                a.answer.close_session(body, frame);
            }
        }
        a.answer
            .client_chunk(body, end_of_stream, a.route.capture.response);
        Ok(None)
    }

    async fn connected_to_upstream(
        &self,
        _: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        admitted(&mut ctx.admitted)?.connected(ctx.start, fd, digest);
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(a) = ctx.admitted.as_mut() {
            a.tries.judge_upstream(false, &self.metrics);
            self.metrics.upstream_failure(&a.route.name, "connect");
            e.set_retry(retry::after_connect_failure(&a.tries.budget));
        }
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
        let Some(a) = ctx.admitted.as_mut() else {
            return e;
        };
        if a.tries.retry_status.take().is_some() {
            e.set_retry(a.tries.budget.left());
            return e;
        }
        let failed = retry::Failed::of(
            &e,
            client_reused,
            a.answer.upstream_status.is_some(),
            a.tries.started.elapsed(),
            a.stalled().is_some(),
            !session.as_ref().retry_buffer_truncated(),
        );
        let verdict = retry::after_error(&failed, &a.tries.budget, a.route.retry_after_send);
        if verdict == retry::Verdict::Stale {
            a.tries.budget.stale_again();
            self.metrics.upstream_failure(&a.route.name, "stale_pooled");
        } else if retry::marks_upstream(&failed, verdict) {
            a.tries.judge_upstream(false, &self.metrics);
        }
        e.set_retry(verdict != retry::Verdict::Stop);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let a = ctx.admitted.as_deref();
        if a.is_some_and(|a| a.answer.in_session()) {
            return failure::end_session(session, ctx, e).await;
        }
        match a.and_then(Admitted::stalled) {
            Some(deadline) => failure::end_stalled(session, ctx, deadline).await,
            None => failure::answer_failure(session, ctx, e).await,
        }
    }

    /// A refusal of the relay's own and a client that went away are in the row and the
    /// access line: an ERROR line for each (Pingora's, with the client's Host in it)
    /// would let any client fill the error log.
    fn suppress_error_log(&self, _: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        ctx.refusal.is_some() || e.esource() == &ErrorSource::Downstream
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        self.end(session, e, ctx).await
    }
}

impl RelayProxy {
    /// The upstream switched protocols. Only a WebSocket the request asked for is taken
    /// (Pingora refuses a switch the client did not ask for); its frames are read from
    /// now on, and frames either way, not the client read timeout, keep it open.
    fn session_started(
        &self,
        session: &mut Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let start = ctx.start;
        let a = admitted(&mut ctx.admitted)?;
        if a.websocket.is_none() {
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "the upstream switched protocols unasked",
            ));
        }
        a.tries.judge_response(101, resp, &self.metrics);
        a.answer.session_started(start, &a.route, &self.metrics);
        if let Some(g) = &a.stall {
            g.session_started(Instant::now());
        }
        session.as_downstream_mut().set_read_timeout(None);
        Ok(())
    }
}
