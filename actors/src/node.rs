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
//! Routing: a request names a shard; the node finds the shard's volume (from
//! the metadata store, then cached) and forwards the request to that volume's
//! `ShardManager` when this node is its primary, keeping the caller's order.
//! Otherwise the client gets `UNAVAILABLE` with the primary's address as a hint.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

use crate::actor::{Actor, Addr, Context, Handler, Message, Reply};
use crate::engine::EngineFactory;
use crate::error::AttacheError;
use crate::lease::{LeaseGate, LeaseTiming};
use crate::limits::{Limits, DEFAULT_SHARD_SIZE_LIMIT};
use crate::local_store::LocalStore;
use crate::meta::backend::{LeaseId, MetaError};
use crate::meta::retry::{retry, RetryPolicy};
use crate::meta::store::{MetaOps, NodeId, NodeRecord, ShardRecord, VolumeRecord};
use crate::provider::VolumeProvider;
use crate::shard::layout::ShardState;
use crate::shard::{Close, ShardId, ShardInfo, ShardOp, Stale, StaleRead};
use crate::shard_manager::{CreateShard, DeleteShard, Routed, ShardManager, ShardManagerConfig};
use crate::volume::{FailoverTiming, LeaseLapsed, Role, StopVolume, VolumeManager, VolumeParts};

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
    /// How long start-up waits for the metadata store, ms.
    pub metadata_wait_ms: u64,
    /// Clock error bound and margin of the lease gate.
    pub lease: LeaseTiming,
    /// When backups take a volume over.
    pub failover: FailoverTiming,
}

impl NodeConfig {
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
            metadata_wait_ms: 30_000,
            lease: LeaseTiming::default(),
            failover: FailoverTiming::default(),
        }
    }
}

/// A shard with the volume it lives on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedShard {
    pub info: ShardInfo,
    pub volume_id: String,
}

/// What this node knows about one of its volumes.
struct VolumeSlot {
    manager: Addr<VolumeManager>,
    role: Role,
    shards: Option<Addr<ShardManager>>,
    /// Shards placed on the volume (from the metadata store at start, then counted).
    placed: u64,
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
    routes: BTreeMap<ShardId, String>,
    ready_waiters: Vec<oneshot::Sender<Result<NodeRecord, AttacheError>>>,
    stopping: bool,
}

fn meta_unavailable(e: MetaError) -> AttacheError {
    match e {
        MetaError::Invalid(m) => AttacheError::Internal(m),
        e => AttacheError::unavailable(format!("{e}; retry")),
    }
}

