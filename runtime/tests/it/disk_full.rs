//! A full volume with real RocksDB (needs root to mount a tmpfs; without it
//! prints SKIPPED and passes): `attache meta` and one `attache node` whose
//! volume root is a 64 MiB tmpfs. Acknowledged writes first; then a file
//! fills the filesystem. Writes must then be refused with
//! `RESOURCE_EXHAUSTED` (or, for the one group commit that met `ENOSPC`,
//! answered with an unknown outcome), every acknowledged write must stay
//! readable while the volume is full, also after the node restarts on
//! it, and once the file is removed the
//! node must take writes again, with nothing acknowledged lost. The
//! simulation's `volume-full` scenario checks the same rules on every seed.

use crate::common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use attache_actors::client::{CallSpec, Client, ClientSettings, Outcome};
use attache_actors::service::proto::{GetRequest, NewShardRequest, PutRequest};
use tonic::Code;

/// The tmpfs mount; dropped, it unmounts it (lazily).
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A tmpfs of `size` at `at`, or why it cannot be had here.
fn mount_tmpfs(at: &Path, size: &str) -> Result<Tmpfs, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    std::fs::create_dir_all(at).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if !out.status.success() {
        return Err(format!("mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(Tmpfs(at.to_path_buf()))
}

/// Fills the filesystem holding `file` (1 MiB writes, then 4 KiB ones),
/// to `ENOSPC`; bounded by `max_bytes`.
fn fill(file: &Path, max_bytes: u64) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).unwrap();
    let mut written = 0u64;
    for chunk in [1usize << 20, 4 << 10] {
        let buf = vec![0xa5u8; chunk];
        while written < max_bytes {
            match f.write_all(&buf).and_then(|_| f.sync_data()) {
                Ok(()) => written += chunk as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", file.display()),
            }
        }
    }
    assert!(written < max_bytes, "{} never filled up", file.display());
}

/// Writes `key` = `value` (with a request id of its own, the same for its
/// retries): `Ok`, or the failure's code, whether it may have taken
/// effect, and its message.
async fn write(c: &Client, shard: u64, key: &str, value: &str) -> Result<(), (Code, bool, String)> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let req = PutRequest {
        shard_id: shard,
        client_id: "full".into(),
        key: key.into(),
        value: value.into(),
        indexes: vec![],
        request_id: format!("w{n}"),
    };
    c.call(CallSpec::shard(shard), move |mut c| {
        let r = req.clone();
        async move { c.put(r).await }
    })
    .await
    .map(|_| ())
    .map_err(|f| (f.status.code(), f.outcome != Outcome::Rejected, f.status.message().to_string()))
}

async fn read(c: &Client, shard: u64, key: &str) -> Option<String> {
    let served = c
        .call(CallSpec::shard(shard), |mut c| {
            let r = GetRequest {
                shard_id: shard,
                client_id: "full".into(),
                key: key.into(),
                consistency: 0,
                max_staleness_ms: 0,
            };
            async move { c.get(r).await }
        })
        .await
        .unwrap_or_else(|e| panic!("reading {key}: {:?} {}", e.status.code(), e.status.message()));
    let v = served.value;
    v.found.then(|| String::from_utf8(v.value).unwrap())
}

/// Every acknowledged write reads back; a write of unknown outcome reads
/// back as itself or as what was there before it.
async fn check_reads(c: &Client, shard: u64, acked: &BTreeMap<String, String>, unknown: &BTreeMap<String, String>) {
    for (key, value) in acked {
        assert_eq!(read(c, shard, key).await.as_deref(), Some(value.as_str()), "acknowledged {key} lost");
    }
    for (key, value) in unknown.iter().filter(|(k, _)| !acked.contains_key(*k)) {
        let got = read(c, shard, key).await;
        assert!(got.is_none() || got.as_deref() == Some(value.as_str()), "{key}: {got:?} was never written");
    }
}

