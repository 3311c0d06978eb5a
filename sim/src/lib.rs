//! Attaché's deterministic simulation: the madsim host for the actors and,
//! built with `RUSTFLAGS="--cfg madsim"`, the simulated cluster it runs them in.

pub mod host;

pub use host::TaskHost;
