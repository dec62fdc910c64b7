//! A training run split over tensor- and data-parallel ranks computes what one process computes:
//! the same losses and gradient norms at every step and the same weights after it, for GLM-130B-
//! and ChatGLM-style models, with and without ZeRO-1 and dropout. The ranks are threads on the
//! in-process communicator here; `scripts/mpi-tests.sh` runs the same runs as MPI processes.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use candle_core::Tensor;
use glm_dist::{Layout, LocalComm};
use glm_model::Config;
use glm_train::testing::{compare, config, opts, rank_run, steps, LAYOUTS};
use glm_train::{RunOptions, TrainConfig, Trainer};

fn check(arch: &str, dropout: bool, layouts: &[(usize, usize, bool)]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = config(arch, dropout, dir.path())?;
    let base_out = dir.path().join("single");
    let mut t = Trainer::new(cfg.clone(), opts(&base_out, false, None))?;
    t.run()?;
    let base = t.weights();
    ensure!(steps(&base_out)?.len() == 5);
    for &(tp, dp, zero) in layouts {
        let out = dir.path().join(format!("tp{tp}-dp{dp}-zero{zero}"));
        let got = run_split(&cfg, &opts(&out, false, None), tp, dp, zero)?.swap_remove(0);
        let what = format!("{arch} dropout={dropout} tp {tp} dp {dp} zero {zero}");
        let worst = compare(&what, (&base_out, &base), (&out, &got))?;
        println!("{what}: 5 steps match (worst weight rel err {worst:.1e})");
    }
    Ok(())
}

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

/// Every rank's run of `cfg` split tp x dp on threads (resuming or stopping as `o` says): the
/// full weights of each rank.
fn run_split(
    cfg: &TrainConfig,
    o: &RunOptions,
    tp: usize,
    dp: usize,
    zero: bool,
) -> Result<Vec<HashMap<String, Tensor>>> {
    let layout = Layout::new(tp, 1, dp)?;
    Ok(LocalComm::run(tp * dp, Duration::from_secs(120), |world| {
        rank_run(world, layout, zero, cfg, o).map_err(|e| glm_dist::Error::Comm(e.to_string()))
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
    let straight = run_split(&cfg, &opts(&a, false, None), 2, 2, true)?;
    run_split(&cfg, &opts(&b, false, Some(3)), 2, 2, true)?;
    let resumed = run_split(&cfg, &opts(&b, true, None), 2, 2, true)?;
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
    Trainer::new(cfg.clone(), opts(&single_out, false, None))?.run()?;
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
        ensure!(
            same_bits(&a, &Checkpoints::load_full(&t4, file, &model)?)?,
            "{file}: the tp 4 shards do not merge back"
        );
    }
    ensure!(Checkpoints::reshard(&step3, &t2, &model, 2).is_err(), "an existing output must be refused");
    ensure!(Checkpoints::reshard(&step3, &dir.path().join("tp3"), &model, 3).is_err(), "4 heads cannot split 3 ways");
    let want = steps(&single_out)?;
    // The TP=2 checkpoint resumed at TP=2, and the TP=1 checkpoint resumed directly at TP=4 x DP=1.
    for (name, ckpt, tp, dp) in [("from-reshard", &t2, 2, 1), ("direct", &step3, 4, 1), ("dp", &t2, 1, 2)] {
        let out = dir.path().join(name);
        std::fs::create_dir_all(out.join("checkpoints"))?;
        copy_dir(ckpt, &out.join("checkpoints/step-00000003"))?;
        run_split(&cfg, &opts(&out, true, None), tp, dp, false)?;
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

/// The recipe's decisions under TP x DP with ZeRO-1: f16 with dynamic loss scaling (an injected
/// overflow skips the step and halves the scale on every rank), a NaN skipped, and a loss spike
/// that rolls back to the last checkpoint, skips its data and shrinks EGS alpha and the learning
/// rate — the same events and the same losses as the single process.
#[test]
fn the_recipe_decides_the_same_on_every_rank() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = config("glm", true, dir.path())?;
    cfg.max_steps = 12;
    cfg.precision = glm_train::Precision::F16;
    cfg.scaler.window = 2;
    cfg.scaler.initial = 8.0; // small enough that the 20x spike stays finite in f16
    cfg.checkpoint.every = 4;
    cfg.monitor.min_history = 3;
    cfg.monitor.skip_steps = 2;
    cfg.monitor.on_nan = glm_train::monitor::Policy::Skip;
    cfg.faults.inf_grad_at = vec![2];
    cfg.faults.nan_at = vec![5];
    cfg.faults.spike_at = vec![9];
    cfg.faults.spike_factor = 20.0;
    let single = dir.path().join("single");
    Trainer::new(cfg.clone(), opts(&single, false, None))?.run()?;
    let split = dir.path().join("split");
    run_split(&cfg, &opts(&split, false, None), 2, 2, true)?;
    let events = |out: &Path| -> Result<Vec<String>> {
        let text = std::fs::read_to_string(out.join("events.jsonl"))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|e| format!("{} {} {}", e["step"], e["kind"], e["action"]))
            .collect())
    };
    let want = events(&single)?;
    ensure!(want.iter().any(|e| e.contains("overflow")), "no overflow in {want:?}");
    ensure!(want.iter().any(|e| e.contains("rollback")), "no rollback in {want:?}");
    ensure!(events(&split)? == want, "events {:?} vs the single run's {want:?}", events(&split)?);
    let (a, b) = (steps(&single)?, steps(&split)?);
    ensure!(a.len() == b.len(), "{} vs {} logged steps", b.len(), a.len());
    for (i, ((l, _), (wl, _))) in b.iter().zip(&a).enumerate() {
        // f16 compute: the split run's sums round differently at f16's precision.
        ensure!((l - wl).abs() <= 1e-3 * wl.abs() || (l.is_nan() && wl.is_nan()), "record {i}: loss {l} vs {wl}");
    }
    Ok(())
}
