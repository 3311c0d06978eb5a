//! The `Node` actor: a storage node's identity, liveness lease, start-up
//! order, volumes, and the routing of client requests to shards.
//!
//! Start-up order (as in DingoDB's store and TiKV): the metadata store is
//! reachable -> node id from the node's data dir, else allocated by the
//! metadata store and persisted -> lease granted and liveness record published
//! -> one `VolumeManager` per configured volume, each settling its role ->
//! ready (the caller then serves gRPC). `WaitReady` answers once every volume
//! has a role.
//!
//! The module is split by concern:
//! - this file: the actor, its config and parts, start-up and identity,
//!   volume roles as the volume managers report them;
//! - [`lease`]: the liveness lease (heartbeat, a lapsed lease);
//! - [`routing`]: client requests routed by shard id to the volume's
//!   `ShardManager` (primary), or to the read-only view (stale reads), else
//!   `UNAVAILABLE` with the primary's address as a hint;
//! - [`lifecycle`]: shard creation, close and delete, listings, cluster
//!   status, shutdown.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::actor::{Actor, Addr, Context, Handler, Message, Reply};
use crate::engine::EngineFactory;
use crate::error::AttacheError;
use crate::lease::{GateTime, LeaseGate, LeaseTiming};
use crate::limits::{Limits, DEFAULT_SHARD_SIZE_LIMIT};
use crate::local_store::LocalStore;
use crate::meta::backend::{LeaseId, MetaError};
use crate::meta::store::{MetaOps, NodeId, NodeRecord};
use crate::provider::VolumeProvider;
use crate::retry::{retry, RetryPolicy};
use crate::shard::layout::ShardState;
use crate::shard::{ShardId, ShardInfo};
use crate::shard_manager::{ShardManager, ShardManagerConfig};
use crate::volume::{ClaimLog, FailoverTiming, Role, VolumeManager, VolumeParts, VolumeRoleChanged};

pub mod lease;
pub mod lifecycle;
pub mod routing;

pub use lifecycle::{
    CloseShardCall, ClusterStatus, DeleteShardCall, GetClusterStatus, ListClientShards, NewShard, ShutdownNode,
};
pub use routing::{StaleCall, VolumeOf};

/// Mailbox capacity of a node actor, messages (client requests waiting to be routed).
pub const NODE_MAILBOX_CAPACITY: usize = 4096;

/// The volumes of a cluster laid out by number, as `attache dev` and the
/// simulated cluster lay theirs out: `vol-1` ... `vol-{n}`.
pub fn numbered_volumes(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("vol-{i}")).collect()
}

/// Default of [`NodeConfig::balanced_space_bytes`]: 10 GiB, the default
/// balanced-space threshold of HDFS's `AvailableSpaceVolumeChoosingPolicy`
/// (`dfs.datanode.available-space-volume-choosing-policy.balanced-space-threshold`).
pub const DEFAULT_BALANCED_SPACE_BYTES: u64 = 10 << 30;

/// The file in the node's data dir that holds its id.
pub const NODE_ID_FILE: &str = "node-id";

/// How a node is set up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Address clients reach this node's gRPC service at (`host:port`), given
    /// to other nodes' clients as a primary hint.
    pub advertise_addr: String,
    /// The node id to use (`NODE_ID`); `None`: the one in the data dir, else a
    /// new one from the metadata store.
    pub node_id: Option<NodeId>,
    /// Cloud instance id (EC2), empty when none.
    pub instance_id: String,
    /// Where volumes are mounted; volume `v` is at `{volume_root}/v`.
    pub volume_root: PathBuf,
    /// The volumes this node attaches.
    pub volumes: Vec<String>,
    /// The volumes this node claims first when nobody holds them yet (its
    /// "home" volumes); others wait for their home node. Default: all.
    pub home_volumes: Vec<String>,
    /// Node lease TTL, ms.
    pub lease_ttl_ms: u64,
    /// Request limits.
    pub limits: Limits,
    /// Size limit of a new shard when the request names none, bytes.
    pub default_size_limit: u64,
    /// Volumes whose free space is within this many bytes of the freest
    /// one count as equally free when a new shard is placed (see
    /// [`lifecycle::choose_volume`]).
    pub balanced_space_bytes: u64,
    /// Most shards this node keeps open at once, over all its volumes (0:
    /// no limit); each volume's shard managers get an equal share, at
    /// least 1 (see `ShardManagerConfig::max_open_shards`).
    pub max_open_shards: usize,
    /// How long start-up waits for the metadata store, ms.
    pub metadata_wait_ms: u64,
    /// Clock error bound and margin of the lease gate.
    pub lease: LeaseTiming,
    /// When backups take a volume over.
    pub failover: FailoverTiming,
}

