//! The single-node store: redb (pure-Rust, copy-on-write B-trees, checksummed commits) behind
//! a write-ahead log. A dedicated writer thread takes every queued write as one group (group
//! commit): the group is appended to the log and synced (one `fdatasync` of a few KiB), put in
//! an in-memory overlay that readers consult before redb, and only then are the writers
//! answered. An applier thread applies logged writes to redb in batches (every `apply_every`,
//! or sooner when many are queued) with a non-durable commit, and drops them from the overlay
//! once committed. About once a second, and at close, a durable redb commit (checkpoint) of
//! everything logged makes the log redundant; the writer goes on in the log's other file
//! meanwhile, so a checkpoint holds up no write. At open, what the log holds beyond the last
//! checkpoint is applied again (`wal.rs`).
//!
//! A reader sees every answered write: a write enters the overlay before its writer is
//! answered and leaves it only after the redb commit that holds it, so a point read looks in
//! the overlay first and then in redb. A range read (pending queue, supplier's day) takes its
//! keys from both while holding the overlay's read lock, which freezes the overlay, so redb
//! can hold nothing the overlay does not also cover; a lead found in the overlay is taken from
//! there, its older index entries in redb are left out. A re-auction's write carries only the
//! events it adds (a row of their own, `LOG_TAIL`); in the overlay it says where the log before
//! them is (`Chain`): in an earlier write the overlay still holds, or in redb, which a reader
//! then reads in a snapshot begun under the overlay's lock; the writer reads only the lead's
//! record and its last row, for the log's length.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock, TryLockError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use tokio::sync::oneshot;

use super::{
    AuctionEvent, IDEMPOTENCY_TTL_MS, IdempotentAnswer, LeadRecord, LeadStore, StorageError, day_of,
};
use super::{priority, wal};
use crate::telemetry;

const LEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("leads");
/// Key `supplier \x1f day(20 digits) \x1f lead_id`, value empty: the supplier-by-day index.
const SUPPLIER_DAY: TableDefinition<&str, ()> = TableDefinition::new("supplier_day");
/// Key `supplier \x1f idempotency key`.
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// Key `campaign \x1f next_retry_ms(20 digits) \x1f lead_id`: the pending queue.
const PENDING: TableDefinition<&str, ()> = TableDefinition::new("pending");
/// Key `(lead_id, offset)`, value a JSON array of auction-log events: the events re-auctions
/// added to a lead's log from `offset` on. A lead's log is the events its record holds
/// (`LEADS`) followed by these rows in offset order, so a re-auction writes only what it adds.
const LOG_TAIL: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("log_tail");
/// Small named values (counters, breaker state).
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

const SEP: char = '\u{1f}';
/// Where the STATE table keeps the log's epoch (the log is replayed from that epoch on).
const WAL_EPOCH: &str = "\u{1f}wal_epoch";
/// The log's two files: even epochs in the first, odd ones in the second.
const WAL_FILES: [&str; 2] = ["leadex.wal", "leadex-odd.wal"];
/// Size of each log file, allocated once. A group larger than this skips the log and is
/// committed durably to redb directly; the log is checkpointed early when it is full.
const WAL_CAPACITY: u64 = 8 << 20;
/// Default page cache (redb's own default is 1 GiB).
const CACHE_BYTES: usize = 64 << 20;
/// Default longest time between checkpoints while writes come in (and after the last).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Default wait for more writes before a sync when writes come fast.
const LINGER: Duration = Duration::from_micros(1000);
/// Default longest time a logged write waits to be applied to redb.
const APPLY_EVERY: Duration = Duration::from_millis(20);
/// Writes per second past which the writer lingers before each sync (`Options::linger`).
const LINGER_RATE: f64 = 3000.0;
/// How often the writer measures its arrival rate.
const RATE_WINDOW: Duration = Duration::from_millis(10);
/// Logged writes that start an apply without waiting for `apply_every`.
const APPLY_MAX: usize = 1024;
/// Logged writes the writer may queue for the applier before it waits (bounds the overlay).
const APPLY_BACKLOG: usize = 16 * APPLY_MAX;
/// How soon the writer tries again to hand the applier what it could not (see `push_all`).
const HAND_OFF_RETRY: Duration = Duration::from_millis(1);
/// An idle-priority applier that waited this long past its batch's time, or took this long
/// over a batch, is starved (every core busy with other work); a batch takes about 1 ms.
const IDLE_STARVED: Duration = Duration::from_millis(50);
/// How long the applier stays at normal priority after it starved at idle priority.
const IDLE_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Clone)]
enum WriteOp {
    Insert(Arc<LeadRecord>, Option<(String, IdempotentAnswer)>),
    Update(Arc<LeadRecord>),
    /// `append_lead` as asked: the lead as it now is, its log holding only the events a
    /// re-auction added, to go after the first `usize` stored ones. The writer turns it into
    /// `Appended` (or, for a lead not stored, `Update`) in log order (`Writer::resolve`).
    Append(Arc<LeadRecord>, usize),
    Appended(Arc<Appended>),
    State(String, Vec<u8>),
}

/// A re-auction's outcome as the log and the tables hold it: the lead's record with the log
/// events it keeps inline (`head`) and the events added at offset `from`, a `LOG_TAIL` row.
struct Appended {
    head: LeadRecord,
    from: u32,
    events: Vec<AuctionEvent>,
    /// Where readers of the overlay find the log before `from` (absent in a write read back
    /// from the log, which goes to the tables only).
    chain: Option<Chain>,
}

/// The log before an appended write, for readers of the overlay: the first `base` events of
/// `whole` (an earlier write of the lead not yet applied) or, without it, of the lead's log in
/// redb, then `carried` (the events of appended writes not yet applied between the two).
/// Built by the writer from what it already holds, so that writing a re-auction's events
/// never reads the lead's log; a reader joins the parts with a redb snapshot taken under the
/// overlay's lock, in which the lead is no newer than the overlay's version.
#[derive(Clone)]
struct Chain {
    whole: Option<Arc<LeadRecord>>,
    base: usize,
    carried: Vec<AuctionEvent>,
}

impl Appended {
    /// The whole lead, its log joined from `chain` (redb's part read in `txn`).
    fn whole(&self, txn: &redb::ReadTransaction) -> Result<LeadRecord, StorageError> {
        let chain = self.chain.as_ref().ok_or_else(|| {
            StorageError::Backend(
                "an appended write read back from the log is in no overlay".into(),
            )
        })?;
        let mut log = match &chain.whole {
            Some(whole) => whole.auction_log[..chain.base.min(whole.auction_log.len())].to_vec(),
            None => {
                let mut log = LeadTables::open(txn)?
                    .lead(&self.head.lead_id)?
                    .map(|stored| stored.auction_log)
                    .unwrap_or_default();
                log.truncate(chain.base);
                log
            }
        };
        log.extend(chain.carried.iter().cloned());
        log.extend(self.events.iter().cloned());
        Ok(LeadRecord {
            auction_log: log,
            ..self.head.head()
        })
    }
}

/// A lead's newest version before an appended write (`Writer::resolve`).
enum Prior {
    /// An earlier write of the group, or the overlay's.
    Write(WriteOp),
    /// In redb: the events its record holds inline, its log's length, and the events of its
    /// `LOG_TAIL` row at the offset asked for, when that row ends the log.
    Tables {
        inline: Vec<AuctionEvent>,
        len: usize,
        at_from: Option<Vec<AuctionEvent>>,
    },
}

impl Prior {
    /// The appended write of `record`'s events (its log) after this version, asked for at
    /// `from`.
    fn then(self, record: &LeadRecord, from: usize) -> Appended {
        let added = &record.auction_log;
        // The log's length, the record's inline events, whether the events from `from` are
        // `added` already, and how readers find the log before the new events.
        let (len, mut inline, repeat, mut chain) = match self {
            Prior::Write(WriteOp::Insert(r, _) | WriteOp::Update(r)) => {
                let len = r.auction_log.len();
                let repeat = !added.is_empty()
                    && len == from + added.len()
                    && r.auction_log[from..] == added[..];
                let chain = Chain {
                    base: len,
                    whole: Some(r.clone()),
                    carried: Vec::new(),
                };
                (len, r.auction_log.clone(), repeat, chain)
            }
            Prior::Write(WriteOp::Appended(a)) => {
                let len = a.from as usize + a.events.len();
                let repeat = !added.is_empty() && a.from as usize == from && a.events == *added;
                let chain = match &a.chain {
                    Some(c) => {
                        let mut c = c.clone();
                        c.carried.extend(a.events.iter().cloned());
                        c
                    }
                    // Only the log's replay writes these, and it resolves nothing.
                    None => Chain {
                        base: len,
                        whole: None,
                        carried: Vec::new(),
                    },
                };
                (len, a.head.auction_log.clone(), repeat, chain)
            }
            Prior::Write(WriteOp::Append(..)) => unreachable!("resolved before it is a prior"),
            Prior::Write(WriteOp::State(..)) => unreachable!("a state write is no lead's"),
            Prior::Tables {
                inline,
                len,
                at_from,
            } => {
                let repeat = !added.is_empty() && at_from.as_ref() == Some(added);
                let chain = Chain {
                    base: len,
                    whole: None,
                    carried: Vec::new(),
                };
                (len, inline, repeat, chain)
            }
        };
        let at = if len == from || repeat { from } else { len };
        // Readers get the log up to `at`, then the new events.
        if at < chain.base {
            chain.base = at;
            chain.carried.clear();
        } else {
            chain.carried.truncate(at - chain.base);
        }
        inline.truncate(at);
        Appended {
            head: LeadRecord {
                auction_log: inline,
                ..record.head()
            },
            from: at.min(u32::MAX as usize) as u32,
            events: added.clone(),
            chain: Some(chain),
        }
    }
}

/// How a stored lead's auction log is kept: its length, and how many of its events the
/// record holds inline (the rest are `LOG_TAIL` rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogShape {
    len: usize,
    inline: usize,
}

impl WriteOp {
    /// The lead's record this writes: the whole lead, but for an appended write, whose
    /// record holds only its inline events (`Appended::whole` joins the rest).
    fn record(&self) -> Option<&LeadRecord> {
        match self {
            WriteOp::Insert(r, _) | WriteOp::Update(r) | WriteOp::Append(r, _) => Some(r),
            WriteOp::Appended(a) => Some(&a.head),
            WriteOp::State(..) => None,
        }
    }

    /// The id of the lead this writes.
    fn lead_id(&self) -> Option<&str> {
        self.record().map(|r| r.lead_id.as_str())
    }

    /// The whole lead this writes, as readers of the overlay see it (`txn` taken under the
    /// overlay's lock).
    fn whole(&self, txn: &redb::ReadTransaction) -> Result<Option<LeadRecord>, StorageError> {
        match self {
            WriteOp::Appended(a) => a.whole(txn).map(Some),
            op => Ok(op.record().cloned()),
        }
    }

