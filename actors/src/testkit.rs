//! Scenarios shared by the tests of both hosts.
//!
//! The same function runs on actix with `RocksEngine` (`attache-runtime`'s
//! tests) and under madsim with `MemEngine` (`attache-sim`'s tests), so both
//! hosts are held to the same behaviour. Failures panic with a message that
//! says which step broke.

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::join_all;

use crate::actor::{Addr, HostHandle};
use crate::engine::EngineFactory;
use crate::error::AttacheError;
use crate::shard::layout::{IndexEntry, ShardState};
use crate::shard::{
    BatchGet, BatchPut, Close, Get, IndexHit, Put, PutEntry, Scan, ScanIndex, ScanIndexSnapshot, ScanSnapshot, ShardId,
    Stats,
};
use crate::shard_manager::{
    CreateShard, DeleteShard, ListOpenShards, ShardCall, ShardManager, ShardManagerConfig, ShutdownShards,
};

/// Writers in the concurrent-put step.
pub const WRITERS: usize = 64;
/// Puts per writer in the concurrent-put step.
pub const PUTS_PER_WRITER: usize = 20;

const OWNER: &str = "alice";

fn open_gate() -> Arc<crate::lease::LeaseGate> {
    Arc::new(crate::lease::LeaseGate::always_open())
}

fn entry(key: &str, value: &str) -> PutEntry {
    PutEntry { key: key.into(), value: value.into(), indexes: Vec::new() }
}

async fn put(mgr: &Addr<ShardManager>, shard_id: ShardId, client: &str, e: PutEntry) -> Result<(), AttacheError> {
    put_with_id(mgr, shard_id, client, e, None).await
}

async fn put_with_id(
    mgr: &Addr<ShardManager>,
    shard_id: ShardId,
    client: &str,
    entry: PutEntry,
    id: Option<&str>,
) -> Result<(), AttacheError> {
    let op = Put { client_id: client.into(), entry, request_id: id.map(str::to_string) };
    mgr.send(ShardCall { shard_id, op }).await.expect("manager alive")
}

async fn get(
    mgr: &Addr<ShardManager>,
    shard_id: ShardId,
    client: &str,
    key: &str,
) -> Result<Option<Vec<u8>>, AttacheError> {
    mgr.send(ShardCall { shard_id, op: Get { client_id: client.into(), key: key.into() } })
        .await
        .expect("manager alive")
}

