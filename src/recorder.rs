//! Observation stage (`logging`, and the head gate's refusals): the one end of a
//! request. What the request learned ([`Facts`]) and how it ended ([`End`]) become its
//! metrics, its access line and its row.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// A WebSocket session's frames: from the client, from the server.
    pub frames: Option<(u64, u64)>,
    /// The relay answered the request itself (a refusal): nothing was spent.
    pub refused: bool,
    /// The request's budget reservations, or the budget that refused it.
    pub budget: Option<&'a crate::budget::Hold>,
    pub budget_refused: Option<&'a str>,
    /// What the request did with the route's response cache.
    pub cache: Option<&'a crate::cache::Plan>,
    /// Its trace, when OpenTelemetry is on; and the request line for its span.
    pub trace: Option<&'a crate::telemetry::Trace>,
    pub method: &'a str,
    pub path: &'a str,
}

/// Ends each request in the metrics, the access log and its row.
pub struct Recorder {
    pub metrics: Arc<Metrics>,
    pub pricing: Arc<Pricing>,
    /// Hand-off of each request's row to the background writer.
    pub rows: crate::rows::RowSender,
    /// This relay's name in rows.
    pub instance: Arc<str>,
    /// The OTLP exporter, when `telemetry.otlp` is set.
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

/// What [`Recorder::record`] hands back for settlement.
#[derive(Debug, Default)]
pub struct Recorded {
    pub usage: Usage,
    /// Nano-dollars the request's budgets settle to (`None`: it holds none).
    pub settled: Option<i64>,
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
            frames: None,
            refused: false,
            budget: None,
            budget_refused: None,
            cache: None,
            trace: None,
            method: "",
            path: "",
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
            audio: f
                .tap
                .is_some_and(|t| t.kind() == TapKind::Audio || t.measure.audio_events),
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

    /// Metrics, access line and row of a request; returns its usage and what its
    /// budgets settle to (for settlement).
    pub fn record(&self, f: &Facts<'_>, end: End<'_>) -> Recorded {
        let account = Account::of(&self.pricing, f, &end);
        let settled = f.budget.map(|h| match f.refused {
            true => 0,
            false => h.settlement(
                account.cost,
                end.outcome,
                f.tap.map_or(0, |t| t.measure.output_events),
            ),
        });
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
        if let (Some((client, server)), Some(route)) = (f.frames, f.route) {
            self.metrics.session_frames(&route.name, client, server);
        }
        access_line(f, &end, &account);
        if let (Some(t), Some(trace)) = (&self.telemetry, f.trace) {
            t.finish(trace, &spans_of(f, &end, &account));
        }
        let usage = account.usage;
        let mut r = row(f, end, &account, &self.instance);
        r.budget_settled_usd = settled.map(|n| n as f64 / 1e9);
        if let Some(plan) = f.cache {
            cache_columns(&mut r, plan);
        }
        self.rows.send(r);
        Recorded { usage, settled }
    }
}

/// The request's line in the `access` log.
fn access_line(f: &Facts<'_>, end: &End<'_>, a: &Account<'_>) {
    let usage = &a.usage;
    crate::logsink::access(|l| {
        l.word(f.request_id);
        l.text("client_id", f.client_request_id.unwrap_or("-"));
        l.text("tenant", f.tenant.unwrap_or("-"));
        l.text("route", f.route.map_or("-", |r| r.name.as_str()));
        l.text("model", a.model.unwrap_or("-"));
        l.int("status", i64::from(end.status));
        l.text("outcome", end.outcome);
        l.int("upstream_status", i64::from(f.upstream_status.unwrap_or(0)));
        l.int("attempts", f.attempts as i64);
        l.millis("ttfb_ms", f.ttfb);
        l.millis("ttft_ms", a.first_output);
        l.millis("duration_ms", Some(a.duration));
        l.count("tokens_in", usage.input);
        l.count("tokens_out", usage.output);
        l.count("tokens_cached", usage.cached_input);
        l.count("tokens_reasoning", usage.reasoning);
        match a.cost {
            Some(c) => l.display("cost_usd", format_args!("{c:.8}")),
            None => l.text("cost_usd", "unknown"),
        }
        let finish = f.tap.and_then(|t| t.measure.finish_reason.as_deref());
        l.text("finish", finish.unwrap_or("-"));
        l.count("bytes", Some(f.response_bytes));
    });
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
        frames_from_client: f.frames.map(|f| f.0),
        frames_from_server: f.frames.map(|f| f.1),
        budget: f
            .budget
            .and_then(|h| h.headroom.as_ref().map(|r| r.budget.clone()))
            .or_else(|| f.budget_refused.map(str::to_string)),
        budget_decision: match (f.budget, f.budget_refused) {
            (Some(_), _) if end.outcome == "budget_exceeded" => Some("cut".into()),
            (Some(h), _) => Some(h.decision.into()),
            (None, Some(_)) => Some("refused".into()),
            (None, None) => None,
        },
        budget_reserved_usd: f.budget.map(crate::budget::Hold::reserved_usd),
        budget_settled_usd: None,
        cache: None,
        cache_saved_usd: None,
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

/// What a request's spans say (see [`crate::telemetry`]).
fn spans_of<'a>(
    f: &'a Facts<'_>,
    end: &'a End<'_>,
    a: &'a Account<'_>,
) -> crate::telemetry::Finished<'a> {
    let measure = f.tap.map(|t| &t.measure);
    crate::telemetry::Finished {
        start: f.started_at,
        end: f.started_at + a.duration,
        method: f.method,
        path: f.path,
        status: end.status,
        outcome: end.outcome,
        provider: f.route.map(|r| match r.provider.as_str() {
            "anthropic" => "anthropic",
            _ => "openai",
        }),
        route: f.route.map(|r| r.name.as_str()),
        tenant: f.tenant,
        request_model: f.request_info.and_then(|i| i.model.as_deref()),
        response_model: measure.and_then(|m| m.model.as_deref()),
        input_tokens: a.usage.input,
        output_tokens: a.usage.output,
        finish_reason: measure.and_then(|m| m.finish_reason.as_deref()),
        ttft: a.first_output.filter(|_| !a.audio),
        upstream_status: f.upstream_status,
        model_label: a.model_label,
        stream: f.request_info.is_some_and(|i| i.stream),
    }
}

