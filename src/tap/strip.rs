//! Stream stage (`response_body_filter`): when the relay asked an OpenAI-style upstream
//! for usage that the client did not ask for, this removes what that request added, so
//! the client receives exactly the stream it asked for: the final usage chunk
//! (`"choices":[]` with a `usage` object) and the `"usage":null` field of every other
//! chunk. Only whole events are rewritten: the bytes of an event not yet complete are
//! held until its blank line arrives (an SSE client cannot use them before that either).
//! An event larger than [`MAX_EVENT`] is not held: once it outgrows the cap, its bytes
//! go out unchanged as they come, up to its end. Each byte is looked at once: the search
//! for an event's end goes on where the previous chunk's search stopped.

use bytes::{Bytes, BytesMut};
use memchr::{memchr, memmem};

/// The largest event (with its blank line) held and rewritten; a usage chunk is a few
/// hundred bytes.
pub const MAX_EVENT: usize = crate::sse::MAX_EVENT;

pub struct UsageStripper {
    /// The bytes of the current event while it is held; never more than `max_event`.
    carry: Vec<u8>,
    /// The last three bytes of the current event so far (zero where it has fewer), so
    /// that an end split between chunks is found without looking at `carry` again.
    tail: [u8; 3],
    /// The current event outgrew `max_event`: its bytes pass unchanged to its end.
    passing: bool,
    max_event: usize,
}

impl Default for UsageStripper {
    fn default() -> Self {
        UsageStripper::with_max_event(MAX_EVENT)
    }
}

impl UsageStripper {
    /// A stripper that holds events of up to `max_event` bytes instead of [`MAX_EVENT`].
    pub fn with_max_event(max_event: usize) -> UsageStripper {
        UsageStripper {
            carry: Vec::new(),
            tail: [0; 3],
            passing: false,
            max_event,
        }
    }

    /// Takes one chunk and returns what the client gets now.
    pub fn feed(&mut self, chunk: &[u8], end_of_stream: bool) -> Bytes {
        let mut out = BytesMut::with_capacity(self.carry.len() + chunk.len());
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.passing {
                match event_end(&self.tail, rest) {
                    Some(e) => {
                        out.extend_from_slice(&rest[..e]);
                        rest = &rest[e..];
                        self.passing = false;
                        self.tail = [0; 3];
                    }
                    None => {
                        out.extend_from_slice(rest);
                        push_tail(&mut self.tail, rest);
                        rest = &[];
                    }
                }
                continue;
            }
            // Only an end within the cap makes an event that is held.
            let room = self.max_event.saturating_sub(self.carry.len());
            let window = &rest[..rest.len().min(room)];
            if let Some(e) = event_end(&self.tail, window) {
                if self.carry.is_empty() {
                    // The whole event is in this chunk: read it in place.
                    strip_event(&rest[..e], &mut out);
                } else {
                    self.carry.extend_from_slice(&rest[..e]);
                    strip_event(&self.carry, &mut out);
                    self.carry.clear();
                }
                self.tail = [0; 3];
                rest = &rest[e..];
            } else if window.len() < rest.len() {
                // Too large to hold: what is held and what fits go out as they came.
                out.extend_from_slice(&self.carry);
                out.extend_from_slice(window);
                push_tail(&mut self.tail, window);
                self.carry.clear();
                if self.carry.capacity() > 64 << 10 {
                    self.carry = Vec::new();
                }
                self.passing = true;
                rest = &rest[window.len()..];
            } else {
                self.carry.extend_from_slice(rest);
                push_tail(&mut self.tail, rest);
                rest = &[];
            }
        }
        if end_of_stream {
            // An unterminated tail goes out as it came.
            out.extend_from_slice(&self.carry);
            self.carry.clear();
            self.tail = [0; 3];
            self.passing = false;
        }
        out.freeze()
    }
}

