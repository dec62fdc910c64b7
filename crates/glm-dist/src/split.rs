//! How each tensor of a GLM model is cut across tensor-parallel ranks: the one table of GLM-130B's
//! `tools/convert_tp.py` rules, and the row arithmetic both directions need. The SAT import and
//! export, the tensor-parallel factory (a rank's weights are `shard`s of the full ones), sharded
//! training checkpoints and `glm reshard` all read it.
//!
//! - vocab-parallel embedding (and an untied head), `query_key_value` (whole heads: the fused rows
//!   are per-head interleaved, so a rank's contiguous rows are its heads): contiguous rows;
//! - GeGLU's `dense_h_to_4h` (weight and bias): each rank holds its slice of x1, then its slice of
//!   x2, so merging is `cat(all first halves, all second halves)`;
//! - the row-parallel weights `attention.dense` and `mlp.dense_4h_to_h`: contiguous columns;
//! - everything else (LayerNorms, the row-parallel biases): the same on every rank, taken from rank 0.
//!
//! RoPE's `inv_freq` buffers (`attention.rotary_emb.inv_freq`, SAT's
//! `mixins.rotary-embedding.rotary_emb.inv_freq`) are not weights: readers skip them.

use glm_model::weights::{ATTENTION, DENSE, FOURH_TO_H, H_TO_4H, LM_HEAD, MLP, QKV, WORD_EMBEDDINGS};
use glm_model::{Config, FfnKind};

use candle_core::Tensor;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Replicated,
    Rows,
    GluRows,
    Cols,
}

