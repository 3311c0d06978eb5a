//! Scenario files (`scenarios/*.toml`): one story each — the cluster's shape,
//! the workload, the faults at simulated times (or a random schedule), the
//! expectations, and sim-only switches that turn a fencing layer off to show
//! the checkers catch what it prevents. Every key but `name` has a default.

use std::path::Path;

use attache_faults::{Fault, RandomRates, Scheduled};
use serde::{Deserialize, Serialize};

use crate::ebs::EbsConfig;
use crate::metalog::MetaDiskConfig;

/// A scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// A pinned seed: every run of the scenario uses it, whatever seeds the
    /// runner is given (a shrunk regression replays one run, see `shrink`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default)]
    pub cluster: ClusterShape,
    #[serde(default)]
    pub workload: WorkloadSpec,
    #[serde(default)]
    pub timing: SimTiming,
    #[serde(default)]
    pub ebs: EbsConfig,
    /// The metadata node's disk.
    #[serde(default)]
    pub metadata: MetaDiskConfig,
    /// Scripted faults.
    #[serde(default)]
    pub faults: Vec<Scheduled>,
    /// A random schedule drawn from each run's seed, added to the scripted faults.
    #[serde(default)]
    pub random: Option<RandomSpec>,
    /// Seed-driven delays inside the actors (`attache_actors::buggify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buggify: Option<BuggifySpec>,
    #[serde(default)]
    pub expect: Expect,
    #[serde(default)]
    pub sim_only: SimOnly,
}

/// Buggify for a scenario's runs: each point is switched on in about half
/// the runs, and one that is on fires with `probability` each time reached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuggifySpec {
    /// 0 to 1.
    pub probability: f64,
}

/// How many of each node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterShape {
    pub storage_nodes: usize,
    /// Volumes, each attached to every storage node.
    pub volumes: usize,
    pub clients: usize,
    /// Most entries a shard returns per scan page on every node
    /// (`limits.max_scan_page`): small, so that a scan of a few hot keys
    /// streams several pages, each a separate read.
    pub scan_page: usize,
}

impl Default for ClusterShape {
    fn default() -> Self {
        ClusterShape { storage_nodes: 3, volumes: 3, clients: 2, scan_page: 2 }
    }
}

/// What the clients do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadSpec {
    /// How long the clients issue operations, ms.
    pub duration_ms: u64,
    /// Concurrent processes per client.
    pub processes_per_client: usize,
    /// Shards each client creates.
    pub shards_per_client: usize,
    /// Keys per shard (a small hot set, so operations collide).
    pub hot_keys: usize,
    /// Share of writes among reads and writes.
    pub write_ratio: f64,
    /// Share of deletes among writes.
    pub delete_ratio: f64,
    /// Share of the other writes that are a BatchPut of 2 or 3 hot keys,
    /// each to the same unique value.
    pub batch_write_ratio: f64,
    /// Share of linearizable reads that read several keys at once: half a
    /// BatchGet of 2 or 3 hot keys, half a Scan of the whole shard.
    pub multi_read_ratio: f64,
    /// Each client with two shards or more closes its last shard at a time
    /// drawn in the second quarter of the run and deletes it in the third,
    /// while its processes keep using it.
    pub lifecycle: bool,
    /// Share of clients whose lifecycle task closes and deletes at the same
    /// moment (the two race) rather than one after the other.
    pub lifecycle_race_ratio: f64,
    /// Share of operations sent, with the client's own id, to another client's shard.
    pub cross_client_ratio: f64,
    /// Share of a process's turns in which it creates a shard (NewShard at a
    /// random node, sent once), while the client has tried fewer than
    /// `max_new_shards` times; the client's processes then use it too.
    pub new_shard_ratio: f64,
    /// Most NewShard calls a client makes during the run, besides its first shards.
    pub max_new_shards: usize,
    /// Share of reads that accept stale data, sent to a random node (backups serve them).
    pub stale_read_ratio: f64,
    /// Share of operations sent to a random node rather than to the volume's
    /// last known primary (clients that just started or lost their cache).
    pub random_node_ratio: f64,
    /// A client gives up waiting after this long (the outcome is unknown), ms.
    pub op_timeout_ms: u64,
    /// Pause between a process's operations, ms.
    pub think_ms: u64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            duration_ms: 40_000,
            processes_per_client: 4,
            shards_per_client: 2,
            hot_keys: 3,
            write_ratio: 0.5,
            delete_ratio: 0.1,
            batch_write_ratio: 0.2,
            multi_read_ratio: 0.3,
            lifecycle: true,
            lifecycle_race_ratio: 0.5,
            cross_client_ratio: 0.02,
            new_shard_ratio: 0.002,
            max_new_shards: 3,
            random_node_ratio: 0.05,
            stale_read_ratio: 0.1,
            op_timeout_ms: 1_000,
            think_ms: 20,
        }
    }
}

