//! Non-streaming JSON answers: the body is kept up to a cap and read once at its end for
//! usage, finish reason and model (OpenAI and Anthropic shapes).

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
        let Ok(doc) = serde_json::from_slice::<Doc>(&buf) else {
            return;
        };
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
            // The two shapes share no key: OpenAI counts prompt and completion tokens,
            // Anthropic input and output tokens.
            let is_openai =
                usage.get("prompt_tokens").is_some() || usage.get("completion_tokens").is_some();
            if is_openai {
                if let Ok(u) = serde_json::from_value::<super::openai::UsageJson>(usage) {
                    u.apply(&mut m.usage);
                }
            } else if let Ok(u) = serde_json::from_value::<super::anthropic::AnthropicUsage>(usage)
            {
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
struct Doc {
    model: Option<String>,
    choices: Option<Vec<Choice>>,
    stop_reason: Option<String>,
    usage: Option<serde_json::Value>,
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
