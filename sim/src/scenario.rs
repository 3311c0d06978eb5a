//! Scenario files (`scenarios/*.toml`): one story each — the cluster's shape,
//! the workload, the faults at simulated times (or a random schedule), the
//! expectations, and sim-only switches that turn a fencing layer off to show
//! the checkers catch what it prevents. Every key but `name` has a default.

use std::path::Path;

use attache_faults::{Fault, RandomRates, Scheduled, Target};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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
    /// Swarm testing: each seed draws its own cluster shape, fault mix and
    /// timing (see [`SwarmSpec`] and [`Scenario::for_seed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swarm: Option<SwarmSpec>,
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

/// Swarm testing (Groce, Zhang, Eide, Chen and Regehr, "Swarm Testing",
/// ISSTA 2012): rather than one configuration with every feature on, each
/// seed draws its own: how many storage nodes, volumes and clients, which
/// fault kinds of `random.rates` occur at all (the others are off for that
/// run, so a fault kind that masks another is sometimes absent) and how
/// often, how many nodes may be disrupted at once, the lease timing, the
/// workload's mix, whether the nodes share one machine's shard locks, and
/// whether buggify is on (always, if the scenario has a `[buggify]`
/// section). Ranges are inclusive `[min, max]`. The draw uses its own
/// generator seeded from the run's seed, so (scenario, seed) still replays
/// bit for bit; the run's summary names what was drawn. Which
/// configuration a seed draws depends on the scenario file as well (how
/// many fault kinds it has, for one): after editing the file, a seed may
/// draw another cluster, so a failing seed is kept by shrinking it, which
/// writes the drawn configuration out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwarmSpec {
    pub storage_nodes: [usize; 2],
    pub volumes: [usize; 2],
    pub clients: [usize; 2],
    pub processes_per_client: [usize; 2],
    pub hot_keys: [usize; 2],
    /// Most storage nodes disrupted at once (`random.rates.max_concurrent`).
    pub max_concurrent: [usize; 2],
    /// Lease TTL, ms; the lease renewal poll is a tenth of it.
    pub lease_ttl_ms: [u64; 2],
    /// Chance that each fault kind with a rate above 0 in `random.rates`
    /// occurs in a run (at least one kind always does).
    pub fault_kind_ratio: f64,
    /// Each kept fault kind's rate is multiplied by a factor drawn here.
    pub rate_scale: [f64; 2],
    /// Share of runs in which the nodes share one machine's shard locks
    /// (`ebs.shard_locks`); in the others they are separate machines.
    pub shard_locks_ratio: f64,
    /// Share of runs with buggify on, at `buggify_probability`.
    pub buggify_ratio: f64,
    pub buggify_probability: f64,
    /// `workload.write_ratio` is drawn in this range.
    pub write_ratio: [f64; 2],
    /// Share of the runs with shared shard locks (one machine) whose
    /// volumes use the EPOCH-file fence of local volumes (`ebs.fence =
    /// "epoch_file"`, whose `flock` is one machine's) instead of a reservation.
    pub epoch_file_ratio: f64,
    /// Share of the runs without shared shard locks (separate machines)
    /// whose volumes are block volumes only the primary mounts
    /// (`ebs.block_mode`).
    pub block_mode_ratio: f64,
    /// Share of runs whose nodes keep one shard open per volume at most
    /// (`cluster.max_open_shards` = the number of volumes), so idle shards
    /// close and reopen all through the run.
    pub open_shard_limit_ratio: f64,
}

impl Default for SwarmSpec {
    fn default() -> Self {
        SwarmSpec {
            storage_nodes: [2, 5],
            volumes: [1, 6],
            clients: [1, 4],
            processes_per_client: [2, 6],
            hot_keys: [2, 5],
            max_concurrent: [1, 3],
            lease_ttl_ms: [1_000, 3_000],
            fault_kind_ratio: 0.5,
            rate_scale: [0.5, 2.0],
            shard_locks_ratio: 0.5,
            buggify_ratio: 0.3,
            buggify_probability: 0.1,
            write_ratio: [0.2, 0.8],
            epoch_file_ratio: 0.0,
            block_mode_ratio: 0.0,
            open_shard_limit_ratio: 0.0,
        }
    }
}

