//! Shared limiter: one sliding window per key in Redis, decided by a Lua script in one round
//! trip, so every exchange node enforces the same window. When Redis is slow or down, the
//! node-local `MemoryLimiter` answers instead (each node then limits on its own), the outage is
//! counted, logged at most once per interval, reported by `healthy()`, and Redis is tried again
//! by itself.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use ::redis::{Client, IntoConnectionInfo, RedisError, Script};
use async_trait::async_trait;
use metrics::{counter, gauge};

use super::window::{Decision, Limit, LogSummary, decision_from};
use super::{Clock, MemoryLimiter, RateLimiter};
use crate::telemetry;

/// The whole check, atomic inside Redis. `KEYS[1]` is the key's log: a sorted set whose scores
/// are the counted requests' times in ms and whose members are unique per request. The time is
/// Redis' own (`TIME`), so nodes with skewed clocks agree. Semantics are those of
/// `window::decide`: entries at or before `now - window` leave; a request is counted only when
/// allowed; a peek (`ARGV[3] = 0`) counts nothing.
/// ARGV: limit, window in ms, 1 to count or 0 to peek, the request's unique member.
/// Returns `{allowed, used, oldest, freeing, now}` (`-1` for an absent time).
const CHECK_SCRIPT: &str = r#"
pcall(redis.replicate_commands)
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local used = redis.call('ZCARD', key)
local allowed = 0
if used < limit then
  allowed = 1
  if ARGV[3] == '1' then
    -- Redis' clock can step back; keep scores in arrival order so expiry stays exact.
    local at = now
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if newest[2] and tonumber(newest[2]) > at then at = tonumber(newest[2]) end
    redis.call('ZADD', key, at, ARGV[4])
    redis.call('PEXPIRE', key, at - now + window)
    used = used + 1
  end
end
local oldest = -1
local freeing = -1
if used > 0 then
  oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
  if allowed == 0 then
    local index = used - limit
    freeing = tonumber(redis.call('ZRANGE', key, index, index, 'WITHSCORES')[2])
  end
end
return {allowed, used, oldest, freeing, now}
"#;

/// Consecutive failed calls after which Redis is given up on until the next probe. One slow
/// answer only sends that one check to the local limiter.
const TRIP_AFTER: u32 = 3;
/// While Redis is given up on, one check per interval tries it again.
const PROBE_INTERVAL_MS: i64 = 1_000;
/// Outage logs (and recovery logs) at most this often.
const LOG_INTERVAL_MS: i64 = 10_000;
/// How long start-up waits to load the script before starting degraded.
const STARTUP_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prepended to every key, so several exchanges (or environments) can share a Redis.
    pub key_prefix: String,
    /// Longest wait for one Redis call before the node-local limiter answers.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error("unexpected script reply {0:?}")]
    BadReply(Vec<i64>),
}

/// One answer of the script: the decision and Redis' time when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    pub now_ms: i64,
}

pub struct RedisLimiter {
    connection: ConnectionManager,
    script: Script,
    key_prefix: String,
    timeout: Duration,
    /// `host:port` of Redis for logs and `/readyz` (never the URL: it may hold a password).
    endpoint: String,
    /// Makes members unique across nodes: this process' random tag and a sequence.
    node_tag: String,
    sequence: AtomicU64,
    fallback: MemoryLimiter,
    health: Health,
}

/// The fallback switch, lock-free on the hot path.
struct Health {
    started: Instant,
    consecutive_failures: AtomicU32,
    /// Redis is given up on; checks go to the local limiter except one probe per interval.
    degraded: AtomicBool,
    degraded_since_ms: AtomicI64,
    next_probe_ms: AtomicI64,
    last_warning_ms: AtomicI64,
    last_recovery_log_ms: AtomicI64,
    /// Checks answered by the local limiter, in all and since the last log line.
    fallback_checks: AtomicU64,
    fallback_checks_unlogged: AtomicU64,
    last_error: Mutex<String>,
}

impl Health {
    fn new() -> Health {
        Health {
            started: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            degraded: AtomicBool::new(false),
            degraded_since_ms: AtomicI64::new(0),
            next_probe_ms: AtomicI64::new(0),
            last_warning_ms: AtomicI64::new(-LOG_INTERVAL_MS),
            last_recovery_log_ms: AtomicI64::new(-LOG_INTERVAL_MS),
            fallback_checks: AtomicU64::new(0),
            fallback_checks_unlogged: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
        }
    }

