//! Client requests routed by shard id: the node finds the shard's volume
//! (from the metadata store, then cached) and forwards the request to that
//! volume's `ShardManager` when this node is its primary; stale reads may
//! also go to the read-only view a backup keeps. Otherwise the client gets
//! `UNAVAILABLE` with the primary's address as a hint.
//!
//! The node actor never waits on the metadata store to route: a shard not
//! in the cache, and the hint of a refusal, are looked up outside it (see
//! [`Route`]). Each refusal costs two reads of the metadata store; done in
//! the actor, they had capped a node at about 30 misrouted requests a
//! second in the simulation, and under a retry storm its mailbox held
//! every request (role changes included) for tens of seconds (scenario
//! `misrouted-requests-under-load`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;

use crate::actor::{Addr, Context, Handler, Message, Reply};
use crate::error::AttacheError;
use crate::meta::store::{MetaOps, ShardRecord, VolumeRecord};
use crate::shard::layout::ShardState;
use crate::shard::{ShardId, ShardOp, Stale, StaleRead};
use crate::shard_manager::{ShardCall, ShardManager};
use crate::volume::Role;

use super::{meta_unavailable, Node, VolumeSlot};

/// What the node knows of a shard's volume: [`Node`]'s route cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Known {
    /// The shard lives on this volume (a shard never moves).
    Volume(String),
    /// The shard was deleted (final: shard ids are never reused).
    Deleted,
}

/// Where a request for a shard goes, decided by the node actor without
/// waiting on the metadata store: a lookup (a shard not cached yet, the
/// primary's address for a hint) runs outside the actor, so one slow or
/// misrouted request does not hold up the node's others, nor the volume
/// role changes queued behind them.
pub(super) enum Route {
    /// To this shard manager of the volume (by its id), now.
    Here(String, Addr<ShardManager>),
    /// Refused now.
    Refused(AttacheError),
    /// Known once the metadata store answers.
    Later(futures::future::BoxFuture<'static, Result<(String, Addr<ShardManager>), AttacheError>>),
}

impl Route {
    /// The volume and shard manager, or why there is none.
    pub(super) async fn resolve(self) -> Result<(String, Addr<ShardManager>), AttacheError> {
        match self {
            Route::Here(volume_id, shards) => Ok((volume_id, shards)),
            Route::Refused(e) => Err(e),
            Route::Later(lookup) => lookup.await,
        }
    }
}

/// Tells the node what the metadata store said of a shard's volume, to cache.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LearnRoute {
    shard_id: ShardId,
    known: Known,
}

impl Message for LearnRoute {
    type Reply = ();
}

impl Handler<LearnRoute> for Node {
    async fn handle(&mut self, msg: LearnRoute, _ctx: &Context<Self>) -> Reply<()> {
        // Deleted is final: an older lookup's answer does not undo it.
        if self.routes.get(&msg.shard_id) != Some(&Known::Deleted) {
            self.routes.insert(msg.shard_id, msg.known);
        }
        Reply::now(())
    }
}

/// Most route lookups (a shard's volume, a refusal's primary hint, a
/// `VolumeOf`) a node runs at once; past that a request that needs one is
/// refused at once with `UNAVAILABLE` (no hint). So a storm of misrouted
/// requests holds at most this many requests waiting on a lookup, and
/// sends at most this many reads at once to the metadata store, which also
/// renews the nodes' leases.
pub const MAX_ROUTE_LOOKUPS: usize = 64;

/// How long the lookups for one request may take together, ms (a soft
/// bound: a lookup ready when the timer fires still wins); past that the
/// request is refused with `UNAVAILABLE` (a refusal's hint is left out) and
/// has had no effect. Half the shortest attempt timeout a client uses (the
/// simulation's `op_timeout_ms`, 1000 ms; `ClientSettings` defaults to 10
/// s), so the client still gets the answer. It must stay well under the
/// request-id window (`request_window_ms`: 5 s in the simulation, 600 s by
/// default): a write forwarded after its retry was applied and its request
/// id forgotten would apply twice. (A retry or a hedged attempt may still
/// overtake a write waiting on its lookup; within the window its request id
/// makes that harmless.)
pub const ROUTE_LOOKUP_TIMEOUT_MS: u64 = 500;

/// When the lookups of a request that starts now must end.
fn lookup_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_millis(ROUTE_LOOKUP_TIMEOUT_MS)
}

/// `lookup`, or `None` when it has not ended by `deadline`.
async fn bounded<T>(deadline: tokio::time::Instant, lookup: impl std::future::Future<Output = T>) -> Option<T> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let done = tokio::time::timeout(left, lookup).await.ok();
    if done.is_none() {
        tracing::debug!(ms = ROUTE_LOOKUP_TIMEOUT_MS, "route lookup gave up: the metadata store did not answer");
    }
    done
}

