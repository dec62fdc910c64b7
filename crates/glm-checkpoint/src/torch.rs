//! torch.save files (`.pt`, `.bin`; torch >= 1.6): a stored ZIP holding `<archive>/data.pkl`, a
//! pickle whose tensors are views of storage records `<archive>/data/<key>`.
//!
//! Owns: opening such a file and walking a key path to its state dict (`["module"]` for SAT),
//! checking on open that every tensor's bytes lie inside the file (a truncated file fails before
//! any tensor is read), reading one tensor's bytes (or a range of its rows) with positioned
//! reads, any dtype torch stores (int8 included, which candle's reader drops), strided views
//! gathered; and writing state dicts the same way torch does, record by record, atomically.
//! Nothing loads the whole file: peak memory is the tensor being read.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::pickle::{self, Value};
pub use crate::pickle::{TensorRef, TorchDtype};
use crate::zip::{ZipIndex, ZipWriter};
use crate::{CheckpointError, Result};

/// Largest `data.pkl` accepted (a state dict's pickle is kilobytes to a few megabytes).
const MAX_PICKLE: u64 = 1 << 30;

impl TorchDtype {
    /// The candle dtype holding the same bytes (int8 as u8: reinterpret with `as i8`).
    pub fn candle(self) -> Option<DType> {
        Some(match self {
            Self::F64 => DType::F64,
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::I64 => DType::I64,
            Self::I32 => DType::I32,
            Self::I16 => DType::I16,
            Self::U8 | Self::I8 | Self::Bool => DType::U8,
        })
    }

