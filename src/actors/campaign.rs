//! One actor per campaign: holds the campaign's rules and buyers, and runs each auction as
//! its own future, so auctions of one campaign overlap and a slow buyer delays no other lead.
//! Ranking, eligibility, caps windows and retry decisions come from `domain`; this file does
//! the I/O. With a pending TTL the actor also re-auctions its pending leads on an interval.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr, AsyncContext, Context, Handler, MailboxError, ResponseFuture};
use bytes::Bytes;
use futures::future::join_all;
use metrics::{counter, gauge, histogram};
use tokio::time::Instant;
use tracing::Instrument;

use super::buyer::{BuyerActor, BuyerHealth};
use super::messages::{AuctionError, Ping, PingResult, Post, PostResult, RunAuction};
use crate::buyers::{self, NoBid, PingReply, PostReply, PostRequest, Refusal};
use crate::clock::Clock;
use crate::coord::SharedCoordinator;
use crate::domain::breaker::Permit;
use crate::domain::campaign::{BuyerRules, PendingNext, PendingPolicy, SkipReason, dedupe_keys};
use crate::domain::caps::counter_checks;
use crate::domain::{AuctionRules, Bid, Lead, PostQueue, Price, rank};
use crate::storage::{AuctionEvent, LeadRecord, LeadStatus, LeadStore};
use crate::telemetry;
use crate::webhooks::WebhookSender;

/// Pending leads listed and re-auctioned at once.
const RETRY_BATCH: usize = 64;
/// Batches one scheduler tick works through at most (while they come back full).
const RETRY_BATCHES_PER_TICK: usize = 64;
/// How long one re-auction may hold its lead before another node or tick may take it.
const RETRY_LEASE_MS: i64 = 5 * 60 * 1000;
/// How long a re-auction's lead stays leased while its sale waits in this node's spill.
const SPILLED_LEASE_MS: i64 = 24 * 60 * 60 * 1000;

/// What became of one due lead in a scheduler tick.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Retry {
    /// Its outcome is stored (sold, unsold, or due again later).
    Stored,
    /// Left alone: another node holds its lease, or it is no longer due.
    Passed,
    /// Storage or the lease backend failed; it stays due.
    Failed,
}

/// A buyer as one campaign sees it.
#[derive(Clone)]
pub struct CampaignBuyer {
    pub id: String,
    pub addr: Addr<BuyerActor>,
    /// `Some` for a direct-post buyer: no ping, this price.
    pub fixed_price: Option<Price>,
    pub floor: Price,
    pub rules: Arc<BuyerRules>,
    pub health: Arc<BuyerHealth>,
}

pub struct CampaignSettings {
    pub id: String,
    pub category: String,
    pub seller: String,
    pub personal_fields: Vec<String>,
    pub ping_timeout: Duration,
    pub post_timeout: Duration,
    pub rules: AuctionRules,
    pub buyers: Vec<CampaignBuyer>,
    pub dedupe_days: Option<u32>,
    pub pending: Option<PendingPolicy>,
}

/// What a campaign needs besides its settings: where it stores, coordinates, reads the time
/// and tells suppliers.
#[derive(Clone)]
pub struct CampaignServices {
    pub store: Arc<dyn LeadStore>,
    pub coord: SharedCoordinator,
    pub clock: Clock,
    pub webhooks: WebhookSender,
    /// Lets a graceful stop wait for re-auctions in flight.
    pub drain: crate::drain::Drain,
    /// Whether this actor re-auctions the campaign's pending leads. A node runs one actor
    /// per campaign per HTTP worker for first auctions, and one more, on an arbiter that
    /// outlives the workers at a stop, that also runs the re-auction scheduler.
    pub reauctions: bool,
}

pub struct CampaignActor {
    shared: Arc<Shared>,
}

struct Shared {
    settings: CampaignSettings,
    store: Arc<dyn LeadStore>,
    coord: SharedCoordinator,
    clock: Clock,
    webhooks: WebhookSender,
    drain: crate::drain::Drain,
    reauctions: bool,
    /// A scheduler sweep is running; ticks meanwhile are skipped.
    sweeping: AtomicBool,
    /// Leads being re-auctioned on this node now.
    retrying: Mutex<HashSet<String>>,
    metrics: CampaignMetrics,
}

