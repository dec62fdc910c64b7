//! Text in, text out: [gMASK] continuation and [MASK] blank filling (spec section 2).

use glm_model::Glm;
use glm_tokenizer::Tokenizer;

use crate::decode::{Blank, Decoder};
use crate::logprobs::{self, TokenLogprob};
use crate::sampling::{Sampler, SamplingConfig};
use crate::{Error, Result};

/// Why a block stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model wrote `<eop>`.
    Eop,
    /// The model wrote the end-of-document token.
    Eod,
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The row reached the model's max_seq_len.
    MaxSeqLen,
    /// A stop string appeared (the text is cut before it).
    StopString,
}

/// One generated block (end token not included).
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub tokens: Vec<u32>,
    /// The block as the tokenizer writes it after its left context (so a leading space shows).
    pub text: String,
    pub stop: StopReason,
    /// Where `text` starts in the generation's text, in bytes.
    pub start: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// `complete`: the prompt followed by the continuation. `fill`: the text with every blank
    /// replaced by its span.
    pub text: String,
    /// Every generated token, blanks in order, end tokens left out.
    pub tokens: Vec<u32>,
    /// Why the last block stopped.
    pub stop: StopReason,
    /// One per blank (one for `complete`).
    pub spans: Vec<Span>,
}

impl Generation {
    fn new(text: String, spans: Vec<Span>) -> Self {
        let tokens = spans.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let stop = spans.last().map_or(StopReason::MaxNewTokens, |s| s.stop);
        Self { text, tokens, stop, spans }
    }

    /// A left-to-right continuation: the prompt followed by the block's `text`.
    pub(crate) fn completion(prompt: &str, tokens: Vec<u32>, text: String, stop: StopReason) -> Self {
        Self::new(format!("{prompt}{text}"), vec![Span { tokens, text, stop, start: prompt.len() }])
    }
}

