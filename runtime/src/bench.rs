//! `attache bench`: a load phase and YCSB's core workloads against Attaché
//! or etcd, for sizing a cluster and comparing the two on the same machines.
//!
//! The workloads are YCSB's (Cooper et al., "Benchmarking Cloud Serving
//! Systems with YCSB", SoCC 2010; `workloads/workload[a-f]` in the YCSB
//! repository), plus a put-only load:
//!
//! | workload | operations                          | key distribution |
//! |----------|-------------------------------------|------------------|
//! | `a`      | 50% read, 50% update                | zipfian          |
//! | `b`      | 95% read, 5% update                 | zipfian          |
//! | `c`      | 100% read                           | zipfian          |
//! | `d`      | 95% read, 5% insert                 | latest           |
//! | `e`      | 95% scan, 5% insert                 | zipfian (start)  |
//! | `f`      | 50% read, 50% read-modify-write     | zipfian          |
//! | `put`    | 100% update                         | uniform          |
//!
//! - **Keys**: record number `n` is the key `user` + the 20-digit FNV-1a hash
//!   of `n` (YCSB's hashed insert order), so inserts and scans do not walk
//!   the keys in order. `--distribution` overrides the workload's.
//! - **Zipfian** is YCSB's scrambled zipfian: a rank drawn with exponent
//!   0.99 (rand_distr's rejection-inversion sampler, Hörmann and Derflinger
//!   1996), hashed over the records so the hot keys are spread out.
//!   **Latest** draws the same rank back from the newest acknowledged
//!   insert. **Uniform** draws any loaded or acknowledged record.
//! - **Scan** reads up to a uniform 1..=`--max-scan-length` entries from a
//!   start key (Attaché: one `Scan` within the start key's shard; etcd: one
//!   `Range` with a limit). **Read-modify-write** is a read and an update of
//!   the same key, timed together.
//! - **Load phase**: inserts records `0..--records` (skipped with
//!   `--skip-load`); **run phase**: `--operations` operations or
//!   `--duration` seconds. `--in-flight` tasks each issue one operation at a
//!   time over `--connections` connections (task `i` uses connection
//!   `i % connections`).
//! - **Attaché**: reads are linearizable `Get`s, writes `Put`s with a request
//!   id, through the same client ([`attache_actors::client::Client`]) the CLI
//!   and the simulation use (retries, primary hints). Records go to
//!   `--shards` shards created for `--client-id` (record `n` to shard
//!   `n mod shards`), deleted at the end unless `--keep`; or to existing
//!   shards given with `--shard`.
//! - **etcd** (`--target etcd://HOST:PORT`): linearizable `Range` for reads
//!   and scans, `Put` for writes, under `--key-prefix`, deleted at the end
//!   (when this run loaded them) unless `--keep`.
//! - **Output**: per phase and operation type, the count, errors by gRPC
//!   status, throughput (operations/s over the phase), and latency in ms
//!   (p50, p95, p99, p99.9, max; HdrHistogram at 3 significant digits, in
//!   microseconds). A read that finds no value counts as a `MISSING` error.
//!   `--json` prints the same as one JSON object.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use attache_actors::client::{CallSpec, Client, ClientSettings, Failure};
use attache_actors::service::proto;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution as _, Zipf};
use serde::Serialize;

use crate::client_cli::code_name;

/// YCSB's zipfian constant.
const ZIPFIAN_EXPONENT: f64 = 0.99;

/// Highest latency the histograms hold, µs (larger values count as this).
const MAX_LATENCY_US: u64 = 600_000_000;

