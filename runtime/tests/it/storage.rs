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
