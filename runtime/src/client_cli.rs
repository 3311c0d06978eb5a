//! `attache client ...`: every API operation from the command line, printed
//! readably (or as JSON with `--json`), plus `load` (a TSV or JSON-lines file
//! into a shard, in atomic batches, with a progress bar) and `dump` (a shard
//! back out in the same formats).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use attache_actors::service::proto;
use clap::{Args, Subcommand};
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::client::{Client, RetrySettings};
use crate::records::{self, Format};

/// `attache client` flags.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Node addresses (`host:port`, comma-separated); calls go to the first
    /// and move on when it is unavailable, following primary hints.
    #[arg(long, default_value = "127.0.0.1:7400", env = "ATTACHE_ADDR", value_delimiter = ',')]
    pub addr: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up retrying an unavailable node after this many seconds.
    #[arg(long, default_value_t = 30)]
    pub retry_secs: u64,
    #[command(subcommand)]
    pub cmd: ClientCmd,
}

/// A shard and the client id that owns it.
#[derive(Args, Debug, Clone)]
pub struct ShardSel {
    /// Shard id (from new-shard).
    #[arg(long, short)]
    pub shard: u64,
    /// Client id that owns the shard.
    #[arg(long, short, env = "ATTACHE_CLIENT_ID")]
    pub client_id: String,
}

