//! Observation stage (`logging`, and the head gate's refusals): the one end of a
//! request. What the request learned ([`Facts`]) and how it ended ([`End`]) become its
//! metrics, its access line and its row.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::info;

use crate::cost::Pricing;
use crate::error::RelayError;
use crate::metrics::{Finished, Metrics};
use crate::record::Row;
use crate::request_info::RequestInfo;
use crate::route::Route;
use crate::tap::{Tap, TapKind, Usage};

/// What a request learned by its end, as far as its record needs.
pub struct Facts<'a> {
    /// The relay's own id, and the client's when it sent a sane one.
    pub request_id: &'a str,
    pub client_request_id: Option<&'a str>,
    pub start: Instant,
    /// Wall-clock time of the request head.
    pub started_at: SystemTime,
    pub route: Option<&'a Arc<Route>>,
    pub tenant: Option<&'a str>,
    pub request_info: Option<&'a RequestInfo>,
    pub tap: Option<&'a Tap>,
    pub upstream_status: Option<u16>,
    pub ttfb: Option<Duration>,
    pub attempts: usize,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Body bytes kept for the row (the route's `capture`).
    pub captured_request: &'a [u8],
    pub captured_response: &'a [u8],
    /// The upstream answered in a content encoding the tap cannot read.
    pub encoded_answer: bool,
}

/// Ends each request in the metrics, the access log and its row.
pub struct Recorder {
    pub metrics: Arc<Metrics>,
    pub pricing: Arc<Pricing>,
    /// Hand-off of each request's row to the background writer.
    pub rows: crate::rows::RowSender,
    /// This relay's name in rows.
    pub instance: Arc<str>,
}

/// What is known of a request refused before its head was whole.
pub struct RefusedHead {
    pub request_id: String,
    pub client_request_id: Option<String>,
    /// When its connection was accepted.
    pub start: Instant,
    pub started_at: SystemTime,
    /// The route its path names, when the request line arrived.
    pub route: Option<Arc<Route>>,
    pub client_addr: Option<std::net::SocketAddr>,
}

/// How a request ended, as far as its record needs.
pub struct End<'a> {
    /// Of the response head the client got (0: none).
    pub status: u16,
    pub outcome: &'static str,
    /// What went wrong, appended to the row's error kind.
    pub detail: Option<&'a (dyn std::fmt::Display + Sync)>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
}

impl<'a> Facts<'a> {
    /// A request of which only its head is known (refused before anything else).
    pub fn head(request_id: &'a str, start: Instant, started_at: SystemTime) -> Facts<'a> {
        Facts {
            request_id,
            client_request_id: None,
            start,
            started_at,
            route: None,
            tenant: None,
            request_info: None,
            tap: None,
            upstream_status: None,
            ttfb: None,
            attempts: 0,
            request_bytes: 0,
            response_bytes: 0,
            captured_request: &[],
            captured_response: &[],
            encoded_answer: false,
        }
    }
}

/// What a request's record derives from its facts: the model it is accounted to, its
/// cost, its error kind. Pure.
pub struct Account<'a> {
    pub usage: Usage,
    /// The model named in the row and the access line.
    pub model: Option<&'a str>,
    /// A bounded model label for metrics (a priced model, or `other`).
    pub model_label: &'a str,
    pub cost: Option<f64>,
    /// The bounded error kind, when the request failed or its stream carried an error.
    pub error: Option<&'a str>,
    /// `first_output` is time to first audio rather than first token.
    pub audio: bool,
    pub first_output: Option<Duration>,
    pub usage_unknown: bool,
    pub duration: Duration,
}

impl<'a> Account<'a> {
    pub fn of(pricing: &'a Pricing, f: &Facts<'a>, end: &End<'_>) -> Account<'a> {
        let measure = f.tap.map(|t| &t.measure);
        let usage = measure.map(|m| m.usage).unwrap_or_default();
        let requested = f.request_info.and_then(|i| i.model.as_deref());
        let answered = measure.and_then(|m| m.model.as_deref());
        let (model, model_label) = accounted_model(pricing, requested, answered);
        let stream_error = measure.and_then(|m| m.stream_error.as_deref());
        let error = if end.outcome != "ok" {
            Some(end.outcome)
        } else if f.upstream_status.is_some_and(|s| s >= 500) {
            Some("upstream_5xx")
        } else if f.upstream_status.is_some_and(|s| s >= 400) {
            Some("upstream_4xx")
        } else if stream_error.is_some() {
            Some("stream_error")
        } else {
            None
        };
        Account {
            cost: model.and_then(|m| pricing.cost(m, &usage)),
            usage_unknown: usage_unknown(f, &usage),
            usage,
            model,
            model_label,
            error,
            audio: f.tap.is_some_and(|t| t.kind() == TapKind::Audio),
            first_output: measure.and_then(|m| m.first_output),
            duration: f.start.elapsed(),
        }
    }
}

impl Recorder {
    /// A request the relay refused before its head was whole (by the head gate):
    /// its metrics, access line and row.
    pub fn refused_head(&self, refusal: &RelayError, head: RefusedHead) {
        let mut facts = Facts::head(&head.request_id, head.start, head.started_at);
        facts.client_request_id = head.client_request_id.as_deref();
        facts.route = head.route.as_ref();
        let end = End {
            status: refusal.status(),
            outcome: refusal.kind(),
            detail: None,
            client_addr: head.client_addr.map(|a| a.to_string()),
            user_agent: None,
        };
        self.record(&facts, end);
    }

