//! Learning rate and batch size as functions of the samples consumed (Megatron counts samples, not
//! steps, so that a batch ramp does not distort the schedule).

use crate::config::{BatchConfig, OptimConfig};

/// Linear warmup from 0 to `peak`, then cosine decay to `min` at `decay` samples, flat after.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub min: f64,
    pub warmup: u64,
    pub decay: u64,
}

impl LrSchedule {
    /// Zeros in the config are filled from `total_samples` (the samples of the whole run).
    pub fn new(o: &OptimConfig, total_samples: u64) -> Self {
        let decay = if o.decay_samples > 0 { o.decay_samples } else { total_samples.max(1) };
        let warmup = if o.warmup_samples > 0 { o.warmup_samples } else { (total_samples / 100).max(1) };
        Self { peak: o.lr, min: o.lr * o.min_lr_ratio, warmup: warmup.min(decay), decay }
    }

    /// The rate of a step that ends at `samples` consumed (so the first step is not at 0).
    pub fn at(&self, samples: u64) -> f64 {
        if samples <= self.warmup {
            return self.peak * samples as f64 / self.warmup.max(1) as f64;
        }
        if samples >= self.decay {
            return self.min;
        }
        let ratio = (samples - self.warmup) as f64 / (self.decay - self.warmup) as f64;
        self.min + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (self.peak - self.min)
    }
}

/// Global batch (rows) after `consumed` samples: `start + k * increment` with k growing evenly over
/// `ramp_samples`, capped at `global`.
pub fn batch_rows(b: &BatchConfig, consumed: u64) -> usize {
    if b.ramp_start >= b.global || b.ramp_samples == 0 || b.ramp_increment == 0 {
        return b.global;
    }
    let stages = ((b.global - b.ramp_start) / b.ramp_increment).max(1) as u64;
    let per_stage = (b.ramp_samples / stages).max(1);
    let k = (consumed / per_stage) as usize;
    (b.ramp_start + k * b.ramp_increment).min(b.global)
}

/// Samples consumed by `steps` steps under the ramp.
pub fn samples_after(b: &BatchConfig, steps: u64) -> u64 {
    (0..steps).fold(0u64, |acc, _| acc + batch_rows(b, acc) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_floor() {
        let o =
            OptimConfig { lr: 1.0, min_lr_ratio: 0.1, warmup_samples: 10, decay_samples: 110, ..Default::default() };
        let s = LrSchedule::new(&o, 1000);
        assert_eq!(s.at(5), 0.5);
        assert_eq!(s.at(10), 1.0);
        assert!((s.at(60) - 0.55).abs() < 1e-12); // half way down the cosine
        assert_eq!(s.at(110), 0.1);
        assert_eq!(s.at(10_000), 0.1);
    }

    #[test]
    fn batch_ramps_in_increments() {
        let b = BatchConfig { micro_batch: 2, global: 8, ramp_start: 2, ramp_increment: 2, ramp_samples: 30 };
        // 3 stages of 10 samples: 2 until 10 consumed, then 4, 6, then 8.
        assert_eq!(batch_rows(&b, 0), 2);
        assert_eq!(batch_rows(&b, 9), 2);
        assert_eq!(batch_rows(&b, 10), 4);
        assert_eq!(batch_rows(&b, 29), 6);
        assert_eq!(batch_rows(&b, 30), 8);
        assert_eq!(batch_rows(&b, 1_000_000), 8);
        assert_eq!(samples_after(&b, 5), 2 + 2 + 2 + 2 + 2);
        let flat = BatchConfig { ramp_start: 8, ..b };
        assert_eq!(batch_rows(&flat, 0), 8);
    }
}
