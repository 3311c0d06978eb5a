//! Client requests routed by shard id: the node finds the shard's volume
//! (from the metadata store, then cached) and forwards the request to that
//! volume's `ShardManager` when this node is its primary, keeping the
//! caller's order; stale reads may also go to the read-only view a backup
//! keeps. Otherwise the client gets `UNAVAILABLE` with the primary's address
//! as a hint.

use serde::{Deserialize, Serialize};

use crate::actor::{Addr, Context, Handler, Message, Reply};
use crate::error::AttacheError;
use crate::meta::store::{ShardRecord, VolumeRecord};
use crate::shard::layout::ShardState;
use crate::shard::{ShardId, ShardOp, Stale, StaleRead};
use crate::shard_manager::{ShardCall, ShardManager};
use crate::volume::Role;

use super::{meta_unavailable, Node, VolumeSlot};

impl Node {
    /// The volume a shard lives on, from the cache or the metadata store.
    pub(super) async fn volume_of(&mut self, shard_id: ShardId) -> Result<String, AttacheError> {
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
    pub(super) async fn not_primary(&self, volume_id: &str) -> AttacheError {
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
    pub(super) async fn shard_manager(
        &mut self,
        shard_id: ShardId,
    ) -> Result<(String, Addr<ShardManager>), AttacheError> {
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

impl<M: ShardOp> Handler<ShardCall<M>> for Node
where
    ShardManager: Handler<ShardCall<M>>,
{
    async fn handle(&mut self, msg: ShardCall<M>, _ctx: &Context<Self>) -> Reply<M::Reply> {
        let shards = match self.shard_manager(msg.shard_id).await {
            Ok((_, shards)) => shards,
            Err(e) => return Reply::now(Err(e)),
        };
        match shards.enqueue(msg).await {
            Ok(pending) => Reply::later(async move { pending.await.unwrap_or_else(|e| Err(e.into())) }),
            Err(e) => Reply::now(Err(e.into())),
        }
    }
}

/// The volume a shard lives on. Errors: `NotFound`, `Unavailable`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeOf {
    /// The shard.
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
    /// The shard.
    pub shard_id: ShardId,
    /// The read.
    pub op: M,
    /// The oldest view the caller accepts, ms; 0: any (see [`Stale`]).
    pub max_staleness_ms: u64,
}

impl<M: StaleRead> Message for StaleCall<M> {
    type Reply = Result<(M::Ok, u64), AttacheError>;
}

impl<M: StaleRead> Handler<StaleCall<M>> for Node
where
    ShardManager: Handler<ShardCall<Stale<M>>>,
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
        match shards
            .enqueue(ShardCall {
                shard_id: msg.shard_id,
                op: Stale { op: msg.op, max_staleness_ms: msg.max_staleness_ms },
            })
            .await
        {
            Ok(pending) => Reply::later(async move { pending.await.unwrap_or_else(|e| Err(e.into())) }),
            Err(e) => Reply::now(Err(e.into())),
        }
    }
}
