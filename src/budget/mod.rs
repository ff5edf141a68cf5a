//! Spend budgets in US dollars (admission, `request_filter`; settlement, `logging`; the
//! mid-stream cut, the upstream body filter).
//!
//! A request counts against every budget that applies to it: its tenant's, each of its
//! groups', and those scoped to its model or route. Before it is forwarded it reserves
//! its worst-case cost in each (input estimated from the body, output at `max_tokens` or
//! the default, or, with the `observed` reservation, a high percentile of what the
//! tenant's requests to that model produced lately); at its end the reservation is
//! settled to the exact cost. A budget in `block` mode refuses a request whose
//! reservation would take spend plus reservations past the cap; one in `audit` mode
//! serves it and counts. A stream that outgrows its reservation asks for more as it
//! goes and is cut when none is left.
//!
//! Amounts are integers of nano-dollars. With Redis, the counts are the fleet's (one
//! script per reservation and per settlement, each atomic, on Redis' clock); without,
//! or while Redis is down under `on_failure: local`, this relay's own.

pub mod observed;
pub mod store;
pub mod window;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use jiff::tz::TimeZone;
use log::{info, warn};
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::cost::{Price, Pricing};
use crate::limits::redis::RedisConnection;
use observed::Observed;
use store::{Level, LocalStore, RedisStore, Reserve};
use window::{Period, Window};

const NANO: f64 = 1e9;

fn nano(usd: f64) -> i64 {
    (usd * NANO).ceil() as i64
}

fn usd(nano: i64) -> f64 {
    nano as f64 / NANO
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse what would pass the cap.
    Block,
    /// Serve, and count what passes the cap.
    Audit,
}

/// One budget, validated: `tenant:ID`, `group:ID`, with `:model:M` or `:route:R` when
/// scoped.
#[derive(Debug, Clone)]
pub struct BudgetSpec {
    pub id: String,
    pub usd: f64,
    pub period: Period,
    pub time_zone: TimeZone,
    pub time_zone_name: String,
    pub mode: Mode,
    /// A running stream is cut when it would pass the cap (else it may finish).
    pub cut_running: bool,
    pub model: Option<String>,
    pub route: Option<String>,
}

impl BudgetSpec {
    pub fn applies(&self, route: &str, model: Option<&str>) -> bool {
        self.route.as_deref().is_none_or(|r| r == route)
            && self.model.as_deref().is_none_or(|m| Some(m) == model)
    }

    fn cap(&self) -> i64 {
        (self.usd * NANO).round() as i64
    }

    pub fn window_at(&self, now_ms: i64) -> Window {
        Window::at(now_ms, self.period, &self.time_zone)
    }
}

/// How much output a request reserves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reservation {
    /// `max_tokens`, or the default when the request sets none.
    WorstCase,
    /// The smaller of that and this percentile of the tenant's recent outputs for the
    /// model.
    Observed { percentile: f64 },
}

/// `budgets:` settings that are not a budget.
#[derive(Debug, Clone)]
pub struct BudgetSettings {
    pub reservation: Reservation,
    /// A budgeted request for a model without a price is served (its spend unknown,
    /// counted as zero) instead of refused.
    pub allow_unpriced: bool,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        BudgetSettings {
            reservation: Reservation::WorstCase,
            allow_unpriced: false,
        }
    }
}

/// What a request asks of its tenant's budgets.
pub struct Ask<'a> {
    pub specs: &'a [Arc<BudgetSpec>],
    pub tenant: &'a str,
    pub route: &'a str,
    pub model: Option<&'a str>,
    pub max_tokens: Option<u64>,
    pub default_max_tokens: u64,
    /// The input estimate (`limits::input_tokens`).
    pub input_tokens: u64,
}

/// Why budgets refused a request.
#[derive(Debug)]
pub enum Refusal {
    /// The reservation would take the budget past its cap.
    Exceeded(Headroom),
    /// The model has no price, so its cost cannot be held to a budget.
    Unpriced,
    /// Redis could not be asked and `on_failure` is `refuse`.
    Unavailable,
}

/// What is left of a budget, for the answer's headers.
#[derive(Debug, Clone)]
pub struct Headroom {
    pub budget: String,
    pub limit_usd: f64,
    pub remaining_usd: f64,
    pub window: Window,
    pub now_ms: i64,
}

