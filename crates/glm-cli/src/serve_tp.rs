//! `glm bench serve --tp N`: the tensor-parallel server beside the one-rank server in the same
//! run, on the same model file and the same code (`glm_server::serve_driver`, the engine on its
//! rank's thread with a 1-thread compute pool, rank 0's HTTP on its own thread; with one rank the
//! mirror has no follower). For each precision and
//! stream count it reports aggregate tokens/s, time to first token and, for the TP server, the
//! share of rank 0's wall time spent inside collectives (its communicator metered).

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use glm_dist::meter::{Metered, Stats};
use glm_dist::{Communicator, Group, LocalComm};
use glm_server::loadgen::{LoadOptions, LoadReport};

use crate::infer_cmd::ModelSource;
use crate::serve_cmd::{ServeBenchArgs, PROMPTS};

/// One measured level: (server, streams, load, share of rank 0's time in collectives).
type Row = (String, usize, LoadReport, Option<f64>);

fn load(base: &str, name: &str, streams: usize, a: &ServeBenchArgs) -> LoadOptions {
    LoadOptions {
        base: base.to_string(),
        api_key: None,
        model: name.to_string(),
        streams,
        duration: Duration::from_secs_f64(a.seconds),
        max_tokens: a.tokens,
        prompts: PROMPTS.iter().map(|s| s.to_string()).collect(),
    }
}

/// The model files of the benchmark: `--model`, or a seeded random `--preset` model written as
/// f32 and quantized for `int8`/`int4`.
fn files(a: &ServeBenchArgs, dir: &std::path::Path) -> Result<Vec<(String, std::path::PathBuf)>> {
    if let Some(m) = &a.model {
        return Ok(vec![("file".into(), m.clone())]);
    }
    let cfg = a.arch.resolve()?;
    let w = glm_model::init_weights(&cfg, 1, &candle_core::Device::Cpu)?;
    let dense = dir.join("f32.safetensors");
    glm_model::save_weights(&cfg, &dense, &w)?;
    let mut out = Vec::new();
    for p in &a.precisions {
        match crate::infer_cmd::precision_bits(p)? {
            None => out.push((p.clone(), dense.clone())),
            Some(bits) => {
                let f = dir.join(format!("{p}.safetensors"));
                let get = |n: &str| w.get(n).cloned().ok_or_else(|| format!("no tensor {n}"));
                glm_quant::quantize_tensors(&cfg, get, bits, &f)?;
                out.push((p.clone(), f));
            }
        }
    }
    Ok(out)
}

pub fn bench(a: &ServeBenchArgs, tp: usize) -> Result<()> {
    std::env::set_var("OPENBLAS_NUM_THREADS", "1");
    let dir = std::env::temp_dir().join(format!("glm-bench-serve-tp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run(a, tp, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(a: &ServeBenchArgs, tp: usize, dir: &std::path::Path) -> Result<()> {
    let mut rows: Vec<(String, Row)> = Vec::new();
    for (precision, path) in files(a, dir)? {
        let source = ModelSource { model: path, arch: a.arch.clone(), tokenizer: None };
        let (name, opts) = {
            let (model, _) = source.load()?;
            let name = model.config().name.clone();
            (name.clone(), a.limits.options(name, &model, None)?)
        };
        // The same server code on 1 rank and on tp: the engine on its rank's thread either way.
        for ranks in [1, tp] {
            eprintln!("bench serve: {precision}, {ranks} rank(s) ...");
            let out: Mutex<Vec<Row>> = Mutex::new(Vec::new());
            LocalComm::run(ranks, Duration::from_secs(600), |world: Rc<dyn Communicator>| {
                let err = |e: String| glm_dist::Error::Comm(e);
                let _pool = glm_bench::dist::rank_pool(1).map_err(|e| err(e.to_string()))?;
                let stats = Stats::shared();
                let metered: Rc<dyn Communicator> = Rc::new(Metered::with_stats(world, Rc::clone(&stats), "tp"));
                let group = Group::register(Rc::clone(&metered));
                let (model, tok) = source.load_on(Some(group)).map_err(|e| err(format!("{e:#}")))?;
                if metered.rank() != 0 {
                    return glm_infer::mirror::Follower::new(&model)
                        .run(metered.as_ref())
                        .map_err(|e| err(e.to_string()));
                }
                let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| err(e.to_string()))?;
                let base = format!("http://{}", listener.local_addr().map_err(|e| err(e.to_string()))?);
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let clock = Arc::new(Mutex::new(Vec::<(usize, Instant, Instant, LoadReport)>::new()));
                let (levels, name2, clock2) = (a.streams.clone(), name.clone(), Arc::clone(&clock));
                let a2 = ServeBenchArgs { ..a.clone() };
                let client = std::thread::spawn(move || -> Result<()> {
                    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
                    for streams in levels {
                        let t0 = Instant::now();
                        let r = rt.block_on(glm_server::loadgen::run(&load(&base, &name2, streams, &a2)));
                        clock2.lock().map_err(|_| anyhow!("lock"))?.push((streams, t0, Instant::now(), r));
                    }
                    let _ = stop_tx.send(());
                    Ok(())
                });
                let mirror = glm_infer::mirror::CommMirror::new(metered.as_ref());
                let shutdown = async move {
                    let _ = stop_rx.await;
                };
                let served = glm_server::serve_driver(
                    &model,
                    Arc::new(tok),
                    opts.clone(),
                    listener,
                    shutdown,
                    &mirror,
                    Duration::from_secs(1),
                    Duration::from_secs(1),
                );
                let client = client.join().map_err(|_| err("the load client panicked".into()))?;
                served.map_err(|e| err(e.to_string()))?;
                client.map_err(|e| err(format!("{e:#}")))?;
                let stats = stats.borrow();
                let mut mine = Vec::new();
                for (streams, t0, t1, r) in clock.lock().map_err(|_| err("lock".into()))?.drain(..) {
                    let inside: f64 =
                        stats.events().iter().filter(|e| e.start >= t0 && e.start < t1).map(|e| e.seconds).sum();
                    let share = inside / (t1 - t0).as_secs_f64().max(1e-9);
                    let server = if ranks == 1 { "1 rank".to_string() } else { format!("tp {ranks}") };
                    mine.push((server, streams, r, (ranks > 1).then_some(share)));
                }
                out.lock().map_err(|_| err("lock".into()))?.extend(mine);
                Ok(())
            })
            .map_err(|e| anyhow!("{ranks}-rank server: {e}"))?;
            for r in out.into_inner().map_err(|_| anyhow!("lock"))? {
                if r.2.errors > 0 {
                    bail!(
                        "{} of {} requests failed on the {ranks}-rank server: {:?}",
                        r.2.errors,
                        r.2.requests,
                        r.2.first_error
                    );
                }
                rows.push((precision.clone(), r));
            }
        }
    }
    let cpu = glm_bench::cpu_name();
    println!(
        "{cpu}, {} cores; 1 compute thread per rank\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "| precision | server | streams | requests | tokens/s | TTFT p50 | TTFT p90 | time in collectives (rank 0) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (p, (server, streams, r, share)) in &rows {
        println!(
            "| {p} | {server} | {streams} | {} | {:.1} | {:.0} ms | {:.0} ms | {} |",
            r.requests,
            r.tokens_per_s(),
            r.ttft_quantile(0.5) * 1e3,
            r.ttft_quantile(0.9) * 1e3,
            share.map_or("-".to_string(), |s| format!("{:.0}%", s * 100.0))
        );
    }
    Ok(())
}