/// Generation with one model and tokenizer. The special ids are the tokenizer's (as in training).
pub struct Generator<'a> {
    model: &'a Glm,
    tok: &'a Tokenizer,
    sop: u32,
    eop: u32,
    eod: Option<u32>,
    gmask: Option<u32>,
    /// [MASK] and [sMASK] (filled alike).
    masks: Vec<u32>,
    /// Ids that may be sampled: those both the model and the tokenizer have ...
    sampleable: usize,
    /// ... except the layout's own tokens ([MASK], [gMASK], [sMASK], <sop>), never a training target.
    invalid: Vec<u32>,
    /// Tensor-parallel followers that replay every model call (`crate::mirror`).
    mirror: Option<&'a dyn crate::mirror::Mirror>,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Glm, tok: &'a Tokenizer) -> Result<Self> {
        let s = tok.specials();
        let sop = s.sop.ok_or(Error::MissingToken { token: "<sop>", needed_by: "generation" })?;
        let eop = s.eop.ok_or(Error::MissingToken { token: "<eop>", needed_by: "generation" })?;
        let vocab = model.config().vocab_size;
        let named = [("<sop>", s.sop), ("<eop>", s.eop), ("<eod>", s.eod), ("[gMASK]", s.gmask)];
        for (token, id) in named.into_iter().chain([("[MASK]", s.mask), ("[sMASK]", s.smask)]) {
            if let Some(id) = id.filter(|&id| id as usize >= vocab) {
                return Err(Error::TokenOutsideVocab { token, id, vocab });
            }
        }
        let masks = [s.mask, s.smask].into_iter().flatten().collect();
        let invalid = [s.mask, s.gmask, s.smask, s.sop].into_iter().flatten().collect();
        let sampleable = vocab.min(tok.vocab_size());
        Ok(Self { model, tok, sop, eop, eod: s.eod, gmask: s.gmask, masks, sampleable, invalid, mirror: None })
    }

    /// Every model call of this generator's rows sent to `mirror`'s followers first (the driver
    /// of tensor-parallel decoding).
    pub fn with_mirror(self, mirror: &'a dyn crate::mirror::Mirror) -> Self {
        Self { mirror: Some(mirror), ..self }
    }

    pub fn mirror(&self) -> Option<&'a dyn crate::mirror::Mirror> {
        self.mirror
    }

    /// The prompt's ids and the row context `prompt [gMASK]` of a left-to-right continuation.
    pub fn gmask_context(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let gmask = self.gmask.ok_or(Error::MissingToken { token: "[gMASK]", needed_by: "complete" })?;
        let ids = self.tok.encode(prompt);
        if ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let context = ids.iter().copied().chain([gmask]).collect();
        Ok((ids, context))
    }

    /// Left-to-right continuation: `prompt [gMASK] <sop>` then tokens until `<eop>`, the
    /// end-of-document token, `max_new_tokens` or the model's max_seq_len.
    pub fn complete(&self, prompt: &str, cfg: &SamplingConfig) -> Result<Generation> {
        let mut sampler = Sampler::new(cfg)?;
        let (ids, context) = self.gmask_context(prompt)?;
        let (tokens, stop) = self.generate(&context, Blank::Gmask, &mut sampler)?;
        let text = self.continuation(&ids, &tokens)?;
        Ok(Generation::completion(prompt, tokens, text, stop))
    }

    /// `complete`, handing each new piece of text to `on_text` as it is generated (never a split
    /// UTF-8 character), and stopping at the first of `stops` (the text ends before it).
    pub fn complete_stream(
        &self,
        prompt: &str,
        cfg: &SamplingConfig,
        stops: &[String],
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let mut sampler = Sampler::new(cfg)?;
        let (ids, context) = self.gmask_context(prompt)?;
        let mut stream = TextStream::new(self.tok, &ids)?;
        let mut failure = None;
        let mut go = |gen: &[u32]| match stream.push(gen, stops, false) {
            Ok((delta, stop)) => {
                if !delta.is_empty() {
                    on_text(&delta);
                }
                !stop
            }
            Err(e) => {
                failure = Some(e);
                false
            }
        };
        let (tokens, stop) = self.generate_with(&context, Blank::Gmask, &mut sampler, &mut go)?;
        if let Some(e) = failure {
            return Err(e);
        }
        // Release what was held back (a trailing incomplete character stays as U+FFFD).
        let (rest, _) = stream.push(&tokens, stops, true)?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        let text = stream.text;
        Ok(Generation::completion(prompt, tokens, text, stop))
    }

    /// Left-to-right continuation by beam search (GLM's BeamSearchStrategy, see `beam`): the best
    /// hypothesis.
    pub fn complete_beam(&self, prompt: &str, cfg: &crate::BeamConfig) -> Result<Generation> {
        let (ids, context) = self.gmask_context(prompt)?;
        let (tokens, stop) = self.beam_block(&context, Blank::Gmask, cfg)?;
        let text = self.continuation(&ids, &tokens)?;
        Ok(Generation::completion(prompt, tokens, text, stop))
    }

    /// The best block after `context <sop>` by beam search, end token not included.
    pub fn beam_block(&self, context: &[u32], blank: Blank, cfg: &crate::BeamConfig) -> Result<(Vec<u32>, StopReason)> {
        let mut dec = Decoder::with_mirror(self.model, self.mirror, context, blank)?;
        let logits = dec.feed(&[self.sop])?;
        let vocab = self.model.config().vocab_size as u32;
        let banned: Vec<u32> = self.invalid.iter().copied().chain(self.sampleable as u32..vocab).collect();
        let ends: Vec<u32> = std::iter::once(self.eop).chain(self.eod).collect();
        let room = self.model.config().max_seq_len.saturating_sub(context.len() + 1);
        let cfg = crate::BeamConfig { max_new_tokens: cfg.max_new_tokens.min(room), ..*cfg };
        let hyps = crate::beam::beam_search(dec, logits, context.len() + 1, &ends, &banned, &cfg)?;
        let best = hyps.into_iter().next().ok_or_else(|| Error::Sampling("beam search found nothing".into()))?;
        let stop = if best.finished { StopReason::Eop } else { StopReason::MaxNewTokens };
        Ok((best.tokens, stop))
    }

    /// Blank filling: every [MASK] / [sMASK] of `text`, left to right, each generated with the
    /// blanks before it already filled (the earlier spans spliced into the context), up to
    /// `max_new_tokens` tokens per blank.
    pub fn fill(&self, text: &str, cfg: &SamplingConfig) -> Result<Generation> {
        let mut sampler = Sampler::new(cfg)?;
        self.fill_with(text, |ids, blank| self.generate(ids, blank, &mut sampler))
    }

    /// `fill` with each blank's span chosen by beam search.
    pub fn fill_beam(&self, text: &str, cfg: &crate::BeamConfig) -> Result<Generation> {
        self.fill_with(text, |ids, blank| self.beam_block(ids, blank, cfg))
    }

    /// The blanks of `text` filled left to right by `block(context, blank)`.
    fn fill_with<F>(&self, text: &str, mut block: F) -> Result<Generation>
    where
        F: FnMut(&[u32], Blank) -> Result<(Vec<u32>, StopReason)>,
    {
        let mut plan = FillPlan::new(self, text)?;
        while let Some((context, blank)) = plan.next_blank() {
            let (tokens, stop) = block(context, blank)?;
            plan.filled(self, tokens, stop)?;
        }
        plan.finish(self)
    }

    /// The token after `logits` (the next-token logits of a block with `generated` tokens so far):
    /// ids the tokenizer lacks and the layout tokens are never sampled (the spec's invalid
    /// slices), end tokens not before `min_new_tokens`. `Next::End` for `<eop>` and the
    /// end-of-document token.
    pub fn choose(&self, logits: Vec<f32>, sampler: &mut Sampler, generated: usize) -> Result<Next> {
        Ok(self.choose_scored(logits, sampler, generated, None)?.0)
    }

    /// `choose`, and with `top` = Some(k) the chosen token's log-probability under the model with
    /// its k likeliest alternatives (see `logprobs`). The draw is the same either way.
    pub fn choose_scored(
        &self,
        mut logits: Vec<f32>,
        sampler: &mut Sampler,
        generated: usize,
        top: Option<usize>,
    ) -> Result<(Next, Option<TokenLogprob>)> {
        let lse = top.map(|_| logprobs::log_sum_exp(&logits));
        logits.truncate(self.sampleable);
        for &id in &self.invalid {
            if let Some(x) = logits.get_mut(id as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        let alternatives = lse.zip(top).map(|(lse, k)| logprobs::top_k(&logits, lse, k));
        if generated < sampler.config().min_new_tokens {
            for id in std::iter::once(self.eop).chain(self.eod) {
                if let Some(x) = logits.get_mut(id as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let tok = sampler.sample(&logits)?;
        let scored = lse.map(|lse| TokenLogprob {
            token: tok,
            // the draw never takes a masked entry, so this is the model's logit
            logprob: logits.get(tok as usize).map_or(f32::NEG_INFINITY, |&x| (x as f64 - lse) as f32),
            top: alternatives.unwrap_or_default(),
        });
        let next = if tok == self.eop {
            Next::End(StopReason::Eop)
        } else if Some(tok) == self.eod {
            Next::End(StopReason::Eod)
        } else {
            Next::Token(tok)
        };
        Ok((next, scored))
    }

    /// Why a block of `generated` tokens with `room` left in its row must stop, if it must.
    pub fn limit(generated: usize, max_new_tokens: usize, room: usize) -> Option<StopReason> {
        if generated >= max_new_tokens {
            Some(StopReason::MaxNewTokens)
        } else if room == 0 {
            Some(StopReason::MaxSeqLen)
        } else {
            None
        }
    }

    /// The `<sop>` id every block starts with.
    pub fn sop(&self) -> u32 {
        self.sop
    }

    pub fn model(&self) -> &'a Glm {
        self.model
    }

    pub fn tokenizer(&self) -> &'a Tokenizer {
        self.tok
    }

    /// The block after `context <sop>`, one cached step per token, end token not included. Ids the
    /// tokenizer lacks and the layout tokens are never sampled (the spec's invalid slices).
    pub fn generate(&self, context: &[u32], blank: Blank, sampler: &mut Sampler) -> Result<(Vec<u32>, StopReason)> {
        self.generate_with(context, blank, sampler, &mut |_| true)
    }

    /// `generate`, calling `go` with the tokens so far after each one; `false` stops
    /// (`StopReason::StopString`).
    pub fn generate_with(
        &self,
        context: &[u32],
        blank: Blank,
        sampler: &mut Sampler,
        go: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<(Vec<u32>, StopReason)> {
        let max_new = sampler.config().max_new_tokens;
        let mut dec = Decoder::with_mirror(self.model, self.mirror, context, blank)?;
        let mut out = Vec::new();
        if max_new == 0 {
            return Ok((out, StopReason::MaxNewTokens));
        }
        let mut logits = dec.feed(&[self.sop])?;
        loop {
            let tok = match self.choose(logits, sampler, out.len())? {
                Next::End(stop) => return Ok((out, stop)),
                Next::Token(tok) => tok,
            };
            out.push(tok);
            if !go(&out) {
                return Ok((out, StopReason::StopString));
            }
            if let Some(stop) = Self::limit(out.len(), max_new, dec.room()) {
                return Ok((out, stop));
            }
            logits = dec.feed(&[tok])?;
        }
    }

    /// `generated` as the tokenizer writes it after `left` (a leading space of its first token shows).
    pub fn continuation(&self, left: &[u32], generated: &[u32]) -> Result<String> {
        text_after(self.tok, left, &self.tok.decode(left)?, generated)
    }
}

/// `generated` as the tokenizer writes it after `left`, whose text is `before`.
fn text_after(tok: &Tokenizer, left: &[u32], before: &str, generated: &[u32]) -> Result<String> {
    let joined: Vec<u32> = left.iter().chain(generated).copied().collect();
    let all = tok.decode(&joined)?;
    match all.strip_prefix(before) {
        Some(rest) => Ok(rest.to_string()),
        None => Ok(tok.decode(generated)?),
    }
}

/// Incremental detokenization: the text of the tokens so far (after a left context, so a leading
/// space shows), released only up to the last complete character, and cut at a stop string.
pub struct TextStream<'t> {
    tok: &'t Tokenizer,
    left: Vec<u32>,
    /// The text of `left`, decoded once.
    before: String,
    /// The text released so far.
    pub text: String,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t Tokenizer, left: &[u32]) -> Result<Self> {
        Ok(Self { tok, left: left.to_vec(), before: tok.decode(left)?, text: String::new() })
    }

    /// With `generated` the whole block so far: (new text to show, whether a stop string ended it).
    /// `last` releases a trailing incomplete character too.
    pub fn push(&mut self, generated: &[u32], stops: &[String], last: bool) -> Result<(String, bool)> {
        let mut full = text_after(self.tok, &self.left, &self.before, generated)?;
        // A byte-fallback character still missing bytes decodes to U+FFFD at the end: hold it back.
        let mut hold = full.len();
        while !last && full[..hold].ends_with('\u{FFFD}') {
            hold -= '\u{FFFD}'.len_utf8();
        }
        let stop_at = stops.iter().filter(|s| !s.is_empty()).filter_map(|s| full.find(s.as_str())).min();
        if let Some(p) = stop_at {
            full.truncate(p);
            hold = hold.min(p);
        }
        let delta = full.get(self.text.len()..hold).unwrap_or("").to_string();
        self.text.push_str(&delta);
        Ok((delta, stop_at.is_some()))
    }
}

/// What `Generator::choose` picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Token(u32),
    /// An end token: the block is over (the token is not part of it).
    End(StopReason),
}

