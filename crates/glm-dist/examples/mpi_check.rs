//! The backend checks on MPI, run by `scripts/mpi-tests.sh` under `mpirun -np N`.
//!
//! `mpi_check [--timeout SECS]`: every collective check on the world; prints
//! "mpi_check: rank R of N ok". `mpi_check --kill-rank R`: a loop of all-reduces in which rank R
//! SIGKILLs itself half-way, to show the job ends (mpirun's abort or our timeout) instead of hanging.
//! `mpi_check --stall-rank R --timeout SECS`: rank R sleeps past the timeout before a collective, so
//! the others' collective times out, and the first of them to report aborts the job.

use std::time::Duration;

use glm_dist::{mpi, testing, Communicator, ReduceOp};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn kill_loop(world: &dyn Communicator, victim: usize) -> glm_dist::Result<()> {
    for step in 0..100_000 {
        if step == 20 && world.rank() == victim {
            println!("mpi_check: rank {victim} kills itself at step {step}");
            let pid = std::process::id().to_string();
            // SIGKILL, as an OOM kill would: no unwinding, no MPI_Abort, nothing flushed.
            let _ = std::process::Command::new("kill").args(["-9", &pid]).status();
            std::thread::sleep(Duration::from_secs(60));
        }
        let mut x = vec![world.rank() as f32; 1024];
        world.all_reduce_f32(&mut x, ReduceOp::Sum)?;
    }
    Ok(())
}

fn stall(world: &dyn Communicator, victim: usize, timeout: f64) -> glm_dist::Result<()> {
    world.barrier()?;
    if world.rank() == victim {
        std::thread::sleep(Duration::from_secs_f64(timeout * 5.0 + 5.0));
    }
    world.all_reduce_scalars(&mut [1.0, 2.0], ReduceOp::Max)
}

fn main() {
    let secs = arg("--timeout").and_then(|s| s.parse::<f64>().ok()).unwrap_or(30.0);
    let world = match mpi::world(Duration::from_secs_f64(secs)) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("mpi_check: {e}");
            std::process::exit(2);
        }
    };
    let (rank, size) = (world.rank(), world.size());
    let victim =
        |name: &str| arg(name).map(|r| r.parse::<usize>().map_err(|e| glm_dist::Error::Comm(format!("{name}: {e}"))));
    let res = match (victim("--kill-rank"), victim("--stall-rank")) {
        (Some(Err(e)), _) | (_, Some(Err(e))) => Err(e),
        (Some(Ok(r)), _) => kill_loop(world.as_ref(), r),
        (_, Some(Ok(r))) => stall(world.as_ref(), r, secs),
        (None, None) => testing::check_all(&world),
    };
    match res {
        Ok(()) => {
            println!("mpi_check: rank {rank} of {size} ok");
            drop(world);
            mpi::finalize();
        }
        Err(e) => {
            eprintln!("mpi_check: rank {rank} of {size} failed: {e}");
            mpi::abort(1);
        }
    }
}
