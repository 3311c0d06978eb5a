//! The actor abstraction every Attaché component is written against.
//!
//! An actor owns its state and handles one message at a time, in the order the
//! messages arrived (FIFO), from a bounded mailbox: a sender waits when the
//! mailbox is full (backpressure). A handler may await I/O; while it does, the
//! actor takes no other message. A handler replies either at once or with a
//! deferred reply ([`Reply::later`]), a future that completes outside the
//! actor, so the actor can take its next message meanwhile: that is how a
//! shard lets many writers share one WAL sync (group commit).
//!
//! The same actor code runs on two hosts, which only differ in who runs the
//! mailbox loop (see ARCHITECTURE.md, "Hosts"):
//! - the production host on actix (`attache-runtime`, `ActixHost`): one actix
//!   actor per Attaché actor, handling each letter as an atomic response;
//! - the task host (`crate::task_host::TaskHost`): one tokio task per actor, which
//!   under `--cfg madsim` is a deterministic madsim task.
//!
//! A host is object-safe and small: it makes a mailbox, runs the letters that
//! arrive in it against a type-erased [`ActorCell`], and spawns detached
//! futures. Typing is kept at [`Addr`], so a wrong message type cannot reach an
//! actor.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::oneshot;

/// Default mailbox capacity (messages) when an actor does not ask for another.
pub const DEFAULT_MAILBOX_CAPACITY: usize = 1024;

/// A unit of state that handles messages one at a time.
pub trait Actor: Send + Sized + 'static {
    /// A short name for logs and traces, such as `shard-7`.
    fn name(&self) -> String;

    /// Runs once on the host before the first message.
    fn started(&mut self, _ctx: &Context<Self>) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Runs once after [`Addr::stop`] was taken from the mailbox; the letters
    /// queued behind the stop are dropped and their senders see
    /// [`MailboxError::Closed`].
    fn stopped(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A message: plain data with the type of its reply.
pub trait Message: Send + 'static {
    /// What the handler answers.
    type Reply: Send + 'static;
}

/// An actor's handler for messages of type `M`.
pub trait Handler<M: Message>: Actor {
    /// Handles `msg`. The actor takes no other message until the returned
    /// future completes; a [`Reply::later`] reply completes outside the actor.
    fn handle(&mut self, msg: M, ctx: &Context<Self>) -> impl Future<Output = Reply<M::Reply>> + Send;
}

/// A handler's answer: now, or later from a future that runs outside the actor.
pub struct Reply<T>(ReplyInner<T>);

enum ReplyInner<T> {
    Now(T),
    Later(BoxFuture<'static, T>),
}

impl<T: Send + 'static> Reply<T> {
    /// Replies with `value` as the handler returns.
    pub fn now(value: T) -> Self {
        Reply(ReplyInner::Now(value))
    }

    /// Replies with what `fut` yields; the actor takes its next message while
    /// `fut` runs. `fut` must not touch the actor's state: send the actor a
    /// message instead.
    pub fn later(fut: impl Future<Output = T> + Send + 'static) -> Self {
        Reply(ReplyInner::Later(Box::pin(fut)))
    }

    /// A reply that yields `f(value)` where this one yields `value`.
    pub fn map<U: Send + 'static>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Reply<U> {
        match self.0 {
            ReplyInner::Now(value) => Reply::now(f(value)),
            ReplyInner::Later(fut) => Reply::later(async move { f(fut.await) }),
        }
    }
}

/// Why a message did not get a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailboxError {
    /// The actor stopped (or its host died) before it replied.
    Closed,
    /// `try_send` found the mailbox full.
    Full,
}

impl fmt::Display for MailboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MailboxError::Closed => f.write_str("actor stopped before replying"),
            MailboxError::Full => f.write_str("actor mailbox is full"),
        }
    }
}

impl std::error::Error for MailboxError {}

