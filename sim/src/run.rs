//! Running one (scenario, seed) pair on a fresh madsim runtime (built with
//! `--cfg madsim` only). The same pair always gives the same run.
//!
//! A run that panics (a node's task, an actor, the workload: madsim passes a
//! task's panic on to the runtime), that reaches its simulated time limit
//! (madsim panics with "time limit exceeded"), or in which every task waits
//! forever (madsim: "no events, all tasks will block forever") is a failure
//! of that seed: it is reported as a violation of the `panic`, `time-limit`
//! or `deadlock` checker, with an empty history, and the runner goes on with
//! the next seed and prints the seed's replay command.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tokio::time::Duration;

use crate::check::Violation;
use crate::cluster::simulate;
use crate::report::{self, RunOutcome, RunReport};
use crate::scenario::Scenario;

/// Simulated time a run may take beyond its workload before it counts as hung.
pub const HANG_LIMIT: Duration = Duration::from_secs(600);

/// Runs `scenario` with `seed` and checks it; see the module docs for runs
/// that panic or hang. A swarm scenario runs the configuration the seed
/// draws (`Scenario::for_seed`), named in the summary's `swarm`.
pub fn run_once(scenario: &Scenario, seed: u64) -> RunReport {
    let drawn = scenario.for_seed(seed);
    let limit = Duration::from_millis(drawn.workload.duration_ms) + HANG_LIMIT;
    let mut report = run_guarded(&drawn, seed, limit, |s, seed| async move { simulate(&s, seed).await });
    report.summary.swarm = scenario.swarm_draw(seed);
    report
}

/// Runs `body` for (`scenario`, `seed`) on a fresh runtime seeded with
/// `seed` and limited to `limit` of simulated time, and checks what it
/// returns. A panic or a hang becomes the seed's violation (module docs).
pub fn run_guarded<F, Fut>(scenario: &Scenario, seed: u64, limit: Duration, body: F) -> RunReport
where
    F: FnOnce(Scenario, u64) -> Fut,
    Fut: Future<Output = RunOutcome> + 'static,
{
    let s = scenario.clone();
    let ran = catch_unwind(AssertUnwindSafe(move || {
        let mut rt = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
        rt.set_time_limit(limit);
        rt.block_on(body(s, seed))
    }));
    match ran {
        Ok(outcome) => report::check(&scenario.name, seed, scenario.expect.liveness_bound_ms, outcome),
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            let checker = if message.contains("time limit exceeded") {
                "time-limit"
            } else if message.contains("all tasks will block forever") {
                "deadlock"
            } else {
                "panic"
            };
            report::failed(&scenario.name, seed, Violation { checker: checker.into(), message })
        }
    }
}

/// The command that replays (`scenario_file`, `seed`) with a trace.
pub fn replay_command(scenario_file: &std::path::Path, seed: u64) -> String {
    format!("scripts/sim.sh replay --scenario {} --seed {seed}", scenario_file.display())
}

/// The command that shrinks failing (`scenario_file`, `seed`) into a
/// minimal scenario file (see `crate::shrink`).
pub fn shrink_command(scenario_file: &std::path::Path, seed: u64) -> String {
    format!("scripts/sim.sh shrink --scenario {} --seed {seed}", scenario_file.display())
}

/// The text of a panic's payload (`panic!` with a string or a format).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}
