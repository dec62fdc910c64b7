//! `glm bench data`: tokenizer training and encoding throughput beside Python sentencepiece and
//! Python `tokenizers` on the same text in the same run (py/tokenizer_bench.py), and the data
//! loader's tokens/s (corruption + packing into rows), to set against what training consumes.

use std::io::Write;
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use glm_data::{corpus, objective_ids, Batcher, Instructions, ObjectiveConfig, TokenStream};
use glm_tokenizer::{train, Tokenizer, TrainOptions};
use rayon::prelude::*;
use serde::Serialize;

const PY_SCRIPT: &str = include_str!("../py/tokenizer_bench.py");

#[derive(Debug, Clone)]
pub struct DataBench {
    /// MB of the embedded train split used to train tokenizers.
    pub train_mb: f64,
    pub vocab_size: usize,
    /// Rows sampled by the loader benchmark.
    pub rows: usize,
    pub seq_len: usize,
    /// Python with sentencepiece and tokenizers; `None` skips the baseline.
    pub python: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Measure {
    pub tool: String,
    pub what: String,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataReport {
    pub train_bytes: usize,
    pub encode_bytes: usize,
    pub vocab_size: usize,
    pub threads: usize,
    pub measures: Vec<Measure>,
    pub loader_tokens_per_s: f64,
    pub loader_rows_per_s: f64,
    pub loader_seq_len: usize,
    pub baseline_note: Option<String>,
}

fn mb(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

pub fn data(opts: &DataBench) -> Result<DataReport> {
    if opts.rows == 0 {
        return Err(anyhow!("--rows must be positive"));
    }
    let threads = rayon::current_num_threads();
    let train_docs: Vec<String> = corpus::documents(corpus::Split::Train)?.into_iter().map(|d| d.text).collect();
    let budget = (opts.train_mb * 1e6) as usize;
    // Interleave the sources: take every k-th document until the budget is met.
    let total: usize = train_docs.iter().map(String::len).sum();
    let step = (total / budget.max(1)).max(1);
    let mut train_text: Vec<String> = Vec::new();
    let mut used = 0;
    for d in train_docs.iter().step_by(step).chain(train_docs.iter()) {
        if used >= budget {
            break;
        }
        used += d.len();
        train_text.push(d.clone());
    }
    let encode_text: Vec<String> = corpus::documents(corpus::Split::Heldout)?.into_iter().map(|d| d.text).collect();
    let (train_bytes, encode_bytes) = (used, encode_text.iter().map(String::len).sum::<usize>());
    let mut measures = Vec::new();
    let mut add = |tool: &str, what: &str, seconds: f64, bytes: usize, note: String| {
        measures.push(Measure { tool: tool.into(), what: what.into(), seconds, mb_per_s: mb(bytes, seconds), note });
    };

    eprintln!("training glm-tokenizer on {:.1} MB ...", train_bytes as f64 / 1e6);
    let t0 = Instant::now();
    let (tok, rep) =
        train(&train_text, &TrainOptions { vocab_size: opts.vocab_size, show_progress: false, ..Default::default() })?;
    add(
        "glm-tokenizer",
        "train",
        t0.elapsed().as_secs_f64(),
        train_bytes,
        format!("{} learned pieces", rep.learned_pieces),
    );

    // Encoding: one thread, then all threads over documents (lines for the Python tools).
    let t0 = Instant::now();
    let n1: usize = encode_text.iter().map(|d| tok.encode(d).len()).sum();
    add("glm-tokenizer", "encode 1 thread", t0.elapsed().as_secs_f64(), encode_bytes, format!("{n1} tokens"));
    let t0 = Instant::now();
    let ids: Vec<Vec<u32>> = encode_text.par_iter().map(|d| tok.encode(d)).collect();
    add("glm-tokenizer", &format!("encode {threads} threads"), t0.elapsed().as_secs_f64(), encode_bytes, String::new());
    let t0 = Instant::now();
    let mut out_bytes = 0;
    for i in &ids {
        out_bytes += tok.decode(i)?.len();
    }
    add("glm-tokenizer", "decode 1 thread", t0.elapsed().as_secs_f64(), out_bytes, String::new());
    let default = Tokenizer::default_glm()?;
    let t0 = Instant::now();
    let nd: usize = encode_text.iter().map(|d| default.encode(d).len()).sum();
    add(
        "glm-tokenizer (embedded 8k)",
        "encode 1 thread",
        t0.elapsed().as_secs_f64(),
        encode_bytes,
        format!("{nd} tokens, {:.2} bytes/token", encode_bytes as f64 / nd as f64),
    );

    // Python baselines on the same text, written one line per line.
    let mut baseline_note = None;
    if let Some(py) = &opts.python {
        let dir = std::env::temp_dir().join(format!("glm-bench-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let write = |name: &str, docs: &[String]| -> Result<std::path::PathBuf> {
            let p = dir.join(name);
            let mut f = std::io::BufWriter::new(std::fs::File::create(&p)?);
            for d in docs {
                writeln!(f, "{d}")?;
            }
            Ok(p)
        };
        let (tp, ep, sp) = (write("train.txt", &train_text)?, write("encode.txt", &encode_text)?, dir.join("bench.py"));
        std::fs::write(&sp, PY_SCRIPT)?;
        eprintln!("running the Python baselines ({py}) ...");
        let out = Command::new(py)
            .arg(&sp)
            .args(["--train-text", &tp.display().to_string(), "--encode-text", &ep.display().to_string()])
            .args(["--vocab-size", &opts.vocab_size.to_string(), "--threads", &threads.to_string()])
            .output()
            .with_context(|| format!("running {py}"))?;
        let _ = std::fs::remove_dir_all(&dir);
        if out.status.success() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let v: serde_json::Value =
                    serde_json::from_str(line).with_context(|| format!("baseline output {line:?}"))?;
                let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
                let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
                let note: Vec<String> = ["threads", "tokens", "vocab_size"]
                    .iter()
                    .filter_map(|k| v.get(*k).map(|x| format!("{k} {x}")))
                    .collect();
                measures.push(Measure {
                    tool: s("tool"),
                    what: s("what"),
                    seconds: f("seconds"),
                    mb_per_s: f("mb_per_s"),
                    note: note.join(", "),
                });
            }
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            baseline_note = Some(format!("Python baseline failed: {}", err.lines().last().unwrap_or("")));
        }
    } else {
        baseline_note = Some("Python baselines skipped (no --python)".into());
    }

    // Loader: the embedded corpus, default objective, rows of seq_len.
    let hash = glm_data::content_hash(glm_tokenizer::DEFAULT_TOKENIZER_JSON.as_bytes());
    let shard = corpus::shard(&default, &hash, corpus::Split::Train)?;
    let stream = TokenStream::new(vec![shard], glm_data::eod_id(&default)?, 0, 0, 1)?;
    let ins = Instructions::from_records(&default, &corpus::instructions()?, 0)?;
    let cfg = ObjectiveConfig { seq_len: opts.seq_len, ..ObjectiveConfig::default() };
    let mut b = Batcher::new(cfg, objective_ids(&default)?, stream, Some(ins), 0, 0)?;
    let t0 = Instant::now();
    for _ in 0..opts.rows {
        std::hint::black_box(b.next_row());
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(DataReport {
        train_bytes,
        encode_bytes,
        vocab_size: opts.vocab_size,
        threads,
        measures,
        loader_tokens_per_s: (opts.rows * opts.seq_len) as f64 / secs,
        loader_rows_per_s: opts.rows as f64 / secs,
        loader_seq_len: opts.seq_len,
        baseline_note,
    })
}

pub fn render(r: &DataReport) -> String {
    let mut s = format!(
        "tokenizers: train on {:.1} MB (vocab {}), encode/decode {:.1} MB of held-out text, {} threads\n\n| tool | what | seconds | MB/s | note |\n|---|---|---:|---:|---|\n",
        r.train_bytes as f64 / 1e6,
        r.vocab_size,
        r.encode_bytes as f64 / 1e6,
        r.threads
    );
    for m in &r.measures {
        s += &format!("| {} | {} | {:.2} | {:.2} | {} |\n", m.tool, m.what, m.seconds, m.mb_per_s, m.note);
    }
    if let Some(n) = &r.baseline_note {
        s += &format!("\n{n}\n");
    }
    s += &format!(
        "\ndata loader (embedded corpus, GLM objective, rows of {}): {:.0} rows/s, {:.2} M tokens/s (1 thread)\n",
        r.loader_seq_len,
        r.loader_rows_per_s,
        r.loader_tokens_per_s / 1e6
    );
    s
}
