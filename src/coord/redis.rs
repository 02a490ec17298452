//! The shared coordinator: cap counters, dedupe claims and re-auction leases live in one Redis,
//! each decision taken by a Lua script in one round trip, so every exchange node sees the same
//! counts. One Redis (or a Sentinel-managed primary), not a Redis Cluster: a reservation's keys
//! must live on one server for the script to touch them all.
//!
//! Unlike the rate limiter there is no node-local fallback: counting caps or claiming a person
//! on one node alone could oversell a buyer or sell a person twice. Every call is bounded by the
//! timeout and a failure is an error for the caller to refuse what needed the answer.

use std::time::Duration;

use ::redis::Script;
use ::redis::aio::ConnectionManager;
use async_trait::async_trait;

use super::{CoordError, Coordinator};
use crate::domain::caps::{CounterCheck, fits};
use crate::ratelimit::RedisSettings;
use crate::ratelimit::redis::redis_connection;

/// All or none: every counter in `KEYS` is checked against its limit, then every one is
/// increased and set to expire when its window ends. ARGV holds, per key, its limit, amount and
/// window end in Unix ms. Returns 1 when reserved, 0 when any counter would pass its limit.
/// Every counter lives at least a minute past Redis' own now: a node whose clock runs behind
/// Redis' still names a window Redis has ended, and an expiry in the past would delete the
/// counter at once, so every sale that node made until its clock reached the next window
/// would pass the cap. Counters are named by their window, so the next window's is another
/// key and the minute only keeps an old one a little longer.
const RESERVE_SCRIPT: &str = r#"
for i = 1, #KEYS do
  local value = tonumber(redis.call('GET', KEYS[i]) or '0')
  if value + tonumber(ARGV[3 * i - 1]) > tonumber(ARGV[3 * i - 2]) then
    return 0
  end
end
local time = redis.call('TIME')
local floor = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + 60000
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[3 * i - 1])
  redis.call('PEXPIREAT', KEYS[i], math.max(tonumber(ARGV[3 * i]), floor))
end
return 1
"#;

/// Takes each amount in ARGV back from its counter, never below zero. A counter whose window
/// ended meanwhile is gone and stays gone (no key without an expiry is ever created).
const RELEASE_SCRIPT: &str = r#"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local value = redis.call('DECRBY', KEYS[i], ARGV[i])
    if value < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 1
"#;

/// All or none: 0 when any key in `KEYS` is held, else every key is set to `ARGV[1]` for
/// `ARGV[2]` ms and 1 is returned.
const CLAIM_SCRIPT: &str = r#"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return 1
"#;

/// Moves the lease in `KEYS[1]` to end in `ARGV[2]` ms, only while this node (`ARGV[1]`)
/// holds it. Returns 1 when moved.
const EXTEND_LEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Deletes the lease in `KEYS[1]` only while this node (`ARGV[1]`) still holds it.
const END_LEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

pub struct RedisCoordinator {
    connection: ConnectionManager,
    reserve: Script,
    release: Script,
    claim: Script,
    end_lease: Script,
    extend_lease: Script,
    key_prefix: String,
    timeout: Duration,
    /// `host:port` for logs (never the URL: it may hold a password).
    endpoint: String,
    /// Written into leases, so a node only ends leases it holds.
    node_tag: String,
}

impl RedisCoordinator {
    /// Prepares the connection. Only a malformed URL is an error: a Redis not reachable yet
    /// makes the calls that need it fail (bounded by the timeout) until it answers.
    pub async fn connect(settings: RedisSettings) -> Result<RedisCoordinator, String> {
        let (connection, endpoint) = redis_connection(settings.url.as_str(), "coordination")?;
        let coordinator = RedisCoordinator {
            connection,
            reserve: Script::new(RESERVE_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            claim: Script::new(CLAIM_SCRIPT),
            end_lease: Script::new(END_LEASE_SCRIPT),
            extend_lease: Script::new(EXTEND_LEASE_SCRIPT),
            key_prefix: settings.key_prefix,
            timeout: settings.timeout,
            endpoint,
            node_tag: format!("{:016x}", rand::random::<u64>()),
        };
        match coordinator.ping().await {
            Ok(()) => {
                tracing::info!(redis = %coordinator.endpoint, "caps, dedupe and leases are shared through redis")
            }
            Err(e) => tracing::warn!(
                redis = %coordinator.endpoint,
                error = %e,
                "redis not reachable at start-up; capped buyers and deduping campaigns are refused until it answers"
            ),
        }
        Ok(coordinator)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.key_prefix)
    }

