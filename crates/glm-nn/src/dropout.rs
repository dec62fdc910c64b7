//! Dropout whose mask is a pure function of (seed, element index): a counter-based hash instead of a
//! generator's state. The same seed drops the same elements in the forward and in the backward pass
//! (which is dropout applied to the gradient), on every thread count, and after a resume: the only
//! "RNG state" a training run has to store is its seed and step.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// splitmix64 of `seed + i * golden`: a well-mixed 64-bit value per element.
#[inline(always)]
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of one dropout site: a run seed mixed with any number of counters (step, micro-batch,
/// layer, site), so that sites never share masks.
pub fn site_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0x5EED_D80B_u64, |acc, &p| mix(acc, p))
}

/// Keep element i when its hash is at or above p * 2^32.
#[inline(always)]
fn threshold(p: f32) -> u64 {
    ((p as f64) * 4_294_967_296.0) as u64
}

/// Which heads of the full attention a tensor (B, n, ..) holds: heads `offset..offset + n` of
/// `total`. Under tensor parallelism a rank holds a block of the heads, and its mask must be the
/// single process's mask of those heads: the mask is a function of the element's index in the
/// full (B, total, ..) tensor, never of the rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSlice {
    pub offset: usize,
    pub total: usize,
}

/// How a local element index maps to its index in the full tensor.
#[derive(Debug, Clone, Copy)]
struct IndexMap {
    /// Elements per head (everything after the head dim).
    inner: u64,
    /// Heads held.
    local: u64,
    offset: u64,
    total: u64,
}

impl IndexMap {
    fn new(x: &Tensor, heads: Option<HeadSlice>) -> Result<Option<Self>> {
        let Some(h) = heads else { return Ok(None) };
        let (b, n) = (x.dim(0)?, x.dim(1)?);
        if h.offset + n > h.total {
            candle_core::bail!("dropout: heads {}..{} of {} do not exist", h.offset, h.offset + n, h.total)
        }
        let inner = (x.elem_count() / (b * n).max(1)) as u64;
        Ok(Some(Self { inner, local: n as u64, offset: h.offset as u64, total: h.total as u64 }))
    }

    #[inline(always)]
    fn global(m: Option<Self>, i: u64) -> u64 {
        match m {
            None => i,
            Some(m) => {
                let (blk, rest) = (i / m.inner, i % m.inner);
                ((blk / m.local) * m.total + m.offset + blk % m.local) * m.inner + rest
            }
        }
    }
}

/// The kept-and-scaled factor of each element: 0 or 1 / (1 - p).
pub fn dropout_mask(n: usize, p: f32, seed: u64) -> Vec<f32> {
    mapped_mask(n, p, seed, None)
}

fn mapped_mask(n: usize, p: f32, seed: u64, map: Option<IndexMap>) -> Vec<f32> {
    let (t, scale) = (threshold(p), 1.0 / (1.0 - p));
    (0..n as u64).map(|i| if mix(seed, IndexMap::global(map, i)) >> 32 >= t { scale } else { 0.0 }).collect()
}

/// Inverted dropout with drop probability `p` in [0, 1): y = x * mask / (1 - p). `p == 0` returns x.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    dropout_heads(x, p, seed, None)
}

/// `dropout` of x (B, n, ..) holding the heads `heads` of the full tensor: each element dropped
/// as the same element of the full tensor would be.
pub fn dropout_heads(x: &Tensor, p: f32, seed: u64, heads: Option<HeadSlice>) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability {p} is outside [0, 1)")
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let map = IndexMap::new(x, heads)?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Dropout { p, seed, map })
    } else {
        dropout_heads_ref(x, p, seed, heads)
    }
}

/// The same mask built as a tensor and multiplied in with candle ops (any device and dtype).
pub fn dropout_ref(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    dropout_heads_ref(x, p, seed, None)
}

pub fn dropout_heads_ref(x: &Tensor, p: f32, seed: u64, heads: Option<HeadSlice>) -> Result<Tensor> {
    let map = IndexMap::new(x, heads)?;
    let mask = Tensor::from_vec(mapped_mask(x.elem_count(), p, seed, map), x.shape(), x.device())?;
    x * mask.to_dtype(x.dtype())?
}

struct Dropout {
    p: f32,
    seed: u64,
    map: Option<IndexMap>,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "glm-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::kernels::f32_slice(s, l, self.name())?;
        let (t, scale, seed, map) = (threshold(self.p), 1.0 / (1.0 - self.p), self.seed, self.map);
        const CHUNK: usize = 1 << 14;
        let mut out = crate::kernels::out_buf(x.len());
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).enumerate().for_each(|(c, (o, x))| {
            let base = (c * CHUNK) as u64;
            for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                let i = IndexMap::global(map, base + j as u64);
                *o = if mix(seed, i) >> 32 >= t { x * scale } else { 0.0 };
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// Dropout is linear and diagonal: its gradient is the same mask applied to the gradient.
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let heads = self.map.map(|m| HeadSlice { offset: m.offset as usize, total: m.total as usize });
        Ok(Some(dropout_heads(g, self.p, self.seed, heads)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_matches_reference_and_drops_p() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 33, 65), &Device::Cpu)?)?;
        let seed = site_seed(&[7, 3, 1]);
        let (fast, slow) = (dropout(&x, 0.25, seed)?, dropout_ref(&x, 0.25, seed)?);
        crate::testing::check_twins(&fast, &slow, &[&x], 1e-6, 1e-6)?;
        let zeros = fast.flatten_all()?.to_vec1::<f32>()?.iter().filter(|v| **v == 0.0).count();
        let frac = zeros as f64 / x.elem_count() as f64;
        assert!((frac - 0.25).abs() < 0.02, "{frac}");
        // Another seed, another mask; p = 0 is the identity.
        assert!(max_abs(&fast, &dropout(&x, 0.25, seed + 1)?)? > 0.0);
        assert_eq!(max_abs(&dropout(&x, 0.0, seed)?, &x)?, 0.0);
        assert!(dropout(&x, 1.0, seed).is_err());
        Ok(())
    }

    #[test]
    fn a_block_of_heads_drops_what_the_full_tensor_drops() -> Result<()> {
        // (B, N, T, T) split into two blocks of heads: each block's mask is the full mask's block.
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4, 5, 7), &Device::Cpu)?)?;
        let seed = site_seed(&[1, 2]);
        let full = dropout(&x, 0.3, seed)?;
        for (offset, n) in [(0, 2), (2, 2), (1, 3)] {
            let part = x.narrow(1, offset, n)?;
            let heads = Some(HeadSlice { offset, total: 4 });
            let (fast, slow) = (dropout_heads(&part, 0.3, seed, heads)?, dropout_heads_ref(&part, 0.3, seed, heads)?);
            assert_eq!(max_abs(&fast, &full.narrow(1, offset, n)?)?, 0.0);
            assert_eq!(max_abs(&fast, &slow)?, 0.0);
        }
        assert!(dropout_heads(&x, 0.3, seed, Some(HeadSlice { offset: 1, total: 4 })).is_err());
        Ok(())
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }
}
