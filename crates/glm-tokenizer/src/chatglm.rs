//! ChatGLM-6B's tokenizer: THUDM/chatglm-6b's `tokenization_chatglm.py` (a Hugging Face slow
//! tokenizer, run under transformers 4.27.1) over `ice_text.model`, reproduced id for id.
//!
//! What the official code does, and where it is done here:
//! * The Hugging Face base class cuts the text at its special tokens (`bos_token`, `eos_token`,
//!   `unk_token`, `pad_token`, `mask_token` of tokenizer_config.json; leftmost, longest) and strips
//!   Python whitespace (`str.isspace`, which adds U+001C..U+001F to Unicode's White_Space) from
//!   the text on both sides of each: `a [MASK] b` -> `a`, `[MASK]`, `b`. `[gMASK]`, `[sMASK]`,
//!   `<unused_0>` and (v1.1) `</s>` / (old) `<eop>` are not among them: written in text they are
//!   plain characters.
//! * Each remaining piece of text: `\n` -> `<n>`, `\t` -> `<|tab|>`, runs of 80..2 spaces ->
//!   `<|blank_k|>`, then plain sentencepiece (normalizer, dummy prefix, user-defined symbols).
//! * Decoding: pad ids dropped (old layout: image ids too), sentencepiece's decode (control pieces
//!   write nothing, invalid byte sequences give one U+FFFD per byte), then `<n>`, `<|tab|>` and
//!   `<|blank_k|>` written back as characters; v1.1 decodes through the base class, whose
//!   `clean_up_tokenization` also turns " ." " ?" " !" " ," " ' " " n't" " 'm" " 's" " 've" " 're"
//!   into their unspaced forms.
//! * Image tokens: the pre-2023-04 code offsets every text id by 20,000 (icetk's image
//!   vocabulary); here those ids are placeholder pieces `<image_i>` in front, so an id is an index.

use std::path::Path;

use serde_json::Value;

use crate::sp::SpModel;
use crate::{
    blank_name, byte_name, parse_byte_name, CharsMap, Normalizer, Piece, PieceKind, Result, Tokenizer, TokenizerError,
    MAX_BLANK, NEWLINE, SPACE, TAB,
};

/// The eight pieces ChatGLM adds after the text pieces, in id order (`[MASK]` = 130000 in v1.1).
pub const CHATGLM_SPECIALS: [&str; 8] =
    ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"];

/// icetk's image vocabulary in front of the text ids in the pre-2023-04 layout.
pub const ICETK_IMAGE_TOKENS: u32 = 20_000;

/// Largest `num_image_tokens` accepted (each is a placeholder piece).
const MAX_IMAGE_TOKENS: u64 = 1 << 20;

/// Which official code a ChatGLM tokenizer follows; tokenizer_config.json tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatGlmLayout {
    /// No `num_image_tokens` in tokenizer_config.json: the code of March 2023 (icetk's
    /// TextTokenizer, last at commit 23ad39b). The specials, `<|tab|>`, `<|blank_2..80|>` and the
    /// byte pieces are appended to ice_text.model's pieces in code (unless the file already has
    /// them), ids are offset by 20,000 image tokens, `eos_token` is `</s>`, decoding skips the
    /// Hugging Face clean-up, and the model input is `text [gMASK] <sop>` only when the text has
    /// no `[MASK]`/`[gMASK]` (else `text </s> <sop>` unless it ends with one).
    Icetk,
    /// `num_image_tokens` present (0 in v1.1, from 2023-04-06 on; HEAD 8b7d335): ice_text.model
    /// holds the appended pieces, `eos_token` is `<eop>`, the model input is `text [gMASK] <sop>`.
    V1_1,
}

/// The ChatGLM specifics of a tokenizer loaded by `Tokenizer::from_chatglm*`.
#[derive(Debug, Clone)]
pub struct ChatGlm {
    layout: ChatGlmLayout,
    image_tokens: u32,
    /// Hugging Face's no-split special tokens with their ids, longest first.
    split: Vec<(String, u32)>,
    pad: Option<u32>,
    mask: u32,
    gmask: u32,
    bos: u32,
    eos: u32,
}

