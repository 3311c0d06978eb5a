//! `RocksEngine`: the [`Engine`] contract on RocksDB, with its WAL on.
//!
//! Every call runs on tokio's blocking pool (`spawn_blocking`), so an fsync
//! never stalls the actix arbiter that runs the shard actors. A synced write
//! uses RocksDB's `WriteOptions::set_sync(true)`: RocksDB fsyncs the WAL
//! before the write returns and before it is visible to readers, so a write
//! acknowledged to a client survives a crash of the process or the machine.
//! RocksDB's LOCK file keeps a second read-write holder out of a shard.
//! `snapshot` takes a RocksDB snapshot (the versions it sees stay readable
//! until it is released); `close` releases the live ones before it waits
//! for calls in flight.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use attache_actors::engine::{
    BatchOp, Engine, EngineCounters, EngineError, EngineFactory, EngineSnapshot, EngineStats, KvPairs, OpenMode,
    WriteBatch,
};
use rocksdb::{
    BlockBasedOptions, Cache, Direction, ErrorKind, IteratorMode, Options, ReadOptions, SnapshotWithThreadMode,
    WriteBufferManager, WriteOptions, DB,
};

/// How long `close` waits for calls still in flight to let go of the DB.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

fn engine_error(path: &Path, e: rocksdb::Error) -> EngineError {
    let detail = e.as_ref();
    // RocksDB's own words for a held LOCK file (not any path that says "lock").
    let locked = detail.contains("While lock file") || detail.contains("lock hold by current process");
    let msg = format!("{}: {detail}", path.display());
    match e.kind() {
        ErrorKind::Corruption => EngineError::Corruption(msg),
        ErrorKind::IOError if locked => EngineError::Locked(msg),
        ErrorKind::IOError if no_space(detail) => EngineError::NoSpace(msg),
        _ => EngineError::Io(msg),
    }
}

/// Whether a RocksDB error is `ENOSPC`, or `EDQUOT` (a filesystem quota
/// reached, which a node meets as it meets a full volume): RocksDB's POSIX
/// environment passes on strerror's words, "No space left on device" (its
/// `IOStatus::NoSpace`) and, for EDQUOT, "Disk quota exceeded" (glibc) or
/// "Quota exceeded" (musl); the subcode is not exposed by the Rust crate.
fn no_space(detail: &str) -> bool {
    detail.contains("No space left on device") || detail.contains("uota exceeded")
}

/// Memory that every shard a factory opens shares, so that a node's
/// RocksDB memory is bounded by configuration, not by its number of shards:
/// one LRU block cache of `bytes` (index and filter blocks included), and
/// RocksDB's write-buffer manager charging every memtable to that cache,
/// with memtables together held to half of it (writers stall while a flush
/// frees room). So memtables and cached blocks together stay near `bytes`
/// (RocksDB's "cost memtable memory to block cache" setup; its wiki,
/// "Write Buffer Manager"). Iterators pinning blocks, and RocksDB's own
/// per-DB structures, are outside it.
#[derive(Clone)]
pub struct MemoryBudget {
    bytes: usize,
    cache: Cache,
    write_buffers: WriteBufferManager,
}

impl std::fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBudget").field("bytes", &self.bytes).field("usage", &self.usage()).finish()
    }
}

/// Default node memory budget for RocksDB: 512 MiB.
pub const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 512 << 20;

/// The smallest memory budget a node accepts: 1 MiB.
pub const MIN_MEMORY_BUDGET_BYTES: u64 = 1 << 20;

/// Checks a configured memory budget of `bytes`.
///
/// Errors: a message naming the minimum, [`MIN_MEMORY_BUDGET_BYTES`].
pub fn check_memory_budget(bytes: u64) -> Result<(), String> {
    if bytes < MIN_MEMORY_BUDGET_BYTES {
        return Err(format!("memory_budget_bytes must be at least {MIN_MEMORY_BUDGET_BYTES} (1 MiB), not {bytes}"));
    }
    Ok(())
}

