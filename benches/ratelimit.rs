//! What a rate-limit check costs: one check with the memory limiter and with the Redis limiter
//! (a local redis-server started here, persistence off), their latency percentiles, and the
//! checks per second one node sustains with 64 concurrent callers.
//!
//! `cargo bench --bench ratelimit` (criterion timings, then the percentile and throughput
//! figures recorded in BENCHMARKS.md).

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use hdrhistogram::Histogram;
use leadex::ratelimit::{Clock, Limit, MemoryLimiter, RedisLimiter, RedisSettings, SharedLimiter};
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

/// One caller, one check after another: the latency a single answer pays.
async fn sequential(limiter: SharedLimiter, name: &str) -> Histogram<u64> {
    let keys = keys(&format!("seq-{name}"));
    let mut histogram = Histogram::<u64>::new(3).expect("histogram");
    for i in 0..SEQUENTIAL_CHECKS {
        let started = Instant::now();
        std::hint::black_box(limiter.acquire(&keys[i % KEYS], LIMIT).await);
        histogram
            .record(started.elapsed().as_nanos() as u64)
            .expect("in range");
    }
    histogram
}

/// `CALLERS` tasks checking as fast as they can for `THROUGHPUT_RUN`.
async fn concurrent(limiter: SharedLimiter, name: &str) -> (f64, Histogram<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let keys = Arc::new(keys(&format!("conc-{name}")));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let (limiter, stop, done, keys) =
                (limiter.clone(), stop.clone(), done.clone(), keys.clone());
            tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new(3).expect("histogram");
                let mut i = caller;
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    std::hint::black_box(limiter.acquire(&keys[i % KEYS], LIMIT).await);
                    histogram
                        .record(at.elapsed().as_nanos() as u64)
                        .expect("in range");
                    i += CALLERS;
                }
                done.fetch_add(histogram.len(), Ordering::Relaxed);
                histogram
            })
        })
        .collect();
    tokio::time::sleep(THROUGHPUT_RUN).await;
    stop.store(true, Ordering::Relaxed);
    let mut merged = Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        merged
            .add(task.await.expect("caller"))
            .expect("same bounds");
    }
    let elapsed = started.elapsed().as_secs_f64();
    (done.load(Ordering::Relaxed) as f64 / elapsed, merged)
}

fn figures(runtime: &tokio::runtime::Runtime, server: &RedisServer) {
    // The production default timeout: a check slower than this would fall back, and that
    // is counted below.
    let redis = runtime.block_on(redis_limiter(server, 5));
    let memory: SharedLimiter = Arc::new(MemoryLimiter::new(Clock::tokio()));

    println!("\n== one check, sequential ({SEQUENTIAL_CHECKS} checks, {KEYS} keys) ==");
    let mem = runtime.block_on(sequential(memory.clone(), "memory"));
    let red = runtime.block_on(sequential(redis.clone(), "redis"));
    for (name, h) in [("memory", &mem), ("redis", &red)] {
        println!(
            "{name:>7}: p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs",
            micros(h, 0.5),
            micros(h, 0.99),
            micros(h, 0.999),
            h.max() as f64 / 1000.0
        );
    }
    println!(
        "redis adds at p99: {:.1} µs",
        micros(&red, 0.99) - micros(&mem, 0.99)
    );

    println!("\n== {CALLERS} concurrent callers, {THROUGHPUT_RUN:?} ==");
    for (name, limiter) in [
        ("memory", memory),
        ("redis", redis.clone() as SharedLimiter),
    ] {
        let (rate, h) = runtime.block_on(concurrent(limiter, name));
        println!(
            "{name:>7}: {rate:.0} checks/s  p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs",
            micros(&h, 0.5),
            micros(&h, 0.99),
            micros(&h, 0.999)
        );
    }
    println!(
        "redis checks answered by the local fallback (timeout 5 ms): {}",
        redis.fallback_checks()
    );
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
