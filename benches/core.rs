//! The exchange's hot paths one at a time: lead parsing, buyer bodies, auction ranking, the
//! rate-limit window and the embedded store's group commit. `cargo bench --bench core`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use leadex::buyers::{PostRequest, ReplyMapping, parse_ping_reply, ping_body, post_body};
use leadex::domain::{AuctionRules, Bid, FieldMap, Lead, Price, rank};
use leadex::ratelimit::Limit;
use leadex::ratelimit::window::decide;
use leadex::storage::embedded::EmbeddedStore;
use leadex::storage::{AuctionEvent, LeadRecord, LeadStatus, LeadStore};

/// A typical supplier body: the always-required fields, email and zip, and two fields the
/// exchange does not know and passes on.
const LEAD_JSON: &[u8] = br#"{"seller":"ACME1234","category":"Auto Insurance","firstName":" John ","lastName":"Doe","email":" John.Doe@Email.COM ","phone":"1 (555) 123-4567","state":"tx","zip":"75001","city":"Dallas","homeowner":"yes","creditScore":710}"#;

fn parsed_lead() -> Lead {
    let fields: FieldMap = serde_json::from_slice(LEAD_JSON).expect("sample lead");
    Lead::parse(fields, &["email".to_owned()]).expect("sample lead is valid")
}