/// Runs the storage scenario on `host` over engines from `factory` under
/// `volume_root`: create a shard; many concurrent puts sharing group commits;
/// get, batch get, scan, index scan; a batch put; wrong client id, bad
/// arguments and a full shard rejected without effect; request ids (a retry
/// of an applied write applies nothing, and is acknowledged even once the
/// shard is full or closed); close (writes rejected, reads served); delete
/// (gone, files removed); restart of the manager (data and request ids still
/// there).
pub async fn storage_scenario(host: &HostHandle, factory: Arc<dyn EngineFactory>, volume_root: PathBuf) {
    let mut cfg = ShardManagerConfig::new("vol-1", volume_root);
    cfg.limits.max_value_bytes = 64 << 10;
    let mgr = host.spawn(ShardManager::new(cfg.clone(), factory.clone(), open_gate()), 256);

    // Create, and create again.
    let info = mgr.send(CreateShard { shard_id: 1, client_id: OWNER.into(), size_limit: None }).await.unwrap().unwrap();
    assert_eq!((info.shard_id, info.state), (1, ShardState::Active));
    let again = mgr.send(CreateShard { shard_id: 1, client_id: OWNER.into(), size_limit: None }).await.unwrap();
    assert!(matches!(again, Err(AttacheError::AlreadyExists(_))), "second create of shard 1: {again:?}");
    let bad = mgr.send(CreateShard { shard_id: 9, client_id: String::new(), size_limit: None }).await.unwrap();
    assert!(matches!(bad, Err(AttacheError::InvalidArgument(_))), "empty client id: {bad:?}");

    // Concurrent writers: every put acknowledged, fewer syncs than puts.
    let writes = (0..WRITERS).map(|w| {
        let mgr = mgr.clone();
        async move {
            for i in 0..PUTS_PER_WRITER {
                put(&mgr, 1, OWNER, entry(&format!("w{w:02}-k{i:03}"), &format!("v-{w}-{i}")))
                    .await
                    .expect("put acknowledged");
            }
        }
    });
    join_all(writes).await;
    let stats = mgr.send(ShardCall { shard_id: 1, op: Stats { client_id: OWNER.into() } }).await.unwrap().unwrap();
    let puts = (WRITERS * PUTS_PER_WRITER) as u64;
    assert_eq!(stats.live_keys, puts);
    assert!(stats.committed_ops >= puts, "every put went through a group commit: {stats:?}");
    assert!(
        stats.group_commits < stats.committed_ops,
        "{WRITERS} concurrent writers shared syncs: {} group commits for {} ops",
        stats.group_commits,
        stats.committed_ops
    );

    // Reads see every acknowledged write.
    for w in [0, WRITERS / 2, WRITERS - 1] {
        for i in [0, PUTS_PER_WRITER - 1] {
            let v = get(&mgr, 1, OWNER, &format!("w{w:02}-k{i:03}")).await.unwrap();
            assert_eq!(v, Some(format!("v-{w}-{i}").into_bytes()));
        }
    }
    assert_eq!(get(&mgr, 1, OWNER, "absent").await.unwrap(), None);
    let keys = vec![b"w01-k001".to_vec(), b"nope".to_vec(), b"w63-k019".to_vec()];
    let got =
        mgr.send(ShardCall { shard_id: 1, op: BatchGet { client_id: OWNER.into(), keys } }).await.unwrap().unwrap();
    assert_eq!(got, vec![Some(b"v-1-1".to_vec()), None, Some(b"v-63-19".to_vec())]);

    // Scans: a bounded range, and a limit.
    let scan = |start: &str, end: &str, limit| ShardCall {
        shard_id: 1,
        op: Scan { client_id: OWNER.into(), start: start.into(), end: end.into(), limit },
    };
    let page = mgr.send(scan("w05-", "w06-", 0)).await.unwrap().unwrap();
    assert_eq!(page.len(), PUTS_PER_WRITER);
    assert!(page.windows(2).all(|p| p[0].0 < p[1].0), "scan is in key order");
    assert_eq!(page[0], (b"w05-k000".to_vec(), b"v-5-0".to_vec()));
    let limited = mgr.send(scan("", "", 7)).await.unwrap().unwrap();
    assert_eq!(limited.len(), 7);

    // Secondary indexes: written with the put, replaced on overwrite.
    let with_color = |key: &str, color: &str| PutEntry {
        key: key.into(),
        value: b"p".to_vec(),
        indexes: vec![IndexEntry { name: "color".into(), value: color.into() }],
    };
    put(&mgr, 1, OWNER, with_color("pen", "red")).await.unwrap();
    put(&mgr, 1, OWNER, with_color("cap", "reddish")).await.unwrap();
    put(&mgr, 1, OWNER, with_color("ink", "blue")).await.unwrap();
    put(&mgr, 1, OWNER, with_color("ink", "rose")).await.unwrap();
    let scan_index = |prefix: &str, after: Option<IndexHit>| ShardCall {
        shard_id: 1,
        op: ScanIndex { client_id: OWNER.into(), name: "color".into(), value_prefix: prefix.into(), after, limit: 0 },
    };
    let hits = mgr.send(scan_index("r", None)).await.unwrap().unwrap();
    let found: Vec<(&[u8], &[u8])> = hits.iter().map(|h| (h.value.as_slice(), h.key.as_slice())).collect();
    assert_eq!(found, vec![(&b"red"[..], &b"pen"[..]), (b"reddish", b"cap"), (b"rose", b"ink")]);
    assert!(mgr.send(scan_index("blue", None)).await.unwrap().unwrap().is_empty(), "overwrite removed ink's old entry");
    let rest = mgr.send(scan_index("r", Some(hits[0].clone()))).await.unwrap().unwrap();
    assert_eq!(rest, hits[1..].to_vec(), "paging after a hit");
    // A snapshot index scan reads its later pages from its first page's
    // moment: keys moved meanwhile are listed once, under their old value.
    let op = ScanIndexSnapshot { client_id: OWNER.into(), name: "color".into(), value_prefix: b"r".to_vec(), limit: 1 };
    let (first, pages) = mgr.send(ShardCall { shard_id: 1, op }).await.unwrap().unwrap();
    assert_eq!(first, hits[..1].to_vec());
    put(&mgr, 1, OWNER, with_color("ink", "amber")).await.unwrap();
    put(&mgr, 1, OWNER, with_color("pen", "ruby")).await.unwrap();
    let later = pages.page(Some(&first[0]), 0).await.unwrap();
    assert_eq!(later, hits[1..].to_vec(), "later pages read the first page's snapshot");
    let now = mgr.send(scan_index("r", None)).await.unwrap().unwrap();
    assert_eq!(now.iter().map(|h| h.key.as_slice()).collect::<Vec<_>>(), vec![&b"cap"[..], b"pen"], "live: moved");

    // An atomic batch.
    let batch: Vec<PutEntry> = (0..10).map(|i| entry(&format!("batch-{i}"), "b")).collect();
    mgr.send(ShardCall { shard_id: 1, op: BatchPut { client_id: OWNER.into(), entries: batch, request_id: None } })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(get(&mgr, 1, OWNER, "batch-9").await.unwrap(), Some(b"b".to_vec()));

    // Rejected requests change nothing.
    let before = mgr.send(ShardCall { shard_id: 1, op: Stats { client_id: OWNER.into() } }).await.unwrap().unwrap();
    let denied = put(&mgr, 1, "mallory", entry("evil", "x")).await;
    assert!(matches!(denied, Err(AttacheError::PermissionDenied(_))), "wrong client put: {denied:?}");
    let denied = get(&mgr, 1, "mallory", "w00-k000").await;
    assert!(matches!(denied, Err(AttacheError::PermissionDenied(_))), "wrong client get: {denied:?}");
    let empty = put(&mgr, 1, OWNER, entry("", "x")).await;
    assert!(matches!(empty, Err(AttacheError::InvalidArgument(_))), "empty key: {empty:?}");
    let big =
        put(&mgr, 1, OWNER, PutEntry { key: b"big".to_vec(), value: vec![0; (64 << 10) + 1], indexes: vec![] }).await;
    assert!(matches!(big, Err(AttacheError::InvalidArgument(_))), "value over limit: {big:?}");
    let mixed = vec![entry("good", "1"), entry("", "2")];
    let mixed = mgr
        .send(ShardCall { shard_id: 1, op: BatchPut { client_id: OWNER.into(), entries: mixed, request_id: None } })
        .await
        .unwrap();
    assert!(matches!(mixed, Err(AttacheError::InvalidArgument(_))), "batch with an empty key: {mixed:?}");
    assert_eq!(get(&mgr, 1, OWNER, "good").await.unwrap(), None, "a rejected batch wrote nothing");
    let unknown = get(&mgr, 99, OWNER, "k").await;
    assert!(matches!(unknown, Err(AttacheError::NotFound(_))), "unknown shard: {unknown:?}");
    let after = mgr.send(ShardCall { shard_id: 1, op: Stats { client_id: OWNER.into() } }).await.unwrap().unwrap();
    assert_eq!((after.live_keys, after.live_bytes), (before.live_keys, before.live_bytes));

    // Request ids: the retry of an applied put (its reply lost) applies
    // nothing, so another writer's later value stays.
    put_with_id(&mgr, 1, OWNER, entry("dup", "v1"), Some("req-1")).await.unwrap();
    put_with_id(&mgr, 1, OWNER, entry("dup", "v2"), Some("req-2")).await.unwrap();
    put_with_id(&mgr, 1, OWNER, entry("dup", "v1"), Some("req-1")).await.unwrap();
    assert_eq!(get(&mgr, 1, OWNER, "dup").await.unwrap(), Some(b"v2".to_vec()), "a retried put applied twice");
    let long = put_with_id(&mgr, 1, OWNER, entry("dup", "v3"), Some(&"x".repeat(65))).await;
    assert!(matches!(long, Err(AttacheError::InvalidArgument(_))), "65-byte request id: {long:?}");

    // A full shard rejects the write that would exceed its limit, and only that.
    mgr.send(CreateShard { shard_id: 2, client_id: OWNER.into(), size_limit: Some(4096) }).await.unwrap().unwrap();
    let mut accepted = 0;
    let full = loop {
        let key = format!("fill-{accepted:04}");
        match put_with_id(&mgr, 2, OWNER, entry(&key, &"x".repeat(100)), Some(&key)).await {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 100, "a 4096-byte shard took 100 puts of 100 bytes");
    };
    assert!(matches!(full, AttacheError::ResourceExhausted(_)), "full shard: {full:?}");
    // The last accepted put, retried with its id, is acknowledged: it applied.
    let last = format!("fill-{:04}", accepted - 1);
    put_with_id(&mgr, 2, OWNER, entry(&last, &"x".repeat(100)), Some(&last)).await.expect("retry of an applied put");
    assert!(accepted >= 30, "a 4096-byte shard holds at least 30 puts of ~110 bytes, took {accepted}");
    assert_eq!(get(&mgr, 2, OWNER, &format!("fill-{accepted:04}")).await.unwrap(), None);
    let stats2 = mgr.send(ShardCall { shard_id: 2, op: Stats { client_id: OWNER.into() } }).await.unwrap().unwrap();
    assert!(stats2.live_bytes <= 4096 && stats2.live_keys == accepted, "{stats2:?}");

    // Close: writes rejected, reads served, close is idempotent.
    let closed = mgr.send(ShardCall { shard_id: 1, op: Close { client_id: OWNER.into() } }).await.unwrap().unwrap();
    assert_eq!(closed.state, ShardState::ReadOnly);
    let rejected = put(&mgr, 1, OWNER, entry("late", "x")).await;
    assert!(matches!(rejected, Err(AttacheError::FailedPrecondition(_))), "put to closed shard: {rejected:?}");
    let rejected = put_with_id(&mgr, 1, OWNER, entry("late", "x"), Some("req-late")).await;
    assert!(matches!(rejected, Err(AttacheError::FailedPrecondition(_))), "new id to closed shard: {rejected:?}");
    put_with_id(&mgr, 1, OWNER, entry("dup", "v1"), Some("req-1"))
        .await
        .expect("retry of an applied put, closed since");
    assert_eq!(get(&mgr, 1, OWNER, "dup").await.unwrap(), Some(b"v2".to_vec()));
    assert_eq!(get(&mgr, 1, OWNER, "w00-k000").await.unwrap(), Some(b"v-0-0".to_vec()));
    mgr.send(ShardCall { shard_id: 1, op: Close { client_id: OWNER.into() } }).await.unwrap().unwrap();

    // Delete: only by the owner; then gone, files removed.
    let denied = mgr.send(DeleteShard { shard_id: 1, client_id: "mallory".into() }).await.unwrap();
    assert!(matches!(denied, Err(AttacheError::PermissionDenied(_))), "delete by another client: {denied:?}");
    mgr.send(DeleteShard { shard_id: 1, client_id: OWNER.into() }).await.unwrap().unwrap();
    let gone = get(&mgr, 1, OWNER, "w00-k000").await;
    assert!(matches!(gone, Err(AttacheError::NotFound(_))), "get from deleted shard: {gone:?}");
    assert!(!factory.exists(&cfg.shard_path(1)).await.unwrap(), "deleted shard's files are removed");
    let gone = mgr.send(DeleteShard { shard_id: 1, client_id: OWNER.into() }).await.unwrap();
    assert!(matches!(gone, Err(AttacheError::NotFound(_))), "second delete: {gone:?}");

    // Restart the manager: shard 2 opens again from the volume with its data, state and limit.
    mgr.send(ShutdownShards).await.unwrap();
    let after_shutdown = get(&mgr, 2, OWNER, "fill-0000").await;
    assert!(matches!(after_shutdown, Err(AttacheError::Unavailable { .. })), "after shutdown: {after_shutdown:?}");
    mgr.stop();
    let mgr = host.spawn(ShardManager::new(cfg, factory, open_gate()), 256);
    assert_eq!(get(&mgr, 2, OWNER, "fill-0000").await.unwrap(), Some("x".repeat(100).into_bytes()));
    let reopened = mgr.send(ShardCall { shard_id: 2, op: Stats { client_id: OWNER.into() } }).await.unwrap().unwrap();
    // Request ids are durable: after the restart, still recognised.
    put_with_id(&mgr, 2, OWNER, entry(&last, "changed"), Some(&last)).await.expect("retry after a restart");
    assert_eq!(get(&mgr, 2, OWNER, &last).await.unwrap(), Some("x".repeat(100).into_bytes()), "applied once");
    assert_eq!(
        (reopened.live_keys, reopened.live_bytes, reopened.info.size_limit),
        (accepted, stats2.live_bytes, 4096)
    );
    mgr.send(ShutdownShards).await.unwrap();
    mgr.stop();
}

