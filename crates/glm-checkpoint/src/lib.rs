//! Safetensors checkpoints. Owns: opening a file with errors that name it, checking every expected
//! tensor (name, shape) before anything is built, loading tensors, and atomic saving (temp file in the
//! same folder, fsync, rename) so that a crash mid-write never leaves a half-written checkpoint.
//! `torch` reads and writes torch.save files (the released GLM-130B and ChatGLM-6B checkpoints)
//! on its own `pickle` and `zip` readers.

pub mod pickle;
pub mod raw;
pub mod torch;
pub mod zip;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: cannot read checkpoint: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is missing (expected shape {expected:?})")]
    Missing { path: PathBuf, name: String, expected: Vec<usize> },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor `{name}` has dtype {found:?}, which cannot be used as a model weight")]
    Dtype { path: PathBuf, name: String, found: safetensors::Dtype },
    #[error("{path}: tensor `{name}`: {source}")]
    Tensor { path: PathBuf, name: String, source: Box<candle_core::Error> },
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

/// One tensor a model expects: its checkpoint name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// An opened (memory-mapped) safetensors checkpoint, one or several files.
pub struct Checkpoint {
    paths: Vec<PathBuf>,
    files: Vec<MmapedSafetensors>,
    /// name -> (shape, dtype, index of the file that holds it)
    index: BTreeMap<String, (Vec<usize>, safetensors::Dtype, usize)>,
}

impl Checkpoint {
    /// Open one or more safetensors files (a sharded checkpoint is several files). Only headers
    /// are read here; tensor data is memory-mapped and read on `load`.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let paths: Vec<PathBuf> = paths.iter().map(|p| p.as_ref().to_path_buf()).collect();
        let mut index = BTreeMap::new();
        let mut files = Vec::with_capacity(paths.len());
        for (i, path) in paths.iter().enumerate() {
            if let Err(source) = fs::metadata(path) {
                return Err(CheckpointError::Io { path: path.clone(), source });
            }
            // SAFETY: like every mmap-based loader (candle, llama.cpp) we require that the file is
            // not modified while the checkpoint is open.
            let st = unsafe { MmapedSafetensors::new(path) }
                .map_err(|e| CheckpointError::Format { path: path.clone(), reason: e.to_string() })?;
            for (name, view) in st.tensors() {
                index.insert(name, (view.shape().to_vec(), view.dtype(), i));
            }
            files.push(st);
        }
        Ok(Self { paths, files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|(s, _, _)| s.as_slice())
    }

    fn path_of(&self, name: &str) -> PathBuf {
        let i = self.index.get(name).map(|(_, _, i)| *i).unwrap_or(0);
        self.paths.get(i).cloned().unwrap_or_default()
    }

