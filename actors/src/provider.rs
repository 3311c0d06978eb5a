//! `VolumeProvider`: how a node attaches volumes and takes the storage-level
//! write fence on one (the third fencing layer; see ARCHITECTURE.md, "Fencing").
//!
//! On real io2 multi-attach the fence is an NVMe reservation: the new
//! primary registers its key and preempts the old holder, after which the
//! device rejects the old holder's writes. The simulation models exactly that
//! in `SimEbs`; the local-directory provider (`attache-runtime`) keeps an
//! epoch file in the volume that every write batch checks. An AWS provider
//! (attach/detach through the EC2 API, reservations through NVMe) fits the
//! same calls.

use std::time::Duration;

use async_trait::async_trait;

use crate::engine::EngineError;

/// How long a claimant's `acquire` waits for write batches that hold a
/// fence checked by the writer (the `EPOCH` file of local volumes: a batch
/// holds it from its check to its sync) before it fails with `Io`.
pub const FENCE_WAIT: Duration = Duration::from_secs(10);

/// Attachment and fencing of volumes, for one node.
#[async_trait]
pub trait VolumeProvider: Send + Sync + 'static {
    /// Attaches `volume` to this node (idempotent). Errors: `Io` (no such
    /// volume, or too many attachments: io2 allows 16).
    async fn attach(&self, volume: &str) -> Result<(), EngineError>;

    /// Whether `volume` is attached to this node now.
    async fn is_attached(&self, volume: &str) -> bool;

    /// Takes the write fence on `volume` at `epoch`, preempting any holder of
    /// a lower epoch: once this returns, the volume rejects writes from any
    /// other holder. Errors: `Fenced` when a holder of a higher epoch exists
    /// (this node's claim is stale), `Io` when not attached.
    async fn acquire(&self, volume: &str, epoch: u64) -> Result<(), EngineError>;

    /// The epoch this node holds the fence at on `volume`, if any.
    fn held_epoch(&self, volume: &str) -> Option<u64>;

    /// Whether a node that is not a volume's primary can read it (a backup's
    /// read-only view, for stale reads). `false` for block devices with a
    /// non-cluster filesystem (ext4, XFS), which only the primary mounts:
    /// backups then serve no reads, and stale reads sent to them answer
    /// UNAVAILABLE with a hint to the primary.
    fn backups_read(&self) -> bool {
        true
    }

    /// Bytes free for new data on `volume` as this node sees it now: the
    /// filesystem's blocks available to unprivileged writers times its
    /// fragment size (`statvfs`: `f_bavail * f_frsize`). `None` when
    /// unknown: the volume is not mounted here, or its filesystem did not
    /// answer. New shards go where there is most room (see
    /// `node::lifecycle::choose_volume`).
    async fn free_bytes(&self, _volume: &str) -> Option<u64> {
        None
    }

    /// This node's term as `volume`'s primary ended and its shards are
    /// closed: undo what `acquire` set up to serve it (a block volume's
    /// filesystem is unmounted). The fence is not released: the next
    /// primary preempts it. Errors: `Io`; the caller logs it and goes on.
    async fn release(&self, _volume: &str) -> Result<(), EngineError> {
        Ok(())
    }
}
