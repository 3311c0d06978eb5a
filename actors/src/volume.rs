//! The `VolumeManager` actor: one attached volume, its role on this node
//! (primary read-write, or backup), its epoch (the fencing token), and
//! failover.
//!
//! Every `poll_ms`, and at once when a watch of the metadata store sees a
//! node's liveness record deleted or the volume's owner record change, it
//! compares the volume's owner record in the metadata store with what it is
//! doing, and acts:
//! - no record, or the record names this node but not at the epoch it
//!   serves (a restart): claim;
//! - the record names another node: be a backup (stepping down first if this
//!   node was primary: someone took over). When that node's liveness record
//!   is gone (its lease expired) or the record is vacant, wait
//!   `takeover_delay_ms` more (the old primary's lease gate has closed by
//!   then, see `lease`) plus `rank_delay_ms` for each live backup ranked
//!   before this node (rank: ascending node id, a deterministic rule), then
//!   claim (checking again the moment that wait ends, not at the next
//!   poll);
//! - the volume is no longer attached to this node (EBS detach): step down
//!   and vacate the record, so a backup takes over at once;
//! - as primary, this node's lease gate has been closed `takeover_delay_ms`
//!   (its lease may have expired: cut off from the metadata store, or
//!   paused): step down, which closes the shards and releases their locks,
//!   so the node that takes the volume over can open them; claim again (a
//!   new epoch) once the gate reopens and the record still names this node;
//! - as primary, a write to the volume has been pending `io_timeout_ms`
//!   (the volume's I/O hangs on this node, see `crate::io_watch`): step
//!   down, waiting only `poll_ms` for the shards, and vacate the record so
//!   a backup takes over (again on each check while the record still names
//!   this node); claim nothing while a write from before is pending;
//! - as primary, the volume's writes have been failing for `io_timeout_ms`
//!   with none succeeding (failed syncs, I/O errors: a failing attachment
//!   or device here): step down and vacate likewise; claim nothing until
//!   `io_timeout_ms` after the last failure (then the volume may have
//!   healed, and a node may need to serve it).
//!
//! A claim is a compare-and-swap on the record's revision that bumps the
//! epoch (layer 1), then the storage fence at that epoch (layer 3: preempts
//! the old holder's reservation), then the shards are opened read-write
//! (their logs replayed) and served. Every role change is reported as a
//! [`VolumeRoleChanged`] to a [`Recipient`] (the node, which routes requests
//! accordingly; this module does not know the node's type). Failovers are counted in the
//! `attache_failovers_total` metric.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::time::{Duration, Instant};

use crate::actor::{Actor, Addr, Context, Handler, Message, Recipient, Reply};
use crate::engine::{EngineError, EngineFactory};
use crate::io_watch::IoWatch;
use crate::lease::LeaseGate;
use crate::meta::store::{MetaOps, NodeId, VolumeRecord};
use crate::meta::Revision;
use crate::provider::VolumeProvider;
use crate::shard_manager::{ShardManager, ShardManagerConfig, ShutdownShards};

/// A volume's role on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Not decided yet (starting, or the metadata store is unreachable).
    Unknown,
    /// This node holds the volume read-write at `epoch`.
    Primary {
        /// The epoch this node claimed (the fencing token).
        epoch: u64,
    },
    /// Another node (0: none, the record is vacant) is primary at `epoch`.
    Backup {
        /// The primary's node id; 0 when the record is vacant.
        primary: NodeId,
        /// The epoch of the owner record.
        epoch: u64,
    },
    /// The volume is not attached to this node.
    Detached,
    /// Stopped: no longer serving this volume.
    Stopped,
}

/// Failover timing, ms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverTiming {
    /// How often the owner record is checked.
    pub poll_ms: u64,
    /// How long after the primary's lease is gone before a backup claims.
    pub takeover_delay_ms: u64,
    /// Extra wait per backup ranked before this node.
    pub rank_delay_ms: u64,
    /// A primary whose oldest write to the volume has been pending this
    /// long takes the volume's I/O for hung: it gives the volume up (a
    /// backup takes over), and claims it again only once no write from
    /// before is pending. Also the most a step-down or shutdown waits for
    /// each of the volume's shard managers to close.
    pub io_timeout_ms: u64,
}

