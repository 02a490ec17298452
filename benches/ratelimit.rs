//! What a rate-limit check costs: one check with the memory limiter and with the Redis limiter
//! (a local redis-server started here, persistence off), their latency percentiles, and the
//! checks per second one node sustains with 64 concurrent callers.
//!
//! `cargo bench --bench ratelimit` (criterion timings, then the percentile and throughput
//! figures recorded in BENCHMARKS.md).

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use hdrhistogram::Histogram;
use leadex::ratelimit::{
    Clock, Limit, MemoryLimiter, RateLimiter, RedisLimiter, RedisSettings, SharedLimiter,
};
use redis_server::RedisServer;

/// A production-like window (60 per minute would make almost every check a refusal; 60 per
/// second keeps a mix of counted and refused checks) over many keys.
const LIMIT: Limit = Limit {
    requests: 60,
    window_ms: 1_000,
};
const KEYS: usize = 1_000;
const CALLERS: usize = 64;
const SEQUENTIAL_CHECKS: usize = 20_000;
const THROUGHPUT_RUN: Duration = Duration::from_secs(5);

fn keys(prefix: &str) -> Vec<String> {
    (0..KEYS).map(|i| format!("{prefix}:key:{i:04}")).collect()
}

async fn redis_limiter(server: &RedisServer, timeout_ms: u64) -> Arc<RedisLimiter> {
    let limiter = RedisLimiter::connect(
        RedisSettings {
            url: server.url(),
            key_prefix: "bench:".into(),
            timeout: Duration::from_millis(timeout_ms),
        },
        Clock::tokio(),
    )
    .await
    .expect("redis limiter");
    assert!(!limiter.is_degraded(), "redis-server answers");
    Arc::new(limiter)
}

fn criterion_checks(c: &mut Criterion, runtime: &tokio::runtime::Runtime, server: &RedisServer) {
    let memory: SharedLimiter = Arc::new(MemoryLimiter::new(Clock::tokio()));
    let redis = runtime.block_on(redis_limiter(server, 50));
    let mut group = c.benchmark_group("ratelimit_check");
    for (name, limiter) in [
        ("memory", memory),
        ("redis", redis.clone() as SharedLimiter),
    ] {
        let keys = keys(name);
        let mut next = 0usize;
        group.bench_function(name, |b| {
            b.to_async(runtime).iter(|| {
                next = (next + 1) % KEYS;
                let (limiter, key) = (limiter.clone(), &keys[next]);
                async move { limiter.acquire(key, LIMIT).await }
            })
        });
    }
    group.finish();
    assert_eq!(
        redis.fallback_checks(),
        0,
        "every redis check was answered by redis"
    );
}

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// One caller, one check after another: the latency a single answer pays. The memory check,
/// the Redis check and a bare Redis PING (the floor under any Redis call here) take turns, so
/// the machine's noise weighs on all three alike.
async fn sequential(
    memory: SharedLimiter,
    redis: SharedLimiter,
    server: &RedisServer,
) -> [Histogram<u64>; 3] {
    let keys = keys("seq");
    let client = redis::Client::open(server.url()).expect("url");
    let mut connection = redis::aio::ConnectionManager::new(client)
        .await
        .expect("connection");
    let mut histograms = [(); 3].map(|_| Histogram::<u64>::new(3).expect("histogram"));
    for i in 0..SEQUENTIAL_CHECKS {
        let key = &keys[i % KEYS];
        let started = Instant::now();
        std::hint::black_box(memory.acquire(key, LIMIT).await);
        let memory_done = Instant::now();
        std::hint::black_box(redis.acquire(key, LIMIT).await);
        let redis_done = Instant::now();
        let _: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .expect("pong");
        let ping_done = Instant::now();
        for (histogram, took) in histograms.iter_mut().zip([
            memory_done - started,
            redis_done - memory_done,
            ping_done - redis_done,
        ]) {
            histogram.record(took.as_nanos() as u64).expect("in range");
        }
    }
    histograms
}

/// What the concurrent callers call: the limiter as the handler does (Redis with the local
/// fallback), or Redis alone (`RedisLimiter::check`, errors counted, nothing falls back).
#[derive(Clone)]
enum Target {
    Limiter(SharedLimiter),
    RedisOnly(Arc<RedisLimiter>),
}

impl Target {
    /// Whether the check got an answer from where it was sent.
    async fn check(&self, key: &str) -> bool {
        match self {
            Target::Limiter(limiter) => {
                std::hint::black_box(limiter.acquire(key, LIMIT).await);
                true
            }
            Target::RedisOnly(redis) => {
                std::hint::black_box(redis.check(key, LIMIT, true).await).is_ok()
            }
        }
    }
}

