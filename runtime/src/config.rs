//! Node settings: command-line flags > environment (`NODE_ID`, `INSTANCE_ID`,
//! `AWS_REGION`, `ATTACHE_*`) > a YAML config file (`--config`) > defaults.
//!
//! clap reads flags and environment variables into [`NodeArgs`], serde reads
//! the file into the same shape, and [`NodeArgs::resolve`] layers them.
//! See `config/example.yaml` for every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use attache_actors::limits::{Limits, DEFAULT_SHARD_SIZE_LIMIT};
use attache_actors::node::NodeConfig;
use clap::Args;
use serde::{Deserialize, Serialize};

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

/// The settings of `attache node`, each from a flag, its environment
/// variable, or the YAML config file (`--config`), in that order of
/// precedence. The fields are listed once: clap reads flags and environment
/// into this struct, serde reads the file into the same struct, and
/// [`NodeArgs::resolve`] layers the two as JSON objects (set fields of the
/// former over the latter) before applying the defaults.
#[derive(Args, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeArgs {
    /// YAML config file; flags and environment variables override its keys.
    #[arg(long, env = "ATTACHE_CONFIG")]
    #[serde(skip)]
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
    /// How volumes are reached: `local` (directories under the volume root;
    /// every node on one machine), `block` (block devices that several
    /// machines attach, such as EBS io2 multi-attach; only the primary
    /// mounts one; Linux, as root) or `aws` (block mode whose volumes are
    /// EBS volume ids, attached to this instance through the EC2 API and
    /// fenced by NVMe reservations). Default `local`.
    #[arg(long, env = "ATTACHE_VOLUME_MODE", value_enum)]
    pub volume_mode: Option<VolumeMode>,
    /// Block mode: each volume's device, `VOLUME=PATH`, comma-separated. A
    /// volume without one is the EBS NVMe device of its id
    /// (`/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...`).
    #[arg(long, env = "ATTACHE_VOLUME_DEVICES", value_delimiter = ',')]
    pub volume_devices: Option<Vec<String>>,
    /// Block mode: create an ext4 filesystem on a volume's device that holds
    /// none when this node first takes it over. Off by default: a blank
    /// device is then an error.
    #[arg(long, env = "ATTACHE_FORMAT_NEW_VOLUMES", num_args = 0..=1, default_missing_value = "true")]
    pub format_new_volumes: Option<bool>,
    /// Block mode: the storage fence, `nvme` (an NVMe reservation on the
    /// device: machines sharing a volume) or `epoch-file` (a file and a file
    /// lock: processes on one machine only). Default `nvme`.
    #[arg(long, env = "ATTACHE_VOLUME_FENCE", value_enum)]
    pub volume_fence: Option<VolumeFence>,
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
    /// Node lease TTL in milliseconds. Default 5000; at least 305 (the lease
    /// gate opens for TTL·0.99 − 200 ms, which must exceed the renewal
    /// period TTL/3), checked at start-up.
    #[arg(long, env = "ATTACHE_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Milliseconds a write to a volume may stay pending before the node
    /// takes the volume's I/O for hung and, as its primary, gives it up to a
    /// backup. Default 10000; it also bounds how long a step-down or
    /// shutdown waits for the volume's shards to close.
    #[arg(long, env = "ATTACHE_IO_TIMEOUT_MS")]
    pub io_timeout_ms: Option<u64>,
    /// Size limit of new shards, bytes. Default 2 GiB.
    #[arg(long, env = "ATTACHE_SHARD_SIZE_LIMIT")]
    pub shard_size_limit: Option<u64>,
    /// A new shard goes to the volume with the most free space, except that
    /// volumes within this many bytes of it count as equally free and the
    /// one with the fewest shards wins. Default 10 GiB (HDFS's
    /// balanced-space threshold).
    #[arg(long, env = "ATTACHE_BALANCED_SPACE_BYTES")]
    pub balanced_space_bytes: Option<u64>,
    /// Memory for RocksDB that all of this node's shards share, bytes: one
    /// block cache, with every memtable charged to it and memtables held to
    /// half of it (writes wait for a flush past that). Default 512 MiB;
    /// at least 1 MiB.
    #[arg(long, env = "ATTACHE_MEMORY_BUDGET_BYTES")]
    pub memory_budget_bytes: Option<u64>,
    /// Most shards the node keeps open at once (over all its volumes, each
    /// getting an equal share); idle shards past it close and reopen on
    /// their next request. Default: what the open-file limit leaves room
    /// for (about 8 files per shard), printed at start; 0: no limit.
    #[arg(long, env = "ATTACHE_MAX_OPEN_SHARDS")]
    pub max_open_shards: Option<usize>,
    /// Most client connections open at once; one past it is closed when
    /// accepted (the client tries another node). Default 1024.
    #[arg(long, env = "ATTACHE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most concurrent calls on one client connection (HTTP/2 streams); a
    /// client past it waits for one of its calls to end. Default 256.
    #[arg(long, env = "ATTACHE_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: Option<u32>,
    /// PEM certificate chain to serve the client API with TLS (with
    /// --tls-key); also this node's identity to a TLS metadata store.
    #[arg(long, env = "ATTACHE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ATTACHE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: require every client to present a certificate
    /// one of them signed (mutual TLS).
    #[arg(long, env = "ATTACHE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM CA certificates of the metadata store's certificate: call it
    /// (`grpc://` or `etcd://`) over TLS, presenting --tls-cert when given.
    #[arg(long, env = "ATTACHE_METADATA_TLS_CA")]
    pub metadata_tls_ca: Option<PathBuf>,
    /// Token file: the SHA-256 of each bearer token clients may call with,
    /// and the identity it stands for (`attache token` makes its lines).
    /// With it, or with --tls-client-ca, callers are authenticated: a
    /// request acts only as its caller's own client id.
    #[arg(long, env = "ATTACHE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// A file holding this node's bearer token to a `grpc://` metadata
    /// store with a token file (an identity of the group `attache:node`).
    /// Without it, over mutual TLS, --tls-cert is the node's identity.
    #[arg(long, env = "ATTACHE_METADATA_TOKEN_FILE")]
    pub metadata_token_file: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address (refused without it).
    #[arg(long, env = "ATTACHE_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// Actor threads (actix arbiters). Default: the number of CPUs.
    #[arg(long, env = "ATTACHE_THREADS")]
    pub threads: Option<usize>,
    /// Log line format.
    #[arg(long, env = "ATTACHE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter (`info`, `attache=debug`, ...); `RUST_LOG` overrides it.
    #[arg(long, env = "ATTACHE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Request limits (config file only); unset keys keep their defaults.
    #[arg(skip)]
    pub limits: Option<Limits>,
}

