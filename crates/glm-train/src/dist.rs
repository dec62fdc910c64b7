//! A training step split over tensor- and data-parallel ranks, computing what one process computes.
//!
//! - **Data parallel.** The global batch is the single run's: every rank draws the same
//!   micro-batches from one data order (Megatron's sampler) and DP rank d computes micro-batches
//!   d, d + dp, ... Each micro-batch's loss is weighted by its share of the *global* scored tokens,
//!   so the sum of the ranks' gradients is the single run's gradient.
//! - **Gradient sync in buckets.** The rank's gradients are flattened (parameter order) into buckets
//!   of `bucket` elements, each padded to a multiple of dp. Each bucket is all-reduced, or with
//!   ZeRO-1 reduce-scattered: DP rank d then holds the summed gradient of chunk d of every bucket.
//! - **ZeRO-1.** A rank keeps AdamW moments only for its chunks (8/dp bytes per parameter instead
//!   of 8), updates those elements of the f32 master weights, and the updated chunks are
//!   all-gathered back into every rank's weights.
//! - **Norms.** Squared norms are summed over the ranks' shards; a parameter replicated over the
//!   TP ranks (LayerNorms, row-parallel biases) is counted once, on TP rank 0.

use std::ops::Range;
use std::rc::Rc;

use candle_core::{DType, Tensor, Var};
use glm_dist::{Communicator, Group, ParallelGroups, ReduceOp};
use glm_model::StageSpec;

use crate::optim::{AdamW, AdamWConfig};
use crate::step::{Grads, Params};
use crate::{Error, Result};

/// Default bucket: 2^22 elements (16 MiB of f32), Megatron's order of magnitude.
pub const DEFAULT_BUCKET: usize = 1 << 22;

/// Where this rank sits and how it talks to the others.
pub struct Dist {
    pub groups: ParallelGroups,
    /// The TP group, reachable from inside the model's ops.
    pub tp: Group,
    pub zero: bool,
    pub bucket: usize,
}

impl Dist {
    /// Registers the TP group on the calling thread (the rank's thread).
    pub fn new(groups: ParallelGroups, zero: bool) -> Self {
        let tp = Group::register(Rc::clone(&groups.tp));
        Self { groups, tp, zero, bucket: DEFAULT_BUCKET }
    }

    pub fn tp(&self) -> (usize, usize) {
        (self.groups.tp_rank, self.groups.layout.tp)
    }

    pub fn dp(&self) -> (usize, usize) {
        (self.groups.dp_rank, self.groups.layout.dp)
    }

    /// The first rank of the world: it logs, plots, draws the progress bar and writes shared files.
    pub fn is_main(&self) -> bool {
        self.groups.world.rank() == 0
    }

    pub fn world(&self) -> &dyn Communicator {
        self.groups.world.as_ref()
    }

    pub fn dp_comm(&self) -> &dyn Communicator {
        self.groups.dp.as_ref()
    }

    pub fn tp_comm(&self) -> &dyn Communicator {
        self.groups.tp.as_ref()
    }

    pub fn pp(&self) -> (usize, usize) {
        (self.groups.pp_rank, self.groups.layout.pp)
    }

    pub fn pp_comm(&self) -> &dyn Communicator {
        self.groups.pp.as_ref()
    }

    /// This rank's pipeline stage of a model of `num_layers` layers (balanced, see `StageSpec::plan`).
    pub fn stage(&self, num_layers: usize) -> Result<StageSpec> {
        let (s, p) = self.pp();
        let mut plan = StageSpec::plan(num_layers, p)?;
        Ok(plan.swap_remove(s))
    }

    /// Sums the gradient of the tied word embeddings between the first and last stage (Megatron's
    /// embedding group), so both copies take the same update. Collective over those two stages.
    pub fn sync_tied(&self, cfg: &glm_model::Config, params: &Params, grads: &mut [Tensor]) -> Result<()> {
        let Some(group) = self.groups.embedding.as_ref().filter(|_| cfg.tie_word_embeddings) else { return Ok(()) };
        let name = format!("{}.{}.weight", glm_model::weights::TRANSFORMER, glm_model::weights::WORD_EMBEDDINGS);
        let i = params.names.iter().position(|n| *n == name).ok_or_else(|| {
            Error::Dist(format!("{}: the tied word embeddings are missing from this end of the pipeline", params.stage))
        })?;
        grads[i] = group.all_reduce(&grads[i], ReduceOp::Sum).map_err(comm)?;
        Ok(())
    }
}