impl Node {
    /// A node that will start up with `parts`.
    pub fn new(cfg: NodeConfig, parts: NodeParts) -> Self {
        let NodeParts { meta, local, factory, provider, gate } = parts;
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
            ready_waiters: Vec::new(),
            stopping: false,
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
        // The metadata store must be reachable before anything else.
        let wait =
            RetryPolicy { max_attempts: u32::MAX, deadline_ms: self.cfg.metadata_wait_ms, ..RetryPolicy::default() };
        let jitter = crate::meta::retry::Jitter::new(0);
        retry(&wait, &jitter, "reach metadata store", || self.meta.backend().get(b"/attache/"))
            .await
            .map_err(meta_unavailable)?;
        let node_id = self.node_id().await?;
        self.node_id = Some(node_id);
        let sent = Instant::now();
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
            vcfg.default_size_limit = self.cfg.default_size_limit;
            let parts = VolumeParts {
                factory: self.factory.clone(),
                provider: self.provider.clone(),
                gate: self.gate.clone(),
                meta: self.meta.clone(),
                timing: self.cfg.failover.clone(),
                home: self.cfg.home_volumes.contains(&volume_id),
            };
            let vm = VolumeManager::new(vcfg, node_id, parts, ctx.address());
            let count = placed.iter().filter(|r| r.volume_id == volume_id && r.state != ShardState::Deleted).count();
            let manager = ctx.host().spawn(vm, 64);
            self.volumes
                .insert(volume_id, VolumeSlot { manager, role: Role::Unknown, shards: None, placed: count as u64 });
        }
        Ok(())
    }

    /// Renews the lease every third of its TTL, from a task outside the actor.
    fn spawn_heartbeat(&self, ctx: &Context<Self>) {
        let (meta, lease, me, gate) = (self.meta.clone(), self.lease, ctx.address(), self.gate.clone());
        let period = Duration::from_millis(self.cfg.lease_ttl_ms / 3);
        ctx.host().spawn_detached(async move {
            loop {
                tokio::time::sleep(period).await;
                if me.is_closed() {
                    return;
                }
                let sent = Instant::now();
                match meta.keep_alive(lease).await {
                    Ok(ttl) => gate.renewed(sent, ttl),
                    Err(MetaError::LeaseNotFound(_)) => {
                        gate.close();
                        metrics::gauge!("attache_lease_valid").set(0.0);
                        me.do_send(LeaseLost { lease });
                        return;
                    }
                    Err(e) => tracing::warn!(lease, error = %e, "lease renewal failed; retrying"),
                }
                // 1 while this node may write (its lease is certainly valid), else 0.
                metrics::gauge!("attache_lease_valid").set(if gate.is_open() { 1.0 } else { 0.0 });
            }
        });
    }

    /// The volume a shard lives on, from the cache or the metadata store.
    async fn volume_of(&mut self, shard_id: ShardId) -> Result<String, AttacheError> {
        if let Some(v) = self.routes.get(&shard_id) {
            return Ok(v.clone());
        }
        match self.meta.shard(shard_id).await.map_err(meta_unavailable)? {
            Some(ShardRecord { state: ShardState::Deleted, .. }) => {
                Err(AttacheError::NotFound(format!("shard {shard_id} was deleted")))
            }
            Some(record) => {
                self.routes.insert(shard_id, record.volume_id.clone());
                Ok(record.volume_id)
            }
            None => {
                Err(AttacheError::NotFound(format!("shard {shard_id} does not exist: check the id NewShard returned")))
            }
        }
    }

    /// `UNAVAILABLE` for a volume this node does not serve, naming its primary when known.
    async fn not_primary(&self, volume_id: &str) -> AttacheError {
        let hint = match self.meta.volume(volume_id).await {
            Ok(Some((VolumeRecord { primary, .. }, _))) => self
                .meta
                .live_nodes()
                .await
                .ok()
                .and_then(|nodes| nodes.into_iter().find(|n| n.node_id == primary))
                .map(|n| n.address),
            _ => None,
        };
        let message = match &hint {
            Some(addr) => format!("this node is not the primary for volume {volume_id}; the primary is at {addr}"),
            None => format!("this node is not the primary for volume {volume_id} and no primary is known yet; retry"),
        };
        AttacheError::Unavailable { message, primary_hint: hint }
    }

    /// The shard manager serving `shard_id` here, or why there is none.
    async fn shard_manager(&mut self, shard_id: ShardId) -> Result<(String, Addr<ShardManager>), AttacheError> {
        if self.stopping {
            return Err(AttacheError::unavailable("this node is shutting down; retry on another node"));
        }
        let volume_id = self.volume_of(shard_id).await?;
        match self.volumes.get(&volume_id) {
            Some(VolumeSlot { role: Role::Primary { .. }, shards: Some(shards), .. }) => {
                Ok((volume_id, shards.clone()))
            }
            _ => Err(self.not_primary(&volume_id).await),
        }
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

/// Sent by a volume manager when its role changes.
pub struct VolumeRoleChanged {
    pub volume_id: String,
    pub role: Role,
    pub shards: Option<Addr<ShardManager>>,
}

impl Message for VolumeRoleChanged {
    type Reply = ();
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

/// Sent by the heartbeat task when the lease expired before it was renewed.
struct LeaseLost {
    lease: LeaseId,
}

impl Message for LeaseLost {
    type Reply = ();
}

impl Handler<LeaseLost> for Node {
    async fn handle(&mut self, msg: LeaseLost, ctx: &Context<Self>) -> Reply<()> {
        if msg.lease != self.lease || self.stopping {
            return Reply::now(());
        }
        tracing::warn!(lease = msg.lease, "node lease expired; registering again");
        self.gate.close();
        // While the lease was gone, a backup may have taken any of this
        // node's volumes over. Every primary steps down before the gate can
        // open again; one still named by its owner record claims again, at a
        // new epoch.
        for (volume_id, slot) in &self.volumes {
            if slot.manager.send(LeaseLapsed).await.is_err() {
                tracing::warn!(volume = %volume_id, "volume manager gone while the lease lapsed");
            }
        }
        let sent = Instant::now();
        match self.meta.grant_lease(self.cfg.lease_ttl_ms).await {
            Ok(lease) => {
                self.lease = lease;
                if let Some(record) = self.record() {
                    match self.meta.register_node(&record, lease).await {
                        // Writes resume only once the node is visible as live again.
                        Ok(()) => self.gate.renewed(sent, self.cfg.lease_ttl_ms),
                        Err(e) => tracing::warn!(error = %e, "could not publish the node record"),
                    }
                }
                self.spawn_heartbeat(ctx);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not get a new lease; retrying");
                let me = ctx.address();
                let lease = self.lease;
                ctx.host().spawn_detached(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    me.do_send(LeaseLost { lease });
                });
            }
        }
        Reply::now(())
    }
}

/// A shard request from a client, routed by shard id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCall<M> {
    pub shard_id: ShardId,
    pub op: M,
}

