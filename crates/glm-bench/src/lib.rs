//! `glm bench forward`: tokens/s of the model's forward, forward+backward and batch-1 KV-cache decode,
//! beside (a) PyTorch eager running the same architecture and shapes in the same run, when a Python
//! with torch is available, and (b) the machine's measured sgemm peak, as model-FLOP utilization.
//! Nothing here is asserted in tests: these are measurements, printed and returned as JSON.

pub mod data;
pub mod dist;
pub mod pipeline;
pub mod train;

use std::io::Write;
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use glm_model::{init_weights, param_count, var_map, Config, Glm, KvCache};
use glm_nn::{cross_entropy, AttnLayout, DenseFactory};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// mimalloc's `mi_option_purge_delay` (15 in its option enum; the sys crate names no constant).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// For programs whose global allocator is mimalloc (the `glm` binary): keep freed memory for reuse
/// instead of handing it back to the OS. Tensor buffers are large and short-lived, and a fresh one
/// is zeroed page by page by the kernel (13% of a CPU forward+backward, and one pass over 134 MB of
/// logits took 77 ms with glibc's allocator against 24 ms with mimalloc). Call first in `main`.
pub fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; called before other threads start.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// The CPU's model name, for benchmark reports: the machines vary between runs.
pub use glm_nn::blas::cpu_name;

const TORCH_SCRIPT: &str = include_str!("../py/torch_forward.py");

#[derive(Debug, Clone)]
pub struct ForwardBench {
    pub presets: Vec<String>,
    pub batch: usize,
    pub seq: usize,
    pub iters: usize,
    /// Batch-1 greedy decoding with the KV cache: prompt tokens, then this many timed new tokens.
    pub decode_prompt: usize,
    pub decode_new: usize,
    /// Python to run the PyTorch baseline with; `None` skips it.
    pub torch_python: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PresetResult {
    pub preset: String,
    pub params: u64,
    pub batch: usize,
    pub seq: usize,
    pub forward: Timing,
    pub forward_backward: Timing,
    pub torch_forward: Option<Timing>,
    pub torch_forward_backward: Option<Timing>,
    pub decode: Timing,
    pub torch_decode: Option<Timing>,
    pub torch_version: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForwardReport {
    pub threads: usize,
    /// The best sgemm rate measured in this run (candle, BLAS, torch): what "% of peak" is against.
    pub sgemm_peak_gflops: f64,
    pub candle_sgemm_gflops: f64,
    /// The BLAS the dense layers use (None: candle's gemm).
    pub blas: Option<String>,
    pub blas_sgemm_gflops: Option<f64>,
    /// PyTorch's own matmul rate on the same sizes (its bundled BLAS).
    pub torch_sgemm_gflops: Option<f64>,
    pub decode_prompt: usize,
    pub decode_new: usize,
    pub results: Vec<PresetResult>,
    pub torch_note: Option<String>,
}

fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `iters` runs after one warm-up.
fn time_it(iters: usize, bar: &ProgressBar, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64());
        bar.inc(1);
    }
    Ok(median(ts))
}

const PEAK_SIZES: [usize; 3] = [512, 1024, 2048];