/// Keys a reader ignores: RoPE's cached inverse frequencies.
pub fn ignored(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

pub fn split_of(cfg: &Config, name: &str) -> Split {
    let ends = |tail: &str| name.ends_with(tail);
    let weight_or_bias = |module: &str| ends(&format!("{module}.weight")) || ends(&format!("{module}.bias"));
    let vocab = ends(&format!("{WORD_EMBEDDINGS}.weight")) || name == format!("{LM_HEAD}.weight");
    if vocab || weight_or_bias(&format!("{ATTENTION}.{QKV}")) {
        Split::Rows
    } else if weight_or_bias(&format!("{MLP}.{H_TO_4H}")) {
        match cfg.ffn {
            FfnKind::GeGlu => Split::GluRows,
            FfnKind::GeluTanh => Split::Rows,
        }
    } else if ends(&format!("{ATTENTION}.{DENSE}.weight")) || ends(&format!("{MLP}.{FOURH_TO_H}.weight")) {
        Split::Cols
    } else {
        Split::Replicated
    }
}

/// A tensor-parallel degree the config can be cut into: whole heads, whole vocabulary rows and
/// FFN columns per rank.
pub fn check_tp(cfg: &Config, tp: usize) -> Result<()> {
    let fail = |what: String| Err(Error::Layout(format!("`{}` cannot be split {tp} ways: {what}", cfg.name)));
    if tp == 0 {
        return fail("the degree must be at least 1".into());
    }
    if !cfg.num_heads.is_multiple_of(tp) {
        return fail(format!("{} heads", cfg.num_heads));
    }
    if !cfg.vocab_size.is_multiple_of(tp) {
        return fail(format!("a vocabulary of {}", cfg.vocab_size));
    }
    if !cfg.ffn_hidden_size.is_multiple_of(tp) || !cfg.hidden_size.is_multiple_of(tp) {
        return fail(format!("FFN size {} and hidden size {}", cfg.ffn_hidden_size, cfg.hidden_size));
    }
    Ok(())
}

/// The shape one of `tp` ranks holds of a tensor of `full` shape.
pub fn rank_shape(split: Split, full: &[usize], tp: usize) -> Vec<usize> {
    let mut s = full.to_vec();
    match split {
        Split::Replicated => {}
        Split::Rows | Split::GluRows => s[0] /= tp,
        Split::Cols => s[1] /= tp,
    }
    s
}

/// Rank `k`'s rows, as ranges of the full tensor's rows, in the order the rank stores them
/// (`Cols` and `Replicated`: all rows).
pub fn rank_rows(split: Split, rows: usize, tp: usize, k: usize) -> Vec<(usize, usize)> {
    match split {
        Split::Rows => {
            let per = rows / tp;
            vec![(k * per, (k + 1) * per)]
        }
        Split::GluRows => {
            let (half, per) = (rows / 2, rows / 2 / tp);
            vec![(k * per, (k + 1) * per), (half + k * per, half + (k + 1) * per)]
        }
        Split::Replicated | Split::Cols => vec![(0, rows)],
    }
}

/// Where full rows r0..r1 of a `Rows`/`GluRows` tensor sit: (rank, local r0, local r1) pieces in order.
pub fn row_pieces(split: Split, rows: usize, tp: usize, r0: usize, r1: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for k in 0..tp {
        let mut local = 0;
        for (a, b) in rank_rows(split, rows, tp, k) {
            let (lo, hi) = (a.max(r0), b.min(r1));
            if lo < hi {
                out.push((lo, k, local + lo - a, local + hi - a));
            }
            local += b - a;
        }
    }
    // In the order of the full tensor's rows.
    out.sort_by_key(|p| p.0);
    out.into_iter().map(|(_, k, l0, l1)| (k, l0, l1)).collect()
}

/// Rank `k`'s part of a full tensor, as the rank stores it.
pub fn shard(full: &Tensor, split: Split, tp: usize, k: usize) -> Result<Tensor> {
    if tp == 1 || split == Split::Replicated {
        return Ok(full.clone());
    }
    let dims = full.dims();
    let dim = if split == Split::Cols { 1 } else { 0 };
    let len = dims.get(dim).copied().unwrap_or(0);
    let unit = if split == Split::GluRows { 2 * tp } else { tp };
    if len % unit != 0 {
        return Err(Error::Layout(format!(
            "a tensor of shape {dims:?} cannot be split {tp} ways along dim {dim} ({split:?})"
        )));
    }
    if split == Split::Cols {
        return Ok(full.narrow(1, k * len / tp, len / tp)?.contiguous()?);
    }
    let parts = rank_rows(split, len, tp, k)
        .into_iter()
        .map(|(a, b)| full.narrow(0, a, b - a))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?.contiguous()?)
}

