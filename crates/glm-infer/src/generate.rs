//! Text in, text out: [gMASK] continuation and [MASK] blank filling (spec section 2).

use glm_model::Glm;
use glm_tokenizer::Tokenizer;

use crate::decode::{Blank, Decoder};
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
        Ok(Self { model, tok, sop, eop, eod: s.eod, gmask: s.gmask, masks, sampleable, invalid })
    }

    /// The prompt's ids and the row context `prompt [gMASK]` of a left-to-right continuation.
    fn gmask_context(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>)> {
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
        Ok(Generation::new(format!("{prompt}{text}"), vec![Span { tokens, text, stop }]))
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
        let mut stream = TextStream::new(self.tok, &ids);
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
        Ok(Generation::new(format!("{prompt}{text}"), vec![Span { tokens, text, stop }]))
    }

    /// Left-to-right continuation by beam search (GLM's BeamSearchStrategy, see `beam`): the best
    /// hypothesis.
    pub fn complete_beam(&self, prompt: &str, cfg: &crate::BeamConfig) -> Result<Generation> {
        let (ids, context) = self.gmask_context(prompt)?;
        let (tokens, stop) = self.beam_block(&context, Blank::Gmask, cfg)?;
        let text = self.continuation(&ids, &tokens)?;
        Ok(Generation::new(format!("{prompt}{text}"), vec![Span { tokens, text, stop }]))
    }

    /// The best block after `context <sop>` by beam search, end token not included.
    pub fn beam_block(&self, context: &[u32], blank: Blank, cfg: &crate::BeamConfig) -> Result<(Vec<u32>, StopReason)> {
        let mut dec = Decoder::new(self.model, context, blank)?;
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
        if self.masks.is_empty() {
            return Err(Error::MissingToken { token: "[MASK]", needed_by: "fill" });
        }
        let orig = self.tok.encode(text);
        if orig.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let blanks: Vec<usize> = (0..orig.len()).filter(|&i| self.masks.contains(&orig[i])).collect();
        if blanks.is_empty() {
            let shown: String = text.chars().take(80).collect();
            return Err(Error::NoMask(shown));
        }
        let (mut ids, mut out, mut spans) = (orig.clone(), String::new(), Vec::with_capacity(blanks.len()));
        let (mut prev, mut added) = (0, 0); // original index after the last blank; span tokens spliced in
        for (n, &m) in blanks.iter().enumerate() {
            out += &self.tok.decode(&orig[prev..m])?;
            let at = m + added - n; // where blank n sits now that the blanks before it are spans
            let (tokens, stop) = block(&ids, Blank::Mask { at })?;
            let span_text = self.continuation(&ids[..at], &tokens)?;
            out += &span_text;
            ids.splice(at..at + 1, tokens.iter().copied());
            added += tokens.len();
            prev = m + 1;
            spans.push(Span { tokens, text: span_text, stop });
        }
        out += &self.tok.decode(&orig[prev..])?;
        Ok(Generation::new(out, spans))
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
        let mut dec = Decoder::new(self.model, context, blank)?;
        let mut out = Vec::new();
        if max_new == 0 {
            return Ok((out, StopReason::MaxNewTokens));
        }
        let mut logits = dec.feed(&[self.sop])?;
        loop {
            logits.truncate(self.sampleable);
            for &id in &self.invalid {
                if let Some(x) = logits.get_mut(id as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
            if out.len() < sampler.config().min_new_tokens {
                for id in std::iter::once(self.eop).chain(self.eod) {
                    if let Some(x) = logits.get_mut(id as usize) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let tok = sampler.sample(&logits)?;
            if tok == self.eop {
                return Ok((out, StopReason::Eop));
            }
            if Some(tok) == self.eod {
                return Ok((out, StopReason::Eod));
            }
            out.push(tok);
            if !go(&out) {
                return Ok((out, StopReason::StopString));
            }
            if out.len() >= max_new {
                return Ok((out, StopReason::MaxNewTokens));
            }
            if dec.room() == 0 {
                return Ok((out, StopReason::MaxSeqLen));
            }
            logits = dec.feed(&[tok])?;
        }
    }

    /// `generated` as the tokenizer writes it after `left` (a leading space of its first token shows).
    fn continuation(&self, left: &[u32], generated: &[u32]) -> Result<String> {
        let before = self.tok.decode(left)?;
        let joined: Vec<u32> = left.iter().chain(generated).copied().collect();
        let all = self.tok.decode(&joined)?;
        match all.strip_prefix(before.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => Ok(self.tok.decode(generated)?),
        }
    }
}

/// Incremental detokenization: the text of the tokens so far (after a left context, so a leading
/// space shows), released only up to the last complete character, and cut at a stop string.
pub struct TextStream<'t> {
    tok: &'t Tokenizer,
    left: Vec<u32>,
    /// The text released so far.
    pub text: String,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t Tokenizer, left: &[u32]) -> Self {
        Self { tok, left: left.to_vec(), text: String::new() }
    }

    /// With `generated` the whole block so far: (new text to show, whether a stop string ended it).
    /// `last` releases a trailing incomplete character too.
    pub fn push(&mut self, generated: &[u32], stops: &[String], last: bool) -> Result<(String, bool)> {
        let before = self.tok.decode(&self.left)?;
        let joined: Vec<u32> = self.left.iter().chain(generated).copied().collect();
        let all = self.tok.decode(&joined)?;
        let mut full = all.strip_prefix(before.as_str()).map(str::to_string).unwrap_or(self.tok.decode(generated)?);
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
