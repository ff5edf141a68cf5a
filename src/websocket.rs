//! WebSocket sessions (RFC 6455) through the relay, such as OpenAI's Realtime API: the
//! handshake's credentials, and a frame reader for the bytes that pass. Pure.
//!
//! After the `101 Switching Protocols` Pingora passes the bytes both ways unchanged;
//! the relay only reads them. [`FrameReader`] follows the framing of one direction as it
//! goes by in chunks of any size: it counts frames, knows whether the stream is between
//! two frames (where a close frame of the relay's own may be written), and hands text
//! messages (fragmented or not) to the caller. Most messages of a voice session are
//! audio deltas of tens of kilobytes each; the caller sees the first [`PREFIX`] bytes
//! of each (enough for its `type`) and asks for the whole only of the few it reads.
//!
//! `Sec-WebSocket-Extensions` is never forwarded, so no compression is agreed and
//! every frame stays readable (as `accept-encoding` is dropped for HTTP).

use pingora_http::RequestHeader;

/// The part of a text message shown first.
pub const PREFIX: usize = 256;
/// A text message read whole is given up past this size (its usage is then unknown).
pub const MAX_MESSAGE: usize = 1 << 20;

/// The form in which browser clients put a key into the subprotocol list (`new
/// WebSocket(url, ["realtime", "openai-insecure-api-key.KEY"])`), since a browser cannot set
/// `Authorization` on a WebSocket.
pub const KEY_PROTOCOL: &str = "openai-insecure-api-key.";

/// Whether a request asks for a WebSocket (`GET` with `Upgrade: websocket`).
pub fn is_websocket(req: &RequestHeader) -> bool {
    req.method == http::Method::GET
        && req
            .headers
            .get(http::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

/// The key a client put into `Sec-WebSocket-Protocol`, if any (only a WebSocket's
/// handshake is read for one).
pub fn protocol_key(req: &RequestHeader) -> Option<&[u8]> {
    if !is_websocket(req) {
        return None;
    }
    req.headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .find_map(|p| p.strip_prefix(KEY_PROTOCOL.as_bytes()))
        .filter(|k| !k.is_empty())
}

/// Removes the tenant's key from the subprotocol list (the other protocols stay, in
/// their order), the extension offers, and the relay's own body framing
/// ([`hold_handshake_body`]), which becomes `content-length: 0`. Nothing else of the
/// handshake changes.
pub fn scrub_handshake(req: &mut RequestHeader) -> pingora_core::Result<()> {
    req.remove_header(&http::header::SEC_WEBSOCKET_EXTENSIONS);
    // The relay's own framing off; an explicit empty body, or Pingora would frame the
    // upstream request as chunked too and the provider would wait for its end.
    req.remove_header(&http::header::TRANSFER_ENCODING);
    req.insert_header(http::header::CONTENT_LENGTH, "0")?;
    let offered = req
        .headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(|v| memchr::memmem::find(v.as_bytes(), KEY_PROTOCOL.as_bytes()).is_some());
    if !offered {
        return Ok(());
    }
    crate::policy::keep_list_items(req, http::header::SEC_WEBSOCKET_PROTOCOL, |p| {
        !p.starts_with(KEY_PROTOCOL)
    })
}

/// Works around a race in Pingora 0.9.1 (cloudflare/pingora#946): the proxy queues the
/// end of the handshake's empty body before the upstream answers; when the `101` is
/// read first, that end is taken for the end of the upgraded tunnel, and the session
/// closes right after the handshake (seen here in about one session in 30 on a loaded
/// machine). Announced as chunked, the client's side has no body end to queue: Pingora
/// waits for the body, and at the `101` it reads the rest as the session's frames. The
/// header is the relay's alone (a handshake with a body of its own is refused) and never
/// goes upstream: the provider gets `content-length: 0` ([`scrub_handshake`]). When the upstream answers anything but `101`,
/// Pingora keeps the connection open until the client closes it (WebSocket clients do
/// on a failed handshake) or the client read timeout passes.
pub fn hold_handshake_body(req: &mut RequestHeader) -> pingora_core::Result<()> {
    req.insert_header(http::header::TRANSFER_ENCODING, "chunked")
}

/// What a session's row says of its request: the model named in the handshake's query
/// (`?model=`, as the Realtime API takes it); a session is a stream.
pub fn handshake_info(req: &RequestHeader) -> crate::request_info::RequestInfo {
    let model = req.uri.query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("model="))
            .filter(|m| !m.is_empty() && !m.contains('%') && !m.contains('+'))
            .map(str::to_string)
    });
    crate::request_info::RequestInfo {
        model,
        stream: true,
        ..Default::default()
    }
}