/// The volume of `shard_id`, looked up by `deadline` ([`look_up`]).
async fn look_up_by(
    deadline: tokio::time::Instant,
    meta: &MetaOps,
    me: &Addr<Node>,
    shard_id: ShardId,
) -> Result<String, AttacheError> {
    bounded(deadline, look_up(meta, me, shard_id)).await.unwrap_or_else(|| {
        Err(AttacheError::unavailable(format!(
            "the metadata store did not say within {ROUTE_LOOKUP_TIMEOUT_MS} ms where shard {shard_id} lives; retry"
        )))
    })
}

fn deleted(shard_id: ShardId) -> AttacheError {
    AttacheError::NotFound(format!("shard {shard_id} was deleted"))
}

/// The volume a shard lives on, from the metadata store; the answer is
/// sent to the node (`me`) to cache. Errors: `NotFound` (deleted, or no
/// such shard), `Unavailable` (the metadata store did not answer).
async fn look_up(meta: &MetaOps, me: &Addr<Node>, shard_id: ShardId) -> Result<String, AttacheError> {
    match meta.shard(shard_id).await.map_err(meta_unavailable)? {
        Some(ShardRecord { state: ShardState::Deleted, .. }) => {
            me.do_send(LearnRoute { shard_id, known: Known::Deleted });
            Err(deleted(shard_id))
        }
        Some(record) => {
            me.do_send(LearnRoute { shard_id, known: Known::Volume(record.volume_id.clone()) });
            Ok(record.volume_id)
        }
        None => Err(AttacheError::NotFound(format!("shard {shard_id} does not exist: check the id NewShard returned"))),
    }
}

/// `UNAVAILABLE` for a volume this node does not serve, naming its primary
/// when the metadata store knows it (two reads: the volume's record, the
/// live nodes) by `deadline`.
async fn not_primary(deadline: tokio::time::Instant, meta: &MetaOps, volume_id: &str) -> AttacheError {
    let hint = bounded(deadline, async {
        match meta.volume(volume_id).await {
            Ok(Some((VolumeRecord { primary, .. }, _))) => meta
                .live_nodes()
                .await
                .ok()
                .and_then(|nodes| nodes.into_iter().find(|n| n.node_id == primary))
                .map(|n| n.address),
            _ => None,
        }
    })
    .await;
    let message = match &hint {
        Some(Some(addr)) => format!("this node is not the primary for volume {volume_id}; the primary is at {addr}"),
        Some(None) => {
            format!("this node is not the primary for volume {volume_id} and no primary is known yet; retry")
        }
        None => format!(
            "this node is not the primary for volume {volume_id}, and the metadata store did not say within \
             {ROUTE_LOOKUP_TIMEOUT_MS} ms which node is; retry on another node"
        ),
    };
    AttacheError::Unavailable { message, primary_hint: hint.flatten() }
}

impl Node {
    /// A permit for one more route lookup outside the actor, held until the
    /// lookup ends. Errors: `UNAVAILABLE` when [`MAX_ROUTE_LOOKUPS`] are
    /// under way, naming `what` would have been looked up.
    fn lookup_permit(&self, what: impl FnOnce() -> String) -> Result<OwnedSemaphorePermit, AttacheError> {
        self.lookups.clone().try_acquire_owned().map_err(|_| {
            AttacheError::unavailable(format!(
                "this node has {MAX_ROUTE_LOOKUPS} route lookups under way and does not look up {} now; retry, on \
                 another node if this one stays busy",
                what()
            ))
        })
    }

