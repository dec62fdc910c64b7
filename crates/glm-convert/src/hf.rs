//! ChatGLM-6B in the Hugging Face layout (huggingface.co/THUDM/chatglm-6b and its -int4/-int8
//! variants): `config.json` mapped to our config, and the weights from `pytorch_model.bin` or
//! `model.safetensors`, whole or sharded with an index (`*.index.json`'s `weight_map`).
//!
//! Config mapping (both released layouts): the pre-2023-04 release has vocabulary 150528 and no
//! mask ids in its config, the current one 130528 with `mask_token_id`/`gmask_token_id`; where they
//! are absent, [MASK] = `<sop>` − 4 and [gMASK] = `<sop>` − 3, as in both. [sMASK] and `<eod>`
//! (`<unused_0>`) follow [MASK] as in GLM's vocabulary. `quantization_bit` 4/8 means the block
//! linears are stored as `weight` (int8, INT4 packed two a byte, high nibble first) + `weight_scale`.
//! Names are ours already; `lm_head.weight`, when absent, is the embedding (the releases' two are
//! equal). The official code's DeepNorm alpha is sqrt(2 * 28) at any depth, and it keeps RoPE's
//! inverse frequencies in f16: the config says both.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use glm_checkpoint::raw::{open_store, RawStore};
use glm_model::weights::{LM_HEAD, TRANSFORMER, WORD_EMBEDDINGS};
use glm_model::{Config, FfnKind, PositionEncoding, SpecialTokens};
use glm_quant::Bits;

use crate::source::{agree, Flat};
use crate::{Error, Result};

/// ChatGLM-6B's `GLMBlock` default depth, which fixes its residual scale.
const CHATGLM_ALPHA_LAYERS: f64 = 28.0;

/// Our config (and the stored bit width) from a ChatGLM-6B `config.json`.
pub fn config_from_hf(v: &serde_json::Value, path: &Path) -> Result<(Config, Option<Bits>)> {
    let bad = |m: String| Error::Input(format!("{}: {m}", path.display()));
    let model_type = v["model_type"].as_str().unwrap_or("");
    if model_type != "chatglm" {
        return Err(bad(format!(
            "model_type `{model_type}`: only ChatGLM-6B (`chatglm`) is supported here \
             (ChatGLM2/3 are a different architecture)"
        )));
    }
    if v.get("multi_query_attention").and_then(|x| x.as_bool()) == Some(true) || v.get("kv_channels").is_some() {
        return Err(bad("this is a ChatGLM2/3 config (multi-query attention), not ChatGLM-6B".into()));
    }
    if v.get("pre_seq_len").is_some_and(|x| !x.is_null()) {
        return Err(bad(
            "P-tuning v2 prefixes (`pre_seq_len`) are not supported: merge or drop the prefix encoder".into()
        ));
    }
    if v.get("quantization_embeddings").and_then(|x| x.as_bool()) == Some(true) {
        return Err(bad("quantized embeddings (chatglm-6b-int4-qe) are not supported".into()));
    }
    let u = |k: &str| -> Result<usize> {
        v[k].as_u64().map(|x| x as usize).ok_or_else(|| bad(format!("`{k}` is missing or not a positive integer")))
    };
    let id = |k: &str| -> Result<Option<u32>> {
        match v.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(|x| Some(x as u32)).ok_or_else(|| bad(format!("`{k}` is not a token id"))),
        }
    };
    let (layers, hidden, heads, vocab) =
        (u("num_layers")?, u("hidden_size")?, u("num_attention_heads")?, u("vocab_size")?);
    let ffn = match v.get("inner_hidden_size") {
        None | Some(serde_json::Value::Null) => 4 * hidden,
        Some(_) => u("inner_hidden_size")?,
    };
    let sop = id("bos_token_id")?.ok_or_else(|| bad("`bos_token_id` (<sop>) is missing".into()))?;
    let eop = id("eos_token_id")?.ok_or_else(|| bad("`eos_token_id` (<eop>) is missing".into()))?;
    let mask = match id("mask_token_id")? {
        Some(m) => m,
        None => sop.checked_sub(4).ok_or_else(|| bad(format!("bos_token_id {sop} leaves no room for [MASK]")))?,
    };
    let gmask = id("gmask_token_id")?.unwrap_or(mask + 1);
    let bits = match v.get("quantization_bit").and_then(|b| b.as_u64()).unwrap_or(0) {
        0 => None,
        b => Some(Bits::from_u32(b as u32).map_err(|e| bad(e.to_string()))?),
    };
    let position_encoding = match v.get("position_encoding_2d").and_then(|b| b.as_bool()).unwrap_or(true) {
        true => PositionEncoding::Rope2d,
        false => PositionEncoding::Rope1d,
    };
    let eps = v.get("layernorm_epsilon").and_then(|e| e.as_f64()).unwrap_or(1e-5);
    let preset = Config::chatglm_6b();
    let cfg = Config {
        name: "chatglm-6b".into(),
        num_layers: layers,
        hidden_size: hidden,
        num_heads: heads,
        ffn_hidden_size: ffn,
        vocab_size: vocab,
        max_seq_len: v.get("max_sequence_length").and_then(|m| m.as_u64()).map_or(2048, |m| m as usize),
        layernorm_eps: eps,
        rope_base: 10000.0,
        ffn: FfnKind::GeluTanh,
        position_encoding,
        tie_word_embeddings: false,
        special_tokens: SpecialTokens { mask, gmask, smask: mask + 2, eod: mask + 3, sop, eop },
        residual_alpha: (layers as f64 != CHATGLM_ALPHA_LAYERS).then(|| (2.0 * CHATGLM_ALPHA_LAYERS).sqrt()),
        rope_f16_inv_freq: true,
    };
    let cfg = Config { name: if dims_of(&cfg) == dims_of(&preset) { preset.name } else { "chatglm-hf".into() }, ..cfg };
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok((cfg, bits))
}