/// Lease and failover timing of the simulated nodes, ms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimTiming {
    pub lease_ttl_ms: u64,
    pub poll_ms: u64,
    pub takeover_delay_ms: u64,
    pub rank_delay_ms: u64,
    /// Clock error bound of the lease gate (0.01 = 1%).
    pub drift: f64,
    pub margin_ms: u64,
    /// How long shards remember request ids (`Limits::request_window_ms`),
    /// ms: short by default (5 s, above the workload's 2 s retry deadline)
    /// so that every run also removes expired ids.
    pub request_window_ms: u64,
    /// A write pending this long makes a primary give its volume up
    /// (`FailoverTiming::io_timeout_ms`), ms: above the longest write under
    /// a random disk stall (2 s per I/O: a shard creation's read, append and
    /// sync take 6 s).
    pub io_timeout_ms: u64,
}

impl Default for SimTiming {
    fn default() -> Self {
        SimTiming {
            lease_ttl_ms: 2_000,
            poll_ms: 200,
            takeover_delay_ms: 300,
            rank_delay_ms: 500,
            drift: 0.01,
            margin_ms: 100,
            request_window_ms: 5_000,
            io_timeout_ms: 6_500,
        }
    }
}

/// A random fault schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomSpec {
    /// Faults start no earlier, ms.
    pub start_ms: u64,
    /// Every disruption is repaired by then, ms.
    pub end_ms: u64,
    #[serde(default)]
    pub rates: RandomRates,
}

/// What must hold besides the checkers' rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Expect {
    /// After every disruption (a fault or a repair; a metadata outage or
    /// disk stall once it ended), every shard serves a write within this, ms.
    pub liveness_bound_ms: u64,
}

impl Default for Expect {
    fn default() -> Self {
        Expect { liveness_bound_ms: 10_000 }
    }
}

/// Sim-only switches that turn a safety layer off (every one on by default).
/// Layer 3, storage fencing, is `ebs.fencing`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimOnly {
    /// Layer 1: a claim is a compare-and-swap on the owner record's revision.
    pub metadata_cas: bool,
    /// Layer 2: primaries stop writing when their lease may have expired.
    pub lease_gate: bool,
    /// At-most-once writes: shards remember request ids for
    /// `Limits::request_window_ms`; off, for no time (a retried write whose
    /// first attempt applied applies again).
    pub request_ids: bool,
}

impl Default for SimOnly {
    fn default() -> Self {
        SimOnly { metadata_cas: true, lease_gate: true, request_ids: true }
    }
}

