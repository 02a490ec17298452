//! `leadex demo`: the exchange on embedded defaults with simulated buyers on real sockets,
//! so a newcomer sees leads auctioned and sold. With `--leads N` it also submits N sample
//! leads and prints what happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde_json::{Value, json};

use crate::config::Config;
use crate::domain::Price;
use crate::sim::{Behaviour, BidSpec, BuyerSim};
use crate::startup::{Application, hash_key};

pub struct DemoOptions {
    pub listen: String,
    pub leads: Option<usize>,
    pub data: Option<PathBuf>,
    pub concurrency: usize,
}

struct DemoBuyer {
    id: &'static str,
    behaviour: Behaviour,
    direct_price: Option<&'static str>,
    campaigns: &'static [&'static str],
}

fn price(text: &str) -> Price {
    Price::parse_decimal(text).expect("demo prices are valid")
}

fn demo_buyers() -> Vec<DemoBuyer> {
    let b = |bid: BidSpec, ping: (u64, u64), reject_rate: f64| Behaviour {
        bid,
        ping_latency_ms: ping,
        post_latency_ms: (2, 15),
        reject_rate,
    };
    vec![
        DemoBuyer {
            id: "ace-insurance",
            behaviour: b(BidSpec::Range(price("20"), price("45")), (5, 40), 0.0),
            direct_price: None,
            campaigns: &["demo-auto", "demo-solar"],
        },
        DemoBuyer {
            id: "bluefin-leads",
            behaviour: b(BidSpec::Range(price("15"), price("50")), (10, 80), 0.0),
            direct_price: None,
            campaigns: &["demo-auto"],
        },
        DemoBuyer {
            id: "dawn-media",
            behaviour: b(BidSpec::Range(price("25"), price("60")), (20, 120), 0.35),
            direct_price: None,
            campaigns: &["demo-auto", "demo-solar"],
        },
        DemoBuyer {
            id: "echo-slowpoke",
            behaviour: b(BidSpec::Fixed(price("95")), (400, 600), 0.0),
            direct_price: None,
            campaigns: &["demo-auto"],
        },
        DemoBuyer {
            id: "fjord-finance",
            behaviour: b(BidSpec::Range(price("2"), price("30")), (1, 20), 0.0),
            direct_price: None,
            campaigns: &["demo-auto", "demo-solar"],
        },
        DemoBuyer {
            id: "cobalt-direct",
            behaviour: b(BidSpec::Nothing, (0, 0), 0.0),
            direct_price: Some("18.00"),
            campaigns: &["demo-auto"],
        },
    ]
}

/// A strong new API key: 32 random bytes, hex, with a recognisable prefix.
pub fn new_api_key() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!("lx_{}", hex::encode(bytes))
}

fn demo_config(
    key_hash: &str,
    ops_hash: &str,
    listen: &str,
    data: &std::path::Path,
    sims: &[(DemoBuyer, String)],
) -> String {
    let mut text = format!(
        r#"
[server]
listen = "{listen}"

[storage]
backend = "embedded"
path = "{data}"

[rate_limit]
requests = 1000000
window_secs = 60

[ops]
token_sha256 = ["{ops_hash}"]

[[sellers]]
code = "DEMO0001"
slug = "demo"

[[suppliers]]
id = "demo-supplier"
sellers = ["DEMO0001"]
api_key_sha256 = ["{key_hash}"]

[[campaigns]]
id = "demo-auto"
seller = "DEMO0001"
category = "Auto Insurance"
ping_timeout_ms = 300
post_timeout_ms = 1000
floor_price = 5.0

[[campaigns]]
id = "demo-solar"
seller = "DEMO0001"
category = "Solar"
required_fields = ["zip"]
ping_timeout_ms = 250
post_timeout_ms = 1000
floor_price = 10.0
max_buyers = 2
"#,
        data = data.display().to_string().replace('\\', "\\\\")
    );
    for (buyer, base) in sims {
        let campaigns: Vec<String> = buyer.campaigns.iter().map(|c| format!("\"{c}\"")).collect();
        text.push_str(&format!(
            "\n[[buyers]]\nid = \"{}\"\ncampaigns = [{}]\npost_url = \"{base}/post\"\n",
            buyer.id,
            campaigns.join(", ")
        ));
        match buyer.direct_price {
            Some(p) => text.push_str(&format!("fixed_price = {p}\n")),
            None => text.push_str(&format!("ping_url = \"{base}/ping\"\n")),
        }
    }
    text
}

