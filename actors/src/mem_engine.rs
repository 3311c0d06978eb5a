//! `MemEngine`: the [`Engine`] contract in memory, for fast tests.
//!
//! Data lives in the [`MemEngineFactory`], keyed by path, so closing and
//! reopening an engine (or reopening it after its shard actor stopped) finds
//! the data again, as on a volume. It cannot model a crash; `SimEngine` in
//! `attache-sim` does. Writes are durable and visible when `write` returns.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::engine::{
    BatchOp, Engine, EngineCounters, EngineError, EngineFactory, EngineSnapshot, EngineStats, KvPairs, OpenMode,
    WriteBatch,
};

/// The ordered map an in-memory engine keeps.
pub type Tree = BTreeMap<Vec<u8>, Vec<u8>>;

/// A snapshot of an in-memory engine: its tree as it was (shared until the
/// engine's next write copies it: `Arc::make_mut`) and the engine's closed
/// flag; shared by the in-memory engines.
pub struct TreeSnapshot {
    tree: Arc<Tree>,
    closed: Arc<AtomicBool>,
    counters: Arc<EngineCounters>,
}

impl TreeSnapshot {
    /// A view of `tree`, ending when `closed` is set; its reads count in `counters`.
    pub fn new(tree: Arc<Tree>, closed: Arc<AtomicBool>, counters: Arc<EngineCounters>) -> Self {
        TreeSnapshot { tree, closed, counters }
    }
}

#[async_trait]
impl EngineSnapshot for TreeSnapshot {
    async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, EngineError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Closed);
        }
        Ok(scan_counted(&self.tree, start, end, limit, &self.counters))
    }
}

/// One engine's tree, shared by its opens; copied on write while a snapshot holds it.
type SharedTree = Arc<Mutex<Arc<Tree>>>;

/// Holds every `MemEngine`'s data by path; clones share it.
#[derive(Clone, Default, Debug)]
pub struct MemEngineFactory {
    stores: Arc<Mutex<BTreeMap<PathBuf, SharedTree>>>,
}

impl MemEngineFactory {
    /// An empty factory.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl EngineFactory for MemEngineFactory {
    async fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn Engine>, EngineError> {
        let mut stores = self.stores.lock().expect("mem engine factory lock");
        let tree = match (stores.get(path), mode) {
            (Some(tree), _) => tree.clone(),
            (None, OpenMode::ReadWrite { create: true }) => {
                let tree = Arc::new(Mutex::new(Arc::new(Tree::new())));
                stores.insert(path.to_path_buf(), tree.clone());
                tree
            }
            (None, _) => return Err(EngineError::NotFound(path.display().to_string())),
        };
        Ok(Arc::new(MemEngine {
            tree,
            read_only: mode == OpenMode::ReadOnly,
            closed: Arc::default(),
            counters: Arc::default(),
        }))
    }

    async fn exists(&self, path: &Path) -> Result<bool, EngineError> {
        Ok(self.stores.lock().expect("mem engine factory lock").contains_key(path))
    }

    async fn destroy(&self, path: &Path) -> Result<(), EngineError> {
        self.stores.lock().expect("mem engine factory lock").remove(path);
        Ok(())
    }
}

/// An in-memory engine; see the module docs.
#[derive(Debug)]
pub struct MemEngine {
    tree: SharedTree,
    read_only: bool,
    closed: Arc<AtomicBool>,
    counters: Arc<EngineCounters>,
}

impl MemEngine {
    fn tree(&self) -> Result<std::sync::MutexGuard<'_, Arc<Tree>>, EngineError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Closed);
        }
        Ok(self.tree.lock().expect("mem engine lock"))
    }
}

/// Applies a batch to an ordered map, in order; shared by in-memory engines.
pub fn apply_batch(tree: &mut BTreeMap<Vec<u8>, Vec<u8>>, batch: &WriteBatch) {
    for op in batch.ops() {
        match op {
            BatchOp::Put { key, value } => {
                tree.insert(key.clone(), value.clone());
            }
            BatchOp::Delete { key } => {
                tree.remove(key);
            }
        }
    }
}

/// `scan_tree`, counted in `counters` as reads; the scan of every in-memory
/// engine and of their snapshots.
pub fn scan_counted(tree: &Tree, start: &[u8], end: Option<&[u8]>, limit: usize, counters: &EngineCounters) -> KvPairs {
    let pairs = scan_tree(tree, start, end, limit);
    counters.read(pairs.len() as u64, pairs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum());
    pairs
}

/// Up to `limit` pairs of `tree` in `[start, end)`; shared by in-memory engines.
pub fn scan_tree(tree: &BTreeMap<Vec<u8>, Vec<u8>>, start: &[u8], end: Option<&[u8]>, limit: usize) -> KvPairs {
    let upper = match end {
        Some(end) if end <= start => return Vec::new(),
        Some(end) => Bound::Excluded(end.to_vec()),
        None => Bound::Unbounded,
    };
    tree.range((Bound::Included(start.to_vec()), upper)).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[async_trait]
impl Engine for MemEngine {
    async fn write(&self, batch: WriteBatch, _sync: bool) -> Result<(), EngineError> {
        if self.read_only {
            return Err(EngineError::ReadOnly);
        }
        apply_batch(Arc::make_mut(&mut *self.tree()?), &batch);
        self.counters.wrote(&batch);
        Ok(())
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        let value = self.tree()?.get(key).cloned();
        self.counters.read(1, value.as_ref().map_or(0, |v| (key.len() + v.len()) as u64));
        Ok(value)
    }

    async fn multi_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        let tree = self.tree()?;
        let values: Vec<_> = keys.iter().map(|k| tree.get(k).cloned()).collect();
        let bytes = keys.iter().zip(&values).map(|(k, v)| v.as_ref().map_or(0, |v| k.len() + v.len()) as u64).sum();
        self.counters.read(keys.len() as u64, bytes);
        Ok(values)
    }

    async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, EngineError> {
        let tree = self.tree()?;
        Ok(scan_counted(&tree, start, end, limit, &self.counters))
    }

    async fn snapshot(&self) -> Result<Arc<dyn EngineSnapshot>, EngineError> {
        let tree = self.tree()?.clone();
        Ok(Arc::new(TreeSnapshot::new(tree, self.closed.clone(), self.counters.clone())))
    }

    async fn approximate_size(&self) -> Result<u64, EngineError> {
        Ok(self.tree()?.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum())
    }

    fn stats(&self) -> EngineStats {
        let keys = self.tree.lock().expect("mem engine lock").len() as u64;
        self.counters.snapshot(keys)
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_snapshot_reads_one_instant_and_ends_with_the_engine() {
        let f = MemEngineFactory::new();
        let e = f.open(Path::new("/v/s"), OpenMode::ReadWrite { create: true }).await.unwrap();
        e.put(b"a", b"1", true).await.unwrap();
        let snap = e.snapshot().await.unwrap();
        e.put(b"a", b"2", true).await.unwrap();
        e.put(b"b", b"2", true).await.unwrap();
        assert_eq!(snap.scan(b"", None, 10).await.unwrap(), vec![(b"a".to_vec(), b"1".to_vec())]);
        assert_eq!(e.scan(b"", None, 10).await.unwrap().len(), 2);
        e.close().await;
        assert!(matches!(snap.scan(b"", None, 10).await, Err(EngineError::Closed)));
    }
}