fn lead_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("lead");
    group.throughput(Throughput::Bytes(LEAD_JSON.len() as u64));
    group.bench_function("parse_json_and_normalise", |b| {
        b.iter(|| {
            let fields: FieldMap = serde_json::from_slice(black_box(LEAD_JSON)).expect("json");
            Lead::parse(fields, &["email".to_owned()]).expect("valid")
        })
    });
    let fields: FieldMap = serde_json::from_slice(LEAD_JSON).expect("json");
    group.bench_function("normalise_only", |b| {
        b.iter_batched(
            || fields.clone(),
            |fields| Lead::parse(fields, &["email".to_owned()]).expect("valid"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn buyer_bodies(c: &mut Criterion) {
    let lead = parsed_lead();
    let mut group = c.benchmark_group("buyer_body");
    group.bench_function("ping_lead_without_personal", |b| {
        b.iter(|| {
            let ping_lead = lead.without_personal(&[]);
            serde_json::value::to_raw_value(&ping_lead).expect("serialises")
        })
    });
    let ping_lead = serde_json::value::to_raw_value(&lead.without_personal(&[])).expect("ping");
    group.bench_function("ping", |b| {
        b.iter(|| {
            ping_body(
                black_box("01JDQ0000000000000000000PI"),
                "acme-auto",
                "Auto Insurance",
                &ping_lead,
            )
        })
    });
    let token = serde_json::Value::String("01JDQ0000000000000000000PI".to_owned());
    group.bench_function("post", |b| {
        b.iter(|| {
            post_body(&PostRequest {
                ping_id: black_box("01JDQ0000000000000000000PI"),
                lead_id: "01JDQ0000000000000000000LD",
                price: Price::from_cents(4250),
                token: Some(&token),
                campaign: "acme-auto",
                category: "Auto Insurance",
                lead: &lead.fields,
            })
        })
    });
    let mapping = ReplyMapping::default();
    group.bench_function("parse_ping_reply", |b| {
        b.iter(|| {
            parse_ping_reply(
                200,
                black_box(br#"{"bid":42.5,"token":"01JDQ0000000000000000000PI"}"#),
                &mapping,
            )
        })
    });
    group.finish();
}

fn bids(n: usize) -> Vec<Bid> {
    // Deterministic spread of prices and answer times, some under the floor, some ties.
    (0..n)
        .map(|i| Bid {
            buyer: i,
            price: Price::from_cents(((i * 7919) % 5000) as i64 + 100),
            answered_after: Duration::from_micros(((i * 104_729) % 300_000) as u64),
            direct: i % 11 == 0,
            buyer_floor: Price::from_cents(if i % 5 == 0 { 2500 } else { 0 }),
            token: (i % 2 == 0).then(|| serde_json::Value::String(format!("token-{i}"))),
        })
        .collect()
}

fn auction_ranking(c: &mut Criterion) {
    let rules = AuctionRules {
        campaign_floor: Price::from_cents(500),
        max_buyers: 1,
    };
    let mut group = c.benchmark_group("auction_rank");
    for n in [1usize, 5, 20, 50] {
        let input = bids(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &input, |b, input| {
            b.iter_batched(
                || input.clone(),
                |bids| rank(bids, &rules),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn rate_limit_window(c: &mut Criterion) {
    let limit = Limit::per_secs(60, 60);
    let mut group = c.benchmark_group("ratelimit_window");
    // Steady state of a busy key: the log is full and requests arrive as fast as slots free,
    // so every call expires one entry and records one.
    group.bench_function("decide_rolling_full_log", |b| {
        let mut log: VecDeque<i64> = (0..60).map(|i| i * 1000).collect();
        let mut now = 60_000i64;
        b.iter(|| {
            now += 1000;
            decide(&mut log, black_box(now), limit, true)
        })
    });
    group.bench_function("decide_refused", |b| {
        let mut log: VecDeque<i64> = (0..60).map(|i| 1_000_000 + i).collect();
        b.iter(|| decide(&mut log, black_box(1_000_100), limit, true))
    });
    group.bench_function("decide_empty_log", |b| {
        b.iter_batched(
            VecDeque::new,
            |mut log| decide(&mut log, black_box(1_000_000), limit, true),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn record(n: u64) -> LeadRecord {
    let lead = parsed_lead();
    LeadRecord {
        lead_id: format!("01JDQ{n:021}"),
        supplier_id: "sup-1".to_owned(),
        seller: "ACME1234".to_owned(),
        campaign_id: "acme-auto".to_owned(),
        created_at_ms: 1_795_000_000_000 + n as i64,
        status: LeadStatus::Sold,
        price_cents: 4250,
        buyer_ids: vec!["buyer-a".to_owned()],
        fields: lead.fields,
        auction_log: (0..5)
            .map(|b| AuctionEvent::Ping {
                buyer: format!("buyer-{b}"),
                outcome: "bid".to_owned(),
                bid_cents: Some(1000 + b),
                latency_us: 350,
            })
            .chain(std::iter::once(AuctionEvent::Post {
                buyer: "buyer-a".to_owned(),
                price_cents: 4250,
                outcome: "accepted".to_owned(),
                reason: None,
                latency_us: 400,
            }))
            .collect(),
        next_retry_ms: None,
    }
}

/// A runtime of two threads and a store in a temporary folder on the data disk (kept while
/// the folder's handle lives).
fn bench_store() -> (
    tokio::runtime::Runtime,
    tempfile::TempDir,
    Arc<EmbeddedStore>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::Builder::new()
        .prefix("leadex-bench-store-")
        .tempdir_in(std::env::temp_dir())
        .expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path(), 512).expect("store opens"));
    (runtime, dir, store)
}

/// Durable writes (fsync'd commits) to a store in a temporary folder on the data disk; each
/// iteration is `writers` leads written at once and awaited, so with 64 writers the writer
/// thread groups them into few commits.
fn storage_writes(c: &mut Criterion) {
    let (runtime, _dir, store) = bench_store();
    let template = record(0);
    let mut next = 0u64;
    let mut group = c.benchmark_group("storage_embedded_insert");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(6));
    for writers in [1usize, 64] {
        group.throughput(Throughput::Elements(writers as u64));
        group.bench_function(BenchmarkId::new("concurrent_writers", writers), |b| {
            b.to_async(&runtime).iter(|| {
                let batch: Vec<LeadRecord> = (0..writers)
                    .map(|_| {
                        next += 1;
                        let mut r = template.clone();
                        r.lead_id = format!("01JDQ{next:021}");
                        r
                    })
                    .collect();
                let store = store.clone();
                async move {
                    let writes = batch.into_iter().map(|r| {
                        let store = store.clone();
                        async move { store.insert_lead(Arc::new(r), None).await }
                    });
                    for result in futures::future::join_all(writes).await {
                        result.expect("stored");
                    }
                }
            })
        });
    }
    group.finish();
    runtime.block_on(store.close()).expect("store closes");
}

/// One re-auction of a lead pending a day, auctioned every minute with five buyers (1,440
/// auctions, 7,201 log events): what a re-auction reads under its lease (the record and the
/// log's length), that read with its durable write of five more events, and the read of the
/// whole lead, which a re-auction made before.
fn storage_reauction(c: &mut Criterion) {
    let (runtime, _dir, store) = bench_store();
    let pings = |round: u64| -> Vec<AuctionEvent> {
        (0..5)
            .map(|b| AuctionEvent::Ping {
                buyer: format!("buyer-{b}"),
                outcome: if round.is_multiple_of(2) {
                    "no_bid"
                } else {
                    "timeout"
                }
                .to_owned(),
                bid_cents: None,
                latency_us: 350 + round,
            })
            .collect()
    };
    let mut lead = record(0);
    lead.status = LeadStatus::Pending;
    lead.price_cents = 0;
    lead.buyer_ids.clear();
    lead.next_retry_ms = Some(1_795_000_060_000);
    let added_to = |lead: &LeadRecord, events: Vec<AuctionEvent>| LeadRecord {
        auction_log: events,
        ..lead.head()
    };
    runtime.block_on(async {
        store
            .insert_lead(Arc::new(lead.clone()), None)
            .await
            .expect("stored");
        for round in 1..1_440 {
            let (_, stored) = store
                .get_lead_for_reauction(&lead.lead_id)
                .await
                .expect("read")
                .expect("stored");
            store
                .append_lead(added_to(&lead, pings(round)), stored)
                .await
                .expect("appended");
        }
    });
    let mut group = c.benchmark_group("storage_embedded_reauction");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(6));
    let mut round = 1_440u64;
    group.bench_function("read_for_reauction_and_append_5", |b| {
        b.to_async(&runtime).iter(|| {
            round += 1;
            let (store, lead, events) = (store.clone(), lead.clone(), pings(round));
            async move {
                let (head, stored) = store
                    .get_lead_for_reauction(&lead.lead_id)
                    .await
                    .expect("read")
                    .expect("stored");
                store
                    .append_lead(added_to(&head, events), stored)
                    .await
                    .expect("appended");
            }
        })
    });
    group.bench_function("read_for_reauction", |b| {
        b.to_async(&runtime).iter(|| {
            let (store, lead_id) = (store.clone(), lead.lead_id.clone());
            async move {
                store
                    .get_lead_for_reauction(&lead_id)
                    .await
                    .expect("read")
                    .expect("stored");
            }
        })
    });
    group.bench_function("read_whole_lead", |b| {
        b.to_async(&runtime).iter(|| {
            let (store, lead_id) = (store.clone(), lead.lead_id.clone());
            async move {
                let whole = store
                    .get_lead(&lead_id)
                    .await
                    .expect("read")
                    .expect("stored");
                assert!(whole.auction_log.len() > 7_000);
            }
        })
    });
    group.finish();
    runtime.block_on(store.close()).expect("store closes");
}

criterion_group!(
    benches,
    lead_parsing,
    buyer_bodies,
    auction_ranking,
    rate_limit_window,
    storage_writes,
    storage_reauction
);
criterion_main!(benches);
