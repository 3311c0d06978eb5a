//! What a run produced, the checks over it, and its summary: faults,
//! failovers with their durations, operation counts, violations. Summaries
//! are what the insta snapshots in `snapshots/` hold.

use std::collections::BTreeMap;

use attache_faults::Scheduled;
use serde::{Deserialize, Serialize};

use crate::check::{self, Disruption, Violation};
use crate::ebs::{SyncRecord, VolumeCounts};
use crate::history::{EventType, History, Op, F};
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
    /// Every successful claim of a volume, in the order made.
    pub claims: Vec<ClaimRecord>,
    /// The intruder's calls to the metadata endpoint (empty when the
    /// scenario has none: `WorkloadSpec::metadata_intrusion_ms`).
    pub intrusions: Vec<check::Intrusion>,
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

/// A successful claim of a volume by a storage node
/// (`attache_actors::volume::Claimed`), in simulated ms since the run
/// started: what [`failovers`] needs of it (a failover is a claim by
/// another node than the one before, whatever the claim's `takeover` flag).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub volume: String,
    /// The claiming node's name (`node-1`).
    pub node: String,
    /// Its address, as the history names the node that answered.
    pub addr: String,
    pub epoch: u64,
    pub gone_seen_ms: u64,
    pub started_ms: u64,
    pub serving_ms: u64,
}

/// A volume moving to another node, and what its time went to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    pub volume: String,
    /// The node that held the volume before (`node-1`).
    pub from: String,
    /// The node that took it over.
    pub to: String,
    /// The epoch it claimed.
    pub epoch: u64,
    /// The latest fault that struck the old primary (its node, its volume
    /// there, the metadata store, the whole network) before the new one saw
    /// it gone, as `faults` lists it; absent when none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// When the service had to start recovering from the cause
    /// (`Fault::recovery_from_ms`: the end of a metadata outage or a disk
    /// stall, when the new primary saw the old one gone after that end;
    /// else when the cause struck); without a cause, when the new primary
    /// saw the old one gone. Simulated ms.
    pub at_ms: u64,
    /// How long the volume took no writes: `detect_ms + wait_ms + claim_ms +
    /// first_write_ms`, ms; absent when the new primary acknowledged no
    /// write on the volume before it moved again or the run ended.
    pub duration_ms: Option<u64>,
    /// From `at_ms` to the new primary seeing the old one gone (its liveness
    /// record expired with its lease) or the owner record vacated, ms.
    pub detect_ms: u64,
    /// From then to the claim: takeover delay, rank delay, check period, ms.
    pub wait_ms: u64,
    /// The claim: compare-and-swap, storage fence, serving, ms.
    pub claim_ms: u64,
    /// The part of the new primary's first acknowledged write on the volume
    /// that came after serving began (client backoff, the shard's recovery
    /// on its first open), ms: from serving, or from when the write was
    /// sent if later (a client with nothing to write meanwhile is no delay).
    pub first_write_ms: Option<u64>,
}

/// Whether fault `f` strikes node `node` (directly, through its volume
/// there, or through the metadata store or network everyone shares). A
/// clock within its bound and a full volume (every node alike) move no
/// primary, and are no cause.
fn strikes(f: &attache_faults::Fault, node: &str) -> bool {
    use attache_faults::Fault;
    match f {
        Fault::ClockJitter { .. } | Fault::DiskFull { .. } => false,
        Fault::MetadataUnavailable { .. } | Fault::MetadataDiskErrors { .. } | Fault::NetworkSlow { .. } => true,
        _ => f.node_names().iter().any(|n| n == node || n == "meta"),
    }
}

