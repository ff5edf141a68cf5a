//! Admission stage (`request_filter`, `logging`): per-tenant limits on requests per
//! second and per minute, tokens per minute and concurrent open requests.
//!
//! A flow that spans hooks:
//! 1. `request_filter` asks [`Limiter::admit`] with the request's token estimate (its
//!    `max_tokens`, or the configured default, plus a quarter of its body bytes for the
//!    input). Admission counts the request and reserves the estimate.
//! 2. Success and refusal answers both carry the OpenAI-style `x-ratelimit-*` headers.
//! 3. `logging` settles the reservation with the provider's actual count, also after
//!    errors and disconnects (then the estimate stands, as the upstream may have worked).
//!    The concurrency slot is released when the request's context is dropped.

pub mod local;
pub mod redis;

use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_limits::inflight::Guard;

use serde::Deserialize;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    RequestsPerSecond,
    RequestsPerMinute,
    TokensPerMinute,
    Concurrency,
    /// The request's token estimate alone is over `tokens_per_minute`: no wait would
    /// ever admit it, so it is refused as a bad request, not a retryable 429.
    ExceedsLimit,
    /// The shared limiter could not be asked and the policy is to refuse.
    Unavailable,
}

impl LimitKind {
    pub fn label(self) -> &'static str {
        match self {
            LimitKind::RequestsPerSecond => "requests_per_second",
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::Concurrency => "concurrent_requests",
            LimitKind::ExceedsLimit => "tokens_exceed_limit",
            LimitKind::Unavailable => "limiter_unavailable",
        }
    }

    pub fn is_tokens(self) -> bool {
        self == LimitKind::TokensPerMinute
    }
}

/// The state of one limit after a decision, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub limit: u64,
    pub remaining: u64,
    /// Until the budget is whole again.
    pub reset: Duration,
}

/// What an admitted request holds until it ends.
pub struct Admission {
    /// Tokens reserved for it, settled at its end.
    pub reserved_tokens: u64,
    /// Its local concurrency slot, released on drop.
    pub slot: Option<Guard>,
    /// What the shared (Redis) limiter must be told at the end.
    pub shared: Option<SharedHold>,
    /// When the local token window the reservation was counted in ends (local limiter
    /// only). Unused tokens are given back only before then: handed to a later window
    /// they would be credit the tenant never had.
    pub window_ends: Option<Instant>,
    pub requests: Option<Budget>,
    pub tokens: Option<Budget>,
}

/// A reservation held in Redis: the token window it was counted in and the in-flight
/// set member holding its concurrency slot.
#[derive(Debug, Clone)]
pub struct SharedHold {
    pub tokens_key: String,
    pub member: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub kind: LimitKind,
    pub retry_after: Duration,
    pub requests: Option<Budget>,
    pub tokens: Option<Budget>,
}

const REQUEST_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const TOKEN_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// The header values OpenAI sends with every answer, in its own formats: counts as
/// integers, resets as durations like `1s`, `6m0s` or `250ms`.
pub fn headers(requests: Option<&Budget>, tokens: Option<&Budget>) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(6);
    for (b, names) in [(requests, REQUEST_HEADERS), (tokens, TOKEN_HEADERS)] {
        if let Some(b) = b {
            out.push((names[0], b.limit.to_string()));
            out.push((names[1], b.remaining.to_string()));
            out.push((names[2], openai_duration(b.reset)));
        }
    }
    out
}

/// Adds the `x-ratelimit-*` headers of an admitted request to its response, without the
/// string building of [`headers`] (this runs on every answered request).
pub fn append_headers(
    resp: &mut pingora_http::ResponseHeader,
    requests: Option<&Budget>,
    tokens: Option<&Budget>,
) -> pingora_core::Result<()> {
    for (b, names) in [(requests, REQUEST_HEADERS), (tokens, TOKEN_HEADERS)] {
        if let Some(b) = b {
            resp.append_header(names[0], http::HeaderValue::from(b.limit))?;
            resp.append_header(names[1], http::HeaderValue::from(b.remaining))?;
            resp.append_header(names[2], openai_duration(b.reset))?;
        }
    }
    Ok(())
}

/// `250ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs_f64().ceil() as u64;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// The token estimate a request is admitted against: its output cap (or the default)
/// plus its input estimate ([`input_tokens`]).
pub fn estimate_tokens(max_tokens: Option<u64>, default_max: u64, input_tokens: u64) -> u64 {
    max_tokens.unwrap_or(default_max) + input_tokens
}

