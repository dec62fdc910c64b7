//! Beam search with GLM-130B's BeamSearchStrategy rules (spec section 6):
//!
//! - scores are cumulative log-softmax; each step keeps `(max(1, #end tokens) + 1) * beams`
//!   candidates over beams x vocabulary, chosen by score (`deterministic`, what evaluation uses) or
//!   drawn by a seeded multinomial over their softmax (the strategy's default);
//! - a candidate ending in an end token is finished with score `score / ((5 + len) / 6)^lp`, `len`
//!   counting the whole row (context included, as GLM does); at most `beams` finished are kept;
//! - end tokens are banned before `min_new_tokens`; with `no_repeat_ngram = n`, a token that would
//!   repeat an n-gram of the generated tokens is banned;
//! - search stops when the worst kept finished beam beats the best live score normalized one step
//!   further, or at `max_new_tokens` (live beams are then scored as if finished).
//!
//! The model is anything that extends a row by one token and returns the next logits (`Extend`),
//! so the rules are tested on handcrafted distributions and run on GLM through `Decoder`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamConfig {
    pub num_beams: usize,
    pub length_penalty: f64,
    /// 0 turns it off.
    pub no_repeat_ngram: usize,
    pub min_new_tokens: usize,
    pub max_new_tokens: usize,
    /// Top candidates by score (evaluation); otherwise drawn with `seed`.
    pub deterministic: bool,
    pub seed: u64,
}

impl Default for BeamConfig {
    /// GLM-130B's defaults: 4 beams, length penalty 1, no-repeat 3-grams.
    fn default() -> Self {
        Self {
            num_beams: 4,
            length_penalty: 1.0,
            no_repeat_ngram: 3,
            min_new_tokens: 0,
            max_new_tokens: 64,
            deterministic: true,
            seed: 1234,
        }
    }
}

/// A row that can grow by one token.
pub trait Extend: Sized {
    /// A copy of this row with `token` appended, and the logits that follow it.
    fn extend(&self, token: u32) -> Result<(Self, Vec<f32>)>;
}

/// A finished hypothesis: generated tokens (end token excluded) and its normalized score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f64,
    /// Ended with an end token (else it ran out of steps).
    pub finished: bool,
}

struct Live<S> {
    row: S,
    tokens: Vec<u32>,
    score: f64,
    logits: Vec<f32>,
}

