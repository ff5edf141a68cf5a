//! What each tenant's requests to each model actually produced lately (output tokens of
//! the last [`KEPT`] finished requests), for the `observed` reservation: a high
//! percentile of it instead of `max_tokens`. Kept per relay, in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Outputs kept per tenant and model.
const KEPT: usize = 200;
/// Fewer than this: nothing is known yet, the reservation stays at `max_tokens`.
const ENOUGH: usize = 20;
/// Tenant and model pairs kept; past this the map starts over (bounded memory whatever
/// the model names clients send).
const PAIRS: usize = 10_000;

#[derive(Default)]
pub struct Observed {
    outputs: Mutex<HashMap<(String, String), VecDeque<u64>>>,
}

impl Observed {
    pub fn add(&self, tenant: &str, model: &str, output_tokens: u64) {
        let mut map = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= PAIRS && !map.contains_key(&(tenant.to_string(), model.to_string())) {
            map.clear();
        }
        let seen = map
            .entry((tenant.to_string(), model.to_string()))
            .or_default();
        if seen.len() == KEPT {
            seen.pop_front();
        }
        seen.push_back(output_tokens);
    }

    /// The `percentile` (0..=1) of the outputs seen, once enough are.
    pub fn percentile(&self, tenant: &str, model: &str, percentile: f64) -> Option<u64> {
        let map = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
        let seen = map.get(&(tenant.to_string(), model.to_string()))?;
        if seen.len() < ENOUGH {
            return None;
        }
        let mut sorted: Vec<u64> = seen.iter().copied().collect();
        sorted.sort_unstable();
        let rank = ((sorted.len() as f64) * percentile).ceil() as usize;
        sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percentile_is_given_once_enough_outputs_are_seen() {
        let o = Observed::default();
        for n in 1..=19 {
            o.add("t", "m", n * 10);
        }
        assert_eq!(o.percentile("t", "m", 0.95), None);
        o.add("t", "m", 200);
        // 20 outputs: 10, 20, ..., 190, 200; the 95th percentile is the 19th.
        assert_eq!(o.percentile("t", "m", 0.95), Some(190));
        assert_eq!(o.percentile("t", "m", 1.0), Some(200));
        assert_eq!(o.percentile("other", "m", 0.95), None);
        for _ in 0..KEPT {
            o.add("t", "m", 7);
        }
        assert_eq!(o.percentile("t", "m", 0.99), Some(7));
    }
}
