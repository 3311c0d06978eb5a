//! `SimEngine`: the [`Engine`] contract over a [`SimEbs`] volume, and the
//! simulated [`VolumeProvider`].
//!
//! A shard's engine is one append-only log file on its volume
//! (`{shard dir}/log`), each write batch one frame (length, CRC32, batch),
//! with an in-memory ordered index. A synced write is acknowledged after
//! `SimEbs::sync`, and only then applied to the index, so readers see durable
//! data only; recovery replays the log and cuts a torn last frame off. Every
//! write is tagged with the epoch at which this node holds the volume's
//! fence, for the single-writer checker; under the EPOCH-file fence model
//! a write batch first checks the volume's epoch against the one the
//! engine opened at and holds the fence until its sync returns, as
//! RocksDB's engine in `attache-runtime` does. As
//! RocksDB's `LOCK`, a read-write open holds the shard directory's lock
//! until the engine closes and its writes under way end. Same contract as
//! RocksDB with WAL and sync, per the module docs of `attache_actors::engine`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use attache_actors::codec;
use attache_actors::engine::{
    Engine, EngineCounters, EngineError, EngineFactory, EngineSnapshot, EngineStats, KvPairs, OpenMode, WriteBatch,
};
use attache_actors::mem_engine::{apply_batch, scan_counted, Tree, TreeSnapshot};
use attache_actors::provider::VolumeProvider;
use attache_actors::reservation::take_fence;

use crate::ebs::{FenceModel, SimEbs};

/// The epochs at which one node holds volume fences; shared by its provider and engines.
type Epochs = Arc<Mutex<BTreeMap<String, u64>>>;

/// `node`'s view of the simulated volumes: its provider and engine factory.
#[derive(Clone)]
pub struct SimVolumes {
    ebs: SimEbs,
    node: String,
    epochs: Epochs,
    /// Under `ebs.block_mode`: the volumes whose filesystem this node has
    /// mounted (from `acquire` until `release`; a restart starts with none).
    mounted: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl SimVolumes {
    /// `node`'s view of `ebs`.
    pub fn new(ebs: SimEbs, node: impl Into<String>) -> Self {
        SimVolumes { ebs, node: node.into(), epochs: Arc::default(), mounted: Arc::default() }
    }

    /// Under `ebs.block_mode`, an I/O error unless this node has `volume`
    /// mounted: a block volume's files are reachable only there.
    fn check_mounted(&self, volume: &str) -> Result<(), EngineError> {
        if !self.ebs.block_mode() || self.mounted.lock().expect("mounted lock").contains(volume) {
            return Ok(());
        }
        Err(EngineError::Io(format!("volume {volume} is not mounted on {}", self.node)))
    }

    fn epoch(&self, volume: &str) -> u64 {
        self.epochs.lock().expect("epochs lock").get(volume).copied().unwrap_or(0)
    }
}

/// Splits `/{volume}/{dir...}` into (volume, dir).
fn split(path: &Path) -> Result<(String, String), EngineError> {
    let s = path.to_str().ok_or_else(|| EngineError::Io(format!("non-UTF-8 path {}", path.display())))?;
    let s = s.trim_start_matches('/');
    let (volume, dir) = s.split_once('/').ok_or_else(|| EngineError::Io(format!("{s} names no file on a volume")))?;
    Ok((volume.to_string(), dir.to_string()))
}

#[async_trait]
impl VolumeProvider for SimVolumes {
    async fn attach(&self, volume: &str) -> Result<(), EngineError> {
        self.ebs.attach(volume, &self.node)
    }

    async fn is_attached(&self, volume: &str) -> bool {
        self.ebs.is_attached(volume, &self.node)
    }

