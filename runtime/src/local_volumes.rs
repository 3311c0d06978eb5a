//! `LocalVolumes`: local directories standing in for multi-attach volumes
//! (`attache dev`, and several `attache node` processes on one machine
//! sharing a volume root). Implements the [`VolumeProvider`] and the engine
//! factory for shards on them.
//!
//! A volume is the directory `{root}/{volume}`; it is "attached" when it
//! exists. The storage fence is the file `{root}/{volume}/EPOCH`: `acquire`
//! raises it to the claimant's epoch (never lowers it), and every RocksDB
//! write batch of a shard opened at epoch `e` checks that the file still says
//! `e` ([`Fence`]). The batch holds a shared `flock` on `FENCE.lock` from its
//! check until its write and sync return, and `acquire` takes it exclusively,
//! so no batch of an older epoch is written after a newer epoch is: a
//! writer paused between its check and its write delays the newer epoch
//! (up to `fence_wait`, after which the claim fails and is retried) instead
//! of writing after it. RocksDB's own LOCK file keeps a second process from
//! opening a shard read-write while the first still has it open. `flock` is
//! one machine's: these volumes fence processes on one machine only.
//!
//! The `EPOCH` file is always [`EPOCH_TEXT_LEN`] bytes (the epoch in 20
//! digits), so that on a full volume, where writing a new file and
//! renaming it over the old one fails with `ENOSPC`, it is rewritten in
//! place instead: a write of fewer than 512 bytes at offset 0 of a block
//! the file already has, which needs no space and which the device
//! writes whole (PostgreSQL rewrites its `pg_control` file in place on
//! the same rule). A node can then still take a full volume over and serve
//! its reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use attache_actors::engine::{Engine, EngineError, EngineFactory, OpenMode};
use attache_actors::provider::VolumeProvider;

use crate::files::{flock_file, replace_file, LockKind};
use crate::rocks_engine::{Fence, RocksEngineFactory, FENCE_WAIT};

/// The epoch file in a volume's directory.
pub const EPOCH_FILE: &str = "EPOCH";

/// Length of the `EPOCH` file, bytes: 20 digits (every `u64`) and a newline.
pub const EPOCH_TEXT_LEN: usize = 21;

/// The `EPOCH` file's text for `epoch` ([`EPOCH_TEXT_LEN`] bytes).
pub fn epoch_text(epoch: u64) -> String {
    format!("{epoch:020}\n")
}

/// Writes `text` (of [`EPOCH_TEXT_LEN`] bytes) as the `EPOCH` file
/// `file`, durably: a new file renamed over the old one; on a full
/// filesystem, in place over an old one of the same length (see the module
/// docs). Errors: the rename's when the file cannot be rewritten in place.
fn write_epoch_file(file: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let replaced = replace_file(file, text.as_bytes());
    let Err(e) = replaced else { return Ok(()) };
    // EDQUOT (a quota reached) is met as a full filesystem is.
    if !matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded) {
        return Err(e);
    }
    let _ = std::fs::remove_file(file.with_extension("tmp"));
    let f = match std::fs::OpenOptions::new().write(true).open(file) {
        Ok(f) if f.metadata().is_ok_and(|m| m.len() == text.len() as u64) => f,
        _ => return Err(e),
    };
    f.write_all_at(text.as_bytes(), 0)?;
    f.sync_data()
}

/// The fence lock file in a volume's directory: write batches hold it
/// shared, `acquire` exclusively (see [`Fence`]).
pub const FENCE_LOCK_FILE: &str = "FENCE.lock";

/// Local directories as volumes; see the module docs.
#[derive(Clone)]
pub struct LocalVolumes {
    root: PathBuf,
    rocks: RocksEngineFactory,
    held: Arc<Mutex<BTreeMap<String, u64>>>,
    /// How long `acquire` waits for write batches under way.
    fence_wait: Duration,
}

