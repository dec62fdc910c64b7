//! Generation with the GLM model (spec sections 2 and 6), in the layouts training uses
//! (glm-data's objective), so a model generates the way it learned:
//!
//! - [`Generator::complete`]: left-to-right continuation, `prompt [gMASK] <sop> gen...`.
//! - [`Generator::fill`]: blank filling, `left [MASK] right <sop> gen...`, each blank in turn.
//! - [`Decoder`]: one row over the model's KV cache: one prefill of the context and `<sop>`, then
//!   one token per step; [`Decoder::recompute`] is the cache-free reference.
//! - [`mirror`]: tensor-parallel decoding driven from one rank, the others replaying its calls.
//! - [`Sampler`] / [`SamplingConfig`]: greedy, or temperature -> top-k -> top-p -> softmax ->
//!   a seeded multinomial draw (BaseStrategy), deterministic for a seed.
//!
//! The context (everything before `<sop>`) is attended bidirectionally, the generated block
//! causally. Positions follow spec gotcha 1: GLM-130B's 1-D positions keep counting after [gMASK]
//! and sit at the [MASK]'s index while filling it; ChatGLM's 2-D positions hold the mask index in
//! the first dimension and count 1, 2, .. from `<sop>` in the second. Generation stops at `<eop>`,
//! the end-of-document token, `max_new_tokens` or the model's max_seq_len.
//!
//! ```no_run
//! # fn main() -> glm_infer::Result<()> {
//! # let (model, tok): (glm_model::Glm, glm_tokenizer::Tokenizer) = unimplemented!();
//! let gen = glm_infer::Generator::new(&model, &tok)?;
//! let out = gen.complete("The capital of France is", &glm_infer::SamplingConfig::greedy(32))?;
//! println!("{} [{:?}]", out.text, out.stop);
//! # Ok(()) }
//! ```

pub mod batch;
pub mod beam;
mod decode;
mod generate;
pub mod logprobs;
pub mod mirror;
pub mod sampling;

pub use beam::{BeamConfig, Hypothesis};
pub use decode::{block_position, Blank, Decoder};
pub use generate::{
    chat_prompt, ChatTemplate, FillPlan, Generation, Generator, Next, Span, StopReason, TextStream, CHAT_STOP,
};
pub use logprobs::TokenLogprob;
pub use sampling::{Sampler, SamplingConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("empty prompt: there is nothing to condition on")]
    EmptyPrompt,
    #[error("a row of {tokens} tokens (context, <sop> and generated) exceeds the model's max_seq_len {max}")]
    TooLong { tokens: usize, max: usize },
    #[error("no [MASK] or [sMASK] to fill in {0:?}")]
    NoMask(String),
    #[error("the tokenizer has no {token} token, which {needed_by} needs")]
    MissingToken { token: &'static str, needed_by: &'static str },
    #[error("the tokenizer's {token} is id {id}, outside the model's vocabulary ({vocab} ids)")]
    TokenOutsideVocab { token: &'static str, id: u32, vocab: usize },
    #[error("bad sampling config: {0}")]
    Sampling(String),
    #[error("cannot sample: {0}")]
    BadLogits(String),
    #[error("{0}")]
    Input(String),
    #[error("the request ran past its time limit")]
    Timeout,
    /// The tensor-parallel ranks cannot be reached (dead, stuck or gone): nothing more can run.
    #[error("tensor-parallel ranks: {0}")]
    Ranks(String),
    /// A failure of the model's computation shared by several requests (its message).
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Model(#[from] glm_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Tokenizer(#[from] glm_tokenizer::TokenizerError),
    #[error("{context}: {source}")]
    Context { context: String, source: Box<Error> },
}

impl Error {
    /// Says what was being done when `self` happened.
    pub fn context(self, context: impl Into<String>) -> Self {
        Self::Context { context: context.into(), source: Box::new(self) }
    }

    /// Whether the request itself is at fault (under any context), rather than the model or the ranks.
    pub fn is_input(&self) -> bool {
        match self {
            Self::EmptyPrompt | Self::TooLong { .. } | Self::NoMask(_) | Self::Input(_) | Self::Sampling(_) => true,
            Self::Context { source, .. } => source.is_input(),
            _ => false,
        }
    }

    /// Whether the tensor-parallel ranks are gone (under any context).
    pub fn is_ranks(&self) -> bool {
        match self {
            Self::Ranks(_) => true,
            Self::Context { source, .. } => source.is_ranks(),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
