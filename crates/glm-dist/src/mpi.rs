//! The MPI backend (rsmpi on the system's MPI): one process per rank, CPU collectives, multi-node.
//!
//! Every operation is posted in its immediate (non-blocking) form and polled against a deadline,
//! so a stuck or dead peer turns into an error naming the operation instead of a hang. A timed-out
//! request can never be completed or cancelled (MPI has no way to cancel a collective), and MPI may
//! still write into its buffers later: those buffers are therefore always copies owned here, and
//! are leaked on timeout. After such an error the process should [`abort`]: MPI's state is gone
//! (and `MPI_Finalize` could wait forever for the stuck peer).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::request::{Request, Scope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::{Communicator as _, CommunicatorCollectives, Destination, Root, Source};

use crate::comm::{Communicator, ReduceOp};
use crate::local::{check_len, check_rank};
use crate::{Error, Result};

/// The tag of `send_recv_bytes` messages (collectives travel apart from point-to-point traffic).
const TAG: i32 = 0x474c;

thread_local! {
    // MPI_Init runs once per process; the Universe finalizes MPI when dropped, so it lives as long
    // as the thread that made it (the main thread: until exit, or [`finalize`]).
    static UNIVERSE: RefCell<Option<Universe>> = const { RefCell::new(None) };
}

/// The world communicator. Initializes MPI on the first call (later calls return the same world,
/// with this call's timeout). Without `mpirun` it is a world of one rank.
/// `timeout` bounds each collective and each receive.
pub fn world(timeout: Duration) -> Result<Rc<dyn Communicator>> {
    if mpi::is_finalized() {
        return Err(Error::Comm("MPI was already finalized in this process".into()));
    }
    let comm = UNIVERSE.with(|u| {
        let mut u = u.borrow_mut();
        if u.is_none() {
            if mpi::is_initialized() {
                return Err(Error::Comm(
                    "MPI was initialized on another thread: MPI communicators belong to the thread that \
                     initialized it"
                        .into(),
                ));
            }
            *u = Some(mpi::initialize().ok_or_else(|| Error::Comm("MPI_Init failed".into()))?);
        }
        u.as_ref().map(|u| u.world()).ok_or_else(|| Error::Comm("MPI is not initialized".into()))
    })?;
    Ok(Rc::new(MpiComm::new(comm, timeout)))
}

/// Finalizes MPI (also done at the exit of the thread that initialized it). Every communicator
/// must be done with (the ones registered for the model's ops are released here first); only
/// after a clean run (after an error, [`abort`]).
pub fn finalize() {
    crate::registry::clear();
    UNIVERSE.with(|u| drop(u.borrow_mut().take()));
}

/// Ends every rank of the job at once (MPI_Abort on the world): what a failed rank does so that
/// its peers do not wait for it.
pub fn abort(code: i32) -> ! {
    if mpi::is_initialized() && !mpi::is_finalized() {
        SimpleCommunicator::world().abort(code)
    }
    std::process::exit(code)
}

/// One rank's view of an MPI communicator. Not `Send`: the handle belongs to the MPI thread.
pub struct MpiComm {
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
}

fn op(op: ReduceOp) -> SystemOperation {
    match op {
        ReduceOp::Sum => SystemOperation::sum(),
        ReduceOp::Max => SystemOperation::max(),
    }
}

/// Polls `test` until it reports completion, backing off so oversubscribed ranks (more ranks than
/// cores; OpenMPI otherwise busy-polls) leave the CPU to the peers they wait for.
fn poll_until(deadline: Instant, mut test: impl FnMut() -> bool) -> bool {
    let mut polls = 0u32;
    loop {
        if test() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        polls += 1;
        if polls < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(u64::from((polls - 100).min(1000)) + 20));
        }
    }
}

/// Completes `req` by `deadline`, or gives it up: the caller must then leak its buffers.
fn complete<'a, D: ?Sized, S: Scope<'a>>(req: Request<'a, D, S>, deadline: Instant) -> bool {
    let mut req = Some(req);
    let done = poll_until(deadline, || match req.take().map(Request::test) {
        Some(Ok(_)) | None => true,
        Some(Err(r)) => {
            req = Some(r);
            false
        }
    });
    if let Some(r) = req {
        // SAFETY: the request is abandoned, never completed; the callers leak every buffer it
        // refers to, so MPI can still write into them.
        let _ = unsafe { r.into_raw() };
    }
    done
}

