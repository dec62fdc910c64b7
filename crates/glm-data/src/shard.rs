//! Tokenized shards: a versioned binary file of documents, read memory-mapped.
//!
//! Layout (little endian): magic `GLMTOKS\0`, u32 version, u32 bytes per token (2 or 4),
//! u64 header length, u64 documents, u64 tokens, the JSON header, zero padding to 8 bytes,
//! (documents + 1) u64 token offsets, then the tokens.

use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::DataError;

pub const MAGIC: &[u8; 8] = b"GLMTOKS\0";
pub const VERSION: u32 = 1;
const FIXED: usize = 8 + 4 + 4 + 8 + 8 + 8;

/// What a shard says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardHeader {
    /// Hash of the tokenizer file the tokens came from.
    pub tokenizer: String,
    pub vocab_size: usize,
    pub index: usize,
    pub count: usize,
    pub created_by: String,
}

/// Streams documents into a shard: tokens go to a side file as they come (memory holds only the
/// offsets), and `finish` writes header, offsets and tokens atomically
/// (`glm_checkpoint::write_atomic_with`).
pub struct ShardWriter {
    path: PathBuf,
    header: ShardHeader,
    token_bytes: usize,
    tokens_path: PathBuf,
    tokens: std::io::BufWriter<std::fs::File>,
    offsets: Vec<u64>,
}

impl ShardWriter {
    pub fn create(path: &Path, header: ShardHeader) -> Result<Self, DataError> {
        let tokens_path = path.with_extension("tokens.tmp");
        let file = std::fs::File::create(&tokens_path)
            .map_err(|e| DataError::Io { path: tokens_path.display().to_string(), source: e })?;
        let token_bytes = if header.vocab_size <= 1 << 16 { 2 } else { 4 };
        Ok(Self {
            path: path.to_path_buf(),
            header,
            token_bytes,
            tokens_path,
            tokens: std::io::BufWriter::new(file),
            offsets: vec![0],
        })
    }

    fn io(&self, e: std::io::Error) -> DataError {
        DataError::Io { path: self.path.display().to_string(), source: e }
    }

    pub fn push(&mut self, doc: &[u32]) -> Result<(), DataError> {
        if let Some(&t) = doc.iter().find(|&&t| t as usize >= self.header.vocab_size) {
            return Err(DataError::Format(format!(
                "{}: token {t} >= vocab size {}",
                self.path.display(),
                self.header.vocab_size
            )));
        }
        for &t in doc {
            let written = match self.token_bytes {
                2 => self.tokens.write_all(&(t as u16).to_le_bytes()),
                _ => self.tokens.write_all(&t.to_le_bytes()),
            };
            written.map_err(|e| self.io(e))?;
        }
        let last = self.offsets.last().copied().unwrap_or(0);
        self.offsets.push(last + doc.len() as u64);
        Ok(())
    }

    pub fn finish(mut self) -> Result<(), DataError> {
        self.tokens.flush().map_err(|e| self.io(e))?;
        let json = serde_json::to_vec(&self.header)
            .map_err(|e| DataError::Format(format!("{}: header: {e}", self.path.display())))?;
        let n_docs = self.offsets.len() - 1;
        let n_tokens = self.offsets.last().copied().unwrap_or(0);
        let mut head = Vec::with_capacity(FIXED + json.len() + 8 * (n_docs + 2));
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(self.token_bytes as u32).to_le_bytes());
        head.extend_from_slice(&(json.len() as u64).to_le_bytes());
        head.extend_from_slice(&(n_docs as u64).to_le_bytes());
        head.extend_from_slice(&n_tokens.to_le_bytes());
        head.extend_from_slice(&json);
        while head.len() % 8 != 0 {
            head.push(0);
        }
        for o in &self.offsets {
            head.extend_from_slice(&o.to_le_bytes());
        }
        let mut tokens = std::fs::File::open(&self.tokens_path).map_err(|e| self.io(e))?;
        glm_checkpoint::write_atomic_with(&self.path, |f| {
            f.write_all(&head)?;
            std::io::copy(&mut tokens, f).map(|_| ())
        })
        .map_err(|e| self.io(e))
        // Drop removes the side file.
    }
}

impl Drop for ShardWriter {
    /// An unfinished shard (an error midway) leaves no side file behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tokens_path);
    }
}

enum Store {
    Mmap(Mmap),
    Owned { offsets: Vec<u64>, tokens: Vec<u32> },
}

/// Documents of token ids, from a file or memory.
pub struct Shard {
    pub header: ShardHeader,
    pub path: Option<PathBuf>,
    store: Store,
    n_docs: usize,
    n_tokens: usize,
    token_bytes: usize,
    offsets_at: usize,
    tokens_at: usize,
}