impl Scenario {
    /// Reads a scenario file. Errors: unreadable or invalid TOML, with the path.
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let s: Scenario = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        s.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(s)
    }

    /// Checks the shape makes sense. Errors: what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let c = &self.cluster;
        if c.scan_page == 0 {
            return Err("cluster.scan_page must be at least 1".into());
        }
        if c.storage_nodes == 0 || c.volumes == 0 || c.clients == 0 {
            return Err("a cluster needs at least one storage node, volume and client".into());
        }
        if c.storage_nodes > crate::ebs::MAX_ATTACHMENTS {
            return Err(format!("io2 multi-attach allows {} nodes per volume", crate::ebs::MAX_ATTACHMENTS));
        }
        let w = &self.workload;
        if w.processes_per_client == 0 || w.shards_per_client == 0 || w.hot_keys == 0 {
            return Err("the workload needs processes, shards and keys".into());
        }
        if let Some(b) = &self.buggify {
            if !(0.0..=1.0).contains(&b.probability) {
                return Err(format!("buggify.probability is {}: it must be between 0 and 1", b.probability));
            }
        }
        self.check_names()?;
        // The rule the nodes check at start-up (`NodeConfig::validate`).
        let t = &self.timing;
        attache_actors::lease::LeaseTiming { drift: t.drift, margin_ms: t.margin_ms }
            .validate(t.lease_ttl_ms, t.takeover_delay_ms)
            .map_err(|e| format!("timing: {e}"))?;
        // The workload's client retries a call for 2 * op_timeout_ms.
        if self.timing.request_window_ms <= 2 * w.op_timeout_ms {
            return Err(format!(
                "timing.request_window_ms ({}) must exceed the workload's retry deadline, 2 * op_timeout_ms ({} ms)",
                self.timing.request_window_ms,
                2 * w.op_timeout_ms
            ));
        }
        let ends = self.faults.iter().map(|f| f.at_ms + f.fault.lasts_ms());
        let last = ends.chain(self.random.as_ref().map(|r| r.end_ms)).max().unwrap_or(0);
        if last + self.expect.liveness_bound_ms > w.duration_ms {
            return Err(format!(
                "the last fault ({last} ms) plus the liveness bound ({} ms) must end before the workload ({} ms)",
                self.expect.liveness_bound_ms, w.duration_ms
            ));
        }
        Ok(())
    }

    /// Checks every node and volume a scripted fault names exists in the
    /// cluster (`node-1`.., `vol-1`.., `meta`). Errors: the fault and the
    /// names there are.
    fn check_names(&self) -> Result<(), String> {
        let nodes = self.nodes();
        let volumes = self.volumes();
        let node_ok = |n: &String| n == "meta" || nodes.contains(n);
        for f in &self.faults {
            let (named_nodes, volume): (Vec<&String>, Option<&String>) = match &f.fault {
                Fault::EbsDetach { volume, node } | Fault::EbsReattach { volume, node } => (vec![node], Some(volume)),
                Fault::DiskStall { volume, node, .. }
                | Fault::DiskHang { volume, node }
                | Fault::DiskErrors { volume, node, .. } => (vec![node], Some(volume)),
                Fault::NodeCrash { node }
                | Fault::NodeRestart { node }
                | Fault::NodePause { node }
                | Fault::NodeResume { node }
                | Fault::Isolate { node }
                | Fault::ClockJitter { node, .. } => (vec![node], None),
                Fault::Partition { from, to, .. } => (from.iter().chain(to).collect(), None),
                Fault::Heal | Fault::MetadataUnavailable { .. } | Fault::MetadataDiskErrors { .. } => (vec![], None),
            };
            if let Some(bad) = named_nodes.into_iter().find(|n| !node_ok(n)) {
                return Err(format!(
                    "the fault at {} ms names node {bad:?}, but the cluster has {} and meta",
                    f.at_ms,
                    nodes.join(", ")
                ));
            }
            if let Some(bad) = volume.filter(|v| !volumes.contains(v)) {
                return Err(format!(
                    "the fault at {} ms names volume {bad:?}, but the cluster has {}",
                    f.at_ms,
                    volumes.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Storage node names, `node-1`...
    pub fn nodes(&self) -> Vec<String> {
        (1..=self.cluster.storage_nodes).map(|i| format!("node-{i}")).collect()
    }

    /// Volume names, `vol-1`...
    pub fn volumes(&self) -> Vec<String> {
        attache_actors::node::numbered_volumes(self.cluster.volumes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_fault(fault: &str) -> Result<Scenario, String> {
        let text = format!("name = \"t\"\n[workload]\nduration_ms = 30000\n[[faults]]\nat_ms = 1000\n{fault}\n");
        let s: Scenario = toml::from_str(&text).map_err(|e| e.to_string())?;
        s.validate().map(|_| s)
    }

    /// An unknown node or volume in a scenario file once panicked in the
    /// middle of a run; now loading it is an error that names it.
    #[test]
    fn a_fault_naming_an_unknown_node_or_volume_is_an_error() {
        let e = with_fault("type = \"node_crash\"\nnode = \"node-9\"").unwrap_err();
        assert!(e.contains("node \"node-9\"") && e.contains("node-1, node-2, node-3"), "{e}");
        let e = with_fault("type = \"ebs_detach\"\nnode = \"node-1\"\nvolume = \"vol-7\"").unwrap_err();
        assert!(e.contains("volume \"vol-7\""), "{e}");
        let e = with_fault("type = \"partition\"\nfrom = [\"node-1\"]\nto = [\"metadata\"]\nboth = true").unwrap_err();
        assert!(e.contains("\"metadata\""), "{e}");
        with_fault("type = \"partition\"\nfrom = [\"node-1\"]\nto = [\"meta\"]\nboth = true").unwrap();
    }
}
