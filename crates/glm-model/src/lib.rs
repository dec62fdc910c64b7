//! The GLM model: GLM-130B (post-LN DeepNorm, GeGLU, 1-D RoPE, tied head) and the ChatGLM-6B
//! variant (2-D RoPE, tanh-GELU MLP, untied head), one implementation for both.
//!
//! - `config`: `Config`, presets, validation, JSON.
//! - `weights`: the one table of parameter names and shapes; counts and memory estimates.
//! - `init`: seeded DeepNorm initialization.
//! - `model`: `Glm` (forward, full or with a `KvCache`).
//! - `stage`: `StageSpec`, the layers (and embedding, head) of one pipeline stage.
//! - `cache`: `KvCache`, the in-place growing key/value buffers of incremental decoding.

pub mod cache;
pub mod config;
pub mod init;
pub mod model;
pub mod stage;
pub mod weights;

pub use cache::KvCache;
pub use config::{Config, FfnKind, PositionEncoding, SpecialTokens, PRESETS};
pub use init::{init_weights, var_map};
pub use model::{Glm, Partial, Sequence, StageInput, TrainOptions};
pub use stage::StageSpec;
pub use weights::{
    param_count, param_table, save_weights, tensor_specs, var_tensors, weight_bytes, ParamKind, ParamSpec, WeightBytes,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("bad model input: {0}")]
    Input(String),
    #[error(transparent)]
    Checkpoint(#[from] glm_checkpoint::CheckpointError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
