//! Running a node process: `attache node` and `attache dev`.
//!
//! The actors run on actix arbiters ([`ActixHost`]); the gRPC server and the
//! metrics endpoint run on the actix system's tokio runtime. On SIGINT or
//! SIGTERM the server stops taking connections and lets in-flight requests
//! finish, then the node shuts down: group commits in flight complete,
//! engines close, the lease is revoked. Nothing acknowledged is lost.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use attache_actors::engine::EngineFactory;
use attache_actors::lease::LeaseGate;
use attache_actors::meta::embedded::EmbeddedBackend;
use attache_actors::meta::{MetaOps, MetadataBackend};
use attache_actors::node::{numbered_volumes, Node, NodeConfig, NodeParts, ShutdownNode, WaitReady};
use attache_actors::provider::VolumeProvider;
use attache_actors::retry::RetryPolicy;
use attache_actors::service::AttacheService;
use attache_actors::HostHandle;
use clap::Args;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::{LogArgs, NodeSettings, VolumeMode, DEFAULT_LISTEN};
use crate::files::{FileLocalStore, FileMetaLog};
use crate::local_volumes::LocalVolumes;
use crate::telemetry::{init_logging, serve_metrics};
use crate::ActixHost;

/// Flags of `attache dev`.
#[derive(Args, Clone, Debug)]
pub struct DevArgs {
    /// Where everything lives: `meta/` (metadata), `node-N/` (node dirs),
    /// `volumes/vol-N/` (directories standing in for volumes).
    #[arg(long, default_value = "attache-data", env = "ATTACHE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// gRPC listen address; port 0 picks a free port.
    #[arg(long, default_value = DEFAULT_LISTEN, env = "ATTACHE_LISTEN")]
    pub listen: SocketAddr,
    /// How many nodes to run; node `i` listens on the `--listen` port + i - 1
    /// (or a free port when it is 0) and is the home of `vol-i`.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// How many volumes (local directories); every node attaches every volume.
    /// Default: 2, or the number of nodes when larger.
    #[arg(long)]
    pub volumes: Option<usize>,
    /// Prometheus endpoint address (`/metrics`); off when absent.
    #[arg(long, env = "ATTACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Node lease TTL in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub lease_ttl_ms: u64,
    /// RocksDB memory each node's shards share, bytes (as `attache node`).
    #[arg(long, default_value_t = crate::rocks_engine::DEFAULT_MEMORY_BUDGET_BYTES)]
    pub memory_budget_bytes: u64,
    /// Most shards each node keeps open (as `attache node`); default: what
    /// the open-file limit leaves room for, shared by the nodes.
    #[arg(long)]
    pub max_open_shards: Option<usize>,
    #[command(flatten)]
    pub log: LogArgs,
}

impl DevArgs {
    /// The settings of the nodes `attache dev` runs.
    ///
    /// Errors: the `--listen` port plus the number of nodes goes past
    /// 65535; a memory budget under 1 MiB.
    pub fn settings(self) -> anyhow::Result<Vec<NodeSettings>> {
        let n = self.nodes.max(1);
        crate::rocks_engine::check_memory_budget(self.memory_budget_bytes).map_err(anyhow::Error::msg)?;
        let volumes = numbered_volumes(self.volumes.unwrap_or(2.max(n)).max(1));
        let base = self.listen.port();
        if base != 0 && u16::try_from(n - 1).ok().and_then(|extra| base.checked_add(extra)).is_none() {
            anyhow::bail!(
                "--listen port {base} with --nodes {n}: node {n} would listen on port {}, past 65535; \
                 pick a lower port (or 0 for free ports)",
                base as usize + n - 1
            );
        }
        Ok((1..=n)
            .map(|i| {
                let mut node = NodeConfig::cluster_member(i, n, self.data_dir.join("volumes"), volumes.clone());
                node.lease_ttl_ms = self.lease_ttl_ms;
                let mut listen = self.listen;
                if base != 0 {
                    // Checked above: base + n - 1 <= 65535.
                    listen.set_port(base + (i - 1) as u16);
                }
                NodeSettings {
                    data_dir: self.data_dir.join(format!("node-{i}")),
                    listen,
                    advertise: None,
                    metrics_listen: if i == 1 { self.metrics_listen } else { None },
                    metadata: format!("embedded:{}", self.data_dir.join("meta").display()),
                    region: None,
                    threads: crate::config::default_threads(),
                    log_format: self.log.log_format.unwrap_or_default(),
                    log_level: self.log.log_level.clone().unwrap_or_else(|| "info".into()),
                    volume_setup: Default::default(),
                    memory_budget_bytes: self.memory_budget_bytes,
                    max_open_shards: self.max_open_shards,
                    node,
                }
            })
            .collect())
    }
}