    /// Where a request for `shard_id` goes: to the shard manager that
    /// `serves` picks from a volume's slot (`None`: this node does not
    /// serve the request for that volume, and the client gets
    /// `UNAVAILABLE` with the primary's address as a hint).
    fn route(
        &self,
        shard_id: ShardId,
        ctx: &Context<Self>,
        serves: fn(&VolumeSlot) -> Option<&Addr<ShardManager>>,
    ) -> Route {
        if self.stopping {
            return Route::Refused(AttacheError::unavailable("this node is shutting down; retry on another node"));
        }
        let meta = self.meta.clone();
        match self.routes.get(&shard_id) {
            Some(Known::Deleted) => Route::Refused(deleted(shard_id)),
            Some(Known::Volume(volume_id)) => match self.volumes.get(volume_id).and_then(serves) {
                Some(shards) => Route::Here(volume_id.clone(), shards.clone()),
                None => match self.lookup_permit(|| {
                    format!("which node is the primary for volume {volume_id}, which this node is not")
                }) {
                    Ok(permit) => {
                        let volume_id = volume_id.clone();
                        Route::Later(Box::pin(async move {
                            let _permit = permit;
                            Err(not_primary(lookup_deadline(), &meta, &volume_id).await)
                        }))
                    }
                    Err(busy) => Route::Refused(busy),
                },
            },
            None => {
                let permit = match self.lookup_permit(|| format!("which volume shard {shard_id} is on")) {
                    Ok(permit) => permit,
                    Err(busy) => return Route::Refused(busy),
                };
                // The managers as of now: a role that changes during the
                // lookup is one that changes after the request was routed
                // (its manager, retired first, refuses it).
                let here: BTreeMap<String, Addr<ShardManager>> = self
                    .volumes
                    .iter()
                    .filter_map(|(volume_id, slot)| serves(slot).map(|s| (volume_id.clone(), s.clone())))
                    .collect();
                let me = ctx.address();
                Route::Later(Box::pin(async move {
                    let _permit = permit;
                    let deadline = lookup_deadline();
                    let volume_id = look_up_by(deadline, &meta, &me, shard_id).await?;
                    match here.get(&volume_id) {
                        Some(shards) => Ok((volume_id, shards.clone())),
                        None => Err(not_primary(deadline, &meta, &volume_id).await),
                    }
                }))
            }
        }
    }

    /// [`Node::route`] to the volume's primary shard manager on this node.
    pub(super) fn route_to_primary(&self, shard_id: ShardId, ctx: &Context<Self>) -> Route {
        self.route(shard_id, ctx, |slot| match slot {
            VolumeSlot { role: Role::Primary { .. }, shards: Some(shards), .. } => Some(shards),
            _ => None,
        })
    }
}

/// Forwards `msg` to the shard manager `route` names: enqueued by the
/// node actor when the route is known now (requests with a known route
/// keep the order of the node's mailbox), else sent once the lookup
/// answers (within [`ROUTE_LOOKUP_TIMEOUT_MS`]; a request sent meanwhile
/// may overtake it). A manager whose volume changed role in the meantime
/// refuses it: it was retired first (`ShardManager::retired_flag`).
async fn forward<T, M>(route: Route, msg: M) -> Reply<Result<T, AttacheError>>
where
    T: Send + 'static,
    M: Message<Reply = Result<T, AttacheError>>,
    ShardManager: Handler<M>,
{
    let shards = match route {
        Route::Here(_, shards) => shards,
        Route::Refused(e) => return Reply::now(Err(e)),
        later => {
            return Reply::later(async move {
                let (_, shards) = later.resolve().await?;
                shards.send(msg).await.unwrap_or_else(|e| Err(e.into()))
            })
        }
    };
    match shards.enqueue(msg).await {
        Ok(pending) => Reply::later(async move { pending.await.unwrap_or_else(|e| Err(e.into())) }),
        Err(e) => Reply::now(Err(e.into())),
    }
}

impl<M: ShardOp> Handler<ShardCall<M>> for Node
where
    ShardManager: Handler<ShardCall<M>>,
{
    async fn handle(&mut self, msg: ShardCall<M>, ctx: &Context<Self>) -> Reply<M::Reply> {
        forward(self.route_to_primary(msg.shard_id, ctx), msg).await
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
    async fn handle(&mut self, msg: VolumeOf, ctx: &Context<Self>) -> Reply<Result<String, AttacheError>> {
        let shard_id = msg.shard_id;
        match self.routes.get(&shard_id) {
            Some(Known::Volume(volume_id)) => Reply::now(Ok(volume_id.clone())),
            Some(Known::Deleted) => Reply::now(Err(deleted(shard_id))),
            None => {
                let permit = match self.lookup_permit(|| format!("which volume shard {shard_id} is on")) {
                    Ok(permit) => permit,
                    Err(busy) => return Reply::now(Err(busy)),
                };
                let (meta, me) = (self.meta.clone(), ctx.address());
                Reply::later(async move {
                    let _permit = permit;
                    look_up_by(lookup_deadline(), &meta, &me, shard_id).await
                })
            }
        }
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
    async fn handle(&mut self, msg: StaleCall<M>, ctx: &Context<Self>) -> Reply<Result<(M::Ok, u64), AttacheError>> {
        let route = self.route(msg.shard_id, ctx, |slot| match slot {
            VolumeSlot { role: Role::Primary { .. } | Role::Backup { .. }, shards: Some(shards), .. } => Some(shards),
            _ => None,
        });
        let call =
            ShardCall { shard_id: msg.shard_id, op: Stale { op: msg.op, max_staleness_ms: msg.max_staleness_ms } };
        forward(route, call).await
    }
}
