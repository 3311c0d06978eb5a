//! The embedded metadata store: the default metadata backend, in process,
//! persisted through a [`MetaLog`] (a file with fsync in production,
//! [`MemMetaLog`] in memory in the simulation and in tests).
//!
//! The [`MetadataStore`] actor owns the [`StateMachine`] and the log and is
//! their only writer: each change is planned on the state machine, written to
//! the log as a framed record (`u32be len ++ u32be crc32 ++ codec(record)`)
//! and synced, then applied and published to watchers; a change is
//! acknowledged only after its record is durable. [`EmbeddedBackend`] is the
//! handle the rest of the system holds: it implements [`MetadataBackend`] by
//! sending the actor one message per call. It serves `attache dev` in
//! process, `attache meta` behind its gRPC server, and the simulation's
//! metadata node.
//!
//! Recovery replays the log, stopping at the first torn or corrupt record (an
//! append that never completed), then compacts it into one snapshot record.
//! Lease expiry reads the tokio clock (madsim's in the simulation), checked
//! before every call and by a sweeper task every [`SWEEP_INTERVAL`]; after a
//! restart every lease gets its full TTL again, as etcd does.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Duration;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::actor::{Actor, Addr, Context, Handler, HostHandle, MailboxError, Message, Reply};
use crate::codec;
use crate::lease::DriftClock;
use crate::meta::backend::{
    KeyValue, LeaseId, MetaError, MetadataBackend, RangeResponse, Revision, Txn, TxnOp, TxnResponse, WatchEvent,
    WatchStream,
};
use crate::meta::state::{Record, StateMachine};

/// How often the sweeper ends expired leases.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(50);
/// Records appended after which the log is compacted into a snapshot.
pub const COMPACT_AFTER_RECORDS: usize = 20_000;

/// Durable storage for the embedded store's log.
#[async_trait]
pub trait MetaLog: Send + Sync + 'static {
    /// Everything appended (and synced) since the last `replace`, in order.
    async fn load(&self) -> Result<Vec<u8>, MetaError>;
    /// Appends `bytes` and syncs them before returning.
    async fn append(&self, bytes: &[u8]) -> Result<(), MetaError>;
    /// Replaces the whole log with `bytes`, atomically and synced.
    async fn replace(&self, bytes: &[u8]) -> Result<(), MetaError>;
    /// The log for error messages: its file, in production.
    fn describe(&self) -> String {
        "the metadata log".into()
    }
}

/// A log in memory; clones share it, so it outlives a store that is dropped
/// and reopened (a restart, in tests).
#[derive(Clone, Default, Debug)]
pub struct MemMetaLog(Arc<std::sync::Mutex<Vec<u8>>>);

#[async_trait]
impl MetaLog for MemMetaLog {
    async fn load(&self) -> Result<Vec<u8>, MetaError> {
        Ok(self.0.lock().expect("mem log lock").clone())
    }

    async fn append(&self, bytes: &[u8]) -> Result<(), MetaError> {
        self.0.lock().expect("mem log lock").extend_from_slice(bytes);
        Ok(())
    }

    async fn replace(&self, bytes: &[u8]) -> Result<(), MetaError> {
        *self.0.lock().expect("mem log lock") = bytes.to_vec();
        Ok(())
    }
}

/// A failed log write as the callers see it: the store is unavailable until
/// its disk works again, and the change may or may not survive (transient, as
/// a timeout is).
fn unavailable(e: MetaError) -> MetaError {
    MetaError::Unavailable(format!("the metadata store cannot write its log ({e}); the change may or may not persist"))
}

/// Frames records for the log.
fn frame(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        codec::frame(&mut out, &codec::encode(r));
    }
    out
}

