//! Checks of a communicator that every backend must pass, written once: `tests/local.rs` runs them
//! on threads, `examples/mpi_check.rs` under mpirun. Every rank runs the same calls with
//! rank-dependent data and checks its own result against the value it computes for all ranks.

use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use crate::comm::{Communicator, ReduceOp};
use crate::groups::{Layout, ParallelGroups};
use crate::{Error, Result};

fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Comm(format!("check failed: {}", msg())))
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Every check of [`check_collectives`] and [`check_groups`].
pub fn check_all(world: &Rc<dyn Communicator>) -> Result<()> {
    check_collectives(world.as_ref())?;
    check_groups(world.clone())
}

/// Every collective and point-to-point operation, on raw buffers and tensors.
pub fn check_collectives(c: &dyn Communicator) -> Result<()> {
    check_all_reduce(c).map_err(|e| ctx(c, "all_reduce", e))?;
    check_all_gather(c).map_err(|e| ctx(c, "all_gather", e))?;
    check_reduce_scatter(c).map_err(|e| ctx(c, "reduce_scatter", e))?;
    check_broadcast(c).map_err(|e| ctx(c, "broadcast", e))?;
    check_p2p(c).map_err(|e| ctx(c, "send/recv", e))?;
    for _ in 0..3 {
        c.barrier().map_err(|e| ctx(c, "barrier", e))?;
    }
    check_split(c).map_err(|e| ctx(c, "split", e))
}

fn ctx(c: &dyn Communicator, what: &str, e: Error) -> Error {
    Error::Comm(format!("{} rank {} of {}, {what}: {e}", c.backend(), c.rank(), c.size()))
}

fn check_all_reduce(c: &dyn Communicator) -> Result<()> {
    let (r, n) = (c.rank(), c.size());
    // Integer-valued data: exact whatever the order of the sum.
    let gen = |r: usize, i: usize| ((r + 1) * (i + 1)) as f32 + if (i + r).is_multiple_of(3) { 50.0 } else { 0.0 };
    let len = 37;
    for rop in [ReduceOp::Sum, ReduceOp::Max] {
        let fold = |i: usize| {
            let xs = (0..n).map(|q| gen(q, i));
            match rop {
                ReduceOp::Sum => xs.sum::<f32>(),
                ReduceOp::Max => xs.fold(f32::MIN, f32::max),
            }
        };
        let want: Vec<f32> = (0..len).map(fold).collect();
        let mut buf: Vec<f32> = (0..len).map(|i| gen(r, i)).collect();
        c.all_reduce_f32(&mut buf, rop)?;
        ensure(buf == want, || format!("all_reduce_f32 {rop:?}: {buf:?}, expected {want:?}"))?;
        let mut buf64: Vec<f64> = (0..len).map(|i| f64::from(gen(r, i)) * 1e10).collect();
        c.all_reduce_f64(&mut buf64, rop)?;
        let want64: Vec<f64> = want.iter().map(|&x| f64::from(x) * 1e10).collect();
        ensure(buf64 == want64, || format!("all_reduce_f64 {rop:?}: {buf64:?}, expected {want64:?}"))?;
        let t = Tensor::from_vec((0..12).map(|i| gen(r, i)).collect::<Vec<_>>(), (3, 4), &Device::Cpu)?;
        for dt in [DType::F32, DType::BF16] {
            let got = c.all_reduce(&t.to_dtype(dt)?, rop)?;
            ensure(got.dtype() == dt && got.dims() == [3, 4], || format!("all_reduce {dt:?}: {got:?}"))?;
            let want_t = values(&Tensor::from_vec(want[..12].to_vec(), (3, 4), &Device::Cpu)?.to_dtype(dt)?)?;
            let got = values(&got)?;
            // bf16 inputs are rounded before the f32 reduction; small integers survive exactly.
            ensure(got == want_t, || format!("all_reduce {dt:?} {rop:?}: {got:?}, expected {want_t:?}"))?;
        }
    }
    // Inexact data: every rank must still hold the same bits (norms, losses, clipping agree).
    let mut x: Vec<f32> = (0..64).map(|i| 0.1 * (r + 1) as f32 / (i + 1) as f32).collect();
    c.all_reduce_f32(&mut x, ReduceOp::Sum)?;
    let mut all = vec![0f32; x.len() * n];
    c.all_gather_f32(&x, &mut all)?;
    for (q, other) in all.chunks(x.len()).enumerate() {
        let same = other.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits());
        ensure(same, || format!("all_reduce_f32 results differ in their bits between rank {r} and rank {q}"))?;
    }
    let mut s = [r as f64, -(r as f64)];
    c.all_reduce_scalars(&mut s, ReduceOp::Max)?;
    ensure(s == [(n - 1) as f64, 0.0], || format!("all_reduce_scalars Max: {s:?}"))?;
    let mut empty: Vec<f32> = Vec::new();
    c.all_reduce_f32(&mut empty, ReduceOp::Sum)
}

