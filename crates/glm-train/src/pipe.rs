//! A training step over pipeline stages: the step's micro-batches run through the stages in
//! Megatron's 1F1B order (`glm_dist::pipeline`), hidden states sent forward and their gradients
//! back between neighbouring stages. A stage's backward is seeded with the gradient it received
//! (`Σ y·dy` differentiated gives `dy` for y), the last stage's with its scaled loss. Each stage
//! accumulates the gradients of its own parameters over the micro-batches, in the order the
//! single process does; the data-parallel reduction comes after the last micro-batch.

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor, Var};
use glm_data::Batch;
use glm_dist::pipeline::{execute, ExecStats, Stage};
use glm_dist::ReduceOp;
use glm_model::{Glm, StageInput, TrainOptions};

use crate::dist::Dist;
use crate::step::{accumulate, gathered, scored, scored_rows, weighted_loss, Grads, LossFault, Params};
use crate::{Error, Result};

/// A micro-batch between its forward and its backward on this stage.
struct Held {
    /// The received hidden states, as a variable to read their gradient from (not on stage 0).
    input: Option<Var>,
    /// What the forward produced: hidden states, or on the last stage the weighted loss.
    out: Tensor,
}

struct TrainStage<'a> {
    model: &'a Glm,
    params: &'a Params,
    /// (index in the step, batch) of the micro-batches this pipeline runs.
    batches: Vec<(usize, &'a Batch)>,
    train: &'a TrainOptions,
    loss_scale: f64,
    fault: Option<LossFault>,
    /// Scored tokens of the whole step (every micro-batch's loss is weighted by its share).
    total: usize,
    held: HashMap<usize, Held>,
    /// The most micro-batches held at once, as it happened.
    peak: usize,
    acc: Vec<Option<Tensor>>,
    loss: f64,
}

fn stage_err(e: impl std::fmt::Display) -> glm_dist::Error {
    glm_dist::Error::Stage(e.to_string())
}

impl TrainStage<'_> {
    fn run_forward(&mut self, mb: usize, input: Option<Tensor>) -> Result<Tensor> {
        let (k, b) = self.batches[mb];
        let dev = self.model.device().clone();
        let (ids, pos, _, layout) = b.tensors(&dev)?;
        let opts = TrainOptions { seed: glm_nn::dropout::site_seed(&[self.train.seed, k as u64]), ..*self.train };
        let input = input.map(|t| Var::from_tensor(&t)).transpose()?;
        let from = match &input {
            Some(v) => StageInput::Hidden(v.as_tensor()),
            None => StageInput::Ids(&ids),
        };
        let out = if self.model.stage().is_last() {
            let (rows, targets) = scored_rows(b, &dev)?;
            let logits = self.model.forward_stage(from, &pos, &layout, Some(&opts), Some(&rows))?;
            let share = scored(b) as f64 / self.total as f64;
            let l = weighted_loss(self.model, &logits, &targets, share, self.fault)?;
            self.loss += l.to_scalar::<f32>()? as f64;
            l
        } else {
            self.model.forward_stage(from, &pos, &layout, Some(&opts), None)?
        };
        self.held.insert(mb, Held { input, out: out.clone() });
        self.peak = self.peak.max(self.held.len());
        Ok(out)
    }

    fn run_backward(&mut self, mb: usize, grad: Option<Tensor>) -> Result<Option<Tensor>> {
        let h =
            self.held.remove(&mb).ok_or_else(|| Error::Dist(format!("micro-batch {mb}: backward before forward")))?;
        let store = match grad {
            None => (h.out * self.loss_scale)?.backward()?,
            // d/dy Σ y·dy = dy (in f32, so the seed's value cannot overflow in f16).
            Some(dy) => (h.out.to_dtype(DType::F32)? * dy.to_dtype(DType::F32)?)?.sum_all()?.backward()?,
        };
        accumulate(&mut self.acc, &store, self.params)?;
        match h.input {
            None => Ok(None),
            Some(v) => Ok(Some(match store.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.zeros_like()?,
            })),
        }
    }
}

