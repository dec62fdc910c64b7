//! `glm quantize`, `glm generate`, `glm fill`: the interface scripts rely on.

use std::process::Command;

use serde_json::Value;

fn glm(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_glm")).args(args).output().expect("run glm");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

const CONFIG: &str = "max_steps = 2\n[objective]\nseq_len = 64\n[batch]\nmicro_batch = 2\nglobal = 2\nramp_start = 2\n[eval]\nevery = 0\nrows = 2\n";

#[test]
fn quantize_then_generate_and_fill() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().to_string();
    std::fs::write(d("t.toml"), CONFIG).unwrap();
    let (ok, _, err) = glm(&["train", "--config", &d("t.toml"), "--out", &d("run"), "--quiet", "--no-samples"]);
    assert!(ok, "{err}");
    let ckpt = d("run/checkpoints/step-00000002");
    for bits in ["8", "4"] {
        let out = d(&format!("int{bits}.safetensors"));
        let (ok, _, err) = glm(&["quantize", "--bits", bits, &ckpt, &out]);
        assert!(ok, "{err}");
        assert!(err.contains(&format!("INT{bits}")), "{err}");
        let (ok, json, err) = glm(&["generate", "--model", &out, "--greedy", "--max-tokens", "5", "--json", "Hello"]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(json.trim()).unwrap();
        assert!(v["text"].as_str().unwrap().starts_with("Hello"));
        assert!(v["tokens"].as_array().unwrap().len() <= 5);
        let (ok, text, err) =
            glm(&["fill", "--model", &out, "--min-tokens", "1", "--max-tokens", "4", "The [MASK] sat."]);
        assert!(ok, "{err}");
        assert!(text.starts_with("The ") && text.trim_end().ends_with(" sat."), "{text}");
    }
    let (ok, text, err) =
        glm(&["generate", "--model", &d("int4.safetensors"), "--beams", "3", "--max-tokens", "4", "Hello"]);
    assert!(ok && text.starts_with("Hello"), "{err}");
    let (ok, text, err) = glm(&[
        "fill",
        "--model",
        &d("int4.safetensors"),
        "--beams",
        "3",
        "--min-tokens",
        "1",
        "--max-tokens",
        "4",
        "A [MASK] and a [MASK].",
    ]);
    assert!(ok && text.starts_with("A ") && text.trim_end().ends_with('.'), "{err}");
    let (ok, text, err) =
        glm(&["generate", "--model", &d("int4.safetensors"), "--stream", "--max-tokens", "4", "Hello"]);
    assert!(ok && text.starts_with("Hello"), "{err}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm"))
        .args(["chat", "--model", &d("int4.safetensors"), "--max-tokens", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), "你好\nHello there\n".as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).matches('\n').count() >= 2, "an answer line per question");
    // The dense training checkpoint works too, with the same interface.
    let (ok, _, err) = glm(&["generate", "--model", &ckpt, "--max-tokens", "3", "--seed", "5", "Hi"]);
    assert!(ok, "{err}");
    // Errors: another architecture, a prompt longer than the context, no blank, not a checkpoint.
    let int4 = d("int4.safetensors");
    let (ok, _, err) = glm(&["generate", "--model", &int4, "--preset", "small", "x"]);
    assert!(!ok && err.contains("not the `small`"), "{err}");
    let long = "word ".repeat(600);
    let (ok, _, err) = glm(&["generate", "--model", &int4, &long]);
    assert!(!ok && err.contains("max_seq_len"), "{err}");
    let (ok, _, err) = glm(&["fill", "--model", &int4, "no blanks here"]);
    assert!(!ok && err.contains("[MASK]"), "{err}");
    std::fs::write(d("junk.safetensors"), b"junk").unwrap();
    let (ok, _, err) = glm(&["generate", "--model", &d("junk.safetensors"), "x"]);
    assert!(!ok && err.contains("junk.safetensors"), "{err}");
    let (ok, _, err) = glm(&["quantize", "--bits", "3", &ckpt, &d("x.safetensors")]);
    assert!(!ok && err.contains("8 or 4"), "{err}");
    // Sampling parameters: a tiny temperature is greedy; out-of-range values get the server's words.
    let greedy = glm(&["generate", "--model", &int4, "--greedy", "--max-tokens", "6", "--json", "Hello"]);
    for t in ["1e-300", "1e-40"] {
        let (ok, out, err) =
            glm(&["generate", "--model", &int4, "--temperature", t, "--max-tokens", "6", "--json", "Hello"]);
        assert!(ok && out == greedy.1, "temperature {t}: {out} vs greedy {} {err}", greedy.1);
    }
    for (flag, v, want) in [
        ("--top-p", "2", "top_p must be in (0, 1] (1: off), got 2"),
        ("--top-p", "0", "top_p"),
        ("--temperature", "3", "temperature must be in [0, 2], got 3"),
    ] {
        let (ok, _, err) = glm(&["generate", "--model", &int4, flag, v, "x"]);
        assert!(!ok && err.contains(want), "{flag} {v}: {err}");
    }
    // A tokenizer with more ids than the model is refused at load: the embedded one (8192 ids)
    // against a model of 8160.
    let small = glm_model::Config { vocab_size: 8160, ..glm_model::Config::tiny() };
    std::fs::write(d("small.json"), serde_json::to_string(&small).unwrap()).unwrap();
    let w = glm_model::init_weights(&small, 1, &candle_core::Device::Cpu).unwrap();
    glm_model::save_weights(&small, std::path::Path::new(&d("small.safetensors")), &w).unwrap();
    let (ok, _, err) = glm(&["generate", "--model", &d("small.safetensors"), "--config", &d("small.json"), "x"]);
    assert!(!ok && err.contains("8192 ids but the model's vocabulary only 8160"), "{err}");
    // A quantized file whose header claims max_seq_len = 1e12 is refused at load, not served.
    let bytes = std::fs::read(&int4).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut cfg: Value = serde_json::from_str(header["__metadata__"]["config"].as_str().unwrap()).unwrap();
    cfg["max_seq_len"] = serde_json::json!(1_000_000_000_000u64);
    header["__metadata__"]["config"] = Value::String(cfg.to_string());
    let mut h = header.to_string().into_bytes();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let huge = d("huge.safetensors");
    std::fs::write(&huge, [&(h.len() as u64).to_le_bytes()[..], &h, &bytes[8 + n..]].concat()).unwrap();
    let (ok, _, err) = glm(&["generate", "--model", &huge, "x"]);
    assert!(!ok && err.contains("max_seq_len = 1000000000000 is over the limit"), "{err}");
}

#[test]
fn bench_decode_prints_json_lines_per_precision() {
    let (ok, out, err) =
        glm(&["bench", "decode", "--preset", "tiny", "--prompt", "8", "--new", "4", "--json", "--no-torch"]);
    assert!(ok, "{err}");
    let rows: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 3);
    for (r, p) in rows.iter().zip(["f32", "int8", "int4"]) {
        assert_eq!(r["precision"], p);
        for k in ["decode_tokens_per_s", "prefill_tokens_per_s", "floor_tokens_per_s", "peak_rss_bytes"] {
            assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {r}");
        }
    }
}
