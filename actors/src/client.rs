//! The Attaché client: gRPC calls to a set of nodes that retry what may be
//! retried, follow primary hints, and say whether a failed call may have
//! taken effect. `attache client` (the CLI) and the simulation's workload
//! both use it, so the simulation exercises the client that ships; it is
//! written against the tokio and tonic APIs, which are madsim's under
//! `--cfg madsim`.
//!
//! Rules of one call ([`Client::call`]):
//! - An attempt goes to the node last learned for the call's shard (from a
//!   primary hint), else to the client's current node, else to the first
//!   address given; [`CallSpec::starting_at`] picks the first node instead
//!   (a stale read sent to a backup, a client that lost its routes).
//! - A status tagged `attache-rejected` came from the service and had no
//!   effect. `UNAVAILABLE` among those is retried: at the node its
//!   `attache-primary` hint names, or at the next node when it names none.
//!   Any other rejection ends the call.
//! - A status without the tag, or an attempt that outlived
//!   [`ClientSettings::attempt_timeout_ms`] (a retry: or what was left of
//!   the deadline), has an unknown outcome (the request may have been applied).
//!   It is retried at the next node for calls marked [`Repeat::Always`]; a
//!   call marked [`Repeat::Never`] (`NewShard`) is not sent again after
//!   such an attempt (it is after a rejection, which had no effect).
//! - A hint that is not a usable address counts as no hint.
//! - Hedging: a call that may be repeated ([`Repeat::Always`]) whose
//!   attempt has had no answer for [`ClientSettings::hedge_after_ms`] is
//!   also sent to the next node (each hedge to the node after the last one
//!   asked), again every `hedge_after_ms` while that attempt is out; at most
//!   two attempts are in flight. The first answer that serves the call wins.
//!   A hedge's rejection that names a node not being asked is followed at
//!   once (the rule below); one that names the node being asked, or none,
//!   leaves the call waiting on that node. A paused or partitioned primary
//!   thus holds a call up for about `hedge_after_ms` past the moment a new
//!   primary serves, not for the whole attempt timeout (unless the hedge
//!   hangs too: the next node is asked only when one of them answers or
//!   times out). A write's hedge carries the same request id: a shard that
//!   applied it acknowledges it without applying it again, and an old
//!   primary still committing it is fenced off the volume before a new one
//!   opens it, so it cannot apply twice. A final answer from one attempt
//!   (a rejection other than `UNAVAILABLE`) ends the call only once the
//!   other has answered too, and a call sent to a node of the caller's
//!   choice does not move the shard's route when it is served elsewhere.
//! - Retries back off exponentially with full jitter ([`crate::retry`]),
//!   drawn from a generator seeded by the caller, until
//!   [`ClientSettings::deadline_ms`] after the call began; except that a
//!   rejection whose hint names a node tried neither in that attempt nor
//!   in the one before is followed at once (the primary moved there), at
//!   most twice in a row.
//! - A failed call reports [`Outcome::Rejected`] only when no attempt may
//!   have taken effect; once one attempt's outcome was unknown (or one was
//!   still in flight when the call ended), the call's is
//!   [`Outcome::Unknown`], whatever later attempts answered.
//! - Writes (put, batch put, delete) carry a request id from
//!   [`Client::request_id`], made once per write and kept in every attempt's
//!   request: the shard applies it at most once within its window
//!   (`Limits::request_window_ms`), so retrying a write whose reply was lost
//!   cannot apply it twice.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::auth::BearerToken;
use crate::retry::{Jitter, RetryPolicy};
use crate::service::proto::attache_client::AttacheClient;
use crate::service::{is_rejection, primary_hint};
use crate::shard::ShardId;
use crate::timer::{self, Alarm};
use crate::tls::ClientTls;

/// A retry starts only if at least this much of the call's deadline is left
/// for it (a shorter attempt would mostly end in a timeout, turning a clean
/// rejection into an unknown outcome).
const MIN_RETRY_ATTEMPT: Duration = Duration::from_millis(100);

/// Mixed into the client's seed for its request id generator.
const REQUEST_ID_SEED: u64 = 0x5eed_1d5e_ed1d_5eed;

