//! `glm train`: pretrain a GLM with the GLM-130B recipe (the project's main job).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use glm_dist::{Layout, ParallelGroups};
use glm_model::PRESETS;
use glm_train::dist::Dist;
use glm_train::{Precision, RunOptions, Summary, TrainConfig, Trainer};

#[derive(Args)]
pub struct TrainArgs {
    /// Model preset, trained with the default recipe (`glm train --print-config` shows it).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
    preset: Option<String>,
    /// A training config TOML; the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    max_steps: Option<u64>,
    /// Run directory: checkpoints/, metrics.jsonl, eval.jsonl, events.jsonl, plots.svg, samples.txt.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the newest good checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Continue from the newest good checkpoint in --out if there is one, else start a new run
    /// there (--resume alone refuses a folder with nothing to resume).
    #[arg(long, conflicts_with = "resume")]
    resume_or_start: bool,
    /// Stop after this step (the schedule still runs to --max-steps); resume later.
    #[arg(long)]
    stop_at: Option<u64>,
    #[arg(long, value_parser = ["f32", "bf16", "f16"])]
    precision: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint every N steps.
    #[arg(long)]
    save_every: Option<u64>,
    /// Validate every N steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// No sample generations at the end.
    #[arg(long)]
    no_samples: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Train on the first CUDA GPU (needs a build with --features cuda).
    #[arg(long)]
    cuda: bool,
    /// Tensor-parallel degree: each layer's heads, FFN columns and vocabulary split over N ranks.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline-parallel degree: the layers cut into N stages (balanced; the embedding on the first,
    /// the head on the last), each step's micro-batches run through them in 1F1B order.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Data-parallel degree: each step's micro-batches shared by N ranks (the global batch stays).
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// 1: ZeRO-1, the AdamW moments sharded over the data-parallel ranks.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    zero: u8,
    /// Where the tp x pp x dp ranks run: `mpi` (one process per rank, launched by `mpirun -np N`; the
    /// default under mpirun) or `local` (one thread per rank in this process).
    #[arg(long, value_parser = ["local", "mpi"])]
    ranks: Option<String>,
    /// A collective waiting longer than this for a peer fails the run (a dead or stuck rank).
    #[arg(long, default_value_t = 300)]
    dist_timeout: u64,
}

/// How the run is spread over ranks.
enum Launch {
    Single,
    Local(Layout),
    Mpi(Layout),
}

impl TrainArgs {
    fn launch(&self) -> Result<Launch> {
        let layout = Layout::new(self.tp, self.pp, self.dp)?;
        let under_mpirun =
            ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some());
        Ok(match self.ranks.as_deref() {
            Some("local") => Launch::Local(layout),
            Some(_) => Launch::Mpi(layout),
            None if under_mpirun => Launch::Mpi(layout),
            None if layout.world_size() > 1 => anyhow::bail!(
                "--tp {} --pp {} --dp {} needs {} ranks: launch with `mpirun -np {} glm train ...` (a build \
                 with --features mpi), or add --ranks local to run them as threads of this process",
                self.tp,
                self.pp,
                self.dp,
                layout.world_size(),
                layout.world_size()
            ),
            None => Launch::Single,
        })
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => TrainConfig::load(p)?,
        None => TrainConfig::default(),
    };
    if let Some(p) = &a.preset {
        cfg.preset = p.clone();
        cfg.model_config = None;
    }
    if let Some(n) = a.max_steps {
        cfg.max_steps = n;
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(p) = &a.precision {
        cfg.precision = match p.as_str() {
            "bf16" => Precision::Bf16,
            "f16" => Precision::F16,
            _ => Precision::F32,
        };
    }
    if let Some(n) = a.save_every {
        cfg.checkpoint.every = n;
    }
    if let Some(n) = a.eval_every {
        cfg.eval.every = n;
    }
    cfg.validate()?;
    if a.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let device = if a.cuda {
        candle_core::Device::new_cuda(0).context("opening CUDA device 0")?
    } else {
        candle_core::Device::Cpu
    };
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}", cfg.preset)));
    let stop = stop_on_sigint();
    let opts = RunOptions {
        out: out.clone(),
        resume: a.resume || a.resume_or_start,
        start_if_empty: a.resume_or_start,
        stop_at: a.stop_at,
        progress: !a.quiet,
        device,
        stop,
    };
    let model = cfg.model()?;
    if a.resume_or_start && glm_train::ckpt::Checkpoints::new(out.join("checkpoints")).list().is_empty() {
        eprintln!("--resume-or-start: no checkpoint in {}: starting a new run", out.join("checkpoints").display());
    }
    let first_rank = std::env::var("OMPI_COMM_WORLD_RANK").map_or(true, |r| r == "0");
    first_rank.then(|| {
        eprintln!(
            "training {} ({} parameters) on {} for {} steps, {:?}, into {}",
            model.name,
            glm_model::param_count(&model),
            if a.cuda { "cuda:0" } else { "the CPU" },
            cfg.max_steps,
            cfg.precision,
            out.display()
        )
    });
    let timeout = std::time::Duration::from_secs(a.dist_timeout.max(1));
    let zero = a.zero == 1;
    match a.launch()? {
        Launch::Single => {
            let mut trainer = Trainer::new(cfg, opts)?;
            let summary = run_rank(&mut trainer)?;
            finish(&summary, Some(&trainer), &out, a.no_samples)
        }
        Launch::Local(layout) => {
            eprintln!("{layout}: {} ranks as threads of this process", layout.world_size());
            let summaries = glm_dist::LocalComm::run(layout.world_size(), timeout, |world| {
                let groups = ParallelGroups::new(world, layout)?;
                let main = groups.world.rank() == 0;
                let as_dist = |e: glm_train::Error| glm_dist::Error::Comm(e.to_string());
                let mut trainer =
                    Trainer::with_dist(cfg.clone(), opts.clone(), Some(Dist::new(groups, zero))).map_err(as_dist)?;
                let summary = run_rank(&mut trainer).map_err(|e| glm_dist::Error::Comm(e.to_string()))?;
                // Samples need the whole model: the first rank has it when it is not split.
                if main && whole(layout) {
                    finish(&summary, Some(&trainer), &out, a.no_samples)
                        .map_err(|e| glm_dist::Error::Comm(e.to_string()))?;
                }
                Ok(summary)
            })?;
            if !whole(layout) {
                finish(&summaries[0], None, &out, a.no_samples)?;
            }
            Ok(())
        }
        Launch::Mpi(layout) => run_mpi(layout, cfg, opts, zero, timeout, &out, a.no_samples),
    }
}

