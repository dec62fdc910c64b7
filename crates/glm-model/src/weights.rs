//! The one table of parameters: every tensor of a GLM model, by its released-checkpoint name
//! (`transformer.layers.{i}.attention.query_key_value.weight`, ...), with its shape and what it is.
//! Loading, saving, initialization, parameter counts and memory estimates all read this table;
//! the model's module paths (`vb.pp(..)`) spell the same names, so no second mapping exists.

use std::collections::HashMap;

use candle_core::Tensor;
use glm_checkpoint::TensorSpec;

use crate::config::Config;

/// Prefix of everything but the untied head.
pub const TRANSFORMER: &str = "transformer";
pub const WORD_EMBEDDINGS: &str = "word_embeddings";
pub const LAYERS: &str = "layers";
pub const FINAL_LAYERNORM: &str = "final_layernorm";
pub const LM_HEAD: &str = "lm_head";
pub const INPUT_LAYERNORM: &str = "input_layernorm";
pub const POST_ATTENTION_LAYERNORM: &str = "post_attention_layernorm";
pub const ATTENTION: &str = "attention";
pub const QKV: &str = "query_key_value";
pub const DENSE: &str = "dense";
pub const MLP: &str = "mlp";
pub const H_TO_4H: &str = "dense_h_to_4h";
pub const FOURH_TO_H: &str = "dense_4h_to_h";

/// What a parameter is: decides its initialization and whether weight-only quantization touches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Embedding,
    LmHead,
    NormWeight,
    NormBias,
    /// Fused per-head interleaved [q; k; v] projection weight.
    QkvWeight,
    /// Attention output, FFN up and FFN down weights (DeepNorm-scaled init).
    LinearWeight,
    Bias,
}

impl ParamKind {
    /// The four linear weights of every block are what INT8/INT4 quantize (spec section 5).
    pub fn quantizable(self) -> bool {
        matches!(self, ParamKind::QkvWeight | ParamKind::LinearWeight)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

impl ParamSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

pub fn layer_prefix(i: usize) -> String {
    format!("{TRANSFORMER}.{LAYERS}.{i}")
}

/// Every parameter of `cfg`, in checkpoint order.
pub fn param_table(cfg: &Config) -> Vec<ParamSpec> {
    let (h, v, up, f) = (cfg.hidden_size, cfg.vocab_size, cfg.ffn_up_size(), cfg.ffn_hidden_size);
    let mut t = Vec::with_capacity(12 * cfg.num_layers + 4);
    let mut add = |name: String, shape: Vec<usize>, kind| t.push(ParamSpec { name, shape, kind });
    add(format!("{TRANSFORMER}.{WORD_EMBEDDINGS}.weight"), vec![v, h], ParamKind::Embedding);
    for i in 0..cfg.num_layers {
        let p = layer_prefix(i);
        for ln in [INPUT_LAYERNORM, POST_ATTENTION_LAYERNORM] {
            add(format!("{p}.{ln}.weight"), vec![h], ParamKind::NormWeight);
            add(format!("{p}.{ln}.bias"), vec![h], ParamKind::NormBias);
        }
        let linears = [
            (format!("{p}.{ATTENTION}.{QKV}"), 3 * h, h, ParamKind::QkvWeight),
            (format!("{p}.{ATTENTION}.{DENSE}"), h, h, ParamKind::LinearWeight),
            (format!("{p}.{MLP}.{H_TO_4H}"), up, h, ParamKind::LinearWeight),
            (format!("{p}.{MLP}.{FOURH_TO_H}"), h, f, ParamKind::LinearWeight),
        ];
        for (name, out, inp, kind) in linears {
            add(format!("{name}.weight"), vec![out, inp], kind);
            add(format!("{name}.bias"), vec![out], ParamKind::Bias);
        }
    }
    add(format!("{TRANSFORMER}.{FINAL_LAYERNORM}.weight"), vec![h], ParamKind::NormWeight);
    add(format!("{TRANSFORMER}.{FINAL_LAYERNORM}.bias"), vec![h], ParamKind::NormBias);
    if !cfg.tie_word_embeddings {
        add(format!("{LM_HEAD}.weight"), vec![v, h], ParamKind::LmHead);
    }
    t
}

pub fn tensor_specs(cfg: &Config) -> Vec<TensorSpec> {
    param_table(cfg).into_iter().map(|p| TensorSpec { name: p.name, shape: p.shape }).collect()
}

/// Save a model's weights (checkpoint name -> tensor) as safetensors, atomically. Every parameter
/// of `cfg` must be present with its shape: a checkpoint that could not be loaded back is never
/// written (the error names the tensor), and an existing file is replaced only once the new one is
/// complete on disk.
pub fn save_weights(cfg: &Config, path: &std::path::Path, tensors: &HashMap<String, Tensor>) -> crate::Result<()> {
    for p in param_table(cfg) {
        match tensors.get(&p.name) {
            None => {
                return Err(crate::Error::Input(format!(
                    "cannot save {}: tensor `{}` is missing",
                    path.display(),
                    p.name
                )))
            }
            Some(t) if t.dims() != p.shape.as_slice() => {
                return Err(crate::Error::Input(format!(
                    "cannot save {}: tensor `{}` has shape {:?}, expected {:?}",
                    path.display(),
                    p.name,
                    t.dims(),
                    p.shape
                )))
            }
            Some(_) => {}
        }
    }
    Ok(glm_checkpoint::save_atomic(path, tensors)?)
}

/// The tensors of trainable variables, by name (what `save_weights` takes).
pub fn var_tensors(vm: &candle_nn::VarMap) -> crate::Result<HashMap<String, Tensor>> {
    let data = vm.data().lock().map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))?;
    Ok(data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect())
}

