//! Stream stage (`response_body_filter`): an incremental Server-Sent Events reader.
//!
//! It takes the response body in whatever pieces the network delivers (split inside a
//! line, between `\r` and `\n`, inside a UTF-8 character) and yields complete events.
//! An event with one `data:` line inside one chunk is handed out as a slice of that
//! chunk: no copy, no allocation. Only an event that spans chunks or has several `data:`
//! lines is assembled, in a buffer reused from event to event. Lines end in LF, CRLF or
//! a lone CR; `:` lines are comments; `id:` and `retry:` are ignored (the relay does not
//! reconnect). Pure and synchronous: no I/O, no clock.

use memchr::memchr2;

/// One dispatched event. `name` is empty for the default `message` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    pub name: &'a [u8],
    pub data: &'a [u8],
}

/// The longest event name kept; longer names are cut (no provider uses one).
const MAX_NAME: usize = 64;
/// An unterminated line longer than this is dropped rather than buffered without end.
const MAX_LINE: usize = 8 << 20;

#[derive(Default)]
pub struct SseReader {
    /// Bytes of a line not yet ended, carried to the next chunk.
    carry: Vec<u8>,
    /// The previous chunk ended in `\r`: a leading `\n` belongs to that line end.
    skip_lf: bool,
    /// The carried line grew past [`MAX_LINE`]; skip to its end.
    discarding: bool,
    state: EventState,
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
                if !self.discarding {
                    self.carry.extend_from_slice(&chunk[pos..]);
                    if self.carry.len() > MAX_LINE {
                        self.carry.clear();
                        self.discarding = true;
                    }
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
            if self.discarding {
                self.discarding = false;
            } else if self.carry.is_empty() {
                self.state.line(chunk, pos, end, true, &mut on_event);
            } else {
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
