//! A token stream over shards: documents in a seeded per-epoch order, each followed by `eod`,
//! laid end to end. `with_max_piece` shuffles pieces of documents instead (Megatron shuffles
//! fixed-length samples), so that a long book does not fill many consecutive batches. Data-parallel rank r of w reads the documents at order positions ≡ r (mod w),
//! so ranks see disjoint data. The cursor (epoch, document, offset) restores the stream exactly.

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::shard::Shard;
use crate::DataError;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCursor {
    pub epoch: u64,
    /// Index into this rank's pieces (documents, unless split) of the epoch.
    pub doc: usize,
    /// Tokens of that piece already read (a document's eod counts as one more).
    pub offset: usize,
}

/// Tokens [start, end) of a document; `last` pieces are followed by eod.
#[derive(Debug, Clone, Copy)]
struct Piece {
    shard: u32,
    doc: u32,
    start: u32,
    end: u32,
    last: bool,
}

pub struct TokenStream {
    shards: Vec<Arc<Shard>>,
    /// Every piece, in shard order.
    all: Vec<Piece>,
    /// This rank's pieces for the current epoch.
    order: Vec<Piece>,
    seed: u64,
    rank: usize,
    world: usize,
    eod: u32,
    cursor: StreamCursor,
}

impl TokenStream {
    pub fn new(shards: Vec<Arc<Shard>>, eod: u32, seed: u64, rank: usize, world: usize) -> Result<Self, DataError> {
        if world == 0 || rank >= world {
            return Err(DataError::Config(format!("data-parallel rank {rank} of world size {world}")));
        }
        let all = Self::pieces(&shards, usize::MAX);
        if all.len() < world {
            return Err(DataError::Config(format!(
                "{} non-empty documents cannot feed {world} data-parallel ranks",
                all.len()
            )));
        }
        let mut s = Self { shards, all, order: Vec::new(), seed, rank, world, eod, cursor: StreamCursor::default() };
        s.set_epoch(0);
        Ok(s)
    }

    fn pieces(shards: &[Arc<Shard>], max: usize) -> Vec<Piece> {
        let max = max.max(1);
        let mut all = Vec::new();
        for (s, sh) in shards.iter().enumerate() {
            for d in 0..sh.num_docs() {
                let len = sh.doc_len(d);
                let mut start = 0;
                while start < len {
                    let end = start + (len - start).min(max);
                    let (shard, doc) = (s as u32, d as u32);
                    all.push(Piece { shard, doc, start: start as u32, end: end as u32, last: end == len });
                    start = end;
                }
            }
        }
        all
    }

    /// Shuffle pieces of at most `max` tokens instead of whole documents (eod still marks only
    /// document ends). Restarts the stream at epoch 0.
    pub fn with_max_piece(mut self, max: usize) -> Self {
        self.all = Self::pieces(&self.shards, max);
        self.set_epoch(0);
        self
    }

    fn set_epoch(&mut self, epoch: u64) {
        let mut perm = self.all.clone();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        self.order = perm.into_iter().skip(self.rank).step_by(self.world).collect();
        self.cursor = StreamCursor { epoch, doc: 0, offset: 0 };
    }

    pub fn cursor(&self) -> StreamCursor {
        self.cursor
    }

    pub fn restore(&mut self, c: StreamCursor) -> Result<(), DataError> {
        self.set_epoch(c.epoch);
        if c.doc >= self.order.len() {
            return Err(DataError::Config(format!(
                "cursor document {} is past this rank's {} documents",
                c.doc,
                self.order.len()
            )));
        }
        let p = self.order[c.doc];
        if c.offset > (p.end - p.start) as usize {
            return Err(DataError::Config(format!("cursor offset {} is past its piece", c.offset)));
        }
        self.cursor = c;
        Ok(())
    }

    /// The next `n` tokens (documents joined by eod, wrapping into the next epoch).
    pub fn take(&mut self, n: usize, out: &mut Vec<u32>) {
        let mut need = n;
        while need > 0 {
            let p = self.order[self.cursor.doc];
            let len = (p.end - p.start) as usize;
            if self.cursor.offset < len {
                let k = need.min(len - self.cursor.offset);
                let from = p.start as usize + self.cursor.offset;
                self.shards[p.shard as usize].read(p.doc as usize, from, from + k, out);
                self.cursor.offset += k;
                need -= k;
                continue;
            }
            if p.last {
                out.push(self.eod);
                need -= 1;
            }
            self.cursor.doc += 1;
            self.cursor.offset = 0;
            if self.cursor.doc == self.order.len() {
                self.set_epoch(self.cursor.epoch + 1);
            }
        }
    }
}
