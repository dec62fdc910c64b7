//! `glm reshard` and `glm bench dist`: distributed checkpoints and the cost of splitting a step.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct ReshardArgs {
    /// A training checkpoint directory (`runs/NAME/checkpoints/step-N`), at any TP degree.
    pub checkpoint: PathBuf,
    /// The new tensor-parallel degree (1: one `model.safetensors`, which `glm generate` reads).
    #[arg(long)]
    pub tp: usize,
    /// The new checkpoint directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn reshard(a: ReshardArgs) -> Result<()> {
    let state: serde_json::Value = serde_json::from_slice(&glm_train::ckpt::Checkpoints::load_state(&a.checkpoint)?)
        .with_context(|| format!("{}: bad state.json", a.checkpoint.display()))?;
    let cfg: glm_model::Config = serde_json::from_value(state["model"].clone())
        .with_context(|| format!("{}: state.json has no readable model config", a.checkpoint.display()))?;
    let from = glm_train::ckpt::checkpoint_tp(&a.checkpoint)?;
    glm_train::ckpt::Checkpoints::reshard(&a.checkpoint, &a.out, &cfg, a.tp)?;
    eprintln!("{}: tp {from} -> {} ({})", a.checkpoint.display(), a.tp, a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct DistBenchArgs {}

pub fn bench(_a: DistBenchArgs) -> Result<()> {
    anyhow::bail!("glm bench dist: not written yet")
}
