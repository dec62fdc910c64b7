//! `glm data prepare`: raw documents -> tokenized shards. Documents are tokenized in parallel,
//! shuffled with a seed (so shards mix sources), dealt round-robin into shards and written
//! atomically, with a manifest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use glm_tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::input::{self, InputOptions, Skipped};
use crate::shard::{Shard, ShardHeader};
use crate::DataError;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<String>,
    pub out: PathBuf,
    pub input: InputOptions,
    pub shards: usize,
    pub seed: u64,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub shards: Vec<String>,
    pub documents: usize,
    pub tokens: usize,
    pub tokenizer: String,
    pub vocab_size: usize,
    pub seed: u64,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrepareReport {
    pub files: usize,
    pub documents: usize,
    pub tokens: usize,
    pub bytes: usize,
    pub seconds: f64,
    pub shards: Vec<String>,
    pub skipped: Skipped,
}

pub const MANIFEST: &str = "manifest.json";

pub fn prepare(tok: &Tokenizer, tokenizer_hash: &str, opts: &PrepareOptions) -> Result<PrepareReport, DataError> {
    if opts.shards == 0 {
        return Err(DataError::Config("--shards must be at least 1".into()));
    }
    let t0 = Instant::now();
    let files = input::expand(&opts.inputs)?;
    if files.is_empty() {
        return Err(DataError::Config("no input files".into()));
    }
    let total: u64 = files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
    let bar = if opts.progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} tokenizing [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .map_err(|e| DataError::Config(e.to_string()))?
        .progress_chars("=> "),
    );
    let mut skipped = Skipped::default();
    let mut docs: Vec<Vec<u32>> = Vec::new();
    let mut bytes = 0usize;
    for f in &files {
        let mut texts = Vec::new();
        input::read_file(f, &opts.input, &mut skipped, &mut |d| texts.push(d))?;
        bytes += texts.iter().map(String::len).sum::<usize>();
        docs.par_extend(texts.par_iter().map(|t| tok.encode_plain(t)));
        bar.inc(std::fs::metadata(f).map(|m| m.len()).unwrap_or(0));
        bar.set_message(format!("{} docs", docs.len()));
    }
    bar.finish_and_clear();
    docs.retain(|d| !d.is_empty());
    if docs.is_empty() {
        return Err(DataError::Input("no documents found in the inputs".into()));
    }
    docs.shuffle(&mut ChaCha8Rng::seed_from_u64(opts.seed));

    std::fs::create_dir_all(&opts.out)
        .map_err(|e| DataError::Io { path: opts.out.display().to_string(), source: e })?;
    let n = opts.shards.min(docs.len());
    let mut names = Vec::with_capacity(n);
    for i in 0..n {
        let part: Vec<Vec<u32>> = docs.iter().skip(i).step_by(n).cloned().collect();
        let name = format!("shard-{i:05}-of-{n:05}.bin");
        let header = ShardHeader {
            tokenizer: tokenizer_hash.to_string(),
            vocab_size: tok.vocab_size(),
            index: i,
            count: n,
            created_by: format!("glm data prepare {}", env!("CARGO_PKG_VERSION")),
        };
        Shard::write(&opts.out.join(&name), &header, &part)?;
        names.push(name);
    }
    let tokens = docs.iter().map(Vec::len).sum();
    let manifest = Manifest {
        shards: names.clone(),
        documents: docs.len(),
        tokens,
        tokenizer: tokenizer_hash.to_string(),
        vocab_size: tok.vocab_size(),
        seed: opts.seed,
        files: files.iter().map(|f| f.display().to_string()).collect(),
    };
    let path = opts.out.join(MANIFEST);
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| DataError::Format(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    let io = |e| DataError::Io { path: path.display().to_string(), source: e };
    std::fs::write(&tmp, json).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(PrepareReport {
        files: files.len(),
        documents: docs.len(),
        tokens,
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
        shards: names,
        skipped,
    })
}

/// Opens a prepared directory (its manifest) or a single shard file, checking the tokenizer.
pub fn open(path: &Path, tokenizer_hash: Option<&str>) -> Result<Vec<Arc<Shard>>, DataError> {
    let shards: Vec<Arc<Shard>> = if path.is_dir() {
        let mpath = path.join(MANIFEST);
        let text = std::fs::read_to_string(&mpath)
            .map_err(|e| DataError::Io { path: mpath.display().to_string(), source: e })?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| DataError::Format(format!("{}: {e}", mpath.display())))?;
        m.shards.iter().map(|s| Shard::open(&path.join(s)).map(Arc::new)).collect::<Result<_, _>>()?
    } else {
        vec![Arc::new(Shard::open(path)?)]
    };
    if let Some(h) = tokenizer_hash {
        for s in &shards {
            if s.header.tokenizer != h {
                return Err(DataError::Config(format!(
                    "{}: tokenized with tokenizer {}, but the tokenizer in use is {h}; run `glm data prepare` again with this tokenizer",
                    s.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    s.header.tokenizer
                )));
            }
        }
    }
    Ok(shards)
}
