//! The metadata conformance suite against the embedded backend on an
//! in-memory log, and the retry wrapper's behaviour, under the simulator's
//! clock when built with `--cfg madsim` (lease expiry and backoff take no
//! real time there).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use attache_actors::meta::backend::*;
use attache_actors::meta::conformance::{self, Harness};
use attache_actors::meta::embedded::{EmbeddedBackend, MemMetaLog};
use attache_actors::meta::MetaOps;
use attache_actors::retry::{retry, Jitter, RetryPolicy};
use attache_actors::task_host::TaskHost;
use attache_actors::HostHandle;
use tokio::time::{Duration, Instant};

struct Mem {
    log: MemMetaLog,
    backend: Arc<dyn MetadataBackend>,
}

#[async_trait]
impl Harness for Mem {
    fn backend(&self) -> Arc<dyn MetadataBackend> {
        self.backend.clone()
    }
    async fn restart(&mut self) {
        self.backend = EmbeddedBackend::open(&HostHandle::new(TaskHost), Arc::new(self.log.clone())).await.unwrap();
    }
    fn lease_ttl_ms(&self) -> u64 {
        300
    }
}

#[tokio::test]
async fn embedded_backend_conforms_in_simulated_time() {
    let log = MemMetaLog::default();
    let backend = EmbeddedBackend::open(&HostHandle::new(TaskHost), Arc::new(log.clone())).await.unwrap();
    conformance::run_all(&mut Mem { log, backend }, "/conformance").await;
}

/// Fails the first `fail` calls of `txn`/`get` with `error`; with `apply`, a
/// failing txn is applied before the error is returned (a timeout after the
/// write landed).
struct Flaky {
    inner: Arc<dyn MetadataBackend>,
    fail: AtomicU32,
    error: MetaError,
    apply: bool,
}

