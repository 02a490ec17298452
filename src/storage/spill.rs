//! Sales that could not be stored. When the write of a sold lead fails, a buyer has already
//! accepted it: the record goes to a local, bounded, fsynced file (one JSON line per sale) and
//! is replayed into storage, oldest first, once storage answers again. A sale the spill took is
//! durably stored, so the write counts as done: the supplier is answered `sold` (a 503 would
//! have it send the lead again, to be sold a second time), and the node's reads see the spill
//! over the store: the lead by its id, its Idempotency-Key's answer, and a re-auctioned lead
//! that sold is no longer due. Only when the spill cannot take the sale either (full, or its
//! disk failing) does the write fail.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{IdempotentAnswer, LeadRecord, LeadStatus, LeadStore, StorageError};
use crate::telemetry;

/// How often a non-empty spill is offered to storage again.
pub const REPLAY_INTERVAL: Duration = Duration::from_secs(1);

/// Spilled sales copied out and written per step of a replay.
const REPLAY_BATCH: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spilled {
    record: LeadRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idempotency: Option<(String, IdempotentAnswer)>,
    /// A pending lead that sold when auctioned again: replayed as an update of its record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    update: bool,
    /// An update whose record's log holds only the events its re-auction added, after this
    /// many stored ones: replayed with `append_lead`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    appended_at: Option<usize>,
}

struct Spill {
    path: PathBuf,
    entries: Vec<Spilled>,
}

/// Any store, plus the spill of sold leads its writes refused.
pub struct SpillingStore {
    inner: Arc<dyn LeadStore>,
    /// Held only to read or change the entries, never across a write to storage: reads of
    /// the spill must not wait for a replay.
    spill: tokio::sync::Mutex<Spill>,
    /// One replay at a time (the background loop, a close, a test): entries leave the front
    /// of the spill only through it.
    replaying: tokio::sync::Mutex<()>,
    max: usize,
    closed: AtomicBool,
}

fn io_error(path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Backend(format!("spill file {}: {e}", path.display()))
}

