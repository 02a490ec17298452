//! Rate limiting: the pure window math, and the limiter backends behind one trait so the
//! HTTP layer never knows which one runs.

pub mod memory;
pub mod redis;
pub mod window;

use std::sync::Arc;

use async_trait::async_trait;

pub use self::redis::{RedisLimiter, RedisSettings};
pub use memory::MemoryLimiter;
pub use window::{Decision, Limit};

use crate::config::RateLimitConfig;

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Decides a request and counts it when allowed.
    async fn acquire(&self, key: &str, limit: Limit) -> Decision;
    /// Decides without counting (used before verifying a key, for failed-auth limiting).
    async fn peek(&self, key: &str, limit: Limit) -> Decision;
    /// `memory` or the shared backend's name, for logs and `/readyz`.
    fn backend(&self) -> &'static str;
    /// `Err` with why when the limiter runs degraded (its shared backend is unreachable).
    async fn healthy(&self) -> Result<(), String>;
}

/// Wall-clock milliseconds that advance with tokio's clock, so tests can pause and advance
/// time while the values stay real Unix times for the headers. Windows are measured on it, so
/// a step of the wall clock (NTP setting it) does not stretch or shrink them.
#[derive(Clone)]
pub struct Clock {
    anchor_ms: i64,
    anchor: tokio::time::Instant,
    /// A live clock's wall clock (`wall_step_ms`); none for tests that pause time.
    wall: Option<Arc<dyn Fn() -> i64 + Send + Sync>>,
}

/// A wall clock this far from a `Clock` has been stepped since the clock started; less is the
/// two clocks' reading apart, within the headers' whole seconds.
const WALL_STEP_MS: i64 = 1_000;

impl Clock {
    /// Anchored once, to pause and advance with tokio's time in tests.
    pub fn tokio() -> Clock {
        Clock {
            anchor_ms: crate::clock::now_ms(),
            anchor: tokio::time::Instant::now(),
            wall: None,
        }
    }

    /// A running node's clock: as `tokio`, and the reset times it gives for the headers follow
    /// the system's wall clock when that is stepped after start.
    pub fn live() -> Clock {
        Clock::with_wall(Arc::new(crate::clock::now_ms))
    }

    /// As `live`, with `wall` as the wall clock.
    pub fn with_wall(wall: Arc<dyn Fn() -> i64 + Send + Sync>) -> Clock {
        Clock {
            wall: Some(wall),
            ..Clock::tokio()
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.anchor_ms + self.anchor.elapsed().as_millis() as i64
    }

    /// How far the wall clock has been stepped since this clock started (0 for a step under
    /// a second, and for a clock without a wall clock): what turns one of its times into a
    /// Unix time for `X-RateLimit-Reset`.
    pub fn wall_step_ms(&self) -> i64 {
        match &self.wall {
            Some(wall) => {
                let step = wall() - self.now_ms();
                if step.abs() >= WALL_STEP_MS { step } else { 0 }
            }
            None => 0,
        }
    }
}

pub type SharedLimiter = Arc<dyn RateLimiter>;

/// The limiter `[rate_limit]` asks for. A Redis that cannot be reached is not an error here:
/// that limiter starts degraded and connects when Redis answers.
pub async fn from_config(config: &RateLimitConfig) -> Result<SharedLimiter, String> {
    match config.backend.as_str() {
        "memory" => Ok(Arc::new(MemoryLimiter::new(Clock::live()))),
        "redis" => {
            let settings = RedisSettings {
                url: config
                    .url
                    .clone()
                    .ok_or("rate_limit.url: backend `redis` needs a url")?,
                key_prefix: config.key_prefix.clone(),
                timeout: std::time::Duration::from_millis(config.timeout_ms),
            };
            Ok(Arc::new(
                RedisLimiter::connect(settings, Clock::live()).await?,
            ))
        }
        other => Err(format!("rate_limit.backend: unknown backend `{other}`")),
    }
}
