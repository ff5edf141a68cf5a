//! Every request head of a client connection must arrive whole within
//! `listen.head_timeout` (a later one on a kept-alive connection: from its first byte),
//! and within `listen.max_header_bytes`.
//!
//! Pingora times out each read of a head (60 s), not the head: a client sending a byte
//! every few seconds holds a connection (and a task) for hours. This gate wraps the
//! proxy's `ServerApp`: it reads the head itself, with one deadline from accept, then
//! hands the bytes back to the stream (`rewind`) and the connection to Pingora, which
//! parses them from memory. A head that is late gets 408, one that is too large 431, one
//! Pingora's parser would refuse 400, all in the provider's error shape (the route is
//! found from the request line when it came) and all with a row.
//!
//! It also closes a gap in graceful shutdown and upgrade: Pingora drops a connection
//! whose request it is still waiting for when shutdown starts, which includes one
//! accepted a moment before whose request is on its way. Behind the gate, Pingora only
//! gets connections whose head is already in memory, and reads it at once.
//!
//! Every later head on a kept-alive connection goes through the gate too: the gate runs
//! the HTTP/1 keep-alive loop itself (as Pingora's `ServerApp` for an `HttpServerApp`
//! would), so each head has a deadline of its own: Pingora's 60 s keep-alive wait for its
//! first byte, then `head_timeout` from that byte for the whole head. A connection idle
//! between requests is closed quietly at shutdown, as Pingora does.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use log::debug;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, Stream};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::answer::LocalAnswer;
use crate::conncap::ConnectionCap;
use crate::error::{ErrorShape, RelayError};
use crate::recorder::{Recorder, RefusedHead};
use crate::route::RouteTable;

/// Wraps the proxy application (see the module documentation).
pub struct HeadGate<A> {
    inner: Arc<A>,
    timeout: Duration,
    max_bytes: usize,
    routes: Arc<RouteTable>,
    recorder: Arc<Recorder>,
    /// The caps on open client connections, when set.
    cap: Option<Arc<ConnectionCap>>,
}

impl<A> HeadGate<A> {
    pub fn new(
        inner: A,
        timeout: Duration,
        max_bytes: usize,
        routes: Arc<RouteTable>,
        recorder: Arc<Recorder>,
        cap: Option<Arc<ConnectionCap>>,
    ) -> HeadGate<A> {
        HeadGate {
            inner: Arc::new(inner),
            timeout,
            max_bytes,
            routes,
            recorder,
            cap,
        }
    }
}

/// How reading a head ended.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// The bytes up to the blank line (and what came with them).
    Whole,
    /// The client closed or reset before the head was whole: nothing to answer.
    Gone,
    /// Past `max_bytes` without a blank line.
    TooLarge,
    /// The deadline passed first.
    Late,
}

/// Tracks where a head ends as its bytes arrive, in time linear in its length: at the
/// blank line after the headers, with CRLF or bare LF line ends (both of which Pingora's
/// parser accepts). Blank lines before the request line are skipped, as the parser does,
/// so they cannot pass for the end of the head.
#[derive(Default)]
pub struct HeadEnd {
    /// Bytes of blank lines before the request line.
    leading: usize,
    /// Bytes already looked at.
    seen: usize,
}

impl HeadEnd {
    /// Whether `buf` (the bytes so far; those past `seen` are new) holds a whole head.
    pub fn whole(&mut self, buf: &[u8]) -> bool {
        if self.leading == self.seen {
            self.leading += buf[self.seen..]
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
        }
        // A terminator may start up to two bytes before the new ones.
        let from = self.seen.saturating_sub(2).max(self.leading);
        self.seen = buf.len();
        let tail = &buf[from..];
        memchr::memmem::find(tail, b"\n\r\n").is_some()
            || memchr::memmem::find(tail, b"\n\n").is_some()
    }
}

/// How long a head may take: `idle` is the deadline for its first byte; once that came,
/// the whole head is due by `whole` (fixed) or `head_timeout` after the first byte.
struct HeadDeadline {
    idle: tokio::time::Instant,
    after_first_byte: Option<Duration>,
}