impl<M: ShardOp> Message for ShardCall<M> {
    type Reply = M::Reply;
}

impl<M: ShardOp> Handler<ShardCall<M>> for Node
where
    ShardManager: Handler<Routed<M>>,
{
    async fn handle(&mut self, msg: ShardCall<M>, _ctx: &Context<Self>) -> Reply<M::Reply> {
        let shards = match self.shard_manager(msg.shard_id).await {
            Ok((_, shards)) => shards,
            Err(e) => return Reply::now(Err(e)),
        };
        match shards.enqueue(Routed { shard_id: msg.shard_id, op: msg.op }).await {
            Ok(pending) => Reply::later(async move { pending.await.unwrap_or_else(|e| Err(e.into())) }),
            Err(e) => Reply::now(Err(e.into())),
        }
    }
}

/// The volume a shard lives on. Errors: `NotFound`, `Unavailable`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeOf {
    pub shard_id: ShardId,
}

impl Message for VolumeOf {
    type Reply = Result<String, AttacheError>;
}

impl Handler<VolumeOf> for Node {
    async fn handle(&mut self, msg: VolumeOf, _ctx: &Context<Self>) -> Reply<Result<String, AttacheError>> {
        Reply::now(self.volume_of(msg.shard_id).await)
    }
}

/// A read that accepts stale data, routed by shard id: served by the
/// primary (fresh, age 0) or by a backup from its read-only view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleCall<M> {
    pub shard_id: ShardId,
    pub op: M,
}

impl<M: StaleRead> Message for StaleCall<M> {
    type Reply = Result<(M::Ok, u64), AttacheError>;
}

impl<M: StaleRead> Handler<StaleCall<M>> for Node
where
    ShardManager: Handler<Routed<Stale<M>>>,
{
    async fn handle(&mut self, msg: StaleCall<M>, _ctx: &Context<Self>) -> Reply<Result<(M::Ok, u64), AttacheError>> {
        if self.stopping {
            return Reply::now(Err(AttacheError::unavailable("this node is shutting down; retry on another node")));
        }
        let volume_id = match self.volume_of(msg.shard_id).await {
            Ok(v) => v,
            Err(e) => return Reply::now(Err(e)),
        };
        let shards = match self.volumes.get(&volume_id) {
            Some(VolumeSlot { role: Role::Primary { .. } | Role::Backup { .. }, shards: Some(shards), .. }) => {
                shards.clone()
            }
            _ => return Reply::now(Err(self.not_primary(&volume_id).await)),
        };
        match shards.enqueue(Routed { shard_id: msg.shard_id, op: Stale(msg.op) }).await {
            Ok(pending) => Reply::later(async move { pending.await.unwrap_or_else(|e| Err(e.into())) }),
            Err(e) => Reply::now(Err(e.into())),
        }
    }
}