/// `attache bench` flags.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to load: `attache://HOST:PORT[,HOST:PORT...]` (or just the
    /// addresses) for Attaché nodes, `etcd://HOST:PORT[,HOST:PORT...]` for etcd.
    #[arg(long, default_value = "attache://127.0.0.1:7400", env = "ATTACHE_ADDR")]
    pub target: String,
    /// The workload of the run phase: its mix of operations and key distribution.
    #[arg(long, value_enum, default_value_t = Workload::A)]
    pub workload: Workload,
    /// Records inserted by the load phase; the run phase reads and updates these.
    #[arg(long, default_value_t = 10_000)]
    pub records: u64,
    /// Operations in the run phase (default 10,000 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    pub operations: Option<u64>,
    /// Length of the run phase, seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Value size, bytes.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Client connections (each one HTTP/2 connection per node).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Operations in flight at once (one task each).
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// Key distribution (default: the workload's).
    #[arg(long, value_enum)]
    pub distribution: Option<KeyDistribution>,
    /// Longest scan of workload e, entries.
    #[arg(long, default_value_t = 100)]
    pub max_scan_length: u64,
    /// Skip the load phase: the records are already there (from a run with --keep).
    #[arg(long)]
    pub skip_load: bool,
    /// Keep the records (and shards) at the end instead of deleting them.
    #[arg(long)]
    pub keep: bool,
    /// Attaché: shards to create and spread the records over.
    #[arg(long, default_value_t = 1, conflicts_with = "shard")]
    pub shards: usize,
    /// Attaché: use these existing shards (comma-separated ids) instead of creating new ones.
    #[arg(long, value_delimiter = ',')]
    pub shard: Vec<u64>,
    /// Attaché: size limit of each created shard, bytes (default: the node's).
    #[arg(long)]
    pub shard_size_limit: Option<u64>,
    /// Attaché: the client id that owns the shards.
    #[arg(long, default_value = "bench", env = "ATTACHE_CLIENT_ID")]
    pub client_id: String,
    /// etcd: the prefix of every key.
    #[arg(long, default_value = "attache-bench/")]
    pub key_prefix: String,
    /// Seed of the operation mix, keys and values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// TLS to the nodes (`attache://` targets).
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    /// The bearer token to call the nodes with (`attache://` targets): its
    /// identity must be --client-id.
    #[command(flatten)]
    pub auth: crate::auth::ClientAuthArgs,
}

/// A run phase's mix of operations (see the module docs).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// 50% read, 50% update, zipfian.
    A,
    /// 95% read, 5% update, zipfian.
    B,
    /// 100% read, zipfian.
    C,
    /// 95% read, 5% insert, latest.
    D,
    /// 95% scan, 5% insert, zipfian.
    E,
    /// 50% read, 50% read-modify-write, zipfian.
    F,
    /// 100% update, uniform: a put-only load.
    Put,
}

impl Workload {
    /// The mix: (operation, weight in percent), summing to 100.
    fn mix(self) -> &'static [(Op, u32)] {
        match self {
            Workload::A => &[(Op::Read, 50), (Op::Update, 50)],
            Workload::B => &[(Op::Read, 95), (Op::Update, 5)],
            Workload::C => &[(Op::Read, 100)],
            Workload::D => &[(Op::Read, 95), (Op::Insert, 5)],
            Workload::E => &[(Op::Scan, 95), (Op::Insert, 5)],
            Workload::F => &[(Op::Read, 50), (Op::ReadModifyWrite, 50)],
            Workload::Put => &[(Op::Update, 100)],
        }
    }

    fn distribution(self) -> KeyDistribution {
        match self {
            Workload::D => KeyDistribution::Latest,
            Workload::Put => KeyDistribution::Uniform,
            _ => KeyDistribution::Zipfian,
        }
    }

    fn describe(self) -> String {
        self.mix().iter().map(|(op, pct)| format!("{pct}% {op}")).collect::<Vec<_>>().join(", ")
    }
}

/// How records are picked (see the module docs).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDistribution {
    /// Every record equally likely.
    Uniform,
    /// YCSB's scrambled zipfian (exponent 0.99).
    Zipfian,
    /// Zipfian from the newest record back.
    Latest,
}

/// One kind of operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Insert,
    Read,
    Update,
    Scan,
    ReadModifyWrite,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Insert => "insert",
            Op::Read => "read",
            Op::Update => "update",
            Op::Scan => "scan",
            Op::ReadModifyWrite => "read-modify-write",
        })
    }
}

/// The key of record `n`: `user` and the FNV-1a hash of `n` in 20 digits.
pub fn record_key(n: u64) -> String {
    format!("user{:020}", fnv1a(n))
}

