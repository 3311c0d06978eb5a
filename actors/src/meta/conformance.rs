//! The conformance suite every [`MetadataBackend`] must pass: the embedded
//! backend, the embedded backend over gRPC, and etcd run the very same cases
//! (from `attache-runtime`'s tests, and under the simulator from
//! `attache-sim`'s). Failures panic with the case and what differed.
//!
//! Each run works under its own key prefix, so a shared etcd can run it many
//! times.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::time::{sleep, timeout, Duration, Instant};

use crate::meta::backend::{Compare, CompareOp, MetaError, MetadataBackend, Txn, TxnOp, WatchEvent};
use crate::meta::store::MetaOps;
use crate::retry::RetryPolicy;

/// A backend under test, with the means to restart it.
#[async_trait]
pub trait Harness: Send {
    /// A client of the store as it is now.
    fn backend(&self) -> Arc<dyn MetadataBackend>;
    /// Stops the store and starts it again on the same data; `backend()`
    /// returns a client of the restarted store afterwards.
    async fn restart(&mut self);
    /// The shortest lease TTL the backend honours exactly, ms.
    fn lease_ttl_ms(&self) -> u64;
}

/// Runs every case, under key prefix `{prefix}/`.
pub async fn run_all(h: &mut dyn Harness, prefix: &str) {
    revisions_grow(h, &format!("{prefix}/rev/")).await;
    stale_cas_changes_nothing(h, &format!("{prefix}/cas/")).await;
    lease_expiry_removes_keys(h, &format!("{prefix}/lease/")).await;
    watch_delivers_every_change_in_order(h, &format!("{prefix}/watch/")).await;
    concurrent_allocators_get_unique_increasing_ids(h, &format!("{prefix}-ids")).await;
    restart_loses_nothing_acknowledged(h, &format!("{prefix}/restart/")).await;
}

fn key(prefix: &str, k: &str) -> Vec<u8> {
    format!("{prefix}{k}").into_bytes()
}

/// Revisions grow by one per write; reads and failed compares leave them.
pub async fn revisions_grow(h: &mut dyn Harness, prefix: &str) {
    let b = h.backend();
    let r1 = b.put(&key(prefix, "a"), b"1", 0).await.unwrap();
    let r2 = b.put(&key(prefix, "a"), b"2", 0).await.unwrap();
    let r3 = b.put(&key(prefix, "b"), b"1", 0).await.unwrap();
    assert!(r1 < r2 && r2 < r3, "revisions grow: {r1} {r2} {r3}");
    let a = b.get(&key(prefix, "a")).await.unwrap().expect("a exists");
    assert_eq!((a.create_revision, a.mod_revision, a.version, a.value.as_slice()), (r1, r2, 2, &b"2"[..]));
    let range = b.range(prefix.as_bytes()).await.unwrap();
    assert_eq!(range.kvs.len(), 2);
    assert!(range.revision >= r3);
    let (deleted, r4) = b.delete(&key(prefix, "b")).await.unwrap();
    assert!(deleted && r4 > r3, "a delete that removed a key is a write");
    assert_eq!(b.get(&key(prefix, "b")).await.unwrap(), None);
    let (deleted, _) = b.delete(&key(prefix, "never")).await.unwrap();
    assert!(!deleted);
}

/// A compare-and-swap with a stale revision fails and changes nothing.
pub async fn stale_cas_changes_nothing(h: &mut dyn Harness, prefix: &str) {
    let b = h.backend();
    let k = key(prefix, "x");
    let r1 = b.put(&k, b"v1", 0).await.unwrap();
    let cas = |rev, value: &str| Txn {
        compare: vec![Compare::mod_revision(k.clone(), CompareOp::Equal, rev)],
        success: vec![TxnOp::Put { key: k.clone(), value: value.into(), lease: 0 }],
        failure: vec![TxnOp::Get { key: k.clone() }],
    };
    let won = b.txn(cas(r1, "v2")).await.unwrap();
    assert!(won.succeeded, "CAS at the current revision wins");
    let lost = b.txn(cas(r1, "v3")).await.unwrap();
    assert!(!lost.succeeded, "CAS at a stale revision loses");
    let current = lost.gets[0].clone().expect("failure branch read the key");
    assert_eq!(current.value, b"v2");
    assert_eq!(current.mod_revision, won.revision);
    assert_eq!(b.get(&k).await.unwrap().unwrap(), current, "the lost CAS changed nothing");
    let create = Txn {
        compare: vec![Compare::create_revision(key(prefix, "new"), CompareOp::Equal, 0)],
        success: vec![TxnOp::Put { key: key(prefix, "new"), value: b"n".to_vec(), lease: 0 }],
        failure: vec![],
    };
    assert!(b.txn(create.clone()).await.unwrap().succeeded, "create-if-absent on a missing key");
    assert!(!b.txn(create).await.unwrap().succeeded, "create-if-absent on an existing key");
}