fn check_all_gather(c: &dyn Communicator) -> Result<()> {
    let (r, n) = (c.rank(), c.size());
    let send: Vec<f32> = (0..3).map(|j| (100 * r + j) as f32).collect();
    let mut recv = vec![0f32; 3 * n];
    c.all_gather_f32(&send, &mut recv)?;
    let want: Vec<f32> = (0..n).flat_map(|q| (0..3).map(move |j| (100 * q + j) as f32)).collect();
    ensure(recv == want, || format!("all_gather_f32: {recv:?}, expected {want:?}"))?;
    // A wrong receive length is refused on every rank before any traffic.
    let mut bad = vec![0f32; 3 * n + 1];
    ensure(c.all_gather_f32(&send, &mut bad).is_err(), || "a wrong recv length was accepted".into())?;
    let t_of = |q: usize, dt: DType| -> Result<Tensor> {
        Ok(Tensor::arange(0f32, 6.0, &Device::Cpu)?.affine(1.0, 10.0 * q as f64)?.reshape((2, 3))?.to_dtype(dt)?)
    };
    for dt in [DType::F32, DType::BF16] {
        for dim in [0, 1] {
            let got = c.all_gather(&t_of(r, dt)?, dim)?;
            let parts = (0..n).map(|q| t_of(q, dt)).collect::<Result<Vec<_>>>()?;
            let want = Tensor::cat(&parts, dim)?;
            ensure(got.dims() == want.dims() && got.dtype() == dt, || format!("all_gather dim {dim}: {got:?}"))?;
            let (g, w) = (values(&got)?, values(&want)?);
            ensure(g == w, || format!("all_gather {dt:?} dim {dim}: {g:?}, expected {w:?}"))?;
        }
    }
    Ok(())
}

fn check_reduce_scatter(c: &dyn Communicator) -> Result<()> {
    let (r, n) = (c.rank(), c.size());
    let k = 5;
    let gen = |q: usize, i: usize| ((q + 1) * (i + 1)) as f32;
    let send: Vec<f32> = (0..k * n).map(|i| gen(r, i)).collect();
    let mut recv = vec![0f32; k];
    c.reduce_scatter_f32(&send, &mut recv, ReduceOp::Sum)?;
    let want: Vec<f32> = (r * k..(r + 1) * k).map(|i| (0..n).map(|q| gen(q, i)).sum()).collect();
    ensure(recv == want, || format!("reduce_scatter_f32 Sum: {recv:?}, expected {want:?}"))?;
    c.reduce_scatter_f32(&send, &mut recv, ReduceOp::Max)?;
    let want: Vec<f32> = (r * k..(r + 1) * k).map(|i| gen(n - 1, i)).collect();
    ensure(recv == want, || format!("reduce_scatter_f32 Max: {recv:?}, expected {want:?}"))?;
    let t_of = |q: usize, rows: usize, cols: usize, dt: DType| -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols).map(|i| gen(q, i)).collect();
        Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?.to_dtype(dt)?)
    };
    for dt in [DType::F32, DType::BF16] {
        for (dim, rows, cols) in [(0, 2 * n, 3), (1, 2, 2 * n)] {
            let got = c.reduce_scatter(&t_of(r, rows, cols, dt)?, dim, ReduceOp::Sum)?;
            let mut sum = t_of(0, rows, cols, DType::F32)?;
            for q in 1..n {
                sum = (sum + t_of(q, rows, cols, DType::F32)?)?;
            }
            let want = sum.narrow(dim, r * 2, 2)?.to_dtype(dt)?;
            ensure(got.dims() == want.dims(), || format!("reduce_scatter dim {dim}: {got:?}, expected {want:?}"))?;
            let (g, w) = (values(&got)?, values(&want)?);
            ensure(g == w, || format!("reduce_scatter {dt:?} dim {dim}: {g:?}, expected {w:?}"))?;
        }
    }
    Ok(())
}

