//! One task over its files: each data file is one prompt/subset (GLM-130B's convention), scored
//! into running sums (correct answers, EM/F1 totals, losses, bytes) that add up across files,
//! groups and tasks before any metric is computed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use glm_infer::{Generator, Sampler, SamplingConfig};
use glm_model::Glm;
use glm_tokenizer::Tokenizer;

use crate::data::{load_file, Example};
use crate::metrics;
use crate::score::Scorer;
use crate::task::{TaskConfig, TaskType};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Task `path`s are relative to it.
    pub data_root: PathBuf,
    /// At most this many examples (documents for `lm`) per file.
    pub limit: Option<usize>,
    /// Overrides each task's micro-batch-size.
    pub batch: Option<usize>,
    pub progress: bool,
    /// Multiple choice through the reference path: one row and one forward per choice.
    pub one_choice_per_row: bool,
}

/// One data file's results: its example count and the sums its metrics come from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FileScore {
    pub group: String,
    pub file: String,
    pub examples: usize,
    pub sums: BTreeMap<String, f64>,
}

/// Metrics from summed counts: accuracy and EM/F1 as fractions, PPL per whitespace word, BPB.
pub fn metrics_of(kind: TaskType, examples: usize, sums: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    let get = |k: &str| sums.get(k).copied().unwrap_or(0.0);
    let n = examples.max(1) as f64;
    match kind {
        TaskType::Mul => vec![("Accuracy".into(), get("correct") / n)],
        TaskType::Gen => {
            let mut m = vec![("EM".into(), get("em") / n), ("F1".into(), get("f1") / n)];
            if sums.contains_key("first_word") {
                m.insert(0, ("Accuracy".into(), get("first_word") / n));
            }
            m
        }
        TaskType::Lm => {
            let mut m = vec![
                ("BPB".into(), metrics::bits_per_byte(get("loss"), get("bytes") as usize)),
                ("token PPL".into(), (get("loss") / get("tokens").max(1.0)).exp()),
            ];
            // Perplexity per whitespace word (GLM-130B's, for English corpora) only where words are
            // whitespace-separated: not for Chinese, where a "word" would be a whole sentence.
            if get("words") > 0.0 && get("bytes") / get("words") <= 20.0 {
                m.insert(1, ("PPL".into(), metrics::perplexity(get("loss"), get("words") as usize)));
            }
            m
        }
    }
}

/// The text shown for example `i` with `shots` solved examples of the same file before it (the
/// ones after it, cyclically: deterministic and never itself).
fn with_shots(examples: &[Example], i: usize, shots: usize, kind: TaskType) -> String {
    let mut text = String::new();
    for k in 1..=shots.min(examples.len().saturating_sub(1)) {
        let e = &examples[(i + k) % examples.len()];
        let answer = match kind {
            TaskType::Mul => e.label.and_then(|l| e.choices.get(l)).cloned().unwrap_or_default(),
            _ => e.targets.first().cloned().unwrap_or_default(),
        };
        text += &format!("{}{}\n\n", e.inputs, answer);
    }
    text + &examples[i].inputs
}

/// Evaluate `task` on every file its pattern matches: one `FileScore` per file, in group order.
pub fn evaluate(model: &Glm, tok: &Tokenizer, task: &TaskConfig, opts: &EvalOptions) -> Result<Vec<FileScore>> {
    let scorer = Scorer::new(model, tok, task.max_seq_length)?;
    let groups = task.files(&opts.data_root)?;
    let mut loaded: Vec<(String, PathBuf, Vec<Example>)> = Vec::new();
    for (group, files) in groups {
        for f in files {
            let mut ex = load_file(&f, task.kind == TaskType::Lm)?;
            if let Some(n) = opts.limit {
                ex.truncate(n);
            }
            loaded.push((group.clone(), f, ex));
        }
    }
    let total: usize = loaded.iter().map(|(_, _, e)| e.len()).sum();
    let bar = progress_bar(opts.progress, total as u64, &task.name);
    let batch = opts.batch.unwrap_or(task.micro_batch_size).max(1);
    let mut out = Vec::with_capacity(loaded.len());
    for (group, file, examples) in &loaded {
        let ctx = |e: &Error| Error::Input(format!("{}: {e}", file.display()));
        let sums = match task.kind {
            TaskType::Mul => {
                score_mul(&scorer, task, examples, batch, opts.one_choice_per_row, &bar).map_err(|e| ctx(&e))?
            }
            TaskType::Gen => score_gen(&scorer, task, examples, &bar).map_err(|e| ctx(&e))?,
            TaskType::Lm => score_lm(&scorer, task, examples, batch, &bar).map_err(|e| ctx(&e))?,
        };
        out.push(FileScore {
            group: group.clone(),
            file: relative(file, &opts.data_root),
            examples: examples.len(),
            sums,
        });
    }
    bar.finish_and_clear();
    Ok(out)
}

