//! Tensor-parallel decoding driven from one rank. The driver (rank 0: the engine, the requests,
//! the sampling) sends every model call its decoders make — begin or advance a feed, a step of the
//! ragged batch, a fork, a recompute — to the follower ranks before running it; each follower
//! replays it on its own shard of the model with its own KV caches (kept by the row's id), so the
//! collectives inside the model's layers meet and every rank runs its shard of the same batch. The
//! logits a tensor-parallel model returns are gathered (the same bits on every rank), so only the
//! driver needs them.
//!
//! A call is a few hundred bytes (token ids and positions); the activations never travel.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Tensor};
use glm_model::{Glm, KvCache, Partial, PositionEncoding, Sequence};
use glm_nn::AttnLayout;

use crate::{Error, Result};

/// One model call of a decoder (`row`: its id), as the followers replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `Decoder::begin_feed`: `ids` at `positions` continue the row's cache; its context is
    /// `context` tokens (the row's bidirectional prefix).
    Begin { row: u64, ids: Vec<u32>, positions: Vec<u32>, context: u32 },
    /// `Decoder::continue_feed`: up to `layers` more layers of the feed begun.
    Advance { row: u64, layers: u32 },
    /// `Decoder::feed_batch`: one token at its positions for each row.
    Batch { rows: Vec<(u64, u32, Vec<u32>)> },
    /// `Decoder::fork`: row `to` starts as a copy of row `from`'s cache.
    Fork { from: u64, to: u64 },
    /// `Decoder::recompute`: the whole row without the cache.
    Forward { tokens: Vec<u32>, positions: Vec<u32>, context: u32 },
    /// These rows are gone: drop their caches.
    Drop { rows: Vec<u64> },
    /// Nothing to run (the driver is idle; keeps the followers' waits short).
    Idle,
    /// Every rank joins a barrier: the driver's check that its followers are alive.
    Ping,
    /// The driver is done: the followers return.
    Stop,
}

/// Where a driver sends its calls.
pub trait Mirror {
    /// Sends `call` to the followers (before the driver runs it).
    fn call(&self, call: &Call) -> Result<()>;
    /// Row `row` is gone; its caches go with the next call.
    fn dropped(&self, row: u64);
    /// Whether the followers answer (a round trip); an error once they cannot.
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

fn push_u64(out: &mut Vec<u32>, x: u64) {
    out.extend([x as u32, (x >> 32) as u32]);
}

fn push_list(out: &mut Vec<u32>, xs: &[u32]) {
    out.push(xs.len() as u32);
    out.extend_from_slice(xs);
}

impl Call {
    fn encode_into(&self, out: &mut Vec<u32>) {
        match self {
            Call::Begin { row, ids, positions, context } => {
                out.push(1);
                push_u64(out, *row);
                push_list(out, ids);
                push_list(out, positions);
                out.push(*context);
            }
            Call::Advance { row, layers } => {
                out.push(2);
                push_u64(out, *row);
                out.push(*layers);
            }
            Call::Batch { rows } => {
                out.push(3);
                out.push(rows.len() as u32);
                for (row, token, positions) in rows {
                    push_u64(out, *row);
                    out.push(*token);
                    push_list(out, positions);
                }
            }
            Call::Fork { from, to } => {
                out.push(4);
                push_u64(out, *from);
                push_u64(out, *to);
            }
            Call::Forward { tokens, positions, context } => {
                out.push(5);
                push_list(out, tokens);
                push_list(out, positions);
                out.push(*context);
            }
            Call::Drop { rows } => {
                out.push(6);
                out.push(rows.len() as u32);
                rows.iter().for_each(|&r| push_u64(out, r));
            }
            Call::Idle => out.push(7),
            Call::Stop => out.push(8),
            Call::Ping => out.push(9),
        }
    }

