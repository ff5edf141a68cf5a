//! Observation stage (`logging`): what a request cost, from the provider's token counts
//! and the configured price table. A model without a price has an unknown cost, never 0.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::tap::Usage;

/// USD per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Pricing {
    by_model: HashMap<String, Price>,
}

impl Pricing {
    pub fn new(raw: &BTreeMap<String, RawPrice>) -> Pricing {
        let per_token = |per_million: f64| per_million / 1_000_000.0;
        Pricing {
            by_model: raw
                .iter()
                .map(|(m, p)| {
                    let price = Price {
                        input: per_token(p.input),
                        cached_input: per_token(p.cached_input.unwrap_or(p.input)),
                        output: per_token(p.output),
                    };
                    (m.clone(), price)
                })
                .collect(),
        }
    }

    /// The configured name for `model` when it has a price (used as a bounded metric
    /// label), else `None`.
    pub fn known<'a>(&'a self, model: &str) -> Option<&'a str> {
        self.by_model.get_key_value(model).map(|(k, _)| k.as_str())
    }

    /// The model's prices, when it has them.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.by_model.get(model).copied()
    }

    /// Cost in USD; `None` when the model has no price or the provider gave no counts.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        let p = self.by_model.get(model)?;
        let (input, output) = (usage.input?, usage.output?);
        Some(p.of(input, usage.cached_input.unwrap_or(0), output))
    }
}

impl Price {
    /// USD for `input` tokens (`cached` of them read from the provider's cache) and
    /// `output` tokens.
    pub fn of(&self, input: u64, cached: u64, output: u64) -> f64 {
        let cached = cached.min(input);
        (input - cached) as f64 * self.input
            + cached as f64 * self.cached_input
            + output as f64 * self.output
    }
}

/// One model's prices (`pricing.MODEL`), in US dollars per million tokens.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    /// USD per million input (prompt) tokens.
    pub input: f64,
    /// USD per million input tokens read from the provider's cache. Default: `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// USD per million output (completion, including reasoning) tokens.
    pub output: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pricing() -> Pricing {
        let mut raw = BTreeMap::new();
        raw.insert(
            "gpt-4o-mini".to_string(),
            RawPrice {
                input: 0.15,
                cached_input: Some(0.075),
                output: 0.60,
            },
        );
        raw.insert(
            "free".to_string(),
            RawPrice {
                input: 0.0,
                cached_input: None,
                output: 0.0,
            },
        );
        Pricing::new(&raw)
    }

    #[test]
    fn cost_counts_cached_input_at_its_price() {
        let u = Usage {
            input: Some(1_000_000),
            output: Some(1_000_000),
            cached_input: Some(500_000),
            reasoning: None,
        };
        let c = pricing().cost("gpt-4o-mini", &u).unwrap();
        assert!((c - (0.075 + 0.0375 + 0.60)).abs() < 1e-12, "{c}");
    }

    #[test]
    fn unknown_model_or_counts_give_unknown_not_zero() {
        let u = Usage {
            input: Some(10),
            output: Some(10),
            ..Usage::default()
        };
        assert_eq!(pricing().cost("gpt-5", &u), None);
        assert_eq!(pricing().cost("gpt-4o-mini", &Usage::default()), None);
        assert_eq!(pricing().cost("free", &u), Some(0.0));
        assert_eq!(pricing().known("gpt-4o-mini"), Some("gpt-4o-mini"));
        assert_eq!(pricing().known("gpt-4o"), None);
    }
}
