//! A token stream over shards: documents in a seeded per-epoch order, each followed by `eod`,
//! laid end to end. Data-parallel rank r of w reads the documents at order positions ≡ r (mod w),
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
    /// Index into this rank's documents of the epoch.
    pub doc: usize,
    /// Tokens of that document already read (its eod counts as one more).
    pub offset: usize,
}

pub struct TokenStream {
    shards: Vec<Arc<Shard>>,
    /// (shard, document) of every document, in shard order.
    all: Vec<(u32, u32)>,
    /// This rank's documents for the current epoch.
    order: Vec<(u32, u32)>,
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
        let all: Vec<(u32, u32)> = shards
            .iter()
            .enumerate()
            .flat_map(|(s, sh)| {
                (0..sh.num_docs()).filter(move |&d| sh.doc_len(d) > 0).map(move |d| (s as u32, d as u32))
            })
            .collect();
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
        let (s, d) = self.order[c.doc];
        if c.offset > self.shards[s as usize].doc_len(d as usize) {
            return Err(DataError::Config(format!("cursor offset {} is past its document", c.offset)));
        }
        self.cursor = c;
        Ok(())
    }

    /// The next `n` tokens (documents joined by eod, wrapping into the next epoch).
    pub fn take(&mut self, n: usize, out: &mut Vec<u32>) {
        let mut need = n;
        while need > 0 {
            let (s, d) = self.order[self.cursor.doc];
            let shard = &self.shards[s as usize];
            let len = shard.doc_len(d as usize);
            if self.cursor.offset < len {
                let k = need.min(len - self.cursor.offset);
                shard.read(d as usize, self.cursor.offset, self.cursor.offset + k, out);
                self.cursor.offset += k;
                need -= k;
                continue;
            }
            out.push(self.eod);
            need -= 1;
            self.cursor.doc += 1;
            self.cursor.offset = 0;
            if self.cursor.doc == self.order.len() {
                self.set_epoch(self.cursor.epoch + 1);
            }
        }
    }
}
