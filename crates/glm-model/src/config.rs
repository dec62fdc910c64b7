//! One config struct with named presets, validated when built (`validate`), saved and loaded as JSON.
//! Derived values (head dim, DeepNorm alpha and beta) are methods, never stored.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::{Error, Result};

/// Which FFN the blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FfnKind {
    /// GLM-130B: `dense_h_to_4h` gives [x1 | x2] (2F), out = dense_4h_to_h(x1 * gelu_erf(x2)).
    #[serde(rename = "geglu")]
    GeGlu,
    /// ChatGLM-6B: out = dense_4h_to_h(gelu_tanh(dense_h_to_4h(x))), no gating.
    GeluTanh,
}

/// How positions enter RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PositionEncoding {
    /// GLM-130B: one position id per token, RoPE over the whole head.
    #[serde(rename = "rope-1d")]
    Rope1d,
    /// ChatGLM-6B: (position, block position) per token, each turning one half of the head.
    #[serde(rename = "rope-2d")]
    Rope2d,
}

/// GLM's special tokens (spec section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub mask: u32,
    pub gmask: u32,
    pub smask: u32,
    pub eod: u32,
    pub sop: u32,
    pub eop: u32,
}

impl SpecialTokens {
    /// The six ids in a row from `first`, in GLM-130B's order.
    pub const fn from(first: u32) -> Self {
        Self { mask: first, gmask: first + 1, smask: first + 2, eod: first + 3, sop: first + 4, eop: first + 5 }
    }

