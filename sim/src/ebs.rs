//! `SimEbs`: simulated block volumes with EBS io2 multi-attach semantics, as
//! the simulation's storage fault model.
//!
//! - A volume can be attached to at most 16 nodes at once (io2 limit).
//! - Data is a set of append-only files per volume. An append lands in the
//!   writing node's pending buffer (its page cache); `sync` makes it durable.
//!   A node that crashes, or whose volume is detached, loses its pending
//!   appends; with torn writes on, a crash may keep a random prefix of the
//!   last append of a file (a torn sector), which readers must detect.
//! - The storage fence, in one of the two models production ships
//!   ([`FenceModel`]): reservations in the NVMe style (`reserve(volume,
//!   node, key)` registers and preempts any holder with a lower key; from
//!   then on the volume rejects appends and syncs from every other node,
//!   `Fenced`), or the EPOCH file of `attache dev`'s local volumes (the same
//!   `reserve` raises the volume's epoch file; the volume takes anyone's
//!   writes, and each engine checks the file before a write batch, holding
//!   the fence lock from its check to its sync). Keys are epochs. A sim-only
//!   switch turns fencing off, to show the single-writer checker catches
//!   what it would let through.
//! - Shard locks (`shard_locks`, on by default), as RocksDB's `LOCK` file:
//!   a read-write open of a shard directory takes its lock, and fails (an
//!   I/O error, as RocksDB's "While lock file") while any process holds it,
//!   this one included; closing the engine or the process ending releases
//!   it. A read-only open takes none. A primary that keeps its shards open
//!   after it lost the volume so keeps the new primary from opening them, as
//!   processes on one machine serving local directories would.
//! - I/O latency, per-node stalls, and per-node hangs (no I/O completes)
//!   come from the simulated clock.
//! - Every durable write is recorded (time, volume, node, epoch) for the
//!   single-writer checker.
//!
//! State lives outside the simulated nodes, so it survives their crashes and
//! restarts, as a volume survives its instances.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use attache_actors::engine::EngineError;
use attache_actors::reservation::{
    AcquireAction, RegisterAction, Registrant, ReleaseAction, ReservationDevice, ReservationError, ReservationStatus,
    ReservationType,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::time::{Duration, Instant};

/// The io2 multi-attach limit.
pub const MAX_ATTACHMENTS: usize = 16;

/// How the volumes behave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EbsConfig {
    /// Latency of an append, µs.
    pub append_us: u64,
    /// Latency of a sync (fsync), µs: the base and a random extra up to `sync_jitter_us`.
    pub sync_us: u64,
    pub sync_jitter_us: u64,
    /// Whether a crash may leave a torn prefix of the last unsynced append.
    pub torn_writes: bool,
    /// Whether the rest of a torn append may read back as zeros or stale
    /// garbage instead of ending the file (see [`torn_tail`]).
    pub garbage_tails: bool,
    /// Background writeback, as a page cache does: an unsynced append may
    /// reach the device on its own once older than a delay drawn from 1 ms
    /// up to this (ms), before any sync, and be read by other nodes from
    /// then on.
    /// 0: off (only a sync makes data durable).
    pub writeback_ms: u64,
    /// Storage fencing (off only to prove the checkers catch its absence).
    pub fencing: bool,
    /// Which fence production ships that the volumes model.
    pub fence: FenceModel,
    /// Under the EPOCH-file fence: a write batch holds the volume's fence
    /// lock (shared) from its check until its sync returns, and raising the
    /// epoch waits for those holds (`SimEbs::fence_busy`), as the shipped
    /// `Fence::hold` and `LocalVolumes::acquire` do. Off only to show the
    /// gap between check and write that the lock closes.
    pub fence_lock: bool,
    /// Whether the nodes share shard locks (RocksDB's `LOCK` files), as
    /// processes on one machine serving local directories do; off, as
    /// separate machines on a multi-attached volume, where a node's lock
    /// holds only against itself (RocksDB refuses a second open in one
    /// process).
    pub shard_locks: bool,
    /// Block volumes with a non-cluster filesystem, as the production
    /// block mode: only the primary mounts a volume (its provider's
    /// `acquire` mounts, `release` unmounts, and opening a shard on a
    /// volume this node has not mounted fails), and backups serve no reads.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub block_mode: bool,
    /// Each volume's size, bytes: its files' bytes (synced, and appends in
    /// any node's page cache) never exceed it, an append or creation that
    /// would is refused with `ENOSPC`, and what is left is the free space
    /// a node sees (`SimEbs::free_bytes`).
    #[serde(default = "default_capacity", skip_serializing_if = "is_default_capacity")]
    pub capacity_bytes: u64,
    /// Volumes whose size differs from `capacity_bytes`: volume → bytes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capacities: BTreeMap<String, u64>,
}

impl EbsConfig {
    /// The size of `volume`, bytes.
    pub fn capacity_of(&self, volume: &str) -> u64 {
        self.capacities.get(volume).copied().unwrap_or(self.capacity_bytes)
    }
}

/// Default of [`EbsConfig::capacity_bytes`]: 1 GiB, more than any scenario writes.
pub const DEFAULT_CAPACITY_BYTES: u64 = 1 << 30;

fn default_capacity() -> u64 {
    DEFAULT_CAPACITY_BYTES
}

fn is_default_capacity(bytes: &u64) -> bool {
    *bytes == DEFAULT_CAPACITY_BYTES
}

impl Default for EbsConfig {
    fn default() -> Self {
        EbsConfig {
            append_us: 20,
            sync_us: 500,
            sync_jitter_us: 1_500,
            torn_writes: true,
            garbage_tails: false,
            writeback_ms: 0,
            fencing: true,
            fence: FenceModel::Reservation,
            fence_lock: true,
            shard_locks: true,
            block_mode: false,
            capacity_bytes: DEFAULT_CAPACITY_BYTES,
            capacities: BTreeMap::new(),
        }
    }
}

/// The storage fence a scenario's volumes model: one of those the
/// production volume providers implement, so a race in the shipped fence is
/// reachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceModel {
    /// An NVMe persistent reservation (io2 multi-attach): the device itself
    /// refuses every write of a node that is not the holder, at the moment
    /// the write reaches it. One writer per volume.
    #[default]
    Reservation,
    /// The `EPOCH` file of local volumes (`attache-runtime`'s
    /// `LocalVolumes`): acquiring raises the file's epoch; every write batch
    /// of an engine opened at epoch `e` first checks the file still says
    /// `e`, then writes, holding the fence lock (`EbsConfig::fence_lock`)
    /// from its check to the end of its sync, so a batch checked before a
    /// newer epoch was taken ends before it is. The device itself takes
    /// anyone's writes. The single-writer rule is checked per shard
    /// directory (`SyncRecord::scope`), the scope RocksDB's `LOCK` guards too.
    EpochFile,
}

/// One durable write (or a read-write open), for the single-writer checker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// Simulated ms since the volumes were created.
    pub at_ms: u64,
    pub volume: String,
    pub node: String,
    /// The writer's epoch (fencing token) for the volume.
    pub epoch: u64,
    /// What one writer at a time owns under the volume's fence model: the
    /// volume (a reservation), or the shard directory `volume/dir` (the
    /// EPOCH file, where RocksDB's LOCK keeps one writer per shard).
    #[serde(default)]
    pub scope: String,
    pub bytes: usize,
    /// Not a write but a read-write open (its recovery read the log): no
    /// write of an older epoch may land in the scope after it, or the
    /// opener's state misses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open: bool,
}

#[derive(Default)]
struct File {
    durable: Vec<u8>,
    /// Unsynced appends, in order.
    pending: Vec<Pending>,
}

/// One unsynced append: in its node's page cache until a sync, or until
/// written back on its own (`EbsConfig::writeback_ms`).
struct Pending {
    node: String,
    data: Vec<u8>,
    /// When background writeback may have put it on the device (none:
    /// only a sync does).
    due: Option<Instant>,
    /// The writer's epoch, for the write's record.
    epoch: u64,
}

#[derive(Default)]
struct Volume {
    attached: Vec<String>,
    /// The EPOCH file (`FenceModel::EpochFile`): who raised it, to what.
    epoch_file: Option<(String, u64)>,
    /// The namespace's NVMe reservation state (`FenceModel::Reservation`).
    resv: Reservations,
    files: BTreeMap<String, File>,
    /// Per node: extra latency (µs) until a time.
    stalls: BTreeMap<String, (Instant, u64)>,
    /// Nodes whose I/O on this volume never completes.
    hung: std::collections::BTreeSet<String>,
    /// Per node: every sync fails until this time (`Fault::DiskErrors`).
    failing_syncs: BTreeMap<String, Instant>,
    /// The volume is full until this time (`Fault::DiskFull`).
    full_until: Option<Instant>,
    /// Shard directory → the nodes holding its lock, each with its token
    /// (more than one only without shared locks).
    locks: BTreeMap<String, Vec<(String, u64)>>,
    /// Write batches holding the EPOCH-file fence lock now ([`EpochFileHold`]).
    fence_holds: usize,
}

