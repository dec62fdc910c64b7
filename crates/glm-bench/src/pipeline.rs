//! `glm bench pipeline`: what the 1F1B schedule costs, measured on `glm-train`'s own pipelined
//! step. For each number of stages p and micro-batches per step m, p ranks (threads of this
//! process, `--threads` compute threads each) train a GLM-130B-architecture model cut into p
//! stages, and each stage reports for the last step:
//!
//! - the **bubble**: the fraction of the step's wall time the stage was not inside a forward or a
//!   backward, against 1F1B's (p - 1) / (m + p - 1) for equal stages;
//! - the most micro-batches whose activations it **held** at once, against warmup + 1 =
//!   min(p - s, m);
//! - the **bytes it sent** to its neighbours, against B·T·H·4 per micro-batch each way.
//!
//! More ranks than cores share them, so on a 2-core machine p = 4 measures an oversubscribed
//! pipeline (reported beside the numbers).

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use glm_dist::{Layout, LocalComm, ParallelGroups};
use glm_model::Config;
use glm_train::config::BatchConfig;
use glm_train::dist::Dist;
use glm_train::{TrainConfig, Trainer};
use serde::Serialize;

use crate::dist::{rank_pool, run_options, work_dir};

#[derive(Debug, Clone, clap::Args)]
pub struct PipelineBenchOpts {
    /// Numbers of stages.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub stages: Vec<usize>,
    /// Micro-batches per step.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
    pub micro_batches: Vec<usize>,
    /// Layers (a multiple of every stage count keeps the stages even).
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 680)]
    pub ffn: usize,
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Rows per micro-batch (B).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per row (T).
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Steps per run; the last is reported.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Compute threads per rank.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// One stage's view of the last step of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    pub stage: usize,
    pub layers: usize,
    pub wall_s: f64,
    pub busy_s: f64,
    pub bubble: f64,
    pub max_held: usize,
    pub held_bound: usize,
    pub sent_bytes: usize,
    pub sent_formula: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineRow {
    pub stages: usize,
    pub micro_batches: usize,
    pub formula: f64,
    pub per_stage: Vec<StageRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    pub model: String,
    pub cpu: String,
    pub cores: usize,
    pub threads: usize,
    pub batch: usize,
    pub seq: usize,
    pub rows: Vec<PipelineRow>,
}

fn train_config(o: &PipelineBenchOpts, model: &Path, m: usize) -> TrainConfig {
    let global = o.batch * m;
    let mut c = TrainConfig { max_steps: o.steps.max(1) as u64, ..Default::default() };
    c.model_config = Some(model.to_path_buf());
    c.objective.seq_len = o.seq;
    c.batch = BatchConfig { micro_batch: o.batch, global, ramp_start: global, ramp_increment: 0, ramp_samples: 0 };
    c.eval.every = 0;
    c.eval.rows = o.batch;
    c.checkpoint.every = 0;
    c.checkpoint.keep = 1;
    c
}

