//! A checkpoint as the model's parameters, whatever its format: the `Source` trait, its flat
//! implementation (tensors stored whole, in one file or several: Hugging Face folders, our own
//! safetensors files, training checkpoints), the opening of a path by what it holds, and building
//! a `Glm` from any source.
//!
//! Every source is verified when opened, before anything is read: each parameter of the config's
//! table present, with its shape and a usable dtype; nothing unknown left over.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use glm_checkpoint::raw::{open_store, RawInfo, RawStore, SafetensorsFile};
use glm_checkpoint::torch::TorchDtype;
use glm_model::weights::{param_table, ParamSpec};
use glm_model::{Config, Glm};
use glm_quant::{Bits, QuantFactory, QuantMatrix};
use half::f16;

use crate::{Error, Result};
use glm_dist::split::{ignored, rank_rows, split_of, Split};
use glm_dist::{Group, TpFactory};
use glm_nn::LinearFactory;

pub const SCALE_SUFFIX: &str = "_scale";

/// A model's parameters, readable one tensor (or one range of rows) at a time.
pub trait Source {
    fn config(&self) -> &Config;
    /// What was opened, for messages and reports ("GLM-130B SAT checkpoint, TP=8, iteration 49300").
    fn describe(&self) -> String;
    /// Whether the block linears are stored quantized (INT8/INT4).
    fn bits(&self) -> Option<Bits>;
    /// The stored dtype of a parameter that is not quantized (a float type).
    fn dtype(&self, name: &str) -> Result<TorchDtype>;
    /// Rows r0..r1 of a parameter that is not quantized, in its stored dtype.
    fn read_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>>;
    /// A quantized block linear's weight.
    fn quant(&self, name: &str) -> Result<QuantMatrix>;
    /// How many scale groups per row a quantized weight has (known without reading it).
    fn quant_groups(&self, name: &str) -> Result<usize>;
    /// A released model (GLM-130B, ChatGLM-6B), or converted from one: its special token ids are
    /// fixed, and its tokenizer must produce them.
    fn released(&self) -> bool;
}

/// The metadata key our files use to say they hold a released model (see [`Source::released`]).
pub const RELEASED: &str = "released";

/// Whether the source stores this parameter quantized.
pub fn is_quant(src: &dyn Source, p: &ParamSpec) -> bool {
    src.bits().is_some() && p.kind.quantizable()
}

/// The whole of a parameter that is not quantized, as f32 values.
pub fn read_f32(src: &dyn Source, p: &ParamSpec) -> Result<Vec<f32>> {
    let bytes = src.read_rows(&p.name, 0, p.shape[0])?;
    to_f32(src.dtype(&p.name)?, &bytes, &p.name)
}

/// Decodes float bytes to f32 (16-bit floats through half's vector conversion, in parallel).
pub fn to_f32(dtype: TorchDtype, b: &[u8], name: &str) -> Result<Vec<f32>> {
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    fn halves<T: Copy + Send + Sync>(b: &[u8], from: fn([u8; 2]) -> T, conv: fn(&[T], &mut [f32])) -> Vec<f32> {
        let mut out = vec![0f32; b.len() / 2];
        out.par_chunks_mut(CHUNK).zip(b.par_chunks(2 * CHUNK)).for_each(|(o, b)| {
            let h: Vec<T> = b.chunks_exact(2).map(|c| from([c[0], c[1]])).collect();
            conv(&h, o);
        });
        out
    }
    Ok(match dtype {
        TorchDtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        TorchDtype::F16 => halves(b, f16::from_le_bytes, |h: &[f16], o| h.convert_to_f32_slice(o)),
        TorchDtype::BF16 => halves(b, half::bf16::from_le_bytes, |h: &[half::bf16], o| h.convert_to_f32_slice(o)),
        TorchDtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => return Err(Error::Input(format!("{name}: {other:?} is not a float dtype"))),
    })
}

/// Float bytes from one dtype to another (round to nearest even); the same dtype passes through.
pub fn convert_bytes(from: TorchDtype, to: TorchDtype, b: Vec<u8>, name: &str) -> Result<Vec<u8>> {
    if from == to {
        return Ok(b);
    }
    let v = to_f32(from, &b, name)?;
    Ok(match to {
        TorchDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TorchDtype::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        TorchDtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        TorchDtype::F64 => v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect(),
        other => return Err(Error::Input(format!("{name}: cannot write {other:?}"))),
    })
}

