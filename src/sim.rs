//! A simulated buyer speaking the buyer protocol on a real socket: configurable bids,
//! latency and post refusals, with counters tests can read. Used by `leadex demo`,
//! `leadex buyer-sim`, the tests and the load runs.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{HttpResponse, HttpServer, web};
use rand::Rng;
use serde_json::{Value, json};

use crate::domain::Price;

/// What the simulated buyer bids.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BidSpec {
    /// Never bids (answers `{"bid": 0}`).
    Nothing,
    Fixed(Price),
    /// Uniform between the two amounts.
    Range(Price, Price),
}

impl BidSpec {
    /// `12.5`, `10-40`, or `0`/`none`.
    pub fn parse(text: &str) -> Result<BidSpec, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("none") {
            return Ok(BidSpec::Nothing);
        }
        let price = |t: &str| Price::parse_decimal(t).map_err(|e| format!("bid `{t}`: {e}"));
        match text.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (price(lo)?, price(hi)?);
                if lo > hi {
                    return Err(format!("bid range `{text}` is reversed"));
                }
                Ok(BidSpec::Range(lo, hi))
            }
            None => {
                let p = price(text)?;
                Ok(if p.is_zero() {
                    BidSpec::Nothing
                } else {
                    BidSpec::Fixed(p)
                })
            }
        }
    }

    fn draw(&self) -> Price {
        match *self {
            BidSpec::Nothing => Price::ZERO,
            BidSpec::Fixed(p) => p,
            BidSpec::Range(lo, hi) => {
                Price::from_cents(rand::rng().random_range(lo.cents()..=hi.cents()))
            }
        }
    }
}

impl std::fmt::Display for BidSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BidSpec::Nothing => f.write_str("nothing"),
            BidSpec::Fixed(p) => write!(f, "{p}"),
            BidSpec::Range(lo, hi) => write!(f, "{lo}-{hi}"),
        }
    }
}

/// Parses `20` or `20-80` (milliseconds).
pub fn parse_range_ms(text: &str) -> Result<(u64, u64), String> {
    let num = |t: &str| t.trim().parse::<u64>().map_err(|e| format!("`{t}`: {e}"));
    match text.split_once('-') {
        Some((lo, hi)) => {
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                Err(format!("range `{text}` is reversed"))
            } else {
                Ok((lo, hi))
            }
        }
        None => num(text).map(|v| (v, v)),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    pub bid: BidSpec,
    pub ping_latency_ms: (u64, u64),
    pub post_latency_ms: (u64, u64),
    /// Share of posts refused with `{"accepted": false}`, 0.0 to 1.0.
    pub reject_rate: f64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            bid: BidSpec::Fixed(Price::from_cents(1000)),
            ping_latency_ms: (0, 0),
            post_latency_ms: (0, 0),
            reject_rate: 0.0,
        }
    }
}

/// Bodies kept for inspection, at most this many of each kind.
const KEPT_BODIES: usize = 10_000;

#[derive(Default)]
pub struct SimStats {
    pub pings: AtomicU64,
    pub posts: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    /// Pings and posts that came over HTTP/2.
    pub http2: AtomicU64,
    ping_bodies: Mutex<Vec<Value>>,
    post_bodies: Mutex<Vec<Value>>,
}

impl SimStats {
    pub fn ping_bodies(&self) -> Vec<Value> {
        self.ping_bodies.lock().expect("bodies").clone()
    }
    pub fn post_bodies(&self) -> Vec<Value> {
        self.post_bodies.lock().expect("bodies").clone()
    }
    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::SeqCst)
    }
    pub fn posts(&self) -> u64 {
        self.posts.load(Ordering::SeqCst)
    }
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
    pub fn http2(&self) -> u64 {
        self.http2.load(Ordering::SeqCst)
    }
}

struct SimState {
    behaviour: Mutex<Behaviour>,
    stats: Arc<SimStats>,
}

pub struct BuyerSim {
    pub addr: SocketAddr,
    pub stats: Arc<SimStats>,
    state: web::Data<SimState>,
    handle: ServerHandle,
}

impl BuyerSim {
    /// Starts a simulated buyer on `listen` (port 0 allowed) inside the running actix system.
    pub fn start(listen: &str, behaviour: Behaviour, workers: usize) -> std::io::Result<BuyerSim> {
        let (server, addr, state) = Self::server(listen, behaviour, workers)?;
        let handle = server.handle();
        let stats = state.stats.clone();
        actix_rt::spawn(server);
        Ok(BuyerSim {
            addr,
            stats,
            state,
            handle,
        })
    }

