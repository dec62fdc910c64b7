//! `glm convert` and the released-checkpoint readers behind `--model`: SAT and Hugging Face folders
//! serve, generate and round-trip like the checkpoint they came from; broken downloads are named;
//! a conversion's peak memory stays near one tensor, not the model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use glm_checkpoint::raw::SafetensorsWriter;
use glm_checkpoint::torch::TorchDtype;
use glm_model::weights::{param_table, ParamKind};
use glm_model::{Config, SpecialTokens};
use serde_json::Value;

fn glm(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_glm")).args(args).output().expect("run glm");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

fn ok(args: &[&str]) -> String {
    let (ok, out, err) = glm(args);
    assert!(ok, "glm {args:?} failed: {err}");
    out
}

const CONFIG: &str = "max_steps = 2\n[objective]\nseq_len = 64\n[batch]\nmicro_batch = 2\nglobal = 2\nramp_start = 2\n[eval]\nevery = 0\nrows = 2\n";

fn greedy(model: &str, extra: &[&str]) -> Value {
    let mut args = vec!["generate", "--model", model, "--greedy", "--max-tokens", "6", "--json"];
    args.extend(extra);
    args.push("The whale");
    serde_json::from_str(ok(&args).trim()).expect("json")
}

#[test]
fn sat_folders_generate_like_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().to_string();
    std::fs::write(d("t.toml"), CONFIG).unwrap();
    ok(&["train", "--config", &d("t.toml"), "--out", &d("run"), "--quiet", "--no-samples"]);
    let ckpt = d("run/checkpoints/step-00000002");
    // fp16, as a SAT folder holds it; the file carries its config, so no --preset is needed.
    ok(&["convert", &ckpt, &d("m16.safetensors"), "--dtype", "f16"]);
    let want = greedy(&d("m16.safetensors"), &[]);
    for tp in ["1", "2", "4"] {
        let sat = d(&format!("sat{tp}"));
        let out = ok(&["convert", &d("m16.safetensors"), &sat, "--to", "sat", "--tp", tp]);
        assert!(out.contains("peak RSS"), "{out}");
        assert_eq!(greedy(&sat, &[]), want, "SAT TP={tp} generates differently");
        let check = ok(&["convert", "--check", &sat]);
        assert!(check.contains("complete") && check.contains("mp_rank_00_model_states.pt"), "{check}");
    }
    // SAT -> SAT at another degree, quantized as convert_tp.py does; it loads and generates.
    ok(&["convert", &d("sat2"), &d("sat4q"), "--to", "sat", "--tp", "4", "--quantize", "4"]);
    let q = greedy(&d("sat4q"), &[]);
    assert!(q["text"].as_str().unwrap().starts_with("The whale"));
    let (fail, _, err) = glm(&["convert", &d("sat2"), &d("sat4q"), "--to", "sat", "--tp", "4"]);
    assert!(!fail && err.contains("--force"), "{err}");
    // A missing rank: --check names it (exit 1), and --model refuses to load.
    std::fs::remove_file(dir.path().join("sat4/release/mp_rank_03_model_states.pt")).unwrap();
    let (fine, out, _) = glm(&["convert", "--check", &d("sat4")]);
    assert!(!fine && out.contains("MISSING") && out.contains("mp_rank_03"), "{out}");
    let (fine, out, _) = glm(&["convert", "--check", &d("sat4"), "--json"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(!fine && v["ok"] == false && v["files"].as_array().unwrap().iter().any(|f| f["status"] == "missing"));
    let (fine, _, err) = glm(&["generate", "--model", &d("sat4"), "Hi"]);
    assert!(!fine && err.contains("mp_rank_03_model_states.pt"), "{err}");
    // SHA-256s from a list: a match, then a flipped byte.
    let f = dir.path().join("sat2/release/mp_rank_01_model_states.pt");
    let sum = sha256_hex(&std::fs::read(&f).unwrap());
    std::fs::write(d("sums"), format!("{sum}  release/mp_rank_01_model_states.pt\n")).unwrap();
    let out = ok(&["convert", "--check", &d("sat2"), "--sha256", &d("sums")]);
    assert!(out.contains("sha256 matches"), "{out}");
    let mut bytes = std::fs::read(&f).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let (fine, out, _) = glm(&["convert", "--check", &d("sat2"), "--sha256", &d("sums")]);
    assert!(!fine && out.contains("MISMATCH"), "{out}");
}

fn sha256_hex(b: &[u8]) -> String {
    // The same digest glm writes, through the checksum module's public helper.
    let p = std::env::temp_dir().join(format!("glm-sha-{}", std::process::id()));
    std::fs::write(&p, b).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let h = glm_checkpoint::raw::sha256_range(&f, &p, 0, b.len() as u64).unwrap();
    let _ = std::fs::remove_file(&p);
    h
}

/// A seeded random value in [-0.5, 0.5).
fn rnd(s: &mut u64) -> f32 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    (*s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// Random fp16 weights of `cfg`, written as safetensors `files` (tensors dealt round-robin), in
/// table order; `extra` tensors (name, values) first.
fn write_random(cfg: &Config, files: &[PathBuf], meta: &BTreeMap<String, String>, seed: u64) -> Vec<(String, usize)> {
    let table = param_table(cfg);
    let mut s = seed | 1;
    let mut placed = Vec::new();
    for (k, file) in files.iter().enumerate() {
        let mine: Vec<_> = table.iter().enumerate().filter(|(i, _)| i % files.len() == k).map(|(_, p)| p).collect();
        let entries: Vec<_> = mine.iter().map(|p| (p.name.clone(), TorchDtype::F16, p.shape.clone())).collect();
        let mut w = SafetensorsWriter::create(file, &entries, meta, false).unwrap();
        for p in mine {
            let (base, spread) = if p.kind == ParamKind::NormWeight { (1.0, 0.1) } else { (0.0, 0.2) };
            let n = p.numel() as usize;
            for c in (0..n).step_by(1 << 20) {
                let m = (n - c).min(1 << 20);
                let buf: Vec<u8> =
                    (0..m).flat_map(|_| half::f16::from_f32(base + spread * rnd(&mut s)).to_le_bytes()).collect();
                w.write(&buf).unwrap();
            }
            placed.push((p.name.clone(), k));
        }
        w.finish().unwrap();
    }
    placed
}

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(p)
}

/// A ChatGLM-6B-layout Hugging Face folder (config.json, 2 safetensors shards + index, the
/// tokenizer fixture's ice_text.model) of a small random model.
fn hf_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let specials = SpecialTokens { mask: 4000, gmask: 4001, smask: 4002, eod: 4003, sop: 4004, eop: 4005 };
    let cfg = Config { special_tokens: specials, max_seq_len: 128, ..Config::chatglm_6b() };
    let cfg = Config { num_layers: 2, hidden_size: 64, num_heads: 4, ffn_hidden_size: 256, vocab_size: 4352, ..cfg };
    let files: Vec<PathBuf> = (1..=2).map(|k| dir.join(format!("model-0000{k}-of-00002.safetensors"))).collect();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let placed = write_random(&cfg, &files, &meta, 7);
    let map: serde_json::Map<String, Value> = placed
        .iter()
        .map(|(n, k)| (n.clone(), Value::String(format!("model-0000{}-of-00002.safetensors", k + 1))))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let config = serde_json::json!({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "bos_token_id": 4004, "eos_token_id": 4005,
        "mask_token_id": 4000, "gmask_token_id": 4001, "pad_token_id": 3, "hidden_size": 64,
        "inner_hidden_size": 256, "layernorm_epsilon": 1e-5, "max_sequence_length": 128, "num_attention_heads": 4,
        "num_layers": 2, "position_encoding_2d": true, "quantization_bit": 0, "torch_dtype": "float16",
        "vocab_size": 4352, "pre_seq_len": null
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    for f in ["ice_text.model", "tokenizer_config.json"] {
        std::fs::copy(fixture("chatglm-tokenizer/v1.1").join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn hugging_face_folders_generate_serve_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().to_string();
    hf_folder(&dir.path().join("hf"));
    // The folder's own tokenizer and template are used: ChatGLM's ids, [gMASK] <sop> appended.
    let a = greedy(&d("hf"), &[]);
    assert!(a["text"].as_str().unwrap().starts_with("The whale"), "{a}");
    assert!(!a["tokens"].as_array().unwrap().is_empty());
    // Converted to our file, with the folder's tokenizer: the same greedy continuation.
    ok(&["convert", &d("hf"), &d("chat.safetensors")]);
    assert_eq!(greedy(&d("chat.safetensors"), &["--tokenizer", &d("hf")]), a);
    // The file remembers it holds a released model: without its tokenizer, an error, not garbage.
    let (fine, _, err) = glm(&["generate", "--model", &d("chat.safetensors"), "Hi"]);
    assert!(!fine && err.contains("--tokenizer"), "{err}");
    // The embedded tokenizer's special ids are not ChatGLM's: a clear error, not garbage.
    let (fine, _, err) = glm(&[
        "generate",
        "--model",
        &d("hf"),
        "--tokenizer",
        &fixture("sentencepiece/glm_sp_test.model").to_string_lossy(),
        "Hi",
    ]);
    assert!(!fine && err.contains("--tokenizer"), "{err}");
    // A shard named in the index and missing.
    std::fs::remove_file(dir.path().join("hf/model-00002-of-00002.safetensors")).unwrap();
    let (fine, _, err) = glm(&["generate", "--model", &d("hf"), "Hi"]);
    assert!(!fine && err.contains("model-00002-of-00002.safetensors"), "{err}");
    let (fine, out, _) = glm(&["convert", "--check", &d("hf")]);
    assert!(!fine && out.contains("MISSING"), "{out}");
}

#[test]
fn serve_reads_a_released_folder_in_place() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    hf_folder(&dir.path().join("hf"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm"))
        .args(["serve", "--port", "0", "--model"])
        .arg(dir.path().join("hf"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut addr = None;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(a) = line.split("listening on http://").nth(1) {
            addr = Some(a.trim().to_string());
            break;
        }
    }
    let addr = addr.expect("serve did not start");
    let body = r#"{"model": "chatglm-hf", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 3, "temperature": 0}"#;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"chat.completion\""), "{resp}");
}

/// Peak memory of `glm convert` (its own VmHWM, printed) against the largest tensor and the model.
#[test]
fn conversions_stream_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().to_string();
    // 8 layers, hidden 1024, FFN 4096, vocabulary 16384: 287 MB in fp16; its largest tensor (the
    // embedding, or GeGLU's up projection) is 32 MB.
    let cfg = Config { max_seq_len: 256, ..Config::glm_arch("rss", 8, 1024, 8, 4096, 16384) };
    let meta: BTreeMap<String, String> =
        [("format".to_string(), "glm".to_string()), ("config".to_string(), cfg.to_json())].into();
    write_random(&cfg, &[dir.path().join("big.safetensors")], &meta, 3);
    let model = std::fs::metadata(d("big.safetensors")).unwrap().len() as f64 / 1e6;
    let largest = param_table(&cfg).iter().map(|p| p.numel() * 2).max().unwrap() as f64 / 1e6;
    let peak = |out: &str| -> f64 {
        let s = out.split("peak RSS ").nth(1).expect("peak RSS printed");
        s.split_whitespace().next().unwrap().parse().unwrap()
    };
    for (what, args) in [
        (
            "safetensors -> SAT TP=2",
            vec!["convert", &d("big.safetensors") as &str, &d("sat"), "--to", "sat", "--tp", "2"],
        ),
        ("SAT TP=2 -> safetensors", vec!["convert", &d("sat"), &d("merged.safetensors")]),
        ("SAT TP=2 -> SAT TP=4", vec!["convert", &d("sat"), &d("sat4"), "--to", "sat", "--tp", "4"]),
    ] {
        let out = ok(&args);
        let p = peak(&out);
        println!("{what}: peak RSS {p:.1} MB; model {model:.0} MB, largest tensor {largest:.0} MB");
        assert!(p < 2.0 * largest + 48.0, "{what}: peak RSS {p} MB for a largest tensor of {largest} MB");
        assert!(p < model / 2.5, "{what}: peak RSS {p} MB for a model of {model} MB");
    }
    let a = std::fs::read(d("big.safetensors")).unwrap();
    let b = std::fs::read(d("merged.safetensors")).unwrap();
    // The merged file holds the same tensor bytes (headers differ: source, checksum).
    let data = |x: &[u8]| -> Vec<u8> {
        let n = u64::from_le_bytes(x[..8].try_into().unwrap()) as usize;
        x[8 + n..].to_vec()
    };
    assert!(data(&a) == data(&b), "SAT round trip changed the weights");
}

/// GLM-130B ships no tokenizer: `--tokenizer ice_text.model` (icetk's text model alone) is read in
/// icetk's layout, ids offset by 20000 image tokens and the specials after the text pieces, which
/// is where a GLM-130B-style checkpoint has them.
#[test]
fn sat_folder_with_icetk_s_ice_text_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().to_string();
    // icetk's layout over the fixture's text model: [MASK] at 24000, 24344 ids in all.
    let cfg = Config {
        max_seq_len: 128,
        special_tokens: SpecialTokens::from(24000),
        ..Config::glm_arch("icetk-sat", 2, 64, 4, 128, 24352)
    };
    let meta: BTreeMap<String, String> =
        [("format".to_string(), "glm".to_string()), ("config".to_string(), cfg.to_json())].into();
    write_random(&cfg, &[dir.path().join("m.safetensors")], &meta, 5);
    ok(&["convert", &d("m.safetensors"), &d("sat"), "--to", "sat", "--tp", "2"]);
    // As released: no model_config.json, so the config comes from --config (GLM-130B's own
    // shapes need none).
    std::fs::remove_file(dir.path().join("sat/model_config.json")).unwrap();
    std::fs::write(d("c.json"), cfg.to_json()).unwrap();
    std::fs::copy(fixture("chatglm-tokenizer/old/ice_text.model"), dir.path().join("ice_text.model")).unwrap();
    let a = greedy(&d("sat"), &["--tokenizer", &d("ice_text.model"), "--config", &d("c.json")]);
    assert!(a["text"].as_str().unwrap().starts_with("The whale"), "{a}");
    assert_eq!(greedy(&d("m.safetensors"), &["--tokenizer", &d("ice_text.model")]), a);
    // Without it, the embedded tokenizer's specials are not the checkpoint's.
    let (fine, _, err) = glm(&["generate", "--model", &d("sat"), "--config", &d("c.json"), "Hi"]);
    assert!(!fine && err.contains("[gMASK] = 24001"), "{err}");
    // A model made here is no release: its config's special ids are not checked (a preset's are
    // not its tokenizer's), before or after a trip through SAT.
    let mine = Config { special_tokens: SpecialTokens::from(8000), ..Config::glm_arch("mine", 2, 64, 4, 128, 8192) };
    let meta: BTreeMap<String, String> =
        [("format".to_string(), "glm".to_string()), ("config".to_string(), mine.to_json())].into();
    write_random(&mine, &[dir.path().join("mine.safetensors")], &meta, 9);
    ok(&["convert", &d("mine.safetensors"), &d("mine-sat"), "--to", "sat"]);
    ok(&["convert", &d("mine-sat"), &d("mine2.safetensors")]);
    for m in ["mine.safetensors", "mine-sat", "mine2.safetensors"] {
        assert!(greedy(&d(m), &[])["text"].as_str().unwrap().starts_with("The whale"), "{m}");
    }
}
