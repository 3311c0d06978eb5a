//! Snapshots of scenario summaries (faults, failovers with durations, op
//! counts, violations) for a fixed seed of every scenario in `scenarios/`,
//! kept in `snapshots/` and reviewed like code: any change in behaviour shows
//! up as a diff. Runs in the simulation build only.
#![cfg(madsim)]

use std::path::PathBuf;

use attache_sim::run::run_once;
use attache_sim::scenario::Scenario;

/// The seed every snapshot is taken at.
const SEED: u64 = 1;

fn scenarios() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn scenario_summaries_match_their_snapshots() {
    let files = scenarios();
    assert!(files.len() >= 10, "the scenarios directory holds every scenario");
    for path in files {
        let s = Scenario::load(&path).unwrap();
        let report = run_once(&s, SEED);
        insta::with_settings!({ snapshot_path => "../../snapshots", prepend_module_to_snapshot => false, omit_expression => true }, {
            insta::assert_yaml_snapshot!(s.name.clone(), report.summary);
        });
    }
}
