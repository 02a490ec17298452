//! Durable storage of leads, their outcomes and auction logs, behind one trait so the
//! embedded single-node store and a cluster store are interchangeable. A write returns only
//! once it is durable.

pub mod embedded;
mod priority;
pub mod scylla;
pub mod spill;
pub mod wal;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::FieldMap;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("storage is closed")]
    Closed,
    #[error("stored record is unreadable: {0}")]
    Corrupt(String),
    /// The cluster lacks tables this build needs (`leadex migrate` creates them).
    #[error("{0}")]
    SchemaMissing(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeadStatus {
    Sold,
    Pending,
    /// A pending lead whose retry period ended without a sale.
    Unsold,
}

impl LeadStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LeadStatus::Sold => "sold",
            LeadStatus::Pending => "pending",
            LeadStatus::Unsold => "unsold",
        }
    }
}

/// One line of a lead's auction log: what each buyer was asked, answered and paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuctionEvent {
    Ping {
        buyer: String,
        /// `bid` or the reason there was none (a `PING_OUTCOMES` word).
        outcome: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bid_cents: Option<i64>,
        latency_us: u64,
    },
    /// A direct-post buyer's fixed price entering the auction.
    Direct { buyer: String, bid_cents: i64 },
    /// A bid that did not count: `under_campaign_floor`, `under_buyer_floor`, `zero_bid`.
    Dropped {
        buyer: String,
        bid_cents: i64,
        reason: String,
    },
    /// A buyer left out: `filtered`, `outside_schedule`, `capped`, `caps_unavailable` or `breaker_open`.
    Skipped { buyer: String, reason: String },
    Post {
        buyer: String,
        price_cents: i64,
        /// `accepted` or why not (a `POST_OUTCOMES` word).
        outcome: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        latency_us: u64,
    },
}

/// A lead as stored: who sent it, the fields as sent (normalised), and what happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeadRecord {
    pub lead_id: String,
    pub supplier_id: String,
    pub seller: String,
    pub campaign_id: String,
    pub created_at_ms: i64,
    pub status: LeadStatus,
    pub price_cents: i64,
    pub buyer_ids: Vec<String>,
    pub fields: FieldMap,
    pub auction_log: Vec<AuctionEvent>,
    /// When a pending lead is due for its next auction; `None` when it is not queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_ms: Option<i64>,
}

impl LeadRecord {
    /// The record with an empty auction log.
    pub fn without_log(mut self) -> LeadRecord {
        self.auction_log = Vec::new();
        self
    }

    /// A copy of the record's outcome and fields, without its auction log (not copied).
    pub fn head(&self) -> LeadRecord {
        LeadRecord {
            lead_id: self.lead_id.clone(),
            supplier_id: self.supplier_id.clone(),
            seller: self.seller.clone(),
            campaign_id: self.campaign_id.clone(),
            created_at_ms: self.created_at_ms,
            status: self.status,
            price_cents: self.price_cents,
            buyer_ids: self.buyer_ids.clone(),
            fields: self.fields.clone(),
            auction_log: Vec::new(),
            next_retry_ms: self.next_retry_ms,
        }
    }

    /// Whether the lead waits for an auction again at `now_ms`: pending, queued, and its next
    /// try not in the future. A re-auction reads the lead again once it holds the lease and
    /// goes on only if this still holds, since another node (or a tick before) may have
    /// auctioned it since it was listed.
    pub fn due_at(&self, now_ms: i64) -> bool {
        self.status == LeadStatus::Pending && self.next_retry_ms.is_some_and(|at| at <= now_ms)
    }
}

/// The whole log once a re-auction's `added` events are stored after `stored`, the log it
/// read being `from` events long (see `LeadStore::append_lead`), and how many of its events
/// were stored already.
pub fn appended_log(
    mut stored: Vec<AuctionEvent>,
    from: usize,
    added: Vec<AuctionEvent>,
) -> (Vec<AuctionEvent>, usize) {
    let kept = stored.len();
    let repeat = !added.is_empty() && kept == from + added.len() && stored[from..] == added[..];
    if !repeat {
        stored.extend(added);
    }
    (stored, kept)
}

/// The answer given for an `Idempotency-Key`, kept so a repeat gets it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotentAnswer {
    pub lead_id: String,
    /// The JSON body that was answered.
    pub body: String,
    pub created_at_ms: i64,
}

/// How long idempotency answers are kept.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 60 * 60 * 1000;

