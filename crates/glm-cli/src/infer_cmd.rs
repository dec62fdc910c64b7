//! `glm quantize`, `glm generate`, `glm fill`: quantized checkpoints and generation, in one process
//! or over tensor-parallel ranks (`--tp N`, see `tp_launch`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use glm_infer::{Generator, SamplingConfig};
use glm_model::{Config, Glm};
use glm_quant::{Bits, QuantCheckpoint};

use crate::tp_launch::{Rank, TpArgs};
use crate::ModelArgs;

/// Where a model comes from: a training checkpoint directory (`runs/x/checkpoints/step-N`, config in
/// its state.json), a quantized checkpoint (config in its header), a dense safetensors file (config
/// in its header when `glm convert` wrote it, else from --preset/--config), or a released checkpoint
/// read in place: a GLM-130B SAT folder or a ChatGLM-6B Hugging Face folder (glm-convert).
#[derive(Args)]
pub struct ModelSource {
    /// Checkpoint: a training checkpoint directory, a .safetensors (dense or quantized), a GLM-130B
    /// SAT folder (latest + mp_rank files) or a ChatGLM-6B Hugging Face folder.
    #[arg(long)]
    pub(crate) model: PathBuf,
    #[command(flatten)]
    pub(crate) arch: ModelArgs,
    /// tokenizer.json, a SentencePiece .model, or a ChatGLM folder with ice_text.model (default: the
    /// model folder's ice_text.model if it has one, else the embedded tokenizer).
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,
}