    pub fn from_candle(dt: DType) -> Option<Self> {
        Some(match dt {
            DType::F64 => Self::F64,
            DType::F32 => Self::F32,
            DType::F16 => Self::F16,
            DType::BF16 => Self::BF16,
            DType::I64 => Self::I64,
            DType::I32 => Self::I32,
            DType::I16 => Self::I16,
            DType::U8 => Self::U8,
            _ => return None,
        })
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Format { path: path.to_path_buf(), reason: reason.into() }
}

/// An opened torch file: its tensors' places, nothing read yet.
pub struct TorchFile {
    path: PathBuf,
    file: File,
    /// (name, tensor, data start of its storage record), in the pickle's order.
    tensors: Vec<(String, TensorRef, u64)>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for TorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl TorchFile {
    /// Opens `path` and takes the dict at `key_path` (e.g. `["module"]`; empty for a plain state
    /// dict) as the state dict. Entries that are not tensors are skipped.
    pub fn open(path: &Path, key_path: &[&str]) -> Result<Self> {
        let file = File::open(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
        let index = ZipIndex::read(&file, path).map_err(|e| {
            // torch.save before 1.6 (or with `_use_new_zipfile_serialization=False`) wrote a bare
            // pickle stream: no ZIP records, and the file starts with a pickle protocol mark.
            let mut head = [0u8; 2];
            match file.read_exact_at(&mut head, 0) {
                Ok(()) if head[0] == 0x80 && head[1] <= 5 => bad(
                    path,
                    "the legacy (pre-1.6) torch.save format, which is not read here: re-save it with \
                     torch >= 1.6 (`torch.save(torch.load(f), f)`)",
                ),
                _ => e,
            }
        })?;
        let pkl = index
            .entries
            .iter()
            .find(|e| e.name.ends_with("data.pkl") && e.name.matches('/').count() <= 1)
            .ok_or_else(|| bad(path, "no data.pkl record: not a torch.save file"))?;
        let prefix = pkl.name.trim_end_matches("data.pkl").to_string();
        if pkl.method != 0 || pkl.size > MAX_PICKLE {
            return Err(bad(path, format!("{}: compressed or {} bytes: not a torch.save record", pkl.name, pkl.size)));
        }
        if let Some(e) = index.get(&format!("{prefix}byteorder")) {
            let mut b = vec![0u8; e.size.min(16) as usize];
            file.read_exact_at(&mut b, e.data_start)
                .map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
            if b != b"little" {
                return Err(bad(path, format!("byte order `{}` is not supported", String::from_utf8_lossy(&b))));
            }
        }
        let mut buf = vec![0u8; pkl.size as usize];
        file.read_exact_at(&mut buf, pkl.data_start)
            .map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
        let root = pickle::load(&buf).map_err(|e| bad(path, format!("{}: {e}", pkl.name)))?;
        let mut sd = &root;
        for (i, key) in key_path.iter().enumerate() {
            sd = sd.get(key).ok_or_else(|| {
                let keys = match sd {
                    Value::Dict(items) => items.iter().filter_map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", "),
                    _ => String::new(),
                };
                bad(path, format!("no key `{}` in the pickled dict (keys: {keys})", key_path[..=i].join(".")))
            })?;
        }
        let Value::Dict(items) = sd else {
            return Err(bad(path, format!("`{}` is not a dict of tensors", key_path.join("."))));
        };
        let mut tensors = Vec::with_capacity(items.len());
        for (k, v) in items {
            let (Some(name), Value::Tensor(t)) = (k.as_str(), v) else { continue };
            let record = format!("{prefix}data/{}", t.key);
            let e = index
                .get(&record)
                .ok_or_else(|| bad(path, format!("tensor `{name}`: its storage record {record} is missing")))?;
            if e.method != 0 {
                return Err(bad(path, format!("tensor `{name}`: storage record {record} is compressed")));
            }
            let need = t.extent().and_then(|n| n.checked_mul(t.dtype.size()));
            if need.is_none_or(|n| n as u64 > e.size) {
                return Err(bad(
                    path,
                    format!(
                        "tensor `{name}` {:?} needs {} bytes of storage {record}, which holds {}",
                        t.shape,
                        need.map_or("too many".to_string(), |n| n.to_string()),
                        e.size
                    ),
                ));
            }
            tensors.push((name.to_string(), t.clone(), e.data_start));
        }
        let by_name = tensors.iter().enumerate().map(|(i, (n, _, _))| (n.clone(), i)).collect();
        Ok(Self { path: path.to_path_buf(), file, tensors, by_name })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, in the file's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|(n, _, _)| n.as_str())
    }

    pub fn get(&self, name: &str) -> Option<&TensorRef> {
        self.by_name.get(name).map(|&i| &self.tensors[i].1)
    }

    fn entry(&self, name: &str) -> Result<&(String, TensorRef, u64)> {
        self.by_name.get(name).map(|&i| &self.tensors[i]).ok_or_else(|| CheckpointError::Missing {
            path: self.path.clone(),
            name: name.to_string(),
            expected: vec![],
        })
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.file.read_exact_at(buf, at).map_err(|source| CheckpointError::Io { path: self.path.clone(), source })
    }

    /// The bytes (little-endian) of rows `r0..r1` along dim 0, row-major; a 0-d tensor is one row.
    pub fn read_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        let (_, t, start) = self.entry(name)?;
        let rows = t.shape.first().copied().unwrap_or(1);
        if r0 > r1 || r1 > rows {
            return Err(bad(&self.path, format!("tensor `{name}`: rows {r0}..{r1} of {rows}")));
        }
        let es = t.dtype.size();
        let row_elems: usize = t.shape.iter().skip(1).product();
        let mut out = vec![0u8; (r1 - r0) * row_elems * es];
        if out.is_empty() {
            return Ok(out);
        }
        if t.is_contiguous() {
            self.read_at(&mut out, start + ((t.offset + r0 * row_elems) * es) as u64)?;
            return Ok(out);
        }
        // A strided view: read the storage span the rows touch, then gather element by element.
        let stride0 = t.stride.first().copied().unwrap_or(0);
        let lo = t.offset + r0 * stride0;
        let sub = TensorRef { offset: 0, shape: [vec![r1 - r0], t.shape[1..].to_vec()].concat(), ..t.clone() };
        let span = sub.extent().unwrap_or(0);
        let mut raw = vec![0u8; span * es];
        self.read_at(&mut raw, start + (lo * es) as u64)?;
        let mut idx = vec![0usize; sub.shape.len()];
        for chunk in out.chunks_exact_mut(es) {
            let off: usize = idx.iter().zip(&sub.stride).map(|(i, s)| i * s).sum();
            chunk.copy_from_slice(&raw[off * es..(off + 1) * es]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < sub.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(out)
    }

    /// All of a tensor's bytes, row-major.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let rows = self.entry(name)?.1.shape.first().copied().unwrap_or(1);
        self.read_rows(name, 0, rows)
    }

    /// A tensor on `device` converted to `dtype` (int8 storages come as their u8 bytes).
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (_, t, _) = self.entry(name)?;
        let wrap = |source| CheckpointError::Tensor {
            path: self.path.clone(),
            name: name.to_string(),
            source: Box::new(source),
        };
        let dt = t
            .dtype
            .candle()
            .ok_or_else(|| bad(&self.path, format!("tensor `{name}`: {:?} has no candle type", t.dtype)))?;
        let bytes = self.read(name)?;
        Tensor::from_raw_buffer(&bytes, dt, &t.shape, &Device::Cpu)
            .and_then(|x| x.to_dtype(dtype))
            .and_then(|x| x.to_device(device))
            .map_err(wrap)
    }
}

/// One tensor of a file being written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchEntry {
    pub name: String,
    pub dtype: TorchDtype,
    pub shape: Vec<usize>,
}

