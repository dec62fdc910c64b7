//! GLM building blocks, each small and written once: the linear-layer seam through which dense,
//! quantized and tensor-parallel weights plug in (`linear`), LayerNorm computed in f32 (`norm`),
//! rotary embeddings in the rotate-half layout, 1-D and 2-D (`rope`), the per-row GLM attention
//! layout that becomes the attention mask (`layout`), and the loss (`loss`).
//!
//! Shapes use one alphabet: B batch, T sequence, H hidden, N heads, D head dim, F ffn, V vocab.

pub mod blas;
pub mod kernels;
pub mod layout;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod rope;

pub use kernels::{layer_norm, masked_softmax};
pub use layout::{AttnLayout, Segment};
pub use linear::{DenseFactory, Linear, LinearFactory, LinearSpec, ParallelRole};
pub use loss::{cross_entropy, IGNORE_INDEX};
pub use norm::LayerNorm;
pub use rope::Rope;
