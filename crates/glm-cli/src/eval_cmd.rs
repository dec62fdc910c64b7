//! `glm eval`: GLM-130B's task framework (`glm-eval`) on a checkpoint, or two reports compared.
//! With `--tp N` every tensor-parallel rank scores every task on the gathered logits (see
//! `tp_launch`); the ranks check that their scores agree and rank 0 reports.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use glm_eval::{report, Report, TaskConfig};

use crate::infer_cmd::ModelSource;
use crate::tp_launch::{Rank, TpArgs};
use crate::ModelArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint: a training checkpoint directory, a quantized or a dense .safetensors.
    #[arg(long, required_unless_present = "compare")]
    model: Option<PathBuf>,
    #[command(flatten)]
    arch: ModelArgs,
    /// tokenizer.json or SentencePiece .model (default: the embedded tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Task files (GLM-130B's YAML) or directories of them.
    #[arg(long, num_args = 1.., required_unless_present = "compare")]
    tasks: Vec<PathBuf>,
    /// Task `path`s are relative to this directory.
    #[arg(long, default_value = ".")]
    data_root: PathBuf,
    /// Write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the Markdown table here (it is also printed).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// At most this many examples (documents for language modelling) per data file.
    #[arg(long)]
    limit: Option<usize>,
    /// Examples per forward, instead of each task's micro-batch-size.
    #[arg(long)]
    batch: Option<usize>,
    /// Recorded in the report (evaluation itself is deterministic: greedy or deterministic beams).
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// Score multiple choice through the reference path (one row and one forward per choice;
    /// slower, the same numbers): for checking and benchmarking the batched path.
    #[arg(long)]
    one_choice_per_row: bool,
    /// Compare two reports (A B): per-task deltas, flagged beyond --threshold.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Vec<PathBuf>,
    /// For --compare: absolute for Accuracy/EM/F1, relative for PPL/BPB.
    #[arg(long, default_value_t = 0.02)]
    threshold: f64,
    #[command(flatten)]
    dist: TpArgs,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if let [x, y] = a.compare.as_slice() {
        let (ra, rb) = (Report::load(x)?, Report::load(y)?);
        let (table, flagged) = report::compare(&ra, &rb, a.threshold);
        println!("{table}");
        println!("{flagged} metric(s) beyond the threshold");
        return Ok(());
    }
    let Some(model_path) = a.model.clone() else { bail!("--model is required") };
    let tasks = TaskConfig::load_all(&a.tasks)?;
    let source = ModelSource { model: model_path, arch: a.arch, tokenizer: a.tokenizer.clone() };
    let rest = Rest { data_root: a.data_root, out: a.out, markdown: a.markdown, seed: a.seed, quiet: a.quiet };
    let opts = |rank: Rank| glm_eval::EvalOptions {
        data_root: rest.data_root.clone(),
        limit: a.limit,
        batch: a.batch,
        progress: !rest.quiet && rank.main(),
        one_choice_per_row: a.one_choice_per_row,
    };
    a.dist.run("eval", |rank| eval_on(&source, &tasks, &opts(rank), &rest, rank))
}

/// What the report needs of the arguments.
struct Rest {
    data_root: PathBuf,
    out: Option<PathBuf>,
    markdown: Option<PathBuf>,
    seed: u64,
    quiet: bool,
}

/// One rank's evaluation (or the single process's): every rank scores every task; rank 0 reports.
fn eval_on(
    source: &ModelSource,
    tasks: &[TaskConfig],
    opts: &glm_eval::EvalOptions,
    a: &Rest,
    rank: Rank,
) -> Result<()> {
    let model_path = source.model.clone();
    let (model, tok) = source.load_on(rank.group)?;
    let t0 = std::time::Instant::now();
    let (mut rows, mut groups, mut files, mut task_files) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        let t = std::time::Instant::now();
        let scores = glm_eval::evaluate(&model, &tok, task, opts).with_context(|| format!("task {}", task.name))?;
        let (r, g, f) = report::task_rows(task, &scores);
        let n: usize = scores.iter().map(|s| s.examples).sum();
        let secs = t.elapsed().as_secs_f64();
        if !a.quiet && rank.main() {
            eprintln!("{}: {n} examples in {secs:.1} s ({:.1} examples/s)", task.name, n as f64 / secs.max(1e-9));
        }
        task_files.push(serde_json::json!({
            "name": task.name,
            "type": task.kind,
            "path": task.path,
            "file": task.source.display().to_string(),
            "sha256": report::sha256_file(&task.source)?,
            "examples": n,
            "seconds": secs,
        }));
        rows.extend(r);
        groups.extend(g);
        files.extend(f);
    }
    rank.agree("evaluation", &serde_json::to_vec(&(&rows, &groups, &files))?)?;
    if !rank.main() {
        return Ok(());
    }
    let weights = if model_path.is_dir() { model_path.join("model.safetensors") } else { model_path.clone() };
    let rep = Report {
        model: model_path.display().to_string(),
        model_sha256: report::sha256_file(&weights)?,
        seed: a.seed,
        data_root: a.data_root.display().to_string(),
        command: std::env::args().collect(),
        task_files,
        tasks: rows,
        groups,
        files,
        seconds: t0.elapsed().as_secs_f64(),
    };
    let md = rep.to_markdown();
    println!("{md}");
    if let Some(p) = &a.out {
        glm_checkpoint::write_atomic(p, serde_json::to_string_pretty(&rep)?.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.markdown {
        glm_checkpoint::write_atomic(p, md.as_bytes()).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
