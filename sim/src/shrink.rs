//! Shrinking a failing run into a small scenario that fails the same way.
//!
//! `attache-sim shrink --scenario X --seed N` (built with `--cfg madsim`)
//! turns the run's fault schedule (scripted plus drawn from the seed) into an
//! explicit list, pins the seed, and removes faults by delta debugging while
//! the run still fails with a violation of one of the checkers it failed
//! before; then it tries a shorter and smaller workload (and, if that kept
//! anything, removes faults once more under it). The result is a
//! scenario file that replays without naming a seed, kept under
//! `scenarios/regressions/` once the bug it shows is fixed.
//!
//! The search is Zeller and Hildebrandt's ddmin ("Simplifying and Isolating
//! Failure-Inducing Input", IEEE TSE 28(2), 2002): split the list into `n`
//! parts, keep a part or a complement that still fails, otherwise split finer.
//! Its result is 1-minimal: removing any single unit makes the run pass.
//! A fault is removed together with its repair (a crash with the restart that
//! follows it), so a shrunk schedule does not gain a permanent outage unless
//! that outage is what fails.

use attache_faults::{Fault, Scheduled};

/// Delta debugging: the smallest sub-list of `items` (keeping their order)
/// for which `fails` still holds, 1-minimal within `max_trials` calls of
/// `fails`. `fails(items)` is assumed true and not called; `fails(&[])` is
/// tried first. Returns the list and the number of trials run.
pub fn ddmin<T: Clone>(items: Vec<T>, max_trials: usize, mut fails: impl FnMut(&[T]) -> bool) -> (Vec<T>, usize) {
    let mut trials = 0;
    let mut try_fails = |c: &[T], trials: &mut usize| {
        *trials += 1;
        fails(c)
    };
    if items.is_empty() || try_fails(&[], &mut trials) {
        return (Vec::new(), trials);
    }
    let mut cur = items;
    let mut n = 2usize;
    while cur.len() >= 2 && trials < max_trials {
        let parts = split(&cur, n);
        let mut reduced = false;
        for part in &parts {
            if trials >= max_trials {
                break;
            }
            if try_fails(part, &mut trials) {
                cur = part.clone();
                n = 2;
                reduced = true;
                break;
            }
        }
        if !reduced && n > 2 {
            for i in 0..parts.len() {
                if trials >= max_trials {
                    break;
                }
                let complement: Vec<T> =
                    parts.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, p)| p.iter().cloned()).collect();
                if try_fails(&complement, &mut trials) {
                    cur = complement;
                    n = (n - 1).max(2);
                    reduced = true;
                    break;
                }
            }
        }
        if !reduced {
            if n >= cur.len() {
                break;
            }
            n = (n * 2).min(cur.len());
        }
    }
    (cur, trials)
}

/// `items` cut into `n` contiguous parts of nearly equal length (`n` ≤ len).
fn split<T: Clone>(items: &[T], n: usize) -> Vec<Vec<T>> {
    let n = n.clamp(1, items.len().max(1));
    let (base, extra) = (items.len() / n, items.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(items[at..at + len].to_vec());
        at += len;
    }
    out
}

/// The repair that ends `start`'s disruption, if `repair` is one: a crash
/// ends with the restart of that node, a pause with its resume, a detach
/// with the reattach of that volume to that node, a partition or an
/// isolation with the next heal.
pub(crate) fn repairs(start: &Fault, repair: &Fault) -> bool {
    match (start, repair) {
        (Fault::NodeCrash { node: a }, Fault::NodeRestart { node: b })
        | (Fault::NodePause { node: a }, Fault::NodeResume { node: b }) => a == b,
        (Fault::EbsDetach { volume: v, node: a }, Fault::EbsReattach { volume: w, node: b }) => v == w && a == b,
        (Fault::Partition { .. } | Fault::Isolate { .. }, Fault::Heal) => true,
        _ => false,
    }
}