    /// Under a reservation, the shipped protocol
    /// (`attache_actors::reservation::take_fence`) against the simulated
    /// device; under the EPOCH file, as `LocalVolumes::acquire`: waits up
    /// to `FENCE_WAIT` for write batches holding the fence, then raises it.
    async fn acquire(&self, volume: &str, epoch: u64) -> Result<(), EngineError> {
        match self.ebs.fence_model() {
            FenceModel::Reservation => {
                take_fence(&self.ebs.nvme(&self.node), volume, epoch).await?;
            }
            FenceModel::EpochFile => {
                let deadline = tokio::time::Instant::now() + attache_actors::provider::FENCE_WAIT;
                while self.ebs.fence_busy(volume) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(tokio::time::Duration::from_millis(1)).await;
                }
                self.ebs.raise_epoch_file(volume, &self.node, epoch)?;
            }
        }
        // Block mode: the fence first, then the mount (journal recovery).
        if self.ebs.block_mode() {
            self.mounted.lock().expect("mounted lock").insert(volume.to_string());
        }
        self.epochs.lock().expect("epochs lock").insert(volume.to_string(), epoch);
        Ok(())
    }

    fn held_epoch(&self, volume: &str) -> Option<u64> {
        self.epochs.lock().expect("epochs lock").get(volume).copied()
    }

    fn backups_read(&self) -> bool {
        !self.ebs.block_mode()
    }

    /// Known where this node could open the volume's files (block mode:
    /// only while it has the volume mounted).
    async fn free_bytes(&self, volume: &str) -> Option<u64> {
        self.check_mounted(volume).ok()?;
        self.ebs.free_bytes(volume, &self.node)
    }

    /// Block mode: unmounts (opens fail from then on until the next acquire).
    async fn release(&self, volume: &str) -> Result<(), EngineError> {
        self.mounted.lock().expect("mounted lock").remove(volume);
        Ok(())
    }
}

#[async_trait]
impl EngineFactory for SimVolumes {
    async fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn Engine>, EngineError> {
        let (volume, dir) = split(path)?;
        self.check_mounted(&volume)?;
        let file = format!("{dir}/log");
        let missing = !self.ebs.exists(&volume, &file);
        if missing && mode != (OpenMode::ReadWrite { create: true }) {
            return Err(EngineError::NotFound(path.display().to_string()));
        }
        let read_only = mode == OpenMode::ReadOnly;
        // A read-write open holds the directory's lock until the engine
        // closes (or is dropped, or the process ends), as RocksDB's LOCK.
        let lock = if read_only {
            None
        } else {
            let token = self.ebs.lock_dir(&volume, &self.node, &dir)?;
            // As RocksDB's read-write open writes a new MANIFEST, OPTIONS
            // file and WAL: refused on a full volume (a read-only open is not).
            if let Err(e) = self.ebs.check_open_for_write(&volume, &self.node) {
                self.ebs.unlock(&volume, &dir, token);
                return Err(e);
            }
            if missing {
                if let Err(e) = self.ebs.create(&volume, &self.node, &file, self.epoch(&volume)) {
                    self.ebs.unlock(&volume, &dir, token);
                    return Err(e);
                }
            }
            Some((dir, token))
        };
        let fence_epoch = if read_only { None } else { self.held_epoch(&volume) };
        let opened = lock.as_ref().map(|(dir, _)| dir.clone());
        let engine = SimEngine {
            vols: self.clone(),
            volume,
            file,
            read_only,
            fence_epoch,
            lock,
            failed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            closed: Arc::default(),
            counters: Arc::default(),
        };
        // A failed recovery drops the engine, which releases the lock.
        engine.recover().await?;
        if let Some(dir) = opened {
            self.ebs.record_open(&engine.volume, &self.node, &dir, self.epoch(&engine.volume));
        }
        Ok(Arc::new(engine))
    }

    async fn exists(&self, path: &Path) -> Result<bool, EngineError> {
        let (volume, dir) = split(path)?;
        Ok(self.ebs.exists(&volume, &format!("{dir}/log")))
    }

    async fn destroy(&self, path: &Path) -> Result<(), EngineError> {
        let (volume, dir) = split(path)?;
        self.check_mounted(&volume)?;
        self.ebs.remove_prefix(&volume, &self.node, &format!("{dir}/"), self.epoch(&volume))
    }
}

#[derive(Default)]
struct State {
    /// Copied on write while a snapshot shares it.
    tree: Arc<Tree>,
    /// Log bytes applied to `tree`.
    applied: usize,
}

