//! GLM building blocks, each small and written once: the linear-layer seam through which dense,
//! quantized and tensor-parallel weights plug in (`linear`), LayerNorm computed in f32 (`norm`),
//! rotary embeddings in the rotate-half layout, 1-D and 2-D (`rope`), the per-row GLM attention
//! layout that becomes the attention mask (`layout`), the loss (`loss`), the fused CPU kernels
//! behind them (`kernels`) and the run-time-loaded BLAS for big products (`blas`).
//!
//! Shapes use one alphabet: B batch, T sequence, H hidden, N heads, D head dim, F ffn, V vocab.

pub mod blas;
pub mod dropout;
pub mod kernels;
pub mod layout;
pub mod linear;
pub mod loss;
pub mod matvec;
pub mod norm;
pub mod rope;

pub use dropout::dropout;
pub use kernels::{layer_norm, masked_softmax};
pub use layout::{AttnLayout, Segment};
pub use linear::{DenseFactory, DenseVocab, Linear, LinearFactory, LinearSpec, ParallelRole, VocabTable};
pub use loss::{cross_entropy, IGNORE_INDEX};
pub use norm::LayerNorm;
pub use rope::Rope;

/// Test support: a fast kernel against its `_ref` twin, forward and backward.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Result, Tensor, Var};

    /// max |a - b| / max |b|
    pub fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
    }

    /// `fast` and `reference` (outputs of the two twins on the same inputs) agree within `fwd_tol`,
    /// and so do the gradients of sum(y * r), r random, with respect to each of `vars`.
    pub fn check_twins(fast: &Tensor, reference: &Tensor, vars: &[&Var], fwd_tol: f32, bwd_tol: f32) -> Result<()> {
        let err = max_rel(fast, reference)?;
        assert!(err < fwd_tol, "forward differs by {err}");
        let r = Tensor::randn(0f32, 1., fast.shape(), fast.device())?;
        let gf = (fast * &r)?.sum_all()?.backward()?;
        let gr = (reference * &r)?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            match (gf.get(v.as_tensor()), gr.get(v.as_tensor())) {
                (Some(a), Some(b)) => {
                    let err = max_rel(a, b)?;
                    assert!(err < bwd_tol, "gradient of input {i} differs by {err}");
                }
                _ => panic!("no gradient for input {i}"),
            }
        }
        Ok(())
    }
}
