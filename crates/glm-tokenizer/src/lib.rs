//! GLM's bilingual tokenizer.
//!
//! A SentencePiece-style unigram model with byte fallback, plus GLM's conventions on top
//! (spec section 9): special tokens (`[MASK]`, `[gMASK]`, `[sMASK]`, `<eod>`, `<sop>`, `<eop>`) are
//! matched in the raw text and split it into segments that are encoded separately, each with SentencePiece's
//! dummy "▁" prefix; icetk's marks replace "\n" (`<n>`), "\t" (`<|tab|>`) and runs of 2..80 spaces
//! (`<|blank_k|>`, longest first).
//!
//! Three sources of models:
//! * tokenizers trained here (`train`), saved as a Hugging Face `tokenizer.json`. They normalize
//!   nothing, so every UTF-8 string round-trips exactly (a literal "▁" is byte-encoded).
//! * SentencePiece `.model` files (the format of `ice_text.model`), read with their NFKC charsmap,
//!   whitespace rules and user-defined symbols; `encode_sp` gives the ids of Python sentencepiece.
//! * ChatGLM-6B's tokenizer (`Tokenizer::from_chatglm_dir`, `from_chatglm`): `ice_text.model`
//!   under the rules of THUDM/chatglm-6b's `tokenization_chatglm.py` (transformers 4.27.1), so
//!   `encode` gives the official `encode(text, add_special_tokens=False)` and `decode` the
//!   official `decode` (fixtures/chatglm-tokenizer, checked line by line).
//!
//! # ChatGLM-6B's two vocabulary layouts
//!
//! `tokenizer_config.json` selects the layout ([`ChatGlmLayout`]):
//!
//! | | pre-2023-04 (`Icetk`) | v1.1 (`V1_1`, 2023-04-06 on) |
//! |---|---|---|
//! | config | no `num_image_tokens` | `"num_image_tokens": 0` |
//! | ice_text.model | icetk's plain text model (130,000 pieces) | the same + the appended pieces (130,344) |
//! | appended in code | `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>` (control), `<\|tab\|>`, `<\|blank_2..80\|>` (user-defined), `<0x00>..<0xFF>` (byte), byte fallback on | nothing |
//! | ids | text id + 20,000 (icetk's image tokens): `[MASK]` 150000, `[gMASK]` 150001, `<sop>` 150004, `<eop>` 150005, `<pad>` 20003 | text id: `[MASK]` 130000, `[gMASK]` 130001, `<sop>` 130004, `<eop>` 130005, `<pad>` 3 |
//! | `eos_token` | `</s>` | `<eop>` |
//! | model input (`ChatGlm::build_inputs`) | `text [gMASK] <sop>`; with a `[MASK]`/`[gMASK]` in the text: `text </s> <sop>`, or `text <sop>` when it ends with one | always `text [gMASK] <sop>` |
//! | decode | sentencepiece + icetk marks | the same, then Hugging Face's `clean_up_tokenization` (`" ,"` -> `","`, `" n't"` -> `"n't"`, ...) |
//!
//! Here the 20,000 image ids are placeholder pieces `<image_i>` (kind `Unused`) in front of the
//! text pieces, so every id is an index into `pieces()`; decoding drops them (old layout).
//! Common to both: Hugging Face cuts the text at the special tokens of the config (`<sop>`,
//! `<eop>` or `</s>`, `<unk>`, `<pad>`, `[MASK]`) and strips whitespace (Python's `str.isspace`)
//! on both sides of each; `[gMASK]` and `[sMASK]` written in text are *not* special and encode as
//! characters, so a generator appends them itself (`specials()` has their ids, `eod` =
//! `<unused_0>`). Each piece of text is then preprocessed (`\n` -> `<n>`, `\t` -> `<|tab|>`,
//! runs of 80..2 spaces -> `<|blank_k|>`) and encoded by sentencepiece with its own dummy prefix.
//! Decoding drops pad ids and control pieces, reads byte pieces as UTF-8 (one U+FFFD per invalid
//! byte) and writes `<n>`, `<|tab|>` and `<|blank_k|>` back as characters, wherever they appear in
//! the decoded string. `token_bytes` gives each id's text in the middle of a sequence (marks as
//! characters, controls empty), so the token texts join to the decoded text up to the leading
//! dummy-prefix space and the v1.1 clean-up.

mod chatglm;
mod codec;
mod hf;
mod normalize;
pub mod sp;
mod train;
mod unigram;

