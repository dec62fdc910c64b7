//! `glm tokenizer ...` and `glm data ...`: the interface scripts rely on.

use std::io::Write;
use std::process::{Command, Stdio};

fn glm_stdin(args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run glm");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn glm(args: &[&str]) -> (bool, String, String) {
    glm_stdin(args, b"")
}

#[test]
fn encode_then_decode_round_trips_with_the_embedded_tokenizer() {
    let text = "GLM-130B 是一个双语模型。\n  It fills [MASK] blanks.\tTabs too ▁ 😀";
    let (ok, ids, err) = glm_stdin(&["tokenizer", "encode"], format!("{text}\n").as_bytes());
    assert!(ok, "{err}");
    assert_eq!(ids.lines().count(), 1, "ids on one line");
    assert!(ids.split_whitespace().all(|w| w.parse::<u32>().is_ok()));
    assert!(ids.split_whitespace().any(|w| w == "8128"), "[MASK] is id 8128: {ids}");
    let (ok, back, err) = glm_stdin(&["tokenizer", "decode"], ids.as_bytes());
    assert!(ok, "{err}");
    assert_eq!(back, format!("{text}\n"));

    let (ok, _, err) = glm_stdin(&["tokenizer", "encode"], b"bad \xff byte");
    assert!(!ok && err.contains("not UTF-8") && err.contains("offset 4"), "{err}");
    let (ok, _, err) = glm_stdin(&["tokenizer", "decode"], b"1 2 x\n");
    assert!(!ok && err.contains("line 1") && err.contains("\"x\""), "{err}");
    let (ok, _, err) = glm_stdin(&["tokenizer", "decode"], b"99999999\n");
    assert!(!ok && err.contains("99999999"), "{err}");
    let (ok, _, err) = glm_stdin(&["tokenizer", "encode", "--tokenizer", "/no/such/file.json"], b"x");
    assert!(!ok && err.contains("/no/such/file.json"), "{err}");
}

#[test]
fn stats_prints_the_measured_objective_as_json() {
    let (ok, out, err) = glm(&["data", "stats", "--samples", "400", "--seed", "3", "--seq-len", "512"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    for k in ["mask_fraction", "mean_span_length", "mask_mode_share", "gmask_mode_share", "mip_token_share"] {
        assert!(v[k].is_f64(), "{k} in {v}");
    }
    for k in ["mask_fraction", "mask_mode_share", "gmask_mode_share", "mip_token_share"] {
        let x = v[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&x), "{k} = {x}");
    }
    assert!((v["mask_fraction"].as_f64().unwrap() - 0.15).abs() < 0.02, "{v}");
    // Same seed, same numbers.
    let (_, again, _) = glm(&["data", "stats", "--samples", "400", "--seed", "3", "--seq-len", "512"]);
    let w: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(v["mask_fraction"], w["mask_fraction"]);
    assert_eq!(v["mip_token_share"], w["mip_token_share"]);

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("data.toml");
    std::fs::write(&cfg, "[objective]\nseq_len = 256\nmask_mode_prob = 1.0\nmip_token_share = 0.0\n").unwrap();
    let (ok, out, err) = glm(&["data", "stats", "--samples", "100", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["mask_mode_share"], 1.0);
    std::fs::write(&cfg, "[objective]\nmask_ratio = 0.9\n").unwrap();
    let (ok, _, err) = glm(&["data", "stats", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("mask_ratio") && err.contains("data.toml"), "{err}");
    std::fs::write(&cfg, "[objective]\nmask_rato = 0.1\n").unwrap();
    let (ok, _, err) = glm(&["data", "stats", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("mask_rato"), "{err}");
}

#[test]
fn train_a_tokenizer_then_prepare_shards_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.jsonl");
    let mut lines = String::new();
    for i in 0..400 {
        lines += &serde_json::json!({"body": format!("Document {i}: the whale and the sea. 第{i}篇：今天天气很好，我们去公园散步。")}).to_string();
        lines += "\n";
    }
    std::fs::write(&text, lines).unwrap();
    let tok = dir.path().join("tok.json");
    let (ok, _, err) = glm(&[
        "tokenizer",
        "train",
        "--input",
        text.to_str().unwrap(),
        "--field",
        "body",
        "--vocab-size",
        "1024",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, ids, err) =
        glm_stdin(&["tokenizer", "encode", "--tokenizer", tok.to_str().unwrap()], "the whale 今天".as_bytes());
    assert!(ok, "{err}");
    let (_, back, _) = glm_stdin(&["tokenizer", "decode", "--tokenizer", tok.to_str().unwrap()], ids.as_bytes());
    assert_eq!(back, "the whale 今天\n");

    let out = dir.path().join("shards");
    let (ok, report, err) = glm(&[
        "data",
        "prepare",
        "--input",
        text.to_str().unwrap(),
        "--field",
        "body",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shards",
        "3",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(r["documents"], 400);
    assert_eq!(r["shards"].as_array().unwrap().len(), 3);
    // The shards feed `data stats` with the same tokenizer, and are refused with another one.
    let (ok, _, err) = glm(&[
        "data",
        "stats",
        "--samples",
        "50",
        "--seq-len",
        "256",
        "--data",
        out.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = glm(&["data", "stats", "--samples", "50", "--seq-len", "256", "--data", out.to_str().unwrap()]);
    assert!(!ok && err.contains("glm data prepare"), "{err}");
    // A malformed line is named.
    std::fs::write(&text, "{\"body\": \"ok\"}\n{oops\n").unwrap();
    let (ok, _, err) =
        glm(&["data", "prepare", "--input", text.to_str().unwrap(), "--field", "body", "--out", out.to_str().unwrap()]);
    assert!(!ok && err.contains("corpus.jsonl:2"), "{err}");
}
