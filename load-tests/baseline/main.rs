//! The smallest exchange on leadex's own HTTP stack (actix-web server, reqwest client): parse
//! the lead, ping every buyer at once, pick the best bid, post to it, answer. No auth,
//! validation, storage, limiter or metrics. `load-tests/run.sh` drives it beside leadex so
//! every leadex figure is also a ratio to what this machine allows.
//!
//! With `--sync-dir` it also keeps each outcome durably before answering, the least a store
//! can do: one thread appends every waiting outcome to a zero-filled file with one durable
//! write (as leadex's write-ahead log does it), then answers them all (group commit). What
//! that adds to the answer time is this machine's disk, which leadex's durable answers pay too.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Parser;
use futures::future::join_all;
use leadex::storage::wal::{SyncFile, padding_to_block};
use serde_json::{Value, json};

// mimalloc: less CPU per allocation than glibc's malloc and memory given back after bursts
// (BENCHMARKS.md). The baseline uses it too, so the ratio compares like with like.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Clone)]
#[command(
    name = "fanout-baseline",
    about = "Bare ping-post fan-out for comparison with leadex"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    /// Buyer base URLs (`http://127.0.0.1:9101`), comma-separated; `/ping` and `/post` are
    /// appended.
    #[arg(long, value_delimiter = ',', required = true)]
    buyers: Vec<String>,
    /// Bids arriving later are ignored.
    #[arg(long, default_value_t = 300)]
    ping_timeout_ms: u64,
    #[arg(long, default_value_t = 2000)]
    post_timeout_ms: u64,
    /// HTTP worker threads (leadex uses one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Keep each outcome durably in a file in this folder before answering.
    #[arg(long)]
    sync_dir: Option<PathBuf>,
}

/// Size of the outcome file; appends wrap around to its start when full.
const LOG_BYTES: u64 = 64 << 20;

type Durable = (Vec<u8>, tokio::sync::oneshot::Sender<()>);

/// Starts the thread that makes outcomes durable in `dir`, and returns where to send them.
/// Each group is `len u32 | record` for each outcome, then zeros to a block boundary (at least
/// four, read as a zero `len`), written the way leadex's log is (`SyncFile`: direct I/O with
/// `O_DSYNC` where the filesystem takes it, else a write and an `fdatasync`).
fn start_log(dir: &Path) -> std::io::Result<mpsc::Sender<Durable>> {
    let mut file = SyncFile::open(&dir.join("outcomes.log"), LOG_BYTES)?;
    File::open(dir)?.sync_all()?;
    let (tx, rx) = mpsc::channel::<Durable>();
    std::thread::Builder::new()
        .name("outcome-log".into())
        .spawn(move || {
            let mut pos = 0u64;
            let mut group = Vec::new();
            let mut waiting = Vec::new();
            while let Ok(first) = rx.recv() {
                group.clear();
                for (record, done) in std::iter::once(first).chain(rx.try_iter()) {
                    group.extend_from_slice(&(record.len() as u32).to_le_bytes());
                    group.extend_from_slice(&record);
                    waiting.push(done);
                }
                group.resize(group.len() + padding_to_block(group.len(), 4), 0);
                if pos + group.len() as u64 > LOG_BYTES {
                    pos = 0;
                }
                file.write_durably(&group, pos).expect("outcome log write");
                pos += group.len() as u64;
                for done in waiting.drain(..) {
                    let _ = done.send(());
                }
            }
        })?;
    Ok(tx)
}

struct Shared {
    client: reqwest::Client,
    /// Parsed once, as leadex parses its buyers' URLs once.
    pings: Vec<reqwest::Url>,
    posts: Vec<reqwest::Url>,
    ping_timeout: Duration,
    post_timeout: Duration,
    log: Option<mpsc::Sender<Durable>>,
}