/// Table (SST) files one shard keeps open at most; with its WAL, MANIFEST,
/// info log, LOCK and directory, a shard holds at most about this many
/// descriptors plus 6.
pub const MAX_OPEN_TABLE_FILES: i32 = 64;

/// A shard's memtable is flushed at this size, or at a quarter of the
/// memory budget if less (RocksDB's default write buffer size).
const MAX_WRITE_BUFFER_BYTES: usize = 64 << 20;

impl MemoryBudget {
    /// A budget of `bytes` (raised to [`MIN_MEMORY_BUDGET_BYTES`] if less;
    /// configurations are checked by [`check_memory_budget`]).
    pub fn new(bytes: u64) -> Self {
        let bytes = usize::try_from(bytes.max(MIN_MEMORY_BUDGET_BYTES)).unwrap_or(usize::MAX);
        let cache = Cache::new_lru_cache(bytes);
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(bytes / 2, true, cache.clone());
        MemoryBudget { bytes, cache, write_buffers }
    }

    /// The budget, bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes charged to the budget now: memtables and cached blocks.
    pub fn usage(&self) -> usize {
        self.cache.get_usage()
    }

    /// Bytes of memtables now, all shards together.
    pub fn memtable_usage(&self) -> usize {
        self.write_buffers.get_usage()
    }
}

/// Opens RocksDB engines; see the module docs.
#[derive(Clone, Debug)]
pub struct RocksEngineFactory {
    budget: MemoryBudget,
}

impl Default for RocksEngineFactory {
    fn default() -> Self {
        Self::with_memory_budget(MemoryBudget::new(DEFAULT_MEMORY_BUDGET_BYTES))
    }
}

impl RocksEngineFactory {
    /// A factory with Attaché's RocksDB options and a memory budget of
    /// [`DEFAULT_MEMORY_BUDGET_BYTES`] of its own.
    pub fn new() -> Self {
        Self::default()
    }

    /// A factory whose engines share `budget`.
    pub fn with_memory_budget(budget: MemoryBudget) -> Self {
        RocksEngineFactory { budget }
    }

    /// Attaché's options. (RocksDB's default `avoid_flush_during_recovery =
    /// false` is relied on: see `write_now`.)
    ///
    /// Sized for many small shards per volume: no file is preallocated
    /// (`allow_fallocate=false`: RocksDB otherwise reserves 1.1 write
    /// buffers, ~70 MB, for each WAL), the MANIFEST grows in 64 KiB steps
    /// (not 4 MiB), and the info log keeps two files of at most 256 KiB.
    /// Durability is unchanged: every synced write still fsyncs its WAL.
    /// Memtables are charged to the node's shared write-buffer manager.
    fn options(&self, create: bool) -> Options {
        let mut opts = self.base_options(create);
        opts.set_write_buffer_manager(&self.budget.write_buffers);
        opts
    }

    /// As `options(false)`, for a read-only open: without the shared
    /// write-buffer manager. A read-only view's memtable (the WAL it
    /// replayed) never flushes, so charged to the manager it could only
    /// stall the writers of every shard of the node once such views held
    /// half the budget (found in review); each is bounded by about one
    /// write buffer (`MAX_WRITE_BUFFER_BYTES`) instead: its WAL holds what
    /// the writer had not flushed yet.
    fn read_only_options(&self) -> Options {
        self.base_options(false)
    }

