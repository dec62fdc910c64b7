//! The training config: one TOML file (every field has a default, so `[optim]\nlr = 1e-3` is a
//! whole config). Defaults are the GLM-130B recipe (spec section 4) scaled to a `tiny` model on a
//! laptop CPU; sections mirror the recipe's parts.

use std::path::{Path, PathBuf};

use glm_data::ObjectiveConfig;
use serde::{Deserialize, Serialize};

use crate::monitor::MonitorConfig;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere.
    F32,
    /// bf16 forward and backward, f32 master weights and Adam states.
    Bf16,
    /// f16 forward and backward with dynamic loss scaling, f32 master weights and Adam states.
    F16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Model preset (`glm info` lists them); ignored when `model_config` is set.
    pub preset: String,
    /// A model config JSON (`glm config` writes one).
    pub model_config: Option<PathBuf>,
    pub seed: u64,
    /// Optimizer steps to run (counting skipped ones).
    pub max_steps: u64,
    pub precision: Precision,
    pub data: DataConfig,
    pub objective: ObjectiveConfig,
    pub optim: OptimConfig,
    pub batch: BatchConfig,
    pub regularization: RegConfig,
    pub scaler: ScalerConfig,
    pub checkpoint: CheckpointConfig,
    pub eval: EvalConfig,
    pub monitor: MonitorConfig,
    pub faults: FaultConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            preset: "tiny".into(),
            model_config: None,
            seed: 1234,
            max_steps: 600,
            precision: Precision::F32,
            data: DataConfig::default(),
            objective: ObjectiveConfig { seq_len: 256, ..ObjectiveConfig::default() },
            optim: OptimConfig::default(),
            batch: BatchConfig::default(),
            regularization: RegConfig::default(),
            scaler: ScalerConfig::default(),
            checkpoint: CheckpointConfig::default(),
            eval: EvalConfig::default(),
            monitor: MonitorConfig::default(),
            faults: FaultConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Shards made by `glm data prepare`; the embedded corpus when absent.
    pub dir: Option<PathBuf>,
    /// A tokenizer.json or SentencePiece .model; the embedded tokenizer when absent.
    pub tokenizer: Option<PathBuf>,
    /// Instruction data (JSONL with prompt/target) for MIP; the embedded set when absent.
    pub instructions: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate (GLM-130B: 8e-5 at 130B; small models take larger ones).
    pub lr: f64,
    /// Cosine decay ends at lr * min_lr_ratio (GLM-130B: 0.1).
    pub min_lr_ratio: f64,
    /// Linear warmup, in samples (rows). 0: 1% of the samples of `max_steps`.
    pub warmup_samples: u64,
    /// The cosine reaches its floor after this many samples. 0: all samples of `max_steps`.
    pub decay_samples: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (AdamW), not applied to biases and LayerNorm parameters.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 turns clipping off).
    pub clip_grad: f64,
    /// The fused CPU AdamW kernel (false: the reference built from tensor ops).
    pub fused: bool,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_samples: 0,
            decay_samples: 0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip_grad: 1.0,
            fused: true,
        }
    }
}

/// Rows per optimizer step. The batch ramps from `ramp_start` to `global` in steps of
/// `ramp_increment` over the first `ramp_samples` samples (Megatron's `rampup_batch_size`; GLM-130B
/// 192 -> 4224 by 24). Each step runs global / micro_batch micro-batches and accumulates gradients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub micro_batch: usize,
    pub global: usize,
    pub ramp_start: usize,
    pub ramp_increment: usize,
    pub ramp_samples: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { micro_batch: 8, global: 16, ramp_start: 8, ramp_increment: 8, ramp_samples: 800 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegConfig {
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    /// Embedding gradient shrink alpha (1 = off; the paper's 0.1).
    pub egs_alpha: f64,
}

impl Default for RegConfig {
    fn default() -> Self {
        Self { hidden_dropout: 0.1, attention_dropout: 0.1, egs_alpha: 0.1 }
    }
}

/// Dynamic loss scaling for f16 (DeepSpeed's semantics, GLM-130B's values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalerConfig {
    pub initial: f64,
    /// Overflow-free steps before the scale doubles.
    pub window: u64,
    /// Overflows tolerated before the scale halves.
    pub hysteresis: u32,
    pub min: f64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        Self { initial: 65536.0, window: 2000, hysteresis: 2, min: 1.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every this many steps (and at the end). 0: only at the end.
    pub every: u64,
    /// Checkpoints kept (oldest deleted first); at least 1.
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every: 100, keep: 3 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Validate every this many steps (and at the end). 0: only at the end.
    pub every: u64,
    /// Held-out rows for the objective loss, and documents for bits-per-byte.
    pub rows: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { every: 100, rows: 64 }
    }
}