impl Volume {
    /// Whether the volume is full now (`Fault::DiskFull`).
    fn full_now(&self) -> bool {
        self.full_until.is_some_and(|t| Instant::now() < t)
    }

    /// Bytes in the volume's files: synced, and appends in any node's page cache.
    fn used_bytes(&self) -> u64 {
        let files = self.files.values();
        files.map(|f| f.durable.len() + f.pending.iter().map(|p| p.data.len()).sum::<usize>()).sum::<usize>() as u64
    }
}

/// A namespace's NVMe reservation state, as the NVM Express Base
/// Specification defines it (see `attache_actors::reservation`).
#[derive(Default)]
struct Reservations {
    /// Bumped by each successful Register, Preempt and Clear.
    generation: u32,
    /// (node, key), in registration order.
    registrants: Vec<(String, u64)>,
    /// The holding node and the type (under an all-registrants type, every
    /// registrant holds; this is the first).
    holder: Option<(String, ReservationType)>,
    /// Nodes preempted without abort, and when: their commands that were
    /// in flight then still complete.
    preempted: BTreeMap<String, Instant>,
}

impl Reservations {
    fn key_of(&self, node: &str) -> Option<u64> {
        self.registrants.iter().find(|(n, _)| n == node).map(|(_, k)| *k)
    }

    /// Whether `node`'s write is refused (Reservation Conflict), and by whom.
    fn conflict(&self, node: &str) -> Option<(String, u64)> {
        let (holder, rtype) = self.holder.as_ref()?;
        let registered = self.key_of(node).is_some();
        let holds = holder == node || (rtype.all_registrants() && registered);
        if holds || rtype.lets_write(registered) {
            return None;
        }
        Some((holder.clone(), self.key_of(holder).unwrap_or(0)))
    }

    /// Removes `node`'s registration; a reservation it held is released,
    /// or passes to the next registrant under an all-registrants type.
    fn unregister(&mut self, node: &str) {
        self.registrants.retain(|(n, _)| n != node);
        if let Some((holder, rtype)) = self.holder.clone() {
            if holder == node {
                self.holder = match self.registrants.first() {
                    Some((next, _)) if rtype.all_registrants() => Some((next.clone(), rtype)),
                    _ => None,
                };
            }
        }
    }

    /// Unregisters every registrant with `key` but `except`; whether any had it.
    fn unregister_key(&mut self, key: u64, except: &str, abort: bool, now: Instant) -> bool {
        let hit: Vec<String> =
            self.registrants.iter().filter(|(n, k)| *k == key && n != except).map(|(n, _)| n.clone()).collect();
        for n in &hit {
            self.unregister(n);
            if !abort {
                self.preempted.insert(n.clone(), now);
            }
        }
        !hit.is_empty()
    }
}

/// A node's NVMe Host Identifier in the simulation: its name's bytes.
pub fn host_id(node: &str) -> u128 {
    let mut b = [0u8; 16];
    for (d, s) in b.iter_mut().zip(node.bytes()) {
        *d = s;
    }
    u128::from_be_bytes(b)
}

fn conflict(msg: String) -> ReservationError {
    ReservationError::Conflict(msg)
}

struct Ebs {
    cfg: EbsConfig,
    start: Instant,
    volumes: BTreeMap<String, Volume>,
    syncs: Vec<SyncRecord>,
    rng: ChaCha8Rng,
    /// The last lock token handed out.
    lock_tokens: u64,
    counts: VolumeCounts,
    /// Fault driver waits for a moment (`fence`, `sync`, `create`) on a
    /// volume; see [`SimEbs::wait_for`].
    waiters: Vec<(&'static str, String, tokio::sync::oneshot::Sender<String>)>,
}

/// What the volumes went through in a run (a summary's `volumes`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeCounts {
    /// Appends, syncs and file changes the reservation refused (a fenced-off writer).
    pub fenced_writes: u64,
    /// Crashes that left part of an unsynced append in a file (torn tails).
    pub torn_tails: u64,
    /// Read-write opens refused because another process held the shard's lock.
    pub lock_conflicts: u64,
    /// Syncs failed by injected disk errors, and how many of them had made
    /// their data durable anyway.
    pub failed_syncs: u64,
    pub failed_syncs_durable: u64,
    /// Appends and file creations refused because the volume was full.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub full_writes: u64,
    /// Unsynced appends that background writeback put on the device.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub written_back: u64,
}

/// For `skip_serializing_if` on counts that summaries leave out when 0.
pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl VolumeCounts {
    /// Adds `other`'s counts to these (a run of many seeds sums them).
    pub fn add(&mut self, other: &VolumeCounts) {
        self.fenced_writes += other.fenced_writes;
        self.torn_tails += other.torn_tails;
        self.lock_conflicts += other.lock_conflicts;
        self.failed_syncs += other.failed_syncs;
        self.failed_syncs_durable += other.failed_syncs_durable;
        self.full_writes += other.full_writes;
        self.written_back += other.written_back;
    }

    /// Whether nothing happened (then the summary leaves the counts out).
    pub fn is_empty(&self) -> bool {
        *self == VolumeCounts::default()
    }
}

/// A write batch's hold on a volume's EPOCH-file fence lock
/// ([`SimEbs::hold_epoch_file`]); dropping it (the batch ended, or its node
/// crashed) releases it.
pub struct EpochFileHold {
    ebs: SimEbs,
    volume: String,
}

impl Drop for EpochFileHold {
    fn drop(&mut self) {
        if let Some(v) = self.ebs.lock().volumes.get_mut(&self.volume) {
            v.fence_holds -= 1;
        }
    }
}

/// Shared handle on all volumes; clones share them.
#[derive(Clone)]
pub struct SimEbs(Arc<Mutex<Ebs>>);

/// What a crash leaves of an unsynced append `data` whose first `cut` bytes
/// reached the device: those bytes, and with `garbage` (half the time) the
/// rest of the append's length too, reading as zeros (the file grew but
/// its blocks were never written, as after a crash with delayed
/// allocation; half of those times not even the first `cut` bytes were)
/// or as stale bytes (blocks written before the data reached them). Readers must find where the valid
/// log ends by checksum, not by the file's length.
pub fn torn_tail(rng: &mut ChaCha8Rng, data: &[u8], cut: usize, garbage: bool) -> Vec<u8> {
    let mut out = data[..cut].to_vec();
    if garbage && cut < data.len() && rng.random_bool(0.5) {
        let rest = data.len() - cut;
        match rng.random_range(0..3) {
            // Often none of the append's blocks were written at all.
            0 if rng.random_bool(0.5) => out = vec![0; data.len()],
            0 => out.resize(data.len(), 0),
            1 => out.extend((0..rest).map(|_| rng.random::<u8>())),
            // Stale bytes that look like the start of a frame: a large length.
            _ => out.extend((0..rest).map(|i| if i < 4 { 0x7f } else { rng.random::<u8>() })),
        }
    }
    out
}

/// The directory of file `path` (`shards/5/log` → `shards/5`).
fn dir_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| d)
}

fn io(msg: String) -> EngineError {
    EngineError::Io(msg)
}

/// One node's NVMe reservation commands on the simulated volumes
/// ([`SimEbs::nvme`]), as the device trait the shipped protocol runs on.
pub struct SimNvme<'a> {
    ebs: &'a SimEbs,
    node: &'a str,
}

#[async_trait]
impl ReservationDevice for SimNvme<'_> {
    async fn register(
        &self,
        volume: &str,
        action: RegisterAction,
        crkey: u64,
        nrkey: u64,
        ignore_existing_key: bool,
    ) -> Result<(), ReservationError> {
        self.ebs.nvme_register(volume, self.node, action, crkey, nrkey, ignore_existing_key).await
    }

    async fn acquire(
        &self,
        volume: &str,
        action: AcquireAction,
        rtype: ReservationType,
        crkey: u64,
        prkey: u64,
    ) -> Result<(), ReservationError> {
        self.ebs.nvme_acquire(volume, self.node, action, rtype, crkey, prkey).await
    }

    async fn release(
        &self,
        volume: &str,
        action: ReleaseAction,
        rtype: ReservationType,
        crkey: u64,
    ) -> Result<(), ReservationError> {
        self.ebs.nvme_release(volume, self.node, action, rtype, crkey).await
    }

    async fn report(&self, volume: &str) -> Result<ReservationStatus, ReservationError> {
        self.ebs.nvme_report(volume, self.node).await
    }
}

