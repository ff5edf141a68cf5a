//! The request's state across the hooks. Every request has its ids, its clock and what
//! is known of its route and tenant; only a request `request_filter` let through has an
//! [`Admitted`] state, so a hook after it holds the route and the limits as a value, not
//! as a promise. The context's `Drop` writes the row of a request whose task ended
//! without `logging` (a shutdown cut it, a panic).

use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pingora_core::protocols::Digest;
use pingora_core::{Error, ErrorType, Result};

use super::admit::{Allowed, Refusal};
use super::attempt::Tries;
use super::body::RequestBody;
use super::response::Answer;
use crate::error::{ErrorShape, RelayError};
use crate::limits::{Admission, Limits};
use crate::recorder::{End, Facts, Recorder};
use crate::route::Route;
use crate::stall::StallGuard;

/// Per-request state shared by the hooks.
pub struct RequestCtx {
    pub start: Instant,
    /// Wall-clock time of the request head, for its row.
    pub(super) started_at: SystemTime,
    /// The relay's own id of the request (unpredictable): its row, its Redis slot and
    /// the upstream's `x-request-id`.
    pub request_id: String,
    /// The client's `x-request-id`, when sane: echoed back and kept in its own column.
    pub client_request_id: Option<String>,
    /// The client's address, for a row written without the session (see `Drop`).
    pub(super) client_addr: Option<std::net::SocketAddr>,
    /// The route and tenant as far as they are known, also for a refused request.
    pub route: Option<Arc<Route>>,
    pub tenant: Option<Arc<str>>,
    /// The error shape of the relay's own answers.
    pub(super) shape: ErrorShape,
    /// An answer the relay gave itself: the row's outcome.
    pub refusal: Option<RelayError>,
    /// Set once `request_filter` lets the request through. Boxed: Pingora's request
    /// future holds the context in three places (3 x 1,376 bytes inline, per in-flight
    /// request, copied when the future is boxed), and this is most of it.
    pub(super) admitted: Option<Box<Admitted>>,
    /// The status of the response head sent to the client, once sent.
    pub(super) client_status: Option<u16>,
    /// Taken by `logging`; still here when the request's task is dropped without it.
    pub(super) recorder: Option<Arc<Recorder>>,
    /// The request's trace ids, when OpenTelemetry is on.
    pub(super) trace: Option<Box<crate::telemetry::Trace>>,
    /// Last field: the request counts as open (its row to come) until this drops.
    pub(super) open: Option<crate::rows::OpenRequest>,
}

/// A request routed, authenticated and authorized: what its later hooks work on.
pub struct Admitted {
    pub route: Arc<Route>,
    pub tenant: Arc<str>,
    /// The tenant's limits and what admission reserved (tokens, a concurrency slot).
    pub limits: Limits,
    pub admission: Option<Admission>,
    /// The body must be JSON (see `gate::wants_json`).
    pub json_required: bool,
    /// Time the relay spent before choosing an upstream.
    pub admitted_after: Duration,
    pub body: RequestBody,
    pub tries: Tries,
    pub answer: Answer,
    /// First-byte, gap and total deadlines, armed when an upstream connection is made.
    pub stall: Option<StallGuard>,
    /// A WebSocket handshake: what it names (the model in its query), for its row.
    pub websocket: Option<Box<crate::request_info::RequestInfo>>,
    /// The tenant's budgets, what the request reserved in them, and the one that
    /// refused it.
    pub budgets: Arc<[Arc<crate::budget::BudgetSpec>]>,
    pub budget: Option<crate::budget::Hold>,
    pub budget_refused: Option<String>,
    /// The tenant's groups (a route may share its cache with one).
    pub groups: Arc<[String]>,
    /// What the request does with the route's response cache.
    pub cache: Option<Box<crate::cache::Plan>>,
}

