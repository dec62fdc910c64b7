//! A training run split over tensor- and data-parallel ranks computes what one process computes:
//! the same losses and gradient norms at every step and the same weights after it, for GLM-130B-
//! and ChatGLM-style models, with and without ZeRO-1 and dropout. The ranks are threads on the
//! in-process communicator here; `scripts/mpi-tests.sh` runs the same runs as MPI processes.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use glm_dist::split::{merge, split_of};
use glm_dist::{Layout, LocalComm, ParallelGroups};
use glm_model::{Config, FfnKind, PositionEncoding};
use glm_train::dist::Dist;
use glm_train::{RunOptions, TrainConfig, Trainer};
use serde_json::Value;

fn config(arch: &str, dropout: bool, dir: &Path) -> Result<TrainConfig> {
    let mut c = TrainConfig { max_steps: 5, ..Default::default() };
    c.objective.seq_len = 64;
    c.batch.micro_batch = 1;
    c.batch.global = 4;
    c.batch.ramp_start = 4;
    c.batch.ramp_increment = 4;
    c.batch.ramp_samples = 0;
    c.optim.lr = 1e-3;
    // The key bias has a gradient of exactly zero in exact arithmetic (softmax ignores a shift of
    // every score of a row): what is computed is rounding noise, which Adam with eps 1e-8 turns
    // into updates of ±lr that differ between any two summation orders. eps 1e-5 damps updates of
    // noise-sized gradients, so the comparison measures the computation, not Adam's sign of noise.
    c.optim.eps = 1e-5;
    c.optim.warmup_samples = 4;
    c.eval.every = 0;
    c.eval.rows = 2;
    c.checkpoint.every = 0;
    c.regularization.hidden_dropout = if dropout { 0.1 } else { 0.0 };
    c.regularization.attention_dropout = if dropout { 0.1 } else { 0.0 };
    let small = |cfg: Config| Config { num_layers: 2, hidden_size: 64, num_heads: 4, ffn_hidden_size: 128, ..cfg };
    let model = match arch {
        "glm" => small(Config::tiny()),
        _ => Config {
            name: "chatglm-tiny".into(),
            ffn: FfnKind::GeluTanh,
            // The trainer's batches carry 1-D positions: ChatGLM's 2-D RoPE is checked under
            // tensor parallelism by glm-dist's golden test (forward).
            position_encoding: PositionEncoding::Rope1d,
            tie_word_embeddings: false,
            ffn_hidden_size: 256,
            ..small(Config::tiny())
        },
    };
    let path = dir.join(format!("{arch}.json"));
    std::fs::write(&path, serde_json::to_vec(&model)?)?;
    c.model_config = Some(path);
    Ok(c)
}

fn opts(out: &Path) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        resume: false,
        stop_at: None,
        progress: false,
        device: Device::Cpu,
        stop: None,
    }
}

/// (loss, gradient norm of each group: embedding, each layer, final) of each step, from the log.
fn steps(out: &Path) -> Result<Vec<(f64, Vec<f64>)>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| {
            let groups = v["grad_norms"].as_object().map(|m| m.values().filter_map(Value::as_f64).collect());
            (v["loss"].as_f64().unwrap_or(f64::NAN), groups.unwrap_or_default())
        })
        .collect())
}

/// ||a - b|| / ||b||.
fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((d / (b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).max(1e-30)).sqrt())
}

fn single(cfg: &TrainConfig, out: &Path) -> Result<HashMap<String, Tensor>> {
    let mut t = Trainer::new(cfg.clone(), opts(out))?;
    t.run()?;
    Ok(t.weights())
}

/// The run on tp x dp thread ranks: the full weights merged from the ranks.
fn split_run(cfg: &TrainConfig, out: &Path, tp: usize, dp: usize, zero: bool) -> Result<HashMap<String, Tensor>> {
    let layout = Layout::new(tp, 1, dp)?;
    let ranks = LocalComm::run(tp * dp, Duration::from_secs(120), |world| {
        let groups = ParallelGroups::new(Rc::clone(&world), layout)?;
        let mut t = Trainer::with_dist(cfg.clone(), opts(out), Some(Dist::new(groups, zero)))
            .map_err(|e| glm_dist::Error::Comm(e.to_string()))?;
        t.run().map_err(|e| glm_dist::Error::Comm(e.to_string()))?;
        Ok(t.weights())
    })?;
    let model = glm_model::Config::clone(&serde_json::from_slice(&std::fs::read(cfg.model_config.as_ref().unwrap())?)?);
    let mut full = HashMap::new();
    for name in ranks[0].keys() {
        // Ranks are tp-fastest: the first tp ranks are data-parallel replica 0.
        let parts: Vec<Tensor> = ranks[..tp].iter().map(|r| r[name].clone()).collect();
        full.insert(name.clone(), merge(&parts, split_of(&model, name))?);
    }
    Ok(full)
}

