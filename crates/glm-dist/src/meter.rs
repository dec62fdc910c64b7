//! A communicator that counts: [`Metered`] forwards every call to an inner communicator and logs,
//! per call, the collective's kind, its payload bytes and the wall time spent inside it (waiting
//! for the peers included: that is what a rank loses to communication).
//!
//! Payload bytes are the collective's buffer in the usual accounting (NCCL's tests, Megatron's
//! formulas): the reduced buffer of an all-reduce, the full input of a reduce-scatter, the full
//! output of an all-gather, the root's message of a broadcast, the bytes this rank sends in a
//! `send_recv`. Tensors cross the host backends as f32 (4 bytes a value, whatever their dtype).
//! What a rank actually puts on the wire depends on the algorithm; [`Kind::ring_bytes`] gives a
//! ring's (an all-reduce of S bytes sends 2 (n-1)/n S per rank, the sum of a reduce-scatter and an
//! all-gather of S).
//!
//! Every `Metered` made from one another (by `split`, or [`Metered::sibling`]) logs into the same
//! [`Stats`], each under its group's label.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};

use crate::comm::{Communicator, ReduceOp};
use crate::Result;

/// The collectives a [`Metered`] tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    AllReduceF32,
    AllReduceF64,
    AllGather,
    ReduceScatter,
    Broadcast,
    SendRecv,
    Barrier,
    Split,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::AllReduceF32,
        Kind::AllReduceF64,
        Kind::AllGather,
        Kind::ReduceScatter,
        Kind::Broadcast,
        Kind::SendRecv,
        Kind::Barrier,
        Kind::Split,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::AllReduceF32 => "all_reduce f32",
            Kind::AllReduceF64 => "all_reduce f64",
            Kind::AllGather => "all_gather",
            Kind::ReduceScatter => "reduce_scatter",
            Kind::Broadcast => "broadcast",
            Kind::SendRecv => "send_recv",
            Kind::Barrier => "barrier",
            Kind::Split => "split",
        }
    }

    /// Bytes one rank of `n` sends for a payload of `bytes` with ring algorithms (a broadcast and
    /// a point-to-point message: the payload itself).
    pub fn ring_bytes(self, bytes: u64, n: usize) -> f64 {
        let n = n.max(1) as f64;
        let b = bytes as f64;
        match self {
            Kind::AllReduceF32 | Kind::AllReduceF64 => 2.0 * (n - 1.0) / n * b,
            Kind::AllGather | Kind::ReduceScatter => (n - 1.0) / n * b,
            Kind::Broadcast | Kind::SendRecv => b,
            Kind::Barrier | Kind::Split => 0.0,
        }
    }
}

/// One call.
#[derive(Debug, Clone)]
pub struct Event {
    /// Index of the group's label in [`Stats::groups`].
    pub group: usize,
    pub kind: Kind,
    /// Payload bytes (see the module docs).
    pub bytes: u64,
    pub start: Instant,
    pub seconds: f64,
}

/// Calls, payload bytes and seconds of a set of events.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub calls: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl Tally {
    fn add(&mut self, e: &Event) {
        self.calls += 1;
        self.bytes += e.bytes;
        self.seconds += e.seconds;
    }
}

/// The log of every metered call of a rank, shared by its metered groups.
#[derive(Debug, Default)]
pub struct Stats {
    /// (label, size) of each metered group.
    groups: Vec<(String, usize)>,
    events: Vec<Event>,
}

impl Stats {
    pub fn shared() -> Rc<RefCell<Stats>> {
        Rc::new(RefCell::new(Stats::default()))
    }

    fn group(&mut self, label: &str, size: usize) -> usize {
        self.groups.push((label.to_string(), size));
        self.groups.len() - 1
    }

    /// (label, size) of each group, by index.
    pub fn groups(&self) -> &[(String, usize)] {
        &self.groups
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Forgets the events (the groups stay).
    pub fn clear(&mut self) {
        self.events.clear();
    }

    /// The events that pass `keep`, summed by (group label, kind).
    pub fn tally(&self, keep: impl Fn(&Event) -> bool) -> BTreeMap<(String, Kind), Tally> {
        let mut out: BTreeMap<(String, Kind), Tally> = BTreeMap::new();
        for e in self.events.iter().filter(|e| keep(e)) {
            let label = self.groups.get(e.group).map(|g| g.0.clone()).unwrap_or_default();
            out.entry((label, e.kind)).or_default().add(e);
        }
        out
    }

    /// Every event, summed by (group label, kind).
    pub fn totals(&self) -> BTreeMap<(String, Kind), Tally> {
        self.tally(|_| true)
    }
}

/// `inner`, with every call logged into shared [`Stats`] under a group label.
pub struct Metered {
    inner: Rc<dyn Communicator>,
    stats: Rc<RefCell<Stats>>,
    label: String,
    group: usize,
}

impl Metered {
    /// A metered view of `inner` with fresh stats.
    pub fn new(inner: Rc<dyn Communicator>, label: &str) -> Self {
        Self::with_stats(inner, Stats::shared(), label)
    }

