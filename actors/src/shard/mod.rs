//! The `Shard` actor: one shard's engine, state, owner and size limit, and its
//! group commit.
//!
//! Every request names a client id, checked against the shard's owner. Writes
//! are staged in the actor and acknowledged by a deferred reply once the group
//! commit that covers them is durable: while one group's synced write is in
//! flight, new writes are staged for the next group, so concurrent writers
//! share one WAL sync each (group commit, as in RocksDB's write groups and
//! PostgreSQL's commit_delay). The next group is prepared (its records read,
//! its batch built) during that write and written right after it succeeded,
//! its commit task told so by the previous one's (`commit::prepare_group`
//! says why that is exact). Reads go to the engine outside the actor and see only durable,
//! committed data.
//!
//! The order of checks on a request, so a rejected request changes nothing:
//! arguments (`INVALID_ARGUMENT`), owner (`PERMISSION_DENIED`), state
//! (`NOT_FOUND` when deleted, `FAILED_PRECONDITION` when read-only), space
//! (`RESOURCE_EXHAUSTED`: a full volume, see `Shard::volume_full`, or the
//! shard's size limit).
//!
//! A write may carry a request id (`Put::request_id`): the shard applies it
//! at most once within `Limits::request_window_ms` (see [`commit`]). A retry
//! whose first attempt is still staged or committing here is answered
//! `UNAVAILABLE` (retry later); one that finds the shard closed or full is
//! answered `OK` when the first attempt's record is there, since that attempt
//! did apply.

pub mod commit;
pub mod layout;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::actor::{Actor, Context, Handler, Message, Recipient, Reply};
use crate::engine::{Engine, EngineError, EngineSnapshot, EngineStats, KvPairs};
use crate::error::AttacheError;
use crate::io_watch::IoWatch;
use crate::lease::LeaseGate;
use crate::limits::Limits;
use commit::{StagedOp, StagedRequest};
use layout::{IndexEntry, ShardMeta, ShardState};

/// A shard id: unique across the cluster, allocated in increasing order.
pub type ShardId = u64;

/// What callers learn about a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// The shard id.
    pub shard_id: ShardId,
    /// The owning client id.
    pub owner: String,
    /// Lifecycle state.
    pub state: ShardState,
    /// Size limit, bytes.
    pub size_limit: u64,
}

/// A shard's statistics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    /// Id, owner, state and limit.
    pub info: ShardInfo,
    /// Live bytes (keys, values, index entries), as counted against the limit.
    pub live_bytes: u64,
    /// Live keys.
    pub live_keys: u64,
    /// Engine counters since the shard was opened on this node.
    pub engine: EngineStats,
    /// Group commits (synced engine writes) since open.
    pub group_commits: u64,
    /// Staged operations those group commits carried.
    pub committed_ops: u64,
}

/// One entry of a put or batch put.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutEntry {
    /// Key, 1 byte to `Limits::max_key_bytes`.
    pub key: Vec<u8>,
    /// Value, up to `Limits::max_value_bytes`.
    pub value: Vec<u8>,
    /// Secondary index entries pointing at `key`.
    pub indexes: Vec<IndexEntry>,
}

/// A hit of an index scan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexHit {
    /// The indexed value.
    pub value: Vec<u8>,
    /// The primary key it points at.
    pub key: Vec<u8>,
}

/// A request to one shard; the shard manager routes it by shard id.
pub trait ShardOp: Message<Reply = Result<<Self as ShardOp>::Ok, AttacheError>> {
    /// What the request yields on success.
    type Ok: Send + 'static;
    /// The client id the request claims.
    fn client_id(&self) -> &str;
}

