//! Buyer caps and budgets as pure window math: which local hour and local day an instant falls
//! in for the buyer's time zone (DST-correct: a local day may last 23 or 25 hours), and the
//! bounded counters a sale must fit in. Counting itself is the coordinator's job.

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::money::Price;

/// A half-open span of Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

const HOUR_MS: i64 = 3_600_000;

/// The local clock hour holding `now_ms`: from the top of the hour to the next one. In the
/// repeated hour of a fall-back change each pass is its own hour.
pub fn hour_window(tz: &TimeZone, now_ms: i64) -> Window {
    let offset_ms = Timestamp::from_millisecond(now_ms)
        .map(|ts| i64::from(tz.to_offset(ts).seconds()) * 1000)
        .unwrap_or(0);
    let local = now_ms + offset_ms;
    let start_ms = local.div_euclid(HOUR_MS) * HOUR_MS - offset_ms;
    Window {
        start_ms,
        end_ms: start_ms + HOUR_MS,
    }
}

/// The local calendar day holding `now_ms`, from local midnight to the next local midnight
/// (or the first instant of the day where midnight itself is skipped).
pub fn day_window(tz: &TimeZone, now_ms: i64) -> Window {
    let fallback = Window {
        start_ms: now_ms.div_euclid(86_400_000) * 86_400_000,
        end_ms: now_ms.div_euclid(86_400_000) * 86_400_000 + 86_400_000,
    };
    let Ok(now) = Timestamp::from_millisecond(now_ms) else {
        return fallback;
    };
    let date = now.to_zoned_datetime(tz.clone()).date();
    let midnight = |d: jiff::civil::Date| {
        d.at(0, 0, 0, 0)
            .to_zoned_datetime(tz.clone())
            .map(|z| z.timestamp().as_millisecond())
    };
    match (midnight(date), date.tomorrow().map(midnight)) {
        (Ok(start_ms), Ok(Ok(end_ms))) => Window { start_ms, end_ms },
        _ => fallback,
    }
}

/// A buyer's limits; `None` means no limit of that kind.
#[derive(Debug, Clone, PartialEq)]
pub struct CapRules {
    pub hourly_cap: Option<u32>,
    pub daily_cap: Option<u32>,
    pub daily_budget: Option<Price>,
}

impl CapRules {
    pub fn is_limited(&self) -> bool {
        self.hourly_cap.is_some() || self.daily_cap.is_some() || self.daily_budget.is_some()
    }
}

/// One bounded counter a sale must fit in: add `amount` unless the total would pass `limit`.
/// The key names the buyer, the kind and the window, so a new window is a new counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterCheck {
    pub key: String,
    pub limit: i64,
    pub amount: i64,
    /// After this the counter's window is over and it may be forgotten.
    pub expires_at_ms: i64,
}

/// The counters a sale of `price` to `buyer` at `now_ms` must fit in. Empty when the buyer
/// has no caps.
pub fn counter_checks(
    buyer: &str,
    rules: &CapRules,
    tz: &TimeZone,
    now_ms: i64,
    price: Price,
) -> Vec<CounterCheck> {
    let mut checks = Vec::new();
    if let Some(cap) = rules.hourly_cap {
        let hour = hour_window(tz, now_ms);
        checks.push(CounterCheck {
            key: format!("cap/{buyer}/hour/{}", hour.start_ms),
            limit: i64::from(cap),
            amount: 1,
            expires_at_ms: hour.end_ms,
        });
    }
    if rules.daily_cap.is_some() || rules.daily_budget.is_some() {
        let day = day_window(tz, now_ms);
        if let Some(cap) = rules.daily_cap {
            checks.push(CounterCheck {
                key: format!("cap/{buyer}/day/{}", day.start_ms),
                limit: i64::from(cap),
                amount: 1,
                expires_at_ms: day.end_ms,
            });
        }
        if let Some(budget) = rules.daily_budget {
            checks.push(CounterCheck {
                key: format!("budget/{buyer}/day/{}", day.start_ms),
                limit: budget.cents(),
                amount: price.cents(),
                expires_at_ms: day.end_ms,
            });
        }
    }
    checks
}

