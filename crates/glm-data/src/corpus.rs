//! The embedded default data (assets/corpus, made by scripts/make_corpus.py from registry
//! packages; sources and licences in assets/corpus/README.md): a bilingual train split, a fixed
//! held-out split that is never trained on, and a small instruction set for MIP.

use std::io::Read;
use std::sync::Arc;

use glm_tokenizer::Tokenizer;
use rayon::prelude::*;

use crate::shard::{Shard, ShardHeader};
use crate::DataError;

pub const TRAIN_GZ: &[u8] = include_bytes!("../../../assets/corpus/train.jsonl.gz");
pub const HELDOUT_GZ: &[u8] = include_bytes!("../../../assets/corpus/heldout.jsonl.gz");
pub const INSTRUCTIONS_GZ: &[u8] = include_bytes!("../../../assets/corpus/instructions.jsonl.gz");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Heldout,
}

#[derive(Debug, Clone)]
pub struct Document {
    pub text: String,
    pub lang: String,
    pub source: String,
}

fn gunzip(bytes: &[u8], what: &str) -> Result<String, DataError> {
    let mut s = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut s)
        .map_err(|e| DataError::Format(format!("embedded {what}: {e}")))?;
    Ok(s)
}

fn records(bytes: &[u8], what: &str) -> Result<Vec<serde_json::Value>, DataError> {
    let text = gunzip(bytes, what)?;
    crate::input::json_lines(text.as_bytes())
        .map(|(line_no, r)| r.map_err(|e| DataError::Format(format!("embedded {what}:{line_no}: {e}"))))
        .collect()
}

fn field(v: &serde_json::Value, k: &str) -> String {
    v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string()
}

pub fn documents(split: Split) -> Result<Vec<Document>, DataError> {
    let (bytes, what) = match split {
        Split::Train => (TRAIN_GZ, "train.jsonl.gz"),
        Split::Heldout => (HELDOUT_GZ, "heldout.jsonl.gz"),
    };
    Ok(records(bytes, what)?
        .iter()
        .map(|v| Document { text: field(v, "text"), lang: field(v, "lang"), source: field(v, "source") })
        .collect())
}

/// (prompt, target) pairs of the bundled instruction set.
pub fn instructions() -> Result<Vec<(String, String)>, DataError> {
    Ok(records(INSTRUCTIONS_GZ, "instructions.jsonl.gz")?
        .iter()
        .map(|v| (field(v, "prompt"), field(v, "target")))
        .collect())
}

/// Tokenizes documents in parallel into an in-memory shard.
pub fn tokenize_docs(tok: &Tokenizer, docs: &[String], tokenizer_hash: &str) -> Shard {
    let ids: Vec<Vec<u32>> = docs.par_iter().map(|d| tok.encode_plain(d)).collect();
    let header = ShardHeader {
        tokenizer: tokenizer_hash.to_string(),
        vocab_size: tok.vocab_size(),
        index: 0,
        count: 1,
        created_by: "in memory".into(),
    };
    Shard::from_docs(header, &ids)
}

/// The embedded split, tokenized.
pub fn shard(tok: &Tokenizer, tokenizer_hash: &str, split: Split) -> Result<Arc<Shard>, DataError> {
    let docs: Vec<String> = documents(split)?.into_iter().map(|d| d.text).collect();
    Ok(Arc::new(tokenize_docs(tok, &docs, tokenizer_hash)))
}
