//! The model-facing part of evaluation, in GLM-130B's layouts (spec sections 2 and 7).
//!
//! **Multiple choice**: the context is `text [MASK]` (or `[gMASK]` with `use_task_mask`), cut from
//! the left to fit; each choice `c` is laid out after it as its own block `<sop> c[:-1]`, causal
//! inside the block, attending to the whole context but to no other block, with the positions of a
//! generated block (the [MASK]'s index, or continuing after [gMASK]). All blocks of an example, and
//! the examples of a micro-batch, run in one forward; a choice's score is the sum of its tokens'
//! log-probabilities. When every choice is one token, one `<sop>` serves them all.
//! `choice_logprobs_single` lays out one choice per row, the reference the batched path is tested
//! against.
//!
//! **Language modelling**: the text's tokens are scored `generation_length` at a time; each window
//! is `previous tokens [gMASK] <sop> window[:-1]` with as many previous tokens as fit, attended
//! bidirectionally.

use candle_core::{DType, Tensor};
use glm_infer::{block_position, Blank};
use glm_model::{Glm, PositionEncoding};
use glm_nn::AttnLayout;
use glm_tokenizer::Tokenizer;

use crate::{Error, Result};

/// One multiple-choice example ready to score: context ids, its blank, each choice's ids.
pub type ChoiceItem = (Vec<u32>, Blank, Vec<Vec<u32>>);

pub struct Scorer<'a> {
    pub model: &'a Glm,
    pub tok: &'a Tokenizer,
    sop: u32,
    mask: u32,
    gmask: u32,
    /// Longest row: the task's max_seq_length within the model's.
    pub max_len: usize,
}

/// One row to run: tokens, positions and (context, block lengths) for the layout.
struct RowPlan {
    ids: Vec<u32>,
    pos: Vec<(u32, u32)>,
    context: usize,
    blocks: Vec<usize>,
}

impl<'a> Scorer<'a> {
    pub fn new(model: &'a Glm, tok: &'a Tokenizer, max_seq_length: usize) -> Result<Self> {
        let s = tok.specials();
        let need = |t: Option<u32>, name: &str| {
            t.ok_or_else(|| Error::Input(format!("the tokenizer has no {name} token, which evaluation needs")))
        };
        Ok(Self {
            model,
            tok,
            sop: need(s.sop, "<sop>")?,
            mask: need(s.mask, "[MASK]")?,
            gmask: need(s.gmask, "[GMASK]")?,
            max_len: max_seq_length.min(model.config().max_seq_len),
        })
    }

    /// `text` then [MASK] (or [gMASK]), its front cut so that `reserve` more tokens fit.
    pub fn context(&self, text: &str, gmask: bool, reserve: usize) -> Result<(Vec<u32>, Blank)> {
        let mut ids = self.tok.encode(text);
        let room = self.max_len.checked_sub(reserve + 1).filter(|&r| r > 0).ok_or_else(|| {
            Error::Input(format!("{reserve} answer tokens leave no room for a context in {} tokens", self.max_len))
        })?;
        if ids.len() > room {
            ids.drain(..ids.len() - room); // truncate from the left, as GLM-130B does
        }
        ids.push(if gmask { self.gmask } else { self.mask });
        let blank = if gmask { Blank::Gmask } else { Blank::Mask { at: ids.len() - 1 } };
        Ok((ids, blank))
    }

    /// Tokens of each choice (an empty one is an error).
    pub fn encode_choices(&self, choices: &[String]) -> Result<Vec<Vec<u32>>> {
        choices
            .iter()
            .map(|c| {
                let ids = self.tok.encode(c);
                if ids.is_empty() {
                    Err(Error::Input(format!("choice {c:?} has no tokens")))
                } else {
                    Ok(ids)
                }
            })
            .collect()
    }

    /// Tokens a choice set adds after the context, in the batched layout.
    pub fn choice_tokens(choices: &[Vec<u32>]) -> usize {
        if choices.iter().all(|c| c.len() == 1) {
            1
        } else {
            choices.iter().map(Vec::len).sum()
        }
    }

    fn position(&self, blank: Blank, context: usize, i: usize) -> (u32, u32) {
        block_position(self.model.config().position_encoding, blank, context, i)
    }

    /// Log-likelihood of every choice of every item, in one forward (see the module notes).
    pub fn choice_logprobs(&self, items: &[ChoiceItem]) -> Result<Vec<Vec<f64>>> {
        let mut plans = Vec::with_capacity(items.len());
        // (row, row index of the block's first token, targets) per choice, per item.
        let mut reads: Vec<Vec<(usize, Vec<u32>)>> = Vec::with_capacity(items.len());
        for (context, blank, choices) in items {
            let c = context.len();
            let (mut ids, mut pos) = (context.clone(), (0..c).map(|i| self.position(*blank, c, i)).collect::<Vec<_>>());
            let mut blocks = Vec::new();
            let mut item_reads = Vec::new();
            if choices.iter().all(|ch| ch.len() == 1) {
                ids.push(self.sop);
                pos.push(self.position(*blank, c, c));
                blocks.push(1);
                item_reads.extend(choices.iter().map(|ch| (c, ch.clone())));
            } else {
                for ch in choices {
                    let start = ids.len();
                    ids.push(self.sop);
                    ids.extend_from_slice(&ch[..ch.len() - 1]);
                    pos.extend((0..ch.len()).map(|k| self.position(*blank, c, c + k)));
                    blocks.push(ch.len());
                    item_reads.push((start, ch.clone()));
                }
            }
            if ids.len() > self.max_len {
                return Err(Error::Input(format!(
                    "{} context and choice tokens exceed max_seq_length {}",
                    ids.len(),
                    self.max_len
                )));
            }
            plans.push(RowPlan { ids, pos, context: c, blocks });
            reads.push(item_reads);
        }
        let layout =
            AttnLayout::shared_context(&plans.iter().map(|p| (p.context, p.blocks.clone())).collect::<Vec<_>>())?;
        let mut wanted = Vec::new();
        for (b, item) in reads.iter().enumerate() {
            for (start, targets) in item {
                wanted.extend(targets.iter().enumerate().map(|(k, &t)| (b, start + k, t)));
            }
        }
        let mut lp = self.logprobs(&plans, &layout, &wanted)?.into_iter();
        let mut out = Vec::with_capacity(items.len());
        for item in &reads {
            out.push(item.iter().map(|(_, targets)| lp.by_ref().take(targets.len()).sum()).collect());
        }
        Ok(out)
    }

