//! Whole auctions in-process against buyer simulators answering in 0 ms on real loopback
//! sockets, one auction at a time, so each figure is the latency of one lead:
//!
//! - `bare_fanout/N`: reqwest straight to the simulators (N pings at once, pick, one post):
//!   the floor the same sockets and simulators allow.
//! - `auction_actor/N`: the campaign and buyer actors and the embedded store (on /dev/shm when
//!   it exists, so the figure is CPU and not the disk's fsync).
//! - `submit_http/N`: the real application through `POST /api/leads`: auth, limiter, parsing,
//!   auction, durable store on the data disk (one fsync per lead at this concurrency).
//!
//! The exchange's own overhead is `auction_actor - bare_fanout` (actors, bodies, log) and
//! `submit_http - bare_fanout` (everything, including one fsync). `cargo bench --bench exchange`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use leadex::actors::{
    BuyerActor, BuyerHealth, BuyerSettings, CampaignActor, CampaignBuyer, CampaignServices,
    CampaignSettings, RunAuction,
};
use leadex::buyers::ReplyMapping;
use leadex::clock::Clock;
use leadex::config::Config;
use leadex::coord::MemoryCoordinator;
use leadex::domain::campaign::BuyerRules;
use leadex::domain::{AuctionRules, FieldMap, Lead, Price};
use leadex::sim::{Behaviour, BidSpec, BuyerSim};
use leadex::startup::{Application, hash_key};
use leadex::storage::LeadStore;
use leadex::storage::embedded::EmbeddedStore;
use leadex::webhooks::WebhookSender;
use serde_json::{Value, json};

const KEY: &str = "bench-key-supplier-one";
const BUYER_COUNTS: [usize; 2] = [1, 5];

fn lead_json() -> Value {
    json!({
        "seller": "ACME1234", "category": "Auto Insurance", "firstName": "John",
        "lastName": "Doe", "email": "john.doe@email.com", "phone": "555-123-4567",
        "state": "TX", "zip": "75001", "city": "Dallas", "homeowner": "yes", "creditScore": 710
    })
}

fn start_sims(n: usize) -> Vec<BuyerSim> {
    (0..n)
        .map(|i| {
            let behaviour = Behaviour {
                bid: BidSpec::Fixed(Price::from_cents(1000 + 100 * i as i64)),
                ..Behaviour::default()
            };
            BuyerSim::start("127.0.0.1:0", behaviour, 1).expect("buyer simulator")
        })
        .collect()
}

fn fast_data_dir() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    let base = if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("leadex-bench-")
        .tempdir_in(base)
        .expect("tempdir")
}

/// Each simulator's ping and post URLs, parsed once as the exchange parses its buyers' URLs.
fn sim_urls(sims: &[BuyerSim]) -> Vec<(reqwest::Url, reqwest::Url)> {
    let parse = |url: String| reqwest::Url::parse(&url).expect("simulator URL");
    sims.iter()
        .map(|sim| (parse(sim.url("/ping")), parse(sim.url("/post"))))
        .collect()
}

/// N pings at once straight to the simulators, the best bid, one post: what any exchange on
/// this HTTP stack must at least spend.
async fn bare_auction(
    client: &reqwest::Client,
    urls: &[(reqwest::Url, reqwest::Url)],
    body: &Value,
) {
    let pings = urls.iter().map(|(ping, _)| {
        let request = client.post(ping.clone()).json(body).send();
        async move {
            let reply: Value = request.await.expect("ping").json().await.expect("bid");
            reply["bid"].as_f64().unwrap_or(0.0)
        }
    });
    let bids = futures::future::join_all(pings).await;
    let (best, _) =
        bids.iter().enumerate().fold(
            (0, 0.0),
            |(bi, bp), (i, p)| if *p > bp { (i, *p) } else { (bi, bp) },
        );
    let reply: Value = client
        .post(urls[best].1.clone())
        .json(body)
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("accepted");
    assert_eq!(reply["accepted"], true);
}

