//! What a run produced, the checks over it, and its summary: faults,
//! failovers with their durations, operation counts, violations. Summaries
//! are what the insta snapshots in `snapshots/` hold.

use std::collections::BTreeMap;

use attache_faults::Scheduled;
use serde::{Deserialize, Serialize};

use crate::check::{self, Disruption, Violation};
use crate::ebs::{SyncRecord, VolumeCounts};
use crate::history::{EventType, History, F};
use crate::metalog::MetaDiskCounts;

/// The raw result of one simulated run.
#[derive(Clone, Debug, Default)]
pub struct RunOutcome {
    /// Simulated ms the run took.
    pub sim_ms: u64,
    pub history: History,
    /// Every durable volume write.
    pub syncs: Vec<SyncRecord>,
    /// The faults applied, in order.
    pub faults: Vec<Scheduled>,
    /// Every fault and repair, in time (see `check::liveness`).
    pub disruptions: Vec<Disruption>,
    /// How often each buggify point fired, by name.
    pub buggified: BTreeMap<String, u64>,
    /// What the metadata node's disk went through.
    pub metadata_disk: MetaDiskCounts,
    /// What the storage volumes went through.
    pub volumes: VolumeCounts,
    /// Faults not applied: aimed at a role (`primary:vol-1`) no node held
    /// when they struck, or waiting for a moment (`when`) that never came,
    /// with the repairs of the latter.
    pub skipped_faults: u64,
}

/// Operation counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpCounts {
    pub invoked: u64,
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
    pub writes_ok: u64,
    pub reads_ok: u64,
    /// Successful operations by kind (`F::name`).
    pub ok_by_kind: BTreeMap<String, u64>,
}

/// A change of the node serving a volume's acknowledged writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    pub volume: String,
    pub from: String,
    pub to: String,
    /// The last acknowledged write on the old node, simulated ms.
    pub at_ms: u64,
    /// From that write to the first acknowledged write on the new node, ms.
    pub duration_ms: u64,
}

/// A run's summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub scenario: String,
    pub seed: u64,
    /// A swarm run's drawn configuration (`Scenario::swarm_draw`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swarm: Option<String>,
    pub sim_seconds: u64,
    pub ops: OpCounts,
    /// The most states one key's linearizability search visited (see
    /// `check::linearizable_search`; a key past 2,000,000 is a violation).
    #[serde(default)]
    pub longest_search: u64,
    pub faults: Vec<String>,
    pub failovers: Vec<Failover>,
    /// How often each buggify point fired (empty without buggify).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub buggified: BTreeMap<String, u64>,
    /// Failed metadata log appends and torn tails (left out when none).
    #[serde(default, skip_serializing_if = "MetaDiskCounts::is_empty")]
    pub metadata_disk: MetaDiskCounts,
    /// Fenced-off writes, torn tails and shard lock conflicts on the
    /// storage volumes (left out when none).
    #[serde(default, skip_serializing_if = "VolumeCounts::is_empty")]
    pub volumes: VolumeCounts,
    /// Faults not applied (see `RunOutcome::skipped_faults`; left out when none).
    #[serde(default, skip_serializing_if = "crate::ebs::is_zero")]
    pub skipped_faults: u64,
    pub violations: Vec<Violation>,
}

/// A checked run.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub summary: Summary,
    pub outcome: RunOutcome,
    /// FNV-1a over the history, the volume write log and the faults: equal
    /// digests mean the same run.
    pub digest: u64,
}

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Failovers seen in the history: per volume, each change of the node that
/// acknowledged its writes.
pub fn failovers(history: &History) -> Vec<Failover> {
    let ops = history.ops();
    let volume_of: BTreeMap<u64, String> = ops
        .iter()
        .filter(|o| o.f == F::NewShard && o.outcome == EventType::Ok)
        .filter_map(|o| Some((o.shard, o.value.clone()?)))
        .collect();
    let mut acks: BTreeMap<&str, Vec<(u64, &str)>> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.f.is_write() && o.outcome == EventType::Ok) {
        if let (Some(v), Some(c)) = (volume_of.get(&o.shard), o.complete) {
            acks.entry(v.as_str()).or_default().push((c, o.node.as_str()));
        }
    }
    let mut out = Vec::new();
    for (volume, mut list) in acks {
        list.sort();
        for w in list.windows(2) {
            let ((t0, n0), (t1, n1)) = (w[0], w[1]);
            if n0 != n1 {
                out.push(Failover {
                    volume: volume.to_string(),
                    from: n0.to_string(),
                    to: n1.to_string(),
                    at_ms: t0 / 1_000_000,
                    duration_ms: (t1 - t0) / 1_000_000,
                });
            }
        }
    }
    out
}

