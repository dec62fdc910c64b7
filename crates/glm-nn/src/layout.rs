//! The GLM attention layout, described per row instead of as a dense T x T mask.
//!
//! A row holds one or more packed samples (`Segment`s). A token attends only inside its own sample:
//! to every token of that sample's prefix (bidirectional context: everything before `<sop>`), and
//! causally to the tokens after it. Samples packed into one row never see each other
//! (block-diagonal), which [MASK] training needs. Tokens outside every segment (padding) see only
//! themselves. A row may also have a shared context (its first `shared` tokens) that the tokens of
//! every segment see besides their own sample: multiple-choice scoring lays each choice out as its
//! own causal block after one context, all blocks scored in a single pass. The layout turns into an additive mask [B, 1, Tq, Tk] for any window of queries, so
//! the same description serves the full forward and KV-cache decoding.

use candle_core::{Device, Result, Tensor};

/// One sample in a row: tokens [start, start + len), of which the first `prefix` are context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub prefix: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnLayout {
    rows: Vec<Vec<Segment>>,
    /// Per row: tokens [0, shared) are visible to every token inside a segment.
    shared: Vec<usize>,
}

impl AttnLayout {
    /// One sample per row, starting at token 0; `prefix_lens[b]` tokens of row b are context.
    /// The sample extends without end, so decoding may append tokens to it.
    pub fn prefix_lm(prefix_lens: &[usize]) -> Self {
        let rows: Vec<_> =
            prefix_lens.iter().map(|&p| vec![Segment { start: 0, len: usize::MAX, prefix: p }]).collect();
        let shared = vec![0; rows.len()];
        Self { rows, shared }
    }

    /// Blocks after a shared context, per row: `context` tokens attended bidirectionally, then one
    /// causal block per entry of `blocks` (lengths), each seeing the context and its own earlier
    /// tokens but no other block. Tokens past the last block are padding.
    pub fn shared_context(rows: &[(usize, Vec<usize>)]) -> Result<Self> {
        let mut segs = Vec::with_capacity(rows.len());
        for (b, (context, blocks)) in rows.iter().enumerate() {
            if *context == 0 {
                candle_core::bail!("row {b}: a shared context needs at least one token")
            }
            let mut row = vec![Segment { start: 0, len: *context, prefix: *context }];
            let mut start = *context;
            for &len in blocks {
                if len == 0 {
                    candle_core::bail!("row {b}: an empty block")
                }
                row.push(Segment { start, len, prefix: 0 });
                start += len;
            }
            segs.push(row);
        }
        let mut l = Self::packed(segs)?;
        l.shared = rows.iter().map(|(c, _)| *c).collect();
        Ok(l)
    }

    /// Several samples per row. Segments of a row must be sorted, disjoint and have
    /// `prefix <= len`, `len >= 1`. The last segment of a row may be open-ended (`len = usize::MAX`).
    pub fn packed(rows: Vec<Vec<Segment>>) -> Result<Self> {
        for (b, row) in rows.iter().enumerate() {
            let mut end = 0usize;
            for s in row {
                if s.len == 0 || s.prefix > s.len || s.start < end {
                    candle_core::bail!(
                        "row {b}: bad segment {s:?} (segments must be non-empty, sorted, disjoint, prefix <= len)"
                    )
                }
                end = s.start.saturating_add(s.len);
            }
        }
        let shared = vec![0; rows.len()];
        Ok(Self { rows, shared })
    }

    pub fn batch(&self) -> usize {
        self.rows.len()
    }

    pub fn rows(&self) -> &[Vec<Segment>] {
        &self.rows
    }

    fn segment_of(&self, b: usize, i: usize) -> Option<&Segment> {
        self.rows[b].iter().find(|s| i >= s.start && i - s.start < s.len)
    }

