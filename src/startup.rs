//! Wires the exchange in one place: store, limiter, buyer and campaign actors (a set per HTTP
//! worker, and one for re-auctions), and the HTTP server on a bound listener. Tests start it
//! on 127.0.0.1:0.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr, Arbiter};
use actix_web::dev::{Server, ServerHandle};
use actix_web::{HttpServer, web};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::actors::{
    BuyerActor, BuyerHealth, BuyerSettings, CampaignActor, CampaignBuyer, CampaignServices,
    CampaignSettings,
};
use crate::config::{Config, DEFAULT_RETRY_INTERVAL_SECS};
use crate::coord::SharedCoordinator;
use crate::domain::AuctionRules;
use crate::domain::campaign::PendingPolicy;
use crate::http::{self, AppState, CampaignEntry, SupplierEntry};
use crate::ratelimit::{self, Limit, SharedLimiter};
use crate::storage::LeadStore;
use crate::telemetry;
use crate::webhooks::{WebhookSender, WebhookTarget};

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
    /// Runs the re-auction scheduler; stopped after storage closes.
    home: Arbiter,
    /// How long a signal-started shutdown waits for requests in flight.
    grace: Duration,
    drain: crate::drain::Drain,
    /// Stopped with the node: notifications it has not delivered stay in its outbox.
    webhooks: WebhookSender,
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
        Application::build_with_clock(config, listen_override, crate::clock::Clock::system()).await
    }

    /// As `build`, with the clock the marketplace rules (caps, schedules, dedupe, pending
    /// retries, breakers) read; tests pass a manual one to cross local midnight at will.
    pub async fn build_with_clock(
        config: Config,
        listen_override: Option<&str>,
        clock: crate::clock::Clock,
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

        // Before the store opens, so a start that stops here leaves no data folder behind.
        let ca_certs = read_ca_files(&config)?;
        let store: Arc<dyn LeadStore> = crate::storage::open(&config.storage).await?;
        let limiter: SharedLimiter = ratelimit::from_config(&config.rate_limit)
            .await
            .map_err(StartupError::Invalid)?;
        let (coord, coord_shared): (SharedCoordinator, bool) =
            crate::coord::from_config(&config.coordination, store.clone())
                .await
                .map_err(StartupError::Invalid)?;
        let drain = crate::drain::Drain::default();
        let webhooks = WebhookSender::with_outbox(
            config
                .suppliers
                .iter()
                .filter_map(|s| {
                    Some((
                        s.id.get_ref().clone(),
                        WebhookTarget {
                            url: s.webhook_url.clone()?,
                            secret: s.webhook_secret.clone()?,
                        },
                    ))
                })
                .collect(),
            &config.storage.path.join("webhooks.jsonl"),
            store.clone(),
        )
        .await
        .map_err(|e| StartupError::Invalid(format!("webhook outbox: {e}")))?;

        let services = CampaignServices {
            store: store.clone(),
            coord: coord.clone(),
            clock: clock.clone(),
            webhooks: webhooks.clone(),
            drain: drain.clone(),
            reauctions: false,
        };
        let plan = ActorPlan::new(&config, services, clock.clone(), ca_certs)?;
        // Each HTTP worker starts its own buyer and campaign actors (in the app factory
        // below), so a lead's auction, its pings and posts run on the thread that received
        // it. Re-auctions of pending leads run on one more set on the home arbiter, which
        // stops only after a graceful stop has waited for them.
        let home = Arbiter::new();
        let home_plan = plan.clone();
        home.spawn_fn(move || {
            home_plan.start_here(true);
        });
        let campaigns = config
            .campaigns
            .iter()
            .map(|campaign| {
                telemetry::register_campaign_deadlines(
                    campaign.id.get_ref(),
                    Duration::from_millis(campaign.ping_timeout_ms),
                    Duration::from_millis(campaign.post_timeout_ms),
                );
                (
                    (
                        campaign.seller.get_ref().to_ascii_uppercase(),
                        campaign.category.get_ref().trim().to_lowercase(),
                    ),
                    CampaignEntry {
                        id: campaign.id.get_ref().clone(),
                        required_fields: campaign.required_fields.clone(),
                    },
                )
            })
            .collect();

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
                        Limit::per_secs(
                            o.requests,
                            o.window_secs.unwrap_or(config.rate_limit.window_secs),
                        )
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
            coord: coord.clone(),
            auth_failure_limit: Limit::per_secs(
                config.rate_limit.auth_failures,
                config.rate_limit.auth_failure_window_secs,
            ),
            auctions: Arc::new(Semaphore::new(config.server.max_in_flight_auctions)),
            idempotency_locks: Default::default(),
            idempotency_across_nodes: coord_shared.then(|| {
                http::leads::SharedIdempotency::new(
                    coord.clone(),
                    // The longest answer: the ping window, then a post to each buyer in turn
                    // (a post that times out goes to the next bid with its own timeout).
                    config
                        .campaigns
                        .iter()
                        .map(|c| {
                            let buyers = config
                                .buyers
                                .iter()
                                .filter(|b| {
                                    b.campaigns.iter().any(|id| id.get_ref() == c.id.get_ref())
                                })
                                .count()
                                .max(1) as u64;
                            Duration::from_millis(c.ping_timeout_ms + c.post_timeout_ms * buyers)
                        })
                        .max()
                        .unwrap_or_default(),
                )
            }),
            ids: Mutex::new(ulid::Generator::new()),
            metrics,
            trusted_proxies: config
                .server
                .trusted_proxies
                .iter()
                .filter_map(|p| crate::config::parse_proxy(p))
                .collect(),
            ops_tokens: config
                .ops
                .token_sha256
                .iter()
                .filter_map(|hash| {
                    let mut bytes = [0u8; 32];
                    hex::decode_to_slice(hash.get_ref().to_ascii_lowercase(), &mut bytes)
                        .ok()
                        .map(|()| bytes)
                })
                .collect(),
            personal_fields: config
                .campaigns
                .iter()
                .map(|c| (c.id.get_ref().clone(), c.personal_fields.clone()))
                .collect(),
        });

        let workers = if config.server.workers == 0 {
            cores()
        } else {
            config.server.workers
        };
        let h2c = config.server.h2c;
        let server = HttpServer::new(move || {
            http::app(state.clone(), http::LocalCampaigns(plan.start_here(false)))
        })
        .workers(workers)
        .backlog(4096)
        .max_connections(50_000)
        // Signals are handled in `run_until_stopped` (actix-web would swallow a second
        // one). Its own timeout is only a backstop, one second behind ours, so the
        // grace timer there decides and can report a forced stop.
        .disable_signals()
        .shutdown_timeout(config.server.shutdown_grace_secs + 1);
        // HTTP/1.1, and with `h2c` HTTP/2 without TLS for clients that start with its preface.
        let server = if h2c {
            server.listen_auto_h2c(listener)
        } else {
            server.listen(listener)
        }
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
            home,
            grace: Duration::from_secs(config.server.shutdown_grace_secs),
            drain,
            webhooks,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The store the app writes to; tests close it to see the node report itself unready.
    pub fn store(&self) -> Arc<dyn LeadStore> {
        self.store.clone()
    }

    /// Stops the server gracefully (auctions in flight finish) when called.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped (SIGTERM/SIGINT or `handle().stop`), then makes storage durable
    /// and stops the actors. A signal stops gracefully: the listener closes, requests in
    /// flight (each waiting on its auction) finish and are stored. A second signal or the
    /// end of the grace period cuts them short; that returns an error so the exit code says
    /// the stop was not clean.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Application {
            server,
            store,
            home,
            grace,
            drain,
            webhooks,
            ..
        } = self;
        let mut stop_began = None;
        let handle = server.handle();
        let mut server = Box::pin(server);
        let mut signals = Signals::new()?;
        let mut forced = false;
        let served = tokio::select! {
            served = &mut server => served,
            signal = signals.next() => {
                stop_began = Some(tokio::time::Instant::now());
                tracing::info!(signal, grace_secs = grace.as_secs(), "stopping: no new connections, finishing requests in flight");
                // No re-auction starts from here on: those running finish within the grace
                // period, and a late one cannot be cut off after its buyer accepted.
                drain.refuse_new();
                // The stop command is sent when `stop` is called; its future only waits.
                drop(handle.stop(true));
                tokio::select! {
                    served = &mut server => served,
                    signal = signals.next() => {
                        tracing::warn!(signal, "second signal: stopping without waiting");
                        forced = true;
                        Ok(())
                    }
                    () = tokio::time::sleep(grace) => {
                        tracing::warn!(grace_secs = grace.as_secs(), "grace period over: stopping without waiting");
                        forced = true;
                        Ok(())
                    }
                }
            }
        };
        // Dropping a server still stopping closes its connections at once.
        drop(server);
        // Re-auctions of pending leads finish and are stored before storage closes, within
        // what is left of the grace period (none when the stop was forced).
        let left = match (forced, stop_began) {
            (true, _) => Duration::ZERO,
            (false, Some(began)) => grace.saturating_sub(began.elapsed()),
            (false, None) => grace,
        };
        if !drain.stop_and_wait(left).await {
            tracing::warn!("re-auctions still running at stop; their leads stay pending");
        }
        webhooks.stop();
        if let Err(e) = store.close().await {
            tracing::error!(error = %e, "storage did not close cleanly");
        }
        home.stop();
        if forced {
            return Err(std::io::Error::other(
                "shutdown forced before every request in flight was answered",
            ));
        }
        tracing::info!("leadex stopped");
        served
    }
}

