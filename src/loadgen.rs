//! `leadex loadgen`: an open-loop load driver for `POST /api/leads`, for machines without k6.
//! Leads are sent on a fixed schedule whatever the answers do, and each latency is measured
//! from the moment the lead was *due*, so a stalled server shows up in the tail instead of
//! silently slowing the driver down (no coordinated omission).
//!
//! The schedule runs on its own OS thread (`thread::sleep` wakes within tens of µs, tokio's
//! timer only within a millisecond) and hands each due lead to a tokio runtime. A lead that is
//! due while `max_in_flight` requests are outstanding is counted as a `driver_overload` error,
//! never delayed. `--rate 0` switches to a closed loop of `--concurrency` senders, used to find
//! a server's saturation throughput (its latencies are then from the actual send).
//!
//! Exchange overhead: the answer time minus `--buyer-latency-ms`, the ping plus post time the
//! buyer simulators were told to take. With simulators answering in 0 ms it is the answer time
//! itself: an upper bound that still holds the loopback round trips and the simulators' and
//! the driver's own work, which is why load-tests/run.sh measures the bare fan-out baseline
//! beside it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::Rng;

/// Longest latency the histograms hold (µs); anything slower is clamped to it.
const MAX_TRACKED_US: u64 = 120_000_000;
/// Distinct lead bodies prepared before the run, used round-robin.
const BODY_VARIANTS: usize = 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// Base URL of the exchange (or of fanout-baseline).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Supplier API key; repeat for several keys (used round-robin).
    #[arg(long = "key")]
    pub keys: Vec<String>,
    /// File with one API key per line (added to --key).
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
    #[arg(long, default_value = "ACME1234")]
    pub seller: String,
    #[arg(long, default_value = "Auto Insurance")]
    pub category: String,
    /// Leads per second, open loop. 0 runs a closed loop of --concurrency senders instead.
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Senders in the closed loop (--rate 0).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 20.0)]
    pub duration_secs: f64,
    /// Seconds sent first at the same rate and left out of the figures.
    #[arg(long, default_value_t = 3.0)]
    pub warmup_secs: f64,
    /// A request still unanswered after this long counts as a `timeout` error.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Requests outstanding at once; a lead due beyond it is a `driver_overload` error.
    #[arg(long, default_value_t = 20_000)]
    pub max_in_flight: usize,
    /// Ping + post time the buyers were configured with, subtracted for the overhead line.
    #[arg(long, default_value_t = 0.0)]
    pub buyer_latency_ms: f64,
    /// Print a verdict for p99 under this many ms (e.g. deadline + 50).
    #[arg(long)]
    pub slo_p99_ms: Option<f64>,
    /// With the verdict: a run answering more than this share (%) `pending` is not held
    /// (for buyers that always bid, pending means they were skipped, e.g. breakers open).
    #[arg(long)]
    pub slo_max_pending_pct: Option<f64>,
    /// Name of this run in the table and the summary file.
    #[arg(long, default_value = "leadex")]
    pub label: String,
    /// Append one tab-separated summary line here (header written when the file is new).
    #[arg(long)]
    pub summary_file: Option<PathBuf>,
    /// Driver runtime threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Hide the progress display.
    #[arg(long)]
    pub quiet: bool,
    /// Send over HTTP/2 without TLS (h2c, prior knowledge): every lead in flight shares
    /// one connection, as behind a multiplexing load balancer.
    #[arg(long)]
    pub http2: bool,
}

/// Why a request did not get a usable 200; the words are the table's error kinds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Failure {
    Status(u16),
    Timeout,
    Connect,
    Transport,
    BadBody,
    DriverOverload,
}

impl Failure {
    fn label(&self) -> String {
        match self {
            Failure::Status(code) => format!("http_{code}"),
            Failure::Timeout => "timeout".into(),
            Failure::Connect => "connect".into(),
            Failure::Transport => "transport".into(),
            Failure::BadBody => "bad_body".into(),
            Failure::DriverOverload => "driver_overload".into(),
        }
    }
}

enum Outcome {
    Sold,
    Pending,
    Failed(Failure),
}

