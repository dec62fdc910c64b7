//! One optimizer step's numerics: f32 master weights and their compute-dtype copies, the forward and
//! backward over a step's micro-batches with gradient accumulation, and the gradient norms.
//!
//! The loss of a step is the mean over every scored token of all its micro-batches, so k
//! micro-batches give the gradient of one batch k times larger (each micro-batch's mean is weighted
//! by its share of the step's scored tokens).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use glm_data::Batch;
use glm_dist::split::{shard, split_of, Split};
use glm_dist::{Group, TpFactory};
use glm_model::weights::{param_table, ParamKind};
use glm_model::{Config, Glm, StageSpec, TrainOptions};
use glm_nn::{DenseFactory, LinearFactory};

use crate::{Error, Result};

/// The trainable parameters, in `param_table` order.
pub struct Params {
    pub names: Vec<String>,
    /// f32 master weights (what AdamW updates and checkpoints hold).
    pub master: Vec<Var>,
    /// What the model computes with: the master variables themselves in f32, copies in bf16/f16.
    pub compute: Vec<Var>,
    /// Weight decay applies (not to biases and LayerNorms).
    pub decay: Vec<bool>,
    /// Index into `groups` (embedding, layer.i, final) for per-layer gradient norms.
    pub group: Vec<usize>,
    /// How each tensor is cut over the tensor-parallel ranks (`Replicated`: whole on every rank).
    pub splits: Vec<Split>,
    /// The same on every TP rank (counted once in norms).
    pub replicated: Vec<bool>,
    /// (rank, size) of the tensor-parallel group: the tensors are this rank's shards.
    pub tp: (usize, usize),
    /// The pipeline stage whose tensors these are (the whole model without pipelining).
    pub stage: StageSpec,
    /// The last stage's copy of the tied word embeddings: its gradient is summed with the first
    /// stage's, and it is counted (norms) and saved there.
    pub tied_copy: Vec<bool>,
    pub groups: Vec<String>,
    pub dtype: DType,
}

impl Params {
    /// From f32 tensors by name (as `init_weights` or a checkpoint gives them).
    pub fn new(cfg: &Config, tensors: &HashMap<String, Tensor>, dtype: DType, device: &Device) -> Result<Self> {
        Self::sharded(cfg, tensors, dtype, device, (0, 1), &StageSpec::whole(cfg))
    }

    /// Tensor-parallel rank `tp.0` of `tp.1`'s shards of the full tensors by name, of the
    /// parameters pipeline stage `stage` holds.
    pub fn sharded(
        cfg: &Config,
        tensors: &HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        tp: (usize, usize),
        stage: &StageSpec,
    ) -> Result<Self> {
        glm_dist::split::check_tp(cfg, tp.1).map_err(|e| Error::Config(e.to_string()))?;
        let table = param_table(cfg);
        let mut groups = vec!["embedding".to_string()];
        groups.extend((0..cfg.num_layers).map(|i| format!("layer.{i}")));
        groups.push("final".to_string());
        let mut p = Self {
            names: Vec::new(),
            master: Vec::new(),
            compute: Vec::new(),
            decay: Vec::new(),
            group: Vec::new(),
            splits: Vec::new(),
            replicated: Vec::new(),
            tp,
            stage: stage.clone(),
            tied_copy: Vec::new(),
            groups,
            dtype,
        };
        for spec in table.iter().filter(|s| stage.holds(cfg, &s.name)) {
            let t =
                tensors.get(&spec.name).ok_or_else(|| Error::Checkpoint(format!("missing tensor {}", spec.name)))?;
            if t.dims() != spec.shape.as_slice() {
                return Err(Error::Checkpoint(format!(
                    "tensor {} has shape {:?}, the model needs {:?}",
                    spec.name,
                    t.dims(),
                    spec.shape
                )));
            }
            let split = split_of(cfg, &spec.name);
            let t = shard(t, split, tp.1, tp.0).map_err(|e| Error::Checkpoint(format!("{}: {e}", spec.name)))?;
            let master = Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?;
            let compute =
                if dtype == DType::F32 { master.clone() } else { Var::from_tensor(&master.to_dtype(dtype)?)? };
            p.decay.push(!matches!(spec.kind, ParamKind::NormWeight | ParamKind::NormBias | ParamKind::Bias));
            p.group.push(group_of(&spec.name, cfg.num_layers));
            p.splits.push(split);
            p.replicated.push(split == Split::Replicated);
            p.tied_copy.push(stage.is_tied_copy(cfg, &spec.name));
            p.names.push(spec.name.clone());
            p.master.push(master);
            p.compute.push(compute);
        }
        Ok(p)
    }

    /// A model computing with the `compute` variables: the gradients of its loss are theirs. With
    /// a tensor-parallel group (`tp`), the model of this rank's shards; of this pipeline stage.
    pub fn model(&self, cfg: &Config, tp: Option<Group>) -> Result<Glm> {
        let map: HashMap<String, Tensor> =
            self.names.iter().cloned().zip(self.compute.iter().map(|v| v.as_tensor().clone())).collect();
        let dev = self.master.first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
        let factory: Box<dyn LinearFactory> = match tp {
            Some(g) if g.size() > 1 => {
                Box::new(TpFactory::new(cfg, g, Box::new(DenseFactory)).map_err(|e| Error::Config(e.to_string()))?)
            }
            _ => Box::new(DenseFactory),
        };
        Ok(Glm::new_stage(cfg, VarBuilder::from_tensors(map, self.dtype, &dev), factory.as_ref(), &self.stage)?)
    }

    /// Copy the master weights into the compute copies (after an update or a load).
    pub fn sync_compute(&self) -> Result<()> {
        if self.dtype != DType::F32 {
            for (m, c) in self.master.iter().zip(&self.compute) {
                c.set(&m.to_dtype(self.dtype)?)?;
            }
        }
        Ok(())
    }

