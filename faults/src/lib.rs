//! The fault vocabulary of Attaché's simulation and chaos tests, and fault
//! schedules: scripted (read from a scenario file) or drawn at random from a
//! seed with `rand_chacha`, within rates and limits.
//!
//! A fault names nodes and volumes by the names the cluster gives them
//! (`node-1`, `vol-2`, `meta`, and `client-1` for a partition), or names a
//! storage node by its role when the fault strikes (a [`Target`]:
//! `primary:vol-2`, `backup:vol-2`); this crate knows nothing about how a
//! fault is applied. Times are milliseconds of simulated time since the run
//! started.

use std::collections::BTreeSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One fault.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Fault {
    /// The volume is detached from the node: I/O fails, unsynced writes are lost.
    EbsDetach { volume: String, node: String },
    /// The volume is attached to the node again.
    EbsReattach { volume: String, node: String },
    /// The node's process dies: memory and unsynced writes are lost.
    NodeCrash { node: String },
    /// The node's process starts again (its start-up runs from the beginning).
    NodeRestart { node: String },
    /// The node's process stops running (a long GC pause, SIGSTOP) but keeps
    /// its state and its connections.
    NodePause { node: String },
    /// The paused node runs again.
    NodeResume { node: String },
    /// Messages from every node of `from` to every node of `to` are lost;
    /// with `both`, the other way too.
    Partition { from: Vec<String>, to: Vec<String>, both: bool },
    /// The node can neither send nor receive.
    Isolate { node: String },
    /// Every partition and isolation ends.
    Heal,
    /// The node's I/O on the volume takes `ms` milliseconds more, for `for_ms`.
    DiskStall { volume: String, node: String, ms: u64, for_ms: u64 },
    /// From now on, no I/O of the node on the volume completes (a stuck
    /// attachment); the node itself keeps running. Never repaired.
    DiskHang { volume: String, node: String },
    /// For `for_ms` milliseconds every sync (fsync) of the node on the
    /// volume fails with an I/O error, after the data it flushes either
    /// reached the device or was dropped (either, at random): the writer
    /// cannot tell whether its write is durable, as after a Linux fsync
    /// error.
    DiskErrors { volume: String, node: String, for_ms: u64 },
    /// The metadata store answers nobody for `for_ms` milliseconds.
    MetadataUnavailable { for_ms: u64 },
    /// The metadata node's disk fails every log append, sync and rewrite for
    /// `for_ms` milliseconds. A failed append may leave any prefix of its
    /// bytes in the file (a short write, or a sync error after the write),
    /// where later appends land after it, as they would in a real file.
    MetadataDiskErrors { for_ms: u64 },
    /// The node's clock runs fast or slow by up to `ppm` parts per million
    /// (bounded; the lease logic accounts for it).
    ClockJitter { node: String, ppm: i64 },
    /// For `for_ms` milliseconds every message between any two nodes takes
    /// `min_ms` to `max_ms` (uniform) to arrive, and each send is lost with
    /// probability `loss_per_mille` / 1000; connections are reliable, so a
    /// lost message is sent again after a backoff, as TCP retransmits (the
    /// backoff doubles from 1 ms up to 10 s), and a connection delivers in
    /// order, so one lost message holds up those behind it.
    NetworkSlow { min_ms: u64, max_ms: u64, loss_per_mille: u32, for_ms: u64 },
    /// For `for_ms` milliseconds the volume has no free space: every append
    /// to it, from any node, fails (`ENOSPC`) and writes nothing. No
    /// failover can help (every node sees the same full volume); the
    /// service must refuse writes cleanly and serve again once space is back.
    DiskFull { volume: String, for_ms: u64 },
}