/// Keys attached to a lease vanish when it expires; a kept-alive lease lives.
pub async fn lease_expiry_removes_keys(h: &mut dyn Harness, prefix: &str) {
    let b = h.backend();
    let ttl = h.lease_ttl_ms();
    let short = b.lease_grant(ttl).await.unwrap();
    let kept = b.lease_grant(ttl).await.unwrap();
    b.put(&key(prefix, "short"), b"x", short).await.unwrap();
    b.put(&key(prefix, "kept"), b"y", kept).await.unwrap();
    b.put(&key(prefix, "plain"), b"z", 0).await.unwrap();
    let deadline = Instant::now() + Duration::from_millis(ttl * 3 + 5_000);
    while b.get(&key(prefix, "short")).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "a key of an expired lease is still there {}ms after its TTL",
            ttl * 2 + 5_000
        );
        b.lease_keep_alive(kept).await.unwrap();
        sleep(Duration::from_millis(ttl / 4)).await;
    }
    assert!(b.get(&key(prefix, "kept")).await.unwrap().is_some(), "a kept-alive lease keeps its key");
    assert!(b.get(&key(prefix, "plain")).await.unwrap().is_some(), "a key without lease stays");
    assert_eq!(b.lease_keep_alive(short).await, Err(MetaError::LeaseNotFound(short)));
    let put = b.put(&key(prefix, "late"), b"x", short).await;
    assert_eq!(put, Err(MetaError::LeaseNotFound(short)), "a put under an expired lease is refused");
    b.lease_revoke(kept).await.unwrap();
    assert_eq!(b.get(&key(prefix, "kept")).await.unwrap(), None, "revoke deletes the lease's keys");
}

/// A watch from a revision delivers every later change under the prefix, in order.
pub async fn watch_delivers_every_change_in_order(h: &mut dyn Harness, prefix: &str) {
    let b = h.backend();
    let start = b.put(&key(prefix, "before"), b"0", 0).await.unwrap() + 1;
    let mut expected = Vec::new();
    for i in 0..20 {
        let k = key(prefix, &format!("k{}", i % 5));
        let rev = b.put(&k, format!("{i}").as_bytes(), 0).await.unwrap();
        expected.push((k, rev, true));
        if i % 7 == 6 {
            let (_, rev) = b.delete(&key(prefix, &format!("k{}", i % 5))).await.unwrap();
            expected.push((key(prefix, &format!("k{}", i % 5)), rev, false));
        }
    }
    b.put(b"/outside-the-prefix", b"x", 0).await.unwrap();
    let mut stream = b.watch(prefix.as_bytes(), start).await.unwrap();
    // Changes made while watching arrive too.
    let live = b.put(&key(prefix, "live"), b"l", 0).await.unwrap();
    expected.push((key(prefix, "live"), live, true));
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let event = timeout(Duration::from_secs(10), stream.next()).await.expect("watch event within 10 s");
        let event = event.expect("watch stream open").expect("no watch error");
        seen.push(match event {
            WatchEvent::Put(kv) => (kv.key, kv.mod_revision, true),
            WatchEvent::Delete { key, mod_revision } => (key, mod_revision, false),
        });
    }
    assert_eq!(seen, expected, "every change under the prefix, in revision order");
}

/// Eight concurrent allocators get unique, increasing ids, also across a restart.
pub async fn concurrent_allocators_get_unique_increasing_ids(h: &mut dyn Harness, counter: &str) {
    const ALLOCATORS: u64 = 8;
    const EACH: usize = 25;
    let allocate = |backend: Arc<dyn MetadataBackend>, seed: u64| {
        let counter = counter.to_string();
        async move {
            let ops = MetaOps::new(backend, RetryPolicy::default(), seed);
            let mut ids = Vec::with_capacity(EACH);
            for _ in 0..EACH {
                ids.push(ops.allocate_id(&counter).await.expect("allocation succeeds"));
            }
            ids
        }
    };
    let runs = futures::future::join_all((0..ALLOCATORS).map(|i| allocate(h.backend(), i))).await;
    let mut all = BTreeSet::new();
    for ids in &runs {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "one allocator's ids increase: {ids:?}");
        for id in ids {
            assert!(all.insert(*id), "id {id} allocated twice");
        }
    }
    assert_eq!(all.len(), ALLOCATORS as usize * EACH);
    let max = *all.last().unwrap();
    h.restart().await;
    let after = allocate(h.backend(), 99).await;
    assert!(after[0] > max, "ids after a restart ({}) exceed those before ({max})", after[0]);
}

/// Acknowledged writes survive a restart of the store.
pub async fn restart_loses_nothing_acknowledged(h: &mut dyn Harness, prefix: &str) {
    let b = h.backend();
    let mut last = 0;
    for i in 0..100 {
        last = b.put(&key(prefix, &format!("{i:03}")), format!("v{i}").as_bytes(), 0).await.unwrap();
    }
    b.delete(&key(prefix, "050")).await.unwrap();
    h.restart().await;
    let b = h.backend();
    let range = b.range(prefix.as_bytes()).await.unwrap();
    assert_eq!(range.kvs.len(), 99, "99 keys after the restart");
    assert!(range.revision > last, "the revision did not go back");
    for kv in &range.kvs {
        let i: usize = String::from_utf8_lossy(&kv.key[prefix.len()..]).parse().unwrap();
        assert_eq!(kv.value, format!("v{i}").into_bytes());
    }
    assert!(b.put(&key(prefix, "after"), b"x", 0).await.unwrap() > range.revision);
}