/// Liveness bound added per extra ms of lease TTL above 2 s (a failover
/// waits for the old lease to expire, and a takeover cut short by a second
/// fault waits for it again), and per node disrupted at once beyond the
/// first (the next backup in line waits one more rank delay), ms.
const SWARM_BOUND_PER_TTL_MS: u64 = 2;
const SWARM_BOUND_PER_CONCURRENT_MS: u64 = 1_000;

/// What a swarm run adds to the scenario's liveness bound for a lease TTL
/// of `ttl_ms` and `concurrent` nodes disrupted at once, ms.
fn swarm_extra_bound_ms(ttl_ms: u64, concurrent: usize) -> u64 {
    SWARM_BOUND_PER_TTL_MS * ttl_ms.saturating_sub(2_000)
        + SWARM_BOUND_PER_CONCURRENT_MS * (concurrent as u64).saturating_sub(1)
}

impl SwarmSpec {
    /// Checks every range is ordered and drawable. Errors: the bad key.
    fn validate(&self) -> Result<(), String> {
        let usize_ranges = [
            ("storage_nodes", self.storage_nodes),
            ("volumes", self.volumes),
            ("clients", self.clients),
            ("processes_per_client", self.processes_per_client),
            ("hot_keys", self.hot_keys),
            ("max_concurrent", self.max_concurrent),
        ];
        for (name, [lo, hi]) in usize_ranges {
            if lo == 0 || lo > hi {
                return Err(format!("swarm.{name} is [{lo}, {hi}]: it needs 1 <= min <= max"));
            }
        }
        if self.storage_nodes[1] > crate::ebs::MAX_ATTACHMENTS {
            return Err(format!("swarm.storage_nodes: io2 multi-attach allows {} nodes", crate::ebs::MAX_ATTACHMENTS));
        }
        let [lo, hi] = self.lease_ttl_ms;
        if lo > hi {
            return Err(format!("swarm.lease_ttl_ms is [{lo}, {hi}]: min must not exceed max"));
        }
        let ratios = [
            ("fault_kind_ratio", self.fault_kind_ratio),
            ("shard_locks_ratio", self.shard_locks_ratio),
            ("buggify_ratio", self.buggify_ratio),
            ("buggify_probability", self.buggify_probability),
            ("epoch_file_ratio", self.epoch_file_ratio),
            ("block_mode_ratio", self.block_mode_ratio),
            ("open_shard_limit_ratio", self.open_shard_limit_ratio),
        ];
        for (name, r) in
            ratios.into_iter().chain([("write_ratio", self.write_ratio[0]), ("write_ratio", self.write_ratio[1])])
        {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("swarm.{name} is {r}: it must be between 0 and 1"));
            }
        }
        if self.write_ratio[0] > self.write_ratio[1]
            || !(0.0 < self.rate_scale[0] && self.rate_scale[0] <= self.rate_scale[1] && self.rate_scale[1] <= 100.0)
        {
            return Err(
                "swarm.write_ratio and swarm.rate_scale need 0 <= min <= max (rate_scale above 0, at most 100)".into(),
            );
        }
        Ok(())
    }
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
    /// Most shards each storage node keeps open at once
    /// (`NodeConfig::max_open_shards`; 0: no limit): small, so that idle
    /// shards close and reopen all through a run.
    #[serde(skip_serializing_if = "is_zero_usize")]
    pub max_open_shards: usize,
}

fn is_zero_usize(n: &usize) -> bool {
    *n == 0
}

