//! The `MetadataBackend` trait: a key-value store with etcd v3's semantics,
//! which every metadata backend (embedded, embedded over gRPC, etcd) meets.
//!
//! Semantics (from etcd's API reference, <https://etcd.io/docs/v3.5/learning/api/>):
//! - The store has one revision counter, starting at 1 for an empty store. A
//!   write (put, delete that removed something, or a transaction with at least
//!   one such write) increments it by one; every key it changed gets that
//!   revision as `mod_revision`. A read or a failed compare does not.
//! - Each key has `create_revision` (when it was last created), `mod_revision`
//!   and `version` (writes since creation, 1 after the creating put). A deleted
//!   key has all three at 0 for comparisons.
//! - A transaction evaluates all its compares on one revision, then applies
//!   either its success or its failure operations atomically. A value compare
//!   on a missing key is false, whatever the operator (as in etcd).
//! - A lease has a TTL in milliseconds (etcd's granularity is whole seconds:
//!   the etcd backend rounds up, with etcd's own minimum). Keys put with a
//!   lease are deleted, at one revision, when it expires or is revoked.
//!   `lease_keep_alive` of an expired lease fails with `LeaseNotFound`.
//! - `watch(prefix, from)` delivers every change to keys under `prefix` with
//!   `mod_revision >= from`, in revision order, then live changes; `Compacted`
//!   when history before `from` is gone.

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;
use serde::{Deserialize, Serialize};

/// A store revision (etcd's `int64` revision).
pub type Revision = i64;
/// A lease id; 0 means "no lease".
pub type LeaseId = i64;

/// A key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that last created the key (its first put since absent).
    pub create_revision: Revision,
    /// The revision of the key's last write.
    pub mod_revision: Revision,
    /// Writes to the key since its creation, 1 after the creating put.
    pub version: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

/// What a compare looks at, and the operand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The key's value (a compare on a missing key is false).
    Value(Vec<u8>),
    /// The key's `mod_revision` (0 for a missing key).
    ModRevision(Revision),
    /// The key's `create_revision` (0 for a missing key).
    CreateRevision(Revision),
    /// The key's `version` (0 for a missing key).
    Version(i64),
}

/// A compare operator: `key's target <op> operand`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    /// The key's target equals the operand.
    Equal,
    /// The key's target differs from the operand.
    NotEqual,
    /// The key's target is less than the operand (bytewise for values).
    Less,
    /// The key's target is greater than the operand (bytewise for values).
    Greater,
}

/// One compare of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// The operator.
    pub op: CompareOp,
    /// What of the key is compared, with the operand.
    pub target: CompareTarget,
}

impl Compare {
    /// `key`'s mod revision equals `rev` (0: the key does not exist).
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, rev: Revision) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::ModRevision(rev) }
    }

    /// `key`'s create revision compared with `rev` (0: the key does not exist).
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, rev: Revision) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::CreateRevision(rev) }
    }

    /// `key`'s value compared with `value` (false for a missing key).
    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Compare { key: key.into(), op, target: CompareTarget::Value(value.into()) }
    }
}

/// One operation of a transaction branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Put `key` = `value`, attached to `lease` (0: none).
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease to attach the key to, 0 for none.
        lease: LeaseId,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Read `key` (as of the transaction's revision, after its earlier writes).
    Get {
        /// The key.
        key: Vec<u8>,
    },
}

/// A transaction: if every compare holds, `success`, else `failure`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// The compares, all evaluated on one revision (empty: they hold).
    pub compare: Vec<Compare>,
    /// The operations applied, in order, when every compare holds.
    pub success: Vec<TxnOp>,
    /// The operations applied, in order, when a compare fails.
    pub failure: Vec<TxnOp>,
}

/// The outcome of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Whether the compares held (so `success` ran).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
    /// One entry per `Get` of the branch that ran, in order.
    pub gets: Vec<Option<KeyValue>>,
}

/// Keys under a prefix, with the revision they were read at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    /// The keys under the prefix, in key order.
    pub kvs: Vec<KeyValue>,
    /// The store revision the keys were read at.
    pub revision: Revision,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    /// A put; `kv` is the key as written.
    Put(KeyValue),
    /// A delete of `key` at `mod_revision`.
    Delete {
        /// The key deleted.
        key: Vec<u8>,
        /// The revision of the delete.
        mod_revision: Revision,
    },
}

impl WatchEvent {
    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }

    /// The key changed.
    pub fn key(&self) -> &[u8] {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// A stream of watch events; ends or yields an error when the backend goes away.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, MetaError>> + Send>>;

/// What went wrong in a metadata backend.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MetaError {
    /// The backend could not be reached or refused service. Transient.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// The call did not complete in time; it may or may not have taken effect. Transient.
    #[error("metadata call timed out: {0}")]
    Timeout(String),
    /// The lease does not exist (expired or revoked).
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The watch asked for history that was compacted away.
    #[error("revision {requested} is compacted (oldest kept: {oldest})")]
    Compacted {
        /// The revision the watch asked to start from.
        requested: Revision,
        /// The oldest revision whose history is still kept.
        oldest: Revision,
    },
    /// The request is malformed.
    #[error("invalid metadata request: {0}")]
    Invalid(String),
    /// The backend's own storage failed.
    #[error("metadata storage error: {0}")]
    Storage(String),
    /// The metadata endpoint refused the caller's identity (no or an
    /// unknown credential, or not a node's): not retried; fix the node's
    /// token or certificate.
    #[error("{0}")]
    Refused(String),
}

impl crate::retry::Transient for MetaError {
    /// Whether the call may be retried as is (if it is safe to repeat).
    fn is_transient(&self) -> bool {
        matches!(self, MetaError::Unavailable(_) | MetaError::Timeout(_))
    }
}

/// A metadata backend; see the module docs for the semantics every method keeps.
#[async_trait]
pub trait MetadataBackend: Send + Sync + 'static {
    /// The key, if present.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, MetaError>;

    /// All keys starting with `prefix`, in key order.
    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, MetaError>;

    /// Puts `key` = `value` attached to `lease` (0: none); returns the new revision.
    /// Errors: `LeaseNotFound`.
    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision, MetaError>;

    /// Deletes `key`; returns whether it existed and the store revision after.
    async fn delete(&self, key: &[u8]) -> Result<(bool, Revision), MetaError>;

    /// Runs a transaction. Errors: `LeaseNotFound` (a put names a dead lease;
    /// nothing is applied).
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, MetaError>;

    /// Grants a lease of `ttl_ms` milliseconds; returns its id.
    async fn lease_grant(&self, ttl_ms: u64) -> Result<LeaseId, MetaError>;

    /// Renews `lease` for its full TTL; returns the TTL in milliseconds.
    /// Errors: `LeaseNotFound`.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<u64, MetaError>;

    /// Revokes `lease`, deleting its keys. Revoking a missing lease is an error
    /// (`LeaseNotFound`), as in etcd.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), MetaError>;

    /// Watches keys under `prefix` from revision `from` (0: from now).
    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, MetaError>;
}