    /// May token i of row b attend to token j?
    pub fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        match self.segment_of(b, i) {
            None => i == j,
            Some(s) => j < self.shared[b] || (j >= s.start && (j < s.start + s.prefix || j <= i)),
        }
    }

    /// Keys token i of row b may attend to: one range (its sample's prefix, then causally up to
    /// itself), or only itself for padding.
    fn visible(&self, b: usize, i: usize) -> std::ops::Range<usize> {
        match self.segment_of(b, i) {
            None => i..i + 1,
            Some(s) => s.start..(s.start + s.prefix).max(i + 1),
        }
    }

    /// Additive mask [B, 1, q_len, k_len] (0 = attend, -inf = blocked) for queries
    /// q_start..q_start+q_len over keys 0..k_len.
    pub fn mask(&self, q_start: usize, q_len: usize, k_len: usize, device: &Device) -> Result<Tensor> {
        let b = self.rows.len();
        let mut m = vec![f32::NEG_INFINITY; b * q_len * k_len];
        for (r, rows) in m.chunks_mut(q_len * k_len.max(1)).enumerate() {
            for (qi, row) in rows.chunks_mut(k_len.max(1)).enumerate() {
                let i = q_start + qi;
                let vis = self.visible(r, i);
                let (lo, hi) = (vis.start.min(k_len), vis.end.min(k_len));
                row[lo..hi].fill(0.0);
                if self.shared[r] > 0 && self.segment_of(r, i).is_some() {
                    row[..self.shared[r].min(k_len)].fill(0.0);
                }
            }
        }
        Tensor::from_vec(m, (b, 1, q_len, k_len), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_then_causal() {
        let l = AttnLayout::prefix_lm(&[3]);
        // Tokens 0..3 see each other both ways; token 4 sees 0..=4 but not 5.
        assert!(l.allowed(0, 0, 2));
        assert!(!l.allowed(0, 0, 3));
        assert!(l.allowed(0, 4, 3) && l.allowed(0, 4, 4) && !l.allowed(0, 4, 5));
    }

    #[test]
    fn packed_samples_are_block_diagonal() {
        let l = AttnLayout::packed(vec![vec![
            Segment { start: 0, len: 4, prefix: 2 },
            Segment { start: 4, len: 3, prefix: 1 },
        ]])
        .unwrap();
        assert!(!l.allowed(0, 5, 1) && !l.allowed(0, 1, 5));
        assert!(l.allowed(0, 5, 4) && l.allowed(0, 4, 4) && !l.allowed(0, 4, 5));
        // Padding after the last segment sees only itself.
        assert!(l.allowed(0, 8, 8) && !l.allowed(0, 8, 7));
        assert!(AttnLayout::packed(vec![vec![
            Segment { start: 0, len: 4, prefix: 2 },
            Segment { start: 3, len: 3, prefix: 1 }
        ]])
        .is_err());
    }

    #[test]
    fn blocks_see_the_shared_context_and_themselves_only() -> Result<()> {
        // Context 0..3, blocks 3..5 and 5..8, then padding at 8.
        let l = AttnLayout::shared_context(&[(3, vec![2, 3])])?;
        assert!(l.allowed(0, 0, 2) && !l.allowed(0, 0, 3)); // context: bidirectional, not the blocks
        assert!(l.allowed(0, 4, 0) && l.allowed(0, 4, 3) && l.allowed(0, 4, 4) && !l.allowed(0, 3, 4));
        assert!(l.allowed(0, 6, 2) && l.allowed(0, 6, 5) && !l.allowed(0, 6, 4) && !l.allowed(0, 6, 7));
        assert!(l.allowed(0, 8, 8) && !l.allowed(0, 8, 0));
        let v: Vec<f32> = l.mask(0, 9, 9, &Device::Cpu)?.flatten_all()?.to_vec1()?;
        for i in 0..9 {
            for j in 0..9 {
                assert_eq!(v[i * 9 + j].is_infinite(), !l.allowed(0, i, j), "i={i} j={j}");
            }
        }
        assert!(AttnLayout::shared_context(&[(0, vec![1])]).is_err());
        assert!(AttnLayout::shared_context(&[(2, vec![1, 0])]).is_err());
        Ok(())
    }

    #[test]
    fn mask_window_matches_allowed() -> Result<()> {
        let l = AttnLayout::prefix_lm(&[2, 4]);
        let m = l.mask(3, 2, 5, &Device::Cpu)?;
        assert_eq!(m.dims(), &[2, 1, 2, 5]);
        let v: Vec<f32> = m.flatten_all()?.to_vec1()?;
        for b in 0..2 {
            for qi in 0..2 {
                for j in 0..5 {
                    let blocked = v[(b * 2 + qi) * 5 + j].is_infinite();
                    assert_eq!(blocked, !l.allowed(b, 3 + qi, j));
                }
            }
        }
        Ok(())
    }

    /// The range-filled mask against `allowed`, element by element, over many packed layouts
    /// (a fixed LCG stands in for a property-test generator).
    #[test]
    fn mask_matches_allowed_on_random_packed_layouts() -> Result<()> {
        let mut state = 12345u64;
        let mut next = |n: usize| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as usize) % n.max(1)
        };
        for _ in 0..200 {
            let t = 1 + next(24);
            let rows: Vec<Vec<Segment>> = (0..1 + next(3))
                .map(|_| {
                    let mut segs = Vec::new();
                    let mut start = next(3);
                    while start < t {
                        let len = 1 + next(t - start);
                        segs.push(Segment { start, len, prefix: next(len + 1) });
                        start += len + next(2);
                    }
                    segs
                })
                .collect();
            let l = AttnLayout::packed(rows)?;
            let (q0, k_len) = (next(t), t + next(4));
            let q_len = 1 + next(k_len - q0);
            let v: Vec<f32> = l.mask(q0, q_len, k_len, &Device::Cpu)?.flatten_all()?.to_vec1()?;
            for b in 0..l.batch() {
                for qi in 0..q_len {
                    for j in 0..k_len {
                        let blocked = v[(b * q_len + qi) * k_len + j].is_infinite();
                        assert_eq!(blocked, !l.allowed(b, q0 + qi, j), "{l:?} b={b} i={} j={j}", q0 + qi);
                    }
                }
            }
        }
        Ok(())
    }
}
