//! Where new shards go (`node::lifecycle::choose_volume`), seen from the
//! clients' history of whole simulated runs. Runs in the simulation build only.
#![cfg(madsim)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use attache_sim::history::{EventType, F};
use attache_sim::run::run_once;
use attache_sim::scenario::Scenario;

/// `scenarios/placement-by-free-space.toml`: no shard goes to vol-1, whose
/// free space is far behind, and vol-2 and vol-3, balanced, take turns.
/// (Placing by number of shards alone puts a third of them on vol-1.)
#[test]
fn new_shards_go_to_the_volumes_with_most_free_space_and_take_turns_among_them() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/placement-by-free-space.toml");
    let s = Scenario::load(&path).unwrap();
    for seed in 0..3 {
        let out = run_once(&s, seed);
        assert!(out.summary.violations.is_empty(), "seed {seed}: {:?}", out.summary.violations);
        let mut placed: BTreeMap<String, usize> = BTreeMap::new();
        let mut refused = 0;
        for e in out.outcome.history.events.iter().filter(|e| e.f == F::NewShard) {
            match e.kind {
                // A created shard's volume is the value of its `ok` event.
                EventType::Ok => {
                    *placed.entry(e.value.clone().expect("a created shard names its volume")).or_default() += 1
                }
                EventType::Invoke => {}
                _ => refused += 1,
            }
        }
        assert_eq!(refused, 0, "seed {seed}: no fault, yet a NewShard failed");
        assert!(!placed.contains_key("vol-1"), "seed {seed}: a shard went to the volume with least room: {placed:?}");
        let (two, three) = (placed.get("vol-2").copied().unwrap_or(0), placed.get("vol-3").copied().unwrap_or(0));
        assert!(two + three >= 6, "seed {seed}: too few shards created to tell: {placed:?}");
        assert!(two.abs_diff(three) <= 1, "seed {seed}: balanced volumes take turns: {placed:?}");
    }
}