/// Closes the open sessions when the grace period of a shutdown or upgrade ends, a
/// moment before Pingora drops what still runs: each client gets a close frame (1001)
/// instead of a cut connection. Until then a session goes on in the old process.
pub struct SessionCloser {
    /// `server.grace_period_seconds`.
    pub grace: std::time::Duration,
}

/// How long before the end of the grace period sessions are closed.
const CLOSE_AHEAD: std::time::Duration = std::time::Duration::from_secs(1);

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for SessionCloser {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        tokio::time::sleep(self.grace.saturating_sub(CLOSE_AHEAD)).await;
        let closed = crate::stall::close_sessions();
        if closed > 0 {
            log::info!("grace period ending: {closed} open WebSocket sessions closed");
        }
    }
}

/// A close frame as a server sends it (unmasked): `code` and a short reason.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut f = Vec::with_capacity(4 + reason.len());
    f.push(0x88);
    f.push(2 + reason.len() as u8);
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(reason);
    f
}

/// What a [`FrameReader`] shows of the text messages it passes.
pub enum Seen<'a> {
    /// The first [`PREFIX`] bytes of a text message (all of it when shorter). The
    /// caller answers whether it wants the whole message.
    Start(&'a [u8]),
    /// A whole text message the caller asked for.
    Whole(&'a [u8]),
    /// A message asked for was larger than [`MAX_MESSAGE`] and went by unread.
    TooLarge,
}

/// Where the current text message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Text {
    /// No text message, or one nobody reads (binary, or not asked for).
    Skip,
    /// Collecting its first [`PREFIX`] bytes.
    Prefix,
    /// Collecting all of it.
    Whole,
}

/// Follows the frames of one direction of a session.
pub struct FrameReader {
    head: [u8; 14],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// The current frame ends its message.
    fin: bool,
    /// Payload is being read (the frame is unmasked, and of a text message).
    reading: bool,
    text: Text,
    buf: Vec<u8>,
    /// Text messages are shown (the server's direction); else only frames are counted.
    read_text: bool,
    /// Frames whose header has passed.
    pub frames: u64,
    /// A close frame passed.
    pub closed: bool,
    /// The bytes stopped making sense as frames (nothing more is read).
    pub broken: bool,
}

impl FrameReader {
    pub fn new(read_text: bool) -> FrameReader {
        FrameReader {
            head: [0; 14],
            head_len: 0,
            left: 0,
            fin: false,
            reading: false,
            text: Text::Skip,
            buf: Vec::new(),
            read_text,
            frames: 0,
            closed: false,
            broken: false,
        }
    }

    /// Between two frames: a frame written now would not land inside another.
    pub fn at_boundary(&self) -> bool {
        !self.broken && self.head_len == 0 && self.left == 0
    }

    /// Reads one chunk; `on` sees the text messages (its answer to [`Seen::Start`] says
    /// whether to read the message whole).
    pub fn feed(&mut self, mut chunk: &[u8], on: &mut dyn FnMut(Seen<'_>) -> bool) {
        while !chunk.is_empty() && !self.broken {
            if self.left == 0 {
                let used = self.header(chunk);
                chunk = &chunk[used..];
                if self.left == 0 && self.head_len == 0 {
                    // A frame without payload (or a control frame) ended in its header.
                    self.frame_end(on);
                }
                continue;
            }
            let n = chunk
                .len()
                .min(usize::try_from(self.left).unwrap_or(usize::MAX));
            if self.reading {
                self.payload(&chunk[..n], on);
            }
            self.left -= n as u64;
            chunk = &chunk[n..];
            if self.left == 0 {
                self.frame_end(on);
            }
        }
    }

    /// Takes header bytes from `chunk`; returns how many it used. Once the header is
    /// whole the frame starts (`left` is its payload length).
    fn header(&mut self, chunk: &[u8]) -> usize {
        let mut used = 0;
        loop {
            let need = match self.head_len {
                0 | 1 => 2,
                _ => {
                    let ext = match self.head[1] & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    2 + ext + if self.head[1] & 0x80 != 0 { 4 } else { 0 }
                }
            };
            if self.head_len >= need {
                break;
            }
            let Some(&b) = chunk.get(used) else {
                return used;
            };
            self.head[self.head_len] = b;
            self.head_len += 1;
            used += 1;
        }
        self.start_frame();
        used
    }

    fn start_frame(&mut self) {
        let (b0, b1) = (self.head[0], self.head[1]);
        let len = match b1 & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => u64::from_be_bytes(self.head[2..10].try_into().unwrap_or([0; 8])),
            n => u64::from(n),
        };
        let masked = b1 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        self.head_len = 0;
        self.frames += 1;
        self.left = len;
        self.fin = b0 & 0x80 != 0;
        match opcode {
            // A control frame may come between the fragments of a message.
            0x8 => self.closed = true,
            0x9 | 0xa => {}
            0x1 => {
                self.text = if self.read_text {
                    Text::Prefix
                } else {
                    Text::Skip
                }
            }
            0x2 => self.text = Text::Skip,
            0x0 => {}
            _ => self.broken = true,
        }
        if opcode >= 0x8 {
            if len > 125 || !self.fin {
                self.broken = true;
            }
            self.reading = false;
            self.fin = false;
            return;
        }
        if opcode == 0x1 {
            self.buf.clear();
        }
        self.reading = self.text != Text::Skip && !masked;
    }

