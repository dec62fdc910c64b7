//! `glm eval`: the interface scripts rely on (`--model --tasks --out`, a report with a `tasks` list
//! of task/metric/value/examples), comparisons, and clear errors for bad task and data files.

use std::process::Command;

use serde_json::Value;

fn glm(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_glm")).args(args).output().expect("run glm");
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

const CONFIG: &str = "max_steps = 2\n[objective]\nseq_len = 64\n[batch]\nmicro_batch = 2\nglobal = 2\nramp_start = 2\n[eval]\nevery = 0\nrows = 2\n";

#[test]
fn eval_reports_compares_and_names_bad_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |p: &str| dir.path().join(p).to_string_lossy().to_string();
    std::fs::write(d("t.toml"), CONFIG).expect("config");
    let (ok, _, err) = glm(&["train", "--config", &d("t.toml"), "--out", &d("run"), "--quiet", "--no-samples"]);
    assert!(ok, "{err}");
    let ckpt = d("run/checkpoints/step-00000002");
    let (ok, _, err) = glm(&["quantize", "--bits", "4", &ckpt, &d("int4.safetensors")]);
    assert!(ok, "{err}");
    // A data root with a multiple-choice task in two groups, a generation task and an LM task.
    std::fs::create_dir_all(d("data/mc/a")).expect("dir");
    std::fs::create_dir_all(d("data/mc/b")).expect("dir");
    std::fs::create_dir_all(d("data/lm")).expect("dir");
    std::fs::create_dir_all(d("tasks")).expect("dir");
    let q = |i: usize| {
        format!("{{\"inputs_pretokenized\": \"Question {i}: the sky is\", \"choices_pretokenized\": [\"blue\", \"red\"], \"label\": {}, \"targets_pretokenized\": \"blue\"}}\n", i % 2)
    };
    std::fs::write(d("data/mc/a/x.jsonl"), (0..4).map(q).collect::<String>()).expect("data");
    std::fs::write(d("data/mc/b/y.jsonl"), (4..10).map(q).collect::<String>()).expect("data");
    std::fs::write(
        d("data/lm/en.jsonl"),
        "{\"text\": \"The sea is wide and the river is long.\"}\n{\"text\": \"海很宽，河很长。\"}\n",
    )
    .expect("data");
    std::fs::write(
        d("tasks/mc.yaml"),
        "name: mc\ntype: mul\npath: mc\nfile-pattern:\n  a: \"a/*.jsonl\"\n  b: \"b/*.jsonl\"\nmicro-batch-size: 4\n",
    )
    .expect("task");
    std::fs::write(
        d("tasks/gen.yaml"),
        "name: gen\ntype: gen\npath: mc\nfile_pattern: \"*/*.jsonl\"\nmax_gen_length: 2\n",
    )
    .expect("task");
    std::fs::write(d("tasks/lm.yaml"), "name: lm\ntype: lm\npath: lm\ngeneration_length: 8\n").expect("task");
    let mut reports = Vec::new();
    for (model, out) in [(ckpt.as_str(), "full.json"), (&d("int4.safetensors"), "int4.json")] {
        let (ok, md, err) = glm(&[
            "eval",
            "--model",
            model,
            "--tasks",
            &d("tasks"),
            "--data-root",
            &d("data"),
            "--out",
            &d(out),
            "--quiet",
        ]);
        assert!(ok, "{err}");
        assert!(md.contains("| mc | all | Accuracy |") && md.contains("| lm | all | BPB |"), "{md}");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(d(out)).expect("report")).expect("json");
        let tasks = v["tasks"].as_array().expect("tasks");
        let row = |t: &str, m: &str| tasks.iter().find(|r| r["task"] == t && r["metric"] == m).cloned().expect("row");
        assert_eq!(row("mc", "Accuracy")["examples"], 10);
        assert_eq!(row("gen", "EM")["examples"], 10);
        assert!(row("lm", "BPB")["value"].as_f64().expect("bpb") > 0.0);
        assert_eq!(v["groups"].as_array().expect("groups").len(), 2); // mc's groups a and b
        assert_eq!(v["model_sha256"].as_str().expect("sha").len(), 64);
        reports.push(v);
    }
    // Deterministic: the same model gives the same numbers.
    let (ok, _, err) = glm(&[
        "eval",
        "--model",
        &ckpt,
        "--tasks",
        &d("tasks/mc.yaml"),
        "--data-root",
        &d("data"),
        "--out",
        &d("again.json"),
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let again: Value = serde_json::from_str(&std::fs::read_to_string(d("again.json")).expect("report")).expect("json");
    assert_eq!(
        again["tasks"][0]["value"],
        reports[0]["tasks"].as_array().expect("t").iter().find(|r| r["task"] == "mc").expect("mc")["value"]
    );
    let (ok, table, err) = glm(&["eval", "--compare", &d("full.json"), &d("int4.json"), "--threshold", "0.5"]);
    assert!(ok && table.contains("| mc | Accuracy |") && table.contains("beyond the threshold"), "{err}{table}");
    // Bad inputs: a task file, a data line, a missing data root.
    std::fs::write(d("bad.yaml"), "name: x\ntype: classify\npath: mc\n").expect("bad");
    let (ok, _, err) = glm(&["eval", "--model", &ckpt, "--tasks", &d("bad.yaml"), "--data-root", &d("data")]);
    assert!(!ok && err.contains("bad.yaml"), "{err}");
    std::fs::write(
        d("data/mc/b/z.jsonl"),
        "{\"inputs_pretokenized\": \"q\", \"choices_pretokenized\": [\"a\"], \"label\": 0}\n{broken\n",
    )
    .expect("data");
    let (ok, _, err) =
        glm(&["eval", "--model", &ckpt, "--tasks", &d("tasks/mc.yaml"), "--data-root", &d("data"), "--quiet"]);
    assert!(!ok && err.contains("z.jsonl") && err.contains("line 2"), "{err}");
    let (ok, _, err) = glm(&["eval", "--model", &ckpt, "--tasks", &d("tasks/lm.yaml"), "--data-root", &d("nowhere")]);
    assert!(!ok && err.contains("--data-root"), "{err}");
    // The committed task files on the committed subset of the real data (MMLU, BIG-bench Lite,
    // iNews, the LAMBADA-style cloze, bits per byte), two examples per file.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let (ok, md, err) = glm(&[
        "eval",
        "--model",
        &d("int4.safetensors"),
        "--tasks",
        &format!("{root}/assets/eval/tasks"),
        "--data-root",
        &format!("{root}/assets/eval/data"),
        "--limit",
        "2",
        "--out",
        &d("subset.json"),
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(d("subset.json")).expect("report")).expect("json");
    let names: Vec<&str> =
        v["task_files"].as_array().expect("files").iter().filter_map(|t| t["name"].as_str()).collect();
    for want in
        ["MMLU", "BIG-bench-lite-mul", "BIG-bench-lite-gen", "iNews-sentiment", "LAMBADA-style", "BPB-en", "BPB-zh"]
    {
        assert!(names.contains(&want), "{want} missing from {names:?}\n{md}");
    }
    assert!(md.contains("| MMLU | stem | Accuracy |"), "{md}");
}