/// The storage fence of block volumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum VolumeFence {
    /// An NVMe reservation on the device (and the `EPOCH` file on it): for
    /// machines sharing a volume.
    #[default]
    Nvme,
    /// Only the `EPOCH` file and its `flock`: processes on one machine.
    #[serde(alias = "epoch-file")]
    EpochFile,
}

/// How a node reaches its volumes (`--volume-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum VolumeMode {
    /// Directories under the volume root (`LocalVolumes`).
    #[default]
    Local,
    /// Block devices, mounted by the primary (`BlockVolumes`).
    Block,
    /// Block mode on EBS: volumes are EBS volume ids (io2, multi-attach,
    /// this instance's availability zone), attached through the EC2 API
    /// (`AwsEbs`), fenced by NVMe reservations.
    Aws,
}

/// How a node's volumes are set up, resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeSetup {
    /// Local directories or block devices.
    pub mode: VolumeMode,
    /// Block mode: volume → device (volumes not listed use their EBS device).
    pub devices: BTreeMap<String, PathBuf>,
    /// Block mode: format a blank device at first takeover.
    pub format_new: bool,
    /// Block mode: the storage fence.
    pub fence: VolumeFence,
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
    /// How the volumes are reached.
    pub volume_setup: VolumeSetup,
    /// RocksDB memory all shards share, bytes (`MemoryBudget`).
    pub memory_budget_bytes: u64,
    /// Most open shards (`NodeConfig::max_open_shards`); `None`: from the
    /// open-file limit at start.
    pub max_open_shards: Option<usize>,
    /// Limits of the gRPC listener.
    pub connections: crate::serve::ConnectionLimits,
    /// TLS of the client API; `None`: plaintext.
    pub tls: Option<crate::tls::ServerTls>,
    /// TLS to the metadata store; `None`: plaintext.
    pub metadata_tls: Option<attache_actors::tls::ClientTls>,
    /// Who may call the client API (`--token-file`, `--tls-client-ca`).
    pub auth: attache_actors::auth::Authenticator,
    /// The node's bearer token to its metadata store (`--metadata-token-file`).
    pub metadata_token: Option<attache_actors::auth::BearerToken>,
    /// Plaintext allowed on a non-loopback address (`--insecure`).
    pub insecure: bool,
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
        let mut layered = match &self.config {
            Some(path) => file_layer(path)?,
            None => serde_json::Map::new(),
        };
        layered.extend(to_layer(&self).context("flags and environment")?);
        let a: NodeArgs =
            serde_json::from_value(serde_json::Value::Object(layered)).with_context(|| match &self.config {
                Some(path) => format!("invalid config file {}", path.display()),
                None => "invalid settings".into(),
            })?;
        let volumes = a.volumes.clone().unwrap_or_default();
        let volume_setup = volume_setup(&a, &volumes)?;
        anyhow::ensure!(
            !volumes.is_empty(),
            "no volumes configured: pass --volumes vol-1,vol-2 or set `volumes:` in the config file"
        );
        let metadata = a.metadata.context(
            "no metadata store configured: pass --metadata embedded:DIR, grpc://HOST:PORT or etcd://HOST:PORT",
        )?;
        let mut node = NodeConfig::new(String::new(), a.volume_root.unwrap_or_else(|| "/".into()), volumes);
        node.instance_id = a.instance_id.unwrap_or_default();
        node.node_id = a.node_id;
        node.lease_ttl_ms = a.lease_ttl_ms.unwrap_or(node.lease_ttl_ms);
        node.failover.io_timeout_ms = a.io_timeout_ms.unwrap_or(node.failover.io_timeout_ms);
        node.default_size_limit = a.shard_size_limit.unwrap_or(DEFAULT_SHARD_SIZE_LIMIT);
        node.balanced_space_bytes = a.balanced_space_bytes.unwrap_or(node.balanced_space_bytes);
        node.limits = a.limits.unwrap_or_default();
        node.validate().map_err(|e| anyhow::anyhow!("invalid timing settings: {e}"))?;
        let defaults = crate::serve::ConnectionLimits::default();
        let connections = crate::serve::ConnectionLimits {
            max_connections: a.max_connections.unwrap_or(defaults.max_connections),
            max_streams_per_connection: a.max_streams_per_connection.unwrap_or(defaults.max_streams_per_connection),
        };
        connections.validate()?;
        if let Some(bytes) = a.memory_budget_bytes {
            crate::rocks_engine::check_memory_budget(bytes).map_err(anyhow::Error::msg)?;
        }
        let tls = crate::tls::ServerTls::load(a.tls_cert.as_deref(), a.tls_key.as_deref(), a.tls_client_ca.as_deref())?;
        let metadata_tls = match &a.metadata_tls_ca {
            Some(ca) => {
                let ca = crate::tls::read_pem(ca, "--metadata-tls-ca")?;
                Some(match &tls {
                    Some(tls) => tls.as_client(ca),
                    None => attache_actors::tls::ClientTls { ca_pem: ca, ..Default::default() },
                })
            }
            None => None,
        };
        let auth = crate::auth::authenticator(a.token_file.as_deref(), tls.as_ref())?;
        let metadata_token = a
            .metadata_token_file
            .as_deref()
            .map(|p| crate::auth::read_token(p, "--metadata-token-file"))
            .transpose()?;
        anyhow::ensure!(
            metadata_token.is_none() || metadata.starts_with("grpc://"),
            "--metadata-token-file is a token for an `attache meta` (grpc://), not for {metadata}: etcd takes \
             client certificates (--tls-cert with --metadata-tls-ca)"
        );
        let listen = a.listen.unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let insecure = a.insecure.unwrap_or(false);
        crate::tls::check_plaintext("attache node", listen, tls.as_ref(), insecure)?;
        anyhow::ensure!(
            metadata_tls.is_some() || insecure || crate::tls::metadata_is_local(&metadata),
            "the metadata store {metadata} is on another machine and would be called in plaintext: anyone on the \
             way could change leases and volume records. Give --metadata-tls-ca (the CA of its certificate), or \
             --insecure to call it in plaintext anyway"
        );
        Ok(NodeSettings {
            data_dir: a.data_dir.unwrap_or_else(|| "attache-node".into()),
            listen,
            advertise: a.advertise,
            metrics_listen: a.metrics_listen,
            metadata,
            region: a.region,
            threads: a.threads.unwrap_or_else(default_threads),
            log_format: a.log_format.unwrap_or_default(),
            log_level: a.log_level.unwrap_or_else(|| "info".into()),
            volume_setup,
            memory_budget_bytes: a.memory_budget_bytes.unwrap_or(crate::rocks_engine::DEFAULT_MEMORY_BUDGET_BYTES),
            max_open_shards: a.max_open_shards,
            connections,
            tls,
            metadata_tls,
            auth,
            metadata_token,
            insecure,
            node,
        })
    }
}

