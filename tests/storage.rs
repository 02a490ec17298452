//! The storage conformance suite, one set of cases run against every `LeadStore` backend: the
//! embedded store, the ScyllaDB store on an in-process CQL v4 server (the `kassandra` crate
//! behind a small TCP front, below), and a real cluster when `LEADEX_SCYLLA_NODES` is set.
//! Then the ScyllaDB backend's failure behaviour, the whole supplier flow through HTTP with
//! `backend = "scylla"`, and the checks of docker-compose.yml and deploy/.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use leadex::config::{Config, StorageConfig};
use leadex::domain::FieldMap;
use leadex::storage::embedded::EmbeddedStore;
use leadex::storage::scylla::{ScyllaStore, schema};
use leadex::storage::spill::SpillingStore;
use leadex::storage::{
    AuctionEvent, IdempotentAnswer, LeadRecord, LeadStatus, LeadStore, StorageError,
};
use serde_json::{Value, json};

/// An in-process CQL server: TCP on 127.0.0.1, frames fed to a `KassandraSession`. It can be
/// stopped (every connection is cut) and started again on the same port with the same data.
mod cql_server {
    use std::net::SocketAddr;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};
    use kassandra::KassandraSession;
    use kassandra::error::DbError;
    use kassandra::frame::request::{Request, RequestOpcode};
    use kassandra::frame::response::Response;
    use kassandra::frame::response::error::Error;
    use kassandra::frame::{FrameFlags, request_stream, response_sink};
    use tokio::net::TcpStream;
    use tokio::sync::watch;

    type Db = Arc<Mutex<KassandraSession>>;

    struct Running {
        stop: watch::Sender<bool>,
        thread: std::thread::JoinHandle<()>,
    }

    pub struct CqlServer {
        pub addr: SocketAddr,
        db: Db,
        running: Option<Running>,
    }

    impl CqlServer {
        pub fn start() -> CqlServer {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().unwrap();
            let db = Arc::new(Mutex::new(KassandraSession::new()));
            let running = Some(serve(listener, db.clone()));
            CqlServer { addr, db, running }
        }

        pub fn node(&self) -> String {
            self.addr.to_string()
        }

        /// Cuts every connection and stops listening; the data stays.
        pub fn stop(&mut self) {
            if let Some(running) = self.running.take() {
                let _ = running.stop.send(true);
                running.thread.join().expect("server thread");
            }
        }

        /// Listens again on the same port, with the same data.
        pub fn restart(&mut self) {
            self.stop();
            let mut tries = 0;
            let listener = loop {
                match std::net::TcpListener::bind(self.addr) {
                    Ok(listener) => break listener,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        eprintln!("rebinding {}: {e}", self.addr);
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
                }
            };
            self.running = Some(serve(listener, self.db.clone()));
        }
    }

    impl Drop for CqlServer {
        fn drop(&mut self) {
            self.stop();
        }
    }

    fn serve(listener: std::net::TcpListener, db: Db) -> Running {
        listener.set_nonblocking(true).unwrap();
        let (stop, mut stopped) = watch::channel(false);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut clients = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        _ = stopped.changed() => break,
                        accepted = listener.accept() => {
                            if let Ok((stream, _)) = accepted {
                                clients.spawn(client(stream, db.clone()));
                            }
                        }
                    }
                }
                // Dropping the connection tasks closes their sockets.
                clients.abort_all();
                while clients.join_next().await.is_some() {}
            });
        });
        Running { stop, thread }
    }

    async fn client(mut stream: TcpStream, db: Db) {
        let _ = stream.set_nodelay(true);
        let (mut read, mut write) = stream.split();
        let mut requests = request_stream(&mut read);
        let mut responses = response_sink(&mut write);
        while let Some(Ok((frame, opcode, body))) = requests.next().await {
            let response = answer(&db, opcode, &body, frame.flags);
            if responses.send((response, frame.stream)).await.is_err() {
                break;
            }
        }
    }

    /// One request; kassandra panics on what it does not support, which becomes an error.
    fn answer(db: &Db, opcode: RequestOpcode, body: &Bytes, flags: FrameFlags) -> Response {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let request = match Request::deserialize(opcode, body, flags) {
                Ok(request) => request,
                Err(e) => return Response::Error(e),
            };
            let mut db = db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let result = match request {
                Request::StartUp(_) | Request::Register { .. } => return Response::Ready,
                Request::Options => return Response::options(),
                Request::Query(query) => db.process(query),
                Request::Prepare(query) => db.prepare(query),
                Request::Execute(execute) => db.execute(execute),
                Request::Batch(batch) => db.process_batch(batch),
                Request::AuthResponse => {
                    return Response::Error(Error::new(
                        DbError::ProtocolError,
                        "authentication is not supported",
                    ));
                }
            };
            match result {
                Ok(result) => Response::Result(result),
                Err(e) => Response::Error(e),
            }
        }));
        outcome.unwrap_or_else(|_| {
            Response::Error(Error::new(
                DbError::ServerError,
                "the in-process CQL server cannot run this statement",
            ))
        })
    }
}

use cql_server::CqlServer;

// ---------------------------------------------------------------------------------------------
// Backends

#[async_trait]
trait Backend: Send + Sync {
    /// Opens the store (again, after `close`, for the reconnect case).
    async fn open(&self) -> Arc<dyn LeadStore>;
}

struct Embedded {
    dir: PathBuf,
}

impl Embedded {
    fn new() -> Embedded {
        Embedded { dir: data_dir() }
    }
}

#[async_trait]
impl Backend for Embedded {
    async fn open(&self) -> Arc<dyn LeadStore> {
        Arc::new(EmbeddedStore::open(&self.dir, 64).expect("embedded store opens"))
    }
}

/// The embedded store with its batches applied only at a checkpoint (close): every read before
/// the close is served from the in-memory overlay of logged writes, over what redb held at open.
struct EmbeddedUnapplied {
    dir: PathBuf,
}

#[async_trait]
impl Backend for EmbeddedUnapplied {
    async fn open(&self) -> Arc<dyn LeadStore> {
        let options = leadex::storage::embedded::Options {
            group_commit_max: 64,
            checkpoint_every: Duration::from_secs(3600),
            apply_every: Duration::from_secs(3600),
            ..Default::default()
        };
        Arc::new(EmbeddedStore::open_with(&self.dir, options).expect("embedded store opens"))
    }
}

/// `[storage]` for backend `scylla` on `nodes`.
fn scylla_storage(nodes: Vec<String>, keyspace: &str, data: &Path) -> StorageConfig {
    StorageConfig {
        backend: "scylla".into(),
        path: data.to_owned(),
        nodes,
        keyspace: keyspace.into(),
        replication_factor: Some(1),
        request_timeout_ms: 3000,
        connect_timeout_ms: 2000,
        // Small pages, so that reads of the larger partitions here take several pages.
        page_size: 40,
        ..StorageConfig::default()
    }
}

struct Kassandra {
    /// Serves as long as the backend lives.
    _server: CqlServer,
    config: StorageConfig,
}