    fn base_options(&self, create: bool) -> Options {
        // allow_fallocate has no setter in the Rust API; RocksDB's options
        // string sets it.
        let mut opts = Options::default()
            .get_options_from_string("allow_fallocate=false")
            .expect("a valid RocksDB options string");
        opts.create_if_missing(create);
        opts.create_missing_column_families(create);
        opts.set_max_background_jobs(2);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_manifest_preallocation_size(64 << 10);
        opts.set_keep_log_file_num(2);
        opts.set_max_log_file_size(256 << 10);
        opts.set_write_buffer_size(MAX_WRITE_BUFFER_BYTES.min(self.budget.bytes / 4));
        // Table files kept open per shard (RocksDB's default keeps them
        // all): bounds a large shard's descriptors; others open on demand.
        opts.set_max_open_files(MAX_OPEN_TABLE_FILES);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&self.budget.cache);
        table.set_cache_index_and_filter_blocks(true);
        // Whole-key Bloom filters in table files: a group commit reads the
        // record of every request id it writes, and the first attempt of a
        // request never finds one, nor a put of a new key its old record.
        // Without a filter each such miss reads an index and a data block
        // of every level that may hold the key. 10 bits per key: ~1% false
        // positives (RocksDB wiki, "RocksDB Bloom Filter"). (A memtable
        // filter, `memtable_prefix_bloom_size_ratio`, stalled the writers of
        // `shards_share_one_memory_budget` for good: left off.)
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        opts
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("RocksDB call panicked")
}

/// How long a write batch waits for the fence's shared lock, and
/// `LocalVolumes::acquire` for its exclusive one, before giving up.
pub use attache_actors::provider::FENCE_WAIT;

/// A storage fence on a local directory: the epoch a writer holds, checked
/// against the volume's epoch file before every write batch (see
/// `LocalVolumes`). The check and the write happen under a shared `flock` on
/// the volume's fence lock file, held until the batch and its sync return;
/// raising the epoch takes that lock exclusively. So a batch of epoch `e`
/// either ends before a newer epoch is written, or is checked after it and
/// fails: a writer paused between its check and its write holds the newer
/// epoch back until it is done (`local_volumes` tests).
#[derive(Clone, Debug)]
pub struct Fence {
    /// The volume's epoch file.
    pub file: PathBuf,
    /// The volume's fence lock file.
    pub lock: PathBuf,
    /// The epoch this engine writes at.
    pub epoch: u64,
}

/// The fence held for one write batch ([`Fence::hold`]); dropping it lets
/// a newer epoch be taken.
#[derive(Debug)]
pub struct FenceHold {
    _lock: std::fs::File,
}

impl Fence {
    /// Holds the fence for one write batch: takes the shared lock (waiting
    /// up to [`FENCE_WAIT`] while an epoch is being raised), then checks
    /// the epoch file. Keep the answer until the write and its sync return.
    ///
    /// Errors: `Fenced` when the volume's epoch file names another epoch;
    /// `Corruption` when it holds no epoch; `Io` when a file cannot be read
    /// or the lock is not had in time. Nothing is written on an error.
    pub fn hold(&self) -> Result<FenceHold, EngineError> {
        let lock = crate::files::flock_file(&self.lock, crate::files::LockKind::Shared, Some(FENCE_WAIT))
            .map_err(|e| EngineError::Io(format!("{}: {e}", self.lock.display())))?;
        let text = std::fs::read_to_string(&self.file)
            .map_err(|e| EngineError::Io(format!("{}: {e}", self.file.display())))?;
        match text.trim().parse::<u64>() {
            Ok(e) if e == self.epoch => Ok(FenceHold { _lock: lock }),
            Ok(e) => Err(EngineError::Fenced(format!("volume epoch is {e}, this writer's is {}", self.epoch))),
            Err(_) => Err(EngineError::Corruption(format!("{} holds {text:?}, not an epoch", self.file.display()))),
        }
    }
}

/// Test hooks: a function the next write batch calls right after its fence
/// check passed, for writers whose epoch file is the key (to pause a writer there).
#[cfg(test)]
pub(crate) mod hooks {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    type Hook = Arc<dyn Fn() + Send + Sync>;
    static AFTER_FENCE_CHECK: Mutex<BTreeMap<PathBuf, Hook>> = Mutex::new(BTreeMap::new());

    /// Calls `hook` after the next passed fence check of a writer fenced by `epoch_file`.
    pub(crate) fn set_after_fence_check(epoch_file: PathBuf, hook: Hook) {
        AFTER_FENCE_CHECK.lock().unwrap().insert(epoch_file, hook);
    }