/// Largest gRPC message the client sends or accepts, bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How a client retries, ms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSettings {
    /// Backoff cap of the first retry, ms.
    pub initial_backoff_ms: u64,
    /// Largest backoff cap, ms.
    pub max_backoff_ms: u64,
    /// No retry starts, and no retry runs, past this long after the call
    /// began, ms (the first attempt may: it has `attempt_timeout_ms`).
    pub deadline_ms: u64,
    /// One attempt is abandoned (outcome unknown) after this long, ms; the
    /// next attempt goes to the next node.
    pub attempt_timeout_ms: u64,
    /// An attempt with no answer after this long is hedged, ms: the same
    /// request goes to another node as well, and the first answer that
    /// serves it wins (0: never). See [`DEFAULT_HEDGE_AFTER_MS`].
    pub hedge_after_ms: u64,
    /// Seed of the backoff jitter (a simulation seed; anything in production).
    pub seed: u64,
}

/// Default of [`ClientSettings::max_backoff_ms`]: a retry waits at most
/// 500 ms, so a client notices a new primary at most about that long after
/// it starts serving (TiKV's client caps its backoff after a region miss,
/// `BoRegionMiss`, at 500 ms for the same reason). Measured with real
/// processes (`failover_bench`): with a 2 s cap, SIGKILL to the first write
/// on the new primary took 3.5-4.2 s at lease TTL 2 s.
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 500;

/// Default of [`ClientSettings::hedge_after_ms`]. A hedged request goes to
/// a second server once the first has been outstanding for longer than the
/// latency most requests see (Dean and Barroso, "The Tail at Scale", CACM
/// 2013, "hedged requests"). A put here answers in milliseconds (p99 6 ms at
/// 64 in flight, `attache bench`), so 250 ms is far past that: a call
/// hedges when its node is paused, partitioned or dead, and then learns of
/// a new primary within about 250 ms instead of after the whole attempt
/// timeout (10 s by default).
pub const DEFAULT_HEDGE_AFTER_MS: u64 = 250;

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            initial_backoff_ms: 50,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
            deadline_ms: 30_000,
            attempt_timeout_ms: 10_000,
            hedge_after_ms: DEFAULT_HEDGE_AFTER_MS,
            seed: 0,
        }
    }
}

/// Whether a call may be sent again after an attempt with an unknown outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repeat {
    /// Repeated after any retryable failure: reads; writes (with a request
    /// id, see the module docs), close and delete of a shard. Known gap: a
    /// repeated delete of a shard whose first attempt applied answers
    /// `NOT_FOUND`.
    Always,
    /// Not repeated after an attempt whose outcome is unknown (`NewShard`: a
    /// repeat could create a second shard); repeated after a rejection
    /// (UNAVAILABLE, known to have had no effect), where its hint says.
    Never,
}

/// Where and how a call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallSpec {
    /// The shard the call is about: its route is learned from hints.
    pub shard: Option<ShardId>,
    /// Whether an attempt with an unknown outcome may be repeated.
    pub repeat: Repeat,
    /// The index (into the client's addresses) of the node the first attempt goes to.
    pub first_node: Option<usize>,
}

impl CallSpec {
    /// A call about `shard`, safe to repeat.
    pub fn shard(shard: ShardId) -> Self {
        CallSpec { shard: Some(shard), repeat: Repeat::Always, first_node: None }
    }

    /// A call about no shard in particular (listings, status), safe to repeat.
    pub fn any() -> Self {
        CallSpec { shard: None, repeat: Repeat::Always, first_node: None }
    }

    /// The same call, sent once (see [`Repeat::Never`]).
    pub fn once(self) -> Self {
        CallSpec { repeat: Repeat::Never, ..self }
    }

    /// The same call, its first attempt sent to the node at `index` (modulo
    /// the number of addresses).
    pub fn starting_at(self, index: usize) -> Self {
        CallSpec { first_node: Some(index), ..self }
    }
}

/// A call's answer and the node that gave it.
#[derive(Clone, Debug)]
pub struct Served<T> {
    /// The answer.
    pub value: T,
    /// The address of the node that answered.
    pub addr: String,
    /// Attempts made, this one included.
    pub attempts: u32,
}

/// Whether a failed call may have taken effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No attempt had any effect: every one was rejected by the service.
    Rejected,
    /// Some attempt may have been applied (transport failure or timeout).
    Unknown,
}

/// A failed call: the last status, and whether it may have taken effect.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The last attempt's status (`DEADLINE_EXCEEDED` for a timed-out attempt).
    pub status: Status,
    /// Whether any attempt may have taken effect.
    pub outcome: Outcome,
    /// The address of the node the last attempt went to.
    pub addr: String,
    /// Attempts made.
    pub attempts: u32,
}

/// A gRPC stub of one node, with the client's bearer token (if any) on
/// every call.
#[cfg(not(madsim))]
pub type Stub = AttacheClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>;
/// A gRPC stub of one node, with the client's bearer token (if any) on
/// every call.
#[cfg(madsim)]
pub type Stub = AttacheClient<Channel, BearerToken>;

