//! The smallest exchange on leadex's own HTTP stack (actix-web server, reqwest client): parse
//! the lead, ping every buyer at once, pick the best bid, post to it, answer. No auth,
//! validation, storage, limiter or metrics. `load-tests/run.sh` drives it beside leadex so
//! every leadex figure is also a ratio to what this machine allows.

use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Parser;
use futures::future::join_all;
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
}

struct Shared {
    client: reqwest::Client,
    pings: Vec<String>,
    posts: Vec<String>,
    ping_timeout: Duration,
    post_timeout: Duration,
}

async fn submit(shared: web::Data<Shared>, body: web::Bytes) -> HttpResponse {
    let Ok(lead) = serde_json::from_slice::<Value>(&body) else {
        return HttpResponse::BadRequest().finish();
    };
    let ping = serde_json::to_vec(&json!({ "lead": &lead })).expect("serialises");
    let pings = shared.pings.iter().map(|url| {
        let request = shared
            .client
            .post(url)
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
        return HttpResponse::Ok().json(json!({"success": true, "status": "pending"}));
    };
    let post = serde_json::to_vec(&json!({ "price": price, "lead": &lead })).expect("serialises");
    let accepted = async {
        let reply: Value = shared
            .client
            .post(&shared.posts[winner])
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
    if accepted {
        HttpResponse::Ok()
            .json(json!({"success": true, "status": "sold", "price": price, "buyer_ids": [winner]}))
    } else {
        HttpResponse::Ok().json(json!({"success": true, "status": "pending"}))
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let workers = if args.workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        args.workers
    };
    actix_rt::System::new().block_on(async move {
        let factory_args = args.clone();
        let server = HttpServer::new(move || {
            let shared = Shared {
                client: reqwest::Client::builder()
                    .tcp_nodelay(true)
                    .pool_max_idle_per_host(1024)
                    .build()
                    .expect("http client"),
                pings: factory_args
                    .buyers
                    .iter()
                    .map(|b| format!("{}/ping", b.trim_end_matches('/')))
                    .collect(),
                posts: factory_args
                    .buyers
                    .iter()
                    .map(|b| format!("{}/post", b.trim_end_matches('/')))
                    .collect(),
                ping_timeout: Duration::from_millis(factory_args.ping_timeout_ms),
                post_timeout: Duration::from_millis(factory_args.post_timeout_ms),
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