impl SpillingStore {
    /// Wraps `inner`, loads what an earlier run left in `path`, and (inside a tokio runtime)
    /// starts replaying in the background. At most `max` sales are held.
    pub fn open(
        inner: Arc<dyn LeadStore>,
        path: &Path,
        max: usize,
    ) -> Result<Arc<SpillingStore>, StorageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
        let entries = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|line| !line.trim().is_empty())
                .filter_map(|line| match serde_json::from_str::<Spilled>(line) {
                    Ok(entry) => Some(entry),
                    Err(e) => {
                        // Only a line torn by a crash mid-append can be unreadable.
                        tracing::error!(error = %e, file = %path.display(), "unreadable spill line skipped");
                        None
                    }
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(path, e)),
        };
        if !entries.is_empty() {
            tracing::warn!(sales = entries.len(), file = %path.display(), "spilled sales found; replaying them into storage");
        }
        metrics::gauge!(telemetry::STORAGE_SPILL_PENDING).set(entries.len() as f64);
        let store = Arc::new(SpillingStore {
            inner,
            spill: tokio::sync::Mutex::new(Spill {
                path: path.to_owned(),
                entries,
            }),
            max: max.max(1),
            closed: AtomicBool::new(false),
            replaying: tokio::sync::Mutex::new(()),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(replay_loop(Arc::downgrade(&store)));
        }
        Ok(store)
    }

    /// Sales waiting in the spill.
    pub async fn spilled(&self) -> usize {
        self.spill.lock().await.entries.len()
    }

    /// Offers the spilled sales to storage, oldest first; returns how many were stored. After
    /// a refusal storage is pinged: if it does not answer, the replay ends and the sales stay
    /// in order. If it answers, the replay goes on, so a sale storage will not take for itself
    /// (too large, say) cannot hold up the ones behind it: at the end of a batch in which some
    /// were stored, those refused move behind the others and are offered again at the next
    /// replay. A batch in which none was stored ends the replay, in order. The entries are
    /// copied out a batch at a time and written without the spill's lock, so reads go on.
    pub async fn replay(&self) -> Result<usize, StorageError> {
        let _only = self.replaying.lock().await;
        let mut stored_total = 0;
        // Each sale is offered once a replay: those moved behind are not offered again.
        let mut left = self.spill.lock().await.entries.len();
        let mut last_error = None;
        while left > 0 {
            let batch: Vec<Spilled> = {
                let spill = self.spill.lock().await;
                let take = REPLAY_BATCH.min(left).min(spill.entries.len());
                spill.entries[..take].to_vec()
            };
            if batch.is_empty() {
                break;
            }
            left -= batch.len();
            let mut stored = vec![false; batch.len()];
            let mut down = false;
            for (i, entry) in batch.iter().enumerate() {
                // A later version of a lead whose sale was refused stays behind it.
                let lead_id = &entry.record.lead_id;
                if batch[..i]
                    .iter()
                    .zip(&stored)
                    .any(|(e, stored)| !stored && &e.record.lead_id == lead_id)
                {
                    continue;
                }
                let stored_now = if let Some(from) = entry.appended_at {
                    self.inner.append_lead(entry.record.clone(), from).await
                } else if entry.update {
                    self.inner.update_lead(entry.record.clone()).await
                } else {
                    self.inner
                        .insert_lead(Arc::new(entry.record.clone()), entry.idempotency.clone())
                        .await
                };
                match stored_now {
                    Ok(()) => stored[i] = true,
                    Err(e) => {
                        tracing::debug!(lead_id = %lead_id, error = %e, "spilled sale refused");
                        last_error = Some(e);
                        if self.inner.ping().await.is_err() {
                            down = true;
                            break;
                        }
                    }
                }
            }
            let Some(last_stored) = stored.iter().rposition(|s| *s) else {
                break;
            };
            let count = stored.iter().filter(|s| **s).count();
            {
                // Only a replay takes entries off the front, so these are the batch's.
                let mut spill = self.spill.lock().await;
                let rest = spill.entries.split_off(batch.len());
                let front = std::mem::replace(&mut spill.entries, rest);
                let mut kept = Vec::new();
                for (i, (entry, stored)) in front.into_iter().zip(&stored).enumerate() {
                    if *stored {
                        continue;
                    }
                    if i < last_stored {
                        tracing::error!(lead_id = %entry.record.lead_id, error = %last_error.as_ref().map(ToString::to_string).unwrap_or_default(), "storage refuses a spilled sale while it takes others; it stays in the spill and is offered again");
                    }
                    kept.push(entry);
                }
                if down {
                    // What was not stored stays in front, in order.
                    kept.append(&mut spill.entries);
                    spill.entries = kept;
                } else {
                    spill.entries.append(&mut kept);
                }
                rewrite(&spill.path, &spill.entries)?;
                metrics::counter!(telemetry::STORAGE_SPILL_REPLAYED_TOTAL).increment(count as u64);
                metrics::gauge!(telemetry::STORAGE_SPILL_PENDING).set(spill.entries.len() as f64);
                tracing::info!(
                    stored = count,
                    left = spill.entries.len(),
                    "spilled sales stored"
                );
            }
            stored_total += count;
            if down {
                break;
            }
        }
        match last_error {
            Some(e) if stored_total == 0 => Err(e),
            _ => Ok(stored_total),
        }
    }

    /// Appends `entry`, which storage refused with `cause`, to the spill: `Ok` once it is
    /// durably in the file, else `cause`.
    async fn keep(&self, entry: Spilled, cause: StorageError) -> Result<(), StorageError> {
        let mut spill = self.spill.lock().await;
        let lead_id = entry.record.lead_id.clone();
        if spill.entries.len() >= self.max {
            metrics::counter!(telemetry::STORAGE_SPILL_DROPPED_TOTAL).increment(1);
            tracing::error!(lead_id = %lead_id, max = self.max, error = %cause, "spill file full: a sold lead is only in this log line: {}", serde_json::to_string(&entry.record).unwrap_or_default());
            return Err(cause);
        }
        match append(&spill.path, &entry) {
            Ok(()) => {
                spill.entries.push(entry);
                metrics::counter!(telemetry::STORAGE_SPILLED_TOTAL).increment(1);
                metrics::gauge!(telemetry::STORAGE_SPILL_PENDING).set(spill.entries.len() as f64);
                tracing::warn!(lead_id = %lead_id, error = %cause, "storage refused a sold lead; it is in {} and replayed when storage is back", spill.path.display());
                Ok(())
            }
            Err(e) => {
                metrics::counter!(telemetry::STORAGE_SPILL_DROPPED_TOTAL).increment(1);
                tracing::error!(lead_id = %lead_id, error = %e, "sold lead could not be spilled: {}", serde_json::to_string(&entry.record).unwrap_or_default());
                Err(cause)
            }
        }
    }

    /// Updates the lead in storage (with `appended_at`, adds its record's log events after
    /// that many stored ones: `append_lead`); a re-auctioned lead that sold is spilled, to be
    /// written the same way, if storage refuses it.
    async fn update(
        &self,
        record: LeadRecord,
        appended_at: Option<usize>,
    ) -> Result<(), StorageError> {
        let write = |record: LeadRecord| async move {
            match appended_at {
                Some(from) => self.inner.append_lead(record, from).await,
                None => self.inner.update_lead(record).await,
            }
        };
        if record.status != LeadStatus::Sold {
            return write(record).await;
        }
        // A re-auctioned lead that sold: kept like a first sale, or the next tick would find it
        // still pending in the store and sell it again.
        let backup = record.clone();
        match write(record).await {
            Err(cause) => {
                let entry = Spilled {
                    record: backup,
                    idempotency: None,
                    update: true,
                    appended_at,
                };
                self.keep(entry, cause).await
            }
            ok => ok,
        }
    }

    /// The first `limit` of `due`, leaving out leads whose sale waits in the spill.
    async fn not_spilled<T>(
        &self,
        mut due: Vec<T>,
        lead_id: impl Fn(&T) -> &String,
        limit: usize,
    ) -> Vec<T> {
        let spill = self.spill.lock().await;
        if !spill.entries.is_empty() {
            due.retain(|lead| {
                !spill
                    .entries
                    .iter()
                    .any(|e| &e.record.lead_id == lead_id(lead))
            });
        }
        due.truncate(limit);
        due
    }

    /// The newest spilled version of `lead_id`, if the spill holds it.
    async fn spilled_lead(&self, lead_id: &str) -> Option<Spilled> {
        let spill = self.spill.lock().await;
        spill
            .entries
            .iter()
            .rev()
            .find(|e| e.record.lead_id == lead_id)
            .cloned()
    }
}