macro_rules! shard_messages {
    ($($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty),* $(,)? } -> $reply:ty;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name { $($(#[$fdoc])* pub $field: $ty),* }
        impl Message for $name { type Reply = Result<$reply, AttacheError>; }
        impl ShardOp for $name {
            type Ok = $reply;
            fn client_id(&self) -> &str { &self.client_id }
        }
    )*};
}

shard_messages! {
    /// Puts one key with its index entries; acknowledged once durable.
    Put {
        /// The client id that must own the shard.
        client_id: String,
        /// The key, value and index entries to write.
        entry: PutEntry,
        /// The client-chosen id of this write, the same on every retry (up
        /// to `limits::MAX_REQUEST_ID_BYTES`); `None`: no retry protection.
        request_id: Option<String>,
    } -> ();
    /// Puts many keys atomically: all or none; acknowledged once durable.
    BatchPut {
        /// The client id that must own the shard.
        client_id: String,
        /// The entries, 1 to `Limits::max_batch_entries`.
        entries: Vec<PutEntry>,
        /// As `Put::request_id`.
        request_id: Option<String>,
    } -> ();
    /// Removes one key and its index entries; acknowledged once durable.
    DeleteKey {
        /// The client id that must own the shard.
        client_id: String,
        /// The key.
        key: Vec<u8>,
        /// As `Put::request_id`.
        request_id: Option<String>,
    } -> ();
    /// Reads one key.
    Get {
        /// The client id that must own the shard.
        client_id: String,
        /// The key.
        key: Vec<u8>,
    } -> Option<Vec<u8>>;
    /// Reads many keys; answers in request order.
    BatchGet {
        /// The client id that must own the shard.
        client_id: String,
        /// The keys, 1 to `Limits::max_batch_entries`.
        keys: Vec<Vec<u8>>,
    } -> Vec<Option<Vec<u8>>>;
    /// Reads up to `limit` pairs with `start <= key < end` (empty `end`: no
    /// bound; `limit` 0: the page limit).
    Scan {
        /// The client id that must own the shard.
        client_id: String,
        /// The first key of the range (inclusive).
        start: Vec<u8>,
        /// The end of the range (exclusive); empty for no bound.
        end: Vec<u8>,
        /// Most pairs returned; 0 or over the page limit: the page limit.
        limit: u32,
    } -> Vec<(Vec<u8>, Vec<u8>)>;
    /// Opens a scan whose pages all read one snapshot of the shard: its
    /// first page is what `Scan` with the same fields reads, and the
    /// returned [`ScanPages`] reads the next ones from the same snapshot. A
    /// linearizable scan streams through it, so that no page sees a write
    /// that another page misses (a batch is seen whole or not at all).
    ScanSnapshot {
        /// The client id that must own the shard.
        client_id: String,
        /// The first key of the range (inclusive).
        start: Vec<u8>,
        /// The end of the range (exclusive); empty for no bound.
        end: Vec<u8>,
        /// Most pairs in the first page; 0 or over the page limit: the page limit.
        limit: u32,
    } -> (KvPairs, ScanPages);
    /// Reads up to `limit` entries of index `name` whose value starts with
    /// `value_prefix`, after the hit `after` (for paging).
    ScanIndex {
        /// The client id that must own the shard.
        client_id: String,
        /// The index name.
        name: String,
        /// The prefix of the indexed values to return (empty: all).
        value_prefix: Vec<u8>,
        /// The last hit of the previous page; `None` for the first page.
        after: Option<IndexHit>,
        /// Most hits returned; 0 or over the page limit: the page limit.
        limit: u32,
    } -> Vec<IndexHit>;
    /// Opens an index scan whose pages all read one snapshot of the shard:
    /// its first page is what `ScanIndex` with the same fields (and no
    /// `after`) reads, and the returned [`IndexPages`] reads the next ones
    /// from the same snapshot. A ScanIndex call streams through it, so that
    /// a key whose value changes during the scan is listed once, under one
    /// of its values, never twice or not at all.
    ScanIndexSnapshot {
        /// The client id that must own the shard.
        client_id: String,
        /// The index name.
        name: String,
        /// The prefix of the indexed values to return (empty: all).
        value_prefix: Vec<u8>,
        /// Most hits in the first page; 0 or over the page limit: the page limit.
        limit: u32,
    } -> (Vec<IndexHit>, IndexPages);
    /// Makes the shard read-only; acknowledged once durable. Idempotent.
    Close {
        /// The client id that must own the shard.
        client_id: String,
    } -> ShardInfo;
    /// Marks the shard deleted; acknowledged once durable. The shard manager
    /// then removes its data.
    MarkDeleted {
        /// The client id that must own the shard.
        client_id: String,
    } -> ShardInfo;
    /// Statistics.
    Stats {
        /// The client id that must own the shard.
        client_id: String,
    } -> ShardStats;
}

/// Stops taking requests, lets the group commit in flight finish, and closes
/// the engine; replies once the engine is closed. Requests after it get
/// `UNAVAILABLE`. Sent by the shard manager before it stops a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown;

impl Message for Shutdown {
    type Reply = ();
}

/// Closes the shard, as [`Shutdown`] does, if it is idle: no write staged,
/// no group commit in flight, no scan stream open ([`ScanPages`] or
/// [`IndexPages`] alive), and not failed (see [`ShardFailed`]).
/// Replies `true` when it closed (requests after it get `UNAVAILABLE`),
/// `false` when busy (nothing changes). Sent by the shard manager to keep
/// its open shards within `ShardManagerConfig::max_open_shards`; the
/// manager sends it only when no request it forwarded is unanswered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseIfIdle;

impl Message for CloseIfIdle {
    type Reply = bool;
}

/// A group's batch is built, sent by its commit task to its shard: the
/// meta after it and its overlay, on top of which the next group is
/// prepared while this one is written.
struct Prepared {
    seq: u64,
    meta: ShardMeta,
    overlay: Arc<commit::Overlay>,
}

impl Message for Prepared {
    type Reply = ();
}

/// How a group's commit task ended, sent to its shard.
struct Committed {
    seq: u64,
    outcome: WriteOutcome,
    ops: usize,
}

/// What became of a group.
enum WriteOutcome {
    /// Written and synced.
    Written(commit::GroupCommitted),
    /// Not prepared: its reads failed, or a record did not decode. Nothing
    /// of it was written.
    NotPrepared(EngineError),
    /// Its write failed (after `EngineError::Indeterminate`, it may be durable).
    Failed(EngineError),
    /// Not written: the group before it did not land.
    Skipped,
}

impl Message for Committed {
    type Reply = ();
}

type Waiter = oneshot::Sender<Result<(), AttacheError>>;

/// A group commit in flight (see [`Shard::start_commit`]).
struct Group {
    /// Its number, counted from 1 by this actor.
    seq: u64,
    requests: Arc<Vec<StagedRequest>>,
    /// The most live bytes its ops add (`StagedOp::max_added_bytes`).
    added_bytes: u64,
    /// Set when the group before it did not land: its commit task, which
    /// finds out by itself, skips its write.
    doomed: bool,
    /// Once it is prepared: the meta after it and its overlay.
    prepared: Option<(ShardMeta, Arc<commit::Overlay>)>,
    /// Whether it landed, for the commit task of the group after it (taken
    /// when that task starts).
    landed: Option<oneshot::Receiver<bool>>,
}

/// One shard; see the module docs.
pub struct Shard {
    engine: Arc<dyn Engine>,
    /// Writes go to the engine only while this node's lease is certainly valid.
    gate: Arc<LeaseGate>,
    /// Meta as last committed.
    meta: ShardMeta,
    /// The state requests see: ahead of `meta.state` while a close or delete is staged.
    state: ShardState,
    limits: Limits,
    /// Requests for the next group, each with its waiter.
    staged: Vec<StagedRequest>,
    /// The request ids of `staged` and of every group in `groups`, each
    /// once: a retry is admitted only when its id is not here.
    in_flight_ids: std::collections::BTreeSet<String>,
    staged_bytes: u64,
    waiters: Vec<Waiter>,
    /// The group commits in flight, oldest first: at most two, the newer
    /// one started on top of the older one once that one was prepared.
    groups: std::collections::VecDeque<Group>,
    /// The number of the last group started.
    group_seq: u64,
    group_commits: u64,
    committed_ops: u64,
    /// Set by [`Shutdown`]; its waiters are answered once the engine is closed.
    shutdown: Option<Vec<oneshot::Sender<()>>>,
    /// A backup's read-only view: serves `Stale` reads only.
    read_only: bool,
    /// Set while a read-only shard serves a `Stale` read through the read handlers.
    serving_stale: bool,
    /// When a read-only shard last caught up with the primary.
    caught_up_at: Option<Instant>,
    /// The volume's writes in flight, which this shard's group commits join.
    io: Arc<IoWatch>,
    /// Set when the shard's manager is retired (a step-down): the shard
    /// then refuses every request, as after [`Shutdown`].
    retired: Arc<std::sync::atomic::AtomicBool>,
    /// Set when a group commit's outcome is unknown (`EngineError::Indeterminate`):
    /// the shard refuses every request until its manager reopens it.
    failed: bool,
    /// Where a failed shard asks to be reopened (its shard manager).
    on_failure: Option<Recipient<ShardFailed>>,
    /// A primary's shard served over a read-only engine because the volume
    /// was full when it opened: reads as usual, writes refused.
    full: bool,
    /// Held by every [`ScanPages`] and [`IndexPages`] of this shard: more
    /// than one holder means a scan stream is open, and [`CloseIfIdle`]
    /// leaves the shard open.
    scans: Arc<()>,
}

/// Sent by a shard whose write failed with an unknown outcome to its shard
/// manager, which closes it; its next request reopens it from the volume.
pub struct ShardFailed {
    /// The shard.
    pub shard_id: ShardId,
    /// The failed engine's [`Engine::sequence`]: what it had made durable.
    /// A later view past it holds the failed write, which may be in the
    /// volume's page cache only.
    pub durable_through: Option<u64>,
}

impl Message for ShardFailed {
    type Reply = ();
}

impl Shard {
    /// A shard actor over an open `engine` whose committed meta is `meta`,
    /// writing only while `gate` is open.
    pub fn new(engine: Arc<dyn Engine>, meta: ShardMeta, limits: Limits, gate: Arc<LeaseGate>) -> Self {
        Shard {
            engine,
            gate,
            state: meta.state,
            meta,
            limits,
            staged: Vec::new(),
            in_flight_ids: std::collections::BTreeSet::new(),
            staged_bytes: 0,
            waiters: Vec::new(),
            groups: std::collections::VecDeque::new(),
            group_seq: 0,
            group_commits: 0,
            committed_ops: 0,
            shutdown: None,
            read_only: false,
            serving_stale: false,
            caught_up_at: None,
            io: Arc::default(),
            retired: Arc::default(),
            failed: false,
            on_failure: None,
            full: false,
            scans: Arc::new(()),
        }
    }

    /// Where this shard reports a write with an unknown outcome (see
    /// [`ShardFailed`]): its shard manager.
    pub fn with_failure_report(mut self, report: Recipient<ShardFailed>) -> Self {
        self.on_failure = Some(report);
        self
    }

    /// A shard whose engine was opened read-only because its volume had no
    /// free space (when `full`): it serves reads, and refuses every write,
    /// close and delete with `RESOURCE_EXHAUSTED` (nothing written) until
    /// its manager reopens it read-write.
    pub fn volume_full(mut self, full: bool) -> Self {
        self.full = full;
        self
    }

    /// Refuses a change of the shard while its volume is full.
    fn check_space(&self) -> Result<(), AttacheError> {
        if self.full {
            return Err(AttacheError::ResourceExhausted(format!(
                "the volume holding shard {} has no free space: it serves reads but takes no writes, closes or \
                 deletes, and nothing was written. Retry once the volume has space (grow the volume: deletes \
                 need space too)",
                self.meta.shard_id
            )));
        }
        Ok(())
    }

    /// This shard refuses every request once `retired` is set (its manager's
    /// flag, see `ShardManager::retired_flag`).
    pub fn with_retired(mut self, retired: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.retired = retired;
        self
    }

    /// This shard's group commits count as writes in flight to its volume in
    /// `io` (shared with the volume manager, which gives a hung volume up).
    pub fn with_io_watch(mut self, io: Arc<IoWatch>) -> Self {
        self.io = io;
        self
    }

    /// Reads the meta of the shard stored in `engine`.
    ///
    /// Errors: `Ok(None)` when the engine holds no meta (a create that never
    /// completed); engine errors otherwise.
    pub async fn load_meta(engine: &dyn Engine) -> Result<Option<ShardMeta>, EngineError> {
        engine.get(layout::META_KEY).await?.map(|b| ShardMeta::decode(&b)).transpose()
    }

    /// Writes the meta of a new shard to `engine`, synced.
    pub async fn init_meta(engine: &dyn Engine, meta: &ShardMeta) -> Result<(), EngineError> {
        engine.put(layout::META_KEY, &meta.encode(), true).await
    }

    fn info(&self) -> ShardInfo {
        ShardInfo {
            shard_id: self.meta.shard_id,
            owner: self.meta.owner.clone(),
            state: self.state,
            size_limit: self.meta.size_limit,
        }
    }

    fn check_owner(&self, client_id: &str) -> Result<(), AttacheError> {
        if client_id != self.meta.owner {
            return Err(AttacheError::PermissionDenied(format!(
                "client {client_id:?} does not own shard {}: use the client id that created it",
                self.meta.shard_id
            )));
        }
        Ok(())
    }

    /// A backup's read-only shard over an engine opened read-only, whose meta
    /// (as last made durable by the primary) is `meta`. It serves [`Stale`]
    /// reads, catching up with the primary at most every [`CATCH_UP_MS`].
    /// Its view counts as caught up now; see [`Shard::as_of`].
    pub fn read_only(engine: Arc<dyn Engine>, meta: ShardMeta, limits: Limits) -> Self {
        let mut shard = Shard::new(engine, meta, limits, Arc::new(LeaseGate::new(Default::default())));
        shard.read_only = true;
        shard.caught_up_at = Some(Instant::now());
        shard
    }

    /// The same read-only shard, its view as old as `opened`: the moment
    /// before its engine began to open (a view is as of its open's read of
    /// the log, so the age of a stale read counts from before it).
    pub fn as_of(mut self, opened: Instant) -> Self {
        if self.read_only {
            self.caught_up_at = Some(opened);
        }
        self
    }

    /// Checks a request may be served: the shard is up, this node's lease is
    /// certainly valid (a primary whose lease may have expired could already
    /// have been replaced, so it serves neither writes nor linearizable
    /// reads), the client owns the shard and the shard is not deleted.
    fn check_readable(&self, client_id: &str) -> Result<(), AttacheError> {
        if self.read_only && !self.serving_stale {
            return Err(AttacheError::unavailable(format!(
                "shard {}: this node is a backup for its volume and serves only reads that accept stale data; \
                 retry at the primary",
                self.meta.shard_id
            )));
        }
        if !self.gate.is_open() && !self.serving_stale {
            return Err(AttacheError::unavailable(format!(
                "shard {}: this node's lease may have expired, so it serves no requests; retry (another node may take over)",
                self.meta.shard_id
            )));
        }
        if self.shutdown.is_some() || self.retired.load(std::sync::atomic::Ordering::Acquire) || self.failed {
            return Err(AttacheError::unavailable(format!(
                "shard {} is shutting down on this node; retry",
                self.meta.shard_id
            )));
        }
        self.check_owner(client_id)?;
        if self.state == ShardState::Deleted {
            // Only a committed delete is an answer; one still in its group
            // commit may fail, and then the shard was never deleted.
            if self.meta.state != ShardState::Deleted {
                return Err(AttacheError::unavailable(format!("shard {} is being deleted; retry", self.meta.shard_id)));
            }
            return Err(AttacheError::NotFound(format!("shard {} was deleted", self.meta.shard_id)));
        }
        Ok(())
    }

    fn check_writable(&self, client_id: &str) -> Result<(), AttacheError> {
        if self.read_only {
            return Err(AttacheError::unavailable(format!(
                "shard {}: this node is a backup for its volume and takes no writes; retry at the primary",
                self.meta.shard_id
            )));
        }
        self.check_readable(client_id)?;

        if self.state == ShardState::ReadOnly {
            // A close still in its group commit may fail, and then the shard
            // was never closed: refuse as a retry, not as a fact (found by
            // the simulation: random-swarm seed 5589).
            if self.meta.state != ShardState::ReadOnly {
                return Err(AttacheError::unavailable(format!(
                    "shard {} is closing; retry (it takes no writes once the close commits)",
                    self.meta.shard_id
                )));
            }
            return Err(AttacheError::FailedPrecondition(format!(
                "shard {} is closed (read-only) and takes no more writes: create a new shard",
                self.meta.shard_id
            )));
        }
        self.check_space()
    }

    fn check_entry(&self, entry: &PutEntry) -> Result<(), AttacheError> {
        self.limits.check_key(&entry.key)?;
        self.limits.check_value(&entry.value)?;
        if entry.indexes.len() > self.limits.max_indexes_per_put {
            return Err(AttacheError::InvalidArgument(format!(
                "put has {} index entries, over the limit of {}",
                entry.indexes.len(),
                self.limits.max_indexes_per_put
            )));
        }
        for idx in &entry.indexes {
            self.limits.check_index(&idx.name, &idx.value)?;
        }
        Ok(())
    }

    fn check_room(&self, ops: &[StagedOp]) -> Result<(), AttacheError> {
        let need: u64 = ops.iter().map(StagedOp::max_added_bytes).sum();
        let in_flight: u64 = self.groups.iter().filter(|g| !g.doomed).map(|g| g.added_bytes).sum();
        let used = self.meta.live_bytes + in_flight + self.staged_bytes;
        if used + need > self.meta.size_limit {
            return Err(AttacheError::ResourceExhausted(format!(
                "shard {} is full: {used} of {} bytes used and this write adds up to {need}: \
                 close it and write to a new shard",
                self.meta.shard_id, self.meta.size_limit
            )));
        }
        Ok(())
    }

    /// Whether a request with `id` is staged or in a group commit in flight.
    fn in_flight(&self, id: &str) -> bool {
        self.in_flight_ids.contains(id)
    }

    /// Forgets the ids of `requests`, which are no longer staged or in flight.
    fn settled(&mut self, requests: &[StagedRequest]) {
        for id in requests.iter().filter_map(|r| r.request_id.as_deref()) {
            assert!(self.in_flight_ids.remove(id), "request id {id:?} was in flight");
        }
    }

    /// Checks a write request `ops` with `request_id` may be staged: `check`
    /// (arguments, owner, state), then room. A retry (an id already staged
    /// or in flight) is answered `UNAVAILABLE` so the client asks again once
    /// its first attempt is settled; a retry refused because the shard is
    /// now closed or full is answered `Ok` when its first attempt applied.
    ///
    /// Returns `Ok(None)` to stage, `Ok(Some(reply))` to answer at once.
    async fn admit_write(
        &self,
        request_id: Option<&str>,
        ops: &[StagedOp],
        check: Result<(), AttacheError>,
    ) -> Result<Option<Result<(), AttacheError>>, AttacheError> {
        if let Some(id) = request_id {
            self.limits.check_request_id(id)?;
        }
        let refused = check.and_then(|_| self.check_room(ops)).err();
        // Only a refusal that depends on the shard's history (closed, full)
        // may hide an earlier attempt that applied.
        let after_history =
            |e: &AttacheError| matches!(e, AttacheError::FailedPrecondition(_) | AttacheError::ResourceExhausted(_));
        if refused.as_ref().is_some_and(|e| !after_history(e)) {
            return Ok(refused.map(Err));
        }
        let Some(id) = request_id else {
            return Ok(refused.map(Err));
        };
        if self.in_flight(id) {
            metrics::counter!("attache_write_retries_in_flight_total").increment(1);
            return Err(AttacheError::unavailable(format!(
                "shard {}: an earlier attempt of request {id:?} is still being committed; retry",
                self.meta.shard_id
            )));
        }
        let Some(e) = refused else {
            return Ok(None);
        };
        match self.engine.get(&layout::request_key(id)).await {
            Ok(Some(_)) => {
                metrics::counter!("attache_write_retries_deduplicated_total").increment(1);
                Ok(Some(Ok(())))
            }
            Ok(None) => Ok(Some(Err(e))),
            Err(read) => Err(read_error(self.meta.shard_id, read)),
        }
    }

    /// Stages `ops` (one request, with its id) for the next group commit and
    /// returns the deferred ack.
    fn stage(
        &mut self,
        request_id: Option<String>,
        ops: Vec<StagedOp>,
        ctx: &Context<Self>,
    ) -> Reply<Result<(), AttacheError>> {
        let (tx, rx) = oneshot::channel();
        self.staged_bytes += ops.iter().map(StagedOp::max_added_bytes).sum::<u64>();
        if let Some(id) = &request_id {
            // `admit_write` refuses a retry while its first attempt is here.
            assert!(self.in_flight_ids.insert(id.clone()), "request id {id:?} staged twice");
        }
        self.staged.push(StagedRequest { request_id, ops });
        self.waiters.push(tx);
        // With a group in flight, this request waits for the next one to
        // start (when that group is prepared, or ends), so it shares it
        // with the requests that come meanwhile.
        if self.groups.is_empty() {
            self.start_commit(ctx);
        }
        let shard_id = self.meta.shard_id;
        Reply::later(async move {
            rx.await.unwrap_or_else(|_| {
                Err(AttacheError::unavailable(format!("shard {shard_id} stopped before its write committed; retry")))
            })
        })
    }

    /// Starts a group commit of everything staged, if one may start: none
    /// is in flight (it is prepared on the committed state), or one is, and
    /// it is prepared and not doomed (this one is prepared on top of it,
    /// and written once that one landed; see `commit::prepare_group`). So
    /// at most two are in flight, and their writes are issued one after the
    /// other. Called when a request is staged with no group in flight, when
    /// a group is prepared, and when a group ends.
    ///
    /// One task commits the group ([`GroupTask::run`]): it prepares it
    /// (reporting `Prepared`), waits until the group before it (if any)
    /// landed, skips the write if that one did not, else checks the lease
    /// gate last, writes and syncs; then it answers the group's waiters,
    /// reports `Committed`, and tells the next group's task whether this
    /// one landed. The actor is not on the path from one write to the next.
    fn start_commit(&mut self, ctx: &Context<Self>) {
        if self.staged.is_empty() || self.failed {
            return;
        }
        let (meta, pending, before) = match (self.groups.len(), self.groups.front_mut()) {
            (0, _) => (self.meta.clone(), None, None),
            (1, Some(Group { prepared: Some((meta, overlay)), doomed: false, landed, .. })) => {
                let before = landed.take().expect("one group is committed on top of another");
                (meta.clone(), Some(overlay.clone()), Some(before))
            }
            _ => return,
        };
        self.group_seq += 1;
        let seq = self.group_seq;
        let requests = Arc::new(std::mem::take(&mut self.staged));
        let waiters = std::mem::take(&mut self.waiters);
        let added_bytes = std::mem::take(&mut self.staged_bytes);
        let (tx, rx) = oneshot::channel();
        let group =
            Group { seq, requests: requests.clone(), added_bytes, doomed: false, prepared: None, landed: Some(rx) };
        self.groups.push_back(group);
        let task = GroupTask {
            engine: self.engine.clone(),
            gate: self.gate.clone(),
            io: self.io.clone(),
            me: ctx.address(),
            seq,
            meta,
            pending,
            requests,
            window_ms: self.limits.request_window_ms,
            before,
        };
        let shard_id = self.meta.shard_id;
        ctx.host().spawn_detached(async move {
            let (me, ops) = (task.me.clone(), task.requests.iter().map(|r| r.ops.len()).sum());
            let outcome = task.run().await;
            let landed = matches!(outcome, WriteOutcome::Written(_));
            let ack = match &outcome {
                WriteOutcome::Written(_) => Ok(()),
                WriteOutcome::NotPrepared(e) => Err(read_error(shard_id, e.clone())),
                WriteOutcome::Failed(e) => Err(write_error(shard_id, e)),
                WriteOutcome::Skipped => Err(skipped_error(shard_id)),
            };
            for w in waiters {
                let _ = w.send(ack.clone());
            }
            // Enqueued (waiting for room) before the next group's write may
            // start, so the actor sees the groups end in order; a stopped
            // actor's next group is not written.
            let enqueued = me.enqueue(Committed { seq, outcome, ops }).await.is_ok();
            let _ = tx.send(landed && enqueued);
        });
    }

    /// The state requests see after a group that did not land: the
    /// committed state, then the state changes still in flight or staged.
    fn recompute_state(&mut self) {
        let ops = self.groups.iter().filter(|g| !g.doomed).flat_map(|g| g.requests.iter());
        self.state = ops.chain(&self.staged).flat_map(|r| &r.ops).fold(self.meta.state, |s, op| match op {
            StagedOp::SetState(next) => *next,
            _ => s,
        });
    }

    /// Closes the engine and answers [`Shutdown`] once no group is in flight.
    async fn finish_shutdown(&mut self) {
        if self.groups.is_empty() {
            if let Some(waiters) = self.shutdown.take() {
                self.engine.close().await;
                for w in waiters {
                    let _ = w.send(());
                }
                self.shutdown = Some(Vec::new());
            }
        }
    }
}

/// One group's commit task (see `Shard::start_commit`).
struct GroupTask {
    engine: Arc<dyn Engine>,
    gate: Arc<LeaseGate>,
    io: Arc<IoWatch>,
    me: crate::actor::Addr<Shard>,
    seq: u64,
    /// The meta before the group.
    meta: ShardMeta,
    /// The overlay of the group before it, if that one may still be landing.
    pending: Option<Arc<commit::Overlay>>,
    requests: Arc<Vec<StagedRequest>>,
    window_ms: u64,
    /// Whether the group before it landed, if one may still be landing.
    before: Option<oneshot::Receiver<bool>>,
}

impl GroupTask {
    /// Prepares the group (reporting `Prepared`), waits until the group
    /// before it landed, and writes it if that one did.
    async fn run(self) -> WriteOutcome {
        let GroupTask { engine, gate, io, me, seq, meta, pending, requests, window_ms, before } = self;
        // A slow preparation (RocksDB's reads and the batch's build take
        // real time; the simulated engine's reads take none): requests that
        // come meanwhile start the next group on top of this one, so the
        // simulation runs the pipeline, skips after a failed write included.
        crate::buggify::delay("shard.commit.prepare", 20).await;
        let reading = io.begin();
        let prepared =
            commit::prepare_group(&*engine, &meta, pending.as_deref(), &requests, wall_clock_ms(), window_ms).await;
        // A hung read counts while it is pending, and a failed one against
        // the volume; reads that succeed say nothing of its writes (only a
        // write that succeeded does).
        match &prepared {
            Err(EngineError::Io(_)) => reading.finish(false),
            _ => drop(reading),
        }
        if let Ok(p) = &prepared {
            me.do_send(Prepared { seq, meta: p.committed.meta.clone(), overlay: p.overlay.clone() });
        }
        // Whatever its own outcome, a group ends after the one before it.
        // (A dropped sender, a task that ended early, counts as not landed.)
        let landed_before = match before {
            Some(before) => before.await.unwrap_or(false),
            None => true,
        };
        let prepared = match prepared {
            Ok(prepared) if landed_before => prepared,
            Ok(_) => return WriteOutcome::Skipped,
            Err(e) => return WriteOutcome::NotPrepared(e),
        };
        // In flight from before the gate check, so that no claim of this
        // node starts while a write that passed the check may still land.
        let in_flight = io.begin();
        // The last moment to check the lease before the write goes to the volume.
        if !gate.is_open() {
            drop(in_flight);
            return WriteOutcome::Failed(EngineError::Fenced(
                "this node's lease may have expired; it does not write".into(),
            ));
        }
        // A stall between the check and the write (a GC pause): the storage
        // fence must stop the write if a new primary exists.
        crate::buggify::delay("shard.commit.after_gate", 1_500).await;
        let result = engine.write(prepared.batch, true).await;
        // A failed sync or I/O error counts against the volume here; a
        // closed engine or bad data does not (another node would read the
        // same data); the storage fence's refusal makes the volume manager
        // step down.
        match &result {
            Ok(_) => in_flight.finish(true),
            Err(EngineError::Indeterminate(_) | EngineError::Io(_)) => in_flight.finish(false),
            // Not the volume failing: another node would find it as full,
            // so it is no reason to give the volume up.
            Err(EngineError::NoSpace(_)) => drop(in_flight),
            Err(EngineError::Fenced(why)) => in_flight.fenced(why),
            Err(_) => drop(in_flight),
        }
        match result {
            Ok(()) => WriteOutcome::Written(prepared.committed),
            Err(e) => WriteOutcome::Failed(e),
        }
    }
}

/// The wall clock, ms since the Unix epoch (the simulated clock under
/// madsim, which intercepts `clock_gettime`); 0 before the epoch.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What a client sees when a group was not written because the one before
/// it failed (nothing of it was written).
fn skipped_error(shard_id: ShardId) -> AttacheError {
    AttacheError::unavailable(format!(
        "shard {shard_id}: the group commit before this write failed, so it was not written; retry"
    ))
}

/// What a client sees when a shard's write failed in its engine.
fn write_error(shard_id: ShardId, e: &EngineError) -> AttacheError {
    match e {
        EngineError::Corruption(_) => AttacheError::Internal(format!("shard {shard_id}: {e}")),
        EngineError::Indeterminate(_) | EngineError::NoSpace(_) => AttacheError::OutcomeUnknown(format!(
            "shard {shard_id}: the write may or may not have been applied ({e}); repeat it (with its request id \
             it applies at most once)"
        )),
        _ => AttacheError::unavailable(format!("shard {shard_id} could not write: {e}; retry")),
    }
}

/// Counts a read of `ops` keys or entries returning `bytes` bytes.
fn count_read(shard_id: ShardId, ops: usize, bytes: usize) {
    let shard = shard_id.to_string();
    metrics::counter!("attache_shard_ops_read_total", "shard" => shard.clone()).increment(ops as u64);
    metrics::counter!("attache_shard_bytes_read_total", "shard" => shard).increment(bytes as u64);
}

/// The user keys and values of engine pairs read from the data range.
fn user_pairs(shard_id: ShardId, pairs: KvPairs) -> Result<KvPairs, AttacheError> {
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = pairs
        .into_iter()
        .map(|(k, r)| Ok((layout::user_key(&k).to_vec(), layout::record_value(&r)?)))
        .collect::<Result<_, _>>()
        .map_err(|e| read_error(shard_id, e))?;
    count_read(shard_id, pairs.len(), pairs.iter().map(|(k, v)| k.len() + v.len()).sum());
    Ok(pairs)
}

/// The pages after the first of a snapshot scan ([`ScanSnapshot`]): they
/// read the snapshot its first page read, up to the scan's end. Cloning
/// shares the snapshot, which lives until the last clone is dropped or the
/// shard's engine closes (then pages fail with `Unavailable`: retry the scan).
#[derive(Clone)]
pub struct ScanPages {
    snapshot: Arc<dyn EngineSnapshot>,
    /// The shard's scan token (see `Shard::scans`), held while the stream lives.
    _open: Arc<()>,
    shard_id: ShardId,
    /// The scan's end in the user key space; empty for no bound.
    end: Vec<u8>,
    limits: Limits,
}

impl std::fmt::Debug for ScanPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanPages").field("shard_id", &self.shard_id).field("end", &self.end).finish_non_exhaustive()
    }
}