fn dims_of(c: &Config) -> (usize, usize, usize, usize) {
    (c.num_layers, c.hidden_size, c.num_heads, c.ffn_hidden_size)
}

/// Opens a Hugging Face ChatGLM-6B folder.
pub fn open(dir: &Path, arch: Option<&Config>) -> Result<Flat> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::Input(format!("{}: {e}", cfg_path.display())))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: not JSON: {e}", cfg_path.display())))?;
    let (cfg, bits) = config_from_hf(&v, &cfg_path)?;
    let cfg = agree(cfg, arch, dir)?;
    let files = weight_files(dir)?;
    let mut stores: Vec<Box<dyn RawStore>> = Vec::with_capacity(files.len());
    for f in &files {
        stores.push(open_store(&dir.join(f), &[])?);
    }
    // The index, when there is one, must agree with the shards.
    if let Some(map) = index_map(dir)? {
        let names: HashMap<String, usize> =
            stores.iter().enumerate().flat_map(|(i, s)| s.names().into_iter().map(move |n| (n, i))).collect();
        for (tensor, shard) in &map {
            let at = names.get(tensor).map(|&i| files[i].as_str());
            if at != Some(shard.as_str()) {
                return Err(Error::Input(format!(
                    "{}: the index puts `{tensor}` in {shard}, but {}",
                    dir.display(),
                    at.map_or("no shard holds it".to_string(), |f| format!("it is in {f}"))
                )));
            }
        }
    }
    let mut alias = HashMap::new();
    let head = format!("{LM_HEAD}.weight");
    if !stores.iter().any(|s| s.info(&head).is_some()) {
        alias.insert(head, format!("{TRANSFORMER}.{WORD_EMBEDDINGS}.weight"));
    }
    let what = format!(
        "ChatGLM-6B Hugging Face checkpoint {} ({} file{}{})",
        dir.display(),
        files.len(),
        if files.len() == 1 { "" } else { "s" },
        bits.map_or(String::new(), |b| format!(", INT{}", b.bits()))
    );
    Ok(Flat::new(cfg, bits, what, stores, alias)?.released(true))
}

/// `weight_map` of the folder's index file, if any (safetensors first, as transformers prefers).
fn index_map(dir: &Path) -> Result<Option<Vec<(String, String)>>> {
    for name in ["model.safetensors.index.json", "pytorch_model.bin.index.json"] {
        let p = dir.join(name);
        if !p.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: not JSON: {e}", p.display())))?;
        let map =
            v["weight_map"].as_object().ok_or_else(|| Error::Input(format!("{}: no `weight_map`", p.display())))?;
        let mut out = Vec::with_capacity(map.len());
        for (k, f) in map {
            let f = f.as_str().ok_or_else(|| Error::Input(format!("{}: `{k}` maps to a non-string", p.display())))?;
            if f.contains('/') || f.contains("..") {
                return Err(Error::Input(format!("{}: shard name `{f}` leaves the folder", p.display())));
            }
            out.push((k.clone(), f.to_string()));
        }
        return Ok(Some(out));
    }
    Ok(None)
}

/// The weight files a folder should hold: the shards its index names, or its single file.
pub fn named_weight_files(dir: &Path) -> Result<Vec<String>> {
    if let Some(map) = index_map(dir)? {
        let shards: BTreeSet<String> = map.into_iter().map(|(_, f)| f).collect();
        return Ok(shards.into_iter().collect());
    }
    for single in ["model.safetensors", "pytorch_model.bin"] {
        if dir.join(single).is_file() {
            return Ok(vec![single.to_string()]);
        }
    }
    Err(Error::Input(format!(
        "{}: no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])",
        dir.display()
    )))
}

/// The weight files of a folder, every shard the index names present.
pub fn weight_files(dir: &Path) -> Result<Vec<String>> {
    let files = named_weight_files(dir)?;
    let missing: Vec<&str> = files.iter().filter(|f| !dir.join(f).is_file()).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(Error::Input(format!(
            "{}: {} of {} shards named in the index are missing: {}",
            dir.display(),
            missing.len(),
            files.len(),
            missing.join(", ")
        )));
    }
    Ok(files)
}
