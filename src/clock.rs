//! The one place that reads the wall clock, so pure code can take `now` as an argument. A
//! `Clock` is handed to the parts that decide by time (caps, schedules, dedupe, pending
//! retries, breakers); tests may hand a manual one and move it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where the marketplace rules read the time.
#[derive(Clone, Default)]
pub enum Clock {
    #[default]
    System,
    /// Set by hand (tests): stands still until moved.
    Manual(Arc<AtomicI64>),
}

impl Clock {
    pub fn system() -> Clock {
        Clock::System
    }

    /// A clock standing at `start_ms` until `set_ms` or `advance_ms` moves it.
    pub fn manual(start_ms: i64) -> Clock {
        Clock::Manual(Arc::new(AtomicI64::new(start_ms)))
    }

    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => now_ms(),
            Clock::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }

    /// Moves a manual clock; a system clock cannot be moved and ignores it.
    pub fn set_ms(&self, ms: i64) {
        if let Clock::Manual(now) = self {
            now.store(ms, Ordering::SeqCst);
        }
    }

    pub fn advance_ms(&self, by: i64) {
        if let Clock::Manual(now) = self {
            now.fetch_add(by, Ordering::SeqCst);
        }
    }
}
