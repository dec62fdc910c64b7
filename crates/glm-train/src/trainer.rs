//! The training loop: data -> micro-batches -> forward/backward -> monitor -> AdamW, with the
//! schedules, loss scaling, validation, checkpoints, resume and rollback around it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device};
use glm_data::{corpus, Batch, BatchCursor, Batcher, Instructions, TokenStream};
use glm_model::{Config, Glm, TrainOptions};
use glm_tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::ckpt::{Checkpoints, MODEL_FILE, OPTIMIZER_FILE};
use crate::config::{Precision, TrainConfig};
use crate::dist::{norms, owned_sq_norms, shard_sq_norms, sync_grads, Dist, Optimizer};
use crate::eval::{ValResult, Validation};
use crate::metrics::Metrics;
use crate::monitor::{Event, Monitor, Policy};
use crate::optim::AdamWConfig;
use crate::scaler::{LossScaler, ScaleChange};
use crate::schedule::{batch_rows, samples_after, LrSchedule};
use crate::step::{forward_backward, LossFault, Params};
use crate::{Error, Result};

/// How to run (as opposed to what to train, the `TrainConfig`).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    /// Continue from the newest good checkpoint in `out` (an error when there is none)...
    pub resume: bool,
    /// ... or, with this too, a fresh start when there is none.
    pub start_if_empty: bool,
    /// Stop after this step although the schedule runs to `max_steps` (to split a run in parts).
    pub stop_at: Option<u64>,
    pub progress: bool,
    pub device: Device,
    /// Set (e.g. by a SIGINT handler) to stop after the current step with a checkpoint.
    pub stop: Option<&'static AtomicBool>,
}

/// Everything besides weights and moments that a checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub step: u64,
    pub samples: u64,
    pub tokens: u64,
    pub data: BatchCursor,
    pub scaler: Option<LossScaler>,
    pub adam_steps: u64,
    pub egs_alpha: f64,
    pub lr_scale: f64,
    /// Inclusive step ranges whose data is consumed without training (after rollbacks).
    pub skip: Vec<(u64, u64)>,
    pub interventions: u32,
    pub monitor: Monitor,
    /// Every random choice is a pure function of this seed and counters: data rows of
    /// (seed, row number), dropout masks of (seed, step, micro-batch, layer, site).
    pub seed: u64,
    pub config_hash: String,
    pub model: Config,
    pub train_config: TrainConfig,
    /// What the matrix products ran on (`glm_nn::blas::describe`): a resume on other ones is noted.
    #[serde(default)]
    pub compute: Option<String>,
}

/// What a run reports at its end.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub out: PathBuf,
    pub step: u64,
    pub steps_run: u64,
    pub resumed_from: Option<u64>,
    /// Mean training loss of the last (up to) 20 steps.
    pub train_loss: f64,
    pub val: Option<ValResult>,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub interventions: u32,
    pub checkpoint: Option<PathBuf>,
    pub plots: Option<PathBuf>,
    /// Stopped early by `RunOptions::stop`.
    pub interrupted: bool,
}

pub struct Trainer {
    cfg: TrainConfig,
    /// The rank's place in a distributed run (None: one process).
    dist: Option<Dist>,
    model_cfg: Config,
    opts: RunOptions,
    tok: Tokenizer,
    params: Params,
    model: Glm,
    opt: Optimizer,
    batcher: Batcher,
    val: Validation,
    state: RunState,
    ckpts: Checkpoints,
    metrics: Metrics,
    schedule: LrSchedule,
    /// (step, fault kind) already injected.
    fired: HashSet<(u64, u8)>,
    /// (step, result) of the latest validation.
    last_val: Option<(u64, ValResult)>,
    resumed_from: Option<u64>,
    last_saved: Option<u64>,
    /// The pipeline's timing of the latest step (this stage's).
    pipe: Option<glm_dist::pipeline::ExecStats>,
    pb: ProgressBar,
}

