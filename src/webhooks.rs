//! Supplier webhooks: when a pending lead is later sold or given up, the supplier's
//! `webhook_url` gets a POST signed with `X-Leadex-Signature: sha256=<hex HMAC-SHA256 of the
//! body>`. Body, signature and retry schedule are pure; `WebhookSender` does the I/O.
//!
//! A notification is written to the node's outbox file (`webhooks.jsonl` in the storage
//! folder, synced) before the lead's new status is stored (`prepare`), and each try's result
//! after it, so one not yet delivered when the process stops or crashes is tried again by the
//! next start. Records that come while the outbox is synced are appended and synced together.
//! A crash between the outbox line and the status leaves a notification of a status that may
//! never have been stored: the next start reads the lead of every notification not yet tried
//! and sends it only if the stored lead is the outcome it announces. A notification whose
//! status write failed is checked the same way (`unsure`): a failed write may still have been
//! applied. Delivery is at least once: a crash between a delivery and its record repeats it,
//! and a supplier tells repeats apart by `lead_id` and `event`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use metrics::{counter, gauge};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::buyers::WirePrice;
use crate::clock::now_ms;
use crate::domain::Price;
use crate::http::dto::rfc3339_ms;
use crate::storage::{LeadRecord, LeadStatus, LeadStore};
use crate::telemetry;

pub const SIGNATURE_HEADER: &str = "x-leadex-signature";
pub const EVENT_HEADER: &str = "x-leadex-event";

/// The longest wait between two tries.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(3600);
/// A notification is given up once its next try would come later than this after its first.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The outbox file is rewritten with only what is still to deliver once it holds this many
/// lines and four times as many as that.
const COMPACT_LINES: usize = 1024;

#[derive(Serialize)]
struct WebhookBody<'a> {
    event: &'static str,
    lead_id: &'a str,
    campaign: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<WirePrice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    buyer_ids: Option<&'a [String]>,
    created_at: String,
}

/// `lead.sold` or `lead.unsold`.
pub fn event_of(record: &LeadRecord) -> &'static str {
    match record.status {
        LeadStatus::Sold => "lead.sold",
        LeadStatus::Unsold => "lead.unsold",
        LeadStatus::Pending => "lead.pending",
    }
}

/// The JSON body sent for a lead's new status.
pub fn body(record: &LeadRecord) -> Vec<u8> {
    let sold = record.status == LeadStatus::Sold;
    serde_json::to_vec(&WebhookBody {
        event: event_of(record),
        lead_id: &record.lead_id,
        campaign: &record.campaign_id,
        status: record.status.as_str(),
        price: sold.then(|| WirePrice(Price::from_cents(record.price_cents))),
        buyer_ids: sold.then_some(record.buyer_ids.as_slice()),
        created_at: rfc3339_ms(record.created_at_ms),
    })
    .expect("webhook bodies always serialise")
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// When to try again after `attempts` failed tries of a notification first tried at
/// `first_at_ms`, the last of them ending at `now_ms`: 1 s after the first, then twice as long
/// each time up to an hour; `None` (give up) once that would be more than a day after the
/// first try.
pub fn next_try_ms(first_at_ms: i64, attempts: u32, now_ms: i64) -> Option<i64> {
    let wait = Duration::from_secs(1u64 << attempts.saturating_sub(1).min(12)).min(MAX_RETRY_WAIT);
    let at = now_ms + wait.as_millis() as i64;
    (at <= first_at_ms + GIVE_UP_AFTER.as_millis() as i64).then_some(at)
}

/// A notification as the outbox keeps it: the latest line of a lead and event wins, and a
/// `done` line ends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    pub lead_id: String,
    pub event: String,
    pub supplier_id: String,
    /// The body as first sent; each try signs it with the supplier's secret of the time.
    pub body: String,
    /// Tries made so far.
    pub attempts: u32,
    pub first_at_ms: i64,
    pub next_at_ms: i64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
}

impl Outgoing {
    fn key(&self) -> (String, String) {
        (self.lead_id.clone(), self.event.clone())
    }
}