fn exchange(c: &mut Criterion) {
    let system = actix_rt::System::new();
    let mut group = c.benchmark_group("exchange");
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(6));

    for buyers in BUYER_COUNTS {
        let sims = system.block_on(async { start_sims(buyers) });
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .expect("client");
        let body = lead_json();
        let urls = sim_urls(&sims);
        group.bench_function(BenchmarkId::new("bare_fanout", buyers), |b| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        bare_auction(&client, &urls, &body).await;
                    }
                    started.elapsed()
                })
            })
        });

        // The campaign and buyer actors with a store on tmpfs.
        let dir = fast_data_dir();
        let (campaign, store) = system.block_on(async {
            let store: Arc<dyn LeadStore> =
                Arc::new(EmbeddedStore::open(dir.path(), 512).expect("store"));
            let campaign_buyers = sims
                .iter()
                .enumerate()
                .map(|(i, sim)| {
                    let health = Arc::new(BuyerHealth::new(
                        &format!("buyer-{i}"),
                        5,
                        Duration::from_secs(30),
                        Clock::system(),
                    ));
                    let actor = BuyerActor::new(BuyerSettings {
                        id: format!("buyer-{i}"),
                        ping_url: Some(sim.url("/ping")),
                        post_url: sim.url("/post"),
                        headers: Vec::new(),
                        max_in_flight: 1024,
                        http2: false,
                        ca_certs: Vec::new(),
                        in_flight: Default::default(),
                        mapping: ReplyMapping::default(),
                        health: health.clone(),
                    })
                    .expect("buyer actor");
                    CampaignBuyer {
                        id: format!("buyer-{i}"),
                        addr: actor.start(),
                        fixed_price: None,
                        floor: Price::ZERO,
                        rules: Arc::new(BuyerRules::default()),
                        health,
                    }
                })
                .collect();
            let settings = CampaignSettings {
                id: "acme-auto".to_owned(),
                category: "Auto Insurance".to_owned(),
                seller: "ACME1234".to_owned(),
                personal_fields: Vec::new(),
                ping_timeout: Duration::from_millis(300),
                post_timeout: Duration::from_millis(1000),
                rules: AuctionRules {
                    campaign_floor: Price::from_cents(500),
                    max_buyers: 1,
                },
                buyers: campaign_buyers,
                dedupe_days: None,
                pending: None,
            };
            let services = CampaignServices {
                store: store.clone(),
                coord: Arc::new(MemoryCoordinator::new(store.clone())),
                clock: Clock::system(),
                webhooks: WebhookSender::new(Default::default()),
                drain: Default::default(),
                reauctions: false,
            };
            (CampaignActor::new(settings, services).start(), store)
        });
        let fields: FieldMap = serde_json::from_value(lead_json()).expect("fields");
        let lead = Arc::new(Lead::parse(fields, &[]).expect("valid lead"));
        let mut n = 0u64;
        group.bench_function(BenchmarkId::new("auction_actor", buyers), |b| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        n += 1;
                        let record = campaign
                            .send(RunAuction {
                                lead_id: format!("01JDQ{n:021}"),
                                supplier_id: "sup-1".to_owned(),
                                created_at_ms: 1_795_000_000_000,
                                lead: lead.clone(),
                                idempotency_key: None,
                                request_span: tracing::Span::none(),
                                hold: None,
                            })
                            .await
                            .expect("campaign answers")
                            .expect("auction stored");
                        assert_eq!(record.buyer_ids.len(), 1);
                    }
                    started.elapsed()
                })
            })
        });
        system.block_on(async { store.close().await.expect("store closes") });
        drop(dir);

        // The whole application behind its supplier API, store on the data disk.
        let data = tempfile::Builder::new()
            .prefix("leadex-bench-app-")
            .tempdir()
            .expect("tempdir");
        let config = Config::from_toml(&app_config(data.path(), &sims)).expect("config");
        let (base, handle, running) = system.block_on(async {
            let app = Application::build(config, None).await.expect("app builds");
            let base = format!("http://{}", app.addr());
            let handle = app.handle();
            (base, handle, actix_rt::spawn(app.run_until_stopped()))
        });
        let url = format!("{base}/api/leads");
        let body = serde_json::to_vec(&lead_json()).expect("body");
        group.bench_function(BenchmarkId::new("submit_http", buyers), |b| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let answer = client
                            .post(&url)
                            .bearer_auth(KEY)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await
                            .expect("submitted");
                        assert_eq!(answer.status().as_u16(), 200);
                        let answer: Value = answer.json().await.expect("answer");
                        assert_eq!(answer["status"], "sold");
                    }
                    started.elapsed()
                })
            })
        });
        system.block_on(async {
            handle.stop(true).await;
            let _ = running.await;
            for sim in &sims {
                sim.stop().await;
            }
        });
    }
    group.finish();
}

fn app_config(data: &std::path::Path, sims: &[BuyerSim]) -> String {
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
workers = 2

[storage]
path = "{data}"

[rate_limit]
requests = 100000000
window_secs = 60

[[sellers]]
code = "ACME1234"
slug = "acme"

[[suppliers]]
id = "sup-1"
sellers = ["ACME1234"]
api_key_sha256 = ["{key}"]

[[campaigns]]
id = "acme-auto"
seller = "ACME1234"
category = "Auto Insurance"
ping_timeout_ms = 300
post_timeout_ms = 1000
floor_price = 5.0
"#,
        data = data.display(),
        key = hash_key(KEY),
    );
    for (i, sim) in sims.iter().enumerate() {
        text.push_str(&format!(
            "\n[[buyers]]\nid = \"buyer-{i}\"\ncampaigns = [\"acme-auto\"]\nping_url = \"{}\"\npost_url = \"{}\"\n",
            sim.url("/ping"),
            sim.url("/post")
        ));
    }
    text
}

criterion_group!(benches, exchange);
criterion_main!(benches);
