//! Megatron's rank groups. Ranks are laid out tp fastest, then dp, then pp
//! (`parallel_state.py`, order "tp-cp-ep-dp-pp" with cp = ep = 1), so a tensor-parallel group is a
//! run of consecutive ranks, which keeps its heavy traffic inside a node.

use std::fmt;
use std::rc::Rc;

use crate::comm::Communicator;
use crate::{Error, Result};

/// The degrees of tensor, pipeline and data parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub tp: usize,
    pub pp: usize,
    pub dp: usize,
}

impl Layout {
    pub fn new(tp: usize, pp: usize, dp: usize) -> Result<Layout> {
        for (name, v) in [("tp", tp), ("pp", pp), ("dp", dp)] {
            if v == 0 {
                return Err(Error::Layout(format!("{name} must be at least 1 (layout tp {tp} x pp {pp} x dp {dp})")));
            }
        }
        Ok(Layout { tp, pp, dp })
    }

    pub fn world_size(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// (tp_rank, dp_rank, pp_rank) of a global rank.
    pub fn coords(&self, global_rank: usize) -> (usize, usize, usize) {
        let tp_rank = global_rank % self.tp;
        let dp_rank = (global_rank / self.tp) % self.dp;
        let pp_rank = global_rank / (self.tp * self.dp);
        (tp_rank, dp_rank, pp_rank)
    }

    /// The global rank at the given coordinates: `tp + TP * (dp + DP * pp)`.
    pub fn global(&self, tp_rank: usize, dp_rank: usize, pp_rank: usize) -> usize {
        tp_rank + self.tp * (dp_rank + self.dp * pp_rank)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tp {} x pp {} x dp {}", self.tp, self.pp, self.dp)
    }
}

/// One rank's communicators for the three kinds of parallelism.
pub struct ParallelGroups {
    pub layout: Layout,
    pub world: Rc<dyn Communicator>,
    /// The ranks that share this rank's (dp, pp): they split the layers' matrices.
    pub tp: Rc<dyn Communicator>,
    /// The ranks that share this rank's (tp, pp): replicas whose gradients are averaged.
    pub dp: Rc<dyn Communicator>,
    /// The ranks that share this rank's (tp, dp): the stages of one pipeline, in order.
    pub pp: Rc<dyn Communicator>,
    /// First and last stage of this rank's pipeline, for the tied word embedding's gradients;
    /// `None` when pp == 1 or on a middle stage.
    pub embedding: Option<Rc<dyn Communicator>>,
    pub tp_rank: usize,
    pub dp_rank: usize,
    pub pp_rank: usize,
}

impl ParallelGroups {
    /// Splits `world` into the layout's groups. Collective: every rank of `world` must call it.
    pub fn new(world: Rc<dyn Communicator>, layout: Layout) -> Result<ParallelGroups> {
        let layout = Layout::new(layout.tp, layout.pp, layout.dp)?;
        let n = world.size();
        if n != layout.world_size() {
            return Err(Error::Layout(format!(
                "world size {n} does not match the layout: {layout} = {} ranks",
                layout.world_size()
            )));
        }
        let Layout { tp, pp, dp } = layout;
        let (tp_rank, dp_rank, pp_rank) = layout.coords(world.rank());
        let split = |name: &str, color: usize, key: usize, size: usize| -> Result<Rc<dyn Communicator>> {
            let c: Rc<dyn Communicator> = Rc::from(world.split(color, key)?);
            if c.size() != size || c.rank() != key {
                return Err(Error::Layout(format!(
                    "{name} group of rank {}: rank {} of {}, expected rank {key} of {size} ({layout})",
                    world.rank(),
                    c.rank(),
                    c.size()
                )));
            }
            Ok(c)
        };
        let tp_group = split("tp", dp_rank + dp * pp_rank, tp_rank, tp)?;
        let dp_group = split("dp", tp_rank + tp * pp_rank, dp_rank, dp)?;
        let pp_group = split("pp", tp_rank + tp * dp_rank, pp_rank, pp)?;
        let embedding = if pp > 1 {
            let ends = pp_rank == 0 || pp_rank == pp - 1;
            // Middle stages must join the split too (it is collective); each gets a group of its
            // own, dropped at once.
            let color = if ends { tp_rank + tp * dp_rank } else { n + world.rank() };
            let key = if pp_rank == 0 { 0 } else { 1 };
            let g = world.split(color, key)?;
            ends.then(|| Rc::from(g))
        } else {
            None
        };
        Ok(ParallelGroups {
            layout,
            world,
            tp: tp_group,
            dp: dp_group,
            pp: pp_group,
            embedding,
            tp_rank,
            dp_rank,
            pp_rank,
        })
    }

    /// The global ranks of this rank's pipeline's first and last stage (Megatron's embedding ranks).
    pub fn embedding_ranks(&self) -> Vec<usize> {
        let l = self.layout;
        let first = l.global(self.tp_rank, self.dp_rank, 0);
        let last = l.global(self.tp_rank, self.dp_rank, l.pp - 1);
        if first == last {
            vec![first]
        } else {
            vec![first, last]
        }
    }

    pub fn is_first_stage(&self) -> bool {
        self.pp_rank == 0
    }

    pub fn is_last_stage(&self) -> bool {
        self.pp_rank + 1 == self.layout.pp
    }
}
