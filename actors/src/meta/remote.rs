//! The metadata store over gRPC (`proto/metadata.proto`): [`MetadataServer`]
//! serves any [`MetadataBackend`] (the embedded one, in `attache meta`), and
//! [`RemoteBackend`] is a `MetadataBackend` that calls it. Written once for
//! both builds, so the simulation runs the metadata node over simulated
//! gRPC and partitions cut nodes off from it for real.
//!
//! Errors travel as the store's [`MetaError`], JSON in the status details; a
//! call that fails in transport is `Unavailable`, one that takes longer than
//! the client's timeout is `Timeout` (it may still have been applied).

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::time::Duration;
use tonic::{Request, Response, Status};

use crate::auth::{caller_of, Authenticator, BearerToken, NODE_GROUP};
use crate::meta::backend::{
    Compare, CompareOp, CompareTarget, KeyValue, LeaseId, MetaError, MetadataBackend, RangeResponse, Revision, Txn,
    TxnOp, TxnResponse, WatchEvent, WatchStream,
};

/// Generated protobuf messages and gRPC stubs of `attache.meta.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("attache.meta.v1");
}

use proto::metadata_client::MetadataClient;
use proto::metadata_server::Metadata;

/// How long a remote call may take before it is a `Timeout`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn to_status(e: MetaError) -> Status {
    let code = match &e {
        MetaError::Unavailable(_) => tonic::Code::Unavailable,
        MetaError::Timeout(_) => tonic::Code::DeadlineExceeded,
        MetaError::LeaseNotFound(_) => tonic::Code::NotFound,
        MetaError::Compacted { .. } => tonic::Code::OutOfRange,
        MetaError::Invalid(_) => tonic::Code::InvalidArgument,
        MetaError::Storage(_) => tonic::Code::Internal,
        MetaError::Refused(_) => tonic::Code::PermissionDenied,
    };
    let details = serde_json::to_vec(&e).expect("errors serialize");
    Status::with_details(code, e.to_string(), details.into())
}

fn from_status(s: Status) -> MetaError {
    if let Ok(e) = serde_json::from_slice::<MetaError>(s.details()) {
        return e;
    }
    match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            MetaError::Refused(format!("the metadata store refused this caller: {}", s.message()))
        }
        tonic::Code::DeadlineExceeded => MetaError::Timeout(s.message().to_string()),
        _ => MetaError::Unavailable(format!("{}: {}", s.code(), s.message())),
    }
}

