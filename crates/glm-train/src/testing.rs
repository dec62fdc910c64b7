//! Support for the equivalence tests, shared by the in-process tests (`tests/dist.rs`) and the
//! MPI runs (`examples/mpi_equivalence.rs` under `mpirun`): one rank's part of a split run, the
//! full weights gathered from the ranks, and the comparison with the single process.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use candle_core::{Device, Tensor};
use glm_dist::{Communicator, Layout, ParallelGroups};
use glm_model::{Config, FfnKind, PositionEncoding};
use serde_json::Value;

use crate::ckpt::{Checkpoints, MODEL_FILE};
use crate::dist::Dist;
use crate::{Error, Result, RunOptions, TrainConfig, Trainer};

/// A 5-step run of a 2-layer GLM-130B-style (`glm`) or ChatGLM-style (`chatglm`: GeLU MLP, untied
/// head) model, 4 micro-batches a step; the model config is written into `dir`.
pub fn config(arch: &str, dropout: bool, dir: &Path) -> Result<TrainConfig> {
    sized_config(arch, dropout, dir, 2, 4)
}

/// `config` for pipelines: 5 layers (uneven over 2 and 4 stages) and 8 micro-batches a step.
pub fn pipeline_config(arch: &str, dropout: bool, dir: &Path) -> Result<TrainConfig> {
    sized_config(arch, dropout, dir, 5, 8)
}

fn sized_config(arch: &str, dropout: bool, dir: &Path, layers: usize, micro_batches: usize) -> Result<TrainConfig> {
    let mut c = TrainConfig { max_steps: 5, ..Default::default() };
    c.objective.seq_len = 64;
    c.batch.micro_batch = 1;
    c.batch.global = micro_batches;
    c.batch.ramp_start = micro_batches;
    c.batch.ramp_increment = micro_batches;
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
    let small = |cfg: Config| Config { num_layers: layers, hidden_size: 64, num_heads: 4, ffn_hidden_size: 128, ..cfg };
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
    let text = serde_json::to_vec(&model).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    c.model_config = Some(path);
    Ok(c)
}

pub fn opts(out: &Path, resume: bool, stop_at: Option<u64>) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        resume,
        start_if_empty: false,
        stop_at,
        progress: false,
        device: Device::Cpu,
        stop: None,
    }
}

/// One rank's part of a split run: trains, then returns the full weights of its final
/// checkpoint (merged over the tensor-parallel shards and pipeline stages; every rank reads them).
pub fn rank_run(
    world: Rc<dyn Communicator>,
    layout: Layout,
    zero: bool,
    cfg: &TrainConfig,
    o: &RunOptions,
) -> Result<HashMap<String, Tensor>> {
    let groups = ParallelGroups::new(world, layout).map_err(|e| Error::Dist(e.to_string()))?;
    let mut t = Trainer::with_dist(cfg.clone(), o.clone(), Some(Dist::new(groups, zero)))?;
    let summary = t.run()?;
    let dir = summary.checkpoint.ok_or_else(|| Error::Checkpoint("the run saved no checkpoint".into()))?;
    Checkpoints::load_full(&dir, MODEL_FILE, &cfg.model()?)
}

/// (loss, gradient norm of each group) of each step, from a run's log.
pub fn steps(out: &Path) -> Result<Vec<(f64, Vec<f64>)>> {
    let p = out.join(crate::metrics::METRICS);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::Io(format!("{}: {e}", p.display())))?;
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
pub fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((d / (b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).max(1e-30)).sqrt())
}

/// The split run's log and weights against the single run's: losses within 1e-5, every gradient
/// group's norm within 1e-4, weights within 1e-5 (relative). The worst weight error on success.
pub fn compare(
    what: &str,
    single: (&Path, &HashMap<String, Tensor>),
    split: (&Path, &HashMap<String, Tensor>),
) -> Result<f64> {
    let fail = |m: String| Err(Error::Mismatch(format!("{what}: {m}")));
    let (want, got) = (steps(single.0)?, steps(split.0)?);
    if want.is_empty() || got.len() != want.len() {
        return fail(format!("{} steps logged, the single run {}", got.len(), want.len()));
    }
    for (i, ((l, n), (wl, wn))) in got.iter().zip(&want).enumerate() {
        if (l - wl).abs() > 1e-5 * wl.abs() {
            return fail(format!("step {} loss {l} vs {wl}", i + 1));
        }
        if n.len() != wn.len() || n.is_empty() || n.iter().zip(wn).any(|(g, w)| (g - w).abs() > 1e-4 * w.abs()) {
            return fail(format!("step {} gradient norms by group {n:?} vs {wn:?}", i + 1));
        }
    }
    let mut worst = 0f64;
    for (name, w) in single.1 {
        let Some(g) = split.1.get(name) else { return fail(format!("no weight {name}")) };
        let e = rel(g, w)?;
        if e >= 1e-5 {
            return fail(format!("weight {name} differs by {e:.2e}"));
        }
        worst = worst.max(e);
    }
    Ok(worst)
}

/// The layouts the equivalence tests run: (tp, dp, ZeRO-1).
pub const LAYOUTS: [(usize, usize, bool); 7] =
    [(2, 1, false), (1, 2, false), (1, 2, true), (2, 2, false), (2, 2, true), (4, 1, false), (1, 4, true)];

/// The pipelined layouts the equivalence tests run (with `pipeline_config`): (tp, pp, dp, ZeRO-1).
pub const PIPELINE_LAYOUTS: [(usize, usize, usize, bool); 4] =
    [(1, 2, 1, false), (1, 4, 1, false), (1, 2, 2, true), (2, 2, 2, true)];