/// The parameters' places in the flat gradient buffer, and the chunks this DP rank owns.
pub struct Flat {
    /// Start of each parameter in the flat buffer (parameter order), and its length.
    offsets: Vec<(usize, usize)>,
    /// Bucket ranges of the flat buffer, each padded to a multiple of dp.
    buckets: Vec<Range<usize>>,
    dp: usize,
    rank: usize,
}

impl Flat {
    pub fn new(lens: &[usize], bucket: usize, dp: usize, rank: usize) -> Self {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &n in lens {
            offsets.push((at, n));
            at += n;
        }
        let total = at;
        let bucket = bucket.max(dp).div_ceil(dp) * dp;
        let mut buckets = Vec::new();
        let mut start = 0;
        while start < total {
            let len = bucket.min(total - start).div_ceil(dp) * dp;
            buckets.push(start..start + len);
            start += len;
        }
        Self { offsets, buckets, dp, rank }
    }

    /// Padded length of the flat buffer.
    pub fn padded(&self) -> usize {
        self.buckets.last().map(|b| b.end).unwrap_or(0)
    }

    /// This rank's chunk of each bucket.
    pub fn owned(&self) -> Vec<Range<usize>> {
        self.buckets
            .iter()
            .map(|b| {
                let per = b.len() / self.dp;
                b.start + self.rank * per..b.start + (self.rank + 1) * per
            })
            .collect()
    }

    /// Elements this rank owns.
    pub fn owned_len(&self) -> usize {
        self.buckets.iter().map(|b| b.len() / self.dp).sum()
    }

    /// The pieces of the parameters inside `r`: (parameter, offset in it, flat start, length).
    pub fn pieces(&self, r: &Range<usize>) -> Vec<(usize, usize, usize, usize)> {
        let mut out = Vec::new();
        for (i, &(start, len)) in self.offsets.iter().enumerate() {
            let (lo, hi) = (start.max(r.start), (start + len).min(r.end));
            if lo < hi {
                out.push((i, lo - start, lo, hi - lo));
            }
        }
        out
    }

    /// Tensors flattened into one padded f32 buffer.
    pub fn flatten(&self, tensors: &[Tensor]) -> Result<Vec<f32>> {
        let mut buf = vec![0f32; self.padded()];
        for (t, &(start, len)) in tensors.iter().zip(&self.offsets) {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if v.len() != len {
                return Err(Error::Optim(format!("flatten: a tensor of {} values where {len} were laid out", v.len())));
            }
            buf[start..start + len].copy_from_slice(&v);
        }
        Ok(buf)
    }

    /// The tensors back from a flat buffer, shaped like `like`.
    pub fn unflatten(&self, buf: &[f32], like: &[Var]) -> Result<Vec<Tensor>> {
        like.iter()
            .zip(&self.offsets)
            .map(|(v, &(start, len))| Ok(Tensor::from_slice(&buf[start..start + len], v.shape(), v.device())?))
            .collect()
    }

    /// All-reduce (sum) every bucket of `buf` over `dp`.
    pub fn all_reduce(&self, buf: &mut [f32], dp: &dyn Communicator) -> Result<()> {
        for b in &self.buckets {
            dp.all_reduce_f32(&mut buf[b.clone()], ReduceOp::Sum).map_err(comm)?;
        }
        Ok(())
    }

