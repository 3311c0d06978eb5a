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

use std::sync::Mutex;

use tokio::time::{Duration, Instant};

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

#[derive(Debug)]
struct Gate {
    /// True (simulated or real) instant until which writes may proceed.
    valid_until: Option<Instant>,
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
            Some(Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        g
    }

    /// A keep-alive sent at `sent` was answered with TTL `ttl_ms`: open the
    /// gate for the window the rule allows (never shortening a later window).
    pub fn renewed(&self, sent: Instant, ttl_ms: u64) {
        let mut g = self.gate.lock().expect("lease gate lock");
        let local = (ttl_ms as f64 * (1.0 - self.timing.drift)) - self.timing.margin_ms as f64;
        if local <= 0.0 {
            return;
        }
        // `local` ms of this node's clock pass in `local / rate` ms of true time.
        let until = sent + Duration::from_micros((local * 1000.0 / g.clock_rate) as u64);
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
        self.gate.lock().expect("lease gate lock").valid_until.is_some_and(|u| Instant::now() < u)
    }

    /// Simulation only: this node's clock runs at `rate` times true speed.
    pub fn set_clock_rate(&self, rate: f64) {
        assert!(rate > 0.0, "a clock rate is positive");
        self.gate.lock().expect("lease gate lock").clock_rate = rate;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn window_is_ttl_less_drift_and_margin() {
        let g = LeaseGate::new(LeaseTiming { drift: 0.1, margin_ms: 100 });
        assert!(!g.is_open(), "closed until the first renewal");
        let sent = Instant::now();
        g.renewed(sent, 1000);
        assert!(g.is_open());
        tokio::time::sleep(Duration::from_millis(790)).await;
        assert!(g.is_open(), "open within 1000*(1-0.1)-100 = 800 ms");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!g.is_open(), "closed after 800 ms");
        g.renewed(Instant::now(), 1000);
        assert!(g.is_open());
        g.close();
        assert!(!g.is_open());
    }

    #[tokio::test]
    async fn a_slow_clock_keeps_the_gate_open_longer_in_true_time() {
        let g = LeaseGate::new(LeaseTiming { drift: 0.0, margin_ms: 0 });
        g.set_clock_rate(0.5);
        g.renewed(Instant::now(), 100);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(g.is_open(), "a clock at half speed counts 100 ms in 200 ms");
    }
}