/// One shard's engine on a simulated volume; see the module docs.
pub struct SimEngine {
    vols: SimVolumes,
    volume: String,
    file: String,
    read_only: bool,
    /// The epoch this node held the volume's fence at when the engine
    /// opened: under the EPOCH-file fence, each write batch checks the file
    /// still says it (as `attache-runtime`'s `Fence`, fixed at open; none,
    /// and no check, when the node held no epoch then, as there).
    fence_epoch: Option<u64>,
    /// The shard directory's lock (read-write only) and its token.
    lock: Option<(String, u64)>,
    /// Set when a write failed with an unknown outcome or for want of
    /// space: no more writes (as RocksDB's background error).
    failed: AtomicBool,
    /// Writes under way: as a RocksDB call in flight holds the database,
    /// the directory's lock is released only once they end (see `close`).
    in_flight: AtomicUsize,
    state: Mutex<State>,
    closed: Arc<AtomicBool>,
    counters: Arc<EngineCounters>,
}

impl SimEngine {
    fn state(&self) -> Result<std::sync::MutexGuard<'_, State>, EngineError> {
        let s = self.state.lock().expect("sim engine lock");
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Closed);
        }
        Ok(s)
    }

    /// Releases the directory's lock, if this engine holds it.
    fn unlock(&self) {
        if let Some((dir, token)) = &self.lock {
            self.vols.ebs.unlock(&self.volume, dir, *token);
        }
    }

    /// Replays the log into the index; a read-write engine cuts a torn tail off.
    async fn recover(&self) -> Result<(), EngineError> {
        let bytes = self.vols.ebs.read(&self.volume, &self.vols.node, &self.file).await?.unwrap_or_default();
        let (frames, valid) = codec::frames(&bytes);
        let mut s = self.state()?;
        for f in frames {
            let batch: WriteBatch = codec::decode(f, "sim engine log record").map_err(EngineError::Corruption)?;
            apply_batch(Arc::make_mut(&mut s.tree), &batch);
        }
        s.applied = valid;
        if valid < bytes.len() && !self.read_only {
            tracing::info!(volume = %self.volume, file = %self.file, torn = bytes.len() - valid, "cutting a torn log tail");
            self.vols.ebs.truncate(&self.volume, &self.vols.node, &self.file, valid, self.vols.epoch(&self.volume))?;
        }
        Ok(())
    }
}

/// How long `close` waits for writes under way (as `attache-runtime`'s `CLOSE_WAIT`).
const CLOSE_WAIT: tokio::time::Duration = tokio::time::Duration::from_secs(30);

/// A write under way on an engine (see `SimEngine::in_flight`); the last
/// one to end after a close releases the shard's lock.
struct InFlight<'a>(&'a SimEngine);

impl<'a> InFlight<'a> {
    fn start(engine: &'a SimEngine) -> Self {
        engine.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(engine)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.closed.load(Ordering::Acquire) {
            self.0.unlock();
        }
    }
}

impl Drop for SimEngine {
    fn drop(&mut self) {
        self.unlock();
    }
}

