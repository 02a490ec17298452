//! Atomic coordination between concurrent auctions: bounded counters for buyer caps and
//! budgets (all-or-nothing reservations), durable claims for dedupe, short leases for
//! re-auctions. One trait, so a shared backend (Redis) can replace the node-local one when
//! several exchange nodes sell for the same buyers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::future::try_join_all;

use crate::config::CoordinationConfig;
use crate::domain::caps::{CounterCheck, fits};
use crate::storage::{LeadStore, StorageError};

pub mod redis;
pub use self::redis::RedisCoordinator;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("coordination storage: {0}")]
    Storage(#[from] StorageError),
    #[error("coordination backend: {0}")]
    Backend(String),
}

#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// `memory` or the shared backend's name, for `/readyz` and metrics.
    fn backend(&self) -> &'static str {
        "memory"
    }

    /// `Err` with why when the shared backend does not answer (capped buyers are then
    /// skipped and deduping campaigns refuse leads until it is back).
    async fn healthy(&self) -> Result<(), String> {
        Ok(())
    }

    /// Adds every check's amount to its counter, all or none: `false` (and nothing added)
    /// when any counter would pass its limit.
    async fn reserve(&self, checks: &[CounterCheck], now_ms: i64) -> Result<bool, CoordError>;

    /// Takes back a reservation whose sale did not happen.
    async fn release(&self, checks: &[CounterCheck]) -> Result<(), CoordError>;

    /// Returns once the counters of a completed sale would survive a restart.
    async fn commit(&self, checks: &[CounterCheck]) -> Result<(), CoordError>;

    /// Whether `checks` would fit now, without reserving anything.
    async fn would_fit(&self, checks: &[CounterCheck], now_ms: i64) -> Result<bool, CoordError>;

    /// Durably claims every key until `expires_at_ms`, all or none: `false` when any key is
    /// already held by a live claim.
    async fn claim(
        &self,
        keys: &[String],
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, CoordError>;

    /// Gives claims back (what they guarded did not happen).
    async fn unclaim(&self, keys: &[String]) -> Result<(), CoordError>;

    /// A short exclusive lease on `key` until `expires_at_ms`, not kept over a restart.
    async fn lease(&self, key: &str, now_ms: i64, expires_at_ms: i64) -> Result<bool, CoordError>;

    async fn end_lease(&self, key: &str) -> Result<(), CoordError>;

    /// Moves the end of a lease this node holds to `expires_at_ms`; `false` when it does not
    /// hold it (expired, or another node's).
    async fn extend_lease(
        &self,
        key: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, CoordError>;
}

pub type SharedCoordinator = Arc<dyn Coordinator>;

/// The coordinator `[coordination]` asks for, and whether it is shared with other nodes.
pub async fn from_config(
    config: &CoordinationConfig,
    store: Arc<dyn LeadStore>,
) -> Result<(SharedCoordinator, bool), String> {
    match config.backend.as_str() {
        "redis" => {
            let url = config
                .url
                .clone()
                .ok_or("coordination.url: backend `redis` needs a url")?;
            let settings = crate::ratelimit::RedisSettings {
                url,
                key_prefix: config.key_prefix.clone(),
                timeout: std::time::Duration::from_millis(config.timeout_ms),
            };
            Ok((Arc::new(RedisCoordinator::connect(settings).await?), true))
        }
        _ => Ok((Arc::new(MemoryCoordinator::new(store)), false)),
    }
}

/// Counters kept in memory beyond this many are swept of finished windows.
const SWEEP_COUNTERS_AT: usize = 4096;

struct Counter {
    value: i64,
    expires_at_ms: i64,
    /// Bumped on every change; `stored` is the version last made durable.
    version: u64,
    stored: u64,
}

/// The node-local coordinator. Counters live in memory and are written to the store's state
/// values after each sale (a group of sales shares one write), and read back on first use
/// after a restart. In-memory values include reservations in flight, so a crash mid-post
/// can only make a counter too high, never too low: a cap is never overshot. Claims are
/// held in memory only while being made; once durable, the store is the authority.
pub struct MemoryCoordinator {
    store: Arc<dyn LeadStore>,
    counters: Mutex<HashMap<String, Counter>>,
    claiming: Mutex<HashMap<String, i64>>,
    leases: Mutex<HashMap<String, i64>>,
    persist: tokio::sync::Mutex<()>,
}

fn parse_i64(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

impl MemoryCoordinator {
    pub fn new(store: Arc<dyn LeadStore>) -> MemoryCoordinator {
        MemoryCoordinator {
            store,
            counters: Mutex::new(HashMap::new()),
            claiming: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            persist: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads counters not yet in memory from the store (first use after a start).
    async fn load(&self, checks: &[CounterCheck]) -> Result<(), CoordError> {
        let missing: Vec<&CounterCheck> = {
            let counters = self.counters.lock().expect("counters");
            checks
                .iter()
                .filter(|c| !counters.contains_key(&c.key))
                .collect()
        };
        for check in missing {
            let stored = self
                .store
                .get_state(&check.key)
                .await?
                .and_then(|v| parse_i64(&v))
                .unwrap_or(0);
            let mut counters = self.counters.lock().expect("counters");
            counters.entry(check.key.clone()).or_insert(Counter {
                value: stored,
                expires_at_ms: check.expires_at_ms,
                version: 0,
                stored: 0,
            });
        }
        Ok(())
    }

    fn values(counters: &HashMap<String, Counter>, checks: &[CounterCheck]) -> Vec<i64> {
        checks
            .iter()
            .map(|c| counters.get(&c.key).map_or(0, |x| x.value))
            .collect()
    }

    /// The value a counter has in memory (tests and diagnostics).
    pub fn counter(&self, key: &str) -> Option<i64> {
        self.counters
            .lock()
            .expect("counters")
            .get(key)
            .map(|c| c.value)
    }
}

#[async_trait]
impl Coordinator for MemoryCoordinator {
    async fn reserve(&self, checks: &[CounterCheck], now_ms: i64) -> Result<bool, CoordError> {
        if checks.is_empty() {
            return Ok(true);
        }
        self.load(checks).await?;
        let mut counters = self.counters.lock().expect("counters");
        if !fits(checks, &Self::values(&counters, checks)) {
            return Ok(false);
        }
        for check in checks {
            if let Some(counter) = counters.get_mut(&check.key) {
                counter.value += check.amount;
                counter.version += 1;
            }
        }
        if counters.len() > SWEEP_COUNTERS_AT {
            counters.retain(|_, c| c.expires_at_ms > now_ms);
        }
        Ok(true)
    }

    async fn release(&self, checks: &[CounterCheck]) -> Result<(), CoordError> {
        let mut counters = self.counters.lock().expect("counters");
        for check in checks {
            if let Some(counter) = counters.get_mut(&check.key) {
                counter.value = (counter.value - check.amount).max(0);
                counter.version += 1;
            }
        }
        Ok(())
    }

    async fn commit(&self, checks: &[CounterCheck]) -> Result<(), CoordError> {
        if checks.is_empty() {
            return Ok(());
        }
        let wanted: Vec<u64> = {
            let counters = self.counters.lock().expect("counters");
            checks
                .iter()
                .map(|c| counters.get(&c.key).map_or(0, |x| x.version))
                .collect()
        };
        // One writer at a time, each writing the newest values: stored values only move
        // forward, and a sale whose values a previous write already carried waits for nothing.
        let _writer = self.persist.lock().await;
        let writes: Vec<(String, i64, u64)> = {
            let counters = self.counters.lock().expect("counters");
            checks
                .iter()
                .zip(&wanted)
                .filter_map(|(check, wanted)| {
                    let counter = counters.get(&check.key)?;
                    (counter.stored < *wanted)
                        .then(|| (check.key.clone(), counter.value, counter.version))
                })
                .collect()
        };
        if writes.is_empty() {
            return Ok(());
        }
        try_join_all(
            writes
                .iter()
                .map(|(key, value, _)| self.store.put_state(key, value.to_string().into_bytes())),
        )
        .await?;
        let mut counters = self.counters.lock().expect("counters");
        for (key, _, version) in writes {
            if let Some(counter) = counters.get_mut(&key) {
                counter.stored = counter.stored.max(version);
            }
        }
        Ok(())
    }

    async fn would_fit(&self, checks: &[CounterCheck], _now_ms: i64) -> Result<bool, CoordError> {
        if checks.is_empty() {
            return Ok(true);
        }
        self.load(checks).await?;
        let counters = self.counters.lock().expect("counters");
        Ok(fits(checks, &Self::values(&counters, checks)))
    }

    async fn claim(
        &self,
        keys: &[String],
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, CoordError> {
        {
            let mut claiming = self.claiming.lock().expect("claims");
            if keys
                .iter()
                .any(|k| claiming.get(k).is_some_and(|exp| *exp > now_ms))
            {
                return Ok(false);
            }
            for key in keys {
                claiming.insert(key.clone(), expires_at_ms);
            }
        }
        let result = async {
            for key in keys {
                let held = self
                    .store
                    .get_state(key)
                    .await?
                    .and_then(|v| parse_i64(&v))
                    .is_some_and(|exp| exp > now_ms);
                if held {
                    return Ok(false);
                }
            }
            let value = expires_at_ms.to_string();
            try_join_all(
                keys.iter()
                    .map(|k| self.store.put_state(k, value.clone().into_bytes())),
            )
            .await?;
            Ok(true)
        }
        .await;
        let mut claiming = self.claiming.lock().expect("claims");
        for key in keys {
            claiming.remove(key);
        }
        result
    }

    async fn unclaim(&self, keys: &[String]) -> Result<(), CoordError> {
        try_join_all(keys.iter().map(|k| self.store.put_state(k, b"0".to_vec()))).await?;
        Ok(())
    }

    async fn lease(&self, key: &str, now_ms: i64, expires_at_ms: i64) -> Result<bool, CoordError> {
        let mut leases = self.leases.lock().expect("leases");
        if leases.get(key).is_some_and(|exp| *exp > now_ms) {
            return Ok(false);
        }
        if leases.len() > SWEEP_COUNTERS_AT {
            leases.retain(|_, exp| *exp > now_ms);
        }
        leases.insert(key.to_owned(), expires_at_ms);
        Ok(true)
    }

    async fn end_lease(&self, key: &str) -> Result<(), CoordError> {
        self.leases.lock().expect("leases").remove(key);
        Ok(())
    }

    async fn extend_lease(
        &self,
        key: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, CoordError> {
        let mut leases = self.leases.lock().expect("leases");
        match leases.get_mut(key) {
            Some(exp) if *exp > now_ms => {
                *exp = expires_at_ms;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::embedded::EmbeddedStore;

    fn check(key: &str, limit: i64, amount: i64) -> CounterCheck {
        CounterCheck {
            key: key.into(),
            limit,
            amount,
            expires_at_ms: i64::MAX,
        }
    }

    #[tokio::test]
    async fn reservations_are_exact_all_or_nothing_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(dir.path(), 64).unwrap());
        let coord = Arc::new(MemoryCoordinator::new(store.clone()));
        let sale = [check("cap", 10, 1), check("budget", 1000, 150)];
        let attempts = futures::future::join_all((0..50).map(|_| {
            let coord = coord.clone();
            let sale = sale.clone();
            async move { coord.reserve(&sale, 0).await.unwrap() }
        }))
        .await;
        assert_eq!(
            attempts.iter().filter(|ok| **ok).count(),
            6,
            "budget binds first"
        );
        assert_eq!(coord.counter("cap"), Some(6));
        coord.release(&sale).await.unwrap();
        assert_eq!(coord.counter("budget"), Some(750));
        coord.commit(&sale).await.unwrap();
        store.close().await.unwrap();

        let store: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(dir.path(), 64).unwrap());
        let coord = MemoryCoordinator::new(store);
        assert!(coord.would_fit(&sale, 0).await.unwrap());
        assert!(coord.reserve(&sale, 0).await.unwrap());
        assert!(!coord.reserve(&sale, 0).await.unwrap(), "900 + 150 > 1000");
        assert_eq!(coord.counter("cap"), Some(6));
    }

    #[tokio::test]
    async fn a_held_lease_is_extended_and_an_expired_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(dir.path(), 64).unwrap());
        let coord = MemoryCoordinator::new(store);
        assert!(coord.lease("retry/1", 0, 100).await.unwrap());
        assert!(coord.extend_lease("retry/1", 50, 10_000).await.unwrap());
        assert!(
            !coord.lease("retry/1", 5_000, 6_000).await.unwrap(),
            "held past its first end"
        );
        assert!(
            !coord.extend_lease("retry/1", 20_000, 30_000).await.unwrap(),
            "expired"
        );
        assert!(
            !coord.extend_lease("retry/2", 0, 100).await.unwrap(),
            "never leased"
        );
    }

    #[tokio::test]
    async fn claims_are_exclusive_durable_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(dir.path(), 64).unwrap());
        let coord = Arc::new(MemoryCoordinator::new(store.clone()));
        let keys = vec!["phone/1".to_owned(), "email/a".to_owned()];
        let wins = futures::future::join_all((0..20).map(|_| {
            let coord = coord.clone();
            let keys = keys.clone();
            async move { coord.claim(&keys, 0, 1000).await.unwrap() }
        }))
        .await;
        assert_eq!(wins.iter().filter(|w| **w).count(), 1);
        assert!(
            !coord
                .claim(&["email/a".to_owned()], 10, 2000)
                .await
                .unwrap()
        );
        assert!(
            coord
                .claim(&["email/b".to_owned()], 10, 2000)
                .await
                .unwrap()
        );
        store.close().await.unwrap();

        let store: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(dir.path(), 64).unwrap());
        let coord = MemoryCoordinator::new(store);
        assert!(
            !coord
                .claim(&["phone/1".to_owned()], 999, 5000)
                .await
                .unwrap()
        );
        assert!(
            coord
                .claim(&["phone/1".to_owned()], 1000, 5000)
                .await
                .unwrap(),
            "expired"
        );
        coord.unclaim(&["email/b".to_owned()]).await.unwrap();
        assert!(
            coord
                .claim(&["email/b".to_owned()], 20, 5000)
                .await
                .unwrap()
        );
    }
}
