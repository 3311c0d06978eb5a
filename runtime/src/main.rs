//! `attache`: the Attaché binary.
//!
//! - `attache dev`: one process with an embedded metadata store and one or
//!   more nodes (`--nodes N`)
//!   serving local directories as volumes (data under `./attache-data`).
//! - `attache node`: one storage node (flags > environment > `--config` YAML).
//! - `attache meta`: the embedded metadata store, served over gRPC to nodes.
//! - `attache client ...`: every API operation, `load` and `dump`.
//! - `attache bench`: YCSB's workloads against Attaché or etcd.
//! - `attache volume ...`: this instance's EBS volumes.
//! - `attache token NAME --out FILE`: a bearer token and its token-file line.

use attache_runtime::{auth, bench, client_cli, config, meta_server, serve, volume_cli};
use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator, as the simulation runs with:
/// a node allocates and frees many small objects per request (messages,
/// reply channels, keys). `group_commit_bench`, which uses it too, went
/// from 62,000 to 69,000 durable puts/s with 128 writers (mean of four
/// runs each, alternated). RocksDB's C++ allocations keep the system
/// allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "attache", version, about = "Attaché: a sharded key-value service on multi-attach block volumes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a local cluster in one process: embedded metadata and one node (or
    /// --nodes N) serving directories under --data-dir as volumes.
    Dev(serve::DevArgs),
    /// Run one storage node.
    Node(Box<config::NodeArgs>),
    /// Serve the embedded metadata store over gRPC.
    Meta(meta_server::MetaArgs),
    /// Call a node's API.
    Client(client_cli::ClientArgs),
    /// Load a cluster (or etcd) with YCSB's workloads and print throughput and latency.
    Bench(bench::BenchArgs),
    /// Describe, attach or detach this instance's EBS volumes (EC2 API).
    Volume(volume_cli::VolumeArgs),
    /// Make a bearer token: written to --out, its token-file line (hash,
    /// name, groups) printed for the servers' --token-file.
    Token(auth::TokenArgs),
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Dev(args) => {
            let data = args.data_dir.display().to_string();
            // With a token file, the hints call as a token's identity.
            // (status needs the group attache:operator).
            let (token, me, operator) = match &args.auth.token_file {
                Some(_) => (" --token-file NAME.token", "NAME", " --token-file OPERATOR.token"),
                None => ("", "me", ""),
            };
            serve::run_nodes(args.settings()?, move |addrs| {
                println!("attache: dev cluster ready; data in {data}. Try:");
                println!("  attache client --addr {}{token} new-shard --client-id {me}", addrs[0]);
                println!("  attache client --addr {}{operator} status", addrs[0]);
                println!("Stop with Ctrl-C.");
            })
        }
        Cmd::Node(args) => serve::run_node(args.resolve()?, |_| {}),
        Cmd::Meta(args) => meta_server::run(args),
        Cmd::Client(args) => {
            attache_runtime::telemetry::init_logging(attache_runtime::telemetry::LogFormat::Human, "warn");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(client_cli::run(args))
        }
        Cmd::Bench(args) => {
            attache_runtime::telemetry::init_logging(attache_runtime::telemetry::LogFormat::Human, "warn");
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(bench::run(args))
        }
        Cmd::Token(args) => auth::run_token(args),
        Cmd::Volume(args) => {
            attache_runtime::telemetry::init_logging(attache_runtime::telemetry::LogFormat::Human, "warn");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(volume_cli::run(args))
        }
    }
}