/// The takeover and rank delays are the simulation's (`SimTiming`), so the
/// defaults that ship are the ones the simulated schedules exercise; the
/// lease math needs no takeover delay at all at the default drift and margin
/// (`LeaseTiming::validate`), the delay is extra room for the old primary's
/// step-down. Backups check the owner record on a watch of the metadata
/// store and when their wait ends, so `poll_ms` is the fallback.
impl Default for FailoverTiming {
    fn default() -> Self {
        FailoverTiming { poll_ms: 500, takeover_delay_ms: 300, rank_delay_ms: 500, io_timeout_ms: 10_000 }
    }
}

impl FailoverTiming {
    /// Checks the settings a volume manager needs: a positive poll period,
    /// and an I/O timeout of at least one poll period. (A zero takeover or
    /// rank delay is allowed: the claim's compare-and-swap still keeps one
    /// primary per epoch.)
    ///
    /// Errors: a message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.poll_ms == 0 {
            return Err("failover poll_ms must be positive (ms between checks of the volume owner record)".into());
        }
        if self.io_timeout_ms < self.poll_ms {
            return Err(format!(
                "failover io_timeout_ms ({}) must be at least poll_ms ({}): it is how long a write may be \
                 pending before the volume counts as hung, checked every poll_ms",
                self.io_timeout_ms, self.poll_ms
            ));
        }
        Ok(())
    }
}

/// One successful claim of a volume, as the claiming node saw it (its
/// monotonic clock's instants; the waits themselves are measured on its
/// possibly drifting lease clock): what the simulation's failover report
/// is built from, and what the `attache_takeover_seconds{phase}` metric
/// (`wait`, `cas`, `fence`, `open`) and the "primary for volume" log line
/// give in production.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    /// The volume.
    pub volume_id: String,
    /// The claiming node.
    pub node_id: NodeId,
    /// The epoch claimed (the fencing token).
    pub epoch: u64,
    /// Whether the record named another node, or nobody (vacated), before:
    /// a takeover. A first claim of a volume nobody held, or a node claiming
    /// again a volume the record still names it for, is not one.
    pub takeover: bool,
    /// When this node first saw the record's primary gone (its liveness
    /// record expired) or the record vacant; the claim's start when it
    /// waited for neither.
    pub gone_seen: Instant,
    /// When the claim's compare-and-swap was sent (after the takeover and
    /// rank delays and the check that found them over).
    pub started: Instant,
    /// When the compare-and-swap came back won.
    pub cas_done: Instant,
    /// When the storage fence was taken at the new epoch.
    pub fenced: Instant,
    /// When the node began serving the volume read-write (shards open
    /// lazily, on their first request, so their recovery comes after this).
    pub serving: Instant,
}

/// Told of every successful claim on this node (see [`Claimed`]); the
/// simulation passes one to collect them.
pub type ClaimLog = Arc<dyn Fn(&Claimed) + Send + Sync>;

/// Sent by a volume manager to its [`Recipient`] when its role changes.
pub struct VolumeRoleChanged {
    /// The volume.
    pub volume_id: String,
    /// Its new role on this node.
    pub role: Role,
    /// Where its shards are served: read-write as primary, the read-only view as backup.
    pub shards: Option<Addr<ShardManager>>,
}

impl Message for VolumeRoleChanged {
    type Reply = ();
}

/// The volume manager; see the module docs.
pub struct VolumeManager {
    cfg: ShardManagerConfig,
    node_id: NodeId,
    factory: Arc<dyn EngineFactory>,
    provider: Arc<dyn VolumeProvider>,
    gate: Arc<LeaseGate>,
    meta: MetaOps,
    report: Recipient<VolumeRoleChanged>,
    timing: FailoverTiming,
    /// Whether this node is the volume's home: it claims the volume first
    /// when nobody holds it yet (spreads primaries over nodes).
    home: bool,
    role: Role,
    /// The highest epoch this manager has seen in the owner record or
    /// claimed; a claim always lands above it.
    last_epoch: u64,
    shards: Option<Addr<ShardManager>>,
    /// As backup: the read-only view of the volume's shards (stale reads).
    backup_shards: Option<Addr<ShardManager>>,
    /// The retired flags of `shards` and `backup_shards` (see
    /// `ShardManager::retired_flag`), set the moment they stop serving.
    retire: Vec<Arc<AtomicBool>>,
    /// Since when this primary has seen its lease gate closed.
    gate_closed_since: Option<Instant>,
    /// Since when the primary named by the record has looked gone (or the
    /// record vacant; or, with epoch 0, absent), with that primary and the
    /// record's epoch: a wait counts for that record only, so a record that
    /// changed meanwhile (the old primary came back and claimed a new
    /// epoch) starts the wait again.
    gone_since: Option<(NodeId, u64, Instant)>,
    stopped: bool,
    /// The volume's writes in flight on this node (see `crate::io_watch`).
    io: Arc<IoWatch>,
    claims: Option<ClaimLog>,
    /// When the check asked for by [`Self::check_again_in`] runs.
    early_check: Option<Instant>,
}

