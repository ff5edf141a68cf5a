//! Configuration stage, parsing helpers: the small text formats values are written in
//! (durations, addresses, path prefixes, key hashes, capture sizes), each turned into its
//! value or a typed [`Problem`] without knowing which key it came from.

use std::time::Duration;

use super::error::{DurationError, Problem};
use super::raw::CaptureSize;

/// Parses `250ms`, `5s`, `10m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| DurationError::NoUnit(text.to_string()))?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| DurationError::Number(text.to_string()))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(DurationError::Unit(text.to_string())),
    };
    Ok(d)
}

/// An `IP:port` address (no host names: listeners bind before anything resolves).
pub(super) fn check_socket_addr(addr: &str) -> Result<(), Problem> {
    addr.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| Problem::NotSocketAddr(addr.to_string()))
}

/// `/openai/v1/` -> `/openai/v1`; `/` stays `/`.
pub(super) fn normalize_prefix(p: &str) -> Option<String> {
    if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
        return None;
    }
    let trimmed = p.trim_end_matches('/');
    Some(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

/// 64 hex characters into the 32 bytes of a SHA-256 digest.
pub(super) fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    if t.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in t.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Bytes of a body to keep: `off` (or unset) 0, `whole` `usize::MAX`, or a number.
pub(super) fn capture_size(c: &Option<CaptureSize>) -> Result<usize, Problem> {
    match c {
        None => Ok(0),
        Some(CaptureSize::Bytes(n)) => Ok(*n),
        Some(CaptureSize::Word(w)) if w == "off" => Ok(0),
        Some(CaptureSize::Word(w)) if w == "whole" => Ok(usize::MAX),
        Some(CaptureSize::Word(w)) => Err(Problem::Capture(w.clone())),
    }
}
