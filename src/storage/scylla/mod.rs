//! The cluster store: ScyllaDB (or Cassandra) through the `scylla` driver. One session,
//! token-aware, every statement prepared once at open; each write is one logged batch
//! acknowledged at the configured consistency. Reads never depend on server-side order, TTL
//! or range restrictions: partitions are small by design (hour buckets), read whole with
//! paging, and sorted here by their time-sortable ids. Layout and sizes: deploy/scylla/README.md.

pub mod schema;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt, stream};
use scylla::DeserializeRow;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::retry::DefaultRetryPolicy;
use scylla::policies::speculative_execution::SimpleSpeculativeExecutionPolicy;
use scylla::serialize::row::SerializeRow;
use scylla::statement::Consistency;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::{
    AuctionEvent, IDEMPOTENCY_TTL_MS, IdempotentAnswer, LeadRecord, LeadStatus, LeadStore,
    StorageError, day_of,
};
use crate::config::StorageConfig;
use crate::telemetry;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// Point reads in flight at once when a listing fetches its leads.
const FETCH_CONCURRENCY: usize = 16;
/// An empty pending bucket this much older than now is forgotten.
const BUCKET_GRACE_MS: i64 = HOUR_MS;

pub(crate) fn backend<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Backend(e.to_string())
}

/// `local_quorum` and friends, as configured.
pub fn parse_consistency(name: &str) -> Option<Consistency> {
    Some(match name.to_ascii_lowercase().as_str() {
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        _ => return None,
    })
}

/// One session to the cluster: token-aware (preferring `local_datacenter` when set), with
/// timeouts, the default retry policy and speculative execution of idempotent statements.
pub async fn connect(config: &StorageConfig) -> Result<Session, StorageError> {
    let consistency = parse_consistency(&config.consistency).ok_or_else(|| {
        StorageError::Backend(format!("unknown consistency `{}`", config.consistency))
    })?;
    let mut balancing = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &config.local_datacenter {
        balancing = balancing
            .prefer_datacenter(dc.clone())
            .permit_dc_failover(false);
    }
    let profile = ExecutionProfile::builder()
        .consistency(consistency)
        .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
        .load_balancing_policy(balancing.build())
        .retry_policy(Arc::new(DefaultRetryPolicy::new()))
        .speculative_execution_policy(Some(Arc::new(SimpleSpeculativeExecutionPolicy {
            max_retry_count: 1,
            retry_interval: Duration::from_millis(config.speculative_delay_ms.max(1)),
        })))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.nodes)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .auto_await_schema_agreement(config.await_schema_agreement);
    if let (Some(user), Some(password)) = (&config.username, &config.password) {
        builder = builder.user(user, password);
    }
    builder.build().await.map_err(|e| {
        StorageError::Backend(format!(
            "cannot connect to ScyllaDB at {}: {e}",
            config.nodes.join(", ")
        ))
    })
}

struct Statements {
    insert_lead: PreparedStatement,
    insert_log: PreparedStatement,
    insert_by_day: PreparedStatement,
    insert_pending: PreparedStatement,
    insert_pending_bucket: PreparedStatement,
    delete_pending: PreparedStatement,
    delete_pending_bucket: PreparedStatement,
    insert_idempotency: PreparedStatement,
    put_state: PreparedStatement,
    select_lead: PreparedStatement,
    select_log: PreparedStatement,
    select_queue_entry: PreparedStatement,
    select_by_day: PreparedStatement,
    select_pending_buckets: PreparedStatement,
    select_pending: PreparedStatement,
    select_idempotency: PreparedStatement,
    select_state: PreparedStatement,
}

