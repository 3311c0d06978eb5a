//! What many shards on one volume cost: for each N (default 1, 100, 1000)
//! a `ShardManager` over RocksDB (one shared memory budget) creates N shards
//! and writes one 100-byte record into each, synced. Printed per N: disk
//! allocated (filesystem blocks) against apparent size, per shard; this
//! process's resident memory, open files and the shared budget's use with
//! every shard open; how long a new manager over the same volume takes to
//! start; and the latency of a first read of a shard not open yet against a
//! read of an open one.
//!
//! Run: `cargo run -p attache-runtime --example shard_scale [-- --shards 1,100,1000 --budget-mib 64
//! --max-open-shards N --dir DIR]` (`--max-open-shards`: the manager's
//! limit, default none; `--dir`: where the volumes go, default a temp dir;
//! the disk figures are that filesystem's).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use attache_actors::actor::Addr;
use attache_actors::lease::LeaseGate;
use attache_actors::shard::{Get, Put, PutEntry};
use attache_actors::shard_manager::{CreateShard, ShardCall, ShardManager, ShardManagerConfig, ShutdownShards};
use attache_actors::HostHandle;
use attache_runtime::rocks_engine::MemoryBudget;
use attache_runtime::{ActixHost, RocksEngineFactory};

/// The `attache` binary's allocator, so the figures are those of a node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

/// (allocated, apparent) bytes of every file under `dir`.
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            let (a, b) = disk_usage(&entry.path());
            total = (total.0 + a, total.1 + b);
        } else {
            total = (total.0 + meta.blocks() * 512, total.1 + meta.len());
        }
    }
    total
}

/// This process's resident memory, bytes (`VmRSS`).
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn manager(host: &HostHandle, root: &Path, budget: &MemoryBudget) -> Addr<ShardManager> {
    let mut cfg = ShardManagerConfig::new("vol-1", root);
    cfg.max_open_shards = arg("--max-open-shards").map_or(0, |s| s.parse().expect("--max-open-shards takes a number"));
    let factory = Arc::new(RocksEngineFactory::with_memory_budget(budget.clone()));
    host.spawn(ShardManager::new(cfg, factory, Arc::new(LeaseGate::always_open())), 4096)
}

async fn read(mgr: &Addr<ShardManager>, shard: u64) -> Duration {
    let start = Instant::now();
    let get = Get { client_id: "scale".into(), key: b"key".to_vec() };
    let got = mgr.send(ShardCall { shard_id: shard, op: get }).await.unwrap().unwrap();
    assert!(got.is_some(), "shard {shard} lost its record");
    start.elapsed()
}

struct Row {
    shards: u64,
    allocated: u64,
    apparent: u64,
    rss: u64,
    /// Bytes charged to the shared memory budget with every shard open.
    budget: usize,
    files: usize,
    start_up: Duration,
    first_read: Duration,
    open_read: Duration,
}

async fn measure(host: &HostHandle, root: &Path, n: u64, budget: &MemoryBudget) -> Row {
    let (rss0, files0) = (resident(), open_files());
    let mgr = manager(host, root, budget);
    for shard in 1..=n {
        mgr.send(CreateShard { shard_id: shard, client_id: "scale".into(), size_limit: None }).await.unwrap().unwrap();
        let entry = PutEntry { key: b"key".to_vec(), value: vec![b'v'; 100], indexes: vec![] };
        let put = Put { client_id: "scale".into(), entry, request_id: None };
        mgr.send(ShardCall { shard_id: shard, op: put }).await.unwrap().unwrap();
    }
    let (allocated, apparent) = disk_usage(root);
    let (rss, files) = (resident().saturating_sub(rss0), open_files().saturating_sub(files0));
    let budget_used = budget.usage();
    mgr.send(ShutdownShards).await.unwrap();
    mgr.stop();
    // A new manager over the same volume: serving at once, shards open on
    // first use.
    let start = Instant::now();
    let mgr = manager(host, root, budget);
    let first_read = read(&mgr, n).await;
    let start_up = start.elapsed() - first_read;
    let open_read = read(&mgr, n).await;
    mgr.send(ShutdownShards).await.unwrap();
    mgr.stop();
    Row { shards: n, allocated, apparent, rss, budget: budget_used, files, start_up, first_read, open_read }
}

fn main() {
    let counts: Vec<u64> = arg("--shards")
        .unwrap_or_else(|| "1,100,1000".into())
        .split(',')
        .map(|s| s.parse().expect("--shards takes whole numbers, comma-separated"))
        .collect();
    let budget_mib: u64 = arg("--budget-mib").map_or(64, |s| s.parse().expect("--budget-mib takes a whole number"));
    let base = arg("--dir").map(PathBuf::from);
    let tmp = tempfile::tempdir_in(base.clone().unwrap_or_else(std::env::temp_dir)).unwrap();
    let (before, limit) = attache_runtime::files::raise_open_file_limit().unwrap();
    println!("open-file limit {limit:?} (was {before:?}); RocksDB memory budget {budget_mib} MiB");
    let budget = MemoryBudget::new(budget_mib << 20);
    let rows: Vec<Row> = actix_rt::System::new().block_on(async {
        let host = HostHandle::new(ActixHost::new(2));
        let mut rows = Vec::new();
        for &n in &counts {
            rows.push(measure(&host, &tmp.path().join(format!("n{n}")), n, &budget).await);
        }
        rows
    });
    println!(
        "{:>7} {:>12} {:>12} {:>11} {:>12} {:>11} {:>11} {:>7} {:>10} {:>10}",
        "shards",
        "allocated",
        "apparent",
        "alloc/shard",
        "rss+",
        "rss/shard",
        "budget",
        "files+",
        "start-up",
        "1st read"
    );
    for r in &rows {
        println!(
            "{:>7} {:>9} KB {:>9} KB {:>8} KB {:>9} KB {:>8} KB {:>8} KB {:>7} {:>7.1} ms {:>7.2} ms (open: {:.2} ms)",
            r.shards,
            r.allocated / 1024,
            r.apparent / 1024,
            r.allocated / r.shards / 1024,
            r.rss / 1024,
            r.rss / r.shards / 1024,
            r.budget / 1024,
            r.files,
            r.start_up.as_secs_f64() * 1e3,
            r.first_read.as_secs_f64() * 1e3,
            r.open_read.as_secs_f64() * 1e3,
        );
    }
    println!(
        "rss+ and files+: this process's growth once every shard was written (all open, or the most recent ones within the limit); budget: bytes charged to the {} KB budget \
         then (memtables and cached blocks); start-up: a new manager over the volume, serving; 1st read: of a \
         shard not open yet (open: once it is)",
        budget.bytes() / 1024
    );
}
