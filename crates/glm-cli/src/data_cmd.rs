//! `glm tokenizer ...` and `glm data ...`: parse flags, call glm-tokenizer / glm-data.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use glm_data::input::{InputOptions, TextSplit};
use glm_data::{
    corpus, objective_ids, prepare, stats, Batcher, Instructions, ObjectiveConfig, PositionKind, TokenStream,
};
use glm_tokenizer::TrainOptions;

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a bilingual unigram tokenizer (byte fallback, GLM specials, icetk marks).
    Train(TrainArgs),
    /// Read UTF-8 text on stdin, print its ids on one line (one trailing newline is not encoded).
    Encode(TokArg),
    /// Read lines of space-separated ids on stdin, print each line's text.
    Decode(TokArg),
}

#[derive(Args)]
pub struct TokArg {
    /// tokenizer.json (from `glm tokenizer train`) or a SentencePiece .model; default: the embedded one.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Copy, Clone, ValueEnum)]
enum SplitArg {
    File,
    Paragraph,
    Line,
}

#[derive(Args)]
struct InputArgs {
    /// Text files, JSONL files (.jsonl/.json, optionally .gz), directories or glob patterns.
    #[arg(long, num_args = 1..)]
    input: Vec<String>,
    /// JSON field with the text in JSONL records.
    #[arg(long, default_value = "text")]
    field: String,
    /// How plain-text files are cut into documents.
    #[arg(long, value_enum, default_value = "file")]
    split: SplitArg,
    /// Skip (and count) undecodable files and malformed lines instead of stopping.
    #[arg(long)]
    skip_bad: bool,
}

impl InputArgs {
    fn options(&self) -> InputOptions {
        let split = match self.split {
            SplitArg::File => TextSplit::File,
            SplitArg::Paragraph => TextSplit::Paragraph,
            SplitArg::Line => TextSplit::Line,
        };
        InputOptions { field: self.field.clone(), split, skip_bad: self.skip_bad }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Total ids, 64 reserved at the top for the specials (8192 = the `tiny` preset).
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Share of character occurrences given their own piece; rarer characters use byte fallback.
    #[arg(long, default_value_t = 0.9995)]
    character_coverage: f64,
    #[arg(long, default_value_t = 16)]
    max_piece_length: usize,
    #[arg(long, default_value = "tokenizer.json")]
    out: PathBuf,
}

/// The tokenizer named by `--tokenizer`, or the embedded default, with its content hash.
fn stdin_text() -> Result<String> {
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf).context("reading stdin")?;
    String::from_utf8(buf)
        .map_err(|e| anyhow::anyhow!("stdin is not UTF-8 (invalid byte at offset {})", e.utf8_error().valid_up_to()))
}

pub fn run_tokenizer(cmd: TokenizerCmd) -> Result<()> {
    match cmd {
        TokenizerCmd::Train(a) => {
            let docs: Vec<String> = if a.input.input.is_empty() {
                eprintln!("no --input: training on the embedded corpus (train split)");
                corpus::documents(corpus::Split::Train)?.into_iter().map(|d| d.text).collect()
            } else {
                let files = glm_data::input::expand(&a.input.input)?;
                let mut skipped = Default::default();
                let docs = glm_data::input::read_all(&files, &a.input.options(), &mut skipped)?;
                if skipped.files + skipped.lines > 0 {
                    eprintln!("skipped {} files and {} lines: {:?}", skipped.files, skipped.lines, skipped.messages);
                }
                docs
            };
            if docs.is_empty() {
                bail!("no training text");
            }
            let t0 = std::time::Instant::now();
            let opts = TrainOptions {
                vocab_size: a.vocab_size,
                max_piece_length: a.max_piece_length,
                character_coverage: a.character_coverage,
                show_progress: true,
            };
            let (tok, report) = glm_tokenizer::train(&docs, &opts)?;
            tok.save(&a.out)?;
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "{}: {} ids ({} learned pieces), {} documents, {:.1} MB in {secs:.1} s ({:.2} MB/s); {} characters kept (coverage {:.4}), {} left to byte fallback",
                a.out.display(),
                tok.vocab_size(),
                report.learned_pieces,
                docs.len(),
                report.input_bytes as f64 / 1e6,
                report.input_bytes as f64 / 1e6 / secs,
                report.characters_kept,
                report.effective_coverage,
                report.characters_dropped
            );
        }
        TokenizerCmd::Encode(a) => {
            let (tok, _) = glm_data::load_tokenizer(a.tokenizer.as_deref())?;
            let text = stdin_text()?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            let ids = tok.encode(text);
            let line: Vec<String> = ids.iter().map(u32::to_string).collect();
            println!("{}", line.join(" "));
        }
        TokenizerCmd::Decode(a) => {
            let (tok, _) = glm_data::load_tokenizer(a.tokenizer.as_deref())?;
            let text = stdin_text()?;
            let mut out = std::io::stdout().lock();
            for (n, line) in text.lines().enumerate() {
                let ids = line
                    .split_whitespace()
                    .map(|w| {
                        w.parse::<u32>().map_err(|_| anyhow::anyhow!("stdin line {}: {w:?} is not a token id", n + 1))
                    })
                    .collect::<Result<Vec<u32>>>()?;
                let s = tok.decode(&ids).with_context(|| format!("stdin line {}", n + 1))?;
                writeln!(out, "{s}")?;
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Tokenize text / JSONL files into shuffled, versioned shards.
    Prepare(PrepareArgs),
    /// Sample training rows and print measured objective statistics as one JSON object.
    Stats(StatsArgs),
}

#[derive(Args)]
pub struct PrepareArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Output directory (shards + manifest.json).
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Seed of the document shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
pub struct StatsArgs {
    /// TOML with the objective settings (top level, [objective] or [data.objective]).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A prepared directory or shard (default: the embedded corpus).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Instruction JSONL with "prompt" and "target" (default: the bundled set).
    #[arg(long)]
    instructions: Option<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Override the row length.
    #[arg(long)]
    seq_len: Option<usize>,
}

/// Reads an objective config from TOML: the whole file, or its [objective] / [data.objective] table.
pub fn objective_config(path: &Path) -> Result<ObjectiveConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: toml::Table = toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
    let table = v
        .get("objective")
        .or_else(|| v.get("data").and_then(|d| d.get("objective")))
        .cloned()
        .unwrap_or(toml::Value::Table(v));
    let cfg: ObjectiveConfig = table.try_into().with_context(|| format!("{}: objective settings", path.display()))?;
    cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

pub fn run_data(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Prepare(a) => {
            if a.input.input.is_empty() {
                bail!("give --input files, directories or globs");
            }
            let (tok, hash) = glm_data::load_tokenizer(a.tokenizer.as_deref())?;
            let opts = prepare::PrepareOptions {
                inputs: a.input.input.clone(),
                out: a.out.clone(),
                input: a.input.options(),
                shards: a.shards,
                seed: a.seed,
                progress: true,
            };
            let r = prepare::prepare(&tok, &hash, &opts)?;
            eprintln!(
                "{}: {} files, {} documents, {} tokens in {} shards; {:.1} MB in {:.1} s ({:.0} tokens/s)",
                a.out.display(),
                r.files,
                r.documents,
                r.tokens,
                r.shards.len(),
                r.bytes as f64 / 1e6,
                r.seconds,
                r.tokens as f64 / r.seconds
            );
            if r.skipped.files + r.skipped.lines > 0 {
                eprintln!(
                    "skipped {} files and {} lines, e.g. {:?}",
                    r.skipped.files, r.skipped.lines, r.skipped.messages
                );
            }
            println!("{}", serde_json::to_string(&r)?);
        }
        DataCmd::Stats(a) => {
            let mut cfg = match &a.config {
                Some(p) => objective_config(p)?,
                None => ObjectiveConfig::default(),
            };
            if let Some(n) = a.seq_len {
                cfg.seq_len = n;
            }
            let (tok, hash) = glm_data::load_tokenizer(a.tokenizer.as_deref())?;
            let shards = glm_data::train_shards(&tok, &hash, a.data.as_deref())?;
            let records = glm_data::instruction_records(a.instructions.as_deref())?;
            let ins = Instructions::from_records(&tok, &records, a.seed)?;
            let stream = TokenStream::new(shards, glm_data::eod_id(&tok)?, a.seed, 0, 1)?;
            let positions = cfg.positions;
            let mut b = Batcher::new(cfg, objective_ids(&tok)?, stream, Some(ins), a.seed, 0)?;
            let s = stats::measure(&mut b, a.samples);
            let mut v = serde_json::to_value(&s)?;
            v["positions"] = serde_json::json!(if positions == PositionKind::OneD { "1d" } else { "2d" });
            v["seed"] = serde_json::json!(a.seed);
            println!("{v}");
        }
    }
    Ok(())
}
