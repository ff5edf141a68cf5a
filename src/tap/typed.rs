//! OpenAI's typed SSE events: Responses API streams (`/v1/responses`), streamed
//! transcriptions (`transcript.text.*`) and speech with `stream_format: "sse"`
//! (`speech.audio.*`). Each event has a `data:` object whose `type` names it, most often
//! repeated in an `event:` line; there is no `[DONE]`.
//!
//! - Responses: output is any `response.*.delta` event with something in its `delta`
//!   (text, refusal, reasoning, function-call arguments, audio); usage, the model and how
//!   the response ended come from the terminal event (`response.completed`,
//!   `response.incomplete` or `response.failed`), whose `response` is the whole answer.
//! - Transcription: output is a `transcript.text.delta`; usage is on
//!   `transcript.text.done`.
//! - Speech: output (time to first audio) is a `speech.audio.delta`; usage is on
//!   `speech.audio.done`.
//!
//! Events are read as they come and never changed: delta events carry an `obfuscation`
//! padding field that varies their size, so nothing here relies on sizes.

use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::Deserialize;

use super::{skip_ws, string_after, Measure, Usage};

static DELTA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"delta\":"));
static AUDIO: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"audio\":"));

/// The event's type when it is a Responses event: its name, or when a server sends no
/// `event:` line, the `type` its data starts with.
pub fn kind<'a>(name: &'a [u8], data: &'a [u8]) -> Option<&'a [u8]> {
    let is_ours = |k: &[u8]| {
        k.starts_with(b"response.")
            || k.starts_with(b"transcript.text.")
            || k.starts_with(b"speech.audio.")
            || k == b"error"
    };
    if !name.is_empty() {
        return is_ours(name).then_some(name);
    }
    // Chat completion chunks start with `id` or `object`; Responses events with `type`.
    let body = skip_ws(data).strip_prefix(b"{")?;
    if !skip_ws(body).starts_with(b"\"type\"") {
        return None;
    }
    string_after(data, b"\"type\":").filter(|k| is_ours(k))
}

/// Reads one event of type `kind`; true when it carries generated output.
pub fn event(kind: &[u8], data: &[u8], m: &mut Measure) -> bool {
    match kind {
        b"response.created" | b"response.in_progress" => {
            if m.model.is_none() {
                if let Some(model) = string_after(data, b"\"model\":") {
                    m.model = Some(String::from_utf8_lossy(model).into_owned());
                }
            }
            false
        }
        b"response.completed" | b"response.incomplete" | b"response.failed" => {
            m.finished = true;
            if let Ok(Terminal { response }) = serde_json::from_slice::<Terminal>(data) {
                response.read_into(m);
            }
            false
        }
        b"transcript.text.done" | b"speech.audio.done" => {
            m.finished = true;
            if let Ok(Done { usage: Some(u) }) = serde_json::from_slice::<Done>(data) {
                u.apply(&mut m.usage);
            }
            false
        }
        b"speech.audio.delta" => {
            m.audio_events = true;
            non_empty(data, &AUDIO)
        }
        b"error" => {
            m.stream_error = Some(error_code(data));
            false
        }
        k if k.ends_with(b".delta") => non_empty(data, &DELTA),
        _ => false,
    }
}

/// Whether the value after `key` is a non-empty string or any non-string value (an
/// audio or structured delta).
fn non_empty(data: &[u8], key: &Finder<'_>) -> bool {
    let Some(i) = key.find(data) else {
        return false;
    };
    match skip_ws(&data[i + key.needle().len()..]) {
        [b'"', b'"', ..] => false,
        [b'"', _, ..] => true,
        [b'n', b'u', b'l', b'l', ..] => false,
        [_, ..] => true,
        [] => false,
    }
}

/// The last event of a transcription or of speech: usage at its top level.
#[derive(Deserialize)]
struct Done {
    usage: Option<ResponseUsage>,
}

#[derive(Deserialize)]
struct Terminal {
    response: Response,
}

