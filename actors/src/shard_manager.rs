//! The `ShardManager` actor: the shards on one volume.
//!
//! It creates, opens, closes and deletes shards, and routes requests to them
//! by shard id. A shard's data lives at `{volume_root}/{volume_id}/shard-{id}/`.
//! Shards are opened lazily: the first request for a shard that exists on the
//! volume but is not open yet opens it (after a restart or a failover).
//! Like every write, creating a shard and opening one read-write happen
//! only while the node's lease gate is open (see `crate::lease`).
//!
//! Routing keeps order: the manager enqueues a request in the shard's mailbox
//! before it takes its next message, and waits for the reply outside itself,
//! so two requests from one caller reach the shard in the order sent.
//!
//! A full volume (`EngineError::NoSpace`): a read-write open writes (RocksDB:
//! a new MANIFEST, OPTIONS file and WAL), so on a full volume the primary
//! opens the shard read-only instead and serves it full: reads as usual,
//! every write refused with `RESOURCE_EXHAUSTED` (nothing written). At the
//! first request [`FULL_VOLUME_RETRY`] or more after that open it tries the
//! read-write open again, beside the read-only shard (a read-only engine
//! holds no lock): still full, the read-only shard goes on and the next
//! try waits twice as long, up to [`FULL_VOLUME_RETRY_MAX`]; opened, the
//! new shard takes every later request and the read-only one ends once its
//! reads end (each began before the new engine took a write, so none can
//! miss one acknowledged before it began). Writes resume within that wait
//! (at most 8 s) of space being freed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::actor::{Actor, Addr, Context, Handler, Message, Reply};
use crate::engine::{Engine, EngineError, EngineFactory, OpenMode};
use crate::error::AttacheError;
use crate::io_watch::IoWatch;
use crate::lease::LeaseGate;
use crate::limits::{Limits, DEFAULT_SHARD_SIZE_LIMIT};
use crate::shard::layout::{ShardMeta, ShardState};
use crate::shard::{CloseIfIdle, MarkDeleted, Shard, ShardFailed, ShardId, ShardInfo, ShardOp, Shutdown};

/// How long a shard opened read-only because its volume was full is served
/// so before its next request tries the read-write open again (see the
/// module docs).
pub const FULL_VOLUME_RETRY: Duration = Duration::from_secs(1);

/// The longest wait between two read-write opens of a shard whose volume
/// stays full (see [`FULL_VOLUME_RETRY`]).
pub const FULL_VOLUME_RETRY_MAX: Duration = Duration::from_secs(8);

/// How a shard manager is set up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardManagerConfig {
    /// The volume's id; also its directory name under `volume_root`.
    pub volume_id: String,
    /// Where volumes are mounted (`/` on a real node, a directory in `attache dev`).
    pub volume_root: PathBuf,
    /// Request limits.
    pub limits: Limits,
    /// Size limit of a new shard when the request names none, bytes.
    pub default_size_limit: u64,
    /// Mailbox capacity of each shard actor, messages.
    pub shard_mailbox: usize,
    /// A backup's view: shards open read-only, serve stale reads only, and
    /// no shard is created or deleted.
    pub read_only: bool,
    /// Most shards open at once (0: no limit): past it, idle shards close,
    /// least recently used first, and reopen on their next request (see
    /// `ShardManager::make_room`). Each open shard holds a few files and
    /// some memory.
    pub max_open_shards: usize,
}

impl ShardManagerConfig {
    /// A config with default limits for `volume_id` under `volume_root`.
    pub fn new(volume_id: impl Into<String>, volume_root: impl Into<PathBuf>) -> Self {
        ShardManagerConfig {
            volume_id: volume_id.into(),
            volume_root: volume_root.into(),
            limits: Limits::default(),
            default_size_limit: DEFAULT_SHARD_SIZE_LIMIT,
            shard_mailbox: crate::actor::DEFAULT_MAILBOX_CAPACITY,
            read_only: false,
            max_open_shards: 0,
        }
    }

    /// `{volume_root}/{volume_id}/shard-{shard_id}`.
    pub fn shard_path(&self, shard_id: ShardId) -> PathBuf {
        self.volume_root.join(&self.volume_id).join(format!("shard-{shard_id}"))
    }
}

