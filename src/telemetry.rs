//! Every metric name, label and histogram bucket, declared once. Label values come only from
//! config ids and the fixed outcome words below, never from request data, so series stay
//! bounded. Also the logging set-up (text or JSON).

use std::sync::OnceLock;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const LEADS_TOTAL: &str = "leadex_leads_total";
pub const AUCTION_DURATION: &str = "leadex_auction_duration_seconds";
pub const AUCTIONS_IN_FLIGHT: &str = "leadex_auctions_in_flight";
pub const BUYER_PING_DURATION: &str = "leadex_buyer_ping_duration_seconds";
pub const BUYER_PINGS_TOTAL: &str = "leadex_buyer_pings_total";
pub const BUYER_POSTS_TOTAL: &str = "leadex_buyer_posts_total";
pub const BUYER_POST_DURATION: &str = "leadex_buyer_post_duration_seconds";
pub const BUYER_POST_VALUE: &str = "leadex_buyer_post_value_total";
pub const BUYER_IN_FLIGHT: &str = "leadex_buyer_requests_in_flight";
pub const SOLD_VALUE_TOTAL: &str = "leadex_sold_value_total";
pub const RATE_LIMITED_TOTAL: &str = "leadex_rate_limited_total";
pub const AUTH_FAILURES_TOTAL: &str = "leadex_auth_failures_total";
pub const HTTP_REQUEST_DURATION: &str = "leadex_http_request_duration_seconds";
pub const HTTP_REQUESTS_TOTAL: &str = "leadex_http_requests_total";
pub const STORAGE_WRITE_DURATION: &str = "leadex_storage_write_duration_seconds";
pub const STORAGE_ERRORS_TOTAL: &str = "leadex_storage_errors_total";
pub const STORAGE_BATCH_SIZE: &str = "leadex_storage_batch_size";
pub const STORAGE_APPLY_DURATION: &str = "leadex_storage_apply_duration_seconds";
pub const STORAGE_UNAPPLIED: &str = "leadex_storage_unapplied_writes";
pub const STORAGE_SPILLED_TOTAL: &str = "leadex_storage_spilled_total";
pub const STORAGE_SPILL_REPLAYED_TOTAL: &str = "leadex_storage_spill_replayed_total";
pub const STORAGE_SPILL_DROPPED_TOTAL: &str = "leadex_storage_spill_dropped_total";
pub const STORAGE_SPILL_PENDING: &str = "leadex_storage_spill_pending";
pub const RATE_LIMIT_CHECK_DURATION: &str = "leadex_rate_limit_check_duration_seconds";
pub const RATE_LIMIT_BACKEND_ERRORS: &str = "leadex_rate_limit_backend_errors_total";
pub const RATE_LIMIT_FALLBACK_ACTIVE: &str = "leadex_rate_limit_fallback_active";
pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "leadex_idempotent_replays_total";
pub const OVERLOAD_REFUSALS_TOTAL: &str = "leadex_overload_refusals_total";
pub const BUILD_INFO: &str = "leadex_build_info";
pub const STORAGE_UP: &str = "leadex_storage_up";
pub const RATE_LIMIT_BACKEND_UP: &str = "leadex_rate_limit_backend_up";
pub const COORDINATION_UP: &str = "leadex_coordination_backend_up";
pub const CAMPAIGN_PING_TIMEOUT: &str = "leadex_campaign_ping_timeout_seconds";
pub const CAMPAIGN_AUCTION_DEADLINE: &str = "leadex_campaign_auction_deadline_seconds";

/// Process metrics, read from `/proc/self` at each scrape (Linux only; elsewhere absent).
pub const PROCESS_CPU_SECONDS: &str = "leadex_process_cpu_seconds_total";
pub const PROCESS_RESIDENT_MEMORY: &str = "leadex_process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY: &str = "leadex_process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "leadex_process_open_fds";
pub const PROCESS_MAX_FDS: &str = "leadex_process_max_fds";
pub const PROCESS_THREADS: &str = "leadex_process_threads";
pub const PROCESS_START_TIME: &str = "leadex_process_start_time_seconds";
pub const BUYER_SKIPPED_TOTAL: &str = "leadex_buyer_skipped_total";
pub const BUYER_BREAKER_STATE: &str = "leadex_buyer_breaker_state";
pub const DUPLICATES_TOTAL: &str = "leadex_duplicate_leads_total";
pub const PENDING_RESOLVED_TOTAL: &str = "leadex_pending_resolved_total";
pub const REAUCTIONS_TOTAL: &str = "leadex_reauctions_total";
pub const WEBHOOKS_TOTAL: &str = "leadex_webhooks_total";
pub const WEBHOOKS_WAITING: &str = "leadex_webhooks_waiting";

