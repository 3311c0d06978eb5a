//! `attache-sim shrink` on a run known to fail: the shrunk scenario keeps
//! only the faults the failure needs, pins its seed, has no random schedule,
//! and still fails with the same checker. Runs in the simulation build only.
#![cfg(madsim)]

use std::path::Path;

use attache_faults::{Fault, Scheduled};
use attache_sim::run::run_once;
use attache_sim::scenario::Scenario;
use attache_sim::shrink::shrink;

#[test]
fn shrinking_drops_the_faults_a_failure_does_not_need() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/primary-paused-past-lease.toml");
    let mut s = Scenario::load(Path::new(path)).unwrap();
    // Storage fencing off: the paused primary's late write breaks single-writer
    // (tests/layers.rs; separate machines, no shared shard locks). Add faults
    // that have nothing to do with it.
    s.ebs.fencing = false;
    s.ebs.shard_locks = false;
    for at_ms in [3_000, 5_000, 15_000] {
        s.faults.push(Scheduled { at_ms, fault: Fault::ClockJitter { node: "node-3".into(), ppm: 300 }, when: None });
    }
    s.faults.push(Scheduled { at_ms: 4_000, fault: Fault::MetadataUnavailable { for_ms: 200 }, when: None });
    s.faults.sort_by_key(|f| f.at_ms);
    let seed = (0..30)
        .find(|&seed| run_once(&s, seed).summary.violations.iter().any(|v| v.checker == "single_writer"))
        .expect("storage fencing off fails within 30 seeds");

    let shrunk = shrink(&s, seed, |_, _| {}).unwrap();
    assert_eq!(shrunk.faults_before, 6);
    assert!(shrunk.faults_after < shrunk.faults_before, "{:?}", shrunk.scenario.faults);
    // 1-minimal: without any one of its units (a fault and its repair), the
    // run no longer fails that way. (A fault unrelated to the bug may stay:
    // removing it can change the timing this seed needs.)
    let units = attache_sim::shrink::units(&shrunk.scenario.faults);
    for i in 0..units.len() {
        let mut less = shrunk.scenario.clone();
        less.faults = units.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, u)| u.clone()).collect();
        less.faults.sort_by_key(|f| f.at_ms);
        let still = run_once(&less, seed).summary.violations.iter().any(|v| v.checker == "single_writer");
        assert!(!still, "unit {:?} is not needed", units[i]);
    }
    assert!(
        shrunk.scenario.faults.iter().any(|f| matches!(f.fault, Fault::NodePause { .. })),
        "the pause is what fails: {:?}",
        shrunk.scenario.faults
    );
    assert_eq!(shrunk.scenario.seed, Some(seed));
    assert!(shrunk.scenario.random.is_none());
    assert!(shrunk.violations.iter().any(|v| v.checker == "single_writer"), "{:?}", shrunk.violations);
    // What it writes is what replays: through TOML and back, it still fails.
    let back: Scenario = toml::from_str(&toml::to_string(&shrunk.scenario).unwrap()).unwrap();
    assert_eq!(back, shrunk.scenario);
    assert!(run_once(&back, seed).summary.violations.iter().any(|v| v.checker == "single_writer"));
}

#[test]
fn shrinking_a_passing_run_is_an_error() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/primary-crash.toml");
    let s = Scenario::load(Path::new(path)).unwrap();
    let e = shrink(&s, 1, |_, _| {}).unwrap_err();
    assert!(e.contains("passes: nothing to shrink"), "{e}");
}