/// What travels through a host's mailbox: a type-erased message, or the stop signal.
pub enum Letter {
    /// A `Box<dyn Envelope<A>>` for the cell's actor type `A`, with the
    /// message's type name (for traces).
    Message(Box<dyn Any + Send>, &'static str),
    /// Stop after the letters ahead of this one.
    Stop,
}

/// A detached future a host must run to completion outside the actor.
pub type Detached = BoxFuture<'static, ()>;

/// The sending half of a mailbox, provided by a host.
pub trait Mailbox: Send + Sync + 'static {
    /// Enqueues `letter`, waiting while the mailbox is full. Resolves once the
    /// letter is in the mailbox (or, on hosts that cannot tell, once it was
    /// handled), so a caller's letters keep their order.
    fn send(&self, letter: Letter) -> BoxFuture<'static, Result<(), MailboxError>>;
    /// Enqueues `letter` without waiting: delivered even when the mailbox is
    /// full (no backpressure), dropped when the actor has stopped.
    fn do_send(&self, letter: Letter);
    /// Whether the actor has stopped.
    fn is_closed(&self) -> bool;
}

/// An actor and its context with the actor type erased, as a host runs it.
pub trait ActorCell: Send + 'static {
    /// Runs the actor's `started`.
    fn started(&mut self) -> BoxFuture<'_, ()>;
    /// Handles one [`Letter::Message`]; returns the deferred part of the reply,
    /// which the host must run detached.
    fn handle(&mut self, letter: Box<dyn Any + Send>) -> BoxFuture<'_, Option<Detached>>;
    /// Runs the actor's `stopped`.
    fn stopped(&mut self) -> BoxFuture<'_, ()>;
}

/// Builds the cell once the host has made the mailbox it will read.
pub type CellFactory = Box<dyn FnOnce(Arc<dyn Mailbox>) -> Box<dyn ActorCell> + Send>;

/// A place actors run: the actix host in production, the task host in tests and
/// in the simulation. Implementations are small; see the module docs.
pub trait Host: Send + Sync + 'static {
    /// Makes a mailbox of `capacity` letters, builds the cell with it, and runs
    /// the cell: `started`, then each letter in FIFO order, one at a time,
    /// running each returned [`Detached`] future outside the cell, until a
    /// [`Letter::Stop`] (then `stopped`) or until the host itself goes away.
    fn spawn_cell(&self, name: String, capacity: usize, make: CellFactory) -> Arc<dyn Mailbox>;

    /// Runs `fut` to completion outside any actor (timers, deferred replies).
    fn spawn_detached(&self, fut: Detached);
}

/// A cheap, cloneable reference to a host.
#[derive(Clone)]
pub struct HostHandle(Arc<dyn Host>);

impl HostHandle {
    /// Wraps a host.
    pub fn new(host: impl Host) -> Self {
        HostHandle(Arc::new(host))
    }

    /// Starts `actor` with a mailbox of `capacity` messages and returns its address.
    pub fn spawn<A: Actor>(&self, actor: A, capacity: usize) -> Addr<A> {
        assert!(capacity > 0, "mailbox capacity must be positive");
        let host = self.clone();
        let name = actor.name();
        let make: CellFactory = Box::new(move |mailbox: Arc<dyn Mailbox>| {
            let ctx = Context { addr: Addr::from_mailbox(mailbox), host };
            Box::new(Cell { actor, ctx }) as Box<dyn ActorCell>
        });
        Addr::from_mailbox(self.0.spawn_cell(name, capacity, make))
    }

    /// Runs `fut` to completion outside any actor.
    pub fn spawn_detached(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.0.spawn_detached(Box::pin(fut));
    }
}

impl fmt::Debug for HostHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostHandle")
    }
}

/// What a handler can reach besides its own state: its address and its host.
pub struct Context<A: Actor> {
    addr: Addr<A>,
    host: HostHandle,
}