fn relative(file: &Path, root: &Path) -> String {
    file.strip_prefix(root).unwrap_or(file).to_string_lossy().into_owned()
}

fn progress_bar(show: bool, total: u64, name: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    let style =
        indicatif::ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} examples, {per_sec}, ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(name.to_string());
    bar
}

fn score_mul(
    scorer: &Scorer,
    task: &TaskConfig,
    examples: &[Example],
    batch: usize,
    one_per_row: bool,
    bar: &indicatif::ProgressBar,
) -> Result<BTreeMap<String, f64>> {
    let mut correct = 0usize;
    for (start, chunk) in examples.chunks(batch).enumerate().map(|(k, c)| (k * batch, c)) {
        let mut items = Vec::with_capacity(chunk.len());
        for (j, e) in chunk.iter().enumerate() {
            if e.choices.is_empty() || e.label.is_none() {
                return Err(Error::Input(format!(
                    "example {}: multiple choice needs `choices_pretokenized` and `label`",
                    start + j + 1
                )));
            }
            let choices = scorer.encode_choices(&e.choices)?;
            let text = with_shots(examples, start + j, task.shots, TaskType::Mul);
            let (context, blank) = scorer.context(&text, task.use_task_mask, Scorer::choice_tokens(&choices))?;
            items.push((context, blank, choices));
        }
        let scores = if one_per_row {
            items.iter().map(|(c, b, ch)| scorer.choice_logprobs_single(c, *b, ch)).collect::<Result<Vec<_>>>()?
        } else {
            scorer.choice_logprobs(&items)?
        };
        for (e, s) in chunk.iter().zip(&scores) {
            let best =
                s.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
            correct += (Some(best) == e.label) as usize;
        }
        bar.inc(chunk.len() as u64);
    }
    Ok([("correct".to_string(), correct as f64)].into_iter().collect())
}

fn score_gen(
    scorer: &Scorer,
    task: &TaskConfig,
    examples: &[Example],
    bar: &indicatif::ProgressBar,
) -> Result<BTreeMap<String, f64>> {
    let g = Generator::new(scorer.model, scorer.tok)?;
    let beam = task.num_beams > 1 && task.sampling_strategy.as_deref() != Some("BaseStrategy");
    let (mut em, mut f1, mut first) = (0f64, 0f64, 0f64);
    for (i, e) in examples.iter().enumerate() {
        if e.targets.is_empty() {
            return Err(Error::Input(format!("example {}: generation needs `targets_pretokenized`", i + 1)));
        }
        let text = with_shots(examples, i, task.shots, TaskType::Gen);
        let (context, blank) = scorer.context(&text, task.use_task_mask, task.max_gen_length + 1)?;
        let (tokens, _) = if beam {
            let cfg = glm_infer::BeamConfig {
                num_beams: task.num_beams,
                length_penalty: task.length_penalty,
                no_repeat_ngram: task.no_repeat_ngram_size,
                min_new_tokens: task.min_gen_length,
                max_new_tokens: task.max_gen_length,
                deterministic: true,
                seed: 1234,
            };
            g.beam_block(&context, blank, &cfg)?
        } else {
            let cfg =
                SamplingConfig { min_new_tokens: task.min_gen_length, ..SamplingConfig::greedy(task.max_gen_length) };
            g.generate(&context, blank, &mut Sampler::new(&cfg)?)?
        };
        let prediction = scorer.tok.decode(&tokens)?;
        em += metrics::best_over(&prediction, &e.targets, metrics::exact_match);
        f1 += metrics::best_over(&prediction, &e.targets, metrics::f1);
        if task.first_word() {
            let p = metrics::first_word(&prediction);
            first += e.targets.iter().any(|t| metrics::first_word(t) == p && !p.is_empty()) as u8 as f64;
        }
        bar.inc(1);
    }
    let mut sums: BTreeMap<String, f64> = [("em".to_string(), em), ("f1".to_string(), f1)].into_iter().collect();
    if task.first_word() {
        sums.insert("first_word".into(), first);
    }
    Ok(sums)
}

fn score_lm(
    scorer: &Scorer,
    task: &TaskConfig,
    examples: &[Example],
    batch: usize,
    bar: &indicatif::ProgressBar,
) -> Result<BTreeMap<String, f64>> {
    let (mut loss, mut tokens, mut bytes, mut words) = (0f64, 0usize, 0usize, 0usize);
    for e in examples {
        let (l, n) = scorer.lm_loss(&e.inputs, task.generation_length, batch)?;
        loss += l;
        tokens += n;
        bytes += e.inputs.len();
        words += e.inputs.split_whitespace().count();
        bar.inc(1);
    }
    let sums = [("loss", loss), ("tokens", tokens as f64), ("bytes", bytes as f64), ("words", words as f64)];
    Ok(sums.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}
