//! Trains a bilingual unigram tokenizer with the `tokenizers` crate's `UnigramTrainer`, in the
//! layout of GLM's icetk text model: reserved pieces first (<unk>, <s>, </s>, <pad>, <n>,
//! <|tab|>, <|blank_2..80|>, the 256 byte-fallback pieces), then the learned pieces, then 64 ids at
//! the top of the vocabulary: GLM's six specials and reserved ids (the `tiny`..`1b` presets'
//! layout, specials at vocab_size - 64).
//!
//! Words are cut like sentencepiece's trainer: at whitespace (a word starts with "▁"), at icetk
//! marks and where the Unicode script changes (Han / kana / Hangul / Latin letters / digits /
//! other), so pieces never straddle "的a". Characters outside `character_coverage` of the
//! corpus are left to byte fallback.

use std::collections::HashMap;

use rayon::prelude::*;
use tokenizers::models::unigram::{Unigram, UnigramTrainer};

use crate::{
    blank_name, byte_name, Normalizer, Piece, PieceKind, Result, Tokenizer, TokenizerError, MAX_BLANK, NEWLINE, SPACE,
    SPECIAL_NAMES, TAB,
};

/// Ids reserved at the top of the vocabulary: the specials, then unused ids.
pub const TOP_RESERVED: usize = 64;

#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Total ids, reserved ones included (8192 for `tiny`).
    pub vocab_size: usize,
    pub max_piece_length: usize,
    /// Share of character occurrences that get their own piece (sentencepiece's default 0.9995),
    /// lowered where characters would take more than half of the learned ids.
    pub character_coverage: f64,
    pub show_progress: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { vocab_size: 8192, max_piece_length: 16, character_coverage: 0.9995, show_progress: true }
    }
}

#[derive(Debug, Clone)]
pub struct TrainReport {
    pub input_bytes: usize,
    pub distinct_words: usize,
    pub characters_kept: usize,
    pub characters_dropped: usize,
    /// Share of character occurrences with their own piece.
    pub effective_coverage: f64,
    pub learned_pieces: usize,
}

/// Pieces below the learned ones.
pub fn bottom_pieces() -> Vec<Piece> {
    let mut p = vec![
        Piece { text: "<unk>".into(), score: 0.0, kind: PieceKind::Unknown },
        Piece { text: "<s>".into(), score: 0.0, kind: PieceKind::Control },
        Piece { text: "</s>".into(), score: 0.0, kind: PieceKind::Control },
        Piece { text: "<pad>".into(), score: 0.0, kind: PieceKind::Control },
        Piece { text: NEWLINE.into(), score: 0.0, kind: PieceKind::UserDefined },
        Piece { text: TAB.into(), score: 0.0, kind: PieceKind::UserDefined },
    ];
    p.extend((2..=MAX_BLANK).map(|k| Piece { text: blank_name(k), score: 0.0, kind: PieceKind::UserDefined }));
    p.extend((0..=255u8).map(|b| Piece { text: byte_name(b), score: 0.0, kind: PieceKind::Byte }));
    p
}

