//! The training job's behaviour: the numerics of a step, resume, corruption, monitor, scaler.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use glm_data::{corpus, Batch, Batcher, TokenStream};
use glm_model::{init_weights, Config, TrainOptions};
use glm_train::monitor::Policy;
use glm_train::optim::{AdamW, AdamWConfig};
use glm_train::step::{forward_backward, grad_norms, Params};
use glm_train::{Precision, TrainConfig, Trainer};
use serde_json::Value;

/// A run small enough for a test: 64-token rows, micro-batches of 2, steps of 4 rows.
fn small() -> TrainConfig {
    let mut c = TrainConfig { max_steps: 12, ..Default::default() };
    c.objective.seq_len = 64;
    c.batch.micro_batch = 2;
    c.batch.global = 4;
    c.batch.ramp_start = 2;
    c.batch.ramp_increment = 2;
    c.batch.ramp_samples = 8;
    c.optim.lr = 3e-3;
    c.optim.warmup_samples = 8;
    c.optim.decay_samples = 48;
    c.eval.every = 0;
    c.eval.rows = 4;
    c.checkpoint.every = 4;
    c.checkpoint.keep = 3;
    c
}

use glm_train::testing::opts;

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn losses(out: &Path) -> Vec<(u64, u32)> {
    jsonl(&out.join("metrics.jsonl"))
        .iter()
        .map(|v| (v["step"].as_u64().unwrap_or(0), (v["loss"].as_f64().unwrap_or(f64::NAN) as f32).to_bits()))
        .collect()
}

/// A batcher over the embedded corpus, for the numerics tests.
fn batches(n: usize, rows: usize, seq: usize) -> Result<Vec<Batch>> {
    let tok = glm_tokenizer::Tokenizer::default_glm()?;
    let shard = corpus::shard(&tok, "test", corpus::Split::Heldout)?;
    let cfg = glm_data::ObjectiveConfig { seq_len: seq, mip_token_share: 0.0, ..Default::default() };
    let stream = TokenStream::new(vec![shard], glm_data::eod_id(&tok)?, 3, 0, 1)?;
    let mut b = Batcher::new(cfg, glm_data::objective_ids(&tok)?, stream, None, 3, 0)?;
    Ok((0..n).map(|_| b.next_batch(rows)).collect())
}

fn setup(seed: u64) -> Result<(Config, Params)> {
    let cfg = Config::tiny();
    let w = init_weights(&cfg, seed, &Device::Cpu)?;
    Ok((cfg.clone(), Params::new(&cfg, &w, DType::F32, &Device::Cpu)?))
}

const NO_DROPOUT: TrainOptions = TrainOptions { hidden_dropout: 0.0, attention_dropout: 0.0, egs_alpha: 1.0, seed: 0 };

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
}

#[test]
fn accumulating_micro_batches_equals_one_big_batch() -> Result<()> {
    let (cfg, params) = setup(1)?;
    let model = params.model(&cfg, None)?;
    let big = batches(1, 4, 64)?;
    let micro: Vec<Batch> =
        big[0].rows.chunks(1).map(|r| Batch { rows: r.to_vec(), seq_len: big[0].seq_len }).collect();
    let a = forward_backward(&model, &params, &big, &NO_DROPOUT, 1.0, None, (0, 1))?;
    let b = forward_backward(&model, &params, &micro, &NO_DROPOUT, 1.0, None, (0, 1))?;
    assert!((a.loss - b.loss).abs() < 1e-5 * a.loss, "{} vs {}", a.loss, b.loss);
    assert_eq!(a.scored, b.scored);
    for (name, (ga, gb)) in params.names.iter().zip(a.grads.iter().zip(&b.grads)) {
        let e = max_rel(gb, ga)?;
        assert!(e < 1e-4, "{name}: accumulated gradient differs by {e}");
    }
    Ok(())
}