/// The campaign's series every auction touches, looked up once.
struct CampaignMetrics {
    in_flight: metrics::Gauge,
    duration: metrics::Histogram,
    sold: metrics::Counter,
    sold_value: metrics::Counter,
}

impl CampaignActor {
    pub fn new(settings: CampaignSettings, services: CampaignServices) -> CampaignActor {
        CampaignActor {
            shared: Arc::new(Shared {
                store: services.store,
                coord: services.coord,
                clock: services.clock,
                webhooks: services.webhooks,
                drain: services.drain,
                reauctions: services.reauctions,
                sweeping: AtomicBool::new(false),
                retrying: Mutex::new(HashSet::new()),
                metrics: CampaignMetrics {
                    in_flight: gauge!(telemetry::AUCTIONS_IN_FLIGHT),
                    duration: histogram!(telemetry::AUCTION_DURATION, "campaign" => settings.id.clone()),
                    sold: counter!(telemetry::LEADS_TOTAL, "campaign" => settings.id.clone(), "outcome" => LeadStatus::Sold.as_str()),
                    sold_value: counter!(telemetry::SOLD_VALUE_TOTAL, "campaign" => settings.id.clone()),
                },
                settings,
            }),
        }
    }
}

impl Actor for CampaignActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(16_384);
        if let Some(policy) = self.shared.settings.pending
            && self.shared.reauctions
        {
            // Often enough that a retry is at most a fraction of its interval late.
            let tick =
                Duration::from_millis((policy.retry_interval_ms / 4).clamp(100, 1000) as u64);
            ctx.run_interval(tick, |act, _| {
                let shared = act.shared.clone();
                if shared.sweeping.swap(true, Ordering::AcqRel) {
                    return;
                }
                actix::spawn(async move {
                    shared.retry_due().await;
                    shared.sweeping.store(false, Ordering::Release);
                });
            });
        }
    }
}

impl Handler<RunAuction> for CampaignActor {
    type Result = ResponseFuture<Result<Arc<LeadRecord>, AuctionError>>;

    fn handle(&mut self, msg: RunAuction, _: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        // The request's span takes the lead id and campaign rather than a child span per
        // auction: one span less to allocate and keep while the auction runs.
        let span = msg.request_span.clone();
        span.record("lead_id", tracing::field::display(&msg.lead_id));
        span.record("campaign", tracing::field::display(&shared.settings.id));
        Box::pin(async move { shared.run(msg).await }.instrument(span))
    }
}

fn ping_outcome(reply: &PingReply) -> &'static str {
    match reply {
        PingReply::Bid { .. } => "bid",
        PingReply::NoBid(why) => why.as_str(),
    }
}

/// What one auction came to: the accepted bids, what they pay, and its log.
struct Sale {
    sold: Vec<Bid>,
    total: Price,
    log: Vec<AuctionEvent>,
}

impl Shared {
    async fn run(&self, msg: RunAuction) -> Result<Arc<LeadRecord>, AuctionError> {
        let started = Instant::now();
        let metrics = &self.metrics;
        metrics.in_flight.increment(1.0);
        let result = self.first_auction(msg, started).await;
        metrics.in_flight.decrement(1.0);
        if let Ok(record) = &result {
            metrics.duration.record(started.elapsed().as_secs_f64());
            match record.status {
                LeadStatus::Sold => {
                    metrics.sold.increment(1);
                    metrics
                        .sold_value
                        .increment(record.price_cents.max(0) as u64);
                }
                status => counter!(telemetry::LEADS_TOTAL, "campaign" => self.settings.id.clone(), "outcome" => status.as_str()).increment(1),
            }
        }
        result
    }