/// SIGTERM and SIGINT, each meaning "stop"; a second one means "stop now".
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// sha-256 of an API key as lower-case hex, for `api_key_sha256`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.trim().as_bytes()))
}

/// What it takes to start one set of buyer and campaign actors on the current thread. Every
/// set shares each buyer's breaker and in-flight count, so a buyer's limits hold per node
/// whichever thread a lead lands on; each set has its own HTTP clients, whose connections
/// live on that set's thread.
#[derive(Clone)]
struct ActorPlan {
    inner: Arc<PlanInner>,
}

struct PlanInner {
    buyers: Vec<crate::config::BuyerConfig>,
    campaigns: Vec<crate::config::CampaignConfig>,
    health: HashMap<String, (Arc<BuyerHealth>, Arc<AtomicUsize>)>,
    /// Each buyer's `ca_file`, read once.
    ca_certs: HashMap<String, Vec<reqwest::Certificate>>,
    services: CampaignServices,
}

/// Each buyer's `ca_file`, read once.
fn read_ca_files(
    config: &Config,
) -> Result<HashMap<String, Vec<reqwest::Certificate>>, StartupError> {
    let mut ca_certs = HashMap::new();
    for buyer in &config.buyers {
        if let Some(path) = &buyer.ca_file {
            let certs = crate::actors::buyer::read_ca_file(path).map_err(|e| {
                StartupError::Invalid(format!("buyer {}: ca_file {e}", buyer.id.get_ref()))
            })?;
            ca_certs.insert(buyer.id.get_ref().clone(), certs);
        }
    }
    Ok(ca_certs)
}

