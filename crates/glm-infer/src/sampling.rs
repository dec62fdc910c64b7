//! Next-token choice, in the order of the spec's BaseStrategy (section 6): logits / temperature ->
//! top-k (keep every logit >= the k-th largest) -> top-p (sorted cumulative softmax, keeping the
//! first token that crosses p) -> f32 softmax -> one multinomial draw from a seeded ChaCha8 stream,
//! so a seed gives the same tokens on every machine. Greedy (argmax) when temperature is 0 or
//! top_k is 1.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Logits are divided by it; 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (ties included); 0 turns it off, 1 is greedy.
    pub top_k: usize,
    /// Nucleus: keep the most likely tokens up to and including the first whose cumulative
    /// probability exceeds p; 0 (or 1 and above) turns it off.
    pub top_p: f64,
    pub seed: u64,
    /// Most tokens generated per blank, the end token not counted.
    pub max_new_tokens: usize,
    /// End tokens are banned until this many tokens are generated (GLM's `min_gen_length`).
    pub min_new_tokens: usize,
}

impl Default for SamplingConfig {
    /// GLM-130B's scripts/generate.sh: T = 1, top_k off, top_p 0.7, seed 1234.
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 0.7, seed: 1234, max_new_tokens: 256, min_new_tokens: 0 }
    }
}

impl SamplingConfig {
    /// Argmax decoding (what evaluation uses).
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { temperature: 0.0, top_k: 1, top_p: 0.0, seed: 0, max_new_tokens, min_new_tokens: 0 }
    }

    /// Argmax: temperature below [`GREEDY_BELOW`], or top_k 1.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW || self.top_k == 1
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Sampling(format!("temperature must be finite and >= 0, got {}", self.temperature)));
        }
        if !(self.top_p >= 0.0 && self.top_p.is_finite()) {
            return Err(Error::Sampling(format!("top_p must be finite and >= 0, got {}", self.top_p)));
        }
        Ok(())
    }
}

/// Temperatures below this decode greedily (argmax), as common servers treat near-zero ones: the
/// distribution is one-hot in the limit, and dividing logits by a tinier temperature overflows f32
/// (1e-40) or, cast to f32, divides by nothing at all (1e-300 becomes 0).
pub const GREEDY_BELOW: f64 = 1e-5;

/// The sampling parameters a user sets (`glm generate` flags, API fields), checked the same way
/// everywhere, with the same messages: temperature in [0, 2] (below [`GREEDY_BELOW`]: greedy),
/// top_p in (0, 1] (1: off, OpenAI's convention). Returns the config's `top_p` (0: off).
pub fn check_user_params(temperature: f64, top_p: f64) -> Result<f64> {
    if !(0.0..=2.0).contains(&temperature) {
        return Err(Error::Sampling(format!("temperature must be in [0, 2], got {temperature}")));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Error::Sampling(format!("top_p must be in (0, 1] (1: off), got {top_p}")));
    }
    Ok(if top_p >= 1.0 { 0.0 } else { top_p })
}

/// Index of the largest logit (the first one on ties); None when every logit is NaN or there are none.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if !x.is_nan() && best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
}

/// Sets every logit below the k-th largest to -inf (ties with it stay). k = 0 or k >= len: no-op.
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted = logits.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    logits.iter_mut().filter(|x| **x < kth).for_each(|x| *x = f32::NEG_INFINITY);
}

