//! Stream stage (`response_body_filter`): when the relay asked an OpenAI-style upstream
//! for usage that the client did not ask for, this removes what that request added, so
//! the client receives exactly the stream the server would have sent without it.
//! OpenAI-compatible servers put the usage in different places, and each is undone:
//! - a chunk of its own, `"choices":[]` (OpenAI, vLLM), or choices that carry nothing
//!   (an empty delta and no finish reason): the whole event goes;
//! - a `usage` member on a chunk that carries something (the finish chunk, as Ollama,
//!   llama.cpp and DeepSeek send it, or every chunk, with a running count): the member
//!   goes, with its comma, and every other byte of the chunk stays as it was;
//! - `"usage":null` on every other chunk (OpenAI): the member goes.
//!
//! Members are found by reading the event's JSON object at its top level (strings and
//! nesting skipped), so a `usage` key inside content or a nested object is left alone.
//! Only whole events are rewritten: the bytes of an event not yet complete are held until
//! its blank line arrives (an SSE client cannot use them before that either). An event
//! larger than [`MAX_EVENT`] is not held: once it outgrows the cap, its bytes go out
//! unchanged as they come, up to its end. Each byte is looked at once: the search for an
//! event's end goes on where the previous chunk's search stopped.

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

/// Made once: building a searcher is most of the cost of one search in an event.
static USAGE_KEY: std::sync::LazyLock<memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

fn strip_event(event: &[u8], out: &mut BytesMut) {
    match usage_cut(event) {
        None => out.extend_from_slice(event),
        Some(Cut::Event) => {}
        Some(Cut::Span(from, to)) => {
            out.extend_from_slice(&event[..from]);
            out.extend_from_slice(&event[to..]);
        }
    }
}

/// What goes of an event that carries usage.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    /// The event carries nothing but the usage.
    Event,
    /// These bytes: the `usage` member and one comma beside it.
    Span(usize, usize),
}

/// What to remove from `event` (one SSE event: its `data:` line holds a JSON object), or
/// `None` when it has no top-level `usage` member, or is not such an object.
fn usage_cut(event: &[u8]) -> Option<Cut> {
    USAGE_KEY.find(event)?;
    // OpenAI's `"usage":null` ends every other chunk: a member right before the brace
    // that ends the JSON text is a member of the top-level object, so no scan is needed.
    let text_end = event
        .iter()
        .rposition(|b| !matches!(b, b'\n' | b'\r'))
        .map_or(0, |i| i + 1);
    const NULL_LAST: &[u8] = b",\"usage\":null}";
    if event[..text_end].ends_with(NULL_LAST) {
        let from = text_end - NULL_LAST.len();
        return Some(Cut::Span(from, text_end - 1));
    }
    let data = if event.starts_with(b"data:") {
        5
    } else {
        memmem::find(event, b"\ndata:")? + 6
    };
    let start = data + memchr(b'{', &event[data..])?;
    let o = &event[start..];
    let key_at = top_level_key(o, b"usage")?;
    let value_at = skip_ws(o, memchr(b':', &o[key_at..])? + key_at + 1);
    // What the relay's flag brings is an object, or `null`; anything else is the
    // server's own and stays.
    let value_end = match o.get(value_at)? {
        b'{' => {
            let end = object_end(o, value_at)?;
            if carries_nothing_else(o) {
                return Some(Cut::Event);
            }
            end
        }
        _ if o[value_at..].starts_with(b"null") => value_at + 4,
        _ => return None,
    };
    // With the comma before it, or for the first member, the one after it.
    let before = o[..key_at].iter().rposition(|b| !b.is_ascii_whitespace())?;
    let (from, to) = if o[before] == b',' {
        (before, value_end)
    } else {
        let after = skip_ws(o, value_end);
        match o.get(after)? {
            b',' => (key_at, skip_ws(o, after + 1)),
            _ => (key_at, value_end),
        }
    };
    Some(Cut::Span(start + from, start + to))
}

fn skip_ws(o: &[u8], mut i: usize) -> usize {
    while i < o.len() && o[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Where the key `name` of the object `o` starts with is, at its top level: braces are
/// counted and strings skipped, with a vectorized search for the three bytes that
/// matter. (A key is always at a brace depth of one more than its object's; arrays hold
/// values, never keys.)
fn top_level_key(o: &[u8], name: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(r) = memchr::memchr3(b'"', b'{', b'}', &o[i..]) {
        let j = i + r;
        match o[j] {
            b'{' => {
                depth += 1;
                i = j + 1;
            }
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return None;
                }
                i = j + 1;
            }
            _ => {
                let end = string_end(o, j)?;
                if depth == 1 && &o[j + 1..end - 1] == name && o.get(skip_ws(o, end)) == Some(&b':')
                {
                    return Some(j);
                }
                i = end;
            }
        }
    }
    None
}