/// The run's failovers: each claim of a volume by a node other than the
/// one that claimed it before, with its cause among `faults` and its
/// first acknowledged write in `ops` (the run's history).
pub fn failovers(ops: &[Op], claims: &[ClaimRecord], faults: &[Scheduled]) -> Vec<Failover> {
    let volume_of: BTreeMap<u64, String> = ops
        .iter()
        .filter(|o| o.f == F::NewShard && o.outcome == EventType::Ok)
        .filter_map(|o| Some((o.shard, o.value.clone()?)))
        .collect();
    // Acknowledged writes by volume: (completion ms, invocation ms, node address).
    let mut acks: BTreeMap<&str, Vec<(u64, u64, &str)>> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.f.is_write() && o.outcome == EventType::Ok) {
        if let (Some(v), Some(c)) = (volume_of.get(&o.shard), o.complete) {
            acks.entry(v.as_str()).or_default().push((c / 1_000_000, o.invoke / 1_000_000, o.node.as_str()));
        }
    }
    acks.values_mut().for_each(|list| list.sort());
    let mut by_volume: BTreeMap<&str, Vec<&ClaimRecord>> = BTreeMap::new();
    for c in claims {
        by_volume.entry(c.volume.as_str()).or_default().push(c);
    }
    let mut out = Vec::new();
    for (volume, mut list) in by_volume {
        list.sort_by_key(|c| c.serving_ms);
        for (i, pair) in list.windows(2).enumerate() {
            let (before, claim) = (pair[0], pair[1]);
            if before.node == claim.node {
                continue;
            }
            let cause = faults
                .iter()
                .rev()
                .find(|f| f.at_ms <= claim.gone_seen_ms && !f.fault.is_repair() && strikes(&f.fault, &before.node));
            // As the liveness checker counts: from the end of a fault no
            // failover can fix (a metadata outage, a disk stall) if the new
            // primary saw the old one gone after it, else from its start.
            let at_ms = cause.map_or(claim.gone_seen_ms, |f| {
                let recovery = f.at_ms + f.fault.recovery_from_ms();
                if recovery <= claim.gone_seen_ms {
                    recovery
                } else {
                    f.at_ms
                }
            });
            let next_claim_ms = list.get(i + 2).map_or(u64::MAX, |c| c.serving_ms);
            // The new primary's first acknowledged write, and how much of it
            // came after serving began (a write sent later, by a client that
            // had nothing to write meanwhile, counts from when it was sent).
            let first_write_ms = acks.get(volume).and_then(|l| {
                l.iter()
                    .find(|(t, _, n)| *n == claim.addr && *t >= claim.serving_ms && *t < next_claim_ms)
                    .map(|(t, invoked, _)| t - claim.serving_ms.max(*invoked).min(*t))
            });
            out.push(Failover {
                volume: volume.to_string(),
                from: before.node.clone(),
                to: claim.node.clone(),
                epoch: claim.epoch,
                cause: cause.map(|f| format!("{} ms {}", f.at_ms, describe(&f.fault))),
                at_ms,
                duration_ms: first_write_ms.map(|w| claim.serving_ms - at_ms + w),
                detect_ms: claim.gone_seen_ms - at_ms,
                wait_ms: claim.started_ms - claim.gone_seen_ms,
                claim_ms: claim.serving_ms - claim.started_ms,
                first_write_ms,
            });
        }
    }
    out.sort_by_key(|f| (f.at_ms, f.volume.clone()));
    out
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
    /// The intruder's calls the metadata endpoint refused (left out when
    /// the scenario has no intruder).
    #[serde(default, skip_serializing_if = "crate::ebs::is_zero")]
    pub intrusions_refused: u64,
    pub violations: Vec<Violation>,
}

/// A checked run.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub summary: Summary,
    pub outcome: RunOutcome,
    /// A run that did not finish: the digest of its violation (see [`RunReport::digest`]).
    failed_digest: Option<u64>,
}

impl RunReport {
    /// FNV-1a over the history, the volume write log and the faults (for a
    /// run that did not finish, over its violation): equal digests mean the
    /// same run. Computed on each call: it serializes the whole history, so
    /// only the runs whose determinism is checked pay for it.
    pub fn digest(&self) -> u64 {
        if let Some(d) = self.failed_digest {
            return d;
        }
        let o = &self.outcome;
        let mut digest = fnv1a(o.history.to_jsonl().as_bytes(), 0xcbf29ce484222325);
        digest = fnv1a(serde_json::to_string(&o.syncs).expect("syncs serialize").as_bytes(), digest);
        fnv1a(serde_json::to_string(&o.faults).expect("faults serialize").as_bytes(), digest)
    }
}

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
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
    let all = outcome.history.ops();
    // What needs every operation, before `owners_only` keeps the owners'.
    let isolation = check::isolation(&all);
    let foreign_values = check::foreign_values(&check::project(&all));
    let counts = op_counts(&all);
    let failovers = failovers(&all, &outcome.claims, &outcome.faults);
    // The data, lifecycle and liveness checkers see each shard's owner's
    // operations only; requests on another client's shard are checked by
    // `isolation` and `foreign_values`, over every operation.
    let ops = check::owners_only(all);
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
    violations.extend(isolation);
    violations.extend(foreign_values);
    violations.extend(check::shard_lifecycle(&ops));
    violations.extend(check::shard_records(&ops));
    violations.extend(check::rejections(&ops));
    violations.extend(check::liveness(&ops, &outcome.disruptions, liveness_bound_ms * 1_000_000));
    violations.extend(check::reads_while_full(&ops, &check::full_windows(&outcome.faults, liveness_bound_ms)));
    violations.extend(check::metadata_intrusions(&outcome.intrusions));
    let faults = outcome
        .faults
        .iter()
        .map(|f| {
            let when = f.when.as_ref().map_or(String::new(), |w| format!(" when={w}"));
            format!("{} ms {}{when}", f.at_ms, describe(&f.fault))
        })
        .collect();
    let summary = Summary {
        scenario: scenario.to_string(),
        seed,
        swarm: None,
        sim_seconds: outcome.sim_ms / 1000,
        ops: counts,
        longest_search,
        faults,
        failovers,
        buggified: outcome.buggified.clone(),
        metadata_disk: outcome.metadata_disk.clone(),
        volumes: outcome.volumes.clone(),
        skipped_faults: outcome.skipped_faults,
        intrusions_refused: outcome.intrusions.iter().filter(|i| i.answer == "refused").count() as u64,
        violations,
    };
    RunReport { summary, outcome, failed_digest: None }
}

/// How many operations were invoked, and how each ended, by kind.
fn op_counts(all: &[Op]) -> OpCounts {
    let mut counts = OpCounts::default();
    for o in all {
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
    counts
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
        intrusions_refused: 0,
        violations: vec![violation],
    };
    RunReport { summary, outcome, failed_digest: Some(digest) }
}
