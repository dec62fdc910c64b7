//! Validation on the held-out split, which training never reads:
//!
//! - `val_loss`: the pretraining objective (the same [MASK]/[gMASK] mix, fixed seed) on held-out rows;
//! - `val_bpb`: bits per UTF-8 byte of held-out documents, Pile-style (spec section 7): each document's
//!   first half is bidirectional [gMASK] context and its second half is scored,
//!   BPB = Σ loss / bytes / ln 2;
//! - the same two numbers for a unigram model of the training tokens (add-one smoothed), the
//!   baseline a trained model must beat.

use std::sync::Arc;

use candle_core::DType;
use glm_data::shard::Shard;
use glm_data::{objective, Batch, Batcher, Mode, ObjectiveConfig, ObjectiveIds, PositionKind, Row, TokenStream};
use glm_model::Glm;
use glm_tokenizer::Tokenizer;
use serde::Serialize;

use crate::Result;

pub struct Validation {
    objective: Vec<Batch>,
    bpb: Vec<Batch>,
    bpb_bytes: u64,
    unigram: Vec<f64>, // -ln p(token)
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ValResult {
    pub val_loss: f64,
    pub val_bpb: f64,
    pub unigram_loss: f64,
    pub unigram_bpb: f64,
}

impl Validation {
    /// `rows` objective rows and up to `rows` documents, in micro-batches of `micro`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tok: &Tokenizer,
        heldout: Arc<Shard>,
        train: &[Arc<Shard>],
        cfg: &ObjectiveConfig,
        ids: &ObjectiveIds,
        eod: u32,
        rows: usize,
        micro: usize,
        seed: u64,
    ) -> Result<Self> {
        let micro = micro.max(1);
        let cfg = ObjectiveConfig { mip_token_share: 0.0, ..cfg.clone() };
        let stream = TokenStream::new(vec![heldout.clone()], eod, seed, 0, 1)?;
        let mut b = Batcher::new(cfg.clone(), *ids, stream, None, seed, 0)?;
        let objective: Vec<Batch> = (0..rows.div_ceil(micro)).map(|_| b.next_batch(micro)).collect();

        // BPB documents: the first seq_len - 3 tokens of each, halves as context and target.
        let (two_d, n) = (cfg.positions == PositionKind::TwoD, cfg.seq_len.saturating_sub(3));
        let mut bpb_rows = Vec::new();
        let mut bpb_bytes = 0u64;
        let mut doc = Vec::new();
        for i in 0..heldout.num_docs() {
            if bpb_rows.len() >= rows {
                break;
            }
            doc.clear();
            heldout.read(i, 0, heldout.doc_len(i).min(n), &mut doc);
            if doc.len() < 16 {
                continue;
            }
            let (context, target) = doc.split_at(doc.len() / 2);
            bpb_bytes += tok.decode(target)?.len() as u64;
            let mut row = Row::new(cfg.seq_len, Mode::Gmask, two_d);
            row.push(objective::prefix_lm_sample(context, target, Mode::Gmask, cfg.positions, ids));
            row.pad(cfg.seq_len, ids.pad);
            bpb_rows.push(row);
        }
        let bpb = bpb_rows.chunks(micro).map(|c| Batch { rows: c.to_vec(), seq_len: cfg.seq_len }).collect();
        Ok(Self { objective, bpb, bpb_bytes, unigram: unigram_nll(train, tok.vocab_size()) })
    }

    pub fn run(&self, model: &Glm) -> Result<ValResult> {
        self.run_with(&mut |b: &Batch| {
            let (ids, pos, targets, layout) = b.tensors(model.device())?;
            let logits = model.forward(&ids, &pos, &layout, None)?.to_dtype(DType::F32)?;
            Ok(model.cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64 * crate::step::scored(b) as f64)
        })
    }

    /// `run` with `loss(batch)` giving the model's summed loss over a batch's scored tokens (a
    /// pipeline computes it over its stages).
    pub fn run_with(&self, loss: &mut dyn FnMut(&Batch) -> Result<f64>) -> Result<ValResult> {
        let (loss_sum, n, uni) = self.score(loss, &self.objective)?;
        let (bpb_loss, _, bpb_uni) = self.score(loss, &self.bpb)?;
        let loss = loss_sum;
        let per_byte = |nats: f64| nats / self.bpb_bytes.max(1) as f64 / std::f64::consts::LN_2;
        let n = n.max(1) as f64;
        Ok(ValResult {
            val_loss: loss / n,
            val_bpb: per_byte(bpb_loss),
            unigram_loss: uni / n,
            unigram_bpb: per_byte(bpb_uni),
        })
    }

    /// (Σ model loss, scored tokens, Σ unigram loss) over batches.
    fn score(&self, loss: &mut dyn FnMut(&Batch) -> Result<f64>, batches: &[Batch]) -> Result<(f64, usize, f64)> {
        let (mut sum, mut count, mut uni) = (0f64, 0usize, 0f64);
        for b in batches {
            sum += loss(b)?;
            count += crate::step::scored(b);
            for r in &b.rows {
                uni += r.targets.iter().filter(|&&t| t >= 0).map(|&t| self.unigram[t as usize]).sum::<f64>();
            }
        }
        Ok((sum, count, uni))
    }
}

/// -ln p(token) under add-one-smoothed token frequencies of the training shards.
fn unigram_nll(train: &[Arc<Shard>], vocab: usize) -> Vec<f64> {
    let mut counts = vec![1u64; vocab];
    let mut buf = Vec::new();
    for s in train {
        for i in 0..s.num_docs() {
            buf.clear();
            s.read(i, 0, s.doc_len(i), &mut buf);
            for &t in &buf {
                if let Some(c) = counts.get_mut(t as usize) {
                    *c += 1;
                }
            }
        }
    }
    let total = counts.iter().sum::<u64>() as f64;
    counts.iter().map(|&c| -(c as f64 / total).ln()).collect()
}
