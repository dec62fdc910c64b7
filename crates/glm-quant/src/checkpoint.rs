//! The quantized checkpoint: one safetensors file whose header says what it is
//! (`__metadata__`: `format = glm-quant`, `bits`, the model `config` as JSON), holding
//!
//! - each block linear's weight as `U8` bytes, `[rows, cols]` (INT8) or `[rows, cols / 2]` (INT4,
//!   GLM-130B's nibble order), beside `<name>_scale`, f16 `[rows]` (GLM-130B's quantized layout)
//!   or `[rows, G]` (one scale per row per input group of `cols / G` columns: row-parallel layers
//!   quantized rank by rank, as GLM-130B's `convert_tp.py` does, then merged);
//! - every other tensor (embeddings, LayerNorms, biases) in f16, as GLM-130B keeps them.
//!
//! Loading memory-maps the file and copies each quantized weight once into its packed form: the
//! full-precision weights are never built, so peak memory is close to the file size.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use glm_model::weights::param_table;
use glm_model::{Config, Glm};
use half::f16;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};

use crate::linear::QuantFactory;
use crate::{Bits, Error, QuantMatrix, Result};

pub const FORMAT: &str = "glm-quant";
const SCALE_SUFFIX: &str = "_scale";

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Format(format!("{}: {e}", path.display()))
}

/// What `quantize_checkpoint` wrote.
#[derive(Debug, Clone)]
pub struct QuantReport {
    pub quantized: usize,
    pub kept: usize,
    pub bytes: u64,
}

/// Quantize a dense checkpoint of `cfg` (every tensor checked against the model's table) into
/// `out`, written atomically. Tensors are read one at a time.
pub fn quantize_checkpoint(
    cfg: &Config,
    input: &glm_checkpoint::Checkpoint,
    bits: Bits,
    out: &Path,
) -> Result<QuantReport> {
    let specs = glm_model::tensor_specs(cfg);
    input.verify(&specs).map_err(|e| Error::Format(e.to_string()))?;
    quantize_tensors(cfg, |name| input.load(name, DType::F32, &Device::Cpu).map_err(|e| e.to_string()), bits, out)
}

/// Quantize the tensors `load` gives by name (each of `cfg`'s parameter table, as f32) into `out`,
/// written atomically: a dense checkpoint file, or weights already in memory. The block linears get
/// per-row scales (`QuantMatrix::quantize`), the rest is kept in f16.
pub fn quantize_tensors(
    cfg: &Config,
    load: impl Fn(&str) -> std::result::Result<Tensor, String>,
    bits: Bits,
    out: &Path,
) -> Result<QuantReport> {
    let (mut quantized, mut dense) = (HashMap::new(), HashMap::new());
    for p in param_table(cfg) {
        let t = load(&p.name).map_err(|e| Error::Format(format!("{}: {e}", p.name)))?;
        let v: Vec<f32> = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .map_err(|e| Error::Format(format!("{}: {e}", p.name)))?;
        if v.len() != p.numel() as usize {
            return Err(Error::Shape(format!("{}: {} values, the model's table says {:?}", p.name, v.len(), p.shape)));
        }
        if p.kind.quantizable() {
            let (rows, cols) = (p.shape[0], p.shape[1]);
            let q =
                QuantMatrix::quantize(&v, rows, cols, bits).map_err(|e| Error::Format(format!("{}: {e}", p.name)))?;
            quantized.insert(p.name, q);
        } else {
            // Kept as the f16 the file stores, so the weights held until writing are the file's size.
            let t = Tensor::from_vec(v, p.shape.clone(), &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F16))
                .map_err(|e| Error::Format(format!("{}: {e}", p.name)))?;
            dense.insert(p.name, t);
        }
    }
    write_quant_checkpoint(cfg, bits, &quantized, &dense, out)
}