impl NodeConfig {
    /// Checks the timing settings: `FailoverTiming::validate`, then the
    /// lease TTL and takeover delay against the lease gate's drift and
    /// margin (`LeaseTiming::validate`).
    ///
    /// Errors: a message naming the setting and the bound it breaks.
    pub fn validate(&self) -> Result<(), String> {
        self.failover.validate()?;
        self.lease.validate(self.lease_ttl_ms, self.failover.takeover_delay_ms)
    }

    /// A config with defaults for `volumes` under `volume_root`, reachable at `advertise_addr`.
    pub fn new(advertise_addr: impl Into<String>, volume_root: impl Into<PathBuf>, volumes: Vec<String>) -> Self {
        NodeConfig {
            advertise_addr: advertise_addr.into(),
            node_id: None,
            instance_id: String::new(),
            volume_root: volume_root.into(),
            home_volumes: volumes.clone(),
            volumes,
            lease_ttl_ms: 5_000,
            limits: Limits::default(),
            default_size_limit: DEFAULT_SHARD_SIZE_LIMIT,
            balanced_space_bytes: DEFAULT_BALANCED_SPACE_BYTES,
            max_open_shards: 0,
            metadata_wait_ms: 30_000,
            lease: LeaseTiming::default(),
            failover: FailoverTiming::default(),
        }
    }

    /// Node `i` (1-based) of a cluster of `nodes` nodes that all attach
    /// `volumes` under `volume_root`: with several nodes, node `i` is the
    /// home of `vol-{i}` only (so the first primaries spread over the
    /// nodes); a node alone is the home of every volume. The rule
    /// `attache dev --nodes N` and the simulated cluster share.
    pub fn cluster_member(i: usize, nodes: usize, volume_root: impl Into<PathBuf>, volumes: Vec<String>) -> Self {
        let mut cfg = NodeConfig::new(String::new(), volume_root, volumes);
        if nodes > 1 {
            let home = format!("vol-{i}");
            cfg.home_volumes = cfg.volumes.iter().filter(|v| **v == home).cloned().collect();
        }
        cfg
    }
}

/// A shard with the volume it lives on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedShard {
    /// The shard's id, owner, state and size limit.
    pub info: ShardInfo,
    /// The volume the shard lives on.
    pub volume_id: String,
}

/// What this node knows about one of its volumes.
struct VolumeSlot {
    manager: Addr<VolumeManager>,
    role: Role,
    shards: Option<Addr<ShardManager>>,
    /// Shards placed on the volume (from the metadata store at start, then
    /// counted as this node places them; shared with creations under way).
    placed: Arc<AtomicU64>,
}

/// What a node sees the outside world through.
pub struct NodeParts {
    /// The metadata store.
    pub meta: MetaOps,
    /// The node's own data dir (node id).
    pub local: Arc<dyn LocalStore>,
    /// Opens shard engines on volumes.
    pub factory: Arc<dyn EngineFactory>,
    /// Attaches and fences volumes.
    pub provider: Arc<dyn VolumeProvider>,
    /// The lease gate, shared with the shards (and, in the simulation, with the fault injector).
    pub gate: Arc<LeaseGate>,
    /// Told of every volume this node claims (`crate::volume::Claimed`), if set.
    pub claims: Option<ClaimLog>,
}

