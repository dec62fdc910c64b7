//! The quantized checkpoint: one safetensors file whose header says what it is
//! (`__metadata__`: `format = glm-quant`, `bits`, the model `config` as JSON), holding
//!
//! - each block linear's weight as `U8` bytes, `[rows, cols]` (INT8) or `[rows, cols / 2]` (INT4,
//!   GLM-130B's nibble order), beside `<name>_scale`, f16 `[rows]` (GLM-130B's quantized layout);
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
use glm_model::weights::{param_table, ParamKind};
use glm_model::{Config, Glm};
use half::f16;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

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
/// written atomically: a dense checkpoint file, or weights already in memory.
pub fn quantize_tensors(
    cfg: &Config,
    load: impl Fn(&str) -> std::result::Result<Tensor, String>,
    bits: Bits,
    out: &Path,
) -> Result<QuantReport> {
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let (mut quantized, mut kept) = (0, 0);
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
        if matches!(p.kind, ParamKind::QkvWeight | ParamKind::LinearWeight) {
            let (rows, cols) = (p.shape[0], p.shape[1]);
            let q =
                QuantMatrix::quantize(&v, rows, cols, bits).map_err(|e| Error::Format(format!("{}: {e}", p.name)))?;
            let data: Vec<u8> = q.data.iter().map(|&b| b as u8).collect();
            blobs.push((p.name.clone(), Dtype::U8, vec![rows, bits.row_bytes(cols)], data));
            let scales: Vec<u8> = q.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            blobs.push((format!("{}{SCALE_SUFFIX}", p.name), Dtype::F16, vec![rows], scales));
            quantized += 1;
        } else {
            let data: Vec<u8> = v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
            blobs.push((p.name.clone(), Dtype::F16, p.shape.clone(), data));
            kept += 1;
        }
    }
    let views = blobs
        .iter()
        .map(|(n, dt, shape, data)| {
            TensorView::new(*dt, shape.clone(), data).map(|v| (n.clone(), v)).map_err(|e| io(out, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [
        ("format".to_string(), FORMAT.to_string()),
        ("bits".to_string(), bits.bits().to_string()),
        ("config".to_string(), cfg.to_json()),
    ]
    .into_iter()
    .collect();
    let bytes = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| io(out, e))?;
    glm_checkpoint::write_atomic(out, &bytes).map_err(|e| io(out, e))?;
    Ok(QuantReport { quantized, kept, bytes: bytes.len() as u64 })
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
            if sv.dtype() != Dtype::F16 || sv.shape() != [rows] {
                return Err(io(
                    path,
                    format!(
                        "{scale_name} is {:?} {:?}; the weight's {rows} rows need f16 [{rows}]",
                        sv.dtype(),
                        sv.shape()
                    ),
                ));
            }
            let scales: Vec<f16> = sv.data().chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
            let m = QuantMatrix { bits, rows, cols, data: view.data().iter().map(|&b| b as i8).collect(), scales };
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

    /// Bytes of the packed weights and scales held.
    pub fn quantized_bytes(&self) -> usize {
        self.quant.values().map(|m| m.data.len() + 2 * m.scales.len()).sum()
    }
}
