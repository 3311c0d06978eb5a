//! `VolumeManager` on the task host, with the simulated volumes (`SimEbs`,
//! in memory) and the embedded metadata store on an in-memory log: claim,
//! backup, takeover after the primary's node record is gone, step-down,
//! vacating on shutdown and on detach, and that epochs only grow. Runs in
//! both builds: under `--cfg madsim` in simulated time, otherwise on tokio.

use std::sync::{Arc, Mutex};

use attache_actors::actor::{Actor, Addr, Context, Handler, Reply};
use attache_actors::lease::LeaseGate;
use attache_actors::meta::embedded::{EmbeddedBackend, MemMetaLog};
use attache_actors::meta::{LeaseId, MetaOps, NodeRecord, VolumeRecord};
use attache_actors::provider::VolumeProvider;
use attache_actors::retry::RetryPolicy;
use attache_actors::shard_manager::ShardManagerConfig;
use attache_actors::testkit::{StuckCall, StuckProvider};
use attache_actors::volume::{
    FailoverTiming, GetRole, LeaseLapsed, Role, StopVolume, VolumeManager, VolumeParts, VolumeRoleChanged,
};
use attache_actors::HostHandle;
use attache_sim::ebs::{EbsConfig, SimEbs};
use attache_sim::engine::SimVolumes;
use attache_sim::TaskHost;
use tokio::time::{Duration, Instant};

const VOLUME: &str = "vol-1";

/// Records every role a volume manager reports, as a node would receive them.
#[derive(Default)]
struct Reports(Arc<Mutex<Vec<Role>>>);

impl Actor for Reports {
    fn name(&self) -> String {
        "reports".into()
    }
}

impl Handler<VolumeRoleChanged> for Reports {
    async fn handle(&mut self, msg: VolumeRoleChanged, _ctx: &Context<Self>) -> Reply<()> {
        assert_eq!(msg.volume_id, VOLUME);
        let has_shards = msg.shards.is_some();
        match &msg.role {
            Role::Primary { .. } | Role::Backup { .. } => assert!(has_shards, "{:?} without shards", msg.role),
            _ => assert!(!has_shards, "{:?} with shards", msg.role),
        }
        self.0.lock().unwrap().push(msg.role);
        Reply::now(())
    }
}

struct Cluster {
    host: HostHandle,
    ebs: SimEbs,
    meta: MetaOps,
    timing: FailoverTiming,
}

/// One node's volume manager, its node lease and the roles it reported.
struct Member {
    node_id: u64,
    lease: LeaseId,
    vm: Addr<VolumeManager>,
    roles: Arc<Mutex<Vec<Role>>>,
}

impl Cluster {
    async fn new() -> Self {
        let host = HostHandle::new(TaskHost);
        let backend = EmbeddedBackend::open(&host, Arc::new(MemMetaLog::default())).await.unwrap();
        let meta = MetaOps::new(backend, RetryPolicy::default(), 7);
        let ebs = SimEbs::new(&[VOLUME.to_string()], EbsConfig::default(), 7);
        let timing = FailoverTiming { poll_ms: 20, takeover_delay_ms: 100, rank_delay_ms: 100, io_timeout_ms: 1_000 };
        Cluster { host, ebs, meta, timing }
    }

    /// Publishes node `node_id`'s liveness record and starts its volume manager.
    async fn member(&self, node_id: u64, home: bool) -> Member {
        self.member_with(node_id, home, |v| v).await
    }

    /// As [`Cluster::member`], with the node's volumes attached and fenced
    /// by `provider` made of its simulated volumes.
    async fn member_with(
        &self,
        node_id: u64,
        home: bool,
        provider: impl FnOnce(Arc<SimVolumes>) -> Arc<dyn VolumeProvider>,
    ) -> Member {
        let lease = self.meta.grant_lease(60_000).await.unwrap();
        let record = NodeRecord {
            node_id,
            address: format!("node-{node_id}:7400"),
            instance_id: String::new(),
            volumes: vec![VOLUME.into()],
        };
        self.meta.register_node(&record, lease).await.unwrap();
        let vols = Arc::new(SimVolumes::new(self.ebs.clone(), format!("node-{node_id}")));
        let parts = VolumeParts {
            factory: vols.clone(),
            provider: provider(vols),
            gate: Arc::new(LeaseGate::always_open()),
            meta: self.meta.clone(),
            timing: self.timing.clone(),
            home,
            claims: None,
        };
        let reports = Reports::default();
        let roles = reports.0.clone();
        let report = self.host.spawn(reports, 64).recipient();
        let vm = VolumeManager::new(ShardManagerConfig::new(VOLUME, "/"), node_id, parts, report);
        Member { node_id, lease, vm: self.host.spawn(vm, 64), roles }
    }

