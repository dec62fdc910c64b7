//! Continuous batching on tiny random models: requests batched together get exactly the tokens
//! they get alone, join and leave between steps, and respect the batch size, the KV-cache budget,
//! cancellation and deadlines.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use glm_infer::batch::{Engine, EngineOptions, Event, Request, Sink, Task};
use glm_infer::{Blank, Decoder, Error, Generation, Generator, SamplingConfig, TokenLogprob};
use glm_model::{Config, Glm};
use glm_nn::{DenseFactory, LinearFactory};
use glm_quant::{Bits, QuantFactory};
use glm_tokenizer::Tokenizer;

mod common;

fn model(cfg: &Config, lin: &dyn LinearFactory) -> Result<Glm> {
    common::model_with(cfg, 7, lin)
}

/// tiny (f32 and INT4), and the ChatGLM-style variant (2-D RoPE, tanh-GELU MLP, untied head).
fn models() -> Result<Vec<(&'static str, Glm)>> {
    let [tiny, chat] = common::configs();
    Ok(vec![
        ("tiny f32", model(&tiny, &DenseFactory)?),
        ("tiny int4", model(&tiny, &QuantFactory::quantize(Bits::Int4))?),
        ("tiny-2d f32", model(&chat, &DenseFactory)?),
    ])
}

/// An engine over `m` with a 1 GiB KV-cache budget.
fn new_engine<'m>(m: &'m Glm, tok: &'m Tokenizer, max_batch: usize, prefill_chunk: usize) -> Result<Engine<'m>> {
    Ok(Engine::new(Generator::new(m, tok)?, EngineOptions { max_batch, kv_budget_bytes: 1 << 30, prefill_chunk })?)
}

/// Collects a request's events; `closed` plays a client that left.
#[derive(Clone, Default)]
struct Collect {
    events: Arc<Mutex<Vec<Event>>>,
    closed: Arc<Mutex<bool>>,
}

impl Sink for Collect {
    fn send(&mut self, event: Event) -> bool {
        if self.is_closed() {
            return false;
        }
        self.events.lock().map(|mut e| e.push(event)).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.closed.lock().map(|c| *c).unwrap_or(true)
    }
}

impl Collect {
    /// The final result and the streamed text, once done.
    fn done(&self) -> Option<(std::result::Result<Generation, String>, String)> {
        let events = self.events.lock().ok()?;
        let mut text = String::new();
        for e in events.iter() {
            match e {
                Event::Text { delta, .. } => text += delta,
                Event::Done(Ok(g)) => return Some((Ok(g.clone()), text)),
                Event::Done(Err(e)) => return Some((Err(e.to_string()), text)),
                Event::Started { .. } => {}
            }
        }
        None
    }
}

fn run_all(engine: &mut Engine, sinks: &[Collect]) -> Result<()> {
    for _ in 0..10_000 {
        if sinks.iter().all(|s| s.done().is_some()) && engine.running() == 0 {
            return Ok(());
        }
        engine.step();
    }
    anyhow::bail!("requests did not finish")
}

fn requests() -> Vec<Request> {
    let complete = |prompt: &str, sampling| Request {
        task: Task::Complete { prompt: prompt.into() },
        sampling,
        stops: vec![],
        deadline: None,
        logprobs: None,
    };
    let greedy = |n| SamplingConfig { min_new_tokens: n, ..SamplingConfig::greedy(n) };
    let sampled = |seed| SamplingConfig { seed, max_new_tokens: 12, min_new_tokens: 12, ..SamplingConfig::default() };
    vec![
        complete("The quick brown fox", greedy(16)),
        complete("一个简单的中文句子，", greedy(9)),
        complete("A", greedy(20)),
        complete("Tell me a story about a dragon who lived in a very long and narrow valley.", greedy(5)),
        complete("Seeded sampling", sampled(3)),
        complete("Seeded sampling", sampled(4)),
        Request {
            task: Task::Fill { text: "The [MASK] sat on the [MASK].".into() },
            sampling: greedy(4),
            stops: vec![],
            deadline: None,
            logprobs: None,
        },
        Request {
            task: Task::Fill { text: "Paris is the capital of [MASK]. [gMASK]".into() },
            sampling: greedy(3),
            stops: vec![],
            deadline: None,
            logprobs: None,
        },
    ]
}

