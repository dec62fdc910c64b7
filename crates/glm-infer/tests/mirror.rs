//! Decoding driven through a mirror: a follower replaying every model call (encoded and decoded
//! as a message, as the tensor-parallel ranks receive them) computes the logits the driver
//! computes, holds a cache for exactly the rows alive, and the driver's results do not change.

use std::cell::RefCell;

use anyhow::{ensure, Result};
use glm_infer::batch::{Engine, EngineOptions, Event, Request, Sink, Task};
use glm_infer::mirror::{Call, Follower, Mirror};
use glm_infer::{Blank, Decoder, Generator, SamplingConfig};
use glm_nn::DenseFactory;
use glm_tokenizer::Tokenizer;

mod common;

/// A follower on this thread, fed each call's message.
struct Local<'m> {
    follower: RefCell<Follower<'m>>,
    dropped: RefCell<Vec<u64>>,
    /// The logits the follower computed, in order, and its errors.
    logits: RefCell<Vec<Vec<f32>>>,
    errors: RefCell<Vec<String>>,
}

impl<'m> Local<'m> {
    fn new(model: &'m glm_model::Glm) -> Self {
        Self {
            follower: RefCell::new(Follower::new(model)),
            dropped: RefCell::new(Vec::new()),
            logits: RefCell::new(Vec::new()),
            errors: RefCell::new(Vec::new()),
        }
    }
}

impl Mirror for Local<'_> {
    fn call(&self, call: &Call) -> glm_infer::Result<()> {
        let rows = std::mem::take(&mut *self.dropped.borrow_mut());
        let bytes = Call::encode(&[Call::Drop { rows }, call.clone()]);
        for c in Call::decode(&bytes)? {
            match self.follower.borrow_mut().apply(c) {
                Ok(Some(l)) => self.logits.borrow_mut().extend(l),
                Ok(None) => {}
                Err(e) => self.errors.borrow_mut().push(e.to_string()),
            }
        }
        Ok(())
    }
    fn dropped(&self, row: u64) {
        self.dropped.borrow_mut().push(row);
    }
}

struct Keep(std::sync::Arc<std::sync::Mutex<Vec<Event>>>);

impl Sink for Keep {
    fn send(&mut self, e: Event) -> bool {
        self.0.lock().map(|mut v| v.push(e)).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

#[test]
fn a_follower_computes_the_drivers_logits_and_drops_its_rows() -> Result<()> {
    let tok = Tokenizer::default_glm()?;
    for cfg in common::configs() {
        let (driver, copy) = (common::model_with(&cfg, 7, &DenseFactory)?, common::model_with(&cfg, 7, &DenseFactory)?);
        let local = Local::new(&copy);
        // A greedy continuation: the follower's logits at every step are those of a plain decoder
        // fed the same tokens.
        let g = Generator::new(&driver, &tok)?.with_mirror(&local);
        let out = g.complete("The quick brown fox", &SamplingConfig::greedy(8))?;
        let plain = Generator::new(&driver, &tok)?.complete("The quick brown fox", &SamplingConfig::greedy(8))?;
        ensure!(out.tokens == plain.tokens, "{}: the mirror changed the result", cfg.name);
        let (_, context) = g.gmask_context("The quick brown fox")?;
        let mut dec = Decoder::new(&driver, &context, Blank::Gmask)?;
        let sop = tok.specials().sop.ok_or_else(|| anyhow::anyhow!("no <sop>"))?;
        let mut want = vec![dec.feed(&[sop])?];
        for &t in &out.tokens[..out.tokens.len() - 1] {
            want.push(dec.feed(&[t])?);
        }
        let got = local.logits.borrow().clone();
        ensure!(got.len() >= want.len() && got[..want.len()] == want[..], "{}: the follower's logits differ", cfg.name);

        // The engine: requests batched, prefills spread over steps; the same results as without
        // the mirror, no follower error, and no row left once all are done.
        local.logits.borrow_mut().clear();
        let reqs: Vec<Request> = ["The quick brown fox", "A", "The [MASK] sat on the [MASK]."]
            .iter()
            .map(|p| Request {
                task: if p.contains("[MASK]") {
                    Task::Fill { text: p.to_string() }
                } else {
                    Task::Complete { prompt: p.to_string() }
                },
                sampling: SamplingConfig { min_new_tokens: 6, ..SamplingConfig::greedy(6) },
                stops: vec![],
                deadline: None,
                logprobs: None,
            })
            .collect();
        let opts = EngineOptions { max_batch: 8, kv_budget_bytes: 1 << 30, prefill_chunk: 3 };
        let mut results = Vec::new();
        for mirrored in [false, true] {
            let g = Generator::new(&driver, &tok)?;
            let g = if mirrored { g.with_mirror(&local) } else { g };
            let mut engine = Engine::new(g, opts)?;
            let sinks: Vec<_> = reqs.iter().map(|_| std::sync::Arc::new(std::sync::Mutex::new(Vec::new()))).collect();
            for (r, s) in reqs.iter().zip(&sinks) {
                let p = engine.prepare(r.clone())?;
                engine.admit(p, Box::new(Keep(s.clone())));
            }
            for _ in 0..1000 {
                if engine.running() == 0 {
                    break;
                }
                engine.step();
            }
            let done: Vec<Vec<u32>> = sinks
                .iter()
                .map(|s| {
                    s.lock().ok().and_then(|v| {
                        v.iter().find_map(|e| if let Event::Done(Ok(g)) = e { Some(g.tokens.clone()) } else { None })
                    })
                })
                .collect::<Option<_>>()
                .ok_or_else(|| anyhow::anyhow!("{}: a request did not finish", cfg.name))?;
            results.push(done);
        }
        ensure!(results[0] == results[1], "{}: the mirror changed the engine's results", cfg.name);
        local.call(&Call::Idle)?; // flushes the last drops
        ensure!(local.errors.borrow().is_empty(), "{}: follower errors {:?}", cfg.name, local.errors.borrow());
        ensure!(local.follower.borrow().rows() == 0, "{}: {} rows left", cfg.name, local.follower.borrow().rows());
        ensure!(!local.logits.borrow().is_empty());
    }
    Ok(())
}