impl SimEbs {
    /// Volumes named `volumes`, none attached, behaving as `cfg`; `seed`
    /// drives latency jitter and torn-write lengths.
    pub fn new(volumes: &[String], cfg: EbsConfig, seed: u64) -> Self {
        let volumes = volumes.iter().map(|v| (v.clone(), Volume::default())).collect();
        SimEbs(Arc::new(Mutex::new(Ebs {
            cfg,
            start: Instant::now(),
            volumes,
            syncs: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            lock_tokens: 0,
            counts: VolumeCounts::default(),
            waiters: Vec::new(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ebs> {
        self.0.lock().expect("sim ebs lock")
    }

    /// Attaches `volume` to `node`. Errors: unknown volume, or 16 attachments already.
    pub fn attach(&self, volume: &str, node: &str) -> Result<(), EngineError> {
        let mut ebs = self.lock();
        let v = ebs.volumes.get_mut(volume).ok_or_else(|| io(format!("no volume {volume}")))?;
        if v.attached.iter().any(|n| n == node) {
            return Ok(());
        }
        if v.attached.len() >= MAX_ATTACHMENTS {
            return Err(io(format!("volume {volume} is attached to {MAX_ATTACHMENTS} instances already")));
        }
        v.attached.push(node.to_string());
        Ok(())
    }

    /// Detaches `volume` from `node`; the node's unsynced appends to it are lost.
    pub fn detach(&self, volume: &str, node: &str) {
        let mut ebs = self.lock();
        if let Some(v) = ebs.volumes.get_mut(volume) {
            v.attached.retain(|n| n != node);
            for f in v.files.values_mut() {
                f.pending.retain(|p| p.node != node);
            }
        }
    }

    /// Whether `volume` is attached to `node`.
    pub fn is_attached(&self, volume: &str, node: &str) -> bool {
        self.lock().volumes.get(volume).is_some_and(|v| v.attached.iter().any(|n| n == node))
    }

    /// Raises the EPOCH file of `volume` to `epoch` as `node`
    /// (`FenceModel::EpochFile`, as `LocalVolumes::acquire`).
    /// Errors: not attached; `Fenced` when the file names a higher epoch;
    /// an I/O error while write batches hold the fence lock
    /// ([`SimEbs::fence_busy`]); `NoSpace` when the volume is full and the
    /// file does not exist yet (it is rewritten in place after that).
    pub fn raise_epoch_file(&self, volume: &str, node: &str, epoch: u64) -> Result<(), EngineError> {
        let mut ebs = self.lock();
        // What was due reached the device before the epoch changed.
        Self::writeback(&mut ebs, volume);
        let v = Self::attached_volume(&mut ebs, volume, node)?;
        match &v.epoch_file {
            Some((holder, k)) if *k > epoch => {
                Err(EngineError::Fenced(format!("volume {volume} is at epoch {k} (raised by {holder}) > {epoch}")))
            }
            _ if v.fence_holds > 0 => Err(io(format!("volume {volume}: a write batch holds the fence; retry"))),
            _ => {
                // Created, it needs space; after that it is rewritten in
                // place at one length and needs none (as `attache-runtime`'s
                // local volumes write it).
                if v.epoch_file.is_none() {
                    Self::check_space(&mut ebs, volume, 0)?;
                }
                let v = ebs.volumes.get_mut(volume).expect("checked");
                v.epoch_file = Some((node.to_string(), epoch));
                Self::fire(&mut ebs, "fence", volume, node);
                Ok(())
            }
        }
    }

    fn attached_volume<'a>(ebs: &'a mut Ebs, volume: &str, node: &str) -> Result<&'a mut Volume, EngineError> {
        let v = ebs.volumes.get_mut(volume).ok_or_else(|| io(format!("no volume {volume}")))?;
        if !v.attached.iter().any(|n| n == node) {
            return Err(io(format!("volume {volume} is not attached to {node}")));
        }
        Ok(v)
    }

    /// `node`'s reservation commands.
    pub fn nvme<'a>(&'a self, node: &'a str) -> SimNvme<'a> {
        SimNvme { ebs: self, node }
    }

    /// The latency of one reservation command by `node`, or a hang.
    async fn command_wait(&self, volume: &str, node: &str) {
        let (base, jitter) = {
            let ebs = self.lock();
            (ebs.cfg.append_us, ebs.cfg.sync_jitter_us)
        };
        self.io_wait(volume, node, base, jitter).await;
    }

    /// NVMe Reservation Register by `node` on `volume` (see
    /// `ReservationDevice::register`), with the specification's rules.
    pub async fn nvme_register(
        &self,
        volume: &str,
        node: &str,
        action: RegisterAction,
        crkey: u64,
        nrkey: u64,
        ignore_existing_key: bool,
    ) -> Result<(), ReservationError> {
        self.command_wait(volume, node).await;
        let mut ebs = self.lock();
        Self::writeback(&mut ebs, volume);
        let v = Self::attached_volume(&mut ebs, volume, node).map_err(|e| ReservationError::Io(e.to_string()))?;
        let r = &mut v.resv;
        let mine = r.key_of(node);
        let key_ok = ignore_existing_key || mine == Some(crkey);
        match (action, mine) {
            (RegisterAction::Register, Some(k)) if k == nrkey => return Ok(()),
            (RegisterAction::Register, Some(k)) => {
                return Err(conflict(format!("{node} is registered on {volume} with key {k}, not {nrkey}")))
            }
            (RegisterAction::Register, None) => r.registrants.push((node.to_string(), nrkey)),
            (_, None) => return Err(conflict(format!("{node} is not registered on {volume}"))),
            (_, Some(k)) if !key_ok => return Err(conflict(format!("{node}'s key on {volume} is {k}, not {crkey}"))),
            (RegisterAction::Unregister, Some(_)) => r.unregister(node),
            (RegisterAction::Replace, Some(_)) => {
                let entry = r.registrants.iter_mut().find(|(n, _)| n == node).expect("registered");
                entry.1 = nrkey;
            }
        }
        r.generation = r.generation.wrapping_add(1);
        Ok(())
    }

    /// NVMe Reservation Acquire by `node` on `volume` (see
    /// `ReservationDevice::acquire`): the issuer must be registered with
    /// `crkey`; Acquire takes a free reservation (or confirms its own of the
    /// same type); Preempt unregisters the registrants with `prkey` and
    /// takes the reservation if its holder was one of them; with Abort their
    /// commands in flight fail, without it those already issued complete.
    pub async fn nvme_acquire(
        &self,
        volume: &str,
        node: &str,
        action: AcquireAction,
        rtype: ReservationType,
        crkey: u64,
        prkey: u64,
    ) -> Result<(), ReservationError> {
        self.command_wait(volume, node).await;
        let mut ebs = self.lock();
        Self::writeback(&mut ebs, volume);
        let v = Self::attached_volume(&mut ebs, volume, node).map_err(|e| ReservationError::Io(e.to_string()))?;
        let r = &mut v.resv;
        if r.key_of(node) != Some(crkey) {
            return Err(conflict(format!("{node} is not registered on {volume} with key {crkey}")));
        }
        let abort = action == AcquireAction::PreemptAndAbort;
        match (action, r.holder.clone()) {
            (AcquireAction::Acquire, None) => r.holder = Some((node.to_string(), rtype)),
            (AcquireAction::Acquire, Some((h, t))) if h == node && t == rtype => return Ok(()),
            (AcquireAction::Acquire, Some((h, _))) => return Err(conflict(format!("{volume} is reserved by {h}"))),
            (_, None) => {
                if !r.unregister_key(prkey, node, abort, Instant::now()) {
                    return Err(conflict(format!("no registrant of {volume} has key {prkey}")));
                }
            }
            (_, Some((h, t))) if t.all_registrants() => {
                if prkey == 0 {
                    r.holder = Some((node.to_string(), rtype));
                    let others: Vec<u64> = r.registrants.iter().filter(|(n, _)| n != node).map(|(_, k)| *k).collect();
                    for k in others {
                        r.unregister_key(k, node, abort, Instant::now());
                    }
                } else if !r.unregister_key(prkey, node, abort, Instant::now()) {
                    return Err(conflict(format!("no registrant of {volume} has key {prkey} (holder {h})")));
                }
            }
            (_, Some((h, _))) if h == node => r.holder = Some((h, rtype)),
            (_, Some((h, _))) if r.key_of(&h) == Some(prkey) => {
                r.holder = Some((node.to_string(), rtype));
                r.unregister_key(prkey, node, abort, Instant::now());
            }
            (_, Some((h, _))) if prkey != 0 => {
                if !r.unregister_key(prkey, node, abort, Instant::now()) {
                    return Err(conflict(format!("no registrant of {volume} has key {prkey} (holder {h})")));
                }
            }
            (_, Some(_)) => return Err(ReservationError::Refused("preempt with key 0".into())),
        }
        if action != AcquireAction::Acquire {
            r.generation = r.generation.wrapping_add(1);
        }
        if r.holder.as_ref().is_some_and(|(h, _)| h == node) {
            Self::fire(&mut ebs, "fence", volume, node);
        }
        Ok(())
    }

    /// NVMe Reservation Release by `node` on `volume` (see
    /// `ReservationDevice::release`).
    pub async fn nvme_release(
        &self,
        volume: &str,
        node: &str,
        action: ReleaseAction,
        rtype: ReservationType,
        crkey: u64,
    ) -> Result<(), ReservationError> {
        self.command_wait(volume, node).await;
        let mut ebs = self.lock();
        let v = Self::attached_volume(&mut ebs, volume, node).map_err(|e| ReservationError::Io(e.to_string()))?;
        let r = &mut v.resv;
        if r.key_of(node) != Some(crkey) {
            return Err(conflict(format!("{node} is not registered on {volume} with key {crkey}")));
        }
        match action {
            ReleaseAction::Release => match r.holder.clone() {
                Some((h, t)) if h == node || t.all_registrants() => {
                    if t != rtype {
                        return Err(conflict(format!("{volume}'s reservation is of type {t:?}, not {rtype:?}")));
                    }
                    r.holder = None;
                }
                _ => {}
            },
            ReleaseAction::Clear => {
                r.holder = None;
                r.registrants.clear();
                r.generation = r.generation.wrapping_add(1);
            }
        }
        Ok(())
    }

    /// NVMe Reservation Report by `node` on `volume` (extended data structure).
    pub async fn nvme_report(&self, volume: &str, node: &str) -> Result<ReservationStatus, ReservationError> {
        self.command_wait(volume, node).await;
        let mut ebs = self.lock();
        let v = Self::attached_volume(&mut ebs, volume, node).map_err(|e| ReservationError::Io(e.to_string()))?;
        let r = &v.resv;
        let rtype = r.holder.as_ref().map(|(_, t)| *t);
        let registrants = r
            .registrants
            .iter()
            .map(|(n, key)| Registrant {
                host_id: host_id(n),
                key: *key,
                holds: r.holder.as_ref().is_some_and(|(h, t)| h == n || t.all_registrants()),
            })
            .collect();
        Ok(ReservationStatus { generation: r.generation, rtype, registrants })
    }

    /// Resolves when `moment` next happens (for a fault that strikes then,
    /// `Scheduled::when`), with the node whose moment it is: a node takes
    /// the volume's fence (`reserve`), a sync starts on it, or a shard file
    /// is created on it.
    pub fn wait_for(&self, moment: &attache_faults::Moment) -> tokio::sync::oneshot::Receiver<String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let kind = match moment {
            attache_faults::Moment::Fence(_) => "fence",
            attache_faults::Moment::Sync(_) => "sync",
            attache_faults::Moment::Create(_) => "create",
        };
        let mut ebs = self.lock();
        // Waits that timed out left their senders behind.
        ebs.waiters.retain(|(_, _, tx)| !tx.is_closed());
        ebs.waiters.push((kind, moment.volume().to_string(), tx));
        rx
    }

    /// Wakes the waiters for `kind` on `volume`: `node`'s moment.
    fn fire(ebs: &mut Ebs, kind: &str, volume: &str, node: &str) {
        let (now, later): (Vec<_>, Vec<_>) = ebs.waiters.drain(..).partition(|(k, v, _)| *k == kind && v == volume);
        ebs.waiters = later;
        for (_, _, tx) in now {
            let _ = tx.send(node.to_string());
        }
    }

    /// The nodes `volume` is attached to, in the order they attached.
    pub fn attached(&self, volume: &str) -> Vec<String> {
        self.lock().volumes.get(volume).map(|v| v.attached.clone()).unwrap_or_default()
    }

    /// The holder of `volume`'s fence and its key (epoch): the reservation
    /// holder, or under the EPOCH file the node that raised it last.
    pub fn holder(&self, volume: &str) -> Option<(String, u64)> {
        let ebs = self.lock();
        let v = ebs.volumes.get(volume)?;
        match ebs.cfg.fence {
            FenceModel::Reservation => {
                let (h, _) = v.resv.holder.as_ref()?;
                Some((h.clone(), v.resv.key_of(h).unwrap_or(0)))
            }
            FenceModel::EpochFile => v.epoch_file.clone(),
        }
    }

    /// Checks that `node` may write `volume` now, counting a fenced write.
    fn check_write(ebs: &mut Ebs, volume: &str, node: &str) -> Result<(), EngineError> {
        Self::check_write_issued(ebs, volume, node, None)
    }

    /// As `check_write`, for a command issued at `issued`: one in flight
    /// before a preempt without abort removed `node`'s registration still
    /// completes.
    fn check_write_issued(ebs: &mut Ebs, volume: &str, node: &str, issued: Option<Instant>) -> Result<(), EngineError> {
        let before_preempt = |v: &Volume| {
            let at = v.resv.preempted.get(node);
            issued.zip(at).is_some_and(|(issued, at)| issued < *at)
        };
        if ebs.volumes.get(volume).is_some_and(before_preempt) {
            return Ok(());
        }
        let checked = Self::may_write(ebs, volume, node);
        if matches!(checked, Err(EngineError::Fenced(_))) {
            ebs.counts.fenced_writes += 1;
        }
        checked
    }

    fn may_write(ebs: &Ebs, volume: &str, node: &str) -> Result<(), EngineError> {
        let v = ebs.volumes.get(volume).ok_or_else(|| io(format!("no volume {volume}")))?;
        if !v.attached.iter().any(|n| n == node) {
            return Err(io(format!("volume {volume} is not attached to {node}")));
        }
        match Self::fenced_by(&ebs.cfg, v, node) {
            Some((holder, key)) => Err(EngineError::Fenced(format!(
                "volume {volume}: reservation conflict: reserved by {holder} (key {key}); {node}'s write is rejected"
            ))),
            None => Ok(()),
        }
    }

    /// The reservation (holder, key) that fences `node` off `v`, when
    /// fencing by reservation is on and its type refuses `node`'s writes.
    /// (The EPOCH file fences nothing at the device: see
    /// [`SimEbs::hold_epoch_file`].)
    fn fenced_by(cfg: &EbsConfig, v: &Volume, node: &str) -> Option<(String, u64)> {
        let device_fence = cfg.fencing && cfg.fence == FenceModel::Reservation;
        device_fence.then(|| v.resv.conflict(node)).flatten()
    }

    /// The EPOCH-file fence an engine opened at `epoch` holds for each write
    /// batch, as `Fence::hold` in `attache-runtime`: the fence lock, shared
    /// (with `fence_lock` on), then the check that the volume's epoch file
    /// names `epoch`. Keep the answer until the batch's sync returns.
    /// `Ok(None)` under the reservation model or with fencing off.
    /// Errors: `Fenced` when the file names another epoch (or none).
    pub fn hold_epoch_file(&self, volume: &str, epoch: u64) -> Result<Option<EpochFileHold>, EngineError> {
        let mut ebs = self.lock();
        if !(ebs.cfg.fencing && ebs.cfg.fence == FenceModel::EpochFile) {
            return Ok(None);
        }
        let fence_lock = ebs.cfg.fence_lock;
        let v = ebs.volumes.get_mut(volume).ok_or_else(|| io(format!("no volume {volume}")))?;
        let file = v.epoch_file.as_ref().map(|(_, e)| *e);
        if file != Some(epoch) {
            ebs.counts.fenced_writes += 1;
            return Err(EngineError::Fenced(match file {
                Some(e) => format!("volume {volume} epoch is {e}, this writer's is {epoch}"),
                None => format!("volume {volume} has no epoch file; this writer's epoch is {epoch}"),
            }));
        }
        if !fence_lock {
            return Ok(None);
        }
        v.fence_holds += 1;
        Ok(Some(EpochFileHold { ebs: self.clone(), volume: volume.to_string() }))
    }

    /// Whether write batches hold `volume`'s EPOCH-file fence lock now, so
    /// that raising its epoch must wait (`reserve` refuses meanwhile).
    pub fn fence_busy(&self, volume: &str) -> bool {
        self.lock().volumes.get(volume).is_some_and(|v| v.fence_holds > 0)
    }

    /// The scope of a write in directory `dir` under the fence model (see
    /// `SyncRecord::scope`).
    fn scope(cfg: &EbsConfig, volume: &str, dir: &str) -> String {
        match cfg.fence {
            FenceModel::Reservation => volume.to_string(),
            FenceModel::EpochFile => format!("{volume}/{}", dir.trim_end_matches('/')),
        }
    }

    /// Waits as long as an operation of `base` µs (plus up to `jitter` µs)
    /// by `node` on `volume` takes, stalls included; forever when the node's
    /// I/O on the volume hangs.
    async fn io_wait(&self, volume: &str, node: &str, base: u64, jitter: u64) {
        let latency = {
            let mut ebs = self.lock();
            let extra = if jitter > 0 { ebs.rng.random_range(0..=jitter) } else { 0 };
            let now = Instant::now();
            let v = ebs.volumes.get(volume);
            if v.is_some_and(|v| v.hung.contains(node)) {
                None
            } else {
                let stall =
                    v.and_then(|v| v.stalls.get(node)).filter(|(until, _)| *until > now).map_or(0, |(_, us)| *us);
                Some(Duration::from_micros(base + extra + stall))
            }
        };
        // (No sleep at all for no latency: a timer rounds up to its tick.)
        if let Some(d) = latency.filter(|d| !d.is_zero()) {
            tokio::time::sleep(d).await;
        }
        let hung = self.lock().volumes.get(volume).is_some_and(|v| v.hung.contains(node));
        if hung {
            std::future::pending::<()>().await;
        }
    }

    /// From now on no I/O of `node` on `volume` completes (started ones included).
    pub fn hang(&self, volume: &str, node: &str) {
        if let Some(v) = self.lock().volumes.get_mut(volume) {
            v.hung.insert(node.to_string());
        }
    }

    /// Makes `node`'s I/O on `volume` take `extra` more until `for_`.
    pub fn stall(&self, volume: &str, node: &str, extra: Duration, for_: Duration) {
        let mut ebs = self.lock();
        if let Some(v) = ebs.volumes.get_mut(volume) {
            v.stalls.insert(node.to_string(), (Instant::now() + for_, extra.as_micros() as u64));
        }
    }

    /// Appends `bytes` to `path` on `volume` as `node` (unsynced: into its
    /// page cache, so a reservation does not refuse it; the sync does).
    /// Errors: not attached, and `NoSpace` (`ENOSPC`, nothing written)
    /// while the volume is full.
    /// `epoch` is the writer's, for the record of a background writeback.
    pub async fn append(
        &self,
        volume: &str,
        node: &str,
        path: &str,
        bytes: &[u8],
        epoch: u64,
    ) -> Result<(), EngineError> {
        let cfg_us = self.lock().cfg.append_us;
        self.io_wait(volume, node, cfg_us, 0).await;
        let mut ebs = self.lock();
        Self::writeback(&mut ebs, volume);
        // The page cache takes it: only a sync (or writeback) reaches the
        // device, where a reservation can refuse it.
        Self::attached_volume(&mut ebs, volume, node)?;
        Self::check_space(&mut ebs, volume, bytes.len())?;
        // (No draw with writeback off, so such runs draw as before.)
        let wb = ebs.cfg.writeback_ms;
        let due = (wb > 0).then(|| Instant::now() + Duration::from_millis(ebs.rng.random_range(1..=wb)));
        let v = ebs.volumes.get_mut(volume).expect("checked");
        let pending = Pending { node: node.to_string(), data: bytes.to_vec(), due, epoch };
        v.files.entry(path.to_string()).or_default().pending.push(pending);
        Ok(())
    }

    /// Background writeback (`EbsConfig::writeback_ms`): on every file of
    /// `volume`, each node's unsynced appends that are due reach the device,
    /// in order, up to the first that is not due; recorded as durable writes
    /// at their writer's epoch. The device refuses them from a node a
    /// reservation fences off (the data is then lost, as the sync that
    /// follows fails anyway). Runs at every read, append, sync and
    /// reservation on the volume (before it), so it depends only on
    /// simulated time and the order of operations.
    fn writeback(ebs: &mut Ebs, volume: &str) {
        if ebs.cfg.writeback_ms == 0 {
            return;
        }
        let now = Instant::now();
        let at_ms = ebs.start.elapsed().as_millis() as u64;
        let cfg = ebs.cfg.clone();
        let Ebs { volumes, syncs, counts, .. } = &mut *ebs;
        let Some(v) = volumes.get_mut(volume) else { return };
        let fenced: Vec<String> =
            v.attached.iter().filter(|n| Self::fenced_by(&cfg, v, n).is_some()).cloned().collect();
        for (path, f) in v.files.iter_mut() {
            let mut blocked: Vec<String> = Vec::new();
            let mut kept = Vec::new();
            for p in f.pending.drain(..) {
                let due = p.due.is_some_and(|d| d <= now) && !blocked.contains(&p.node);
                if !due {
                    blocked.push(p.node.clone());
                    kept.push(p);
                } else if !fenced.contains(&p.node) {
                    let scope = Self::scope(&cfg, volume, dir_of(path));
                    let (node, epoch, bytes) = (p.node.clone(), p.epoch, p.data.len());
                    f.durable.extend_from_slice(&p.data);
                    counts.written_back += 1;
                    let volume = volume.to_string();
                    syncs.push(SyncRecord { at_ms, volume, node, epoch, bytes, scope, open: false });
                }
            }
            f.pending = kept;
        }
    }

    /// Makes `node`'s appends to `path` durable, recording the write at `epoch`.
    /// Errors: not attached (the appends were lost), `Fenced`; an injected
    /// disk error (`fail_syncs`), after which the appends are durable or
    /// lost, at random.
    pub async fn sync(&self, volume: &str, node: &str, path: &str, epoch: u64) -> Result<(), EngineError> {
        let (base, jitter) = {
            let mut ebs = self.lock();
            Self::fire(&mut ebs, "sync", volume, node);
            (ebs.cfg.sync_us, ebs.cfg.sync_jitter_us)
        };
        let issued = Instant::now();
        self.io_wait(volume, node, base, jitter).await;
        let mut ebs = self.lock();
        Self::writeback(&mut ebs, volume);
        let checked = Self::check_write_issued(&mut ebs, volume, node, Some(issued));
        let now = Instant::now();
        let failing = checked.is_ok()
            && ebs.volumes.get(volume).and_then(|v| v.failing_syncs.get(node)).is_some_and(|t| now < *t);
        // An injected fsync error: the flush reached the device (`Some(true)`) or not, at random.
        let injected = failing.then(|| ebs.rng.random_bool(0.5));
        let at_ms = ebs.start.elapsed().as_millis() as u64;
        let scope = Self::scope(&ebs.cfg, volume, dir_of(path));
        let Ebs { volumes, syncs, counts, .. } = &mut *ebs;
        let Some(v) = volumes.get_mut(volume) else { return checked };
        if checked.is_ok() && injected != Some(false) {
            let record = SyncRecord {
                at_ms,
                volume: volume.to_string(),
                node: node.to_string(),
                epoch,
                bytes: 0,
                scope,
                open: false,
            };
            Self::flush(v, syncs, path, record);
        } else if let Some(f) = v.files.get_mut(path) {
            // The device rejected (or lost) the writes: they never become durable.
            f.pending.retain(|p| p.node != node);
        }
        if let Some(durable) = injected {
            counts.failed_syncs += 1;
            counts.failed_syncs_durable += u64::from(durable);
            return Err(io(format!("volume {volume}: fsync of {path} by {node} failed (injected disk error)")));
        }
        checked
    }

    /// Makes the pending appends of `record.node` to `path` durable,
    /// recording the write (`record` with its byte count).
    fn flush(v: &mut Volume, syncs: &mut Vec<SyncRecord>, path: &str, record: SyncRecord) {
        let Some(f) = v.files.get_mut(path) else { return };
        let mut bytes = 0;
        let mut kept = Vec::new();
        for p in f.pending.drain(..) {
            if p.node == record.node {
                bytes += p.data.len();
                f.durable.extend_from_slice(&p.data);
            } else {
                kept.push(p);
            }
        }
        f.pending = kept;
        if bytes > 0 {
            syncs.push(SyncRecord { bytes, ..record });
        }
    }

    /// `ENOSPC` (counted) while `volume` is full, or when `len` more bytes
    /// would not fit in its capacity (a creation asks for 0: it fails only
    /// while full); else `Ok`.
    fn check_space(ebs: &mut Ebs, volume: &str, len: usize) -> Result<(), EngineError> {
        let capacity = ebs.cfg.capacity_of(volume);
        let full = ebs
            .volumes
            .get(volume)
            .is_some_and(|v| v.full_now() || v.used_bytes().saturating_add(len as u64) > capacity);
        if !full {
            return Ok(());
        }
        ebs.counts.full_writes += 1;
        Err(EngineError::NoSpace(format!("volume {volume}: No space left on device (os error 28)")))
    }

    /// What a read-write open of an engine on `volume` writes as `node`
    /// (RocksDB: a new MANIFEST, OPTIONS file and WAL, a few KiB): refused
    /// with `ENOSPC` (counted) while the volume is full, else nothing. The
    /// bytes are not modelled; only that such an open needs space.
    pub fn check_open_for_write(&self, volume: &str, node: &str) -> Result<(), EngineError> {
        let mut ebs = self.lock();
        Self::attached_volume(&mut ebs, volume, node)?;
        Self::check_space(&mut ebs, volume, 0)
    }

    /// The bytes free on `volume` as `node` sees them: its capacity less its
    /// files' bytes, 0 while it is full (`Fault::DiskFull`); `None` when
    /// the volume is not attached to `node`.
    pub fn free_bytes(&self, volume: &str, node: &str) -> Option<u64> {
        let ebs = self.lock();
        let v = ebs.volumes.get(volume).filter(|v| v.attached.iter().any(|n| n == node))?;
        if v.full_now() {
            return Some(0);
        }
        Some(ebs.cfg.capacity_of(volume).saturating_sub(v.used_bytes()))
    }

    /// `volume` has no free space for `for_` (see `Fault::DiskFull`).
    pub fn fill(&self, volume: &str, for_: Duration) {
        if let Some(v) = self.lock().volumes.get_mut(volume) {
            let until = Instant::now() + for_;
            v.full_until = Some(v.full_until.map_or(until, |t| t.max(until)));
        }
    }

    /// Every sync of `node` on `volume` fails for `for_` (see `Fault::DiskErrors`).
    pub fn fail_syncs(&self, volume: &str, node: &str, for_: Duration) {
        if let Some(v) = self.lock().volumes.get_mut(volume) {
            let until = Instant::now() + for_;
            let t = v.failing_syncs.entry(node.to_string()).or_insert(until);
            *t = (*t).max(until);
        }
    }

    /// Records a durable change of a file's metadata (create, truncate,
    /// remove) in directory `dir` by `node` at `epoch`, as a write of 0 bytes.
    fn record_change(ebs: &mut Ebs, volume: &str, node: &str, dir: &str, epoch: u64) {
        Self::record(ebs, volume, node, dir, epoch, false);
    }

    /// Records that `node` opened shard directory `dir` on `volume`
    /// read-write at `epoch` (see `SyncRecord::open`).
    pub fn record_open(&self, volume: &str, node: &str, dir: &str, epoch: u64) {
        Self::record(&mut self.lock(), volume, node, dir, epoch, true);
    }

    /// Records a change of 0 bytes, or an open, in `dir` (see `SyncRecord`).
    fn record(ebs: &mut Ebs, volume: &str, node: &str, dir: &str, epoch: u64, open: bool) {
        let at_ms = ebs.start.elapsed().as_millis() as u64;
        let scope = Self::scope(&ebs.cfg, volume, dir);
        let (volume, node) = (volume.to_string(), node.to_string());
        ebs.syncs.push(SyncRecord { at_ms, volume, node, epoch, bytes: 0, scope, open });
    }

    /// The fence model the volumes follow.
    pub fn fence_model(&self) -> FenceModel {
        self.lock().cfg.fence
    }

    /// Whether only the primary mounts a volume (`EbsConfig::block_mode`).
    pub fn block_mode(&self) -> bool {
        self.lock().cfg.block_mode
    }

    /// What `node` reads from `path`: the durable bytes, then its own pending
    /// appends. Errors: not attached. A missing file reads as `None`.
    pub async fn read(&self, volume: &str, node: &str, path: &str) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.read_from(volume, node, path, 0).await?.map(|(_, _, bytes)| bytes))
    }

    /// As [`SimEbs::read`], from offset `from` on when the file is that
    /// long, else from its start: `(start, length, bytes from start)`.
    /// What a reader that has the first `from` bytes needs, without copying
    /// them again.
    pub async fn read_from(
        &self,
        volume: &str,
        node: &str,
        path: &str,
        from: usize,
    ) -> Result<Option<(usize, usize, Vec<u8>)>, EngineError> {
        let base = self.lock().cfg.append_us;
        self.io_wait(volume, node, base, 0).await;
        let mut ebs = self.lock();
        Self::writeback(&mut ebs, volume);
        let v = ebs.volumes.get(volume).ok_or_else(|| io(format!("no volume {volume}")))?;
        if !v.attached.iter().any(|n| n == node) {
            return Err(io(format!("volume {volume} is not attached to {node}")));
        }
        Ok(v.files.get(path).map(|f| {
            let mine = f.pending.iter().filter(|p| p.node == node);
            let len = f.durable.len() + mine.clone().map(|p| p.data.len()).sum::<usize>();
            let start = if len >= from { from } else { 0 };
            let mut out = Vec::with_capacity(len - start);
            let mut at = 0;
            for part in std::iter::once(f.durable.as_slice()).chain(mine.map(|p| p.data.as_slice())) {
                let end = at + part.len();
                if end > start {
                    out.extend_from_slice(&part[start.saturating_sub(at)..]);
                }
                at = end;
            }
            (start, len, out)
        }))
    }

    /// Creates `path` empty if absent (durably, as a directory entry), as
    /// `node` holding the fence at `epoch`.
    pub fn create(&self, volume: &str, node: &str, path: &str, epoch: u64) -> Result<(), EngineError> {
        let mut ebs = self.lock();
        Self::check_write(&mut ebs, volume, node)?;
        Self::check_space(&mut ebs, volume, 0)?;
        ebs.volumes.get_mut(volume).expect("checked").files.entry(path.to_string()).or_default();
        Self::record_change(&mut ebs, volume, node, dir_of(path), epoch);
        Self::fire(&mut ebs, "create", volume, node);
        Ok(())
    }

    /// Cuts `path`'s durable bytes to `len` (dropping a torn tail) and its
    /// pending appends, as `node` holding the fence at `epoch`.
    pub fn truncate(&self, volume: &str, node: &str, path: &str, len: usize, epoch: u64) -> Result<(), EngineError> {
        let mut ebs = self.lock();
        Self::check_write(&mut ebs, volume, node)?;
        if let Some(f) = ebs.volumes.get_mut(volume).expect("checked").files.get_mut(path) {
            f.durable.truncate(len);
            f.pending.clear();
        }
        Self::record_change(&mut ebs, volume, node, dir_of(path), epoch);
        Ok(())
    }

    /// Whether `path` exists on `volume`.
    pub fn exists(&self, volume: &str, path: &str) -> bool {
        self.lock().volumes.get(volume).is_some_and(|v| v.files.contains_key(path))
    }

    /// Removes every file under `prefix` on `volume`, as `node` holding the
    /// fence at `epoch`.
    /// Errors: as a write; and, as RocksDB's `DestroyDB` takes the
    /// directory's `LOCK`, an I/O error while a read-write open holds it.
    pub fn remove_prefix(&self, volume: &str, node: &str, prefix: &str, epoch: u64) -> Result<(), EngineError> {
        let mut ebs = self.lock();
        Self::check_write(&mut ebs, volume, node)?;
        let dir = prefix.trim_end_matches('/');
        if let Some(e) = Self::lock_conflict(&mut ebs, volume, node, dir) {
            return Err(e);
        }
        ebs.volumes.get_mut(volume).expect("checked").files.retain(|p, _| !p.starts_with(prefix));
        Self::record_change(&mut ebs, volume, node, prefix, epoch);
        Ok(())
    }

    /// Takes the lock of shard directory `dir` on `volume` for `node` (a
    /// read-write open); answers the lock's token for [`SimEbs::unlock`].
    /// Errors: an I/O error naming the holder while anyone holds it (only
    /// `node` itself without shared locks).
    pub fn lock_dir(&self, volume: &str, node: &str, dir: &str) -> Result<u64, EngineError> {
        let mut ebs = self.lock();
        ebs.lock_tokens += 1;
        let token = ebs.lock_tokens;
        if !ebs.volumes.contains_key(volume) {
            return Err(io(format!("no volume {volume}")));
        }
        if let Some(e) = Self::lock_conflict(&mut ebs, volume, node, dir) {
            return Err(e);
        }
        let v = ebs.volumes.get_mut(volume).expect("checked");
        v.locks.entry(dir.to_string()).or_default().push((node.to_string(), token));
        Ok(token)
    }

    /// The error `node` gets taking the lock of `dir` on `volume` while
    /// another open holds it (any process with shared locks; without them,
    /// on separate machines, only its own), counted as a lock conflict.
    fn lock_conflict(ebs: &mut Ebs, volume: &str, node: &str, dir: &str) -> Option<EngineError> {
        let shared = ebs.cfg.shard_locks;
        let v = ebs.volumes.get(volume)?;
        let (holder, _) = v.locks.get(dir).into_iter().flatten().find(|(holder, _)| shared || holder == node)?;
        let e = io(format!("while lock file {volume}/{dir}/LOCK: held by {holder} (resource temporarily unavailable)"));
        ebs.counts.lock_conflicts += 1;
        Some(e)
    }

    /// Releases the lock of `dir` on `volume` if `token` still holds it.
    pub fn unlock(&self, volume: &str, dir: &str, token: u64) {
        if let Some(v) = self.lock().volumes.get_mut(volume) {
            if let Some(holders) = v.locks.get_mut(dir) {
                holders.retain(|(_, t)| *t != token);
            }
        }
    }

    /// `node`'s process ended: the locks it held are released.
    pub fn release_locks(&self, node: &str) {
        for v in self.lock().volumes.values_mut() {
            for holders in v.locks.values_mut() {
                holders.retain(|(holder, _)| holder != node);
            }
        }
    }

    /// What the volumes went through so far.
    pub fn counts(&self) -> VolumeCounts {
        self.lock().counts.clone()
    }

    /// `node` crashed (its machine: the page cache is lost): its pending
    /// appends are lost, except that with torn writes on, a random prefix of
    /// a file's last pending append may survive where the node was not
    /// fenced off; its locks are released. (A process restart without a
    /// crash keeps the node's pending appends, as the OS keeps the page
    /// cache of a process that exits: the next incarnation reads them and
    /// its syncs make them durable.)
    pub fn crash(&self, node: &str) {
        self.release_locks(node);
        let mut ebs = self.lock();
        let (torn, garbage, cfg) = (ebs.cfg.torn_writes, ebs.cfg.garbage_tails, ebs.cfg.clone());
        let Ebs { volumes, rng, counts, .. } = &mut *ebs;
        for v in volumes.values_mut() {
            // A torn prefix reaches the device only if the device would take
            // the node's writes: not from a node fenced off by a reservation.
            let fenced_off = Self::fenced_by(&cfg, v, node).is_some();
            for f in v.files.values_mut() {
                let last = f.pending.iter().rposition(|p| p.node == node);
                if let (true, false, Some(i)) = (torn, fenced_off, last) {
                    let data = &f.pending[i].data;
                    if rng.random_bool(0.5) && !data.is_empty() {
                        let cut = rng.random_range(0..data.len());
                        let tail = torn_tail(rng, data, cut, garbage);
                        counts.torn_tails += u64::from(!tail.is_empty());
                        f.durable.extend_from_slice(&tail);
                    }
                }
                f.pending.retain(|p| p.node != node);
            }
        }
    }

    /// Every durable write so far, in time order.
    pub fn syncs(&self) -> Vec<SyncRecord> {
        self.lock().syncs.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes the fence as a node's provider does: the shipped reservation
    /// protocol, or raising the EPOCH file.
    async fn reserve(e: &SimEbs, node: &str, key: u64) -> Result<(), EngineError> {
        match e.fence_model() {
            FenceModel::Reservation => attache_actors::reservation::take_fence(&e.nvme(node), "v", key).await,
            FenceModel::EpochFile => e.raise_epoch_file("v", node, key),
        }
    }

    fn ebs(fencing: bool) -> SimEbs {
        let e = SimEbs::new(&["v".into()], EbsConfig { fencing, torn_writes: false, ..EbsConfig::default() }, 1);
        e.attach("v", "a").unwrap();
        e.attach("v", "b").unwrap();
        e
    }

    #[tokio::test]
    async fn unsynced_appends_are_lost_on_crash_and_detach() {
        let e = ebs(true);
        e.append("v", "a", "f", b"one", 1).await.unwrap();
        e.sync("v", "a", "f", 1).await.unwrap();
        e.append("v", "a", "f", b"two", 1).await.unwrap();
        assert_eq!(e.read("v", "a", "f").await.unwrap().unwrap(), b"onetwo", "a node reads its own pending append");
        assert_eq!(e.read("v", "b", "f").await.unwrap().unwrap(), b"one", "others read durable bytes only");
        e.crash("a");
        assert_eq!(e.read("v", "a", "f").await.unwrap().unwrap(), b"one");
        e.append("v", "a", "f", b"three", 1).await.unwrap();
        e.detach("v", "a");
        assert!(e.sync("v", "a", "f", 1).await.is_err(), "a detached node cannot sync");
        assert_eq!(e.read("v", "b", "f").await.unwrap().unwrap(), b"one");
        assert_eq!(e.syncs().len(), 1);
    }

    #[tokio::test]
    async fn a_preempted_holder_cannot_write() {
        let e = ebs(true);
        reserve(&e, "a", 1).await.unwrap();
        e.append("v", "a", "f", b"x", 1).await.unwrap();
        reserve(&e, "b", 2).await.unwrap();
        assert!(matches!(e.sync("v", "a", "f", 1).await, Err(EngineError::Fenced(_))));
        assert_eq!(e.read("v", "a", "f").await.unwrap().unwrap(), b"", "a rejected append is gone");
        e.append("v", "a", "f", b"y", 1).await.expect("the page cache takes it");
        assert!(matches!(e.sync("v", "a", "f", 1).await, Err(EngineError::Fenced(_))), "the device does not");
        assert!(matches!(reserve(&e, "a", 1).await, Err(EngineError::Fenced(_))), "a stale key cannot preempt");
        e.append("v", "b", "f", b"z", 1).await.unwrap();
        e.sync("v", "b", "f", 2).await.unwrap();
        // Without fencing, the old holder's write lands.
        let off = ebs(false);
        reserve(&off, "b", 2).await.unwrap();
        off.append("v", "a", "f", b"late", 1).await.unwrap();
        off.sync("v", "a", "f", 1).await.unwrap();
        assert_eq!(off.syncs()[0].epoch, 1);
    }

    /// The EPOCH file is checked by the writer, not the device: the
    /// writer's hold (`hold_epoch_file`) refuses an old epoch, and while a
    /// batch holds the fence a newer epoch cannot be taken, so the batch
    /// checked before lands before the epoch moves on; its record is scoped
    /// to the shard directory. Without the fence lock the newer epoch is
    /// taken at once and the old batch lands after it (the gap).
    #[tokio::test]
    async fn the_epoch_file_is_checked_by_the_writer_under_the_fence_lock() {
        for fence_lock in [true, false] {
            let cfg =
                EbsConfig { fence: FenceModel::EpochFile, torn_writes: false, fence_lock, ..EbsConfig::default() };
            let e = SimEbs::new(&["v".into()], cfg, 1);
            e.attach("v", "a").unwrap();
            e.attach("v", "b").unwrap();
            reserve(&e, "a", 1).await.unwrap();
            let hold = e.hold_epoch_file("v", 1).unwrap();
            assert_eq!(hold.is_some(), fence_lock);
            e.append("v", "a", "s1/log", b"x", 1).await.unwrap();
            assert_eq!(e.fence_busy("v"), fence_lock);
            assert_eq!(reserve(&e, "b", 2).await.is_err(), fence_lock, "epoch 2 waits for the batch");
            e.sync("v", "a", "s1/log", 1).await.unwrap();
            drop(hold);
            let synced_at = e.syncs().last().unwrap().at_ms;
            if fence_lock {
                assert!(!e.fence_busy("v"));
                reserve(&e, "b", 2).await.unwrap();
            }
            assert!(matches!(e.hold_epoch_file("v", 1), Err(EngineError::Fenced(_))), "a new batch is refused");
            assert!(matches!(reserve(&e, "a", 1).await, Err(EngineError::Fenced(_))), "the file's epoch only rises");
            assert_eq!(e.read("v", "b", "s1/log").await.unwrap().unwrap(), b"x");
            let last = e.syncs().pop().unwrap();
            assert_eq!((last.epoch, last.scope.as_str(), last.at_ms), (1, "v/s1", synced_at));
            assert_eq!(e.counts().fenced_writes, 1);
        }
    }

    /// Background writeback: an unsynced append reaches the device once
    /// due, where other nodes read it and a crash keeps it; not from a node
    /// a newer reservation fenced off.
    #[tokio::test]
    async fn writeback_puts_unsynced_appends_on_the_device() {
        // Commands take no time, so the preempt below lands before any
        // writeback is due (at least 1 ms after its append).
        let cfg =
            EbsConfig { writeback_ms: 10, torn_writes: false, append_us: 0, sync_jitter_us: 0, ..EbsConfig::default() };
        let e = SimEbs::new(&["v".into()], cfg, 1);
        e.attach("v", "a").unwrap();
        e.attach("v", "b").unwrap();
        reserve(&e, "a", 1).await.unwrap();
        e.append("v", "a", "f", b"one", 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(11)).await;
        assert_eq!(e.read("v", "b", "f").await.unwrap().unwrap(), b"one", "written back, so b reads it");
        e.crash("a");
        assert_eq!(e.read("v", "b", "f").await.unwrap().unwrap(), b"one", "and a crash keeps it");
        assert_eq!((e.counts().written_back, e.syncs().last().unwrap().epoch), (1, 1));
        e.append("v", "a", "f", b"two", 1).await.unwrap();
        reserve(&e, "b", 2).await.unwrap();
        tokio::time::sleep(Duration::from_millis(11)).await;
        assert_eq!(e.read("v", "b", "f").await.unwrap().unwrap(), b"one", "refused from a fenced-off node");
    }

    /// A crash leaves a torn prefix only of a node the device takes writes
    /// from: not of one fenced off by a newer reservation.
    #[tokio::test]
    async fn a_fenced_off_node_leaves_no_torn_tail() {
        for (fenced_off, fencing) in [(true, true), (false, true), (true, false)] {
            let (mut bytes, mut torn) = (0, 0);
            // Each seed: one pending append, then a crash; about half leave a prefix.
            for seed in 0..40 {
                let e = SimEbs::new(&["v".into()], EbsConfig { fencing, ..EbsConfig::default() }, seed);
                e.attach("v", "a").unwrap();
                e.attach("v", "b").unwrap();
                reserve(&e, "a", 1).await.unwrap();
                e.append("v", "a", "f", &[7; 64], 1).await.unwrap();
                if fenced_off {
                    reserve(&e, "b", 2).await.unwrap();
                }
                e.crash("a");
                bytes += e.read("v", "b", "f").await.unwrap().unwrap_or_default().len();
                torn += e.counts().torn_tails;
            }
            if fenced_off && fencing {
                assert!(bytes == 0 && torn == 0, "fenced off: {bytes} bytes, {torn} torn tails");
            } else {
                assert!(bytes > 0 && torn > 0, "fenced off {fenced_off}, fencing {fencing}: no torn prefix");
            }
        }
    }

    #[test]
    fn at_most_sixteen_attachments() {
        let e = SimEbs::new(&["v".into()], EbsConfig::default(), 1);
        for i in 0..MAX_ATTACHMENTS {
            e.attach("v", &format!("n{i}")).unwrap();
        }
        assert!(e.attach("v", "one-too-many").is_err());
        e.attach("v", "n0").unwrap();
    }

    /// The NVMe rules the simulated device keeps (NVM Express Base
    /// Specification, Reservation Register / Acquire / Release / Report).
    #[tokio::test]
    async fn reservation_commands_follow_the_specification() {
        use AcquireAction::*;
        let e = ebs(true);
        let we = ReservationType::WriteExclusive;
        let conflict = |r: Result<(), ReservationError>| matches!(r, Err(ReservationError::Conflict(_)));
        // Register: idempotent with the same key, a conflict with another.
        e.nvme_register("v", "a", RegisterAction::Register, 0, 5, false).await.unwrap();
        e.nvme_register("v", "a", RegisterAction::Register, 0, 5, false).await.unwrap();
        assert!(conflict(e.nvme_register("v", "a", RegisterAction::Register, 0, 6, false).await));
        // Replace needs a registration and (without IEKEY) the current key.
        assert!(conflict(e.nvme_register("v", "b", RegisterAction::Replace, 0, 7, false).await));
        assert!(conflict(e.nvme_register("v", "a", RegisterAction::Replace, 4, 6, false).await));
        e.nvme_register("v", "a", RegisterAction::Replace, 9, 6, true).await.unwrap();
        // Acquire needs the issuer's current key.
        assert!(conflict(e.nvme_acquire("v", "a", Acquire, we, 5, 0).await));
        e.nvme_acquire("v", "a", Acquire, we, 6, 0).await.unwrap();
        e.nvme_acquire("v", "a", Acquire, we, 6, 0).await.unwrap();
        e.nvme_register("v", "b", RegisterAction::Register, 0, 7, false).await.unwrap();
        assert!(conflict(e.nvme_acquire("v", "b", Acquire, we, 7, 0).await), "a held reservation");
        // A registrant that does not hold a Write Exclusive one cannot write.
        e.append("v", "b", "f", b"x", 7).await.unwrap();
        e.sync("v", "b", "f", 7).await.unwrap_err();
        assert!(conflict(e.nvme_acquire("v", "b", Preempt, we, 7, 99).await), "no registrant has key 99");
        let report = e.nvme_report("v", "b").await.unwrap();
        assert_eq!(report.rtype, Some(we));
        assert_eq!(report.holder().map(|h| (h.host_id, h.key)), Some((host_id("a"), 6)));
        assert_eq!(report.registrants.len(), 2);
        let generation = report.generation;
        // Preempt names the holder's key: b holds, a is unregistered.
        e.nvme_acquire("v", "b", PreemptAndAbort, we, 7, 6).await.unwrap();
        let report = e.nvme_report("v", "a").await.unwrap();
        assert_eq!(report.holder().map(|h| h.key), Some(7));
        assert_eq!(report.registrant(6), None);
        assert!(report.generation > generation);
        assert!(conflict(e.nvme_release("v", "a", ReleaseAction::Release, we, 6).await), "a has no key");
        // Release by the holder frees it; Clear drops every registration.
        e.nvme_release("v", "b", ReleaseAction::Release, we, 7).await.unwrap();
        assert_eq!(e.nvme_report("v", "a").await.unwrap().rtype, None);
        e.nvme_release("v", "b", ReleaseAction::Clear, we, 7).await.unwrap();
        assert!(e.nvme_report("v", "a").await.unwrap().registrants.is_empty());
    }

    /// Preempt and Abort fails the preempted host's commands in flight; a
    /// plain Preempt lets those already issued complete (which is why the
    /// protocol aborts).
    #[tokio::test]
    async fn preempt_and_abort_fails_a_sync_in_flight_and_preempt_does_not() {
        for abort in [true, false] {
            let e = ebs(true);
            let we = ReservationType::WriteExclusive;
            reserve(&e, "a", 1).await.unwrap();
            e.append("v", "a", "f", b"x", 1).await.unwrap();
            // The sync takes 50 ms more, so it is in flight at the preempt.
            e.stall("v", "a", Duration::from_millis(50), Duration::from_secs(1));
            let sync = {
                let e = e.clone();
                tokio::spawn(async move { e.sync("v", "a", "f", 1).await })
            };
            tokio::task::yield_now().await;
            e.nvme_register("v", "b", RegisterAction::Register, 0, 2, false).await.unwrap();
            let action = if abort { AcquireAction::PreemptAndAbort } else { AcquireAction::Preempt };
            e.nvme_acquire("v", "b", action, we, 2, 1).await.unwrap();
            let synced = sync.await.unwrap();
            assert_eq!(synced.is_err(), abort, "abort {abort}: {synced:?}");
            e.append("v", "a", "f", b"y", 1).await.unwrap();
            assert!(e.sync("v", "a", "f", 1).await.is_err(), "a new write is refused either way");
        }
    }

    /// Claimants racing through the shipped protocol: the highest epoch
    /// ends up holding, whatever the interleaving of their commands, and a
    /// lower one either fails or is preempted.
    #[tokio::test]
    async fn racing_claimants_leave_the_highest_epoch_holding() {
        for order in 0..3u64 {
            let e = SimEbs::new(&["v".into()], EbsConfig { torn_writes: false, ..EbsConfig::default() }, order);
            for n in ["a", "b", "c"] {
                e.attach("v", n).unwrap();
            }
            reserve(&e, "a", 1).await.unwrap();
            let claim = |node: &'static str, key: u64| {
                let e = e.clone();
                tokio::spawn(async move { reserve(&e, node, key).await })
            };
            let (b, c) = (claim("b", 2), claim("c", 3));
            let (b, c) = (b.await.unwrap(), c.await.unwrap());
            c.unwrap();
            assert!(matches!(b, Ok(()) | Err(EngineError::Fenced(_)) | Err(EngineError::Io(_))), "{b:?}");
            assert_eq!(e.holder("v"), Some(("c".to_string(), 3)));
            for (node, key) in [("b", 2), ("a", 1)] {
                e.append("v", node, "f", b"x", key).await.unwrap();
                assert!(e.sync("v", node, "f", key).await.is_err(), "{node} is fenced off");
            }
            e.append("v", "c", "f", b"x", 3).await.unwrap();
            e.sync("v", "c", "f", 3).await.unwrap();
            assert!(matches!(reserve(&e, "a", 2).await, Err(EngineError::Fenced(_))), "a stale claim");
        }
    }
}
