//! LayerNorm with weight and bias. Statistics are always taken in f32 (candle's 16-bit CPU
//! reductions accumulate in 16 bits), then the result is cast back to the input dtype. The fused
//! kernel and its reference live in `kernels`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// Loads `{prefix}.weight` and `{prefix}.bias`, both `[dim]`.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self::new(vb.get(dim, "weight")?, vb.get(dim, "bias")?, eps))
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    #[test]
    fn normalizes_rows() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2., 3., 4.], [10., 10., 10., 14.]], &dev)?;
        let ln = LayerNorm::new(Tensor::ones(4, DType::F32, &dev)?, Tensor::zeros(4, DType::F32, &dev)?, 1e-5);
        let y = ln.forward(&x)?;
        let mean = y.mean_keepdim(D::Minus1)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let var: Vec<f32> = y.sqr()?.mean_keepdim(D::Minus1)?.flatten_all()?.to_vec1()?;
        assert!(mean < 1e-6);
        for v in var {
            assert!((v - 1.0).abs() < 1e-4, "{v}");
        }
        Ok(())
    }
}
