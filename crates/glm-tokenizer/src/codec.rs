//! GLM encoding and decoding over the lattice (spec section 9): specials split the raw text into
//! segments encoded separately, each with the dummy "▁" prefix; icetk marks for newlines, tabs
//! and runs of spaces; plain SentencePiece encoding and decoding for `.model` files.

use crate::blank_name;
use crate::chatglm::UNK_SURFACE;
use crate::{parse_byte_name, PieceKind, Result, Surface, Tokenizer, TokenizerError, MAX_BLANK, NEWLINE, SPACE, TAB};

impl Tokenizer {
    /// GLM encoding: specials split the text; each segment is encoded on its own (spec section 9).
    /// ChatGLM tokenizers (`from_chatglm*`) give the official `encode(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        self.encode_into(text, &mut out);
        out
    }

    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        if let Some(cg) = &self.chatglm {
            return self.encode_chatglm(cg, text, out);
        }
        let mut rest = text;
        while let Some((at, s, id)) = self.find_special(rest) {
            self.encode_segment(&rest[..at], out);
            out.push(id);
            rest = &rest[at + s.len()..];
        }
        self.encode_segment(rest, out);
    }

    /// Encodes text that must not contain specials (they are encoded as plain text).
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_segment(text, &mut out);
        out
    }

    fn find_special<'a>(&'a self, s: &str) -> Option<(usize, &'a str, u32)> {
        if self.special_strings.is_empty() {
            return None;
        }
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'[' || b[i] == b'<' {
                for (name, id) in &self.special_strings {
                    if b[i..].starts_with(name.as_bytes()) {
                        return Some((i, name.as_str(), *id));
                    }
                }
            }
            i += 1;
        }
        None
    }

    pub(crate) fn encode_segment(&self, seg: &str, out: &mut Vec<u32>) {
        if seg.is_empty() {
            return;
        }
        if self.lossless {
            self.encode_lossless(seg, out);
        } else if let Some(ice) = &self.ice {
            // icetk: marks written as their pieces, then sentencepiece over the segment.
            let mut s = String::with_capacity(seg.len() + 8);
            let mut spaces = 0usize;
            let flush = |s: &mut String, spaces: &mut usize| {
                push_blanks(*spaces, &ice.blank, |r| match r {
                    Run::Blank(k) => s.push_str(&blank_name(k)),
                    Run::Space => s.push(' '),
                });
                *spaces = 0;
            };
            for c in seg.chars() {
                if c == ' ' {
                    spaces += 1;
                    continue;
                }
                flush(&mut s, &mut spaces);
                match c {
                    '\n' => s.push_str(NEWLINE),
                    '\t' => s.push_str(TAB),
                    c => s.push(c),
                }
            }
            flush(&mut s, &mut spaces);
            self.encode_sp_into(&s, out);
        } else {
            self.encode_sp_into(seg, out);
        }
    }

    /// Tokenizers trained here: marks are emitted structurally; the lattice sees only text.
    fn encode_lossless(&self, seg: &str, out: &mut Vec<u32>) {
        let lattice = self.lattice();
        let mut buf = String::with_capacity(seg.len() + 3);
        buf.push(SPACE); // dummy prefix
        let flush = |buf: &mut String, out: &mut Vec<u32>| {
            lattice.segment(buf, out);
            buf.clear();
        };
        let b = seg.as_bytes();
        let mut i = 0;
        let mut text_start = 0;
        while i < b.len() {
            let c = b[i];
            let mark = c == b'\n'
                || c == b'\t'
                || (c == b' ' && b.get(i + 1) == Some(&b' '))
                || (c == 0xE2 && b[i..].starts_with("▁".as_bytes()));
            if !mark {
                i += 1;
                continue;
            }
            push_escaped(&mut buf, &seg[text_start..i]);
            if !buf.is_empty() {
                flush(&mut buf, out);
            }
            match (c, &self.ice) {
                (b'\n', Some(ice)) => {
                    out.push(ice.newline);
                    i += 1;
                }
                (b'\t', Some(ice)) => {
                    out.push(ice.tab);
                    i += 1;
                }
                (b' ', Some(ice)) if !ice.blank.is_empty() => {
                    let n = b[i..].iter().take_while(|&&x| x == b' ').count();
                    push_blanks(n, &ice.blank, |r| match r {
                        Run::Blank(k) => out.push(ice.blank[k - 2]),
                        Run::Space => buf.push(SPACE), // joins the next text
                    });
                    i += n;
                }
                (0xE2, _) => {
                    // A literal "▁" would decode as a space: write its bytes.
                    match &self.bytes {
                        Some(bytes) => out.extend("▁".bytes().map(|x| bytes[x as usize])),
                        None => out.push(self.unk_id),
                    }
                    i += 3;
                }
                _ => {
                    // No icetk marks in this vocabulary: the character is ordinary text.
                    buf.push(if c == b' ' { SPACE } else { c as char });
                    i += 1;
                }
            }
            text_start = i;
        }
        push_escaped(&mut buf, &seg[text_start..]);
        if !buf.is_empty() {
            flush(&mut buf, out);
        }
    }

    /// Plain SentencePiece: normalize the whole text, then segment (Python's `sp.encode(text)`).
    pub fn encode_sp(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_sp_into(text, &mut out);
        out
    }

    fn encode_sp_into(&self, text: &str, out: &mut Vec<u32>) {
        let normalized = self.normalizer.normalize(text, &self.user_symbols);
        self.lattice().segment(&normalized, out);
    }

    /// GLM decoding, the inverse of `encode` (exact for tokenizers trained here). ChatGLM
    /// tokenizers give the official `tokenizer.decode(ids)`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(cg) = &self.chatglm {
            return self.decode_chatglm(cg, ids);
        }
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut seg_start = true;
        for &id in ids {
            seg_start = self.push_surface(id, seg_start, &mut bytes)?;
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes token `id` writes in the middle of a text (its leading space kept): what an API
    /// shows as the token. A byte-fallback piece is one byte, maybe part of a character.
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        if let Some(cg) = &self.chatglm {
            return self.token_bytes_chatglm(cg, id);
        }
        let mut bytes = Vec::new();
        self.push_surface(id, false, &mut bytes)?;
        Ok(bytes)
    }

    /// Appends what `id` writes (at a segment's start, a leading space is dropped); returns whether
    /// the next piece starts a segment.
    fn push_surface(&self, id: u32, seg_start: bool, bytes: &mut Vec<u8>) -> Result<bool> {
        let s = self.surfaces.get(id as usize).ok_or_else(|| {
            TokenizerError::Input(format!("token id {id} is outside the vocabulary ({} pieces)", self.pieces.len()))
        })?;
        match s {
            Surface::Text { text, lead } => {
                let t = if seg_start && *lead { &text[1..] } else { text.as_str() };
                bytes.extend_from_slice(t.as_bytes());
            }
            Surface::Byte(b) => bytes.push(*b),
            Surface::Special(t) => {
                bytes.extend_from_slice(t.as_bytes());
                return Ok(true);
            }
            Surface::Literal(t) => bytes.extend_from_slice(t.as_bytes()),
            Surface::Empty => return Ok(seg_start),
            Surface::Unknown => bytes.extend_from_slice(" \u{2047} ".as_bytes()),
        }
        Ok(false)
    }

    /// Python sentencepiece's `sp.decode(ids)`: user-defined pieces verbatim, control pieces dropped,
    /// the dummy-prefix space removed at the start.
    pub fn decode_sp(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        Ok(self.sp_decode(ids.iter().copied()))
    }

    /// An error naming the first id outside the vocabulary.
    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.pieces.len()) {
            Some(id) => Err(TokenizerError::Input(format!(
                "token id {id} is outside the vocabulary ({} pieces)",
                self.pieces.len()
            ))),
            None => Ok(()),
        }
    }

    /// sentencepiece's `Decode` (as of 0.1.99): control pieces write nothing, `<unk>` writes " ⁇ ",
    /// a run of byte pieces is read as UTF-8 with one U+FFFD per invalid byte, and at the start
    /// the "▁" of the first pieces is dropped (of all leading ones while nothing is written, when
    /// the model removes extra whitespace). Ids outside the vocabulary are skipped (`check_ids`).
    pub(crate) fn sp_decode(&self, ids: impl IntoIterator<Item = u32>) -> String {
        let n = &self.normalizer;
        let strip_bos = n.add_dummy_prefix || n.remove_extra_whitespaces;
        let mut text = String::new();
        let mut pending = Vec::new();
        let (mut is_bos_ws, mut bos_ws_seen) = (true, false);
        for id in ids {
            let Some(p) = self.pieces.get(id as usize) else { continue };
            if p.kind == PieceKind::Byte {
                if let Some(b) = parse_byte_name(&p.text) {
                    pending.push(b);
                    continue;
                }
            }
            flush_utf8(&mut pending, &mut text);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            bos_ws_seen = false;
            match p.kind {
                PieceKind::Control => {}
                PieceKind::Unknown => text.push_str(UNK_SURFACE),
                _ => {
                    let mut piece = p.text.as_str();
                    if is_bos_ws && strip_bos {
                        if let Some(rest) = piece.strip_prefix(SPACE) {
                            piece = rest;
                            bos_ws_seen = !n.remove_extra_whitespaces;
                        }
                    }
                    text.extend(piece.chars().map(|c| if c == SPACE { ' ' } else { c }));
                }
            }
        }
        flush_utf8(&mut pending, &mut text);
        text
    }
}

