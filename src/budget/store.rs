//! Where budgets' spend and reservations are kept, in nano-dollars per budget and
//! window: this relay's memory, or Redis (one hash per budget window, changed only by
//! the two scripts below, each atomic, on Redis' clock).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redis::Script;

use super::window::Window;
use crate::limits::redis::RedisConnection;

/// A budget window's state after an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// The reservation was taken (always, for a budget that only audits).
    pub admitted: bool,
    pub spent: i64,
    /// Held by requests still running, this one's included when admitted.
    pub reserved: i64,
    /// The window the store counted in (Redis may have turned to the next one).
    pub window: Window,
}

/// One operation on a budget window: reserve `amount` (refused, changing nothing, when
/// `block` and spent + reserved + amount would pass `cap`), or settle.
#[derive(Debug, Clone, Copy)]
pub struct Reserve<'a> {
    pub id: &'a str,
    pub window: Window,
    /// The end of the window after `window`, for a store whose clock has already turned
    /// (0: the reservation belongs in `window` whatever the clock says).
    pub next_end_ms: i64,
    /// The start of the window before, for a store whose clock has not turned yet (0:
    /// stay in `window`).
    pub prev_start_ms: i64,
    pub amount: i64,
    pub cap: i64,
    pub block: bool,
}

/// This relay's own budget counts.
#[derive(Default)]
pub struct LocalStore {
    windows: Mutex<HashMap<(String, i64), (i64, i64)>>,
}

impl LocalStore {
    pub fn reserve(&self, r: &Reserve<'_>) -> Level {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        // Windows that ended are dropped as new ones begin.
        windows.retain(|(_, start), _| *start >= r.window.start_ms - 40 * 86_400_000);
        let (spent, reserved) = windows
            .entry((r.id.to_string(), r.window.start_ms))
            .or_default();
        let admitted = !r.block || *spent + *reserved + r.amount <= r.cap;
        if admitted {
            *reserved += r.amount;
        }
        Level {
            admitted,
            spent: *spent,
            reserved: *reserved,
            window: r.window,
        }
    }

    pub fn settle(&self, id: &str, window: Window, reserved: i64, actual: i64) -> Level {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let (spent, held) = windows
            .entry((id.to_string(), window.start_ms))
            .or_default();
        *held = (*held - reserved).max(0);
        *spent += actual;
        Level {
            admitted: true,
            spent: *spent,
            reserved: *held,
            window,
        }
    }

    pub fn level(&self, id: &str, window: Window) -> Level {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let (spent, reserved) = windows
            .get(&(id.to_string(), window.start_ms))
            .copied()
            .unwrap_or_default();
        Level {
            admitted: true,
            spent,
            reserved,
            window,
        }
    }
}

/// Reserve. KEYS[1]: the budget's key prefix. ARGV: window start, end, next window's
/// end (ms; 0: stay in this window), amount, cap, block (1/0), the previous window's start
/// (0: none). On Redis' clock: a window that has ended there is replaced by the next, and
/// one that has not begun there (this relay's clock is ahead) by the previous. Returns
/// {admitted, spent, reserved, start, end}.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local start, stop = tonumber(ARGV[1]), tonumber(ARGV[2])
if now >= stop and tonumber(ARGV[3]) > stop then start, stop = stop, tonumber(ARGV[3])
elseif now < start and tonumber(ARGV[7]) > 0 then start, stop = tonumber(ARGV[7]), start end
local key = KEYS[1] .. ':' .. start
local spent = tonumber(redis.call('HGET', key, 'spent') or '0')
local reserved = tonumber(redis.call('HGET', key, 'reserved') or '0')
local amount, cap = tonumber(ARGV[4]), tonumber(ARGV[5])
if ARGV[6] == '1' and spent + reserved + amount > cap then
  return {0, spent, reserved, start, stop}
end
redis.call('HINCRBY', key, 'reserved', amount)
redis.call('PEXPIREAT', key, stop + 604800000)
return {1, spent, reserved + amount, start, stop}
"#;

