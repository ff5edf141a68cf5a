//! Request stage (`request_body_filter`): what the request body says about the call
//! (model, stream flag, token cap, whether usage was asked for), read while the body
//! flows to the upstream. The body is copied up to a cap and parsed once at its end;
//! larger bodies pass unread and the model is then taken from the response.

use serde::Deserialize;

/// Request bodies up to this size are read for their fields.
pub const MAX_READ: usize = 1 << 20;

/// A body announced at most this long is read whole before the upstream is chosen, so
/// its fields are known at once and a rewrite keeps `content-length` framing. Pingora
/// replays such a body from its retry buffer (64 KiB), which this stays under.
pub const EARLY_READ_MAX: usize = 60 * 1024;

/// The body length a request announces in `content-length`, if it does.
pub fn content_length(req: &pingora_http::RequestHeader) -> Option<usize> {
    req.headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The announced length of a POST body that can be read early, if any.
pub fn early_read_len(req: &pingora_http::RequestHeader) -> Option<usize> {
    if req.method != http::Method::POST {
        return None;
    }
    content_length(req).filter(|len| *len <= EARLY_READ_MAX)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    pub include_usage: bool,
}

/// Collects a request body as it flows upstream and reads it at the end. In `hold`
/// mode (a chat request whose usage the relay may ask for) the body is held back and
/// sent in one piece at its end, rewritten when the client streams without asking for
/// usage; a body over [`MAX_READ`] is released unchanged and passes through.
#[derive(Default)]
pub struct BodyCollector {
    buf: Vec<u8>,
    too_large: bool,
    hold: bool,
}

/// What the filter does with one request body chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyStep {
    /// Send the chunk as it is.
    Pass,
    /// Send this instead (held bytes, possibly rewritten; empty to send nothing yet).
    Replace(bytes::Bytes),
}

/// The end of a request body, read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BodyEnd {
    pub info: Option<RequestInfo>,
    /// The relay added `stream_options.include_usage`: the usage chunk it brings must
    /// not reach the client.
    pub usage_added: bool,
    /// The whole body was read and is not JSON.
    pub invalid_json: bool,
}

impl BodyCollector {
    /// Starts over for a new attempt (a retry replays the body from its start).
    pub fn reset(&mut self, hold: bool) {
        self.buf.clear();
        self.too_large = false;
        self.hold = hold;
    }

    /// Takes one chunk; `end` is set with the last one.
    pub fn step(&mut self, chunk: &[u8], end: bool) -> (BodyStep, Option<BodyEnd>) {
        if self.too_large {
            return (BodyStep::Pass, end.then(BodyEnd::default));
        }
        if self.buf.len() + chunk.len() > MAX_READ {
            self.too_large = true;
            let held = std::mem::take(&mut self.buf);
            if !self.hold {
                return (BodyStep::Pass, end.then(BodyEnd::default));
            }
            let mut out = held;
            out.extend_from_slice(chunk);
            return (BodyStep::Replace(out.into()), end.then(BodyEnd::default));
        }
        self.buf.extend_from_slice(chunk);
        if !end {
            return if self.hold {
                (BodyStep::Replace(bytes::Bytes::new()), None)
            } else {
                (BodyStep::Pass, None)
            };
        }
        let buf = std::mem::take(&mut self.buf);
        let info = parse(&buf);
        // Only a body that is not a JSON object pays for a second parse; serde skips the
        // bytes of strings it does not keep, so UTF-8 is checked on its own.
        let invalid_json =
            std::str::from_utf8(&buf).is_err() || (info.is_none() && !crate::gate::is_json(&buf));
        if !self.hold {
            return (
                BodyStep::Pass,
                Some(BodyEnd {
                    info,
                    usage_added: false,
                    invalid_json,
                }),
            );
        }
        match info.as_ref().and_then(|i| with_usage_requested(&buf, i)) {
            Some(rewritten) => (
                BodyStep::Replace(rewritten.into()),
                Some(BodyEnd {
                    info,
                    usage_added: true,
                    invalid_json,
                }),
            ),
            None => (
                BodyStep::Replace(buf.into()),
                Some(BodyEnd {
                    info,
                    usage_added: false,
                    invalid_json,
                }),
            ),
        }
    }
}

/// The body with `stream_options.include_usage: true` added, when it streams without
/// asking for usage; `None` when nothing needs to change. The common case inserts the
/// field before the closing brace and leaves every other byte as the client sent it.
pub fn with_usage_requested(body: &[u8], info: &RequestInfo) -> Option<Vec<u8>> {
    if !info.stream || info.include_usage {
        return None;
    }
    let mut doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = doc.as_object_mut()?;
    if obj.contains_key("stream_options") {
        // Rare: the client sent stream_options without include_usage.
        let opts = obj.get_mut("stream_options")?.as_object_mut()?;
        opts.insert("include_usage".into(), serde_json::Value::Bool(true));
        return serde_json::to_vec(&doc).ok();
    }
    let close = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if body[close] != b'}' {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + 40);
    out.extend_from_slice(&body[..close]);
    out.extend_from_slice(br#","stream_options":{"include_usage":true}"#);
    out.extend_from_slice(&body[close..]);
    Some(out)
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
        assert_eq!(c.step(&body[..10], false), (BodyStep::Pass, None));
        let (step, end) = c.step(&body[10..], true);
        assert_eq!(step, BodyStep::Pass);
        assert_eq!(
            end.unwrap().info,
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
        c.step(&vec![b' '; MAX_READ], false);
        let (_, end) = c.step(b"{}", true);
        assert_eq!(end.unwrap().info, None);
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(b"[1,2]"), None);
    }

    #[test]
    fn held_streaming_body_gets_usage_requested() {
        let body = br#"{"model":"m","stream":true,"messages":[]}  "#;
        let mut c = BodyCollector::default();
        c.reset(true);
        assert_eq!(
            c.step(&body[..7], false).0,
            BodyStep::Replace(bytes::Bytes::new())
        );
        let (step, end) = c.step(&body[7..], true);
        let want = br#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage":true}}  "#;
        assert_eq!(step, BodyStep::Replace(bytes::Bytes::from_static(want)));
        assert!(end.unwrap().usage_added);
        // Asked already, or not streaming: sent as it came.
        for body in [
            &br#"{"stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"stream":false}"#,
            b"not json",
        ] {
            c.reset(true);
            let (step, end) = c.step(body, true);
            assert_eq!(step, BodyStep::Replace(bytes::Bytes::copy_from_slice(body)));
            assert!(!end.unwrap().usage_added);
        }
        // stream_options without include_usage.
        let info =
            parse(br#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#).unwrap();
        let out = with_usage_requested(
            br#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#,
            &info,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["include_obfuscation"], false);
    }

    #[test]
    fn a_held_body_over_the_cap_is_released_unchanged() {
        let mut c = BodyCollector::default();
        c.reset(true);
        let big = vec![b'x'; MAX_READ + 1];
        assert_eq!(
            c.step(&big[..10], false).0,
            BodyStep::Replace(bytes::Bytes::new())
        );
        match c.step(&big[10..], false).0 {
            BodyStep::Replace(b) => assert_eq!(b.len(), MAX_READ + 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.step(b"tail", false).0, BodyStep::Pass);
        assert_eq!(
            c.step(b"", true),
            (BodyStep::Pass, Some(BodyEnd::default()))
        );
    }
}