/// Best f32 GEMM rate, in GFLOP/s, of `product(a, b)` = a · bᵀ over square sizes 512..2048,
/// best of 5 runs each.
fn sgemm_gflops(product: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>) -> Result<f64> {
    let mut best = 0f64;
    for n in PEAK_SIZES {
        let a = Tensor::randn(0f32, 1., (n, n), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1., (n, n), &Device::Cpu)?;
        product(&a, &b)?;
        for _ in 0..5 {
            let t = Instant::now();
            product(&a, &b)?;
            best = best.max(2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    Ok(best)
}

/// Model FLOPs per token of a forward (the anchor's accounting): 2 per parameter plus attention
/// scores and context, 4 * L * H * T; a backward costs twice the forward.
fn forward_flops_per_token(cfg: &Config, seq: usize) -> f64 {
    2.0 * param_count(cfg) as f64 + 4.0 * (cfg.num_layers * cfg.hidden_size * seq) as f64
}

fn timing(seconds: f64, tokens: usize, flops_per_token: f64) -> Timing {
    let tps = tokens as f64 / seconds;
    Timing { seconds, tokens_per_s: tps, gflops: tps * flops_per_token / 1e9 }
}

fn inputs(cfg: &Config, b: usize, t: usize) -> Result<(Tensor, Tensor, AttnLayout)> {
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, t), &dev)?;
    let pos = Tensor::arange(0i64, t as i64, &dev)?.unsqueeze(0)?.repeat((b, 1))?;
    Ok((ids, pos, AttnLayout::prefix_lm(&vec![t / 2; b])))
}

struct TorchRun {
    forward_s: f64,
    forward_backward_s: f64,
    decode_tokens_per_s: f64,
    version: String,
    sgemm_gflops: Option<f64>,
}

/// Runs the Python script `source` (written to a temporary `name`) with `args` as JSON in argv[1]
/// and `env` added to the environment; returns the JSON object it prints.
fn run_python(
    python: &str,
    name: &str,
    source: &str,
    args: &serde_json::Value,
    env: &[(&str, &str)],
) -> Result<serde_json::Value> {
    let script = tempfile_path(name);
    std::fs::File::create(&script)
        .and_then(|mut f| f.write_all(source.as_bytes()))
        .with_context(|| format!("writing {}", script.display()))?;
    let out = Command::new(python)
        .arg(&script)
        .arg(args.to_string())
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("running {python}"))?;
    let _ = std::fs::remove_file(&script);
    if !out.status.success() {
        return Err(anyhow!("{python} failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")));
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing the output of {name}"))
}

fn run_torch(python: &str, cfg: &Config, opts: &ForwardBench) -> Result<TorchRun> {
    let args = serde_json::json!({
        "threads": threads(), "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads, "ffn_hidden_size": cfg.ffn_hidden_size, "vocab_size": cfg.vocab_size,
        "batch": opts.batch, "seq": opts.seq, "iters": opts.iters,
        "decode_prompt": opts.decode_prompt, "decode_new": opts.decode_new,
    });
    let v = run_python(python, "glm-torch-bench.py", TORCH_SCRIPT, &args, &[])?;
    let f = |k: &str| v[k].as_f64().ok_or_else(|| anyhow!("torch bench output lacks {k}"));
    Ok(TorchRun {
        forward_s: f("forward_s")?,
        forward_backward_s: f("forward_backward_s")?,
        decode_tokens_per_s: f("decode_tokens_per_s")?,
        version: v["torch"].as_str().unwrap_or("?").to_string(),
        sgemm_gflops: v["sgemm_gflops"].as_f64(),
    })
}

/// PyTorch eager batch-1 decode tokens/s on `cfg` (the decode of `py/torch_forward.py`: prefill
/// `prompt` tokens, then `new` greedy steps with its cache), f32 on the CPU, our thread count.
pub fn torch_decode_tokens_per_s(python: &str, cfg: &Config, prompt: usize, new: usize) -> Result<f64> {
    let opts = ForwardBench {
        presets: Vec::new(),
        batch: 1,
        seq: prompt.max(8),
        iters: 1,
        decode_prompt: prompt,
        decode_new: new,
        torch_python: Some(python.to_string()),
    };
    Ok(run_torch(python, cfg, &opts)?.decode_tokens_per_s)
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", std::process::id()))
}

/// Batch-1 greedy decoding: prefill `prompt` tokens of row 0 (bidirectional), then `new` steps
/// of one token through the KV cache, each taking the argmax of the last logits. Returns tokens/s
/// of the steps.
fn decode_tokens_per_s(model: &Glm, ids: &Tensor, prompt: usize, new: usize) -> Result<f64> {
    let dev = Device::Cpu;
    let mut cache = KvCache::new(model.config());
    let layout = AttnLayout::prefix_lm(&[prompt]);
    let pos = Tensor::arange(0i64, prompt as i64, &dev)?.unsqueeze(0)?;
    let logits = model.forward(&ids.narrow(0, 0, 1)?.narrow(1, 0, prompt)?, &pos, &layout, Some(&mut cache))?;
    let mut next = logits.i((0, prompt - 1))?.argmax(0)?.to_scalar::<u32>()?;
    let t0 = Instant::now();
    for i in 0..new {
        let x = Tensor::new(&[[next]], &dev)?;
        let p = Tensor::new(&[[(prompt + i) as i64]], &dev)?;
        let logits = model.forward(&x, &p, &layout, Some(&mut cache))?;
        next = logits.i((0, 0))?.argmax(0)?.to_scalar::<u32>()?;
    }
    Ok(new as f64 / t0.elapsed().as_secs_f64())
}

