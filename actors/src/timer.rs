//! Timers that register with the runtime once per wait: [`Alarm`] and
//! [`timeout`], for waits polled many times (an RPC with its timeout, a
//! call's hedge timer).
//!
//! Why: madsim's `Sleep` (madsim 0.2.34, `sim/time/sleep.rs`) adds a new
//! entry to the simulator's timer wheel every time it is polled while
//! pending, and an entry stays there until its deadline even after the
//! `Sleep` is dropped. A timeout around an RPC is polled at every wakeup of
//! its task (connect, send, each reply), so each RPC left several entries
//! behind. Under madsim, [`Alarm`] polls the runtime's sleep again only
//! when the waker changed or the sleep says its deadline passed. Under tokio
//! it polls tokio's `Sleep` every time, which keeps one entry and updates its
//! waker (and must be polled again after a poll that its task's cooperative
//! budget cut short): the same behaviour, so the rest of the code is the
//! same in production and in the simulation.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Duration, Instant, Sleep};

/// A future that is ready at `deadline` (tokio's clock; madsim's under
/// `--cfg madsim`).
#[derive(Debug)]
pub struct Alarm {
    sleep: Pin<Box<Sleep>>,
    /// The waker the runtime's sleep was last polled with (madsim only).
    #[cfg_attr(not(madsim), allow(dead_code))]
    armed: Option<Waker>,
}

impl Alarm {
    /// An alarm at `deadline`.
    pub fn at(deadline: Instant) -> Self {
        Alarm { sleep: Box::pin(tokio::time::sleep_until(deadline)), armed: None }
    }

    /// An alarm `after` from now.
    pub fn after(after: Duration) -> Self {
        Alarm::at(Instant::now() + after)
    }

    /// When it goes off (madsim rounds a deadline up to at least 1 ms from
    /// when the alarm was made).
    pub fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }
}

impl Future for Alarm {
    type Output = ();

    /// Under tokio the runtime's sleep is polled every time: tokio keeps one
    /// timer entry per sleep, and a sleep polled when the task's cooperative
    /// budget is spent returns pending without setting its timer, so
    /// skipping later polls could leave it unset for good.
    #[cfg(not(madsim))]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.sleep.as_mut().poll(cx)
    }

    /// Under madsim the runtime's sleep is polled again only for a new
    /// waker or once its deadline passed (madsim has no cooperative budget:
    /// a pending poll always sets a timer).
    #[cfg(madsim)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let registered = self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if registered && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                self.armed = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The error of a [`timeout`] whose future did not finish in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elapsed;

/// `future`'s output, or [`Elapsed`] if it is not done `after` from now; the
/// future is polled first, so one that is ready at the deadline wins.
pub async fn timeout<F: Future>(after: Duration, future: F) -> Result<F::Output, Elapsed> {
    let future = std::pin::pin!(future);
    match futures::future::select(future, Alarm::after(after)).await {
        futures::future::Either::Left((output, _)) => Ok(output),
        futures::future::Either::Right(((), _)) => Err(Elapsed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_alarm_goes_off_at_its_deadline_and_a_timeout_ends_a_slow_future() {
        let start = Instant::now();
        Alarm::after(Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
        let slow = timeout(Duration::from_millis(20), tokio::time::sleep(Duration::from_secs(60))).await;
        assert_eq!(slow, Err(Elapsed));
        let fast = timeout(Duration::from_secs(60), async { 7 }).await;
        assert_eq!(fast, Ok(7));
    }

    #[tokio::test]
    async fn an_alarm_polled_by_other_wakeups_still_goes_off() {
        // A task woken many times before the deadline (as an RPC's task is)
        // neither ends early nor misses the alarm.
        let start = Instant::now();
        let mut alarm = Alarm::after(Duration::from_millis(50));
        let mut ticks = 0;
        loop {
            tokio::select! {
                biased;
                _ = &mut alarm => break,
                _ = tokio::time::sleep(Duration::from_millis(5)) => ticks += 1,
            }
        }
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(ticks >= 5, "{ticks} wakeups before the alarm");
    }
}