/// What a fault's node name stands for: a node by name, or the storage node
/// holding a role on a volume at the moment the fault strikes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// `node-1`, `meta`, `client-2`.
    Node(&'a str),
    /// `primary:vol-1`: the node holding the volume's storage fence (its
    /// primary, or the last one, if it has not been replaced yet).
    Primary(&'a str),
    /// `backup:vol-1`: the backup next in line to take the volume over (the
    /// attached node with the lowest id that does not hold the fence).
    Backup(&'a str),
}

impl<'a> Target<'a> {
    /// Reads a fault's node name. A role may carry a tag after `#`
    /// (`primary:vol-1#first`), which only tells two faults on the same role
    /// apart, so that each repair finds the node its own fault struck.
    pub fn parse(name: &'a str) -> Target<'a> {
        let role = name.split_once('#').map_or(name, |(role, _)| role);
        match role.split_once(':') {
            Some(("primary", volume)) => Target::Primary(volume),
            Some(("backup", volume)) => Target::Backup(volume),
            _ => Target::Node(name),
        }
    }

    /// Whether the name stands for a role rather than a node.
    pub fn is_role(name: &str) -> bool {
        !matches!(Target::parse(name), Target::Node(_))
    }
}

impl Fault {
    /// A short name for summaries, such as `node_crash`.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::EbsDetach { .. } => "ebs_detach",
            Fault::EbsReattach { .. } => "ebs_reattach",
            Fault::NodeCrash { .. } => "node_crash",
            Fault::NodeRestart { .. } => "node_restart",
            Fault::NodePause { .. } => "node_pause",
            Fault::NodeResume { .. } => "node_resume",
            Fault::Partition { .. } => "partition",
            Fault::Isolate { .. } => "isolate",
            Fault::Heal => "heal",
            Fault::DiskStall { .. } => "disk_stall",
            Fault::DiskHang { .. } => "disk_hang",
            Fault::DiskErrors { .. } => "disk_errors",
            Fault::MetadataUnavailable { .. } => "metadata_unavailable",
            Fault::MetadataDiskErrors { .. } => "metadata_disk_errors",
            Fault::ClockJitter { .. } => "clock_jitter",
            Fault::NetworkSlow { .. } => "network_slow",
            Fault::DiskFull { .. } => "disk_full",
        }
    }

    /// Every node name the fault holds (nodes of a partition: `from`, then `to`).
    pub fn node_names(&self) -> Vec<String> {
        self.clone().node_slots().into_iter().map(|n| n.clone()).collect()
    }

    /// The fault with every node name replaced by `map(name)`; `None` when
    /// `map` finds no node for one of them.
    pub fn map_nodes(&self, mut map: impl FnMut(&str) -> Option<String>) -> Option<Fault> {
        let mut out = self.clone();
        for n in out.node_slots() {
            *n = map(n)?;
        }
        Some(out)
    }

    /// The fault's node names, writable, in the order of [`Fault::node_names`].
    fn node_slots(&mut self) -> Vec<&mut String> {
        match self {
            Fault::EbsDetach { node, .. }
            | Fault::EbsReattach { node, .. }
            | Fault::DiskStall { node, .. }
            | Fault::DiskHang { node, .. }
            | Fault::DiskErrors { node, .. }
            | Fault::NodeCrash { node }
            | Fault::NodeRestart { node }
            | Fault::NodePause { node }
            | Fault::NodeResume { node }
            | Fault::Isolate { node }
            | Fault::ClockJitter { node, .. } => vec![node],
            Fault::Partition { from, to, .. } => from.iter_mut().chain(to.iter_mut()).collect(),
            Fault::Heal
            | Fault::MetadataUnavailable { .. }
            | Fault::MetadataDiskErrors { .. }
            | Fault::NetworkSlow { .. }
            | Fault::DiskFull { .. } => vec![],
        }
    }

    /// Whether this fault ends a disruption (restart, resume, reattach, heal)
    /// rather than starting one.
    pub fn is_repair(&self) -> bool {
        matches!(self, Fault::EbsReattach { .. } | Fault::NodeRestart { .. } | Fault::NodeResume { .. } | Fault::Heal)
    }

    /// When the service must start to recover from the fault, ms after it
    /// struck: a fault that only slows the volume, the network or the
    /// metadata store, or that no failover can fix (a disk stall, a slow
    /// network, a full volume, a metadata outage or metadata disk errors),
    /// so its end; every other fault, its start. Failing syncs
    /// count from their start: if they last, the primary must give the
    /// volume up (see `FailoverTiming::io_timeout_ms`).
    pub fn recovery_from_ms(&self) -> u64 {
        match self {
            Fault::DiskErrors { .. } => 0,
            _ => self.lasts_ms(),
        }
    }

    /// How long the fault lasts by itself, ms: `for_ms` of a fault that ends
    /// on its own (a metadata outage, metadata disk errors, a disk stall), 0
    /// for every other (its repair is a separate fault).
    pub fn lasts_ms(&self) -> u64 {
        match self {
            Fault::MetadataUnavailable { for_ms }
            | Fault::MetadataDiskErrors { for_ms }
            | Fault::DiskStall { for_ms, .. }
            | Fault::DiskErrors { for_ms, .. }
            | Fault::NetworkSlow { for_ms, .. }
            | Fault::DiskFull { for_ms, .. } => *for_ms,
            _ => 0,
        }
    }
}

/// A fault at a time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Scheduled {
    /// Simulated milliseconds since the run started.
    pub at_ms: u64,
    /// The fault.
    #[serde(flatten)]
    pub fault: Fault,
    /// A moment of the system's own to wait for from `at_ms` (see
    /// [`Moment`], written `"sync:vol-1"`): the fault strikes as it
    /// happens, or is skipped (with its repair) if it does not within
    /// [`MOMENT_WAIT_MS`] or before the next fault of the schedule is due,
    /// so the rest of the schedule keeps its times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
}