impl LocalVolumes {
    /// Volumes under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalVolumes {
            root: root.into(),
            rocks: RocksEngineFactory::new(),
            held: Arc::default(),
            fence_wait: FENCE_WAIT,
        }
    }

    /// The same volumes, their shards sharing `budget` (a node's
    /// `memory_budget_bytes`).
    pub fn with_memory_budget(mut self, budget: crate::rocks_engine::MemoryBudget) -> Self {
        self.rocks = RocksEngineFactory::with_memory_budget(budget);
        self
    }

    /// The same volumes, with `acquire` waiting up to `wait` for write
    /// batches under way (default [`FENCE_WAIT`]).
    pub fn with_fence_wait(mut self, wait: Duration) -> Self {
        self.fence_wait = wait;
        self
    }

    /// Raises `volume`'s `EPOCH` file to `epoch` under the fence lock taken
    /// exclusively, on the calling thread (it blocks: up to `fence_wait`
    /// for write batches under way, and on fsyncs); `acquire` runs it on the
    /// blocking pool. Errors: as `VolumeProvider::acquire`.
    pub fn raise_epoch(&self, volume: &str, epoch: u64) -> Result<(), EngineError> {
        let dir = self.root.join(volume);
        let (held, wait) = (&self.held, self.fence_wait);
        let volume = volume.to_string();
        // Waits for write batches under way (they hold it shared): each
        // ends before the new epoch is written, or fails after.
        let lock_path = dir.join(FENCE_LOCK_FILE);
        let _lock = flock_file(&lock_path, LockKind::Exclusive, Some(wait)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                EngineError::Io(format!(
                    "{}: a write batch has held the fence for over {} ms (a paused writer?); retry",
                    lock_path.display(),
                    wait.as_millis()
                ))
            } else {
                io(&lock_path, e)
            }
        })?;
        let file = dir.join(EPOCH_FILE);
        let current = match std::fs::read_to_string(&file) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|_| EngineError::Corruption(format!("{} holds {text:?}", file.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&file, e)),
        };
        if current > epoch {
            return Err(EngineError::Fenced(format!("volume {volume} is at epoch {current} > {epoch}")));
        }
        write_epoch_file(&file, &epoch_text(epoch)).map_err(|e| io(&file, e))?;
        held.lock().expect("held epochs lock").insert(volume, epoch);
        Ok(())
    }

    /// The volume `path` lies on: its first component under the root.
    pub(crate) fn volume_of<'a>(&self, path: &'a Path) -> Option<&'a str> {
        path.strip_prefix(&self.root).ok()?.components().next()?.as_os_str().to_str()
    }

    fn fence_for(&self, path: &Path) -> Option<Fence> {
        let volume = self.volume_of(path)?;
        let epoch = *self.held.lock().expect("held epochs lock").get(volume)?;
        let dir = self.root.join(volume);
        Some(Fence { file: dir.join(EPOCH_FILE), lock: dir.join(FENCE_LOCK_FILE), epoch })
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Io(format!("{}: {e}", path.display()))
}

#[async_trait]
impl VolumeProvider for LocalVolumes {
    async fn attach(&self, volume: &str) -> Result<(), EngineError> {
        let dir = self.root.join(volume);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))
    }

    async fn is_attached(&self, volume: &str) -> bool {
        self.root.join(volume).is_dir()
    }

    async fn acquire(&self, volume: &str, epoch: u64) -> Result<(), EngineError> {
        let (this, volume) = (self.clone(), volume.to_string());
        crate::files::blocking(move || this.raise_epoch(&volume, epoch)).await
    }

    fn held_epoch(&self, volume: &str) -> Option<u64> {
        self.held.lock().expect("held epochs lock").get(volume).copied()
    }

    async fn free_bytes(&self, volume: &str) -> Option<u64> {
        let dir = self.root.join(volume);
        crate::files::blocking(move || crate::files::free_bytes(&dir)).await
    }
}

