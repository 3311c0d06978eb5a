//! Node settings: command-line flags > environment (`NODE_ID`, `INSTANCE_ID`,
//! `AWS_REGION`, `ATTACHE_*`) > a YAML config file (`--config`) > defaults.
//!
//! clap reads flags and environment variables into [`NodeArgs`]; the file is
//! read into [`FileConfig`]; [`NodeArgs::resolve`] merges them field by field.
//! See `config/example.yaml` for every key.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use attache_actors::limits::{Limits, DEFAULT_SHARD_SIZE_LIMIT};
use attache_actors::node::NodeConfig;
use clap::Args;
use serde::Deserialize;

use crate::telemetry::LogFormat;

/// Logging flags shared by every server command.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "ATTACHE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter (`info`, `attache=debug`, ...); `RUST_LOG` overrides it.
    #[arg(long, env = "ATTACHE_LOG_LEVEL")]
    pub log_level: Option<String>,
}

/// Flags (and their environment variables) of `attache node`.
#[derive(Args, Clone, Debug)]
pub struct NodeArgs {
    /// YAML config file; flags and environment variables override its keys.
    #[arg(long, env = "ATTACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node-local directory (node id, secondary state). Default `./attache-node`.
    #[arg(long, env = "ATTACHE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where volumes are mounted: volume `v` is at `{volume_root}/v`. Default `/`.
    #[arg(long, env = "ATTACHE_VOLUME_ROOT")]
    pub volume_root: Option<PathBuf>,
    /// Volumes this node attaches, comma-separated.
    #[arg(long, env = "ATTACHE_VOLUMES", value_delimiter = ',')]
    pub volumes: Option<Vec<String>>,
    /// gRPC listen address. Default `127.0.0.1:7400`; port 0 picks a free port.
    #[arg(long, env = "ATTACHE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address clients reach this node at, if not the listen address.
    #[arg(long, env = "ATTACHE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Prometheus endpoint address (`/metrics`); off when absent.
    #[arg(long, env = "ATTACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Metadata store: `embedded:DIR`, `grpc://HOST:PORT` (an `attache meta`)
    /// or `etcd://HOST:PORT[,HOST:PORT...]`.
    #[arg(long, env = "ATTACHE_METADATA")]
    pub metadata: Option<String>,
    /// Node id; checked against (or written to) the data dir.
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<u64>,
    /// Cloud instance id (EC2).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Cloud region, for the cloud volume provider.
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Node lease TTL in milliseconds. Default 5000.
    #[arg(long, env = "ATTACHE_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Size limit of new shards, bytes. Default 2 GiB.
    #[arg(long, env = "ATTACHE_SHARD_SIZE_LIMIT")]
    pub shard_size_limit: Option<u64>,
    /// Actor threads (actix arbiters). Default: the number of CPUs.
    #[arg(long, env = "ATTACHE_THREADS")]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The YAML config file; every key optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub volume_root: Option<PathBuf>,
    pub volumes: Option<Vec<String>>,
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub metadata: Option<String>,
    pub node_id: Option<u64>,
    pub instance_id: Option<String>,
    pub region: Option<String>,
    pub lease_ttl_ms: Option<u64>,
    pub shard_size_limit: Option<u64>,
    pub threads: Option<usize>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    /// Request limits; unset keys keep their defaults.
    pub limits: Option<Limits>,
}

/// Everything `attache node` runs with, resolved.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub metadata: String,
    pub region: Option<String>,
    pub threads: usize,
    pub log_format: LogFormat,
    pub log_level: String,
    /// The node config, with `advertise_addr` set once the listener is bound.
    pub node: NodeConfig,
}

/// The default gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";

impl NodeArgs {
    /// Merges flags, environment and the config file.
    ///
    /// Errors: the file cannot be read or parsed (unknown keys included), or
    /// no volume or metadata store is configured.
    pub fn resolve(self) -> anyhow::Result<NodeSettings> {
        let file: FileConfig = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                serde_yaml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let volumes = self.volumes.or(file.volumes).unwrap_or_default();
        anyhow::ensure!(
            !volumes.is_empty(),
            "no volumes configured: pass --volumes vol-1,vol-2 or set `volumes:` in the config file"
        );
        let data_dir = self.data_dir.or(file.data_dir).unwrap_or_else(|| "attache-node".into());
        let metadata = self.metadata.or(file.metadata).context(
            "no metadata store configured: pass --metadata embedded:DIR, grpc://HOST:PORT or etcd://HOST:PORT",
        )?;
        let mut node = NodeConfig::new(
            String::new(),
            self.volume_root.or(file.volume_root).unwrap_or_else(|| "/".into()),
            volumes,
        );
        node.instance_id = self.instance_id.or(file.instance_id).unwrap_or_default();
        node.node_id = self.node_id.or(file.node_id);
        node.lease_ttl_ms = self.lease_ttl_ms.or(file.lease_ttl_ms).unwrap_or(node.lease_ttl_ms);
        node.default_size_limit = self.shard_size_limit.or(file.shard_size_limit).unwrap_or(DEFAULT_SHARD_SIZE_LIMIT);
        node.limits = file.limits.unwrap_or_default();
        Ok(NodeSettings {
            data_dir,
            listen: self.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            advertise: self.advertise.or(file.advertise),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            metadata,
            region: self.region.or(file.region),
            threads: self.threads.or(file.threads).unwrap_or_else(default_threads),
            log_format: self.log.log_format.or(file.log_format).unwrap_or_default(),
            log_level: self.log.log_level.or(file.log_level).unwrap_or_else(|| "info".into()),
            node,
        })
    }
}

/// One actor thread per CPU.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, "volumes: [a, b]\nlisten: 127.0.0.1:9000\nmetadata: embedded:/tmp/m\nlease_ttl_ms: 900\nlimits:\n  max_key_bytes: 64\n").unwrap();
        let cli = Cli::try_parse_from(["x", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:9001"]).unwrap();
        let s = cli.node.resolve().unwrap();
        assert_eq!(s.listen, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(s.node.volumes, vec!["a", "b"]);
        assert_eq!(s.node.lease_ttl_ms, 900);
        assert_eq!(s.node.limits.max_key_bytes, 64);
        assert_eq!(s.node.limits.max_value_bytes, Limits::default().max_value_bytes);
    }

    #[test]
    fn unknown_keys_and_missing_volumes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, "volumez: [a]\n").unwrap();
        let cli = Cli::try_parse_from(["x", "--config", path.to_str().unwrap()]).unwrap();
        let err = cli.node.resolve().unwrap_err();
        assert!(format!("{err:#}").contains("volumez"), "{err:#}");
        let cli = Cli::try_parse_from(["x", "--metadata", "embedded:/tmp/x"]).unwrap();
        assert!(cli.node.resolve().unwrap_err().to_string().contains("no volumes"));
    }
}
