//! The TOML configuration of CONTRACT §4, parsed into typed, validated values. Unknown keys,
//! duplicate ids and dangling references stop start-up with the key and its line.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::domain::Price;

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
    pub sellers: Vec<SellerConfig>,
    #[serde(default)]
    pub suppliers: Vec<SupplierConfig>,
    #[serde(default)]
    pub campaigns: Vec<CampaignConfig>,
    #[serde(default)]
    pub buyers: Vec<BuyerConfig>,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            workers: 0,
            max_in_flight_auctions: default_max_in_flight(),
            log_format: default_log_format(),
            shutdown_grace_secs: default_grace(),
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
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: default_storage_backend(),
            path: default_storage_path(),
            group_commit_max: default_group_commit(),
        }
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

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitOverride {
    pub requests: u32,
    #[serde(default = "default_window")]
    pub window_secs: u64,
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
fn default_group_commit() -> usize {
    512
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
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate(text)?;
        Ok(config)
    }

    fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let at = |s: &Spanned<String>| line_of(source, s.span().start);

        match self.storage.backend.as_str() {
            "embedded" => {}
            other => problems.push(format!(
                "storage.backend: unknown backend `{other}` (this build knows `embedded`)"
            )),
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
        if self.rate_limit.requests == 0 || self.rate_limit.window_secs == 0 {
            problems.push("rate_limit: requests and window_secs must be at least 1".to_owned());
        }
        if !matches!(self.server.log_format.as_str(), "text" | "json") {
            problems.push(format!(
                "server.log_format: `{}` is not `text` or `json`",
                self.server.log_format
            ));
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
                let h = hash.get_ref();
                if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                    problems.push(format!(
                        "suppliers.api_key_sha256 (line {}): `{h}` is not a hex sha-256 (64 hex digits; see `leadex hash-key`)",
                        at(hash)
                    ));
                } else if !key_hashes.insert(h.to_ascii_lowercase()) {
                    problems.push(format!(
                        "suppliers.api_key_sha256 (line {}): the same key is given twice",
                        at(hash)
                    ));
                }
            }
            if let Some(rl) = &supplier.rate_limit
                && (rl.requests == 0 || rl.window_secs == 0)
            {
                problems.push(format!("suppliers.rate_limit (supplier `{id}`): requests and window_secs must be at least 1"));
            }
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
            if buyer.max_in_flight == 0 {
                problems.push(format!(
                    "buyers.max_in_flight (buyer `{id}`): must be at least 1"
                ));
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("\n")))
        }
    }
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
}
