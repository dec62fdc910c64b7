//! Tensor-parallel serving in-process (ranks as threads on the in-process communicator): rank 0
//! serves HTTP and drives the engine, the other ranks follow its model calls on their shards. The
//! answers are the one-process server's; a follower that dies mid-stream ends the stream with an
//! error event, new requests and /health get 503, and every rank returns in bounded time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use glm_dist::split::{shard, split_of};
use glm_dist::{Communicator, Group, LocalComm, TpFactory};
use glm_infer::mirror::{Call, CommMirror, Follower};
use glm_infer::{Generator, SamplingConfig};
use glm_model::{init_weights, Config, Glm};
use glm_server::Options;
use glm_tokenizer::Tokenizer;
use serde_json::{json, Value};

/// Rank `rank` of `tp`'s model: its shards of the weights, logits gathered.
fn rank_model(cfg: &Config, w: &HashMap<String, Tensor>, comm: &std::rc::Rc<dyn Communicator>) -> Result<Glm> {
    let (rank, tp) = (comm.rank(), comm.size());
    let mut mine = HashMap::new();
    for (name, t) in w {
        mine.insert(name.clone(), shard(t, split_of(cfg, name), tp, rank)?);
    }
    let group = Group::register(std::rc::Rc::clone(comm));
    let lin = TpFactory::for_inference(cfg, group, Box::new(glm_nn::DenseFactory))?;
    Ok(Glm::new(cfg, VarBuilder::from_tensors(mine, DType::F32, &Device::Cpu), &lin)?)
}

/// How a follower behaves: follows to the end, or dies after `n` batch steps.
#[derive(Clone, Copy)]
enum Fate {
    Follow,
    DieAfter(usize),
}

/// The ranks' thread: each rank's closing line, or the group's error.
type Ranks = std::thread::JoinHandle<std::result::Result<Vec<String>, glm_dist::Error>>;

/// Runs a tp-rank server on threads; returns its address and the ranks' join handle.
fn start(tp: usize, fate: Fate, stop: tokio::sync::oneshot::Receiver<()>) -> Result<(String, Ranks)> {
    let cfg = Config::tiny();
    let w = init_weights(&cfg, 3, &Device::Cpu)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    let listener = Mutex::new(Some(listener));
    let stop = Mutex::new(Some(stop));
    let handle = std::thread::spawn(move || {
        LocalComm::run(tp, Duration::from_secs(20), |world| {
            let err = |e: String| glm_dist::Error::Comm(e);
            let model = rank_model(&cfg, &w, &world).map_err(|e| err(e.to_string()))?;
            if world.rank() == 0 {
                let tok = Arc::new(Tokenizer::default_glm().map_err(|e| err(e.to_string()))?);
                let opts = Options { max_tokens: 256, ..Options::new("tiny", cfg.max_seq_len) };
                let listener =
                    listener.lock().ok().and_then(|mut l| l.take()).ok_or_else(|| err("no listener".into()))?;
                let stop = stop.lock().ok().and_then(|mut s| s.take()).ok_or_else(|| err("no stop".into()))?;
                let mirror = CommMirror::new(world.as_ref());
                let shutdown = async move {
                    let _ = stop.await;
                };
                let r = glm_server::serve_driver(
                    &model,
                    tok,
                    opts,
                    listener,
                    shutdown,
                    &mirror,
                    Duration::from_millis(100),
                    Duration::from_secs(2),
                );
                return Ok(match r {
                    Ok(()) => "rank 0: stopped".to_string(),
                    Err(e) => format!("rank 0: {e}"),
                });
            }
            let mut f = Follower::new(&model);
            match fate {
                Fate::Follow => f.run(world.as_ref()).map_err(|e| err(e.to_string()))?,
                Fate::DieAfter(n) => {
                    let mut batches = 0;
                    loop {
                        let mut bytes = Vec::new();
                        world.broadcast_bytes(&mut bytes, 0)?;
                        for call in Call::decode(&bytes).map_err(|e| err(e.to_string()))? {
                            if matches!(call, Call::Batch { .. }) {
                                batches += 1;
                                if batches > n {
                                    return Err(err(format!("rank {} killed", world.rank())));
                                }
                            }
                            if call == Call::Ping {
                                world.barrier()?;
                            }
                            let _ = f.apply(call);
                        }
                    }
                }
            }
            Ok(format!("rank {}: followed", world.rank()))
        })
    });
    Ok((base, handle))
}

