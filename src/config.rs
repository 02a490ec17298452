//! The TOML configuration of CONTRACT §4, parsed into typed, validated values. Unknown keys,
//! duplicate ids and dangling references stop start-up with the key and its line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use jiff::tz::TimeZone;

use crate::buyers::ReplyMapping;
use crate::domain::Price;
use crate::domain::campaign::BuyerRules;
use crate::domain::caps::CapRules;
use crate::domain::filters::{FieldFilter, FilterValue, LeadFilter};
use crate::domain::lead::UsState;
use crate::domain::schedule::{Schedule, ScheduleWindow};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default)]
    pub coordination: CoordinationConfig,
    #[serde(default)]
    pub sellers: Vec<SellerConfig>,
    #[serde(default)]
    pub suppliers: Vec<SupplierConfig>,
    #[serde(default)]
    pub campaigns: Vec<CampaignConfig>,
    #[serde(default)]
    pub buyers: Vec<BuyerConfig>,
    #[serde(default)]
    pub ops: OpsConfig,
}

/// Operators' access to the node (`GET /ops/leads/{id}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// sha-256 (hex) of each operator token; none: the operators' routes are off (404).
    #[serde(default)]
    pub token_sha256: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// HTTP worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Auctions running at once on this node; past it new leads get 503 with Retry-After.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_auctions: usize,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// How long SIGTERM waits for auctions in flight before exiting anyway.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Load balancers (addresses or CIDR ranges) whose `X-Forwarded-For` names the client;
    /// from anyone else the header is ignored, as a caller could forge it.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Also accept HTTP/2 without TLS (h2c, prior knowledge) on the listener, for a load
    /// balancer that multiplexes leads on a few connections. Off by default: an HTTP/2
    /// client stays connected while idle, so a graceful stop then waits out its grace.
    #[serde(default)]
    pub h2c: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            workers: 0,
            max_in_flight_auctions: default_max_in_flight(),
            log_format: default_log_format(),
            shutdown_grace_secs: default_grace(),
            trusted_proxies: Vec::new(),
            h2c: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default = "default_storage_backend")]
    pub backend: String,
    #[serde(default = "default_storage_path")]
    pub path: PathBuf,
    /// Most writes committed together with one fsync.
    #[serde(default = "default_group_commit")]
    pub group_commit_max: usize,
    /// `embedded`: longest time between checkpoints (durable redb commits after which the
    /// write-ahead log starts again); a restart after a crash replays at most this much.
    #[serde(default = "default_checkpoint_ms")]
    pub checkpoint_ms: u64,
    /// `embedded`: memory for redb's page cache (recently written and read leads).
    #[serde(default = "default_cache_mib")]
    pub cache_mib: usize,
    /// `embedded`: longest time a logged write waits before it is applied to redb (in batches,
    /// off the answer path); until then reads find it in memory.
    #[serde(default = "default_apply_ms")]
    pub apply_ms: u64,
    /// `embedded`: while writes come faster than 3,000/s, how long (µs) the writer waits for
    /// more before each log sync; 0 never waits.
    #[serde(default = "default_linger_us")]
    pub linger_us: u64,
    /// `embedded`: below 3,000 writes/s, the applier uses only idle CPU time (`SCHED_IDLE`),
    /// where the process may return a thread to normal priority.
    #[serde(default = "default_true")]
    pub idle_apply: bool,
    /// `scylla`: contact points, `host:port`.
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default = "default_keyspace")]
    pub keyspace: String,
    /// `scylla`, for `leadex migrate`: SimpleStrategy with this many replicas ...
    #[serde(default)]
    pub replication_factor: Option<u32>,
    /// ... or NetworkTopologyStrategy with replicas per datacenter (`{ dc1 = 3 }`).
    #[serde(default)]
    pub datacenters: BTreeMap<String, u32>,
    /// `scylla`: the datacenter this node prefers (token-aware within it).
    #[serde(default)]
    pub local_datacenter: Option<String>,
    /// `scylla`: consistency of every read and write (`local_quorum`, `quorum`, `one`, ...).
    #[serde(default = "default_consistency")]
    pub consistency: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// `scylla`: longest wait for one request, retries included.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// `scylla`: a read or write not answered after this long is also sent to another replica.
    #[serde(default = "default_speculative_delay")]
    pub speculative_delay_ms: u64,
    /// `scylla`: rows per page of a partition read.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// `scylla`: wait for schema agreement after DDL. Only single-node test servers that do
    /// not report schema versions need `false`.
    #[serde(default = "default_true")]
    pub await_schema_agreement: bool,
    /// Sold leads whose write failed are kept here and replayed once storage is back
    /// (default `<path>/spill.jsonl`).
    #[serde(default)]
    pub spill_path: Option<PathBuf>,
    /// Most sales the spill file holds.
    #[serde(default = "default_spill_max")]
    pub spill_max: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: default_storage_backend(),
            path: default_storage_path(),
            group_commit_max: default_group_commit(),
            checkpoint_ms: default_checkpoint_ms(),
            cache_mib: default_cache_mib(),
            apply_ms: default_apply_ms(),
            linger_us: default_linger_us(),
            idle_apply: true,
            nodes: Vec::new(),
            keyspace: default_keyspace(),
            replication_factor: None,
            datacenters: BTreeMap::new(),
            local_datacenter: None,
            consistency: default_consistency(),
            username: None,
            password: None,
            request_timeout_ms: default_request_timeout(),
            connect_timeout_ms: default_connect_timeout(),
            speculative_delay_ms: default_speculative_delay(),
            page_size: default_page_size(),
            await_schema_agreement: true,
            spill_path: None,
            spill_max: default_spill_max(),
        }
    }
}