fn check(arch: &str, dropout: bool, layouts: &[(usize, usize, bool)]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = config(arch, dropout, dir.path())?;
    let base_out = dir.path().join("single");
    let base = single(&cfg, &base_out)?;
    let want = steps(&base_out)?;
    ensure!(want.len() == 5, "{} steps logged", want.len());
    for &(tp, dp, zero) in layouts {
        let out = dir.path().join(format!("tp{tp}-dp{dp}-zero{zero}"));
        let got_w = split_run(&cfg, &out, tp, dp, zero)?;
        let got = steps(&out)?;
        let what = format!("{arch} dropout={dropout} tp {tp} dp {dp} zero {zero}");
        ensure!(got.len() == want.len(), "{what}: {} steps logged, want {}", got.len(), want.len());
        for (i, ((l, n), (wl, wn))) in got.iter().zip(&want).enumerate() {
            ensure!((l - wl).abs() <= 1e-5 * wl.abs(), "{what}: step {} loss {l} vs {wl}", i + 1);
            ensure!(n.len() == wn.len() && !n.is_empty(), "{what}: step {}: {} gradient groups", i + 1, n.len());
            for (g, w) in n.iter().zip(wn) {
                ensure!((g - w).abs() <= 1e-4 * w.abs(), "{what}: step {} group grad norms {n:?} vs {wn:?}", i + 1);
            }
        }
        let mut worst = 0f64;
        for (name, w) in &base {
            let e = rel(&got_w[name], w)?;
            if std::env::var_os("SHOW").is_some() {
                let d = (&got_w[name] - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
                println!("  {name}: rel {e:.2e} abs {d:.2e}");
            }
            ensure!(e < 1e-5, "{what}: weight {name} differs by {e:.2e}");
            worst = worst.max(e);
        }
        println!("{what}: 5 steps match (worst weight rel err {worst:.1e})");
    }
    Ok(())
}

const LAYOUTS: [(usize, usize, bool); 7] =
    [(2, 1, false), (1, 2, false), (1, 2, true), (2, 2, false), (2, 2, true), (4, 1, false), (1, 4, true)];

#[test]
fn glm130b_style_split_runs_equal_the_single_run() -> Result<()> {
    check("glm", false, &LAYOUTS)
}

#[test]
fn chatglm_style_split_runs_equal_the_single_run() -> Result<()> {
    check("chatglm", false, &LAYOUTS)
}

#[test]
fn dropout_masks_do_not_depend_on_the_layout() -> Result<()> {
    check("glm", true, &[(2, 1, false), (2, 2, true), (1, 4, false), (4, 1, false)])?;
    check("chatglm", true, &[(2, 2, false), (4, 1, true)])
}

fn opts_at(out: &Path, resume: bool, stop_at: Option<u64>) -> RunOptions {
    RunOptions { resume, stop_at, ..opts(out) }
}

/// Runs `cfg` split tp x dp on threads (resuming or stopping as asked): the ranks' weights.
fn run_split(cfg: &TrainConfig, o: &RunOptions, tp: usize, dp: usize, zero: bool) -> Result<Vec<HashMap<String, Tensor>>> {
    let layout = Layout::new(tp, 1, dp)?;
    Ok(LocalComm::run(tp * dp, Duration::from_secs(120), |world| {
        let groups = ParallelGroups::new(Rc::clone(&world), layout)?;
        let as_dist = |e: glm_train::Error| glm_dist::Error::Comm(e.to_string());
        let mut t = Trainer::with_dist(cfg.clone(), o.clone(), Some(Dist::new(groups, zero))).map_err(as_dist)?;
        t.run().map_err(as_dist)?;
        Ok(t.weights())
    })?)
}

fn losses(out: &Path) -> Result<Vec<u64>> {
    Ok(steps(out)?.iter().map(|(l, _)| l.to_bits()).collect())
}

fn same_bits(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> Result<bool> {
    for (k, t) in a {
        let (x, y) = (t.flatten_all()?.to_vec1::<f32>()?, b[k].flatten_all()?.to_vec1::<f32>()?);
        if x.iter().zip(&y).any(|(p, q)| p.to_bits() != q.to_bits()) || x.len() != y.len() {
            return Ok(false);
        }
    }
    Ok(a.len() == b.len())
}

#[test]
fn a_split_run_resumes_bit_exactly_on_its_layout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config("glm", true, dir.path())?;
    cfg.max_steps = 6;
    cfg.checkpoint.every = 3;
    let (a, b) = (dir.path().join("straight"), dir.path().join("resumed"));
    let straight = run_split(&cfg, &opts_at(&a, false, None), 2, 2, true)?;
    run_split(&cfg, &opts_at(&b, false, Some(3)), 2, 2, true)?;
    let resumed = run_split(&cfg, &opts_at(&b, true, None), 2, 2, true)?;
    ensure!(losses(&a)? == losses(&b)?, "losses differ after resuming");
    for (r, (x, y)) in straight.iter().zip(&resumed).enumerate() {
        ensure!(same_bits(x, y)?, "rank {r}: weights differ after resuming");
    }
    Ok(())
}

#[test]
fn reshard_round_trips_bit_for_bit_and_another_degree_resumes_the_run() -> Result<()> {
    use glm_train::ckpt::{Checkpoints, MODEL_FILE, OPTIMIZER_FILE};
    let dir = tempfile::tempdir()?;
    let mut cfg = config("glm", false, dir.path())?;
    cfg.max_steps = 6;
    cfg.checkpoint.every = 3;
    let model: Config = serde_json::from_slice(&std::fs::read(dir.path().join("glm.json"))?)?;
    let single_out = dir.path().join("single");
    Trainer::new(cfg.clone(), opts(&single_out))?.run()?;
    let step3 = single_out.join("checkpoints/step-00000003");
    // TP 1 -> 2 -> 4 -> 1.
    let (t2, t4, t1) = (dir.path().join("tp2"), dir.path().join("tp4"), dir.path().join("tp1"));
    Checkpoints::reshard(&step3, &t2, &model, 2)?;
    Checkpoints::reshard(&t2, &t4, &model, 4)?;
    Checkpoints::reshard(&t4, &t1, &model, 1)?;
    ensure!(glm_train::ckpt::checkpoint_tp(&t4)? == 4 && t4.join("model-tp03-of-04.safetensors").exists());
    for file in [MODEL_FILE, OPTIMIZER_FILE] {
        let (a, b) = (Checkpoints::load_tensors(&step3, file)?, Checkpoints::load_tensors(&t1, file)?);
        ensure!(same_bits(&a, &b)?, "{file} changed over tp 1 -> 2 -> 4 -> 1");
        ensure!(same_bits(&a, &Checkpoints::load_full(&t4, file, &model)?)?, "{file}: the tp 4 shards do not merge back");
    }
    ensure!(Checkpoints::reshard(&step3, &t2, &model, 2).is_err(), "an existing output must be refused");
    ensure!(Checkpoints::reshard(&step3, &dir.path().join("tp3"), &model, 3).is_err(), "4 heads cannot split 3 ways");
    let want = steps(&single_out)?;
    // The TP=2 checkpoint resumed at TP=2, and the TP=1 checkpoint resumed directly at TP=4 x DP=1.
    for (name, ckpt, tp, dp) in [("from-reshard", &t2, 2, 1), ("direct", &step3, 4, 1), ("dp", &t2, 1, 2)] {
        let out = dir.path().join(name);
        std::fs::create_dir_all(out.join("checkpoints"))?;
        copy_dir(ckpt, &out.join("checkpoints/step-00000003"))?;
        run_split(&cfg, &opts_at(&out, true, None), tp, dp, false)?;
        let got = steps(&out)?;
        ensure!(got.len() == 3, "{name}: {} steps after resuming", got.len());
        for (i, ((l, _), (wl, _))) in got.iter().zip(&want[3..]).enumerate() {
            ensure!((l - wl).abs() <= 1e-5 * wl.abs(), "{name}: step {} loss {l} vs the single run's {wl}", i + 4);
        }
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}
