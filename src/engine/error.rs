//! The engine's error type and how the layers below map into it. The gRPC layer maps each
//! variant to exactly one status code (`grpc.rs`); this module decides which variant a failure
//! of the store or the pool becomes. A broken store invariant is ours, never the caller's: it
//! becomes an internal error, not FailedPrecondition.

use crate::fs::FsError;
use crate::pool::PoolError;
use crate::store::StoreError;

/// Errors of the engine. The first five are the caller's; the rest are ours and carry their cause.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{context}: {source}")]
    Pool { context: String, source: PoolError },
    #[error("store: {0}")]
    Store(StoreError),
    #[error("filesystem: {0}")]
    Fs(#[from] FsError),
    #[error("{0}")]
    Internal(String),
    /// The daemon is not serving this call: its start failed or it stopped while starting.
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(k) => EngineError::NotFound(format!("snapshot {k:?} not found")),
            StoreError::AlreadyExists(k) => {
                EngineError::AlreadyExists(format!("snapshot {k:?} already exists"))
            }
            StoreError::FailedPrecondition(m) => EngineError::FailedPrecondition(m),
            StoreError::SizeBelowParent { .. } => {
                EngineError::InvalidArgument(format!("the size asked: {e}"))
            }
            StoreError::NoFreeThinId => EngineError::ResourceExhausted(e.to_string()),
            // Invariant, Corrupt, Db, ...: ours, reported as internal with the cause.
            other => EngineError::Store(other),
        }
    }
}

/// Maps a pool error to the engine's, with `context` saying what was being done: a busy device
/// is the caller's precondition, a full pool is exhaustion, anything else is ours.
pub(crate) fn pool_err(context: impl Into<String>) -> impl FnOnce(PoolError) -> EngineError {
    let context = context.into();
    move |source| match source {
        PoolError::Busy(dev) => EngineError::FailedPrecondition(format!(
            "{context}: dm device {dev} is busy; unmount it first"
        )),
        PoolError::ReadOnly(_) | PoolError::ForeignDevice { .. } | PoolError::NotOurPool { .. } => {
            EngineError::FailedPrecondition(format!("{context}: {source}"))
        }
        PoolError::NoSpace(pool) => {
            EngineError::ResourceExhausted(format!("{context}: thin pool {pool} is out of space"))
        }
        source => EngineError::Pool { context, source },
    }
}