/// Runs the open-shard limit scenario on `host` over engines from `factory`
/// under `volume_root`, with a manager that keeps at most 2 shards open:
/// requests to 5 shards in turn close the least recently used idle ones
/// and reopen them on their next request (every write read back, request
/// ids still recognised); a shard with a scan stream open is not closed
/// under it (its next page reads); a write whose commit is in flight while
/// other shards open is acknowledged and durable.
pub async fn open_shard_limit_scenario(host: &HostHandle, factory: Arc<dyn EngineFactory>, volume_root: PathBuf) {
    let mut cfg = ShardManagerConfig::new("vol-1", volume_root);
    cfg.max_open_shards = 2;
    let mgr = host.spawn(ShardManager::new(cfg, factory, open_gate()), 256);
    let open = || async { mgr.send(ListOpenShards).await.unwrap() };
    for shard in 1..=5 {
        mgr.send(CreateShard { shard_id: shard, client_id: OWNER.into(), size_limit: None }).await.unwrap().unwrap();
        let id = format!("first-{shard}");
        put_with_id(&mgr, shard, OWNER, entry("k", &format!("v{shard}")), Some(&id)).await.unwrap();
        assert!(open().await.len() <= 2, "open after creating shard {shard}: {:?}", open().await);
    }
    for round in 0..3 {
        for shard in 1..=5 {
            let v = get(&mgr, shard, OWNER, "k").await.unwrap();
            assert_eq!(v, Some(format!("v{shard}").into_bytes()), "round {round}, shard {shard}");
            assert!(open().await.len() <= 2, "open: {:?}", open().await);
        }
    }
    // A retry of a write applied before its shard closed is recognised after the reopen.
    put_with_id(&mgr, 1, OWNER, entry("k", "changed"), Some("first-1")).await.unwrap();
    assert_eq!(get(&mgr, 1, OWNER, "k").await.unwrap(), Some(b"v1".to_vec()), "applied once");

    // A scan stream holds its shard open; once it ends, the shard may close.
    for i in 0..4 {
        put(&mgr, 1, OWNER, entry(&format!("s{i}"), "x")).await.unwrap();
    }
    let scan = ScanSnapshot { client_id: OWNER.into(), start: b"s".to_vec(), end: Vec::new(), limit: 2 };
    let (first, pages) = mgr.send(ShardCall { shard_id: 1, op: scan }).await.unwrap().unwrap();
    assert_eq!(first.len(), 2);
    for shard in 2..=5 {
        get(&mgr, shard, OWNER, "k").await.unwrap();
    }
    assert!(open().await.contains(&1), "shard 1 closed under its scan stream: {:?}", open().await);
    let rest = pages.page(b"s2", 10).await.expect("the stream's next page");
    assert_eq!(rest.len(), 2);
    drop(pages);
    for shard in 2..=5 {
        get(&mgr, shard, OWNER, "k").await.unwrap();
    }
    assert!(!open().await.contains(&1), "the idle shard 1 stayed open: {:?}", open().await);

    // So does an index scan stream.
    for i in 0..4 {
        let indexes = vec![IndexEntry { name: "tag".into(), value: format!("t{i}").into_bytes() }];
        put(&mgr, 1, OWNER, PutEntry { key: format!("i{i}").into_bytes(), value: b"x".to_vec(), indexes })
            .await
            .unwrap();
    }
    let scan = ScanIndexSnapshot { client_id: OWNER.into(), name: "tag".into(), value_prefix: Vec::new(), limit: 2 };
    let (first, pages) = mgr.send(ShardCall { shard_id: 1, op: scan }).await.unwrap().unwrap();
    assert_eq!(first.len(), 2);
    for shard in 2..=5 {
        get(&mgr, shard, OWNER, "k").await.unwrap();
    }
    assert!(open().await.contains(&1), "shard 1 closed under its index scan stream: {:?}", open().await);
    assert_eq!(pages.page(first.last(), 10).await.expect("the index stream's next page").len(), 2);
    drop(pages);

    // A write in flight while other shards open is acknowledged and durable.
    let pending = mgr.enqueue(ShardCall {
        shard_id: 1,
        op: Put { client_id: OWNER.into(), entry: entry("late", "w"), request_id: None },
    });
    let pending = pending.await.unwrap();
    for shard in 2..=5 {
        get(&mgr, shard, OWNER, "k").await.unwrap();
    }
    pending.await.unwrap().expect("the write in flight is acknowledged");
    for shard in 2..=5 {
        get(&mgr, shard, OWNER, "k").await.unwrap();
    }
    assert_eq!(get(&mgr, 1, OWNER, "late").await.unwrap(), Some(b"w".to_vec()));
    mgr.send(ShutdownShards).await.unwrap();
    mgr.stop();
}