impl Kassandra {
    /// A fresh CQL server with the schema applied by `migrate`.
    async fn new() -> Kassandra {
        let server = CqlServer::start();
        let mut config = scylla_storage(vec![server.node()], "leadex_test", &data_dir());
        // The in-process server reports no schema versions to agree on.
        config.await_schema_agreement = false;
        let applied = schema::migrate(&config).await.expect("migrate");
        assert_eq!(applied, 1 + schema::TABLES.len());
        Kassandra {
            _server: server,
            config,
        }
    }
}

#[async_trait]
impl Backend for Kassandra {
    async fn open(&self) -> Arc<dyn LeadStore> {
        Arc::new(
            ScyllaStore::open(&self.config)
                .await
                .expect("scylla store opens"),
        )
    }
}

struct RealCluster {
    config: StorageConfig,
}

#[async_trait]
impl Backend for RealCluster {
    async fn open(&self) -> Arc<dyn LeadStore> {
        Arc::new(
            ScyllaStore::open(&self.config)
                .await
                .expect("scylla store opens on the real cluster"),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Records

/// A day in 2026 (days since 1970-01-01) and its first millisecond.
const DAY: i64 = 20_468;
const BASE: i64 = DAY * 86_400_000;
const HOUR: i64 = 3_600_000;

/// A tag that keeps the ids of one run apart from earlier runs on a persistent cluster.
fn tag() -> String {
    ulid::Ulid::new().to_string().to_lowercase()
}

fn lead_id_at(ms: i64) -> String {
    ulid::Ulid::from_parts(ms as u64, rand::random::<u128>()).to_string()
}

fn fields() -> FieldMap {
    let mut fields = FieldMap::default();
    fields.insert("firstName".into(), json!("John"));
    fields.insert("phone".into(), json!("5551234567"));
    fields.insert("state".into(), json!("TX"));
    fields.insert("creditScore".into(), json!(712));
    fields.insert("homeowner".into(), json!(true));
    fields
}

fn event(i: usize) -> AuctionEvent {
    match i % 4 {
        0 => AuctionEvent::Ping {
            buyer: format!("buyer-{i}"),
            outcome: "bid".into(),
            bid_cents: Some(1000 + i as i64),
            latency_us: 1200 + i as u64,
        },
        1 => AuctionEvent::Direct {
            buyer: format!("buyer-{i}"),
            bid_cents: 2000,
        },
        2 => AuctionEvent::Dropped {
            buyer: format!("buyer-{i}"),
            bid_cents: 10,
            reason: "under_campaign_floor".into(),
        },
        _ => AuctionEvent::Post {
            buyer: format!("buyer-{i}"),
            price_cents: 2500,
            outcome: if i % 8 == 3 { "rejected" } else { "accepted" }.into(),
            reason: (i % 8 == 3).then(|| "duplicate".to_owned()),
            latency_us: 900,
        },
    }
}

fn record(supplier: &str, campaign: &str, created_at_ms: i64) -> LeadRecord {
    LeadRecord {
        lead_id: lead_id_at(created_at_ms),
        supplier_id: supplier.into(),
        seller: "ACME1234".into(),
        campaign_id: campaign.into(),
        created_at_ms,
        status: LeadStatus::Sold,
        price_cents: 3050,
        buyer_ids: vec!["buyer-a".into(), "buyer-b".into()],
        fields: fields(),
        auction_log: (0..4).map(event).collect(),
        next_retry_ms: None,
    }
}

fn pending(supplier: &str, campaign: &str, created_at_ms: i64, due: i64) -> LeadRecord {
    LeadRecord {
        status: LeadStatus::Pending,
        price_cents: 0,
        buyer_ids: Vec::new(),
        next_retry_ms: Some(due),
        auction_log: vec![event(0)],
        ..record(supplier, campaign, created_at_ms)
    }
}

fn ids(records: &[LeadRecord]) -> Vec<String> {
    records.iter().map(|r| r.lead_id.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// The conformance cases

mod cases {
    use super::*;

    pub async fn write_and_read_a_lead_with_its_outcome(backend: &dyn Backend) {
        let store = backend.open().await;
        let t = tag();
        let sold = record(&format!("sup-{t}"), &format!("camp-{t}"), BASE + 5 * HOUR);
        store
            .insert_lead(Arc::new(sold.clone()), None)
            .await
            .unwrap();
        assert_eq!(store.get_lead(&sold.lead_id).await.unwrap(), Some(sold));

        let waiting = LeadRecord {
            auction_log: Vec::new(),
            ..pending(&format!("sup-{t}"), &format!("camp-{t}"), BASE, BASE + HOUR)
        };
        store
            .insert_lead(Arc::new(waiting.clone()), None)
            .await
            .unwrap();
        let read = store.get_lead(&waiting.lead_id).await.unwrap().unwrap();
        assert_eq!(read, waiting);
        assert_eq!(read.status, LeadStatus::Pending);
        assert!(read.buyer_ids.is_empty());

        assert_eq!(store.get_lead(&lead_id_at(BASE)).await.unwrap(), None);
        assert_eq!(
            store.get_lead_without_log(&lead_id_at(BASE)).await.unwrap(),
            None
        );
        store.close().await.unwrap();
    }

    pub async fn auction_log_keeps_its_order(backend: &dyn Backend) {
        let store = backend.open().await;
        let t = tag();
        // More events than one page of a CQL read.
        let mut long = record(&format!("sup-{t}"), &format!("camp-{t}"), BASE + HOUR);
        long.auction_log = (0..150).map(event).collect();
        store
            .insert_lead(Arc::new(long.clone()), None)
            .await
            .unwrap();
        let read = store.get_lead(&long.lead_id).await.unwrap().unwrap();
        assert_eq!(read.auction_log, long.auction_log);

        // A replaced, shorter log is read back exactly, without the old tail; at seq 3 a post
        // without a reason replaces one with a reason.
        let short = LeadRecord {
            auction_log: vec![event(0), event(1), event(2), event(7)],
            ..long.clone()
        };
        store.update_lead(short.clone()).await.unwrap();
        assert_eq!(
            store.get_lead(&long.lead_id).await.unwrap(),
            Some(short.clone())
        );

        // Re-auctions append to the log, more rows each time than one batch of them holds.
        let mut growing = short;
        for round in 0..3 {
            growing
                .auction_log
                .extend((0..120).map(|i| event(200 + round * 120 + i)));
            store.update_lead(growing.clone()).await.unwrap();
            assert_eq!(
                store.get_lead(&long.lead_id).await.unwrap(),
                Some(growing.clone()),
                "round {round}"
            );
        }

        // A re-auction reads the lead without its log, then adds its events after the stored
        // ones (only those are written), its outcome changing with them.
        let added_to = |record: &LeadRecord, added: &[AuctionEvent]| LeadRecord {
            auction_log: added.to_vec(),
            ..record.head()
        };
        for round in 0..3 {
            let read = store.get_lead_for_reauction(&long.lead_id).await.unwrap();
            assert_eq!(
                read,
                Some((growing.head(), growing.auction_log.len())),
                "appended round {round}"
            );
            let stored = growing.auction_log.len();
            let added: Vec<AuctionEvent> = (0..60).map(|i| event(600 + round * 60 + i)).collect();
            growing.price_cents += 100;
            store
                .append_lead(added_to(&growing, &added), stored)
                .await
                .unwrap();
            growing.auction_log.extend(added);
            assert_eq!(
                store.get_lead(&long.lead_id).await.unwrap(),
                Some(growing.clone()),
                "appended round {round}"
            );
            // Without the log (a supplier's status read): the record alone.
            assert_eq!(
                store.get_lead_without_log(&long.lead_id).await.unwrap(),
                Some(growing.clone().without_log()),
                "appended round {round}"
            );
        }
        // The same events again at the same place (a spilled sale replayed after a crash):
        // not added twice.
        let stored = growing.auction_log.len() - 60;
        let last = growing.auction_log[stored..].to_vec();
        store
            .append_lead(added_to(&growing, &last), stored)
            .await
            .unwrap();
        assert_eq!(
            store.get_lead(&long.lead_id).await.unwrap(),
            Some(growing.clone())
        );
        // Events said to go after a log that is not the stored one go after the stored one,
        // so none is lost.
        let extra: Vec<AuctionEvent> = (0..3).map(|i| event(900 + i)).collect();
        store
            .append_lead(added_to(&growing, &extra), 5)
            .await
            .unwrap();
        growing.auction_log.extend(extra);
        assert_eq!(store.get_lead(&long.lead_id).await.unwrap(), Some(growing));
        store.close().await.unwrap();
    }

    pub async fn supplier_day_listing_pages_oldest_first(backend: &dyn Backend) {
        let store = backend.open().await;
        let t = tag();
        let supplier = format!("sup-{t}");
        let campaign = format!("camp-{t}");
        let mut expected = Vec::new();
        let mut all = Vec::new();
        for i in 0..30 {
            let r = record(&supplier, &campaign, BASE + i * 47 * 60_000);
            expected.push(r.lead_id.clone());
            all.push(r);
        }
        for i in 0..5 {
            all.push(record(&supplier, &campaign, BASE + 24 * HOUR + i * 1000));
            all.push(record(&format!("other-{t}"), &campaign, BASE + i * 1000));
        }
        // Stored out of order: the listing's order must not depend on the write order.
        all.reverse();
        all.swap(0, 17);
        for r in all {
            store.insert_lead(Arc::new(r), None).await.unwrap();
        }

        let mut listed = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = store
                .leads_of_supplier_day(&supplier, DAY, after.as_deref(), 7)
                .await
                .unwrap();
            assert!(page.len() <= 7);
            if page.is_empty() {
                break;
            }
            pages += 1;
            assert!(page.iter().all(|r| r.supplier_id == supplier));
            after = page.last().map(|r| r.lead_id.clone());
            listed.extend(ids(&page));
        }
        assert_eq!(pages, 5, "30 leads in pages of 7");
        assert_eq!(listed, expected, "every lead of the day once, oldest first");

        let next_day = store
            .leads_of_supplier_day(&supplier, DAY + 1, None, 100)
            .await
            .unwrap();
        assert_eq!(next_day.len(), 5);
        let full = store
            .leads_of_supplier_day(&supplier, DAY, None, 100)
            .await
            .unwrap();
        assert_eq!(full[0], {
            let mut first = record(&supplier, &campaign, BASE);
            first.lead_id = expected[0].clone();
            first
        });
        store.close().await.unwrap();
    }

    pub async fn pending_queue_moves_with_updates(backend: &dyn Backend) {
        let store = backend.open().await;
        let t = tag();
        let (supplier, campaign, other) = (
            format!("sup-{t}"),
            format!("camp-{t}"),
            format!("other-{t}"),
        );
        let t0 = BASE + 10 * HOUR;
        let a = pending(&supplier, &campaign, t0 - 5000, t0 + 1000);
        let b = pending(&supplier, &campaign, t0 - 4000, t0 + 2 * HOUR);
        let c = pending(&supplier, &campaign, t0 - 3000, t0 + 500);
        let x = pending(&supplier, &other, t0 - 2000, t0);
        let sold = record(&supplier, &campaign, t0 - 1000);
        for r in [&a, &b, &c, &x, &sold] {
            store.insert_lead(Arc::new(r.clone()), None).await.unwrap();
        }

        assert!(
            store
                .pending_due(&campaign, t0, 10)
                .await
                .unwrap()
                .is_empty()
        );
        let due = store.pending_due(&campaign, t0 + 1000, 10).await.unwrap();
        assert_eq!(
            ids(&due),
            ids(&[c.clone(), a.clone()]),
            "earliest due first"
        );
        let due = store
            .pending_due(&campaign, t0 + 3 * HOUR, 10)
            .await
            .unwrap();
        assert_eq!(due, vec![c.clone(), a.clone(), b.clone()]);
        let due = store
            .pending_due(&campaign, t0 + 3 * HOUR, 2)
            .await
            .unwrap();
        assert_eq!(ids(&due), ids(&[c.clone(), a.clone()]), "at most `limit`");

        // Paged, each page after the last lead of the page before: the same leads in the same
        // order, across hours, with leads due at the same time ordered by id.
        let paged_campaign = format!("paged-{t}");
        let mut same_due: Vec<LeadRecord> = (0..3)
            .map(|n| pending(&supplier, &paged_campaign, t0 - 900 + n, t0 + 700))
            .collect();
        same_due.sort_by(|x, y| x.lead_id.cmp(&y.lead_id));
        let later = pending(&supplier, &paged_campaign, t0 - 800, t0 + 2 * HOUR);
        for r in same_due.iter().chain([&later]) {
            store.insert_lead(Arc::new(r.clone()), None).await.unwrap();
        }
        for (campaign, expected) in [
            (&campaign, vec![c.clone(), a.clone(), b.clone()]),
            (
                &paged_campaign,
                [same_due.clone(), vec![later.clone()]].concat(),
            ),
        ] {
            for limit in [1, 2] {
                let mut paged = Vec::new();
                let mut after: Option<(i64, String)> = None;
                for _ in 0..8 {
                    let cursor = after.as_ref().map(|(due, id)| (*due, id.as_str()));
                    let page = store
                        .pending_due_after(campaign, t0 + 3 * HOUR, cursor, limit)
                        .await
                        .unwrap();
                    assert!(page.len() <= limit);
                    // The ids alone, as re-auction ticks list them, are the same page.
                    let listed = store
                        .pending_due_ids_after(campaign, t0 + 3 * HOUR, cursor, limit)
                        .await
                        .unwrap();
                    let expected_ids: Vec<(i64, String)> = page
                        .iter()
                        .map(|r| (r.next_retry_ms.unwrap(), r.lead_id.clone()))
                        .collect();
                    assert_eq!(listed, expected_ids);
                    let Some(last) = page.last() else { break };
                    after = Some((last.next_retry_ms.unwrap(), last.lead_id.clone()));
                    paged.extend(page);
                }
                assert_eq!(
                    ids(&paged),
                    ids(&expected),
                    "pages of {limit} in {campaign}"
                );
            }
        }

        // A re-auction that failed again moves the lead later in the queue.
        let a_later = LeadRecord {
            next_retry_ms: Some(t0 + 5 * HOUR),
            auction_log: vec![event(0), event(4)],
            ..a.clone()
        };
        store.update_lead(a_later.clone()).await.unwrap();
        let due = store
            .pending_due(&campaign, t0 + 3 * HOUR, 10)
            .await
            .unwrap();
        assert_eq!(ids(&due), ids(&[c.clone(), b.clone()]));
        let due = store
            .pending_due(&campaign, t0 + 6 * HOUR, 10)
            .await
            .unwrap();
        assert_eq!(due, vec![c.clone(), b.clone(), a_later.clone()]);

        // A re-auction that sold takes the lead out of the queue.
        let c_sold = LeadRecord {
            status: LeadStatus::Sold,
            price_cents: 1200,
            buyer_ids: vec!["buyer-z".into()],
            next_retry_ms: None,
            ..c.clone()
        };
        store.update_lead(c_sold.clone()).await.unwrap();
        let due = store
            .pending_due(&campaign, t0 + 6 * HOUR, 10)
            .await
            .unwrap();
        assert_eq!(ids(&due), ids(&[b.clone(), a_later.clone()]));
        assert_eq!(store.get_lead(&c.lead_id).await.unwrap(), Some(c_sold));

        // Updating without moving keeps the entry.
        let b_same = LeadRecord {
            auction_log: vec![event(1)],
            ..b.clone()
        };
        store.update_lead(b_same.clone()).await.unwrap();
        let due = store
            .pending_due(&campaign, t0 + 6 * HOUR, 10)
            .await
            .unwrap();
        assert_eq!(due, vec![b_same, a_later]);

        assert_eq!(
            store.pending_due(&other, t0 + 6 * HOUR, 10).await.unwrap(),
            vec![x]
        );
        store.close().await.unwrap();
    }

    pub async fn idempotency_answers_last_24_hours(backend: &dyn Backend) {
        let store = backend.open().await;
        let t = tag();
        let supplier = format!("sup-{t}");
        let r = record(&supplier, &format!("camp-{t}"), BASE);
        let answer = IdempotentAnswer {
            lead_id: r.lead_id.clone(),
            body: format!(
                r#"{{"success":true,"lead_id":"{}","status":"sold"}}"#,
                r.lead_id
            ),
            created_at_ms: BASE,
        };
        store
            .insert_lead(Arc::new(r.clone()), Some(("key-1".into(), answer.clone())))
            .await
            .unwrap();
        assert_eq!(
            store
                .get_idempotent(&supplier, "key-1", BASE + 1)
                .await
                .unwrap(),
            Some(answer.clone())
        );
        assert_eq!(
            store
                .get_idempotent(&supplier, "key-1", BASE + 24 * HOUR - 1)
                .await
                .unwrap(),
            Some(answer.clone()),
            "still replayed just before 24 h"
        );
        assert_eq!(
            store
                .get_idempotent(&supplier, "key-1", BASE + 24 * HOUR)
                .await
                .unwrap(),
            None,
            "expired at 24 h"
        );
        assert_eq!(
            store
                .get_idempotent(&supplier, "key-2", BASE)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .get_idempotent(&format!("other-{t}"), "key-1", BASE)
                .await
                .unwrap(),
            None,
            "keys are per supplier"
        );
        assert_eq!(store.get_lead(&r.lead_id).await.unwrap(), Some(r));
        store.close().await.unwrap();
    }

    pub async fn state_values_round_trip(backend: &dyn Backend) {
        let store = backend.open().await;
        let key = format!("breaker:{}", tag());
        assert_eq!(store.get_state(&key).await.unwrap(), None);
        store.put_state(&key, vec![0, 1, 255, 7]).await.unwrap();
        assert_eq!(
            store.get_state(&key).await.unwrap(),
            Some(vec![0, 1, 255, 7])
        );
        store.put_state(&key, b"open".to_vec()).await.unwrap();
        assert_eq!(store.get_state(&key).await.unwrap(), Some(b"open".to_vec()));
        store.put_state(&key, Vec::new()).await.unwrap();
        assert_eq!(store.get_state(&key).await.unwrap(), Some(Vec::new()));
        store.close().await.unwrap();
    }

    pub async fn concurrent_write_burst(backend: &dyn Backend) {
        let store = backend.open().await;
        let t = tag();
        let supplier = format!("sup-{t}");
        // 200 leads in one supplier-hour: one partition, more than one page.
        let records: Vec<LeadRecord> = (0..200)
            .map(|i| record(&supplier, &format!("camp-{t}"), BASE + 3 * HOUR + i))
            .collect();
        let started = Instant::now();
        let writes = records.iter().map(|r| {
            let store = store.clone();
            let r = r.clone();
            async move { store.insert_lead(Arc::new(r), None).await }
        });
        for result in futures::future::join_all(writes).await {
            result.unwrap();
        }
        eprintln!("200 concurrent writes in {:?}", started.elapsed());
        let listed = store
            .leads_of_supplier_day(&supplier, DAY, None, 1000)
            .await
            .unwrap();
        assert_eq!(listed, records);
        let page = store
            .leads_of_supplier_day(&supplier, DAY, Some(&records[99].lead_id), 50)
            .await
            .unwrap();
        assert_eq!(ids(&page), ids(&records[100..150]));
        store.close().await.unwrap();
    }

    pub async fn reading_after_reconnect(backend: &dyn Backend) {
        let store = backend.open().await;
        let t = tag();
        let supplier = format!("sup-{t}");
        let r = pending(&supplier, &format!("camp-{t}"), BASE, BASE + HOUR);
        // Recent: the embedded store drops answers older than 24 h when it opens.
        let now = leadex::clock::now_ms();
        let answer = IdempotentAnswer {
            lead_id: r.lead_id.clone(),
            body: "{}".into(),
            created_at_ms: now,
        };
        store
            .insert_lead(Arc::new(r.clone()), Some(("k".into(), answer.clone())))
            .await
            .unwrap();
        store.put_state(&format!("s-{t}"), vec![42]).await.unwrap();
        store.close().await.unwrap();
        assert!(matches!(
            store.get_lead(&r.lead_id).await,
            Err(StorageError::Closed)
        ));
        assert!(store.insert_lead(Arc::new(r.clone()), None).await.is_err());
        assert!(store.ping().await.is_err());

        let store = backend.open().await;
        store.ping().await.unwrap();
        assert_eq!(store.get_lead(&r.lead_id).await.unwrap(), Some(r.clone()));
        assert_eq!(
            store.get_idempotent(&supplier, "k", now).await.unwrap(),
            Some(answer)
        );
        assert_eq!(
            store.get_state(&format!("s-{t}")).await.unwrap(),
            Some(vec![42])
        );
        assert_eq!(
            ids(&store
                .pending_due(&format!("camp-{t}"), BASE + HOUR, 5)
                .await
                .unwrap()),
            vec![r.lead_id.clone()]
        );
        store.close().await.unwrap();
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded_backend {
            $(
                #[tokio::test]
                async fn $case() {
                    super::cases::$case(&super::Embedded::new()).await;
                }
            )*
        }
        mod embedded_unapplied_backend {
            $(
                #[tokio::test]
                async fn $case() {
                    super::cases::$case(&super::EmbeddedUnapplied { dir: super::data_dir() }).await;
                }
            )*
        }
        mod kassandra_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::cases::$case(&super::Kassandra::new().await).await;
                }
            )*
        }

        /// Every case against a real ScyllaDB/Cassandra cluster, when one is configured.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn real_cluster_conformance_runs_when_leadex_scylla_nodes_is_set() {
            let Ok(nodes) = std::env::var("LEADEX_SCYLLA_NODES") else {
                eprintln!(
                    "NOT CONFIGURED: the real-cluster conformance run did not run; set \
                     LEADEX_SCYLLA_NODES=host:9042[,host:9042] to run it against a cluster"
                );
                return;
            };
            let nodes: Vec<String> = nodes.split(',').map(|n| n.trim().to_owned()).collect();
            let keyspace = std::env::var("LEADEX_SCYLLA_KEYSPACE")
                .unwrap_or_else(|_| "leadex_conformance".to_owned());
            let config = scylla_storage(nodes, &keyspace, &data_dir());
            schema::migrate(&config).await.expect("migrate on the real cluster");
            let cluster = RealCluster { config };
            $(
                eprintln!("real cluster: {}", stringify!($case));
                cases::$case(&cluster).await;
            )*
        }
    };
}

