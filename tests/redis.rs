//! The Redis rate limiter against a real redis-server started by the test: the script agrees
//! with the window math to the millisecond, two `leadex serve` processes share one window, a
//! killed or hung Redis leaves leads answered from node-local limits and is visible, and the
//! shared window resumes when Redis is back.

mod common;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use leadex::ratelimit::window::decide;
use leadex::ratelimit::{Clock, Limit, RateLimiter, RedisLimiter, RedisSettings};
use rand::Rng;
use redis_server::RedisServer;
use serde_json::Value;
use sha2::{Digest, Sha256};

async fn limiter(server: &RedisServer, prefix: &str, timeout_ms: u64) -> RedisLimiter {
    RedisLimiter::connect(
        RedisSettings {
            url: server.url(),
            key_prefix: prefix.into(),
            timeout: Duration::from_millis(timeout_ms),
        },
        Clock::tokio(),
    )
    .await
    .expect("limiter")
}

/// The Redis key of an API key's window (what the handler asks for, under the prefix).
fn window_key(prefix: &str, api_key: &str) -> String {
    let hash = Sha256::digest(api_key.as_bytes());
    format!("{prefix}key:{}", hex::encode(&hash[..16]))
}

#[actix_web::test]
async fn the_script_decides_exactly_like_the_window_math() {
    let redis = RedisServer::start();
    let limiter = limiter(&redis, "t:", 1_000).await;
    // A short window so the run crosses many expiries, including requests that arrive exactly
    // one window after the oldest one (they must be allowed).
    let limit = Limit {
        requests: 3,
        window_ms: 40,
    };
    let mut model = VecDeque::new();
    let mut rng = rand::rng();
    let (mut checks, mut boundary_hits, mut refusals, mut peeks) = (0, 0, 0, 0);
    while checks < 3_000 && (checks < 400 || boundary_hits < 5) {
        let count = rng.random_bool(0.85);
        let got = limiter
            .check("model", limit, count)
            .await
            .expect("redis answers");
        if model
            .front()
            .is_some_and(|t| t + limit.window_ms == got.now_ms)
        {
            boundary_hits += 1;
        }
        let expected = decide(&mut model, got.now_ms, limit, count);
        assert_eq!(got.decision, expected, "check {checks} at {}", got.now_ms);
        refusals += usize::from(!got.decision.allowed);
        peeks += usize::from(!count);
        checks += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..12))).await;
    }
    assert!(
        boundary_hits >= 5,
        "only {boundary_hits} exact-boundary checks in {checks}"
    );
    assert!(
        refusals > 20 && peeks > 20,
        "{refusals} refusals, {peeks} peeks"
    );
    // Refused requests and peeks were never stored: Redis holds what the model holds (or
    // fewer, if entries expired since the last check).
    let stored = redis.integer(&["ZCARD", "t:model"]);
    assert!(
        stored <= model.len() as i64,
        "{stored} stored, model {}",
        model.len()
    );
    assert_eq!(limiter.fallback_checks(), 0);
}

