//! The limiter of one relay process: pingora-limits `Rate` estimators (sliding windows
//! made of two fixed ones) for the rates, and an `Inflight` counter whose guard frees a
//! concurrency slot when dropped. Counts are approximate by design (count-min sketches:
//! a collision can only over-count), and each relay of a fleet counts alone.

use std::time::{Duration, Instant};

use pingora_limits::inflight::{Guard, Inflight};
use pingora_limits::rate::{Rate, RateComponents};

use async_trait::async_trait;

use super::Limits;
use super::{Admission, Budget, LimitKind, Limiter, Refused};

/// How often [`super::LimiterClock`] turns the windows over: a window ends at most this
/// late, and a wait that crosses a window's end is given this much more.
pub const TICK: Duration = Duration::from_millis(100);

pub struct LocalLimiter {
    per_second: Rate,
    per_minute: Rate,
    tokens_per_minute: Rate,
    inflight: Inflight,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        LocalLimiter::with_token_window(Duration::from_secs(60))
    }
}

impl LocalLimiter {
    /// A limiter whose token windows last `window` (a minute in service; shorter in
    /// tests, which cannot wait for a minute to pass).
    fn with_token_window(window: Duration) -> Self {
        LocalLimiter {
            per_second: Rate::new(Duration::from_secs(1)),
            per_minute: Rate::new(Duration::from_secs(60)),
            tokens_per_minute: Rate::new(window),
            inflight: Inflight::new(),
        }
    }
}

/// What the window arithmetic needs of a `Rate` (whose own components cannot be made
/// outside pingora-limits, so the tests make these).
#[derive(Debug, Clone, Copy)]
struct Window {
    prev: f64,
    curr: f64,
    interval: Duration,
    /// How far into the current window now is, 0 to 1.
    fraction: f64,
}

impl From<RateComponents> for Window {
    fn from(c: RateComponents) -> Window {
        Window {
            prev: c.prev_samples as f64,
            curr: c.curr_samples as f64,
            interval: c.interval,
            fraction: c.current_interval_fraction,
        }
    }
}

/// Events in the sliding window ending now: the current window plus the part of the
/// previous one that the sliding window still covers.
fn sliding(c: Window) -> f64 {
    c.prev * (1.0 - c.fraction) + c.curr
}

/// Time until a sliding window over `rate` has room for `need` more events under
/// `limit`, estimated from how its count decays (the previous window's part fades
/// linearly over the current one).
fn wait_for_room(c: &Window, limit: f64, need: f64) -> Duration {
    let over = sliding(*c) + need - limit;
    if over <= 0.0 {
        return Duration::ZERO;
    }
    let interval = c.interval.as_secs_f64();
    let left_in_window = interval * (1.0 - c.fraction);
    let prev_rate = c.prev / interval;
    if prev_rate > 0.0 && over <= prev_rate * left_in_window {
        // `Rate` measures time in whole milliseconds: one (and a rounding) to spare.
        return Duration::from_secs_f64(over / prev_rate) + Duration::from_millis(2);
    }
    // The current window's own events leave over the next window, which begins at most
    // a tick after this one ends.
    let curr_rate = c.curr.max(1.0) / interval;
    Duration::from_secs_f64(
        left_in_window + (over - prev_rate * left_in_window).max(0.0) / curr_rate,
    )
    .min(c.interval * 2)
        + TICK
}

