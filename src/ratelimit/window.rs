//! Sliding-window-log math, pure: a key's counted request times, a limit, and `now` in;
//! the decision and the headers' values out. A true rolling window, not minute buckets.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    pub requests: u32,
    pub window_ms: i64,
}

impl Limit {
    pub fn per_secs(requests: u32, window_secs: u64) -> Limit {
        Limit {
            requests,
            window_ms: (window_secs as i64).saturating_mul(1000),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// When the oldest counted request leaves the window (ms since epoch); `now` when the
    /// window is empty.
    pub reset_at_ms: i64,
    /// For a refusal: how long until a request would be allowed.
    pub retry_after_ms: i64,
}

impl Decision {
    /// `X-RateLimit-Reset`: Unix seconds, rounded up so a client waiting until then is allowed.
    pub fn reset_secs(&self) -> i64 {
        (self.reset_at_ms + 999).div_euclid(1000)
    }
    /// `Retry-After`: whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> i64 {
        ((self.retry_after_ms + 999) / 1000).max(1)
    }
}

/// Drops requests that left the window (those at or before `now - window`).
pub fn expire(log: &mut VecDeque<i64>, now_ms: i64, window_ms: i64) {
    let cutoff = now_ms - window_ms;
    while log.front().is_some_and(|t| *t <= cutoff) {
        log.pop_front();
    }
}

/// What a decision needs to know about a key's log, after expiry and after recording the
/// request when it was counted. The Redis script returns exactly these numbers, so both
/// backends answer through `decision_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSummary {
    pub allowed: bool,
    /// Requests in the window (including this one when it was counted).
    pub used: u32,
    /// Time of the oldest request in the window.
    pub oldest_ms: Option<i64>,
    /// For a refusal: time of the request whose leaving frees a slot (`used - limit` from the
    /// front).
    pub freeing_ms: Option<i64>,
    pub now_ms: i64,
}

/// The headers' values for a summarised log.
pub fn decision_from(summary: LogSummary, limit: Limit) -> Decision {
    let now_ms = summary.now_ms;
    let reset_at_ms = summary.oldest_ms.map_or(now_ms, |t| t + limit.window_ms);
    if summary.allowed {
        Decision {
            allowed: true,
            limit: limit.requests,
            remaining: limit.requests - summary.used.min(limit.requests),
            reset_at_ms,
            retry_after_ms: 0,
        }
    } else {
        let freeing = summary.freeing_ms.or(summary.oldest_ms).unwrap_or(now_ms);
        Decision {
            allowed: false,
            limit: limit.requests,
            remaining: 0,
            reset_at_ms,
            retry_after_ms: (freeing + limit.window_ms - now_ms).max(1),
        }
    }
}

/// Decides one request; when `count` and allowed, records it in `log`.
pub fn decide(log: &mut VecDeque<i64>, now_ms: i64, limit: Limit, count: bool) -> Decision {
    expire(log, now_ms, limit.window_ms);
    let allowed = (log.len() as u32) < limit.requests;
    if allowed && count {
        // Clocks can step back; keep the log sorted so expiry stays a front pop.
        let at = log.back().map_or(now_ms, |last| now_ms.max(*last));
        log.push_back(at);
    }
    let used = log.len() as u32;
    let freeing_ms = if allowed {
        None
    } else {
        // The request that frees a slot is the one `used - requests` from the front.
        log.get((used - limit.requests) as usize).copied()
    };
    decision_from(
        LogSummary {
            allowed,
            used,
            oldest_ms: log.front().copied(),
            freeing_ms,
            now_ms,
        },
        limit,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        requests: 3,
        window_ms: 60_000,
    };

    #[test]
    fn counts_up_to_the_limit_then_refuses() {
        let mut log = VecDeque::new();
        let a = decide(&mut log, 1_000, LIMIT, true);
        assert!(a.allowed && a.remaining == 2 && a.reset_at_ms == 61_000);
        decide(&mut log, 2_000, LIMIT, true);
        let c = decide(&mut log, 3_000, LIMIT, true);
        assert!(c.allowed && c.remaining == 0);
        let refused = decide(&mut log, 4_000, LIMIT, true);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 57_000);
        assert_eq!(log.len(), 3, "refused requests are not counted");
    }

    #[test]
    fn the_window_rolls_instead_of_resetting() {
        let mut log = VecDeque::new();
        for t in [0, 30_000, 59_000] {
            assert!(decide(&mut log, t, LIMIT, true).allowed);
        }
        assert!(!decide(&mut log, 59_999, LIMIT, true).allowed);
        // Exactly one window after the first request, it leaves; the others stay.
        let d = decide(&mut log, 60_000, LIMIT, true);
        assert!(d.allowed && d.remaining == 0);
        assert!(!decide(&mut log, 60_001, LIMIT, true).allowed);
        assert!(decide(&mut log, 90_000, LIMIT, true).allowed);
    }

    #[test]
    fn peeking_does_not_count() {
        let mut log = VecDeque::new();
        for _ in 0..10 {
            assert!(decide(&mut log, 5, LIMIT, false).allowed);
        }
        assert!(log.is_empty());
    }

    #[test]
    fn header_rounding() {
        let d = Decision {
            allowed: false,
            limit: 1,
            remaining: 0,
            reset_at_ms: 1_500,
            retry_after_ms: 1,
        };
        assert_eq!((d.reset_secs(), d.retry_after_secs()), (2, 1));
        let d = Decision {
            retry_after_ms: 2_001,
            ..d
        };
        assert_eq!(d.retry_after_secs(), 3);
    }
}
