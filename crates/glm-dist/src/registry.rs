//! Communicators reachable from inside candle ops. A communicator is not `Send` (MPI and NCCL
//! handles belong to their thread), but a tensor-parallel layer is (the model is shared across
//! threads) and a candle op must be `Send + Sync`. So a layer holds a [`Group`], a plain index,
//! and the communicator lives in a thread-local table of the rank's thread: every collective of a
//! rank runs on the thread that registered its groups (true of the forward and of candle's
//! backward, which runs on the caller's thread).

use std::cell::RefCell;
use std::rc::Rc;

use crate::comm::Communicator;
use crate::{Error, Result};

thread_local! {
    static GROUPS: RefCell<Vec<Rc<dyn Communicator>>> = const { RefCell::new(Vec::new()) };
}

/// A handle to a communicator registered on this thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    index: usize,
    rank: usize,
    size: usize,
}

impl Group {
    /// Registers `comm` on the calling thread.
    pub fn register(comm: Rc<dyn Communicator>) -> Group {
        let (rank, size) = (comm.rank(), comm.size());
        let index = GROUPS.with(|g| {
            let mut g = g.borrow_mut();
            g.push(comm);
            g.len() - 1
        });
        Group { index, rank, size }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f` with the communicator; an error if called from a thread that did not register it.
    pub fn with<R>(&self, f: impl FnOnce(&dyn Communicator) -> Result<R>) -> Result<R> {
        let comm = GROUPS.with(|g| g.borrow().get(self.index).cloned());
        match comm {
            Some(c) if c.rank() == self.rank && c.size() == self.size => f(c.as_ref()),
            _ => Err(Error::Comm(format!(
                "communicator group #{} (rank {} of {}) is not registered on this thread: a rank's \
                 collectives must run on the thread that set up its groups",
                self.index, self.rank, self.size
            ))),
        }
    }
}

/// Forgets every communicator registered on this thread (end of a rank's run).
pub fn clear() {
    GROUPS.with(|g| g.borrow_mut().clear());
}