impl Statements {
    async fn prepare(
        session: &Session,
        ks: &str,
        page_size: u32,
    ) -> Result<Statements, StorageError> {
        let prepare = |cql: String| async move {
            let mut statement = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| StorageError::Backend(format!("prepare `{cql}`: {e}")))?;
            // Upserts and single-row reads and deletes: safe to retry and to speculate.
            statement.set_is_idempotent(true);
            statement.set_page_size(page_size.clamp(1, 100_000) as i32);
            Ok::<_, StorageError>(statement)
        };
        Ok(Statements {
            insert_lead: prepare(format!(
                "INSERT INTO {ks}.leads (lead_id, supplier_id, seller, campaign_id, created_at_ms, status, price_cents, buyer_ids, fields, next_retry_ms, log_len) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            insert_log: prepare(format!(
                "INSERT INTO {ks}.auction_log (lead_id, seq, event, buyer, detail) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            insert_by_day: prepare(format!(
                "INSERT INTO {ks}.leads_by_supplier_day (supplier_id, day, hour, lead_id, created_at_ms) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            insert_pending: prepare(format!(
                "INSERT INTO {ks}.pending_leads (campaign_id, bucket, due_ms, lead_id) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            insert_pending_bucket: prepare(format!(
                "INSERT INTO {ks}.pending_buckets (campaign_id, bucket) VALUES (?, ?)"
            ))
            .await?,
            delete_pending: prepare(format!(
                "DELETE FROM {ks}.pending_leads WHERE campaign_id = ? AND bucket = ? AND due_ms = ? AND lead_id = ?"
            ))
            .await?,
            delete_pending_bucket: prepare(format!(
                "DELETE FROM {ks}.pending_buckets WHERE campaign_id = ? AND bucket = ?"
            ))
            .await?,
            insert_idempotency: prepare(format!(
                "INSERT INTO {ks}.idempotency (supplier_id, idem_key, lead_id, body, created_at_ms) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            put_state: prepare(format!(
                "INSERT INTO {ks}.state (name, value) VALUES (?, ?)"
            ))
            .await?,
            select_lead: prepare(format!(
                "SELECT lead_id, supplier_id, seller, campaign_id, created_at_ms, status, price_cents, buyer_ids, fields, next_retry_ms, log_len FROM {ks}.leads WHERE lead_id = ?"
            ))
            .await?,
            select_log: prepare(format!(
                "SELECT seq, detail FROM {ks}.auction_log WHERE lead_id = ?"
            ))
            .await?,
            select_queue_entry: prepare(format!(
                "SELECT campaign_id, next_retry_ms, log_len FROM {ks}.leads WHERE lead_id = ?"
            ))
            .await?,
            select_by_day: prepare(format!(
                "SELECT lead_id FROM {ks}.leads_by_supplier_day WHERE supplier_id = ? AND day = ? AND hour = ?"
            ))
            .await?,
            select_pending_buckets: prepare(format!(
                "SELECT bucket FROM {ks}.pending_buckets WHERE campaign_id = ?"
            ))
            .await?,
            select_pending: prepare(format!(
                "SELECT due_ms, lead_id FROM {ks}.pending_leads WHERE campaign_id = ? AND bucket = ?"
            ))
            .await?,
            select_idempotency: prepare(format!(
                "SELECT lead_id, body, created_at_ms FROM {ks}.idempotency WHERE supplier_id = ? AND idem_key = ?"
            ))
            .await?,
            select_state: prepare(format!(
                "SELECT value FROM {ks}.state WHERE name = ?"
            ))
            .await?,
        })
    }
}

#[derive(DeserializeRow)]
struct LeadRow {
    lead_id: String,
    supplier_id: String,
    seller: String,
    campaign_id: String,
    created_at_ms: i64,
    status: String,
    price_cents: i64,
    buyer_ids: Option<Vec<String>>,
    fields: String,
    next_retry_ms: Option<i64>,
    log_len: i64,
}

#[derive(DeserializeRow)]
struct LogRow {
    seq: i64,
    detail: String,
}

#[derive(DeserializeRow)]
struct QueueEntryRow {
    campaign_id: String,
    next_retry_ms: Option<i64>,
    log_len: Option<i64>,
}

/// Auction-log rows an update writes in one batch of its own, before the lead's row.
const LOG_ROWS_PER_BATCH: usize = 50;

#[derive(DeserializeRow)]
struct PendingRow {
    due_ms: i64,
    lead_id: String,
}

#[derive(DeserializeRow)]
struct IdempotencyRow {
    lead_id: String,
    body: String,
    created_at_ms: i64,
}