/// Why a buyer was left out of an auction (`leadex_buyer_skipped_total`).
pub const SKIP_REASONS: [&str; 5] = [
    "filtered",
    "outside_schedule",
    "capped",
    "caps_unavailable",
    "breaker_open",
];
/// How a pending lead ended (`leadex_pending_resolved_total`).
pub const PENDING_OUTCOMES: [&str; 2] = ["sold", "unsold"];
/// Outcome words of `leadex_webhooks_total`: delivered, a failed try that will be retried,
/// or given up after the last try.
pub const WEBHOOK_OUTCOMES: [&str; 3] = ["delivered", "retry", "failed"];

/// Outcome words of `leadex_leads_total`.
pub const LEAD_OUTCOMES: [&str; 2] = ["sold", "pending"];
/// Outcome words of `leadex_buyer_pings_total`: a bid, or why there was none.
pub const PING_OUTCOMES: [&str; 7] = [
    "bid",
    "no_bid",
    "http_error",
    "bad_body",
    "timeout",
    "transport_error",
    "overloaded",
];
/// Outcome words of `leadex_buyer_posts_total`.
pub const POST_OUTCOMES: [&str; 7] = [
    "accepted",
    "rejected",
    "http_error",
    "bad_body",
    "timeout",
    "transport_error",
    "overloaded",
];