impl ChatGlm {
    pub fn layout(&self) -> ChatGlmLayout {
        self.layout
    }

    /// Ids in front of the text ids (20,000 in the old layout, 0 in v1.1).
    pub fn image_tokens(&self) -> u32 {
        self.image_tokens
    }

    /// The special tokens Hugging Face matches in text (each becomes one id), with their ids.
    pub fn split_tokens(&self) -> &[(String, u32)] {
        &self.split
    }

    /// `pad_token`'s id (dropped when decoding).
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// `bos_token`'s id (`<sop>`).
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// `eos_token`'s id: `<eop>` in v1.1, `</s>` in the old layout.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The official `build_inputs_with_special_tokens` for one text: what `tokenizer.encode(text)`
    /// gives from `encode(text, add_special_tokens=False)`.
    pub fn build_inputs(&self, ids: &[u32]) -> Vec<u32> {
        let mut out = ids.to_vec();
        match self.layout {
            ChatGlmLayout::V1_1 => out.extend([self.gmask, self.bos]),
            ChatGlmLayout::Icetk => {
                if !out.contains(&self.mask) && !out.contains(&self.gmask) {
                    out.push(self.gmask);
                }
                if out.last().is_some_and(|&l| l != self.mask && l != self.gmask) {
                    out.push(self.eos);
                }
                out.push(self.bos);
            }
        }
        out
    }
}

/// Token strings of tokenizer_config.json that the official code uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HfTokens {
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
    mask: Option<String>,
    sep: Option<String>,
    cls: Option<String>,
    gmask: Option<String>,
}

impl HfTokens {
    /// The `__init__` defaults of the layout's code (used for keys the config lacks).
    fn code_defaults(layout: ChatGlmLayout) -> Self {
        let s = |x: &str| Some(x.to_string());
        match layout {
            ChatGlmLayout::V1_1 => Self {
                bos: s("<sop>"),
                eos: s("<eop>"),
                unk: s("<unk>"),
                pad: s("<pad>"),
                mask: s("[MASK]"),
                sep: None,
                cls: None,
                gmask: s("[gMASK]"),
            },
            ChatGlmLayout::Icetk => Self {
                bos: s("sop"),
                eos: s("eos"),
                unk: None,
                pad: None,
                mask: s("[MASK]"),
                sep: None,
                cls: None,
                gmask: s("[gMASK]"),
            },
        }
    }

    /// The values of the official tokenizer_config.json of the layout.
    fn official(layout: ChatGlmLayout) -> Self {
        let s = |x: &str| Some(x.to_string());
        Self {
            bos: s("<sop>"),
            eos: s(if layout == ChatGlmLayout::V1_1 { "<eop>" } else { "</s>" }),
            unk: s("<unk>"),
            pad: s("<pad>"),
            mask: s("[MASK]"),
            sep: None,
            cls: None,
            gmask: s("[gMASK]"),
        }
    }
}

/// tokenizer_config.json, as far as it matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Config {
    num_image_tokens: Option<u32>,
    tokens: HfTokens,
}