/// The fields in which two model configs differ, as "field: a vs b".
fn config_diff(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(x)), Ok(serde_json::Value::Object(y))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["(unreadable config)".into()];
    };
    x.iter().filter(|(k, v)| y.get(*k) != Some(v)).map(|(k, v)| format!("{k}: {v} vs {}", y[k])).collect()
}

impl Trainer {
    pub fn new(cfg: TrainConfig, opts: RunOptions) -> Result<Self> {
        Self::with_dist(cfg, opts, None)
    }

    /// One rank of a distributed run: every rank of the world calls this with its `Dist`, on the
    /// thread that registered its groups. The first rank logs, plots and writes shared files.
    pub fn with_dist(cfg: TrainConfig, opts: RunOptions, dist: Option<Dist>) -> Result<Self> {
        cfg.validate()?;
        let main = dist.as_ref().is_none_or(|d| d.is_main());
        let model_cfg = cfg.model()?;
        let (tok, tok_hash) = glm_data::load_tokenizer(cfg.data.tokenizer.as_deref())?;
        if tok.vocab_size() > model_cfg.vocab_size {
            return Err(Error::Config(format!(
                "the tokenizer has {} ids but model `{}` only {}",
                tok.vocab_size(),
                model_cfg.name,
                model_cfg.vocab_size
            )));
        }
        if cfg.objective.seq_len > model_cfg.max_seq_len {
            return Err(Error::Config(format!(
                "objective.seq_len = {} exceeds the model's max_seq_len = {}",
                cfg.objective.seq_len, model_cfg.max_seq_len
            )));
        }
        let ids = glm_data::objective_ids(&tok)?;
        let train_shards = glm_data::train_shards(&tok, &tok_hash, cfg.data.dir.as_deref())?;
        let instructions = if cfg.objective.mip_token_share > 0.0 {
            let records = glm_data::instruction_records(cfg.data.instructions.as_deref())?;
            Some(Instructions::from_records(&tok, &records, cfg.seed)?)
        } else {
            None
        };
        // Pieces of one row's length are shuffled, so a long book does not fill consecutive batches.
        let stream = TokenStream::new(train_shards.clone(), glm_data::eod_id(&tok)?, cfg.seed, 0, 1)?
            .with_max_piece(cfg.objective.seq_len);
        let batcher = Batcher::new(cfg.objective.clone(), ids, stream, instructions, cfg.seed, 0)?;
        let heldout = corpus::shard(&tok, &tok_hash, corpus::Split::Heldout)?;
        let val = Validation::new(
            &tok,
            heldout,
            &train_shards,
            &cfg.objective,
            &ids,
            glm_data::eod_id(&tok)?,
            cfg.eval.rows,
            cfg.batch.micro_batch,
            cfg.seed ^ 0xE7A1,
        )?;

        std::fs::create_dir_all(&opts.out).map_err(|e| Error::Io(format!("{}: {e}", opts.out.display())))?;
        let ckpts = Checkpoints::new(opts.out.join("checkpoints"));
        if main {
            ckpts.clean_temporaries()?;
        }
        if let Some(d) = &dist {
            d.world().barrier().map_err(|e| Error::Dist(e.to_string()))?;
        }
        let existing = ckpts.list();
        if opts.resume && !opts.start_if_empty && existing.is_empty() {
            return Err(Error::Config(format!(
                "nothing to resume: {} holds no checkpoint (is --out right?); to start a new run there, drop \
                 --resume, or pass --resume-or-start to continue a run if there is one",
                ckpts.root.display()
            )));
        }
        if !opts.resume && !existing.is_empty() {
            return Err(Error::Config(format!(
                "{} already holds checkpoints (newest: step {}); pass --resume to continue, or choose another --out",
                ckpts.root.display(),
                existing.last().map(|x| x.0).unwrap_or(0)
            )));
        }
        let weights = glm_model::init_weights(&model_cfg, cfg.seed, &Device::Cpu)?;
        let tp = dist.as_ref().map_or((0, 1), |d| d.tp());
        let stage = match &dist {
            Some(d) => d.stage(model_cfg.num_layers)?,
            None => glm_model::StageSpec::whole(&model_cfg),
        };
        if main && stage.stages > 1 {
            let plan = glm_model::StageSpec::plan(model_cfg.num_layers, stage.stages)?;
            let counts: Vec<usize> = plan.iter().map(|s| s.layers.len()).collect();
            let even = counts.iter().all(|&c| c == counts[0]);
            eprintln!(
                "pipeline: {} stages of {counts:?} layers{} (embedding on stage 0, head on stage {})",
                stage.stages,
                if even { "" } else { " (uneven)" },
                stage.stages - 1
            );
        }
        let params = Params::sharded(&model_cfg, &weights, cfg.precision.dtype(), &opts.device, tp, &stage)?;
        let model = params.model(&model_cfg, dist.as_ref().map(|d| d.tp))?;
        let o = &cfg.optim;
        let adam = AdamWConfig { beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay };
        let opt = Optimizer::new(adam, &params, dist.as_ref(), o.fused)?;
        let schedule = LrSchedule::new(o, samples_after(&cfg.batch, cfg.max_steps));
        let state = RunState {
            step: 0,
            samples: 0,
            tokens: 0,
            data: batcher.cursor(),
            scaler: (cfg.precision == Precision::F16).then(|| LossScaler::new(&cfg.scaler)),
            adam_steps: 0,
            egs_alpha: cfg.regularization.egs_alpha,
            lr_scale: 1.0,
            skip: Vec::new(),
            interventions: 0,
            monitor: Monitor::default(),
            seed: cfg.seed,
            config_hash: cfg.hash(),
            model: model_cfg.clone(),
            train_config: cfg.clone(),
            compute: Some(glm_nn::blas::describe()),
        };
        let pb = if opts.progress && main {
            ProgressBar::with_draw_target(Some(cfg.max_steps), ProgressDrawTarget::stderr_with_hz(4))
        } else {
            ProgressBar::hidden()
        };
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut t = Self {
            // Opened keeping everything; resume() or a fresh start reopens it below.
            metrics: if main { Metrics::open(&opts.out, Some(u64::MAX))? } else { Metrics::memory(&opts.out) },
            cfg,
            dist,
            model_cfg,
            opts,
            tok,
            params,
            model,
            opt,
            batcher,
            val,
            state,
            ckpts,
            schedule,
            fired: HashSet::new(),
            last_val: None,
            resumed_from: None,
            last_saved: None,
            pipe: None,
            pb,
        };
        if t.opts.resume && !existing.is_empty() {
            t.resume()?;
        } else if main {
            t.metrics = Metrics::open(&t.opts.out, None)?;
        }
        if main {
            let text = t.cfg.to_toml()?;
            glm_checkpoint::write_atomic(&t.opts.out.join("config.toml"), text.as_bytes())
                .map_err(|e| Error::Io(format!("{}: {e}", t.opts.out.display())))?;
        }
        Ok(t)
    }