/// Creates a shard owned by `client_id` with id `shard_id` (allocated by the
/// metadata store) and a size limit in bytes (`None`: the default).
///
/// Errors: `InvalidArgument` (bad client id or zero limit), `AlreadyExists`,
/// `Unavailable` (volume I/O).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateShard {
    /// The shard's id, allocated by the metadata store.
    pub shard_id: ShardId,
    /// The client id that will own the shard.
    pub client_id: String,
    /// The size limit, bytes; `None` for the default (0 is invalid).
    pub size_limit: Option<u64>,
}

impl Message for CreateShard {
    type Reply = Result<ShardInfo, AttacheError>;
}

/// Deletes a shard and all its data; the shard id is never reused.
///
/// Errors: `NotFound`, `PermissionDenied`, `Unavailable`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteShard {
    /// The shard.
    pub shard_id: ShardId,
    /// The client id that must own the shard.
    pub client_id: String,
}

impl Message for DeleteShard {
    type Reply = Result<ShardInfo, AttacheError>;
}

/// A shard request routed by shard id: a client sends it to a `Node`, which
/// forwards it as it is to the `ShardManager` of the shard's volume, which
/// hands `op` to the shard. Errors: `NotFound` for an unknown shard,
/// `Unavailable` (with a primary hint) where this node is not the primary,
/// else those of the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCall<M> {
    /// The shard.
    pub shard_id: ShardId,
    /// The request.
    pub op: M,
}

impl<M: ShardOp> Message for ShardCall<M> {
    type Reply = M::Reply;
}

/// The ids of the shards open on this manager, ascending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListOpenShards;

impl Message for ListOpenShards {
    type Reply = Vec<ShardId>;
}

/// Shuts every open shard down (in-flight group commits finish, engines
/// close); replies when done. Requests after it get `UNAVAILABLE` (as they
/// do once the manager's retired flag is set, see
/// [`ShardManager::retired_flag`], even before this message is handled).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownShards;

impl Message for ShutdownShards {
    type Reply = ();
}

/// An open shard, as its manager tracks it.
struct OpenShard {
    addr: Addr<Shard>,
    /// `ShardManager::uses` at its last request.
    last_used: u64,
    /// Held by every request routed to it until its reply: more than one
    /// holder means a request is unanswered, and the shard stays open.
    calls: Arc<()>,
    /// Set when the volume was full at open: the shard is served over a
    /// read-only engine since then, and takes no writes; the first request
    /// past this time tries the read-write open beside it.
    full_until: Option<tokio::time::Instant>,
}

/// The shards of one volume; see the module docs.
pub struct ShardManager {
    cfg: ShardManagerConfig,
    factory: Arc<dyn EngineFactory>,
    gate: Arc<LeaseGate>,
    shards: BTreeMap<ShardId, OpenShard>,
    /// Bumped by every request routed to a shard: the order of last use.
    uses: u64,
    shut_down: bool,
    /// The volume's writes in flight (group commits, creations, read-write opens).
    io: Arc<IoWatch>,
    /// Shards served read-only because the volume was full: the wait
    /// before the next read-write open (doubled by each that fails).
    full_retry: BTreeMap<ShardId, Duration>,
    /// Shards whose last write failed with an unknown outcome, with what
    /// their engine had made durable (`ShardFailed::durable_through`),
    /// until a read-write open (which makes what it replays durable).
    unsure: BTreeMap<ShardId, u64>,
    /// Set by the volume manager the moment it stops serving through this
    /// manager (a step-down): from then on this manager and its shards
    /// refuse every request, whatever is still queued in their mailboxes.
    retired: Arc<AtomicBool>,
}

fn volume_error(cfg: &ShardManagerConfig, what: &str, e: EngineError) -> AttacheError {
    match e {
        EngineError::Corruption(_) => AttacheError::Internal(format!("volume {}: {what}: {e}", cfg.volume_id)),
        EngineError::NoSpace(_) => AttacheError::ResourceExhausted(format!(
            "volume {}: {what}: {e}; nothing was written. The volume takes writes again once it has free \
             space: grow it (or free space on its filesystem outside Attaché's shards)",
            cfg.volume_id
        )),
        _ => AttacheError::unavailable(format!("volume {}: {what}: {e}; retry", cfg.volume_id)),
    }
}

impl ShardManager {
    /// A manager for the volume in `cfg`, opening engines with `factory`;
    /// its shards write only while `gate` is open.
    pub fn new(cfg: ShardManagerConfig, factory: Arc<dyn EngineFactory>, gate: Arc<LeaseGate>) -> Self {
        ShardManager {
            cfg,
            factory,
            gate,
            shards: BTreeMap::new(),
            uses: 0,
            shut_down: false,
            io: Arc::default(),
            retired: Arc::default(),
            full_retry: BTreeMap::new(),
            unsure: BTreeMap::new(),
        }
    }