/// The client commands.
#[derive(Subcommand, Debug)]
pub enum ClientCmd {
    /// Create a shard; prints its id.
    NewShard {
        #[arg(long, short, env = "ATTACHE_CLIENT_ID")]
        client_id: String,
        /// Size limit in bytes (default: the node's, 2 GiB).
        #[arg(long)]
        size_limit: Option<u64>,
    },
    /// Make a shard read-only.
    CloseShard(ShardSel),
    /// Delete a shard and its data.
    DeleteShard(ShardSel),
    /// Put one key; `--index name=value` adds secondary index entries.
    Put {
        #[command(flatten)]
        sel: ShardSel,
        key: String,
        value: String,
        #[arg(long = "index", value_name = "NAME=VALUE")]
        indexes: Vec<String>,
    },
    /// Read one key.
    Get {
        #[command(flatten)]
        sel: ShardSel,
        key: String,
        /// Accept possibly stale data: any node that has the volume (a
        /// backup too) answers, and says how old its view is.
        #[arg(long)]
        stale: bool,
    },
    /// Delete one key.
    Delete {
        #[command(flatten)]
        sel: ShardSel,
        key: String,
    },
    /// Read many keys.
    BatchGet {
        #[command(flatten)]
        sel: ShardSel,
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Read keys in [start, end) in order.
    Scan {
        #[command(flatten)]
        sel: ShardSel,
        #[arg(long, default_value = "")]
        start: String,
        /// Exclusive end; empty: no bound.
        #[arg(long, default_value = "")]
        end: String,
        /// Most entries; 0: all.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Read a secondary index: entries whose value starts with a prefix.
    ScanIndex {
        #[command(flatten)]
        sel: ShardSel,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// A shard's size and counters.
    Stats(ShardSel),
    /// A client's shards.
    ListShards {
        #[arg(long, short, env = "ATTACHE_CLIENT_ID")]
        client_id: String,
    },
    /// Nodes, volumes and their primaries.
    Status,
    /// Load a TSV (`key<TAB>value`) or JSON-lines file into a shard.
    Load {
        #[command(flatten)]
        sel: ShardSel,
        file: PathBuf,
        /// File format (default: from the extension; .jsonl is JSON lines, else TSV).
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Records per atomic batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Batches in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Write a shard's records out as TSV or JSON lines.
    Dump {
        #[command(flatten)]
        sel: ShardSel,
        /// Output file (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "tsv")]
        format: Format,
    },
}

fn state_name(state: i32) -> &'static str {
    match proto::ShardState::try_from(state) {
        Ok(proto::ShardState::Active) => "active",
        Ok(proto::ShardState::ReadOnly) => "read-only",
        Ok(proto::ShardState::Deleted) => "deleted",
        _ => "unknown",
    }
}

fn info_json(i: &proto::ShardInfo) -> serde_json::Value {
    json!({"shard_id": i.shard_id, "client_id": i.client_id, "state": state_name(i.state),
           "size_limit_bytes": i.size_limit_bytes, "volume_id": i.volume_id})
}

fn print_info(json: bool, i: &proto::ShardInfo) {
    if json {
        println!("{}", info_json(i));
    } else {
        println!(
            "shard {}  client {}  {}  limit {} bytes  volume {}",
            i.shard_id,
            i.client_id,
            state_name(i.state),
            i.size_limit_bytes,
            i.volume_id
        );
    }
}

/// Bytes for the terminal: UTF-8 as is; tabs, line breaks, backslashes and
/// other bytes escaped as in `tsv-escaped`.
fn text(bytes: &[u8]) -> String {
    records::escaped(bytes)
}

fn parse_index(s: &str) -> anyhow::Result<proto::IndexEntry> {
    let (name, value) = s.split_once('=').with_context(|| format!("--index {s:?}: expected NAME=VALUE"))?;
    Ok(proto::IndexEntry { name: name.into(), value: value.as_bytes().to_vec() })
}

/// Sends `req` with `method`, retrying as `Client::retrying` does; a final
/// failure becomes the command's error.
macro_rules! retry {
    ($c:expr, $method:ident, $req:expr) => {
        $c.retrying(|mut c| {
            let r = $req.clone();
            async move { c.$method(r).await }
        })
        .await
        .map_err(status_error)
    };
}

/// A client command's error for a gRPC status: the canonical code name and
/// the server's message, e.g. `NOT_FOUND: shard 9 does not exist: ...`.
fn status_error(s: tonic::Status) -> anyhow::Error {
    use tonic::Code::*;
    let code = match s.code() {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    };
    anyhow::anyhow!("{code}: {}", s.message())
}

/// Runs a client command.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let retry = RetrySettings { deadline: std::time::Duration::from_secs(args.retry_secs), ..RetrySettings::default() };
    let mut c = Client::new(&args.addr, retry)?;
    let json = args.json;
    match args.cmd {
        ClientCmd::NewShard { client_id, size_limit } => {
            let req = proto::NewShardRequest { client_id, size_limit_bytes: size_limit.unwrap_or(0) };
            let info = c.once(|mut c| async move { c.new_shard(req).await }).await.map_err(status_error)?;
            print_info(json, &info);
        }
        ClientCmd::CloseShard(sel) => {
            let req = proto::ShardRef { shard_id: sel.shard, client_id: sel.client_id };
            let info = retry!(c, close_shard, req)?;
            print_info(json, &info);
        }
        ClientCmd::DeleteShard(sel) => {
            let req = proto::ShardRef { shard_id: sel.shard, client_id: sel.client_id };
            let info = retry!(c, delete_shard, req)?;
            print_info(json, &info);
        }
        ClientCmd::Put { sel, key, value, indexes } => {
            let indexes = indexes.iter().map(|s| parse_index(s)).collect::<anyhow::Result<_>>()?;
            let req = proto::PutRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                key: key.into(),
                value: value.into(),
                indexes,
            };
            retry!(c, put, req)?;
            if json {
                println!("{}", json!({"ok": true}))
            } else {
                println!("ok")
            }
        }
        ClientCmd::Get { sel, key, stale } => {
            let consistency =
                if stale { proto::ReadConsistency::StaleOk } else { proto::ReadConsistency::Linearizable };
            let req = proto::GetRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                key: key.into(),
                consistency: consistency as i32,
            };
            let r = retry!(c, get, req)?;
            match (json, r.found) {
                (true, _) => println!(
                    "{}",
                    json!({"key": text(&r.key), "found": r.found, "value": r.found.then(|| text(&r.value)),
                           "max_staleness_ms": r.max_staleness_ms})
                ),
                (false, true) if stale => println!("{}\t(at most {} ms stale)", text(&r.value), r.max_staleness_ms),
                (false, true) => println!("{}", text(&r.value)),
                (false, false) => anyhow::bail!("key {} not found", text(&r.key)),
            }
        }
        ClientCmd::Delete { sel, key } => {
            let req = proto::DeleteRequest { shard_id: sel.shard, client_id: sel.client_id, key: key.into() };
            retry!(c, delete, req)?;
            if json {
                println!("{}", json!({"ok": true}))
            } else {
                println!("ok")
            }
        }
        ClientCmd::BatchGet { sel, keys } => {
            let req = proto::BatchGetRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                keys: keys.into_iter().map(String::into_bytes).collect(),
                consistency: 0,
            };
            let stream = retry!(c, batch_get, req)?;
            let results: Vec<proto::GetResponse> = stream.try_collect().await.map_err(status_error)?;
            for r in results {
                if json {
                    println!(
                        "{}",
                        json!({"key": text(&r.key), "found": r.found, "value": r.found.then(|| text(&r.value))})
                    );
                } else if r.found {
                    println!("{}\t{}", text(&r.key), text(&r.value));
                } else {
                    println!("{}\t(not found)", text(&r.key));
                }
            }
        }
        ClientCmd::Scan { sel, start, end, limit } => {
            let req = proto::ScanRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                start: start.into(),
                end: end.into(),
                limit,
                consistency: 0,
            };
            let mut stream = retry!(c, scan, req)?;
            while let Some(page) = stream.next().await {
                for kv in page.map_err(status_error)?.entries {
                    if json {
                        println!("{}", json!({"key": text(&kv.key), "value": text(&kv.value)}));
                    } else {
                        println!("{}\t{}", text(&kv.key), text(&kv.value));
                    }
                }
            }
        }
        ClientCmd::ScanIndex { sel, name, prefix, limit } => {
            let req = proto::ScanIndexRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                name,
                value_prefix: prefix.into(),
                limit,
            };
            let mut stream = retry!(c, scan_index, req)?;
            while let Some(page) = stream.next().await {
                for hit in page.map_err(status_error)?.hits {
                    if json {
                        println!("{}", json!({"value": text(&hit.value), "key": text(&hit.key)}));
                    } else {
                        println!("{}\t{}", text(&hit.value), text(&hit.key));
                    }
                }
            }
        }
        ClientCmd::Stats(sel) => {
            let req = proto::ShardRef { shard_id: sel.shard, client_id: sel.client_id };
            let s = retry!(c, shard_stats, req)?;
            let info = s.info.clone().unwrap_or_default();
            if json {
                println!(
                    "{}",
                    json!({"info": info_json(&info), "live_bytes": s.live_bytes, "live_keys": s.live_keys,
                    "bytes_written": s.bytes_written, "bytes_read": s.bytes_read, "ops_written": s.ops_written,
                    "ops_read": s.ops_read, "group_commits": s.group_commits, "committed_ops": s.committed_ops})
                );
            } else {
                print_info(false, &info);
                println!("  keys {}  live bytes {} of {}", s.live_keys, s.live_bytes, info.size_limit_bytes);
                println!(
                    "  since open: {} ops / {} bytes written, {} ops / {} bytes read",
                    s.ops_written, s.bytes_written, s.ops_read, s.bytes_read
                );
                println!("  group commits {} carrying {} writes", s.group_commits, s.committed_ops);
            }
        }
        ClientCmd::ListShards { client_id } => {
            let req = proto::ListShardsRequest { client_id };
            let r = retry!(c, list_shards, req)?;
            for i in &r.shards {
                print_info(json, i);
            }
        }
        ClientCmd::Status => {
            let r = c
                .retrying(|mut c| async move { c.cluster_status(proto::ClusterStatusRequest {}).await })
                .await
                .map_err(status_error)?;
            if json {
                let nodes: Vec<_> = r
                    .nodes
                    .iter()
                    .map(|n| json!({"node_id": n.node_id, "address": n.address, "live": n.live}))
                    .collect();
                let volumes: Vec<_> = r.volumes.iter().map(|v| json!({"volume_id": v.volume_id, "primary_node_id": v.primary_node_id,
                    "primary_address": v.primary_address, "epoch": v.epoch, "backup_node_ids": v.backup_node_ids, "shards": v.shards})).collect();
                println!("{}", json!({"nodes": nodes, "volumes": volumes}));
            } else {
                println!("nodes:");
                for n in &r.nodes {
                    println!("  node {}  {}  {}", n.node_id, n.address, if n.live { "live" } else { "down" });
                }
                println!("volumes:");
                for v in &r.volumes {
                    let backups: Vec<String> = v.backup_node_ids.iter().map(u64::to_string).collect();
                    println!(
                        "  {}  primary node {} ({})  epoch {}  backups [{}]  shards {}",
                        v.volume_id,
                        v.primary_node_id,
                        if v.primary_address.is_empty() { "down" } else { &v.primary_address },
                        v.epoch,
                        backups.join(", "),
                        v.shards
                    );
                }
            }
        }
        ClientCmd::Load { sel, file, format, batch, concurrency } => {
            load(c, sel, file, format, batch, concurrency, json).await?
        }
        ClientCmd::Dump { sel, out, format } => dump(&mut c, sel, out, format, json).await?,
    }
    Ok(())
}