/// Does `python` import torch?
pub fn torch_available(python: &str) -> bool {
    Command::new(python).args(["-c", "import torch"]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// The Python to run a PyTorch baseline with (`None`: skip it) and, when skipped, why.
fn torch_python(python: Option<&str>) -> (Option<&str>, Option<String>) {
    match python {
        None => (None, Some("PyTorch baseline skipped (--no-torch)".to_string())),
        Some(p) if !torch_available(p) => (None, Some(format!("PyTorch baseline skipped: `{p}` cannot import torch"))),
        Some(p) => (Some(p), None),
    }
}

/// sgemm rates of candle's gemm and of the BLAS the dense layers use, if any.
fn sgemm_peaks() -> Result<(f64, Option<f64>)> {
    let candle = sgemm_gflops(|a, b| glm_nn::blas::linear_ref(a, b, None))?;
    let blas = match glm_nn::blas::backend() {
        Some(_) => Some(sgemm_gflops(|a, b| glm_nn::blas::linear(a, b, None))?),
        None => None,
    };
    Ok((candle, blas))
}

/// A progress bar of `len` runs named `name` (on stderr).
fn progress(name: &str, len: usize) -> Result<ProgressBar> {
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} runs  {per_sec}  eta {eta}")
        .map_err(|e| anyhow!("{e}"))?;
    let bar = ProgressBar::new(len as u64).with_style(style);
    bar.set_prefix(name.to_string());
    Ok(bar)
}

pub fn forward(opts: &ForwardBench) -> Result<ForwardReport> {
    if opts.iters == 0 || opts.batch == 0 || opts.seq == 0 || opts.decode_prompt == 0 || opts.decode_new == 0 {
        return Err(anyhow!("--iters, --batch, --seq, --decode-prompt and --decode-new must be positive"));
    }
    if opts.decode_prompt > opts.seq {
        return Err(anyhow!("--decode-prompt ({}) must not exceed --seq ({})", opts.decode_prompt, opts.seq));
    }
    let (candle_peak, blas_peak) = sgemm_peaks()?;
    let mut peak = candle_peak.max(blas_peak.unwrap_or(0.0));
    let (torch, torch_note) = torch_python(opts.torch_python.as_deref());
    let mut results = Vec::new();
    let mut torch_sgemm = None;
    for name in &opts.presets {
        let cfg = Config::preset(name)?;
        let (b, t) = (opts.batch, opts.seq);
        let bar = progress(name, 2 * opts.iters)?;
        let (ids, pos, layout) = inputs(&cfg, b, t)?;
        // Inference path: plain tensors, no autograd graph. Training path: variables.
        let weights = init_weights(&cfg, 0, &Device::Cpu)?;
        let infer = Glm::new(&cfg, VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu), &DenseFactory)?;
        let vm = var_map(weights)?;
        let train = Glm::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &DenseFactory)?;
        let fwd = time_it(opts.iters, &bar, || {
            infer.forward(&ids, &pos, &layout, None)?;
            Ok(())
        })?;
        let targets = ids.to_dtype(DType::I64)?;
        let fwd_bwd = time_it(opts.iters, &bar, || {
            let loss = cross_entropy(&train.forward(&ids, &pos, &layout, None)?, &targets)?;
            loss.backward()?;
            Ok(())
        })?;
        let dec = decode_tokens_per_s(&infer, &ids, opts.decode_prompt, opts.decode_new)?;
        bar.finish_and_clear();
        let fpt = forward_flops_per_token(&cfg, t);
        let dec_fpt = forward_flops_per_token(&cfg, opts.decode_prompt + opts.decode_new / 2);
        let per_s = |tps: f64, fpt: f64| Timing { seconds: 1.0 / tps, tokens_per_s: tps, gflops: tps * fpt / 1e9 };
        let (mut tf, mut tfb, mut tv, mut td) = (None, None, None, None);
        if let Some(py) = torch {
            eprintln!("{name}: running the PyTorch baseline ...");
            let run = run_torch(py, &cfg, opts)?;
            tf = Some(timing(run.forward_s, b * t, fpt));
            tfb = Some(timing(run.forward_backward_s, b * t, 3.0 * fpt));
            td = Some(per_s(run.decode_tokens_per_s, dec_fpt));
            tv = Some(run.version);
            torch_sgemm = torch_sgemm.or(run.sgemm_gflops);
        }
        results.push(PresetResult {
            preset: name.clone(),
            params: param_count(&cfg),
            batch: b,
            seq: t,
            forward: timing(fwd, b * t, fpt),
            forward_backward: timing(fwd_bwd, b * t, 3.0 * fpt),
            torch_forward: tf,
            torch_forward_backward: tfb,
            decode: per_s(dec, dec_fpt),
            torch_decode: td,
            torch_version: tv,
        });
    }
    peak = peak.max(torch_sgemm.unwrap_or(0.0));
    Ok(ForwardReport {
        threads: threads(),
        sgemm_peak_gflops: peak,
        candle_sgemm_gflops: candle_peak,
        blas: glm_nn::blas::backend().map(str::to_string),
        blas_sgemm_gflops: blas_peak,
        torch_sgemm_gflops: torch_sgemm,
        decode_prompt: opts.decode_prompt,
        decode_new: opts.decode_new,
        results,
        torch_note,
    })
}

