//! The shared storage scenario on the task host with `MemEngine`: under
//! `--cfg madsim` on madsim tasks in simulated time, otherwise on tokio.

use std::sync::Arc;

use attache_actors::mem_engine::MemEngineFactory;
use attache_actors::testkit;
use attache_actors::HostHandle;
use attache_sim::TaskHost;

#[tokio::test]
async fn storage_scenario_on_task_host() {
    let host = HostHandle::new(TaskHost);
    testkit::storage_scenario(&host, Arc::new(MemEngineFactory::new()), "/volumes".into()).await;
}

#[tokio::test]
async fn open_shard_limit_scenario_on_task_host() {
    let host = HostHandle::new(TaskHost);
    testkit::open_shard_limit_scenario(&host, Arc::new(MemEngineFactory::new()), "/volumes".into()).await;
}
