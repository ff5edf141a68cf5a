//! Configuration stage: provider keys held in a type that never prints its value.
//!
//! Keys are referenced from the configuration (`env:NAME` or `file:/path`), never written
//! inline, and resolved once when the configuration is loaded.

use std::fmt;

/// A secret string. `Debug` and `Display` print `****`; only [`Secret::expose`] gives the
/// value, and it is called in exactly one place: where the provider key header is built.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

/// Where a secret comes from, as written in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(String),
}

/// The outcome of resolving a [`SecretRef`] at load time. A missing secret does not stop
/// the relay: the route that needs it answers 503 and says which reference is unset.
#[derive(Debug, Clone)]
pub enum SecretState {
    Present(Secret),
    Missing { reference: String },
}

/// Why a secret reference does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefError {
    #[error("`{0}` is not a valid environment variable name")]
    EnvName(String),
    #[error("`file:` needs a path")]
    FileNeedsPath,
    #[error("must reference the key as `env:NAME` or `file:/path`; inline keys are refused")]
    Inline,
}

impl SecretRef {
    /// Parses `env:NAME` or `file:/path`. Anything else is refused, so that a key pasted
    /// inline into the YAML never loads.
    pub fn parse(text: &str) -> Result<SecretRef, SecretRefError> {
        if let Some(name) = text.strip_prefix("env:") {
            let valid = !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !name.as_bytes()[0].is_ascii_digit();
            if !valid {
                return Err(SecretRefError::EnvName(text.to_string()));
            }
            Ok(SecretRef::Env(name.to_string()))
        } else if let Some(path) = text.strip_prefix("file:") {
            if path.is_empty() {
                return Err(SecretRefError::FileNeedsPath);
            }
            Ok(SecretRef::File(path.to_string()))
        } else {
            Err(SecretRefError::Inline)
        }
    }

    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(name) => format!("environment variable {name}"),
            SecretRef::File(path) => format!("file {path}"),
        }
    }

    /// Reads the secret through `lookup_env` (injected so tests do not touch the process
    /// environment). An empty value counts as missing.
    pub fn resolve(&self, lookup_env: &dyn Fn(&str) -> Option<String>) -> SecretState {
        let value = match self {
            SecretRef::Env(name) => lookup_env(name),
            SecretRef::File(path) => std::fs::read_to_string(path).ok(),
        };
        match value.map(|v| v.trim().to_string()) {
            Some(v) if !v.is_empty() => SecretState::Present(Secret(v)),
            _ => SecretState::Missing {
                reference: self.describe(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s} {s:?}"), "**** ****");
        assert_eq!(s.expose(), "sk-live-123");
    }

    #[test]
    fn references_parse_and_inline_keys_are_refused() {
        assert_eq!(
            SecretRef::parse("env:OPENAI_API_KEY").unwrap(),
            SecretRef::Env("OPENAI_API_KEY".into())
        );
        assert_eq!(
            SecretRef::parse("file:/run/keys/a").unwrap(),
            SecretRef::File("/run/keys/a".into())
        );
        assert!(SecretRef::parse("sk-abc")
            .unwrap_err()
            .to_string()
            .contains("inline"));
        assert!(SecretRef::parse("env:").is_err());
        assert!(SecretRef::parse("env:1X").is_err());
        assert!(SecretRef::parse("env:A-B").is_err());
    }

    #[test]
    fn resolve_uses_injected_environment() {
        let r = SecretRef::Env("K".into());
        match r.resolve(&|n| (n == "K").then(|| " v \n".to_string())) {
            SecretState::Present(s) => assert_eq!(s.expose(), "v"),
            other => panic!("{other:?}"),
        }
        match r.resolve(&|_| Some(String::new())) {
            SecretState::Missing { reference } => assert_eq!(reference, "environment variable K"),
            other => panic!("{other:?}"),
        }
    }
}
