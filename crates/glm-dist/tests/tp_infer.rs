//! `TpFactory::for_inference`: the head all-gathers its logits, so a tensor-parallel model returns
//! the full vocabulary on every rank (the same bits on each), the dense model's logits, and its
//! `vocab_rows` and `cross_entropy` are a dense model's (the loss's gradients, reaching each rank's
//! shards through the gather's backward, are the dense ones too).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use glm_dist::split::{merge, shard, split_of};
use glm_dist::{Group, LocalComm, TpFactory};
use glm_model::{init_weights, Config, FfnKind, Glm, PositionEncoding};
use glm_nn::{AttnLayout, DenseFactory};

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure!(a.dims() == b.dims(), "shape {:?} vs {:?}", a.dims(), b.dims());
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(d / b.to_dtype(DType::F64)?.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30))
}

/// tiny, and a ChatGLM-style variant (2-D RoPE, tanh-GELU MLP, untied head: a second gathered head).
fn configs() -> [Config; 2] {
    let chat = Config {
        name: "tiny-2d".into(),
        position_encoding: PositionEncoding::Rope2d,
        ffn: FfnKind::GeluTanh,
        tie_word_embeddings: false,
        ..Config::tiny()
    };
    [Config::tiny(), chat]
}

/// Two rows of different prefix lengths; 2-D positions for ChatGLM's layout.
fn inputs(cfg: &Config) -> Result<(Tensor, Tensor, AttnLayout, Tensor)> {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 900, 17, 4000, 23, 8129, 8132, 77], [31, 2, 7000, 8, 99, 8129, 8132, 12]], &dev)?;
    let pos: Vec<u32> = (0..8).collect();
    let pos = match cfg.position_encoding {
        PositionEncoding::Rope2d => {
            let block: Vec<u32> = (0..8).map(|i| if i < 6 { 0 } else { i - 5 }).collect();
            let row = Tensor::stack(&[Tensor::new(&pos[..], &dev)?, Tensor::new(&block[..], &dev)?], 0)?;
            Tensor::stack(&[&row, &row], 0)? // (2, 2, 8)
        }
        _ => Tensor::stack(&[Tensor::new(&pos[..], &dev)?, Tensor::new(&pos[..], &dev)?], 0)?, // (2, 8)
    };
    let layout = AttnLayout::prefix_lm(&[6, 4]);
    let targets = Tensor::new(&[[900i64, 17, 4000, 23, -100, 8132, 77, 3], [2, 7000, 8, 99, 8129, -100, 12, 1]], &dev)?;
    Ok((ids, pos, layout, targets))
}

#[test]
fn gathered_logits_are_the_dense_models_on_every_rank() -> Result<()> {
    let dev = Device::Cpu;
    for cfg in configs() {
        let full = init_weights(&cfg, 7, &dev)?;
        let (ids, pos, layout, targets) = inputs(&cfg)?;
        // The dense model: logits, loss, and the gradients of the embedding and a QKV weight.
        let vars: HashMap<String, Var> =
            full.iter().map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?))).collect::<Result<_>>()?;
        let vb = |vars: &HashMap<String, Var>| {
            let map = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
            VarBuilder::from_tensors(map, DType::F32, &dev)
        };
        let dense = Glm::new(&cfg, vb(&vars), &DenseFactory)?;
        let want = dense.forward(&ids, &pos, &layout, None)?;
        let want_loss = dense.cross_entropy(&want, &targets)?;
        let grads = want_loss.backward()?;
        let watched = ["transformer.word_embeddings.weight", "transformer.layers.1.attention.query_key_value.weight"];
        let want_grads: Vec<Tensor> = watched
            .iter()
            .map(|n| grads.get(vars[*n].as_tensor()).cloned().ok_or_else(|| anyhow::anyhow!("no gradient for {n}")))
            .collect::<Result<_>>()?;
        let v = cfg.vocab_size;

        for tp in [2, 4] {
            let ranks = LocalComm::run(tp, Duration::from_secs(60), |comm| {
                let g = Group::register(comm);
                let vars: HashMap<String, Var> = full
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), Var::from_tensor(&shard(t, split_of(&cfg, k), tp, g.rank())?)?)))
                    .collect::<glm_dist::Result<_>>()?;
                let f = TpFactory::for_inference(&cfg, g, Box::new(DenseFactory))?;
                assert!(f.gathers_logits());
                let model = Glm::new(&cfg, vb(&vars), &f)?;
                let logits = model.forward(&ids, &pos, &layout, None)?;
                // The scoring path: a few positions' logits, also gathered.
                let rows = Tensor::new(&[1u32, 9, 15], &dev)?;
                let at = model.forward_at(&ids, &pos, &layout, &rows)?;
                let loss = model.cross_entropy(&logits, &targets)?;
                let grads = loss.backward()?;
                let g_of = |n: &str| {
                    grads
                        .get(vars[n].as_tensor())
                        .cloned()
                        .ok_or_else(|| glm_dist::Error::Comm(format!("rank {}: no gradient for {n}", g.rank())))
                };
                let gs = watched.iter().map(|n| g_of(n)).collect::<glm_dist::Result<Vec<_>>>()?;
                Ok((logits, at, model.vocab_rows(), loss.to_scalar::<f32>()?, gs))
            })?;
            for (k, (logits, at, rows, loss, _)) in ranks.iter().enumerate() {
                let what = format!("{} tp {tp} rank {k}", cfg.name);
                ensure!(*rows == (0, v, v), "{what}: vocab_rows {rows:?}, a dense model's is (0, {v}, {v})");
                let err = rel_err(logits, &want)?;
                ensure!(err < 1e-5, "{what}: logits differ from the dense model's by {err:.2e}");
                let picked = want.flatten_to(1)?.index_select(&Tensor::new(&[1u32, 9, 15], &dev)?, 0)?;
                ensure!(rel_err(at, &picked)? < 1e-5, "{what}: forward_at's logits differ");
                let same = (logits - &ranks[0].0)?.abs()?.max_all()?.to_scalar::<f32>()?;
                ensure!(same == 0.0, "{what}: logits differ from rank 0's by {same:e} (must be the same bits)");
                let want_loss = want_loss.to_scalar::<f32>()?;
                ensure!((loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "{what}: loss {loss} vs {want_loss}");
            }
            for (i, name) in watched.iter().enumerate() {
                let parts: Vec<Tensor> = ranks.iter().map(|r| r.4[i].clone()).collect();
                let merged = merge(&parts, split_of(&cfg, name))?;
                let err = rel_err(&merged, &want_grads[i])?;
                ensure!(err < 1e-4, "{} tp {tp}: gradient of {name} (merged) differs by {err:.2e}", cfg.name);
            }
            println!("{} tp {tp}: gathered logits, loss and gradients are the dense model's", cfg.name);
        }
    }
    Ok(())
}