/// Blank filling, one blank at a time: every [MASK] / [sMASK] of a text left to right, then a final
/// [gMASK] if the text ends with one (a continuation after the filled text, GLM's long blank).
/// Each blank's context is the text with the blanks before it already replaced by their spans.
pub struct FillPlan {
    orig: Vec<u32>,
    /// Indices of the blanks in `orig`; the last may be the final [gMASK].
    blanks: Vec<usize>,
    final_gmask: bool,
    /// The row context now: `orig` with the filled blanks spliced in.
    ids: Vec<u32>,
    out: String,
    /// Original index after the last filled blank; span tokens spliced in so far.
    prev: usize,
    added: usize,
    spans: Vec<Span>,
}

impl FillPlan {
    pub fn new(gen: &Generator, text: &str) -> Result<Self> {
        let orig = gen.tok.encode(text);
        if orig.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let mut blanks: Vec<usize> = (0..orig.len()).filter(|&i| gen.masks.contains(&orig[i])).collect();
        let gmasks: Vec<usize> = (0..orig.len()).filter(|&i| Some(orig[i]) == gen.gmask).collect();
        let final_gmask = match gmasks.as_slice() {
            [] => false,
            [g] if *g == orig.len() - 1 => true,
            _ => return Err(Error::Input("[gMASK] may appear once, at the very end of the text".into())),
        };
        if final_gmask {
            blanks.push(orig.len() - 1);
        }
        if blanks.is_empty() {
            if gen.masks.is_empty() {
                return Err(Error::MissingToken { token: "[MASK]", needed_by: "fill" });
            }
            return Err(Error::NoMask(text.chars().take(80).collect()));
        }
        let ids = orig.clone();
        Ok(Self { orig, blanks, final_gmask, ids, out: String::new(), prev: 0, added: 0, spans: Vec::new() })
    }