/// `CALLERS` tasks checking as fast as they can for `THROUGHPUT_RUN`: answered checks per
/// second, their latency, and the checks that failed.
async fn concurrent(target: Target, name: &str) -> (f64, Histogram<u64>, u64) {
    let keys = Arc::new(keys(&format!("conc-{name}")));
    let started = Instant::now();
    let deadline = started + THROUGHPUT_RUN;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (target, keys) = (target.clone(), keys.clone());
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new(3).expect("histogram");
                let mut failed = 0u64;
                let mut i = caller;
                while Instant::now() < deadline {
                    let at = Instant::now();
                    if target.check(&keys[i % KEYS]).await {
                        histogram
                            .record(at.elapsed().as_nanos() as u64)
                            .expect("in range");
                    } else {
                        failed += 1;
                    }
                    i += CALLERS;
                    // The memory limiter never waits; yielding keeps the 64 callers taking
                    // turns as request handlers would.
                    tokio::task::yield_now().await;
                }
                (histogram, failed)
            })
        })
        .collect();
    let mut merged = Histogram::<u64>::new(3).expect("histogram");
    let mut failed = 0;
    for task in tasks {
        let (histogram, task_failed) = task.await.expect("caller");
        merged.add(histogram).expect("same bounds");
        failed += task_failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    (merged.len() as f64 / elapsed, merged, failed)
}

/// `CALLERS` tasks together asking for `rate` checks per second (each on its own schedule),
/// through the limiter as the handler does: the latency and how many were answered locally.
async fn paced(limiter: Arc<RedisLimiter>, rate: u32) -> (f64, Histogram<u64>, u64) {
    let keys = Arc::new(keys("paced"));
    let before = limiter.fallback_checks();
    let period = Duration::from_secs_f64(CALLERS as f64 / rate as f64);
    let started = Instant::now();
    let deadline = started + THROUGHPUT_RUN;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (limiter, keys) = (limiter.clone(), keys.clone());
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new(3).expect("histogram");
                let mut ticks = tokio::time::interval_at(
                    tokio::time::Instant::now() + period * caller as u32 / CALLERS as u32,
                    period,
                );
                let mut i = caller;
                while Instant::now() < deadline {
                    ticks.tick().await;
                    let at = Instant::now();
                    std::hint::black_box(limiter.acquire(&keys[i % KEYS], LIMIT).await);
                    histogram
                        .record(at.elapsed().as_nanos() as u64)
                        .expect("in range");
                    i += CALLERS;
                }
                histogram
            })
        })
        .collect();
    let mut merged = Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        merged
            .add(task.await.expect("caller"))
            .expect("same bounds");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let local = limiter.fallback_checks() - before;
    (merged.len() as f64 / elapsed, merged, local)
}

fn print_latency(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:>22}: p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs",
        micros(h, 0.5),
        micros(h, 0.99),
        micros(h, 0.999),
        h.max() as f64 / 1000.0
    );
}

fn figures(runtime: &tokio::runtime::Runtime, server: &RedisServer) {
    let memory: SharedLimiter = Arc::new(MemoryLimiter::new(Clock::tokio()));
    // The production default timeout: a check slower than this is answered locally, and the
    // figures say how many were.
    let redis = runtime.block_on(redis_limiter(server, 5));

    println!("\n== one check at a time ({SEQUENTIAL_CHECKS} checks, {KEYS} keys) ==");
    let [mem, red, ping] = runtime.block_on(sequential(memory.clone(), redis.clone(), server));
    print_latency("memory", &mem);
    print_latency("redis (timeout 5 ms)", &red);
    print_latency("redis PING floor", &ping);
    println!(
        "redis adds at p99: {:.1} µs; checks answered locally: {}",
        micros(&red, 0.99) - micros(&mem, 0.99),
        redis.fallback_checks()
    );

    println!("\n== {CALLERS} concurrent callers, {THROUGHPUT_RUN:?} each ==");
    let (rate, h, _) = runtime.block_on(concurrent(Target::Limiter(memory), "memory"));
    println!("{:>22}: {rate:.0} checks/s", "memory");
    print_latency("", &h);
    let direct = runtime.block_on(redis_limiter(server, 1_000));
    let (rate, h, failed) = runtime.block_on(concurrent(Target::RedisOnly(direct), "redis-only"));
    println!(
        "{:>22}: {rate:.0} checks/s answered by redis, {failed} failed",
        "redis only"
    );
    print_latency("", &h);
    let before = redis.fallback_checks();
    let (rate, h, _) = runtime.block_on(concurrent(
        Target::Limiter(redis.clone() as SharedLimiter),
        "redis-limiter",
    ));
    let local = redis.fallback_checks() - before;
    let total = h.len();
    println!(
        "{:>22}: {rate:.0} checks/s, of which {} answered locally (timeout 5 ms)",
        "limiter (redis)", local
    );
    print_latency("", &h);
    println!(
        "  share answered by redis: {:.2} %",
        100.0 * (total.saturating_sub(local)) as f64 / total.max(1) as f64
    );

    for rate in [10_000, 20_000] {
        let limiter = runtime.block_on(redis_limiter(server, 5));
        let (achieved, h, local) = runtime.block_on(paced(limiter, rate));
        println!(
            "{:>22}: {achieved:.0} checks/s achieved, {local} answered locally (timeout 5 ms)",
            format!("paced {rate}/s")
        );
        print_latency("", &h);
    }
}

fn main() {
    let server = RedisServer::start();
    // Two workers: one node's share of this 2-core machine (redis-server runs beside it).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut criterion = Criterion::default().configure_from_args();
    criterion_checks(&mut criterion, &runtime, &server);
    criterion.final_summary();
    // `cargo test --benches` and `cargo bench -- --list` run the bench binary in test mode;
    // the long figures are for real runs only.
    if std::env::args().any(|a| a == "--bench") {
        figures(&runtime, &server);
    }
}
