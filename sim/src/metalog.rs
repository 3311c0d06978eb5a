//! `SimMetaLog`: the metadata node's disk in the simulation, behind the
//! embedded store's `MetaLog` trait (the production one is a file appended
//! and fsynced).
//!
//! It models a file in a page cache:
//! - an append first lands in the cache (`pending`), then the sync makes the
//!   whole cache durable, with the latencies of [`MetaDiskConfig`];
//! - a crash of the metadata node keeps a random prefix of the cache (the
//!   pages that reached the disk before the crash: a torn tail);
//! - during [`SimMetaLog::fail_for`] every append, sync and rewrite fails; a
//!   failing append first writes a random prefix of its bytes to the cache
//!   (a short write, or a full write whose sync fails), which stays there
//!   and becomes durable with the next successful sync, exactly as in a file
//!   opened for appending;
//! - a rewrite (`replace`) is atomic (a temporary file renamed into place):
//!   it lands whole or not at all.
//!
//! Its state lives outside the simulated metadata node, so a restart reads
//! what the crash left. Randomness comes from the run's seed.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use attache_actors::meta::embedded::MetaLog;
use attache_actors::meta::MetaError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::time::{Duration, Instant};

/// How the metadata node's disk behaves (scenario section `[metadata]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetaDiskConfig {
    /// Latency of writing an append to the cache, µs. With both latencies at
    /// 0 (the default, which keeps older scenarios' runs as they were) an
    /// append completes at once, so a crash can never tear one.
    pub append_us: u64,
    /// Latency of the sync that follows it, µs.
    pub sync_us: u64,
    /// Whether the lost part of a torn tail may read back as zeros or stale
    /// garbage (see `ebs::torn_tail`).
    pub garbage_tails: bool,
}

/// What the disk went through in a run, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaDiskCounts {
    /// Appends that failed (during a window of disk errors).
    pub failed_appends: u64,
    /// Bytes those failed appends left in the file.
    pub failed_append_bytes: u64,
    /// Rewrites that failed.
    pub failed_rewrites: u64,
    /// Crashes that left part of an unsynced append in the file (torn tails).
    pub torn_tails: u64,
}

impl MetaDiskCounts {
    /// Whether nothing happened (then the summary leaves the counts out).
    pub fn is_empty(&self) -> bool {
        *self == MetaDiskCounts::default()
    }
}

struct Disk {
    cfg: MetaDiskConfig,
    durable: Vec<u8>,
    /// Written, not yet synced.
    pending: Vec<u8>,
    failing_until: Option<Instant>,
    rng: ChaCha8Rng,
    counts: MetaDiskCounts,
}

impl Disk {
    fn failing(&self) -> bool {
        self.failing_until.is_some_and(|t| Instant::now() < t)
    }
}

/// The metadata node's log; clones share it.
#[derive(Clone)]
pub struct SimMetaLog(Arc<Mutex<Disk>>);

fn injected(what: &str) -> MetaError {
    MetaError::Storage(format!("simulated metadata disk: {what} failed (injected I/O error)"))
}