/// Buckets for a millisecond-scale auction: 1 ms to 5 s, with steps around the usual
/// deadlines (ping 300 ms, ping + post 2.3 s) so a p99 can be compared with them.
const LATENCY_BUCKETS: [f64; 19] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0,
    2.5, 3.0, 5.0,
];
/// Sub-millisecond work (storage commits, limiter checks): 50 µs to 1 s.
const FAST_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle. Several apps in
/// one process (tests) share it.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(AUCTION_DURATION.into()), &LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(BUYER_PING_DURATION.into()),
                        &LATENCY_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(BUYER_POST_DURATION.into()),
                        &LATENCY_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(HTTP_REQUEST_DURATION.into()),
                        &LATENCY_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(STORAGE_WRITE_DURATION.into()),
                        &FAST_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(STORAGE_APPLY_DURATION.into()),
                        &FAST_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(RATE_LIMIT_CHECK_DURATION.into()),
                        &FAST_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(STORAGE_BATCH_SIZE.into()),
                        &BATCH_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty");
            let handle = builder
                .install_recorder()
                .expect("the metrics recorder is installed once");
            // Histogram samples wait in buckets until drained; a scrape drains them, and so
            // does this, so memory stays flat on a node nobody scrapes (a laptop, a test).
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("leadex-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("the metrics upkeep thread starts");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        LEADS_TOTAL,
        "Leads answered with 200, by campaign and outcome (sold, pending)."
    );
    describe_histogram!(
        AUCTION_DURATION,
        Unit::Seconds,
        "Time from a lead's acceptance to its stored outcome."
    );
    describe_gauge!(AUCTIONS_IN_FLIGHT, "Auctions running now.");
    describe_histogram!(
        BUYER_PING_DURATION,
        Unit::Seconds,
        "Time a buyer took to answer a ping."
    );
    describe_counter!(BUYER_PINGS_TOTAL, "Pings sent, by buyer and outcome.");
    describe_counter!(BUYER_POSTS_TOTAL, "Posts sent, by buyer and outcome.");
    describe_histogram!(
        BUYER_POST_DURATION,
        Unit::Seconds,
        "Time a buyer took to answer a post."
    );
    describe_counter!(
        BUYER_POST_VALUE,
        "Money of posts a buyer accepted, in cents (divide by 100 for currency units)."
    );
    describe_gauge!(BUYER_IN_FLIGHT, "Requests to a buyer in flight now.");
    describe_counter!(
        SOLD_VALUE_TOTAL,
        "Money paid for sold leads, in cents (divide by 100 for currency units), by campaign."
    );
    describe_counter!(RATE_LIMITED_TOTAL, "Requests refused with 429.");
    describe_counter!(AUTH_FAILURES_TOTAL, "Requests refused with 401.");
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP answer time by route and status."
    );
    describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests by route and status.");
    describe_histogram!(
        STORAGE_WRITE_DURATION,
        Unit::Seconds,
        "Time of one durable storage commit."
    );
    describe_counter!(STORAGE_ERRORS_TOTAL, "Storage operations that failed.");
    describe_histogram!(
        STORAGE_BATCH_SIZE,
        "Writes committed together by one group commit."
    );
    describe_histogram!(
        STORAGE_APPLY_DURATION,
        Unit::Seconds,
        "Embedded store: time of one batch of logged writes applied to its tables (at idle priority, waits for a free core included)."
    );
    describe_gauge!(
        STORAGE_UNAPPLIED,
        "Embedded store: logged writes not yet applied to its tables (read from memory)."
    );
    describe_counter!(
        STORAGE_SPILLED_TOTAL,
        "Sold leads written to the local spill file because storage refused them."
    );
    describe_counter!(
        STORAGE_SPILL_REPLAYED_TOTAL,
        "Spilled sold leads later stored."
    );
    describe_counter!(
        STORAGE_SPILL_DROPPED_TOTAL,
        "Sold leads neither stored nor spilled (spill full or unwritable): only in the log."
    );
    describe_gauge!(
        STORAGE_SPILL_PENDING,
        "Sold leads waiting in the spill file."
    );
    describe_histogram!(
        RATE_LIMIT_CHECK_DURATION,
        Unit::Seconds,
        "Time of one rate-limit check."
    );
    describe_counter!(
        RATE_LIMIT_BACKEND_ERRORS,
        "Rate-limit checks the shared backend could not answer."
    );
    describe_gauge!(
        RATE_LIMIT_FALLBACK_ACTIVE,
        "1 while the shared rate-limit backend is given up on and node-local limits apply."
    );
    describe_counter!(
        IDEMPOTENT_REPLAYS_TOTAL,
        "Answers replayed for a repeated Idempotency-Key."
    );
    describe_counter!(
        OVERLOAD_REFUSALS_TOTAL,
        "Leads refused with 503 because the node was at its auction limit."
    );
    describe_counter!(
        BUYER_SKIPPED_TOTAL,
        "Buyers left out of an auction, by buyer and reason (filtered, outside_schedule, capped, caps_unavailable, breaker_open)."
    );
    describe_gauge!(
        BUYER_BREAKER_STATE,
        "A buyer's circuit breaker: 0 closed, 1 open, 2 half-open (one probe decides)."
    );
    describe_counter!(
        DUPLICATES_TOTAL,
        "Leads refused with 409 as duplicates, by campaign."
    );
    describe_counter!(
        PENDING_RESOLVED_TOTAL,
        "Pending leads later sold or given up as unsold, by campaign and outcome."
    );
    describe_counter!(
        REAUCTIONS_TOTAL,
        "Auctions run again for pending leads, by campaign."
    );
    describe_counter!(
        WEBHOOKS_TOTAL,
        "Supplier webhook calls by outcome (delivered, retry, failed)."
    );
    describe_gauge!(
        WEBHOOKS_WAITING,
        "Supplier notifications in this node's outbox, not yet delivered or given up."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_gauge!(
        STORAGE_UP,
        "1 when the store answered its health check at the last scrape, else 0."
    );
    describe_gauge!(
        RATE_LIMIT_BACKEND_UP,
        "1 when the rate-limit backend answered its health check at the last scrape, else 0 (the node then limits locally)."
    );
    describe_gauge!(
        COORDINATION_UP,
        "1 when the coordination backend (cap reservations, dedupe claims) answered at the last scrape, else 0 (capped buyers are then skipped)."
    );
    describe_gauge!(
        CAMPAIGN_PING_TIMEOUT,
        Unit::Seconds,
        "A campaign's ping deadline (ping_timeout_ms)."
    );
    describe_gauge!(
        CAMPAIGN_AUCTION_DEADLINE,
        Unit::Seconds,
        "A campaign's ping_timeout_ms + post_timeout_ms: the longest its auction takes when no post times out (each post that does adds a post_timeout_ms for the next bid)."
    );
}

