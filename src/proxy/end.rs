//! End stage (`logging`): the one end of a request. Its outcome is named, what it learned
//! goes to the recorder (`crate::recorder`: metrics, access line, row), and its share of
//! the tenant's limits is settled to what it used.

use pingora_core::Error;
use pingora_proxy::Session;

use super::ctx::RequestCtx;
use super::failure::classify_failure;
use super::RelayProxy;
use crate::recorder::End;
use crate::tap::Usage;

/// The bounded outcome label for logs, metrics and the row.
pub fn outcome(ctx: &RequestCtx, e: Option<&Error>) -> &'static str {
    if let Some(r) = &ctx.refusal {
        return r.kind();
    }
    if let Some(a) = &ctx.admitted {
        match a.stalled() {
            Some(deadline) if a.answer.in_session() => return deadline.session_outcome(),
            Some(deadline) => return deadline.outcome(),
            None => {}
        }
    }
    let answered = ctx
        .admitted
        .as_ref()
        .is_some_and(|a| a.handshake_refused_upstream());
    match e {
        None => "ok",
        Some(e) => match classify_failure(e) {
            None if answered => "ok",
            None => "client_disconnect",
            Some(r) => r.kind(),
        },
    }
}

/// The tokens a finished request settles its reservation to: the provider's count when
/// it gave one; nothing when no upstream could be reached; otherwise (`None`) the
/// estimate stands (the upstream may have worked for a client that went away).
pub fn settled_tokens(usage: &Usage, outcome: &str) -> Option<u64> {
    match (usage.input, usage.output) {
        (Some(i), Some(o)) => Some(i + o),
        _ if outcome == "upstream_unavailable" => Some(0),
        _ => None,
    }
}

impl RelayProxy {
    pub(super) async fn end(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // Bodyless answers never reach the body filter's end: no deadline applies now.
        if let Some(a) = &ctx.admitted {
            a.stop_clock();
        }
        let end = End {
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            outcome: outcome(ctx, e),
            detail: e.map(|e| e as &(dyn std::fmt::Display + Sync)),
            client_addr: session.client_addr().map(|a| a.to_string()),
            user_agent: session
                .req_header()
                .headers
                .get(http::header::USER_AGENT)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        };
        let outcome = end.outcome;
        self.store_answer(ctx, outcome).await;
        let recorded = match ctx.recorder.take() {
            Some(recorder) => {
                let mut facts = ctx.facts();
                let req = session.req_header();
                facts.method = req.method.as_str();
                facts.path = req.uri.path();
                recorder.record(&facts, end)
            }
            None => Default::default(),
        };
        let usage = recorded.usage;
        let Some(a) = ctx.admitted.as_mut() else {
            return;
        };
        if let Some(hold) = a.budget.take() {
            hold.settle(recorded.settled.unwrap_or(0), usage.output)
                .await;
        }
        // The open-stream gauge is released here, whatever ended the request.
        a.answer.stream = None;
        if let Some(admission) = a.admission.take() {
            // The concurrency slot is freed here (or as `admission` drops). An answer
            // from the cache used no tokens.
            let hit = a.cache.as_ref().is_some_and(|p| p.hit.is_some());
            let actual = if hit {
                Some(0)
            } else {
                settled_tokens(&usage, outcome)
            };
            self.limiter
                .settle(&a.tenant, &a.limits, admission, actual)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_settles_to_the_count_or_to_nothing_when_unreached() {
        let both = Usage {
            input: Some(10),
            output: Some(5),
            ..Usage::default()
        };
        assert_eq!(settled_tokens(&both, "ok"), Some(15));
        assert_eq!(settled_tokens(&both, "client_disconnect"), Some(15));
        let half = Usage {
            input: Some(10),
            ..Usage::default()
        };
        assert_eq!(settled_tokens(&half, "client_disconnect"), None);
        assert_eq!(
            settled_tokens(&Usage::default(), "upstream_unavailable"),
            Some(0)
        );
        assert_eq!(settled_tokens(&Usage::default(), "ok"), None);
    }
}
