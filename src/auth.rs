//! Authentication stage (`request_filter`): who the tenant is, from the relay key in
//! `Authorization: Bearer` (OpenAI SDKs) or `x-api-key` (Anthropic SDK), or on a
//! browser's WebSocket handshake from `Sec-WebSocket-Protocol`. Pure.
//!
//! Keys are stored only as SHA-256 digests. A presented key is hashed, looked up by its
//! digest, and the stored digest is compared with [`subtle::ConstantTimeEq`]: the lookup
//! can only reveal timing about a digest, which an attacker cannot steer towards a key.

use std::collections::HashMap;
use std::sync::Arc;

use pingora_http::RequestHeader;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug)]
pub struct Tenant {
    pub id: Arc<str>,
    routes: Option<std::collections::HashSet<String>>,
    pub limits: crate::limits::Limits,
    /// Every budget the tenant's requests count against (its own and its groups').
    pub budgets: Arc<[Arc<crate::budget::BudgetSpec>]>,
    pub groups: Arc<[String]>,
}

impl Tenant {
    pub fn may_use(&self, route: &str) -> bool {
        self.routes.as_ref().is_none_or(|r| r.contains(route))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Neither header carried a key.
    Missing,
    /// A key was given but matches no tenant.
    Invalid,
}

#[derive(Debug, Default)]
pub struct TenantTable {
    by_digest: HashMap<[u8; 32], usize>,
    tenants: Vec<Tenant>,
}

impl TenantTable {
    pub fn new(configs: &[TenantConfig]) -> TenantTable {
        let mut table = TenantTable::default();
        for t in configs {
            let index = table.tenants.len();
            table.tenants.push(Tenant {
                id: Arc::from(t.id.as_str()),
                routes: t.routes.clone(),
                limits: t.limits,
                budgets: t.budgets.clone().into(),
                groups: t.groups.clone().into(),
            });
            for digest in &t.key_hashes {
                table.by_digest.insert(*digest, index);
            }
        }
        table
    }

    /// Every budget of every tenant, once each (a group's is shared by its members).
    pub fn budgets(&self) -> Vec<Arc<crate::budget::BudgetSpec>> {
        let mut seen = std::collections::HashSet::new();
        self.tenants
            .iter()
            .flat_map(|t| t.budgets.iter())
            .filter(|b| seen.insert(b.id.clone()))
            .cloned()
            .collect()
    }

    pub fn authenticate(&self, req: &RequestHeader) -> Result<&Tenant, AuthFailure> {
        let key = presented_key(req).ok_or(AuthFailure::Missing)?;
        self.by_key(key).ok_or(AuthFailure::Invalid)
    }

    pub fn by_key(&self, key: &[u8]) -> Option<&Tenant> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let (stored, index) = self.by_digest.get_key_value(&digest)?;
        if bool::from(stored.ct_eq(&digest)) {
            Some(&self.tenants[*index])
        } else {
            None
        }
    }
}

/// The relay key the client sent: `Authorization: Bearer KEY` first, else `x-api-key`,
/// else (a browser's WebSocket) the key form of `Sec-WebSocket-Protocol`.
pub fn presented_key(req: &RequestHeader) -> Option<&[u8]> {
    if let Some(v) = req.headers.get(http::header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            let key = trim_ascii(&v[7..]);
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    req.headers
        .get("x-api-key")
        .map(|v| trim_ascii(v.as_bytes()))
        .filter(|k| !k.is_empty())
        .or_else(|| crate::websocket::protocol_key(req))
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Hex SHA-256 of a relay key, as written in `tenants[].key_sha256`.
pub fn hash_key_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A validated tenant (`tenants[]`).
#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub id: String,
    pub key_hashes: Vec<[u8; 32]>,
    /// None means every route.
    pub routes: Option<std::collections::HashSet<String>>,
    pub limits: crate::limits::Limits,
    pub budgets: Vec<Arc<crate::budget::BudgetSpec>>,
    /// The groups (`groups:`) it is a member of.
    pub groups: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn table() -> TenantTable {
        let digest = |k: &str| -> [u8; 32] { Sha256::digest(k.as_bytes()).into() };
        TenantTable::new(&[
            TenantConfig {
                id: "acme".into(),
                key_hashes: vec![digest("sk-acme-1"), digest("sk-acme-2")],
                routes: None,
                limits: Default::default(),
                budgets: Vec::new(),
                groups: Vec::new(),
            },
            TenantConfig {
                id: "small".into(),
                key_hashes: vec![digest("sk-small")],
                routes: Some(HashSet::from(["anthropic".to_string()])),
                limits: Default::default(),
                budgets: Vec::new(),
                groups: Vec::new(),
            },
        ])
    }

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn bearer_and_x_api_key_both_authenticate() {
        let t = table();
        let a = t.authenticate(&req(&[("authorization", "Bearer sk-acme-2")]));
        assert_eq!(&*a.unwrap().id, "acme");
        let b = t.authenticate(&req(&[("x-api-key", "sk-small")]));
        assert_eq!(&*b.unwrap().id, "small");
        let c = t.authenticate(&req(&[("authorization", "bearer  sk-acme-1 ")]));
        assert_eq!(&*c.unwrap().id, "acme");
    }

    #[test]
    fn missing_and_wrong_keys_fail_differently() {
        let t = table();
        assert_eq!(t.authenticate(&req(&[])).unwrap_err(), AuthFailure::Missing);
        assert_eq!(
            t.authenticate(&req(&[("authorization", "Basic abc")]))
                .unwrap_err(),
            AuthFailure::Missing
        );
        assert_eq!(
            t.authenticate(&req(&[("authorization", "Bearer sk-acme-3")]))
                .unwrap_err(),
            AuthFailure::Invalid
        );
        assert_eq!(
            t.authenticate(&req(&[("x-api-key", "sk-acme")]))
                .unwrap_err(),
            AuthFailure::Invalid
        );
    }

    #[test]
    fn route_permissions() {
        let t = table();
        let small = t.by_key(b"sk-small").unwrap();
        assert!(small.may_use("anthropic"));
        assert!(!small.may_use("openai"));
        assert!(t.by_key(b"sk-acme-1").unwrap().may_use("anything"));
    }

    #[test]
    fn hash_matches_known_vector() {
        assert_eq!(
            hash_key_hex("foo"),
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        );
    }
}