    /// How the lead's log is kept once this is written (an `Append` is resolved first).
    fn shape(&self) -> Option<LogShape> {
        match self {
            WriteOp::Insert(r, _) | WriteOp::Update(r) | WriteOp::Append(r, _) => Some(LogShape {
                len: r.auction_log.len(),
                inline: r.auction_log.len(),
            }),
            WriteOp::Appended(a) => Some(LogShape {
                len: a.from as usize + a.events.len(),
                inline: a.head.auction_log.len(),
            }),
            WriteOp::State(..) => None,
        }
    }
}

struct WriteJob {
    op: WriteOp,
    done: oneshot::Sender<Result<(), StorageError>>,
}

enum Job {
    Write(Box<WriteJob>),
    Close(oneshot::Sender<()>),
}

/// What the writer hands the applier, in log order.
enum Apply {
    /// Writes durable in the log and present in the overlay, through sequence number `seq`.
    Logged { writes: Vec<Arc<Encoded>>, seq: u64 },
    /// Apply everything queued plus `writes` (a group the log cannot hold, in no overlay) in
    /// one durable commit, storing `epoch` as the log's epoch when given; answer on `done`.
    Durable {
        writes: Vec<Arc<Encoded>>,
        seq: u64,
        epoch: Option<u64>,
        done: std_mpsc::SyncSender<Result<(), StorageError>>,
    },
}

/// The writer's hand-off to the applier. A push wakes the applier only when it has nothing
/// to do, when a durable commit is asked for, or when `APPLY_MAX` writes wait: otherwise the
/// applier sleeps until its batch is due, instead of waking for every group.
#[derive(Default)]
struct ApplyQueue {
    state: std::sync::Mutex<ApplyState>,
    ready: std::sync::Condvar,
    room: std::sync::Condvar,
    /// Writes come faster than `LINGER_RATE` (the writer's measure): the applier then runs at
    /// normal priority.
    busy: AtomicBool,
}

#[derive(Default)]
struct ApplyState {
    items: std::collections::VecDeque<Apply>,
    /// Logged writes in `items`.
    writes: usize,
    /// A durable commit is asked for.
    urgent: bool,
    /// The applier waits for a first write.
    idle: bool,
    closed: bool,
}

impl ApplyQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, ApplyState> {
        self.state.lock().expect("apply queue lock")
    }

    /// Queues `items` in order, emptying it; waits while `APPLY_BACKLOG` writes are queued.
    /// Without `wait`, leaves them (for a later call) when the applier holds the lock: it may
    /// hold it at idle priority, and the writer must not wait for a core to come free.
    fn push_all(&self, items: &mut Vec<Apply>, wait: bool) -> Result<(), StorageError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut state = if wait {
            self.lock()
        } else {
            match self.state.try_lock() {
                Ok(state) => state,
                Err(TryLockError::WouldBlock) => return Ok(()),
                Err(TryLockError::Poisoned(_)) => panic!("apply queue lock poisoned"),
            }
        };
        while state.writes >= APPLY_BACKLOG && !state.closed {
            state = self.room.wait(state).expect("apply queue lock");
        }
        if state.closed {
            return Err(StorageError::Closed);
        }
        for item in items.drain(..) {
            match &item {
                Apply::Logged { writes, .. } => state.writes += writes.len(),
                Apply::Durable { .. } => state.urgent = true,
            }
            state.items.push_back(item);
        }
        if state.idle || state.urgent || state.writes >= APPLY_MAX {
            state.idle = false;
            self.ready.notify_one();
        }
        Ok(())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
        self.room.notify_all();
    }

    /// Everything queued, once there is something and `due` has come (`None`: at once), a
    /// durable commit is asked for, `APPLY_MAX` writes wait or the writer is gone; and
    /// whether the writer is gone.
    fn take(&self, due: Option<Instant>) -> (Vec<Apply>, bool) {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            let ripe = match due {
                None => !state.items.is_empty(),
                Some(due) => now >= due,
            };
            if ripe || state.urgent || state.closed || state.writes >= APPLY_MAX {
                break;
            }
            state.idle = due.is_none();
            state = match due {
                None => self.ready.wait(state).expect("apply queue lock"),
                Some(due) => {
                    self.ready
                        .wait_timeout(state, due - now)
                        .expect("apply queue lock")
                        .0
                }
            };
        }
        state.idle = false;
        state.urgent = false;
        state.writes = 0;
        let items = state.items.drain(..).collect();
        self.room.notify_all();
        (items, state.closed)
    }
}

/// Logged writes not yet committed to redb, as readers need them. Each entry carries the
/// sequence number of the write that set it; the applier drops entries once redb holds them.
#[derive(Default)]
struct Overlay {
    /// The newest version of each lead.
    leads: HashMap<String, (u64, Arc<Encoded>)>,
    /// Idempotency key (`idem_key`) to the insert that stored its answer.
    idempotency: HashMap<String, (u64, Arc<Encoded>)>,
    state: HashMap<String, (u64, Arc<Encoded>)>,
    /// Supplier-by-day index keys added.
    by_day: BTreeMap<String, u64>,
    /// Pending-queue keys added; a key is current only while its lead's newest version
    /// (`leads`) is due at that time.
    pending: BTreeMap<String, u64>,
}

impl Overlay {
    fn add(&mut self, seq: u64, write: &Arc<Encoded>) {
        if let WriteOp::State(key, _) = &write.op {
            self.state.insert(key.clone(), (seq, Arc::clone(write)));
        } else if let Some(lead_id) = write.op.lead_id() {
            self.leads
                .insert(lead_id.to_owned(), (seq, Arc::clone(write)));
        }
        if let Some(key) = &write.day {
            self.by_day.insert(key.clone(), seq);
        }
        if let Some(key) = &write.queue {
            self.pending.insert(key.clone(), seq);
        }
        if let Some(key) = &write.idem {
            self.idempotency
                .insert(key.clone(), (seq, Arc::clone(write)));
        }
    }

    /// Drops what redb now holds: entries set by writes up to `seq`.
    fn applied(&mut self, seq: u64) {
        self.leads.retain(|_, (s, _)| *s > seq);
        self.idempotency.retain(|_, (s, _)| *s > seq);
        self.state.retain(|_, (s, _)| *s > seq);
        self.by_day.retain(|_, s| *s > seq);
        self.pending.retain(|_, s| *s > seq);
    }

    /// The lead's record as the overlay's newest write of it holds it (`WriteOp::record`).
    fn record(&self, lead_id: &str) -> Option<&LeadRecord> {
        self.leads.get(lead_id)?.1.op.record()
    }

    fn len(&self) -> usize {
        self.leads.len() + self.state.len()
    }
}

pub struct EmbeddedStore {
    /// `None` once closed, so the file lock is released for the next opener.
    db: RwLock<Option<Arc<Database>>>,
    writer: std::sync::Mutex<Option<std_mpsc::Sender<Job>>>,
    overlay: Arc<RwLock<Overlay>>,
    /// The writer's hand-off to the applier (tests hold its lock as the applier does).
    #[cfg(test)]
    queue: Arc<ApplyQueue>,
}

/// Tuning of the embedded store (`[storage]` of the config).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Most writes sharing one log append and sync.
    pub group_commit_max: usize,
    /// Longest time between checkpoints while writes come in.
    pub checkpoint_every: Duration,
    /// redb's page cache.
    pub cache_bytes: usize,
    /// Longest time a logged write waits before it is applied to redb.
    pub apply_every: Duration,
    /// While writes come faster than 3,000 a second, how long the writer waits for more
    /// before each log sync (zero: never), so a sync carries more of them.
    pub linger: Duration,
    /// Below that rate, the applier runs in the machine's idle time (`SCHED_IDLE`), where the
    /// process may bring a thread back to normal priority (see `IdleApply`).
    pub idle_apply: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            group_commit_max: 512,
            checkpoint_every: CHECKPOINT_EVERY,
            cache_bytes: CACHE_BYTES,
            apply_every: APPLY_EVERY,
            linger: LINGER,
            idle_apply: true,
        }
    }
}

fn backend<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Backend(e.to_string())
}

fn corrupt<E: std::fmt::Display>(e: E) -> StorageError {
    StorageError::Corrupt(e.to_string())
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

/// The due time in a pending-queue key (`pending_key`).
fn due_of(key: &str) -> i64 {
    key.rsplit(SEP)
        .nth(1)
        .and_then(|due| due.parse().ok())
        .unwrap_or_default()
}

/// The lead id at the end of an index key.
fn lead_of(key: &str) -> &str {
    key.rsplit(SEP).next().unwrap_or_default()
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, and starts its writer and applier threads.
    pub fn open(dir: &Path, group_commit_max: usize) -> Result<EmbeddedStore, StorageError> {
        EmbeddedStore::open_with(
            dir,
            Options {
                group_commit_max,
                ..Options::default()
            },
        )
    }

    /// As `open`, with every setting.
    pub fn open_with(dir: &Path, options: Options) -> Result<EmbeddedStore, StorageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::Backend(format!("cannot create {}: {e}", dir.display())))?;
        let db = redb::Builder::new()
            .set_cache_size(options.cache_bytes)
            .create(dir.join("leadex.redb"))
            .map_err(backend)?;
        {
            let txn = db.begin_write().map_err(backend)?;
            txn.open_table(LEADS).map_err(backend)?;
            txn.open_table(SUPPLIER_DAY).map_err(backend)?;
            txn.open_table(IDEMPOTENCY).map_err(backend)?;
            txn.open_table(PENDING).map_err(backend)?;
            txn.open_table(STATE).map_err(backend)?;
            txn.open_table(LOG_TAIL).map_err(backend)?;
            txn.commit().map_err(backend)?;
        }
        let wal = recover(&db, dir)?;
        let db = Arc::new(db);
        let overlay = Arc::new(RwLock::new(Overlay::default()));
        let (tx, rx) = std_mpsc::channel();
        let queue = Arc::new(ApplyQueue::default());
        let applier = {
            let db = db.clone();
            let overlay = overlay.clone();
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("leadex-store-applier".into())
                .spawn(move || {
                    applier_loop(
                        &db,
                        &queue,
                        &overlay,
                        options.apply_every,
                        options.idle_apply,
                    )
                })
                .map_err(backend)?
        };
        let writer = Writer {
            log: wal,
            db: db.clone(),
            applier: queue.clone(),
            overlay: overlay.clone(),
            seq: 0,
            framed: Vec::new(),
            last_checkpoint: Instant::now(),
            checkpointing: None,
            other_free: true,
            unpushed: Vec::new(),
        };
        #[cfg(test)]
        let test_queue = queue.clone();
        let max = options.group_commit_max.max(1);
        let checkpoint_every = options.checkpoint_every;
        let linger = options.linger;
        std::thread::Builder::new()
            .name("leadex-store-writer".into())
            .spawn(move || {
                let closing = writer.run(&rx, max, checkpoint_every, linger);
                // Release the database (the applier holds it too) before telling `close`.
                queue.close();
                let _ = applier.join();
                if let Some(done) = closing {
                    let _ = done.send(());
                }
            })
            .map_err(backend)?;
        let store = EmbeddedStore {
            db: RwLock::new(Some(db)),
            writer: std::sync::Mutex::new(Some(tx)),
            overlay,
            #[cfg(test)]
            queue: test_queue,
        };
        store.sweep_idempotency(crate::clock::now_ms())?;
        // Exported from the start, as dashboards and alerts read it before the first write.
        metrics::gauge!(telemetry::STORAGE_UNAPPLIED).set(0.0);
        Ok(store)
    }

    /// Drops idempotency answers older than 24 h so the table stays bounded (at open, before
    /// any write, so the overlay is empty).
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

    fn overlay(&self) -> std::sync::RwLockReadGuard<'_, Overlay> {
        self.overlay.read().expect("overlay lock")
    }
}