/// The parts a volume manager is built from.
pub struct VolumeParts {
    /// Opens the volume's shard engines.
    pub factory: Arc<dyn EngineFactory>,
    /// Attaches and fences the volume.
    pub provider: Arc<dyn VolumeProvider>,
    /// This node's lease gate, shared with its shards.
    pub gate: Arc<LeaseGate>,
    /// The metadata store (owner and liveness records).
    pub meta: MetaOps,
    /// Failover timing, ms.
    pub timing: FailoverTiming,
    /// Whether this node is the volume's home (see `VolumeManager`).
    pub home: bool,
    /// Told of each successful claim, if set.
    pub claims: Option<ClaimLog>,
}

/// Polls after which a volume manager sets up its metadata watch again
/// (see `VolumeManager::watch_for_takeovers`).
const REWATCH_POLLS: u32 = 20;

/// A check, sent by the manager's own timer and by its metadata watch.
struct Tick;

impl Message for Tick {
    type Reply = ();
}

impl VolumeManager {
    /// A manager of volume `cfg.volume_id` for node `node_id`, reporting its
    /// role changes to `report`.
    ///
    /// Panics: when `parts.timing` is invalid ([`FailoverTiming::validate`]:
    /// the node checks it at start-up) or `node_id` is 0 (0 means "vacant").
    pub fn new(
        cfg: ShardManagerConfig,
        node_id: NodeId,
        parts: VolumeParts,
        report: Recipient<VolumeRoleChanged>,
    ) -> Self {
        if let Err(e) = parts.timing.validate() {
            panic!("volume manager for {}: {e}", cfg.volume_id);
        }
        assert!(node_id != 0, "node id 0 means a vacant owner record; node ids start at 1");
        VolumeManager {
            cfg,
            node_id,
            factory: parts.factory,
            provider: parts.provider,
            gate: parts.gate,
            meta: parts.meta,
            report,
            timing: parts.timing,
            home: parts.home,
            role: Role::Unknown,
            last_epoch: 0,
            shards: None,
            backup_shards: None,
            retire: Vec::new(),
            gate_closed_since: None,
            gone_since: None,
            stopped: false,
            io: Arc::default(),
            claims: parts.claims,
            early_check: None,
        }
    }

    /// How long the oldest write in flight to the volume has been pending,
    /// when that is `io_timeout_ms` or more: the volume's I/O hangs here.
    fn io_hung(&self) -> Option<Duration> {
        self.io.oldest_pending().filter(|d| *d >= Duration::from_millis(self.timing.io_timeout_ms))
    }

    /// How long the volume's writes have been failing here (no write
    /// succeeded since the first failure), when that is `io_timeout_ms` or
    /// more and the latest failure is less than `io_timeout_ms` old: its
    /// I/O keeps failing on this node (a failing attachment or device). One
    /// failure followed by no writes at all is not enough.
    fn io_failing(&self) -> Option<Duration> {
        let timeout = Duration::from_millis(self.timing.io_timeout_ms);
        let recent = self.io.since_last_failure().is_some_and(|d| d < timeout);
        self.io.failing_for().filter(|d| recent && *d >= timeout)
    }

    /// Whether this node's last write to the volume failed less than
    /// `io_timeout_ms` ago (and none succeeded since): it does not claim the
    /// volume then, so a node whose writes keep failing leaves it to a
    /// backup; after that it may claim again (its volume may have healed).
    fn recently_failing(&self) -> bool {
        self.io.failing_for().is_some()
            && self.io.since_last_failure().is_some_and(|d| d < Duration::from_millis(self.timing.io_timeout_ms))
    }

