//! `glm generate|fill|eval --tp N --ranks local`: tensor-parallel inference prints exactly what
//! the one-process run prints (a training checkpoint, a bf16 file, an INT4 file; greedy, beams,
//! blanks; an evaluation's scores), once; launch and layout errors are clear messages.

use std::collections::HashMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

fn glm(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_glm")).args(args).output().expect("run glm");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

/// `args` in one process, then with each `--tp N --ranks local`: the same stdout every time.
fn same_as_single(args: &[&str], tps: &[&str]) -> String {
    let (ok, single, err) = glm(args);
    assert!(ok, "{args:?}: {err}");
    assert!(!single.trim().is_empty(), "{args:?}: no output");
    for tp in tps {
        let with = [args, &["--tp", tp, "--ranks", "local"]].concat();
        let (ok, out, err) = glm(&with);
        assert!(ok, "{with:?}: {err}");
        assert_eq!(out, single, "{with:?} printed something else than the single process");
    }
    single
}

const CONFIG: &str = "max_steps = 2\n[objective]\nseq_len = 64\n[batch]\nmicro_batch = 2\nglobal = 2\nramp_start = 2\n[eval]\nevery = 0\nrows = 2\n";

#[test]
fn tensor_parallel_inference_prints_what_one_process_prints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |p: &str| dir.path().join(p).to_string_lossy().to_string();
    std::fs::write(d("t.toml"), CONFIG).expect("config");
    let (ok, _, err) = glm(&["train", "--config", &d("t.toml"), "--out", &d("run"), "--quiet", "--no-samples"]);
    assert!(ok, "{err}");
    let ckpt = d("run/checkpoints/step-00000002");
    let (ok, _, err) = glm(&["quantize", "--bits", "4", &ckpt, &d("int4.safetensors")]);
    assert!(ok, "{err}");
    // The same weights in bf16, in a bare safetensors file (the architecture from --preset).
    let ck = glm_checkpoint::Checkpoint::open(&[dir.path().join("run/checkpoints/step-00000002/model.safetensors")])
        .expect("open");
    let bf16: HashMap<String, Tensor> =
        ck.names().map(|n| (n.to_string(), ck.load(n, DType::BF16, &Device::Cpu).expect("load"))).collect();
    glm_checkpoint::save_atomic(d("bf16.safetensors"), &bf16).expect("save");

    // Greedy continuations (JSON: text, tokens, stop), from each kind of file.
    let greedy = ["generate", "--greedy", "--max-tokens", "8", "--json", "--model"];
    let out = same_as_single(&[&greedy[..], &[&ckpt, "The whale swam"]].concat(), &["2", "4"]);
    let v: Value = serde_json::from_str(out.trim()).expect("one JSON object, printed once");
    assert!(v["text"].as_str().expect("text").starts_with("The whale swam"), "{out}");
    same_as_single(&[&greedy[..], &[&d("int4.safetensors"), "The whale swam"]].concat(), &["2"]);
    same_as_single(&[&greedy[..], &[&d("bf16.safetensors"), "--preset", "tiny", "The sea"]].concat(), &["2"]);
    // Blanks, beams, a seeded sample, streaming.
    let fill = ["fill", "--min-tokens", "1", "--max-tokens", "4", "--greedy", "--model"];
    let out = same_as_single(&[&fill[..], &[&ckpt, "The [MASK] sat on the [MASK]."]].concat(), &["2", "4"]);
    assert!(out.starts_with("The ") && out.trim_end().ends_with('.'), "{out}");
    same_as_single(&["generate", "--model", &d("int4.safetensors"), "--beams", "3", "--max-tokens", "4", "Hi"], &["2"]);
    same_as_single(&["generate", "--model", &ckpt, "--seed", "7", "--max-tokens", "6", "--stream", "Hello"], &["2"]);

    // An evaluation: the same scores (reports without their timings and command line).
    std::fs::create_dir_all(d("data/mc")).expect("dir");
    std::fs::create_dir_all(d("tasks")).expect("dir");
    let q = |i: usize| {
        format!("{{\"inputs_pretokenized\": \"Question {i}: the sky is\", \"choices_pretokenized\": [\"blue\", \"red\", \"green\"], \"label\": {}}}\n", i % 3)
    };
    std::fs::write(d("data/mc/x.jsonl"), (0..6).map(q).collect::<String>()).expect("data");
    std::fs::write(d("tasks/mc.yaml"), "name: mc\ntype: mul\npath: mc\nfile-pattern: \"*.jsonl\"\n").expect("task");
    std::fs::create_dir_all(d("data/lm")).expect("dir");
    std::fs::write(
        d("data/lm/en.jsonl"),
        "{\"text\": \"The sea is wide and the river is long, and the whale swims.\"}\n",
    )
    .expect("data");
    std::fs::write(d("tasks/lm.yaml"), "name: lm\ntype: lm\npath: lm\ngeneration_length: 8\n").expect("task");
    let (tasks, data) = (d("tasks"), d("data"));
    let eval = |out: &str, extra: &[&str]| {
        let args =
            [&["eval", "--model", &ckpt, "--tasks", &tasks, "--data-root", &data, "--quiet", "--out", out][..], extra]
                .concat();
        let (ok, md, err) = glm(&args);
        assert!(ok, "{args:?}: {err}");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(out).expect("report")).expect("json");
        (md, v)
    };
    let (_, one) = eval(&d("one.json"), &[]);
    let (md, two) = eval(&d("two.json"), &["--tp", "2", "--ranks", "local"]);
    assert!(md.contains("| mc | all | Accuracy |") && md.contains("| lm | all | BPB |"), "{md}");
    assert_eq!(one["model_sha256"], two["model_sha256"]);
    for key in ["tasks", "groups", "files"] {
        let (a, b) = (one[key].as_array().expect("rows"), two[key].as_array().expect("rows"));
        assert_eq!(a.len(), b.len(), "{key}");
        for (x, y) in a.iter().zip(b) {
            for f in ["task", "group", "metric", "examples"] {
                assert_eq!(x[f], y[f], "{key}: {f}");
            }
            // Accuracy exactly; the language-modelling losses to f32 rounding of the summed logits.
            let (u, v) = (x["value"].as_f64().expect("value"), y["value"].as_f64().expect("value"));
            assert!((u - v).abs() <= 1e-6 * u.abs(), "{key} {}: {v} at TP 2, {u} in one process", x["metric"]);
        }
    }
    let rows = one["tasks"].as_array().expect("rows");
    assert!(rows.iter().any(|r| r["metric"] == "Accuracy" && r["examples"] == 6), "{rows:?}");

    // Errors: no launcher, a degree that does not divide the model, MPI without an MPI build, an
    // INT4 file whose row-parallel slices would split packed bytes.
    let fails = |args: &[&str], want: &[&str]| {
        let (ok, _, err) = glm(args);
        assert!(!ok && !err.contains("panicked"), "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: `{w}` missing from: {err}");
        }
    };
    fails(
        &["generate", "--model", &ckpt, "--tp", "2", "x"],
        &["2 ranks", "mpirun -np 2 glm generate", "--ranks local"],
    );
    fails(&["fill", "--model", &ckpt, "--tp", "3", "--ranks", "local", "a [MASK]"], &["3 ways", "4 heads"]);
    fails(
        &["eval", "--model", &ckpt, "--tasks", &tasks, "--data-root", &data, "--tp", "3", "--ranks", "local"],
        &["3 ways", "4 heads"],
    );
    if !cfg!(feature = "mpi") {
        fails(
            &["generate", "--model", &ckpt, "--tp", "2", "--ranks", "mpi", "x"],
            &["built with MPI", "--ranks local"],
        );
    }
    let odd = glm_model::Config { ffn_hidden_size: 388, ..glm_model::Config::tiny() };
    let w = glm_model::init_weights(&odd, 1, &Device::Cpu).expect("init");
    let load = |name: &str| w.get(name).cloned().ok_or_else(|| format!("no tensor {name}"));
    glm_quant::quantize_tensors(&odd, load, glm_quant::Bits::Int4, &dir.path().join("odd.safetensors"))
        .expect("quantize");
    fails(
        &["generate", "--model", &d("odd.safetensors"), "--tp", "4", "--ranks", "local", "x"],
        &["dense_4h_to_h", "INT4", "each rank 97", "split a packed byte"],
    );
}
