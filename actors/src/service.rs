//! The gRPC service (`proto/attache.proto`), written once for both builds:
//! tonic in production, madsim-tonic in the simulation. Handlers are thin:
//! they turn a request into a message to the `Node` and the reply into a
//! response; errors become gRPC status codes (see [`status`]).

use std::pin::Pin;

use futures::{stream, Stream, StreamExt};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::actor::{Addr, HostHandle};
use crate::auth::{caller_of, Authenticator, NODE_GROUP, OPERATOR_GROUP};
use crate::error::AttacheError;
use crate::node::{
    CloseShardCall, DeleteShardCall, GetClusterStatus, ListClientShards, NewShard, Node, NodeConfig, NodeParts,
    PlacedShard, StaleCall, NODE_MAILBOX_CAPACITY,
};
use crate::shard::layout::{IndexEntry, ShardState};
use crate::shard::{self, PutEntry};
use crate::shard_manager::ShardCall;

/// Generated protobuf messages and gRPC stubs of `attache.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("attache.v1");
}

use proto::attache_server::Attache;

/// The trailer key that names the primary's address on `UNAVAILABLE`.
pub const PRIMARY_HINT: &str = "attache-primary";

/// The metadata key every status the service itself returns carries: the
/// request reached the service and was rejected, so it had no effect. A
/// status without it came from the transport (the request may or may not
/// have been applied).
pub const REJECTED: &str = "attache-rejected";

/// Maps an error to its gRPC status; `UNAVAILABLE` carries the primary hint
/// in the [`PRIMARY_HINT`] metadata entry; every status carries [`REJECTED`]
/// but that of `AttacheError::OutcomeUnknown` (the request may have taken
/// effect).
pub fn status(e: AttacheError) -> Status {
    let rejected = !matches!(e, AttacheError::OutcomeUnknown(_));
    let mut s = status_of(e);
    if rejected {
        s.metadata_mut().insert(REJECTED, tonic::metadata::MetadataValue::from_static("1"));
    }
    s
}

/// Whether `s` came from the service (a rejection with no effect) rather than
/// the transport.
pub fn is_rejection(s: &Status) -> bool {
    s.metadata().contains_key(REJECTED)
}

fn status_of(e: AttacheError) -> Status {
    match e {
        AttacheError::InvalidArgument(m) => Status::invalid_argument(m),
        AttacheError::NotFound(m) => Status::not_found(m),
        AttacheError::AlreadyExists(m) => Status::already_exists(m),
        AttacheError::PermissionDenied(m) => Status::permission_denied(m),
        AttacheError::Unauthenticated(m) => Status::unauthenticated(m),
        AttacheError::FailedPrecondition(m) => Status::failed_precondition(m),
        AttacheError::ResourceExhausted(m) => Status::resource_exhausted(m),
        AttacheError::Unavailable { message, primary_hint } => {
            let mut s = Status::unavailable(message);
            if let Some(hint) = primary_hint.and_then(|h| h.parse().ok()) {
                s.metadata_mut().insert(PRIMARY_HINT, hint);
            }
            s
        }
        AttacheError::Internal(m) => Status::internal(m),
        AttacheError::OutcomeUnknown(m) => Status::unavailable(m),
    }
}

