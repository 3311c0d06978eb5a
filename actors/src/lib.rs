//! Attaché's actors: the system itself.
//!
//! Nodes, volume managers, shard managers, shards and the metadata store are
//! actors ([`actor`]) that see the outside world only through small traits:
//! [`engine::Engine`] for storage, [`provider::VolumeProvider`] for volumes,
//! [`meta::MetadataBackend`] for the metadata store, and the tokio API
//! (madsim's under `--cfg madsim`) for time, tasks and the network. The
//! production host and engine live in `attache-runtime`; the simulated ones
//! in `attache-sim`. This crate never names RocksDB, actix, etcd or madsim.
//! `ARCHITECTURE.md` at the repository root is the map.
//!
//! # Layout
//!
//! - [`actor`]: the actor abstraction (`Actor`, `Handler`, `Addr`, `Recipient`, `Host`).
//! - [`task_host`]: `TaskHost`, one tokio task per actor (the simulation's host).
//! - [`node`]: the `Node` actor: identity, lease, routing, shard lifecycle.
//! - [`volume`]: the `VolumeManager` actor: one volume's role, epoch and failover.
//! - [`shard_manager`]: the `ShardManager` actor: the shards open on one volume.
//! - [`shard`]: the `Shard` actor: one shard's data, group commit, reads.
//! - [`meta`]: the metadata store: backend contract, the `MetadataStore` actor, gRPC, domain ops.
//! - [`lease`]: the lease gate (a primary serves only while its lease is certainly valid).
//! - [`io_watch`]: how long a volume's writes in flight have been pending (a hung volume fails over).
//! - [`provider`]: the volume provider contract (attach, storage fence).
//! - [`reservation`]: NVMe reservations, the device fence of shared volumes, and the protocol that takes it.
//! - [`engine`]: the storage engine contract; [`mem_engine`]: an in-memory engine.
//! - [`service`]: the gRPC service `attache.v1.Attache` in front of a node.
//! - [`client`]: the retrying, hint-following client (CLI and simulation).
//! - [`auth`]: who may do what: identities from bearer tokens and client certificates.
//! - [`retry`]: the one backoff with seeded jitter; [`timer`]: timers that register once per wait.
//! - [`buggify`]: seed-driven delays at chosen points, in the simulation only.
//! - [`codec`]: framing and encoding of records at rest.
//! - [`limits`]: request limits; [`error`]: the errors clients see.
//! - [`local_store`]: the node's own small files (its id).
//! - `testkit` (feature `testkit`): the shared storage scenario for other crates' tests.

#![warn(missing_docs)]

pub mod actor;
pub mod auth;
pub mod buggify;
pub mod client;
pub mod codec;
pub mod engine;
pub mod error;
pub mod io_watch;
pub mod lease;
pub mod limits;
pub mod local_store;
pub mod mem_engine;
pub mod meta;
pub mod node;
pub mod provider;
pub mod reservation;
pub mod retry;
pub mod service;
pub mod shard;
pub mod shard_manager;
pub mod task_host;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod timer;
pub mod tls;
pub mod volume;

pub use actor::{Actor, Addr, Context, Handler, HostHandle, Message, Recipient, Reply};
pub use engine::{Engine, EngineError, EngineFactory};
pub use error::AttacheError;