fn check_broadcast(c: &dyn Communicator) -> Result<()> {
    let (r, n) = (c.rank(), c.size());
    let root = n - 1;
    // Every rank's buffer has another length before the call.
    let mut buf = vec![r as u8 + 1; r + 1];
    c.broadcast_bytes(&mut buf, root)?;
    ensure(buf == vec![n as u8; n], || format!("broadcast_bytes from {root}: {buf:?}"))?;
    // Big enough for MPI's rendezvous protocol; the others start empty.
    let big: Vec<u8> = (0..300_000).map(|i| (i % 251) as u8).collect();
    let mut buf = if r == 0 { big.clone() } else { Vec::new() };
    c.broadcast_bytes(&mut buf, 0)?;
    ensure(buf == big, || format!("broadcast_bytes of {} bytes from 0: got {} bytes", big.len(), buf.len()))?;
    for dt in [DType::F32, DType::BF16] {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)?.affine(1.0, r as f64)?.reshape((3, 2))?.to_dtype(dt)?;
        let got = c.broadcast(&t, root)?;
        let want: Vec<f32> = (0..6).map(|i| (i + root) as f32).collect();
        let g = values(&got)?;
        ensure(g == want && got.dtype() == dt, || format!("broadcast {dt:?} from {root}: {g:?}"))?;
    }
    Ok(())
}

fn check_p2p(c: &dyn Communicator) -> Result<()> {
    let (r, n) = (c.rank(), c.size());
    let msg = |q: usize, len: usize| -> Vec<u8> { (0..len).map(|i| (q * 31 + i) as u8).collect() };
    // Rings both ways, small and big (rendezvous) messages: every rank sends before it receives,
    // which deadlocks unless sends are buffered or the exchange is batched.
    for (step, len) in [(1, 10), (n - 1, 10), (1, 200_000)] {
        let (to, from) = ((r + step) % n, (r + n - step % n) % n);
        let got = c.send_recv_bytes(Some((&msg(r, len + r), to)), Some(from))?;
        let want = msg(from, len + from);
        ensure(got.as_ref() == Some(&want), || format!("ring step {step}: from rank {from} got {got:?}"))?;
    }
    // A pipeline: forward through the ranks, then back, one tensor at a time.
    let shape = (2, 3);
    let mut t = Tensor::zeros(shape, DType::BF16, &Device::Cpu)?;
    if r > 0 {
        t = c.recv(&shape.into(), DType::BF16, &Device::Cpu, r - 1)?;
    }
    let t = t.affine(1.0, 1.0)?;
    if r + 1 < n {
        c.send(&t, r + 1)?;
    }
    let v = values(&t)?;
    ensure(v.iter().all(|&x| x == (r + 1) as f32), || format!("pipeline forward at stage {r}: {v:?}"))?;
    let mut g = Tensor::full(n as f32, shape, &Device::Cpu)?;
    if r + 1 < n {
        g = c.recv(&shape.into(), DType::F32, &Device::Cpu, r + 1)?;
    }
    if r > 0 {
        c.send(&(g.clone() - 1.0)?, r - 1)?;
    }
    let v = values(&g)?;
    ensure(v.iter().all(|&x| x == (r + 1) as f32), || format!("pipeline backward at stage {r}: {v:?}"))?;
    // Several messages to one peer arrive in order.
    if n >= 2 && r < 2 {
        let peer = 1 - r;
        for i in 0..3u8 {
            c.send_bytes(&[i, r as u8], peer)?;
        }
        for i in 0..3u8 {
            let got = c.recv_bytes(peer)?;
            ensure(got == [i, peer as u8], || format!("message {i} from rank {peer}: {got:?}"))?;
        }
    }
    Ok(())
}

fn check_split(c: &dyn Communicator) -> Result<()> {
    let (r, n) = (c.rank(), c.size());
    // Parity groups, ordered by descending rank through the key.
    let sub = c.split(r % 2, n - r)?;
    let mut members: Vec<usize> = (0..n).filter(|q| q % 2 == r % 2).collect();
    members.reverse();
    let me = members.iter().position(|&q| q == r).unwrap_or(usize::MAX);
    ensure(sub.size() == members.len() && sub.rank() == me, || {
        format!("parity group: rank {} of {}, expected {me} of {}", sub.rank(), sub.size(), members.len())
    })?;
    let mut got = vec![0f32; members.len()];
    sub.all_gather_f32(&[r as f32], &mut got)?;
    let want: Vec<f32> = members.iter().map(|&q| q as f32).collect();
    ensure(got == want, || format!("parity group gathers {got:?}, expected {want:?}"))?;
    // A split of a split, one color: the same group again.
    let again = sub.split(7, sub.rank())?;
    let mut x = [1.0f64];
    again.all_reduce_f64(&mut x, ReduceOp::Sum)?;
    ensure(x[0] == members.len() as f64, || format!("nested split sums {x:?}"))?;
    c.barrier()
}

