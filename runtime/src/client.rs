//! A retrying gRPC client for Attaché, used by `attache client`.
//!
//! A call that fails with `UNAVAILABLE`, or in transport, is retried with exponential backoff
//! and full jitter (see `attache_actors::meta::retry`) until a deadline; when
//! the status names the primary (`attache-primary`), the next attempt goes
//! there. Only calls that are safe to repeat are retried: puts, batch puts and
//! deletes write the same values again, reads repeat; `NewShard` is not
//! retried once sent, since a repeat would create a second shard. Without a
//! hint (the node is down, or knows no primary yet), the next attempt goes to
//! the next known node.

use std::time::Duration;

use attache_actors::service::proto::attache_client::AttacheClient;
use attache_actors::service::{is_rejection, primary_hint};
use rand::Rng;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Retry settings.
#[derive(Clone, Debug)]
pub struct RetrySettings {
    /// First backoff cap.
    pub initial: Duration,
    /// Largest backoff cap.
    pub max: Duration,
    /// Give up after this long.
    pub deadline: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
        }
    }
}

/// A client that follows primary hints.
#[derive(Clone)]
pub struct Client {
    /// Every node address known (from `--addr`, and hints learned).
    addrs: Vec<String>,
    /// The address calls go to now.
    addr: String,
    inner: AttacheClient<Channel>,
    retry: RetrySettings,
}

/// Whether a call that failed with `s` may be sent again: the node could not
/// serve it (`UNAVAILABLE`), or the transport failed before an answer came
/// (the call may have been applied; the calls retried are safe to repeat).
fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => !is_rejection(s),
        _ => false,
    }
}

/// A channel to `addr` (`host:port` or a URL) with connect and request timeouts.
pub fn channel(addr: &str) -> anyhow::Result<Channel> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    Ok(Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect_lazy())
}

fn client(channel: Channel) -> AttacheClient<Channel> {
    AttacheClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

impl Client {
    /// A client of the nodes at `addrs` (`host:port`, at least one); calls go
    /// to the first until it is unavailable without naming the primary.
    pub fn new(addrs: &[String], retry: RetrySettings) -> anyhow::Result<Self> {
        let addr = addrs.first().ok_or_else(|| anyhow::anyhow!("no node address given"))?.clone();
        Ok(Client { addrs: addrs.to_vec(), inner: client(channel(&addr)?), addr, retry })
    }

    /// Sends later calls to `addr`, remembering it.
    fn switch(&mut self, addr: String) {
        if let Ok(ch) = channel(&addr) {
            if !self.addrs.contains(&addr) {
                self.addrs.push(addr.clone());
            }
            self.addr = addr;
            self.inner = client(ch);
        }
    }

    /// The address calls currently go to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs `call`, retrying `UNAVAILABLE` (following primary hints) until the deadline.
    pub async fn retrying<T, F, Fut>(&mut self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(AttacheClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = tokio::time::Instant::now();
        let mut attempt = 0u32;
        loop {
            match call(self.inner.clone()).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(status) if retryable(&status) => {
                    attempt += 1;
                    match primary_hint(&status) {
                        Some(hint) if hint != self.addr => {
                            tracing::info!(from = %self.addr, to = %hint, "following the primary hint");
                            self.switch(hint);
                        }
                        Some(_) => {}
                        // No hint (the node is down, or knows no primary): try the next node.
                        None if self.addrs.len() > 1 => {
                            let at = self.addrs.iter().position(|a| *a == self.addr).unwrap_or(0);
                            self.switch(self.addrs[(at + 1) % self.addrs.len()].clone());
                        }
                        None => {}
                    }
                    let cap = self.retry.initial.saturating_mul(1 << attempt.min(16)).min(self.retry.max);
                    let sleep = Duration::from_millis(rand::rng().random_range(0..=cap.as_millis() as u64));
                    if start.elapsed() + sleep > self.retry.deadline {
                        return Err(status);
                    }
                    tracing::debug!(attempt, ?sleep, message = status.message(), "retrying");
                    tokio::time::sleep(sleep).await;
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Runs `call` once (for calls that must not repeat).
    pub async fn once<T, F, Fut>(&mut self, call: F) -> Result<T, Status>
    where
        F: FnOnce(AttacheClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        call(self.inner.clone()).await.map(tonic::Response::into_inner)
    }
}