use std::collections::HashMap;
use std::path::Path;

pub use chatglm::{ChatGlm, ChatGlmLayout, CHATGLM_SPECIALS, ICETK_IMAGE_TOKENS};
pub use normalize::{CharsMap, Normalizer, SPACE};
pub use train::{train, TrainOptions, TrainReport};
use unigram::{Lattice, Trie};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{0}")]
    Format(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Train(String),
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// SentencePiece piece types (ModelProto.SentencePiece.Type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

/// GLM's special tokens (spec section 2), by id, where the vocabulary has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Specials {
    pub mask: Option<u32>,
    pub gmask: Option<u32>,
    pub smask: Option<u32>,
    pub eod: Option<u32>,
    pub sop: Option<u32>,
    pub eop: Option<u32>,
}

/// Names of the special tokens in vocabularies made here; `eod` also appears as `<unused_0>`.
pub const SPECIAL_NAMES: [&str; 6] = ["[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>"];
pub const NEWLINE: &str = "<n>";
pub const TAB: &str = "<|tab|>";
pub const MAX_BLANK: usize = 80;

pub fn blank_name(k: usize) -> String {
    format!("<|blank_{k}|>")
}

pub fn byte_name(b: u8) -> String {
    format!("<0x{b:02X}>")
}

/// How a piece is written back as text.
#[derive(Debug, Clone)]
enum Surface {
    /// Text with "▁" already turned into spaces; `lead` = it started with "▁".
    Text {
        text: String,
        lead: bool,
    },
    Byte(u8),
    /// Specials: written verbatim, and they start a new segment.
    Special(String),
    /// icetk marks ("\n", "\t", spaces) and other verbatim pieces.
    Literal(String),
    /// Control and unused pieces write nothing.
    Empty,
    Unknown,
}

/// icetk's marks, by id.
#[derive(Debug, Clone)]
struct Ice {
    newline: u32,
    tab: u32,
    /// blank[k - 2] = `<|blank_k|>`.
    blank: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceKind,
}

/// A loaded tokenizer. Cheap to share across threads (`&self` everywhere).
pub struct Tokenizer {
    pieces: Vec<Piece>,
    surfaces: Vec<Surface>,
    ids: HashMap<String, u32>,
    trie: Trie,
    lattice_scores: Vec<f32>,
    unk_id: u32,
    unk_score: f32,
    bytes: Option<Box<[u32; 256]>>,
    normalizer: Normalizer,
    /// User-defined symbols protected from normalization (SentencePiece models), longest first.
    user_symbols: Vec<String>,
    /// Specials matched in raw text, longest first.
    special_strings: Vec<(String, u32)>,
    specials: Specials,
    ice: Option<Ice>,
    /// Trained here: icetk marks are structural (a literal "<n>" in text stays text) and a literal
    /// "▁" is byte-encoded, so decode(encode(s)) == s for every s.
    lossless: bool,
    /// ChatGLM-6B's official tokenizer code (`from_chatglm*`): its encode and decode rules.
    chatglm: Option<ChatGlm>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("pieces", &self.pieces.len())
            .field("specials", &self.specials)
            .field("lossless", &self.lossless)
            .field("chatglm", &self.chatglm.as_ref().map(|c| (c.layout(), c.image_tokens())))
            .finish()
    }
}

/// The default tokenizer (8,192 ids, specials at 8128..8133 like the `tiny` preset), trained by
/// `glm tokenizer train` on the embedded corpus (assets/tokenizer/README.md).
pub const DEFAULT_TOKENIZER_JSON: &str = include_str!("../../../assets/tokenizer/tokenizer.json");

impl Tokenizer {
    /// The embedded default tokenizer.
    pub fn default_glm() -> Result<Self> {
        Self::from_json_str(DEFAULT_TOKENIZER_JSON, "embedded default tokenizer")
    }

