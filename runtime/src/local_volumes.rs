//! `LocalVolumes`: local directories standing in for multi-attach volumes
//! (`attache dev`, and several `attache node` processes on one machine
//! sharing a volume root). Implements the [`VolumeProvider`] and the engine
//! factory for shards on them.
//!
//! A volume is the directory `{root}/{volume}`; it is "attached" when it
//! exists. The storage fence is the file `{root}/{volume}/EPOCH`: `acquire`
//! raises it to the claimant's epoch (never lowers it), under an exclusive
//! `flock` so two local processes cannot interleave, and every RocksDB write
//! batch of a shard opened at epoch `e` first checks that the file still says
//! `e` ([`Fence`]). RocksDB's own LOCK file keeps a second process from
//! opening a shard read-write while the first still has it open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use attache_actors::engine::{Engine, EngineError, EngineFactory, OpenMode};
use attache_actors::provider::VolumeProvider;

use crate::files::replace_file;
use crate::rocks_engine::{Fence, RocksEngineFactory};

/// The epoch file in a volume's directory.
pub const EPOCH_FILE: &str = "EPOCH";

/// Local directories as volumes; see the module docs.
#[derive(Clone)]
pub struct LocalVolumes {
    root: PathBuf,
    rocks: RocksEngineFactory,
    held: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl LocalVolumes {
    /// Volumes under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalVolumes { root: root.into(), rocks: RocksEngineFactory::new(), held: Arc::default() }
    }

    fn volume_of<'a>(&self, path: &'a Path) -> Option<&'a str> {
        path.strip_prefix(&self.root).ok()?.components().next()?.as_os_str().to_str()
    }

    fn fence_for(&self, path: &Path) -> Option<Fence> {
        let volume = self.volume_of(path)?;
        let epoch = *self.held.lock().expect("held epochs lock").get(volume)?;
        Some(Fence { file: self.root.join(volume).join(EPOCH_FILE), epoch })
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
        let dir = self.root.join(volume);
        let held = self.held.clone();
        let volume = volume.to_string();
        tokio::task::spawn_blocking(move || {
            let _lock = crate::files::lock_file(&dir.join("FENCE.lock")).map_err(|e| io(&dir, e))?;
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
            replace_file(&file, format!("{epoch}\n").as_bytes()).map_err(|e| io(&file, e))?;
            held.lock().expect("held epochs lock").insert(volume, epoch);
            Ok(())
        })
        .await
        .expect("fence task panicked")
    }

    fn held_epoch(&self, volume: &str) -> Option<u64> {
        self.held.lock().expect("held epochs lock").get(volume).copied()
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
}
