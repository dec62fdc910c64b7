//! GLM-130B's SwissArmyTransformer checkpoint folder: `latest` (the iteration, e.g. `49300`) and
//! `<iteration>/mp_rank_XX_model_states.pt`, one torch.save file `{"module": state_dict}` per
//! tensor-parallel rank, fp16, or int8 + `<key>_scale` after `tools/convert_tp.py
//! --quantization-bit-width 4|8` (whose row-parallel scales are per rank-local slice: merged, they
//! become a scale per row per rank).
//!
//! Opening checks the whole set before any weight is read: every rank file present (a gap or a
//! missing last rank is named: the degree comes from the shapes), each file whole (its ZIP
//! directory, pickle and every tensor's byte range), every tensor present on every rank with its
//! rank shape and dtype. Reading merges ranks with `layout`'s rules, a range of rows at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use glm_checkpoint::raw::RawStore;
use glm_checkpoint::torch::{TorchDtype, TorchFile};
use glm_model::weights::{param_table, ATTENTION, LAYERS, QKV, TRANSFORMER, WORD_EMBEDDINGS};
use glm_model::{Config, SpecialTokens};
use glm_quant::{Bits, QuantMatrix};

use crate::source::{check_tensor, packed_shape, quant_from_parts, Source, SCALE_SUFFIX};
use crate::{Error, Result};
use glm_dist::split::{check_tp, ignored, rank_rows, rank_shape, row_pieces, split_of, Split};

pub const LATEST: &str = "latest";
/// Written beside `latest` by `glm convert --to sat`: SAT's own model arguments plus our config.
pub const MODEL_CONFIG: &str = "model_config.json";

pub fn rank_file(k: usize) -> String {
    format!("mp_rank_{k:02}_model_states.pt")
}

/// A SAT checkpoint folder, opened and checked.
pub struct Sat {
    dir: PathBuf,
    iteration: String,
    ranks: Vec<TorchFile>,
    cfg: Config,
    bits: Option<Bits>,
    /// False only for a folder `glm convert` wrote from a model that was not released.
    released: bool,
}

fn input(m: String) -> Error {
    Error::Input(m)
}

/// The rank files of `iter_dir` by index.
pub fn rank_files(iter_dir: &Path) -> Result<BTreeMap<usize, PathBuf>> {
    let rd = std::fs::read_dir(iter_dir).map_err(|e| input(format!("{}: {e}", iter_dir.display())))?;
    let mut found = BTreeMap::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let k = name.strip_prefix("mp_rank_").and_then(|r| r.strip_suffix("_model_states.pt"));
        if let Some(k) = k.and_then(|k| k.parse::<usize>().ok()) {
            found.insert(k, e.path());
        }
    }
    Ok(found)
}

impl Sat {
    pub fn open(dir: &Path, arch: Option<&Config>) -> Result<Self> {
        let latest = dir.join(LATEST);
        let iteration = std::fs::read_to_string(&latest)
            .map_err(|e| input(format!("{}: {e}", latest.display())))?
            .trim()
            .to_string();
        if iteration.is_empty() || iteration.contains('/') || iteration.contains("..") {
            return Err(input(format!("{}: `{iteration}` is not an iteration folder name", latest.display())));
        }
        let iter_dir = dir.join(&iteration);
        if !iter_dir.is_dir() {
            return Err(input(format!(
                "{} says iteration `{iteration}`, but {} is not a folder",
                latest.display(),
                iter_dir.display()
            )));
        }
        let found = rank_files(&iter_dir)?;
        let Some(&last) = found.keys().next_back() else {
            return Err(input(format!("{}: no mp_rank_XX_model_states.pt files", iter_dir.display())));
        };
        let missing: Vec<String> = (0..=last).filter(|k| !found.contains_key(k)).map(rank_file).collect();
        if !missing.is_empty() {
            return Err(input(format!(
                "{}: {} of {} rank files missing: {} (an incomplete download or extraction?)",
                iter_dir.display(),
                missing.len(),
                last + 1,
                missing.join(", ")
            )));
        }
        // Every file must open whole before any weight is read.
        let mut ranks = Vec::with_capacity(found.len());
        for p in found.values() {
            ranks.push(TorchFile::open(p, &["module"])?);
        }
        let bits = stored_bits(&ranks[0])?;
        let cfg = config_for(dir, &ranks[0], arch)?;
        let (tp, rows0) = implied_tp(&ranks[0], &cfg)?;
        let qkv = format!("{TRANSFORMER}.{LAYERS}.0.{ATTENTION}.{QKV}.weight");
        if tp != ranks.len() {
            let shapes = format!(
                "`{qkv}` of {} has {rows0} of the {} rows of a `{}` model",
                rank_file(0),
                3 * cfg.hidden_size,
                cfg.name
            );
            return Err(input(if tp > ranks.len() {
                let names: Vec<String> = (ranks.len()..tp).map(rank_file).collect();
                format!(
                    "{}: the shapes say {tp} ranks ({shapes}), found {}: missing {}",
                    iter_dir.display(),
                    ranks.len(),
                    names.join(", ")
                )
            } else {
                format!(
                    "{}: {} rank files, but {shapes} (tensor-parallel degree {tp}): wrong config?",
                    iter_dir.display(),
                    ranks.len()
                )
            }));
        }
        check_tp(&cfg, tp)?;
        let released = released_flag(dir);
        let sat = Self { dir: dir.to_path_buf(), iteration, ranks, cfg, bits, released };
        sat.verify()?;
        Ok(sat)
    }

