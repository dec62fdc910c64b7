//! GLM's data pipeline, from raw text to training batches (spec sections 3 and 9).
//!
//! * `input`: text / JSONL / gzip files, directories and globs -> documents, with clear errors.
//! * `prepare`: documents -> tokenized, shuffled shards (`shard`: versioned, memory-mapped).
//! * `stream`: shards -> a token stream per data-parallel rank, with an exact cursor.
//! * `objective`: [MASK] / [gMASK] / MIP corruption as pure functions of a seeded RNG.
//! * `batch`: packed rows and batches with positions, targets and the attention layout.
//! * `corpus`: the embedded bilingual corpus and instruction set (assets/corpus).
//! * `stats`: measured mask fraction, span length, mode and MIP shares.

pub mod batch;
pub mod corpus;
pub mod input;
pub mod objective;
pub mod prepare;
pub mod shard;
pub mod stats;
pub mod stream;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use batch::{Batch, BatchCursor, Batcher, Row};
pub use objective::{Mode, ObjectiveConfig, ObjectiveIds, PositionKind, Sample, IGNORE};
pub use stream::{StreamCursor, TokenStream};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Tokenizer(#[from] glm_tokenizer::TokenizerError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The ids the objective needs, from a tokenizer.
pub fn objective_ids(tok: &glm_tokenizer::Tokenizer) -> Result<ObjectiveIds, DataError> {
    let s = tok.specials();
    let need =
        |name: &str, id: Option<u32>| id.ok_or_else(|| DataError::Config(format!("the tokenizer has no {name} token")));
    Ok(ObjectiveIds {
        mask: need("[MASK]", s.mask)?,
        gmask: need("[gMASK]", s.gmask)?,
        sop: need("<sop>", s.sop)?,
        eop: need("<eop>", s.eop)?,
        pad: tok.token_id("<pad>").unwrap_or(tok.unk_id()),
    })
}

/// A tokenizer file (tokenizer.json or SentencePiece .model), or the embedded one when `path` is
/// None, with the content hash that shard headers record.
pub fn load_tokenizer(path: Option<&std::path::Path>) -> Result<(glm_tokenizer::Tokenizer, String), DataError> {
    Ok(match path {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| DataError::Io { path: p.display().to_string(), source: e })?;
            (glm_tokenizer::Tokenizer::from_file(p)?, content_hash(&bytes))
        }
        None => {
            (glm_tokenizer::Tokenizer::default_glm()?, content_hash(glm_tokenizer::DEFAULT_TOKENIZER_JSON.as_bytes()))
        }
    })
}

/// Training shards: those `glm data prepare` wrote to `dir` (checked against the tokenizer hash), or
/// the embedded corpus's train split tokenized in memory.
pub fn train_shards(
    tok: &glm_tokenizer::Tokenizer,
    tok_hash: &str,
    dir: Option<&std::path::Path>,
) -> Result<Vec<std::sync::Arc<shard::Shard>>, DataError> {
    match dir {
        Some(d) => prepare::open(d, Some(tok_hash)),
        None => Ok(vec![corpus::shard(tok, tok_hash, corpus::Split::Train)?]),
    }
}

/// Instruction (prompt, target) records for MIP: a JSONL file, or the embedded set.
pub fn instruction_records(path: Option<&std::path::Path>) -> Result<Vec<(String, String)>, DataError> {
    match path {
        Some(p) => input::read_instructions(p),
        None => corpus::instructions(),
    }
}

/// The end-of-document id written between documents.
pub fn eod_id(tok: &glm_tokenizer::Tokenizer) -> Result<u32, DataError> {
    tok.specials().eod.ok_or_else(|| DataError::Config("the tokenizer has no <eod> token".into()))
}

/// FNV-1a 64 of some bytes, as hex: identifies a tokenizer file in shard headers.
pub fn content_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Tokenized instruction examples (prompt, target), read in a seeded order per pass.
pub struct Instructions {
    examples: Vec<(Vec<u32>, Vec<u32>)>,
    seed: u64,
    /// The pass whose order is held, and that order.
    order: (u64, Vec<u32>),
}

impl Instructions {
    pub fn new(examples: Vec<(Vec<u32>, Vec<u32>)>, seed: u64) -> Result<Self, DataError> {
        if examples.is_empty() {
            return Err(DataError::Config("the instruction set is empty".into()));
        }
        Ok(Self { examples, seed, order: (u64::MAX, Vec::new()) })
    }

    /// Tokenizes JSON-lines records {"prompt": .., "target": ..}.
    pub fn from_records(
        tok: &glm_tokenizer::Tokenizer,
        records: &[(String, String)],
        seed: u64,
    ) -> Result<Self, DataError> {
        Self::new(records.iter().map(|(p, t)| (tok.encode_plain(p), tok.encode_plain(t))).collect(), seed)
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The i-th example of the stream (pass i / n in its own shuffled order).
    pub fn get(&mut self, i: u64) -> (&[u32], &[u32]) {
        let n = self.examples.len() as u64;
        let pass = i / n;
        if self.order.0 != pass {
            let mut o: Vec<u32> = (0..n as u32).collect();
            o.shuffle(&mut ChaCha8Rng::seed_from_u64(
                self.seed ^ pass.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x004D_4950,
            ));
            self.order = (pass, o);
        }
        let (p, t) = &self.examples[self.order.1[(i % n) as usize] as usize];
        (p, t)
    }

    /// Mean share of a row filled when examples are packed greedily, over complete rows
    /// (cycling through the examples until 256 rows are full).
    pub fn packing_fill(&self, cfg: &ObjectiveConfig, ids: &ObjectiveIds) -> f64 {
        let lens: Vec<usize> = self
            .examples
            .iter()
            .map(|(p, t)| objective::mip_sample(p, t, cfg.window(), cfg.positions, ids).len())
            .collect();
        let (mut rows, mut used, mut cur) = (0usize, 0usize, 0usize);
        for &len in lens.iter().cycle() {
            if cur + len > cfg.seq_len {
                rows += 1;
                used += cur;
                cur = 0;
                if rows == 256 {
                    break;
                }
            }
            cur += len;
        }
        used as f64 / (rows * cfg.seq_len) as f64
    }
}
