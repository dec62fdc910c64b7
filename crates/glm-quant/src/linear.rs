//! Quantized linear layers behind the model's linear seam: `QuantFactory` hands the model INT8/INT4
//! linears in place of dense ones (the block's four projections; embeddings, LayerNorms and biases
//! stay in floating point, as in GLM-130B). Short inputs (decode, short prompts) run the integer
//! kernels of `QuantMatrix::matmul`; long prompts dequantize weight tiles for sgemm.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use glm_nn::{Linear, LinearFactory, LinearSpec};

use crate::{Bits, QuantMatrix};

/// Where the quantized weights come from.
#[derive(Debug, Clone)]
enum Source {
    /// Quantize each dense weight as the model loads it.
    Quantize(Bits),
    /// Already quantized, by full tensor name (a quantized checkpoint).
    Stored(HashMap<String, Arc<QuantMatrix>>),
}

/// Hands the model quantized linears.
#[derive(Debug, Clone)]
pub struct QuantFactory {
    source: Source,
}

impl QuantFactory {
    /// Quantize the dense weights the `VarBuilder` holds, at load.
    pub fn quantize(bits: Bits) -> Self {
        Self { source: Source::Quantize(bits) }
    }

    /// Use quantized weights by tensor name (`transformer.layers.0.attention.dense.weight`, ...).
    pub fn stored(weights: HashMap<String, Arc<QuantMatrix>>) -> Self {
        Self { source: Source::Stored(weights) }
    }
}

impl LinearFactory for QuantFactory {
    fn make(&self, vb: &VarBuilder, spec: LinearSpec) -> Result<Box<dyn Linear>> {
        let vb = vb.pp(spec.name);
        let w = match &self.source {
            Source::Quantize(bits) => {
                let w = vb.get((spec.out_dim, spec.in_dim), "weight")?.to_dtype(DType::F32)?;
                let q = QuantMatrix::quantize(&w.flatten_all()?.to_vec1::<f32>()?, spec.out_dim, spec.in_dim, *bits)
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", spec.name)))?;
                Arc::new(q)
            }
            Source::Stored(map) => {
                let name = format!("{}.weight", vb.prefix());
                let m = map
                    .get(&name)
                    .ok_or_else(|| candle_core::Error::Msg(format!("the quantized checkpoint has no {name}")))?;
                if (m.rows, m.cols) != (spec.out_dim, spec.in_dim) {
                    candle_core::bail!(
                        "{name} is [{}, {}] in the quantized checkpoint, the model needs [{}, {}]",
                        m.rows,
                        m.cols,
                        spec.out_dim,
                        spec.in_dim
                    )
                }
                m.clone()
            }
        };
        let bias = if spec.bias { Some(vb.get(spec.out_dim, "bias")?) } else { None };
        Ok(Box::new(QuantLinear { w, bias }))
    }
}

/// `x · Wᵀ + b` with a quantized W [out, in].
#[derive(Debug, Clone)]
pub struct QuantLinear {
    w: Arc<QuantMatrix>,
    bias: Option<Tensor>,
}

impl QuantLinear {
    pub fn new(w: QuantMatrix, bias: Option<Tensor>) -> Self {
        Self { w: Arc::new(w), bias }
    }
}

/// From this many tokens on, a product dequantizes weight tiles and runs sgemm (through
/// `glm_nn::linear`); below, the integer kernel of `QuantMatrix::matmul` (one pass over the weights
/// for all tokens). Measured on `base` (2 cores, AVX2): 16 tokens 147-242 prompt tokens/s on the
/// integer kernel against 149-162 on sgemm, 64 tokens 230-247 against 300-325.
const PREFILL_MIN_TOKENS: usize = 32;
/// Weights dequantized at a time on that path (f32 values): bounds the transient memory.
const TILE_VALUES: usize = 1 << 22;

impl QuantLinear {
    /// Prefill: y[:, tile] = x · dequant(W[tile])ᵀ, tile by tile of output rows.
    fn forward_tiled(&self, x: &Tensor) -> Result<Tensor> {
        let w = &self.w;
        let rows_per_tile = (TILE_VALUES / w.cols.max(1)).clamp(1, w.rows.max(1));
        let mut parts = Vec::with_capacity(w.rows.div_ceil(rows_per_tile));
        for r0 in (0..w.rows).step_by(rows_per_tile) {
            let r1 = (r0 + rows_per_tile).min(w.rows);
            let tile = Tensor::from_vec(w.dequantize_rows(r0, r1), (r1 - r0, w.cols), x.device())?;
            parts.push(glm_nn::linear::linear_nd(x, &tile, None)?);
        }
        Tensor::cat(&parts, candle_core::D::Minus1)
    }
}

impl Module for QuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let tokens = x.elem_count() / self.w.cols.max(1);
        let y = if x.device().is_cpu() && tokens >= PREFILL_MIN_TOKENS {
            self.forward_tiled(&x.to_dtype(DType::F32)?)?
        } else if x.device().is_cpu() {
            x.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&QuantMatmul(self.w.clone()))?
        } else {
            quant_matmul_ref(&x.to_dtype(DType::F32)?, &self.w)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => y,
        };
        y.to_dtype(x.dtype())
    }
}

/// The reference: dequantize W to f32, then an ordinary product.
pub fn quant_matmul_ref(x: &Tensor, w: &QuantMatrix) -> Result<Tensor> {
    let dense = Tensor::from_vec(w.dequantize(), (w.rows, w.cols), x.device())?;
    x.broadcast_matmul(&dense.t()?)
}

/// x [.., in] f32 -> [.., out] for fewer than `PREFILL_MIN_TOKENS` tokens: `QuantMatrix::matmul`.
struct QuantMatmul(Arc<QuantMatrix>);

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "glm-quant-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = &self.0;
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("quantized linear: expected contiguous f32 activations"),
        };
        let k = l.dims().last().copied().unwrap_or(0);
        if k != w.cols {
            candle_core::bail!("quantized linear: input has {k} features, the weight {}", w.cols)
        }
        let tokens = x.len() / k.max(1);
        let mut y = vec![0f32; tokens * w.rows];
        w.matmul(x, &mut y).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = w.rows;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}
