//! Tensor files as bytes: one read-by-rows view over safetensors and torch files (`RawStore`),
//! and a streaming safetensors writer.
//!
//! Owns: opening a safetensors file by its header alone (every tensor's range checked against the
//! file size), reading any tensor's rows with positioned reads (no mapping, so memory is what is
//! read); writing a safetensors file whose header is known before its data, tensor by tensor and
//! piece by piece, with an optional SHA-256 of the data section recorded in the header, atomically.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::torch::{TorchDtype, TorchFile};
use crate::{CheckpointError, Result};

/// A tensor's stored element type and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawInfo {
    pub dtype: TorchDtype,
    pub shape: Vec<usize>,
}

impl RawInfo {
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Bytes per row (dim 0); a 0-d tensor is one row.
    pub fn row_bytes(&self) -> usize {
        self.shape.iter().skip(1).product::<usize>() * self.dtype.size()
    }

    pub fn bytes(&self) -> u64 {
        self.rows() as u64 * self.row_bytes() as u64
    }
}

/// Tensors that can be read a range of rows at a time.
pub trait RawStore {
    fn path(&self) -> &Path;
    fn names(&self) -> Vec<String>;
    fn info(&self, name: &str) -> Option<RawInfo>;
    /// Rows `r0..r1` along dim 0, row-major, little-endian.
    fn read_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>>;
}

impl RawStore for TorchFile {
    fn path(&self) -> &Path {
        TorchFile::path(self)
    }
    fn names(&self) -> Vec<String> {
        TorchFile::names(self).map(str::to_string).collect()
    }
    fn info(&self, name: &str) -> Option<RawInfo> {
        self.get(name).map(|t| RawInfo { dtype: t.dtype, shape: t.shape.clone() })
    }
    fn read_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        TorchFile::read_rows(self, name, r0, r1)
    }
}

pub fn st_dtype(s: &str) -> Option<TorchDtype> {
    Some(match s {
        "F64" => TorchDtype::F64,
        "F32" => TorchDtype::F32,
        "F16" => TorchDtype::F16,
        "BF16" => TorchDtype::BF16,
        "I64" => TorchDtype::I64,
        "I32" => TorchDtype::I32,
        "I16" => TorchDtype::I16,
        "I8" => TorchDtype::I8,
        "U8" => TorchDtype::U8,
        "BOOL" => TorchDtype::Bool,
        _ => return None,
    })
}

pub fn st_name(d: TorchDtype) -> &'static str {
    match d {
        TorchDtype::F64 => "F64",
        TorchDtype::F32 => "F32",
        TorchDtype::F16 => "F16",
        TorchDtype::BF16 => "BF16",
        TorchDtype::I64 => "I64",
        TorchDtype::I32 => "I32",
        TorchDtype::I16 => "I16",
        TorchDtype::I8 => "I8",
        TorchDtype::U8 => "U8",
        TorchDtype::Bool => "BOOL",
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Format { path: path.to_path_buf(), reason: reason.into() }
}

/// Largest header accepted (the format caps it at 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// A safetensors file opened by its header.
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// name -> (info, absolute byte offset of its data)
    tensors: BTreeMap<String, (RawInfo, u64)>,
    metadata: BTreeMap<String, String>,
    data_start: u64,
    data_len: u64,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .map_err(|_| bad(path, format!("{len} bytes: too short for a safetensors header")))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || 8 + n > len {
            return Err(bad(path, format!("header of {n} bytes in a file of {len}: truncated or not safetensors")));
        }
        let mut h = vec![0u8; n as usize];
        file.read_exact_at(&mut h, 8).map_err(io)?;
        let header: serde_json::Value =
            serde_json::from_slice(&h).map_err(|e| bad(path, format!("header is not JSON: {e}")))?;
        let obj = header.as_object().ok_or_else(|| bad(path, "header is not a JSON object"))?;
        let data_start = 8 + n;
        let data_len = len - data_start;
        let (mut tensors, mut metadata) = (BTreeMap::new(), BTreeMap::new());
        for (name, v) in obj {
            if name == "__metadata__" {
                for (k, v) in v.as_object().into_iter().flatten() {
                    if let Some(s) = v.as_str() {
                        metadata.insert(k.clone(), s.to_string());
                    }
                }
                continue;
            }
            let what = |m: &str| bad(path, format!("tensor `{name}`: {m}"));
            let dtype = v["dtype"].as_str().and_then(st_dtype).ok_or_else(|| what("unknown dtype"))?;
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .ok_or_else(|| what("bad shape"))?;
            let offs: Vec<u64> = v["data_offsets"]
                .as_array()
                .and_then(|a| a.iter().map(|d| d.as_u64()).collect())
                .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
                .ok_or_else(|| what("bad data_offsets"))?;
            let info = RawInfo { dtype, shape };
            let want = info.shape.iter().try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d as u64));
            if want != Some(offs[1] - offs[0]) {
                return Err(what(&format!("shape {:?} does not fit its {} bytes", info.shape, offs[1] - offs[0])));
            }
            if offs[1] > data_len {
                return Err(what(&format!(
                    "needs data bytes {}..{} but the file holds {data_len}: truncated",
                    offs[0], offs[1]
                )));
            }
            tensors.insert(name.clone(), (info, data_start + offs[0]));
        }
        Ok(Self { path: path.to_path_buf(), file, tensors, metadata, data_start, data_len })
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// SHA-256 (hex) of the data section, to compare with a recorded one.
    pub fn data_sha256(&self) -> Result<String> {
        sha256_range(&self.file, &self.path, self.data_start, self.data_len)
    }
}

