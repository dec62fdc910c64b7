//! One row being decoded: GLM's layout (spec section 2, as glm-data's objective builds it) and the
//! KV cache. The row is `context <sop> generated...`; the context (everything before `<sop>`) is
//! attended bidirectionally, `<sop>` and the generated tokens causally. Positions:
//!
//! | layout   | context          | `<sop>` and generated token k = 0, 1, ..                 |
//! |----------|------------------|----------------------------------------------------------|
//! | 1-D      | 0, 1, .., c - 1  | [gMASK]: c + k (keeps counting); [MASK] at m: m          |
//! | 2-D      | (i, 0)           | (g, k + 1), g = the [gMASK] index c - 1 or the [MASK]'s m |

use candle_core::{DType, Tensor};
use glm_model::{Glm, KvCache, Partial, PositionEncoding, Sequence};
use glm_nn::AttnLayout;

use crate::mirror::{Call, Mirror};
use crate::{Error, Result};

/// Row ids (for a mirror's followers): unique within the process.
static NEXT_ROW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_row() -> u64 {
    NEXT_ROW.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Which blank the generated block fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blank {
    /// Left-to-right continuation: the context ends with its [gMASK].
    Gmask,
    /// Blank filling: the [MASK] (or [sMASK]) at context index `at`.
    Mask { at: usize },
}

/// Incremental decoding of one row: `feed` runs only the new tokens, over the cached keys and
/// values of the earlier ones.
pub struct Decoder<'m> {
    model: &'m Glm,
    blank: Blank,
    context_len: usize,
    tokens: Vec<u32>,
    cache: KvCache,
    layout: AttnLayout,
    /// A feed begun and not finished ([`Decoder::begin_feed`]), with the row's length before it.
    partial: Option<(Partial, usize)>,
    /// Tensor-parallel followers that replay this row's model calls (`crate::mirror`).
    mirror: Option<&'m dyn Mirror>,
    row: u64,
}

impl Drop for Decoder<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.mirror {
            m.dropped(self.row);
        }
    }
}

impl<'m> Decoder<'m> {
    /// An independent copy (its own cache), for beams. Not in the middle of a feed.
    pub fn fork(&self) -> Result<Self> {
        if self.partial.is_some() {
            return Err(Error::Input("cannot fork a row in the middle of a feed".into()));
        }
        let row = next_row();
        if let Some(m) = self.mirror {
            m.call(&Call::Fork { from: self.row, to: row })?;
        }
        Ok(Self {
            model: self.model,
            blank: self.blank,
            context_len: self.context_len,
            tokens: self.tokens.clone(),
            cache: self.cache.fork()?,
            layout: self.layout.clone(),
            partial: None,
            mirror: self.mirror,
            row,
        })
    }

    /// A row holding `context`; nothing runs until the first `feed` (normally of `<sop>`).
    pub fn new(model: &'m Glm, context: &[u32], blank: Blank) -> Result<Self> {
        Self::with_mirror(model, None, context, blank)
    }

    /// `new`, its model calls sent to `mirror`'s followers first (tensor-parallel decoding).
    pub fn with_mirror(model: &'m Glm, mirror: Option<&'m dyn Mirror>, context: &[u32], blank: Blank) -> Result<Self> {
        let max = model.config().max_seq_len;
        if context.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if context.len() + 1 > max {
            return Err(Error::TooLong { tokens: context.len() + 1, max });
        }
        if let Blank::Mask { at } = blank {
            if at >= context.len() {
                return Err(Error::Input(format!("blank at {at} is outside the {}-token context", context.len())));
            }
        }
        Ok(Self {
            model,
            blank,
            context_len: context.len(),
            tokens: context.to_vec(),
            cache: KvCache::new(model.config()),
            layout: AttnLayout::prefix_lm(&[context.len()]),
            partial: None,
            mirror,
            row: next_row(),
        })
    }

    /// Every token of the row so far: the context, then what was fed.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens the row can still take before max_seq_len.
    pub fn room(&self) -> usize {
        self.model.config().max_seq_len.saturating_sub(self.tokens.len())
    }

