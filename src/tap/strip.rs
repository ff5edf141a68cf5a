//! Stream stage (`response_body_filter`): when the relay asked an OpenAI-style upstream
//! for usage that the client did not ask for, this removes what that request added, so
//! the client receives exactly the stream it asked for: the final usage chunk
//! (`"choices":[]` with a `usage` object) and the `"usage":null` field of every other
//! chunk. Only whole events are rewritten: the bytes of an event not yet complete are
//! held until its blank line arrives (an SSE client cannot use them before that either).

use bytes::{Bytes, BytesMut};
use memchr::memmem;

#[derive(Default)]
pub struct UsageStripper {
    carry: BytesMut,
}

impl UsageStripper {
    /// Takes one chunk and returns what the client gets now.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Bytes {
        self.carry.extend_from_slice(chunk);
        let mut out = BytesMut::with_capacity(self.carry.len());
        while let Some(end) = event_end(&self.carry) {
            let event = self.carry.split_to(end);
            strip_event(&event, &mut out);
        }
        if end_of_stream {
            // An unterminated tail goes out as it came.
            out.extend_from_slice(&self.carry.split());
        }
        out.freeze()
    }
}

/// The length of the first complete event (up to and including its blank line).
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn strip_event(event: &[u8], out: &mut BytesMut) {
    let is_usage_chunk = memmem::find(event, b"\"choices\":[]").is_some()
        && memmem::find(event, b"\"usage\":{").is_some();
    if is_usage_chunk {
        return;
    }
    let mut rest = event;
    while let Some(i) = memmem::find(rest, b",\"usage\":null") {
        out.extend_from_slice(&rest[..i]);
        rest = &rest[i + b",\"usage\":null".len()..];
    }
    out.extend_from_slice(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\ndata: [DONE]\n\n";
    const WITHOUT: &str = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\ndata: [DONE]\n\n";

    #[test]
    fn strips_at_every_split_point() {
        let s = WITH.as_bytes();
        for i in 0..=s.len() {
            let mut st = UsageStripper::default();
            let mut out = st.feed(&s[..i], false).to_vec();
            out.extend_from_slice(&st.feed(&s[i..], true));
            assert_eq!(String::from_utf8(out).unwrap(), WITHOUT, "split at {i}");
        }
    }

    #[test]
    fn content_mentioning_usage_is_left_alone() {
        let e = "data: {\"choices\":[{\"delta\":{\"content\":\",\\\"usage\\\":null\"}}],\"usage\":null}\n\n";
        let mut st = UsageStripper::default();
        let out = st.feed(e.as_bytes(), true);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "data: {\"choices\":[{\"delta\":{\"content\":\",\\\"usage\\\":null\"}}]}\n\n"
        );
    }

    #[test]
    fn complete_events_go_out_at_once_and_partial_ones_wait() {
        let mut st = UsageStripper::default();
        let out = st.feed(b"data: {\"a\":1}\n\ndata: {\"b\"", false);
        assert_eq!(&out[..], b"data: {\"a\":1}\n\n");
        let out = st.feed(b":2}\n\n", false);
        assert_eq!(&out[..], b"data: {\"b\":2}\n\n");
    }
}