    /// The first rank (or the only process): it logs, plots and writes shared files.
    pub fn is_main(&self) -> bool {
        self.main()
    }

    /// Whether to stop now: the flag, agreed by every rank (a signal reaches the ranks at
    /// different steps; they must stop at the same one).
    fn stop_requested(&self) -> Result<bool> {
        let local = self.opts.stop.is_some_and(|s| s.load(Ordering::SeqCst));
        let Some(d) = &self.dist else { return Ok(local) };
        let mut v = [if local { 1.0 } else { 0.0 }];
        d.world().all_reduce_scalars(&mut v, glm_dist::ReduceOp::Max).map_err(|e| Error::Dist(e.to_string()))?;
        Ok(v[0] > 0.0)
    }

    fn main(&self) -> bool {
        self.dist.as_ref().is_none_or(|d| d.is_main())
    }

    fn logs(&self, resume_step: Option<u64>) -> Result<Metrics> {
        if self.main() {
            Metrics::open(&self.opts.out, resume_step)
        } else {
            Ok(Metrics::memory(&self.opts.out))
        }
    }

    pub fn model(&self) -> &Glm {
        &self.model
    }

    /// The f32 master weights this rank holds (its tensor-parallel shards of its pipeline stage's
    /// parameters), by name.
    pub fn weights(&self) -> std::collections::HashMap<String, candle_core::Tensor> {
        self.params.master_tensors()
    }

