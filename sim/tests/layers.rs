//! Each safety layer, switched off, lets a checker find a violation within a
//! stated number of seeds; switched on, the same seeds are clean. This is the
//! evidence that the checkers have teeth and that every layer matters
//! (ARCHITECTURE.md, "Fencing"). Runs in the simulation build only.
#![cfg(madsim)]

use std::path::PathBuf;

use attache_sim::run::run_once;
use attache_sim::scenario::Scenario;

fn scenario(name: &str) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../scenarios/{name}.toml"));
    Scenario::load(&path).unwrap()
}

/// The first seed below `limit` whose run has a violation of `checker`.
fn first_violation(s: &Scenario, checker: &str, limit: u64) -> Option<u64> {
    (0..limit).find(|&seed| run_once(s, seed).summary.violations.iter().any(|v| v.checker == checker))
}

fn clean(s: &Scenario, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let v = run_once(s, seed).summary.violations;
        assert!(v.is_empty(), "{} seed {seed}: {v:?}", s.name);
    }
}

/// Layer 3, storage fencing: without it, the paused primary's in-flight
/// write lands after the new primary's first write. (On separate machines:
/// with shared shard locks, the paused process's locks keep the new primary
/// from opening the shards until it resumes and closes them.)
#[test]
fn without_storage_fencing_the_pause_scenario_breaks_single_writer_within_5_seeds() {
    let mut s = scenario("primary-paused-past-lease");
    s.ebs.shard_locks = false;
    clean(&s, 0..3);
    s.ebs.fencing = false;
    let seed = first_violation(&s, "single_writer", 5);
    assert!(seed.is_some(), "no single-writer violation in 5 seeds with storage fencing off");
}

/// The EPOCH-file fence of local volumes (`ebs.fence = "epoch_file"`): a
/// write batch holds the fence lock from its check of the file until its
/// sync returns, so the paused primary's batch, checked before the pause,
/// holds the new primary's claim back until it is written. Without that
/// lock (`ebs.fence_lock = false`, the fence before it was added) the batch
/// lands after the new primary opened the same shard, unless a shared shard
/// lock (RocksDB's LOCK on one machine) kept the new primary out.
#[test]
fn the_epoch_file_fence_lock_closes_the_gap_between_check_and_write() {
    let mut s = scenario("primary-paused-past-lease");
    s.ebs.fence = attache_sim::ebs::FenceModel::EpochFile;
    s.ebs.shard_locks = false;
    clean(&s, 0..5);
    s.ebs.fence_lock = false;
    let seed = first_violation(&s, "single_writer", 5);
    assert!(
        seed.is_some(),
        "no single-writer violation in 5 seeds with the EPOCH file, no fence lock, no shared locks"
    );
}

/// The lease gate's assumption, broken: a primary whose clock runs 40% slow
/// (the bound is `timing.drift`, 1%) keeps its gate open after a backup
/// took over, and its linearizable reads go stale
/// (`scenarios/assumptions/clock-drift-beyond-bound.toml`, which
/// `run --all-scenarios` leaves out). Within the bound, the same runs are clean.
#[test]
fn a_clock_beyond_the_drift_bound_breaks_linearizability_and_one_within_it_does_not() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/assumptions/clock-drift-beyond-bound.toml");
    let mut s = Scenario::load(&path).unwrap();
    let seed = first_violation(&s, "linearizable", 3);
    assert!(seed.is_some(), "no linearizability violation in 3 seeds with a clock 40% slow");
    let jitter = s.faults.iter_mut().find_map(|f| match &mut f.fault {
        attache_faults::Fault::ClockJitter { ppm, .. } => Some(ppm),
        _ => None,
    });
    *jitter.expect("the scenario sets a clock rate") = -5_000;
    clean(&s, 0..3);
}

