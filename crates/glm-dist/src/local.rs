//! The in-process backend: one thread per rank, collectives through shared memory.
//!
//! Every collective is an exchange: each rank posts its contribution to a numbered round and, once
//! all have posted, every rank computes the result from all contributions itself, in rank order 0..n.
//! Wasteful (each rank reduces everything) but deterministic: every rank gets bit-identical results,
//! whatever the thread timing, which the tensor-parallel tests rely on.
//!
//! A run must never hang: a rank that fails or panics marks the whole run failed (every group of
//! it), and every wait polls that flag, the exit of the ranks it waits for, and a deadline.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

mod group;

use group::{lock, Data, Elem, Group, Post, Run};

use crate::comm::{Communicator, ReduceOp};
use crate::{Error, Result};

/// One rank's view of an in-process group. Not `Send`, like every communicator.
pub struct LocalComm {
    group: Arc<Group>,
    rank: usize,
    /// Rounds this rank has joined: a rank's n-th collective is round n of the group.
    next_round: Cell<u64>,
}

impl LocalComm {
    /// Runs `f` on `world` threads, one per rank, and returns their results in rank order, or the
    /// error of the first rank that failed (the root cause; the others fail because of it).
    /// `timeout` bounds every single wait of a collective.
    pub fn run<T: Send>(
        world: usize,
        timeout: Duration,
        f: impl Fn(Rc<dyn Communicator>) -> Result<T> + Send + Sync,
    ) -> Result<Vec<T>> {
        if world == 0 {
            return Err(Error::Layout("LocalComm::run: a world of 0 ranks".into()));
        }
        let run = Arc::new(Run::new(world, timeout));
        let group = Arc::new(Group::new((0..world).collect(), run.clone()));
        let f = &f;
        let results: Vec<Result<T>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let (group, run) = (group.clone(), run.clone());
                    std::thread::Builder::new().name(format!("rank-{rank}")).spawn_scoped(s, move || {
                        let comm: Rc<dyn Communicator> = Rc::new(LocalComm { group, rank, next_round: Cell::new(0) });
                        let out = catch_unwind(AssertUnwindSafe(|| f(comm))).unwrap_or_else(|p| {
                            let msg = p
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| p.downcast_ref::<String>().cloned());
                            Err(Error::Comm(format!("rank {rank} panicked: {}", msg.unwrap_or_default())))
                        });
                        crate::registry::clear();
                        run.exit(rank, out.as_ref().err());
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| Err(Error::Comm(format!("rank {rank}: thread lost")))),
                    Err(e) => {
                        let e = Error::Comm(format!("rank {rank}: could not spawn its thread: {e}"));
                        run.exit(rank, Some(&e));
                        Err(e)
                    }
                })
                .collect()
        });
        let first = lock(&run.first).clone();
        if let Some((r, msg)) = first {
            return Err(match results.into_iter().nth(r) {
                Some(Err(e)) => e,
                _ => Error::Comm(format!("rank {r} failed: {msg}")),
            });
        }
        results.into_iter().collect()
    }

    fn size_n(&self) -> usize {
        self.group.members.len()
    }

    /// This rank's next collective: round n of its group for its n-th call.
    fn exchange<R>(
        &self,
        what: &'static str,
        data: Data,
        post: impl FnOnce(&mut group::Round) -> R,
    ) -> Result<(Vec<Arc<Post>>, R)> {
        let id = self.next_round.get();
        self.next_round.set(id + 1);
        self.group.exchange(self.rank, id, what, data, post)
    }

    /// An all-reduce of `buf`, summed (or maxed) in rank order.
    fn reduce_vec<T: Elem>(&self, what: &'static str, buf: &[T], op: ReduceOp) -> Result<Vec<T>> {
        let (posts, ()) = self.exchange(what, T::wrap(buf.to_vec()), |_| ())?;
        let parts = posts
            .iter()
            .map(|p| T::unwrap(&p.data).filter(|v| v.len() == buf.len()).ok_or_else(|| self.mismatch(what, buf.len())))
            .collect::<Result<Vec<_>>>()?;
        let mut out = parts[0].to_vec();
        for p in &parts[1..] {
            for (o, &x) in out.iter_mut().zip(p.iter()) {
                *o = match op {
                    ReduceOp::Sum => *o + x,
                    // NaN wins, as in a tensor max: a NaN anywhere must reach every rank.
                    ReduceOp::Max if x > *o || x.partial_cmp(&x).is_none() => x,
                    ReduceOp::Max => *o,
                };
            }
        }
        Ok(out)
    }

    fn mismatch(&self, what: &str, len: usize) -> Error {
        Error::Comm(format!(
            "{what} on rank {}: the ranks passed buffers of different lengths (this one {len})",
            self.rank
        ))
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size_n()
    }

    fn backend(&self) -> &'static str {
        "local"
    }

    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        let out = self.reduce_vec("all_reduce_f32", buf, op)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        let out = self.reduce_vec("all_reduce_f64", buf, op)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let what = "all_gather_f32";
        check_len(what, self.rank, "recv", recv.len(), send.len() * self.size_n())?;
        let (posts, ()) = self.exchange(what, Data::F32(send.to_vec()), |_| ())?;
        for (p, chunk) in posts.iter().zip(recv.chunks_mut(send.len().max(1))) {
            let v = f32::unwrap(&p.data).filter(|v| v.len() == send.len());
            chunk.copy_from_slice(v.ok_or_else(|| self.mismatch(what, send.len()))?);
        }
        Ok(())
    }

    fn reduce_scatter_f32(&self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()> {
        let what = "reduce_scatter_f32";
        check_len(what, self.rank, "send", send.len(), recv.len() * self.size_n())?;
        let full = self.reduce_vec(what, send, op)?;
        let k = recv.len();
        recv.copy_from_slice(&full[self.rank * k..(self.rank + 1) * k]);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let what = "broadcast_bytes";
        check_rank(what, self.rank, root, self.size_n())?;
        let mine = if self.rank == root { Data::Bytes(buf.clone()) } else { Data::Unit };
        let (posts, ()) = self.exchange(what, mine, |_| ())?;
        match &posts[root].data {
            Data::Bytes(b) => {
                buf.clone_from(b);
                Ok(())
            }
            _ => Err(Error::Comm(format!("{what} on rank {}: the ranks disagree on the root", self.rank))),
        }
    }

    fn send_recv_bytes(&self, send: Option<(&[u8], usize)>, recv: Option<usize>) -> Result<Option<Vec<u8>>> {
        let what = "send_recv_bytes";
        let n = self.size_n();
        if let Some(e) = self.group.run.failure() {
            return Err(e);
        }
        if let Some((data, dst)) = send {
            check_rank(what, self.rank, dst, n)?;
            let mut st = lock(&self.group.state);
            st.mail.entry((self.rank, dst)).or_default().push_back(data.to_vec());
            self.group.cv.notify_all();
        }
        let Some(src) = recv else { return Ok(None) };
        check_rank(what, self.rank, src, n)?;
        let st = lock(&self.group.state);
        let key = (src, self.rank);
        let (_st, msg) = self.group.wait(self.rank, &format!("{what} (receive from rank {src})"), st, |st| {
            st.mail.get_mut(&key).and_then(|q| q.pop_front()).ok_or_else(|| vec![src])
        })?;
        Ok(Some(msg))
    }

    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Data::Unit, |_| ()).map(|_| ())
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let what = "split";
        let run = self.group.run.clone();
        let members_of = |posts: &[Arc<Post>]| -> Result<Vec<(usize, usize)>> {
            // (key, rank) of every member of this rank's color, in the new group's order.
            let mut m = Vec::new();
            for (r, p) in posts.iter().enumerate() {
                match p.data {
                    Data::Split { color: c, key: k } if c == color => m.push((k, r)),
                    Data::Split { .. } => {}
                    _ => {
                        return Err(Error::Comm(format!(
                            "split on rank {}: rank {r} of its group called {} instead: the ranks' collectives are out of step",
                            self.rank, p.what
                        )))
                    }
                }
            }
            m.sort_unstable();
            Ok(m)
        };
        let parent = self.group.clone();
        let (posts, child) = self.exchange(what, Data::Split { color, key }, |round| {
            let posts: Vec<Arc<Post>> = round.posts.iter().flatten().cloned().collect();
            let members = members_of(&posts)?;
            let child = round
                .children
                .entry(color)
                .or_insert_with(|| {
                    Arc::new(Group::new(members.iter().map(|&(_, r)| parent.members[r]).collect(), run.clone()))
                })
                .clone();
            Ok::<_, Error>(child)
        })?;
        let child = child?;
        let members = members_of(&posts)?;
        let rank = members
            .iter()
            .position(|&(_, r)| r == self.rank)
            .ok_or_else(|| Error::Comm(format!("split on rank {}: not in its own color's group", self.rank)))?;
        Ok(Box::new(LocalComm { group: child, rank, next_round: Cell::new(0) }))
    }
}

pub(crate) fn check_len(what: &str, rank: usize, name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Comm(format!(
            "{what} on rank {rank}: the {name} buffer holds {got} values, expected {want}"
        )));
    }
    Ok(())
}

pub(crate) fn check_rank(what: &str, rank: usize, peer: usize, size: usize) -> Result<()> {
    if peer >= size {
        return Err(Error::Comm(format!("{what} on rank {rank}: rank {peer} is outside the group of {size}")));
    }
    Ok(())
}
