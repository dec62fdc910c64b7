//! What the generation tests share: seeded random models of the tiny configs.

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use glm_model::{init_weights, Config, FfnKind, Glm, PositionEncoding};
use glm_nn::LinearFactory;

/// A seeded random model of `cfg` whose linears come from `lin` (dense, INT4, ...).
pub fn model_with(cfg: &Config, seed: u64, lin: &dyn LinearFactory) -> Result<Glm> {
    let w = init_weights(cfg, seed, &Device::Cpu)?;
    Ok(Glm::new(cfg, VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), lin)?)
}

/// tiny, and a ChatGLM-style variant of it (2-D RoPE, tanh-GELU MLP, untied head).
pub fn configs() -> [Config; 2] {
    let chat = Config {
        name: "tiny-2d".into(),
        position_encoding: PositionEncoding::Rope2d,
        ffn: FfnKind::GeluTanh,
        tie_word_embeddings: false,
        ..Config::tiny()
    };
    [Config::tiny(), chat]
}