/// Whether `checks` all fit given the counters' current values (same order).
pub fn fits(checks: &[CounterCheck], current: &[i64]) -> bool {
    checks
        .iter()
        .zip(current)
        .all(|(check, value)| value + check.amount <= check.limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn ms(tz: &str, y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        date(y, mo, d)
            .at(h, mi, 0, 0)
            .to_zoned_datetime(TimeZone::get(tz).unwrap())
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    fn utc(y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        ms("UTC", y, mo, d, h, mi)
    }

    #[test]
    fn the_day_turns_at_the_buyers_midnight_not_utcs() {
        let ny = TimeZone::get("America/New_York").unwrap();
        // 23:50 UTC on Nov 25 is 18:50 in New York; 00:10 UTC Nov 26 is still Nov 25 there.
        let before = day_window(&ny, utc(2026, 11, 25, 23, 50));
        let after_utc_midnight = day_window(&ny, utc(2026, 11, 26, 0, 10));
        assert_eq!(before, after_utc_midnight);
        assert_eq!(before.start_ms, ms("America/New_York", 2026, 11, 25, 0, 0));
        assert_eq!(before.end_ms, utc(2026, 11, 26, 5, 0));
        let next = day_window(&ny, ms("America/New_York", 2026, 11, 26, 0, 0));
        assert_eq!(next.start_ms, before.end_ms);
        let last_ms = day_window(&ny, before.end_ms - 1);
        assert_eq!(last_ms, before);
    }

    #[test]
    fn dst_days_are_23_and_25_hours_long() {
        let ny = TimeZone::get("America/New_York").unwrap();
        let spring = day_window(&ny, ms("America/New_York", 2026, 3, 8, 12, 0));
        assert_eq!(spring.end_ms - spring.start_ms, 23 * HOUR_MS);
        let autumn = day_window(&ny, ms("America/New_York", 2026, 11, 1, 12, 0));
        assert_eq!(autumn.end_ms - autumn.start_ms, 25 * HOUR_MS);
        // A zone whose clocks skip midnight itself: the day starts at 01:00.
        let havana = TimeZone::get("America/Havana").unwrap();
        let skipped = day_window(&havana, ms("America/Havana", 2026, 3, 8, 12, 0));
        assert_eq!(skipped.start_ms, ms("America/Havana", 2026, 3, 8, 1, 0));
    }

    #[test]
    fn hours_follow_local_tops_of_hours_across_dst() {
        let ny = TimeZone::get("America/New_York").unwrap();
        // Fall back: 01:00-02:00 happens twice (EDT then EST); each pass is its own hour.
        let first = hour_window(&ny, utc(2026, 11, 1, 5, 30));
        let second = hour_window(&ny, utc(2026, 11, 1, 6, 30));
        assert_eq!(
            first,
            Window {
                start_ms: utc(2026, 11, 1, 5, 0),
                end_ms: utc(2026, 11, 1, 6, 0)
            }
        );
        assert_eq!(second.start_ms, first.end_ms);
        // Spring forward: 01:59 EST is followed by 03:00 EDT.
        let before = hour_window(&ny, utc(2026, 3, 8, 6, 59));
        let after = hour_window(&ny, utc(2026, 3, 8, 7, 0));
        assert_eq!(before.end_ms, after.start_ms);
        // Half-hour zones: the top of the local hour is at :30 UTC.
        let kolkata = TimeZone::get("Asia/Kolkata").unwrap();
        let h = hour_window(&kolkata, utc(2026, 11, 25, 10, 45));
        assert_eq!(h.start_ms, utc(2026, 11, 25, 10, 30));
    }

    #[test]
    fn checks_name_windows_and_fit_exactly() {
        let rules = CapRules {
            hourly_cap: Some(3),
            daily_cap: Some(10),
            daily_budget: Some(Price::from_cents(10_000)),
        };
        let now = utc(2026, 11, 25, 12, 34);
        let checks = counter_checks("b", &rules, &TimeZone::UTC, now, Price::from_cents(2500));
        let keys: Vec<_> = checks.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                format!("cap/b/hour/{}", utc(2026, 11, 25, 12, 0)),
                format!("cap/b/day/{}", utc(2026, 11, 25, 0, 0)),
                format!("budget/b/day/{}", utc(2026, 11, 25, 0, 0)),
            ]
        );
        assert_eq!(checks[2].amount, 2500);
        assert!(fits(&checks, &[2, 9, 7500]));
        assert!(!fits(&checks, &[3, 0, 0]), "hourly cap reached");
        assert!(!fits(&checks, &[0, 10, 0]), "daily cap reached");
        assert!(
            !fits(&checks, &[0, 0, 7501]),
            "the budget would be passed by one cent"
        );
        let none = CapRules {
            hourly_cap: None,
            daily_cap: None,
            daily_budget: None,
        };
        assert!(counter_checks("b", &none, &TimeZone::UTC, now, Price::ZERO).is_empty());
        // The next local day is a new counter.
        let tomorrow = counter_checks(
            "b",
            &rules,
            &TimeZone::UTC,
            utc(2026, 11, 26, 0, 0),
            Price::ZERO,
        );
        assert_ne!(tomorrow[1].key, checks[1].key);
    }
}