impl ScanPages {
    /// Up to `limit` pairs (0 or over the page limit: the page limit) with
    /// `start <= key <` the scan's end, in key order, from the scan's snapshot.
    ///
    /// Errors: `Unavailable` when the engine closed (the shard moved or
    /// stopped: retry the whole scan) or failed the read; `Internal` on
    /// corrupt data.
    pub async fn page(&self, start: &[u8], limit: u32) -> Result<KvPairs, AttacheError> {
        let (from, to) = layout::data_range(start, &self.end);
        let limit = self.limits.scan_page(limit);
        let pairs = self.snapshot.scan(&from, Some(&to), limit).await.map_err(|e| read_error(self.shard_id, e))?;
        user_pairs(self.shard_id, pairs)
    }
}

/// The pages after the first of a snapshot index scan
/// ([`ScanIndexSnapshot`]): they read the snapshot its first page read.
/// Cloning shares the snapshot, as for [`ScanPages`].
#[derive(Clone)]
pub struct IndexPages {
    snapshot: Arc<dyn EngineSnapshot>,
    /// The shard's scan token, as in [`ScanPages`].
    _open: Arc<()>,
    shard_id: ShardId,
    name: String,
    value_prefix: Vec<u8>,
    limits: Limits,
}

impl std::fmt::Debug for IndexPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexPages").field("shard_id", &self.shard_id).field("name", &self.name).finish_non_exhaustive()
    }
}

