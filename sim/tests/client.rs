//! The client's retry rules against scripted nodes, in simulated network
//! and time: a rejection naming a new primary is followed at once, nodes
//! whose views of the primary form a cycle cannot make the client retry
//! without pauses, and a silent (paused) node holds a call up only until a
//! hedge finds the new primary. Runs in the simulation build only.
#![cfg(madsim)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use attache_actors::client::{CallSpec, Client, ClientSettings, Outcome};
use attache_actors::error::AttacheError;
use attache_actors::service::proto::attache_server::{Attache, AttacheServer};
use attache_actors::service::{proto, status, ResponseStream};
use tokio::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// A node that answers `Get` as the primary (`hint: None`), or rejects
/// every call with `UNAVAILABLE` naming `hint` as the primary; from
/// `serves_from` on (a backup that took over) it answers as the primary.
/// It answers after `delay` (a paused node: an hour); `fails` replaces its
/// answer with that error. Counts calls.
#[derive(Clone)]
struct Scripted {
    hint: Option<String>,
    delay: Option<Duration>,
    serves_from: Option<Instant>,
    fails: Option<fn() -> AttacheError>,
    calls: Arc<AtomicU64>,
}

impl Scripted {
    async fn answer<T>(&self, ok: impl FnOnce() -> T) -> Result<Response<T>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(error) = self.fails {
            return Err(status(error()));
        }
        match &self.hint {
            Some(hint) if self.serves_from.is_none_or(|t| Instant::now() < t) => {
                Err(status(AttacheError::Unavailable {
                    message: "not the primary".into(),
                    primary_hint: Some(hint.clone()),
                }))
            }
            _ => Ok(Response::new(ok())),
        }
    }
}

#[tonic::async_trait]
impl Attache for Scripted {
    type BatchGetStream = ResponseStream<proto::GetResponse>;
    type ScanStream = ResponseStream<proto::ScanResponse>;
    type ScanIndexStream = ResponseStream<proto::ScanIndexResponse>;

    async fn get(&self, r: Request<proto::GetRequest>) -> Result<Response<proto::GetResponse>, Status> {
        let key = r.into_inner().key;
        self.answer(|| proto::GetResponse { key, found: true, value: b"v".to_vec(), max_staleness_ms: 0 }).await
    }
    async fn new_shard(&self, _: Request<proto::NewShardRequest>) -> Result<Response<proto::ShardInfo>, Status> {
        self.answer(Default::default).await
    }
    async fn close_shard(&self, _: Request<proto::ShardRef>) -> Result<Response<proto::ShardInfo>, Status> {
        self.answer(Default::default).await
    }
    async fn delete_shard(&self, _: Request<proto::ShardRef>) -> Result<Response<proto::ShardInfo>, Status> {
        self.answer(Default::default).await
    }
    async fn put(&self, _: Request<proto::PutRequest>) -> Result<Response<proto::WriteResponse>, Status> {
        self.answer(Default::default).await
    }
    async fn batch_put(&self, _: Request<proto::BatchPutRequest>) -> Result<Response<proto::WriteResponse>, Status> {
        self.answer(Default::default).await
    }
    async fn delete(&self, _: Request<proto::DeleteRequest>) -> Result<Response<proto::WriteResponse>, Status> {
        self.answer(Default::default).await
    }
    async fn batch_get(&self, _: Request<proto::BatchGetRequest>) -> Result<Response<Self::BatchGetStream>, Status> {
        Err(Status::unimplemented("scripted node"))
    }
    async fn scan(&self, _: Request<proto::ScanRequest>) -> Result<Response<Self::ScanStream>, Status> {
        Err(Status::unimplemented("scripted node"))
    }
    async fn scan_index(&self, _: Request<proto::ScanIndexRequest>) -> Result<Response<Self::ScanIndexStream>, Status> {
        Err(Status::unimplemented("scripted node"))
    }
    async fn shard_stats(&self, _: Request<proto::ShardRef>) -> Result<Response<proto::ShardStatsResponse>, Status> {
        self.answer(Default::default).await
    }
    async fn list_shards(
        &self,
        _: Request<proto::ListShardsRequest>,
    ) -> Result<Response<proto::ListShardsResponse>, Status> {
        self.answer(Default::default).await
    }
    async fn cluster_status(
        &self,
        _: Request<proto::ClusterStatusRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        self.answer(Default::default).await
    }
}

/// How a scripted node behaves: see [`Scripted`].
#[derive(Clone, Copy, Default)]
struct Script {
    /// The index of the node it names as the primary; `None`: it serves.
    hint: Option<usize>,
    delay: Option<Duration>,
    /// It serves from this long after it starts.
    serves_after: Option<Duration>,
    fails: Option<fn() -> AttacheError>,
}

/// A paused node's script: it never answers.
const SILENT: Script = Script { hint: None, delay: Some(Duration::from_secs(3600)), serves_after: None, fails: None };

