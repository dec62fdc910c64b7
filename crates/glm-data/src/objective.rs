//! GLM's pretraining objective as pure functions of (tokens, config, seeded RNG) (spec section 3).
//!
//! * [MASK]: spans with zero-truncated Poisson(λ) lengths (GLM's `block_length_distribution`,
//!   lengths 1..40) are drawn until they cover `mask_ratio` of the text, then placed uniformly
//!   without touching. Part A = text with one [MASK] per span; Part B = the spans in random order,
//!   each `<sop> span` with targets `span <eop>`. GLM-130B 1-D positions: Part A 0..|A|, every Part B
//!   token takes its [MASK]'s position. (2-D, ChatGLM/GLM: second dim 0 in A, 1..=l+1 in a span.)
//! * [gMASK]: the prefix stays as context; a suffix of length ~ U[min_ratio·n, n) is predicted:
//!   `prefix [gMASK] <sop> suffix` with targets `suffix <eop>`; positions continue (1-D), or are
//!   held at the [gMASK] index with a second dim 1, 2, .. (ChatGLM 2-D).
//! * MIP: `prompt [gMASK] <sop> target <eop>`, laid out like [gMASK].
//!
//! Loss is only on Part B; Part A is attended bidirectionally, Part B causally (`prefix` = |A|).

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Target value of tokens without loss (as glm_nn::loss::IGNORE_INDEX).
pub const IGNORE: i64 = -100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PositionKind {
    /// GLM-130B: one position per token.
    #[serde(rename = "1d")]
    OneD,
    /// GLM / ChatGLM-6B: (position, position within the generated block).
    #[serde(rename = "2d")]
    TwoD,
}

/// Ratios of the objective; defaults from GLM-130B (spec section 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    /// Tokens per training row (2048 in GLM-130B).
    pub seq_len: usize,
    /// Share of self-supervised rows in [MASK] mode (the rest is [gMASK]).
    pub mask_mode_prob: f64,
    /// Share of a [MASK] sample's text that is masked.
    pub mask_ratio: f64,
    /// λ of the Poisson span-length distribution.
    pub span_lambda: f64,
    /// Longest span (GLM draws lengths 1..40).
    pub max_span: usize,
    /// [MASK] and MIP samples packed per row (4 × 512 in a 2048 row).
    pub samples_per_row: usize,
    /// Shortest [gMASK] suffix, as a share of the sample.
    pub min_gmask_ratio: f64,
    /// Share of all (non-padding) tokens that come from instruction data.
    pub mip_token_share: f64,
    pub positions: PositionKind,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            seq_len: 2048,
            mask_mode_prob: 0.3,
            mask_ratio: 0.15,
            span_lambda: 3.0,
            max_span: 40,
            samples_per_row: 4,
            min_gmask_ratio: 0.2,
            mip_token_share: 0.05,
            positions: PositionKind::OneD,
        }
    }
}

impl ObjectiveConfig {
    pub fn validate(&self) -> Result<(), String> {
        let unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} = {v} must be in [0, 1]"))
            }
        };
        unit("mask_mode_prob", self.mask_mode_prob)?;
        unit("min_gmask_ratio", self.min_gmask_ratio)?;
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 0.5) {
            return Err(format!("mask_ratio = {} must be in (0, 0.5)", self.mask_ratio));
        }
        if !(0.0..0.9).contains(&self.mip_token_share) {
            return Err(format!("mip_token_share = {} must be in [0, 0.9)", self.mip_token_share));
        }
        if self.span_lambda.is_nan() || self.span_lambda <= 0.0 || self.max_span < 1 {
            return Err("span_lambda must be > 0 and max_span >= 1".into());
        }
        if self.samples_per_row == 0 || self.seq_len / self.samples_per_row < 16 {
            return Err(format!(
                "seq_len {} / samples_per_row {} leaves windows under 16 tokens",
                self.seq_len, self.samples_per_row
            ));
        }
        Ok(())
    }

    /// Tokens per packed [MASK] / MIP sample.
    pub fn window(&self) -> usize {
        self.seq_len / self.samples_per_row
    }

    /// Mean of the zero-truncated, capped Poisson span length.
    pub fn mean_span(&self) -> f64 {
        let p = span_pmf(self.span_lambda, self.max_span);
        p.iter().enumerate().map(|(i, w)| (i + 1) as f64 * w).sum()
    }

    /// Variance of the span length.
    pub fn span_var(&self) -> f64 {
        let p = span_pmf(self.span_lambda, self.max_span);
        let m = self.mean_span();
        p.iter().enumerate().map(|(i, w)| ((i + 1) as f64 - m).powi(2) * w).sum()
    }

    /// Text tokens taken for one [MASK] sample: the most for which text + a [MASK] and a <sop> per
    /// span still fits the window when the span count runs 3 standard deviations above its mean,
    /// so that the window almost never cuts the masked share below `mask_ratio`.
    pub fn mask_text_len(&self) -> usize {
        let (w, r, mu, var) = (self.window() as f64, self.mask_ratio, self.mean_span(), self.span_var());
        // Spans drawn until they cover r*n: about r*n/mu + 1/2 of them, variance r*n*var/mu^3.
        let fits = |n: f64| n + 2.0 * (r * n / mu + 0.5 + 3.0 * (r * n * var / mu.powi(3)).sqrt() + 1.0) <= w;
        let mut n = (w / (1.0 + 2.0 * r / mu)) as usize;
        while n > 4 && !fits(n as f64) {
            n -= 1;
        }
        n.max(4)
    }

    /// Text tokens taken for one [gMASK] sample ([gMASK] and <sop> take two places).
    pub fn gmask_text_len(&self) -> usize {
        self.seq_len - 2
    }
}