/// The length of `s` up to and including the first blank line that ends an event (the
/// first `\n\n` or `\r\n\r\n`), where `tail` holds the three bytes before `s`.
fn event_end(tail: &[u8; 3], s: &[u8]) -> Option<usize> {
    // Both ends finish with `\n`: look back from each `\n`.
    let before = |i: usize, k: usize| if i >= k { s[i - k] } else { tail[3 + i - k] };
    let mut from = 0;
    while let Some(r) = memchr(b'\n', &s[from..]) {
        let i = from + r;
        let b1 = before(i, 1);
        if b1 == b'\n' || (b1 == b'\r' && before(i, 2) == b'\n' && before(i, 3) == b'\r') {
            return Some(i + 1);
        }
        from = i + 1;
    }
    None
}

/// Keeps the last three bytes of what went by, `s` being the newest.
fn push_tail(tail: &mut [u8; 3], s: &[u8]) {
    if s.len() >= 3 {
        tail.copy_from_slice(&s[s.len() - 3..]);
    } else {
        for &b in s {
            *tail = [tail[1], tail[2], b];
        }
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

    fn run(st: &mut UsageStripper, parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            out.extend_from_slice(&st.feed(p, i + 1 == parts.len()));
        }
        out
    }

    #[test]
    fn an_event_over_the_cap_passes_unchanged_and_the_next_is_stripped() {
        // 200 bytes with its blank line is held and rewritten; 201 passes as it came.
        let fits = format!("data: {{\"a\":\"{}\",\"usage\":null}}\n\n", "x".repeat(171));
        let over = format!(
            "data: {{\"a\":\"{}\",\"usage\":null}}\r\n\r\n",
            "y".repeat(170)
        );
        assert_eq!((fits.len(), over.len()), (200, 201));
        let s = format!("{fits}{over}{WITH}");
        let expected = format!("data: {{\"a\":\"{}\"}}\n\n{over}{WITHOUT}", "x".repeat(171));
        let s = s.as_bytes();
        for i in 0..=s.len() {
            for j in (i..=s.len()).step_by(11) {
                let out = run(
                    &mut UsageStripper::with_max_event(200),
                    &[&s[..i], &s[i..j], &s[j..]],
                );
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    expected,
                    "split at {i},{j}"
                );
            }
        }
    }

    #[test]
    fn a_huge_event_fed_in_small_pieces_goes_out_unchanged_as_it_comes() {
        let mut event = b"data: {\"choices\":[{\"delta\":{\"content\":\"".to_vec();
        event.resize(3 * MAX_EVENT, b'x');
        event.extend_from_slice(b"\"}}],\"usage\":null}\n\n");
        let s = [&event[..], WITH.as_bytes()].concat();
        let mut st = UsageStripper::default();
        let mut out = Vec::new();
        let mut fed = 0;
        for piece in s.chunks(1000) {
            out.extend_from_slice(&st.feed(piece, false));
            fed += piece.len();
            assert!(st.carry.len() <= MAX_EVENT);
            if fed > MAX_EVENT && fed <= event.len() {
                // Nothing of the big event is held once it is over the cap.
                assert_eq!(out.len(), fed);
            }
        }
        out.extend_from_slice(&st.feed(b"", true));
        assert!(
            out[..event.len()] == event[..],
            "the big event is unchanged"
        );
        assert_eq!(&out[event.len()..], WITHOUT.as_bytes());
    }

    #[test]
    fn an_end_split_between_chunks_is_found() {
        for s in ["data: a\n\n", "data: a\r\n\r\n", "data: a\n\r\n\n"] {
            let s = s.as_bytes();
            for i in 0..=s.len() {
                for j in i..=s.len() {
                    let mut st = UsageStripper::default();
                    let mut out = st.feed(&s[..i], false).to_vec();
                    out.extend_from_slice(&st.feed(&s[i..j], false));
                    out.extend_from_slice(&st.feed(&s[j..], false));
                    // Complete: nothing is left held.
                    assert_eq!(out, s, "split at {i},{j}");
                    assert!(st.carry.is_empty());
                }
            }
        }
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
