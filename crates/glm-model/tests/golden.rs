//! The model against tensors from the official GLM-130B / ChatGLM-6B code (fixtures/golden/README.md).
//! `GLM_GOLDEN_DIR=DIR cargo test --release golden` checks any fixture set in the same format.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, IndexOp, Tensor};
use common::{cases, rel_err};
use glm_model::KvCache;
use glm_nn::{cross_entropy, AttnLayout};

fn check_logits(dtype: DType) -> Result<()> {
    for case in cases()? {
        let model = case.model_in(dtype)?;
        let logits = model.forward(&case.io("input_ids")?, &case.io("position_ids")?, &case.layout()?, None)?;
        let err = rel_err(&logits, &case.io("logits")?)?;
        println!("{} ({dtype:?}): logits rel err {err:.2e}", case.name);
        ensure!(err < 1e-5, "{} ({dtype:?}): logits differ by {err:.3e} (relative)", case.name);
    }
    Ok(())
}

/// Through the fused CPU kernels (f32).
#[test]
fn golden_logits() -> Result<()> {
    check_logits(DType::F32)
}

/// Through the `_ref` twin of every kernel (f64 takes the reference path).
#[test]
fn golden_logits_reference_kernels() -> Result<()> {
    check_logits(DType::F64)
}

#[test]
fn golden_loss_and_grads() -> Result<()> {
    check_loss_and_grads(DType::F32)
}

#[test]
fn golden_loss_and_grads_reference_kernels() -> Result<()> {
    check_loss_and_grads(DType::F64)
}

fn check_loss_and_grads(dtype: DType) -> Result<()> {
    let mut checked = 0;
    for case in cases()? {
        if !case.has_io("targets") {
            continue;
        }
        let (model, vm) = case.trainable(dtype)?;
        let logits = model.forward(&case.io("input_ids")?, &case.io("position_ids")?, &case.layout()?, None)?;
        let loss = cross_entropy(&logits, &case.io("targets")?)?;
        let got = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let want = case.io("loss")?.flatten_all()?.to_vec1::<f32>()?[0] as f64;
        ensure!((got - want).abs() <= 1e-5 * want.abs(), "{}: loss {got} vs {want}", case.name);
        if let Some(m) = case.loss {
            ensure!((got - m).abs() <= 1e-5 * m.abs(), "{}: loss {got} vs manifest {m}", case.name);
        }
        let grads = loss.backward()?;
        let vars = vm.data().lock().map_err(|_| anyhow::anyhow!("lock"))?;
        let mut worst = (0.0f64, String::new());
        for p in glm_model::param_table(&case.cfg) {
            let var = vars.get(&p.name).ok_or_else(|| anyhow::anyhow!("no var {}", p.name))?;
            let g = grads
                .get(var.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("{}: no gradient for {}", case.name, p.name))?;
            let err = rel_err(g, &case.io(&format!("grad.{}", p.name))?)?;
            ensure!(err < 1e-4, "{}: gradient of {} differs by {err:.3e} (relative)", case.name, p.name);
            if err > worst.0 {
                worst = (err, p.name.clone());
            }
            checked += 1;
        }
        println!(
            "{} ({dtype:?}): loss {got:.7} (ref {want:.7}); worst grad rel err {:.2e} ({})",
            case.name, worst.0, worst.1
        );
    }
    ensure!(checked > 0, "no case with targets and gradients");
    Ok(())
}

/// Prefill each row's prefix, then feed one token at a time: the logits of every position must be
/// those of the full forward and of the reference.
#[test]
fn golden_kv_cache_decoding() -> Result<()> {
    for case in cases()? {
        let model = case.model()?;
        let (ids, pos) = (case.io("input_ids")?, case.io("position_ids")?);
        let want = case.io("logits")?;
        let prefix: Vec<i64> = case.io("prefix_len")?.to_vec1()?;
        let t = ids.dim(1)?;
        for (b, &p) in prefix.iter().enumerate() {
            let p = (p as usize).max(1);
            let row = |x: &Tensor| -> Result<Tensor> { Ok(x.narrow(0, b, 1)?) };
            let (ids, pos) = (row(&ids)?, row(&pos)?);
            let layout = AttnLayout::prefix_lm(&[p]);
            let mut cache = KvCache::new(&case.cfg);
            let mut steps = vec![model.forward(
                &ids.narrow(1, 0, p)?,
                &pos.narrow(pos.rank() - 1, 0, p)?,
                &layout,
                Some(&mut cache),
            )?];
            for i in p..t {
                let step = model.forward(
                    &ids.narrow(1, i, 1)?,
                    &pos.narrow(pos.rank() - 1, i, 1)?,
                    &layout,
                    Some(&mut cache),
                )?;
                steps.push(step);
            }
            ensure!(cache.len() == t, "cache holds {} tokens, expected {t}", cache.len());
            let got = Tensor::cat(&steps, 1)?;
            let err = rel_err(&got, &want.i(b..b + 1)?)?;
            println!("{} row {b}: cached decoding rel err {err:.2e}", case.name);
            ensure!(err < 1e-5, "{} row {b}: cached decoding differs by {err:.3e}", case.name);
        }
    }
    Ok(())
}
