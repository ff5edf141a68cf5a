//! Request stage (`request_filter`): the `x-request-id` every request carries upstream and
//! back to the client. A client's own id is kept when it is sane; otherwise one is made.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const HEADER: &str = "x-request-id";
const MAX_LEN: usize = 200;

/// The client's id when it is 1 to 200 visible ASCII characters.
pub fn accept_client_id(value: &[u8]) -> Option<String> {
    if value.is_empty() || value.len() > MAX_LEN {
        return None;
    }
    if !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return None;
    }
    // Checked above: visible ASCII is valid UTF-8.
    String::from_utf8(value.to_vec()).ok()
}

/// A new id: a per-process random prefix and a counter, 32 hex characters, unique across
/// a fleet without coordination.
pub fn new_id() -> String {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        // RandomState is seeded from the OS's random source.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id() as u64);
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix:016x}{n:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_when_sane() {
        assert_eq!(accept_client_id(b"req-123").as_deref(), Some("req-123"));
        assert!(accept_client_id(b"").is_none());
        assert!(accept_client_id(b"has space").is_none());
        assert!(accept_client_id("é".as_bytes()).is_none());
        assert!(accept_client_id(&[b'a'; 201]).is_none());
    }

    #[test]
    fn new_ids_are_unique_and_fixed_length() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert_eq!(a[..16], b[..16]);
    }
}
