//! The single-node store: redb (pure-Rust, copy-on-write B-trees, checksummed commits, one
//! fsync per commit). A dedicated writer thread takes every queued write into one transaction
//! (group commit), so many concurrent auctions share one fsync.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use super::{IDEMPOTENCY_TTL_MS, IdempotentAnswer, LeadRecord, LeadStore, StorageError, day_of};
use crate::telemetry;

const LEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("leads");
/// Key `supplier \x1f day(20 digits) \x1f lead_id`, value empty: the supplier-by-day index.
const SUPPLIER_DAY: TableDefinition<&str, ()> = TableDefinition::new("supplier_day");
/// Key `supplier \x1f idempotency key`.
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");

const SEP: char = '\u{1f}';

struct WriteJob {
    record: LeadRecord,
    idempotency: Option<(String, IdempotentAnswer)>,
    done: oneshot::Sender<Result<(), StorageError>>,
}

enum Job {
    Write(Box<WriteJob>),
    Close(oneshot::Sender<()>),
}

pub struct EmbeddedStore {
    /// `None` once closed, so the file lock is released for the next opener.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    writer: std::sync::Mutex<Option<std_mpsc::Sender<Job>>>,
}

fn backend<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Backend(e.to_string())
}

fn day_key(supplier: &str, day: i64, lead_id: &str) -> String {
    format!("{supplier}{SEP}{day:020}{SEP}{lead_id}")
}

fn idem_key(supplier: &str, key: &str) -> String {
    format!("{supplier}{SEP}{key}")
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, and starts its writer thread.
    pub fn open(dir: &Path, group_commit_max: usize) -> Result<EmbeddedStore, StorageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::Backend(format!("cannot create {}: {e}", dir.display())))?;
        let db = Database::create(dir.join("leadex.redb")).map_err(backend)?;
        {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(LEADS).map_err(backend)?;
            txn.open_table(SUPPLIER_DAY).map_err(backend)?;
            txn.open_table(IDEMPOTENCY).map_err(backend)?;
            txn.commit().map_err(backend)?;
        }
        let db = Arc::new(db);
        let (tx, rx) = std_mpsc::channel();
        let writer_db = db.clone();
        let max = group_commit_max.max(1);
        std::thread::Builder::new()
            .name("leadex-store-writer".into())
            .spawn(move || {
                let closing = writer_loop(&writer_db, &rx, max);
                // Release the database before telling `close` it is done.
                drop(writer_db);
                if let Some(done) = closing {
                    let _ = done.send(());
                }
            })
            .map_err(backend)?;
        let store = EmbeddedStore {
            db: std::sync::RwLock::new(Some(db)),
            writer: std::sync::Mutex::new(Some(tx)),
        };
        store.sweep_idempotency(crate::clock::now_ms())?;
        Ok(store)
    }

    /// Drops idempotency answers older than 24 h so the table stays bounded.
    fn sweep_idempotency(&self, now_ms: i64) -> Result<usize, StorageError> {
        let txn = self.db()?.begin_write().map_err(backend)?;
        let removed;
        {
            let mut table = txn.open_table(IDEMPOTENCY).map_err(backend)?;
            let before = table.len().map_err(backend)?;
            table
                .retain(|_, value| {
                    serde_json::from_slice::<IdempotentAnswer>(value)
                        .map(|a| now_ms - a.created_at_ms < IDEMPOTENCY_TTL_MS)
                        .unwrap_or(false)
                })
                .map_err(backend)?;
            removed = before - table.len().map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        Ok(removed as usize)
    }

    fn db(&self) -> Result<Arc<Database>, StorageError> {
        self.db
            .read()
            .expect("db lock")
            .clone()
            .ok_or(StorageError::Closed)
    }

    fn sender(&self) -> Result<std_mpsc::Sender<Job>, StorageError> {
        self.writer
            .lock()
            .expect("writer lock")
            .as_ref()
            .cloned()
            .ok_or(StorageError::Closed)
    }
}

/// Commits queued writes in batches until closed; returns the closer's waiter.
fn writer_loop(
    db: &Database,
    rx: &std_mpsc::Receiver<Job>,
    max: usize,
) -> Option<oneshot::Sender<()>> {
    let mut batch: Vec<Box<WriteJob>> = Vec::with_capacity(max);
    let mut closing = None;
    while closing.is_none() {
        match rx.recv() {
            Ok(Job::Write(job)) => batch.push(job),
            Ok(Job::Close(done)) => closing = Some(done),
            Err(_) => return None,
        }
        while batch.len() < max && closing.is_none() {
            match rx.try_recv() {
                Ok(Job::Write(job)) => batch.push(job),
                Ok(Job::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let size = batch.len();
        let result = commit_batch(db, &batch);
        metrics::histogram!(telemetry::STORAGE_WRITE_DURATION)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::STORAGE_BATCH_SIZE).record(size as f64);
        if let Err(e) = &result {
            metrics::counter!(telemetry::STORAGE_ERRORS_TOTAL).increment(1);
            tracing::error!(error = %e, batch = size, "storage commit failed");
        }
        for job in batch.drain(..) {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StorageError::Backend(e.to_string())),
            };
            let _ = job.done.send(answer);
        }
    }
    closing
}