    /// Calls as one message (little-endian u32 words).
    pub fn encode(calls: &[Call]) -> Vec<u8> {
        let mut words = Vec::new();
        calls.iter().for_each(|c| c.encode_into(&mut words));
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The calls of a message `encode` made; an error (never a panic) for anything else.
    pub fn decode(bytes: &[u8]) -> Result<Vec<Call>> {
        if !bytes.len().is_multiple_of(4) {
            return Err(Error::Input(format!("a call message of {} bytes is not whole words", bytes.len())));
        }
        let words: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut r = Reader { words: &words, at: 0 };
        let mut calls = Vec::new();
        while r.at < words.len() {
            calls.push(match r.word()? {
                1 => Call::Begin { row: r.u64()?, ids: r.list()?, positions: r.list()?, context: r.word()? },
                2 => Call::Advance { row: r.u64()?, layers: r.word()? },
                3 => {
                    let n = r.word()? as usize;
                    let rows = (0..n).map(|_| Ok((r.u64()?, r.word()?, r.list()?))).collect::<Result<_>>()?;
                    Call::Batch { rows }
                }
                4 => Call::Fork { from: r.u64()?, to: r.u64()? },
                5 => Call::Forward { tokens: r.list()?, positions: r.list()?, context: r.word()? },
                6 => {
                    let n = r.word()? as usize;
                    Call::Drop { rows: (0..n).map(|_| r.u64()).collect::<Result<_>>()? }
                }
                7 => Call::Idle,
                8 => Call::Stop,
                9 => Call::Ping,
                t => return Err(Error::Input(format!("unknown call {t} at word {} of a call message", r.at - 1))),
            });
        }
        Ok(calls)
    }
}

struct Reader<'a> {
    words: &'a [u32],
    at: usize,
}

impl Reader<'_> {
    fn word(&mut self) -> Result<u32> {
        let w = self.words.get(self.at).copied();
        self.at += 1;
        w.ok_or_else(|| Error::Input(format!("a call message ends early ({} words)", self.words.len())))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(self.word()? as u64 | (self.word()? as u64) << 32)
    }

    fn list(&mut self) -> Result<Vec<u32>> {
        let n = self.word()? as usize;
        if n > self.words.len().saturating_sub(self.at) {
            return Err(Error::Input(format!("a call message lists {n} words past its end")));
        }
        let out = self.words[self.at..self.at + n].to_vec();
        self.at += n;
        Ok(out)
    }
}

/// A [`Mirror`] over a communicator: each call is broadcast from rank 0 of `comm` (the driver),
/// with the drops since the last. Once a call fails the group is gone: every later call fails
/// at once with the first error.
pub struct CommMirror<'c> {
    comm: &'c dyn glm_dist::Communicator,
    dropped: RefCell<Vec<u64>>,
    broken: RefCell<Option<String>>,
}

impl<'c> CommMirror<'c> {
    pub fn new(comm: &'c dyn glm_dist::Communicator) -> Self {
        Self { comm, dropped: RefCell::new(Vec::new()), broken: RefCell::new(None) }
    }

    fn fail(&self, e: glm_dist::Error) -> Error {
        let msg = e.to_string();
        self.broken.borrow_mut().get_or_insert(msg.clone());
        Error::Ranks(msg)
    }
}

impl Mirror for CommMirror<'_> {
    fn call(&self, call: &Call) -> Result<()> {
        if let Some(msg) = self.broken.borrow().as_ref() {
            return Err(Error::Ranks(msg.clone()));
        }
        let rows = std::mem::take(&mut *self.dropped.borrow_mut());
        let calls = if rows.is_empty() { vec![call.clone()] } else { vec![Call::Drop { rows }, call.clone()] };
        let mut bytes = Call::encode(&calls);
        self.comm.broadcast_bytes(&mut bytes, 0).map_err(|e| self.fail(e))
    }

    fn dropped(&self, row: u64) {
        self.dropped.borrow_mut().push(row);
    }

    fn check(&self) -> Result<()> {
        self.call(&Call::Ping)?;
        self.comm.barrier().map_err(|e| self.fail(e))
    }
}

/// A follower row: its cache, layout and any feed begun.
struct Row {
    cache: KvCache,
    layout: AttnLayout,
    partial: Option<Partial>,
}

/// A follower's side: replays calls on its model (its shard) with its own caches, as the
/// driver's decoders run them (including what they drop on an error).
pub struct Follower<'m> {
    model: &'m Glm,
    rows: HashMap<u64, Row>,
}

impl<'m> Follower<'m> {
    pub fn new(model: &'m Glm) -> Self {
        Self { model, rows: HashMap::new() }
    }

