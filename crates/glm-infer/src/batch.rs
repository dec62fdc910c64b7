//! Continuous batching: many requests decoding together, joining and leaving between steps.
//!
//! Each [`Engine::step`] first does prefill work, then one decode step of every running row as one
//! ragged batch ([`Decoder::feed_batch`]: the weights are read once for the whole batch, attention
//! runs per row over its own KV cache). A block's prefill (its context and `<sop>`) runs alone;
//! a step does at most `prefill_chunk` tokens' worth of it (tokens x layers), so a long one is
//! spread over steps a few layers at a time ([`Decoder::continue_feed`]) while the other rows keep
//! decoding. Blocks that start from the same context (the n choices of one prompt) share one
//! prefill and copy its cache. A row's logits are exactly those it gets decoding alone, however
//! the prefill was split or shared, so a request gets the same tokens batched as alone, greedy or
//! seeded.
//!
//! Admission is bounded by a batch size and a KV-cache budget: a request reserves the cache its
//! longest row can grow to (buffers grow by doubling, so the next power of two of its tokens) and
//! waits outside the engine until that fits. Requests end at their end token, their limits, a
//! stop string, their deadline, or when their [`Sink`] says the client is gone.

use std::time::Instant;

use glm_model::KvCache;

use crate::decode::{Blank, Decoder};
use crate::generate::{FillPlan, Generation, Generator, Next, StopReason, TextStream};
use crate::logprobs::{TokenLogprob, MAX_TOP_LOGPROBS};
use crate::sampling::{Sampler, SamplingConfig};
use crate::{Error, Result};

/// Most rows one decode step takes: up to this many, the linear layers compute each row exactly as
/// alone (`glm_nn::matvec::MAX_ROWS`), so batching never changes a request's tokens.
pub const MAX_BATCH: usize = glm_nn::matvec::MAX_ROWS;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Left-to-right continuation of the prompt (`Generator::complete`).
    Complete { prompt: String },
    /// The blanks of the text filled left to right (`Generator::fill`, a final [gMASK] included).
    Fill { text: String },
}

#[derive(Debug, Clone)]
pub struct Request {
    pub task: Task,
    pub sampling: SamplingConfig,
    /// The continuation ends before the first of these (completions only).
    pub stops: Vec<String>,
    /// Past it the request ends with `Error::Timeout`.
    pub deadline: Option<Instant>,
    /// Some(k): each token's log-probability and its k likeliest alternatives come with the text
    /// (k up to `logprobs::MAX_TOP_LOGPROBS`).
    pub logprobs: Option<usize>,
}

/// What the engine tells a request's owner.
#[derive(Debug)]
pub enum Event {
    /// Admitted: the prompt's token count (the text without layout tokens).
    Started { prompt_tokens: usize },
    /// New text of blank `blank` (0 for a completion), never a split character, with the
    /// log-probabilities of the tokens behind it when the request asked for them: every token,
    /// in order, once (a token whose text is held back comes with the text that releases it; the
    /// last event of a block may carry tokens and no text).
    Text { blank: usize, delta: String, logprobs: Vec<TokenLogprob> },
    /// Over: the whole generation, or why it failed.
    Done(Result<Generation>),
}

/// Where a request's events go. `send` returns false, and `is_closed` true, once nobody listens:
/// the engine then drops the request and frees its cache.
pub trait Sink: Send {
    fn send(&mut self, event: Event) -> bool;
    fn is_closed(&self) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Rows decoding together at most.
    pub max_batch: usize,
    /// KV cache all running requests may reserve together.
    pub kv_budget_bytes: u64,
    /// Prefill work per step, in tokens run through every layer: a longer prefill is spread over
    /// steps a few layers at a time, so the running rows keep decoding meanwhile (0: no bound).
    pub prefill_chunk: usize,
}

/// Counters since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub decode_steps: u64,
    /// Rows summed over decode steps (mean batch = this / decode_steps).
    pub batched_rows: u64,
    pub generated_tokens: u64,
    pub prefill_tokens: u64,
    /// Blocks that started from another block's prefill of the same context (n choices of one
    /// prompt) instead of running their own.
    pub shared_prefills: u64,
    pub finished: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// A request read and sized, ready to run.
pub struct Prepared {
    job: Job,
    request: Request,
    sampler: Sampler,
    prompt_tokens: usize,
    reserve: u64,
}

impl Prepared {
    /// KV-cache bytes the request reserves while it runs.
    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }
}