impl<A: Actor> Context<A> {
    /// The actor's own address (to send itself timer ticks and completions).
    pub fn address(&self) -> Addr<A> {
        self.addr.clone()
    }

    /// The host the actor runs on, to start child actors and detached tasks.
    pub fn host(&self) -> &HostHandle {
        &self.host
    }
}

/// The typed address of an actor.
pub struct Addr<A> {
    mailbox: Arc<dyn Mailbox>,
    _actor: PhantomData<fn() -> A>,
}

impl<A> Clone for Addr<A> {
    fn clone(&self) -> Self {
        Addr { mailbox: self.mailbox.clone(), _actor: PhantomData }
    }
}

impl<A> fmt::Debug for Addr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Addr<{}>", std::any::type_name::<A>())
    }
}

impl<A: Actor> Addr<A> {
    fn from_mailbox(mailbox: Arc<dyn Mailbox>) -> Self {
        Addr { mailbox, _actor: PhantomData }
    }

    /// Sends `msg` and waits for the reply. Waits first while the mailbox is
    /// full. Dropping the returned future before the message was enqueued
    /// cancels it; after that, the actor still handles it.
    ///
    /// Errors: [`MailboxError::Closed`] when the actor stopped before replying.
    pub async fn send<M>(&self, msg: M) -> Result<M::Reply, MailboxError>
    where
        M: Message,
        A: Handler<M>,
    {
        self.enqueue(msg).await?.await
    }

    /// Enqueues `msg`, waiting while the mailbox is full, and returns the
    /// pending reply. Two messages enqueued one after the other by the same
    /// caller are handled in that order (FIFO), which `send` from separate
    /// tasks does not promise.
    ///
    /// Errors: [`MailboxError::Closed`] when the actor has stopped.
    pub async fn enqueue<M>(&self, msg: M) -> Result<PendingReply<M::Reply>, MailboxError>
    where
        M: Message,
        A: Handler<M>,
    {
        let (tx, rx) = oneshot::channel();
        let env: Box<dyn Envelope<A>> = Box::new(Envelope1 { msg, tx });
        self.mailbox.send(Letter::Message(Box::new(env), short_type_name::<M>())).await?;
        Ok(PendingReply(rx))
    }

    /// Sends `msg` without waiting for room or for the reply; the reply is
    /// dropped. For timer ticks and completions an actor sends itself.
    pub fn do_send<M>(&self, msg: M)
    where
        M: Message,
        A: Handler<M>,
    {
        let (tx, _rx) = oneshot::channel();
        let env: Box<dyn Envelope<A>> = Box::new(Envelope1 { msg, tx });
        self.mailbox.do_send(Letter::Message(Box::new(env), short_type_name::<M>()));
    }

    /// Asks the actor to stop after the messages already in its mailbox.
    pub fn stop(&self) {
        self.mailbox.do_send(Letter::Stop);
    }

    /// Whether the actor has stopped.
    pub fn is_closed(&self) -> bool {
        self.mailbox.is_closed()
    }
}

impl<A: Actor> Addr<A> {
    /// This address as a [`Recipient`] of `M` alone, so a sender need not
    /// name (nor depend on) the actor type that handles `M`.
    pub fn recipient<M>(&self) -> Recipient<M>
    where
        M: Message,
        A: Handler<M>,
    {
        Recipient { mailbox: self.mailbox.clone(), wrap: wrap_envelope::<A, M> }
    }
}

/// Boxes `msg` for actor type `A`, as [`Addr::send`] does.
fn wrap_envelope<A, M>(msg: M, tx: oneshot::Sender<M::Reply>) -> Box<dyn Any + Send>
where
    A: Handler<M>,
    M: Message,
{
    let env: Box<dyn Envelope<A>> = Box::new(Envelope1 { msg, tx });
    Box::new(env)
}

