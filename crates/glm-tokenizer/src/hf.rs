//! `tokenizer.json` in the Hugging Face `tokenizers` format.
//!
//! The file holds the unigram vocabulary (byte fallback on), the specials as added tokens and the
//! icetk conventions as normalizers, so Python `tokenizers` loads it and gives the same ids as
//! `Tokenizer::encode` on ordinary text (tested). Reading accepts only files of this layout.

use serde_json::{json, Value};

use crate::{blank_name, Normalizer, Piece, PieceKind, Tokenizer, TokenizerError, MAX_BLANK, NEWLINE, SPACE, TAB};

fn replace(from: &str, to: &str) -> Value {
    json!({"type": "Replace", "pattern": {"String": from}, "content": to})
}

/// The normalizer sequence our encoder implements: icetk marks, the dummy prefix, "▁" for spaces.
fn normalizer() -> Value {
    let mut seq = vec![replace("\n", NEWLINE), replace("\t", TAB)];
    seq.extend((2..=MAX_BLANK).rev().map(|k| replace(&" ".repeat(k), &blank_name(k))));
    seq.push(json!({"type": "Prepend", "prepend": SPACE.to_string()}));
    seq.push(replace(" ", &SPACE.to_string()));
    json!({"type": "Sequence", "normalizers": seq})
}

fn decoder() -> Value {
    let mut seq = vec![replace(&SPACE.to_string(), " "), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
    seq.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    json!({"type": "Sequence", "decoders": seq})
}

pub fn to_json(t: &Tokenizer) -> Result<String, TokenizerError> {
    if !t.lossless {
        return Err(TokenizerError::Format(
            "only tokenizers trained here are saved as tokenizer.json; keep SentencePiece models as .model files"
                .into(),
        ));
    }
    let vocab: Vec<Value> = t.pieces.iter().map(|p| json!([p.text, p.score as f64])).collect();
    let added: Vec<Value> = t
        .pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            matches!(p.kind, PieceKind::Control | PieceKind::UserDefined | PieceKind::Unknown | PieceKind::Unused)
        })
        .map(|(id, p)| {
            let mark = p.kind == PieceKind::UserDefined;
            json!({"id": id, "content": p.text, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": mark, "special": !mark})
        })
        .collect();
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer(),
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": decoder(),
        "model": {"type": "Unigram", "unk_id": t.unk_id, "vocab": vocab, "byte_fallback": t.bytes.is_some()},
    });
    serde_json::to_string_pretty(&doc).map_err(|e| TokenizerError::Format(format!("serializing tokenizer.json: {e}")))
}

pub fn from_json(s: &str) -> Result<Tokenizer, TokenizerError> {
    let bad = |m: String| TokenizerError::Format(m);
    let doc: Value = serde_json::from_str(s)
        .map_err(|e| bad(format!("invalid JSON at line {} column {}: {e}", e.line(), e.column())))?;
    let model = doc.get("model").ok_or_else(|| bad("no \"model\"".into()))?;
    if model.get("type").and_then(Value::as_str) != Some("Unigram") {
        return Err(bad("only Unigram tokenizer.json files written by `glm tokenizer train` are supported".into()));
    }
    if doc.get("normalizer") != Some(&normalizer()) {
        return Err(bad(
            "its normalizer is not the icetk-style one written by `glm tokenizer train`; other tokenizer.json layouts are not supported".into(),
        ));
    }
    let unk_id = model.get("unk_id").and_then(Value::as_u64).ok_or_else(|| bad("model has no unk_id".into()))? as usize;
    let byte_fallback = model.get("byte_fallback").and_then(Value::as_bool).unwrap_or(false);
    let vocab = model.get("vocab").and_then(Value::as_array).ok_or_else(|| bad("model has no vocab".into()))?;
    let mut kinds = vec![PieceKind::Normal; vocab.len()];
    for (i, tok) in doc.get("added_tokens").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let id =
            tok.get("id").and_then(Value::as_u64).ok_or_else(|| bad(format!("added_tokens[{i}] has no id")))? as usize;
        let special = tok.get("special").and_then(Value::as_bool).unwrap_or(false);
        let kind = kinds
            .get_mut(id)
            .ok_or_else(|| bad(format!("added token id {id} is outside the vocab ({})", vocab.len())))?;
        let content = tok.get("content").and_then(Value::as_str).unwrap_or_default();
        *kind = if !special {
            PieceKind::UserDefined
        } else if content.starts_with("<|reserved_") || content.starts_with("<|unused_") {
            PieceKind::Unused
        } else {
            PieceKind::Control
        };
    }
    let mut pieces = Vec::with_capacity(vocab.len());
    for (i, v) in vocab.iter().enumerate() {
        let pair = v.as_array().filter(|a| a.len() == 2);
        let (text, score) = match pair.map(|a| (a[0].as_str(), a[1].as_f64())) {
            Some((Some(t), Some(s))) => (t.to_string(), s as f32),
            _ => return Err(bad(format!("vocab[{i}] is not a [piece, score] pair"))),
        };
        let mut kind = kinds[i];
        if i == unk_id {
            kind = PieceKind::Unknown;
        } else if byte_fallback && kind == PieceKind::Normal && text.len() == 6 && text.starts_with("<0x") {
            kind = PieceKind::Byte;
        } else if kind == PieceKind::Normal && text.starts_with("<|unused_") {
            kind = PieceKind::Unused;
        }
        pieces.push(Piece { text, score, kind });
    }
    if unk_id >= pieces.len() {
        return Err(bad(format!("unk_id {unk_id} is outside the vocab ({})", pieces.len())));
    }
    Tokenizer::build(pieces, Normalizer::lossless(), true)
}
