//! Dynamic loss scaling for f16 training, with DeepSpeed's semantics (what GLM-130B ran): the loss is
//! multiplied by `scale` before backward; a step whose gradients hold an inf or NaN is skipped; after
//! `hysteresis` such overflows the scale halves (never below `min`); after `window` overflow-free
//! steps since the last overflow it doubles and the hysteresis is restored.

use serde::{Deserialize, Serialize};

use crate::config::ScalerConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    window: u64,
    hysteresis: u32,
    min: f64,
    /// Overflows left before the next halving.
    cur_hysteresis: u32,
    iter: u64,
    last_overflow: Option<u64>,
}

/// What `update` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleChange {
    Kept,
    Halved,
    Doubled,
}

impl LossScaler {
    pub fn new(c: &ScalerConfig) -> Self {
        Self {
            scale: c.initial,
            window: c.window.max(1),
            hysteresis: c.hysteresis.max(1),
            min: c.min,
            cur_hysteresis: c.hysteresis.max(1),
            iter: 0,
            last_overflow: None,
        }
    }

    /// Record one step. With `overflow` the step must be skipped.
    pub fn update(&mut self, overflow: bool) -> ScaleChange {
        let mut change = ScaleChange::Kept;
        if overflow {
            if self.cur_hysteresis <= 1 {
                let next = (self.scale / 2.0).max(self.min);
                if next < self.scale {
                    change = ScaleChange::Halved;
                }
                self.scale = next;
            } else {
                self.cur_hysteresis -= 1;
            }
            self.last_overflow = Some(self.iter);
        } else {
            let since = match self.last_overflow {
                Some(i) => self.iter - i,
                None => self.iter + 1,
            };
            if since % self.window == 0 {
                self.cur_hysteresis = self.hysteresis;
                self.scale *= 2.0;
                change = ScaleChange::Doubled;
            }
        }
        self.iter += 1;
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_after_hysteresis_and_grows_after_window() {
        let mut s = LossScaler::new(&ScalerConfig { initial: 1024.0, window: 3, hysteresis: 2, min: 1.0 });
        // The first overflow uses up the hysteresis; the second halves.
        assert_eq!(s.update(true), ScaleChange::Kept);
        assert_eq!(s.scale, 1024.0);
        assert_eq!(s.update(true), ScaleChange::Halved);
        assert_eq!(s.scale, 512.0);
        // Three clean steps since the last overflow double it.
        assert_eq!(s.update(false), ScaleChange::Kept);
        assert_eq!(s.update(false), ScaleChange::Kept);
        assert_eq!(s.update(false), ScaleChange::Doubled);
        assert_eq!(s.scale, 1024.0);
        // Hysteresis is back to 2: one overflow keeps the scale again.
        assert_eq!(s.update(true), ScaleChange::Kept);
        let mut m = LossScaler::new(&ScalerConfig { initial: 2.0, window: 100, hysteresis: 1, min: 1.0 });
        assert_eq!(m.update(true), ScaleChange::Halved);
        assert_eq!(m.update(true), ScaleChange::Kept); // floored at min
        assert_eq!(m.scale, 1.0);
    }
}