#[async_trait]
impl EngineFactory for LocalVolumes {
    async fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn Engine>, EngineError> {
        let fence = match mode {
            OpenMode::ReadWrite { .. } => self.fence_for(path),
            OpenMode::ReadOnly => None,
        };
        self.rocks.open_fenced(path, mode, fence).await
    }

    async fn exists(&self, path: &Path) -> Result<bool, EngineError> {
        self.rocks.exists(path).await
    }

    async fn destroy(&self, path: &Path) -> Result<(), EngineError> {
        self.rocks.destroy(path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A volume's free space is its filesystem's (statvfs), unknown for a
    /// volume that is not there.
    #[actix_rt::test]
    async fn free_space_is_the_filesystems_and_unknown_without_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = LocalVolumes::new(dir.path());
        volumes.attach("vol-1").await.unwrap();
        let free = volumes.free_bytes("vol-1").await.expect("a directory's filesystem answers statvfs");
        let fs = rustix::fs::statvfs(dir.path()).unwrap();
        assert!(free > 0 && free <= fs.f_blocks * fs.f_frsize, "{free} bytes free of {} blocks", fs.f_blocks);
        assert_eq!(volumes.free_bytes("vol-2").await, None);
    }

    #[actix_rt::test]
    async fn a_writer_of_an_older_epoch_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (LocalVolumes::new(dir.path()), LocalVolumes::new(dir.path()));
        a.attach("v").await.unwrap();
        assert!(b.is_attached("v").await);
        a.acquire("v", 1).await.unwrap();
        let old = a.open(&dir.path().join("v/shard-1"), OpenMode::ReadWrite { create: true }).await.unwrap();
        old.put(b"k", b"1", true).await.unwrap();
        b.acquire("v", 2).await.unwrap();
        assert!(matches!(old.put(b"k", b"2", true).await, Err(EngineError::Fenced(_))), "epoch 1 is fenced off");
        assert!(
            matches!(a.acquire("v", 1).await, Err(EngineError::Fenced(_))),
            "a stale epoch cannot take the fence back"
        );
        old.close().await;
        let new = b.open(&dir.path().join("v/shard-1"), OpenMode::ReadWrite { create: false }).await.unwrap();
        new.put(b"k", b"3", true).await.unwrap();
        assert_eq!(new.get(b"k").await.unwrap(), Some(b"3".to_vec()));
    }

    /// The `EPOCH` file has one length whatever the epoch (so it can be
    /// rewritten in place on a full volume); one written by an earlier
    /// build (the epoch's digits alone) is read and raised the same.
    #[actix_rt::test]
    async fn the_epoch_file_keeps_one_length_and_reads_the_old_form() {
        let dir = tempfile::tempdir().unwrap();
        let v = LocalVolumes::new(dir.path());
        v.attach("v").await.unwrap();
        std::fs::write(dir.path().join("v").join(EPOCH_FILE), "7\n").unwrap();
        assert!(matches!(v.acquire("v", 6).await, Err(EngineError::Fenced(_))), "the old form's 7 holds");
        for epoch in [8, 9, 10, 12345, u64::MAX] {
            v.acquire("v", epoch).await.unwrap();
            let text = epoch_file(dir.path());
            assert_eq!((text.len(), text.trim().parse::<u64>().unwrap()), (EPOCH_TEXT_LEN, epoch), "{text:?}");
        }
    }

    /// Pauses the next writer of volume `v` under `root` right after its
    /// fence check passed; answers (paused, go): `paused` receives once the
    /// writer is there, a send on `go` lets it write.
    fn pause_next_writer(root: &Path) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (paused_tx, paused_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (paused_tx, go_rx) = (Mutex::new(paused_tx), Mutex::new(go_rx));
        let hook = move || {
            paused_tx.lock().unwrap().send(()).unwrap();
            go_rx.lock().unwrap().recv_timeout(Duration::from_secs(20)).expect("the test lets the writer go");
        };
        crate::rocks_engine::hooks::set_after_fence_check(root.join("v").join(EPOCH_FILE), Arc::new(hook));
        (paused_rx, go_tx)
    }

