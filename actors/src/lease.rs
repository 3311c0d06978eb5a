//! `LeaseGate`: the second fencing layer. A primary writes only while its
//! node lease is certainly still valid, by its own clock, with the clock
//! error bound accounted for.
//!
//! Rule (as in Chubby's and etcd's leader leases): a keep-alive sent at local
//! time `s` that the store answers with TTL `t` keeps the lease valid in the
//! store until at least `s + t` of the store's time, since the store renews
//! on receipt, after `s`. With clock rates within `±drift` of true time, the
//! node may trust the lease until local time `s + t·(1 − drift) − margin`.
//! The store deletes the node's records only after `t` without a renewal, and
//! a backup claims a volume only after that plus its own margin, so the old
//! primary's gate has closed before a new primary can write. A write already
//! past the gate when the process stalls (a GC pause) is stopped by the
//! volume's reservation (the third layer).
//!
//! In the simulation a node's clock can run fast or slow (`set_clock_rate`):
//! the gate then measures its window with that rate, as a real node with a
//! skewed clock would.
//!
//! The clock (see [`GateTime`]): on Linux, `CLOCK_BOOTTIME`, which keeps
//! counting while the machine is suspended. `Instant` (`CLOCK_MONOTONIC`)
//! stops during a suspend, so a gate measured with it would still be open
//! after a suspend longer than the lease, while a backup may already have
//! taken over. The assumption that remains: the clock's rate is within
//! `drift` of true time whenever the process runs (a frozen VM whose guest
//! clock does not advance while frozen breaks it, as it breaks every lease;
//! the storage fence is what stops such a node's writes). In the
//! simulation the gate reads the simulated clock.

use std::sync::Mutex;

use tokio::time::Duration;

/// A reading of the lease gate's clock (see the module docs):
/// `CLOCK_BOOTTIME` on Linux, the simulated clock in the simulation, the
/// monotonic clock (`Instant`) elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GateTime(imp::Reading);

impl GateTime {
    /// Now, by the gate's clock.
    pub fn now() -> Self {
        GateTime(imp::now())
    }

    fn after(self, d: Duration) -> Self {
        GateTime(self.0 + d)
    }
}

#[cfg(all(target_os = "linux", not(madsim)))]
mod imp {
    /// Time since boot, suspended time included.
    pub type Reading = std::time::Duration;

    pub fn now() -> Reading {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }
}

#[cfg(not(all(target_os = "linux", not(madsim))))]
mod imp {
    /// The runtime's monotonic clock (simulated under madsim).
    pub type Reading = tokio::time::Instant;

    pub fn now() -> Reading {
        tokio::time::Instant::now()
    }
}

/// Lease timing.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LeaseTiming {
    /// Largest relative clock rate error tolerated (0.01 = 1%).
    pub drift: f64,
    /// Extra time taken off the window, ms (covers the last write's I/O).
    pub margin_ms: u64,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming { drift: 0.01, margin_ms: 200 }
    }
}

impl LeaseTiming {
    /// The window a renewal answered with TTL `ttl_ms` opens the gate for,
    /// by this node's clock: `ttl·(1 − drift) − margin`, ms (may be ≤ 0).
    pub fn window_ms(&self, ttl_ms: u64) -> f64 {
        ttl_ms as f64 * (1.0 - self.drift) - self.margin_ms as f64
    }