struct Stats {
    /// From the time the lead was due to the end of the answer (µs).
    latency: Histogram<u64>,
    /// From the actual send to the end of the answer (µs).
    service: Histogram<u64>,
    /// `latency` minus the configured buyer latency (µs).
    overhead: Histogram<u64>,
    sold: u64,
    pending: u64,
    errors: BTreeMap<Failure, u64>,
    /// First and last measured answers: their span is the achieved rate's denominator, so
    /// answers that trail the schedule lower it and the answers' own latency does not.
    first_answer: Option<Instant>,
    last_answer: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
        let h = || Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("histogram bounds");
        Stats {
            latency: h(),
            service: h(),
            overhead: h(),
            sold: 0,
            pending: 0,
            errors: BTreeMap::new(),
            first_answer: None,
            last_answer: None,
        }
    }

    fn answered(&self) -> u64 {
        self.sold + self.pending
    }

    fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// What every request task shares.
struct Shared {
    client: reqwest::Client,
    url: String,
    keys: Vec<String>,
    bodies: Vec<Bytes>,
    timeout: Duration,
    buyer_latency_us: u64,
    stats: Mutex<Stats>,
    in_flight: AtomicUsize,
    sent: AtomicU64,
    done: AtomicU64,
}

impl Shared {
    fn record(&self, due: Instant, sent: Instant, outcome: Outcome, measured: bool) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if !measured {
            return;
        }
        let now = Instant::now();
        let mut stats = self.stats.lock().expect("stats");
        match outcome {
            Outcome::Sold | Outcome::Pending => {
                let latency = (now - due).as_micros() as u64;
                let service = (now - sent).as_micros() as u64;
                let clamp = |v: u64| v.clamp(1, MAX_TRACKED_US);
                stats.latency.saturating_record(clamp(latency));
                stats.service.saturating_record(clamp(service));
                stats
                    .overhead
                    .saturating_record(clamp(latency.saturating_sub(self.buyer_latency_us)));
                if matches!(outcome, Outcome::Sold) {
                    stats.sold += 1;
                } else {
                    stats.pending += 1;
                }
                stats.first_answer.get_or_insert(now);
                stats.last_answer = Some(now);
            }
            Outcome::Failed(why) => *stats.errors.entry(why).or_default() += 1,
        }
    }

    async fn send(&self, index: u64) -> Outcome {
        let key = &self.keys[index as usize % self.keys.len()];
        let body = self.bodies[index as usize % self.bodies.len()].clone();
        let request = self
            .client
            .post(&self.url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
            .send();
        let answer = async {
            let response = request.await?;
            let status = response.status().as_u16();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        };
        match tokio::time::timeout(self.timeout, answer).await {
            Err(_) => Outcome::Failed(Failure::Timeout),
            Ok(Err(e)) if e.is_timeout() => Outcome::Failed(Failure::Timeout),
            Ok(Err(e)) if e.is_connect() => Outcome::Failed(Failure::Connect),
            Ok(Err(_)) => Outcome::Failed(Failure::Transport),
            Ok(Ok((200, body))) => {
                if contains(&body, br#""status":"sold""#) {
                    Outcome::Sold
                } else if contains(&body, br#""status":"pending""#) {
                    Outcome::Pending
                } else {
                    Outcome::Failed(Failure::BadBody)
                }
            }
            Ok(Ok((status, _))) => Outcome::Failed(Failure::Status(status)),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const FIRST: [&str; 10] = [
    "John", "Maria", "Wei", "Aisha", "Carlos", "Emma", "Noah", "Priya", "Olu", "Sofia",
];
const LAST: [&str; 10] = [
    "Doe", "Garcia", "Chen", "Khan", "Lopez", "Smith", "Brown", "Patel", "Okafor", "Rossi",
];
const STATES: [(&str, &str); 8] = [
    ("TX", "75001"),
    ("CA", "90210"),
    ("FL", "33101"),
    ("NY", "10001"),
    ("IL", "60601"),
    ("AZ", "85001"),
    ("oh", "43004"),
    ("wa", "98101"),
];

/// Plausible leads with made-up personal data, some fields needing normalisation.
fn lead_bodies(seller: &str, category: &str) -> Vec<Bytes> {
    let mut rng = rand::rng();
    (0..BODY_VARIANTS)
        .map(|n| {
            let (state, zip) = STATES[rng.random_range(0..STATES.len())];
            let first = FIRST[rng.random_range(0..FIRST.len())];
            let last = LAST[rng.random_range(0..LAST.len())];
            let body = serde_json::json!({
                "seller": seller,
                "category": category,
                "firstName": first,
                "lastName": last,
                "email": format!("{}.{}{n}@Example.com", first.to_lowercase(), last.to_lowercase()),
                "phone": format!("({}) {:03}-{:04}", rng.random_range(201..989), rng.random_range(200..999), rng.random_range(0..10_000)),
                "state": state,
                "zip": zip,
                "homeowner": if rng.random_bool(0.6) { "yes" } else { "no" },
                "creditScore": rng.random_range(550..820),
            });
            Bytes::from(serde_json::to_vec(&body).expect("lead body"))
        })
        .collect()
}

fn read_keys(args: &LoadgenArgs) -> Result<Vec<String>, String> {
    let mut keys = args.keys.clone();
    if let Some(path) = &args.keys_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("keys file {}: {e}", path.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    if keys.is_empty() {
        return Err("give at least one supplier key (--key or --keys-file)".into());
    }
    Ok(keys)
}

/// The figures of one run, as printed and as written to the summary file.
pub struct Summary {
    pub label: String,
    pub mode: String,
    pub offered_per_sec: Option<f64>,
    pub achieved_per_sec: f64,
    pub answered: u64,
    pub sold: u64,
    pub pending: u64,
    pub failed: u64,
    /// p50, p90, p99, p99.9, max of the answer time (ms).
    pub latency_ms: [f64; 5],
    pub service_ms: [f64; 5],
    pub overhead_ms: [f64; 5],
    pub errors: Vec<(String, u64)>,
    /// Every request sent, warm-up included (for CPU-per-lead figures).
    pub sent_total: u64,
}

fn quantiles_ms(h: &Histogram<u64>) -> [f64; 5] {
    if h.is_empty() {
        return [0.0; 5];
    }
    let q = |v: u64| v as f64 / 1000.0;
    [
        q(h.value_at_quantile(0.50)),
        q(h.value_at_quantile(0.90)),
        q(h.value_at_quantile(0.99)),
        q(h.value_at_quantile(0.999)),
        q(h.max()),
    ]
}

/// Runs the load described by `args` and prints its table; blocks until done.
pub fn run(args: LoadgenArgs) -> Result<(), String> {
    let summary = drive(&args)?;
    print!("{}", render(&args, &summary));
    if let Some(path) = &args.summary_file {
        append_summary(path, &summary).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Runs the load and returns its figures without printing the table.
pub fn drive(args: &LoadgenArgs) -> Result<Summary, String> {
    let keys = read_keys(args)?;
    if args.rate < 0.0 || !args.rate.is_finite() {
        return Err("--rate must be 0 (closed loop) or a positive number".into());
    }
    if args.duration_secs <= 0.0 || args.warmup_secs < 0.0 {
        return Err("--duration-secs must be positive and --warmup-secs not negative".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .thread_name("loadgen")
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let mut client = reqwest::Client::builder();
    if args.http2 {
        client = client.http2_prior_knowledge();
    }
    let client = client
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let shared = Arc::new(Shared {
        client,
        url: format!("{}/api/leads", args.target.trim_end_matches('/')),
        keys,
        bodies: lead_bodies(&args.seller, &args.category),
        timeout: Duration::from_millis(args.timeout_ms),
        buyer_latency_us: (args.buyer_latency_ms.max(0.0) * 1000.0) as u64,
        stats: Mutex::new(Stats::new()),
        in_flight: AtomicUsize::new(0),
        sent: AtomicU64::new(0),
        done: AtomicU64::new(0),
    });
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let measured = Duration::from_secs_f64(args.duration_secs);

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(
            Some((warmup + measured).as_millis() as u64),
            ProgressDrawTarget::stderr_with_hz(4),
        )
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {elapsed:>4} / {duration:4}  {msg}")
            .expect("progress template"),
    );
    let finished = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (shared, bar, finished) = (shared.clone(), bar.clone(), finished.clone());
        let started = Instant::now();
        runtime.spawn(async move {
            while !finished.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (p99, errors) = {
                    let stats = shared.stats.lock().expect("stats");
                    let p99 = if stats.latency.is_empty() {
                        0.0
                    } else {
                        stats.latency.value_at_quantile(0.99) as f64 / 1000.0
                    };
                    (p99, stats.failed())
                };
                bar.set_position(started.elapsed().as_millis() as u64);
                bar.set_message(format!(
                    "sent {}  answered {}  in flight {}  errors {}  p99 {:.1} ms",
                    shared.sent.load(Ordering::Relaxed),
                    shared.done.load(Ordering::Relaxed),
                    shared.in_flight.load(Ordering::Relaxed),
                    errors,
                    p99
                ));
            }
        })
    };

    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + warmup;
    let measure_to = measure_from + measured;
    let (mode, offered) = if args.rate > 0.0 {
        open_loop(args, &runtime, &shared, start, measure_from, measure_to)?;
        let scheduled = (args.rate * args.duration_secs).floor();
        (
            format!("open loop {} leads/s", args.rate),
            Some(scheduled / args.duration_secs),
        )
    } else {
        closed_loop(args, &runtime, &shared, start, measure_from, measure_to);
        (format!("closed loop, {} senders", args.concurrency), None)
    };

    // Let the last requests finish (each is bounded by the timeout).
    let drain_until = Instant::now() + shared.timeout + Duration::from_secs(1);
    while shared.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < drain_until {
        std::thread::sleep(Duration::from_millis(20));
    }
    finished.store(true, Ordering::Relaxed);
    let _ = runtime.block_on(ticker);
    bar.finish_and_clear();
    runtime.shutdown_timeout(Duration::from_millis(500));

    let stats = shared.stats.lock().expect("stats");
    let achieved = match (stats.first_answer, stats.last_answer) {
        (Some(first), Some(last)) if stats.answered() > 1 && last > first => {
            (stats.answered() - 1) as f64 / (last - first).as_secs_f64()
        }
        _ => stats.answered() as f64 / (measure_to - measure_from).as_secs_f64(),
    };
    Ok(Summary {
        label: args.label.clone(),
        mode,
        offered_per_sec: offered,
        achieved_per_sec: achieved,
        answered: stats.answered(),
        sold: stats.sold,
        pending: stats.pending,
        failed: stats.failed(),
        latency_ms: quantiles_ms(&stats.latency),
        service_ms: quantiles_ms(&stats.service),
        overhead_ms: quantiles_ms(&stats.overhead),
        errors: stats
            .errors
            .iter()
            .map(|(why, n)| (why.label(), *n))
            .collect(),
        sent_total: shared.sent.load(Ordering::Relaxed),
    })
}

/// The schedule thread: lead `i` is due at `start + i / rate`, sent then or counted lost.
fn open_loop(
    args: &LoadgenArgs,
    runtime: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    start: Instant,
    measure_from: Instant,
    measure_to: Instant,
) -> Result<(), String> {
    let total = (args.rate * (args.warmup_secs + args.duration_secs)).ceil() as u64;
    let handle = runtime.handle().clone();
    let shared = shared.clone();
    let max_in_flight = args.max_in_flight.max(1);
    let rate = args.rate;
    std::thread::Builder::new()
        .name("loadgen-schedule".into())
        .spawn(move || {
            for i in 0..total {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if due >= measure_to {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let measured = due >= measure_from;
                if shared.in_flight.load(Ordering::Acquire) >= max_in_flight {
                    shared.record(due, due, Outcome::Failed(Failure::DriverOverload), measured);
                    continue;
                }
                shared.in_flight.fetch_add(1, Ordering::AcqRel);
                shared.sent.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                handle.spawn(async move {
                    let sent = Instant::now();
                    let outcome = shared.send(i).await;
                    shared.record(due, sent, outcome, measured);
                    shared.in_flight.fetch_sub(1, Ordering::AcqRel);
                });
            }
        })
        .map_err(|e| format!("schedule thread: {e}"))?
        .join()
        .map_err(|_| "the schedule thread panicked".to_owned())
}

/// `concurrency` senders, each sending its next lead as soon as the last was answered.
fn closed_loop(
    args: &LoadgenArgs,
    runtime: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    start: Instant,
    measure_from: Instant,
    measure_to: Instant,
) {
    let next = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (shared, next) = (shared.clone(), next.clone());
            runtime.spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let sent = Instant::now();
                    if sent >= measure_to {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    shared.in_flight.fetch_add(1, Ordering::AcqRel);
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                    let outcome = shared.send(i).await;
                    shared.record(sent, sent, outcome, sent >= measure_from);
                    shared.in_flight.fetch_sub(1, Ordering::AcqRel);
                }
            })
        })
        .collect();
    runtime.block_on(async {
        for sender in senders {
            let _ = sender.await;
        }
    });
}

fn row(name: &str, q: &[f64; 5]) -> String {
    format!(
        "  {name:<10}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}\n",
        q[0], q[1], q[2], q[3], q[4]
    )
}

/// The final table.
pub fn render(args: &LoadgenArgs, s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n== {}: {} against {} for {:.0} s (+{:.0} s warm-up) ==",
        s.label, s.mode, args.target, args.duration_secs, args.warmup_secs
    );
    match s.offered_per_sec {
        Some(offered) => {
            let _ = writeln!(out, "  offered   {offered:>10.1} leads/s");
        }
        None => {
            let _ = writeln!(out, "  offered          (closed loop: as fast as answered)");
        }
    }
    let _ = writeln!(
        out,
        "  achieved  {:>10.1} leads/s  ({} answered 200)",
        s.achieved_per_sec, s.answered
    );
    let _ = writeln!(
        out,
        "  ms        {:>10}{:>10}{:>10}{:>10}{:>10}",
        "p50", "p90", "p99", "p99.9", "max"
    );
    let from = if s.offered_per_sec.is_some() {
        "answer (from due time)"
    } else {
        "answer (from send)"
    };
    out.push_str(&row("answer", &s.latency_ms));
    out.push_str(&row("service", &s.service_ms));
    out.push_str(&row("overhead", &s.overhead_ms));
    let _ = writeln!(
        out,
        "            answer: {from}; service: from the actual send; overhead: answer - {:.1} ms of buyer latency",
        args.buyer_latency_ms
    );
    let share = |n: u64| {
        let total = s.answered + s.failed;
        if total == 0 {
            0.0
        } else {
            100.0 * n as f64 / total as f64
        }
    };
    let _ = writeln!(
        out,
        "  outcomes  sold {} ({:.2}%)  pending {} ({:.2}%)  errors {} ({:.3}%)",
        s.sold,
        share(s.sold),
        s.pending,
        share(s.pending),
        s.failed,
        share(s.failed)
    );
    if s.errors.is_empty() {
        let _ = writeln!(out, "  errors    none");
    } else {
        let list: Vec<String> = s.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        let _ = writeln!(out, "  errors    {}", list.join(", "));
    }
    if let Some(limit) = args.slo_p99_ms {
        let error_share = share(s.failed);
        let pending_share = share(s.pending);
        let pending_ok = args
            .slo_max_pending_pct
            .is_none_or(|max| pending_share <= max);
        let held = s.latency_ms[2] < limit && error_share < 0.1 && pending_ok;
        let pending = match args.slo_max_pending_pct {
            Some(max) => format!(
                ", pending {pending_share:.2}% {} {max}%",
                if pending_ok { "<=" } else { ">" }
            ),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  verdict   p99 {:.2} ms {} {limit:.0} ms, errors {error_share:.3}% {} 0.1%{pending}: {}",
            s.latency_ms[2],
            if s.latency_ms[2] < limit { "<" } else { ">=" },
            if error_share < 0.1 { "<" } else { ">=" },
            if held { "HELD" } else { "MISSED" }
        );
    }
    out
}

const SUMMARY_HEADER: &str = "label\tmode\toffered\tachieved\tanswered\tsold\tpending\terrors\tp50_ms\tp90_ms\tp99_ms\tp999_ms\tmax_ms\toverhead_p50_ms\toverhead_p99_ms\terror_kinds\tsent_total";

fn append_summary(path: &std::path::Path, s: &Summary) -> std::io::Result<()> {
    let new = !path.exists() || std::fs::metadata(path)?.len() == 0;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if new {
        writeln!(file, "{SUMMARY_HEADER}")?;
    }
    let kinds: Vec<String> = s.errors.iter().map(|(k, n)| format!("{k}={n}")).collect();
    writeln!(
        file,
        "{}\t{}\t{}\t{:.1}\t{}\t{}\t{}\t{}\t{:.2}\t{:.2}\t{:.2}\t{:.2}\t{:.2}\t{:.2}\t{:.2}\t{}\t{}",
        s.label,
        s.mode,
        s.offered_per_sec
            .map_or_else(|| "closed".to_owned(), |o| format!("{o:.1}")),
        s.achieved_per_sec,
        s.answered,
        s.sold,
        s.pending,
        s.failed,
        s.latency_ms[0],
        s.latency_ms[1],
        s.latency_ms[2],
        s.latency_ms[3],
        s.latency_ms[4],
        s.overhead_ms[0],
        s.overhead_ms[2],
        if kinds.is_empty() {
            "-".to_owned()
        } else {
            kinds.join(",")
        },
        s.sent_total
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_valid_leads_for_the_campaign() {
        for body in lead_bodies("ACME1234", "Auto Insurance").iter().take(50) {
            let fields: crate::domain::FieldMap = serde_json::from_slice(body).unwrap();
            let lead = crate::domain::Lead::parse(fields, &["email".into(), "zip".into()]);
            assert!(lead.is_ok(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn answers_are_classified_without_parsing() {
        assert!(contains(
            br#"{"success":true,"lead_id":"x","status":"sold","price":1.00}"#,
            br#""status":"sold""#
        ));
        assert!(!contains(b"{}", br#""status":"sold""#));
    }
}
