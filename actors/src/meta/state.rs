//! The embedded metadata store's state machine: keys with revisions, leases,
//! and the watch history, changed only by applying [`Record`]s.
//!
//! Every change is first written to the store's log as a record, then applied
//! here; recovery applies the same records in the same order, so the state
//! after a restart is the state that was acknowledged. Nothing here does I/O
//! or reads a clock: lease expiry takes `now` from the caller.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use tokio::time::{Duration, Instant};

use crate::meta::backend::{
    CompareOp, CompareTarget, KeyValue, LeaseId, MetaError, RangeResponse, Revision, Txn, TxnOp, TxnResponse,
    WatchEvent,
};

/// A key for an error message (keys are UTF-8 paths in practice).
fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Most watch events kept for watches that start in the past.
pub const HISTORY_EVENTS: usize = 10_000;

/// One write to the keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    /// Sets `key` to `value`, attached to `lease`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease to attach the key to, 0 for none (a live lease otherwise).
        lease: LeaseId,
    },
    /// Removes `key` (a no-op when absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// A logged change. Applying the same records in the same order always gives
/// the same state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// Writes at one new revision.
    Write {
        /// The writes, applied in order.
        ops: Vec<Mutation>,
    },
    /// A lease with its TTL in milliseconds.
    LeaseGrant {
        /// The new lease's id.
        id: LeaseId,
        /// The lease's TTL, ms.
        ttl_ms: u64,
    },
    /// The end of a lease (revoked or expired): its keys are deleted at one new revision.
    LeaseEnd {
        /// The lease (a no-op when it is already gone).
        id: LeaseId,
    },
    /// The whole state, first record of a compacted log.
    Snapshot(Snapshot),
}

/// The persistent part of the state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The store revision at the snapshot.
    pub revision: Revision,
    /// Every key, with its revisions and lease.
    pub kvs: Vec<KeyValue>,
    /// (lease id, TTL in ms).
    pub leases: Vec<(LeaseId, u64)>,
    /// The id the next granted lease gets.
    pub next_lease: LeaseId,
}

#[derive(Clone, Debug)]
struct Lease {
    ttl_ms: u64,
    expires_at: Instant,
    keys: BTreeSet<Vec<u8>>,
}

/// The state machine; see the module docs.
#[derive(Debug)]
pub struct StateMachine {
    kv: BTreeMap<Vec<u8>, KeyValue>,
    revision: Revision,
    leases: BTreeMap<LeaseId, Lease>,
    next_lease: LeaseId,
    history: VecDeque<WatchEvent>,
    /// The history holds every event at revisions above this one.
    compacted: Revision,
}

impl Default for StateMachine {
    fn default() -> Self {
        StateMachine {
            kv: BTreeMap::new(),
            revision: 1,
            leases: BTreeMap::new(),
            next_lease: 1,
            history: VecDeque::new(),
            compacted: 0,
        }
    }
}

fn compare_ord<T: Ord>(a: T, op: CompareOp, b: T) -> bool {
    match op {
        CompareOp::Equal => a == b,
        CompareOp::NotEqual => a != b,
        CompareOp::Less => a < b,
        CompareOp::Greater => a > b,
    }
}

fn put_kv(existing: Option<&KeyValue>, key: &[u8], value: &[u8], lease: LeaseId, rev: Revision) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        value: value.to_vec(),
        create_revision: existing.map_or(rev, |kv| kv.create_revision),
        mod_revision: rev,
        version: existing.map_or(1, |kv| kv.version + 1),
        lease,
    }
}