/// Most bytes in one batch a load sends.
const LOAD_BATCH_BYTES: usize = 4 << 20;

async fn load(
    c: Client,
    sel: ShardSel,
    path: PathBuf,
    format: Option<Format>,
    batch: usize,
    concurrency: usize,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(batch > 0 && concurrency > 0, "--batch and --concurrency must be positive");
    let format = format.unwrap_or_else(|| Format::from_path(&path));
    let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata()?.len();
    let pb = ProgressBar::new(size);
    pb.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )?);
    let mut reader = BufReader::new(file);
    let mut line_no = 0usize;
    let mut line = Vec::new();
    let mut parse_error = None;
    // Batches are parsed lazily, as the pipeline asks for them.
    let batches = std::iter::from_fn(|| {
        if parse_error.is_some() {
            return None;
        }
        let (mut entries, mut bytes, mut read) = (Vec::new(), 0, 0u64);
        while entries.len() < batch && bytes < LOAD_BATCH_BYTES {
            line.clear();
            line_no += 1;
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(n) => read += n as u64,
                Err(e) => {
                    parse_error = Some(format!("{}:{line_no}: {e}", path.display()));
                    return None;
                }
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            if line.is_empty() {
                continue;
            }
            match records::parse_line(format, &line) {
                Ok((key, value)) => {
                    bytes += key.len() + value.len();
                    entries.push(proto::Entry { key, value, indexes: vec![] });
                }
                Err(e) => {
                    parse_error = Some(format!("{}:{line_no}: {e}", path.display()));
                    return None;
                }
            }
        }
        (!entries.is_empty()).then_some((entries, read))
    });
    let start = Instant::now();
    let mut acked = 0u64;
    let (shard_id, client_id) = (sel.shard, sel.client_id);
    let mut results = futures::stream::iter(batches)
        .map(|(entries, read)| {
            let mut c = c.clone();
            let req = proto::BatchPutRequest { shard_id, client_id: client_id.clone(), entries };
            let n = req.entries.len() as u64;
            async move {
                c.retrying(|mut c| {
                    let r = req.clone();
                    async move { c.batch_put(r).await }
                })
                .await
                .map(|_| (n, read))
            }
        })
        .buffer_unordered(concurrency);
    while let Some(result) = results.next().await {
        match result {
            Ok((n, read)) => {
                acked += n;
                pb.inc(read);
                pb.set_message(format!("{acked} records"));
            }
            Err(s) => {
                pb.abandon();
                anyhow::bail!("{}; {acked} records were acknowledged before it", status_error(s));
            }
        }
    }
    drop(results);
    if let Some(e) = parse_error {
        pb.abandon();
        anyhow::bail!("{e}; {acked} records were acknowledged before it");
    }
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if json {
        println!("{}", json!({"records": acked, "seconds": secs, "records_per_sec": acked as f64 / secs}));
    } else {
        println!("loaded {acked} records in {secs:.2} s ({:.0} records/s)", acked as f64 / secs);
    }
    Ok(())
}