/// The input tokens assumed for a body read whole: for text (UTF-8), a quarter of its
/// ASCII bytes (English text and JSON run at about four bytes a token) and one per
/// character beyond ASCII, which a quarter of its bytes would under-count (a CJK
/// character is three bytes and about a token; an emoji four bytes and one to three
/// tokens); never less than a quarter of all its bytes. Anything else (a multipart
/// upload with audio in it) counts as a body known only by its length.
pub fn input_tokens(body: &[u8]) -> u64 {
    if std::str::from_utf8(body).is_err() {
        return input_tokens_of_len(body.len());
    }
    let ascii = body.iter().filter(|b| b.is_ascii()).count() as u64;
    // A character beyond ASCII starts with a byte of 0b11xxxxxx.
    let wide = body.iter().filter(|&&b| b >= 0xC0).count() as u64;
    ascii.div_ceil(4) + wide
}

/// The input tokens assumed for a body known only by its length.
pub fn input_tokens_of_len(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// The refusal of a request whose estimate alone is over the tenant's token limit, if it
/// is: both limiters check this before counting anything.
pub fn exceeds_limit(limits: &Limits, tokens: u64) -> Option<Refused> {
    match limits.tokens_per_minute {
        Some(limit) if tokens > limit => Some(Refused {
            kind: LimitKind::ExceedsLimit,
            retry_after: Duration::ZERO,
            requests: None,
            tokens: None,
        }),
        _ => None,
    }
}

/// Limits are checked by one of these: the local one alone, or Redis shared by a fleet.
#[async_trait]
pub trait Limiter: Send + Sync {
    /// `request_id` names the request's concurrency slot where slots are shared.
    async fn admit(
        &self,
        tenant: &str,
        request_id: &str,
        limits: &Limits,
        tokens: u64,
    ) -> Result<Admission, Refused>;
    /// The request ended having used `actual` tokens (`None`: unknown, keep the
    /// reservation); its concurrency slot is released.
    async fn settle(
        &self,
        tenant: &str,
        limits: &Limits,
        admission: Admission,
        actual: Option<u64>,
    );
    /// Keeps the local windows on schedule: [`LimiterClock`] calls it every
    /// [`local::TICK`].
    fn tick(&self) {}
}

/// Turns the local limiter's windows over on time. pingora-limits' `Rate` starts a new
/// window at the first count after the old one ended, and takes the old one's count as
/// the previous window from that moment. On a quiet relay that moment was the retry of
/// a refused client, which then found the previous minute's whole count still standing
/// and was refused again (the wrong `Retry-After` of issue 17). Ticked, a window turns
/// over at most one tick late, whoever is counting.
pub struct LimiterClock(pub std::sync::Arc<dyn Limiter>);

#[async_trait]
impl pingora_core::services::background::BackgroundService for LimiterClock {
    async fn start(&self, _shutdown: pingora_core::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(local::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.0.tick();
        }
    }
}

/// Per-tenant limits; each is optional (absent: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub requests_per_second: Option<u64>,
    pub requests_per_minute: Option<u64>,
    /// Input plus output tokens per minute.
    pub tokens_per_minute: Option<u64>,
    /// Requests in flight at once (streams included).
    pub concurrent_requests: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_openai_format() {
        assert_eq!(openai_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(openai_duration(Duration::from_millis(1200)), "2s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn header_names_and_values() {
        let b = Budget {
            limit: 60,
            remaining: 59,
            reset: Duration::from_secs(1),
        };
        let h = headers(Some(&b), None);
        assert_eq!(
            h,
            [
                ("x-ratelimit-limit-requests", "60".to_string()),
                ("x-ratelimit-remaining-requests", "59".to_string()),
                ("x-ratelimit-reset-requests", "1s".to_string())
            ]
        );
    }

    #[test]
    fn estimates() {
        assert_eq!(estimate_tokens(Some(100), 1024, 100), 200);
        assert_eq!(estimate_tokens(None, 1024, 1), 1025);
        assert_eq!(input_tokens_of_len(401), 101);
        // ASCII at four bytes a token; each character beyond ASCII one token.
        assert_eq!(input_tokens(b"{\"input\":\"hello world\"}"), 6);
        assert_eq!(input_tokens("{\"input\":\"你好世界\"}".as_bytes()), 3 + 4);
        assert_eq!(input_tokens("é😀".as_bytes()), 2);
        // An escaped character (what Python's json writes) is six ASCII bytes.
        assert_eq!(input_tokens(br#""\u4f60\u597d""#), 4);
        // Not text (audio in a multipart upload): a quarter of its bytes, as before.
        let binary = [0xFFu8, 0xC3, 0x00, 0xE4, 0x80, 0x41, 0xF0, 0x9F];
        assert_eq!(input_tokens(&binary), 2);
    }
}
