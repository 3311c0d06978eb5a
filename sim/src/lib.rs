//! Attaché's deterministic simulation: the task host that runs the actors on
//! madsim, the simulated outside world (volumes, engine), and, built with
//! `RUSTFLAGS="--cfg madsim"`, the simulated cluster, workload, checkers and
//! runner.

pub mod ebs;
pub mod engine;
pub mod host;

pub use host::TaskHost;