/// The dense weights file and the config of a checkpoint path that is not quantized.
pub(crate) fn dense_source(path: &Path, arch: &ModelArgs) -> Result<(PathBuf, Config)> {
    if path.is_dir() {
        let state = path.join("state.json");
        let text = std::fs::read_to_string(&state).with_context(|| {
            format!("{}: not a training checkpoint directory (no readable state.json)", path.display())
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", state.display()))?;
        let cfg: Config = serde_json::from_value(v["model"].clone())
            .with_context(|| format!("{}: no model config", state.display()))?;
        cfg.validate().with_context(|| format!("{}", state.display()))?;
        check_arch(&cfg, arch, path)?;
        return Ok((path.join("model.safetensors"), cfg));
    }
    // A file `glm convert` wrote says which model it holds.
    if let Ok(st) = glm_checkpoint::raw::SafetensorsFile::open(path) {
        if let Some(text) = st.metadata().get("config") {
            let cfg = Config::from_json(text).with_context(|| format!("{}: config in the header", path.display()))?;
            check_arch(&cfg, arch, path)?;
            return Ok((path.to_path_buf(), cfg));
        }
    }
    Ok((path.to_path_buf(), arch.resolve()?))
}

/// A config given on the command line must be the checkpoint's own.
fn check_arch(cfg: &Config, arch: &ModelArgs, path: &Path) -> Result<()> {
    if arch.preset.is_some() || arch.config.is_some() {
        let want = arch.resolve()?;
        if want != *cfg {
            bail!(
                "{} holds a `{}` model ({} layers, hidden {}), not the `{}` asked for ({} layers, hidden {})",
                path.display(),
                cfg.name,
                cfg.num_layers,
                cfg.hidden_size,
                want.name,
                want.num_layers,
                want.hidden_size
            );
        }
    }
    Ok(())
}

/// A checkpoint's tokenizer: `--tokenizer` (a file, or a folder with ice_text.model), else the model
/// folder's own ice_text.model (ChatGLM-6B ships it), else the embedded one. A file named
/// `ice_text.model` is icetk's (GLM-130B, ChatGLM-6B): read in ChatGLM's layout, from its folder's
/// tokenizer_config.json when there is one, else in icetk's own (ids offset by 20000 image tokens).
fn tokenizer_for(model: &Path, given: Option<&Path>) -> Result<glm_tokenizer::Tokenizer> {
    let dir = match given {
        Some(p) if p.is_dir() => Some(p),
        Some(p) if p.file_name().is_some_and(|n| n == "ice_text.model") => {
            let folder = p.parent().filter(|d| d.join("tokenizer_config.json").is_file());
            return Ok(match folder {
                Some(d) => glm_tokenizer::Tokenizer::from_chatglm_dir(d)?,
                None => {
                    let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                    glm_tokenizer::Tokenizer::from_chatglm(&bytes, None)
                        .with_context(|| format!("{}: not icetk's text model", p.display()))?
                }
            });
        }
        Some(p) => return Ok(glm_data::load_tokenizer(Some(p))?.0),
        None => Some(model).filter(|m| m.is_dir() && m.join("ice_text.model").is_file()),
    };
    Ok(match dir {
        Some(d) => glm_tokenizer::Tokenizer::from_chatglm_dir(d)?,
        None => glm_data::load_tokenizer(None)?.0,
    })
}

/// A released model's special tokens are the ones its tokenizer must produce.
fn check_specials(cfg: &Config, tok: &glm_tokenizer::Tokenizer, model: &Path) -> Result<()> {
    let (s, t) = (cfg.special_tokens, tok.specials());
    for (name, want, got) in
        [("[gMASK]", s.gmask, t.gmask), ("[MASK]", s.mask, t.mask), ("<sop>", s.sop, t.sop), ("<eop>", s.eop, t.eop)]
    {
        if got != Some(want) {
            bail!(
                "{} uses {name} = {want}, but the tokenizer has {}: pass its tokenizer with --tokenizer \
                 (ChatGLM-6B: the folder with ice_text.model; GLM-130B: icetk's ice_text.model)",
                model.display(),
                got.map_or("none".to_string(), |g| g.to_string())
            );
        }
    }
    Ok(())
}

impl ModelSource {
    pub fn load(&self) -> Result<(Glm, glm_tokenizer::Tokenizer)> {
        self.load_on(None)
    }

    /// The model whole (`group` None), or tensor-parallel rank `group.rank()`'s part of it: only
    /// its slices of the weights read, logits gathered to the full vocabulary on every rank. A
    /// tokenizer with ids the model does not have is refused here, not at the first decode.
    pub fn load_on(&self, group: Option<glm_dist::Group>) -> Result<(Glm, glm_tokenizer::Tokenizer)> {
        let (model, tok) = self.load_parts(group)?;
        let (ids, vocab) = (tok.vocab_size(), model.config().vocab_size);
        if ids > vocab {
            bail!(
                "{}: the tokenizer{} has {ids} ids but the model's vocabulary only {vocab}: pass the model's own \
                 tokenizer with --tokenizer",
                self.model.display(),
                self.tokenizer.as_ref().map_or(String::new(), |t| format!(" {}", t.display()))
            );
        }
        Ok((model, tok))
    }

    fn load_parts(&self, group: Option<glm_dist::Group>) -> Result<(Glm, glm_tokenizer::Tokenizer)> {
        use glm_convert::Format;
        let dev = candle_core::Device::Cpu;
        let format = Format::detect(&self.model).with_context(|| format!("opening {}", self.model.display()))?;
        if matches!(format, Format::Sat | Format::HuggingFace | Format::Torch) {
            let arch = if self.arch.preset.is_some() || self.arch.config.is_some() {
                Some(self.arch.resolve()?)
            } else {
                None
            };
            let src = glm_convert::open(&self.model, arch.as_ref())?;
            let tok = tokenizer_for(&self.model, self.tokenizer.as_deref())?;
            if src.released() {
                check_specials(src.config(), &tok, &self.model)?;
            }
            let model = match group {
                None => glm_convert::load_model(src.as_ref(), candle_core::DType::F32, &dev)?,
                Some(g) => glm_convert::load_model_tp(src.as_ref(), candle_core::DType::F32, &dev, g)?,
            };
            return Ok((model, tok));
        }
        let tok = tokenizer_for(&self.model, self.tokenizer.as_deref())?;
        // A file converted from a released model says so: its special ids are fixed.
        if let Ok(st) = glm_checkpoint::raw::SafetensorsFile::open(&self.model) {
            if st.metadata().get(glm_convert::source::RELEASED).is_some_and(|v| v == "true") {
                let cfg = match format {
                    Format::GlmQuant => QuantCheckpoint::config_of(&self.model)?,
                    _ => dense_source(&self.model, &self.arch)?.1,
                };
                check_specials(&cfg, &tok, &self.model)?;
            }
        }
        let model = match (format, group) {
            (Format::GlmQuant, None) => {
                let q = QuantCheckpoint::open(&self.model)?;
                check_arch(&q.config, &self.arch, &self.model)?;
                q.model(candle_core::DType::F32, &dev)?
            }
            (Format::GlmQuant, Some(g)) => {
                check_arch(&QuantCheckpoint::config_of(&self.model)?, &self.arch, &self.model)?;
                let q = QuantCheckpoint::open_rank(&self.model, g.size(), g.rank())?;
                q.model_tp(candle_core::DType::F32, &dev, g)?
            }
            (_, None) => {
                let (file, cfg) = dense_source(&self.model, &self.arch)?;
                let ckpt = glm_checkpoint::Checkpoint::open(&[&file])?;
                Glm::from_checkpoint(&cfg, &ckpt, candle_core::DType::F32, &dev, &glm_nn::DenseFactory)?
            }
            (_, Some(g)) => {
                let (file, cfg) = dense_source(&self.model, &self.arch)?;
                let src = glm_convert::open(&file, Some(&cfg))?;
                glm_convert::load_model_tp(src.as_ref(), candle_core::DType::F32, &dev, g)?
            }
        };
        Ok((model, tok))
    }
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// 8 or 4.
    #[arg(long)]
    bits: u32,
    /// A training checkpoint directory or a dense .safetensors (with --preset/--config).
    input: PathBuf,
    /// The quantized .safetensors to write.
    output: PathBuf,
    #[command(flatten)]
    arch: ModelArgs,
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let bits = Bits::from_u32(a.bits)?;
    let (file, cfg) = dense_source(&a.input, &a.arch)?;
    let ckpt = glm_checkpoint::Checkpoint::open(&[&file])?;
    let r = glm_quant::quantize_checkpoint(&cfg, &ckpt, bits, &a.output)?;
    let before = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "{}: {} block linears to INT{}, {} tensors kept in f16; {:.2} MB -> {:.2} MB",
        a.output.display(),
        r.quantized,
        a.bits,
        r.kept,
        before as f64 / 1e6,
        r.bytes as f64 / 1e6
    );
    Ok(())
}

#[derive(Args)]
pub struct GenArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Most new tokens (per blank for `fill`).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// End tokens are banned until this many tokens are generated.
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    /// Argmax decoding (otherwise GLM-130B's defaults: temperature 1, top-p 0.7, seed 1234).
    #[arg(long)]
    greedy: bool,
    /// In [0, 2]; below 1e-5 greedy (as `glm serve` takes it).
    #[arg(long)]
    temperature: Option<f64>,
    /// Keep the k likeliest tokens (0: off).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling, in (0, 1] (1: off; as `glm serve` takes it).
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Beam search with this many beams (GLM's BeamSearchStrategy, deterministic; for `fill`, per blank).
    #[arg(long)]
    beams: Option<usize>,
    /// Beam search: score / ((5 + length) / 6)^length_penalty.
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f64,
    /// Beam search: ban tokens that would repeat an n-gram (0: off).
    #[arg(long, default_value_t = 3)]
    no_repeat_ngram: usize,
    /// Stop before this string (repeatable; `generate` only).
    #[arg(long)]
    stop: Vec<String>,
    /// Print the continuation as it is generated (`generate` only).
    #[arg(long)]
    stream: bool,
    /// One JSON object (text, tokens, stop reason) instead of the text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dist: TpArgs,
    /// The prompt ([gMASK] continuation) or the text with [MASK] blanks (`fill`).
    text: String,
}

impl GenArgs {
    fn sampling(&self) -> Result<SamplingConfig> {
        let base = if self.greedy { SamplingConfig::greedy(self.max_tokens) } else { SamplingConfig::default() };
        // The values given are checked as the server checks them (one function).
        let top_p = glm_infer::sampling::check_user_params(self.temperature.unwrap_or(1.0), self.top_p.unwrap_or(1.0))?;
        Ok(SamplingConfig {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: if self.top_p.is_some() { top_p } else { base.top_p },
            seed: self.seed.unwrap_or(base.seed),
            max_new_tokens: self.max_tokens,
            min_new_tokens: self.min_tokens,
        })
    }
}

pub fn generate(a: GenArgs, fill: bool) -> Result<()> {
    a.dist.run(if fill { "fill" } else { "generate" }, |rank| generate_on(&a, fill, rank))
}

/// One rank's generation (or the single process's): every rank decodes; rank 0 prints.
fn generate_on(a: &GenArgs, fill: bool, rank: Rank) -> Result<()> {
    let (model, tok) = a.source.load_on(rank.group)?;
    let g = Generator::new(&model, &tok)?;
    let cfg = a.sampling()?;
    let beam = a.beams.map(|n| glm_infer::BeamConfig {
        num_beams: n,
        length_penalty: a.length_penalty,
        no_repeat_ngram: a.no_repeat_ngram,
        min_new_tokens: a.min_tokens,
        max_new_tokens: a.max_tokens,
        deterministic: true,
        seed: a.seed.unwrap_or(1234),
    });
    let out = match (fill, beam) {
        (true, Some(beam)) => g.fill_beam(&a.text, &beam)?,
        (true, None) => g.fill(&a.text, &cfg)?,
        (false, Some(beam)) => g.complete_beam(&a.text, &beam)?,
        (false, None) if a.stream => {
            use std::io::Write;
            let main = rank.main();
            if main {
                print!("{}", a.text);
            }
            let out = g.complete_stream(&a.text, &cfg, &a.stop, &mut |t| {
                if main {
                    print!("{t}");
                    let _ = std::io::stdout().flush();
                }
            })?;
            rank.agree("generation", format!("{:?}", out.tokens).as_bytes())?;
            if main {
                println!();
            }
            return Ok(());
        }
        (false, None) if !a.stop.is_empty() => g.complete_stream(&a.text, &cfg, &a.stop, &mut |_| {})?,
        (false, None) => g.complete(&a.text, &cfg)?,
    };
    let text = if a.json {
        let spans: Vec<&str> = out.spans.iter().map(|s| s.text.as_str()).collect();
        serde_json::json!({"text": out.text, "tokens": out.tokens, "spans": spans, "stop": format!("{:?}", out.stop)})
            .to_string()
    } else {
        out.text
    };
    rank.agree("generation", text.as_bytes())?;
    if rank.main() {
        println!("{text}");
    }
    Ok(())
}

/// `glm bench decode`: batch-1 prefill and decode tokens/s for f32, INT8 and INT4, each in its own
/// process (so each peak RSS is its own), beside the memory-bandwidth floor measured in the run.
#[derive(Args)]
pub struct DecodeBenchArgs {
    /// A checkpoint (as for `glm generate`); without it, a seeded random `--preset` model.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    arch: ModelArgs,
    /// Prompt tokens (one prefill).
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Timed decode steps.
    #[arg(long, default_value_t = 32)]
    new: usize,
    /// Comma-separated: f32, int8, int4.
    #[arg(long, default_value = "f32,int8,int4", value_delimiter = ',')]
    precisions: Vec<String>,
    /// JSON lines instead of the table.
    #[arg(long)]
    json: bool,
    /// Python with torch for the PyTorch eager f32 decode baseline (env GLM_TORCH_PYTHON).
    #[arg(long, env = "GLM_TORCH_PYTHON", default_value = "python3")]
    torch_python: String,
    /// Skip the PyTorch baseline.
    #[arg(long)]
    no_torch: bool,
    /// Internal: measure one precision in this process.
    #[arg(long, hide = true)]
    only: Option<String>,
    /// Internal: with --only int8|int4, write the seeded random preset quantized to this file
    /// (so the measurement loads it as a user would, without the dense weights) and exit.
    #[arg(long, hide = true)]
    write_quantized: Option<PathBuf>,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct DecodeResult {
    model: String,
    precision: String,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    bytes_per_token: u64,
    bandwidth_gb_per_s: f64,
    floor_tokens_per_s: f64,
    peak_rss_bytes: u64,
    kernel: String,
    /// PyTorch eager f32 on the same config, same run (None when skipped).
    #[serde(default)]
    torch_decode_tokens_per_s: Option<f64>,
}

/// Read bandwidth: GB/s of reading a 512 MiB buffer on all threads (a sum, and the f32 matvec),
/// best of 3 each.
fn bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1f32; 128 << 20];
    let mut best = 0f64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        // Eight independent accumulators per chunk, so the sum is bound by memory, not by a chain of adds.
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 8];
                for v in c.chunks_exact(8) {
                    for l in 0..8 {
                        acc[l] += v[l];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((buf.len() * 4) as f64 / secs / 1e9);
        // The f32 decode matvec over the same 512 MiB (as [32768, 4096]) often reads faster than
        // the sum: the floor takes whichever is faster, so no kernel is measured against less than
        // what this machine has shown it can read.
        let (x, mut y) = (vec![1f32; 4096], vec![0f32; buf.len() / 4096]);
        let t = std::time::Instant::now();
        glm_nn::matvec::matvec(&buf, 4096, &x, 0.0, &mut y);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(&y);
        best = best.max((buf.len() * 4) as f64 / secs / 1e9);
    }
    best
}