impl Admitted {
    pub fn new(route: Arc<Route>, tenant: Arc<str>, limits: Limits) -> Admitted {
        Admitted {
            tries: Tries::new(route.attempt_budget()),
            body: RequestBody::new(&route),
            route,
            tenant,
            limits,
            admission: None,
            json_required: false,
            admitted_after: Duration::ZERO,
            answer: Answer::default(),
            stall: None,
            websocket: None,
            budgets: Arc::new([]),
            budget: None,
            budget_refused: None,
            groups: Arc::new([]),
            cache: None,
        }
    }

    /// A stream whose budget has no room for its next output is cut: nothing more of it
    /// reaches the client, the upstream is cancelled, and the proxy ends the stream with
    /// an error event (`failure::end_stalled`). A WebSocket session is watched in
    /// dollars at each `response.done`: the response that went past its budget reaches
    /// the client whole, then the session is closed (1008, "budget exceeded").
    pub fn watch_budget(&self, body: &mut Option<bytes::Bytes>) {
        let (Some(hold), Some(tap)) = (&self.budget, &self.answer.tap) else {
            return;
        };
        if self.stalled().is_some() {
            return;
        }
        let session = self.answer.in_session();
        let cut = if session {
            let u = &tap.measure.usage;
            let (input, output) = (u.input.unwrap_or(0), u.output.unwrap_or(0));
            hold.watch_spent(input, u.cached_input.unwrap_or(0), output)
        } else {
            hold.watch(tap.measure.output_events)
        };
        if cut {
            if let Some(guard) = &self.stall {
                guard.cut(crate::stall::Deadline::Budget);
            }
            if !session {
                *body = None;
            }
        }
    }

    /// The route's deadlines for this request: a WebSocket session's, or a request's.
    pub fn timeouts(&self) -> crate::stall::Timeouts {
        match self.websocket {
            Some(_) => self.route.timeouts.for_session(),
            None => self.route.timeouts,
        }
    }

    /// A WebSocket handshake the upstream refused (any answer but `101`), whose answer
    /// reached the client whole. (The client then closes the connection, which Pingora
    /// sees as a client gone: see `websocket::hold_handshake_body`.)
    pub fn handshake_refused_upstream(&self) -> bool {
        self.websocket.is_some() && !self.answer.in_session() && self.answer.body_sent
    }

    /// The deadline that ended the request, if one did.
    pub fn stalled(&self) -> Option<crate::stall::Deadline> {
        self.stall.as_ref().and_then(StallGuard::fired)
    }

    /// An upstream connection is made (`start`: of the request): the deadlines are armed
    /// on it. Its addresses are known once per connection (Pingora caches them), so a
    /// pooled connection costs no syscall here.
    pub fn connected(&mut self, start: Instant, fd: RawFd, digest: Option<&Digest>) {
        let addrs = digest
            .and_then(|d| d.socket_digest.as_ref())
            .and_then(|s| Some((*s.local_addr()?.as_inet()?, *s.peer_addr()?.as_inet()?)));
        let timeouts = self.timeouts();
        self.stall
            .get_or_insert_with(|| StallGuard::new(start, &timeouts))
            .attempt(fd, addrs, Instant::now());
    }

    /// The relay's own time in an answer that is not a stream: before the upstream was
    /// chosen, and since its response head came.
    pub fn overhead(&self, start: Instant) -> Option<Duration> {
        if self.answer.stream.is_some() {
            return None;
        }
        let after = self
            .answer
            .ttfb
            .map_or(Duration::ZERO, |t| start.elapsed() - t);
        Some(self.admitted_after + after)
    }

    /// No deadline applies any more (the request ended, one way or another).
    pub fn stop_clock(&self) {
        if let Some(g) = &self.stall {
            g.done();
        }
    }
}

/// The admitted state of a request, for the hooks that only run after admission. A
/// request without one never gets this far; should Pingora call them anyway, the
/// request fails instead of the relay.
pub fn admitted(state: &mut Option<Box<Admitted>>) -> Result<&mut Admitted> {
    state
        .as_deref_mut()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "request was not admitted"))
}

