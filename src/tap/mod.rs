//! Stream stage (`upstream_response_filter`, `response_body_filter`): reads the response
//! as it passes, without holding or changing a byte, and learns its timings and usage.
//!
//! **Time to first token (TTFT)**, defined once here: the time from the relay receiving
//! the request head to the arrival of the first response chunk that completes an event
//! carrying generated output:
//! - OpenAI chat streams: a delta with non-empty `content`, `reasoning_content`,
//!   `reasoning` or `refusal`, or any `tool_calls` / `function_call` delta. The first
//!   chunk that only sets `role` (with `content: ""`) is not output.
//! - Anthropic message streams: the first `content_block_delta` (text, thinking or tool
//!   input).
//! - OpenAI Responses streams: the first `response.*.delta` with content (text,
//!   refusal, reasoning, function-call arguments, audio); transcription streams: the
//!   first `transcript.text.delta`; speech as SSE: the first `speech.audio.delta`.
//! - Audio: the first body byte (time to first audio, TTFA).
//! - Non-streaming JSON has no first token; only its first byte is timed.
//!
//! Gaps are the times between consecutive output events. Usage comes from the
//! provider's own counts: OpenAI's final usage chunk or JSON body, the Responses API's
//! terminal event (`response.usage`), transcription's and speech's `*.done` event, Anthropic's
//! `message_start` (input) and last `message_delta` (output, cumulative: the last value
//! is kept, never summed). A usage of all zeros is taken as none given (unknown), never as
//! a free answer. Every tap is pure and takes the clock as an argument.

mod anthropic;
mod json;
mod openai;
mod realtime;
pub mod strip;
mod typed;

use std::time::{Duration, Instant};

use crate::provider::ProviderKind;
use crate::sse::SseReader;
use crate::websocket::{FrameReader, Seen};

/// Token counts as the provider reported them; `None` where it did not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: Option<u64>,
    pub output: Option<u64>,
    pub cached_input: Option<u64>,
    pub reasoning: Option<u64>,
}

impl Usage {
    /// Takes a provider's counts (input with its cached part, output with its reasoning
    /// part). A usage of nothing at all is a server that does not count, not a free
    /// answer: it is not taken, and the usage stays unknown.
    pub(crate) fn take(
        &mut self,
        input: Option<u64>,
        output: Option<u64>,
        cached: Option<u64>,
        reasoning: Option<u64>,
    ) {
        if counts_nothing(input, output) {
            return;
        }
        self.input = input.or(self.input);
        self.output = output.or(self.output);
        if cached.is_some() {
            self.cached_input = cached;
        }
        if reasoning.is_some() {
            self.reasoning = reasoning;
        }
    }

    /// Adds one more answer's counts (a session's responses), with the same rule for a
    /// usage of nothing at all.
    pub(crate) fn add(
        &mut self,
        input: Option<u64>,
        output: Option<u64>,
        cached: Option<u64>,
        reasoning: Option<u64>,
    ) {
        if counts_nothing(input, output) {
            return;
        }
        let sum = |a: &mut Option<u64>, b: Option<u64>| {
            if let Some(b) = b {
                *a = Some(a.unwrap_or(0) + b);
            }
        };
        sum(&mut self.input, input);
        sum(&mut self.output, output);
        sum(&mut self.cached_input, cached);
        sum(&mut self.reasoning, reasoning);
    }
}

/// Neither count given, or both zero: a server that does not count.
fn counts_nothing(input: Option<u64>, output: Option<u64>) -> bool {
    input.unwrap_or(0) == 0 && output.unwrap_or(0) == 0
}

/// What a tap learned about one response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measure {
    /// Request head to first output event (or first audio byte).
    pub first_output: Option<Duration>,
    /// Number of output events (content deltas, audio chunks).
    pub output_events: u64,
    /// Longest gap between two output events.
    pub max_gap: Option<Duration>,
    pub usage: Usage,
    pub finish_reason: Option<String>,
    /// The model the provider says answered.
    pub model: Option<String>,
    /// An error event in the stream (its type), e.g. Anthropic's `overloaded_error`.
    pub stream_error: Option<String>,
    /// The output is audio carried in events (speech as SSE): `first_output` is the
    /// time to first audio.
    pub audio_events: bool,
    /// OpenAI's `[DONE]` or Anthropic's `message_stop` was seen.
    pub finished: bool,
    /// An event was too large to read ([`crate::sse::MAX_EVENT`]) and went by unread:
    /// it may have carried usage, so `usage` may be incomplete.
    pub usage_unreadable: bool,
}

