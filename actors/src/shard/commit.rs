//! One group commit: the staged writes of many requests become one atomic,
//! synced engine batch.
//!
//! Only one group is in flight per shard at a time (the shard actor sees to
//! it), so the records a group replaces are read here, right before its write,
//! and no other writer can change them in between. That is what keeps index
//! entries and the live byte count exact without a read on the request path.
//!
//! Request ids (at-most-once writes): a request that carries a client-chosen
//! id is applied only if the shard holds no record of that id; its ops and the
//! record (`layout::request_key`, `layout::request_time_key`) go in the same
//! batch, so a retry of a write whose reply was lost, sent to this node or to
//! the next primary (which reads the same volume), finds the record and is
//! acknowledged without applying again. Records older than the window
//! (`Limits::request_window_ms`, by the committing primary's wall clock) are
//! removed by later groups, at most [`EXPIRE_PER_GROUP`] per group. This is
//! the client-session table of Raft's linearizable client semantics (Ongaro,
//! "Consensus: Bridging Theory and Practice", 2014, §6.3), kept per shard and
//! bounded by time rather than by client.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crate::engine::{BuildBatch, Engine, EngineError, WriteBatch};
use crate::shard::layout::{self, IndexEntry, ShardMeta, ShardState, META_KEY};

/// A write accepted by the shard and waiting for its group's sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StagedOp {
    /// Put `key` -> `value` with secondary index entries.
    Put {
        /// The user key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The key's index entries; they replace those of the previous record.
        indexes: Vec<IndexEntry>,
    },
    /// Remove `key` and its index entries.
    Delete {
        /// The user key.
        key: Vec<u8>,
    },
    /// Change the shard's state (close, delete).
    SetState(ShardState),
}

impl StagedOp {
    /// Most live bytes this op can add: its data entry and index entries,
    /// before any replaced record is subtracted.
    pub fn max_added_bytes(&self) -> u64 {
        match self {
            StagedOp::Put { key, value, indexes } => {
                let record =
                    1 + value.len() + if indexes.is_empty() { 0 } else { 4 + crate::codec::encode(indexes).len() };
                let index_bytes: usize = indexes.iter().map(|i| index_key_len(&i.name, &i.value, key)).sum();
                (1 + key.len() + record + index_bytes) as u64
            }
            StagedOp::Delete { .. } | StagedOp::SetState(_) => 0,
        }
    }
}

/// Most expired request id records one group commit removes.
pub const EXPIRE_PER_GROUP: usize = 256;

/// The ops of one request, staged together; applied all or none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedRequest {
    /// The client-chosen id that makes a retry a no-op (see the module docs).
    pub request_id: Option<String>,
    /// The ops, in order.
    pub ops: Vec<StagedOp>,
}

/// What a group commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupCommitted {
    /// The shard's meta after it.
    pub meta: ShardMeta,
    /// Bytes written: keys and values of the engine batch.
    pub bytes: u64,
    /// Requests whose id the shard already held (retries), applied not again.
    pub duplicates: usize,
}

fn index_key_len(name: &str, value: &[u8], pk: &[u8]) -> usize {
    let zeros = value.iter().filter(|&&b| b == 0).count();
    1 + 2 + name.len() + value.len() + zeros + 2 + pk.len()
}

fn take_bytes(meta: &mut ShardMeta, bytes: usize) {
    meta.live_bytes = meta
        .live_bytes
        .checked_sub(bytes as u64)
        .expect("live bytes never go below zero: every removed entry was counted when it was written");
}

/// Removes the record `old` stored under `dk` (and its index entries) from the
/// batch and the live counts.
fn remove_record(batch: &mut WriteBatch, meta: &mut ShardMeta, dk: &[u8], old: &[u8]) -> Result<(), EngineError> {
    let (_, old_indexes) = layout::decode_record(old)?;
    let pk = layout::user_key(dk);
    for idx in &old_indexes {
        let ik = layout::index_key(&idx.name, &idx.value, pk);
        take_bytes(meta, ik.len());
        batch.delete(ik);
    }
    take_bytes(meta, dk.len() + old.len());
    meta.live_keys = meta.live_keys.checked_sub(1).expect("a stored record was counted as a live key");
    Ok(())
}