/// What an outbox file says is still to deliver, and how many lines it has. A line a crash
/// tore mid-append (only the last can be) is skipped.
pub fn fold_outbox(text: &str) -> (Vec<Outgoing>, usize) {
    let mut open: HashMap<(String, String), Outgoing> = HashMap::new();
    let mut order = Vec::new();
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        lines += 1;
        match serde_json::from_str::<Outgoing>(line) {
            Ok(entry) if entry.done => {
                open.remove(&entry.key());
            }
            Ok(entry) => {
                let key = entry.key();
                if !open.contains_key(&key) {
                    order.push(key.clone());
                }
                open.insert(key, entry);
            }
            Err(e) => tracing::error!(error = %e, "unreadable webhook outbox line skipped"),
        }
    }
    let entries = order.into_iter().filter_map(|k| open.remove(&k)).collect();
    (entries, lines)
}

/// The outbox file and what it holds that is still to deliver.
struct Outbox {
    path: PathBuf,
    file: File,
    open: HashMap<(String, String), Outgoing>,
    lines: usize,
    /// Appends (or rewrites) synced since the file was opened.
    syncs: usize,
}

impl Outbox {
    /// Reads what an earlier run left in `path` and rewrites the file with only that.
    fn open(path: &Path) -> std::io::Result<(Outbox, Vec<Outgoing>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let (entries, _) = fold_outbox(&text);
        let open = entries.iter().map(|e| (e.key(), e.clone())).collect();
        let file = rewrite(path, &entries)?;
        let outbox = Outbox {
            path: path.to_owned(),
            file,
            open,
            lines: entries.len(),
            syncs: 0,
        };
        Ok((outbox, entries))
    }

    /// Records `entries` (each new, tried again, or done) durably: their lines are appended
    /// and synced once for all of them.
    fn record(&mut self, entries: &[Outgoing]) -> std::io::Result<()> {
        for entry in entries {
            if entry.done {
                self.open.remove(&entry.key());
            } else {
                self.open.insert(entry.key(), entry.clone());
            }
        }
        if self.lines >= COMPACT_LINES && self.lines >= 4 * self.open.len() {
            let mut open: Vec<Outgoing> = self.open.values().cloned().collect();
            open.sort_by_key(|e| e.first_at_ms);
            self.file = rewrite(&self.path, &open)?;
            self.lines = open.len();
        } else {
            let mut text = Vec::new();
            for entry in entries {
                serde_json::to_writer(&mut text, entry).map_err(std::io::Error::other)?;
                text.push(b'\n');
            }
            self.file.write_all(&text)?;
            self.file.sync_data()?;
            self.lines += entries.len();
        }
        self.syncs += 1;
        gauge!(telemetry::WEBHOOKS_WAITING).set(self.open.len() as f64);
        Ok(())
    }
}

/// Records waiting for the outbox, and whether a thread is writing them. Records that come
/// while one group is synced go together in the next: a tick that resolves many pending leads
/// at once pays a sync per group, not per lead.
#[derive(Default)]
struct OutboxQueue {
    waiting: Vec<(Outgoing, tokio::sync::oneshot::Sender<std::io::Result<()>>)>,
    writing: bool,
}

/// The outbox and the records queued for it.
struct SharedOutbox {
    outbox: Mutex<Outbox>,
    queue: Mutex<OutboxQueue>,
}