/// The call of a [`StuckProvider`] that never ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StuckCall {
    /// `VolumeProvider::free_bytes`: a `statfs` stuck on a hung filesystem.
    FreeBytes,
    /// `VolumeProvider::release`: an unmount stuck on a hung device.
    Release,
}

/// A volume provider that passes every call to `inner` except `stuck`,
/// which never ends: for tests of the bound a caller puts on that call.
pub struct StuckProvider {
    /// The provider that answers every other call.
    pub inner: Arc<dyn crate::provider::VolumeProvider>,
    /// The call that never ends.
    pub stuck: StuckCall,
}

#[async_trait::async_trait]
impl crate::provider::VolumeProvider for StuckProvider {
    async fn attach(&self, volume: &str) -> Result<(), crate::engine::EngineError> {
        self.inner.attach(volume).await
    }
    async fn is_attached(&self, volume: &str) -> bool {
        self.inner.is_attached(volume).await
    }
    async fn acquire(&self, volume: &str, epoch: u64) -> Result<(), crate::engine::EngineError> {
        self.inner.acquire(volume, epoch).await
    }
    fn held_epoch(&self, volume: &str) -> Option<u64> {
        self.inner.held_epoch(volume)
    }
    fn backups_read(&self) -> bool {
        self.inner.backups_read()
    }
    async fn free_bytes(&self, volume: &str) -> Option<u64> {
        if self.stuck == StuckCall::FreeBytes {
            std::future::pending::<()>().await;
        }
        self.inner.free_bytes(volume).await
    }
    async fn release(&self, volume: &str) -> Result<(), crate::engine::EngineError> {
        if self.stuck == StuckCall::Release {
            std::future::pending::<()>().await;
        }
        self.inner.release(volume).await
    }
}