/// A quantized weight from its stored parts: packed int8 bytes `[rows, row_bytes]` and f16 scales
/// `[rows]` or `[rows, groups]`.
pub fn quant_from_parts(
    bits: Bits,
    name: &str,
    data: Vec<u8>,
    rows: usize,
    row_bytes: usize,
    scale_shape: &[usize],
    scales: &[u8],
) -> Result<QuantMatrix> {
    let cols = match bits {
        Bits::Int8 => row_bytes,
        Bits::Int4 => 2 * row_bytes,
    };
    let groups = match scale_shape {
        [r] if *r == rows => 1,
        [r, g] if *r == rows => *g,
        s => {
            return Err(Error::Input(format!(
                "{name}{SCALE_SUFFIX} has shape {s:?}; the weight's {rows} rows need [{rows}]"
            )))
        }
    };
    let scales: Vec<f16> = scales.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect();
    let data: Vec<i8> = data.into_iter().map(|b| b as i8).collect();
    QuantMatrix::from_parts(bits, rows, cols, groups, data, scales).map_err(|e| Error::Input(format!("{name}: {e}")))
}

/// The stored shape of a quantized weight of full shape `[rows, cols]`.
pub fn packed_shape(bits: Bits, shape: &[usize]) -> Vec<usize> {
    vec![shape[0], bits.row_bytes(shape[1])]
}

/// Tensors stored whole: one file or several, found by name.
pub struct Flat {
    cfg: Config,
    bits: Option<Bits>,
    what: String,
    stores: Vec<Box<dyn RawStore>>,
    index: HashMap<String, usize>,
    /// A parameter read from another tensor (ChatGLM without `lm_head.weight`: the embedding).
    alias: HashMap<String, String>,
    released: bool,
}

