//! Supplier webhooks: when a pending lead is later sold or given up, the supplier's
//! `webhook_url` gets a POST signed with `X-Leadex-Signature: sha256=<hex HMAC-SHA256 of the
//! body>`. Body, signature and retry schedule are pure; `WebhookSender` does the I/O, retrying
//! a bounded number of times in the background (retries are not kept over a restart).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use metrics::counter;
use serde::Serialize;
use sha2::Sha256;

use crate::buyers::WirePrice;
use crate::domain::Price;
use crate::http::dto::rfc3339_ms;
use crate::storage::{LeadRecord, LeadStatus};
use crate::telemetry;

pub const SIGNATURE_HEADER: &str = "x-leadex-signature";
pub const EVENT_HEADER: &str = "x-leadex-event";

/// Tries of one webhook call, the first included.
pub const MAX_ATTEMPTS: u32 = 6;

#[derive(Serialize)]
struct WebhookBody<'a> {
    event: &'static str,
    lead_id: &'a str,
    campaign: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<WirePrice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    buyer_ids: Option<&'a [String]>,
    created_at: String,
}

/// `lead.sold` or `lead.unsold`.
pub fn event_of(record: &LeadRecord) -> &'static str {
    match record.status {
        LeadStatus::Sold => "lead.sold",
        LeadStatus::Unsold => "lead.unsold",
        LeadStatus::Pending => "lead.pending",
    }
}

/// The JSON body sent for a lead's new status.
pub fn body(record: &LeadRecord) -> Vec<u8> {
    let sold = record.status == LeadStatus::Sold;
    serde_json::to_vec(&WebhookBody {
        event: event_of(record),
        lead_id: &record.lead_id,
        campaign: &record.campaign_id,
        status: record.status.as_str(),
        price: sold.then(|| WirePrice(Price::from_cents(record.price_cents))),
        buyer_ids: sold.then_some(record.buyer_ids.as_slice()),
        created_at: rfc3339_ms(record.created_at_ms),
    })
    .expect("webhook bodies always serialise")
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait before try `attempt` (1-based; the first try does not wait), or `None` once the
/// tries are used up: 1 s, 2 s, 4 s, 8 s, 16 s.
pub fn retry_delay(attempt: u32) -> Option<Duration> {
    match attempt {
        0 | 1 => Some(Duration::ZERO),
        n if n <= MAX_ATTEMPTS => Some(Duration::from_secs(1 << (n - 2))),
        _ => None,
    }
}

#[derive(Clone)]
pub struct WebhookTarget {
    pub url: String,
    pub secret: String,
}

/// Sends webhooks for suppliers that configured one.
#[derive(Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    targets: Arc<HashMap<String, WebhookTarget>>,
}

impl WebhookSender {
    pub fn new(targets: HashMap<String, WebhookTarget>) -> WebhookSender {
        WebhookSender {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .connect_timeout(Duration::from_secs(3))
                .user_agent(concat!("leadex/", env!("CARGO_PKG_VERSION")))
                // A 3xx is a failed delivery, retried like any other: the signed body goes
                // only to the `webhook_url` in the config.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a plain HTTP client builds"),
            targets: Arc::new(targets),
        }
    }

    /// Starts delivering the lead's new status to its supplier, if it has a webhook; returns
    /// at once.
    pub fn notify(&self, record: &LeadRecord) {
        let Some(target) = self.targets.get(&record.supplier_id).cloned() else {
            return;
        };
        let body = body(record);
        let signature = signature(&target.secret, &body);
        let event = event_of(record);
        let lead_id = record.lead_id.clone();
        let client = self.client.clone();
        tokio::spawn(async move {
            for attempt in 1..=MAX_ATTEMPTS {
                let Some(wait) = retry_delay(attempt) else {
                    break;
                };
                tokio::time::sleep(wait).await;
                let sent = client
                    .post(&target.url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(SIGNATURE_HEADER, &signature)
                    .header(EVENT_HEADER, event)
                    .body(body.clone())
                    .send()
                    .await;
                let delivered = matches!(&sent, Ok(r) if r.status().is_success());
                if delivered {
                    counter!(telemetry::WEBHOOKS_TOTAL, "outcome" => "delivered").increment(1);
                    tracing::info!(lead_id = %lead_id, event, attempt, "webhook delivered");
                    return;
                }
                let why = match sent {
                    Ok(r) => format!("status {}", r.status().as_u16()),
                    Err(e) => telemetry::error_chain(&e),
                };
                if attempt < MAX_ATTEMPTS {
                    counter!(telemetry::WEBHOOKS_TOTAL, "outcome" => "retry").increment(1);
                    tracing::info!(lead_id = %lead_id, event, attempt, why, "webhook failed, will retry");
                } else {
                    counter!(telemetry::WEBHOOKS_TOTAL, "outcome" => "failed").increment(1);
                    tracing::warn!(lead_id = %lead_id, event, attempt, why, "webhook given up");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn retries_are_bounded_and_back_off() {
        let waits: Vec<_> = (1..=7).map(retry_delay).collect();
        assert_eq!(waits[0], Some(Duration::ZERO));
        assert_eq!(waits[1], Some(Duration::from_secs(1)));
        assert_eq!(waits[5], Some(Duration::from_secs(16)));
        assert_eq!(waits[6], None);
    }

    #[test]
    fn body_names_the_event_and_the_sale() {
        let record = LeadRecord {
            lead_id: "L1".into(),
            supplier_id: "s".into(),
            seller: "ACME1234".into(),
            campaign_id: "c".into(),
            created_at_ms: 0,
            status: LeadStatus::Sold,
            price_cents: 1250,
            buyer_ids: vec!["b".into()],
            fields: Default::default(),
            auction_log: vec![],
            next_retry_ms: None,
        };
        let text = String::from_utf8(body(&record)).unwrap();
        assert_eq!(
            text,
            r#"{"event":"lead.sold","lead_id":"L1","campaign":"c","status":"sold","price":12.50,"buyer_ids":["b"],"created_at":"1970-01-01T00:00:00.000Z"}"#
        );
        let unsold = LeadRecord {
            status: LeadStatus::Unsold,
            ..record
        };
        let text = String::from_utf8(body(&unsold)).unwrap();
        assert!(
            text.starts_with(r#"{"event":"lead.unsold""#) && !text.contains("price"),
            "{text}"
        );
    }
}