fn peak_rss() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// A memory line of /proc/self/status (`VmHWM:` peak, `VmRSS:` now), in bytes; 0 elsewhere.
pub(crate) fn proc_status_bytes(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Weight bytes one decode step reads: every block linear at its precision, the tied head in f32.
fn bytes_per_token(cfg: &Config, bits: Option<Bits>) -> u64 {
    glm_model::param_table(cfg)
        .iter()
        .map(|p| {
            let n = p.numel();
            match (p.kind, bits) {
                (glm_model::ParamKind::QkvWeight | glm_model::ParamKind::LinearWeight, Some(b)) => {
                    p.shape[0] as u64 * (b.row_bytes(p.shape[1]) as u64 + 2)
                }
                (glm_model::ParamKind::Embedding, _) if cfg.tie_word_embeddings => n * 4, // the head reads it all
                (glm_model::ParamKind::Embedding, _) => 4 * cfg.hidden_size as u64,       // one row
                _ => n * 4,
            }
        })
        .sum()
}

/// The bits of a benchmark precision: f32 (None), int8, int4.
pub(crate) fn precision_bits(precision: &str) -> Result<Option<Bits>> {
    match precision {
        "f32" => Ok(None),
        "int8" => Ok(Some(Bits::Int8)),
        "int4" => Ok(Some(Bits::Int4)),
        p => bail!("unknown precision {p} (f32, int8, int4)"),
    }
}

/// A benchmark's model: the dense checkpoint `model`, or without it a seeded random `arch`
/// preset, quantized at load to `bits`.
pub(crate) fn bench_model(model: Option<&Path>, arch: &ModelArgs, bits: Option<Bits>) -> Result<(Config, Glm)> {
    use candle_core::{DType, Device};
    let dev = Device::Cpu;
    let (cfg, weights) = match model {
        Some(p) => {
            let (file, cfg) = dense_source(p, arch)?;
            let ckpt = glm_checkpoint::Checkpoint::open(&[&file])?;
            (cfg.clone(), ckpt.load_all(&glm_model::tensor_specs(&cfg), DType::F32, &dev)?)
        }
        None => {
            let cfg = arch.resolve()?;
            let w = glm_model::init_weights(&cfg, 1, &dev)?;
            (cfg, w)
        }
    };
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &dev);
    let model = match bits {
        None => Glm::new(&cfg, vb, &glm_nn::DenseFactory)?,
        Some(b) => Glm::new(&cfg, vb, &glm_quant::QuantFactory::quantize(b))?,
    };
    Ok((cfg, model))
}