impl ActorPlan {
    fn new(
        config: &Config,
        services: CampaignServices,
        clock: crate::clock::Clock,
        ca_certs: HashMap<String, Vec<reqwest::Certificate>>,
    ) -> Result<ActorPlan, StartupError> {
        let mut health = HashMap::new();
        for buyer in &config.buyers {
            let shared = (
                Arc::new(BuyerHealth::new(
                    buyer.id.get_ref(),
                    buyer.breaker_failures,
                    Duration::from_secs(buyer.breaker_cooldown_secs),
                    clock.clone(),
                )),
                Arc::new(AtomicUsize::new(0)),
            );
            health.insert(buyer.id.get_ref().clone(), shared);
        }
        let plan = ActorPlan {
            inner: Arc::new(PlanInner {
                buyers: config.buyers.clone(),
                campaigns: config.campaigns.clone(),
                health,
                ca_certs,
                services,
            }),
        };
        // Headers and URLs are checked here once, so starting a set later cannot fail.
        for buyer in &plan.inner.buyers {
            BuyerActor::new(plan.buyer_settings(buyer)).map_err(StartupError::Invalid)?;
        }
        Ok(plan)
    }

    fn buyer_settings(&self, buyer: &crate::config::BuyerConfig) -> BuyerSettings {
        let (health, in_flight) = &self.inner.health[buyer.id.get_ref()];
        BuyerSettings {
            id: buyer.id.get_ref().clone(),
            ping_url: buyer.ping_url.clone(),
            post_url: buyer.post_url.clone(),
            headers: buyer
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            max_in_flight: buyer.max_in_flight,
            http2: buyer.http2,
            ca_certs: self
                .inner
                .ca_certs
                .get(buyer.id.get_ref())
                .cloned()
                .unwrap_or_default(),
            in_flight: in_flight.clone(),
            mapping: buyer.reply_mapping(),
            health: health.clone(),
        }
    }