    /// Runs (once) the hook set for `epoch_file`, if any.
    pub(crate) fn after_fence_check(epoch_file: &std::path::Path) {
        let hook = AFTER_FENCE_CHECK.lock().unwrap().remove(epoch_file);
        if let Some(hook) = hook {
            hook();
        }
    }
}

impl RocksEngineFactory {
    /// Opens the engine at `path`; with a `fence`, every write batch first
    /// checks it. Errors: as `EngineFactory::open`.
    pub async fn open_fenced(
        &self,
        path: &Path,
        mode: OpenMode,
        fence: Option<Fence>,
    ) -> Result<Arc<dyn Engine>, EngineError> {
        let path = path.to_path_buf();
        let this = self.clone();
        blocking(move || {
            let options = |create| this.options(create);
            let db = match mode {
                OpenMode::ReadWrite { create } => {
                    if create {
                        std::fs::create_dir_all(&path)
                            .map_err(|e| EngineError::Io(format!("{}: {e}", path.display())))?;
                    } else if !path.join("CURRENT").exists() {
                        return Err(EngineError::NotFound(path.display().to_string()));
                    }
                    DB::open(&options(create), &path)
                }
                OpenMode::ReadOnly => {
                    if !path.join("CURRENT").exists() {
                        return Err(EngineError::NotFound(path.display().to_string()));
                    }
                    DB::open_for_read_only(&this.read_only_options(), &path, false)
                }
            }
            .map_err(|e| engine_error(&path, e))?;
            let engine: Arc<dyn Engine> = Arc::new(RocksEngine {
                db: RwLock::new(Some(Arc::new(db))),
                snapshots: Default::default(),
                path,
                read_only: mode == OpenMode::ReadOnly,
                counters: Arc::new(EngineCounters::default()),
                fence,
                factory: this.clone(),
            });
            Ok(engine)
        })
        .await
    }
}

#[async_trait]
impl EngineFactory for RocksEngineFactory {
    async fn open(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn Engine>, EngineError> {
        self.open_fenced(path, mode, None).await
    }

    async fn exists(&self, path: &Path) -> Result<bool, EngineError> {
        Ok(path.join("CURRENT").exists())
    }

    async fn destroy(&self, path: &Path) -> Result<(), EngineError> {
        let path = path.to_path_buf();
        let this = self.clone();
        blocking(move || {
            if !path.exists() {
                return Ok(());
            }
            DB::destroy(&this.options(false), &path).map_err(|e| engine_error(&path, e))?;
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(EngineError::Io(format!("{}: {e}", path.display())))
                }
                _ => Ok(()),
            }
        })
        .await
    }
}

/// One RocksDB database; see the module docs.
pub struct RocksEngine {
    db: RwLock<Option<Arc<DB>>>,
    /// Snapshots taken and maybe still held, released by `close`.
    snapshots: std::sync::Mutex<Vec<std::sync::Weak<SlotCell>>>,
    path: PathBuf,
    read_only: bool,
    counters: Arc<EngineCounters>,
    fence: Option<Fence>,
    /// The factory that opened it: its options, for a read-only reopen.
    factory: RocksEngineFactory,
}

impl RocksEngine {
    fn db(&self) -> Result<Arc<DB>, EngineError> {
        self.db.read().expect("rocks engine lock").clone().ok_or(EngineError::Closed)
    }
}

/// A RocksDB snapshot borrowing the DB it belongs to.
type DbSnapshot<'a> = SnapshotWithThreadMode<'a, DB>;

self_cell::self_cell!(
    /// A RocksDB snapshot together with the DB handle it borrows, so it can
    /// outlive the call that took it (a scan's later pages); dropping it
    /// releases the snapshot, then the handle.
    struct HeldSnapshot {
        owner: Arc<DB>,
        #[covariant]
        dependent: DbSnapshot,
    }
);