    /// Loads `tokenizer.json` (made by `train`) or a SentencePiece `.model`, by content.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|e| TokenizerError::Io { path: path.display().to_string(), source: e })?;
        let name = path.display().to_string();
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(TokenizerError::Format(format!(
                "{name}: empty file (a tokenizer.json or a SentencePiece .model)"
            )));
        }
        if bytes.first() == Some(&b'{') {
            let s = std::str::from_utf8(&bytes)
                .map_err(|e| TokenizerError::Format(format!("{name}: not UTF-8 JSON: {e}")))?;
            Self::from_json_str(s, &name)
        } else {
            Self::from_sp_bytes(&bytes).map_err(|e| TokenizerError::Format(format!("{name}: {e}")))
        }
    }

    pub fn from_json_str(json: &str, name: &str) -> Result<Self> {
        hf::from_json(json).map_err(|e| TokenizerError::Format(format!("{name}: {e}")))
    }

    /// A SentencePiece unigram `.model`. icetk marks are used when the model has `<n>`.
    pub fn from_sp_bytes(bytes: &[u8]) -> Result<Self> {
        let m = sp::SpModel::from_bytes(bytes)?;
        let normalizer = chatglm::normalizer_of(&m)?;
        let pieces = m.pieces.into_iter().map(|p| Piece { text: p.piece, score: p.score, kind: p.kind }).collect();
        Self::build(pieces, normalizer, false)
    }

    /// Assembles a tokenizer from its pieces (index = id).
    pub(crate) fn build(pieces: Vec<Piece>, normalizer: Normalizer, lossless: bool) -> Result<Self> {
        let mut ids = HashMap::with_capacity(pieces.len());
        for (i, p) in pieces.iter().enumerate() {
            ids.entry(p.text.clone()).or_insert(i as u32);
        }
        let unk_id = pieces
            .iter()
            .position(|p| p.kind == PieceKind::Unknown)
            .ok_or_else(|| TokenizerError::Format("the vocabulary has no <unk> piece".into()))?
            as u32;
        let normal = pieces.iter().filter(|p| p.kind == PieceKind::Normal).map(|p| p.score);
        let (min_score, max_score) =
            normal.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), s| (lo.min(s), hi.max(s)));
        if !min_score.is_finite() {
            return Err(TokenizerError::Format("the vocabulary has no normal pieces".into()));
        }
        let id_of = |name: &str| ids.get(name).copied();
        let specials = Specials {
            mask: id_of("[MASK]"),
            gmask: id_of("[gMASK]"),
            smask: id_of("[sMASK]"),
            eod: id_of("<eod>").or_else(|| id_of("<unused_0>")),
            sop: id_of("<sop>"),
            eop: id_of("<eop>"),
        };
        let ice = match (id_of(NEWLINE), id_of(TAB)) {
            (Some(newline), Some(tab)) => {
                let blank: Option<Vec<u32>> = (2..=MAX_BLANK).map(|k| id_of(&blank_name(k))).collect();
                // Without blank pieces, space runs stay spaces (SentencePiece models without them).
                Some(Ice { newline, tab, blank: blank.unwrap_or_default() })
            }
            _ => None,
        };
        let special_ids: Vec<u32> =
            [specials.mask, specials.gmask, specials.smask, specials.eod, specials.sop, specials.eop]
                .into_iter()
                .flatten()
                .collect();

        let mut bytes = Box::new([u32::MAX; 256]);
        for b in 0..=255u8 {
            if let Some(id) = id_of(&byte_name(b)).filter(|&id| pieces[id as usize].kind == PieceKind::Byte) {
                bytes[b as usize] = id;
            }
        }
        let bytes = bytes.iter().all(|&id| id != u32::MAX).then_some(bytes);

        // Lattice scores; user-defined symbols are boosted as sentencepiece does (`in_lattice`).
        let lattice_scores: Vec<f32> = pieces
            .iter()
            .map(|p| {
                if p.kind == PieceKind::UserDefined {
                    (p.text.len() as f64 * max_score as f64 - 0.1) as f32
                } else {
                    p.score
                }
            })
            .collect();
        let trie = Trie::build(
            pieces
                .iter()
                .enumerate()
                .filter(|(_, p)| in_lattice(p.kind, lossless))
                .map(|(i, p)| (p.text.as_str(), i as u32)),
        );
        let mut user_symbols: Vec<String> = if lossless {
            Vec::new()
        } else {
            pieces.iter().filter(|p| p.kind == PieceKind::UserDefined).map(|p| p.text.clone()).collect()
        };
        user_symbols.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut special_strings: Vec<(String, u32)> =
            special_ids.iter().map(|&id| (pieces[id as usize].text.clone(), id)).collect();
        special_strings.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));

        let surfaces = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let id = i as u32;
                if special_ids.contains(&id) {
                    return Surface::Special(p.text.clone());
                }
                if let Some(ice) = &ice {
                    if id == ice.newline {
                        return Surface::Literal("\n".into());
                    }
                    if id == ice.tab {
                        return Surface::Literal("\t".into());
                    }
                    if let Some(k) = ice.blank.iter().position(|&b| b == id) {
                        return Surface::Literal(" ".repeat(k + 2));
                    }
                }
                match p.kind {
                    PieceKind::Byte => {
                        bytes.as_ref().and_then(|_| parse_byte_name(&p.text)).map_or(Surface::Empty, Surface::Byte)
                    }
                    PieceKind::Unknown => Surface::Unknown,
                    PieceKind::Control | PieceKind::Unused => Surface::Empty,
                    PieceKind::UserDefined => Surface::Literal(p.text.clone()),
                    PieceKind::Normal => {
                        Surface::Text { text: p.text.replace(SPACE, " "), lead: p.text.starts_with(SPACE) }
                    }
                }
            })
            .collect();
        Ok(Self {
            pieces,
            surfaces,
            ids,
            trie,
            lattice_scores,
            unk_id,
            unk_score: min_score - 10.0,
            bytes,
            normalizer,
            user_symbols,
            special_strings,
            specials,
            ice,
            lossless,
            chatglm: None,
        })
    }

    fn lattice(&self) -> Lattice<'_> {
        Lattice {
            trie: &self.trie,
            scores: &self.lattice_scores,
            unk_id: self.unk_id,
            unk_score: self.unk_score,
            bytes: self.bytes.as_deref(),
        }
    }

    pub fn specials(&self) -> Specials {
        self.specials
    }

    /// Number of ids the model must have (tokenizers trained here pad to the full vocabulary).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.text.as_str())
    }

    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    pub fn is_lossless(&self) -> bool {
        self.lossless
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// Saves as a Hugging Face `tokenizer.json` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = hf::to_json(self)?;
        glm_checkpoint::write_atomic(path, json.as_bytes())
            .map_err(|e| TokenizerError::Io { path: path.display().to_string(), source: e })
    }

    /// Slow twin of the lattice, on the `tokenizers` crate's Unigram (for tests and checks).
    pub fn reference(&self) -> Result<RefSegmenter<'_>> {
        let eligible: Vec<u32> = (0..self.pieces.len() as u32)
            .filter(|&i| in_lattice(self.pieces[i as usize].kind, self.lossless))
            .collect();
        let mut vocab: Vec<(String, f64)> = vec![("\u{0}<unk>".into(), 0.0)];
        vocab.extend(
            eligible.iter().map(|&i| (self.pieces[i as usize].text.clone(), self.lattice_scores[i as usize] as f64)),
        );
        let model = tokenizers::models::unigram::Unigram::from(vocab, Some(0), false)
            .map_err(|e| TokenizerError::Format(format!("reference unigram: {e}")))?;
        Ok(RefSegmenter { tok: self, model, eligible })
    }

    /// The lattice over already-normalized text (for tests against `reference`).
    pub fn segment(&self, normalized: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.lattice().segment(normalized, &mut out);
        out
    }
}