#[actix_web::test]
async fn window_headers_peeks_and_a_flushed_script() {
    let redis = RedisServer::start();
    let limiter = limiter(&redis, "p:", 1_000).await;
    let limit = Limit {
        requests: 5,
        window_ms: 1_500,
    };
    let first = limiter.check("k", limit, true).await.unwrap();
    assert!(first.decision.allowed);
    assert_eq!(first.decision.remaining, 4);
    assert_eq!(first.decision.reset_at_ms, first.now_ms + 1_500);
    for remaining in (0..4).rev() {
        let d = limiter.acquire("k", limit).await;
        assert!(d.allowed && d.remaining == remaining, "{d:?}");
        assert_eq!(
            d.reset_at_ms,
            first.now_ms + 1_500,
            "reset is the oldest + window"
        );
    }
    for _ in 0..10 {
        let peeked = limiter.peek("k", limit).await;
        assert!(!peeked.allowed);
    }
    let refused = limiter.check("k", limit, true).await.unwrap();
    assert!(!refused.decision.allowed && refused.decision.remaining == 0);
    assert_eq!(
        refused.decision.retry_after_ms,
        first.now_ms + 1_500 - refused.now_ms,
        "a slot frees when the oldest request leaves"
    );
    assert_eq!(
        redis.integer(&["ZCARD", "p:k"]),
        5,
        "peeks and refusals are not counted"
    );
    let ttl = redis.integer(&["PTTL", "p:k"]);
    assert!(
        ttl > 0 && ttl <= 1_500,
        "the window expires by itself: {ttl}"
    );
    assert!(limiter.peek("fresh", limit).await.allowed);
    assert_eq!(
        redis.integer(&["EXISTS", "p:fresh"]),
        0,
        "a peek creates nothing"
    );

    // A restarted or flushed Redis forgets the script: it is loaded again transparently.
    assert!(
        redis
            .command(&["SCRIPT", "FLUSH"])
            .unwrap()
            .starts_with("+OK")
    );
    tokio::time::sleep(Duration::from_millis(
        refused.decision.retry_after_ms as u64 + 5,
    ))
    .await;
    let again = limiter
        .check("k", limit, true)
        .await
        .expect("reloaded script");
    assert!(again.decision.allowed, "the oldest left: {again:?}");
    let stored = redis.integer(&["ZCARD", "p:k"]);
    assert!((1..=5).contains(&stored), "{stored}");
    assert_eq!(again.decision.remaining, 5 - stored as u32);
    assert_eq!(limiter.fallback_checks(), 0);
}

#[actix_web::test]
async fn a_hung_redis_costs_at_most_the_timeout_then_nothing() {
    let redis = RedisServer::start();
    let limiter = limiter(&redis, "h:", 20).await;
    let limit = Limit::per_secs(5, 60);
    assert!(limiter.acquire("k", limit).await.allowed);
    assert!(limiter.healthy().await.is_ok());

    redis.pause();
    let mut slowest = Duration::ZERO;
    let mut allowed = 0;
    let started = Instant::now();
    for _ in 0..50 {
        let at = Instant::now();
        allowed += usize::from(limiter.acquire("k", limit).await.allowed);
        slowest = slowest.max(at.elapsed());
    }
    let total = started.elapsed();
    // The first few calls wait out the 20 ms bound; after that the local limiter answers at
    // once until the next probe.
    assert!(
        slowest < Duration::from_millis(200),
        "slowest check {slowest:?}"
    );
    assert!(
        total < Duration::from_millis(500),
        "50 checks took {total:?}"
    );
    assert_eq!(limiter.fallback_checks(), 50);
    assert_eq!(allowed, 5, "the node-local limiter still limits");
    assert!(limiter.is_degraded());
    let why = limiter.healthy().await.unwrap_err();
    assert!(why.contains("node-local") && why.contains("redis"), "{why}");

    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while limiter.is_degraded() && Instant::now() < deadline {
        limiter.acquire("other", limit).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !limiter.is_degraded(),
        "redis is used again once it answers"
    );
    assert!(limiter.healthy().await.is_ok());
    // Back on the shared window, which still holds the request counted before the hang (and
    // the checks that timed out, which Redis ran once it woke: a late check errs on the side
    // of counting).
    let stored = redis.integer(&["ZCARD", "h:k"]);
    assert!((1..=4).contains(&stored), "{stored}");
    let shared = limiter
        .check("k", limit, true)
        .await
        .expect("redis answers");
    assert_eq!(shared.decision.remaining, 5 - (stored as u32 + 1));
}

