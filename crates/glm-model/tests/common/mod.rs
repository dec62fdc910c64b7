//! Golden fixtures from the official implementation (fixtures/golden, or $GLM_GOLDEN_DIR).
#![allow(dead_code)]

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use glm_checkpoint::Checkpoint;
use glm_model::{Config, Glm, SpecialTokens};
use glm_nn::{AttnLayout, DenseFactory};

pub fn golden_dir() -> PathBuf {
    match std::env::var_os("GLM_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"),
    }
}

pub struct Case {
    pub name: String,
    pub cfg: Config,
    pub weights: Checkpoint,
    pub io: Checkpoint,
    pub loss: Option<f64>,
}

impl Case {
    pub fn model(&self) -> Result<Glm> {
        self.model_in(DType::F32)
    }

    /// In f64 every fused CPU kernel (f32 only) falls back to its `_ref` twin, so the reference
    /// path is checked against the oracle too.
    pub fn model_in(&self, dtype: DType) -> Result<Glm> {
        Ok(Glm::from_checkpoint(&self.cfg, &self.weights, dtype, &Device::Cpu, &DenseFactory)?)
    }

    /// The model built on trainable variables, so backward gives every parameter's gradient.
    pub fn trainable(&self, dtype: DType) -> Result<(Glm, candle_nn::VarMap)> {
        let t = self.weights.load_all(&glm_model::tensor_specs(&self.cfg), dtype, &Device::Cpu)?;
        let vm = glm_model::var_map(t)?;
        let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
        Ok((Glm::new(&self.cfg, vb, &DenseFactory)?, vm))
    }

    pub fn io(&self, name: &str) -> Result<Tensor> {
        let dt = match self.io.names().any(|n| n == name) {
            true => match name {
                "input_ids" | "position_ids" | "prefix_len" | "targets" => DType::I64,
                _ => DType::F32,
            },
            false => return Err(anyhow!("{}: io file has no `{name}`", self.name)),
        };
        Ok(self.io.load(name, dt, &Device::Cpu)?)
    }

    pub fn has_io(&self, name: &str) -> bool {
        self.io.names().any(|n| n == name)
    }

    pub fn layout(&self) -> Result<AttnLayout> {
        let p: Vec<i64> = self.io("prefix_len")?.to_vec1()?;
        Ok(AttnLayout::prefix_lm(&p.iter().map(|&x| x as usize).collect::<Vec<_>>()))
    }
}

fn config_of(arch: &str, c: &serde_json::Value) -> Result<Config> {
    let base = match arch {
        "glm-130b" => Config::glm_130b(),
        "chatglm-6b" => Config::chatglm_6b(),
        other => return Err(anyhow!("unknown architecture {other}")),
    };
    let u = |k: &str| c[k].as_u64().map(|v| v as usize).ok_or_else(|| anyhow!("manifest config lacks {k}"));
    let cfg = Config {
        name: format!("golden-{arch}"),
        num_layers: u("num_layers")?,
        hidden_size: u("hidden_size")?,
        num_heads: u("num_heads")?,
        ffn_hidden_size: u("ffn_hidden_size")?,
        vocab_size: u("vocab_size")?,
        max_seq_len: u("max_seq_len")?,
        special_tokens: SpecialTokens {
            mask: u("mask_id")? as u32,
            gmask: u("gmask_id")? as u32,
            smask: u("smask_id")? as u32,
            eod: u("eod_id")? as u32,
            sop: u("sop_id")? as u32,
            eop: u("eop_id")? as u32,
        },
        ..base
    };
    cfg.validate()?;
    Ok(cfg)
}

pub fn cases() -> Result<Vec<Case>> {
    let dir = golden_dir();
    let manifest = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let m: serde_json::Value = serde_json::from_str(&text)?;
    let list = m["cases"].as_array().ok_or_else(|| anyhow!("manifest has no cases"))?;
    let mut out = Vec::new();
    for c in list {
        let s = |k: &str| c[k].as_str().map(str::to_string).ok_or_else(|| anyhow!("case lacks {k}"));
        out.push(Case {
            name: s("name")?,
            cfg: config_of(&s("architecture")?, &c["config"])?,
            weights: Checkpoint::open(&[dir.join(s("weights")?)])?,
            io: Checkpoint::open(&[dir.join(s("io")?)])?,
            loss: c["loss"].as_f64(),
        });
    }
    if out.is_empty() {
        return Err(anyhow!("{}: no cases", manifest.display()));
    }
    Ok(out)
}

/// max |a - b| / max |b|, computed in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(anyhow!("shape {:?} vs reference {:?}", a.dims(), b.dims()));
    }
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-30))
}
