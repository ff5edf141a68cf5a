//! Circuit breakers for upstreams and provider keys (`upstream_peer` asks, the response
//! hooks and the health checker report). Closed: used. After `failures` failures in a row, or at once for a
//! provider 429 with `Retry-After`: open, skipped for `open_for` (or the Retry-After).
//! Then half-open: one request probes it; success closes it, failure opens it again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A breaker's settings, from `routes[].breaker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures: u32,
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 3,
            open_for: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { fails: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// What a breaker lets through now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Closed: use it.
    Yes,
    /// Half-open: this request is the probe.
    Probe,
    /// Open (or its probe is out) until then.
    No { until: Instant },
}

/// A state change, to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    HalfOpened,
    Closed,
}

impl Transition {
    pub fn label(self) -> &'static str {
        match self {
            Transition::Opened => "open",
            Transition::HalfOpened => "half_open",
            Transition::Closed => "closed",
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: Mutex<State>,
    /// Closed with no failure counted: the common case, answered without the lock.
    healthy: AtomicBool,
    /// How many times it has opened. A verdict carries the generation its request was
    /// picked in: one from before the breaker opened does not close or reopen it.
    generation: AtomicU64,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            state: Mutex::new(State::Closed { fails: 0 }),
            healthy: AtomicBool::new(true),
            generation: AtomicU64::new(0),
        }
    }

    fn state(&self) -> Guard<'_> {
        Guard {
            state: self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            healthy: &self.healthy,
        }
    }

    /// May a request use it now? A `Probe` answer claims the half-open probe.
    pub fn check(&self, now: Instant) -> (Pass, Option<Transition>) {
        if self.healthy.load(Ordering::Acquire) {
            return (Pass::Yes, None);
        }
        let mut s = self.state();
        match *s {
            State::Closed { .. } => (Pass::Yes, None),
            State::Open { until } if now < until => (Pass::No { until }, None),
            State::Open { .. } => {
                *s = State::HalfOpen { probing: true };
                (Pass::Probe, Some(Transition::HalfOpened))
            }
            State::HalfOpen { probing: false } => {
                *s = State::HalfOpen { probing: true };
                (Pass::Probe, None)
            }
            State::HalfOpen { probing: true } => (
                Pass::No {
                    until: now + Duration::from_millis(100),
                },
                None,
            ),
        }
    }

    /// A request picked in generation `gen` answered well (`ok`) or failed (`hold`: open
    /// at once for this long, a provider's `Retry-After`).
    pub fn verdict(&self, ok: bool, hold: Option<Duration>, gen: u64) -> Option<Transition> {
        if ok {
            self.success_since(gen)
        } else {
            self.failure_since(Instant::now(), hold, gen)
        }
    }

    /// The generation a request picked now belongs to.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// It answered well (a health check: now).
    pub fn success(&self) -> Option<Transition> {
        self.success_since(self.generation())
    }

    /// A request picked in generation `gen` got a good answer.
    pub fn success_since(&self, gen: u64) -> Option<Transition> {
        if self.healthy.load(Ordering::Acquire) {
            return None;
        }
        let mut s = self.state();
        match *s {
            State::Closed { fails: 0 } => None,
            State::Closed { .. } => {
                *s = State::Closed { fails: 0 };
                None
            }
            // Started before it opened: says nothing about it now.
            State::HalfOpen { .. } | State::Open { .. } if gen != self.generation() => None,
            State::HalfOpen { .. } | State::Open { .. } => {
                *s = State::Closed { fails: 0 };
                Some(Transition::Closed)
            }
        }
    }

    /// It failed (a health check: now). `hold`: open now for this long (a provider's
    /// `Retry-After`).
    pub fn failure(&self, now: Instant, hold: Option<Duration>) -> Option<Transition> {
        self.failure_since(now, hold, self.generation())
    }

    /// A request picked in generation `gen` failed.
    pub fn failure_since(
        &self,
        now: Instant,
        hold: Option<Duration>,
        gen: u64,
    ) -> Option<Transition> {
        let mut s = self.state();
        let open_for = hold.unwrap_or(self.config.open_for);
        match *s {
            State::Closed { fails } if fails + 1 < self.config.failures && hold.is_none() => {
                *s = State::Closed { fails: fails + 1 };
                None
            }
            State::HalfOpen { .. } if gen != self.generation() => None,
            State::Closed { .. } | State::HalfOpen { .. } => {
                *s = State::Open {
                    until: now + open_for,
                };
                self.generation.fetch_add(1, Ordering::AcqRel);
                Some(Transition::Opened)
            }
            State::Open { until } => {
                *s = State::Open {
                    until: until.max(now + open_for),
                };
                None
            }
        }
    }

    /// A probe picked in generation `gen` ended without a verdict (the client left
    /// first): another may probe.
    pub fn release_probe(&self, gen: u64) {
        let mut s = self.state();
        if gen != self.generation() {
            return;
        }
        if *s == (State::HalfOpen { probing: true }) {
            *s = State::HalfOpen { probing: false };
        }
    }

    /// 0 closed, 1 half-open, 2 open (for the gauge).
    pub fn level(&self) -> i64 {
        match *self.state() {
            State::Closed { .. } => 0,
            State::HalfOpen { .. } => 1,
            State::Open { .. } => 2,
        }
    }
}