/// What the cache did, in the row; for a hit, the original answer's usage and model, a
/// cost of 0 (nothing was paid) and what the original cost, saved.
fn cache_columns(r: &mut Row, plan: &crate::cache::Plan) {
    r.cache = Some(plan.result().into());
    let Some(entry) = &plan.hit else {
        return;
    };
    r.tokens_in = entry.usage.input;
    r.tokens_out = entry.usage.output;
    r.tokens_cached = entry.usage.cached_input;
    r.tokens_reasoning = entry.usage.reasoning;
    r.finish_reason = entry.finish_reason.clone();
    if r.model.is_none() {
        r.model = entry.model.clone();
    }
    r.cost_usd = Some(0.0);
    r.cache_saved_usd = entry.cost;
}

/// A model request the provider answered (2xx) without a usage the relay could read:
/// a text answer (SSE or JSON, or one compressed against the relay's request) for a body
/// that named a model, with neither token count known, or with one missing after the
/// tap had to skip an event too large to read (it may have held the count).
fn usage_unknown(f: &Facts<'_>, usage: &Usage) -> bool {
    if let Some((from_client, _)) = f.frames {
        // A session the client used (it sent frames) without a usage the relay could
        // read: its output deltas came without a `response.done`, or it used the model
        // in a way the tap does not meter (a transcription session, say). Never taken
        // as free.
        return from_client > 0 && (usage.input.is_none() || usage.output.is_none());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::cost::RawPrice;
    use crate::route::RouteTable;
    use std::collections::BTreeMap;
    use std::path::Path;

    const YAML: &str = r#"
listen: { proxy: "127.0.0.1:1" }
routes:
  - { name: oa, prefix: /v1, provider: openai, upstreams: ["http://127.0.0.1:9/v1"], key: "env:OA", capture: { request: 8, response: 8 } }
"#;

    fn route() -> Arc<Route> {
        let c = Config::from_yaml(YAML, Path::new("."), &|_| Some("sk".into())).unwrap();
        RouteTable::new(&c.routes)
            .unwrap()
            .find("/v1/chat/completions")
            .unwrap()
            .clone()
    }

    fn pricing() -> Pricing {
        let price = RawPrice {
            input: 1.0,
            cached_input: None,
            output: 2.0,
        };
        Pricing::new(&BTreeMap::from([("m".to_string(), price)]))
    }

    fn end(status: u16, outcome: &'static str) -> End<'static> {
        End {
            status,
            outcome,
            detail: None,
            client_addr: Some("127.0.0.1:5".into()),
            user_agent: Some("ua".into()),
        }
    }

    fn info(model: &str, stream: bool) -> RequestInfo {
        RequestInfo {
            model: Some(model.into()),
            stream,
            ..RequestInfo::default()
        }
    }

    /// A tap that read `body` (of `kind`) whole.
    fn tap(kind: TapKind, body: &str) -> Tap {
        let start = Instant::now();
        let mut t = Tap::new(kind, start);
        t.feed(body.as_bytes(), start, &mut |_| {});
        t.finish();
        t
    }

    const JSON_OK: &str = r#"{"model":"m","choices":[{"finish_reason":"stop","message":{"content":"hi"}}],"usage":{"prompt_tokens":10,"completion_tokens":5}}"#;

    fn answered<'a>(route: &'a Arc<Route>, info: &'a RequestInfo, tap: &'a Tap) -> Facts<'a> {
        let mut f = Facts::head("rid", Instant::now(), SystemTime::now());
        f.route = Some(route);
        f.tenant = Some("t");
        f.request_info = Some(info);
        f.tap = Some(tap);
        f.upstream_status = Some(200);
        f.ttfb = Some(Duration::from_millis(7));
        f.attempts = 1;
        f
    }

    fn build(f: &Facts<'_>, end: End<'_>) -> Row {
        let p = pricing();
        let a = Account::of(&p, f, &end);
        row(f, end, &a, "relay-1")
    }

    #[test]
    fn an_answered_request_has_its_usage_cost_and_times() {
        let (r, i, t) = (route(), info("m", false), tap(TapKind::Json, JSON_OK));
        let mut f = answered(&r, &i, &t);
        f.client_request_id = Some("cid");
        f.request_bytes = 20;
        f.response_bytes = JSON_OK.len() as u64;
        f.captured_request = b"{\"model\"";
        f.captured_response = b"{\"model\"";
        let row = build(&f, end(200, "ok"));
        assert_eq!(row.request_id, "rid");
        assert_eq!(row.client_request_id.as_deref(), Some("cid"));
        assert_eq!(row.instance, "relay-1");
        assert_eq!(
            (row.tenant.as_deref(), row.route.as_deref()),
            (Some("t"), Some("oa"))
        );
        assert_eq!(row.provider.as_deref(), Some("openai"));
        assert_eq!(row.model.as_deref(), Some("m"));
        assert_eq!((row.status, row.upstream_status), (200, Some(200)));
        assert_eq!((&*row.outcome, row.error.as_deref()), ("ok", None));
        assert_eq!((row.tokens_in, row.tokens_out), (Some(10), Some(5)));
        // 10 input tokens at $1/M and 5 output at $2/M.
        assert!((row.cost_usd.unwrap() - 20e-6).abs() < 1e-12);
        assert_eq!(row.ttfb_ms, Some(7.0));
        assert_eq!(row.finish_reason.as_deref(), Some("stop"));
        assert!(!row.usage_unknown && !row.stream);
        assert_eq!((row.request_bytes, row.attempts), (20, 1));
        assert_eq!(row.request_body.as_deref(), Some("{\"model\""));
        assert_eq!(row.user_agent.as_deref(), Some("ua"));
        assert_eq!(row.client_addr.as_deref(), Some("127.0.0.1:5"));
    }

    #[test]
    fn a_stream_has_its_time_to_first_token_and_no_audio_time() {
        let sse = "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
                   data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n\
                   data: [DONE]\n\n";
        let (r, i, t) = (route(), info("m", true), tap(TapKind::OpenAiSse, sse));
        let row = build(&answered(&r, &i, &t), end(200, "ok"));
        assert!(row.stream);
        assert!(row.ttft_ms.is_some() && row.ttfa_ms.is_none());
        assert_eq!((row.tokens_in, row.tokens_out), (Some(3), Some(1)));
    }

    #[test]
    fn an_answer_without_usage_is_marked_unknown_not_zero() {
        let body = r#"{"model":"m","choices":[]}"#;
        let (r, i, t) = (route(), info("m", false), tap(TapKind::Json, body));
        let row = build(&answered(&r, &i, &t), end(200, "ok"));
        assert!(row.usage_unknown);
        assert_eq!(
            (row.tokens_in, row.tokens_out, row.cost_usd),
            (None, None, None)
        );
    }

    #[test]
    fn an_upstream_error_status_is_the_error_kind_of_an_ok_outcome() {
        let body = r#"{"error":{"message":"no"}}"#;
        let (r, i, t) = (route(), info("m", false), tap(TapKind::Json, body));
        for (status, kind) in [(503, "upstream_5xx"), (400, "upstream_4xx")] {
            let mut f = answered(&r, &i, &t);
            f.upstream_status = Some(status);
            let row = build(&f, end(status, "ok"));
            assert_eq!(row.error.as_deref(), Some(kind));
            // Not a 2xx: no usage is owed.
            assert!(!row.usage_unknown);
        }
    }

    #[test]
    fn an_error_event_in_a_stream_is_its_error_kind() {
        let sse = "data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        let (r, i, t) = (route(), info("m", true), tap(TapKind::OpenAiSse, sse));
        let row = build(&answered(&r, &i, &t), end(200, "ok"));
        assert_eq!(row.error.as_deref(), Some("stream_error"));
    }

    #[test]
    fn a_refusal_names_what_was_known_and_nothing_else() {
        let r = route();
        let mut f = Facts::head("rid", Instant::now(), SystemTime::now());
        f.route = Some(&r);
        let e = RelayError::InvalidKey;
        let row = build(&f, end(e.status(), e.kind()));
        assert_eq!((row.status, &*row.outcome), (401, "invalid_key"));
        assert_eq!(row.error.as_deref(), Some("invalid_key"));
        assert_eq!(
            (row.tenant, row.upstream_status, row.attempts),
            (None, None, 0)
        );
        assert_eq!((row.model, row.tokens_in, row.ttfb_ms), (None, None, None));
        assert!(!row.usage_unknown);
        // Nothing was captured: the body column holds an empty capture, not a guess.
        assert_eq!(row.request_body.as_deref(), Some(""));
        // Without a route: no route, no provider, no capture columns.
        let f = Facts::head("rid", Instant::now(), SystemTime::now());
        let row = build(&f, end(404, "no_route"));
        assert_eq!(
            (row.route, row.provider, row.request_body),
            (None, None, None)
        );
    }

    #[test]
    fn the_detail_of_a_failure_follows_its_kind() {
        let (r, i) = (route(), info("m", false));
        for outcome in [
            "client_disconnect",
            "shutdown",
            "stream_stalled",
            "upstream_timeout",
        ] {
            let mut f = Facts::head("rid", Instant::now(), SystemTime::now());
            f.route = Some(&r);
            f.request_info = Some(&i);
            let detail = "what went wrong";
            let e = End {
                detail: Some(&detail),
                ..end(0, outcome)
            };
            let row = build(&f, e);
            assert_eq!(row.outcome, outcome);
            assert_eq!(row.error.unwrap(), format!("{outcome}: what went wrong"));
            // A request that never got an answer owes no usage.
            assert!(!row.usage_unknown);
            assert_eq!(row.model.as_deref(), Some("m"));
        }
    }

    #[test]
    fn a_model_is_accounted_to_the_priced_name() {
        let p = pricing();
        assert_eq!(
            accounted_model(&p, Some("m"), Some("m-2024")),
            (Some("m"), "m")
        );
        assert_eq!(
            accounted_model(&p, Some("alias"), Some("m")),
            (Some("m"), "m")
        );
        assert_eq!(
            accounted_model(&p, Some("x"), Some("y")),
            (Some("x"), "other")
        );
        assert_eq!(accounted_model(&p, None, None), (None, "other"));
    }
}