    /// Reduce-scatter (sum) every bucket: this rank's summed chunks, concatenated.
    pub fn reduce_scatter(&self, buf: &[f32], dp: &dyn Communicator) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.owned_len()];
        let mut at = 0;
        for b in &self.buckets {
            let per = b.len() / self.dp;
            dp.reduce_scatter_f32(&buf[b.clone()], &mut out[at..at + per], ReduceOp::Sum).map_err(comm)?;
            at += per;
        }
        Ok(out)
    }

    /// Every rank's chunks (`mine`, concatenated as `owned` lists them) gathered into the full buffer.
    pub fn all_gather(&self, mine: &[f32], dp: &dyn Communicator) -> Result<Vec<f32>> {
        let mut buf = vec![0f32; self.padded()];
        let mut at = 0;
        for b in &self.buckets {
            let per = b.len() / self.dp;
            dp.all_gather_f32(&mine[at..at + per], &mut buf[b.clone()]).map_err(comm)?;
            at += per;
        }
        Ok(buf)
    }
}

fn comm(e: glm_dist::Error) -> Error {
    Error::Dist(e.to_string())
}

/// Squared gradient norms per group of this rank's shard, replicated-over-TP parameters counted on
/// TP rank 0 only. `grads[i]` is parameter i's (full-rank) gradient.
pub fn shard_sq_norms(grads: &[Tensor], params: &Params, tp_rank: usize) -> Result<Vec<f64>> {
    let mut groups = vec![0f64; params.groups.len()];
    for (i, g) in grads.iter().enumerate() {
        if (params.replicated[i] && tp_rank != 0) || params.tied_copy[i] {
            continue;
        }
        groups[params.group[i]] += sq_sum(g)?;
    }
    Ok(groups)
}

/// Σ x² accumulated in f64: an f32 running sum over a million elements is off by ~1e-5
/// relative, and differently for every way of cutting the tensor.
pub fn sq_sum(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?)
}

/// `shard_sq_norms` of the chunks a ZeRO rank owns (`owned` concatenated as `flat.owned()` lists).
pub fn owned_sq_norms(flat: &Flat, owned: &[f32], params: &Params, tp_rank: usize) -> Vec<f64> {
    let mut groups = vec![0f64; params.groups.len()];
    let mut at = 0;
    for r in flat.owned() {
        for (i, _, start, len) in flat.pieces(&r) {
            if (params.replicated[i] && tp_rank != 0) || params.tied_copy[i] {
                continue;
            }
            let o = at + start - r.start;
            groups[params.group[i]] += owned[o..o + len].iter().map(|&x| x as f64 * x as f64).sum::<f64>();
        }
        at += r.len();
    }
    groups
}

