//! Cross entropy with an ignore index, kept outside the model (the model returns logits).

use candle_core::{DType, Result, Tensor};

/// Targets equal to this are not scored (PyTorch's default).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross entropy over the targets that are not `IGNORE_INDEX`, computed in f32.
/// logits [.., V], targets [..] (i64). With no scored target the loss is 0.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(candle_core::D::Minus1)?;
    let logits = logits.reshape(((), v))?;
    let (t, scored) = checked_targets(targets, logits.dim(0)?, v)?;
    if scored == 0 {
        return Tensor::zeros((), DType::F32, logits.device());
    }
    let n = t.len();
    let targets = Tensor::from_vec(t, n, logits.device())?;
    let per_row = crate::kernels::cross_entropy_rows(&logits, &targets, IGNORE_INDEX)?; // (N)
    per_row.sum_all()? / scored as f64
}

/// The targets of `rows` logit rows over a vocabulary of `vocab`, each `IGNORE_INDEX` or a token
/// id, and how many are scored.
pub fn checked_targets(targets: &Tensor, rows: usize, vocab: usize) -> Result<(Vec<i64>, usize)> {
    let t: Vec<i64> = targets.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
    if t.len() != rows {
        candle_core::bail!("cross_entropy: {} targets for {rows} logit rows", t.len())
    }
    let mut scored = 0usize;
    for (i, &y) in t.iter().enumerate() {
        if y == IGNORE_INDEX {
            continue;
        }
        if y < 0 || y as usize >= vocab {
            candle_core::bail!("cross_entropy: target {y} at position {i} is outside the vocabulary (size {vocab})")
        }
        scored += 1;
    }
    Ok((t, scored))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ignores_masked_targets() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[0f32, 0., 0., 0.], [10., 0., 0., 0.]]], &dev)?;
        let t = Tensor::new(&[[2i64, IGNORE_INDEX]], &dev)?;
        let l = cross_entropy(&logits, &t)?.to_scalar::<f32>()?;
        assert!((l - 4f32.ln()).abs() < 1e-6);
        let bad = Tensor::new(&[[7i64, 0]], &dev)?;
        assert!(cross_entropy(&logits, &bad).is_err());
        Ok(())
    }
}