/// Which reader a response gets, from its content type and the route's provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapKind {
    OpenAiSse,
    AnthropicSse,
    Json,
    Audio,
    /// The server's side of a WebSocket session (Realtime events in text frames).
    WebSocket,
    None,
}

impl TapKind {
    pub fn choose(provider: ProviderKind, content_type: &[u8]) -> TapKind {
        let ct = content_type;
        let starts = |p: &[u8]| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p);
        if starts(b"text/event-stream") {
            match provider {
                ProviderKind::Anthropic => TapKind::AnthropicSse,
                _ => TapKind::OpenAiSse,
            }
        } else if starts(b"application/json") {
            TapKind::Json
        } else if starts(b"audio/") || starts(b"application/octet-stream") {
            TapKind::Audio
        } else {
            TapKind::None
        }
    }
}

/// The per-response reader. Feed it every body chunk with the time it arrived.
pub struct Tap {
    kind: TapKind,
    start: Instant,
    sse: SseReader,
    last_output: Option<Instant>,
    json: json::JsonBody,
    /// The server's frames, for a WebSocket session.
    frames: Option<Box<FrameReader>>,
    pub measure: Measure,
}

impl Tap {
    /// `start` is when the relay received the request head.
    pub fn new(kind: TapKind, start: Instant) -> Tap {
        Tap {
            kind,
            start,
            sse: SseReader::new(),
            last_output: None,
            json: json::JsonBody::default(),
            frames: (kind == TapKind::WebSocket).then(|| Box::new(FrameReader::new(true))),
            measure: Measure::default(),
        }
    }

    pub fn kind(&self) -> TapKind {
        self.kind
    }

    /// The server's frames of a WebSocket session.
    pub fn frames(&self) -> Option<&FrameReader> {
        self.frames.as_deref()
    }

    /// Reads one chunk that arrived at `now`. `on_gap` gets each gap between output
    /// events as it is seen (for a histogram).
    pub fn feed(&mut self, chunk: &[u8], now: Instant, on_gap: &mut dyn FnMut(Duration)) {
        match self.kind {
            TapKind::OpenAiSse | TapKind::AnthropicSse => {
                let is_anthropic = self.kind == TapKind::AnthropicSse;
                let mut outputs = 0u64;
                let m = &mut self.measure;
                self.sse.feed(chunk, |e| {
                    let output = if is_anthropic {
                        anthropic::event(e.name, e.data, m)
                    } else {
                        openai::event(e.name, e.data, m)
                    };
                    outputs += u64::from(output);
                });
                if self.sse.oversized() > 0 {
                    self.measure.usage_unreadable = true;
                }
                self.outputs(outputs, now, on_gap);
            }
            TapKind::Audio => {
                if !chunk.is_empty() {
                    self.outputs(1, now, on_gap);
                }
            }
            TapKind::Json => self.json.push(chunk),
            TapKind::WebSocket => self.feed_frames(chunk, now, on_gap),
            TapKind::None => {}
        }
    }

    /// Server frames of a session (see [`realtime`] for what is measured).
    fn feed_frames(&mut self, chunk: &[u8], now: Instant, on_gap: &mut dyn FnMut(Duration)) {
        let Some(reader) = self.frames.as_mut() else {
            return;
        };
        let m = &mut self.measure;
        let (mut outputs, mut restarted) = (0u64, false);
        reader.feed(chunk, &mut |seen| {
            let kind = match seen {
                Seen::Start(prefix) => match realtime::kind(prefix) {
                    realtime::Kind::Read => return true,
                    k => k,
                },
                Seen::Whole(message) => realtime::read(message, m),
                Seen::TooLarge => {
                    m.usage_unreadable = true;
                    return false;
                }
            };
            match kind {
                realtime::Kind::Output { audio } => {
                    outputs += 1;
                    m.audio_events |= audio;
                }
                realtime::Kind::ResponseCreated => restarted = true,
                _ => {}
            }
            false
        });
        if restarted {
            // Gaps are within a response; the first output is timed from its start.
            self.last_output = None;
            if self.measure.first_output.is_none() {
                self.start = now;
            }
        }
        self.outputs(outputs, now, on_gap);
    }

    /// Called once when the body has ended (or was cut): reads a buffered JSON body.
    pub fn finish(&mut self) {
        if self.kind == TapKind::Json {
            self.json.read_into(&mut self.measure);
        }
    }

