//! A SentencePiece `.model` (trained by Python sentencepiece 0.2.1, fixtures/sentencepiece) gives
//! the ids, pieces and decoded text that Python gave (golden data in encodings.jsonl).

use std::path::PathBuf;

use glm_tokenizer::Tokenizer;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sentencepiece")
}

#[test]
fn encodings_match_python_sentencepiece() {
    let tok = Tokenizer::from_file(&dir().join("glm_sp_test.model")).unwrap();
    let text = std::fs::read_to_string(dir().join("encodings.jsonl")).unwrap();
    let (mut n, mut bad) = (0, Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let s = v["text"].as_str().unwrap();
        let want: Vec<u32> = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let got = tok.encode_sp(s);
        let pieces: Vec<&str> = got.iter().map(|&i| tok.piece(i).unwrap()).collect();
        let want_pieces: Vec<&str> = v["pieces"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        if got != want || pieces != want_pieces {
            bad.push(format!("{s:?}\n  got  {pieces:?}\n  want {want_pieces:?}"));
        }
        let decoded = tok.decode_sp(&want).unwrap();
        if decoded != v["decoded"].as_str().unwrap() {
            bad.push(format!("decode {s:?}: got {decoded:?} want {:?}", v["decoded"]));
        }
        n += 1;
    }
    assert!(n >= 200);
    assert!(bad.is_empty(), "{} of {n} differ:\n{}", bad.len(), bad.join("\n"));
}

#[test]
fn model_facts_are_read() {
    let tok = Tokenizer::from_file(&dir().join("glm_sp_test.model")).unwrap();
    assert_eq!(tok.vocab_size(), 4000);
    let s = tok.specials();
    assert_eq!((s.mask, s.gmask, s.smask, s.sop, s.eop), (Some(3), Some(4), Some(5), Some(6), Some(7)));
    assert!(!tok.is_lossless());
    // GLM-level encoding splits at the specials and uses the icetk newline piece.
    let ids = tok.encode("今天[gMASK]天气\n很好");
    assert!(ids.contains(&4) && ids.contains(&tok.token_id("<n>").unwrap()));
    // Truncating the file anywhere gives an error, never a panic.
    let bytes = std::fs::read(dir().join("glm_sp_test.model")).unwrap();
    for cut in [1usize, 7, 100, 5000, bytes.len() / 2, bytes.len() - 3] {
        let _ = Tokenizer::from_sp_bytes(&bytes[..cut]).map(|_| ()).map_err(|e| assert!(!e.to_string().is_empty()));
    }
}