const FIRST: [&str; 8] = [
    "John", "Maria", "Wei", "Aisha", "Carlos", "Emma", "Noah", "Priya",
];
const LAST: [&str; 8] = [
    "Doe", "Garcia", "Chen", "Khan", "Lopez", "Smith", "Brown", "Patel",
];
const STATES: [(&str, &str); 6] = [
    ("TX", "75001"),
    ("CA", "90210"),
    ("FL", "33101"),
    ("NY", "10001"),
    ("IL", "60601"),
    ("AZ", "85001"),
];

/// A plausible lead with made-up personal data.
pub fn sample_lead(seller: &str, n: usize) -> Value {
    let mut rng = rand::rng();
    let (state, zip) = STATES[rng.random_range(0..STATES.len())];
    let first = FIRST[rng.random_range(0..FIRST.len())];
    let last = LAST[rng.random_range(0..LAST.len())];
    json!({
        "seller": seller,
        "category": if n % 4 == 3 { "Solar" } else { "Auto Insurance" },
        "firstName": first,
        "lastName": last,
        "email": format!("{}.{}{}@example.com", first.to_lowercase(), last.to_lowercase(), n),
        "phone": format!("555-{:03}-{:04}", rng.random_range(200..999), rng.random_range(0..10_000)),
        "state": state,
        "zip": zip,
        "homeowner": if rng.random_bool(0.6) { "yes" } else { "no" },
        "creditScore": rng.random_range(550..820),
    })
}

pub async fn run(options: DemoOptions) -> Result<(), String> {
    let mut sims = Vec::new();
    for buyer in demo_buyers() {
        let sim = BuyerSim::start("127.0.0.1:0", buyer.behaviour.clone(), 1)
            .map_err(|e| format!("buyer simulator: {e}"))?;
        let base = format!("http://{}", sim.addr);
        sims.push((buyer, base, sim));
    }
    let temp;
    let data = match &options.data {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().map_err(|e| format!("temporary data folder: {e}"))?;
            temp.path().to_owned()
        }
    };
    let key = new_api_key();
    let ops_token = new_api_key();
    let pairs: Vec<(DemoBuyer, String)> = sims
        .iter()
        .map(|(b, base, _)| (clone_buyer(b), base.clone()))
        .collect();
    let config = Config::from_toml(&demo_config(
        &hash_key(&key),
        &hash_key(&ops_token),
        &options.listen,
        &data,
        &pairs,
    ))
    .map_err(|e| e.to_string())?;
    let app = Application::build(config, None)
        .await
        .map_err(|e| e.to_string())?;
    let addr = app.addr();
    let handle = app.handle();
    let running = actix_rt::spawn(app.run_until_stopped());

    println!(
        "leadex demo: exchange on http://{addr}, data in {}",
        data.display()
    );
    println!("buyers:");
    for (buyer, base, _) in &sims {
        let what = match buyer.direct_price {
            Some(p) => format!("direct post at {p}"),
            None => format!(
                "bids {}, answers in {}-{} ms{}",
                buyer.behaviour.bid,
                buyer.behaviour.ping_latency_ms.0,
                buyer.behaviour.ping_latency_ms.1,
                if buyer.behaviour.reject_rate > 0.0 {
                    format!(
                        ", refuses {:.0}% of posts",
                        buyer.behaviour.reject_rate * 100.0
                    )
                } else {
                    String::new()
                }
            ),
        };
        println!("  {:<14} {base}  {what}", buyer.id);
    }
    println!(
        "\nsupplier API key: {key}\n\ntry:\ncurl -s -X POST http://{addr}/api/leads \\\n  -H 'Content-Type: application/json' \\\n  -H 'Authorization: Bearer {key}' \\\n  -d '{{\"seller\": \"DEMO0001\", \"category\": \"Auto Insurance\", \"firstName\": \"John\", \"lastName\": \"Doe\", \"phone\": \"555-123-4567\", \"email\": \"john@example.com\", \"state\": \"TX\"}}'\n"
    );
    println!(
        "operator token: {ops_token}\nwhat happened to a lead (its auction log):\ncurl -s http://{addr}/ops/leads/<lead_id> -H 'Authorization: Bearer {ops_token}'\n"
    );
    println!("metrics: http://{addr}/metrics   health: http://{addr}/readyz\n");

    match options.leads {
        Some(n) => {
            let summary = submit_leads(addr, &key, n, options.concurrency).await;
            println!("{summary}");
            handle.stop(true).await;
        }
        None => println!("Ctrl-C to stop."),
    }
    let _ = running.await;
    for (_, _, sim) in &sims {
        sim.stop().await;
    }
    Ok(())
}

