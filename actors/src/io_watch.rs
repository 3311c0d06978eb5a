//! `IoWatch`: since when the writes in flight to one volume on this node
//! have been pending, so that a primary whose volume hangs (a stuck
//! attachment: the write neither completes nor fails) gives the volume up
//! and a backup takes over (see `crate::volume`).
//!
//! Each group commit, shard creation and read-write open holds an
//! [`InFlight`] while it waits on the volume; dropping it (the write
//! completed or failed, or its task ended) removes it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::time::{Duration, Instant};

/// The writes in flight to one volume; shared by its volume manager, shard
/// manager and shards.
#[derive(Debug, Default)]
pub struct IoWatch {
    inner: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    next: u64,
    started: BTreeMap<u64, Instant>,
}

/// One write in flight, from [`IoWatch::begin`]; dropping it ends it.
#[derive(Debug)]
pub struct InFlight {
    watch: Arc<IoWatch>,
    token: u64,
}

impl IoWatch {
    /// A write to the volume starts now.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        let mut p = self.inner.lock().expect("io watch lock");
        p.next += 1;
        let token = p.next;
        p.started.insert(token, Instant::now());
        InFlight { watch: self.clone(), token }
    }

    /// How long the oldest write in flight has been pending; `None` when none is.
    pub fn oldest_pending(&self) -> Option<Duration> {
        let p = self.inner.lock().expect("io watch lock");
        p.started.values().min().map(|t| t.elapsed())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.watch.inner.lock().expect("io watch lock").started.remove(&self.token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_write_in_flight_counts_until_it_ends() {
        let watch = Arc::new(IoWatch::default());
        assert_eq!(watch.oldest_pending(), None);
        let first = watch.begin();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let second = watch.begin();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(watch.oldest_pending().unwrap() >= Duration::from_millis(80), "the first write counts");
        drop(first);
        let left = watch.oldest_pending().unwrap();
        assert!(left >= Duration::from_millis(20) && left < Duration::from_millis(80), "{left:?}: the second counts");
        drop(second);
        assert_eq!(watch.oldest_pending(), None);
    }
}
