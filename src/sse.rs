//! Stream stage (`response_body_filter`): an incremental Server-Sent Events reader.
//!
//! It takes the response body in whatever pieces the network delivers (split inside a
//! line, between `\r` and `\n`, inside a UTF-8 character) and yields complete events.
//! An event with one `data:` line inside one chunk is handed out as a slice of that
//! chunk: no copy, no allocation. Only an event that spans chunks or has several `data:`
//! lines is assembled, in a buffer reused from event to event. Lines end in LF, CRLF or
//! a lone CR; `:` lines are comments; `id:` and `retry:` are ignored (the relay does not
//! reconnect). An event whose lines hold more than [`MAX_EVENT`] bytes is not read: the
//! reader keeps none of it, skips to its end and counts it ([`SseReader::oversized`]).
//! Pure and synchronous: no I/O, no clock.

use memchr::memchr2;

/// One dispatched event. `name` is empty for the default `message` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    pub name: &'a [u8],
    pub data: &'a [u8],
}

/// The longest event name kept; longer names are cut (no provider uses one).
const MAX_NAME: usize = 64;
/// The most bytes one event's lines may hold (line ends not counted) and still be read.
/// A usage event is a few hundred bytes; what an upstream sends past this is not kept.
pub const MAX_EVENT: usize = 1 << 20;

pub struct SseReader {
    /// Bytes of a line not yet ended, carried to the next chunk.
    carry: Vec<u8>,
    /// The previous chunk ended in `\r`: a leading `\n` belongs to that line end.
    skip_lf: bool,
    /// Bytes of the current event's ended lines (line ends not counted).
    event_len: usize,
    /// The current event outgrew `max_event`: its lines are skipped to its blank line.
    skipping: bool,
    /// While skipping: the current line has bytes, so its end is not a blank line.
    skipped_line_open: bool,
    /// Events skipped for their size.
    oversized: u64,
    max_event: usize,
    state: EventState,
}

impl Default for SseReader {
    fn default() -> Self {
        SseReader::with_max_event(MAX_EVENT)
    }
}

struct EventState {
    name: [u8; MAX_NAME],
    name_len: usize,
    data: Data,
    /// Data assembled across lines or chunks.
    owned: Vec<u8>,
}

impl Default for EventState {
    fn default() -> Self {
        EventState {
            name: [0; MAX_NAME],
            name_len: 0,
            data: Data::None,
            owned: Vec::new(),
        }
    }
}

#[derive(Default, Clone, Copy)]
enum Data {
    #[default]
    None,
    /// One `data:` line in the current chunk, at `start..end`.
    InChunk(usize, usize),
    /// In `EventState::owned`.
    Owned,
}

impl SseReader {
    pub fn new() -> SseReader {
        SseReader::default()
    }

    /// A reader that skips events larger than `max_event` bytes instead of
    /// [`MAX_EVENT`].
    pub fn with_max_event(max_event: usize) -> SseReader {
        SseReader {
            carry: Vec::new(),
            skip_lf: false,
            event_len: 0,
            skipping: false,
            skipped_line_open: false,
            oversized: 0,
            max_event,
            state: EventState::default(),
        }
    }

    /// How many events were skipped, unread, for being larger than the cap (counted
    /// when an event outgrows it, so also one the stream cuts off).
    pub fn oversized(&self) -> u64 {
        self.oversized
    }

    /// Feeds one chunk; `on_event` is called for every event it completes.
    pub fn feed<F: FnMut(Event<'_>)>(&mut self, chunk: &[u8], mut on_event: F) {
        let mut pos = 0;
        if self.skip_lf && !chunk.is_empty() {
            self.skip_lf = false;
            if chunk.first() == Some(&b'\n') {
                pos = 1;
            }
        }
        while pos < chunk.len() {
            let Some(rel) = memchr2(b'\n', b'\r', &chunk[pos..]) else {
                let rest = &chunk[pos..];
                if self.skipping {
                    self.skipped_line_open = true;
                } else if self.event_len + self.carry.len() + rest.len() > self.max_event {
                    self.overflow();
                    self.skipped_line_open = true;
                } else {
                    self.carry.extend_from_slice(rest);
                }
                break;
            };
            let end = pos + rel;
            let next = match (chunk[end], chunk.get(end + 1)) {
                (b'\r', Some(b'\n')) => end + 2,
                (b'\r', None) => {
                    self.skip_lf = true;
                    end + 1
                }
                _ => end + 1,
            };
            let len = self.carry.len() + rel;
            if self.skipping {
                if len == 0 && !self.skipped_line_open {
                    // The blank line that ends the skipped event.
                    self.skipping = false;
                }
                self.skipped_line_open = false;
            } else if self.event_len + len > self.max_event {
                self.overflow();
            } else if len == 0 {
                self.event_len = 0;
                self.state.line(chunk, pos, end, true, &mut on_event);
            } else if self.carry.is_empty() {
                self.event_len += len;
                self.state.line(chunk, pos, end, true, &mut on_event);
            } else {
                self.event_len += len;
                self.carry.extend_from_slice(&chunk[pos..end]);
                let line = std::mem::take(&mut self.carry);
                self.state.line(&line, 0, line.len(), false, &mut on_event);
                self.carry = line;
                self.carry.clear();
            }
            pos = next;
        }
        // Data that points into this chunk is copied before the chunk goes away.
        if let Data::InChunk(s, e) = self.state.data {
            self.state.owned.clear();
            self.state.owned.extend_from_slice(&chunk[s..e]);
            self.state.data = Data::Owned;
        }
    }