    /// Blanks in all (the final [gMASK] included).
    pub fn len(&self) -> usize {
        self.blanks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blanks.is_empty()
    }

    /// The next blank: its index in the text as given, and where it sits in the context now that
    /// the blanks before it are spans. None when all are filled.
    fn next(&self) -> Option<(usize, usize)> {
        let n = self.spans.len();
        self.blanks.get(n).map(|&m| (m, m + self.added - n))
    }

    /// The next blank to fill: the row context and where the blank is; None when all are filled.
    pub fn next_blank(&self) -> Option<(&[u32], Blank)> {
        let (_, at) = self.next()?;
        let last = self.spans.len() + 1 == self.blanks.len();
        let blank = if self.final_gmask && last { Blank::Gmask } else { Blank::Mask { at } };
        Some((&self.ids, blank))
    }

    /// The context left of the next blank (what its span's text follows).
    pub fn left_of_next(&self) -> &[u32] {
        &self.ids[..self.next().map_or(self.ids.len(), |(_, at)| at)]
    }

    /// Records the next blank's span and splices it into the context.
    pub fn filled(&mut self, gen: &Generator, tokens: Vec<u32>, stop: StopReason) -> Result<()> {
        let Some((m, at)) = self.next() else {
            return Err(Error::Input("every blank is already filled".into()));
        };
        self.out += &gen.tok.decode(&self.orig[self.prev..m])?;
        let text = gen.continuation(&self.ids[..at], &tokens)?;
        let start = self.out.len();
        self.out += &text;
        self.ids.splice(at..at + 1, tokens.iter().copied());
        self.added += tokens.len();
        self.prev = m + 1;
        self.spans.push(Span { tokens, text, stop, start });
        Ok(())
    }

