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
//!   writes, and each engine checks the file before a write batch, with the
//!   gap between its check and its write). Keys are epochs. A sim-only
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

use attache_actors::engine::EngineError;
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
    /// Whether the nodes share shard locks (RocksDB's `LOCK` files), as
    /// processes on one machine serving local directories do; off, as
    /// separate machines on a multi-attached volume, where a node's lock
    /// holds only against itself (RocksDB refuses a second open in one
    /// process).
    pub shard_locks: bool,
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
            shard_locks: true,
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
    /// `e`, then writes, and nothing stops a write whose check passed before
    /// a newer epoch was taken. RocksDB's `LOCK` (`shard_locks`) is what
    /// keeps one writer per shard then, so the single-writer rule holds per
    /// shard directory, not per volume.
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
    holder: Option<(String, u64)>,
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

    /// Registers `node` with `key` and preempts the holder if its key is lower.
    /// Errors: not attached; `Fenced` when the holder's key is higher.
    pub fn reserve(&self, volume: &str, node: &str, key: u64) -> Result<(), EngineError> {
        let mut ebs = self.lock();
        // What was due reached the device before the reservation changed.
        Self::writeback(&mut ebs, volume);
        let v = ebs.volumes.get_mut(volume).ok_or_else(|| io(format!("no volume {volume}")))?;
        if !v.attached.iter().any(|n| n == node) {
            return Err(io(format!("volume {volume} is not attached to {node}")));
        }
        match &v.holder {
            Some((holder, k)) if *k > key => {
                Err(EngineError::Fenced(format!("volume {volume} is reserved by {holder} at epoch {k} > {key}")))
            }
            _ => {
                v.holder = Some((node.to_string(), key));
                Self::fire(&mut ebs, "fence", volume, node);
                Ok(())
            }
        }
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

    /// The reservation holder of `volume` and its key.
    pub fn holder(&self, volume: &str) -> Option<(String, u64)> {
        self.lock().volumes.get(volume).and_then(|v| v.holder.clone())
    }

    /// Checks that `node` may write `volume`, counting a fenced write.
    fn check_write(ebs: &mut Ebs, volume: &str, node: &str) -> Result<(), EngineError> {
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
                "volume {volume} is reserved by {holder} (epoch {key}); {node}'s write is rejected"
            ))),
            None => Ok(()),
        }
    }

    /// The reservation (holder, key) that fences `node` off `v`, when
    /// fencing by reservation is on and another node holds it. (The EPOCH
    /// file fences nothing at the device: see [`SimEbs::check_epoch_file`].)
    fn fenced_by<'a>(cfg: &EbsConfig, v: &'a Volume, node: &str) -> Option<&'a (String, u64)> {
        let device_fence = cfg.fencing && cfg.fence == FenceModel::Reservation;
        v.holder.as_ref().filter(|(holder, _)| device_fence && holder != node)
    }

    /// The EPOCH-file check an engine opened at `epoch` makes before each
    /// write batch, as `Fence::check` in `attache-runtime`: `Fenced` when
    /// the volume's epoch file names another epoch (or none). Always `Ok`
    /// under the reservation model or with fencing off.
    pub fn check_epoch_file(&self, volume: &str, epoch: u64) -> Result<(), EngineError> {
        let mut ebs = self.lock();
        if !(ebs.cfg.fencing && ebs.cfg.fence == FenceModel::EpochFile) {
            return Ok(());
        }
        let file = ebs.volumes.get(volume).and_then(|v| v.holder.as_ref()).map(|(_, e)| *e);
        if file == Some(epoch) {
            return Ok(());
        }
        ebs.counts.fenced_writes += 1;
        Err(EngineError::Fenced(match file {
            Some(e) => format!("volume {volume} epoch is {e}, this writer's is {epoch}"),
            None => format!("volume {volume} has no epoch file; this writer's epoch is {epoch}"),
        }))
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
        if let Some(d) = latency {
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

    /// Appends `bytes` to `path` on `volume` as `node` (unsynced).
    /// Errors: not attached, `Fenced`, and an I/O error (`ENOSPC`, nothing
    /// written) while the volume is full.
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
        Self::check_write(&mut ebs, volume, node)?;
        Self::check_space(&mut ebs, volume)?;
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
        self.io_wait(volume, node, base, jitter).await;
        let mut ebs = self.lock();
        Self::writeback(&mut ebs, volume);
        let checked = Self::check_write(&mut ebs, volume, node);
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

    /// `ENOSPC` while `volume` is full (counted), else `Ok`.
    fn check_space(ebs: &mut Ebs, volume: &str) -> Result<(), EngineError> {
        let full = ebs.volumes.get(volume).and_then(|v| v.full_until).is_some_and(|t| Instant::now() < t);
        if !full {
            return Ok(());
        }
        ebs.counts.full_writes += 1;
        Err(io(format!("volume {volume}: No space left on device (os error 28)")))
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

    /// What `node` reads from `path`: the durable bytes, then its own pending
    /// appends. Errors: not attached. A missing file reads as `None`.
    pub async fn read(&self, volume: &str, node: &str, path: &str) -> Result<Option<Vec<u8>>, EngineError> {
        let base = self.lock().cfg.append_us;
        self.io_wait(volume, node, base, 0).await;
        let mut ebs = self.lock();
        Self::writeback(&mut ebs, volume);
        let v = ebs.volumes.get(volume).ok_or_else(|| io(format!("no volume {volume}")))?;
        if !v.attached.iter().any(|n| n == node) {
            return Err(io(format!("volume {volume} is not attached to {node}")));
        }
        Ok(v.files.get(path).map(|f| {
            let mut out = f.durable.clone();
            for p in f.pending.iter().filter(|p| p.node == node) {
                out.extend_from_slice(&p.data);
            }
            out
        }))
    }

    /// Creates `path` empty if absent (durably, as a directory entry), as
    /// `node` holding the fence at `epoch`.
    pub fn create(&self, volume: &str, node: &str, path: &str, epoch: u64) -> Result<(), EngineError> {
        let mut ebs = self.lock();
        Self::check_write(&mut ebs, volume, node)?;
        Self::check_space(&mut ebs, volume)?;
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
        e.reserve("v", "a", 1).unwrap();
        e.append("v", "a", "f", b"x", 1).await.unwrap();
        e.reserve("v", "b", 2).unwrap();
        assert!(matches!(e.sync("v", "a", "f", 1).await, Err(EngineError::Fenced(_))));
        assert_eq!(e.read("v", "a", "f").await.unwrap().unwrap(), b"", "a rejected append is gone");
        assert!(matches!(e.append("v", "a", "f", b"y", 1).await, Err(EngineError::Fenced(_))));
        assert!(matches!(e.reserve("v", "a", 1), Err(EngineError::Fenced(_))), "a stale key cannot preempt");
        e.append("v", "b", "f", b"z", 1).await.unwrap();
        e.sync("v", "b", "f", 2).await.unwrap();
        // Without fencing, the old holder's write lands.
        let off = ebs(false);
        off.reserve("v", "b", 2).unwrap();
        off.append("v", "a", "f", b"late", 1).await.unwrap();
        off.sync("v", "a", "f", 1).await.unwrap();
        assert_eq!(off.syncs()[0].epoch, 1);
    }

    /// Under the EPOCH file the device takes anyone's write: only the
    /// writer's own check before the write (`check_epoch_file`) refuses an
    /// old epoch, so a write checked before the epoch moved on still lands;
    /// its record is scoped to the shard directory.
    #[tokio::test]
    async fn the_epoch_file_is_checked_by_the_writer_not_the_device() {
        let cfg = EbsConfig { fence: FenceModel::EpochFile, torn_writes: false, ..EbsConfig::default() };
        let e = SimEbs::new(&["v".into()], cfg, 1);
        e.attach("v", "a").unwrap();
        e.attach("v", "b").unwrap();
        e.reserve("v", "a", 1).unwrap();
        e.check_epoch_file("v", 1).unwrap();
        e.append("v", "a", "s1/log", b"x", 1).await.unwrap();
        e.reserve("v", "b", 2).unwrap();
        assert!(matches!(e.check_epoch_file("v", 1), Err(EngineError::Fenced(_))), "a new batch is refused");
        assert!(matches!(e.reserve("v", "a", 1), Err(EngineError::Fenced(_))), "the file's epoch only rises");
        // The batch checked before the epoch moved on is past the fence.
        e.sync("v", "a", "s1/log", 1).await.unwrap();
        assert_eq!(e.read("v", "b", "s1/log").await.unwrap().unwrap(), b"x");
        let last = e.syncs().pop().unwrap();
        assert_eq!((last.epoch, last.scope.as_str()), (1, "v/s1"));
        assert_eq!(e.counts().fenced_writes, 1);
    }

    /// Background writeback: an unsynced append reaches the device once
    /// due, where other nodes read it and a crash keeps it; not from a node
    /// a newer reservation fenced off.
    #[tokio::test]
    async fn writeback_puts_unsynced_appends_on_the_device() {
        let cfg = EbsConfig { writeback_ms: 10, torn_writes: false, ..EbsConfig::default() };
        let e = SimEbs::new(&["v".into()], cfg, 1);
        e.attach("v", "a").unwrap();
        e.attach("v", "b").unwrap();
        e.reserve("v", "a", 1).unwrap();
        e.append("v", "a", "f", b"one", 1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(11)).await;
        assert_eq!(e.read("v", "b", "f").await.unwrap().unwrap(), b"one", "written back, so b reads it");
        e.crash("a");
        assert_eq!(e.read("v", "b", "f").await.unwrap().unwrap(), b"one", "and a crash keeps it");
        assert_eq!((e.counts().written_back, e.syncs().last().unwrap().epoch), (1, 1));
        e.append("v", "a", "f", b"two", 1).await.unwrap();
        e.reserve("v", "b", 2).unwrap();
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
                e.reserve("v", "a", 1).unwrap();
                e.append("v", "a", "f", &[7; 64], 1).await.unwrap();
                if fenced_off {
                    e.reserve("v", "b", 2).unwrap();
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
}
