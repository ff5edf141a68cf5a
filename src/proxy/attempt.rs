//! Upstream stage (`upstream_peer` through the response head): a request's attempts.
//! Which upstreams and keys it tried, the attempt under way (its in-flight count, its
//! half-open probe), and what each answer says of the upstream and the key (the breaker
//! verdicts).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora_core::{Error, ErrorType};
use pingora_http::ResponseHeader;

use super::retry::Budget;
use crate::metrics::Metrics;
use crate::route::{Pick, Route};

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
            .fetch_add(1, Ordering::Relaxed);
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
        upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
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

/// A request's attempts.
pub struct Tries {
    /// Upstreams and keys tried (bit i: index i).
    tried_upstreams: u64,
    tried_keys: u64,
    current: Option<Attempt>,
    /// The upstream answered a status tried again elsewhere; `error_while_proxy` lets
    /// Pingora retry.
    pub retry_status: Option<u16>,
    pub budget: Budget,
    /// When the current attempt was chosen.
    pub started: Instant,
}

impl Tries {
    pub fn new(max_attempts: usize) -> Tries {
        Tries {
            tried_upstreams: 0,
            tried_keys: 0,
            current: None,
            retry_status: None,
            budget: Budget::new(max_attempts),
            started: Instant::now(),
        }
    }

    /// Ends the previous attempt (if any) and starts the next one on the route's next
    /// upstream and key (round robin, then failover).
    pub fn next(&mut self, route: &Arc<Route>, metrics: &Metrics) -> Pick {
        self.current = None;
        let now = Instant::now();
        self.started = now;
        let (pick, seen) = route.pick(self.tried_upstreams, self.tried_keys, now);
        for (target, t) in seen {
            metrics.breaker_report(&route.name, &target, t);
        }
        self.tried_upstreams |= 1 << pick.upstream;
        if let Some(k) = pick.key {
            self.tried_keys |= 1 << k;
        }
        self.budget.attempts += 1;
        self.current = Some(Attempt::new(route.clone(), pick));
        pick
    }

    /// The current attempt's upstream and key.
    pub fn pick(&self) -> Option<Pick> {
        self.current.as_ref().map(|a| a.pick)
    }

    /// An upstream (or key, for 401/403/429) of the route is left untried for `status`.
    pub fn untried_for(&self, route: &Route, status: u16) -> bool {
        route.has_untried_for(status, self.tried_upstreams, self.tried_keys)
    }

    /// The picked upstream has no address yet: that counts against it like a refused
    /// connection, and the next one is tried while the budget lasts.
    pub fn unresolved(&mut self, route: &Route, pick: Pick, metrics: &Metrics) -> Box<Error> {
        self.judge_upstream(false, metrics);
        metrics.upstream_failure(&route.name, "unresolved");
        let host = &route.upstreams[pick.upstream].url.host;
        let why = format!("upstream {host} has no resolved address");
        let mut e = Error::explain(ErrorType::ConnectNoRoute, why);
        e.set_retry(super::retry::after_connect_failure(&self.budget));
        e.as_up();
        e
    }

    /// The current attempt's upstream answered well or failed.
    pub fn judge_upstream(&mut self, ok: bool, metrics: &Metrics) {
        let Some(a) = self.current.as_mut() else {
            return;
        };
        a.upstream_judged = true;
        let upstream = &a.route.upstreams[a.pick.upstream];
        if let Some(t) = upstream.breaker.verdict(ok, None, a.pick.upstream_gen) {
            metrics.breaker_report(&a.route.name, &upstream.label(), t);
        }
    }

    /// The current attempt's key was accepted or refused (`hold`: Retry-After).
    fn judge_key(&mut self, ok: bool, hold: Option<Duration>, metrics: &Metrics) {
        let Some(a) = self.current.as_mut() else {
            return;
        };
        let Some(slot) = a.route.key_slot(a.pick.key) else {
            return;
        };
        a.key_judged = true;
        if let Some(t) = slot.breaker.verdict(ok, hold, a.pick.key_gen) {
            metrics.breaker_report(&a.route.name, &slot.label, t);
        }
    }

    /// What an upstream's status says about it and about the key: 5xx is the upstream's
    /// failure; 429 the key's (set aside for the Retry-After); 401 and 403 count against
    /// the key; anything else is a success for both.
    pub fn judge_response(&mut self, status: u16, resp: &ResponseHeader, metrics: &Metrics) {
        match status {
            429 => {
                let hold = resp
                    .headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| crate::breaker::retry_after(v.as_bytes()));
                self.judge_upstream(true, metrics);
                self.judge_key(false, hold.or(Some(Duration::from_secs(1))), metrics);
            }
            401 | 403 => {
                self.judge_upstream(true, metrics);
                self.judge_key(false, None, metrics);
            }
            500..=599 => self.judge_upstream(false, metrics),
            _ => {
                self.judge_upstream(true, metrics);
                self.judge_key(true, None, metrics);
            }
        }
    }
}