/// A fault as `kind key=value ...`, e.g. `node_crash node=node-1`.
pub fn describe(fault: &attache_faults::Fault) -> String {
    let value = serde_json::to_value(fault).expect("faults serialize");
    let mut out = fault.kind().to_string();
    if let Some(fields) = value.as_object() {
        for (k, v) in fields.iter().filter(|(k, _)| *k != "type") {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!(" {k}={v}"));
        }
    }
    out
}

/// Runs every checker over `outcome` and summarises the run.
pub fn check(scenario: &str, seed: u64, liveness_bound_ms: u64, outcome: RunOutcome) -> RunReport {
    let ops = outcome.history.ops();
    // Per-key checkers see batch writes and multi-key reads key by key.
    let per_key = check::project(&ops);
    let mut violations = Vec::new();
    let (linearizable, longest_search) = check::linearizable_search(&per_key);
    violations.extend(linearizable);
    violations.extend(check::lost_writes(&per_key));
    violations.extend(check::stale_reads(&per_key));
    violations.extend(check::stale_ages(&per_key));
    violations.extend(check::stale_bounds(&ops));
    violations.extend(check::batch_atomicity(&ops));
    violations.extend(check::index_hits(&ops));
    violations.extend(check::shard_stats(&ops));
    violations.extend(check::single_writer(&outcome.syncs));
    violations.extend(check::shard_ids(&ops));
    violations.extend(check::isolation(&ops));
    violations.extend(check::shard_lifecycle(&ops));
    violations.extend(check::shard_records(&ops));
    violations.extend(check::rejections(&ops));
    violations.extend(check::liveness(&ops, &outcome.disruptions, liveness_bound_ms * 1_000_000));
    let mut counts = OpCounts::default();
    for o in &ops {
        counts.invoked += 1;
        match o.outcome {
            EventType::Ok => {
                counts.ok += 1;
                *counts.ok_by_kind.entry(o.f.name().to_string()).or_default() += 1;
                if o.f.is_write() {
                    counts.writes_ok += 1;
                } else if o.f.is_read() {
                    counts.reads_ok += 1;
                }
            }
            EventType::Fail => counts.fail += 1,
            _ => counts.info += 1,
        }
    }
    let faults = outcome
        .faults
        .iter()
        .map(|f| {
            let when = f.when.as_ref().map_or(String::new(), |w| format!(" when={w}"));
            format!("{} ms {}{when}", f.at_ms, describe(&f.fault))
        })
        .collect();
    let mut digest = fnv1a(outcome.history.to_jsonl().as_bytes(), 0xcbf29ce484222325);
    digest = fnv1a(serde_json::to_string(&outcome.syncs).expect("syncs serialize").as_bytes(), digest);
    digest = fnv1a(serde_json::to_string(&outcome.faults).expect("faults serialize").as_bytes(), digest);
    let summary = Summary {
        scenario: scenario.to_string(),
        seed,
        swarm: None,
        sim_seconds: outcome.sim_ms / 1000,
        ops: counts,
        longest_search,
        faults,
        failovers: failovers(&outcome.history),
        buggified: outcome.buggified.clone(),
        metadata_disk: outcome.metadata_disk.clone(),
        volumes: outcome.volumes.clone(),
        skipped_faults: outcome.skipped_faults,
        violations,
    };
    RunReport { summary, outcome, digest }
}

/// The report of a run that did not finish (it panicked or hung): no
/// history, no checks, only `violation`; its digest is the violation's, so a
/// replay that fails the same way is "the same run".
pub fn failed(scenario: &str, seed: u64, violation: Violation) -> RunReport {
    let outcome = RunOutcome::default();
    let digest = fnv1a(format!("{}: {}", violation.checker, violation.message).as_bytes(), 0xcbf29ce484222325);
    let summary = Summary {
        scenario: scenario.to_string(),
        seed,
        swarm: None,
        sim_seconds: 0,
        ops: OpCounts::default(),
        longest_search: 0,
        faults: Vec::new(),
        failovers: Vec::new(),
        buggified: BTreeMap::new(),
        metadata_disk: MetaDiskCounts::default(),
        volumes: VolumeCounts::default(),
        skipped_faults: 0,
        violations: vec![violation],
    };
    RunReport { summary, outcome, digest }
}