/// Parses framed records; stops at the first incomplete or corrupt frame
/// (a torn append). Returns the records and whether the whole input was
/// valid.
///
/// Errors: a frame whose checksum holds but whose record does not decode.
/// That is no torn append but a log of another format (an older build's)
/// or damage the checksum missed; dropping it and what follows would lose
/// acknowledged metadata, so the caller must refuse the log. The message
/// names the record.
pub fn parse_log(bytes: &[u8]) -> Result<(Vec<Record>, bool), String> {
    let (payloads, valid) = codec::frames(bytes);
    let mut records = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.iter().enumerate() {
        let r = codec::decode::<Record>(p, "metadata log record").map_err(|e| format!("record {}: {e}", i + 1))?;
        records.push(r);
    }
    Ok((records, valid == bytes.len()))
}

/// A live watch: its key prefix and where its events go.
type Watcher = (Vec<u8>, mpsc::UnboundedSender<Result<WatchEvent, MetaError>>);

/// Mailbox capacity of the store actor (calls in flight from every node).
const MAILBOX_CAPACITY: usize = 4096;

/// The metadata store actor; see the module docs.
pub struct MetadataStore {
    sm: StateMachine,
    log: Arc<dyn MetaLog>,
    watchers: Vec<Watcher>,
    records_since_snapshot: usize,
    /// An append failed: the log may end in part of records that were never
    /// applied or acknowledged, and an append after them would be lost on
    /// the next recovery (which stops at the first bad frame). Until the log
    /// is rewritten as a snapshot of the applied state, nothing is appended.
    log_suspect: bool,
    /// Lease expiry is measured with it.
    clock: Arc<DriftClock>,
}

impl MetadataStore {
    /// Recovers the store from `log`: replays it up to the first torn or
    /// corrupt record and rewrites it as one snapshot record (which also cuts
    /// a torn tail off before anything is appended after it).
    ///
    /// Errors: `Storage` when the log cannot be read or rewritten, or holds a
    /// record that cannot follow the ones before it (named by its position).
    pub async fn recover(log: Arc<dyn MetaLog>) -> Result<Self, MetaError> {
        Self::recover_with_clock(log, Arc::default()).await
    }

    /// As [`MetadataStore::recover`], measuring lease expiry with `clock`
    /// (the simulation drifts it).
    pub async fn recover_with_clock(log: Arc<dyn MetaLog>, clock: Arc<DriftClock>) -> Result<Self, MetaError> {
        let bytes = log.load().await?;
        let (records, clean) = parse_log(&bytes).map_err(|e| {
            MetaError::Storage(format!("{} cannot be read, so the store does not start on it: {e}", log.describe()))
        })?;
        if !clean {
            tracing::warn!(records = records.len(), "metadata log ends in a torn or corrupt record; dropping it");
        }
        let mut sm = StateMachine::default();
        let now = clock.now();
        for (i, r) in records.iter().enumerate() {
            sm.apply(r, now).map_err(|e| {
                MetaError::Storage(format!(
                    "{} cannot be replayed: record {} of {}: {e}",
                    log.describe(),
                    i + 1,
                    records.len()
                ))
            })?;
        }
        log.replace(&frame(&[Record::Snapshot(sm.snapshot())])).await?;
        tracing::info!(revision = sm.revision(), records = records.len(), "metadata store recovered");
        Ok(MetadataStore { sm, log, watchers: Vec::new(), records_since_snapshot: 0, log_suspect: false, clock })
    }