/// The `tokenizers` crate's Unigram over the same pieces: the `_ref` twin of the lattice.
pub struct RefSegmenter<'a> {
    tok: &'a Tokenizer,
    model: tokenizers::models::unigram::Unigram,
    eligible: Vec<u32>,
}

impl RefSegmenter<'_> {
    /// Ids for already-normalized text (unknown characters as bytes).
    pub fn segment(&self, normalized: &str) -> Result<Vec<u32>> {
        use tokenizers::Model;
        let toks =
            self.model.tokenize(normalized).map_err(|e| TokenizerError::Format(format!("reference unigram: {e}")))?;
        let mut out = Vec::new();
        for t in toks {
            if t.id == 0 {
                match &self.tok.bytes {
                    Some(b) => out.extend(t.value.bytes().map(|x| b[x as usize])),
                    None => out.extend(t.value.chars().map(|_| self.tok.unk_id)),
                }
            } else {
                out.push(self.eligible[t.id as usize - 1]);
            }
        }
        Ok(out)
    }
}

/// Pieces the lattice may choose: normal pieces and, in SentencePiece models, user-defined
/// symbols (which sentencepiece scores as length * max_score - 0.1 so that they always win).
fn in_lattice(kind: PieceKind, lossless: bool) -> bool {
    match kind {
        PieceKind::Normal => true,
        PieceKind::UserDefined => !lossless,
        _ => false,
    }
}

pub(crate) fn parse_byte_name(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}