fn parse_config(json: &str, name: &str) -> Result<Config> {
    let bad = |m: String| TokenizerError::Format(format!("{name}: {m}"));
    let doc: Value = serde_json::from_str(json)
        .map_err(|e| bad(format!("invalid JSON at line {} column {}: {e}", e.line(), e.column())))?;
    let obj = doc.as_object().ok_or_else(|| bad("is not a JSON object".into()))?;
    let num_image_tokens = match obj.get("num_image_tokens") {
        None => None,
        Some(v) => {
            let n = v.as_u64().filter(|&n| n <= MAX_IMAGE_TOKENS).ok_or_else(|| {
                bad(format!("num_image_tokens must be an integer from 0 to {MAX_IMAGE_TOKENS}, not {v}"))
            })?;
            Some(n as u32)
        }
    };
    let layout = if num_image_tokens.is_some() { ChatGlmLayout::V1_1 } else { ChatGlmLayout::Icetk };
    let mut tokens = HfTokens::code_defaults(layout);
    for (key, slot) in [
        ("bos_token", &mut tokens.bos),
        ("eos_token", &mut tokens.eos),
        ("unk_token", &mut tokens.unk),
        ("pad_token", &mut tokens.pad),
        ("mask_token", &mut tokens.mask),
        ("sep_token", &mut tokens.sep),
        ("cls_token", &mut tokens.cls),
        ("gmask_token", &mut tokens.gmask),
    ] {
        match obj.get(key) {
            None => {}
            Some(Value::Null) => *slot = None,
            Some(Value::String(s)) if !s.is_empty() => *slot = Some(s.clone()),
            Some(v) => return Err(bad(format!("{key} must be a non-empty string or null, not {v}"))),
        }
    }
    for key in ["do_lower_case", "remove_space"] {
        match obj.get(key) {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => {
                return Err(bad(format!("{key}: true is not supported (ChatGLM-6B ships false)")))
            }
            Some(v) => return Err(bad(format!("{key} must be true or false, not {v}"))),
        }
    }
    if let Some(v) = obj.get("additional_special_tokens").filter(|v| v.as_array().is_some_and(|a| !a.is_empty())) {
        return Err(bad(format!("additional_special_tokens ({v}) are not supported")));
    }
    Ok(Config { num_image_tokens, tokens })
}

/// The pieces `_configure_tokenizer` of the pre-2023-04 code appends (v1.1 files hold them).
fn appended_pieces() -> Vec<Piece> {
    let mut p: Vec<Piece> =
        CHATGLM_SPECIALS.iter().map(|s| Piece { text: s.to_string(), score: 0.0, kind: PieceKind::Control }).collect();
    p.push(Piece { text: TAB.into(), score: 0.0, kind: PieceKind::UserDefined });
    p.extend((2..=MAX_BLANK).map(|k| Piece { text: blank_name(k), score: 0.0, kind: PieceKind::UserDefined }));
    p.extend((0..=255u8).map(|b| Piece { text: byte_name(b), score: 0.0, kind: PieceKind::Byte }));
    p
}

/// Python's `str.isspace`: Unicode White_Space plus the separators U+001C..U+001F.
pub(crate) fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

impl Tokenizer {
    /// ChatGLM-6B's tokenizer from `ice_text.model`'s bytes, as with the official
    /// tokenizer_config.json of the layout that `num_image_tokens` selects: `None` (the key is
    /// absent) = the pre-2023-04 code with 20,000 image ids in front (`[gMASK]` = 150001 with the real
    /// model), `Some(n)` = the v1.1 code, `Some(0)` in the released v1.1 (`[gMASK]` = 130001).
    pub fn from_chatglm(model: &[u8], num_image_tokens: Option<u32>) -> Result<Self> {
        let layout = if num_image_tokens.is_some() { ChatGlmLayout::V1_1 } else { ChatGlmLayout::Icetk };
        if num_image_tokens.is_some_and(|n| n as u64 > MAX_IMAGE_TOKENS) {
            return Err(TokenizerError::Input(format!("num_image_tokens above {MAX_IMAGE_TOKENS}")));
        }
        let config = Config { num_image_tokens, tokens: HfTokens::official(layout) };
        Self::chatglm_from_config(model, &config)
    }

