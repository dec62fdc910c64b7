//! Writing a source out: our safetensors (dense, with the model's config and a SHA-256 of the
//! data in its header), our quantized file, or a SAT folder at any tensor-parallel degree (fp16, or
//! INT8/INT4 exactly as `tools/convert_tp.py --quantization-bit-width` writes it).
//!
//! Everything streams: dense tensors go through in blocks of rows, so memory stays near one block
//! (quantizing holds one weight); nothing appears at the destination until it is complete.

use std::path::{Path, PathBuf};

use glm_checkpoint::raw::SafetensorsWriter;
use glm_checkpoint::torch::{TorchDtype, TorchEntry, TorchWriter};
use glm_model::weights::{param_table, ParamSpec};
use glm_model::Config;
use glm_quant::{pack_nibbles, Bits, QuantMatrix};
use half::f16;

use crate::sat::{model_config_json, rank_file, rank_quant, LATEST, MODEL_CONFIG};
use crate::source::{convert_bytes, glm_metadata, is_quant, packed_shape, to_f32, Source, SCALE_SUFFIX};
use crate::{Error, Result};
use glm_dist::split::{check_tp, rank_rows, rank_shape, split_of, Split};

/// Rows are read this many bytes at a time: peak memory is a few blocks, whatever the model.
const BLOCK_BYTES: usize = 16 << 20;

#[derive(Debug, Clone)]
pub enum Target {
    /// Our dense safetensors, every tensor in `dtype` (`None`: as stored; quantized sources are
    /// dequantized, to f16 unless `dtype` says otherwise).
    Safetensors { path: PathBuf, dtype: Option<TorchDtype> },
    /// Our quantized safetensors (`glm quantize`'s format): a quantized source is copied exactly,
    /// a dense one quantized.
    Quantized { path: PathBuf, bits: Bits },
    /// A SAT folder (`latest`, `<iteration>/mp_rank_XX_model_states.pt`, `model_config.json`).
    Sat { dir: PathBuf, tp: usize, quantize: Option<Bits>, overwrite: bool },
}

/// What a conversion wrote.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub tensors: usize,
    pub bytes: u64,
}

/// Writes `src` as `target`; `progress` gets the bytes of every piece written.
pub fn convert(src: &dyn Source, target: &Target, progress: &mut dyn FnMut(u64)) -> Result<Report> {
    match target {
        Target::Safetensors { path, dtype } => write_dense(src, path, *dtype, progress),
        Target::Quantized { path, bits } => write_quantized(src, path, *bits, progress),
        Target::Sat { dir, tp, quantize, overwrite } => write_sat(src, dir, *tp, *quantize, *overwrite, progress),
    }
}

/// Bytes the target will hold (for a progress bar's length).
pub fn planned_bytes(src: &dyn Source, target: &Target) -> u64 {
    let cfg = src.config();
    param_table(cfg)
        .iter()
        .map(|p| {
            let n = p.numel();
            let quant = match target {
                Target::Quantized { bits, .. } => Some(*bits).filter(|_| p.kind.quantizable()),
                Target::Sat { quantize, .. } => quantize.or(src.bits()).filter(|_| p.kind.quantizable()),
                Target::Safetensors { .. } => None,
            };
            let dense_bytes = match target {
                Target::Safetensors { dtype: Some(d), .. } => d.size() as u64,
                Target::Safetensors { dtype: None, .. } => src.dtype(&p.name).map_or(2, |d| d.size() as u64),
                _ => 2,
            };
            let tp = match target {
                Target::Sat { tp, .. } if split_of(cfg, &p.name) == Split::Replicated => *tp as u64,
                _ => 1,
            };
            match quant {
                Some(b) => (b.row_bytes(p.shape[1]) * p.shape[0]) as u64,
                None => n * dense_bytes * tp,
            }
        })
        .sum()
}

/// Where tensor bytes go, in order: a torch file being written, or a safetensors file.
trait Sink {
    fn put(&mut self, data: &[u8]) -> Result<()>;
}

impl Sink for TorchWriter {
    fn put(&mut self, data: &[u8]) -> Result<()> {
        Ok(self.write(data)?)
    }
}

impl Sink for SafetensorsWriter {
    fn put(&mut self, data: &[u8]) -> Result<()> {
        Ok(self.write(data)?)
    }
}

/// Counts what is written and reports it to the progress callback.
struct Meter<'p> {
    bytes: u64,
    progress: &'p mut dyn FnMut(u64),
}

impl Meter<'_> {
    fn put(&mut self, w: &mut impl Sink, data: &[u8]) -> Result<()> {
        w.put(data)?;
        self.bytes += data.len() as u64;
        (self.progress)(data.len() as u64);
        Ok(())
    }
}

