//! Observation stage (`logging`): the one row every request yields (refusals, errors and
//! disconnects included), built from what the hooks learned. Pure; the sink writes it.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// A request's row. Times are milliseconds; `None` fields were not known (a token count
/// the provider did not give is `null`, never 0).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// The relay's own id of the request (never the client's).
    pub request_id: String,
    /// The `x-request-id` the client sent, when it was sane.
    #[serde(default)]
    pub client_request_id: Option<String>,
    /// Unix time of the request head, in milliseconds.
    pub time_ms: u64,
    pub instance: String,
    pub tenant: Option<String>,
    pub route: Option<String>,
    pub provider: Option<Cow<'static, str>>,
    pub model: Option<String>,
    pub stream: bool,
    /// Status sent to the client (0: none could be sent).
    pub status: u16,
    pub upstream_status: Option<u16>,
    /// ok, a refusal kind, upstream_unavailable, upstream_timeout, client_disconnect...
    pub outcome: Cow<'static, str>,
    pub error: Option<String>,
    pub attempts: u32,
    pub ttfb_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub ttfa_ms: Option<f64>,
    pub max_gap_ms: Option<f64>,
    pub duration_ms: f64,
    pub tokens_in: Option<u64>,
    pub tokens_out: Option<u64>,
    pub tokens_cached: Option<u64>,
    pub tokens_reasoning: Option<u64>,
    pub cost_usd: Option<f64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub finish_reason: Option<String>,
    /// A model request the provider answered without telling its usage (a cut stream,
    /// an unreadable or compressed body): its tokens are unknown, and the tenant's token
    /// limit kept the whole estimate.
    #[serde(default)]
    pub usage_unknown: bool,
    /// A WebSocket session's frames from the client and from the server (`None`: not a
    /// session, and then not written in a JSON row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_from_client: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_from_server: Option<u64>,
    /// The budget that decided (the one with the least left, or the one that refused),
    /// what it decided (`ok`, `refused`, `audit_over`, `cut`, `unpriced`), and the
    /// dollars reserved and settled (`None`: the tenant has no budget for this request,
    /// and then not written in a JSON row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_decision: Option<Cow<'static, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_reserved_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_settled_usd: Option<f64>,
    /// What the route's response cache did (`hit`, `miss`, `store`, `refresh`,
    /// `bypass`), and for a hit what the original answer cost (`None`: the route does
    /// not cache, and then not written in a JSON row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cow<'static, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_saved_usd: Option<f64>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    /// The request body as received, when the route captures it (`capture.request`);
    /// cut at the route's cap. Bytes that are not UTF-8 are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_body: Option<String>,
    /// The response body as sent to the client, when the route captures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn text_len(s: &Option<String>) -> usize {
    s.as_ref().map_or(0, String::len)
}

impl Row {
    /// Roughly what the row weighs in a batch: fixed columns plus its strings.
    pub fn approx_bytes(&self) -> usize {
        160 + self.request_id.len()
            + text_len(&self.client_request_id)
            + self.instance.len()
            + text_len(&self.tenant)
            + text_len(&self.route)
            + text_len(&self.model)
            + text_len(&self.error)
            + text_len(&self.finish_reason)
            + text_len(&self.client_addr)
            + text_len(&self.user_agent)
            + text_len(&self.request_body)
            + text_len(&self.response_body)
    }

    /// One JSON line (with its newline).
    pub fn to_json_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a row always serializes");
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_row() -> Row {
        Row {
            request_id: "r1".into(),
            client_request_id: Some("client-1".into()),
            usage_unknown: false,
            time_ms: 1_700_000_000_000,
            instance: "relay-a".into(),
            tenant: Some("acme".into()),
            route: Some("openai".into()),
            provider: Some("openai".into()),
            model: Some("gpt-4o-mini".into()),
            stream: true,
            status: 200,
            upstream_status: Some(200),
            outcome: "ok".into(),
            error: None,
            attempts: 1,
            ttfb_ms: Some(80.5),
            ttft_ms: Some(120.0),
            ttfa_ms: None,
            max_gap_ms: Some(30.0),
            duration_ms: 900.0,
            tokens_in: None,
            tokens_out: None,
            tokens_cached: None,
            tokens_reasoning: None,
            cost_usd: None,
            request_bytes: 120,
            response_bytes: 2000,
            finish_reason: Some("stop".into()),
            frames_from_client: None,
            frames_from_server: None,
            budget: Some("tenant:acme".into()),
            budget_decision: Some("ok".into()),
            budget_reserved_usd: Some(0.002),
            budget_settled_usd: Some(0.0001),
            cache: Some("store".into()),
            cache_saved_usd: None,
            client_addr: Some("127.0.0.1:5000".into()),
            user_agent: None,
            request_body: None,
            response_body: None,
        }
    }

    #[test]
    fn unknown_counts_are_null_not_zero() {
        let row = sample_row();
        let line = row.to_json_line();
        assert_eq!(*line.last().unwrap(), b'\n');
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert!(v["tokens_in"].is_null() && v["cost_usd"].is_null());
        assert_eq!(v["ttft_ms"], 120.0);
        assert_eq!(v["outcome"], "ok");
        let back: Row = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, row);
    }
}