fn append(path: &Path, entry: &Spilled) -> Result<(), StorageError> {
    let mut line = serde_json::to_vec(entry).map_err(|e| StorageError::Backend(e.to_string()))?;
    line.push(b'\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    file.write_all(&line).map_err(|e| io_error(path, e))?;
    file.sync_data().map_err(|e| io_error(path, e))
}

/// Replaces the file with `entries` (written aside, synced, then renamed over it).
fn rewrite(path: &Path, entries: &[Spilled]) -> Result<(), StorageError> {
    let aside = path.with_extension("tmp");
    let mut text = Vec::new();
    for entry in entries {
        text.extend(serde_json::to_vec(entry).map_err(|e| StorageError::Backend(e.to_string()))?);
        text.push(b'\n');
    }
    let mut file = std::fs::File::create(&aside).map_err(|e| io_error(&aside, e))?;
    file.write_all(&text).map_err(|e| io_error(&aside, e))?;
    file.sync_all().map_err(|e| io_error(&aside, e))?;
    std::fs::rename(&aside, path).map_err(|e| io_error(path, e))
}

async fn replay_loop(store: Weak<SpillingStore>) {
    loop {
        tokio::time::sleep(REPLAY_INTERVAL).await;
        let Some(store) = store.upgrade() else {
            return;
        };
        if store.closed.load(Ordering::Acquire) {
            return;
        }
        if store.spilled().await > 0
            && let Err(e) = store.replay().await
        {
            tracing::debug!(error = %e, "storage still refuses spilled sales");
        }
    }
}

#[async_trait]
impl LeadStore for SpillingStore {
    async fn insert_lead(
        &self,
        record: Arc<LeadRecord>,
        idempotency: Option<(String, IdempotentAnswer)>,
    ) -> Result<(), StorageError> {
        // A sold lead is kept (shared, not copied) until the store has it.
        let backup =
            (record.status == LeadStatus::Sold).then(|| (record.clone(), idempotency.clone()));
        let result = self.inner.insert_lead(record, idempotency).await;
        match (result, backup) {
            (Err(cause), Some((record, idempotency))) => {
                let entry = Spilled {
                    record: Arc::unwrap_or_clone(record),
                    idempotency,
                    update: false,
                    appended_at: None,
                };
                self.keep(entry, cause).await
            }
            (result, _) => result,
        }
    }

    async fn held_locally(&self, lead_id: &str) -> bool {
        let spill = self.spill.lock().await;
        spill.entries.iter().any(|e| e.record.lead_id == lead_id)
    }

    async fn get_lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError> {
        let Some(entry) = self.spilled_lead(lead_id).await else {
            return self.inner.get_lead(lead_id).await;
        };
        let Some(from) = entry.appended_at else {
            return Ok(Some(entry.record));
        };
        // A re-auction's sale: its new events after the log as stored.
        let stored = self
            .inner
            .get_lead(lead_id)
            .await?
            .map(|stored| stored.auction_log)
            .unwrap_or_default();
        let (auction_log, _) = super::appended_log(stored, from, entry.record.auction_log);
        Ok(Some(LeadRecord {
            auction_log,
            ..entry.record
        }))
    }

    async fn get_lead_without_log(
        &self,
        lead_id: &str,
    ) -> Result<Option<LeadRecord>, StorageError> {
        if let Some(entry) = self.spilled_lead(lead_id).await {
            return Ok(Some(entry.record.without_log()));
        }
        self.inner.get_lead_without_log(lead_id).await
    }

    async fn get_lead_for_reauction(
        &self,
        lead_id: &str,
    ) -> Result<Option<(LeadRecord, usize)>, StorageError> {
        if let Some(entry) = self.spilled_lead(lead_id).await {
            let len = entry.appended_at.unwrap_or(0) + entry.record.auction_log.len();
            return Ok(Some((entry.record.without_log(), len)));
        }
        self.inner.get_lead_for_reauction(lead_id).await
    }

    async fn update_lead(&self, record: LeadRecord) -> Result<(), StorageError> {
        self.update(record, None).await
    }

    async fn append_lead(
        &self,
        record: LeadRecord,
        stored_log_len: usize,
    ) -> Result<(), StorageError> {
        self.update(record, Some(stored_log_len)).await
    }

    async fn pending_due_after(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        let spilled = self.spilled().await;
        // Leads sold since and waiting in the spill are no longer pending; as many more are
        // asked for, so they cannot fill every tick's list while due leads wait behind them.
        let due = self
            .inner
            .pending_due_after(campaign_id, due_ms, after, limit.saturating_add(spilled))
            .await?;
        Ok(self.not_spilled(due, |lead| &lead.lead_id, limit).await)
    }

    async fn pending_due_ids_after(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<(i64, String)>, StorageError> {
        let spilled = self.spilled().await;
        let due = self
            .inner
            .pending_due_ids_after(campaign_id, due_ms, after, limit.saturating_add(spilled))
            .await?;
        Ok(self.not_spilled(due, |(_, id)| id, limit).await)
    }

    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<(), StorageError> {
        self.inner.put_state(key, value).await
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get_state(key).await
    }

    async fn get_idempotent(
        &self,
        supplier_id: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<IdempotentAnswer>, StorageError> {
        let spilled = {
            let spill = self.spill.lock().await;
            spill
                .entries
                .iter()
                .rev()
                .find_map(|e| match &e.idempotency {
                    Some((k, answer))
                        if k == key
                            && e.record.supplier_id == supplier_id
                            && now_ms - answer.created_at_ms < super::IDEMPOTENCY_TTL_MS =>
                    {
                        Some(answer.clone())
                    }
                    _ => None,
                })
        };
        match spilled {
            Some(answer) => Ok(Some(answer)),
            None => self.inner.get_idempotent(supplier_id, key, now_ms).await,
        }
    }

    async fn leads_of_supplier_day(
        &self,
        supplier_id: &str,
        day: i64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        self.inner
            .leads_of_supplier_day(supplier_id, day, after, limit)
            .await
    }

    async fn ping(&self) -> Result<(), StorageError> {
        self.inner.ping().await
    }

    async fn close(&self) -> Result<(), StorageError> {
        self.closed.store(true, Ordering::Release);
        if self.spilled().await > 0
            && let Err(e) = self.replay().await
        {
            tracing::error!(error = %e, "spilled sales stay in the spill file until the next start");
        }
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::embedded::EmbeddedStore;

    /// The embedded store, whose writes fail while `failing` is set (reads still answer, its
    /// ping does not), and which never takes the leads in `refused`.
    struct Flaky {
        inner: EmbeddedStore,
        failing: AtomicBool,
        refused: std::sync::Mutex<Vec<String>>,
    }

    impl Flaky {
        fn new(dir: &Path) -> Arc<Flaky> {
            Arc::new(Flaky {
                inner: EmbeddedStore::open(&dir.join("data"), 64).unwrap(),
                failing: AtomicBool::new(false),
                refused: Default::default(),
            })
        }

        fn down(&self) -> Result<(), StorageError> {
            if self.failing.load(Ordering::Acquire) {
                Err(StorageError::Backend("writes refused".into()))
            } else {
                Ok(())
            }
        }

        fn refuse(&self, lead_id: &str) -> Result<(), StorageError> {
            self.down()?;
            if self.refused.lock().unwrap().iter().any(|id| id == lead_id) {
                return Err(StorageError::Backend(format!("{lead_id} is too large")));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl LeadStore for Flaky {
        async fn insert_lead(
            &self,
            record: Arc<LeadRecord>,
            idempotency: Option<(String, IdempotentAnswer)>,
        ) -> Result<(), StorageError> {
            self.refuse(&record.lead_id)?;
            self.inner.insert_lead(record, idempotency).await
        }
        async fn get_lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError> {
            self.inner.get_lead(lead_id).await
        }
        async fn update_lead(&self, record: LeadRecord) -> Result<(), StorageError> {
            self.refuse(&record.lead_id)?;
            self.inner.update_lead(record).await
        }
        async fn pending_due_after(
            &self,
            campaign_id: &str,
            due_ms: i64,
            after: Option<(i64, &str)>,
            limit: usize,
        ) -> Result<Vec<LeadRecord>, StorageError> {
            self.inner
                .pending_due_after(campaign_id, due_ms, after, limit)
                .await
        }
        async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<(), StorageError> {
            self.inner.put_state(key, value).await
        }
        async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
            self.inner.get_state(key).await
        }
        async fn get_idempotent(
            &self,
            supplier_id: &str,
            key: &str,
            now_ms: i64,
        ) -> Result<Option<IdempotentAnswer>, StorageError> {
            self.inner.get_idempotent(supplier_id, key, now_ms).await
        }
        async fn leads_of_supplier_day(
            &self,
            supplier_id: &str,
            day: i64,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<LeadRecord>, StorageError> {
            self.inner
                .leads_of_supplier_day(supplier_id, day, after, limit)
                .await
        }
        async fn ping(&self) -> Result<(), StorageError> {
            self.down()?;
            self.inner.ping().await
        }
        async fn close(&self) -> Result<(), StorageError> {
            self.inner.close().await
        }
    }

    fn pending(lead_id: &str) -> LeadRecord {
        LeadRecord {
            lead_id: lead_id.to_owned(),
            supplier_id: "sup-1".to_owned(),
            seller: "ACME1234".to_owned(),
            campaign_id: "acme-auto".to_owned(),
            created_at_ms: 1_795_000_000_000,
            status: LeadStatus::Pending,
            price_cents: 0,
            buyer_ids: Vec::new(),
            fields: Default::default(),
            auction_log: Vec::new(),
            next_retry_ms: Some(1_795_000_060_000),
        }
    }

    #[tokio::test]
    async fn a_pending_lead_that_sells_when_storage_refuses_is_spilled_and_no_longer_due() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Flaky::new(dir.path());
        let store =
            SpillingStore::open(flaky.clone(), &dir.path().join("spill.jsonl"), 10).unwrap();
        store
            .insert_lead(Arc::new(pending("L1")), None)
            .await
            .unwrap();
        store
            .insert_lead(Arc::new(pending("L2")), None)
            .await
            .unwrap();
        let due_at = 1_795_000_060_000;
        let due = |store: Arc<SpillingStore>| async move {
            let leads = store.pending_due("acme-auto", due_at, 10).await.unwrap();
            leads.into_iter().map(|l| l.lead_id).collect::<Vec<_>>()
        };
        assert_eq!(due(store.clone()).await, ["L1", "L2"]);

        // L1 sells when auctioned again, and storage refuses the update.
        flaky.failing.store(true, Ordering::Release);
        let mut sold = pending("L1");
        sold.status = LeadStatus::Sold;
        sold.price_cents = 2500;
        sold.buyer_ids = vec!["buyer-a".into()];
        sold.next_retry_ms = None;
        store.update_lead(sold.clone()).await.expect("spilled");
        assert_eq!(store.spilled().await, 1);
        // An update that is not a sale is not spilled: its failure is the caller's to see.
        let mut later = pending("L2");
        later.next_retry_ms = Some(due_at + 60_000);
        assert!(store.update_lead(later).await.is_err());
        assert_eq!(store.spilled().await, 1);
        // The store still lists L1 as due; the spill says it sold, so the next tick leaves it.
        assert_eq!(due(store.clone()).await, ["L2"]);
        assert_eq!(store.get_lead("L1").await.unwrap(), Some(sold.clone()));
        assert!(store.held_locally("L1").await && !store.held_locally("L2").await);
        // A tick asking for one lead gets L2: the spilled L1 does not take its place.
        let one = store.pending_due("acme-auto", due_at, 1).await.unwrap();
        assert_eq!(
            one.iter().map(|l| l.lead_id.as_str()).collect::<Vec<_>>(),
            ["L2"]
        );

        // Storage takes writes again: the sale is replayed as an update of the record.
        flaky.failing.store(false, Ordering::Release);
        store.replay().await.ok();
        assert_eq!(store.spilled().await, 0);
        assert!(!store.held_locally("L1").await);
        assert_eq!(flaky.get_lead("L1").await.unwrap(), Some(sold));
        assert_eq!(
            flaky
                .pending_due("acme-auto", due_at, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        store.close().await.unwrap();
    }

    fn ping_event(buyer: &str) -> crate::storage::AuctionEvent {
        crate::storage::AuctionEvent::Ping {
            buyer: buyer.into(),
            outcome: "no_bid".into(),
            bid_cents: None,
            latency_us: 900,
        }
    }

    #[tokio::test]
    async fn a_re_auction_sale_is_spilled_with_its_own_events_and_replayed_after_the_stored_log() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Flaky::new(dir.path());
        let path = dir.path().join("spill.jsonl");
        let store = SpillingStore::open(flaky.clone(), &path, 10).unwrap();
        let first = vec![ping_event("first-a"), ping_event("first-b")];
        let stored = LeadRecord {
            auction_log: first.clone(),
            ..pending("L1")
        };
        store.insert_lead(Arc::new(stored), None).await.unwrap();

        // L1 sells when auctioned again, and storage refuses the write.
        flaky.failing.store(true, Ordering::Release);
        let added = vec![ping_event("again-a"), ping_event("again-b")];
        let outcome = LeadRecord {
            auction_log: added.clone(),
            ..sold("L1")
        };
        store
            .append_lead(outcome.clone(), 2)
            .await
            .expect("spilled");
        let whole = LeadRecord {
            auction_log: [first, added].concat(),
            ..sold("L1")
        };
        // The spill holds the re-auction's events only; reads see them after the stored log.
        let spilled = std::fs::read_to_string(&path).unwrap();
        assert!(
            spilled.contains("again-a") && !spilled.contains("first-a"),
            "{spilled}"
        );
        assert_eq!(store.get_lead("L1").await.unwrap(), Some(whole.clone()));
        assert_eq!(
            store.get_lead_for_reauction("L1").await.unwrap(),
            Some((whole.head(), 4))
        );

        // Replayed once storage is back, and again as after a crash before the spill file was
        // rewritten: the events are stored once.
        let copy = dir.path().join("copy.jsonl");
        std::fs::copy(&path, &copy).unwrap();
        flaky.failing.store(false, Ordering::Release);
        store.replay().await.unwrap();
        assert_eq!(store.spilled().await, 0);
        assert_eq!(flaky.get_lead("L1").await.unwrap(), Some(whole.clone()));
        let again = SpillingStore::open(flaky.clone(), &copy, 10).unwrap();
        again.replay().await.unwrap();
        assert_eq!(again.spilled().await, 0);
        assert_eq!(flaky.get_lead("L1").await.unwrap(), Some(whole));
        store.close().await.unwrap();
    }

    fn sold(lead_id: &str) -> LeadRecord {
        LeadRecord {
            status: LeadStatus::Sold,
            price_cents: 1500,
            buyer_ids: vec!["buyer-a".into()],
            next_retry_ms: None,
            ..pending(lead_id)
        }
    }

    async fn spilled_ids(store: &SpillingStore) -> Vec<String> {
        let spill = store.spill.lock().await;
        spill
            .entries
            .iter()
            .map(|e| e.record.lead_id.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_sale_storage_will_not_take_does_not_hold_up_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Flaky::new(dir.path());
        let path = dir.path().join("spill.jsonl");
        let store = SpillingStore::open(flaky.clone(), &path, 10).unwrap();
        flaky.failing.store(true, Ordering::Release);
        for id in ["S1", "S2", "S3", "S4"] {
            store
                .insert_lead(Arc::new(sold(id)), None)
                .await
                .expect("spilled");
        }
        // Storage down (its ping fails too): nothing moves, and one refusal ends the replay.
        assert!(store.replay().await.is_err());
        assert_eq!(spilled_ids(&store).await, ["S1", "S2", "S3", "S4"]);

        // Storage back, but it will never take S1 and S2: S3 and S4 are stored behind them.
        flaky.failing.store(false, Ordering::Release);
        *flaky.refused.lock().unwrap() = vec!["S1".into(), "S2".into()];
        assert_eq!(store.replay().await.unwrap(), 2);
        assert_eq!(spilled_ids(&store).await, ["S1", "S2"]);
        for id in ["S3", "S4"] {
            assert_eq!(flaky.get_lead(id).await.unwrap(), Some(sold(id)));
        }
        assert_eq!(flaky.get_lead("S1").await.unwrap(), None);
        let file = std::fs::read_to_string(&path).unwrap();
        assert_eq!(file.lines().count(), 2);
        assert!(file.contains("\"S1\"") && file.contains("\"S2\"") && !file.contains("\"S3\""));
        // Offered again at each replay, kept while refused.
        assert!(store.replay().await.is_err());
        assert_eq!(spilled_ids(&store).await, ["S1", "S2"]);
        flaky.refused.lock().unwrap().clear();
        assert_eq!(store.replay().await.unwrap(), 2);
        assert!(spilled_ids(&store).await.is_empty());
        assert_eq!(flaky.get_lead("S1").await.unwrap(), Some(sold("S1")));
        store.close().await.unwrap();
    }
}