    /// The reference: every choice in its own row `context <sop> c[:-1]`, one forward each.
    pub fn choice_logprobs_single(&self, context: &[u32], blank: Blank, choices: &[Vec<u32>]) -> Result<Vec<f64>> {
        let c = context.len();
        let mut out = Vec::with_capacity(choices.len());
        for ch in choices {
            let ids: Vec<u32> =
                context.iter().copied().chain([self.sop]).chain(ch[..ch.len() - 1].iter().copied()).collect();
            let pos = (0..ids.len()).map(|i| self.position(blank, c, i)).collect();
            let plan = RowPlan { ids, pos, context: c, blocks: vec![] };
            let wanted: Vec<(usize, usize, u32)> = ch.iter().enumerate().map(|(k, &t)| (0, c + k, t)).collect();
            out.push(self.logprobs(std::slice::from_ref(&plan), &AttnLayout::prefix_lm(&[c]), &wanted)?.iter().sum());
        }
        Ok(out)
    }

    /// Summed loss (nats) and token count of `text` over windows of `window` scored tokens, up to
    /// `batch` windows per forward.
    pub fn lm_loss(&self, text: &str, window: usize, batch: usize) -> Result<(f64, usize)> {
        let ids = self.tok.encode(text);
        let window = window.min(self.max_len.saturating_sub(2)).max(1);
        let (mut plans, mut scored) = (Vec::new(), Vec::new());
        for w in (0..ids.len()).step_by(window) {
            let window = &ids[w..(w + window).min(ids.len())];
            let budget = self.max_len - window.len() - 1; // context + [gMASK] + <sop> + window[:-1]
            let prev = &ids[w - w.min(budget - 1)..w];
            let context: Vec<u32> = prev.iter().copied().chain([self.gmask]).collect();
            let c = context.len();
            let row: Vec<u32> =
                context.iter().copied().chain([self.sop]).chain(window[..window.len() - 1].iter().copied()).collect();
            let pos = (0..row.len()).map(|i| self.position(Blank::Gmask, c, i)).collect();
            plans.push(RowPlan { ids: row, pos, context: c, blocks: vec![] });
            scored.push(window);
        }
        let (mut loss, mut count) = (0f64, 0usize);
        let batch = batch.max(1);
        for (rows, scored) in plans.chunks(batch).zip(scored.chunks(batch)) {
            let layout = AttnLayout::prefix_lm(&rows.iter().map(|p| p.context).collect::<Vec<_>>());
            let wanted: Vec<(usize, usize, u32)> = rows
                .iter()
                .zip(scored)
                .enumerate()
                .flat_map(|(b, (p, s))| s.iter().enumerate().map(move |(k, &t)| (b, p.context + k, t)))
                .collect();
            let lp = self.logprobs(rows, &layout, &wanted)?;
            loss -= lp.iter().sum::<f64>();
            count += lp.len();
        }
        Ok((loss, count))
    }

    /// Run padded rows and return log p(token) at each wanted (row, position, token), computing
    /// the softmax only at those positions.
    fn logprobs(&self, plans: &[RowPlan], layout: &AttnLayout, wanted: &[(usize, usize, u32)]) -> Result<Vec<f64>> {
        let dev = self.model.device();
        let t = plans.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let b = plans.len();
        let (mut ids, mut p1, mut p2) = (vec![0u32; b * t], vec![0u32; b * t], vec![0u32; b * t]);
        for (r, p) in plans.iter().enumerate() {
            ids[r * t..r * t + p.ids.len()].copy_from_slice(&p.ids);
            for (i, &(a, c)) in p.pos.iter().enumerate() {
                (p1[r * t + i], p2[r * t + i]) = (a, c);
            }
        }
        let ids = Tensor::from_vec(ids, (b, t), dev)?;
        let positions = match self.model.config().position_encoding {
            PositionEncoding::Rope1d => Tensor::from_vec(p1, (b, t), dev)?,
            PositionEncoding::Rope2d => {
                let both: Vec<u32> =
                    (0..b).flat_map(|r| [&p1[r * t..(r + 1) * t], &p2[r * t..(r + 1) * t]].concat()).collect();
                Tensor::from_vec(both, (b, 2, t), dev)?
            }
        };
        let idx: Vec<u32> = wanted.iter().map(|&(r, i, _)| (r * t + i) as u32).collect();
        let rows = self.model.forward_at(&ids, &positions, layout, &Tensor::new(idx, dev)?)?.to_dtype(DType::F32)?;
        let v = rows.dim(1)?;
        let rows: Vec<f32> = rows.flatten_all()?.to_vec1()?;
        Ok(rows
            .chunks_exact(v.max(1))
            .zip(wanted)
            .map(|(row, &(_, _, tok))| glm_infer::logprobs::logprob(row, tok))
            .collect())
    }
}
