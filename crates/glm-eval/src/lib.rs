//! GLM-130B's evaluation framework (spec section 7) on our model: YAML task files of three types,
//! scored with GLM's layouts, and reports that say how to reproduce them.
//!
//! - `task`: the task files, GLM-130B's own loading as they are (`-` or `_` keys, `file-pattern`
//!   groups, `path` under a data root);
//! - `data`: JSON-lines data (`inputs_pretokenized`, `choices_pretokenized`,
//!   `targets_pretokenized`, `label`), errors with file and line;
//! - `score`: multiple choice (every choice its own causal block after one shared context, all
//!   scored in one pass; a one-choice-per-row reference), generation (greedy or beam search through
//!   `glm-infer`), language modelling over sliding windows;
//! - `metrics`: accuracy, EM/F1 with SQuAD normalization, perplexity, bits per byte;
//! - `run` and `report`: a task over its files and groups, JSON and Markdown reports, comparisons.

pub mod data;
pub mod metrics;
pub mod report;
pub mod run;
pub mod score;
pub mod task;

use std::path::{Path, PathBuf};

pub use report::{compare, Report, Row};
pub use run::{evaluate, EvalOptions};
pub use score::Scorer;
pub use task::{TaskConfig, TaskType};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: {msg}")]
    Task { file: PathBuf, msg: String },
    #[error("{file}, line {line}: {msg}")]
    Data { file: PathBuf, line: usize, msg: String },
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Infer(#[from] glm_infer::Error),
    #[error(transparent)]
    Model(#[from] glm_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Tokenizer(#[from] glm_tokenizer::TokenizerError),
}

impl Error {
    pub(crate) fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        Self::Io { path: path.to_path_buf(), msg: e.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