#[async_trait]
pub trait LeadStore: Send + Sync + 'static {
    /// Stores a new lead with its outcome and auction log, and the idempotency answer when the
    /// supplier sent a key; returns once all of it is durable.
    async fn insert_lead(
        &self,
        record: Arc<LeadRecord>,
        idempotency: Option<(String, IdempotentAnswer)>,
    ) -> Result<(), StorageError>;

    async fn get_lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError>;

    /// The lead with an empty `auction_log`: what a supplier's status read, an Idempotency-Key
    /// replay's check and a webhook's check use. A pending lead's log grows with every
    /// re-auction; a store that keeps it apart reads the record only.
    async fn get_lead_without_log(
        &self,
        lead_id: &str,
    ) -> Result<Option<LeadRecord>, StorageError> {
        Ok(self.get_lead(lead_id).await?.map(LeadRecord::without_log))
    }

    /// Replaces a stored lead (a re-auction's outcome) and moves it in or out of the pending
    /// queue according to `next_retry_ms`; returns once durable.
    async fn update_lead(&self, record: LeadRecord) -> Result<(), StorageError>;

    /// The lead without its auction log, and how many events that log holds: what a
    /// re-auction reads under its lease, as it only adds events after the stored ones.
    async fn get_lead_for_reauction(
        &self,
        lead_id: &str,
    ) -> Result<Option<(LeadRecord, usize)>, StorageError> {
        Ok(self.get_lead(lead_id).await?.map(|record| {
            let len = record.auction_log.len();
            (record.without_log(), len)
        }))
    }

    /// Stores a re-auction's outcome: `record` as it now is, with in `auction_log` only the
    /// events that auction added, which go after the `stored_log_len` events it found
    /// stored; returns once durable. A backend that keeps the log as rows writes only the new
    /// ones, so a lead auctioned every minute for a day does not rewrite its whole log each
    /// time. Safe to repeat (a spilled sale replayed after a crash): events stored already
    /// at `stored_log_len` are not added again. When the stored log is not `stored_log_len`
    /// long the events go after it, whatever it holds, so none is lost.
    async fn append_lead(
        &self,
        record: LeadRecord,
        stored_log_len: usize,
    ) -> Result<(), StorageError> {
        let stored = self
            .get_lead(&record.lead_id)
            .await?
            .map(|stored| stored.auction_log)
            .unwrap_or_default();
        let (auction_log, _) = appended_log(stored, stored_log_len, record.auction_log);
        self.update_lead(LeadRecord {
            auction_log,
            ..record
        })
        .await
    }

    /// Pending leads of a campaign due for another auction at `due_ms` (their
    /// `next_retry_ms` is at or before it), earliest first, at most `limit`.
    async fn pending_due(
        &self,
        campaign_id: &str,
        due_ms: i64,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        self.pending_due_after(campaign_id, due_ms, None, limit)
            .await
    }

    /// As `pending_due`, only the leads that come after `after` in that order (its due time
    /// and lead id: the last lead of the page before), so a caller can page through them.
    async fn pending_due_after(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError>;

    /// What `pending_due_after` lists, as the due time and id of each lead only: what a
    /// re-auction tick needs, as it reads each lead again under its lease. A store that can
    /// list them without reading the leads (their auction logs grow with every re-auction)
    /// does.
    async fn pending_due_ids_after(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<(i64, String)>, StorageError> {
        Ok(self
            .pending_due_after(campaign_id, due_ms, after, limit)
            .await?
            .into_iter()
            .filter_map(|r| Some((r.next_retry_ms?, r.lead_id)))
            .collect())
    }

    /// Durably stores a small named value (counters, breaker state) next to the leads.
    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<(), StorageError>;

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;

    /// The answer stored for this supplier's key, if younger than 24 h.
    async fn get_idempotent(
        &self,
        supplier_id: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<IdempotentAnswer>, StorageError>;

    /// A supplier's leads of one UTC day (`day` = days since 1970-01-01), oldest first, after
    /// `after` (a lead id) when paging; at most `limit`.
    async fn leads_of_supplier_day(
        &self,
        supplier_id: &str,
        day: i64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError>;

    /// Cheap check that the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), StorageError>;

    /// Whether this node holds a write of `lead_id` that the shared store does not have yet
    /// (a sale in the spill file): other nodes still read the lead as it was.
    async fn held_locally(&self, _lead_id: &str) -> bool {
        false
    }

    /// Makes everything written so far durable and stops accepting writes.
    async fn close(&self) -> Result<(), StorageError>;
}

/// Days since the Unix epoch of a millisecond timestamp (UTC).
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(86_400_000)
}

/// Opens the configured backend (`embedded` or `scylla`) behind the spill of sold leads whose
/// write failed.
pub async fn open(
    config: &crate::config::StorageConfig,
) -> Result<Arc<spill::SpillingStore>, StorageError> {
    let inner: Arc<dyn LeadStore> = match config.backend.as_str() {
        "scylla" => Arc::new(self::scylla::ScyllaStore::open(config).await?),
        _ => Arc::new(embedded::EmbeddedStore::open_with(
            &config.path,
            embedded::Options {
                group_commit_max: config.group_commit_max,
                checkpoint_every: std::time::Duration::from_millis(config.checkpoint_ms.max(1)),
                cache_bytes: config.cache_mib.max(1) << 20,
                apply_every: std::time::Duration::from_millis(config.apply_ms),
                linger: std::time::Duration::from_micros(config.linger_us),
                idle_apply: config.idle_apply,
            },
        )?),
    };
    spill::SpillingStore::open(inner, &config.spill_file(), config.spill_max)
}