fn kv_to(kv: KeyValue) -> proto::KeyValue {
    proto::KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

fn kv_from(kv: proto::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

fn op_to(op: TxnOp) -> proto::TxnOp {
    use proto::txn_op::Op;
    let op = match op {
        TxnOp::Put { key, value, lease } => Op::Put(proto::PutRequest { key, value, lease }),
        TxnOp::Delete { key } => Op::Delete(proto::KeyRequest { key }),
        TxnOp::Get { key } => Op::Get(proto::KeyRequest { key }),
    };
    proto::TxnOp { op: Some(op) }
}

fn op_from(op: proto::TxnOp) -> Result<TxnOp, MetaError> {
    use proto::txn_op::Op;
    Ok(match op.op.ok_or_else(|| MetaError::Invalid("txn op without an operation".into()))? {
        Op::Put(p) => TxnOp::Put { key: p.key, value: p.value, lease: p.lease },
        Op::Delete(k) => TxnOp::Delete { key: k.key },
        Op::Get(k) => TxnOp::Get { key: k.key },
    })
}

fn compare_to(c: Compare) -> proto::Compare {
    use proto::compare::{Op, Target};
    let op = match c.op {
        CompareOp::Equal => Op::Equal,
        CompareOp::NotEqual => Op::NotEqual,
        CompareOp::Less => Op::Less,
        CompareOp::Greater => Op::Greater,
    };
    let target = match c.target {
        CompareTarget::Value(v) => Target::Value(v),
        CompareTarget::ModRevision(r) => Target::ModRevision(r),
        CompareTarget::CreateRevision(r) => Target::CreateRevision(r),
        CompareTarget::Version(v) => Target::Version(v),
    };
    proto::Compare { key: c.key, op: op as i32, target: Some(target) }
}

fn compare_from(c: proto::Compare) -> Result<Compare, MetaError> {
    use proto::compare::{Op, Target};
    let op = match Op::try_from(c.op).map_err(|_| MetaError::Invalid(format!("unknown compare op {}", c.op)))? {
        Op::Equal => CompareOp::Equal,
        Op::NotEqual => CompareOp::NotEqual,
        Op::Less => CompareOp::Less,
        Op::Greater => CompareOp::Greater,
    };
    let target = match c.target.ok_or_else(|| MetaError::Invalid("compare without a target".into()))? {
        Target::Value(v) => CompareTarget::Value(v),
        Target::ModRevision(r) => CompareTarget::ModRevision(r),
        Target::CreateRevision(r) => CompareTarget::CreateRevision(r),
        Target::Version(v) => CompareTarget::Version(v),
    };
    Ok(Compare { key: c.key, op, target })
}

fn event_to(e: WatchEvent) -> proto::WatchEvent {
    use proto::watch_event::Event;
    let event = match e {
        WatchEvent::Put(kv) => Event::Put(kv_to(kv)),
        WatchEvent::Delete { key, mod_revision } => {
            Event::Delete(proto::KeyValue { key, mod_revision, ..Default::default() })
        }
    };
    proto::WatchEvent { event: Some(event) }
}

fn event_from(e: proto::WatchEvent) -> Result<WatchEvent, MetaError> {
    use proto::watch_event::Event;
    Ok(match e.event.ok_or_else(|| MetaError::Invalid("watch event without a change".into()))? {
        Event::Put(kv) => WatchEvent::Put(kv_from(kv)),
        Event::Delete(kv) => WatchEvent::Delete { key: kv.key, mod_revision: kv.mod_revision },
    })
}

/// Serves a backend over gRPC.
#[derive(Clone)]
pub struct MetadataServer {
    backend: Arc<dyn MetadataBackend>,
    /// Who may call: when it authenticates, only identities of
    /// [`NODE_GROUP`] (see [`crate::auth`]).
    auth: Authenticator,
}

impl MetadataServer {
    /// The server in front of `backend`, open to every caller.
    pub fn new(backend: Arc<dyn MetadataBackend>) -> Self {
        MetadataServer { backend, auth: Authenticator::open() }
    }

    /// The same server, serving only callers `auth` identifies as nodes
    /// (group [`NODE_GROUP`]); others get `UNAUTHENTICATED` or
    /// `PERMISSION_DENIED` and change nothing.
    pub fn with_auth(self, auth: Authenticator) -> Self {
        MetadataServer { auth, ..self }
    }

    /// The body of `req` when its caller is a node.
    ///
    /// Errors: `UNAUTHENTICATED` or `PERMISSION_DENIED`.
    fn node_only<T>(&self, req: Request<T>) -> Result<T, Status> {
        let refused = |s: Status| {
            metrics::counter!("attache_metadata_requests_denied_total").increment(1);
            s
        };
        let caller = caller_of(&req).map_err(refused)?;
        caller
            .needs_group(&[NODE_GROUP], "call the metadata store (only storage nodes may)")
            .map_err(|e| refused(crate::service::status(e)))?;
        Ok(req.into_inner())
    }
}

/// The tonic server of [`MetadataServer`], behind its [`Authenticator`]
/// (an interceptor: madsim-tonic's server takes it as a parameter).
#[cfg(not(madsim))]
pub type Server = tonic::service::interceptor::InterceptedService<
    proto::metadata_server::MetadataServer<MetadataServer>,
    Authenticator,
>;
/// The tonic server of [`MetadataServer`], behind its [`Authenticator`]
/// (an interceptor: madsim-tonic's server takes it as a parameter).
#[cfg(madsim)]
pub type Server = proto::metadata_server::MetadataServer<MetadataServer, Authenticator>;

impl MetadataServer {
    /// The tonic service. Every call passes the server's `Authenticator`
    /// first, which refuses an unauthenticated one before its body is
    /// decoded.
    pub fn into_server(self) -> Server {
        let auth = self.auth.clone();
        #[cfg(not(madsim))]
        let server = tonic::service::interceptor::InterceptedService::new(
            proto::metadata_server::MetadataServer::new(self),
            auth,
        );
        #[cfg(madsim)]
        let server = proto::metadata_server::MetadataServer::with_interceptor(self, auth);
        server
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Metadata for MetadataServer {
    type WatchStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::WatchEvent, Status>> + Send>>;

    async fn get(&self, req: Request<proto::KeyRequest>) -> Reply<proto::GetResponse> {
        let kv = self.backend.get(&self.node_only(req)?.key).await.map_err(to_status)?;
        Ok(Response::new(proto::GetResponse { kv: kv.map(kv_to) }))
    }

    async fn range(&self, req: Request<proto::KeyRequest>) -> Reply<proto::RangeResponse> {
        let r = self.backend.range(&self.node_only(req)?.key).await.map_err(to_status)?;
        Ok(Response::new(proto::RangeResponse { kvs: r.kvs.into_iter().map(kv_to).collect(), revision: r.revision }))
    }

    async fn put(&self, req: Request<proto::PutRequest>) -> Reply<proto::RevisionResponse> {
        let p = self.node_only(req)?;
        let revision = self.backend.put(&p.key, &p.value, p.lease).await.map_err(to_status)?;
        Ok(Response::new(proto::RevisionResponse { revision }))
    }

    async fn delete(&self, req: Request<proto::KeyRequest>) -> Reply<proto::DeleteResponse> {
        let (deleted, revision) = self.backend.delete(&self.node_only(req)?.key).await.map_err(to_status)?;
        Ok(Response::new(proto::DeleteResponse { deleted, revision }))
    }

    async fn txn(&self, req: Request<proto::TxnRequest>) -> Reply<proto::TxnResponse> {
        let t = self.node_only(req)?;
        let txn = (|| {
            Ok::<_, MetaError>(Txn {
                compare: t.compare.into_iter().map(compare_from).collect::<Result<_, _>>()?,
                success: t.success.into_iter().map(op_from).collect::<Result<_, _>>()?,
                failure: t.failure.into_iter().map(op_from).collect::<Result<_, _>>()?,
            })
        })()
        .map_err(to_status)?;
        let r = self.backend.txn(txn).await.map_err(to_status)?;
        let gets = r.gets.into_iter().map(|kv| proto::MaybeKeyValue { kv: kv.map(kv_to) }).collect();
        Ok(Response::new(proto::TxnResponse { succeeded: r.succeeded, revision: r.revision, gets }))
    }

    async fn lease_grant(&self, req: Request<proto::LeaseGrantRequest>) -> Reply<proto::LeaseResponse> {
        let lease = self.backend.lease_grant(self.node_only(req)?.ttl_ms).await.map_err(to_status)?;
        Ok(Response::new(proto::LeaseResponse { lease }))
    }

    async fn lease_keep_alive(&self, req: Request<proto::LeaseResponse>) -> Reply<proto::LeaseKeepAliveResponse> {
        let ttl_ms = self.backend.lease_keep_alive(self.node_only(req)?.lease).await.map_err(to_status)?;
        Ok(Response::new(proto::LeaseKeepAliveResponse { ttl_ms }))
    }

    async fn lease_revoke(&self, req: Request<proto::LeaseResponse>) -> Reply<proto::RevisionResponse> {
        self.backend.lease_revoke(self.node_only(req)?.lease).await.map_err(to_status)?;
        Ok(Response::new(proto::RevisionResponse { revision: 0 }))
    }

    async fn watch(&self, req: Request<proto::WatchRequest>) -> Reply<Self::WatchStream> {
        let w = self.node_only(req)?;
        let stream = self.backend.watch(&w.prefix, w.from_revision).await.map_err(to_status)?;
        Ok(Response::new(Box::pin(stream.map(|e| e.map(event_to).map_err(to_status)))))
    }
}

/// The metadata client stub, with the caller's bearer token on every call.
#[cfg(not(madsim))]
type Stub = MetadataClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>>;
/// The metadata client stub, with the caller's bearer token on every call.
#[cfg(madsim)]
type Stub = MetadataClient<tonic::transport::Channel, BearerToken>;

/// A [`MetadataBackend`] that calls an `attache meta` server.
#[derive(Clone)]
pub struct RemoteBackend {
    endpoint: String,
    tls: Option<crate::tls::ClientTls>,
    token: BearerToken,
    client: Arc<tokio::sync::OnceCell<Stub>>,
}

impl RemoteBackend {
    /// A backend calling `endpoint` (`host:port`, or `http://host:port`);
    /// connects lazily.
    pub fn new(endpoint: impl Into<String>) -> Self {
        RemoteBackend {
            endpoint: endpoint.into(),
            tls: None,
            token: BearerToken::default(),
            client: Arc::new(tokio::sync::OnceCell::new()),
        }
    }

    /// The same backend, sending `token` as a bearer token on every call
    /// (the node's identity to a metadata store with a token file).
    pub fn with_token(mut self, token: BearerToken) -> Self {
        self.token = token;
        self.client = Arc::new(tokio::sync::OnceCell::new());
        self
    }

    /// The same backend, calling over TLS with `tls` (its endpoint then
    /// `host:port` or `https://host:port`).
    pub fn with_tls(mut self, tls: crate::tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self.client = Arc::new(tokio::sync::OnceCell::new());
        self
    }

    async fn client(&self) -> Result<Stub, MetaError> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let endpoint = crate::tls::endpoint(&self.endpoint, self.tls.as_ref())
                    .map_err(|e| MetaError::Invalid(format!("bad metadata endpoint: {e}")))?;
                Ok::<_, MetaError>(MetadataClient::with_interceptor(endpoint.connect_lazy(), self.token.clone()))
            })
            .await?;
        Ok(client.clone())
    }

    /// Runs one call with the client timeout.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, MetaError>
    where
        F: FnOnce(Stub) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let client = self.client().await?;
        match crate::timer::timeout(CALL_TIMEOUT, f(client)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(from_status(status)),
            Err(_) => Err(MetaError::Timeout(format!("{what} took over {CALL_TIMEOUT:?}"))),
        }
    }
}