/// P(len = 1..=max) ∝ Poisson(λ) pmf, normalized.
fn span_pmf(lambda: f64, max: usize) -> Vec<f64> {
    let mut p = Vec::with_capacity(max);
    let mut term = (-lambda).exp(); // pmf(0)
    for k in 1..=max {
        term *= lambda / k as f64;
        p.push(term);
    }
    let s: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= s);
    p
}

/// Ids the objective writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectiveIds {
    pub mask: u32,
    pub gmask: u32,
    pub sop: u32,
    pub eop: u32,
    pub pad: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Mask,
    Gmask,
    Mip,
}

/// One sample: Part A (`prefix` tokens) then Part B.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    /// Next-token targets, IGNORE where there is no loss.
    pub targets: Vec<i64>,
    pub positions: Vec<u32>,
    /// Second position dimension (2-D only).
    pub block_positions: Option<Vec<u32>>,
    pub prefix: usize,
    pub mode: Mode,
    /// Span lengths ([MASK] mode).
    pub spans: Vec<usize>,
    /// Text tokens the sample was made from.
    pub text_len: usize,
}

/// Draws span lengths until they cover `mask_ratio` of `n` tokens in expectation, while they
/// still fit with a gap before each span and the sample (text + a [MASK] and a <sop> per span)
/// stays within `max_total` tokens; then places them uniformly at random without touching.
/// Returns (start, len) sorted by start.
pub fn sample_spans(n: usize, max_total: usize, cfg: &ObjectiveConfig, rng: &mut impl Rng) -> Vec<(usize, usize)> {
    let pmf = span_pmf(cfg.span_lambda, cfg.max_span);
    let goal = cfg.mask_ratio * n as f64;
    let mut lens: Vec<usize> = Vec::new();
    let mut sum = 0usize;
    while (sum as f64) < goal {
        let u: f64 = rng.random();
        let mut acc = 0.0;
        let mut len = pmf.len();
        for (i, p) in pmf.iter().enumerate() {
            acc += p;
            if u < acc {
                len = i + 1;
                break;
            }
        }
        // Each span needs one free token before it (non-adjacent spans).
        if sum + len + lens.len() + 1 > n || n + 2 * (lens.len() + 1) > max_total {
            break;
        }
        // The span that crosses the goal is kept with probability (goal - covered) / len, so the
        // expected masked count is the goal itself rather than goal + overshoot (which would be
        // +2 tokens on average: 15% becomes 17% in 128-token windows).
        if (sum + len) as f64 > goal && rng.random::<f64>() >= (goal - sum as f64) / len as f64 {
            break;
        }
        sum += len;
        lens.push(len);
    }
    let free = n - sum;
    let mut starts = rand::seq::index::sample(rng, free, lens.len()).into_vec();
    starts.sort_unstable();
    let mut shift = 0;
    starts
        .iter()
        .zip(&lens)
        .map(|(&p, &l)| {
            let s = p + shift;
            shift += l;
            (s, l)
        })
        .collect()
}

