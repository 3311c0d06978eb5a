//! One group commit: the staged writes of many requests become one atomic,
//! synced engine batch.
//!
//! A group is prepared ([`prepare_group`]: the records it replaces read, its
//! batch built) and then written. The shard actor keeps at most two groups
//! in flight: one being written and the next prepared on top of it, its
//! reads corrected by the first one's [`Overlay`], and written only after
//! the first one's write succeeded. No other writer changes the records in
//! between, which keeps index entries and the live byte count exact
//! without a read on the request path.
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
use std::sync::Arc;

use crate::engine::{BatchOp, Engine, EngineError, WriteBatch};
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
    batch.sort_by_key();
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

/// What one group's batch leaves under each key it touches: the value
/// after it, `None` where it deletes. The next group is prepared on top of
/// it while this one is still being written (see [`prepare_group`]).
#[derive(Debug, Default)]
pub struct Overlay(BTreeMap<Vec<u8>, Option<Vec<u8>>>);

impl Overlay {
    /// The overlay of `batch`: for each key, its last op.
    fn of(batch: &WriteBatch) -> Self {
        let mut ops: Vec<&BatchOp> = batch.ops().iter().collect();
        // Stable: the ops on one key stay in batch order, the last one last.
        ops.sort_by(|a, b| a.key().cmp(b.key()));
        let mut after: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(ops.len());
        for op in ops {
            let value = match op {
                BatchOp::Put { value, .. } => Some(value.clone()),
                BatchOp::Delete { .. } => None,
            };
            match after.last_mut() {
                Some((key, last)) if key.as_slice() == op.key() => *last = value,
                _ => after.push((op.key().to_vec(), value)),
            }
        }
        // Sorted without repeats: built in one pass.
        Overlay(after.into_iter().collect())
    }

    /// Whether the batch deletes `key`.
    fn deletes(&self, key: &[u8]) -> bool {
        matches!(self.0.get(key), Some(None))
    }
}

/// A group ready to be written: its engine batch, what it commits, and its
/// [`Overlay`] for the group prepared after it.
#[derive(Debug)]
pub struct PreparedGroup {
    /// The engine batch: the group's ops, request id records, expired ids removed, meta.
    pub batch: WriteBatch,
    /// The meta after it, its bytes, its retries.
    pub committed: GroupCommitted,
    /// What the batch changes.
    pub overlay: Arc<Overlay>,
}

