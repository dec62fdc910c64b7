//! `logprobs` in OpenAI's two shapes: completions' `{tokens, token_logprobs, top_logprobs,
//! text_offset}` and chat's `{content: [{token, logprob, bytes, top_logprobs}]}`.
//!
//! A token is shown as the text it writes mid-text (its leading space kept). A byte-fallback piece
//! that is only part of a character is shown as `bytes:\xNN`, as OpenAI shows such tokens; chat's
//! `bytes` always holds the exact bytes.

use glm_infer::TokenLogprob;
use glm_tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

/// A token's text and bytes.
fn token(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id).unwrap_or_else(|_| format!("<token {id}>").into_bytes());
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t.to_string(),
        Err(_) => bytes.iter().fold("bytes:".to_string(), |s, b| s + &format!("\\x{b:02x}")),
    };
    (text, bytes)
}

/// Completions' logprobs of `scored`, whose text starts at character `offset` of the choice's
/// text; `offset` moves past them (characters counted by their first bytes, so a character
/// split over byte pieces counts once).
pub(crate) fn completion(tok: &Tokenizer, scored: &[TokenLogprob], offset: &mut usize) -> Value {
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for t in scored {
        let (text, bytes) = token(tok, t.token);
        offsets.push(*offset);
        *offset += bytes.iter().filter(|&&b| (b & 0xC0) != 0x80).count();
        tokens.push(text);
        lps.push(t.logprob);
        let mut top = Map::new();
        for &(id, lp) in &t.top {
            // Two ids may write the same text: the likelier one stands for it.
            top.entry(token(tok, id).0).or_insert(json!(lp));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Chat's logprobs of `scored`.
pub(crate) fn chat(tok: &Tokenizer, scored: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (text, bytes) = token(tok, id);
        json!({"token": text, "logprob": lp, "bytes": bytes})
    };
    let content: Vec<Value> = scored
        .iter()
        .map(|t| {
            let mut e = entry(t.token, t.logprob);
            let top: Vec<Value> = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            if let Some(o) = e.as_object_mut() {
                o.insert("top_logprobs".into(), Value::Array(top));
            }
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}
