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
pub const RATE_LIMIT_CHECK_DURATION: &str = "leadex_rate_limit_check_duration_seconds";
pub const RATE_LIMIT_BACKEND_ERRORS: &str = "leadex_rate_limit_backend_errors_total";
pub const RATE_LIMIT_FALLBACK_ACTIVE: &str = "leadex_rate_limit_fallback_active";
pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "leadex_idempotent_replays_total";
pub const OVERLOAD_REFUSALS_TOTAL: &str = "leadex_overload_refusals_total";
pub const BUILD_INFO: &str = "leadex_build_info";

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

/// Buckets for a millisecond-scale auction: 1 ms to 5 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
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
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
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
    counter!(RATE_LIMIT_BACKEND_ERRORS).absolute(0);
    counter!(IDEMPOTENT_REPLAYS_TOTAL).absolute(0);
    counter!(OVERLOAD_REFUSALS_TOTAL).absolute(0);
    gauge!(AUCTIONS_IN_FLIGHT).increment(0.0);
    for campaign in campaigns {
        let campaign = campaign.to_owned();
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
    }
}

/// Sets up `tracing` output once: `text` for people, `json` for log pipelines. The level comes
/// from `RUST_LOG` (default `info`).
pub fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.try_init()
    };
}
