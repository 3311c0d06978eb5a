//! Attaché's deterministic simulation: the simulated outside world (volumes,
//! engine), and, built with
//! `RUSTFLAGS="--cfg madsim"`, the simulated cluster, workload, checkers and
//! runner.

pub mod check;
#[cfg(madsim)]
pub mod cluster;
pub mod ebs;
pub mod engine;
pub mod history;
pub mod metalog;
pub mod report;
#[cfg(madsim)]
pub mod run;
pub mod scenario;
pub mod shrink;
#[cfg(madsim)]
pub mod workload;

pub use attache_actors::task_host::TaskHost;