    async fn wait_paused(paused: std::sync::mpsc::Receiver<()>) {
        tokio::task::spawn_blocking(move || paused.recv_timeout(Duration::from_secs(20)).expect("writer paused"))
            .await
            .unwrap();
    }

    fn epoch_file(root: &Path) -> String {
        std::fs::read_to_string(root.join("v").join(EPOCH_FILE)).unwrap()
    }

    /// The gap the fence closes: a writer of epoch 1 pauses between its
    /// check and its write while another process takes epoch 2. The newer
    /// epoch waits for it, so the paused batch lands while epoch 1 still
    /// holds, and the writer's next batch is fenced.
    #[actix_rt::test]
    async fn a_writer_paused_after_its_check_holds_the_newer_epoch_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (LocalVolumes::new(dir.path()), LocalVolumes::new(dir.path()));
        a.attach("v").await.unwrap();
        a.acquire("v", 1).await.unwrap();
        let shard = dir.path().join("v/shard-1");
        let old = a.open(&shard, OpenMode::ReadWrite { create: true }).await.unwrap();
        let (paused, go) = pause_next_writer(dir.path());
        let writer = {
            let old = old.clone();
            tokio::spawn(async move { old.put(b"k", b"paused", true).await })
        };
        wait_paused(paused).await;
        let acquiring = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire("v", 2).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!acquiring.is_finished(), "epoch 2 waits for the paused writer of epoch 1");
        assert_eq!(epoch_file(dir.path()), epoch_text(1));
        go.send(()).unwrap();
        writer.await.unwrap().expect("the paused batch was checked under epoch 1, which still held");
        acquiring.await.unwrap().expect("epoch 2 is taken once the batch is done");
        assert_eq!(epoch_file(dir.path()), epoch_text(2));
        assert!(matches!(old.put(b"k", b"late", true).await, Err(EngineError::Fenced(_))), "epoch 1 is fenced off");
        old.close().await;
        let new = b.open(&shard, OpenMode::ReadWrite { create: false }).await.unwrap();
        assert_eq!(new.get(b"k").await.unwrap(), Some(b"paused".to_vec()), "the batch that ended first is there");
        new.put(b"k", b"new", true).await.unwrap();
        new.close().await;
    }

    /// A writer paused for longer than the claimant waits: the claim fails
    /// (an I/O error, retried by the claimant later) and the epoch stays
    /// where it was, so the paused batch is still written under it.
    #[actix_rt::test]
    async fn a_claim_gives_up_on_a_writer_paused_too_long() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalVolumes::new(dir.path());
        let b = LocalVolumes::new(dir.path()).with_fence_wait(Duration::from_millis(200));
        a.attach("v").await.unwrap();
        a.acquire("v", 1).await.unwrap();
        let old = a.open(&dir.path().join("v/shard-1"), OpenMode::ReadWrite { create: true }).await.unwrap();
        let (paused, go) = pause_next_writer(dir.path());
        let writer = {
            let old = old.clone();
            tokio::spawn(async move { old.put(b"k", b"paused", true).await })
        };
        wait_paused(paused).await;
        let refused = b.acquire("v", 2).await;
        assert!(
            matches!(&refused, Err(EngineError::Io(m)) if m.contains("paused writer")),
            "the claim gives up: {refused:?}"
        );
        assert_eq!(epoch_file(dir.path()), epoch_text(1));
        go.send(()).unwrap();
        writer.await.unwrap().expect("epoch 1 still holds");
        b.acquire("v", 2).await.expect("no writer holds the fence now");
        assert!(matches!(old.put(b"k", b"late", true).await, Err(EngineError::Fenced(_))));
        old.close().await;
    }
}
