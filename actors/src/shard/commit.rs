//! One group commit: the staged writes of many requests become one atomic,
//! synced engine batch.
//!
//! Only one group is in flight per shard at a time (the shard actor sees to
//! it), so the records a group replaces are read here, right before its write,
//! and no other writer can change them in between. That is what keeps index
//! entries and the live byte count exact without a read on the request path.

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

/// The engine keys of the records `ops` replace, sorted and without repeats.
fn group_keys(ops: &[StagedOp]) -> Vec<Vec<u8>> {
    let keys: BTreeSet<Vec<u8>> = ops
        .iter()
        .filter_map(|op| match op {
            StagedOp::Put { key, .. } | StagedOp::Delete { key } => Some(layout::data_key(key)),
            StagedOp::SetState(_) => None,
        })
        .collect();
    keys.into_iter().collect()
}

/// The engine batch of `ops` over records `olds` (the current values of
/// `keys`), and the meta after it.
fn build_group(
    meta: &ShardMeta,
    ops: &[StagedOp],
    keys: Vec<Vec<u8>>,
    olds: Vec<Option<Vec<u8>>>,
) -> Result<(WriteBatch, ShardMeta), EngineError> {
    assert_eq!(keys.len(), olds.len(), "one current value per key read");
    let mut current: BTreeMap<Vec<u8>, Option<Vec<u8>>> = keys.into_iter().zip(olds).collect();
    let mut meta = meta.clone();
    let mut batch = WriteBatch::new();
    for op in ops {
        match op {
            StagedOp::Put { key, value, indexes } => {
                let dk = layout::data_key(key);
                let slot = current.get_mut(&dk).expect("every staged key was read");
                if let Some(old) = slot.take() {
                    remove_record(&mut batch, &mut meta, &dk, &old)?;
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
                    remove_record(&mut batch, &mut meta, &dk, &old)?;
                    batch.delete(dk);
                }
            }
            StagedOp::SetState(state) => meta.state = *state,
        }
    }
    batch.put(META_KEY, meta.encode());
    Ok((batch, meta))
}

/// Writes `ops` on top of the shard whose committed meta is `meta`, as one
/// synced batch, and returns the new meta and the bytes written (keys and
/// values of the engine batch). The records the group replaces are read and
/// the batch written in one engine call (`Engine::read_then_write`).
///
/// Errors: those of the engine's read and write; on error nothing of the
/// group was written.
pub async fn apply_group(
    engine: &dyn Engine,
    meta: &ShardMeta,
    ops: Arc<Vec<StagedOp>>,
) -> Result<(ShardMeta, u64), EngineError> {
    let keys = group_keys(&ops);
    let out = Arc::new(Mutex::new(None));
    let (slot, meta) = (out.clone(), meta.clone());
    let build: BuildBatch = Box::new(move |keys, olds| {
        let (batch, after) = build_group(&meta, &ops, keys, olds)?;
        *slot.lock().expect("commit slot") = Some((after, batch.byte_size() as u64));
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
        for ops in groups {
            meta = apply_group(&*engine, &meta, Arc::new(ops.clone())).await.unwrap().0;
            let all = engine.scan(b"", None, usize::MAX).await.unwrap();
            let stored: u64 =
                all.iter().filter(|(k, _)| k.as_slice() != META_KEY).map(|(k, v)| (k.len() + v.len()) as u64).sum();
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
        let after = apply_group(&*engine, &meta, Arc::new(vec![op.clone()])).await.unwrap();
        assert_eq!(after.0.live_bytes, op.max_added_bytes());
    }
}