impl Headroom {
    fn of(spec: &BudgetSpec, level: &Level, now_ms: i64) -> Headroom {
        Headroom {
            budget: spec.id.clone(),
            limit_usd: spec.usd,
            remaining_usd: usd((spec.cap() - level.spent - level.reserved).max(0)),
            window: level.window,
            now_ms,
        }
    }

    /// `x-budget-limit-usd`, `x-budget-remaining-usd` and `x-budget-reset` (when the
    /// window ends, RFC 3339).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("x-budget-limit-usd", format!("{:.6}", self.limit_usd)),
            (
                "x-budget-remaining-usd",
                format!("{:.6}", self.remaining_usd),
            ),
            ("x-budget-reset", self.window.end_rfc3339()),
        ]
    }

    /// Seconds until the window ends.
    pub fn retry_after(&self) -> u64 {
        self.window.seconds_left(self.now_ms)
    }
}

/// A reservation held in one budget.
struct Held {
    spec: Arc<BudgetSpec>,
    window: Window,
    /// In this relay's counts (Redis was down when it was made).
    local: bool,
}

/// More reservation asked for by a stream that outgrew its own.
#[derive(Default)]
struct Extension {
    pending: AtomicBool,
    refused: AtomicBool,
    /// The stream was cut (counted once).
    cut: AtomicBool,
    /// Output tokens granted beyond the first reservation.
    tokens: AtomicU64,
    /// Nano-dollars granted beyond the first (in every budget), and whether the request
    /// has settled: an extension granted after the settlement gives itself back.
    granted: std::sync::Mutex<(i64, bool)>,
}

impl Extension {
    fn granted(&self) -> std::sync::MutexGuard<'_, (i64, bool)> {
        self.granted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request's reservations, settled when it ends.
pub struct Hold {
    held: Arc<Vec<Held>>,
    price: Option<Price>,
    input_tokens: u64,
    /// Output tokens the first reservation covers.
    output_tokens: u64,
    /// Nano-dollars reserved in every budget at admission.
    amount: i64,
    extension: Arc<Extension>,
    cut_running: bool,
    tenant: Arc<str>,
    model: Option<String>,
    /// `ok`, `audit_over` (served past an audit budget's cap) or `unpriced`.
    pub decision: &'static str,
    /// The budget with the least left, for the answer's headers and the row.
    pub headroom: Option<Headroom>,
    engine: Arc<Budgets>,
}

impl Hold {
    /// Dollars reserved so far (extensions included), for the row.
    pub fn reserved_usd(&self) -> f64 {
        usd(self.amount + self.extension.granted().0)
    }

    /// A stream has produced `output` tokens: asks for more reservation ahead of need
    /// (at three quarters of what is covered), and says whether to cut it now: past
    /// what is covered, with more refused.
    pub fn watch(&self, output: u64) -> bool {
        let Some(price) = self.price.filter(|_| self.cut_running) else {
            return false;
        };
        let covered = self.output_tokens + self.extension.tokens.load(Ordering::Acquire);
        let step = self.output_tokens.max(256);
        self.keep_ahead(
            output > covered,
            output * 4 >= covered * 3,
            step,
            nano(step as f64 * price.output),
        )
    }

    /// A WebSocket session has used `input` tokens (`cached` of them cached) and
    /// `output` tokens so far, summed over its responses as each `response.done` tells:
    /// asks for more reservation ahead of need, and says whether to close the session
    /// now: its spend past what is covered, with more refused. (A session's deltas are
    /// not tokens, so it is watched in dollars, one response at a time.)
    pub fn watch_spent(&self, input: u64, cached: u64, output: u64) -> bool {
        let Some(price) = self.price.filter(|_| self.cut_running) else {
            return false;
        };
        let spent = nano(price.of(input, cached, output));
        if spent * 4 < self.amount * 3 {
            return false;
        }
        let covered = self.amount + self.extension.granted().0;
        // Enough to cover what is spent already and one more first reservation.
        let step = self.amount.max(spent - covered + self.amount).max(1);
        self.keep_ahead(spent > covered, spent * 4 >= covered * 3, 0, step)
    }