    /// Check that every expected tensor is present with its shape and a float dtype. Reports the
    /// first problem, naming the tensor, the file and both shapes.
    pub fn verify(&self, specs: &[TensorSpec]) -> Result<()> {
        use safetensors::Dtype as D;
        for spec in specs {
            match self.index.get(&spec.name) {
                None => {
                    return Err(CheckpointError::Missing {
                        path: self.paths.first().cloned().unwrap_or_default(),
                        name: spec.name.clone(),
                        expected: spec.shape.clone(),
                    })
                }
                Some((shape, _, _)) if *shape != spec.shape => {
                    return Err(CheckpointError::Shape {
                        path: self.path_of(&spec.name),
                        name: spec.name.clone(),
                        expected: spec.shape.clone(),
                        found: shape.clone(),
                    })
                }
                Some((_, dt, _)) if !matches!(dt, D::F32 | D::F16 | D::BF16 | D::F64) => {
                    return Err(CheckpointError::Dtype {
                        path: self.path_of(&spec.name),
                        name: spec.name.clone(),
                        found: *dt,
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Load one tensor onto `device`, converted to `dtype`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let wrap = |source| CheckpointError::Tensor {
            path: self.path_of(name),
            name: name.to_string(),
            source: Box::new(source),
        };
        let Some((_, _, file)) = self.index.get(name) else {
            return Err(CheckpointError::Missing {
                path: self.paths.first().cloned().unwrap_or_default(),
                name: name.to_string(),
                expected: vec![],
            });
        };
        self.files[*file].load(name, device).and_then(|t| t.to_dtype(dtype)).map_err(wrap)
    }

    /// Load the listed tensors (after `verify`) into a name -> tensor map.
    pub fn load_all(&self, specs: &[TensorSpec], dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
        self.verify(specs)?;
        specs.iter().map(|s| Ok((s.name.clone(), self.load(&s.name, dtype, device)?))).collect()
    }
}

/// Write `tensors` to `path` atomically (see `write_atomic`).
pub fn save_atomic<P: AsRef<Path>>(path: P, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let path = path.as_ref();
    let bytes = serialize(tensors).map_err(|(name, source)| CheckpointError::Tensor {
        path: path.to_path_buf(),
        name,
        source: Box::new(source),
    })?;
    write_atomic(path, &bytes).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })
}

/// Writes `bytes` to `path` atomically (see `write_atomic_with`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Writes a file atomically: `write` fills a temporary file in the same folder, which is synced
/// and renamed over `path`, and then the folder is synced. Readers see the old file or the new
/// one, never a torn one; on error the temporary file is removed.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut fs::File) -> std::io::Result<()>) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = fs::File::create(&tmp).and_then(|mut f| {
        write(&mut f)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Persist the rename itself.
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn serialize(tensors: &HashMap<String, Tensor>) -> std::result::Result<Vec<u8>, (String, candle_core::Error)> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    // Make each tensor contiguous on the CPU; candle's View impl serializes those directly.
    let cpu: Vec<(String, Tensor)> = sorted
        .into_iter()
        .map(|(n, t)| {
            t.to_device(&Device::Cpu).and_then(|t| t.contiguous()).map(|t| (n.clone(), t)).map_err(|e| (n.clone(), e))
        })
        .collect::<std::result::Result<_, _>>()?;
    safetensors::tensor::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| (String::new(), candle_core::Error::Msg(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("glm-ckpt-{tag}-{}", std::process::id()));
        fs::create_dir_all(&d).expect("tmpdir");
        d
    }

    fn sample() -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        m.insert("a.weight".to_string(), Tensor::arange(0f32, 6., &dev).unwrap().reshape((2, 3)).unwrap());
        m.insert("a.bias".to_string(), Tensor::ones(3, DType::F32, &dev).unwrap());
        m
    }

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec { name: "a.weight".into(), shape: vec![2, 3] },
            TensorSpec { name: "a.bias".into(), shape: vec![3] },
        ]
    }

    #[test]
    fn roundtrip_and_verify() {
        let d = tmpdir("rt");
        let p = d.join("m.safetensors");
        save_atomic(&p, &sample()).unwrap();
        let ck = Checkpoint::open(&[&p]).unwrap();
        let got = ck.load_all(&specs(), DType::F32, &Device::Cpu).unwrap();
        let w: Vec<f32> = got["a.weight"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(w, vec![0., 1., 2., 3., 4., 5.]);
        // No temporary file is left behind.
        let left: Vec<_> = fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn missing_and_misshapen_are_named() {
        let d = tmpdir("bad");
        let p = d.join("m.safetensors");
        save_atomic(&p, &sample()).unwrap();
        let ck = Checkpoint::open(&[&p]).unwrap();
        let mut s = specs();
        s[0].shape = vec![3, 2];
        let e = ck.verify(&s).unwrap_err().to_string();
        assert!(e.contains("a.weight") && e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        s.push(TensorSpec { name: "b.weight".into(), shape: vec![4] });
        s[0].shape = vec![2, 3];
        let e = ck.verify(&s).unwrap_err().to_string();
        assert!(e.contains("b.weight") && e.contains("missing"), "{e}");
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let d = tmpdir("trunc");
        let p = d.join("m.safetensors");
        save_atomic(&p, &sample()).unwrap();
        let bytes = fs::read(&p).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() - 3] {
            fs::write(&p, &bytes[..cut]).unwrap();
            let e = Checkpoint::open(&[&p]).err().expect("must fail").to_string();
            assert!(e.contains("m.safetensors"), "{e}");
        }
        let e = Checkpoint::open(&[d.join("nope.safetensors")]).err().unwrap().to_string();
        assert!(e.contains("nope.safetensors"), "{e}");
    }

    #[test]
    fn failed_save_keeps_the_old_file() {
        let d = tmpdir("keep");
        let p = d.join("m.safetensors");
        save_atomic(&p, &sample()).unwrap();
        let before = fs::read(&p).unwrap();
        // Saving into a folder that does not exist fails and leaves the old file alone.
        assert!(save_atomic(d.join("missing-dir/m.safetensors"), &sample()).is_err());
        assert_eq!(fs::read(&p).unwrap(), before);
    }
}