    /// Tokens of the text as given (blanks included).
    pub fn text_tokens(&self) -> usize {
        self.orig.len()
    }

    /// The text with every blank replaced by its span (the plan is spent).
    pub fn finish(&mut self, gen: &Generator) -> Result<Generation> {
        if self.spans.len() < self.blanks.len() {
            return Err(Error::Input(format!("{} of {} blanks filled", self.spans.len(), self.blanks.len())));
        }
        self.out += &gen.tok.decode(&self.orig[self.prev..])?;
        self.prev = self.orig.len();
        Ok(Generation::new(std::mem::take(&mut self.out), std::mem::take(&mut self.spans)))
    }
}

/// How a conversation becomes one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChatTemplate {
    /// `问：question\n答：answer\n` per turn, ending with an open `答：` for the reply; system text
    /// first, on its own line (the models trained here).
    #[default]
    Glm,
    /// ChatGLM-6B's own (its `modeling_chatglm.py` `chat()`): a lone question as it is; with
    /// history, `[Round i]\n问：q\n答：a\n` per earlier turn and `[Round n]\n问：q\n答：` for the
    /// last. ChatGLM-6B has no system role: system text goes first, on its own line.
    ChatGlm,
}

impl ChatTemplate {
    /// ChatGLM-6B's template for its own tokenizer, ours otherwise.
    pub fn for_tokenizer(tok: &Tokenizer) -> Self {
        if tok.chatglm().is_some() {
            Self::ChatGlm
        } else {
            Self::Glm
        }
    }

    /// The prompt for `(role, content)` messages (roles: system, user, assistant).
    pub fn prompt<'s>(self, messages: impl IntoIterator<Item = (&'s str, &'s str)>) -> String {
        match self {
            Self::Glm => chat_prompt(messages),
            Self::ChatGlm => {
                let mut system = String::new();
                // (question, answer) rounds; an answer without a question gets an empty one.
                let mut rounds: Vec<(&str, Option<&str>)> = Vec::new();
                for (role, content) in messages {
                    match role {
                        "system" => {
                            system.push_str(content.trim());
                            system.push('\n');
                        }
                        "assistant" => match rounds.last_mut() {
                            Some((_, a @ None)) => *a = Some(content.trim()),
                            _ => rounds.push(("", Some(content.trim()))),
                        },
                        _ => rounds.push((content.trim(), None)),
                    }
                }
                if let [(q, None)] = rounds.as_slice() {
                    return system + q;
                }
                let mut out = system;
                let last = rounds.len().saturating_sub(1);
                for (i, (q, a)) in rounds.iter().enumerate() {
                    out.push_str(&format!("[Round {i}]\n问：{q}\n答："));
                    if let Some(a) = a {
                        out.push_str(a);
                        // A conversation ending with an answer continues that answer.
                        if i < last {
                            out.push('\n');
                        }
                    }
                }
                out
            }
        }
    }
}

/// A conversation as one prompt in the `问：... 答：` turn format ([`ChatTemplate::Glm`]):
/// `问：question\n答：answer\n` per turn, ending with an open `答：` for the reply; system text
/// first, on its own line. Generation stops at [`CHAT_STOP`] (the model starting the next question
/// itself).
pub fn chat_prompt<'s>(messages: impl IntoIterator<Item = (&'s str, &'s str)>) -> String {
    let mut out = String::new();
    for (role, content) in messages {
        match role {
            "system" | "assistant" => {
                out.push_str(content.trim());
                out.push('\n');
            }
            _ => {
                out.push_str("问：");
                out.push_str(content.trim());
                out.push_str("\n答：");
            }
        }
    }
    out
}

/// Where a chat reply ends: the model beginning the next question.
pub const CHAT_STOP: &str = "\n问：";