    /// Past what is covered with more refused: cut (counted once). Near it: more is
    /// asked for, one ask at a time, off the request path.
    fn keep_ahead(&self, over: bool, near: bool, tokens: u64, amount: i64) -> bool {
        let ext = &self.extension;
        if ext.refused.load(Ordering::Acquire) {
            if !over {
                return false;
            }
            if !ext.cut.swap(true, Ordering::AcqRel) {
                self.engine.count_cutoff(self);
            }
            return true;
        }
        if near && !ext.pending.swap(true, Ordering::AcqRel) {
            let (engine, held, ext) = (self.engine.clone(), self.held.clone(), ext.clone());
            tokio::spawn(async move { engine.extend(&held, &ext, tokens, amount).await });
        }
        false
    }

    /// The nano-dollars this request settles to: its cost when known; nothing when no
    /// upstream was reached, or for an unpriced model; for a stream the relay cut, what
    /// it produced; otherwise (the cost unknown) the reservation stands.
    pub fn settlement(&self, cost: Option<f64>, outcome: &str, output_events: u64) -> i64 {
        match (cost, self.price) {
            (Some(c), _) => nano(c),
            (None, _) if outcome == "upstream_unavailable" => 0,
            (None, None) => 0,
            (None, Some(p)) if outcome == "budget_exceeded" => {
                nano(self.input_tokens as f64 * p.input + output_events as f64 * p.output)
            }
            (None, Some(_)) => self.amount + self.extension.granted().0,
        }
    }

    /// Settles every reservation to `actual` nano-dollars; `output_tokens`, when the
    /// provider told them, feeds the `observed` reservation.
    pub async fn settle(self, actual: i64, output_tokens: Option<u64>) {
        if let (Some(model), Some(out)) = (&self.model, output_tokens) {
            self.engine.observed.add(&self.tenant, model, out);
        }
        let extra = {
            let mut granted = self.extension.granted();
            granted.1 = true;
            granted.0
        };
        self.engine
            .settle_all(&self.held, self.amount + extra, actual)
            .await;
    }
}

impl Drop for Hold {
    /// A request whose end was never settled (its task was cancelled at shutdown): its
    /// reservation is settled as it stands, if a runtime is there to do it.
    fn drop(&mut self) {
        let extra = {
            let mut granted = self.extension.granted();
            if granted.1 {
                return;
            }
            granted.1 = true;
            granted.0
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (engine, held) = (self.engine.clone(), self.held.clone());
        let reserved = self.amount + extra;
        runtime.spawn(async move { engine.settle_all(&held, reserved, reserved).await });
    }
}

/// Per-budget metrics; labels are the configured budgets' ids.
struct BudgetMetrics {
    spent: GaugeVec,
    reserved: GaugeVec,
    remaining: GaugeVec,
    limit: GaugeVec,
    refusals: IntCounterVec,
    cutoffs: IntCounterVec,
    redis_failures: IntCounter,
    redis_up: IntGauge,
}

impl BudgetMetrics {
    fn new(registry: &Registry) -> BudgetMetrics {
        let gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["budget"]).expect("metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let redis_failures = IntCounter::new(
            "stream_relay_budget_redis_failures_total",
            "Budget reservations or settlements Redis did not answer; each followed redis.on_failure.",
        )
        .expect("metric");
        registry
            .register(Box::new(redis_failures.clone()))
            .expect("unique metric");
        let redis_up = IntGauge::new(
            "stream_relay_budget_redis_up",
            "Whether budgets are counted in Redis: 1 while it answers (or is not configured), 0 while the relay falls back.",
        )
        .expect("metric");
        redis_up.set(1);
        registry
            .register(Box::new(redis_up.clone()))
            .expect("unique metric");
        BudgetMetrics {
            spent: gauge(
                "stream_relay_budget_spent_usd",
                "A budget's spend in its current window, as this relay last saw it.",
            ),
            reserved: gauge(
                "stream_relay_budget_reserved_usd",
                "Reservations held in a budget by running requests, as this relay last saw them.",
            ),
            remaining: gauge(
                "stream_relay_budget_remaining_usd",
                "A budget's cap less spend and reservations, as this relay last saw them.",
            ),
            limit: gauge(
                "stream_relay_budget_limit_usd",
                "A budget's cap per window.",
            ),
            refusals: counter(
                "stream_relay_budget_refusals_total",
                "Requests over a budget: refused (mode block) or served and counted (mode audit).",
                &["budget", "mode"],
            ),
            cutoffs: counter(
                "stream_relay_budget_cutoffs_total",
                "Streams ended mid-way because their budget had nothing left.",
                &["budget"],
            ),
            redis_failures,
            redis_up,
        }
    }