/// The full tensor from every rank's part (`parts[k]` is rank k's): `shard`'s inverse. A replicated
/// tensor is taken from rank 0.
pub fn merge(parts: &[Tensor], split: Split) -> Result<Tensor> {
    let tp = parts.len();
    let first = parts.first().ok_or_else(|| Error::Layout("merge: no parts".into()))?;
    if tp == 1 || split == Split::Replicated {
        return Ok(first.clone());
    }
    match split {
        Split::Cols => Ok(Tensor::cat(parts, 1)?),
        Split::Rows => Ok(Tensor::cat(parts, 0)?),
        _ => {
            // GluRows: each part is [x1_k | x2_k]; the full tensor is [x1_0 .. x1_{tp-1} | x2_0 ..].
            let half = first.dim(0)? / 2;
            let mut pieces: Vec<Tensor> =
                parts.iter().map(|p| p.narrow(0, 0, half)).collect::<candle_core::Result<_>>()?;
            for p in parts {
                pieces.push(p.narrow(0, half, half)?);
            }
            Ok(Tensor::cat(&pieces, 0)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tensor_has_its_rule() {
        let cfg = Config::glm_130b();
        let rule = |n: &str| split_of(&cfg, n);
        assert_eq!(rule("transformer.word_embeddings.weight"), Split::Rows);
        assert_eq!(rule("transformer.layers.3.attention.query_key_value.bias"), Split::Rows);
        assert_eq!(rule("transformer.layers.3.mlp.dense_h_to_4h.weight"), Split::GluRows);
        assert_eq!(rule("transformer.layers.3.mlp.dense_4h_to_h.weight"), Split::Cols);
        assert_eq!(rule("transformer.layers.3.attention.dense.weight"), Split::Cols);
        assert_eq!(rule("transformer.layers.3.attention.dense.bias"), Split::Replicated);
        assert_eq!(rule("transformer.final_layernorm.weight"), Split::Replicated);
        assert_eq!(split_of(&Config::chatglm_6b(), "transformer.layers.0.mlp.dense_h_to_4h.weight"), Split::Rows);
        // GLM-130B at TP=8: the released per-rank shapes.
        let p = |n: &str, full: &[usize]| rank_shape(rule(n), full, 8);
        assert_eq!(p("transformer.word_embeddings.weight", &[150528, 12288]), vec![18816, 12288]);
        assert_eq!(p("transformer.layers.0.attention.query_key_value.weight", &[36864, 12288]), vec![4608, 12288]);
        assert_eq!(p("transformer.layers.0.attention.dense.weight", &[12288, 12288]), vec![12288, 1536]);
        assert_eq!(p("transformer.layers.0.mlp.dense_h_to_4h.weight", &[65536, 12288]), vec![8192, 12288]);
        assert_eq!(p("transformer.layers.0.mlp.dense_4h_to_h.weight", &[12288, 32768]), vec![12288, 4096]);
        assert!(check_tp(&cfg, 8).is_ok() && check_tp(&cfg, 5).is_err() && check_tp(&cfg, 0).is_err());
    }

    #[test]
    fn shard_then_merge_is_the_identity() -> Result<()> {
        let full = Tensor::arange(0f32, 96., &candle_core::Device::Cpu)?.reshape((8, 12))?;
        for split in [Split::Rows, Split::GluRows, Split::Cols, Split::Replicated] {
            for tp in [1, 2, 4] {
                let parts = (0..tp).map(|k| shard(&full, split, tp, k)).collect::<Result<Vec<_>>>()?;
                for p in &parts {
                    assert_eq!(p.dims(), rank_shape(split, full.dims(), tp).as_slice());
                }
                let back = merge(&parts, split)?;
                assert_eq!(back.to_vec2::<f32>()?, full.to_vec2::<f32>()?, "{split:?} tp {tp}");
            }
        }
        // GluRows at tp 2: rank 1 holds rows 2,3 (of x1) and 6,7 (of x2).
        let r1 = shard(&full, Split::GluRows, 2, 1)?;
        assert_eq!(r1.get(2)?.to_vec1::<f32>()?[0], 72.0);
        assert!(shard(&full, Split::Rows, 3, 0).is_err());
        Ok(())
    }

    #[test]
    fn glu_rows_regroup_halves() {
        // 8 rows = x1 (0..4) | x2 (4..8), 2 ranks: rank 0 holds 0,1,4,5; rank 1 holds 2,3,6,7.
        assert_eq!(rank_rows(Split::GluRows, 8, 2, 0), vec![(0, 2), (4, 6)]);
        assert_eq!(rank_rows(Split::GluRows, 8, 2, 1), vec![(2, 4), (6, 8)]);
        assert_eq!(row_pieces(Split::GluRows, 8, 2, 1, 7), vec![(0, 1, 2), (1, 0, 2), (0, 2, 4), (1, 2, 3)]);
        assert_eq!(row_pieces(Split::Rows, 8, 4, 3, 6), vec![(1, 1, 2), (2, 0, 2)]);
        // Every full row is found exactly once, for every degree and range.
        for split in [Split::Rows, Split::GluRows] {
            for tp in [1, 2, 4] {
                for r0 in 0..16 {
                    for r1 in r0..=16 {
                        let n: usize = row_pieces(split, 16, tp, r0, r1).iter().map(|p| p.2 - p.1).sum();
                        assert_eq!(n, r1 - r0);
                    }
                }
            }
        }
    }
}
