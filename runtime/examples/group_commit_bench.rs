//! Durable puts per second for one shard, with 1, 16 and 128 concurrent
//! writers, next to raw RocksDB in the same run doing one synced put per write
//! and synced batches of 100, and synced batches of 64 in the shard's own
//! record layout (per put: the record and its request id's two records
//! written, the record and the request id read first, as a group commit
//! does; see `attache_actors::shard::commit`). Keys are 16 bytes, values 100
//! bytes. Every figure counts only acknowledged (WAL-synced) writes.
//!
//! The columns "vs synced batch" and "vs one sync/put" compare with the two
//! raw baselines of the same run (the performance targets for 128 writers:
//! at least 0.5x and at least 25x). The same-layout row shows how much of
//! the gap is the layout (three records written and two read per put, for
//! exactly-once retries and size accounting) rather than the shard actors,
//! and the data-records-only row (one record read and written per put,
//! synced batches) how much of that is the request ids' records.
//!
//! Run: `cargo run -p attache-runtime --example group_commit_bench [-- --scale 2]`
//! (the workspace's one profile optimizes dependencies and RocksDB; see
//! DEVELOPERS.md). `--scale` multiplies the number of writes per case.

use std::sync::Arc;
use std::time::Instant;

use attache_actors::lease::LeaseGate;
use attache_actors::shard::{Put, PutEntry, Stats};
use attache_actors::shard_manager::{CreateShard, ShardCall, ShardManager, ShardManagerConfig, ShutdownShards};
use attache_actors::HostHandle;
use attache_runtime::{ActixHost, RocksEngineFactory};

/// The `attache` binary's allocator, so the figures are those of a node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VALUE: [u8; 100] = [b'v'; 100];

fn key(i: u64) -> Vec<u8> {
    format!("{i:016}").into_bytes()
}

struct Row {
    case: String,
    puts: u64,
    secs: f64,
    /// Average writes per WAL sync.
    per_sync: f64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.puts as f64 / self.secs
    }
}

/// A RocksDB with default options in `dir`, and write options that sync.
fn open_synced(dir: &std::path::Path) -> (rocksdb::DB, rocksdb::WriteOptions) {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    (rocksdb::DB::open(&opts, dir).unwrap(), wo)
}

fn raw_rocksdb(dir: &std::path::Path, puts: u64, batch: u64) -> Row {
    let (db, wo) = open_synced(dir);
    let start = Instant::now();
    let mut i = 0;
    while i < puts {
        let mut wb = rocksdb::WriteBatch::default();
        for _ in 0..batch {
            wb.put(key(i), VALUE);
            i += 1;
        }
        db.write_opt(wb, &wo).unwrap();
    }
    let case = if batch == 1 {
        "raw RocksDB, one synced put per write".into()
    } else {
        format!("raw RocksDB, synced batches of {batch}")
    };
    Row { case, puts, secs: start.elapsed().as_secs_f64(), per_sync: batch as f64 }
}

/// Synced batches of `batch` puts in the shard's layout: for each put, the
/// data record and (with `request_ids`) the request id read (one multi-get
/// per batch), then the record and the id's two records written in key
/// order, as `commit::prepare_group` builds them. Without `request_ids`,
/// what the layout would cost with no at-most-once records: the ceiling
/// for any change to how request ids are kept.
fn raw_shard_layout(dir: &std::path::Path, puts: u64, batch: u64, request_ids: bool) -> Row {
    use attache_actors::shard::layout;
    let (db, wo) = open_synced(dir);
    let start = Instant::now();
    let mut i = 0;
    while i < puts {
        let ids: Vec<String> = if request_ids { (i..i + batch).map(|n| format!("{n:032x}")).collect() } else { vec![] };
        let mut reads: Vec<Vec<u8>> = (i..i + batch).map(|n| layout::data_key(&key(n))).collect();
        reads.extend(ids.iter().map(|id| layout::request_key(id)));
        reads.sort();
        for r in db.multi_get(&reads) {
            r.unwrap();
        }
        let mut records = Vec::with_capacity(3 * batch as usize);
        for n in i..i + batch {
            records.push((layout::data_key(&key(n)), layout::encode_record(&VALUE, &[])));
        }
        for id in &ids {
            records.push((layout::request_key(id), 1u64.to_be_bytes().to_vec()));
            records.push((layout::request_time_key(1, id), Vec::new()));
        }
        // In key order, as a group commit's batch is (`WriteBatch::sort_by_key`).
        records.sort();
        let mut wb = rocksdb::WriteBatch::default();
        for (k, v) in records {
            wb.put(k, v);
        }
        db.write_opt(wb, &wo).unwrap();
        i += batch;
    }
    let case = if request_ids {
        format!("raw RocksDB, shard layout, synced batches of {batch}")
    } else {
        format!("raw RocksDB, data records only, synced batches of {batch}")
    };
    Row { case, puts, secs: start.elapsed().as_secs_f64(), per_sync: batch as f64 }
}