impl IndexPages {
    /// Up to `limit` hits (0 or over the page limit: the page limit) after
    /// `after` (`None`: from the start), in (value, key) order, from the
    /// scan's snapshot.
    ///
    /// Errors: as [`ScanPages::page`].
    pub async fn page(&self, after: Option<&IndexHit>, limit: u32) -> Result<Vec<IndexHit>, AttacheError> {
        let (start, end) = index_range(&self.name, &self.value_prefix, after);
        let limit = self.limits.scan_page(limit);
        let pairs =
            self.snapshot.scan(&start, end.as_deref(), limit).await.map_err(|e| read_error(self.shard_id, e))?;
        index_hits(self.shard_id, &self.name, &pairs)
    }
}

/// The engine key range `[start, end)` of index `name`'s entries whose
/// value starts with `value_prefix`, after the hit `after` (`None`: all);
/// `end` is `None` when the range has no upper bound.
fn index_range(name: &str, value_prefix: &[u8], after: Option<&IndexHit>) -> (Vec<u8>, Option<Vec<u8>>) {
    let prefix = layout::index_prefix(name, value_prefix);
    let start = match after {
        // The smallest key after the last hit's key.
        Some(hit) => {
            let mut k = layout::index_key(name, &hit.value, &hit.key);
            k.push(0);
            k.max(prefix.clone())
        }
        None => prefix.clone(),
    };
    (start, layout::prefix_end(&prefix))
}