/// Opens the metadata backend named by `spec` (see `--metadata`); an
/// embedded store's `MetadataStore` actor runs on `host`.
///
/// Errors: an unknown scheme, or the backend cannot be opened.
pub async fn open_metadata(host: &HostHandle, spec: &str) -> anyhow::Result<Arc<dyn MetadataBackend>> {
    if let Some(dir) = spec.strip_prefix("embedded:") {
        let dir = Path::new(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create metadata dir {}", dir.display()))?;
        let lock = crate::files::lock_dir(dir)?;
        let backend = EmbeddedBackend::open(host, Arc::new(FileMetaLog::new(dir))).await?;
        // The lock lives as long as the process: one writer per metadata dir.
        std::mem::forget(lock);
        return Ok(backend);
    }
    if let Some(addr) = spec.strip_prefix("grpc://") {
        return Ok(Arc::new(attache_actors::meta::remote::RemoteBackend::new(format!("http://{addr}"))));
    }
    if let Some(endpoints) = spec.strip_prefix("etcd://") {
        let endpoints: Vec<String> = endpoints.split(',').map(str::to_string).collect();
        return Ok(Arc::new(crate::etcd::EtcdBackend::connect(&endpoints).await?));
    }
    anyhow::bail!("unknown metadata store {spec:?}: use embedded:DIR, grpc://HOST:PORT or etcd://HOST:PORT[,HOST:PORT]")
}

/// Resolves on SIGINT or SIGTERM.
/// A handler that cannot be installed is logged and left out (the process
/// then stops on the other signal, or is killed), never a panic or an
/// immediate shutdown.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGTERM handler; stop this process with SIGINT");
                std::future::pending::<()>().await;
            }
        }
    };
    let int = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot install the SIGINT handler; stop this process with SIGTERM");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = int => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}

/// A seed for retry jitter (the node's metadata calls, the CLI's client):
/// production needs no replay, only spread between processes, so the clock
/// and the process id serve. Never used by logic the simulation runs.
pub fn jitter_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// Runs one node until SIGINT/SIGTERM. `banner` prints extra lines once it serves.
pub fn run_node(s: NodeSettings, banner: impl FnOnce(&[String]) + Send + 'static) -> anyhow::Result<()> {
    run_nodes(vec![s], banner)
}

