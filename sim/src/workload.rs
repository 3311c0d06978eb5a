//! Simulated clients: each creates its shards, then runs concurrent
//! processes that read and write a small hot set of keys with unique values,
//! recording every operation in the history, and finally reads every key of
//! its shards once more. Clients follow `UNAVAILABLE` primary hints, and
//! otherwise move on to the next node.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use attache_actors::service::proto::attache_client::AttacheClient;
use attache_actors::service::proto::{GetRequest, NewShardRequest, PutRequest};
use attache_actors::service::{is_rejection, primary_hint};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

use crate::history::{Event, EventType, History, F};
use crate::scenario::WorkloadSpec;

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

    /// The history so far.
    pub fn history(&self) -> History {
        self.history.lock().expect("history lock").clone()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Shards created so far: id -> (owner client, volume).
pub type Registry = Arc<Mutex<BTreeMap<u64, (String, String)>>>;

/// One client's view: its id, the nodes, and where it last found each volume's primary.
struct ClientCtx {
    id: String,
    spec: WorkloadSpec,
    nodes: Vec<String>,
    rec: Arc<Recorder>,
    registry: Registry,
    routes: Mutex<BTreeMap<String, usize>>,
}

/// What an attempt came to.
enum Outcome {
    Ok(Option<String>),
    /// The service rejected it: no effect.
    Fail(tonic::Status),
    /// Unknown: timed out, or the transport failed.
    Info(String),
}

fn client(addr: &str) -> AttacheClient<Channel> {
    AttacheClient::new(Endpoint::from_shared(format!("http://{addr}")).expect("valid address").connect_lazy())
}

impl ClientCtx {
    fn node_for(&self, volume: &str) -> usize {
        *self.routes.lock().expect("routes lock").get(volume).unwrap_or(&0)
    }

    /// After a failure on node `at`: go where the hint says, else to the next node.
    fn reroute(&self, volume: &str, at: usize, hint: Option<String>) {
        let next = hint.and_then(|h| self.nodes.iter().position(|n| *n == h)).unwrap_or((at + 1) % self.nodes.len());
        self.routes.lock().expect("routes lock").insert(volume.to_string(), next);
    }

    async fn attempt<T, Fut>(&self, fut: Fut, read: impl FnOnce(T) -> Option<String>) -> Outcome
    where
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(Duration::from_millis(self.spec.op_timeout_ms), fut).await {
            Ok(Ok(resp)) => Outcome::Ok(read(resp.into_inner())),
            Ok(Err(s)) if is_rejection(&s) => Outcome::Fail(s),
            Ok(Err(s)) => Outcome::Info(format!("{:?}: {}", s.code(), s.message())),
            Err(_) => Outcome::Info("timed out".into()),
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
        });
    }

    /// Creates a shard, trying node after node until `deadline`.
    async fn create_shard(&self, first: usize, deadline: Instant) -> Option<(u64, String)> {
        let mut at = first;
        while Instant::now() < deadline {
            let process = self.rec.process();
            let node = self.nodes[at % self.nodes.len()].clone();
            self.event(process, EventType::Invoke, F::NewShard, 0, "", None, &node, None);
            let req = NewShardRequest { client_id: self.id.clone(), size_limit_bytes: 0 };
            let mut c = client(&node);
            let outcome =
                self.attempt(c.new_shard(req), |info| Some(format!("{}/{}", info.shard_id, info.volume_id))).await;
            match outcome {
                Outcome::Ok(Some(v)) => {
                    let (id, volume) = v.split_once('/').expect("id/volume");
                    let id: u64 = id.parse().expect("numeric id");
                    self.rec.record(Event {
                        process,
                        kind: EventType::Ok,
                        f: F::NewShard,
                        client: self.id.clone(),
                        shard: id,
                        key: String::new(),
                        value: Some(volume.to_string()),
                        time: self.rec.now_ns(),
                        node: node.clone(),
                        error: None,
                    });
                    self.registry.lock().expect("registry lock").insert(id, (self.id.clone(), volume.to_string()));
                    self.routes.lock().expect("routes lock").insert(volume.to_string(), at % self.nodes.len());
                    return Some((id, volume.to_string()));
                }
                Outcome::Ok(None) => unreachable!("new_shard always answers"),
                Outcome::Fail(s) => {
                    self.event(process, EventType::Fail, F::NewShard, 0, "", None, &node, Some(s.message().into()))
                }
                Outcome::Info(e) => self.event(process, EventType::Info, F::NewShard, 0, "", None, &node, Some(e)),
            }
            at += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// One read or write, sent to node `at`, or to where the client last
    /// found the volume's primary; returns (the process must take a new id,
    /// the operation succeeded).
    #[allow(clippy::too_many_arguments)]
    async fn op(
        &self,
        process: u64,
        f: F,
        shard: u64,
        volume: &str,
        key: &str,
        value: Option<String>,
        at: Option<usize>,
    ) -> (bool, bool) {
        let at = at.unwrap_or_else(|| self.node_for(volume));
        let node = self.nodes[at].clone();
        self.event(process, EventType::Invoke, f, shard, key, value.clone(), &node, None);
        let mut c = client(&node);
        let outcome = match f {
            F::Write => {
                let req = PutRequest {
                    shard_id: shard,
                    client_id: self.id.clone(),
                    key: key.as_bytes().to_vec(),
                    value: value.clone().unwrap_or_default().into_bytes(),
                    indexes: vec![],
                };
                self.attempt(c.put(req), |_| None).await
            }
            _ => {
                let req = GetRequest {
                    shard_id: shard,
                    client_id: self.id.clone(),
                    key: key.as_bytes().to_vec(),
                    consistency: if f == F::StaleRead { 1 } else { 0 },
                };
                self.attempt(c.get(req), |r| r.found.then(|| String::from_utf8_lossy(&r.value).into_owned())).await
            }
        };
        match outcome {
            Outcome::Ok(read) => {
                let v = if f == F::Write { value } else { read };
                self.event(process, EventType::Ok, f, shard, key, v, &node, None);
                (false, true)
            }
            Outcome::Fail(s) => {
                self.event(process, EventType::Fail, f, shard, key, None, &node, Some(s.message().into()));
                if s.code() == tonic::Code::Unavailable {
                    self.reroute(volume, at, primary_hint(&s));
                }
                (false, false)
            }
            Outcome::Info(e) => {
                self.event(process, EventType::Info, f, shard, key, None, &node, Some(e));
                self.reroute(volume, at, None);
                (true, false)
            }
        }
    }
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
    let ctx = Arc::new(ClientCtx {
        id: format!("client-{index}"),
        spec: spec.clone(),
        nodes,
        rec,
        registry,
        routes: Mutex::new(BTreeMap::new()),
    });
    let mut shards = Vec::new();
    for s in 0..spec.shards_per_client {
        if let Some(created) = ctx.create_shard(index + s, end).await {
            shards.push(created);
        }
    }
    if shards.is_empty() {
        return;
    }
    let shards = Arc::new(shards);
    let processes = (0..spec.processes_per_client).map(|p| {
        let (ctx, shards) = (ctx.clone(), shards.clone());
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((index as u64) << 32) ^ p as u64);
        async move {
            let mut process = ctx.rec.process();
            let mut n = 0u64;
            while Instant::now() < end {
                let (mut shard, mut volume) = shards[rng.random_range(0..shards.len())].clone();
                if rng.random_bool(spec.cross_client_ratio) {
                    let foreign: Vec<(u64, String)> = ctx
                        .registry
                        .lock()
                        .expect("registry lock")
                        .iter()
                        .filter(|(_, (owner, _))| *owner != ctx.id)
                        .map(|(id, (_, v))| (*id, v.clone()))
                        .collect();
                    if !foreign.is_empty() {
                        (shard, volume) = foreign[rng.random_range(0..foreign.len())].clone();
                    }
                }
                let key = format!("k{}", rng.random_range(0..spec.hot_keys));
                let write = rng.random_bool(spec.write_ratio);
                let stale = !write && rng.random_bool(spec.stale_read_ratio);
                let (f, value) = if write {
                    n += 1;
                    (F::Write, Some(format!("{}-p{process}-{n}", ctx.id)))
                } else if stale {
                    (F::StaleRead, None)
                } else {
                    (F::Read, None)
                };
                // Now and then a request goes to any node, as from a client that
                // just started: it finds the primary through the hint. Stale
                // reads go to any node: backups serve them.
                let anywhere = stale || rng.random_bool(spec.random_node_ratio);
                let at = anywhere.then(|| rng.random_range(0..ctx.nodes.len()));
                let (renew, ok) = ctx.op(process, f, shard, &volume, &key, value, at).await;
                if renew {
                    process = ctx.rec.process();
                }
                let pause = if ok { spec.think_ms } else { spec.think_ms + rng.random_range(0..=100) };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            process
        }
    });
    let processes = futures::future::join_all(processes).await;
    // Final reads: every key of every shard, until each succeeds once.
    let mut process = processes.into_iter().max().unwrap_or(0);
    for (shard, volume) in shards.iter() {
        for k in 0..spec.hot_keys {
            let key = format!("k{k}");
            while Instant::now() < final_deadline {
                let (renew, ok) = ctx.op(process, F::Read, *shard, volume, &key, None, None).await;
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
}