/// AdamW over the chunks of the flat buffer this DP rank owns (ZeRO-1): the same update as
/// `optim::AdamW`, element by element.
pub struct ShardedAdamW {
    cfg: AdamWConfig,
    pub t: u64,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl ShardedAdamW {
    pub fn new(cfg: AdamWConfig, flat: &Flat) -> Self {
        let n = flat.owned_len();
        Self { cfg, t: 0, m: vec![0.0; n], v: vec![0.0; n] }
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> usize {
        4 * (self.m.len() + self.v.len())
    }

    /// One update of the owned elements of `master` from the owned gradients, then every rank's
    /// updated chunks gathered into all master weights.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        flat: &Flat,
        master: &[Var],
        grads: &[f32],
        decay: &[bool],
        lr: f64,
        grad_scale: f64,
        dp: &dyn Communicator,
    ) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let t = self.t as i32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let step = (lr / (1.0 - c.beta1.powi(t))) as f32;
        let inv_bc2_sqrt = (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32;
        let gs = grad_scale as f32;
        // Only the owned elements are read and updated; the rest arrive with the all-gather.
        let mut mine = Vec::with_capacity(flat.owned_len());
        let mut at = 0;
        for r in flat.owned() {
            let mut chunk = vec![0f32; r.len()]; // bucket padding stays 0
            for (i, offset, start, len) in flat.pieces(&r) {
                let keep = if decay[i] { (1.0 - lr * c.weight_decay) as f32 } else { 1.0 };
                let p = master[i].as_tensor().flatten_all()?.narrow(0, offset, len)?.to_vec1::<f32>()?;
                let base = start - r.start;
                for (j, p) in p.into_iter().enumerate() {
                    let k = at + base + j;
                    let g = grads[k] * gs;
                    self.m[k] = b1 * self.m[k] + (1.0 - b1) * g;
                    self.v[k] = b2 * self.v[k] + (1.0 - b2) * g * g;
                    chunk[base + j] = p * keep - step * self.m[k] / (self.v[k].sqrt() * inv_bc2_sqrt + eps);
                }
            }
            mine.extend_from_slice(&chunk);
            at += r.len();
        }
        let all = flat.all_gather(&mine, dp)?;
        for (var, t) in master.iter().zip(flat.unflatten(&all, master)?) {
            var.set(&t)?;
        }
        Ok(())
    }

    /// The moments of every parameter (gathered from the DP ranks), as `optim::AdamW` names them.
    pub fn state_tensors(
        &self,
        flat: &Flat,
        names: &[String],
        master: &[Var],
        dp: &dyn Communicator,
    ) -> Result<Vec<(String, Tensor)>> {
        let (m, v) = (flat.all_gather(&self.m, dp)?, flat.all_gather(&self.v, dp)?);
        let (m, v) = (flat.unflatten(&m, master)?, flat.unflatten(&v, master)?);
        let mut out = Vec::with_capacity(2 * names.len());
        for ((name, m), v) in names.iter().zip(m).zip(v) {
            out.push((format!("exp_avg.{name}"), m));
            out.push((format!("exp_avg_sq.{name}"), v));
        }
        Ok(out)
    }

    /// Takes this rank's chunks of moments saved whole (`get` returns a tensor by name).
    pub fn load_state(
        &mut self,
        flat: &Flat,
        names: &[String],
        get: impl Fn(&str) -> Result<Tensor>,
        t: u64,
    ) -> Result<()> {
        let mut ms = Vec::with_capacity(names.len());
        let mut vs = Vec::with_capacity(names.len());
        for name in names {
            ms.push(get(&format!("exp_avg.{name}"))?);
            vs.push(get(&format!("exp_avg_sq.{name}"))?);
        }
        let (m, v) = (flat.flatten(&ms)?, flat.flatten(&vs)?);
        (self.m, self.v) = (Vec::with_capacity(flat.owned_len()), Vec::with_capacity(flat.owned_len()));
        for r in flat.owned() {
            self.m.extend_from_slice(&m[r.clone()]);
            self.v.extend_from_slice(&v[r]);
        }
        self.t = t;
        Ok(())
    }
}

/// AdamW over every parameter of the rank, or (ZeRO-1) over the chunks its DP rank owns.
pub enum Optimizer {
    Full(AdamW),
    Sharded(ShardedAdamW, Flat),
}

impl Optimizer {
    pub fn new(cfg: AdamWConfig, params: &Params, dist: Option<&Dist>, fused: bool) -> Result<Self> {
        Ok(match dist {
            Some(d) if d.zero => {
                let lens: Vec<usize> = params.master.iter().map(|v| v.elem_count()).collect();
                let (r, n) = d.dp();
                let flat = Flat::new(&lens, d.bucket, n, r);
                Optimizer::Sharded(ShardedAdamW::new(cfg, &flat), flat)
            }
            _ => Optimizer::Full(AdamW::new(cfg, &params.master, fused)?),
        })
    }

    /// Steps taken.
    pub fn t(&self) -> u64 {
        match self {
            Optimizer::Full(o) => o.t,
            Optimizer::Sharded(o, _) => o.t,
        }
    }

    /// One update from this rank's gradients (`owned`: with ZeRO-1, the chunks `sync_grads` returned).
    pub fn step(
        &mut self,
        params: &Params,
        grads: &[Tensor],
        owned: Option<Vec<f32>>,
        lr: f64,
        grad_scale: f64,
        dist: Option<&Dist>,
    ) -> Result<()> {
        match (self, owned, dist) {
            (Optimizer::Full(o), _, _) => o.step(&params.master, grads, &params.decay, lr, grad_scale),
            (Optimizer::Sharded(o, flat), Some(owned), Some(d)) => {
                o.step(flat, &params.master, &owned, &params.decay, lr, grad_scale, d.dp_comm())
            }
            _ => Err(Error::Dist("a ZeRO-1 step needs a data-parallel group and its reduced chunks".into())),
        }
    }