pub fn run(o: &PipelineBenchOpts) -> Result<PipelineReport> {
    if o.stages.iter().any(|&p| p < 2 || p > o.layers) || o.micro_batches.contains(&0) || o.batch == 0 {
        bail!("--stages must be 2..=--layers, --micro-batches and --batch positive");
    }
    if std::env::var_os("OPENBLAS_NUM_THREADS").is_none() {
        std::env::set_var("OPENBLAS_NUM_THREADS", o.threads.max(1).to_string());
    }
    let mut cfg = Config::glm_arch("bench-pipeline", o.layers, o.hidden, o.heads, o.ffn, o.vocab);
    cfg.max_seq_len = cfg.max_seq_len.max(o.seq);
    cfg.validate()?;
    let dir = work_dir()?;
    let model = dir.join("model.json");
    cfg.save(&model)?;
    let result = (|| {
        let mut rows = Vec::new();
        for &p in &o.stages {
            for &m in &o.micro_batches {
                eprintln!("bench pipeline: {p} stages, {m} micro-batches ...");
                let tc = train_config(o, &model, m);
                let out = dir.join(format!("p{p}-m{m}"));
                let per_stage = LocalComm::run(p, std::time::Duration::from_secs(900), |world| {
                    let err = |e: String| glm_dist::Error::Comm(e);
                    let _pool = rank_pool(o.threads).map_err(|e| err(e.to_string()))?;
                    let groups = ParallelGroups::new(world, Layout::new(1, p, 1)?)?;
                    let mut t =
                        Trainer::with_dist(tc.clone(), run_options(out.clone()), Some(Dist::new(groups, false)))
                            .map_err(|e| err(e.to_string()))?;
                    t.run().map_err(|e| err(e.to_string()))?;
                    let s = t.pipeline_stats().ok_or_else(|| err("no pipeline statistics".into()))?;
                    Ok((s, t.model().stage().clone()))
                })?;
                let act = o.batch * o.seq * o.hidden * 4;
                let per_stage = per_stage
                    .into_iter()
                    .map(|(s, st)| StageRow {
                        stage: st.index,
                        layers: st.layers.len(),
                        wall_s: s.wall,
                        busy_s: s.busy,
                        bubble: s.bubble(),
                        max_held: s.max_held,
                        held_bound: (p - st.index).min(m),
                        sent_bytes: s.sent,
                        sent_formula: m * act * (usize::from(!st.is_last()) + usize::from(!st.is_first())),
                    })
                    .collect();
                rows.push(PipelineRow {
                    stages: p,
                    micro_batches: m,
                    formula: (p - 1) as f64 / (m + p - 1) as f64,
                    per_stage,
                });
            }
        }
        Ok::<_, anyhow::Error>(rows)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    Ok(PipelineReport {
        model: format!("{} layers, hidden {}, {} heads, FFN {}, vocab {}", o.layers, o.hidden, o.heads, o.ffn, o.vocab),
        cpu: crate::cpu_name(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        threads: o.threads,
        batch: o.batch,
        seq: o.seq,
        rows,
    })
    .and_then(|r| if r.rows.is_empty() { Err(anyhow!("nothing measured")) } else { Ok(r) })
}

/// The report as a Markdown table.
pub fn render(r: &PipelineReport) -> String {
    let mut s = format!(
        "1F1B pipeline, {} ({} cores, {} thread(s) per rank); model {}; micro-batch {} x {} tokens\n\n",
        r.cpu, r.cores, r.threads, r.model, r.batch, r.seq
    );
    s.push_str("| p | m | bubble (p-1)/(m+p-1) | measured bubble per stage | step s | compute s per stage | held per stage (bound) | sent per stage, MB (B·T·H·4 per micro-batch each way) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for row in &r.rows {
        let st = &row.per_stage;
        let bubbles: Vec<String> = st.iter().map(|x| format!("{:.3}", x.bubble)).collect();
        let busy: Vec<String> = st.iter().map(|x| format!("{:.2}", x.busy_s)).collect();
        let wall = st.iter().map(|x| x.wall_s).fold(0.0, f64::max);
        let held: Vec<String> = st.iter().map(|x| format!("{} ({})", x.max_held, x.held_bound)).collect();
        let sent: Vec<String> = st
            .iter()
            .map(|x| format!("{:.2} ({:.2})", x.sent_bytes as f64 / 1e6, x.sent_formula as f64 / 1e6))
            .collect();
        s.push_str(&format!(
            "| {} | {} | {:.3} | {} | {:.2} | {} | {} | {} |\n",
            row.stages,
            row.micro_batches,
            row.formula,
            bubbles.join(" / "),
            wall,
            busy.join(" / "),
            held.join(" / "),
            sent.join(" / ")
        ));
    }
    if r.rows.iter().any(|row| row.stages > r.cores) {
        s.push_str(&format!(
            "\nRows with more stages than the machine's {} cores share them: a stage's compute waits for a core too.\n",
            r.cores
        ));
    }
    s
}