impl StorageConfig {
    pub fn spill_file(&self) -> PathBuf {
        self.spill_path
            .clone()
            .unwrap_or_else(|| self.path.join("spill.jsonl"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default = "default_rl_backend")]
    pub backend: String,
    #[serde(default = "default_requests")]
    pub requests: u32,
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// Failed authentications allowed per client address per `auth_failure_window_secs`.
    #[serde(default = "default_auth_failures")]
    pub auth_failures: u32,
    #[serde(default = "default_window")]
    pub auth_failure_window_secs: u64,
    /// Redis URL when `backend = "redis"`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Longest wait for Redis before the node-local limiter answers instead.
    #[serde(default = "default_rl_timeout")]
    pub timeout_ms: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            backend: default_rl_backend(),
            requests: default_requests(),
            window_secs: default_window(),
            auth_failures: default_auth_failures(),
            auth_failure_window_secs: default_window(),
            url: None,
            key_prefix: default_key_prefix(),
            timeout_ms: default_rl_timeout(),
        }
    }
}

/// Where caps, dedupe claims, Idempotency-Key claims and re-auction leases are decided:
/// `memory` (this node, counters kept in its store) or `redis` (shared by every node).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationConfig {
    #[serde(default = "default_rl_backend")]
    pub backend: String,
    /// Redis URL when `backend = "redis"`; without one, `[rate_limit] url` is used.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_coord_prefix")]
    pub key_prefix: String,
    /// Longest wait for one Redis call; past it the call fails and what needed it is refused.
    #[serde(default = "default_coord_timeout")]
    pub timeout_ms: u64,
}

impl Default for CoordinationConfig {
    fn default() -> Self {
        CoordinationConfig {
            backend: default_rl_backend(),
            url: None,
            key_prefix: default_coord_prefix(),
            timeout_ms: default_coord_timeout(),
        }
    }
}

