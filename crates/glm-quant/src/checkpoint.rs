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

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use glm_dist::split::{rank_rows, split_of, Split};
use glm_dist::{Group, TpFactory};
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

/// A loaded quantized checkpoint (whole, or one tensor-parallel rank's slices).
pub struct QuantCheckpoint {
    pub bits: Bits,
    pub config: Config,
    /// (rank, tp) of the slices held.
    shard: (usize, usize),
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
        Self::open_rank(path, 1, 0)
    }

    /// Rank `rank` of `tp`'s slices of the file's tensors, and nothing else: each tensor is cut as
    /// glm-dist's split table says (see [`crate::tp`]: the rank's rows with their scales, or its
    /// columns with the scales whole), copying only those bytes out of the mapping (a row-parallel
    /// weight a block of rows at a time), so the other ranks' slices are never held in memory.
    /// Build the rank's model with [`QuantCheckpoint::model_tp`]. `tp = 1`: the whole model.
    pub fn open_rank(path: &Path, tp: usize, rank: usize) -> Result<Self> {
        if tp == 0 || rank >= tp {
            return Err(io(path, format!("rank {rank} of a tensor-parallel degree of {tp}")));
        }
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
        if tp > 1 {
            glm_dist::split::check_tp(&config, tp).map_err(|e| io(path, e))?;
        }
        let split = |name: &str| if tp == 1 { Split::Replicated } else { split_of(&config, name) };
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
                let t = dense_slice(&view, split(&name), tp, rank).map_err(|e| io(path, format!("{name}: {e}")))?;
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
            let stored = Stored { bits, rows, cols, groups, data: view.data(), scales: sv.data() };
            let m = stored.slice(split(&name), tp, rank).map_err(|e| {
                let at = if tp > 1 { format!(" (tensor-parallel rank {rank} of {tp})") } else { String::new() };
                io(path, format!("{name}{at}: {e}"))
            })?;
            release(view.data());
            quant.insert(name, Arc::new(m));
        }
        Ok(Self { bits, config, shard: (rank, tp), dense, quant })
    }

    /// (rank, tp): whose slices this holds ((0, 1): the whole model).
    pub fn shard(&self) -> (usize, usize) {
        self.shard
    }

    /// The dense tensors in `dtype` on `device`, for the model's VarBuilder.
    fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let dense = self
            .dense
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?.to_device(device)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()
            .map_err(|e| Error::Format(e.to_string()))?;
        Ok(VarBuilder::from_tensors(dense, dtype, device))
    }

    /// Rank `group.rank()`'s model under tensor parallelism, from the slices [`QuantCheckpoint::open_rank`]
    /// read for it: `TpFactory::for_inference` over the quantized linears, so every rank's logits
    /// are the full vocabulary.
    pub fn model_tp(&self, dtype: DType, device: &Device, group: Group) -> Result<Glm> {
        if (group.rank(), group.size()) != self.shard {
            return Err(Error::Format(format!(
                "the checkpoint was opened for tensor-parallel rank {} of {}, the model is built for rank {} of {}",
                self.shard.0,
                self.shard.1,
                group.rank(),
                group.size()
            )));
        }
        let inner = Box::new(QuantFactory::stored(self.quant.clone()));
        let factory = TpFactory::for_inference(&self.config, group, inner).map_err(|e| Error::Format(e.to_string()))?;
        Glm::new(&self.config, self.var_builder(dtype, device)?, &factory).map_err(|e| Error::Format(e.to_string()))
    }

    /// The model, its block linears quantized, the rest computing in `dtype`.
    pub fn model(&self, dtype: DType, device: &Device) -> Result<Glm> {
        if self.shard.1 > 1 {
            return Err(Error::Format(format!(
                "the checkpoint holds tensor-parallel rank {} of {}'s slices: build its model with model_tp",
                self.shard.0, self.shard.1
            )));
        }
        let factory = QuantFactory::stored(self.quant.clone());
        Glm::new(&self.config, self.var_builder(dtype, device)?, &factory).map_err(|e| Error::Format(e.to_string()))
    }

    /// The quantized block linears, by tensor name (this rank's slices after `open_rank`).
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

/// A quantized weight as the file stores it: packed bytes and f16 scale bytes, borrowed from the
/// mapping.
struct Stored<'a> {
    bits: Bits,
    rows: usize,
    cols: usize,
    groups: usize,
    data: &'a [u8],
    scales: &'a [u8],
}

