//! One actor per campaign: holds the campaign's rules and buyers, and runs each auction as
//! its own future, so auctions of one campaign overlap and a slow buyer delays no other lead.
//! Ranking and fallback decisions come from `domain::auction`; this file does the I/O.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler, MailboxError, ResponseFuture};
use bytes::Bytes;
use futures::future::join_all;
use metrics::{counter, gauge, histogram};
use tokio::time::Instant;
use tracing::Instrument;

use super::buyer::BuyerActor;
use super::messages::{AuctionError, Ping, PingResult, Post, PostResult, RunAuction};
use crate::buyers::{self, NoBid, PingReply, PostReply, PostRequest, Refusal};
use crate::domain::{AuctionRules, Bid, PostQueue, Price, rank};
use crate::storage::{AuctionEvent, LeadRecord, LeadStatus, LeadStore};
use crate::telemetry;

/// A buyer as one campaign sees it.
#[derive(Clone)]
pub struct CampaignBuyer {
    pub id: String,
    pub addr: Addr<BuyerActor>,
    /// `Some` for a direct-post buyer: no ping, this price.
    pub fixed_price: Option<Price>,
    pub floor: Price,
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
}

pub struct CampaignActor {
    shared: Arc<Shared>,
}

struct Shared {
    settings: CampaignSettings,
    store: Arc<dyn LeadStore>,
}

impl CampaignActor {
    pub fn new(settings: CampaignSettings, store: Arc<dyn LeadStore>) -> CampaignActor {
        CampaignActor {
            shared: Arc::new(Shared { settings, store }),
        }
    }
}

impl Actor for CampaignActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(16_384);
    }
}

impl Handler<RunAuction> for CampaignActor {
    type Result = ResponseFuture<Result<LeadRecord, AuctionError>>;

    fn handle(&mut self, msg: RunAuction, _: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        let span = tracing::info_span!(parent: &msg.request_span, "auction", lead_id = %msg.lead_id, campaign = %shared.settings.id);
        Box::pin(async move { shared.run(msg).await }.instrument(span))
    }
}

fn ping_outcome(reply: &PingReply) -> &'static str {
    match reply {
        PingReply::Bid { .. } => "bid",
        PingReply::NoBid(why) => why.as_str(),
    }
}

impl Shared {
    async fn run(&self, msg: RunAuction) -> Result<LeadRecord, AuctionError> {
        let started = Instant::now();
        gauge!(telemetry::AUCTIONS_IN_FLIGHT).increment(1.0);
        let result = self.auction(msg, started).await;
        gauge!(telemetry::AUCTIONS_IN_FLIGHT).decrement(1.0);
        if let Ok(record) = &result {
            let campaign = self.settings.id.clone();
            histogram!(telemetry::AUCTION_DURATION, "campaign" => campaign.clone())
                .record(started.elapsed().as_secs_f64());
            counter!(telemetry::LEADS_TOTAL, "campaign" => campaign.clone(), "outcome" => record.status.as_str()).increment(1);
            if record.status == LeadStatus::Sold {
                counter!(telemetry::SOLD_VALUE_TOTAL, "campaign" => campaign)
                    .increment(record.price_cents.max(0) as u64);
            }
        }
        result
    }

    async fn auction(&self, msg: RunAuction, started: Instant) -> Result<LeadRecord, AuctionError> {
        let s = &self.settings;
        let ping_deadline = started + s.ping_timeout;
        let mut log = Vec::new();
        let mut bids = Vec::new();
        let mut ping_ids: Vec<String> = Vec::with_capacity(s.buyers.len());

        // Ping everyone at once; the ping lead is serialised once for all buyers.
        let ping_lead =
            serde_json::value::to_raw_value(&msg.lead.without_personal(&s.personal_fields))
                .expect("a map of JSON values always serialises");
        let mut pings = Vec::new();
        for (index, buyer) in s.buyers.iter().enumerate() {
            let ping_id = ulid::Ulid::new().to_string();
            match buyer.fixed_price {
                Some(price) => {
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
            ping_ids.push(ping_id);
        }
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
                if result.answered_at > ping_deadline {
                    continue;
                }
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

        // Post to the best bids until enough accepted; the whole post phase has one deadline.
        let post_deadline = Instant::now().max(ping_deadline) + s.post_timeout;
        let mut queue = PostQueue::new(ranking, &s.rules);
        loop {
            let wave = queue.next_wave();
            if wave.is_empty() {
                break;
            }
            let posts = wave.into_iter().map(|bid| {
                let buyer = &s.buyers[bid.buyer];
                let body = Bytes::from(buyers::post_body(&PostRequest {
                    ping_id: &ping_ids[bid.buyer],
                    lead_id: &msg.lead_id,
                    price: bid.price,
                    token: bid.token.as_deref(),
                    campaign: &s.id,
                    category: &s.category,
                    lead: &msg.lead.fields,
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
                            latency: post_deadline.saturating_duration_since(Instant::now()),
                        },
                    };
                    (bid, result)
                }
            });
            for (bid, result) in join_all(posts).await {
                let buyer = &s.buyers[bid.buyer];
                let (outcome, reason) = match &result.reply {
                    PostReply::Accepted => ("accepted", None),
                    PostReply::Refused(why, reason) => (why.as_str(), reason.clone()),
                };
                tracing::debug!(buyer = %buyer.id, outcome, price = %bid.price, "post answered");
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
        let (sold, total) = queue.into_sale();
        let status = if sold.is_empty() {
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
            price_cents: total.cents(),
            buyer_ids: sold.iter().map(|b| s.buyers[b.buyer].id.clone()).collect(),
            fields: msg.lead.fields.clone(),
            auction_log: log,
            next_retry_ms: None,
        };
        tracing::info!(status = status.as_str(), price = %total, buyers = ?record.buyer_ids, "auction done");
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
        if let Err(e) = self.store.insert_lead(record.clone(), idempotency).await {
            if record.status == LeadStatus::Sold {
                tracing::error!(error = %e, buyers = ?record.buyer_ids, "sold lead could not be stored");
            }
            return Err(AuctionError::Storage(e));
        }
        Ok(record)
    }
}