struct Routes {
    /// Every node address known: those given, then those learned from hints.
    addrs: Vec<String>,
    /// One gRPC client per address, made when first used.
    stubs: BTreeMap<usize, Stub>,
    /// Where calls about no particular shard go.
    current: usize,
    /// Where calls about a shard go, learned from hints and failures.
    shards: BTreeMap<ShardId, usize>,
    /// TLS for every connection, when set (see [`Client::with_tls`]).
    tls: Option<Arc<ClientTls>>,
    /// The bearer token every call carries (see [`Client::with_token`]).
    token: BearerToken,
}

impl Routes {
    fn index_of(&mut self, addr: &str) -> usize {
        match self.addrs.iter().position(|a| a == addr) {
            Some(i) => i,
            None => {
                self.addrs.push(addr.to_string());
                self.addrs.len() - 1
            }
        }
    }

    fn route(&self, shard: Option<ShardId>) -> usize {
        shard.and_then(|s| self.shards.get(&s).copied()).unwrap_or(self.current)
    }

    fn set_route(&mut self, shard: Option<ShardId>, at: usize) {
        match shard {
            Some(s) => {
                self.shards.insert(s, at);
            }
            None => self.current = at,
        }
    }

    fn stub(&mut self, at: usize) -> Result<Stub, Status> {
        if let Some(stub) = self.stubs.get(&at) {
            return Ok(stub.clone());
        }
        let stub = AttacheClient::with_interceptor(channel(&self.addrs[at], self.tls.as_deref())?, self.token.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.stubs.insert(at, stub.clone());
        Ok(stub)
    }
}

/// A lazily connected channel to `addr` (`host:port` or a URL), over TLS
/// when `tls` is given (see [`crate::tls`]).
///
/// Errors: `INVALID_ARGUMENT` for an address that is not a valid URI, or
/// TLS settings this build cannot apply.
pub fn channel(addr: &str, tls: Option<&ClientTls>) -> Result<Channel, Status> {
    let endpoint = crate::tls::endpoint(addr, tls).map_err(|e| Status::invalid_argument(format!("node {e}")))?;
    Ok(endpoint.connect_timeout(Duration::from_secs(5)).connect_lazy())
}

/// The client; see the module docs. Clones share routes and the jitter.
#[derive(Clone)]
pub struct Client {
    routes: Arc<Mutex<Routes>>,
    policy: RetryPolicy,
    attempt_timeout: Duration,
    /// `None`: calls are not hedged.
    hedge_after: Option<Duration>,
    jitter: Jitter,
    /// The generator of request ids, apart from `jitter` so that ids do not
    /// shift the backoff sequence a seed gives.
    ids: Jitter,
}

impl Client {
    /// A client of the nodes at `addrs` (`host:port`).
    ///
    /// Errors: `INVALID_ARGUMENT` when `addrs` is empty.
    pub fn new(addrs: &[String], settings: ClientSettings) -> Result<Self, Status> {
        if addrs.is_empty() {
            return Err(Status::invalid_argument("no node address given"));
        }
        let routes = Routes {
            addrs: addrs.to_vec(),
            stubs: BTreeMap::new(),
            current: 0,
            shards: BTreeMap::new(),
            tls: None,
            token: BearerToken::default(),
        };
        Ok(Client {
            routes: Arc::new(Mutex::new(routes)),
            policy: RetryPolicy {
                initial_backoff_ms: settings.initial_backoff_ms,
                max_backoff_ms: settings.max_backoff_ms,
                max_attempts: u32::MAX,
                deadline_ms: settings.deadline_ms,
            },
            attempt_timeout: Duration::from_millis(settings.attempt_timeout_ms),
            hedge_after: (settings.hedge_after_ms > 0).then(|| Duration::from_millis(settings.hedge_after_ms)),
            jitter: Jitter::new(settings.seed),
            ids: Jitter::new(settings.seed ^ REQUEST_ID_SEED),
        })
    }

    /// The same client, connecting over TLS with `tls` (to the addresses
    /// given and those it learns from hints alike).
    pub fn with_tls(self, tls: ClientTls) -> Self {
        {
            let mut routes = self.lock();
            routes.tls = Some(Arc::new(tls));
            routes.stubs.clear();
        }
        self
    }

    /// The same client, sending `token` as its bearer token on every call
    /// (its identity to nodes with a token file; see [`crate::auth`]).
    pub fn with_token(self, token: BearerToken) -> Self {
        {
            let mut routes = self.lock();
            routes.token = token;
            routes.stubs.clear();
        }
        self
    }

