//! The cache key: what makes two requests ask the same thing. Pure.
//!
//! The route, the upstream path and query, the answer's format (JSON, a stream, or a
//! stream with its usage chunk: `stream_options.include_usage` adds one), the
//! provider headers that change an answer (`anthropic-version`, `anthropic-beta`,
//! `openai-beta`), the scope (the tenant, or the group sharing the entries), and the body
//! in a canonical form: JSON with sorted keys and no insignificant whitespace, without
//! the top-level fields that do not change the answer's content.

use sha2::{Digest, Sha256};

/// Top-level body fields left out of the key: how the answer is delivered (`stream`,
/// `stream_options`: the format is a key part of its own) and who asked (`user`,
/// `metadata`: labels for the provider's abuse checks and the caller's bookkeeping).
pub const IGNORED_FIELDS: &[&str] = &["stream", "stream_options", "user", "metadata"];

/// Request headers whose value changes the answer.
pub const KEYED_HEADERS: &[&str] = &["anthropic-version", "anthropic-beta", "openai-beta"];

/// What a request asks, for the key.
pub struct KeyParts<'a> {
    pub scope: &'a str,
    pub route: &'a str,
    pub path_and_query: &'a str,
    /// `json`, `sse`, or `sse+usage`.
    pub format: &'a str,
    /// `KEYED_HEADERS` values, in that order (`None`: absent).
    pub headers: [Option<&'a [u8]>; 3],
}

/// A body the cache can key: its canonical bytes and whether it asks for a
/// deterministic answer (`temperature` 0 or a `seed`).
pub struct Canonical {
    pub bytes: Vec<u8>,
    pub deterministic: bool,
}

/// The canonical form of a JSON object body; `None` for anything else.
pub fn canonical(body: &[u8]) -> Option<Canonical> {
    let serde_json::Value::Object(mut map) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    for field in IGNORED_FIELDS {
        map.remove(*field);
    }
    let zero = map
        .get("temperature")
        .and_then(serde_json::Value::as_f64)
        .is_some_and(|t| t == 0.0);
    let seeded = map.get("seed").is_some_and(|s| !s.is_null());
    // serde_json's map is ordered by key: the serialization is canonical.
    let bytes = serde_json::to_vec(&serde_json::Value::Object(map)).ok()?;
    Some(Canonical {
        bytes,
        deterministic: zero || seeded,
    })
}

/// The entry's key: a SHA-256 over every part, each length-prefixed, as hex.
pub fn key(parts: &KeyParts<'_>, body: &Canonical) -> String {
    let mut h = Sha256::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    part(b"stream-relay cache v1");
    part(parts.scope.as_bytes());
    part(parts.route.as_bytes());
    part(parts.path_and_query.as_bytes());
    part(parts.format.as_bytes());
    for value in parts.headers {
        match value {
            Some(v) => part(v),
            None => part(b"\xff"),
        }
    }
    part(&body.bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(scope: &str) -> KeyParts<'_> {
        KeyParts {
            scope,
            route: "openai",
            path_and_query: "/chat/completions",
            format: "json",
            headers: [None, None, None],
        }
    }

    fn key_of(body: &str) -> String {
        key(&parts("tenant:a"), &canonical(body.as_bytes()).unwrap())
    }

    #[test]
    fn order_whitespace_and_delivery_fields_do_not_change_the_key() {
        let a =
            key_of(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#);
        let b = key_of(
            r#"{ "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
                 "user": "u-1", "metadata": {"run": 7},
                 "messages": [ {"content": "hi", "role": "user"} ], "model": "m" }"#,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn what_changes_the_answer_changes_the_key() {
        let base = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
        let k = key_of(base);
        for other in [
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.7}"#,
            r#"{"model":"m2","messages":[{"role":"user","content":"hi"}],"temperature":0}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"seed":1}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"max_tokens":5}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"tools":[{"type":"function","function":{"name":"f"}}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi!"}],"temperature":0}"#,
        ] {
            assert_ne!(key_of(other), k, "{other}");
        }
        let c = canonical(base.as_bytes()).unwrap();
        assert_ne!(key(&parts("tenant:b"), &c), k, "two tenants share an entry");
        let mut stream = parts("tenant:a");
        stream.format = "sse";
        let sse = key(&stream, &c);
        assert_ne!(sse, k, "a stream and a JSON answer share an entry");
        stream.format = "sse+usage";
        assert_ne!(
            key(&stream, &c),
            sse,
            "a stream with a usage chunk and one without share an entry"
        );
        let mut versioned = parts("tenant:a");
        versioned.headers[0] = Some(b"2023-06-01");
        assert_ne!(key(&versioned, &c), k);
    }

    #[test]
    fn determinism_is_a_zero_temperature_or_a_seed() {
        let d = |b: &str| canonical(b.as_bytes()).unwrap().deterministic;
        assert!(d(r#"{"temperature":0}"#));
        assert!(d(r#"{"temperature":0.0,"model":"m"}"#));
        assert!(d(r#"{"seed":42}"#));
        assert!(!d(r#"{"temperature":0.2}"#));
        assert!(!d(r#"{"model":"m"}"#));
        assert!(!d(r#"{"seed":null}"#));
        assert!(canonical(b"[1,2]").is_none());
        assert!(canonical(b"not json").is_none());
    }
}