impl Default for ClusterShape {
    fn default() -> Self {
        ClusterShape { storage_nodes: 3, volumes: 3, clients: 2, scan_page: 2, max_open_shards: 0 }
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
    /// Share of those BatchGets that are a ScanIndex of the whole index
    /// instead; above 0, every put and batch put also writes the index
    /// entry `val = value` for each of its keys (so a ScanIndex sees every
    /// key present, under its current value).
    pub scan_index_ratio: f64,
    /// Share of the other linearizable reads that are a ShardStats of the
    /// shard instead of a Get.
    pub shard_stats_ratio: f64,
    /// Each client with two shards or more closes its last shard at a time
    /// drawn in the second quarter of the run and deletes it in the third,
    /// while its processes keep using it.
    pub lifecycle: bool,
    /// Share of clients whose lifecycle task closes and deletes at the same
    /// moment (the two race) rather than one after the other.
    pub lifecycle_race_ratio: f64,
    /// Share of operations sent, with the client's own id, to another client's shard.
    pub cross_client_ratio: f64,
    /// Share of those cross-client operations that name the shard owner's
    /// client id instead: half with the caller's own token, half with no
    /// token (recorded as the caller `anonymous`). Every one must be
    /// refused (`PERMISSION_DENIED`, `UNAUTHENTICATED`) and change nothing.
    pub impersonate_ratio: f64,
    /// Every this many ms (0: never), an intruder, a machine on the
    /// network that is no storage node, calls the metadata endpoint
    /// directly (`attache meta`'s `Metadata` service), as a client with
    /// its token, with an unknown token, or with none, trying what would
    /// move a volume or take a node down: put a volume's owner record,
    /// delete a node's liveness record, revoke a lease, a transaction that
    /// deletes every record, or read the records. Every call must be
    /// refused (`check::metadata_intrusions`).
    pub metadata_intrusion_ms: u64,
    /// Share of a process's turns in which it creates a shard (NewShard at a
    /// random node, sent once), while the client has tried fewer than
    /// `max_new_shards` times; the client's processes then use it too.
    pub new_shard_ratio: f64,
    /// Most NewShard calls a client makes during the run, besides its first shards.
    pub max_new_shards: usize,
    /// Share of reads that accept stale data, sent to a random node (backups serve them).
    pub stale_read_ratio: f64,
    /// Share of those stale reads that are a Scan of the whole shard (each
    /// page a separate read of the serving node's view, with its own age)
    /// rather than a Get of one key.
    pub stale_scan_ratio: f64,
    /// Above 0: each stale read or scan asks for a view no older than a
    /// `max_staleness_ms` drawn from 1 to this, ms (a backup's view older
    /// than that catches up first, or the read is refused and retried).
    pub stale_bound_ms: u64,
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
            scan_index_ratio: 0.3,
            shard_stats_ratio: 0.05,
            lifecycle: true,
            lifecycle_race_ratio: 0.5,
            cross_client_ratio: 0.02,
            impersonate_ratio: 0.0,
            metadata_intrusion_ms: 0,
            new_shard_ratio: 0.002,
            max_new_shards: 3,
            random_node_ratio: 0.05,
            stale_read_ratio: 0.1,
            stale_scan_ratio: 0.3,
            stale_bound_ms: 300,
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
        Scenario::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and validates a scenario's TOML text. Errors: invalid TOML, an
    /// unknown key, or a setting [`Scenario::validate`] refuses.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    /// The scenario that `seed` runs: itself, or with a [`SwarmSpec`] the
    /// configuration the seed draws (without its `swarm` section, so it can
    /// be written out and replayed on its own, as `shrink` does). The
    /// liveness bound grows with the drawn lease TTL and concurrency (see
    /// `SWARM_BOUND_PER_TTL_MS`). The result passes [`Scenario::validate`]
    /// whenever the swarm's extremes do (checked by `validate`).
    pub fn for_seed(&self, seed: u64) -> Scenario {
        let Some(sw) = &self.swarm else { return self.clone() };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0073_7761_726d);
        let mut s = self.clone();
        s.swarm = None;
        let mut pick = |[lo, hi]: [usize; 2]| rng.random_range(lo..=hi);
        s.cluster.storage_nodes = pick(sw.storage_nodes);
        s.cluster.volumes = pick(sw.volumes);
        s.cluster.clients = pick(sw.clients);
        s.workload.processes_per_client = pick(sw.processes_per_client);
        s.workload.hot_keys = pick(sw.hot_keys);
        let concurrent = pick(sw.max_concurrent);
        s.workload.write_ratio = rng.random_range(sw.write_ratio[0]..=sw.write_ratio[1]);
        let ttl = rng.random_range(sw.lease_ttl_ms[0]..=sw.lease_ttl_ms[1]);
        s.timing.lease_ttl_ms = ttl;
        s.timing.poll_ms = (ttl / 10).max(1);
        s.ebs.shard_locks = rng.random_bool(sw.shard_locks_ratio);
        // (No draw at ratio 0, so older swarm files draw as before.)
        if s.ebs.shard_locks && sw.epoch_file_ratio > 0.0 && rng.random_bool(sw.epoch_file_ratio) {
            s.ebs.fence = crate::ebs::FenceModel::EpochFile;
        }
        if !s.ebs.shard_locks && sw.block_mode_ratio > 0.0 && rng.random_bool(sw.block_mode_ratio) {
            s.ebs.block_mode = true;
        }
        if s.buggify.is_none() && rng.random_bool(sw.buggify_ratio) {
            s.buggify = Some(BuggifySpec { probability: sw.buggify_probability });
        }
        if let Some(random) = &mut s.random {
            let r = &mut random.rates;
            r.max_concurrent = concurrent;
            let kinds = r.kinds_mut();
            let present: Vec<usize> = (0..kinds.len()).filter(|&i| *kinds[i].1 > 0.0).collect();
            let keep: Vec<bool> = present.iter().map(|_| rng.random_bool(sw.fault_kind_ratio)).collect();
            let always = (!present.is_empty()).then(|| present[rng.random_range(0..present.len())]);
            for (i, kept) in present.into_iter().zip(keep) {
                *kinds[i].1 = if kept || Some(i) == always {
                    *kinds[i].1 * rng.random_range(sw.rate_scale[0]..=sw.rate_scale[1])
                } else {
                    0.0
                };
            }
        }
        // Drawn last, so runs at ratio 0 draw everything else as before.
        if sw.open_shard_limit_ratio > 0.0 && rng.random_bool(sw.open_shard_limit_ratio) {
            s.cluster.max_open_shards = s.cluster.volumes;
        }
        s.expect.liveness_bound_ms += swarm_extra_bound_ms(ttl, concurrent);
        s
    }

