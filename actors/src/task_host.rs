//! `TaskHost`: runs each actor as one tokio task. Under `--cfg madsim` the
//! tokio API is madsim's, so every actor is a deterministic madsim task on the
//! simulated node that spawned it, and dies with that node. The simulation
//! runs every actor on it; in the normal build, tests use it where no actix
//! system runs.
//!
//! The mailbox is a bounded tokio mpsc channel: `send` waits for room
//! (backpressure), letters are handled one at a time in FIFO order, and a
//! `Stop` letter ends the loop after the letters ahead of it; the letters
//! behind it are dropped, so their senders see `MailboxError::Closed`.

use std::sync::Arc;

use crate::actor::{CellFactory, Detached, Host, Letter, Mailbox, MailboxError};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

/// The task host; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskHost;

struct TaskMailbox {
    tx: mpsc::Sender<Letter>,
}

impl Mailbox for TaskMailbox {
    fn send(&self, letter: Letter) -> BoxFuture<'static, Result<(), MailboxError>> {
        let tx = self.tx.clone();
        Box::pin(async move { tx.send(letter).await.map_err(|_| MailboxError::Closed) })
    }

    fn do_send(&self, letter: Letter) {
        match self.tx.try_send(letter) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(letter)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(letter).await;
                });
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Host for TaskHost {
    fn spawn_cell(&self, name: String, capacity: usize, make: CellFactory) -> Arc<dyn Mailbox> {
        let (tx, mut rx) = mpsc::channel(capacity);
        let mailbox: Arc<dyn Mailbox> = Arc::new(TaskMailbox { tx });
        let mut cell = make(mailbox.clone());
        tokio::spawn(async move {
            cell.started().await;
            while let Some(letter) = rx.recv().await {
                match letter {
                    Letter::Stop => break,
                    Letter::Message(msg, what) => {
                        tracing::trace!(actor = %name, msg = what, "handle");
                        if let Some(detached) = cell.handle(msg).await {
                            tokio::spawn(detached);
                        }
                    }
                }
            }
            rx.close();
            drop(rx);
            cell.stopped().await;
            tracing::trace!(actor = %name, "stopped");
        });
        mailbox
    }

    fn spawn_detached(&self, fut: Detached) {
        tokio::spawn(fut);
    }
}