/// One rate check: count `n` events for `key`, or refuse and count nothing. With the
/// budget comes the end of the window the events were counted in: an estimate on the
/// early side (time before the count is taken off), so that before it the events are
/// surely still in the current window.
fn take(rate: &Rate, key: &str, n: u64, limit: u64) -> Result<(Budget, Instant), Duration> {
    let before = Instant::now();
    let n = n as isize;
    rate.observe(&key, n);
    let c = rate.rate_with(&key, |c| c);
    let used = sliding(c.into());
    if used > limit as f64 {
        rate.observe(&key, -n);
        let c = rate.rate_with(&key, |c| c);
        let wait = wait_for_room(&c.into(), limit as f64, n as f64);
        return Err(wait.max(Duration::from_millis(1)));
    }
    let left_in_window = c.interval.mul_f64(1.0 - c.current_interval_fraction);
    // The count is never below what was just added unless the window turned between
    // `observe` and `rate_with`: then the events sit in a window that has already ended.
    let window_ends = if c.curr_samples < n {
        before
    } else {
        // Rate measures in whole milliseconds: keep one (and a rounding) to spare.
        (before + left_in_window)
            .checked_sub(Duration::from_millis(2))
            .unwrap_or(before)
    };
    Ok((
        Budget {
            limit,
            remaining: (limit as f64 - used).max(0.0) as u64,
            reset: left_in_window,
        },
        window_ends,
    ))
}

#[async_trait]
impl Limiter for LocalLimiter {
    async fn admit(
        &self,
        tenant: &str,
        _request_id: &str,
        limits: &Limits,
        tokens: u64,
    ) -> Result<Admission, Refused> {
        self.admit_now(tenant, limits, tokens)
    }

    async fn settle(
        &self,
        tenant: &str,
        limits: &Limits,
        admission: Admission,
        actual: Option<u64>,
    ) {
        self.settle_now(tenant, limits, &admission, actual);
    }

    fn tick(&self) {
        for rate in [&self.per_second, &self.per_minute, &self.tokens_per_minute] {
            turn(rate);
        }
    }
}

/// Lets `rate` start its next window if the current one has ended (reading it is what
/// turns it over).
fn turn(rate: &Rate) {
    rate.rate_with(&(), |_| ());
}

/// The rate checks an admission has passed so far: each is undone when a later check
/// refuses, so that a refused request counts nowhere.
struct Taken<'a> {
    tenant: &'a str,
    rates: Vec<(&'a Rate, isize)>,
}

impl<'a> Taken<'a> {
    fn new(tenant: &'a str) -> Self {
        Taken {
            tenant,
            rates: Vec::with_capacity(3),
        }
    }

    fn push(&mut self, rate: &'a Rate, n: isize) {
        self.rates.push((rate, n));
    }

    /// Undoes every check passed and says why the request is refused.
    fn refuse(
        &mut self,
        kind: LimitKind,
        retry_after: Duration,
        requests: Option<Budget>,
        tokens: Option<Budget>,
    ) -> Refused {
        for (rate, n) in self.rates.drain(..) {
            rate.observe(&self.tenant, -n);
        }
        Refused {
            kind,
            retry_after,
            requests,
            tokens,
        }
    }
}

impl LocalLimiter {
    pub fn admit_now(
        &self,
        tenant: &str,
        limits: &Limits,
        tokens: u64,
    ) -> Result<Admission, Refused> {
        if let Some(refused) = super::exceeds_limit(limits, tokens) {
            return Err(refused);
        }
        let mut taken = Taken::new(tenant);
        let longest = |r| self.longest_wait(tenant, limits, tokens, r);
        let requests = self.take_requests(limits, &mut taken).map_err(longest)?;
        let (token_budget, window_ends) = self
            .take_tokens(limits, tokens, requests, &mut taken)
            .map_err(longest)?;
        let slot = self.take_slot(limits, requests, token_budget, &mut taken)?;
        Ok(Admission {
            reserved_tokens: if limits.tokens_per_minute.is_some() {
                tokens
            } else {
                0
            },
            slot,
            shared: None,
            window_ends,
            requests,
            tokens: token_budget,
        })
    }

