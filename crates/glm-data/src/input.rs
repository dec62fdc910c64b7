//! Reading raw documents: text files (one document per file, or per blank-line paragraph / per
//! line), JSON lines (a configurable field), gzip'd variants of both, directories (recursive)
//! and glob patterns. Bad input is an error naming the file and line or byte offset, or, with
//! `skip_bad`, is skipped and counted.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DataError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TextSplit {
    /// The whole file is one document.
    #[default]
    File,
    /// Documents are separated by blank lines.
    Paragraph,
    /// Each non-empty line is a document.
    Line,
}

#[derive(Debug, Clone)]
pub struct InputOptions {
    /// JSON field holding the text of a JSONL record.
    pub field: String,
    pub split: TextSplit,
    pub skip_bad: bool,
}

impl Default for InputOptions {
    fn default() -> Self {
        Self { field: "text".into(), split: TextSplit::File, skip_bad: false }
    }
}

/// What was skipped (with `skip_bad`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Skipped {
    pub files: usize,
    pub lines: usize,
    pub messages: Vec<String>,
}

impl Skipped {
    fn note(&mut self, msg: String, file: bool) {
        if file {
            self.files += 1;
        } else {
            self.lines += 1;
        }
        if self.messages.len() < 20 {
            self.messages.push(msg);
        }
    }
}

/// Expands files, directories (recursively, sorted) and glob patterns into a sorted file list.
pub fn expand(inputs: &[String]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for inp in inputs {
        let p = Path::new(inp);
        if p.is_dir() {
            walk(p, &mut files)?;
        } else if p.exists() {
            files.push(p.to_path_buf());
        } else if inp.contains(['*', '?', '[']) {
            let paths = glob::glob(inp).map_err(|e| DataError::Config(format!("bad glob pattern {inp:?}: {e}")))?;
            let before = files.len();
            for entry in paths {
                let path = entry.map_err(|e| DataError::Config(format!("{inp}: {e}")))?;
                if path.is_dir() {
                    walk(&path, &mut files)?;
                } else {
                    files.push(path);
                }
            }
            if files.len() == before {
                return Err(DataError::Config(format!("the pattern {inp:?} matches no files")));
            }
        } else {
            return Err(DataError::Io {
                path: inp.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            });
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let io = |e| DataError::Io { path: dir.display().to_string(), source: e };
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(io)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>().map_err(io)?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.')) {
            out.push(p);
        }
    }
    Ok(())
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |e| DataError::Io { path: path.display().to_string(), source: e };
    let raw = std::fs::read(path).map_err(io)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn is_jsonl(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name.strip_suffix(".gz").unwrap_or(name);
    name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".ndjson")
}

/// The records of JSON-lines bytes with their 1-based line numbers, blank lines skipped; a bad
/// line gives the reason (not UTF-8, malformed JSON) for the caller to report with its file.
pub fn json_lines(bytes: &[u8]) -> impl Iterator<Item = (usize, Result<serde_json::Value, String>)> + '_ {
    bytes.split(|&b| b == b'\n').enumerate().filter(|(_, l)| !l.iter().all(|b| b.is_ascii_whitespace())).map(
        |(i, line)| {
            let record = std::str::from_utf8(line)
                .map_err(|e| format!("not UTF-8 (byte {} of the line)", e.valid_up_to()))
                .and_then(|l| serde_json::from_str(l).map_err(|e| format!("malformed JSON: {e}")));
            (i + 1, record)
        },
    )
}

/// Instruction records {"prompt": .., "target": ..} from a JSON-lines file (optionally .gz).
pub fn read_instructions(path: &Path) -> Result<Vec<(String, String)>, DataError> {
    let name = path.display();
    let mut out = Vec::new();
    for (line_no, record) in json_lines(&read_bytes(path)?) {
        let v = record.map_err(|e| DataError::Input(format!("{name}:{line_no}: {e}")))?;
        let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        match (get("prompt"), get("target")) {
            (Some(p), Some(t)) => out.push((p, t)),
            _ => {
                return Err(DataError::Input(format!(
                    "{name}:{line_no}: needs string fields \"prompt\" and \"target\""
                )))
            }
        }
    }
    Ok(out)
}

/// Reads the documents of one file and passes each to `f`.
pub fn read_file(
    path: &Path,
    opts: &InputOptions,
    skipped: &mut Skipped,
    f: &mut dyn FnMut(String),
) -> Result<(), DataError> {
    let bytes = read_bytes(path)?;
    let name = path.display().to_string();
    let fail = |skipped: &mut Skipped, msg: String, file: bool| -> Result<(), DataError> {
        if opts.skip_bad {
            skipped.note(msg, file);
            Ok(())
        } else {
            Err(DataError::Input(msg))
        }
    };
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return fail(skipped, format!("{name}: the file is empty"), true);
    }
    if is_jsonl(path) {
        for (line_no, record) in json_lines(&bytes) {
            let v = match record {
                Ok(v) => v,
                Err(e) => {
                    fail(skipped, format!("{name}:{line_no}: {e}"), false)?;
                    continue;
                }
            };
            match v.get(&opts.field).and_then(|t| t.as_str()) {
                Some(t) if !t.trim().is_empty() => f(t.to_string()),
                Some(_) => continue,
                None => fail(skipped, format!("{name}:{line_no}: no string field {:?}", opts.field), false)?,
            }
        }
        return Ok(());
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            return fail(skipped, format!("{name}: not UTF-8 at byte offset {at} (line {line})"), true);
        }
    };
    let text = text.replace("\r\n", "\n");
    match opts.split {
        TextSplit::File => f(text),
        TextSplit::Paragraph => text
            .split("\n\n")
            .map(|p| p.trim_matches('\n'))
            .filter(|p| !p.trim().is_empty())
            .for_each(|p| f(p.to_string())),
        TextSplit::Line => text.lines().filter(|l| !l.trim().is_empty()).for_each(|l| f(l.to_string())),
    }
    Ok(())
}

/// Reads every document of the given files.
pub fn read_all(files: &[PathBuf], opts: &InputOptions, skipped: &mut Skipped) -> Result<Vec<String>, DataError> {
    let mut docs = Vec::new();
    for p in files {
        read_file(p, opts, skipped, &mut |d| docs.push(d))?;
    }
    Ok(docs)
}
