//! `glm serve` (the OpenAI-compatible server) and `glm bench serve` (its throughput and latency
//! under concurrent streams).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use glm_model::Glm;
use glm_server::loadgen::{LoadOptions, LoadReport};
use glm_server::Options;
use glm_tokenizer::Tokenizer;

use crate::infer_cmd::ModelSource;
use crate::ModelArgs;

/// Limits and batching, shared by `serve` and `bench serve`.
#[derive(Args, Clone)]
pub struct ServerLimits {
    /// Most requests decoding together (continuous batching).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// KV cache the running requests may reserve, MiB.
    #[arg(long, default_value_t = 1024)]
    kv_cache_mb: u64,
    /// Requests that may wait for a place; beyond, 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Largest request body, KiB.
    #[arg(long, default_value_t = 1024)]
    max_body_kb: usize,
    /// Longest prompt in tokens (default: the model's max_seq_len).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Most max_tokens a request may ask (per blank for infill).
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Time limit per request, from arrival to the last token, seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout_s: f64,
    /// Prefill work per engine step, in tokens: a longer prompt is prefilled a few layers per step
    /// while the running requests keep decoding (0: each prompt whole, stalling them meanwhile).
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
}

impl ServerLimits {
    pub(crate) fn options(&self, name: String, model: &Glm, api_key: Option<String>) -> Result<Options> {
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            bail!("--timeout-s must be > 0, got {}", self.timeout_s);
        }
        let max_seq = model.config().max_seq_len;
        let opts = Options {
            api_key,
            max_batch: self.max_batch,
            kv_budget_bytes: self.kv_cache_mb << 20,
            queue: self.queue,
            max_body_bytes: self.max_body_kb << 10,
            max_prompt_tokens: self.max_prompt_tokens.unwrap_or(max_seq),
            max_tokens: self.max_tokens,
            request_timeout: Duration::from_secs_f64(self.timeout_s),
            prefill_chunk: self.prefill_chunk,
            ..Options::new(name, max_seq)
        };
        opts.validate()?;
        Ok(opts)
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    source: ModelSource,
    /// Address to bind; 127.0.0.1 keeps the server local (use 0.0.0.0 to expose it).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <key>` on /v1/* (env GLM_API_KEY).
    #[arg(long, env = "GLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model id clients use (default: the config's name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[command(flatten)]
    limits: ServerLimits,
    #[command(flatten)]
    dist: crate::tp_launch::TpArgs,
    /// Under tensor parallelism: seconds the server keeps answering 503 after its ranks are gone,
    /// before it exits.
    #[arg(long, default_value_t = 10)]
    ranks_down_grace: u64,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting tokio")
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.dist.tp > 1 {
        return a.dist.run("serve", |rank| serve_rank(&a, rank));
    }
    let (model, tok) = a.source.load()?;
    let name = a.served_model_name.clone().unwrap_or_else(|| model.config().name.clone());
    let opts = a.limits.options(name.clone(), &model, a.api_key.clone())?;
    let rt = runtime()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "glm serve: `{name}` from {} (batch {}, KV cache {} MiB, queue {}{}) listening on http://{local}",
            a.source.model.display(),
            opts.max_batch,
            opts.kv_budget_bytes >> 20,
            opts.queue,
            if opts.api_key.is_some() { ", API key required" } else { "" }
        );
        glm_server::serve(Arc::new(model), Arc::new(tok), opts, listener, shutdown_signal()).await?;
        eprintln!("glm serve: stopped");
        Ok(())
    })
}

#[cfg(unix)]
fn ignore_stop_signals() {
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
}

#[cfg(not(unix))]
fn ignore_stop_signals() {}

/// One rank of `glm serve --tp N`: every rank loads its slices of the model; rank 0 serves HTTP
/// and drives the batching engine (every model call broadcast to the others), the others follow.
fn serve_rank(a: &ServeArgs, rank: crate::tp_launch::Rank) -> Result<()> {
    let group = rank.group.context("tensor-parallel serving without a rank group")?;
    let (model, tok) = a.source.load_on(Some(group))?;
    if group.rank() != 0 {
        // Ctrl-C / SIGTERM reach every rank under mpirun: a follower keeps following until rank 0,
        // which shuts down cleanly, tells it to stop (a dead rank 0 ends it by --dist-timeout).
        ignore_stop_signals();
        return group
            .with(|c| glm_infer::mirror::Follower::new(&model).run(c).map_err(|e| glm_dist::Error::Comm(e.to_string())))
            .map_err(anyhow::Error::from);
    }
    let name = a.served_model_name.clone().unwrap_or_else(|| model.config().name.clone());
    let opts = a.limits.options(name.clone(), &model, a.api_key.clone())?;
    let addr = format!("{}:{}", a.host, a.port);
    let listener = std::net::TcpListener::bind(&addr).with_context(|| format!("binding {addr}"))?;
    eprintln!(
        "glm serve: `{name}` from {}, tensor-parallel over {} ranks (batch {}, KV cache {} MiB, queue {}{}) \
         listening on http://{}",
        a.source.model.display(),
        group.size(),
        opts.max_batch,
        opts.kv_budget_bytes >> 20,
        opts.queue,
        if opts.api_key.is_some() { ", API key required" } else { "" },
        listener.local_addr()?
    );
    let grace = std::time::Duration::from_secs(a.ranks_down_grace);
    let ping = std::time::Duration::from_secs(1);
    group
        .with(|c| {
            let mirror = glm_infer::mirror::CommMirror::new(c);
            glm_server::serve_driver(&model, Arc::new(tok), opts, listener, shutdown_signal(), &mirror, ping, grace)
                .map_err(|e| glm_dist::Error::Comm(e.to_string()))
        })
        .map_err(anyhow::Error::from)?;
    eprintln!("glm serve: stopped");
    Ok(())
}

