//! The `Engine` trait: the ordered key-value store under one shard, and the
//! `EngineFactory` that opens, lists and destroys engines on a volume.
//!
//! Contract (RocksDB with its WAL on is the model, see `RocksEngine` in
//! `attache-runtime`):
//! - `write` applies a [`WriteBatch`] atomically: after a crash either every
//!   operation of the batch is there or none is.
//! - With `sync = true`, `write` returns only once the batch is durable on the
//!   volume (WAL fsync). A write acknowledged to a client always used `sync`.
//! - A write is visible to `get`/`scan` once `write` has returned, never before
//!   it is durable when it was synced.
//! - A write that fails with [`EngineError::Indeterminate`] may or may not be
//!   durable (its sync failed after the data was handed to the volume, as a
//!   WAL fsync error): a reopen may show it while this engine's reads do
//!   not, so the engine is reopened before it is used again. So may one
//!   that fails with [`EngineError::NoSpace`] (the volume is full): the
//!   engine then takes no more writes, as RocksDB stops writing after a
//!   failed WAL write. Every other error of a write means nothing of its
//!   batch was written.
//! - A read-write open writes to the volume (RocksDB: a new MANIFEST,
//!   OPTIONS file and WAL), so it fails with `NoSpace` on a full volume; a
//!   read-only open writes nothing and still works there.
//! - Keys are compared as unsigned bytes (memcmp order).
//! - A [`EngineSnapshot`] (from `snapshot`) reads the engine as it was at one
//!   instant, whatever is written later, until the engine is closed.
//!
//! Implementations: `MemEngine` (this crate, for fast tests), `RocksEngine`
//! (`attache-runtime`), `SimEngine` (`attache-sim`, a log on a simulated volume).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// One operation of a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchOp {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Removes `key` (a no-op when absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

impl BatchOp {
    /// The key it changes.
    pub fn key(&self) -> &[u8] {
        match self {
            BatchOp::Put { key, .. } | BatchOp::Delete { key } => key,
        }
    }
}

/// Operations applied atomically, in order (a later op on the same key wins).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteBatch {
    ops: Vec<BatchOp>,
    bytes: usize,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put of `key` -> `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        let (key, value) = (key.into(), value.into());
        self.bytes += key.len() + value.len();
        self.ops.push(BatchOp::Put { key, value });
    }

    /// Adds a delete of `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        let key = key.into();
        self.bytes += key.len();
        self.ops.push(BatchOp::Delete { key });
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[BatchOp] {
        &self.ops
    }

    /// Orders the operations by key, keeping the order of those on the same
    /// key, which leaves what the batch does unchanged (ops on different keys
    /// commute). RocksDB inserts a batch into its memtable skip list in
    /// order, reusing the last insert's position ("splice") when the next key
    /// follows it, so a sorted batch inserts with fewer key comparisons
    /// (RocksDB `InlineSkipList::Insert`, `memtable/inlineskiplist.h`).
    pub fn sort_by_key(&mut self) {
        self.ops.sort_by(|a, b| a.key().cmp(b.key()));
    }

    /// Takes the operations out.
    pub fn into_ops(self) -> Vec<BatchOp> {
        self.ops
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch has no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Sum of key and value lengths, in bytes.
    pub fn byte_size(&self) -> usize {
        self.bytes
    }
}

/// Counters an engine keeps since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    /// Live keys (exact for `MemEngine`/`SimEngine`, RocksDB's estimate otherwise).
    pub keys: u64,
    /// Key and value bytes written by `write`.
    pub bytes_written: u64,
    /// Key and value bytes returned by `get`, `multi_get` and `scan`.
    pub bytes_read: u64,
    /// Batch operations written.
    pub ops_written: u64,
    /// Keys looked up plus entries scanned.
    pub ops_read: u64,
}

/// Lock-free counters behind [`EngineStats`], shared by the implementations.
#[derive(Debug, Default)]
pub struct EngineCounters {
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
    ops_written: AtomicU64,
    ops_read: AtomicU64,
}

impl EngineCounters {
    /// Counts a written batch.
    pub fn wrote(&self, batch: &WriteBatch) {
        self.bytes_written.fetch_add(batch.byte_size() as u64, Ordering::Relaxed);
        self.ops_written.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }

