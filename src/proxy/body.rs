//! Request stage (`request_filter`, `upstream_request_filter`, `request_body_filter`):
//! the request body. One state machine reads it, whether the relay read it whole before
//! choosing an upstream (a small body with a length) or it flows to the upstream as
//! Pingora reads it: the body is counted, kept for the row (the route's `capture`), its
//! fields read (model, stream, max_tokens) and, where the route says so, rewritten
//! (usage asked for on a chat stream, `store` turned off).

use bytes::Bytes;
use pingora_core::Result;
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use crate::error::RelayError;
use crate::request_info::{self, BodyCollector, BodyEnd, BodyStep, RequestInfo, Rewrite};
use crate::route::Route;

/// The request body as far as the relay has seen it.
pub struct RequestBody {
    /// Body bytes received from the client.
    pub bytes: u64,
    /// The fields read from it, once it ended.
    pub info: Option<RequestInfo>,
    captured: Vec<u8>,
    capture_limit: usize,
    max_bytes: usize,
    collector: BodyCollector,
    mode: Mode,
}

enum Mode {
    /// It flows chunk by chunk; `offset`: bytes this attempt passed (a retry replays the
    /// body from its start).
    Flowing { offset: u64 },
    /// Read whole in `request_filter`; Pingora replays it from its retry buffer, and
    /// `instead` (when the route rewrote it) is sent in its place.
    Read { instead: Option<Bytes> },
}

/// A body that ended; `usage_added`: the relay asked for usage the client did not, so
/// the usage chunk must not reach the client.
pub struct Ended {
    pub usage_added: bool,
}

impl RequestBody {
    pub fn new(route: &Route) -> RequestBody {
        RequestBody {
            bytes: 0,
            info: None,
            captured: Vec::new(),
            capture_limit: route.capture.request,
            max_bytes: route.max_body_bytes,
            collector: BodyCollector::default(),
            mode: Mode::Flowing { offset: 0 },
        }
    }

    /// The body was read whole before an upstream was chosen.
    pub fn was_read(&self) -> bool {
        matches!(self.mode, Mode::Read { .. })
    }

    /// The bytes kept for the row.
    pub fn captured(&self) -> &[u8] {
        &self.captured
    }

    /// Takes a body read whole before an upstream was chosen.
    pub fn read_whole(
        &mut self,
        body: &[u8],
        rewrite: Rewrite,
        json_required: bool,
    ) -> std::result::Result<Ended, RelayError> {
        self.bytes = body.len() as u64;
        keep_bytes(&mut self.captured, body, self.capture_limit);
        self.collector.reset(rewrite);
        let (step, end) = self.collector.step(body, true);
        // A body the route may rewrite but did not need to goes as it came: Pingora sends
        // it from its retry buffer, and no copy is kept.
        let instead = match step {
            BodyStep::Replace(b) if b[..] != body[..] => Some(b),
            _ => None,
        };
        self.mode = Mode::Read { instead };
        self.judge_end(end.unwrap_or_default(), json_required)
    }

    /// Readies the upstream request head of a new attempt for the body (`rewrite`: what
    /// the route changes in a body that flows; a body read whole was read already).
    pub fn start_attempt(&mut self, req: &mut RequestHeader, rewrite: Rewrite) -> Result<()> {
        match &mut self.mode {
            Mode::Read { instead } => {
                // Read (and `100 Continue` answered) already: the body goes at once, and
                // its length is known.
                req.remove_header(&http::header::EXPECT);
                if let Some(rewritten) = instead {
                    req.insert_header(http::header::CONTENT_LENGTH, rewritten.len())?;
                }
            }
            Mode::Flowing { offset } => {
                // A body the route may rewrite is held and may grow (`stream_options`,
                // `store`): its length is not known yet, so it goes upstream chunked.
                if rewrite.any() {
                    req.remove_header(&http::header::CONTENT_LENGTH);
                    req.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
                }
                self.collector.reset(rewrite);
                *offset = 0;
            }
        }
        Ok(())
    }