    pub fn all(&self) -> [(&'static str, u32); 6] {
        [
            ("mask", self.mask),
            ("gmask", self.gmask),
            ("smask", self.smask),
            ("eod", self.eod),
            ("sop", self.sop),
            ("eop", self.eop),
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub name: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    /// F: the FFN inner size (GeGLU: the size of x1 and of x2; `dense_h_to_4h` outputs 2F).
    pub ffn_hidden_size: usize,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub layernorm_eps: f64,
    pub rope_base: f64,
    pub ffn: FfnKind,
    pub position_encoding: PositionEncoding,
    /// GLM-130B ties the output head to the word embedding; ChatGLM-6B has its own `lm_head`.
    pub tie_word_embeddings: bool,
    pub special_tokens: SpecialTokens,
    /// DeepNorm's residual scale when it is not sqrt(2L): ChatGLM-6B's Hugging Face code uses
    /// sqrt(2 * 28) whatever its layer count (its `GLMBlock` default `num_layers=28` is never
    /// overridden), so a ChatGLM imported with another depth carries it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_alpha: Option<f64>,
    /// RoPE's inverse frequencies rounded to f16, as ChatGLM-6B's Hugging Face code keeps them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rope_f16_inv_freq: bool,
}

pub const PRESETS: [&str; 6] = ["tiny", "small", "base", "1b", "chatglm-6b", "glm-130b"];

impl Config {
    /// A GLM-130B-architecture config (post-LN DeepNorm, GeGLU, 1-D RoPE, tied head).
    pub fn glm_arch(name: &str, layers: usize, hidden: usize, heads: usize, ffn: usize, vocab: usize) -> Self {
        Self {
            name: name.to_string(),
            num_layers: layers,
            hidden_size: hidden,
            num_heads: heads,
            ffn_hidden_size: ffn,
            vocab_size: vocab,
            max_seq_len: 2048,
            layernorm_eps: 1e-5,
            rope_base: 10000.0,
            ffn: FfnKind::GeGlu,
            position_encoding: PositionEncoding::Rope1d,
            tie_word_embeddings: true,
            residual_alpha: None,
            rope_f16_inv_freq: false,
            // Small presets: 64 ids at the top of the vocabulary are reserved, specials first.
            special_tokens: SpecialTokens::from(vocab.saturating_sub(64) as u32),
        }
    }

    /// ~1.9M parameters: trains in minutes on 2 CPU cores.
    pub fn tiny() -> Self {
        Self { max_seq_len: 512, ..Self::glm_arch("tiny", 4, 128, 4, 384, 8192) }
    }

    /// ~23M parameters.
    pub fn small() -> Self {
        Self { max_seq_len: 1024, ..Self::glm_arch("small", 6, 384, 6, 1024, 32768) }
    }

    /// ~110M parameters (BERT-base / GPT-2-small size).
    pub fn base() -> Self {
        Self::glm_arch("base", 12, 768, 12, 2048, 32768)
    }

    /// 1.37B: the config of the PyTorch throughput anchor (shared/anchors/torch_glm.py).
    pub fn b1() -> Self {
        Self::glm_arch("1b", 24, 2048, 16, 5632, 65536)
    }

    pub fn glm_130b() -> Self {
        Self { special_tokens: SpecialTokens::from(150000), ..Self::glm_arch("glm-130b", 70, 12288, 96, 32768, 150528) }
    }

    /// ChatGLM-6B v1.1: 2-D RoPE, tanh-GELU MLP (not gated), untied head, ids = GLM-130B's - 20000.
    pub fn chatglm_6b() -> Self {
        Self {
            name: "chatglm-6b".into(),
            num_layers: 28,
            hidden_size: 4096,
            num_heads: 32,
            ffn_hidden_size: 16384,
            vocab_size: 130528,
            max_seq_len: 2048,
            layernorm_eps: 1e-5,
            rope_base: 10000.0,
            ffn: FfnKind::GeluTanh,
            position_encoding: PositionEncoding::Rope2d,
            tie_word_embeddings: false,
            special_tokens: SpecialTokens::from(130000),
            residual_alpha: None,
            rope_f16_inv_freq: false,
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        let cfg = match name {
            "tiny" => Self::tiny(),
            "small" => Self::small(),
            "base" => Self::base(),
            "1b" => Self::b1(),
            "chatglm-6b" => Self::chatglm_6b(),
            "glm-130b" => Self::glm_130b(),
            other => {
                return Err(Error::Config(format!("unknown preset `{other}`; known presets: {}", PRESETS.join(", "))))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| Error::Config(format!("bad config JSON: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: cannot read config: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn to_json(&self) -> String {
        // A struct of plain fields always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json() + "\n")
            .map_err(|e| Error::Config(format!("{}: cannot write config: {e}", path.display())))
    }

    /// D
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// DeepNorm residual scale alpha = (2L)^(1/2), unless the config fixes it (`residual_alpha`).
    pub fn deepnorm_alpha(&self) -> f64 {
        self.residual_alpha.unwrap_or_else(|| (2.0 * self.num_layers as f64).sqrt())
    }

    /// DeepNorm init gain beta = (2L)^(-1/2), on the FFN, v and out projections.
    pub fn deepnorm_beta(&self) -> f64 {
        (2.0 * self.num_layers as f64).powf(-0.5)
    }

    /// Chunks the head is cut into for RoPE.
    pub fn rope_parts(&self) -> usize {
        match self.position_encoding {
            PositionEncoding::Rope1d => 1,
            PositionEncoding::Rope2d => 2,
        }
    }

    /// Output width of `dense_h_to_4h`.
    pub fn ffn_up_size(&self) -> usize {
        match self.ffn {
            FfnKind::GeGlu => 2 * self.ffn_hidden_size,
            FfnKind::GeluTanh => self.ffn_hidden_size,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("config `{}`: {m}", self.name)));
        // Each size read from a file or flag is bounded, far above any released GLM (GLM-130B: 70
        // layers, hidden 12288, 96 heads, FFN 32768, 150528 ids, 2048 positions) and far below
        // what would make a shape or an allocation overflow.
        for (field, v, max) in [
            ("num_layers", self.num_layers, 1 << 10),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("num_heads", self.num_heads, 1 << 12),
            ("ffn_hidden_size", self.ffn_hidden_size, 1 << 19),
            ("vocab_size", self.vocab_size, 1 << 22),
            ("max_seq_len", self.max_seq_len, 1 << 17),
        ] {
            if v == 0 {
                return bad(format!("{field} must be positive"));
            }
            if v > max {
                return bad(format!("{field} = {v} is over the limit of {max}"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!("hidden_size {} is not divisible by num_heads {}", self.hidden_size, self.num_heads));
        }
        let d = self.head_dim();
        let parts = self.rope_parts();
        if !d.is_multiple_of(2 * parts) {
            return bad(format!(
                "head dim {d} (hidden_size / num_heads) must be divisible by {} for {:?} \
                 (RoPE rotates pairs of halves{})",
                2 * parts,
                self.position_encoding,
                if parts == 2 { " in each of two halves" } else { "" }
            ));
        }
        if !(self.layernorm_eps > 0.0 && self.layernorm_eps.is_finite()) {
            return bad(format!("layernorm_eps must be a positive number, got {}", self.layernorm_eps));
        }
        if let Some(a) = self.residual_alpha.filter(|a| !(*a > 0.0 && a.is_finite())) {
            return bad(format!("residual_alpha must be a positive number, got {a}"));
        }
        if !(self.rope_base > 1.0 && self.rope_base.is_finite()) {
            return bad(format!("rope_base must be > 1, got {}", self.rope_base));
        }
        for (name, id) in self.special_tokens.all() {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "special token {name} = {id} is outside the vocabulary (size {})",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_roundtrip() {
        for name in PRESETS {
            let cfg = Config::preset(name).expect(name);
            assert_eq!(Config::from_json(&cfg.to_json()).expect("json"), cfg);
        }
        assert!(Config::preset("nope").unwrap_err().to_string().contains("tiny"));
    }

    #[test]
    fn invalid_configs_fail_clearly() {
        let msg = |c: Config| c.validate().unwrap_err().to_string();
        assert!(msg(Config { num_heads: 3, ..Config::tiny() }).contains("not divisible by num_heads"));
        // head dim 130 / 2 = 65: odd, RoPE cannot rotate halves.
        let odd = Config { hidden_size: 130, num_heads: 2, ..Config::tiny() };
        assert!(msg(odd).contains("head dim 65"));
        // 2-D RoPE needs the head dim divisible by 4.
        let c = Config { hidden_size: 12, num_heads: 2, position_encoding: PositionEncoding::Rope2d, ..Config::tiny() };
        assert!(msg(c).contains("divisible by 4"));
        assert!(msg(Config { num_layers: 0, ..Config::tiny() }).contains("num_layers must be positive"));
        assert!(msg(Config { layernorm_eps: 0.0, ..Config::tiny() }).contains("layernorm_eps"));
        let c = Config { special_tokens: SpecialTokens::from(9000), ..Config::tiny() };
        assert!(msg(c).contains("outside the vocabulary"));
        assert!(Config::from_json("{\"name\": 1}").unwrap_err().to_string().contains("bad config JSON"));
        let mut j: serde_json::Value = serde_json::from_str(&Config::tiny().to_json()).unwrap();
        j["hidden_size"] = serde_json::json!(100);
        assert!(Config::from_json(&j.to_string()).unwrap_err().to_string().contains("divisible"));
        // Sizes from a file are bounded: a header saying max_seq_len = 1e12 does not load.
        j["hidden_size"] = serde_json::json!(128);
        j["max_seq_len"] = serde_json::json!(1_000_000_000_000u64);
        let e = Config::from_json(&j.to_string()).unwrap_err().to_string();
        assert!(e.contains("max_seq_len = 1000000000000 is over the limit of 131072"), "{e}");
        assert!(msg(Config { vocab_size: 1 << 30, ..Config::tiny() }).contains("vocab_size"));
        assert!(msg(Config { num_layers: 100_000, ..Config::tiny() }).contains("num_layers"));
        for name in PRESETS {
            assert!(Config::preset(name).expect(name).validate().is_ok(), "{name} within the limits");
        }
    }

    #[test]
    fn derived_values() {
        let c = Config::glm_130b();
        assert_eq!(c.head_dim(), 128);
        assert!((c.deepnorm_alpha() - 140f64.sqrt()).abs() < 1e-12);
        assert!((c.deepnorm_beta() - 0.0845).abs() < 1e-4);
        let fixed = Config { residual_alpha: Some(56f64.sqrt()), ..Config::tiny() };
        assert_eq!(fixed.deepnorm_alpha(), 56f64.sqrt());
        assert!(fixed.validate().is_ok());
        assert!(Config { residual_alpha: Some(0.0), ..Config::tiny() }.validate().is_err());
        // Configs saved before the field existed still load.
        let mut j: serde_json::Value = serde_json::from_str(&Config::tiny().to_json()).unwrap();
        assert!(j.get("residual_alpha").is_none());
        j.as_object_mut().unwrap().remove("residual_alpha");
        assert_eq!(Config::from_json(&j.to_string()).unwrap(), Config::tiny());
    }
}
