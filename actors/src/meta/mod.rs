//! The metadata store: the source of truth for shard -> volume, volume ->
//! owner node (+ epoch), node liveness and id allocation.
//!
//! [`backend::MetadataBackend`] is the storage contract (etcd's semantics).
//! The default backend is the [`embedded::MetadataStore`] actor, reached
//! through its handle [`embedded::EmbeddedBackend`], in process or over gRPC
//! ([`remote`]); the etcd backend lives in `attache-runtime`. [`store`] builds
//! Attaché's domain operations on any backend, retrying transient failures
//! with `crate::retry`.

pub mod backend;
#[cfg(feature = "testkit")]
pub mod conformance;
pub mod embedded;
pub mod remote;
pub mod state;
pub mod store;

pub use backend::{KeyValue, LeaseId, MetaError, MetadataBackend, Revision};
pub use embedded::{EmbeddedBackend, MetadataStore};
pub use store::{MetaOps, NodeId, NodeRecord, ShardRecord, VolumeRecord};