/// The address of some actor that handles `M`, with the actor's type erased
/// (as actix's `Recipient`): a child reports to its parent through one, so
/// the child's module does not depend on the parent's.
pub struct Recipient<M: Message> {
    mailbox: Arc<dyn Mailbox>,
    wrap: fn(M, oneshot::Sender<M::Reply>) -> Box<dyn Any + Send>,
}

impl<M: Message> Clone for Recipient<M> {
    fn clone(&self) -> Self {
        Recipient { mailbox: self.mailbox.clone(), wrap: self.wrap }
    }
}

impl<M: Message> fmt::Debug for Recipient<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recipient<{}>", short_type_name::<M>())
    }
}

impl<M: Message> Recipient<M> {
    /// Sends `msg` and waits for the reply, as [`Addr::send`].
    ///
    /// Errors: [`MailboxError::Closed`] when the actor stopped before replying.
    pub async fn send(&self, msg: M) -> Result<M::Reply, MailboxError> {
        let (tx, rx) = oneshot::channel();
        self.mailbox.send(Letter::Message((self.wrap)(msg, tx), short_type_name::<M>())).await?;
        PendingReply(rx).await
    }

    /// Sends `msg` without waiting for room or for the reply, as [`Addr::do_send`].
    pub fn do_send(&self, msg: M) {
        let (tx, _rx) = oneshot::channel();
        self.mailbox.do_send(Letter::Message((self.wrap)(msg, tx), short_type_name::<M>()));
    }

    /// Whether the actor has stopped.
    pub fn is_closed(&self) -> bool {
        self.mailbox.is_closed()
    }
}

/// The reply to an enqueued message; resolves to [`MailboxError::Closed`] when
/// the actor stopped before replying.
pub struct PendingReply<T>(oneshot::Receiver<T>);

impl<T> Future for PendingReply<T> {
    type Output = Result<T, MailboxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.map_err(|_| MailboxError::Closed))
    }
}

/// `M`'s type name without its module path (`ShardCall<Put>`, `Tick`).
fn short_type_name<M>() -> &'static str {
    let full = std::any::type_name::<M>();
    let generic = full.find('<').unwrap_or(full.len());
    let start = full[..generic].rfind("::").map_or(0, |i| i + 2);
    &full[start..]
}

/// A message with its reply channel, typed by the actor that handles it.
trait Envelope<A: Actor>: Send {
    fn handle<'a>(self: Box<Self>, act: &'a mut A, ctx: &'a Context<A>) -> BoxFuture<'a, Option<Detached>>;
}

struct Envelope1<M: Message> {
    msg: M,
    tx: oneshot::Sender<M::Reply>,
}

impl<A, M> Envelope<A> for Envelope1<M>
where
    A: Handler<M>,
    M: Message,
{
    fn handle<'a>(self: Box<Self>, act: &'a mut A, ctx: &'a Context<A>) -> BoxFuture<'a, Option<Detached>> {
        let Envelope1 { msg, tx } = *self;
        Box::pin(async move {
            match act.handle(msg, ctx).await.0 {
                ReplyInner::Now(value) => {
                    // The sender may have given up waiting; that is not the actor's concern.
                    let _ = tx.send(value);
                    None
                }
                ReplyInner::Later(fut) => {
                    let detached: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
                        let _ = tx.send(fut.await);
                    });
                    Some(detached)
                }
            }
        })
    }
}

struct Cell<A: Actor> {
    actor: A,
    ctx: Context<A>,
}

impl<A: Actor> ActorCell for Cell<A> {
    fn started(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.actor.started(&self.ctx))
    }

    fn handle(&mut self, letter: Box<dyn Any + Send>) -> BoxFuture<'_, Option<Detached>> {
        let env = letter
            .downcast::<Box<dyn Envelope<A>>>()
            .expect("a letter reached an actor of another type: Addr<A> keeps types apart");
        (*env).handle(&mut self.actor, &self.ctx)
    }

    fn stopped(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.actor.stopped())
    }
}