#[derive(Args, Clone)]
pub struct ServeBenchArgs {
    /// A checkpoint (as for `glm serve`); without it, a seeded random `--preset` model.
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) arch: ModelArgs,
    /// Comma-separated: f32, int8, int4 (int8/int4 quantize a dense model at load).
    #[arg(long, default_value = "f32,int4", value_delimiter = ',')]
    pub(crate) precisions: Vec<String>,
    /// Comma-separated numbers of concurrent streaming clients.
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    pub(crate) streams: Vec<usize>,
    /// Seconds each level runs (requests running at the end are waited for).
    #[arg(long, default_value_t = 20.0)]
    pub(crate) seconds: f64,
    /// Tokens each request generates (min_tokens = max_tokens).
    #[arg(long, default_value_t = 64)]
    pub(crate) tokens: usize,
    /// Skip the baseline: the same server with --max-batch 1 (requests one after another).
    #[arg(long)]
    pub(crate) no_baseline: bool,
    /// Instead of the levels: the most streams of --streams decode while one more client sends
    /// prompts of this many tokens back to back; reports the streams' gaps between tokens and the
    /// long prompts' time to first token, with --prefill-chunk and with whole prefills (chunk 0).
    #[arg(long, default_value_t = 0)]
    pub(crate) long_prompt_tokens: usize,
    /// JSON lines instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) limits: ServerLimits,
    /// Instead: the tensor-parallel server over this many ranks (threads of this process, rank 0
    /// driving) beside the one-process server, one compute thread per rank in both.
    #[arg(long, default_value_t = 1)]
    pub(crate) tp: usize,
}

pub(crate) const PROMPTS: [&str; 4] = [
    "The history of the printing press begins",
    "In a small village by the sea, there lived",
    "机器学习是人工智能的一个分支，",
    "To make a good cup of tea, first",
];

/// What one load level measured: the streams, the long-prompt client if there was one, and the
/// process's memory after it.
pub(crate) struct Level {
    pub(crate) streams: LoadReport,
    long: Option<LoadReport>,
    rss: u64,
}

/// Starts a server on a free local port, runs the load levels against it, stops it. With `long`,
/// one more client sends that prompt back to back during each level (4 tokens each).
pub(crate) fn measure(
    rt: &tokio::runtime::Runtime,
    model: Arc<Glm>,
    tok: Arc<Tokenizer>,
    opts: Options,
    levels: &[usize],
    a: &ServeBenchArgs,
    long: Option<&str>,
) -> Result<Vec<Level>> {
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let name = opts.model_name.clone();
        let server = tokio::spawn(glm_server::serve(model, tok, opts, listener, async {
            let _ = stop_rx.await;
        }));
        let mut out = Vec::new();
        for &streams in levels {
            let o = LoadOptions {
                base: base.clone(),
                api_key: None,
                model: name.clone(),
                streams,
                duration: Duration::from_secs_f64(a.seconds),
                max_tokens: a.tokens,
                prompts: PROMPTS.iter().map(|s| s.to_string()).collect(),
            };
            let side =
                long.map(|p| LoadOptions { streams: 1, max_tokens: 4, prompts: vec![p.to_string()], ..o.clone() });
            let (r, long) = match &side {
                Some(side) => {
                    let (r, l) = tokio::join!(glm_server::loadgen::run(&o), glm_server::loadgen::run(side));
                    (r, Some(l))
                }
                None => (glm_server::loadgen::run(&o).await, None),
            };
            for r in std::iter::once(&r).chain(&long) {
                if r.errors > 0 {
                    bail!("{} of {} requests failed at {streams} streams: {:?}", r.errors, r.requests, r.first_error);
                }
            }
            out.push(Level { streams: r, long, rss: crate::infer_cmd::proc_status_bytes("VmRSS:") });
        }
        let _ = stop_tx.send(());
        server.await.context("server task")??;
        Ok(out)
    })
}

