//! `glm`: the command line. Each subcommand parses its flags, builds a config and calls a library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use glm_model::{param_count, weight_bytes, Config, PRESETS};

mod convert_cmd;
mod data_cmd;
mod dist_cmd;
mod eval_cmd;
mod infer_cmd;
mod samples;
mod serve_cmd;
mod serve_tp;
mod tp_launch;
mod train_cmd;

// Tensor buffers are large and short-lived: mimalloc, told to keep freed memory
// (`glm_bench::keep_freed_memory`), reuses them instead of faulting fresh zeroed pages in.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "glm", version, about = "GLM-130B in Rust: model, training, quantized inference, evaluation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a model's config, exact parameter count and weight memory (fp32/fp16/int8/int4).
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a preset's config as JSON (to edit and pass back with --config).
    Config {
        #[command(flatten)]
        model: ModelArgs,
        /// Output file (stdout when absent).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Train, inspect and use tokenizers.
    #[command(subcommand)]
    Tokenizer(data_cmd::TokenizerCmd),
    /// Prepare training data and inspect the pretraining objective.
    #[command(subcommand)]
    Data(data_cmd::DataCmd),
    /// Pretrain with the GLM-130B recipe (default: `tiny` on the embedded corpus). Split over
    /// tensor- and data-parallel ranks with `--tp/--dp` under `mpirun`, or `--ranks local`.
    Train(train_cmd::TrainArgs),
    /// Rewrite a training checkpoint at another tensor-parallel degree (1: one file), bit for bit.
    Reshard(dist_cmd::ReshardArgs),
    /// Convert released checkpoints: GLM-130B SAT folders (any TP, fp16/INT8/INT4) and ChatGLM-6B
    /// Hugging Face folders to our safetensors, or any model to a SAT folder at any TP; `--check` a
    /// download without loading it.
    Convert(convert_cmd::ConvertArgs),
    /// Quantize a checkpoint's block linears to INT8 or INT4 (GLM-130B's format).
    Quantize(infer_cmd::QuantizeArgs),
    /// Continue a prompt ([gMASK] ... <sop>) with a checkpoint (dense or quantized).
    Generate(infer_cmd::GenArgs),
    /// Fill the [MASK] blanks of a text, left to right.
    Fill(infer_cmd::GenArgs),
    /// Chat: a question per line on stdin, answers streamed.
    Chat(infer_cmd::ChatArgs),
    /// Serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat, infill; streaming;
    /// continuous batching) with a web playground at `/`.
    Serve(serve_cmd::ServeArgs),
    /// Evaluate on GLM-130B-style YAML tasks (multiple choice, generation, language modelling),
    /// or compare two reports.
    Eval(eval_cmd::EvalArgs),
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A named preset.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PRESETS), conflicts_with = "config")]
    pub preset: Option<String>,
    /// A config JSON file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl ModelArgs {
    pub fn resolve(&self) -> Result<Config> {
        match (&self.preset, &self.config) {
            (_, Some(p)) => Ok(Config::load(p)?),
            (Some(name), None) => Ok(Config::preset(name)?),
            (None, None) => Ok(Config::preset("tiny")?),
        }
    }
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Forward, forward+backward and batch-1 decode tokens/s on CPU, beside PyTorch eager and the
    /// sgemm peak.
    Forward(ForwardArgs),
    /// Tokenizer training/encoding MB/s beside Python sentencepiece and tokenizers, and the data
    /// loader's tokens/s.
    Data(DataArgs),
    /// Training tokens/s and model TFLOP/s of full optimizer steps on CPU, beside PyTorch eager and
    /// the sgemm peak.
    Train(glm_bench::train::TrainBenchArgs),
    /// Batch-1 prefill and decode tokens/s for f32, INT8 and INT4 beside the memory-bandwidth floor,
    /// with each one's peak RSS.
    Decode(infer_cmd::DecodeBenchArgs),
    /// `glm convert` merging and splitting a 1-2 GB SAT checkpoint beside GLM-130B's convert_tp.py
    /// (PyTorch): wall time, MB/s, peak RSS; and `glm serve --model <SAT folder>` to first token.
    Convert(convert_cmd::ConvertBenchArgs),
    /// `glm serve` under 1, 2, 4, 8 concurrent streaming clients: aggregate tokens/s and time to
    /// first token, beside the same server decoding one request at a time.
    Serve(serve_cmd::ServeBenchArgs),
    /// A tensor/data-parallel training step: bytes moved per collective against the analytic
    /// formula, time in communication vs compute beside the 1-rank step, ZeRO-1's optimizer memory.
    Dist(dist_cmd::DistBenchArgs),
    /// The 1F1B pipeline's bubble, held activations and bytes between stages, measured on the
    /// pipelined training step against the schedule's formulas.
    Pipeline(glm_bench::pipeline::PipelineBenchOpts),
}