/// A node that serves gRPC.
struct Running {
    node: attache_actors::Addr<Node>,
    node_id: u64,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The engine factory and volume provider of node `s`: local directories,
/// or block devices (`BlockVolumes`, checked before the node starts); in
/// aws mode the volumes are first checked against EC2 (`AwsEbs::check`)
/// and attached to this instance.
///
/// Errors: block mode's needs are missing (see `BlockVolumes::check`), or
/// a volume is unfit or cannot be attached (aws mode).
async fn volumes_of(s: &NodeSettings) -> anyhow::Result<(Arc<dyn EngineFactory>, Arc<dyn VolumeProvider>)> {
    let root = s.node.volume_root.clone();
    let setup = &s.volume_setup;
    #[cfg(target_os = "linux")]
    let block = || {
        crate::block_volumes::BlockVolumes::new(
            root.clone(),
            &s.node.volumes,
            &setup.devices,
            setup.format_new,
            setup.fence,
        )
    };
    Ok(match setup.mode {
        VolumeMode::Local => {
            let v = Arc::new(LocalVolumes::new(root));
            (v.clone(), v)
        }
        #[cfg(target_os = "linux")]
        VolumeMode::Block => {
            let v = block();
            v.check()?;
            let v = Arc::new(v);
            (v.clone(), v)
        }
        #[cfg(target_os = "linux")]
        VolumeMode::Aws => {
            let v = block();
            v.check_host()?;
            let settings = crate::aws::AwsSettings {
                region: s.region.clone(),
                instance_id: Some(s.node.instance_id.clone()).filter(|i| !i.is_empty()),
            };
            let ec2 = crate::aws::AwsEbs::connect(&settings).await?;
            ec2.check(&s.node.volumes).await?;
            let v = v.with_ec2(Arc::new(ec2));
            v.attach_all().await?;
            v.check()?;
            let v = Arc::new(v);
            (v.clone(), v)
        }
        #[cfg(not(target_os = "linux"))]
        VolumeMode::Block | VolumeMode::Aws => {
            anyhow::bail!("--volume-mode block and aws mount block devices: they run on Linux only")
        }
    })
}

/// The connections `listener` accepts, each with `TCP_NODELAY` set:
/// without it, Nagle's algorithm holds back the last segment of a
/// response until the client's delayed ACK (up to 40 ms on Linux), which
/// made reads of 10 KB values take ~44 ms instead of ~0.3 ms.
pub(crate) fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        if let Err(e) = conn.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
        Ok(conn)
    })
}

/// Files an open shard holds, about: its RocksDB WAL, MANIFEST, info log,
/// LOCK, directory and a few table files (measured: 6 for small shards; a
/// large one holds up to `rocks_engine::MAX_OPEN_TABLE_FILES` + 6, so a
/// node of large shards wants a lower `max_open_shards`).
pub const FILES_PER_OPEN_SHARD: u64 = 8;

/// Files a node keeps for everything but its shards: sockets, the metadata
/// log, node files, the runtime's own.
pub const RESERVED_FILES: u64 = 256;

/// Raises the open-file limit (`files::raise_open_file_limit`), prints it,
/// and returns how many shards each of `nodes` node processes-in-one can
/// keep open within it (0: no limit, the limit being unlimited).
fn open_shard_room(nodes: usize) -> usize {
    let limit = match crate::files::raise_open_file_limit() {
        Ok((before, after)) => {
            let show = |n: Option<u64>| n.map_or("unlimited".to_string(), |n| n.to_string());
            println!("attache: open files: soft limit {} (was {})", show(after), show(before));
            after
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            rustix::process::getrlimit(rustix::process::Resource::Nofile).current
        }
    };
    let Some(limit) = limit else { return 0 };
    let room = (limit.saturating_sub(RESERVED_FILES) / FILES_PER_OPEN_SHARD / nodes.max(1) as u64).max(1);
    println!(
        "attache: room for {room} open shards per node within the open-file limit (--max-open-shards defaults to \
         it; idle shards close past the limit)"
    );
    usize::try_from(room).unwrap_or(usize::MAX)
}

