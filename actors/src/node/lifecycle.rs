//! Shard lifecycle and cluster-wide calls: creating a shard on a volume
//! this node is primary for, closing and deleting shards (the shard first,
//! then its record), listings, the cluster status, and shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::actor::{Context, Handler, Message, Reply};
use crate::error::AttacheError;
use crate::meta::store::{NodeId, NodeRecord, ShardRecord, VolumeRecord};
use crate::shard::layout::ShardState;
use crate::shard::{Close, ShardId};
use crate::shard_manager::{CreateShard, DeleteShard, ShardCall};
use crate::volume::{Role, StopVolume};

use super::{meta_unavailable, Node, PlacedShard};

/// Creates a shard for `client_id` on a volume this node is primary for
/// (chosen by free space, then number of shards: [`choose_volume`]), with a
/// size limit in bytes (`None`: the default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewShard {
    /// The client id that will own the shard.
    pub client_id: String,
    /// The shard's size limit, bytes; `None` for the node's default (0 is invalid).
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
        // No id is allocated while this node's lease may have expired (the
        // shard manager checks again before it writes).
        if !self.gate.is_open() {
            return Reply::now(Err(AttacheError::unavailable(
                "this node's lease may have expired: it creates no shard until the lease is renewed; retry on \
                 another node",
            )));
        }
        let candidates: Vec<_> = self
            .volumes
            .iter()
            .filter_map(|(id, slot)| match (&slot.role, &slot.shards) {
                (Role::Primary { .. }, Some(shards)) => Some((id.clone(), shards.clone(), slot.placed.clone())),
                _ => None,
            })
            .collect();
        if candidates.is_empty() {
            // Answered with a hint to a node that is primary for a volume,
            // looked up off the mailbox (the metadata store may be slow).
            let (meta, me) = (self.meta.clone(), self.node_id);
            return Reply::later(async move { Err(no_volume_here(&meta, me).await) });
        }
        let provider = self.provider.clone();
        let balanced = self.cfg.balanced_space_bytes;
        let meta = self.meta.clone();
        let default_limit = self.cfg.default_size_limit;
        Reply::later(async move {
            // Free space is asked off the mailbox, each volume bounded in
            // time: a stalled volume answers "unknown" and ranks last.
            let mut free = Vec::with_capacity(candidates.len());
            for (volume, _, placed) in &candidates {
                let bytes = tokio::time::timeout(FREE_BYTES_WAIT, provider.free_bytes(volume)).await.ok().flatten();
                free.push(VolumeSpace {
                    volume: volume.clone(),
                    free_bytes: bytes,
                    shards: placed.load(Ordering::Relaxed),
                });
            }
            let chosen = choose_volume(&free, balanced).expect("candidates are not empty");
            let (volume_id, shards, placed) = candidates.into_iter().nth(chosen).expect("chosen among the candidates");
            placed.fetch_add(1, Ordering::Relaxed);
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
            // A stall here (a GC pause) can outlast this node's lease: the
            // shard manager checks the lease gate again before it writes.
            crate::buggify::delay("node.new_shard.before_create", 3_000).await;
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

/// How long a new shard's placement waits for one volume's free space, ms;
/// past it the volume's free space counts as unknown.
pub const FREE_BYTES_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// One volume as [`choose_volume`] weighs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpace {
    /// The volume id.
    pub volume: String,
    /// Its free space, bytes (`VolumeProvider::free_bytes`); `None` when unknown.
    pub free_bytes: Option<u64>,
    /// The shards placed on it.
    pub shards: u64,
}

/// The index in `volumes` of the volume a new shard goes to, `None` when
/// `volumes` is empty. The rule, after HDFS's
/// `AvailableSpaceVolumeChoosingPolicy` made deterministic: the volumes
/// whose free space is known and within `balanced_bytes` of the freest
/// one's are balanced, and of those the one with the fewest shards wins
/// (ties: the smallest volume id); when no volume's free space is known,
/// all of them are balanced.
pub fn choose_volume(volumes: &[VolumeSpace], balanced_bytes: u64) -> Option<usize> {
    let most = volumes.iter().filter_map(|v| v.free_bytes).max();
    let balanced = |v: &VolumeSpace| match (most, v.free_bytes) {
        (None, _) => true,
        (Some(most), Some(free)) => most - free <= balanced_bytes,
        (Some(_), None) => false,
    };
    (0..volumes.len()).filter(|&i| balanced(&volumes[i])).min_by(|&a, &b| {
        let (a, b) = (&volumes[a], &volumes[b]);
        (a.shards, &a.volume).cmp(&(b.shards, &b.volume))
    })
}

/// What a node that is primary for no volume answers a `NewShard`:
/// UNAVAILABLE, with a hint to a live node that is primary for a volume
/// (the first such volume in id order) when the metadata store names one.
async fn no_volume_here(meta: &crate::meta::MetaOps, me: Option<NodeId>) -> AttacheError {
    let found = async {
        let volumes = meta.volumes().await.ok()?;
        let nodes = meta.live_nodes().await.ok()?;
        volumes.iter().filter(|v| v.primary != 0 && Some(v.primary) != me).find_map(|v| {
            nodes.iter().find(|n| n.node_id == v.primary).map(|n| (v.volume_id.clone(), n.address.clone()))
        })
    }
    .await;
    match found {
        Some((volume, addr)) => AttacheError::Unavailable {
            message: format!(
                "this node is primary for no volume now; the node at {addr} is primary for {volume}: create the shard \
                 there"
            ),
            primary_hint: Some(addr),
        },
        None => AttacheError::unavailable("this node is primary for no volume now; retry on another node"),
    }
}

/// The shard info of a deletion to finish: `Some` when the shard's record
/// exists, is not deleted yet and is `client_id`'s (`PermissionDenied` when
/// another client's); `None` when there is nothing to finish.
async fn finish_delete(
    meta: &crate::meta::MetaOps,
    shard_id: ShardId,
    client_id: &str,
) -> Option<Result<crate::shard::ShardInfo, AttacheError>> {
    let record = meta.shard(shard_id).await.ok()??;
    if record.state == ShardState::Deleted {
        return None;
    }
    if record.client_id != client_id {
        return Some(Err(AttacheError::PermissionDenied(format!(
            "client {client_id:?} does not own shard {shard_id}: use the client id that created it"
        ))));
    }
    tracing::info!(shard_id, "finishing a delete whose data is gone but whose record is not");
    Some(Ok(crate::shard::ShardInfo {
        shard_id,
        owner: record.client_id,
        state: ShardState::Deleted,
        size_limit: record.size_limit,
    }))
}

macro_rules! lifecycle_call {
    ($(#[$doc:meta])* $name:ident, $state:expr, |$shards:ident, $msg:ident| $forward:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            /// The shard.
            pub shard_id: ShardId,
            /// The client id that must own the shard.
            pub client_id: String,
        }

        impl Message for $name {
            type Reply = Result<PlacedShard, AttacheError>;
        }

        impl Handler<$name> for Node {
            async fn handle(&mut self, $msg: $name, ctx: &Context<Self>) -> Reply<Result<PlacedShard, AttacheError>> {
                let route = self.route_to_primary($msg.shard_id, ctx);
                let meta = self.meta.clone();
                Reply::later(async move {
                    let (volume_id, $shards) = route.resolve().await?;
                    let shard_id = $msg.shard_id;
                    let info = match $forward.await.unwrap_or_else(|e| Err(e.into())) {
                        Ok(info) => info,
                        // A delete whose data is gone but whose record is
                        // not (an earlier attempt removed the data, then
                        // could not update the record): finish it.
                        Err(AttacheError::NotFound(m)) if $state == ShardState::Deleted => {
                            finish_delete(&meta, shard_id, &$msg.client_id).await.ok_or(AttacheError::NotFound(m))??
                        }
                        Err(e) => return Err(e),
                    };
                    crate::buggify::delay("node.lifecycle.before_record", 1_000).await;
                    // The shard has changed on its volume: a failure now is
                    // no rejection, and the call (idempotent) is repeated.
                    meta.set_shard_state(shard_id, $state).await.map_err(|e| {
                        AttacheError::OutcomeUnknown(format!(
                            "shard {shard_id} changed on its volume, but its record could not be updated: {e}; \
                             repeat the call"
                        ))
                    })?;
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
    |shards, msg| shards.send(ShardCall { shard_id: msg.shard_id, op: Close { client_id: msg.client_id.clone() } })
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
    /// The client id whose shards are listed (deleted shards left out).
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
    /// The live nodes, by id.
    pub nodes: Vec<NodeRecord>,
    /// Every volume's owner record.
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

/// Shuts the node down: stops taking requests (one whose route lookup was
/// under way is refused by its volume's shard manager once that volume is
/// closed), lets in-flight writes finish, closes every volume, and revokes
/// the lease. Replies when done.
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

#[cfg(test)]
mod tests {
    use super::{choose_volume, VolumeSpace};

    const GIB: u64 = 1 << 30;

    fn vol(volume: &str, free_gib: Option<u64>, shards: u64) -> VolumeSpace {
        VolumeSpace { volume: volume.into(), free_bytes: free_gib.map(|g| g * GIB), shards }
    }

    #[test]
    fn the_freest_volume_wins_when_the_others_are_far_behind() {
        let vols = [vol("vol-1", Some(5), 0), vol("vol-2", Some(100), 40), vol("vol-3", Some(60), 1)];
        assert_eq!(choose_volume(&vols, 10 * GIB), Some(1));
    }

    #[test]
    fn among_balanced_volumes_the_fewest_shards_win_then_the_smallest_id() {
        let vols = [vol("vol-1", Some(100), 7), vol("vol-2", Some(95), 3), vol("vol-3", Some(91), 3)];
        assert_eq!(choose_volume(&vols, 10 * GIB), Some(1), "vol-3 ties on shards; vol-2 has the smaller id");
        assert_eq!(choose_volume(&vols, 4 * GIB), Some(0), "vol-2 is 5 GiB behind: not balanced");
        assert_eq!(choose_volume(&vols, 5 * GIB), Some(1), "the bound is inclusive");
    }

    #[test]
    fn a_volume_of_unknown_space_loses_to_any_known_one() {
        let vols = [vol("vol-1", None, 0), vol("vol-2", Some(0), 9)];
        assert_eq!(choose_volume(&vols, 10 * GIB), Some(1));
        let unknown = [vol("vol-1", None, 4), vol("vol-2", None, 2)];
        assert_eq!(choose_volume(&unknown, 10 * GIB), Some(1), "all unknown: by shards");
        assert_eq!(choose_volume(&[], 10 * GIB), None);
    }

    #[test]
    fn a_full_volume_is_passed_over_while_another_has_room() {
        let vols = [vol("vol-1", Some(0), 0), vol("vol-2", Some(20), 50)];
        assert_eq!(choose_volume(&vols, 10 * GIB), Some(1));
    }
}