/// One tensor of the file: its bytes are made when they are written.
enum Entry<'a> {
    Weight(&'a QuantMatrix),
    Scales(&'a QuantMatrix),
    Dense(&'a Tensor),
}

impl Entry<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Self::Weight(_) => Dtype::U8,
            Self::Scales(_) | Self::Dense(_) => Dtype::F16,
        }
    }

    /// The stored shape: `[rows, row bytes]`, scales `[rows]` (one per row, GLM-130B's layout) or
    /// `[rows, groups]`, dense tensors as they are.
    fn shape(&self) -> Vec<usize> {
        match self {
            Self::Weight(m) => vec![m.rows, m.bits.row_bytes(m.cols)],
            Self::Scales(m) if m.groups == 1 => vec![m.rows],
            Self::Scales(m) => vec![m.rows, m.groups],
            Self::Dense(t) => t.dims().to_vec(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Weight(m) => m.data.len(),
            Self::Scales(m) => 2 * m.scales.len(),
            Self::Dense(t) => 2 * t.elem_count(),
        }
    }

    fn bytes(&self) -> candle_core::Result<Vec<u8>> {
        Ok(match self {
            Self::Weight(m) => m.data.iter().map(|&b| b as u8).collect(),
            Self::Scales(m) => m.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
            Self::Dense(t) => {
                let v: Vec<f16> = t.to_device(&Device::Cpu)?.to_dtype(DType::F16)?.flatten_all()?.to_vec1()?;
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        })
    }
}

/// Write a quantized checkpoint of `cfg` from weights already quantized (`quantized`: the block
/// linears by tensor name, any scale groups) and the other tensors (`dense`: embeddings, LayerNorms,
/// biases; stored in f16), atomically. Every tensor of the model's table must be in the map its
/// kind says, with its shape (and the matrices at `bits`), and nothing else: all is checked before
/// a byte is written. The file is written tensor by tensor, never built whole in memory.
pub fn write_quant_checkpoint(
    cfg: &Config,
    bits: Bits,
    quantized: &HashMap<String, QuantMatrix>,
    dense: &HashMap<String, Tensor>,
    out: &Path,
) -> Result<QuantReport> {
    let table = param_table(cfg);
    let mut entries: Vec<(String, Entry)> = Vec::with_capacity(table.len() + 4 * cfg.num_layers);
    for p in &table {
        if p.kind.quantizable() {
            let m = quantized.get(&p.name).ok_or_else(|| {
                let also = if dense.contains_key(&p.name) { " (it is among the dense tensors)" } else { "" };
                Error::Format(format!("{}: missing from the quantized weights{also}", p.name))
            })?;
            m.validate().map_err(|e| Error::Format(format!("{}: {e}", p.name)))?;
            if [m.rows, m.cols] != p.shape[..] || m.bits != bits {
                return Err(Error::Shape(format!(
                    "{}: a {}-bit [{}, {}] matrix, the checkpoint is {}-bit and the model's table says {:?}",
                    p.name,
                    m.bits.bits(),
                    m.rows,
                    m.cols,
                    bits.bits(),
                    p.shape
                )));
            }
            entries.push((p.name.clone(), Entry::Weight(m)));
            entries.push((format!("{}{SCALE_SUFFIX}", p.name), Entry::Scales(m)));
        } else {
            let t = dense.get(&p.name).ok_or_else(|| {
                let also = if quantized.contains_key(&p.name) { " (it is among the quantized weights)" } else { "" };
                Error::Format(format!("{}: missing from the dense tensors{also}", p.name))
            })?;
            if t.dims() != p.shape {
                return Err(Error::Shape(format!(
                    "{}: shape {:?}, the model's table says {:?}",
                    p.name,
                    t.dims(),
                    p.shape
                )));
            }
            entries.push((p.name.clone(), Entry::Dense(t)));
        }
    }
    let known: std::collections::HashSet<&str> = table.iter().map(|p| p.name.as_str()).collect();
    let mut extra: Vec<&str> =
        quantized.keys().chain(dense.keys()).map(String::as_str).filter(|n| !known.contains(n)).collect();
    if !extra.is_empty() {
        extra.sort_unstable();
        return Err(Error::Format(format!("tensors the model does not have: {}", extra.join(", "))));
    }
    let quantized_count = table.iter().filter(|p| p.kind.quantizable()).count();
    let kept = table.len() - quantized_count;

    // safetensors' own order (wider dtypes first, then by name, so every f16 lands aligned), offsets
    // and header padding.
    entries.sort_by(|(a, x), (b, y)| y.dtype().cmp(&x.dtype()).then(a.cmp(b)));
    let mut offset = 0;
    let infos = entries
        .iter()
        .map(|(name, e)| {
            let info = TensorInfo { dtype: e.dtype(), shape: e.shape(), data_offsets: (offset, offset + e.len()) };
            offset += e.len();
            (name.clone(), info)
        })
        .collect();
    let meta: HashMap<String, String> = [
        ("format".to_string(), FORMAT.to_string()),
        ("bits".to_string(), bits.bits().to_string()),
        ("config".to_string(), cfg.to_json()),
    ]
    .into_iter()
    .collect();
    let header = Metadata::new(Some(meta), infos).map_err(|e| io(out, e))?;
    let mut header = serde_json::to_string(&header).map_err(|e| io(out, e))?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let bytes = (8 + header.len() + offset) as u64;
    glm_checkpoint::write_atomic_with(out, |f| {
        use std::io::Write;
        let mut f = std::io::BufWriter::with_capacity(1 << 20, f);
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        for (name, e) in &entries {
            let data = e.bytes().map_err(|err| std::io::Error::other(format!("{name}: {err}")))?;
            f.write_all(&data)?;
        }
        f.flush()
    })
    .map_err(|e| io(out, e))?;
    Ok(QuantReport { quantized: quantized_count, kept, bytes })
}

/// The JSON header of a safetensors file (at most 100 MiB), read without its tensors.
fn header(path: &Path) -> Option<serde_json::Value> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        return None;
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).ok()?;
    serde_json::from_slice(&buf).ok()
}

