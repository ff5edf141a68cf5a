//! Response stage (`upstream_response_filter`, `response_filter` and the two body
//! filters): the upstream's answer. Its status and time to first byte, which tap reads
//! its body, the head the client gets (scrubbed, with the request id and the limit
//! headers), and each body chunk: into the tap as it came from the upstream, then (on
//! its way to the client) without the usage chunk the relay asked for itself.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora_core::Result;
use pingora_http::ResponseHeader;

use super::body::keep_bytes;
use crate::limits::Admission;
use crate::metrics::{Metrics, StreamHandles};
use crate::recorder::Facts;
use crate::route::Route;
use crate::stall::StallGuard;
use crate::tap::strip::UsageStripper;
use crate::tap::{Tap, TapKind};
use crate::websocket::FrameReader;

/// The response header a non-streaming answer carries: the relay's own time, in
/// milliseconds (routing, authentication and header handling; not the upstream's).
pub const OVERHEAD_HEADER: &str = "x-relay-overhead-ms";

/// What the relay learns of the upstream's answer.
#[derive(Default)]
pub struct Answer {
    pub upstream_status: Option<u16>,
    /// Since the request began.
    pub ttfb: Option<Duration>,
    pub bytes: u64,
    pub tap: Option<Tap>,
    /// A stream's gap histogram and its place in the open-streams gauge.
    pub stream: Option<StreamHandles>,
    /// Set when the relay added `include_usage` to the request: the response's usage
    /// chunk is removed on its way to the client.
    pub strip_usage: Option<UsageStripper>,
    /// The upstream answered in a content encoding the tap cannot read.
    encoded: bool,
    /// Body bytes kept for the row (the route's `capture`).
    captured: Vec<u8>,
    /// A WebSocket session (the upstream switched): the client's frames, counted as
    /// they pass (the server's are read by the tap), and their bytes.
    client_frames: Option<Box<FrameReader>>,
    client_bytes: u64,
    /// The relay sent the client a close frame of its own.
    close_sent: bool,
    /// The body's end went to the client.
    pub body_sent: bool,
    /// What the client got, kept for the response cache.
    pub cache_capture: Option<crate::cache::Capture>,
    /// The answer's content type, as the upstream sent it.
    pub content_type: Option<String>,
}

impl Answer {
    /// A new attempt starts with no answer.
    pub fn reset(&mut self) {
        self.upstream_status = None;
        self.ttfb = None;
    }

