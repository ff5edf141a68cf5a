//! Request stage (`request_filter`, `request_body_filter`): hostile or broken input is
//! answered here, in the provider's error shape, before it costs anything upstream:
//! unknown methods (405), oversized request heads (431), bodies over the route's cap
//! (413), bodies that must be JSON and are not (400; invalid UTF-8 is not JSON), and
//! bodies that arrive too slowly (408).

use std::time::Duration;

use pingora_http::RequestHeader;

use crate::error::RelayError;

/// Limits on what a client may send, from `listen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Request line and headers together.
    pub max_header_bytes: usize,
    /// Longest time from accept to a connection's whole first request head.
    pub head_timeout: Duration,
    /// Longest wait for one read from a client (Pingora's per-read timeout).
    pub client_read_timeout: Duration,
    /// Longest time to receive a whole body the relay reads before choosing an upstream.
    pub body_read_timeout: Duration,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_header_bytes: 32 * 1024,
            head_timeout: Duration::from_secs(10),
            client_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Methods the provider APIs use.
pub fn known_method(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::POST
            | http::Method::PUT
            | http::Method::PATCH
            | http::Method::DELETE
            | http::Method::HEAD
            | http::Method::OPTIONS
    )
}

/// The request line and headers as the client sent them, roughly (`: ` and line ends
/// included).
pub fn head_bytes(req: &RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.raw_path().len() + 11;
    line + req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
}

/// Checks of the request head, before anything else.
pub fn check_head(req: &RequestHeader, limits: &InputLimits) -> Result<(), RelayError> {
    if !known_method(&req.method) {
        return Err(RelayError::MethodNotAllowed);
    }
    if head_bytes(req) > limits.max_header_bytes {
        return Err(RelayError::HeadersTooLarge);
    }
    check_content_length(req)
}

/// At most one `content-length`, of digits only: a list (`2, 2`) or a second header is
/// read differently by different servers, so it is refused rather than forwarded.
pub fn check_content_length(req: &RequestHeader) -> Result<(), RelayError> {
    let mut values = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    let digits = first.as_bytes().trim_ascii();
    if values.next().is_some()
        || digits.is_empty()
        || digits.len() > 19
        || !digits.iter().all(u8::is_ascii_digit)
    {
        return Err(RelayError::BadContentLength);
    }
    Ok(())
}

/// The announced body length against the route's cap.
pub fn check_length(announced: Option<usize>, max_body: usize) -> Result<(), RelayError> {
    match announced {
        Some(n) if n > max_body => Err(RelayError::BodyTooLarge { max: max_body }),
        _ => Ok(()),
    }
}

/// Whether the body must be JSON: a body-carrying method whose content type is JSON or
/// not given (multipart uploads and other types pass as they are).
pub fn wants_json(req: &RequestHeader) -> bool {
    if !matches!(
        req.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    ) {
        return false;
    }
    match req.headers.get(http::header::CONTENT_TYPE) {
        None => true,
        Some(v) => {
            let v = v.as_bytes();
            let essence = v.split(|b| *b == b';').next().unwrap_or_default();
            let essence = essence.trim_ascii();
            essence.eq_ignore_ascii_case(b"application/json")
                || (essence.len() > 5
                    && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json"))
        }
    }
}

/// An empty body, or one JSON document in UTF-8 (serde_json does not check the bytes of
/// strings it skips, so UTF-8 is checked first).
pub fn is_json(body: &[u8]) -> bool {
    body.is_empty()
        || std::str::from_utf8(body)
            .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, content_type: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build(method, b"/v1/chat/completions", None).unwrap();
        if let Some(ct) = content_type {
            r.insert_header("content-type", ct).unwrap();
        }
        r
    }

    #[test]
    fn methods_and_head_size() {
        let limits = InputLimits::default();
        assert_eq!(check_head(&req("POST", None), &limits), Ok(()));
        assert_eq!(
            check_head(&req("BREW", None), &limits),
            Err(RelayError::MethodNotAllowed)
        );
        let mut big = req("POST", None);
        big.insert_header("x-big", "a".repeat(40 * 1024)).unwrap();
        assert_eq!(check_head(&big, &limits), Err(RelayError::HeadersTooLarge));
    }

    #[test]
    fn which_bodies_must_be_json() {
        assert!(wants_json(&req("POST", None)));
        assert!(wants_json(&req(
            "POST",
            Some("application/json; charset=utf-8")
        )));
        assert!(wants_json(&req(
            "POST",
            Some("application/merge-patch+json")
        )));
        assert!(!wants_json(&req(
            "POST",
            Some("multipart/form-data; boundary=x")
        )));
        assert!(!wants_json(&req("GET", None)));
        assert!(is_json(b"") && is_json(b" {\"a\": [1, 2]} "));
        assert!(!is_json(b"not json") && !is_json(b"{\"a\": 1") && !is_json(b"\"\xff\""));
        assert!(!is_json(b"{} {}"));
    }

    #[test]
    fn one_readable_content_length() {
        let mut r = req("POST", None);
        r.insert_header("content-length", "2").unwrap();
        assert_eq!(check_content_length(&r), Ok(()));
        r.append_header("content-length", "2").unwrap();
        assert_eq!(check_content_length(&r), Err(RelayError::BadContentLength));
        for bad in ["2, 2", "", "+2", "0x10", "99999999999999999999"] {
            let mut r = req("POST", None);
            r.insert_header("content-length", bad).unwrap();
            assert_eq!(
                check_content_length(&r),
                Err(RelayError::BadContentLength),
                "{bad}"
            );
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(check_length(Some(10), 10), Ok(()));
        assert_eq!(check_length(None, 10), Ok(()));
        assert_eq!(
            check_length(Some(11), 10),
            Err(RelayError::BodyTooLarge { max: 10 })
        );
    }
}