/// Groups a time-ordered schedule into the units that shrinking removes:
/// each disruption with the first later repair that ends it (not already
/// taken), and every other fault alone. Units are in the order of their
/// first fault.
pub fn units(faults: &[Scheduled]) -> Vec<Vec<Scheduled>> {
    let mut taken = vec![false; faults.len()];
    let mut out = Vec::new();
    for i in 0..faults.len() {
        if taken[i] {
            continue;
        }
        taken[i] = true;
        let mut unit = vec![faults[i].clone()];
        if !faults[i].fault.is_repair() {
            if let Some(j) = (i + 1..faults.len()).find(|&j| !taken[j] && repairs(&faults[i].fault, &faults[j].fault)) {
                taken[j] = true;
                unit.push(faults[j].clone());
            }
        }
        out.push(unit);
    }
    out
}

#[cfg(madsim)]
pub use runner::{shrink, Shrunk};

#[cfg(madsim)]
mod runner {
    use std::collections::BTreeSet;

    use attache_faults::Schedule;

    use super::{ddmin, units};
    use crate::check::Violation;
    use crate::cluster::schedule;
    use crate::run::run_once;
    use crate::scenario::Scenario;

    /// The result of shrinking a failing (scenario, seed).
    #[derive(Debug)]
    pub struct Shrunk {
        /// The minimal scenario: explicit faults, the seed pinned.
        pub scenario: Scenario,
        /// The violations the original run showed.
        pub original: Vec<Violation>,
        /// The violations the minimal scenario shows.
        pub violations: Vec<Violation>,
        /// Faults in the original schedule and in the minimal one.
        pub faults_before: usize,
        /// See `faults_before`.
        pub faults_after: usize,
        /// Simulated runs the search took.
        pub trials: usize,
    }

    /// Upper bound on the runs one shrink takes (each is a whole simulated run).
    pub const MAX_TRIALS: usize = 300;