    /// Why the volume's I/O on this node is unhealthy enough to give the
    /// volume up ([`Self::io_hung`] or [`Self::io_failing`]); `None` when it is not.
    fn io_unhealthy(&self) -> Option<String> {
        if let Some(pending) = self.io_hung() {
            return Some(format!(
                "a write to the volume has been pending for {} ms (io_timeout_ms {}): its I/O hangs on this node",
                pending.as_millis(),
                self.timing.io_timeout_ms
            ));
        }
        self.io_failing().map(|failing| {
            format!(
                "the volume's writes have been failing for {} ms (io_timeout_ms {}): its I/O fails on this node",
                failing.as_millis(),
                self.timing.io_timeout_ms
            )
        })
    }

    fn volume(&self) -> &str {
        &self.cfg.volume_id
    }

    fn set_role(&mut self, role: Role) {
        if role != self.role {
            tracing::info!(volume = %self.cfg.volume_id, from = ?self.role, to = ?role, "volume role change");
            self.role = role;
            let shards = match self.role {
                Role::Primary { .. } => self.shards.clone(),
                Role::Backup { .. } => self.backup_shards.clone(),
                _ => None,
            };
            self.report.do_send(VolumeRoleChanged {
                volume_id: self.cfg.volume_id.clone(),
                role: self.role.clone(),
                shards,
            });
        }
    }

    /// Stops serving the volume's shards: at once (their retired flags: no
    /// request queued in a mailbox is served after this), then in-flight
    /// group commits finish, waited for at most `io_timeout_ms` per shard
    /// manager (`poll_ms` when the volume's I/O hangs: they will not
    /// finish). A write left in flight is fenced off by another node's claim
    /// if it ever lands; this node claims nothing while it is pending.
    async fn close_shards(&mut self) {
        for flag in self.retire.drain(..) {
            flag.store(true, Ordering::Release);
        }
        let ms = if self.io_hung().is_some() { self.timing.poll_ms } else { self.timing.io_timeout_ms };
        for shards in [self.shards.take(), self.backup_shards.take()].into_iter().flatten() {
            if tokio::time::timeout(Duration::from_millis(ms), shards.send(ShutdownShards)).await.is_err() {
                tracing::warn!(volume = %self.volume(), waited_ms = ms,
                    "the volume's shards did not close in time (a write hangs); leaving them behind");
            }
            shards.stop();
        }
    }

    /// Becomes (or stays) a backup of the record's primary, with a read-only
    /// view of the volume's shards for stale reads where the provider's
    /// backups can read the volume (`VolumeProvider::backups_read`).
    fn be_backup(&mut self, primary: NodeId, epoch: u64, ctx: &Context<Self>) {
        // Without a read-only view (block volumes: only the primary mounts
        // one) the role is reported without shards, and the node answers
        // stale reads with a hint to the primary.
        if self.backup_shards.is_none() && self.provider.backups_read() {
            let cfg = ShardManagerConfig { read_only: true, ..self.cfg.clone() };
            let manager = ShardManager::new(cfg, self.factory.clone(), self.gate.clone());
            self.retire.push(manager.retired_flag());
            self.backup_shards = Some(ctx.host().spawn(manager, crate::actor::DEFAULT_MAILBOX_CAPACITY));
        }
        self.set_role(Role::Backup { primary, epoch });
    }