/// How long a fault waits for its moment before it is skipped, ms.
pub const MOMENT_WAIT_MS: u64 = 10_000;

/// A moment chosen from the system's state, on one volume, at which a
/// fault strikes (`Scheduled::when`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Moment<'a> {
    /// `fence:vol-1`: a node takes the volume's storage fence (a claim: at
    /// start-up, or a takeover), before it opens any shard.
    Fence(&'a str),
    /// `sync:vol-1`: a sync (a group commit's fsync) starts on the volume,
    /// while it is in flight.
    Sync(&'a str),
    /// `create:vol-1`: a shard's files are created on the volume (a
    /// NewShard), before the shard's record says it is active.
    Create(&'a str),
}

impl<'a> Moment<'a> {
    /// Reads `kind:volume`. Errors: what is expected.
    pub fn parse(text: &'a str) -> Result<Moment<'a>, String> {
        match text.split_once(':') {
            Some(("fence", v)) if !v.is_empty() => Ok(Moment::Fence(v)),
            Some(("sync", v)) if !v.is_empty() => Ok(Moment::Sync(v)),
            Some(("create", v)) if !v.is_empty() => Ok(Moment::Create(v)),
            _ => Err(format!("when = {text:?}: expected fence:VOLUME, sync:VOLUME or create:VOLUME")),
        }
    }

    /// The volume it happens on.
    pub fn volume(&self) -> &'a str {
        match self {
            Moment::Fence(v) | Moment::Sync(v) | Moment::Create(v) => v,
        }
    }
}

/// Faults in time order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub faults: Vec<Scheduled>,
}

impl Schedule {
    /// A schedule of `faults`, sorted by time (stable for equal times).
    pub fn new(mut faults: Vec<Scheduled>) -> Self {
        faults.sort_by_key(|f| f.at_ms);
        Schedule { faults }
    }

    /// When the last fault of the schedule happens, ms (0 when none).
    pub fn last_at_ms(&self) -> u64 {
        self.faults.last().map_or(0, |f| f.at_ms)
    }
}

/// How often each kind of fault is drawn, in faults per simulated minute,
/// and the limits a random schedule keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RandomRates {
    pub node_crash: f64,
    pub node_pause: f64,
    pub ebs_detach: f64,
    pub partition: f64,
    pub isolate: f64,
    pub disk_stall: f64,
    pub metadata_unavailable: f64,
    pub clock_jitter: f64,
    /// Crashes of the metadata node (its log keeps any prefix of an append
    /// it had not synced), each followed by a restart.
    pub metadata_crash: f64,
    /// Windows of metadata disk errors (see [`Fault::MetadataDiskErrors`]).
    pub metadata_disk_errors: f64,
    /// Windows of failing syncs on a storage node's volume (see
    /// [`Fault::DiskErrors`]).
    pub disk_errors: f64,
    /// Windows of a slow, lossy network (see [`Fault::NetworkSlow`]): 20 to
    /// 300 ms per message, up to 5% of sends lost.
    pub network_slow: f64,
    /// Partitions between a client and a storage node (one way or both),
    /// each healed after an outage.
    pub client_partition: f64,
    /// Windows in which a volume is full (see [`Fault::DiskFull`]).
    pub disk_full: f64,
    /// The share (0 to 1) of faults on a storage node that aim at a role
    /// rather than a random node (a [`Target`]): half at the primary of the
    /// fault's volume, half at the backup next in line.
    pub targeted: f64,
    /// The share (0 to 1) of those aimed faults that also wait for a moment
    /// on their volume ([`Moment`]: a fence taken, a sync started, a shard
    /// created, a third each) before they strike.
    pub at_moments: f64,
    /// Shortest and longest disruption (crash to restart, pause to resume,
    /// detach to reattach, partition to heal), ms.
    pub min_outage_ms: u64,
    pub max_outage_ms: u64,
    /// Most storage nodes disrupted at once.
    pub max_concurrent: usize,
    /// Largest clock rate error, parts per million.
    pub max_clock_ppm: i64,
}

