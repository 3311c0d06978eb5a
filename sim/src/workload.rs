//! Simulated clients: each creates its shards, then runs concurrent
//! processes that read, write and delete a small hot set of keys with unique
//! values (one key at a time, or several: BatchPut, BatchGet, and Scans whose
//! pages hold a few keys each), recording every operation in the history, while a lifecycle task
//! closes and later deletes one of the client's shards; finally each client
//! reads every key of its live shards once more. Every call goes through the production client
//! (`attache_actors::client`), which retries, follows primary hints and says
//! whether a failed call may have taken effect; its backoff jitter is drawn
//! from the run's seed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use attache_actors::auth::BearerToken;
use attache_actors::client::{self, CallSpec, Client, ClientSettings, Failure, Served};
use attache_actors::service::proto::{
    BatchGetRequest, BatchPutRequest, DeleteRequest, Entry, GetRequest, IndexEntry, ListShardsRequest, NewShardRequest,
    PutRequest, ScanIndexRequest, ScanRequest, ShardRef, ShardState as ProtoShardState,
};
use futures::TryStreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::{Duration, Instant};

use crate::cluster::token_of;
use crate::history::{aged, encode_reads, Event, EventType, History, F};
use crate::scenario::WorkloadSpec;

/// One gRPC method through the production client: the same request on
/// every attempt (it carries the write's request id).
macro_rules! call {
    ($client:expr, $spec:expr, $method:ident, $req:expr) => {
        $client
            .call($spec, |mut c| {
                let r = $req.clone();
                async move { c.$method(r).await }
            })
            .await
    };
}

/// Records events with simulated timestamps; shared by every client.
pub struct Recorder {
    start: Instant,
    history: Mutex<History>,
    next_process: AtomicU64,
}

impl Recorder {
    /// A recorder whose time 0 is now.
    pub fn new() -> Self {
        Recorder { start: Instant::now(), history: Mutex::new(History::default()), next_process: AtomicU64::new(0) }
    }

    /// Simulated ns since the run started.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn process(&self) -> u64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }

    fn record(&self, e: Event) {
        self.history.lock().expect("history lock").push(e);
    }

