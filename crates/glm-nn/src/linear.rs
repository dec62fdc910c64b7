//! The linear-layer seam. The model never builds a weight matrix itself: it asks a `LinearFactory`
//! for a linear of a given shape and parallel role. The dense factory here loads `[out, in]` weights;
//! INT8/INT4 and tensor-parallel factories implement the same trait, so there is one model for all.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// How a linear layer is split under tensor parallelism (Megatron's terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParallelRole {
    /// Output features are split across ranks. The output dim is made of `chunks` equal logical
    /// blocks, each split on its own (1 for the per-head interleaved QKV, 2 for GeGLU's [x1 | x2]).
    Column { chunks: usize },
    /// Input features are split across ranks; partial outputs are summed (all-reduce).
    Row,
    /// Every rank holds the whole weight.
    Replicated,
}

/// What the model asks for: a linear `in_dim -> out_dim` named `name` under the builder's prefix.
#[derive(Debug, Clone, Copy)]
pub struct LinearSpec<'a> {
    pub name: &'a str,
    pub in_dim: usize,
    pub out_dim: usize,
    pub bias: bool,
    pub role: ParallelRole,
}

/// A linear layer of any kind: `[.., in] -> [.., out]`.
pub trait Linear: Module + Send + Sync {}
impl<T: Module + Send + Sync> Linear for T {}

pub trait LinearFactory: Send + Sync {
    fn make(&self, vb: &VarBuilder, spec: LinearSpec) -> Result<Box<dyn Linear>>;

    /// The vocabulary table named `name` under `vb` (`[vocab, hidden]` rows): the word embeddings,
    /// and the output head (the same table when tied). Dense by default; a tensor-parallel factory
    /// gives each rank a contiguous block of rows.
    fn vocab(&self, vb: &VarBuilder, name: &str, vocab: usize, hidden: usize) -> Result<Arc<dyn VocabTable>> {
        Ok(Arc::new(DenseVocab { weight: vb.pp(name).get((vocab, hidden), "weight")? }))
    }

    /// (rank, size) of the tensor-parallel group the layers are split over: a `Column` linear
    /// yields rank `rank`'s `1/size` of the output features (whole heads), a `Row` linear takes that
    /// slice of the input.
    fn tp(&self) -> (usize, usize) {
        (0, 1)
    }
}

/// The vocabulary rows of the model: embedding lookups in, logits out, and the loss on those
/// logits. Under tensor parallelism a rank holds rows `start..end` of `total` and its logits cover
/// only those: the loss is then computed without ever gathering the full logits.
pub trait VocabTable: Send + Sync {
    /// Embeddings (N, H) of token ids (N), every id of the full vocabulary.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    /// Logits (.., end - start) of hidden states (.., H).
    fn logits(&self, x: &Tensor) -> Result<Tensor>;
    /// (start, end, total): the vocabulary rows this table's logits cover.
    fn rows(&self) -> (usize, usize, usize);
    /// This rank's rows of the table, (end - start, H).
    fn weight(&self) -> &Tensor;
    /// Mean cross entropy (f32) of `logits` from [`VocabTable::logits`] against targets (`IGNORE_INDEX`
    /// rows skipped).
    fn cross_entropy(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        crate::loss::cross_entropy(logits, targets)
    }
}

/// The whole table on one rank.
pub struct DenseVocab {
    pub weight: Tensor, // (V, H)
}

impl VocabTable for DenseVocab {
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.index_select(ids, 0)
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        linear_nd(x, &self.weight, None)
    }

    fn rows(&self) -> (usize, usize, usize) {
        let v = self.weight.dims().first().copied().unwrap_or(0);
        (0, v, v)
    }

    fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Full-precision, unsharded weights: `weight [out, in]`, `bias [out]`.
#[derive(Debug, Default, Clone, Copy)]
pub struct DenseFactory;

impl LinearFactory for DenseFactory {
    fn make(&self, vb: &VarBuilder, spec: LinearSpec) -> Result<Box<dyn Linear>> {
        let vb = vb.pp(spec.name);
        let weight = vb.get((spec.out_dim, spec.in_dim), "weight")?;
        let bias = if spec.bias { Some(vb.get(spec.out_dim, "bias")?) } else { None };
        Ok(Box::new(Dense { weight, bias }))
    }
}

/// A dense linear: the leading dims are flattened so the product is one [B*T, in] x [in, out] GEMM
/// rather than one per batch row.
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Tensor,       // (out, in)
    bias: Option<Tensor>, // (out)
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear_nd(x, &self.weight, self.bias.as_ref())
    }
}

/// `x · Wᵀ + b` for x [.., in] and W [out, in], as one [rows, in] x [in, out] product (through BLAS
/// when it pays, see `blas::linear`).
pub fn linear_nd(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (inp, out) = (weight.dim(1)?, weight.dim(0)?);
    let rows = x.elem_count() / inp.max(1);
    let y = crate::blas::linear(&x.reshape((rows, inp))?, weight, bias)?; // (rows, out)
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    y.reshape(shape)
}

/// `x · Wᵀ + b` written out, the reference the dense layer is checked against.
pub fn linear_ref(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&weight.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    #[test]
    fn dense_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 3), &dev)?;
        let b = Tensor::randn(0f32, 1., 5, &dev)?;
        let mut m = HashMap::new();
        m.insert("p.weight".to_string(), w.clone());
        m.insert("p.bias".to_string(), b.clone());
        let vb = VarBuilder::from_tensors(m, DType::F32, &dev);
        let spec = LinearSpec { name: "p", in_dim: 3, out_dim: 5, bias: true, role: ParallelRole::Row };
        let lin = DenseFactory.make(&vb, spec)?;
        let x = Tensor::randn(0f32, 1., (2, 4, 3), &dev)?;
        let diff = (lin.forward(&x)? - linear_ref(&x, &w, Some(&b))?)?.abs()?.max_all()?;
        assert!(diff.to_scalar::<f32>()? < 1e-5);
        // A misshapen weight names the tensor.
        let spec = LinearSpec { in_dim: 4, ..spec };
        let e = DenseFactory.make(&vb, spec).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("p.weight"), "{e}");
        Ok(())
    }
}