    /// Logs `records` (synced), then applies them and publishes their events.
    ///
    /// A failed append is never followed by another append: the next commit
    /// first rewrites the log as one snapshot of the applied state (dropping
    /// whatever part of the failed append reached the file), and fails if it
    /// cannot. So the log never holds an acknowledged record after a bad
    /// frame, and recovery, which stops at the first bad frame, loses none.
    ///
    /// Errors: `Unavailable` when the append (or that rewrite) fails; the
    /// records are not applied, and whether they survive a crash of the store
    /// before the next successful rewrite is unknown.
    async fn commit(&mut self, records: Vec<Record>) -> Result<(), MetaError> {
        if records.is_empty() {
            return Ok(());
        }
        if self.log_suspect {
            self.log.replace(&frame(&[Record::Snapshot(self.sm.snapshot())])).await.map_err(unavailable)?;
            self.log_suspect = false;
            self.records_since_snapshot = 0;
            tracing::info!(revision = self.sm.revision(), "metadata log rewritten after a failed append");
        }
        if let Err(e) = self.log.append(&frame(&records)).await {
            self.log_suspect = true;
            tracing::warn!(error = %e, "metadata log append failed; the log is rewritten before the next append");
            return Err(unavailable(e));
        }
        let now = self.clock.now();
        for r in &records {
            // Planned against this state, so it applies. An error would be a
            // bug; the record is durable but not applied, so the log is
            // rewritten from the applied state before anything follows it.
            let events = self.sm.apply(r, now).inspect_err(|_| self.log_suspect = true)?;
            for e in events {
                self.watchers.retain(|(prefix, tx)| !e.key().starts_with(prefix) || tx.send(Ok(e.clone())).is_ok());
            }
        }
        self.records_since_snapshot += records.len();
        if self.records_since_snapshot >= COMPACT_AFTER_RECORDS {
            // The records are durable and applied, so a failed compaction
            // does not fail this commit. But the rewrite may have failed
            // after its rename and before the directory sync, when which
            // file the path names after a power loss is unknown: the log is
            // suspect, and rewritten (synced) before the next append.
            match self.log.replace(&frame(&[Record::Snapshot(self.sm.snapshot())])).await {
                Ok(()) => self.records_since_snapshot = 0,
                Err(e) => {
                    self.log_suspect = true;
                    tracing::warn!(error = %e, "metadata log compaction failed; rewritten before the next append");
                }
            }
        }
        Ok(())
    }

    /// Ends every lease expired by now (before any call sees the state).
    async fn expire(&mut self) -> Result<(), MetaError> {
        let expired = self.sm.expired(self.clock.now());
        self.commit(expired).await
    }

    /// Plans `txn` on the state machine and commits its record, if any.
    async fn txn(&mut self, txn: &Txn) -> Result<TxnResponse, MetaError> {
        let (resp, record) = self.sm.plan_txn(txn)?;
        self.commit(record.into_iter().collect()).await?;
        Ok(resp)
    }

    async fn call(&mut self, call: Call) -> Result<Answer, MetaError> {
        self.expire().await?;
        Ok(match call {
            Call::Sweep => Answer::Done,
            Call::Get { key } => Answer::Get(self.sm.get(&key)),
            Call::Range { prefix } => Answer::Range(self.sm.range(&prefix)),
            Call::Txn(txn) => Answer::Txn(self.txn(&txn).await?),
            Call::Delete { key } => {
                let before = self.sm.revision();
                let txn = Txn { success: vec![TxnOp::Delete { key }], ..Default::default() };
                let resp = self.txn(&txn).await?;
                Answer::Delete(resp.revision > before, resp.revision)
            }
            Call::LeaseGrant { ttl_ms } => {
                let record = self.sm.grant(ttl_ms)?;
                let Record::LeaseGrant { id, .. } = record else { unreachable!("grant makes a LeaseGrant") };
                self.commit(vec![record]).await?;
                Answer::Lease(id)
            }
            Call::LeaseKeepAlive { lease } => Answer::Ttl(self.sm.keep_alive(lease, self.clock.now())?),
            Call::LeaseRevoke { lease } => {
                if self.sm.lease_ttl(lease).is_none() {
                    return Err(MetaError::LeaseNotFound(lease));
                }
                self.commit(vec![Record::LeaseEnd { id: lease }]).await?;
                Answer::Done
            }
            Call::Watch { prefix, from } => {
                let from = if from <= 0 { self.sm.revision() + 1 } else { from };
                let past = self.sm.history_since(&prefix, from)?;
                let (tx, rx) = mpsc::unbounded_channel();
                for e in past {
                    let _ = tx.send(Ok(e));
                }
                // Watchers whose stream was dropped go now: an event reaches
                // (and removes) only those under its own prefix, so a
                // watcher of keys that never change would stay forever.
                self.watchers.retain(|(_, tx)| !tx.is_closed());
                self.watchers.push((prefix, tx));
                Answer::Watch(Box::pin(UnboundedReceiverStream::new(rx)))
            }
        })
    }
}

