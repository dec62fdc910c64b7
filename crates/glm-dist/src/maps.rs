//! Megatron's four conjugate maps (`core/tensor_parallel/mappings.py`), every tensor-parallel
//! collective of the model, each paired with its backward:
//!
//! | map           | forward                      | backward                    |
//! |---------------|------------------------------|-----------------------------|
//! | `copy_to`     | identity                     | all-reduce                  |
//! | `reduce_from` | all-reduce                   | identity                    |
//! | `gather_from` | all-gather the last dim      | keep this rank's chunk      |
//! | `scatter_to`  | keep this rank's chunk       | all-gather the last dim     |
//!
//! A column-parallel linear reads `copy_to(x)`, a row-parallel one ends in `reduce_from`: one
//! all-reduce per sub-block in the forward and one in the backward. With one rank every map is the
//! identity (its `_ref` twin); the tests tie the two.
//!
//! The forward collective runs on tensors (through the communicator, so a device backend keeps
//! them on the device); a candle op then splices its result into the graph with the conjugate
//! backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::registry::Group;
use crate::ReduceOp;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Back {
    Identity,
    AllReduce,
    Chunk,
    GatherLast,
}

/// An op whose forward is `value` (or its input, when `None`; the shapes may differ) and whose
/// backward is `back`.
struct Splice {
    name: &'static str,
    value: Option<Tensor>,
    back: Back,
    group: Group,
}

impl CustomOp1 for Splice {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match &self.value {
            None => Ok((copy_storage(s, l, self.name)?, l.shape().clone())),
            Some(v) => {
                let v = v.contiguous()?;
                let (st, lay) = v.storage_and_layout();
                match &*st {
                    candle_core::Storage::Cpu(c) => Ok((copy_storage(c, lay, self.name)?, v.shape().clone())),
                    _ => candle_core::bail!("{}: the value is not on the CPU", self.name),
                }
            }
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let out = match self.back {
            Back::Identity => g,
            Back::AllReduce => self.group.with(|c| c.all_reduce(&g, ReduceOp::Sum))?,
            Back::Chunk => chunk_last(&g, self.group)?,
            Back::GatherLast => self.group.with(|c| c.all_gather(&g, g.rank() - 1))?,
        };
        Ok(Some(out))
    }
}

/// A contiguous copy of the storage a layout views.
fn copy_storage(s: &CpuStorage, l: &Layout, op: &str) -> candle_core::Result<CpuStorage> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: the input is not contiguous") };
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        _ => candle_core::bail!("{op}: only float tensors cross the tensor-parallel maps"),
    })
}

fn splice(x: &Tensor, name: &'static str, value: Option<Tensor>, back: Back, group: Group) -> crate::Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Splice { name, value, back, group })?)
}

/// This rank's chunk of the last dim.
fn chunk_last(x: &Tensor, group: Group) -> candle_core::Result<Tensor> {
    let (n, last) = (group.size(), x.rank() - 1);
    let len = x.dim(last)?;
    if len % n != 0 {
        candle_core::bail!("cannot split the last dim of {:?} into {n} chunks", x.dims())
    }
    x.narrow(last, group.rank() * len / n, len / n)?.contiguous()
}

/// Identity forward, all-reduce backward: the input of a column-parallel linear.
pub fn copy_to(x: &Tensor, group: Group) -> crate::Result<Tensor> {
    if group.size() == 1 {
        return copy_to_ref(x);
    }
    splice(x, "tp-copy-to", None, Back::AllReduce, group)
}

/// All-reduce forward, identity backward: the output of a row-parallel linear.
pub fn reduce_from(x: &Tensor, group: Group) -> crate::Result<Tensor> {
    if group.size() == 1 {
        return reduce_from_ref(x);
    }
    let sum = group.with(|c| c.all_reduce(&x.detach(), ReduceOp::Sum))?;
    splice(x, "tp-reduce-from", Some(sum), Back::Identity, group)
}

/// All-gather the last dim forward, this rank's chunk backward (full logits for inference).
pub fn gather_from(x: &Tensor, group: Group) -> crate::Result<Tensor> {
    if group.size() == 1 {
        return Ok(x.clone());
    }
    let full = group.with(|c| c.all_gather(&x.detach().contiguous()?, x.rank() - 1))?;
    splice(x, "tp-gather-from", Some(full), Back::Chunk, group)
}

/// This rank's chunk of the last dim forward, all-gather backward.
pub fn scatter_to(x: &Tensor, group: Group) -> crate::Result<Tensor> {
    if group.size() == 1 {
        return Ok(x.clone());
    }
    let own = chunk_last(&x.detach(), group)?;
    splice(x, "tp-scatter-to", Some(own), Back::GatherLast, group)
}

/// The single-rank maps: every one is the identity.
pub fn copy_to_ref(x: &Tensor) -> crate::Result<Tensor> {
    Ok(x.clone())
}

pub fn reduce_from_ref(x: &Tensor) -> crate::Result<Tensor> {
    Ok(x.clone())
}
