//! `glm reshard` and `glm bench dist`: distributed checkpoints and the cost of splitting a step.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct ReshardArgs {
    /// A training checkpoint directory (`runs/NAME/checkpoints/step-N`), at any TP x PP layout.
    pub checkpoint: PathBuf,
    /// The new tensor-parallel degree (with --pp 1, 1 makes one `model.safetensors`, which
    /// `glm generate` reads).
    #[arg(long)]
    pub tp: usize,
    /// The new pipeline-parallel degree (stages balanced as `glm train --pp` cuts them).
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// The new checkpoint directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn reshard(a: ReshardArgs) -> Result<()> {
    let state: serde_json::Value = serde_json::from_slice(&glm_train::ckpt::Checkpoints::load_state(&a.checkpoint)?)
        .with_context(|| format!("{}: bad state.json", a.checkpoint.display()))?;
    let cfg: glm_model::Config = serde_json::from_value(state["model"].clone())
        .with_context(|| format!("{}: state.json has no readable model config", a.checkpoint.display()))?;
    cfg.validate().with_context(|| format!("{}: state.json", a.checkpoint.display()))?;
    let (tp, pp) = glm_train::ckpt::checkpoint_layout(&a.checkpoint)?;
    glm_train::ckpt::Checkpoints::reshard(&a.checkpoint, &a.out, &cfg, a.tp, a.pp)?;
    eprintln!("{}: tp {tp} x pp {pp} -> tp {} x pp {} ({})", a.checkpoint.display(), a.tp, a.pp, a.out.display());
    Ok(())
}

#[derive(Args)]
pub struct DistBenchArgs {
    /// Where the ranks live: `local` (threads of this process) or `mpi` (one process per rank,
    /// under mpirun; needs a build with --features mpi). Default: mpi when launched by Open MPI's
    /// mpirun (OMPI_COMM_WORLD_SIZE is set), else local.
    #[arg(long, value_parser = ["local", "mpi"])]
    pub ranks: Option<String>,
    #[command(flatten)]
    pub opts: glm_bench::dist::DistBenchOpts,
}

pub fn bench(a: DistBenchArgs) -> Result<()> {
    let o = a.opts;
    glm_bench::dist::prepare_env(&o);
    let under_mpirun = std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some();
    let report = match a.ranks.as_deref().unwrap_or(if under_mpirun { "mpi" } else { "local" }) {
        "local" => Some(glm_bench::dist::run_local(&o)?),
        _ => {
            #[cfg(feature = "mpi")]
            {
                let world = glm_dist::mpi::world(std::time::Duration::from_secs(o.timeout_s))?;
                match glm_bench::dist::run_world(world, &o) {
                    Ok(r) => {
                        glm_dist::mpi::finalize();
                        r
                    }
                    Err(e) => {
                        // The peers may wait inside a collective for this rank: end them all.
                        eprintln!("error: {e:#}");
                        glm_dist::mpi::abort(1)
                    }
                }
            }
            #[cfg(not(feature = "mpi"))]
            anyhow::bail!("--ranks mpi needs a build with MPI: cargo build --release -p glm-cli --features mpi")
        }
    };
    let Some(report) = report else { return Ok(()) }; // not rank 0
    println!("{}", glm_bench::dist::render(&report));
    if let Some(p) = &o.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