    /// A rate refusal made to carry the longest wait of every rate limit the request
    /// does not fit now (the first check to refuse need not be the slowest to clear), so
    /// that a client that waits it fits them all.
    fn longest_wait(&self, tenant: &str, limits: &Limits, tokens: u64, mut r: Refused) -> Refused {
        for (rate, limit, n, kind) in [
            (
                &self.per_second,
                limits.requests_per_second,
                1,
                LimitKind::RequestsPerSecond,
            ),
            (
                &self.per_minute,
                limits.requests_per_minute,
                1,
                LimitKind::RequestsPerMinute,
            ),
            (
                &self.tokens_per_minute,
                limits.tokens_per_minute,
                tokens,
                LimitKind::TokensPerMinute,
            ),
        ] {
            let Some(limit) = limit else {
                continue;
            };
            let c = rate.rate_with(&tenant, |c| c);
            let wait = wait_for_room(&c.into(), limit as f64, n as f64);
            if wait > r.retry_after {
                let b = Some(Budget {
                    limit,
                    remaining: 0,
                    reset: wait,
                });
                if kind == LimitKind::TokensPerMinute {
                    r.tokens = b;
                } else {
                    r.requests = b;
                }
                r.kind = kind;
                r.retry_after = wait;
            }
        }
        r
    }

