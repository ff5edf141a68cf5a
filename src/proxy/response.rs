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
        }
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
