//! Failure stage (`fail_to_proxy`): what a request that failed answers. A refusal of the relay's own is answered as it is; a
//! Pingora error is mapped to the relay's answer ([`classify_failure`]); a deadline
//! that passed ends the request the way its client expects ([`end_stalled`]).

use log::warn;
use pingora_core::{Error, ErrorSource, ErrorType};
use pingora_proxy::{FailToProxy, Session};

use super::ctx::RequestCtx;
use crate::answer::LocalAnswer;
use crate::error::RelayError;
use crate::stall::Deadline;

/// Maps a Pingora error to the relay's answer; `None` when the client is gone and no
/// answer can be written.
pub fn classify_failure(e: &Error) -> Option<RelayError> {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => None,
        (ErrorSource::Downstream, ReadTimedout | WriteTimedout) => None,
        (_, ConnectTimedout | ReadTimedout | WriteTimedout) => Some(RelayError::UpstreamTimeout),
        (ErrorSource::Upstream, _) => Some(RelayError::UpstreamUnavailable),
        (ErrorSource::Downstream, HTTPStatus(code)) if (400..500).contains(code) => {
            Some(RelayError::BadRequest)
        }
        (ErrorSource::Downstream, _) => Some(RelayError::BadRequest),
        _ => Some(RelayError::Internal),
    }
}

/// Ends a request whose body the relay refuses while it flows: the refusal is the
/// answer (`fail_to_proxy` writes it) and the row's outcome.
pub fn refuse_body(ctx: &mut RequestCtx, e: RelayError) -> Box<Error> {
    let status = e.status();
    ctx.refusal = Some(e);
    let mut err = Error::explain(ErrorType::HTTPStatus(status), "request body refused");
    err.set_retry(false);
    err
}

/// The answer to a request that failed: its refusal, or what its error maps to, in
/// the provider's shape; nothing when the client is gone.
pub async fn answer_failure(session: &mut Session, ctx: &RequestCtx, e: &Error) -> FailToProxy {
    let code = match ctx.refusal.clone().or_else(|| classify_failure(e)) {
        None => 0,
        Some(error) => {
            let answer = LocalAnswer::from(error);
            let downstream = session.as_downstream_mut();
            if let Err(we) = answer
                .write_error(downstream, ctx.shape, ctx.answer_id())
                .await
            {
                warn!("{}: cannot write the error answer: {we}", ctx.request_id);
            }
            answer.status()
        }
    };
    FailToProxy {
        error_code: code,
        can_reuse_downstream: false,
    }
}

/// A deadline passed: before the response head, a 504 in the provider's shape; in an
/// SSE stream, an error event in the provider's shape and a clean end, so the client's
/// SDK raises an error instead of waiting or seeing a cut; otherwise (JSON or audio
/// already under way) the connection is closed mid-body.
pub async fn end_stalled(
    session: &mut Session,
    ctx: &RequestCtx,
    deadline: Deadline,
) -> FailToProxy {
    let answer = LocalAnswer::from(RelayError::Stalled(deadline));
    let downstream = session.as_downstream_mut();
    let code = if downstream.response_written().is_none() {
        if let Err(we) = answer
            .write_error(downstream, ctx.shape, ctx.answer_id())
            .await
        {
            warn!("{}: cannot write the error answer: {we}", ctx.request_id);
        }
        answer.status()
    } else {
        if ctx.admitted.as_ref().is_some_and(|a| a.answer.is_sse()) {
            let event = answer.error.sse_event(ctx.shape);
            if let Err(we) = downstream.write_response_body(event, true).await {
                warn!("{}: cannot write the stall event: {we}", ctx.request_id);
            }
        }
        0
    };
    warn!(
        "{}: upstream {} after {:.1}s; the request was ended",
        ctx.request_id,
        deadline.outcome(),
        ctx.start.elapsed().as_secs_f64()
    );
    FailToProxy {
        error_code: code,
        can_reuse_downstream: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified() {
        let mut up = Error::new(ErrorType::ConnectRefused);
        up.as_up();
        assert_eq!(classify_failure(&up), Some(RelayError::UpstreamUnavailable));
        let mut t = Error::new(ErrorType::ReadTimedout);
        t.as_up();
        assert_eq!(classify_failure(&t), Some(RelayError::UpstreamTimeout));
        let mut gone = Error::new(ErrorType::ConnectionClosed);
        gone.as_down();
        assert_eq!(classify_failure(&gone), None);
    }
}
