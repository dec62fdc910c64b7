//! The equivalence tests of `tests/dist.rs` as MPI processes: `mpirun -np N mpi_equivalence DIR
//! ARCH TP PP DP ZERO DROPOUT` trains the single run and the split run (this process one rank of it)
//! in DIR and checks that they agree. `scripts/mpi-tests.sh` runs it for every layout.

use std::path::PathBuf;
use std::time::Duration;

use glm_dist::Layout;
use glm_train::testing::{compare, config, opts, pipeline_config, rank_run};
use glm_train::Trainer;

fn main() {
    if let Err(e) = run() {
        eprintln!("mpi_equivalence: error: {e:#}");
        glm_dist::mpi::abort(1);
    }
    glm_dist::mpi::finalize();
}

fn run() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() == 8, "usage: mpi_equivalence DIR glm|chatglm TP PP DP ZERO(0|1) DROPOUT(0|1)");
    let (dir, arch) = (PathBuf::from(&a[1]), a[2].as_str());
    let (tp, pp, dp): (usize, usize, usize) = (a[3].parse()?, a[4].parse()?, a[5].parse()?);
    let (zero, dropout) = (a[6] == "1", a[7] == "1");
    let world = glm_dist::mpi::world(Duration::from_secs(120))?;
    let rank = world.rank();
    // Each rank writes its own copy of the model config and runs the single baseline alone.
    let own = dir.join(format!("rank{rank}"));
    std::fs::create_dir_all(&own)?;
    // Pipelines get 5 layers (uneven stages) and 8 micro-batches.
    let cfg = if pp > 1 { pipeline_config(arch, dropout, &own)? } else { config(arch, dropout, &own)? };
    let single_out = own.join("single");
    let mut t = Trainer::new(cfg.clone(), opts(&single_out, false, None))?;
    t.run()?;
    let base = t.weights();
    let split_out = dir.join("split");
    let got = rank_run(world, Layout::new(tp, pp, dp)?, zero, &cfg, &opts(&split_out, false, None))?;
    let what = format!("mpi {arch} dropout={dropout} tp {tp} pp {pp} dp {dp} zero {zero}");
    let worst = compare(&what, (&single_out, &base), (&split_out, &got))?;
    if rank == 0 {
        println!("{what}: 5 steps match the single process (worst weight rel err {worst:.1e})");
    }
    Ok(())
}