    pub fn master_tensors(&self) -> HashMap<String, Tensor> {
        self.names.iter().cloned().zip(self.master.iter().map(|v| v.as_tensor().clone())).collect()
    }

    /// Overwrite the master weights (and compute copies) from tensors by name.
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.names.iter().zip(&self.master) {
            let t = tensors.get(name).ok_or_else(|| Error::Checkpoint(format!("missing tensor {name}")))?;
            if t.dims() != var.dims() {
                return Err(Error::Checkpoint(format!(
                    "tensor {name} has shape {:?}, want {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        self.sync_compute()
    }
}

fn group_of(name: &str, layers: usize) -> usize {
    if name.contains("word_embeddings") {
        return 0;
    }
    match name.split("layers.").nth(1).and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok()) {
        Some(i) if i < layers => 1 + i,
        _ => layers + 1,
    }
}

/// Scored (non-ignored) targets of a batch.
pub fn scored(b: &Batch) -> usize {
    b.rows.iter().map(|r| r.targets.iter().filter(|&&t| t >= 0).count()).sum()
}

/// The flattened positions that have a target, and those targets: only they need logits.
pub(crate) fn scored_rows(b: &Batch, dev: &Device) -> Result<(Tensor, Tensor)> {
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (i, t) in b.rows.iter().flat_map(|r| r.targets.iter()).enumerate() {
        if *t >= 0 {
            rows.push(i as u32);
            targets.push(*t);
        }
    }
    let n = rows.len();
    Ok((Tensor::from_vec(rows, n, dev)?, Tensor::from_vec(targets, n, dev)?))
}

/// A fault to inject into this step's loss (see `FaultConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossFault {
    Scale(f64),
    Nan,
}

/// The accumulated result of a step's micro-batches.
pub struct Grads {
    /// Σ over micro-batches of d(loss * loss_scale)/dθ, in f32, by parameter.
    pub grads: Vec<Tensor>,
    /// The step's loss (mean over its scored tokens), with any injected fault.
    pub loss: f64,
    pub scored: usize,
}

/// Forward and backward over the micro-batches of one step. `train.seed` is combined with the
/// micro-batch index for dropout. Data-parallel rank `dp.0` of `dp.1` computes micro-batches
/// dp.0, dp.0 + dp.1, ...: its gradients and loss are its share of the step's sums.
pub fn forward_backward(
    model: &Glm,
    params: &Params,
    batches: &[Batch],
    train: &TrainOptions,
    loss_scale: f64,
    fault: Option<LossFault>,
    dp: (usize, usize),
) -> Result<Grads> {
    let dev = model.device().clone();
    let total: usize = batches.iter().map(scored).sum();
    let mut acc: Vec<Option<Tensor>> = vec![None; params.compute.len()];
    let mut loss = 0f64;
    for (k, b) in batches.iter().enumerate() {
        let n = scored(b);
        if n == 0 || k % dp.1 != dp.0 {
            continue;
        }
        let (ids, pos, _, layout) = b.tensors(&dev)?;
        let (rows, targets) = scored_rows(b, &dev)?;
        let opts = TrainOptions { seed: glm_nn::dropout::site_seed(&[train.seed, k as u64]), ..*train };
        let logits = model.forward_train(&ids, &pos, &layout, &opts, Some(&rows))?;
        let l = weighted_loss(model, &logits, &targets, n as f64 / total as f64, fault)?;
        loss += l.to_scalar::<f32>()? as f64;
        accumulate(&mut acc, &(l * loss_scale)?.backward()?, params)?;
    }
    Ok(Grads { grads: gathered(acc, params)?, loss, scored: total })
}

/// A micro-batch's loss (f32) weighted by its share of the step's scored tokens, with the fault.
pub(crate) fn weighted_loss(
    model: &Glm,
    logits: &Tensor,
    targets: &Tensor,
    share: f64,
    fault: Option<LossFault>,
) -> Result<Tensor> {
    let l = (model.cross_entropy(&logits.to_dtype(DType::F32)?, targets)? * share)?;
    Ok(match fault {
        Some(LossFault::Scale(f)) => (l * f)?,
        Some(LossFault::Nan) => (l * f64::NAN)?,
        None => l,
    })
}

/// Adds a backward pass's gradients of the compute variables to `acc` (in f32, parameter order).
pub(crate) fn accumulate(
    acc: &mut [Option<Tensor>],
    store: &candle_core::backprop::GradStore,
    params: &Params,
) -> Result<()> {
    for (slot, var) in acc.iter_mut().zip(&params.compute) {
        if let Some(g) = store.get(var.as_tensor()) {
            let g = g.to_dtype(DType::F32)?;
            *slot = Some(match slot.take() {
                Some(a) => (a + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

/// The accumulated gradients, zeros for the parameters no micro-batch reached.
pub(crate) fn gathered(acc: Vec<Option<Tensor>>, params: &Params) -> Result<Vec<Tensor>> {
    acc.into_iter()
        .zip(&params.master)
        .map(|(g, m)| match g {
            Some(g) => Ok(g),
            None => Ok(m.zeros_like()?),
        })
        .collect()
}

/// Gradient norms, unscaled by `loss_scale`: (global, per group).
pub fn grad_norms(grads: &[Tensor], params: &Params, loss_scale: f64) -> Result<(f64, Vec<f64>)> {
    let groups = crate::dist::shard_sq_norms(grads, params, 0)?;
    let global = groups.iter().sum::<f64>().sqrt() / loss_scale;
    Ok((global, groups.into_iter().map(|s| s.sqrt() / loss_scale).collect()))
}
