//! `glm convert --check DIR`: what a downloaded checkpoint folder holds, file by file (present,
//! missing, truncated, unreadable, with sizes), without loading any weight; optionally each file's
//! SHA-256 against a list the user gives (`sha256sum` format: `<hex>  <path>`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use glm_checkpoint::raw::{open_store, sha256_range, SafetensorsFile, DATA_SHA256};

use crate::hf::named_weight_files;
use crate::sat::{rank_file, LATEST};
use crate::source::Format;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    Missing,
    /// Present but cut short or unreadable, with the reason.
    Bad(String),
    /// Whole, but its SHA-256 is not the listed one.
    Mismatch {
        want: String,
        got: String,
    },
}

#[derive(Debug, Clone)]
pub struct FileCheck {
    /// Relative to the folder.
    pub name: String,
    pub bytes: Option<u64>,
    pub tensors: Option<usize>,
    pub sha256: Option<String>,
    pub status: Status,
}

#[derive(Debug, Clone)]
pub struct CheckReport {
    pub format: String,
    pub files: Vec<FileCheck>,
    /// Problems that are not one file's (a shape that implies missing ranks, a config error).
    pub notes: Vec<String>,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.notes.is_empty() && self.files.iter().all(|f| f.status == Status::Ok)
    }
}

/// Reads a `sha256sum`-style list: `<64 hex>  <name>` per line (`*name` and `./name` accepted).
pub fn read_sha_list(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(2, char::is_whitespace);
        let (hex, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").trim());
        let name = name.trim_start_matches('*').trim_start_matches("./");
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) || name.is_empty() {
            return Err(Error::Input(format!("{}:{}: expected `<sha256 hex>  <file>`", path.display(), i + 1)));
        }
        out.insert(name.to_string(), hex.to_ascii_lowercase());
    }
    Ok(out)
}

/// One file: present, its size, readable as a tensor file (`key_path` given) with its tensor count,
/// and its SHA-256 against the listed one.
fn file_check(dir: &Path, name: &str, key_path: Option<&[&str]>, sha: Option<&String>) -> FileCheck {
    let p = dir.join(name);
    let Ok(meta) = std::fs::metadata(&p) else {
        return FileCheck { name: name.into(), bytes: None, tensors: None, sha256: None, status: Status::Missing };
    };
    let mut c =
        FileCheck { name: name.into(), bytes: Some(meta.len()), tensors: None, sha256: None, status: Status::Ok };
    if let Some(key_path) = key_path {
        match open_store(&p, key_path) {
            Ok(s) => c.tensors = Some(s.names().len()),
            Err(e) => c.status = Status::Bad(e.to_string()),
        }
    }
    if let Some(want) = sha {
        match std::fs::File::open(&p)
            .map_err(|e| e.to_string())
            .and_then(|f| sha256_range(&f, &p, 0, meta.len()).map_err(|e| e.to_string()))
        {
            Ok(got) => {
                if c.status == Status::Ok && &got != want {
                    c.status = Status::Mismatch { want: want.clone(), got: got.clone() };
                }
                c.sha256 = Some(got);
            }
            Err(e) => c.status = Status::Bad(e),
        }
    }
    c
}

/// Checks a SAT or Hugging Face folder (or one weights file).
pub fn check(path: &Path, arch: Option<&glm_model::Config>, sha: &BTreeMap<String, String>) -> Result<CheckReport> {
    let mut files = Vec::new();
    let mut notes = Vec::new();
    let format = match Format::detect(path) {
        Ok(Format::Sat) => {
            let iteration = std::fs::read_to_string(path.join(LATEST)).unwrap_or_default().trim().to_string();
            let iter_dir: PathBuf = path.join(&iteration);
            let found: Vec<usize> =
                crate::sat::rank_files(&iter_dir).map(|m| m.into_keys().collect()).unwrap_or_default();
            if found.is_empty() {
                notes.push(format!("{}: no rank files (latest says iteration `{iteration}`)", iter_dir.display()));
            }
            let mut n = found.last().map_or(0, |m| m + 1);
            // The degree rank 0's shapes imply counts missing last ranks too.
            let rank0 = glm_checkpoint::torch::TorchFile::open(&iter_dir.join(rank_file(0)), &["module"]);
            if let Ok(r0) = &rank0 {
                match crate::sat::config_for(path, r0, arch).and_then(|c| crate::sat::implied_tp(r0, &c)) {
                    Ok((tp, _)) => n = n.max(tp),
                    Err(e) => notes.push(e.to_string()),
                }
            }
            for k in 0..n {
                let name = format!("{iteration}/{}", rank_file(k));
                files.push(file_check(path, &name, Some(&["module"]), sha.get(&name)));
            }
            format!("GLM-130B SAT checkpoint, iteration {iteration}")
        }
        Ok(Format::HuggingFace) => {
            files.push(file_check(path, "config.json", None, sha.get("config.json")));
            match named_weight_files(path) {
                Ok(ws) => {
                    for w in ws {
                        files.push(file_check(path, &w, Some(&[]), sha.get(&w)));
                    }
                }
                Err(e) => notes.push(e.to_string()),
            }
            if let Err(e) = crate::hf::open(path, arch) {
                if files.iter().all(|f| f.status == Status::Ok) {
                    notes.push(e.to_string());
                }
            }
            "Hugging Face checkpoint".to_string()
        }
        Ok(format) => {
            let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut c = file_check(dir, &name, Some(&[]), sha.get(&name));
            let mut what = format!("{format:?} file");
            // Our own files carry the SHA-256 of their data: verify it.
            if c.status == Status::Ok && matches!(format, Format::Safetensors | Format::GlmQuant) {
                let st = SafetensorsFile::open(path)?;
                if let Some(want) = st.metadata().get(DATA_SHA256) {
                    let got = st.data_sha256()?;
                    if &got == want {
                        what.push_str(", data checksum verified");
                    } else {
                        c.status = Status::Mismatch { want: want.clone(), got };
                    }
                }
            }
            files.push(c);
            what
        }
        Err(e) => return Err(e),
    };
    // Files the list names that the folder lacks or that were not checked above.
    for (name, want) in sha {
        if !files.iter().any(|f| &f.name == name) {
            files.push(file_check(path, name, None, Some(want)));
        }
    }
    Ok(CheckReport { format, files, notes })
}