/// Pingora's keep-alive wait for the next request on a connection (its default, 60 s).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// Reads into `buf` until the head is whole, the client goes, `max_bytes` pass or the
/// deadline does; `first_byte` is set when the head's first byte came. With
/// `idle_until_shutdown`, a connection that has sent nothing yet is given up at shutdown.
async fn read_head(
    stream: &mut L4Stream,
    buf: &mut Vec<u8>,
    max_bytes: usize,
    deadline: HeadDeadline,
    idle_until_shutdown: Option<&ShutdownWatch>,
    first_byte: &mut Option<Instant>,
) -> Head {
    let mut end = HeadEnd::default();
    let mut due = deadline.idle;
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        let read = match idle_until_shutdown {
            Some(watch) if buf.is_empty() => {
                let mut watch = watch.clone();
                tokio::select! {
                    biased;
                    r = tokio::time::timeout_at(due, stream.read_buf(buf)) => r,
                    _ = watch.wait_for(|down| *down) => return Head::Gone,
                }
            }
            _ => tokio::time::timeout_at(due, stream.read_buf(buf)).await,
        };
        if first_byte.is_none() && !buf.is_empty() {
            let now = Instant::now();
            *first_byte = Some(now);
            if let Some(d) = deadline.after_first_byte {
                due = tokio::time::Instant::from_std(now) + d;
            }
        }
        match read {
            Err(_) => return Head::Late,
            Ok(Err(e)) => {
                debug!("client connection failed before its request head: {e}");
                return Head::Gone;
            }
            Ok(Ok(0)) => return Head::Gone,
            Ok(Ok(_)) => {
                if end.whole(buf) {
                    return Head::Whole;
                }
                if buf.len() > max_bytes {
                    return Head::TooLarge;
                }
            }
        }
    }
}

/// Headers Pingora 0.9 parses a request head with (its `MAX_HEADERS`).
const MAX_HEADERS: usize = 256;

/// Whether Pingora's parser (httparse, called as Pingora 0.9 calls it) refuses this head
/// for good, so that Pingora would answer a plain 400: the gate answers it instead, in
/// the provider's shape and with a row. Errors in the request line's tokens or version
/// are left to Pingora, which first tries escaping the target.
pub fn unparseable(head: &[u8]) -> bool {
    // Uninitialized: a zeroed array of 256 headers (8 KiB) per request is not needed.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(_) | Err(httparse::Error::Token | httparse::Error::Version) => false,
        Err(_) => true,
    }
}

/// The path of a request line, if it has arrived: `METHOD SP PATH SP ...`.
pub fn request_path(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\n').next()?;
    let mut parts = line.split(|&b| b == b' ');
    let _method = parts.next()?;
    let target = parts.next()?;
    parts.next()?;
    let path = std::str::from_utf8(target).ok()?;
    Some(path.split('?').next().unwrap_or(path))
}

/// The client's request id, if its header line arrived whole (to match the row to
/// the client's logs).
pub fn client_request_id(head: &[u8]) -> Option<String> {
    let name = crate::request_id::HEADER.as_bytes();
    head.split(|&b| b == b'\n')
        .skip(1)
        // The last piece may be a line still on its way.
        .take(head.split(|&b| b == b'\n').count().saturating_sub(2))
        .find_map(|line| {
            let (n, v) = line.split_at(line.iter().position(|&b| b == b':')?);
            if !n.eq_ignore_ascii_case(name) {
                return None;
            }
            let v = v[1..].trim_ascii();
            crate::request_id::accept_client_id(v)
        })
}