    /// The answer's part of the request's record.
    pub fn add_facts<'a>(&'a self, f: &mut Facts<'a>) {
        f.tap = self.tap.as_ref();
        f.upstream_status = self.upstream_status;
        f.ttfb = self.ttfb;
        f.response_bytes = self.bytes;
        f.captured_response = &self.captured;
        f.encoded_answer = self.encoded;
        if let Some(client) = &self.client_frames {
            f.request_bytes += self.client_bytes;
            let server = self.tap.as_ref().and_then(Tap::frames);
            f.frames = Some((client.frames, server.map_or(0, |s| s.frames)));
        }
    }

    /// The upstream switched to a WebSocket (`101`, `start`: of the request): its
    /// frames are read from now on, and it counts as an open session.
    pub fn session_started(&mut self, start: Instant, route: &Route, metrics: &Metrics) {
        self.upstream_status = Some(101);
        self.ttfb = Some(start.elapsed());
        self.stream = Some(metrics.session_started(&route.name));
        self.tap = Some(Tap::new(TapKind::WebSocket, start));
        self.client_frames = Some(Box::new(FrameReader::new(false)));
    }

    /// A WebSocket session is open: the request's body is the client's frames.
    pub fn in_session(&self) -> bool {
        self.client_frames.is_some()
    }

    /// Client frames on their way to the upstream: counted, and they keep the session
    /// from idling.
    pub fn client_frames(&mut self, body: &Option<Bytes>, stall: Option<&StallGuard>) {
        let (Some(b), Some(frames)) = (body, &mut self.client_frames) else {
            return;
        };
        self.client_bytes += b.len() as u64;
        frames.feed(b, &mut |_| false);
        if let Some(g) = stall {
            g.chunk(Instant::now());
        }
    }

    /// A frame of the relay's own may go to the client now: the server's frames are
    /// between two, and no close frame went by (the server's, or the relay's).
    pub fn may_close_session(&self) -> bool {
        !self.close_sent
            && self
                .tap
                .as_ref()
                .and_then(Tap::frames)
                .is_some_and(|f| f.at_boundary() && !f.closed)
    }

    /// The last chunk of a session the relay ended (its guard cut the upstream, which
    /// the proxy sees as the session's end): the client's close frame goes with it.
    pub fn close_session(&mut self, body: &mut Option<Bytes>, frame: Bytes) {
        if !self.may_close_session() {
            return;
        }
        self.close_sent = true;
        *body = Some(match body.take() {
            Some(b) if !b.is_empty() => [b, frame].concat().into(),
            _ => frame,
        });
    }

    /// The response head the client will get (`start`: of the request): its status,
    /// its time, and the tap that reads its body.
    pub fn head(
        &mut self,
        resp: &ResponseHeader,
        start: Instant,
        route: &Route,
        metrics: &Metrics,
    ) {
        self.upstream_status = Some(resp.status.as_u16());
        self.ttfb = Some(start.elapsed());
        let content_type = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .map_or(&b""[..], |v| v.as_bytes());
        self.content_type = std::str::from_utf8(content_type).ok().map(str::to_string);
        // The relay asks for no compression; an upstream that compresses anyway cannot be
        // read as it passes, and its row says so.
        self.encoded = resp
            .headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let kind = if self.encoded {
            TapKind::None
        } else {
            TapKind::choose(route.provider, content_type)
        };
        if matches!(
            kind,
            TapKind::OpenAiSse | TapKind::AnthropicSse | TapKind::Audio
        ) {
            self.stream = Some(metrics.stream_started(&route.name));
        }
        self.tap = Some(Tap::new(kind, start));
    }

    /// A chunk as it came from the upstream: counted, timed and read by the tap.
    pub fn upstream_chunk(&mut self, body: &Option<Bytes>, end: bool, stall: Option<&StallGuard>) {
        if let Some(b) = body {
            self.bytes += b.len() as u64;
            let now = Instant::now();
            if let Some(g) = stall {
                g.chunk(now);
            }
            if let Some(tap) = &mut self.tap {
                match &self.stream {
                    Some(s) => tap.feed(b, now, &mut |gap| s.gap.observe(gap.as_secs_f64())),
                    None => tap.feed(b, now, &mut |_| {}),
                }
            }
        }
        if end {
            if let Some(g) = stall {
                g.done();
            }
            if let Some(tap) = &mut self.tap {
                tap.finish();
            }
        }
    }

    /// A chunk on its way to the client: the usage chunk the relay asked for is
    /// removed, and what goes out is kept for the row up to `capture` bytes.
    pub fn client_chunk(&mut self, body: &mut Option<Bytes>, end: bool, capture: usize) {
        let is_sse = self
            .tap
            .as_ref()
            .is_some_and(|t| t.kind() == TapKind::OpenAiSse);
        if let (Some(stripper), true) = (&mut self.strip_usage, is_sse) {
            let out = stripper.feed(body.as_deref().unwrap_or_default(), end);
            // Nothing to send yet is `None`: an empty chunk would end a chunked body.
            *body = (!out.is_empty()).then_some(out);
        }
        if let Some(b) = body.as_ref() {
            keep_bytes(&mut self.captured, b, capture);
            if let Some(c) = &mut self.cache_capture {
                c.feed(b);
            }
        }
        self.body_sent |= end;
    }

    /// The answer ended an SSE stream (an error event can still end it cleanly).
    pub fn is_sse(&self) -> bool {
        self.tap
            .as_ref()
            .is_some_and(|t| matches!(t.kind(), TapKind::OpenAiSse | TapKind::AnthropicSse))
    }
}

/// The head the client gets: scrubbed of what the provider says of itself and of the
/// operator's account, with the request id, the tenant's limit headers, and (for an
/// answer that is not a stream) the relay's own time (`overhead`).
pub fn client_head(
    resp: &mut ResponseHeader,
    answer_id: &str,
    admission: Option<&Admission>,
    overhead: Option<Duration>,
) -> Result<()> {
    let own_limits = admission.is_some_and(|a| a.requests.is_some() || a.tokens.is_some());
    crate::policy::scrub_response(resp, own_limits);
    resp.insert_header(crate::request_id::HEADER, answer_id)?;
    if let Some(a) = admission {
        crate::limits::append_headers(resp, a.requests.as_ref(), a.tokens.as_ref())?;
    }
    if let Some(overhead) = overhead {
        resp.insert_header(
            OVERHEAD_HEADER,
            format!("{:.3}", overhead.as_secs_f64() * 1000.0),
        )?;
    }
    Ok(())
}