    /// Counts this volume's writes in flight in `io` (shared with the volume
    /// manager, which gives a hung volume up; see `crate::io_watch`).
    pub fn with_io_watch(mut self, io: Arc<IoWatch>) -> Self {
        self.io = io;
        self
    }

    /// The flag that retires this manager and its shards at once (set it
    /// to `true`; see [`ShutdownShards`]), for its owner to keep.
    pub fn retired_flag(&self) -> Arc<AtomicBool> {
        self.retired.clone()
    }

    fn not_found(shard_id: ShardId) -> AttacheError {
        AttacheError::NotFound(format!("shard {shard_id} does not exist: check the id NewShard returned"))
    }

    fn check_up(&self) -> Result<(), AttacheError> {
        if self.shut_down || self.retired.load(Ordering::Acquire) {
            return Err(AttacheError::unavailable(format!(
                "volume {} is shutting down on this node; retry",
                self.cfg.volume_id
            )));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), AttacheError> {
        if self.cfg.read_only {
            return Err(AttacheError::unavailable(format!(
                "this node is a backup for volume {}: it serves stale reads only; retry at the primary",
                self.cfg.volume_id
            )));
        }
        Ok(())
    }

    /// Refuses a change of the volume (opening a shard read-write, creating
    /// one) while this node's lease gate is closed: its lease may have
    /// expired and another node may own the volume. (A read-write open
    /// replays, cuts torn tails and takes the shard's lock.)
    fn check_lease(&self, what: &str) -> Result<(), AttacheError> {
        if !self.cfg.read_only && !self.gate.is_open() {
            return Err(AttacheError::unavailable(format!(
                "volume {}: this node's lease may have expired, so it does not {what} until the lease is \
                 renewed; retry (another node may be taking the volume over)",
                self.cfg.volume_id
            )));
        }
        Ok(())
    }

    /// The open shard `shard_id`, opening it from the volume when needed
    /// (closing the least recently used idle shards first to stay within
    /// `max_open_shards`), with a token that marks a request to it as
    /// unanswered while it is held.
    async fn shard(&mut self, shard_id: ShardId, ctx: &Context<Self>) -> Result<(Addr<Shard>, Arc<()>), AttacheError> {
        self.check_up()?;
        self.uses += 1;
        // A shard served read-only on a full volume whose wait is over: the
        // read-write open is tried beside it (see the module docs).
        let mut replacing = None;
        if let Some(open) = self.shards.get_mut(&shard_id) {
            open.last_used = self.uses;
            let due = open.full_until.is_some_and(|t| tokio::time::Instant::now() >= t);
            if !due || !self.gate.is_open() {
                return Ok((open.addr.clone(), open.calls.clone()));
            }
            replacing = Some(open.addr.clone());
        }
        self.check_lease("open shards")?;
        let path = self.cfg.shard_path(shard_id);
        let cfg = &self.cfg;
        if replacing.is_none() {
            if !self.factory.exists(&path).await.map_err(|e| volume_error(cfg, "list shards", e))? {
                return Err(Self::not_found(shard_id));
            }
            // Room only for a shard that exists; the checks again after it (closes take time).
            self.make_room().await;
        }
        self.check_up()?;
        self.check_lease("open shards")?;
        let cfg = &self.cfg;
        let opened = tokio::time::Instant::now();
        // A read-write open replays the log and may cut a torn tail: a write.
        let in_flight = (!self.cfg.read_only).then(|| self.io.begin());
        let opening = self
            .factory
            .open(&path, if self.cfg.read_only { OpenMode::ReadOnly } else { OpenMode::ReadWrite { create: false } })
            .await;
        drop(in_flight);
        let (engine, full) = match opening {
            Ok(engine) => (engine, false),
            Err(e) if replacing.is_some() => {
                // Still full (or the volume failed the open): the read-only
                // shard goes on serving reads, and the next try waits longer.
                tracing::debug!(shard_id, volume = %cfg.volume_id, error = %e, "read-write reopen failed; still read-only");
                return self.still_full(shard_id).ok_or_else(|| volume_error(&self.cfg, "reopen", e));
            }
            Err(EngineError::NoSpace(why)) => {
                // A read-only open writes nothing: the shard serves reads.
                tracing::warn!(shard_id, volume = %cfg.volume_id, error = %why, "volume full: serving the shard read-only");
                let engine = self.factory.open(&path, OpenMode::ReadOnly).await.map_err(|e| {
                    volume_error(cfg, &format!("open shard {shard_id} read-only (the volume is full)"), e)
                })?;
                // A read-only view replays the log as it finds it, page
                // cache included: past what the failed engine had made
                // durable, it holds the failed write, whose sync may have
                // failed. Serving it could show (and acknowledge, by its
                // request id) a write a crash would take back.
                if let (Some(&durable), Some(seen)) = (self.unsure.get(&shard_id), engine.sequence()) {
                    if seen > durable {
                        engine.close().await;
                        return Err(AttacheError::unavailable(format!(
                            "volume {}: shard {shard_id}'s last write may not be durable and the volume is full, \
                             so it cannot be made durable or served; retry (it is served again once the volume has \
                             space)",
                            cfg.volume_id
                        )));
                    }
                }
                (engine, true)
            }
            Err(e) => return Err(volume_error(cfg, &format!("open shard {shard_id}"), e)),
        };
        // The read-only shard it replaces ends once its reads end (each
        // began before this open, so before any write through it) and
        // takes no request from now on: the manager routes to the new one.
        if let Some(old) = replacing.take() {
            self.shards.remove(&shard_id);
            ctx.host().spawn_detached(async move {
                let _ = old.send(Shutdown).await;
                old.stop();
            });
        }
        let meta = match Shard::load_meta(&*engine).await {
            Ok(Some(meta)) if meta.state != ShardState::Deleted => meta,
            Ok(_) if self.cfg.read_only => {
                engine.close().await;
                return Err(Self::not_found(shard_id));
            }
            Ok(_) => {
                // A create that never finished, or a delete that did not finish removing the data.
                engine.close().await;
                tracing::info!(shard_id, "removing the remains of a shard that was deleted or never created");
                self.factory.destroy(&path).await.map_err(|e| volume_error(cfg, "remove shard", e))?;
                return Err(Self::not_found(shard_id));
            }
            Err(e) => {
                engine.close().await;
                return Err(volume_error(cfg, &format!("read shard {shard_id}"), e));
            }
        };
        if meta.shard_id != shard_id {
            engine.close().await;
            return Err(AttacheError::Internal(format!(
                "volume {}: shard directory {} holds the meta of shard {}, not of shard {shard_id}: the volume's \
                 data is damaged or was copied by hand; restore the directory or remove it",
                cfg.volume_id,
                path.display(),
                meta.shard_id
            )));
        }
        let addr = self.serve(engine, meta, opened, full, ctx);
        if full {
            let wait = *self.full_retry.entry(shard_id).or_insert(FULL_VOLUME_RETRY);
            if let Some(open) = self.shards.get_mut(&shard_id) {
                open.full_until = Some(opened + wait);
            }
        } else {
            self.full_retry.remove(&shard_id);
            self.unsure.remove(&shard_id);
        }
        Ok((addr, self.shards[&shard_id].calls.clone()))
    }

    /// The read-only shard `shard_id` of a volume still full: its next
    /// read-write open waits twice as long as the last (up to
    /// [`FULL_VOLUME_RETRY_MAX`]). Returns it, with its request token;
    /// `None` if it is no longer open.
    fn still_full(&mut self, shard_id: ShardId) -> Option<(Addr<Shard>, Arc<()>)> {
        let wait = self.full_retry.get(&shard_id).map_or(FULL_VOLUME_RETRY, |w| (*w * 2).min(FULL_VOLUME_RETRY_MAX));
        self.full_retry.insert(shard_id, wait);
        let open = self.shards.get_mut(&shard_id)?;
        open.full_until = Some(tokio::time::Instant::now() + wait);
        Some((open.addr.clone(), open.calls.clone()))
    }

    /// Closes idle shards, least recently used first, until one more fits
    /// within `max_open_shards` (0: no limit). A shard with a request
    /// unanswered, a write staged or committing, or a scan stream open is
    /// never closed: when every open shard is busy, nothing is closed and
    /// the manager goes over the limit until some are idle (the limit is
    /// soft by the shards busy at one moment). Each shard is closed as on
    /// shutdown ([`CloseIfIdle`]) and reopens on its next request.
    async fn make_room(&mut self) {
        let limit = self.cfg.max_open_shards;
        if limit == 0 || self.shards.len() < limit {
            return;
        }
        let mut idle: Vec<(u64, ShardId)> = self
            .shards
            .iter()
            .filter(|(_, open)| Arc::strong_count(&open.calls) == 1)
            .map(|(&id, open)| (open.last_used, id))
            .collect();
        idle.sort_unstable();
        for (_, shard_id) in idle {
            if self.shards.len() < limit {
                return;
            }
            let addr = self.shards[&shard_id].addr.clone();
            // No request of this manager is queued at the shard (the token
            // says so), and none is sent while this awaits.
            if addr.send(CloseIfIdle).await.unwrap_or(false) {
                self.shards.remove(&shard_id);
                addr.stop();
                tracing::debug!(shard_id, volume = %self.cfg.volume_id, "closed an idle shard (open-shard limit)");
            }
        }
        if self.shards.len() >= limit {
            tracing::debug!(
                volume = %self.cfg.volume_id,
                open = self.shards.len(),
                limit,
                "every open shard is busy: opening one more than the open-shard limit"
            );
        }
    }

    /// Starts the shard actor over an open `engine` whose meta is `meta`,
    /// tied to this manager (its retired flag; as primary, its write watch
    /// and its failure reports), and routes its shard id to it.
    /// (`opened`: when its engine began to open, the age of a read-only view;
    /// `full`: a primary's shard over an engine opened read-only because the
    /// volume was full, which refuses writes.)
    fn serve(
        &mut self,
        engine: Arc<dyn Engine>,
        meta: ShardMeta,
        opened: tokio::time::Instant,
        full: bool,
        ctx: &Context<Self>,
    ) -> Addr<Shard> {
        let shard_id = meta.shard_id;
        let shard = if self.cfg.read_only {
            Shard::read_only(engine, meta, self.cfg.limits.clone()).as_of(opened)
        } else {
            Shard::new(engine, meta, self.cfg.limits.clone(), self.gate.clone())
                .with_io_watch(self.io.clone())
                .with_failure_report(ctx.address().recipient())
                .volume_full(full)
        }
        .with_retired(self.retired.clone());
        let addr = ctx.host().spawn(shard, self.cfg.shard_mailbox);
        self.uses += 1;
        let open = OpenShard { addr: addr.clone(), last_used: self.uses, calls: Arc::new(()), full_until: None };
        self.shards.insert(shard_id, open);
        addr
    }
}

impl Actor for ShardManager {
    fn name(&self) -> String {
        format!("shard-manager-{}", self.cfg.volume_id)
    }

