//! Training rows and batches: one objective mode per row ([gMASK]: one sample of `seq_len`;
//! [MASK] and MIP: samples packed block-diagonally), padded to `seq_len`, with the attention
//! description the model takes (`glm_nn::layout::Segment` per sample).

use candle_core::{Device, Tensor};
use glm_nn::layout::{AttnLayout, Segment};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::objective::{self, Mode, ObjectiveConfig, ObjectiveIds, PositionKind, Sample, IGNORE};
use crate::stream::{StreamCursor, TokenStream};
use crate::{DataError, Instructions};

/// One padded row.
#[derive(Debug, Clone)]
pub struct Row {
    pub tokens: Vec<u32>,
    pub targets: Vec<i64>,
    pub positions: Vec<u32>,
    pub block_positions: Option<Vec<u32>>,
    pub segments: Vec<Segment>,
    pub mode: Mode,
    pub samples: Vec<SampleInfo>,
}

/// Statistics kept per sample.
#[derive(Debug, Clone)]
pub struct SampleInfo {
    pub spans: Vec<usize>,
    pub text_len: usize,
    pub len: usize,
}

impl Row {
    pub fn new(seq_len: usize, mode: Mode, two_d: bool) -> Self {
        Self {
            tokens: Vec::with_capacity(seq_len),
            targets: Vec::with_capacity(seq_len),
            positions: Vec::with_capacity(seq_len),
            block_positions: two_d.then(|| Vec::with_capacity(seq_len)),
            segments: Vec::new(),
            mode,
            samples: Vec::new(),
        }
    }

    pub fn push(&mut self, s: Sample) {
        self.segments.push(Segment { start: self.tokens.len(), len: s.len(), prefix: s.prefix });
        self.samples.push(SampleInfo { spans: s.spans, text_len: s.text_len, len: s.tokens.len() });
        self.tokens.extend(s.tokens);
        self.targets.extend(s.targets);
        self.positions.extend(s.positions);
        if let (Some(b), Some(sb)) = (&mut self.block_positions, s.block_positions) {
            b.extend(sb);
        }
    }

    pub fn pad(&mut self, seq_len: usize, pad: u32) {
        let n = seq_len - self.tokens.len();
        self.tokens.extend(std::iter::repeat_n(pad, n));
        self.targets.extend(std::iter::repeat_n(IGNORE, n));
        self.positions.extend(std::iter::repeat_n(0, n));
        if let Some(b) = &mut self.block_positions {
            b.extend(std::iter::repeat_n(0, n));
        }
    }

    /// Tokens that are not padding.
    pub fn used(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// A batch of rows, ready for `Glm::forward` and `cross_entropy`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rows: Vec<Row>,
    pub seq_len: usize,
}

impl Batch {
    /// (ids [B,T] u32, positions [B,T] or [B,2,T] u32, targets [B,T] i64, layout).
    pub fn tensors(&self, dev: &Device) -> Result<(Tensor, Tensor, Tensor, AttnLayout), DataError> {
        let (b, t) = (self.rows.len(), self.seq_len);
        let cat = |f: &dyn Fn(&Row) -> [&[u32]; 2]| -> Vec<u32> {
            self.rows.iter().flat_map(|r| f(r).into_iter().flatten().copied()).collect()
        };
        let ids = Tensor::from_vec(cat(&|r| [&r.tokens, &[]]), (b, t), dev)?;
        // 2-D: each row holds its first position dimension, then its second.
        let positions = cat(&|r| [&r.positions, r.block_positions.as_deref().unwrap_or(&[])]);
        let positions = match self.rows.first().is_some_and(|r| r.block_positions.is_some()) {
            false => Tensor::from_vec(positions, (b, t), dev)?,
            true => Tensor::from_vec(positions, (b, 2, t), dev)?,
        };
        let targets: Vec<i64> = self.rows.iter().flat_map(|r| r.targets.iter().copied()).collect();
        let targets = Tensor::from_vec(targets, (b, t), dev)?;
        let layout = AttnLayout::packed(self.rows.iter().map(|r| r.segments.clone()).collect())?;
        Ok((ids, positions, targets, layout))
    }

    /// 1.0 where a token has a loss, else 0.0, [B*T].
    pub fn loss_mask(&self) -> Vec<f32> {
        self.rows.iter().flat_map(|r| r.targets.iter().map(|&t| if t == IGNORE { 0.0 } else { 1.0 })).collect()
    }
}

/// Where a `Batcher` is: restore it to continue exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCursor {
    pub rows: u64,
    pub stream: StreamCursor,
    pub instruction: u64,
}