/// The volume settings of `a` for `volumes`.
///
/// Errors: a device entry that is not `VOLUME=PATH` or names a volume the
/// node does not attach; block-mode settings in local mode.
fn volume_setup(a: &NodeArgs, volumes: &[String]) -> anyhow::Result<VolumeSetup> {
    let mode = a.volume_mode.unwrap_or_default();
    if mode == VolumeMode::Local {
        anyhow::ensure!(
            a.volume_devices.is_none() && a.format_new_volumes != Some(true) && a.volume_fence.is_none(),
            "volume_devices, format_new_volumes and volume_fence apply to block volumes: add --volume-mode block, \
             or leave them out"
        );
        return Ok(VolumeSetup::default());
    }
    if mode == VolumeMode::Aws {
        anyhow::ensure!(
            a.volume_fence.unwrap_or_default() == VolumeFence::Nvme,
            "--volume-mode aws fences volumes shared between instances with NVMe reservations: leave out \
             --volume-fence epoch-file (it holds only between processes of one machine)"
        );
        for volume in volumes {
            anyhow::ensure!(
                volume.starts_with("vol-") && volume.len() > 4 && volume[4..].bytes().all(|b| b.is_ascii_hexdigit()),
                "--volume-mode aws: {volume:?} is not an EBS volume id (vol- and hex digits, e.g. \
                 vol-0123456789abcdef0)"
            );
        }
    }
    let mut devices = BTreeMap::new();
    for entry in a.volume_devices.iter().flatten() {
        let (volume, path) = entry
            .split_once('=')
            .with_context(|| format!("volume device {entry:?} is not VOLUME=PATH (e.g. vol-1=/dev/nvme1n1)"))?;
        anyhow::ensure!(
            volumes.iter().any(|v| v == volume),
            "volume device {entry:?} names {volume:?}, which is not among this node's volumes ({})",
            volumes.join(", ")
        );
        devices.insert(volume.to_string(), PathBuf::from(path));
    }
    Ok(VolumeSetup {
        mode,
        devices,
        format_new: a.format_new_volumes.unwrap_or(false),
        fence: a.volume_fence.unwrap_or_default(),
    })
}

