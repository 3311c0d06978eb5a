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
use serde::Serialize;
use std::fmt;

use crate::records::{self, Format};
use attache_actors::client::{CallSpec, Client, ClientSettings, Failure, Outcome};

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
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    #[command(flatten)]
    pub auth: crate::auth::ClientAuthArgs,
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
        /// With --stale: the oldest view to accept, ms (a node whose view
        /// is older catches up first, or refuses and the next node is tried).
        #[arg(long, requires = "stale", value_name = "MS")]
        max_staleness_ms: Option<u64>,
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
        /// Accept possibly stale data: any node that has the volume (a
        /// backup too) answers. Each page of entries is a separate read of
        /// that node's view and says how old it may be; the pages of one
        /// stale scan may come from different moments.
        #[arg(long)]
        stale: bool,
        /// With --stale: the oldest view to accept for each page, ms.
        #[arg(long, requires = "stale", value_name = "MS")]
        max_staleness_ms: Option<u64>,
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

/// Bytes for the terminal: UTF-8 as is; tabs, line breaks, backslashes and
/// other bytes escaped as in `tsv-escaped`.
fn text(bytes: &[u8]) -> String {
    records::escaped(bytes)
}

/// Prints `v` as one JSON line with `--json`, else as its text form.
fn emit<T: Serialize + fmt::Display>(json: bool, v: &T) {
    if json {
        println!("{}", serde_json::to_string(v).expect("command output serializes"));
    } else {
        println!("{v}");
    }
}

/// A shard, as commands print it.
#[derive(Serialize)]
struct ShardOut {
    shard_id: u64,
    client_id: String,
    state: &'static str,
    size_limit_bytes: u64,
    volume_id: String,
}

impl From<&proto::ShardInfo> for ShardOut {
    fn from(i: &proto::ShardInfo) -> Self {
        ShardOut {
            shard_id: i.shard_id,
            client_id: i.client_id.clone(),
            state: state_name(i.state),
            size_limit_bytes: i.size_limit_bytes,
            volume_id: i.volume_id.clone(),
        }
    }
}

impl fmt::Display for ShardOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shard {}  client {}  {}  limit {} bytes  volume {}",
            self.shard_id, self.client_id, self.state, self.size_limit_bytes, self.volume_id
        )
    }
}

/// A write's acknowledgement.
#[derive(Serialize)]
struct Ack {
    ok: bool,
}

impl fmt::Display for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ok")
    }
}

/// One key read: `get` and each line of `batch-get`.
#[derive(Serialize)]
struct KeyOut {
    key: String,
    found: bool,
    value: Option<String>,
    /// Stale reads: how old the answering node's view may be, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_staleness_ms: Option<u64>,
}

impl From<&proto::GetResponse> for KeyOut {
    fn from(r: &proto::GetResponse) -> Self {
        KeyOut { key: text(&r.key), found: r.found, value: r.found.then(|| text(&r.value)), max_staleness_ms: None }
    }
}

impl fmt::Display for KeyOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.value, self.max_staleness_ms) {
            (Some(v), Some(ms)) => write!(f, "{}\t{v}\t(at most {ms} ms stale)", self.key),
            (Some(v), None) => write!(f, "{}\t{v}", self.key),
            (None, _) => write!(f, "{}\t(not found)", self.key),
        }
    }
}

/// One record of a scan.
#[derive(Serialize)]
struct RecordOut {
    key: String,
    value: String,
    /// Stale scans: how old the view that served this record's page may be, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_staleness_ms: Option<u64>,
}

impl fmt::Display for RecordOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.max_staleness_ms {
            Some(ms) => write!(f, "{}\t{}\t(at most {ms} ms stale)", self.key, self.value),
            None => write!(f, "{}\t{}", self.key, self.value),
        }
    }
}

/// One secondary-index hit.
#[derive(Serialize)]
struct HitOut {
    value: String,
    key: String,
}

impl fmt::Display for HitOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\t{}", self.value, self.key)
    }
}