    /// The history so far, taken out of the recorder (which is left
    /// empty): called once, when the run's clients are done.
    pub fn take_history(&self) -> History {
        std::mem::take(&mut *self.history.lock().expect("history lock"))
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Shards created so far: id -> (owner client, volume).
pub type Registry = Arc<Mutex<BTreeMap<u64, (String, String)>>>;

/// One simulated client: its id, the production client it calls the
/// cluster through, and where it records what happened.
struct ClientCtx {
    id: String,
    /// Every put also writes the index entry `INDEX = value` for its key
    /// (when the workload has ScanIndex reads).
    index_writes: bool,
    nodes: Vec<String>,
    client: Client,
    rec: Arc<Recorder>,
    registry: Registry,
}

/// What a call came to, as the history records it.
enum Outcome {
    /// Done, on the node at this address, with what was read and, for a
    /// stale read, the staleness it reported.
    Ok(String, Option<String>, Option<u64>),
    /// Rejected by the service on every attempt: no effect.
    Fail(String, tonic::Status),
    /// Unknown: some attempt timed out or failed in transport.
    Info(String, tonic::Status),
}

impl<T> From<Result<Served<T>, Failure>> for Outcome {
    fn from(r: Result<Served<T>, Failure>) -> Self {
        match r {
            Ok(served) => Outcome::Ok(served.addr, None, None),
            Err(f) if f.outcome == client::Outcome::Rejected => Outcome::Fail(f.addr, f.status),
            Err(f) => Outcome::Info(f.addr, f.status),
        }
    }
}

/// The secondary index every put writes its value to when the workload
/// has ScanIndex reads (`WorkloadSpec::scan_index_ratio`).
pub const INDEX: &str = "val";

impl ClientCtx {
    /// The index entries of a put of `value`: `INDEX = value`, or none.
    fn indexes(&self, value: Option<&str>) -> Vec<IndexEntry> {
        match value {
            Some(v) if self.index_writes => vec![IndexEntry { name: INDEX.into(), value: v.as_bytes().to_vec() }],
            _ => Vec::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        process: u64,
        kind: EventType,
        f: F,
        shard: u64,
        key: &str,
        value: Option<String>,
        node: &str,
        error: Option<String>,
    ) {
        self.record(process, kind, f, shard, key, value, node, error, None);
    }

    /// As `event`, with the staleness of a stale read: requested (its
    /// invocation) or reported (its completion).
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        process: u64,
        kind: EventType,
        f: F,
        shard: u64,
        key: &str,
        value: Option<String>,
        node: &str,
        error: Option<String>,
        staleness_ms: Option<u64>,
    ) {
        self.rec.record(Event {
            process,
            kind,
            f,
            client: self.id.clone(),
            shard,
            key: key.to_string(),
            value,
            time: self.rec.now_ns(),
            node: node.to_string(),
            error,
            staleness_ms,
        });
    }

    /// Creates a shard until `deadline`, or in one round when `once`: one
    /// call (sent once, see `Repeat::Never`) per round, round `r` to node
    /// `first + r`.
    async fn create_shard(&self, first: usize, deadline: Instant, once: bool) -> Option<(u64, String)> {
        for round in 0.. {
            if Instant::now() >= deadline || (once && round > 0) {
                break;
            }
            let process = self.rec.process();
            self.event(process, EventType::Invoke, F::NewShard, 0, "", None, "", None);
            let req = NewShardRequest { client_id: self.id.clone(), size_limit_bytes: 0 };
            let spec = CallSpec::any().once().starting_at(first + round);
            let result = call!(self.client, spec, new_shard, req);
            match result {
                Ok(served) => {
                    let (id, volume) = (served.value.shard_id, served.value.volume_id);
                    self.event(process, EventType::Ok, F::NewShard, id, "", Some(volume.clone()), &served.addr, None);
                    self.registry.lock().expect("registry lock").insert(id, (self.id.clone(), volume.clone()));
                    return Some((id, volume));
                }
                Err(f) => {
                    let kind = if f.outcome == client::Outcome::Rejected { EventType::Fail } else { EventType::Info };
                    self.event(process, kind, F::NewShard, 0, "", None, &f.addr, Some(f.status.message().into()));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Lists the client's shards until one listing succeeds or `deadline`,
    /// recording each attempt as a `ListShards` op under `process` and
    /// later ids.
    async fn list_shards(&self, mut process: u64, deadline: Instant) {
        while Instant::now() < deadline {
            self.event(process, EventType::Invoke, F::ListShards, 0, "", None, "", None);
            let req = ListShardsRequest { client_id: self.id.clone() };
            let result = call!(self.client, CallSpec::any(), list_shards, req);
            match result {
                Ok(served) => {
                    let mut listed: Vec<(u64, i32)> =
                        served.value.shards.iter().map(|s| (s.shard_id, s.state)).collect();
                    listed.sort_unstable();
                    let value = listed
                        .iter()
                        .map(|(id, state)| {
                            let state = if *state == ProtoShardState::ReadOnly as i32 { "read-only" } else { "active" };
                            format!("{id}:{state}")
                        })
                        .collect::<Vec<_>>()
                        .join(",");
                    self.event(process, EventType::Ok, F::ListShards, 0, "", Some(value), &served.addr, None);
                    return;
                }
                Err(f) => {
                    let kind = if f.outcome == client::Outcome::Rejected { EventType::Fail } else { EventType::Info };
                    self.event(process, kind, F::ListShards, 0, "", None, &f.addr, Some(f.status.message().into()));
                    process = self.rec.process();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One read or write through the client, its first attempt at node `at`
    /// when given; returns (the process must take a new id, the operation
    /// succeeded). A stale read or scan asks for a view no older than
    /// `bound` ms (`max_staleness_ms`; `None`: any), recorded with its
    /// invocation. The request names the client `as_client`: this client's
    /// own id, or another's it tries to act as (recorded as this caller's).
    #[allow(clippy::too_many_arguments)]
    async fn op(
        &self,
        process: u64,
        f: F,
        shard: u64,
        key: &str,
        value: Option<String>,
        at: Option<usize>,
        bound: Option<u64>,
        as_client: &str,
    ) -> (bool, bool) {
        let first = at.map_or("", |i| self.nodes[i].as_str());
        self.record(process, EventType::Invoke, f, shard, key, value.clone(), first, None, bound);
        let mut spec = CallSpec::shard(shard);
        if let Some(i) = at {
            spec = spec.starting_at(i);
        }
        let outcome = match f {
            F::Delete => {
                let req = DeleteRequest {
                    shard_id: shard,
                    client_id: as_client.to_string(),
                    key: key.as_bytes().to_vec(),
                    request_id: self.client.request_id(),
                };
                let result = call!(self.client, spec, delete, req);
                Outcome::from(result)
            }
            F::CloseShard | F::DeleteShard => {
                let req = ShardRef { shard_id: shard, client_id: as_client.to_string() };
                let result = self
                    .client
                    .call(spec, |mut c| {
                        let r = req.clone();
                        async move {
                            if f == F::CloseShard {
                                c.close_shard(r).await.map(|r| r.map(|_| ()))
                            } else {
                                c.delete_shard(r).await.map(|r| r.map(|_| ()))
                            }
                        }
                    })
                    .await;
                Outcome::from(result)
            }
            F::Write => {
                let req = PutRequest {
                    shard_id: shard,
                    client_id: as_client.to_string(),
                    key: key.as_bytes().to_vec(),
                    value: value.clone().unwrap_or_default().into_bytes(),
                    indexes: self.indexes(value.as_deref()),
                    request_id: self.client.request_id(),
                };
                let result = call!(self.client, spec, put, req);
                Outcome::from(result)
            }
            F::BatchWrite => {
                let v = value.clone().unwrap_or_default().into_bytes();
                let entries = key
                    .split(',')
                    .map(|k| Entry {
                        key: k.as_bytes().to_vec(),
                        value: v.clone(),
                        indexes: self.indexes(value.as_deref()),
                    })
                    .collect();
                let req = BatchPutRequest {
                    shard_id: shard,
                    client_id: as_client.to_string(),
                    entries,
                    request_id: self.client.request_id(),
                };
                let result = call!(self.client, spec, batch_put, req);
                Outcome::from(result)
            }
            F::BatchRead => {
                let keys: Vec<Vec<u8>> = key.split(',').map(|k| k.as_bytes().to_vec()).collect();
                let req = BatchGetRequest {
                    shard_id: shard,
                    client_id: as_client.to_string(),
                    keys,
                    consistency: 0,
                    max_staleness_ms: 0,
                };
                let result = call!(self.client, spec, batch_get, req);
                multi_read(result, |found| {
                    found.into_iter().map(|r| (text(&r.key), r.found.then(|| text(&r.value)))).collect()
                })
                .await
            }
            F::Scan | F::StaleScan => {
                let stale = f == F::StaleScan;
                let req = ScanRequest {
                    shard_id: shard,
                    client_id: as_client.to_string(),
                    start: vec![],
                    end: vec![],
                    limit: 0,
                    consistency: if stale { 1 } else { 0 },
                    max_staleness_ms: bound.unwrap_or(0),
                };
                let result = call!(self.client, spec, scan, req);
                let mut oldest = None;
                let mut outcome = multi_read(result, |pages| {
                    let mut reads = Vec::new();
                    for page in pages {
                        let age = page.max_staleness_ms;
                        if stale {
                            oldest = Some(oldest.unwrap_or(0).max(age));
                        }
                        reads.extend(page.entries.into_iter().map(|kv| {
                            let v = text(&kv.value);
                            (text(&kv.key), Some(if stale { aged(&v, age) } else { v }))
                        }));
                    }
                    reads
                })
                .await;
                if let Outcome::Ok(_, _, staleness) = &mut outcome {
                    *staleness = if stale { Some(oldest.unwrap_or(0)) } else { None };
                }
                outcome
            }
            F::ScanIndex => {
                let req = ScanIndexRequest {
                    shard_id: shard,
                    client_id: as_client.to_string(),
                    name: INDEX.into(),
                    value_prefix: vec![],
                    limit: 0,
                };
                let result = call!(self.client, spec, scan_index, req);
                multi_read(result, |pages| {
                    pages.into_iter().flat_map(|p| p.hits).map(|h| (text(&h.key), Some(text(&h.value)))).collect()
                })
                .await
            }
            F::ShardStats => {
                let req = ShardRef { shard_id: shard, client_id: as_client.to_string() };
                match call!(self.client, spec, shard_stats, req) {
                    Ok(served) => {
                        let r = served.value;
                        let read_only = r.info.is_some_and(|i| i.state == ProtoShardState::ReadOnly as i32);
                        let state = if read_only { "read-only" } else { "active" };
                        Outcome::Ok(served.addr, Some(format!("live_keys={} state={state}", r.live_keys)), None)
                    }
                    Err(e) => Outcome::from(Err::<Served<()>, _>(e)),
                }
            }
            F::Read | F::StaleRead | F::NewShard | F::ListShards => {
                let req = GetRequest {
                    shard_id: shard,
                    client_id: as_client.to_string(),
                    key: key.as_bytes().to_vec(),
                    consistency: if f == F::StaleRead { 1 } else { 0 },
                    max_staleness_ms: bound.unwrap_or(0),
                };
                let result = call!(self.client, spec, get, req);
                match result {
                    Ok(served) => {
                        let r = served.value;
                        let staleness = (f == F::StaleRead).then_some(r.max_staleness_ms);
                        Outcome::Ok(served.addr, r.found.then(|| text(&r.value)), staleness)
                    }
                    Err(e) => Outcome::from(Err::<Served<()>, _>(e)),
                }
            }
        };
        match outcome {
            Outcome::Ok(node, read, staleness) => {
                let v = if f.is_write() { value } else { read };
                self.record(process, EventType::Ok, f, shard, key, v, &node, None, staleness);
                (false, true)
            }
            Outcome::Fail(node, s) => {
                self.event(process, EventType::Fail, f, shard, key, None, &node, Some(s.message().into()));
                (false, false)
            }
            Outcome::Info(node, s) => {
                let error = format!("{:?}: {}", s.code(), s.message());
                self.event(process, EventType::Info, f, shard, key, None, &node, Some(error));
                (true, false)
            }
        }
    }
}

/// The caller a request without a bearer token is recorded as.
pub const ANONYMOUS: &str = "anonymous";

/// Bytes the workload wrote, as text.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A multi-key read's outcome: its stream collected and what it read
/// (`reads`: key, value or absent) encoded by `encode_reads`. A stream that
/// fails after the call was answered is an unknown outcome.
async fn multi_read<T>(
    result: Result<Served<tonic::Streaming<T>>, Failure>,
    reads: impl FnOnce(Vec<T>) -> Vec<(String, Option<String>)>,
) -> Outcome {
    let served = match result {
        Ok(served) => served,
        Err(e) => return Outcome::from(Err::<Served<()>, _>(e)),
    };
    match served.value.try_collect::<Vec<_>>().await {
        Ok(items) => {
            let reads = reads(items);
            let value = encode_reads(reads.iter().map(|(k, v)| (k.as_str(), v.as_deref())));
            Outcome::Ok(served.addr, Some(value), None)
        }
        Err(status) => Outcome::Info(served.addr, status),
    }
}

/// 2 or 3 distinct keys of `k0`..`k{hot_keys-1}` (at most `hot_keys`), in order.
fn hot_key_set(rng: &mut ChaCha8Rng, hot_keys: usize) -> Vec<String> {
    let want = rng.random_range(2..=3).min(hot_keys);
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < want {
        picked.insert(rng.random_range(0..hot_keys));
    }
    picked.into_iter().map(|k| format!("k{k}")).collect()
}

/// Runs client number `index` (client id `client-{index}`) against `nodes`
/// until `end`, then its final reads (until `final_deadline`).
#[allow(clippy::too_many_arguments)]
pub async fn run_client(
    index: usize,
    spec: WorkloadSpec,
    nodes: Vec<String>,
    rec: Arc<Recorder>,
    registry: Registry,
    seed: u64,
    end: Instant,
    final_deadline: Instant,
) {
    // One attempt may take op_timeout_ms; a call retries for twice that.
    let settings = ClientSettings {
        attempt_timeout_ms: spec.op_timeout_ms,
        deadline_ms: 2 * spec.op_timeout_ms,
        seed: seed ^ ((index as u64) << 48) ^ 0xc11e_u64,
        ..ClientSettings::default()
    };
    let id = format!("client-{index}");
    let client = Client::new(&nodes, settings.clone()).expect("the cluster has storage nodes");
    let token = BearerToken::new(&token_of(&id)).expect("a simulated token is a valid metadata value");
    // The same machine calling with no token: its requests are recorded as
    // the caller `anonymous`, so the isolation check fails any it is served.
    let anonymous = Arc::new(ClientCtx {
        id: ANONYMOUS.into(),
        index_writes: spec.scan_index_ratio > 0.0,
        nodes: nodes.clone(),
        client: Client::new(&nodes, ClientSettings { seed: settings.seed ^ 0xa707, ..settings })
            .expect("the cluster has storage nodes"),
        rec: rec.clone(),
        registry: registry.clone(),
    });
    let ctx = Arc::new(ClientCtx {
        id,
        index_writes: spec.scan_index_ratio > 0.0,
        nodes,
        client: client.with_token(token),
        rec,
        registry,
    });
    let mut shards = Vec::new();
    for s in 0..spec.shards_per_client {
        if let Some(created) = ctx.create_shard(index + s, end, false).await {
            shards.push(created);
        }
    }
    if shards.is_empty() {
        return;
    }
    // The lifecycle shard: closed, then deleted, while the processes use it.
    let retired = (spec.lifecycle && shards.len() >= 2).then(|| shards[shards.len() - 1].0);
    // Shards created during the run join the list (`max_new_shards` attempts at most).
    let shards = Arc::new(Mutex::new(shards));
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let lifecycle = {
        let ctx = ctx.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((index as u64) << 40) ^ 0x11fe);
        let duration = Duration::from_millis(spec.duration_ms);
        let start = end.checked_sub(duration).unwrap_or(end);
        async move {
            let Some(shard) = retired else { return };
            // Half the clients close and delete at the same moment, so the
            // two race (in the shard and in the metadata store).
            // (No draw when the ratio is 0: such a workload draws as before.)
            if spec.lifecycle_race_ratio > 0.0 && rng.random_bool(spec.lifecycle_race_ratio) {
                tokio::time::sleep_until(start + duration.mul_f64(rng.random_range(0.25..0.75))).await;
                let (close, delete) = (ctx.rec.process(), ctx.rec.process());
                futures::future::join(
                    ctx.op(close, F::CloseShard, shard, "", None, None, None, &ctx.id),
                    ctx.op(delete, F::DeleteShard, shard, "", None, None, None, &ctx.id),
                )
                .await;
                return;
            }
            for (f, from, to) in [(F::CloseShard, 0.25, 0.5), (F::DeleteShard, 0.5, 0.75)] {
                tokio::time::sleep_until(start + duration.mul_f64(rng.random_range(from..to))).await;
                let process = ctx.rec.process();
                ctx.op(process, f, shard, "", None, None, None, &ctx.id).await;
            }
        }
    };
    let processes = (0..spec.processes_per_client).map(|p| {
        let (ctx, anonymous, shards, made) = (ctx.clone(), anonymous.clone(), shards.clone(), made.clone());
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((index as u64) << 32) ^ p as u64);
        async move {
            let mut process = ctx.rec.process();
            let mut n = 0u64;
            while Instant::now() < end {
                // (No draw when the ratio is 0: such a workload draws as before.)
                if spec.new_shard_ratio > 0.0 && rng.random_bool(spec.new_shard_ratio) {
                    let at = rng.random_range(0..ctx.nodes.len());
                    if made.fetch_add(1, Ordering::Relaxed) < spec.max_new_shards {
                        if let Some(created) = ctx.create_shard(at, end, true).await {
                            shards.lock().expect("shards lock").push(created);
                        }
                        tokio::time::sleep(Duration::from_millis(spec.think_ms)).await;
                        continue;
                    }
                }
                let mut shard = {
                    let shards = shards.lock().expect("shards lock");
                    shards[rng.random_range(0..shards.len())].0
                };
                // Who calls, and the client id the request names: this
                // client as itself, or (cross-client) on another client's
                // shard as itself, as that client with its own token, or
                // as that client with no token at all.
                let (mut caller, mut as_client) = (&ctx, ctx.id.clone());
                if rng.random_bool(spec.cross_client_ratio) {
                    let foreign: Vec<(u64, String)> = ctx
                        .registry
                        .lock()
                        .expect("registry lock")
                        .iter()
                        .filter(|(_, (owner, _))| *owner != ctx.id)
                        .map(|(id, (owner, _))| (*id, owner.clone()))
                        .collect();
                    if !foreign.is_empty() {
                        let owner;
                        (shard, owner) = foreign[rng.random_range(0..foreign.len())].clone();
                        // (No draw when the ratio is 0: such a workload draws as before.)
                        if spec.impersonate_ratio > 0.0 && rng.random_bool(spec.impersonate_ratio) {
                            as_client = owner;
                            if rng.random_bool(0.5) {
                                caller = &anonymous;
                            }
                        }
                    }
                }
                let mut key = format!("k{}", rng.random_range(0..spec.hot_keys));
                let write = rng.random_bool(spec.write_ratio);
                let stale = !write && rng.random_bool(spec.stale_read_ratio);
                // No draw when a feature is off, so such a workload draws as before it existed.
                let delete = write && spec.delete_ratio > 0.0 && rng.random_bool(spec.delete_ratio);
                let batch = write && !delete && spec.batch_write_ratio > 0.0 && rng.random_bool(spec.batch_write_ratio);
                let multi = !write && !stale && spec.multi_read_ratio > 0.0 && rng.random_bool(spec.multi_read_ratio);
                let scan = multi && rng.random_bool(0.5);
                let index_scan =
                    multi && !scan && spec.scan_index_ratio > 0.0 && rng.random_bool(spec.scan_index_ratio);
                let stats = !write
                    && !stale
                    && !multi
                    && spec.shard_stats_ratio > 0.0
                    && rng.random_bool(spec.shard_stats_ratio);
                let stale_scan = stale && spec.stale_scan_ratio > 0.0 && rng.random_bool(spec.stale_scan_ratio);
                let bound = (stale && spec.stale_bound_ms > 0).then(|| rng.random_range(1..=spec.stale_bound_ms));
                if (batch || multi) && !scan && !index_scan && spec.hot_keys > 1 {
                    key = hot_key_set(&mut rng, spec.hot_keys).join(",");
                }
                let (f, value) = if delete {
                    (F::Delete, None)
                } else if write {
                    n += 1;
                    (if batch { F::BatchWrite } else { F::Write }, Some(format!("{}-p{process}-{n}", ctx.id)))
                } else if stale_scan {
                    key.clear();
                    (F::StaleScan, None)
                } else if stale {
                    (F::StaleRead, None)
                } else if scan {
                    key.clear();
                    (F::Scan, None)
                } else if index_scan {
                    key.clear();
                    (F::ScanIndex, None)
                } else if stats {
                    key.clear();
                    (F::ShardStats, None)
                } else if multi {
                    (F::BatchRead, None)
                } else {
                    (F::Read, None)
                };
                // An impersonation tries, now and then, to close or delete
                // the other client's shard.
                let (f, value) = if as_client != ctx.id && rng.random_bool(0.25) {
                    key.clear();
                    (if rng.random_bool(0.5) { F::CloseShard } else { F::DeleteShard }, None)
                } else {
                    (f, value)
                };
                // Now and then a request goes to any node, as from a client that
                // just started: it finds the primary through the hint. Stale
                // reads go to any node: backups serve them.
                let anywhere = stale || rng.random_bool(spec.random_node_ratio);
                let at = anywhere.then(|| rng.random_range(0..ctx.nodes.len()));
                let (renew, ok) = caller.op(process, f, shard, &key, value, at, bound, &as_client).await;
                if renew {
                    process = ctx.rec.process();
                }
                let pause = if ok { spec.think_ms } else { spec.think_ms + rng.random_range(0..=100) };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            process
        }
    });
    // Each process, and the lifecycle, is a task of its own on the client's
    // node: under one task, every wake-up would poll every process again
    // (and each poll of a pending sleep registers another timer), which
    // cost more than the system under test.
    let processes: Vec<_> = processes.map(madsim::task::spawn).collect();
    let lifecycle = madsim::task::spawn(lifecycle);
    let processes: Vec<u64> =
        futures::future::join_all(processes).await.into_iter().map(|p| p.expect("a client process panicked")).collect();
    lifecycle.await.expect("the lifecycle process panicked");
    // Final reads: every key of every live shard, until each succeeds once.
    let mut process = processes.into_iter().max().unwrap_or(0);
    let shards = shards.lock().expect("shards lock").clone();
    for (shard, _) in shards.iter().filter(|(s, _)| Some(*s) != retired) {
        for k in 0..spec.hot_keys {
            let key = format!("k{k}");
            while Instant::now() < final_deadline {
                let (renew, ok) = ctx.op(process, F::Read, *shard, &key, None, None, None, &ctx.id).await;
                if renew {
                    process = ctx.rec.process();
                }
                if ok {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // The client's shard records, as the metadata store lists them.
    if spec.lifecycle {
        ctx.list_shards(ctx.rec.process(), final_deadline).await;
    }
}
