//! `AttacheError`: every error a client can see, one variant per gRPC status
//! code we use (see the README's status table). Messages say what was wrong and
//! what to do about it.

use serde::{Deserialize, Serialize};

/// An error returned to a client; the variant decides the gRPC status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AttacheError {
    /// The request is malformed (empty key, key or value too large, ...): `INVALID_ARGUMENT`.
    #[error("{0}")]
    InvalidArgument(String),
    /// The shard (or other named thing) does not exist: `NOT_FOUND`.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already: `ALREADY_EXISTS`.
    #[error("{0}")]
    AlreadyExists(String),
    /// The client id does not own the shard, or the caller may not act as
    /// that client or make that call: `PERMISSION_DENIED`.
    #[error("{0}")]
    PermissionDenied(String),
    /// The server authenticates callers and this one brought no identity it
    /// accepts (no token or certificate, an unknown token): `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(String),
    /// The shard's state forbids the operation (closed, deleted): `FAILED_PRECONDITION`.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The shard's size limit would be exceeded: `RESOURCE_EXHAUSTED`.
    #[error("{0}")]
    ResourceExhausted(String),
    /// This node cannot serve the request now (not the primary, volume lost,
    /// shutting down); retry, at `primary_hint` when given: `UNAVAILABLE`.
    #[error("{message}")]
    Unavailable {
        /// What happened.
        message: String,
        /// The gRPC address of the node believed to be the primary, if known.
        primary_hint: Option<String>,
    },
    /// A bug or a corrupt volume: `INTERNAL`.
    #[error("{0}")]
    Internal(String),
    /// The request took effect in part, or may have: `UNAVAILABLE` without
    /// the `attache-rejected` tag, so a client counts its outcome as unknown
    /// and repeats it (only calls that are safe to repeat answer this).
    #[error("{0}")]
    OutcomeUnknown(String),
}

impl AttacheError {
    /// An `Unavailable` error without a primary hint.
    pub fn unavailable(message: impl Into<String>) -> Self {
        AttacheError::Unavailable { message: message.into(), primary_hint: None }
    }

    /// Whether a client may retry the same request (possibly elsewhere).
    pub fn is_retryable(&self) -> bool {
        matches!(self, AttacheError::Unavailable { .. } | AttacheError::OutcomeUnknown(_))
    }
}

impl From<crate::actor::MailboxError> for AttacheError {
    fn from(e: crate::actor::MailboxError) -> Self {
        AttacheError::unavailable(format!("{e}; the node may be shutting down, retry"))
    }
}