/// The node; see the module docs.
pub struct Node {
    cfg: NodeConfig,
    meta: MetaOps,
    local: Arc<dyn LocalStore>,
    factory: Arc<dyn EngineFactory>,
    provider: Arc<dyn VolumeProvider>,
    gate: Arc<LeaseGate>,
    node_id: Option<NodeId>,
    lease: LeaseId,
    startup_error: Option<AttacheError>,
    volumes: BTreeMap<String, VolumeSlot>,
    routes: BTreeMap<ShardId, routing::Known>,
    /// Permits for route lookups outside the actor ([`routing::MAX_ROUTE_LOOKUPS`]).
    lookups: Arc<tokio::sync::Semaphore>,
    ready_waiters: Vec<oneshot::Sender<Result<NodeRecord, AttacheError>>>,
    stopping: bool,
    claims: Option<ClaimLog>,
    /// Failed attempts in a row to get a lease and publish the node record
    /// after the lease lapsed (see `lease::LeaseLost`): every one is
    /// retried after 200 ms, and logged only as the first and each
    /// [`lease::LOG_EVERY_RETRIES`]th, so a long outage or a refusal does
    /// not write five lines a second.
    lease_retries: u64,
}

fn meta_unavailable(e: MetaError) -> AttacheError {
    match e {
        MetaError::Invalid(m) => AttacheError::Internal(m),
        MetaError::Refused(m) => AttacheError::Internal(format!(
            "{m}; this node's identity to its metadata store is wrong: fix its --metadata-token-file or its \
             certificate (group attache:node)"
        )),
        e => AttacheError::unavailable(format!("{e}; retry")),
    }
}

impl Node {
    /// A node that will start up with `parts`.
    pub fn new(cfg: NodeConfig, parts: NodeParts) -> Self {
        let NodeParts { meta, local, factory, provider, gate, claims } = parts;
        Node {
            cfg,
            meta,
            local,
            factory,
            provider,
            gate,
            node_id: None,
            lease: 0,
            startup_error: None,
            volumes: BTreeMap::new(),
            routes: BTreeMap::new(),
            lookups: Arc::new(tokio::sync::Semaphore::new(routing::MAX_ROUTE_LOOKUPS)),
            ready_waiters: Vec::new(),
            stopping: false,
            claims,
            lease_retries: 0,
        }
    }

    fn record(&self) -> Option<NodeRecord> {
        Some(NodeRecord {
            node_id: self.node_id?,
            address: self.cfg.advertise_addr.clone(),
            instance_id: self.cfg.instance_id.clone(),
            volumes: self.cfg.volumes.clone(),
        })
    }

    fn ready(&self) -> Option<Result<NodeRecord, AttacheError>> {
        if let Some(e) = &self.startup_error {
            return Some(Err(e.clone()));
        }
        let record = self.record()?;
        let settled =
            self.volumes.len() == self.cfg.volumes.len() && self.volumes.values().all(|v| v.role != Role::Unknown);
        settled.then_some(Ok(record))
    }

    fn answer_ready(&mut self) {
        if let Some(result) = self.ready() {
            for w in self.ready_waiters.drain(..) {
                let _ = w.send(result.clone());
            }
        }
    }

    /// The node id from the data dir, else a new one from the metadata store,
    /// persisted before use.
    async fn node_id(&self) -> Result<NodeId, AttacheError> {
        let stored = self.local.read(NODE_ID_FILE).await.map_err(AttacheError::Internal)?;
        if let Some(bytes) = stored {
            let text = String::from_utf8_lossy(&bytes);
            let id: NodeId = text.trim().parse().map_err(|_| {
                AttacheError::Internal(format!(
                    "{NODE_ID_FILE} in the data dir holds {text:?}, not a node id: fix or remove it"
                ))
            })?;
            return match self.cfg.node_id {
                Some(wanted) if wanted != id => Err(AttacheError::InvalidArgument(format!(
                    "the data dir belongs to node {id}, not to node {wanted}: use another data dir or drop NODE_ID"
                ))),
                _ => Ok(id),
            };
        }
        let id = match self.cfg.node_id {
            Some(id) => id,
            None => self.meta.allocate_id("node").await.map_err(meta_unavailable)?,
        };
        self.local.write(NODE_ID_FILE, format!("{id}\n").as_bytes()).await.map_err(AttacheError::Internal)?;
        tracing::info!(node_id = id, "allocated node id");
        Ok(id)
    }

