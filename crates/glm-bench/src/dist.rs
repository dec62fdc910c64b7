//! `glm bench dist`: what splitting a training step over ranks costs. Two cores cannot show a
//! speed-up, so this measures what matters at scale: the bytes each collective moves per step
//! against the analytic formula of our implementation (`formula`), the time a step spends inside
//! collectives against compute beside the 1-rank step, and ZeRO-1's optimizer memory per rank.
//!
//! Every run is `glm-train`'s own `Trainer` (1-rank baseline: `Trainer::new`; TP and DP:
//! `Trainer::with_dist`) with every communicator of the rank wrapped in `glm_dist::meter::Metered`.
//! `Trainer::run` also validates and checkpoints at its end: the step log (`metrics.jsonl`, seconds
//! per step) gives each step's window on rank 0's clock, and only the collectives that start inside
//! the timed steps' windows are counted.
//!
//! Each rank computes on its own thread with a rayon pool of `--threads` (that thread included), so
//! with `--threads 1` a rank is one thread on either backend; OpenBLAS's threads are set process-wide
//! by `OPENBLAS_NUM_THREADS` ([`prepare_env`] sets it to `--threads` when unset).

mod measure;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use glm_dist::meter::{Kind, Metered, Stats};
use glm_dist::{Communicator, Layout, LocalComm, ParallelGroups, ReduceOp};
use glm_model::Config;
use glm_train::config::BatchConfig;
use glm_train::dist::{Dist, DEFAULT_BUCKET};
use glm_train::{RunOptions, TrainConfig, Trainer};
use serde::Serialize;

pub use measure::Measured;
pub use report::{render, DistReport, MemRow, RunReport};

use measure::measure;

/// The ways a step is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// One rank, `Trainer::new`.
    Baseline,
    /// Tensor parallel over `--tp` ranks.
    Tp,
    /// Data parallel over `--dp` ranks, gradients all-reduced.
    Dp,
    /// Data parallel with ZeRO-1: gradients reduce-scattered, AdamW moments sharded, weights
    /// all-gathered.
    Zero,
}

impl RunKind {
    fn name(self) -> &'static str {
        match self {
            RunKind::Baseline => "baseline",
            RunKind::Tp => "tp",
            RunKind::Dp => "dp",
            RunKind::Zero => "zero",
        }
    }
}