fn measure_one(a: &DecodeBenchArgs, precision: &str) -> Result<DecodeResult> {
    use candle_core::{DType, Device};
    // "file": a quantized --model, at its own precision.
    let bits = if precision == "file" { None } else { precision_bits(precision)? };
    let dev = Device::Cpu;
    if let (Some(out), Some(b)) = (&a.write_quantized, bits) {
        let cfg = a.arch.resolve()?;
        let w = glm_model::init_weights(&cfg, 1, &dev)?;
        let load = |name: &str| w.get(name).cloned().ok_or_else(|| format!("no tensor {name}"));
        glm_quant::quantize_tensors(&cfg, load, b, out)?;
        return Ok(DecodeResult::default());
    }
    if let Some(p) = a.model.as_deref().filter(|p| !p.is_dir() && QuantCheckpoint::is_quantized(p)) {
        // A quantized checkpoint: its own precision, loaded without dense block weights.
        let q = QuantCheckpoint::open(p)?;
        check_arch(&q.config, &a.arch, p)?;
        let model = q.model(DType::F32, &dev)?;
        return time_decode(a, &q.config, &model, Some(q.bits), &format!("int{} (file)", q.bits.bits()));
    }
    let (cfg, model) = bench_model(a.model.as_deref(), &a.arch, bits)?;
    time_decode(a, &cfg, &model, bits, precision)
}