    async fn start(&mut self, ctx: &Context<Self>) -> Result<(), AttacheError> {
        // Settings a volume manager would refuse (it panics on them) fail
        // start-up with a message instead.
        self.cfg.validate().map_err(AttacheError::InvalidArgument)?;
        // The metadata store must be reachable before anything else.
        let wait =
            RetryPolicy { max_attempts: u32::MAX, deadline_ms: self.cfg.metadata_wait_ms, ..RetryPolicy::default() };
        // The node's own seeded jitter: nodes started together do not retry in lockstep.
        retry(&wait, self.meta.jitter(), "reach metadata store", || self.meta.backend().get(b"/attache/"))
            .await
            .map_err(meta_unavailable)?;
        let node_id = self.node_id().await?;
        self.node_id = Some(node_id);
        let sent = GateTime::now();
        self.lease = self.meta.grant_lease(self.cfg.lease_ttl_ms).await.map_err(meta_unavailable)?;
        let record = self.record().expect("node id set");
        self.meta.register_node(&record, self.lease).await.map_err(meta_unavailable)?;
        self.gate.renewed(sent, self.cfg.lease_ttl_ms);
        tracing::info!(node_id, lease = self.lease, address = %record.address, "node registered");
        self.spawn_heartbeat(ctx);
        let placed = self.meta.shards(None).await.map_err(meta_unavailable)?;
        for volume_id in self.cfg.volumes.clone() {
            let mut vcfg = ShardManagerConfig::new(volume_id.clone(), self.cfg.volume_root.clone());
            vcfg.limits = self.cfg.limits.clone();
            if self.cfg.max_open_shards > 0 {
                vcfg.max_open_shards = (self.cfg.max_open_shards / self.cfg.volumes.len().max(1)).max(1);
            }
            vcfg.default_size_limit = self.cfg.default_size_limit;
            let parts = VolumeParts {
                factory: self.factory.clone(),
                provider: self.provider.clone(),
                gate: self.gate.clone(),
                meta: self.meta.clone(),
                timing: self.cfg.failover.clone(),
                home: self.cfg.home_volumes.contains(&volume_id),
                claims: self.claims.clone(),
            };
            let vm = VolumeManager::new(vcfg, node_id, parts, ctx.address().recipient());
            let count = placed.iter().filter(|r| r.volume_id == volume_id && r.state != ShardState::Deleted).count();
            let manager = ctx.host().spawn(vm, 64);
            self.volumes.insert(
                volume_id,
                VolumeSlot {
                    manager,
                    role: Role::Unknown,
                    shards: None,
                    placed: Arc::new(AtomicU64::new(count as u64)),
                },
            );
        }
        Ok(())
    }
}

impl Actor for Node {
    fn name(&self) -> String {
        match self.node_id {
            Some(id) => format!("node-{id}"),
            None => "node".into(),
        }
    }

    async fn started(&mut self, ctx: &Context<Self>) {
        if let Err(e) = self.start(ctx).await {
            tracing::error!(error = %e, "node start-up failed");
            self.startup_error = Some(e);
        }
    }
}

/// Waits until the node is up and every volume has a role; answers the
/// node's liveness record. Errors: why start-up failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitReady;

impl Message for WaitReady {
    type Reply = Result<NodeRecord, AttacheError>;
}

impl Handler<WaitReady> for Node {
    async fn handle(&mut self, _msg: WaitReady, _ctx: &Context<Self>) -> Reply<Result<NodeRecord, AttacheError>> {
        if let Some(result) = self.ready() {
            return Reply::now(result);
        }
        let (tx, rx) = oneshot::channel();
        self.ready_waiters.push(tx);
        Reply::later(async move { rx.await.unwrap_or_else(|_| Err(AttacheError::unavailable("node stopped"))) })
    }
}

impl Handler<VolumeRoleChanged> for Node {
    async fn handle(&mut self, msg: VolumeRoleChanged, _ctx: &Context<Self>) -> Reply<()> {
        if let Some(slot) = self.volumes.get_mut(&msg.volume_id) {
            tracing::info!(volume = %msg.volume_id, role = ?msg.role, "volume role");
            slot.role = msg.role;
            slot.shards = msg.shards;
        }
        self.answer_ready();
        Reply::now(())
    }
}