impl Actor for MetadataStore {
    fn name(&self) -> String {
        "metadata-store".into()
    }
}

/// One call of the [`MetadataBackend`] API, as a message to the store actor.
/// Every call first ends the leases that expired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// Only ends expired leases (the sweeper's tick).
    Sweep,
    /// [`MetadataBackend::get`].
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// [`MetadataBackend::range`].
    Range {
        /// The key prefix.
        prefix: Vec<u8>,
    },
    /// [`MetadataBackend::txn`].
    Txn(Txn),
    /// [`MetadataBackend::delete`].
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// [`MetadataBackend::lease_grant`], TTL in ms.
    LeaseGrant {
        /// The lease's TTL, ms (0 is `Invalid`).
        ttl_ms: u64,
    },
    /// [`MetadataBackend::lease_keep_alive`].
    LeaseKeepAlive {
        /// The lease to renew.
        lease: LeaseId,
    },
    /// [`MetadataBackend::lease_revoke`].
    LeaseRevoke {
        /// The lease to revoke.
        lease: LeaseId,
    },
    /// [`MetadataBackend::watch`].
    Watch {
        /// The key prefix watched.
        prefix: Vec<u8>,
        /// The first revision delivered (0 or less: from now).
        from: Revision,
    },
}

/// The store's answer to a [`Call`], one variant per call kind.
pub enum Answer {
    /// Sweep and revoke.
    Done,
    /// The key, if present.
    Get(Option<KeyValue>),
    /// The keys under the prefix.
    Range(RangeResponse),
    /// The transaction's outcome.
    Txn(TxnResponse),
    /// Whether a key was deleted, and the revision after the call.
    Delete(bool, Revision),
    /// A new lease.
    Lease(LeaseId),
    /// A renewed lease's TTL, ms.
    Ttl(u64),
    /// A watch's event stream.
    Watch(WatchStream),
}

impl Message for Call {
    type Reply = Result<Answer, MetaError>;
}

impl Handler<Call> for MetadataStore {
    async fn handle(&mut self, call: Call, _ctx: &Context<Self>) -> Reply<Result<Answer, MetaError>> {
        Reply::now(self.call(call).await)
    }
}

/// The handle on a running [`MetadataStore`]; see the module docs. Dropping
/// the last handle stops the actor and its sweeper.
pub struct EmbeddedBackend {
    store: Addr<MetadataStore>,
}

impl EmbeddedBackend {
    /// Recovers the store from `log`, starts its actor on `host`, and starts
    /// the lease sweeper (a detached task that ends with the actor).
    ///
    /// Errors: `Storage` when the log cannot be read or rewritten.
    pub async fn open(host: &HostHandle, log: Arc<dyn MetaLog>) -> Result<Arc<Self>, MetaError> {
        Self::open_with_clock(host, log, Arc::default()).await
    }

    /// As [`EmbeddedBackend::open`], measuring lease expiry with `clock`
    /// (the simulation drifts the metadata node's clock).
    pub async fn open_with_clock(
        host: &HostHandle,
        log: Arc<dyn MetaLog>,
        clock: Arc<DriftClock>,
    ) -> Result<Arc<Self>, MetaError> {
        let store = host.spawn(MetadataStore::recover_with_clock(log, clock).await?, MAILBOX_CAPACITY);
        let sweeper = store.clone();
        host.spawn_detached(async move {
            while !sweeper.is_closed() {
                tokio::time::sleep(SWEEP_INTERVAL).await;
                match sweeper.send(Call::Sweep).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "metadata lease sweep failed"),
                    Err(_) => return,
                }
            }
        });
        Ok(Arc::new(EmbeddedBackend { store }))
    }

    async fn call(&self, call: Call) -> Result<Answer, MetaError> {
        self.store.send(call).await.map_err(|e: MailboxError| MetaError::Unavailable(format!("metadata store: {e}")))?
    }
}