    /// ChatGLM-6B's tokenizer from a directory with `ice_text.model` and `tokenizer_config.json`
    /// (a Hugging Face checkout of THUDM/chatglm-6b). Without `num_image_tokens` in the config it
    /// is the pre-2023-04 layout, with it the v1.1 one (see `ChatGlmLayout`).
    pub fn from_chatglm_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| TokenizerError::Io { path: path.display().to_string(), source: e })
        };
        let config_path = dir.join("tokenizer_config.json");
        let config_name = config_path.display().to_string();
        let config_bytes = read("tokenizer_config.json")?;
        let json = std::str::from_utf8(&config_bytes)
            .map_err(|e| TokenizerError::Format(format!("{config_name}: not UTF-8: {e}")))?;
        let config = parse_config(json, &config_name)?;
        let model = read("ice_text.model")?;
        let model_name = dir.join("ice_text.model").display().to_string();
        Self::chatglm_from_config(&model, &config).map_err(|e| match e {
            TokenizerError::Format(m) => TokenizerError::Format(format!("{model_name}: {m}")),
            e => e,
        })
    }

    /// The ChatGLM specifics, for tokenizers loaded by `from_chatglm*`.
    pub fn chatglm(&self) -> Option<&ChatGlm> {
        self.chatglm.as_ref()
    }

    fn chatglm_from_config(model: &[u8], config: &Config) -> Result<Self> {
        let layout = if config.num_image_tokens.is_some() { ChatGlmLayout::V1_1 } else { ChatGlmLayout::Icetk };
        let image_tokens = config.num_image_tokens.unwrap_or(ICETK_IMAGE_TOKENS);
        let m = SpModel::from_bytes(model)?;
        let normalizer = normalizer_of(&m)?;
        let mut byte_fallback = m.byte_fallback;
        let mut text: Vec<Piece> =
            m.pieces.into_iter().map(|p| Piece { text: p.piece, score: p.score, kind: p.kind }).collect();
        let appended = appended_pieces();
        let names: std::collections::HashSet<&str> = text.iter().map(|p| p.text.as_str()).collect();
        let have: Vec<bool> = appended.iter().map(|a| names.contains(a.text.as_str())).collect();
        match layout {
            ChatGlmLayout::Icetk if have.iter().all(|&h| !h) => {
                // `_configure_tokenizer`: specials, tab and blanks, bytes; byte fallback on.
                text.extend(appended);
                byte_fallback = true;
            }
            _ => {
                if let Some(i) = have.iter().position(|&h| !h) {
                    let what = match layout {
                        ChatGlmLayout::V1_1 => {
                            "num_image_tokens in tokenizer_config.json means the v1.1 layout, \
                            whose ice_text.model holds ChatGLM's pieces"
                        }
                        ChatGlmLayout::Icetk => {
                            "the pre-2023-04 code appends ChatGLM's pieces to a model that has \
                            none of them, and this one has some"
                        }
                    };
                    return Err(TokenizerError::Format(format!(
                        "ice_text.model has no {:?} piece: {what}",
                        appended[i].text
                    )));
                }
            }
        }
        if !text.iter().any(|p| p.text == NEWLINE) {
            return Err(TokenizerError::Format("ice_text.model has no <n> piece (icetk's newline)".into()));
        }
        let mut pieces = Vec::with_capacity(image_tokens as usize + text.len());
        pieces.extend((0..image_tokens).map(|i| Piece {
            text: format!("<image_{i}>"),
            score: 0.0,
            kind: PieceKind::Unused,
        }));
        pieces.extend(text);
        let mut tok = Self::build(pieces, normalizer, false)?;
        if !byte_fallback {
            tok.bytes = None;
        }
        let id_of = |key: &str, token: &Option<String>| -> Result<Option<u32>> {
            let Some(t) = token else { return Ok(None) };
            match tok.ids.get(t) {
                Some(&id) if id >= image_tokens => Ok(Some(id)),
                _ => Err(TokenizerError::Format(format!(
                    "{key} {t:?} is not a piece of ice_text.model (the official tokenizer would add it as a new id)"
                ))),
            }
        };
        let t = &config.tokens;
        let need = |key: &str, token: &Option<String>| -> Result<u32> {
            id_of(key, token)?
                .ok_or_else(|| TokenizerError::Format(format!("tokenizer_config.json: {key} is null but needed")))
        };
        let mut split = Vec::new();
        for (key, token) in [
            ("bos_token", &t.bos),
            ("eos_token", &t.eos),
            ("unk_token", &t.unk),
            ("pad_token", &t.pad),
            ("mask_token", &t.mask),
            ("sep_token", &t.sep),
            ("cls_token", &t.cls),
        ] {
            if let (Some(s), Some(id)) = (token, id_of(key, token)?) {
                if !split.iter().any(|(x, _): &(String, u32)| x == s) {
                    split.push((s.clone(), id));
                }
            }
        }
        split.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let cg = ChatGlm {
            layout,
            image_tokens,
            pad: id_of("pad_token", &t.pad)?,
            mask: need("mask_token", &t.mask)?,
            gmask: need("gmask_token", &t.gmask)?,
            bos: need("bos_token", &t.bos)?,
            eos: need("eos_token", &t.eos)?,
            split,
        };
        tok.chatglm = Some(cg);
        Ok(tok)
    }

    /// `tokenizer.encode(text, add_special_tokens=False)`.
    pub(crate) fn encode_chatglm(&self, cg: &ChatGlm, text: &str, out: &mut Vec<u32>) {
        enum Part<'a> {
            Text(&'a str),
            Special(u32),
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some((at, len, id)) = find_split(rest, &cg.split) {
            if at > 0 {
                parts.push(Part::Text(&rest[..at]));
            }
            parts.push(Part::Special(id));
            rest = &rest[at + len..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest));
        }
        // The base class strips whitespace on both sides of every special token.
        for i in 0..parts.len() {
            if !matches!(parts[i], Part::Special(_)) {
                continue;
            }
            if let Some(Part::Text(s)) = i.checked_sub(1).and_then(|j| parts.get_mut(j)) {
                *s = s.trim_end_matches(py_space);
            }
            if let Some(Part::Text(s)) = parts.get_mut(i + 1) {
                *s = s.trim_start_matches(py_space);
            }
        }
        for p in parts {
            match p {
                Part::Special(id) => out.push(id),
                Part::Text(s) => self.encode_segment(s, out),
            }
        }
    }

    /// `tokenizer.decode(ids)` of the layout's code.
    pub(crate) fn decode_chatglm(&self, cg: &ChatGlm, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        let kept = ids.iter().copied().filter(|&id| Some(id) != cg.pad).filter(|&id| match cg.layout {
            ChatGlmLayout::Icetk => id >= cg.image_tokens,
            // v1.1 code: an image id becomes the text "<image_i>" (its placeholder's piece)
            ChatGlmLayout::V1_1 => true,
        });
        let text = chatglm_postprocess(&self.sp_decode(kept));
        Ok(match cg.layout {
            ChatGlmLayout::Icetk => text,
            ChatGlmLayout::V1_1 => hf_clean_up(&text),
        })
    }

    /// What `id` writes in the middle of a text (sentencepiece surface, icetk marks as characters).
    pub(crate) fn token_bytes_chatglm(&self, cg: &ChatGlm, id: u32) -> Result<Vec<u8>> {
        let p = self.pieces.get(id as usize).ok_or_else(|| {
            TokenizerError::Input(format!("token id {id} is outside the vocabulary ({} pieces)", self.pieces.len()))
        })?;
        if cg.layout == ChatGlmLayout::Icetk && id < cg.image_tokens {
            return Ok(Vec::new());
        }
        Ok(match p.kind {
            PieceKind::Control => Vec::new(),
            PieceKind::Unknown => UNK_SURFACE.as_bytes().to_vec(),
            PieceKind::Byte => parse_byte_name(&p.text).into_iter().collect(),
            _ => chatglm_postprocess(&p.text.replace(SPACE, " ")).into_bytes(),
        })
    }
}