    /// Runs a simulated buyer until the process is stopped (for `leadex buyer-sim`).
    pub async fn serve_forever(
        listen: &str,
        behaviour: Behaviour,
        workers: usize,
    ) -> std::io::Result<()> {
        let (server, addr, _) = Self::server(listen, behaviour.clone(), workers)?;
        tracing::info!(%addr, ?behaviour, "buyer simulator listening (POST /ping, POST /post, GET /stats)");
        println!(
            "buyer-sim listening on http://{addr} (ping: http://{addr}/ping, post: http://{addr}/post)"
        );
        server.await
    }

    fn server(
        listen: &str,
        behaviour: Behaviour,
        workers: usize,
    ) -> std::io::Result<(actix_web::dev::Server, SocketAddr, web::Data<SimState>)> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let state = web::Data::new(SimState {
            behaviour: Mutex::new(behaviour),
            stats: Arc::new(SimStats::default()),
        });
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            actix_web::App::new()
                .app_data(app_state.clone())
                .app_data(web::JsonConfig::default().limit(1 << 20))
                .route("/ping", web::post().to(ping))
                .route("/post", web::post().to(post))
                .route("/stats", web::get().to(stats))
        })
        .workers(workers.max(1))
        .backlog(4096)
        .disable_signals()
        .shutdown_timeout(1)
        // HTTP/1.1, and h2c for exchanges configured with `http2 = true`.
        .listen_auto_h2c(listener)?
        .run();
        Ok((server, addr, state))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Changes what the buyer does from now on.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().expect("behaviour") = behaviour;
    }

    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }
}

fn keep(bodies: &Mutex<Vec<Value>>, body: Value) {
    let mut bodies = bodies.lock().expect("bodies");
    if bodies.len() < KEPT_BODIES {
        bodies.push(body);
    }
}

async fn sleep_in(range: (u64, u64)) {
    let ms = if range.0 == range.1 {
        range.0
    } else {
        rand::rng().random_range(range.0..=range.1)
    };
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn count_version(state: &SimState, req: &actix_web::HttpRequest) {
    if req.version() == actix_web::http::Version::HTTP_2 {
        state.stats.http2.fetch_add(1, Ordering::SeqCst);
    }
}

async fn ping(
    state: web::Data<SimState>,
    req: actix_web::HttpRequest,
    body: web::Json<Value>,
) -> HttpResponse {
    count_version(&state, &req);
    state.stats.pings.fetch_add(1, Ordering::SeqCst);
    let behaviour = state.behaviour.lock().expect("behaviour").clone();
    let ping_id = body.get("ping_id").cloned().unwrap_or(Value::Null);
    keep(&state.stats.ping_bodies, body.into_inner());
    sleep_in(behaviour.ping_latency_ms).await;
    let bid = behaviour.bid.draw();
    HttpResponse::Ok().json(json!({"bid": bid.as_f64(), "token": ping_id}))
}

async fn post(
    state: web::Data<SimState>,
    req: actix_web::HttpRequest,
    body: web::Json<Value>,
) -> HttpResponse {
    count_version(&state, &req);
    state.stats.posts.fetch_add(1, Ordering::SeqCst);
    let behaviour = state.behaviour.lock().expect("behaviour").clone();
    keep(&state.stats.post_bodies, body.into_inner());
    sleep_in(behaviour.post_latency_ms).await;
    let refuse = behaviour.reject_rate > 0.0
        && rand::rng().random_bool(behaviour.reject_rate.clamp(0.0, 1.0));
    if refuse {
        state.stats.rejected.fetch_add(1, Ordering::SeqCst);
        HttpResponse::Ok().json(json!({"accepted": false, "reason": "not buying this one"}))
    } else {
        state.stats.accepted.fetch_add(1, Ordering::SeqCst);
        HttpResponse::Ok().json(json!({"accepted": true}))
    }
}

async fn stats(state: web::Data<SimState>) -> HttpResponse {
    let s = &state.stats;
    HttpResponse::Ok().json(json!({
        "pings": s.pings(),
        "posts": s.posts(),
        "accepted": s.accepted(),
        "rejected": s.rejected.load(Ordering::SeqCst),
    }))
}
