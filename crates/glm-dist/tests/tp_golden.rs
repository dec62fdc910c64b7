//! The official GLM-130B / ChatGLM-6B golden fixtures reproduced by a tensor-parallel model: each
//! rank holds its shards (the `split` table's cut), the logits gathered from the ranks, the
//! vocab-parallel loss and every parameter's gradient (merged from the ranks) match the reference.

#[path = "../../glm-model/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{cases, rel_err};
use glm_dist::split::{merge, shard, split_of};
use glm_dist::{maps, Group, LocalComm, TpFactory};
use glm_model::{tensor_specs, Glm};
use glm_nn::DenseFactory;

/// Per rank: (gathered logits, loss, this rank's gradients by name).
type RankOut = (Tensor, f64, HashMap<String, Tensor>);

fn tp_run(case: &common::Case, tp: usize) -> Result<Vec<RankOut>> {
    let full = case.weights.load_all(&tensor_specs(&case.cfg), DType::F32, &Device::Cpu)?;
    let (ids, pos, layout) = (case.io("input_ids")?, case.io("position_ids")?, case.layout()?);
    let targets = if case.has_io("targets") { Some(case.io("targets")?) } else { None };
    let out = LocalComm::run(tp, Duration::from_secs(60), |comm| {
        let group = Group::register(Rc::clone(&comm));
        let mut vars = HashMap::new();
        for (name, t) in &full {
            vars.insert(
                name.clone(),
                candle_core::Var::from_tensor(&shard(t, split_of(&case.cfg, name), tp, group.rank())?)?,
            );
        }
        let map: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let model = Glm::new(&case.cfg, vb, &TpFactory::new(&case.cfg, group, Box::new(DenseFactory))?)?;
        let local = model.forward(&ids, &pos, &layout, None)?;
        let logits = maps::gather_from(&local, group)?;
        let mut g = HashMap::new();
        let Some(targets) = &targets else { return Ok((logits, f64::NAN, g)) };
        let loss = model.cross_entropy(&local, targets)?;
        let grads = loss.backward()?;
        for (name, v) in &vars {
            if let Some(t) = grads.get(v.as_tensor()) {
                g.insert(name.clone(), t.clone());
            }
        }
        Ok((logits, loss.to_scalar::<f32>()? as f64, g))
    })?;
    Ok(out)
}

#[test]
fn golden_fixtures_under_tensor_parallelism() -> Result<()> {
    let mut checked = 0;
    for case in cases()? {
        for tp in [2, 4] {
            if glm_dist::split::check_tp(&case.cfg, tp).is_err() {
                continue;
            }
            let ranks = tp_run(&case, tp)?;
            let want_logits = case.io("logits")?;
            for (r, (logits, _, _)) in ranks.iter().enumerate() {
                let err = rel_err(logits, &want_logits)?;
                ensure!(err < 1e-5, "{} tp {tp} rank {r}: logits differ by {err:.2e}", case.name);
            }
            checked += 1;
            if !case.has_io("targets") {
                println!("{} tp {tp}: logits match (the fixture has no targets)", case.name);
                continue;
            }
            let want_loss = case.io("loss")?.flatten_all()?.to_vec1::<f32>()?[0] as f64;
            for (loss, _) in ranks.iter().map(|(_, l, g)| (l, g)) {
                ensure!(
                    (loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
                    "{} tp {tp}: loss {loss} vs {want_loss}",
                    case.name
                );
            }
            let mut worst = 0f64;
            for p in glm_model::param_table(&case.cfg) {
                let parts = ranks
                    .iter()
                    .map(|(_, _, g)| {
                        g.get(&p.name).cloned().ok_or_else(|| anyhow::anyhow!("no gradient for {}", p.name))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let split = split_of(&case.cfg, &p.name);
                if split == glm_dist::split::Split::Replicated {
                    // Replicated parameters get the same gradient on every rank.
                    for g in &parts[1..] {
                        ensure!(rel_err(g, &parts[0])? < 1e-6, "{}: {} differs between ranks", case.name, p.name);
                    }
                }
                let g = merge(&parts, split)?;
                let err = rel_err(&g, &case.io(&format!("grad.{}", p.name))?)?;
                ensure!(err < 1e-4, "{} tp {tp}: gradient of {} differs by {err:.2e}", case.name, p.name);
                worst = worst.max(err);
            }
            println!("{} tp {tp}: logits, loss and gradients match (worst grad rel err {worst:.2e})", case.name);
        }
    }
    ensure!(checked >= 7, "only {checked} case/degree pairs checked");
    Ok(())
}
