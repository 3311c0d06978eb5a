//! Checkers over a run's history and volume write log. Each returns the
//! violations it finds; a clean run has none.
//!
//! - [`linearizable`]: every key behaves as a linearizable register. The
//!   search is Wing and Gong's (J. Parallel Distrib. Comput., 1993) with
//!   Lowe's memoization of (linearized set, state) pairs ("Testing for
//!   linearizability", Concurrency and Computation, 2017). A write whose
//!   outcome is unknown (`info`) may take effect at any time after its
//!   invocation, or never; failed operations had no effect and are dropped.
//! - [`lost_writes`]: no read returns nothing, or a value older than, a
//!   write acknowledged before the read began (names the lost write).
//! - [`single_writer`]: on each volume, no durable write of an older epoch
//!   after one of a newer epoch, and one node per epoch.
//! - [`stale_reads`]: a read that accepts stale data (served by a backup)
//!   returns a value some successful or unknown write wrote before it ended.
//! - [`shard_ids`]: shard ids are unique and increase in real-time order.
//! - [`isolation`]: no client's operation succeeds on another client's shard.
//! - [`foreign_values`]: no read of a shard's owner returns a value a request
//!   on another client's shard wrote, whatever that request answered.
//! - [`owners_only`] (not a checker): the other checkers see only each
//!   shard's owner's operations.
//! - [`liveness`]: after the last fault is repaired, every shard serves a
//!   write within the bound.
//! - [`batch_atomicity`]: a linearizable multi-key read (BatchGet, Scan)
//!   sees all of a batch write or none of it.
//! - [`reads_while_full`]: while a volume is full and nothing else is
//!   wrong, reads are served.
//!
//! The per-key checkers (`linearizable`, `lost_writes`, `stale_reads`) see
//! multi-key operations through [`project`].

use rustc_hash::FxHashSet;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::ebs::SyncRecord;
use crate::history::{decode_reads, split_aged, EventType, Op, F};

/// One violation: which checker found it and what it is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Violation {
    pub checker: String,
    pub message: String,
}

fn violation(checker: &str, message: String) -> Violation {
    Violation { checker: checker.into(), message }
}

/// One call of the intruder to the metadata endpoint (see
/// `WorkloadSpec::metadata_intrusion_ms`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intrusion {
    /// When it was answered, ms since the run began.
    pub at_ms: u64,
    /// Who it claimed to be and what it tried, e.g. `token of client-1:
    /// delete /attache/nodes/...01`.
    pub call: String,
    /// How it was answered: `refused`; `unanswered: ...` (cut off, or no
    /// answer in time); or `served` (with the store's error when it let the
    /// call in and then failed it, e.g. a lease not found).
    pub answer: String,
}

/// `metadata_isolation`: the metadata endpoint serves node identities only,
/// so every call of the intruder (a client's token, an unknown token or
/// none) is refused; one that was served is a violation, whatever it did.
pub fn metadata_intrusions(intrusions: &[Intrusion]) -> Vec<Violation> {
    intrusions
        .iter()
        .filter(|i| i.answer.starts_with("served"))
        .map(|i| {
            violation(
                "metadata_isolation",
                format!(
                    "at {} ms the metadata endpoint served a caller that is no node: {} ({})",
                    i.at_ms, i.call, i.answer
                ),
            )
        })
        .collect()
}

/// Whether `f` reads the whole shard (a Scan, or a ScanIndex of the index
/// every put writes), so that a key it did not return was absent.
fn whole_shard(f: F) -> bool {
    matches!(f, F::Scan | F::ScanIndex)
}

/// The keys each shard's operations name, for the keys a scan covers.
fn known_keys(ops: &[Op]) -> BTreeMap<u64, BTreeSet<String>> {
    let mut known: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for o in ops {
        for k in o.keys() {
            known.entry(o.shard).or_default().insert(k.to_string());
        }
        if whole_shard(o.f) && o.outcome == EventType::Ok {
            known.entry(o.shard).or_default().extend(decode_reads(o.value.as_deref().unwrap_or("")).into_keys());
        }
    }
    known
}

/// The single-key view of a history: a batch write becomes a write of its
/// value at each of its keys, and a successful multi-key read (BatchGet, or a
/// Scan of the whole shard) a read of each key it covered (a scan covers
/// every key the history names in its shard; a key it did not return was
/// absent), with the operation's times, outcome and node. An atomic
/// multi-key operation takes effect at one point, and so does each of its
/// projections: a history whose projection is not linearizable per key is
/// not linearizable (the converse needs [`batch_atomicity`] too). A stale
/// scan becomes a stale read of each key it found, with the age of the page
/// that held it (a key it did not find is not checked, as for stale reads).
/// Failed and unknown reads are dropped: they constrain nothing.
pub fn project(ops: &[Op]) -> Vec<Op> {
    let known = known_keys(ops);
    let mut out = Vec::with_capacity(ops.len());
    for o in ops {
        let single = |f: F, key: &str, value: Option<String>| Op {
            f,
            key: key.to_string(),
            value,
            part_of: Some(o.f),
            ..o.clone()
        };
        match o.f {
            F::BatchWrite => out.extend(o.keys().into_iter().map(|k| single(F::Write, k, o.value.clone()))),
            F::BatchRead | F::Scan | F::ScanIndex if o.outcome == EventType::Ok => {
                let reads = decode_reads(o.value.as_deref().unwrap_or(""));
                let keys: Vec<&str> = if whole_shard(o.f) {
                    known.get(&o.shard).into_iter().flatten().map(String::as_str).collect()
                } else {
                    o.keys()
                };
                out.extend(keys.into_iter().map(|k| single(F::Read, k, reads.get(k).cloned().flatten())));
            }
            F::BatchRead | F::Scan | F::ScanIndex => {}
            // Each key found is a stale read of it, as old as its page said.
            F::StaleScan if o.outcome == EventType::Ok => {
                // (A value without an age is checked as if fresh: the strictest reading.)
                for (k, v) in decode_reads(o.value.as_deref().unwrap_or("")) {
                    let v = v.unwrap_or_default();
                    let (v, age) = split_aged(&v).unwrap_or((&v, 0));
                    out.push(Op { staleness_ms: Some(age), ..single(F::StaleRead, &k, Some(v.to_string())) });
                }
            }
            F::StaleScan => {}
            _ => out.push(o.clone()),
        }
    }
    out
}