    /// Metrics, access line and row of a request; returns its usage (for settlement).
    pub fn record(&self, f: &Facts<'_>, end: End<'_>) -> Usage {
        let account = Account::of(&self.pricing, f, &end);
        let tenant = f.tenant.unwrap_or("-");
        self.metrics.request_done(&Finished {
            usage_unknown: account.usage_unknown,
            route: f.route.map_or("-", |r| r.name.as_str()),
            status: end.status,
            outcome: end.outcome,
            model: account.model_label,
            tenant,
            duration: account.duration,
            ttfb: f.ttfb,
            first_output: account.first_output,
            audio: account.audio,
            usage: account.usage,
            cost: account.cost,
            response_bytes: f.response_bytes,
            error: account.error,
        });
        access_line(f, &end, &account);
        let usage = account.usage;
        self.rows.send(row(f, end, &account, &self.instance));
        usage
    }
}

/// The request's line in the `access` log.
fn access_line(f: &Facts<'_>, end: &End<'_>, a: &Account<'_>) {
    let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1000.0);
    let n = |v: Option<u64>| v.map_or(-1, |v| v as i64);
    let usage = &a.usage;
    info!(
        target: "access",
        "{} client_id={} tenant={} route={} model={} status={} outcome={} upstream_status={} attempts={} ttfb_ms={:.1} ttft_ms={:.1} duration_ms={:.1} tokens_in={} tokens_out={} tokens_cached={} tokens_reasoning={} cost_usd={} finish={} bytes={}",
        f.request_id,
        f.client_request_id.unwrap_or("-"),
        f.tenant.unwrap_or("-"),
        f.route.map_or("-", |r| r.name.as_str()),
        a.model.unwrap_or("-"),
        end.status,
        end.outcome,
        f.upstream_status.unwrap_or(0),
        f.attempts,
        ms(f.ttfb),
        ms(a.first_output),
        a.duration.as_secs_f64() * 1000.0,
        n(usage.input),
        n(usage.output),
        n(usage.cached_input),
        n(usage.reasoning),
        a.cost.map_or("unknown".to_string(), |c| format!("{c:.8}")),
        f.tap.and_then(|t| t.measure.finish_reason.as_deref()).unwrap_or("-"),
        f.response_bytes,
    );
}

/// The request's row. Pure.
pub fn row(f: &Facts<'_>, end: End<'_>, a: &Account<'_>, instance: &str) -> Row {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let measure = f.tap.map(|t| &t.measure);
    let route = f.route;
    Row {
        request_id: f.request_id.to_string(),
        client_request_id: f.client_request_id.map(str::to_string),
        time_ms: f
            .started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        instance: instance.to_string(),
        tenant: f.tenant.map(str::to_string),
        route: route.map(|r| r.name.clone()),
        provider: route.map(|r| r.provider.as_str().into()),
        model: a.model.map(str::to_string),
        stream: f.request_info.is_some_and(|i| i.stream),
        status: end.status,
        upstream_status: f.upstream_status,
        outcome: end.outcome.into(),
        error: a.error.map(|kind| match end.detail {
            Some(detail) => format!("{kind}: {detail}"),
            None => kind.to_string(),
        }),
        attempts: f.attempts as u32,
        ttfb_ms: f.ttfb.map(ms),
        ttft_ms: a.first_output.filter(|_| !a.audio).map(ms),
        ttfa_ms: a.first_output.filter(|_| a.audio).map(ms),
        max_gap_ms: measure.and_then(|m| m.max_gap).map(ms),
        duration_ms: ms(a.duration),
        tokens_in: a.usage.input,
        tokens_out: a.usage.output,
        tokens_cached: a.usage.cached_input,
        tokens_reasoning: a.usage.reasoning,
        cost_usd: a.cost,
        request_bytes: f.request_bytes,
        response_bytes: f.response_bytes,
        finish_reason: measure.and_then(|m| m.finish_reason.clone()),
        usage_unknown: a.usage_unknown,
        client_addr: end.client_addr,
        user_agent: end.user_agent,
        request_body: route
            .filter(|r| r.capture.request > 0)
            .map(|_| String::from_utf8_lossy(f.captured_request).into_owned()),
        response_body: route
            .filter(|r| r.capture.response > 0)
            .map(|_| String::from_utf8_lossy(f.captured_response).into_owned()),
    }
}

/// A model request the provider answered (2xx) without a usage the relay could read:
/// a text answer (SSE or JSON, or one compressed against the relay's request) for a body
/// that named a model, with neither token count known, or with one missing after the
/// tap had to skip an event too large to read (it may have held the count).
fn usage_unknown(f: &Facts<'_>, usage: &Usage) -> bool {
    let answered = f.upstream_status.is_some_and(|s| (200..300).contains(&s));
    let model_request = f.request_info.is_some_and(|i| i.model.is_some());
    let text = f.encoded_answer
        || f.tap.is_some_and(|t| {
            matches!(
                t.kind(),
                TapKind::OpenAiSse | TapKind::AnthropicSse | TapKind::Json
            )
        });
    let skipped = f.tap.is_some_and(|t| t.measure.usage_unreadable);
    let missing = (usage.input.is_none() && usage.output.is_none())
        || (skipped && (usage.input.is_none() || usage.output.is_none()));
    answered && model_request && text && missing
}

/// The model a request is accounted to: the one the client asked for when it has a
/// price, else the one the provider says answered.
pub fn accounted_model<'a>(
    pricing: &'a Pricing,
    requested: Option<&'a str>,
    answered: Option<&'a str>,
) -> (Option<&'a str>, &'a str) {
    for m in [requested, answered].into_iter().flatten() {
        if let Some(known) = pricing.known(m) {
            return (Some(m), known);
        }
    }
    (requested.or(answered), "other")
}
