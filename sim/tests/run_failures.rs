//! A run that panics, hangs past its simulated time limit, or deadlocks is a
//! failure of that seed, reported as a violation with a replay command, not
//! the end of the whole run. Runs in the simulation build only.
#![cfg(madsim)]

use std::path::Path;

use attache_sim::report::RunOutcome;
use attache_sim::run::{replay_command, run_guarded};
use attache_sim::scenario::Scenario;
use tokio::time::Duration;

fn scenario() -> Scenario {
    Scenario::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/primary-crash.toml"))).unwrap()
}

fn empty() -> RunOutcome {
    RunOutcome::default()
}

#[test]
fn a_panic_on_a_simulated_node_is_a_violation_of_that_seed() {
    let s = scenario();
    let report = run_guarded(&s, 42, Duration::from_secs(60), |_, _| async {
        let node = madsim::runtime::Handle::current().create_node().name("node-1").build();
        node.spawn(async { panic!("invariant broken on node-1") }).await.unwrap();
        empty()
    });
    let v = &report.summary.violations;
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].checker, "panic");
    assert!(v[0].message.contains("invariant broken on node-1"), "{v:?}");
    assert_eq!(report.summary.seed, 42);
    assert_eq!(
        replay_command(Path::new("scenarios/primary-crash.toml"), 42),
        "scripts/sim.sh replay --scenario scenarios/primary-crash.toml --seed 42"
    );
}

#[test]
fn a_run_past_its_time_limit_is_a_violation_of_that_seed() {
    let s = scenario();
    let report = run_guarded(&s, 7, Duration::from_secs(5), |_, _| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        empty()
    });
    let v = &report.summary.violations;
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].checker, "time-limit", "{v:?}");
}

#[test]
fn a_run_where_every_task_waits_forever_is_a_violation_of_that_seed() {
    let s = scenario();
    let report = run_guarded(&s, 7, Duration::from_secs(5), |_, _| async {
        futures::future::pending::<()>().await;
        empty()
    });
    assert_eq!(report.summary.violations[0].checker, "deadlock", "{:?}", report.summary.violations);
}

#[test]
fn a_failed_seed_does_not_stop_the_next_one() {
    let s = scenario();
    let failed = run_guarded(&s, 1, Duration::from_secs(5), |_, _| async { panic!("boom") });
    assert_eq!(failed.summary.violations[0].checker, "panic");
    let fine = run_guarded(&s, 2, Duration::from_secs(5), |_, _| async { empty() });
    assert!(fine.summary.violations.iter().all(|v| v.checker != "panic"), "{:?}", fine.summary.violations);
}
