//! OpenAI's Realtime API over a WebSocket: the server's events, one JSON text message
//! each, read as [`crate::websocket::FrameReader`] hands them over.
//!
//! - Output is an audio, text or function-call-arguments delta, in the names of the
//!   current API (`response.output_audio.delta`, `response.output_text.delta`) and of
//!   its beta (`response.audio.delta`, `response.text.delta`). A transcript delta goes
//!   with the audio it transcribes and is not counted again.
//! - A session holds many responses. Time to first output is the first response's, from
//!   its `response.created` to its first delta (the time a user waits for the voice to
//!   start); gaps are between deltas of one response, never across the pause between two.
//! - Usage is on each `response.done` (`response.usage`) and is summed over the session;
//!   the model is the session's (`session.created` / `session.updated`); how the last
//!   response ended (`response.status`) is the finish reason; an `error` event is the
//!   stream error.
//!
//! Only the first bytes of a message are looked at unless its type is one of those read
//! whole, so a stream of audio deltas costs a prefix copy each.

use serde::Deserialize;

use super::{string_after, Measure};

/// What a message's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A delta of generated output; `audio` when it is audio.
    Output {
        audio: bool,
    },
    /// A response starts.
    ResponseCreated,
    /// Read the whole message ([`read`]): it may carry usage, the model or an error, or
    /// its type is not in its first bytes.
    Read,
    Other,
}

/// The kind of a message, from its first bytes.
pub fn kind(prefix: &[u8]) -> Kind {
    string_after(prefix, b"\"type\":").map_or(Kind::Read, of_type)
}

/// The kind of a message of type `t`.
fn of_type(t: &[u8]) -> Kind {
    match t {
        b"response.output_audio.delta" | b"response.audio.delta" => Kind::Output { audio: true },
        b"response.output_text.delta"
        | b"response.text.delta"
        | b"response.function_call_arguments.delta" => Kind::Output { audio: false },
        b"response.created" => Kind::ResponseCreated,
        b"response.done" | b"session.created" | b"session.updated" | b"error" => Kind::Read,
        _ => Kind::Other,
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    session: Option<Session>,
    #[serde(default)]
    response: Option<Response>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct Session {
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    usage: Option<RealtimeUsage>,
}

#[derive(Deserialize)]
struct RealtimeUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    #[serde(default)]
    input_token_details: Option<InputDetails>,
}

#[derive(Deserialize)]
struct InputDetails {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
}

/// Reads a whole message; returns its kind as far as output and responses go (a message
/// whose type was not in its first bytes is known only now).
pub fn read(data: &[u8], m: &mut Measure) -> Kind {
    let Ok(msg) = serde_json::from_slice::<Message>(data) else {
        return Kind::Other;
    };
    match msg.kind.as_str() {
        "session.created" | "session.updated" => {
            if let Some(model) = msg.session.and_then(|s| s.model) {
                m.model = Some(model);
            }
        }
        "response.done" => {
            let Some(r) = msg.response else {
                return Kind::Other;
            };
            if let Some(u) = r.usage {
                let cached = u.input_token_details.and_then(|d| d.cached_tokens);
                m.usage.add(u.input_tokens, u.output_tokens, cached, None);
            }
            if r.status.is_some() {
                m.finish_reason = r.status;
            }
        }
        "error" => {
            let e = msg.error;
            let code = e.as_ref().and_then(|e| e.code.clone().or(e.kind.clone()));
            m.stream_error = Some(code.unwrap_or_else(|| "error".into()));
        }
        other => match of_type(other.as_bytes()) {
            Kind::Read => {}
            k => return k,
        },
    }
    Kind::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_the_first_bytes() {
        let delta = br#"{"type":"response.output_audio.delta","event_id":"e1","delta":"AAAA"#;
        assert_eq!(kind(delta), Kind::Output { audio: true });
        assert_eq!(
            kind(br#"{"type":"response.text.delta""#),
            Kind::Output { audio: false }
        );
        assert_eq!(
            kind(br#"{"type":"response.output_audio_transcript.delta"}"#),
            Kind::Other
        );
        assert_eq!(
            kind(br#"{"type":"response.created"}"#),
            Kind::ResponseCreated
        );
        assert_eq!(kind(br#"{"type":"response.done"}"#), Kind::Read);
        assert_eq!(kind(br#"{"event_id":"e1","#), Kind::Read);
    }

    #[test]
    fn usage_is_summed_over_responses_and_zero_is_not_taken() {
        let mut m = Measure::default();
        read(
            br#"{"type":"session.created","session":{"model":"gpt-realtime"}}"#,
            &mut m,
        );
        let done = |i: u64, o: u64, c: u64| {
            format!(
                r#"{{"type":"response.done","response":{{"status":"completed","usage":{{"total_tokens":{},"input_tokens":{i},"output_tokens":{o},"input_token_details":{{"cached_tokens":{c},"audio_tokens":3}},"output_token_details":{{"audio_tokens":{o}}}}}}}}}"#,
                i + o
            )
        };
        read(done(10, 5, 2).as_bytes(), &mut m);
        read(done(0, 0, 0).as_bytes(), &mut m);
        read(done(7, 4, 0).as_bytes(), &mut m);
        assert_eq!(m.model.as_deref(), Some("gpt-realtime"));
        assert_eq!(
            (m.usage.input, m.usage.output, m.usage.cached_input),
            (Some(17), Some(9), Some(2))
        );
        assert_eq!(m.finish_reason.as_deref(), Some("completed"));
        read(
            br#"{"type":"error","error":{"type":"invalid_request_error","code":"bad_event"}}"#,
            &mut m,
        );
        assert_eq!(m.stream_error.as_deref(), Some("bad_event"));
        // A message whose type came late is still known.
        let late = format!(
            r#"{{"event_id":"{}","type":"response.created"}}"#,
            "e".repeat(300)
        );
        assert_eq!(read(late.as_bytes(), &mut m), Kind::ResponseCreated);
    }
}