async fn dump(c: &mut Client, sel: ShardSel, out: Option<PathBuf>, format: Format, json: bool) -> anyhow::Result<()> {
    let mut w: Box<dyn Write> = match &out {
        Some(path) => {
            Box::new(BufWriter::new(File::create(path).with_context(|| format!("cannot create {}", path.display()))?))
        }
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let pb = if out.is_some() { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    pb.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos} records {per_sec}")?);
    let start = Instant::now();
    let req = proto::ScanRequest {
        shard_id: sel.shard,
        client_id: sel.client_id,
        start: vec![],
        end: vec![],
        limit: 0,
        consistency: 0,
    };
    let mut stream = retry!(c, scan, req)?;
    let mut n = 0u64;
    while let Some(page) = stream.next().await {
        let page = page.map_err(status_error)?;
        for kv in &page.entries {
            let line = records::format_line(format, &kv.key, &kv.value).map_err(|e| anyhow::anyhow!(e))?;
            w.write_all(&line)?;
            w.write_all(b"\n")?;
        }
        n += page.entries.len() as u64;
        pb.set_position(n);
    }
    w.flush()?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if out.is_some() {
        if json {
            println!("{}", json!({"records": n, "seconds": secs, "records_per_sec": n as f64 / secs}));
        } else {
            println!("dumped {n} records in {secs:.2} s ({:.0} records/s)", n as f64 / secs);
        }
    }
    Ok(())
}