impl Flat {
    /// Indexes `stores` (a tensor in two files is an error) and verifies them against `cfg`.
    pub fn new(
        cfg: Config,
        bits: Option<Bits>,
        what: String,
        stores: Vec<Box<dyn RawStore>>,
        alias: HashMap<String, String>,
    ) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, s) in stores.iter().enumerate() {
            for n in s.names() {
                if let Some(j) = index.insert(n.clone(), i) {
                    return Err(Error::Input(format!(
                        "tensor `{n}` is in both {} and {}",
                        stores[j].path().display(),
                        s.path().display()
                    )));
                }
            }
        }
        let flat = Self { cfg, bits, what, stores, index, alias, released: false };
        flat.verify()?;
        Ok(flat)
    }

    fn locate<'a>(&'a self, name: &'a str) -> Result<(&'a dyn RawStore, &'a str)> {
        let name = self.alias.get(name).map(String::as_str).unwrap_or(name);
        let i = self.index.get(name).ok_or_else(|| Error::Input(format!("{}: no tensor `{name}`", self.what)))?;
        Ok((self.stores[*i].as_ref(), name))
    }

    fn info(&self, name: &str) -> Option<(RawInfo, PathBuf)> {
        let (s, n) = self.locate(name).ok()?;
        Some((s.info(n)?, s.path().to_path_buf()))
    }

    /// Marks the source as a released model (or one converted from it).
    pub fn released(mut self, yes: bool) -> Self {
        self.released = yes;
        self
    }

    /// Every parameter present with its shape and dtype, and no tensor left unused.
    fn verify(&self) -> Result<()> {
        let mut used: Vec<String> = Vec::new();
        for p in param_table(&self.cfg) {
            let quant = self.bits.filter(|_| p.kind.quantizable());
            let want = match quant {
                Some(b) => packed_shape(b, &p.shape),
                None => p.shape.clone(),
            };
            let (info, path) = self.info(&p.name).ok_or_else(|| {
                Error::Input(format!("{}: tensor `{}` is missing (expected shape {:?})", self.what, p.name, want))
            })?;
            check_tensor(&path, &p.name, &info, &want, quant.is_some())?;
            used.push(self.alias.get(&p.name).cloned().unwrap_or(p.name.clone()));
            if quant.is_some() {
                let sname = format!("{}{SCALE_SUFFIX}", p.name);
                let (si, path) = self
                    .info(&sname)
                    .ok_or_else(|| Error::Input(format!("{}: quantized `{}` has no `{sname}`", self.what, p.name)))?;
                let ok = si.dtype == TorchDtype::F16
                    && matches!(si.shape.as_slice(), [r] | [r, _] if *r == p.shape[0])
                    && si.shape.get(1).is_none_or(|&g| g > 0 && p.shape[1].is_multiple_of(g));
                if !ok {
                    return Err(Error::Input(format!(
                        "{}: `{sname}` is {:?} {:?}; the weight's {} rows need f16 [{}] (or [{}, groups])",
                        path.display(),
                        si.dtype,
                        si.shape,
                        p.shape[0],
                        p.shape[0],
                        p.shape[0]
                    )));
                }
                used.push(sname);
            }
        }
        let unused: Vec<&String> = self.index.keys().filter(|n| !ignored(n) && !used.contains(n)).collect();
        if !unused.is_empty() {
            let mut names: Vec<&str> = unused.iter().map(|s| s.as_str()).collect();
            names.sort();
            return Err(Error::Input(format!(
                "{}: {} tensor(s) the `{}` model does not have, e.g. {}: a different architecture or config?",
                self.what,
                names.len(),
                self.cfg.name,
                names.iter().take(4).copied().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }
}

/// One stored tensor against what the model needs.
pub fn check_tensor(path: &Path, name: &str, info: &RawInfo, want: &[usize], quantized: bool) -> Result<()> {
    if info.shape != want {
        return Err(Error::Input(format!(
            "{}: tensor `{name}` has shape {:?}, expected {:?}{}",
            path.display(),
            info.shape,
            want,
            if quantized { " (packed int8)" } else { "" }
        )));
    }
    let dtype_ok =
        if quantized { matches!(info.dtype, TorchDtype::I8 | TorchDtype::U8) } else { info.dtype.is_float() };
    if !dtype_ok {
        return Err(Error::Input(format!(
            "{}: tensor `{name}` is {:?}, expected {}",
            path.display(),
            info.dtype,
            if quantized { "int8" } else { "a float type" }
        )));
    }
    Ok(())
}

impl Source for Flat {
    fn config(&self) -> &Config {
        &self.cfg
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
    fn bits(&self) -> Option<Bits> {
        self.bits
    }
    fn dtype(&self, name: &str) -> Result<TorchDtype> {
        let (s, n) = self.locate(name)?;
        s.info(n).map(|i| i.dtype).ok_or_else(|| Error::Input(format!("no tensor `{n}`")))
    }
    fn read_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        let (s, n) = self.locate(name)?;
        Ok(s.read_rows(n, r0, r1)?)
    }
    fn quant(&self, name: &str) -> Result<QuantMatrix> {
        let bits = self.bits.ok_or_else(|| Error::Input(format!("{name}: the checkpoint is not quantized")))?;
        let (s, n) = self.locate(name)?;
        let info = s.info(n).ok_or_else(|| Error::Input(format!("no tensor `{n}`")))?;
        let data = s.read_rows(n, 0, info.rows())?;
        let sname = format!("{n}{SCALE_SUFFIX}");
        let (ss, sn) = self.locate(&sname)?;
        let sinfo = ss.info(sn).ok_or_else(|| Error::Input(format!("no tensor `{sn}`")))?;
        let scales = ss.read_rows(sn, 0, sinfo.rows())?;
        quant_from_parts(bits, n, data, info.rows(), info.shape[1], &sinfo.shape, &scales)
    }
    fn quant_groups(&self, name: &str) -> Result<usize> {
        let sname = format!("{name}{SCALE_SUFFIX}");
        let (s, n) = self.locate(&sname)?;
        Ok(s.info(n).and_then(|i| i.shape.get(1).copied()).unwrap_or(1))
    }
    fn released(&self) -> bool {
        self.released
    }
}

/// What a path holds, by its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A folder with `latest` and `<iteration>/mp_rank_XX_model_states.pt`.
    Sat,
    /// A folder with a Hugging Face `config.json` and weight files.
    HuggingFace,
    /// A `glm train` checkpoint folder (`state.json` + `model.safetensors`).
    Training,
    /// Our quantized safetensors file (`format = glm-quant`).
    GlmQuant,
    /// A safetensors file with the full-precision weights.
    Safetensors,
    /// A single torch.save file of a state dict.
    Torch,
}

impl Format {
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return if path.join("latest").is_file() {
                Ok(Self::Sat)
            } else if path.join("config.json").is_file() {
                Ok(Self::HuggingFace)
            } else if path.join("state.json").is_file() {
                Ok(Self::Training)
            } else {
                Err(Error::Input(format!(
                    "{}: not a checkpoint folder (no `latest` of a SAT checkpoint, no `config.json` of a Hugging Face \
                     model, no `state.json` of a glm training checkpoint)",
                    path.display()
                )))
            };
        }
        let mut head = [0u8; 4];
        let n = std::fs::File::open(path)
            .and_then(|f| std::os::unix::fs::FileExt::read_at(&f, &mut head, 0))
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        if n == 4 && (head == [b'P', b'K', 3, 4] || head[0] == 0x80) {
            return Ok(Self::Torch);
        }
        let st = SafetensorsFile::open(path)?;
        Ok(if st.metadata().get("format").map(String::as_str) == Some(glm_quant::checkpoint::FORMAT) {
            Self::GlmQuant
        } else {
            Self::Safetensors
        })
    }
}

