//! The released GLM checkpoints in and out, exactly.
//!
//! Reads GLM-130B's SwissArmyTransformer folders (`latest` + `mp_rank_XX_model_states.pt`, any
//! tensor-parallel degree, fp16 or `convert_tp.py`'s INT8/INT4), ChatGLM-6B's Hugging Face folders
//! (`config.json` + torch or safetensors weights, whole or sharded, fp16 or the -int4/-int8
//! layouts) and our own files, as one [`Source`]: the model's parameters, checked in full before
//! any is read, readable a block of rows at a time. Writes our safetensors (dense or quantized) and
//! SAT folders at any degree ([`export`]), and loads a `Glm` from any source ([`load_model`]), or one
//! tensor-parallel rank's model reading only its part of each tensor ([`load_model_tp`]).
//! Weights are merged and split with GLM-130B's `tools/convert_tp.py` rules ([`glm_dist::split`]);
//! quantized ones are never re-quantized (a row-parallel weight keeps a scale per rank slice).
//! [`check`] reports what a downloaded folder holds, without loading it.
//!
//! Conversions stream: peak memory is about one block of rows (or one quantized weight), never
//! the model.

pub mod check;
pub mod export;
pub mod hf;
pub mod sat;
pub mod source;

pub use export::{convert, planned_bytes, Report, Target};
pub use source::{load_model, load_model_tp, open, Format, Source};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Checkpoint(#[from] glm_checkpoint::CheckpointError),
    #[error(transparent)]
    Quant(#[from] glm_quant::Error),
    #[error(transparent)]
    Model(#[from] glm_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Dist(#[from] glm_dist::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
