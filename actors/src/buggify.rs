//! BUGGIFY: seed-driven trouble at chosen points of the actor code, in the
//! simulation only, to widen the race windows that random faults rarely hit.
//!
//! After FoundationDB's `BUGGIFY` macro (Zhou et al., "FoundationDB: A
//! Distributed Unbundled Transactional Key Value Store", SIGMOD 2021, §4.1):
//! in a run that enables it, each named point is switched on or off once,
//! at random, the first time it is reached (so a run explores some windows
//! deeply rather than all of them a little), and a point that is on fires
//! with the run's probability each time. What firing does is the caller's:
//! [`delay`] sleeps a random time below a bound.
//!
//! Outside `--cfg madsim` every function here is an empty inline function
//! and [`fires`] a constant `false`, so production builds carry nothing. In
//! the simulation, the state is per thread: madsim runs one seed's whole
//! runtime on one thread, so runs on other worker threads never share it,
//! and the draws come from a generator seeded by the run's seed, so a
//! (scenario, seed) pair still replays bit for bit.

#[cfg(madsim)]
mod sim {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    struct State {
        probability: f64,
        rng: ChaCha8Rng,
        points: BTreeMap<&'static str, bool>,
        fired: BTreeMap<&'static str, u64>,
    }

    thread_local! {
        static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    }

    /// Enables buggify on this thread for one run: points fire with
    /// `probability` (0 to 1) once switched on; draws are seeded by `seed`.
    pub fn enable(seed: u64, probability: f64) {
        let rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb066_1f7e);
        STATE.with(|s| {
            *s.borrow_mut() = Some(State { probability, rng, points: BTreeMap::new(), fired: BTreeMap::new() })
        });
    }

    /// Disables buggify on this thread and returns how often each point
    /// fired, by name.
    pub fn disable() -> BTreeMap<&'static str, u64> {
        STATE.with(|s| s.borrow_mut().take().map(|st| st.fired).unwrap_or_default())
    }

    /// Whether `point` fires now (see the module docs).
    pub fn fires(point: &'static str) -> bool {
        STATE.with(|s| {
            let mut guard = s.borrow_mut();
            let Some(st) = guard.as_mut() else { return false };
            let on = match st.points.get(point) {
                Some(on) => *on,
                None => {
                    let on = st.rng.random_bool(0.5);
                    st.points.insert(point, on);
                    on
                }
            };
            let fire = on && st.rng.random_bool(st.probability);
            if fire {
                *st.fired.entry(point).or_default() += 1;
            }
            fire
        })
    }

    /// A random duration in `[0, max_ms]` ms, from the run's generator.
    pub fn draw_ms(max_ms: u64) -> u64 {
        STATE.with(|s| s.borrow_mut().as_mut().map_or(0, |st| st.rng.random_range(0..=max_ms)))
    }
}

#[cfg(madsim)]
pub use sim::{disable, enable, fires};

/// Whether `point` fires now: always `false` outside the simulation.
#[cfg(not(madsim))]
#[inline(always)]
pub fn fires(_point: &'static str) -> bool {
    false
}

/// When `point` fires, sleeps a random time of up to `max_ms` ms (simulated
/// time); otherwise returns at once. Outside the simulation: nothing.
#[inline(always)]
pub async fn delay(point: &'static str, max_ms: u64) {
    #[cfg(madsim)]
    if fires(point) {
        let ms = sim::draw_ms(max_ms);
        tracing::debug!(point, ms, "buggify: delay");
        tokio::time::sleep(tokio::time::Duration::from_millis(ms)).await;
    }
    #[cfg(not(madsim))]
    let _ = (point, max_ms);
}

#[cfg(all(test, madsim))]
mod tests {
    use super::*;

    #[test]
    fn off_unless_enabled_and_each_point_is_on_or_off_for_the_whole_run() {
        disable();
        assert!(!fires("a"), "not enabled: never fires");
        enable(7, 1.0);
        let points = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let first: Vec<bool> = points.iter().map(|p| fires(p)).collect();
        for _ in 0..10 {
            let again: Vec<bool> = points.iter().map(|p| fires(p)).collect();
            assert_eq!(again, first, "with probability 1, a point that is on always fires, one that is off never");
        }
        assert!(first.iter().any(|on| *on) && first.iter().any(|on| !on), "8 points, about half on: {first:?}");
        let counts = disable();
        for (p, on) in points.iter().zip(&first) {
            assert_eq!(counts.get(p).copied().unwrap_or(0), if *on { 11 } else { 0 }, "{p}");
        }
        assert!(!fires("a"), "disabled again");
    }

    #[test]
    fn the_same_seed_fires_the_same_way() {
        let run = |seed| {
            enable(seed, 0.3);
            let points = ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9"];
            let v: Vec<bool> = (0..200).map(|i| fires(points[i % points.len()])).collect();
            disable();
            v
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }
}