/// Torn batches: a linearizable multi-key read (BatchGet or Scan) that saw a
/// batch write B's value at one key must not see, at another key of B it
/// covered, a state B had already replaced: the value of a write that
/// completed before B was invoked, or "absent" when no delete of that key
/// could come after B began (none unknown, none completed after B's
/// invocation). A real-time argument, so it never flags a linearizable
/// history (every such read is ordered after B at the first key and before
/// B at the second, which no single point can be); it finds the half batch a
/// scan sees when its pages are separate reads.
pub fn batch_atomicity(ops: &[Op]) -> Vec<Violation> {
    let known = known_keys(ops);
    // (shard, value) -> the write that wrote it (values are unique).
    let writes: BTreeMap<(u64, &str), &Op> = ops
        .iter()
        .filter(|o| matches!(o.f, F::Write | F::BatchWrite))
        .filter_map(|o| Some(((o.shard, o.value.as_deref()?), o)))
        .collect();
    let mut out = Vec::new();
    for r in ops.iter().filter(|o| matches!(o.f, F::BatchRead | F::Scan | F::ScanIndex) && o.outcome == EventType::Ok) {
        let reads = decode_reads(r.value.as_deref().unwrap_or(""));
        let covered: BTreeSet<&str> = if whole_shard(r.f) {
            known.get(&r.shard).into_iter().flatten().map(String::as_str).collect()
        } else {
            r.keys().into_iter().collect()
        };
        let seen = |k: &str| reads.get(k).cloned().flatten();
        let mut flagged = BTreeSet::new();
        for (a, v) in reads.iter().filter_map(|(k, v)| Some((k, v.as_deref()?))) {
            let Some(b) = writes.get(&(r.shard, v)).filter(|w| w.f == F::BatchWrite) else { continue };
            for other in b.keys().into_iter().filter(|k| *k != a && covered.contains(k)) {
                let older = match seen(other) {
                    Some(x) if x == v => None,
                    Some(x) => writes
                        .get(&(r.shard, x.as_str()))
                        .filter(|w| w.complete.is_some_and(|c| c < b.invoke))
                        .map(|w| {
                            format!(
                                "{x:?}, written by process {} by {} ms",
                                w.process,
                                w.complete.unwrap_or(0) / 1_000_000
                            )
                        }),
                    None => {
                        let later_delete = ops.iter().any(|d| {
                            d.f == F::Delete
                                && d.shard == r.shard
                                && d.key == other
                                && d.outcome != EventType::Fail
                                && d.complete.is_none_or(|c| c > b.invoke)
                        });
                        (!later_delete).then(|| "absent".to_string())
                    }
                };
                if let Some(older) = older {
                    if flagged.insert(b.process) {
                        out.push(violation(
                            "batch_atomicity",
                            format!(
                                "shard {}: a {} by process {} at {}-{} ms on {} saw key {a} = {v:?} of the batch write of \
                                 process {} (keys {}, invoked at {} ms) but key {other} = {older}, which that batch \
                                 had replaced",
                                r.shard,
                                r.f.name(),
                                r.process,
                                r.invoke / 1_000_000,
                                r.complete.unwrap_or(0) / 1_000_000,
                                r.node,
                                b.process,
                                b.key,
                                b.invoke / 1_000_000
                            ),
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Reads and writes of each (shard, key), with failed operations dropped.
fn by_key(ops: &[Op]) -> BTreeMap<(u64, String), Vec<&Op>> {
    let mut keys: BTreeMap<(u64, String), Vec<&Op>> = BTreeMap::new();
    for op in ops {
        let relevant = match op.f {
            F::Write | F::Delete => matches!(op.outcome, EventType::Ok | EventType::Info),
            F::Read => op.outcome == EventType::Ok,
            _ => false,
        };
        if relevant {
            keys.entry((op.shard, op.key.clone())).or_default().push(op);
        }
    }
    keys
}

/// Most (linearized set, state) pairs one key's search may visit before it
/// reports the history as too hard to check rather than running on.
const SEARCH_LIMIT: usize = 2_000_000;

/// Checks that every key is a linearizable register (see the module docs).
pub fn linearizable(ops: &[Op]) -> Vec<Violation> {
    linearizable_search(ops).0
}

/// As [`linearizable`], and the most states (linearized set and register
/// value pairs) one key's search visited: how close the run came to
/// `SEARCH_LIMIT` (2,000,000), past which a key is reported as a violation
/// ("search gave up"), never as a pass.
pub fn linearizable_search(ops: &[Op]) -> (Vec<Violation>, u64) {
    linearizable_within(ops, SEARCH_LIMIT)
}

/// As [`linearizable_search`] with a search limit of `limit` states per key.
fn linearizable_within(ops: &[Op], limit: usize) -> (Vec<Violation>, u64) {
    let mut out = Vec::new();
    let mut longest = 0;
    for ((shard, key), ops) in by_key(ops) {
        let ops = without_unobserved_unknown_writes(ops);
        let searched = register_linearizable(&ops, limit);
        longest = longest.max(match searched {
            Ok((_, states)) | Err(states) => states as u64,
        });
        match searched.map(|(ok, _)| ok) {
            Ok(true) => {}
            Ok(false) => out.push(violation(
                "linearizable",
                format!(
                    "shard {shard} key {key}: no linearization of its {} operations exists{}",
                    ops.len(),
                    offending_window(&ops)
                ),
            )),
            Err(visited) => out.push(violation(
                "linearizable",
                format!("shard {shard} key {key}: search gave up after {visited} states ({} operations)", ops.len()),
            )),
        }
    }
    (out, longest)
}

/// Operations shown before the earliest failing cut of a non-linearizable key.
const WINDOW_OPS: usize = 12;

/// The history of one register as it stood at time `t`: the operations
/// invoked by then; one still running at `t` is pending: a write may or may
/// not take effect (as an `info` write), a read has returned nothing yet
/// (left out). Such prefixes are closed under linearizability: if the one at
/// `t` has no linearization, neither has any later one (Herlihy and Wing,
/// 1990: a linearizable history's prefixes, with pending operations completed
/// or removed, are linearizable).
fn history_at(ops: &[&Op], t: u64) -> Vec<Op> {
    ops.iter()
        .filter(|o| o.invoke <= t)
        .filter_map(|o| match o.complete {
            Some(c) if c <= t => Some((*o).clone()),
            _ if o.f.is_write() && o.outcome != EventType::Fail => {
                Some(Op { complete: None, outcome: EventType::Info, ..(*o).clone() })
            }
            // A failed write still running at t had no effect either way.
            _ => None,
        })
        .collect()
}

/// The part of a non-linearizable register history a person should read: the
/// earliest time whose history (see [`history_at`]) already has no
/// linearization, found by binary search over the invocation and completion
/// times, and the last [`WINDOW_OPS`] operations of it, one line each
/// (process, kind, value, invoked-completed ms, outcome, node).
fn offending_window(ops: &[&Op]) -> String {
    let mut times: Vec<u64> = ops.iter().flat_map(|o| std::iter::once(o.invoke).chain(o.complete)).collect();
    times.sort_unstable();
    times.dedup();
    let fails = |cut: u64| {
        let at = history_at(ops, cut);
        let at = without_unobserved_unknown_writes(at.iter().collect());
        matches!(register_linearizable(&at, SEARCH_LIMIT), Ok((false, _)))
    };
    let (mut lo, mut hi) = (0, times.len().saturating_sub(1));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fails(times[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let Some(&cut) = times.get(lo) else { return String::new() };
    let mut window: Vec<&Op> = ops.iter().copied().filter(|o| o.invoke <= cut).collect();
    window.sort_by_key(|o| o.invoke);
    let shown = &window[window.len().saturating_sub(WINDOW_OPS)..];
    let mut out = format!(
        "; the history up to {:.1} ms (operations still running then counted as pending) already has none; \
         its last {} operations:",
        cut as f64 / 1e6,
        shown.len()
    );
    for o in shown {
        let complete = o.complete.map_or("?".to_string(), |c| format!("{:.1}", c as f64 / 1e6));
        out.push_str(&format!(
            "\n    p{} {:?}{} {} {:.1}-{} ms {:?} on {}",
            o.process,
            o.f,
            o.part_of.map_or(String::new(), |f| format!(" (of a {})", f.name())),
            o.value.as_deref().unwrap_or("(absent)"),
            o.invoke as f64 / 1e6,
            complete,
            o.outcome,
            if o.node.is_empty() { "?" } else { &o.node }
        ));
    }
    out
}

/// One register's operations without the writes of unknown outcome whose
/// value no read returned. Such a write may be taken never to have happened:
/// in any linearization with it, no read falls between it and the next
/// write (none returned its value), so dropping it leaves a linearization
/// of the rest; and one without it is one of the whole, as an unknown write
/// may never take effect. Values are unique per write, so this is exact; it
/// keeps the search small when many calls timed out (random-swarm seed 2124
/// gave up at 2,000,000 states with 22 of them on one key).
fn without_unobserved_unknown_writes(ops: Vec<&Op>) -> Vec<&Op> {
    let read: HashSet<&str> = ops.iter().filter(|o| o.f == F::Read).filter_map(|o| o.value.as_deref()).collect();
    ops.iter()
        .copied()
        .filter(|o| {
            !(o.f == F::Write && o.outcome == EventType::Info && o.value.as_deref().is_some_and(|v| !read.contains(v)))
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Entry {
    Call(usize),
    Return(usize),
}

/// Wing–Gong–Lowe search over one register's operations. `Err(n)`: gave up
/// after `n` states.
fn register_linearizable(ops: &[&Op], limit: usize) -> Result<(bool, usize), usize> {
    // Entries by time; a call before a return at the same instant. Unknown
    // writes have no return: they may linearize at any later point, or never.
    let mut timed: Vec<(u64, u8, Entry)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        timed.push((op.invoke, 0, Entry::Call(i)));
        if let Some(c) = op.complete {
            timed.push((c, 1, Entry::Return(i)));
        }
    }
    timed.sort_by_key(|&(t, order, e)| {
        (
            t,
            order,
            matches!(e, Entry::Return(_)) as u8,
            match e {
                Entry::Call(i) | Entry::Return(i) => i,
            },
        )
    });
    let entries: Vec<Entry> = timed.into_iter().map(|t| t.2).collect();
    let n = entries.len();
    if n == 0 {
        return Ok((true, 0));
    }
    // A doubly linked list over the entries, with a head sentinel at index n.
    let end = usize::MAX;
    let head = n;
    let mut next: Vec<usize> = (0..n).map(|i| if i + 1 < n { i + 1 } else { end }).collect();
    next.push(0);
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { head } else { i - 1 }).collect();
    prev.push(end);
    let mut call_at = vec![0; ops.len()];
    let mut return_at = vec![None; ops.len()];
    for (idx, e) in entries.iter().enumerate() {
        match *e {
            Entry::Call(i) => call_at[i] = idx,
            Entry::Return(i) => return_at[i] = Some(idx),
        }
    }
    let must: usize = ops.iter().filter(|o| o.outcome == EventType::Ok).count();
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, idx: usize| {
        let (p, nx) = (prev[idx], next[idx]);
        next[p] = nx;
        if nx != end {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, idx: usize| {
        let (p, nx) = (prev[idx], next[idx]);
        next[p] = idx;
        if nx != end {
            prev[nx] = idx;
        }
    };

    // The register's values as small numbers (0 is absent), so that a
    // state is a set of linearized operations (one bit each) and a number.
    let mut values: HashMap<Option<&str>, u64> = HashMap::from([(None, 0)]);
    let value_of: Vec<u64> = ops
        .iter()
        .map(|o| {
            let next_id = values.len() as u64;
            *values.entry(o.value.as_deref()).or_insert(next_id)
        })
        .collect();
    let words = ops.len().div_ceil(64);
    // The state visited: the linearized set's words, then the value.
    let mut key: Vec<u64> = vec![0; words + 1];
    let mut done_ok = 0usize;
    let mut stack: Vec<(usize, u64)> = Vec::new();
    let mut cache: FxHashSet<Vec<u64>> = FxHashSet::default();
    let mut cursor = next[head];
    loop {
        if done_ok == must {
            return Ok((true, cache.len()));
        }
        if cache.len() > limit {
            return Err(cache.len());
        }
        let entry = if cursor == end { None } else { Some(entries[cursor]) };
        match entry {
            Some(Entry::Call(i)) => {
                let op = ops[i];
                let state = key[words];
                let next_state = match op.f {
                    // A delete writes "absent" (its value is None).
                    F::Write | F::Delete => Some(value_of[i]),
                    _ if value_of[i] == state => Some(state),
                    _ => None,
                };
                if let Some(new_state) = next_state {
                    key[i / 64] |= 1 << (i % 64);
                    key[words] = new_state;
                    if !cache.contains(key.as_slice()) {
                        cache.insert(key.clone());
                        stack.push((i, state));
                        if op.outcome == EventType::Ok {
                            done_ok += 1;
                        }
                        unlink(&mut next, &mut prev, call_at[i]);
                        if let Some(r) = return_at[i] {
                            unlink(&mut next, &mut prev, r);
                        }
                        cursor = next[head];
                        continue;
                    }
                    key[i / 64] &= !(1 << (i % 64));
                    key[words] = state;
                }
                cursor = next[cursor];
            }
            // A return, or the end, with a pending call not placed: undo the last choice.
            _ => {
                let Some((i, prev_state)) = stack.pop() else { return Ok((false, cache.len())) };
                key[i / 64] &= !(1 << (i % 64));
                key[words] = prev_state;
                if ops[i].outcome == EventType::Ok {
                    done_ok -= 1;
                }
                if let Some(r) = return_at[i] {
                    relink(&mut next, &mut prev, r);
                }
                relink(&mut next, &mut prev, call_at[i]);
                cursor = next[call_at[i]];
            }
        }
    }
}

/// Reads that missed a write acknowledged before they began (see the module docs).
pub fn lost_writes(ops: &[Op]) -> Vec<Violation> {
    let mut out = Vec::new();
    for ((shard, key), ops) in by_key(ops) {
        let writes: BTreeMap<&str, &Op> =
            ops.iter().filter(|o| o.f == F::Write).filter_map(|o| Some((o.value.as_deref()?, *o))).collect();
        let acked: Vec<&Op> = ops.iter().filter(|o| o.f.is_write() && o.outcome == EventType::Ok).copied().collect();
        let deletes: Vec<&Op> = ops.iter().filter(|o| o.f == F::Delete).copied().collect();
        for read in ops.iter().filter(|o| o.f == F::Read) {
            let before: Vec<&&Op> = acked.iter().filter(|w| w.complete.is_some_and(|c| c < read.invoke)).collect();
            let Some(latest) = before.iter().max_by_key(|w| w.complete) else { continue };
            let stale = match read.value.as_deref() {
                // Absent: stale if a put was acknowledged before the read
                // began and no delete (that did not fail) could come after it
                // and before the read ended.
                None => before.iter().any(|w| {
                    w.f == F::Write
                        && !deletes.iter().any(|d| {
                            d.outcome != EventType::Fail
                                && d.complete.is_none_or(|c| c > w.invoke)
                                && read.complete.is_none_or(|c| d.invoke < c)
                        })
                }),
                Some(v) => writes.get(v).is_some_and(|src| {
                    before.iter().any(|w| src.complete.is_some_and(|c| c < w.invoke) && w.value != src.value)
                }),
            };
            if stale {
                out.push(violation(
                    "lost_writes",
                    format!(
                        "shard {shard} key {key}: a read at {} ns returned {:?}, but {:?} was acknowledged at {} ns",
                        read.invoke,
                        read.value,
                        latest.value,
                        latest.complete.unwrap_or(0)
                    ),
                ));
            }
        }
    }
    out
}

/// Durable writes of an older epoch after a newer one (written, or opened
/// read-write: the opener's recovery would miss it), or two nodes writing
/// in one epoch, within one fence scope (`SyncRecord::scope`: the volume
/// under a reservation, the shard directory under the EPOCH file).
pub fn single_writer(syncs: &[SyncRecord]) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut newest: BTreeMap<&str, (u64, &str, u64)> = BTreeMap::new();
    let mut owner: BTreeMap<(&str, u64), &str> = BTreeMap::new();
    for s in syncs {
        let scope = if s.scope.is_empty() { s.volume.as_str() } else { s.scope.as_str() };
        // An open writes nothing: only what lands after it is checked.
        if s.open {
            if newest.get(scope).is_none_or(|(e, _, _)| s.epoch > *e) {
                newest.insert(scope, (s.epoch, &s.node, s.at_ms));
            }
            continue;
        }
        if let Some((epoch, node, at)) = newest.get(scope) {
            if s.epoch < *epoch {
                out.push(violation(
                    "single_writer",
                    format!(
                        "{}: {} wrote at epoch {} at {} ms, after {} wrote at epoch {} at {} ms",
                        describe_scope(s, scope),
                        s.node,
                        s.epoch,
                        s.at_ms,
                        node,
                        epoch,
                        at
                    ),
                ));
            }
        }
        if newest.get(scope).is_none_or(|(e, _, _)| s.epoch >= *e) {
            newest.insert(scope, (s.epoch, &s.node, s.at_ms));
        }
        if let Some(other) = owner.insert((scope, s.epoch), &s.node) {
            if other != s.node {
                out.push(violation(
                    "single_writer",
                    format!(
                        "{}: epoch {} was written by {} and by {}",
                        describe_scope(s, scope),
                        s.epoch,
                        other,
                        s.node
                    ),
                ));
            }
        }
    }
    out
}

/// `volume vol-1`, or `shard directory vol-1/shards/5`.
fn describe_scope(s: &SyncRecord, scope: &str) -> String {
    if scope == s.volume {
        format!("volume {scope}")
    } else {
        format!("shard directory {scope}")
    }
}

/// Stale reads that return a value no write could have produced: one never
/// written, written by a failed operation, or invoked after the read completed.
pub fn stale_reads(ops: &[Op]) -> Vec<Violation> {
    let writes: BTreeMap<(u64, &str, &str), &Op> = ops
        .iter()
        .filter(|o| o.f == F::Write)
        .filter_map(|o| Some(((o.shard, o.key.as_str(), o.value.as_deref()?), o)))
        .collect();
    ops.iter()
        .filter(|o| o.f == F::StaleRead && o.outcome == EventType::Ok)
        .filter_map(|r| {
            let v = r.value.as_deref()?;
            let why = match writes.get(&(r.shard, r.key.as_str(), v)) {
                None => "no operation wrote it",
                Some(w) if w.outcome == EventType::Fail => "its write failed",
                Some(w) if r.complete.is_some_and(|c| w.invoke > c) => "its write began after the read ended",
                Some(_) => return None,
            };
            Some(violation(
                "stale_reads",
                format!("shard {} key {}: a stale read returned {v:?}, but {why}", r.shard, r.key),
            ))
        })
        .collect()
}

/// Stale reads older than they said: a stale read that returned the value
/// of write W1 and reported an age of A ms, while a write or delete W2 of
/// the same key, begun after W1 completed, had itself completed more than
/// A ms (plus 1 for the age's rounding down) before the read began. A
/// backup's view that caught up at time c serves everything acknowledged
/// before c and reports `now − c` (so c ≥ invoke − A): W2 was visible at c,
/// and W1's value was no longer current. (A read that found the key absent
/// is not checked.)
pub fn stale_ages(ops: &[Op]) -> Vec<Violation> {
    let ms = 1_000_000u64;
    let mut writes: BTreeMap<(u64, &str), Vec<&Op>> = BTreeMap::new();
    let mut by_value: BTreeMap<(u64, &str, &str), &Op> = BTreeMap::new();
    for o in ops.iter().filter(|o| matches!(o.f, F::Write | F::Delete)) {
        if o.outcome == EventType::Ok {
            writes.entry((o.shard, o.key.as_str())).or_default().push(o);
        }
        if let (F::Write, Some(v)) = (o.f, o.value.as_deref()) {
            by_value.insert((o.shard, o.key.as_str(), v), o);
        }
    }
    let mut out = Vec::new();
    for r in ops.iter().filter(|o| o.f == F::StaleRead && o.outcome == EventType::Ok) {
        let (Some(v), Some(age)) = (r.value.as_deref(), r.staleness_ms) else { continue };
        let Some(w1_done) = by_value.get(&(r.shard, r.key.as_str(), v)).and_then(|w1| w1.complete) else { continue };
        let newer = writes
            .get(&(r.shard, r.key.as_str()))
            .into_iter()
            .flatten()
            .find(|w2| w2.invoke > w1_done && w2.complete.is_some_and(|c| c + (age + 1) * ms < r.invoke));
        if let Some(w2) = newer {
            out.push(violation(
                "stale_ages",
                format!(
                    "shard {} key {}: a stale {} at {} ms returned {v:?} reporting {age} ms of staleness, but a \
                     {} acknowledged at {} ms had replaced it",
                    r.shard,
                    r.key,
                    if r.part_of == Some(F::StaleScan) { "scan's page" } else { "read" },
                    r.invoke / ms,
                    if w2.f == F::Delete { "delete" } else { "write" },
                    w2.complete.unwrap_or(0) / ms
                ),
            ));
        }
    }
    out
}

/// Index scans that list a key twice: a put replaces a key's index entry
/// with its new value's, so any one state of the shard holds one entry per
/// key of an index every put writes; two hits for one key (under two
/// values) mean the scan's pages read different states.
pub fn index_hits(ops: &[Op]) -> Vec<Violation> {
    let mut out = Vec::new();
    for r in ops.iter().filter(|o| o.f == F::ScanIndex && o.outcome == EventType::Ok) {
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for part in r.value.as_deref().unwrap_or("").split(' ').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            if let Some(first) = seen.insert(k, v) {
                out.push(violation(
                    "index_hits",
                    format!(
                        "shard {}: a ScanIndex by process {} ({} to {} ms) listed key {k} twice, as {first:?} \
                         and as {v:?}",
                        r.shard,
                        r.process,
                        r.invoke / 1_000_000,
                        r.complete.unwrap_or(0) / 1_000_000
                    ),
                ));
            }
        }
    }
    out
}

/// ShardStats answers that the history contradicts: more live keys than
/// keys written to the shard by then (by writes that did not fail), fewer
/// than the keys certainly present (a write acknowledged before the call
/// began, and no delete of that key that may have taken effect: none
/// acknowledged or unknown invoked before the call completed), or a shard
/// still `active` although its close was acknowledged before the call
/// began. (A ShardStats is served by the shard's primary, linearizably.)
pub fn shard_stats(ops: &[Op]) -> Vec<Violation> {
    let mut out = Vec::new();
    // Each stats read is checked against its own shard's operations.
    let mut by_shard: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
    for o in ops {
        by_shard.entry(o.shard).or_default().push(o);
    }
    for r in ops.iter().filter(|o| o.f == F::ShardStats && o.outcome == EventType::Ok) {
        let value = r.value.as_deref().unwrap_or("");
        let field = |name: &str| value.split(' ').find_map(|p| p.strip_prefix(name)?.strip_prefix('='));
        let live: u64 = field("live_keys").and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
        let end = r.complete.unwrap_or(u64::MAX);
        let shard_ops = &by_shard[&r.shard];
        let writes = || shard_ops.iter().copied().filter(|w| matches!(w.f, F::Write | F::BatchWrite));
        let written: BTreeSet<&str> =
            writes().filter(|w| w.outcome != EventType::Fail && w.invoke < end).flat_map(|w| w.keys()).collect();
        let maybe_deleted: BTreeSet<&str> = shard_ops
            .iter()
            .filter(|d| d.f == F::Delete && d.outcome != EventType::Fail && d.invoke < end)
            .map(|d| d.key.as_str())
            .collect();
        let present: BTreeSet<&str> = writes()
            .filter(|w| w.outcome == EventType::Ok && w.complete.is_some_and(|c| c < r.invoke))
            .flat_map(|w| w.keys())
            .filter(|k| !maybe_deleted.contains(k))
            .collect();
        if live > written.len() as u64 || live < present.len() as u64 {
            out.push(violation(
                "shard_stats",
                format!(
                    "shard {}: ShardStats at {} ms reported {value:?}, but {} keys had been written and {} were \
                     certainly present",
                    r.shard,
                    r.invoke / 1_000_000,
                    written.len(),
                    present.len()
                ),
            ));
        }
        let closed_before = shard_ops
            .iter()
            .any(|c| c.f == F::CloseShard && c.outcome == EventType::Ok && c.complete.is_some_and(|t| t < r.invoke));
        if closed_before && field("state") != Some("read-only") {
            out.push(violation(
                "shard_stats",
                format!(
                    "shard {}: ShardStats at {} ms reported {value:?} after its close was acknowledged",
                    r.shard,
                    r.invoke / 1_000_000
                ),
            ));
        }
    }
    out
}

/// Stale reads and scans served older than they asked: an `ok` answer
/// whose reported age exceeds the `max_staleness_ms` its request named
/// (with `stale_ages`, the value was then current within the requested
/// bound too).
pub fn stale_bounds(ops: &[Op]) -> Vec<Violation> {
    ops.iter()
        .filter(|o| matches!(o.f, F::StaleRead | F::StaleScan) && o.outcome == EventType::Ok)
        .filter_map(|o| {
            let (asked, got) = (o.requested_staleness_ms?, o.staleness_ms?);
            (got > asked).then(|| {
                violation(
                    "stale_bounds",
                    format!(
                        "shard {}: a stale {} at {} ms asked for a view at most {asked} ms old and was answered \
                         from one {got} ms old",
                        o.shard,
                        if o.f == F::StaleScan { "scan" } else { "read" },
                        o.invoke / 1_000_000
                    ),
                )
            })
        })
        .collect()
}

/// Shard ids unique and increasing in real time.
pub fn shard_ids(ops: &[Op]) -> Vec<Violation> {
    let created: Vec<&Op> = ops.iter().filter(|o| o.f == F::NewShard && o.outcome == EventType::Ok).collect();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for c in &created {
        if !seen.insert(c.shard) {
            out.push(violation("shard_ids", format!("shard id {} was allocated twice", c.shard)));
        }
    }
    for a in &created {
        for b in &created {
            if a.complete.is_some_and(|c| c < b.invoke) && a.shard >= b.shard {
                out.push(violation(
                    "shard_ids",
                    format!("shard {} was created after shard {} completed, with a smaller id", b.shard, a.shard),
                ));
            }
        }
    }
    out
}

/// Whether `error` refused a request for who sent it: the client does not
/// own the shard, the caller may not act as the client it named, or it
/// brought no identity the server accepts.
fn refused_for_identity(error: &str) -> bool {
    ["does not own", "may not act as", "authenticates its callers"].iter().any(|m| error.contains(m))
}

/// Each shard's owner: the client whose `NewShard` created it.
fn owners(ops: &[Op]) -> BTreeMap<u64, &str> {
    ops.iter()
        .filter(|o| o.f == F::NewShard && o.outcome == EventType::Ok)
        .map(|o| (o.shard, o.client.as_str()))
        .collect()
}

/// The operations of each shard's owner, without those a client made on
/// another client's shard (with its own id, as that client, or with no
/// identity). Every checker of a shard's data, lifecycle and liveness sees
/// only these: a foreign request must be refused (which [`isolation`] and
/// [`foreign_values`] check), and one whose outcome is unknown (a transport
/// failure before any node refused it) must not count as a write, close
/// or delete that may have happened, or it would excuse what the owner's
/// own operations show.
pub fn owners_only(mut ops: Vec<Op>) -> Vec<Op> {
    let owners = owners(&ops);
    let owners: BTreeMap<u64, String> = owners.into_iter().map(|(shard, owner)| (shard, owner.to_string())).collect();
    ops.retain(|o| owners.get(&o.shard).is_none_or(|owner| *owner == o.client));
    ops
}

/// A value written by a foreign request (see [`owners_only`]), whatever it
/// answered, that a successful read of the shard's owner returned: the
/// request was applied. `ops` as [`project`] gives them (values written
/// are unique: the writer's id, process and count).
pub fn foreign_values(ops: &[Op]) -> Vec<Violation> {
    let owners = owners(ops);
    let foreign = |o: &&Op| owners.get(&o.shard).is_some_and(|owner| *owner != o.client);
    let written: BTreeMap<(u64, &str), &Op> = ops
        .iter()
        .filter(|o| o.f.is_write())
        .filter(foreign)
        .filter_map(|o| Some(((o.shard, o.value.as_deref()?), o)))
        .collect();
    ops.iter()
        .filter(|o| matches!(o.f, F::Read | F::StaleRead) && o.outcome == EventType::Ok)
        .filter_map(|o| {
            let w = written.get(&(o.shard, o.value.as_deref()?))?;
            Some(violation(
                "isolation",
                format!(
                    "shard {} key {}: {} read {:?}, written by {} ({:?} at {} ms, answered {:?}) on a shard it does \
                     not own",
                    o.shard,
                    o.key,
                    o.client,
                    o.value.as_deref().unwrap_or(""),
                    w.client,
                    w.f,
                    w.invoke / 1_000_000,
                    w.outcome
                ),
            ))
        })
        .collect()
}

/// Successful operations of a client on another client's shard.
pub fn isolation(ops: &[Op]) -> Vec<Violation> {
    let owners = owners(ops);
    ops.iter()
        .filter(|o| o.f != F::NewShard && o.outcome == EventType::Ok)
        .filter_map(|o| {
            let owner = owners.get(&o.shard)?;
            (*owner != o.client).then(|| {
                violation(
                    "isolation",
                    format!("client {} {:?} key {} on shard {} owned by {owner}", o.client, o.f, o.key, o.shard),
                )
            })
        })
        .collect()
}

/// Writes a closed shard took, and anything a deleted shard served: after a
/// close was acknowledged, no put or delete invoked later succeeds; after a
/// shard's deletion was acknowledged, no operation invoked later succeeds on
/// it (not even a read answering "absent"), except a stale read whose
/// reported staleness reaches back before the deletion (its view may
/// predate it).
pub fn shard_lifecycle(ops: &[Op]) -> Vec<Violation> {
    let acked = |f: F| -> BTreeMap<u64, u64> {
        let mut first: BTreeMap<u64, u64> = BTreeMap::new();
        for o in ops.iter().filter(|o| o.f == f && o.outcome == EventType::Ok) {
            if let Some(c) = o.complete {
                let t = first.entry(o.shard).or_insert(c);
                *t = (*t).min(c);
            }
        }
        first
    };
    let (closed, deleted) = (acked(F::CloseShard), acked(F::DeleteShard));
    let mut out = Vec::new();
    for o in ops.iter().filter(|o| o.outcome == EventType::Ok && !matches!(o.f, F::NewShard | F::DeleteShard)) {
        // The earliest time the answer's view may be from.
        let view = o.invoke.saturating_sub(o.staleness_ms.unwrap_or(0) * 1_000_000);
        if let Some(&d) = deleted.get(&o.shard).filter(|&&d| view > d) {
            out.push(violation(
                "shard_lifecycle",
                format!(
                    "shard {}: {:?} key {:?} invoked at {} ms (stale by at most {} ms) succeeded on {} after the \
                     shard's deletion was acknowledged at {} ms",
                    o.shard,
                    o.f,
                    o.key,
                    o.invoke / 1_000_000,
                    o.staleness_ms.unwrap_or(0),
                    o.node,
                    d / 1_000_000
                ),
            ));
        } else if let Some(&c) = closed.get(&o.shard).filter(|&&c| o.f.is_write() && o.invoke > c) {
            out.push(violation(
                "shard_lifecycle",
                format!(
                    "shard {}: {:?} key {} invoked at {} ms succeeded on {} after the shard's close was \
                     acknowledged at {} ms",
                    o.shard,
                    o.f,
                    o.key,
                    o.invoke / 1_000_000,
                    o.node,
                    c / 1_000_000
                ),
            ));
        }
    }
    out
}

/// What the metadata store lists must agree with what was acknowledged: a
/// shard whose deletion was acknowledged before a listing began is not
/// listed, and one whose close was is listed read-only.
pub fn shard_records(ops: &[Op]) -> Vec<Violation> {
    let acked_before = |f: F, shard: u64, t: u64| {
        ops.iter()
            .any(|o| o.f == f && o.shard == shard && o.outcome == EventType::Ok && o.complete.is_some_and(|c| c < t))
    };
    let mut out = Vec::new();
    for list in ops.iter().filter(|o| o.f == F::ListShards && o.outcome == EventType::Ok) {
        for entry in list.value.as_deref().unwrap_or("").split(',').filter(|e| !e.is_empty()) {
            let Some((id, state)) = entry.split_once(':') else { continue };
            let Ok(shard) = id.parse::<u64>() else { continue };
            let wrong = if acked_before(F::DeleteShard, shard, list.invoke) {
                Some("deleted")
            } else if state != "read-only" && acked_before(F::CloseShard, shard, list.invoke) {
                Some("closed")
            } else {
                None
            };
            if let Some(was) = wrong {
                out.push(violation(
                    "shard_records",
                    format!(
                        "{} listed shard {shard} as {state} at {} ms, but it was {was} before",
                        list.client,
                        list.invoke / 1_000_000
                    ),
                ));
            }
        }
    }
    out
}

/// A rejected operation had no effect: a write refused because its shard is
/// closed needs a close (acknowledged, or of unknown outcome) invoked before
/// it; one refused because its shard was deleted, a deletion.
pub fn rejections(ops: &[Op]) -> Vec<Violation> {
    let may_have = |f: F, shard: u64, t: u64| {
        ops.iter().any(|o| o.f == f && o.shard == shard && o.outcome != EventType::Fail && o.invoke < t)
    };
    let mut out = Vec::new();
    for o in ops.iter().filter(|o| o.outcome == EventType::Fail && o.f != F::NewShard) {
        let error = o.error.as_deref().unwrap_or("");
        let cause = if error.contains("is closed (read-only)") {
            (!may_have(F::CloseShard, o.shard, o.complete.unwrap_or(u64::MAX))).then_some("closed")
        } else if error.contains("was deleted") {
            (!may_have(F::DeleteShard, o.shard, o.complete.unwrap_or(u64::MAX))).then_some("deleted")
        } else {
            None
        };
        if let Some(was) = cause {
            out.push(violation(
                "rejections",
                format!(
                    "shard {}: {:?} key {:?} at {} ms was refused because the shard is {was}, but every request \
                     that could have {was} it was rejected (no effect): {error}",
                    o.shard,
                    o.f,
                    o.key,
                    o.invoke / 1_000_000
                ),
            ));
        }
    }
    out
}

/// A window in which a volume was full and nothing else was wrong: from
/// `start` to `end`, simulated ns; `cut` when another fault ended it
/// before space came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullWindow {
    pub start: u64,
    pub end: u64,
    pub cut: bool,
}

/// The windows in which a volume was full (`Fault::DiskFull`) and nothing
/// else was wrong: each full window less the time from when any other
/// fault struck until `quiet_ms` after it ended (an outage of another
/// kind, a failover, may refuse reads by design; `quiet_ms` is the time
/// the service has to recover from it).
pub fn full_windows(faults: &[attache_faults::Scheduled], quiet_ms: u64) -> Vec<FullWindow> {
    use attache_faults::Fault;
    let others: Vec<(u64, u64)> = faults
        .iter()
        .filter(|o| !matches!(o.fault, Fault::DiskFull { .. }))
        .map(|o| (o.at_ms, o.at_ms + o.fault.recovery_from_ms() + quiet_ms))
        .collect();
    let mut out = Vec::new();
    for f in faults {
        let Fault::DiskFull { for_ms, .. } = f.fault else { continue };
        let mut windows = vec![FullWindow { start: f.at_ms, end: f.at_ms + for_ms, cut: false }];
        for &(from, to) in &others {
            windows = windows
                .into_iter()
                .flat_map(|w| {
                    let before = FullWindow { end: w.end.min(from), cut: w.cut || from < w.end, ..w };
                    [before, FullWindow { start: w.start.max(to), ..w }]
                })
                .filter(|w| w.start < w.end)
                .collect();
        }
        out.extend(windows.into_iter().map(|w| FullWindow { start: w.start * 1_000_000, end: w.end * 1_000_000, ..w }));
    }
    out
}

/// A full volume refuses writes but keeps serving what it holds: every
/// read invoked inside one of `windows` (see [`full_windows`]) succeeds,
/// unless it was refused for a reason that has nothing to do with space
/// (its shard was deleted, or is not its client's), or it was still under
/// way when another fault cut its window short. Found with RocksDB on
/// a full filesystem: a group commit's `ENOSPC` made the shard reopen, and
/// the reopen (which writes) failed until space came back, so reads of
/// acknowledged data were refused the whole time.
pub fn reads_while_full(ops: &[Op], windows: &[FullWindow]) -> Vec<Violation> {
    let mut out = Vec::new();
    for o in ops.iter().filter(|o| o.f.is_read() && o.outcome != EventType::Ok) {
        let Some(w) = windows.iter().find(|w| (w.start..w.end).contains(&o.invoke)) else { continue };
        let (start, end) = (w.start, w.end);
        if w.cut && o.complete.is_none_or(|c| c >= end) {
            continue;
        }
        let error = o.error.as_deref().unwrap_or("");
        // Refused for a reason space has nothing to do with: its client
        // deleted the shard (a delete, not refused, invoked before the read
        // ended), or does not own it.
        let ended = o.complete.unwrap_or(u64::MAX);
        let deleted = ops
            .iter()
            .any(|d| d.f == F::DeleteShard && d.shard == o.shard && d.outcome != EventType::Fail && d.invoke < ended);
        if deleted || refused_for_identity(error) {
            continue;
        }
        out.push(violation(
            "reads_while_full",
            format!(
                "shard {}: {:?} key {:?} at {} ms, while a volume was full ({} to {} ms) and nothing else was \
                 wrong, was not served: {:?} {error}",
                o.shard,
                o.f,
                o.key,
                o.invoke / 1_000_000,
                start / 1_000_000,
                end / 1_000_000,
                o.outcome
            ),
        ));
    }
    out
}

/// A change of the simulated world that may interrupt service: a fault, or
/// a repair (a restart, a reattach, a heal, which makes nodes claim again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disruption {
    /// When, simulated ns since the start (a metadata outage or a disk
    /// stall: when it ended).
    pub at_ns: u64,
    /// Whether it was a repair.
    pub repair: bool,
}

/// Liveness that a fault can fail: after every disruption, every shard
/// created before it serves a write within `bound_ns` of the latest fault
/// (not repair) that struck before that write. So a failover that never
/// happens fails even if a repair later brings the old primary back (the
/// repair does not restart the clock), and a fault that is never repaired
/// fails too; a second fault during the outage (overlapping faults) gives
/// the system the bound again from that fault.
pub fn liveness(ops: &[Op], disruptions: &[Disruption], bound_ns: u64) -> Vec<Violation> {
    let created: BTreeMap<u64, u64> = ops
        .iter()
        .filter(|o| o.f == F::NewShard && o.outcome == EventType::Ok)
        .filter_map(|o| Some((o.shard, o.complete?)))
        .collect();
    // A shard its client closes or deletes stops taking writes by design.
    // (A close or delete refused for its caller's identity retires nothing.)
    let retired: BTreeSet<u64> = ops
        .iter()
        .filter(|o| matches!(o.f, F::CloseShard | F::DeleteShard))
        .filter(|o| !(o.outcome == EventType::Fail && refused_for_identity(o.error.as_deref().unwrap_or(""))))
        .map(|o| o.shard)
        .collect();
    let created: BTreeMap<u64, u64> = created.into_iter().filter(|(s, _)| !retired.contains(s)).collect();
    let mut writes: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.f.is_write() && o.outcome == EventType::Ok) {
        if let Some(c) = o.complete {
            writes.entry(o.shard).or_default().push(c);
        }
    }
    let mut faults: Vec<u64> = disruptions.iter().filter(|d| !d.repair).map(|d| d.at_ns).collect();
    faults.sort_unstable();
    let mut times: Vec<u64> = disruptions.iter().map(|d| d.at_ns).collect();
    times.sort_unstable();
    times.dedup();
    let mut out = Vec::new();
    for (&shard, &born) in &created {
        for &t in times.iter().filter(|&&t| t >= born) {
            let first = writes.get(&shard).into_iter().flatten().copied().filter(|&c| c >= t).min();
            // The latest fault at or after `t` that struck before the write
            // (or before the run ended, when no write came).
            let latest =
                |until: u64| faults.iter().copied().filter(|&f| f >= t && f <= until).max().unwrap_or(t).max(t);
            let message = match first {
                Some(c) if c <= latest(c) + bound_ns => continue,
                Some(c) => format!(
                    "shard {shard}: the first write after the disruption at {} ms took {} ms (bound {} ms from \
                     the latest fault before it, at {} ms)",
                    t / 1_000_000,
                    (c - t) / 1_000_000,
                    bound_ns / 1_000_000,
                    latest(c) / 1_000_000
                ),
                None => format!(
                    "shard {shard}: no write succeeded after the disruption at {} ms (bound {} ms)",
                    t / 1_000_000,
                    bound_ns / 1_000_000
                ),
            };
            out.push(violation("liveness", message));
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        process: u64,
        f: F,
        key: &str,
        value: Option<&str>,
        invoke: u64,
        complete: Option<u64>,
        outcome: EventType,
    ) -> Op {
        Op {
            process,
            f,
            client: "c".into(),
            shard: 1,
            key: key.into(),
            value: value.map(str::to_string),
            invoke,
            complete,
            outcome,
            staleness_ms: None,
            requested_staleness_ms: None,
            error: None,
            node: "n".into(),
            part_of: None,
        }
    }

    fn w(p: u64, v: &str, i: u64, c: u64) -> Op {
        op(p, F::Write, "k", Some(v), i, Some(c), EventType::Ok)
    }

    fn r(p: u64, v: Option<&str>, i: u64, c: u64) -> Op {
        op(p, F::Read, "k", v, i, Some(c), EventType::Ok)
    }

    fn del(p: u64, i: u64, c: u64) -> Op {
        op(p, F::Delete, "k", None, i, Some(c), EventType::Ok)
    }

    #[test]
    fn a_delete_is_a_write_of_absent() {
        // Reading absent after an acknowledged delete is fine; reading the
        // deleted value after it is not, nor absent after a later put.
        let ok = vec![w(1, "a", 0, 10), del(2, 20, 30), r(3, None, 40, 50)];
        assert!(linearizable(&ok).is_empty() && lost_writes(&ok).is_empty());
        let resurrected = vec![w(1, "a", 0, 10), del(2, 20, 30), r(3, Some("a"), 40, 50)];
        assert_eq!(linearizable(&resurrected).len(), 1);
        assert_eq!(lost_writes(&resurrected).len(), 1, "a write was acknowledged after a's: the delete");
        let lost = vec![del(1, 0, 10), w(2, "b", 20, 30), r(3, None, 40, 50)];
        assert_eq!(linearizable(&lost).len(), 1);
        assert_eq!(lost_writes(&lost).len(), 1);
        // A delete concurrent with the read may explain absent.
        let concurrent =
            vec![w(1, "a", 0, 10), op(2, F::Delete, "k", None, 35, None, EventType::Info), r(3, None, 40, 50)];
        assert!(linearizable(&concurrent).is_empty() && lost_writes(&concurrent).is_empty());
    }

    #[test]
    fn a_listing_must_agree_with_acknowledged_closes_and_deletes() {
        let close = op(1, F::CloseShard, "", None, 100, Some(110), EventType::Ok);
        let delete = op(2, F::DeleteShard, "", None, 200, Some(210), EventType::Ok);
        let list = |v: &str, at: u64| op(3, F::ListShards, "", Some(v), at, Some(at + 5), EventType::Ok);
        assert!(shard_records(&[close.clone(), list("1:read-only", 150)]).is_empty());
        assert!(shard_records(&[close.clone(), delete.clone(), list("", 300)]).is_empty());
        assert_eq!(shard_records(&[close.clone(), list("1:active", 150)]).len(), 1, "closed, listed active");
        let v = shard_records(&[close, delete, list("1:read-only", 300)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("listed shard 1 as read-only"), "{v:?}");
        // A listing that began before the delete was acknowledged may show it.
        let d = op(2, F::DeleteShard, "", None, 200, Some(210), EventType::Ok);
        assert!(shard_records(&[d, list("1:active", 205)]).is_empty());
    }

    #[test]
    fn a_rejected_close_must_have_had_no_effect() {
        let refused = |i| {
            let mut o = op(5, F::Write, "k", Some("x"), i, Some(i + 5), EventType::Fail);
            o.error = Some("shard 1 is closed (read-only) and takes no more writes: create a new shard".into());
            o
        };
        let rejected_close = op(1, F::CloseShard, "", None, 100, Some(110), EventType::Fail);
        let v = rejections(&[rejected_close.clone(), refused(200)]);
        assert_eq!(v.len(), 1, "a rejected close closed the shard: {v:?}");
        let unknown_close = op(2, F::CloseShard, "", None, 120, None, EventType::Info);
        assert!(rejections(&[rejected_close, unknown_close, refused(200)]).is_empty(), "an unknown close may have");
        let acked = op(1, F::CloseShard, "", None, 100, Some(110), EventType::Ok);
        assert!(rejections(&[acked, refused(200)]).is_empty());
    }

    #[test]
    fn a_closed_shard_takes_no_write_and_a_deleted_one_serves_nothing() {
        let close = op(1, F::CloseShard, "", None, 100, Some(110), EventType::Ok);
        let delete = op(2, F::DeleteShard, "", None, 200, Some(210), EventType::Ok);
        // Before the close: fine. A write invoked before the close was
        // acknowledged may still succeed; one invoked after may not.
        let fine = vec![close.clone(), w(3, "a", 50, 60), w(4, "b", 105, 115), r(5, Some("b"), 150, 160)];
        assert!(shard_lifecycle(&fine).is_empty(), "{:?}", shard_lifecycle(&fine));
        let late_write = vec![close.clone(), w(3, "a", 120, 130)];
        let v = shard_lifecycle(&late_write);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("close was acknowledged at"), "{v:?}");
        let late_delete = vec![close, del(3, 120, 130)];
        assert_eq!(shard_lifecycle(&late_delete).len(), 1);
        // After the delete: a read answering absent is a violation; a stale
        // read whose staleness reaches back before the delete is not.
        let served = vec![delete.clone(), r(3, None, 300, 310)];
        assert_eq!(shard_lifecycle(&served).len(), 1);
        let mut stale = op(4, F::StaleRead, "k", Some("a"), 250, Some(260), EventType::Ok);
        stale.staleness_ms = Some(0);
        assert_eq!(shard_lifecycle(&[delete.clone(), stale.clone()]).len(), 1, "fresh view after the delete");
        stale.invoke = 250_000_000;
        stale.staleness_ms = Some(100);
        let mut d = delete.clone();
        d.complete = Some(210_000_000);
        assert!(shard_lifecycle(&[d, stale]).is_empty(), "a view up to 100 ms old may predate the delete");
        // A rejected operation after the delete is what should happen.
        let rejected = vec![delete, op(5, F::Read, "k", None, 300, Some(310), EventType::Fail)];
        assert!(shard_lifecycle(&rejected).is_empty());
    }

    #[test]
    fn a_half_batch_seen_by_a_multi_key_read_is_a_violation() {
        use crate::history::encode_reads;
        let ok = EventType::Ok;
        let base = vec![
            op(1, F::Write, "a", Some("a0"), 0, Some(10), ok),
            op(2, F::Write, "b", Some("b0"), 0, Some(10), ok),
            op(3, F::BatchWrite, "a,b", Some("B"), 20, Some(30), ok),
        ];
        let read = |f: F, key: &str, a: Option<&str>, b: Option<&str>| {
            op(4, f, key, Some(&encode_reads([("a", a), ("b", b)])), 40, Some(50), ok)
        };
        // All of the batch.
        let mut h = base.clone();
        h.push(read(F::BatchRead, "a,b", Some("B"), Some("B")));
        h.push(read(F::Scan, "", Some("B"), Some("B")));
        assert!(batch_atomicity(&h).is_empty(), "{:?}", batch_atomicity(&h));
        assert!(linearizable(&project(&h)).is_empty());
        // Half of it: a scan whose pages were separate reads.
        let mut h = base.clone();
        h.push(read(F::Scan, "", Some("B"), Some("b0")));
        let v = batch_atomicity(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("key b = \"b0\""), "{}", v[0].message);
        // The other half, as absent: no delete could come after the batch.
        let mut h = base.clone();
        h.push(read(F::BatchRead, "a,b", Some("B"), None));
        assert_eq!(batch_atomicity(&h).len(), 1);
        // ... unless a delete of b ran after the batch began.
        h.push(op(5, F::Delete, "b", None, 35, Some(38), ok));
        assert!(batch_atomicity(&h).is_empty());
        // A write of b that did not finish before the batch began may follow it.
        let mut h = base.clone();
        h.push(op(6, F::Write, "b", Some("b1"), 25, Some(35), ok));
        h.push(read(F::Scan, "", Some("B"), Some("b1")));
        assert!(batch_atomicity(&h).is_empty());
    }

    #[test]
    fn batches_are_checked_key_by_key_through_the_projection() {
        use crate::history::encode_reads;
        let ok = EventType::Ok;
        // A scan that misses a key whose batch write completed before it:
        // a lost write of that key.
        let h = vec![
            op(1, F::BatchWrite, "a,b", Some("B"), 0, Some(10), ok),
            op(2, F::Scan, "", Some(&encode_reads([("a", Some("B"))])), 20, Some(30), ok),
        ];
        let flat = project(&h);
        assert_eq!(flat.len(), 4, "two writes, two reads: {flat:?}");
        assert!(flat.iter().any(|o| o.f == F::Read && o.key == "b" && o.value.is_none()));
        assert_eq!(linearizable(&flat).len(), 1);
        assert_eq!(lost_writes(&flat).len(), 1);
        // A batch read of a value never written fails the stale-read source check too.
        let h = vec![op(3, F::BatchRead, "a", Some(&encode_reads([("a", Some("X"))])), 0, Some(1), ok)];
        assert_eq!(linearizable(&project(&h)).len(), 1);
    }

    #[test]
    fn linearizable_histories_pass() {
        // Concurrent writes, then reads that agree on one order.
        let h = vec![w(1, "a", 0, 10), w(2, "b", 5, 15), r(3, Some("b"), 20, 25), r(4, Some("b"), 30, 35)];
        assert!(linearizable(&h).is_empty());
        // A read concurrent with a write may see either value.
        let h = vec![w(1, "a", 0, 10), w(2, "b", 20, 40), r(3, Some("a"), 25, 30), r(4, Some("b"), 35, 50)];
        assert!(linearizable(&h).is_empty());
        // An unknown write may take effect late, or never.
        let h = vec![
            w(1, "a", 0, 10),
            op(2, F::Write, "k", Some("x"), 12, None, EventType::Info),
            r(3, Some("a"), 20, 25),
            r(4, Some("x"), 30, 35),
        ];
        assert!(linearizable(&h).is_empty());
        assert!(linearizable(&[r(1, None, 0, 5), w(2, "a", 10, 20)]).is_empty());
    }

    /// A search past its budget is reported as a violation ("gave up"),
    /// never as a pass, even on a history that is linearizable; within the
    /// budget the same history passes, and the states it took are reported.
    /// Unknown writes nobody read are dropped before the search: many of
    /// them no longer blow the budget, and a stale read among them is still
    /// caught.
    #[test]
    fn unread_unknown_writes_do_not_blow_the_search_budget() {
        let info = |p: u64, v: &str| op(p, F::Write, "k", Some(v), 10, None, EventType::Info);
        let mut h: Vec<Op> = (0..40).map(|i| info(100 + i, &format!("lost{i}"))).collect();
        h.extend([w(1, "a", 0, 5), w(2, "b", 20, 30), r(3, Some("b"), 40, 50)]);
        let (v, states) = linearizable_within(&h, 1_000);
        assert!(v.is_empty() && states < 100, "{v:?} after {states} states");
        h.push(r(4, Some("a"), 60, 70));
        let (v, _) = linearizable_within(&h, 1_000);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("no linearization"), "{v:?}");
        // An unknown write that a read returned is kept, and may explain it.
        h.pop();
        h.push(info(5, "c"));
        h.push(r(6, Some("c"), 60, 70));
        assert!(linearizable_within(&h, 1_000).0.is_empty());
    }

    /// The search keeps its linearized set as 64-bit words: a register of
    /// more than 64 (and 128) operations passes when it is linearizable and
    /// fails when a read past the 64th or 128th goes back to an older value;
    /// concurrent pairs past the word boundary still find their order.
    #[test]
    fn registers_longer_than_one_word_of_operations() {
        let mut h = Vec::new();
        for i in 0..70u64 {
            let t = i * 100;
            h.push(w(2 * i, &format!("v{i}"), t, t + 50));
            h.push(r(2 * i + 1, Some(&format!("v{i}")), t + 60, t + 90));
        }
        // Two concurrent writes at operations 140 and 141, read in the order
        // that differs from their invocation.
        h.push(w(140, "x", 7_000, 7_100));
        h.push(w(141, "y", 7_010, 7_090));
        h.push(r(142, Some("x"), 7_200, 7_300));
        let (v, states) = linearizable_search(&h);
        assert!(v.is_empty() && states >= 143, "{v:?} after {states} states");
        let mut stale = h.clone();
        stale.push(r(143, Some("v65"), 7_400, 7_500));
        assert_eq!(linearizable(&stale).len(), 1);
        let mut stale = h[..132].to_vec();
        stale.push(r(200, Some("v1"), 6_700, 6_800));
        assert_eq!(linearizable(&stale).len(), 1);
    }

    #[test]
    fn a_search_past_its_budget_is_reported_not_passed() {
        // Eight concurrent writes, then a read of one of them: many orders to try.
        let mut h: Vec<Op> = (0..8).map(|i| w(i, &format!("v{i}"), 0, 100)).collect();
        h.push(r(9, Some("v3"), 110, 120));
        let (v, states) = linearizable_within(&h, SEARCH_LIMIT);
        assert!(v.is_empty(), "{v:?}");
        assert!(states > 8, "{states} states");
        let (v, _) = linearizable_within(&h, 5);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("search gave up after"), "{v:?}");
    }

    #[test]
    fn a_stale_read_is_not_linearizable() {
        // b is acknowledged before the read starts; reading a after it is impossible.
        let h = vec![w(1, "a", 0, 10), w(2, "b", 20, 30), r(3, Some("a"), 40, 50)];
        let v = linearizable(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("no linearization"));
        // Two reads that disagree on the order of concurrent writes.
        let h = vec![
            w(1, "a", 0, 100),
            w(2, "b", 0, 100),
            r(3, Some("a"), 110, 120),
            r(4, Some("b"), 130, 140),
            r(5, Some("a"), 150, 160),
        ];
        assert_eq!(linearizable(&h).len(), 1);
        // A failed write had no effect: reading its value is a violation.
        let h = vec![op(1, F::Write, "k", Some("f"), 0, Some(5), EventType::Fail), r(2, Some("f"), 10, 20)];
        assert_eq!(linearizable(&h).len(), 1);
    }

    #[test]
    fn a_violation_shows_the_earliest_failing_window() {
        // A write applied twice (v1, v2, v1), then many more operations that
        // are fine: the report ends at the read that broke it.
        let mut h = vec![
            w(1, "v1", 0, 1_000_000),
            r(2, Some("v1"), 2_000_000, 3_000_000),
            w(3, "v2", 4_000_000, 5_000_000),
            r(4, Some("v1"), 6_000_000, 7_000_000),
        ];
        for i in 0..30u64 {
            let t = 10_000_000 + i * 2_000_000;
            h.push(w(10 + i, "later", t, t + 1_000_000));
        }
        let v = linearizable(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        let m = &v[0].message;
        assert!(m.contains("up to 7.0 ms"), "{m}");
        assert!(m.contains("p4 Read v1 6.0-7.0 ms Ok"), "{m}");
        assert!(!m.contains("later"), "operations after the failing cut are not shown: {m}");
    }

    /// A slow read invoked early that returns a value written later is no
    /// violation by itself: the cut is by time, with operations still running
    /// counted as pending, so the report names the real one.
    #[test]
    fn a_slow_read_does_not_move_the_window_before_the_write_it_saw() {
        let h = vec![
            w(1, "a", 0, 1_000_000),
            // Invoked at 2 ms, answers at 20 ms with b, written from 5 ms.
            r(2, Some("b"), 2_000_000, 20_000_000),
            w(3, "b", 5_000_000, 6_000_000),
            w(4, "c", 8_000_000, 9_000_000),
            // The real violation: a is read after c was acknowledged.
            r(5, Some("a"), 10_000_000, 11_000_000),
        ];
        let v = linearizable(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        let m = &v[0].message;
        assert!(m.contains("up to 11.0 ms"), "{m}");
        assert!(m.contains("p5 Read a 10.0-11.0 ms Ok"), "{m}");
    }

    #[test]
    fn history_at_a_time_makes_running_writes_pending_and_drops_running_reads() {
        let h = [w(1, "a", 0, 10), r(2, Some("a"), 5, 20), w(3, "b", 6, 30), r(4, Some("b"), 40, 50)];
        let refs: Vec<&Op> = h.iter().collect();
        let at = history_at(&refs, 15);
        assert_eq!(at.len(), 2, "{at:?}");
        assert_eq!((at[0].outcome, at[0].complete), (EventType::Ok, Some(10)));
        assert_eq!((at[1].process, at[1].outcome, at[1].complete), (3, EventType::Info, None));
    }

    #[test]
    fn lost_writes_are_named() {
        let h = vec![w(1, "a", 0, 10), w(2, "b", 20, 30), r(3, Some("a"), 40, 50)];
        let v = lost_writes(&h);
        assert_eq!(v.len(), 1);
        assert!(v[0].message.contains("\"b\""), "{v:?}");
        let v = lost_writes(&[w(1, "a", 0, 10), r(2, None, 20, 30)]);
        assert_eq!(v.len(), 1, "reading nothing after an acknowledged write");
        assert!(lost_writes(&[w(1, "a", 0, 10), w(2, "b", 5, 30), r(3, Some("b"), 20, 25)]).is_empty());
    }

    fn sync(volume: &str, node: &str, epoch: u64, at_ms: u64) -> SyncRecord {
        SyncRecord {
            at_ms,
            volume: volume.into(),
            node: node.into(),
            epoch,
            bytes: 1,
            scope: volume.into(),
            open: false,
        }
    }

    #[test]
    fn stale_reads_must_return_a_written_value() {
        let stale = |v: &str, i, c| op(9, F::StaleRead, "k", Some(v), i, Some(c), EventType::Ok);
        assert!(stale_reads(&[w(1, "a", 0, 10), w(2, "b", 20, 30), stale("a", 40, 50)]).is_empty(), "stale is allowed");
        assert_eq!(stale_reads(&[w(1, "a", 0, 10), stale("zz", 40, 50)]).len(), 1, "a value nobody wrote");
        let failed = op(1, F::Write, "k", Some("f"), 0, Some(5), EventType::Fail);
        assert_eq!(stale_reads(&[failed, stale("f", 10, 20)]).len(), 1, "a failed write's value");
        assert_eq!(stale_reads(&[w(1, "late", 60, 70), stale("late", 10, 20)]).len(), 1, "from the future");
    }

    /// An index scan that saw one key under two values read two states; one
    /// that saw each key once is checked like a scan (a key it did not list
    /// was absent).
    #[test]
    fn index_hits_catches_a_key_listed_twice_and_project_reads_the_rest() {
        let hits = |reads: &[(&str, &str)]| {
            let value = crate::history::encode_reads(reads.iter().map(|(k, v)| (*k, Some(*v))));
            op(5, F::ScanIndex, "", Some(&value), 40, Some(50), EventType::Ok)
        };
        assert!(index_hits(&[hits(&[("a", "x"), ("b", "y")])]).is_empty());
        let v = index_hits(&[hits(&[("a", "x"), ("b", "y"), ("a", "z")])]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("key a twice"), "{v:?}");
        // "k" was written before the scan began and never deleted: a scan
        // that did not list it breaks linearizability.
        let h = vec![w(1, "x", 0, 10), hits(&[])];
        assert_eq!(linearizable(&project(&h)).len(), 1);
        let h = vec![w(1, "x", 0, 10), hits(&[("k", "x")])];
        assert!(linearizable(&project(&h)).is_empty());
    }

    /// A stale read answered from a view older than it asked for is caught.
    #[test]
    fn stale_bounds_catches_an_answer_older_than_asked() {
        let stale = |asked: Option<u64>, got: u64| {
            let mut o = op(9, F::StaleRead, "k", Some("a"), 0, Some(1), EventType::Ok);
            (o.requested_staleness_ms, o.staleness_ms) = (asked, Some(got));
            o
        };
        assert!(stale_bounds(&[stale(Some(50), 50), stale(None, 5_000)]).is_empty());
        let v = stale_bounds(&[stale(Some(50), 51)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("at most 50 ms old") && v[0].message.contains("51 ms old"), "{v:?}");
    }

    /// ShardStats may not count keys never written, nor call a closed shard active.
    #[test]
    fn shard_stats_catches_phantom_keys_and_a_closed_shard_reported_active() {
        let stats = |value: &str, at: u64| op(6, F::ShardStats, "", Some(value), at, Some(at + 5), EventType::Ok);
        let close = op(7, F::CloseShard, "", None, 20, Some(30), EventType::Ok);
        let ok = vec![w(1, "x", 0, 10), stats("live_keys=1 state=active", 12), close.clone()];
        assert!(shard_stats(&ok).is_empty());
        let v = shard_stats(&[w(1, "x", 0, 10), stats("live_keys=2 state=active", 12)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("1 keys had been written"), "{v:?}");
        // "k" was acknowledged before and never deleted: it must be counted.
        let v = shard_stats(&[w(1, "x", 0, 10), stats("live_keys=0 state=active", 12)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("1 were certainly present"), "{v:?}");
        // A delete that may have taken effect, or a write still running, proves nothing.
        let delete = op(8, F::Delete, "k", None, 11, None, EventType::Info);
        assert!(shard_stats(&[w(1, "x", 0, 10), delete, stats("live_keys=0 state=active", 12)]).is_empty());
        assert!(shard_stats(&[w(1, "x", 0, 20), stats("live_keys=0 state=active", 12)]).is_empty());
        assert!(shard_stats(&[w(1, "x", 0, 10), close.clone(), stats("live_keys=1 state=read-only", 40)]).is_empty());
        let v = shard_stats(&[w(1, "x", 0, 10), close, stats("live_keys=1 state=active", 40)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("after its close"), "{v:?}");
    }

    /// A stale scan is checked key by key, each key with its own page's age.
    #[test]
    fn stale_scan_pages_are_checked_with_their_own_ages() {
        let ms = 1_000_000;
        let scan = |reads: &[(&str, &str, u64)]| {
            let values: Vec<(String, String)> =
                reads.iter().map(|(k, v, age)| (k.to_string(), crate::history::aged(v, *age))).collect();
            let value = crate::history::encode_reads(values.iter().map(|(k, v)| (k.as_str(), Some(v.as_str()))));
            let mut o = op(9, F::StaleScan, "", Some(&value), 100 * ms, Some(101 * ms), EventType::Ok);
            o.staleness_ms = reads.iter().map(|r| r.2).max();
            o
        };
        let at = |key: &str, p, v: &str, i, c| {
            let mut o = w(p, v, i, c);
            o.key = key.into();
            o
        };
        // "a" at k0 was replaced at 3 ms, "x" at k1 is current.
        let writes = vec![at("k0", 1, "a", 0, ms), at("k0", 2, "b", 2 * ms, 3 * ms), at("k1", 3, "x", 0, ms)];
        let check = |read: Op| {
            let h = project(&[writes.clone(), vec![read]].concat());
            [stale_ages(&h), stale_reads(&h)].concat()
        };
        assert!(check(scan(&[("k0", "a", 97), ("k1", "x", 0)])).is_empty());
        // The page holding k0 says 5 ms, the other page's 97 ms does not cover it.
        let v = check(scan(&[("k0", "a", 5), ("k1", "x", 97)]));
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("key k0") && v[0].message.contains("reporting 5 ms"), "{v:?}");
        // A value no one wrote is caught too.
        assert_eq!(check(scan(&[("k1", "zz", 0)])).len(), 1);
    }

    /// A stale read may be as old as it says, not older.
    #[test]
    fn stale_ages_catches_a_read_older_than_its_reported_age() {
        let ms = 1_000_000;
        let stale = |v: &str, at: u64, age: u64| {
            let mut o = op(9, F::StaleRead, "k", Some(v), at * ms, Some(at * ms + ms), EventType::Ok);
            o.staleness_ms = Some(age);
            o
        };
        let history = |read: Op| vec![w(1, "a", 0, ms), w(2, "b", 2 * ms, 3 * ms), read];
        // "a" was replaced at 3 ms: a read at 100 ms may return it only with an age of at least 97 ms.
        assert!(stale_ages(&history(stale("a", 100, 97))).is_empty());
        assert!(stale_ages(&history(stale("b", 100, 0))).is_empty());
        let v = stale_ages(&history(stale("a", 100, 50)));
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("reporting 50 ms") && v[0].message.contains("acknowledged at 3 ms"), "{v:?}");
        // Overlapping writes have no order: either value may be current.
        let overlapping = vec![w(1, "a", 0, 5 * ms), w(2, "b", 2 * ms, 3 * ms), stale("a", 100, 0)];
        assert!(stale_ages(&overlapping).is_empty());
        // A delete replaces a value too.
        let deleted = vec![w(1, "a", 0, ms), op(2, F::Delete, "k", None, 2 * ms, Some(3 * ms), EventType::Ok)];
        assert_eq!(stale_ages(&[deleted, vec![stale("a", 100, 10)]].concat()).len(), 1);
    }

    #[test]
    fn single_writer_catches_an_old_epoch_and_a_shared_epoch() {
        assert!(single_writer(&[sync("v", "a", 1, 1), sync("v", "b", 2, 2), sync("w", "a", 1, 3)]).is_empty());
        let v = single_writer(&[sync("v", "a", 1, 1), sync("v", "b", 2, 2), sync("v", "a", 1, 3)]);
        assert_eq!(v.len(), 1);
        assert!(v[0].message.contains("epoch 1"), "{v:?}");
        assert_eq!(single_writer(&[sync("v", "a", 1, 1), sync("v", "b", 1, 2)]).len(), 1);
    }

    /// Under the EPOCH file the rule is per shard directory: an old epoch
    /// may still land in a shard the new primary has not opened (its LOCK
    /// is held), but not in one the new epoch wrote.
    #[test]
    fn single_writer_under_the_epoch_file_is_per_shard_directory() {
        let in_dir = |dir: &str, node: &str, epoch: u64, at_ms: u64| SyncRecord {
            scope: format!("v/{dir}"),
            ..sync("v", node, epoch, at_ms)
        };
        assert!(single_writer(&[in_dir("s1", "a", 1, 1), in_dir("s2", "b", 2, 2), in_dir("s1", "a", 1, 3)]).is_empty());
        let v = single_writer(&[in_dir("s1", "a", 1, 1), in_dir("s1", "b", 2, 2), in_dir("s1", "a", 1, 3)]);
        assert_eq!(v.len(), 1);
        assert!(v[0].message.contains("shard directory v/s1"), "{v:?}");
        // A successor that opened the shard at epoch 2, before it wrote: a
        // write of epoch 1 landing after the open is one its state misses.
        let open = SyncRecord { open: true, bytes: 0, ..in_dir("s1", "b", 2, 2) };
        let v = single_writer(&[in_dir("s1", "a", 1, 1), open.clone(), in_dir("s1", "a", 1, 3)]);
        assert_eq!(v.len(), 1, "{v:?}");
        // An open of an older epoch writes nothing, so it breaks nothing.
        let stale_open = SyncRecord { epoch: 1, node: "a".into(), at_ms: 4, ..open };
        assert!(single_writer(&[in_dir("s1", "b", 2, 1), stale_open, in_dir("s1", "b", 2, 5)]).is_empty());
    }

    fn created(p: u64, client: &str, shard: u64, i: u64, c: u64) -> Op {
        let mut o = op(p, F::NewShard, "", None, i, Some(c), EventType::Ok);
        o.shard = shard;
        o.client = client.into();
        o
    }

    #[test]
    fn shard_ids_must_be_unique_and_increase() {
        assert!(
            shard_ids(&[created(1, "c", 1, 0, 10), created(2, "c", 2, 20, 30), created(3, "c", 3, 25, 28)]).is_empty()
        );
        assert_eq!(shard_ids(&[created(1, "c", 5, 0, 10), created(2, "c", 3, 20, 30)]).len(), 1);
        assert_eq!(shard_ids(&[created(1, "c", 5, 0, 10), created(2, "c", 5, 0, 10)]).len(), 1);
    }

    #[test]
    fn isolation_catches_a_foreign_success() {
        let mut foreign = w(2, "x", 20, 30);
        foreign.client = "mallory".into();
        assert_eq!(isolation(&[created(1, "c", 1, 0, 10), foreign.clone()]).len(), 1);
        foreign.outcome = EventType::Fail;
        assert!(isolation(&[created(1, "c", 1, 0, 10), foreign]).is_empty());
    }

    #[test]
    fn a_foreign_write_is_no_owner_operation_and_a_read_of_it_is_caught() {
        let mut stolen = w(2, "stolen", 20, 30);
        stolen.client = "mallory".into();
        stolen.outcome = EventType::Info;
        stolen.complete = None;
        let owner = w(3, "mine", 40, 50);
        let ops = vec![created(1, "c", 1, 0, 10), stolen.clone(), owner.clone()];
        let kept = owners_only(ops.clone());
        assert_eq!(kept.len(), 2, "mallory's write is left to the isolation checks");
        assert!(kept.iter().all(|o| o.client == "c"));
        assert!(foreign_values(&ops).is_empty());
        let seen = r(4, Some("stolen"), 60, 70);
        assert_eq!(foreign_values(&[ops.clone(), vec![seen]].concat()).len(), 1, "the owner read mallory's value");
        assert!(foreign_values(&[ops, vec![r(4, Some("mine"), 60, 70)]].concat()).is_empty());
    }

    #[test]
    fn full_windows_leave_out_other_faults_and_the_time_to_recover_from_them() {
        use attache_faults::{Fault, Scheduled};
        let at = |at_ms, fault| Scheduled { at_ms, fault, when: None };
        let full = |for_ms| Fault::DiskFull { volume: "vol-1".into(), for_ms };
        let crash = Fault::NodeCrash { node: "node-1".into() };
        let w = |start: u64, end: u64, cut| FullWindow { start: start * 1_000_000, end: end * 1_000_000, cut };
        assert_eq!(full_windows(&[at(1_000, full(5_000))], 500), vec![w(1_000, 6_000, false)]);
        // A crash at 2 s: from 2 s to 2.5 s is left out.
        let windows = full_windows(&[at(1_000, full(5_000)), at(2_000, crash.clone())], 500);
        assert_eq!(windows, vec![w(1_000, 2_000, true), w(2_500, 6_000, false)]);
        // An outage counts until it ended: 3 s of metadata outage from 0.
        let windows = full_windows(&[at(1_000, full(5_000)), at(0, Fault::MetadataUnavailable { for_ms: 3_000 })], 500);
        assert_eq!(windows, vec![w(3_500, 6_000, false)]);
        assert!(full_windows(&[at(1_000, full(5_000)), at(900, crash)], 6_000).is_empty());
    }

    #[test]
    fn reads_while_full_must_be_served_unless_the_shard_was_deleted() {
        let windows = [FullWindow { start: 10, end: 20, cut: false }];
        let mut refused = op(1, F::Read, "k", None, 12, Some(13), EventType::Fail);
        refused.error = Some("volume vol-1: open shard 1: no space left on the volume; retry".into());
        let outside = op(1, F::Read, "k", None, 21, Some(22), EventType::Fail);
        let served = op(2, F::Read, "k", None, 11, Some(12), EventType::Ok);
        assert_eq!(reads_while_full(&[refused.clone(), outside, served], &windows).len(), 1);
        let unknown = op(1, F::Scan, "", None, 15, None, EventType::Info);
        assert_eq!(reads_while_full(&[unknown], &windows).len(), 1, "a read that never ended was not served");
        // A delete invoked before the read ended explains a refusal.
        let delete = Op { f: F::DeleteShard, ..op(3, F::DeleteShard, "", None, 12, Some(14), EventType::Ok) };
        assert!(reads_while_full(&[refused.clone(), delete.clone()], &windows).is_empty());
        let refused_delete = Op { outcome: EventType::Fail, ..delete };
        assert_eq!(
            reads_while_full(&[refused.clone(), refused_delete], &windows).len(),
            1,
            "a refused delete did nothing"
        );
        // Another fault cut the window at 20: a read still under way then is not counted.
        let cut = [FullWindow { cut: true, ..windows[0] }];
        let late = Op { complete: Some(21), ..refused.clone() };
        assert!(reads_while_full(std::slice::from_ref(&late), &cut).is_empty());
        assert_eq!(reads_while_full(&[late], &windows).len(), 1);
        assert_eq!(reads_while_full(&[refused], &cut).len(), 1, "one that ended before the cut counts");
    }

    #[test]
    fn liveness_needs_a_write_within_the_bound() {
        let h = vec![created(1, "c", 1, 0, 1), w(2, "a", 1_000, 2_000)];
        assert!(liveness(&h, &[fault(1_000)], 5_000).is_empty());
        assert_eq!(liveness(&h, &[fault(1_000)], 500).len(), 1);
        assert_eq!(liveness(&h, &[fault(3_000)], 5_000).len(), 1);
    }

    #[test]
    fn liveness_is_checked_after_every_disruption_not_only_the_last() {
        // A crash at 2 ns, nothing served until the node's restart at 20 ns
        // (no failover), then writes again: the restart hides nothing.
        let h = vec![created(1, "c", 1, 0, 1), w(2, "a", 0, 1), w(3, "a", 21, 22), w(4, "a", 30, 31)];
        assert!(liveness(&h, &[repair(20)], 5).is_empty(), "from the repair alone the run looks live");
        let v = liveness(&h, &[fault(2), repair(20)], 5);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("disruption at 0 ms"), "{v:?}");
        // A shard created after a disruption is not held to it.
        let late = vec![created(1, "c", 1, 10, 11), w(2, "a", 12, 13)];
        assert!(liveness(&late, &[fault(5)], 5).is_empty());
        // A fault never repaired, and no write after it.
        assert_eq!(liveness(&[created(1, "c", 1, 0, 1), w(2, "a", 1, 2)], &[fault(3)], 5).len(), 1);
        // A second fault during the outage gives the bound again from it; a
        // repair does not.
        let h = vec![created(1, "c", 1, 0, 1), w(2, "a", 12, 14)];
        assert!(liveness(&h, &[fault(2), fault(10)], 5).is_empty());
        assert_eq!(liveness(&h, &[fault(2), repair(10)], 5).len(), 1);
    }

    fn fault(at_ns: u64) -> Disruption {
        Disruption { at_ns, repair: false }
    }

    fn repair(at_ns: u64) -> Disruption {
        Disruption { at_ns, repair: true }
    }
}
