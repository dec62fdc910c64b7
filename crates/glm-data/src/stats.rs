//! Measured statistics of sampled rows (`glm data stats`).

use serde::Serialize;

use crate::batch::{Batcher, Row};
use crate::objective::Mode;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub rows: usize,
    pub samples: usize,
    /// Masked tokens / text tokens of [MASK]-mode samples.
    pub mask_fraction: f64,
    pub mean_span_length: f64,
    pub spans: usize,
    /// [MASK] rows / self-supervised rows.
    pub mask_mode_share: f64,
    pub gmask_mode_share: f64,
    /// Instruction tokens / all non-padding tokens.
    pub mip_token_share: f64,
    pub mip_row_share: f64,
    /// Mean [gMASK] suffix (predicted) share of a sample.
    pub mean_gmask_suffix_share: f64,
    pub padding_share: f64,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

#[derive(Default)]
pub struct Counter {
    rows: usize,
    samples: usize,
    masked: usize,
    mask_text: usize,
    spans: usize,
    mask_rows: usize,
    gmask_rows: usize,
    mip_rows: usize,
    mip_tokens: usize,
    used: usize,
    total: usize,
    suffix: f64,
}

impl Counter {
    pub fn add(&mut self, row: &Row) {
        self.rows += 1;
        self.samples += row.samples.len();
        let used = row.used();
        self.used += used;
        self.total += row.tokens.len();
        match row.mode {
            Mode::Mask => {
                self.mask_rows += 1;
                for s in &row.samples {
                    self.masked += s.spans.iter().sum::<usize>();
                    self.spans += s.spans.len();
                    self.mask_text += s.text_len;
                }
            }
            Mode::Gmask => {
                self.gmask_rows += 1;
                for (s, seg) in row.samples.iter().zip(&row.segments) {
                    // Part B = <sop> + suffix; the suffix is len - prefix - 1 tokens of text_len.
                    self.suffix += (seg.len - seg.prefix - 1) as f64 / s.text_len.max(1) as f64;
                }
            }
            Mode::Mip => {
                self.mip_rows += 1;
                self.mip_tokens += used;
            }
        }
    }

    pub fn finish(&self, seconds: f64) -> Stats {
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let ss = (self.mask_rows + self.gmask_rows) as f64;
        Stats {
            rows: self.rows,
            samples: self.samples,
            mask_fraction: div(self.masked as f64, self.mask_text as f64),
            mean_span_length: div(self.masked as f64, self.spans as f64),
            spans: self.spans,
            mask_mode_share: div(self.mask_rows as f64, ss),
            gmask_mode_share: div(self.gmask_rows as f64, ss),
            mip_token_share: div(self.mip_tokens as f64, self.used as f64),
            mip_row_share: div(self.mip_rows as f64, self.rows as f64),
            mean_gmask_suffix_share: div(self.suffix, self.gmask_rows as f64),
            padding_share: div((self.total - self.used) as f64, self.total as f64),
            tokens: self.total,
            seconds,
            tokens_per_second: div(self.total as f64, seconds),
        }
    }
}

/// Samples `rows` rows and measures them.
pub fn measure(batcher: &mut Batcher, rows: usize) -> Stats {
    let t0 = std::time::Instant::now();
    let mut c = Counter::default();
    for _ in 0..rows {
        c.add(&batcher.next_row());
    }
    c.finish(t0.elapsed().as_secs_f64())
}
