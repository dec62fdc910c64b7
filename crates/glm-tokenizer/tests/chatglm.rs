//! ChatGLM-6B's tokenizer in both vocabulary layouts gives what the official
//! `tokenization_chatglm.py` gave under transformers 4.27.1 (fixtures/chatglm-tokenizer, made by
//! scripts/make_chatglm_tok_fixture.py): ids, tokens, the model input with [gMASK] <sop>, and
//! decoded text, for every fixture line.

use std::path::PathBuf;

use glm_tokenizer::{ChatGlmLayout, Tokenizer, CHATGLM_SPECIALS};
use serde_json::Value;

/// The fixture directories: the two layouts over an nmt_nfkc text model, and v1.1 over one with
/// the identity normalizer (what the released ice_text.model appears to use).
const LAYOUTS: [&str; 3] = ["v1.1", "old", "v1.1-identity"];

fn dir(layout: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chatglm-tokenizer").join(layout)
}

fn lines(layout: &str, file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(dir(layout).join(file)).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn info(layout: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir(layout).join("model_info.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn load(layout: &str) -> Tokenizer {
    Tokenizer::from_chatglm_dir(&dir(layout)).unwrap()
}

#[test]
fn encodings_match_the_official_tokenizer() {
    for layout in LAYOUTS {
        let tok = load(layout);
        let cg = tok.chatglm().unwrap();
        let (mut n, mut bad) = (0, Vec::new());
        for v in lines(layout, "encodings.jsonl") {
            let text = v["text"].as_str().unwrap();
            let want = ids(&v["ids"]);
            let got = tok.encode(text);
            if got != want {
                bad.push(format!("{layout} encode {text:?}\n  got  {got:?}\n  want {want:?}"));
            }
            let tokens: Vec<&str> = want.iter().map(|&i| tok.piece(i).unwrap()).collect();
            let want_tokens: Vec<&str> = v["tokens"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
            if tokens != want_tokens {
                bad.push(format!("{layout} tokens {text:?}\n  got  {tokens:?}\n  want {want_tokens:?}"));
            }
            let full = ids(&v["ids_with_special"]);
            if cg.build_inputs(&want) != full {
                bad.push(format!("{layout} inputs {text:?}: got {:?} want {full:?}", cg.build_inputs(&want)));
            }
            for (key, list) in [("decoded", &want), ("decoded_with_special", &full)] {
                let got = tok.decode(list).unwrap();
                if got != v[key].as_str().unwrap() {
                    bad.push(format!("{layout} {key} {text:?}: got {got:?} want {:?}", v[key]));
                }
            }
            n += 1;
        }
        assert!(n >= 200, "{layout}: {n} lines");
        assert!(bad.is_empty(), "{} of {n} lines differ:\n{}", bad.len(), bad.join("\n"));
    }
}

#[test]
fn decodes_match_the_official_tokenizer() {
    for layout in LAYOUTS {
        let tok = load(layout);
        let (mut n, mut bad) = (0, Vec::new());
        for v in lines(layout, "decodes.jsonl") {
            let list = ids(&v["ids"]);
            let got = tok.decode(&list).unwrap();
            if got != v["decoded"].as_str().unwrap() {
                bad.push(format!("{layout} {} {list:?}: got {got:?} want {:?}", v["note"], v["decoded"]));
            }
            n += 1;
        }
        assert!(n >= 80, "{layout}: {n} lines");
        assert!(bad.is_empty(), "{} of {n} decodes differ:\n{}", bad.len(), bad.join("\n"));
    }
}

#[test]
fn specials_and_vocabulary_are_at_the_official_ids() {
    for layout in LAYOUTS {
        let tok = load(layout);
        let official = &info(layout)["official"];
        let piece = |s: &str| official["piece_ids"][s].as_u64().unwrap() as u32;
        assert_eq!(tok.vocab_size() as u64, official["vocab_size"].as_u64().unwrap());
        let s = tok.specials();
        assert_eq!(s.mask, Some(piece("[MASK]")));
        assert_eq!(s.gmask, Some(piece("[gMASK]")));
        assert_eq!(s.smask, Some(piece("[sMASK]")));
        assert_eq!(s.eod, Some(piece("<unused_0>")));
        assert_eq!(s.sop, Some(piece("<sop>")));
        assert_eq!(s.eop, Some(piece("<eop>")));
        for name in CHATGLM_SPECIALS.iter().chain(&["<unk>", "<s>", "</s>", "<pad>", "<n>", "<|tab|>", "<0xFF>"]) {
            assert_eq!(tok.token_id(name), Some(piece(name)), "{layout} {name}");
        }
        let cg = tok.chatglm().unwrap();
        let hf = &official["hf_special_token_ids"];
        assert_eq!(cg.bos_id() as u64, hf["bos_token_id"].as_u64().unwrap());
        assert_eq!(cg.eos_id() as u64, hf["eos_token_id"].as_u64().unwrap());
        assert_eq!(cg.pad_id().map(u64::from), hf["pad_token_id"].as_u64());
        assert_eq!(cg.image_tokens() as u64, official["num_image_tokens"].as_u64().unwrap());
        let mut split: Vec<&str> = cg.split_tokens().iter().map(|(s, _)| s.as_str()).collect();
        split.sort();
        let want: Vec<&str> =
            official["hf_no_split_tokens"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        assert_eq!(split, want, "{layout}");
        let want_layout = if layout == "old" { ChatGlmLayout::Icetk } else { ChatGlmLayout::V1_1 };
        assert_eq!(cg.layout(), want_layout);
    }
}

#[test]
fn loading_from_bytes_equals_loading_the_directory() {
    let v11 = std::fs::read(dir("v1.1").join("ice_text.model")).unwrap();
    let old = std::fs::read(dir("old").join("ice_text.model")).unwrap();
    for (tok, layout) in [
        (Tokenizer::from_chatglm(&v11, Some(0)).unwrap(), "v1.1"),
        (Tokenizer::from_chatglm(&old, None).unwrap(), "old"),
        // The v1.1 file (pieces inside) under the pre-2023-04 rules (commit 72985e8, "Drop icetk
        // dependency", loaded it with 20,000 image ids): the same ids as appending them in code.
        (Tokenizer::from_chatglm(&v11, None).unwrap(), "old"),
    ] {
        let dir_tok = load(layout);
        assert_eq!(tok.vocab_size(), dir_tok.vocab_size());
        for v in lines(layout, "encodings.jsonl") {
            let text = v["text"].as_str().unwrap();
            assert_eq!(tok.encode(text), ids(&v["ids"]), "{layout} {text:?}");
            assert_eq!(tok.decode(&ids(&v["ids_with_special"])).unwrap(), v["decoded_with_special"].as_str().unwrap());
        }
    }
}

#[test]
fn token_bytes_agree_with_decode() {
    // Token by token, the text is what decode writes, except the dummy-prefix space(s) it drops at
    // the start and (v1.1) Hugging Face's clean-up of " ," and friends.
    for layout in LAYOUTS {
        let tok = load(layout);
        let mut checked = 0;
        for v in lines(layout, "encodings.jsonl") {
            let list = ids(&v["ids_with_special"]);
            let mut bytes = Vec::new();
            for &id in &list {
                bytes.extend(tok.token_bytes(id).unwrap());
            }
            let joined = String::from_utf8_lossy(&bytes).into_owned();
            let decoded = tok.decode(&list).unwrap();
            if layout != "old" && ["?", "!", ",", ".", "'"].iter().any(|p| joined.contains(&format!(" {p}"))) {
                continue;
            }
            if joined.contains('\u{FFFD}') {
                continue; // lossy joins of invalid bytes differ from sentencepiece's per-byte U+FFFD
            }
            let start = joined.len() - joined.trim_start_matches(' ').len();
            assert!(
                joined.ends_with(&decoded) && joined.len() - decoded.len() <= start,
                "{layout} {:?}: token bytes {joined:?}, decode {decoded:?}",
                v["text"]
            );
            checked += 1;
        }
        assert!(checked > 150, "{layout}: {checked}");
        // The marks write their characters; controls, pads and image ids nothing.
        let id = |s: &str| tok.token_id(s).unwrap();
        assert_eq!(tok.token_bytes(id("<n>")).unwrap(), b"\n");
        assert_eq!(tok.token_bytes(id("<|tab|>")).unwrap(), b"\t");
        assert_eq!(tok.token_bytes(id("<|blank_5|>")).unwrap(), b"     ");
        assert_eq!(tok.token_bytes(id("<0xF0>")).unwrap(), [0xF0]);
        for s in ["[gMASK]", "<sop>", "<eop>", "<pad>", "</s>"] {
            assert!(tok.token_bytes(id(s)).unwrap().is_empty(), "{s}");
        }
        if layout == "old" {
            assert!(tok.token_bytes(0).unwrap().is_empty() && tok.token_bytes(19_999).unwrap().is_empty());
            assert_eq!(tok.decode(&[5, 19_999]).unwrap(), "");
        }
    }
}

#[test]
fn chat_prompts_end_with_gmask_sop_and_answers_end_at_eop() {
    for layout in LAYOUTS {
        let tok = load(layout);
        let s = tok.specials();
        let (gmask, sop, eop) = (s.gmask.unwrap(), s.sop.unwrap(), s.eop.unwrap());
        let prompt = "[Round 0]\n问：你好\n答：";
        let answer = "你好👋！我是人工智能助手 ChatGLM-6B。";
        // nmt_nfkc writes "：" as ":"; the identity normalizer keeps every character.
        let nfkc =
            |s: &str| if layout == "v1.1-identity" { s.to_string() } else { s.replace('：', ":").replace('！', "!") };
        let mut ids = tok.chatglm().unwrap().build_inputs(&tok.encode(prompt));
        assert_eq!(ids[ids.len() - 2..], [gmask, sop]);
        assert_eq!(tok.decode(&ids).unwrap(), nfkc(prompt));
        // Encoded on its own the answer starts with the dummy prefix "▁", which shows mid-text.
        ids.extend(tok.encode(answer));
        ids.push(eop);
        assert_eq!(tok.decode(&ids).unwrap(), nfkc(&format!("{prompt} {answer}")));
    }
}

#[test]
fn bad_directories_and_configs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = std::fs::read(dir("v1.1").join("ice_text.model")).unwrap();
    let old_model = std::fs::read(dir("old").join("ice_text.model")).unwrap();
    let err = |what: &str| {
        let e = Tokenizer::from_chatglm_dir(d).unwrap_err().to_string();
        assert!(e.contains(what), "want {what:?} in {e:?}");
    };
    err("tokenizer_config.json");
    std::fs::write(d.join("tokenizer_config.json"), b"{\"num_image_tokens\": 0,").unwrap();
    err("tokenizer_config.json: invalid JSON at line 1");
    std::fs::write(d.join("tokenizer_config.json"), b"{\"bos_token\": \"\xff\xfe\"}").unwrap();
    err("tokenizer_config.json: not UTF-8");
    std::fs::write(d.join("tokenizer_config.json"), br#"{"num_image_tokens": -3}"#).unwrap();
    err("num_image_tokens must be an integer");
    std::fs::write(d.join("tokenizer_config.json"), br#"{"num_image_tokens": "zero"}"#).unwrap();
    err("num_image_tokens must be an integer");
    std::fs::write(d.join("tokenizer_config.json"), br#"{"num_image_tokens": 0}"#).unwrap();
    err("ice_text.model"); // missing
                           // A truncated model: an error wherever it is cut, never a panic.
    for cut in [1usize, 2, 9, 100, 4096, model.len() / 2, model.len() - 1] {
        std::fs::write(d.join("ice_text.model"), &model[..cut]).unwrap();
        match Tokenizer::from_chatglm_dir(d) {
            Err(e) => assert!(e.to_string().contains("ice_text.model: "), "{e}"),
            // a cut between two pieces is a valid (smaller) model; it must then miss pieces
            Ok(_) => panic!("cut at {cut} loaded"),
        }
    }
    // The old text model under a v1.1 config lacks the specials.
    std::fs::write(d.join("ice_text.model"), &old_model).unwrap();
    err("has no \"[MASK]\" piece");
    // A config naming tokens the model does not have.
    std::fs::write(d.join("ice_text.model"), &model).unwrap();
    std::fs::write(d.join("tokenizer_config.json"), br#"{"num_image_tokens": 0, "bos_token": "<start>"}"#).unwrap();
    err("bos_token \"<start>\" is not a piece of ice_text.model");
    std::fs::write(d.join("tokenizer_config.json"), b"{}").unwrap();
    err("bos_token \"sop\" is not a piece"); // the old code's default, as the official code would add it
    std::fs::write(d.join("tokenizer_config.json"), br#"{"num_image_tokens": 0}"#).unwrap();
    assert!(Tokenizer::from_chatglm_dir(d).is_ok());
    // Ids outside the vocabulary.
    let tok = Tokenizer::from_chatglm_dir(d).unwrap();
    assert!(tok.decode(&[5, 999_999]).unwrap_err().to_string().contains("999999"));
    assert!(tok.token_bytes(999_999).is_err());
}