type Values = Box<dyn SerializeRow + Send + Sync>;

/// `next_retry_ms` of a lead that is not queued (the column is never null).
const NOT_QUEUED: i64 = -1;

fn event_name(event: &AuctionEvent) -> (&'static str, &str) {
    match event {
        AuctionEvent::Ping { buyer, .. } => ("ping", buyer),
        AuctionEvent::Direct { buyer, .. } => ("direct", buyer),
        AuctionEvent::Dropped { buyer, .. } => ("dropped", buyer),
        AuctionEvent::Skipped { buyer, .. } => ("skipped", buyer),
        AuctionEvent::Post { buyer, .. } => ("post", buyer),
    }
}

fn corrupt(lead_id: &str, what: &str) -> StorageError {
    StorageError::Corrupt(format!("lead {lead_id}: {what}"))
}

fn status_of(lead_id: &str, status: &str) -> Result<LeadStatus, StorageError> {
    match status {
        "sold" => Ok(LeadStatus::Sold),
        "pending" => Ok(LeadStatus::Pending),
        "unsold" => Ok(LeadStatus::Unsold),
        other => Err(corrupt(lead_id, &format!("unknown status `{other}`"))),
    }
}

/// (day, hour of the day) of a lead's creation: its supplier-by-day partition.
fn day_hour(created_at_ms: i64) -> (i64, i64) {
    let day = day_of(created_at_ms);
    (day, (created_at_ms - day * DAY_MS) / HOUR_MS)
}

fn pending_bucket(due_ms: i64) -> i64 {
    due_ms.div_euclid(HOUR_MS)
}

struct Connected {
    session: Session,
    statements: Statements,
}

pub struct ScyllaStore {
    /// `None` once closed.
    inner: RwLock<Option<Arc<Connected>>>,
}

impl ScyllaStore {
    /// Connects, checks that the schema is there (`leadex migrate` creates it) and prepares
    /// every statement.
    pub async fn open(config: &StorageConfig) -> Result<ScyllaStore, StorageError> {
        let session = connect(config).await?;
        schema::check(&session, &config.keyspace).await?;
        let statements = Statements::prepare(&session, &config.keyspace, config.page_size).await?;
        Ok(ScyllaStore {
            inner: RwLock::new(Some(Arc::new(Connected {
                session,
                statements,
            }))),
        })
    }

    fn connected(&self) -> Result<Arc<Connected>, StorageError> {
        self.inner
            .read()
            .expect("store lock")
            .clone()
            .ok_or(StorageError::Closed)
    }
}

impl Connected {
    /// Every row of a partition, page by page (a partition may hold more than one page).
    async fn all_rows<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, StorageError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm> + Send + 'static,
    {
        self.session
            .execute_iter(statement.clone(), values)
            .await
            .map_err(backend)?
            .rows_stream::<R>()
            .map_err(backend)?
            .try_collect()
            .await
            .map_err(backend)
    }

