//! Rotary position embeddings in the rotate-half (GPT-NeoX) layout, as SwissArmyTransformer has them.
//!
//! The head dim D is cut into `parts` equal chunks, each rotated by its own position stream:
//! GLM-130B uses one chunk over the whole head (1-D RoPE); ChatGLM-6B uses two halves, the first
//! turned by the token position and the second by the block position (2-D RoPE). Within a chunk of
//! width d: inv_freq_i = base^(-2i/d), angle = pos * inv_freq, emb = [angle | angle], and
//! x' = x*cos(emb) + rotate_half(x)*sin(emb) with rotate_half([x1 | x2]) = [-x2 | x1].

use candle_core::{DType, Device, Result, Tensor, D};

#[derive(Debug, Clone)]
pub struct Rope {
    /// [d/2] f32, d = head_dim / parts
    inv_freq: Tensor,
    parts: usize,
}

impl Rope {
    pub fn new(head_dim: usize, parts: usize, base: f64, device: &Device) -> Result<Self> {
        if parts == 0 || !head_dim.is_multiple_of(2 * parts) {
            candle_core::bail!("RoPE needs the head dim ({head_dim}) divisible by 2 x {parts} parts")
        }
        let d = head_dim / parts;
        let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / base.powf(2.0 * i as f64 / d as f64) as f32).collect();
        Ok(Self { inv_freq: Tensor::new(inv, device)?, parts })
    }

    /// The same with each inv_freq rounded to f16, as ChatGLM-6B's Hugging Face code stores them
    /// (`inv_freq.half()`), so its positions turn by exactly its angles.
    pub fn with_f16_inv_freq(self) -> Result<Self> {
        let inv_freq = self.inv_freq.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
        Ok(Self { inv_freq, ..self })
    }

    pub fn parts(&self) -> usize {
        self.parts
    }

    /// cos and sin tables, each [B, 1, T, D], for positions [B, T] (1 part) or [B, parts, T].
    pub fn tables(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let pos = match (positions.rank(), self.parts) {
            (2, 1) => positions.unsqueeze(1)?, // (B, 1, T)
            (3, p) if positions.dim(1)? == p => positions.clone(),
            _ => candle_core::bail!(
                "position ids of shape {:?} do not fit RoPE with {} part(s): expected [B, T] or [B, {}, T]",
                positions.dims(),
                self.parts,
                self.parts
            ),
        };
        let pos = pos.to_dtype(DType::F32)?;
        let mut embs = Vec::with_capacity(self.parts);
        for p in 0..self.parts {
            let angle = pos.narrow(1, p, 1)?.squeeze(1)?.unsqueeze(D::Minus1)?; // (B, T, 1)
            let angle = angle.broadcast_mul(&self.inv_freq)?; // (B, T, d/2)
            embs.push(angle.clone());
            embs.push(angle);
        }
        let emb = Tensor::cat(&embs, D::Minus1)?.unsqueeze(1)?; // (B, 1, T, D)
        Ok((emb.cos()?.to_dtype(dtype)?, emb.sin()?.to_dtype(dtype)?))
    }

    /// Rotate x [B, N, T, D] with tables from `tables` (fused kernel in `kernels::rope`).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        crate::kernels::rope(x, cos, sin, self.parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element-by-element reference on the host.
    fn rope_ref(x: &[f32], pos: &[usize], d_head: usize, parts: usize) -> Vec<f32> {
        let d = d_head / parts;
        let mut out = x.to_vec();
        for p in 0..parts {
            for i in 0..d / 2 {
                let th = pos[p] as f64 * 10000f64.powf(-2.0 * i as f64 / d as f64);
                let (a, b) = (x[p * d + i] as f64, x[p * d + i + d / 2] as f64);
                out[p * d + i] = (a * th.cos() - b * th.sin()) as f32;
                out[p * d + i + d / 2] = (b * th.cos() + a * th.sin()) as f32;
            }
        }
        out
    }

    #[test]
    fn matches_reference_1d_and_2d() -> Result<()> {
        let dev = Device::Cpu;
        for parts in [1usize, 2] {
            let rope = Rope::new(8, parts, 10000.0, &dev)?;
            let x = Tensor::randn(0f32, 1., (1, 1, 1, 8), &dev)?;
            let pos_host = [5usize, 3];
            let pos = if parts == 1 { Tensor::new(&[[5i64]], &dev)? } else { Tensor::new(&[[[5i64], [3]]], &dev)? };
            let (c, s) = rope.tables(&pos, DType::F32)?;
            let y: Vec<f32> = rope.apply(&x, &c, &s)?.flatten_all()?.to_vec1()?;
            let want = rope_ref(&x.flatten_all()?.to_vec1()?, &pos_host, 8, parts);
            for (a, b) in y.iter().zip(want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        assert!(Rope::new(6, 2, 10000.0, &dev).is_err());
        Ok(())
    }
}
