//! A campaign's marketplace rules as data, and the pure decisions on them: which buyers may
//! see a lead now (filters, schedule), which leads are duplicates, when a pending lead is
//! auctioned again or given up.

use jiff::tz::TimeZone;

use super::caps::CapRules;
use super::filters::{FilterMiss, LeadFilter};
use super::lead::Lead;
use super::schedule::Schedule;

/// What a buyer asks before it is pinged, besides its floor.
#[derive(Debug, Clone)]
pub struct BuyerRules {
    pub filter: LeadFilter,
    pub schedule: Option<Schedule>,
    pub caps: CapRules,
    pub timezone: TimeZone,
}

impl Default for BuyerRules {
    fn default() -> Self {
        BuyerRules {
            filter: LeadFilter::default(),
            schedule: None,
            caps: CapRules {
                hourly_cap: None,
                daily_cap: None,
                daily_budget: None,
            },
            timezone: TimeZone::UTC,
        }
    }
}

/// Why a buyer was left out of an auction. The words are metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Filtered,
    OutsideSchedule,
    Capped,
    /// The buyer has caps and the coordinator could not tell whether they have room.
    CapsUnavailable,
    BreakerOpen,
}

impl SkipReason {
    pub const ALL: [SkipReason; 5] = [
        SkipReason::Filtered,
        SkipReason::OutsideSchedule,
        SkipReason::Capped,
        SkipReason::CapsUnavailable,
        SkipReason::BreakerOpen,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Filtered => "filtered",
            SkipReason::OutsideSchedule => "outside_schedule",
            SkipReason::Capped => "capped",
            SkipReason::CapsUnavailable => "caps_unavailable",
            SkipReason::BreakerOpen => "breaker_open",
        }
    }
}

impl BuyerRules {
    /// The pure part of eligibility: filters, then the schedule in the buyer's time zone.
    pub fn admits(&self, lead: &Lead, now_ms: i64) -> Result<(), (SkipReason, Option<FilterMiss>)> {
        self.filter
            .check(&lead.fields)
            .map_err(|miss| (SkipReason::Filtered, Some(miss)))?;
        if let Some(schedule) = &self.schedule
            && !schedule.is_open(&self.timezone, now_ms)
        {
            return Err((SkipReason::OutsideSchedule, None));
        }
        Ok(())
    }
}

/// The claims that make a lead a duplicate within a campaign: its phone, and its email when
/// present. A lead is a duplicate when any of them is already held.
pub fn dedupe_keys(campaign: &str, lead: &Lead) -> Vec<String> {
    let mut keys = vec![format!("dedupe/{campaign}/phone/{}", lead.phone.as_str())];
    if let Some(email) = &lead.email {
        keys.push(format!("dedupe/{campaign}/email/{}", email.as_str()));
    }
    keys
}

/// How a campaign retries its pending leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingPolicy {
    pub ttl_ms: i64,
    pub retry_interval_ms: i64,
}

/// What to do with a pending lead after an attempt (or when it comes due).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingNext {
    RetryAt(i64),
    GiveUp,
}

impl PendingPolicy {
    /// When a lead first answered pending is due again.
    pub fn first_retry(&self, created_ms: i64) -> i64 {
        (created_ms + self.retry_interval_ms).min(created_ms + self.ttl_ms)
    }

    /// Whether a due lead is still worth an auction at `now_ms`.
    pub fn expired(&self, created_ms: i64, now_ms: i64) -> bool {
        now_ms >= created_ms + self.ttl_ms
    }

    /// After an unsold attempt at `now_ms`: the next try, never later than the TTL's end, so
    /// the lead turns unsold on time.
    pub fn after_unsold_attempt(&self, created_ms: i64, now_ms: i64) -> PendingNext {
        let deadline = created_ms + self.ttl_ms;
        if now_ms >= deadline {
            PendingNext::GiveUp
        } else {
            PendingNext::RetryAt((now_ms + self.retry_interval_ms).min(deadline))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::FieldMap;
    use crate::domain::filters::FieldFilter;
    use serde_json::json;

    fn lead(value: serde_json::Value) -> Lead {
        let fields: FieldMap = serde_json::from_value(value).unwrap();
        Lead::parse(fields, &[]).unwrap()
    }

    fn base() -> serde_json::Value {
        json!({"seller": "ACME1234", "category": "Auto", "firstName": "A", "lastName": "B",
               "phone": "+1 (555) 123-4567", "state": "tx", "email": "A@B.CO", "creditScore": "650"})
    }

    #[test]
    fn dedupe_keys_use_normalised_phone_and_email() {
        let keys = dedupe_keys("c1", &lead(base()));
        assert_eq!(
            keys,
            vec!["dedupe/c1/phone/5551234567", "dedupe/c1/email/a@b.co"]
        );
        let mut no_email = base();
        no_email.as_object_mut().unwrap().remove("email");
        assert_eq!(dedupe_keys("c1", &lead(no_email)).len(), 1);
    }

    #[test]
    fn filters_then_schedule() {
        let mut rules = BuyerRules::default();
        let now = 1_795_590_000_000; // Wednesday 2026-11-25, 07:00 UTC
        assert_eq!(rules.admits(&lead(base()), now), Ok(()));
        rules.filter.fields.push(FieldFilter {
            field: "creditScore".into(),
            min: Some(700.0),
            ..FieldFilter::default()
        });
        assert_eq!(
            rules.admits(&lead(base()), now),
            Err((SkipReason::Filtered, Some(FilterMiss::Field(0))))
        );
        rules.filter.fields.clear();
        rules.schedule = Some(Schedule::parse(&["mon-fri 09:00-17:00"]).unwrap());
        assert_eq!(
            rules.admits(&lead(base()), now),
            Err((SkipReason::OutsideSchedule, None))
        );
        rules.timezone = TimeZone::get("Asia/Tokyo").unwrap(); // 16:00 there
        assert_eq!(rules.admits(&lead(base()), now), Ok(()));
    }

    #[test]
    fn pending_retries_until_the_ttl_then_gives_up() {
        let p = PendingPolicy {
            ttl_ms: 10_000,
            retry_interval_ms: 4_000,
        };
        assert_eq!(p.first_retry(0), 4_000);
        assert_eq!(
            p.after_unsold_attempt(0, 4_000),
            PendingNext::RetryAt(8_000)
        );
        assert_eq!(
            p.after_unsold_attempt(0, 8_000),
            PendingNext::RetryAt(10_000)
        );
        assert_eq!(p.after_unsold_attempt(0, 10_000), PendingNext::GiveUp);
        assert!(!p.expired(0, 9_999) && p.expired(0, 10_000));
        let short = PendingPolicy {
            ttl_ms: 1_000,
            retry_interval_ms: 5_000,
        };
        assert_eq!(short.first_retry(0), 1_000);
    }
}
