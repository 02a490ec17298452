//! Sales that could not be stored. When the write of a sold lead fails, a buyer has already
//! accepted it: the record goes to a local, bounded, fsynced file (one JSON line per sale) and
//! is replayed into storage, oldest first, once storage answers again. The supplier still gets
//! the storage error (503); the spill only makes sure the buyer's purchase is never lost.

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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spilled {
    record: LeadRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idempotency: Option<(String, IdempotentAnswer)>,
}

struct Spill {
    path: PathBuf,
    entries: Vec<Spilled>,
}

/// Any store, plus the spill of sold leads its writes refused.
pub struct SpillingStore {
    inner: Arc<dyn LeadStore>,
    spill: tokio::sync::Mutex<Spill>,
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

    /// Offers the spilled sales to storage, oldest first, until one fails; returns how many
    /// were stored.
    pub async fn replay(&self) -> Result<usize, StorageError> {
        let mut spill = self.spill.lock().await;
        let mut stored = 0;
        let mut failure = None;
        for entry in &spill.entries {
            match self
                .inner
                .insert_lead(Arc::new(entry.record.clone()), entry.idempotency.clone())
                .await
            {
                Ok(()) => stored += 1,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if stored > 0 {
            spill.entries.drain(..stored);
            rewrite(&spill.path, &spill.entries)?;
            metrics::counter!(telemetry::STORAGE_SPILL_REPLAYED_TOTAL).increment(stored as u64);
            metrics::gauge!(telemetry::STORAGE_SPILL_PENDING).set(spill.entries.len() as f64);
            tracing::info!(stored, left = spill.entries.len(), "spilled sales stored");
        }
        match failure {
            Some(e) if stored == 0 => Err(e),
            _ => Ok(stored),
        }
    }

    async fn keep(&self, entry: Spilled) {
        let mut spill = self.spill.lock().await;
        let lead_id = entry.record.lead_id.clone();
        if spill.entries.len() >= self.max {
            metrics::counter!(telemetry::STORAGE_SPILL_DROPPED_TOTAL).increment(1);
            tracing::error!(lead_id = %lead_id, max = self.max, "spill file full: a sold lead is only in this log line: {}", serde_json::to_string(&entry.record).unwrap_or_default());
            return;
        }
        match append(&spill.path, &entry) {
            Ok(()) => {
                spill.entries.push(entry);
                metrics::counter!(telemetry::STORAGE_SPILLED_TOTAL).increment(1);
                metrics::gauge!(telemetry::STORAGE_SPILL_PENDING).set(spill.entries.len() as f64);
                tracing::warn!(lead_id = %lead_id, "sold lead spilled to {}; it is replayed when storage is back", spill.path.display());
            }
            Err(e) => {
                metrics::counter!(telemetry::STORAGE_SPILL_DROPPED_TOTAL).increment(1);
                tracing::error!(lead_id = %lead_id, error = %e, "sold lead could not be spilled: {}", serde_json::to_string(&entry.record).unwrap_or_default());
            }
        }
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
        if let (Err(_), Some((record, idempotency))) = (&result, backup) {
            self.keep(Spilled {
                record: Arc::unwrap_or_clone(record),
                idempotency,
            })
            .await;
        }
        result
    }

    async fn get_lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError> {
        self.inner.get_lead(lead_id).await
    }

    async fn update_lead(&self, record: LeadRecord) -> Result<(), StorageError> {
        self.inner.update_lead(record).await
    }

    async fn pending_due(
        &self,
        campaign_id: &str,
        due_ms: i64,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        self.inner.pending_due(campaign_id, due_ms, limit).await
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