impl Drop for EmbeddedBackend {
    fn drop(&mut self) {
        self.store.stop();
    }
}

/// The answer of another kind than the call asked for: a bug in this module.
fn mismatch() -> MetaError {
    MetaError::Invalid("metadata store answered a call of another kind".into())
}

#[async_trait]
impl MetadataBackend for EmbeddedBackend {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, MetaError> {
        match self.call(Call::Get { key: key.to_vec() }).await? {
            Answer::Get(kv) => Ok(kv),
            _ => Err(mismatch()),
        }
    }

    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, MetaError> {
        match self.call(Call::Range { prefix: prefix.to_vec() }).await? {
            Answer::Range(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision, MetaError> {
        let txn =
            Txn { success: vec![TxnOp::Put { key: key.to_vec(), value: value.to_vec(), lease }], ..Default::default() };
        Ok(self.txn(txn).await?.revision)
    }

    async fn delete(&self, key: &[u8]) -> Result<(bool, Revision), MetaError> {
        match self.call(Call::Delete { key: key.to_vec() }).await? {
            Answer::Delete(deleted, rev) => Ok((deleted, rev)),
            _ => Err(mismatch()),
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, MetaError> {
        match self.call(Call::Txn(txn)).await? {
            Answer::Txn(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn lease_grant(&self, ttl_ms: u64) -> Result<LeaseId, MetaError> {
        match self.call(Call::LeaseGrant { ttl_ms }).await? {
            Answer::Lease(id) => Ok(id),
            _ => Err(mismatch()),
        }
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<u64, MetaError> {
        match self.call(Call::LeaseKeepAlive { lease }).await? {
            Answer::Ttl(ttl) => Ok(ttl),
            _ => Err(mismatch()),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        match self.call(Call::LeaseRevoke { lease }).await? {
            Answer::Done => Ok(()),
            _ => Err(mismatch()),
        }
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, MetaError> {
        match self.call(Call::Watch { prefix: prefix.to_vec(), from }).await? {
            Answer::Watch(w) => Ok(w),
            _ => Err(mismatch()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_is_dropped() {
        let records = vec![Record::LeaseGrant { id: 1, ttl_ms: 10 }, Record::LeaseEnd { id: 1 }];
        let bytes = frame(&records);
        assert_eq!(parse_log(&bytes), Ok((records.clone(), true)));
        assert_eq!(parse_log(&bytes[..bytes.len() - 1]), Ok((records[..1].to_vec(), false)));
        let mut corrupt = bytes.clone();
        *corrupt.last_mut().unwrap() ^= 0xff;
        assert_eq!(parse_log(&corrupt), Ok((records[..1].to_vec(), false)));
    }

    /// A log the previous build wrote (bincode 2, no format byte: one
    /// `LeaseGrant { id: 1, ttl_ms: 2000 }` frame, captured from that build)
    /// is refused with a message naming the log and the record, not dropped
    /// as a torn tail (which would start an empty store over it).
    #[tokio::test]
    async fn a_log_of_the_previous_format_is_refused_not_dropped() {
        let old = [0x00, 0x00, 0x00, 0x05, 0xf7, 0x86, 0xda, 0xab, 0x01, 0x02, 0xfb, 0xd0, 0x07];
        let log = MemMetaLog::default();
        log.append(&old).await.unwrap();
        let Err(e) = MetadataStore::recover(Arc::new(log.clone())).await else {
            panic!("a log of the previous format was recovered");
        };
        let e = e.to_string();
        assert!(e.contains("record 1") && e.contains("older build of Attaché"), "{e}");
        assert_eq!(log.load().await.unwrap(), old, "the log is left as it was");
    }

    #[tokio::test]
    async fn a_log_that_cannot_be_replayed_is_an_error_naming_the_record() {
        let log = MemMetaLog::default();
        let records = [Record::LeaseGrant { id: 4, ttl_ms: 10 }, Record::LeaseGrant { id: 2, ttl_ms: 10 }];
        log.append(&frame(&records)).await.unwrap();
        let Err(e) = MetadataStore::recover(Arc::new(log.clone())).await else {
            panic!("a lease id going back was replayed");
        };
        let msg = e.to_string();
        assert!(msg.contains("the metadata log cannot be replayed: record 2 of 2: "), "{msg}");
        assert!(msg.contains("lease 2 is granted after lease ids reached 5"), "{msg}");
        assert_eq!(log.load().await.unwrap(), frame(&records), "a log that cannot be replayed is left as it was");
    }

    /// A log whose next `fail` appends write half their bytes, then fail
    /// (a short write); rewrites fail while `fail_rewrites` is set.
    #[derive(Clone, Default)]
    struct ShortWrites {
        inner: MemMetaLog,
        fail: Arc<std::sync::atomic::AtomicUsize>,
        fail_rewrites: Arc<std::sync::atomic::AtomicBool>,
    }

    #[async_trait]
    impl MetaLog for ShortWrites {
        async fn load(&self) -> Result<Vec<u8>, MetaError> {
            self.inner.load().await
        }

        async fn append(&self, bytes: &[u8]) -> Result<(), MetaError> {
            use std::sync::atomic::Ordering;
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                self.inner.append(&bytes[..bytes.len() / 2]).await?;
                return Err(MetaError::Storage("short write".into()));
            }
            self.inner.append(bytes).await
        }

        async fn replace(&self, bytes: &[u8]) -> Result<(), MetaError> {
            if self.fail_rewrites.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(MetaError::Storage("rewrite failed".into()));
            }
            self.inner.replace(bytes).await
        }
    }

    fn put(key: &str) -> Call {
        Call::Txn(Txn {
            success: vec![TxnOp::Put { key: key.into(), value: b"v".to_vec(), lease: 0 }],
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_dropped_watch_of_keys_that_never_change_is_forgotten() {
        let mut store = MetadataStore::recover(Arc::new(MemMetaLog::default())).await.unwrap();
        for _ in 0..100 {
            let w = store.call(Call::Watch { prefix: b"quiet/".to_vec(), from: 0 }).await.unwrap();
            drop(w);
        }
        let _live = store.call(Call::Watch { prefix: b"quiet/".to_vec(), from: 0 }).await.unwrap();
        assert_eq!(store.watchers.len(), 1, "dropped watches are kept");
    }

    #[tokio::test]
    async fn no_acknowledged_record_is_appended_after_a_failed_append() {
        use std::sync::atomic::Ordering;
        let log = ShortWrites::default();
        let mut store = MetadataStore::recover(Arc::new(log.clone())).await.unwrap();
        store.call(put("a")).await.unwrap();
        log.fail.store(1, Ordering::SeqCst);
        let e = store.call(put("b")).await.err().expect("the append failed");
        assert!(matches!(&e, MetaError::Unavailable(m) if m.contains("may or may not persist")), "{e}");
        // The next commit cannot rewrite the log: it fails and appends nothing.
        log.fail_rewrites.store(true, Ordering::SeqCst);
        assert!(store.call(put("c")).await.is_err());
        // Once it can, it rewrites the log, then appends.
        log.fail_rewrites.store(false, Ordering::SeqCst);
        store.call(put("d")).await.unwrap();
        let recovered = MetadataStore::recover(Arc::new(log.clone())).await.unwrap();
        let keys: Vec<Vec<u8>> = recovered.sm.range(b"").kvs.into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, vec![b"a".to_vec(), b"d".to_vec()], "every acknowledged record, and nothing else");
        assert!(parse_log(&log.load().await.unwrap()).unwrap().1, "the log holds no partial record");
    }
}