fn default_coord_prefix() -> String {
    "leadex:coord:".to_owned()
}
fn default_coord_timeout() -> u64 {
    250
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitOverride {
    pub requests: u32,
    /// The global `[rate_limit] window_secs` when not given.
    #[serde(default)]
    pub window_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SellerConfig {
    pub code: Spanned<String>,
    pub slug: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupplierConfig {
    pub id: Spanned<String>,
    pub sellers: Vec<Spanned<String>>,
    pub api_key_sha256: Vec<Spanned<String>>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitOverride>,
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub webhook_secret: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignConfig {
    pub id: Spanned<String>,
    pub seller: Spanned<String>,
    pub category: Spanned<String>,
    #[serde(default)]
    pub required_fields: Vec<String>,
    /// Fields kept out of pings besides the standard personal ones.
    #[serde(default)]
    pub personal_fields: Vec<String>,
    #[serde(default = "default_ping_timeout")]
    pub ping_timeout_ms: u64,
    #[serde(default = "default_post_timeout")]
    pub post_timeout_ms: u64,
    #[serde(default)]
    pub floor_price: Price,
    #[serde(default = "default_max_buyers")]
    pub max_buyers: usize,
    /// Refuse a lead whose phone or email the campaign accepted within this many days.
    #[serde(default)]
    pub dedupe_days: Option<u32>,
    /// How long a pending lead is auctioned again before it is given up as unsold.
    #[serde(default)]
    pub pending_ttl_secs: Option<u64>,
    /// Time between auctions of a pending lead (default 60 s, needs `pending_ttl_secs`).
    #[serde(default)]
    pub retry_interval_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuyerConfig {
    pub id: Spanned<String>,
    pub campaigns: Vec<Spanned<String>>,
    #[serde(default)]
    pub ping_url: Option<String>,
    pub post_url: String,
    #[serde(default)]
    pub fixed_price: Option<Price>,
    #[serde(default)]
    pub floor_price: Price,
    /// Extra headers sent with every ping and post (e.g. the buyer's own API key).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Requests to this buyer in flight at once; past it the buyer is skipped (no bid).
    #[serde(default = "default_buyer_in_flight")]
    pub max_in_flight: usize,
    /// Speak HTTP/2 to a plain `http://` buyer from the first byte (h2c, prior knowledge):
    /// all its requests share one connection per worker instead of one each. `https://`
    /// buyers get HTTP/2 by TLS negotiation whenever they offer it, without this.
    #[serde(default)]
    pub http2: bool,
    /// PEM file of certificate authorities to trust for this buyer's `https://` URLs besides
    /// the public roots: a buyer on a private CA, or its staging endpoint.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Only leads from these states (two-letter codes).
    #[serde(default)]
    pub states: Vec<Spanned<String>>,
    /// Only leads whose five-digit ZIP starts with one of these.
    #[serde(default)]
    pub zip_prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    pub filters: Vec<Spanned<FilterConfig>>,
    #[serde(default)]
    pub hourly_cap: Option<u32>,
    #[serde(default)]
    pub daily_cap: Option<u32>,
    #[serde(default)]
    pub daily_budget: Option<Price>,
    /// IANA name; caps, budgets and the schedule are counted in it.
    #[serde(default)]
    pub timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub schedule: Vec<Spanned<String>>,
    /// Where the bid is in the buyer's ping reply (dotted path; default `bid`).
    #[serde(default)]
    pub bid_path: Option<String>,
    #[serde(default)]
    pub token_path: Option<String>,
    /// Where the acceptance is in the post reply (default `accepted`).
    #[serde(default)]
    pub accept_path: Option<String>,
    /// The value at `accept_path` meaning bought (default boolean `true`).
    #[serde(default)]
    pub accept_value: Option<ScalarConfig>,
    /// Consecutive timeouts or errors that open the buyer's breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker keeps the buyer out before one probe decides.
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_secs: u64,
}

/// A number, string or boolean as written in the config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ScalarConfig {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl ScalarConfig {
    fn to_filter_value(&self) -> FilterValue {
        match self {
            ScalarConfig::Bool(b) => FilterValue::Bool(*b),
            ScalarConfig::Int(i) => FilterValue::Number(*i as f64),
            ScalarConfig::Float(f) => FilterValue::Number(*f),
            ScalarConfig::Text(t) => FilterValue::Text(t.clone()),
        }
    }

    fn to_text(&self) -> String {
        match self {
            ScalarConfig::Bool(b) => b.to_string(),
            ScalarConfig::Int(i) => i.to_string(),
            ScalarConfig::Float(f) => f.to_string(),
            ScalarConfig::Text(t) => t.clone(),
        }
    }
}

/// One entry of a buyer's `filters`: a lead field and the conditions it must meet.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub field: String,
    #[serde(default)]
    pub equals: Option<ScalarConfig>,
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<ScalarConfig>>,
    #[serde(default)]
    pub not_in: Option<Vec<ScalarConfig>>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub exists: Option<bool>,
}

impl FilterConfig {
    fn to_filter(&self) -> FieldFilter {
        let list = |v: &Option<Vec<ScalarConfig>>| {
            v.as_ref()
                .map(|items| items.iter().map(ScalarConfig::to_filter_value).collect())
        };
        FieldFilter {
            field: self.field.trim().to_owned(),
            equals: self.equals.as_ref().map(ScalarConfig::to_filter_value),
            one_of: list(&self.one_of),
            none_of: list(&self.not_in),
            min: self.min,
            max: self.max,
            exists: self.exists,
        }
    }

    fn problem(&self) -> Option<&'static str> {
        if self.field.trim().is_empty() {
            return Some("`field` is empty");
        }
        let set = [
            self.equals.is_some(),
            self.one_of.is_some(),
            self.not_in.is_some(),
            self.min.is_some(),
            self.max.is_some(),
            self.exists.is_some(),
        ];
        if !set.contains(&true) {
            return Some("needs one of equals, in, not_in, min, max, exists");
        }
        if self.one_of.as_ref().is_some_and(Vec::is_empty) {
            return Some("`in` is empty, so no lead could pass");
        }
        if [self.min, self.max]
            .iter()
            .flatten()
            .any(|v| !v.is_finite())
        {
            return Some("min and max must be finite numbers");
        }
        if let (Some(min), Some(max)) = (self.min, self.max)
            && min > max
        {
            return Some("min is above max");
        }
        None
    }
}

impl BuyerConfig {
    /// The buyer's time zone; valid once the config is validated.
    pub fn time_zone(&self) -> Result<TimeZone, String> {
        match &self.timezone {
            None => Ok(TimeZone::UTC),
            Some(name) => TimeZone::get(name.get_ref().trim()).map_err(|e| e.to_string()),
        }
    }

    /// The marketplace rules of this buyer as domain values (call on a validated config).
    pub fn rules(&self) -> BuyerRules {
        BuyerRules {
            filter: LeadFilter {
                states: self
                    .states
                    .iter()
                    .map(|s| s.get_ref().trim().to_ascii_uppercase())
                    .collect(),
                zip_prefixes: self
                    .zip_prefixes
                    .iter()
                    .map(|z| z.get_ref().trim().to_owned())
                    .collect(),
                fields: self
                    .filters
                    .iter()
                    .map(|f| f.get_ref().to_filter())
                    .collect(),
            },
            schedule: (!self.schedule.is_empty())
                .then(|| {
                    Schedule::parse(
                        &self
                            .schedule
                            .iter()
                            .map(|s| s.get_ref())
                            .collect::<Vec<_>>(),
                    )
                    .ok()
                })
                .flatten(),
            caps: CapRules {
                hourly_cap: self.hourly_cap,
                daily_cap: self.daily_cap,
                daily_budget: self.daily_budget,
            },
            timezone: self.time_zone().unwrap_or(TimeZone::UTC),
        }
    }

    /// Where the exchange reads bids, tokens and acceptance in this buyer's replies.
    pub fn reply_mapping(&self) -> ReplyMapping {
        let default = ReplyMapping::default();
        ReplyMapping {
            bid_path: self.bid_path.clone().unwrap_or(default.bid_path),
            token_path: self.token_path.clone().unwrap_or(default.token_path),
            accept_path: self.accept_path.clone().unwrap_or(default.accept_path),
            // The boolean `true` is the default (a JSON `true` only); any other value, the
            // text "true" included, is compared as text: a buyer configured with
            // `accept_value = "true"` answers `{"accepted": "true"}`, and that is a purchase.
            accept_value: match &self.accept_value {
                None | Some(ScalarConfig::Bool(true)) => None,
                Some(value) => Some(value.to_text()),
            },
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_max_in_flight() -> usize {
    20_000
}
fn default_log_format() -> String {
    "text".to_owned()
}
fn default_grace() -> u64 {
    30
}
fn default_storage_backend() -> String {
    "embedded".to_owned()
}
fn default_storage_path() -> PathBuf {
    PathBuf::from("data")
}
fn default_checkpoint_ms() -> u64 {
    1000
}

fn default_cache_mib() -> usize {
    64
}

fn default_apply_ms() -> u64 {
    20
}

fn default_linger_us() -> u64 {
    1000
}

fn default_group_commit() -> usize {
    512
}
fn default_keyspace() -> String {
    "leadex".to_owned()
}
fn default_consistency() -> String {
    "local_quorum".to_owned()
}
fn default_request_timeout() -> u64 {
    2000
}
fn default_connect_timeout() -> u64 {
    5000
}
fn default_speculative_delay() -> u64 {
    100
}
fn default_page_size() -> u32 {
    1000
}
fn default_true() -> bool {
    true
}
fn default_spill_max() -> usize {
    10_000
}
fn default_rl_backend() -> String {
    "memory".to_owned()
}
fn default_requests() -> u32 {
    60
}
fn default_window() -> u64 {
    60
}
fn default_auth_failures() -> u32 {
    30
}
fn default_key_prefix() -> String {
    "leadex:rl:".to_owned()
}
fn default_rl_timeout() -> u64 {
    5
}
fn default_ping_timeout() -> u64 {
    300
}
fn default_post_timeout() -> u64 {
    2000
}
fn default_max_buyers() -> usize {
    1
}
fn default_buyer_in_flight() -> usize {
    1024
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> u64 {
    30
}
/// Time between auctions of a pending lead when only `pending_ttl_secs` is set.
pub const DEFAULT_RETRY_INTERVAL_SECS: u64 = 60;

impl StorageConfig {
    fn scylla_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.nodes.is_empty() {
            problems.push(
                "storage.nodes: give at least one `host:port` for backend `scylla`".to_owned(),
            );
        }
        let mut chars = self.keyspace.chars();
        let identifier = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && self.keyspace.len() <= 48;
        if !identifier {
            problems.push(format!(
                "storage.keyspace: `{}` must be lower-case letters, digits and `_`, starting with a letter",
                self.keyspace
            ));
        }
        if self.replication_factor.is_some() && !self.datacenters.is_empty() {
            problems
                .push("storage: replication_factor and datacenters exclude each other".to_owned());
        }
        if self.replication_factor == Some(0) || self.datacenters.values().any(|n| *n == 0) {
            problems.push("storage: replica counts must be at least 1".to_owned());
        }
        if crate::storage::scylla::parse_consistency(&self.consistency).is_none() {
            problems.push(format!(
                "storage.consistency: `{}` is not one of one, two, three, quorum, all, local_quorum, each_quorum, local_one",
                self.consistency
            ));
        }
        if self.username.is_some() != self.password.is_some() {
            problems.push("storage: username and password go together".to_owned());
        }
        if !(1..=100_000).contains(&self.page_size) {
            problems.push("storage.page_size: from 1 to 100000 rows".to_owned());
        }
        if self.request_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            problems.push(
                "storage: request_timeout_ms and connect_timeout_ms must be at least 1".to_owned(),
            );
        }
        problems
    }
}

/// An address (`10.0.0.7`) or range (`172.16.0.0/12`) of `trusted_proxies`.
pub fn parse_proxy(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    let net = text.parse::<ipnet::IpNet>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })?;
    // Client addresses are compared as IPv4 when they are IPv4 written as IPv6, so a range
    // written that way (`::ffff:10.0.0.0/104`) is read as the IPv4 range it holds.
    if let ipnet::IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let std::net::IpAddr::V4(v4) = std::net::IpAddr::V6(v6.network()).to_canonical()
    {
        return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            .ok()
            .map(ipnet::IpNet::V4);
    }
    Some(net)
}

/// Line (1-based) of a byte offset in the source text.
fn line_of(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            ConfigError::Invalid(msg) => ConfigError::Invalid(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        // One Redis usually serves both: coordination falls back to the limiter's URL.
        if config.coordination.backend == "redis" && config.coordination.url.is_none() {
            config.coordination.url = config.rate_limit.url.clone();
        }
        config.validate(text)?;
        Ok(config)
    }

    fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let at = |s: &Spanned<String>| line_of(source, s.span().start);

        match self.storage.backend.as_str() {
            "embedded" => {}
            "scylla" => problems.extend(self.storage.scylla_problems()),
            other => problems.push(format!(
                "storage.backend: unknown backend `{other}` (this build knows `embedded` and `scylla`)"
            )),
        }
        if self.storage.spill_max == 0 {
            problems.push("storage.spill_max: must be at least 1".to_owned());
        }
        match self.rate_limit.backend.as_str() {
            "memory" => {}
            "redis" => match &self.rate_limit.url {
                None => problems.push(
                    "rate_limit.url: backend `redis` needs a url like redis://127.0.0.1:6379"
                        .to_owned(),
                ),
                Some(url) => {
                    if let Err(e) = redis::Client::open(url.as_str()) {
                        problems.push(format!("rate_limit.url: `{url}` is not a Redis URL: {e}"));
                    }
                }
            },
            other => problems.push(format!(
                "rate_limit.backend: unknown backend `{other}` (this build knows `memory` and `redis`)"
            )),
        }
        if self.rate_limit.timeout_ms == 0 {
            problems.push("rate_limit.timeout_ms: must be at least 1".to_owned());
        }
        match self.coordination.backend.as_str() {
            "memory" => {}
            "redis" => match &self.coordination.url {
                None => problems.push(
                    "coordination.url: backend `redis` needs a url like redis://127.0.0.1:6379 (or a [rate_limit] url)"
                        .to_owned(),
                ),
                Some(url) => {
                    if let Err(e) = redis::Client::open(url.as_str()) {
                        problems.push(format!("coordination.url: `{url}` is not a Redis URL: {e}"));
                    }
                }
            },
            other => problems.push(format!(
                "coordination.backend: unknown backend `{other}` (this build knows `memory` and `redis`)"
            )),
        }
        if self.coordination.timeout_ms == 0 {
            problems.push("coordination.timeout_ms: must be at least 1".to_owned());
        }
        if self.rate_limit.requests == 0 || self.rate_limit.window_secs == 0 {
            problems.push("rate_limit: requests and window_secs must be at least 1".to_owned());
        }
        if self.rate_limit.auth_failures == 0 || self.rate_limit.auth_failure_window_secs == 0 {
            // 0 failures would refuse every request; a 0 s window would turn the limit off.
            problems.push(
                "rate_limit: auth_failures and auth_failure_window_secs must be at least 1"
                    .to_owned(),
            );
        }
        if !matches!(self.server.log_format.as_str(), "text" | "json") {
            problems.push(format!(
                "server.log_format: `{}` is not `text` or `json`",
                self.server.log_format
            ));
        }
        for proxy in &self.server.trusted_proxies {
            if parse_proxy(proxy).is_none() {
                problems.push(format!(
                    "server.trusted_proxies: `{proxy}` is not an IP address or CIDR range"
                ));
            }
        }
        if self.server.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "server.listen: `{}` is not an address like 127.0.0.1:8080",
                self.server.listen
            ));
        }

        let mut seller_codes = HashMap::new();
        let mut slugs = HashSet::new();
        for seller in &self.sellers {
            let code = seller.code.get_ref();
            if code.len() != 8 || !code.chars().all(|c| c.is_ascii_alphanumeric()) {
                problems.push(format!(
                    "sellers.code `{code}` (line {}): must be 8 letters or digits",
                    at(&seller.code)
                ));
            }
            if seller_codes
                .insert(code.to_ascii_uppercase(), at(&seller.code))
                .is_some()
            {
                problems.push(format!(
                    "sellers.code `{code}` (line {}): duplicate seller code",
                    at(&seller.code)
                ));
            }
            if !slugs.insert(seller.slug.to_ascii_lowercase()) {
                problems.push(format!(
                    "sellers.slug `{}` (line {}): duplicate slug",
                    seller.slug,
                    at(&seller.code)
                ));
            }
        }

        let mut supplier_ids = HashSet::new();
        let mut key_hashes = HashSet::new();
        for supplier in &self.suppliers {
            let id = supplier.id.get_ref();
            if !supplier_ids.insert(id.clone()) {
                problems.push(format!(
                    "suppliers.id `{id}` (line {}): duplicate id",
                    at(&supplier.id)
                ));
            }
            for seller in &supplier.sellers {
                if !seller_codes.contains_key(&seller.get_ref().to_ascii_uppercase()) {
                    problems.push(format!(
                        "suppliers.sellers `{}` (line {}): no seller with this code",
                        seller.get_ref(),
                        at(seller)
                    ));
                }
            }
            if supplier.api_key_sha256.is_empty() {
                problems.push(format!(
                    "suppliers.api_key_sha256 (supplier `{id}`, line {}): at least one key hash",
                    at(&supplier.id)
                ));
            }
            for hash in &supplier.api_key_sha256 {
                problems.extend(key_hash_problem(
                    "suppliers.api_key_sha256",
                    hash.get_ref(),
                    at(hash),
                    &mut key_hashes,
                    "the same key is given twice",
                ));
            }
            if let Some(rl) = &supplier.rate_limit
                && (rl.requests == 0 || rl.window_secs == Some(0))
            {
                problems.push(format!("suppliers.rate_limit (supplier `{id}`): requests and window_secs must be at least 1"));
            }
            match (&supplier.webhook_url, &supplier.webhook_secret) {
                (Some(url), secret) => {
                    if reqwest::Url::parse(url)
                        .map(|u| !matches!(u.scheme(), "http" | "https"))
                        .unwrap_or(true)
                    {
                        problems.push(format!(
                            "suppliers.webhook_url (supplier `{id}`, line {}): `{url}` is not an http(s) URL",
                            at(&supplier.id)
                        ));
                    }
                    if secret.as_deref().is_none_or(|s| s.trim().is_empty()) {
                        problems.push(format!(
                            "suppliers.webhook_secret (supplier `{id}`, line {}): needed with webhook_url, to sign the calls",
                            at(&supplier.id)
                        ));
                    }
                }
                (None, Some(_)) => problems.push(format!(
                    "suppliers.webhook_secret (supplier `{id}`, line {}): set without webhook_url",
                    at(&supplier.id)
                )),
                (None, None) => {}
            }
        }
        for hash in &self.ops.token_sha256 {
            problems.extend(key_hash_problem(
                "ops.token_sha256",
                hash.get_ref(),
                at(hash),
                &mut key_hashes,
                "given twice, or also a supplier's API key (an operator token must be its own)",
            ));
        }

        let mut campaign_ids = HashSet::new();
        let mut categories = HashSet::new();
        for campaign in &self.campaigns {
            let id = campaign.id.get_ref();
            if !campaign_ids.insert(id.clone()) {
                problems.push(format!(
                    "campaigns.id `{id}` (line {}): duplicate id",
                    at(&campaign.id)
                ));
            }
            let seller = campaign.seller.get_ref().to_ascii_uppercase();
            if !seller_codes.contains_key(&seller) {
                problems.push(format!(
                    "campaigns.seller `{}` (campaign `{id}`, line {}): no seller with this code",
                    campaign.seller.get_ref(),
                    at(&campaign.seller)
                ));
            }
            let category = campaign.category.get_ref().trim().to_lowercase();
            if category.is_empty() {
                problems.push(format!(
                    "campaigns.category (campaign `{id}`, line {}): empty",
                    at(&campaign.category)
                ));
            }
            if !categories.insert((seller, category)) {
                problems.push(format!(
                    "campaigns.category `{}` (campaign `{id}`, line {}): the seller already has a campaign for this category",
                    campaign.category.get_ref(),
                    at(&campaign.category)
                ));
            }
            if campaign.ping_timeout_ms == 0 || campaign.post_timeout_ms == 0 {
                problems.push(format!("campaigns.ping_timeout_ms/post_timeout_ms (campaign `{id}`): must be at least 1"));
            }
            if campaign.max_buyers == 0 {
                problems.push(format!(
                    "campaigns.max_buyers (campaign `{id}`): must be at least 1"
                ));
            }
            if campaign.dedupe_days == Some(0) {
                problems.push(format!(
                    "campaigns.dedupe_days (campaign `{id}`, line {}): must be at least 1 (leave it out for no dedupe)",
                    at(&campaign.id)
                ));
            }
            if campaign.pending_ttl_secs == Some(0) || campaign.retry_interval_secs == Some(0) {
                problems.push(format!(
                    "campaigns.pending_ttl_secs/retry_interval_secs (campaign `{id}`, line {}): must be at least 1",
                    at(&campaign.id)
                ));
            }
            if campaign.retry_interval_secs.is_some() && campaign.pending_ttl_secs.is_none() {
                problems.push(format!(
                    "campaigns.retry_interval_secs (campaign `{id}`, line {}): needs pending_ttl_secs (without a TTL a pending lead stays pending)",
                    at(&campaign.id)
                ));
            }
        }

        let mut buyer_ids = HashSet::new();
        for buyer in &self.buyers {
            let id = buyer.id.get_ref();
            if !buyer_ids.insert(id.clone()) {
                problems.push(format!(
                    "buyers.id `{id}` (line {}): duplicate id",
                    at(&buyer.id)
                ));
            }
            for campaign in &buyer.campaigns {
                if !campaign_ids.contains(campaign.get_ref()) {
                    problems.push(format!(
                        "buyers.campaigns `{}` (buyer `{id}`, line {}): no campaign with this id",
                        campaign.get_ref(),
                        at(campaign)
                    ));
                }
            }
            match (&buyer.ping_url, &buyer.fixed_price) {
                (None, None) => problems.push(format!(
                    "buyers (buyer `{id}`, line {}): needs ping_url (ping-post) or fixed_price (direct post)",
                    at(&buyer.id)
                )),
                (Some(_), Some(_)) => problems.push(format!(
                    "buyers (buyer `{id}`, line {}): ping_url and fixed_price exclude each other",
                    at(&buyer.id)
                )),
                _ => {}
            }
            for url in buyer
                .ping_url
                .iter()
                .chain(std::iter::once(&buyer.post_url))
            {
                if reqwest::Url::parse(url)
                    .map(|u| !matches!(u.scheme(), "http" | "https"))
                    .unwrap_or(true)
                {
                    problems.push(format!(
                        "buyers (buyer `{id}`, line {}): `{url}` is not an http(s) URL",
                        at(&buyer.id)
                    ));
                }
            }
            if buyer.ca_file.is_some()
                && !buyer
                    .ping_url
                    .iter()
                    .chain(std::iter::once(&buyer.post_url))
                    .any(|url| reqwest::Url::parse(url).is_ok_and(|u| u.scheme() == "https"))
            {
                problems.push(format!(
                    "buyers.ca_file (buyer `{id}`, line {}): only used for https:// URLs, and this buyer has none",
                    at(&buyer.id)
                ));
            }
            if buyer.max_in_flight == 0 {
                problems.push(format!(
                    "buyers.max_in_flight (buyer `{id}`): must be at least 1"
                ));
            }
            self.validate_rules(buyer, source, &mut problems);
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("\n")))
        }
    }

    /// Filters, caps, time zone, schedule, reply mapping and breaker settings of one buyer.
    fn validate_rules(&self, buyer: &BuyerConfig, source: &str, problems: &mut Vec<String>) {
        let id = buyer.id.get_ref();
        let line = |span: std::ops::Range<usize>| line_of(source, span.start);
        for state in &buyer.states {
            if UsState::parse(state.get_ref()).is_none() {
                problems.push(format!(
                    "buyers.states `{}` (buyer `{id}`, line {}): not a US state code",
                    state.get_ref(),
                    line(state.span())
                ));
            }
        }
        for prefix in &buyer.zip_prefixes {
            let p = prefix.get_ref().trim();
            if p.is_empty() || p.len() > 5 || !p.chars().all(|c| c.is_ascii_digit()) {
                problems.push(format!(
                    "buyers.zip_prefixes `{}` (buyer `{id}`, line {}): 1 to 5 digits",
                    prefix.get_ref(),
                    line(prefix.span())
                ));
            }
        }
        for filter in &buyer.filters {
            if let Some(why) = filter.get_ref().problem() {
                problems.push(format!(
                    "buyers.filters (buyer `{id}`, field `{}`, line {}): {why}",
                    filter.get_ref().field,
                    line(filter.span())
                ));
            }
        }
        if let Some(tz) = &buyer.timezone
            && buyer.time_zone().is_err()
        {
            problems.push(format!(
                "buyers.timezone `{}` (buyer `{id}`, line {}): not an IANA time zone name like America/Chicago",
                tz.get_ref(),
                line(tz.span())
            ));
        }
        for window in &buyer.schedule {
            if let Err(e) = ScheduleWindow::parse(window.get_ref()) {
                problems.push(format!(
                    "buyers.schedule (buyer `{id}`, line {}): {e}",
                    line(window.span())
                ));
            }
        }
        if buyer.hourly_cap == Some(0) || buyer.daily_cap == Some(0) {
            problems.push(format!(
                "buyers.hourly_cap/daily_cap (buyer `{id}`, line {}): must be at least 1 (leave it out for no cap)",
                at_id(source, buyer)
            ));
        }
        if buyer.daily_budget.is_some_and(|b| b.is_zero()) {
            problems.push(format!(
                "buyers.daily_budget (buyer `{id}`, line {}): must be above 0 (leave it out for no budget)",
                at_id(source, buyer)
            ));
        }
        for (key, path) in [
            ("bid_path", &buyer.bid_path),
            ("token_path", &buyer.token_path),
            ("accept_path", &buyer.accept_path),
        ] {
            if let Some(path) = path
                && (path.trim().is_empty() || path.split('.').any(str::is_empty))
            {
                problems.push(format!(
                    "buyers.{key} `{path}` (buyer `{id}`, line {}): a dotted path like data.offer.price",
                    at_id(source, buyer)
                ));
            }
        }
        if buyer.fixed_price.is_some() && (buyer.bid_path.is_some() || buyer.token_path.is_some()) {
            problems.push(format!(
                "buyers.bid_path/token_path (buyer `{id}`, line {}): a direct-post buyer is never pinged",
                at_id(source, buyer)
            ));
        }
        if buyer.breaker_failures == 0 {
            problems.push(format!(
                "buyers.breaker_failures (buyer `{id}`, line {}): must be at least 1",
                at_id(source, buyer)
            ));
        }
    }
}

