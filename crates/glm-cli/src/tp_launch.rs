//! `--tp N --ranks local|mpi` for `glm generate`, `glm fill` and `glm eval`: tensor-parallel
//! inference, SPMD. Every rank loads its slices of the model (built with
//! `TpFactory::for_inference`, so every rank's logits are the full vocabulary, bit-identical across
//! ranks) and runs the same deterministic generation or evaluation loop on them, so every rank
//! reaches the same result; the ranks check that they agree, and only rank 0 prints.
//!
//! `--ranks local` runs the N ranks as threads of this process (glm_dist::LocalComm); under
//! `mpirun -np N` (a build with the `mpi` feature) each rank is a process.

use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use glm_dist::{Communicator, Group};

#[derive(Args, Clone, Debug)]
pub struct TpArgs {
    /// Tensor-parallel degree: each layer's heads, FFN columns and vocabulary split over N ranks
    /// (every rank decodes on the gathered logits; rank 0 prints).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Where the ranks run: `mpi` (one process per rank, launched by `mpirun -np N`; the default
    /// under mpirun) or `local` (one thread per rank in this process).
    #[arg(long, value_parser = ["local", "mpi"])]
    pub ranks: Option<String>,
    /// A collective waiting longer than this for a peer fails the run (a dead or stuck rank).
    #[arg(long, default_value_t = 300)]
    pub dist_timeout: u64,
}

/// How the ranks are spread.
enum Launch {
    Single,
    Local(usize),
    Mpi(usize),
}

/// One rank's place in the run: `group` is `None` for the single process.
#[derive(Clone, Copy)]
pub struct Rank {
    pub group: Option<Group>,
}

impl Rank {
    /// Rank 0 (or the single process): the one that prints and writes.
    pub fn main(&self) -> bool {
        self.group.is_none_or(|g| g.rank() == 0)
    }

    /// Checks that every rank reached rank 0's `result` (a rendering of what it computed): the
    /// ranks decode independently, so a divergence (a backend whose reductions differ between
    /// ranks) is reported instead of printing one rank's answer.
    pub fn agree(&self, what: &str, result: &[u8]) -> Result<()> {
        let Some(g) = self.group.filter(|g| g.size() > 1) else { return Ok(()) };
        let mut first = result.to_vec();
        g.with(|c| c.broadcast_bytes(&mut first, 0))?;
        if first != result {
            bail!(
                "tensor-parallel rank {} of {} computed a different {what} from rank 0's: the ranks' logits \
                 disagree",
                g.rank(),
                g.size()
            );
        }
        Ok(())
    }
}

impl TpArgs {
    fn launch(&self, cmd: &str) -> Result<Launch> {
        if self.tp == 0 {
            bail!("--tp must be at least 1");
        }
        let under_mpirun =
            ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some());
        Ok(match self.ranks.as_deref() {
            Some("local") => Launch::Local(self.tp),
            Some(_) => Launch::Mpi(self.tp),
            None if under_mpirun => Launch::Mpi(self.tp),
            None if self.tp > 1 => bail!(
                "--tp {n} needs {n} ranks: launch with `mpirun -np {n} glm {cmd} ...` (a build with --features \
                 mpi), or add --ranks local to run them as threads of this process",
                n = self.tp
            ),
            None => Launch::Single,
        })
    }

    /// Runs `f` on every rank (or once, in this process, without tensor parallelism) and returns
    /// rank 0's result. `f` must make the same collective calls on every rank.
    pub fn run<T: Send>(&self, cmd: &str, f: impl Fn(Rank) -> Result<T> + Send + Sync) -> Result<T> {
        let timeout = Duration::from_secs(self.dist_timeout.max(1));
        match self.launch(cmd)? {
            Launch::Single => f(Rank { group: None }),
            Launch::Local(n) => {
                let mut out = glm_dist::LocalComm::run(n, timeout, |world: Rc<dyn Communicator>| {
                    let group = Group::register(world);
                    // The message keeps its causes: it is the run's error.
                    f(Rank { group: Some(group) }).map_err(|e| glm_dist::Error::Comm(format!("{e:#}")))
                })?;
                if out.is_empty() {
                    bail!("no rank ran");
                }
                Ok(out.swap_remove(0))
            }
            Launch::Mpi(n) => run_mpi(n, timeout, f),
        }
    }
}

#[cfg(feature = "mpi")]
fn run_mpi<T>(n: usize, timeout: Duration, f: impl Fn(Rank) -> Result<T>) -> Result<T> {
    let world = glm_dist::mpi::world(timeout)?;
    let (rank, size) = (world.rank(), world.size());
    let result = if size != n {
        Err(anyhow::anyhow!("world size {size} does not match the layout: --tp {n} needs {n} ranks (mpirun -np {n})"))
    } else {
        f(Rank { group: Some(Group::register(world)) })
    };
    match result {
        Ok(v) => {
            glm_dist::mpi::finalize();
            Ok(v)
        }
        Err(e) => {
            // The peers may be inside a collective waiting for this rank: end the whole job.
            eprintln!("error: rank {rank}: {e:#}");
            glm_dist::mpi::abort(1)
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn run_mpi<T>(n: usize, _timeout: Duration, _f: impl Fn(Rank) -> Result<T>) -> Result<T> {
    bail!(
        "--tp {n} over MPI needs a glm built with MPI: `cargo build --release --features mpi` (Debian: apt install \
         libopenmpi-dev openmpi-bin libclang-dev), or run the ranks as threads with --ranks local"
    )
}