/// A dense parameter's rows r0..r1 as `out` bytes (a quantized one dequantized).
struct Rows<'a> {
    src: &'a dyn Source,
    p: &'a ParamSpec,
    quant: Option<QuantMatrix>,
}

impl<'a> Rows<'a> {
    fn new(src: &'a dyn Source, p: &'a ParamSpec) -> Result<Self> {
        let quant = if is_quant(src, p) { Some(src.quant(&p.name)?) } else { None };
        Ok(Self { src, p, quant })
    }

    fn stored(&self) -> Result<TorchDtype> {
        Ok(if self.quant.is_some() { TorchDtype::F32 } else { self.src.dtype(&self.p.name)? })
    }

    fn row_bytes(&self) -> Result<usize> {
        Ok(self.p.shape.iter().skip(1).product::<usize>() * self.stored()?.size())
    }

    fn read(&self, r0: usize, r1: usize, out: TorchDtype) -> Result<Vec<u8>> {
        match &self.quant {
            Some(q) => {
                let v: Vec<u8> = q.dequantize_rows(r0, r1).iter().flat_map(|x| x.to_le_bytes()).collect();
                convert_bytes(TorchDtype::F32, out, v, &self.p.name)
            }
            None => convert_bytes(self.stored()?, out, self.src.read_rows(&self.p.name, r0, r1)?, &self.p.name),
        }
    }

    /// Rows a..b in blocks of about `BLOCK_BYTES`.
    fn blocks(&self, a: usize, b: usize) -> Result<impl Iterator<Item = (usize, usize)>> {
        let per = (BLOCK_BYTES / self.row_bytes()?.max(1)).max(1);
        Ok((a..b).step_by(per).map(move |r| (r, (r + per).min(b))))
    }
}

fn write_dense(
    src: &dyn Source,
    path: &Path,
    dtype: Option<TorchDtype>,
    progress: &mut dyn FnMut(u64),
) -> Result<Report> {
    let cfg = src.config();
    let table = param_table(cfg);
    let out_dtype = |p: &ParamSpec| -> Result<TorchDtype> {
        Ok(match dtype {
            Some(d) => d,
            None if is_quant(src, p) => TorchDtype::F16,
            None => src.dtype(&p.name)?,
        })
    };
    let entries: Vec<(String, TorchDtype, Vec<usize>)> =
        table.iter().map(|p| Ok((p.name.clone(), out_dtype(p)?, p.shape.clone()))).collect::<Result<_>>()?;
    let mut w = SafetensorsWriter::create(path, &entries, &glm_metadata(src), true)?;
    let mut out = Meter { bytes: 0, progress };
    for (p, (_, dt, _)) in table.iter().zip(&entries) {
        let rows = Rows::new(src, p)?;
        for (a, b) in rows.blocks(0, p.shape[0])? {
            out.put(&mut w, &rows.read(a, b, *dt)?)?;
        }
    }
    w.finish()?;
    Ok(Report { tensors: table.len(), bytes: out.bytes })
}

fn scale_bytes(q: &QuantMatrix) -> Vec<u8> {
    q.scales.iter().flat_map(|s| s.to_le_bytes()).collect()
}

fn data_bytes(q: &QuantMatrix) -> Vec<u8> {
    q.data.iter().map(|&b| b as u8).collect()
}

/// A weight quantized the way GLM-130B's tools do it on fp16 weights (`convert_tp.py`, ChatGLM's
/// `quantization.py`), so the bits are theirs: `scale = f16(absmax * f32(1 / qmax))` (CUDA
/// multiplies by the reciprocal), `q = round_half_even(f16(w / scale))`. `w` holds f16 values.
pub fn quantize_like_glm130b(w: &[f32], rows: usize, cols: usize, bits: Bits) -> Result<QuantMatrix> {
    if w.len() != rows * cols || (bits == Bits::Int4 && !cols.is_multiple_of(2)) {
        return Err(Error::Input(format!(
            "cannot quantize {} values as a [{rows}, {cols}] {}-bit matrix",
            w.len(),
            bits.bits()
        )));
    }
    let recip = 1.0f32 / bits.qmax();
    let mut scales = Vec::with_capacity(rows);
    let mut data = Vec::with_capacity(rows * bits.row_bytes(cols));
    for row in w.chunks_exact(cols.max(1)).take(rows) {
        let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = f16::from_f32(absmax * recip);
        let s = scale.to_f32();
        // An all-zero row divides 0 by 0 on the GPU (NaN, cast to 0 on the hardware it ran on).
        let q = |v: f32| if s > 0.0 { f16::from_f32(v / s).to_f32().round_ties_even() as i8 } else { 0 };
        match bits {
            Bits::Int8 => data.extend(row.iter().map(|&v| q(v))),
            Bits::Int4 => data.extend(row.chunks_exact(2).map(|p| pack_nibbles(q(p[0]), q(p[1])))),
        }
        scales.push(scale);
    }
    Ok(QuantMatrix::from_parts(bits, rows, cols, 1, data, scales)?)
}

