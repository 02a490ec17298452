//! The bodies suppliers read, exactly as the supplier document shows them.

use serde::Serialize;

use crate::buyers::WirePrice;
use crate::domain::Price;
use crate::storage::{LeadRecord, LeadStatus};

#[derive(Serialize)]
struct SoldAnswer<'a> {
    success: bool,
    lead_id: &'a str,
    status: &'static str,
    price: WirePrice,
    buyer_ids: &'a [String],
}

#[derive(Serialize)]
struct PendingAnswer<'a> {
    success: bool,
    lead_id: &'a str,
    status: &'static str,
}

/// The `POST /api/leads` success body: `sold` with price and buyers, or `pending`.
pub fn lead_answer(record: &LeadRecord) -> String {
    let result = match record.status {
        LeadStatus::Sold => serde_json::to_string(&SoldAnswer {
            success: true,
            lead_id: &record.lead_id,
            status: "sold",
            price: WirePrice(Price::from_cents(record.price_cents)),
            buyer_ids: &record.buyer_ids,
        }),
        LeadStatus::Pending | LeadStatus::Unsold => serde_json::to_string(&PendingAnswer {
            success: true,
            lead_id: &record.lead_id,
            status: record.status.as_str(),
        }),
    };
    result.expect("answer bodies always serialise")
}

#[derive(Serialize)]
struct StatusAnswer<'a> {
    success: bool,
    lead_id: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<WirePrice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    buyer_ids: Option<&'a [String]>,
    created_at: String,
}

/// The `GET /api/leads/{lead_id}` body; `created_at` is RFC 3339 UTC.
pub fn status_answer(record: &LeadRecord) -> String {
    let sold = record.status == LeadStatus::Sold;
    serde_json::to_string(&StatusAnswer {
        success: true,
        lead_id: &record.lead_id,
        status: record.status.as_str(),
        price: sold.then(|| WirePrice(Price::from_cents(record.price_cents))),
        buyer_ids: sold.then_some(record.buyer_ids.as_slice()),
        created_at: rfc3339_ms(record.created_at_ms),
    })
    .expect("answer bodies always serialise")
}

/// A stored lead's outcome as operators read it.
#[derive(Serialize)]
struct LeadSummary<'a> {
    lead_id: &'a str,
    campaign: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<WirePrice>,
    buyer_ids: &'a [String],
    created_at: String,
}

impl<'a> LeadSummary<'a> {
    fn of(record: &'a LeadRecord) -> LeadSummary<'a> {
        LeadSummary {
            lead_id: &record.lead_id,
            campaign: &record.campaign_id,
            status: record.status.as_str(),
            price: (record.status == LeadStatus::Sold)
                .then(|| WirePrice(Price::from_cents(record.price_cents))),
            buyer_ids: &record.buyer_ids,
            created_at: rfc3339_ms(record.created_at_ms),
        }
    }
}

#[derive(Serialize)]
struct OperatorView<'a> {
    success: bool,
    #[serde(flatten)]
    summary: LeadSummary<'a>,
    supplier_id: &'a str,
    seller: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_retry_at: Option<String>,
    fields: crate::domain::lead::PingFields<'a>,
    auction_log: &'a [crate::storage::AuctionEvent],
}

/// The `GET /ops/leads/{lead_id}` body: the stored lead with its whole auction log (events as
/// stored: bids in cents, latencies in microseconds) and its fields without the personal ones
/// (the standard ones and the campaign's `personal_fields`).
pub fn operator_view(record: &LeadRecord, personal: &[String]) -> String {
    serde_json::to_string(&OperatorView {
        success: true,
        summary: LeadSummary::of(record),
        supplier_id: &record.supplier_id,
        seller: &record.seller,
        next_retry_at: record.next_retry_ms.map(rfc3339_ms),
        fields: crate::domain::lead::PingFields::of(&record.fields, personal),
        auction_log: &record.auction_log,
    })
    .expect("answer bodies always serialise")
}

#[derive(Serialize)]
struct DayListing<'a> {
    success: bool,
    supplier_id: &'a str,
    day: &'a str,
    leads: Vec<LeadSummary<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<&'a str>,
}

/// The `GET /ops/suppliers/{supplier_id}/leads` body: one page of the supplier's leads of
/// `day`, and, when the page is `full`, its last lead id to ask for the next page after.
pub fn operator_day(supplier: &str, day: &str, records: &[LeadRecord], full: bool) -> String {
    serde_json::to_string(&DayListing {
        success: true,
        supplier_id: supplier,
        day,
        leads: records.iter().map(LeadSummary::of).collect(),
        next_after: full
            .then(|| records.last().map(|r| r.lead_id.as_str()))
            .flatten(),
    })
    .expect("answer bodies always serialise")
}

/// `2026-11-25T23:29:17.123Z` from Unix milliseconds (proleptic Gregorian, UTC).
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_217_357_123), "2026-11-20T23:29:17.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
