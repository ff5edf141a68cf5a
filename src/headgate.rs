//! The first request head of each client connection must arrive whole within
//! `listen.head_timeout`, and within `listen.max_header_bytes`.
//!
//! Pingora times out each read of a head (60 s), not the head: a client sending a byte
//! every few seconds holds a connection (and a task) for hours. This gate wraps the
//! proxy's `ServerApp`: it reads the head itself, with one deadline from accept, then
//! hands the bytes back to the stream (`rewind`) and the connection to Pingora, which
//! parses them from memory. A head that is late gets 408, one that is too large 431,
//! both in the provider's error shape (the route is found from the request line when it
//! came) and both with a row.
//!
//! It also closes a gap in graceful shutdown and upgrade: Pingora drops a connection
//! whose request it is still waiting for when shutdown starts, which includes one
//! accepted a moment before whose request is on its way. Behind the gate, Pingora only
//! gets connections whose head is already in memory, and reads it at once.
//!
//! Later requests on a kept-alive connection are read by Pingora, with its per-read
//! keep-alive timeout.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use log::debug;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, Stream};
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{ErrorShape, RelayError};
use crate::proxy::{Recorder, RefusedHead};
use crate::route::RouteTable;

/// Wraps the proxy application (see the module documentation).
pub struct HeadGate<A> {
    inner: Arc<A>,
    timeout: Duration,
    max_bytes: usize,
    routes: Arc<RouteTable>,
    recorder: Arc<Recorder>,
}

impl<A> HeadGate<A> {
    pub fn new(
        inner: A,
        timeout: Duration,
        max_bytes: usize,
        routes: Arc<RouteTable>,
        recorder: Arc<Recorder>,
    ) -> HeadGate<A> {
        HeadGate {
            inner: Arc::new(inner),
            timeout,
            max_bytes,
            routes,
            recorder,
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

/// Where a head ends: the blank line after the headers, with CRLF or bare LF line ends
/// (both of which Pingora's parser accepts). `from` is where new bytes start.
fn head_complete(buf: &[u8], from: usize) -> bool {
    let from = from.saturating_sub(2);
    let new = &buf[from..];
    memchr::memmem::find(new, b"\n\r\n").is_some() || memchr::memmem::find(new, b"\n\n").is_some()
}

/// Reads into `buf` until the head is whole, the client goes, `max_bytes` pass or
/// `deadline` does.
async fn read_head(
    stream: &mut L4Stream,
    buf: &mut Vec<u8>,
    max_bytes: usize,
    deadline: tokio::time::Instant,
) -> Head {
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        let before = buf.len();
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Err(_) => return Head::Late,
            Ok(Err(e)) => {
                debug!("client connection failed before its request head: {e}");
                return Head::Gone;
            }
            Ok(Ok(0)) => return Head::Gone,
            Ok(Ok(_)) => {
                if head_complete(buf, before) {
                    return Head::Whole;
                }
                if buf.len() > max_bytes {
                    return Head::TooLarge;
                }
            }
        }
    }
}

/// The path of a request line, if it has arrived: `METHOD SP PATH SP ...`.
fn request_path(head: &[u8]) -> Option<&str> {
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
fn client_request_id(head: &[u8]) -> Option<String> {
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
    /// Answers a refused head on the raw connection and records it.
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
        let request_id = client_request_id(head).unwrap_or_else(crate::request_id::new_id);
        let body = error.body(shape);
        let status = error.status();
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{}: {request_id}\r\n\r\n",
            body.len(),
            crate::request_id::HEADER
        )
        .into_bytes();
        out.extend_from_slice(&body);
        // A client that does not read its answer does not hold the task.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(&out).await?;
            stream.flush().await
        })
        .await;
        let client_addr = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        self.recorder.refused_head(
            error,
            RefusedHead {
                request_id,
                start: accepted.at,
                started_at: accepted.wall,
                route,
                client_addr,
            },
        );
    }
}

/// When a connection was accepted (as far as the gate can tell: when it got it).
struct Accepted {
    at: Instant,
    wall: SystemTime,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeadGate<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if !stream.as_any().is::<L4Stream>() {
            return self.inner.process_new(stream, shutdown).await;
        }
        let accepted = Accepted {
            at: Instant::now(),
            wall: SystemTime::now(),
        };
        let mut l4: Box<L4Stream> = stream
            .into_any()
            .downcast()
            .expect("checked to be an L4 stream");
        let deadline = tokio::time::Instant::from_std(accepted.at) + self.timeout;
        let mut buf = Vec::with_capacity(2048);
        match read_head(&mut l4, &mut buf, self.max_bytes, deadline).await {
            Head::Whole => {
                l4.rewind(&buf);
                drop(buf);
                self.inner.process_new(l4, shutdown).await
            }
            Head::Gone => None,
            Head::TooLarge => {
                self.refuse(&mut l4, &buf, RelayError::HeadersTooLarge, accepted)
                    .await;
                None
            }
            Head::Late => {
                // Nothing at all is an idle connection, not a request: closed quietly.
                if !buf.is_empty() {
                    self.refuse(&mut l4, &buf, RelayError::HeadTimeout, accepted)
                        .await;
                }
                None
            }
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_end_at_the_blank_line_with_either_line_end() {
        assert!(head_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0));
        assert!(head_complete(b"GET / HTTP/1.1\nHost: a\n\n", 0));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
        // The blank line split across two reads.
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 1..head.len() {
            let complete = head_complete(head, cut);
            assert!(complete, "cut at {cut}");
        }
        assert!(!head_complete(b"POST / HTTP/1.1\r\nA: b\r\n", 20));
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
