//! Failover stage (`upstream_peer`, `fail_to_connect`, `upstream_response_filter`,
//! `error_while_proxy`): whether a failed attempt is tried again. Pure rules over what is
//! known of the attempt, each with its own test; the hooks gather the facts and apply the
//! verdict.

use std::time::Duration;

use pingora_core::{Error, ErrorSource, ErrorType, RetryType};

/// A reused upstream connection that the upstream closes or resets this soon after its
/// attempt began, before any response byte, was stale (closed by the upstream while
/// pooled: the keep-alive race), not working on the request. Long enough for a round trip
/// to a distant region, short enough that a provider rarely has started billable work.
pub const STALE_POOLED_WITHIN: Duration = Duration::from_millis(500);

/// Stale pooled connections one request may meet and be sent again from, on top of the
/// route's attempt budget: a single-upstream route (budget one) must still survive an
/// upstream closing idle keep-alive connections. Pingora's pool drops connections it sees
/// closed, so meeting a second one at once is rare.
pub const STALE_RETRIES: u8 = 1;

/// A request's attempts: made, allowed, and sent again from a stale connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub attempts: usize,
    pub max: usize,
    pub stale_retries: u8,
}

impl Budget {
    pub fn new(max: usize) -> Budget {
        Budget {
            attempts: 0,
            max,
            stale_retries: 0,
        }
    }

    /// Another attempt is allowed.
    pub fn left(&self) -> bool {
        self.attempts < self.max
    }

    /// An attempt met a stale pooled connection: it goes again without counting
    /// against the route's budget (nothing reached the upstream).
    pub fn stale_again(&mut self) {
        self.stale_retries += 1;
        self.max += 1;
    }
}

/// A connection that could not be made (or an upstream with no address yet): nothing
/// reached the upstream, so moving on is always safe while the budget lasts.
pub fn after_connect_failure(b: &Budget) -> bool {
    b.left()
}

/// An answered status the route tries elsewhere (`retry_on`): nothing reached the
/// client and the upstream did no work. Tried again when the budget lasts, an upstream
/// (or key, for 401/403/429) is left untried, and the body can be sent again.
pub fn after_status(
    retried_status: bool,
    b: &Budget,
    untried_left: bool,
    replayable: bool,
) -> bool {
    retried_status && b.left() && untried_left && replayable
}

/// The error that makes Pingora try a status of `retry_on` again elsewhere.
pub fn status_error(status: u16) -> Box<Error> {
    let why = format!("upstream answered {status}; trying another upstream or key");
    let mut e = Error::explain(ErrorType::HTTPStatus(status), why);
    e.as_up();
    e.set_retry(true);
    e
}

/// What is known of an attempt that failed while it was proxied.
#[derive(Debug, Clone, Copy)]
pub struct Failed {
    /// It ran on a pooled (reused) connection.
    pub reused: bool,
    /// The connection gave out while the response head was awaited (closed, reset, or
    /// a write failed).
    pub gave_out: bool,
    /// The failure is the upstream's side.
    pub from_upstream: bool,
    /// A response head had come.
    pub answered: bool,
    /// Since the attempt began.
    pub elapsed: Duration,
    /// A deadline ended it.
    pub stalled: bool,
    /// The request body can be sent again (Pingora's retry buffer holds it whole).
    pub replayable: bool,
}

