//! `glm bench dist`'s analytic formulas, the measurements beside them, and the tables.
//!
//! Per micro-batch of B rows of T tokens, hidden size H, L layers, N scored positions (the trainer
//! computes logits only there), tensor parallelism all-reduces (f32):
//!
//! - forward: the embedding's vocab-parallel lookup (B·T·H) and each layer's two row-parallel
//!   outputs, attention's dense and the MLP's dense_4h_to_h (2·L of B·T·H);
//! - backward: the inputs of each layer's two column-parallel linears (QKV, dense_h_to_4h),
//!   `copy_to`'s all-reduce (2·L of B·T·H), and the tied head's input (N·H);
//! - the vocab-parallel cross entropy: max, Σexp and the target logit (3 of N);
//!
//! and once per step the squared gradient norms of the L + 2 norm groups (f64). Data parallelism
//! all-reduces P gradients per step in buckets (or, with ZeRO-1, reduce-scatters and all-gathers
//! P rounded up to a multiple of dp in every bucket), plus the loss (and with ZeRO-1 the norms) in
//! f64. Before every step all ranks agree on the stop flag: one f64 over the world.

use glm_data::{Batcher, TokenStream};
use glm_dist::split::{rank_shape, split_of};
use glm_model::weights::param_table;
use glm_train::dist::Flat;

use super::*;

/// (calls, payload bytes) by (group, kind).
type Counts = BTreeMap<(String, Kind), (f64, f64)>;