/// The 64 pieces at the top: specials then `<|reserved_k|>`.
pub fn top_pieces() -> Vec<Piece> {
    let mut p: Vec<Piece> =
        SPECIAL_NAMES.iter().map(|s| Piece { text: s.to_string(), score: 0.0, kind: PieceKind::Control }).collect();
    p.extend((SPECIAL_NAMES.len()..TOP_RESERVED).map(|k| Piece {
        text: format!("<|reserved_{k}|>"),
        score: 0.0,
        kind: PieceKind::Unused,
    }));
    p
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Script {
    Han,
    Kana,
    Hangul,
    Letter,
    Digit,
    Other,
}

fn script(c: char) -> Script {
    match c as u32 {
        0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x3134F => Script::Han,
        0x3040..=0x30FF | 0x31F0..=0x31FF => Script::Kana,
        0xAC00..=0xD7AF | 0x1100..=0x11FF => Script::Hangul,
        _ if c.is_ascii_digit() => Script::Digit,
        _ if c.is_alphabetic() => Script::Letter,
        _ => Script::Other,
    }
}

/// Splits one document into training words (escaped with "▁"), as the encoder would see them:
/// a single space joins the next word as "▁"; newlines, tabs, runs of spaces and a literal "▁"
/// are icetk marks or bytes, so they end words.
fn words(doc: &str, out: &mut HashMap<String, u32>) {
    let mut word = String::new();
    let mut flush = |word: &mut String| {
        if !word.is_empty() {
            *out.entry(std::mem::take(word)).or_default() += 1;
        }
    };
    for line in doc.split('\n') {
        // Dummy prefix: a line starts like a space.
        let mut spaces = 1usize;
        let mut prev: Option<Script> = None;
        for c in line.chars() {
            if c == ' ' {
                spaces += 1;
                continue;
            }
            if c == '\t' || c == SPACE {
                flush(&mut word);
                spaces = 0;
                prev = None;
                continue;
            }
            let s = script(c);
            if spaces > 0 || prev.is_some_and(|p| p != s || s == Script::Other) {
                flush(&mut word);
            }
            if spaces == 1 {
                word.push(SPACE);
            }
            spaces = 0;
            word.push(c);
            prev = Some(s);
        }
        flush(&mut word);
    }
}

/// Trains on `docs` (UTF-8 documents).
pub fn train(docs: &[String], opts: &TrainOptions) -> Result<(Tokenizer, TrainReport)> {
    let bottom = bottom_pieces();
    let top = top_pieces();
    let budget = opts.vocab_size.checked_sub(bottom.len() + top.len()).filter(|&b| b >= 256).ok_or_else(|| {
        TokenizerError::Train(format!(
            "vocab size {} is too small: {} ids are reserved, at least 256 must be learned",
            opts.vocab_size,
            bottom.len() + top.len()
        ))
    })?;
    if !(0.5..=1.0).contains(&opts.character_coverage) {
        return Err(TokenizerError::Train(format!(
            "character coverage {} must be in [0.5, 1]",
            opts.character_coverage
        )));
    }

    let input_bytes = docs.iter().map(String::len).sum();
    let counts = docs
        .par_iter()
        .fold(HashMap::new, |mut m, d| {
            words(d, &mut m);
            m
        })
        .reduce(HashMap::new, |mut a, b| {
            for (k, v) in b {
                *a.entry(k).or_default() += v;
            }
            a
        });

    // Character coverage: keep the most frequent characters up to the coverage share.
    let mut chars: HashMap<char, u64> = HashMap::new();
    for (w, &n) in &counts {
        for c in w.chars() {
            *chars.entry(c).or_default() += n as u64;
        }
    }
    let total: u64 = chars.values().sum();
    let mut by_freq: Vec<(char, u64)> = chars.into_iter().collect();
    by_freq.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    // At most half of the learned ids go to single characters: with many CJK characters the
    // coverage is lowered (reported as `effective_coverage`).
    let max_chars = budget / 2;
    let mut kept = std::collections::HashSet::new();
    let mut acc = 0u64;
    for &(c, n) in &by_freq {
        let covered = (acc as f64) >= opts.character_coverage * total as f64;
        if (covered || kept.len() >= max_chars) && c != SPACE {
            break;
        }
        acc += n;
        kept.insert(c);
    }
    let effective_coverage = acc as f64 / total.max(1) as f64;

    // Cut words at dropped characters; sort for a deterministic input order.
    let mut sentences: HashMap<String, u32> = HashMap::new();
    for (w, n) in counts {
        for part in w.split(|c| !kept.contains(&c)).filter(|p| !p.is_empty()) {
            *sentences.entry(part.to_string()).or_default() += n;
        }
    }
    let mut sentences: Vec<(String, u32)> = sentences.into_iter().collect();
    sentences.sort_unstable();
    let distinct_words = sentences.len();

    let trainer = UnigramTrainer::builder()
        .vocab_size((budget + 1) as u32)
        .max_piece_length(opts.max_piece_length)
        .show_progress(opts.show_progress)
        .unk_token(Some("<unk>".into()))
        .build()
        .map_err(|e| TokenizerError::Train(format!("trainer settings: {e}")))?;
    let mut model = Unigram::default();
    trainer
        .do_train(sentences, &mut model)
        .map_err(|e| TokenizerError::Train(format!("unigram training failed: {e}")))?;

    let mut learned: Vec<(String, f64)> = model.iter().filter(|(p, _)| p != "<unk>").cloned().collect();
    // The trainer adds required characters that EM dropped with scores min + k * 1e-4, k in hash-set
    // order; give them all the minimum so that the order below (score, then text) is fixed.
    let floor = learned.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let band = floor + 1e-4 * (kept.len() + 1) as f64;
    for (p, score) in learned.iter_mut() {
        if p.chars().count() == 1 && *score < band {
            *score = floor;
        }
    }
    // Fixed order independent of hash-map iteration inside the trainer.
    learned.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    learned.truncate(budget);
    let reserved: std::collections::HashSet<String> = bottom.iter().chain(&top).map(|p| p.text.clone()).collect();
    learned.retain(|(p, _)| !reserved.contains(p));
    let learned_pieces = learned.len();

    let mut pieces = bottom;
    pieces.extend(learned.into_iter().map(|(text, score)| Piece {
        text,
        score: score as f32,
        kind: PieceKind::Normal,
    }));
    // Pad unused learned ids so that the specials land at vocab_size - 64.
    let mut k = 0;
    while pieces.len() < opts.vocab_size - top.len() {
        pieces.push(Piece { text: format!("<|unused_{k}|>"), score: 0.0, kind: PieceKind::Unused });
        k += 1;
    }
    pieces.extend(top);
    if !pieces.iter().any(|p| p.text == SPACE.to_string()) {
        return Err(TokenizerError::Train("the training text has no spaces: \"▁\" was not learned".into()));
    }
    let tok = Tokenizer::build(pieces, Normalizer::lossless(), true)?;
    let report = TrainReport {
        input_bytes,
        distinct_words,
        characters_kept: kept.len(),
        characters_dropped: by_freq.len() - kept.len(),
        effective_coverage,
        learned_pieces,
    };
    Ok((tok, report))
}