/// Settle. KEYS[1]: the budget's key prefix. ARGV: window start, end, reserved, actual.
/// The reservation is given back (never below zero) and the actual cost counted, in the
/// window the request was reserved in. Returns {spent, reserved}.
const SETTLE: &str = r#"
local key = KEYS[1] .. ':' .. ARGV[1]
local held = tonumber(redis.call('HGET', key, 'reserved') or '0') - tonumber(ARGV[3])
if held < 0 then held = 0 end
redis.call('HSET', key, 'reserved', held)
local spent = redis.call('HINCRBY', key, 'spent', tonumber(ARGV[4]))
redis.call('PEXPIREAT', key, tonumber(ARGV[2]) + 604800000)
return {spent, held}
"#;

/// The fleet's budget counts in Redis (the limiter's connection).
#[derive(Clone)]
pub struct RedisStore {
    redis: Arc<RedisConnection>,
    prefix: String,
    reserve: Script,
    settle: Script,
}

impl RedisStore {
    pub fn new(redis: Arc<RedisConnection>, key_prefix: &str) -> RedisStore {
        RedisStore {
            redis,
            prefix: format!("{key_prefix}:budget:v1"),
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
        }
    }

    fn key(&self, id: &str) -> String {
        // One hash tag per budget: every script touches one slot of a cluster.
        format!("{}:{{{id}}}", self.prefix)
    }

    pub async fn reserve(&self, r: &Reserve<'_>) -> Result<Level, String> {
        let mut conn = self.redis.get().await?;
        let mut call = self.reserve.key(self.key(r.id));
        call.arg(r.window.start_ms)
            .arg(r.window.end_ms)
            .arg(r.next_end_ms)
            .arg(r.amount)
            .arg(r.cap)
            .arg(u8::from(r.block))
            .arg(r.prev_start_ms);
        let run = call.invoke_async::<(i64, i64, i64, i64, i64)>(&mut conn);
        let (admitted, spent, reserved, start, end) = self.redis.timed(run).await?;
        Ok(Level {
            admitted: admitted == 1,
            spent,
            reserved,
            window: Window {
                start_ms: start,
                end_ms: end,
            },
        })
    }

    pub async fn settle(
        &self,
        id: &str,
        window: Window,
        reserved: i64,
        actual: i64,
    ) -> Result<Level, String> {
        let mut conn = self.redis.get().await?;
        let mut call = self.settle.key(self.key(id));
        call.arg(window.start_ms)
            .arg(window.end_ms)
            .arg(reserved)
            .arg(actual);
        let run = call.invoke_async::<(i64, i64)>(&mut conn);
        let (spent, reserved) = self.redis.timed(run).await?;
        Ok(Level {
            admitted: true,
            spent,
            reserved,
            window,
        })
    }

    pub async fn level(&self, id: &str, window: Window) -> Result<Level, String> {
        let mut conn = self.redis.get().await?;
        let key = format!("{}:{}", self.key(id), window.start_ms);
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key).arg("spent").arg("reserved");
        let run = cmd.query_async::<(Option<i64>, Option<i64>)>(&mut conn);
        let (spent, reserved) = self.redis.timed(run).await?;
        Ok(Level {
            admitted: true,
            spent: spent.unwrap_or(0),
            reserved: reserved.unwrap_or(0),
            window,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Window = Window {
        start_ms: 1_000,
        end_ms: 2_000,
    };

    fn ask(amount: i64, block: bool) -> Reserve<'static> {
        Reserve {
            id: "b",
            window: W,
            next_end_ms: 3_000,
            prev_start_ms: 0,
            amount,
            cap: 100,
            block,
        }
    }

    #[test]
    fn a_blocking_budget_refuses_past_its_cap_and_an_audit_one_counts_on() {
        let s = LocalStore::default();
        assert!(s.reserve(&ask(60, true)).admitted);
        let refused = s.reserve(&ask(50, true));
        assert!(!refused.admitted);
        assert_eq!((refused.spent, refused.reserved), (0, 60));
        // Settled below the reservation: room comes back.
        let l = s.settle("b", W, 60, 30);
        assert_eq!((l.spent, l.reserved), (30, 0));
        assert!(s.reserve(&ask(70, true)).admitted);
        assert!(!s.reserve(&ask(1, true)).admitted);
        let audit = s.reserve(&ask(500, false));
        assert!(audit.admitted);
        assert_eq!(audit.reserved, 570);
        // A settlement never takes the reservations below zero.
        assert_eq!(s.settle("b", W, 10_000, 0).reserved, 0);
        // Another window starts empty.
        let next = Window {
            start_ms: 2_000,
            end_ms: 3_000,
        };
        assert_eq!(s.level("b", next).spent, 0);
    }
}