impl Failed {
    /// What Pingora's error says: Pingora marks `ReusedOnly` the errors where a
    /// connection gave out while the response head was awaited (closed, or reset); a
    /// write failing is a reset too.
    pub fn of(
        e: &Error,
        reused: bool,
        answered: bool,
        elapsed: Duration,
        stalled: bool,
        replayable: bool,
    ) -> Failed {
        Failed {
            reused,
            gave_out: matches!(e.retry, RetryType::ReusedOnly)
                || e.etype() == &ErrorType::WriteError,
            from_upstream: e.esource() == &ErrorSource::Upstream,
            answered,
            elapsed,
            stalled,
            replayable,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A stale pooled connection: sent again on a new one, past the budget.
    Stale,
    /// Tried again (the route accepts that the upstream may have started the work).
    Again,
    /// Not tried again.
    Stop,
}

/// A failure while proxied. A pooled connection the upstream had already closed fails
/// at once, before any response byte: the request was not processed, so it is sent again
/// on a new connection, even past the attempt budget. One that failed after a while may
/// have been working on the request; anything else may have started paid work upstream
/// and is never sent twice unless the route says so (`retry_after_send`).
pub fn after_error(f: &Failed, b: &Budget, retry_after_send: bool) -> Verdict {
    let fresh = !f.answered && f.replayable && !f.stalled;
    if f.reused
        && f.gave_out
        && f.from_upstream
        && fresh
        && f.elapsed < STALE_POOLED_WITHIN
        && b.stale_retries < STALE_RETRIES
    {
        Verdict::Stale
    } else if retry_after_send && fresh && b.left() {
        Verdict::Again
    } else {
        Verdict::Stop
    }
}

/// A failure before a response head counts against the upstream's breaker when it is
/// the upstream's (not a client that went away, not a stale pooled connection).
pub fn marks_upstream(f: &Failed, v: Verdict) -> bool {
    v != Verdict::Stale && !f.answered && f.from_upstream
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(attempts: usize, max: usize) -> Budget {
        Budget {
            attempts,
            max,
            stale_retries: 0,
        }
    }

    /// A reset on a pooled connection right after sending, nothing answered.
    fn stale() -> Failed {
        Failed {
            reused: true,
            gave_out: true,
            from_upstream: true,
            answered: false,
            elapsed: Duration::from_millis(3),
            stalled: false,
            replayable: true,
        }
    }

    #[test]
    fn a_connect_failure_moves_on_while_the_budget_lasts() {
        assert!(after_connect_failure(&budget(1, 3)));
        assert!(after_connect_failure(&budget(2, 3)));
        assert!(!after_connect_failure(&budget(3, 3)));
        assert!(!after_connect_failure(&budget(1, 1)));
    }

    #[test]
    fn a_retried_status_needs_budget_an_untried_target_and_the_body() {
        assert!(after_status(true, &budget(1, 2), true, true));
        assert!(
            !after_status(false, &budget(1, 2), true, true),
            "status not in retry_on"
        );
        assert!(
            !after_status(true, &budget(2, 2), true, true),
            "budget spent"
        );
        assert!(!after_status(true, &budget(1, 2), false, true), "all tried");
        assert!(!after_status(true, &budget(1, 2), true, false), "body gone");
    }

    #[test]
    fn a_stale_pooled_connection_goes_again_past_the_budget_once() {
        let mut b = budget(1, 1);
        assert_eq!(after_error(&stale(), &b, false), Verdict::Stale);
        b.stale_again();
        assert_eq!(b.max, 2);
        assert!(b.left(), "the attempt goes again");
        // The second one in the same request is not stale any more: it stops.
        b.attempts = 2;
        assert_eq!(after_error(&stale(), &b, false), Verdict::Stop);
    }

    #[test]
    fn only_a_prompt_failure_of_a_pooled_connection_is_stale() {
        let b = budget(1, 1);
        let cases = [
            Failed {
                reused: false,
                ..stale()
            },
            Failed {
                gave_out: false,
                ..stale()
            },
            Failed {
                from_upstream: false,
                ..stale()
            },
            Failed {
                answered: true,
                ..stale()
            },
            Failed {
                elapsed: STALE_POOLED_WITHIN,
                ..stale()
            },
            Failed {
                stalled: true,
                ..stale()
            },
            Failed {
                replayable: false,
                ..stale()
            },
        ];
        for f in cases {
            assert_eq!(after_error(&f, &b, false), Verdict::Stop, "{f:?}");
        }
    }

    #[test]
    fn after_send_only_when_the_route_accepts_it() {
        let slow = Failed {
            elapsed: Duration::from_secs(2),
            ..stale()
        };
        assert_eq!(after_error(&slow, &budget(1, 2), false), Verdict::Stop);
        assert_eq!(after_error(&slow, &budget(1, 2), true), Verdict::Again);
        assert_eq!(
            after_error(&slow, &budget(2, 2), true),
            Verdict::Stop,
            "budget spent"
        );
        let answered = Failed {
            answered: true,
            ..slow
        };
        assert_eq!(after_error(&answered, &budget(1, 2), true), Verdict::Stop);
        let stalled = Failed {
            stalled: true,
            ..slow
        };
        assert_eq!(after_error(&stalled, &budget(1, 2), true), Verdict::Stop);
        let gone = Failed {
            replayable: false,
            ..slow
        };
        assert_eq!(after_error(&gone, &budget(1, 2), true), Verdict::Stop);
    }

    #[test]
    fn the_upstream_is_marked_for_its_own_failures_before_an_answer() {
        let slow = Failed {
            elapsed: Duration::from_secs(2),
            ..stale()
        };
        assert!(marks_upstream(&slow, Verdict::Stop));
        assert!(!marks_upstream(&stale(), Verdict::Stale));
        assert!(!marks_upstream(
            &Failed {
                answered: true,
                ..slow
            },
            Verdict::Stop
        ));
        assert!(!marks_upstream(
            &Failed {
                from_upstream: false,
                ..slow
            },
            Verdict::Stop
        ));
    }
}