    /// The request-rate checks, per second then per minute: the budget left of the
    /// tightest one passed.
    fn take_requests<'a>(
        &'a self,
        limits: &Limits,
        taken: &mut Taken<'a>,
    ) -> Result<Option<Budget>, Refused> {
        let mut requests = None;
        for (rate, limit, kind) in [
            (
                &self.per_second,
                limits.requests_per_second,
                LimitKind::RequestsPerSecond,
            ),
            (
                &self.per_minute,
                limits.requests_per_minute,
                LimitKind::RequestsPerMinute,
            ),
        ] {
            let Some(limit) = limit else {
                continue;
            };
            match take(rate, taken.tenant, 1, limit) {
                Ok((b, _)) => {
                    // The tighter budget is the one a client should see.
                    if requests
                        .as_ref()
                        .is_none_or(|r: &Budget| b.remaining < r.remaining)
                    {
                        requests = Some(b);
                    }
                    taken.push(rate, 1);
                }
                Err(wait) => {
                    let b = Budget {
                        limit,
                        remaining: 0,
                        reset: wait,
                    };
                    return Err(taken.refuse(kind, wait, Some(b), None));
                }
            }
        }
        Ok(requests)
    }

    /// The token reservation: its budget and the end of the window it was counted in.
    fn take_tokens<'a>(
        &'a self,
        limits: &Limits,
        tokens: u64,
        requests: Option<Budget>,
        taken: &mut Taken<'a>,
    ) -> Result<(Option<Budget>, Option<Instant>), Refused> {
        let Some(limit) = limits.tokens_per_minute else {
            return Ok((None, None));
        };
        match take(&self.tokens_per_minute, taken.tenant, tokens, limit) {
            Ok((b, ends)) => {
                taken.push(&self.tokens_per_minute, tokens as isize);
                Ok((Some(b), Some(ends)))
            }
            Err(wait) => {
                let b = Budget {
                    limit,
                    remaining: 0,
                    reset: wait,
                };
                Err(taken.refuse(LimitKind::TokensPerMinute, wait, requests, Some(b)))
            }
        }
    }

    /// A concurrency slot, held until the request ends.
    fn take_slot(
        &self,
        limits: &Limits,
        requests: Option<Budget>,
        tokens: Option<Budget>,
        taken: &mut Taken<'_>,
    ) -> Result<Option<Guard>, Refused> {
        let Some(limit) = limits.concurrent_requests else {
            return Ok(None);
        };
        let (guard, now_open) = self.inflight.incr(taken.tenant, 1);
        if now_open as u64 > limit {
            drop(guard);
            // A slot frees when a request ends; there is no schedule to point to.
            return Err(taken.refuse(
                LimitKind::Concurrency,
                Duration::from_secs(1),
                requests,
                tokens,
            ));
        }
        Ok(Some(guard))
    }

    /// Settles a reservation with the tokens used (`None`: unknown, the estimate stands).
    /// Tokens used beyond the estimate count in the current window. Unused ones go back
    /// only into the window they were reserved in, and never take its count below zero:
    /// once that window has ended they are not given back at all, since subtracted from
    /// a later window they would let the tenant spend them twice (a long request
    /// settling a minute later would open room for more than the limit).
    pub fn settle_now(
        &self,
        tenant: &str,
        limits: &Limits,
        admission: &Admission,
        actual: Option<u64>,
    ) {
        let reserved = admission.reserved_tokens;
        if limits.tokens_per_minute.is_none() || reserved == 0 {
            return;
        }
        let Some(actual) = actual else {
            return;
        };
        let rate = &self.tokens_per_minute;
        if actual >= reserved {
            if actual > reserved {
                rate.observe(&tenant, (actual - reserved) as isize);
            }
            return;
        }
        let same_window = admission
            .window_ends
            .is_some_and(|ends| Instant::now() < ends);
        if !same_window {
            return;
        }
        let held = rate.rate_with(&tenant, |c| c.curr_samples).max(0) as u64;
        let back = (reserved - actual).min(held);
        if back == 0 {
            return;
        }
        let now = rate.observe(&tenant, -(back as isize));
        if now < 0 {
            // The window turned between the check and the subtraction: the later window
            // keeps no credit.
            rate.observe(&tenant, -now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused by the per-second limit while the per-minute one is full too: the wait
    /// given is the minute's, not the second's (waiting a second would be refused again).
    #[test]
    fn the_wait_given_is_the_longest_of_the_limits_the_request_does_not_fit() {
        let l = LocalLimiter::default();
        let limits = Limits {
            requests_per_second: Some(1),
            requests_per_minute: Some(1),
            ..Default::default()
        };
        assert!(l.admit_now("t", &limits, 0).is_ok());
        let Err(r) = l.admit_now("t", &limits, 0) else {
            panic!("admitted")
        };
        assert_eq!(r.kind, LimitKind::RequestsPerMinute);
        assert!(
            r.retry_after > Duration::from_secs(50),
            "{:?}",
            r.retry_after
        );
        assert_eq!(r.requests.unwrap().reset, r.retry_after);
        // Tokens: a full token minute outlasts a request second.
        let tokens = Limits {
            requests_per_second: Some(1),
            tokens_per_minute: Some(100),
            ..Default::default()
        };
        assert!(l.admit_now("u", &tokens, 100).is_ok());
        let Err(r) = l.admit_now("u", &tokens, 50) else {
            panic!("admitted")
        };
        assert_eq!(r.kind, LimitKind::TokensPerMinute);
        assert!(
            r.retry_after > Duration::from_secs(50),
            "{:?}",
            r.retry_after
        );
    }

    /// A client refused by a rate limit that waits the time it was told is admitted: on
    /// a fresh limiter (6 a "minute"), and under a limit of 2 used up round after round.
    /// The window is turned over once it has ended, as the limiter clock does, and the
    /// retry comes a whole tick after that (the latest the clock may turn it).
    #[test]
    fn a_client_that_waits_its_retry_after_is_admitted() {
        let window = Duration::from_millis(1200);
        for (limit, rounds) in [(6u64, 1), (2, 3)] {
            let rate = Rate::new(window);
            for round in 0..rounds {
                let wait = loop {
                    if let Err(w) = take(&rate, "t", 1, limit) {
                        break w;
                    }
                };
                // Never more than the two windows a count can weigh in.
                assert!(wait <= window * 2 + TICK, "limit {limit}: wait {wait:?}");
                let c = rate.rate_with(&"t", |c| c);
                let left = c.interval.mul_f64(1.0 - c.current_interval_fraction);
                if wait >= left + TICK {
                    std::thread::sleep(left + Duration::from_millis(1));
                    turn(&rate);
                    std::thread::sleep(wait - left - TICK + Duration::from_millis(5));
                } else {
                    std::thread::sleep(wait);
                }
                assert!(
                    take(&rate, "t", 1, limit).is_ok(),
                    "limit {limit}, round {round}: refused after waiting {wait:?}"
                );
            }
        }
    }

    /// The sliding count `t` after the moment `c` describes, with nothing more counted,
    /// on a clock that turns each window over exactly at its end.
    fn count_after(c: &Window, t: Duration) -> f64 {
        let interval = c.interval.as_secs_f64();
        let at = c.fraction + t.as_secs_f64() / interval;
        let (prev, curr) = (c.prev, c.curr);
        match at {
            at if at < 1.0 => prev * (1.0 - at) + curr,
            at if at < 2.0 => curr * (2.0 - at),
            _ => 0.0,
        }
    }

    proptest::proptest! {
        /// Issue 17's property: for any state of the two windows and any moment into the
        /// current one, a request refused now fits once its wait has passed, and the wait
        /// is never longer than the two windows a count can weigh in (plus the clock's
        /// tick). The clock is the test's: the state is given, and time is a number.
        #[test]
        fn the_wait_given_is_enough_for_any_moment(
            prev in 0isize..200,
            curr in 0isize..200,
            fraction in 0.0f64..1.0,
            limit in 1u64..150,
            need in 1u64..10,
            window_ms in proptest::sample::select(vec![1000u64, 60_000]),
        ) {
            let c = Window {
                prev: prev as f64,
                curr: curr as f64,
                interval: Duration::from_millis(window_ms),
                fraction,
            };
            proptest::prop_assume!(need <= limit);
            proptest::prop_assume!(sliding(c) + need as f64 > limit as f64);
            let wait = wait_for_room(&c, limit as f64, need as f64);
            proptest::prop_assert!(wait <= c.interval * 2 + TICK, "wait {:?}", wait);
            let after = count_after(&c, wait);
            proptest::prop_assert!(
                after + need as f64 <= limit as f64 + 1e-6,
                "refused again after {:?}: {} + {} > {}", wait, after, need, limit
            );
        }
    }

    fn limits(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u64>) -> Limits {
        Limits {
            requests_per_second: None,
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            concurrent_requests: conc,
        }
    }

    #[test]
    fn requests_per_minute_hold() {
        let l = LocalLimiter::default();
        let lim = limits(Some(5), None, None);
        let admitted = (0..8).filter(|_| l.admit_now("t", &lim, 0).is_ok()).count();
        assert_eq!(admitted, 5);
        let r = l.admit_now("t", &lim, 0).err().unwrap();
        assert_eq!(r.kind, LimitKind::RequestsPerMinute);
        assert!(r.retry_after > Duration::ZERO && r.retry_after <= Duration::from_secs(120));
        // Another tenant has its own budget.
        assert!(l.admit_now("u", &lim, 0).is_ok());
    }

    #[test]
    fn token_reservations_are_settled() {
        let l = LocalLimiter::default();
        let lim = limits(None, Some(1000), None);
        let a = l.admit_now("t", &lim, 600).ok().unwrap();
        assert_eq!(a.reserved_tokens, 600);
        assert_eq!(a.tokens.unwrap().remaining, 400);
        // A second request of the same estimate does not fit.
        assert_eq!(
            l.admit_now("t", &lim, 600).err().unwrap().kind,
            LimitKind::TokensPerMinute
        );
        // The first used only 100: 900 are free again.
        l.settle_now("t", &lim, &a, Some(100));
        let b = l.admit_now("t", &lim, 600).ok().unwrap();
        assert_eq!(b.tokens.unwrap().remaining, 300);
    }

    /// A request reserves 900 of 1000 tokens and ends, having used none, after its
    /// window has turned. Giving the 900 back then would take the new window to -900
    /// and let the tenant spend 1900 tokens in it.
    #[test]
    fn unused_tokens_never_go_back_into_a_later_window() {
        let window = Duration::from_millis(400);
        let l = LocalLimiter::with_token_window(window);
        let lim = limits(None, Some(1000), None);
        let a = l.admit_now("t", &lim, 900).ok().unwrap();
        assert!(a.window_ends.unwrap() <= Instant::now() + window);
        // Sleeping a whole window always passes the end of the one it was counted in;
        // half a window more puts the settlement well into a later one.
        std::thread::sleep(window.mul_f64(1.5));
        l.settle_now("t", &lim, &a, Some(0));
        let c = l.tokens_per_minute.rate_with(&"t", |c| c);
        assert_eq!(c.curr_samples, 0, "no credit in the later window");
        let mut admitted = 0;
        for _ in 0..30 {
            if l.admit_now("t", &lim, 100).is_ok() {
                admitted += 100;
            }
        }
        let after = l.tokens_per_minute.rate_with(&"t", |c| c);
        // Counted within one window (a turn during the loop would reset the fraction).
        if after.current_interval_fraction >= c.current_interval_fraction {
            assert!(admitted <= 1000, "admitted {admitted} tokens in one window");
            assert!(after.curr_samples <= 1000);
        }
    }

    /// A settlement gives back at most what its window holds.
    #[test]
    fn a_settlement_never_takes_a_window_below_zero() {
        let l = LocalLimiter::default();
        let lim = limits(None, Some(1000), None);
        let mut a = l.admit_now("t", &lim, 600).ok().unwrap();
        // As if more had been reserved than the window holds (a count lost to a turn).
        a.reserved_tokens = 5000;
        l.settle_now("t", &lim, &a, Some(0));
        let c = l.tokens_per_minute.rate_with(&"t", |c| c);
        assert_eq!(c.curr_samples, 0);
        // And the budget is exactly the limit again, not more.
        let b = l.admit_now("t", &lim, 1000).ok().unwrap();
        assert_eq!(b.tokens.unwrap().remaining, 0);
        assert_eq!(
            l.admit_now("t", &lim, 1).err().unwrap().kind,
            LimitKind::TokensPerMinute
        );
    }

    #[test]
    fn an_estimate_over_the_limit_is_refused_for_good_and_counts_nothing() {
        let l = LocalLimiter::default();
        let lim = Limits {
            requests_per_second: Some(100),
            ..limits(Some(2), Some(1000), None)
        };
        let r = l.admit_now("t", &lim, 2000).err().unwrap();
        assert_eq!(r.kind, LimitKind::ExceedsLimit);
        assert_eq!(r.kind.label(), "tokens_exceed_limit");
        assert!(!r.kind.is_tokens());
        // Exactly the limit is still admissible, and the refusal took no request count.
        let ok = l.admit_now("t", &lim, 1000).ok().unwrap();
        assert_eq!(ok.requests.unwrap().remaining, 1);
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let l = LocalLimiter::default();
        let lim = limits(Some(10), Some(100), None);
        assert!(l.admit_now("t", &lim, 90).is_ok());
        // Refused on tokens: its request count is given back.
        for _ in 0..20 {
            assert!(l.admit_now("t", &lim, 50).is_err());
        }
        let ok = l.admit_now("t", &lim, 5).ok().unwrap();
        assert_eq!(ok.requests.unwrap().remaining, 8);
    }

    #[test]
    fn concurrency_slots_free_on_drop() {
        let l = LocalLimiter::default();
        let lim = limits(None, None, Some(2));
        let a = l.admit_now("t", &lim, 0).ok().unwrap();
        let b = l.admit_now("t", &lim, 0).ok().unwrap();
        assert_eq!(
            l.admit_now("t", &lim, 0).err().unwrap().kind,
            LimitKind::Concurrency
        );
        drop(a);
        let c = l.admit_now("t", &lim, 0);
        assert!(c.is_ok());
        drop((b, c));
    }
}