/// Whether every rank holds the whole model (it samples from it at the end).
fn whole(layout: Layout) -> bool {
    layout.tp == 1 && layout.pp == 1
}

/// One rank's run (or the single process's).
fn run_rank(trainer: &mut Trainer) -> Result<Summary> {
    if trainer.state().step > 0 && trainer.is_main() {
        eprintln!("resumed at step {}", trainer.state().step);
    }
    Ok(trainer.run()?)
}

#[cfg(feature = "mpi")]
fn run_mpi(
    layout: Layout,
    cfg: TrainConfig,
    opts: RunOptions,
    zero: bool,
    timeout: std::time::Duration,
    out: &std::path::Path,
    no_samples: bool,
) -> Result<()> {
    let world = glm_dist::mpi::world(timeout)?;
    let rank = world.rank();
    let result = (|| -> Result<()> {
        let groups = ParallelGroups::new(world, layout)?;
        if rank == 0 {
            eprintln!("{layout}: {} MPI ranks", layout.world_size());
        }
        let mut trainer = Trainer::with_dist(cfg, opts, Some(Dist::new(groups, zero)))?;
        let summary = run_rank(&mut trainer)?;
        if rank == 0 {
            finish(&summary, whole(layout).then_some(&trainer), out, no_samples)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            glm_dist::mpi::finalize();
            Ok(())
        }
        Err(e) => {
            // The peers may be inside a collective waiting for this rank: end the whole job.
            eprintln!("error: rank {rank}: {e:#}");
            glm_dist::mpi::abort(1)
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(
    layout: Layout,
    _cfg: TrainConfig,
    _opts: RunOptions,
    _zero: bool,
    _timeout: std::time::Duration,
    _out: &std::path::Path,
    _no_samples: bool,
) -> Result<()> {
    anyhow::bail!(
        "{layout} over MPI needs a glm built with MPI: `cargo build --release --features mpi` (Debian: apt install \
         libopenmpi-dev openmpi-bin libclang-dev), or run the ranks as threads with --ranks local"
    )
}

/// The end of a run: its summary, plots, samples (from a whole model) and the JSON line.
fn finish(summary: &Summary, trainer: Option<&Trainer>, out: &std::path::Path, no_samples: bool) -> Result<()> {
    if let Some(v) = &summary.val {
        eprintln!(
            "done: step {}, {:.0} tokens/s, train loss {:.4}, held-out loss {:.4} vs unigram {:.4}, bits/byte {:.4} vs {:.4}",
            summary.step, summary.tokens_per_s, summary.train_loss, v.val_loss, v.unigram_loss, v.val_bpb, v.unigram_bpb
        );
    }
    if let Some(p) = &summary.plots {
        eprintln!("plots: {}", p.display());
    }
    if summary.interrupted {
        eprintln!(
            "interrupted at step {}: checkpoint saved; continue with the same command and --resume",
            summary.step
        );
        println!("{}", serde_json::to_string(&summary)?);
        std::process::exit(130);
    }
    match trainer {
        Some(t) if !no_samples => crate::samples::print_samples(t.model(), t.tokenizer(), out)?,
        None if !no_samples => eprintln!(
            "no samples: the model is split over tensor- or pipeline-parallel ranks (`glm reshard CHECKPOINT \
             --tp 1 --pp 1 --out DIR` makes one file for `glm generate`)"
        ),
        _ => {}
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

/// The first Ctrl-C (SIGINT) asks the trainer to stop after the current step with a checkpoint;
/// the handler then restores the default, so a second Ctrl-C ends the process at once.
#[cfg(unix)]
fn stop_on_sigint() -> Option<&'static AtomicBool> {
    extern "C" fn on_sigint(_: libc::c_int) {
        STOP.store(true, Ordering::SeqCst);
        // SAFETY: signal() is async-signal-safe; SIG_DFL is a valid disposition.
        unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    }
    // SAFETY: installs a handler that only stores to an atomic and resets the disposition.
    let prev = unsafe { libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    (prev != libc::SIG_ERR).then_some(&STOP)
}

#[cfg(not(unix))]
fn stop_on_sigint() -> Option<&'static AtomicBool> {
    None
}