/// Prepares `requests` as one engine batch committed at `now_ms` (the
/// primary's wall clock, ms since the Unix epoch): reads the records the
/// group replaces and the records of its request ids, skips requests whose
/// id the shard already holds, and removes request id records older than
/// `window_ms` (at most [`EXPIRE_PER_GROUP`]). Writes nothing.
///
/// `meta` is the shard's meta before the group. `pending` is the overlay
/// of the one group that may still be being written (its write returned
/// neither success nor failure yet; `meta` is then the meta after it): the
/// engine's reads may or may not show that group yet, and `pending` says
/// what they will show once it landed. The caller writes the result only
/// after that group's write succeeded, and drops it if that write failed:
/// the batch is only right on top of it. Pipelining this way lets the
/// reads and build of group N + 1 run during the sync of group N, as a
/// database pipelines its WAL writes (RocksDB's pipelined write;
/// PostgreSQL's WAL insertion during a flush).
///
/// Errors: those of the engine's reads, and `Corruption` when a stored
/// record does not decode. Nothing is written either way.
pub async fn prepare_group(
    engine: &dyn Engine,
    meta: &ShardMeta,
    pending: Option<&Overlay>,
    requests: &[StagedRequest],
    now_ms: u64,
    window_ms: u64,
) -> Result<PreparedGroup, EngineError> {
    let (start, end) = layout::request_times_before(now_ms.saturating_sub(window_ms));
    // The pending group removes some of the oldest expired ids; the reads
    // may still show them, so read as many more as it removes.
    let removed = pending.map_or(0, |p| p.0.range(start.clone()..end.clone()).filter(|(_, v)| v.is_none()).count());
    let expired: Vec<Vec<u8>> = engine
        .scan(&start, Some(&end), EXPIRE_PER_GROUP + removed)
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !pending.is_some_and(|p| p.deletes(k)))
        .take(EXPIRE_PER_GROUP)
        .collect();
    let keys = group_keys(requests);
    let mut olds = if keys.is_empty() { Vec::new() } else { engine.multi_get(keys.clone()).await? };
    if let Some(pending) = pending {
        for (key, old) in keys.iter().zip(olds.iter_mut()) {
            if let Some(after) = pending.0.get(key) {
                old.clone_from(after);
            }
        }
    }
    let (batch, after, duplicates) = build_group(meta, requests, now_ms, &expired, keys, olds)?;
    let committed = GroupCommitted { meta: after, bytes: batch.byte_size() as u64, duplicates };
    let overlay = Arc::new(Overlay::of(&batch));
    Ok(PreparedGroup { batch, committed, overlay })
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

    proptest::proptest! {
        /// Sorting a batch by key leaves what it does unchanged, and its
        /// overlay holds each key's last op, as the batch applied in its
        /// original order leaves it.
        #[test]
        fn sorted_batch_and_overlay_match_the_batch_in_order(
            ops in proptest::collection::vec((0u8..6, proptest::option::of(0u8..4)), 0..40)
        ) {
            let mut batch = WriteBatch::new();
            for (key, value) in &ops {
                match value {
                    Some(v) => batch.put(vec![*key], vec![*v]),
                    None => batch.delete(vec![*key]),
                }
            }
            let mut in_order = BTreeMap::new();
            let mut last_ops = BTreeMap::new();
            crate::mem_engine::apply_batch(&mut in_order, &batch);
            for (key, value) in &ops {
                last_ops.insert(vec![*key], value.map(|v| vec![v]));
            }
            let mut sorted = batch.clone();
            sorted.sort_by_key();
            let mut applied = BTreeMap::new();
            crate::mem_engine::apply_batch(&mut applied, &sorted);
            proptest::prop_assert_eq!(&applied, &in_order);
            proptest::prop_assert_eq!(sorted.byte_size(), batch.byte_size());
            proptest::prop_assert!(sorted.ops().windows(2).all(|w| w[0].key() <= w[1].key()));
            proptest::prop_assert_eq!(&Overlay::of(&batch).0, &last_ops);
            proptest::prop_assert_eq!(&Overlay::of(&sorted).0, &last_ops);
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

    /// Prepares and writes one group with none in flight, as the shard does.
    async fn apply_group(
        engine: &dyn Engine,
        meta: &ShardMeta,
        requests: Arc<Vec<StagedRequest>>,
        now_ms: u64,
        window_ms: u64,
    ) -> Result<GroupCommitted, EngineError> {
        let prepared = prepare_group(engine, meta, None, &requests, now_ms, window_ms).await?;
        engine.write(prepared.batch, true).await?;
        Ok(prepared.committed)
    }

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

    /// A group prepared on top of one not yet written (its overlay passed
    /// as pending), whether the engine's reads show the first one or not,
    /// then written after it, leaves the engine and the meta exactly as the
    /// two groups prepared and written one after the other: replaced
    /// records and their index entries, request ids (a retry in the second
    /// group of an id the first applies), expired ids, live counts.
    #[tokio::test]
    async fn a_group_prepared_on_top_of_one_in_flight_commits_as_if_after_it() {
        let first = || {
            Arc::new(vec![
                StagedRequest { request_id: Some("A".into()), ops: vec![put("k", "v1", &[("x", "p")])] },
                StagedRequest { request_id: None, ops: vec![StagedOp::Delete { key: "gone".into() }] },
            ])
        };
        let second = || {
            Arc::new(vec![
                StagedRequest { request_id: Some("A".into()), ops: vec![put("k", "retry", &[])] },
                StagedRequest { request_id: Some("B".into()), ops: vec![put("k", "v2", &[("x", "q")])] },
                StagedRequest { request_id: None, ops: vec![put("gone", "back", &[("y", "r")])] },
            ])
        };
        // Before both: k and gone hold records with index entries, and an
        // id committed long ago is past the window at `NOW`.
        const NOW: u64 = 10 * WINDOW;
        let setup = || async {
            let engine =
                MemEngineFactory::new().open("/v/s".as_ref(), OpenMode::ReadWrite { create: true }).await.unwrap();
            let meta = ShardMeta::new(1, "c".into(), 1 << 20);
            let ops = vec![put("k", "v0", &[("x", "o")]), put("gone", "g", &[("y", "z")])];
            let meta = apply_group(&*engine, &meta, one(Some("old"), ops), 1_000, WINDOW).await.unwrap().meta;
            (engine, meta)
        };
        let dump = |e: Arc<dyn Engine>| async move { e.scan(b"", None, usize::MAX).await.unwrap() };

        let (serial, meta) = setup().await;
        let a = apply_group(&*serial, &meta, first(), NOW, WINDOW).await.unwrap();
        let b = apply_group(&*serial, &a.meta, second(), NOW + 1, WINDOW).await.unwrap();
        assert_eq!(b.duplicates, 1, "the retry of A is not applied again");
        assert_eq!(value(&*serial, "k").await.unwrap(), b"v2");

        for first_lands_before_second_reads in [false, true] {
            let (engine, meta) = setup().await;
            let n = prepare_group(&*engine, &meta, None, &first(), NOW, WINDOW).await.unwrap();
            let batch = n.batch.clone();
            if first_lands_before_second_reads {
                engine.write(batch.clone(), true).await.unwrap();
            }
            let m =
                prepare_group(&*engine, &n.committed.meta, Some(&n.overlay), &second(), NOW + 1, WINDOW).await.unwrap();
            if !first_lands_before_second_reads {
                engine.write(batch, true).await.unwrap();
            }
            engine.write(m.batch, true).await.unwrap();
            assert_eq!(m.committed, b, "landed first: {first_lands_before_second_reads}");
            assert_eq!(dump(engine.clone()).await, dump(serial.clone()).await);
        }
    }

    /// A group prepared on top of one that removes expired ids, while the
    /// engine does not show that yet, removes the next ones, not the same:
    /// expiry keeps its pace of `EXPIRE_PER_GROUP` per group.
    #[tokio::test]
    async fn a_pipelined_group_removes_the_next_expired_ids() {
        let engine = MemEngineFactory::new().open("/v/s".as_ref(), OpenMode::ReadWrite { create: true }).await.unwrap();
        let mut meta = ShardMeta::new(1, "c".into(), 1 << 20);
        let ids = 2 * EXPIRE_PER_GROUP + 88;
        for i in 0..ids {
            meta = apply_group(&*engine, &meta, one(Some(&format!("id-{i}")), vec![]), 1_000 + i as u64, WINDOW)
                .await
                .unwrap()
                .meta;
        }
        let now = 10 * WINDOW;
        let n = prepare_group(&*engine, &meta, None, &one(None, vec![]), now, WINDOW).await.unwrap();
        let m = prepare_group(&*engine, &n.committed.meta, Some(&n.overlay), &one(None, vec![]), now, WINDOW)
            .await
            .unwrap();
        engine.write(n.batch, true).await.unwrap();
        engine.write(m.batch, true).await.unwrap();
        assert_eq!(engine.scan(b"q", Some(b"r"), usize::MAX).await.unwrap().len(), 88);
        assert_eq!(engine.scan(b"r", Some(b"s"), usize::MAX).await.unwrap().len(), 88);
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