    fn level(&self, spec: &BudgetSpec, level: &Level) {
        let id = spec.id.as_str();
        // Every budget's counters exist from its first request, at 0 until they count.
        self.refusals.with_label_values(&[id, "block"]);
        self.refusals.with_label_values(&[id, "audit"]);
        self.cutoffs.with_label_values(&[id]);
        self.spent.with_label_values(&[id]).set(usd(level.spent));
        self.reserved
            .with_label_values(&[id])
            .set(usd(level.reserved));
        self.limit.with_label_values(&[id]).set(spec.usd);
        let left = (spec.cap() - level.spent - level.reserved).max(0);
        self.remaining.with_label_values(&[id]).set(usd(left));
    }
}

/// The budget engine: counts, prices and the observed outputs, shared by every request.
pub struct Budgets {
    local: LocalStore,
    redis: Option<RedisStore>,
    refuse_when_down: bool,
    /// Redis failed; not asked again before `retry_at_ms`.
    down: AtomicBool,
    retry_at_ms: AtomicI64,
    pricing: Pricing,
    settings: BudgetSettings,
    observed: Observed,
    metrics: BudgetMetrics,
    clock: fn() -> i64,
}

fn now_ms() -> i64 {
    crate::record::unix_ms() as i64
}

/// Where the engine counts: Redis (with the limiter's connection and key prefix) and
/// what to do while it is down, or this relay alone.
pub struct Backend {
    pub redis: Arc<RedisConnection>,
    pub key_prefix: String,
    pub refuse_when_down: bool,
}

impl Budgets {
    pub fn new(
        backend: Option<Backend>,
        pricing: Pricing,
        settings: BudgetSettings,
        registry: &Registry,
    ) -> Budgets {
        Budgets::with_clock(backend, pricing, settings, registry, now_ms)
    }

    /// With a clock of the tests' choosing (Unix milliseconds).
    pub fn with_clock(
        backend: Option<Backend>,
        pricing: Pricing,
        settings: BudgetSettings,
        registry: &Registry,
        clock: fn() -> i64,
    ) -> Budgets {
        let refuse_when_down = backend.as_ref().is_some_and(|b| b.refuse_when_down);
        Budgets {
            local: LocalStore::default(),
            redis: backend.map(|b| RedisStore::new(b.redis, &b.key_prefix)),
            refuse_when_down,
            down: AtomicBool::new(false),
            retry_at_ms: AtomicI64::new(0),
            pricing,
            settings,
            observed: Observed::default(),
            metrics: BudgetMetrics::new(registry),
            clock,
        }
    }

    /// Output tokens a request reserves.
    fn output_tokens(&self, ask: &Ask<'_>) -> u64 {
        let asked = ask.max_tokens.unwrap_or(ask.default_max_tokens);
        match (self.settings.reservation, ask.model) {
            (Reservation::Observed { percentile }, Some(model)) => self
                .observed
                .percentile(ask.tenant, model, percentile)
                .map_or(asked, |seen| seen.min(asked)),
            _ => asked,
        }
    }

    /// Reserves the request's cost in every budget that applies to it: `Ok(None)` when
    /// none does.
    pub async fn admit(self: &Arc<Self>, ask: &Ask<'_>) -> Result<Option<Hold>, Refusal> {
        let specs: Vec<Arc<BudgetSpec>> = ask
            .specs
            .iter()
            .filter(|s| s.applies(ask.route, ask.model))
            .cloned()
            .collect();
        if specs.is_empty() {
            return Ok(None);
        }
        let price = ask.model.and_then(|m| self.pricing.price(m));
        let blocking = specs.iter().any(|s| s.mode == Mode::Block);
        if price.is_none() && blocking && !self.settings.allow_unpriced {
            return Err(Refusal::Unpriced);
        }
        let input_tokens = ask.input_tokens;
        let output_tokens = self.output_tokens(ask);
        let amount = price.map_or(0, |p| {
            nano(input_tokens as f64 * p.input + output_tokens as f64 * p.output)
        });
        let (held, over, headroom) = self.reserve_each(specs, amount).await?;
        let decision = match (price, over) {
            (None, _) => "unpriced",
            (Some(_), true) => "audit_over",
            (Some(_), false) => "ok",
        };
        let cut_running = held
            .iter()
            .any(|h| h.spec.cut_running && h.spec.mode == Mode::Block);
        Ok(Some(Hold {
            held: Arc::new(held),
            price,
            input_tokens,
            output_tokens,
            amount,
            extension: Arc::default(),
            cut_running,
            tenant: ask.tenant.into(),
            model: ask.model.map(str::to_string),
            decision,
            headroom,
            engine: self.clone(),
        }))
    }