#[actix_web::test]
async fn a_node_starts_without_redis_and_joins_it_when_it_comes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let started = Instant::now();
    let limiter = RedisLimiter::connect(
        RedisSettings {
            url: format!("redis://127.0.0.1:{port}"),
            key_prefix: "s:".into(),
            timeout: Duration::from_millis(20),
        },
        Clock::tokio(),
    )
    .await
    .expect("a missing Redis does not stop start-up");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(limiter.is_degraded());
    let limit = Limit::per_secs(2, 60);
    let at = Instant::now();
    let answers: Vec<bool> = futures::future::join_all((0..3).map(|_| limiter.acquire("k", limit)))
        .await
        .into_iter()
        .map(|d| d.allowed)
        .collect();
    assert_eq!(answers, [true, true, false], "node-local limits apply");
    assert!(
        at.elapsed() < Duration::from_millis(100),
        "no waiting on a Redis known down"
    );
    assert!(limiter.healthy().await.is_err());

    let redis = RedisServer::start_on(port).expect("redis on the port");
    let deadline = Instant::now() + Duration::from_secs(15);
    while limiter.healthy().await.is_err() {
        assert!(Instant::now() < deadline, "the limiter did not find redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        limiter.acquire("k", limit).await.allowed,
        "a fresh shared window"
    );
    assert_eq!(redis.integer(&["ZCARD", "s:k"]), 1);
}

