//! Running a node process: `attache node` and `attache dev`.
//!
//! The actors run on actix arbiters ([`ActixHost`]); the gRPC server and the
//! metrics endpoint run on the actix system's tokio runtime. On SIGINT or
//! SIGTERM the server stops taking connections and lets in-flight requests
//! finish, then the node shuts down: group commits in flight complete,
//! engines close, the lease is revoked. Nothing acknowledged is lost.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// Serve plaintext on a non-loopback --listen address (refused without
    /// it; `attache dev` has no TLS: run `attache node` for that).
    #[arg(long)]
    pub insecure: bool,
    /// Token file (as `attache node --token-file`): authenticate clients by
    /// bearer token. Without it, `attache dev` authenticates no one: any
    /// caller may act as any client.
    #[command(flatten)]
    pub auth: crate::auth::ServerAuthArgs,
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
        crate::tls::check_plaintext("attache dev", self.listen, None, self.insecure)?;
        let auth = crate::auth::authenticator(self.auth.token_file.as_deref(), None)?;
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
                    connections: ConnectionLimits::default(),
                    tls: None,
                    metadata_tls: None,
                    auth: auth.clone(),
                    metadata_token: None,
                    insecure: self.insecure,
                    node,
                }
            })
            .collect())
    }
}

/// Opens the metadata backend named by `spec` (see `--metadata`); an
/// embedded store's `MetadataStore` actor runs on `host`; an `attache meta`
/// or etcd is called over TLS with `tls` when given.
///
/// Errors: an unknown scheme, TLS with an embedded store, or the backend
/// cannot be opened.
pub async fn open_metadata(
    host: &HostHandle,
    spec: &str,
    tls: Option<&attache_actors::tls::ClientTls>,
    token: Option<&attache_actors::auth::BearerToken>,
) -> anyhow::Result<Arc<dyn MetadataBackend>> {
    anyhow::ensure!(
        token.is_none() || spec.starts_with("grpc://"),
        "--metadata-token-file applies to grpc:// metadata, not {spec}"
    );
    if let Some(dir) = spec.strip_prefix("embedded:") {
        anyhow::ensure!(tls.is_none(), "--metadata-tls-ca applies to grpc:// and etcd:// metadata, not {spec}");
        let dir = Path::new(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create metadata dir {}", dir.display()))?;
        let lock = crate::files::lock_dir(dir)?;
        let backend = EmbeddedBackend::open(host, Arc::new(FileMetaLog::new(dir))).await?;
        // The lock lives as long as the process: one writer per metadata dir.
        std::mem::forget(lock);
        return Ok(backend);
    }
    if let Some(addr) = spec.strip_prefix("grpc://") {
        let mut backend = attache_actors::meta::remote::RemoteBackend::new(addr);
        if let Some(tls) = tls {
            backend = backend.with_tls(tls.clone());
        }
        if let Some(token) = token {
            backend = backend.with_token(token.clone());
        }
        return Ok(Arc::new(backend));
    }
    if let Some(endpoints) = spec.strip_prefix("etcd://") {
        let endpoints: Vec<String> = endpoints.split(',').map(str::to_string).collect();
        return Ok(Arc::new(crate::etcd::EtcdBackend::connect(&endpoints, tls).await?));
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

/// Default of [`ConnectionLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Default of `--max-streams-per-connection` for `attache meta`: a node
/// process keeps its lease, its calls and two watches per volume on one
/// connection to the metadata store, so 256 would stall a node of 127
/// volumes or more.
pub const DEFAULT_META_STREAMS_PER_CONNECTION: u32 = 4096;

/// Default of [`ConnectionLimits::max_streams_per_connection`]: twice the
/// most calls `attache bench` puts on one connection in its largest
/// documented run (128 in flight over 4 connections is 32 each; 256 leaves
/// room for one client with one connection and 128 in flight, doubled).
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The server pings each connection this often (HTTP/2 PING) ...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ... and closes it when a ping goes unanswered this long, so a client
/// that vanished without closing (its machine died, a partition) frees its
/// connection slot within about 50 s.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Limits of one gRPC listener (`attache node`, `attache dev`, `attache meta`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once. A connection past it is closed as
    /// soon as it is accepted (the client sees `UNAVAILABLE` and its next
    /// attempt goes to another node), counted in
    /// `attache_connections_refused_total`. Default
    /// [`DEFAULT_MAX_CONNECTIONS`]; at least 1.
    pub max_connections: usize,
    /// Most concurrent calls (HTTP/2 streams) on one connection, announced
    /// to the client in `SETTINGS_MAX_CONCURRENT_STREAMS`: a client past it
    /// waits for one of its calls to end. Default
    /// [`DEFAULT_MAX_STREAMS_PER_CONNECTION`]; at least 1.
    pub max_streams_per_connection: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
        }
    }
}