    fn payload(&mut self, data: &[u8], on: &mut dyn FnMut(Seen<'_>) -> bool) {
        match self.text {
            Text::Skip => {}
            Text::Prefix => {
                let take = data.len().min(PREFIX - self.buf.len());
                self.buf.extend_from_slice(&data[..take]);
                if self.buf.len() == PREFIX {
                    self.decide(on);
                    if self.text == Text::Whole {
                        self.whole(&data[take..], on);
                    }
                }
            }
            Text::Whole => self.whole(data, on),
        }
    }

    fn whole(&mut self, data: &[u8], on: &mut dyn FnMut(Seen<'_>) -> bool) {
        if self.buf.len() + data.len() > MAX_MESSAGE {
            on(Seen::TooLarge);
            self.text = Text::Skip;
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(data);
    }

    /// The prefix is known: does the caller want the rest?
    fn decide(&mut self, on: &mut dyn FnMut(Seen<'_>) -> bool) {
        self.text = if on(Seen::Start(&self.buf)) {
            Text::Whole
        } else {
            Text::Skip
        };
        self.reading = self.text == Text::Whole;
    }

    fn frame_end(&mut self, on: &mut dyn FnMut(Seen<'_>) -> bool) {
        if !self.fin {
            return;
        }
        if self.text == Text::Prefix {
            self.decide(on);
        }
        if self.text == Text::Whole {
            on(Seen::Whole(&self.buf));
        }
        self.text = Text::Skip;
        self.reading = false;
        if self.buf.capacity() > 4 * PREFIX {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A frame as a server (mask `None`) or a client writes it.
    pub(crate) fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65_536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    /// Feeds `bytes` in pieces of `step`; returns the starts and wholes seen.
    fn read(
        bytes: &[u8],
        step: usize,
        want: &dyn Fn(&[u8]) -> bool,
    ) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, FrameReader) {
        let mut r = FrameReader::new(true);
        let (mut starts, mut wholes) = (Vec::new(), Vec::new());
        for piece in bytes.chunks(step) {
            r.feed(piece, &mut |s| match s {
                Seen::Start(p) => {
                    starts.push(p.to_vec());
                    want(p)
                }
                Seen::Whole(w) => {
                    wholes.push(w.to_vec());
                    false
                }
                Seen::TooLarge => panic!("too large"),
            });
        }
        (starts, wholes, r)
    }

    #[test]
    fn messages_are_read_across_any_split_and_fragmentation() {
        let big = format!(
            "{{\"type\":\"response.done\",\"pad\":\"{}\"}}",
            "x".repeat(70_000)
        );
        let mut s = frame(true, 1, br#"{"type":"a"}"#, None);
        // A fragmented message with a ping between its fragments.
        s.extend(frame(false, 1, br#"{"type":"resp"#, None));
        s.extend(frame(true, 9, b"hi", None));
        s.extend(frame(true, 0, br#"onse.done"}"#, None));
        s.extend(frame(true, 2, &[1, 2, 3], None));
        s.extend(frame(true, 1, big.as_bytes(), None));
        s.extend(frame(true, 8, &[3, 232], None));
        for step in [1, 3, 7, 100, 65_536, s.len()] {
            let (starts, wholes, r) =
                read(&s, step, &|p| p.starts_with(br#"{"type":"response.done""#));
            assert_eq!(starts.len(), 3, "step {step}");
            assert_eq!(starts[0], br#"{"type":"a"}"#);
            assert_eq!(starts[2].len(), PREFIX);
            assert_eq!(
                wholes,
                vec![
                    br#"{"type":"response.done"}"#.to_vec(),
                    big.as_bytes().to_vec()
                ]
            );
            assert_eq!(r.frames, 7);
            assert!(r.closed && r.at_boundary());
        }
    }

    #[test]
    fn client_frames_are_counted_and_boundaries_known() {
        let k = Some([1, 2, 3, 4]);
        let mut s = frame(true, 1, &[b'a'; 300], k);
        let one = s.len();
        s.extend(frame(true, 2, &[0; 70_000], k));
        let mut r = FrameReader::new(false);
        r.feed(&s[..one - 1], &mut |_| panic!("client text is not read"));
        assert!(!r.at_boundary());
        r.feed(&s[one - 1..one], &mut |_| true);
        assert!(r.at_boundary() && r.frames == 1);
        r.feed(&s[one..], &mut |_| true);
        assert_eq!(r.frames, 2);
        assert!(r.at_boundary() && !r.closed);
    }

    #[test]
    fn a_message_past_the_cap_is_given_up() {
        let s = frame(true, 1, &vec![b' '; MAX_MESSAGE + 1], None);
        let mut r = FrameReader::new(true);
        let mut large = 0;
        r.feed(&s, &mut |seen| {
            if matches!(seen, Seen::TooLarge) {
                large += 1;
            }
            !matches!(seen, Seen::Whole(_))
        });
        assert_eq!(large, 1);
        assert!(r.at_boundary());
    }

    #[test]
    fn the_key_is_read_from_and_removed_from_the_subprotocols() {
        let mut req = RequestHeader::build("GET", b"/v1/realtime?model=m", None).unwrap();
        req.insert_header("upgrade", "websocket").unwrap();
        req.insert_header(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.sk-t1, openai-beta.realtime-v1",
        )
        .unwrap();
        req.insert_header("sec-websocket-extensions", "permessage-deflate")
            .unwrap();
        assert!(is_websocket(&req));
        assert_eq!(protocol_key(&req), Some(&b"sk-t1"[..]));
        scrub_handshake(&mut req).unwrap();
        assert_eq!(
            req.headers["sec-websocket-protocol"],
            "realtime, openai-beta.realtime-v1"
        );
        assert!(req.headers.get("sec-websocket-extensions").is_none());
        assert_eq!(protocol_key(&req), None);
    }

    proptest::proptest! {
        /// Any messages, fragmented and with pings between fragments, read in pieces of
        /// any sizes, are seen as when read in one piece.
        #[test]
        fn any_split_reads_the_same(
            msgs in proptest::collection::vec((0usize..700, 1usize..4, proptest::bool::ANY), 0..12),
            cuts in proptest::collection::vec(1usize..900, 0..40),
        ) {
            let mut s = Vec::new();
            let mut frames = 0u64;
            for (i, (len, parts, text)) in msgs.iter().enumerate() {
                let body: Vec<u8> = (0..*len).map(|j| b'a' + ((i + j) % 26) as u8).collect();
                let step = len.div_ceil(*parts).max(1);
                let pieces: Vec<&[u8]> = if body.is_empty() { vec![&body[..]] } else { body.chunks(step).collect() };
                for (k, p) in pieces.iter().enumerate() {
                    let opcode = if k > 0 { 0 } else if *text { 1 } else { 2 };
                    s.extend(frame(k + 1 == pieces.len(), opcode, p, None));
                    frames += 1;
                    if k + 1 < pieces.len() {
                        s.extend(frame(true, 9, b"p", None));
                        frames += 1;
                    }
                }
            }
            let want = |p: &[u8]| p.len().is_multiple_of(2);
            let (starts, wholes, r) = read(&s, s.len().max(1), &want);
            let mut r2 = FrameReader::new(true);
            let (mut starts2, mut wholes2) = (Vec::new(), Vec::new());
            let mut at = 0usize;
            for c in cuts.iter().chain(std::iter::once(&usize::MAX)) {
                let end = at.saturating_add(*c).min(s.len());
                r2.feed(&s[at..end], &mut |seen| match seen {
                    Seen::Start(p) => { starts2.push(p.to_vec()); want(p) }
                    Seen::Whole(w) => { wholes2.push(w.to_vec()); false }
                    Seen::TooLarge => false,
                });
                at = end;
            }
            proptest::prop_assert_eq!(&starts, &starts2);
            proptest::prop_assert_eq!(&wholes, &wholes2);
            proptest::prop_assert_eq!(r2.frames, frames);
            proptest::prop_assert_eq!(r.frames, frames);
            proptest::prop_assert!(r2.at_boundary());
            let texts = msgs.iter().filter(|m| m.2).count();
            proptest::prop_assert_eq!(starts.len(), texts);
        }
    }

    #[test]
    fn a_close_frame_is_unmasked_with_its_code() {
        assert_eq!(
            close_frame(1001, "bye"),
            vec![0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']
        );
    }
}
