//! `glm quantize`, `glm generate`, `glm fill`: quantized checkpoints and generation.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use glm_infer::{Generator, SamplingConfig};
use glm_model::{Config, Glm};
use glm_quant::{Bits, QuantCheckpoint};

use crate::ModelArgs;

/// Where a model comes from: a training checkpoint directory (`runs/x/checkpoints/step-N`, config in
/// its state.json), a quantized checkpoint (config in its header), or a dense safetensors file
/// (config from --preset/--config).
#[derive(Args)]
pub struct ModelSource {
    /// Checkpoint: a training checkpoint directory, a quantized .safetensors, or a dense .safetensors.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    arch: ModelArgs,
    /// tokenizer.json or SentencePiece .model (default: the embedded tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

/// The dense weights file and the config of a checkpoint path that is not quantized.
fn dense_source(path: &Path, arch: &ModelArgs) -> Result<(PathBuf, Config)> {
    if path.is_dir() {
        let state = path.join("state.json");
        let text = std::fs::read_to_string(&state).with_context(|| {
            format!("{}: not a training checkpoint directory (no readable state.json)", path.display())
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", state.display()))?;
        let cfg: Config = serde_json::from_value(v["model"].clone())
            .with_context(|| format!("{}: no model config", state.display()))?;
        check_arch(&cfg, arch, path)?;
        return Ok((path.join("model.safetensors"), cfg));
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

impl ModelSource {
    pub fn load(&self) -> Result<(Glm, glm_tokenizer::Tokenizer)> {
        let (tok, _) = glm_data::load_tokenizer(self.tokenizer.as_deref())?;
        let dev = candle_core::Device::Cpu;
        let model = if !self.model.is_dir() && QuantCheckpoint::is_quantized(&self.model) {
            let q = QuantCheckpoint::open(&self.model)?;
            check_arch(&q.config, &self.arch, &self.model)?;
            q.model(candle_core::DType::F32, &dev)?
        } else {
            let (file, cfg) = dense_source(&self.model, &self.arch)?;
            let ckpt = glm_checkpoint::Checkpoint::open(&[&file])?;
            Glm::from_checkpoint(&cfg, &ckpt, candle_core::DType::F32, &dev, &glm_nn::DenseFactory)?
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
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// One JSON object (text, tokens, stop reason) instead of the text.
    #[arg(long)]
    json: bool,
    /// The prompt ([gMASK] continuation) or the text with [MASK] blanks (`fill`).
    text: String,
}

impl GenArgs {
    fn sampling(&self) -> SamplingConfig {
        let base = if self.greedy { SamplingConfig::greedy(self.max_tokens) } else { SamplingConfig::default() };
        SamplingConfig {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
            seed: self.seed.unwrap_or(base.seed),
            max_new_tokens: self.max_tokens,
            min_new_tokens: self.min_tokens,
        }
    }
}

pub fn generate(a: GenArgs, fill: bool) -> Result<()> {
    let (model, tok) = a.source.load()?;
    let g = Generator::new(&model, &tok)?;
    let cfg = a.sampling();
    let out = if fill { g.fill(&a.text, &cfg)? } else { g.complete(&a.text, &cfg)? };
    if a.json {
        let spans: Vec<&str> = out.spans.iter().map(|s| s.text.as_str()).collect();
        let v = serde_json::json!({"text": out.text, "tokens": out.tokens, "spans": spans, "stop": format!("{:?}", out.stop)});
        println!("{v}");
    } else {
        println!("{}", out.text);
    }
    Ok(())
}