fn time_decode(
    a: &DecodeBenchArgs,
    cfg: &Config,
    model: &Glm,
    bits: Option<Bits>,
    precision: &str,
) -> Result<DecodeResult> {
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let cfg = cfg.clone();
    if a.prompt == 0 || a.prompt + a.new + 1 > cfg.max_seq_len {
        bail!("--prompt {} + --new {} must fit in max_seq_len {}", a.prompt, a.new, cfg.max_seq_len);
    }
    let ids: Vec<u32> = (0..a.prompt as u32).map(|i| 100 + i * 7 % 1000).collect();
    let layout = glm_nn::AttnLayout::prefix_lm(&[a.prompt]);
    let run = |cache: &mut glm_model::KvCache, toks: &[u32], from: usize| -> Result<Tensor> {
        let n = toks.len();
        let pos: Vec<u32> = (from as u32..(from + n) as u32).collect();
        let ids = Tensor::from_vec(toks.to_vec(), (1, n), &dev)?;
        let pos = Tensor::from_vec(pos, (1, n), &dev)?;
        Ok(model.forward(&ids, &pos, &layout, Some(cache))?)
    };
    // Warm-up, then the timed prefill and decode.
    run(&mut glm_model::KvCache::new(&cfg), &ids, 0)?;
    let mut cache = glm_model::KvCache::new(&cfg);
    let t = std::time::Instant::now();
    let logits = run(&mut cache, &ids, 0)?;
    let prefill = a.prompt as f64 / t.elapsed().as_secs_f64();
    let mut next = logits.squeeze(0)?.get(a.prompt - 1)?.argmax(0)?.to_scalar::<u32>()?;
    let t = std::time::Instant::now();
    for i in 0..a.new {
        let l = run(&mut cache, &[next], a.prompt + i)?;
        next = l.squeeze(0)?.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
    }
    let decode = a.new as f64 / t.elapsed().as_secs_f64();
    let bytes = bytes_per_token(&cfg, bits);
    Ok(DecodeResult {
        model: cfg.name.clone(),
        precision: precision.to_string(),
        prefill_tokens_per_s: prefill,
        decode_tokens_per_s: decode,
        bytes_per_token: bytes,
        bandwidth_gb_per_s: 0.0, // the parent measures it, outside this process's peak RSS
        floor_tokens_per_s: 0.0,
        peak_rss_bytes: peak_rss(),
        kernel: glm_quant::kernel_name().to_string(),
        torch_decode_tokens_per_s: None,
    })
}