    /// Starts one actor per buyer and per campaign on the current arbiter; the campaign
    /// actors by campaign id. `reauctions`: these campaigns also run the pending scheduler.
    fn start_here(&self, reauctions: bool) -> HashMap<String, Addr<CampaignActor>> {
        let plan = &self.inner;
        let mut buyer_addrs = HashMap::new();
        for buyer in &plan.buyers {
            let actor = BuyerActor::new(self.buyer_settings(buyer))
                .expect("buyer settings were checked when the plan was made");
            buyer_addrs.insert(buyer.id.get_ref().clone(), actor.start());
        }
        let mut campaigns = HashMap::new();
        for campaign in &plan.campaigns {
            let id = campaign.id.get_ref().clone();
            let buyers = plan
                .buyers
                .iter()
                .filter(|b| b.campaigns.iter().any(|c| c.get_ref() == &id))
                .map(|b| CampaignBuyer {
                    id: b.id.get_ref().clone(),
                    addr: buyer_addrs[b.id.get_ref()].clone(),
                    fixed_price: b.fixed_price,
                    floor: b.floor_price,
                    rules: Arc::new(b.rules()),
                    health: plan.health[b.id.get_ref()].0.clone(),
                })
                .collect();
            let settings = CampaignSettings {
                id: id.clone(),
                category: campaign.category.get_ref().trim().to_owned(),
                seller: campaign.seller.get_ref().to_ascii_uppercase(),
                personal_fields: campaign.personal_fields.clone(),
                ping_timeout: Duration::from_millis(campaign.ping_timeout_ms),
                post_timeout: Duration::from_millis(campaign.post_timeout_ms),
                rules: AuctionRules {
                    campaign_floor: campaign.floor_price,
                    max_buyers: campaign.max_buyers,
                },
                buyers,
                dedupe_days: campaign.dedupe_days,
                pending: campaign.pending_ttl_secs.map(|ttl| PendingPolicy {
                    ttl_ms: ttl as i64 * 1000,
                    retry_interval_ms: campaign
                        .retry_interval_secs
                        .unwrap_or(DEFAULT_RETRY_INTERVAL_SECS)
                        as i64
                        * 1000,
                }),
            };
            let services = CampaignServices {
                reauctions,
                ..plan.services.clone()
            };
            campaigns.insert(id, CampaignActor::new(settings, services).start());
        }
        campaigns
    }
}