    /// Rows whose caches it holds.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Replays one call; the logits it computed (the driver's, for checks), if any. A model error
    /// is the driver's too (same inputs): it is returned, and the follower goes on.
    pub fn apply(&mut self, call: Call) -> Result<Option<Vec<Vec<f32>>>> {
        let model = self.model;
        match call {
            Call::Begin { row, ids, positions, context } => {
                let r = self.rows.entry(row).or_insert_with(|| Row {
                    cache: KvCache::new(model.config()),
                    layout: AttnLayout::prefix_lm(&[context as usize]),
                    partial: None,
                });
                let mut seq = Sequence { ids: &ids, positions: &positions, layout: &r.layout, cache: &mut r.cache };
                r.partial = Some(model.begin(&mut seq)?);
                Ok(None)
            }
            Call::Advance { row, layers } => {
                let r = self.rows.get_mut(&row).ok_or_else(|| unknown(row))?;
                let mut p = r.partial.take().ok_or_else(|| Error::Input(format!("row {row}: no feed under way")))?;
                match model.advance(&mut p, &mut r.cache, layers as usize) {
                    Ok(None) => {
                        r.partial = Some(p);
                        Ok(None)
                    }
                    Ok(Some(l)) => Ok(Some(vec![l.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?])),
                    Err(e) => {
                        r.cache.clear();
                        Err(e.into())
                    }
                }
            }
            Call::Batch { rows } => {
                // The rows leave the map for the step and go back after it.
                let mut taken: Vec<(u64, [u32; 1], Vec<u32>, Row)> = Vec::with_capacity(rows.len());
                for (id, token, positions) in rows {
                    match self.rows.remove(&id) {
                        Some(r) => taken.push((id, [token], positions, r)),
                        None => {
                            taken.into_iter().for_each(|t| {
                                self.rows.insert(t.0, t.3);
                            });
                            return Err(unknown(id));
                        }
                    }
                }
                let mut seqs: Vec<Sequence> = taken
                    .iter_mut()
                    .map(|(_, t, positions, r)| Sequence { ids: t, positions, layout: &r.layout, cache: &mut r.cache })
                    .collect();
                let out = model.forward_sequences(&mut seqs);
                drop(seqs);
                let failed = out.is_err();
                for (id, _, _, mut r) in taken {
                    if failed {
                        r.cache.clear();
                    }
                    self.rows.insert(id, r);
                }
                Ok(Some(out?.to_dtype(DType::F32)?.to_vec2()?))
            }
            Call::Fork { from, to } => {
                let r = self.rows.get(&from).ok_or_else(|| unknown(from))?;
                let copy = Row { cache: r.cache.fork()?, layout: r.layout.clone(), partial: None };
                self.rows.insert(to, copy);
                Ok(None)
            }
            Call::Forward { tokens, positions, context } => {
                let (dev, n) = (model.device(), tokens.len());
                let ids = Tensor::new(tokens.as_slice(), dev)?.unsqueeze(0)?;
                let pos = Tensor::new(positions, dev)?;
                let pos = match model.config().position_encoding {
                    PositionEncoding::Rope1d => pos.unsqueeze(0)?,
                    PositionEncoding::Rope2d => pos.reshape((1, 2, n))?,
                };
                let layout = AttnLayout::prefix_lm(&[context as usize]);
                let logits = model.forward(&ids, &pos, &layout, None)?;
                Ok(Some(vec![logits.get(0)?.get(n.saturating_sub(1))?.to_dtype(DType::F32)?.to_vec1()?]))
            }
            Call::Drop { rows } => {
                rows.iter().for_each(|r| {
                    self.rows.remove(r);
                });
                Ok(None)
            }
            Call::Idle | Call::Stop | Call::Ping => Ok(None),
        }
    }

    /// Follows the driver (rank 0 of `comm`) until it sends `Stop`: every broadcast message's calls
    /// replayed in order. Returns the error that ended it if the group fails (a dead driver, a
    /// timeout); a model error is the driver's too and does not end it.
    pub fn run(&mut self, comm: &dyn glm_dist::Communicator) -> Result<()> {
        loop {
            let mut bytes = Vec::new();
            comm.broadcast_bytes(&mut bytes, 0)
                .map_err(|e| Error::Ranks(format!("rank {}: following rank 0: {e}", comm.rank())))?;
            for call in Call::decode(&bytes)? {
                match call {
                    Call::Stop => return Ok(()),
                    Call::Ping => comm
                        .barrier()
                        .map_err(|e| Error::Ranks(format!("rank {}: answering rank 0: {e}", comm.rank())))?,
                    call => {
                        let _ = self.apply(call);
                    }
                }
            }
        }
    }
}

fn unknown(row: u64) -> Error {
    Error::Input(format!("the follower holds no row {row}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip_and_bad_messages_are_errors() -> Result<()> {
        let calls = vec![
            Call::Begin { row: 1 << 40, ids: vec![5, 6, 7], positions: vec![0, 1, 2, 0, 0, 1], context: 2 },
            Call::Advance { row: 3, layers: 2 },
            Call::Batch { rows: vec![(1, 9, vec![4]), (2, 11, vec![5, 1])] },
            Call::Fork { from: 1, to: 2 },
            Call::Forward { tokens: vec![1, 2], positions: vec![0, 1], context: 1 },
            Call::Drop { rows: vec![7, 8] },
            Call::Idle,
            Call::Ping,
            Call::Stop,
        ];
        let bytes = Call::encode(&calls);
        assert_eq!(Call::decode(&bytes)?, calls);
        for cut in [1, 4, 8, 12, 20] {
            assert!(Call::decode(&bytes[..cut]).is_err(), "a message cut at {cut} bytes");
        }
        assert!(Call::decode(&99u32.to_le_bytes()).is_err());
        assert!(Call::decode(&[3, 0, 0, 0, 255, 255, 255, 255]).is_err());
        Ok(())
    }
}
