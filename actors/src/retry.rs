//! The one backoff of the system: retrying calls that failed transiently
//! (unavailable, timeout), used by the metadata operations (`MetaOps`) and
//! by the client (`crate::client`).
//!
//! Backoff is exponential with full jitter (AWS Architecture Blog, "Exponential
//! Backoff And Jitter", 2015): before attempt `n` (n >= 1) sleep a uniformly
//! random time in `[0, min(max_backoff, initial_backoff * 2^(n-1))]`. Retries
//! stop after `max_attempts` attempts or when the next sleep would pass the
//! deadline. Only operations that are safe to repeat go through [`retry`]; a
//! compare-and-swap that may have landed is re-read by its caller instead (see
//! `MetaOps`). Randomness comes from a seeded generator the caller owns,
//! and time from the tokio clock, so under the simulator retries are
//! deterministic and take no real time.

use std::future::Future;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::time::{Duration, Instant};

/// When and how often to retry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Backoff cap of the first retry, ms.
    pub initial_backoff_ms: u64,
    /// Largest backoff cap, ms.
    pub max_backoff_ms: u64,
    /// Most attempts in all (the first call included).
    pub max_attempts: u32,
    /// Give up once this much time has passed since the first attempt, ms.
    pub deadline_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { initial_backoff_ms: 20, max_backoff_ms: 1_000, max_attempts: 8, deadline_ms: 5_000 }
    }
}

impl RetryPolicy {
    /// The backoff cap before attempt `attempt` (1-based count of retries so far).
    pub fn cap(&self, attempt: u32) -> Duration {
        let exp = self.initial_backoff_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(32));
        Duration::from_millis(exp.min(self.max_backoff_ms))
    }
}

/// A seeded random source shared by the retries of one component.
#[derive(Clone, Debug)]
pub struct Jitter(Arc<Mutex<ChaCha8Rng>>);

impl Jitter {
    /// A source seeded with `seed` (a node id, a simulation seed).
    pub fn new(seed: u64) -> Self {
        Jitter(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))))
    }

    /// A random non-zero token (to recognise one's own write on a re-read).
    pub fn token(&self) -> u64 {
        self.0.lock().expect("jitter lock").random::<u64>() | 1
    }

    /// A uniformly random duration in `[0, cap]`.
    pub fn below(&self, cap: Duration) -> Duration {
        let ms = cap.as_millis() as u64;
        Duration::from_millis(self.0.lock().expect("jitter lock").random_range(0..=ms))
    }
}

/// An error that may go away if the call is repeated.
pub trait Transient: std::fmt::Display {
    /// Whether repeating the call may succeed (the callee was unavailable or
    /// slow), as opposed to an answer that a repeat would only give again.
    fn is_transient(&self) -> bool;
}

/// Runs `op` until it succeeds, fails with a non-transient error, or the
/// policy gives up; returns the last result.
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, jitter: &Jitter, what: &str, mut op: F) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    let deadline = start + Duration::from_millis(policy.deadline_ms);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Err(e) if e.is_transient() && attempt < policy.max_attempts => {
                let sleep = jitter.below(policy.cap(attempt));
                if Instant::now() + sleep > deadline {
                    return Err(e);
                }
                tracing::debug!(what, attempt, error = %e, ?sleep, "retrying");
                tokio::time::sleep(sleep).await;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_grow_exponentially_to_the_max() {
        let p = RetryPolicy { initial_backoff_ms: 10, max_backoff_ms: 100, max_attempts: 10, deadline_ms: 1000 };
        let caps: Vec<u64> = (1..=6).map(|a| p.cap(a).as_millis() as u64).collect();
        assert_eq!(caps, vec![10, 20, 40, 80, 100, 100]);
    }

    #[test]
    fn jitter_is_seeded_and_bounded() {
        let (a, b) = (Jitter::new(7), Jitter::new(7));
        for _ in 0..100 {
            let cap = Duration::from_millis(50);
            let x = a.below(cap);
            assert_eq!(x, b.below(cap));
            assert!(x <= cap);
        }
    }
}