/// Deliberate faults, to test that the monitor and the scaler react (chaos testing). Each fires once
/// per run at the step given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Steps whose loss (and so gradients) become NaN.
    pub nan_at: Vec<u64>,
    /// Steps whose loss is multiplied by `spike_factor` (a real spike: the gradients grow too).
    pub spike_at: Vec<u64>,
    pub spike_factor: f64,
    /// Steps whose gradients get an inf (what an f16 overflow looks like).
    pub inf_grad_at: Vec<u64>,
}

impl TrainConfig {
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::Config(format!("bad training config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: cannot read: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(format!("cannot write the config as TOML: {e}")))
    }

    /// The model architecture this config trains.
    pub fn model(&self) -> Result<glm_model::Config> {
        Ok(match &self.model_config {
            Some(p) => glm_model::Config::load(p)?,
            None => glm_model::Config::preset(&self.preset)?,
        })
    }

    /// A short hash of the whole config (stored in checkpoints, compared on resume).
    pub fn hash(&self) -> String {
        glm_data::content_hash(serde_json::to_string(self).unwrap_or_default().as_bytes())
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let b = &self.batch;
        if b.micro_batch == 0 || b.global == 0 {
            return bad("batch.micro_batch and batch.global must be at least 1".into());
        }
        for (name, v) in [("batch.global", b.global), ("batch.ramp_start", b.ramp_start)] {
            if !v.is_multiple_of(b.micro_batch) {
                return bad(format!("{name} = {v} is not a multiple of batch.micro_batch = {}", b.micro_batch));
            }
        }
        if b.ramp_start < b.global && (b.ramp_increment == 0 || !b.ramp_increment.is_multiple_of(b.micro_batch)) {
            return bad(format!(
                "batch.ramp_increment = {} must be a positive multiple of batch.micro_batch = {}",
                b.ramp_increment, b.micro_batch
            ));
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr.is_finite() && (0.0..=1.0).contains(&o.min_lr_ratio)) {
            return bad(format!("optim.lr = {} must be positive, optim.min_lr_ratio in [0, 1]", o.lr));
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) || o.eps <= 0.0 || o.weight_decay < 0.0 {
            return bad("optim: betas in [0, 1), eps > 0, weight_decay >= 0".into());
        }
        if o.clip_grad < 0.0 {
            return bad(format!("optim.clip_grad = {} is negative", o.clip_grad));
        }
        let r = &self.regularization;
        for (name, p) in [("hidden_dropout", r.hidden_dropout), ("attention_dropout", r.attention_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("regularization.{name} = {p} is outside [0, 1)"));
            }
        }
        if !(r.egs_alpha > 0.0 && r.egs_alpha <= 1.0) {
            return bad(format!("regularization.egs_alpha = {} is outside (0, 1]", r.egs_alpha));
        }
        let s = &self.scaler;
        if s.initial < s.min || s.min <= 0.0 || s.window == 0 || s.hysteresis == 0 {
            return bad("scaler: initial >= min > 0, window >= 1, hysteresis >= 1".into());
        }
        if self.checkpoint.keep == 0 {
            return bad("checkpoint.keep must be at least 1".into());
        }
        if self.max_steps == 0 {
            return bad("max_steps must be at least 1".into());
        }
        self.monitor.validate().map_err(Error::Config)?;
        self.objective.validate().map_err(|e| Error::Config(format!("objective: {e}")))?;
        Ok(())
    }
}
