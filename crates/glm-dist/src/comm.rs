//! The communicator: what every backend (in-process threads, MPI, later NCCL) provides, and the
//! tensor-level collectives built on it.
//!
//! Communicators are not `Send`: an MPI or NCCL handle belongs to the thread that made it. Code that
//! must reach the communicator from inside a candle op (the tensor-parallel maps) goes through a
//! [`crate::registry::Group`] handle, which is `Send + Sync` and looks the communicator up on the
//! calling thread.
//!
//! The required methods move host f32 buffers and bytes; the provided ones lift them to tensors.
//! A device backend (NCCL) overrides the tensor methods to stay on the device.

use candle_core::{DType, Device, Shape, Tensor};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

pub trait Communicator {
    /// This process's (or thread's) rank in the group, 0..size.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// "local" or "mpi": for messages and reports.
    fn backend(&self) -> &'static str;

    /// Every rank's `buf` becomes the elementwise reduction of all ranks' `buf` (same length on all).
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// `all_reduce_f32` in f64 (norms and losses agreed by all ranks).
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()>;
    /// `recv` (size() * send.len()) becomes the ranks' `send` buffers concatenated in rank order.
    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// `send` (size() * recv.len()) is reduced over ranks; rank r keeps block r in `recv`.
    fn reduce_scatter_f32(&self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()>;
    /// Rank `root`'s bytes replace every rank's `buf` (whose length may differ before the call).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// One batched exchange, deadlock-free whatever the order the ranks call it in: send `send.0`
    /// to rank `send.1` and, at the same time, receive one message from rank `recv`.
    fn send_recv_bytes(&self, send: Option<(&[u8], usize)>, recv: Option<usize>) -> Result<Option<Vec<u8>>>;
    fn barrier(&self) -> Result<()>;
    /// Sub-groups: the ranks that pass the same `color` form one group, ordered by `key` (then by
    /// rank). Every rank of this group must call it.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>>;

    // ---- provided ------------------------------------------------------------------------------

    fn send_bytes(&self, data: &[u8], dst: usize) -> Result<()> {
        self.send_recv_bytes(Some((data, dst)), None).map(|_| ())
    }

    fn recv_bytes(&self, src: usize) -> Result<Vec<u8>> {
        self.send_recv_bytes(None, Some(src))?
            .ok_or_else(|| Error::Comm(format!("rank {}: no message received from rank {src}", self.rank())))
    }

    /// Elementwise reduction of a tensor over the group (any float dtype; reduced in f32).
    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(t.clone());
        }
        let mut host = to_host(t)?;
        self.all_reduce_f32(&mut host, op)?;
        from_host(host, t.shape().clone(), t.dtype(), t.device())
    }

    /// The ranks' tensors concatenated along `dim` in rank order (all ranks' shapes equal).
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let n = self.size();
        if n == 1 {
            return Ok(t.clone());
        }
        let host = to_host(t)?;
        let mut out = vec![0f32; host.len() * n];
        self.all_gather_f32(&host, &mut out)?;
        let mut dims = t.dims().to_vec();
        dims.insert(0, n);
        let stacked = from_host(out, dims, t.dtype(), t.device())?; // (n, ..)
        let parts = (0..n).map(|r| stacked.get(r)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, dim)?)
    }

    /// The tensor reduced over the group, and rank r's r-th block of it along `dim` kept.
    fn reduce_scatter(&self, t: &Tensor, dim: usize, op: ReduceOp) -> Result<Tensor> {
        let n = self.size();
        if n == 1 {
            return Ok(t.clone());
        }
        let len = t.dim(dim)?;
        if len % n != 0 {
            return Err(Error::Comm(format!(
                "reduce_scatter: dim {dim} of {:?} does not divide by {n} ranks",
                t.dims()
            )));
        }
        // Blocks of dim `dim` laid out rank-major, so rank r's block is contiguous.
        let blocks = (0..n).map(|r| t.narrow(dim, r * len / n, len / n)).collect::<candle_core::Result<Vec<_>>>()?;
        let send = to_host(&Tensor::stack(&blocks, 0)?)?;
        let mut recv = vec![0f32; send.len() / n];
        self.reduce_scatter_f32(&send, &mut recv, op)?;
        from_host(recv, blocks[0].shape().clone(), t.dtype(), t.device())
    }

    /// Rank `root`'s tensor on every rank (others pass a tensor of the same shape and dtype).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(t.clone());
        }
        let mut bytes = f32_bytes(&to_host(t)?);
        self.broadcast_bytes(&mut bytes, root)?;
        from_host(bytes_f32(&bytes)?, t.shape().clone(), t.dtype(), t.device())
    }

    fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        self.send_bytes(&f32_bytes(&to_host(t)?), dst)
    }

    /// A tensor of the given shape sent by rank `src` (with `send`).
    fn recv(&self, shape: &Shape, dtype: DType, device: &Device, src: usize) -> Result<Tensor> {
        let data = bytes_f32(&self.recv_bytes(src)?)?;
        if data.len() != shape.elem_count() {
            return Err(Error::Comm(format!(
                "rank {}: received {} values from rank {src}, expected {shape:?}",
                self.rank(),
                data.len()
            )));
        }
        from_host(data, shape.clone(), dtype, device)
    }

    /// `send_recv_bytes` of tensors: `send.0` to rank `send.1` and, in the same batched exchange, a
    /// tensor of `recv`'s (shape, dtype, device) from rank `recv.3`.
    fn send_recv(
        &self,
        send: Option<(&Tensor, usize)>,
        recv: Option<(&Shape, DType, &Device, usize)>,
    ) -> Result<Option<Tensor>> {
        let bytes = send.map(|(t, _)| to_host(t).map(|v| f32_bytes(&v))).transpose()?;
        let got = self.send_recv_bytes(bytes.as_deref().zip(send.map(|s| s.1)), recv.map(|r| r.3))?;
        match (recv, got) {
            (Some((shape, dtype, device, src)), Some(data)) => {
                let data = bytes_f32(&data)?;
                if data.len() != shape.elem_count() {
                    return Err(Error::Comm(format!(
                        "rank {}: received {} values from rank {src}, expected {shape:?}",
                        self.rank(),
                        data.len()
                    )));
                }
                Ok(Some(from_host(data, shape.clone(), dtype, device)?))
            }
            (Some((_, _, _, src)), None) => {
                Err(Error::Comm(format!("rank {}: no message from rank {src}", self.rank())))
            }
            _ => Ok(None),
        }
    }

    /// Scalars reduced over the group (losses, norms, flags), in f64.
    fn all_reduce_scalars(&self, xs: &mut [f64], op: ReduceOp) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        self.all_reduce_f64(xs, op)
    }
}

fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn from_host(v: Vec<f32>, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_f32(b: &[u8]) -> Result<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return Err(Error::Comm(format!("a message of {} bytes is not a list of f32", b.len())));
    }
    Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}
