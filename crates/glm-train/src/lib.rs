//! Pretraining with the GLM-130B recipe (spec section 4), on the CPU or a GPU:
//!
//! - **objective**: GLM's blank infilling from `glm-data` ([MASK] spans, [gMASK] suffixes, MIP);
//! - **optimizer**: AdamW (0.9, 0.95, 1e-8, decay 0.1 except biases and LayerNorms) on f32 master
//!   weights, warmup + cosine to 10%, a batch-size ramp, gradient accumulation, clipping at 1.0;
//! - **stability**: DeepNorm init, dropout, embedding gradient shrink, bf16 or f16 compute with
//!   dynamic loss scaling, and a monitor that skips or rolls back on loss spikes and NaNs;
//! - **bookkeeping**: atomic checksummed checkpoints with bit-exact resume, held-out loss and
//!   bits-per-byte, JSONL logs and SVG plots.
//!
//! `Trainer::new(config, options)?.run()?` is the whole job; `glm train` is a thin wrapper.

pub mod ckpt;
pub mod config;
pub mod dist;
pub mod eval;
pub mod metrics;
pub mod monitor;
pub mod optim;
pub mod pipe;
pub mod scaler;
pub mod schedule;
pub mod step;
#[doc(hidden)]
pub mod testing;
pub mod trainer;

pub use config::{Precision, TrainConfig};
pub use trainer::{train, RunOptions, RunState, Summary, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("optimizer: {0}")]
    Optim(String),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("{0}")]
    Io(String),
    /// A collective failed or a peer rank is gone.
    #[error("distributed: {0}")]
    Dist(String),
    #[error(transparent)]
    Model(#[from] glm_model::Error),
    #[error(transparent)]
    Data(#[from] glm_data::DataError),
    #[error(transparent)]
    Tokenizer(#[from] glm_tokenizer::TokenizerError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