impl ConnectionLimits {
    /// Errors: a limit of 0 (it would refuse every connection or call).
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_connections >= 1, "max_connections must be at least 1");
        anyhow::ensure!(self.max_streams_per_connection >= 1, "max_streams_per_connection must be at least 1");
        Ok(())
    }
}

/// A gRPC server builder with `limits`, HTTP/2 keepalive pings and, when
/// given, `tls`; serve it with [`incoming`] to cap its connections.
///
/// Errors: tonic refuses the TLS settings.
pub(crate) fn grpc_server(
    limits: ConnectionLimits,
    tls: Option<&crate::tls::ServerTls>,
) -> anyhow::Result<tonic::transport::Server> {
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls.config()).context("invalid TLS settings")?;
    }
    Ok(server
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT)))
}

/// A new connection that sends nothing for this long is closed: HTTP/2
/// keepalive pings start only after the client's preface, so without it a
/// silent connection would hold its slot for good.
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(10);

/// After a failed accept (out of file descriptors: the listener stays
/// readable), the listener waits this long before accepting again, instead
/// of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// An accepted connection, holding one of its listener's connection slots
/// until it is dropped (closed).
pub(crate) struct Limited {
    conn: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// Until the first bytes arrive: when the connection is closed if none
    /// have.
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for Limited {
    /// Errors: `TimedOut` when no byte came within [`FIRST_BYTES_WITHIN`]
    /// of the accept (the server then closes the connection).
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.conn).poll_read(cx, buf);
        if let Some(deadline) = this.first_bytes.as_mut() {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_bytes = None,
                Poll::Pending if std::future::Future::poll(deadline.as_mut(), cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no bytes within {FIRST_BYTES_WITHIN:?} of connecting"),
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl tokio::io::AsyncWrite for Limited {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().conn).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().conn).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.conn.connect_info()
    }
}

/// The connections `listener` accepts, at most `max_connections` open at
/// once (one past it is closed at once; see
/// [`ConnectionLimits::max_connections`]), each closed if it sends nothing
/// within [`FIRST_BYTES_WITHIN`], each with `TCP_NODELAY` set: without it,
/// Nagle's algorithm holds back the last segment of a response until the
/// client's delayed ACK (up to 40 ms on Linux), which made reads of 10 KB
/// values take ~44 ms instead of ~0.3 ms. A failed accept pauses the
/// listener for 100 ms (tonic skips the error and accepts again at once).
pub(crate) fn incoming(
    listener: tokio::net::TcpListener,
    max_connections: usize,
) -> impl tokio_stream::Stream<Item = std::io::Result<Limited>> {
    incoming_within(listener, max_connections, FIRST_BYTES_WITHIN)
}

/// [`incoming`], with `first_bytes_within` for [`FIRST_BYTES_WITHIN`].
fn incoming_within(
    listener: tokio::net::TcpListener,
    max_connections: usize,
    first_bytes_within: Duration,
) -> impl tokio_stream::Stream<Item = std::io::Result<Limited>> {
    use futures::StreamExt as _;
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.min(tokio::sync::Semaphore::MAX_PERMITS)));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    TcpListenerStream::new(listener).filter_map(move |conn| {
        let (slots, refused) = (slots.clone(), refused.clone());
        async move { accepted(conn, &slots, &refused, max_connections, first_bytes_within).await }
    })
}