    /// Claims the volume: CAS on the owner record (epoch + 1), storage fence,
    /// open shards. Only while this node's lease gate is open: a node whose
    /// lease lapsed claims nothing until its node record is published again
    /// under a new lease (else a backup could see the claim without the
    /// record, take the volume over, and this node would serve reads on the
    /// old epoch once its gate reopened).
    async fn claim(&mut self, current: Option<&(VolumeRecord, Revision)>, ctx: &Context<Self>) {
        if !self.gate.is_open() {
            tracing::debug!(volume = %self.volume(), "lease gate closed; not claiming");
            return;
        }
        if let Some(pending) = self.io.oldest_pending() {
            // A write of an earlier incarnation of this node's primary (left
            // behind by a step-down) could land after this claim's writes.
            tracing::warn!(volume = %self.volume(), pending_ms = pending.as_millis() as u64,
                "a write to the volume from before is still pending; not claiming");
            return;
        }
        if self.recently_failing() {
            tracing::warn!(volume = %self.volume(), "writes to the volume failed here lately; not claiming");
            return;
        }
        let takeover = current.is_some_and(|(r, _)| r.primary != self.node_id);
        let started = Instant::now();
        crate::buggify::delay("volume.claim.before_cas", 500).await;
        let won = match self.meta.claim_volume(self.volume(), self.node_id, current).await {
            Ok(Ok(record)) => record,
            Ok(Err(other)) => {
                tracing::info!(volume = %self.volume(), current = ?other.as_ref().map(|o| &o.0), "lost the claim race");
                return;
            }
            Err(e) => {
                tracing::warn!(volume = %self.volume(), error = %e, "claim failed");
                return;
            }
        };
        // Epochs only grow: a claim at or below an epoch this manager has
        // seen would hand out a fencing token twice (the metadata store lost
        // acknowledged records). Never serve on it.
        if won.epoch <= self.last_epoch {
            tracing::error!(volume = %self.volume(), epoch = won.epoch, seen = self.last_epoch,
                "claimed an epoch not above one seen before: the metadata store went back in time; not serving");
            // Give the record up, so the volume does not stay named for a
            // node that will not serve it (the next claim bumps the epoch).
            let _ = self.meta.vacate_volume(self.volume(), self.node_id, won.epoch).await;
            // In tests and the simulation this is a reported failure.
            debug_assert!(won.epoch > self.last_epoch, "claimed epoch {} <= last seen {}", won.epoch, self.last_epoch);
            return;
        }
        self.last_epoch = won.epoch;
        let cas_done = Instant::now();
        // Bounded: a hung device (or a writer holding the EPOCH file's lock)
        // must not keep the claim, and the record naming this node, forever.
        // A fence taken late is harmless: the next claim's epoch preempts it.
        let limit = Duration::from_millis(self.timing.io_timeout_ms);
        let acquired =
            tokio::time::timeout(limit, self.provider.acquire(self.volume(), won.epoch)).await.unwrap_or_else(|_| {
                Err(EngineError::Io(format!(
                    "taking the storage fence took over io_timeout_ms ({} ms)",
                    limit.as_millis()
                )))
            });
        match acquired {
            Ok(()) => {}
            Err(EngineError::Fenced(m)) => {
                // A newer epoch holds the volume: this claim is already stale.
                tracing::warn!(volume = %self.volume(), epoch = won.epoch, reason = %m, "storage fence refused a stale claim");
                return;
            }
            Err(e) => {
                tracing::warn!(volume = %self.volume(), error = %e, "cannot take the storage fence; vacating");
                let _ = self.meta.vacate_volume(self.volume(), self.node_id, won.epoch).await;
                // Undo what the claim got done, and count the failure: this
                // node claims nothing for `io_timeout_ms`, so a node that
                // can take the volume gets the vacant record first.
                self.release().await;
                self.io.begin().finish(false);
                return;
            }
        }
        let fenced = Instant::now();
        // The read-only view closes before the shards open read-write.
        self.close_shards().await;
        // A new term judges the volume by its own writes: failures from
        // before (which made this node give the volume up, at least
        // `io_timeout_ms` ago) must not make it step down again at once.
        self.io.clear_failures();
        let manager =
            ShardManager::new(self.cfg.clone(), self.factory.clone(), self.gate.clone()).with_io_watch(self.io.clone());
        self.retire.push(manager.retired_flag());
        self.shards = Some(ctx.host().spawn(manager, crate::actor::DEFAULT_MAILBOX_CAPACITY));
        let claimed = Claimed {
            volume_id: self.cfg.volume_id.clone(),
            node_id: self.node_id,
            epoch: won.epoch,
            takeover,
            gone_seen: self.gone_since.take().map_or(started, |(_, _, at)| at).min(started),
            started,
            cas_done,
            fenced,
            serving: Instant::now(),
        };
        let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_millis() as u64;
        if takeover {
            metrics::counter!("attache_failovers_total", "volume" => self.cfg.volume_id.clone()).increment(1);
            for (phase, from, to) in [
                ("wait", claimed.gone_seen, started),
                ("cas", started, cas_done),
                ("fence", cas_done, fenced),
                ("open", fenced, claimed.serving),
            ] {
                metrics::histogram!("attache_takeover_seconds", "phase" => phase)
                    .record(to.saturating_duration_since(from).as_secs_f64());
            }
        }
        tracing::info!(volume = %self.volume(), epoch = won.epoch, takeover,
            wait_ms = ms(claimed.gone_seen, started), cas_ms = ms(started, cas_done),
            fence_ms = ms(cas_done, fenced), open_ms = ms(fenced, claimed.serving), "primary for volume");
        if let Some(log) = &self.claims {
            log(&claimed);
        }
        self.set_role(Role::Primary { epoch: won.epoch });
    }

