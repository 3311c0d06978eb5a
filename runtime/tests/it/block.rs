//! Block volumes with real processes, on a loop device (needs root and loop
//! devices; without them it prints SKIPPED and passes): `attache meta` and two `attache node` processes in
//! `--volume-mode block` sharing one device, each mounting it under its own
//! volume root. Create a shard and write through the first node (which
//! formats the blank device and mounts it), restart it and read the write
//! back; start the second, which stays unmounted and answers a stale read
//! with a hint to the primary; stop the first with SIGSTOP past its lease:
//! the second takes over (mounts, raises the EPOCH file) and serves; resume
//! the first: it steps down and unmounts, the new primary takes the next
//! write, and the last acknowledged write is what a read returns.
//!
//! The fence here is the EPOCH file (`--volume-fence epoch-file`): loop
//! devices have no NVMe reservations, and both processes share one machine.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use attache_actors::client::{CallSpec, Client, ClientSettings};
use attache_actors::service::proto::{GetRequest, NewShardRequest, PutRequest};
use attache_runtime::block_volumes::is_mount_point;

/// The loop device and the mount points made on it; dropped last, it
/// unmounts them (lazily) and detaches the device.
struct LoopDevice {
    dev: String,
    mounts: Vec<PathBuf>,
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = Command::new("umount").arg("-l").arg(m).stderr(std::process::Stdio::null()).status();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Why this machine cannot run the test, if it cannot.
fn missing_needs() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control".into());
    }
    for tool in ["losetup", "mkfs.ext4", "blkid", "umount"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn start_node(root: &Path, name: &str, device: &str, metadata: &str) -> common::Proc {
    let devices = format!("vol-1={device}");
    let block = [
        "--lease-ttl-ms",
        "2000",
        "--volume-mode",
        "block",
        "--volume-devices",
        &devices,
        "--format-new-volumes",
        "--volume-fence",
        "epoch-file",
    ];
    common::start_node_at(root, name, &root.join(format!("mnt-{name}")), "vol-1", metadata, &block)
}

fn put(shard: u64, key: &str, value: &str) -> PutRequest {
    PutRequest {
        shard_id: shard,
        client_id: "block".into(),
        key: key.into(),
        value: value.into(),
        indexes: vec![],
        request_id: format!("{key}-{value}"),
    }
}

fn get(shard: u64, key: &str, consistency: i32) -> GetRequest {
    GetRequest { shard_id: shard, client_id: "block".into(), key: key.into(), consistency, max_staleness_ms: 0 }
}

/// Reads `key` through `c` (following primary hints): its value and the node that served it.
async fn read(c: &Client, shard: u64, key: &str) -> (Option<String>, String) {
    let served = c
        .call(CallSpec::shard(shard), |mut c| {
            let r = get(shard, key, 0);
            async move { c.get(r).await }
        })
        .await
        .unwrap_or_else(|e| panic!("reading {key}: {e:?}"));
    let v = served.value;
    (v.found.then(|| String::from_utf8(v.value).unwrap()), served.addr)
}

async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn block_volumes_on_a_loop_device_mount_on_the_primary_only_and_fence_the_old_one() {
    if let Some(why) = missing_needs() {
        eprintln!("SKIPPED block_volumes_on_a_loop_device...: {why} (it needs root and loop devices)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let image = root.join("vol-1.img");
    // Sparse: a RocksDB shard preallocates its WAL (tens of MB).
    std::fs::File::create(&image).unwrap().set_len(512 << 20).unwrap();
    let out = Command::new("losetup").args(["--find", "--show"]).arg(&image).output().unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let (mnt_a, mnt_b) = (root.join("mnt-node-a/vol-1"), root.join("mnt-node-b/vol-1"));
    let device = LoopDevice {
        dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        mounts: vec![mnt_a.clone(), mnt_b.clone()],
    };
    let meta = common::start_meta(&root.join("meta"));
    let metadata = format!("grpc://{}", meta.addr);

    // The first node formats the blank device, mounts it and serves.
    let mut a = start_node(root, "node-a", &device.dev, &metadata);
    wait_until("node-a mounting its volume", Duration::from_secs(30), || is_mount_point(&mnt_a).unwrap()).await;
    let settings = ClientSettings { deadline_ms: 60_000, ..ClientSettings::default() };
    let c = Client::new(std::slice::from_ref(&a.addr), settings.clone()).unwrap();
    let shard = c
        .call(CallSpec::any().once().starting_at(0), |mut c| async move {
            c.new_shard(NewShardRequest { client_id: "block".into(), size_limit_bytes: 0 }).await
        })
        .await
        .unwrap()
        .value
        .shard_id;
    c.call(CallSpec::shard(shard), |mut c| async move { c.put(put(shard, "k", "v1")).await }).await.unwrap();

    // A clean restart: it steps down (unmounts), comes back, mounts again.
    a.signal_and_wait(libc::SIGTERM).await;
    assert!(!is_mount_point(&mnt_a).unwrap(), "a node that stops unmounts its volume");
    let a = start_node(root, "node-a", &device.dev, &metadata);
    let c = Client::new(std::slice::from_ref(&a.addr), settings.clone()).unwrap();
    assert_eq!(read(&c, shard, "k").await.0.as_deref(), Some("v1"), "the write survived the restart");

    // A backup keeps the device attached but unmounted, and sends stale
    // reads to the primary.
    let b = start_node(root, "node-b", &device.dev, &metadata);
    assert!(!is_mount_point(&mnt_b).unwrap(), "a backup does not mount the volume");
    let mut raw = b.client().await;
    let refused = raw.get(get(shard, "k", 1)).await.expect_err("a backup serves no read in block mode");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains(&a.addr), "the answer names the primary: {}", refused.message());

    // SIGSTOP the primary past its lease: the backup takes over.
    let c = Client::new(&[a.addr.clone(), b.addr.clone()], settings).unwrap();
    c.call(CallSpec::shard(shard), |mut c| async move { c.put(put(shard, "k", "v2")).await }).await.unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGSTOP) };
    wait_until("node-b mounting the volume", Duration::from_secs(30), || is_mount_point(&mnt_b).unwrap()).await;
    // The old primary still holds its shard's RocksDB LOCK (one machine), so
    // the new one serves the shard once the old one has closed it: resume it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // SAFETY: as above.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGCONT) };
    let written = c.call(CallSpec::shard(shard), |mut c| async move { c.put(put(shard, "k", "v3")).await }).await;
    assert_eq!(written.unwrap().addr, b.addr, "the new primary takes the write");
    wait_until("node-a unmounting after it stepped down", Duration::from_secs(30), || !is_mount_point(&mnt_a).unwrap())
        .await;
    let (value, by) = read(&c, shard, "k").await;
    assert_eq!((value.as_deref(), by.as_str()), (Some("v3"), b.addr.as_str()));
    let epoch = std::fs::read_to_string(mnt_b.join("EPOCH")).unwrap();
    assert!(epoch.trim().parse::<u64>().unwrap() >= 3, "the new primary's epoch is in the EPOCH file: {epoch}");
    drop((a, b, meta));
}