/// Creates a shard for `client_id` on a volume this node is primary for (the
/// one with the fewest shards, ties to the smallest volume id), with a size
/// limit in bytes (`None`: the default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewShard {
    pub client_id: String,
    pub size_limit: Option<u64>,
}

impl Message for NewShard {
    type Reply = Result<PlacedShard, AttacheError>;
}

impl Handler<NewShard> for Node {
    async fn handle(&mut self, msg: NewShard, _ctx: &Context<Self>) -> Reply<Result<PlacedShard, AttacheError>> {
        if let Err(e) = self.cfg.limits.check_client_id(&msg.client_id) {
            return Reply::now(Err(e));
        }
        if msg.size_limit == Some(0) {
            return Reply::now(Err(AttacheError::InvalidArgument(
                "size limit must be positive (bytes); omit it for the default".into(),
            )));
        }
        if self.stopping {
            return Reply::now(Err(AttacheError::unavailable("this node is shutting down; retry on another node")));
        }
        let target = self
            .volumes
            .iter_mut()
            .filter_map(|(id, slot)| match (&slot.role, &slot.shards) {
                (Role::Primary { .. }, Some(shards)) => {
                    Some((slot.placed, id.clone(), shards.clone(), &mut slot.placed))
                }
                _ => None,
            })
            .min_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let Some((_, volume_id, shards, placed)) = target else {
            return Reply::now(Err(AttacheError::unavailable(
                "this node is primary for no volume now; retry on another node",
            )));
        };
        *placed += 1;
        let meta = self.meta.clone();
        let default_limit = self.cfg.default_size_limit;
        Reply::later(async move {
            let shard_id = meta.allocate_id("shard").await.map_err(meta_unavailable)?;
            let size_limit = msg.size_limit.unwrap_or(default_limit);
            let record = ShardRecord {
                shard_id,
                client_id: msg.client_id.clone(),
                volume_id: volume_id.clone(),
                state: ShardState::Active,
                size_limit,
            };
            // Registered first: a shard's data never exists without its record.
            meta.register_shard(&record).await.map_err(meta_unavailable)?;
            let created =
                shards.send(CreateShard { shard_id, client_id: msg.client_id, size_limit: Some(size_limit) }).await;
            match created.unwrap_or_else(|e| Err(e.into())) {
                Ok(info) => Ok(PlacedShard { info, volume_id }),
                Err(e) => {
                    // The id stays used (ids are never reused); the record says the shard is gone.
                    let _ = meta.set_shard_state(shard_id, ShardState::Deleted).await;
                    Err(e)
                }
            }
        })
    }
}

macro_rules! lifecycle_call {
    ($(#[$doc:meta])* $name:ident, $state:expr, |$shards:ident, $msg:ident| $forward:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            pub shard_id: ShardId,
            pub client_id: String,
        }

        impl Message for $name {
            type Reply = Result<PlacedShard, AttacheError>;
        }

        impl Handler<$name> for Node {
            async fn handle(&mut self, $msg: $name, _ctx: &Context<Self>) -> Reply<Result<PlacedShard, AttacheError>> {
                let (volume_id, $shards) = match self.shard_manager($msg.shard_id).await {
                    Ok(found) => found,
                    Err(e) => return Reply::now(Err(e)),
                };
                let meta = self.meta.clone();
                Reply::later(async move {
                    let shard_id = $msg.shard_id;
                    let info = $forward.await.unwrap_or_else(|e| Err(e.into()))?;
                    meta.set_shard_state(shard_id, $state).await.map_err(meta_unavailable)?;
                    Ok(PlacedShard { info, volume_id })
                })
            }
        }
    };
}

