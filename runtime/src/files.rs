//! File-backed implementations of the small durable stores the actors see
//! through traits: a node's `LocalStore` (its data dir) and the embedded
//! metadata store's `MetaLog`. Every write is fsynced before it returns;
//! whole-file replacements are written to a temporary file, fsynced, renamed
//! into place and the directory fsynced, so a crash leaves the old or the new
//! contents, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use attache_actors::local_store::LocalStore;
use attache_actors::meta::embedded::MetaLog;
use attache_actors::meta::MetaError;

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `path` atomically and durably.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Bytes free for unprivileged writers on the filesystem holding `path`
/// (`statvfs`: `f_bavail * f_frsize`), or `None` when the call fails. It
/// blocks: callers run it on the blocking pool. Used by
/// `VolumeProvider::free_bytes`.
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    rustix::fs::statvfs(path).ok().map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// Raises this process's soft limit on open files to its hard limit, as
/// servers that keep many files open do at start (etcd, TiKV): each open
/// shard holds several (RocksDB's WAL, MANIFEST, info log, LOCK and its
/// table files). Returns the soft limit before and after; `None` stands
/// for unlimited.
///
/// Errors: the limit cannot be read or set.
pub fn raise_open_file_limit() -> std::io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        setrlimit(Resource::Nofile, Rlimit { current: before.maximum, maximum: before.maximum })?;
    }
    Ok((before.current, getrlimit(Resource::Nofile).current))
}

/// Runs `f` on tokio's blocking pool (file and device I/O blocks).
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("file I/O task panicked")
}

/// A node's data directory.
#[derive(Clone, Debug)]
pub struct FileLocalStore {
    dir: PathBuf,
}

impl FileLocalStore {
    /// The store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileLocalStore { dir: dir.into() }
    }
}

#[async_trait]
impl LocalStore for FileLocalStore {
    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        let path = self.dir.join(name);
        blocking(move || match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        })
        .await
    }

    async fn write(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let (path, bytes) = (self.dir.join(name), bytes.to_vec());
        blocking(move || replace_file(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))).await
    }
}

/// The embedded metadata store's log: one append-only file.
#[derive(Clone, Debug)]
pub struct FileMetaLog {
    path: PathBuf,
}

impl FileMetaLog {
    /// The log at `dir/metadata.log`.
    pub fn new(dir: &Path) -> Self {
        FileMetaLog { path: dir.join("metadata.log") }
    }
}

fn storage(path: &Path, e: std::io::Error) -> MetaError {
    MetaError::Storage(format!("{}: {e}", path.display()))
}

#[async_trait]
impl MetaLog for FileMetaLog {
    async fn load(&self) -> Result<Vec<u8>, MetaError> {
        let path = self.path.clone();
        blocking(move || match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(storage(&path, e)),
        })
        .await
    }

    async fn append(&self, bytes: &[u8]) -> Result<(), MetaError> {
        let (path, bytes) = (self.path.clone(), bytes.to_vec());
        blocking(move || {
            let mut f = OpenOptions::new().append(true).create(true).open(&path).map_err(|e| storage(&path, e))?;
            f.write_all(&bytes).map_err(|e| storage(&path, e))?;
            f.sync_data().map_err(|e| storage(&path, e))
        })
        .await
    }

    async fn replace(&self, bytes: &[u8]) -> Result<(), MetaError> {
        let (path, bytes) = (self.path.clone(), bytes.to_vec());
        blocking(move || replace_file(&path, &bytes).map_err(|e| storage(&path, e))).await
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// The kind of advisory lock [`flock_file`] takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Many holders at once (`LOCK_SH`), none while an exclusive one is held.
    Shared,
    /// One holder (`LOCK_EX`).
    Exclusive,
}

/// Takes an advisory lock (`flock(2)`) on `path` (created if missing),
/// held while the returned file is open. Locks taken through different
/// opens conflict even within one process. `wait`: how long to keep trying
/// (every millisecond) while a conflicting lock is held; `None` waits as
/// long as it takes.
///
/// Errors: `ErrorKind::WouldBlock` when `wait` ran out with a conflicting
/// lock still held; the open's or `flock`'s own errors.
pub fn flock_file(path: &Path, kind: LockKind, wait: Option<std::time::Duration>) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    let op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    };
    let Some(wait) = wait else {
        // SAFETY: flock on a file descriptor we own; no memory is shared.
        if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(file);
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock || std::time::Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Takes an exclusive advisory lock (`flock`) on `dir/LOCK`, held while the
/// returned file is open: one process per directory.
///
/// Errors: another process holds the lock, or the file cannot be opened.
pub fn lock_dir(dir: &Path) -> anyhow::Result<File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        anyhow::bail!(
            "{} is in use by another attache process: stop it, or give this one another directory",
            dir.display()
        );
    }
    Ok(file)
}
