//! `EtcdBackend`: the [`MetadataBackend`] on a real etcd v3 cluster, through
//! the `etcd-client` crate, for deployments that outgrow one `attache meta`.
//!
//! The trait was written with etcd's semantics, so most calls map one to one.
//! Differences handled here: etcd leases have whole-second TTLs (a TTL in ms
//! is rounded up, and etcd raises it to its minimum, about 2 s by default);
//! a keep-alive of an expired lease answers TTL 0, which becomes
//! `LeaseNotFound`; watches report compaction with a compact revision.

use std::time::Duration;

use async_trait::async_trait;
use attache_actors::meta::backend::{
    Compare, CompareOp, CompareTarget, KeyValue, LeaseId, MetaError, MetadataBackend, RangeResponse, Revision, Txn,
    TxnOp, TxnResponse, WatchEvent, WatchStream,
};
use etcd_client as etcd;
use futures::StreamExt;

/// How long one etcd call may take before it is a `Timeout`.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The etcd backend.
#[derive(Clone)]
pub struct EtcdBackend {
    client: etcd::Client,
}

impl EtcdBackend {
    /// Connects to `endpoints` (`host:port`), over TLS with `tls` when given
    /// (etcd's `--cert-file`; its `--client-cert-auth` wants the identity).
    ///
    /// Errors: `Unavailable` when no endpoint answers.
    pub async fn connect(
        endpoints: &[String],
        tls: Option<&attache_actors::tls::ClientTls>,
    ) -> Result<Self, MetaError> {
        let mut opts = etcd::ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT).with_timeout(CALL_TIMEOUT);
        let mut endpoints = endpoints.to_vec();
        if let Some(tls) = tls {
            // etcd's client TLS (`--cert-file`, `--client-cert-auth` on the server side).
            let mut options = etcd::TlsOptions::new().ca_certificate(etcd::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                options = options.identity(etcd::Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                options = options.domain_name(domain.clone());
            }
            opts = opts.with_tls(options);
            for e in endpoints.iter_mut().filter(|e| !e.contains("://")) {
                *e = format!("https://{e}");
            }
        }
        let client = etcd::Client::connect(&endpoints, Some(opts)).await.map_err(error)?;
        Ok(EtcdBackend { client })
    }
}

fn error(e: etcd::Error) -> MetaError {
    match e {
        etcd::Error::GRpcStatus(s) => match s.code() {
            tonic::Code::DeadlineExceeded => MetaError::Timeout(s.message().to_string()),
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                MetaError::Invalid(s.message().to_string())
            }
            tonic::Code::OutOfRange => MetaError::Compacted { requested: 0, oldest: 0 },
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                MetaError::Refused(format!("etcd refused this node: {}", s.message()))
            }
            _ => MetaError::Unavailable(format!("etcd: {}: {}", s.code(), s.message())),
        },
        e => MetaError::Unavailable(format!("etcd: {e}")),
    }
}

fn lease_error(lease: LeaseId, e: etcd::Error) -> MetaError {
    match &e {
        etcd::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound => MetaError::LeaseNotFound(lease),
        etcd::Error::LeaseKeepAliveError(m) if m.contains("not found") => MetaError::LeaseNotFound(lease),
        _ => error(e),
    }
}

fn kv(kv: &etcd::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn revision(header: Option<&etcd::ResponseHeader>) -> Revision {
    header.map_or(0, etcd::ResponseHeader::revision)
}

fn compare(c: &Compare) -> etcd::Compare {
    let op = match c.op {
        CompareOp::Equal => etcd::CompareOp::Equal,
        CompareOp::NotEqual => etcd::CompareOp::NotEqual,
        CompareOp::Less => etcd::CompareOp::Less,
        CompareOp::Greater => etcd::CompareOp::Greater,
    };
    let key = c.key.clone();
    match &c.target {
        CompareTarget::Value(v) => etcd::Compare::value(key, op, v.clone()),
        CompareTarget::ModRevision(r) => etcd::Compare::mod_revision(key, op, *r),
        CompareTarget::CreateRevision(r) => etcd::Compare::create_revision(key, op, *r),
        CompareTarget::Version(v) => etcd::Compare::version(key, op, *v),
    }
}

fn op(o: &TxnOp) -> etcd::TxnOp {
    match o {
        TxnOp::Put { key, value, lease } => {
            let opts = (*lease != 0).then(|| etcd::PutOptions::new().with_lease(*lease));
            etcd::TxnOp::put(key.clone(), value.clone(), opts)
        }
        TxnOp::Delete { key } => etcd::TxnOp::delete(key.clone(), None),
        TxnOp::Get { key } => etcd::TxnOp::get(key.clone(), None),
    }
}

async fn timed<T>(what: &str, fut: impl std::future::Future<Output = Result<T, MetaError>>) -> Result<T, MetaError> {
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(MetaError::Timeout(format!("etcd {what} took over {CALL_TIMEOUT:?}"))))
}

