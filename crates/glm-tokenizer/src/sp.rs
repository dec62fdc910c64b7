//! Reads SentencePiece `ModelProto` files (`.model`, e.g. GLM-130B's `ice_text.model`).
//!
//! Only the fields a unigram encoder needs are decoded, by a small protobuf wire-format reader
//! (field numbers from sentencepiece_model.proto): pieces (1: piece=1, score=2, type=3),
//! trainer_spec (2: model_type=3, byte_fallback=35), normalizer_spec (3: name=1,
//! precompiled_charsmap=2, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5).

use crate::{PieceKind, TokenizerError};

/// The parts of a SentencePiece model this crate uses.
#[derive(Debug, Clone)]
pub struct SpModel {
    pub pieces: Vec<SpPiece>,
    /// 1 = unigram, 2 = BPE, 3 = word, 4 = char.
    pub model_type: u64,
    pub byte_fallback: bool,
    pub normalizer_name: String,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

#[derive(Debug, Clone)]
pub struct SpPiece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceKind,
}

/// Wire-format reader over one message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    fn err(&self, msg: &str) -> TokenizerError {
        TokenizerError::Format(format!(
            "SentencePiece model: {} at byte {} of {}: {msg}",
            self.what, self.pos, self.what
        ))
    }

    fn varint(&mut self) -> Result<u64, TokenizerError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or_else(|| self.err("truncated varint"))?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenizerError> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| self.err("truncated field"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next (field number, value), or None at the end of the message.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, TokenizerError> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                Field::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            t => return Err(self.err(&format!("unsupported wire type {t}"))),
        };
        Ok(Some((key >> 3, field)))
    }
}

fn utf8(b: &[u8], what: &str) -> Result<String, TokenizerError> {
    String::from_utf8(b.to_vec())
        .map_err(|e| TokenizerError::Format(format!("SentencePiece model: {what} is not UTF-8: {e}")))
}

impl SpModel {
    pub fn from_bytes(buf: &[u8]) -> Result<Self, TokenizerError> {
        let mut m = SpModel {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            normalizer_name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut r = Reader::new(buf, "ModelProto");
        while let Some((num, f)) = r.next()? {
            match (num, f) {
                (1, Field::Bytes(b)) => m.pieces.push(parse_piece(b, m.pieces.len())?),
                (2, Field::Bytes(b)) => {
                    let mut t = Reader::new(b, "TrainerSpec");
                    while let Some((num, f)) = t.next()? {
                        match (num, f) {
                            (3, Field::Varint(v)) => m.model_type = v,
                            (35, Field::Varint(v)) => m.byte_fallback = v != 0,
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(b)) => {
                    let mut n = Reader::new(b, "NormalizerSpec");
                    while let Some((num, f)) = n.next()? {
                        match (num, f) {
                            (1, Field::Bytes(s)) => m.normalizer_name = utf8(s, "normalizer name")?,
                            (2, Field::Bytes(s)) => m.precompiled_charsmap = s.to_vec(),
                            (3, Field::Varint(v)) => m.add_dummy_prefix = v != 0,
                            (4, Field::Varint(v)) => m.remove_extra_whitespaces = v != 0,
                            (5, Field::Varint(v)) => m.escape_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err(TokenizerError::Format("SentencePiece model: no pieces (is this a .model file?)".into()));
        }
        if m.model_type != 1 {
            return Err(TokenizerError::Format(format!(
                "SentencePiece model: model_type {} is not supported (only unigram = 1, the type of ice_text.model)",
                m.model_type
            )));
        }
        Ok(m)
    }
}

fn parse_piece(b: &[u8], index: usize) -> Result<SpPiece, TokenizerError> {
    let mut p = SpPiece { piece: String::new(), score: 0.0, kind: PieceKind::Normal };
    let mut r = Reader::new(b, "SentencePiece");
    while let Some((num, f)) = r.next()? {
        match (num, f) {
            (1, Field::Bytes(s)) => p.piece = utf8(s, &format!("piece {index}"))?,
            (2, Field::Fixed32(v)) => p.score = f32::from_bits(v),
            (3, Field::Varint(v)) => {
                p.kind = match v {
                    1 => PieceKind::Normal,
                    2 => PieceKind::Unknown,
                    3 => PieceKind::Control,
                    4 => PieceKind::UserDefined,
                    5 => PieceKind::Unused,
                    6 => PieceKind::Byte,
                    t => {
                        return Err(TokenizerError::Format(format!(
                            "SentencePiece model: piece {index} has unknown type {t}"
                        )))
                    }
                }
            }
            _ => {}
        }
    }
    Ok(p)
}
