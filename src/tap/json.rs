//! Non-streaming JSON answers: the body is kept up to a cap and read once at its end for
//! usage, finish reason and model. Shapes: OpenAI chat completions (`prompt_tokens`,
//! `completion_tokens`), embeddings (`"object": "list"`: input tokens only, so output
//! is 0), the Responses API (`"object": "response"`) and transcriptions (`input_tokens`
//! with details, or `"type": "tokens"`), and Anthropic messages (`input_tokens` with
//! the cache counts apart).

use serde::Deserialize;

use super::Measure;

/// Bodies larger than this are passed on without being read for usage.
pub const MAX_JSON_BODY: usize = 4 << 20;

#[derive(Default)]
pub struct JsonBody {
    buf: Vec<u8>,
    too_large: bool,
}

impl JsonBody {
    pub fn push(&mut self, chunk: &[u8]) {
        if self.too_large {
            return;
        }
        if self.buf.len() + chunk.len() > MAX_JSON_BODY {
            self.too_large = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(chunk);
    }

    pub fn read_into(&mut self, m: &mut Measure) {
        let buf = std::mem::take(&mut self.buf);
        let Ok(doc) = serde_json::from_slice::<Doc<'_>>(&buf) else {
            return;
        };
        if doc.object.as_deref() == Some("response") {
            if let Ok(r) = serde_json::from_slice::<super::typed::Response>(&buf) {
                r.read_into(m);
            }
            m.finished = true;
            return;
        }
        if let Some(model) = doc.model {
            m.model = Some(model);
        }
        if let Some(reason) = doc
            .choices
            .as_ref()
            .and_then(|c| c.first())
            .and_then(|c| c.finish_reason.clone())
        {
            m.finish_reason = Some(reason);
        }
        if let Some(reason) = doc.stop_reason {
            m.finish_reason = Some(reason);
        }
        if let Some(usage) = doc.usage {
            // Read as the shape its keys say (OpenAI's prompt and completion tokens, the
            // Responses API's details, Anthropic's input and output tokens). A JSON
            // `Value` of it cost more than the rest of the body: an allocation per key.
            let usage = usage.get();
            let has = |k: &str| memchr::memmem::find(usage.as_bytes(), k.as_bytes()).is_some();
            if has("\"prompt_tokens\"") || has("\"completion_tokens\"") {
                if let Ok(u) = serde_json::from_str::<super::openai::UsageJson>(usage) {
                    u.apply(&mut m.usage);
                }
                // An embedding generates nothing: its output is 0, not unknown.
                if doc.object.as_deref() == Some("list") && m.usage.input.is_some() {
                    m.usage.output.get_or_insert(0);
                }
            } else if has("\"input_tokens_details\"")
                || has("\"input_token_details\"")
                || has("\"output_tokens_details\"")
                || super::string_after(usage.as_bytes(), b"\"type\":") == Some(b"tokens")
            {
                if let Ok(u) = serde_json::from_str::<super::typed::ResponseUsage>(usage) {
                    u.apply(&mut m.usage);
                }
            } else if let Ok(u) = serde_json::from_str::<super::anthropic::AnthropicUsage>(usage) {
                u.apply(m);
            }
        }
        if let Some(e) = doc.error {
            m.stream_error = Some(
                e.get("type")
                    .and_then(|t| t.as_str())
                    .unwrap_or("error")
                    .to_string(),
            );
        }
        m.finished = true;
    }
}

#[derive(Deserialize)]
struct Doc<'a> {
    object: Option<String>,
    model: Option<String>,
    choices: Option<Vec<Choice>>,
    stop_reason: Option<String>,
    #[serde(borrow)]
    usage: Option<&'a serde_json::value::RawValue>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    finish_reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::super::tests::run;
    use super::super::{TapKind, Usage};

    #[test]
    fn openai_and_anthropic_bodies() {
        let oa = br#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        let m = run(TapKind::Json, oa, &[5, 40]);
        assert_eq!(m.finish_reason.as_deref(), Some("length"));
        assert_eq!(
            m.usage,
            Usage {
                input: Some(9),
                output: Some(3),
                cached_input: Some(0),
                reasoning: None
            }
        );
        let an = br#"{"id":"msg","type":"message","model":"claude-haiku","content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":11,"output_tokens":4}}"#;
        let m = run(TapKind::Json, an, &[]);
        assert_eq!(m.finish_reason.as_deref(), Some("end_turn"));
        assert_eq!((m.usage.input, m.usage.output), (Some(11), Some(4)));
        assert_eq!(m.model.as_deref(), Some("claude-haiku"));
    }

    #[test]
    fn responses_embeddings_and_transcription_bodies() {
        let resp = br#"{"id":"resp_1","object":"response","created_at":1,"status":"completed","error":null,"incomplete_details":null,"model":"gpt-4.1-mini-2025-04-14","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi","annotations":[]}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}"#;
        let m = run(TapKind::Json, resp, &[30]);
        assert_eq!(m.model.as_deref(), Some("gpt-4.1-mini-2025-04-14"));
        assert_eq!(m.finish_reason.as_deref(), Some("completed"));
        assert_eq!(
            m.usage,
            Usage {
                input: Some(36),
                output: Some(87),
                cached_input: Some(0),
                reasoning: Some(0)
            }
        );
        let emb = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let m = run(TapKind::Json, emb, &[]);
        assert_eq!((m.usage.input, m.usage.output), (Some(8), Some(0)));
        assert_eq!(m.model.as_deref(), Some("text-embedding-3-small"));
        let tr = br#"{"text":"Hello there","usage":{"type":"tokens","input_tokens":14,"input_token_details":{"text_tokens":0,"audio_tokens":14},"output_tokens":45,"total_tokens":59}}"#;
        let m = run(TapKind::Json, tr, &[]);
        assert_eq!((m.usage.input, m.usage.output), (Some(14), Some(45)));
        // whisper-1 bills by duration: no token counts, so usage is unknown.
        let dur = br#"{"text":"Hello","usage":{"type":"duration","seconds":3}}"#;
        assert_eq!(run(TapKind::Json, dur, &[]).usage, Usage::default());
    }

    #[test]
    fn a_usage_of_all_zeros_is_unknown() {
        let zero = br#"{"object":"chat.completion","model":"m","choices":[],"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}"#;
        assert_eq!(run(TapKind::Json, zero, &[]).usage, Usage::default());
        let zero = br#"{"object":"list","data":[],"model":"e","usage":{"prompt_tokens":0,"total_tokens":0}}"#;
        assert_eq!(run(TapKind::Json, zero, &[]).usage, Usage::default());
    }

    #[test]
    fn errors_and_garbage() {
        let e = br#"{"error":{"message":"Rate limit","type":"rate_limit_exceeded","param":null,"code":null}}"#;
        assert_eq!(
            run(TapKind::Json, e, &[]).stream_error.as_deref(),
            Some("rate_limit_exceeded")
        );
        let m = run(TapKind::Json, b"{not json", &[]);
        assert_eq!(m.usage, Usage::default());
    }
}