/// [MASK] mode on `text`, at most `cfg.window()` tokens long (text + 2 per span).
pub fn mask_sample(text: &[u32], cfg: &ObjectiveConfig, ids: &ObjectiveIds, rng: &mut impl Rng) -> Sample {
    let spans = sample_spans(text.len(), cfg.window().max(text.len() + 2), cfg, rng);
    let total = text.len() + 2 * spans.len();
    let mut s = Sample::with_capacity(total, Mode::Mask, text.len(), cfg.positions);
    // Part A: the text with one [MASK] per span; remember each [MASK]'s index.
    let mut mask_pos = Vec::with_capacity(spans.len());
    let mut at = 0;
    for &(start, len) in &spans {
        s.push_context(&text[at..start]);
        mask_pos.push(s.tokens.len());
        s.push_context(&[ids.mask]);
        at = start + len;
    }
    s.push_context(&text[at..]);
    s.prefix = s.tokens.len();
    // Part B: spans in random order.
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.shuffle(rng);
    for i in order {
        let (start, len) = spans[i];
        s.push_block(ids.sop, &text[start..start + len], ids.eop, mask_pos[i] as u32);
    }
    s.spans = spans.iter().map(|x| x.1).collect();
    s
}

/// [gMASK] mode on `text`: a suffix of length ~ U[min_ratio·n, n) is predicted.
pub fn gmask_sample(text: &[u32], cfg: &ObjectiveConfig, ids: &ObjectiveIds, rng: &mut impl Rng) -> Sample {
    let n = text.len();
    let lo = ((cfg.min_gmask_ratio * n as f64).ceil() as usize).clamp(1, n.saturating_sub(1).max(1));
    let hi = n.saturating_sub(1).max(lo); // keep at least one context token
    let u = if n < 2 { n } else { rng.random_range(lo..=hi) };
    prefix_lm_sample(&text[..n - u], &text[n - u..], Mode::Gmask, cfg.positions, ids)
}

/// `context [gMASK] <sop> target <eop>`, the layout of [gMASK] and MIP samples.
pub fn prefix_lm_sample(
    context: &[u32],
    target: &[u32],
    mode: Mode,
    positions: PositionKind,
    ids: &ObjectiveIds,
) -> Sample {
    let mut s = Sample::with_capacity(context.len() + target.len() + 2, mode, context.len() + target.len(), positions);
    s.push_context(context);
    s.push_context(&[ids.gmask]);
    s.prefix = s.tokens.len();
    let hold = (s.prefix - 1) as u32; // the [gMASK] index (2-D)
    s.push_block(ids.sop, target, ids.eop, hold);
    s
}

/// An instruction example as a MIP sample no longer than `max_len`: the target is cut to at
/// most half of it, then the prompt from the left.
pub fn mip_sample(
    prompt: &[u32],
    target: &[u32],
    max_len: usize,
    positions: PositionKind,
    ids: &ObjectiveIds,
) -> Sample {
    let room = max_len.saturating_sub(3);
    let t = target.len().min(room / 2).max(room.saturating_sub(prompt.len()).min(target.len()));
    let p = prompt.len().min(room - t);
    prefix_lm_sample(&prompt[prompt.len() - p..], &target[..t], Mode::Mip, positions, ids)
}

impl Sample {
    fn with_capacity(n: usize, mode: Mode, text_len: usize, positions: PositionKind) -> Self {
        Self {
            tokens: Vec::with_capacity(n),
            targets: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            block_positions: (positions == PositionKind::TwoD).then(|| Vec::with_capacity(n)),
            prefix: 0,
            mode,
            spans: Vec::new(),
            text_len,
        }
    }

    fn push_context(&mut self, toks: &[u32]) {
        for &t in toks {
            self.positions.push(self.tokens.len() as u32);
            self.tokens.push(t);
            self.targets.push(IGNORE);
            if let Some(b) = &mut self.block_positions {
                b.push(0);
            }
        }
    }

    /// `<sop> body` with targets `body <eop>`. 1-D: [MASK] blocks hold the mask position,
    /// [gMASK]/MIP blocks continue counting; 2-D: first dim held at `hold`, second 1, 2, ...
    fn push_block(&mut self, sop: u32, body: &[u32], eop: u32, hold: u32) {
        let start = self.tokens.len() as u32;
        for (k, (&tok, &tgt)) in
            std::iter::once(&sop).chain(body).zip(body.iter().chain(std::iter::once(&eop))).enumerate()
        {
            let pos = match (&self.block_positions, self.mode) {
                (None, Mode::Mask) => hold,
                (None, _) => start + k as u32,
                (Some(_), _) => hold,
            };
            self.tokens.push(tok);
            self.targets.push(tgt as i64);
            self.positions.push(pos);
            if let Some(b) = &mut self.block_positions {
                b.push(k as u32 + 1);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}
