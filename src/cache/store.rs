//! Where cached answers are kept: this relay's memory (least recently used first out,
//! bounded in bytes) or Redis (one key per entry with its TTL, the value compressed).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::limits::redis::RedisConnection;
use crate::tap::Usage;

/// A complete, successful answer as the client got it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub content_type: String,
    pub stream: bool,
    /// The body: for a stream, one item per event (each replayed as its own chunk).
    pub chunks: Vec<Bytes>,
    /// The provider's usage and the model of the original answer, and what it cost.
    pub usage: Usage,
    pub model: Option<String>,
    pub cost: Option<f64>,
    pub finish_reason: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    content_type: String,
    stream: bool,
    input: Option<u64>,
    output: Option<u64>,
    cached_input: Option<u64>,
    reasoning: Option<u64>,
    model: Option<String>,
    cost: Option<f64>,
    finish_reason: Option<String>,
    chunks: Vec<usize>,
}

const MAGIC: &[u8; 4] = b"SRC1";

impl Entry {
    /// The body's bytes.
    pub fn size(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    /// `SRC1`, the metadata's length and JSON, then the chunks back to back; compressed.
    pub fn encode(&self) -> Vec<u8> {
        let meta = Meta {
            content_type: self.content_type.clone(),
            stream: self.stream,
            input: self.usage.input,
            output: self.usage.output,
            cached_input: self.usage.cached_input,
            reasoning: self.usage.reasoning,
            model: self.model.clone(),
            cost: self.cost,
            finish_reason: self.finish_reason.clone(),
            chunks: self.chunks.iter().map(Bytes::len).collect(),
        };
        let meta = serde_json::to_vec(&meta).unwrap_or_default();
        let mut raw = Vec::with_capacity(8 + meta.len() + self.size());
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        raw.extend_from_slice(&meta);
        for c in &self.chunks {
            raw.extend_from_slice(c);
        }
        lz4_flex::compress_prepend_size(&raw)
    }

    pub fn decode(stored: &[u8]) -> Option<Entry> {
        let raw = lz4_flex::decompress_size_prepended(stored).ok()?;
        let rest = raw.strip_prefix(MAGIC)?;
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let meta: Meta = serde_json::from_slice(rest.get(4..4 + len)?).ok()?;
        let mut body = Bytes::from(rest.get(4 + len..)?.to_vec());
        if meta.chunks.iter().sum::<usize>() != body.len() {
            return None;
        }
        let chunks = meta.chunks.iter().map(|&n| body.split_to(n)).collect();
        Some(Entry {
            content_type: meta.content_type,
            stream: meta.stream,
            chunks,
            usage: Usage {
                input: meta.input,
                output: meta.output,
                cached_input: meta.cached_input,
                reasoning: meta.reasoning,
            },
            model: meta.model,
            cost: meta.cost,
            finish_reason: meta.finish_reason,
        })
    }
}

/// The in-memory store: entries until their TTL, the least recently used evicted first
/// when the bytes held pass the cap.
pub struct MemoryStore {
    max_bytes: usize,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<String, (std::sync::Arc<Entry>, Instant, u64)>,
    /// Last use -> key.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: usize,
}

impl Lru {
    fn remove(&mut self, key: &str) -> bool {
        match self.entries.remove(key) {
            Some((entry, _, tick)) => {
                self.order.remove(&tick);
                self.bytes -= entry.size();
                true
            }
            None => false,
        }
    }
}

/// What a store call did besides its answer, for the metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted(pub u64);

impl MemoryStore {
    pub fn new(max_bytes: usize) -> MemoryStore {
        MemoryStore {
            max_bytes,
            inner: Mutex::new(Lru::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &str, now: Instant) -> Option<std::sync::Arc<Entry>> {
        let mut lru = self.lock();
        let (entry, expires, old) = lru.entries.get(key).cloned()?;
        if now >= expires {
            lru.remove(key);
            return None;
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.order.remove(&old);
        lru.order.insert(tick, key.to_string());
        if let Some(e) = lru.entries.get_mut(key) {
            e.2 = tick;
        }
        Some(entry)
    }

    /// Keeps `entry` (replacing one of the same key whole) and evicts the least
    /// recently used until the bytes held fit the cap again.
    pub fn put(&self, key: &str, entry: Entry, ttl: Duration, now: Instant) -> Evicted {
        let mut lru = self.lock();
        lru.remove(key);
        if entry.size() > self.max_bytes {
            // It would push out everything else and still not fit.
            return Evicted(0);
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.bytes += entry.size();
        lru.entries.insert(
            key.to_string(),
            (std::sync::Arc::new(entry), now + ttl, tick),
        );
        lru.order.insert(tick, key.to_string());
        let mut evicted = 0;
        while lru.bytes > self.max_bytes {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some((e, _, _)) = lru.entries.remove(&oldest) {
                lru.bytes -= e.size();
            }
            evicted += 1;
        }
        Evicted(evicted)
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Entries in Redis: `PREFIX:cache:v1:KEY`, the value compressed, with the TTL.
pub struct RedisStore {
    redis: std::sync::Arc<RedisConnection>,
    prefix: String,
}

impl RedisStore {
    pub fn new(redis: std::sync::Arc<RedisConnection>, key_prefix: &str) -> RedisStore {
        RedisStore {
            redis,
            prefix: format!("{key_prefix}:cache:v1"),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Entry>, String> {
        let mut conn = self.redis.get().await?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(format!("{}:{key}", self.prefix));
        let value: Option<Vec<u8>> = self.redis.timed(cmd.query_async(&mut conn)).await?;
        // An entry that does not decode (another version's, say) is a miss.
        Ok(value.and_then(|v| Entry::decode(&v)))
    }

    pub async fn put(&self, key: &str, entry: &Entry, ttl: Duration) -> Result<(), String> {
        let mut conn = self.redis.get().await?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{}:{key}", self.prefix))
            .arg(entry.encode())
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        self.redis.timed(cmd.query_async::<()>(&mut conn)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(chunks: &[&str]) -> Entry {
        Entry {
            content_type: "text/event-stream".into(),
            stream: true,
            chunks: chunks.iter().map(|c| Bytes::from(c.to_string())).collect(),
            usage: Usage {
                input: Some(3),
                output: Some(2),
                cached_input: None,
                reasoning: Some(1),
            },
            model: Some("m".into()),
            cost: Some(0.5),
            finish_reason: Some("stop".into()),
        }
    }

    #[test]
    fn an_entry_comes_back_as_it_went_in() {
        let e = entry(&["data: {\"a\":1}\n\n", "data: [DONE]\n\n"]);
        let stored = e.encode();
        assert_eq!(Entry::decode(&stored), Some(e.clone()));
        assert!(Entry::decode(&stored[..stored.len() - 1]).is_none());
        assert!(Entry::decode(b"garbage").is_none());
        // Repetitive events compress.
        let long = entry(&["data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"; 200]);
        assert!(long.encode().len() < long.size() / 4);
    }

    #[test]
    fn memory_evicts_the_least_recently_used_past_its_bytes_and_expires_by_ttl() {
        let m = MemoryStore::new(100);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        assert_eq!(m.put("a", entry(&[&"x".repeat(40)]), ttl, now), Evicted(0));
        assert_eq!(m.put("b", entry(&[&"y".repeat(40)]), ttl, now), Evicted(0));
        // `a` used since: `b` is the one to go.
        assert!(m.get("a", now).is_some());
        assert_eq!(m.put("c", entry(&[&"z".repeat(40)]), ttl, now), Evicted(1));
        assert!(m.get("b", now).is_none());
        assert!(m.get("a", now).is_some() && m.get("c", now).is_some());
        assert_eq!(m.bytes(), 80);
        // Replaced whole, not doubled.
        m.put("a", entry(&[&"w".repeat(10)]), ttl, now);
        assert_eq!(m.bytes(), 50);
        assert!(m.get("a", now + ttl).is_none());
        assert_eq!(m.bytes(), 40);
        // An entry over the whole cap is not kept, and pushes nothing out.
        assert_eq!(
            m.put("big", entry(&[&"q".repeat(500)]), ttl, now),
            Evicted(0)
        );
        assert!(m.get("big", now).is_none());
        assert!(m.get("c", now).is_some());
    }
}
