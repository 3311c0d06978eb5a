//! The shared storage scenario (`attache_actors::testkit`) on the production
//! host: actix arbiters with RocksDB engines in a temporary directory.

use std::sync::Arc;

use attache_actors::testkit;
use attache_actors::HostHandle;
use attache_runtime::{ActixHost, RocksEngineFactory};

#[actix_rt::test]
async fn storage_scenario_on_actix_with_rocksdb() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostHandle::new(ActixHost::new(2));
    testkit::storage_scenario(&host, Arc::new(RocksEngineFactory::new()), dir.path().to_path_buf()).await;
}

#[actix_rt::test]
async fn open_shard_limit_scenario_on_actix_with_rocksdb() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostHandle::new(ActixHost::new(2));
    testkit::open_shard_limit_scenario(&host, Arc::new(RocksEngineFactory::new()), dir.path().to_path_buf()).await;
}

/// Placing a new shard asks each volume for its free space, bounded by
/// `FREE_BYTES_WAIT` (500 ms): a volume whose answer never comes ranks as
/// unknown, and the shard is made all the same, well within 5 s.
#[actix_rt::test]
async fn a_new_shard_is_placed_when_free_space_never_answers() {
    use attache_actors::node::lifecycle::FREE_BYTES_WAIT;
    use attache_actors::node::NewShard;
    let dir = tempfile::tempdir().unwrap();
    let host = HostHandle::new(ActixHost::new(2));
    let provider = Arc::new(testkit::StuckProvider {
        inner: Arc::new(attache_runtime::local_volumes::LocalVolumes::new(dir.path())),
        stuck: testkit::StuckCall::FreeBytes,
    });
    let (node, _server) = crate::fuzz_in_process::mem_node_with(&host, dir.path(), provider).await;
    let started = std::time::Instant::now();
    let placed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        node.send(NewShard { client_id: "alice".into(), size_limit: None }),
    )
    .await
    .expect("NewShard answered within 5 s")
    .expect("the node answers")
    .expect("the shard is made");
    let took = started.elapsed();
    assert_eq!(placed.volume_id, "vol-1");
    assert!(took >= FREE_BYTES_WAIT, "it waited for the free space first: {took:?}");
    eprintln!("shard {} placed after {took:?} with free space unanswered", placed.info.shard_id);
}