/// A whole Responses answer: the `response` of a terminal event, or a JSON body.
#[derive(Deserialize)]
pub(crate) struct Response {
    model: Option<String>,
    status: Option<String>,
    usage: Option<ResponseUsage>,
    incomplete_details: Option<Incomplete>,
    error: Option<ErrorObject>,
}

#[derive(Deserialize)]
struct Incomplete {
    reason: Option<String>,
}

#[derive(Deserialize)]
struct ErrorObject {
    code: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

impl ErrorObject {
    /// Its code, else its type.
    fn name(self) -> Option<String> {
        code_text(self.code).or(self.kind)
    }
}

/// An error code as text (a string as it is, a number written out); `None` for null.
fn code_text(code: Option<serde_json::Value>) -> Option<String> {
    match code? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

impl Response {
    pub(crate) fn read_into(self, m: &mut Measure) {
        if let Some(model) = self.model {
            m.model = Some(model);
        }
        // How it ended: the reason it is incomplete (`max_output_tokens`,
        // `content_filter`), else its status (`completed`, `failed`).
        if let Some(reason) = self.incomplete_details.and_then(|d| d.reason) {
            m.finish_reason = Some(reason);
        } else if let Some(status) = self.status {
            m.finish_reason = Some(status);
        }
        if let Some(e) = self.error {
            m.stream_error = Some(e.name().unwrap_or_else(|| "error".into()));
        }
        if let Some(u) = self.usage {
            u.apply(&mut m.usage);
        }
    }
}

/// Usage in the Responses shape (also transcription and speech): input includes the
/// cached part, output the reasoning part.
#[derive(Deserialize)]
pub(crate) struct ResponseUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    // Transcriptions spell it `input_token_details`.
    #[serde(alias = "input_token_details")]
    input_tokens_details: Option<InputDetails>,
    output_tokens_details: Option<OutputDetails>,
}

#[derive(Deserialize)]
struct InputDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct OutputDetails {
    reasoning_tokens: Option<u64>,
}

impl ResponseUsage {
    pub(crate) fn apply(&self, u: &mut Usage) {
        u.take(
            self.input_tokens,
            self.output_tokens,
            self.input_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens),
            self.output_tokens_details
                .as_ref()
                .and_then(|d| d.reasoning_tokens),
        );
    }
}

