//! Fuzzing, on stable Rust with generated inputs (proptest), of what this
//! crate decodes from bytes at rest: the frame codec and the metadata log's
//! recovery (torn, truncated, corrupted and zeroed tails), records in a
//! shard (`decode_record`), shard meta and metadata log records.
//!
//! Properties:
//! - no decoder panics on any bytes, and none allocates more than
//!   [`MAX_ALLOCATION`] at once for an input of at most 512 bytes (checked
//!   by a counting allocator for this test binary);
//! - what is encoded decodes to itself;
//! - recovery of a damaged metadata log yields a prefix of the records
//!   written (never a record that was not written) that holds every record
//!   whose frame ends before the first damaged byte (never a lost record
//!   before the damage), and does not refuse the log.
//!
//! Cases per target: `ATTACHE_FUZZ_CASES` (default 2,000, what CI runs).
//! A failing input proptest finds is saved in
//! `decoders.proptest-regressions` next to this file: check it in with the
//! fix, and it is replayed first on every run (none found so far).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use attache_actors::codec;
use attache_actors::meta::embedded::parse_log;
use attache_actors::meta::state::{Mutation, Record};
use attache_actors::shard::layout::{decode_record, encode_record, IndexEntry, ShardMeta, ShardState};
use proptest::prelude::*;

/// The largest single allocation a decoder may make for a small input, bytes.
const MAX_ALLOCATION: usize = 16 << 20;

/// The system allocator, remembering per thread the largest single
/// allocation (so that tests running beside each other do not count each
/// other's, and each case starts from 0).
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: an allocation while the thread's locals are torn down is
    // not counted.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn cases() -> u32 {
    std::env::var("ATTACHE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn record() -> impl Strategy<Value = Record> {
    let mutation = prop_oneof![
        (bytes(24), bytes(24), any::<i64>()).prop_map(|(key, value, lease)| Mutation::Put { key, value, lease }),
        bytes(24).prop_map(|key| Mutation::Delete { key }),
    ];
    prop_oneof![
        proptest::collection::vec(mutation, 0..4).prop_map(|ops| Record::Write { ops }),
        (any::<i64>(), any::<u64>()).prop_map(|(id, ttl_ms)| Record::LeaseGrant { id, ttl_ms }),
        any::<i64>().prop_map(|id| Record::LeaseEnd { id }),
    ]
}

fn shard_meta() -> impl Strategy<Value = ShardMeta> {
    let state = prop_oneof![Just(ShardState::Active), Just(ShardState::ReadOnly), Just(ShardState::Deleted)];
    (any::<u64>(), "[a-z0-9-]{0,12}", state, any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(shard_id, owner, state, size_limit, live_bytes, live_keys)| ShardMeta {
            version: 1,
            shard_id,
            owner,
            state,
            size_limit,
            live_bytes,
            live_keys,
        },
    )
}

/// Damage to a log of `len` bytes.
#[derive(Clone, Debug)]
enum Damage {
    /// The log ends at this offset (a torn append, a lost tail).
    Truncate(usize),
    /// The byte at this offset is XORed with a non-zero mask.
    Flip(usize, u8),
    /// Every byte from this offset on is zero (blocks never written).
    ZeroFrom(usize),
    /// These bytes follow the log (part of an append that was never framed).
    Append(Vec<u8>),
}

impl Damage {
    /// The damaged log and the offset of its first damaged byte.
    fn apply(&self, mut log: Vec<u8>) -> (Vec<u8>, usize) {
        let len = log.len();
        let first_bad = match self {
            Damage::Truncate(at) => {
                let at = at % (len + 1);
                log.truncate(at);
                at
            }
            Damage::Flip(at, mask) if len > 0 => {
                let at = at % len;
                log[at] ^= mask;
                at
            }
            Damage::ZeroFrom(at) if len > 0 => {
                let at = at % len;
                // Zeros over zeros change nothing: the damage starts at the
                // first byte that was not zero.
                let first = (at..len).find(|&i| log[i] != 0).unwrap_or(len);
                log[at..].fill(0);
                first
            }
            Damage::Append(extra) => {
                log.extend_from_slice(extra);
                len
            }
            Damage::Flip(..) | Damage::ZeroFrom(_) => len,
        };
        (log, first_bad)
    }
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Damage::Flip(at, mask)),
        any::<usize>().prop_map(Damage::ZeroFrom),
        bytes(40).prop_map(Damage::Append),
    ]
}

/// The log of `records` as the embedded store writes it, and the offset at
/// which each record's frame ends.
fn log_of(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
    let mut log = Vec::new();
    let mut ends = Vec::new();
    for r in records {
        codec::frame(&mut log, &codec::encode(r));
        ends.push(log.len());
    }
    (log, ends)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn recovery_of_a_damaged_metadata_log_keeps_what_precedes_the_damage_and_invents_nothing(
        records in proptest::collection::vec(record(), 0..10),
        damage in damage(),
    ) {
        let (log, ends) = log_of(&records);
        let (damaged, first_bad) = damage.apply(log.clone());
        let (got, clean) = match parse_log(&damaged) {
            Ok(parsed) => parsed,
            Err(e) => return Err(TestCaseError::fail(format!("a damaged log was refused: {e}"))),
        };
        prop_assert!(got.len() <= records.len(), "{} records recovered of {} written", got.len(), records.len());
        prop_assert_eq!(&got[..], &records[..got.len()], "a recovered record was never written");
        let intact = ends.iter().filter(|&&end| end <= first_bad).count();
        prop_assert!(got.len() >= intact, "{} records recovered, {intact} preceded the damage", got.len());
        if damaged == log {
            prop_assert!(clean && got == records, "an undamaged log did not read back whole");
        }
    }

    #[test]
    fn no_decoder_panics_or_allocates_without_bound_on_any_bytes(raw in bytes(512), marked in any::<bool>()) {
        // Half the inputs begin with the format byte, so that they reach
        // postcard rather than stopping at the format check.
        let input = if marked { [&[codec::FORMAT][..], &raw].concat() } else { raw };
        LARGEST.with(|l| l.set(0));
        let _ = codec::decode::<Record>(&input, "metadata log record");
        let _ = codec::decode::<Vec<IndexEntry>>(&input, "index entries");
        let _ = ShardMeta::decode(&input);
        let _ = decode_record(&input);
        let _ = parse_log(&input);
        let _ = codec::frames(&input);
        // A frame around the input reaches the record decoder past the CRC.
        let mut framed = Vec::new();
        if !input.is_empty() {
            codec::frame(&mut framed, &input);
        }
        let _ = parse_log(&framed);
        let largest = LARGEST.with(Cell::get);
        prop_assert!(largest <= MAX_ALLOCATION, "an allocation of {largest} bytes");
    }

    #[test]
    fn what_is_encoded_decodes_to_itself(
        r in record(),
        meta in shard_meta(),
        value in bytes(64),
        idx in proptest::collection::vec(("[a-z]{1,8}", bytes(16)), 0..4),
    ) {
        prop_assert_eq!(codec::decode::<Record>(&codec::encode(&r), "record").unwrap(), r);
        prop_assert_eq!(ShardMeta::decode(&meta.encode()).unwrap(), meta);
        let idx: Vec<IndexEntry> = idx.into_iter().map(|(name, value)| IndexEntry { name, value }).collect();
        let stored = encode_record(&value, &idx);
        let (v, i) = decode_record(&stored).unwrap();
        prop_assert_eq!(v, &value[..]);
        prop_assert_eq!(i, idx);
    }
}