/// The hits of index `name` that the engine pairs `pairs` hold. Errors:
/// `Internal` naming the shard when an entry's key is malformed.
fn index_hits(shard_id: ShardId, name: &str, pairs: &KvPairs) -> Result<Vec<IndexHit>, AttacheError> {
    pairs
        .iter()
        .map(|(k, _)| {
            let (value, key) = layout::split_index_key(name, k)?;
            Ok(IndexHit { value, key })
        })
        .collect::<Result<_, _>>()
        .map_err(|e| read_error(shard_id, e))
}

/// What a client sees when a shard's read failed in its engine.
fn read_error(shard_id: ShardId, e: EngineError) -> AttacheError {
    match e {
        EngineError::Closed => AttacheError::unavailable(format!("shard {shard_id} is closing; retry")),
        EngineError::Corruption(_) => AttacheError::Internal(format!("shard {shard_id}: {e}")),
        _ => AttacheError::unavailable(format!("shard {shard_id} could not read: {e}; retry")),
    }
}

impl Actor for Shard {
    fn name(&self) -> String {
        format!("shard-{}", self.meta.shard_id)
    }

    async fn stopped(&mut self) {
        self.engine.close().await;
    }
}

impl Handler<Prepared> for Shard {
    async fn handle(&mut self, msg: Prepared, ctx: &Context<Self>) -> Reply<()> {
        // (Its group may have ended already.)
        if let Some(group) = self.groups.iter_mut().find(|g| g.seq == msg.seq) {
            group.prepared = Some((msg.meta, msg.overlay));
            self.start_commit(ctx);
        }
        Reply::now(())
    }
}

