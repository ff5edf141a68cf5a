//! Request stage (`request_body_filter`): what the request body says about the call
//! (model, stream flag, token cap, whether usage was asked for), read while the body
//! flows to the upstream. The body is copied up to a cap and parsed once at its end;
//! larger bodies pass unread and the model is then taken from the response.

use serde::Deserialize;

/// Request bodies up to this size are read for their fields.
pub const MAX_READ: usize = 1 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub include_usage: bool,
}

/// Collects a request body and reads it at the end.
#[derive(Default)]
pub struct BodyCollector {
    buf: Vec<u8>,
    too_large: bool,
}

impl BodyCollector {
    pub fn push(&mut self, chunk: &[u8]) {
        if self.too_large {
            return;
        }
        if self.buf.len() + chunk.len() > MAX_READ {
            self.too_large = true;
            self.buf = Vec::new();
        } else {
            self.buf.extend_from_slice(chunk);
        }
    }

    /// Parses what was collected; `None` when the body was too large or not JSON.
    pub fn finish(&mut self) -> Option<RequestInfo> {
        let buf = std::mem::take(&mut self.buf);
        if self.too_large || buf.is_empty() {
            return None;
        }
        parse(&buf)
    }
}

pub fn parse(body: &[u8]) -> Option<RequestInfo> {
    #[derive(Deserialize)]
    struct Body {
        model: Option<String>,
        stream: Option<bool>,
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        max_output_tokens: Option<u64>,
        stream_options: Option<StreamOptions>,
    }
    #[derive(Deserialize)]
    struct StreamOptions {
        include_usage: Option<bool>,
    }
    let b: Body = serde_json::from_slice(body).ok()?;
    Some(RequestInfo {
        model: b.model,
        stream: b.stream.unwrap_or(false),
        max_tokens: b
            .max_completion_tokens
            .or(b.max_tokens)
            .or(b.max_output_tokens),
        include_usage: b
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_wherever_they_are() {
        let body = br#"{"messages":[{"role":"user","content":"x"}],"stream":true,"model":"gpt-4o","max_completion_tokens":50,"stream_options":{"include_usage":true}}"#;
        let mut c = BodyCollector::default();
        c.push(&body[..10]);
        c.push(&body[10..]);
        assert_eq!(
            c.finish(),
            Some(RequestInfo {
                model: Some("gpt-4o".into()),
                stream: true,
                max_tokens: Some(50),
                include_usage: true
            })
        );
        let anthropic = br#"{"model":"claude","max_tokens":1024,"messages":[]}"#;
        let info = parse(anthropic).unwrap();
        assert_eq!((info.stream, info.max_tokens), (false, Some(1024)));
    }

    #[test]
    fn large_or_broken_bodies_give_nothing() {
        let mut c = BodyCollector::default();
        c.push(&vec![b' '; MAX_READ]);
        c.push(b"{}");
        assert_eq!(c.finish(), None);
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(b"[1,2]"), None);
    }
}