    /// A new request id for one write: 128 bits from the client's seeded
    /// generator, as 32 hex digits. Put it in the request once and send the
    /// same request on every attempt.
    pub fn request_id(&self) -> String {
        format!("{:016x}{:016x}", self.ids.token(), self.ids.token())
    }

    /// Every node address known, in the order learned.
    pub fn addrs(&self) -> Vec<String> {
        self.lock().addrs.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().expect("client routes lock")
    }

    /// Runs `call` (one gRPC method on the stub it is given) as `spec` says;
    /// see the module docs for the rules.
    ///
    /// Errors: the last attempt's status, with whether the call may have
    /// taken effect.
    pub async fn call<T, F, Fut>(&self, spec: CallSpec, mut call: F) -> Result<Served<T>, Failure>
    where
        F: FnMut(Stub) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(self.policy.deadline_ms);
        let first = {
            let routes = self.lock();
            // A first node chosen by the caller (a stale read sent to a
            // backup) does not change the shard's route; a reroute does.
            match spec.first_node {
                Some(i) => i % routes.addrs.len(),
                None => routes.route(spec.shard),
            }
        };
        // Only a call that may be repeated is hedged, and only when there
        // is another node to ask (counted when the hedge is due: hints may
        // have taught the client new addresses meanwhile).
        let hedge = self.hedge_after.filter(|_| spec.repeat == Repeat::Always);
        let may_hedge = || hedge.filter(|_| self.lock().addrs.len() > 1);
        let timed = |at: usize, addr: String, timeout: Duration, attempt: Fut| async move {
            let result: Result<tonic::Response<T>, Status> = match timer::timeout(timeout, attempt).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer from {addr} within {} ms; the call may have been applied",
                    timeout.as_millis()
                ))),
            };
            (at, addr, result)
        };
        let mut flying = FuturesUnordered::new();
        // The nodes of the attempts in flight (at most two: one and its hedge).
        let mut in_flight: Vec<usize> = Vec::new();
        let mut attempts = 0u32;
        let mut unknown = false;
        // The node the failed attempt before the last one went to, and how
        // many retries in a row went without a pause.
        let (mut before, mut in_a_row): (Option<usize>, u32) = (None, 0);
        // The next attempt (when, to which node), and the next hedge.
        let mut next: Option<(Instant, usize)> = Some((start, first));
        let mut hedge_at: Option<Instant> = None;
        let mut hedge_to = first;
        // A final failure that came while another attempt was in flight.
        let mut settled: Option<(Status, String)> = None;
        // The timer of `next` or else of `hedge_at`, made anew only when
        // that instant changes.
        let (mut alarm, mut alarm_for) = (Alarm::at(start), None);
        loop {
            let now = Instant::now();
            let launch = match next {
                Some((t, to)) if t <= now => {
                    next = None;
                    Some(to)
                }
                None if hedge_at.is_some_and(|t| t <= now) => {
                    // A hedge: the attempt in flight has had no answer for
                    // `hedge_after`; ask the next node after the last one
                    // asked, as well.
                    hedge_at = None;
                    let nodes = self.lock().addrs.len();
                    match in_flight[..] {
                        [only] if nodes > 1 && now + MIN_RETRY_ATTEMPT <= deadline => {
                            let to = (1..=nodes).map(|k| (hedge_to + k) % nodes).find(|&n| n != only).unwrap_or(only);
                            tracing::debug!(attempts, to, "hedging");
                            Some(to)
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            if let Some(to) = launch {
                hedge_to = to;
                attempts += 1;
                let (addr, stub) = {
                    let mut routes = self.lock();
                    (routes.addrs[to].clone(), routes.stub(to))
                };
                let stub = match stub {
                    Ok(stub) => stub,
                    // Not sent (an address that is no URI): while another
                    // attempt is in flight, wait for it instead.
                    Err(_) if !in_flight.is_empty() => continue,
                    Err(status) => {
                        let outcome = if unknown { Outcome::Unknown } else { Outcome::Rejected };
                        return Err(Failure { status, outcome, addr, attempts });
                    }
                };
                // The first attempt gets the whole attempt timeout; a retry
                // or hedge no more than what is left of the deadline.
                let timeout = if attempts == 1 {
                    self.attempt_timeout
                } else {
                    self.attempt_timeout.min(deadline.saturating_duration_since(now))
                };
                in_flight.push(to);
                // Boxed: an attempt is a large future, and the set would hold (and
                // copy) one of its size for its own bookkeeping too.
                flying.push(Box::pin(timed(to, addr, timeout, call(stub))));
                hedge_at = may_hedge().filter(|_| in_flight.len() == 1).map(|h| now + h);
                continue;
            }
            let timer = next.map(|(t, _)| t).or(hedge_at);
            if let Some(t) = timer.filter(|&t| Some(t) != alarm_for) {
                (alarm, alarm_for) = (Alarm::at(t), Some(t));
            }
            tokio::select! {
                // Answers first, so that a timer due at the same instant
                // cannot start an attempt an answer makes needless.
                biased;
                Some((at, addr, result)) = flying.next(), if !flying.is_empty() => {
                    if let Some(i) = in_flight.iter().position(|&n| n == at) {
                        in_flight.swap_remove(i);
                    }
                    let status = match result {
                        Ok(resp) => {
                            // The node that served is the route for later
                            // calls; not for a call sent to a node of the
                            // caller's choice (a stale read at a backup).
                            if spec.first_node.is_none() {
                                self.lock().set_route(spec.shard, at);
                            }
                            return Ok(Served { value: tonic::Response::into_inner(resp), addr, attempts });
                        }
                        Err(status) => status,
                    };
                    let rejected = is_rejection(&status);
                    unknown |= !rejected;
                    // A rejection had no effect, so even a call sent once
                    // (`Repeat::Never`) may go again, where its hint says.
                    let retry = if rejected {
                        status.code() == Code::Unavailable
                    } else if spec.repeat == Repeat::Never {
                        false
                    } else {
                        matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
                    };
                    // An attempt still in flight is abandoned if the call
                    // ends now, so it may yet take effect.
                    let outcome = if unknown || !in_flight.is_empty() { Outcome::Unknown } else { Outcome::Rejected };
                    if let Some(last) = settled.as_mut() {
                        // The call has its final answer and waits only for
                        // the other attempt: it ends with that answer.
                        if in_flight.is_empty() {
                            let (status, addr) = last.clone();
                            return Err(Failure { status, outcome, addr, attempts });
                        }
                        continue;
                    }
                    if !retry {
                        if in_flight.is_empty() {
                            return Err(Failure { status, outcome, addr, attempts });
                        }
                        // The other attempt may still serve the call (a
                        // hedge found the shard deleted while the primary
                        // deleting it has not answered yet): wait for it,
                        // starting nothing more.
                        (settled, next, hedge_at) = (Some((status, addr)), None, None);
                        continue;
                    }
                    let (to, hinted) = {
                        let mut routes = self.lock();
                        // A hint that is no valid address (a misconfigured
                        // advertise address) is no hint.
                        let tls = routes.tls.clone();
                        let usable = |h: &String| crate::tls::endpoint(h, tls.as_deref()).is_ok();
                        let (to, hinted) = match primary_hint(&status).filter(usable) {
                            Some(hint) => (routes.index_of(&hint), true),
                            None => ((at + 1) % routes.addrs.len(), false),
                        };
                        if to != at {
                            tracing::debug!(from = %addr, to = %routes.addrs[to], shard = ?spec.shard, "rerouting");
                        }
                        routes.set_route(spec.shard, to);
                        (to, hinted)
                    };
                    if in_flight.contains(&to) {
                        // The node to ask next is being asked: wait for it,
                        // hedging again later.
                        hedge_at = may_hedge().map(|h| Instant::now() + h);
                        continue;
                    }
                    // A rejection that names a primary tried neither now nor
                    // just before is followed at once (the primary moved;
                    // TiKV's client likewise retries a NotLeader with a new
                    // leader at once), at most twice in a row; anything else
                    // backs off, so nodes whose views of the primary differ
                    // cannot make a loop without pauses.
                    let at_once = rejected && hinted && to != at && Some(to) != before && in_a_row < 2;
                    in_a_row = if at_once { in_a_row + 1 } else { 0 };
                    before = Some(at);
                    if !in_flight.is_empty() && !at_once {
                        // The other attempt may yet answer; the hedge timer
                        // goes on asking the other nodes meanwhile.
                        hedge_at = may_hedge().map(|h| Instant::now() + h);
                        continue;
                    }
                    let sleep = if at_once { Duration::ZERO } else { self.jitter.below(self.policy.cap(attempts)) };
                    if Instant::now() + sleep + MIN_RETRY_ATTEMPT > deadline {
                        if in_flight.is_empty() {
                            return Err(Failure { status, outcome, addr, attempts });
                        }
                        continue;
                    }
                    tracing::debug!(attempts, ?sleep, code = ?status.code(), message = status.message(), "retrying");
                    next = Some((Instant::now() + sleep, to));
                }
                // Due: the loop's top starts it.
                _ = &mut alarm, if timer.is_some() => {}
            }
        }
    }
}