lifecycle_call!(
    /// Closes a shard (read-only) and records it in the metadata store.
    CloseShardCall,
    ShardState::ReadOnly,
    |shards, msg| shards.send(Routed { shard_id: msg.shard_id, op: Close { client_id: msg.client_id.clone() } })
);

lifecycle_call!(
    /// Deletes a shard and records it in the metadata store.
    DeleteShardCall,
    ShardState::Deleted,
    |shards, msg| shards.send(DeleteShard { shard_id: msg.shard_id, client_id: msg.client_id.clone() })
);

/// Shard records of one client, from the metadata store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListClientShards {
    pub client_id: String,
}

impl Message for ListClientShards {
    type Reply = Result<Vec<ShardRecord>, AttacheError>;
}

impl Handler<ListClientShards> for Node {
    async fn handle(
        &mut self,
        msg: ListClientShards,
        _ctx: &Context<Self>,
    ) -> Reply<Result<Vec<ShardRecord>, AttacheError>> {
        if let Err(e) = self.cfg.limits.check_client_id(&msg.client_id) {
            return Reply::now(Err(e));
        }
        let meta = self.meta.clone();
        Reply::later(async move {
            let records = meta.shards(Some(&msg.client_id)).await.map_err(meta_unavailable)?;
            Ok(records.into_iter().filter(|r| r.state != ShardState::Deleted).collect())
        })
    }
}

/// Live nodes and volume owner records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub nodes: Vec<NodeRecord>,
    pub volumes: Vec<VolumeRecord>,
    /// Shards per volume (not deleted).
    pub shards: BTreeMap<String, u64>,
    /// Live nodes that have each volume attached but are not its primary.
    pub backups: BTreeMap<String, Vec<NodeId>>,
}

/// Asks for the [`ClusterStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetClusterStatus;

impl Message for GetClusterStatus {
    type Reply = Result<ClusterStatus, AttacheError>;
}

impl Handler<GetClusterStatus> for Node {
    async fn handle(
        &mut self,
        _msg: GetClusterStatus,
        _ctx: &Context<Self>,
    ) -> Reply<Result<ClusterStatus, AttacheError>> {
        let meta = self.meta.clone();
        Reply::later(async move {
            let nodes = meta.live_nodes().await.map_err(meta_unavailable)?;
            let volumes = meta.volumes().await.map_err(meta_unavailable)?;
            let mut shards = BTreeMap::new();
            for r in meta.shards(None).await.map_err(meta_unavailable)? {
                if r.state != ShardState::Deleted {
                    *shards.entry(r.volume_id).or_insert(0) += 1;
                }
            }
            let mut backups: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
            for v in &volumes {
                let attached = nodes.iter().filter(|n| n.node_id != v.primary && n.volumes.contains(&v.volume_id));
                backups.insert(v.volume_id.clone(), attached.map(|n| n.node_id).collect());
            }
            Ok(ClusterStatus { nodes, volumes, shards, backups })
        })
    }
}

/// Shuts the node down: stops taking requests, lets in-flight writes finish,
/// closes every volume, and revokes the lease. Replies when done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownNode;

impl Message for ShutdownNode {
    type Reply = ();
}

impl Handler<ShutdownNode> for Node {
    async fn handle(&mut self, _msg: ShutdownNode, _ctx: &Context<Self>) -> Reply<()> {
        self.stopping = true;
        for (volume_id, slot) in &self.volumes {
            if slot.manager.send(StopVolume).await.is_err() {
                tracing::warn!(volume = %volume_id, "volume manager was gone at shutdown");
            }
            slot.manager.stop();
        }
        if self.lease != 0 {
            if let Err(e) = self.meta.backend().lease_revoke(self.lease).await {
                tracing::warn!(error = %e, "could not revoke the node lease; it expires by itself");
            }
        }
        tracing::info!("node stopped");
        Reply::now(())
    }
}