/// Runs `nodes` in this process until SIGINT/SIGTERM: one actix host, one
/// metadata backend per distinct `--metadata` (so `attache dev` nodes share
/// the embedded store), a gRPC server per node. On the signal every server
/// stops taking connections and finishes its requests, then every node shuts
/// down. `banner` gets the listen addresses once all serve.
pub fn run_nodes(nodes: Vec<NodeSettings>, banner: impl FnOnce(&[String]) + Send + 'static) -> anyhow::Result<()> {
    let first = nodes.first().context("no node to run")?.clone();
    init_logging(first.log_format, &first.log_level);
    let room = open_shard_room(nodes.len());
    let nodes: Vec<NodeSettings> = nodes
        .into_iter()
        .map(|mut s| {
            if let Some(n) = s.max_open_shards {
                println!("attache: at most {n} open shards per node (--max-open-shards; 0: no limit)");
            }
            s.node.max_open_shards = s.max_open_shards.unwrap_or(room);
            s
        })
        .collect();
    actix_rt::System::new().block_on(async move {
        if let Some(addr) = first.metrics_listen {
            serve_metrics(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
        }
        let host = HostHandle::new(ActixHost::new(first.threads));
        let mut backends: std::collections::BTreeMap<String, Arc<dyn MetadataBackend>> = Default::default();
        let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut running = Vec::new();
        let mut addrs = Vec::new();
        for s in nodes {
            let listener = tokio::net::TcpListener::bind(s.listen)
                .await
                .with_context(|| format!("cannot listen on {}", s.listen))?;
            let local = listener.local_addr()?;
            let mut cfg = s.node.clone();
            cfg.advertise_addr = s.advertise.clone().unwrap_or_else(|| local.to_string());
            let backend = match backends.get(&s.metadata) {
                Some(b) => b.clone(),
                None => {
                    let b = open_metadata(&host, &s.metadata).await?;
                    backends.insert(s.metadata.clone(), b.clone());
                    b
                }
            };
            let (factory, provider) = volumes_of(&s).await?;
            let parts = NodeParts {
                meta: MetaOps::new(backend, RetryPolicy::default(), jitter_seed()),
                local: Arc::new(FileLocalStore::new(&s.data_dir)),
                factory,
                provider,
                gate: Arc::new(LeaseGate::new(cfg.lease.clone())),
                claims: None,
            };
            let (node, service) = AttacheService::start(&host, cfg, parts);
            let record = node.send(WaitReady).await?.context("node start-up failed")?;
            println!(
                "attache: node {} serving gRPC on {local} (volumes: {})",
                record.node_id,
                record.volumes.join(", ")
            );
            let mut stop = stop_tx.subscribe();
            let server = tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming(listener), async move {
                        let _ = stop.recv().await;
                    })
                    .await
                    .context("gRPC server failed")
            });
            running.push(Running { node, node_id: record.node_id, server });
            addrs.push(local.to_string());
        }
        if let Some(addr) = first.metrics_listen {
            println!("attache: metrics on http://{addr}/metrics");
        }
        banner(&addrs);
        shutdown_signal().await;
        let _ = stop_tx.send(());
        for r in running {
            r.server.await.context("gRPC server task")??;
            r.node.send(ShutdownNode).await?;
            r.node.stop();
            println!("attache: node {} stopped", r.node_id);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// Accepted connections have TCP_NODELAY set (reads of 10 KB values
    /// waited ~40 ms for a delayed ACK without it).
    #[actix_rt::test]
    async fn accepted_connections_send_without_delay() {
        use tokio_stream::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(super::incoming(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    use super::DevArgs;

    #[derive(Parser)]
    struct Dev {
        #[command(flatten)]
        args: DevArgs,
    }

    fn dev(args: &[&str]) -> DevArgs {
        Dev::try_parse_from(std::iter::once("dev").chain(args.iter().copied())).expect("flags parse").args
    }

    /// `attache dev --listen 127.0.0.1:65535 --nodes 2` once overflowed the
    /// port (a panic in debug builds); now it is an error naming the flags.
    #[test]
    fn a_listen_port_that_leaves_no_room_for_every_node_is_an_error() {
        let e = dev(&["--listen", "127.0.0.1:65535", "--nodes", "2"]).settings().unwrap_err().to_string();
        assert!(e.contains("--listen port 65535 with --nodes 2") && e.contains("65536"), "{e}");
        let ok = dev(&["--listen", "127.0.0.1:65534", "--nodes", "2"]).settings().unwrap();
        assert_eq!(ok.iter().map(|s| s.listen.port()).collect::<Vec<_>>(), vec![65534, 65535]);
        let free = dev(&["--listen", "127.0.0.1:0", "--nodes", "3"]).settings().unwrap();
        assert!(free.iter().all(|s| s.listen.port() == 0));
    }
}