/// The scale groups per row a `<name>_scale` tensor of `dtype` and `shape` gives a quantized weight
/// of `rows` rows and `cols` columns, or why it does not fit.
fn scale_groups(
    bits: Bits,
    rows: usize,
    cols: usize,
    dtype: Dtype,
    shape: &[usize],
) -> std::result::Result<usize, String> {
    if dtype != Dtype::F16 {
        return Err(format!("scales are {dtype:?}, not F16"));
    }
    let groups = match *shape {
        [r] if r == rows => 1,
        [r, g] if r == rows => g,
        _ => return Err(format!("its first dimension must be the {rows} rows, and it has 1 or 2 dimensions")),
    };
    crate::group_width(bits, cols, groups).map(|_| groups).map_err(|e| e.to_string())
}

/// A loaded quantized checkpoint.
pub struct QuantCheckpoint {
    pub bits: Bits,
    pub config: Config,
    dense: HashMap<String, Tensor>,
    quant: HashMap<String, Arc<QuantMatrix>>,
}

impl QuantCheckpoint {
    /// Whether `path` is a quantized checkpoint, from its header alone.
    pub fn is_quantized(path: &Path) -> bool {
        header(path).is_some_and(|h| h["__metadata__"]["format"] == FORMAT)
    }

    /// The model config in a quantized checkpoint's header, without reading its tensors.
    pub fn config_of(path: &Path) -> Result<Config> {
        let h = header(path).filter(|h| h["__metadata__"]["format"] == FORMAT);
        let text = h.as_ref().and_then(|h| h["__metadata__"]["config"].as_str());
        let text = text.ok_or_else(|| io(path, "not a quantized GLM checkpoint (no config in its header)"))?;
        Config::from_json(text).map_err(|e| io(path, format!("config in the header: {e}")))
    }

    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| io(path, e))?;
        // SAFETY: the file must not change while it is mapped (as for every mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io(path, e))?;
        let (_, header) = SafeTensors::read_metadata(&map).map_err(|e| io(path, e))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(io(path, "not a quantized GLM checkpoint (no `format = glm-quant` in its header)"));
        }
        let bits =
            Bits::from_u32(meta.get("bits").and_then(|b| b.parse().ok()).unwrap_or(0)).map_err(|e| io(path, e))?;
        let config = Config::from_json(meta.get("config").map(String::as_str).unwrap_or(""))
            .map_err(|e| io(path, format!("config in the header: {e}")))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| io(path, e))?;
        // Once a tensor is copied out, its pages of the mapping are dropped, so the peak memory is
        // the copies plus one tensor, not the copies plus the whole file.
        let release = |data: &[u8]| {
            let off = data.as_ptr() as usize - map.as_ptr() as usize;
            // SAFETY: a read-only, file-backed mapping: dropped pages are read again from the file
            // if touched (a hint; failure is harmless).
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, data.len()) };
        };
        let (mut dense, mut quant) = (HashMap::new(), HashMap::new());
        for (name, view) in st.tensors() {
            if name.ends_with(SCALE_SUFFIX) {
                continue;
            }
            if view.dtype() != Dtype::U8 {
                let t = view.load(&Device::Cpu).map_err(|e| io(path, format!("{name}: {e}")))?;
                release(view.data());
                dense.insert(name, t);
                continue;
            }
            let scale_name = format!("{name}{SCALE_SUFFIX}");
            let sv = st.tensor(&scale_name).map_err(|_| io(path, format!("{name} has no {scale_name}")))?;
            let (rows, row_bytes) = match view.shape() {
                [r, b] => (*r, *b),
                s => return Err(io(path, format!("{name}: quantized weight of shape {s:?}, want [rows, bytes]"))),
            };
            let cols = match bits {
                Bits::Int8 => row_bytes,
                Bits::Int4 => 2 * row_bytes,
            };
            let groups = scale_groups(bits, rows, cols, sv.dtype(), sv.shape()).map_err(|why| {
                io(
                    path,
                    format!(
                        "{scale_name} is {:?} {:?}; the weight {name} {:?} ({rows} rows of {cols} {}-bit columns) needs \
                         F16 [{rows}] or [{rows}, G]: {why}",
                        sv.dtype(),
                        sv.shape(),
                        view.shape(),
                        bits.bits()
                    ),
                )
            })?;
            let scales: Vec<f16> = sv.data().chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
            let data = view.data().iter().map(|&b| b as i8).collect();
            let m = QuantMatrix { bits, rows, cols, groups, data, scales };
            m.validate().map_err(|e| io(path, format!("{name}: {e}")))?;
            release(view.data());
            quant.insert(name, Arc::new(m));
        }
        Ok(Self { bits, config, dense, quant })
    }

    /// The model, its block linears quantized, the rest computing in `dtype`.
    pub fn model(&self, dtype: DType, device: &Device) -> Result<Glm> {
        let dense = self
            .dense
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?.to_device(device)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()
            .map_err(|e| Error::Format(e.to_string()))?;
        let factory = QuantFactory::stored(self.quant.clone());
        Glm::new(&self.config, VarBuilder::from_tensors(dense, dtype, device), &factory)
            .map_err(|e| Error::Format(e.to_string()))
    }

    /// The quantized block linears, by tensor name.
    pub fn quantized(&self) -> &HashMap<String, Arc<QuantMatrix>> {
        &self.quant
    }

    /// The other tensors (embeddings, LayerNorms, biases) as stored, by name.
    pub fn dense(&self) -> &HashMap<String, Tensor> {
        &self.dense
    }

    /// Bytes of the packed weights and scales held.
    pub fn quantized_bytes(&self) -> usize {
        self.quant.values().map(|m| m.data.len() + 2 * m.scales.len()).sum()
    }
}
