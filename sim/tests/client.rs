//! The client's retry rules against scripted nodes, in simulated network
//! and time: a rejection naming a new primary is followed at once, and
//! nodes whose views of the primary form a cycle cannot make the client
//! retry without pauses. Runs in the simulation build only.
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
/// every call with `UNAVAILABLE` naming `hint` as the primary. Counts calls.
#[derive(Clone)]
struct Scripted {
    hint: Option<String>,
    calls: Arc<AtomicU64>,
}

impl Scripted {
    fn answer<T>(&self, ok: impl FnOnce() -> T) -> Result<Response<T>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match &self.hint {
            Some(hint) => Err(status(AttacheError::Unavailable {
                message: "not the primary".into(),
                primary_hint: Some(hint.clone()),
            })),
            None => Ok(Response::new(ok())),
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
        self.answer(|| proto::GetResponse { key, found: true, value: b"v".to_vec(), max_staleness_ms: 0 })
    }
    async fn new_shard(&self, _: Request<proto::NewShardRequest>) -> Result<Response<proto::ShardInfo>, Status> {
        self.answer(Default::default)
    }
    async fn close_shard(&self, _: Request<proto::ShardRef>) -> Result<Response<proto::ShardInfo>, Status> {
        self.answer(Default::default)
    }
    async fn delete_shard(&self, _: Request<proto::ShardRef>) -> Result<Response<proto::ShardInfo>, Status> {
        self.answer(Default::default)
    }
    async fn put(&self, _: Request<proto::PutRequest>) -> Result<Response<proto::WriteResponse>, Status> {
        self.answer(Default::default)
    }
    async fn batch_put(&self, _: Request<proto::BatchPutRequest>) -> Result<Response<proto::WriteResponse>, Status> {
        self.answer(Default::default)
    }
    async fn delete(&self, _: Request<proto::DeleteRequest>) -> Result<Response<proto::WriteResponse>, Status> {
        self.answer(Default::default)
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
        self.answer(Default::default)
    }
    async fn list_shards(
        &self,
        _: Request<proto::ListShardsRequest>,
    ) -> Result<Response<proto::ListShardsResponse>, Status> {
        self.answer(Default::default)
    }
    async fn cluster_status(
        &self,
        _: Request<proto::ClusterStatusRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        self.answer(Default::default)
    }
}

/// Starts a scripted node at `10.0.3.{i}:7400` per hint (`None`: the
/// primary); returns their addresses and call counters.
async fn nodes(hints: &[Option<usize>]) -> (Vec<String>, Vec<Arc<AtomicU64>>) {
    let addrs: Vec<String> = (1..=hints.len()).map(|i| format!("10.0.3.{i}:7400")).collect();
    let mut calls = Vec::new();
    for (i, hint) in hints.iter().enumerate() {
        let svc = Scripted { hint: hint.map(|h| addrs[h].clone()), calls: Arc::default() };
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