impl Handler<Committed> for Shard {
    async fn handle(&mut self, msg: Committed, ctx: &Context<Self>) -> Reply<()> {
        let group = self.groups.pop_front().expect("a commit completed that was never started");
        assert_eq!(group.seq, msg.seq, "groups end in order");
        self.settled(&group.requests);
        let landed = matches!(msg.outcome, WriteOutcome::Written(_));
        match msg.outcome {
            WriteOutcome::Written(commit::GroupCommitted { meta, bytes, duplicates }) => {
                assert_eq!(meta.shard_id, self.meta.shard_id);
                if duplicates > 0 {
                    metrics::counter!("attache_write_retries_deduplicated_total").increment(duplicates as u64);
                }
                let shard = meta.shard_id.to_string();
                metrics::histogram!("attache_group_commit_ops").record(msg.ops as f64);
                metrics::counter!("attache_shard_ops_written_total", "shard" => shard.clone())
                    .increment(msg.ops as u64);
                metrics::counter!("attache_shard_bytes_written_total", "shard" => shard.clone()).increment(bytes);
                metrics::gauge!("attache_shard_live_bytes", "shard" => shard).set(meta.live_bytes as f64);
                self.meta = meta;
                self.group_commits += 1;
                self.committed_ops += msg.ops as u64;
            }
            WriteOutcome::Failed(failure @ (EngineError::Indeterminate(_) | EngineError::NoSpace(_))) => {
                // The group may be durable while the engine's reads do not
                // show it: serve nothing more from this engine. Staged
                // requests were never written; the shard manager reopens
                // the shard from the volume (recovery replays what is there;
                // on a full volume, read-only).
                tracing::warn!(shard = self.meta.shard_id, error = %failure, "group commit failed; reopening the shard");
                self.failed = true;
                let why = match failure {
                    EngineError::NoSpace(_) => format!(
                        "shard {} is being reopened read-only: its volume has no free space; retry (writes will \
                         be refused until it has)",
                        self.meta.shard_id
                    ),
                    _ => format!(
                        "shard {} is being reopened after a write whose outcome is unknown; retry",
                        self.meta.shard_id
                    ),
                };
                for w in std::mem::take(&mut self.waiters) {
                    let _ = w.send(Err(AttacheError::unavailable(why.clone())));
                }
                let staged = std::mem::take(&mut self.staged);
                self.settled(&staged);
                self.staged_bytes = 0;
                if let Some(report) = &self.on_failure {
                    let durable_through = self.engine.sequence();
                    report.do_send(ShardFailed { shard_id: self.meta.shard_id, durable_through });
                }
            }
            WriteOutcome::Failed(e) | WriteOutcome::NotPrepared(e) => {
                tracing::warn!(shard = self.meta.shard_id, error = %e, "group commit failed");
            }
            WriteOutcome::Skipped => {
                tracing::debug!(shard = self.meta.shard_id, "group not written: the one before it did not land");
            }
        }
        if !landed {
            // The group prepared on top of this one must not be written
            // (its commit task skips it, finding this one did not land).
            // The state changes of both did not land; staged ones still may.
            if let Some(next) = self.groups.front_mut() {
                next.doomed = true;
            }
            self.recompute_state();
        }
        self.start_commit(ctx);
        self.finish_shutdown().await;
        Reply::now(())
    }
}

