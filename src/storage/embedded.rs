//! The single-node store: redb (pure-Rust, copy-on-write B-trees, checksummed commits) behind
//! a write-ahead log. A dedicated writer thread takes every queued write as one group (group
//! commit): the group is appended to the log and synced (one `fdatasync` of a few KiB), then
//! applied to redb with a non-durable commit that readers see at once, and only then are the
//! writers answered. About once a second, and at close, a durable redb commit (checkpoint)
//! makes the log redundant and it starts again; at open, what the log holds beyond the last
//! checkpoint is applied again (`wal.rs`).

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tokio::sync::oneshot;

use super::wal;
use super::{IDEMPOTENCY_TTL_MS, IdempotentAnswer, LeadRecord, LeadStore, StorageError, day_of};
use crate::telemetry;

const LEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("leads");
/// Key `supplier \x1f day(20 digits) \x1f lead_id`, value empty: the supplier-by-day index.
const SUPPLIER_DAY: TableDefinition<&str, ()> = TableDefinition::new("supplier_day");
/// Key `supplier \x1f idempotency key`.
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// Key `campaign \x1f next_retry_ms(20 digits) \x1f lead_id`: the pending queue.
const PENDING: TableDefinition<&str, ()> = TableDefinition::new("pending");
/// Small named values (counters, breaker state).
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

const SEP: char = '\u{1f}';
/// Where the STATE table keeps the log's epoch (the log is replayed from that epoch on).
const WAL_EPOCH: &str = "\u{1f}wal_epoch";
const WAL_FILE: &str = "leadex.wal";
/// Size of the log file, allocated once. A group larger than this skips the log and is
/// committed durably to redb directly; the log is checkpointed early when it is full.
const WAL_CAPACITY: u64 = 8 << 20;
/// Default page cache (redb's own default is 1 GiB).
const CACHE_BYTES: usize = 64 << 20;
/// Default longest time between checkpoints while writes come in (and after the last).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

enum WriteOp {
    Insert(LeadRecord, Option<(String, IdempotentAnswer)>),
    Update(LeadRecord),
    State(String, Vec<u8>),
}

