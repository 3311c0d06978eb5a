//! The metadata store: the source of truth for shard -> volume, volume ->
//! owner node (+ epoch), node liveness and id allocation.
//!
//! [`backend::MetadataBackend`] is the storage contract (etcd's semantics);
//! [`embedded::EmbeddedBackend`] is the default backend; the etcd backend lives
//! in `attache-runtime`. [`store`] builds Attaché's domain operations on any
//! backend, with [`retry`] for transient failures.

pub mod backend;
pub mod conformance;
pub mod embedded;
pub mod remote;
pub mod retry;
pub mod state;
pub mod store;

pub use backend::{KeyValue, LeaseId, MetaError, MetadataBackend, Revision};
pub use store::{MetaOps, MetadataStore, NodeId, NodeRecord, ShardRecord, VolumeRecord};