/// The state under its lock; on release, `healthy` is set to whether it is closed with
/// no failure counted.
struct Guard<'a> {
    state: std::sync::MutexGuard<'a, State>,
    healthy: &'a AtomicBool,
}

impl std::ops::Deref for Guard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.healthy.store(
            *self.state == (State::Closed { fails: 0 }),
            Ordering::Release,
        );
    }
}

/// The seconds of a `Retry-After` header (delay form; dates are not used by the LLM
/// providers), capped at an hour.
pub fn retry_after(value: &[u8]) -> Option<Duration> {
    let secs: f64 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failures: 2,
            open_for: Duration::from_secs(10),
        })
    }

    #[test]
    fn opens_after_failures_probes_then_closes() {
        let b = breaker();
        let t = Instant::now();
        assert_eq!(b.check(t).0, Pass::Yes);
        assert_eq!(b.failure(t, None), None);
        assert_eq!(b.failure(t, None), Some(Transition::Opened));
        assert!(matches!(b.check(t).0, Pass::No { .. }));
        let later = t + Duration::from_secs(11);
        assert_eq!(b.check(later), (Pass::Probe, Some(Transition::HalfOpened)));
        // One probe at a time.
        assert!(matches!(b.check(later).0, Pass::No { .. }));
        assert_eq!(b.success(), Some(Transition::Closed));
        assert_eq!(b.check(later).0, Pass::Yes);
    }

    #[test]
    fn a_failed_probe_opens_again_and_a_success_resets_the_count() {
        let b = breaker();
        let t = Instant::now();
        b.failure(t, None);
        b.success();
        assert_eq!(b.failure(t, None), None, "the count started over");
        b.failure(t, None);
        let later = t + Duration::from_secs(11);
        assert_eq!(b.check(later).0, Pass::Probe);
        assert_eq!(b.failure(later, None), Some(Transition::Opened));
        assert!(matches!(b.check(later).0, Pass::No { .. }));
        // A probe without a verdict lets the next request probe.
        let much_later = later + Duration::from_secs(11);
        assert_eq!(b.check(much_later).0, Pass::Probe);
        b.release_probe(b.generation());
        assert_eq!(b.check(much_later).0, Pass::Probe);
    }

    #[test]
    fn verdicts_from_before_it_opened_change_nothing() {
        let b = breaker();
        let t = Instant::now();
        let old = b.generation();
        b.failure(t, None);
        b.failure(t, None);
        // A stream picked before it opened ends well: it stays open.
        assert_eq!(b.success_since(old), None);
        assert!(matches!(b.check(t).0, Pass::No { .. }));
        // The probe's verdict counts; an old failure does not reopen it.
        let later = t + Duration::from_secs(11);
        assert_eq!(b.check(later).0, Pass::Probe);
        assert_eq!(b.failure_since(later, None, old), None);
        assert_eq!(b.success_since(b.generation()), Some(Transition::Closed));
    }

    #[test]
    fn retry_after_opens_at_once_for_its_time() {
        let b = breaker();
        let t = Instant::now();
        assert_eq!(
            b.failure(t, Some(Duration::from_secs(2))),
            Some(Transition::Opened)
        );
        assert!(matches!(
            b.check(t + Duration::from_secs(1)).0,
            Pass::No { .. }
        ));
        assert_eq!(b.check(t + Duration::from_secs(3)).0, Pass::Probe);
        assert_eq!(retry_after(b" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(b"0.5"), Some(Duration::from_millis(500)));
        assert_eq!(retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_after(b"99999"), Some(Duration::from_secs(3600)));
    }
}