    /// Claims the lead's phone and email for the dedupe window; `Ok(None)` without dedupe.
    async fn claim_lead(&self, lead: &Lead) -> Result<Option<Vec<String>>, AuctionError> {
        let Some(days) = self.settings.dedupe_days else {
            return Ok(None);
        };
        let keys = dedupe_keys(&self.settings.id, lead);
        let now = self.clock.now_ms();
        let expires = now + i64::from(days) * 86_400_000;
        if self.coord.claim(&keys, now, expires).await? {
            Ok(Some(keys))
        } else {
            counter!(telemetry::DUPLICATES_TOTAL, "campaign" => self.settings.id.clone())
                .increment(1);
            Err(AuctionError::Duplicate)
        }
    }

    async fn first_auction(
        &self,
        msg: RunAuction,
        started: Instant,
    ) -> Result<Arc<LeadRecord>, AuctionError> {
        let s = &self.settings;
        let claims = self.claim_lead(&msg.lead).await?;
        let sale = self.sell(&msg.lead, &msg.lead_id, started).await;
        let status = if sale.sold.is_empty() {
            LeadStatus::Pending
        } else {
            LeadStatus::Sold
        };
        let record = LeadRecord {
            lead_id: msg.lead_id,
            supplier_id: msg.supplier_id,
            seller: s.seller.clone(),
            campaign_id: s.id.clone(),
            created_at_ms: msg.created_at_ms,
            status,
            price_cents: sale.total.cents(),
            buyer_ids: sale
                .sold
                .iter()
                .map(|b| s.buyers[b.buyer].id.clone())
                .collect(),
            // The lead's own fields when the auction holds the last reference (the usual case).
            fields: Arc::try_unwrap(msg.lead)
                .map(|lead| lead.fields)
                .unwrap_or_else(|lead| lead.fields.clone()),
            auction_log: sale.log,
            next_retry_ms: match (status, s.pending) {
                (LeadStatus::Pending, Some(policy)) => Some(policy.first_retry(msg.created_at_ms)),
                _ => None,
            },
        };
        tracing::info!(status = status.as_str(), price = %sale.total, buyers = ?record.buyer_ids, "auction done");
        let idempotency = msg.idempotency_key.map(|key| {
            let body = crate::http::dto::lead_answer(&record);
            (
                key,
                crate::storage::IdempotentAnswer {
                    lead_id: record.lead_id.clone(),
                    body,
                    created_at_ms: record.created_at_ms,
                },
            )
        });
        let record = Arc::new(record);
        if let Err(e) = self.store.insert_lead(record.clone(), idempotency).await {
            if record.status == LeadStatus::Sold {
                tracing::error!(error = %e, buyers = ?record.buyer_ids, "sold lead could not be stored");
            }
            if let Some(keys) = claims
                && let Err(e) = self.coord.unclaim(&keys).await
            {
                tracing::error!(error = %e, "dedupe claim of an unstored lead could not be given back");
            }
            return Err(AuctionError::Storage(e));
        }
        Ok(record)
    }

    /// Why `buyer` sits this auction out (`Err`), or its breaker's permit: filters and
    /// schedule (pure), then its caps (coordinator), then its breaker (asked last: a probe
    /// permit is spent on a ping, or on a direct buyer's post).
    async fn skip_reason(
        &self,
        buyer: &CampaignBuyer,
        lead: &Lead,
        now_ms: i64,
    ) -> Result<Permit, SkipReason> {
        if let Err((reason, _)) = buyer.rules.admits(lead, now_ms) {
            return Err(reason);
        }
        if buyer.rules.caps.is_limited() {
            // A ping buyer needs room for at least one cent; a direct buyer for its price.
            let price = buyer.fixed_price.unwrap_or(Price::from_cents(1));
            let checks = counter_checks(
                &buyer.id,
                &buyer.rules.caps,
                &buyer.rules.timezone,
                now_ms,
                price,
            );
            match self.coord.would_fit(&checks, now_ms).await {
                Ok(true) => {}
                Ok(false) => return Err(SkipReason::Capped),
                Err(e) => {
                    tracing::error!(buyer = %buyer.id, error = %e, "cap check failed; buyer skipped");
                    return Err(SkipReason::CapsUnavailable);
                }
            }
        }
        match buyer.health.permit() {
            Permit::Denied => Err(SkipReason::BreakerOpen),
            permit => Ok(permit),
        }
    }

