//! Production wiring for Attaché: the actix host, the RocksDB engine, file
//! stores, the etcd metadata backend, configuration, telemetry, the server
//! commands and the command-line client of the `attache` binary.

pub mod actix_host;
pub mod auth;
pub mod aws;
pub mod bench;
#[cfg(target_os = "linux")]
pub mod block_volumes;
pub mod client_cli;
pub mod config;
pub mod etcd;
pub mod files;
pub mod local_volumes;
pub mod meta_server;
pub mod nvme;
pub mod records;
pub mod rocks_engine;
pub mod serve;
pub mod telemetry;
pub mod tls;
pub mod volume_cli;

pub use actix_host::ActixHost;
pub use rocks_engine::{RocksEngine, RocksEngineFactory};
