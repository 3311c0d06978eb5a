//! The runtime's integration tests, in one test binary so RocksDB and the
//! rest of the tree are linked once, not once per file:
//! - [`auth`]: bearer tokens: who may act as which client, operators, node-only metadata;
//! - [`aws`]: the AWS EBS provider and `attache volume` against moto's EC2 API emulator;
//! - [`bench`]: `attache bench`, every workload against `attache dev` and against etcd;
//! - [`block`]: block volumes on a loop device with two `attache node` processes (root only);
//! - [`disk_full`]: a full tmpfs under a node: writes refused, reads served, recovery (root only);
//! - [`crash`]: SIGKILL of a process writing through the shard actors and RocksDB;
//! - [`e2e`]: the real `attache` binary, every operation and error, signals, metrics;
//! - [`failover`]: `attache meta` and three `attache node` processes, SIGKILL and SIGSTOP of the primary;
//! - [`fuzz_api`]: generated requests of every type, and raw bytes to every method, against `attache dev` and `attache meta`;
//! - [`fuzz_in_process`]: raw bytes, frames and credentials to both gRPC servers in process, a MemEngine node behind one;
//! - [`metadata`]: the metadata conformance suite on embedded, embedded over gRPC, and etcd;
//! - [`storage`]: the shared storage scenario on actix with RocksDB;
//! - [`three_process`]: one `attache meta` with two nodes;
//! - [`tls`]: mutual TLS between clients, a node and `attache meta`, identities by certificate; plaintext only on loopback.

mod auth;
mod aws;
mod bench;
#[cfg(target_os = "linux")]
mod block;
mod common;
mod crash;
#[cfg(target_os = "linux")]
mod disk_full;
mod e2e;
mod failover;
mod fuzz_api;
mod fuzz_in_process;
mod metadata;
mod storage;
mod three_process;
mod tls;
