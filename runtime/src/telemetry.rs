//! Logs (tracing-subscriber: human-readable by default, JSON with
//! `--log-format json`, filtered by `--log-level` or `RUST_LOG`) and the
//! Prometheus `/metrics` endpoint (metrics-exporter-prometheus).

use std::net::SocketAddr;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per event.
    Json,
}

/// Installs the global log subscriber, writing to stderr, with ANSI colours
/// only when stderr is a terminal (a log file gets plain text). `RUST_LOG`,
/// when set, overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Serves Prometheus metrics at `http://{addr}/metrics`. Must run inside a
/// tokio runtime. Request latencies are histograms with buckets from 100 µs
/// to 10 s; group-commit batch sizes from 1 to 4096 operations.
pub fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let latency = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
    let batch = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)?
        .set_buckets_for_metric(Matcher::Full("attache_group_commit_ops".into()), &batch)?
        .install()?;
    Ok(())
}
