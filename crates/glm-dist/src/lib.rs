//! Distributed GLM: one [`Communicator`] trait with an in-process backend (threads, one rank each:
//! tests and single-machine runs) and an MPI backend (feature `mpi`: the real engine for CPU ranks
//! and multi-node), Megatron's rank groups, and tensor parallelism at the model's linear seam.

pub mod comm;
pub mod groups;
pub mod local;
pub mod maps;
pub mod meter;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod pipeline;
pub mod registry;
pub mod split;
/// Backend-independent checks of a communicator, shared by the in-process tests and the MPI runs.
#[doc(hidden)]
pub mod testing;
pub mod tp;

pub use comm::{Communicator, ReduceOp};
pub use groups::{Layout, ParallelGroups};
pub use local::LocalComm;
pub use registry::Group;
pub use tp::TpFactory;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A collective failed, timed out, or a peer is gone.
    #[error("{0}")]
    Comm(String),
    /// An invalid layout or split (names the dimension).
    #[error("{0}")]
    Layout(String),
    /// A pipeline stage's own computation failed (its message).
    #[error("{0}")]
    Stage(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] glm_model::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            other => candle_core::Error::Msg(other.to_string()),
        }
    }
}