enum Job {
    Complete { prompt: String, prompt_ids: Vec<u32>, context: Vec<u32> },
    Fill(FillPlan),
}

struct Block<'m> {
    /// What its prefill runs (other blocks starting from the same copy its result).
    start: Start,
    dec: Decoder<'m>,
    out: Vec<u32>,
    stream: TextStream<'m>,
    /// Log-probabilities of the tokens whose text was not sent yet.
    scored: Vec<TokenLogprob>,
}

struct Active<'m> {
    sink: Box<dyn Sink>,
    job: Job,
    request: Request,
    sampler: Sampler,
    reserve: u64,
    /// The running block; None while the next one waits for its prefill.
    block: Option<Block<'m>>,
    /// The token chosen last, to feed at the next decode step.
    pending: Option<u32>,
    /// Blocks finished so far.
    blanks_done: usize,
    /// Set when the request is over (removed after the step).
    over: bool,
}

pub struct Engine<'m> {
    gen: Generator<'m>,
    opts: EngineOptions,
    active: Vec<Active<'m>>,
    reserved: u64,
    stats: EngineStats,
}

impl<'m> Engine<'m> {
    pub fn new(gen: Generator<'m>, opts: EngineOptions) -> Result<Self> {
        if opts.max_batch == 0 || opts.max_batch > MAX_BATCH {
            return Err(Error::Input(format!("max_batch must be in 1..={MAX_BATCH}, got {}", opts.max_batch)));
        }
        Ok(Self { gen, opts, active: Vec::new(), reserved: 0, stats: EngineStats::default() })
    }