impl Handler<Shutdown> for Shard {
    async fn handle(&mut self, _msg: Shutdown, _ctx: &Context<Self>) -> Reply<()> {
        if self.groups.is_empty() {
            self.engine.close().await;
            self.shutdown = Some(Vec::new());
            return Reply::now(());
        }
        let (tx, rx) = oneshot::channel();
        self.shutdown.get_or_insert_with(Vec::new).push(tx);
        Reply::later(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<CloseIfIdle> for Shard {
    async fn handle(&mut self, _msg: CloseIfIdle, _ctx: &Context<Self>) -> Reply<bool> {
        let scanning = Arc::strong_count(&self.scans) > 1;
        // A failed shard is closed by its manager on its `ShardFailed`
        // (keyed by shard id): closed here, a reopen could be closed by it.
        if !self.groups.is_empty() || !self.staged.is_empty() || scanning || self.shutdown.is_some() || self.failed {
            return Reply::now(false);
        }
        self.engine.close().await;
        self.shutdown = Some(Vec::new());
        Reply::now(true)
    }
}

impl Handler<Put> for Shard {
    async fn handle(&mut self, msg: Put, ctx: &Context<Self>) -> Reply<Result<(), AttacheError>> {
        let Put { client_id, entry, request_id } = msg;
        let check = self.check_entry(&entry).and_then(|_| self.check_writable(&client_id));
        let ops = vec![StagedOp::Put { key: entry.key, value: entry.value, indexes: entry.indexes }];
        match self.admit_write(request_id.as_deref(), &ops, check).await {
            Ok(None) => self.stage(request_id, ops, ctx),
            Ok(Some(reply)) => Reply::now(reply),
            Err(e) => Reply::now(Err(e)),
        }
    }
}

impl Handler<BatchPut> for Shard {
    async fn handle(&mut self, msg: BatchPut, ctx: &Context<Self>) -> Reply<Result<(), AttacheError>> {
        let bytes = msg.entries.iter().map(|e| e.key.len() + e.value.len()).sum();
        let check = self
            .limits
            .check_batch(msg.entries.len(), bytes)
            .and_then(|_| msg.entries.iter().try_for_each(|e| self.check_entry(e)))
            .and_then(|_| self.check_writable(&msg.client_id));
        let ops: Vec<StagedOp> =
            msg.entries.into_iter().map(|e| StagedOp::Put { key: e.key, value: e.value, indexes: e.indexes }).collect();
        match self.admit_write(msg.request_id.as_deref(), &ops, check).await {
            Ok(None) => self.stage(msg.request_id, ops, ctx),
            Ok(Some(reply)) => Reply::now(reply),
            Err(e) => Reply::now(Err(e)),
        }
    }
}

impl Handler<DeleteKey> for Shard {
    async fn handle(&mut self, msg: DeleteKey, ctx: &Context<Self>) -> Reply<Result<(), AttacheError>> {
        let check = self.limits.check_key(&msg.key).and_then(|_| self.check_writable(&msg.client_id));
        let ops = vec![StagedOp::Delete { key: msg.key }];
        match self.admit_write(msg.request_id.as_deref(), &ops, check).await {
            Ok(None) => self.stage(msg.request_id, ops, ctx),
            Ok(Some(reply)) => Reply::now(reply),
            Err(e) => Reply::now(Err(e)),
        }
    }
}

impl Handler<Get> for Shard {
    async fn handle(&mut self, msg: Get, _ctx: &Context<Self>) -> Reply<Result<Option<Vec<u8>>, AttacheError>> {
        if let Err(e) = self.limits.check_key(&msg.key).and_then(|_| self.check_readable(&msg.client_id)) {
            return Reply::now(Err(e));
        }
        let (engine, shard_id) = (self.engine.clone(), self.meta.shard_id);
        Reply::later(async move {
            let record = engine.get(&layout::data_key(&msg.key)).await.map_err(|e| read_error(shard_id, e))?;
            let value = record.map(|r| layout::record_value(&r)).transpose().map_err(|e| read_error(shard_id, e))?;
            count_read(shard_id, 1, value.as_ref().map_or(0, Vec::len));
            Ok(value)
        })
    }
}

impl Handler<BatchGet> for Shard {
    async fn handle(
        &mut self,
        msg: BatchGet,
        _ctx: &Context<Self>,
    ) -> Reply<Result<Vec<Option<Vec<u8>>>, AttacheError>> {
        let checked = self
            .limits
            .check_batch(msg.keys.len(), 0)
            .and_then(|_| msg.keys.iter().try_for_each(|k| self.limits.check_key(k)))
            .and_then(|_| self.check_readable(&msg.client_id));
        if let Err(e) = checked {
            return Reply::now(Err(e));
        }
        let (engine, shard_id) = (self.engine.clone(), self.meta.shard_id);
        Reply::later(async move {
            let keys = msg.keys.iter().map(|k| layout::data_key(k)).collect();
            let records = engine.multi_get(keys).await.map_err(|e| read_error(shard_id, e))?;
            let values: Vec<Option<Vec<u8>>> = records
                .into_iter()
                .map(|r| r.map(|r| layout::record_value(&r)).transpose())
                .collect::<Result<_, _>>()
                .map_err(|e| read_error(shard_id, e))?;
            count_read(shard_id, values.len(), values.iter().flatten().map(Vec::len).sum());
            Ok(values)
        })
    }
}

impl Handler<Scan> for Shard {
    async fn handle(
        &mut self,
        msg: Scan,
        _ctx: &Context<Self>,
    ) -> Reply<Result<Vec<(Vec<u8>, Vec<u8>)>, AttacheError>> {
        if let Err(e) = self.check_readable(&msg.client_id) {
            return Reply::now(Err(e));
        }
        let limit = self.limits.scan_page(msg.limit);
        let (engine, shard_id) = (self.engine.clone(), self.meta.shard_id);
        Reply::later(async move {
            let (start, end) = layout::data_range(&msg.start, &msg.end);
            let pairs = engine.scan(&start, Some(&end), limit).await.map_err(|e| read_error(shard_id, e))?;
            user_pairs(shard_id, pairs)
        })
    }
}

impl Handler<ScanSnapshot> for Shard {
    async fn handle(
        &mut self,
        msg: ScanSnapshot,
        _ctx: &Context<Self>,
    ) -> Reply<Result<(KvPairs, ScanPages), AttacheError>> {
        if let Err(e) = self.check_readable(&msg.client_id) {
            return Reply::now(Err(e));
        }
        let (engine, shard_id, limits) = (self.engine.clone(), self.meta.shard_id, self.limits.clone());
        let open = self.scans.clone();
        Reply::later(async move {
            let snapshot = engine.snapshot().await.map_err(|e| read_error(shard_id, e))?;
            let pages = ScanPages { snapshot, _open: open, shard_id, end: msg.end, limits };
            let first = pages.page(&msg.start, msg.limit).await?;
            Ok((first, pages))
        })
    }
}

impl Handler<ScanIndex> for Shard {
    async fn handle(&mut self, msg: ScanIndex, _ctx: &Context<Self>) -> Reply<Result<Vec<IndexHit>, AttacheError>> {
        let checked =
            self.limits.check_index(&msg.name, &msg.value_prefix).and_then(|_| self.check_readable(&msg.client_id));
        if let Err(e) = checked {
            return Reply::now(Err(e));
        }
        let limit = self.limits.scan_page(msg.limit);
        let (engine, shard_id) = (self.engine.clone(), self.meta.shard_id);
        Reply::later(async move {
            let (start, end) = index_range(&msg.name, &msg.value_prefix, msg.after.as_ref());
            let pairs = engine.scan(&start, end.as_deref(), limit).await.map_err(|e| read_error(shard_id, e))?;
            index_hits(shard_id, &msg.name, &pairs)
        })
    }
}

impl Handler<ScanIndexSnapshot> for Shard {
    async fn handle(
        &mut self,
        msg: ScanIndexSnapshot,
        _ctx: &Context<Self>,
    ) -> Reply<Result<(Vec<IndexHit>, IndexPages), AttacheError>> {
        let checked =
            self.limits.check_index(&msg.name, &msg.value_prefix).and_then(|_| self.check_readable(&msg.client_id));
        if let Err(e) = checked {
            return Reply::now(Err(e));
        }
        let (engine, shard_id, limits) = (self.engine.clone(), self.meta.shard_id, self.limits.clone());
        let open = self.scans.clone();
        Reply::later(async move {
            let snapshot = engine.snapshot().await.map_err(|e| read_error(shard_id, e))?;
            let pages =
                IndexPages { snapshot, _open: open, shard_id, name: msg.name, value_prefix: msg.value_prefix, limits };
            let first = pages.page(None, msg.limit).await?;
            Ok((first, pages))
        })
    }
}

impl Handler<Close> for Shard {
    async fn handle(&mut self, msg: Close, ctx: &Context<Self>) -> Reply<Result<ShardInfo, AttacheError>> {
        if let Err(e) = self.check_readable(&msg.client_id) {
            return Reply::now(Err(e));
        }
        if self.meta.state != ShardState::ReadOnly {
            if let Err(e) = self.check_space() {
                return Reply::now(Err(e));
            }
        }
        // Idempotent, but an acknowledgement means durable: only a close
        // already committed answers at once. One still staged or in the
        // group commit in flight (a retry of a close whose reply was slow)
        // waits for a group commit like the first attempt does.
        if self.meta.state == ShardState::ReadOnly {
            return Reply::now(Ok(self.info()));
        }
        self.state = ShardState::ReadOnly;
        let info = self.info();
        let ack = self.stage(None, vec![StagedOp::SetState(ShardState::ReadOnly)], ctx);
        ack.map(move |r| r.map(|_| info))
    }
}

impl Handler<MarkDeleted> for Shard {
    async fn handle(&mut self, msg: MarkDeleted, ctx: &Context<Self>) -> Reply<Result<ShardInfo, AttacheError>> {
        if let Err(e) = self.check_readable(&msg.client_id).and_then(|_| self.check_space()) {
            return Reply::now(Err(e));
        }
        self.state = ShardState::Deleted;
        let info = self.info();
        let ack = self.stage(None, vec![StagedOp::SetState(ShardState::Deleted)], ctx);
        ack.map(move |r| r.map(|_| info))
    }
}

impl Handler<Stats> for Shard {
    async fn handle(&mut self, msg: Stats, _ctx: &Context<Self>) -> Reply<Result<ShardStats, AttacheError>> {
        // Committed state only, as the counts: a close still in its group
        // commit may fail.
        Reply::now(self.check_readable(&msg.client_id).map(|_| ShardStats {
            info: ShardInfo { state: self.meta.state, ..self.info() },
            live_bytes: self.meta.live_bytes,
            live_keys: self.meta.live_keys,
            engine: self.engine.stats(),
            group_commits: self.group_commits,
            committed_ops: self.committed_ops,
        }))
    }
}

/// How often, at most, a backup's read-only shard catches up with the primary, ms.
pub const CATCH_UP_MS: u64 = 100;

/// Reads that a backup may serve from its possibly stale view.
pub trait StaleRead: ShardOp {}
impl StaleRead for Get {}
impl StaleRead for BatchGet {}
impl StaleRead for Scan {}
impl StaleRead for ScanIndex {}

/// A read that accepts possibly stale data: a backup serves it from its
/// read-only view; the answer comes with the age of that view in ms (how long
/// ago it caught up with the primary; 0 from the primary itself).
///
/// A backup catches its view up before serving when it is [`CATCH_UP_MS`]
/// old, or `max_staleness_ms` if that is smaller. Errors: `Unavailable`
/// when the view is still older than `max_staleness_ms` after that (its
/// catch-up took longer: a slow volume); the read had no effect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stale<M> {
    /// The read.
    pub op: M,
    /// The oldest view the caller accepts, ms; 0: any.
    pub max_staleness_ms: u64,
}

impl<M: StaleRead> Message for Stale<M> {
    type Reply = Result<(M::Ok, u64), AttacheError>;
}

impl<M: StaleRead> ShardOp for Stale<M> {
    type Ok = (M::Ok, u64);
    fn client_id(&self) -> &str {
        self.op.client_id()
    }
}

impl<M> Handler<Stale<M>> for Shard
where
    M: StaleRead,
    Shard: Handler<M>,
{
    async fn handle(&mut self, msg: Stale<M>, ctx: &Context<Self>) -> Reply<Result<(M::Ok, u64), AttacheError>> {
        if !self.read_only {
            return <Self as Handler<M>>::handle(self, msg.op, ctx).await.map(|r| r.map(|v| (v, 0)));
        }
        let bound = if msg.max_staleness_ms == 0 { u64::MAX } else { msg.max_staleness_ms };
        let stale_for = self.caught_up_at.map_or(u64::MAX, |t| t.elapsed().as_millis() as u64);
        if stale_for >= CATCH_UP_MS.min(bound) {
            // The view holds what was durable when the catch-up began: its
            // age counts from then (never less than it is).
            let started = Instant::now();
            if let Err(e) = self.engine.catch_up().await {
                return Reply::now(Err(read_error(self.meta.shard_id, e)));
            }
            match Shard::load_meta(&*self.engine).await {
                Ok(Some(meta)) => {
                    self.state = meta.state;
                    self.meta = meta;
                }
                // The primary removed the shard's data: it was deleted (and
                // committed: the data is gone). Serve nothing more (not an
                // empty shard): NOT_FOUND.
                Ok(None) => {
                    self.state = ShardState::Deleted;
                    self.meta.state = ShardState::Deleted;
                }
                Err(e) => return Reply::now(Err(read_error(self.meta.shard_id, e))),
            }
            self.caught_up_at = Some(started);
        }
        let age = self.caught_up_at.map_or(0, |t| t.elapsed().as_millis() as u64);
        if age > bound {
            return Reply::now(Err(AttacheError::unavailable(format!(
                "shard {}: this node's view is {age} ms old, over the requested max_staleness_ms of {bound}; retry \
                 (another node, or the primary, whose view is never stale)",
                self.meta.shard_id
            ))));
        }
        self.serving_stale = true;
        let reply = <Self as Handler<M>>::handle(self, msg.op, ctx).await;
        self.serving_stale = false;
        reply.map(move |r| r.map(|v| (v, age)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::actor::HostHandle;
    use crate::engine::{EngineFactory, OpenMode, WriteBatch};
    use crate::mem_engine::MemEngineFactory;
    use crate::task_host::TaskHost;

    /// An engine whose writes take 50 ms, the first one failing with `Io`
    /// (nothing written) when `fail_first` is set, and whose multi-get
    /// number `fail_read` (from 1; 0: none) fails with `NoSpace`, as
    /// RocksDB reports a read's ENOSPC.
    struct SlowWrites {
        inner: Arc<dyn Engine>,
        fail_first: AtomicBool,
        fail_read: usize,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl SlowWrites {
        fn new(inner: Arc<dyn Engine>, fail_first: bool, fail_read: usize) -> Arc<Self> {
            Arc::new(SlowWrites {
                inner,
                fail_first: AtomicBool::new(fail_first),
                fail_read,
                reads: Default::default(),
            })
        }
    }

    #[async_trait]
    impl Engine for SlowWrites {
        async fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if self.fail_first.swap(false, Ordering::SeqCst) {
                return Err(EngineError::Io("injected write error".into()));
            }
            self.inner.write(batch, sync).await
        }
        async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
            self.inner.get(key).await
        }
        async fn multi_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
            if self.reads.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_read {
                return Err(EngineError::NoSpace("injected: No space left on device".into()));
            }
            self.inner.multi_get(keys).await
        }
        async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, EngineError> {
            self.inner.scan(start, end, limit).await
        }
        async fn snapshot(&self) -> Result<Arc<dyn EngineSnapshot>, EngineError> {
            self.inner.snapshot().await
        }
        async fn approximate_size(&self) -> Result<u64, EngineError> {
            self.inner.approximate_size().await
        }
        fn stats(&self) -> EngineStats {
            self.inner.stats()
        }
        async fn close(&self) {
            self.inner.close().await
        }
    }

    fn put(key: &str, id: &str) -> Put {
        let entry = PutEntry { key: key.into(), value: b"v".to_vec(), indexes: vec![] };
        Put { client_id: "c".into(), entry, request_id: Some(id.into()) }
    }

    /// Puts A and B arrive together: A's group is written (50 ms) while B's
    /// is prepared on top of it. When A's write fails, B's group is not
    /// written and B is answered UNAVAILABLE, as the commit task promises;
    /// a later put commits on the state without either. When A's write
    /// succeeds, both land, in two groups.
    #[tokio::test]
    async fn a_group_prepared_on_top_of_one_that_fails_is_not_written() {
        for fail_first in [true, false] {
            let inner =
                MemEngineFactory::new().open("/v/s".as_ref(), OpenMode::ReadWrite { create: true }).await.unwrap();
            let engine = SlowWrites::new(inner.clone(), fail_first, 0);
            let meta = ShardMeta::new(1, "c".into(), 1 << 20);
            let shard = Shard::new(engine, meta, Limits::default(), Arc::new(LeaseGate::always_open()));
            let shard = HostHandle::new(TaskHost).spawn(shard, 16);
            let a = shard.enqueue(put("a", "A")).await.unwrap();
            let b = shard.enqueue(put("b", "B")).await.unwrap();
            let (a, b) = (a.await.unwrap(), b.await.unwrap());
            shard.send(put("c", "C")).await.unwrap().unwrap();
            let present = |k: &'static str| {
                let inner = inner.clone();
                async move { inner.get(&layout::data_key(k.as_bytes())).await.unwrap().is_some() }
            };
            let stats = shard.send(Stats { client_id: "c".into() }).await.unwrap().unwrap();
            if fail_first {
                assert!(
                    matches!(&a, Err(AttacheError::Unavailable { message: m, .. }) if m.contains("injected")),
                    "{a:?}"
                );
                assert!(
                    matches!(&b, Err(AttacheError::Unavailable { message: m, .. }) if m.contains("group commit before this write failed")),
                    "{b:?}"
                );
                assert!(!present("a").await && !present("b").await && present("c").await);
                assert_eq!((stats.live_keys, stats.group_commits, stats.committed_ops), (1, 1, 1));
            } else {
                assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
                assert!(present("a").await && present("b").await && present("c").await);
                assert_eq!((stats.live_keys, stats.group_commits, stats.committed_ops), (3, 3, 3));
            }
        }
    }

    /// Puts A and B arrive together, and B's group's reads fail (with
    /// `NoSpace`, as RocksDB may report a read): B is answered UNAVAILABLE
    /// (nothing of it was written, so not "outcome unknown"), A lands, and
    /// the shard goes on serving writes (a failed read is no failed write).
    #[tokio::test]
    async fn a_group_whose_reads_fail_is_refused_and_the_shard_serves_on() {
        let inner = MemEngineFactory::new().open("/v/s".as_ref(), OpenMode::ReadWrite { create: true }).await.unwrap();
        let meta = ShardMeta::new(1, "c".into(), 1 << 20);
        let shard = Shard::new(SlowWrites::new(inner.clone(), false, 2), meta, Limits::default(), {
            Arc::new(LeaseGate::always_open())
        });
        let shard = HostHandle::new(TaskHost).spawn(shard, 16);
        let a = shard.enqueue(put("a", "A")).await.unwrap();
        let b = shard.enqueue(put("b", "B")).await.unwrap();
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert!(a.is_ok(), "{a:?}");
        assert!(
            matches!(&b, Err(AttacheError::Unavailable { message: m, .. }) if m.contains("could not read")),
            "{b:?}"
        );
        shard.send(put("c", "C")).await.unwrap().unwrap();
        let stats = shard.send(Stats { client_id: "c".into() }).await.unwrap().unwrap();
        assert_eq!((stats.live_keys, stats.group_commits), (2, 2));
    }
}