impl SimMetaLog {
    /// An empty log behaving as `cfg`; `seed` draws torn and short-write lengths.
    pub fn new(cfg: MetaDiskConfig, seed: u64) -> Self {
        SimMetaLog(Arc::new(Mutex::new(Disk {
            cfg,
            durable: Vec::new(),
            pending: Vec::new(),
            failing_until: None,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x006d_6574_616c_6f67),
            counts: MetaDiskCounts::default(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.0.lock().expect("sim meta log lock")
    }

    /// Every append, sync and rewrite fails from now for `for_` (or longer,
    /// when an earlier window lasts longer).
    pub fn fail_for(&self, for_: Duration) {
        let mut d = self.lock();
        let until = Instant::now() + for_;
        d.failing_until = Some(d.failing_until.map_or(until, |u| u.max(until)));
    }

    /// The metadata node crashed: a random prefix of the unsynced bytes
    /// reaches the file, the rest is lost.
    pub fn crash(&self) {
        let mut d = self.lock();
        if d.pending.is_empty() {
            return;
        }
        let len = d.pending.len();
        let keep = d.rng.random_range(0..=len);
        let pending = std::mem::take(&mut d.pending);
        let garbage = d.cfg.garbage_tails;
        let tail = crate::ebs::torn_tail(&mut d.rng, &pending, keep, garbage);
        d.durable.extend_from_slice(&tail);
        if !tail.is_empty() && tail != pending {
            d.counts.torn_tails += 1;
        }
    }

    /// What the disk went through so far.
    pub fn counts(&self) -> MetaDiskCounts {
        self.lock().counts.clone()
    }

    async fn sleep_us(us: u64) {
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }
}

#[async_trait]
impl MetaLog for SimMetaLog {
    async fn load(&self) -> Result<Vec<u8>, MetaError> {
        let d = self.lock();
        let mut bytes = d.durable.clone();
        bytes.extend_from_slice(&d.pending);
        Ok(bytes)
    }

    async fn append(&self, bytes: &[u8]) -> Result<(), MetaError> {
        let (append_us, sync_us) = {
            let mut d = self.lock();
            if d.failing() {
                let written = d.rng.random_range(0..=bytes.len());
                d.pending.extend_from_slice(&bytes[..written]);
                d.counts.failed_appends += 1;
                d.counts.failed_append_bytes += written as u64;
                return Err(injected("append"));
            }
            d.pending.extend_from_slice(bytes);
            (d.cfg.append_us, d.cfg.sync_us)
        };
        Self::sleep_us(append_us).await;
        Self::sleep_us(sync_us).await;
        let mut d = self.lock();
        if d.failing() {
            // The write reached the cache; the sync failed.
            d.counts.failed_appends += 1;
            return Err(injected("sync"));
        }
        let pending = std::mem::take(&mut d.pending);
        d.durable.extend_from_slice(&pending);
        Ok(())
    }

    async fn replace(&self, bytes: &[u8]) -> Result<(), MetaError> {
        let sync_us = {
            let mut d = self.lock();
            if d.failing() {
                d.counts.failed_rewrites += 1;
                return Err(injected("rewrite"));
            }
            d.cfg.append_us + d.cfg.sync_us
        };
        Self::sleep_us(sync_us).await;
        let mut d = self.lock();
        if d.failing() {
            d.counts.failed_rewrites += 1;
            return Err(injected("rewrite"));
        }
        d.durable = bytes.to_vec();
        d.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_append_leaves_bytes_that_the_next_sync_makes_durable() {
        let log = SimMetaLog::new(MetaDiskConfig::default(), 7);
        log.append(b"aaaa").await.unwrap();
        log.fail_for(Duration::from_millis(10));
        // Some seeds write nothing; try until a failed append left bytes.
        let mut left = 0;
        for _ in 0..20 {
            assert!(log.append(b"bbbbbbbb").await.is_err());
            left = log.counts().failed_append_bytes;
            if left > 0 {
                break;
            }
        }
        assert!(left > 0, "no failed append wrote anything");
        assert!(log.replace(b"x").await.is_err(), "rewrites fail too");
        tokio::time::sleep(Duration::from_millis(10)).await;
        log.append(b"cc").await.unwrap();
        log.crash();
        let bytes = log.load().await.unwrap();
        assert!(bytes.starts_with(b"aaaab") && bytes.ends_with(b"cc"), "{bytes:?}");
        assert_eq!(bytes.len() as u64, 4 + left + 2);
        // A rewrite drops the failed bytes.
        log.replace(b"snap").await.unwrap();
        assert_eq!(log.load().await.unwrap(), b"snap");
    }

    #[tokio::test]
    async fn a_crash_during_an_append_keeps_a_prefix_of_it() {
        let log = SimMetaLog::new(MetaDiskConfig { append_us: 100, sync_us: 1_000, ..MetaDiskConfig::default() }, 3);
        log.append(b"durable").await.unwrap();
        let writer = log.clone();
        let task = tokio::spawn(async move { writer.append(&[9u8; 64]).await });
        tokio::time::sleep(Duration::from_micros(500)).await;
        log.crash();
        drop(task);
        let bytes = log.load().await.unwrap();
        assert!(bytes.starts_with(b"durable") && bytes.len() <= 7 + 64, "{bytes:?}");
    }
}