/// The same assumption on the other clocks: within the bound, with the
/// metadata node's and the next backup's clocks 0.9% fast and the primary's
/// 0.9% slow, a takeover races the old primary's gate and loses
/// (`scenarios/clocks-drift-within-bound.toml`); with the two fast clocks
/// 40% fast, leases expire early and a backup takes over while the old gate
/// is still open, and a checker fails within 80 seeds (about one seed in
/// fifteen: 44, 49, 69 and 71 of 0..80 since group commits are pipelined;
/// 21, 33 and 38 of 0..40 when the client began hedging calls; 9, 17, 23
/// and 33 before). (With this timing the
/// lease margin alone covers the drift, so the store's fast clock is what
/// breaks it here; the backup's takeover delay is not load-bearing, and
/// this test does not show that its clock matters.)
#[test]
fn fast_clocks_beyond_the_bound_break_a_checker_and_within_it_do_not() {
    let mut s = scenario("clocks-drift-within-bound");
    clean(&s, 0..3);
    for f in &mut s.faults {
        if let attache_faults::Fault::ClockJitter { ppm, .. } = &mut f.fault {
            if *ppm > 0 {
                *ppm = 400_000;
            }
        }
    }
    let broken = (0..80).find(|&seed| {
        let v = run_once(&s, seed).summary.violations;
        v.iter().any(|v| matches!(v.checker.as_str(), "linearizable" | "lost_writes" | "stale_ages"))
    });
    assert!(broken.is_some(), "no violation in 80 seeds with the metadata and backup clocks 40% fast");
}

/// Layer 2, the lease gate: without it, a primary cut off from the metadata
/// store keeps serving reads after a backup took over and took writes: stale
/// reads. (Its writes are still stopped by storage fencing. On separate
/// machines: with shared shard locks, the old primary, whose closed gate
/// no longer makes it step down, keeps the new one from opening the shards.)
/// Seed 11 is the first when this was written (about one seed in three
/// fails).
#[test]
fn without_the_lease_gate_a_partitioned_primary_serves_stale_reads_within_20_seeds() {
    let mut s = scenario("partition-from-metadata");
    s.ebs.shard_locks = false;
    clean(&s, 0..3);
    s.sim_only.lease_gate = false;
    let seed = first_violation(&s, "linearizable", 20);
    assert!(seed.is_some(), "no linearizability violation in 20 seeds with the lease gate off");
}

/// Layer 1, the compare-and-swap on the owner record: without it, two
/// backups that see the primary gone at once both claim the same epoch.
/// Shown under the `EPOCH` file without shared shard locks, where nothing
/// else tells the two apart: an NVMe reservation knows its holder, so the
/// device refuses the second one's writes, and `take_fence` gives up a
/// claim whose key another host registered too.
#[test]
fn without_the_claim_cas_two_backups_share_an_epoch_within_100_seeds() {
    let mut s = scenario("primary-crash");
    s.ebs.fence = attache_sim::ebs::FenceModel::EpochFile;
    s.ebs.shard_locks = false;
    s.timing.rank_delay_ms = 0;
    clean(&s, 0..3);
    s.sim_only.metadata_cas = false;
    let seed = first_violation(&s, "single_writer", 100);
    assert!(seed.is_some(), "no single-writer violation in 100 seeds with blind claims");
}

/// The same (scenario, seed) gives the same run: history, volume writes and faults.
#[test]
fn a_seed_replays_bit_for_bit() {
    let s = scenario("random");
    for seed in [3, 4] {
        assert_eq!(run_once(&s, seed).digest(), run_once(&s, seed).digest(), "seed {seed}");
    }
}

/// Request ids (at-most-once writes): with them off, the fault schedule of
/// the shrunk regression `retried-put-applies-twice` (from `random.toml`
/// seed 257) fails linearizability again, as it did before request ids
/// existed (a put whose reply was lost is retried and applies again after
/// another writer's put), for some seed; with them on, that seed's run is
/// clean. (Which seed shows it moves when the harness's timing changes: the
/// first of 200 seeds that does is used; seed 36 when this was written.)
#[test]
fn without_request_ids_a_retried_put_applies_twice() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/regressions/retried-put-applies-twice.toml");
    let mut s = Scenario::load(&path).unwrap();
    let pinned = s.seed.take().expect("a regression pins its seed");
    clean(&s, pinned..pinned + 1);
    let mut without = s.clone();
    without.sim_only.request_ids = false;
    let failing =
        (0..200).find(|&seed| run_once(&without, seed).summary.violations.iter().any(|v| v.checker == "linearizable"));
    let seed = failing.expect("without request ids, some seed applies a retried put twice");
    clean(&s, seed..seed + 1);
}