    /// Counts `ops` reads that returned `bytes` bytes.
    pub fn read(&self, ops: u64, bytes: u64) {
        self.ops_read.fetch_add(ops, Ordering::Relaxed);
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A snapshot of the counters, with `keys` filled in by the caller.
    pub fn snapshot(&self, keys: u64) -> EngineStats {
        EngineStats {
            keys,
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            ops_written: self.ops_written.load(Ordering::Relaxed),
            ops_read: self.ops_read.load(Ordering::Relaxed),
        }
    }
}

/// What went wrong in an engine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum EngineError {
    /// The volume failed the I/O (detached, full, device error).
    #[error("volume I/O error: {0}")]
    Io(String),
    /// Stored data could not be decoded.
    #[error("corrupt data: {0}")]
    Corruption(String),
    /// The volume rejected the write because a newer epoch holds it (storage fencing).
    #[error("write fenced: {0}")]
    Fenced(String),
    /// The engine was opened read-only.
    #[error("engine is read-only")]
    ReadOnly,
    /// No engine exists at that path (open without create).
    #[error("no engine at {0}")]
    NotFound(String),
    /// Another process or holder has the engine open read-write.
    #[error("engine is locked by another holder: {0}")]
    Locked(String),
    /// The engine was closed.
    #[error("engine is closed")]
    Closed,
    /// A write failed after its data was handed to the volume (a failed
    /// sync): its batch may or may not be durable, and this engine's reads
    /// may not show what a reopen will. Reopen the engine before using it.
    #[error("write outcome unknown: {0}")]
    Indeterminate(String),
    /// The volume has no free space (`ENOSPC`, or a quota reached:
    /// `EDQUOT`). A write that fails so may
    /// or may not be durable (as `Indeterminate`) and the engine takes no
    /// more writes: reopen it. A read-write open that fails so can be
    /// replaced by a read-only one, which writes nothing. Failing over does
    /// not help (every node sees the same volume): space must be freed.
    #[error("no space left on the volume: {0}")]
    NoSpace(String),
}

/// A scan result: key/value pairs in key order.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A read-only view of an engine at one instant (`Engine::snapshot`): what a
/// scan that streams several pages reads every page from, so that all its
/// pages show one state. Views are cheap to take and hold the engine's state
/// of that instant alive (RocksDB: a snapshot pins the versions it sees;
/// in-memory engines: the tree, copied on the next write) until dropped.
#[async_trait]
pub trait EngineSnapshot: Send + Sync + 'static {
    /// As [`Engine::scan`], on the view.
    ///
    /// Errors: `Closed` once the engine is closed (a view ends with its
    /// engine), `Io`.
    async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, EngineError>;
}

/// An ordered, durable key-value store (see the module docs for the contract).
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Applies `batch` atomically; with `sync`, returns once it is durable.
    ///
    /// Errors: `Io`, `Fenced`, `ReadOnly`, `Closed`.
    async fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError>;

    /// Puts one key (a one-op batch).
    async fn put(&self, key: &[u8], value: &[u8], sync: bool) -> Result<(), EngineError> {
        let mut batch = WriteBatch::new();
        batch.put(key, value);
        self.write(batch, sync).await
    }

    /// Deletes one key (a one-op batch).
    async fn delete(&self, key: &[u8], sync: bool) -> Result<(), EngineError> {
        let mut batch = WriteBatch::new();
        batch.delete(key);
        self.write(batch, sync).await
    }

    /// The value of `key`, if any.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;

    /// The values of `keys`, in the same order.
    async fn multi_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, EngineError>;

    /// Up to `limit` pairs with `start <= key < end` (`end = None`: no upper
    /// bound), in key order.
    async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, EngineError>;

    /// A view of the engine as it is now, which later writes do not change.
    ///
    /// Errors: `Closed`, `Io`.
    async fn snapshot(&self) -> Result<Arc<dyn EngineSnapshot>, EngineError>;

    /// Approximate bytes the engine occupies on its volume.
    async fn approximate_size(&self) -> Result<u64, EngineError>;

    /// Counters since open.
    fn stats(&self) -> EngineStats;

    /// The position, in the shard's history on its volume, of the last
    /// write batch this engine's reads show (RocksDB: its latest sequence
    /// number; `SimEngine`: the log bytes it applied), comparable between
    /// engines opened on one shard; `None` where the engine keeps none
    /// (`MemEngine`). A batch whose write failed does not count, so a view
    /// opened later whose position is higher holds that batch.
    fn sequence(&self) -> Option<u64> {
        None
    }

    /// Closes the engine: later calls fail with `Closed`. Idempotent.
    async fn close(&self);

    /// A read-only engine catches up with what the read-write holder has
    /// made durable since (RocksDB: a secondary instance's
    /// `try_catch_up_with_primary`). A no-op for a read-write engine.
    async fn catch_up(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// How to open an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpenMode {
    /// Read-write; with `create`, make the engine when absent.
    ReadWrite {
        /// Create the engine when absent; false fails with `NotFound` instead.
        create: bool,
    },
    /// Read-only view (a backup's view of the primary's engine).
    ReadOnly,
}

/// Opens, lists and destroys engines under directories of a volume.
#[async_trait]
pub trait EngineFactory: Send + Sync + 'static {
    /// Opens the engine at `path`.
    ///
    /// Errors: `NotFound` (absent and not `create`), `Locked` (another
    /// read-write holder), `Io`, `Corruption` (recovery failed).
    async fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn Engine>, EngineError>;

    /// Whether an engine exists at `path`.
    async fn exists(&self, path: &Path) -> Result<bool, EngineError>;

    /// Removes the engine at `path` and all its files. The engine must be
    /// closed. A no-op when absent.
    async fn destroy(&self, path: &Path) -> Result<(), EngineError>;
}
