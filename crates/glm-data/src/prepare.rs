//! `glm data prepare`: raw documents -> tokenized shards. Each input file is tokenized in parallel
//! and its documents are dealt to shards by a seeded hash (so every shard mixes every source),
//! streamed to disk and written atomically, with a manifest. Memory holds one input file at a time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use glm_tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::input::{self, InputOptions, Skipped};
use crate::shard::{Shard, ShardHeader, ShardWriter};
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
    // Documents are dealt to shards by a seeded hash of their index, so shards mix all inputs;
    // each file is tokenized in parallel and streamed out, so memory holds one file at a time.
    // (The loader reads documents in a fresh seeded order every epoch.)
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| DataError::Io { path: opts.out.display().to_string(), source: e })?;
    let n = opts.shards;
    let names: Vec<String> = (0..n).map(|i| format!("shard-{i:05}-of-{n:05}.bin")).collect();
    let mut writers = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let header = ShardHeader {
                tokenizer: tokenizer_hash.to_string(),
                vocab_size: tok.vocab_size(),
                index: i,
                count: n,
                created_by: format!("glm data prepare {}", env!("CARGO_PKG_VERSION")),
            };
            ShardWriter::create(&opts.out.join(name), header)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut skipped = Skipped::default();
    let (mut documents, mut tokens, mut bytes) = (0usize, 0usize, 0usize);
    for f in &files {
        let mut texts = Vec::new();
        input::read_file(f, &opts.input, &mut skipped, &mut |d| texts.push(d))?;
        bytes += texts.iter().map(String::len).sum::<usize>();
        let docs: Vec<Vec<u32>> = texts.par_iter().map(|t| tok.encode_plain(t)).collect();
        for d in docs.iter().filter(|d| !d.is_empty()) {
            writers[shard_of(opts.seed, documents, n)].push(d)?;
            documents += 1;
            tokens += d.len();
        }
        bar.inc(std::fs::metadata(f).map(|m| m.len()).unwrap_or(0));
        bar.set_message(format!("{documents} docs, {tokens} tokens"));
    }
    bar.finish_and_clear();
    if documents == 0 {
        return Err(DataError::Input("no documents found in the inputs".into()));
    }
    for w in writers {
        w.finish()?;
    }
    let manifest = Manifest {
        shards: names.clone(),
        documents,
        tokens,
        tokenizer: tokenizer_hash.to_string(),
        vocab_size: tok.vocab_size(),
        seed: opts.seed,
        files: files.iter().map(|f| f.display().to_string()).collect(),
    };
    let path = opts.out.join(MANIFEST);
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| DataError::Format(e.to_string()))?;
    glm_checkpoint::write_atomic(&path, json.as_bytes())
        .map_err(|e| DataError::Io { path: path.display().to_string(), source: e })?;
    Ok(PrepareReport {
        files: files.len(),
        documents,
        tokens,
        bytes,
        seconds: t0.elapsed().as_secs_f64(),
        shards: names,
        skipped,
    })
}

/// The shard of the `i`-th document: a splitmix64 hash of (seed, i).
fn shard_of(seed: u64, i: usize, n: usize) -> usize {
    let mut z = seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % n as u64) as usize
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