impl RequestCtx {
    pub fn new(now: Instant) -> RequestCtx {
        RequestCtx {
            start: now,
            started_at: SystemTime::now(),
            request_id: String::new(),
            client_request_id: None,
            client_addr: None,
            route: None,
            tenant: None,
            shape: ErrorShape::OpenAi,
            refusal: None,
            admitted: None,
            client_status: None,
            recorder: None,
            trace: None,
            open: None,
        }
    }

    /// The request's head arrived: its read timeout, its client, its ids. An `h2c`
    /// upgrade offer is dropped (the relay does not take it).
    pub(super) fn open(&mut self, session: &mut pingora_proxy::Session, read_timeout: Duration) {
        let downstream = session.as_downstream_mut();
        downstream.set_read_timeout(Some(read_timeout));
        self.client_addr = session.client_addr().and_then(|a| a.as_inet()).copied();
        crate::policy::drop_h2c_offer(session.req_header_mut());
        self.request_id = crate::request_id::new_id();
        self.client_request_id = session
            .req_header()
            .headers
            .get(crate::request_id::HEADER)
            .and_then(|v| crate::request_id::accept_client_id(v.as_bytes()));
    }

    /// `request_filter` let the request through.
    pub(super) fn admit(&mut self, allowed: Allowed) {
        self.shape = ErrorShape::for_provider(allowed.route.provider);
        self.route = Some(allowed.route.clone());
        self.tenant = Some(allowed.tenant.clone());
        let mut admitted = Admitted::new(allowed.route, allowed.tenant, allowed.limits);
        admitted.budgets = allowed.budgets;
        admitted.groups = allowed.groups;
        self.admitted = Some(Box::new(admitted));
    }

    /// `request_filter` refused the request: what was learned is kept for its row.
    pub(super) fn refused(&mut self, r: Refusal) -> RelayError {
        (self.shape, self.route, self.tenant) = (r.shape, r.route, r.tenant);
        r.error
    }

    /// The id the client reads back: its own when it sent a sane one, else the relay's.
    pub fn answer_id(&self) -> &str {
        self.client_request_id
            .as_deref()
            .unwrap_or(&self.request_id)
    }

    /// Upstream attempts made so far.
    pub fn attempts(&self) -> usize {
        self.admitted
            .as_ref()
            .map_or(0, |a| a.tries.budget.attempts)
    }

    /// What the request learned, for its record.
    pub(super) fn facts(&self) -> Facts<'_> {
        let mut f = Facts::head(&self.request_id, self.start, self.started_at);
        f.trace = self.trace.as_deref();
        f.client_request_id = self.client_request_id.as_deref();
        f.route = self.route.as_ref();
        f.tenant = self.tenant.as_deref();
        f.refused = self.refusal.is_some();
        if let Some(a) = &self.admitted {
            f.request_info = a.websocket.as_deref().or(a.body.info.as_ref());
            f.request_bytes = a.body.bytes;
            f.captured_request = a.body.captured();
            f.attempts = a.tries.budget.attempts;
            f.budget = a.budget.as_ref();
            f.budget_refused = a.budget_refused.as_deref();
            f.cache = a.cache.as_deref();
            a.answer.add_facts(&mut f);
        }
        f
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        let Some(recorder) = self.recorder.take() else {
            return;
        };
        if let Some(a) = &self.admitted {
            a.stop_clock();
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
            self.request_id = crate::request_id::new_id();
        }
        let recorded = recorder.record(
            &self.facts(),
            End {
                status: self.client_status.unwrap_or(0),
                outcome,
                detail: Some(&detail),
                client_addr: self.client_addr.map(|a| a.to_string()),
                user_agent: None,
            },
        );
        // The budgets are settled too, if a runtime is still there to do it.
        let hold = self.admitted.as_mut().and_then(|a| a.budget.take());
        if let (Some(hold), Ok(runtime)) = (hold, tokio::runtime::Handle::try_current()) {
            runtime.spawn(hold.settle(recorded.settled.unwrap_or(0), None));
        }
    }
}