/// sentencepiece's default `unk_surface`.
pub(crate) const UNK_SURFACE: &str = " \u{2047} ";

/// The first special token in `s` (leftmost, then longest): (byte offset, length, id).
fn find_split(s: &str, split: &[(String, u32)]) -> Option<(usize, usize, u32)> {
    if split.is_empty() {
        return None;
    }
    let b = s.as_bytes();
    (0..b.len())
        .find_map(|i| split.iter().find(|(t, _)| b[i..].starts_with(t.as_bytes())).map(|(t, id)| (i, t.len(), *id)))
}

/// `SPTokenizer.postprocess`: icetk's marks back to characters. Python replaces `<n>`, then
/// `<|tab|>`, then `<|blank_2|>`..`<|blank_80|>` over the whole string; the marks start with "<",
/// end with ">" and hold neither inside, so their occurrences never overlap and one left-to-right
/// pass gives the same text.
fn chatglm_postprocess(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let n = if tail.starts_with(NEWLINE) {
            out.push('\n');
            NEWLINE.len()
        } else if tail.starts_with(TAB) {
            out.push('\t');
            TAB.len()
        } else if let Some((k, n)) = blank_at(tail) {
            out.extend(std::iter::repeat_n(' ', k));
            n
        } else {
            out.push('<');
            1
        };
        rest = &tail[n..];
    }
    out.push_str(rest);
    out
}