    /// Reserves `amount` in each budget, in its current window; on a refusal, gives
    /// back what was taken. Also says whether an audit budget was passed, and which
    /// budget has the least left.
    async fn reserve_each(
        &self,
        specs: Vec<Arc<BudgetSpec>>,
        amount: i64,
    ) -> Result<(Vec<Held>, bool, Option<Headroom>), Refusal> {
        let now = (self.clock)();
        let mut held = Vec::with_capacity(specs.len());
        let mut over = false;
        let mut headroom: Option<Headroom> = None;
        for spec in specs {
            let window = spec.window_at(now);
            let r = Reserve {
                id: &spec.id,
                window,
                next_end_ms: spec.window_at(window.end_ms).end_ms,
                prev_start_ms: spec.window_at(window.start_ms - 1).start_ms,
                amount,
                cap: spec.cap(),
                block: spec.mode == Mode::Block,
            };
            let Some((level, local)) = self.reserve(&r).await else {
                self.settle_all(&held, amount, 0).await;
                return Err(Refusal::Unavailable);
            };
            self.metrics.level(&spec, &level);
            let room = Headroom::of(&spec, &level, now);
            if !level.admitted {
                self.metrics
                    .refusals
                    .with_label_values(&[&spec.id, "block"])
                    .inc();
                self.settle_all(&held, amount, 0).await;
                return Err(Refusal::Exceeded(room));
            }
            if spec.mode == Mode::Audit && level.spent + level.reserved > spec.cap() {
                self.metrics
                    .refusals
                    .with_label_values(&[&spec.id, "audit"])
                    .inc();
                over = true;
            }
            if headroom
                .as_ref()
                .is_none_or(|h| room.remaining_usd < h.remaining_usd)
            {
                headroom = Some(room);
            }
            held.push(Held {
                window: level.window,
                local,
                spec,
            });
        }
        Ok((held, over, headroom))
    }

    /// More reservation for a running stream, in the windows it holds, from every budget
    /// or none.
    async fn extend(&self, held: &[Held], ext: &Extension, tokens: u64, amount: i64) {
        let mut taken: Vec<&Held> = Vec::new();
        let mut refused = false;
        // Redis did not answer: nothing is granted, nothing refused (the stream is not cut
        // for it; a later ask may be answered).
        let mut errored = false;
        for h in held {
            let r = Reserve {
                id: &h.spec.id,
                window: h.window,
                next_end_ms: 0,
                prev_start_ms: 0,
                amount,
                cap: h.spec.cap(),
                block: h.spec.mode == Mode::Block,
            };
            match self.reserve_in(&r, h.local).await {
                Some(level) if level.admitted => {
                    self.metrics.level(&h.spec, &level);
                    taken.push(h);
                }
                Some(_) => {
                    refused = true;
                    break;
                }
                None => {
                    errored = true;
                    break;
                }
            }
        }
        // Granted after the request settled (its stream ended meanwhile): given back.
        let late = !refused && !errored && {
            let mut granted = ext.granted();
            if !granted.1 {
                granted.0 += amount;
            }
            granted.1
        };
        if refused || late || errored {
            for h in taken {
                self.settle_one(h, amount, 0).await;
            }
        }
        if refused {
            ext.refused.store(true, Ordering::Release);
        } else if !late && !errored {
            ext.tokens.fetch_add(tokens, Ordering::AcqRel);
        }
        ext.pending.store(false, Ordering::Release);
    }

    /// A stream was cut at its budget: counted against the budget with the least left.
    fn count_cutoff(&self, hold: &Hold) {
        if let Some(h) = &hold.headroom {
            self.metrics.cutoffs.with_label_values(&[&h.budget]).inc();
        }
    }