pub fn bench_decode(a: DecodeBenchArgs) -> Result<()> {
    if let Some(p) = &a.only {
        println!("{}", serde_json::to_string(&measure_one(&a, p)?)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the glm binary")?;
    let mut rows = Vec::new();
    let quantized_file = a.model.as_deref().is_some_and(|p| !p.is_dir() && QuantCheckpoint::is_quantized(p));
    let precisions = if quantized_file { vec!["file".to_string()] } else { a.precisions.clone() };
    let base_args: Vec<String> = std::env::args().skip(1).filter(|x| x != "--json" && x != "--no-torch").collect();
    let child = |extra: &[String]| -> Result<Vec<u8>> {
        let o = std::process::Command::new(&exe)
            .args(&base_args)
            .arg("--no-torch")
            .args(extra)
            .output()
            .context("running the measurement")?;
        if !o.status.success() {
            bail!("{}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(o.stdout)
    };
    let tmp = std::env::temp_dir();
    for p in &precisions {
        // A random preset at INT8/INT4 is first written as a quantized file by another process, so
        // the measured one loads it as `glm generate --model` would (its peak RSS without the
        // dense weights).
        let mut extra = vec!["--only".to_string(), p.clone()];
        let mut written = None;
        if a.model.is_none() && (p == "int8" || p == "int4") {
            let file = tmp.join(format!("glm-bench-decode-{}-{p}.safetensors", std::process::id()));
            let path = file.to_string_lossy().to_string();
            child(&["--only".to_string(), p.clone(), "--write-quantized".to_string(), path.clone()])
                .with_context(|| format!("{p}: writing the quantized model"))?;
            extra = vec!["--only".to_string(), p.clone(), "--model".to_string(), path];
            written = Some(file);
        }
        // The bandwidth right before each measurement: it drifts on a shared machine.
        let bw = bandwidth();
        let out = child(&extra).with_context(|| format!("measuring {p}"));
        if let Some(f) = written {
            let _ = std::fs::remove_file(f);
        }
        let out = out?;
        let mut r: DecodeResult = serde_json::from_slice(out.trim_ascii())
            .with_context(|| format!("{p}: unreadable result {}", String::from_utf8_lossy(&out)))?;
        if p != "file" {
            r.precision = p.clone(); // not "int4 (file)": the preset's file is an implementation detail
        }
        r.bandwidth_gb_per_s = bw;
        r.floor_tokens_per_s = bw * 1e9 / r.bytes_per_token as f64;
        rows.push(r);
    }
    // The PyTorch baseline: same config, f32 eager (only for presets and dense checkpoints' configs).
    let cfg = match &a.model {
        Some(p) if quantized_file => QuantCheckpoint::config_of(p).ok(),
        Some(p) => dense_source(p, &a.arch).ok().map(|(_, c)| c),
        None => a.arch.resolve().ok(),
    };
    let torch = match cfg {
        Some(c) if !a.no_torch && glm_bench::torch_available(&a.torch_python) => {
            match glm_bench::torch_decode_tokens_per_s(&a.torch_python, &c, a.prompt, a.new) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("PyTorch baseline failed: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    for r in rows.iter_mut() {
        r.torch_decode_tokens_per_s = torch;
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    }
    if !a.json {
        println!(
            "batch-1, {} prompt tokens then {} decode steps, CPU, {} kernels",
            a.prompt,
            a.new,
            rows.first().map(|r| r.kernel.as_str()).unwrap_or("?")
        );
        println!(
            "| model | precision | prefill tok/s | decode tok/s | weight bytes/token | floor tok/s (bandwidth) | decode / floor | peak RSS | decode / PyTorch f32 |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            let vs =
                r.torch_decode_tokens_per_s.map_or("-".to_string(), |t| format!("{:.2}x", r.decode_tokens_per_s / t));
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} MB | {:.1} ({:.1} GB/s) | {:.0}% | {:.0} MiB | {vs} |",
                r.model,
                r.precision,
                r.prefill_tokens_per_s,
                r.decode_tokens_per_s,
                r.bytes_per_token as f64 / 1e6,
                r.floor_tokens_per_s,
                r.bandwidth_gb_per_s,
                100.0 * r.decode_tokens_per_s / r.floor_tokens_per_s,
                r.peak_rss_bytes as f64 / (1u64 << 20) as f64
            );
        }
        match torch {
            Some(t) => {
                println!("PyTorch eager (py/torch_forward.py), f32, same config and threads: {t:.1} decode tokens/s")
            }
            None => println!("PyTorch baseline skipped (--no-torch, or no torch in {})", a.torch_python),
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
}

/// `glm chat`: read a question per line, stream the answer, keep the conversation as context
/// (in the model's chat format: ChatGLM-6B's `[Round i]` turns for its tokenizer, `问：... 答：...`
/// otherwise; older turns drop out when the context is full).
pub fn chat(a: ChatArgs) -> Result<()> {
    use std::io::{BufRead, Write};
    let (model, tok) = a.source.load()?;
    let g = Generator::new(&model, &tok)?;
    let budget = model.config().max_seq_len.saturating_sub(a.max_tokens + 8);
    // (question, answer) turns, in the model's own chat format.
    let mut turns: Vec<(String, String)> = Vec::new();
    let template = glm_infer::ChatTemplate::for_tokenizer(&tok);
    let stdin = std::io::stdin();
    eprintln!("glm chat: one question per line; end with Ctrl-D.");
    for (i, line) in stdin.lock().lines().enumerate() {
        let q = line.context("reading stdin")?;
        if q.trim().is_empty() {
            continue;
        }
        turns.push((q, String::new()));
        // Drop the oldest turns until the prompt fits.
        let prompt_of = |turns: &[(String, String)]| {
            let n = turns.len();
            let msgs = turns.iter().enumerate().flat_map(|(i, (q, a))| {
                let answer = (i + 1 < n).then_some(("assistant", a.as_str()));
                std::iter::once(("user", q.as_str())).chain(answer)
            });
            template.prompt(msgs)
        };
        while turns.len() > 1 && tok.encode(&prompt_of(&turns)).len() > budget {
            turns.remove(0);
        }
        let prompt = prompt_of(&turns);
        let cfg = SamplingConfig { max_new_tokens: a.max_tokens, seed: a.seed + i as u64, ..SamplingConfig::default() };
        let stops = [glm_infer::CHAT_STOP.to_string()];
        let out = g.complete_stream(&prompt, &cfg, &stops, &mut |t| {
            print!("{t}");
            let _ = std::io::stdout().flush();
        });
        match out {
            Ok(out) => {
                println!();
                if let Some(last) = turns.last_mut() {
                    last.1 = out.spans.first().map(|s| s.text.trim().to_string()).unwrap_or_default();
                }
            }
            Err(e) => {
                println!();
                eprintln!("error: {e}");
                turns.pop();
            }
        }
    }
    Ok(())
}