fn commit_batch(db: &Database, batch: &[Box<WriteJob>]) -> Result<(), StorageError> {
    let mut txn = db.begin_write().map_err(backend)?;
    txn.set_durability(Durability::Immediate).map_err(backend)?;
    {
        let mut leads = txn.open_table(LEADS).map_err(backend)?;
        let mut by_day = txn.open_table(SUPPLIER_DAY).map_err(backend)?;
        let mut idem = txn.open_table(IDEMPOTENCY).map_err(backend)?;
        for job in batch {
            let r = &job.record;
            let bytes = serde_json::to_vec(r).map_err(backend)?;
            leads
                .insert(r.lead_id.as_str(), bytes.as_slice())
                .map_err(backend)?;
            let key = day_key(&r.supplier_id, day_of(r.created_at_ms), &r.lead_id);
            by_day.insert(key.as_str(), ()).map_err(backend)?;
            if let Some((key, answer)) = &job.idempotency {
                let bytes = serde_json::to_vec(answer).map_err(backend)?;
                idem.insert(idem_key(&r.supplier_id, key).as_str(), bytes.as_slice())
                    .map_err(backend)?;
            }
        }
    }
    txn.commit().map_err(backend)
}

#[async_trait]
impl LeadStore for EmbeddedStore {
    async fn insert_lead(
        &self,
        record: LeadRecord,
        idempotency: Option<(String, IdempotentAnswer)>,
    ) -> Result<(), StorageError> {
        let (done, wait) = oneshot::channel();
        self.sender()?
            .send(Job::Write(Box::new(WriteJob {
                record,
                idempotency,
                done,
            })))
            .map_err(|_| StorageError::Closed)?;
        wait.await.map_err(|_| StorageError::Closed)?
    }

    async fn get_lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError> {
        let txn = self.db()?.begin_read().map_err(backend)?;
        let table = txn.open_table(LEADS).map_err(backend)?;
        match table.get(lead_id).map_err(backend)? {
            Some(bytes) => serde_json::from_slice(bytes.value())
                .map(Some)
                .map_err(|e| StorageError::Corrupt(e.to_string())),
            None => Ok(None),
        }
    }

    async fn get_idempotent(
        &self,
        supplier_id: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<IdempotentAnswer>, StorageError> {
        let txn = self.db()?.begin_read().map_err(backend)?;
        let table = txn.open_table(IDEMPOTENCY).map_err(backend)?;
        let Some(bytes) = table
            .get(idem_key(supplier_id, key).as_str())
            .map_err(backend)?
        else {
            return Ok(None);
        };
        let answer: IdempotentAnswer = serde_json::from_slice(bytes.value())
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        Ok((now_ms - answer.created_at_ms < IDEMPOTENCY_TTL_MS).then_some(answer))
    }

    async fn leads_of_supplier_day(
        &self,
        supplier_id: &str,
        day: i64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        let txn = self.db()?.begin_read().map_err(backend)?;
        let index = txn.open_table(SUPPLIER_DAY).map_err(backend)?;
        let leads = txn.open_table(LEADS).map_err(backend)?;
        let prefix = day_key(supplier_id, day, "");
        let start = match after {
            Some(after) => day_key(supplier_id, day, after),
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for entry in index.range(start.as_str()..).map_err(backend)? {
            let (key, _) = entry.map_err(backend)?;
            let key = key.value();
            if !key.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let lead_id = &key[prefix.len()..];
            if after == Some(lead_id) {
                continue;
            }
            if let Some(bytes) = leads.get(lead_id).map_err(backend)? {
                out.push(
                    serde_json::from_slice(bytes.value())
                        .map_err(|e| StorageError::Corrupt(e.to_string()))?,
                );
            }
        }
        Ok(out)
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.sender()?;
        let txn = self.db()?.begin_read().map_err(backend)?;
        txn.open_table(LEADS).map_err(backend)?;
        Ok(())
    }

    async fn close(&self) -> Result<(), StorageError> {
        let Some(sender) = self.writer.lock().expect("writer lock").take() else {
            return Ok(());
        };
        let (done, wait) = oneshot::channel();
        if sender.send(Job::Close(done)).is_ok() {
            let _ = wait.await;
        }
        self.db.write().expect("db lock").take();
        Ok(())
    }
}