    pub fn generator(&self) -> &Generator<'m> {
        &self.gen
    }

    /// Bytes of keys and values one token takes over all layers.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let m = self.gen.model();
        KvCache::bytes_per_token(m.config(), m.dtype())
    }

    /// Reads the request: tokenizes it, checks it fits the model, sizes its cache.
    pub fn prepare(&self, request: Request) -> Result<Prepared> {
        let sampler = Sampler::new(&request.sampling)?;
        if let Some(k) = request.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::Input(format!("at most {MAX_TOP_LOGPROBS} alternatives per token, not {k}")));
        }
        let max_seq = self.gen.model().config().max_seq_len;
        let max_new = request.sampling.max_new_tokens;
        // The longest row a block of the request can reach: its context, `<sop>` and its tokens.
        let (job, prompt_tokens, context_len, longest) = match &request.task {
            Task::Complete { prompt } => {
                let (prompt_ids, context) = self.gen.gmask_context(prompt)?;
                let (n, c) = (prompt_ids.len(), context.len());
                (Job::Complete { prompt: prompt.clone(), prompt_ids, context }, n, c, c + 1 + max_new)
            }
            Task::Fill { text } => {
                let plan = FillPlan::new(&self.gen, text)?;
                let (n, blanks) = (plan.text_tokens(), plan.len());
                (Job::Fill(plan), n, n, n + 1 + blanks * max_new)
            }
        };
        if context_len + 1 > max_seq {
            return Err(Error::TooLong { tokens: context_len + 1, max: max_seq });
        }
        let reserve = KvCache::capacity_for(longest.min(max_seq)) as u64 * self.kv_bytes_per_token();
        if reserve > self.opts.kv_budget_bytes {
            return Err(Error::Input(format!(
                "the request may grow to {} tokens, {} MiB of KV cache, more than the whole budget of {} MiB: ask for fewer tokens",
                longest.min(max_seq),
                reserve >> 20,
                self.opts.kv_budget_bytes >> 20
            )));
        }
        Ok(Prepared { job, request, sampler, prompt_tokens, reserve })
    }

    /// Whether `p` can join the running batch now.
    pub fn fits(&self, p: &Prepared) -> bool {
        self.active.len() < self.opts.max_batch && self.reserved + p.reserve <= self.opts.kv_budget_bytes
    }

    /// Joins the batch (its first block's prefill runs at the next step). Call only when `fits`.
    pub fn admit(&mut self, p: Prepared, mut sink: Box<dyn Sink>) {
        if !sink.send(Event::Started { prompt_tokens: p.prompt_tokens }) {
            self.stats.cancelled += 1;
            return;
        }
        self.reserved += p.reserve;
        self.active.push(Active {
            sink,
            job: p.job,
            request: p.request,
            sampler: p.sampler,
            reserve: p.reserve,
            block: None,
            pending: None,
            blanks_done: 0,
            over: false,
        });
    }

    /// Requests running.
    pub fn running(&self) -> usize {
        self.active.len()
    }

    /// KV-cache bytes reserved by the running requests.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn options(&self) -> EngineOptions {
        self.opts
    }

    /// One round: drop the requests whose client left or whose deadline passed, prefill the blocks
    /// that start, then one batched decode step of the rest. Returns the tokens generated.
    pub fn step(&mut self) -> usize {
        let now = Instant::now();
        let before = self.stats.generated_tokens;
        for a in &mut self.active {
            if a.sink.is_closed() {
                a.cancel(&mut self.stats);
            } else if a.request.deadline.is_some_and(|d| now >= d) {
                fail(a, Error::Timeout, &mut self.stats);
            }
        }
        self.sweep();
        let gen = &self.gen;
        let mut budget = Budget::new(self.opts.prefill_chunk, gen.model().config().num_layers);
        // Blocks starting from the same context (n choices of one prompt) share one prefill: the
        // first runs it, the others start from a copy of its cache and logits, which is exactly
        // what their own prefill would have given.
        let mut waiting: Vec<Start> =
            self.active.iter().filter(|a| a.block.is_none() && !a.over).filter_map(Active::next_start).collect();
        let mut prefilled: Vec<(Start, Decoder<'m>, Vec<f32>)> = Vec::new();
        // Prefills under way go on first, oldest first.
        for a in self.active.iter_mut().filter(|a| a.block.as_ref().is_some_and(|b| b.dec.feed_layers_left() > 0)) {
            match continue_prefill(a, &mut budget, &waiting, &mut prefilled) {
                Ok(Some(logits)) => advance(gen, a, logits, &mut self.stats),
                Ok(None) => {}
                Err(e) => fail(a, e, &mut self.stats),
            }
        }
        let mut under_way: Vec<Start> = self
            .active
            .iter()
            .filter_map(|a| {
                a.block.as_ref().filter(|b| b.dec.feed_layers_left() > 0 && !a.over).map(|b| b.start.clone())
            })
            .collect();
        let mut starts =
            Starts { budget: &mut budget, waiting: &mut waiting, prefilled: &mut prefilled, under_way: &mut under_way };
        for a in self.active.iter_mut().filter(|a| a.block.is_none() && !a.over) {
            match start_block(gen, a, &mut starts, &mut self.stats) {
                Ok(Some(logits)) => advance(gen, a, logits, &mut self.stats),
                Ok(None) => {}
                Err(e) => fail(a, e, &mut self.stats),
            }
        }
        let (mut rows, mut tokens, mut who) = (Vec::new(), Vec::new(), Vec::new());
        for (i, a) in self.active.iter_mut().enumerate() {
            if let (Some(b), Some(t), false) = (a.block.as_mut(), a.pending, a.over) {
                rows.push(&mut b.dec);
                tokens.push(t);
                who.push(i);
            }
        }
        if !rows.is_empty() {
            self.stats.decode_steps += 1;
            self.stats.batched_rows += rows.len() as u64;
            match Decoder::feed_batch(&mut rows, &tokens) {
                Ok(logits) => {
                    for (i, l) in who.into_iter().zip(logits) {
                        let a = &mut self.active[i];
                        a.pending = None;
                        advance(gen, a, l, &mut self.stats);
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    let (ranks, input) = (e.is_ranks(), e.is_input());
                    for i in who {
                        let e = match (ranks, input) {
                            (true, _) => Error::Ranks(msg.clone()),
                            (_, true) => Error::Input(msg.clone()),
                            _ => Error::Internal(msg.clone()),
                        };
                        fail(&mut self.active[i], e, &mut self.stats);
                    }
                }
            }
        }
        self.sweep();
        (self.stats.generated_tokens - before) as usize
    }

    /// Removes the requests that are over and frees their reservations.
    fn sweep(&mut self) {
        let mut freed = 0;
        self.active.retain(|a| {
            if a.over {
                freed += a.reserve;
            }
            !a.over
        });
        self.reserved -= freed;
    }
}

/// The stop strings of a request's blocks (completions only).
fn stops<'r>(job: &Job, request: &'r Request) -> &'r [String] {
    match job {
        Job::Complete { .. } => &request.stops,
        Job::Fill(_) => &[],
    }
}

/// What a block's prefill runs: its context and which blank it fills.
type Start = (Vec<u32>, Blank);