    fn skipped(&self, log: &mut Vec<AuctionEvent>, buyer: &CampaignBuyer, reason: SkipReason) {
        counter!(telemetry::BUYER_SKIPPED_TOTAL, "buyer" => buyer.id.clone(), "reason" => reason.as_str())
            .increment(1);
        log.push(AuctionEvent::Skipped {
            buyer: buyer.id.clone(),
            reason: reason.as_str().to_owned(),
        });
    }

    /// One auction of `lead`: eligible buyers pinged at once, bids ranked, the best posted to
    /// (a cap slot reserved before each post and released when it is refused).
    async fn sell(&self, lead: &Lead, lead_id: &str, started: Instant) -> Sale {
        let s = &self.settings;
        let ping_deadline = started + s.ping_timeout;
        let now_ms = self.clock.now_ms();
        let mut log = Vec::new();
        let mut bids = Vec::new();
        let mut ping_ids: Vec<String> = Vec::with_capacity(s.buyers.len());

        // Ping everyone eligible at once; the ping lead is serialised once for all buyers.
        let ping_lead = serde_json::value::to_raw_value(&lead.ping_fields(&s.personal_fields))
            .expect("a map of JSON values always serialises");
        // Every buyer's eligibility at once: a capped buyer's check asks the coordinator, and
        // a slow one must cost the auction one wait, not one per capped buyer, while the
        // ping deadline runs.
        let skips = join_all(
            s.buyers
                .iter()
                .map(|buyer| self.skip_reason(buyer, lead, now_ms)),
        )
        .await;
        let mut pings = Vec::new();
        // Direct buyers let out on their breaker's probe: a probe not used on a post is given
        // back, or an outbid buyer would wait another cooldown for its next chance.
        let mut direct_probes = Vec::new();
        for ((index, buyer), skip) in s.buyers.iter().enumerate().zip(skips) {
            let ping_id = ulid::Ulid::new().to_string();
            ping_ids.push(ping_id.clone());
            let permit = match skip {
                Ok(permit) => permit,
                Err(reason) => {
                    self.skipped(&mut log, buyer, reason);
                    continue;
                }
            };
            match buyer.fixed_price {
                Some(price) => {
                    if let Permit::Probe(since_ms) = permit {
                        direct_probes.push((index, since_ms));
                    }
                    log.push(AuctionEvent::Direct {
                        buyer: buyer.id.clone(),
                        bid_cents: price.cents(),
                    });
                    bids.push(Bid {
                        buyer: index,
                        price,
                        answered_after: Duration::ZERO,
                        direct: true,
                        buyer_floor: buyer.floor,
                        token: None,
                    });
                }
                None => {
                    let body =
                        Bytes::from(buyers::ping_body(&ping_id, &s.id, &s.category, &ping_lead));
                    let addr = buyer.addr.clone();
                    pings.push(async move {
                        let sent = addr.send(Ping {
                            body,
                            deadline: ping_deadline,
                        });
                        let result = match tokio::time::timeout_at(ping_deadline, sent).await {
                            Ok(Ok(result)) => result,
                            Ok(Err(MailboxError::Closed | MailboxError::Timeout)) | Err(_) => {
                                PingResult {
                                    reply: PingReply::NoBid(NoBid::Timeout),
                                    latency: started.elapsed(),
                                    answered_at: Instant::now(),
                                }
                            }
                        };
                        (index, result)
                    });
                }
            }
        }
        // A bid read after the deadline comes back from the buyer actor as a timeout.
        for (index, result) in join_all(pings).await {
            let buyer = &s.buyers[index];
            let bid_cents = match &result.reply {
                PingReply::Bid { price, .. } => Some(price.cents()),
                PingReply::NoBid(_) => None,
            };
            log.push(AuctionEvent::Ping {
                buyer: buyer.id.clone(),
                outcome: ping_outcome(&result.reply).to_owned(),
                bid_cents,
                latency_us: result.latency.as_micros() as u64,
            });
            if let PingReply::Bid { price, token } = result.reply {
                bids.push(Bid {
                    buyer: index,
                    price,
                    answered_after: result.answered_at - started,
                    direct: false,
                    buyer_floor: buyer.floor,
                    token,
                });
            }
        }

        let ranking = rank(bids, &s.rules);
        for (bid, why) in &ranking.dropped {
            log.push(AuctionEvent::Dropped {
                buyer: s.buyers[bid.buyer].id.clone(),
                bid_cents: bid.price.cents(),
                reason: why.as_str().to_owned(),
            });
        }

        // Post to the best bids until enough accepted. Each post has `post_timeout_ms` of its
        // own: a post that times out is a refusal (CONTRACT §3), and the next bid gets its
        // full time, not what the first one left.
        let mut queue = PostQueue::new(ranking, &s.rules);
        loop {
            let wave = queue.next_wave();
            if wave.is_empty() {
                break;
            }
            // A winner must fit its caps: reserve its slot (and budget) before posting.
            let mut reserved = Vec::with_capacity(wave.len());
            for bid in wave {
                let buyer = &s.buyers[bid.buyer];
                let now_ms = self.clock.now_ms();
                let checks = counter_checks(
                    &buyer.id,
                    &buyer.rules.caps,
                    &buyer.rules.timezone,
                    now_ms,
                    bid.price,
                );
                match self.coord.reserve(&checks, now_ms).await {
                    Ok(true) => reserved.push((bid, checks)),
                    Ok(false) => {
                        self.skipped(&mut log, buyer, SkipReason::Capped);
                        queue.refused(&bid);
                    }
                    Err(e) => {
                        tracing::error!(buyer = %buyer.id, error = %e, "cap reservation failed; bid skipped");
                        self.skipped(&mut log, buyer, SkipReason::CapsUnavailable);
                        queue.refused(&bid);
                    }
                }
            }
            let sent_at = Instant::now();
            let post_deadline = sent_at.max(ping_deadline) + s.post_timeout;
            let posts = reserved.into_iter().map(|(bid, checks)| {
                let buyer = &s.buyers[bid.buyer];
                let body = Bytes::from(buyers::post_body(&PostRequest {
                    ping_id: &ping_ids[bid.buyer],
                    lead_id,
                    price: bid.price,
                    token: bid.token.as_ref(),
                    campaign: &s.id,
                    category: &s.category,
                    lead: &lead.fields,
                }));
                let sent = buyer.addr.send(Post {
                    body,
                    deadline: post_deadline,
                    price_cents: bid.price.cents(),
                });
                async move {
                    let result = match tokio::time::timeout_at(post_deadline, sent).await {
                        Ok(Ok(result)) => result,
                        Ok(Err(_)) | Err(_) => PostResult {
                            reply: PostReply::Refused(Refusal::Timeout, None),
                            latency: sent_at.elapsed(),
                        },
                    };
                    let counted = match result.reply {
                        PostReply::Accepted => self.coord.commit(&checks).await,
                        PostReply::Refused(..) => self.coord.release(&checks).await,
                    };
                    if let Err(e) = counted {
                        tracing::error!(error = %e, "cap counters could not be updated");
                    }
                    (bid, result)
                }
            });
            for (bid, result) in join_all(posts).await {
                let buyer = &s.buyers[bid.buyer];
                let (outcome, reason) = match &result.reply {
                    PostReply::Accepted => ("accepted", None),
                    PostReply::Refused(why, reason) => (why.as_str(), reason.clone()),
                };
                if let PostReply::Refused(Refusal::Transport, Some(why)) = &result.reply {
                    // Every one: the buyer may have taken the lead without its answer arriving.
                    tracing::warn!(buyer = %buyer.id, error = %why, "buyer post failed");
                } else {
                    tracing::debug!(buyer = %buyer.id, outcome, price = %bid.price, "post answered");
                }
                log.push(AuctionEvent::Post {
                    buyer: buyer.id.clone(),
                    price_cents: bid.price.cents(),
                    outcome: outcome.to_owned(),
                    reason,
                    latency_us: result.latency.as_micros() as u64,
                });
                match result.reply {
                    PostReply::Accepted => queue.accepted(bid),
                    PostReply::Refused(..) => queue.refused(&bid),
                }
            }
            if queue.is_done() {
                break;
            }
        }
        for (index, since_ms) in direct_probes {
            let buyer = &s.buyers[index];
            let posted = log.iter().any(
                |event| matches!(event, AuctionEvent::Post { buyer: b, .. } if *b == buyer.id),
            );
            if !posted {
                buyer.health.probe_unused(since_ms);
            }
        }
        let (sold, total) = queue.into_sale();
        Sale { sold, total, log }
    }