    /// Steps down from primary; vacates the record when `vacate` (this node gives the volume up).
    async fn step_down(&mut self, vacate: bool, why: &str) {
        let Role::Primary { epoch } = self.role else { return };
        tracing::warn!(volume = %self.volume(), epoch, why, "stepping down");
        self.close_shards().await;
        if vacate {
            if let Err(e) = self.meta.vacate_volume(self.volume(), self.node_id, epoch).await {
                tracing::warn!(volume = %self.volume(), error = %e, "could not vacate the owner record");
            }
        }
        self.release().await;
        self.set_role(Role::Unknown);
    }

    /// Undoes what `acquire` set up (a block volume's mount), after the
    /// owner record was given up: bounded by `io_timeout_ms`, since an
    /// unmount of a hung device can block (it goes on in the background).
    async fn release(&self) {
        let limit = Duration::from_millis(self.timing.io_timeout_ms);
        match tokio::time::timeout(limit, self.provider.release(self.volume())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(volume = %self.volume(), error = %e, "could not release the volume"),
            Err(_) => tracing::warn!(volume = %self.volume(), "releasing the volume is taking over io_timeout_ms"),
        }
    }

    /// When this node first saw `primary` gone (or the record vacant, or
    /// absent) at `epoch`: now, if it last saw another record so.
    fn gone_since_for(&mut self, primary: NodeId, epoch: u64) -> Instant {
        match self.gone_since {
            Some((p, e, at)) if p == primary && e == epoch => at,
            _ => {
                let now = Instant::now();
                self.gone_since = Some((primary, epoch, now));
                now
            }
        }
    }

    /// Whether this node may claim now that the primary looks gone (or, with
    /// `old_primary` 0, vacated the volume: then no lease needs to run out):
    /// `Ok` when its wait is over, else `Err` with what is left of it on
    /// this node's clock (`None` when the live nodes cannot be read).
    async fn my_turn(&mut self, old_primary: NodeId, epoch: u64) -> Result<(), Option<Duration>> {
        let since = self.gone_since_for(old_primary, epoch);
        let Ok(nodes) = self.meta.live_nodes().await else { return Err(None) };
        let volume = self.cfg.volume_id.clone();
        let mut ranked: Vec<NodeId> = nodes
            .iter()
            .filter(|n| n.node_id != old_primary && n.volumes.contains(&volume))
            .map(|n| n.node_id)
            .collect();
        ranked.sort_unstable();
        let rank = ranked.iter().position(|&id| id == self.node_id).unwrap_or(ranked.len()) as u64;
        let lease_wait = if old_primary == 0 { 0 } else { self.timing.takeover_delay_ms };
        let wait = Duration::from_millis(lease_wait + rank * self.timing.rank_delay_ms);
        // Measured on this node's clock, which may drift (see `crate::lease`).
        let waited = self.gate.local_elapsed(since);
        if waited >= wait {
            Ok(())
        } else {
            Err(Some(wait - waited))
        }
    }

    /// Checks again in `after` (plus a millisecond), besides the periodic
    /// ticks: a takeover's wait ends between two ticks, and waiting for the
    /// next one would add up to `poll_ms` to the failover. No new check is
    /// set up while one is pending no later than a quarter poll after this
    /// one would be.
    fn check_again_in(&mut self, after: Duration, ctx: &Context<Self>) {
        let at = Instant::now() + after + Duration::from_millis(1);
        // A pending check at most a quarter poll after this one will do (on
        // a fast clock the time wanted creeps earlier at every check; each
        // must not start another task).
        let slack = Duration::from_millis(self.timing.poll_ms / 4);
        if self.early_check.is_some_and(|pending| pending <= at + slack && pending > Instant::now()) {
            return;
        }
        self.early_check = Some(at);
        let me = ctx.address();
        ctx.host().spawn_detached(async move {
            tokio::time::sleep_until(at).await;
            let _ = me.send(Tick).await;
        });
    }