    /// Runs `call` within the timeout, naming Redis in the error.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, ::redis::RedisError>>,
    ) -> Result<T, CoordError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(CoordError::Backend(format!("redis {}: {e}", self.endpoint))),
            Err(_) => Err(CoordError::Backend(format!(
                "redis {}: no answer within {:?}",
                self.endpoint, self.timeout
            ))),
        }
    }

    /// Whether Redis answers a PING within the timeout.
    pub async fn ping(&self) -> Result<(), CoordError> {
        let mut connection = self.connection.clone();
        self.bounded(::redis::cmd("PING").query_async::<String>(&mut connection))
            .await
            .map(drop)
    }

    /// A counter's value in Redis (0 when absent): tests and diagnostics.
    pub async fn counter(&self, key: &str) -> Result<i64, CoordError> {
        let mut connection = self.connection.clone();
        let value: Option<i64> = self
            .bounded(
                ::redis::cmd("GET")
                    .arg(self.key(key))
                    .query_async(&mut connection),
            )
            .await?;
        Ok(value.unwrap_or(0))
    }
}

#[async_trait]
impl Coordinator for RedisCoordinator {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn healthy(&self) -> Result<(), String> {
        self.ping().await.map_err(|e| e.to_string())
    }

    async fn reserve(&self, checks: &[CounterCheck], _now_ms: i64) -> Result<bool, CoordError> {
        if checks.is_empty() {
            return Ok(true);
        }
        let mut invocation = self.reserve.prepare_invoke();
        for check in checks {
            invocation
                .key(self.key(&check.key))
                .arg(check.limit)
                .arg(check.amount)
                .arg(check.expires_at_ms);
        }
        let mut connection = self.connection.clone();
        let reserved: i64 = self
            .bounded(invocation.invoke_async(&mut connection))
            .await?;
        Ok(reserved == 1)
    }

    async fn release(&self, checks: &[CounterCheck]) -> Result<(), CoordError> {
        if checks.is_empty() {
            return Ok(());
        }
        let mut invocation = self.release.prepare_invoke();
        for check in checks {
            invocation.key(self.key(&check.key)).arg(check.amount);
        }
        let mut connection = self.connection.clone();
        let _: i64 = self
            .bounded(invocation.invoke_async(&mut connection))
            .await?;
        Ok(())
    }

    /// The reservation already is the count: Redis' own persistence (AOF, `appendfsync
    /// everysec` in the compose stack) is what keeps it over a Redis restart.
    async fn commit(&self, _checks: &[CounterCheck]) -> Result<(), CoordError> {
        Ok(())
    }

    async fn would_fit(&self, checks: &[CounterCheck], _now_ms: i64) -> Result<bool, CoordError> {
        if checks.is_empty() {
            return Ok(true);
        }
        let mut get = ::redis::cmd("MGET");
        for check in checks {
            get.arg(self.key(&check.key));
        }
        let mut connection = self.connection.clone();
        let values: Vec<Option<i64>> = self.bounded(get.query_async(&mut connection)).await?;
        let values: Vec<i64> = values.into_iter().map(Option::unwrap_or_default).collect();
        Ok(fits(checks, &values))
    }

    async fn claim(
        &self,
        keys: &[String],
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, CoordError> {
        if keys.is_empty() {
            return Ok(true);
        }
        let mut invocation = self.claim.prepare_invoke();
        for key in keys {
            invocation.key(self.key(key));
        }
        invocation
            .arg(expires_at_ms)
            .arg((expires_at_ms - now_ms).max(1));
        let mut connection = self.connection.clone();
        let claimed: i64 = self
            .bounded(invocation.invoke_async(&mut connection))
            .await?;
        Ok(claimed == 1)
    }

    async fn unclaim(&self, keys: &[String]) -> Result<(), CoordError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut delete = ::redis::cmd("DEL");
        for key in keys {
            delete.arg(self.key(key));
        }
        let mut connection = self.connection.clone();
        let _: i64 = self.bounded(delete.query_async(&mut connection)).await?;
        Ok(())
    }

    async fn lease(&self, key: &str, now_ms: i64, expires_at_ms: i64) -> Result<bool, CoordError> {
        let mut set = ::redis::cmd("SET");
        set.arg(self.key(key))
            .arg(&self.node_tag)
            .arg("NX")
            .arg("PX")
            .arg((expires_at_ms - now_ms).max(1));
        let mut connection = self.connection.clone();
        let set: Option<String> = self.bounded(set.query_async(&mut connection)).await?;
        Ok(set.is_some())
    }

    async fn end_lease(&self, key: &str) -> Result<(), CoordError> {
        let mut invocation = self.end_lease.prepare_invoke();
        invocation.key(self.key(key)).arg(&self.node_tag);
        let mut connection = self.connection.clone();
        let _: i64 = self
            .bounded(invocation.invoke_async(&mut connection))
            .await?;
        Ok(())
    }

    async fn extend_lease(
        &self,
        key: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, CoordError> {
        let mut invocation = self.extend_lease.prepare_invoke();
        invocation
            .key(self.key(key))
            .arg(&self.node_tag)
            .arg((expires_at_ms - now_ms).max(1));
        let mut connection = self.connection.clone();
        let moved: i64 = self
            .bounded(invocation.invoke_async(&mut connection))
            .await?;
        Ok(moved == 1)
    }
}
