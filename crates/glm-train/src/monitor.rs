//! The stability monitor: GLM-130B's team watched loss and gradient norms and, on a spike, rolled
//! back, skipped the data around it and shrank the embedding gradient (EGS) or the learning rate by
//! hand (spec section 4). Here each step's loss and global gradient norm are checked, before the
//! update, against a moving window of the accepted steps, and each event gets a configured policy.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Log the event and apply the update anyway.
    Ignore,
    /// Drop this step's update (the data is consumed).
    Skip,
    /// Restore the last good checkpoint, skip the data of the steps around the event, and multiply
    /// EGS alpha and the learning rate by their factors.
    Rollback,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Accepted steps kept in the moving window.
    pub window: usize,
    /// Steps in the window before spikes are judged.
    pub min_history: usize,
    /// A spike: loss above the window mean by more than `spike_sigma` standard deviations and by more
    /// than `spike_rel` of the mean.
    pub spike_sigma: f64,
    pub spike_rel: f64,
    /// A gradient-norm spike: norm above `grad_spike_factor` times the window median (0 turns it off).
    pub grad_spike_factor: f64,
    pub on_spike: Policy,
    pub on_nan: Policy,
    /// On rollback, the data of the event step and the `skip_steps - 1` steps before it is skipped.
    pub skip_steps: u64,
    pub rollback_lr_factor: f64,
    pub rollback_egs_factor: f64,
    /// More interventions than this stop the run with an error.
    pub max_interventions: u32,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            window: 50,
            min_history: 10,
            spike_sigma: 6.0,
            spike_rel: 0.3,
            grad_spike_factor: 0.0,
            on_spike: Policy::Rollback,
            on_nan: Policy::Skip,
            skip_steps: 5,
            rollback_lr_factor: 0.5,
            rollback_egs_factor: 0.5,
            max_interventions: 20,
        }
    }
}

impl MonitorConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.window == 0 || self.min_history > self.window {
            return Err(format!("monitor: window {} >= min_history {} >= 0", self.window, self.min_history));
        }
        for (n, f) in
            [("rollback_lr_factor", self.rollback_lr_factor), ("rollback_egs_factor", self.rollback_egs_factor)]
        {
            if !(f > 0.0 && f <= 1.0) {
                return Err(format!("monitor.{n} = {f} is outside (0, 1]"));
            }
        }
        if self.skip_steps == 0 {
            return Err("monitor.skip_steps must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The loss or the gradient norm is not finite.
    Nan {
        loss: f64,
        grad_norm: f64,
    },
    LossSpike {
        loss: f64,
        mean: f64,
        std: f64,
    },
    GradSpike {
        grad_norm: f64,
        median: f64,
    },
}

impl Event {
    pub fn describe(&self) -> String {
        match self {
            Event::Nan { loss, grad_norm } => format!("non-finite values (loss {loss}, grad norm {grad_norm})"),
            Event::LossSpike { loss, mean, std } => {
                format!("loss spike {loss:.4} (window mean {mean:.4}, std {std:.4})")
            }
            Event::GradSpike { grad_norm, median } => {
                format!("gradient-norm spike {grad_norm:.3} (window median {median:.3})")
            }
        }
    }
}

/// The moving window; it is part of a checkpoint so that a resumed run judges steps the same way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Monitor {
    losses: VecDeque<f64>,
    norms: VecDeque<f64>,
}

impl Monitor {
    pub fn check(&self, cfg: &MonitorConfig, loss: f64, grad_norm: f64) -> Option<Event> {
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Some(Event::Nan { loss, grad_norm });
        }
        if self.losses.len() < cfg.min_history.max(1) {
            return None;
        }
        let n = self.losses.len() as f64;
        let mean = self.losses.iter().sum::<f64>() / n;
        let std = (self.losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
        if loss - mean > (cfg.spike_sigma * std).max(cfg.spike_rel * mean.abs()) {
            return Some(Event::LossSpike { loss, mean, std });
        }
        if cfg.grad_spike_factor > 0.0 {
            let mut sorted: Vec<f64> = self.norms.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[sorted.len() / 2];
            if grad_norm > cfg.grad_spike_factor * median {
                return Some(Event::GradSpike { grad_norm, median });
            }
        }
        None
    }

    /// Add an accepted step.
    pub fn accept(&mut self, cfg: &MonitorConfig, loss: f64, grad_norm: f64) {
        self.losses.push_back(loss);
        self.norms.push_back(grad_norm);
        while self.losses.len() > cfg.window {
            self.losses.pop_front();
            self.norms.pop_front();
        }
    }

    pub fn policy(cfg: &MonitorConfig, e: &Event) -> Policy {
        match e {
            Event::Nan { .. } => cfg.on_nan,
            _ => cfg.on_spike,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_nan_and_spikes_after_history() {
        let cfg = MonitorConfig { min_history: 5, grad_spike_factor: 10.0, ..Default::default() };
        let mut m = Monitor::default();
        assert!(matches!(m.check(&cfg, f64::NAN, 1.0), Some(Event::Nan { .. })));
        assert!(matches!(m.check(&cfg, 1.0, f64::INFINITY), Some(Event::Nan { .. })));
        assert_eq!(m.check(&cfg, 100.0, 1.0), None); // no history yet
        for i in 0..10 {
            m.accept(&cfg, 4.0 + 0.01 * (i % 3) as f64, 1.0);
        }
        assert_eq!(m.check(&cfg, 4.02, 1.0), None);
        assert!(matches!(m.check(&cfg, 8.0, 1.0), Some(Event::LossSpike { .. })));
        assert!(matches!(m.check(&cfg, 4.0, 50.0), Some(Event::GradSpike { .. })));
        // A slowly falling loss is never a spike.
        assert_eq!(m.check(&cfg, 3.5, 1.0), None);
    }
}
