//! `glm bench train`: training throughput on the CPU. One optimizer step (forward, backward,
//! gradient norm and clipping, AdamW) of `glm-train`'s code, f32, no dropout, beside PyTorch eager
//! running the model of `shared/anchors/torch_glm.py` on the same config, shapes and thread count in
//! the same run, and as a fraction of the machine's measured sgemm peak.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device};
use glm_data::objective::{prefix_lm_sample, Mode, ObjectiveIds, PositionKind};
use glm_data::{Batch, Row};
use glm_model::{init_weights, param_count, Config, TrainOptions};
use glm_train::config::OptimConfig;
use glm_train::optim::{AdamW, AdamWConfig};
use glm_train::step::{forward_backward, grad_norms, Params};
use serde::Serialize;

use crate::{forward_flops_per_token, median, progress, run_python, sgemm_peaks, threads, torch_python};

const TORCH_SCRIPT: &str = include_str!("../py/torch_train.py");

/// `glm bench train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainBenchArgs {
    /// Comma-separated presets.
    #[arg(long, default_value = "tiny,small", value_delimiter = ',')]
    pub presets: Vec<String>,
    /// Rows per step (one micro-batch).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Python interpreter with torch for the baseline (env GLM_TORCH_PYTHON; default python3).
    #[arg(long, env = "GLM_TORCH_PYTHON", default_value = "python3")]
    pub torch_python: String,
    /// Skip the PyTorch baseline.
    #[arg(long)]
    pub no_torch: bool,
    /// The PyTorch model (default: shared/anchors/torch_glm.py beside the repository).
    #[arg(long)]
    pub torch_model: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl TrainBenchArgs {
    pub fn run(self) -> Result<()> {
        let report = train(&self)?;
        println!("{}", render(&report));
        if let Some(p) = &self.json {
            std::fs::write(p, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }
}

/// One side's median step, and where its time went.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step_s: f64,
    /// Forward + loss + backward; gradient norm (+ clipping); AdamW (+ zeroing the gradients).
    pub fwd_bwd_s: f64,
    pub clip_s: f64,
    pub adamw_s: f64,
    pub tokens_per_s: f64,
    pub tflops: f64,
    pub loss: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainResult {
    pub preset: String,
    pub params: u64,
    pub batch: usize,
    pub seq: usize,
    pub glm: StepTiming,
    pub torch: Option<StepTiming>,
    pub torch_params: Option<u64>,
    pub torch_version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub threads: usize,
    pub warmup: usize,
    pub steps: usize,
    /// The best sgemm rate measured in this run (candle, BLAS, torch): what "% peak" is against.
    pub sgemm_peak_gflops: f64,
    pub candle_sgemm_gflops: f64,
    pub blas: Option<String>,
    pub blas_sgemm_gflops: Option<f64>,
    pub torch_sgemm_gflops: Option<f64>,
    /// PyTorch's OpenMP wait policy (`OMP_WAIT_POLICY`; passive unless set).
    pub torch_omp_wait_policy: String,
    pub results: Vec<TrainResult>,
    pub torch_note: Option<String>,
}

/// `batch` [gMASK] rows of `seq` tokens: `context [gMASK] <sop> target <eop>`, the first half the
/// bidirectional prefix, the loss on the second half. Token ids are pseudo-random.
fn gmask_batch(cfg: &Config, batch: usize, seq: usize) -> Batch {
    let st = &cfg.special_tokens;
    let ids = ObjectiveIds { mask: st.mask, gmask: st.gmask, sop: st.sop, eop: st.eop, pad: st.eod };
    let text = (cfg.vocab_size - 64).max(1); // below the special ids
    let rows = (0..batch)
        .map(|r| {
            let tokens: Vec<u32> = (0..seq).map(|i| ((r * seq + i) * 7919 % 104729 % text) as u32).collect();
            let (ctx, tgt) = (seq / 2 - 1, seq - seq / 2 - 2);
            let mut row = Row::new(seq, Mode::Gmask, false);
            row.push(prefix_lm_sample(&tokens[..ctx], &tokens[ctx..ctx + tgt], Mode::Gmask, PositionKind::OneD, &ids));
            row.pad(seq, ids.pad);
            row
        })
        .collect();
    Batch { rows, seq_len: seq }
}

fn timing(step_s: f64, fwd_bwd_s: f64, clip_s: f64, adamw_s: f64, loss: f64, tokens: usize, fpt: f64) -> StepTiming {
    let tokens_per_s = tokens as f64 / step_s;
    StepTiming { step_s, fwd_bwd_s, clip_s, adamw_s, tokens_per_s, tflops: tokens_per_s * fpt / 1e12, loss }
}

/// Our training step, as `glm train` runs it (f32, one micro-batch, no loss scaling).
fn glm_steps(cfg: &Config, o: &TrainBenchArgs, oc: &OptimConfig, fpt: f64) -> Result<StepTiming> {
    let params = Params::new(cfg, &init_weights(cfg, 0, &Device::Cpu)?, DType::F32, &Device::Cpu)?;
    let model = params.model(cfg, None)?;
    let adamw = AdamWConfig { beta1: oc.beta1, beta2: oc.beta2, eps: oc.eps, weight_decay: oc.weight_decay };
    let mut opt = AdamW::new(adamw, &params.master, oc.fused)?;
    let batches = [gmask_batch(cfg, o.batch, o.seq)];
    let train = TrainOptions { hidden_dropout: 0.0, attention_dropout: 0.0, egs_alpha: 1.0, seed: 0 };
    let bar = progress(&cfg.name, o.warmup + o.steps)?;
    let mut runs = Vec::with_capacity(o.steps);
    for i in 0..o.warmup + o.steps {
        let t0 = Instant::now();
        let g = forward_backward(&model, &params, &batches, &train, 1.0, None, (0, 1))?;
        let t1 = Instant::now();
        let (norm, _) = grad_norms(&g.grads, &params, 1.0)?;
        let coef = if oc.clip_grad > 0.0 && norm > oc.clip_grad { oc.clip_grad / (norm + 1e-6) } else { 1.0 };
        let t2 = Instant::now();
        opt.step(&params.master, &g.grads, &params.decay, oc.lr, coef)?;
        params.sync_compute()?;
        let t3 = Instant::now();
        if i >= o.warmup {
            let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
            runs.push([s(t0, t3), s(t0, t1), s(t1, t2), s(t2, t3), g.loss]);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mid = median(runs.iter().map(|r| r[0]).collect());
    let [step, fb, clip, adamw, loss] = runs.into_iter().find(|r| r[0] == mid).ok_or_else(|| anyhow!("no steps"))?;
    Ok(timing(step, fb, clip, adamw, loss, o.batch * o.seq, fpt))
}

struct TorchRun {
    timing: StepTiming,
    params: u64,
    version: String,
    sgemm_gflops: Option<f64>,
}

/// PyTorch's OpenMP threads spin between parallel regions by default (OMP_WAIT_POLICY=active): on a
/// machine shared with other jobs a descheduled spinner stalls every op: a torch step took 3.5-5x as
/// long as with passive waiting (an AdamW step over 23M parameters: 2.0 s against 0.16 s). On an idle
/// machine spinning may win a little: passive unless the environment says otherwise.
fn omp_wait_policy() -> String {
    std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "passive".to_string())
}

fn torch_steps(python: &str, model: &Path, cfg: &Config, o: &TrainBenchArgs, oc: &OptimConfig) -> Result<TorchRun> {
    let args = serde_json::json!({
        "model": model, "threads": threads(), "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads, "ffn_hidden_size": cfg.ffn_hidden_size, "vocab_size": cfg.vocab_size,
        "deepnorm_beta": cfg.deepnorm_beta(), "batch": o.batch, "seq": o.seq, "warmup": o.warmup,
        "steps": o.steps, "optim": oc,
    });
    let v = run_python(python, "glm-torch-train.py", TORCH_SCRIPT, &args, &[("OMP_WAIT_POLICY", &omp_wait_policy())])?;
    let f = |k: &str| v[k].as_f64().ok_or_else(|| anyhow!("torch bench output lacks {k}"));
    let fpt = 3.0 * forward_flops_per_token(cfg, o.seq);
    Ok(TorchRun {
        timing: timing(f("step_s")?, f("fwd_bwd_s")?, f("clip_s")?, f("adamw_s")?, f("loss")?, o.batch * o.seq, fpt),
        params: v["params"].as_u64().unwrap_or(0),
        version: v["torch"].as_str().unwrap_or("?").to_string(),
        sgemm_gflops: v["sgemm_gflops"].as_f64(),
    })
}

fn default_torch_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/anchors/torch_glm.py")
}

pub fn train(o: &TrainBenchArgs) -> Result<TrainReport> {
    if o.steps == 0 || o.batch == 0 || o.seq < 4 {
        return Err(anyhow!("--steps and --batch must be positive and --seq at least 4"));
    }
    let oc = OptimConfig::default();
    let (candle_peak, blas_peak) = sgemm_peaks()?;
    let (mut torch, mut torch_note) = torch_python((!o.no_torch).then_some(o.torch_python.as_str()));
    let model = o.torch_model.clone().unwrap_or_else(default_torch_model);
    if torch.is_some() && !model.is_file() {
        (torch, torch_note) = (None, Some(format!("PyTorch baseline skipped: no {}", model.display())));
    }
    let mut results = Vec::new();
    let mut torch_sgemm: Option<f64> = None;
    for name in &o.presets {
        let cfg = Config::preset(name)?;
        if o.seq > cfg.max_seq_len {
            return Err(anyhow!("--seq {} exceeds {name}'s max_seq_len {}", o.seq, cfg.max_seq_len));
        }
        let fpt = 3.0 * forward_flops_per_token(&cfg, o.seq);
        let glm = glm_steps(&cfg, o, &oc, fpt)?;
        let run = match torch {
            Some(py) => {
                eprintln!("{name}: running the PyTorch baseline ...");
                let run = torch_steps(py, &model, &cfg, o, &oc)?;
                torch_sgemm = run.sgemm_gflops.map(|g| g.max(torch_sgemm.unwrap_or(0.0))).or(torch_sgemm);
                Some(run)
            }
            None => None,
        };
        results.push(TrainResult {
            preset: name.clone(),
            params: param_count(&cfg),
            batch: o.batch,
            seq: o.seq,
            glm,
            torch_params: run.as_ref().map(|r| r.params),
            torch_version: run.as_ref().map(|r| r.version.clone()),
            torch: run.map(|r| r.timing),
        });
    }
    let peak = candle_peak.max(blas_peak.unwrap_or(0.0)).max(torch_sgemm.unwrap_or(0.0));
    Ok(TrainReport {
        threads: threads(),
        warmup: o.warmup,
        steps: o.steps,
        sgemm_peak_gflops: peak,
        candle_sgemm_gflops: candle_peak,
        blas: glm_nn::blas::backend().map(str::to_string),
        blas_sgemm_gflops: blas_peak,
        torch_sgemm_gflops: torch_sgemm,
        torch_omp_wait_policy: omp_wait_policy(),
        results,
        torch_note,
    })
}

/// The report as tables for people.
pub fn render(r: &TrainReport) -> String {
    let opt = |g: Option<f64>, what: &str| g.map(|g| format!("; {what} {g:.1}")).unwrap_or_default();
    let blas = r.blas.as_deref().unwrap_or("BLAS");
    let mut s = format!(
        "CPU, {} threads, f32, dropout 0; median of {} optimizer steps after {} warm-up.\n\
         sgemm GFLOP/s, best of 512^3..2048^3: candle {:.1}{}{}; peak {:.1}\n\n\
         | preset | params | B x T | glm tok/s | glm TFLOP/s (% peak) | torch tok/s | \
         torch TFLOP/s (% peak) | glm / torch |\n\
         |---|---|---|---|---|---|---|---|\n",
        r.threads,
        r.steps,
        r.warmup,
        r.candle_sgemm_gflops,
        opt(r.blas_sgemm_gflops, blas),
        opt(r.torch_sgemm_gflops, "torch"),
        r.sgemm_peak_gflops
    );
    let pct = |t: &StepTiming| 100.0 * t.tflops * 1e3 / r.sgemm_peak_gflops;
    for p in &r.results {
        let (g, shape) = (&p.glm, format!("{} x {}", p.batch, p.seq));
        let (tt, tf, ratio) = match &p.torch {
            Some(t) => (
                format!("{:.0}", t.tokens_per_s),
                format!("{:.3} ({:.1}%)", t.tflops, pct(t)),
                format!("{:.2}x", g.tokens_per_s / t.tokens_per_s),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        s += &format!(
            "| {} | {:.2}M | {shape} | {:.0} | {:.3} ({:.1}%) | {tt} | {tf} | {ratio} |\n",
            p.preset,
            p.params as f64 / 1e6,
            g.tokens_per_s,
            g.tflops,
            pct(g)
        );
    }
    s += "\nWhere a step's time goes (ms): fwd+bwd / grad norm + clip / AdamW (+ zero_grad), loss\n\n\
          | preset | glm step | glm split | glm loss | torch step | torch split | torch loss |\n\
          |---|---|---|---|---|---|---|\n";
    let split = |t: &StepTiming| {
        let ms = |x: f64| x * 1e3;
        (format!("{:.0}", ms(t.step_s)), format!("{:.0} / {:.1} / {:.1}", ms(t.fwd_bwd_s), ms(t.clip_s), ms(t.adamw_s)))
    };
    for p in &r.results {
        let (gs, gsplit) = split(&p.glm);
        let (ts, tsplit, tl) = match &p.torch {
            Some(t) => {
                let (a, b) = split(t);
                (a, b, format!("{:.3}", t.loss))
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        s += &format!("| {} | {gs} | {gsplit} | {:.3} | {ts} | {tsplit} | {tl} |\n", p.preset, p.glm.loss);
    }
    s += "\nTFLOP/s = tokens/s x (6 N + 12 L H T) / 1e12 (N = our parameter count, tied head counted once; \
          the same for both sides).\n";
    match (&r.torch_note, r.results.iter().find_map(|p| p.torch_version.as_deref())) {
        (Some(n), _) => s += &format!("{n}\n"),
        (None, Some(v)) => {
            s += &format!(
                "PyTorch {v} eager: the model of shared/anchors/torch_glm.py with our init, same config, \
                 shapes, AdamW hyper-parameters, clipping and thread count (OMP_WAIT_POLICY={}), measured in \
                 this run.\n",
                r.torch_omp_wait_policy
            )
        }
        _ => {}
    }
    s
}
