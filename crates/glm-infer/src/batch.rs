//! Continuous batching: many requests decoding together, joining and leaving between steps.
//!
//! Each [`Engine::step`] first runs the prefill of every block that starts (alone, one forward
//! each: the context and `<sop>`; blocks starting from the same context in the same step, such as
//! the n choices of one prompt, share one and copy its cache), then one decode step of every
//! running row as one ragged batch
//! ([`Decoder::feed_batch`]: the weights are read once for the whole batch, attention runs per row
//! over its own KV cache). A row's logits are exactly those it gets decoding alone, so a request
//! gets the same tokens batched as alone, greedy or seeded.
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
        // Blocks starting from the same context (n choices of one prompt) share one prefill: the
        // first runs it, the others start from a copy of its cache and logits, which is exactly
        // what their own prefill would have given.
        let starting: Vec<Option<Start>> =
            self.active.iter().map(|a| a.block.is_none().then(|| a.next_start()).flatten()).collect();
        let mut prefilled: Vec<(Start, Decoder<'m>, Vec<f32>)> = Vec::new();
        for (i, a) in self.active.iter_mut().enumerate().filter(|(_, a)| a.block.is_none()) {
            let copies = starting[i].as_ref().map_or(0, |k| starting.iter().filter(|s| s.as_ref() == Some(k)).count());
            match start_block(gen, a, &mut self.stats, &mut prefilled, copies > 1) {
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
                    for i in who {
                        fail(&mut self.active[i], Error::Input(msg.clone()), &mut self.stats);
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

/// Prefill of the request's next block: its context and `<sop>`; returns the first logits (None
/// when the block is empty by its limits and already finished). A prefill of the same context in
/// `prefilled` is copied instead of run; with `share`, this one's is kept there for the others.
fn start_block<'m>(
    gen: &Generator<'m>,
    a: &mut Active<'m>,
    stats: &mut EngineStats,
    prefilled: &mut Vec<(Start, Decoder<'m>, Vec<f32>)>,
    share: bool,
) -> Result<Option<Vec<f32>>> {
    let (context, blank, left): (&[u32], Blank, &[u32]) = match &a.job {
        Job::Complete { prompt_ids, context, .. } => (context, Blank::Gmask, prompt_ids),
        Job::Fill(plan) => match plan.next_blank() {
            Some((context, blank)) => (context, blank, plan.left_of_next()),
            None => return Err(Error::Input("no blank left to fill".into())),
        },
    };
    let stream = TextStream::new(gen.tokenizer(), left);
    if a.sampler.config().max_new_tokens == 0 {
        let dec = Decoder::new(gen.model(), context, blank)?;
        a.block = Some(Block { dec, out: Vec::new(), stream, scored: Vec::new() });
        finish_block(gen, a, StopReason::MaxNewTokens, stats);
        return Ok(None);
    }
    let (dec, logits) = match prefilled.iter().find(|((c, b), ..)| c == context && *b == blank) {
        Some((_, dec, logits)) => {
            stats.shared_prefills += 1;
            (dec.fork()?, logits.clone())
        }
        None => {
            let mut dec = Decoder::new(gen.model(), context, blank)?;
            let logits = dec.feed(&[gen.sop()])?;
            stats.prefill_tokens += context.len() as u64 + 1;
            if share {
                prefilled.push(((context.to_vec(), blank), dec.fork()?, logits.clone()));
            }
            (dec, logits)
        }
    };
    a.block = Some(Block { dec, out: Vec::new(), stream, scored: Vec::new() });
    Ok(Some(logits))
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