/// The error event's code: `code`, or the nested `error` object's code or type.
fn error_code(data: &[u8]) -> String {
    #[derive(Deserialize)]
    struct E {
        code: Option<serde_json::Value>,
        error: Option<ErrorObject>,
    }
    match serde_json::from_slice::<E>(data) {
        Ok(e) => code_text(e.code)
            .or_else(|| e.error.and_then(|e| e.name()))
            .unwrap_or_else(|| "error".into()),
        Err(_) => "error".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::run;
    use super::super::{TapKind, Usage};
    use super::*;
    use std::time::Duration;

    fn ev(kind: &str, data: &str) -> String {
        format!("event: {kind}\ndata: {data}\n\n")
    }

    fn stream() -> Vec<String> {
        vec![
            ev(
                "response.created",
                r#"{"type":"response.created","response":{"id":"resp_1","object":"response","created_at":1,"status":"in_progress","model":"gpt-4.1-mini-2025-04-14","output":[],"usage":null},"sequence_number":0}"#,
            ),
            ev(
                "response.in_progress",
                r#"{"type":"response.in_progress","response":{"id":"resp_1","status":"in_progress","model":"gpt-4.1-mini-2025-04-14","usage":null},"sequence_number":1}"#,
            ),
            ev(
                "response.output_item.added",
                r#"{"type":"response.output_item.added","output_index":0,"item":{"id":"msg_1","type":"message","status":"in_progress","content":[],"role":"assistant"},"sequence_number":2}"#,
            ),
            ev(
                "response.content_part.added",
                r#"{"type":"response.content_part.added","item_id":"msg_1","output_index":0,"content_index":0,"part":{"type":"output_text","annotations":[],"text":""},"sequence_number":3}"#,
            ),
            ev(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi","logprobs":[],"obfuscation":"x9Qa3kLm","sequence_number":4}"#,
            ),
            ev(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":" there","logprobs":[],"obfuscation":"b","sequence_number":5}"#,
            ),
            ev(
                "response.output_text.done",
                r#"{"type":"response.output_text.done","item_id":"msg_1","output_index":0,"content_index":0,"text":"Hi there","sequence_number":6}"#,
            ),
            ev(
                "response.completed",
                r#"{"type":"response.completed","response":{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1-mini-2025-04-14","output":[{"type":"message","content":[{"type":"output_text","text":"Hi there"}]}],"incomplete_details":null,"error":null,"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":10},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":123}},"sequence_number":7}"#,
            ),
        ]
    }

    #[test]
    fn usage_timing_and_model_of_a_streamed_response() {
        let events = stream();
        let s = events.concat();
        // Each event in its own chunk, 10 ms apart: the first delta is the fifth.
        let mut splits = Vec::new();
        let mut at = 0;
        for e in &events[..events.len() - 1] {
            at += e.len();
            splits.push(at);
        }
        let m = run(TapKind::OpenAiSse, s.as_bytes(), &splits);
        assert_eq!(m.first_output, Some(Duration::from_millis(50)));
        assert_eq!(m.output_events, 2);
        assert_eq!(m.max_gap, Some(Duration::from_millis(10)));
        assert_eq!(m.model.as_deref(), Some("gpt-4.1-mini-2025-04-14"));
        assert_eq!(m.finish_reason.as_deref(), Some("completed"));
        assert!(m.finished);
        assert_eq!(m.stream_error, None);
        assert_eq!(
            m.usage,
            Usage {
                input: Some(36),
                output: Some(87),
                cached_input: Some(10),
                reasoning: Some(64)
            }
        );
        // Cut anywhere, it reads the same.
        for cut in (1..s.len()).step_by(37) {
            let m2 = run(TapKind::OpenAiSse, s.as_bytes(), &[cut]);
            assert_eq!(m2.usage, m.usage, "cut at {cut}");
            assert!(m2.finished);
        }
    }

    #[test]
    fn events_without_names_are_read_by_their_type() {
        let s: String = stream()
            .iter()
            .map(|e| e.split_once('\n').unwrap().1.to_string())
            .collect();
        let m = run(TapKind::OpenAiSse, s.as_bytes(), &[]);
        assert_eq!(m.output_events, 2);
        assert_eq!(m.usage.output, Some(87));
        assert!(m.finished);
    }

    #[test]
    fn other_output_deltas_count_and_empty_ones_do_not() {
        for (kind, delta) in [
            ("response.refusal.delta", r#""I can't""#),
            ("response.reasoning_summary_text.delta", r#""Thinking""#),
            ("response.reasoning_text.delta", r#""step""#),
            ("response.function_call_arguments.delta", r#""{\"a\":""#),
            ("response.audio.delta", r#""UklGR""#),
        ] {
            let d =
                format!(r#"{{"type":"{kind}","item_id":"i","delta":{delta},"sequence_number":3}}"#);
            assert!(
                event(kind.as_bytes(), d.as_bytes(), &mut Measure::default()),
                "{kind}"
            );
        }
        let empty = r#"{"type":"response.output_text.delta","delta":"","sequence_number":3}"#;
        assert!(!event(
            b"response.output_text.delta",
            empty.as_bytes(),
            &mut Measure::default()
        ));
        let done = r#"{"type":"response.output_text.done","text":"Hi","sequence_number":3}"#;
        assert!(!event(
            b"response.output_text.done",
            done.as_bytes(),
            &mut Measure::default()
        ));
    }

    #[test]
    fn incomplete_failed_and_error_events() {
        let incomplete = ev(
            "response.incomplete",
            r#"{"type":"response.incomplete","response":{"status":"incomplete","model":"m","incomplete_details":{"reason":"max_output_tokens"},"usage":{"input_tokens":5,"output_tokens":16,"output_tokens_details":{"reasoning_tokens":0}}},"sequence_number":9}"#,
        );
        let m = run(TapKind::OpenAiSse, incomplete.as_bytes(), &[]);
        assert_eq!(m.finish_reason.as_deref(), Some("max_output_tokens"));
        assert_eq!((m.usage.input, m.usage.output), (Some(5), Some(16)));
        assert!(m.finished);

        let failed = ev(
            "response.failed",
            r#"{"type":"response.failed","response":{"status":"failed","model":"m","error":{"code":"server_error","message":"boom"},"usage":null},"sequence_number":9}"#,
        );
        let m = run(TapKind::OpenAiSse, failed.as_bytes(), &[]);
        assert_eq!(m.stream_error.as_deref(), Some("server_error"));
        assert_eq!(m.usage, Usage::default());

        let error = ev(
            "error",
            r#"{"type":"error","code":"rate_limit_exceeded","message":"slow down","param":null,"sequence_number":2}"#,
        );
        let m = run(TapKind::OpenAiSse, error.as_bytes(), &[]);
        assert_eq!(m.stream_error.as_deref(), Some("rate_limit_exceeded"));
        assert!(!m.finished);
    }

    #[test]
    fn a_usage_of_all_zeros_is_unknown() {
        let zero = ev(
            "response.completed",
            r#"{"type":"response.completed","response":{"status":"completed","model":"m","usage":{"input_tokens":0,"output_tokens":0,"total_tokens":0}},"sequence_number":3}"#,
        );
        let m = run(TapKind::OpenAiSse, zero.as_bytes(), &[]);
        assert_eq!(m.usage, Usage::default());
        assert!(m.finished);
    }

    #[test]
    fn transcription_and_speech_streams() {
        let t = concat!(
            "data: {\"type\":\"transcript.text.delta\",\"delta\":\"Hel\"}\n\n",
            "data: {\"type\":\"transcript.text.delta\",\"delta\":\"lo\"}\n\n",
            "data: {\"type\":\"transcript.text.done\",\"text\":\"Hello\",\"usage\":{\"type\":\"tokens\",\"input_tokens\":14,\"input_token_details\":{\"text_tokens\":0,\"audio_tokens\":14},\"output_tokens\":45,\"total_tokens\":59}}\n\n",
        );
        let m = run(TapKind::OpenAiSse, t.as_bytes(), &[]);
        assert_eq!(m.output_events, 2);
        assert_eq!((m.usage.input, m.usage.output), (Some(14), Some(45)));
        assert!(m.finished);

        let first_audio = "event: speech.audio.delta\ndata: {\"type\":\"speech.audio.delta\",\"audio\":\"SUQzBAAAAAAA\"}\n\n";
        let s = format!(
            "{first_audio}{first_audio}data: {{\"type\":\"speech.audio.done\",\"usage\":{{\"input_tokens\":14,\"output_tokens\":101,\"total_tokens\":115}}}}\n\n"
        );
        let m = run(TapKind::OpenAiSse, s.as_bytes(), &[first_audio.len()]);
        assert_eq!(m.first_output, Some(Duration::from_millis(10)));
        assert_eq!(m.output_events, 2);
        assert_eq!((m.usage.input, m.usage.output), (Some(14), Some(101)));
        assert!(m.audio_events);
        assert!(m.finished);
    }

    #[test]
    fn chat_chunks_are_not_responses_events() {
        let chunk = br#"{"id":"c","object":"chat.completion.chunk","choices":[{"delta":{"tool_calls":[{"type":"function"}]}}]}"#;
        assert_eq!(kind(b"", chunk), None);
        assert_eq!(
            kind(b"", br#"{"type":"response.created"}"#),
            Some(&b"response.created"[..])
        );
        assert_eq!(kind(b"message", br#"{"type":"response.created"}"#), None);
    }
}