    async fn one_row<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Option<R>, StorageError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(backend)?
            .into_rows_result()
            .map_err(backend)?
            .maybe_first_row::<R>()
            .map_err(backend)
    }

    /// Runs `parts` as one logged batch: all of it is applied, or the write fails.
    async fn write(&self, parts: Vec<(&PreparedStatement, Values)>) -> Result<(), StorageError> {
        let started = Instant::now();
        let mut batch = Batch::new(BatchType::Logged);
        batch.set_is_idempotent(true);
        let mut values = Vec::with_capacity(parts.len());
        for (statement, row) in parts {
            batch.append_statement(statement.clone());
            values.push(row);
        }
        let size = values.len();
        let result = self.session.batch(&batch, values).await.map_err(backend);
        metrics::histogram!(telemetry::STORAGE_WRITE_DURATION)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(telemetry::STORAGE_BATCH_SIZE).record(size as f64);
        if let Err(e) = &result {
            metrics::counter!(telemetry::STORAGE_ERRORS_TOTAL).increment(1);
            tracing::error!(error = %e, statements = size, "storage write failed");
        }
        result.map(|_| ())
    }

    /// Stores `record` over the lead. With `appended_at` (a re-auction's outcome) its
    /// auction log holds only the events that auction added, after the first `appended_at`
    /// stored ones (see `LeadStore::append_lead`); without, it is the whole log.
    async fn update_lead(
        &self,
        record: LeadRecord,
        appended_at: Option<usize>,
    ) -> Result<(), StorageError> {
        let previous = self
            .one_row::<QueueEntryRow>(
                &self.statements.select_queue_entry,
                (record.lead_id.as_str(),),
            )
            .await?;
        // The auction log's rows go first, in batches of their own, and the lead's row with
        // its new `log_len` after them. Written in the lead's batch, a log that grew with each
        // re-auction made that batch larger each time, until a lead pending for hours passed
        // the cluster's batch size limit and every later update of it failed. Rows past the
        // stored `log_len` are not read, so rows written before a failed update stay unseen.
        // A re-auction writes only the events it added, or a lead auctioned every minute for
        // a day would rewrite thousands of rows each time.
        let stored = previous
            .as_ref()
            .and_then(|p| p.log_len)
            .map(|len| len.max(0) as usize);
        let first = match (appended_at, stored) {
            (None, _) | (Some(_), None) => 0,
            (Some(from), Some(len)) if len == from => from,
            // Written already (a repeat): the same rows again.
            (Some(from), Some(len))
                if !record.auction_log.is_empty()
                    && len == from + record.auction_log.len()
                    && self.stored_events(&record.lead_id, from, len).await?
                        == Some(record.auction_log.clone()) =>
            {
                from
            }
            // Not the log the re-auction read: its events go after whatever is stored.
            (Some(_), Some(len)) => len,
        };
        let mut rows = self.log_parts(&record.lead_id, &record.auction_log, first)?;
        while !rows.is_empty() {
            let rest = rows.split_off(rows.len().min(LOG_ROWS_PER_BATCH));
            self.write(rows).await?;
            rows = rest;
        }
        let mut parts = self.record_parts(&record, first + record.auction_log.len())?;
        if let Some(QueueEntryRow {
            campaign_id,
            next_retry_ms: Some(due),
            ..
        }) = previous
            && due != NOT_QUEUED
        {
            // A delete and an insert of the same row in one batch share a timestamp, and the
            // delete would win: only delete an entry the new record does not keep.
            let kept = campaign_id == record.campaign_id && record.next_retry_ms == Some(due);
            if !kept {
                parts.push((
                    &self.statements.delete_pending,
                    Box::new((
                        campaign_id,
                        pending_bucket(due),
                        due,
                        record.lead_id.clone(),
                    )),
                ));
            }
        }
        self.write(parts).await
    }

    /// The stored events `from..to` of a lead's log; `None` when one of them does not read.
    async fn stored_events(
        &self,
        lead_id: &str,
        from: usize,
        to: usize,
    ) -> Result<Option<Vec<AuctionEvent>>, StorageError> {
        let mut rows = self
            .all_rows::<LogRow>(&self.statements.select_log, (lead_id,))
            .await?;
        rows.retain(|r| (from as i64..to as i64).contains(&r.seq));
        rows.sort_by_key(|r| r.seq);
        Ok(rows
            .iter()
            .map(|r| serde_json::from_str(&r.detail).ok())
            .collect())
    }

    /// The rows of a lead's auction log for `events`, the first of them at `first`.
    fn log_parts(
        &self,
        lead_id: &str,
        events: &[AuctionEvent],
        first: usize,
    ) -> Result<Vec<(&PreparedStatement, Values)>, StorageError> {
        let mut parts: Vec<(&PreparedStatement, Values)> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let (name, buyer) = event_name(event);
            let detail = serde_json::to_string(event).map_err(backend)?;
            parts.push((
                &self.statements.insert_log,
                Box::new((
                    lead_id.to_owned(),
                    (first + i) as i64,
                    name,
                    buyer.to_owned(),
                    detail,
                )),
            ));
        }
        Ok(parts)
    }

    /// The statements that store `record`, whose log is `log_len` events long, and its indexes
    /// (pending queue entry included); its auction log's rows are `log_parts`.
    fn record_parts(
        &self,
        record: &LeadRecord,
        log_len: usize,
    ) -> Result<Vec<(&PreparedStatement, Values)>, StorageError> {
        let s = &self.statements;
        let fields = serde_json::to_string(&record.fields).map_err(backend)?;
        let mut parts: Vec<(&PreparedStatement, Values)> = Vec::new();
        parts.push((
            &s.insert_lead,
            Box::new((
                record.lead_id.clone(),
                record.supplier_id.clone(),
                record.seller.clone(),
                record.campaign_id.clone(),
                record.created_at_ms,
                record.status.as_str(),
                record.price_cents,
                record.buyer_ids.clone(),
                fields,
                record.next_retry_ms.unwrap_or(NOT_QUEUED),
                log_len as i64,
            )),
        ));
        let (day, hour) = day_hour(record.created_at_ms);
        parts.push((
            &s.insert_by_day,
            Box::new((
                record.supplier_id.clone(),
                day,
                hour,
                record.lead_id.clone(),
                record.created_at_ms,
            )),
        ));
        if let Some(due) = record.next_retry_ms {
            let bucket = pending_bucket(due);
            parts.push((
                &s.insert_pending,
                Box::new((
                    record.campaign_id.clone(),
                    bucket,
                    due,
                    record.lead_id.clone(),
                )),
            ));
            parts.push((
                &s.insert_pending_bucket,
                Box::new((record.campaign_id.clone(), bucket)),
            ));
        }
        Ok(parts)
    }

    async fn get_lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError> {
        let s = &self.statements;
        let (row, log) = futures::join!(
            self.one_row::<LeadRow>(&s.select_lead, (lead_id,)),
            self.all_rows::<LogRow>(&s.select_log, (lead_id,))
        );
        let Some(row) = row? else {
            return Ok(None);
        };
        let mut log = log?;
        // Rows past `log_len` are left over from a longer log that was replaced.
        log.retain(|r| r.seq >= 0 && r.seq < row.log_len);
        log.sort_by_key(|r| r.seq);
        let auction_log = log
            .into_iter()
            .map(|r| {
                serde_json::from_str(&r.detail)
                    .map_err(|e| corrupt(lead_id, &format!("auction log {}: {e}", r.seq)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        record_of(row, auction_log).map(Some)
    }

    /// The lead's row alone, its log not read.
    async fn get_lead_without_log(
        &self,
        lead_id: &str,
    ) -> Result<Option<LeadRecord>, StorageError> {
        match self
            .one_row::<LeadRow>(&self.statements.select_lead, (lead_id,))
            .await?
        {
            Some(row) => record_of(row, Vec::new()).map(Some),
            None => Ok(None),
        }
    }

    /// The first `limit` entries of `campaign_id`'s pending queue due at `due_ms` (after
    /// `after` in (due time, lead id) order), each checked against its lead's row: an entry a
    /// concurrent update left behind no longer matches its lead and is left out. Entries are
    /// checked a few at a time, in order, and only until `limit` match, so a long queue costs
    /// a tick no more than its page; the leads' logs are not read.
    async fn due_entries(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<(i64, String)>, StorageError> {
        let s = &self.statements;
        let last_bucket = pending_bucket(due_ms);
        let first_bucket = after.map_or(i64::MIN, |(due, _)| pending_bucket(due));
        let mut buckets: Vec<i64> = self
            .all_rows::<(i64,)>(&s.select_pending_buckets, (campaign_id,))
            .await?
            .into_iter()
            .map(|(b,)| b)
            .filter(|b| (first_bucket..=last_bucket).contains(b))
            .collect();
        buckets.sort_unstable();
        buckets.dedup();
        let forget_before = crate::clock::now_ms() - BUCKET_GRACE_MS;
        let mut out = Vec::new();
        for bucket in buckets {
            if out.len() >= limit {
                break;
            }
            let mut entries = self
                .all_rows::<PendingRow>(&s.select_pending, (campaign_id, bucket))
                .await?;
            if entries.is_empty() && (bucket + 1) * HOUR_MS < forget_before {
                // Nothing can be queued this far back any more: drop the marker.
                self.session
                    .execute_unpaged(&s.delete_pending_bucket, (campaign_id, bucket))
                    .await
                    .map_err(backend)?;
                continue;
            }
            entries.retain(|e| {
                e.due_ms <= due_ms
                    && after.is_none_or(|(due, id)| (e.due_ms, e.lead_id.as_str()) > (due, id))
            });
            entries.sort_by(|a, b| (a.due_ms, &a.lead_id).cmp(&(b.due_ms, &b.lead_id)));
            let mut entries = entries.into_iter().peekable();
            while out.len() < limit && entries.peek().is_some() {
                let chunk: Vec<PendingRow> = entries
                    .by_ref()
                    .take((limit - out.len()).min(FETCH_CONCURRENCY))
                    .collect();
                let ids: Vec<String> = chunk.iter().map(|e| e.lead_id.clone()).collect();
                let heads: Vec<Option<QueueEntryRow>> = stream::iter(ids)
                    .map(|id| async move {
                        self.one_row::<QueueEntryRow>(&s.select_queue_entry, (id,))
                            .await
                    })
                    .buffered(FETCH_CONCURRENCY)
                    .try_collect()
                    .await?;
                for (entry, head) in chunk.into_iter().zip(heads) {
                    let matches = head.is_some_and(|h| {
                        h.campaign_id == campaign_id && h.next_retry_ms == Some(entry.due_ms)
                    });
                    if matches {
                        out.push((entry.due_ms, entry.lead_id));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The leads of `ids`, in that order, read a few at a time; ids without a lead are left out.
    async fn get_leads(&self, ids: Vec<String>) -> Result<Vec<LeadRecord>, StorageError> {
        let found: Vec<Option<LeadRecord>> = stream::iter(ids)
            .map(|id| async move { self.get_lead(&id).await })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }
}

/// A lead from its row and its auction log.
fn record_of(row: LeadRow, auction_log: Vec<AuctionEvent>) -> Result<LeadRecord, StorageError> {
    let lead_id = row.lead_id;
    Ok(LeadRecord {
        status: status_of(&lead_id, &row.status)?,
        fields: serde_json::from_str(&row.fields)
            .map_err(|e| corrupt(&lead_id, &format!("fields: {e}")))?,
        supplier_id: row.supplier_id,
        seller: row.seller,
        campaign_id: row.campaign_id,
        created_at_ms: row.created_at_ms,
        price_cents: row.price_cents,
        buyer_ids: row.buyer_ids.unwrap_or_default(),
        auction_log,
        next_retry_ms: row.next_retry_ms.filter(|due| *due != NOT_QUEUED),
        lead_id,
    })
}

#[async_trait]
impl LeadStore for ScyllaStore {
    async fn insert_lead(
        &self,
        record: Arc<LeadRecord>,
        idempotency: Option<(String, IdempotentAnswer)>,
    ) -> Result<(), StorageError> {
        let c = self.connected()?;
        // A new lead's log is short (one auction): it goes in the lead's batch.
        let mut parts = c.record_parts(&record, record.auction_log.len())?;
        parts.extend(c.log_parts(&record.lead_id, &record.auction_log, 0)?);
        if let Some((key, answer)) = idempotency {
            parts.push((
                &c.statements.insert_idempotency,
                Box::new((
                    record.supplier_id.clone(),
                    key,
                    answer.lead_id,
                    answer.body,
                    answer.created_at_ms,
                )),
            ));
        }
        c.write(parts).await
    }

    async fn get_lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError> {
        self.connected()?.get_lead(lead_id).await
    }

    async fn get_lead_without_log(
        &self,
        lead_id: &str,
    ) -> Result<Option<LeadRecord>, StorageError> {
        self.connected()?.get_lead_without_log(lead_id).await
    }

    async fn update_lead(&self, record: LeadRecord) -> Result<(), StorageError> {
        self.connected()?.update_lead(record, None).await
    }

    /// The lead's row alone: it holds the log's length.
    async fn get_lead_for_reauction(
        &self,
        lead_id: &str,
    ) -> Result<Option<(LeadRecord, usize)>, StorageError> {
        let c = self.connected()?;
        match c
            .one_row::<LeadRow>(&c.statements.select_lead, (lead_id,))
            .await?
        {
            Some(row) => {
                let len = row.log_len.max(0) as usize;
                Ok(Some((record_of(row, Vec::new())?, len)))
            }
            None => Ok(None),
        }
    }

    async fn append_lead(
        &self,
        record: LeadRecord,
        stored_log_len: usize,
    ) -> Result<(), StorageError> {
        self.connected()?
            .update_lead(record, Some(stored_log_len))
            .await
    }

    async fn pending_due_after(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        let c = self.connected()?;
        let due = c.due_entries(campaign_id, due_ms, after, limit).await?;
        let records = c
            .get_leads(due.iter().map(|(_, id)| id.clone()).collect())
            .await?;
        // Checked again on the whole record: a lead updated since its entry was read is left
        // out, as its entry would be now.
        Ok(records
            .into_iter()
            .filter(|r| {
                r.campaign_id == campaign_id
                    && due
                        .iter()
                        .any(|(at, id)| *id == r.lead_id && r.next_retry_ms == Some(*at))
            })
            .collect())
    }

    /// The due entries' ids, each checked against its lead's row without reading its log.
    async fn pending_due_ids_after(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<(i64, String)>, StorageError> {
        self.connected()?
            .due_entries(campaign_id, due_ms, after, limit)
            .await
    }

    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<(), StorageError> {
        let c = self.connected()?;
        c.session
            .execute_unpaged(&c.statements.put_state, (key, hex::encode(value)))
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let c = self.connected()?;
        match c
            .one_row::<(Option<String>,)>(&c.statements.select_state, (key,))
            .await?
        {
            Some((Some(value),)) => hex::decode(value)
                .map(Some)
                .map_err(|e| StorageError::Corrupt(format!("state {key}: {e}"))),
            _ => Ok(None),
        }
    }

    async fn get_idempotent(
        &self,
        supplier_id: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<IdempotentAnswer>, StorageError> {
        let c = self.connected()?;
        let row = c
            .one_row::<IdempotencyRow>(&c.statements.select_idempotency, (supplier_id, key))
            .await?;
        Ok(row
            .map(|r| IdempotentAnswer {
                lead_id: r.lead_id,
                body: r.body,
                created_at_ms: r.created_at_ms,
            })
            // The table's TTL only reclaims space; the 24 h rule is kept here.
            .filter(|a| now_ms - a.created_at_ms < IDEMPOTENCY_TTL_MS))
    }

    async fn leads_of_supplier_day(
        &self,
        supplier_id: &str,
        day: i64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        let c = self.connected()?;
        // Leads are listed by (hour of creation, lead id); the cursor is where `after` sits.
        let cursor = match after {
            Some(after) => {
                let hour = match c.get_lead(after).await? {
                    Some(lead) if day_hour(lead.created_at_ms).0 == day => {
                        day_hour(lead.created_at_ms).1
                    }
                    _ => 0,
                };
                Some((hour, after.to_owned()))
            }
            None => None,
        };
        let first_hour = cursor.as_ref().map_or(0, |(h, _)| *h);
        let mut ids = Vec::new();
        for hour in first_hour..24 {
            if ids.len() >= limit {
                break;
            }
            let mut rows: Vec<String> = c
                .all_rows::<(String,)>(&c.statements.select_by_day, (supplier_id, day, hour))
                .await?
                .into_iter()
                .map(|(id,)| id)
                .filter(|id| match &cursor {
                    Some((h, after)) => (hour, id) > (*h, after),
                    None => true,
                })
                .collect();
            rows.sort_unstable();
            ids.extend(rows);
        }
        ids.truncate(limit);
        c.get_leads(ids).await
    }

    async fn ping(&self) -> Result<(), StorageError> {
        let c = self.connected()?;
        c.one_row::<(Option<String>,)>(&c.statements.select_state, ("leadex:ping",))
            .await
            .map(|_| ())
    }

    async fn close(&self) -> Result<(), StorageError> {
        // Every write was acknowledged when it returned; dropping the session closes it.
        self.inner.write().expect("store lock").take();
        Ok(())
    }
}