impl SharedOutbox {
    /// Writes queued records a group at a time until none is left (on a blocking thread).
    fn write_queued(&self) {
        /// Should this thread die mid-write, the records still queued are dropped (their
        /// `save` logs that they were not written) and the next `save` starts a writer:
        /// none waits for a writer that is gone.
        struct Writing<'a>(&'a Mutex<OutboxQueue>);
        impl Drop for Writing<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
                    queue.waiting.clear();
                    queue.writing = false;
                }
            }
        }
        let _writing = Writing(&self.queue);
        loop {
            let group = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if queue.waiting.is_empty() {
                    queue.writing = false;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let (entries, answers): (Vec<Outgoing>, Vec<_>) = group.into_iter().unzip();
            let written = self
                .outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(&entries);
            for answer in answers {
                let _ = answer.send(match &written {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
    }
}

/// Writes `entries` aside, syncs, renames it over `path` and syncs the folder; returns the
/// new file open for appending.
fn rewrite(path: &Path, entries: &[Outgoing]) -> std::io::Result<File> {
    let aside = path.with_extension("tmp");
    let mut text = Vec::new();
    for entry in entries {
        text.extend(serde_json::to_vec(entry).map_err(std::io::Error::other)?);
        text.push(b'\n');
    }
    let mut file = File::create(&aside)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&aside, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    std::fs::OpenOptions::new().append(true).open(path)
}

#[derive(Clone)]
pub struct WebhookTarget {
    pub url: String,
    pub secret: String,
}

/// Sends webhooks for suppliers that configured one.
#[derive(Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    targets: Arc<HashMap<String, WebhookTarget>>,
    /// `None`: notifications are kept in memory only (a sender for no supplier).
    outbox: Option<Arc<SharedOutbox>>,
    /// Where a notification an earlier run left untried is checked against its lead.
    store: Option<Arc<dyn LeadStore>>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// A notification recorded in the outbox before its lead's new status is stored: `confirm`
/// it once the status is stored, `cancel` it if it was not.
#[must_use = "a prepared notification is confirmed or cancelled"]
pub struct Prepared(Outgoing);

impl WebhookSender {
    /// A sender that keeps its notifications in memory only: for a node, or a test, whose
    /// suppliers have no webhook.
    pub fn new(targets: HashMap<String, WebhookTarget>) -> WebhookSender {
        WebhookSender {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .connect_timeout(Duration::from_secs(3))
                .user_agent(concat!("leadex/", env!("CARGO_PKG_VERSION")))
                // A 3xx is a failed delivery, retried like any other: the signed body goes
                // only to the `webhook_url` in the config.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a plain HTTP client builds"),
            targets: Arc::new(targets),
            outbox: None,
            store: None,
            stop: tokio::sync::watch::channel(false).0,
        }
    }

    /// A sender whose notifications wait in the outbox file at `path` until delivered or given
    /// up; starts delivering what an earlier run left there (inside a tokio runtime), once
    /// `store` shows that the status each one announces was stored.
    pub async fn with_outbox(
        targets: HashMap<String, WebhookTarget>,
        path: &Path,
        store: Arc<dyn LeadStore>,
    ) -> std::io::Result<WebhookSender> {
        let (outbox, left) = Outbox::open(path)?;
        gauge!(telemetry::WEBHOOKS_WAITING).set(left.len() as f64);
        let sender = WebhookSender {
            outbox: Some(Arc::new(SharedOutbox {
                outbox: Mutex::new(outbox),
                queue: Mutex::default(),
            })),
            store: Some(store),
            ..WebhookSender::new(targets)
        };
        if !left.is_empty() {
            tracing::info!(notifications = left.len(), file = %path.display(), "webhooks not yet delivered found; delivering them");
        }
        for entry in left {
            // A notification already tried was confirmed; one never tried may not have been.
            // One whose lead cannot be read now is checked again before its first try.
            let stored = match entry.attempts {
                0 => sender.status_stored(&entry).await.ok(),
                _ => Some(true),
            };
            match stored {
                Some(true) => sender.deliver_in_background(entry, false),
                Some(false) => sender.drop_unstored(entry).await,
                None => sender.deliver_in_background(entry, true),
            }
        }
        Ok(sender)
    }

    /// Whether the stored lead of `entry` is the outcome it announces (the same status, and
    /// for a sale the same price and buyers: a later re-auction may have sold it otherwise);
    /// an error when the lead cannot be read.
    async fn status_stored(&self, entry: &Outgoing) -> Result<bool, crate::storage::StorageError> {
        let Some(store) = &self.store else {
            return Ok(true);
        };
        let lead = store.get_lead_without_log(&entry.lead_id).await?;
        // The body names the event, status, price and buyers.
        Ok(lead.is_some_and(|lead| {
            lead.status != LeadStatus::Pending && body(&lead) == entry.body.as_bytes()
        }))
    }

    /// Ends a notification whose status was never stored (a crash came between the two).
    async fn drop_unstored(&self, mut entry: Outgoing) {
        tracing::warn!(lead_id = %entry.lead_id, event = %entry.event, "webhook not sent: the status it announces was never stored");
        entry.done = true;
        self.save(&entry).await;
    }

    /// Stops the deliveries in progress; what they had left stays in the outbox.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Records the lead's new status in the outbox for its supplier, if it has a webhook;
    /// returns once it is recorded. Called before the status is stored, so a crash between
    /// the two cannot lose the notification.
    pub async fn prepare(&self, record: &LeadRecord) -> Option<Prepared> {
        if !self.targets.contains_key(&record.supplier_id) {
            return None;
        }
        let now = now_ms();
        let entry = Outgoing {
            lead_id: record.lead_id.clone(),
            event: event_of(record).to_owned(),
            supplier_id: record.supplier_id.clone(),
            body: String::from_utf8(body(record)).expect("serde_json writes UTF-8"),
            attempts: 0,
            first_at_ms: now,
            next_at_ms: now,
            done: false,
        };
        self.save(&entry).await;
        Some(Prepared(entry))
    }

    /// The status is stored: delivery starts.
    pub fn confirm(&self, prepared: Prepared) {
        self.deliver_in_background(prepared.0, false);
    }

    /// Storing the status failed, and a failed write may still have been applied (a
    /// ScyllaDB timeout after the replicas wrote it): the lead is read back, and the
    /// notification sent only if the stored lead is the outcome it announces, ended unsent if
    /// not (a read that fails is tried again on the retry schedule).
    pub fn unsure(&self, prepared: Prepared) {
        self.deliver_in_background(prepared.0, true);
    }

    /// The status was not stored: the notification is ended unsent.
    pub async fn cancel(&self, prepared: Prepared) {
        let mut entry = prepared.0;
        entry.done = true;
        self.save(&entry).await;
    }

    async fn save(&self, entry: &Outgoing) {
        let Some(shared) = self.outbox.clone() else {
            return;
        };
        let (answer, written) = tokio::sync::oneshot::channel();
        let start_writer = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.waiting.push((entry.clone(), answer));
            !std::mem::replace(&mut queue.writing, true)
        };
        if start_writer {
            let writer = shared.clone();
            tokio::task::spawn_blocking(move || writer.write_queued());
        }
        match written.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let path = shared
                    .outbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .path
                    .clone();
                tracing::error!(file = %path.display(), error = %e, "webhook outbox not written: this notification is not kept over a restart")
            }
            Err(_) => tracing::error!("webhook outbox write did not finish"),
        }
    }

    /// Delivers `entry` in its own task; `check` first waits until its lead can be read and
    /// sends it only if the status it announces was stored.
    fn deliver_in_background(&self, entry: Outgoing, check: bool) {
        let sender = self.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = sender.deliver(entry, check) => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
        });
    }

    /// Tries `entry` until it is delivered or given up, recording each try. With `check` it is
    /// first checked against its stored lead (a read that fails is tried again on the retry
    /// schedule).
    async fn deliver(&self, mut entry: Outgoing, check: bool) {
        if check {
            let mut checks = 0;
            loop {
                match self.status_stored(&entry).await {
                    Ok(true) => break,
                    Ok(false) => return self.drop_unstored(entry).await,
                    Err(e) => {
                        checks += 1;
                        let Some(at) = next_try_ms(entry.first_at_ms, checks, now_ms()) else {
                            tracing::warn!(lead_id = %entry.lead_id, event = %entry.event, error = %e, "webhook given up: its lead could not be read");
                            entry.done = true;
                            return self.save(&entry).await;
                        };
                        tracing::warn!(lead_id = %entry.lead_id, error = %e, "webhook waits: its lead could not be read");
                        tokio::time::sleep(Duration::from_millis((at - now_ms()).max(0) as u64))
                            .await;
                    }
                }
            }
        }
        loop {
            let wait = entry.next_at_ms - now_ms();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
            let Some(target) = self.targets.get(&entry.supplier_id) else {
                counter!(telemetry::WEBHOOKS_TOTAL, "outcome" => "failed").increment(1);
                tracing::warn!(lead_id = %entry.lead_id, event = %entry.event, supplier = %entry.supplier_id, "webhook given up: the supplier has no webhook_url any more");
                entry.done = true;
                return self.save(&entry).await;
            };
            entry.attempts += 1;
            let sent = self
                .client
                .post(&target.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(
                    SIGNATURE_HEADER,
                    signature(&target.secret, entry.body.as_bytes()),
                )
                .header(EVENT_HEADER, &entry.event)
                .body(entry.body.clone())
                .send()
                .await;
            let (lead_id, event, attempt) = (&entry.lead_id, &entry.event, entry.attempts);
            if matches!(&sent, Ok(r) if r.status().is_success()) {
                counter!(telemetry::WEBHOOKS_TOTAL, "outcome" => "delivered").increment(1);
                tracing::info!(lead_id = %lead_id, event = %event, attempt, "webhook delivered");
                entry.done = true;
                return self.save(&entry).await;
            }
            let why = match sent {
                Ok(r) => format!("status {}", r.status().as_u16()),
                Err(e) => telemetry::error_chain(&e),
            };
            match next_try_ms(entry.first_at_ms, entry.attempts, now_ms()) {
                Some(at) => {
                    counter!(telemetry::WEBHOOKS_TOTAL, "outcome" => "retry").increment(1);
                    tracing::info!(lead_id = %lead_id, event = %event, attempt, why, "webhook failed, will retry");
                    entry.next_at_ms = at;
                    self.save(&entry).await;
                }
                None => {
                    counter!(telemetry::WEBHOOKS_TOTAL, "outcome" => "failed").increment(1);
                    tracing::warn!(lead_id = %lead_id, event = %event, attempt, why, "webhook given up");
                    entry.done = true;
                    return self.save(&entry).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn retries_back_off_to_an_hour_and_end_a_day_after_the_first_try() {
        let first = 1_000_000;
        // Each wait counted from the end of the try before it.
        let waits: Vec<i64> = (1..=14)
            .map(|attempts| next_try_ms(first, attempts, first).unwrap() - first)
            .collect();
        assert_eq!(
            waits,
            [
                1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600
            ]
            .map(|s| s * 1000)
        );
        assert_eq!(
            next_try_ms(first, 40, first + 22 * 3_600_000),
            Some(first + 23 * 3_600_000)
        );
        assert_eq!(
            next_try_ms(first, 40, first + 23 * 3_600_000),
            Some(first + 24 * 3_600_000)
        );
        assert_eq!(next_try_ms(first, 40, first + 23 * 3_600_000 + 1), None);
    }

    fn outgoing(lead: &str, attempts: u32, done: bool) -> Outgoing {
        Outgoing {
            lead_id: lead.into(),
            event: "lead.sold".into(),
            supplier_id: "s".into(),
            body: format!("{{\"lead_id\":\"{lead}\"}}"),
            attempts,
            first_at_ms: 5,
            next_at_ms: 5 + attempts as i64 * 1000,
            done,
        }
    }

    fn lines(entries: &[Outgoing]) -> String {
        entries
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect()
    }

    #[test]
    fn the_outbox_keeps_the_last_line_of_each_notification_until_it_is_done() {
        let mut text = lines(&[
            outgoing("L1", 0, false),
            outgoing("L2", 0, false),
            outgoing("L1", 1, false),
            outgoing("L3", 0, false),
            outgoing("L2", 1, true),
            outgoing("L1", 2, false),
        ]);
        // The same lead's other event is another notification.
        let mut unsold = outgoing("L3", 0, false);
        unsold.event = "lead.unsold".into();
        text += &lines(&[unsold.clone()]);
        // A line torn by a crash mid-append.
        text += "{\"lead_id\":\"L4\",\"ev";
        let (open, count) = fold_outbox(&text);
        assert_eq!(count, 8);
        assert_eq!(
            open,
            vec![outgoing("L1", 2, false), outgoing("L3", 0, false), unsold]
        );
    }

    #[test]
    fn the_outbox_file_survives_a_reopen_and_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("webhooks.jsonl");
        let (mut outbox, left) = Outbox::open(&path).unwrap();
        assert!(left.is_empty());
        for n in 0..COMPACT_LINES {
            outbox
                .record(&[outgoing(&format!("L{n}"), 0, false)])
                .unwrap();
            if n > 0 {
                outbox
                    .record(&[outgoing(&format!("L{}", n - 1), 1, true)])
                    .unwrap();
            }
        }
        // Past the threshold the file holds only what is still open.
        assert!(outbox.lines < COMPACT_LINES, "{}", outbox.lines);
        outbox.record(&[outgoing("L1", 3, false)]).unwrap();
        drop(outbox);
        let (reopened, left) = Outbox::open(&path).unwrap();
        let mut ids: Vec<_> = left
            .iter()
            .map(|e| (e.lead_id.clone(), e.attempts))
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            vec![("L1".to_owned(), 3), (format!("L{}", COMPACT_LINES - 1), 0)]
        );
        assert_eq!(reopened.lines, 2);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }

    /// Lead `lead_id` of supplier `s`, sold for 12.50 to buyer `b`.
    fn sold(lead_id: &str) -> LeadRecord {
        LeadRecord {
            lead_id: lead_id.into(),
            supplier_id: "s".into(),
            seller: "ACME1234".into(),
            campaign_id: "c".into(),
            created_at_ms: 0,
            status: LeadStatus::Sold,
            price_cents: 1250,
            buyer_ids: vec!["b".into()],
            fields: Default::default(),
            auction_log: vec![],
            next_retry_ms: None,
        }
    }

    #[test]
    fn body_names_the_event_and_the_sale() {
        let record = sold("L1");
        let text = String::from_utf8(body(&record)).unwrap();
        assert_eq!(
            text,
            r#"{"event":"lead.sold","lead_id":"L1","campaign":"c","status":"sold","price":12.50,"buyer_ids":["b"],"created_at":"1970-01-01T00:00:00.000Z"}"#
        );
        let unsold = LeadRecord {
            status: LeadStatus::Unsold,
            ..record
        };
        let text = String::from_utf8(body(&unsold)).unwrap();
        assert!(
            text.starts_with(r#"{"event":"lead.unsold""#) && !text.contains("price"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notifications_recorded_at_once_share_their_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::storage::embedded::EmbeddedStore::open(&dir.path().join("store"), 64).unwrap();
        let targets = HashMap::from([(
            "s".to_owned(),
            WebhookTarget {
                url: "http://127.0.0.1:9/hook".into(),
                secret: "k".into(),
            },
        )]);
        let path = dir.path().join("webhooks.jsonl");
        let sender = WebhookSender::with_outbox(targets, &path, Arc::new(store))
            .await
            .unwrap();
        let syncs = || sender.outbox.as_ref().unwrap().outbox.lock().unwrap().syncs;
        let records: Vec<LeadRecord> = (0..200).map(|n| sold(&format!("L{n}"))).collect();
        let prepared = futures::future::join_all(records.iter().map(|r| sender.prepare(r))).await;
        // Each is in the file once `prepare` returns, and they went in fewer syncs than lines.
        let (open, lines) = fold_outbox(&std::fs::read_to_string(&path).unwrap());
        assert_eq!((open.len(), lines), (200, 200));
        let after_prepare = syncs();
        assert!(
            after_prepare < 100,
            "{after_prepare} syncs for 200 notifications"
        );
        futures::future::join_all(prepared.into_iter().map(|p| sender.cancel(p.unwrap()))).await;
        let (open, lines) = fold_outbox(&std::fs::read_to_string(&path).unwrap());
        assert_eq!((open.len(), lines), (0, 400));
        assert!(
            syncs() - after_prepare < 100,
            "{} syncs",
            syncs() - after_prepare
        );
    }
}