/// `<|blank_k|>` (k in 2..=80, written as Python's f-string writes it) at the start of `s`:
/// (k, its length in bytes).
fn blank_at(s: &str) -> Option<(usize, usize)> {
    let digits = s.strip_prefix("<|blank_")?;
    let end = digits.find("|>")?;
    let d = &digits[..end];
    let k: usize = d.parse().ok().filter(|k| (2..=MAX_BLANK).contains(k))?;
    (d == k.to_string()).then_some((k, "<|blank_".len() + end + 2))
}

/// transformers 4.27's `clean_up_tokenization`, applied by its `decode` by default.
fn hf_clean_up(s: &str) -> String {
    const RULES: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    let mut t = s.to_string();
    for (from, to) in RULES {
        if t.contains(from) {
            t = t.replace(from, to);
        }
    }
    t
}

/// The normalizer a SentencePiece model asks for.
pub(crate) fn normalizer_of(m: &SpModel) -> Result<Normalizer> {
    let charsmap =
        if m.precompiled_charsmap.is_empty() { None } else { Some(CharsMap::from_blob(&m.precompiled_charsmap)?) };
    Ok(Normalizer {
        charsmap,
        add_dummy_prefix: m.add_dummy_prefix,
        remove_extra_whitespaces: m.remove_extra_whitespaces,
        escape_whitespaces: m.escape_whitespaces,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_whitespace_is_unicode_white_space_plus_separators() {
        // `[hex(c) for c in range(0x110000) if chr(c).isspace()]` in Python 3.11
        let python: Vec<u32> = [0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680]
            .into_iter()
            .chain(0x2000..=0x200a)
            .chain([0x2028, 0x2029, 0x202f, 0x205f, 0x3000])
            .collect();
        let ours: Vec<u32> =
            (0..=0x10ffffu32).filter_map(char::from_u32).filter(|&c| py_space(c)).map(u32::from).collect();
        assert_eq!(ours, python);
    }

    #[test]
    fn config_errors_are_clear() {
        let err = |json: &str| parse_config(json, "cfg.json").unwrap_err().to_string();
        assert!(err("{not json").contains("cfg.json: invalid JSON at line 1"));
        assert!(err("[1, 2]").contains("not a JSON object"));
        for bad in ["-1", "1.5", "\"0\"", "null", "true", "1e12", "2000000"] {
            let e = err(&format!("{{\"num_image_tokens\": {bad}}}"));
            assert!(e.contains("num_image_tokens must be an integer from 0 to"), "{bad}: {e}");
        }
        assert!(err(r#"{"bos_token": 5}"#).contains("bos_token must be a non-empty string or null"));
        assert!(err(r#"{"bos_token": {"content": "<sop>"}}"#).contains("bos_token"));
        assert!(err(r#"{"do_lower_case": true}"#).contains("do_lower_case: true is not supported"));
        assert!(err(r#"{"remove_space": "no"}"#).contains("remove_space must be true or false"));
        assert!(err(r#"{"additional_special_tokens": ["<x>"]}"#).contains("additional_special_tokens"));
    }

    #[test]
    fn configs_select_the_layout_and_the_code_defaults() {
        let c = parse_config(r#"{"num_image_tokens": 0}"#, "c").unwrap();
        assert_eq!(c.num_image_tokens, Some(0));
        assert_eq!(c.tokens, HfTokens::official(ChatGlmLayout::V1_1));
        let c = parse_config("{}", "c").unwrap();
        assert_eq!(c.num_image_tokens, None);
        assert_eq!(c.tokens.bos.as_deref(), Some("sop"));
        assert_eq!(c.tokens.pad, None);
        let c = parse_config(r#"{"pad_token": null, "eos_token": "</s>", "num_image_tokens": 20000}"#, "c").unwrap();
        assert_eq!((c.num_image_tokens, c.tokens.pad, c.tokens.eos.as_deref()), (Some(20000), None, Some("</s>")));
    }

    #[test]
    fn split_is_leftmost_then_longest() {
        let split = vec![("<sop>".to_string(), 1), ("<s>".to_string(), 2), ("[MASK]".to_string(), 3)];
        assert_eq!(find_split("a<s><sop>", &split), Some((1, 3, 2)));
        assert_eq!(find_split("[MASK]<sop>", &split), Some((0, 6, 3)));
        assert_eq!(find_split("<<sop>", &split), Some((1, 5, 1)));
        assert_eq!(find_split("你好<sop", &split), None);
        assert_eq!(find_split("x", &[]), None);
    }

    #[test]
    fn postprocess_and_clean_up_are_the_python_replacements() {
        assert_eq!(
            chatglm_postprocess("a<n>b<|tab|>c<|blank_3|>d<|blank_80|>"),
            format!("a\nb\tc   d{}", " ".repeat(80))
        );
        for kept in
            ["<|blank_1|>", "<|blank_81|>", "<|blank_02|>", "<|blank_|>", "<|blank_3", "<n", "<|tab>", "<", "x<"]
        {
            assert_eq!(chatglm_postprocess(kept), kept);
        }
        assert_eq!(chatglm_postprocess("<<n>><|blank_<n>2|>"), "<\n><|blank_\n2|>");
        // the expected string is Python's `clean_up_tokenization` of the same input
        assert_eq!(hf_clean_up("Hello , world ! is n't I 'm a ' b  ."), "Hello, world! isn't I'm a'b .");
    }

    #[test]
    fn malformed_models_give_errors_not_panics() {
        assert!(Tokenizer::from_chatglm(&[], Some(0)).unwrap_err().to_string().contains("no pieces"));
        assert!(Tokenizer::from_chatglm(&[0x0a, 0x05, 0x0a], None).is_err());
        assert!(Tokenizer::from_chatglm(b"not a model at all", None).is_err());
        assert!(Tokenizer::from_chatglm(&[0x0a, 0x02, 0x0a, 0xff], Some(0)).is_err());
        // a piece whose text is the lone byte 0xFF
        let e = Tokenizer::from_chatglm(&[0x0a, 0x03, 0x0a, 0x01, 0xff], None).unwrap_err().to_string();
        assert!(e.contains("piece 0 is not UTF-8"), "{e}");
        let e = Tokenizer::from_chatglm(&[0x0a, 0x03, 0x0a, 0x01, b'a'], Some(u32::MAX)).unwrap_err().to_string();
        assert!(e.contains("num_image_tokens above"), "{e}");
    }
}