/// What is wrong with `hash`, a key's sha-256 given as `key` on `line`: not 64 hex digits, or
/// one of `seen` (`twice` says so); a good one joins `seen`.
fn key_hash_problem(
    key: &str,
    hash: &str,
    line: usize,
    seen: &mut HashSet<String>,
    twice: &str,
) -> Option<String> {
    if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
        Some(format!(
            "{key} (line {line}): `{hash}` is not a hex sha-256 (64 hex digits; see `leadex hash-key`)"
        ))
    } else if !seen.insert(hash.to_ascii_lowercase()) {
        Some(format!("{key} (line {line}): {twice}"))
    } else {
        None
    }
}

fn at_id(source: &str, buyer: &BuyerConfig) -> usize {
    line_of(source, buyer.id.span().start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"

[[sellers]]
code = "ACME1234"
slug = "acme"

[[suppliers]]
id = "sup-1"
sellers = ["ACME1234"]
api_key_sha256 = ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]

[[campaigns]]
id = "acme-auto"
seller = "ACME1234"
category = "Auto Insurance"

[[buyers]]
id = "buyer-a"
campaigns = ["acme-auto"]
ping_url = "http://127.0.0.1:9001/ping"
post_url = "http://127.0.0.1:9001/post"
"#;

    #[test]
    fn loads_the_contract_example() {
        let config = Config::from_toml(BASE).unwrap();
        assert_eq!(config.campaigns[0].ping_timeout_ms, 300);
        assert_eq!(config.rate_limit.requests, 60);
        assert_eq!(config.buyers[0].floor_price, Price::ZERO);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = format!("{BASE}bogus_key = 1\n");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.contains("bogus_key") && err.contains("line 24"),
            "{err}"
        );
    }

    #[test]
    fn a_ca_file_needs_an_https_url() {
        let err = Config::from_toml(&format!("{BASE}ca_file = \"ca.pem\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("buyers.ca_file (buyer `buyer-a`, line 20)") && err.contains("https://"),
            "{err}"
        );
        let https = BASE.replace("http://127.0.0.1:9001/post", "https://127.0.0.1:9001/post");
        let config = Config::from_toml(&format!("{https}ca_file = \"ca.pem\"\n")).unwrap();
        assert_eq!(config.buyers[0].ca_file.as_deref(), Some("ca.pem"));
    }

    #[test]
    fn duplicates_and_dangling_references_are_named_with_lines() {
        let text = format!(
            "{BASE}\n[[buyers]]\nid = \"buyer-a\"\ncampaigns = [\"nope\"]\npost_url = \"http://127.0.0.1:1/p\"\nfixed_price = 3\n\n[[campaigns]]\nid = \"c2\"\nseller = \"ZZZZ0000\"\ncategory = \"Solar\"\n"
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.contains("buyers.id `buyer-a` (line 26): duplicate id"),
            "{err}"
        );
        assert!(
            err.contains("buyers.campaigns `nope` (buyer `buyer-a`, line 27)"),
            "{err}"
        );
        assert!(
            err.contains("campaigns.seller `ZZZZ0000` (campaign `c2`, line 33)"),
            "{err}"
        );
    }

    #[test]
    fn marketplace_rules_load_into_domain_values() {
        let text = format!(
            "{BASE}states = [\"tx\", \"CA\"]\nzip_prefixes = [\"750\"]\nfilters = [{{ field = \"homeowner\", in = [\"yes\"] }}, {{ field = \"creditScore\", min = 600 }}]\nhourly_cap = 2\ndaily_cap = 10\ndaily_budget = 250.5\ntimezone = \"America/Chicago\"\nschedule = [\"mon-fri 08:00-20:00\"]\nbid_path = \"data.offer.price\"\naccept_path = \"result\"\naccept_value = \"success\"\nbreaker_failures = 3\n"
        );
        let config = Config::from_toml(&text).unwrap();
        let buyer = &config.buyers[0];
        let rules = buyer.rules();
        assert_eq!(rules.filter.states, vec!["TX", "CA"]);
        assert_eq!(rules.filter.fields.len(), 2);
        assert_eq!(rules.filter.fields[1].min, Some(600.0));
        assert_eq!(rules.caps.daily_budget, Some(Price::from_cents(25050)));
        assert_eq!(rules.timezone.iana_name(), Some("America/Chicago"));
        assert!(rules.schedule.is_some());
        let mapping = buyer.reply_mapping();
        assert_eq!(mapping.bid_path, "data.offer.price");
        assert_eq!(mapping.token_path, "token");
        assert_eq!(mapping.accept_value.as_deref(), Some("success"));
        assert_eq!(buyer.breaker_failures, 3);
        assert_eq!(buyer.breaker_cooldown_secs, 30);
    }

    #[test]
    fn bad_rules_are_named_with_key_and_line() {
        let text = format!(
            "{BASE}timezone = \"Mars/Olympus\"\nschedule = [\"mon-fri 08:00-20:00\", \"funday 10:00-12:00\"]\nfilters = [{{ field = \"creditScore\" }}]\nstates = [\"XX\"]\n\n[[campaigns]]\nid = \"c2\"\nseller = \"ACME1234\"\ncategory = \"Solar\"\nretry_interval_secs = 5\n"
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        for expected in [
            "buyers.timezone `Mars/Olympus` (buyer `buyer-a`, line 24)",
            "buyers.schedule (buyer `buyer-a`, line 25): `funday 10:00-12:00`",
            "buyers.filters (buyer `buyer-a`, field `creditScore`, line 26): needs one of",
            "buyers.states `XX` (buyer `buyer-a`, line 27)",
            "campaigns.retry_interval_secs (campaign `c2`, line 30): needs pending_ttl_secs",
        ] {
            assert!(err.contains(expected), "{expected}\n{err}");
        }
        let unknown = format!("{BASE}filters = [{{ field = \"a\", greater = 3 }}]\n");
        let err = Config::from_toml(&unknown).unwrap_err().to_string();
        assert!(err.contains("greater") && err.contains("line 24"), "{err}");
    }

    #[test]
    fn accept_value_true_is_the_default_boolean_and_direct_buyers_take_no_bid_path() {
        let text = format!(
            "{BASE}accept_value = true\n\n[[buyers]]\nid = \"direct\"\ncampaigns = [\"acme-auto\"]\npost_url = \"http://127.0.0.1:1/p\"\nfixed_price = 3\nbid_path = \"x\"\n"
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.contains("buyers.bid_path/token_path (buyer `direct`, line 27)"),
            "{err}"
        );
        let config = Config::from_toml(&format!("{BASE}accept_value = true\n")).unwrap();
        assert_eq!(config.buyers[0].reply_mapping(), ReplyMapping::default());
        // The text "true" is what this buyer answers with: its string, in any case, and a JSON
        // true are purchases.
        let config = Config::from_toml(&format!("{BASE}accept_value = \"true\"\n")).unwrap();
        let mapping = config.buyers[0].reply_mapping();
        for reply in [
            r#"{"accepted": "true"}"#,
            r#"{"accepted": "TRUE"}"#,
            r#"{"accepted": true}"#,
        ] {
            assert_eq!(
                crate::buyers::parse_post_reply(200, reply.as_bytes(), &mapping),
                crate::buyers::PostReply::Accepted,
                "{reply}"
            );
        }
        let config = Config::from_toml(&format!("{BASE}accept_value = \"TRUE\"\n")).unwrap();
        let reply = br#"{"accepted": true}"#;
        assert_eq!(
            crate::buyers::parse_post_reply(200, reply, &config.buyers[0].reply_mapping()),
            crate::buyers::PostReply::Accepted
        );
        let config = Config::from_toml(&format!("{BASE}accept_value = 1\n")).unwrap();
        assert_eq!(
            config.buyers[0].reply_mapping().accept_value.as_deref(),
            Some("1")
        );
    }

    #[test]
    fn operator_tokens_are_hashes_of_their_own() {
        let ok = format!("{BASE}\n[ops]\ntoken_sha256 = [\"{}\"]\n", "ab".repeat(32));
        assert_eq!(Config::from_toml(&ok).unwrap().ops.token_sha256.len(), 1);
        let supplier_key = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let text = format!("{BASE}\n[ops]\ntoken_sha256 = [\"{supplier_key}\", \"nope\"]\n");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        for expected in [
            "ops.token_sha256 (line 26): given twice, or also a supplier's API key",
            "ops.token_sha256 (line 26): `nope` is not a hex sha-256",
        ] {
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn auth_failure_limits_must_be_at_least_one() {
        for lines in ["auth_failures = 0", "auth_failure_window_secs = 0"] {
            let text = format!("[rate_limit]\nrequests = 60\nwindow_secs = 60\n{lines}\n{BASE}");
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(
                err.contains("auth_failures and auth_failure_window_secs must be at least 1"),
                "{lines}: {err}"
            );
        }
    }

    #[test]
    fn redis_rate_limit_needs_a_redis_url() {
        let with = |lines: &str| Config::from_toml(&format!("[rate_limit]\n{lines}\n{BASE}"));
        let ok = with("backend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\ntimeout_ms = 3")
            .expect("valid redis config");
        assert_eq!(ok.rate_limit.backend, "redis");
        assert_eq!(ok.rate_limit.key_prefix, "leadex:rl:");
        assert_eq!(ok.rate_limit.timeout_ms, 3);
        let missing = with("backend = \"redis\"").unwrap_err().to_string();
        assert!(missing.contains("rate_limit.url"), "{missing}");
        let wrong = with("backend = \"redis\"\nurl = \"http://127.0.0.1:6379\"")
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("is not a Redis URL"), "{wrong}");
        let zero = with("backend = \"redis\"\nurl = \"redis://127.0.0.1\"\ntimeout_ms = 0")
            .unwrap_err()
            .to_string();
        assert!(zero.contains("timeout_ms"), "{zero}");
    }

    #[test]
    fn coordination_is_memory_by_default_and_redis_can_borrow_the_limiter_url() {
        let plain = Config::from_toml(BASE).unwrap();
        assert_eq!(plain.coordination.backend, "memory");
        assert_eq!(plain.coordination.key_prefix, "leadex:coord:");
        let with = |lines: &str| Config::from_toml(&format!("{lines}\n{BASE}"));
        let own = with("[coordination]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:7000\"\ntimeout_ms = 40").unwrap();
        assert_eq!(
            own.coordination.url.as_deref(),
            Some("redis://127.0.0.1:7000")
        );
        assert_eq!(own.coordination.timeout_ms, 40);
        let borrowed = with("[rate_limit]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n[coordination]\nbackend = \"redis\"").unwrap();
        assert_eq!(
            borrowed.coordination.url.as_deref(),
            Some("redis://127.0.0.1:6379")
        );
        for (lines, expected) in [
            ("[coordination]\nbackend = \"redis\"", "coordination.url"),
            (
                "[coordination]\nbackend = \"redis\"\nurl = \"http://x\"",
                "is not a Redis URL",
            ),
            (
                "[coordination]\nbackend = \"etcd\"",
                "coordination.backend: unknown backend `etcd`",
            ),
            ("[coordination]\ntimeout_ms = 0", "coordination.timeout_ms"),
            ("[coordination]\nurll = \"redis://x\"", "urll"),
        ] {
            let err = with(lines).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}\n{err}");
        }
    }
}