/// The engine keys a group reads before it writes, sorted and without
/// repeats: the records its ops replace and the records of its request ids.
fn group_keys(requests: &[StagedRequest]) -> Vec<Vec<u8>> {
    let mut keys = BTreeSet::new();
    for r in requests {
        keys.extend(r.request_id.as_deref().map(layout::request_key));
        keys.extend(r.ops.iter().filter_map(|op| match op {
            StagedOp::Put { key, .. } | StagedOp::Delete { key } => Some(layout::data_key(key)),
            StagedOp::SetState(_) => None,
        }));
    }
    keys.into_iter().collect()
}

/// The engine batch of `requests` over the current values `olds` of `keys`
/// (see [`group_keys`]), committed at `now_ms`, removing the `expired`
/// request id time keys and their records first; the meta after it, and how
/// many requests were retries of applied ones.
fn build_group(
    meta: &ShardMeta,
    requests: &[StagedRequest],
    now_ms: u64,
    expired: &[Vec<u8>],
    keys: Vec<Vec<u8>>,
    olds: Vec<Option<Vec<u8>>>,
) -> Result<(WriteBatch, ShardMeta, usize), EngineError> {
    assert_eq!(keys.len(), olds.len(), "one current value per key read");
    let mut current: BTreeMap<Vec<u8>, Option<Vec<u8>>> = keys.into_iter().zip(olds).collect();
    let mut meta = meta.clone();
    let mut batch = WriteBatch::new();
    for time_key in expired {
        let id = layout::request_id_of_time_key(time_key)?;
        batch.delete(time_key.clone());
        batch.delete(layout::request_key(id));
    }
    let mut duplicates = 0;
    for request in requests {
        if let Some(id) = &request.request_id {
            let slot = current.get_mut(&layout::request_key(id)).expect("every request id was read");
            if slot.is_some() {
                duplicates += 1;
                continue;
            }
            *slot = Some(now_ms.to_be_bytes().to_vec());
            batch.put(layout::request_key(id), now_ms.to_be_bytes().to_vec());
            batch.put(layout::request_time_key(now_ms, id), Vec::new());
        }
        apply_ops(&mut batch, &mut meta, &mut current, &request.ops)?;
    }
    batch.put(META_KEY, meta.encode());
    Ok((batch, meta, duplicates))
}

/// Adds `ops` to `batch` over the records in `current`, which it updates.
fn apply_ops(
    batch: &mut WriteBatch,
    meta: &mut ShardMeta,
    current: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    ops: &[StagedOp],
) -> Result<(), EngineError> {
    for op in ops {
        match op {
            StagedOp::Put { key, value, indexes } => {
                let dk = layout::data_key(key);
                let slot = current.get_mut(&dk).expect("every staged key was read");
                if let Some(old) = slot.take() {
                    remove_record(batch, meta, &dk, &old)?;
                }
                for idx in indexes {
                    let ik = layout::index_key(&idx.name, &idx.value, key);
                    meta.live_bytes += ik.len() as u64;
                    batch.put(ik, Vec::new());
                }
                let record = layout::encode_record(value, indexes);
                meta.live_bytes += (dk.len() + record.len()) as u64;
                meta.live_keys += 1;
                batch.put(dk, record.clone());
                *slot = Some(record);
            }
            StagedOp::Delete { key } => {
                let dk = layout::data_key(key);
                let slot = current.get_mut(&dk).expect("every staged key was read");
                if let Some(old) = slot.take() {
                    remove_record(batch, meta, &dk, &old)?;
                    batch.delete(dk);
                }
            }
            StagedOp::SetState(state) => meta.state = *state,
        }
    }
    Ok(())
}