/// The index just past the object whose `{` is at `i`.
fn object_end(o: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while let Some(r) = memchr::memchr3(b'"', b'{', b'}', &o[i..]) {
        let j = i + r;
        match o[j] {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(j + 1);
                }
            }
            _ => {
                i = string_end(o, j)?;
                continue;
            }
        }
        i = j + 1;
    }
    None
}

/// Whether a chunk is there only for its usage: no choices, or choices that each have
/// an empty delta (nothing but nulls and empty strings) and no finish reason. Read with
/// serde: this runs once a stream, on the chunk that carries the usage.
fn carries_nothing_else(object: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde_json::Value>>,
    }
    let mut de = serde_json::Deserializer::from_slice(object);
    let Ok(chunk) = <Chunk as serde::Deserialize>::deserialize(&mut de) else {
        return false;
    };
    let empty = |v: &serde_json::Value| match v {
        serde_json::Value::Null => true,
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Object(o) => o.values().all(|f| f.is_null() || f.as_str() == Some("")),
        _ => false,
    };
    chunk.choices.unwrap_or_default().iter().all(|c| {
        c.get("finish_reason")
            .is_none_or(serde_json::Value::is_null)
            && c.get("delta").is_none_or(empty)
    })
}

/// The index just past the string whose opening quote is at `i`.
fn string_end(o: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        let j = i + memchr::memchr2(b'"', b'\\', &o[i..])?;
        if o[j] == b'"' {
            return Some(j + 1);
        }
        i = j + 2;
        if i > o.len() {
            return None;
        }
    }
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

    /// Every way of feeding `with` in three pieces gives `without`.
    fn strips_to(with: &str, without: &str) {
        let s = with.as_bytes();
        for i in 0..=s.len() {
            for j in (i..=s.len()).step_by(7) {
                let out = run(&mut UsageStripper::default(), &[&s[..i], &s[i..j], &s[j..]]);
                assert_eq!(String::from_utf8(out).unwrap(), without, "split at {i},{j}");
            }
        }
    }

    const CONTENT: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
    const FINISH: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    const USAGE: &str = "{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4,\"prompt_tokens_details\":{\"cached_tokens\":0},\"extra\":{\"queue_ms\":[1,2]}}";

    /// `chunk` (one `data: {...}\n\n` event) with `member` added before its closing brace.
    fn with_member(chunk: &str, member: &str) -> String {
        let end = chunk.rfind('}').unwrap();
        format!("{}{member}{}", &chunk[..end], &chunk[end..])
    }

    #[test]
    fn a_chunk_with_choices_that_carry_nothing_goes_whole() {
        let usage_chunk = format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":{USAGE}}}\n\n"
        );
        strips_to(
            &format!("{CONTENT}{FINISH}{usage_chunk}data: [DONE]\n\n"),
            &format!("{CONTENT}{FINISH}data: [DONE]\n\n"),
        );
    }

    #[test]
    fn usage_on_the_finish_chunk_loses_the_member_only() {
        let finish = with_member(FINISH, &format!(",\"usage\":{USAGE}"));
        strips_to(
            &format!("{CONTENT}{finish}data: [DONE]\n\n"),
            &format!("{CONTENT}{FINISH}data: [DONE]\n\n"),
        );
        // First among the members, and spaced as some servers write JSON.
        let first = format!(
            "data: {{\"usage\": {USAGE}, \"id\": \"c\", \"choices\": [{{\"index\": 0, \"delta\": {{}}, \"finish_reason\": \"length\"}}]}}\n\n"
        );
        strips_to(
            &first,
            "data: {\"id\": \"c\", \"choices\": [{\"index\": 0, \"delta\": {}, \"finish_reason\": \"length\"}]}\n\n",
        );
    }

    #[test]
    fn a_running_count_on_every_chunk_is_removed_from_each() {
        let counted = |chunk: &str, n: u32| {
            with_member(
                chunk,
                &format!(",\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":{n},\"total_tokens\":{}}}", 3 + n),
            )
        };
        strips_to(
            &format!(
                "{}{}{}data: [DONE]\n\n",
                counted(CONTENT, 1),
                counted(CONTENT, 2),
                counted(FINISH, 2)
            ),
            &format!("{CONTENT}{CONTENT}{FINISH}data: [DONE]\n\n"),
        );
    }

    #[test]
    fn usage_below_the_top_level_is_left_alone() {
        let nested = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"function\":{\"usage\":{\"a\":1}}}]},\"usage\":null}],\"x\":1}\n\n";
        strips_to(nested, nested);
        assert_eq!(
            usage_cut(b"data: {\"usage\":null}\n\n"),
            Some(Cut::Span(7, 19))
        );
        assert_eq!(
            usage_cut(b"data: {\"usage\":{\"a\":1}}\n\n"),
            Some(Cut::Event)
        );
        assert_eq!(usage_cut(b"data: {\"usage\":null"), None);
        assert_eq!(usage_cut(b"data: {\"usage\": 5}\n\n"), None);
        assert_eq!(usage_cut(b"data: [DONE]\n\n"), None);
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