/// The report as a table for people.
pub fn render(r: &ForwardReport) -> String {
    let blas = match (&r.blas, r.blas_sgemm_gflops) {
        (Some(name), Some(g)) => format!("{name} sgemm {g:.1} GFLOP/s (used by the dense layers)"),
        _ => "no BLAS found: dense layers use candle's gemm".to_string(),
    };
    let torch = match r.torch_sgemm_gflops {
        Some(g) => format!("; torch sgemm {g:.1} GFLOP/s"),
        None => String::new(),
    };
    let mut s = format!(
        "CPU, {} threads. sgemm, best of 512^3..2048^3: candle {:.1} GFLOP/s; {blas}{torch}\n\n\
         | preset | params | B x T | pass | glm tok/s | GFLOP/s (% peak) | torch eager tok/s | glm / torch |\n\
         |---|---|---|---|---|---|---|---|\n",
        r.threads, r.candle_sgemm_gflops
    );
    for p in &r.results {
        let shape = format!("{} x {}", p.batch, p.seq);
        let dec_shape = format!("1 x ({}+{})", r.decode_prompt, r.decode_new);
        for (pass, shape, ours, theirs) in [
            ("fwd", &shape, &p.forward, &p.torch_forward),
            ("fwd+bwd", &shape, &p.forward_backward, &p.torch_forward_backward),
            ("decode", &dec_shape, &p.decode, &p.torch_decode),
        ] {
            let (tt, ratio) = match theirs {
                Some(t) => (format!("{:.0}", t.tokens_per_s), format!("{:.2}x", ours.tokens_per_s / t.tokens_per_s)),
                None => ("-".into(), "-".into()),
            };
            s += &format!(
                "| {} | {:.2}M | {} | {} | {:.0} | {:.1} ({:.0}%) | {} | {} |\n",
                p.preset,
                p.params as f64 / 1e6,
                shape,
                pass,
                ours.tokens_per_s,
                ours.gflops,
                100.0 * ours.gflops / r.sgemm_peak_gflops,
                tt,
                ratio
            );
        }
    }
    if let Some(n) = &r.torch_note {
        s += &format!("\n{n}\n");
    } else if let Some(v) = r.results.iter().find_map(|p| p.torch_version.clone()) {
        s += &format!("\nPyTorch {v}, eager, same architecture, shapes and thread count, measured in this run.\n");
    }
    s
}
