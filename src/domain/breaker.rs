//! The per-buyer circuit breaker as a pure state machine with injected time: after N
//! consecutive failures the buyer is left alone for a cooldown, then one probe decides.

/// Breaker states; the numbers are the exported metric's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
    pub fn gauge_value(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

/// May a request go to the buyer now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Allowed,
    /// The one request whose outcome closes or re-opens the breaker; it carries when it was
    /// let out, which names it when it is given back unused.
    Probe(i64),
    Denied,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    failures_to_open: u32,
    cooldown_ms: i64,
    state: BreakerState,
    consecutive_failures: u32,
    opened_at_ms: i64,
    /// When the probe in flight was let through (a lost probe is replaced after a cooldown).
    probe_since_ms: Option<i64>,
}

impl Breaker {
    pub fn new(failures_to_open: u32, cooldown_ms: i64) -> Breaker {
        Breaker {
            failures_to_open: failures_to_open.max(1),
            cooldown_ms: cooldown_ms.max(0),
            state: BreakerState::Closed,
            consecutive_failures: 0,
            opened_at_ms: 0,
            probe_since_ms: None,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Asks for a request at `now_ms`; an open breaker past its cooldown lets one probe out.
    pub fn permit(&mut self, now_ms: i64) -> Permit {
        match self.state {
            BreakerState::Closed => Permit::Allowed,
            BreakerState::Open if now_ms - self.opened_at_ms >= self.cooldown_ms => {
                self.state = BreakerState::HalfOpen;
                self.probe_since_ms = Some(now_ms);
                Permit::Probe(now_ms)
            }
            BreakerState::Open => Permit::Denied,
            BreakerState::HalfOpen => match self.probe_since_ms {
                Some(since) if now_ms - since < self.cooldown_ms.max(1) => Permit::Denied,
                _ => {
                    self.probe_since_ms = Some(now_ms);
                    Permit::Probe(now_ms)
                }
            },
        }
    }

    /// The probe let out at `since_ms` (its `Permit::Probe`) was not used (a direct-post buyer
    /// outbid, so never posted to): the next request may probe at once instead of after
    /// another cooldown. Only that probe is given back: one that replaced it meanwhile (it was
    /// held past a cooldown) stays the one in flight.
    pub fn probe_unused(&mut self, since_ms: i64) {
        if self.state == BreakerState::HalfOpen && self.probe_since_ms == Some(since_ms) {
            self.probe_since_ms = None;
        }
    }

    /// Records an answer (`true`) or a timeout/error (`false`); returns the new state when
    /// it changed. While open, late outcomes of requests sent before it opened are ignored:
    /// only the probe decides.
    pub fn record(&mut self, success: bool, now_ms: i64) -> Option<BreakerState> {
        let before = self.state;
        if before == BreakerState::Open {
            return None;
        }
        if success {
            self.consecutive_failures = 0;
            self.state = BreakerState::Closed;
            self.probe_since_ms = None;
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            let trips = match self.state {
                BreakerState::Closed => self.consecutive_failures >= self.failures_to_open,
                BreakerState::HalfOpen => true,
                BreakerState::Open => false,
            };
            if trips {
                self.state = BreakerState::Open;
                self.opened_at_ms = now_ms;
                self.probe_since_ms = None;
            }
        }
        (self.state != before).then_some(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unused_probe_lets_the_next_request_probe_at_once() {
        let mut b = Breaker::new(1, 1000);
        b.record(false, 0);
        assert_eq!(b.permit(1000), Permit::Probe(1000));
        // Another request meanwhile waits for the probe's outcome...
        assert_eq!(b.permit(1001), Permit::Denied);
        // ...unless the probe was never sent.
        b.probe_unused(1000);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.permit(1002), Permit::Probe(1002));
        b.record(true, 1003);
        assert_eq!(b.state(), BreakerState::Closed);
        // Closed, an unused permit changes nothing.
        b.probe_unused(1002);
        assert_eq!(b.permit(1004), Permit::Allowed);
    }

    #[test]
    fn a_probe_given_back_late_does_not_free_the_one_that_replaced_it() {
        let mut b = Breaker::new(1, 100);
        b.record(false, 0);
        assert_eq!(b.permit(100), Permit::Probe(100));
        // Held past a cooldown: replaced by another probe.
        assert_eq!(b.permit(200), Permit::Probe(200));
        // The first comes back unused: the second is still the one in flight.
        b.probe_unused(100);
        assert_eq!(b.permit(201), Permit::Denied, "one probe at a time");
        b.probe_unused(200);
        assert_eq!(b.permit(202), Permit::Probe(202));
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = Breaker::new(3, 1000);
        assert_eq!(b.record(false, 0), None);
        assert_eq!(b.record(false, 1), None);
        assert_eq!(b.record(true, 2), None, "a success resets the count");
        assert_eq!(b.record(false, 3), None);
        assert_eq!(b.record(false, 4), None);
        assert_eq!(b.permit(5), Permit::Allowed);
        assert_eq!(b.record(false, 5), Some(BreakerState::Open));
        assert_eq!(b.permit(6), Permit::Denied);
        assert_eq!(b.permit(1004), Permit::Denied);
    }

    #[test]
    fn cools_down_then_one_probe_closes_it() {
        let mut b = Breaker::new(1, 1000);
        assert_eq!(b.record(false, 0), Some(BreakerState::Open));
        assert_eq!(b.permit(1000), Permit::Probe(1000));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.permit(1001), Permit::Denied, "only one probe at a time");
        assert_eq!(b.record(true, 1050), Some(BreakerState::Closed));
        assert_eq!(b.permit(1051), Permit::Allowed);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cooldown() {
        let mut b = Breaker::new(2, 500);
        b.record(false, 0);
        b.record(false, 10);
        assert_eq!(b.permit(510), Permit::Probe(510));
        assert_eq!(b.record(false, 600), Some(BreakerState::Open));
        assert_eq!(b.permit(1099), Permit::Denied);
        assert_eq!(b.permit(1100), Permit::Probe(1100));
    }

    #[test]
    fn late_outcomes_while_open_change_nothing() {
        let mut b = Breaker::new(1, 1000);
        b.record(false, 0);
        assert_eq!(b.record(true, 10), None);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.permit(500),
            Permit::Denied,
            "the cooldown still runs from the opening"
        );
        assert_eq!(b.permit(1000), Permit::Probe(1000));
    }

    #[test]
    fn a_lost_probe_is_replaced_after_a_cooldown() {
        let mut b = Breaker::new(1, 100);
        b.record(false, 0);
        assert_eq!(b.permit(100), Permit::Probe(100));
        assert_eq!(b.permit(150), Permit::Denied);
        assert_eq!(b.permit(200), Permit::Probe(200));
    }
}