    /// `n` output events arrived together at `now`.
    fn outputs(&mut self, n: u64, now: Instant, on_gap: &mut dyn FnMut(Duration)) {
        if n == 0 {
            return;
        }
        let m = &mut self.measure;
        match self.last_output {
            // (A session's later responses start over without a last output.)
            None if m.first_output.is_some() => {}
            None => m.first_output = Some(now.saturating_duration_since(self.start)),
            Some(last) => {
                let gap = now.saturating_duration_since(last);
                on_gap(gap);
                m.max_gap = Some(m.max_gap.map_or(gap, |g| g.max(gap)));
            }
        }
        // Events that arrive in the same chunk are zero apart.
        if n > 1 {
            m.max_gap = Some(m.max_gap.unwrap_or(Duration::ZERO));
        }
        for _ in 1..n {
            on_gap(Duration::ZERO);
        }
        m.output_events += n;
        self.last_output = Some(now);
    }
}

/// The quoted string value after `key` (e.g. `"finish_reason":`), unescaped only for
/// the plain case; `None` for `null` or a missing key.
pub(crate) fn string_after<'a>(data: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let i = memchr::memmem::find(data, key)? + key.len();
    string_at(&data[i..])
}

/// As [`string_after`], with a searcher made once: building one is most of the cost of
/// a search in an event of a few hundred bytes, and these run on every event.
pub(crate) fn string_after_with<'a>(
    data: &'a [u8],
    key: &memchr::memmem::Finder<'_>,
) -> Option<&'a [u8]> {
    let i = key.find(data)? + key.needle().len();
    string_at(&data[i..])
}

/// The plain quoted string at the start of `rest` (after whitespace).
fn string_at(rest: &[u8]) -> Option<&[u8]> {
    let rest = skip_ws(rest);
    let rest = rest.strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[end] == b'\\' {
        return None;
    }
    Some(&rest[..end])
}

pub(crate) fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn run(kind: TapKind, stream: &[u8], splits: &[usize]) -> Measure {
        let t0 = Instant::now();
        let mut tap = Tap::new(kind, t0);
        let mut last = 0;
        for (k, &s) in splits
            .iter()
            .chain(std::iter::once(&stream.len()))
            .enumerate()
        {
            let now = t0 + Duration::from_millis(10 * (k as u64 + 1));
            tap.feed(&stream[last..s], now, &mut |_| {});
            last = s;
        }
        tap.finish();
        tap.measure
    }

    #[test]
    fn choose_by_content_type_and_provider() {
        assert_eq!(
            TapKind::choose(ProviderKind::Openai, b"text/event-stream; charset=utf-8"),
            TapKind::OpenAiSse
        );
        assert_eq!(
            TapKind::choose(ProviderKind::Anthropic, b"text/event-stream"),
            TapKind::AnthropicSse
        );
        assert_eq!(
            TapKind::choose(ProviderKind::Audio, b"audio/mpeg"),
            TapKind::Audio
        );
        assert_eq!(
            TapKind::choose(ProviderKind::Openai, b"Application/JSON"),
            TapKind::Json
        );
        assert_eq!(
            TapKind::choose(ProviderKind::Openai, b"text/html"),
            TapKind::None
        );
    }

    #[test]
    fn audio_times_first_byte_and_counts_chunks() {
        let m = run(TapKind::Audio, &[7u8; 100], &[0, 10, 50]);
        // The first chunk is empty: the first byte is in the second, 20 ms in.
        assert_eq!(m.first_output, Some(Duration::from_millis(20)));
        assert_eq!(m.output_events, 3);
        assert_eq!(m.max_gap, Some(Duration::from_millis(10)));
    }

    #[test]
    fn an_event_too_large_to_read_marks_usage_unreadable() {
        let mut s =
            b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n".to_vec();
        let small = run(TapKind::OpenAiSse, &s, &[]);
        assert!(!small.usage_unreadable);
        s.extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\"");
        s.resize(s.len() + crate::sse::MAX_EVENT, b'x');
        s.extend_from_slice(b"\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n");
        let cuts: Vec<usize> = (1..s.len()).step_by(65_536).collect();
        for cuts in [&[][..], &cuts] {
            let m = run(TapKind::OpenAiSse, &s, cuts);
            assert!(m.usage_unreadable);
            // The events after the big one are read again.
            assert_eq!((m.usage.input, m.usage.output), (Some(3), Some(1)));
            assert!(m.finished);
            // The big event's content went unread: only the first counts as output.
            assert_eq!(m.output_events, 1);
            assert_eq!(m.model.as_deref(), Some("m"));
        }
    }

    #[test]
    fn string_after_reads_plain_strings_only() {
        assert_eq!(
            string_after(br#"{"finish_reason": "stop"}"#, b"\"finish_reason\":"),
            Some(&b"stop"[..])
        );
        assert_eq!(
            string_after(br#"{"finish_reason":null}"#, b"\"finish_reason\":"),
            None
        );
        assert_eq!(string_after(br#"{"x":"a\"b"}"#, b"\"x\":"), None);
    }
}
