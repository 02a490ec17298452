//! Coordination across nodes against a real redis-server started by the test: the Redis
//! coordinator's reservations, claims and leases, then two `leadex serve` processes (each with
//! its own embedded store, sharing one Redis) holding a buyer's cap exactly, selling a person
//! once, and running one auction per Idempotency-Key; and what a Redis outage refuses.

mod common;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use leadex::coord::{Coordinator, RedisCoordinator};
use leadex::domain::caps::{CounterCheck, day_window};
use leadex::ratelimit::RedisSettings;
use redis_server::RedisServer;
use serde_json::{Value, json};

async fn coordinator(server: &RedisServer, prefix: &str, timeout_ms: u64) -> RedisCoordinator {
    RedisCoordinator::connect(RedisSettings {
        url: server.url(),
        key_prefix: prefix.into(),
        timeout: Duration::from_millis(timeout_ms),
    })
    .await
    .expect("coordinator")
}

fn check(key: &str, limit: i64, amount: i64, expires_at_ms: i64) -> CounterCheck {
    CounterCheck {
        key: key.into(),
        limit,
        amount,
        expires_at_ms,
    }
}

fn now_ms() -> i64 {
    leadex::clock::now_ms()
}

/// A counter's value as Redis holds it (a bulk string reply).
fn stored(redis: &RedisServer, key: &str) -> i64 {
    let reply = redis.command(&["GET", key]).expect("redis answers");
    reply
        .lines()
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no counter at {key}: {reply}"))
}

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[actix_web::test]
async fn reservations_are_all_or_none_and_exact_under_200_concurrent_calls() {
    let redis = RedisServer::start();
    let coord = Arc::new(coordinator(&redis, "r:", 2_000).await);
    let end = now_ms() + 60_000;

    // All or none: the budget has no room, so the cap is not counted either.
    let sale = [check("cap", 10, 1, end), check("budget", 100, 60, end)];
    assert!(coord.reserve(&sale, now_ms()).await.unwrap());
    assert!(
        !coord.reserve(&sale, now_ms()).await.unwrap(),
        "60 + 60 > 100"
    );
    assert_eq!(coord.counter("cap").await.unwrap(), 1);
    assert_eq!(coord.counter("budget").await.unwrap(), 60);
    assert!(coord.would_fit(&sale[..1], now_ms()).await.unwrap());
    assert!(!coord.would_fit(&sale, now_ms()).await.unwrap());
    assert!(
        coord
            .would_fit(&[check("never-used", 1, 1, end)], now_ms())
            .await
            .unwrap()
    );
    assert_eq!(
        redis.integer(&["EXISTS", "r:never-used"]),
        0,
        "a read creates nothing"
    );
    assert!(coord.reserve(&[], now_ms()).await.unwrap(), "no caps");

    // 200 at once against a limit of 10: exactly 10 win.
    let capped = check("cap10", 10, 1, end);
    let wins = futures::future::join_all((0..200).map(|_| {
        let coord = coord.clone();
        let capped = capped.clone();
        async move { coord.reserve(&[capped], now_ms()).await.unwrap() }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 10);
    assert_eq!(stored(&redis, "r:cap10"), 10);

    // A released slot is sold again, once.
    coord.release(std::slice::from_ref(&capped)).await.unwrap();
    assert_eq!(coord.counter("cap10").await.unwrap(), 9);
    assert!(
        coord
            .reserve(std::slice::from_ref(&capped), now_ms())
            .await
            .unwrap()
    );
    assert!(
        !coord
            .reserve(std::slice::from_ref(&capped), now_ms())
            .await
            .unwrap()
    );
    // Releasing never goes below zero, and a counter whose window ended is not revived.
    for _ in 0..3 {
        coord.release(&sale).await.unwrap();
    }
    assert_eq!(coord.counter("cap").await.unwrap(), 0);
    coord.release(&[check("gone", 5, 1, end)]).await.unwrap();
    assert_eq!(redis.integer(&["EXISTS", "r:gone"]), 0);
}

#[actix_web::test]
async fn a_counter_expires_at_the_end_of_its_window() {
    let redis = RedisServer::start();
    let coord = coordinator(&redis, "w:", 2_000).await;
    let end = now_ms() + 400;
    let hour = check("hour", 1, 1, end);
    assert!(
        coord
            .reserve(std::slice::from_ref(&hour), now_ms())
            .await
            .unwrap()
    );
    assert!(
        !coord
            .reserve(std::slice::from_ref(&hour), now_ms())
            .await
            .unwrap()
    );
    // It expires a minute after its window's end at the latest (the grace for a node whose
    // clock runs behind Redis', which still names this window; the next one has its own key).
    let ttl = redis.integer(&["PTTL", "w:hour"]);
    assert!(
        (400..=60_000).contains(&ttl),
        "expires within a minute of the window's end: {ttl}"
    );
    // A longer window in the same reservation keeps its own end.
    let day_end = now_ms() + 86_400_000;
    assert!(
        coord
            .reserve(&[check("day", 5, 1, day_end)], now_ms())
            .await
            .unwrap()
    );
    let ttl = redis.integer(&["PTTL", "w:day"]);
    assert!((86_000_000..=86_400_000).contains(&ttl), "{ttl}");
    assert!(
        coord
            .reserve(&[check("hour-next", 1, 1, now_ms() + 3_600_000)], now_ms())
            .await
            .unwrap(),
        "a new window starts empty"
    );
}

#[actix_web::test]
async fn claims_are_all_or_none_exclusive_and_expire_and_leases_belong_to_their_node() {
    let redis = RedisServer::start();
    let node_a = Arc::new(coordinator(&redis, "c:", 2_000).await);
    let node_b = coordinator(&redis, "c:", 2_000).await;
    let person = keys(&["phone/1", "email/a"]);
    let now = now_ms();
    let wins = futures::future::join_all((0..50).map(|_| {
        let coord = node_a.clone();
        let person = person.clone();
        async move { coord.claim(&person, now, now + 60_000).await.unwrap() }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "exactly one claim");
    assert!(!node_b.claim(&person, now, now + 60_000).await.unwrap());
    // One held key refuses the whole claim, and the free key is not taken.
    assert!(
        !node_b
            .claim(&keys(&["email/a", "email/b"]), now, now + 60_000)
            .await
            .unwrap()
    );
    assert_eq!(redis.integer(&["EXISTS", "c:email/b"]), 0);
    assert!(
        node_b
            .claim(&keys(&["email/b"]), now, now + 60_000)
            .await
            .unwrap()
    );
    let ttl = redis.integer(&["PTTL", "c:phone/1"]);
    assert!(ttl > 59_000 && ttl <= 60_000, "{ttl}");
    node_a.unclaim(&person).await.unwrap();
    assert!(
        node_b
            .claim(&person, now_ms(), now_ms() + 300)
            .await
            .unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node_a
        .claim(&person, now_ms(), now_ms() + 60_000)
        .await
        .unwrap()
    {
        assert!(Instant::now() < deadline, "the claim did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Leases: one holder; only the holder ends it; they expire.
    let now = now_ms();
    assert!(node_a.lease("retry/1", now, now + 60_000).await.unwrap());
    assert!(!node_b.lease("retry/1", now, now + 60_000).await.unwrap());
    node_b.end_lease("retry/1").await.unwrap();
    assert_eq!(
        redis.integer(&["EXISTS", "c:retry/1"]),
        1,
        "another node cannot end a lease it does not hold"
    );
    // Only the holder moves its end.
    assert!(
        !node_b
            .extend_lease("retry/1", now, now + 3_600_000)
            .await
            .unwrap()
    );
    assert!(redis.integer(&["PTTL", "c:retry/1"]) <= 60_000);
    assert!(
        node_a
            .extend_lease("retry/1", now, now + 3_600_000)
            .await
            .unwrap()
    );
    assert!(redis.integer(&["PTTL", "c:retry/1"]) > 3_000_000);
    assert!(
        !node_a
            .extend_lease("retry/none", now, now + 1_000)
            .await
            .unwrap()
    );
    node_a.end_lease("retry/1").await.unwrap();
    assert!(
        node_b
            .lease("retry/1", now_ms(), now_ms() + 200)
            .await
            .unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node_a
        .lease("retry/1", now_ms(), now_ms() + 60_000)
        .await
        .unwrap()
    {
        assert!(Instant::now() < deadline, "the lease did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_counter_whose_window_ended_by_redis_clock_still_counts() {
    // A node whose clock runs behind Redis' still names the window Redis already ended; its
    // counter must not be deleted on the spot, or every reservation in that gap fits.
    let redis = RedisServer::start();
    let coord = coordinator(&redis, "skew:", 1000).await;
    let ended = now_ms() - 10;
    let mut reserved = 0;
    for _ in 0..5 {
        if coord
            .reserve(&[check("cap", 1, 1, ended)], now_ms())
            .await
            .unwrap()
        {
            reserved += 1;
        }
    }
    assert_eq!(reserved, 1, "a cap of 1 holds");
    assert_eq!(stored(&redis, "skew:cap"), 1);
}

#[actix_web::test]
async fn a_dead_or_hung_redis_is_an_error_within_the_timeout() {
    let mut redis = RedisServer::start();
    let coord = coordinator(&redis, "d:", 100).await;
    let end = now_ms() + 60_000;
    assert!(
        coord
            .reserve(&[check("cap", 5, 1, end)], now_ms())
            .await
            .unwrap()
    );

    redis.pause();
    let at = Instant::now();
    assert!(
        coord
            .reserve(&[check("cap", 5, 1, end)], now_ms())
            .await
            .is_err()
    );
    assert!(coord.claim(&keys(&["p"]), now_ms(), end).await.is_err());
    assert!(
        at.elapsed() < Duration::from_millis(1_000),
        "{:?}",
        at.elapsed()
    );
    // Calls without anything to decide do not need Redis.
    assert!(coord.reserve(&[], now_ms()).await.unwrap());
    assert!(coord.would_fit(&[], now_ms()).await.unwrap());
    redis.resume();
    redis.kill();
    let at = Instant::now();
    assert!(
        coord
            .would_fit(&[check("cap", 5, 1, end)], now_ms())
            .await
            .is_err()
    );
    assert!(coord.lease("l", now_ms(), end).await.is_err());
    assert!(
        at.elapsed() < Duration::from_millis(1_000),
        "{:?}",
        at.elapsed()
    );
}

/// One `leadex serve` process; killed when dropped.
struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Node {
    fn start(config: &Path) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_leadex"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("leadex serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let (bound, addr) = std::sync::mpsc::channel();
        // Reads the log to the end so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "leadex listening"
                    && let Some(addr) = event["addr"].as_str().and_then(|a| a.parse().ok())
                {
                    let _ = bound.send(addr);
                }
            }
        });
        let mut node = Node {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        node.addr = addr
            .recv_timeout(Duration::from_secs(30))
            .expect("leadex serve logs its address");
        node
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coordination(redis: &RedisServer) -> String {
    format!(
        "\n[coordination]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"it:\"\ntimeout_ms = 2000\n",
        redis.url()
    )
}

/// Two nodes with the same settings sharing `redis`, each with its own data folder.
fn two_nodes(redis: &RedisServer, campaign_extra: &str, buyers: &str, roomy: bool) -> Vec<Node> {
    (0..2)
        .map(|_| {
            let mut text = config(&data_dir(), campaign_extra, buyers) + &coordination(redis);
            if roomy {
                text = text
                    .replacen("ping_timeout_ms = 300", "ping_timeout_ms = 3000", 1)
                    .replacen("post_timeout_ms = 1000", "post_timeout_ms = 5000", 1);
            }
            let file = data_dir().join("leadex.toml");
            std::fs::write(&file, text).unwrap();
            Node::start(&file)
        })
        .collect()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn post(
    client: &reqwest::Client,
    node: &Node,
    body: &Value,
    idempotency_key: Option<&str>,
) -> (u16, Value) {
    let mut request = client
        .post(node.url("/api/leads"))
        .bearer_auth(KEY)
        .json(body);
    if let Some(key) = idempotency_key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn person(n: u32) -> Value {
    let mut lead = lead();
    lead["phone"] = json!(format!("555-{:03}-{:04}", 300 + n / 10_000, n % 10_000));
    lead["email"] = json!(format!("someone{n}@example.com"));
    lead
}

#[actix_web::test]
async fn two_nodes_sell_a_daily_cap_of_10_exactly_under_100_concurrent_leads() {
    let redis = RedisServer::start();
    let (capped, other) = (sim("30", 2), sim("10", 2));
    let buyers =
        ping_buyer("cap10", &capped, "daily_cap = 10") + &ping_buyer("cap10-other", &other, "");
    let nodes = two_nodes(&redis, "", &buyers, true);
    let client = client();
    let body = lead();
    let answers =
        futures::future::join_all((0..100).map(|i| post(&client, &nodes[i % 2], &body, None)))
            .await;
    let mut to_capped = [0; 2];
    for (i, (status, answer)) in answers.iter().enumerate() {
        assert_eq!(
            (*status, answer["status"].as_str()),
            (200, Some("sold")),
            "lead {i}: {answer}"
        );
        if answer["buyer_ids"] == json!(["cap10"]) {
            to_capped[i % 2] += 1;
        } else {
            assert_eq!(answer["buyer_ids"], json!(["cap10-other"]), "{answer}");
        }
    }
    assert_eq!(
        to_capped[0] + to_capped[1],
        10,
        "exactly the cap across nodes: {to_capped:?}"
    );
    assert_eq!(capped.stats.posts(), 10, "no post beyond the cap");
    assert_eq!(other.stats.accepted(), 90);
    let day = day_window(&jiff::tz::TimeZone::UTC, now_ms());
    let key = format!("it:cap/cap10/day/{}", day.start_ms);
    assert_eq!(stored(&redis, &key), 10);
    let ttl = redis.integer(&["PTTL", key.as_str()]);
    assert!(ttl > 0 && ttl <= day.end_ms - now_ms() + 1_000, "{ttl}");

    // Full on both nodes: the capped buyer is not even pinged.
    let pings = capped.stats.pings();
    for node in &nodes {
        let (status, answer) = post(&client, node, &body, None).await;
        assert_eq!(
            (status, &answer["buyer_ids"]),
            (200, &json!(["cap10-other"]))
        );
    }
    assert_eq!(capped.stats.pings(), pings);
}

#[actix_web::test]
async fn the_same_person_on_two_nodes_at_once_is_sold_once() {
    let redis = RedisServer::start();
    let buyer = sim("10", 0);
    let nodes = two_nodes(
        &redis,
        "dedupe_days = 30",
        &ping_buyer("dedupe-buyer", &buyer, ""),
        true,
    );
    let client = client();
    for n in 0..5 {
        let lead = person(n);
        let (a, b) = futures::join!(
            post(&client, &nodes[0], &lead, None),
            post(&client, &nodes[1], &lead, None)
        );
        let mut statuses = [a.0, b.0];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 409], "person {n}: {} / {}", a.1, b.1);
        let refused = if a.0 == 409 { &a.1 } else { &b.1 };
        assert_eq!(refused["error"], "Duplicate lead");
        // Later, on either node, still a duplicate.
        for node in &nodes {
            assert_eq!(post(&client, node, &lead, None).await.0, 409);
        }
    }
    assert_eq!(buyer.stats.accepted(), 5, "each person sold once");
}

#[actix_web::test]
async fn one_idempotency_key_on_two_nodes_at_once_runs_one_auction() {
    let redis = RedisServer::start();
    // Slow enough that both requests are in flight together.
    let buyer = sim("10", 150);
    let nodes = two_nodes(&redis, "", &ping_buyer("idem-buyer", &buyer, ""), false);
    let client = client();
    let body = lead();
    let (a, b) = futures::join!(
        post(&client, &nodes[0], &body, Some("same-key-1")),
        post(&client, &nodes[1], &body, Some("same-key-1"))
    );
    assert_eq!(buyer.stats.pings(), 1, "one auction: {} / {}", a.1, b.1);
    // The first node answers; the other waited for an answer in its own store (each node has
    // its own here) and, finding none within the auction's deadline, asks for a retry rather
    // than auctioning the lead again.
    let (winner, first, other) = if a.0 == 200 { (0, a, b) } else { (1, b, a) };
    assert_eq!(first.0, 200, "{}", first.1);
    assert_eq!(other.0, 503, "{}", other.1);
    // A repeat on the node that ran it replays the answer.
    let (status, again) = post(&client, &nodes[winner], &body, Some("same-key-1")).await;
    assert_eq!((status, &again["lead_id"]), (200, &first.1["lead_id"]));
    assert_eq!(buyer.stats.pings(), 1);
    // A different key is a different lead.
    assert_eq!(
        post(&client, &nodes[1 - winner], &body, Some("key-2"))
            .await
            .0,
        200
    );
    assert_eq!(buyer.stats.pings(), 2);
}

#[actix_web::test]
async fn a_hung_redis_costs_the_auction_one_cap_timeout_not_one_per_capped_buyer() {
    let redis = RedisServer::start();
    let capped: Vec<_> = (0..4).map(|_| sim("30", 0)).collect();
    let free = sim("10", 0);
    let mut buyers = ping_buyer("free", &free, "");
    for (i, sim) in capped.iter().enumerate() {
        buyers += &ping_buyer(&format!("capped-{i}"), sim, "daily_cap = 50");
    }
    // Cap checks time out after 100 ms; the campaign's pings have 300 ms from the start.
    let text = config(&data_dir(), "", &buyers) + &coordination(&redis);
    let app = TestApp::spawn(&text.replace("timeout_ms = 2000", "timeout_ms = 100")).await;
    let (status, answer) = app.post_lead(&lead()).await;
    assert_eq!(
        (status, answer["price"].as_f64()),
        (200, Some(30.0)),
        "{answer}"
    );

    redis.pause();
    // The four cap checks wait together: one timeout, and the uncapped buyer is still pinged
    // in time. Asked one after another they took 400 ms and its ping went out too late.
    let (status, answer) = app.post_lead(&person(7)).await;
    redis.resume();
    assert_eq!(
        (status, &answer["buyer_ids"]),
        (200, &json!(["free"])),
        "{answer}"
    );
    assert_eq!(free.stats.posts(), 1);
    app.stop().await;
}

#[actix_web::test]
async fn a_redis_outage_refuses_capped_buyers_and_deduping_campaigns_only() {
    let mut redis = RedisServer::start();
    let (capped, free) = (sim("30", 0), sim("10", 0));
    let solar = |id: &str, sim: &leadex::sim::BuyerSim, extra: &str| {
        format!(
            "\n[[buyers]]\nid = \"{id}\"\ncampaigns = [\"acme-solar\"]\nping_url = \"{}\"\npost_url = \"{}\"\n{extra}\n",
            sim.url("/ping"),
            sim.url("/post")
        )
    };
    let dedupe_buyer = sim("10", 0);
    let buyers = ping_buyer("dedupe-buyer", &dedupe_buyer, "")
        + &solar("solar-capped", &capped, "daily_cap = 50")
        + &solar("solar-free", &free, "");
    let text = config(&data_dir(), "dedupe_days = 30", &buyers) + &coordination(&redis);
    let app = TestApp::spawn(&text.replace("timeout_ms = 2000", "timeout_ms = 200")).await;
    let mut solar_lead = lead();
    solar_lead["category"] = json!("Solar");

    let (status, answer) = app.post_lead(&solar_lead).await;
    assert_eq!(
        (status, &answer["buyer_ids"]),
        (200, &json!(["solar-capped"])),
        "{answer}"
    );
    assert_eq!(app.post_lead(&person(1)).await.0, 200);

    redis.kill();
    let (status, answer) = app.post_lead(&solar_lead).await;
    assert_eq!(
        (status, &answer["buyer_ids"]),
        (200, &json!(["solar-free"])),
        "the uncapped buyer keeps buying: {answer}"
    );
    let page = app.metrics().await;
    let skipped = page
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "leadex_buyer_skipped_total{buyer=\"solar-capped\",reason=\"caps_unavailable\"} ",
            )
        })
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(
        skipped.is_some_and(|n| n >= 1.0),
        "an outage is not a full cap: {skipped:?}"
    );
    let (status, headers, answer) = app.post_lead_as(KEY, &person(2)).await;
    assert_eq!(
        status, 503,
        "a deduping campaign cannot promise one sale: {answer}"
    );
    assert!(headers.contains_key("retry-after"));
    let keyed = app
        .client
        .post(app.url("/api/leads"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "during-the-outage")
        .json(&solar_lead)
        .send()
        .await
        .unwrap();
    assert_eq!(
        keyed.status().as_u16(),
        503,
        "an Idempotency-Key cannot be claimed across nodes"
    );
    assert_eq!(
        capped.stats.posts(),
        1,
        "the capped buyer got nothing during the outage"
    );
    assert_eq!(dedupe_buyer.stats.pings(), 1);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "still in the load balancer");
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["coordination"].as_str().unwrap().contains("redis"),
        "{ready}"
    );
    assert!(
        app.metrics()
            .await
            .lines()
            .any(|l| l == "leadex_coordination_backend_up{backend=\"redis\"} 0"),
        "the outage is visible in metrics"
    );

    let _redis = RedisServer::start_on(redis.port).expect("redis restarts on its port");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = app.post_lead(&person(3)).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "leads were not taken again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, answer) = app.post_lead(&solar_lead).await;
    assert_eq!(
        (status, &answer["buyer_ids"]),
        (200, &json!(["solar-capped"])),
        "{answer}"
    );
    app.stop().await;
}