impl Stage for TrainStage<'_> {
    fn forward(&mut self, mb: usize, input: Option<Tensor>) -> glm_dist::Result<Tensor> {
        self.run_forward(mb, input).map_err(stage_err)
    }

    fn backward(&mut self, mb: usize, grad: Option<Tensor>) -> glm_dist::Result<Option<Tensor>> {
        self.run_backward(mb, grad).map_err(stage_err)
    }
}

/// `step::forward_backward` on one pipeline stage: this data-parallel rank's micro-batches (d,
/// d + dp, ...) through the stages in 1F1B order. Every stage returns the step's loss (summed
/// from the last stage) and its own parameters' gradients; the tied embedding's gradient is
/// summed between the two ends.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    model: &Glm,
    params: &Params,
    batches: &[Batch],
    train: &TrainOptions,
    loss_scale: f64,
    fault: Option<LossFault>,
    dist: &Dist,
) -> Result<(Grads, ExecStats)> {
    let (d, dp) = dist.dp();
    let total: usize = batches.iter().map(scored).sum();
    let mine: Vec<(usize, &Batch)> = batches.iter().enumerate().filter(|(k, b)| k % dp == d && scored(b) > 0).collect();
    let (s, p) = dist.pp();
    let hidden = model.config().hidden_size;
    let shapes: Vec<Shape> = mine.iter().map(|(_, b)| Shape::from((b.rows.len(), b.seq_len, hidden))).collect();
    let mut stage = TrainStage {
        model,
        params,
        batches: mine,
        train,
        loss_scale,
        fault,
        total,
        held: HashMap::new(),
        peak: 0,
        acc: vec![None; params.compute.len()],
        loss: 0.0,
    };
    let dev: Device = model.device().clone();
    let m = stage.batches.len();
    let mut stats = execute(dist.pp_comm(), m, &|mb| shapes[mb].clone(), params.dtype, &dev, &mut stage)
        .map_err(|e| Error::Dist(format!("pipeline stage {s} of {p}: {e}")))?;
    // What the stage held, counted as it ran, against 1F1B's bound warmup + 1.
    let bound = (p - s).min(m);
    if stage.peak > bound {
        return Err(Error::Dist(format!(
            "pipeline stage {s} of {p} held {} micro-batches, 1F1B's bound is {bound}",
            stage.peak
        )));
    }
    stats.max_held = stage.peak;
    let mut loss = [stage.loss];
    dist.pp_comm().all_reduce_scalars(&mut loss, ReduceOp::Sum).map_err(|e| Error::Dist(e.to_string()))?;
    let mut grads = gathered(stage.acc, params)?;
    dist.sync_tied(model.config(), params, &mut grads)?;
    Ok((Grads { grads, loss: loss[0], scored: total }, stats))
}

/// Σ cross entropy over the scored tokens of `b` (no dropout, no gradient), the batch run through
/// the stages one after another; every stage returns the sum.
pub fn score(model: &Glm, b: &Batch, dist: &Dist) -> Result<f64> {
    let (s, p) = dist.pp();
    let pp = dist.pp_comm();
    let dev = model.device().clone();
    let (ids, pos, targets, layout) = b.tensors(&dev)?;
    let comm = |e: glm_dist::Error| Error::Dist(format!("pipeline stage {s} of {p}: {e}"));
    let shape = Shape::from((b.rows.len(), b.seq_len, model.config().hidden_size));
    let input = if s > 0 { Some(pp.recv(&shape, model.dtype(), &dev, s - 1).map_err(comm)?) } else { None };
    let from = match &input {
        Some(h) => StageInput::Hidden(h),
        None => StageInput::Ids(&ids),
    };
    let out = model.forward_stage(from, &pos, &layout, None, None)?;
    let mut sum = [0f64];
    if s + 1 < p {
        pp.send(&out, s + 1).map_err(comm)?;
    } else {
        let logits = out.to_dtype(DType::F32)?;
        sum[0] = model.cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64 * scored(b) as f64;
    }
    pp.all_reduce_scalars(&mut sum, ReduceOp::Sum).map_err(comm)?;
    Ok(sum[0])
}
