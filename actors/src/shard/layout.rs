//! How a shard lays its data out in its engine: three key spaces, one engine.
//!
//! - `d` ++ user key -> record: `0x00 ++ value` (no index entries) or
//!   `0x01 ++ u32be(n) ++ codec(index entries) [n bytes] ++ value`.
//! - `i` ++ u16be(len name) ++ name ++ escaped(index value) ++ `00 01` ++
//!   primary key -> empty. The escaping (each `00` byte of the value becomes
//!   `00 ff`, as in FoundationDB's tuple layer encoding of byte strings) keeps
//!   entries ordered by (value, primary key), keeps a value prefix a key
//!   prefix, and lets every entry decode back whatever bytes it holds.
//! - `m` -> codec([`ShardMeta`]): owner, state, limit and live size, written in
//!   the same atomic batch as the data it describes.
//! - `r` ++ request id -> u64be(commit time, ms since the Unix epoch), and
//!   `q` ++ u64be(commit time) ++ request id -> empty: the request ids of
//!   applied writes, and the same ordered by time so the expired ones are
//!   found by a range scan (see [`crate::shard::commit`]). Not counted in the
//!   live bytes.
//!
//! A put, its index entries, the removal of the index entries of the value it
//! replaces, its request id and the new meta go in one engine batch, so they
//! land together or not at all.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::engine::EngineError;

/// The key of the shard's [`ShardMeta`].
pub const META_KEY: &[u8] = b"m";
const DATA_TAG: u8 = b'd';
const INDEX_TAG: u8 = b'i';
const REQUEST_TAG: u8 = b'r';
const REQUEST_TIME_TAG: u8 = b'q';

/// A shard's lifecycle state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardState {
    /// Accepts reads and writes.
    Active,
    /// Closed: accepts reads only.
    ReadOnly,
    /// Deleted: its data is being removed.
    Deleted,
}

impl ShardState {
    /// Lower-case name for messages and CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Active => "active",
            ShardState::ReadOnly => "read-only",
            ShardState::Deleted => "deleted",
        }
    }
}

/// What a shard persists about itself, in its own engine under [`META_KEY`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Format version of this struct.
    pub version: u32,
    /// The shard id, unique across the cluster.
    pub shard_id: u64,
    /// The client id that owns the shard.
    pub owner: String,
    /// Lifecycle state.
    pub state: ShardState,
    /// Most live bytes the shard may hold.
    pub size_limit: u64,
    /// Live bytes: engine key + value bytes of every data and index entry.
    pub live_bytes: u64,
    /// Live user keys.
    pub live_keys: u64,
}

impl ShardMeta {
    /// Meta of a new, empty, active shard.
    pub fn new(shard_id: u64, owner: String, size_limit: u64) -> Self {
        ShardMeta { version: 1, shard_id, owner, state: ShardState::Active, size_limit, live_bytes: 0, live_keys: 0 }
    }

    /// Encoded form, for the engine.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decodes meta. Errors: `Corruption`.
    pub fn decode(bytes: &[u8]) -> Result<Self, EngineError> {
        codec::decode(bytes, "shard meta").map_err(EngineError::Corruption)
    }
}

/// A secondary index entry of a put: `name`, `value` -> the put's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Index name, such as `by-email`.
    pub name: String,
    /// Indexed value.
    pub value: Vec<u8>,
}

/// Engine key of user key `key`.
pub fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DATA_TAG);
    k.extend_from_slice(key);
    k
}

/// The engine key range `[start, end)` of user keys `[start, end)`; an empty
/// `end` means no upper bound.
pub fn data_range(start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let upper = if end.is_empty() { vec![DATA_TAG + 1] } else { data_key(end) };
    (data_key(start), upper)
}

/// The user key of an engine data key.
pub fn user_key(engine_key: &[u8]) -> &[u8] {
    debug_assert_eq!(engine_key.first(), Some(&DATA_TAG));
    &engine_key[1..]
}

/// Engine key of the record of applied request `id`.
pub fn request_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(REQUEST_TAG);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Engine key of request `id` applied at `at_ms`, in the time-ordered space.
pub fn request_time_key(at_ms: u64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + id.len());
    k.push(REQUEST_TIME_TAG);
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The engine key range `[start, end)` of requests applied before `before_ms`.
pub fn request_times_before(before_ms: u64) -> (Vec<u8>, Vec<u8>) {
    let mut end = vec![REQUEST_TIME_TAG];
    end.extend_from_slice(&before_ms.to_be_bytes());
    (vec![REQUEST_TIME_TAG], end)
}

/// The request id of a key of [`request_time_key`]. Errors: `Corruption`
/// for a key of another shape.
pub fn request_id_of_time_key(key: &[u8]) -> Result<&str, EngineError> {
    match key.split_first() {
        Some((&REQUEST_TIME_TAG, rest)) if rest.len() >= 8 => std::str::from_utf8(&rest[8..])
            .map_err(|_| EngineError::Corruption("a request id record holds an id that is not UTF-8".into())),
        _ => Err(EngineError::Corruption(format!("{key:?} is not a request id time key"))),
    }
}

/// Engine key of index entry (`name`, `value`) -> `pk`.
pub fn index_key(name: &str, value: &[u8], pk: &[u8]) -> Vec<u8> {
    let mut k = index_prefix(name, value);
    k.extend_from_slice(&VALUE_END);
    k.extend_from_slice(pk);
    k
}