    /// This pipeline stage's timing of the latest step (None without pipelining).
    pub fn pipeline_stats(&self) -> Option<glm_dist::pipeline::ExecStats> {
        self.pipe
    }

    /// Bytes of AdamW state this rank holds (8 per parameter, or 8/dp with ZeRO-1).
    pub fn optimizer_bytes(&self) -> usize {
        self.opt.state_bytes(&self.params)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// Continue from the newest checkpoint that verifies, reporting any that do not.
    fn resume(&mut self) -> Result<()> {
        let mut bad = Vec::new();
        let found = self.ckpts.latest_good(|d, e| bad.push((d.to_path_buf(), e.to_string())));
        for (d, e) in bad.iter().filter(|_| self.main()) {
            self.pb.suspend(|| eprintln!("warning: skipping checkpoint {}: {e}", d.display()));
        }
        let Some((step, dir)) = found else {
            return Err(Error::Checkpoint(format!(
                "no usable checkpoint in {} ({} found, none verifies)",
                self.ckpts.root.display(),
                bad.len()
            )));
        };
        self.load_checkpoint(&dir)?;
        if self.state.config_hash != self.cfg.hash() && self.main() {
            self.pb.suspend(|| {
                eprintln!("note: the training config differs from the checkpoint's (hash {} vs {}); continuing with the new one",
                    self.cfg.hash(), self.state.config_hash)
            });
        }
        if self.state.config_hash != self.cfg.hash() {
            self.state.config_hash = self.cfg.hash();
            self.state.train_config = self.cfg.clone();
        }
        // Other kernels round differently: the run continues, and says so once.
        let now = glm_nn::blas::describe();
        let before = self.state.compute.replace(now.clone());
        let changed = before.as_ref().filter(|b| **b != now).cloned();
        self.resumed_from = Some(step);
        self.last_saved = Some(step);
        self.metrics = self.logs(Some(step))?;
        for (d, e) in bad {
            // "step": when it was found (the step resumed); "checkpoint_step": the refused one's.
            let of = Checkpoints::step_of(&d);
            let e = json!({"step": step, "kind": "corrupt_checkpoint", "checkpoint_step": of, "path": d, "error": e});
            self.metrics.event(e)?;
        }
        self.metrics.event(json!({"step": step, "kind": "resume", "from": dir}))?;
        if let Some(before) = changed {
            let msg = format!(
                "resumed on other compute: the checkpoint ran on {before}, this run on {now}; the gradients will \
                 differ in the last digits from an uninterrupted run"
            );
            if self.main() {
                self.pb.suspend(|| eprintln!("note: {msg}"));
            }
            self.metrics.event(
                json!({"step": step, "kind": "compute_changed", "before": before, "now": now, "message": msg}),
            )?;
        }
        Ok(())
    }

    fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state: RunState = serde_json::from_slice(&Checkpoints::load_state(dir)?)
            .map_err(|e| Error::Checkpoint(format!("{}: bad state.json: {e}", dir.display())))?;
        if state.model != self.model_cfg {
            return Err(Error::Mismatch(format!(
                "checkpoint {} is of a different architecture than this config ({}); refusing to resume. \
                 Use another --out, or the checkpoint's own config",
                dir.display(),
                config_diff(&state.model, &self.model_cfg).join("; ")
            )));
        }
        let (tp, stage) = (self.params.tp, &self.params.stage);
        self.params.load(&Checkpoints::load_stage(dir, MODEL_FILE, &self.model_cfg, tp, stage)?)?;
        let moments = Checkpoints::load_stage(dir, OPTIMIZER_FILE, &self.model_cfg, tp, stage)?;
        let get = |n: &str| {
            moments
                .get(n)
                .map(|t| t.to_device(&self.opts.device))
                .transpose()?
                .ok_or_else(|| Error::Checkpoint(format!("{}: optimizer state lacks {n}", dir.display())))
        };
        self.opt.load_state(&self.params, get, state.adam_steps)?;
        self.batcher.restore(state.data)?;
        self.state = state;
        Ok(())
    }