    /// One scheduler tick: the pending leads now due are auctioned again or given up, a batch
    /// at a time, each batch listing the due leads after the last one listed before, for as
    /// long as the listings come back full; so a backlog is worked through at once rather than
    /// a batch a tick, and leads whose leases other nodes hold (working on them, or dead with
    /// the lease not yet expired) are passed over rather than holding up the rest. A lead is
    /// tried at most once a tick.
    async fn retry_due(self: &Arc<Self>) {
        let Some(policy) = self.settings.pending else {
            return;
        };
        // Held for the whole tick: a stop waits until its re-auctions are stored.
        let Some(_running) = self.drain.enter() else {
            return;
        };
        let mut tried = HashSet::new();
        let mut after: Option<(i64, String)> = None;
        for _ in 0..RETRY_BATCHES_PER_TICK {
            let now = self.clock.now_ms();
            let cursor = after.as_ref().map(|(due, id)| (*due, id.as_str()));
            let due = match self
                .store
                .pending_due_ids_after(&self.settings.id, now, cursor, RETRY_BATCH)
                .await
            {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(campaign = %self.settings.id, error = %e, "pending leads could not be read");
                    return;
                }
            };
            let full = due.len() == RETRY_BATCH;
            after = due.last().cloned();
            let retries = due
                .into_iter()
                .filter(|(_, lead_id)| tried.insert(lead_id.clone()))
                .filter_map(|(_, lead_id)| {
                    let fresh = self
                        .retrying
                        .lock()
                        .expect("retrying")
                        .insert(lead_id.clone());
                    fresh.then(|| {
                        let shared = self.clone();
                        async move {
                            let outcome = shared.retry_one(&lead_id, policy).await;
                            shared.retrying.lock().expect("retrying").remove(&lead_id);
                            outcome
                        }
                    })
                });
            let outcomes = join_all(retries).await;
            let stored = outcomes.iter().filter(|o| **o == Retry::Stored).count();
            let failed = outcomes.contains(&Retry::Failed);
            // Past a partial batch nothing more is due; a batch where storage or the lease
            // backend failed and nothing was stored ends the tick, as the next would fare no
            // better; and a stop lets the batch that runs finish, not the next one.
            if !full || after.is_none() || (failed && stored == 0) || self.drain.enter().is_none() {
                return;
            }
        }
    }

    /// Re-auctions `record` under its lease.
    async fn retry_one(&self, lead_id: &str, policy: PendingPolicy) -> Retry {
        let lease = format!("retry/{lead_id}");
        let now = self.clock.now_ms();
        match self.coord.lease(&lease, now, now + RETRY_LEASE_MS).await {
            Ok(true) => {}
            Ok(false) => return Retry::Passed,
            Err(e) => {
                tracing::error!(error = %e, "re-auction lease failed");
                return Retry::Failed;
            }
        }
        let span =
            tracing::info_span!("reauction", lead_id = %lead_id, campaign = %self.settings.id);
        let outcome = self.retry_leased(lead_id, policy).instrument(span).await;
        if self.store.held_locally(lead_id).await {
            // Its sale waits in this node's spill: other nodes still read the lead as pending,
            // and the lease, held a day, keeps them from auctioning it again meanwhile.
            let now = self.clock.now_ms();
            match self
                .coord
                .extend_lease(&lease, now, now + SPILLED_LEASE_MS)
                .await
            {
                Ok(true) => {
                    tracing::warn!(lead_id = %lead_id, "re-auction lease held while its sale waits in the spill")
                }
                Ok(false) => {
                    tracing::error!(lead_id = %lead_id, "re-auction lease lost while its sale waits in the spill")
                }
                Err(e) => {
                    tracing::error!(lead_id = %lead_id, error = %e, "re-auction lease not extended while its sale waits in the spill")
                }
            }
            return outcome;
        }
        if let Err(e) = self.coord.end_lease(&lease).await {
            tracing::warn!(error = %e, "re-auction lease not ended");
        }
        outcome
    }

    /// Re-auctions a leased lead, if it is still due.
    async fn retry_leased(&self, lead_id: &str, policy: PendingPolicy) -> Retry {
        let campaign = self.settings.id.clone();
        // Read under the lease: the stored lead may have changed since it was listed (another
        // node may have sold it, or auctioned it and queued it for later).
        // The lead is read without its log, which grows with every re-auction: what this one
        // adds goes after the log as stored, and only that is written.
        let now = self.clock.now_ms();
        let (mut current, stored_log_len) = match self.store.get_lead_for_reauction(lead_id).await {
            Ok(Some((current, len))) if current.due_at(now) => (current, len),
            Ok(_) => return Retry::Passed,
            Err(e) => {
                tracing::error!(error = %e, "pending lead could not be read");
                return Retry::Failed;
            }
        };
        let record = &mut current;
        let mut resolved = None;
        if policy.expired(record.created_at_ms, now) {
            record.status = LeadStatus::Unsold;
            record.next_retry_ms = None;
            resolved = Some("unsold");
        } else {
            let lead = match Lead::parse(record.fields.clone(), &[]) {
                Ok(lead) => lead,
                Err(e) => {
                    tracing::error!(?e, "stored pending lead does not parse; given up");
                    record.status = LeadStatus::Unsold;
                    record.next_retry_ms = None;
                    return self
                        .store_retry(record, Some("unsold"), stored_log_len)
                        .await;
                }
            };
            counter!(telemetry::REAUCTIONS_TOTAL, "campaign" => campaign.clone()).increment(1);
            let sale = self.sell(&lead, &record.lead_id, Instant::now()).await;
            record.auction_log.extend(sale.log);
            if sale.sold.is_empty() {
                match policy.after_unsold_attempt(record.created_at_ms, self.clock.now_ms()) {
                    PendingNext::RetryAt(at) => record.next_retry_ms = Some(at),
                    PendingNext::GiveUp => {
                        record.status = LeadStatus::Unsold;
                        record.next_retry_ms = None;
                        resolved = Some("unsold");
                    }
                }
            } else {
                record.status = LeadStatus::Sold;
                record.price_cents = sale.total.cents();
                record.buyer_ids = sale
                    .sold
                    .iter()
                    .map(|b| self.settings.buyers[b.buyer].id.clone())
                    .collect();
                record.next_retry_ms = None;
                resolved = Some("sold");
            }
        }
        self.store_retry(record, resolved, stored_log_len).await
    }

    /// Stores a re-auction's outcome; a supplier's notification of it is recorded first, so
    /// a crash once it is stored cannot lose the notification.
    async fn store_retry(
        &self,
        record: &LeadRecord,
        resolved: Option<&'static str>,
        stored_log_len: usize,
    ) -> Retry {
        let notice = match resolved {
            Some(_) => self.webhooks.prepare(record).await,
            None => None,
        };
        if let Err(e) = self.store.append_lead(record.clone(), stored_log_len).await {
            tracing::error!(error = %e, status = record.status.as_str(), buyers = ?record.buyer_ids, "re-auction outcome could not be stored");
            if let Some(notice) = notice {
                // The write may have been applied though it failed: sent if it reads back.
                self.webhooks.unsure(notice);
            }
            return Retry::Failed;
        }
        if let Some(outcome) = resolved {
            if record.status == LeadStatus::Sold {
                // Counted once stored: a sale whose write failed is auctioned again.
                counter!(telemetry::SOLD_VALUE_TOTAL, "campaign" => self.settings.id.clone())
                    .increment(record.price_cents.max(0) as u64);
            }
            tracing::info!(status = outcome, price = record.price_cents, buyers = ?record.buyer_ids, "pending lead resolved");
            counter!(telemetry::PENDING_RESOLVED_TOTAL, "campaign" => self.settings.id.clone(), "outcome" => outcome)
                .increment(1);
        }
        if let Some(notice) = notice {
            self.webhooks.confirm(notice);
        }
        Retry::Stored
    }
}
