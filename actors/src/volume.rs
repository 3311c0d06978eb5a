//! The `VolumeManager` actor: one attached volume, its role on this node
//! (primary read-write, or backup) and its epoch, the fencing token.
//!
//! Becoming primary is a compare-and-swap on the volume's owner record in the
//! metadata store that bumps the epoch (`MetaOps::claim_volume`); a node that
//! restarts and finds itself named as primary claims again, so every opening
//! of a volume read-write has an epoch of its own. As primary it runs the
//! volume's `ShardManager`; it reports every role change to its node, which
//! routes requests accordingly.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::actor::{Actor, Addr, Context, Handler, Message, Reply};
use crate::engine::EngineFactory;
use crate::meta::store::{MetaOps, NodeId, VolumeRecord};
use crate::node::{Node, VolumeRoleChanged};
use crate::shard_manager::{ShardManager, ShardManagerConfig, ShutdownShards};

/// A volume's role on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Not decided yet (starting, or the metadata store is unreachable).
    Unknown,
    /// This node holds the volume read-write at `epoch`.
    Primary { epoch: u64 },
    /// Another node is primary at `epoch`.
    Backup { primary: NodeId, epoch: u64 },
    /// Stopped: no longer serving this volume.
    Stopped,
}

/// The volume manager; see the module docs.
pub struct VolumeManager {
    cfg: ShardManagerConfig,
    node_id: NodeId,
    factory: Arc<dyn EngineFactory>,
    meta: MetaOps,
    node: Addr<Node>,
    role: Role,
    shards: Option<Addr<ShardManager>>,
}

impl VolumeManager {
    /// A manager of volume `cfg.volume_id` for node `node_id`.
    pub fn new(
        cfg: ShardManagerConfig,
        node_id: NodeId,
        factory: Arc<dyn EngineFactory>,
        meta: MetaOps,
        node: Addr<Node>,
    ) -> Self {
        VolumeManager {
            cfg,
            node_id,
            factory,
            meta,
            node,
            role: Role::Unknown,
            shards: None,
        }
    }

    fn report(&self) {
        self.node.do_send(VolumeRoleChanged {
            volume_id: self.cfg.volume_id.clone(),
            role: self.role.clone(),
            shards: self.shards.clone(),
        });
    }

    /// Decides the role from the owner record: claims the volume when nobody
    /// holds it or the record names this node.
    async fn settle(&mut self, ctx: &Context<Self>) {
        let current = match self.meta.volume(&self.cfg.volume_id).await {
            Ok(current) => current,
            Err(e) => {
                tracing::warn!(volume = %self.cfg.volume_id, error = %e, "cannot read the volume's owner record");
                return;
            }
        };
        let claim = match &current {
            None => true,
            Some((record, _)) => record.primary == self.node_id,
        };
        if !claim {
            let (VolumeRecord { primary, epoch, .. }, _) =
                current.expect("a record names another primary");
            self.role = Role::Backup { primary, epoch };
            self.report();
            return;
        }
        match self
            .meta
            .claim_volume(&self.cfg.volume_id, self.node_id, current.as_ref())
            .await
        {
            Ok(Ok(record)) => {
                tracing::info!(volume = %self.cfg.volume_id, epoch = record.epoch, "primary for volume");
                let manager = ShardManager::new(self.cfg.clone(), self.factory.clone());
                self.shards = Some(
                    ctx.host()
                        .spawn(manager, crate::actor::DEFAULT_MAILBOX_CAPACITY),
                );
                self.role = Role::Primary {
                    epoch: record.epoch,
                };
            }
            Ok(Err(Some((record, _)))) => {
                self.role = Role::Backup {
                    primary: record.primary,
                    epoch: record.epoch,
                }
            }
            Ok(Err(None)) => self.role = Role::Unknown,
            Err(e) => {
                tracing::warn!(volume = %self.cfg.volume_id, error = %e, "claim of volume failed")
            }
        }
        self.report();
    }
}

impl Actor for VolumeManager {
    fn name(&self) -> String {
        format!("volume-manager-{}", self.cfg.volume_id)
    }

    async fn started(&mut self, ctx: &Context<Self>) {
        self.settle(ctx).await;
    }
}

/// Steps down: shuts the volume's shards down (in-flight writes finish) and
/// stops serving it. Replies when done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopVolume;

impl Message for StopVolume {
    type Reply = ();
}

impl Handler<StopVolume> for VolumeManager {
    async fn handle(&mut self, _msg: StopVolume, _ctx: &Context<Self>) -> Reply<()> {
        if let Some(shards) = self.shards.take() {
            let _ = shards.send(ShutdownShards).await;
            shards.stop();
        }
        self.role = Role::Stopped;
        self.report();
        Reply::now(())
    }
}

/// The volume's current role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRole;

impl Message for GetRole {
    type Reply = Role;
}

impl Handler<GetRole> for VolumeManager {
    async fn handle(&mut self, _msg: GetRole, _ctx: &Context<Self>) -> Reply<Role> {
        Reply::now(self.role.clone())
    }
}