    fn save(&mut self) -> Result<PathBuf> {
        self.state.adam_steps = self.opt.t();
        self.state.data = self.batcher.cursor();
        // The last stage's copy of the tied embeddings is saved once, by the first stage.
        let copies: HashSet<&String> =
            self.params.names.iter().zip(&self.params.tied_copy).filter(|(_, c)| **c).map(|(n, _)| n).collect();
        let own = |n: &str| !copies.iter().any(|c| n == c.as_str() || n.ends_with(&format!(".{c}")));
        let mut model = self.params.master_tensors();
        model.retain(|n, _| own(n));
        let optim: std::collections::HashMap<String, candle_core::Tensor> =
            self.opt.state_tensors(&self.params, self.dist.as_ref())?.into_iter().filter(|(n, _)| own(n)).collect();
        let state = serde_json::to_vec_pretty(&self.state).map_err(|e| Error::Checkpoint(e.to_string()))?;
        let keep = self.cfg.checkpoint.keep;
        let p = match &self.dist {
            None => self.ckpts.save(self.state.step, &model, &optim, &state, keep)?,
            Some(d) => {
                let writer = d.dp().0 == 0;
                self.ckpts.save_sharded(
                    self.state.step,
                    &model,
                    &optim,
                    &state,
                    keep,
                    Some(d.world()),
                    d.tp(),
                    d.pp(),
                    writer,
                )?
            }
        };
        self.last_saved = Some(self.state.step);
        Ok(p)
    }

    fn validate(&mut self) -> Result<ValResult> {
        let v = match &self.dist {
            Some(d) if d.pp().1 > 1 => self.val.run_with(&mut |b| crate::pipe::score(&self.model, b, d))?,
            _ => self.val.run(&self.model)?,
        };
        self.metrics.eval(json!({
            "step": self.state.step, "val_loss": v.val_loss, "val_bpb": v.val_bpb,
            "unigram_loss": v.unigram_loss, "unigram_bpb": v.unigram_bpb,
        }))?;
        let main = self.main();
        self.pb.suspend(|| {
            if !main {
                return;
            }
            eprintln!(
                "step {:>6}  held-out loss {:.4} (unigram {:.4})  bits/byte {:.4} (unigram {:.4})",
                self.state.step, v.val_loss, v.unigram_loss, v.val_bpb, v.unigram_bpb
            )
        });
        self.last_val = Some((self.state.step, v));
        Ok(v)
    }

    fn fault(&mut self, step: u64, kind: u8, list: &[u64]) -> bool {
        list.contains(&step) && self.fired.insert((step, kind))
    }

    fn in_skip_window(&self, step: u64) -> bool {
        self.state.skip.iter().any(|&(a, b)| (a..=b).contains(&step))
    }

    fn advance(&mut self, rows: usize) {
        self.state.step += 1;
        self.state.samples += rows as u64;
        self.state.tokens += (rows * self.cfg.objective.seq_len) as u64;
    }