#[test]
fn egs_keeps_the_forward_and_scales_only_the_embedding_gradient() -> Result<()> {
    let (cfg, params) = setup(2)?;
    let model = params.model(&cfg, None)?;
    let b = batches(1, 2, 64)?;
    let run = |alpha: f64| {
        forward_backward(&model, &params, &b, &TrainOptions { egs_alpha: alpha, ..NO_DROPOUT }, 1.0, None, (0, 1))
    };
    let (g1, g03, g0) = (run(1.0)?, run(0.3)?, run(0.0)?);
    assert_eq!(g1.loss, g03.loss, "EGS changed the forward");
    for (i, name) in params.names.iter().enumerate() {
        if name.contains("word_embeddings") {
            // Tied head: the gradient is head part H + alpha * input part I. alpha = 0 gives H.
            let want = ((&g1.grads[i] - &g0.grads[i])? * 0.3)?;
            let got = (&g03.grads[i] - &g0.grads[i])?;
            let e = max_rel(&got, &want)?;
            assert!(e < 1e-3, "embedding gradient not scaled by alpha: {e}");
            assert!(want.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        } else {
            let e = max_rel(&g03.grads[i], &g1.grads[i])?;
            assert!(e < 1e-5, "{name} gradient changed under EGS by {e}");
        }
    }
    Ok(())
}

/// One whole step (clipping, decay groups, bias corrections) against AdamW computed by hand in f64.
#[test]
fn one_step_matches_a_hand_computed_adamw_update() -> Result<()> {
    let (cfg, params) = setup(3)?;
    let model = params.model(&cfg, None)?;
    let before: Vec<Vec<f32>> =
        params.master.iter().map(|v| v.flatten_all()?.to_vec1::<f32>()).collect::<candle_core::Result<_>>()?;
    let g = forward_backward(&model, &params, &batches(1, 2, 64)?, &NO_DROPOUT, 1.0, None, (0, 1))?;
    let (norm, _) = grad_norms(&g.grads, &params, 1.0)?;
    let clip = 0.5; // below the norm, so the clip coefficient is exercised
    assert!(norm > clip, "{norm}");
    let coef = clip / (norm + 1e-6);
    let (lr, wd, b1, b2, eps) = (1e-3, 0.1, 0.9, 0.95, 1e-8);
    let mut opt = AdamW::new(AdamWConfig { beta1: b1, beta2: b2, eps, weight_decay: wd }, &params.master, true)?;
    opt.step(&params.master, &g.grads, &params.decay, lr, coef)?;
    #[allow(clippy::needless_range_loop)]
    for i in 0..params.names.len() {
        let grad = g.grads[i].flatten_all()?.to_vec1::<f32>()?;
        let after = params.master[i].flatten_all()?.to_vec1::<f32>()?;
        for j in (0..grad.len()).step_by(97) {
            let (p, gr) = (before[i][j] as f64, grad[j] as f64 * coef);
            let p = if params.decay[i] { p - lr * wd * p } else { p };
            let (m, v) = ((1.0 - b1) * gr / (1.0 - b1), (1.0 - b2) * gr * gr / (1.0 - b2));
            let want = p - lr * m / (v.sqrt() + eps);
            assert!((after[j] as f64 - want).abs() < 1e-6, "{}[{j}]: {} vs {want}", params.names[i], after[j]);
        }
    }
    // Biases and LayerNorms are not decayed, the rest is.
    for (name, d) in params.names.iter().zip(&params.decay) {
        assert_eq!(*d, !(name.ends_with("bias") || name.contains("layernorm")), "{name}");
    }
    Ok(())
}

#[test]
fn tiny_model_overfits_a_fixed_batch() -> Result<()> {
    let (cfg, params) = setup(4)?;
    let model = params.model(&cfg, None)?;
    let b = batches(1, 2, 64)?;
    let adam = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = AdamW::new(adam, &params.master, true)?;
    let mut first = None;
    let mut last = f64::NAN;
    for _ in 0..80 {
        let g = forward_backward(&model, &params, &b, &NO_DROPOUT, 1.0, None, (0, 1))?;
        first.get_or_insert(g.loss);
        last = g.loss;
        opt.step(&params.master, &g.grads, &params.decay, 3e-3, 1.0)?;
    }
    assert!(last < 0.5, "loss {:?} -> {last}: the model did not memorize one batch", first);
    Ok(())
}

#[test]
fn resume_is_bit_exact() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    Trainer::new(small(), opts(&straight, false, None))?.run()?;
    let s = Trainer::new(small(), opts(&split, false, Some(5)))?.run()?;
    assert_eq!(s.step, 5);
    let r = Trainer::new(small(), opts(&split, true, None))?.run()?;
    assert_eq!(r.resumed_from, Some(5));
    let (a, b) = (losses(&straight), losses(&split));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "losses of 12 straight steps and 5 + resume + 7 differ");
    // The final weights are identical too.
    let w = |d: &Path| std::fs::read(d.join("checkpoints/step-00000012/model.safetensors"));
    assert!(w(&straight)? == w(&split)?, "final weights differ");
    Ok(())
}