    /// Shrinks (`s`, `seed`), which must fail; `progress` hears of every trial
    /// (its number and whether it still failed). Errors: the run does not
    /// fail, or its schedule made explicit no longer fails (a bug in the
    /// runner's determinism, reported rather than hidden).
    pub fn shrink(s: &Scenario, seed: u64, mut progress: impl FnMut(usize, bool)) -> Result<Shrunk, String> {
        let seed = s.seed.unwrap_or(seed);
        // A swarm scenario shrinks the configuration this seed drew, written
        // out in full (no `swarm` section), so the result replays on its own.
        let drawn = s.for_seed(seed);
        let s = &drawn;
        let original = run_once(s, seed).summary.violations;
        if original.is_empty() {
            return Err(format!("{} with seed {seed} passes: nothing to shrink", s.name));
        }
        let checkers: BTreeSet<String> = original.iter().map(|v| v.checker.clone()).collect();
        let mut explicit = s.clone();
        explicit.faults = schedule(s, seed).faults;
        explicit.random = None;
        explicit.seed = Some(seed);
        let faults_before = explicit.faults.len();
        let mut trials = 0usize;
        let mut fails = |candidate: &Scenario| -> bool {
            trials += 1;
            let failed = candidate.validate().is_ok()
                && run_once(candidate, seed).summary.violations.iter().any(|v| checkers.contains(&v.checker));
            progress(trials, failed);
            failed
        };
        if !fails(&explicit) {
            return Err(format!(
                "{} seed {seed} fails, but not once its fault schedule is written out explicitly: \
                 the run depends on more than (scenario, seed) — a determinism bug",
                s.name
            ));
        }
        let with_faults = |base: &Scenario, us: &[Vec<attache_faults::Scheduled>]| {
            let mut c = base.clone();
            c.faults = Schedule::new(us.iter().flatten().cloned().collect()).faults;
            c
        };
        let (kept, _) = ddmin(units(&explicit.faults), MAX_TRIALS, |us| fails(&with_faults(&explicit, us)));
        let mut best = with_faults(&explicit, &kept);
        // A shorter, smaller workload, each step kept only if the run still fails.
        let last_fault = best.faults.iter().map(|f| f.at_ms + f.fault.lasts_ms()).max().unwrap_or(0);
        let shorter = last_fault + best.expect.liveness_bound_ms + 1_000;
        let steps: [fn(&mut Scenario, u64); 4] = [
            |c, shorter| c.workload.duration_ms = c.workload.duration_ms.min(shorter),
            |c, _| c.workload.processes_per_client = (c.workload.processes_per_client / 2).max(1),
            |c, _| c.cluster.clients = (c.cluster.clients - 1).max(1),
            |c, _| c.workload.shards_per_client = (c.workload.shards_per_client - 1).max(1),
        ];
        let mut workload_changed = false;
        for step in steps {
            let mut c = best.clone();
            step(&mut c, shorter);
            if c != best && fails(&c) {
                best = c;
                workload_changed = true;
            }
        }
        // Under the new workload a fault may have become unnecessary: once more.
        if workload_changed {
            let (kept, _) = ddmin(units(&best.faults), MAX_TRIALS, |us| fails(&with_faults(&best, us)));
            best = with_faults(&best, &kept);
        }
        let violations = run_once(&best, seed).summary.violations;
        let faults_after = best.faults.len();
        Ok(Shrunk { scenario: best, original, violations, faults_before, faults_after, trials })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddmin_finds_the_two_items_that_fail_together() {
        let items: Vec<u32> = (0..40).collect();
        let (min, trials) = ddmin(items, 1_000, |c| c.contains(&7) && c.contains(&31));
        assert_eq!(min, vec![7, 31]);
        assert!(trials < 100, "{trials} trials");
    }

    #[test]
    fn ddmin_returns_empty_when_nothing_is_needed() {
        let (min, trials) = ddmin(vec![1, 2, 3], 10, |_| true);
        assert!(min.is_empty());
        assert_eq!(trials, 1);
    }

    #[test]
    fn ddmin_result_is_one_minimal() {
        // Fails when at least three multiples of 5 are present.
        let fails = |c: &[u32]| c.iter().filter(|x| *x % 5 == 0).count() >= 3;
        let (min, _) = ddmin((0..30).collect(), 1_000, fails);
        assert_eq!(min.len(), 3);
        for i in 0..min.len() {
            let mut less = min.clone();
            less.remove(i);
            assert!(!fails(&less));
        }
    }

    #[test]
    fn ddmin_stops_at_its_trial_budget() {
        let (min, trials) = ddmin((0..64).collect::<Vec<u32>>(), 5, |c| c.contains(&3) && c.contains(&60));
        assert!(trials <= 5);
        assert!(min.contains(&3) && min.contains(&60), "never returns a list that was not seen failing");
    }

    fn at(at_ms: u64, fault: Fault) -> Scheduled {
        Scheduled { at_ms, fault, when: None }
    }

    #[test]
    fn units_pair_each_disruption_with_its_repair() {
        let n = |s: &str| s.to_string();
        let faults = vec![
            at(1, Fault::NodeCrash { node: n("node-1") }),
            at(2, Fault::Isolate { node: n("node-2") }),
            at(3, Fault::NodeCrash { node: n("node-3") }),
            at(4, Fault::NodeRestart { node: n("node-3") }),
            at(5, Fault::Heal),
            at(6, Fault::NodeRestart { node: n("node-1") }),
            at(7, Fault::NodeRestart { node: n("node-1") }),
            at(8, Fault::ClockJitter { node: n("node-2"), ppm: 10 }),
        ];
        let u = units(&faults);
        let times: Vec<Vec<u64>> = u.iter().map(|u| u.iter().map(|f| f.at_ms).collect()).collect();
        assert_eq!(times, vec![vec![1, 6], vec![2, 5], vec![3, 4], vec![7], vec![8]]);
    }
}