struct WriteJob {
    op: WriteOp,
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

fn pending_key(campaign: &str, due_ms: i64, lead_id: &str) -> String {
    format!("{campaign}{SEP}{:020}{SEP}{lead_id}", due_ms.max(0))
}

fn idem_key(supplier: &str, key: &str) -> String {
    format!("{supplier}{SEP}{key}")
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, and starts its writer thread.
    pub fn open(dir: &Path, group_commit_max: usize) -> Result<EmbeddedStore, StorageError> {
        EmbeddedStore::open_with(dir, group_commit_max, CHECKPOINT_EVERY, CACHE_BYTES)
    }

    /// As `open`, with the longest time between checkpoints and redb's cache size.
    pub fn open_with(
        dir: &Path,
        group_commit_max: usize,
        checkpoint_every: Duration,
        cache_bytes: usize,
    ) -> Result<EmbeddedStore, StorageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::Backend(format!("cannot create {}: {e}", dir.display())))?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(dir.join("leadex.redb"))
            .map_err(backend)?;
        {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(LEADS).map_err(backend)?;
            txn.open_table(SUPPLIER_DAY).map_err(backend)?;
            txn.open_table(IDEMPOTENCY).map_err(backend)?;
            txn.open_table(PENDING).map_err(backend)?;
            txn.open_table(STATE).map_err(backend)?;
            txn.commit().map_err(backend)?;
        }
        let wal = recover(&db, &dir.join(WAL_FILE))?;
        let db = Arc::new(db);
        let (tx, rx) = std_mpsc::channel();
        let writer_db = db.clone();
        let max = group_commit_max.max(1);
        std::thread::Builder::new()
            .name("leadex-store-writer".into())
            .spawn(move || {
                let closing = writer_loop(&writer_db, wal, &rx, max, checkpoint_every);
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

/// Opens the log, applies what it holds beyond the last checkpoint, and checkpoints: the
/// store starts with everything acknowledged before a crash in redb, durably.
fn recover(db: &Database, path: &Path) -> Result<wal::Wal, StorageError> {
    let epoch = {
        let txn = db.begin_read().map_err(backend)?;
        let state = txn.open_table(STATE).map_err(backend)?;
        match state.get(WAL_EPOCH).map_err(backend)? {
            Some(v) => u64::from_le_bytes(v.value().try_into().unwrap_or([0; 8])),
            None => 0,
        }
    };
    let (mut log, payloads) = wal::Wal::open(path, WAL_CAPACITY, epoch)
        .map_err(|e| StorageError::Backend(format!("write-ahead log {}: {e}", path.display())))?;
    let ops = payloads
        .iter()
        .map(|p| decode(p))
        .collect::<Result<Vec<_>, _>>()?;
    if !ops.is_empty() {
        tracing::info!(
            writes = ops.len(),
            "applying writes from the write-ahead log"
        );
    }
    let encoded = ops.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
    apply(db, &encoded, Some(epoch + 1), Durability::Immediate, true)?;
    log.restart(epoch + 1);
    Ok(log)
}

/// Commits queued writes in groups until closed; returns the closer's waiter.
fn writer_loop(
    db: &Database,
    mut log: wal::Wal,
    rx: &std_mpsc::Receiver<Job>,
    max: usize,
    checkpoint_every: Duration,
) -> Option<oneshot::Sender<()>> {
    let mut batch: Vec<Box<WriteJob>> = Vec::with_capacity(max);
    let mut closing = None;
    let mut framed = Vec::new();
    let mut last_checkpoint = Instant::now();
    while closing.is_none() {
        let first = if log.is_empty() {
            rx.recv()
                .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(checkpoint_every.saturating_sub(last_checkpoint.elapsed()))
        };
        match first {
            Ok(Job::Write(job)) => batch.push(job),
            Ok(Job::Close(done)) => closing = Some(done),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return None,
        }
        while batch.len() < max && closing.is_none() {
            match rx.try_recv() {
                Ok(Job::Write(job)) => batch.push(job),
                Ok(Job::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let started = Instant::now();
            let size = batch.len();
            let result = commit_group(db, &mut log, &batch, &mut framed, &mut last_checkpoint);
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
        let due = last_checkpoint.elapsed() >= checkpoint_every || closing.is_some();
        if due && !log.is_empty() {
            if let Err(e) = checkpoint(db, &mut log) {
                metrics::counter!(telemetry::STORAGE_ERRORS_TOTAL).increment(1);
                tracing::error!(error = %e, "storage checkpoint failed; the log keeps the writes");
            }
            last_checkpoint = Instant::now();
        }
    }
    closing
}

/// Makes one group durable (log append + sync, or a durable redb commit when the group is
/// larger than the log) and visible (redb commit).
fn commit_group(
    db: &Database,
    log: &mut wal::Wal,
    batch: &[Box<WriteJob>],
    framed: &mut Vec<u8>,
    last_checkpoint: &mut Instant,
) -> Result<(), StorageError> {
    let encoded = batch
        .iter()
        .map(|job| encode(&job.op))
        .collect::<Result<Vec<_>, _>>()?;
    framed.clear();
    let mut payload = Vec::new();
    for e in &encoded {
        payload.clear();
        e.write_payload(&mut payload);
        log.frame(&payload, framed);
    }
    if !log.fits(framed.len()) {
        checkpoint(db, log)?;
        *last_checkpoint = Instant::now();
    }
    if !log.fits(framed.len()) {
        // Larger than the whole log: straight to redb, durably.
        return apply(db, &encoded, None, Durability::Immediate, false);
    }
    log.append_durably(framed)
        .map_err(|e| StorageError::Backend(format!("write-ahead log: {e}")))?;
    apply(db, &encoded, None, Durability::None, false)
}

/// A durable redb commit of everything applied so far; the log then starts a new epoch.
fn checkpoint(db: &Database, log: &mut wal::Wal) -> Result<(), StorageError> {
    let next = log.epoch() + 1;
    apply(db, &[], Some(next), Durability::Immediate, false)?;
    log.restart(next);
    Ok(())
}

/// A write with its record already encoded once, for the log and for the table.
struct Encoded<'a> {
    op: &'a WriteOp,
    record: Vec<u8>,
    answer: Option<Vec<u8>>,
}

fn encode(op: &WriteOp) -> Result<Encoded<'_>, StorageError> {
    let (record, answer) = match op {
        WriteOp::Insert(r, idem) => (
            serde_json::to_vec(r).map_err(backend)?,
            idem.as_ref()
                .map(|(_, a)| serde_json::to_vec(a))
                .transpose()
                .map_err(backend)?,
        ),
        WriteOp::Update(r) => (serde_json::to_vec(r).map_err(backend)?, None),
        WriteOp::State(_, value) => (value.clone(), None),
    };
    Ok(Encoded { op, record, answer })
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl Encoded<'_> {
    /// `tag | record` (1: insert, 2: update), `| key | answer` for an insert with an
    /// Idempotency-Key (tag 3), `tag 4 | key | value` for a state write; each part
    /// length-prefixed.
    fn write_payload(&self, out: &mut Vec<u8>) {
        match self.op {
            WriteOp::Insert(_, None) => {
                out.push(1);
                put_bytes(out, &self.record);
            }
            WriteOp::Update(_) => {
                out.push(2);
                put_bytes(out, &self.record);
            }
            WriteOp::Insert(_, Some((key, _))) => {
                out.push(3);
                put_bytes(out, &self.record);
                put_bytes(out, key.as_bytes());
                put_bytes(out, self.answer.as_deref().unwrap_or_default());
            }
            WriteOp::State(key, _) => {
                out.push(4);
                put_bytes(out, key.as_bytes());
                put_bytes(out, &self.record);
            }
        }
    }
}

/// Reads back one log payload written by `write_payload`.
fn decode(payload: &[u8]) -> Result<WriteOp, StorageError> {
    fn corrupt() -> StorageError {
        StorageError::Corrupt("write-ahead log record does not parse".into())
    }
    let mut rest = payload.get(1..).ok_or_else(corrupt)?;
    let mut take = || -> Result<&[u8], StorageError> {
        let len = u32::from_le_bytes(rest.get(..4).ok_or_else(corrupt)?.try_into().expect("4"));
        let bytes = rest.get(4..4 + len as usize).ok_or_else(corrupt)?;
        rest = &rest[4 + len as usize..];
        Ok(bytes)
    };
    let record = |b: &[u8]| -> Result<LeadRecord, StorageError> {
        serde_json::from_slice(b).map_err(|e| StorageError::Corrupt(e.to_string()))
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| corrupt());
    Ok(match payload[0] {
        1 => WriteOp::Insert(record(take()?)?, None),
        2 => WriteOp::Update(record(take()?)?),
        3 => {
            let r = record(take()?)?;
            let key = text(take()?)?;
            let answer = serde_json::from_slice(take()?)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            WriteOp::Insert(r, Some((key, answer)))
        }
        4 => {
            let key = text(take()?)?;
            WriteOp::State(key, take()?.to_vec())
        }
        _ => return Err(corrupt()),
    })
}

/// Stores `record` (encoded: `bytes`) as its lead, dropping the pending-queue entry of the
/// version it replaces; the caller queues the new one.
fn replace_lead(
    leads: &mut redb::Table<&str, &[u8]>,
    pending: &mut redb::Table<&str, ()>,
    record: &LeadRecord,
    bytes: &[u8],
) -> Result<(), StorageError> {
    let previous: Option<LeadRecord> = match leads.get(record.lead_id.as_str()).map_err(backend)? {
        Some(stored) => serde_json::from_slice(stored.value()).ok(),
        None => None,
    };
    if let Some(due) = previous.and_then(|p| p.next_retry_ms) {
        pending
            .remove(pending_key(&record.campaign_id, due, &record.lead_id).as_str())
            .map_err(backend)?;
    }
    leads
        .insert(record.lead_id.as_str(), bytes)
        .map_err(backend)?;
    Ok(())
}

/// Applies writes to redb in one transaction (and the log epoch, at a checkpoint). Applying
/// a write again, as a replay (`replay`) may, gives the same tables; outside a replay an
/// insert is a new lead id, with no earlier version to look up.
fn apply(
    db: &Database,
    writes: &[Encoded<'_>],
    epoch: Option<u64>,
    durability: Durability,
    replay: bool,
) -> Result<(), StorageError> {
    let mut txn = db.begin_write().map_err(backend)?;
    txn.set_durability(durability).map_err(backend)?;
    {
        let mut leads = txn.open_table(LEADS).map_err(backend)?;
        let mut by_day = txn.open_table(SUPPLIER_DAY).map_err(backend)?;
        let mut idem = txn.open_table(IDEMPOTENCY).map_err(backend)?;
        let mut pending = txn.open_table(PENDING).map_err(backend)?;
        let mut state = txn.open_table(STATE).map_err(backend)?;
        for write in writes {
            match write.op {
                WriteOp::Insert(r, idempotency) => {
                    if replay {
                        // A replayed insert may find a newer version of its lead: its pending
                        // entry goes, as the later update it is followed by puts it back.
                        replace_lead(&mut leads, &mut pending, r, &write.record)?;
                    } else {
                        leads
                            .insert(r.lead_id.as_str(), write.record.as_slice())
                            .map_err(backend)?;
                    }
                    let key = day_key(&r.supplier_id, day_of(r.created_at_ms), &r.lead_id);
                    by_day.insert(key.as_str(), ()).map_err(backend)?;
                    if let Some(due) = r.next_retry_ms {
                        pending
                            .insert(pending_key(&r.campaign_id, due, &r.lead_id).as_str(), ())
                            .map_err(backend)?;
                    }
                    if let (Some((key, _)), Some(answer)) = (idempotency, &write.answer) {
                        idem.insert(idem_key(&r.supplier_id, key).as_str(), answer.as_slice())
                            .map_err(backend)?;
                    }
                }
                WriteOp::Update(r) => {
                    replace_lead(&mut leads, &mut pending, r, &write.record)?;
                    if let Some(due) = r.next_retry_ms {
                        pending
                            .insert(pending_key(&r.campaign_id, due, &r.lead_id).as_str(), ())
                            .map_err(backend)?;
                    }
                }
                WriteOp::State(key, _) => {
                    state
                        .insert(key.as_str(), write.record.as_slice())
                        .map_err(backend)?;
                }
            }
        }
        if let Some(epoch) = epoch {
            state
                .insert(WAL_EPOCH, epoch.to_le_bytes().as_slice())
                .map_err(backend)?;
        }
    }
    txn.commit().map_err(backend)
}

impl EmbeddedStore {
    async fn write(&self, op: WriteOp) -> Result<(), StorageError> {
        let (done, wait) = oneshot::channel();
        self.sender()?
            .send(Job::Write(Box::new(WriteJob { op, done })))
            .map_err(|_| StorageError::Closed)?;
        wait.await.map_err(|_| StorageError::Closed)?
    }
}

#[async_trait]
impl LeadStore for EmbeddedStore {
    async fn insert_lead(
        &self,
        record: LeadRecord,
        idempotency: Option<(String, IdempotentAnswer)>,
    ) -> Result<(), StorageError> {
        self.write(WriteOp::Insert(record, idempotency)).await
    }

    async fn update_lead(&self, record: LeadRecord) -> Result<(), StorageError> {
        self.write(WriteOp::Update(record)).await
    }

    async fn pending_due(
        &self,
        campaign_id: &str,
        due_ms: i64,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        let txn = self.db()?.begin_read().map_err(backend)?;
        let queue = txn.open_table(PENDING).map_err(backend)?;
        let leads = txn.open_table(LEADS).map_err(backend)?;
        let start = format!("{campaign_id}{SEP}");
        let end = pending_key(campaign_id, due_ms, "\u{7f}");
        let mut out = Vec::new();
        for entry in queue.range(start.as_str()..end.as_str()).map_err(backend)? {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry.map_err(backend)?;
            let Some(lead_id) = key.value().rsplit(SEP).next().map(str::to_owned) else {
                continue;
            };
            if let Some(bytes) = leads.get(lead_id.as_str()).map_err(backend)? {
                out.push(
                    serde_json::from_slice(bytes.value())
                        .map_err(|e| StorageError::Corrupt(e.to_string()))?,
                );
            }
        }
        Ok(out)
    }

    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<(), StorageError> {
        self.write(WriteOp::State(key.to_owned(), value)).await
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db()?.begin_read().map_err(backend)?;
        let table = txn.open_table(STATE).map_err(backend)?;
        Ok(table.get(key).map_err(backend)?.map(|v| v.value().to_vec()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LeadStatus;

    fn pending(lead_id: &str, due: Option<i64>) -> LeadRecord {
        LeadRecord {
            lead_id: lead_id.to_owned(),
            supplier_id: "sup-1".to_owned(),
            seller: "ACME1234".to_owned(),
            campaign_id: "acme-auto".to_owned(),
            created_at_ms: 1_795_000_000_000,
            status: if due.is_some() {
                LeadStatus::Pending
            } else {
                LeadStatus::Sold
            },
            price_cents: 0,
            buyer_ids: Vec::new(),
            fields: Default::default(),
            auction_log: Vec::new(),
            next_retry_ms: due,
        }
    }

    fn log_with(dir: &Path, epoch: u64, ops: &[WriteOp]) {
        let (mut log, _) = wal::Wal::open(&dir.join(WAL_FILE), WAL_CAPACITY, epoch).unwrap();
        let mut framed = Vec::new();
        for op in ops {
            let mut payload = Vec::new();
            encode(op).unwrap().write_payload(&mut payload);
            log.frame(&payload, &mut framed);
        }
        log.append_durably(&framed).unwrap();
    }

    #[tokio::test]
    async fn a_log_replayed_over_tables_that_already_hold_it_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ops = vec![
            WriteOp::Insert(pending("A", Some(100)), None),
            WriteOp::Update(pending("A", Some(200))),
            WriteOp::Insert(pending("B", Some(150)), None),
            WriteOp::Update(pending("B", None)),
            WriteOp::State("k".to_owned(), b"v".to_vec()),
        ];
        {
            // A crash between a checkpoint and the log's restart: the tables hold every write
            // already, at epoch 0, and so does the log.
            let db = Database::create(dir.path().join("leadex.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            for table in [LEADS, IDEMPOTENCY, STATE] {
                txn.open_table(table).unwrap();
            }
            txn.open_table(SUPPLIER_DAY).unwrap();
            txn.open_table(PENDING).unwrap();
            txn.commit().unwrap();
            let encoded: Vec<_> = ops.iter().map(|op| encode(op).unwrap()).collect();
            apply(&db, &encoded, Some(0), Durability::Immediate, true).unwrap();
        }
        log_with(dir.path(), 0, &ops);
        let store = EmbeddedStore::open(dir.path(), 64).unwrap();
        let due = store.pending_due("acme-auto", 1_000, 10).await.unwrap();
        assert_eq!(due, vec![pending("A", Some(200))]);
        assert_eq!(store.get_lead("B").await.unwrap(), Some(pending("B", None)));
        assert_eq!(store.get_state("k").await.unwrap(), Some(b"v".to_vec()));
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn log_records_of_an_older_epoch_are_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), 64).unwrap();
            store.close().await.unwrap();
        }
        // The store moved past epoch 0 when it first opened: a record of epoch 0 is old.
        log_with(
            dir.path(),
            0,
            &[WriteOp::Insert(pending("old", None), None)],
        );
        let store = EmbeddedStore::open(dir.path(), 64).unwrap();
        assert_eq!(store.get_lead("old").await.unwrap(), None);
        store.close().await.unwrap();
    }
}