pub fn param_count(cfg: &Config) -> u64 {
    param_table(cfg).iter().map(ParamSpec::numel).sum()
}

/// Weight storage of a whole model, in bytes, for a storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WeightBytes {
    pub fp32: u64,
    pub fp16: u64,
    /// Weight-only INT8: the four block linears as int8 plus one fp16 scale per output row;
    /// embeddings, norms and biases stay fp16 (GLM-130B's scheme).
    pub int8: u64,
    /// Weight-only INT4: two weights a byte, plus one fp16 scale per row; the rest fp16.
    pub int4: u64,
}

pub fn weight_bytes(cfg: &Config) -> WeightBytes {
    let (mut fp32, mut fp16, mut int8, mut int4) = (0u64, 0u64, 0u64, 0u64);
    for p in param_table(cfg) {
        let n = p.numel();
        fp32 += 4 * n;
        fp16 += 2 * n;
        if p.kind.quantizable() {
            let rows = p.shape[0] as u64;
            int8 += n + 2 * rows;
            int4 += n.div_ceil(2) + 2 * rows;
        } else {
            int8 += 2 * n;
            int4 += 2 * n;
        }
    }
    WeightBytes { fp32, fp16, int8, int4 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glm_130b_has_128_70b_parameters() {
        let cfg = Config::glm_130b();
        // spec section 1: per layer 1,812,115,456; x70 + embedding 150528 x 12288 + final LN.
        assert_eq!(param_count(&cfg), 70 * 1_812_115_456 + 150_528 * 12_288 + 2 * 12_288);
        assert_eq!(param_count(&cfg), 128_697_794_560);
        let b = weight_bytes(&cfg);
        assert_eq!(b.fp16, 2 * 128_697_794_560);
        // Spec: linear weights alone are 126.84B, so INT4 is about 63.4 GB + scales + fp16 embedding.
        assert!((b.int4 as f64 / 1e9 - 67.2).abs() < 0.5, "{}", b.int4);
    }

    #[test]
    fn preset_sizes() {
        let n = |c: Config| param_count(&c) as f64 / 1e6;
        assert!((1.0..3.0).contains(&n(Config::tiny())), "{}", n(Config::tiny()));
        assert!((20.0..30.0).contains(&n(Config::small())));
        assert!((100.0..120.0).contains(&n(Config::base())));
        // The PyTorch anchor's model has 1,368,055,808 parameters and no final LayerNorm.
        assert_eq!(param_count(&Config::b1()), 1_368_055_808 + 2 * 2048);
        // 28 x 201.3M block parameters + embedding and untied head, 130528 x 4096 each.
        assert_eq!(param_count(&Config::chatglm_6b()), 6_707_929_088);
    }
}