fn write_quantized(src: &dyn Source, path: &Path, bits: Bits, progress: &mut dyn FnMut(u64)) -> Result<Report> {
    if src.bits().is_some_and(|b| b != bits) {
        return Err(Error::Input(format!(
            "{} is INT{}; re-quantizing to INT{} would compound the rounding: convert from the fp16 checkpoint",
            src.describe(),
            src.bits().map_or(0, |b| b.bits()),
            bits.bits()
        )));
    }
    let cfg = src.config();
    let table = param_table(cfg);
    let mut entries = Vec::new();
    for p in &table {
        if p.kind.quantizable() {
            let groups = if src.bits().is_some() { src.quant_groups(&p.name)? } else { 1 };
            entries.push((p.name.clone(), TorchDtype::U8, packed_shape(bits, &p.shape)));
            let scale_shape = if groups == 1 { vec![p.shape[0]] } else { vec![p.shape[0], groups] };
            entries.push((format!("{}{SCALE_SUFFIX}", p.name), TorchDtype::F16, scale_shape));
        } else {
            entries.push((p.name.clone(), TorchDtype::F16, p.shape.clone()));
        }
    }
    let mut meta = glm_metadata(src);
    meta.insert("format".into(), glm_quant::checkpoint::FORMAT.into());
    meta.insert("bits".into(), bits.bits().to_string());
    let mut w = SafetensorsWriter::create(path, &entries, &meta, true)?;
    let mut out = Meter { bytes: 0, progress };
    for p in &table {
        if p.kind.quantizable() {
            let q = if src.bits().is_some() {
                src.quant(&p.name)?
            } else {
                let stored = src.dtype(&p.name)?;
                let v = to_f32(stored, &src.read_rows(&p.name, 0, p.shape[0])?, &p.name)?;
                if stored == TorchDtype::F16 {
                    quantize_like_glm130b(&v, p.shape[0], p.shape[1], bits)?
                } else {
                    QuantMatrix::quantize(&v, p.shape[0], p.shape[1], bits)?
                }
            };
            out.put(&mut w, &data_bytes(&q))?;
            out.put(&mut w, &scale_bytes(&q))?;
        } else {
            let rows = Rows::new(src, p)?;
            for (a, b) in rows.blocks(0, p.shape[0])? {
                out.put(&mut w, &rows.read(a, b, TorchDtype::F16)?)?;
            }
        }
    }
    w.finish()?;
    Ok(Report { tensors: entries.len(), bytes: out.bytes })
}