impl Default for RandomRates {
    fn default() -> Self {
        RandomRates {
            node_crash: 2.0,
            node_pause: 1.0,
            ebs_detach: 1.0,
            partition: 2.0,
            isolate: 1.0,
            disk_stall: 1.0,
            metadata_unavailable: 0.5,
            clock_jitter: 0.5,
            metadata_crash: 0.0,
            metadata_disk_errors: 0.0,
            disk_errors: 0.0,
            network_slow: 0.0,
            client_partition: 0.0,
            disk_full: 0.0,
            targeted: 0.0,
            at_moments: 0.0,
            min_outage_ms: 500,
            max_outage_ms: 8_000,
            max_concurrent: 1,
            max_clock_ppm: 500,
        }
    }
}

impl RandomRates {
    /// Each fault kind's name (as [`Fault::kind`] names its fault, except
    /// `metadata_crash`, a crash of the metadata node, and
    /// `client_partition`, a partition between a client and a storage
    /// node) with its rate, in the
    /// order a schedule draws them (kinds added later go last, so that a
    /// schedule drawn with their rates at 0 is the one the same seed drew
    /// before they existed).
    pub fn kinds(&self) -> [(&'static str, f64); 14] {
        let mut copy = self.clone();
        copy.kinds_mut().map(|(name, rate)| (name, *rate))
    }

    /// As [`RandomRates::kinds`], each rate writable.
    pub fn kinds_mut(&mut self) -> [(&'static str, &mut f64); 14] {
        [
            ("node_crash", &mut self.node_crash),
            ("node_pause", &mut self.node_pause),
            ("ebs_detach", &mut self.ebs_detach),
            ("partition", &mut self.partition),
            ("isolate", &mut self.isolate),
            ("disk_stall", &mut self.disk_stall),
            ("metadata_unavailable", &mut self.metadata_unavailable),
            ("clock_jitter", &mut self.clock_jitter),
            ("metadata_crash", &mut self.metadata_crash),
            ("metadata_disk_errors", &mut self.metadata_disk_errors),
            ("disk_errors", &mut self.disk_errors),
            ("network_slow", &mut self.network_slow),
            ("client_partition", &mut self.client_partition),
            ("disk_full", &mut self.disk_full),
        ]
    }
}

/// Names a random schedule may pick from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Storage nodes.
    pub nodes: Vec<String>,
    /// Volumes.
    pub volumes: Vec<String>,
    /// The metadata node.
    pub meta: String,
    /// Client nodes (for partitions between a client and storage).
    pub clients: Vec<String>,
}

/// Draws a schedule for a run of `duration_ms` from `seed`: faults arrive as
/// Poisson processes at the given rates during `[start_ms, end_ms)`, each
/// disruption is repaired after a random outage, and at most
/// `max_concurrent` nodes are disrupted at once. Every disruption is repaired
/// by `end_ms`, and the schedule ends with a `Heal`.
pub fn random_schedule(seed: u64, rates: &RandomRates, topo: &Topology, start_ms: u64, end_ms: u64) -> Schedule {
    assert!(start_ms < end_ms, "an empty fault window");
    assert!(rates.min_outage_ms <= rates.max_outage_ms, "min outage above max outage");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let kinds = rates.kinds();
    let total: f64 = kinds.iter().map(|k| k.1).sum();
    let mut out = Vec::new();
    if total <= 0.0 || topo.nodes.is_empty() {
        out.push(Scheduled { at_ms: end_ms, fault: Fault::Heal, when: None });
        return Schedule::new(out);
    }
    // Busy intervals per node, so at most `max_concurrent` overlap.
    let mut busy: Vec<(u64, u64, String)> = Vec::new();
    let mut t = start_ms as f64;
    loop {
        // Exponential inter-arrival at `total` faults per minute.
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        t += -u.ln() / total * 60_000.0;
        let at = t as u64;
        if at >= end_ms {
            break;
        }
        let mut pick = rng.random_range(0.0..total);
        let kind = kinds.iter().find(|k| {
            pick -= k.1;
            pick < 0.0
        });
        let kind = kind.map_or("node_crash", |k| k.0);
        let outage = rng.random_range(rates.min_outage_ms..=rates.max_outage_ms);
        let until = (at + outage).min(end_ms.saturating_sub(1)).max(at + 1);
        let mut node = topo.nodes[rng.random_range(0..topo.nodes.len())].clone();
        // Drawn only when targeting is on, so a schedule without it is the
        // one the same seed drew before targeting existed.
        let mut role_volume = None;
        let mut when = None;
        if rates.targeted > 0.0 && !topo.volumes.is_empty() && rng.random_bool(rates.targeted.min(1.0)) {
            let v = topo.volumes[rng.random_range(0..topo.volumes.len())].clone();
            node = if rng.random_bool(0.5) { format!("primary:{v}") } else { format!("backup:{v}") };
            if rates.at_moments > 0.0 && rng.random_bool(rates.at_moments.min(1.0)) {
                let kind = ["fence", "sync", "create"][rng.random_range(0..3)];
                when = Some(format!("{kind}:{v}"));
            }
            role_volume = Some(v);
        }
        let overlapping: BTreeSet<&String> = busy.iter().filter(|b| b.0 < until && at < b.1).map(|b| &b.2).collect();
        // A role resolves when the fault strikes, to a node no other fault
        // holds down then: a role's window overlaps no fault on a named
        // storage node (two roles may overlap; the second finds another node).
        let conflict = if role_volume.is_some() {
            overlapping.iter().any(|n| **n == node || topo.nodes.contains(n))
        } else {
            overlapping.contains(&node) || overlapping.iter().any(|n| Target::is_role(n))
        };
        if conflict || overlapping.len() >= rates.max_concurrent.max(1) {
            continue;
        }
        // Drawn for every fault, used by those that name a volume, so the
        // sequence of draws does not depend on the kind.
        let mut volume = topo.volumes.get(rng.random_range(0..topo.volumes.len().max(1))).cloned().unwrap_or_default();
        if let Some(v) = role_volume {
            volume = v;
        }
        let (start, repair) = match kind {
            "node_crash" => (Fault::NodeCrash { node: node.clone() }, Fault::NodeRestart { node: node.clone() }),
            "node_pause" => (Fault::NodePause { node: node.clone() }, Fault::NodeResume { node: node.clone() }),
            "ebs_detach" => {
                let volume = volume.clone();
                (
                    Fault::EbsDetach { volume: volume.clone(), node: node.clone() },
                    Fault::EbsReattach { volume, node: node.clone() },
                )
            }
            "partition" => {
                let both = rng.random_bool(0.5);
                let to = if rng.random_bool(0.5) {
                    vec![topo.meta.clone()]
                } else {
                    topo.nodes.iter().filter(|n| **n != node).cloned().collect()
                };
                (Fault::Partition { from: vec![node.clone()], to, both }, Fault::Heal)
            }
            "isolate" => (Fault::Isolate { node: node.clone() }, Fault::Heal),
            "client_partition" => {
                let Some(client) = topo.clients.get(rng.random_range(0..topo.clients.len().max(1))).cloned() else {
                    continue;
                };
                let both = rng.random_bool(0.5);
                let (from, to) = if rng.random_bool(0.5) { (client, node.clone()) } else { (node.clone(), client) };
                (Fault::Partition { from: vec![from], to: vec![to], both }, Fault::Heal)
            }
            "disk_full" => {
                // One full window per volume at a time.
                let busy_name = format!("full:{volume}");
                if overlapping.contains(&busy_name) {
                    continue;
                }
                out.push(Scheduled { at_ms: at, fault: Fault::DiskFull { volume, for_ms: until - at }, when: None });
                busy.push((at, until, busy_name));
                continue;
            }
            "network_slow" => {
                const NETWORK: &str = "network";
                if overlapping.iter().any(|n| *n == NETWORK) {
                    continue;
                }
                let min_ms = rng.random_range(20..=100);
                let max_ms = min_ms + rng.random_range(0..=200);
                let loss_per_mille = rng.random_range(0..=50);
                out.push(Scheduled {
                    at_ms: at,
                    fault: Fault::NetworkSlow { min_ms, max_ms, loss_per_mille, for_ms: until - at },
                    when: None,
                });
                busy.push((at, until, NETWORK.to_string()));
                continue;
            }
            "disk_stall" => {
                let ms = rng.random_range(50..=2_000);
                out.push(Scheduled {
                    at_ms: at,
                    fault: Fault::DiskStall { volume, node: node.clone(), ms, for_ms: until - at },
                    when,
                });
                busy.push((at, until, node));
                continue;
            }
            "disk_errors" => {
                out.push(Scheduled {
                    at_ms: at,
                    fault: Fault::DiskErrors { volume, node: node.clone(), for_ms: until - at },
                    when,
                });
                busy.push((at, until, node));
                continue;
            }
            "metadata_unavailable" | "metadata_disk_errors" | "metadata_crash" => {
                // One crash of the metadata node at a time (its other faults may overlap).
                if kind == "metadata_crash" && overlapping.contains(&topo.meta) {
                    continue;
                }
                let for_ms = until - at;
                match kind {
                    "metadata_unavailable" => {
                        out.push(Scheduled { at_ms: at, fault: Fault::MetadataUnavailable { for_ms }, when: None })
                    }
                    "metadata_disk_errors" => {
                        out.push(Scheduled { at_ms: at, fault: Fault::MetadataDiskErrors { for_ms }, when: None })
                    }
                    _ => {
                        out.push(Scheduled {
                            at_ms: at,
                            fault: Fault::NodeCrash { node: topo.meta.clone() },
                            when: None,
                        });
                        out.push(Scheduled {
                            at_ms: until,
                            fault: Fault::NodeRestart { node: topo.meta.clone() },
                            when: None,
                        });
                    }
                }
                busy.push((at, until, topo.meta.clone()));
                continue;
            }
            _ => {
                let ppm = rng.random_range(-rates.max_clock_ppm..=rates.max_clock_ppm);
                out.push(Scheduled { at_ms: at, fault: Fault::ClockJitter { node: node.clone(), ppm }, when: None });
                continue;
            }
        };
        out.push(Scheduled { at_ms: at, fault: start, when });
        out.push(Scheduled { at_ms: until, fault: repair, when: None });
        busy.push((at, until, node));
    }
    out.push(Scheduled { at_ms: end_ms, fault: Fault::Heal, when: None });
    Schedule::new(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Topology {
        Topology {
            nodes: vec!["node-1".into(), "node-2".into(), "node-3".into()],
            volumes: vec!["vol-1".into(), "vol-2".into()],
            meta: "meta".into(),
            clients: vec!["client-1".into(), "client-2".into()],
        }
    }

    #[test]
    fn same_seed_same_schedule_and_every_disruption_is_repaired() {
        let rates = RandomRates { node_crash: 6.0, partition: 6.0, ..RandomRates::default() };
        for seed in 0..50 {
            let a = random_schedule(seed, &rates, &topo(), 1_000, 40_000);
            assert_eq!(a, random_schedule(seed, &rates, &topo(), 1_000, 40_000));
            assert!(a.faults.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
            assert_eq!(a.faults.last().unwrap().fault, Fault::Heal);
            assert!(a.faults.iter().all(|f| f.at_ms >= 1_000 && f.at_ms <= 40_000));
            let crashes = a.faults.iter().filter(|f| matches!(f.fault, Fault::NodeCrash { .. })).count();
            let restarts = a.faults.iter().filter(|f| matches!(f.fault, Fault::NodeRestart { .. })).count();
            assert_eq!(crashes, restarts, "seed {seed}: every crash is followed by a restart");
        }
        assert_ne!(random_schedule(1, &rates, &topo(), 0, 60_000), random_schedule(2, &rates, &topo(), 0, 60_000));
    }

    #[test]
    fn metadata_crashes_are_restarted_and_never_overlap() {
        let rates = RandomRates { metadata_crash: 20.0, metadata_disk_errors: 10.0, ..RandomRates::default() };
        let mut seen = BTreeSet::new();
        for seed in 0..20 {
            let s = random_schedule(seed, &rates, &topo(), 0, 60_000);
            let mut down = false;
            for f in &s.faults {
                seen.insert(f.fault.kind());
                match &f.fault {
                    Fault::NodeCrash { node } if node == "meta" => {
                        assert!(!down, "seed {seed}: meta crashed twice at {}", f.at_ms);
                        down = true;
                    }
                    Fault::NodeRestart { node } if node == "meta" => {
                        assert!(down, "seed {seed}: meta restarted while up at {}", f.at_ms);
                        down = false;
                    }
                    _ => {}
                }
            }
            assert!(!down, "seed {seed}: meta left down");
        }
        assert!(seen.contains("metadata_disk_errors") && seen.contains("node_crash"), "{seen:?}");
    }

    #[test]
    fn kinds_at_rate_zero_leave_the_schedule_unchanged() {
        // Kinds added later draw nothing when their rate is 0: the same seed
        // gives the same schedule with and without them.
        let a = random_schedule(3, &RandomRates::default(), &topo(), 0, 60_000);
        let b = random_schedule(
            3,
            &RandomRates { metadata_crash: 0.0, metadata_disk_errors: 0.0, ..RandomRates::default() },
            &topo(),
            0,
            60_000,
        );
        assert_eq!(a, b);
        assert!(a.faults.iter().all(|f| f.fault.kind() != "metadata_disk_errors"));
    }

    #[test]
    fn targeting_off_leaves_the_schedule_unchanged_and_roles_never_overlap_named_nodes() {
        let base = RandomRates { node_crash: 6.0, ebs_detach: 3.0, max_concurrent: 3, ..RandomRates::default() };
        let targeted = RandomRates { targeted: 0.5, ..base.clone() };
        let mut roles = 0;
        for seed in 0..30 {
            let plain = random_schedule(seed, &base, &topo(), 0, 60_000);
            assert!(plain.faults.iter().all(|f| f.fault.node_names().iter().all(|n| !Target::is_role(n))));
            let s = random_schedule(seed, &targeted, &topo(), 0, 60_000);
            // Open disruptions: a role is never open beside a named storage node.
            let mut open: Vec<(u64, u64, String)> = Vec::new();
            for (i, f) in s.faults.iter().enumerate() {
                if f.fault.is_repair() {
                    continue;
                }
                let Some(name) = f.fault.node_names().first().map(|n| n.to_string()) else { continue };
                // A fault that ends by itself lasts `lasts_ms`; a crash, a
                // pause or a detach until the next repair of its node; a
                // partition until the next heal.
                let repaired_by = |r: &Scheduled| match &f.fault {
                    Fault::Partition { .. } | Fault::Isolate { .. } => r.fault == Fault::Heal,
                    _ => r.fault.is_repair() && r.fault.node_names().first().map(|n| n.as_str()) == Some(&name),
                };
                let end = if f.fault.lasts_ms() > 0 || matches!(f.fault, Fault::ClockJitter { .. }) {
                    f.at_ms + f.fault.lasts_ms()
                } else {
                    s.faults[i + 1..].iter().find(|r| repaired_by(r)).map_or(u64::MAX, |r| r.at_ms)
                };
                open.retain(|o| o.1 > f.at_ms);
                if let Target::Primary(v) | Target::Backup(v) = Target::parse(&name) {
                    roles += 1;
                    assert!(topo().volumes.iter().any(|x| x == v), "seed {seed}: {name}");
                    if let Fault::EbsDetach { volume, .. } = &f.fault {
                        assert_eq!(volume, v, "seed {seed}: a role's detach is of its own volume");
                    }
                    assert!(
                        open.iter().all(|o| Target::is_role(&o.2) && o.2 != name),
                        "seed {seed}: {name} at {} overlaps {open:?}",
                        f.at_ms
                    );
                } else if topo().nodes.contains(&name) {
                    assert!(open.iter().all(|o| !Target::is_role(&o.2)), "seed {seed}: {name} overlaps {open:?}");
                }
                open.push((f.at_ms, end, name));
            }
        }
        assert!(roles > 20, "{roles} targeted faults in 30 seeds");
        // Moments: only on aimed faults, on their own volume, and only when asked for.
        assert!(random_schedule(4, &targeted, &topo(), 0, 60_000).faults.iter().all(|f| f.when.is_none()));
        let moments = RandomRates { at_moments: 1.0, ..targeted.clone() };
        let s = random_schedule(4, &moments, &topo(), 0, 60_000);
        let timed: Vec<&Scheduled> = s.faults.iter().filter(|f| f.when.is_some()).collect();
        assert!(!timed.is_empty());
        for f in timed {
            let name = f.fault.node_names()[0].clone();
            let (Target::Primary(v) | Target::Backup(v)) = Target::parse(&name) else { panic!("{f:?}") };
            assert_eq!(Moment::parse(f.when.as_deref().unwrap()).unwrap().volume(), v, "{f:?}");
            assert!(!f.fault.is_repair(), "{f:?}");
        }
        assert_eq!(Target::parse("primary:vol-2#b"), Target::Primary("vol-2"));
        assert_eq!(Moment::parse("sync:vol-1"), Ok(Moment::Sync("vol-1")));
        assert!(Moment::parse("sync:").is_err() && Moment::parse("commit:vol-1").is_err());
        assert_eq!(Target::parse("primary:vol-2"), Target::Primary("vol-2"));
        assert_eq!(Target::parse("backup:vol-1"), Target::Backup("vol-1"));
        assert_eq!(Target::parse("node-1"), Target::Node("node-1"));
    }

    #[test]
    fn client_partitions_and_a_slow_network_are_drawn() {
        let rates = RandomRates {
            client_partition: 10.0,
            network_slow: 10.0,
            node_crash: 0.0,
            node_pause: 0.0,
            ebs_detach: 0.0,
            partition: 0.0,
            isolate: 0.0,
            disk_stall: 0.0,
            metadata_unavailable: 0.0,
            clock_jitter: 0.0,
            max_concurrent: 3,
            ..RandomRates::default()
        };
        let s = random_schedule(5, &rates, &topo(), 0, 60_000);
        let mut slow_until = 0;
        let (mut partitions, mut slow) = (0, 0);
        for f in &s.faults {
            match &f.fault {
                Fault::Partition { from, to, .. } => {
                    partitions += 1;
                    let names: Vec<&String> = from.iter().chain(to).collect();
                    assert_eq!(names.iter().filter(|n| n.starts_with("client-")).count(), 1, "{f:?}");
                    assert_eq!(names.iter().filter(|n| n.starts_with("node-")).count(), 1, "{f:?}");
                }
                Fault::NetworkSlow { min_ms, max_ms, loss_per_mille, for_ms } => {
                    slow += 1;
                    assert!(f.at_ms >= slow_until, "slow windows never overlap");
                    slow_until = f.at_ms + for_ms;
                    assert!(20 <= *min_ms && min_ms <= max_ms && *max_ms <= 300 && *loss_per_mille <= 50, "{f:?}");
                }
                Fault::Heal => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(partitions > 3 && slow >= 2, "{partitions} partitions, {slow} slow windows");
    }

    #[test]
    fn map_nodes_replaces_every_name_or_gives_up() {
        let p = Fault::Partition { from: vec!["primary:vol-1".into()], to: vec!["node-2".into()], both: true };
        let mapped = p.map_nodes(|n| Some(if n == "primary:vol-1" { "node-3".into() } else { n.to_string() }));
        assert_eq!(
            mapped,
            Some(Fault::Partition { from: vec!["node-3".into()], to: vec!["node-2".into()], both: true })
        );
        assert_eq!(p.map_nodes(|n| (n != "node-2").then(|| n.to_string())), None);
        assert_eq!(Fault::Heal.map_nodes(|_| None), Some(Fault::Heal));
    }

    #[test]
    fn at_most_max_concurrent_nodes_are_down() {
        let rates = RandomRates { node_crash: 30.0, node_pause: 30.0, ..RandomRates::default() };
        let s = random_schedule(7, &rates, &topo(), 0, 60_000);
        let mut down = BTreeSet::new();
        for f in &s.faults {
            match &f.fault {
                Fault::NodeCrash { node } | Fault::NodePause { node } => {
                    down.insert(node.clone());
                }
                Fault::NodeRestart { node } | Fault::NodeResume { node } => {
                    down.remove(node);
                }
                _ => {}
            }
            assert!(down.len() <= 1, "{down:?} down at {}", f.at_ms);
        }
    }

    #[test]
    fn scripted_faults_read_from_toml() {
        #[derive(Deserialize)]
        struct File {
            faults: Vec<Scheduled>,
        }
        let text = r#"
            [[faults]]
            at_ms = 5000
            type = "node_crash"
            node = "node-1"
            [[faults]]
            at_ms = 9000
            type = "partition"
            from = ["node-2"]
            to = ["meta"]
            both = true
        "#;
        let f: File = toml::from_str(text).unwrap();
        assert_eq!(f.faults[0].fault, Fault::NodeCrash { node: "node-1".into() });
        assert_eq!(f.faults[1].fault.kind(), "partition");
    }
}