#[async_trait]
impl Engine for SimEngine {
    async fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        if self.read_only {
            return Err(EngineError::ReadOnly);
        }
        drop(self.state()?); // fail fast when closed
        let mut frame = Vec::new();
        codec::frame(&mut frame, &codec::encode(&batch));
        if self.failed.load(Ordering::Acquire) {
            return Err(EngineError::Io(
                "an earlier write of this engine failed (an unknown outcome or a full volume); reopen".into(),
            ));
        }
        let (ebs, node) = (&self.vols.ebs, &self.vols.node);
        let _in_flight = InFlight::start(self);
        // Under the EPOCH file a write is the engine's, at the epoch it
        // opened at; under a reservation, the node's, at the one it holds.
        let epoch = match (ebs.fence_model(), self.fence_epoch) {
            (FenceModel::EpochFile, Some(e)) => e,
            _ => self.vols.epoch(&self.volume),
        };
        // The EPOCH-file fence (a no-op under a reservation): checked before
        // the write and held until its sync returns, as `Fence::hold`.
        let _fence_hold = match self.fence_epoch {
            Some(epoch) => ebs.hold_epoch_file(&self.volume, epoch)?,
            None => None,
        };
        if let Err(e) = ebs.append(&self.volume, node, &self.file, &frame, epoch).await {
            // As RocksDB after a failed WAL write: no more writes until a reopen.
            if matches!(e, EngineError::NoSpace(_)) {
                self.failed.store(true, Ordering::Release);
            }
            return Err(e);
        }
        if sync {
            // A failed sync may have made the batch durable (or not). A
            // reservation conflict too reaches RocksDB as a failed fsync
            // (EIO), whose outcome it cannot know: so it is answered here.
            if let Err(e) = ebs.sync(&self.volume, node, &self.file, epoch).await {
                self.failed.store(true, Ordering::Release);
                return Err(EngineError::Indeterminate(e.to_string()));
            }
        }
        // The batch is on the volume now (durable when synced): an engine
        // closed meanwhile still answers Ok, since an error means nothing
        // was written (the `Engine` contract).
        let mut s = self.state.lock().expect("sim engine lock");
        apply_batch(Arc::make_mut(&mut s.tree), &batch);
        s.applied += frame.len();
        self.counters.wrote(&batch);
        Ok(())
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        let value = self.state()?.tree.get(key).cloned();
        self.counters.read(1, value.as_ref().map_or(0, |v| (key.len() + v.len()) as u64));
        Ok(value)
    }

    async fn multi_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        let s = self.state()?;
        let values: Vec<_> = keys.iter().map(|k| s.tree.get(k).cloned()).collect();
        let bytes = keys.iter().zip(&values).map(|(k, v)| v.as_ref().map_or(0, |v| k.len() + v.len()) as u64).sum();
        self.counters.read(keys.len() as u64, bytes);
        Ok(values)
    }

    async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, EngineError> {
        Ok(scan_counted(&self.state()?.tree, start, end, limit, &self.counters))
    }

    async fn snapshot(&self) -> Result<Arc<dyn EngineSnapshot>, EngineError> {
        let tree = self.state()?.tree.clone();
        Ok(Arc::new(TreeSnapshot::new(tree, self.closed.clone(), self.counters.clone())))
    }

    async fn approximate_size(&self) -> Result<u64, EngineError> {
        Ok(self.state()?.applied as u64)
    }

    fn stats(&self) -> EngineStats {
        let keys = self.state.lock().expect("sim engine lock").tree.len() as u64;
        self.counters.snapshot(keys)
    }

    /// The log bytes applied: a failed write applies none.
    fn sequence(&self) -> Option<u64> {
        Some(self.state.lock().expect("sim engine lock").applied as u64)
    }

    /// As `RocksEngine::close`: no call starts after it, and the shard's
    /// lock is released once the writes under way end (after at most 30 s
    /// it returns anyway, and the last of them releases the lock).
    async fn close(&self) {
        {
            let _state = self.state.lock().expect("sim engine lock");
            self.closed.store(true, Ordering::Release);
        }
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        while self.in_flight.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(tokio::time::Duration::from_millis(1)).await;
        }
        if self.in_flight.load(Ordering::Acquire) == 0 {
            self.unlock();
        }
    }

    /// A read-only engine applies what the writer made durable since: the
    /// log from where it got to, read alone (a backup reads before every
    /// read it serves; copying the whole log each time cost more than the
    /// system under test).
    async fn catch_up(&self) -> Result<(), EngineError> {
        if !self.read_only {
            return Ok(());
        }
        // (Closed or not: a closed engine fails after its read, as before.)
        let from = self.state.lock().expect("sim engine lock").applied;
        let read = self.vols.ebs.read_from(&self.volume, &self.vols.node, &self.file, from).await?;
        let (start, len, bytes) = read.unwrap_or_default();
        {
            let mut s = self.state()?;
            if len < s.applied {
                // The writer cut a torn tail this view had not applied
                // anyway, or the file is gone: start over.
                s.tree = Arc::default();
                s.applied = 0;
            }
            // Else another catch-up moved on and the file was cut meanwhile.
            if s.applied >= start {
                let (frames, valid) = codec::frames(&bytes[s.applied - start..]);
                for f in frames {
                    let batch: WriteBatch =
                        codec::decode(f, "sim engine log record").map_err(EngineError::Corruption)?;
                    apply_batch(Arc::make_mut(&mut s.tree), &batch);
                }
                s.applied += valid;
                return Ok(());
            }
        }
        self.catch_up_whole().await
    }
}