    /// Checks a node's lease TTL and its volumes' takeover delay (ms)
    /// against this timing, so that the gate is useful and safe:
    ///
    /// - `0 <= drift < 0.5`;
    /// - the window (`window_ms`) exceeds the renewal period `ttl / 3`, so
    ///   the gate stays open between renewals (a window ≤ 0 would never
    ///   open it, while the node's volume managers still claim);
    /// - a takeover waits long enough even when the metadata store's own
    ///   clock runs fast: the store ends a lease at least `ttl / (1 + drift)`
    ///   after its last renewal, the old primary's gate closes at most
    ///   `ttl − margin / (1 − drift)` after it (true time, its clock slow),
    ///   and a backup waits `takeover_delay / (1 + drift)` more (its clock
    ///   fast), so `takeover_delay ≥ (1 + drift)·(ttl − margin/(1 − drift)) − ttl`.
    ///
    /// Errors: a message naming the setting and the bound it breaks.
    pub fn validate(&self, ttl_ms: u64, takeover_delay_ms: u64) -> Result<(), String> {
        let d = self.drift;
        if !(0.0..0.5).contains(&d) {
            return Err(format!("lease drift {d} must be at least 0 and below 0.5 (a relative clock rate error)"));
        }
        let (window, period) = (self.window_ms(ttl_ms), ttl_ms as f64 / 3.0);
        if window <= period {
            return Err(format!(
                "lease_ttl_ms {ttl_ms} is too short for the lease gate: its window ttl·(1 − drift) − margin_ms = \
                 {window:.0} ms must exceed the renewal period ttl/3 = {period:.0} ms, or the gate closes between \
                 renewals (and never opens when the window is 0 or less); raise lease_ttl_ms (at least {} ms \
                 with margin_ms {} and drift {d}) or lower margin_ms",
                (self.margin_ms as f64 / (2.0 / 3.0 - d)).floor() as u64 + 1,
                self.margin_ms
            ));
        }
        let need = (1.0 + d) * (ttl_ms as f64 - self.margin_ms as f64 / (1.0 - d)) - ttl_ms as f64;
        if (takeover_delay_ms as f64) < need {
            return Err(format!(
                "takeover_delay_ms {takeover_delay_ms} is too short for lease_ttl_ms {ttl_ms} with drift {d} and \
                 margin_ms {}: when the metadata store's clock runs fast, an old primary's lease gate may stay \
                 open up to {need:.0} ms after the store ends its lease; takeover_delay_ms must be at least {} \
                 (or raise margin_ms)",
                self.margin_ms,
                need.ceil() as u64
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Gate {
    /// True (simulated or real) time until which writes may proceed.
    valid_until: Option<GateTime>,
    /// This node's clock rate relative to true time (1.0 = exact).
    clock_rate: f64,
}

/// Whether this node may write now; shared by the node and its shards.
#[derive(Debug)]
pub struct LeaseGate {
    timing: LeaseTiming,
    gate: Mutex<Gate>,
}

impl LeaseGate {
    /// A closed gate with `timing`.
    pub fn new(timing: LeaseTiming) -> Self {
        LeaseGate { timing, gate: Mutex::new(Gate { valid_until: None, clock_rate: 1.0 }) }
    }

    /// A gate that is always open (tests of single shards, no lease).
    pub fn always_open() -> Self {
        let g = LeaseGate::new(LeaseTiming { drift: 0.0, margin_ms: 0 });
        g.gate.lock().expect("lease gate lock").valid_until =
            Some(GateTime::now().after(Duration::from_secs(100 * 365 * 86_400)));
        g
    }

    /// A keep-alive sent at `sent` (read with [`GateTime::now`] before it
    /// was sent) was answered with TTL `ttl_ms`: open the gate for the
    /// window the rule allows (never shortening a later window).
    pub fn renewed(&self, sent: GateTime, ttl_ms: u64) {
        let mut g = self.gate.lock().expect("lease gate lock");
        let local = self.timing.window_ms(ttl_ms);
        if local <= 0.0 {
            return;
        }
        // `local` ms of this node's clock pass in `local / rate` ms of true time.
        let until = sent.after(Duration::from_micros((local * 1000.0 / g.clock_rate) as u64));
        if g.valid_until.is_none_or(|u| u < until) {
            g.valid_until = Some(until);
        }
    }

    /// Closes the gate (lease lost, node stopping).
    pub fn close(&self) {
        self.gate.lock().expect("lease gate lock").valid_until = None;
    }

    /// Whether a write may go to the volume now.
    pub fn is_open(&self) -> bool {
        self.gate.lock().expect("lease gate lock").valid_until.is_some_and(|u| GateTime::now() < u)
    }

    /// Simulation only: this node's clock runs at `rate` times true speed.
    pub fn set_clock_rate(&self, rate: f64) {
        assert!(rate > 0.0, "a clock rate is positive");
        self.gate.lock().expect("lease gate lock").clock_rate = rate;
    }

    /// This node's clock rate (1.0 outside the simulation).
    pub fn clock_rate(&self) -> f64 {
        self.gate.lock().expect("lease gate lock").clock_rate
    }

    /// How much of this node's clock has passed since `since` (true time,
    /// `Instant`): the elapsed time at the node's clock rate (exactly
    /// `since.elapsed()` at rate 1, as outside the simulation). The node's
    /// waits that guard a takeover (`VolumeManager`) are measured with it.
    /// The whole wait is scaled by the current rate, so a rate change in
    /// the middle of a wait applies to all of it (simulation only).
    pub fn local_elapsed(&self, since: tokio::time::Instant) -> Duration {
        let rate = self.gate.lock().expect("lease gate lock").clock_rate;
        let elapsed = since.elapsed();
        if rate == 1.0 {
            elapsed
        } else {
            elapsed.mul_f64(rate)
        }
    }
}

/// A monotonic clock that may run fast or slow (`set_rate`, simulation
/// only): the metadata store measures lease expiry with it. At rate 1 it
/// reads `Instant::now()` exactly. A rate change keeps the clock continuous
/// (it bends at the moment of the change).
#[derive(Debug)]
pub struct DriftClock {
    /// (true time, this clock's reading then, rate since).
    anchor: Mutex<(tokio::time::Instant, tokio::time::Instant, f64)>,
}

impl Default for DriftClock {
    fn default() -> Self {
        let now = tokio::time::Instant::now();
        DriftClock { anchor: Mutex::new((now, now, 1.0)) }
    }
}

impl DriftClock {
    /// Now, by this clock.
    pub fn now(&self) -> tokio::time::Instant {
        let (real, local, rate) = *self.anchor.lock().expect("drift clock lock");
        let since = tokio::time::Instant::now().saturating_duration_since(real);
        if rate == 1.0 {
            local + since
        } else {
            local + since.mul_f64(rate)
        }
    }

    /// Simulation only: from now on the clock runs at `rate` times true speed.
    pub fn set_rate(&self, rate: f64) {
        assert!(rate > 0.0, "a clock rate is positive");
        let local = self.now();
        *self.anchor.lock().expect("drift clock lock") = (tokio::time::Instant::now(), local, rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_that_makes_the_gate_useless_or_unsafe_is_an_error() {
        let t = LeaseTiming::default();
        assert_eq!(t.validate(5_000, 500), Ok(()));
        assert_eq!(t.validate(2_000, 300), Ok(()), "the simulation's timing");
        let e = t.validate(250, 500).unwrap_err();
        assert!(e.contains("lease_ttl_ms 250 is too short") && e.contains("at least 305 ms"), "{e}");
        assert!(t.validate(305, 500).is_ok(), "the bound the message names is enough");
        // A large drift with no margin needs a takeover delay.
        let drifty = LeaseTiming { drift: 0.2, margin_ms: 0 };
        let e = drifty.validate(10_000, 0).unwrap_err();
        assert!(e.contains("takeover_delay_ms must be at least 2000"), "{e}");
        assert!(drifty.validate(10_000, 2_000).is_ok());
        assert!(LeaseTiming { drift: 0.7, margin_ms: 0 }.validate(10_000, 0).unwrap_err().contains("below 0.5"));
        assert!(LeaseTiming { drift: f64::NAN, margin_ms: 0 }.validate(10_000, 0).is_err());
    }

    #[tokio::test]
    async fn window_is_ttl_less_drift_and_margin() {
        let g = LeaseGate::new(LeaseTiming { drift: 0.1, margin_ms: 100 });
        assert!(!g.is_open(), "closed until the first renewal");
        let sent = GateTime::now();
        g.renewed(sent, 1000);
        assert!(g.is_open());
        tokio::time::sleep(Duration::from_millis(790)).await;
        assert!(g.is_open(), "open within 1000*(1-0.1)-100 = 800 ms");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!g.is_open(), "closed after 800 ms");
        g.renewed(GateTime::now(), 1000);
        assert!(g.is_open());
        g.close();
        assert!(!g.is_open());
    }

    /// A drifting clock runs at its rate and stays continuous when the rate
    /// changes; a node's waits are measured at its clock's rate. (Real
    /// time outside the simulation, so the checks leave room for a slow
    /// machine.)
    #[tokio::test]
    async fn a_drift_clock_runs_at_its_rate_and_bends_continuously() {
        let c = DriftClock::default();
        let before = c.now();
        c.set_rate(1.5);
        let at_change = c.now();
        assert!(at_change >= before && at_change - before < Duration::from_millis(50), "no jump at the change");
        let real = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (local, real) = (c.now() - at_change, real.elapsed());
        let ratio = local.as_secs_f64() / real.as_secs_f64();
        assert!((1.3..1.7).contains(&ratio), "ran at {ratio} times true speed, not 1.5");
        let g = LeaseGate::new(LeaseTiming::default());
        let since = tokio::time::Instant::now() - Duration::from_secs(10);
        let at_one = g.local_elapsed(since);
        assert!(at_one >= Duration::from_secs(10) && at_one < Duration::from_millis(10_500));
        g.set_clock_rate(0.5);
        let slow = g.local_elapsed(since);
        assert!(
            slow >= Duration::from_secs(5) && slow < Duration::from_millis(5_500),
            "a slow node's waits last longer"
        );
    }

    /// Outside the simulation on Linux the gate reads CLOCK_BOOTTIME, the
    /// clock `/proc/uptime` shows (it keeps counting through a suspend).
    #[cfg(all(target_os = "linux", not(madsim)))]
    #[test]
    fn on_linux_the_gate_reads_the_boot_clock() {
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap();
        let uptime: f64 = uptime.split_whitespace().next().unwrap().parse().unwrap();
        let gate = GateTime::now().0.as_secs_f64();
        assert!((gate - uptime).abs() < 0.5, "gate clock {gate} s, uptime {uptime} s");
    }

    #[tokio::test]
    async fn a_slow_clock_keeps_the_gate_open_longer_in_true_time() {
        let g = LeaseGate::new(LeaseTiming { drift: 0.0, margin_ms: 0 });
        g.set_clock_rate(0.5);
        g.renewed(GateTime::now(), 100);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(g.is_open(), "a clock at half speed counts 100 ms in 200 ms");
    }
}