impl Active<'_> {
    /// The context and blank of the request's next block (None when there is none left).
    fn next_start(&self) -> Option<Start> {
        match &self.job {
            Job::Complete { context, .. } => Some((context.clone(), Blank::Gmask)),
            Job::Fill(plan) => plan.next_blank().map(|(c, b)| (c.to_vec(), b)),
        }
    }

    /// The client left: the request ends without a word.
    fn cancel(&mut self, stats: &mut EngineStats) {
        self.over = true;
        stats.cancelled += 1;
    }
}

fn fail(a: &mut Active, e: Error, stats: &mut EngineStats) {
    if !a.over {
        a.sink.send(Event::Done(Err(e)));
        a.over = true;
        stats.failed += 1;
    }
}

/// Prefill work one step may still do, in token-layers (None: no bound).
struct Budget {
    left: Option<usize>,
    ran: bool,
}

impl Budget {
    /// `chunk` tokens through each of `layers` layers (0: no bound).
    fn new(chunk: usize, layers: usize) -> Self {
        Self { left: (chunk > 0).then_some(chunk * layers), ran: false }
    }

    /// Layers to run now of a `tokens`-token prefill with `remaining` left: as many as fit, and
    /// at least one when no prefill ran yet this step, so prefills always move; 0: wait.
    fn take(&mut self, tokens: usize, remaining: usize) -> usize {
        let fit = self.left.map_or(remaining, |l| (l / tokens.max(1)).min(remaining));
        let n = if fit == 0 && !self.ran { remaining.min(1) } else { fit };
        if let Some(l) = self.left.as_mut() {
            *l = l.saturating_sub(n * tokens);
        }
        self.ran |= n > 0;
        n
    }
}

/// What the blocks starting in one step share.
struct Starts<'s, 'm> {
    budget: &'s mut Budget,
    /// The contexts of the blocks waiting to start (one entry each).
    waiting: &'s mut Vec<Start>,
    /// Prefills done this step that a waiting block can copy.
    prefilled: &'s mut Vec<(Start, Decoder<'m>, Vec<f32>)>,
    /// Contexts whose prefill is under way: blocks with them wait for it.
    under_way: &'s mut Vec<Start>,
}

/// Removes one entry `k` of `v`.
fn remove_one(v: &mut Vec<Start>, k: &Start) {
    if let Some(i) = v.iter().position(|x| x == k) {
        v.swap_remove(i);
    }
}

/// A finished prefill's copy, kept for the waiting blocks with the same context.
fn share<'m>(
    b: &Block<'m>,
    logits: &[f32],
    waiting: &[Start],
    prefilled: &mut Vec<(Start, Decoder<'m>, Vec<f32>)>,
) -> Result<()> {
    if waiting.contains(&b.start) && !prefilled.iter().any(|(k, ..)| *k == b.start) {
        prefilled.push((b.start.clone(), b.dec.fork()?, logits.to_vec()));
    }
    Ok(())
}

/// More of a block's prefill under way, within the budget; its first logits once done.
fn continue_prefill<'m>(
    a: &mut Active<'m>,
    budget: &mut Budget,
    waiting: &[Start],
    prefilled: &mut Vec<(Start, Decoder<'m>, Vec<f32>)>,
) -> Result<Option<Vec<f32>>> {
    let Some(b) = a.block.as_mut() else { return Ok(None) };
    let n = budget.take(b.dec.tokens().len(), b.dec.feed_layers_left());
    if n == 0 {
        return Ok(None);
    }
    let logits = b.dec.continue_feed(n)?;
    if let Some(l) = &logits {
        share(b, l, waiting, prefilled)?;
    }
    Ok(logits)
}