async fn post(base: &str, path: &str, body: &Value) -> Result<(u16, String)> {
    let r = reqwest::Client::new().post(format!("{base}{path}")).body(body.to_string()).send().await?;
    Ok((r.status().as_u16(), r.text().await?))
}

fn reference(prompt: &str, n: usize) -> Result<String> {
    let cfg = Config::tiny();
    let w = init_weights(&cfg, 3, &Device::Cpu)?;
    let model = Glm::new(&cfg, VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), &glm_nn::DenseFactory)?;
    let tok = Tokenizer::default_glm()?;
    let cfgs = SamplingConfig { min_new_tokens: n, ..SamplingConfig::greedy(n) };
    Ok(Generator::new(&model, &tok)?.complete(prompt, &cfgs)?.text)
}

#[test]
fn tp_serving_answers_as_one_process() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    for tp in [2, 4] {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (base, ranks) = start(tp, Fate::Follow, rx)?;
        rt.block_on(async {
            let prompts = ["The capital of France is", "A", "一个简单的中文句子，"];
            // Concurrent requests: one ragged batch on every rank.
            let reqs = prompts.iter().map(|p| {
                let body = json!({"model": "tiny", "prompt": p, "max_tokens": 10, "min_tokens": 10, "temperature": 0});
                let base = base.clone();
                async move { post(&base, "/v1/completions", &body).await }
            });
            for (p, r) in prompts.iter().zip(futures_util::future::join_all(reqs).await) {
                let (code, text) = r?;
                ensure!(code == 200, "tp {tp}: {code} {text}");
                let v: Value = serde_json::from_str(&text)?;
                let got = format!("{p}{}", v["choices"][0]["text"].as_str().context("text")?);
                ensure!(got == reference(p, 10)?, "tp {tp}: {got:?} vs one process {:?}", reference(p, 10)?);
            }
            // Streaming and blank filling.
            let body = json!({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "min_tokens": 8, "temperature": 0, "stream": true});
            let (code, text) = post(&base, "/v1/completions", &body).await?;
            ensure!(code == 200 && text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\""), "{code} {text}");
            let body = json!({"model": "tiny", "prompt": "The [MASK] sat on the mat.", "max_tokens": 4, "temperature": 0});
            let (code, text) = post(&base, "/v1/infill", &body).await?;
            ensure!(code == 200, "infill: {code} {text}");
            Ok(())
        })?;
        let _ = tx.send(());
        let out = ranks.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??;
        ensure!(out[0] == "rank 0: stopped" && out[1..].iter().all(|o| o.ends_with("followed")), "{out:?}");
    }
    Ok(())
}

#[test]
fn a_dead_follower_ends_the_stream_with_an_error_then_503_and_every_rank_returns() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let (_tx, rx) = tokio::sync::oneshot::channel();
    let t0 = Instant::now();
    let (base, ranks) = start(2, Fate::DieAfter(5), rx)?;
    rt.block_on(async {
        let body = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "min_tokens": 40, "temperature": 0, "stream": true});
        let (code, text) = post(&base, "/v1/completions", &body).await?;
        ensure!(code == 200, "{code} {text}");
        ensure!(text.contains("\"error\"") && text.ends_with("data: [DONE]\n\n"), "no error event: {text}");
        // The driver notices: new requests and the health check get 503.
        let mut last = (0, String::new());
        for _ in 0..100 {
            let body = json!({"model": "tiny", "prompt": "Hello", "max_tokens": 2});
            last = post(&base, "/v1/completions", &body).await?;
            if last.0 == 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(last.0 == 503 && last.1.contains("ranks"), "{last:?}");
        let health = reqwest::get(format!("{base}/health")).await?;
        ensure!(health.status().as_u16() == 503, "health {}", health.status());
        Ok(())
    })?;
    // Rank 0 stops after its grace period; the group reports the dead rank.
    let out = ranks.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?;
    let msg = match out {
        Err(e) => e.to_string(),
        Ok(v) => format!("{v:?}"),
    };
    ensure!(msg.contains("killed"), "{msg}");
    ensure!(t0.elapsed() < Duration::from_secs(30), "took {:?}", t0.elapsed());
    Ok(())
}
