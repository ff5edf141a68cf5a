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

/// The close frame the relay sends a WebSocket client whose session it ends (by
/// `deadline`), or whose upstream failed (`None`): 1001 at shutdown, 1000 at the idle
/// limit, 1008 past the longest life, 1011 for a failed upstream.
pub fn session_close_frame(deadline: Option<Deadline>) -> bytes::Bytes {
    let (code, reason) = match deadline {
        Some(Deadline::Shutdown) => (1001, "relay shutting down"),
        Some(Deadline::Gap) => (1000, "session idle"),
        Some(Deadline::Total) => (1008, "session too long"),
        Some(Deadline::Budget) => (1008, "budget exceeded"),
        _ => (1011, "upstream failed"),
    };
    bytes::Bytes::from(crate::websocket::close_frame(code, reason))
}

/// A WebSocket session whose upstream failed: the client gets a close frame when the
/// server's frames are between two (else the connection just closes); nothing when the
/// client is the one that went away. (A session the relay ends itself ends cleanly
/// upstream, and its close frame goes out with the end of the response body.)
pub async fn end_session(session: &mut Session, ctx: &RequestCtx, e: &Error) -> FailToProxy {
    let a = ctx.admitted.as_deref();
    let client_gone = e.esource() == &ErrorSource::Downstream;
    if !client_gone && a.is_some_and(|a| a.answer.may_close_session()) {
        let frame = session_close_frame(a.and_then(|a| a.stalled()));
        let downstream = session.as_downstream_mut();
        if let Err(we) = downstream.write_response_body(frame, true).await {
            warn!("{}: cannot write the close frame: {we}", ctx.request_id);
        }
    }
    FailToProxy {
        error_code: 0,
        can_reuse_downstream: false,
    }
}

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