impl RawStore for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn info(&self, name: &str) -> Option<RawInfo> {
        self.tensors.get(name).map(|(i, _)| i.clone())
    }
    fn read_rows(&self, name: &str, r0: usize, r1: usize) -> Result<Vec<u8>> {
        let (info, at) = self.tensors.get(name).ok_or_else(|| CheckpointError::Missing {
            path: self.path.clone(),
            name: name.to_string(),
            expected: vec![],
        })?;
        if r0 > r1 || r1 > info.rows() {
            return Err(bad(&self.path, format!("tensor `{name}`: rows {r0}..{r1} of {}", info.rows())));
        }
        let rb = info.row_bytes() as u64;
        let mut out = vec![0u8; ((r1 - r0) as u64 * rb) as usize];
        self.file
            .read_exact_at(&mut out, at + r0 as u64 * rb)
            .map_err(|source| CheckpointError::Io { path: self.path.clone(), source })?;
        Ok(out)
    }
}

/// SHA-256 (hex) of `len` bytes of `file` from `start`, read 4 MiB at a time.
pub fn sha256_range(file: &File, path: &Path, start: u64, len: u64) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0u64;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], start + at)
            .map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The metadata key under which `SafetensorsWriter` records the data section's SHA-256.
pub const DATA_SHA256: &str = "data_sha256";
const PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Writes a safetensors file whose tensors are all declared up front and then streamed in order.
pub struct SafetensorsWriter {
    out: Option<BufWriter<File>>,
    sizes: Vec<(String, u64)>,
    next: usize,
    in_tensor: u64,
    sha: Option<(Sha256, u64)>,
    tmp: PathBuf,
    path: PathBuf,
}

impl SafetensorsWriter {
    /// `with_sha256`: record the data section's SHA-256 in the metadata (key `data_sha256`).
    pub fn create(
        path: &Path,
        entries: &[(String, TorchDtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
        with_sha256: bool,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        let mut meta: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        if with_sha256 {
            meta.insert(DATA_SHA256.into(), PLACEHOLDER.into());
        }
        if !meta.is_empty() {
            header.insert("__metadata__".into(), meta.into());
        }
        let mut off = 0u64;
        let mut sizes = Vec::with_capacity(entries.len());
        for (name, dtype, shape) in entries {
            let n = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": st_name(*dtype), "shape": shape, "data_offsets": [off, off + n]}),
            );
            sizes.push((name.clone(), n));
            off += n;
        }
        let mut h =
            serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| bad(path, format!("header: {e}")))?;
        h.resize(h.len().div_ceil(8) * 8, b' ');
        let tmp = path.with_file_name(format!(
            ".{}.tmp.{}",
            path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        // Read and write: the checksum is patched into the header at the end.
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 22, file);
        let r = out.write_all(&(h.len() as u64).to_le_bytes()).and_then(|_| out.write_all(&h));
        let w = Self {
            out: Some(out),
            sizes,
            next: 0,
            in_tensor: 0,
            sha: with_sha256.then(|| (Sha256::new(), 8 + h.len() as u64)),
            tmp,
            path: path.to_path_buf(),
        };
        r.map_err(io)?;
        Ok(w)
    }

    fn io(&self, source: std::io::Error) -> CheckpointError {
        CheckpointError::Io { path: self.path.clone(), source }
    }

    /// Appends bytes of the current tensor (a tensor may come in pieces; never past its end).
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        while self.sizes.get(self.next).is_some_and(|(_, n)| *n == self.in_tensor && !data.is_empty()) {
            self.next += 1;
            self.in_tensor = 0;
        }
        let Some((name, size)) = self.sizes.get(self.next) else {
            return Err(self.io(std::io::Error::other("more data than the declared tensors hold")));
        };
        if self.in_tensor + data.len() as u64 > *size {
            let m = format!("tensor `{name}` declared {size} bytes, got more");
            return Err(self.io(std::io::Error::other(m)));
        }
        self.in_tensor += data.len() as u64;
        if let Some((h, _)) = self.sha.as_mut() {
            h.update(data);
        }
        let r = match self.out.as_mut() {
            Some(o) => o.write_all(data),
            None => Err(std::io::Error::other("already finished")),
        };
        r.map_err(|e| self.io(e))
    }

