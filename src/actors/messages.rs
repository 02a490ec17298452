//! Every message the actors exchange, in one place.

use std::sync::Arc;
use std::time::Duration;

use actix::Message;
use bytes::Bytes;
use tokio::time::Instant;

use crate::buyers::{PingReply, PostReply};
use crate::domain::Lead;
use crate::storage::{LeadRecord, StorageError};

/// A validated lead for a campaign to auction. Answered once the outcome is durable.
#[derive(Message)]
#[rtype(result = "Result<Arc<LeadRecord>, AuctionError>")]
pub struct RunAuction {
    pub lead_id: String,
    pub supplier_id: String,
    pub created_at_ms: i64,
    pub lead: Arc<Lead>,
    /// The supplier's Idempotency-Key, stored with the outcome in the same commit.
    pub idempotency_key: Option<String>,
    /// The request's span, parent of the auction's, so auction log lines carry the request id.
    pub request_span: tracing::Span,
    /// Dropped once the outcome is stored (or the auction ends without one): the
    /// Idempotency-Key's lock, so a repeat of the lead waits for this auction's answer even
    /// when the request that sent it is gone (its connection reset mid-auction).
    pub hold: Option<Box<dyn Send>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuctionError {
    #[error("the outcome could not be stored: {0}")]
    Storage(#[from] StorageError),
    #[error("the campaign is not running")]
    Stopped,
    /// The campaign accepted the same phone or email within its dedupe window.
    #[error("duplicate lead")]
    Duplicate,
    #[error("coordination: {0}")]
    Coordination(#[from] crate::coord::CoordError),
}

/// Ping a buyer; the answer must come before `deadline`.
#[derive(Message)]
#[rtype(result = "PingResult")]
pub struct Ping {
    pub body: Bytes,
    pub deadline: Instant,
}

#[derive(Debug, Clone)]
pub struct PingResult {
    pub reply: PingReply,
    pub latency: Duration,
    pub answered_at: Instant,
}

/// Post the full lead to a buyer that won; the answer must come before `deadline`.
#[derive(Message)]
#[rtype(result = "PostResult")]
pub struct Post {
    pub body: Bytes,
    pub deadline: Instant,
    /// Price offered, for the buyer's accepted-value metric.
    pub price_cents: i64,
}

#[derive(Debug, Clone)]
pub struct PostResult {
    pub reply: PostReply,
    pub latency: Duration,
}