#[async_trait]
impl MetadataBackend for RemoteBackend {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, MetaError> {
        let req = proto::KeyRequest { key: key.to_vec() };
        Ok(self.call("get", |mut c| async move { c.get(req).await }).await?.kv.map(kv_from))
    }

    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, MetaError> {
        let req = proto::KeyRequest { key: prefix.to_vec() };
        let r = self.call("range", |mut c| async move { c.range(req).await }).await?;
        Ok(RangeResponse { kvs: r.kvs.into_iter().map(kv_from).collect(), revision: r.revision })
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision, MetaError> {
        let req = proto::PutRequest { key: key.to_vec(), value: value.to_vec(), lease };
        Ok(self.call("put", |mut c| async move { c.put(req).await }).await?.revision)
    }

    async fn delete(&self, key: &[u8]) -> Result<(bool, Revision), MetaError> {
        let req = proto::KeyRequest { key: key.to_vec() };
        let r = self.call("delete", |mut c| async move { c.delete(req).await }).await?;
        Ok((r.deleted, r.revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, MetaError> {
        let req = proto::TxnRequest {
            compare: txn.compare.into_iter().map(compare_to).collect(),
            success: txn.success.into_iter().map(op_to).collect(),
            failure: txn.failure.into_iter().map(op_to).collect(),
        };
        let r = self.call("txn", |mut c| async move { c.txn(req).await }).await?;
        Ok(TxnResponse {
            succeeded: r.succeeded,
            revision: r.revision,
            gets: r.gets.into_iter().map(|g| g.kv.map(kv_from)).collect(),
        })
    }

    async fn lease_grant(&self, ttl_ms: u64) -> Result<LeaseId, MetaError> {
        let req = proto::LeaseGrantRequest { ttl_ms };
        Ok(self.call("lease grant", |mut c| async move { c.lease_grant(req).await }).await?.lease)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<u64, MetaError> {
        let req = proto::LeaseResponse { lease };
        Ok(self.call("lease keep-alive", |mut c| async move { c.lease_keep_alive(req).await }).await?.ttl_ms)
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        let req = proto::LeaseResponse { lease };
        self.call("lease revoke", |mut c| async move { c.lease_revoke(req).await }).await?;
        Ok(())
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, MetaError> {
        let req = proto::WatchRequest { prefix: prefix.to_vec(), from_revision: from };
        let stream = self.call("watch", |mut c| async move { c.watch(req).await }).await?;
        Ok(Box::pin(stream.map(|e| e.map_err(from_status).and_then(event_from))))
    }
}