/// The benchmark's model at `precision` (`infer_cmd::bench_model`) and the default tokenizer.
fn bench_setup(a: &ServeBenchArgs, precision: &str) -> Result<(glm_model::Config, Arc<Glm>, Arc<Tokenizer>)> {
    let bits = crate::infer_cmd::precision_bits(precision)?;
    let (cfg, model) = crate::infer_cmd::bench_model(a.model.as_deref(), &a.arch, bits)?;
    let (tok, _) = glm_data::load_tokenizer(None)?;
    Ok((cfg, Arc::new(model), Arc::new(tok)))
}

pub fn bench_serve(a: ServeBenchArgs) -> Result<()> {
    if a.tp > 1 {
        return crate::serve_tp::bench(&a, a.tp);
    }
    if a.long_prompt_tokens > 0 {
        return bench_long_prompts(a);
    }
    let rt = runtime()?;
    let mut rows = Vec::new();
    // Memory after each level (the process: server and clients): it should not grow with load.
    for precision in &a.precisions {
        let (cfg, model, tok) = bench_setup(&a, precision)?;
        let name = cfg.name.clone();
        let opts = a.limits.options(name.clone(), &model, None)?;
        let batched = measure(&rt, model.clone(), tok.clone(), opts.clone(), &a.streams, &a, None)?;
        for l in batched {
            rows.push((name.clone(), precision.clone(), format!("batch {}", opts.max_batch), l.streams, l.rss));
        }
        if !a.no_baseline {
            let top = a.streams.iter().copied().max().unwrap_or(1);
            let one = Options { max_batch: 1, ..opts.clone() };
            for l in measure(&rt, model.clone(), tok.clone(), one, &[top], &a, None)? {
                rows.push((name.clone(), precision.clone(), "batch 1 (baseline)".to_string(), l.streams, l.rss));
            }
        }
    }
    if a.json {
        for (model, precision, server, r, rss) in &rows {
            let v = serde_json::json!({
                "model": model, "precision": precision, "server": server, "streams": r.streams, "rss_bytes": rss,
                "requests": r.requests, "errors": r.errors, "tokens": r.tokens, "seconds": r.seconds,
                "tokens_per_s": r.tokens_per_s(), "ttft_p50_s": r.ttft_quantile(0.5), "ttft_p90_s": r.ttft_quantile(0.9),
            });
            println!("{v}");
        }
        return Ok(());
    }
    println!(
        "| model | precision | server | streams | requests | tokens/s (aggregate) | TTFT p50 | TTFT p90 | RSS after |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    for (model, precision, server, r, rss) in &rows {
        println!(
            "| {model} | {precision} | {server} | {} | {} | {:.1} | {:.0} ms | {:.0} ms | {} MiB |",
            r.streams,
            r.requests,
            r.tokens_per_s(),
            r.ttft_quantile(0.5) * 1e3,
            r.ttft_quantile(0.9) * 1e3,
            rss >> 20
        );
    }
    Ok(())
}

/// A prompt of exactly `n` tokens (a text repeated, its tokens cut at n and decoded).
fn prompt_of(tok: &Tokenizer, n: usize) -> Result<String> {
    let text = PROMPTS.join(" ");
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(tok.encode(&text));
    }
    ids.truncate(n);
    let prompt = tok.decode(&ids)?;
    let got = tok.encode(&prompt).len();
    if got.abs_diff(n) > n / 20 + 2 {
        bail!("a prompt of {n} tokens came back as {got}");
    }
    Ok(prompt)
}

/// The streams' gaps between tokens while long prompts keep arriving, with --prefill-chunk and
/// with whole prefills (chunk 0) in the same run.
fn bench_long_prompts(a: ServeBenchArgs) -> Result<()> {
    let rt = runtime()?;
    let streams = a.streams.iter().copied().max().unwrap_or(1);
    let chunks = if a.limits.prefill_chunk == 0 { vec![0] } else { vec![a.limits.prefill_chunk, 0] };
    println!(
        "| model | precision | prefill chunk | streams | tokens/s (streams) | gap p50 | gap p99 | gap max | long prompts ({} tokens) | their TTFT p50 |",
        a.long_prompt_tokens
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for precision in &a.precisions {
        let (cfg, model, tok) = bench_setup(&a, precision)?;
        let long = prompt_of(&tok, a.long_prompt_tokens)?;
        for &chunk in &chunks {
            let opts = Options { prefill_chunk: chunk, ..a.limits.options(cfg.name.clone(), &model, None)? };
            for l in measure(&rt, model.clone(), tok.clone(), opts, &[streams], &a, Some(&long))? {
                let (r, lp) = (&l.streams, l.long.unwrap_or_default());
                println!(
                    "| {} | {precision} | {} | {streams} | {:.1} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {:.0} ms |",
                    cfg.name,
                    if chunk == 0 { "0 (whole)".to_string() } else { chunk.to_string() },
                    r.tokens_per_s(),
                    r.itl_quantile(0.5) * 1e3,
                    r.itl_quantile(0.99) * 1e3,
                    r.itl_quantile(1.0) * 1e3,
                    lp.requests,
                    lp.ttft_quantile(0.5) * 1e3,
                );
            }
        }
    }
    Ok(())
}