    /// A metered view of `inner` logging into `stats`.
    pub fn with_stats(inner: Rc<dyn Communicator>, stats: Rc<RefCell<Stats>>, label: &str) -> Self {
        let group = stats.borrow_mut().group(label, inner.size());
        Self { inner, stats, label: label.to_string(), group }
    }

    /// Another communicator, logging into the same stats.
    pub fn sibling(&self, inner: Rc<dyn Communicator>, label: &str) -> Self {
        Self::with_stats(inner, Rc::clone(&self.stats), label)
    }

    pub fn stats(&self) -> Rc<RefCell<Stats>> {
        Rc::clone(&self.stats)
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn inner(&self) -> &Rc<dyn Communicator> {
        &self.inner
    }

    /// Runs `f`, logging one call of `kind` carrying `bytes` (failed calls too: their time was spent).
    fn timed<R>(&self, kind: Kind, bytes: u64, f: impl FnOnce(&dyn Communicator) -> Result<R>) -> Result<R> {
        let start = Instant::now();
        let out = f(self.inner.as_ref());
        let seconds = start.elapsed().as_secs_f64();
        self.stats.borrow_mut().events.push(Event { group: self.group, kind, bytes, start, seconds });
        out
    }
}

fn f32_bytes(n: usize) -> u64 {
    4 * n as u64
}

impl Communicator for Metered {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.timed(Kind::AllReduceF32, f32_bytes(buf.len()), |c| c.all_reduce_f32(buf, op))
    }

    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        self.timed(Kind::AllReduceF64, 8 * buf.len() as u64, |c| c.all_reduce_f64(buf, op))
    }

    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.timed(Kind::AllGather, f32_bytes(recv.len()), |c| c.all_gather_f32(send, recv))
    }

    fn reduce_scatter_f32(&self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()> {
        self.timed(Kind::ReduceScatter, f32_bytes(send.len()), |c| c.reduce_scatter_f32(send, recv, op))
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let start = Instant::now();
        let out = self.inner.broadcast_bytes(buf, root);
        let seconds = start.elapsed().as_secs_f64();
        // The payload is the root's message: known on every rank only afterwards.
        let e = Event { group: self.group, kind: Kind::Broadcast, bytes: buf.len() as u64, start, seconds };
        self.stats.borrow_mut().events.push(e);
        out
    }

    fn send_recv_bytes(&self, send: Option<(&[u8], usize)>, recv: Option<usize>) -> Result<Option<Vec<u8>>> {
        let bytes = send.map_or(0, |(d, _)| d.len() as u64);
        self.timed(Kind::SendRecv, bytes, |c| c.send_recv_bytes(send, recv))
    }

    fn barrier(&self) -> Result<()> {
        self.timed(Kind::Barrier, 0, |c| c.barrier())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let sub = self.timed(Kind::Split, 0, |c| c.split(color, key))?;
        Ok(Box::new(self.sibling(Rc::from(sub), &format!("{}.{color}", self.label))))
    }

    // The tensor methods go to the inner communicator's own (a device backend keeps its tensors
    // on the device); a group of one moves nothing and logs nothing, as the provided methods.

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        if self.size() == 1 {
            return self.inner.all_reduce(t, op);
        }
        self.timed(Kind::AllReduceF32, f32_bytes(t.elem_count()), |c| c.all_reduce(t, op))
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if self.size() == 1 {
            return self.inner.all_gather(t, dim);
        }
        self.timed(Kind::AllGather, f32_bytes(t.elem_count() * self.size()), |c| c.all_gather(t, dim))
    }

    fn reduce_scatter(&self, t: &Tensor, dim: usize, op: ReduceOp) -> Result<Tensor> {
        if self.size() == 1 {
            return self.inner.reduce_scatter(t, dim, op);
        }
        self.timed(Kind::ReduceScatter, f32_bytes(t.elem_count()), |c| c.reduce_scatter(t, dim, op))
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.size() == 1 {
            return self.inner.broadcast(t, root);
        }
        self.timed(Kind::Broadcast, f32_bytes(t.elem_count()), |c| c.broadcast(t, root))
    }

    fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        self.timed(Kind::SendRecv, f32_bytes(t.elem_count()), |c| c.send(t, dst))
    }

    fn recv(&self, shape: &Shape, dtype: DType, device: &Device, src: usize) -> Result<Tensor> {
        self.timed(Kind::SendRecv, 0, |c| c.recv(shape, dtype, device, src))
    }

    fn all_reduce_scalars(&self, xs: &mut [f64], op: ReduceOp) -> Result<()> {
        if self.size() == 1 {
            return self.inner.all_reduce_scalars(xs, op);
        }
        self.timed(Kind::AllReduceF64, 8 * xs.len() as u64, |c| c.all_reduce_scalars(xs, op))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::LocalComm;

    #[test]
    fn metered_counts_every_collective_and_forwards_it() -> Result<()> {
        let out = LocalComm::run(2, Duration::from_secs(30), |world| {
            let m = Metered::new(Rc::clone(&world), "world");
            let r = m.rank();
            let mut a = vec![r as f32 + 1.0; 10];
            m.all_reduce_f32(&mut a, ReduceOp::Sum)?;
            assert_eq!(a, vec![3.0; 10]);
            let mut s = [r as f64, 2.0, 3.0];
            m.all_reduce_f64(&mut s, ReduceOp::Max)?;
            assert_eq!(s, [1.0, 2.0, 3.0]);
            let mut g = vec![0f32; 10];
            m.all_gather_f32(&[r as f32; 5], &mut g)?;
            assert_eq!(&g[4..6], &[0.0, 1.0]);
            let mut rs = vec![0f32; 4];
            m.reduce_scatter_f32(&[1.0; 8], &mut rs, ReduceOp::Sum)?;
            assert_eq!(rs, vec![2.0; 4]);
            let mut b = if r == 0 { vec![7u8; 7] } else { Vec::new() };
            m.broadcast_bytes(&mut b, 0)?;
            assert_eq!(b, vec![7u8; 7]);
            let got = m.send_recv_bytes(Some((&[r as u8; 3], 1 - r)), Some(1 - r))?;
            assert_eq!(got, Some(vec![(1 - r) as u8; 3]));
            m.barrier()?;
            let t = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
            let t = m.all_reduce(&t, ReduceOp::Sum)?;
            assert_eq!(t.sum_all()?.to_scalar::<f32>()?, 12.0);
            // A split logs into the same stats under its own label; each rank alone in its group.
            let sub = m.split(r, 0)?;
            let mut one = [1f32; 6];
            sub.all_reduce_f32(&mut one, ReduceOp::Sum)?;
            assert_eq!(sub.all_reduce(&t, ReduceOp::Sum)?.dims(), &[2, 3]); // size 1: not logged
            let stats = m.stats();
            let st = stats.borrow();
            Ok((st.totals(), st.groups().to_vec(), st.events().len()))
        })?;
        for (rank, (totals, groups, n)) in out.into_iter().enumerate() {
            assert_eq!(groups, vec![("world".to_string(), 2), (format!("world.{rank}"), 1)]);
            assert_eq!(n, 10);
            let get = |label: &str, k: Kind| totals.get(&(label.to_string(), k)).copied().unwrap_or_default();
            let w = |k| get("world", k);
            assert_eq!((w(Kind::AllReduceF32).calls, w(Kind::AllReduceF32).bytes), (2, 40 + 24));
            assert_eq!((w(Kind::AllReduceF64).calls, w(Kind::AllReduceF64).bytes), (1, 24));
            assert_eq!((w(Kind::AllGather).calls, w(Kind::AllGather).bytes), (1, 40));
            assert_eq!((w(Kind::ReduceScatter).calls, w(Kind::ReduceScatter).bytes), (1, 32));
            assert_eq!((w(Kind::Broadcast).calls, w(Kind::Broadcast).bytes), (1, 7));
            assert_eq!((w(Kind::SendRecv).calls, w(Kind::SendRecv).bytes), (1, 3));
            assert_eq!((w(Kind::Barrier).calls, w(Kind::Split).calls), (1, 1));
            let sub = get(&format!("world.{rank}"), Kind::AllReduceF32);
            assert_eq!((sub.calls, sub.bytes), (1, 24));
            assert!(totals.values().all(|t| t.seconds >= 0.0));
        }
        assert_eq!(Kind::AllReduceF32.ring_bytes(100, 2), 100.0);
        assert_eq!(Kind::AllGather.ring_bytes(100, 4), 75.0);
        Ok(())
    }
}