    /// What [`Scenario::for_seed`] drew, in one line for a run's summary:
    /// `None` without a swarm.
    pub fn swarm_draw(&self, seed: u64) -> Option<String> {
        self.swarm.as_ref()?;
        let s = self.for_seed(seed);
        let mut kinds = Vec::new();
        if let Some(r) = s.random.as_ref().map(|r| &r.rates) {
            let rates = r.kinds();
            kinds = rates.iter().filter(|(_, v)| *v > 0.0).map(|(k, v)| format!("{k}={v:.2}")).collect();
        }
        Some(format!(
            "storage_nodes={} volumes={} clients={} processes_per_client={} hot_keys={} write_ratio={:.2} \
             lease_ttl_ms={} liveness_bound_ms={} max_concurrent={} shard_locks={} fence={:?} block_mode={} buggify={} \
             faults: {}{}",
            s.cluster.storage_nodes,
            s.cluster.volumes,
            s.cluster.clients,
            s.workload.processes_per_client,
            s.workload.hot_keys,
            s.workload.write_ratio,
            s.timing.lease_ttl_ms,
            s.expect.liveness_bound_ms,
            s.random.as_ref().map_or(0, |r| r.rates.max_concurrent),
            s.ebs.shard_locks,
            s.ebs.fence,
            s.ebs.block_mode,
            s.buggify.is_some(),
            kinds.join(" "),
            match s.cluster.max_open_shards {
                0 => String::new(),
                n => format!(" max_open_shards={n}"),
            }
        ))
    }

