//! `ActixHost`: the production host. Each Attaché actor runs as one actix
//! actor on one of a fixed set of arbiters (event-loop threads).
//!
//! An actix actor here holds a type-erased [`ActorCell`] and handles each
//! letter as an `AtomicResponse`: actix takes no other message until the
//! cell's handler future completes, so the actor sees one message at a time
//! even while it awaits I/O, exactly as on the task host. The mailbox is
//! actix's, bounded with `set_mailbox_capacity`; a sender waits while it is
//! full. Timers and deferred replies run as futures on the arbiters' tokio
//! runtimes, taken from the tokio API, never from actix's context (see
//! ARCHITECTURE.md for why: the same actor code must also run under madsim).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use actix::{ActorFutureExt, WrapFuture};
use attache_actors::actor::{ActorCell, CellFactory, Detached, Host, Letter, Mailbox, MailboxError};
use futures::future::BoxFuture;

/// The actix host; see the module docs.
pub struct ActixHost {
    arbiters: Vec<ArbiterHandle>,
    next: AtomicUsize,
}

impl ActixHost {
    /// A host with `threads` arbiter threads (at least one). Must be called
    /// inside a running `actix_rt::System`.
    pub fn new(threads: usize) -> Self {
        let arbiters = (0..threads.max(1)).map(|_| Arbiter::new().handle()).collect();
        ActixHost { arbiters, next: AtomicUsize::new(0) }
    }

    fn arbiter(&self) -> &ArbiterHandle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        &self.arbiters[i]
    }
}

impl Drop for ActixHost {
    fn drop(&mut self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

/// The actix actor around one Attaché actor.
struct ActixCell {
    /// `None` only while a handler future owns the cell.
    cell: Option<Box<dyn ActorCell>>,
    capacity: usize,
}

struct LetterMsg(Letter);

impl actix::Message for LetterMsg {
    type Result = ();
}

impl actix::Actor for ActixCell {
    type Context = actix::Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.capacity);
        let mut cell = self.cell.take().expect("cell present at start");
        let fut = async move {
            cell.started().await;
            cell
        };
        ctx.wait(fut.into_actor(self).map(|cell, act, _| act.cell = Some(cell)));
    }
}

impl actix::Handler<LetterMsg> for ActixCell {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: LetterMsg, _ctx: &mut Self::Context) -> Self::Result {
        let mut cell = self.cell.take().expect("atomic responses never overlap");
        match msg.0 {
            Letter::Stop => AtomicResponse::new(Box::pin(
                async move {
                    cell.stopped().await;
                    cell
                }
                .into_actor(self)
                .map(|cell, act, ctx| {
                    act.cell = Some(cell);
                    ctx.stop();
                }),
            )),
            Letter::Message(letter, _) => AtomicResponse::new(Box::pin(
                async move {
                    let detached = cell.handle(letter).await;
                    (cell, detached)
                }
                .into_actor(self)
                .map(|(cell, detached), act, _| {
                    act.cell = Some(cell);
                    if let Some(fut) = detached {
                        actix_rt::spawn(fut);
                    }
                }),
            )),
        }
    }
}

struct ActixMailbox(Addr<ActixCell>);

impl Mailbox for ActixMailbox {
    fn send(&self, letter: Letter) -> BoxFuture<'static, Result<(), MailboxError>> {
        match self.0.try_send(LetterMsg(letter)) {
            Ok(()) => Box::pin(async { Ok(()) }),
            Err(SendError::Closed(_)) => Box::pin(async { Err(MailboxError::Closed) }),
            // actix cannot tell when a waiting message is enqueued; `send`
            // resolves once it was handled, which keeps the caller's order too.
            Err(SendError::Full(msg)) => {
                let request = self.0.send(msg);
                Box::pin(async move { request.await.map_err(|_| MailboxError::Closed) })
            }
        }
    }

    fn do_send(&self, letter: Letter) {
        self.0.do_send(LetterMsg(letter));
    }

    fn is_closed(&self) -> bool {
        !self.0.connected()
    }
}

impl Host for ActixHost {
    fn spawn_cell(&self, name: String, capacity: usize, make: CellFactory) -> Arc<dyn Mailbox> {
        let addr = ActixCell::start_in_arbiter(self.arbiter(), move |ctx: &mut actix::Context<ActixCell>| {
            let cell = make(Arc::new(ActixMailbox(ctx.address())));
            tracing::trace!(actor = %name, "started on actix");
            ActixCell { cell: Some(cell), capacity }
        });
        Arc::new(ActixMailbox(addr))
    }

    fn spawn_detached(&self, fut: Detached) {
        self.arbiter().spawn(fut);
    }
}