impl MpiComm {
    fn new(comm: SimpleCommunicator, timeout: Duration) -> Self {
        let rank = usize::try_from(comm.rank()).unwrap_or(0);
        let size = usize::try_from(comm.size()).unwrap_or(1);
        MpiComm { comm, rank, size, timeout }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    fn timed_out(&self, what: &str) -> Error {
        Error::Comm(format!(
            "{what} on rank {} of {} (mpi) timed out after {} s: a peer died or is stuck",
            self.rank,
            self.size,
            self.timeout.as_secs_f64()
        ))
    }

    fn peer(&self, what: &str, r: usize) -> Result<i32> {
        check_rank(what, self.rank, r, self.size)?;
        i32::try_from(r).map_err(|_| Error::Comm(format!("{what}: rank {r} does not fit an MPI rank")))
    }

    fn bcast_vec<T: Equivalence>(&self, what: &str, data: Vec<T>, root: i32) -> Result<Vec<T>> {
        let mut data = data;
        let deadline = self.deadline();
        let done = mpi::request::scope(|sc| {
            complete(self.comm.process_at_rank(root).immediate_broadcast_into(sc, &mut data[..]), deadline)
        });
        if done {
            Ok(data)
        } else {
            std::mem::forget(data);
            Err(self.timed_out(what))
        }
    }
}

/// An all-reduce in any MPI type, through owned copies (leaked on timeout).
macro_rules! all_reduce {
    ($self:ident, $what:literal, $buf:ident, $op:ident) => {{
        let send = $buf.to_vec();
        let mut recv = send.clone();
        let deadline = $self.deadline();
        let done = mpi::request::scope(|sc| {
            complete($self.comm.immediate_all_reduce_into(sc, &send[..], &mut recv[..], op($op)), deadline)
        });
        if !done {
            std::mem::forget((send, recv));
            return Err($self.timed_out($what));
        }
        $buf.copy_from_slice(&recv);
        Ok(())
    }};
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_f32(&self, buf: &mut [f32], rop: ReduceOp) -> Result<()> {
        all_reduce!(self, "all_reduce_f32", buf, rop)
    }

    fn all_reduce_f64(&self, buf: &mut [f64], rop: ReduceOp) -> Result<()> {
        all_reduce!(self, "all_reduce_f64", buf, rop)
    }

    fn all_gather_f32(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let what = "all_gather_f32";
        check_len(what, self.rank, "recv", recv.len(), send.len() * self.size)?;
        let send_buf = send.to_vec();
        let mut recv_buf = vec![0f32; recv.len()];
        let deadline = self.deadline();
        let done = mpi::request::scope(|sc| {
            complete(self.comm.immediate_all_gather_into(sc, &send_buf[..], &mut recv_buf[..]), deadline)
        });
        if !done {
            std::mem::forget((send_buf, recv_buf));
            return Err(self.timed_out(what));
        }
        recv.copy_from_slice(&recv_buf);
        Ok(())
    }

    fn reduce_scatter_f32(&self, send: &[f32], recv: &mut [f32], rop: ReduceOp) -> Result<()> {
        let what = "reduce_scatter_f32";
        check_len(what, self.rank, "send", send.len(), recv.len() * self.size)?;
        let send_buf = send.to_vec();
        let mut recv_buf = vec![0f32; recv.len()];
        let deadline = self.deadline();
        let done = mpi::request::scope(|sc| {
            let req = self.comm.immediate_reduce_scatter_block_into(sc, &send_buf[..], &mut recv_buf[..], op(rop));
            complete(req, deadline)
        });
        if !done {
            std::mem::forget((send_buf, recv_buf));
            return Err(self.timed_out(what));
        }
        recv.copy_from_slice(&recv_buf);
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let what = "broadcast_bytes";
        let root = self.peer(what, root)?;
        let is_root = self.rank == root as usize;
        // The receivers' lengths may differ from the root's: the length goes first.
        let len = self.bcast_vec(&format!("{what} (length)"), vec![buf.len() as u64], root)?;
        let len = usize::try_from(len[0]).map_err(|_| Error::Comm(format!("{what}: length {} overflows", len[0])))?;
        let data = if is_root { buf.clone() } else { vec![0u8; len] };
        *buf = self.bcast_vec(what, data, root)?;
        Ok(())
    }

    fn send_recv_bytes(&self, send: Option<(&[u8], usize)>, recv: Option<usize>) -> Result<Option<Vec<u8>>> {
        let what = "send_recv_bytes";
        let dst = send.map(|(_, d)| self.peer(what, d)).transpose()?;
        let src = recv.map(|s| self.peer(what, s)).transpose()?;
        let send_buf: Vec<u8> = send.map(|(d, _)| d.to_vec()).unwrap_or_default();
        let mut recv_buf: Vec<u8> = Vec::new();
        let deadline = self.deadline();
        // The receive's size is unknown until its message is probed, so it is posted then; the
        // send is posted at once, which is what makes any call order deadlock-free.
        let done = mpi::request::scope(|sc| {
            let mut sreq = dst.map(|d| self.comm.process_at_rank(d).immediate_send_with_tag(sc, &send_buf[..], TAG));
            let mut probing = src;
            let mut rreq = None;
            let rb = &mut recv_buf;
            let mut rb = Some(rb);
            let ok = poll_until(deadline, || {
                if let Some(r) = sreq.take() {
                    sreq = r.test().err();
                }
                if let Some(s) = probing {
                    if let Some((msg, status)) = self.comm.process_at_rank(s).immediate_matched_probe_with_tag(TAG) {
                        probing = None;
                        let n = usize::try_from(status.count(u8::equivalent_datatype())).unwrap_or(0);
                        if let Some(rb) = rb.take() {
                            rb.resize(n, 0);
                            rreq = Some(msg.immediate_matched_receive_into(sc, &mut rb[..]));
                        }
                    }
                }
                if let Some(r) = rreq.take() {
                    rreq = r.test().err();
                }
                sreq.is_none() && probing.is_none() && rreq.is_none()
            });
            // SAFETY: as in `complete`: on timeout the requests are abandoned and the buffers leaked.
            if let Some(r) = sreq {
                let _ = unsafe { r.into_raw() };
            }
            if let Some(r) = rreq {
                let _ = unsafe { r.into_raw() };
            }
            ok
        });
        if !done {
            std::mem::forget((send_buf, recv_buf));
            let peers = match (dst, src) {
                (Some(d), Some(s)) => format!(" (send to rank {d}, receive from rank {s})"),
                (Some(d), None) => format!(" (send to rank {d})"),
                (None, Some(s)) => format!(" (receive from rank {s})"),
                (None, None) => String::new(),
            };
            return Err(self.timed_out(&format!("{what}{peers}")));
        }
        Ok(src.map(|_| recv_buf))
    }

    fn barrier(&self) -> Result<()> {
        if complete(self.comm.immediate_barrier(), self.deadline()) {
            Ok(())
        } else {
            Err(self.timed_out("barrier"))
        }
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let what = "split";
        let c = i32::try_from(color)
            .map_err(|_| Error::Comm(format!("{what}: color {color} does not fit an MPI color")))?;
        let k = i32::try_from(key).map_err(|_| Error::Comm(format!("{what}: key {key} does not fit an MPI key")))?;
        // MPI_Comm_split has no immediate form: a barrier first turns a missing rank into an error.
        if !complete(self.comm.immediate_barrier(), self.deadline()) {
            return Err(self.timed_out(what));
        }
        let sub = self.comm.split_by_color_with_key(Color::with_value(c), k).ok_or_else(|| {
            Error::Comm(format!("{what} on rank {}: MPI returned no communicator for color {color}", self.rank))
        })?;
        Ok(Box::new(MpiComm::new(sub, self.timeout)))
    }
}