    /// Takes one chunk on its way upstream (`end`: the last one); it may be replaced by
    /// what is sent instead. `Ok(Some)` once a flowing body ended.
    pub fn chunk(
        &mut self,
        body: &mut Option<Bytes>,
        end: bool,
        json_required: bool,
    ) -> std::result::Result<Option<Ended>, RelayError> {
        let offset = match &mut self.mode {
            Mode::Read { instead } => {
                // Pingora replays the body read in request_filter as one piece.
                if let (Some(rewritten), Some(_)) = (instead, body.as_ref()) {
                    *body = Some(rewritten.clone());
                }
                return Ok(None);
            }
            Mode::Flowing { offset } => offset,
        };
        let len = body.as_ref().map_or(0, |b| b.len() as u64);
        let start = *offset;
        *offset += len;
        if *offset > self.bytes {
            // Only bytes past what earlier attempts saw are new.
            let fresh = (self.bytes - start) as usize;
            self.bytes = *offset;
            if let Some(b) = body.as_ref() {
                keep_bytes(&mut self.captured, &b[fresh..], self.capture_limit);
            }
            if self.bytes > self.max_bytes as u64 {
                // A body without a length that outgrew the cap: what went upstream is an
                // incomplete request, which the upstream cannot act on.
                let max = self.max_bytes;
                return Err(RelayError::BodyTooLarge { max });
            }
        }
        let (step, ended) = self
            .collector
            .step(body.as_deref().unwrap_or_default(), end);
        if let BodyStep::Replace(b) = step {
            *body = Some(b);
        }
        match ended {
            Some(e) => self.judge_end(e, json_required).map(Some),
            None => Ok(None),
        }
    }

    /// A body's end: its fields, or why it is refused.
    fn judge_end(
        &mut self,
        end: BodyEnd,
        json_required: bool,
    ) -> std::result::Result<Ended, RelayError> {
        if let Some(p) = end.problem {
            return Err(RelayError::BodyField(p.0));
        }
        if end.unreadable {
            let max = request_info::MAX_READ;
            return Err(RelayError::BodyTooLarge { max });
        }
        if end.invalid_json && json_required {
            return Err(RelayError::InvalidJson);
        }
        self.info = end.info;
        Ok(Ended {
            usage_added: end.usage_added,
        })
    }
}

/// What the route may change in this request's body: usage asked for on a chat stream
/// (`ensure_usage`), `store` turned off (`store: force_off`). `provider_path`: the path
/// the provider sees, which is what the endpoints were checked against.
pub fn rewrite_for(route: &Route, method: &http::Method, provider_path: &str) -> Rewrite {
    Rewrite {
        usage: route.ensure_usage
            && *method == http::Method::POST
            && provider_path.ends_with("/chat/completions"),
        store_off: route.policy.store == crate::policy::Store::ForceOff
            && crate::policy::stores(method, provider_path),
    }
}

/// Reads a body announced as `len` bytes (at most [`request_info::EARLY_READ_MAX`]) into
/// Pingora's retry buffer, from which Pingora sends it upstream.
pub async fn read_small(session: &mut Session, len: usize) -> Result<Vec<u8>> {
    let downstream = session.as_mut();
    // A client that waits for `100 Continue` gets it from the relay, which is the one
    // reading the body now (the upstream request goes without `expect`).
    if downstream
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        downstream.write_continue_response().await?;
    }
    downstream.enable_retry_buffering();
    let mut body = Vec::with_capacity(len);
    while let Some(chunk) = downstream.read_request_body().await? {
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Appends what fits under `limit` of `chunk` to `kept`.
pub fn keep_bytes(kept: &mut Vec<u8>, chunk: &[u8], limit: usize) {
    let room = limit.saturating_sub(kept.len());
    kept.extend_from_slice(&chunk[..room.min(chunk.len())]);
}