    /// Checks at once whenever the metadata store says a node's liveness
    /// record is gone or the volume's owner record changed
    /// (`MetaOps::watch_takeover_events`), besides the poll: a failover no
    /// longer waits up to `poll_ms` to notice the old primary's lease
    /// ended. Each watch is set up again after [`REWATCH_POLLS`] polls (a
    /// partition can stall a stream without ending it), and after a
    /// failure, a poll period later.
    fn watch_for_takeovers(&self, ctx: &Context<Self>) {
        let (meta, volume, me) = (self.meta.clone(), self.cfg.volume_id.clone(), ctx.address());
        let period = Duration::from_millis(self.timing.poll_ms);
        ctx.host().spawn_detached(async move {
            use futures::{FutureExt as _, StreamExt as _};
            while !me.is_closed() {
                let mut rotated = false;
                if let Ok(events) = meta.watch_takeover_events(&volume).await {
                    let rewatch = Box::pin(tokio::time::sleep(period * REWATCH_POLLS));
                    let mut events = events.take_until(rewatch);
                    while let Some(event) = events.next().await {
                        if event.is_err() {
                            break;
                        }
                        // Events that came together make one check (after
                        // an outage, every lease may expire at once).
                        while let Some(Some(more)) = events.next().now_or_never() {
                            if more.is_err() {
                                break;
                            }
                        }
                        if me.send(Tick).await.is_err() {
                            return;
                        }
                    }
                    rotated = events.is_stopped();
                }
                // Set up again at once after a rotation; a poll period
                // later after a failure or a stream that ended by itself.
                if !rotated {
                    tokio::time::sleep(period).await;
                }
            }
        });
    }

    /// One check of the owner record; see the module docs.
    async fn check(&mut self, ctx: &Context<Self>) {
        if self.stopped {
            return;
        }
        if !self.provider.is_attached(self.volume()).await {
            if matches!(self.role, Role::Primary { .. }) {
                self.step_down(true, "the volume was detached from this node").await;
            }
            self.close_shards().await;
            self.set_role(Role::Detached);
            return;
        }
        if let (Role::Primary { .. }, Some(why)) = (&self.role, self.io.fenced()) {
            // The storage fence refused a write (the EPOCH file, checked
            // before writing; a device's conflict reaches RocksDB as a failed
            // fsync instead): a newer primary holds the fence. Serve nothing
            // more from this term.
            self.step_down(false, &format!("the volume's storage fence refused a write ({why})")).await;
            return;
        }
        if let (Role::Primary { .. }, Some(why)) = (&self.role, self.io_unhealthy()) {
            // A write neither completes nor fails, or every write fails:
            // give the volume up so a backup takes over (it claims a vacant
            // record at once).
            self.step_down(true, &why).await;
            return;
        }
        if matches!(self.role, Role::Primary { .. }) && !self.gate.is_open() {
            // The lease may have expired (the node is cut off from the
            // metadata store, or paused): another node may take the volume
            // over, no sooner than `takeover_delay_ms` after the gate closed
            // (see `crate::lease`). Close the shards by then, releasing their
            // locks, so that it can open them; claim again once the gate
            // reopens. (A shorter closure, a renewal that came late, keeps
            // the shards.)
            let since = *self.gate_closed_since.get_or_insert_with(Instant::now);
            if self.gate.local_elapsed(since) >= Duration::from_millis(self.timing.takeover_delay_ms) {
                self.step_down(false, "the lease gate closed: this node's lease may have expired").await;
                return;
            }
        } else {
            self.gate_closed_since = None;
        }
        let current = match self.meta.volume(self.volume()).await {
            Ok(current) => current,
            Err(e) => {
                // Keep the role: a primary serves while its lease gate allows.
                tracing::debug!(volume = %self.volume(), error = %e, "owner record unreadable");
                return;
            }
        };
        if let Some((record, _)) = &current {
            self.last_epoch = self.last_epoch.max(record.epoch);
        }
        let Some((record, rev)) = current.clone() else {
            // A volume nobody ever held: its home node claims it at once,
            // others only if the home node does not within the takeover delay.
            let since = self.gone_since_for(0, 0);
            let waited = self.gate.local_elapsed(since);
            if self.home || waited >= Duration::from_millis(self.timing.takeover_delay_ms + self.timing.rank_delay_ms) {
                self.claim(None, ctx).await;
            }
            if self.role == Role::Unknown {
                self.be_backup(0, 0, ctx);
            }
            return;
        };
        if record.primary == self.node_id {
            match self.role {
                Role::Primary { epoch } if epoch == record.epoch => {}
                Role::Primary { .. } => self.step_down(false, "the owner record moved to another epoch").await,
                // The volume hangs or fails here and the record still names
                // this node (a vacate failed, or it stepped down for another
                // reason meanwhile): vacate again, so a backup takes over.
                _ if self.io_hung().is_some() || self.recently_failing() => {
                    if let Err(e) = self.meta.vacate_volume(self.volume(), self.node_id, record.epoch).await {
                        tracing::warn!(volume = %self.volume(), error = %e, "could not vacate the volume yet");
                    }
                }
                _ => self.claim(Some(&(record, rev)), ctx).await,
            }
            return;
        }
        if matches!(self.role, Role::Primary { .. }) {
            self.step_down(false, "another node took the volume over").await;
        }
        let gone = record.primary == 0 || matches!(self.meta.node(record.primary).await, Ok(None));
        if !gone {
            self.gone_since = None;
        } else {
            match self.my_turn(record.primary, record.epoch).await {
                Ok(()) => {
                    tracing::info!(volume = %self.volume(), old = record.primary, epoch = record.epoch,
                        "primary is gone; taking over");
                    self.claim(Some(&(record.clone(), rev)), ctx).await;
                    if matches!(self.role, Role::Primary { .. }) {
                        return;
                    }
                }
                Err(Some(left)) => self.check_again_in(left, ctx),
                Err(None) => {}
            }
        }
        self.be_backup(record.primary, record.epoch, ctx);
    }
}