conformance!(
    write_and_read_a_lead_with_its_outcome,
    auction_log_keeps_its_order,
    supplier_day_listing_pages_oldest_first,
    pending_queue_moves_with_updates,
    idempotency_answers_last_24_hours,
    state_values_round_trip,
    concurrent_write_burst,
    reading_after_reconnect,
);

/// A CQL session of the test's own on `backend`'s server, to change rows behind the store.
async fn session(backend: &Kassandra) -> scylla::client::session::Session {
    scylla::client::session_builder::SessionBuilder::new()
        .known_node(backend._server.node())
        .build()
        .await
        .unwrap()
}

/// Writes `event` as row `seq` of a lead's auction log, as the store writes it.
async fn store_event_row(backend: &Kassandra, lead_id: &str, seq: usize, event: &AuctionEvent) {
    session(backend)
        .await
        .query_unpaged(
            "INSERT INTO leadex_test.auction_log (lead_id, seq, event, buyer, detail) VALUES (?, ?, ?, ?, ?)",
            (lead_id, seq as i64, "ping", "", serde_json::to_string(event).unwrap()),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appended_update_on_scylla_writes_only_the_new_log_rows() {
    let backend = Kassandra::new().await;
    let store = backend.open().await;
    let mut lead = pending("sup-append", "camp-append", BASE + HOUR, BASE + 2 * HOUR);
    lead.auction_log = (0..3).map(event).collect();
    store
        .insert_lead(Arc::new(lead.clone()), None)
        .await
        .unwrap();
    // The stored rows are not rewritten: three rows made unreadable stay unread, and the
    // lead's row says how long its log is, so a re-auction's read needs no log row.
    for seq in 0..3_i64 {
        session(&backend)
            .await
            .query_unpaged(
                "INSERT INTO leadex_test.auction_log (lead_id, seq, event, buyer, detail) VALUES (?, ?, ?, ?, ?)",
                (lead.lead_id.as_str(), seq, "ping", "", "not json"),
            )
            .await
            .unwrap();
    }
    let (head, stored) = store
        .get_lead_for_reauction(&lead.lead_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((head, stored), (lead.head(), 3));
    let next = LeadRecord {
        auction_log: vec![event(13)],
        ..lead.head()
    };
    store.append_lead(next, 3).await.unwrap();
    assert!(
        store.get_lead(&lead.lead_id).await.is_err(),
        "rows 0-2 still unreadable"
    );
    // Rows written back as they were: the appended event is the fourth.
    for seq in 0..3_usize {
        store_event_row(&backend, &lead.lead_id, seq, &event(seq)).await;
    }
    let read = store.get_lead(&lead.lead_id).await.unwrap().unwrap();
    assert_eq!(
        read.auction_log,
        [(0..3).map(event).collect::<Vec<_>>(), vec![event(13)]].concat()
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_entries_left_behind_on_scylla_take_no_place_in_a_page() {
    let backend = Kassandra::new().await;
    let store = backend.open().await;
    let campaign = "camp-stale";
    let due = BASE + 2 * HOUR;
    let leads: Vec<LeadRecord> = (0..3)
        .map(|n| pending("sup-stale", campaign, BASE + n, due + n))
        .collect();
    for lead in &leads {
        store
            .insert_lead(Arc::new(lead.clone()), None)
            .await
            .unwrap();
    }
    // Entries a concurrent update could leave behind: the first lead at an earlier due time,
    // a lead that is not stored, and the second lead in another campaign's queue; all of them
    // sort before the real entries.
    let session = session(&backend).await;
    let bucket = due.div_euclid(HOUR);
    for (campaign, at, lead_id) in [
        (campaign, due - 10, leads[0].lead_id.as_str()),
        (campaign, due - 5, "not-stored"),
        ("camp-other", due - 5, leads[1].lead_id.as_str()),
    ] {
        session
            .query_unpaged(
                "INSERT INTO leadex_test.pending_leads (campaign_id, bucket, due_ms, lead_id) VALUES (?, ?, ?, ?)",
                (campaign, bucket, at, lead_id),
            )
            .await
            .unwrap();
    }
    // The last lead's log no longer reads: listing ids never reads a log, and a page of
    // records reads only the leads on it.
    session
        .query_unpaged(
            "INSERT INTO leadex_test.auction_log (lead_id, seq, event, buyer, detail) VALUES (?, ?, ?, ?, ?)",
            (leads[2].lead_id.as_str(), 0_i64, "ping", "", "not json"),
        )
        .await
        .unwrap();
    let expected: Vec<(i64, String)> = leads
        .iter()
        .map(|l| (l.next_retry_ms.unwrap(), l.lead_id.clone()))
        .collect();
    let now = due + HOUR;
    assert_eq!(
        store
            .pending_due_ids_after(campaign, now, None, 2)
            .await
            .unwrap(),
        expected[..2]
    );
    assert_eq!(
        store
            .pending_due_ids_after(campaign, now, None, 10)
            .await
            .unwrap(),
        expected
    );
    assert_eq!(
        store.pending_due(campaign, now, 2).await.unwrap(),
        leads[..2]
    );
    assert_eq!(
        store
            .pending_due_ids_after("camp-other", now, None, 10)
            .await
            .unwrap(),
        vec![]
    );
    store.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Schema and configuration

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_cluster_without_the_schema_and_migrate_is_idempotent() {
    let server = CqlServer::start();
    let mut config = scylla_storage(vec![server.node()], "leadex_fresh", &data_dir());
    config.await_schema_agreement = false;
    let refused = ScyllaStore::open(&config)
        .await
        .err()
        .expect("no schema yet");
    let message = refused.to_string();
    assert!(
        message.contains("leadex migrate --config") && message.contains("leads"),
        "{message}"
    );
    assert_eq!(schema::migrate(&config).await.unwrap(), 8);
    assert_eq!(
        schema::migrate(&config).await.unwrap(),
        8,
        "runs again harmlessly"
    );
    ScyllaStore::open(&config)
        .await
        .expect("opens once migrated");
}

#[actix_web::test]
async fn the_exchange_does_not_start_on_a_cluster_without_the_schema() {
    let server = CqlServer::start();
    let text = scylla_app_config(&server, &data_dir(), "");
    let config = Config::from_toml(&text).unwrap();
    let refused = leadex::startup::Application::build(config, None)
        .await
        .err()
        .expect("no schema, no start");
    let message = refused.to_string();
    assert!(
        message.starts_with("storage: the ScyllaDB schema is missing in keyspace `leadex_test`")
            && message.ends_with("run `leadex migrate --config FILE` first"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_a_clear_start_up_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let config = scylla_storage(vec![addr.to_string()], "leadex_test", &data_dir());
    let message = ScyllaStore::open(&config).await.err().unwrap().to_string();
    assert!(message.contains("cannot connect to ScyllaDB"), "{message}");
}

#[test]
fn scylla_storage_config_is_validated() {
    let base = |storage: &str| {
        format!("[storage]\n{storage}\n\n[[sellers]]\ncode = \"ACME1234\"\nslug = \"acme\"\n")
    };
    let config = Config::from_toml(&base(
        "backend = \"scylla\"\nnodes = [\"10.0.0.1:9042\"]\nkeyspace = \"leadex\"\ndatacenters = { eu = 3, us = 2 }\nlocal_datacenter = \"eu\"\nusername = \"u\"\npassword = \"p\"",
    ))
    .unwrap();
    assert_eq!(config.storage.consistency, "local_quorum", "the default");
    assert_eq!(config.storage.datacenters["eu"], 3);
    assert_eq!(
        Config::from_toml("").unwrap().storage.backend,
        "embedded",
        "embedded stays the default"
    );

    for (storage, complaint) in [
        ("backend = \"scylla\"", "storage.nodes"),
        (
            "backend = \"scylla\"\nnodes = [\"a:9042\"]\nconsistency = \"most\"",
            "storage.consistency",
        ),
        (
            "backend = \"scylla\"\nnodes = [\"a:9042\"]\nkeyspace = \"Bad-Name\"",
            "storage.keyspace",
        ),
        (
            "backend = \"scylla\"\nnodes = [\"a:9042\"]\nreplication_factor = 3\ndatacenters = { eu = 3 }",
            "exclude each other",
        ),
        (
            "backend = \"scylla\"\nnodes = [\"a:9042\"]\nusername = \"u\"",
            "username and password",
        ),
        ("backend = \"mongo\"", "unknown backend `mongo`"),
        (
            "backend = \"scylla\"\nnodes = [\"a:9042\"]\nnode = \"x\"",
            "unknown field `node`",
        ),
    ] {
        let err = Config::from_toml(&base(storage)).unwrap_err().to_string();
        assert!(err.contains(complaint), "{storage}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// The exchange on backend = "scylla"

/// The standard test config with its `[storage]` pointed at the CQL server.
fn scylla_app_config(server: &CqlServer, data: &Path, buyers: &str) -> String {
    scylla_app_config_with(server, data, "", buyers)
}

/// As `scylla_app_config`, with `campaign_extra` lines in the campaign.
fn scylla_app_config_with(
    server: &CqlServer,
    data: &Path,
    campaign_extra: &str,
    buyers: &str,
) -> String {
    let text = config(data, campaign_extra, buyers);
    let embedded = format!("backend = \"embedded\"\npath = \"{}\"", data.display());
    assert!(text.contains(&embedded));
    text.replace(
        &embedded,
        &format!(
            "backend = \"scylla\"\npath = \"{}\"\nnodes = [\"{}\"]\nkeyspace = \"leadex_test\"\nreplication_factor = 1\nawait_schema_agreement = false\nrequest_timeout_ms = 1500\nconnect_timeout_ms = 1000",
            data.display(),
            server.node()
        ),
    )
}

async fn migrated_server() -> CqlServer {
    let server = CqlServer::start();
    let mut config = scylla_storage(vec![server.node()], "leadex_test", &data_dir());
    config.await_schema_agreement = false;
    schema::migrate(&config).await.expect("migrate");
    server
}

#[actix_web::test]
async fn a_lead_is_sold_and_read_back_through_the_api_on_scylla() {
    let server = migrated_server().await;
    let (a, b) = (sim("12.50", 5), sim("30", 5));
    let buyers = ping_buyer("a", &a, "") + &ping_buyer("b", &b, "");
    let app = TestApp::spawn(&scylla_app_config(&server, &data_dir(), &buyers)).await;

    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);

    let (status, body) = app.post_lead(&lead()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "sold");
    assert_eq!(body["price"], json!(30.0));
    assert_eq!(body["buyer_ids"], json!(["b"]));
    let lead_id = body["lead_id"].as_str().unwrap().to_owned();
    assert_eq!(b.stats.posts(), 1);

    let (status, read) = app.get_lead(KEY, &lead_id).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["lead_id"], json!(lead_id));
    assert_eq!(read["status"], "sold");
    assert_eq!(read["price"], json!(30.0));
    assert_eq!(read["buyer_ids"], json!(["b"]));
    let (status, _) = app.get_lead(OTHER_KEY, &lead_id).await;
    assert_eq!(status, 404, "another supplier's lead");

    // An Idempotency-Key replay comes from the cluster, without a second auction.
    let send = |key: &'static str| {
        app.client
            .post(app.url("/api/leads"))
            .bearer_auth(KEY)
            .header("Idempotency-Key", key)
            .json(&lead())
            .send()
    };
    let first: Value = send("order-77").await.unwrap().json().await.unwrap();
    let again: Value = send("order-77").await.unwrap().json().await.unwrap();
    assert_eq!(first, again);
    assert_eq!(b.stats.posts(), 2, "the replay ran no auction");
    app.stop().await;

    // What the exchange stored, read straight from the cluster.
    let mut storage = scylla_storage(vec![server.node()], "leadex_test", &data_dir());
    storage.await_schema_agreement = false;
    let store = ScyllaStore::open(&storage).await.unwrap();
    let stored = store.get_lead(&lead_id).await.unwrap().expect("stored");
    assert_eq!(stored.status, LeadStatus::Sold);
    assert_eq!(stored.price_cents, 3000);
    assert_eq!(stored.fields["phone"], json!("5551234567"));
    assert!(stored.auction_log.iter().any(|e| matches!(
        e,
        AuctionEvent::Post { buyer, outcome, .. } if buyer == "b" && outcome == "accepted"
    )));
}

#[actix_web::test]
async fn a_pending_lead_is_re_auctioned_until_sold_on_scylla() {
    let server = migrated_server().await;
    let buyer = sim("none", 0);
    let text = scylla_app_config_with(
        &server,
        &data_dir(),
        "pending_ttl_secs = 60\nretry_interval_secs = 1",
        &ping_buyer("late", &buyer, ""),
    );
    let app = TestApp::spawn(&text).await;
    let (status, body) = app.post_lead(&lead()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("pending")),
        "{body}"
    );
    let lead_id = body["lead_id"].as_str().unwrap().to_owned();
    // Re-auctioned every second, nobody bidding: at least two more pings.
    let started = Instant::now();
    while buyer.stats.pings() < 3 && started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(buyer.stats.pings() >= 3, "{} pings", buyer.stats.pings());
    buyer.set_behaviour(leadex::sim::Behaviour {
        bid: leadex::sim::BidSpec::parse("15").unwrap(),
        ..leadex::sim::Behaviour::default()
    });
    let started = Instant::now();
    let sold = loop {
        let (status, read) = app.get_lead(KEY, &lead_id).await;
        assert_eq!(status, 200, "{read}");
        if read["status"] == "sold" || started.elapsed() > Duration::from_secs(15) {
            break read;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sold["status"], "sold", "{sold}");
    assert_eq!(sold["price"], json!(15.0));
    let pings = buyer.stats.pings();
    app.stop().await;

    // Every auction's events are in the stored log, in order, each re-auction's written
    // after the ones before it (only its own rows), and the lead has left the queue.
    let mut storage = scylla_storage(vec![server.node()], "leadex_test", &data_dir());
    storage.await_schema_agreement = false;
    let store = ScyllaStore::open(&storage).await.unwrap();
    let stored = store.get_lead(&lead_id).await.unwrap().expect("stored");
    assert_eq!(
        (stored.status, stored.price_cents),
        (LeadStatus::Sold, 1500)
    );
    let logged_pings = stored
        .auction_log
        .iter()
        .filter(|e| matches!(e, AuctionEvent::Ping { buyer, .. } if buyer == "late"))
        .count();
    assert_eq!(logged_pings as u64, pings, "{:?}", stored.auction_log);
    assert!(matches!(
        stored.auction_log.last(),
        Some(AuctionEvent::Post { buyer, outcome, .. }) if buyer == "late" && outcome == "accepted"
    ));
    assert_eq!(
        store.get_lead_for_reauction(&lead_id).await.unwrap(),
        Some((stored.head(), stored.auction_log.len()))
    );
    let campaign = stored.campaign_id.clone();
    assert_eq!(
        store
            .pending_due_ids_after(&campaign, i64::MAX / 2, None, 10)
            .await
            .unwrap(),
        vec![]
    );
}

#[actix_web::test]
async fn a_sale_storage_cannot_take_is_spilled_answered_sold_and_replayed() {
    let mut server = migrated_server().await;
    let buyer = sim("20", 0);
    let data = data_dir();
    let app = TestApp::spawn(&scylla_app_config(
        &server,
        &data,
        &ping_buyer("a", &buyer, ""),
    ))
    .await;

    server.stop();
    // The buyer bought it and the spill file holds it durably: the supplier is answered
    // `sold`, as a 503 would have it send the lead again and sell it twice.
    let response = app
        .client
        .post(app.url("/api/leads"))
        .bearer_auth(KEY)
        .json(&lead())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "sold", "{body}");
    assert_eq!(body["price"], json!(20.0));
    let lead_id = body["lead_id"].as_str().unwrap().to_owned();
    assert_eq!(buyer.stats.accepted(), 1);
    assert_eq!(buyer.stats.post_bodies()[0]["lead_id"], json!(lead_id));
    let spill = std::fs::read_to_string(data.join("spill.jsonl")).expect("spill file");
    assert_eq!(spill.lines().count(), 1);
    assert!(spill.contains(&lead_id));

    // While storage is still down the node reads the lead from the spill. (A lead sent with
    // an Idempotency-Key now gets 503: whether the key was used cannot be read.)
    let (status, read) = app.get_lead(KEY, &lead_id).await;
    assert_eq!(
        (status, read["status"].as_str()),
        (200, Some("sold")),
        "{read}"
    );

    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503, "readyz reports storage down");

    // At least this sale (the metrics registry is shared by the tests of this process).
    let metrics = app.metrics().await;
    let spilled: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("leadex_storage_spilled_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no spill counter: {metrics}"));
    assert!(spilled >= 1.0, "{metrics}");

    // Storage comes back: the spilled sale is written to it without any request, the spill
    // file empties, and the lead then reads from storage.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(data.join("spill.jsonl"))
        .unwrap()
        .lines()
        .count()
        > 0
    {
        assert!(Instant::now() < deadline, "spill file not emptied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, read) = app.get_lead(KEY, &lead_id).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["status"], "sold");
    assert_eq!(read["price"], json!(20.0));
    assert_eq!(read["buyer_ids"], json!(["a"]));
    assert_eq!(buyer.stats.posts(), 1);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spill_is_bounded_and_replayed_by_the_next_start() {
    let mut server = migrated_server().await;
    let data = data_dir();
    let spill_path = data.join("spill.jsonl");
    let mut config = scylla_storage(vec![server.node()], "leadex_test", &data);
    config.await_schema_agreement = false;
    let t = tag();
    let sales: Vec<LeadRecord> = (0..3)
        .map(|i| record(&format!("sup-{t}"), "camp", BASE + i))
        .collect();

    let inner: Arc<dyn LeadStore> = Arc::new(ScyllaStore::open(&config).await.unwrap());
    let store = SpillingStore::open(inner, &spill_path, 2).unwrap();
    server.stop();
    let answer = IdempotentAnswer {
        lead_id: sales[0].lead_id.clone(),
        body: "{\"status\":\"sold\"}".into(),
        created_at_ms: leadex::clock::now_ms(),
    };
    // A sale the spill takes is stored as far as the caller knows; past spill_max the write
    // fails.
    store
        .insert_lead(
            Arc::new(sales[0].clone()),
            Some(("key-0".into(), answer.clone())),
        )
        .await
        .expect("spilled");
    store
        .insert_lead(Arc::new(sales[1].clone()), None)
        .await
        .expect("spilled");
    assert!(
        store
            .insert_lead(Arc::new(sales[2].clone()), None)
            .await
            .is_err()
    );
    assert_eq!(store.spilled().await, 2, "bounded at spill_max");
    // Reads see the spill while storage is down.
    assert_eq!(
        store.get_lead(&sales[1].lead_id).await.unwrap(),
        Some(sales[1].clone())
    );
    assert_eq!(
        store
            .get_idempotent(&format!("sup-{t}"), "key-0", answer.created_at_ms)
            .await
            .unwrap(),
        Some(answer.clone())
    );
    assert!(
        store
            .get_idempotent("another-supplier", "key-0", answer.created_at_ms)
            .await
            .is_err(),
        "another supplier's key is not in the spill: storage is asked, and it is down"
    );
    let unsold = pending(&format!("sup-{t}"), "camp", BASE, BASE + HOUR);
    assert!(
        store
            .insert_lead(Arc::new(unsold.clone()), None)
            .await
            .is_err()
    );
    assert_eq!(store.spilled().await, 2, "only sales are spilled");
    store.close().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&spill_path)
            .unwrap()
            .lines()
            .count(),
        2,
        "kept on disk for the next start"
    );

    server.restart();
    let inner: Arc<dyn LeadStore> = Arc::new(ScyllaStore::open(&config).await.unwrap());
    let store = SpillingStore::open(inner, &spill_path, 2).unwrap();
    assert_eq!(store.spilled().await, 2);
    // The background replay or this call stores them; either way both arrive exactly once.
    store.replay().await.ok();
    assert_eq!(store.spilled().await, 0);
    assert_eq!(
        store.get_lead(&sales[0].lead_id).await.unwrap(),
        Some(sales[0].clone())
    );
    assert_eq!(
        store.get_lead(&sales[1].lead_id).await.unwrap(),
        Some(sales[1].clone())
    );
    assert_eq!(store.get_lead(&sales[2].lead_id).await.unwrap(), None);
    assert_eq!(
        store
            .get_idempotent(&format!("sup-{t}"), "key-0", answer.created_at_ms)
            .await
            .unwrap(),
        Some(answer),
        "a retry with the same key gets the spilled sale's answer"
    );
    assert_eq!(store.get_lead(&unsold.lead_id).await.unwrap(), None);
    assert!(std::fs::read_to_string(&spill_path).unwrap().is_empty());
    store.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// docker-compose.yml and deploy/

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files of deploy/prometheus and deploy/grafana, which the operations work provides.
fn owned_by_operations(path: &str) -> bool {
    path.starts_with("./deploy/prometheus") || path.starts_with("./deploy/grafana")
}

fn compose() -> serde_norway::Value {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).expect("compose file");
    serde_norway::from_str(&text).expect("docker-compose.yml is YAML")
}

#[test]
fn compose_runs_the_whole_stack_in_order() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for wanted in [
        "scylla",
        "redis",
        "migrate",
        "leadex-1",
        "leadex-2",
        "lb",
        "buyer-sim-1",
        "buyer-sim-2",
        "buyer-sim-3",
        "prometheus",
        "grafana",
    ] {
        assert!(
            names.contains(&wanted),
            "service {wanted} missing: {names:?}"
        );
    }
    let depends = |service: &str, on: &str| -> String {
        compose["services"][service]["depends_on"][on]["condition"]
            .as_str()
            .unwrap_or_else(|| panic!("{service} does not wait for {on}"))
            .to_owned()
    };
    assert_eq!(depends("migrate", "scylla"), "service_healthy");
    for node in ["leadex-1", "leadex-2"] {
        assert_eq!(depends(node, "migrate"), "service_completed_successfully");
        assert_eq!(depends(node, "redis"), "service_healthy");
        let command: Vec<&str> = compose["services"][node]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert_eq!(command[0], "serve");
        assert!(compose["services"][node]["healthcheck"]["test"].is_sequence());
    }
    assert_eq!(depends("lb", "leadex-1"), "service_healthy");
    assert_eq!(depends("lb", "leadex-2"), "service_healthy");
    for service in ["scylla", "redis", "leadex-1", "leadex-2", "lb"] {
        assert!(
            compose["services"][service]["healthcheck"]["test"].is_sequence(),
            "{service} has no healthcheck"
        );
    }
    assert_eq!(
        compose["services"]["migrate"]["command"][0].as_str(),
        Some("migrate")
    );
}

#[test]
fn every_build_image_port_and_mounted_file_of_compose_exists() {
    let compose = compose();
    let root = repo();
    let mut from_operations = Vec::new();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        match (service.get("build"), service.get("image")) {
            (Some(build), _) => {
                let context = root.join(build["context"].as_str().unwrap_or("."));
                assert!(context.is_dir(), "{name}: no build context {context:?}");
                let dockerfile = context.join(build["dockerfile"].as_str().unwrap_or("Dockerfile"));
                assert!(dockerfile.is_file(), "{name}: no {dockerfile:?}");
            }
            (None, Some(image)) => {
                let image = image.as_str().unwrap();
                assert!(
                    image.contains(':') && !image.ends_with(":latest"),
                    "{name}: pin the image version ({image})"
                );
            }
            (None, None) => panic!("{name}: neither build nor image"),
        }
        for port in service
            .get("ports")
            .and_then(|p| p.as_sequence())
            .into_iter()
            .flatten()
        {
            let port = port.as_str().expect("ports are quoted strings");
            let parts: Vec<&str> = port.split(':').collect();
            assert!(
                (2..=3).contains(&parts.len())
                    && parts[parts.len() - 2..]
                        .iter()
                        .all(|p| p.parse::<u16>().is_ok_and(|p| p > 0)),
                "{name}: port `{port}` is not host:container"
            );
        }
        for volume in service
            .get("volumes")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
        {
            let volume = volume.as_str().expect("short volume syntax");
            let source = volume.split(':').next().unwrap();
            if !source.starts_with("./") {
                let declared = compose["volumes"].get(source).is_some();
                assert!(declared, "{name}: named volume {source} is not declared");
                continue;
            }
            if owned_by_operations(source) {
                from_operations.push(source.to_owned());
                continue;
            }
            assert!(
                root.join(source).exists(),
                "{name}: mounts missing {source}"
            );
        }
    }
    from_operations.sort();
    assert_eq!(
        from_operations,
        vec![
            "./deploy/grafana/dashboards",
            "./deploy/grafana/provisioning",
            "./deploy/prometheus/alerts.yml",
            "./deploy/prometheus/prometheus.yml",
        ]
    );
    for source in &from_operations {
        assert!(root.join(source).exists(), "missing {source}");
    }
    // Grafana's dashboards provider reads the folder compose mounts the dashboards into.
    let provider =
        std::fs::read_to_string(root.join("deploy/grafana/provisioning/dashboards/leadex.yml"))
            .unwrap();
    let provider_path = provider
        .lines()
        .find_map(|l| l.trim().strip_prefix("path:"))
        .map(|p| p.trim().to_owned())
        .expect("the dashboards provider names a path");
    let grafana_mounts = format!("{:?}", compose["services"]["grafana"]["volumes"]);
    assert!(
        grafana_mounts.contains(&format!("./deploy/grafana/dashboards:{provider_path}")),
        "dashboards must be mounted at {provider_path}: {grafana_mounts}"
    );
}

#[test]
fn compose_node_configs_are_valid_leadex_configs() {
    for node in ["leadex-1", "leadex-2"] {
        let path = repo().join(format!("deploy/config/{node}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(parsed["storage"]["backend"].as_str(), Some("scylla"));
        assert_eq!(parsed["rate_limit"]["backend"].as_str(), Some("redis"));
        assert_eq!(
            parsed["rate_limit"]["url"].as_str(),
            Some("redis://redis:6379")
        );
        let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("{node}: {e}"));
        assert_eq!(config.rate_limit.backend, "redis");
        assert_eq!(config.coordination.backend, "redis");
        assert_eq!(
            config.coordination.url.as_deref(),
            Some("redis://redis:6379")
        );
        assert_eq!(config.storage.nodes, vec!["scylla:9042"]);
        assert_eq!(config.buyers.len(), 3);
        assert!(config.buyers.iter().all(|b| {
            b.ping_url
                .as_deref()
                .is_some_and(|u| u.starts_with("http://buyer-sim-"))
        }));
        // X-Forwarded-For is believed from the load balancer alone: its pinned address,
        // inside the network's fixed subnet.
        let compose = compose();
        let lb = compose["services"]["lb"]["networks"]["default"]["ipv4_address"]
            .as_str()
            .expect("the load balancer's address is pinned");
        assert_eq!(config.server.trusted_proxies, vec![lb.to_owned()], "{node}");
        let subnet: ipnet::Ipv4Net = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
            .as_str()
            .expect("a fixed subnet")
            .parse()
            .unwrap();
        assert!(subnet.contains(&lb.parse::<std::net::Ipv4Addr>().unwrap()));
    }
}