    /// Run to `max_steps` (or `stop_at`), validating and checkpointing on the way.
    pub fn run(&mut self) -> Result<Summary> {
        let start = Instant::now();
        let (start_step, start_tokens) = (self.state.step, self.state.tokens);
        let end = self.opts.stop_at.unwrap_or(self.cfg.max_steps).min(self.cfg.max_steps);
        self.pb.set_position(self.state.step);
        if self.resumed_from.is_none() && self.state.step == 0 && self.cfg.eval.every > 0 {
            self.validate()?;
        }
        let mut interrupted = false;
        while self.state.step < end {
            if self.stop_requested()? {
                interrupted = true;
                break;
            }
            self.train_step()?;
            let s = self.state.step;
            if self.cfg.eval.every > 0 && s.is_multiple_of(self.cfg.eval.every) && s < end {
                self.validate()?;
                self.plot()?;
            }
            if self.cfg.checkpoint.every > 0 && s.is_multiple_of(self.cfg.checkpoint.every) && s < end {
                self.save()?;
            }
        }
        let val = match self.last_val {
            Some((step, v)) if step == self.state.step => Some(v),
            _ if interrupted => None, // stop quickly
            _ => Some(self.validate()?),
        };
        let checkpoint = if self.last_saved != Some(self.state.step) { Some(self.save()?) } else { None };
        let plots = Some(self.plot()?);
        self.pb.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        let tokens = self.state.tokens - start_tokens;
        let recent: Vec<f64> = self.metrics.steps().iter().rev().filter_map(|v| v["loss"].as_f64()).take(20).collect();
        Ok(Summary {
            out: self.opts.out.clone(),
            step: self.state.step,
            steps_run: self.state.step - start_step,
            resumed_from: self.resumed_from,
            train_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
            val,
            tokens,
            seconds,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            interventions: self.state.interventions,
            checkpoint: checkpoint.or_else(|| self.last_saved.map(|s| self.ckpts.dir(s))),
            plots,
            interrupted,
        })
    }

    fn plot(&self) -> Result<PathBuf> {
        if !self.main() {
            return Ok(self.opts.out.join(crate::metrics::PLOTS));
        }
        self.metrics.plot(&format!("glm train: {} ({})", self.model_cfg.name, self.opts.out.display()))
    }

    fn next_batches(&mut self, rows: usize) -> Vec<Batch> {
        let micro = self.cfg.batch.micro_batch;
        (0..rows.div_ceil(micro)).map(|_| self.batcher.next_batch(micro)).collect()
    }

    fn event(&mut self, step: u64, e: serde_json::Value, intervention: bool) -> Result<()> {
        let mut e = e;
        e["step"] = json!(step);
        e["intervention"] = json!(intervention);
        if intervention && self.main() {
            let msg = format!("step {step}: {}", e["message"].as_str().unwrap_or(""));
            self.pb.suspend(|| eprintln!("{msg}"));
        }
        self.metrics.event(e)
    }