    /// Checks every tensor was written whole, records the checksum, syncs and renames into place.
    pub fn finish(mut self) -> Result<()> {
        let declared: u64 = self.sizes.iter().map(|(_, n)| n).sum();
        let written: u64 = self.sizes.iter().take(self.next).map(|(_, n)| n).sum::<u64>() + self.in_tensor;
        if written != declared {
            let m = format!("{written} of {declared} data bytes written");
            return Err(self.io(std::io::Error::other(m)));
        }
        let sha = self.sha.take();
        let out = self.out.take();
        let r = (|| {
            let mut f = out
                .ok_or_else(|| std::io::Error::other("already finished"))?
                .into_inner()
                .map_err(|e| e.into_error())?;
            if let Some((h, header_end)) = sha {
                // Patch the placeholder, which has the digest's length, in place.
                let digest = hex(&h.finalize());
                let mut head = vec![0u8; header_end as usize];
                f.read_exact_at(&mut head, 0)?;
                let at = head
                    .windows(PLACEHOLDER.len())
                    .position(|w| w == PLACEHOLDER.as_bytes())
                    .ok_or_else(|| std::io::Error::other("checksum placeholder not found"))?;
                f.seek(SeekFrom::Start(at as u64))?;
                f.write_all(digest.as_bytes())?;
            }
            f.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)?;
            if let Some(d) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = File::open(d).and_then(|d| d.sync_all());
            }
            Ok(())
        })();
        r.map_err(|e| self.io(e))
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Opens a tensor file by its content: a torch.save ZIP (state dict under `key_path`) or safetensors.
pub fn open_store(path: &Path, key_path: &[&str]) -> Result<Box<dyn RawStore>> {
    let mut head = [0u8; 4];
    let f = File::open(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    let n = f.read_at(&mut head, 0).unwrap_or(0);
    if n == 4 && head == [b'P', b'K', 3, 4] {
        Ok(Box::new(TorchFile::open(path, key_path)?))
    } else if n >= 2 && head[0] == 0x80 {
        // A pre-1.6 torch pickle: TorchFile says what to do with it.
        Ok(Box::new(TorchFile::open(path, key_path)?))
    } else {
        Ok(Box::new(SafetensorsFile::open(path)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_file_reads_back_and_verifies() {
        let d = std::env::temp_dir().join(format!("glm-raw-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("m.safetensors");
        let entries = vec![
            ("a".to_string(), TorchDtype::F32, vec![2, 3]),
            ("b".to_string(), TorchDtype::U8, vec![0]),
            ("c".to_string(), TorchDtype::F16, vec![4]),
        ];
        let meta: BTreeMap<String, String> = [("format".to_string(), "glm".to_string())].into();
        let mut w = SafetensorsWriter::create(&p, &entries, &meta, true).unwrap();
        let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.write(&a[..8]).unwrap();
        w.write(&a[8..]).unwrap();
        w.write(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert!(!p.exists());
        w.finish().unwrap();
        // The safetensors crate (the format's reference) accepts it.
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &a[..]);
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata()["format"], "glm");
        assert_eq!(f.metadata()[DATA_SHA256], f.data_sha256().unwrap());
        assert_eq!(f.read_rows("a", 1, 2).unwrap(), a[12..]);
        assert_eq!(f.read_rows("c", 0, 4).unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(f.read_rows("a", 1, 3).is_err());
        // Short writes fail at finish and leave nothing.
        let mut w = SafetensorsWriter::create(&d.join("x.safetensors"), &entries, &meta, false).unwrap();
        w.write(&a).unwrap();
        assert!(w.write(&[0u8; 9]).is_err());
        assert!(w.finish().is_err());
        assert!(!d.join("x.safetensors").exists());
        // Every truncation of the file is an error naming it.
        for cut in 0..bytes.len() {
            std::fs::write(d.join("cut.safetensors"), &bytes[..cut]).unwrap();
            match SafetensorsFile::open(&d.join("cut.safetensors")) {
                Err(e) => assert!(e.to_string().contains("cut.safetensors")),
                // A cut inside the last tensor's bytes is caught: only a cut after all data passes.
                Ok(_) => assert_eq!(cut, bytes.len()),
            }
        }
    }
}
