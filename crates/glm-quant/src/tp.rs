//! Tensor-parallel slices of quantized weights: rank k's part of a quantized matrix is an exact
//! slice of the one-process matrix, cut as glm-dist's `split` table cuts the dense weight:
//!
//! - column-parallel (`query_key_value` by whole heads, `dense_h_to_4h` per GeGLU half): the rank's
//!   rows, each with its own per-row scales;
//! - row-parallel (`attention.dense`, `dense_4h_to_h`): the rank's contiguous columns of every row,
//!   packed bytes copied as stored, the row's scales whole (or, for matrices with several input
//!   scale groups, the groups the slice covers). INT4 packs two columns per byte, so a rank's
//!   columns must start and end on an even column, else the cut is refused.
//!
//! Nothing is re-quantized, so the ranks' weights dequantize to exactly the one-process weights and
//! a tensor-parallel INT8/INT4 model computes what the one-process model computes (up to the order
//! of the f32 sums across ranks).
//!
//! Dependency direction: glm-quant depends on glm-dist (its split table and `TpFactory`), never the
//! reverse. The parallel layer knows nothing of weight formats; a weight format knows how its own
//! tensors are cut, and a quantized model under tensor parallelism is `TpFactory` over a
//! [`crate::QuantFactory`] holding the rank's slices (see `QuantCheckpoint::open_rank`).

use glm_dist::split::{rank_rows, Split};

use crate::{Bits, Error, QuantMatrix, Result};

impl QuantMatrix {
    /// Rank `k` of `tp`'s part, as the split rule `split` cuts the dense weight (see the module
    /// notes): `Rows` / `GluRows` take rows with their scales, `Cols` takes columns with the scales
    /// of the groups they fall in, `Replicated` (and `tp == 1`) the whole matrix.
    pub fn shard(&self, split: Split, tp: usize, k: usize) -> Result<QuantMatrix> {
        self.validate()?;
        if tp == 0 || k >= tp {
            return Err(Error::Shape(format!("rank {k} of a tensor-parallel degree of {tp}")));
        }
        if tp == 1 {
            return Ok(self.clone());
        }
        match split {
            Split::Replicated => Ok(self.clone()),
            Split::Rows | Split::GluRows => {
                let unit = if split == Split::GluRows { 2 * tp } else { tp };
                if !self.rows.is_multiple_of(unit) {
                    return Err(Error::Shape(format!(
                        "{} rows ({split:?}) cannot be split {tp} ways: each rank needs whole rows{}",
                        self.rows,
                        if split == Split::GluRows { " of each GeGLU half" } else { "" }
                    )));
                }
                let parts = rank_rows(split, self.rows, tp, k)
                    .into_iter()
                    .map(|(a, b)| self.slice_rows(a, b))
                    .collect::<Result<Vec<_>>>()?;
                QuantMatrix::concat_rows(&parts.iter().collect::<Vec<_>>())
            }
            Split::Cols => {
                let (c0, c1) = self.rank_cols(tp, k)?;
                self.slice_cols(c0, c1).map_err(|e| Error::Shape(format!("rank {k} of {tp}: {e}")))
            }
        }
    }

    /// Columns c0..c1 of rank `k` of a row-parallel cut `tp` ways, or why they cannot be cut.
    fn rank_cols(&self, tp: usize, k: usize) -> Result<(usize, usize)> {
        if !self.cols.is_multiple_of(tp) {
            return Err(Error::Shape(format!("{} input columns cannot be split {tp} ways", self.cols)));
        }
        let per = self.cols / tp;
        if self.bits == Bits::Int4 && !per.is_multiple_of(2) {
            return Err(Error::Shape(format!(
                "INT4 packs two columns per byte: {} columns split {tp} ways give each rank {per}, an odd \
                 number, so a rank's slice would split a packed byte (use INT8, or a degree that leaves an even \
                 number of columns per rank)",
                self.cols
            )));
        }
        Ok((k * per, (k + 1) * per))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(bits: Bits, rows: usize, cols: usize, groups: usize) -> QuantMatrix {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        QuantMatrix::quantize_grouped(&w, rows, cols, bits, groups).expect("quantize")
    }

    /// Every cut is an exact slice: rows with their scales, columns with the scales whole, and the
    /// ranks' parts merge back to the matrix (its dequantized values, bit for bit).
    #[test]
    fn shards_are_exact_slices() -> Result<()> {
        for bits in [Bits::Int8, Bits::Int4] {
            let m = matrix(bits, 16, 24, 1);
            let full = m.dequantize();
            for tp in [1, 2, 4] {
                let rows: Vec<QuantMatrix> = (0..tp).map(|k| m.shard(Split::Rows, tp, k)).collect::<Result<_>>()?;
                assert_eq!(QuantMatrix::concat_rows(&rows.iter().collect::<Vec<_>>())?, m);
                let cols: Vec<QuantMatrix> = (0..tp).map(|k| m.shard(Split::Cols, tp, k)).collect::<Result<_>>()?;
                for c in &cols {
                    // The scales stay the row's own: no re-quantization.
                    assert_eq!((c.rows, c.cols, c.groups), (16, 24 / tp, 1));
                    assert_eq!(c.scales, m.scales);
                }
                let merged = QuantMatrix::concat_cols(&cols.iter().collect::<Vec<_>>())?;
                assert_eq!(merged.data, m.data);
                assert_eq!(merged.dequantize(), full);
                // GeGLU: rank k holds its rows of each half.
                let glu: Vec<QuantMatrix> = (0..tp).map(|k| m.shard(Split::GluRows, tp, k)).collect::<Result<_>>()?;
                let per = 8 / tp;
                assert_eq!(glu[tp - 1].slice_rows(per, 2 * per)?, m.slice_rows(16 - per, 16)?);
                assert_eq!(m.shard(Split::Replicated, tp, 0)?, m);
            }
            // Grouped scales (a GLM-130B row-parallel layer quantized per rank): whole groups per rank.
            let g = matrix(bits, 4, 32, 4);
            let halves: Vec<QuantMatrix> = (0..2).map(|k| g.shard(Split::Cols, 2, k)).collect::<Result<_>>()?;
            assert_eq!(halves[1].groups, 2);
            assert_eq!(QuantMatrix::concat_cols(&halves.iter().collect::<Vec<_>>())?, g);
        }
        Ok(())
    }

    #[test]
    fn bad_cuts_are_named() {
        let err = |r: Result<QuantMatrix>| r.err().map(|e| e.to_string()).unwrap_or_default();
        // 4 ways over 12 INT4 columns: 3 per rank, a packed byte split.
        let e = err(matrix(Bits::Int4, 4, 12, 1).shard(Split::Cols, 4, 1));
        assert!(e.contains("INT4") && e.contains("each rank 3") && e.contains("split a packed byte"), "{e}");
        // INT8 has no pairs: the same cut is fine.
        assert!(matrix(Bits::Int8, 4, 12, 1).shard(Split::Cols, 4, 1).is_ok());
        let e = err(matrix(Bits::Int8, 6, 12, 1).shard(Split::GluRows, 2, 0));
        assert!(e.contains("6 rows") && e.contains("GeGLU"), "{e}");
        let e = err(matrix(Bits::Int8, 4, 10, 1).shard(Split::Cols, 4, 0));
        assert!(e.contains("10 input columns cannot be split 4 ways"), "{e}");
        assert!(err(matrix(Bits::Int8, 4, 8, 1).shard(Split::Rows, 2, 2)).contains("rank 2"));
    }
}