impl<A> HeadGate<A> {
    /// Records a refused head, then answers it on the raw connection.
    async fn refuse(
        &self,
        stream: &mut L4Stream,
        head: &[u8],
        error: RelayError,
        accepted: Accepted,
    ) {
        let route = request_path(head)
            .and_then(|p| self.routes.find(p))
            .cloned();
        let shape = route
            .as_ref()
            .map_or(ErrorShape::OpenAi, |r| ErrorShape::for_provider(r.provider));
        let client_id = client_request_id(head);
        let request_id = crate::request_id::new_id();
        // The client reads back the id it sent; the row is under the relay's own.
        let answer_id = client_id.clone().unwrap_or_else(|| request_id.clone());
        let answer = LocalAnswer::from(error);
        let client_addr = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        // The row first, while the request counts as open: a shutdown that drops this
        // task during the answer loses nothing.
        {
            let _open = self.recorder.rows.open_request();
            self.recorder.refused_head(
                &answer.error,
                RefusedHead {
                    request_id,
                    client_request_id: client_id,
                    start: accepted.at,
                    started_at: accepted.wall,
                    route,
                    client_addr,
                },
            );
        }
        let out = answer.http1(shape, &answer_id);
        // Bounded: a client that neither reads its answer nor stops sending does not hold
        // the task. Closing with its bytes unread would reset the connection, and the
        // client could miss the answer: the write side is shut first and what it still
        // sends is read off for a moment.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(&out).await?;
            stream.flush().await?;
            stream.shutdown().await?;
            let mut sink = vec![0u8; 4096];
            let mut drained = 0;
            while drained < 64 * 1024 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => drained += n,
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
}

/// When a request's head began (as far as the gate can tell).
struct Accepted {
    at: Instant,
    wall: SystemTime,
}

impl Accepted {
    fn now() -> Accepted {
        Accepted {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> HeadGate<A> {
    /// Reads one head of `l4` through the gate: `true` when it is whole and rewound for
    /// Pingora, `false` when the connection was answered or is to be closed. `later`: a
    /// head after an earlier request on the same connection.
    async fn gate_head(&self, l4: &mut L4Stream, later: bool, shutdown: &ShutdownWatch) -> bool {
        let accepted = Accepted::now();
        let deadline = if later {
            HeadDeadline {
                idle: tokio::time::Instant::from_std(accepted.at) + KEEPALIVE_IDLE,
                after_first_byte: Some(self.timeout),
            }
        } else {
            HeadDeadline {
                idle: tokio::time::Instant::from_std(accepted.at) + self.timeout,
                after_first_byte: None,
            }
        };
        let mut buf = Vec::with_capacity(2048);
        // An idle kept-alive connection is dropped at shutdown (as Pingora does); one
        // whose next head has begun is read to its end. A first head is always read: its
        // connection was accepted for a request.
        let idle_until_shutdown = later.then_some(shutdown);
        let mut first_byte = None;
        let head = read_head(
            l4,
            &mut buf,
            self.max_bytes,
            deadline,
            idle_until_shutdown,
            &mut first_byte,
        )
        .await;
        let accepted = match (later, first_byte) {
            (true, Some(at)) => Accepted {
                at,
                wall: SystemTime::now() - at.elapsed(),
            },
            _ => accepted,
        };
        let refusal = match head {
            Head::Whole if unparseable(&buf) => RelayError::BadRequest,
            Head::Whole => {
                l4.rewind(&buf);
                return true;
            }
            Head::Gone => return false,
            Head::TooLarge => RelayError::HeadersTooLarge,
            Head::Late if buf.is_empty() => {
                // Nothing at all is an idle connection, not a request: closed quietly.
                if !later {
                    self.recorder.metrics.connection_idle_closed();
                }
                return false;
            }
            Head::Late => RelayError::HeadTimeout,
        };
        // Boxed: a refusal is rare, and its state inline would make every connection's
        // task (it lives as long as the connection) kilobytes larger.
        Box::pin(self.refuse(l4, &buf, refusal, accepted)).await;
        false
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for HeadGate<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !stream.as_any().is::<L4Stream>() {
            return self.inner.process_new(stream, shutdown).await;
        }
        let mut l4: Box<L4Stream> = stream
            .into_any()
            .downcast()
            .expect("checked to be an L4 stream");
        // Counted until this returns; over a cap, closed before a byte is read.
        let client = l4
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        let _held = match (&self.cap, client) {
            (Some(cap), Some(addr)) => Some(cap.admit(addr)?),
            _ => None,
        };
        // The HTTP/1 keep-alive loop Pingora runs for an `HttpServerApp`, with every head
        // read through the gate first.
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut later = false;
        loop {
            if !self.gate_head(&mut l4, later, shutdown).await {
                return None;
            }
            let mut session = ServerSession::new_http1(l4);
            match settings.take() {
                Some(s) => s.apply_to_session(&mut session),
                None => {
                    session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
                    session.set_keepalive_reuses_remaining(
                        self.inner
                            .server_options()
                            .and_then(|o| o.keepalive_request_limit),
                    );
                }
            }
            let (stream, next) = self
                .inner
                .process_new_http(session, shutdown)
                .await?
                .consume();
            settings = next;
            l4 = stream.into_any().downcast().ok()?;
            later = true;
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `parts` as successive reads; the read at which the head was whole.
    fn whole_at(parts: &[&[u8]]) -> Option<usize> {
        let mut end = HeadEnd::default();
        let mut buf = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            buf.extend_from_slice(p);
            if end.whole(&buf) {
                return Some(i);
            }
        }
        None
    }

    #[test]
    fn heads_end_at_the_blank_line_with_either_line_end() {
        assert_eq!(whole_at(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]), Some(0));
        assert_eq!(whole_at(&[b"GET / HTTP/1.1\nHost: a\n\n"]), Some(0));
        assert_eq!(whole_at(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
        // Every split of a head into two reads, and a byte per read.
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 1..head.len() {
            assert_eq!(
                whole_at(&[&head[..cut], &head[cut..]]),
                Some(1),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert_eq!(whole_at(&bytes), Some(head.len() - 1));
    }

    #[test]
    fn blank_lines_before_the_request_line_are_not_its_end() {
        assert_eq!(whole_at(&[b"\r\n\r\n\n"]), None);
        assert_eq!(whole_at(&[b"\r\n", b"\r\n", b"\n\n"]), None);
        assert_eq!(
            whole_at(&[b"\r\n\r\n", b"GET / HTTP/1.1\r\n", b"Host: a\r\n\r\n"]),
            Some(2)
        );
        assert_eq!(whole_at(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), Some(0));
    }

    #[test]
    fn heads_pingora_would_refuse() {
        assert!(!unparseable(b"POST /v1/x HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!unparseable(b"POST /v1/x HTTP/1.1\nHost: a\n\n"));
        assert!(unparseable(b"POST /v1/x HTTP/1.1\r\nBad Header: a\r\n\r\n"));
        assert!(unparseable(b"POST /v1/x HTTP/1.1\r\nHost: a\x01b\r\n\r\n"));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert!(unparseable(
            format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()
        ));
        // Left to Pingora, which escapes what it can of a request target.
        assert!(!unparseable(b"GET /a b|c HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!unparseable(b"GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n"));
    }

    #[test]
    fn request_paths_from_partial_heads() {
        assert_eq!(
            request_path(b"POST /anthropic/v1/messages?beta=1 HTTP/1.1\r\nHo"),
            Some("/anthropic/v1/messages")
        );
        assert_eq!(request_path(b"POST /openai/v1/chat"), None);
        assert_eq!(request_path(b""), None);
    }

    #[test]
    fn the_client_request_id_when_its_line_is_whole() {
        let head = b"POST /v1/x HTTP/1.1\r\nX-Request-ID:  abc-1 \r\nHost: a\r\nX-Big: aaa";
        assert_eq!(client_request_id(head).as_deref(), Some("abc-1"));
        // Still arriving: it may be cut short.
        assert_eq!(
            client_request_id(b"POST / HTTP/1.1\r\nx-request-id: ab"),
            None
        );
        assert_eq!(client_request_id(b"POST / HTTP/1.1\r\nHost: a\r\n"), None);
    }
}