/// A shard's size and counters.
#[derive(Serialize)]
struct StatsOut {
    info: ShardOut,
    live_bytes: u64,
    live_keys: u64,
    bytes_written: u64,
    bytes_read: u64,
    ops_written: u64,
    ops_read: u64,
    group_commits: u64,
    committed_ops: u64,
}

impl fmt::Display for StatsOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.info)?;
        writeln!(f, "  keys {}  live bytes {} of {}", self.live_keys, self.live_bytes, self.info.size_limit_bytes)?;
        writeln!(
            f,
            "  since open: {} ops / {} bytes written, {} ops / {} bytes read",
            self.ops_written, self.bytes_written, self.ops_read, self.bytes_read
        )?;
        write!(f, "  group commits {} carrying {} writes", self.group_commits, self.committed_ops)
    }
}

/// The cluster, as `status` prints it.
#[derive(Serialize)]
struct StatusOut {
    nodes: Vec<NodeOut>,
    volumes: Vec<VolumeOut>,
}

#[derive(Serialize)]
struct NodeOut {
    node_id: u64,
    address: String,
    live: bool,
}

#[derive(Serialize)]
struct VolumeOut {
    volume_id: String,
    primary_node_id: u64,
    primary_address: String,
    epoch: u64,
    backup_node_ids: Vec<u64>,
    shards: u64,
}

impl fmt::Display for StatusOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "nodes:")?;
        for n in &self.nodes {
            writeln!(f, "  node {}  {}  {}", n.node_id, n.address, if n.live { "live" } else { "down" })?;
        }
        write!(f, "volumes:")?;
        for v in &self.volumes {
            let backups: Vec<String> = v.backup_node_ids.iter().map(u64::to_string).collect();
            let primary = if v.primary_address.is_empty() { "down" } else { &v.primary_address };
            write!(
                f,
                "\n  {}  primary node {} ({primary})  epoch {}  backups [{}]  shards {}",
                v.volume_id,
                v.primary_node_id,
                v.epoch,
                backups.join(", "),
                v.shards
            )?;
        }
        Ok(())
    }
}

/// The summary line of `load` and `dump`.
#[derive(Serialize)]
struct TransferOut {
    #[serde(skip)]
    verb: &'static str,
    records: u64,
    seconds: f64,
    records_per_sec: f64,
}

impl TransferOut {
    fn new(verb: &'static str, records: u64, start: Instant) -> Self {
        let seconds = start.elapsed().as_secs_f64();
        TransferOut { verb, records, seconds, records_per_sec: records as f64 / seconds }
    }
}

impl fmt::Display for TransferOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} records in {:.2} s ({:.0} records/s)",
            self.verb, self.records, self.seconds, self.records_per_sec
        )
    }
}

fn parse_index(s: &str) -> anyhow::Result<proto::IndexEntry> {
    let (name, value) = s.split_once('=').with_context(|| format!("--index {s:?}: expected NAME=VALUE"))?;
    Ok(proto::IndexEntry { name: name.into(), value: value.as_bytes().to_vec() })
}

/// Sends `req` with `method` as `spec` says (see `attache_actors::client`);
/// a final failure becomes the command's error.
macro_rules! call {
    ($c:expr, $spec:expr, $method:ident, $req:expr) => {
        $c.call($spec, |mut c| {
            let r = $req.clone();
            async move { c.$method(r).await }
        })
        .await
        .map(|served| served.value)
        .map_err(failure_error)
    };
}

/// The canonical name of a gRPC code, e.g. `NOT_FOUND`.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
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
    }
}

/// A client command's error for a gRPC status: the canonical code name and
/// the server's message, e.g. `NOT_FOUND: shard 9 does not exist: ...`.
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(s.code()), s.message())
}

/// A failed call's error: its last status, and whether it may have been applied.
fn failure_error(f: Failure) -> anyhow::Error {
    match f.outcome {
        Outcome::Rejected => status_error(f.status),
        Outcome::Unknown => anyhow::anyhow!(
            "{}: {} (after {} attempts; the request may or may not have been applied)",
            code_name(f.status.code()),
            f.status.message(),
            f.attempts
        ),
    }
}