    async fn stopped(&mut self) {
        for (_, open) in std::mem::take(&mut self.shards) {
            let _ = open.addr.send(Shutdown).await;
            open.addr.stop();
        }
    }
}

impl Handler<CreateShard> for ShardManager {
    async fn handle(&mut self, msg: CreateShard, ctx: &Context<Self>) -> Reply<Result<ShardInfo, AttacheError>> {
        Reply::now(self.create(msg, ctx).await)
    }
}

impl ShardManager {
    async fn create(&mut self, msg: CreateShard, ctx: &Context<Self>) -> Result<ShardInfo, AttacheError> {
        self.cfg.limits.check_client_id(&msg.client_id)?;
        self.check_writable()?;
        let size_limit = msg.size_limit.unwrap_or(self.cfg.default_size_limit);
        if size_limit == 0 {
            return Err(AttacheError::InvalidArgument(
                "size limit must be positive (bytes); omit it for the default".into(),
            ));
        }
        self.check_up()?;
        self.check_lease("create shards")?;
        let path = self.cfg.shard_path(msg.shard_id);
        let cfg = &self.cfg;
        if self.shards.contains_key(&msg.shard_id)
            || self.factory.exists(&path).await.map_err(|e| volume_error(cfg, "list shards", e))?
        {
            return Err(AttacheError::AlreadyExists(format!(
                "shard {} exists already on volume {}",
                msg.shard_id, cfg.volume_id
            )));
        }
        self.make_room().await;
        // Again after the room was made (closes take time).
        self.check_up()?;
        self.check_lease("create shards")?;
        let cfg = &self.cfg;
        let opened = tokio::time::Instant::now();
        let in_flight = self.io.begin();
        let engine = self
            .factory
            .open(&path, OpenMode::ReadWrite { create: true })
            .await
            .map_err(|e| volume_error(cfg, &format!("create shard {}", msg.shard_id), e))?;
        let meta = ShardMeta::new(msg.shard_id, msg.client_id, size_limit);
        if let Err(e) = Shard::init_meta(&*engine, &meta).await {
            engine.close().await;
            let what = format!("create shard {}", msg.shard_id);
            if let EngineError::Indeterminate(_) | EngineError::NoSpace(_) = e {
                // The meta may be durable: remove the shard, or the create
                // may have taken effect.
                if let Err(d) = self.factory.destroy(&path).await {
                    return Err(AttacheError::OutcomeUnknown(format!(
                        "volume {}: {what}: {e}, and its remains could not be removed ({d}); the shard may exist",
                        cfg.volume_id
                    )));
                }
            }
            return Err(volume_error(cfg, &what, e));
        }
        drop(in_flight);
        tracing::info!(shard_id = meta.shard_id, owner = %meta.owner, size_limit, volume = %cfg.volume_id, "created shard");
        let info = ShardInfo { shard_id: meta.shard_id, owner: meta.owner.clone(), state: meta.state, size_limit };
        self.serve(engine, meta, opened, false, ctx);
        Ok(info)
    }