    async fn record(&self) -> Option<VolumeRecord> {
        self.meta.volume(VOLUME).await.unwrap().map(|(r, _)| r)
    }
}

/// Waits (bounded) until `m`'s role satisfies `pred`; returns it.
async fn role_until(m: &Member, what: &str, pred: impl Fn(&Role) -> bool) -> Role {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let role = m.vm.send(GetRole).await.unwrap();
        if pred(&role) {
            return role;
        }
        assert!(Instant::now() < end, "node {}: {what} did not happen within 10 s (role {role:?})", m.node_id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn is_primary(r: &Role) -> bool {
    matches!(r, Role::Primary { .. })
}

/// Epochs in the reported roles never go down, and a primary's epoch is new.
fn assert_epochs_grow(m: &Member) {
    let roles = m.roles.lock().unwrap();
    let mut last = 0;
    for r in roles.iter() {
        let epoch = match r {
            Role::Primary { epoch } => {
                assert!(*epoch > last, "node {} claimed epoch {epoch} after seeing {last}: {roles:?}", m.node_id);
                *epoch
            }
            Role::Backup { epoch, .. } => *epoch,
            _ => last,
        };
        assert!(epoch >= last, "node {} went from epoch {last} to {epoch}: {roles:?}", m.node_id);
        last = epoch;
    }
}

#[tokio::test]
async fn the_home_node_claims_a_new_volume_and_the_other_backs_it_up() {
    let c = Cluster::new().await;
    let a = c.member(1, true).await;
    let b = c.member(2, false).await;
    assert_eq!(role_until(&a, "claim", is_primary).await, Role::Primary { epoch: 1 });
    assert_eq!(
        role_until(&b, "backup", |r| matches!(r, Role::Backup { primary: 1, .. })).await,
        Role::Backup { primary: 1, epoch: 1 }
    );
    assert_eq!(c.record().await, Some(VolumeRecord { volume_id: VOLUME.into(), primary: 1, epoch: 1 }));
    assert_eq!(c.ebs.holder(VOLUME), Some(("node-1".into(), 1)), "the storage fence is at the claimed epoch");
    assert_epochs_grow(&a);
    assert_epochs_grow(&b);
}

#[tokio::test]
async fn a_backup_takes_over_once_the_primarys_node_record_is_gone() {
    let c = Cluster::new().await;
    let a = c.member(1, true).await;
    let b = c.member(2, false).await;
    role_until(&a, "claim", is_primary).await;
    role_until(&b, "backup", |r| matches!(r, Role::Backup { primary: 1, .. })).await;
    // Node 1's lease ends (it crashed, or was cut off for longer than its TTL).
    c.meta.backend().lease_revoke(a.lease).await.unwrap();
    let revoked = Instant::now();
    assert_eq!(role_until(&b, "takeover", is_primary).await, Role::Primary { epoch: 2 });
    assert!(
        revoked.elapsed() >= Duration::from_millis(c.timing.takeover_delay_ms),
        "the backup claimed before the takeover delay passed"
    );
    assert_eq!(c.ebs.holder(VOLUME), Some(("node-2".into(), 2)), "the fence moved to the new epoch");
    // The old primary sees the record moved on and steps down to a backup of node 2.
    role_until(&a, "step-down", |r| matches!(r, Role::Backup { primary: 2, epoch: 2 })).await;
    assert_epochs_grow(&a);
    assert_epochs_grow(&b);
}

#[tokio::test]
async fn stopping_vacates_the_volume_and_a_backup_claims_it_at_once() {
    let c = Cluster::new().await;
    let a = c.member(1, true).await;
    let b = c.member(2, false).await;
    role_until(&a, "claim", is_primary).await;
    role_until(&b, "backup", |r| matches!(r, Role::Backup { primary: 1, .. })).await;
    a.vm.send(StopVolume).await.unwrap();
    assert_eq!(a.vm.send(GetRole).await.unwrap(), Role::Stopped);
    let stopped = Instant::now();
    // The record is vacant (primary 0), so no lease needs to run out: only
    // node 2's rank among the live backups counts (it is the first).
    assert_eq!(role_until(&b, "claim after vacate", is_primary).await, Role::Primary { epoch: 2 });
    assert!(stopped.elapsed() < Duration::from_millis(c.timing.takeover_delay_ms + 1_000));
    assert_epochs_grow(&b);
}

/// Releasing a volume is bounded by `io_timeout_ms`: a primary whose
/// unmount never ends still stops (the node can shut down) once that has
/// passed, and the backup takes the volume over, which it vacated first.
#[tokio::test]
async fn a_release_that_never_ends_keeps_neither_the_volume_nor_the_node_from_stopping() {
    let c = Cluster::new().await;
    let a = c.member_with(1, true, |v| Arc::new(StuckProvider { inner: v, stuck: StuckCall::Release })).await;
    let b = c.member(2, false).await;
    role_until(&a, "claim", is_primary).await;
    role_until(&b, "backup", |r| matches!(r, Role::Backup { primary: 1, .. })).await;
    let io_timeout = Duration::from_millis(c.timing.io_timeout_ms);
    let stopping = Instant::now();
    tokio::time::timeout(3 * io_timeout, a.vm.send(StopVolume))
        .await
        .expect("StopVolume ends though the release never does")
        .unwrap();
    assert!(stopping.elapsed() >= io_timeout, "it waited the release's bound: {:?}", stopping.elapsed());
    assert_eq!(a.vm.send(GetRole).await.unwrap(), Role::Stopped);
    assert_eq!(role_until(&b, "claim after vacate", is_primary).await, Role::Primary { epoch: 2 });
    assert_epochs_grow(&b);
}

#[tokio::test]
async fn a_lapsed_lease_steps_the_primary_down_and_it_claims_again_at_a_new_epoch() {
    let c = Cluster::new().await;
    let a = c.member(1, true).await;
    role_until(&a, "claim", is_primary).await;
    a.vm.send(LeaseLapsed).await.unwrap();
    // Stepping down does not vacate: the record still names node 1 at epoch
    // 1, which it no longer serves, so it claims again, at epoch 2.
    assert_eq!(role_until(&a, "re-claim", |r| *r == Role::Primary { epoch: 2 }).await, Role::Primary { epoch: 2 });
    assert!(a.roles.lock().unwrap().contains(&Role::Unknown), "the primary stepped down in between");
    assert_eq!(c.record().await.map(|r| (r.primary, r.epoch)), Some((1, 2)));
    assert_epochs_grow(&a);
}

#[tokio::test]
async fn a_detached_primary_vacates_and_the_backup_takes_over() {
    let c = Cluster::new().await;
    let a = c.member(1, true).await;
    let b = c.member(2, false).await;
    role_until(&a, "claim", is_primary).await;
    role_until(&b, "backup", |r| matches!(r, Role::Backup { primary: 1, .. })).await;
    c.ebs.detach(VOLUME, "node-1");
    assert_eq!(role_until(&a, "detach", |r| *r == Role::Detached).await, Role::Detached);
    assert_eq!(role_until(&b, "takeover", is_primary).await, Role::Primary { epoch: 2 });
    assert_eq!(c.ebs.holder(VOLUME), Some(("node-2".into(), 2)));
    assert_epochs_grow(&b);
}

#[test]
fn timing_settings_are_validated() {
    assert_eq!(FailoverTiming::default().validate(), Ok(()));
    let zero_poll = FailoverTiming { poll_ms: 0, ..FailoverTiming::default() };
    assert!(zero_poll.validate().unwrap_err().contains("poll_ms must be positive"));
    let no_delays = FailoverTiming { poll_ms: 10, takeover_delay_ms: 0, rank_delay_ms: 0, ..FailoverTiming::default() };
    assert_eq!(no_delays.validate(), Ok(()), "zero delays are allowed: the claim CAS still orders claims");
    let short_io_timeout = FailoverTiming { io_timeout_ms: 100, ..FailoverTiming::default() };
    assert!(short_io_timeout.validate().unwrap_err().contains("io_timeout_ms (100) must be at least poll_ms (500)"));
}

#[tokio::test]
async fn a_node_with_invalid_failover_timing_fails_start_up_with_a_message() {
    use attache_actors::local_store::MemLocalStore;
    use attache_actors::node::{Node, NodeConfig, NodeParts, WaitReady};
    let c = Cluster::new().await;
    let vols = Arc::new(SimVolumes::new(c.ebs.clone(), "node-9"));
    let mut cfg = NodeConfig::new("node-9:7400", "/", vec![VOLUME.into()]);
    cfg.failover.poll_ms = 0;
    let parts = NodeParts {
        meta: c.meta.clone(),
        local: Arc::new(MemLocalStore::default()),
        factory: vols.clone(),
        provider: vols,
        gate: Arc::new(LeaseGate::always_open()),
        claims: None,
    };
    let node = c.host.spawn(Node::new(cfg, parts), 16);
    let err = node.send(WaitReady).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("poll_ms must be positive"), "{err}");
}
