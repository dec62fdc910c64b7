//! `glm train`: pretrain a GLM with the GLM-130B recipe (the project's main job).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use glm_model::PRESETS;
use glm_train::{Precision, RunOptions, TrainConfig, Trainer};

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
    let opts = RunOptions { out: out.clone(), resume: a.resume, stop_at: a.stop_at, progress: !a.quiet, device, stop };
    let model = cfg.model()?;
    eprintln!(
        "training {} ({} parameters) on {} for {} steps, {:?}, into {}",
        model.name,
        glm_model::param_count(&model),
        if a.cuda { "cuda:0" } else { "the CPU" },
        cfg.max_steps,
        cfg.precision,
        out.display()
    );
    let mut trainer = Trainer::new(cfg, opts)?;
    if trainer.state().step > 0 {
        eprintln!("resumed at step {}", trainer.state().step);
    }
    let summary = trainer.run()?;
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
    if !a.no_samples {
        crate::samples::print_samples(trainer.model(), trainer.tokenizer(), &out)?;
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