/// A live snapshot; `None` once its engine closed (which released it).
type SlotCell = std::sync::Mutex<Option<HeldSnapshot>>;
/// A snapshot's slot, shared by the snapshot and (weakly) its engine.
type SnapshotSlot = Arc<SlotCell>;

/// The engine's view at one instant (`Engine::snapshot`): a RocksDB snapshot,
/// which pins the data versions it sees until released. `RocksEngine::close`
/// releases every live one first, so a scan still streaming never holds the
/// DB (and its LOCK) open.
struct RocksSnapshot {
    slot: SnapshotSlot,
    path: PathBuf,
    counters: Arc<EngineCounters>,
}

#[async_trait]
impl EngineSnapshot for RocksSnapshot {
    async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, EngineError> {
        let (slot, path, counters) = (self.slot.clone(), self.path.clone(), self.counters.clone());
        let (start, end) = (start.to_vec(), end.map(<[u8]>::to_vec));
        blocking(move || {
            let held = slot.lock().expect("rocks snapshot lock");
            let Some(held) = held.as_ref() else { return Err(EngineError::Closed) };
            scan_range(&start, end, limit, &path, &counters, |mode, ro| held.borrow_dependent().iterator_opt(mode, ro))
        })
        .await
    }
}

/// Up to `limit` pairs with `start <= key < end` (`end = None`: no upper
/// bound), counted as reads, from the iterator `iterate` opens at a mode and
/// read options: the DB's own, or a snapshot's.
fn scan_range<I>(
    start: &[u8],
    end: Option<Vec<u8>>,
    limit: usize,
    path: &Path,
    counters: &EngineCounters,
    iterate: impl FnOnce(IteratorMode<'_>, ReadOptions) -> I,
) -> Result<KvPairs, EngineError>
where
    I: Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>>,
{
    if end.as_ref().is_some_and(|end| end.as_slice() <= start) {
        return Ok(Vec::new());
    }
    let mut ro = ReadOptions::default();
    if let Some(end) = end {
        ro.set_iterate_upper_bound(end);
    }
    let mut pairs = Vec::new();
    let mut bytes = 0;
    for item in iterate(IteratorMode::From(start, Direction::Forward), ro).take(limit) {
        let (k, v) = item.map_err(|e| engine_error(path, e))?;
        bytes += (k.len() + v.len()) as u64;
        pairs.push((k.into_vec(), v.into_vec()));
    }
    counters.read(pairs.len() as u64, bytes);
    Ok(pairs)
}

/// Writes `batch` to `db` (on the calling thread: callers are on the blocking
/// pool), holding the fence (when there is one) until it returns.
fn write_now(
    db: &DB,
    path: &Path,
    counters: &EngineCounters,
    fence: Option<&Fence>,
    batch: &WriteBatch,
    sync: bool,
) -> Result<(), EngineError> {
    // Held until the write (and its sync) returns: see `Fence`.
    let _held = fence.map(Fence::hold).transpose()?;
    #[cfg(test)]
    if let Some(f) = fence {
        hooks::after_fence_check(&f.file);
    }
    let mut rb = rocksdb::WriteBatch::default();
    for op in batch.ops() {
        match op {
            BatchOp::Put { key, value } => rb.put(key, value),
            BatchOp::Delete { key } => rb.delete(key),
        }
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(sync);
    // Past the fence check, whatever the error (a WAL write or fsync error,
    // a background error from an earlier one), the batch may be in the WAL,
    // to be replayed on the next open: the outcome is unknown. (Recovery
    // flushes what it replays to a synced table file, RocksDB's default
    // `avoid_flush_during_recovery = false`, so a replayed batch that was
    // only in the page cache is made durable before it is served.)
    // A full volume is told apart (the shard then reopens read-only, not
    // the volume given up): RocksDB stops writing after it, and the batch
    // may be in the WAL all the same.
    db.write_opt(rb, &wo).map_err(|e| {
        let msg = format!("{}: {}", path.display(), e.as_ref());
        if no_space(e.as_ref()) {
            EngineError::NoSpace(msg)
        } else {
            EngineError::Indeterminate(msg)
        }
    })?;
    counters.wrote(batch);
    Ok(())
}

/// Reads `keys` from `db` (on the calling thread).
fn multi_get_now(
    db: &DB,
    path: &Path,
    counters: &EngineCounters,
    keys: &[Vec<u8>],
) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
    let values = db.multi_get(keys).into_iter().collect::<Result<Vec<_>, _>>().map_err(|e| engine_error(path, e))?;
    let bytes = keys.iter().zip(&values).map(|(k, v)| v.as_ref().map_or(0, |v| k.len() + v.len()) as u64).sum();
    counters.read(keys.len() as u64, bytes);
    Ok(values)
}

#[async_trait]
impl Engine for RocksEngine {
    async fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        if self.read_only {
            return Err(EngineError::ReadOnly);
        }
        let (db, path, counters, fence) = (self.db()?, self.path.clone(), self.counters.clone(), self.fence.clone());
        blocking(move || write_now(&db, &path, &counters, fence.as_ref(), &batch, sync)).await
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        let (db, path, counters, key) = (self.db()?, self.path.clone(), self.counters.clone(), key.to_vec());
        blocking(move || {
            let value = db.get(&key).map_err(|e| engine_error(&path, e))?;
            counters.read(1, value.as_ref().map_or(0, |v| (key.len() + v.len()) as u64));
            Ok(value)
        })
        .await
    }

    async fn multi_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        let (db, path, counters) = (self.db()?, self.path.clone(), self.counters.clone());
        blocking(move || multi_get_now(&db, &path, &counters, &keys)).await
    }

    async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, EngineError> {
        let (db, path, counters) = (self.db()?, self.path.clone(), self.counters.clone());
        let (start, end) = (start.to_vec(), end.map(<[u8]>::to_vec));
        blocking(move || scan_range(&start, end, limit, &path, &counters, |mode, ro| db.iterator_opt(mode, ro))).await
    }

    async fn snapshot(&self) -> Result<Arc<dyn EngineSnapshot>, EngineError> {
        let db = self.db()?;
        let held = blocking(move || HeldSnapshot::new(db, |db| db.snapshot())).await;
        let slot: SnapshotSlot = Arc::new(std::sync::Mutex::new(Some(held)));
        {
            // Registered under the lock `close` takes before it takes the DB:
            // either `close` sees this snapshot and releases it, or this sees
            // the engine closed (a close may have run while the snapshot was
            // being taken).
            let mut live = self.snapshots.lock().expect("rocks snapshots lock");
            if self.db.read().expect("rocks engine lock").is_some() {
                live.retain(|w| w.strong_count() > 0);
                live.push(Arc::downgrade(&slot));
                return Ok(Arc::new(RocksSnapshot { slot, path: self.path.clone(), counters: self.counters.clone() }));
            }
        }
        // Released off the async threads: it may hold the last DB handle.
        blocking(move || drop(slot)).await;
        Err(EngineError::Closed)
    }

    async fn approximate_size(&self) -> Result<u64, EngineError> {
        let (db, path) = (self.db()?, self.path.clone());
        blocking(move || {
            let prop = |name: &str| db.property_int_value(name).map(Option::unwrap_or_default);
            Ok(prop("rocksdb.total-sst-files-size").map_err(|e| engine_error(&path, e))?
                + prop("rocksdb.cur-size-all-mem-tables").map_err(|e| engine_error(&path, e))?)
        })
        .await
    }

    fn stats(&self) -> EngineStats {
        let keys = self
            .db
            .read()
            .expect("rocks engine lock")
            .as_ref()
            .and_then(|db| db.property_int_value("rocksdb.estimate-num-keys").ok().flatten())
            .unwrap_or(0);
        self.counters.snapshot(keys)
    }

    /// RocksDB's latest sequence number (a failed write does not advance it).
    fn sequence(&self) -> Option<u64> {
        self.db.read().expect("rocks engine lock").as_ref().map(|db| db.latest_sequence_number())
    }

    /// A read-only engine reopens the database: opening read-only replays the
    /// WAL, so the new view holds everything the primary synced. (A RocksDB
    /// secondary instance's `try_catch_up_with_primary` would be cheaper, but
    /// it missed a synced write still in the live WAL in our test, as
    /// facebook/rocksdb#14444 reports for other cases.)
    async fn catch_up(&self) -> Result<(), EngineError> {
        if !self.read_only {
            return Ok(());
        }
        let (path, factory) = (self.path.clone(), self.factory.clone());
        let fresh = blocking(move || {
            DB::open_for_read_only(&factory.read_only_options(), &path, false).map_err(|e| engine_error(&path, e))
        })
        .await?;
        let mut db = self.db.write().expect("rocks engine lock");
        if db.is_some() {
            *db = Some(Arc::new(fresh));
        }
        Ok(())
    }

    async fn close(&self) {
        // The snapshot list's lock first, then the DB's (as `snapshot`), so a
        // snapshot being taken now is either in the list or sees the close.
        let (db, live) = {
            let mut live = self.snapshots.lock().expect("rocks snapshots lock");
            let db = self.db.write().expect("rocks engine lock").take();
            (db, std::mem::take(&mut *live))
        };
        let Some(db) = db else {
            return;
        };
        // Release every live snapshot: each holds the DB.
        let slots: Vec<SnapshotSlot> = live.iter().filter_map(std::sync::Weak::upgrade).collect();
        blocking(move || {
            for slot in slots {
                slot.lock().expect("rocks snapshot lock").take();
            }
        })
        .await;
        let weak = Arc::downgrade(&db);
        // Dropped on the blocking pool: RocksDB's destructor waits for its
        // background flushes and compactions, which must not stall the
        // actor thread.
        blocking(move || drop(db)).await;
        // Calls in flight hold the DB; it closes (and releases its LOCK) when the last one ends.
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        while weak.strong_count() > 0 {
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(path = %self.path.display(), "RocksDB still in use {CLOSE_WAIT:?} after close");
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    /// ENOSPC and EDQUOT, in the words RocksDB's POSIX environment
    /// reports them, are a full volume; other I/O errors are not.
    #[test]
    fn a_full_volume_and_a_reached_quota_are_no_space() {
        let enospc =
            "IO error: No space left on device: While appending to file: /v/s/000012.log: No space left on device";
        let edquot = "IO error: While appending to file: /v/s/000012.log: Disk quota exceeded";
        let musl = "IO error: While appending to file: /v/s/000012.log: Quota exceeded";
        assert!(super::no_space(enospc) && super::no_space(edquot) && super::no_space(musl));
        assert!(!super::no_space("IO error: While fsync: /v/s/000012.log: Input/output error"));
    }

    use super::*;

    /// Bytes the filesystem allocated under `dir` (blocks, not apparent sizes).
    fn allocated(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().blocks() * 512).sum()
    }

    /// A shard holding one small record takes well under 1 MB of disk
    /// (RocksDB preallocated ~70 MB of WAL per shard before), open and
    /// after a restart, and the record is durable.
    #[actix_rt::test]
    async fn a_tiny_shard_allocates_less_than_a_megabyte() {
        let dir = tempfile::tempdir().unwrap();
        let f = RocksEngineFactory::new();
        let e = f.open(dir.path(), OpenMode::ReadWrite { create: true }).await.unwrap();
        e.put(b"key", &[7u8; 100], true).await.unwrap();
        let open = allocated(dir.path());
        assert!(open < 1 << 20, "{open} bytes allocated for one 100-byte record");
        e.close().await;
        let again = f.open(dir.path(), OpenMode::ReadWrite { create: false }).await.unwrap();
        assert_eq!(again.get(b"key").await.unwrap(), Some(vec![7u8; 100]));
        let reopened = allocated(dir.path());
        assert!(reopened < 1 << 20, "{reopened} bytes allocated after a reopen");
        again.close().await;
    }

    /// Writes spread over many shards keep their memtables within half the
    /// shared budget (flushing, and stalling writers meanwhile) and the
    /// budget's total usage near its size, whatever the number of shards.
    #[actix_rt::test]
    async fn shards_share_one_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let budget = MemoryBudget::new(8 << 20);
        let f = RocksEngineFactory::with_memory_budget(budget.clone());
        let mut engines = Vec::new();
        for i in 0..16 {
            engines
                .push(f.open(&dir.path().join(format!("s{i}")), OpenMode::ReadWrite { create: true }).await.unwrap());
        }
        let value = vec![1u8; 32 << 10];
        let mut most = 0;
        for round in 0..32u32 {
            for e in &engines {
                e.put(&round.to_be_bytes(), &value, false).await.unwrap();
            }
            most = most.max(budget.memtable_usage());
        }
        // 16 MiB written; memtables held near 4 MiB (a flush frees one
        // shard's memtable at a time, so allow one write buffer more).
        assert!(most <= 6 << 20, "memtables reached {most} bytes with a budget of 8 MiB");
        assert!(budget.usage() <= 10 << 20, "{} bytes charged to a budget of 8 MiB", budget.usage());
        let flushed = (0..16).filter(|i| {
            std::fs::read_dir(dir.path().join(format!("s{i}")))
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".sst"))
        });
        assert!(flushed.count() > 0, "no shard flushed a memtable");
        for e in engines {
            assert_eq!(e.get(&31u32.to_be_bytes()).await.unwrap(), Some(value.clone()));
            e.close().await;
        }
    }

    #[actix_rt::test]
    async fn a_read_only_view_catches_up_with_the_primary() {
        let dir = tempfile::tempdir().unwrap();
        let f = RocksEngineFactory::new();
        let w = f.open(dir.path(), OpenMode::ReadWrite { create: true }).await.unwrap();
        w.put(b"a", b"1", true).await.unwrap();
        let r = f.open(dir.path(), OpenMode::ReadOnly).await.unwrap();
        assert_eq!(r.get(b"a").await.unwrap(), Some(b"1".to_vec()));
        w.put(b"b", b"2", true).await.unwrap();
        r.catch_up().await.unwrap();
        assert_eq!(r.get(b"b").await.unwrap(), Some(b"2".to_vec()));
        assert!(matches!(r.put(b"c", b"3", true).await, Err(EngineError::ReadOnly)));
        r.close().await;
        w.close().await;
    }

    #[actix_rt::test]
    async fn a_snapshot_reads_one_instant_and_ends_with_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let f = RocksEngineFactory::new();
        let e = f.open(dir.path(), OpenMode::ReadWrite { create: true }).await.unwrap();
        e.put(b"a", b"1", true).await.unwrap();
        e.put(b"b", b"1", true).await.unwrap();
        let snap = e.snapshot().await.unwrap();
        e.put(b"a", b"2", true).await.unwrap();
        e.delete(b"b", true).await.unwrap();
        e.put(b"c", b"2", true).await.unwrap();
        let then = vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"1".to_vec())];
        assert_eq!(snap.scan(b"", None, 10).await.unwrap(), then);
        assert_eq!(snap.scan(b"b", None, 10).await.unwrap(), then[1..].to_vec(), "a later page of the same view");
        assert_eq!(e.scan(b"", None, 10).await.unwrap().len(), 2, "the engine itself moved on (a=2, c=2)");
        // Close releases the held snapshot at once rather than waiting for it.
        let t = std::time::Instant::now();
        e.close().await;
        assert!(t.elapsed() < Duration::from_secs(5), "close waited {:?} for a held snapshot", t.elapsed());
        assert!(matches!(snap.scan(b"", None, 10).await, Err(EngineError::Closed)));
        // The DB (and its LOCK) is gone: it opens read-write again.
        let again = f.open(dir.path(), OpenMode::ReadWrite { create: false }).await.unwrap();
        assert_eq!(again.get(b"c").await.unwrap(), Some(b"2".to_vec()));
        again.close().await;
    }
}