#[test]
fn corrupt_checkpoints_are_refused_and_the_previous_one_used() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base");
    Trainer::new(small(), opts(&base, false, Some(8)))?.run()?; // checkpoints at 4 and 8
    let mut seed = 0x1234_5678u64;
    for file in ["model.safetensors", "optimizer.safetensors", "state.json", "manifest.json"] {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let run = dir.path().join(format!("cut-{file}"));
        copy_dir(&base, &run)?;
        let p = run.join("checkpoints/step-00000008").join(file);
        let len = std::fs::metadata(&p)?.len();
        let cut = (seed >> 33) % len; // a random offset inside the file
        std::fs::OpenOptions::new().write(true).open(&p)?.set_len(cut)?;
        let mut t = Trainer::new(small(), opts(&run, true, Some(9)))?;
        assert_eq!(t.state().step, 4, "{file} cut at {cut}: the corrupt step-8 checkpoint was used");
        let s = t.run()?;
        assert_eq!((s.resumed_from, s.step), (Some(4), 9));
        let events = jsonl(&run.join("events.jsonl"));
        let e = events.iter().find(|e| e["kind"] == "corrupt_checkpoint");
        // Found while resuming at step 4; the refused checkpoint is step 8's.
        assert!(e.is_some_and(|e| e["step"] == 4 && e["checkpoint_step"] == 8), "{file}: reported as {e:?}");
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

#[test]
fn a_different_architecture_is_refused_on_resume() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    Trainer::new(small(), opts(&out, false, Some(4)))?.run()?;
    let mut other = Config::tiny();
    other.num_layers = 2;
    let path = dir.path().join("two-layers.json");
    other.save(&path)?;
    let mut cfg = small();
    cfg.model_config = Some(path);
    let err = Trainer::new(cfg, opts(&out, true, None)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("different architecture") && err.contains("num_layers"), "{err}");
    // Without --resume an existing run is never overwritten.
    let err = Trainer::new(small(), opts(&out, false, None)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("--resume"), "{err}");
    Ok(())
}

#[test]
fn a_loss_spike_rolls_back_skips_data_and_shrinks_egs_and_lr() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("spike");
    let mut cfg = small();
    cfg.max_steps = 16;
    cfg.monitor.min_history = 4;
    cfg.monitor.skip_steps = 3;
    cfg.faults.spike_at = vec![10];
    cfg.faults.spike_factor = 20.0;
    let s = Trainer::new(cfg, opts(&out, false, None))?.run()?;
    assert_eq!(s.step, 16);
    assert_eq!(s.interventions, 1);
    let events = jsonl(&out.join("events.jsonl"));
    let rb =
        events.iter().find(|e| e["action"] == "rollback").ok_or_else(|| anyhow::anyhow!("no rollback: {events:?}"))?;
    assert_eq!(rb["step"], 10);
    assert_eq!(rb["to_step"], 8);
    assert_eq!(rb["skip"], serde_json::json!([8, 10]));
    assert_eq!(rb["egs_alpha"].as_f64(), Some(0.05));
    let skipped: Vec<u64> =
        events.iter().filter(|e| e["kind"] == "skipped_data").filter_map(|e| e["step"].as_u64()).collect();
    assert_eq!(skipped, vec![9, 10]); // step 8 was already done before the checkpoint
    let m = jsonl(&out.join("metrics.jsonl"));
    let steps: Vec<u64> = m.iter().filter_map(|v| v["step"].as_u64()).collect();
    assert_eq!(steps.iter().filter(|&&s| s == 11).count(), 1, "steps after the rollback are logged once");
    assert!(m.iter().all(|v| v["loss"].as_f64().is_some_and(|l| l < 20.0)), "the spiked step stayed in the log");
    Ok(())
}