impl Flaky {
    fn should_fail(&self) -> bool {
        self.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

#[async_trait]
impl MetadataBackend for Flaky {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, MetaError> {
        if !self.apply && self.should_fail() {
            return Err(self.error.clone());
        }
        self.inner.get(key).await
    }
    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, MetaError> {
        self.inner.range(prefix).await
    }
    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision, MetaError> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &[u8]) -> Result<(bool, Revision), MetaError> {
        self.inner.delete(key).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, MetaError> {
        if self.apply && self.should_fail() {
            self.inner.txn(txn).await?;
            return Err(self.error.clone());
        }
        self.inner.txn(txn).await
    }
    async fn lease_grant(&self, ttl_ms: u64) -> Result<LeaseId, MetaError> {
        self.inner.lease_grant(ttl_ms).await
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<u64, MetaError> {
        self.inner.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.inner.lease_revoke(lease).await
    }
    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, MetaError> {
        self.inner.watch(prefix, from).await
    }
}

async fn flaky(fail: u32, error: MetaError, apply: bool) -> Arc<Flaky> {
    let inner = EmbeddedBackend::open(&HostHandle::new(TaskHost), Arc::new(MemMetaLog::default())).await.unwrap();
    Arc::new(Flaky { inner, fail: AtomicU32::new(fail), error, apply })
}

fn policy() -> RetryPolicy {
    RetryPolicy { initial_backoff_ms: 100, max_backoff_ms: 1_000, max_attempts: 6, deadline_ms: 10_000 }
}

#[tokio::test]
async fn transient_errors_are_retried_with_bounded_backoff() {
    let b = flaky(3, MetaError::Unavailable("down".into()), false).await;
    let start = Instant::now();
    let got = retry(&policy(), &Jitter::new(1), "get", || b.get(b"k")).await;
    assert_eq!(got, Ok(None), "the fourth attempt succeeds");
    // Three sleeps, each at most its cap: 100 + 200 + 400 ms.
    assert!(start.elapsed() <= Duration::from_millis(700), "{:?}", start.elapsed());
}

#[tokio::test]
async fn retries_stop_after_max_attempts() {
    let b = flaky(100, MetaError::Timeout("slow".into()), false).await;
    let calls_before = b.fail.load(Ordering::SeqCst);
    let got = retry(&policy(), &Jitter::new(2), "get", || b.get(b"k")).await;
    assert_eq!(got, Err(MetaError::Timeout("slow".into())));
    assert_eq!(calls_before - b.fail.load(Ordering::SeqCst), 6, "exactly max_attempts calls");
}

#[tokio::test]
async fn retries_stop_at_the_deadline() {
    let b = flaky(100, MetaError::Unavailable("down".into()), false).await;
    let tight = RetryPolicy { deadline_ms: 250, max_attempts: 1000, ..policy() };
    let start = Instant::now();
    assert!(retry(&tight, &Jitter::new(3), "get", || b.get(b"k")).await.is_err());
    assert!(start.elapsed() <= Duration::from_millis(250), "{:?}", start.elapsed());
}

#[tokio::test]
async fn permanent_errors_are_not_retried() {
    let b = flaky(5, MetaError::Invalid("bad".into()), false).await;
    assert_eq!(retry(&policy(), &Jitter::new(4), "get", || b.get(b"k")).await, Err(MetaError::Invalid("bad".into())));
    assert_eq!(b.fail.load(Ordering::SeqCst), 4, "one call only");
}

/// A CAS that timed out after it landed is recognised on the re-read, so the
/// allocation is neither lost nor taken twice.
#[tokio::test]
async fn an_allocation_whose_cas_timed_out_is_re_read_not_repeated() {
    let b = flaky(1, MetaError::Timeout("lost reply".into()), true).await;
    let ops = MetaOps::new(b.clone(), policy(), 5);
    assert_eq!(ops.allocate_id("shard").await.unwrap(), 1, "the landed CAS counts");
    assert_eq!(ops.allocate_id("shard").await.unwrap(), 2, "no id was skipped");
}

/// A takeover claim is a compare-and-swap on the owner record and on the
/// old primary's node record being absent: while the old primary is
/// registered (it came back since the backup looked), the claim loses and
/// changes nothing; once its record is gone, the claim wins at epoch + 1.
#[tokio::test]
async fn a_takeover_claim_loses_while_the_old_primary_is_registered() {
    use attache_actors::meta::store::{node_key, NodeRecord};
    let backend = EmbeddedBackend::open(&HostHandle::new(TaskHost), Arc::new(MemMetaLog::default())).await.unwrap();
    let ops = MetaOps::new(backend.clone(), policy(), 1);
    let first = ops.claim_volume("vol-1", 1, None).await.unwrap().unwrap();
    assert_eq!((first.primary, first.epoch), (1, 1));
    let lease = ops.grant_lease(60_000).await.unwrap();
    let record = NodeRecord { node_id: 1, address: "n1:7400".into(), instance_id: String::new(), volumes: vec![] };
    ops.register_node(&record, lease).await.unwrap();
    let current = ops.volume("vol-1").await.unwrap().expect("record");
    let lost = ops.claim_volume("vol-1", 2, Some(&current)).await.unwrap();
    assert_eq!(lost.map_err(|c| c.map(|c| c.0)), Err(Some(first.clone())), "node 1 is registered: no takeover");
    // Its own claim (a restart) does not look at its own record.
    let again = ops.claim_volume("vol-1", 1, Some(&current)).await.unwrap().unwrap();
    assert_eq!(again.epoch, 2);
    backend.delete(node_key(1).as_bytes()).await.unwrap();
    let current = ops.volume("vol-1").await.unwrap().expect("record");
    let won = ops.claim_volume("vol-1", 2, Some(&current)).await.unwrap().unwrap();
    assert_eq!((won.primary, won.epoch), (2, 3));
}

/// Shard states only move forward: a close that lands after a delete (the
/// two raced) leaves the record deleted; repeating a state changes nothing.
#[tokio::test]
async fn shard_states_only_move_forward() {
    use attache_actors::meta::store::ShardRecord;
    use attache_actors::shard::layout::ShardState;
    let backend = EmbeddedBackend::open(&HostHandle::new(TaskHost), Arc::new(MemMetaLog::default())).await.unwrap();
    let ops = MetaOps::new(backend, policy(), 1);
    let record = ShardRecord {
        shard_id: 7,
        client_id: "c".into(),
        volume_id: "vol-1".into(),
        state: ShardState::Active,
        size_limit: 1 << 20,
    };
    ops.register_shard(&record).await.unwrap();
    ops.set_shard_state(7, ShardState::Deleted).await.unwrap();
    ops.set_shard_state(7, ShardState::ReadOnly).await.unwrap();
    assert_eq!(ops.shard(7).await.unwrap().unwrap().state, ShardState::Deleted, "a late close undid a delete");
    ops.set_shard_state(7, ShardState::Deleted).await.unwrap();
    assert_eq!(ops.shard(7).await.unwrap().unwrap().state, ShardState::Deleted);
    let missing = ops.set_shard_state(8, ShardState::ReadOnly).await;
    assert!(matches!(missing, Err(MetaError::Invalid(_))), "{missing:?}");
}