    /// Appends `ids` to the row and runs every token not yet cached (on the first call, the whole
    /// context as well); returns the next-token logits after the last one, as f32.
    pub fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.begin_feed(ids)?;
        self.continue_feed(usize::MAX)?.ok_or_else(|| Error::Input("the feed did not finish".into()))
    }

    /// `feed`, begun and not run: [`Decoder::continue_feed`] runs it a few layers at a time, so a
    /// long prefill can be spread over steps. The logits are the same as `feed`'s.
    pub fn begin_feed(&mut self, ids: &[u32]) -> Result<()> {
        if self.partial.is_some() {
            return Err(Error::Input("a feed is already under way".into()));
        }
        if ids.len() > self.room() {
            return Err(Error::TooLong { tokens: self.tokens.len() + ids.len(), max: self.model.config().max_seq_len });
        }
        let old_len = self.tokens.len();
        let start = self.cache.len();
        if start == old_len + ids.len() {
            return Err(Error::Input(format!("nothing to run: all {start} row tokens are cached")));
        }
        self.tokens.extend_from_slice(ids);
        let positions = self.positions(start..self.tokens.len());
        if let Some(m) = self.mirror {
            let call = Call::Begin {
                row: self.row,
                ids: self.tokens[start..].to_vec(),
                positions: positions.clone(),
                context: self.context_len as u32,
            };
            if let Err(e) = m.call(&call) {
                self.tokens.truncate(old_len);
                return Err(e);
            }
        }
        let mut seq = Sequence {
            ids: &self.tokens[start..],
            positions: &positions,
            layout: &self.layout,
            cache: &mut self.cache,
        };
        match self.model.begin(&mut seq) {
            Ok(p) => {
                self.partial = Some((p, old_len));
                Ok(())
            }
            Err(e) => {
                self.tokens.truncate(old_len);
                Err(Error::from(e).context(format!("decoding row tokens {start}..{}", old_len + ids.len())))
            }
        }
    }

    /// Runs up to `layers` (at least one) more layers of the feed begun; its logits once the last
    /// layer has run. On an error the row drops its cache and the fed tokens (the next `feed`
    /// recomputes the row).
    pub fn continue_feed(&mut self, layers: usize) -> Result<Option<Vec<f32>>> {
        let Some((mut p, old_len)) = self.partial.take() else {
            return Err(Error::Input("no feed under way".into()));
        };
        let mirrored = match self.mirror {
            Some(m) => m.call(&Call::Advance { row: self.row, layers: layers.min(u32::MAX as usize) as u32 }),
            None => Ok(()),
        };
        let out = mirrored
            .and_then(|()| self.model.advance(&mut p, &mut self.cache, layers).map_err(Error::from))
            .and_then(|l| match l {
                Some(l) => Ok(Some(l.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)),
                None => Ok(None),
            });
        match out {
            Ok(None) => self.partial = Some((p, old_len)),
            Ok(Some(_)) => {}
            Err(_) => {
                self.cache.clear();
                self.tokens.truncate(old_len);
            }
        }
        out.map_err(|e| e.context(format!("decoding row tokens {old_len}..")))
    }

    /// Layers the feed under way has left (0: none under way).
    pub fn feed_layers_left(&self) -> usize {
        self.partial.as_ref().map_or(0, |(p, _)| p.layers_left(self.model))
    }

    /// `feed` of one token to each row, the rows run as one ragged batch (`Glm::forward_sequences`:
    /// one pass over the weights for all of them). Each row's logits are those `feed` gives it alone.
    /// On an error every row drops its cache and the token (the next `feed` recomputes the row).
    pub fn feed_batch(rows: &mut [&mut Decoder<'m>], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let Some(model) = rows.first().map(|d| d.model) else { return Ok(Vec::new()) };
        if tokens.len() != rows.len() {
            return Err(Error::Input(format!("{} tokens for {} rows", tokens.len(), rows.len())));
        }
        let unready =
            |d: &Decoder| d.room() == 0 || d.partial.is_some() || d.cache.len() != d.tokens.len() || d.cache.is_empty();
        if let Some(d) = rows.iter().find(|d| unready(d)) {
            return Err(Error::Input(format!(
                "feed_batch needs rows with room whose tokens are all cached ({} of {} cached)",
                d.cache.len(),
                d.tokens.len()
            )));
        }
        let positions: Vec<Vec<u32>> = rows.iter().map(|d| d.positions(d.tokens.len()..d.tokens.len() + 1)).collect();
        let mirrored = match rows.first().and_then(|d| d.mirror) {
            Some(m) => {
                let rows = rows.iter().zip(tokens).zip(&positions).map(|((d, &t), p)| (d.row, t, p.clone())).collect();
                m.call(&Call::Batch { rows })
            }
            None => Ok(()),
        };
        let mut seqs: Vec<Sequence> = rows
            .iter_mut()
            .zip(tokens.chunks(1))
            .zip(&positions)
            .map(|((d, ids), positions)| Sequence { ids, positions, layout: &d.layout, cache: &mut d.cache })
            .collect();
        let out = mirrored.and_then(|()| {
            model
                .forward_sequences(&mut seqs)
                .map_err(Error::from)
                .and_then(|l| Ok(l.to_dtype(DType::F32)?.to_vec2()?))
        });
        drop(seqs);
        match out {
            Ok(logits) => {
                rows.iter_mut().zip(tokens).for_each(|(d, &t)| d.tokens.push(t));
                Ok(logits)
            }
            Err(e) => {
                rows.iter_mut().for_each(|d| d.cache.clear());
                Err(e.context(format!("decoding a batch of {} rows", rows.len())))
            }
        }
    }

    /// The next-token logits after the last token, recomputed over the whole row without the
    /// cache by `Glm::forward` (the reference `feed` must match).
    pub fn recompute(&self) -> Result<Vec<f32>> {
        let run = || -> Result<Vec<f32>> {
            let (dev, n) = (self.model.device(), self.tokens.len());
            if let Some(m) = self.mirror {
                let (tokens, context) = (self.tokens.clone(), self.context_len as u32);
                m.call(&Call::Forward { tokens, positions: self.positions(0..n), context })?;
            }
            let ids = Tensor::new(self.tokens.as_slice(), dev)?.unsqueeze(0)?;
            let positions = Tensor::new(self.positions(0..n), dev)?;
            let positions = match self.model.config().position_encoding {
                PositionEncoding::Rope1d => positions.unsqueeze(0)?,
                PositionEncoding::Rope2d => positions.reshape((1, 2, n))?,
            };
            let logits = self.model.forward(&ids, &positions, &self.layout, None)?; // (1, T, V)
            Ok(logits.get(0)?.get(n - 1)?.to_dtype(DType::F32)?.to_vec1()?)
        };
        run().map_err(|e| e.context(format!("recomputing {} row tokens", self.tokens.len())))
    }

    /// Position ids of row tokens `range` as `Sequence` takes them: one per token, or for 2-D RoPE
    /// the first dimension's then the second's.
    fn positions(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        let (p1, p2): (Vec<u32>, Vec<u32>) = range.map(|i| self.position(i)).unzip();
        match self.model.config().position_encoding {
            PositionEncoding::Rope1d => p1,
            PositionEncoding::Rope2d => [p1, p2].concat(),
        }
    }

    /// (1-D position, 2-D block position) of row token i; the 1-D model uses the first.
    fn position(&self, i: usize) -> (u32, u32) {
        block_position(self.model.config().position_encoding, self.blank, self.context_len, i)
    }
}

/// (1-D position, 2-D block position) of token i of a row `context <sop> block...` whose context
/// has `context_len` tokens (the table at the top of this module); the 1-D model uses the first.
pub fn block_position(pe: PositionEncoding, blank: Blank, context_len: usize, i: usize) -> (u32, u32) {
    let c = context_len;
    if i < c {
        return (i as u32, 0);
    }
    let k = (i - c + 1) as u32; // <sop> is 1
    match (pe, blank) {
        (PositionEncoding::Rope1d, Blank::Gmask) => (i as u32, k),
        (PositionEncoding::Rope2d, Blank::Gmask) => ((c - 1) as u32, k),
        (_, Blank::Mask { at }) => (at as u32, k),
    }
}

impl crate::beam::Extend for Decoder<'_> {
    fn extend(&self, token: u32) -> Result<(Self, Vec<f32>)> {
        let mut d = self.fork()?;
        let logits = d.feed(&[token])?;
        Ok((d, logits))
    }
}
