//! `EmbeddedBackend`: the default metadata backend, in process, persisted
//! through a [`MetaLog`] (a file with fsync in production, a simulated disk in
//! the simulation, memory in tests).
//!
//! Each change is planned on the [`StateMachine`], written to the log as a
//! framed record (`u32be len ++ u32be crc32 ++ codec(record)`) and synced,
//! then applied and published to watchers; a change is acknowledged only after
//! its record is durable. Recovery replays the log, stopping at the first torn
//! or corrupt record (an append that never completed), then compacts it into
//! one snapshot record. Lease expiry reads the tokio clock (madsim's in the
//! simulation), checked on every call and by a sweeper task every
//! [`SWEEP_INTERVAL`]; after a restart every lease gets its full TTL again,
//! as etcd does.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use tokio::sync::{mpsc, Mutex};
use tokio::time::{Duration, Instant};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::codec;
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

/// Frames records for the log.
fn frame(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        codec::frame(&mut out, &codec::encode(r));
    }
    out
}

/// Parses framed records; stops at the first incomplete or corrupt one.
/// Returns the records and whether the whole input was valid.
pub fn parse_log(bytes: &[u8]) -> (Vec<Record>, bool) {
    let (payloads, valid) = codec::frames(bytes);
    let mut records = Vec::with_capacity(payloads.len());
    for p in payloads {
        match codec::decode::<Record>(p, "metadata log record") {
            Ok(r) => records.push(r),
            Err(_) => return (records, false),
        }
    }
    (records, valid == bytes.len())
}

/// A live watch: its key prefix and where its events go.
type Watcher = (Vec<u8>, mpsc::UnboundedSender<Result<WatchEvent, MetaError>>);

struct Inner {
    sm: StateMachine,
    watchers: Vec<Watcher>,
    records_since_snapshot: usize,
}

/// The embedded backend; see the module docs.
pub struct EmbeddedBackend {
    inner: Mutex<Inner>,
    log: Arc<dyn MetaLog>,
}

impl EmbeddedBackend {
    /// Opens the store on `log`, recovering what it holds, and starts the
    /// lease sweeper (a tokio task that ends when the store is dropped).
    ///
    /// Errors: `Storage` when the log cannot be read or rewritten.
    pub async fn open(log: Arc<dyn MetaLog>) -> Result<Arc<Self>, MetaError> {
        let bytes = log.load().await?;
        let (records, clean) = parse_log(&bytes);
        if !clean {
            tracing::warn!(records = records.len(), "metadata log ends in a torn or corrupt record; dropping it");
        }
        let mut sm = StateMachine::default();
        let now = Instant::now();
        for r in &records {
            sm.apply(r, now);
        }
        // Compact on open: this also cuts off a torn tail before anything is appended after it.
        log.replace(&frame(&[Record::Snapshot(sm.snapshot())])).await?;
        tracing::info!(revision = sm.revision(), records = records.len(), "metadata store recovered");
        let backend = Arc::new(EmbeddedBackend {
            inner: Mutex::new(Inner { sm, watchers: Vec::new(), records_since_snapshot: 0 }),
            log,
        });
        let weak = Arc::downgrade(&backend);
        tokio::spawn(sweep(weak));
        Ok(backend)
    }

    /// Logs `records` (synced), then applies them and publishes their events.
    async fn commit(&self, inner: &mut Inner, records: Vec<Record>) -> Result<(), MetaError> {
        if records.is_empty() {
            return Ok(());
        }
        self.log.append(&frame(&records)).await?;
        let now = Instant::now();
        for r in &records {
            let events = inner.sm.apply(r, now);
            for e in events {
                inner.watchers.retain(|(prefix, tx)| !e.key().starts_with(prefix) || tx.send(Ok(e.clone())).is_ok());
            }
        }
        inner.records_since_snapshot += records.len();
        if inner.records_since_snapshot >= COMPACT_AFTER_RECORDS {
            self.log.replace(&frame(&[Record::Snapshot(inner.sm.snapshot())])).await?;
            inner.records_since_snapshot = 0;
        }
        Ok(())
    }

    /// Locks the state after ending every lease expired by now.
    async fn lock(&self) -> Result<tokio::sync::MutexGuard<'_, Inner>, MetaError> {
        let mut inner = self.inner.lock().await;
        let expired = inner.sm.expired(Instant::now());
        self.commit(&mut inner, expired).await?;
        Ok(inner)
    }
}

async fn sweep(store: Weak<EmbeddedBackend>) {
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        let Some(store) = store.upgrade() else { return };
        let swept = store.lock().await.map(drop);
        if let Err(e) = swept {
            tracing::warn!(error = %e, "metadata lease sweep failed");
        }
    }
}

#[async_trait]
impl MetadataBackend for EmbeddedBackend {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, MetaError> {
        Ok(self.lock().await?.sm.get(key))
    }

    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, MetaError> {
        Ok(self.lock().await?.sm.range(prefix))
    }

    async fn put(&self, key: &[u8], value: &[u8], lease: LeaseId) -> Result<Revision, MetaError> {
        let txn =
            Txn { success: vec![TxnOp::Put { key: key.to_vec(), value: value.to_vec(), lease }], ..Default::default() };
        Ok(self.txn(txn).await?.revision)
    }

    async fn delete(&self, key: &[u8]) -> Result<(bool, Revision), MetaError> {
        let txn = Txn { success: vec![TxnOp::Delete { key: key.to_vec() }], ..Default::default() };
        let mut inner = self.lock().await?;
        let before = inner.sm.revision();
        let (resp, record) = inner.sm.plan_txn(&txn)?;
        self.commit(&mut inner, record.into_iter().collect()).await?;
        Ok((resp.revision > before, resp.revision))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, MetaError> {
        let mut inner = self.lock().await?;
        let (resp, record) = inner.sm.plan_txn(&txn)?;
        self.commit(&mut inner, record.into_iter().collect()).await?;
        Ok(resp)
    }

    async fn lease_grant(&self, ttl_ms: u64) -> Result<LeaseId, MetaError> {
        let mut inner = self.lock().await?;
        let record = inner.sm.grant(ttl_ms)?;
        let Record::LeaseGrant { id, .. } = record else { unreachable!("grant makes a LeaseGrant") };
        self.commit(&mut inner, vec![record]).await?;
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<u64, MetaError> {
        self.lock().await?.sm.keep_alive(lease, Instant::now())
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), MetaError> {
        let mut inner = self.lock().await?;
        if inner.sm.lease_ttl(lease).is_none() {
            return Err(MetaError::LeaseNotFound(lease));
        }
        self.commit(&mut inner, vec![Record::LeaseEnd { id: lease }]).await
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, MetaError> {
        let mut inner = self.lock().await?;
        let from = if from <= 0 { inner.sm.revision() + 1 } else { from };
        let past = inner.sm.history_since(prefix, from)?;
        let (tx, rx) = mpsc::unbounded_channel();
        for e in past {
            let _ = tx.send(Ok(e));
        }
        inner.watchers.push((prefix.to_vec(), tx));
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_is_dropped() {
        let records = vec![Record::LeaseGrant { id: 1, ttl_ms: 10 }, Record::LeaseEnd { id: 1 }];
        let bytes = frame(&records);
        assert_eq!(parse_log(&bytes), (records.clone(), true));
        assert_eq!(parse_log(&bytes[..bytes.len() - 1]), (records[..1].to_vec(), false));
        let mut corrupt = bytes.clone();
        *corrupt.last_mut().unwrap() ^= 0xff;
        assert_eq!(parse_log(&corrupt), (records[..1].to_vec(), false));
    }
}
