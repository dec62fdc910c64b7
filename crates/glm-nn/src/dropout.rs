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

/// The kept-and-scaled factor of each element: 0 or 1 / (1 - p).
pub fn dropout_mask(n: usize, p: f32, seed: u64) -> Vec<f32> {
    let (t, scale) = (threshold(p), 1.0 / (1.0 - p));
    (0..n as u64).map(|i| if mix(seed, i) >> 32 >= t { scale } else { 0.0 }).collect()
}

/// Inverted dropout with drop probability `p` in [0, 1): y = x * mask / (1 - p). `p == 0` returns x.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout probability {p} is outside [0, 1)")
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Dropout { p, seed })
    } else {
        dropout_ref(x, p, seed)
    }
}

/// The same mask built as a tensor and multiplied in with candle ops (any device and dtype).
pub fn dropout_ref(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let mask = Tensor::from_vec(dropout_mask(x.elem_count(), p, seed), x.shape(), x.device())?;
    x * mask.to_dtype(x.dtype())?
}

struct Dropout {
    p: f32,
    seed: u64,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "glm-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::kernels::f32_slice(s, l, self.name())?;
        let (t, scale, seed) = (threshold(self.p), 1.0 / (1.0 - self.p), self.seed);
        const CHUNK: usize = 1 << 14;
        let mut out = crate::kernels::out_buf(x.len());
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).enumerate().for_each(|(c, (o, x))| {
            let base = (c * CHUNK) as u64;
            for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                *o = if mix(seed, base + j as u64) >> 32 >= t { x * scale } else { 0.0 };
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// Dropout is linear and diagonal: its gradient is the same mask applied to the gradient.
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dropout(g, self.p, self.seed)?))
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

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }
}