    fn train_step(&mut self) -> Result<()> {
        let step = self.state.step + 1;
        let rows = batch_rows(&self.cfg.batch, self.state.samples);
        if self.in_skip_window(step) {
            let _ = self.next_batches(rows);
            self.advance(rows);
            return self.event(step, json!({"kind": "skipped_data", "rows": rows}), false);
        }
        let t0 = Instant::now();
        let batches = self.next_batches(rows);
        let lr = self.schedule.at(self.state.samples + rows as u64) * self.state.lr_scale;
        let scale = self.state.scaler.as_ref().map(|s| s.scale).unwrap_or(1.0);
        let f = self.cfg.faults.clone();
        let fault = if self.fault(step, 0, &f.nan_at) {
            Some(LossFault::Nan)
        } else if self.fault(step, 1, &f.spike_at) {
            Some(LossFault::Scale(if f.spike_factor > 0.0 { f.spike_factor } else { 10.0 }))
        } else {
            None
        };
        let r = &self.cfg.regularization;
        let train = TrainOptions {
            hidden_dropout: r.hidden_dropout as f32,
            attention_dropout: r.attention_dropout as f32,
            egs_alpha: self.state.egs_alpha,
            seed: glm_nn::dropout::site_seed(&[self.cfg.seed, step]),
        };
        let dp = self.dist.as_ref().map_or((0, 1), |d| d.dp());
        let mut g = match &self.dist {
            Some(d) if d.pp().1 > 1 => {
                let (g, stats) =
                    crate::pipe::forward_backward(&self.model, &self.params, &batches, &train, scale, fault, d)?;
                self.pipe = Some(stats);
                g
            }
            _ => forward_backward(&self.model, &self.params, &batches, &train, scale, fault, dp)?,
        };
        if self.fault(step, 2, &f.inf_grad_at) {
            if let Some(first) = g.grads.first_mut() {
                *first = (&*first * f64::INFINITY)?;
            }
        }
        let owned = sync_grads(self.dist.as_ref(), &self.opt, &self.params, &mut g)?;
        let sq = match (&self.opt, &owned) {
            (Optimizer::Sharded(_, flat), Some(o)) => owned_sq_norms(flat, o, &self.params, self.params.tp.0),
            _ => shard_sq_norms(&g.grads, &self.params, self.params.tp.0)?,
        };
        let (norm, groups) = norms(self.dist.as_ref(), &self.opt, sq, scale)?;

        // f16: an overflow in the gradients (the loss itself finite) is the scaler's business.
        if let Some(sc) = self.state.scaler.as_mut() {
            if g.loss.is_finite() && !norm.is_finite() {
                let change = sc.update(true);
                let new = sc.scale;
                self.advance(rows);
                let msg = format!("gradient overflow at loss scale {scale}: step skipped, scale now {new}");
                self.log_step(step, &g.loss, lr, norm, &groups, rows, t0, true)?;
                return self.event(
                    step,
                    json!({"kind": "overflow", "action": "skip", "message": msg, "halved": change == ScaleChange::Halved, "loss_scale": new}),
                    true,
                );
            }
        }
        if let Some(ev) = self.state.monitor.check(&self.cfg.monitor, g.loss, norm) {
            match Monitor::policy(&self.cfg.monitor, &ev) {
                Policy::Ignore => self.event(
                    step,
                    json!({"kind": "monitor", "event": ev, "action": "ignore", "message": ev.describe()}),
                    false,
                )?,
                Policy::Skip => {
                    self.count_intervention(step, &ev)?;
                    self.advance(rows);
                    self.log_step(step, &g.loss, lr, norm, &groups, rows, t0, true)?;
                    let msg = format!("{}: update skipped", ev.describe());
                    return self.event(
                        step,
                        json!({"kind": "monitor", "event": ev, "action": "skip", "message": msg}),
                        true,
                    );
                }
                Policy::Rollback => return self.rollback(step, ev),
            }
        }
        let clip = self.cfg.optim.clip_grad;
        let coef = if clip > 0.0 && norm > clip { clip / (norm + 1e-6) } else { 1.0 };
        self.opt.step(&self.params, &g.grads, owned, lr, coef / scale, self.dist.as_ref())?;
        self.params.sync_compute()?;
        if let Some(sc) = self.state.scaler.as_mut() {
            sc.update(false);
        }
        self.state.monitor.accept(&self.cfg.monitor, g.loss, norm);
        self.advance(rows);
        self.log_step(step, &g.loss, lr, norm, &groups, rows, t0, false)
    }

    fn count_intervention(&mut self, step: u64, ev: &Event) -> Result<()> {
        self.state.interventions += 1;
        if self.state.interventions > self.cfg.monitor.max_interventions {
            return Err(Error::Diverged(format!(
                "step {step}: {} and {} interventions so far (monitor.max_interventions = {}); stopping",
                ev.describe(),
                self.state.interventions - 1,
                self.cfg.monitor.max_interventions
            )));
        }
        Ok(())
    }

