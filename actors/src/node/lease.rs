//! The node's liveness lease: renewed every third of its TTL from a task
//! outside the actor; each renewal reopens the lease gate for the time the
//! lease is certainly valid (see `crate::lease`). When the metadata store
//! says the lease is gone, every primary on this node steps down before the
//! node registers again under a new lease.

use tokio::time::Duration;

use crate::actor::{Context, Handler, Message, Reply};
use crate::lease::GateTime;
use crate::meta::backend::{LeaseId, MetaError};
use crate::volume::LeaseLapsed;

use super::{meta_unavailable, Node};

impl Node {
    /// Renews the lease every third of its TTL, from a task outside the actor.
    pub(super) fn spawn_heartbeat(&self, ctx: &Context<Self>) {
        let (meta, lease, me, gate) = (self.meta.clone(), self.lease, ctx.address(), self.gate.clone());
        let period = Duration::from_millis(self.cfg.lease_ttl_ms / 3);
        ctx.host().spawn_detached(async move {
            loop {
                tokio::time::sleep(period).await;
                if me.is_closed() {
                    return;
                }
                crate::buggify::delay("node.heartbeat.before_keep_alive", 1_000).await;
                let sent = GateTime::now();
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
}

/// Sent by the heartbeat task when the lease expired before it was renewed.
pub(super) struct LeaseLost {
    lease: LeaseId,
}

impl Message for LeaseLost {
    type Reply = ();
}

/// Of failed attempts in a row to register again after the lease lapsed,
/// the first and every this many are logged (at 200 ms apart: every 10 s).
pub const LOG_EVERY_RETRIES: u64 = 50;

impl Node {
    /// Counts a failed attempt to register again; whether to log it.
    fn count_lease_retry(&mut self) -> bool {
        self.lease_retries += 1;
        self.lease_retries == 1 || self.lease_retries.checked_rem(LOG_EVERY_RETRIES) == Some(0)
    }
}

impl Handler<LeaseLost> for Node {
    async fn handle(&mut self, msg: LeaseLost, ctx: &Context<Self>) -> Reply<()> {
        if msg.lease != self.lease || self.stopping {
            return Reply::now(());
        }
        // Once per lapse: each failed attempt to register again comes back
        // here 200 ms later (see `count_lease_retry` for their logs).
        if self.lease_retries == 0 {
            tracing::warn!(lease = msg.lease, "node lease expired; registering again");
        }
        self.gate.close();
        // While the lease was gone, a backup may have taken any of this
        // node's volumes over. Every primary steps down before the gate can
        // open again; one still named by its owner record claims again, at a
        // new epoch.
        // All at once: each steps down within one check of its own.
        let lapsed = self.volumes.iter().map(|(volume_id, slot)| async move {
            if slot.manager.send(LeaseLapsed).await.is_err() {
                tracing::warn!(volume = %volume_id, "volume manager gone while the lease lapsed");
            }
        });
        futures::future::join_all(lapsed).await;
        let sent = GateTime::now();
        let retry_later = |ctx: &Context<Self>, lease| {
            let me = ctx.address();
            ctx.host().spawn_detached(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                me.do_send(LeaseLost { lease });
            });
        };
        match self.meta.grant_lease(self.cfg.lease_ttl_ms).await {
            Ok(lease) => {
                self.lease = lease;
                crate::buggify::delay("node.lease_lost.before_register", 1_000).await;
                let Some(record) = self.record() else {
                    // No node id yet: start-up registers, then opens the gate.
                    self.lease_retries = 0;
                    return Reply::now(());
                };
                match self.meta.register_node(&record, lease).await {
                    // The gate opens, and the heartbeat that keeps it open
                    // starts, only once the node is visible as live again: a
                    // backup that sees no record may take the volumes over.
                    Ok(()) => {
                        if self.lease_retries > 0 {
                            tracing::info!(retries = self.lease_retries, "node record published again");
                        }
                        self.lease_retries = 0;
                        self.gate.renewed(sent, self.cfg.lease_ttl_ms);
                        self.spawn_heartbeat(ctx);
                    }
                    Err(e) => {
                        // Never serve under a lease without a node record:
                        // start over with a new lease (this one expires).
                        if self.count_lease_retry() {
                            let error = meta_unavailable(e);
                            tracing::warn!(%error, retries = self.lease_retries, "could not publish the node record; retrying with a new lease every 200 ms");
                        }
                        retry_later(ctx, lease);
                    }
                }
            }
            Err(e) => {
                if self.count_lease_retry() {
                    let error = meta_unavailable(e);
                    tracing::warn!(%error, retries = self.lease_retries, "could not get a new lease; retrying every 200 ms");
                }
                retry_later(ctx, self.lease);
            }
        }
        Reply::now(())
    }
}