/// Runs a client command.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let settings = ClientSettings {
        deadline_ms: args.retry_secs.saturating_mul(1000),
        seed: crate::serve::jitter_seed(),
        ..Default::default()
    };
    let c = Client::new(&args.addr, settings).map_err(status_error)?;
    let c = match args.tls.load()? {
        Some(tls) => c.with_tls(tls),
        None => c,
    };
    let c = match args.auth.load()? {
        Some(token) => c.with_token(token),
        None => c,
    };
    let json = args.json;
    match args.cmd {
        ClientCmd::NewShard { client_id, size_limit } => {
            let req = proto::NewShardRequest { client_id, size_limit_bytes: size_limit.unwrap_or(0) };
            // Sent once: a repeat could create a second shard (see Repeat::Never).
            let info = call!(c, CallSpec::any().once(), new_shard, req)?;
            emit(json, &ShardOut::from(&info));
        }
        ClientCmd::CloseShard(sel) => {
            let req = proto::ShardRef { shard_id: sel.shard, client_id: sel.client_id };
            let info = call!(c, CallSpec::shard(sel.shard), close_shard, req)?;
            emit(json, &ShardOut::from(&info));
        }
        ClientCmd::DeleteShard(sel) => {
            let req = proto::ShardRef { shard_id: sel.shard, client_id: sel.client_id };
            let info = call!(c, CallSpec::shard(sel.shard), delete_shard, req)?;
            emit(json, &ShardOut::from(&info));
        }
        ClientCmd::Put { sel, key, value, indexes } => {
            let indexes = indexes.iter().map(|s| parse_index(s)).collect::<anyhow::Result<_>>()?;
            let req = proto::PutRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                key: key.into(),
                value: value.into(),
                indexes,
                request_id: c.request_id(),
            };
            call!(c, CallSpec::shard(sel.shard), put, req)?;
            emit(json, &Ack { ok: true });
        }
        ClientCmd::Get { sel, key, stale, max_staleness_ms } => {
            let consistency =
                if stale { proto::ReadConsistency::StaleOk } else { proto::ReadConsistency::Linearizable };
            let req = proto::GetRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                key: key.into(),
                consistency: consistency as i32,
                max_staleness_ms: max_staleness_ms.unwrap_or(0),
            };
            let r = call!(c, CallSpec::shard(sel.shard), get, req)?;
            if !json && !r.found {
                anyhow::bail!("key {} not found", text(&r.key));
            }
            let out = KeyOut { max_staleness_ms: stale.then_some(r.max_staleness_ms), ..KeyOut::from(&r) };
            match (json, &out.value, out.max_staleness_ms) {
                (true, _, _) => emit(true, &out),
                (false, Some(v), Some(ms)) => println!("{v}\t(at most {ms} ms stale)"),
                (false, Some(v), None) => println!("{v}"),
                (false, None, _) => unreachable!("not found bails above"),
            }
        }
        ClientCmd::Delete { sel, key } => {
            let req = proto::DeleteRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                key: key.into(),
                request_id: c.request_id(),
            };
            call!(c, CallSpec::shard(sel.shard), delete, req)?;
            emit(json, &Ack { ok: true });
        }
        ClientCmd::BatchGet { sel, keys } => {
            let req = proto::BatchGetRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                keys: keys.into_iter().map(String::into_bytes).collect(),
                consistency: 0,
                max_staleness_ms: 0,
            };
            let stream = call!(c, CallSpec::shard(sel.shard), batch_get, req)?;
            let results: Vec<proto::GetResponse> = stream.try_collect().await.map_err(status_error)?;
            for r in &results {
                emit(json, &KeyOut::from(r));
            }
        }
        ClientCmd::Scan { sel, start, end, limit, stale, max_staleness_ms } => {
            let consistency =
                if stale { proto::ReadConsistency::StaleOk } else { proto::ReadConsistency::Linearizable };
            let req = proto::ScanRequest {
                shard_id: sel.shard,
                client_id: sel.client_id,
                start: start.into(),
                end: end.into(),
                limit,
                consistency: consistency as i32,
                max_staleness_ms: max_staleness_ms.unwrap_or(0),
            };
            let mut stream = call!(c, CallSpec::shard(sel.shard), scan, req)?;
            while let Some(page) = stream.next().await {
                let page = page.map_err(status_error)?;
                let age = stale.then_some(page.max_staleness_ms);
                for kv in page.entries {
                    emit(json, &RecordOut { key: text(&kv.key), value: text(&kv.value), max_staleness_ms: age });
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
            let mut stream = call!(c, CallSpec::shard(sel.shard), scan_index, req)?;
            while let Some(page) = stream.next().await {
                for hit in page.map_err(status_error)?.hits {
                    emit(json, &HitOut { value: text(&hit.value), key: text(&hit.key) });
                }
            }
        }
        ClientCmd::Stats(sel) => {
            let req = proto::ShardRef { shard_id: sel.shard, client_id: sel.client_id };
            let s = call!(c, CallSpec::shard(sel.shard), shard_stats, req)?;
            let out = StatsOut {
                info: ShardOut::from(&s.info.clone().unwrap_or_default()),
                live_bytes: s.live_bytes,
                live_keys: s.live_keys,
                bytes_written: s.bytes_written,
                bytes_read: s.bytes_read,
                ops_written: s.ops_written,
                ops_read: s.ops_read,
                group_commits: s.group_commits,
                committed_ops: s.committed_ops,
            };
            emit(json, &out);
        }
        ClientCmd::ListShards { client_id } => {
            let req = proto::ListShardsRequest { client_id };
            let r = call!(c, CallSpec::any(), list_shards, req)?;
            for i in &r.shards {
                emit(json, &ShardOut::from(i));
            }
        }
        ClientCmd::Status => {
            let r = call!(c, CallSpec::any(), cluster_status, proto::ClusterStatusRequest {})?;
            let out = StatusOut {
                nodes: r
                    .nodes
                    .iter()
                    .map(|n| NodeOut { node_id: n.node_id, address: n.address.clone(), live: n.live })
                    .collect(),
                volumes: r
                    .volumes
                    .iter()
                    .map(|v| VolumeOut {
                        volume_id: v.volume_id.clone(),
                        primary_node_id: v.primary_node_id,
                        primary_address: v.primary_address.clone(),
                        epoch: v.epoch,
                        backup_node_ids: v.backup_node_ids.clone(),
                        shards: v.shards,
                    })
                    .collect(),
            };
            emit(json, &out);
        }
        ClientCmd::Load { sel, file, format, batch, concurrency } => {
            load(c, sel, file, format, batch, concurrency, json).await?
        }
        ClientCmd::Dump { sel, out, format } => dump(&c, sel, out, format, json).await?,
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
            let c = c.clone();
            let req =
                proto::BatchPutRequest { shard_id, client_id: client_id.clone(), entries, request_id: c.request_id() };
            let n = req.entries.len() as u64;
            async move { call!(c, CallSpec::shard(shard_id), batch_put, req).map(|_| (n, read)) }
        })
        .buffer_unordered(concurrency);
    while let Some(result) = results.next().await {
        match result {
            Ok((n, read)) => {
                acked += n;
                pb.inc(read);
                pb.set_message(format!("{acked} records"));
            }
            Err(e) => {
                pb.abandon();
                anyhow::bail!("{e}; {acked} records were acknowledged before it");
            }
        }
    }
    drop(results);
    if let Some(e) = parse_error {
        pb.abandon();
        anyhow::bail!("{e}; {acked} records were acknowledged before it");
    }
    pb.finish_and_clear();
    emit(json, &TransferOut::new("loaded", acked, start));
    Ok(())
}

async fn dump(c: &Client, sel: ShardSel, out: Option<PathBuf>, format: Format, json: bool) -> anyhow::Result<()> {
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
        max_staleness_ms: 0,
    };
    let mut stream = call!(c, CallSpec::shard(sel.shard), scan, req)?;
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
    if out.is_some() {
        emit(json, &TransferOut::new("dumped", n, start));
    }
    Ok(())
}
