//! Tensor parallelism at the model's linear seam: [`TpFactory`] hands the model column- and
//! row-parallel linears and a vocab-parallel embedding/head, built from this rank's shards of the
//! weights (the `split` table's cut: whole heads of the per-head interleaved QKV, GeGLU's
//! `dense_h_to_4h` per half, contiguous columns of the row-parallel weights, contiguous vocabulary
//! rows). The model itself is unchanged: it asks for linears by role and computes its heads'
//! attention.
//!
//! The logits a training model returns are this rank's vocabulary columns; `cross_entropy` computes
//! the loss over all of them with three all-reduces of one value per token (Megatron's
//! vocab-parallel cross entropy), never gathering the logits.
//!
//! Inference wants the whole distribution (sampling, beams, blank filling, evaluation scores):
//! [`TpFactory::for_inference`] makes the head all-gather its logits along the last dim, so every
//! rank holds the same full `[.., V]` and the model's `vocab_rows` and `cross_entropy` are those of
//! a dense model. Every rank can then run the same deterministic decoding loop on identical logits.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use glm_model::Config;
use glm_nn::linear::linear_nd;
use glm_nn::{Linear, LinearFactory, LinearSpec, ParallelRole, VocabTable, IGNORE_INDEX};

use crate::maps::{copy_to, gather_from, reduce_from};
use crate::registry::Group;
use crate::{Error, ReduceOp, Result};

/// Builds rank `group.rank()`'s layers from its shards; `inner` makes the local linears (dense, or
/// glm-quant's `QuantFactory` over the rank's exact slices of the quantized weights).
pub struct TpFactory {
    group: Group,
    inner: Box<dyn LinearFactory>,
    /// The head all-gathers its logits: full `[.., V]` on every rank (inference).
    gather_logits: bool,
}

impl TpFactory {
    /// Checks that `cfg` splits `group.size()` ways (whole heads, vocabulary rows, FFN columns).
    /// The head returns this rank's vocabulary columns (training: vocab-parallel cross entropy).
    pub fn new(cfg: &Config, group: Group, inner: Box<dyn LinearFactory>) -> Result<Self> {
        crate::split::check_tp(cfg, group.size())?;
        Ok(Self { group, inner, gather_logits: false })
    }

    /// `new`, with the head's logits all-gathered over the group: every rank gets the full
    /// `[.., V]` (the same bits on each), and the model's `vocab_rows` and `cross_entropy` are a
    /// dense model's. One all-gather of `V/tp` values per scored position, where training's loss
    /// needs three all-reduces of one value; decoding reads one position per step.
    pub fn for_inference(cfg: &Config, group: Group, inner: Box<dyn LinearFactory>) -> Result<Self> {
        Ok(Self { gather_logits: true, ..Self::new(cfg, group, inner)? })
    }

    /// Whether the head gathers its logits (see [`TpFactory::for_inference`]).
    pub fn gathers_logits(&self) -> bool {
        self.gather_logits
    }
}

fn split_error(spec: &LinearSpec, what: &str, len: usize, n: usize) -> candle_core::Error {
    Error::Layout(format!("{}: {len} {what} cannot be split {n} ways", spec.name)).into()
}

impl LinearFactory for TpFactory {
    fn make(&self, vb: &VarBuilder, spec: LinearSpec) -> candle_core::Result<Box<dyn Linear>> {
        let n = self.group.size();
        match spec.role {
            ParallelRole::Column { chunks } => {
                let chunks = chunks.max(1);
                if !spec.out_dim.is_multiple_of(n * chunks) {
                    let what = if chunks == 1 {
                        "output features".to_string()
                    } else {
                        format!("output features in each of its {chunks} parts")
                    };
                    return Err(split_error(&spec, &what, spec.out_dim / chunks, n));
                }
                let local = self.inner.make(vb, LinearSpec { out_dim: spec.out_dim / n, ..spec })?;
                Ok(Box::new(ColumnParallel { local, group: self.group }))
            }
            ParallelRole::Row => {
                if !spec.in_dim.is_multiple_of(n) {
                    return Err(split_error(&spec, "input features", spec.in_dim, n));
                }
                let local = self.inner.make(vb, LinearSpec { in_dim: spec.in_dim / n, bias: false, ..spec })?;
                // The bias is whole on every rank and added once, after the reduction.
                let bias = if spec.bias { Some(vb.pp(spec.name).get(spec.out_dim, "bias")?) } else { None };
                Ok(Box::new(RowParallel { local, bias, group: self.group }))
            }
            ParallelRole::Replicated => self.inner.make(vb, spec),
        }
    }

    fn vocab(
        &self,
        vb: &VarBuilder,
        name: &str,
        vocab: usize,
        hidden: usize,
    ) -> candle_core::Result<Arc<dyn VocabTable>> {
        let n = self.group.size();
        if !vocab.is_multiple_of(n) {
            return Err(Error::Layout(format!("{name}: a vocabulary of {vocab} cannot be split {n} ways")).into());
        }
        let per = vocab / n;
        let weight = vb.pp(name).get((per, hidden), "weight")?;
        let start = self.group.rank() * per;
        Ok(Arc::new(VocabParallel {
            weight,
            start,
            end: start + per,
            total: vocab,
            group: self.group,
            gather: self.gather_logits,
        }))
    }