#[test]
fn a_nan_is_skipped_and_training_continues() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("nan");
    let mut cfg = small();
    cfg.max_steps = 8;
    cfg.monitor.on_nan = Policy::Skip;
    cfg.faults.nan_at = vec![3];
    let s = Trainer::new(cfg, opts(&out, false, None))?.run()?;
    assert_eq!((s.step, s.interventions), (8, 1));
    assert!(s.train_loss.is_finite());
    let m = jsonl(&out.join("metrics.jsonl"));
    assert_eq!(m[2]["skipped"], true);
    assert!(m[7]["loss"].as_f64().is_some_and(f64::is_finite));
    let events = jsonl(&out.join("events.jsonl"));
    assert!(events.iter().any(|e| e["action"] == "skip" && e["step"] == 3), "{events:?}");
    Ok(())
}

#[test]
fn f16_overflows_skip_steps_and_the_scale_halves_after_the_hysteresis() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("f16");
    let mut cfg = small();
    cfg.max_steps = 6;
    cfg.precision = Precision::F16;
    cfg.scaler.window = 2;
    cfg.faults.inf_grad_at = vec![2, 3];
    let s = Trainer::new(cfg, opts(&out, false, None))?.run()?;
    assert_eq!(s.step, 6);
    let m = jsonl(&out.join("metrics.jsonl"));
    let scale: Vec<f64> = m.iter().filter_map(|v| v["loss_scale"].as_f64()).collect();
    let skipped: Vec<bool> = m.iter().filter_map(|v| v["skipped"].as_bool()).collect();
    // Step 1 clean; 2: overflow uses the hysteresis; 3: overflow halves; 4, 5: two clean steps double it.
    assert_eq!(skipped, vec![false, true, true, false, false, false]);
    assert_eq!(scale, vec![65536.0, 65536.0, 32768.0, 32768.0, 65536.0, 65536.0]);
    assert!(m.iter().all(|v| v["loss"].as_f64().is_some_and(f64::is_finite)));
    Ok(())
}

#[test]
fn training_checkpoints_load_for_inference() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("run");
    let s = Trainer::new(small(), opts(&out, false, Some(2)))?.run()?;
    let ck = s.checkpoint.ok_or_else(|| anyhow::anyhow!("no checkpoint"))?;
    let c = glm_checkpoint::Checkpoint::open(&[ck.join("model.safetensors")])?;
    let m = glm_model::Glm::from_checkpoint(&Config::tiny(), &c, DType::F32, &Device::Cpu, &glm_nn::DenseFactory)?;
    let _ = HashMap::<String, Tensor>::new();
    assert_eq!(m.config().num_layers, 4);
    Ok(())
}

#[test]
fn logits_of_selected_rows_equal_the_full_forward() -> Result<()> {
    let (cfg, params) = setup(5)?;
    let model = params.model(&cfg, None)?;
    let b = &batches(1, 2, 64)?[0];
    let (ids, pos, _, layout) = b.tensors(&Device::Cpu)?;
    let full = model.forward(&ids, &pos, &layout, None)?.reshape((2 * 64, ()))?;
    let rows = Tensor::new(&[0u32, 5, 63, 64, 127], &Device::Cpu)?;
    let some = model.forward_train(&ids, &pos, &layout, &NO_DROPOUT, Some(&rows))?;
    assert!(max_rel(&some, &full.index_select(&rows, 0)?)? < 1e-6);
    Ok(())
}