/// Opens any supported checkpoint. `arch` is a config given by the user: required where the files
/// do not say it (a bare safetensors or torch file, a SAT folder that matches no preset), and
/// otherwise checked against what they say.
pub fn open(path: &Path, arch: Option<&Config>) -> Result<Box<dyn Source>> {
    Ok(match Format::detect(path)? {
        Format::Sat => Box::new(crate::sat::Sat::open(path, arch)?),
        Format::HuggingFace => Box::new(crate::hf::open(path, arch)?),
        Format::Training => {
            let state = path.join("state.json");
            let text =
                std::fs::read_to_string(&state).map_err(|e| Error::Input(format!("{}: {e}", state.display())))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", state.display())))?;
            let cfg = serde_json::from_value::<Config>(v["model"].clone())
                .map_err(|e| Error::Input(format!("{}: no model config: {e}", state.display())))?;
            let cfg = agree(cfg, arch, path)?;
            let file = path.join("model.safetensors");
            let what = format!("glm training checkpoint {}", path.display());
            Box::new(Flat::new(cfg, None, what, vec![Box::new(SafetensorsFile::open(&file)?)], HashMap::new())?)
        }
        Format::GlmQuant | Format::Safetensors => {
            let st = SafetensorsFile::open(path)?;
            let meta = st.metadata().clone();
            let bits = match meta.get("bits") {
                Some(b) if meta.get("format").map(String::as_str) == Some(glm_quant::checkpoint::FORMAT) => {
                    Some(Bits::from_u32(b.parse().unwrap_or(0))?)
                }
                _ => None,
            };
            let cfg = match meta.get("config") {
                Some(text) => {
                    let cfg = Config::from_json(text)
                        .map_err(|e| Error::Input(format!("{}: config in the header: {e}", path.display())))?;
                    agree(cfg, arch, path)?
                }
                None => arch.cloned().ok_or_else(|| no_config(path))?,
            };
            let what = format!(
                "{} ({})",
                path.display(),
                if bits.is_some() { "quantized safetensors" } else { "safetensors" }
            );
            let released = meta.get(RELEASED).is_some_and(|v| v == "true");
            Box::new(Flat::new(cfg, bits, what, vec![Box::new(st)], HashMap::new())?.released(released))
        }
        Format::Torch => {
            let cfg = arch.cloned().ok_or_else(|| no_config(path))?;
            let store = open_store(path, &[])?;
            let what = format!("torch file {}", path.display());
            Box::new(Flat::new(cfg, None, what, vec![store], HashMap::new())?)
        }
    })
}

fn no_config(path: &Path) -> Error {
    Error::Input(format!("{}: the file does not say which model it holds; pass --preset or --config", path.display()))
}

/// A config the files state, checked against one the user gave: the shapes must agree.
pub fn agree(found: Config, given: Option<&Config>, path: &Path) -> Result<Config> {
    if let Some(g) = given {
        let dims = |c: &Config| {
            (c.num_layers, c.hidden_size, c.num_heads, c.ffn_hidden_size, c.vocab_size, c.ffn, c.position_encoding)
        };
        if dims(g) != dims(&found) {
            return Err(Error::Input(format!(
                "{} holds a `{}` model ({} layers, hidden {}, {} heads, FFN {}, vocabulary {}), not the `{}` asked for \
                 ({} layers, hidden {}, {} heads, FFN {}, vocabulary {})",
                path.display(),
                found.name,
                found.num_layers,
                found.hidden_size,
                found.num_heads,
                found.ffn_hidden_size,
                found.vocab_size,
                g.name,
                g.num_layers,
                g.hidden_size,
                g.num_heads,
                g.ffn_hidden_size,
                g.vocab_size
            )));
        }
    }
    Ok(found)
}

/// The model a source holds, computing in `dtype` (quantized linears stay quantized).
pub fn load_model(src: &dyn Source, dtype: DType, device: &Device) -> Result<Glm> {
    load(src, dtype, device, None)
}

/// Rank `group.rank()`'s model under tensor parallelism (`TpFactory::for_inference`: every rank's
/// logits are the full vocabulary), reading only the rank's part of each parameter: its rows of a
/// row-split tensor, its columns of a column-split one a block of rows at a time. A quantized
/// weight is read whole, one at a time, and cut exactly (`QuantMatrix::shard`); the other ranks'
/// slices are dropped at once.
pub fn load_model_tp(src: &dyn Source, dtype: DType, device: &Device, group: Group) -> Result<Glm> {
    load(src, dtype, device, Some(group))
}

