//! The shared state of an in-process group: numbered rounds of posts for the collectives, FIFO
//! mailboxes for point-to-point, and the run-wide failure flag every wait checks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How often a waiting rank re-checks the failure flag (other groups do not notify this one).
const POLL: Duration = Duration::from_millis(10);

/// State shared by every group of one [`super::LocalComm::run`].
pub(super) struct Run {
    pub(super) failed: AtomicBool,
    /// The first failure: (world rank, message). Later ones are echoes of it.
    pub(super) first: Mutex<Option<(usize, String)>>,
    pub(super) exited: Mutex<Vec<bool>>,
    pub(super) timeout: Duration,
}

impl Run {
    pub(super) fn new(world: usize, timeout: Duration) -> Self {
        Run { failed: AtomicBool::new(false), first: Mutex::new(None), exited: Mutex::new(vec![false; world]), timeout }
    }

    pub(super) fn fail(&self, rank: usize, msg: String) {
        let mut first = lock(&self.first);
        if first.is_none() {
            *first = Some((rank, msg));
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// A rank is done: its peers stop waiting for it (at once if it failed).
    pub(super) fn exit(&self, rank: usize, err: Option<&Error>) {
        if let Some(e) = err {
            self.fail(rank, e.to_string());
        }
        lock(&self.exited)[rank] = true;
    }

    pub(super) fn failure(&self) -> Option<Error> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.first).as_ref().map(|(r, m)| Error::Comm(format!("rank {r} failed: {m}")))
    }
}

/// Poisoning only means another rank panicked while holding the lock; that rank's failure is
/// reported through `Run`, and the protected data stays consistent (no update spans a panic).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
    Unit,
    Split { color: usize, key: usize },
}

pub(super) struct Post {
    pub(super) what: &'static str,
    pub(super) data: Data,
}

pub(super) struct Round {
    pub(super) posts: Vec<Option<Arc<Post>>>,
    pub(super) taken: usize,
    /// Sub-groups made by a split round, by color: the first member to look creates it.
    pub(super) children: HashMap<usize, Arc<Group>>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) rounds: HashMap<u64, Round>,
    pub(super) mail: HashMap<(usize, usize), VecDeque<Vec<u8>>>,
}

pub(super) struct Group {
    /// World rank of each member, by group rank.
    pub(super) members: Vec<usize>,
    pub(super) run: Arc<Run>,
    pub(super) state: Mutex<State>,
    pub(super) cv: Condvar,
}

impl Group {
    pub(super) fn new(members: Vec<usize>, run: Arc<Run>) -> Self {
        Group { members, run, state: Mutex::new(State::default()), cv: Condvar::new() }
    }

    /// Waits on the group's condvar until `ready` says yes, the run fails, one of the ranks `ready`
    /// says are missing finishes its run, or the deadline passes.
    pub(super) fn wait<'g, R>(
        &'g self,
        rank: usize,
        what: &str,
        mut st: MutexGuard<'g, State>,
        mut ready: impl FnMut(&mut State) -> std::result::Result<R, Vec<usize>>,
    ) -> Result<(MutexGuard<'g, State>, R)> {
        let timeout = self.run.timeout;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.run.failure() {
                return Err(e);
            }
            let missing = match ready(&mut st) {
                Ok(r) => return Ok((st, r)),
                Err(missing) => missing,
            };
            let world: Vec<usize> = missing.iter().map(|&r| self.members[r]).collect();
            let exited = lock(&self.run.exited).clone();
            if let Some(&gone) = world.iter().find(|&&w| exited[w]) {
                return Err(Error::Comm(format!(
                    "{what} on rank {} of {} (local): rank {gone} finished its run without joining it",
                    rank,
                    self.members.len()
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Comm(format!(
                    "{what} on rank {} of {} (local) timed out after {} s waiting for rank(s) {world:?}: \
                     a peer died or is stuck",
                    rank,
                    self.members.len(),
                    timeout.as_secs_f64()
                )));
            }
            st = self.cv.wait_timeout(st, POLL.min(deadline - now)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Posts `data` to round `id` and returns every rank's post, in rank order, plus what `post`
    /// computes under the lock once the round is complete.
    pub(super) fn exchange<R>(
        &self,
        rank: usize,
        id: u64,
        what: &'static str,
        data: Data,
        post: impl FnOnce(&mut Round) -> R,
    ) -> Result<(Vec<Arc<Post>>, R)> {
        if let Some(e) = self.run.failure() {
            return Err(e);
        }
        let n = self.members.len();
        let mut st = lock(&self.state);
        let round =
            st.rounds.entry(id).or_insert_with(|| Round { posts: vec![None; n], taken: 0, children: HashMap::new() });
        round.posts[rank] = Some(Arc::new(Post { what, data }));
        self.cv.notify_all();
        let (mut st, posts) = self.wait(rank, what, st, |st| {
            let round = st.rounds.get(&id).ok_or_else(Vec::new)?;
            let missing: Vec<usize> = (0..n).filter(|&r| round.posts[r].is_none()).collect();
            if missing.is_empty() {
                Ok(round.posts.iter().flatten().cloned().collect::<Vec<_>>())
            } else {
                Err(missing)
            }
        })?;
        let Some(round) = st.rounds.get_mut(&id) else {
            return Err(Error::Comm(format!("{what} on rank {rank}: round {id} vanished")));
        };
        let out = post(round);
        round.taken += 1;
        if round.taken == n {
            st.rounds.remove(&id);
        }
        drop(st);
        if let Some(p) = posts.iter().find(|p| p.what != what) {
            return Err(Error::Comm(format!(
                "rank {} called {what} while another rank of its group called {}: the ranks' collectives are out of step",
                rank, p.what
            )));
        }
        Ok((posts, out))
    }
}

/// The element types of the reductions.
pub(super) trait Elem: Copy + PartialOrd + std::ops::Add<Output = Self> {
    fn wrap(v: Vec<Self>) -> Data;
    fn unwrap(d: &Data) -> Option<&[Self]>;
}

impl Elem for f32 {
    fn wrap(v: Vec<Self>) -> Data {
        Data::F32(v)
    }
    fn unwrap(d: &Data) -> Option<&[Self]> {
        match d {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Elem for f64 {
    fn wrap(v: Vec<Self>) -> Data {
        Data::F64(v)
    }
    fn unwrap(d: &Data) -> Option<&[Self]> {
        match d {
            Data::F64(v) => Some(v),
            _ => None,
        }
    }
}
