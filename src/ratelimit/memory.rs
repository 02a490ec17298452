//! Node-local limiter: one sliding-window log per key in sharded maps. Memory is bounded: a
//! log never holds more than its limit, and idle keys are swept out.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;

use async_trait::async_trait;

use super::window::{Decision, Limit, decide};
use super::{Clock, RateLimiter};

const SHARDS: usize = 32;
/// A shard is swept of idle keys when it grows past this many.
const SWEEP_AT: usize = 4_096;

pub struct MemoryLimiter {
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
    clock: Clock,
}

#[derive(Default)]
struct Shard {
    logs: HashMap<String, (VecDeque<i64>, i64)>,
    sweep_at: usize,
}

impl MemoryLimiter {
    pub fn new(clock: Clock) -> MemoryLimiter {
        MemoryLimiter {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        logs: HashMap::new(),
                        sweep_at: SWEEP_AT,
                    })
                })
                .collect(),
            hasher: Default::default(),
            clock,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Keys tracked now (for tests and the memory-bound check).
    pub fn tracked_keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("shard").logs.len())
            .sum()
    }

    /// Decides synchronously; the async trait methods call this.
    pub fn decide_now(&self, key: &str, limit: Limit, count: bool) -> Decision {
        let now = self.clock.now_ms();
        let mut shard = self.shard(key).lock().expect("rate-limit shard");
        if shard.logs.len() >= shard.sweep_at {
            // Drop logs whose every entry left their window.
            shard
                .logs
                .retain(|_, (log, window)| log.back().is_some_and(|t| *t > now - *window));
            shard.sweep_at = (shard.logs.len() * 2).max(SWEEP_AT);
        }
        let mut decision = if !count && !shard.logs.contains_key(key) {
            decide(&mut VecDeque::new(), now, limit, false)
        } else {
            let entry = shard
                .logs
                .entry(key.to_owned())
                .or_insert_with(|| (VecDeque::new(), limit.window_ms));
            entry.1 = limit.window_ms;
            decide(&mut entry.0, now, limit, count)
        };
        drop(shard);
        // The window is the clock's; the reset, a Unix time, is the wall clock's.
        decision.reset_at_ms += self.clock.wall_step_ms();
        decision
    }
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    async fn acquire(&self, key: &str, limit: Limit) -> Decision {
        self.decide_now(key, limit, true)
    }

    async fn peek(&self, key: &str, limit: Limit) -> Decision {
        self.decide_now(key, limit, false)
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn healthy(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn window_precision_with_paused_time() {
        let limiter = MemoryLimiter::new(Clock::tokio());
        let limit = Limit::per_secs(60, 60);
        for _ in 0..60 {
            assert!(limiter.acquire("k", limit).await.allowed);
            tokio::time::advance(Duration::from_millis(500)).await;
        }
        // 30 s in: full.
        let refused = limiter.acquire("k", limit).await;
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 30_000);
        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert!(!limiter.acquire("k", limit).await.allowed);
        tokio::time::advance(Duration::from_millis(1)).await;
        let d = limiter.acquire("k", limit).await;
        assert!(d.allowed && d.remaining == 0);
        assert!(!limiter.acquire("k", limit).await.allowed);
        assert!(
            limiter.acquire("other", limit).await.allowed,
            "keys never share a window"
        );
    }

    #[tokio::test]
    async fn a_step_of_the_wall_clock_moves_the_reset_not_the_window() {
        let step = Arc::new(AtomicI64::new(0));
        let wall = {
            let step = step.clone();
            Arc::new(move || crate::clock::now_ms() + step.load(Ordering::Relaxed))
        };
        let limiter = MemoryLimiter::new(Clock::with_wall(wall));
        let limit = Limit::per_secs(2, 60);
        let first = limiter.acquire("k", limit).await;
        let reset = first.reset_at_ms;
        assert!(
            (reset - (crate::clock::now_ms() + 60_000)).abs() < 1_000,
            "{first:?}"
        );
        // Set 5 s ahead (as NTP may at a start): the reset follows it, the count does not.
        step.store(5_000, Ordering::Relaxed);
        let second = limiter.acquire("k", limit).await;
        assert!(
            (second.reset_at_ms - (reset + 5_000)).abs() < 100,
            "{second:?}"
        );
        assert_eq!(second.remaining, 0);
        assert!(!limiter.peek("k", limit).await.allowed);
        // Under a second apart is the clocks' reading, not a step.
        step.store(400, Ordering::Relaxed);
        let peeked = limiter.peek("k", limit).await;
        assert!((peeked.reset_at_ms - reset).abs() < 100, "{peeked:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_evicted() {
        let limiter = MemoryLimiter::new(Clock::tokio());
        let limit = Limit::per_secs(5, 1);
        for i in 0..(SWEEP_AT * SHARDS * 2) {
            limiter.acquire(&format!("key-{i}"), limit).await;
            if i % 1000 == 0 {
                tokio::time::advance(Duration::from_secs(2)).await;
            }
        }
        assert!(
            limiter.tracked_keys() < SWEEP_AT * SHARDS,
            "{}",
            limiter.tracked_keys()
        );
    }
}
