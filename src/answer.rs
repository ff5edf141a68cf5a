//! Answer stage (any phase): the one writer of the answers the relay gives itself: a
//! refusal, a limit, an upstream that failed or stalled. Each is the status of its
//! [`RelayError`], a JSON body in the provider's error shape, the request id the client
//! reads back, and the headers the refusal carries (`Allow`, the limit headers,
//! `Retry-After`). The proxy writes it through Pingora's session; the head gate writes
//! the same answer as HTTP/1 bytes on a connection Pingora never saw.

use bytes::Bytes;
use pingora_core::protocols::http::ServerSession;
use pingora_core::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::error::{ErrorShape, RelayError};
use crate::request_id;

/// An answer of the relay's own, before it is given a shape and an id.
pub struct LocalAnswer {
    pub error: RelayError,
    /// The refusal's own headers, after the ones every answer has.
    headers: Vec<(&'static str, String)>,
}

impl From<RelayError> for LocalAnswer {
    fn from(error: RelayError) -> LocalAnswer {
        LocalAnswer::with_headers(error, Vec::new())
    }
}

impl LocalAnswer {
    /// `headers` are added to the answer; a method refused on a served path names the
    /// methods it serves (`Allow`) by itself.
    pub fn with_headers(error: RelayError, mut headers: Vec<(&'static str, String)>) -> Self {
        if let RelayError::EndpointMethod { allow } = &error {
            headers.insert(0, ("allow", allow.clone()));
        }
        LocalAnswer { error, headers }
    }

    pub fn status(&self) -> u16 {
        self.error.status()
    }

    /// Every header of the answer in order, for a body of `body_len` bytes.
    fn header_lines<'a>(
        &'a self,
        body_len: usize,
        answer_id: &'a str,
    ) -> impl Iterator<Item = (&'static str, std::borrow::Cow<'a, str>)> {
        let fixed = [
            ("content-type", "application/json".into()),
            ("content-length", body_len.to_string().into()),
            (request_id::HEADER, answer_id.into()),
        ];
        let own = self.headers.iter().map(|(n, v)| (*n, v.as_str().into()));
        fixed.into_iter().chain(own)
    }

    /// The response head and body in `shape`, naming `answer_id` (the id the client reads
    /// back).
    pub fn render(&self, shape: ErrorShape, answer_id: &str) -> Result<(ResponseHeader, Bytes)> {
        let body = self.error.body(shape);
        let mut head = ResponseHeader::build(self.status(), Some(3 + self.headers.len()))?;
        for (name, value) in self.header_lines(body.len(), answer_id) {
            head.insert_header(name, value.as_ref())?;
        }
        Ok((head, body))
    }

    /// The whole answer as HTTP/1.1 bytes that close the connection (the head gate's).
    pub fn http1(&self, shape: ErrorShape, answer_id: &str) -> Vec<u8> {
        let body = self.error.body(shape);
        let status = self.status();
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let mut out = format!("HTTP/1.1 {status} {reason}\r\nconnection: close\r\n").into_bytes();
        for (name, value) in self.header_lines(body.len(), answer_id) {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }

    /// Writes the answer as the whole response, before anything else was written; the
    /// client's connection may be kept alive.
    pub async fn write(&self, session: &mut Session, shape: ErrorShape, id: &str) -> Result<()> {
        let (head, body) = self.render(shape, id)?;
        session.write_response_header(Box::new(head), false).await?;
        session.write_response_body(Some(body), true).await
    }

    /// Writes the answer as an error response, which closes the connection. Nothing is
    /// written when a response head went out already (a stream cut mid-way): the client
    /// sees the connection close.
    pub async fn write_error(
        &self,
        downstream: &mut ServerSession,
        shape: ErrorShape,
        id: &str,
    ) -> Result<()> {
        let (head, body) = self.render(shape, id)?;
        downstream.write_error_response(head, body).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_has_its_type_length_and_id() {
        let answer = LocalAnswer::with_headers(
            RelayError::RateLimited {
                limit: "requests",
                tokens: false,
            },
            vec![("retry-after", "3".into())],
        );
        let (head, body) = answer.render(ErrorShape::OpenAi, "id-1").unwrap();
        assert_eq!(head.status.as_u16(), 429);
        assert_eq!(head.headers["content-type"], "application/json");
        assert_eq!(
            head.headers["content-length"],
            body.len().to_string().as_str()
        );
        assert_eq!(head.headers["x-request-id"], "id-1");
        assert_eq!(head.headers["retry-after"], "3");
    }

    #[test]
    fn a_refused_method_names_the_served_ones() {
        let answer = LocalAnswer::from(RelayError::EndpointMethod {
            allow: "POST".into(),
        });
        let (head, _) = answer.render(ErrorShape::OpenAi, "id").unwrap();
        assert_eq!(head.status.as_u16(), 405);
        assert_eq!(head.headers["allow"], "POST");
    }

    #[test]
    fn the_head_gate_bytes_are_the_same_answer() {
        let answer = LocalAnswer::from(RelayError::NoRoute);
        let bytes = answer.http1(ErrorShape::Anthropic, "cid");
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(head.contains("\r\nconnection: close"));
        assert!(head.contains("\r\nx-request-id: cid"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let (_, rendered) = answer.render(ErrorShape::Anthropic, "cid").unwrap();
        assert_eq!(body.as_bytes(), &rendered[..]);
    }
}