/// The primary hint of an `UNAVAILABLE` status, if it has one.
pub fn primary_hint(s: &Status) -> Option<String> {
    s.metadata().get(PRIMARY_HINT).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn proto_state(s: ShardState) -> i32 {
    match s {
        ShardState::Active => proto::ShardState::Active as i32,
        ShardState::ReadOnly => proto::ShardState::ReadOnly as i32,
        ShardState::Deleted => proto::ShardState::Deleted as i32,
    }
}

fn proto_info(p: PlacedShard) -> proto::ShardInfo {
    proto::ShardInfo {
        shard_id: p.info.shard_id,
        client_id: p.info.owner,
        state: proto_state(p.info.state),
        size_limit_bytes: p.info.size_limit,
        volume_id: p.volume_id,
    }
}

fn indexes(v: Vec<proto::IndexEntry>) -> Vec<IndexEntry> {
    v.into_iter().map(|i| IndexEntry { name: i.name, value: i.value }).collect()
}

/// A request's id: the empty string of proto3 means none.
fn request_id(id: String) -> Option<String> {
    (!id.is_empty()).then_some(id)
}

/// The tonic server of [`AttacheService`], behind its [`Authenticator`]
/// (an interceptor: madsim-tonic's server takes it as a parameter).
#[cfg(not(madsim))]
pub type Server = tonic::service::interceptor::InterceptedService<
    proto::attache_server::AttacheServer<AttacheService>,
    Authenticator,
>;
/// The tonic server of [`AttacheService`], behind its [`Authenticator`]
/// (an interceptor: madsim-tonic's server takes it as a parameter).
#[cfg(madsim)]
pub type Server = proto::attache_server::AttacheServer<AttacheService, Authenticator>;

/// A server-streaming response.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The service; one per node.
#[derive(Clone)]
pub struct AttacheService {
    node: Addr<Node>,
    /// Who may call (see [`crate::auth`]): the interceptor of the server
    /// [`AttacheService::into_server`] makes.
    auth: Authenticator,
    /// Entries a scan stream asks a shard for at a time: [`SCAN_PAGE`], or
    /// the node's `Limits::max_scan_page` when smaller (a shard returns no
    /// more, and a page shorter than asked ends the stream).
    scan_page: u64,
}

impl AttacheService {
    /// The service in front of `node`, whose shards return at most
    /// `max_scan_page` entries per read (`Limits::max_scan_page`), serving
    /// the callers `auth` admits.
    pub fn new(node: Addr<Node>, max_scan_page: usize, auth: Authenticator) -> Self {
        AttacheService { node, auth, scan_page: SCAN_PAGE.min(max_scan_page.max(1) as u64) }
    }

    /// Starts a `Node` with `cfg` and `parts` on `host` and returns its
    /// address with the gRPC server that serves it to the callers `auth`
    /// admits: how `attache dev`, `attache node` and the simulated cluster
    /// all start a node.
    pub fn start(host: &HostHandle, cfg: NodeConfig, parts: NodeParts, auth: Authenticator) -> (Addr<Node>, Server) {
        let (max_batch_bytes, max_scan_page) = (cfg.limits.max_batch_bytes, cfg.limits.max_scan_page);
        let node = host.spawn(Node::new(cfg, parts), NODE_MAILBOX_CAPACITY);
        (node.clone(), AttacheService::new(node, max_scan_page, auth).into_server(max_batch_bytes))
    }

    /// The body of `req` (for `method`), when its caller may act as the
    /// client it names (`crate::auth::Caller::may_act_as`), or, for a
    /// listing, may list that client's shards.
    ///
    /// Errors: `UNAUTHENTICATED` or `PERMISSION_DENIED`, tagged as
    /// rejections: nothing was done.
    fn as_client<T: ClientScoped>(&self, method: &'static str, req: Request<T>) -> Result<T, Status> {
        let caller = caller_of(&req).inspect_err(|_| denied(method))?;
        let body = req.into_inner();
        let allowed = if T::LISTING { caller.may_list(body.client_id()) } else { caller.may_act_as(body.client_id()) };
        allowed.map_err(|e| {
            denied(method);
            status(e)
        })?;
        Ok(body)
    }

    /// The tonic server wrapper. Requests may be up to twice the largest
    /// batch `Limits` allows (`max_bytes`) plus 1 MiB, so an oversized batch
    /// still reaches the service and gets its `INVALID_ARGUMENT` with the
    /// limit in the message, rather than a transport error.
    ///
    /// Every call passes the service's `Authenticator` first, which
    /// refuses an unauthenticated one before its body is decoded.
    pub fn into_server(self, max_bytes: usize) -> Server {
        let auth = self.auth.clone();
        #[cfg(not(madsim))]
        let server = tonic::service::interceptor::InterceptedService::new(
            proto::attache_server::AttacheServer::new(self)
                .max_decoding_message_size(2 * max_bytes + (1 << 20))
                .max_encoding_message_size(max_bytes + (1 << 20)),
            auth,
        );
        #[cfg(madsim)]
        let server = proto::attache_server::AttacheServer::with_interceptor(self, auth)
            .max_decoding_message_size(2 * max_bytes + (1 << 20))
            .max_encoding_message_size(max_bytes + (1 << 20));
        server
    }

    /// Sends `op` for shard `shard_id` through the node, timing it as `method`.
    async fn call<M>(&self, method: &'static str, shard_id: u64, op: M) -> Result<M::Ok, Status>
    where
        M: shard::ShardOp,
        Node: crate::actor::Handler<ShardCall<M>>,
    {
        timed(method, async { self.node.send(ShardCall { shard_id, op }).await? }).await
    }
}

impl AttacheService {
    /// A read at the requested consistency: linearizable from the primary,
    /// or (`READ_CONSISTENCY_STALE_OK`) from any node that has the volume,
    /// with the age of its view in ms, no older than `max_staleness_ms`
    /// (0: any; see `shard::Stale`).
    async fn read<M>(
        &self,
        method: &'static str,
        shard_id: u64,
        op: M,
        consistency: i32,
        max_staleness_ms: u64,
    ) -> Result<(M::Ok, u64), Status>
    where
        M: shard::StaleRead,
        Node: crate::actor::Handler<ShardCall<M>> + crate::actor::Handler<StaleCall<M>>,
    {
        match proto::ReadConsistency::try_from(consistency) {
            Ok(proto::ReadConsistency::Linearizable) => Ok((self.call(method, shard_id, op).await?, 0)),
            Ok(proto::ReadConsistency::StaleOk) => {
                timed(method, async { self.node.send(StaleCall { shard_id, op, max_staleness_ms }).await? }).await
            }
            Err(_) => Err(status(AttacheError::InvalidArgument(format!(
                "unknown read consistency {consistency}: use 0 (linearizable) or 1 (stale ok)"
            )))),
        }
    }
}

/// Counts a call refused for its caller's identity.
fn denied(method: &'static str) {
    metrics::counter!("attache_requests_denied_total", "method" => method).increment(1);
}

/// A request that acts as the client it names.
trait ClientScoped {
    /// A listing, which an operator may make for any client.
    const LISTING: bool = false;
    /// The client the request acts as.
    fn client_id(&self) -> &str;
}

macro_rules! client_scoped {
    ($($t:ty),*) => {$(
        impl ClientScoped for $t {
            fn client_id(&self) -> &str {
                &self.client_id
            }
        }
    )*};
}

client_scoped!(
    proto::NewShardRequest,
    proto::ShardRef,
    proto::PutRequest,
    proto::BatchPutRequest,
    proto::DeleteRequest,
    proto::GetRequest,
    proto::BatchGetRequest,
    proto::ScanRequest,
    proto::ScanIndexRequest
);

impl ClientScoped for proto::ListShardsRequest {
    const LISTING: bool = true;
    fn client_id(&self) -> &str {
        &self.client_id
    }
}

/// Runs `fut`, recording its latency and errors under `method`.
async fn timed<T>(
    method: &'static str,
    fut: impl std::future::Future<Output = Result<T, AttacheError>>,
) -> Result<T, Status> {
    let start = Instant::now();
    let result = fut.await;
    metrics::histogram!("attache_request_duration_seconds", "method" => method).record(start.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!("attache_request_errors_total", "method" => method).increment(1);
    }
    result.map_err(status)
}

/// Most entries a scan stream asks a shard for at a time.
const SCAN_PAGE: u64 = 1000;

/// Streams pages of `page` items: `first` (fetched already, so its errors
/// become the call's status), then `next(cursor, want)` until a short page
/// or `limit` items in all (0: no limit). `cursor` is the last item of the
/// previous page. `page` must not exceed what one shard read returns. Each
/// page comes with the age its read reported (ms; 0 for a linearizable
/// read), which `wrap` puts in the response.
fn pages<T, R, F, Fut>(
    page: u64,
    first: (Vec<T>, u64),
    limit: u64,
    wrap: fn(Vec<T>, u64) -> R,
    next: F,
) -> ResponseStream<R>
where
    T: Clone + Send + 'static,
    R: Send + 'static,
    F: Fn(T, u32) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(Vec<T>, u64), Status>> + Send + 'static,
{
    let (first, first_age) = first;
    let mut remaining = if limit == 0 { u64::MAX } else { limit };
    let want = remaining.min(page);
    let more = first.len() as u64 == want && remaining > want;
    remaining -= first.len() as u64;
    let cursor = if more { first.last().cloned() } else { None };
    let head = stream::iter((!first.is_empty()).then(|| Ok(wrap(first, first_age))));
    let tail = stream::unfold((cursor, remaining, next), move |(cursor, remaining, next)| async move {
        let cursor = cursor?;
        let want = remaining.min(page);
        match next(cursor, want as u32).await {
            Err(e) => Some((Err(e), (None, 0, next))),
            Ok((page, _)) if page.is_empty() => None,
            Ok((page, age)) => {
                let more = page.len() as u64 == want && remaining > want;
                let cursor = if more { page.last().cloned() } else { None };
                Some((Ok(wrap(page, age)), (cursor, remaining - want.min(remaining), next)))
            }
        }
    });
    Box::pin(head.chain(tail))
}

/// The smallest key after `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

#[tonic::async_trait]
impl Attache for AttacheService {
    type BatchGetStream = ResponseStream<proto::GetResponse>;
    type ScanStream = ResponseStream<proto::ScanResponse>;
    type ScanIndexStream = ResponseStream<proto::ScanIndexResponse>;

    async fn new_shard(&self, req: Request<proto::NewShardRequest>) -> Result<Response<proto::ShardInfo>, Status> {
        let r = self.as_client("new_shard", req)?;
        let size_limit = (r.size_limit_bytes > 0).then_some(r.size_limit_bytes);
        let placed =
            timed("new_shard", async { self.node.send(NewShard { client_id: r.client_id, size_limit }).await? })
                .await?;
        Ok(Response::new(proto_info(placed)))
    }

    async fn close_shard(&self, req: Request<proto::ShardRef>) -> Result<Response<proto::ShardInfo>, Status> {
        let r = self.as_client("close_shard", req)?;
        let call = CloseShardCall { shard_id: r.shard_id, client_id: r.client_id };
        let placed = timed("close_shard", async { self.node.send(call).await? }).await?;
        Ok(Response::new(proto_info(placed)))
    }

    async fn delete_shard(&self, req: Request<proto::ShardRef>) -> Result<Response<proto::ShardInfo>, Status> {
        let r = self.as_client("delete_shard", req)?;
        let call = DeleteShardCall { shard_id: r.shard_id, client_id: r.client_id };
        let mut placed = timed("delete_shard", async { self.node.send(call).await? }).await?;
        placed.info.state = ShardState::Deleted;
        Ok(Response::new(proto_info(placed)))
    }

    async fn put(&self, req: Request<proto::PutRequest>) -> Result<Response<proto::WriteResponse>, Status> {
        let r = self.as_client("put", req)?;
        let entry = PutEntry { key: r.key, value: r.value, indexes: indexes(r.indexes) };
        self.call(
            "put",
            r.shard_id,
            shard::Put { client_id: r.client_id, entry, request_id: request_id(r.request_id) },
        )
        .await?;
        Ok(Response::new(proto::WriteResponse {}))
    }

    async fn batch_put(&self, req: Request<proto::BatchPutRequest>) -> Result<Response<proto::WriteResponse>, Status> {
        let r = self.as_client("batch_put", req)?;
        let entries = r
            .entries
            .into_iter()
            .map(|e| PutEntry { key: e.key, value: e.value, indexes: indexes(e.indexes) })
            .collect();
        self.call(
            "batch_put",
            r.shard_id,
            shard::BatchPut { client_id: r.client_id, entries, request_id: request_id(r.request_id) },
        )
        .await?;
        Ok(Response::new(proto::WriteResponse {}))
    }

    async fn delete(&self, req: Request<proto::DeleteRequest>) -> Result<Response<proto::WriteResponse>, Status> {
        let r = self.as_client("delete", req)?;
        self.call(
            "delete",
            r.shard_id,
            shard::DeleteKey { client_id: r.client_id, key: r.key, request_id: request_id(r.request_id) },
        )
        .await?;
        Ok(Response::new(proto::WriteResponse {}))
    }

    async fn get(&self, req: Request<proto::GetRequest>) -> Result<Response<proto::GetResponse>, Status> {
        let r = self.as_client("get", req)?;
        let op = shard::Get { client_id: r.client_id, key: r.key.clone() };
        let (value, age) = self.read("get", r.shard_id, op, r.consistency, r.max_staleness_ms).await?;
        Ok(Response::new(proto::GetResponse {
            key: r.key,
            found: value.is_some(),
            value: value.unwrap_or_default(),
            max_staleness_ms: age,
        }))
    }

    async fn batch_get(&self, req: Request<proto::BatchGetRequest>) -> Result<Response<Self::BatchGetStream>, Status> {
        let r = self.as_client("batch_get", req)?;
        let keys = r.keys.clone();
        let op = shard::BatchGet { client_id: r.client_id, keys: r.keys };
        let (values, age) = self.read("batch_get", r.shard_id, op, r.consistency, r.max_staleness_ms).await?;
        let responses = keys.into_iter().zip(values).map(|(key, value)| {
            Ok(proto::GetResponse {
                key,
                found: value.is_some(),
                value: value.unwrap_or_default(),
                max_staleness_ms: age,
            })
        });
        Ok(Response::new(Box::pin(stream::iter(responses.collect::<Vec<_>>()))))
    }

    async fn scan(&self, req: Request<proto::ScanRequest>) -> Result<Response<Self::ScanStream>, Status> {
        let r = self.as_client("scan", req)?;
        let (shard_id, client_id, end) = (r.shard_id, r.client_id, r.end);
        let want = if r.limit == 0 { self.scan_page } else { r.limit.min(self.scan_page) } as u32;
        let (consistency, bound) = (r.consistency, r.max_staleness_ms);
        let wrap = |page: Vec<(Vec<u8>, Vec<u8>)>, age| proto::ScanResponse {
            entries: page.into_iter().map(|(key, value)| proto::KeyValue { key, value }).collect(),
            max_staleness_ms: age,
        };
        if consistency == proto::ReadConsistency::Linearizable as i32 {
            // Every page from the snapshot the first page read: the scan is
            // one linearizable read, at that page's moment.
            let op = shard::ScanSnapshot { client_id, start: r.start, end, limit: want };
            let (first, rest) = self.call("scan", shard_id, op).await?;
            let next = move |(last, _): (Vec<u8>, Vec<u8>), limit| {
                let rest = rest.clone();
                async move { timed("scan", rest.page(&successor(&last), limit)).await.map(|page| (page, 0)) }
            };
            return Ok(Response::new(pages(self.scan_page, (first, 0), r.limit, wrap, next)));
        }
        let op = shard::Scan { client_id: client_id.clone(), start: r.start, end: end.clone(), limit: want };
        // Stale (or an unknown consistency, refused here): every page is a
        // read of the serving node's view as it is then, with its own age.
        let first = self.read("scan", shard_id, op, consistency, bound).await?;
        if first.0.is_empty() {
            // Nothing in range: one empty page still says how old the view
            // that found nothing is.
            return Ok(Response::new(Box::pin(stream::iter([Ok(wrap(Vec::new(), first.1))]))));
        }
        let service = self.clone();
        let next = move |(last, _): (Vec<u8>, Vec<u8>), limit| {
            let op = shard::Scan { client_id: client_id.clone(), start: successor(&last), end: end.clone(), limit };
            let service = service.clone();
            async move { service.read("scan", shard_id, op, consistency, bound).await }
        };
        Ok(Response::new(pages(self.scan_page, first, r.limit, wrap, next)))
    }

    async fn scan_index(
        &self,
        req: Request<proto::ScanIndexRequest>,
    ) -> Result<Response<Self::ScanIndexStream>, Status> {
        let r = self.as_client("scan_index", req)?;
        let want = if r.limit == 0 { self.scan_page } else { r.limit.min(self.scan_page) } as u32;
        // Every page from the snapshot the first page read: the index scan
        // is one linearizable read, at that page's moment.
        let op = shard::ScanIndexSnapshot {
            client_id: r.client_id,
            name: r.name,
            value_prefix: r.value_prefix,
            limit: want,
        };
        let (first, rest) = self.call("scan_index", r.shard_id, op).await?;
        let next = move |last: shard::IndexHit, limit| {
            let rest = rest.clone();
            async move { timed("scan_index", rest.page(Some(&last), limit)).await.map(|hits| (hits, 0)) }
        };
        let wrap = |page: Vec<shard::IndexHit>, _age| proto::ScanIndexResponse {
            hits: page.into_iter().map(|h| proto::IndexHit { value: h.value, key: h.key }).collect(),
        };
        Ok(Response::new(pages(self.scan_page, (first, 0), r.limit, wrap, next)))
    }

    async fn shard_stats(&self, req: Request<proto::ShardRef>) -> Result<Response<proto::ShardStatsResponse>, Status> {
        let r = self.as_client("shard_stats", req)?;
        let shard_id = r.shard_id;
        let s = self.call("shard_stats", shard_id, shard::Stats { client_id: r.client_id }).await?;
        let volume_id =
            self.node.send(crate::node::VolumeOf { shard_id }).await.map_err(|e| status(e.into()))?.map_err(status)?;
        Ok(Response::new(proto::ShardStatsResponse {
            info: Some(proto_info(PlacedShard { info: s.info, volume_id })),
            live_bytes: s.live_bytes,
            live_keys: s.live_keys,
            bytes_written: s.engine.bytes_written,
            bytes_read: s.engine.bytes_read,
            ops_written: s.engine.ops_written,
            ops_read: s.engine.ops_read,
            group_commits: s.group_commits,
            committed_ops: s.committed_ops,
        }))
    }

    async fn list_shards(
        &self,
        req: Request<proto::ListShardsRequest>,
    ) -> Result<Response<proto::ListShardsResponse>, Status> {
        let r = self.as_client("list_shards", req)?;
        let records =
            timed("list_shards", async { self.node.send(ListClientShards { client_id: r.client_id }).await? }).await?;
        let shards = records
            .into_iter()
            .map(|r| proto::ShardInfo {
                shard_id: r.shard_id,
                client_id: r.client_id,
                state: proto_state(r.state),
                size_limit_bytes: r.size_limit,
                volume_id: r.volume_id,
            })
            .collect();
        Ok(Response::new(proto::ListShardsResponse { shards }))
    }

    async fn cluster_status(
        &self,
        req: Request<proto::ClusterStatusRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        let caller = caller_of(&req).inspect_err(|_| denied("cluster_status"))?;
        caller.needs_group(&[OPERATOR_GROUP, NODE_GROUP], "see the cluster's status").map_err(|e| {
            denied("cluster_status");
            status(e)
        })?;
        let c = timed("cluster_status", async { self.node.send(GetClusterStatus).await? }).await?;
        let address = |id| c.nodes.iter().find(|n| n.node_id == id).map(|n| n.address.clone()).unwrap_or_default();
        let nodes = c
            .nodes
            .iter()
            .map(|n| proto::NodeStatus { node_id: n.node_id, address: n.address.clone(), live: true })
            .collect();
        let volumes = c
            .volumes
            .iter()
            .map(|v| proto::VolumeStatus {
                volume_id: v.volume_id.clone(),
                primary_node_id: v.primary,
                primary_address: address(v.primary),
                epoch: v.epoch,
                backup_node_ids: c.backups.get(&v.volume_id).cloned().unwrap_or_default(),
                shards: c.shards.get(&v.volume_id).copied().unwrap_or(0),
            })
            .collect();
        Ok(Response::new(proto::ClusterStatusResponse { nodes, volumes }))
    }
}