#[derive(Debug, Clone, Serialize)]
pub struct CommRow {
    pub group: String,
    pub group_size: usize,
    pub collective: String,
    /// Per step, on rank 0 (means of the timed steps).
    pub calls: f64,
    pub formula_calls: f64,
    pub mb: f64,
    pub formula_mb: f64,
    /// What a ring algorithm sends per rank for the measured payload.
    pub ring_mb_sent: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run: RunKind,
    pub ranks: usize,
    pub threads_per_rank: usize,
    pub step_s: f64,
    pub comm_s: f64,
    pub compute_s: f64,
    pub speedup: Option<f64>,
    /// Each timed step: from the previous step's same point, and as the trainer logs it.
    pub step_s_each: Vec<f64>,
    pub logged_s_each: Vec<f64>,
    pub losses: Vec<f64>,
    /// How rank 0's log of calls was cut into steps ("periodic" or "time windows").
    pub partition: String,
    pub comm: Vec<CommRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemRow {
    pub layout: String,
    pub optimizer_bytes: u64,
    pub formula_bytes: f64,
    /// Per parameter of the whole model.
    pub state_per_param: f64,
    /// AdamW state plus the rank's f32 weights and gradients, per parameter of the whole model.
    pub total_per_param: f64,
    /// Megatron's fp32 row: 8 + 8/d (weights and gradients 8, moments 8/d), or 16/tp.
    pub megatron_per_param: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DistReport {
    pub cpu: String,
    pub cores: usize,
    /// /proc/loadavg when the report was built: other jobs on the machine skew every time.
    pub loadavg: String,
    pub backend: String,
    pub env: BTreeMap<String, String>,
    pub model: Config,
    pub params: u64,
    pub batch: usize,
    pub seq: usize,
    pub micro_batches: usize,
    pub warmup: usize,
    pub steps: usize,
    pub bucket: usize,
    /// Scored positions of each micro-batch of the timed steps.
    pub scored: Vec<Vec<usize>>,
    /// ZeRO-1's flat gradient buffer: P rounded up to a multiple of dp in each bucket.
    pub params_padded: u64,
    pub buckets: usize,
    pub runs: Vec<RunReport>,
    pub memory: Vec<MemRow>,
    pub notes: Vec<String>,
}

/// Scored positions (N) of each micro-batch of each step, drawn again as the trainer draws them.
fn scored_batches(tc: &TrainConfig) -> Result<Vec<Vec<usize>>> {
    let (tok, hash) = glm_data::load_tokenizer(tc.data.tokenizer.as_deref())?;
    let ids = glm_data::objective_ids(&tok)?;
    let shards = glm_data::train_shards(&tok, &hash, tc.data.dir.as_deref())?;
    let instructions = if tc.objective.mip_token_share > 0.0 {
        let records = glm_data::instruction_records(tc.data.instructions.as_deref())?;
        Some(glm_data::Instructions::from_records(&tok, &records, tc.seed)?)
    } else {
        None
    };
    let stream = TokenStream::new(shards, glm_data::eod_id(&tok)?, tc.seed, 0, 1)?.with_max_piece(tc.objective.seq_len);
    let mut b = Batcher::new(tc.objective.clone(), ids, stream, instructions, tc.seed, 0)?;
    let micro = tc.batch.micro_batch;
    let m = tc.batch.global / micro;
    Ok((0..tc.max_steps).map(|_| (0..m).map(|_| glm_train::step::scored(&b.next_batch(micro))).collect()).collect())
}

/// One step's collectives on rank 0, by the formulas above; `scored`: N of the step's micro-batches.
fn formula(run: RunKind, o: &DistBenchOpts, lens: &[usize], scored: &[usize]) -> Counts {
    let (b, t, h, l) = (o.batch as f64, o.seq as f64, o.hidden as f64, o.layers as f64);
    let mut c = Counts::new();
    let mut add = |g: &str, k: Kind, calls: f64, bytes: f64| {
        let e = c.entry((g.to_string(), k)).or_insert((0.0, 0.0));
        e.0 += calls;
        e.1 += bytes;
    };
    let p = lens.iter().sum::<usize>() as f64;
    if run != RunKind::Baseline {
        add("world", Kind::AllReduceF64, 1.0, 8.0);
    }
    match run {
        RunKind::Baseline => {}
        RunKind::Tp => {
            for n in scored.iter().filter(|&&n| n > 0).map(|&n| n as f64) {
                let floats = (1.0 + 4.0 * l) * b * t * h + n * h + 3.0 * n;
                add("tp", Kind::AllReduceF32, 1.0 + 4.0 * l + 1.0 + 3.0, 4.0 * floats);
            }
            add("tp", Kind::AllReduceF64, 1.0, 8.0 * (l + 2.0));
        }
        RunKind::Dp => {
            let buckets = Flat::new(lens, o.bucket, 1, 0).owned().len() as f64;
            add("dp", Kind::AllReduceF32, buckets, 4.0 * p);
            add("dp", Kind::AllReduceF64, 1.0, 8.0);
        }
        RunKind::Zero => {
            let flat = Flat::new(lens, o.bucket, o.dp, 0);
            let (buckets, padded) = (flat.owned().len() as f64, flat.padded() as f64);
            add("dp", Kind::ReduceScatter, buckets, 4.0 * padded);
            add("dp", Kind::AllGather, buckets, 4.0 * padded);
            add("dp", Kind::AllReduceF64, 2.0, 8.0 * (1.0 + l + 2.0));
        }
    }
    c
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The report of the runs `done` (rank 0's measurements) and ZeRO-1 memory at `extra` degrees.
pub fn build(
    o: &DistBenchOpts,
    tc: &TrainConfig,
    backend: &str,
    done: Vec<Measured>,
    extra: Vec<(usize, u64)>,
) -> Result<DistReport> {
    let cfg = o.model()?;
    let table = param_table(&cfg);
    let lens: Vec<usize> = table.iter().map(|s| s.numel() as usize).collect();
    let p = lens.iter().sum::<usize>() as f64;
    let all = scored_batches(tc)?;
    let scored: Vec<Vec<usize>> = all[o.warmup..].to_vec();
    let base_step = done.iter().find(|m| m.run == RunKind::Baseline).map(|m| mean(&m.step_s));
    let steps = o.steps as f64;
    let mut runs = Vec::new();
    for m in &done {
        let mut want = Counts::new();
        for s in &scored {
            for (k, (calls, bytes)) in formula(m.run, o, &lens, s) {
                let e = want.entry(k).or_insert((0.0, 0.0));
                e.0 += calls / steps;
                e.1 += bytes / steps;
            }
        }
        let mut keys: Vec<(String, Kind)> = m.tallies.keys().cloned().chain(want.keys().cloned()).collect();
        keys.sort();
        keys.dedup();
        let comm = keys
            .into_iter()
            .map(|key| {
                let got = m.tallies.get(&key).copied().unwrap_or_default();
                let (fc, fb) = want.get(&key).copied().unwrap_or((0.0, 0.0));
                let size = m.group_sizes.get(&key.0).copied().unwrap_or(1);
                CommRow {
                    collective: key.1.name().to_string(),
                    group_size: size,
                    calls: got.calls as f64 / steps,
                    formula_calls: fc,
                    mb: got.bytes as f64 / steps / 1e6,
                    formula_mb: fb / 1e6,
                    ring_mb_sent: key.1.ring_bytes(got.bytes, size) / steps / 1e6,
                    seconds: got.seconds / steps,
                    group: key.0,
                }
            })
            .collect();
        let (step_s, comm_s) = (mean(&m.step_s), mean(&m.comm_s));
        runs.push(RunReport {
            run: m.run,
            ranks: m.ranks,
            threads_per_rank: m.threads,
            step_s,
            comm_s,
            compute_s: step_s - comm_s,
            speedup: base_step.map(|b| b / step_s),
            step_s_each: m.step_s.clone(),
            logged_s_each: m.logged_s.clone(),
            losses: m.losses.clone(),
            partition: m.partition.to_string(),
            comm,
        });
    }
    let tp_shard: f64 = table
        .iter()
        .map(|s| rank_shape(split_of(&cfg, &s.name), &s.shape, o.tp).iter().product::<usize>() as f64)
        .sum();
    let mut memory = Vec::new();
    let mut mem = |layout: String, bytes: u64, formula: f64, weights: f64, megatron: f64| {
        memory.push(MemRow {
            layout,
            optimizer_bytes: bytes,
            formula_bytes: formula,
            state_per_param: bytes as f64 / p,
            total_per_param: (bytes as f64 + 8.0 * weights) / p,
            megatron_per_param: megatron,
        })
    };
    for m in &done {
        let d = o.dp as f64;
        match m.run {
            RunKind::Baseline => mem("1 rank".into(), m.optimizer_bytes, 8.0 * p, p, 16.0),
            RunKind::Tp => mem(format!("tp {}", o.tp), m.optimizer_bytes, 8.0 * tp_shard, tp_shard, 16.0 / o.tp as f64),
            RunKind::Dp => mem(format!("dp {}", o.dp), m.optimizer_bytes, 8.0 * p, p, 16.0),
            RunKind::Zero => mem(format!("dp {} + ZeRO-1", o.dp), m.optimizer_bytes, 8.0 * p / d, p, 8.0 + 8.0 / d),
        }
    }
    for (d, bytes) in extra {
        let d = d as f64;
        mem(format!("dp {d} + ZeRO-1 (built only)"), bytes, 8.0 * p / d, p, 8.0 + 8.0 / d);
    }
    let flat = Flat::new(&lens, o.bucket, o.dp, 0);
    let threads = done.first().map_or(o.threads, |m| m.threads);
    let mut notes =
        vec!["in collectives: wall time inside the communicator's calls, waiting for the peers included (an \
         imbalance between the ranks counts as communication); compute: the rest of the step."
            .to_string()];
    notes.push(match backend {
        "local" => format!(
            "local backend: the ranks are threads of one process; each rank thread is its own rayon pool of {threads} \
             thread(s) (not one shared pool); OpenBLAS threads are process-wide (OPENBLAS_NUM_THREADS); a collective \
             is a shared-memory exchange in which every rank sums all contributions."
        ),
        _ => format!(
            "{backend} backend: one process per rank, {threads} compute thread(s) each; world rank 0 ran the 1-rank \
             baseline first while the other ranks waited in a (sleeping) barrier."
        ),
    });
    let env = ["OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS", "OMPI_COMM_WORLD_SIZE"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    Ok(DistReport {
        cpu: measure::cpu_name(),
        cores: measure::cores(),
        loadavg: std::fs::read_to_string("/proc/loadavg").map(|l| l.trim().to_string()).unwrap_or_default(),
        backend: backend.to_string(),
        env,
        params: p as u64,
        model: cfg,
        batch: o.batch,
        seq: o.seq,
        micro_batches: o.micro_batches,
        warmup: o.warmup,
        steps: o.steps,
        bucket: o.bucket,
        scored,
        params_padded: flat.padded() as u64,
        buckets: flat.owned().len(),
        runs,
        memory,
        notes,
    })
}

/// The report as tables for people.
pub fn render(r: &DistReport) -> String {
    let c = &r.model;
    let env: Vec<String> = r.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut s = format!(
        "{} ({} cores; load average at the end {}), backend {}, {}; f32, dropout 0.\n\
         model: {} layers, hidden {}, {} heads, ffn {}, vocab {} = {:.2}M parameters; \
         B {} x T {}, {} micro-batches a step; means of {} steps after {} warm-up.\n\
         gradient buckets of {} elements: {} for ZeRO-1, P padded to {} (+{}).\n\
         N (scored positions) of the timed steps' micro-batches: {:?}\n\n",
        r.cpu,
        r.cores,
        r.loadavg,
        r.backend,
        if env.is_empty() { "no thread env".to_string() } else { env.join(" ") },
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.ffn_hidden_size,
        c.vocab_size,
        r.params as f64 / 1e6,
        r.batch,
        r.seq,
        r.micro_batches,
        r.steps,
        r.warmup,
        r.bucket,
        r.buckets,
        r.params_padded,
        r.params_padded - r.params,
        r.scored
    );
    s += "Time per step (rank 0; step = from the previous step's same point, the trainer's logged \
          train_step beside it)\n\n\
          | run | ranks x threads | step s (logged) | in collectives s | compute s | comm share | speed-up vs 1 rank | loss (last step) |\n\
          |---|---|---|---|---|---|---|---|\n";
    for x in &r.runs {
        s += &format!(
            "| {} | {} x {} | {:.3} ({:.3}) | {:.3} | {:.3} | {:.1}% | {} | {:.4} |\n",
            x.run.name(),
            x.ranks,
            x.threads_per_rank,
            x.step_s,
            mean(&x.logged_s_each),
            x.comm_s,
            x.compute_s,
            100.0 * x.comm_s / x.step_s.max(1e-12),
            x.speedup.map_or("-".into(), |v| format!("{v:.2}x")),
            x.losses.last().copied().unwrap_or(f64::NAN)
        );
    }
    s += "\nCollectives per step per rank (rank 0; payload MB = 1e6 bytes: an all-reduce's buffer, a \
          reduce-scatter's input, an all-gather's output)\n\n\
          | run | group | collective | calls (formula) | MB measured | MB formula | diff | ring MB sent | ms inside |\n\
          |---|---|---|---|---|---|---|---|---|\n";
    for x in &r.runs {
        for row in &x.comm {
            s += &format!(
                "| {} | {} ({}) | {} | {:.2} ({:.2}) | {:.4} | {:.4} | {:+.4} | {:.4} | {:.1} |\n",
                x.run.name(),
                row.group,
                row.group_size,
                row.collective,
                row.calls,
                row.formula_calls,
                row.mb,
                row.formula_mb,
                row.mb - row.formula_mb,
                row.ring_mb_sent,
                1e3 * row.seconds
            );
        }
        if x.partition != "periodic" && x.run != RunKind::Baseline {
            s += &format!("| {} | | (steps cut by {}: their calls differ) | | | | | | |\n", x.run.name(), x.partition);
        }
    }
    s += "\nOptimizer state per rank (Trainer::optimizer_bytes; the largest rank)\n\n\
          | layout | AdamW state MB | formula MB | state B/param | + f32 weights & grads B/param | Megatron fp32 row |\n\
          |---|---|---|---|---|---|\n";
    for m in &r.memory {
        s += &format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            m.layout,
            m.optimizer_bytes as f64 / 1e6,
            m.formula_bytes / 1e6,
            m.state_per_param,
            m.total_per_param,
            m.megatron_per_param
        );
    }
    s += "\n";
    for n in &r.notes {
        s += &format!("{n}\n");
    }
    s
}