/// One accept of [`incoming_within`]: the connection with its slot, the
/// accept's error (after a pause), or nothing (refused: closed).
async fn accepted(
    conn: std::io::Result<tokio::net::TcpStream>,
    slots: &Arc<tokio::sync::Semaphore>,
    refused: &std::sync::atomic::AtomicU64,
    max_connections: usize,
    first_bytes_within: Duration,
) -> Option<std::io::Result<Limited>> {
    let conn = match conn {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(error = %e, "cannot accept a connection; pausing the listener");
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            return Some(Err(e));
        }
    };
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        let refused = refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        metrics::counter!("attache_connections_refused_total").increment(1);
        // One line at the 1st, 2nd, 4th, 8th, ... refusal: a flood of
        // connections does not become a flood of log lines.
        if refused.is_power_of_two() {
            tracing::warn!(
                peer = ?conn.peer_addr().ok(),
                max_connections,
                refused,
                "closed a new connection: this listener has max_connections open"
            );
        }
        return None;
    };
    if let Err(e) = conn.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY on a connection");
    }
    let first_bytes = Some(Box::pin(tokio::time::sleep(first_bytes_within)));
    Some(Ok(Limited { conn, _slot: slot, first_bytes }))
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
/// keep open within it, after [`RESERVED_FILES`] and one file for each of
/// the `connections` the nodes' listeners may hold (0: no limit, the limit
/// being unlimited).
fn open_shard_room(nodes: usize, connections: usize) -> usize {
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
    let reserved = RESERVED_FILES + connections as u64;
    let room = (limit.saturating_sub(reserved) / FILES_PER_OPEN_SHARD / nodes.max(1) as u64).max(1);
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
    let room = open_shard_room(nodes.len(), nodes.iter().map(|s| s.connections.max_connections).sum());
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
            let connections = s.connections;
            let mut cfg = s.node.clone();
            cfg.advertise_addr = s.advertise.clone().unwrap_or_else(|| local.to_string());
            let backend = match backends.get(&s.metadata) {
                Some(b) => b.clone(),
                None => {
                    let b =
                        open_metadata(&host, &s.metadata, s.metadata_tls.as_ref(), s.metadata_token.as_ref()).await?;
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
            let (node, service) = AttacheService::start(&host, cfg, parts, s.auth.clone());
            let record = node.send(WaitReady).await?.context("node start-up failed")?;
            println!(
                "attache: node {} serving gRPC on {local} (volumes: {})",
                record.node_id,
                record.volumes.join(", ")
            );
            println!("attache: node {}: {}", record.node_id, s.auth.describe());
            let mut stop = stop_tx.subscribe();
            let mut builder = grpc_server(connections, s.tls.as_ref())?;
            let server = tokio::spawn(async move {
                builder
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming(listener, connections.max_connections), async move {
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
        let mut incoming = Box::pin(super::incoming(listener, 16));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.conn.nodelay().unwrap());
    }

    /// Whether the server closed `conn` (a read ends) within `within`; an
    /// open connection that sends nothing keeps the read waiting. (A closed
    /// one is seen at once, so a generous bound costs nothing then.)
    async fn closed_within(conn: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
        use tokio::io::AsyncReadExt as _;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(within, conn.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => panic!("the server sent bytes on a raw connection"),
            Err(_) => false,
        }
    }

    /// How long a test waits for what should happen at once (a loaded
    /// machine may be slow), and for what should not happen at all.
    const LONG: std::time::Duration = std::time::Duration::from_secs(5);
    const SHORT: std::time::Duration = std::time::Duration::from_millis(500);

    /// A connection that sends nothing is closed after the first-bytes
    /// deadline (keepalive pings start only after the HTTP/2 preface, so it
    /// would hold its slot for good), and its slot is free again; one that
    /// sends bytes in time is kept.
    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_and_frees_its_slot() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        use tokio_stream::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let within = std::time::Duration::from_millis(300);
        let server = tokio::spawn(async move {
            let mut incoming = Box::pin(super::incoming_within(listener, 1, within));
            while let Some(conn) = incoming.next().await {
                // An echo server: it reads until the connection fails or ends.
                tokio::spawn(async move {
                    let mut conn = conn.unwrap();
                    let mut buf = [0u8; 16];
                    while let Ok(n @ 1..) = conn.read(&mut buf).await {
                        if conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(!closed_within(&mut silent, std::time::Duration::from_millis(100)).await, "closed before its deadline");
        assert!(closed_within(&mut silent, LONG).await, "a silent connection was kept");
        // The slot (one in all) is free: a new connection is served and,
        // having spoken in time, kept past the deadline.
        let mut talker = tokio::net::TcpStream::connect(addr).await.unwrap();
        talker.write_all(b"hi").await.unwrap();
        let mut echo = [0u8; 2];
        tokio::time::timeout(LONG, talker.read_exact(&mut echo)).await.unwrap().unwrap();
        assert_eq!(&echo, b"hi");
        tokio::time::sleep(2 * within).await;
        talker.write_all(b"yo").await.unwrap();
        tokio::time::timeout(LONG, talker.read_exact(&mut echo)).await.unwrap().unwrap();
        assert_eq!(&echo, b"yo");
        server.abort();
    }

    /// With `max_connections` 2, a third connection is closed as soon as it
    /// is accepted while the first two stay open; once one of those closes,
    /// its slot takes a new connection.
    #[tokio::test]
    async fn a_connection_past_max_connections_is_closed_and_a_freed_slot_is_reused() {
        use tokio_stream::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let mut incoming = Box::pin(super::incoming(listener, 2));
            while let Some(conn) = incoming.next().await {
                if accepted_tx.send(conn.unwrap()).is_err() {
                    break;
                }
            }
        });
        let connect = || tokio::net::TcpStream::connect(addr);
        let (mut a, mut b) = (connect().await.unwrap(), connect().await.unwrap());
        let held = [accepted.recv().await.unwrap(), accepted.recv().await.unwrap()];
        let mut c = connect().await.unwrap();
        assert!(closed_within(&mut c, LONG).await, "a third connection was kept open");
        assert!(!closed_within(&mut a, SHORT).await && !closed_within(&mut b, SHORT).await);
        // The server side of one connection closes: its slot is free.
        let [first, second] = held;
        drop(first);
        let mut d = connect().await.unwrap();
        let _held_d = accepted.recv().await.unwrap();
        assert!(!closed_within(&mut d, SHORT).await, "a connection in a freed slot was closed");
        drop(second);
        server.abort();
    }

    /// `max_streams_per_connection` reaches the client: at 1, a call waits
    /// while a watch stream holds the connection's only stream, and runs
    /// once the watch ends; at 2 it runs beside the watch.
    #[tokio::test]
    async fn a_call_past_max_streams_per_connection_waits_for_a_stream_to_end() {
        use attache_actors::meta::embedded::{EmbeddedBackend, MemMetaLog};
        use attache_actors::meta::remote::{MetadataServer, RemoteBackend};
        use attache_actors::meta::MetadataBackend;
        use attache_actors::task_host::TaskHost;
        use attache_actors::HostHandle;
        use std::sync::Arc;
        for streams in [1u32, 2] {
            let backend: Arc<dyn MetadataBackend> =
                EmbeddedBackend::open(&HostHandle::new(TaskHost), Arc::new(MemMetaLog::default())).await.unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let limits = super::ConnectionLimits { max_connections: 16, max_streams_per_connection: streams };
            let server = tokio::spawn(
                super::grpc_server(limits, None)
                    .unwrap()
                    .add_service(MetadataServer::new(backend).into_server())
                    .serve_with_incoming(super::incoming(listener, limits.max_connections)),
            );
            // One client: one connection for both calls.
            let client = RemoteBackend::new(format!("http://{addr}"));
            let watch = client.watch(b"k", 0).await.unwrap();
            let get = tokio::time::timeout(if streams == 1 { SHORT } else { LONG }, client.get(b"k")).await;
            if streams == 1 {
                assert!(get.is_err(), "a second call ran on a connection limited to one stream");
                drop(watch);
                let get = tokio::time::timeout(std::time::Duration::from_secs(5), client.get(b"k")).await;
                assert!(matches!(get, Ok(Ok(None))), "the call did not run once the watch ended: {get:?}");
            } else {
                assert!(matches!(get, Ok(Ok(None))), "a second stream was refused: {get:?}");
                drop(watch);
            }
            server.abort();
        }
    }

    #[test]
    fn connection_limits_of_zero_are_refused() {
        let zero = super::ConnectionLimits { max_connections: 0, ..Default::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("max_connections"));
        let zero = super::ConnectionLimits { max_streams_per_connection: 0, ..Default::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("max_streams_per_connection"));
        super::ConnectionLimits::default().validate().unwrap();
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