/// Starts the request's next block: a copy of a prefill of the same context done this step, or
/// its own prefill of the context and `<sop>` (as much of it as the budget allows; it waits when
/// the budget is spent or the same context is being prefilled). Returns the first logits once
/// there are any (None also when the block is empty by its limits and already finished).
fn start_block<'m>(
    gen: &Generator<'m>,
    a: &mut Active<'m>,
    st: &mut Starts<'_, 'm>,
    stats: &mut EngineStats,
) -> Result<Option<Vec<f32>>> {
    let Some(start) = a.next_start() else { return Err(Error::Input("no blank left to fill".into())) };
    let left = match &a.job {
        Job::Complete { prompt_ids, .. } => prompt_ids.as_slice(),
        Job::Fill(plan) => plan.left_of_next(),
    };
    let stream = TextStream::new(gen.tokenizer(), left)?;
    let block = |dec, start| Block { start, dec, out: Vec::new(), stream, scored: Vec::new() };
    if a.sampler.config().max_new_tokens == 0 {
        a.block = Some(block(Decoder::with_mirror(gen.model(), gen.mirror(), &start.0, start.1)?, start));
        finish_block(gen, a, StopReason::MaxNewTokens, stats);
        return Ok(None);
    }
    if let Some((_, dec, logits)) = st.prefilled.iter().find(|(k, ..)| *k == start) {
        stats.shared_prefills += 1;
        remove_one(st.waiting, &start);
        let logits = logits.clone();
        a.block = Some(block(dec.fork()?, start));
        return Ok(Some(logits));
    }
    if st.under_way.contains(&start) {
        return Ok(None); // copied when it is done
    }
    let tokens = start.0.len() + 1;
    let layers = st.budget.take(tokens, gen.model().config().num_layers);
    if layers == 0 {
        return Ok(None);
    }
    remove_one(st.waiting, &start);
    let mut dec = Decoder::with_mirror(gen.model(), gen.mirror(), &start.0, start.1)?;
    dec.begin_feed(&[gen.sop()])?;
    stats.prefill_tokens += tokens as u64;
    let logits = dec.continue_feed(layers)?;
    let b = block(dec, start);
    match &logits {
        Some(l) => share(&b, l, st.waiting, st.prefilled)?,
        None => st.under_way.push(b.start.clone()),
    }
    a.block = Some(b);
    Ok(logits)
}

/// Chooses the block's next token from `logits` and streams its text; ends the block when due.
fn advance<'m>(gen: &Generator<'m>, a: &mut Active<'m>, logits: Vec<f32>, stats: &mut EngineStats) {
    let Some(b) = a.block.as_mut() else { return };
    let tok = match gen.choose_scored(logits, &mut a.sampler, b.out.len(), a.request.logprobs) {
        Ok((Next::Token(t), scored)) => {
            b.scored.extend(scored);
            t
        }
        Ok((Next::End(stop), _)) => return finish_block(gen, a, stop, stats),
        Err(e) => return fail(a, e, stats),
    };
    b.out.push(tok);
    stats.generated_tokens += 1;
    let (delta, hit) = match b.stream.push(&b.out, stops(&a.job, &a.request), false) {
        Ok(x) => x,
        Err(e) => return fail(a, e, stats),
    };
    if !delta.is_empty() {
        let logprobs = std::mem::take(&mut b.scored);
        if !a.sink.send(Event::Text { blank: a.blanks_done, delta, logprobs }) {
            return a.cancel(stats);
        }
    }
    let max_new = a.sampler.config().max_new_tokens;
    match (hit, Generator::limit(b.out.len(), max_new, b.dec.room())) {
        (true, _) => finish_block(gen, a, StopReason::StopString, stats),
        (false, Some(stop)) => finish_block(gen, a, stop, stats),
        (false, None) => a.pending = Some(tok),
    }
}

/// Ends the running block: a completion is over; a fill goes on to its next blank, or is over.
fn finish_block<'m>(gen: &Generator<'m>, a: &mut Active<'m>, stop: StopReason, stats: &mut EngineStats) {
    let Some(mut b) = a.block.take() else { return };
    a.pending = None;
    let blank = a.blanks_done;
    a.blanks_done += 1;
    // Release what the stream held back (a trailing incomplete character).
    match b.stream.push(&b.out, stops(&a.job, &a.request), true) {
        Ok((rest, _)) if !rest.is_empty() || !b.scored.is_empty() => {
            let logprobs = std::mem::take(&mut b.scored);
            if !a.sink.send(Event::Text { blank, delta: rest, logprobs }) {
                return a.cancel(stats);
            }
        }
        Ok(_) => {}
        Err(e) => return fail(a, e, stats),
    }
    let done = match &mut a.job {
        Job::Complete { prompt, .. } => {
            Some(Ok(Generation::completion(prompt, b.out, std::mem::take(&mut b.stream.text), stop)))
        }
        Job::Fill(plan) => match plan.filled(gen, b.out, stop) {
            Ok(()) if plan.next_blank().is_some() => None,
            Ok(()) => Some(plan.finish(gen)),
            Err(e) => Some(Err(e)),
        },
    };
    if let Some(result) = done {
        match &result {
            Ok(_) => stats.finished += 1,
            Err(_) => stats.failed += 1,
        }
        a.sink.send(Event::Done(result));
        a.over = true;
    }
}