impl Shared {
    /// Answers `outcome`, once it is durable when there is a log.
    async fn answer(&self, lead: &Value, outcome: Value) -> HttpResponse {
        if let Some(log) = &self.log {
            let record = serde_json::to_vec(&json!({ "lead": lead, "outcome": &outcome }))
                .expect("serialises");
            let (done, stored) = tokio::sync::oneshot::channel();
            if log.send((record, done)).is_err() || stored.await.is_err() {
                return HttpResponse::InternalServerError().finish();
            }
        }
        HttpResponse::Ok().json(outcome)
    }
}

async fn submit(shared: web::Data<Shared>, body: web::Bytes) -> HttpResponse {
    let Ok(lead) = serde_json::from_slice::<Value>(&body) else {
        return HttpResponse::BadRequest().finish();
    };
    let ping = serde_json::to_vec(&json!({ "lead": &lead })).expect("serialises");
    let pings = shared.pings.iter().map(|url| {
        let request = shared
            .client
            .post(url.clone())
            .header("content-type", "application/json")
            .timeout(shared.ping_timeout)
            .body(ping.clone())
            .send();
        async move {
            let reply: Value = request.await.ok()?.json().await.ok()?;
            reply.get("bid")?.as_f64()
        }
    });
    let best = join_all(pings)
        .await
        .into_iter()
        .enumerate()
        .filter_map(|(i, bid)| bid.filter(|b| *b > 0.0).map(|b| (i, b)))
        .fold(None, |best: Option<(usize, f64)>, (i, b)| match best {
            Some((_, top)) if top >= b => best,
            _ => Some((i, b)),
        });
    let Some((winner, price)) = best else {
        return shared
            .answer(&lead, json!({"success": true, "status": "pending"}))
            .await;
    };
    let post = serde_json::to_vec(&json!({ "price": price, "lead": &lead })).expect("serialises");
    let accepted = async {
        let reply: Value = shared
            .client
            .post(shared.posts[winner].clone())
            .header("content-type", "application/json")
            .timeout(shared.post_timeout)
            .body(post)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        reply.get("accepted")?.as_bool()
    }
    .await
    .unwrap_or(false);
    let outcome = if accepted {
        json!({"success": true, "status": "sold", "price": price, "buyer_ids": [winner]})
    } else {
        json!({"success": true, "status": "pending"})
    };
    shared.answer(&lead, outcome).await
}

fn buyer_urls(buyers: &[String], path: &str) -> std::io::Result<Vec<reqwest::Url>> {
    buyers
        .iter()
        .map(|base| {
            let url = format!("{}/{path}", base.trim_end_matches('/'));
            reqwest::Url::parse(&url)
                .map_err(|e| std::io::Error::other(format!("buyer URL {url}: {e}")))
        })
        .collect()
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let workers = if args.workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        args.workers
    };
    let log = args.sync_dir.as_deref().map(start_log).transpose()?;
    let (pings, posts) = (
        buyer_urls(&args.buyers, "ping")?,
        buyer_urls(&args.buyers, "post")?,
    );
    actix_rt::System::new().block_on(async move {
        let factory_args = args.clone();
        let server = HttpServer::new(move || {
            let shared = Shared {
                client: reqwest::Client::builder()
                    .tcp_nodelay(true)
                    .redirect(reqwest::redirect::Policy::none())
                    .pool_max_idle_per_host(1024)
                    .build()
                    .expect("http client"),
                pings: pings.clone(),
                posts: posts.clone(),
                ping_timeout: Duration::from_millis(factory_args.ping_timeout_ms),
                post_timeout: Duration::from_millis(factory_args.post_timeout_ms),
                log: log.clone(),
            };
            App::new()
                .app_data(web::Data::new(shared))
                .route("/api/leads", web::post().to(submit))
        })
        .workers(workers)
        .backlog(4096)
        .max_connections(50_000)
        .bind(&args.listen)?;
        for addr in server.addrs() {
            println!("fanout-baseline listening on http://{addr}");
        }
        server.run().await
    })
}