fn clone_buyer(b: &DemoBuyer) -> DemoBuyer {
    DemoBuyer {
        id: b.id,
        behaviour: b.behaviour.clone(),
        direct_price: b.direct_price,
        campaigns: b.campaigns,
    }
}

/// Submits `n` sample leads, `concurrency` at a time, and sums up the answers.
async fn submit_leads(
    addr: std::net::SocketAddr,
    key: &str,
    n: usize,
    concurrency: usize,
) -> String {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("http client");
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} leads  {per_sec}  {msg}")
            .expect("progress template"),
    );
    let url = format!("http://{addr}/api/leads");
    let started = Instant::now();
    let results: Vec<(Result<Value, String>, Duration)> = futures::stream::iter(0..n)
        .map(|i| {
            let (client, url, bar) = (client.clone(), url.clone(), bar.clone());
            let body = sample_lead("DEMO0001", i);
            let key = key.to_owned();
            async move {
                let sent = Instant::now();
                let answer = client.post(&url).bearer_auth(&key).json(&body).send().await;
                let result = match answer {
                    Ok(r) => r.json::<Value>().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                bar.inc(1);
                (result, sent.elapsed())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let wall = started.elapsed();
    bar.finish_and_clear();

    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let (mut sold, mut pending, mut failed, mut total_cents) = (0usize, 0usize, 0usize, 0i64);
    let mut by_buyer: std::collections::BTreeMap<String, usize> = Default::default();
    for (result, took) in &results {
        let _ = histogram.record(took.as_micros() as u64);
        match result {
            Ok(v) if v["status"] == "sold" => {
                sold += 1;
                total_cents += Price::parse_decimal(&v["price"].to_string())
                    .map(|p| p.cents())
                    .unwrap_or(0);
                for b in v["buyer_ids"].as_array().into_iter().flatten() {
                    *by_buyer
                        .entry(b.as_str().unwrap_or("?").to_owned())
                        .or_default() += 1;
                }
            }
            Ok(v) if v["status"] == "pending" => pending += 1,
            _ => failed += 1,
        }
    }
    let mean = if sold > 0 {
        Price::from_cents(total_cents / sold as i64)
    } else {
        Price::ZERO
    };
    let mut out = format!(
        "{n} leads in {:.2} s ({:.0} leads/s)\n  sold:    {sold}\n  pending: {pending}\n  errors:  {failed}\n  total price: {}   mean price: {mean}\n  answer time: p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms\n  sales by buyer:",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64().max(1e-9),
        Price::from_cents(total_cents),
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0,
    );
    for (buyer, count) in by_buyer {
        out.push_str(&format!("\n    {buyer:<14} {count}"));
    }
    let _ = Arc::new(());
    out
}