/// FNV-1a, 64 bits, over the little-endian bytes of `n` (YCSB hashes
/// record numbers with FNV to scatter them).
fn fnv1a(n: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in n.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Records whose insert was acknowledged: every record below `limit`
/// (YCSB's acknowledged counter), so reads never pick a record still in flight.
struct Acknowledged {
    limit: AtomicU64,
    /// Acknowledged records above the limit, waiting for the ones before them.
    above: Mutex<std::collections::BTreeSet<u64>>,
}

impl Acknowledged {
    fn new(limit: u64) -> Self {
        Acknowledged { limit: AtomicU64::new(limit), above: Mutex::new(Default::default()) }
    }

    fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    fn ack(&self, n: u64) {
        let mut above = self.above.lock().expect("acknowledged lock");
        above.insert(n);
        let mut limit = self.limit.load(Ordering::Acquire);
        while above.remove(&limit) {
            limit += 1;
        }
        self.limit.store(limit, Ordering::Release);
    }
}

/// Picks record numbers below a limit as a [`KeyDistribution`] says.
fn pick(dist: KeyDistribution, limit: u64, rng: &mut ChaCha8Rng) -> u64 {
    let limit = limit.max(1);
    let rank = |rng: &mut ChaCha8Rng| {
        let z = Zipf::new(limit as f64, ZIPFIAN_EXPONENT).expect("zipf parameters are valid");
        (z.sample(rng) as u64).clamp(1, limit) - 1
    };
    match dist {
        KeyDistribution::Uniform => rng.random_range(0..limit),
        KeyDistribution::Zipfian => fnv1a(rank(rng)) % limit,
        KeyDistribution::Latest => limit - 1 - rank(rng),
    }
}

/// Where the operations go.
enum Target {
    Attache { clients: Vec<Client>, client_id: String, shards: Vec<u64>, created: bool },
    Etcd { clients: Vec<etcd_client::Client>, prefix: String },
}

/// A failed operation: the gRPC status name (or `MISSING`, `TRANSPORT`).
type OpError = String;

impl Target {
    fn label(&self) -> &'static str {
        match self {
            Target::Attache { .. } => "attache",
            Target::Etcd { .. } => "etcd",
        }
    }

    fn shard_of(shards: &[u64], n: u64) -> u64 {
        shards[(n % shards.len() as u64) as usize]
    }

    async fn read(&self, conn: usize, n: u64) -> Result<(), OpError> {
        let key = record_key(n);
        let found = match self {
            Target::Attache { clients, client_id, shards, .. } => {
                let shard = Self::shard_of(shards, n);
                let req = proto::GetRequest {
                    shard_id: shard,
                    client_id: client_id.clone(),
                    key: key.into_bytes(),
                    consistency: proto::ReadConsistency::Linearizable as i32,
                    max_staleness_ms: 0,
                };
                let c = &clients[conn];
                let r = c
                    .call(CallSpec::shard(shard), |mut s| {
                        let r = req.clone();
                        async move { s.get(r).await }
                    })
                    .await
                    .map_err(failure_name)?;
                r.value.found
            }
            Target::Etcd { clients, prefix } => {
                let mut kv = clients[conn].kv_client();
                let r = kv.get(format!("{prefix}{key}"), None).await.map_err(etcd_error_name)?;
                !r.kvs().is_empty()
            }
        };
        if found {
            Ok(())
        } else {
            Err("MISSING".into())
        }
    }

    async fn write(&self, conn: usize, n: u64, value: &[u8]) -> Result<(), OpError> {
        let key = record_key(n);
        match self {
            Target::Attache { clients, client_id, shards, .. } => {
                let shard = Self::shard_of(shards, n);
                let c = &clients[conn];
                let req = proto::PutRequest {
                    shard_id: shard,
                    client_id: client_id.clone(),
                    key: key.into_bytes(),
                    value: value.to_vec(),
                    indexes: vec![],
                    request_id: c.request_id(),
                };
                c.call(CallSpec::shard(shard), |mut s| {
                    let r = req.clone();
                    async move { s.put(r).await }
                })
                .await
                .map_err(failure_name)?;
            }
            Target::Etcd { clients, prefix } => {
                let mut kv = clients[conn].kv_client();
                kv.put(format!("{prefix}{key}"), value, None).await.map_err(etcd_error_name)?;
            }
        }
        Ok(())
    }

    /// Reads up to `len` entries from record `n`'s key on; returns how many.
    async fn scan(&self, conn: usize, n: u64, len: u64) -> Result<usize, OpError> {
        let key = record_key(n);
        match self {
            Target::Attache { clients, client_id, shards, .. } => {
                let shard = Self::shard_of(shards, n);
                let req = proto::ScanRequest {
                    shard_id: shard,
                    client_id: client_id.clone(),
                    start: key.into_bytes(),
                    end: vec![],
                    limit: len,
                    consistency: proto::ReadConsistency::Linearizable as i32,
                    max_staleness_ms: 0,
                };
                let mut stream = clients[conn]
                    .call(CallSpec::shard(shard), |mut s| {
                        let r = req.clone();
                        async move { s.scan(r).await }
                    })
                    .await
                    .map_err(failure_name)?
                    .value;
                let mut entries = 0;
                while let Some(page) = stream.next().await {
                    entries += page.map_err(|s| code_name(s.code()).to_string())?.entries.len();
                }
                Ok(entries)
            }
            Target::Etcd { clients, prefix } => {
                let mut kv = clients[conn].kv_client();
                let opts = etcd_client::GetOptions::new().with_range(prefix_end(prefix)).with_limit(len as i64);
                let r = kv.get(format!("{prefix}{key}"), Some(opts)).await.map_err(etcd_error_name)?;
                Ok(r.kvs().len())
            }
        }
    }

    /// Deletes what the run created (unless the records were loaded before).
    async fn clean_up(&self) -> anyhow::Result<()> {
        match self {
            Target::Attache { clients, client_id, shards, created } => {
                if !created {
                    return Ok(());
                }
                for &shard in shards {
                    let req = proto::ShardRef { shard_id: shard, client_id: client_id.clone() };
                    clients[0]
                        .call(CallSpec::shard(shard), |mut s| {
                            let r = req.clone();
                            async move { s.delete_shard(r).await }
                        })
                        .await
                        .map_err(|f| anyhow::anyhow!("deleting shard {shard}: {}", failure_name(f)))?;
                }
            }
            Target::Etcd { clients, prefix } => {
                let opts = etcd_client::DeleteOptions::new().with_prefix();
                clients[0]
                    .kv_client()
                    .delete(prefix.as_str(), Some(opts))
                    .await
                    .with_context(|| format!("deleting the keys under {prefix:?}"))?;
            }
        }
        Ok(())
    }
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end for a prefix): `layout::prefix_end`, or `\0` (etcd's "no end") for a
/// prefix of 0xff bytes only.
fn prefix_end(prefix: &str) -> Vec<u8> {
    attache_actors::shard::layout::prefix_end(prefix.as_bytes()).unwrap_or_else(|| vec![0])
}

fn failure_name(f: Failure) -> OpError {
    code_name(f.status.code()).to_string()
}

fn etcd_error_name(e: etcd_client::Error) -> OpError {
    match e {
        etcd_client::Error::GRpcStatus(s) => code_name(s.code()).to_string(),
        _ => "TRANSPORT".into(),
    }
}

/// Latencies and errors of one operation type in one task (merged at the end).
#[derive(Clone)]
struct OpStats {
    latency_us: Histogram<u64>,
    errors: BTreeMap<OpError, u64>,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds"),
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: &OpStats) {
        self.latency_us.add(&other.latency_us).expect("histograms of the same bounds");
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}

/// What one phase measured, by operation type.
#[derive(Default, Clone)]
struct PhaseStats {
    ops: BTreeMap<Op, OpStats>,
}

impl PhaseStats {
    fn record(&mut self, op: Op, started: Instant, result: Result<(), OpError>) {
        let stats = self.ops.entry(op).or_insert_with(OpStats::new);
        match result {
            Ok(()) => stats.latency_us.saturating_record(started.elapsed().as_micros().max(1) as u64),
            Err(e) => *stats.errors.entry(e).or_default() += 1,
        }
    }

    fn merge(&mut self, other: &PhaseStats) {
        for (op, s) in &other.ops {
            self.ops.entry(*op).or_insert_with(OpStats::new).merge(s);
        }
    }
}

/// One operation type's figures in a phase.
#[derive(Serialize, Debug, Clone)]
pub struct OpReport {
    /// `insert`, `read`, `update`, `scan` or `read-modify-write`.
    pub op: String,
    /// Operations that succeeded.
    pub ok: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Failed operations by gRPC status name (`MISSING`: a read found no value).
    pub errors_by_status: BTreeMap<String, u64>,
    /// Successful operations per second over the phase.
    pub ops_per_sec: f64,
    /// Latency of successful operations, ms.
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// One phase's figures.
#[derive(Serialize, Debug, Clone)]
pub struct PhaseReport {
    /// `load` or `run`.
    pub phase: String,
    /// Wall time of the phase, seconds.
    pub seconds: f64,
    /// Successful operations per second, all types.
    pub ops_per_sec: f64,
    /// Successful operations, all types.
    pub ok: u64,
    /// Failed operations, all types.
    pub errors: u64,
    /// By operation type, in the order insert, read, update, scan, read-modify-write.
    pub ops: Vec<OpReport>,
}

/// A whole bench run, as `--json` prints it.
#[derive(Serialize, Debug, Clone)]
pub struct Report {
    /// `attache` or `etcd`.
    pub target: String,
    /// The addresses loaded.
    pub endpoints: Vec<String>,
    pub workload: Workload,
    /// The mix, e.g. `50% read, 50% update`.
    pub mix: String,
    pub distribution: KeyDistribution,
    pub records: u64,
    /// The records reads drew from at the end: loaded, then inserted by the
    /// run and acknowledged without a gap (`records` plus the run's inserts
    /// when all succeeded).
    pub records_after: u64,
    /// Value size, bytes.
    pub value_size: usize,
    pub connections: usize,
    pub in_flight: usize,
    /// Attaché: the shards used.
    pub shards: Vec<u64>,
    /// The load phase (absent with --skip-load), then the run phase.
    pub phases: Vec<PhaseReport>,
}

/// A flag value's name as the command line spells it (`a`, `zipfian`).
fn value_name(v: impl ValueEnum) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl PhaseReport {
    fn new(phase: &str, seconds: f64, stats: &PhaseStats) -> Self {
        let per_sec = |n: u64| if seconds > 0.0 { n as f64 / seconds } else { 0.0 };
        let ops: Vec<OpReport> = stats
            .ops
            .iter()
            .map(|(op, s)| {
                let h = &s.latency_us;
                let ok = h.len();
                let q = |q: f64| if ok == 0 { 0.0 } else { ms(h.value_at_quantile(q)) };
                OpReport {
                    op: op.to_string(),
                    ok,
                    errors: s.errors.values().sum(),
                    errors_by_status: s.errors.clone(),
                    ops_per_sec: per_sec(ok),
                    mean_ms: if ok == 0 { 0.0 } else { h.mean() / 1000.0 },
                    p50_ms: q(0.50),
                    p95_ms: q(0.95),
                    p99_ms: q(0.99),
                    p999_ms: q(0.999),
                    max_ms: if ok == 0 { 0.0 } else { ms(h.max()) },
                }
            })
            .collect();
        let ok = ops.iter().map(|o| o.ok).sum();
        PhaseReport {
            phase: phase.into(),
            seconds,
            ops_per_sec: per_sec(ok),
            ok,
            errors: ops.iter().map(|o| o.errors).sum(),
            ops,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} at {}: workload {} ({}, {}), {} records of {} B, {} connection(s), {} in flight",
            self.target,
            self.endpoints.join(","),
            value_name(self.workload),
            self.mix,
            value_name(self.distribution),
            self.records,
            self.value_size,
            self.connections,
            self.in_flight
        )?;
        writeln!(
            f,
            "{:<5} {:<17} {:>9} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "phase", "op", "ok", "errors", "ops/s", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms"
        )?;
        let mut errors = vec![];
        for p in &self.phases {
            for o in &p.ops {
                writeln!(
                    f,
                    "{:<5} {:<17} {:>9} {:>7} {:>10.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
                    p.phase, o.op, o.ok, o.errors, o.ops_per_sec, o.p50_ms, o.p95_ms, o.p99_ms, o.p999_ms, o.max_ms
                )?;
                errors.extend(o.errors_by_status.iter().map(|(s, n)| format!("{} {}: {s} {n}", p.phase, o.op)));
            }
            writeln!(
                f,
                "{:<5} {:<17} {:>9} {:>7} {:>10.1}   ({:.2} s)",
                p.phase, "total", p.ok, p.errors, p.ops_per_sec, p.seconds
            )?;
        }
        if errors.is_empty() {
            write!(f, "errors: none")
        } else {
            write!(f, "errors: {}", errors.join("; "))
        }
    }
}

/// What every task of a phase shares.
struct Shared {
    target: Target,
    args: BenchArgs,
    distribution: KeyDistribution,
    /// The next record number to insert.
    next_insert: AtomicU64,
    acknowledged: Acknowledged,
    /// Operations started in the run phase.
    started: AtomicU64,
    /// Operations finished in this phase (for the progress bar).
    done: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Load,
    Run { operations: u64, until: Option<Instant> },
}

/// The operation of `mix` that a roll in 0..100 lands on (each takes its weight's share).
fn choose(mix: &[(Op, u32)], mut roll: u32) -> Op {
    for &(op, weight) in mix {
        if roll < weight {
            return op;
        }
        roll -= weight;
    }
    mix[mix.len() - 1].0
}

/// A value of `size` random alphanumeric bytes.
fn random_value(size: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    (0..size).map(|_| rng.sample(rand::distr::Alphanumeric)).collect()
}

async fn task(shared: Arc<Shared>, index: usize, phase: Phase) -> PhaseStats {
    let args = &shared.args;
    let seed = args.seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (phase == Phase::Load) as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let value = random_value(args.value_size, &mut rng);
    let conn = index % args.connections;
    let mut stats = PhaseStats::default();
    let mix = args.workload.mix();
    loop {
        let op = match phase {
            Phase::Load => {
                let n = shared.next_insert.fetch_add(1, Ordering::Relaxed);
                if n >= args.records {
                    break;
                }
                let started = Instant::now();
                let result = shared.target.write(conn, n, &value).await;
                stats.record(Op::Insert, started, result);
                shared.done.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Phase::Run { operations, until } => {
                if let Some(until) = until {
                    if Instant::now() >= until {
                        break;
                    }
                } else if shared.started.fetch_add(1, Ordering::Relaxed) >= operations {
                    break;
                }
                choose(mix, rng.random_range(0..100u32))
            }
        };
        let started = Instant::now();
        let result = match op {
            Op::Insert => {
                let n = shared.next_insert.fetch_add(1, Ordering::Relaxed);
                let r = shared.target.write(conn, n, &value).await;
                if r.is_ok() {
                    shared.acknowledged.ack(n);
                }
                r
            }
            Op::Read => {
                let n = pick(shared.distribution, shared.acknowledged.limit(), &mut rng);
                shared.target.read(conn, n).await
            }
            Op::Update => {
                let n = pick(shared.distribution, shared.acknowledged.limit(), &mut rng);
                shared.target.write(conn, n, &value).await
            }
            Op::Scan => {
                let n = pick(shared.distribution, shared.acknowledged.limit(), &mut rng);
                let len = rng.random_range(1..=args.max_scan_length.max(1));
                shared.target.scan(conn, n, len).await.map(drop)
            }
            Op::ReadModifyWrite => {
                let n = pick(shared.distribution, shared.acknowledged.limit(), &mut rng);
                match shared.target.read(conn, n).await {
                    Ok(()) => shared.target.write(conn, n, &value).await,
                    Err(e) => Err(e),
                }
            }
        };
        stats.record(op, started, result);
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
    stats
}

/// Runs one phase with `--in-flight` tasks and a progress bar; returns its report.
async fn run_phase(shared: &Arc<Shared>, phase: Phase, name: &str) -> anyhow::Result<PhaseReport> {
    shared.done.store(0, Ordering::Relaxed);
    let (len, template) = match phase {
        Phase::Load => (shared.args.records, "{prefix:>5} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})"),
        Phase::Run { until: Some(_), .. } => {
            let secs = shared.args.duration.unwrap_or(0.0);
            ((secs * 1000.0) as u64, "{prefix:>5} [{elapsed_precise}] {wide_bar} {msg}")
        }
        Phase::Run { operations, .. } => {
            (operations, "{prefix:>5} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})")
        }
    };
    let bar = ProgressBar::new(len).with_prefix(name.to_string());
    bar.set_style(ProgressStyle::with_template(template).expect("valid progress template"));
    let started = Instant::now();
    let tasks: Vec<_> = (0..shared.args.in_flight).map(|i| tokio::spawn(task(shared.clone(), i, phase))).collect();
    let ticker = {
        let (shared, bar) = (shared.clone(), bar.clone());
        tokio::spawn(async move {
            loop {
                let done = shared.done.load(Ordering::Relaxed);
                match phase {
                    Phase::Run { until: Some(_), .. } => {
                        bar.set_position(started.elapsed().as_millis() as u64);
                        bar.set_message(format!("{done} operations"));
                    }
                    _ => bar.set_position(done),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut stats = PhaseStats::default();
    for t in tasks {
        stats.merge(&t.await.context("a bench task panicked")?);
    }
    let seconds = started.elapsed().as_secs_f64();
    ticker.abort();
    bar.finish_and_clear();
    Ok(PhaseReport::new(name, seconds, &stats))
}

/// Connects to the target and creates the shards (Attaché) the run needs.
async fn connect(args: &BenchArgs) -> anyhow::Result<(Target, Vec<String>)> {
    if let Some(rest) = args.target.strip_prefix("etcd://") {
        anyhow::ensure!(
            args.tls.tls_ca.is_none() && args.auth.token_file.is_none(),
            "--tls-ca and --token-file apply to attache:// targets; the etcd baseline runs plaintext"
        );
        let endpoints: Vec<String> = rest.split(',').map(String::from).collect();
        let mut clients = vec![];
        for _ in 0..args.connections {
            let opts = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
            let c = etcd_client::Client::connect(&endpoints, Some(opts))
                .await
                .with_context(|| format!("connecting to etcd at {rest}"))?;
            clients.push(c);
        }
        return Ok((Target::Etcd { clients, prefix: args.key_prefix.clone() }, endpoints));
    }
    let rest = args.target.strip_prefix("attache://").unwrap_or(&args.target);
    if rest.contains("://") {
        anyhow::bail!("--target {:?}: expected attache://HOST:PORT or etcd://HOST:PORT", args.target);
    }
    let endpoints: Vec<String> = rest.split(',').map(String::from).collect();
    let tls = args.tls.load()?;
    let token = args.auth.load()?;
    let clients = (0..args.connections)
        .map(|i| {
            let settings = ClientSettings { seed: args.seed.wrapping_add(i as u64), ..Default::default() };
            let c = Client::new(&endpoints, settings).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            let c = match &tls {
                Some(tls) => c.with_tls(tls.clone()),
                None => c,
            };
            Ok(match &token {
                Some(token) => c.with_token(token.clone()),
                None => c,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (shards, created) = if !args.shard.is_empty() {
        (args.shard.clone(), false)
    } else {
        if args.skip_load {
            anyhow::bail!("--skip-load needs --shard: the shards that hold the records (from a run with --keep)");
        }
        let mut shards = vec![];
        for _ in 0..args.shards {
            let req = proto::NewShardRequest {
                client_id: args.client_id.clone(),
                size_limit_bytes: args.shard_size_limit.unwrap_or(0),
            };
            let info = clients[0]
                .call(CallSpec::any().once(), |mut s| {
                    let r = req.clone();
                    async move { s.new_shard(r).await }
                })
                .await
                .map_err(|f| {
                    anyhow::anyhow!("creating a shard at {rest}: {}: {}", failure_name(f.clone()), f.status.message())
                })?;
            shards.push(info.value.shard_id);
        }
        (shards, true)
    };
    Ok((Target::Attache { clients, client_id: args.client_id.clone(), shards, created }, endpoints))
}

fn check(args: &BenchArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.in_flight == 0 {
        anyhow::bail!("--connections and --in-flight must be at least 1");
    }
    if args.records == 0 {
        anyhow::bail!("--records must be at least 1: the run phase reads and updates them");
    }
    if args.shards == 0 {
        anyhow::bail!("--shards must be at least 1");
    }
    if let Some(d) = args.duration {
        if !(d.is_finite() && d > 0.0) {
            anyhow::bail!("--duration must be a positive number of seconds, not {d}");
        }
    }
    if let Some(warning) = streams_warning(args) {
        eprintln!("attache bench: {warning}");
    }
    Ok(())
}

/// A warning when more requests are in flight on one connection than a node
/// lets run at once by default (`--max-streams-per-connection`): the rest
/// wait in the client, and their latency includes the wait. `None` for etcd
/// targets and for loads within the limit.
fn streams_warning(args: &BenchArgs) -> Option<String> {
    let per_connection = args.in_flight.div_ceil(args.connections.max(1));
    let limit = crate::serve::DEFAULT_MAX_STREAMS_PER_CONNECTION as usize;
    (!args.target.starts_with("etcd://") && per_connection > limit).then(|| {
        format!(
            "{} requests in flight over {} connections is {per_connection} per connection, more than the {limit} \
             a node runs at once by default (--max-streams-per-connection); the rest wait in the client and \
             their latency includes the wait: add --connections",
            args.in_flight, args.connections
        )
    })
}

/// Runs the bench `args` describe and returns its report. Errors: bad
/// flags, a target that cannot be reached, shards that cannot be created
/// or deleted; failed operations are counted in the report, not errors.
pub async fn bench(args: BenchArgs) -> anyhow::Result<Report> {
    check(&args)?;
    let (target, endpoints) = connect(&args).await?;
    let distribution = args.distribution.unwrap_or(args.workload.distribution());
    let shards = match &target {
        Target::Attache { shards, .. } => shards.clone(),
        Target::Etcd { .. } => vec![],
    };
    let loaded = !args.skip_load;
    let shared = Arc::new(Shared {
        target,
        distribution,
        next_insert: AtomicU64::new(if loaded { 0 } else { args.records }),
        acknowledged: Acknowledged::new(args.records),
        started: AtomicU64::new(0),
        done: AtomicU64::new(0),
        args: args.clone(),
    });
    let mut phases = vec![];
    if loaded {
        phases.push(run_phase(&shared, Phase::Load, "load").await?);
        // Each load task's last draw went past the records: the run's
        // inserts go on from the first record not loaded, so the
        // acknowledged limit (`Acknowledged`) can pass them.
        shared.next_insert.store(args.records, Ordering::Relaxed);
    }
    let phase = match args.duration {
        Some(secs) => Phase::Run { operations: u64::MAX, until: Some(Instant::now() + Duration::from_secs_f64(secs)) },
        None => Phase::Run { operations: args.operations.unwrap_or(10_000), until: None },
    };
    phases.push(run_phase(&shared, phase, "run").await?);
    if !args.keep && loaded {
        shared.target.clean_up().await?;
    }
    Ok(Report {
        target: shared.target.label().into(),
        endpoints,
        workload: args.workload,
        mix: args.workload.describe(),
        distribution,
        records: args.records,
        records_after: shared.acknowledged.limit(),
        value_size: args.value_size,
        connections: args.connections,
        in_flight: args.in_flight,
        shards,
        phases,
    })
}

/// `attache bench`: runs the bench and prints its table (or JSON).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let json = args.json;
    let report = bench(args).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_in_flight_per_connection_than_a_node_runs_is_warned_about() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let args = |target: &str, in_flight: usize, connections: usize| {
            let mut a = <Cli as clap::Parser>::try_parse_from(["bench", "--target", target]).unwrap().bench;
            (a.in_flight, a.connections) = (in_flight, connections);
            a
        };
        assert_eq!(streams_warning(&args("127.0.0.1:7400", 256, 1)), None);
        let w = streams_warning(&args("127.0.0.1:7400", 257, 1)).unwrap();
        assert!(w.contains("257 per connection") && w.contains("--connections"), "{w}");
        assert_eq!(streams_warning(&args("127.0.0.1:7400", 1024, 4)), None);
        assert_eq!(streams_warning(&args("etcd://127.0.0.1:2379", 1024, 1)), None);
    }

    #[test]
    fn every_mix_sums_to_100() {
        for w in Workload::value_variants() {
            assert_eq!(w.mix().iter().map(|(_, p)| p).sum::<u32>(), 100, "{w:?}");
        }
    }

    #[test]
    fn acknowledged_limit_waits_for_the_records_before() {
        let a = Acknowledged::new(10);
        a.ack(11);
        assert_eq!(a.limit(), 10);
        a.ack(10);
        assert_eq!(a.limit(), 12);
    }

    #[test]
    fn distributions_stay_below_the_limit_and_zipfian_is_skewed() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut counts = vec![0u32; 1000];
        for _ in 0..20_000 {
            for d in [KeyDistribution::Uniform, KeyDistribution::Latest] {
                assert!(pick(d, 1000, &mut rng) < 1000);
            }
            counts[pick(KeyDistribution::Zipfian, 1000, &mut rng) as usize] += 1;
        }
        counts.sort_unstable();
        // Zipf(0.99) over 1,000 items: the hottest takes ~13% of the draws;
        // uniform would give it ~0.1%.
        assert!(counts[999] > 1000, "hottest record drawn {} times of 20,000", counts[999]);
        assert_eq!(pick(KeyDistribution::Latest, 1, &mut rng), 0);
    }

    #[test]
    fn latest_prefers_the_newest_records() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let newest = (0..10_000).filter(|_| pick(KeyDistribution::Latest, 1000, &mut rng) >= 990).count();
        assert!(newest > 3000, "{newest} of 10,000 draws among the newest 10 records");
    }

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end("a/"), b"a0".to_vec());
        assert_eq!(prefix_end("\u{7f}"), vec![0x80]);
    }

    #[test]
    fn record_keys_are_distinct_fixed_width_and_scattered() {
        let keys: Vec<String> = (0..1000).map(record_key).collect();
        assert!(keys.iter().all(|k| k.len() == 24 && k.starts_with("user")));
        let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), 1000);
        let in_order = keys.windows(2).filter(|w| w[0] < w[1]).count();
        assert!((300..700).contains(&in_order), "{in_order} of 999 neighbours in key order");
    }

    #[test]
    fn choose_gives_each_operation_its_share() {
        let mix = Workload::B.mix();
        assert_eq!((0..100).filter(|&r| choose(mix, r) == Op::Read).count(), 95);
        assert_eq!((0..100).filter(|&r| choose(mix, r) == Op::Update).count(), 5);
    }
}