    pub fn tp(&self) -> usize {
        self.ranks.len()
    }

    fn verify(&self) -> Result<()> {
        let tp = self.tp();
        let mut expected: Vec<String> = Vec::new();
        for p in param_table(&self.cfg) {
            let split = split_of(&self.cfg, &p.name);
            let local = rank_shape(split, &p.shape, tp);
            let quant = self.bits.filter(|_| p.kind.quantizable());
            let want = quant.map_or(local.clone(), |b| packed_shape(b, &local));
            for r in &self.ranks {
                let info = r.info(&p.name).ok_or_else(|| {
                    input(format!("{}: tensor `{}` is missing (expected {:?})", r.path().display(), p.name, want))
                })?;
                check_tensor(r.path(), &p.name, &info, &want, quant.is_some())?;
                if quant.is_some() {
                    let s = format!("{}{SCALE_SUFFIX}", p.name);
                    let si = r.info(&s).ok_or_else(|| input(format!("{}: `{s}` is missing", r.path().display())))?;
                    if si.dtype != TorchDtype::F16 || si.shape != [local[0]] {
                        return Err(input(format!(
                            "{}: `{s}` is {:?} {:?}, expected f16 [{}]",
                            r.path().display(),
                            si.dtype,
                            si.shape,
                            local[0]
                        )));
                    }
                }
            }
            if quant.is_some() {
                expected.push(format!("{}{SCALE_SUFFIX}", p.name));
            }
            expected.push(p.name);
        }
        for r in &self.ranks {
            let extra: Vec<String> =
                r.names().filter(|n| !ignored(n) && !expected.iter().any(|e| e == n)).map(str::to_string).collect();
            if !extra.is_empty() {
                return Err(input(format!(
                    "{}: {} tensor(s) the `{}` model does not have, e.g. {}",
                    r.path().display(),
                    extra.len(),
                    self.cfg.name,
                    extra.iter().take(4).cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Ok(())
    }

    fn quant_rank(&self, k: usize, name: &str, bits: Bits) -> Result<QuantMatrix> {
        let r = &self.ranks[k];
        let t = r.get(name).ok_or_else(|| input(format!("{}: no `{name}`", r.path().display())))?;
        let s = format!("{name}{SCALE_SUFFIX}");
        let st = r.get(&s).ok_or_else(|| input(format!("{}: no `{s}`", r.path().display())))?;
        quant_from_parts(bits, name, r.read(name)?, t.shape[0], t.shape[1], &st.shape, &r.read(&s)?)
    }
}

/// The config of a SAT folder: the user's, else `model_config.json`'s, else GLM-130B's if the
/// shapes are its.
pub fn config_for(dir: &Path, rank0: &TorchFile, arch: Option<&Config>) -> Result<Config> {
    match arch {
        Some(c) => Ok(c.clone()),
        None => match read_model_config(dir)? {
            Some(c) => Ok(c),
            None => infer_config(rank0, dir),
        },
    }
}

/// The tensor-parallel degree rank 0's shapes imply (whole heads per rank), and its qkv rows.
pub fn implied_tp(rank0: &TorchFile, cfg: &Config) -> Result<(usize, usize)> {
    let qkv = format!("{TRANSFORMER}.{LAYERS}.0.{ATTENTION}.{QKV}.weight");
    let rows0 = rank0
        .get(&qkv)
        .map(|t| t.shape[0])
        .ok_or_else(|| input(format!("{}: no `{qkv}` (not a GLM checkpoint?)", rank0.path().display())))?;
    let h3 = 3 * cfg.hidden_size;
    Ok((if rows0 > 0 && h3.is_multiple_of(rows0) { h3 / rows0 } else { 0 }, rows0))
}

/// INT8/INT4 when rank 0 stores its first `query_key_value` weight as int8.
fn stored_bits(rank0: &TorchFile) -> Result<Option<Bits>> {
    let qkv = format!("{TRANSFORMER}.{LAYERS}.0.{ATTENTION}.{QKV}.weight");
    let Some(t) = rank0.get(&qkv) else { return Ok(None) };
    if t.dtype != TorchDtype::I8 {
        return Ok(None);
    }
    // The hidden size is the embedding's width; INT4 packs two columns a byte.
    let emb = format!("{TRANSFORMER}.{WORD_EMBEDDINGS}.weight");
    let h = rank0.get(&emb).and_then(|e| e.shape.get(1).copied()).unwrap_or(0);
    match t.shape.get(1) {
        Some(&c) if c == h => Ok(Some(Bits::Int8)),
        Some(&c) if 2 * c == h => Ok(Some(Bits::Int4)),
        _ => Err(input(format!(
            "{}: int8 `{qkv}` {:?} fits neither INT8 nor INT4 of hidden {h}",
            rank0.path().display(),
            t.shape
        ))),
    }
}

/// `model_config.json`: ours (with `glm_rs`), or SAT's own arguments for a GLM-130B-style model.
fn read_model_config(dir: &Path) -> Result<Option<Config>> {
    let p = dir.join(MODEL_CONFIG);
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| input(format!("{}: {e}", p.display())))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| input(format!("{}: not JSON: {e}", p.display())))?;
    if let Some(ours) = v.get("glm_rs") {
        let cfg = Config::from_json(&ours.to_string()).map_err(|e| input(format!("{}: {e}", p.display())))?;
        return Ok(Some(cfg));
    }
    let u = |k: &str| v[k].as_u64().map(|x| x as usize).ok_or_else(|| input(format!("{}: no `{k}`", p.display())));
    let (layers, hidden, heads, vocab) =
        (u("num_layers")?, u("hidden_size")?, u("num_attention_heads")?, u("vocab_size")?);
    let ffn = v["inner_hidden_size"].as_u64().map(|x| x as usize).unwrap_or(hidden * 8 / 3);
    let mut cfg = Config::glm_arch("glm-sat", layers, hidden, heads, ffn, vocab);
    if vocab == Config::glm_130b().vocab_size {
        cfg.special_tokens = SpecialTokens::from(150000);
    }
    cfg.max_seq_len = v["max_sequence_length"].as_u64().map_or(2048, |m| m as usize);
    cfg.validate().map_err(|e| input(format!("{}: {e}", p.display())))?;
    Ok(Some(cfg))
}

/// GLM-130B's config, when the files have its shapes (the release needs no config); otherwise
/// the user must say which model the files hold.
fn infer_config(rank0: &TorchFile, dir: &Path) -> Result<Config> {
    let emb =
        rank0.get(&format!("{TRANSFORMER}.{WORD_EMBEDDINGS}.weight")).map(|t| t.shape.clone()).unwrap_or_default();
    let prefix = format!("{TRANSFORMER}.{LAYERS}.");
    let layers = rank0
        .names()
        .filter_map(|n| n.strip_prefix(&prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let qkv_rows = rank0.get(&format!("{prefix}0.{ATTENTION}.{QKV}.weight")).map_or(0, |t| t.shape[0]);
    let c = Config::glm_130b();
    let tp = (3 * c.hidden_size).checked_div(qkv_rows).unwrap_or(0);
    if c.num_layers == layers && emb.get(1) == Some(&c.hidden_size) && emb.first().map(|r| r * tp) == Some(c.vocab_size)
    {
        return Ok(c);
    }
    Err(input(format!(
        "{}: the files hold {layers} layers of hidden size {}, not GLM-130B's; say which model they are with \
         --config FILE (`glm config --preset glm-130b --out c.json`, then edit the sizes and special tokens) or --preset",
        dir.display(),
        emb.get(1).copied().unwrap_or(0)
    )))
}

impl Source for Sat {
    fn config(&self) -> &Config {
        &self.cfg
    }
    fn describe(&self) -> String {
        format!(
            "GLM-130B SAT checkpoint {}, TP={}, iteration {}{}",
            self.dir.display(),
            self.tp(),
            self.iteration,
            self.bits.map_or(String::new(), |b| format!(", INT{}", b.bits()))
        )
    }
    fn bits(&self) -> Option<Bits> {
        self.bits
    }
    fn dtype(&self, name: &str) -> Result<TorchDtype> {
        self.ranks[0].get(name).map(|t| t.dtype).ok_or_else(|| input(format!("no tensor `{name}`")))
    }
    fn read_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        let tp = self.tp();
        let local = self.ranks[0].info(name).ok_or_else(|| input(format!("no tensor `{name}`")))?;
        let split = split_of(&self.cfg, name);
        let rows = match split {
            Split::Rows | Split::GluRows => local.rows() * tp,
            Split::Cols | Split::Replicated => local.rows(),
        };
        if r0 > r1 || r1 > rows {
            return Err(input(format!("tensor `{name}`: rows {r0}..{r1} of {rows}")));
        }
        Ok(match split {
            Split::Replicated => self.ranks[0].read_rows(name, r0, r1)?,
            Split::Rows | Split::GluRows => {
                let mut out = Vec::with_capacity((r1 - r0) * local.row_bytes());
                for (k, l0, l1) in row_pieces(split, rows, tp, r0, r1) {
                    out.extend(self.ranks[k].read_rows(name, l0, l1)?);
                }
                out
            }
            Split::Cols => {
                // Row i of the whole = row i of rank 0, then of rank 1, ...
                let parts: Vec<Vec<u8>> =
                    self.ranks.iter().map(|r| r.read_rows(name, r0, r1)).collect::<std::result::Result<_, _>>()?;
                let rb = local.row_bytes();
                let mut out = Vec::with_capacity((r1 - r0) * rb * tp);
                for i in 0..r1 - r0 {
                    for p in &parts {
                        out.extend_from_slice(&p[i * rb..(i + 1) * rb]);
                    }
                }
                out
            }
        })
    }
    fn quant(&self, name: &str) -> Result<QuantMatrix> {
        let bits = self.bits.ok_or_else(|| input(format!("{name}: the checkpoint is not quantized")))?;
        let parts: Vec<QuantMatrix> = (0..self.tp()).map(|k| self.quant_rank(k, name, bits)).collect::<Result<_>>()?;
        let refs: Vec<&QuantMatrix> = parts.iter().collect();
        let q = match split_of(&self.cfg, name) {
            Split::Rows => QuantMatrix::concat_rows(&refs),
            Split::Cols => QuantMatrix::concat_cols(&refs),
            Split::GluRows => {
                let halves: Vec<QuantMatrix> = [0, 1]
                    .iter()
                    .flat_map(|&h| parts.iter().map(move |p| p.slice_rows(h * p.rows / 2, (h + 1) * p.rows / 2)))
                    .collect::<std::result::Result<_, _>>()?;
                QuantMatrix::concat_rows(&halves.iter().collect::<Vec<_>>())
            }
            Split::Replicated => return Err(input(format!("{name} is not a quantized linear"))),
        };
        q.map_err(|e| input(format!("{name}: {e}")))
    }
    fn quant_groups(&self, name: &str) -> Result<usize> {
        Ok(if split_of(&self.cfg, name) == Split::Cols { self.tp() } else { 1 })
    }
    fn released(&self) -> bool {
        self.released
    }
}

/// `model_config.json`'s `glm_rs_released` (written by `glm convert`); a folder without it is a
/// release.
fn released_flag(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(MODEL_CONFIG))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("glm_rs_released").and_then(|b| b.as_bool()))
        .unwrap_or(true)
}

/// SAT's model arguments for `model_config.json`, with our whole config under `glm_rs` and
/// whether it is (converted from) a released model.
pub fn model_config_json(cfg: &Config, tp: usize, released: bool) -> String {
    let v = serde_json::json!({
        "model_class": "GLM130B",
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "vocab_size": cfg.vocab_size,
        "inner_hidden_size": cfg.ffn_hidden_size,
        "max_sequence_length": cfg.max_seq_len,
        "layernorm_epsilon": cfg.layernorm_eps,
        "layernorm_order": "post",
        "model_parallel_size": tp,
        "glm_rs": serde_json::from_str::<serde_json::Value>(&cfg.to_json()).unwrap_or_default(),
        "glm_rs_released": released,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

/// Rank `k` of `tp`'s piece of a quantized weight, exactly (no re-quantization): its rows, or
/// its columns, which must then hold exactly one scale group.
pub fn rank_quant(cfg: &Config, name: &str, q: &QuantMatrix, tp: usize, k: usize) -> Result<QuantMatrix> {
    let split = split_of(cfg, name);
    let r = match split {
        Split::Rows | Split::GluRows => {
            let parts: Vec<QuantMatrix> = rank_rows(split, q.rows, tp, k)
                .into_iter()
                .map(|(a, b)| q.slice_rows(a, b))
                .collect::<std::result::Result<_, _>>()?;
            QuantMatrix::concat_rows(&parts.iter().collect::<Vec<_>>())?
        }
        Split::Cols => {
            let w = q.cols / tp;
            let part = q.slice_cols(k * w, (k + 1) * w)?;
            if part.groups != 1 {
                return Err(input(format!(
                    "{name}: its scales come in {} groups per row, so rank {k} of {tp} would need {} scales per row, which \
                     a SAT file cannot hold: write TP={} (or a multiple), or convert from fp16 with --quantize",
                    q.groups, part.groups, q.groups
                )));
            }
            part
        }
        Split::Replicated => q.clone(),
    };
    Ok(r)
}