/// Ends the escaped index value in an index key.
const VALUE_END: [u8; 2] = [0x00, 0x01];

/// Prefix of every index entry of `name` whose value starts with `value_prefix`.
pub fn index_prefix(name: &str, value_prefix: &[u8]) -> Vec<u8> {
    assert!(name.len() <= u16::MAX as usize, "index names are checked against Limits first");
    let mut k = Vec::with_capacity(5 + name.len() + value_prefix.len());
    k.push(INDEX_TAG);
    k.extend_from_slice(&(name.len() as u16).to_be_bytes());
    k.extend_from_slice(name.as_bytes());
    for &b in value_prefix {
        k.push(b);
        if b == 0 {
            k.push(0xff);
        }
    }
    k
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// when there is none (the prefix is all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Splits an index entry key of index `name` into (index value, primary key).
/// Errors: `Corruption` when the key is not an index key of `name`.
pub fn split_index_key(name: &str, key: &[u8]) -> Result<(Vec<u8>, Vec<u8>), EngineError> {
    let bad = || EngineError::Corruption(format!("malformed index key of index {name:?}"));
    let head = index_prefix(name, b"");
    let body = key.strip_prefix(head.as_slice()).ok_or_else(bad)?;
    let mut value = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        match (body[i], body.get(i + 1)) {
            (0, Some(0xff)) => value.push(0),
            (0, Some(0x01)) => return Ok((value, body[i + 2..].to_vec())),
            (0, _) => return Err(bad()),
            (b, _) => {
                value.push(b);
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    Err(bad())
}

/// Encodes a stored record.
pub fn encode_record(value: &[u8], indexes: &[IndexEntry]) -> Vec<u8> {
    if indexes.is_empty() {
        let mut r = Vec::with_capacity(1 + value.len());
        r.push(0);
        r.extend_from_slice(value);
        return r;
    }
    let idx = codec::encode(&indexes);
    let mut r = Vec::with_capacity(5 + idx.len() + value.len());
    r.push(1);
    r.extend_from_slice(&(idx.len() as u32).to_be_bytes());
    r.extend_from_slice(&idx);
    r.extend_from_slice(value);
    r
}

/// Decodes a stored record into (value, index entries). Errors: `Corruption`.
pub fn decode_record(record: &[u8]) -> Result<(&[u8], Vec<IndexEntry>), EngineError> {
    let bad = |why: &str| EngineError::Corruption(format!("malformed record: {why}"));
    match record.split_first() {
        Some((0, value)) => Ok((value, Vec::new())),
        Some((1, rest)) if rest.len() >= 4 => {
            let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            if rest.len() < 4 + n {
                return Err(bad("index list runs past the end"));
            }
            let indexes = codec::decode(&rest[4..4 + n], "index entries").map_err(EngineError::Corruption)?;
            Ok((&rest[4 + n..], indexes))
        }
        Some((tag, _)) => Err(bad(&format!("unknown tag {tag}"))),
        None => Err(bad("empty")),
    }
}

/// Just the value of a stored record. Errors: `Corruption`.
pub fn record_value(record: &[u8]) -> Result<Vec<u8>, EngineError> {
    decode_record(record).map(|(v, _)| v.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn index_keys_split_back(name in "[a-z]{1,12}", value in proptest::collection::vec(any::<u8>(), 0..40),
                                 pk in proptest::collection::vec(any::<u8>(), 1..40)) {
            let key = index_key(&name, &value, &pk);
            prop_assert!(key.starts_with(&index_prefix(&name, &value)));
            let (v, p) = split_index_key(&name, &key).unwrap();
            prop_assert_eq!(v, value.clone());
            prop_assert_eq!(p, pk.clone());
        }

        #[test]
        fn index_keys_order_by_value_then_key(a in proptest::collection::vec(any::<u8>(), 0..6),
                                              b in proptest::collection::vec(any::<u8>(), 0..6),
                                              ka in proptest::collection::vec(any::<u8>(), 1..6),
                                              kb in proptest::collection::vec(any::<u8>(), 1..6)) {
            let (x, y) = (index_key("n", &a, &ka), index_key("n", &b, &kb));
            prop_assert_eq!(x.cmp(&y), (&a, &ka).cmp(&(&b, &kb)));
        }

        #[test]
        fn records_round_trip(value in proptest::collection::vec(any::<u8>(), 0..64),
                              idx in proptest::collection::vec(("[a-z]{1,5}", proptest::collection::vec(any::<u8>(), 0..8)), 0..4)) {
            let indexes: Vec<IndexEntry> = idx.into_iter().map(|(name, value)| IndexEntry { name, value }).collect();
            let rec = encode_record(&value, &indexes);
            let (v, i) = decode_record(&rec).unwrap();
            prop_assert_eq!(v, &value[..]);
            prop_assert_eq!(i, indexes);
        }
    }

    #[test]
    fn prefix_end_and_ranges() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        let (s, e) = data_range(b"", b"");
        assert_eq!((s, e), (vec![b'd'], vec![b'e']));
        assert!(decode_record(&[]).is_err());
        assert!(decode_record(&[1, 0, 0, 0, 9]).is_err());
        assert!(decode_record(&[7]).is_err());
    }
}
