//! `attache meta`: the embedded metadata store (persisted in `--data-dir`)
//! served over gRPC, so several `attache node` processes share one store
//! (`--metadata grpc://HOST:PORT`). Stops cleanly on SIGINT/SIGTERM: every
//! acknowledged change is already synced to its log.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use attache_actors::meta::remote::MetadataServer;
use attache_actors::HostHandle;
use clap::Args;

use crate::config::LogArgs;
use crate::serve::{open_metadata, shutdown_signal};
use crate::telemetry::init_logging;
use crate::ActixHost;

/// `attache meta` flags.
#[derive(Args, Clone, Debug)]
pub struct MetaArgs {
    /// gRPC listen address; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7300", env = "ATTACHE_META_LISTEN")]
    pub listen: SocketAddr,
    /// Where the metadata log lives.
    #[arg(long, default_value = "attache-meta", env = "ATTACHE_META_DIR")]
    pub data_dir: PathBuf,
    /// Most connections open at once (each node process holds one); one
    /// past it is closed when accepted.
    #[arg(long, default_value_t = crate::serve::DEFAULT_MAX_CONNECTIONS, env = "ATTACHE_META_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Most concurrent calls on one connection (HTTP/2 streams): a node's
    /// lease, calls and two watches per volume share its one connection.
    #[arg(long, default_value_t = crate::serve::DEFAULT_META_STREAMS_PER_CONNECTION, env = "ATTACHE_META_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: u32,
    #[command(flatten)]
    pub tls: crate::tls::ServerTlsArgs,
    /// With it (or --tls-client-ca), only identities of the group
    /// `attache:node` may call.
    #[command(flatten)]
    pub auth: crate::auth::ServerAuthArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Runs the metadata server until SIGINT/SIGTERM: the `MetadataStore` actor
/// on one actix arbiter, the gRPC server on the actix system's runtime.
pub fn run(args: MetaArgs) -> anyhow::Result<()> {
    init_logging(args.log.log_format.unwrap_or_default(), args.log.log_level.as_deref().unwrap_or("info"));
    let tls = args.tls.load()?;
    let auth = crate::auth::authenticator(args.auth.token_file.as_deref(), tls.as_ref())?;
    crate::tls::check_plaintext("attache meta", args.listen, tls.as_ref(), args.tls.insecure)?;
    actix_rt::System::new().block_on(async move {
        let host = HostHandle::new(ActixHost::new(1));
        let backend = open_metadata(&host, &format!("embedded:{}", args.data_dir.display()), None, None).await?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let local = listener.local_addr()?;
        println!("attache: metadata store serving gRPC on {local} (data in {})", args.data_dir.display());
        let only = if auth.authenticates() { "; only identities of the group attache:node may call" } else { "" };
        println!("attache: metadata store: {}{only}", auth.describe());
        let limits = crate::serve::ConnectionLimits {
            max_connections: args.max_connections,
            max_streams_per_connection: args.max_streams_per_connection,
        };
        limits.validate()?;
        // Each connection is a file descriptor: raise the soft limit to the
        // hard one, as nodes do.
        if let Err(e) = crate::files::raise_open_file_limit() {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
        crate::serve::grpc_server(limits, tls.as_ref())?
            .add_service(MetadataServer::new(backend).with_auth(auth).into_server())
            .serve_with_incoming_shutdown(crate::serve::incoming(listener, limits.max_connections), shutdown_signal())
            .await
            .context("metadata gRPC server failed")?;
        println!("attache: metadata store stopped");
        Ok(())
    })
}