/// Registers every counter at zero for the configured campaigns and buyers, so dashboards and
/// `rate()`/`absent()` alerts work before the first lead.
pub fn register_series<'a>(
    campaigns: impl Iterator<Item = &'a str>,
    buyers: impl Iterator<Item = &'a str>,
) {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    counter!(RATE_LIMITED_TOTAL).absolute(0);
    counter!(AUTH_FAILURES_TOTAL).absolute(0);
    counter!(STORAGE_ERRORS_TOTAL).absolute(0);
    counter!(STORAGE_SPILLED_TOTAL).absolute(0);
    counter!(STORAGE_SPILL_REPLAYED_TOTAL).absolute(0);
    counter!(STORAGE_SPILL_DROPPED_TOTAL).absolute(0);
    counter!(RATE_LIMIT_BACKEND_ERRORS).absolute(0);
    counter!(IDEMPOTENT_REPLAYS_TOTAL).absolute(0);
    counter!(OVERLOAD_REFUSALS_TOTAL).absolute(0);
    gauge!(AUCTIONS_IN_FLIGHT).increment(0.0);
    for outcome in WEBHOOK_OUTCOMES {
        counter!(WEBHOOKS_TOTAL, "outcome" => outcome).increment(0);
    }
    for campaign in campaigns {
        let campaign = campaign.to_owned();
        counter!(DUPLICATES_TOTAL, "campaign" => campaign.clone()).increment(0);
        counter!(REAUCTIONS_TOTAL, "campaign" => campaign.clone()).increment(0);
        for outcome in PENDING_OUTCOMES {
            counter!(PENDING_RESOLVED_TOTAL, "campaign" => campaign.clone(), "outcome" => outcome)
                .increment(0);
        }
        for outcome in LEAD_OUTCOMES {
            counter!(LEADS_TOTAL, "campaign" => campaign.clone(), "outcome" => outcome)
                .increment(0);
        }
        counter!(SOLD_VALUE_TOTAL, "campaign" => campaign.clone()).increment(0);
    }
    for buyer in buyers {
        let buyer = buyer.to_owned();
        for outcome in PING_OUTCOMES {
            counter!(BUYER_PINGS_TOTAL, "buyer" => buyer.clone(), "outcome" => outcome)
                .increment(0);
        }
        for outcome in POST_OUTCOMES {
            counter!(BUYER_POSTS_TOTAL, "buyer" => buyer.clone(), "outcome" => outcome)
                .increment(0);
        }
        counter!(BUYER_POST_VALUE, "buyer" => buyer.clone()).increment(0);
        gauge!(BUYER_IN_FLIGHT, "buyer" => buyer.clone()).increment(0.0);
        for reason in SKIP_REASONS {
            counter!(BUYER_SKIPPED_TOTAL, "buyer" => buyer.clone(), "reason" => reason)
                .increment(0);
        }
        gauge!(BUYER_BREAKER_STATE, "buyer" => buyer.clone()).increment(0.0);
    }
}

/// Exports a campaign's deadlines, so dashboards and alerts compare auction time with them.
pub fn register_campaign_deadlines(
    campaign: &str,
    ping_timeout: std::time::Duration,
    post_timeout: std::time::Duration,
) {
    let campaign = campaign.to_owned();
    gauge!(CAMPAIGN_PING_TIMEOUT, "campaign" => campaign.clone()).set(ping_timeout.as_secs_f64());
    gauge!(CAMPAIGN_AUCTION_DEADLINE, "campaign" => campaign)
        .set((ping_timeout + post_timeout).as_secs_f64());
}

/// Records the backends' health as seen at this scrape.
pub fn record_backend_health(storage_up: bool, rate_limit_backend: &'static str, limiter_up: bool) {
    gauge!(STORAGE_UP).set(if storage_up { 1.0 } else { 0.0 });
    gauge!(RATE_LIMIT_BACKEND_UP, "backend" => rate_limit_backend).set(if limiter_up {
        1.0
    } else {
        0.0
    });
}

/// Records the coordination backend's health as seen at this scrape.
pub fn record_coordination_health(backend: &'static str, up: bool) {
    gauge!(COORDINATION_UP, "backend" => backend).set(if up { 1.0 } else { 0.0 });
}

