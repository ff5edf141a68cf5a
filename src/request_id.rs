//! Request stage (`request_filter`): request ids. Every request gets the relay's own id
//! (its row, its Redis slot, the upstream's `x-request-id`); a client's own id, when
//! sane, is echoed back to it and kept in the row's `client_request_id`.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
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

/// A new id: 32 hex characters, unique across a fleet without coordination and not
/// predictable from other ids: a per-process counter run through two SipHash functions
/// keyed from the OS's random source (std's `RandomState`), so knowing any number of ids
/// tells nothing of the next.
pub fn new_id() -> String {
    let (hi, lo) = random_pair();
    format!("{hi:016x}{lo:016x}")
}

/// 128 unpredictable bits, the same way (also for trace and span ids).
pub fn random_pair() -> (u64, u64) {
    static KEYS: OnceLock<(RandomState, RandomState)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (a, b) = KEYS.get_or_init(|| (RandomState::new(), RandomState::new()));
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (a.hash_one(n), b.hash_one(n))
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
        // No shared prefix or counter: consecutive ids differ in both halves.
        assert_ne!(a[..16], b[..16]);
        assert_ne!(a[16..], b[16..]);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
