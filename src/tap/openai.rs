//! OpenAI chat completion chunks (and OpenAI-compatible hosts: vLLM, SiliconFlow...).
//! Each event is scanned as bytes; JSON is parsed only for the one chunk that carries
//! `usage`.

use memchr::memmem::Finder;
use serde::Deserialize;
use std::sync::LazyLock;

use super::{skip_ws, string_after_with, Measure, Usage};

static OUTPUT_STRINGS: LazyLock<[Finder<'static>; 4]> = LazyLock::new(|| {
    [
        Finder::new(b"\"content\":"),
        Finder::new(b"\"reasoning_content\":"),
        Finder::new(b"\"reasoning\":"),
        Finder::new(b"\"refusal\":"),
    ]
});
static OUTPUT_CALLS: LazyLock<[Finder<'static>; 2]> = LazyLock::new(|| {
    [
        Finder::new(b"\"tool_calls\":"),
        Finder::new(b"\"function_call\":"),
    ]
});
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\":"));
static MODEL: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"model\":"));
static FINISH: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"finish_reason\":"));
static ERROR: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\":"));

/// Reads one event (its `event:` name, empty when it has none, and its data); true
/// when it carries generated output (see the TTFT definition in `tap`). OpenAI's typed
/// events (the Responses API, transcription and speech streams) go to their own reader.
pub fn event(name: &[u8], data: &[u8], m: &mut Measure) -> bool {
    if let Some(kind) = super::typed::kind(name, data) {
        return super::typed::event(kind, data, m);
    }
    if data == b"[DONE]" {
        m.finished = true;
        return false;
    }
    if m.model.is_none() {
        if let Some(model) = string_after_with(data, &MODEL) {
            m.model = Some(String::from_utf8_lossy(model).into_owned());
        }
    }
    if let Some(reason) = string_after_with(data, &FINISH) {
        m.finish_reason = Some(String::from_utf8_lossy(reason).into_owned());
    }
    if let Some(i) = USAGE.find(data) {
        if skip_ws(&data[i + 8..]).first() == Some(&b'{') {
            read_usage(data, &mut m.usage);
        }
    }
    if let Some(i) = ERROR.find(data) {
        if skip_ws(&data[i + 8..]).first() == Some(&b'{') {
            m.stream_error = Some(error_type(data));
        }
    }
    has_output(data)
}

fn has_output(data: &[u8]) -> bool {
    // A key followed by a non-empty string.
    for f in OUTPUT_STRINGS.iter() {
        let mut from = 0;
        while let Some(i) = f.find(&data[from..]) {
            let after = skip_ws(&data[from + i + f.needle().len()..]);
            if after.len() >= 2 && after[0] == b'"' && after[1] != b'"' {
                return true;
            }
            from += i + 1;
        }
    }
    // Any tool call or function call delta (an array or object, not null).
    for f in OUTPUT_CALLS.iter() {
        if let Some(i) = f.find(data) {
            if matches!(
                skip_ws(&data[i + f.needle().len()..]).first(),
                Some(b'[' | b'{')
            ) {
                return true;
            }
        }
    }
    false
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<UsageJson>,
}

#[derive(Deserialize)]
pub(crate) struct UsageJson {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

impl UsageJson {
    pub(crate) fn apply(&self, u: &mut Usage) {
        u.take(
            self.prompt_tokens,
            self.completion_tokens,
            self.prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens),
            self.completion_tokens_details
                .as_ref()
                .and_then(|d| d.reasoning_tokens),
        );
    }
}

fn read_usage(data: &[u8], u: &mut Usage) {
    if let Ok(WithUsage { usage: Some(usage) }) = serde_json::from_slice::<WithUsage>(data) {
        usage.apply(u);
    }
}

fn error_type(data: &[u8]) -> String {
    #[derive(Deserialize)]
    struct E {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(rename = "type")]
        kind: Option<String>,
        code: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<E>(data) {
        Ok(E { error }) => error
            .kind
            .or_else(|| error.code.map(|c| c.to_string()))
            .unwrap_or_else(|| "error".into()),
        Err(_) => "error".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::run;
    use super::super::TapKind;
    use super::*;
    use std::time::Duration;

    const ROLE: &str = r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}],"usage":null}"#;
    const HELLO: &str = r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}],"usage":null}"#;
    const STOP: &str = r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#;
    const USAGE_CHUNK: &str = r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":1}}}"#;

    fn stream(events: &[&str]) -> Vec<u8> {
        let mut s = String::new();
        for e in events {
            s.push_str(e);
            s.push_str("\n\n");
        }
        s.into_bytes()
    }

    #[test]
    fn role_only_first_chunk_is_not_the_first_token() {
        let s = stream(&[ROLE, HELLO, STOP, USAGE_CHUNK, "data: [DONE]"]);
        // Each event in its own chunk, 10 ms apart: the role chunk arrives at 10 ms,
        // "Hello" at 20 ms.
        let mut splits = Vec::new();
        let mut at = 0;
        for e in [ROLE, HELLO, STOP, USAGE_CHUNK] {
            at += e.len() + 2;
            splits.push(at);
        }
        let m = run(TapKind::OpenAiSse, &s, &splits);
        assert_eq!(m.first_output, Some(Duration::from_millis(20)));
        assert_eq!(m.output_events, 1);
        assert_eq!(m.finish_reason.as_deref(), Some("stop"));
        assert_eq!(m.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert!(m.finished);
        assert_eq!(
            m.usage,
            Usage {
                input: Some(12),
                output: Some(2),
                cached_input: Some(4),
                reasoning: Some(1)
            }
        );
    }

    #[test]
    fn reasoning_refusal_and_tool_calls_count_as_output() {
        for delta in [
            r#"{"reasoning_content":"Let me think"}"#,
            r#"{"reasoning":"hmm"}"#,
            r#"{"refusal":"I can't"}"#,
            r#"{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]}"#,
            r#"{"content":"\"quoted\""}"#,
        ] {
            let data = format!(r#"{{"choices":[{{"index":0,"delta":{delta}}}]}}"#);
            assert!(has_output(data.as_bytes()), "{delta}");
        }
        for delta in [
            r#"{"role":"assistant","content":""}"#,
            r#"{"content":null}"#,
            r#"{"tool_calls":null}"#,
            r#"{}"#,
        ] {
            let data = format!(r#"{{"choices":[{{"index":0,"delta":{delta}}}]}}"#);
            assert!(!has_output(data.as_bytes()), "{delta}");
        }
    }

    #[test]
    fn without_usage_chunk_usage_stays_unknown() {
        let m = run(
            TapKind::OpenAiSse,
            &stream(&[ROLE, HELLO, STOP, "data: [DONE]"]),
            &[],
        );
        assert_eq!(m.usage, Usage::default());
        assert_eq!(m.output_events, 1);
    }

    #[test]
    fn error_event_is_recorded() {
        let e = r#"data: {"error":{"message":"overloaded","type":"server_error","code":null}}"#;
        let m = run(TapKind::OpenAiSse, &stream(&[HELLO, e]), &[]);
        assert_eq!(m.stream_error.as_deref(), Some("server_error"));
    }
}