/// Makes rows from a token stream and instruction data. Each row's randomness comes from a
/// generator seeded by (seed, rank, row number), so the cursor alone restores the sequence.
pub struct Batcher {
    cfg: ObjectiveConfig,
    ids: ObjectiveIds,
    stream: TokenStream,
    instructions: Option<Instructions>,
    seed: u64,
    rank: u64,
    rows: u64,
    instruction: u64,
    /// Probability of a MIP row that gives `mip_token_share` of the tokens.
    mip_row_prob: f64,
    /// `cfg.mask_text_len()`, computed once.
    mask_text_len: usize,
}

impl Batcher {
    pub fn new(
        cfg: ObjectiveConfig,
        ids: ObjectiveIds,
        stream: TokenStream,
        instructions: Option<Instructions>,
        seed: u64,
        rank: usize,
    ) -> Result<Self, DataError> {
        cfg.validate().map_err(DataError::Config)?;
        let mask_text_len = cfg.mask_text_len();
        let mip_row_prob = match &instructions {
            Some(ins) if cfg.mip_token_share > 0.0 => {
                // Rows are not all full: MIP rows hold whole examples, [MASK] rows hold whole samples.
                let f_mip = ins.packing_fill(&cfg, &ids);
                let f_mask = cfg.samples_per_row as f64
                    * (mask_text_len as f64 * (1.0 + 2.0 * cfg.mask_ratio / cfg.mean_span()))
                    / cfg.seq_len as f64;
                let f_other = cfg.mask_mode_prob * f_mask.min(1.0) + (1.0 - cfg.mask_mode_prob);
                let s = cfg.mip_token_share;
                // s = q f_mip / (q f_mip + (1 - q) f_other)
                s * f_other / (f_mip * (1.0 - s) + s * f_other)
            }
            Some(_) => 0.0,
            None if cfg.mip_token_share > 0.0 => {
                return Err(DataError::Config(format!(
                    "mip_token_share = {} but no instruction data was given",
                    cfg.mip_token_share
                )))
            }
            None => 0.0,
        };
        Ok(Self {
            cfg,
            ids,
            stream,
            instructions,
            seed,
            rank: rank as u64,
            rows: 0,
            instruction: 0,
            mip_row_prob,
            mask_text_len,
        })
    }

    pub fn config(&self) -> &ObjectiveConfig {
        &self.cfg
    }

    pub fn cursor(&self) -> BatchCursor {
        BatchCursor { rows: self.rows, stream: self.stream.cursor(), instruction: self.instruction }
    }

    pub fn restore(&mut self, c: BatchCursor) -> Result<(), DataError> {
        self.stream.restore(c.stream)?;
        self.rows = c.rows;
        self.instruction = c.instruction;
        Ok(())
    }

    fn rng(&self) -> ChaCha8Rng {
        let mut z =
            self.seed ^ self.rank.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ self.rows.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // splitmix64 finalizer
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
    }

    pub fn next_row(&mut self) -> Row {
        let mut rng = self.rng();
        self.rows += 1;
        let cfg = &self.cfg;
        let two_d = cfg.positions == PositionKind::TwoD;
        let mut text = Vec::with_capacity(cfg.seq_len);
        let u: f64 = rng.random();
        let mut row = match &mut self.instructions {
            Some(ins) if u < self.mip_row_prob => {
                let mut row = Row::new(cfg.seq_len, Mode::Mip, two_d);
                loop {
                    let (p, t) = ins.get(self.instruction);
                    let s = objective::mip_sample(p, t, cfg.window(), cfg.positions, &self.ids);
                    if row.tokens.len() + s.len() > cfg.seq_len {
                        break;
                    }
                    row.push(s);
                    self.instruction += 1;
                }
                row
            }
            _ if rng.random::<f64>() < cfg.mask_mode_prob => {
                let mut row = Row::new(cfg.seq_len, Mode::Mask, two_d);
                for _ in 0..cfg.samples_per_row {
                    text.clear();
                    self.stream.take(self.mask_text_len, &mut text);
                    let s = objective::mask_sample(&text, cfg, &self.ids, &mut rng);
                    if row.tokens.len() + s.len() <= cfg.seq_len {
                        row.push(s);
                    }
                }
                row
            }
            _ => {
                let mut row = Row::new(cfg.seq_len, Mode::Gmask, two_d);
                self.stream.take(cfg.gmask_text_len(), &mut text);
                row.push(objective::gmask_sample(&text, cfg, &self.ids, &mut rng));
                row
            }
        };
        row.pad(cfg.seq_len, self.ids.pad);
        row
    }

    pub fn next_batch(&mut self, batch: usize) -> Batch {
        Batch { rows: (0..batch).map(|_| self.next_row()).collect(), seq_len: self.cfg.seq_len }
    }
}