fn write_sat(
    src: &dyn Source,
    dir: &Path,
    tp: usize,
    quantize: Option<Bits>,
    overwrite: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<Report> {
    let cfg = src.config();
    sat_compatible(cfg)?;
    check_tp(cfg, tp)?;
    let bits = match (src.bits(), quantize) {
        (Some(s), Some(q)) if s != q => {
            return Err(Error::Input(format!(
                "{} is INT{}, not INT{}: convert from fp16 to re-quantize",
                src.describe(),
                s.bits(),
                q.bits()
            )))
        }
        (s, q) => q.or(s),
    };
    if dir.exists() && !overwrite {
        return Err(Error::Input(format!("{} exists; pass --force to replace it", dir.display())));
    }
    let iteration = "release".to_string();
    let tmp = dir.with_file_name(format!(
        ".{}.tmp-{}",
        dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let io = |p: &Path, e: std::io::Error| Error::Input(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(tmp.join(&iteration)).map_err(|e| io(&tmp, e))?;
    let result = (|| -> Result<Report> {
        let report = write_sat_ranks(src, &tmp.join(&iteration), tp, bits, progress)?;
        std::fs::write(tmp.join(LATEST), &iteration).map_err(|e| io(&tmp, e))?;
        std::fs::write(tmp.join(MODEL_CONFIG), model_config_json(cfg, tp, src.released())).map_err(|e| io(&tmp, e))?;
        // Replace the destination only now that the new folder is whole.
        if dir.exists() {
            let old = tmp.with_extension("old");
            std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
            std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))?;
        }
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// SAT folders hold GLM-130B-architecture models (GeGLU, tied head) in SAT's names.
fn sat_compatible(cfg: &Config) -> Result<()> {
    if !cfg.tie_word_embeddings || cfg.ffn != glm_model::FfnKind::GeGlu {
        return Err(Error::Input(format!(
            "`{}` is not a GLM-130B-architecture model (GeGLU, tied output head): SAT export is for those; \
             write a .safetensors instead",
            cfg.name
        )));
    }
    Ok(())
}

fn write_sat_ranks(
    src: &dyn Source,
    iter_dir: &Path,
    tp: usize,
    bits: Option<Bits>,
    progress: &mut dyn FnMut(u64),
) -> Result<Report> {
    let cfg = src.config();
    let table = param_table(cfg);
    let quantized = |p: &ParamSpec| bits.is_some() && p.kind.quantizable();
    let mut entries = Vec::new();
    for p in &table {
        let local = rank_shape(split_of(cfg, &p.name), &p.shape, tp);
        match bits.filter(|_| p.kind.quantizable()) {
            Some(b) => {
                entries.push(TorchEntry {
                    name: p.name.clone(),
                    dtype: TorchDtype::I8,
                    shape: packed_shape(b, &local),
                });
                entries.push(TorchEntry {
                    name: format!("{}{SCALE_SUFFIX}", p.name),
                    dtype: TorchDtype::F16,
                    shape: vec![local[0]],
                });
            }
            None => entries.push(TorchEntry { name: p.name.clone(), dtype: TorchDtype::F16, shape: local }),
        }
    }
    let mut writers: Vec<TorchWriter> = (0..tp)
        .map(|k| {
            let name = rank_file(k);
            let stem = name.trim_end_matches(".pt").to_string();
            TorchWriter::create(&iter_dir.join(&name), &stem, &["module"], entries.clone())
        })
        .collect::<std::result::Result<_, _>>()?;
    let mut out = Meter { bytes: 0, progress };
    for p in &table {
        let split = split_of(cfg, &p.name);
        if quantized(p) {
            let b = bits.ok_or_else(|| Error::Input("no bit width".into()))?;
            if src.bits().is_some() {
                let q = src.quant(&p.name)?;
                for (k, w) in writers.iter_mut().enumerate() {
                    let r = rank_quant(cfg, &p.name, &q, tp, k)?;
                    out.put(w, &data_bytes(&r))?;
                    out.put(w, &scale_bytes(&r))?;
                }
            } else {
                // convert_tp.py: split the fp16 weight, then quantize each rank's slice.
                let rows = Rows::new(src, p)?;
                let whole = to_f32(TorchDtype::F16, &rows.read(0, p.shape[0], TorchDtype::F16)?, &p.name)?;
                for (k, w) in writers.iter_mut().enumerate() {
                    let (slice, r, c) = rank_slice_f32(split, &whole, &p.shape, tp, k);
                    let q = quantize_like_glm130b(&slice, r, c, b)?;
                    out.put(w, &data_bytes(&q))?;
                    out.put(w, &scale_bytes(&q))?;
                }
            }
            continue;
        }
        let rows = Rows::new(src, p)?;
        match split {
            Split::Replicated => {
                for (a, b) in rows.blocks(0, p.shape[0])? {
                    let data = rows.read(a, b, TorchDtype::F16)?;
                    for w in writers.iter_mut() {
                        out.put(w, &data)?;
                    }
                }
            }
            Split::Rows | Split::GluRows => {
                for (k, w) in writers.iter_mut().enumerate() {
                    for (ra, rb) in rank_rows(split, p.shape[0], tp, k) {
                        for (a, b) in rows.blocks(ra, rb)? {
                            out.put(w, &rows.read(a, b, TorchDtype::F16)?)?;
                        }
                    }
                }
            }
            Split::Cols => {
                let cb = p.shape[1] / tp * TorchDtype::F16.size();
                for (a, b) in rows.blocks(0, p.shape[0])? {
                    let data = rows.read(a, b, TorchDtype::F16)?;
                    for (k, w) in writers.iter_mut().enumerate() {
                        let piece: Vec<u8> =
                            data.chunks_exact(cb * tp).flat_map(|row| &row[k * cb..(k + 1) * cb]).copied().collect();
                        out.put(w, &piece)?;
                    }
                }
            }
        }
    }
    let tensors = entries.len();
    for w in writers {
        w.finish()?;
    }
    Ok(Report { tensors, bytes: out.bytes })
}

/// Rank `k`'s piece of a whole f32 matrix: (values, rows, cols).
fn rank_slice_f32(split: Split, w: &[f32], shape: &[usize], tp: usize, k: usize) -> (Vec<f32>, usize, usize) {
    let (rows, cols) = (shape[0], shape[1]);
    match split {
        Split::Cols => {
            let c = cols / tp;
            let v = w.chunks_exact(cols).flat_map(|row| &row[k * c..(k + 1) * c]).copied().collect();
            (v, rows, c)
        }
        _ => {
            let ranges = rank_rows(split, rows, tp, k);
            let v: Vec<f32> = ranges.iter().flat_map(|&(a, b)| &w[a * cols..b * cols]).copied().collect();
            let r = v.len() / cols.max(1);
            (v, r, cols)
        }
    }
}