/// Appends byte-fallback bytes as sentencepiece reads them: each valid UTF-8 character as is,
/// each byte that does not start one as U+FFFD.
fn flush_utf8(pending: &mut Vec<u8>, text: &mut String) {
    let b = pending.as_slice();
    let mut i = 0;
    while i < b.len() {
        let len = match b[i] {
            0..=0x7f => 1,
            x if x & 0xe0 == 0xc0 => 2,
            x if x & 0xf0 == 0xe0 => 3,
            x if x & 0xf8 == 0xf0 => 4,
            _ => 0,
        };
        match b.get(i..i + len).filter(|_| len > 0).and_then(|s| std::str::from_utf8(s).ok()) {
            Some(s) => {
                text.push_str(s);
                i += len;
            }
            None => {
                text.push('\u{FFFD}');
                i += 1;
            }
        }
    }
    pending.clear();
}

enum Run {
    Blank(usize),
    Space,
}

/// icetk: a run of n spaces becomes `<|blank_k|>` pieces, longest first; a single space stays.
fn push_blanks(mut n: usize, blank: &[u32], mut f: impl FnMut(Run)) {
    if blank.is_empty() {
        (0..n).for_each(|_| f(Run::Space));
        return;
    }
    while n >= 2 {
        let k = n.min(MAX_BLANK);
        f(Run::Blank(k));
        n -= k;
    }
    if n == 1 {
        f(Run::Space);
    }
}

fn push_escaped(buf: &mut String, text: &str) {
    for c in text.chars() {
        buf.push(if c == ' ' { SPACE } else { c });
    }
}
