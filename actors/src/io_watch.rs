//! `IoWatch`: since when the writes in flight to one volume on this node
//! have been pending, and since when they have been failing, so that a
//! primary whose volume hangs (a stuck attachment: the write neither
//! completes nor fails) or keeps failing its syncs (every group commit ends
//! with an unknown outcome) gives the volume up and a backup takes over
//! (see `crate::volume`).
//!
//! Each group commit, shard creation and read-write open holds an
//! [`InFlight`] while it waits on the volume; dropping it (the write
//! completed or failed, or its task ended) removes it. A group commit also
//! reports how it ended ([`InFlight::finish`]), and whether the volume's
//! storage fence refused it ([`InFlight::fenced`]): then a newer primary
//! holds the volume and this one steps down at its next check.

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
    /// The first failure since the last write that succeeded.
    failing_since: Option<Instant>,
    /// The latest failure.
    last_failure: Option<Instant>,
    /// The current term (bumped by `clear_failures`, as a term as primary starts).
    term: u64,
    /// Why the volume refused a write of this term (a storage fence).
    fenced: Option<String>,
}

/// One write in flight, from [`IoWatch::begin`]; dropping it ends it.
#[derive(Debug)]
pub struct InFlight {
    watch: Arc<IoWatch>,
    token: u64,
    term: u64,
}

impl IoWatch {
    /// A write to the volume starts now.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        let mut p = self.inner.lock().expect("io watch lock");
        p.next += 1;
        let token = p.next;
        p.started.insert(token, Instant::now());
        InFlight { watch: self.clone(), token, term: p.term }
    }

    /// How long the oldest write in flight has been pending; `None` when none is.
    pub fn oldest_pending(&self) -> Option<Duration> {
        let p = self.inner.lock().expect("io watch lock");
        p.started.values().min().map(|t| t.elapsed())
    }

    /// How long the volume's writes have been failing here: since the first
    /// failure after the last write that succeeded; `None` when the last
    /// write that ended succeeded (or none failed yet).
    pub fn failing_for(&self) -> Option<Duration> {
        self.inner.lock().expect("io watch lock").failing_since.map(|t| t.elapsed())
    }

    /// Forgets past failures and fences (a new term as primary starts
    /// afresh; writes begun before it no longer count).
    pub fn clear_failures(&self) {
        let mut p = self.inner.lock().expect("io watch lock");
        p.failing_since = None;
        p.last_failure = None;
        p.term += 1;
        p.fenced = None;
    }

    /// Why the volume's storage fence refused a write begun in this term,
    /// if it did: a newer primary holds the fence, so this node must stop
    /// serving the volume at once.
    pub fn fenced(&self) -> Option<String> {
        self.inner.lock().expect("io watch lock").fenced.clone()
    }

    /// How long ago a write to the volume last failed here; `None` if none ever did.
    pub fn since_last_failure(&self) -> Option<Duration> {
        self.inner.lock().expect("io watch lock").last_failure.map(|t| t.elapsed())
    }
}

impl InFlight {
    /// The write ended: `ok` if it succeeded, `false` if the volume failed
    /// it (an I/O error or a failed sync, not a fence or a closed engine).
    pub fn finish(self, ok: bool) {
        let mut p = self.watch.inner.lock().expect("io watch lock");
        if ok {
            p.failing_since = None;
        } else {
            let now = Instant::now();
            p.failing_since.get_or_insert(now);
            p.last_failure = Some(now);
        }
    }

    /// The write ended refused by the volume's storage fence (a reservation
    /// conflict, or a newer epoch in the EPOCH file), for `why`. Counts only
    /// if no new term started since the write began.
    pub fn fenced(self, why: &str) {
        let mut p = self.watch.inner.lock().expect("io watch lock");
        if p.term == self.term {
            p.fenced = Some(why.to_string());
        }
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

    #[tokio::test]
    async fn failures_count_from_the_first_since_the_last_success() {
        let watch = Arc::new(IoWatch::default());
        watch.begin().finish(true);
        assert_eq!((watch.failing_for(), watch.since_last_failure()), (None, None));
        watch.begin().finish(false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        watch.begin().finish(false);
        assert!(watch.failing_for().unwrap() >= Duration::from_millis(50), "from the first failure");
        assert!(watch.since_last_failure().unwrap() < Duration::from_millis(50), "the latest");
        watch.begin().finish(true);
        assert_eq!(watch.failing_for(), None, "a success ends the run of failures");
        assert!(watch.since_last_failure().is_some());
        // Dropped without an outcome (a fence, a closed engine): no change.
        drop(watch.begin());
        assert_eq!(watch.failing_for(), None);
        // A new term forgets the failures of the last.
        watch.begin().finish(false);
        watch.clear_failures();
        assert_eq!((watch.failing_for(), watch.since_last_failure()), (None, None));
    }

    #[tokio::test]
    async fn a_fenced_write_counts_only_in_the_term_it_began() {
        let watch = Arc::new(IoWatch::default());
        let old_term = watch.begin();
        watch.clear_failures(); // a new term starts while the write is in flight
        old_term.fenced("key 2 holds the reservation");
        assert_eq!(watch.fenced(), None, "a write of the last term says nothing of this one");
        watch.begin().fenced("key 3 holds the reservation");
        assert_eq!(watch.fenced().as_deref(), Some("key 3 holds the reservation"));
        watch.clear_failures();
        assert_eq!(watch.fenced(), None);
    }
}