    /// GLM-130B's playbook: back to the last good checkpoint, skip the data around the event, shrink
    /// EGS alpha and the learning rate.
    fn rollback(&mut self, step: u64, ev: Event) -> Result<()> {
        self.count_intervention(step, &ev)?;
        let interventions = self.state.interventions;
        let mut bad = Vec::new();
        let Some((to, dir)) = self.ckpts.latest_good(|d, e| bad.push(format!("{}: {e}", d.display()))) else {
            // Nothing to roll back to yet: drop this update instead.
            let rows = batch_rows(&self.cfg.batch, self.state.samples);
            self.advance(rows);
            let msg = format!("{}: no checkpoint to roll back to yet, update skipped", ev.describe());
            return self.event(step, json!({"kind": "monitor", "event": ev, "action": "skip", "message": msg}), true);
        };
        self.load_checkpoint(&dir)?;
        self.state.compute = Some(glm_nn::blas::describe());
        let m = &self.cfg.monitor;
        let window = (step.saturating_sub(m.skip_steps - 1).max(1), step);
        self.state.skip.push(window);
        self.state.egs_alpha *= m.rollback_egs_factor;
        self.state.lr_scale *= m.rollback_lr_factor;
        self.state.interventions = interventions;
        self.save()?; // the checkpoint now carries the skip window and the new factors
        self.metrics = self.logs(Some(to))?;
        self.pb.set_position(to);
        let msg = format!(
            "{}: rolled back to step {to}, skipping the data of steps {}..={}, EGS alpha {:.3}, LR x{:.3}",
            ev.describe(),
            window.0,
            window.1,
            self.state.egs_alpha,
            self.state.lr_scale
        );
        let e = json!({"kind": "monitor", "event": ev, "action": "rollback", "to_step": to, "skip": [window.0, window.1],
            "egs_alpha": self.state.egs_alpha, "lr_scale": self.state.lr_scale, "corrupt_skipped": bad, "message": msg});
        self.event(step, e, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn log_step(
        &mut self,
        step: u64,
        loss: &f64,
        lr: f64,
        norm: f64,
        groups: &[f64],
        rows: usize,
        t0: Instant,
        skipped: bool,
    ) -> Result<()> {
        let secs = t0.elapsed().as_secs_f64();
        let tps = (rows * self.cfg.objective.seq_len) as f64 / secs.max(1e-9);
        let norms: serde_json::Map<String, serde_json::Value> =
            self.params.groups.iter().cloned().zip(groups.iter().map(|g| json!(g))).collect();
        let mut record = json!({
            "step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tps,
            "loss_scale": self.state.scaler.as_ref().map(|s| s.scale).unwrap_or(1.0),
            "egs_alpha": self.state.egs_alpha, "lr_scale": self.state.lr_scale, "batch": rows,
            "samples": self.state.samples, "tokens": self.state.tokens, "seconds": secs, "skipped": skipped,
            "grad_norms": norms,
        });
        if let Some(p) = self.pipe {
            // This (the first) stage's view of the 1F1B step.
            record["pipeline"] = json!({"stage": self.params.stage.index, "bubble": p.bubble(), "busy_s": p.busy,
                "wall_s": p.wall, "sent_bytes": p.sent, "max_held": p.max_held});
        }
        self.metrics.step(record)?;
        self.pb.set_position(self.state.step);
        self.pb.set_message(format!("loss {loss:.4} | {tps:.0} tok/s | lr {lr:.2e} | |g| {norm:.3}"));
        Ok(())
    }

    /// The dtype training computes in.
    pub fn dtype(&self) -> DType {
        self.params.dtype
    }
}

/// Shorthand used by tests and the CLI: build and run.
pub fn train(cfg: TrainConfig, opts: RunOptions) -> Result<Summary> {
    Trainer::new(cfg, opts)?.run()
}