fn normalize(score: f64, len: usize, lp: f64) -> f64 {
    score / ((5.0 + len as f64) / 6.0).powf(lp)
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// Tokens that would repeat an n-gram of `gen`.
fn banned_by_ngram(gen: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || gen.len() < n {
        return Vec::new(); // no complete n-gram yet
    }
    let prefix = &gen[gen.len() + 1 - n..];
    (0..=gen.len() - n).filter(|&i| gen[i..i + n - 1] == *prefix).map(|i| gen[i + n - 1]).collect()
}

/// Search from `start` (a row whose next logits are `logits`), `context_len` tokens long so far.
/// `banned` ids are never chosen. Returns the finished hypotheses, best first.
pub fn beam_search<S: Extend>(
    start: S,
    logits: Vec<f32>,
    context_len: usize,
    ends: &[u32],
    banned: &[u32],
    cfg: &BeamConfig,
) -> Result<Vec<Hypothesis>> {
    if cfg.num_beams == 0 || cfg.max_new_tokens == 0 {
        return Err(Error::Sampling("beam search needs num_beams >= 1 and max_new_tokens >= 1".into()));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let keep = (ends.len().max(1) + 1) * cfg.num_beams;
    let mut live = vec![Live { row: start, tokens: Vec::new(), score: 0.0, logits }];
    let mut done: Vec<Hypothesis> = Vec::new();
    for step in 0..cfg.max_new_tokens {
        // Every (beam, token) candidate with its cumulative score.
        let mut cands: Vec<(f64, usize, u32)> = Vec::new();
        for (b, l) in live.iter().enumerate() {
            let mut lp = log_softmax(&l.logits);
            let mut ban: Vec<u32> = banned.to_vec();
            ban.extend(banned_by_ngram(&l.tokens, cfg.no_repeat_ngram));
            if step < cfg.min_new_tokens {
                ban.extend_from_slice(ends);
            }
            for t in ban {
                if let Some(x) = lp.get_mut(t as usize) {
                    *x = f64::NEG_INFINITY;
                }
            }
            cands.extend(lp.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(t, x)| (l.score + x, b, t as u32)));
        }
        if cands.is_empty() {
            break;
        }
        let chosen = if cfg.deterministic {
            cands.sort_by(|a, b| b.0.total_cmp(&a.0));
            cands.truncate(keep);
            cands
        } else {
            draw(&mut cands, keep, &mut rng)
        };
        let mut next = Vec::with_capacity(cfg.num_beams);
        for (score, b, t) in chosen {
            let parent = &live[b];
            if ends.contains(&t) {
                let len = context_len + parent.tokens.len() + 1;
                done.push(Hypothesis {
                    tokens: parent.tokens.clone(),
                    score: normalize(score, len, cfg.length_penalty),
                    finished: true,
                });
            } else if next.len() < cfg.num_beams {
                let (row, logits) = parent.row.extend(t)?;
                let mut tokens = parent.tokens.clone();
                tokens.push(t);
                next.push(Live { row, tokens, score, logits });
            }
        }
        done.sort_by(|a, b| b.score.total_cmp(&a.score));
        done.truncate(cfg.num_beams);
        live = next;
        let Some(best_live) = live.iter().map(|l| l.score).max_by(f64::total_cmp) else { break };
        let len = context_len + step + 2;
        if done.len() == cfg.num_beams
            && done.last().is_some_and(|w| w.score >= normalize(best_live, len, cfg.length_penalty))
        {
            break;
        }
    }
    // Out of steps: live beams count as finished.
    for l in live {
        let len = context_len + l.tokens.len();
        done.push(Hypothesis { score: normalize(l.score, len, cfg.length_penalty), tokens: l.tokens, finished: false });
    }
    done.sort_by(|a, b| b.score.total_cmp(&a.score));
    done.truncate(cfg.num_beams);
    Ok(done)
}

/// `k` candidates drawn without replacement, each with probability softmax(score), best first.
fn draw(cands: &mut Vec<(f64, usize, u32)>, k: usize, rng: &mut ChaCha8Rng) -> Vec<(f64, usize, u32)> {
    let mut out = Vec::with_capacity(k);
    while out.len() < k && !cands.is_empty() {
        let max = cands.iter().fold(f64::NEG_INFINITY, |m, c| m.max(c.0));
        let w: Vec<f64> = cands.iter().map(|c| (c.0 - max).exp()).collect();
        let mut u = rng.random::<f64>() * w.iter().sum::<f64>();
        let mut i = 0;
        while i + 1 < w.len() && u >= w[i] {
            u -= w[i];
            i += 1;
        }
        out.push(cands.swap_remove(i));
    }
    out.sort_by(|a, b| b.0.total_cmp(&a.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handcrafted model over 5 tokens (4 = end): the next distribution depends on the last token.
    #[derive(Clone)]
    struct Table(Vec<u32>);

    fn dist(last: Option<u32>) -> Vec<f32> {
        let p: [f64; 5] = match last {
            None => [0.5, 0.4, 0.05, 0.05, 0.0],      // greedy takes 0 ...
            Some(0) => [0.25, 0.25, 0.25, 0.25, 0.0], // ... which leads nowhere,
            Some(1) => [0.02, 0.02, 0.03, 0.03, 0.9], // while 1 ends with 0.9
            Some(2) => [0.0, 0.0, 0.0, 0.0, 1.0],
            _ => [0.2, 0.2, 0.2, 0.2, 0.2],
        };
        p.iter().map(|&x| x.ln() as f32).collect()
    }

    impl Extend for Table {
        fn extend(&self, token: u32) -> Result<(Self, Vec<f32>)> {
            let mut t = self.0.clone();
            t.push(token);
            Ok((Table(t), dist(Some(token))))
        }
    }

    fn search(cfg: &BeamConfig) -> Result<Vec<Hypothesis>> {
        beam_search(Table(Vec::new()), dist(None), 3, &[4], &[], cfg)
    }

    #[test]
    fn finds_the_best_sequence_greedy_misses() -> Result<()> {
        let cfg = BeamConfig {
            num_beams: 2,
            length_penalty: 0.0,
            no_repeat_ngram: 0,
            max_new_tokens: 5,
            ..Default::default()
        };
        let h = search(&cfg)?;
        assert_eq!(h[0].tokens, vec![1]);
        assert!((h[0].score - (0.4f64.ln() + 0.9f64.ln())).abs() < 1e-6, "{}", h[0].score);
        // One beam is greedy: it takes 0 first and never finds [1].
        let g = search(&BeamConfig { num_beams: 1, ..cfg })?;
        assert_eq!(g[0].tokens[0], 0);
        Ok(())
    }

    #[test]
    fn the_length_penalty_counts_the_whole_row() -> Result<()> {
        let cfg = BeamConfig {
            num_beams: 2,
            length_penalty: 1.0,
            no_repeat_ngram: 0,
            max_new_tokens: 5,
            ..Default::default()
        };
        let h = search(&cfg)?;
        // [1] <end>: a row of 3 context + 2 tokens.
        let want = (0.4f64.ln() + 0.9f64.ln()) / ((5.0 + 5.0) / 6.0);
        assert_eq!(h[0].tokens, vec![1]);
        assert!((h[0].score - want).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn min_length_and_no_repeat_ngrams_are_enforced() -> Result<()> {
        let cfg = BeamConfig {
            num_beams: 2,
            length_penalty: 0.0,
            no_repeat_ngram: 0,
            min_new_tokens: 3,
            max_new_tokens: 6,
            ..Default::default()
        };
        assert!(search(&cfg)?.iter().all(|h| h.tokens.len() >= 3));
        assert_eq!(banned_by_ngram(&[1, 2, 1], 2), vec![2]); // "1 2" would repeat
        assert_eq!(banned_by_ngram(&[1, 2, 3, 1, 2], 3), vec![3]);
        assert!(banned_by_ngram(&[1, 2], 3).is_empty());
        let cfg = BeamConfig { num_beams: 3, no_repeat_ngram: 2, max_new_tokens: 6, ..cfg };
        for h in search(&cfg)? {
            let grams: Vec<&[u32]> = h.tokens.windows(2).collect();
            for (i, g) in grams.iter().enumerate() {
                assert!(!grams[i + 1..].contains(g), "{:?} repeats {g:?}", h.tokens);
            }
        }
        Ok(())
    }

    #[test]
    fn sampled_search_is_reproducible_by_seed() -> Result<()> {
        let cfg = BeamConfig { deterministic: false, num_beams: 2, max_new_tokens: 4, seed: 9, ..Default::default() };
        assert_eq!(search(&cfg)?, search(&cfg)?);
        assert!(search(&BeamConfig { num_beams: 0, ..cfg }).is_err());
        Ok(())
    }
}