impl SimEngine {
    /// [`Engine::catch_up`] from the whole log.
    async fn catch_up_whole(&self) -> Result<(), EngineError> {
        let bytes = self.vols.ebs.read(&self.volume, &self.vols.node, &self.file).await?.unwrap_or_default();
        let mut s = self.state()?;
        if bytes.len() < s.applied {
            // The writer cut a torn tail this view had not applied anyway: start over.
            s.tree = Arc::default();
            s.applied = 0;
        }
        let (frames, valid) = codec::frames(&bytes[s.applied..]);
        for f in frames {
            let batch: WriteBatch = codec::decode(f, "sim engine log record").map_err(EngineError::Corruption)?;
            apply_batch(Arc::make_mut(&mut s.tree), &batch);
        }
        s.applied += valid;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebs::EbsConfig;

    fn vols(torn: bool) -> (SimEbs, SimVolumes) {
        let ebs = SimEbs::new(&["vol-1".into()], EbsConfig { torn_writes: torn, ..EbsConfig::default() }, 3);
        ebs.attach("vol-1", "n1").unwrap();
        (ebs.clone(), SimVolumes::new(ebs, "n1"))
    }

    #[tokio::test]
    async fn synced_writes_survive_a_crash_and_unsynced_ones_do_not() {
        let (ebs, v) = vols(false);
        let path = Path::new("/vol-1/shard-1");
        let e = v.open(path, OpenMode::ReadWrite { create: true }).await.unwrap();
        e.put(b"a", b"1", true).await.unwrap();
        e.put(b"b", b"2", false).await.unwrap();
        assert_eq!(e.get(b"b").await.unwrap(), Some(b"2".to_vec()));
        ebs.crash("n1");
        let e = v.open(path, OpenMode::ReadWrite { create: false }).await.unwrap();
        assert_eq!(e.get(b"a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(e.get(b"b").await.unwrap(), None);
        assert!(matches!(v.open(Path::new("/vol-1/shard-9"), OpenMode::ReadOnly).await, Err(EngineError::NotFound(_))));
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_later_writes_follow_the_valid_log() {
        let (ebs, v) = vols(true);
        let path = Path::new("/vol-1/shard-1");
        let e = v.open(path, OpenMode::ReadWrite { create: true }).await.unwrap();
        e.put(b"a", b"1", true).await.unwrap();
        // Crash after many unsynced appends: some seeds leave a torn frame.
        for i in 0..20u8 {
            e.put(&[b'x', i], &[i; 40], false).await.unwrap();
            ebs.crash("n1");
        }
        let e = v.open(path, OpenMode::ReadWrite { create: false }).await.unwrap();
        e.put(b"c", b"3", true).await.unwrap();
        e.close().await;
        let e = v.open(path, OpenMode::ReadWrite { create: false }).await.unwrap();
        assert_eq!(e.get(b"a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(e.get(b"c").await.unwrap(), Some(b"3".to_vec()));
    }

    /// As RocksDB's LOCK file: one read-write open per shard directory at a
    /// time, whoever asks (this node too); read-only opens take no lock;
    /// closing, dropping the engine or the process ending releases it.
    #[tokio::test]
    async fn a_read_write_open_holds_the_shard_lock_until_closed() {
        let (ebs, v) = vols(false);
        ebs.attach("vol-1", "n2").unwrap();
        let other = SimVolumes::new(ebs.clone(), "n2");
        let path = Path::new("/vol-1/shard-1");
        let rw = OpenMode::ReadWrite { create: false };
        let refused = |r: Result<Arc<dyn Engine>, EngineError>, holder: &str| match r {
            Err(EngineError::Io(m)) => assert!(m.contains("LOCK") && m.contains(&format!("held by {holder}")), "{m}"),
            Err(e) => panic!("not a lock error: {e}"),
            Ok(_) => panic!("a second read-write open succeeded"),
        };
        let e = v.open(path, OpenMode::ReadWrite { create: true }).await.unwrap();
        refused(other.open(path, rw).await, "n1");
        refused(v.open(path, rw).await, "n1");
        assert!(other.open(path, OpenMode::ReadOnly).await.is_ok(), "a read-only view takes no lock");
        e.close().await;
        let e = other.open(path, rw).await.unwrap();
        drop(e);
        let _held = other.open(path, rw).await.unwrap();
        refused(v.open(path, rw).await, "n2");
        ebs.crash("n2");
        let _e = v.open(path, rw).await.unwrap();
        assert_eq!(ebs.counts().lock_conflicts, 3);
        // Separate machines share no lock; a process still holds its own.
        let ebs = SimEbs::new(&["vol-1".into()], EbsConfig { shard_locks: false, ..EbsConfig::default() }, 3);
        ebs.attach("vol-1", "n1").unwrap();
        ebs.attach("vol-1", "n2").unwrap();
        let (v, other) = (SimVolumes::new(ebs.clone(), "n1"), SimVolumes::new(ebs, "n2"));
        let _a = v.open(path, OpenMode::ReadWrite { create: true }).await.unwrap();
        let _b = other.open(path, rw).await.unwrap();
        refused(v.open(path, rw).await, "n1");
    }

    #[tokio::test]
    async fn a_read_only_view_catches_up_with_the_writer() {
        let (ebs, v) = vols(false);
        ebs.attach("vol-1", "n2").unwrap();
        let backup = SimVolumes::new(ebs.clone(), "n2");
        let path = Path::new("/vol-1/shard-1");
        let w = v.open(path, OpenMode::ReadWrite { create: true }).await.unwrap();
        w.put(b"a", b"1", true).await.unwrap();
        let r = backup.open(path, OpenMode::ReadOnly).await.unwrap();
        assert_eq!(r.get(b"a").await.unwrap(), Some(b"1".to_vec()));
        w.put(b"b", b"2", true).await.unwrap();
        assert_eq!(r.get(b"b").await.unwrap(), None, "stale until it catches up");
        r.catch_up().await.unwrap();
        assert_eq!(r.get(b"b").await.unwrap(), Some(b"2".to_vec()));
        assert!(matches!(r.put(b"c", b"3", true).await, Err(EngineError::ReadOnly)));
    }

    /// "On error nothing written": a write whose sync succeeded answers Ok
    /// even when the engine closed while it waited on the volume.
    #[tokio::test]
    async fn a_write_that_reached_the_volume_is_not_an_error_when_the_engine_closes_meanwhile() {
        let (_ebs, v) = vols(false);
        let path = Path::new("/vol-1/shard-1");
        let e = v.open(path, OpenMode::ReadWrite { create: true }).await.unwrap();
        let close = async {
            tokio::time::sleep(std::time::Duration::from_micros(100)).await;
            e.close().await;
        };
        let (written, ()) = tokio::join!(e.put(b"k", b"v", true), close);
        written.expect("the sync succeeded, so the write did");
        assert!(matches!(e.get(b"k").await, Err(EngineError::Closed)));
        let e = v.open(path, OpenMode::ReadWrite { create: false }).await.unwrap();
        assert_eq!(e.get(b"k").await.unwrap(), Some(b"v".to_vec()));
    }

    #[tokio::test]
    async fn writes_carry_the_fence_epoch() {
        let (ebs, v) = vols(false);
        v.acquire("vol-1", 7).await.unwrap();
        let e = v.open(Path::new("/vol-1/s"), OpenMode::ReadWrite { create: true }).await.unwrap();
        e.put(b"k", b"v", true).await.unwrap();
        assert_eq!(ebs.syncs().last().unwrap().epoch, 7);
        assert_eq!(v.held_epoch("vol-1"), Some(7));
    }
}