/// One `leadex serve` process; killed when dropped.
struct Node {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
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
        let log = Arc::new(Mutex::new(Vec::new()));
        let (bound, addr) = std::sync::mpsc::channel();
        let lines = log.clone();
        // Reads the log to the end so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "leadex listening"
                    && let Some(addr) = event["addr"].as_str().and_then(|a| a.parse().ok())
                {
                    let _ = bound.send(addr);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr: SocketAddr = match addr.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "leadex serve did not log its address: {:?}",
                    log.lock().unwrap()
                );
            }
        };
        Node { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log_contains(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nodes with the same settings and the same Redis (each its own data folder: the embedded
/// store is per node). The Redis timeout is generous so a busy test machine cannot turn a slow
/// answer into a fallback that would blur the exact counts.
fn nodes(count: usize, redis: &RedisServer, rate_limit: &str, buyer: &str) -> Vec<Node> {
    (0..count)
        .map(|_| {
            let data = data_dir();
            let rate_limit = format!(
                "backend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"it:\"\ntimeout_ms = 250\n{rate_limit}",
                redis.url()
            );
            let file = data_dir().join("leadex.toml");
            std::fs::write(&file, config_with(&data, &rate_limit, "", buyer)).unwrap();
            Node::start(&file)
        })
        .collect()
}

struct Answer {
    status: u16,
    limit: Option<u32>,
    remaining: Option<u32>,
    reset: Option<i64>,
    retry_after: Option<i64>,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post(client: &reqwest::Client, node: &Node, key: &str) -> Answer {
    let response = client
        .post(node.url("/api/leads"))
        .bearer_auth(key)
        .json(&lead())
        .send()
        .await
        .expect("answered");
    answer(response)
}

fn answer(response: reqwest::Response) -> Answer {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Answer {
        status: response.status().as_u16(),
        limit: header("x-ratelimit-limit").map(|v| v.parse().unwrap()),
        remaining: header("x-ratelimit-remaining").map(|v| v.parse().unwrap()),
        reset: header("x-ratelimit-reset").map(|v| v.parse().unwrap()),
        retry_after: header("retry-after").map(|v| v.parse().unwrap()),
    }
}

async fn metric(client: &reqwest::Client, node: &Node, name: &str) -> f64 {
    let text = client
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

async fn readyz(client: &reqwest::Client, node: &Node) -> (u16, Value) {
    let response = client.get(node.url("/readyz")).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn unix_secs() -> i64 {
    leadex::clock::now_ms() / 1000
}

#[actix_web::test]
async fn two_nodes_share_one_window() {
    let redis = RedisServer::start();
    let buyer = sim("10", 0);
    let nodes = nodes(
        2,
        &redis,
        "requests = 60\nwindow_secs = 60",
        &ping_buyer("a", &buyer, ""),
    );
    let client = client();
    let started = Instant::now();
    let mut resets = HashSet::new();
    let mut statuses = [[0usize; 2]; 2];
    for i in 0..90u32 {
        let node = i as usize % 2;
        let a = post(&client, &nodes[node], KEY).await;
        assert_eq!(a.limit, Some(60), "request {i}");
        resets.insert(a.reset.expect("reset header"));
        if i < 60 {
            assert_eq!(a.status, 200, "request {i} on node {node}");
            assert_eq!(
                a.remaining,
                Some(59 - i),
                "one count across nodes (request {i})"
            );
            assert_eq!(a.retry_after, None);
            statuses[node][0] += 1;
        } else {
            assert_eq!(a.status, 429, "request {i} on node {node}");
            assert_eq!(a.remaining, Some(0));
            let retry = a.retry_after.expect("Retry-After on 429");
            assert!((1..=60).contains(&retry), "Retry-After {retry}");
            // The slot frees when the first request leaves, which is also the reset time.
            let reset = a.reset.unwrap();
            assert!(
                (reset - (unix_secs() + retry)).abs() <= 1,
                "reset {reset}, retry {retry}"
            );
            statuses[node][1] += 1;
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "90 requests took {took:?}");
    assert_eq!(
        statuses,
        [[30, 15], [30, 15]],
        "both nodes accepted and refused"
    );
    assert_eq!(
        resets.len(),
        1,
        "every answer names the same reset: {resets:?}"
    );
    assert_eq!(
        buyer.stats.posts(),
        60,
        "only accepted leads reached the buyer"
    );
    assert_eq!(redis.integer(&["ZCARD", &window_key("it:", KEY)]), 60);
    for node in &nodes {
        assert_eq!(
            metric(&client, node, "leadex_rate_limit_backend_errors_total").await,
            0.0
        );
        let (status, body) = readyz(&client, node).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ready")),
            "{body}"
        );
        assert_eq!(body["rate_limit"], "ok (redis)");
    }
}

#[actix_web::test]
async fn failed_authentication_is_limited_across_nodes() {
    let redis = RedisServer::start();
    let buyer = sim("10", 0);
    let nodes = nodes(
        2,
        &redis,
        "requests = 60\nauth_failures = 3\nauth_failure_window_secs = 60",
        &ping_buyer("a", &buyer, ""),
    );
    let client = client();
    for i in 0..3 {
        let a = post(&client, &nodes[i % 2], "not-a-key").await;
        assert_eq!(a.status, 401, "failure {i}");
    }
    // Node 1 has seen one failure itself; the shared count is what refuses.
    let a = post(&client, &nodes[1], "not-a-key").await;
    assert_eq!(a.status, 429);
    assert!(a.retry_after.is_some_and(|r| (1..=60).contains(&r)));
    // Over the limit, the right key is refused too, as a wrong one is.
    assert_eq!(post(&client, &nodes[0], KEY).await.status, 429);
    assert_eq!(redis.integer(&["ZCARD", "it:authfail:127.0.0.1"]), 3);
}

#[actix_web::test]
async fn concurrent_guesses_get_no_more_tries_than_the_limit() {
    let redis = RedisServer::start();
    let buyer = sim("10", 0);
    let nodes = nodes(
        2,
        &redis,
        "requests = 60\nauth_failures = 3\nauth_failure_window_secs = 60",
        &ping_buyer("a", &buyer, ""),
    );
    let client = client();
    // Forty wrong keys at once, over both nodes: each is counted as it is refused, so no more
    // than the limit are told "wrong key" however many arrive together.
    let guesses = (0..40).map(|i| {
        let client = client.clone();
        let node = &nodes[i % 2];
        async move { post(&client, node, &format!("guess-{i}")).await.status }
    });
    let statuses = futures::future::join_all(guesses).await;
    let refused = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((refused, limited), (3, 37), "{statuses:?}");
    assert_eq!(redis.integer(&["ZCARD", "it:authfail:127.0.0.1"]), 3);
    assert_eq!(post(&client, &nodes[0], KEY).await.status, 429);
}

#[actix_web::test]
async fn keys_of_different_suppliers_never_share_a_window() {
    let redis = RedisServer::start();
    let buyer = sim("10", 0);
    let rate_limit = format!(
        "backend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"sup:\"\nrequests = 5\nwindow_secs = 60",
        redis.url()
    );
    let app = TestApp::spawn(&config_with(
        &data_dir(),
        &rate_limit,
        "",
        &ping_buyer("a", &buyer, ""),
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(app.post_lead(&lead()).await.0, 200);
    }
    let (status, headers, _) = app.post_lead_as(KEY, &lead()).await;
    assert_eq!(status, 429);
    assert_eq!(headers["x-ratelimit-remaining"], "0");

    let other = app
        .client
        .get(app.url("/api/leads/01J00000000000000000000000"))
        .bearer_auth(OTHER_KEY)
        .send()
        .await
        .unwrap();
    let other = answer(other);
    assert_eq!(other.status, 404, "the other supplier is not limited");
    assert_eq!((other.limit, other.remaining), (Some(5), Some(4)));

    assert_eq!(redis.integer(&["ZCARD", &window_key("sup:", KEY)]), 5);
    assert_eq!(redis.integer(&["ZCARD", &window_key("sup:", OTHER_KEY)]), 1);
    app.stop().await;
}

#[actix_web::test]
async fn a_redis_outage_falls_back_is_visible_and_heals() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let buyer = sim("10", 0);
    let nodes = nodes(
        2,
        &redis,
        "requests = 30\nwindow_secs = 60",
        &ping_buyer("a", &buyer, ""),
    );
    let client = client();
    for i in 0..10u32 {
        let a = post(&client, &nodes[i as usize % 2], KEY).await;
        assert_eq!((a.status, a.remaining), (200, Some(29 - i)));
    }

    // Redis dies while leads are in flight on both nodes.
    let (in_flight, ()) = futures::join!(
        futures::future::join_all((0..10).map(|i| post(&client, &nodes[i % 2], KEY))),
        async {
            tokio::time::sleep(Duration::from_millis(3)).await;
            redis.kill();
        }
    );
    for a in in_flight {
        assert_eq!(a.status, 200, "a lead in flight when Redis died");
    }
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let at = Instant::now();
        let a = post(&client, &nodes[i % 2], KEY).await;
        slowest = slowest.max(at.elapsed());
        // Each node now limits on its own (30 per node); every lead is still answered.
        assert_eq!(a.status, 200, "request {i} during the outage");
        assert_eq!(a.limit, Some(30));
        assert!(a.remaining.is_some() && a.reset.is_some());
    }
    assert!(
        slowest < Duration::from_secs(2),
        "slowest answer during the outage {slowest:?}"
    );
    for node in &nodes {
        assert!(metric(&client, node, "leadex_rate_limit_backend_errors_total").await >= 10.0);
        assert_eq!(
            metric(&client, node, "leadex_rate_limit_fallback_active").await,
            1.0
        );
        let (status, body) = readyz(&client, node).await;
        assert_eq!(
            status, 503,
            "ready means the rate-limit backend answers (CONTRACT §5)"
        );
        assert_eq!(body["status"], "unavailable", "{body}");
        assert_eq!(body["storage"], "ok", "{body}");
        let why = body["rate_limit"].as_str().unwrap();
        assert!(
            why.contains("node-local") && why.contains(&port.to_string()),
            "{why}"
        );
        assert!(
            node.log_contains("answered by the node-local limiter"),
            "the outage is logged"
        );
    }

    let _redis = RedisServer::start_on(port).expect("redis restarts on the same port");
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in &nodes {
        while readyz(&client, node).await.1["status"] != "ready" {
            assert!(
                Instant::now() < deadline,
                "the node did not return to redis"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The restarted Redis kept nothing (persistence off): one fresh window, shared again.
    for i in 0..35u32 {
        let a = post(&client, &nodes[i as usize % 2], KEY).await;
        if i < 30 {
            assert_eq!(
                (a.status, a.remaining),
                (200, Some(29 - i)),
                "request {i} after"
            );
        } else {
            assert_eq!((a.status, a.remaining), (429, Some(0)), "request {i} after");
        }
    }
    for node in &nodes {
        assert_eq!(
            metric(&client, node, "leadex_rate_limit_fallback_active").await,
            0.0
        );
    }
}