/// Keeps the most likely tokens up to and including the first whose cumulative probability exceeds
/// p (SAT's `top_p` filter: the token that crosses p stays); the rest become -inf. p <= 0 or >= 1:
/// no-op.
pub fn top_p_filter(logits: &mut [f32], p: f64) {
    if p <= 0.0 || p >= 1.0 || logits.is_empty() {
        return;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let probs = softmax(&order.iter().map(|&i| logits[i]).collect::<Vec<_>>());
    let mut cum = 0.0f64;
    let mut keep = order.len();
    for (n, &q) in probs.iter().enumerate() {
        cum += q as f64;
        if cum > p {
            keep = n + 1;
            break;
        }
    }
    order[keep..].iter().for_each(|&i| logits[i] = f32::NEG_INFINITY);
}

/// f32 softmax; -inf logits get probability 0.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

/// The distribution a sampling (non-greedy) step draws from: temperature, top-k, top-p, softmax.
pub fn distribution(logits: &[f32], cfg: &SamplingConfig) -> Vec<f32> {
    let t = cfg.temperature as f32;
    let mut l: Vec<f32> = logits.iter().map(|&x| if t > 0.0 { x / t } else { x }).collect();
    top_k_filter(&mut l, cfg.top_k);
    top_p_filter(&mut l, cfg.top_p);
    softmax(&l)
}

/// Chooses tokens from logits, deterministic for a given config (seed included).
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(cfg: &SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg: *cfg, rng: ChaCha8Rng::seed_from_u64(cfg.seed) })
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.cfg
    }

    /// The next token for `logits` over the vocabulary.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.iter().any(|x| x.is_nan()) || logits.iter().all(|&x| x == f32::NEG_INFINITY) {
            return Err(Error::BadLogits(format!("{} logits with NaN, or all -inf", logits.len())));
        }
        if self.cfg.is_greedy() {
            return argmax(logits).map(|i| i as u32).ok_or_else(|| Error::BadLogits("no logits".into()));
        }
        let probs = distribution(logits, &self.cfg);
        let total: f64 = probs.iter().map(|&p| p as f64).sum();
        if !(total > 0.0 && total.is_finite()) {
            return Err(Error::BadLogits(format!("the sampling distribution sums to {total}")));
        }
        let u = self.rng.random::<f64>() * total;
        let mut cum = 0.0f64;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                cum += p as f64;
                last = i;
                if u < cum {
                    return Ok(i as u32);
                }
            }
        }
        Ok(last as u32) // u within rounding of the total: the last token with mass
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ln of probabilities [0.15, 0.5, 0.05, 0.3]: sorted 0.5, 0.3, 0.15, 0.05.
    fn logits() -> Vec<f32> {
        [0.15f32, 0.5, 0.05, 0.3].iter().map(|p| p.ln()).collect()
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn top_p_keeps_the_token_that_crosses_p() {
        let cfg =
            |top_p| SamplingConfig { temperature: 1.0, top_k: 0, top_p, seed: 0, max_new_tokens: 1, min_new_tokens: 0 };
        // 0.5 alone is not over 0.45: keep it only.
        assert!(close(&distribution(&logits(), &cfg(0.45)), &[0.0, 1.0, 0.0, 0.0]));
        // 0.5 < 0.7, 0.5 + 0.3 crosses it: keep both, renormalized.
        assert!(close(&distribution(&logits(), &cfg(0.7)), &[0.0, 0.625, 0.0, 0.375]));
        // 0.95 crosses 0.85: keep three.
        assert!(close(&distribution(&logits(), &cfg(0.85)), &[0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95]));
        // Off at 0 and 1.
        for p in [0.0, 1.0] {
            assert!(close(&distribution(&logits(), &cfg(p)), &[0.15, 0.5, 0.05, 0.3]));
        }
    }

    #[test]
    fn top_k_and_temperature() {
        let cfg =
            SamplingConfig { temperature: 1.0, top_k: 2, top_p: 0.0, seed: 0, max_new_tokens: 1, min_new_tokens: 0 };
        assert!(close(&distribution(&logits(), &cfg), &[0.0, 0.625, 0.0, 0.375]));
        // top_k 1 through the sampling path is one-hot on the argmax.
        assert!(close(&distribution(&logits(), &SamplingConfig { top_k: 1, ..cfg }), &[0.0, 1.0, 0.0, 0.0]));
        // Ties with the k-th largest stay.
        let mut l = vec![1.0, 3.0, 3.0, 2.0];
        top_k_filter(&mut l, 1);
        assert_eq!(l, vec![f32::NEG_INFINITY, 3.0, 3.0, f32::NEG_INFINITY]);
        // Temperature 0.5 squares the probabilities (then renormalizes).
        let d = distribution(&logits(), &SamplingConfig { temperature: 0.5, top_k: 0, ..cfg });
        let sq: f32 = [0.15f32, 0.5, 0.05, 0.3].iter().map(|p| p * p).sum();
        assert!(close(&d, &[0.0225 / sq, 0.25 / sq, 0.0025 / sq, 0.09 / sq]));
    }

    #[test]
    fn tiny_temperatures_are_greedy_and_small_ones_stay_finite() {
        // Logits where sampling at T = 1 would often pick another token than the argmax.
        // Logits 0.02 apart, shuffled: at T = 1e-3 the runner-up is e^-20 as likely as the best.
        let l: Vec<f32> = (0..50).map(|i| ((i * 7) % 50) as f32 * 0.02).collect();
        let best = argmax(&l).unwrap() as u32;
        for t in [0.0, 1e-300, 1e-40, 1e-8, 9.9e-6] {
            let cfg =
                SamplingConfig { temperature: t, top_k: 0, top_p: 0.0, seed: 3, max_new_tokens: 1, min_new_tokens: 0 };
            let mut s = Sampler::new(&cfg).unwrap();
            assert!(cfg.is_greedy(), "{t}");
            assert!((0..20).all(|_| s.sample(&l).unwrap() == best), "temperature {t}");
        }
        for t in [1e-5, 1e-4, 1e-3, 0.5, 1.0, 2.0] {
            let cfg =
                SamplingConfig { temperature: t, top_k: 0, top_p: 0.9, seed: 3, max_new_tokens: 1, min_new_tokens: 0 };
            let d = distribution(&l, &cfg);
            let total: f32 = d.iter().sum();
            assert!(
                d.iter().all(|p| p.is_finite() && *p >= 0.0) && (total - 1.0).abs() < 1e-4,
                "temperature {t}: {total}"
            );
            let (mut a, mut b) = (Sampler::new(&cfg).unwrap(), Sampler::new(&cfg).unwrap());
            let x: Vec<u32> = (0..30).map(|_| a.sample(&l).unwrap()).collect();
            assert!(x.iter().all(|&t| b.sample(&l).unwrap() == t), "temperature {t}: not deterministic");
            if t <= 1e-3 {
                assert!(x.iter().all(|&t| t == best), "temperature {t}: nearly greedy");
            }
        }
        // What a user may set, checked in one place.
        assert_eq!(check_user_params(1e-300, 1.0).unwrap(), 0.0);
        assert_eq!(check_user_params(0.7, 0.9).unwrap(), 0.9);
        for (t, p, want) in [
            (2.5, 1.0, "temperature"),
            (-1.0, 1.0, "temperature"),
            (f64::NAN, 1.0, "temperature"),
            (1.0, 0.0, "top_p"),
            (1.0, 2.0, "top_p"),
            (1.0, f64::NAN, "top_p"),
        ] {
            let e = check_user_params(t, p).unwrap_err().to_string();
            assert!(e.contains(want), "{t} {p}: {e}");
        }
    }

    #[test]
    fn draws_follow_the_distribution_and_the_seed() {
        let cfg =
            SamplingConfig { temperature: 1.0, top_k: 0, top_p: 0.0, seed: 42, max_new_tokens: 1, min_new_tokens: 0 };
        let mut s = Sampler::new(&cfg).unwrap();
        let n = 20_000;
        let mut counts = [0usize; 4];
        let draws: Vec<u32> = (0..n).map(|_| s.sample(&logits()).unwrap()).collect();
        draws.iter().for_each(|&t| counts[t as usize] += 1);
        for (c, p) in counts.iter().zip([0.15, 0.5, 0.05, 0.3]) {
            assert!((*c as f64 / n as f64 - p).abs() < 0.015, "{counts:?}");
        }
        let mut again = Sampler::new(&cfg).unwrap();
        assert!(draws.iter().all(|&t| again.sample(&logits()).unwrap() == t));
        // Greedy: the first maximum.
        let mut g = Sampler::new(&SamplingConfig::greedy(1)).unwrap();
        assert_eq!(g.sample(&[1.0, 4.0, 4.0, -1.0]).unwrap(), 1);
        assert!(g.sample(&[f32::NAN, 1.0]).is_err());
        assert!(g.sample(&[f32::NEG_INFINITY; 3]).is_err());
        assert!(Sampler::new(&SamplingConfig { top_p: f64::NAN, ..cfg }).is_err());
    }
}