    /// The current event is larger than the cap: drop what is kept of it and skip the
    /// rest of its lines.
    fn overflow(&mut self) {
        self.oversized += 1;
        self.skipping = true;
        self.skipped_line_open = false;
        self.event_len = 0;
        self.carry.clear();
        self.state.data = Data::None;
        self.state.name_len = 0;
        self.state.owned.clear();
        // Give back what the big event grew; the next events are small again.
        const KEEP: usize = 64 << 10;
        if self.carry.capacity() > KEEP {
            self.carry = Vec::new();
        }
        if self.state.owned.capacity() > KEEP {
            self.state.owned = Vec::new();
        }
    }
}

impl EventState {
    /// Handles one complete line, `buf[start..end]` without its line end. `in_chunk`
    /// says `buf` is the chunk being fed (its slices stay valid until the feed ends).
    fn line<F: FnMut(Event<'_>)>(
        &mut self,
        buf: &[u8],
        start: usize,
        end: usize,
        in_chunk: bool,
        on_event: &mut F,
    ) {
        let line = &buf[start..end];
        if line.is_empty() {
            let data: &[u8] = match self.data {
                Data::None => {
                    self.name_len = 0;
                    return;
                }
                Data::InChunk(s, e) => &buf[s..e],
                Data::Owned => &self.owned,
            };
            on_event(Event {
                name: &self.name[..self.name_len],
                data,
            });
            self.data = Data::None;
            self.name_len = 0;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value_start) = match memchr::memchr(b':', line) {
            Some(i) if line.get(i + 1) == Some(&b' ') => (&line[..i], start + i + 2),
            Some(i) => (&line[..i], start + i + 1),
            None => (line, end),
        };
        let value = &buf[value_start..end];
        match field {
            b"data" => match self.data {
                Data::None if in_chunk => self.data = Data::InChunk(value_start, end),
                Data::None => {
                    self.owned.clear();
                    self.owned.extend_from_slice(value);
                    self.data = Data::Owned;
                }
                Data::InChunk(s, e) => {
                    // Only reachable within one chunk: `buf` is that chunk.
                    self.owned.clear();
                    self.owned.extend_from_slice(&buf[s..e]);
                    self.owned.push(b'\n');
                    self.owned.extend_from_slice(value);
                    self.data = Data::Owned;
                }
                Data::Owned => {
                    self.owned.push(b'\n');
                    self.owned.extend_from_slice(value);
                }
            },
            b"event" => {
                let n = value.len().min(MAX_NAME);
                self.name[..n].copy_from_slice(&value[..n]);
                self.name_len = n;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut r = SseReader::new();
        let mut out = Vec::new();
        for c in chunks {
            r.feed(c, |e| {
                out.push((
                    String::from_utf8_lossy(e.name).into_owned(),
                    String::from_utf8_lossy(e.data).into_owned(),
                ))
            });
        }
        out
    }

    /// Every way of cutting `stream` in two and in three gives the same events.
    fn same_at_every_split(stream: &[u8]) -> Vec<(String, String)> {
        let whole = collect(&[stream]);
        for i in 0..=stream.len() {
            assert_eq!(
                collect(&[&stream[..i], &stream[i..]]),
                whole,
                "split at {i}"
            );
            for j in i..=stream.len() {
                assert_eq!(
                    collect(&[&stream[..i], &stream[i..j], &stream[j..]]),
                    whole,
                    "split at {i},{j}"
                );
            }
        }
        whole
    }

    #[test]
    fn openai_style_stream() {
        let s = b"data: {\"a\":1}\n\ndata: {\"b\":\"\xc3\xa9\"}\n\ndata: [DONE]\n\n";
        let events = same_at_every_split(s);
        assert_eq!(
            events,
            [
                ("".into(), "{\"a\":1}".into()),
                ("".into(), "{\"b\":\"é\"}".into()),
                ("".into(), "[DONE]".into())
            ]
        );
    }

    #[test]
    fn anthropic_style_named_events_with_crlf() {
        let s = b"event: message_start\r\ndata: {\"x\":1}\r\n\r\nevent: ping\r\ndata: {}\r\n\r\n";
        let events = same_at_every_split(s);
        assert_eq!(
            events,
            [
                ("message_start".into(), "{\"x\":1}".into()),
                ("ping".into(), "{}".into())
            ]
        );
    }

    #[test]
    fn multi_line_data_comments_lone_cr_and_no_space() {
        let s =
            b": keep-alive\r\rdata:a\rdata: b\r\rid: 7\nretry: 10\ndata\n\nevent: only-name\n\n";
        let events = same_at_every_split(s);
        // An empty `data` line gives an event with empty data; a name without data is
        // not dispatched.
        assert_eq!(events, [("".into(), "a\nb".into()), ("".into(), "".into())]);
    }

    #[test]
    fn unterminated_event_is_not_dispatched() {
        assert!(collect(&[b"data: partial"]).is_empty());
        assert!(collect(&[b"data: partial\n"]).is_empty());
        assert_eq!(collect(&[b"data: partial\n", b"\n"]).len(), 1);
    }

    fn collect_capped(max: usize, chunks: &[&[u8]]) -> (Vec<String>, u64) {
        let mut r = SseReader::with_max_event(max);
        let mut out = Vec::new();
        for c in chunks {
            r.feed(c, |e| {
                out.push(String::from_utf8_lossy(e.data).into_owned())
            });
        }
        (out, r.oversized())
    }

    #[test]
    fn an_event_over_the_cap_is_skipped_and_the_next_is_read() {
        // Lines of one event are counted together, without their line ends: 6 + 58 = 64
        // bytes is read, 65 is not.
        let fits = format!("data: {}", "a".repeat(58));
        let over = format!("data: {}", "b".repeat(59));
        let two_lines = format!("data: {}\r\ndata: {}", "c".repeat(30), "c".repeat(30));
        let s = format!(
            "data: first\n\n{fits}\n\n{over}\n\nevent: x\n{two_lines}\r\n\r\n: note\ndata: last\r\n\r\n"
        );
        let s = s.as_bytes();
        let whole = collect_capped(64, &[s]);
        assert_eq!(
            whole,
            (vec!["first".into(), "a".repeat(58), "last".into()], 2)
        );
        for i in 0..=s.len() {
            assert_eq!(
                collect_capped(64, &[&s[..i], &s[i..]]),
                whole,
                "split at {i}"
            );
            for j in (i..=s.len()).step_by(7) {
                assert_eq!(
                    collect_capped(64, &[&s[..i], &s[i..j], &s[j..]]),
                    whole,
                    "split at {i},{j}"
                );
            }
        }
    }

    #[test]
    fn a_huge_event_of_many_data_lines_keeps_no_more_than_the_cap() {
        let mut s = b"data: before\n\n".to_vec();
        while s.len() < 3 * MAX_EVENT {
            s.extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\"ab\"}}]}\n");
        }
        s.extend_from_slice(b"\ndata: after\n\n");
        let mut r = SseReader::new();
        let mut events = Vec::new();
        for piece in s.chunks(4000) {
            r.feed(piece, |e| events.push(e.data.to_vec()));
            assert!(r.state.owned.len() <= MAX_EVENT, "{}", r.state.owned.len());
            assert!(r.state.owned.capacity() <= 2 * MAX_EVENT);
            assert!(r.carry.len() <= MAX_EVENT);
        }
        assert_eq!(events, [b"before".to_vec(), b"after".to_vec()]);
        assert_eq!(r.oversized(), 1);
        // What the big event grew was given back.
        assert!(r.state.owned.capacity() <= 64 << 10);
    }

    #[test]
    fn a_huge_single_line_is_not_carried_past_the_cap() {
        let mut s = b"data: ".to_vec();
        s.resize(3 * MAX_EVENT, b'x');
        s.extend_from_slice(b"\r\n\r\ndata: after\r\n\r\n");
        let mut r = SseReader::new();
        let mut events = Vec::new();
        for piece in s.chunks(1500) {
            r.feed(piece, |e| events.push(e.data.to_vec()));
            assert!(r.carry.len() <= MAX_EVENT);
        }
        assert_eq!(events, [b"after".to_vec()]);
        assert_eq!(r.oversized(), 1);
        // The same stream at once.
        let mut r = SseReader::new();
        let mut n = 0;
        r.feed(&s, |e| {
            assert_eq!(e.data, b"after");
            n += 1
        });
        assert_eq!((n, r.oversized()), (1, 1));
    }

    #[test]
    fn in_chunk_events_borrow_the_chunk() {
        let chunk = b"data: xyz\n\n".to_vec();
        let mut r = SseReader::new();
        let mut seen = None;
        r.feed(&chunk, |e| seen = Some(e.data.as_ptr()));
        assert_eq!(
            seen,
            Some(chunk[6..].as_ptr()),
            "data should be a slice of the chunk"
        );
    }
}