    /// Reserves in Redis, or in this relay's counts while Redis is down (`None`: down,
    /// and the policy is to refuse). The flag says the local counts took it.
    async fn reserve(&self, r: &Reserve<'_>) -> Option<(Level, bool)> {
        let Some(redis) = &self.redis else {
            return Some((self.local.reserve(r), true));
        };
        if self.may_ask() {
            match redis.reserve(r).await {
                Ok(level) => {
                    self.answered();
                    return Some((level, false));
                }
                Err(e) => self.failed("reserve", &e),
            }
        }
        if self.refuse_when_down {
            return None;
        }
        Some((self.local.reserve(r), true))
    }

    /// Reserves where an earlier reservation of the same request was made.
    async fn reserve_in(&self, r: &Reserve<'_>, local: bool) -> Option<Level> {
        match (&self.redis, local) {
            (Some(redis), false) => match redis.reserve(r).await {
                Ok(level) => Some(level),
                Err(e) => {
                    self.failed("reserve", &e);
                    None
                }
            },
            _ => Some(self.local.reserve(r)),
        }
    }

    async fn settle_all(&self, held: &[Held], reserved: i64, actual: i64) {
        for h in held {
            self.settle_one(h, reserved, actual).await;
        }
    }

    async fn settle_one(&self, h: &Held, reserved: i64, actual: i64) {
        let level = match (&self.redis, h.local) {
            (Some(redis), false) => {
                match redis.settle(&h.spec.id, h.window, reserved, actual).await {
                    Ok(level) => level,
                    Err(e) => {
                        self.failed("settle", &e);
                        self.settle_later(h, reserved, actual);
                        return;
                    }
                }
            }
            _ => self.local.settle(&h.spec.id, h.window, reserved, actual),
        };
        self.metrics.level(&h.spec, &level);
    }

    /// A settlement Redis did not take, tried again (1, 2, 4, 8, 16, 32 s later) so that
    /// a blip does not leave the reservation held, and the spend uncounted, for the rest
    /// of the window; after that it is given up (logged).
    fn settle_later(&self, h: &Held, reserved: i64, actual: i64) {
        let (Some(redis), Ok(runtime)) = (&self.redis, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let redis = redis.clone();
        let (id, window) = (h.spec.id.clone(), h.window);
        runtime.spawn(async move {
            for secs in [1, 2, 4, 8, 16, 32] {
                tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
                if redis.settle(&id, window, reserved, actual).await.is_ok() {
                    return;
                }
            }
            warn!("budgets: a settlement of {id} was not taken by Redis within a minute; its reservation stays until the window's key expires");
        });
    }

    fn may_ask(&self) -> bool {
        (self.clock)() >= self.retry_at_ms.load(Ordering::Relaxed)
    }

    fn answered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            info!("budgets: Redis answers again; counting in it");
            self.metrics.redis_up.set(1);
        }
    }

    fn failed(&self, what: &str, e: &str) {
        self.metrics.redis_failures.inc();
        self.retry_at_ms
            .store((self.clock)() + 1000, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            self.metrics.redis_up.set(0);
            warn!(
                "budgets: Redis unavailable ({what}: {e}); {} until it answers again",
                if self.refuse_when_down {
                    "refusing budgeted requests"
                } else {
                    "counting in this relay alone"
                }
            );
        }
    }

    /// Every budget's state in its current window, for the admin endpoint.
    pub async fn report(&self, specs: &[Arc<BudgetSpec>]) -> serde_json::Value {
        let now = (self.clock)();
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            let window = spec.window_at(now);
            let (level, source) = match &self.redis {
                Some(redis) if self.may_ask() => match redis.level(&spec.id, window).await {
                    Ok(l) => (l, "redis"),
                    Err(e) => {
                        self.failed("read", &e);
                        (self.local.level(&spec.id, window), "local")
                    }
                },
                _ => (self.local.level(&spec.id, window), "local"),
            };
            out.push(serde_json::json!({
                "budget": spec.id,
                "mode": match spec.mode { Mode::Block => "block", Mode::Audit => "audit" },
                "period": spec.period.name(),
                "time_zone": spec.time_zone_name,
                "limit_usd": spec.usd,
                "spent_usd": usd(level.spent),
                "reserved_usd": usd(level.reserved),
                "remaining_usd": usd((spec.cap() - level.spent - level.reserved).max(0)),
                "window_start": Window { start_ms: window.start_ms, end_ms: window.start_ms }.end_rfc3339(),
                "resets_at": window.end_rfc3339(),
                "counted_in": source,
            }));
        }
        serde_json::json!({ "budgets": out })
    }
}

#[cfg(test)]
mod tests;