/// Row-parallel weights are cut a block of rows at a time, of at most this many bytes.
const SLICE_BLOCK_BYTES: usize = 1 << 20;

impl Stored<'_> {
    /// Rows r0..r1, copied out.
    fn rows(&self, r0: usize, r1: usize) -> Result<QuantMatrix> {
        let (rb, g) = (self.bits.row_bytes(self.cols), self.groups);
        let data = self.data[r0 * rb..r1 * rb].iter().map(|&b| b as i8).collect();
        let scales =
            self.scales[2 * r0 * g..2 * r1 * g].chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
        QuantMatrix::from_parts(self.bits, r1 - r0, self.cols, g, data, scales)
    }

    /// Rank `k` of `tp`'s slice ([`QuantMatrix::shard`]), reading only its bytes: its rows, or its
    /// columns a block of rows at a time.
    fn slice(&self, split: Split, tp: usize, k: usize) -> Result<QuantMatrix> {
        let want = self.rows * self.bits.row_bytes(self.cols);
        if self.data.len() != want || self.scales.len() != 2 * self.rows * self.groups {
            return Err(Error::Format(format!(
                "{} bytes and {} scale bytes for a [{}, {}] {}-bit matrix in {} scale group(s)",
                self.data.len(),
                self.scales.len(),
                self.rows,
                self.cols,
                self.bits.bits(),
                self.groups
            )));
        }
        match split {
            Split::Replicated => self.rows(0, self.rows),
            Split::Rows | Split::GluRows => {
                let unit = if split == Split::GluRows { 2 * tp } else { tp };
                if !self.rows.is_multiple_of(unit) {
                    return Err(Error::Shape(format!("{} rows ({split:?}) cannot be split {tp} ways", self.rows)));
                }
                let parts = rank_rows(split, self.rows, tp, k)
                    .into_iter()
                    .map(|(a, b)| self.rows(a, b))
                    .collect::<Result<Vec<_>>>()?;
                QuantMatrix::concat_rows(&parts.iter().collect::<Vec<_>>())
            }
            Split::Cols => {
                let block = (SLICE_BLOCK_BYTES / self.bits.row_bytes(self.cols).max(1)).max(1);
                let parts = (0..self.rows)
                    .step_by(block)
                    .map(|r0| self.rows(r0, (r0 + block).min(self.rows))?.shard(split, tp, k))
                    .collect::<Result<Vec<_>>>()?;
                if parts.is_empty() {
                    return self.rows(0, 0)?.shard(split, tp, k);
                }
                QuantMatrix::concat_rows(&parts.iter().collect::<Vec<_>>())
            }
        }
    }
}

/// Rank `k` of `tp`'s part of a dense (float) tensor of the file: only its rows are copied out for
/// a row split; a column split (none in GLM's quantized files: those are the quantized weights)
/// is cut from the whole tensor.
fn dense_slice(view: &safetensors::tensor::TensorView, split: Split, tp: usize, k: usize) -> Result<Tensor> {
    let err = |e: String| Error::Format(e);
    let dtype = match view.dtype() {
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        d => return Err(err(format!("a {d:?} tensor where a float one was expected"))),
    };
    let shape = view.shape().to_vec();
    let whole = || Tensor::from_raw_buffer(view.data(), dtype, &shape, &Device::Cpu).map_err(|e| err(e.to_string()));
    match split {
        Split::Replicated => whole(),
        Split::Cols => glm_dist::split::shard(&whole()?, split, tp, k).map_err(|e| err(e.to_string())),
        Split::Rows | Split::GluRows => {
            let rows = shape.first().copied().unwrap_or(0);
            let unit = if split == Split::GluRows { 2 * tp } else { tp };
            if !rows.is_multiple_of(unit) {
                return Err(err(format!("shape {shape:?} cannot be split {tp} ways along its rows ({split:?})")));
            }
            let row_bytes = view.data().len() / rows.max(1);
            let mut bytes = Vec::with_capacity(row_bytes * rows / tp);
            for (a, b) in rank_rows(split, rows, tp, k) {
                bytes.extend_from_slice(&view.data()[a * row_bytes..b * row_bytes]);
            }
            let mut local = shape.clone();
            local[0] = rows / tp;
            Tensor::from_raw_buffer(&bytes, dtype, &local, &Device::Cpu).map_err(|e| err(e.to_string()))
        }
    }
}