    fn tp(&self) -> (usize, usize) {
        (self.group.rank(), self.group.size())
    }
}

/// Y_r = X W_rᵀ + b_r: this rank's output features.
struct ColumnParallel {
    local: Box<dyn Linear>,
    group: Group,
}

impl Module for ColumnParallel {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.local.forward(&copy_to(x, self.group)?)
    }
}

/// Y = Σ_r X_r W_rᵀ + b.
struct RowParallel {
    local: Box<dyn Linear>,
    bias: Option<Tensor>,
    group: Group,
}

impl Module for RowParallel {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = reduce_from(&self.local.forward(x)?, self.group)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Vocabulary rows start..end of `total` (Megatron's `VocabParallelEmbedding` and the tied head).
/// With `gather`, the logits are all-gathered into the full vocabulary (inference).
struct VocabParallel {
    weight: Tensor, // (V/tp, H)
    start: usize,
    end: usize,
    total: usize,
    group: Group,
    gather: bool,
}

impl VocabParallel {
    /// Ids local to this rank's rows (0 where outside) and a (N, 1) f32 mask of those inside.
    fn local_ids(&self, ids: &[i64]) -> (Vec<u32>, Vec<f32>) {
        let (mut local, mut inside) = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
        for &id in ids {
            let mine = id >= self.start as i64 && id < self.end as i64;
            local.push(if mine { (id - self.start as i64) as u32 } else { 0 });
            inside.push(if mine { 1.0 } else { 0.0 });
        }
        (local, inside)
    }
}

impl VocabTable for VocabParallel {
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let host: Vec<i64> = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
        let n = host.len();
        let (local, inside) = self.local_ids(&host);
        let dev = self.weight.device();
        let rows = self.weight.index_select(&Tensor::from_vec(local, n, dev)?, 0)?; // (N, H)
        let mask = Tensor::from_vec(inside, (n, 1), dev)?.to_dtype(rows.dtype())?;
        Ok(reduce_from(&rows.broadcast_mul(&mask)?, self.group)?)
    }

    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let local = linear_nd(&copy_to(x, self.group)?, &self.weight, None)?; // (.., V/tp)
        if self.gather {
            // (.., V): the ranks' columns in rank order, which is vocabulary order.
            return Ok(gather_from(&local, self.group)?);
        }
        Ok(local)
    }

    fn rows(&self) -> (usize, usize, usize) {
        if self.gather {
            return (0, self.total, self.total);
        }
        (self.start, self.end, self.total)
    }

    fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn cross_entropy(&self, logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        if self.gather {
            // Full logits on every rank: the dense loss (its gradient reaches each rank's own
            // columns through `gather_from`'s backward).
            return glm_nn::loss::cross_entropy(logits, targets);
        }
        Ok(vocab_parallel_cross_entropy(logits, targets, (self.start, self.end, self.total), self.group)?)
    }
}

/// Mean cross entropy of vocab-parallel logits (.., end - start) against targets (..) over the
/// full vocabulary of `total`, `IGNORE_INDEX` skipped, in f32. Every rank gets the same loss, and
/// backward gives each rank the gradient of its own logits:
///
/// ```text
/// m = max over all ranks (no gradient: a shift)      z = logits - m
/// s = Σ_ranks Σ_local exp(z)                          p = z[target] on the rank holding it, summed
/// loss_row = log s - p
/// ```
pub fn vocab_parallel_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    (start, end, total): (usize, usize, usize),
    group: Group,
) -> Result<Tensor> {
    let v = end - start;
    let z = logits.to_dtype(DType::F32)?.reshape(((), v))?; // (N, V/tp)
    let n = z.dim(0)?;
    let (t, scored) = glm_nn::loss::checked_targets(targets, n, total)?;
    let (mut local, mut inside, mut valid) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for &y in &t {
        let mine = y >= start as i64 && y < end as i64;
        local.push(if mine { (y - start as i64) as u32 } else { 0 });
        inside.push(mine as u8);
        valid.push((y != IGNORE_INDEX) as u8);
    }
    let dev = z.device();
    if scored == 0 {
        return Ok(Tensor::zeros((), DType::F32, dev)?);
    }
    let m = group.with(|c| c.all_reduce(&z.max_keepdim(1)?.detach(), ReduceOp::Max))?; // (N, 1)
    let z = z.broadcast_sub(&m)?;
    let sum_exp = reduce_from(&z.exp()?.sum_keepdim(1)?, group)?; // (N, 1)
    let idx = Tensor::from_vec(local, (n, 1), dev)?;
    // Selected, not multiplied by a 0/1 mask: a -inf logit (a masked vocabulary column) times 0
    // would be NaN.
    let zeros = Tensor::zeros((n, 1), DType::F32, dev)?;
    let picked = Tensor::from_vec(inside, (n, 1), dev)?.where_cond(&z.gather(&idx, 1)?, &zeros)?;
    let picked = reduce_from(&picked, group)?; // (N, 1)
    let rows = (sum_exp.log()? - picked)?;
    let rows = Tensor::from_vec(valid, (n, 1), dev)?.where_cond(&rows, &zeros)?;
    Ok((rows.sum_all()? / scored as f64)?)
}