/// The config file's keys as a JSON object (an empty file: no keys). The
/// file is read into [`NodeArgs`] first, so a YAML scalar reads as the type
/// of its key (`instance_id: 123456` is a string) and unknown keys are
/// errors, then written out as JSON to lie under the flags.
///
/// Errors: the file cannot be read, is not YAML, has an unknown key or a
/// value of the wrong type.
fn file_layer(path: &std::path::Path) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    let file: Option<NodeArgs> =
        yaml_serde::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    to_layer(&file.unwrap_or_default()).with_context(|| format!("config file {}", path.display()))
}

/// The fields of `args` that are set, as a JSON object.
///
/// Errors: a path that is not UTF-8 (JSON holds text only).
fn to_layer(args: &NodeArgs) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let serde_json::Value::Object(mut keys) =
        serde_json::to_value(args).context("settings must be UTF-8 (paths included)")?
    else {
        unreachable!("NodeArgs serializes as an object")
    };
    keys.retain(|_, v| !v.is_null());
    Ok(keys)
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
    fn a_lease_too_short_for_the_gate_is_refused_at_start_up() {
        let cli =
            Cli::try_parse_from(["x", "--volumes", "a", "--metadata", "embedded:/tmp/m", "--lease-ttl-ms", "200"])
                .unwrap();
        let Err(e) = cli.node.resolve() else { panic!("a 200 ms lease was accepted") };
        let e = format!("{e:#}");
        assert!(e.contains("invalid timing settings: lease_ttl_ms 200 is too short"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file_and_flags_override_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, "volumes: [a]\nmetadata: embedded:/tmp/m\ninstance_id: i-file\nregion: r-file\n")
            .unwrap();
        // INSTANCE_ID and AWS_REGION are read by no other test of this binary.
        std::env::set_var("INSTANCE_ID", "i-env");
        std::env::set_var("AWS_REGION", "r-env");
        let cli = Cli::try_parse_from(["x", "--config", path.to_str().unwrap(), "--region", "r-flag"]).unwrap();
        std::env::remove_var("INSTANCE_ID");
        std::env::remove_var("AWS_REGION");
        let s = cli.node.resolve().unwrap();
        assert_eq!(s.node.instance_id, "i-env");
        assert_eq!(s.region.as_deref(), Some("r-flag"));
    }

    #[test]
    fn yaml_scalars_read_as_the_type_of_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, "volumes: [1, 2]\nmetadata: embedded:/tmp/m\ninstance_id: 123456\ndata_dir: 2024\n")
            .unwrap();
        let cli = Cli::try_parse_from(["x", "--config", path.to_str().unwrap()]).unwrap();
        let s = cli.node.resolve().unwrap();
        assert_eq!(s.node.volumes, vec!["1", "2"]);
        assert_eq!(s.node.instance_id, "123456");
        assert_eq!(s.data_dir, std::path::PathBuf::from("2024"));
    }

    #[test]
    fn block_volume_settings_are_read_and_checked() {
        let cli = Cli::try_parse_from([
            "x",
            "--volumes",
            "vol-1,vol-2",
            "--metadata",
            "embedded:/tmp/m",
            "--volume-mode",
            "block",
            "--volume-devices",
            "vol-1=/dev/loop7",
            "--format-new-volumes",
            "--volume-fence",
            "epoch-file",
        ])
        .unwrap();
        let s = cli.node.resolve().unwrap();
        assert_eq!(s.volume_setup.mode, VolumeMode::Block);
        assert_eq!(s.volume_setup.devices, BTreeMap::from([("vol-1".to_string(), PathBuf::from("/dev/loop7"))]));
        assert!(s.volume_setup.format_new);
        assert_eq!(s.volume_setup.fence, VolumeFence::EpochFile);
        let base = ["x", "--volumes", "vol-1", "--metadata", "embedded:/tmp/m"];
        let err = |extra: &[&str]| {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            format!("{:#}", Cli::try_parse_from(args).unwrap().node.resolve().unwrap_err())
        };
        assert!(err(&["--volume-devices", "vol-1=/dev/x"]).contains("add --volume-mode block"));
        assert!(err(&["--volume-mode", "block", "--volume-devices", "/dev/x"]).contains("not VOLUME=PATH"));
        assert!(err(&["--volume-mode", "block", "--volume-devices", "vol-9=/dev/x"]).contains("not among"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(
            &path,
            "volumes: [vol-1]\nmetadata: embedded:/tmp/m\nvolume_mode: block\nvolume_fence: nvme\nformat_new_volumes: false\n",
        )
        .unwrap();
        let s = Cli::try_parse_from(["x", "--config", path.to_str().unwrap()]).unwrap().node.resolve().unwrap();
        assert_eq!(
            (s.volume_setup.mode, s.volume_setup.fence, s.volume_setup.format_new),
            (VolumeMode::Block, VolumeFence::Nvme, false)
        );
    }

    #[test]
    fn aws_mode_takes_ebs_volume_ids_and_only_the_nvme_fence() {
        let args = |volumes: &str, extra: &[&str]| {
            let base = ["x", "--metadata", "embedded:/tmp/m", "--volume-mode", "aws", "--volumes", volumes];
            Cli::try_parse_from(base.iter().chain(extra).copied().collect::<Vec<_>>()).unwrap().node.resolve()
        };
        let s = args("vol-0123456789abcdef0,vol-0fedcba9876543210", &[]).unwrap();
        assert_eq!((s.volume_setup.mode, s.volume_setup.fence), (VolumeMode::Aws, VolumeFence::Nvme));
        let e = format!("{:#}", args("vol-1x", &[]).unwrap_err());
        assert!(e.contains("not an EBS volume id"), "{e}");
        let e = format!("{:#}", args("vol-0abc", &["--volume-fence", "epoch-file"]).unwrap_err());
        assert!(e.contains("NVMe reservations"), "{e}");
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

    /// The example config the README points at is read as it stands, every
    /// key with the value it shows (the TLS files it names replaced by
    /// files of this test, through the flags that override them).
    #[test]
    fn the_example_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/example.yaml");
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.path().join("node.pem"), dir.path().join("node.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let (pem, key) = (cert_file.to_str().unwrap(), key_file.to_str().unwrap());
        let without_files = Cli::try_parse_from(["x", "--config", path]).unwrap().node.resolve().unwrap_err();
        assert!(format!("{without_files:#}").contains("/etc/attache/node.pem"), "{without_files:#}");
        let files = ["--tls-cert", pem, "--tls-key", key, "--tls-client-ca", pem, "--metadata-tls-ca", pem];
        let args = ["x", "--config", path].into_iter().chain(files);
        let s = Cli::try_parse_from(args).unwrap().node.resolve().unwrap();
        assert!(s.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some()) && !s.insecure);
        assert!(
            s.metadata_tls.as_ref().is_some_and(|t| t.identity.is_some()),
            "the node's certificate is its identity"
        );
        assert_eq!(s.node.volumes, vec!["vol-a", "vol-b"]);
        assert_eq!(s.node.balanced_space_bytes, 10 << 30);
        assert_eq!(s.memory_budget_bytes, 512 << 20);
        assert_eq!(s.node.default_size_limit, 2 << 30);
        assert_eq!(s.max_open_shards, None);
        assert_eq!(s.connections, crate::serve::ConnectionLimits::default());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("ATTACHE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500)
        ))]

        /// Fuzzing of the node config file: the example config with one
        /// byte changed and maybe cut short resolves or is refused with a
        /// message; nothing panics.
        #[test]
        fn a_damaged_config_file_resolves_or_says_why(at in 0usize..4096, byte in proptest::prelude::any::<u8>(), cut in 0usize..4096) {
            let example = include_bytes!("../../config/example.yaml");
            let mut text = example.to_vec();
            let at = at % text.len();
            text[at] = byte;
            text.truncate(cut % (text.len() + 1));
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("node.yaml");
            std::fs::write(&path, &text).unwrap();
            let cli = Cli::try_parse_from(["x", "--config", path.to_str().unwrap()]).unwrap();
            if let Err(e) = cli.node.resolve() {
                let message = format!("{e:#}");
                proptest::prop_assert!(!message.is_empty());
            }
        }
    }

    #[test]
    fn connection_limits_come_from_flags_and_zero_is_refused() {
        let base = ["x", "--volumes", "a", "--metadata", "embedded:/tmp/m"];
        let flags = ["--max-connections", "10", "--max-streams-per-connection", "4"];
        let s = Cli::try_parse_from(base.iter().chain(&flags)).unwrap().node.resolve().unwrap();
        assert_eq!(
            s.connections,
            crate::serve::ConnectionLimits { max_connections: 10, max_streams_per_connection: 4 }
        );
        let zero = Cli::try_parse_from(base.iter().chain(&["--max-connections", "0"])).unwrap();
        let e = zero.node.resolve().unwrap_err().to_string();
        assert!(e.contains("max_connections must be at least 1"), "{e}");
    }
}
