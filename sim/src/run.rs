//! Running one (scenario, seed) pair on a fresh madsim runtime (built with
//! `--cfg madsim` only). The same pair always gives the same run.

use tokio::time::Duration;

use crate::report::{self, RunReport};
use crate::scenario::Scenario;

/// Simulated time a run may take beyond its workload before it counts as hung.
const HANG_LIMIT: Duration = Duration::from_secs(600);

/// Runs `scenario` with `seed` and checks it.
pub fn run_once(scenario: &Scenario, seed: u64) -> RunReport {
    let mut rt = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
    rt.set_time_limit(Duration::from_millis(scenario.workload.duration_ms) + HANG_LIMIT);
    let s = scenario.clone();
    let outcome = rt.block_on(async move { crate::cluster::simulate(&s, seed).await });
    report::check(&scenario.name, seed, scenario.expect.liveness_bound_ms, outcome)
}