fn load(src: &dyn Source, dtype: DType, device: &Device, group: Option<Group>) -> Result<Glm> {
    let cfg = src.config();
    let (tp, k) = group.map_or((1, 0), |g| (g.size(), g.rank()));
    if tp > 1 {
        glm_dist::split::check_tp(cfg, tp)?;
    }
    let mut dense = HashMap::new();
    let mut quant = HashMap::new();
    for p in param_table(cfg) {
        let split = if tp == 1 { Split::Replicated } else { split_of(cfg, &p.name) };
        if is_quant(src, &p) {
            let m = src.quant(&p.name)?;
            let m = if tp == 1 {
                m
            } else {
                m.shard(split, tp, k)
                    .map_err(|e| Error::Input(format!("{} (tensor-parallel rank {k} of {tp}): {e}", p.name)))?
            };
            quant.insert(p.name.clone(), Arc::new(m));
            continue;
        }
        let t = read_part(src, &p, split, (tp, k), dtype)?.to_device(device)?;
        dense.insert(p.name, t);
    }
    let vb = VarBuilder::from_tensors(dense, dtype, device);
    let inner: Box<dyn LinearFactory> =
        if quant.is_empty() { Box::new(glm_nn::DenseFactory) } else { Box::new(QuantFactory::stored(quant)) };
    Ok(match group {
        None => Glm::new(cfg, vb, inner.as_ref())?,
        Some(g) => Glm::new(cfg, vb, &TpFactory::for_inference(cfg, g, inner)?)?,
    })
}

/// Values decoded at a time when a column split is read a block of rows at a time.
const BLOCK_BYTES: usize = 1 << 22;

/// Rank `k` of `tp`'s part of a parameter that is not quantized, in `dtype`, on the CPU.
fn read_part(src: &dyn Source, p: &ParamSpec, split: Split, (tp, k): (usize, usize), dtype: DType) -> Result<Tensor> {
    let stored = src.dtype(&p.name)?;
    let dt = stored.candle().ok_or_else(|| Error::Input(format!("{}: {stored:?} has no candle type", p.name)))?;
    let decode = |bytes: Vec<u8>, shape: &[usize]| -> Result<Tensor> {
        Ok(if dtype == DType::F32 {
            Tensor::from_vec(to_f32(stored, &bytes, &p.name)?, shape, &Device::Cpu)?
        } else {
            Tensor::from_raw_buffer(&bytes, dt, shape, &Device::Cpu)?.to_dtype(dtype)?
        })
    };
    let cut = |what: &str| {
        Error::Input(format!("{}: shape {:?} cannot be split {tp} ways along its {what} ({split:?})", p.name, p.shape))
    };
    let rows = p.shape[0];
    if split == Split::Cols {
        let cols = *p.shape.get(1).ok_or_else(|| cut("columns"))?;
        if !cols.is_multiple_of(tp) {
            return Err(cut("columns"));
        }
        let per = cols / tp;
        let block = (BLOCK_BYTES / (cols * stored.size()).max(1)).max(1);
        let mut parts = Vec::with_capacity(rows.div_ceil(block));
        for r0 in (0..rows).step_by(block) {
            let r1 = (r0 + block).min(rows);
            let mut shape = p.shape.clone();
            shape[0] = r1 - r0;
            parts.push(decode(src.read_rows(&p.name, r0, r1)?, &shape)?.narrow(1, k * per, per)?);
        }
        return Ok(Tensor::cat(&parts, 0)?.contiguous()?);
    }
    let unit = if split == Split::GluRows { 2 * tp } else { tp };
    if split != Split::Replicated && !rows.is_multiple_of(unit) {
        return Err(cut("rows"));
    }
    let mut bytes = Vec::new();
    let mut shape = p.shape.clone();
    shape[0] = 0;
    for (a, b) in rank_rows(split, rows, tp, k) {
        bytes.extend_from_slice(&src.read_rows(&p.name, a, b)?);
        shape[0] += b - a;
    }
    decode(bytes, &shape)
}

/// Metadata our own safetensors files carry: what they are, the model's config, where they came
/// from, and whether that is a released model.
pub fn glm_metadata(src: &dyn Source) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = [
        ("format".to_string(), "glm".to_string()),
        ("config".to_string(), src.config().to_json()),
        ("source".to_string(), src.describe()),
    ]
    .into_iter()
    .collect();
    if src.released() {
        m.insert(RELEASED.into(), "true".into());
    }
    m
}