/// Opens the log in `dir`, applies what it holds beyond the last checkpoint, and checkpoints:
/// the store starts with everything acknowledged before a crash in redb, durably.
fn recover(db: &Database, dir: &Path) -> Result<wal::Wal, StorageError> {
    let epoch = {
        let txn = db.begin_read().map_err(backend)?;
        let state = txn.open_table(STATE).map_err(backend)?;
        match state.get(WAL_EPOCH).map_err(backend)? {
            Some(v) => u64::from_le_bytes(v.value().try_into().unwrap_or([0; 8])),
            None => 0,
        }
    };
    let paths = WAL_FILES.map(|name| dir.join(name));
    let (mut log, payloads) = wal::Wal::open([&paths[0], &paths[1]], WAL_CAPACITY, epoch)
        .map_err(|e| StorageError::Backend(format!("write-ahead log in {}: {e}", dir.display())))?;
    if !log.is_direct() {
        tracing::info!(
            path = %dir.display(),
            "this filesystem takes no direct I/O: the write-ahead log syncs each group with fdatasync"
        );
    }
    let encoded = payloads
        .iter()
        .map(|p| decode(p).and_then(encode).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    if !encoded.is_empty() {
        tracing::info!(
            writes = encoded.len(),
            "applying writes from the write-ahead log"
        );
    }
    // The log held epochs `epoch` and `epoch + 1`; both are in redb now, so `epoch + 2` may
    // take the first one's file, and the checkpoint after it the other's.
    apply(db, &encoded, Some(epoch + 2), Durability::Immediate, true)?;
    log.restart(epoch + 2);
    Ok(log)
}

/// The writer thread's state: the log, and the applier it feeds.
struct Writer {
    log: wal::Wal,
    /// For the stored shape of a re-auctioned lead's log (`resolve`).
    db: Arc<Database>,
    applier: Arc<ApplyQueue>,
    overlay: Arc<RwLock<Overlay>>,
    /// Sequence number of the last write taken.
    seq: u64,
    framed: Vec<u8>,
    last_checkpoint: Instant,
    /// The answer of the checkpoint in progress, if any.
    checkpointing: Option<std_mpsc::Receiver<Result<(), StorageError>>>,
    /// Whether redb durably holds every write in the log's other file (the previous epoch's),
    /// which the next epoch writes over.
    other_free: bool,
    /// Hand-offs to the applier not made yet, in order (`ApplyQueue::push_all`).
    unpushed: Vec<Apply>,
}

impl Writer {
    /// Commits queued writes in groups until closed; returns the closer's waiter.
    fn run(
        mut self,
        rx: &std_mpsc::Receiver<Job>,
        max: usize,
        checkpoint_every: Duration,
        linger: Duration,
    ) -> Option<oneshot::Sender<()>> {
        let mut batch: Vec<Box<WriteJob>> = Vec::with_capacity(max);
        let mut closing = None;
        // Arrival rate over the last `RATE_WINDOW`: writes, since when, and above LINGER_RATE.
        let (mut arrived, mut window, mut busy) = (0usize, Instant::now(), false);
        while closing.is_none() {
            let _ = self.applier.push_all(&mut self.unpushed, false);
            let mut wait = if self.log.is_empty() {
                None
            } else {
                Some(checkpoint_every.saturating_sub(self.last_checkpoint.elapsed()))
            };
            if !self.unpushed.is_empty() {
                wait = Some(wait.map_or(HAND_OFF_RETRY, |w| w.min(HAND_OFF_RETRY)));
            }
            let first = match wait {
                None => rx
                    .recv()
                    .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
                Some(wait) => rx.recv_timeout(wait),
            };
            match first {
                Ok(Job::Write(job)) => batch.push(job),
                Ok(Job::Close(done)) => closing = Some(done),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    // Every handle is gone without a close: still leave redb checkpointed.
                    self.settle();
                    return None;
                }
            }
            let mut drain = |batch: &mut Vec<Box<WriteJob>>| {
                while batch.len() < max && closing.is_none() {
                    match rx.try_recv() {
                        Ok(Job::Write(job)) => batch.push(job),
                        Ok(Job::Close(done)) => closing = Some(done),
                        Err(_) => break,
                    }
                }
            };
            drain(&mut batch);
            if busy && !linger.is_zero() && !batch.is_empty() && batch.len() < max {
                // Writes come fast: a short wait lets this sync carry more of them. A sleep,
                // not a timed receive, so the writers' sends wake no one meanwhile.
                std::thread::sleep(linger);
                drain(&mut batch);
            }
            arrived += batch.len();
            if window.elapsed() >= RATE_WINDOW {
                busy = arrived as f64 / window.elapsed().as_secs_f64() >= LINGER_RATE;
                self.applier.busy.store(busy, Ordering::Relaxed);
                (arrived, window) = (0, Instant::now());
            }
            if !batch.is_empty() {
                let started = Instant::now();
                let size = batch.len();
                let (mut ops, mut waiters): (Vec<WriteOp>, Vec<_>) =
                    batch.drain(..).map(|job| (job.op, job.done)).unzip();
                // A re-auction's write whose lead cannot be read fails alone.
                self.resolve(&mut ops, &mut waiters);
                let (failed, logged) = match self.commit_group(ops) {
                    Ok(logged) => (None, logged),
                    Err(e) => (Some(e.to_string()), None),
                };
                metrics::histogram!(telemetry::STORAGE_WRITE_DURATION)
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!(telemetry::STORAGE_BATCH_SIZE).record(size as f64);
                if let Some(e) = &failed {
                    metrics::counter!(telemetry::STORAGE_ERRORS_TOTAL).increment(1);
                    tracing::error!(error = %e, batch = size, "storage commit failed");
                }
                for done in waiters {
                    let answer = match &failed {
                        None => Ok(()),
                        Some(e) => Err(StorageError::Backend(e.clone())),
                    };
                    let _ = done.send(answer);
                }
                if let Some(writes) = logged {
                    // After the answers: the applier's queue is bounded, and waiting on it
                    // should hold up later groups, not this one.
                    self.unpushed.push(Apply::Logged {
                        writes,
                        seq: self.seq,
                    });
                    let _ = self.applier.push_all(&mut self.unpushed, false);
                }
            }
            self.finish_checkpoint(false);
            if closing.is_some() {
                self.settle();
            } else if self.last_checkpoint.elapsed() >= checkpoint_every && !self.log.is_empty() {
                self.checkpoint_logged(false);
            }
        }
        closing
    }

    fn checkpoint_logged(&mut self, wait: bool) {
        if let Err(e) = self.checkpoint(wait) {
            metrics::counter!(telemetry::STORAGE_ERRORS_TOTAL).increment(1);
            tracing::error!(error = %e, "storage checkpoint failed; the log keeps the writes");
        }
        self.last_checkpoint = Instant::now();
    }

    /// Takes the answer of the checkpoint in progress, if it has come (with `block`, once it
    /// comes): its success frees the log's other file, its failure is reported.
    fn finish_checkpoint(&mut self, block: bool) {
        let Some(wait) = &self.checkpointing else {
            return;
        };
        let result = if block {
            self.applier
                .push_all(&mut self.unpushed, true)
                .and_then(|()| wait.recv().unwrap_or(Err(StorageError::Closed)))
        } else {
            match wait.try_recv() {
                Ok(result) => result,
                Err(std_mpsc::TryRecvError::Empty) => return,
                Err(std_mpsc::TryRecvError::Disconnected) => Err(StorageError::Closed),
            }
        };
        self.checkpointing = None;
        match result {
            Ok(()) => self.other_free = true,
            Err(e) => {
                metrics::counter!(telemetry::STORAGE_ERRORS_TOTAL).increment(1);
                tracing::error!(error = %e, "storage checkpoint failed; the log keeps the writes");
            }
        }
    }

    /// Before the writer stops: redb durably holds everything logged.
    fn settle(&mut self) {
        self.finish_checkpoint(true);
        if !self.log.is_empty() || !self.other_free {
            self.checkpoint_logged(true);
        }
    }

    /// Makes one group durable (log append + sync) and visible (the overlay); returns the
    /// writes for the applier. A group larger than the whole log is committed to redb durably
    /// instead, and is applied when this returns (`None`).
    fn commit_group(
        &mut self,
        ops: Vec<WriteOp>,
    ) -> Result<Option<Vec<Arc<Encoded>>>, StorageError> {
        let encoded = ops
            .into_iter()
            .map(|op| encode(op).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        self.framed.clear();
        let mut payload = Vec::new();
        for e in &encoded {
            payload.clear();
            e.write_payload(&mut payload);
            self.log.frame(&payload, &mut self.framed);
        }
        if !self.log.fits(self.framed.len()) {
            self.checkpoint(false)?;
            self.last_checkpoint = Instant::now();
        }
        let first = self.seq + 1;
        self.seq += encoded.len() as u64;
        if !self.log.fits(self.framed.len()) {
            // Larger than the whole log: straight to redb, durably.
            self.durable(encoded, None)?;
            return Ok(None);
        }
        self.log
            .append_durably(&mut self.framed)
            .map_err(|e| StorageError::Backend(format!("write-ahead log: {e}")))?;
        let mut overlay = self.overlay.write().expect("overlay lock");
        for (i, write) in encoded.iter().enumerate() {
            overlay.add(first + i as u64, write);
        }
        Ok(Some(encoded))
    }

    /// Turns each `Append` into an `Appended` at the end of the lead's stored log (its newest
    /// version: earlier in the group, in the overlay, or in redb), or into an `Update` when
    /// the lead is not stored. Decided here, in log order, so the log holds what the tables get
    /// and a replay gives the same tables. The events go at the offset the re-auction read
    /// when the stored log is that long, and again there when they are what is stored from it
    /// (a repeat); else after the stored log, so none is lost.
    fn resolve(
        &self,
        ops: &mut Vec<WriteOp>,
        waiters: &mut Vec<oneshot::Sender<Result<(), StorageError>>>,
    ) {
        if !ops.iter().any(|op| matches!(op, WriteOp::Append(..))) {
            return;
        }
        // Each lead's newest write in the group so far.
        let mut newest: HashMap<String, WriteOp> = HashMap::new();
        let taken = std::mem::take(ops).into_iter().zip(std::mem::take(waiters));
        for (mut op, done) in taken {
            if let WriteOp::Append(record, from) = &op {
                let prior = match newest.get(&record.lead_id) {
                    Some(op) => Ok(Some(Prior::Write(op.clone()))),
                    None => self.prior(&record.lead_id, *from, record.auction_log.len()),
                };
                op = match prior {
                    Ok(None) => WriteOp::Update(record.clone()),
                    Ok(Some(prior)) => WriteOp::Appended(Arc::new(prior.then(record, *from))),
                    Err(e) => {
                        tracing::error!(lead_id = %record.lead_id, error = %e, "stored lead unreadable; the re-auction's outcome is not stored");
                        metrics::counter!(telemetry::STORAGE_ERRORS_TOTAL).increment(1);
                        let _ = done.send(Err(e));
                        continue;
                    }
                };
            }
            if let Some(lead_id) = op.lead_id() {
                newest.insert(lead_id.to_owned(), op.clone());
            }
            ops.push(op);
            waiters.push(done);
        }
    }

    /// The newest stored version of a lead, for an append of `added` events at `from`; `None`
    /// if it is not stored.
    fn prior(
        &self,
        lead_id: &str,
        from: usize,
        added: usize,
    ) -> Result<Option<Prior>, StorageError> {
        if let Some((_, write)) = self
            .overlay
            .read()
            .expect("overlay lock")
            .leads
            .get(lead_id)
        {
            return Ok(Some(Prior::Write(write.op.clone())));
        }
        // Not in the overlay: redb holds its newest version (committed before it leaves).
        let txn = self.db.begin_read().map_err(backend)?;
        let leads = txn.open_table(LEADS).map_err(backend)?;
        let Some(head) = leads.get(lead_id).map_err(backend)? else {
            return Ok(None);
        };
        let head: LeadRecord = serde_json::from_slice(head.value()).map_err(corrupt)?;
        let len = log_len(&txn, lead_id, head.auction_log.len())?;
        // A repeat can only be of a row at `from` that ends the log.
        let at_from = if added > 0 && len == from + added && from <= u32::MAX as usize {
            let tails = txn.open_table(LOG_TAIL).map_err(backend)?;
            match tails.get((lead_id, from as u32)).map_err(backend)? {
                Some(row) => serde_json::from_slice(row.value()).ok(),
                None => None,
            }
        } else {
            None
        };
        Ok(Some(Prior::Tables {
            inline: head.auction_log,
            len,
            at_from,
        }))
    }

    /// Has the applier commit everything logged so far, plus `writes`, durably (storing
    /// `epoch` as the log's); returns where its answer comes.
    fn request_durable(
        &mut self,
        writes: Vec<Arc<Encoded>>,
        epoch: Option<u64>,
    ) -> Result<std_mpsc::Receiver<Result<(), StorageError>>, StorageError> {
        let (done, wait) = std_mpsc::sync_channel(1);
        self.unpushed.push(Apply::Durable {
            writes,
            seq: self.seq,
            epoch,
            done,
        });
        // Handed over now or within `HAND_OFF_RETRY`; whoever waits for the answer hands it
        // over first (`durable`, `finish_checkpoint`).
        self.applier.push_all(&mut self.unpushed, false)?;
        Ok(wait)
    }

    /// As `request_durable`, and waits for it.
    fn durable(
        &mut self,
        writes: Vec<Arc<Encoded>>,
        epoch: Option<u64>,
    ) -> Result<(), StorageError> {
        let wait = self.request_durable(writes, epoch)?;
        self.applier.push_all(&mut self.unpushed, true)?;
        wait.recv().unwrap_or(Err(StorageError::Closed))
    }

    /// A checkpoint: the log goes on under the next epoch in its other file at once, and the
    /// applier commits everything logged before it durably, storing that epoch. Waits for the
    /// checkpoint before if it still runs (its commit frees the file the next epoch takes),
    /// and for this one only when `wait`; when the one before failed, this one commits before
    /// the log moves on.
    fn checkpoint(&mut self, wait: bool) -> Result<(), StorageError> {
        self.finish_checkpoint(true);
        let next = self.log.epoch() + 1;
        if !self.other_free {
            // The other file still holds writes redb may lack: commit them all first.
            self.durable(Vec::new(), Some(next))?;
            self.log.restart(next);
            self.other_free = true;
            return Ok(());
        }
        self.log.restart(next);
        self.other_free = false;
        self.checkpointing = Some(self.request_durable(Vec::new(), Some(next))?);
        if wait {
            self.finish_checkpoint(true);
        }
        Ok(())
    }
}

/// The applier's scheduling class (see `priority`). Its batches are CPU no answer waits for;
/// at normal priority each one, and each wake-up for one, took a core from an HTTP worker or
/// a buyer about fifty times a second, which showed in the answer time's p99. In `SCHED_IDLE`
/// it runs only on a core nothing else wants, and a thread that wakes takes the core back at
/// once. It is idle only while writes come slower than `LINGER_RATE` (faster, it needs its
/// share of the CPU to keep up), never for a durable commit or while it holds the overlay's
/// lock (the writer's `push_all` does not wait on the queue's), and not for `IDLE_BACKOFF`
/// after it starved.
struct IdleApply {
    /// The process may bring a thread back from `SCHED_IDLE`, and the setting asks for it.
    enabled: bool,
    /// In `SCHED_IDLE` now.
    idle: bool,
    normal_until: Option<Instant>,
}

impl IdleApply {
    fn new(enabled: bool) -> IdleApply {
        IdleApply {
            enabled,
            idle: false,
            normal_until: None,
        }
    }

    /// Idle priority while writes come slowly, unless backing off; normal otherwise.
    fn settle(&mut self, busy: bool) {
        let backing_off = self
            .normal_until
            .is_some_and(|until| Instant::now() < until);
        if !backing_off {
            self.normal_until = None;
        }
        if self.enabled && !busy && !backing_off {
            if !self.idle {
                self.idle = priority::enter_idle();
            }
        } else {
            self.normal();
        }
    }

    /// Normal priority (before a lock the writer takes, or a durable commit).
    fn normal(&mut self) {
        if self.idle {
            self.idle = false;
            if !priority::leave_idle() {
                // Not expected after the probe: never enter idle priority again.
                self.enabled = false;
                tracing::error!("the store's applier could not return to normal priority");
            }
        }
    }

    /// After `waited` past its time (or over a batch): normal priority for a while if it was
    /// idle and starved.
    fn check(&mut self, waited: Duration) {
        if self.idle && waited >= IDLE_STARVED {
            self.normal_until = Some(Instant::now() + IDLE_BACKOFF);
            self.normal();
            tracing::debug!(
                waited_ms = waited.as_millis() as u64,
                "store applier starved at idle priority; normal priority for a while"
            );
        }
    }
}

/// Applies logged writes to redb in batches until the writer goes away.
fn applier_loop(
    db: &Database,
    queue: &ApplyQueue,
    overlay: &RwLock<Overlay>,
    every: Duration,
    idle_apply: bool,
) {
    let mut queued: Vec<Arc<Encoded>> = Vec::new();
    let mut through = 0u64;
    // When the oldest write in `queued` came (or a failed apply is to be tried again).
    let mut since: Option<Instant> = None;
    let mut idle = IdleApply::new(idle_apply && priority::idle_is_reversible());
    let flush = |idle: &mut IdleApply,
                 queued: &mut Vec<Arc<Encoded>>,
                 through: u64,
                 epoch: Option<u64>,
                 durability: Durability|
     -> Result<(), StorageError> {
        if queued.is_empty() && epoch.is_none() {
            return Ok(());
        }
        let started = Instant::now();
        let applied = apply(db, queued, epoch, durability, false);
        idle.check(started.elapsed());
        // The writer takes the overlay's lock for every group: never held at idle priority.
        idle.normal();
        applied?;
        let left = {
            let mut overlay = overlay.write().expect("overlay lock");
            overlay.applied(through);
            overlay.len()
        };
        metrics::histogram!(telemetry::STORAGE_APPLY_DURATION)
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!(telemetry::STORAGE_UNAPPLIED).set(left as f64);
        queued.clear();
        Ok(())
    };
    loop {
        idle.settle(queue.busy.load(Ordering::Relaxed));
        let due = since.map(|at| at + every);
        let (items, closed) = queue.take(due);
        if let Some(due) = due {
            idle.check(due.elapsed());
        }
        for item in items {
            match item {
                Apply::Logged { writes, seq } => {
                    queued.extend(writes);
                    through = seq;
                    since.get_or_insert_with(Instant::now);
                }
                Apply::Durable {
                    writes,
                    seq,
                    epoch,
                    done,
                } => {
                    idle.normal();
                    let before = queued.len();
                    queued.extend(writes);
                    let result = flush(&mut idle, &mut queued, seq, epoch, Durability::Immediate);
                    match &result {
                        Ok(()) => {
                            through = seq;
                            since = None;
                        }
                        // The writer answers those writes with the error; the logged ones stay.
                        Err(_) => queued.truncate(before),
                    }
                    let _ = done.send(result);
                }
            }
        }
        let due = since.is_some_and(|at| at.elapsed() >= every);
        if !queued.is_empty() && (due || closed || queued.len() >= APPLY_MAX) {
            match flush(&mut idle, &mut queued, through, None, Durability::None) {
                Ok(()) => since = None,
                Err(e) => {
                    // Kept in the overlay and the log; tried again after `every`.
                    metrics::counter!(telemetry::STORAGE_ERRORS_TOTAL).increment(1);
                    tracing::error!(error = %e, writes = queued.len(), "storage apply failed");
                    since = Some(Instant::now());
                }
            }
        }
        if closed {
            return;
        }
    }
}

/// A write with its record and index keys encoded once, for the log, the tables and the
/// overlay.
struct Encoded {
    op: WriteOp,
    record: Vec<u8>,
    answer: Option<Vec<u8>>,
    /// The events an `Appended` adds (a JSON array), its `LOG_TAIL` row.
    tail: Option<Vec<u8>>,
    /// Supplier-by-day key (inserts).
    day: Option<String>,
    /// Pending-queue key (a lead due for another auction).
    queue: Option<String>,
    /// Idempotency key (an insert that carries one).
    idem: Option<String>,
}

fn encode(op: WriteOp) -> Result<Encoded, StorageError> {
    let (mut day, mut queue, mut idem, mut answer, mut tail) = (None, None, None, None, None);
    let record = match &op {
        WriteOp::Insert(r, idempotency) => {
            day = Some(day_key(&r.supplier_id, day_of(r.created_at_ms), &r.lead_id));
            if let Some((key, a)) = idempotency {
                idem = Some(idem_key(&r.supplier_id, key));
                answer = Some(serde_json::to_vec(a).map_err(backend)?);
            }
            queue = r
                .next_retry_ms
                .map(|due| pending_key(&r.campaign_id, due, &r.lead_id));
            serde_json::to_vec(r.as_ref()).map_err(backend)?
        }
        WriteOp::Update(r) => {
            queue = r
                .next_retry_ms
                .map(|due| pending_key(&r.campaign_id, due, &r.lead_id));
            serde_json::to_vec(r.as_ref()).map_err(backend)?
        }
        WriteOp::Append(..) => {
            return Err(StorageError::Backend(
                "an append reached the log unresolved".into(),
            ));
        }
        WriteOp::Appended(a) => {
            let r = &a.head;
            queue = r
                .next_retry_ms
                .map(|due| pending_key(&r.campaign_id, due, &r.lead_id));
            tail = Some(serde_json::to_vec(&a.events).map_err(backend)?);
            serde_json::to_vec(r).map_err(backend)?
        }
        WriteOp::State(_, value) => value.clone(),
    };
    Ok(Encoded {
        op,
        record,
        answer,
        tail,
        day,
        queue,
        idem,
    })
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl Encoded {
    /// `tag | record` (1: insert, 2: update), `| key | answer` for an insert with an
    /// Idempotency-Key (tag 3), `tag 4 | key | value` for a state write, `tag 5 | head |
    /// events` for an appended update, its offset after the tag (4 bytes, little-endian); each
    /// other part length-prefixed.
    fn write_payload(&self, out: &mut Vec<u8>) {
        match &self.op {
            WriteOp::Insert(_, None) => {
                out.push(1);
                put_bytes(out, &self.record);
            }
            WriteOp::Update(_) | WriteOp::Append(..) => {
                out.push(2);
                put_bytes(out, &self.record);
            }
            WriteOp::Appended(a) => {
                out.push(5);
                out.extend_from_slice(&a.from.to_le_bytes());
                put_bytes(out, &self.record);
                put_bytes(out, self.tail.as_deref().unwrap_or(b"[]"));
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
    // An appended update's offset comes before its length-prefixed parts.
    let parts = if payload.first() == Some(&5) { 5 } else { 1 };
    let mut rest = payload.get(parts..).ok_or_else(corrupt)?;
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
        1 => WriteOp::Insert(Arc::new(record(take()?)?), None),
        2 => WriteOp::Update(Arc::new(record(take()?)?)),
        3 => {
            let r = record(take()?)?;
            let key = text(take()?)?;
            let answer = serde_json::from_slice(take()?)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            WriteOp::Insert(Arc::new(r), Some((key, answer)))
        }
        4 => {
            let key = text(take()?)?;
            WriteOp::State(key, take()?.to_vec())
        }
        5 => {
            let from = u32::from_le_bytes(payload[1..5].try_into().expect("4"));
            let head = record(take()?)?;
            let events = serde_json::from_slice(take()?)
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            WriteOp::Appended(Arc::new(Appended {
                head,
                from,
                events,
                chain: None,
            }))
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
    /// Of the version replaced only its queue entry is needed: the rest of the record (its
    /// auction log grows with every re-auction) is skipped over, not built.
    #[derive(serde::Deserialize)]
    struct Queued {
        next_retry_ms: Option<i64>,
    }
    let previous: Option<Queued> = match leads.get(record.lead_id.as_str()).map_err(backend)? {
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

/// Drops a lead's `LOG_TAIL` rows from offset `from` on.
fn drop_tail(
    tails: &mut redb::Table<(&str, u32), &[u8]>,
    lead_id: &str,
    from: u32,
) -> Result<(), StorageError> {
    tails
        .retain_in((lead_id, from)..=(lead_id, u32::MAX), |_, _| false)
        .map_err(backend)
}

/// Applies writes to redb in one transaction (and the log epoch, at a checkpoint). Applying
/// a write again, as a replay (`replay`) may, gives the same tables; outside a replay an
/// insert is a new lead id, with no earlier version to look up.
fn apply(
    db: &Database,
    writes: &[Arc<Encoded>],
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
        let mut tails = txn.open_table(LOG_TAIL).map_err(backend)?;
        for write in writes {
            match &write.op {
                WriteOp::Insert(r, _) => {
                    if replay {
                        // A replayed insert may find a newer version of its lead: its pending
                        // entry and log rows go, as the later updates it is followed by put
                        // them back.
                        replace_lead(&mut leads, &mut pending, r, &write.record)?;
                        drop_tail(&mut tails, &r.lead_id, 0)?;
                    } else {
                        leads
                            .insert(r.lead_id.as_str(), write.record.as_slice())
                            .map_err(backend)?;
                    }
                }
                WriteOp::Update(r) | WriteOp::Append(r, _) => {
                    replace_lead(&mut leads, &mut pending, r, &write.record)?;
                    drop_tail(&mut tails, &r.lead_id, 0)?;
                }
                WriteOp::Appended(a) => {
                    let r = &a.head;
                    replace_lead(&mut leads, &mut pending, r, &write.record)?;
                    // Rows from `from` on are this write's (or, in a replay, later ones',
                    // which the replay writes again after it).
                    drop_tail(&mut tails, &r.lead_id, a.from)?;
                    if !a.events.is_empty() {
                        tails
                            .insert(
                                (r.lead_id.as_str(), a.from),
                                write.tail.as_deref().unwrap_or(b"[]"),
                            )
                            .map_err(backend)?;
                    }
                }
                WriteOp::State(key, _) => {
                    state
                        .insert(key.as_str(), write.record.as_slice())
                        .map_err(backend)?;
                }
            }
            if let Some(key) = &write.day {
                by_day.insert(key.as_str(), ()).map_err(backend)?;
            }
            if let Some(key) = &write.queue {
                pending.insert(key.as_str(), ()).map_err(backend)?;
            }
            if let (Some(key), Some(answer)) = (&write.idem, &write.answer) {
                idem.insert(key.as_str(), answer.as_slice())
                    .map_err(backend)?;
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

/// A lead found by a range read: its newest version from the overlay, or its id to read from
/// the same redb snapshot the keys came from.
enum Found {
    Overlay(Arc<Encoded>),
    Table(String),
}

fn read_found(
    found: BTreeMap<String, Found>,
    txn: &redb::ReadTransaction,
    limit: usize,
) -> Result<Vec<LeadRecord>, StorageError> {
    let mut out = Vec::with_capacity(found.len().min(limit));
    let mut tables = None;
    for (_, lead) in found.into_iter().take(limit) {
        match lead {
            Found::Overlay(write) => out.extend(write.op.whole(txn)?),
            Found::Table(lead_id) => {
                let tables = match &mut tables {
                    Some(tables) => tables,
                    None => tables.insert(LeadTables::open(txn)?),
                };
                out.extend(tables.lead(&lead_id)?);
            }
        }
    }
    Ok(out)
}

/// The tables a lead is read from, in one snapshot.
struct LeadTables {
    leads: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    tails: redb::ReadOnlyTable<(&'static str, u32), &'static [u8]>,
}

impl LeadTables {
    fn open(txn: &redb::ReadTransaction) -> Result<LeadTables, StorageError> {
        Ok(LeadTables {
            leads: txn.open_table(LEADS).map_err(backend)?,
            tails: txn.open_table(LOG_TAIL).map_err(backend)?,
        })
    }

    /// The lead with its whole log: the events its record holds, then its `LOG_TAIL` rows.
    fn lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError> {
        let Some(bytes) = self.leads.get(lead_id).map_err(backend)? else {
            return Ok(None);
        };
        let mut record: LeadRecord = serde_json::from_slice(bytes.value()).map_err(corrupt)?;
        for row in self
            .tails
            .range((lead_id, 0)..=(lead_id, u32::MAX))
            .map_err(backend)?
        {
            let (key, events) = row.map_err(backend)?;
            if key.value().1 as usize != record.auction_log.len() {
                // Not written so: read on, as every event stored is worth having.
                tracing::warn!(
                    lead_id,
                    offset = key.value().1,
                    events = record.auction_log.len(),
                    "auction log rows out of step"
                );
            }
            let events: Vec<AuctionEvent> =
                serde_json::from_slice(events.value()).map_err(corrupt)?;
            record.auction_log.extend(events);
        }
        Ok(Some(record))
    }
}

impl EmbeddedStore {
    /// The pending-queue keys of a campaign's leads due at `due_ms`, after `after`, in order,
    /// with where each lead's newest version is, and the redb snapshot they were read in: at
    /// least the first `limit` of them.
    fn due_keys(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<(redb::ReadTransaction, BTreeMap<String, Found>), StorageError> {
        use std::ops::Bound;
        let db = self.db()?;
        let start = match after {
            Some((due, lead_id)) => Bound::Excluded(pending_key(campaign_id, due, lead_id)),
            None => Bound::Included(format!("{campaign_id}{SEP}")),
        };
        let end = Bound::Excluded(pending_key(campaign_id, due_ms, "\u{7f}"));
        let mut found = BTreeMap::new();
        let txn = {
            let overlay = self.overlay();
            let txn = db.begin_read().map_err(backend)?;
            let queue = txn.open_table(PENDING).map_err(backend)?;
            // A key of the overlay counts while its lead's newest version is due then.
            for (key, _) in overlay.pending.range((start.clone(), end.clone())) {
                if let Some(record) = overlay.record(lead_of(key))
                    && record
                        .next_retry_ms
                        .map(|due| pending_key(campaign_id, due, &record.lead_id))
                        .as_deref()
                        == Some(key.as_str())
                {
                    found.insert(
                        key.clone(),
                        Found::Overlay(overlay.leads[lead_of(key)].1.clone()),
                    );
                }
            }
            // A lead of the overlay is settled above; redb's keys of other leads are current.
            let mut from_table = 0;
            let range = (
                start.as_ref().map(String::as_str),
                end.as_ref().map(String::as_str),
            );
            for entry in queue.range::<&str>(range).map_err(backend)? {
                if from_table >= limit {
                    break;
                }
                let (key, _) = entry.map_err(backend)?;
                let key = key.value();
                let lead_id = lead_of(key);
                if overlay.leads.contains_key(lead_id) {
                    continue;
                }
                found.insert(key.to_owned(), Found::Table(lead_id.to_owned()));
                from_table += 1;
            }
            txn
        };
        Ok((txn, found))
    }

    async fn write(&self, op: WriteOp) -> Result<(), StorageError> {
        let (done, wait) = oneshot::channel();
        self.sender()?
            .send(Job::Write(Box::new(WriteJob { op, done })))
            .map_err(|_| StorageError::Closed)?;
        wait.await.map_err(|_| StorageError::Closed)?
    }
}

/// The length of a stored lead's log, whose record holds its first `inline` events: past
/// them, where its last `LOG_TAIL` row ends.
fn log_len(
    txn: &redb::ReadTransaction,
    lead_id: &str,
    inline: usize,
) -> Result<usize, StorageError> {
    let tails = txn.open_table(LOG_TAIL).map_err(backend)?;
    let last = tails
        .range((lead_id, 0)..=(lead_id, u32::MAX))
        .map_err(backend)?
        .next_back();
    match last {
        Some(row) => {
            let (key, events) = row.map_err(backend)?;
            let added = serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(events.value())
                .map_err(corrupt)?
                .len();
            Ok(key.value().1 as usize + added)
        }
        None => Ok(inline),
    }
}

#[async_trait]
impl LeadStore for EmbeddedStore {
    async fn insert_lead(
        &self,
        record: Arc<LeadRecord>,
        idempotency: Option<(String, IdempotentAnswer)>,
    ) -> Result<(), StorageError> {
        self.write(WriteOp::Insert(record, idempotency)).await
    }

    async fn update_lead(&self, record: LeadRecord) -> Result<(), StorageError> {
        self.write(WriteOp::Update(Arc::new(record))).await
    }

    /// The record and the length of its log, without reading its `LOG_TAIL` rows' events
    /// but the last row's.
    async fn get_lead_for_reauction(
        &self,
        lead_id: &str,
    ) -> Result<Option<(LeadRecord, usize)>, StorageError> {
        let db = self.db()?;
        if let Some((_, write)) = self.overlay().leads.get(lead_id)
            && let (Some(record), Some(shape)) = (write.op.record(), write.op.shape())
        {
            return Ok(Some((record.head(), shape.len)));
        }
        let txn = db.begin_read().map_err(backend)?;
        let leads = txn.open_table(LEADS).map_err(backend)?;
        let Some(bytes) = leads.get(lead_id).map_err(backend)? else {
            return Ok(None);
        };
        let record: LeadRecord = serde_json::from_slice(bytes.value()).map_err(corrupt)?;
        let len = log_len(&txn, lead_id, record.auction_log.len())?;
        Ok(Some((record.without_log(), len)))
    }

    /// Hands the writer the new events only: it puts them after the stored log
    /// (`Writer::resolve`) without reading that log.
    async fn append_lead(
        &self,
        record: LeadRecord,
        stored_log_len: usize,
    ) -> Result<(), StorageError> {
        self.write(WriteOp::Append(Arc::new(record), stored_log_len))
            .await
    }

    async fn pending_due_after(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        let (txn, found) = self.due_keys(campaign_id, due_ms, after, limit)?;
        read_found(found, &txn, limit)
    }

    async fn pending_due_ids_after(
        &self,
        campaign_id: &str,
        due_ms: i64,
        after: Option<(i64, &str)>,
        limit: usize,
    ) -> Result<Vec<(i64, String)>, StorageError> {
        let (_txn, found) = self.due_keys(campaign_id, due_ms, after, limit)?;
        Ok(found
            .keys()
            .take(limit)
            .map(|key| (due_of(key), lead_of(key).to_owned()))
            .collect())
    }

    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<(), StorageError> {
        self.write(WriteOp::State(key.to_owned(), value)).await
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let db = self.db()?;
        if let Some((_, write)) = self.overlay().state.get(key) {
            return Ok(Some(write.record.clone()));
        }
        // Not in the overlay: redb holds its newest value (it is committed before it leaves).
        let txn = db.begin_read().map_err(backend)?;
        let table = txn.open_table(STATE).map_err(backend)?;
        Ok(table.get(key).map_err(backend)?.map(|v| v.value().to_vec()))
    }

    async fn get_lead(&self, lead_id: &str) -> Result<Option<LeadRecord>, StorageError> {
        let db = self.db()?;
        let joined = {
            let overlay = self.overlay();
            match overlay.leads.get(lead_id) {
                // Its log may be joined to redb's (`Chain`): a snapshot begun under the
                // overlay's lock holds nothing of the lead newer than this write.
                Some((_, write)) if matches!(write.op, WriteOp::Appended(_)) => {
                    Some((write.clone(), db.begin_read().map_err(backend)?))
                }
                Some((_, write)) => return Ok(write.op.record().cloned()),
                None => None,
            }
        };
        match joined {
            Some((write, txn)) => write.op.whole(&txn),
            None => {
                let txn = db.begin_read().map_err(backend)?;
                LeadTables::open(&txn)?.lead(lead_id)
            }
        }
    }

    async fn get_lead_without_log(
        &self,
        lead_id: &str,
    ) -> Result<Option<LeadRecord>, StorageError> {
        let db = self.db()?;
        if let Some(record) = self.overlay().record(lead_id) {
            return Ok(Some(record.head()));
        }
        // The record alone: the events it holds inline (its first auction's) are few, and its
        // `LOG_TAIL` rows are not read.
        let txn = db.begin_read().map_err(backend)?;
        let leads = txn.open_table(LEADS).map_err(backend)?;
        match leads.get(lead_id).map_err(backend)? {
            Some(bytes) => serde_json::from_slice::<LeadRecord>(bytes.value())
                .map(|record| Some(record.without_log()))
                .map_err(corrupt),
            None => Ok(None),
        }
    }

    async fn get_idempotent(
        &self,
        supplier_id: &str,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<IdempotentAnswer>, StorageError> {
        let db = self.db()?;
        let key = idem_key(supplier_id, key);
        let kept = match self.overlay().idempotency.get(&key) {
            Some((_, write)) => match &write.op {
                WriteOp::Insert(_, Some((_, answer))) => Some(answer.clone()),
                _ => None,
            },
            None => None,
        };
        let answer = match kept {
            Some(answer) => answer,
            None => {
                let txn = db.begin_read().map_err(backend)?;
                let table = txn.open_table(IDEMPOTENCY).map_err(backend)?;
                let Some(bytes) = table.get(key.as_str()).map_err(backend)? else {
                    return Ok(None);
                };
                serde_json::from_slice(bytes.value()).map_err(corrupt)?
            }
        };
        Ok((now_ms - answer.created_at_ms < IDEMPOTENCY_TTL_MS).then_some(answer))
    }

    async fn leads_of_supplier_day(
        &self,
        supplier_id: &str,
        day: i64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<LeadRecord>, StorageError> {
        let db = self.db()?;
        let prefix = day_key(supplier_id, day, "");
        let start = match after {
            Some(after) => day_key(supplier_id, day, after),
            None => prefix.clone(),
        };
        let mut found = BTreeMap::new();
        let txn = {
            let overlay = self.overlay();
            let txn = db.begin_read().map_err(backend)?;
            let index = txn.open_table(SUPPLIER_DAY).map_err(backend)?;
            let newest = |lead_id: &str| match overlay.leads.get(lead_id) {
                Some((_, write)) => Found::Overlay(write.clone()),
                None => Found::Table(lead_id.to_owned()),
            };
            for (key, _) in overlay.by_day.range(start.clone()..) {
                if !key.starts_with(&prefix) || found.len() >= limit {
                    break;
                }
                let lead_id = &key[prefix.len()..];
                if after != Some(lead_id) {
                    found.insert(key.clone(), newest(lead_id));
                }
            }
            let mut from_table = 0;
            for entry in index.range(start.as_str()..).map_err(backend)? {
                let (key, _) = entry.map_err(backend)?;
                let key = key.value();
                if !key.starts_with(&prefix) || from_table >= limit {
                    break;
                }
                let lead_id = &key[prefix.len()..];
                if after == Some(lead_id) || found.contains_key(key) {
                    continue;
                }
                found.insert(key.to_owned(), newest(lead_id));
                from_table += 1;
            }
            txn
        };
        read_found(found, &txn, limit)
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
        let paths = WAL_FILES.map(|name| dir.join(name));
        let (mut log, _) = wal::Wal::open([&paths[0], &paths[1]], WAL_CAPACITY, epoch).unwrap();
        log.restart(epoch);
        let mut framed = Vec::new();
        for op in ops {
            let mut payload = Vec::new();
            encode(op.clone()).unwrap().write_payload(&mut payload);
            log.frame(&payload, &mut framed);
        }
        log.append_durably(&mut framed).unwrap();
    }

    #[tokio::test]
    async fn a_log_replayed_over_tables_that_already_hold_it_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ops = vec![
            WriteOp::Insert(Arc::new(pending("A", Some(100))), None),
            WriteOp::Update(Arc::new(pending("A", Some(200)))),
            WriteOp::Insert(Arc::new(pending("B", Some(150))), None),
            WriteOp::Update(Arc::new(pending("B", None))),
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
            let encoded: Vec<_> = ops
                .iter()
                .map(|op| Arc::new(encode(op.clone()).unwrap()))
                .collect();
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
            &[WriteOp::Insert(Arc::new(pending("old", None)), None)],
        );
        let store = EmbeddedStore::open(dir.path(), 64).unwrap();
        assert_eq!(store.get_lead("old").await.unwrap(), None);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_crash_during_a_checkpoint_replays_both_epochs_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path(), 64).unwrap();
            store.close().await.unwrap();
        }
        // redb stores epoch 2. A checkpoint began: the log moved on to epoch 3 in the other
        // file, and the process died before redb's commit of epoch 2 ended.
        log_with(
            dir.path(),
            2,
            &[
                WriteOp::Insert(Arc::new(pending("A", Some(100))), None),
                WriteOp::Insert(Arc::new(pending("B", Some(150))), None),
                WriteOp::State("k".to_owned(), b"v2".to_vec()),
            ],
        );
        log_with(
            dir.path(),
            3,
            &[
                WriteOp::Update(Arc::new(pending("A", Some(200)))),
                WriteOp::Update(Arc::new(pending("B", None))),
                WriteOp::State("k".to_owned(), b"v3".to_vec()),
            ],
        );
        for _ in 0..2 {
            // Epoch 3's writes land over epoch 2's, and stay once the store has moved on.
            let store = EmbeddedStore::open(dir.path(), 64).unwrap();
            let due = store.pending_due("acme-auto", 1_000, 10).await.unwrap();
            assert_eq!(due, vec![pending("A", Some(200))]);
            assert_eq!(store.get_lead("B").await.unwrap(), Some(pending("B", None)));
            assert_eq!(store.get_state("k").await.unwrap(), Some(b"v3".to_vec()));
            store.close().await.unwrap();
        }
    }

    #[tokio::test]
    async fn writes_go_on_through_checkpoints_and_all_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let options = || Options {
            group_commit_max: 16,
            checkpoint_every: Duration::from_millis(1),
            apply_every: Duration::from_millis(1),
            ..Options::default()
        };
        let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
        for round in 0..10 {
            let writes = (0..20).map(|i| {
                let id = format!("L{round:02}-{i:02}");
                let store = &store;
                async move {
                    store
                        .insert_lead(Arc::new(pending(&id, Some(1_000 + i))), None)
                        .await
                        .unwrap();
                    store.update_lead(pending(&id, None)).await.unwrap();
                    store.get_lead(&id).await.unwrap()
                }
            });
            for record in futures::future::join_all(writes).await {
                assert_eq!(record.map(|r| r.next_retry_ms), Some(None));
            }
        }
        // Every handle dropped without a close: the writer still leaves redb checkpointed.
        drop(store);
        let mut reopened = None;
        for _ in 0..100 {
            match EmbeddedStore::open_with(dir.path(), options()) {
                Ok(store) => {
                    reopened = Some(store);
                    break;
                }
                // The old writer may still hold the database for a moment.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let store = reopened.expect("the store opens again");
        let epoch = {
            let txn = store.db().unwrap().begin_read().unwrap();
            let state = txn.open_table(STATE).unwrap();
            let value = state.get(WAL_EPOCH).unwrap().unwrap();
            u64::from_le_bytes(value.value().try_into().unwrap())
        };
        // Two opens move the epoch by 2 each; the rest are checkpoints taken while writing.
        assert!(epoch >= 10, "only {} checkpoints", epoch - 4);
        for round in 0..10 {
            for i in 0..20 {
                let id = format!("L{round:02}-{i:02}");
                let record = store.get_lead(&id).await.unwrap();
                assert_eq!(record, Some(pending(&id, None)), "{id}");
            }
        }
        assert!(
            store
                .pending_due("acme-auto", i64::MAX, 10)
                .await
                .unwrap()
                .is_empty()
        );
        store.close().await.unwrap();
    }

    fn unapplied(dir: &Path) -> EmbeddedStore {
        let options = Options {
            group_commit_max: 64,
            checkpoint_every: Duration::from_secs(3600),
            apply_every: Duration::from_secs(3600),
            ..Options::default()
        };
        EmbeddedStore::open_with(dir, options).unwrap()
    }

    /// A store that applies every 10 ms and never checkpoints on its own.
    fn applying_every_10ms(dir: &Path) -> EmbeddedStore {
        let options = Options {
            checkpoint_every: Duration::from_secs(3600),
            apply_every: Duration::from_millis(10),
            ..Options::default()
        };
        EmbeddedStore::open_with(dir, options).unwrap()
    }

    fn in_table(store: &EmbeddedStore, lead_id: &str) -> bool {
        let txn = store.db().unwrap().begin_read().unwrap();
        let leads = txn.open_table(LEADS).unwrap();
        leads.get(lead_id).unwrap().is_some()
    }

    fn ids(records: &[LeadRecord]) -> Vec<&str> {
        records.iter().map(|r| r.lead_id.as_str()).collect()
    }

    #[tokio::test]
    async fn reads_merge_unapplied_writes_over_the_tables() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = unapplied(dir.path());
            store
                .insert_lead(Arc::new(pending("A", Some(100))), None)
                .await
                .unwrap();
            store
                .insert_lead(Arc::new(pending("B", Some(150))), None)
                .await
                .unwrap();
            store
                .insert_lead(Arc::new(pending("C", None)), None)
                .await
                .unwrap();
            store.put_state("k", b"v1".to_vec()).await.unwrap();
            // Answered from the overlay: nothing is in redb yet.
            assert!(!in_table(&store, "A"));
            assert_eq!(
                ids(&store.pending_due("acme-auto", 1_000, 10).await.unwrap()),
                ["A", "B"]
            );
            store.close().await.unwrap();
        }
        // Reopened: A, B, C are in redb; the writes below stay in the overlay.
        let store = unapplied(dir.path());
        assert!(in_table(&store, "A"));
        store.update_lead(pending("A", Some(300))).await.unwrap();
        store.update_lead(pending("B", None)).await.unwrap();
        store
            .insert_lead(Arc::new(pending("D", Some(120))), None)
            .await
            .unwrap();
        store.put_state("k", b"v2".to_vec()).await.unwrap();
        let answer = IdempotentAnswer {
            lead_id: "E".into(),
            body: "{}".into(),
            // Recent: an open drops answers older than 24 h.
            created_at_ms: crate::clock::now_ms(),
        };
        store
            .insert_lead(
                Arc::new(pending("E", None)),
                Some(("key-1".into(), answer.clone())),
            )
            .await
            .unwrap();
        assert!(!in_table(&store, "D"));

        let check = |store: EmbeddedStore, answer: IdempotentAnswer| async move {
            // A's older key (due 100) in redb is left out; B is no longer queued.
            let due = store.pending_due("acme-auto", 1_000, 10).await.unwrap();
            assert_eq!(ids(&due), ["D", "A"]);
            assert_eq!(due[1], pending("A", Some(300)));
            assert_eq!(
                ids(&store.pending_due("acme-auto", 200, 10).await.unwrap()),
                ["D"]
            );
            assert_eq!(
                ids(&store.pending_due("acme-auto", 1_000, 1).await.unwrap()),
                ["D"]
            );
            assert_eq!(store.get_lead("B").await.unwrap(), Some(pending("B", None)));
            assert_eq!(store.get_state("k").await.unwrap(), Some(b"v2".to_vec()));
            assert_eq!(
                store
                    .get_idempotent("sup-1", "key-1", answer.created_at_ms + 1)
                    .await
                    .unwrap(),
                Some(answer)
            );
            // The supplier's day, in lead-id order across redb and the overlay, newest versions.
            let day = day_of(1_795_000_000_000);
            let all = store
                .leads_of_supplier_day("sup-1", day, None, 10)
                .await
                .unwrap();
            assert_eq!(ids(&all), ["A", "B", "C", "D", "E"]);
            assert_eq!(all[0], pending("A", Some(300)));
            let page = store
                .leads_of_supplier_day("sup-1", day, Some("B"), 2)
                .await
                .unwrap();
            assert_eq!(ids(&page), ["C", "D"]);
            store.close().await.unwrap();
        };
        check(store, answer.clone()).await;
        // The same answers from redb alone after the close's checkpoint.
        let store = unapplied(dir.path());
        assert!(in_table(&store, "D"));
        check(store, answer).await;
    }

    #[test]
    fn the_applier_is_idle_only_while_writes_come_slowly_and_it_does_not_starve() {
        // On a thread of its own: it changes its scheduling class.
        std::thread::spawn(|| {
            let mut off = IdleApply::new(false);
            off.settle(false);
            assert!(!off.idle && !priority::is_idle(), "disabled: never idle");
            let mut idle = IdleApply::new(priority::idle_is_reversible());
            if !idle.enabled {
                // Where a thread could not come back from idle priority it never goes there.
                idle.settle(false);
                assert!(!priority::is_idle());
                return;
            }
            idle.settle(false);
            assert!(idle.idle && priority::is_idle(), "slow writes: idle");
            idle.settle(true);
            assert!(!idle.idle && !priority::is_idle(), "fast writes: normal");
            idle.settle(false);
            idle.check(Duration::from_millis(1));
            assert!(idle.idle, "a batch on time keeps it idle");
            idle.normal();
            assert!(!priority::is_idle(), "normal for the overlay's lock");
            idle.settle(false);
            idle.check(IDLE_STARVED);
            assert!(
                !idle.idle && !priority::is_idle(),
                "starved: normal at once"
            );
            idle.settle(false);
            assert!(!priority::is_idle(), "and for IDLE_BACKOFF");
            idle.normal_until = Some(Instant::now());
            idle.settle(false);
            assert!(priority::is_idle(), "idle again once the backoff is over");
            idle.normal();
        })
        .join()
        .unwrap();
    }

    /// Has another thread hold the applier's queue lock (as an applier at idle priority may)
    /// until the sender is used or dropped, or 30 s pass; returns once it holds it.
    fn hold_queue(
        store: &Arc<EmbeddedStore>,
    ) -> (std_mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (held_tx, held_rx) = std_mpsc::channel();
        let (release_tx, release_rx) = std_mpsc::channel::<()>();
        let holder = {
            let store = store.clone();
            std::thread::spawn(move || {
                let _state = store.queue.lock();
                held_tx.send(()).unwrap();
                let _ = release_rx.recv_timeout(Duration::from_secs(30));
            })
        };
        held_rx.recv().unwrap();
        (release_tx, holder)
    }

    #[tokio::test]
    async fn a_write_is_answered_while_the_applier_holds_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(applying_every_10ms(dir.path()));
        // Another thread holds the queue's lock, as an applier at idle priority may while no
        // core is free for it.
        let (release_tx, holder) = hold_queue(&store);
        tokio::time::timeout(
            Duration::from_secs(10),
            store.insert_lead(Arc::new(pending("A", Some(100))), None),
        )
        .await
        .expect("answered without waiting for the queue")
        .unwrap();
        assert!(store.overlay().record("A").is_some(), "readable at once");
        assert!(!in_table(&store, "A"), "not handed over yet");
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        // Handed over within HAND_OFF_RETRY, applied within the apply interval.
        let started = Instant::now();
        while !in_table(&store, "A") && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(in_table(&store, "A"));
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn logged_writes_reach_the_tables_within_the_apply_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store = applying_every_10ms(dir.path());
        store
            .insert_lead(Arc::new(pending("A", Some(100))), None)
            .await
            .unwrap();
        let started = Instant::now();
        while store.overlay().len() > 0 && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(store.overlay().len(), 0);
        assert!(store.overlay().pending.is_empty() && store.overlay().by_day.is_empty());
        assert!(in_table(&store, "A"));
        assert_eq!(
            ids(&store.pending_due("acme-auto", 1_000, 10).await.unwrap()),
            ["A"]
        );
        store.close().await.unwrap();
    }

    fn event(i: usize) -> AuctionEvent {
        AuctionEvent::Ping {
            buyer: format!("buyer-{}", i % 7),
            outcome: "no_bid".to_owned(),
            bid_cents: None,
            latency_us: i as u64,
        }
    }

    /// A pending lead whose log has `events` events.
    fn logged(lead_id: &str, events: usize) -> LeadRecord {
        LeadRecord {
            auction_log: (0..events).map(event).collect(),
            ..pending(lead_id, Some(100))
        }
    }

    fn tail_rows(store: &EmbeddedStore, lead_id: &str) -> Vec<u32> {
        let txn = store.db().unwrap().begin_read().unwrap();
        let tails = txn.open_table(LOG_TAIL).unwrap();
        tails
            .range((lead_id, 0)..=(lead_id, u32::MAX))
            .unwrap()
            .map(|row| row.unwrap().0.value().1)
            .collect()
    }

    /// The lead's record as its `LEADS` row holds it (its inline log only).
    fn head_row(store: &EmbeddedStore, lead_id: &str) -> LeadRecord {
        let txn = store.db().unwrap().begin_read().unwrap();
        let leads = txn.open_table(LEADS).unwrap();
        serde_json::from_slice(leads.get(lead_id).unwrap().unwrap().value()).unwrap()
    }

    async fn applied(store: &EmbeddedStore) {
        let started = Instant::now();
        while store.overlay().len() > 0 && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(store.overlay().len(), 0, "applied within 10 s");
    }

    #[tokio::test]
    async fn a_re_auction_logs_only_the_events_it_adds() {
        let dir = tempfile::tempdir().unwrap();
        let store = unapplied(dir.path());
        let mut lead = logged("A", 3);
        store
            .insert_lead(Arc::new(lead.clone()), None)
            .await
            .unwrap();
        let mut sizes = Vec::new();
        for round in 0..40 {
            let (head, stored) = store.get_lead_for_reauction("A").await.unwrap().unwrap();
            assert_eq!((head, stored), (lead.head(), lead.auction_log.len()));
            lead.next_retry_ms = Some(200 + round);
            let added: Vec<AuctionEvent> = (0..5).map(|i| event(100 + i)).collect();
            store
                .append_lead(added_to(&lead, &added), stored)
                .await
                .unwrap();
            lead.auction_log.extend(added);
            assert_eq!(store.get_lead("A").await.unwrap().as_ref(), Some(&lead));
            let overlay = store.overlay();
            let write = &overlay.leads["A"].1;
            assert!(matches!(&write.op, WriteOp::Appended(a) if a.from as usize == stored));
            let mut payload = Vec::new();
            write.write_payload(&mut payload);
            sizes.push(payload.len());
        }
        // Each round logs its head and five events, whatever the log's length (203 events).
        let whole = serde_json::to_vec(&lead).unwrap().len();
        assert!(sizes[39] <= sizes[0] + 16, "{sizes:?}");
        assert!(sizes[39] * 10 < whole, "{} of {whole}", sizes[39]);
        // The same events again at the same place (a spilled sale replayed after a crash):
        // not added twice.
        let stored = lead.auction_log.len() - 5;
        let last: Vec<AuctionEvent> = lead.auction_log[stored..].to_vec();
        store
            .append_lead(added_to(&lead, &last), stored)
            .await
            .unwrap();
        assert_eq!(store.get_lead("A").await.unwrap().as_ref(), Some(&lead));
        // Events said to go after a log shorter than the stored one go after the stored one:
        // none is lost.
        store
            .append_lead(added_to(&lead, &[event(500)]), stored - 1)
            .await
            .unwrap();
        lead.auction_log.push(event(500));
        assert_eq!(store.get_lead("A").await.unwrap().as_ref(), Some(&lead));
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn appended_writes_not_yet_applied_read_whole_over_the_log_in_redb() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(applying_every_10ms(dir.path()));
        let mut lead = logged("A", 3);
        lead.next_retry_ms = Some(100);
        store
            .insert_lead(Arc::new(lead.clone()), None)
            .await
            .unwrap();
        applied(&store).await;
        // The applier is held, so the appends stay in the overlay, built on redb's log.
        let (release_tx, holder) = hold_queue(&store);
        for round in 0..3 {
            let stored = lead.auction_log.len();
            let added: Vec<AuctionEvent> = (0..2).map(|i| event(10 + round * 2 + i)).collect();
            lead.next_retry_ms = Some(200 + round as i64);
            store
                .append_lead(added_to(&lead, &added), stored)
                .await
                .unwrap();
            lead.auction_log.extend(added);
            assert_eq!(store.get_lead("A").await.unwrap().as_ref(), Some(&lead));
        }
        assert!(!in_table(&store, "A") || head_row(&store, "A").auction_log.len() == 3);
        assert!(matches!(
            &store.overlay().leads["A"].1.op,
            WriteOp::Appended(a) if a.chain.as_ref().is_some_and(|c| c.whole.is_none() && c.base == 3 && c.carried.len() == 4)
        ));
        assert_eq!(
            store.get_lead_for_reauction("A").await.unwrap(),
            Some((lead.head(), 9))
        );
        assert_eq!(
            store.pending_due("acme-auto", 1_000, 10).await.unwrap(),
            vec![lead.clone()]
        );
        // The last round again (a repeat): not added twice; events said to go after 4 go
        // after the stored 9.
        let last = lead.auction_log[7..].to_vec();
        store.append_lead(added_to(&lead, &last), 7).await.unwrap();
        assert_eq!(store.get_lead("A").await.unwrap().as_ref(), Some(&lead));
        store
            .append_lead(added_to(&lead, &[event(90)]), 4)
            .await
            .unwrap();
        lead.auction_log.push(event(90));
        assert_eq!(store.get_lead("A").await.unwrap().as_ref(), Some(&lead));
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        applied(&store).await;
        assert_eq!(store.get_lead("A").await.unwrap().as_ref(), Some(&lead));
        assert_eq!(head_row(&store, "A").auction_log.len(), 3);
        assert_eq!(tail_rows(&store, "A"), vec![3, 5, 7, 9]);
        Arc::into_inner(store).unwrap().close().await.unwrap();
        let store = applying_every_10ms(dir.path());
        assert_eq!(store.get_lead("A").await.unwrap(), Some(lead));
        store.close().await.unwrap();
    }

    /// `lead` with only `added` in its log, as a re-auction hands its outcome over.
    fn added_to(lead: &LeadRecord, added: &[AuctionEvent]) -> LeadRecord {
        LeadRecord {
            auction_log: added.to_vec(),
            ..lead.head()
        }
    }

    #[tokio::test]
    async fn appended_logs_are_rows_of_their_own_in_the_tables_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut lead = logged("A", 3);
        {
            let store = applying_every_10ms(dir.path());
            store
                .insert_lead(Arc::new(lead.clone()), None)
                .await
                .unwrap();
            for round in 0..30 {
                if round % 10 == 5 {
                    // Some rounds find the lead in the tables, others in the overlay.
                    applied(&store).await;
                }
                let stored = lead.auction_log.len();
                let added: Vec<AuctionEvent> = (0..4).map(|i| event(round * 4 + i)).collect();
                store
                    .append_lead(added_to(&lead, &added), stored)
                    .await
                    .unwrap();
                lead.auction_log.extend(added);
            }
            applied(&store).await;
            assert_eq!(head_row(&store, "A").auction_log.len(), 3);
            assert_eq!(
                tail_rows(&store, "A"),
                (0..30).map(|r| 3 + r * 4).collect::<Vec<u32>>()
            );
            assert_eq!(store.get_lead("A").await.unwrap().as_ref(), Some(&lead));
            store.close().await.unwrap();
        }
        let store = applying_every_10ms(dir.path());
        assert_eq!(store.get_lead("A").await.unwrap().as_ref(), Some(&lead));
        assert_eq!(
            store.pending_due("acme-auto", 1_000, 10).await.unwrap(),
            vec![lead.clone()]
        );
        // A whole update (a shorter log) leaves no rows behind.
        lead.auction_log.truncate(5);
        store.update_lead(lead.clone()).await.unwrap();
        applied(&store).await;
        assert!(tail_rows(&store, "A").is_empty());
        assert_eq!(store.get_lead("A").await.unwrap(), Some(lead));
        store.close().await.unwrap();
    }

    /// `whole`'s first `inline` events as its record's and the events from `from` on as its
    /// row, as the log holds an appended write.
    fn appended(whole: &LeadRecord, inline: usize, from: usize) -> Appended {
        Appended {
            head: LeadRecord {
                auction_log: whole.auction_log[..inline].to_vec(),
                ..whole.head()
            },
            from: from as u32,
            events: whole.auction_log[from..].to_vec(),
            chain: None,
        }
    }

    #[tokio::test]
    async fn appended_writes_replayed_from_the_log_give_the_whole_log() {
        let dir = tempfile::tempdir().unwrap();
        let whole = |n| Arc::new(logged("C", n));
        let ops = vec![
            WriteOp::Insert(whole(2), None),
            WriteOp::Appended(Arc::new(appended(&whole(5), 2, 2))),
            WriteOp::Appended(Arc::new(appended(&whole(5), 2, 5))),
            WriteOp::Appended(Arc::new(appended(&whole(9), 2, 5))),
        ];
        // Read back from the log as a replay reads it: no whole record.
        for op in &ops {
            let mut payload = Vec::new();
            encode(op.clone()).unwrap().write_payload(&mut payload);
            let read = decode(&payload).unwrap();
            assert_eq!(read.lead_id(), Some("C"));
            assert_eq!(read.shape(), op.shape());
        }
        {
            let store = EmbeddedStore::open(dir.path(), 64).unwrap();
            store.close().await.unwrap();
        }
        // Replayed once onto tables without the lead, and again over tables that hold it.
        log_with(dir.path(), 2, &ops);
        let store = EmbeddedStore::open(dir.path(), 64).unwrap();
        assert_eq!(store.get_lead("C").await.unwrap(), Some(logged("C", 9)));
        store.close().await.unwrap();
        let db = Database::create(dir.path().join("leadex.redb")).unwrap();
        let epoch = {
            let txn = db.begin_read().unwrap();
            let state = txn.open_table(STATE).unwrap();
            u64::from_le_bytes(
                state
                    .get(WAL_EPOCH)
                    .unwrap()
                    .unwrap()
                    .value()
                    .try_into()
                    .unwrap(),
            )
        };
        drop(db);
        log_with(dir.path(), epoch, &ops);
        let store = EmbeddedStore::open(dir.path(), 64).unwrap();
        assert_eq!(store.get_lead("C").await.unwrap(), Some(logged("C", 9)));
        assert_eq!(tail_rows(&store, "C"), [2, 5]);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn due_leads_are_listed_by_id_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = applying_every_10ms(dir.path());
        for (id, due) in [("A", 100), ("B", 50), ("C", 5_000)] {
            store
                .insert_lead(Arc::new(logged(id, 2)), None)
                .await
                .unwrap();
            let mut queued = logged(id, 2);
            queued.next_retry_ms = Some(due);
            store.update_lead(queued).await.unwrap();
        }
        applied(&store).await;
        // A lead is updated again (in the overlay), another's record is unreadable in redb.
        let mut later = logged("A", 2);
        later.next_retry_ms = Some(200);
        store.update_lead(later).await.unwrap();
        {
            let txn = store.db().unwrap().begin_write().unwrap();
            txn.open_table(LEADS)
                .unwrap()
                .insert("B", b"not a record".as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let listed = store
            .pending_due_ids_after("acme-auto", 1_000, None, 10)
            .await
            .unwrap();
        assert_eq!(listed, [(50, "B".to_owned()), (200, "A".to_owned())]);
        assert!(store.pending_due("acme-auto", 1_000, 10).await.is_err());
        store.close().await.unwrap();
    }

    /// Writes `LOG_TAIL` rows of `lead_id` straight into redb, behind the store.
    fn put_tail_rows(store: &EmbeddedStore, lead_id: &str, rows: &[(u32, &[u8])]) {
        let txn = store.db().unwrap().begin_write().unwrap();
        {
            let mut tails = txn.open_table(LOG_TAIL).unwrap();
            for (offset, bytes) in rows {
                tails.insert((lead_id, *offset), *bytes).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    #[tokio::test]
    async fn a_lead_read_without_its_log_reads_no_log_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = applying_every_10ms(dir.path());
        let mut lead = logged("A", 2);
        store
            .insert_lead(Arc::new(lead.clone()), None)
            .await
            .unwrap();
        let added: Vec<AuctionEvent> = (10..14).map(event).collect();
        store.append_lead(added_to(&lead, &added), 2).await.unwrap();
        lead.auction_log.extend(added.clone());
        // From the overlay, then from redb with its log row made unreadable.
        assert_eq!(
            store.get_lead_without_log("A").await.unwrap(),
            Some(lead.clone().without_log())
        );
        applied(&store).await;
        put_tail_rows(&store, "A", &[(2, b"not events")]);
        assert!(store.get_lead("A").await.is_err());
        assert_eq!(
            store.get_lead_without_log("A").await.unwrap(),
            Some(lead.clone().without_log())
        );
        // A re-auction's read parses the last log row only for its length.
        let events = serde_json::to_vec(&added).unwrap();
        put_tail_rows(&store, "A", &[(2, &events), (6, b"[1, 2, 3]")]);
        assert!(store.get_lead("A").await.is_err());
        assert_eq!(
            store.get_lead_for_reauction("A").await.unwrap(),
            Some((lead.clone().without_log(), 9))
        );
        // Nor does a re-auction's write read the log: it is stored with a row unreadable.
        store
            .append_lead(added_to(&lead, &[event(20), event(21)]), 9)
            .await
            .unwrap();
        assert_eq!(
            store.get_lead_for_reauction("A").await.unwrap(),
            Some((lead.without_log(), 11))
        );
        applied(&store).await;
        assert_eq!(tail_rows(&store, "A"), vec![2, 6, 9]);
        assert_eq!(store.get_lead_without_log("B").await.unwrap(), None);
        store.close().await.unwrap();
    }
}