/// Writes `requests` on top of the shard whose committed meta is `meta`, as
/// one synced batch committed at `now_ms` (the primary's wall clock, ms
/// since the Unix epoch), skipping requests whose id the shard already
/// holds and removing request id records older than `window_ms`. The
/// records the group replaces are read and the batch written in one engine
/// call (`Engine::read_then_write`).
///
/// Errors: those of the engine's reads and write; on error nothing of the
/// group was written, except after `EngineError::Indeterminate` (its sync
/// failed: the group may be durable).
pub async fn apply_group(
    engine: &dyn Engine,
    meta: &ShardMeta,
    requests: Arc<Vec<StagedRequest>>,
    now_ms: u64,
    window_ms: u64,
) -> Result<GroupCommitted, EngineError> {
    let (start, end) = layout::request_times_before(now_ms.saturating_sub(window_ms));
    let expired: Vec<Vec<u8>> =
        engine.scan(&start, Some(&end), EXPIRE_PER_GROUP).await?.into_iter().map(|(k, _)| k).collect();
    let keys = group_keys(&requests);
    let out = Arc::new(Mutex::new(None));
    let (slot, meta) = (out.clone(), meta.clone());
    let build: BuildBatch = Box::new(move |keys, olds| {
        let (batch, after, duplicates) = build_group(&meta, &requests, now_ms, &expired, keys, olds)?;
        *slot.lock().expect("commit slot") =
            Some(GroupCommitted { meta: after, bytes: batch.byte_size() as u64, duplicates });
        Ok(batch)
    });
    engine.read_then_write(keys, build, true).await?;
    let result = out.lock().expect("commit slot").take();
    Ok(result.expect("a successful write built its batch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineFactory, OpenMode};
    use crate::mem_engine::MemEngineFactory;

    fn put(key: &str, value: &str, idx: &[(&str, &str)]) -> StagedOp {
        StagedOp::Put {
            key: key.into(),
            value: value.into(),
            indexes: idx
                .iter()
                .map(|(n, v)| IndexEntry { name: n.to_string(), value: v.as_bytes().to_vec() })
                .collect(),
        }
    }

    /// The live byte count equals the bytes of the entries in the engine,
    /// through overwrites, index changes and deletes.
    #[tokio::test]
    async fn live_bytes_track_engine_contents() {
        let engine = MemEngineFactory::new().open("/v/s".as_ref(), OpenMode::ReadWrite { create: true }).await.unwrap();
        let mut meta = ShardMeta::new(1, "c".into(), 1 << 20);
        let groups = vec![
            vec![put("a", "1", &[("x", "p")]), put("b", "22", &[])],
            vec![put("a", "333", &[("x", "q"), ("y", "r")]), put("a", "4", &[("x", "q")])],
            vec![StagedOp::Delete { key: "b".into() }, StagedOp::Delete { key: "zz".into() }],
        ];
        for (i, ops) in groups.into_iter().enumerate() {
            // Request ids are stored beside the data but not counted as live bytes.
            let request = StagedRequest { request_id: Some(format!("req-{i}")), ops: ops.clone() };
            meta = apply_group(&*engine, &meta, Arc::new(vec![request]), 1_000, WINDOW).await.unwrap().meta;
            let all = engine.scan(b"", None, usize::MAX).await.unwrap();
            let stored: u64 =
                all.iter().filter(|(k, _)| k[0] == b'd' || k[0] == b'i').map(|(k, v)| (k.len() + v.len()) as u64).sum();
            assert_eq!(meta.live_bytes, stored);
            for op in &ops {
                if let StagedOp::Put { .. } = op {
                    assert!(op.max_added_bytes() > 0);
                }
            }
        }
        assert_eq!(meta.live_keys, 1);
        let idx = engine.scan(b"i", Some(b"j"), 10).await.unwrap();
        assert_eq!(idx.len(), 1, "only a's current entry x=q is left: {idx:?}");
        assert_eq!(layout::split_index_key("x", &idx[0].0).unwrap(), (b"q".to_vec(), b"a".to_vec()));
    }

    /// The staging estimate never undercounts what a put adds.
    #[tokio::test]
    async fn max_added_bytes_is_exact_for_new_keys() {
        let engine = MemEngineFactory::new().open("/v/s".as_ref(), OpenMode::ReadWrite { create: true }).await.unwrap();
        let meta = ShardMeta::new(1, "c".into(), 1 << 20);
        let op = put("key", "value", &[("n", "v\0"), ("m", "w")]);
        let after = apply_group(&*engine, &meta, one(None, vec![op.clone()]), 0, WINDOW).await.unwrap();
        assert_eq!(after.meta.live_bytes, op.max_added_bytes());
    }

    const WINDOW: u64 = 600_000;

    fn one(request_id: Option<&str>, ops: Vec<StagedOp>) -> Arc<Vec<StagedRequest>> {
        Arc::new(vec![StagedRequest { request_id: request_id.map(str::to_string), ops }])
    }

    async fn value(engine: &dyn Engine, key: &str) -> Option<Vec<u8>> {
        let record = engine.get(&layout::data_key(key.as_bytes())).await.unwrap()?;
        Some(layout::record_value(&record).unwrap())
    }

    /// The lost-reply retry: put(k, v1) with id A applies, put(k, v2) with id
    /// B applies, the retry of A finds A's record and applies nothing; within
    /// one group too. A request without an id always applies.
    #[tokio::test]
    async fn a_request_id_applies_once() {
        let engine = MemEngineFactory::new().open("/v/s".as_ref(), OpenMode::ReadWrite { create: true }).await.unwrap();
        let mut meta = ShardMeta::new(1, "c".into(), 1 << 20);
        for (id, v, dups) in [(Some("A"), "v1", 0), (Some("B"), "v2", 0), (Some("A"), "v1", 1)] {
            let r = apply_group(&*engine, &meta, one(id, vec![put("k", v, &[])]), 5_000, WINDOW).await.unwrap();
            assert_eq!(r.duplicates, dups, "{id:?}");
            meta = r.meta;
        }
        assert_eq!(value(&*engine, "k").await.unwrap(), b"v2", "the retry of A did not apply v1 again");
        let group = Arc::new(vec![
            StagedRequest { request_id: Some("C".into()), ops: vec![put("k", "v3", &[])] },
            StagedRequest { request_id: Some("D".into()), ops: vec![put("k", "v4", &[])] },
            StagedRequest { request_id: Some("C".into()), ops: vec![put("k", "v3", &[])] },
        ]);
        let r = apply_group(&*engine, &meta, group, 5_001, WINDOW).await.unwrap();
        assert_eq!(r.duplicates, 1);
        assert_eq!(value(&*engine, "k").await.unwrap(), b"v4");
        let r = apply_group(&*engine, &r.meta, one(None, vec![put("k", "v5", &[])]), 5_002, WINDOW).await.unwrap();
        let r = apply_group(&*engine, &r.meta, one(None, vec![put("k", "v5", &[])]), 5_003, WINDOW).await.unwrap();
        assert_eq!(r.duplicates, 0);
        assert_eq!(r.meta.live_keys, 1);
    }

    /// Records older than the window are removed by a later group (at most
    /// `EXPIRE_PER_GROUP` each), after which the same id applies again;
    /// records inside the window stay.
    #[tokio::test]
    async fn request_ids_expire_after_the_window() {
        let engine = MemEngineFactory::new().open("/v/s".as_ref(), OpenMode::ReadWrite { create: true }).await.unwrap();
        let mut meta = ShardMeta::new(1, "c".into(), 1 << 20);
        for i in 0..300u64 {
            let ops = vec![put(&format!("k{i}"), "v", &[])];
            meta =
                apply_group(&*engine, &meta, one(Some(&format!("id-{i}")), ops), 1_000 + i, WINDOW).await.unwrap().meta;
        }
        let records = |e: Arc<dyn Engine>| async move { e.scan(b"r", Some(b"s"), usize::MAX).await.unwrap().len() };
        assert_eq!(records(engine.clone()).await, 300);
        // At 1_000 + WINDOW + 100, ids 0..100 are past the window: all removed
        // (under the per-group cap), the others kept.
        let now = 1_000 + WINDOW + 100;
        meta = apply_group(&*engine, &meta, one(None, vec![put("x", "v", &[])]), now, WINDOW).await.unwrap().meta;
        assert_eq!(records(engine.clone()).await, 200);
        assert_eq!(engine.scan(b"q", Some(b"r"), usize::MAX).await.unwrap().len(), 200);
        // Long after: at most EXPIRE_PER_GROUP go per group.
        let later = now + 10 * WINDOW;
        meta = apply_group(&*engine, &meta, one(None, vec![]), later, WINDOW).await.unwrap().meta;
        assert_eq!(records(engine.clone()).await, 200 - EXPIRE_PER_GROUP.min(200));
        // A past-window id applies again: id-0's record is gone.
        let r = apply_group(&*engine, &meta, one(Some("id-0"), vec![put("k0", "again", &[])]), later, WINDOW)
            .await
            .unwrap();
        assert_eq!(r.duplicates, 0);
        assert_eq!(value(&*engine, "k0").await.unwrap(), b"again");
    }
}
