//! Pipeline stages: the run of layers one stage holds, the word embeddings on the first stage and
//! the final LayerNorm and head on the last (the tied embedding table also there, as Megatron's
//! `word_embeddings_for_head`).
//!
//! [`StageSpec::plan`] balances the layers as GLM-130B did for 70 layers on 8 stages: the layers
//! that do not divide evenly go to the middle stages first, so the ends, which also run the
//! embedding and the head, get fewer (8, 9, 9, 9, 9, 9, 9, 8).

use std::ops::Range;

use crate::config::Config;
use crate::weights::{FINAL_LAYERNORM, LAYERS, LM_HEAD, TRANSFORMER, WORD_EMBEDDINGS};
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    /// This stage's index, 0-based, of `stages`.
    pub index: usize,
    pub stages: usize,
    /// The model's layers this stage runs (global indices).
    pub layers: Range<usize>,
}

impl StageSpec {
    /// The whole model as one stage.
    pub fn whole(cfg: &Config) -> Self {
        Self { index: 0, stages: 1, layers: 0..cfg.num_layers }
    }

    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.stages
    }

    /// `stages` stages over `num_layers` layers, balanced (see the module doc); every stage gets
    /// at least one layer.
    pub fn plan(num_layers: usize, stages: usize) -> Result<Vec<StageSpec>> {
        if stages == 0 || num_layers < stages {
            return Err(Error::Config(format!(
                "{num_layers} layers cannot be split into {stages} pipeline stages (each stage needs a layer)"
            )));
        }
        let (base, mut extra) = (num_layers / stages, num_layers % stages);
        let mut counts = vec![base; stages];
        // Middle stages first, then the first stage, then the last.
        let order: Vec<usize> = (1..stages.saturating_sub(1)).chain([0, stages - 1]).collect();
        for &s in order.iter().cycle() {
            if extra == 0 {
                break;
            }
            counts[s] += 1;
            extra -= 1;
        }
        Self::from_counts(num_layers, &counts)
    }

    /// Stages holding `counts[s]` layers each (an uneven split chosen by hand).
    pub fn from_counts(num_layers: usize, counts: &[usize]) -> Result<Vec<StageSpec>> {
        if counts.is_empty() || counts.contains(&0) || counts.iter().sum::<usize>() != num_layers {
            return Err(Error::Config(format!(
                "pipeline stages of {counts:?} layers do not cover the model's {num_layers} layers \
                 (every stage needs at least one)"
            )));
        }
        let mut at = 0;
        Ok(counts
            .iter()
            .enumerate()
            .map(|(index, &n)| {
                at += n;
                StageSpec { index, stages: counts.len(), layers: at - n..at }
            })
            .collect())
    }

    /// Whether this stage holds the parameter `name` (a `param_table` name).
    pub fn holds(&self, cfg: &Config, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(&format!("{TRANSFORMER}.")) else {
            return name.starts_with(LM_HEAD) && self.is_last();
        };
        if rest.starts_with(WORD_EMBEDDINGS) {
            return self.is_first() || (self.is_last() && cfg.tie_word_embeddings);
        }
        if rest.starts_with(FINAL_LAYERNORM) {
            return self.is_last();
        }
        match rest.strip_prefix(&format!("{LAYERS}.")).and_then(|r| r.split('.').next()?.parse::<usize>().ok()) {
            Some(i) => self.layers.contains(&i),
            None => false,
        }
    }

    /// The tied embedding table on the last stage: a copy of the first stage's, whose gradient
    /// is summed with it and which is counted once (on the first stage) in norms and files.
    pub fn is_tied_copy(&self, cfg: &Config, name: &str) -> bool {
        self.stages > 1
            && self.is_last()
            && cfg.tie_word_embeddings
            && name.strip_prefix(&format!("{TRANSFORMER}.")).is_some_and(|r| r.starts_with(WORD_EMBEDDINGS))
    }
}

impl std::fmt::Display for StageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stage {} of {}: layers {}..{}", self.index, self.stages, self.layers.start, self.layers.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::param_table;

    #[test]
    fn glm130b_split_and_every_parameter_on_one_stage() -> Result<()> {
        let counts =
            |l, p| -> Result<Vec<usize>> { Ok(StageSpec::plan(l, p)?.iter().map(|s| s.layers.len()).collect()) };
        assert_eq!(counts(70, 8)?, vec![8, 9, 9, 9, 9, 9, 9, 8]);
        assert_eq!(counts(4, 2)?, vec![2, 2]);
        assert_eq!(counts(5, 2)?, vec![3, 2]);
        assert_eq!(counts(6, 4)?, vec![1, 2, 2, 1]);
        assert_eq!(counts(7, 4)?, vec![2, 2, 2, 1]);
        assert!(StageSpec::plan(2, 4).is_err());
        assert!(StageSpec::from_counts(4, &[1, 2]).is_err());
        assert!(StageSpec::from_counts(4, &[4, 0]).is_err());
        for cfg in [Config::tiny(), Config { tie_word_embeddings: false, ..Config::tiny() }] {
            let stages = StageSpec::plan(cfg.num_layers, 2)?;
            for spec in param_table(&cfg) {
                let holders: Vec<usize> = stages
                    .iter()
                    .filter(|s| s.holds(&cfg, &spec.name) && !s.is_tied_copy(&cfg, &spec.name))
                    .map(|s| s.index)
                    .collect();
                assert_eq!(holders.len(), 1, "{} held by {holders:?}", spec.name);
            }
            let last = &stages[1];
            assert_eq!(last.holds(&cfg, "transformer.word_embeddings.weight"), cfg.tie_word_embeddings);
        }
        Ok(())
    }
}