fn regen_hint(path: &Path) -> String {
    format!("{}: regenerate it with `glm data prepare` (this build reads shard version {VERSION})", path.display())
}

impl Shard {
    /// In-memory documents (e.g. the embedded corpus tokenized at start-up).
    pub fn from_docs(header: ShardHeader, docs: &[Vec<u32>]) -> Self {
        let mut offsets = Vec::with_capacity(docs.len() + 1);
        let mut tokens = Vec::with_capacity(docs.iter().map(Vec::len).sum());
        offsets.push(0);
        for d in docs {
            tokens.extend_from_slice(d);
            offsets.push(tokens.len() as u64);
        }
        let (n_docs, n_tokens) = (docs.len(), tokens.len());
        Self {
            header,
            path: None,
            store: Store::Owned { offsets, tokens },
            n_docs,
            n_tokens,
            token_bytes: 4,
            offsets_at: 0,
            tokens_at: 0,
        }
    }

    /// Writes documents atomically (through `ShardWriter`).
    pub fn write(path: &Path, header: &ShardHeader, docs: &[Vec<u32>]) -> Result<(), DataError> {
        let mut w = ShardWriter::create(path, header.clone())?;
        for d in docs {
            w.push(d)?;
        }
        w.finish()
    }

    /// Opens a shard memory-mapped, checking magic, version, sizes and offsets.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let io = |e: std::io::Error| DataError::Io { path: path.display().to_string(), source: e };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is only read; shards are written atomically by rename, never in place.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let bad = |m: String| DataError::Format(format!("{}: {m}", path.display()));
        if map.len() < FIXED || &map[..8] != MAGIC {
            return Err(DataError::Format(format!("not a token shard (wrong magic); {}", regen_hint(path))));
        }
        let u32_at = |o: usize| u32::from_le_bytes([map[o], map[o + 1], map[o + 2], map[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&map[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(DataError::Format(format!("shard version {version} is not supported; {}", regen_hint(path))));
        }
        let token_bytes = u32_at(12) as usize;
        if token_bytes != 2 && token_bytes != 4 {
            return Err(bad(format!("{token_bytes} bytes per token")));
        }
        let (hlen, n_docs, n_tokens) = (u64_at(16) as usize, u64_at(24) as usize, u64_at(32) as usize);
        let offsets_at = (FIXED + hlen).div_ceil(8) * 8;
        let tokens_at = offsets_at + 8 * (n_docs + 1);
        let expect = tokens_at as u128 + (n_tokens as u128) * token_bytes as u128;
        if expect != map.len() as u128 {
            return Err(bad(format!(
                "{} bytes, the header says {expect} (truncated or corrupt); {}",
                map.len(),
                regen_hint(path)
            )));
        }
        let header: ShardHeader =
            serde_json::from_slice(&map[FIXED..FIXED + hlen]).map_err(|e| bad(format!("header: {e}")))?;
        let shard = Self {
            header,
            path: Some(path.to_path_buf()),
            store: Store::Mmap(map),
            n_docs,
            n_tokens,
            token_bytes,
            offsets_at,
            tokens_at,
        };
        let mut prev = 0;
        for i in 0..=n_docs {
            let o = shard.offset(i);
            if o < prev || o > n_tokens {
                return Err(bad(format!("document offset {i} = {o} is out of order")));
            }
            prev = o;
        }
        if prev != n_tokens {
            return Err(bad(format!("offsets end at {prev}, not at {n_tokens} tokens")));
        }
        Ok(shard)
    }

    fn offset(&self, i: usize) -> usize {
        match &self.store {
            Store::Owned { offsets, .. } => offsets[i] as usize,
            Store::Mmap(m) => {
                let o = self.offsets_at + 8 * i;
                let mut b = [0u8; 8];
                b.copy_from_slice(&m[o..o + 8]);
                u64::from_le_bytes(b) as usize
            }
        }
    }

    pub fn num_docs(&self) -> usize {
        self.n_docs
    }

    pub fn num_tokens(&self) -> usize {
        self.n_tokens
    }

    pub fn doc_len(&self, i: usize) -> usize {
        self.offset(i + 1) - self.offset(i)
    }

    /// Appends tokens [from, to) of document `i`.
    pub fn read(&self, i: usize, from: usize, to: usize, out: &mut Vec<u32>) {
        let base = self.offset(i);
        match &self.store {
            Store::Owned { tokens, .. } => out.extend_from_slice(&tokens[base + from..base + to]),
            Store::Mmap(m) => {
                let at = self.tokens_at + (base + from) * self.token_bytes;
                let bytes = &m[at..at + (to - from) * self.token_bytes];
                if self.token_bytes == 2 {
                    out.extend(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32));
                } else {
                    out.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                }
            }
        }
    }
}
