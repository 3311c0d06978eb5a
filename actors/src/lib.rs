//! Attaché's actors: the system itself.
//!
//! Nodes, volume managers, shard managers, shards and the metadata store are
//! actors ([`actor`]) that see the outside world only through small traits:
//! [`engine::Engine`] for storage, and the tokio API (madsim's under
//! `--cfg madsim`) for time and tasks. The production host and engine live in
//! `attache-runtime`; the simulated ones in `attache-sim`. This crate never
//! names RocksDB, actix, etcd or madsim.

pub mod actor;
pub mod codec;
pub mod engine;
pub mod error;
pub mod lease;
pub mod limits;
pub mod local_store;
pub mod mem_engine;
pub mod meta;
pub mod node;
pub mod provider;
pub mod service;
pub mod shard;
pub mod shard_manager;
pub mod testkit;
pub mod volume;

pub use actor::{Actor, Addr, Context, Handler, HostHandle, Message, Reply};
pub use engine::{Engine, EngineError, EngineFactory};
pub use error::AttacheError;
