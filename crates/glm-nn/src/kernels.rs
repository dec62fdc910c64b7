//! Fused CPU kernels with backward, for the hot paths of training and inference on CPU: the masked
//! attention softmax and LayerNorm. Each has a slow `_ref` twin built from plain candle ops (which
//! runs on every device and dtype) and tests between them. The public functions take the fused path
//! for contiguous-able f32 tensors on the CPU, and the reference otherwise.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// softmax(scores + mask) over the last dim, in f32. scores [B, N, Tq, Tk], mask [B, 1, Tq, Tk]
/// (additive, -inf = blocked, every row with at least one finite entry).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let fused = scores.device().is_cpu()
        && scores.dtype() == DType::F32
        && mask.dtype() == DType::F32
        && scores.rank() == 4
        && mask.rank() == 4
        && mask.dim(1)? == 1
        && mask.dims()[2..] == scores.dims()[2..]
        && mask.dim(0)? == scores.dim(0)?;
    if fused {
        scores
            .contiguous()?
            .apply_op2(&mask.contiguous()?, MaskedSoftmax)
    } else {
        masked_softmax_ref(scores, mask)
    }
}

pub fn masked_softmax_ref(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(
        &scores.to_dtype(DType::F32)?.broadcast_add(mask)?,
        D::Minus1,
    )
}

struct MaskedSoftmax;

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "glm-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (scores, mask) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let (_, n, tq, tk) = l1.shape().dims4()?;
        let mut out = vec![0f32; scores.len()];
        out.par_chunks_mut(tk).enumerate().for_each(|(r, o)| {
            let (b, q) = (r / (n * tq), r % tq);
            let s = &scores[r * tk..(r + 1) * tk];
            let m = &mask[(b * tq + q) * tk..(b * tq + q + 1) * tk];
            let mut max = f32::NEG_INFINITY;
            for ((o, &s), &m) in o.iter_mut().zip(s).zip(m) {
                *o = s + m;
                max = max.max(*o);
            }
            let mut sum = 0f32;
            for o in o.iter_mut() {
                *o = (*o - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _m: &Tensor,
        p: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d scores = p * (g - sum(g * p)); the mask is a constant.
        let dot = (g * p)?.sum_keepdim(D::Minus1)?;
        Ok((Some((g.broadcast_sub(&dot)? * p)?), None))
    }
}

/// LayerNorm over the last dim with weight and bias, statistics in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let fused = x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.dtype() == DType::F32;
    if fused {
        x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNormOp { eps: eps as f32 },
        )
    } else {
        layer_norm_ref(x, weight, bias, eps)
    }
}

pub fn layer_norm_ref(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = y
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?;
    y.to_dtype(dtype)
}

struct LayerNormOp {
    eps: f32,
}

/// (mean, 1/std) of one row.
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "glm-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let (w, b) = (
            f32_slice(s2, l2, self.name())?,
            f32_slice(s3, l3, self.name())?,
        );
        let h = l1.shape().dims().last().copied().unwrap_or(0);
        if w.len() != h || b.len() != h {
            candle_core::bail!(
                "layer norm: weight/bias of size {}/{} for rows of {h}",
                w.len(),
                b.len()
            )
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(o, x)| {
                let (mean, rstd) = row_stats(x, self.eps);
                for i in 0..h {
                    o[i] = (x[i] - mean) * rstd * w[i] + b[i];
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // xhat = (x - mean) * rstd;  dxhat = g * w;
        // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat));  dw = sum g * xhat;  db = sum g.
        let h = w.dim(0)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let gs: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let ws: Vec<f32> = w.to_vec1()?;
        let mut dx = vec![0f32; xs.len()];
        // Per row: dx, and the row's contributions to dw and db, summed afterwards per thread chunk.
        let (dw, db) = dx
            .par_chunks_mut(h)
            .zip(xs.par_chunks(h).zip(gs.par_chunks(h)))
            .fold(
                || (vec![0f32; h], vec![0f32; h]),
                |(mut dw, mut db), (dx, (x, g))| {
                    let (mean, rstd) = row_stats(x, self.eps);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for i in 0..h {
                        let xhat = (x[i] - mean) * rstd;
                        let dxhat = g[i] * ws[i];
                        m1 += dxhat;
                        m2 += dxhat * xhat;
                        dw[i] += g[i] * xhat;
                        db[i] += g[i];
                    }
                    let (m1, m2) = (m1 / h as f32, m2 / h as f32);
                    for i in 0..h {
                        let xhat = (x[i] - mean) * rstd;
                        dx[i] = rstd * (g[i] * ws[i] - m1 - xhat * m2);
                    }
                    (dw, db)
                },
            )
            .reduce(
                || (vec![0f32; h], vec![0f32; h]),
                |(mut a, mut b), (c, d)| {
                    a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
                    b.iter_mut().zip(d).for_each(|(b, d)| *b += d);
                    (a, b)
                },
            );
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, h, dev)?),
            Some(Tensor::from_vec(db, h, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d / b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-30)
    }

    #[test]
    fn masked_softmax_matches_ref_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let layout = crate::AttnLayout::prefix_lm(&[3, 1]);
        let mask = layout.mask(2, 5, 7, &dev)?;
        let s = Var::from_tensor(&Tensor::randn(0f32, 2., (2, 3, 5, 7), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (2, 3, 5, 7), &dev)?;
        let (yf, yr) = (masked_softmax(&s, &mask)?, masked_softmax_ref(&s, &mask)?);
        assert!(max_rel(&yf, &yr) < 1e-6);
        let gf = (yf * &w)?.sum_all()?.backward()?;
        let gr = (yr * &w)?.sum_all()?.backward()?;
        let (a, b) = (
            gf.get(s.as_tensor()).unwrap(),
            gr.get(s.as_tensor()).unwrap(),
        );
        assert!(max_rel(a, b) < 1e-5, "{}", max_rel(a, b));
        Ok(())
    }

    #[test]
    fn layer_norm_matches_ref_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(1f32, 3., (3, 4, 16), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 16, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 16, &dev)?)?;
        let r = Tensor::randn(0f32, 1., (3, 4, 16), &dev)?;
        let yf = layer_norm(&x, &w, &b, 1e-5)?;
        let yr = layer_norm_ref(&x, &w, &b, 1e-5)?;
        assert!(max_rel(&yf, &yr) < 1e-6);
        let gf = (yf * &r)?.sum_all()?.backward()?;
        let gr = (yr * &r)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let (a, c) = (
                gf.get(v.as_tensor()).unwrap(),
                gr.get(v.as_tensor()).unwrap(),
            );
            assert!(max_rel(a, c) < 1e-5, "{}", max_rel(a, c));
        }
        Ok(())
    }
}