async fn shard_writers(host: &HostHandle, dir: &std::path::Path, writers: u64, per_writer: u64) -> Row {
    let cfg = ShardManagerConfig::new("bench", dir);
    let mgr = host
        .spawn(ShardManager::new(cfg, Arc::new(RocksEngineFactory::new()), Arc::new(LeaseGate::always_open())), 4096);
    mgr.send(CreateShard { shard_id: 1, client_id: "bench".into(), size_limit: None }).await.unwrap().unwrap();
    let start = Instant::now();
    let tasks = (0..writers).map(|w| {
        let mgr = mgr.clone();
        async move {
            for i in 0..per_writer {
                let entry = PutEntry { key: key(w * per_writer + i), value: VALUE.to_vec(), indexes: vec![] };
                // As the client sends them: each write with its request id.
                let put = Put { client_id: "bench".into(), entry, request_id: Some(format!("{w:016x}{i:016x}")) };
                mgr.send(ShardCall { shard_id: 1, op: put }).await.unwrap().unwrap();
            }
        }
    });
    futures::future::join_all(tasks).await;
    let secs = start.elapsed().as_secs_f64();
    let stats = mgr.send(ShardCall { shard_id: 1, op: Stats { client_id: "bench".into() } }).await.unwrap().unwrap();
    let per_sync = stats.committed_ops as f64 / stats.group_commits.max(1) as f64;
    mgr.send(ShutdownShards).await.unwrap();
    mgr.stop();
    Row { case: format!("Attaché shard, {writers} concurrent writers"), puts: writers * per_writer, secs, per_sync }
}

fn main() {
    let scale: u64 = std::env::args()
        .skip_while(|a| a != "--scale")
        .nth(1)
        .map(|s| s.parse().expect("--scale takes a whole number"))
        .unwrap_or(1);
    let root = tempfile::tempdir().unwrap();
    let mut rows = vec![
        raw_rocksdb(&root.path().join("raw-1"), 1000 * scale, 1),
        raw_rocksdb(&root.path().join("raw-100"), 50_000 * scale, 100),
        raw_shard_layout(&root.path().join("raw-layout-64"), 51_200 * scale, 64, true),
        raw_shard_layout(&root.path().join("raw-data-64"), 51_200 * scale, 64, false),
    ];
    actix_rt::System::new().block_on(async {
        let host = HostHandle::new(ActixHost::new(2));
        for (writers, per_writer) in [(1, 1000), (16, 500), (128, 400)] {
            let dir = root.path().join(format!("shard-{writers}"));
            rows.push(shard_writers(&host, &dir, writers, per_writer * scale).await);
        }
    });
    // The two baselines of the same run: synced batches of 100, and one
    // synced put per write (what a write costs with no group commit).
    let (baseline, one_sync) = (rows[1].rate(), rows[0].rate());
    println!("durable puts/s, 16-byte keys, 100-byte values, one shard (temp dir on this machine's disk)");
    println!(
        "{:<52} {:>8} {:>8} {:>10} {:>16} {:>15} {:>10}",
        "case", "puts", "seconds", "puts/s", "vs synced batch", "vs one sync/put", "puts/sync"
    );
    for row in &rows {
        println!(
            "{:<52} {:>8} {:>8.2} {:>10.0} {:>15.2}x {:>14.1}x {:>10.1}",
            row.case,
            row.puts,
            row.secs,
            row.rate(),
            row.rate() / baseline,
            row.rate() / one_sync,
            row.per_sync
        );
    }
}