impl StateMachine {
    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// A key.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.kv.get(key).cloned()
    }

    /// Keys under `prefix`.
    pub fn range(&self, prefix: &[u8]) -> RangeResponse {
        let kvs = self
            .kv
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        RangeResponse { kvs, revision: self.revision }
    }

    /// The TTL of a live lease, ms.
    pub fn lease_ttl(&self, id: LeaseId) -> Option<u64> {
        self.leases.get(&id).map(|l| l.ttl_ms)
    }

    /// Pushes a live lease's expiry to `now + ttl`; returns the TTL.
    pub fn keep_alive(&mut self, id: LeaseId, now: Instant) -> Result<u64, MetaError> {
        let lease = self.leases.get_mut(&id).ok_or(MetaError::LeaseNotFound(id))?;
        lease.expires_at = now + Duration::from_millis(lease.ttl_ms);
        Ok(lease.ttl_ms)
    }

    /// The record granting a new lease.
    pub fn grant(&self, ttl_ms: u64) -> Result<Record, MetaError> {
        if ttl_ms == 0 {
            return Err(MetaError::Invalid("lease TTL must be positive".into()));
        }
        Ok(Record::LeaseGrant { id: self.next_lease, ttl_ms })
    }

    /// The records that end every lease expired at `now`, in lease id order.
    pub fn expired(&self, now: Instant) -> Vec<Record> {
        self.leases.iter().filter(|(_, l)| l.expires_at <= now).map(|(&id, _)| Record::LeaseEnd { id }).collect()
    }

    /// Plans `txn`: its response as it will be once `record` (if any) is applied.
    ///
    /// Errors: `LeaseNotFound` when a put names a dead lease, `Invalid` when
    /// a branch writes one key twice (as etcd).
    pub fn plan_txn(&self, txn: &Txn) -> Result<(TxnResponse, Option<Record>), MetaError> {
        let holds = txn.compare.iter().all(|c| {
            let kv = self.kv.get(&c.key);
            match (&c.target, kv) {
                (CompareTarget::Value(_), None) => false,
                (CompareTarget::Value(v), Some(kv)) => compare_ord(&kv.value, c.op, v),
                (CompareTarget::ModRevision(r), kv) => compare_ord(kv.map_or(0, |kv| kv.mod_revision), c.op, *r),
                (CompareTarget::CreateRevision(r), kv) => compare_ord(kv.map_or(0, |kv| kv.create_revision), c.op, *r),
                (CompareTarget::Version(v), kv) => compare_ord(kv.map_or(0, |kv| kv.version), c.op, *v),
            }
        });
        let ops = if holds { &txn.success } else { &txn.failure };
        let rev = self.revision + 1;
        let mut overlay: BTreeMap<&[u8], Option<KeyValue>> = BTreeMap::new();
        let mut written: BTreeSet<&[u8]> = BTreeSet::new();
        let mut mutations = Vec::new();
        let mut gets = Vec::new();
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    if *lease != 0 && !self.leases.contains_key(lease) {
                        return Err(MetaError::LeaseNotFound(*lease));
                    }
                    if !written.insert(key) {
                        return Err(MetaError::Invalid("duplicate key given in txn request".into()));
                    }
                    let current = overlay.get(key.as_slice()).cloned().unwrap_or_else(|| self.kv.get(key).cloned());
                    overlay.insert(key, Some(put_kv(current.as_ref(), key, value, *lease, rev)));
                    mutations.push(Mutation::Put { key: key.clone(), value: value.clone(), lease: *lease });
                }
                TxnOp::Delete { key } => {
                    if !written.insert(key) {
                        return Err(MetaError::Invalid("duplicate key given in txn request".into()));
                    }
                    let exists =
                        overlay.get(key.as_slice()).cloned().unwrap_or_else(|| self.kv.get(key).cloned()).is_some();
                    overlay.insert(key, None);
                    if exists {
                        mutations.push(Mutation::Delete { key: key.clone() });
                    }
                }
                TxnOp::Get { key } => {
                    gets.push(overlay.get(key.as_slice()).cloned().unwrap_or_else(|| self.kv.get(key).cloned()));
                }
            }
        }
        let record = (!mutations.is_empty()).then_some(Record::Write { ops: mutations });
        let revision = if record.is_some() { rev } else { self.revision };
        Ok((TxnResponse { succeeded: holds, revision, gets }, record))
    }

    /// Applies `record` at `now` (for lease expiry times); returns the watch
    /// events it produced, in order.
    ///
    /// Errors: `Storage` naming the inconsistency when the record cannot
    /// follow the state (a lease id that does not increase, a put or a
    /// snapshot key naming a lease that does not exist): a log that is
    /// corrupt in a way its checksums did not catch. The state is unchanged.
    pub fn apply(&mut self, record: &Record, now: Instant) -> Result<Vec<WatchEvent>, MetaError> {
        self.check(record)?;
        let events = match record {
            Record::Write { ops } => {
                let rev = self.revision + 1;
                let mut events = Vec::with_capacity(ops.len());
                for op in ops {
                    events.extend(match op {
                        Mutation::Put { key, value, lease } => self.put_at(key, value, *lease, rev),
                        Mutation::Delete { key } => self.delete_at(key, rev),
                    });
                }
                if !events.is_empty() {
                    self.revision = rev;
                }
                events
            }
            Record::LeaseGrant { id, ttl_ms } => {
                let expires_at = now + Duration::from_millis(*ttl_ms);
                self.leases.insert(*id, Lease { ttl_ms: *ttl_ms, expires_at, keys: BTreeSet::new() });
                self.next_lease = id + 1;
                Vec::new()
            }
            Record::LeaseEnd { id } => {
                let Some(lease) = self.leases.remove(id) else {
                    return Ok(Vec::new());
                };
                let rev = self.revision + 1;
                let events: Vec<_> = lease.keys.iter().filter_map(|k| self.delete_at(k, rev)).collect();
                if !events.is_empty() {
                    self.revision = rev;
                }
                events
            }
            Record::Snapshot(snap) => {
                *self = StateMachine::default();
                self.revision = snap.revision;
                self.compacted = snap.revision;
                self.next_lease = snap.next_lease;
                for &(id, ttl_ms) in &snap.leases {
                    let expires_at = now + Duration::from_millis(ttl_ms);
                    self.leases.insert(id, Lease { ttl_ms, expires_at, keys: BTreeSet::new() });
                }
                for kv in &snap.kvs {
                    if let Some(l) = self.leases.get_mut(&kv.lease) {
                        l.keys.insert(kv.key.clone());
                    }
                    self.kv.insert(kv.key.clone(), kv.clone());
                }
                Vec::new()
            }
        };
        for e in &events {
            self.history.push_back(e.clone());
        }
        while self.history.len() > HISTORY_EVENTS {
            let Some(dropped) = self.history.pop_front() else { break };
            self.compacted = self.compacted.max(dropped.revision());
        }
        Ok(events)
    }

    /// Checks that `record` can follow the state (see [`StateMachine::apply`]).
    fn check(&self, record: &Record) -> Result<(), MetaError> {
        let bad = |what: String| Err(MetaError::Storage(format!("inconsistent metadata record: {what}")));
        match record {
            Record::Write { ops } => {
                for op in ops {
                    if let Mutation::Put { key, lease, .. } = op {
                        if *lease != 0 && !self.leases.contains_key(lease) {
                            return bad(format!("a put of {} names lease {lease}, which does not exist", show(key)));
                        }
                    }
                }
            }
            Record::LeaseGrant { id, .. } if *id < self.next_lease => {
                return bad(format!("lease {id} is granted after lease ids reached {}", self.next_lease));
            }
            Record::Snapshot(snap) => {
                let leases: BTreeSet<LeaseId> = snap.leases.iter().map(|l| l.0).collect();
                if let Some(kv) = snap.kvs.iter().find(|kv| kv.lease != 0 && !leases.contains(&kv.lease)) {
                    return bad(format!(
                        "snapshot key {} names lease {}, not in the snapshot",
                        show(&kv.key),
                        kv.lease
                    ));
                }
                if let Some(id) = leases.iter().find(|id| **id >= snap.next_lease) {
                    return bad(format!("snapshot lease {id} is not below its next lease id {}", snap.next_lease));
                }
            }
            Record::LeaseGrant { .. } | Record::LeaseEnd { .. } => {}
        }
        Ok(())
    }

    fn put_at(&mut self, key: &[u8], value: &[u8], lease: LeaseId, rev: Revision) -> Option<WatchEvent> {
        let kv = put_kv(self.kv.get(key), key, value, lease, rev);
        if let Some(old) = self.kv.get(key) {
            if old.lease != 0 && old.lease != lease {
                if let Some(l) = self.leases.get_mut(&old.lease) {
                    l.keys.remove(key);
                }
            }
        }
        if let Some(l) = self.leases.get_mut(&lease) {
            // Lease 0 (none) is never in the map; others were checked by `check`.
            l.keys.insert(key.to_vec());
        }
        self.kv.insert(key.to_vec(), kv.clone());
        Some(WatchEvent::Put(kv))
    }

    fn delete_at(&mut self, key: &[u8], rev: Revision) -> Option<WatchEvent> {
        let old = self.kv.remove(key)?;
        if old.lease != 0 {
            if let Some(l) = self.leases.get_mut(&old.lease) {
                l.keys.remove(key);
            }
        }
        Some(WatchEvent::Delete { key: key.to_vec(), mod_revision: rev })
    }

    /// Events under `prefix` at revisions `>= from`, from the history.
    ///
    /// Errors: `Compacted` when `from` is at or below the compacted revision.
    pub fn history_since(&self, prefix: &[u8], from: Revision) -> Result<Vec<WatchEvent>, MetaError> {
        if from <= self.compacted {
            return Err(MetaError::Compacted { requested: from, oldest: self.compacted + 1 });
        }
        Ok(self.history.iter().filter(|e| e.revision() >= from && e.key().starts_with(prefix)).cloned().collect())
    }

    /// The persistent state, for a compacted log.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            kvs: self.kv.values().cloned().collect(),
            leases: self.leases.iter().map(|(&id, l)| (id, l.ttl_ms)).collect(),
            next_lease: self.next_lease,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::backend::Compare;

    fn put(key: &str, value: &str) -> TxnOp {
        TxnOp::Put { key: key.into(), value: value.into(), lease: 0 }
    }

    fn run(sm: &mut StateMachine, txn: Txn) -> TxnResponse {
        let (resp, record) = sm.plan_txn(&txn).unwrap();
        if let Some(r) = record {
            sm.apply(&r, Instant::now()).unwrap();
        }
        resp
    }

    #[test]
    fn revisions_versions_and_compares() {
        let mut sm = StateMachine::default();
        assert_eq!(sm.revision(), 1);
        let r = run(&mut sm, Txn { success: vec![put("a", "1")], ..Default::default() });
        assert_eq!((r.succeeded, r.revision), (true, 2));
        run(&mut sm, Txn { success: vec![put("a", "2")], ..Default::default() });
        let a = sm.get(b"a").unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 3, 2));
        // A stale CAS fails and changes nothing.
        let stale = Txn {
            compare: vec![Compare::mod_revision("a", CompareOp::Equal, 2)],
            success: vec![put("a", "x")],
            failure: vec![TxnOp::Get { key: "a".into() }],
        };
        let r = run(&mut sm, stale);
        assert!(!r.succeeded);
        assert_eq!(r.revision, 3);
        assert_eq!(r.gets, vec![Some(a.clone())]);
        // Value compare on a missing key is false whatever the operator.
        let missing = Txn { compare: vec![Compare::value("zz", CompareOp::NotEqual, "q")], ..Default::default() };
        assert!(!run(&mut sm, missing).succeeded);
        // Duplicate writes to one key are rejected.
        let dup = Txn { success: vec![put("b", "1"), put("b", "2")], ..Default::default() };
        assert!(matches!(sm.plan_txn(&dup), Err(MetaError::Invalid(_))));
    }

    #[test]
    fn leases_delete_their_keys_at_one_revision() {
        let mut sm = StateMachine::default();
        let now = Instant::now();
        let grant = sm.grant(100).unwrap();
        sm.apply(&grant, now).unwrap();
        let Record::LeaseGrant { id, .. } = grant else { unreachable!() };
        let txn = Txn {
            success: vec![
                TxnOp::Put { key: "n/1".into(), value: vec![], lease: id },
                TxnOp::Put { key: "n/2".into(), value: vec![], lease: id },
            ],
            ..Default::default()
        };
        run(&mut sm, txn);
        assert!(sm.expired(now + Duration::from_millis(99)).is_empty());
        let ends = sm.expired(now + Duration::from_millis(100));
        assert_eq!(ends, vec![Record::LeaseEnd { id }]);
        let events = sm.apply(&ends[0], now).unwrap();
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.revision() == 3));
        assert!(sm.range(b"n/").kvs.is_empty());
        assert_eq!(sm.keep_alive(id, now), Err(MetaError::LeaseNotFound(id)));
        let bad = Txn { success: vec![TxnOp::Put { key: "x".into(), value: vec![], lease: id }], ..Default::default() };
        assert_eq!(sm.plan_txn(&bad).unwrap_err(), MetaError::LeaseNotFound(id));
    }

    #[test]
    fn snapshot_restores_state() {
        let mut sm = StateMachine::default();
        let now = Instant::now();
        let grant = sm.grant(5000).unwrap();
        sm.apply(&grant, now).unwrap();
        run(
            &mut sm,
            Txn {
                success: vec![put("k", "v"), TxnOp::Put { key: "l".into(), value: vec![], lease: 1 }],
                ..Default::default()
            },
        );
        let snap = sm.snapshot();
        let mut restored = StateMachine::default();
        restored.apply(&Record::Snapshot(snap.clone()), now).unwrap();
        assert_eq!(restored.snapshot(), snap);
        assert!(matches!(restored.history_since(b"", 2), Err(MetaError::Compacted { .. })));
        assert_eq!(restored.history_since(b"", restored.revision() + 1).unwrap(), vec![]);
        // The lease still owns its key after the restore.
        let end = restored.expired(now + Duration::from_secs(6));
        restored.apply(&end[0], now).unwrap();
        assert_eq!(restored.range(b"").kvs.len(), 1);
    }

    #[test]
    fn inconsistent_records_are_errors_that_change_nothing() {
        let now = Instant::now();
        let mut sm = StateMachine::default();
        sm.apply(&Record::LeaseGrant { id: 5, ttl_ms: 100 }, now).unwrap();
        let before = sm.snapshot();
        let cases = [
            (Record::LeaseGrant { id: 3, ttl_ms: 100 }, "lease 3 is granted after lease ids reached 6"),
            (
                Record::Write { ops: vec![Mutation::Put { key: b"n/a".to_vec(), value: vec![], lease: 9 }] },
                "a put of n/a names lease 9",
            ),
            (
                Record::Snapshot(Snapshot {
                    revision: 4,
                    kvs: vec![KeyValue {
                        key: b"k".to_vec(),
                        value: vec![],
                        create_revision: 1,
                        mod_revision: 1,
                        version: 1,
                        lease: 2,
                    }],
                    leases: vec![],
                    next_lease: 3,
                }),
                "snapshot key k names lease 2",
            ),
            (
                Record::Snapshot(Snapshot { revision: 4, kvs: vec![], leases: vec![(7, 100)], next_lease: 3 }),
                "snapshot lease 7 is not below its next lease id 3",
            ),
        ];
        for (record, want) in cases {
            let e = sm.apply(&record, now).unwrap_err();
            assert!(matches!(&e, MetaError::Storage(m) if m.contains(want)), "{e}");
            assert_eq!(sm.snapshot(), before, "{record:?} changed the state");
        }
    }
}