    async fn delete(&mut self, msg: DeleteShard, ctx: &Context<Self>) -> Result<ShardInfo, AttacheError> {
        self.check_writable()?;
        let (addr, _call) = self.shard(msg.shard_id, ctx).await?;
        let info = addr.send(MarkDeleted { client_id: msg.client_id }).await??;
        // The delete is durable: from here on the shard is gone, whatever happens to its files.
        self.shards.remove(&msg.shard_id);
        let _ = addr.send(Shutdown).await;
        addr.stop();
        let path = self.cfg.shard_path(msg.shard_id);
        if let Err(e) = self.factory.destroy(&path).await {
            // The next open of the shard finds it marked deleted and removes it then.
            tracing::warn!(shard_id = msg.shard_id, error = %e, "could not remove a deleted shard's files yet");
        }
        tracing::info!(shard_id = msg.shard_id, "deleted shard");
        Ok(info)
    }
}

impl Handler<DeleteShard> for ShardManager {
    async fn handle(&mut self, msg: DeleteShard, ctx: &Context<Self>) -> Reply<Result<ShardInfo, AttacheError>> {
        Reply::now(self.delete(msg, ctx).await)
    }
}

impl<M: ShardOp> Handler<ShardCall<M>> for ShardManager
where
    Shard: Handler<M>,
{
    async fn handle(&mut self, msg: ShardCall<M>, ctx: &Context<Self>) -> Reply<M::Reply> {
        let (addr, call) = match self.shard(msg.shard_id, ctx).await {
            Ok(open) => open,
            Err(e) => return Reply::now(Err(e)),
        };
        match addr.enqueue(msg.op).await {
            // The token is held until the reply: the shard stays open meanwhile.
            Ok(pending) => Reply::later(async move {
                let reply = pending.await.unwrap_or_else(|e| Err(e.into()));
                drop(call);
                reply
            }),
            Err(e) => Reply::now(Err(e.into())),
        }
    }
}

/// A shard whose write had an unknown outcome is closed; the next request
/// for it opens it again from the volume.
impl Handler<ShardFailed> for ShardManager {
    async fn handle(&mut self, msg: ShardFailed, _ctx: &Context<Self>) -> Reply<()> {
        if let Some(durable) = msg.durable_through {
            self.unsure.insert(msg.shard_id, durable);
        }
        let Some(OpenShard { addr, .. }) = self.shards.remove(&msg.shard_id) else { return Reply::now(()) };
        tracing::warn!(shard_id = msg.shard_id, volume = %self.cfg.volume_id, "closing a shard to reopen it");
        // Closed outside the manager (an engine may wait for its reads);
        // a reopen meanwhile finds the engine locked and is refused, retried.
        Reply::later(async move {
            let _ = addr.send(Shutdown).await;
            addr.stop();
        })
    }
}

impl Handler<ListOpenShards> for ShardManager {
    async fn handle(&mut self, _msg: ListOpenShards, _ctx: &Context<Self>) -> Reply<Vec<ShardId>> {
        Reply::now(self.shards.keys().copied().collect())
    }
}

impl Handler<ShutdownShards> for ShardManager {
    async fn handle(&mut self, _msg: ShutdownShards, _ctx: &Context<Self>) -> Reply<()> {
        self.shut_down = true;
        let shards = std::mem::take(&mut self.shards);
        // Waited for outside the manager, which meanwhile keeps refusing
        // requests (a shard whose write hangs would otherwise stop it).
        Reply::later(async move {
            futures::future::join_all(shards.values().map(|open| open.addr.send(Shutdown))).await;
            shards.values().for_each(|open| open.addr.stop());
        })
    }
}