#[async_trait]
impl MetadataBackend for EtcdBackend {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, MetaError> {
        let mut c = self.client.clone();
        let resp = timed("get", async { c.get(key, None).await.map_err(error) }).await?;
        Ok(resp.kvs().first().map(kv))
    }

    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, MetaError> {
        let mut c = self.client.clone();
        let opts = if prefix.is_empty() {
            etcd::GetOptions::new().with_all_keys()
        } else {
            etcd::GetOptions::new().with_prefix()
        };
        let resp = timed("range", async { c.get(prefix, Some(opts)).await.map_err(error) }).await?;
        Ok(RangeResponse { kvs: resp.kvs().iter().map(kv).collect(), revision: revision(resp.header()) })
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision, MetaError> {
        let mut c = self.client.clone();
        let opts = (lease != 0).then(|| etcd::PutOptions::new().with_lease(lease));
        let resp = timed("put", async { c.put(key, value, opts).await.map_err(|e| lease_error(lease, e)) }).await?;
        Ok(revision(resp.header()))
    }

    async fn delete(&self, key: &[u8]) -> Result<(bool, Revision), MetaError> {
        let mut c = self.client.clone();
        let resp = timed("delete", async { c.delete(key, None).await.map_err(error) }).await?;
        Ok((resp.deleted() > 0, revision(resp.header())))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, MetaError> {
        let lease = txn.success.iter().chain(&txn.failure).find_map(|o| match o {
            TxnOp::Put { lease, .. } if *lease != 0 => Some(*lease),
            _ => None,
        });
        let t = etcd::Txn::new()
            .when(txn.compare.iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(op).collect::<Vec<_>>());
        let mut c = self.client.clone();
        let resp = timed("txn", async { c.txn(t).await.map_err(|e| lease_error(lease.unwrap_or(0), e)) }).await?;
        let gets = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                etcd::TxnOpResponse::Get(g) => Some(g.kvs().first().map(kv)),
                _ => None,
            })
            .collect();
        Ok(TxnResponse { succeeded: resp.succeeded(), revision: revision(resp.header()), gets })
    }

    async fn lease_grant(&self, ttl_ms: u64) -> Result<LeaseId, MetaError> {
        if ttl_ms == 0 {
            return Err(MetaError::Invalid("lease TTL must be positive".into()));
        }
        let secs = ttl_ms.div_ceil(1000) as i64;
        let mut c = self.client.clone();
        let resp = timed("lease grant", async { c.lease_grant(secs, None).await.map_err(error) }).await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<u64, MetaError> {
        let mut c = self.client.clone();
        timed("lease keep-alive", async {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await.map_err(|e| lease_error(lease, e))?;
            keeper.keep_alive().await.map_err(|e| lease_error(lease, e))?;
            match stream.message().await.map_err(|e| lease_error(lease, e))? {
                Some(resp) if resp.ttl() > 0 => Ok(resp.ttl() as u64 * 1000),
                _ => Err(MetaError::LeaseNotFound(lease)),
            }
        })
        .await
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        let mut c = self.client.clone();
        timed("lease revoke", async { c.lease_revoke(lease).await.map(drop).map_err(|e| lease_error(lease, e)) }).await
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, MetaError> {
        let mut opts = if prefix.is_empty() {
            etcd::WatchOptions::new().with_all_keys()
        } else {
            etcd::WatchOptions::new().with_prefix()
        };
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let mut c = self.client.clone();
        let stream = timed("watch", async { c.watch(prefix, Some(opts)).await.map_err(error) }).await?;
        let events = stream.flat_map(move |resp| {
            let items: Vec<Result<WatchEvent, MetaError>> = match resp {
                Err(e) => vec![Err(error(e))],
                Ok(r) if r.compact_revision() > 0 => {
                    vec![Err(MetaError::Compacted { requested: from, oldest: r.compact_revision() })]
                }
                Ok(r) if r.canceled() => {
                    vec![Err(MetaError::Unavailable(format!("etcd watch canceled: {}", r.cancel_reason())))]
                }
                Ok(r) => r
                    .events()
                    .iter()
                    .filter_map(|e| {
                        let k = e.kv()?;
                        Some(Ok(match e.event_type() {
                            etcd::EventType::Put => WatchEvent::Put(kv(k)),
                            etcd::EventType::Delete => {
                                WatchEvent::Delete { key: k.key().to_vec(), mod_revision: k.mod_revision() }
                            }
                        }))
                    })
                    .collect(),
            };
            futures::stream::iter(items)
        });
        Ok(Box::pin(events))
    }
}