    /// Milliseconds on a monotonic clock (not wall time: only intervals matter here).
    fn now_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    /// Whether this call should ask Redis: always while it is healthy; while degraded, only the
    /// one call that claims the due probe.
    fn should_try(&self) -> bool {
        if !self.degraded.load(Ordering::Acquire) {
            return true;
        }
        let now = self.now_ms();
        let due = self.next_probe_ms.load(Ordering::Acquire);
        now >= due
            && self
                .next_probe_ms
                .compare_exchange(
                    due,
                    now + PROBE_INTERVAL_MS,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// True once per interval, for whichever caller gets there first.
    fn claim_log(slot: &AtomicI64, now: i64) -> bool {
        let last = slot.load(Ordering::Acquire);
        now - last >= LOG_INTERVAL_MS
            && slot
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// One auto-reconnecting multiplexed connection to Redis (no connection per request), and
/// the server's `host:port` for logs (never the URL: it may hold a password). Only a malformed
/// URL is an error; an unreachable Redis makes calls fail until it answers. `what` names the
/// config section in errors.
pub fn redis_connection(url: &str, what: &str) -> Result<(ConnectionManager, String), String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("{what}.url: {e}"))?;
    let endpoint = info.addr().to_string();
    // Without NODELAY small requests wait for Nagle; keepalive and a user timeout let the
    // kernel drop a connection whose peer vanished, so the manager reconnects.
    let tcp = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(
            TcpKeepalive::new()
                .with_time(Duration::from_secs(10))
                .with_interval(Duration::from_secs(5)),
        )
        .set_user_timeout(Duration::from_secs(5));
    let client =
        Client::open(info.set_tcp_settings(tcp)).map_err(|e| format!("{what}.url: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
        .set_number_of_retries(4);
    let connection = ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| format!("{what}: redis connection: {e}"))?;
    Ok((connection, endpoint))
}

impl RedisLimiter {
    /// Prepares the connection and loads the script. Only a malformed URL is an error: when
    /// Redis cannot be reached the limiter starts degraded (node-local limits) and keeps trying,
    /// so an exchange node can start and sell while Redis is down.
    pub async fn connect(settings: RedisSettings, clock: Clock) -> Result<RedisLimiter, String> {
        let (connection, endpoint) = redis_connection(settings.url.as_str(), "rate_limit")?;
        let limiter = RedisLimiter {
            connection,
            script: Script::new(CHECK_SCRIPT),
            key_prefix: settings.key_prefix,
            timeout: settings.timeout,
            endpoint,
            node_tag: format!("{:016x}", rand::random::<u64>()),
            sequence: AtomicU64::new(0),
            fallback: MemoryLimiter::new(clock),
            health: Health::new(),
        };
        gauge!(telemetry::RATE_LIMIT_FALLBACK_ACTIVE).set(0.0);
        let mut connection = limiter.connection.clone();
        let loaded =
            tokio::time::timeout(STARTUP_WAIT, limiter.script.load_async(&mut connection)).await;
        match loaded {
            Ok(Ok(_)) => {
                tracing::info!(redis = %limiter.endpoint, "rate limits are shared through redis")
            }
            Ok(Err(e)) => limiter.record_failure(&BackendError::Redis(e), true),
            Err(_) => limiter.record_failure(&BackendError::Timeout(STARTUP_WAIT), true),
        }
        if limiter.is_degraded() {
            tracing::warn!(
                redis = %limiter.endpoint,
                reason = %limiter.last_error(),
                "redis not reachable at start-up; node-local limits apply until it answers"
            );
        }
        Ok(limiter)
    }

    /// One check against Redis alone, without the fallback: the decision and Redis' time.
    pub async fn check(
        &self,
        key: &str,
        limit: Limit,
        count: bool,
    ) -> Result<Checked, BackendError> {
        let member = if count {
            format!(
                "{}:{}",
                self.node_tag,
                self.sequence.fetch_add(1, Ordering::Relaxed)
            )
        } else {
            String::new()
        };
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(format!("{}{key}", self.key_prefix))
            .arg(limit.requests)
            .arg(limit.window_ms)
            .arg(if count { 1 } else { 0 })
            .arg(member);
        let mut connection = self.connection.clone();
        // EVALSHA; on NOSCRIPT (a restarted or flushed Redis) the script is loaded again and
        // the call repeated, all within the same time bound.
        let reply: Vec<i64> =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| BackendError::Timeout(self.timeout))??;
        let &[allowed, used, oldest, freeing, now_ms] = reply.as_slice() else {
            return Err(BackendError::BadReply(reply));
        };
        let time = |t: i64| (t >= 0).then_some(t);
        let summary = LogSummary {
            allowed: allowed == 1,
            used: u32::try_from(used).map_err(|_| BackendError::BadReply(reply.clone()))?,
            oldest_ms: time(oldest),
            freeing_ms: time(freeing),
            now_ms,
        };
        Ok(Checked {
            decision: decision_from(summary, limit),
            now_ms,
        })
    }

    /// Checks answered by the node-local limiter since start.
    pub fn fallback_checks(&self) -> u64 {
        self.health.fallback_checks.load(Ordering::Relaxed)
    }

    /// Whether checks are being answered locally now.
    pub fn is_degraded(&self) -> bool {
        self.health.degraded.load(Ordering::Acquire)
    }

    async fn decide(&self, key: &str, limit: Limit, count: bool) -> Decision {
        if self.health.should_try() {
            match self.check(key, limit, count).await {
                Ok(checked) => {
                    self.record_success();
                    return checked.decision;
                }
                Err(e) => self.record_failure(&e, false),
            }
        }
        self.answer_locally(key, limit, count)
    }

    fn answer_locally(&self, key: &str, limit: Limit, count: bool) -> Decision {
        counter!(telemetry::RATE_LIMIT_BACKEND_ERRORS).increment(1);
        self.health.fallback_checks.fetch_add(1, Ordering::Relaxed);
        let unlogged = self
            .health
            .fallback_checks_unlogged
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let now = self.health.now_ms();
        if Health::claim_log(&self.health.last_warning_ms, now) {
            self.health
                .fallback_checks_unlogged
                .fetch_sub(unlogged, Ordering::Relaxed);
            tracing::warn!(
                redis = %self.endpoint,
                checks = unlogged,
                degraded = self.is_degraded(),
                reason = %self.last_error(),
                "redis is not answering; rate limits answered by the node-local limiter"
            );
        }
        self.fallback.decide_now(key, limit, count)
    }

    fn record_success(&self) {
        self.health.consecutive_failures.store(0, Ordering::Release);
        if self.health.degraded.swap(false, Ordering::AcqRel) {
            gauge!(telemetry::RATE_LIMIT_FALLBACK_ACTIVE).set(0.0);
            let now = self.health.now_ms();
            if Health::claim_log(&self.health.last_recovery_log_ms, now) {
                let since = self.health.degraded_since_ms.load(Ordering::Acquire);
                tracing::info!(
                    redis = %self.endpoint,
                    outage_ms = now - since,
                    checks_answered_locally = self.fallback_checks(),
                    "redis answers again; rate limits are shared again"
                );
            }
        }
    }

    /// Notes a failed call; after `TRIP_AFTER` in a row (or at once when `trip`), checks go
    /// to the local limiter until a probe succeeds. The check itself logs, throttled.
    fn record_failure(&self, error: &BackendError, trip: bool) {
        *self.health.last_error.lock().expect("last error") = error.to_string();
        let failures = self
            .health
            .consecutive_failures
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        let now = self.health.now_ms();
        self.health
            .next_probe_ms
            .store(now + PROBE_INTERVAL_MS, Ordering::Release);
        if (trip || failures >= TRIP_AFTER) && !self.health.degraded.swap(true, Ordering::AcqRel) {
            self.health.degraded_since_ms.store(now, Ordering::Release);
            gauge!(telemetry::RATE_LIMIT_FALLBACK_ACTIVE).set(1.0);
        }
    }

    fn last_error(&self) -> String {
        self.health.last_error.lock().expect("last error").clone()
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    async fn acquire(&self, key: &str, limit: Limit) -> Decision {
        self.decide(key, limit, true).await
    }

    async fn peek(&self, key: &str, limit: Limit) -> Decision {
        self.decide(key, limit, false).await
    }

    fn backend(&self) -> &'static str {
        "redis"
    }

    /// Pings Redis within the check timeout (while degraded, only when a probe is due), so
    /// `/readyz` tells the truth even when no lead is arriving.
    async fn healthy(&self) -> Result<(), String> {
        if self.health.should_try() {
            let mut connection = self.connection.clone();
            let ping = ::redis::cmd("PING");
            match tokio::time::timeout(self.timeout, ping.query_async::<String>(&mut connection))
                .await
            {
                Ok(Ok(_)) => {
                    self.record_success();
                    return Ok(());
                }
                Ok(Err(e)) => self.record_failure(&BackendError::Redis(e), false),
                Err(_) => self.record_failure(&BackendError::Timeout(self.timeout), false),
            }
        }
        if self.is_degraded() {
            let since = self.health.degraded_since_ms.load(Ordering::Acquire);
            Err(format!(
                "redis {} unreachable for {} s ({}); node-local limits apply",
                self.endpoint,
                (self.health.now_ms() - since) / 1000,
                self.last_error()
            ))
        } else {
            Err(format!(
                "redis {} did not answer a ping: {}",
                self.endpoint,
                self.last_error()
            ))
        }
    }
}
