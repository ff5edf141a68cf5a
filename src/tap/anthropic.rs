//! Anthropic Messages streams: named events. Input tokens come from `message_start`,
//! output tokens from the last `message_delta` (its count is cumulative: replaced, never
//! added), the first token from the first `content_block_delta`.

use serde::Deserialize;

use super::{string_after, Measure};

/// Reads one event; true when it carries generated output.
pub fn event(name: &[u8], data: &[u8], m: &mut Measure) -> bool {
    // Event names are always sent by Anthropic; fall back to the data's `type`.
    let kind = if name.is_empty() {
        string_after(data, b"\"type\":").unwrap_or(b"")
    } else {
        name
    };
    match kind {
        b"content_block_delta" => true,
        b"message_start" => {
            if let Ok(start) = serde_json::from_slice::<MessageStart>(data) {
                if let Some(model) = start.message.model {
                    m.model = Some(model);
                }
                if let Some(u) = start.message.usage {
                    u.apply(m);
                }
            }
            false
        }
        b"message_delta" => {
            if let Ok(delta) = serde_json::from_slice::<MessageDelta>(data) {
                if let Some(reason) = delta.delta.and_then(|d| d.stop_reason) {
                    m.finish_reason = Some(reason);
                }
                if let Some(u) = delta.usage {
                    u.apply(m);
                }
            }
            false
        }
        b"message_stop" => {
            m.finished = true;
            false
        }
        b"error" => {
            m.stream_error = Some(
                string_after(data, b"\"type\":\"error\",\"error\":{\"type\":")
                    .or_else(|| {
                        // The inner type: the second `"type":` in the event.
                        let first = memchr::memmem::find(data, b"\"type\":")?;
                        string_after(&data[first + 7..], b"\"type\":")
                    })
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_else(|| "error".into()),
            );
            false
        }
        _ => false,
    }
}

#[derive(Deserialize)]
struct MessageStart {
    message: StartMessage,
}

#[derive(Deserialize)]
struct StartMessage {
    model: Option<String>,
    usage: Option<AnthropicUsage>,
}

#[derive(Deserialize)]
struct MessageDelta {
    delta: Option<DeltaBody>,
    usage: Option<AnthropicUsage>,
}

#[derive(Deserialize)]
struct DeltaBody {
    stop_reason: Option<String>,
}

/// Anthropic's usage object. Cache reads are reported apart from `input_tokens`; the
/// relay's input count is their sum, and `cached_input` the part read from cache.
#[derive(Deserialize)]
pub(crate) struct AnthropicUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    pub(crate) fn apply(&self, m: &mut Measure) {
        let u = &mut m.usage;
        if let Some(input) = self.input_tokens {
            let read = self.cache_read_input_tokens.unwrap_or(0);
            let created = self.cache_creation_input_tokens.unwrap_or(0);
            u.input = Some(input + read + created);
            u.cached_input = Some(read);
        }
        if let Some(out) = self.output_tokens {
            u.output = Some(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::run;
    use super::super::{TapKind, Usage};
    use std::time::Duration;

    const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":100,\"cache_creation_input_tokens\":0,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\ndata: {\"type\": \"ping\"}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":7}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":9}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn cumulative_output_is_replaced_not_summed() {
        let m = run(TapKind::AnthropicSse, STREAM.as_bytes(), &[]);
        assert_eq!(
            m.usage,
            Usage {
                input: Some(125),
                output: Some(9),
                cached_input: Some(100),
                reasoning: None
            }
        );
        assert_eq!(m.finish_reason.as_deref(), Some("end_turn"));
        assert_eq!(m.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        assert_eq!(m.output_events, 2);
        assert!(m.finished);
    }

    #[test]
    fn first_token_is_the_first_content_block_delta() {
        let s = STREAM.as_bytes();
        let first_delta = STREAM.find("event: content_block_delta").unwrap();
        // Everything before the first delta arrives at 10 ms, the rest at 20 ms.
        let m = run(TapKind::AnthropicSse, s, &[first_delta]);
        assert_eq!(m.first_output, Some(Duration::from_millis(20)));
    }

    #[test]
    fn error_events_are_recorded() {
        let s = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let m = run(TapKind::AnthropicSse, s.as_bytes(), &[]);
        assert_eq!(m.stream_error.as_deref(), Some("overloaded_error"));
    }
}