    /// Every parameter's moments, by name (with ZeRO-1 gathered from the DP ranks: collective).
    pub fn state_tensors(&self, params: &Params, dist: Option<&Dist>) -> Result<Vec<(String, Tensor)>> {
        match (self, dist) {
            (Optimizer::Full(o), _) => o.state_tensors(&params.names, &params.master),
            (Optimizer::Sharded(o, flat), Some(d)) => o.state_tensors(flat, &params.names, &params.master, d.dp_comm()),
            (Optimizer::Sharded(..), None) => Err(Error::Dist("ZeRO-1 state without a data-parallel group".into())),
        }
    }

    /// Moments saved whole (`get` returns one by name), after `t` steps.
    pub fn load_state(&mut self, params: &Params, get: impl Fn(&str) -> Result<Tensor>, t: u64) -> Result<()> {
        match self {
            Optimizer::Full(o) => o.load_state(&params.names, get, t),
            Optimizer::Sharded(o, flat) => o.load_state(flat, &params.names, get, t),
        }
    }

    /// Bytes of AdamW state this rank holds (8 per parameter, or 8/dp with ZeRO-1).
    pub fn state_bytes(&self, params: &Params) -> usize {
        match self {
            Optimizer::Full(_) => 8 * params.master.iter().map(|v| v.elem_count()).sum::<usize>(),
            Optimizer::Sharded(o, _) => o.state_bytes(),
        }
    }
}

/// Sums a step over the data-parallel ranks: the loss, and the gradients (all-reduced in buckets;
/// with ZeRO-1 reduce-scattered, returning this rank's chunks).
pub fn sync_grads(dist: Option<&Dist>, opt: &Optimizer, params: &Params, g: &mut Grads) -> Result<Option<Vec<f32>>> {
    let Some(d) = dist else { return Ok(None) };
    let mut loss = [g.loss];
    d.dp_comm().all_reduce_scalars(&mut loss, ReduceOp::Sum).map_err(comm)?;
    g.loss = loss[0];
    match opt {
        Optimizer::Sharded(_, flat) => {
            let buf = flat.flatten(&g.grads)?;
            Ok(Some(flat.reduce_scatter(&buf, d.dp_comm())?))
        }
        Optimizer::Full(_) if d.dp().1 > 1 => {
            let lens: Vec<usize> = g.grads.iter().map(|t| t.elem_count()).collect();
            let flat = Flat::new(&lens, d.bucket, 1, 0);
            let mut buf = flat.flatten(&g.grads)?;
            flat.all_reduce(&mut buf, d.dp_comm())?;
            g.grads = flat.unflatten(&buf, &params.master)?;
            Ok(None)
        }
        Optimizer::Full(_) => Ok(None),
    }
}

/// (global, per group) gradient norms, unscaled, from this rank's squared sums: summed over the
/// tensor-parallel shards, the pipeline stages and, with ZeRO-1, the data-parallel chunks.
pub fn norms(dist: Option<&Dist>, opt: &Optimizer, mut sq: Vec<f64>, scale: f64) -> Result<(f64, Vec<f64>)> {
    if let Some(d) = dist {
        d.tp_comm().all_reduce_scalars(&mut sq, ReduceOp::Sum).map_err(comm)?;
        if d.pp().1 > 1 {
            d.pp_comm().all_reduce_scalars(&mut sq, ReduceOp::Sum).map_err(comm)?;
        }
        if matches!(opt, Optimizer::Sharded(..)) {
            d.dp_comm().all_reduce_scalars(&mut sq, ReduceOp::Sum).map_err(comm)?;
        }
    }
    let global = sq.iter().sum::<f64>().sqrt() / scale;
    Ok((global, sq.into_iter().map(|s| s.sqrt() / scale).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_parameter_once() {
        let lens = [5, 17, 3, 64, 1];
        for dp in [1, 2, 3, 4] {
            for bucket in [1, 8, 30, 1000] {
                let total: usize = (0..dp)
                    .map(|r| {
                        let f = Flat::new(&lens, bucket, dp, r);
                        f.owned().iter().map(|o| f.pieces(o).iter().map(|p| p.3).sum::<usize>()).sum::<usize>()
                    })
                    .sum();
                assert_eq!(total, lens.iter().sum::<usize>(), "dp {dp} bucket {bucket}");
            }
        }
    }
}