#[actix_rt::test]
async fn a_full_volume_refuses_writes_serves_reads_and_recovers_when_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let volumes = root.join("volumes");
    let tmpfs = match mount_tmpfs(&volumes, "64m") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("SKIPPED a_full_volume_refuses_writes...: {why} (it needs root to mount a tmpfs)");
            return;
        }
    };
    let meta = common::start_meta(&root.join("meta"));
    let node = common::start_node_at(root, "node-1", &volumes, "vol-1", &format!("grpc://{}", meta.addr), &[]);
    let settings = ClientSettings { deadline_ms: 20_000, ..ClientSettings::default() };
    let c = Client::new(std::slice::from_ref(&node.addr), settings).unwrap();
    let shard = c
        .call(CallSpec::any().once().starting_at(0), |mut c| async move {
            c.new_shard(NewShardRequest { client_id: "full".into(), size_limit_bytes: 0 }).await
        })
        .await
        .unwrap()
        .value
        .shard_id;
    let mut acked = BTreeMap::new();
    let mut unknown = BTreeMap::new();
    for i in 0..50 {
        let (key, value) = (format!("k{i}"), format!("before-{i}"));
        write(&c, shard, &key, &value).await.unwrap();
        acked.insert(key, value);
    }

    // Fill the filesystem: writes go on into RocksDB's memtable and WAL
    // until the WAL cannot grow, then the volume refuses them.
    fill(&volumes.join("filler"), 128 << 20);
    let mut refused = None;
    for i in 0..5_000 {
        // Each key once, each value its own: an unknown outcome reads back
        // as this value or as nothing.
        let (key, value) = (format!("f{i}"), format!("{i}:{}", "x".repeat(1024)));
        match write(&c, shard, &key, &value).await {
            Ok(()) => {
                acked.insert(key, value);
            }
            Err((Code::ResourceExhausted, false, message)) => {
                refused = Some(message);
                break;
            }
            Err((code, true, message)) => {
                // The group commit that met ENOSPC: its outcome is unknown.
                eprintln!("{key}: unknown outcome, {code:?} {message}");
                unknown.insert(key, value);
            }
            Err((code, false, message)) => panic!("{key}: refused with {code:?}, not RESOURCE_EXHAUSTED: {message}"),
        }
    }
    let refused = refused.expect("a write was refused for want of space");
    assert!(refused.contains("no free space") || refused.contains("No space left"), "{refused}");
    eprintln!("refused: {refused}");

    // Full: every acknowledged write reads back, and writes stay refused.
    check_reads(&c, shard, &acked, &unknown).await;
    let again = write(&c, shard, "k0", "while-full").await.expect_err("a full volume takes no write");
    assert_eq!((again.0, again.1), (Code::ResourceExhausted, false), "{}", again.2);

    // A node that restarts on the full volume serves it the same way.
    let mut node = node;
    node.signal_and_wait(libc::SIGTERM).await;
    let node = common::start_node_at(root, "node-1", &volumes, "vol-1", &format!("grpc://{}", meta.addr), &[]);
    let c = Client::new(std::slice::from_ref(&node.addr), ClientSettings { deadline_ms: 20_000, ..Default::default() })
        .unwrap();
    check_reads(&c, shard, &acked, &unknown).await;
    let again = write(&c, shard, "k0", "while-full").await.expect_err("a full volume takes no write");
    assert_eq!((again.0, again.1), (Code::ResourceExhausted, false), "{}", again.2);

    // Space back: writes resume within seconds, and nothing acknowledged is lost.
    std::fs::remove_file(volumes.join("filler")).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match write(&c, shard, "k0", "after").await {
            Ok(()) => break,
            Err((Code::ResourceExhausted, false, _)) if Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no write within 30 s of space being freed: {e:?}"),
        }
    }
    acked.insert("k0".into(), "after".into());
    check_reads(&c, shard, &acked, &unknown).await;
    drop((node, meta, tmpfs));
}
