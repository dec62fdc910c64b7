//! Quantized linears against their reference, and a quantized model against full precision.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use glm_model::{init_weights, Config, Glm};
use glm_nn::{AttnLayout, DenseFactory};
use glm_quant::linear::quant_matmul_ref;
use glm_quant::{Bits, QuantFactory, QuantLinear, QuantMatrix};

fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
}

#[test]
fn quantized_linear_matches_its_reference_for_decode_and_prefill() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (96, 64), &dev)?;
    let b = Tensor::randn(0f32, 1., 96, &dev)?;
    for bits in [Bits::Int8, Bits::Int4] {
        let q = QuantMatrix::quantize(&w.flatten_all()?.to_vec1()?, 96, 64, bits).map_err(candle_core::Error::wrap)?;
        let lin = QuantLinear::new(q.clone(), Some(b.clone()));
        for shape in [(1, 1, 64), (2, 7, 64)] {
            let x = Tensor::randn(0f32, 1., shape, &dev)?;
            let want = quant_matmul_ref(&x, &q)?.broadcast_add(&b)?;
            let e = rel(&lin.forward(&x)?, &want)?;
            assert!(e < 1e-5, "{bits:?} {shape:?}: {e}");
        }
    }
    Ok(())
}

/// Logits of `tiny` (random DeepNorm init) with quantized block linears against f32. Measured:
/// INT8 0.02% and INT4 0.39% of the largest logit; the bounds leave 3x room. (A trained model is
/// issue 5's check.)
#[test]
fn a_quantized_model_stays_close_to_full_precision() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = Config::tiny();
    let w = init_weights(&cfg, 11, &dev).map_err(candle_core::Error::wrap)?;
    let build = |f: &dyn glm_nn::LinearFactory| {
        Glm::new(&cfg, VarBuilder::from_tensors(w.clone(), DType::F32, &dev), f).map_err(candle_core::Error::wrap)
    };
    let ids = Tensor::new(&[[5u32, 900, 17, 4000, 23, 8129, 8132, 77]], &dev)?;
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5, 6, 7]], &dev)?;
    let layout = AttnLayout::prefix_lm(&[6]);
    let dense = build(&DenseFactory)?.forward(&ids, &pos, &layout, None).map_err(candle_core::Error::wrap)?;
    for (bits, bound) in [(Bits::Int8, 6e-4), (Bits::Int4, 0.012)] {
        let m = build(&QuantFactory { bits })?;
        let q = m.forward(&ids, &pos, &layout, None).map_err(candle_core::Error::wrap)?;
        let e = rel(&q, &dense)?;
        eprintln!("{bits:?}: max |logit difference| / max |logit| = {e:.4}");
        assert!(e < bound, "{bits:?}: {e}");
    }
    Ok(())
}