/// The Prometheus text of this process' CPU, memory, file descriptors, threads and start
/// time, read from `/proc/self` now. Rendered by hand because `metrics` counters are integers
/// and CPU seconds are not. Empty where `/proc` is not there.
pub fn render_process_metrics() -> String {
    let Some(stats) = process::read() else {
        return String::new();
    };
    let mut out = String::with_capacity(1024);
    let mut emit = |name: &str, kind: &str, help: &str, value: f64| {
        use std::fmt::Write;
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        );
    };
    emit(
        PROCESS_CPU_SECONDS,
        "counter",
        "User and system CPU time spent, in seconds.",
        stats.cpu_seconds,
    );
    emit(
        PROCESS_RESIDENT_MEMORY,
        "gauge",
        "Resident memory size in bytes.",
        stats.resident_bytes,
    );
    emit(
        PROCESS_VIRTUAL_MEMORY,
        "gauge",
        "Virtual memory size in bytes.",
        stats.virtual_bytes,
    );
    emit(
        PROCESS_OPEN_FDS,
        "gauge",
        "Open file descriptors.",
        stats.open_fds,
    );
    if let Some(max_fds) = stats.max_fds {
        emit(
            PROCESS_MAX_FDS,
            "gauge",
            "Limit on open file descriptors (soft).",
            max_fds,
        );
    }
    emit(PROCESS_THREADS, "gauge", "OS threads.", stats.threads);
    emit(
        PROCESS_START_TIME,
        "gauge",
        "Start time of the process since the Unix epoch, in seconds.",
        stats.start_time_seconds,
    );
    out
}

mod process {
    //! `/proc/self` parsing for the process metrics.

    pub struct Stats {
        pub cpu_seconds: f64,
        pub resident_bytes: f64,
        pub virtual_bytes: f64,
        pub open_fds: f64,
        pub max_fds: Option<f64>,
        pub threads: f64,
        pub start_time_seconds: f64,
    }

    pub fn read() -> Option<Stats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|line| line.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| max_open_files(&limits));
        // SAFETY: sysconf only reads a configuration value.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if ticks <= 0 || page <= 0 {
            return None;
        }
        parse_stat(&stat, ticks as f64, page as f64, boot_time).map(|mut stats| {
            stats.open_fds = open_fds;
            stats.max_fds = max_fds;
            stats
        })
    }

    /// Parses `/proc/self/stat`. The command name (field 2) may hold spaces and parentheses,
    /// so fields are counted from its last `)`.
    pub fn parse_stat(stat: &str, ticks: f64, page: f64, boot_time: f64) -> Option<Stats> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `fields[0]` is field 3 (state) of proc(5).
        let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
        Some(Stats {
            cpu_seconds: (field(14)? + field(15)?) / ticks,
            threads: field(20)?,
            start_time_seconds: boot_time + field(22)? / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds: 0.0,
            max_fds: None,
        })
    }

    fn max_open_files(limits: &str) -> Option<f64> {
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn stat_fields_are_counted_after_the_command_name() {
            let stat = "4242 (lead ex) (x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 3000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
            let stats = parse_stat(stat, 100.0, 4096.0, 1_700_000_000.0).unwrap();
            assert_eq!(stats.cpu_seconds, 3.0);
            assert_eq!(stats.threads, 7.0);
            assert_eq!(stats.start_time_seconds, 1_700_000_010.0);
            assert_eq!(stats.virtual_bytes, 123_456_789.0);
            assert_eq!(stats.resident_bytes, 3000.0 * 4096.0);
        }

        #[test]
        fn max_open_files_is_the_soft_limit() {
            let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
            assert_eq!(max_open_files(limits), Some(1024.0));
        }
    }
}

/// An error with its whole chain of causes, `error: cause: cause`: the deepest is usually
/// the one an operator can act on (`Connection refused`, `invalid peer certificate:
/// UnknownIssuer`), and an HTTP client's own message names none of them.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    use std::fmt::Write;
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let _ = write!(text, ": {e}");
        cause = e.source();
    }
    text
}

/// Sets up `tracing` output once: `text` for people, `json` for log pipelines. The level comes
/// from `RUST_LOG` (default `info`).
pub fn init_logging(format: &str) {
    init_logging_at(format, "info");
}

/// As `init_logging`, with another level when `RUST_LOG` is not set.
pub fn init_logging_at(format: &str, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, never in files or log pipelines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            // The whole span list, so a line inside a nested span still carries the
            // request id of the `request` span around it.
            .with_span_list(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Wrapped(&'static str, Option<Box<Wrapped>>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn an_error_chain_names_every_cause_down_to_the_deepest() {
        let error = Wrapped(
            "error sending request",
            Some(Box::new(Wrapped(
                "client error (Connect)",
                Some(Box::new(Wrapped(
                    "invalid peer certificate: UnknownIssuer",
                    None,
                ))),
            ))),
        );
        assert_eq!(
            super::error_chain(&error),
            "error sending request: client error (Connect): invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(super::error_chain(&Wrapped("alone", None)), "alone");
    }
}