impl TorchEntry {
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Writes a torch.save file tensor by tensor: the pickle (every name, dtype and shape, known up
/// front) first, then each tensor's storage record as its bytes stream in, in the same order. The
/// file appears at its path only once `finish` has written and synced it whole.
pub struct TorchWriter {
    /// `None` once finished.
    zip: Option<ZipWriter<BufWriter<File>>>,
    entries: Vec<TorchEntry>,
    next: usize,
    open: bool,
    archive: String,
    tmp: PathBuf,
    path: PathBuf,
}

impl TorchWriter {
    /// `wrap`: keys the state dict is nested under (`["module"]` for SAT); `archive`: the ZIP's
    /// top folder (torch uses the file's stem; `"archive"` since torch 2).
    pub fn create(path: &Path, archive: &str, wrap: &[&str], entries: Vec<TorchEntry>) -> Result<Self> {
        let tmp = tmp_path(path);
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        let file = File::create(&tmp).map_err(io)?;
        let mut zip = ZipWriter::new(BufWriter::with_capacity(1 << 20, file));
        let spec: Vec<(String, TorchDtype, Vec<usize>)> =
            entries.iter().map(|e| (e.name.clone(), e.dtype, e.shape.clone())).collect();
        let w = (|| {
            zip.entry(&format!("{archive}/data.pkl"), &pickle::dump_state_dict(wrap, &spec))?;
            zip.entry(&format!("{archive}/byteorder"), b"little")
        })();
        if let Err(e) = w {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(Self {
            zip: Some(zip),
            entries,
            next: 0,
            open: false,
            archive: archive.to_string(),
            tmp,
            path: path.to_path_buf(),
        })
    }

    fn io(&self, source: std::io::Error) -> CheckpointError {
        CheckpointError::Io { path: self.path.clone(), source }
    }

    fn zip(&mut self) -> Result<&mut ZipWriter<BufWriter<File>>> {
        let path = self.path.clone();
        self.zip.as_mut().ok_or_else(|| CheckpointError::Io { path, source: std::io::Error::other("already finished") })
    }

    /// The next tensor to write.
    pub fn next_entry(&self) -> Option<&TorchEntry> {
        self.entries.get(self.next)
    }

    /// Appends bytes of the next tensor (row-major, little-endian); a tensor may come in pieces.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.skip_empty()?;
        if !self.open {
            let Some(e) = self.entries.get(self.next) else {
                return Err(self.io(std::io::Error::other("more tensor data than the entries declared")));
            };
            let (name, size) = (format!("{}/data/{}", self.archive, self.next), e.bytes());
            let r = self.zip()?.start(&name, size);
            r.map_err(|e| self.io(e))?;
            self.open = true;
        }
        let r = self.zip()?.write(data);
        r.map_err(|e| self.io(e))?;
        let done = self.entries.get(self.next).map(|e| e.bytes());
        if done.is_some_and(|n| Some(n) == self.zip.as_ref().map(|z| z.written())) {
            let r = self.zip()?.end();
            r.map_err(|e| self.io(e))?;
            self.open = false;
            self.next += 1;
        }
        Ok(())
    }

    /// Empty tensors get no data to start their records: write them as they come up.
    fn skip_empty(&mut self) -> Result<()> {
        while !self.open && self.entries.get(self.next).is_some_and(|e| e.bytes() == 0) {
            let name = format!("{}/data/{}", self.archive, self.next);
            let r = self.zip()?.entry(&name, &[]);
            r.map_err(|e| self.io(e))?;
            self.next += 1;
        }
        Ok(())
    }

    /// Writes the last records, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        self.skip_empty()?;
        if let Some(e) = self.entries.get(self.next) {
            let (n, want) = (self.entries.len(), e.name.clone());
            return Err(self.io(std::io::Error::other(format!(
                "tensor `{want}` ({} of {n}) was not written whole",
                self.next + 1
            ))));
        }
        let version = format!("{}/version", self.archive);
        let zip = self.zip.take();
        let r = zip.ok_or_else(|| std::io::Error::other("already finished")).and_then(|mut zip| {
            zip.entry(&version, b"3\n")?;
            let file = zip.finish()?.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
        });
        let path = self.path.clone();
        let r = r.and_then(|_| std::fs::rename(&self.tmp, &path));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(CheckpointError::Io { path, source: e });
        }
        Ok(())
    }
}

impl Drop for TorchWriter {
    fn drop(&mut self) {
        // Never leave a partial temporary file behind (after `finish` it no longer exists).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Writes a whole state dict of tensors (on any device, any dtype torch has) as a torch file.
pub fn save_tensors(path: &Path, wrap: &[&str], tensors: &[(String, Tensor)]) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = TorchDtype::from_candle(t.dtype())
            .ok_or_else(|| bad(path, format!("tensor `{name}`: dtype {:?} cannot be saved", t.dtype())))?;
        entries.push(TorchEntry { name: name.clone(), dtype, shape: t.dims().to_vec() });
    }
    let archive = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "archive".into());
    let mut w = TorchWriter::create(path, &archive, wrap, entries)?;
    for (name, t) in tensors {
        let wrap_err =
            |source| CheckpointError::Tensor { path: path.to_path_buf(), name: name.clone(), source: Box::new(source) };
        let bytes = tensor_bytes(t).map_err(wrap_err)?;
        w.write(&bytes)?;
    }
    w.finish()
}

/// A tensor's bytes, row-major, little-endian.
pub fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    use safetensors::View;
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    Ok(t.data().into_owned())
}
