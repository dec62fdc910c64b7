//! Log-probabilities of the tokens a model chose, as OpenAI's `logprobs` report them.
//!
//! A token's log-probability is a log-softmax of its whole logits row in f64: the model's own
//! distribution, before temperature, top-k / top-p and any masking, so it is the number
//! `glm eval` scores with, whatever sampling chose the token. The alternatives listed beside it
//! are the likeliest tokens that could have been generated there (not the layout tokens, nor the
//! ids past the tokenizer's vocabulary).

/// Most alternatives a token may list.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A generated token, its log-probability, and the likeliest alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// Up to the number asked, likeliest first (equal ones by id).
    pub top: Vec<(u32, f32)>,
}

/// log Σ exp(row) in f64: -inf entries count 0, -inf when all are; a NaN makes it NaN (a broken
/// model must not look like a sure one).
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
}

/// log p(token) under one row of logits (-inf for an id outside the row).
pub fn logprob(row: &[f32], token: u32) -> f64 {
    row.get(token as usize).map_or(f64::NEG_INFINITY, |&x| x as f64 - log_sum_exp(row))
}

/// The `k` largest finite entries of `row` as (id, entry - `lse`), largest first, equal ones by id.
/// One pass keeping a sorted list of `k`.
pub fn top_k(row: &[f32], lse: f64, k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &x) in row.iter().enumerate() {
        if !x.is_finite() || (best.len() == k && best.last().is_some_and(|&(_, b)| x <= b)) {
            continue;
        }
        // After every entry not below x: an equal earlier id stays ahead.
        let at = best.partition_point(|&(_, b)| b >= x);
        best.insert(at, (i as u32, x));
        best.truncate(k);
    }
    best.into_iter().map(|(i, x)| (i, (x as f64 - lse) as f32)).collect()
}

/// `top_k` by sorting the whole row: the reference it is tested against.
pub fn top_k_ref(row: &[f32], lse: f64, k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> =
        row.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(i, &x)| (i as u32, x)).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.into_iter().take(k).map(|(i, x)| (i, (x as f64 - lse) as f32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_matches_its_reference_with_ties_and_masked_entries() {
        let mut state = 0x2545_f491_u64;
        for case in 0..200 {
            let n = 1 + case % 300;
            let row: Vec<f32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    match (state >> 33) % 10 {
                        0 => f32::NEG_INFINITY,
                        // few distinct values: many ties
                        r => ((state >> 40) % 7) as f32 * 0.5 - r as f32 * 0.01 * (case % 2) as f32,
                    }
                })
                .collect();
            let lse = log_sum_exp(&row);
            for k in [0, 1, 2, 5, 20, 400] {
                assert_eq!(top_k(&row, lse, k), top_k_ref(&row, lse, k), "case {case}, k {k}");
            }
        }
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let row = [1.0f32, 2.0, f32::NEG_INFINITY, 0.5];
        let p: f64 = (0..4).map(|i| logprob(&row, i).exp()).sum();
        assert!((p - 1.0).abs() < 1e-12, "{p}");
        assert_eq!(logprob(&row, 2), f64::NEG_INFINITY);
        assert_eq!(logprob(&row, 9), f64::NEG_INFINITY);
        let top = top_k(&row, log_sum_exp(&row), 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 0]);
        assert!((top[0].1 as f64 - logprob(&row, 1)).abs() < 1e-6);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY]), f64::NEG_INFINITY);
        assert!(log_sum_exp(&[1.0, f32::NAN]).is_nan());
    }
}