fn alone(g: &Generator, r: &Request) -> Result<Generation> {
    Ok(match &r.task {
        Task::Complete { prompt } => g.complete(prompt, &r.sampling)?,
        Task::Fill { text } => g.fill(text, &r.sampling)?,
    })
}

#[test]
fn batched_requests_get_the_tokens_they_get_alone() -> Result<()> {
    let tok = Tokenizer::default_glm()?;
    // Prefills whole, and spread over steps a few layers at a time (3 tokens' worth per step).
    for ((name, m), chunk) in models()?.iter().flat_map(|m| [0, 3].map(|c| (m, c))) {
        let name = format!("{name}, prefill chunk {chunk}");
        let mut engine = new_engine(m, &tok, 8, chunk)?;
        let reqs = requests();
        let sinks: Vec<Collect> = reqs.iter().map(|_| Collect::default()).collect();
        // Half join at once, the rest while the first ones are decoding.
        for (i, (r, s)) in reqs.iter().zip(&sinks).enumerate() {
            if i == reqs.len() / 2 {
                engine.step();
                engine.step();
            }
            let p = engine.prepare(r.clone())?;
            ensure!(engine.fits(&p), "{name}: request {i} does not fit");
            engine.admit(p, Box::new(s.clone()));
        }
        run_all(&mut engine, &sinks)?;
        let stats = engine.stats();
        ensure!(stats.batched_rows > 2 * stats.decode_steps, "{name}: little batching: {stats:?}");
        ensure!(engine.reserved() == 0, "{name}: reservations left after all finished");
        let g = Generator::new(m, &tok)?;
        for (i, (r, s)) in reqs.iter().zip(&sinks).enumerate() {
            let (got, streamed) = s.done().context("not done")?;
            let got = got.map_err(anyhow::Error::msg)?;
            let want = alone(&g, r)?;
            ensure!(got.tokens == want.tokens, "{name} request {i}: {:?} batched, {:?} alone", got.tokens, want.tokens);
            ensure!(got.text == want.text, "{name} request {i}: {:?} batched, {:?} alone", got.text, want.text);
            ensure!(got.spans.len() == want.spans.len());
            if let Task::Complete { prompt } = &r.task {
                ensure!(format!("{prompt}{streamed}") == got.text, "{name} request {i}: streamed {streamed:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn admission_follows_the_batch_size_and_the_kv_budget() -> Result<()> {
    let tok = Tokenizer::default_glm()?;
    let m = model(&Config::tiny(), &DenseFactory)?;
    let req = |n| Request {
        task: Task::Complete { prompt: "Hello there".into() },
        sampling: SamplingConfig { min_new_tokens: n, ..SamplingConfig::greedy(n) },
        stops: vec![],
        deadline: None,
        logprobs: None,
    };
    let g = Generator::new(&m, &tok)?;
    let probe = Engine::new(
        Generator::new(&m, &tok)?,
        EngineOptions { max_batch: 4, kv_budget_bytes: u64::MAX, prefill_chunk: 0 },
    )?;
    let per_token = probe.kv_bytes_per_token();
    // "Hello there" [gMASK] <sop> + 20 tokens < 32: each request reserves 32 tokens of cache.
    let one = probe.prepare(req(20))?.reserve();
    ensure!(one == 32 * per_token, "reserve {one}, per token {per_token}");
    let mut engine = Engine::new(g, EngineOptions { max_batch: 3, kv_budget_bytes: 2 * one, prefill_chunk: 0 })?;
    let sinks: Vec<Collect> = (0..3).map(|_| Collect::default()).collect();
    let mut waiting: Vec<_> = (0..3).map(|_| engine.prepare(req(20))).collect::<Result<_, _>>()?;
    let mut peak = 0;
    let mut sink = sinks.iter();
    while !waiting.is_empty() || engine.running() > 0 {
        while waiting.first().is_some_and(|p| engine.fits(p)) {
            let s = sink.next().context("sink")?;
            engine.admit(waiting.remove(0), Box::new(s.clone()));
        }
        peak = peak.max(engine.running());
        ensure!(engine.reserved() <= 2 * one);
        engine.step();
    }
    ensure!(peak == 2, "budget for two, ran {peak} at once");
    ensure!(sinks.iter().all(|s| matches!(s.done(), Some((Ok(_), _)))));
    // A request bigger than the whole budget is refused with a clear error.
    let small = Engine::new(
        Generator::new(&m, &tok)?,
        EngineOptions { max_batch: 3, kv_budget_bytes: one / 2, prefill_chunk: 0 },
    )?;
    let e = small.prepare(req(20)).err().context("should not fit")?;
    ensure!(e.to_string().contains("KV cache"), "{e}");
    // An empty prompt, and a fill without blanks, are refused before they run.
    let bad = |task| Request { task, ..req(4) };
    ensure!(matches!(small.prepare(bad(Task::Complete { prompt: String::new() })), Err(Error::EmptyPrompt)));
    ensure!(matches!(small.prepare(bad(Task::Fill { text: "no blanks".into() })), Err(Error::NoMask(_))));
    let e = small.prepare(bad(Task::Fill { text: "[gMASK] first".into() })).err().context("gMASK first")?;
    ensure!(e.to_string().contains("[gMASK]"), "{e}");
    Ok(())
}

#[test]
fn cancelled_and_late_requests_leave_the_batch() -> Result<()> {
    let tok = Tokenizer::default_glm()?;
    let m = model(&Config::tiny(), &DenseFactory)?;
    let mut engine = new_engine(&m, &tok, 4, 0)?;
    let long = SamplingConfig { min_new_tokens: 60, ..SamplingConfig::greedy(60) };
    let req = |deadline| Request {
        task: Task::Complete { prompt: "Hi".into() },
        sampling: long,
        stops: vec![],
        deadline,
        logprobs: None,
    };
    let (gone, late, fine) = (Collect::default(), Collect::default(), Collect::default());
    engine.admit(engine.prepare(req(None))?, Box::new(gone.clone()));
    engine.admit(engine.prepare(req(Some(Instant::now() + Duration::from_millis(1))))?, Box::new(late.clone()));
    engine.admit(engine.prepare(req(None))?, Box::new(fine.clone()));
    engine.step();
    *gone.closed.lock().map_err(|_| anyhow::anyhow!("lock"))? = true;
    std::thread::sleep(Duration::from_millis(5));
    engine.step();
    ensure!(engine.running() == 1, "{} running", engine.running());
    let s = engine.stats();
    ensure!(s.cancelled == 1 && s.failed == 1, "{s:?}");
    ensure!(matches!(late.done(), Some((Err(e), _)) if e.contains("time limit")));
    run_all(&mut engine, std::slice::from_ref(&fine))?;
    ensure!(matches!(fine.done(), Some((Ok(g), _)) if g.tokens.len() == 60));
    ensure!(engine.reserved() == 0);
    Ok(())
}

impl Collect {
    /// The log-probabilities streamed for each blank, in order.
    fn logprobs(&self) -> Vec<Vec<TokenLogprob>> {
        let mut out: Vec<Vec<TokenLogprob>> = Vec::new();
        let Ok(events) = self.events.lock() else { return out };
        for e in events.iter() {
            if let Event::Text { blank, logprobs, .. } = e {
                out.resize_with(out.len().max(blank + 1), Vec::new);
                out[*blank].extend(logprobs.iter().cloned());
            }
        }
        out
    }
}

/// log p of every id under a logits row, computed here (f64, max-shifted) as the oracle.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.iter().map(|&x| x as f64 - max - z.ln()).collect()
}

#[test]
fn logprobs_are_the_models_log_softmax_and_leave_the_draw_unchanged() -> Result<()> {
    let tok = Tokenizer::default_glm()?;
    for (name, m) in models()? {
        let mut engine = new_engine(&m, &tok, 8, 0)?;
        let reqs: Vec<Request> = requests().into_iter().map(|r| Request { logprobs: Some(5), ..r }).collect();
        let sinks: Vec<Collect> = reqs.iter().map(|_| Collect::default()).collect();
        for (r, s) in reqs.iter().zip(&sinks) {
            let p = engine.prepare(r.clone())?;
            engine.admit(p, Box::new(s.clone()));
        }
        run_all(&mut engine, &sinks)?;
        let g = Generator::new(&m, &tok)?;
        let layout: Vec<u32> =
            ["[MASK]", "[gMASK]", "[sMASK]", "<sop>"].iter().filter_map(|t| tok.token_id(t)).collect();
        let ends: Vec<u32> = ["<eop>", "<eod>"].iter().filter_map(|t| tok.token_id(t)).collect();
        for (i, (r, s)) in reqs.iter().zip(&sinks).enumerate() {
            let (got, _) = s.done().context("not done")?;
            let got = got.map_err(anyhow::Error::msg)?;
            // Asking for logprobs does not change what is drawn.
            let want = alone(&g, r)?;
            ensure!(
                got.tokens == want.tokens,
                "{name} request {i}: {:?} with logprobs, {:?} without",
                got.tokens,
                want.tokens
            );
            let per_blank = s.logprobs();
            ensure!(per_blank.len() == got.spans.len(), "{name} request {i}: logprobs for {} blanks", per_blank.len());
            for (lp, span) in per_blank.iter().zip(&got.spans) {
                let ids: Vec<u32> = lp.iter().map(|t| t.token).collect();
                ensure!(ids == span.tokens, "{name} request {i}: logprobs for {ids:?}, span {:?}", span.tokens);
                for t in lp {
                    ensure!(t.top.len() == 5, "{name} request {i}: {} alternatives", t.top.len());
                    ensure!(t.top.windows(2).all(|w| w[0].1 >= w[1].1), "{name} request {i}: unsorted {:?}", t.top);
                    ensure!(
                        t.top.iter().all(|(id, _)| !layout.contains(id)),
                        "{name}: a layout token offered: {:?}",
                        t.top
                    );
                    ensure!(t.logprob <= 0.0 && t.logprob <= t.top[0].1 + 1e-6, "{name} request {i}: {t:?}");
                    // Greedy takes the likeliest token that is not an end (min_new_tokens holds them off).
                    let first = t.top.iter().find(|(id, _)| !ends.contains(id)).context("no alternative")?;
                    if r.sampling.is_greedy() {
                        ensure!(
                            first.0 == t.token,
                            "{name} request {i}: greedy chose {} but {first:?} is likeliest",
                            t.token
                        );
                    }
                }
            }
            // The oracle: the completion's rows decoded here, each position's log-softmax.
            if let Task::Complete { prompt } = &r.task {
                let (_, context) = g.gmask_context(prompt)?;
                let mut dec = Decoder::new(&m, &context, Blank::Gmask)?;
                let mut row = dec.feed(&[tok.token_id("<sop>").context("sop")?])?;
                for t in &per_blank[0] {
                    let want = log_softmax(&row);
                    let d = (t.logprob as f64 - want[t.token as usize]).abs();
                    ensure!(
                        d < 1e-4,
                        "{name} request {i}: logprob {} vs {} from the logits",
                        t.logprob,
                        want[t.token as usize]
                    );
                    for &(id, lp) in &t.top {
                        ensure!((lp as f64 - want[id as usize]).abs() < 1e-4, "{name} request {i}: alternative {id}");
                    }
                    row = dec.feed(&[t.token])?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn choices_of_one_prompt_share_its_prefill_and_keep_their_tokens() -> Result<()> {
    let tok = Tokenizer::default_glm()?;
    // With the prefill spread over steps, the other choices wait for it and then copy it.
    for ((name, m), chunk) in models()?.iter().flat_map(|m| [0, 2].map(|c| (m, c))) {
        let name = format!("{name}, prefill chunk {chunk}");
        let mut engine = new_engine(m, &tok, 8, chunk)?;
        let prompt = "A prompt that four choices share, long enough to be worth sharing its prefill.";
        let sampled =
            |seed| SamplingConfig { seed, max_new_tokens: 10, min_new_tokens: 10, ..SamplingConfig::default() };
        let mut reqs: Vec<Request> = (0..4)
            .map(|seed| Request {
                task: Task::Complete { prompt: prompt.into() },
                sampling: sampled(seed),
                stops: vec![],
                deadline: None,
                logprobs: None,
            })
            .collect();
        let fill = Request {
            task: Task::Fill { text: "The [MASK] sat on the [MASK].".into() },
            sampling: SamplingConfig { min_new_tokens: 3, ..SamplingConfig::greedy(3) },
            stops: vec![],
            deadline: None,
            logprobs: None,
        };
        reqs.extend([fill.clone(), fill]);
        let sinks: Vec<Collect> = reqs.iter().map(|_| Collect::default()).collect();
        for (r, s) in reqs.iter().zip(&sinks) {
            let p = engine.prepare(r.clone())?;
            engine.admit(p, Box::new(s.clone()));
        }
        run_all(&mut engine, &sinks)?;
        let stats = engine.stats();
        // 3 of the 4 choices, and the second fill's two blanks (the same greedy spans before them).
        ensure!(stats.shared_prefills == 5, "{name}: {stats:?}");
        // Each request's prefill tokens when it runs alone: the shared run saves three of the
        // prompt's and one fill's.
        let mut alone_prefill = Vec::new();
        for r in &reqs {
            let mut e = new_engine(m, &tok, 1, 0)?;
            let sink = Collect::default();
            e.admit(e.prepare(r.clone())?, Box::new(sink.clone()));
            run_all(&mut e, std::slice::from_ref(&sink))?;
            ensure!(e.stats().shared_prefills == 0);
            alone_prefill.push(e.stats().prefill_tokens);
        }
        let saved = 3 * alone_prefill[0] + alone_prefill[4];
        ensure!(
            stats.prefill_tokens + saved == alone_prefill.iter().sum::<u64>(),
            "{name}: {stats:?}, alone {alone_prefill:?}"
        );
        let g = Generator::new(m, &tok)?;
        for (i, (r, s)) in reqs.iter().zip(&sinks).enumerate() {
            let got = s.done().context("not done")?.0.map_err(anyhow::Error::msg)?;
            let want = alone(&g, r)?;
            ensure!(got.tokens == want.tokens && got.text == want.text, "{name} request {i}: {got:?} vs {want:?}");
        }
        let texts: Vec<String> =
            sinks[..4].iter().filter_map(|s| s.done()).filter_map(|d| d.0.ok()).map(|g| g.text).collect();
        ensure!(texts.windows(2).any(|w| w[0] != w[1]), "{name}: four seeds gave one text: {texts:?}");
    }
    Ok(())
}

#[test]
fn a_long_prefill_is_spread_over_steps_while_the_running_rows_go_on() -> Result<()> {
    let tok = Tokenizer::default_glm()?;
    let m = model(&Config::tiny(), &DenseFactory)?;
    let layers = Config::tiny().num_layers;
    let mut engine = new_engine(&m, &tok, 4, 8)?;
    let req = |prompt: String, n| Request {
        task: Task::Complete { prompt },
        sampling: SamplingConfig { min_new_tokens: n, ..SamplingConfig::greedy(n) },
        stops: vec![],
        deadline: None,
        logprobs: None,
    };
    let (running, long) = (Collect::default(), Collect::default());
    engine.admit(engine.prepare(req("Hi".into(), 40))?, Box::new(running.clone()));
    engine.step();
    let long_prompt = "A much longer prompt that takes a while to prefill. ".repeat(6);
    let tokens = Generator::new(&m, &tok)?.gmask_context(&long_prompt)?.1.len() + 1;
    ensure!(tokens > 8 * 4, "the prompt is short: {tokens} tokens");
    engine.admit(engine.prepare(req(long_prompt, 4))?, Box::new(long.clone()));
    // 8 tokens' worth per step of a prefill of `tokens`: one layer per step (at least one).
    let texts =
        |c: &Collect| c.events.lock().map_or(0, |e| e.iter().filter(|e| matches!(e, Event::Text { .. })).count());
    let mut steps = 0;
    while texts(&long) == 0 {
        let made = engine.step();
        steps += 1;
        ensure!(made >= 1, "step {steps}: the running row stalled");
        ensure!(steps <= layers, "the prefill took {steps} steps");
    }
    ensure!(steps == layers, "a {tokens}-token prefill with an 8-token budget took {steps} steps, not one per layer");
    run_all(&mut engine, &[running.clone(), long.clone()])?;
    let g = Generator::new(&m, &tok)?;
    for (c, r) in [
        (&running, req("Hi".into(), 40)),
        (&long, req("A much longer prompt that takes a while to prefill. ".repeat(6), 4)),
    ] {
        let got = c.done().context("not done")?.0.map_err(anyhow::Error::msg)?;
        ensure!(got.tokens == alone(&g, &r)?.tokens, "tokens differ from alone");
    }
    Ok(())
}