    /// Checks the shape makes sense. Errors: what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(sw) = &self.swarm {
            sw.validate()?;
            // The extremes of the draw must make valid scenarios.
            // (The fewest nodes and volumes with the shortest TTL: scripted
            // faults must name only nodes and volumes every draw has.)
            for (nodes, volumes, ttl, concurrent) in [
                (sw.storage_nodes[0], sw.volumes[0], sw.lease_ttl_ms[0], sw.max_concurrent[0]),
                (sw.storage_nodes[1], sw.volumes[1], sw.lease_ttl_ms[1], sw.max_concurrent[1]),
            ] {
                let mut s = self.clone();
                s.swarm = None;
                s.cluster.storage_nodes = nodes;
                s.cluster.volumes = volumes;
                s.timing.lease_ttl_ms = ttl;
                s.timing.poll_ms = (ttl / 10).max(1);
                s.expect.liveness_bound_ms += swarm_extra_bound_ms(ttl, concurrent);
                s.validate().map_err(|e| format!("with swarm.lease_ttl_ms = {ttl} and {concurrent} at once: {e}"))?;
            }
        }
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
        if let Some(r) = &self.random {
            let ppm = r.rates.max_clock_ppm;
            if !(0..=900_000).contains(&ppm) {
                return Err(format!("random.rates.max_clock_ppm is {ppm}: between 0 and 900000, please"));
            }
        }
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
    /// cluster (`node-1`.., `vol-1`.., `meta`; `client-1`.. in a partition
    /// or an isolation; a role, `primary:vol-1` or `backup:vol-1`, wherever
    /// a storage node may stand). Errors: the fault and the names there are.
    fn check_names(&self) -> Result<(), String> {
        let nodes = self.nodes();
        let volumes = self.volumes();
        let clients: Vec<String> = (1..=self.cluster.clients).map(|j| format!("client-{j}")).collect();
        for f in &self.faults {
            let may_be_client = matches!(f.fault, Fault::Partition { .. } | Fault::Isolate { .. });
            let node_ok = |n: &String| match Target::parse(n) {
                Target::Node(n) => {
                    n == "meta" || nodes.iter().any(|x| x == n) || (may_be_client && clients.iter().any(|c| c == n))
                }
                Target::Primary(v) | Target::Backup(v) => volumes.iter().any(|x| x == v),
            };
            let volume = match &f.fault {
                Fault::EbsDetach { volume, .. }
                | Fault::EbsReattach { volume, .. }
                | Fault::DiskStall { volume, .. }
                | Fault::DiskHang { volume, .. }
                | Fault::DiskErrors { volume, .. }
                | Fault::DiskFull { volume, .. } => Some(volume),
                _ => None,
            };
            if let Some(bad) = f.fault.node_names().into_iter().find(|n| !node_ok(n)) {
                return Err(format!(
                    "the fault at {} ms names node {bad:?}, but the cluster has {}, meta{} and the roles \
                     primary:VOLUME and backup:VOLUME",
                    f.at_ms,
                    nodes.join(", "),
                    if may_be_client { format!(", {}", clients.join(", ")) } else { String::new() }
                ));
            }
            if let Fault::ClockJitter { ppm, .. } = &f.fault {
                // A rate of 0.1 to 1.9 times true speed.
                if !(-900_000..=900_000).contains(ppm) {
                    return Err(format!(
                        "the fault at {} ms sets a clock {ppm} ppm off: between -900000 and 900000, please",
                        f.at_ms
                    ));
                }
            }
            if let Some(when) = &f.when {
                let moment =
                    attache_faults::Moment::parse(when).map_err(|e| format!("the fault at {} ms: {e}", f.at_ms))?;
                if !volumes.iter().any(|v| v == moment.volume()) {
                    return Err(format!(
                        "the fault at {} ms waits for {when:?}, but the cluster has {}",
                        f.at_ms,
                        volumes.join(", ")
                    ));
                }
                if f.fault.is_repair() {
                    return Err(format!("the fault at {} ms is a repair: only a fault waits for a moment", f.at_ms));
                }
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
    use std::collections::BTreeSet;

    use super::*;

    fn with_fault(fault: &str) -> Result<Scenario, String> {
        let text = format!("name = \"t\"\n[workload]\nduration_ms = 30000\n[[faults]]\nat_ms = 1000\n{fault}\n");
        let s: Scenario = toml::from_str(&text).map_err(|e| e.to_string())?;
        s.validate().map(|_| s)
    }

    /// Fuzzing of scenario files: every checked-in scenario with one byte
    /// changed and maybe cut short parses, or is refused with a message;
    /// nothing panics. Cases: `ATTACHE_FUZZ_CASES` (default 500).
    #[test]
    fn a_damaged_scenario_file_parses_or_says_why() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios"));
        let mut files: Vec<Vec<u8>> = Vec::new();
        for sub in [dir.to_path_buf(), dir.join("assumptions")] {
            for entry in std::fs::read_dir(&sub).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "toml") {
                    files.push(std::fs::read(&path).unwrap());
                }
            }
        }
        assert!(files.len() >= 20, "{} scenario files", files.len());
        let cases = std::env::var("ATTACHE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
        let mut runner =
            TestRunner::new_with_rng(Config::with_cases(cases), TestRng::deterministic_rng(RngAlgorithm::ChaCha));
        let input = (0..files.len(), any::<usize>(), any::<u8>(), any::<usize>());
        let parsed = std::cell::Cell::new(0u32);
        runner
            .run(&input, |(file, at, byte, cut)| {
                let mut text = files[file].clone();
                let at = at % text.len();
                text[at] = byte;
                text.truncate(cut % (text.len() + 1));
                match Scenario::parse(&String::from_utf8_lossy(&text)) {
                    Ok(_) => parsed.set(parsed.get() + 1),
                    Err(e) => prop_assert!(!e.is_empty()),
                }
                Ok(())
            })
            .unwrap();
        // The inputs reach past the TOML parser: some stay valid scenarios.
        assert!(parsed.get() >= (cases / 100).max(1), "{} of {cases} damaged scenarios parsed", parsed.get());
    }

    fn swarm() -> Scenario {
        Scenario::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/random-swarm.toml"))).unwrap()
    }

    /// Every seed draws a valid configuration inside the swarm's ranges, the
    /// same one every time, and the draws cover the ranges' ends.
    #[test]
    fn swarm_draws_valid_varied_and_repeatable_configurations() {
        let s = swarm();
        let sw = s.swarm.clone().unwrap();
        let (mut nodes, mut volumes, mut kinds_off, mut locks, mut buggify) =
            (BTreeSet::new(), BTreeSet::new(), 0, 0, 0);
        for seed in 0..2_000 {
            let d = s.for_seed(seed);
            assert_eq!(d, s.for_seed(seed), "seed {seed}");
            assert!(d.swarm.is_none());
            d.validate().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let c = &d.cluster;
            assert!((sw.storage_nodes[0]..=sw.storage_nodes[1]).contains(&c.storage_nodes));
            assert!((sw.lease_ttl_ms[0]..=sw.lease_ttl_ms[1]).contains(&d.timing.lease_ttl_ms));
            nodes.insert(c.storage_nodes);
            volumes.insert(c.volumes);
            let r = &d.random.as_ref().unwrap().rates;
            assert!(r.kinds().iter().map(|(_, rate)| rate).sum::<f64>() > 0.0, "seed {seed}: no fault kind");
            kinds_off += usize::from(r.node_crash == 0.0);
            locks += usize::from(d.ebs.shard_locks);
            buggify += usize::from(d.buggify.is_some());
        }
        assert_eq!(nodes, (2..=5).collect());
        assert_eq!(volumes, (1..=6).collect());
        // About half of each (fault kinds off, shared locks), about 30% buggify.
        for (what, n) in [("node_crash off", kinds_off), ("shared locks", locks)] {
            assert!((800..1_200).contains(&n), "{what}: {n} of 2000");
        }
        assert!((450..750).contains(&buggify), "buggify {buggify} of 2000");
        assert_ne!(s.for_seed(1), s.for_seed(2));
        assert!(s.swarm_draw(7).unwrap().contains("storage_nodes="));
    }

    /// A scenario without a swarm runs as written, and a swarm whose ranges
    /// make no sense is refused at load with the key named.
    #[test]
    fn swarm_ranges_are_checked() {
        let plain = with_fault("type = \"heal\"").unwrap();
        assert_eq!(plain.for_seed(5), plain);
        assert_eq!(plain.swarm_draw(5), None);
        let mut s = swarm();
        s.swarm.as_mut().unwrap().storage_nodes = [3, 2];
        assert!(s.validate().unwrap_err().contains("swarm.storage_nodes"));
        let mut s = swarm();
        s.swarm.as_mut().unwrap().lease_ttl_ms = [100, 3000];
        let e = s.validate().unwrap_err();
        assert!(e.contains("lease_ttl_ms = 100"), "{e}");
        let mut s = swarm();
        s.swarm.as_mut().unwrap().rate_scale = [0.5, f64::INFINITY];
        assert!(s.validate().unwrap_err().contains("rate_scale"));
        // A scripted fault must name a volume every draw has.
        let mut s = swarm();
        s.faults = with_fault("type = \"disk_stall\"\nvolume = \"vol-2\"\nnode = \"node-1\"\nms = 10\nfor_ms = 10")
            .unwrap()
            .faults;
        let e = s.validate().unwrap_err();
        assert!(e.contains("vol-2"), "{e}");
        let mut s = swarm();
        s.swarm.as_mut().unwrap().lease_ttl_ms = [1000, 9000];
        let e = s.validate().unwrap_err();
        assert!(e.contains("liveness bound"), "{e}");
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
        // Roles name a volume of the cluster; clients only stand in a partition or an isolation.
        with_fault("type = \"node_crash\"\nnode = \"primary:vol-1\"").unwrap();
        with_fault("type = \"partition\"\nfrom = [\"client-1\"]\nto = [\"backup:vol-1\"]\nboth = false").unwrap();
        let e = with_fault("type = \"node_crash\"\nnode = \"primary:vol-9\"").unwrap_err();
        assert!(e.contains("\"primary:vol-9\""), "{e}");
        let e = with_fault("type = \"node_crash\"\nnode = \"client-1\"").unwrap_err();
        assert!(e.contains("\"client-1\""), "{e}");
        // A moment names a kind and a volume of the cluster.
        with_fault("type = \"node_crash\"\nnode = \"primary:vol-1\"\nwhen = \"sync:vol-1\"").unwrap();
        let e = with_fault("type = \"node_crash\"\nnode = \"node-1\"\nwhen = \"commit:vol-1\"").unwrap_err();
        assert!(e.contains("expected fence:VOLUME"), "{e}");
        let e = with_fault("type = \"node_crash\"\nnode = \"node-1\"\nwhen = \"sync:vol-8\"").unwrap_err();
        assert!(e.contains("\"sync:vol-8\""), "{e}");
    }
}