impl Actor for VolumeManager {
    fn name(&self) -> String {
        format!("volume-manager-{}", self.cfg.volume_id)
    }

    async fn started(&mut self, ctx: &Context<Self>) {
        if let Err(e) = self.provider.attach(self.volume()).await {
            tracing::warn!(volume = %self.volume(), error = %e, "cannot attach the volume");
        }
        self.check(ctx).await;
        if self.role == Role::Unknown {
            // Report once, so the node's start-up does not wait for the metadata store forever.
            self.report.do_send(VolumeRoleChanged {
                volume_id: self.cfg.volume_id.clone(),
                role: Role::Unknown,
                shards: None,
            });
        }
        self.watch_for_takeovers(ctx);
        let me = ctx.address();
        let period = Duration::from_millis(self.timing.poll_ms);
        ctx.host().spawn_detached(async move {
            // One tick at a time: a check slower than the period (metadata
            // calls that wait or time out) delays the next tick. Ticks sent
            // regardless would queue up ahead of `LeaseLapsed` and the
            // node's other messages, and keep the manager (and, through its
            // step-down, the node) behind for as long as the queue lasts.
            while !me.is_closed() {
                tokio::time::sleep(period).await;
                if me.send(Tick).await.is_err() {
                    break;
                }
            }
        });
    }
}

impl Handler<Tick> for VolumeManager {
    async fn handle(&mut self, _msg: Tick, ctx: &Context<Self>) -> Reply<()> {
        self.check(ctx).await;
        Reply::now(())
    }
}

/// Steps down: shuts the volume's shards down (in-flight writes finish) and
/// stops serving it; as primary, vacates the owner record so a backup takes
/// over at once. Replies when done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopVolume;

impl Message for StopVolume {
    type Reply = ();
}

impl Handler<StopVolume> for VolumeManager {
    async fn handle(&mut self, _msg: StopVolume, _ctx: &Context<Self>) -> Reply<()> {
        self.stopped = true;
        self.step_down(true, "node shutting down").await;
        self.close_shards().await;
        self.set_role(Role::Stopped);
        Reply::now(())
    }
}

/// The node's lease expired: as primary, step down now (without vacating:
/// the owner record decides who serves next). Replies once the shards are
/// closed, or closing them timed out (see `FailoverTiming::io_timeout_ms`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseLapsed;

impl Message for LeaseLapsed {
    type Reply = ();
}

impl Handler<LeaseLapsed> for VolumeManager {
    async fn handle(&mut self, _msg: LeaseLapsed, _ctx: &Context<Self>) -> Reply<()> {
        self.step_down(false, "the node's lease expired").await;
        Reply::now(())
    }
}

/// The volume's current role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRole;

impl Message for GetRole {
    type Reply = Role;
}

impl Handler<GetRole> for VolumeManager {
    async fn handle(&mut self, _msg: GetRole, _ctx: &Context<Self>) -> Reply<Role> {
        Reply::now(self.role.clone())
    }
}
