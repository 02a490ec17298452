//! Wires the exchange in one place: store, limiter, buyer and campaign actors on a pool of
//! arbiters, and the HTTP server on a bound listener. Tests start it on 127.0.0.1:0.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr, Arbiter};
use actix_web::dev::{Server, ServerHandle};
use actix_web::{HttpServer, web};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::actors::{BuyerActor, BuyerSettings, CampaignActor, CampaignBuyer, CampaignSettings};
use crate::buyers::ReplyMapping;
use crate::config::Config;
use crate::domain::AuctionRules;
use crate::http::{self, AppState, CampaignEntry, SupplierEntry};
use crate::ratelimit::{self, Limit, SharedLimiter};
use crate::storage::LeadStore;
use crate::storage::embedded::EmbeddedStore;
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("{0}")]
    Invalid(String),
}

pub struct Application {
    addr: SocketAddr,
    server: Server,
    store: Arc<dyn LeadStore>,
    arbiters: Vec<Arbiter>,
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

impl Application {
    /// Builds everything and binds the listener; nothing is served until `run`. Must be
    /// called inside an actix system (`actix_web::main`, `actix_web::test`).
    pub async fn build(
        config: Config,
        listen_override: Option<&str>,
    ) -> Result<Application, StartupError> {
        let listen = listen_override.unwrap_or(&config.server.listen).to_owned();
        let listener = TcpListener::bind(&listen).map_err(|source| StartupError::Bind {
            addr: listen.clone(),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: listen,
            source,
        })?;

        let metrics = telemetry::metrics_handle();
        telemetry::register_series(
            config.campaigns.iter().map(|c| c.id.get_ref().as_str()),
            config.buyers.iter().map(|b| b.id.get_ref().as_str()),
        );

        let store: Arc<dyn LeadStore> = Arc::new(EmbeddedStore::open(
            &config.storage.path,
            config.storage.group_commit_max,
        )?);
        let limiter: SharedLimiter = ratelimit::from_config(&config.rate_limit)
            .await
            .map_err(StartupError::Invalid)?;

        // Actors live on a pool of arbiters (one per core) so buyer I/O spreads over cores.
        let arbiters: Vec<Arbiter> = (0..cores()).map(|_| Arbiter::new()).collect();
        let mut next = 0usize;
        let mut place = || {
            let handle = arbiters[next % arbiters.len()].handle();
            next += 1;
            handle
        };

        let mut buyer_addrs: HashMap<String, Addr<BuyerActor>> = HashMap::new();
        for buyer in &config.buyers {
            let actor = BuyerActor::new(BuyerSettings {
                id: buyer.id.get_ref().clone(),
                ping_url: buyer.ping_url.clone(),
                post_url: buyer.post_url.clone(),
                headers: buyer
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                max_in_flight: buyer.max_in_flight,
                mapping: ReplyMapping::default(),
            })
            .map_err(StartupError::Invalid)?;
            let addr = BuyerActor::start_in_arbiter(&place(), move |_| actor);
            buyer_addrs.insert(buyer.id.get_ref().clone(), addr);
        }

        let mut campaigns = HashMap::new();
        for campaign in &config.campaigns {
            let id = campaign.id.get_ref().clone();
            let buyers = config
                .buyers
                .iter()
                .filter(|b| b.campaigns.iter().any(|c| c.get_ref() == &id))
                .map(|b| CampaignBuyer {
                    id: b.id.get_ref().clone(),
                    addr: buyer_addrs[b.id.get_ref()].clone(),
                    fixed_price: b.fixed_price,
                    floor: b.floor_price,
                })
                .collect();
            let seller = campaign.seller.get_ref().to_ascii_uppercase();
            let settings = CampaignSettings {
                id: id.clone(),
                category: campaign.category.get_ref().trim().to_owned(),
                seller: seller.clone(),
                personal_fields: campaign.personal_fields.clone(),
                ping_timeout: Duration::from_millis(campaign.ping_timeout_ms),
                post_timeout: Duration::from_millis(campaign.post_timeout_ms),
                rules: AuctionRules {
                    campaign_floor: campaign.floor_price,
                    max_buyers: campaign.max_buyers,
                },
                buyers,
            };
            let actor_store = store.clone();
            let addr = CampaignActor::start_in_arbiter(&place(), move |_| {
                CampaignActor::new(settings, actor_store)
            });
            campaigns.insert(
                (seller, campaign.category.get_ref().trim().to_lowercase()),
                CampaignEntry {
                    id,
                    required_fields: campaign.required_fields.clone(),
                    addr,
                },
            );
        }

        let default_limit =
            Limit::per_secs(config.rate_limit.requests, config.rate_limit.window_secs);
        let mut keys = HashMap::new();
        let suppliers = config
            .suppliers
            .iter()
            .enumerate()
            .map(|(index, s)| {
                for hash in &s.api_key_sha256 {
                    let mut bytes = [0u8; 32];
                    if hex::decode_to_slice(hash.get_ref().to_ascii_lowercase(), &mut bytes).is_ok()
                    {
                        keys.insert(bytes, index);
                    }
                }
                SupplierEntry {
                    id: s.id.get_ref().clone(),
                    sellers: s
                        .sellers
                        .iter()
                        .map(|c| c.get_ref().to_ascii_uppercase())
                        .collect::<HashSet<_>>(),
                    limit: s.rate_limit.map_or(default_limit, |o| {
                        Limit::per_secs(o.requests, o.window_secs)
                    }),
                }
            })
            .collect();

        let state = web::Data::new(AppState {
            suppliers,
            keys,
            sellers_by_code: config
                .sellers
                .iter()
                .map(|s| {
                    (
                        s.code.get_ref().to_ascii_uppercase(),
                        s.code.get_ref().to_ascii_uppercase(),
                    )
                })
                .collect(),
            sellers_by_slug: config
                .sellers
                .iter()
                .map(|s| {
                    (
                        s.slug.to_ascii_lowercase(),
                        s.code.get_ref().to_ascii_uppercase(),
                    )
                })
                .collect(),
            campaigns,
            store: store.clone(),
            limiter,
            auth_failure_limit: Limit::per_secs(
                config.rate_limit.auth_failures,
                config.rate_limit.auth_failure_window_secs,
            ),
            auctions: Arc::new(Semaphore::new(config.server.max_in_flight_auctions)),
            idempotency_locks: Mutex::new(HashMap::new()),
            ids: Mutex::new(ulid::Generator::new()),
            metrics,
        });

        let workers = if config.server.workers == 0 {
            cores()
        } else {
            config.server.workers
        };
        let server = HttpServer::new(move || http::app(state.clone()))
            .workers(workers)
            .backlog(4096)
            .max_connections(50_000)
            .shutdown_timeout(config.server.shutdown_grace_secs)
            .listen(listener)
            .map_err(|source| StartupError::Bind {
                addr: addr.to_string(),
                source,
            })?
            .run();
        tracing::info!(%addr, workers, "leadex listening");
        Ok(Application {
            addr,
            server,
            store,
            arbiters,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops the server gracefully (auctions in flight finish) when called.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped (SIGTERM/SIGINT or `handle().stop`), then makes storage durable
    /// and stops the actors.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let served = self.server.await;
        if let Err(e) = self.store.close().await {
            tracing::error!(error = %e, "storage did not close cleanly");
        }
        for arbiter in self.arbiters {
            arbiter.stop();
        }
        tracing::info!("leadex stopped");
        served
    }
}

/// sha-256 of an API key as lower-case hex, for `api_key_sha256`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}
