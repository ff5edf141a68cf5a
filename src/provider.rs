//! Vocabulary shared by every stage: which provider API a route speaks. It decides the
//! error shape, the default key header, the tap and the endpoints a route serves.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Audio,
    OpenaiCompatible,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Audio => "audio",
            ProviderKind::OpenaiCompatible => "openai_compatible",
        }
    }
}
