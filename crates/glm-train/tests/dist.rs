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
use glm_train::testing::{compare, config, opts, pipeline_config, rank_run, steps, LAYOUTS, PIPELINE_LAYOUTS};
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
        let got = run_split(&cfg, &opts(&out, false, None), (tp, 1, dp), zero)?.swap_remove(0);
        let what = format!("{arch} dropout={dropout} tp {tp} dp {dp} zero {zero}");
        let worst = compare(&what, (&base_out, &base), (&out, &got))?;
        println!("{what}: 5 steps match (worst weight rel err {worst:.1e})");
    }
    Ok(())
}

/// Pipelined runs (5 layers over 2 and 4 stages, 8 micro-batches in 1F1B order, with TP and DP
/// and ZeRO-1 around them) against the single run.
fn check_pipeline(arch: &str, dropout: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = pipeline_config(arch, dropout, dir.path())?;
    let base_out = dir.path().join("single");
    let mut t = Trainer::new(cfg.clone(), opts(&base_out, false, None))?;
    t.run()?;
    let base = t.weights();
    for (tp, pp, dp, zero) in PIPELINE_LAYOUTS {
        let out = dir.path().join(format!("tp{tp}-pp{pp}-dp{dp}-zero{zero}"));
        let got = run_split(&cfg, &opts(&out, false, None), (tp, pp, dp), zero)?.swap_remove(0);
        let what = format!("{arch} dropout={dropout} tp {tp} pp {pp} dp {dp} zero {zero}");
        let worst = compare(&what, (&base_out, &base), (&out, &got))?;
        println!("{what}: 5 steps match (worst weight rel err {worst:.1e})");
    }
    Ok(())
}

#[test]
fn glm130b_style_pipelined_runs_equal_the_single_run() -> Result<()> {
    check_pipeline("glm", true)
}

#[test]
fn chatglm_style_pipelined_runs_equal_the_single_run() -> Result<()> {
    check_pipeline("chatglm", false)
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

/// Every rank's run of `cfg` split tp x pp x dp on threads (resuming or stopping as `o` says):
/// the full weights each rank reads back.
fn run_split(
    cfg: &TrainConfig,
    o: &RunOptions,
    (tp, pp, dp): (usize, usize, usize),
    zero: bool,
) -> Result<Vec<HashMap<String, Tensor>>> {
    let layout = Layout::new(tp, pp, dp)?;
    Ok(LocalComm::run(tp * pp * dp, Duration::from_secs(120), |world| {
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
    let straight = run_split(&cfg, &opts(&a, false, None), (2, 2, 1), true)?;
    run_split(&cfg, &opts(&b, false, Some(3)), (2, 2, 1), true)?;
    let resumed = run_split(&cfg, &opts(&b, true, None), (2, 2, 1), true)?;
    ensure!(losses(&a)? == losses(&b)?, "losses differ after resuming");
    for (r, (x, y)) in straight.iter().zip(&resumed).enumerate() {
        ensure!(same_bits(x, y)?, "rank {r}: weights differ after resuming");
    }
    Ok(())
}

#[test]
fn reshard_round_trips_bit_for_bit_and_another_layout_resumes_the_run() -> Result<()> {
    use glm_train::ckpt::{checkpoint_layout, Checkpoints, MODEL_FILE, OPTIMIZER_FILE};
    let dir = tempfile::tempdir()?;
    let mut cfg = config("glm", false, dir.path())?;
    cfg.max_steps = 6;
    cfg.checkpoint.every = 3;
    let model: Config = serde_json::from_slice(&std::fs::read(dir.path().join("glm.json"))?)?;
    let single_out = dir.path().join("single");
    Trainer::new(cfg.clone(), opts(&single_out, false, None))?.run()?;
    let step3 = single_out.join("checkpoints/step-00000003");
    // (tp, pp): 1x1 -> 2x1 -> 1x2 -> 2x2 -> 4x2 -> 1x1, each merging back to the same tensors.
    let mut from = step3.clone();
    for (tp, pp) in [(2, 1), (1, 2), (2, 2), (4, 2), (1, 1)] {
        let to = dir.path().join(format!("tp{tp}-pp{pp}"));
        Checkpoints::reshard(&from, &to, &model, tp, pp)?;
        ensure!(checkpoint_layout(&to)? == (tp, pp), "{}: layout", to.display());
        for file in [MODEL_FILE, OPTIMIZER_FILE] {
            let a = Checkpoints::load_tensors(&step3, file)?;
            ensure!(
                same_bits(&a, &Checkpoints::load_full(&to, file, &model)?)?,
                "{file}: tp {tp} pp {pp} does not merge back"
            );
        }
        from = to;
    }
    ensure!(dir.path().join("tp4-pp2/model-tp03-of-04-pp01-of-02.safetensors").exists());
    ensure!(same_bits(
        &Checkpoints::load_tensors(&step3, MODEL_FILE)?,
        &Checkpoints::load_tensors(&from, MODEL_FILE)?
    )?);
    let t2 = dir.path().join("tp2-pp1");
    ensure!(Checkpoints::reshard(&step3, &t2, &model, 2, 1).is_err(), "an existing output must be refused");
    ensure!(
        Checkpoints::reshard(&step3, &dir.path().join("tp3"), &model, 3, 1).is_err(),
        "4 heads cannot split 3 ways"
    );
    ensure!(
        Checkpoints::reshard(&step3, &dir.path().join("pp3"), &model, 1, 3).is_err(),
        "2 layers cannot make 3 stages"
    );
    // A missing or cut shard of a (tp, pp) checkpoint is named, never half-loaded.
    let broken = dir.path().join("broken");
    copy_dir(&dir.path().join("tp2-pp2"), &broken)?;
    let gone = "model-tp01-of-02-pp01-of-02.safetensors";
    std::fs::remove_file(broken.join(gone))?;
    let e = Checkpoints::verify(&broken).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains(gone), "a missing shard: {e}");
    ensure!(Checkpoints::reshard(&broken, &dir.path().join("from-broken"), &model, 1, 1).is_err());
    copy_dir(&dir.path().join("tp2-pp2"), &broken)?;
    std::fs::OpenOptions::new().write(true).open(broken.join(gone))?.set_len(100)?;
    let e = Checkpoints::verify(&broken).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains(gone) && e.contains("truncated"), "a cut shard: {e}");
    let want = steps(&single_out)?;
    // Checkpoints resumed on other layouts than they were written at.
    let runs = [
        ("from-reshard", dir.path().join("tp2-pp1"), (2, 1, 1)),
        ("direct", step3.clone(), (4, 1, 1)),
        ("dp", t2.clone(), (1, 1, 2)),
        ("pipeline-from-tp", t2, (1, 2, 1)),
        ("tp-from-pipeline", dir.path().join("tp2-pp2"), (2, 1, 2)),
    ];
    for (name, ckpt, layout) in runs {
        let out = dir.path().join(name);
        std::fs::create_dir_all(out.join("checkpoints"))?;
        copy_dir(&ckpt, &out.join("checkpoints/step-00000003"))?;
        run_split(&cfg, &opts(&out, true, None), layout, false)?;
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
    run_split(&cfg, &opts(&split, false, None), (2, 1, 2), true)?;
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