/// Starts a scripted node at `10.0.3.{i}:7400` per hint (`None`: the
/// primary); returns their addresses and call counters.
async fn nodes(hints: &[Option<usize>]) -> (Vec<String>, Vec<Arc<AtomicU64>>) {
    let scripts: Vec<Script> = hints.iter().map(|&hint| Script { hint, ..Script::default() }).collect();
    scripted(&scripts).await
}

/// Starts a scripted node at `10.0.3.{i}:7400` per script; returns their
/// addresses and call counters.
async fn scripted(scripts: &[Script]) -> (Vec<String>, Vec<Arc<AtomicU64>>) {
    let addrs: Vec<String> = (1..=scripts.len()).map(|i| format!("10.0.3.{i}:7400")).collect();
    let mut calls = Vec::new();
    for (i, script) in scripts.iter().enumerate() {
        let svc = Scripted {
            hint: script.hint.map(|h| addrs[h].clone()),
            delay: script.delay,
            serves_from: script.serves_after.map(|d| Instant::now() + d),
            fails: script.fails,
            calls: Arc::default(),
        };
        calls.push(svc.calls.clone());
        let addr: SocketAddr = addrs[i].parse().unwrap();
        let node = madsim::runtime::Handle::current().create_node().name(format!("node-{i}")).ip(addr.ip()).build();
        node.spawn(async move {
            tonic::transport::Server::builder().add_service(AttacheServer::new(svc)).serve(addr).await.unwrap();
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    (addrs, calls)
}

/// The node the client runs on.
fn client_node() -> madsim::runtime::NodeHandle {
    madsim::runtime::Handle::current().create_node().name("client").ip("10.0.4.1".parse().unwrap()).build()
}

/// Runs one `Get` of shard 1 on `node` with a new client; returns its
/// result's outcome (`None`: answered) and how long it took.
async fn get(
    node: &madsim::runtime::NodeHandle,
    addrs: Vec<String>,
    settings: ClientSettings,
) -> (Option<Outcome>, Duration) {
    node.spawn(async move {
        let c = Client::new(&addrs, settings).unwrap();
        let req = proto::GetRequest { shard_id: 1, client_id: "c".into(), key: b"k".to_vec(), ..Default::default() };
        let start = Instant::now();
        let r = c
            .call(CallSpec::shard(1), |mut s| {
                let r = req.clone();
                async move { s.get(r).await }
            })
            .await;
        (r.err().map(|f| f.outcome), start.elapsed())
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_rejection_naming_the_new_primary_is_followed_at_once() {
    // Node 0 names node 1, which serves. The retry to node 1 does not wait
    // for a backoff: here any backoff is drawn from [0, 10 s), so a call
    // that paused would take seconds; two RPCs take milliseconds.
    let (addrs, calls) = nodes(&[Some(1), None]).await;
    let client = client_node();
    for seed in 0..20 {
        let settings =
            ClientSettings { seed, initial_backoff_ms: 10_000, max_backoff_ms: 10_000, ..Default::default() };
        let (failed, took) = get(&client, addrs.clone(), settings).await;
        assert_eq!(failed, None);
        assert!(took < Duration::from_secs(1), "seed {seed}: {took:?} for a rejection and its hint");
    }
    assert_eq!(calls[0].load(Ordering::Relaxed), 20);
    assert_eq!(calls[1].load(Ordering::Relaxed), 20);
}

#[tokio::test]
async fn nodes_naming_each_other_in_a_cycle_cannot_make_the_client_spin() {
    // 0 names 1, 1 names 2, 2 names 0: every hint is new to the client, but
    // at most two retries in a row go without a pause.
    let (addrs, calls) = nodes(&[Some(1), Some(2), Some(0)]).await;
    let settings = ClientSettings { deadline_ms: 5_000, ..Default::default() };
    let (failed, took) = get(&client_node(), addrs, settings).await;
    assert_eq!(failed, Some(Outcome::Rejected));
    assert!(took >= Duration::from_millis(4_500), "gave up after {took:?}");
    let total: u64 = calls.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    // Backoff capped at 500 ms with full jitter: about 20 pauses in 5 s,
    // each after at most 3 attempts.
    assert!(total <= 150, "{total} attempts in {took:?}");
}

/// A silent primary (node 0, paused) and a backup (node 1) that names it
/// until it takes over 2 s in; with hedging off or on, one `Get` started at
/// once: (took, calls to node 0, calls to node 1).
async fn silent_primary(hedge_after_ms: u64) -> (Duration, u64, u64) {
    let (addrs, calls) = scripted(&[
        SILENT,
        Script { hint: Some(0), serves_after: Some(Duration::from_millis(2_000)), ..Script::default() },
    ])
    .await;
    let settings = ClientSettings { hedge_after_ms, ..Default::default() };
    let (failed, took) = get(&client_node(), addrs, settings).await;
    assert_eq!(failed, None);
    (took, calls[0].load(Ordering::Relaxed), calls[1].load(Ordering::Relaxed))
}

#[tokio::test]
async fn a_silent_primary_holds_a_call_up_only_until_a_hedge_finds_the_new_one() {
    // The backup serves from 2.0 s after the nodes start (0.1 s before the
    // call); hedges go to it every 250 ms, so one lands by about 2.15 s.
    let (took, to_silent, to_backup) = silent_primary(250).await;
    assert!(took <= Duration::from_millis(2_200), "served after {took:?}");
    assert_eq!(to_silent, 1, "the silent node is asked once, its attempt kept");
    // One hedge per 250 ms while waiting: no storm.
    assert!((7..=9).contains(&to_backup), "{to_backup} hedges in {took:?}");
}

#[tokio::test]
async fn without_hedging_a_silent_primary_holds_a_call_up_for_the_attempt_timeout() {
    // The same with hedging off: the call waits out the 10 s attempt timeout
    // on the silent node, then asks the backup, which by then serves.
    let (took, to_silent, to_backup) = silent_primary(0).await;
    assert!(took >= Duration::from_secs(10), "served after {took:?}");
    assert_eq!((to_silent, to_backup), (1, 1));
}

#[tokio::test]
async fn a_hedge_follows_a_hint_to_a_third_node_at_once() {
    // Node 0 is silent; node 1 no longer names it (its lease ended) but
    // names node 2, which serves. The first hedge (250 ms) is rejected
    // with that hint and the call goes to node 2 at once.
    let (addrs, calls) = scripted(&[SILENT, Script { hint: Some(2), ..Script::default() }, Script::default()]).await;
    let settings = ClientSettings { initial_backoff_ms: 10_000, max_backoff_ms: 10_000, ..Default::default() };
    let (failed, took) = get(&client_node(), addrs, settings).await;
    assert_eq!(failed, None);
    assert!(took < Duration::from_millis(300), "served after {took:?}");
    let calls: Vec<u64> = calls.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(calls, [1, 1, 1]);
}

#[tokio::test]
async fn a_final_answer_from_a_hedge_waits_for_the_attempt_still_out() {
    // Node 0 (the primary) answers after 400 ms; the hedge at 250 ms finds
    // node 1 answering NOT_FOUND (as a node does for a shard being deleted
    // while the primary deleting it has not answered): the call waits for
    // node 0, which serves it.
    let slow = Script { delay: Some(Duration::from_millis(400)), ..Script::default() };
    let not_found =
        Script { fails: Some(|| AttacheError::NotFound("shard 1 was deleted".into())), ..Script::default() };
    let (addrs, calls) = scripted(&[slow, not_found]).await;
    let (failed, took) = get(&client_node(), addrs, ClientSettings::default()).await;
    assert_eq!(failed, None);
    assert!(took >= Duration::from_millis(400), "served after {took:?}");
    let calls: Vec<u64> = calls.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(calls, [1, 1]);
}

#[tokio::test]
async fn after_a_hedged_call_the_route_is_the_node_that_served() {
    // Node 0 serves in 400 ms; the hedge to node 1 is rejected without a
    // hint, which points the route at node 2; then node 0 serves. The next
    // call goes to node 0 first, and node 2 is never asked.
    let slow = Script { delay: Some(Duration::from_millis(400)), ..Script::default() };
    let no_hint = Script {
        fails: Some(|| AttacheError::Unavailable { message: "no primary known".into(), primary_hint: None }),
        ..Script::default()
    };
    let (addrs, calls) = scripted(&[slow, no_hint, Script::default()]).await;
    client_node()
        .spawn(async move {
            let c = Client::new(&addrs, ClientSettings::default()).unwrap();
            let req =
                proto::GetRequest { shard_id: 1, client_id: "c".into(), key: b"k".to_vec(), ..Default::default() };
            for _ in 0..2 {
                let served = c
                    .call(CallSpec::shard(1), |mut s| {
                        let r = req.clone();
                        async move { s.get(r).await }
                    })
                    .await
                    .unwrap();
                assert_eq!(served.addr, addrs[0]);
            }
        })
        .await
        .unwrap();
    let calls: Vec<u64> = calls.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(calls, [2, 2, 0]);
}

#[tokio::test]
async fn a_client_given_one_address_hedges_to_the_nodes_hints_taught_it() {
    // The client knows only node 1 at first. A call to it is rejected with
    // a hint naming node 0 (learned), which is silent; the hedge that then
    // falls due goes back to node 1, which by then serves (it took over).
    let (addrs, calls) = scripted(&[
        SILENT,
        Script { hint: Some(0), serves_after: Some(Duration::from_millis(600)), ..Script::default() },
    ])
    .await;
    let (failed, took) = get(&client_node(), vec![addrs[1].clone()], ClientSettings::default()).await;
    assert_eq!(failed, None);
    assert!(took < Duration::from_millis(1_000), "served after {took:?}");
    assert_eq!(calls[0].load(Ordering::Relaxed), 1);
}
