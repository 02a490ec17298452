//! Atomic coordination between exchange nodes: claims (an idempotency key in flight, a dedupe
//! window) and bounded reservations (buyer caps, daily budgets). The cluster store has no
//! lightweight transactions, so this lives apart: in memory when one node runs, in Redis when
//! several do (that backend comes with the shared Redis connection). Callers pass `now_ms`.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum CoordinationError {
    #[error("coordination backend: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// Takes `key` until `now_ms + ttl_ms` unless someone holds it; `true` when taken here.
    async fn claim(&self, key: &str, now_ms: i64, ttl_ms: i64) -> Result<bool, CoordinationError>;

    /// Gives a claim back before it expires.
    async fn release(&self, key: &str) -> Result<(), CoordinationError>;

    /// Adds `amount` to the total of `key` when the total stays within `limit`, and returns
    /// the new total; `None` (and nothing added) when it would pass the limit. The total
    /// starts again from 0 at `resets_at_ms` (the end of the cap's hour or day).
    async fn reserve(
        &self,
        key: &str,
        amount: i64,
        limit: i64,
        now_ms: i64,
        resets_at_ms: i64,
    ) -> Result<Option<i64>, CoordinationError>;

    /// Takes back part of a reservation (the buyer refused the post).
    async fn unreserve(&self, key: &str, amount: i64, now_ms: i64)
    -> Result<(), CoordinationError>;
}

/// Past this many keys, expired ones are swept before a new key is added.
const SWEEP_AT: usize = 100_000;

/// The single-node coordinator.
#[derive(Default)]
pub struct MemoryCoordinator {
    /// Key -> expiry (ms).
    claims: Mutex<HashMap<String, i64>>,
    /// Key -> (total, resets at ms).
    totals: Mutex<HashMap<String, (i64, i64)>>,
}

impl MemoryCoordinator {
    pub fn new() -> MemoryCoordinator {
        MemoryCoordinator::default()
    }

    /// Keys held now (claims and totals), for tests and gauges.
    pub fn tracked_keys(&self) -> usize {
        self.claims.lock().expect("claims").len() + self.totals.lock().expect("totals").len()
    }
}

#[async_trait]
impl Coordinator for MemoryCoordinator {
    async fn claim(&self, key: &str, now_ms: i64, ttl_ms: i64) -> Result<bool, CoordinationError> {
        let mut claims = self.claims.lock().expect("claims");
        if claims.get(key).is_some_and(|expiry| *expiry > now_ms) {
            return Ok(false);
        }
        if claims.len() >= SWEEP_AT {
            claims.retain(|_, expiry| *expiry > now_ms);
        }
        claims.insert(key.to_owned(), now_ms + ttl_ms.max(1));
        Ok(true)
    }

    async fn release(&self, key: &str) -> Result<(), CoordinationError> {
        self.claims.lock().expect("claims").remove(key);
        Ok(())
    }

    async fn reserve(
        &self,
        key: &str,
        amount: i64,
        limit: i64,
        now_ms: i64,
        resets_at_ms: i64,
    ) -> Result<Option<i64>, CoordinationError> {
        let mut totals = self.totals.lock().expect("totals");
        if totals.len() >= SWEEP_AT && !totals.contains_key(key) {
            totals.retain(|_, (_, resets)| *resets > now_ms);
        }
        let entry = totals.entry(key.to_owned()).or_insert((0, resets_at_ms));
        if entry.1 <= now_ms {
            *entry = (0, resets_at_ms);
        }
        let total = entry.0 + amount;
        if total > limit {
            return Ok(None);
        }
        entry.0 = total;
        Ok(Some(total))
    }

    async fn unreserve(
        &self,
        key: &str,
        amount: i64,
        now_ms: i64,
    ) -> Result<(), CoordinationError> {
        let mut totals = self.totals.lock().expect("totals");
        if let Some(entry) = totals.get_mut(key)
            && entry.1 > now_ms
        {
            entry.0 = (entry.0 - amount).max(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_claim_is_held_until_it_expires_or_is_released() {
        let c = MemoryCoordinator::new();
        assert!(c.claim("idem:sup-1:k", 1_000, 500).await.unwrap());
        assert!(!c.claim("idem:sup-1:k", 1_499, 500).await.unwrap());
        assert!(c.claim("idem:sup-1:other", 1_499, 500).await.unwrap());
        assert!(
            c.claim("idem:sup-1:k", 1_500, 500).await.unwrap(),
            "expired"
        );
        c.release("idem:sup-1:k").await.unwrap();
        assert!(
            c.claim("idem:sup-1:k", 1_600, 500).await.unwrap(),
            "released"
        );
    }

    #[tokio::test]
    async fn reservations_stop_at_the_limit_and_reset() {
        let c = MemoryCoordinator::new();
        let day_end = 86_400_000;
        assert_eq!(
            c.reserve("cap:b", 1, 2, 10, day_end).await.unwrap(),
            Some(1)
        );
        assert_eq!(
            c.reserve("cap:b", 1, 2, 11, day_end).await.unwrap(),
            Some(2)
        );
        assert_eq!(c.reserve("cap:b", 1, 2, 12, day_end).await.unwrap(), None);
        c.unreserve("cap:b", 1, 13).await.unwrap();
        assert_eq!(
            c.reserve("cap:b", 1, 2, 14, day_end).await.unwrap(),
            Some(2)
        );
        assert_eq!(
            c.reserve("cap:b", 1, 2, day_end, 2 * day_end)
                .await
                .unwrap(),
            Some(1),
            "a new day starts from zero"
        );
        assert_eq!(
            c.reserve("budget:b", 2500, 2000, 15, day_end)
                .await
                .unwrap(),
            None,
            "an amount over the limit on its own is refused"
        );
        assert_eq!(c.tracked_keys(), 2);
    }
}