/// Every Megatron layout of the world's size: each group holds the right ranks in the right order.
pub fn check_groups(world: Rc<dyn Communicator>) -> Result<()> {
    let n = world.size();
    let bad = Layout::new(n + 1, 1, 1)?;
    match ParallelGroups::new(world.clone(), bad) {
        Err(e) if e.to_string().contains("does not match the layout") => {}
        other => ensure(false, || format!("layout {bad} on {n} ranks: {:?}", other.err()))?,
    }
    ensure(Layout::new(0, 1, 1).is_err(), || "tp 0 was accepted".into())?;
    for tp in 1..=n {
        for pp in 1..=n / tp {
            if !n.is_multiple_of(tp * pp) {
                continue;
            }
            let layout = Layout::new(tp, pp, n / (tp * pp))?;
            check_layout(&world, layout).map_err(|e| ctx(world.as_ref(), &format!("groups {layout}"), e))?;
        }
    }
    Ok(())
}

fn check_layout(world: &Rc<dyn Communicator>, layout: Layout) -> Result<()> {
    let g = ParallelGroups::new(world.clone(), layout)?;
    let me = world.rank();
    let (t, d, p) = layout.coords(me);
    ensure(layout.global(t, d, p) == me, || format!("global(coords({me})) != {me}"))?;
    ensure((g.tp_rank, g.dp_rank, g.pp_rank) == (t, d, p), || "coordinates".into())?;
    let expect: [(&str, &Rc<dyn Communicator>, Vec<usize>); 3] = [
        ("tp", &g.tp, (0..layout.tp).map(|x| layout.global(x, d, p)).collect()),
        ("dp", &g.dp, (0..layout.dp).map(|x| layout.global(t, x, p)).collect()),
        ("pp", &g.pp, (0..layout.pp).map(|x| layout.global(t, d, x)).collect()),
    ];
    for (name, comm, ranks) in expect {
        check_members(name, comm.as_ref(), me, &ranks)?;
    }
    match (&g.embedding, layout.pp > 1 && (p == 0 || p + 1 == layout.pp)) {
        (Some(e), true) => check_members("embedding", e.as_ref(), me, &g.embedding_ranks())?,
        (None, false) => {}
        (e, want) => ensure(false, || format!("embedding group present: {}, expected {want}", e.is_some()))?,
    }
    // A bf16 tensor summed over the tensor-parallel group, as the row-parallel linear does.
    let x = Tensor::full(me as f32, (2, 2), &Device::Cpu)?.to_dtype(DType::BF16)?;
    let s = values(&g.tp.all_reduce(&x, ReduceOp::Sum)?)?;
    let want = (0..layout.tp).map(|x| layout.global(x, d, p)).sum::<usize>() as f32;
    ensure(s.iter().all(|&v| v == want), || format!("tp all_reduce of bf16: {s:?}, expected {want}"))
}

fn check_members(name: &str, c: &dyn Communicator, me: usize, ranks: &[usize]) -> Result<()> {
    let pos = ranks.iter().position(|&q| q == me);
    ensure(c.size() == ranks.len() && Some(c.rank()) == pos, || {
        format!("{name} group: rank {} of {}, expected {pos:?} of {} ({ranks:?})", c.rank(), c.size(), ranks.len())
    })?;
    let mut got = vec![0f32; ranks.len()];
    c.all_gather_f32(&[me as f32], &mut got)?;
    let want: Vec<f32> = ranks.iter().map(|&q| q as f32).collect();
    ensure(got == want, || format!("{name} group gathers {got:?}, expected {want:?}"))?;
    let mut sum = [me as f64];
    c.all_reduce_f64(&mut sum, ReduceOp::Sum)?;
    let want = ranks.iter().sum::<usize>() as f64;
    ensure(sum[0] == want, || format!("{name} group sums {}, expected {want}", sum[0]))
}