/// `glm bench dist`'s options (the backend is the caller's).
#[derive(Debug, Clone, clap::Args)]
pub struct DistBenchOpts {
    /// The runs, in order: baseline (1 rank), tp, dp (all-reduce), zero (DP + ZeRO-1).
    #[arg(long, value_delimiter = ',', default_value = "baseline,tp,dp,zero")]
    pub runs: Vec<RunKind>,
    /// Only the 1-rank baseline (same as `--runs baseline`).
    #[arg(long)]
    pub baseline_only: bool,
    /// Tensor-parallel degree of the tp run (under mpirun: the world size).
    #[arg(long, default_value_t = 2)]
    pub tp: usize,
    /// Data-parallel degree of the dp and zero runs (under mpirun: the world size).
    #[arg(long, default_value_t = 2)]
    pub dp: usize,
    /// Model: a GLM-130B-architecture config (GeGLU, DeepNorm, RoPE, tied head).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 1360)]
    pub ffn: usize,
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Rows per micro-batch (B).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per row (T).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Micro-batches per step (M; the DP ranks share them).
    #[arg(long, default_value_t = 2)]
    pub micro_batches: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed steps (means are reported).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Compute threads per rank.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Gradient bucket, in elements.
    #[arg(long, default_value_t = DEFAULT_BUCKET)]
    pub bucket: usize,
    /// ZeRO-1 optimizer memory also at these DP degrees (Trainers built on threads, not run).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub memory_dp: Vec<usize>,
    /// Seconds any collective may wait.
    #[arg(long, default_value_t = 900)]
    pub timeout_s: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl DistBenchOpts {
    fn runs(&self) -> Vec<RunKind> {
        if self.baseline_only {
            return vec![RunKind::Baseline];
        }
        let mut r = self.runs.clone();
        r.dedup();
        r
    }

    fn degree(&self, run: RunKind) -> usize {
        match run {
            RunKind::Baseline => 1,
            RunKind::Tp => self.tp,
            RunKind::Dp | RunKind::Zero => self.dp,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }

    pub fn model(&self) -> Result<Config> {
        let mut cfg = Config::glm_arch("bench-dist", self.layers, self.hidden, self.heads, self.ffn, self.vocab);
        cfg.max_seq_len = cfg.max_seq_len.max(self.seq);
        cfg.validate()?;
        Ok(cfg)
    }

    fn train_config(&self, model: &Path) -> TrainConfig {
        let global = self.batch * self.micro_batches;
        let mut c = TrainConfig { max_steps: (self.warmup + self.steps) as u64, ..Default::default() };
        c.model_config = Some(model.to_path_buf());
        c.objective.seq_len = self.seq;
        c.batch =
            BatchConfig { micro_batch: self.batch, global, ramp_start: global, ramp_increment: 0, ramp_samples: 0 };
        c.regularization.hidden_dropout = 0.0;
        c.regularization.attention_dropout = 0.0;
        c.eval.every = 0;
        c.eval.rows = self.batch;
        c.checkpoint.every = 0;
        c.checkpoint.keep = 1;
        c
    }
}

/// Before any thread or BLAS call: OpenBLAS's thread count (process-wide) set to `--threads`
/// unless the environment says otherwise.
pub fn prepare_env(o: &DistBenchOpts) {
    if std::env::var_os("OPENBLAS_NUM_THREADS").is_none() {
        std::env::set_var("OPENBLAS_NUM_THREADS", o.threads.max(1).to_string());
    }
}

/// Makes the calling thread a pool of `threads` rayon workers (itself included), so its compute
/// stays on it; `None` when it already belongs to a pool. Keep the pool while the rank runs.
pub fn rank_pool(threads: usize) -> Result<Option<rayon::ThreadPool>> {
    if rayon::current_thread_index().is_some() {
        return Ok(None);
    }
    Ok(Some(rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).use_current_thread().build()?))
}

pub(crate) fn run_options(out: PathBuf) -> RunOptions {
    RunOptions {
        out,
        resume: false,
        start_if_empty: false,
        stop_at: None,
        progress: false,
        device: Device::Cpu,
        stop: None,
    }
}

/// The 1-rank run (no communicator), on the calling thread.
fn baseline(tc: &TrainConfig, dir: &Path, o: &DistBenchOpts) -> Result<Measured> {
    let out = dir.join("baseline");
    let mut t = Trainer::new(tc.clone(), run_options(out.clone()))?;
    let t0 = Instant::now();
    t.run()?;
    let mut m = measure(RunKind::Baseline, &out, &Stats::default(), t0, o)?;
    m.optimizer_bytes = t.optimizer_bytes() as u64;
    Ok(m)
}

fn dist_err(e: impl std::fmt::Display) -> glm_dist::Error {
    glm_dist::Error::Comm(e.to_string())
}

/// One split run on this rank of `world` (every rank calls it): `Some` on world rank 0.
fn split_run(
    world: &Rc<dyn Communicator>,
    run: RunKind,
    tc: &TrainConfig,
    dir: &Path,
    o: &DistBenchOpts,
) -> Result<Option<Measured>> {
    let n = world.size();
    let zero = run == RunKind::Zero;
    let layout = if run == RunKind::Tp { Layout::new(n, 1, 1)? } else { Layout::new(1, 1, n)? };
    let g = ParallelGroups::new(Rc::clone(world), layout)?;
    let stats = Stats::shared();
    let wrap = |c: &Rc<dyn Communicator>, label: &str| -> Rc<dyn Communicator> {
        Rc::new(Metered::with_stats(Rc::clone(c), Rc::clone(&stats), label))
    };
    let (w, tp, dp, pp) = (wrap(&g.world, "world"), wrap(&g.tp, "tp"), wrap(&g.dp, "dp"), wrap(&g.pp, "pp"));
    let mut dist = Dist::new(ParallelGroups { world: w, tp, dp, pp, ..g }, zero);
    dist.bucket = o.bucket;
    let out = dir.join(run.name());
    let mut t = Trainer::with_dist(tc.clone(), run_options(out.clone()), Some(dist))?;
    world.barrier()?;
    stats.borrow_mut().clear();
    let t0 = Instant::now();
    t.run()?;
    let mut bytes = [t.optimizer_bytes() as f64];
    drop(t);
    glm_dist::registry::clear();
    world.all_reduce_f64(&mut bytes, ReduceOp::Max)?;
    if world.rank() != 0 {
        return Ok(None);
    }
    let mut m = measure(run, &out, &stats.borrow(), t0, o)?;
    m.ranks = n;
    m.optimizer_bytes = bytes[0] as u64;
    Ok(Some(m))
}

/// `Trainer::optimizer_bytes()` with ZeRO-1 over `d` thread ranks (built, not run): the largest.
fn zero_memory(tc: &TrainConfig, dir: &Path, d: usize, o: &DistBenchOpts) -> Result<u64> {
    let out = dir.join(format!("memory-dp{d}"));
    let bytes = LocalComm::run(d, o.timeout(), |world| {
        let groups = ParallelGroups::new(world, Layout::new(1, 1, d)?)?;
        let mut dist = Dist::new(groups, true);
        dist.bucket = o.bucket;
        let t = Trainer::with_dist(tc.clone(), run_options(out.clone()), Some(dist)).map_err(dist_err)?;
        Ok(t.optimizer_bytes() as u64)
    })?;
    bytes.into_iter().max().ok_or_else(|| anyhow!("no ranks"))
}

/// A fresh work directory (runs, checkpoints), removed at the end.
pub(crate) fn work_dir() -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("glm-bench-dist-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn write_model(o: &DistBenchOpts, dir: &Path) -> Result<PathBuf> {
    let path = dir.join("model.json");
    o.model()?.save(&path)?;
    Ok(path)
}

fn check(o: &DistBenchOpts) -> Result<()> {
    if o.steps == 0 || o.batch == 0 || o.micro_batches == 0 || o.seq < 8 || o.tp == 0 || o.dp == 0 {
        bail!("--steps, --batch, --micro-batches, --tp and --dp must be positive and --seq at least 8");
    }
    glm_dist::split::check_tp(&o.model()?, o.tp)?;
    Ok(())
}

/// Every run on in-process thread ranks (one `LocalComm` world per split run).
pub fn run_local(o: &DistBenchOpts) -> Result<DistReport> {
    check(o)?;
    let dir = work_dir()?;
    let tc = o.train_config(&write_model(o, &dir)?);
    let result = (|| {
        let mut done = Vec::new();
        for run in o.runs() {
            eprintln!("bench dist: {} ...", run.name());
            done.push(match run {
                RunKind::Baseline => {
                    let _pool = rank_pool(o.threads)?;
                    baseline(&tc, &dir, o)?
                }
                _ => {
                    let ranks = LocalComm::run(o.degree(run), o.timeout(), |world| {
                        let _pool = rank_pool(o.threads).map_err(dist_err)?;
                        split_run(&world, run, &tc, &dir, o).map_err(|e| dist_err(format!("{e:#}")))
                    })?;
                    ranks.into_iter().flatten().next().ok_or_else(|| anyhow!("rank 0 returned nothing"))?
                }
            });
        }
        let extra = extra_memory(&tc, &dir, o, &done)?;
        report::build(o, &tc, "local", done, extra)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// ZeRO-1 memory at the `--memory-dp` degrees not already run.
fn extra_memory(tc: &TrainConfig, dir: &Path, o: &DistBenchOpts, done: &[Measured]) -> Result<Vec<(usize, u64)>> {
    let ran = |d: usize| done.iter().any(|m| m.run == RunKind::Zero && m.ranks == d);
    let mut out = Vec::new();
    for &d in o.memory_dp.iter().filter(|&&d| d > 1 && !ran(d)) {
        out.push((d, zero_memory(tc, dir, d, o)?));
    }
    Ok(out)
}

/// Every run on the ranks of `world` (one process per rank under mpirun): world rank 0 runs the
/// baseline while the others wait, then all run each split with the world's size as its degree.
/// The report comes back on rank 0.
pub fn run_world(world: Rc<dyn Communicator>, o: &DistBenchOpts) -> Result<Option<DistReport>> {
    check(o)?;
    let n = world.size();
    for run in o.runs().into_iter().filter(|&r| r != RunKind::Baseline) {
        if o.degree(run) != n {
            bail!(
                "the {} run needs {} ranks but the world has {n} (pass --tp/--dp {n}, or --runs)",
                run.name(),
                o.degree(run)
            );
        }
    }
    let main = world.rank() == 0;
    let _pool = rank_pool(o.threads)?;
    // Rank 0 makes the work directory and tells the others where it is.
    let mut path = if main { work_dir()?.to_string_lossy().into_owned().into_bytes() } else { Vec::new() };
    world.broadcast_bytes(&mut path, 0)?;
    let dir = PathBuf::from(String::from_utf8(path)?);
    if main {
        write_model(o, &dir)?;
    }
    world.barrier()?;
    let tc = o.train_config(&dir.join("model.json"));
    let result = (|| {
        let mut done = Vec::new();
        for run in o.runs() {
            if main {
                eprintln!("bench dist: {} ...", run.name());
            }
            if run == RunKind::Baseline {
                if main {
                    done.push(baseline(&tc, &dir, o)?);
                }
                world.barrier()?;
            } else if let Some(m) = split_run(&world, run, &tc, &dir, o)? {
                done.push(m);
            }
        }
        if !main {
            return Ok(None);
        }
        let extra = extra_memory(&tc, &dir, o, &done)?;
        report::build(o, &tc, world.backend(), done, extra).map(Some)
    })();
    // After a failure the peers may be inside another collective: the caller aborts instead.
    if result.is_ok() {
        world.barrier()?;
    }
    if main {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