#[derive(Args)]
struct DataArgs {
    /// MB of the embedded train split to train tokenizers on.
    #[arg(long, default_value_t = 4.0)]
    train_mb: f64,
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Rows sampled by the loader benchmark.
    #[arg(long, default_value_t = 2000)]
    rows: usize,
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Python with sentencepiece and tokenizers for the baselines (env GLM_TOKENIZER_PYTHON).
    #[arg(long, env = "GLM_TOKENIZER_PYTHON", default_value = "python3")]
    python: String,
    /// Skip the Python baselines.
    #[arg(long)]
    no_python: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct ForwardArgs {
    /// Comma-separated presets.
    #[arg(long, default_value = "tiny,small", value_delimiter = ',')]
    presets: Vec<String>,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Batch-1 decode: prompt length (prefilled) ...
    #[arg(long, default_value_t = 32)]
    decode_prompt: usize,
    /// ... and the number of timed single-token steps.
    #[arg(long, default_value_t = 64)]
    decode_new: usize,
    /// Python interpreter with torch for the baseline (env GLM_TORCH_PYTHON; default python3).
    #[arg(long, env = "GLM_TORCH_PYTHON", default_value = "python3")]
    torch_python: String,
    /// Skip the PyTorch baseline.
    #[arg(long)]
    no_torch: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl ForwardArgs {
    fn run(self) -> Result<()> {
        let opts = glm_bench::ForwardBench {
            presets: self.presets,
            batch: self.batch,
            seq: self.seq,
            iters: self.iters,
            decode_prompt: self.decode_prompt,
            decode_new: self.decode_new,
            torch_python: if self.no_torch { None } else { Some(self.torch_python) },
        };
        let report = glm_bench::forward(&opts)?;
        println!("{}", glm_bench::render(&report));
        if let Some(p) = self.json {
            std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }
}

fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB ({:.1} GB)", b / (1u64 << 30) as f64, b / 1e9)
    } else {
        format!("{:.2} MiB ({:.1} MB)", b / (1u64 << 20) as f64, b / 1e6)
    }
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n => format!("{:.1}K", n as f64 / 1e3),
    }
}

fn main() -> Result<()> {
    glm_bench::keep_freed_memory();
    glm_nn::blas::configure_env();
    match Cli::parse().cmd {
        Cmd::Info { model, json } => {
            let cfg = model.resolve()?;
            let (params, bytes) = (param_count(&cfg), weight_bytes(&cfg));
            if json {
                let v = serde_json::json!({
                    "name": cfg.name, "params": params, "weight_bytes": bytes, "config": cfg,
                    "head_dim": cfg.head_dim(), "deepnorm_alpha": cfg.deepnorm_alpha(),
                });
                println!("{v}");
            } else {
                println!(
                    "{}: {} layers, hidden {}, {} heads x {}, ffn {} ({:?}), vocab {}, {:?}, head {}",
                    cfg.name,
                    cfg.num_layers,
                    cfg.hidden_size,
                    cfg.num_heads,
                    cfg.head_dim(),
                    cfg.ffn_hidden_size,
                    cfg.ffn,
                    cfg.vocab_size,
                    cfg.position_encoding,
                    if cfg.tie_word_embeddings { "tied" } else { "untied" }
                );
                println!("parameters: {params} ({})", human_count(params));
                println!(
                    "DeepNorm alpha = sqrt(2L) = {:.4}, init beta = {:.4}",
                    cfg.deepnorm_alpha(),
                    cfg.deepnorm_beta()
                );
                println!("weights fp32: {}", human_bytes(bytes.fp32));
                println!("weights fp16: {}", human_bytes(bytes.fp16));
                println!(
                    "weights int8: {}  (block linears int8 + fp16 row scales; rest fp16)",
                    human_bytes(bytes.int8)
                );
                println!(
                    "weights int4: {}  (block linears int4 + fp16 row scales; rest fp16)",
                    human_bytes(bytes.int4)
                );
            }
        }
        Cmd::Config { model, out } => {
            let cfg = model.resolve()?;
            match out {
                Some(p) => cfg.save(&p)?,
                None => println!("{}", cfg.to_json()),
            }
        }
        Cmd::Bench(BenchCmd::Forward(args)) => args.run()?,
        Cmd::Bench(BenchCmd::Data(a)) => {
            let opts = glm_bench::data::DataBench {
                train_mb: a.train_mb,
                vocab_size: a.vocab_size,
                rows: a.rows,
                seq_len: a.seq_len,
                python: (!a.no_python).then_some(a.python),
            };
            let report = glm_bench::data::data(&opts)?;
            println!("{}", glm_bench::data::render(&report));
            if let Some(p) = a.json {
                std::fs::write(&p, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
        }
        Cmd::Bench(BenchCmd::Train(a)) => a.run()?,
        Cmd::Bench(BenchCmd::Decode(a)) => infer_cmd::bench_decode(a)?,
        Cmd::Bench(BenchCmd::Serve(a)) => serve_cmd::bench_serve(a)?,
        Cmd::Bench(BenchCmd::Convert(a)) => convert_cmd::bench_convert(a)?,
        Cmd::Bench(BenchCmd::Dist(a)) => dist_cmd::bench(a)?,
        Cmd::Bench(BenchCmd::Pipeline(a)) => {
            let report = glm_bench::pipeline::run(&a)?;
            println!("{}", glm_bench::pipeline::render(&report));
            if let Some(p) = &a.json {
                std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
            }
        }
        Cmd::Tokenizer(c) => data_cmd::run_tokenizer(c)?,
        Cmd::Data(c) => data_cmd::run_data(c)?,
        Cmd::Train(a) => train_cmd::run(a)?,
        Cmd::Reshard(a) => dist_cmd::reshard(a)?,
        Cmd::Convert(a) => convert_cmd::convert(a)?,
        Cmd::Quantize(a) => infer_cmd::quantize(a)?,
        Cmd::Generate(a) => infer_cmd::generate(a, false)?,
        Cmd::Fill(a) => infer_cmd::generate(a, true)?,
        Cmd::Chat(a) => infer_cmd::chat(a)?,
        Cmd::Serve(a) => serve_cmd::serve(a)?,
        Cmd::Eval(a) => eval_cmd::eval(a)?,
    }
    Ok(())
}
