//! `glm train`: the interface scripts rely on, and surviving SIGKILL.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A quick configuration: 64-token rows, 4 rows per step, checkpoints every 3 steps.
const CONFIG: &str = r#"
max_steps = 30
[objective]
seq_len = 64
[batch]
micro_batch = 2
global = 4
ramp_start = 4
[optim]
warmup_samples = 8
decay_samples = 120
[eval]
every = 0
rows = 4
[checkpoint]
every = 3
keep = 2
"#;

fn steps(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn glm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_glm")).args(args).output().expect("run glm")
}

#[test]
fn train_writes_metrics_checkpoints_plots_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("train.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = dir.path().join("run");
    let o = glm(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "4",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = steps(&out);
    assert_eq!(m.len(), 4);
    for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(m.iter().all(|v| v[key].is_number()), "{key} missing: {:?}", m[0]);
    }
    assert!(out.join("checkpoints/step-00000004/manifest.json").exists());
    let svg = std::fs::read_to_string(out.join("plots.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("loss scale"));
    let samples = std::fs::read_to_string(out.join("samples.txt")).unwrap();
    assert!(samples.contains("[MASK] fill") && samples.contains("Chinese"), "{samples}");
    let summary: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(summary["step"], 4);
    // A second run into the same directory without --resume is refused, and loses nothing.
    let o = glm(&["train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    assert_eq!(steps(&out).len(), 4);
    // Bad configs are reported, not panicked on.
    std::fs::write(&cfg, "[optim]\nlr = -1\n").unwrap();
    let o = glm(&["train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("optim.lr"));
    std::fs::write(&cfg, "[optim]\nlearning_rate = 1\n").unwrap();
    let o = glm(&["train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("learning_rate"));
}

/// Kill -9 at a random moment, restart with --resume: at most one checkpoint interval is lost and
/// the run completes.
#[test]
fn sigkill_loses_at_most_one_checkpoint_interval() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("train.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = dir.path().join("run");
    let args = ["train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet", "--no-samples"];
    // A pseudo-random kill point between steps 5 and 20, from the clock.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let kill_after = 5 + (nanos % 16) as usize;
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_glm")).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while steps(&out).len() < kill_after && t0.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = steps(&out).iter().filter_map(|v| v["step"].as_u64()).max().unwrap_or(0);
    assert!(done >= kill_after as u64 && done < 30, "killed after {done} steps");

    let mut resumed = args.to_vec();
    resumed.push("--resume");
    let o = glm(&resumed);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    let from = summary["resumed_from"].as_u64().unwrap();
    assert!(done - from <= 3, "killed at step {done}, resumed from {from}: lost more than one interval");
    assert_eq!(summary["step"], 30);
    // The log describes one run: steps 1..=30, each once.
    let logged: Vec<u64> = steps(&out).iter().filter_map(|v| v["step"].as_u64()).collect();
    assert_eq!(logged, (1..=30).collect::<Vec<u64>>());
    // No temporary checkpoint directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

/// Ctrl-C stops after the current step with a checkpoint of that step: nothing is lost.
#[cfg(unix)]
#[test]
fn sigint_stops_with_a_checkpoint_of_the_last_step() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("train.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = dir.path().join("run");
    let args = ["train", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet", "--no-samples"];
    let child = Command::new(env!("CARGO_BIN_EXE_glm"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while steps(&out).len() < 4 && t0.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(summary["interrupted"], true);
    let step = summary["step"].as_u64().unwrap();
    assert!((4..30).contains(&step), "{step}");
    assert!(out.join(format!("checkpoints/step-{step:08}/manifest.json")).exists(), "no checkpoint of step {step}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
}

/// `--tp/--pp` as threads (`--ranks local`): the same log as the single process, a checkpoint
/// sharded over TP ranks and pipeline stages that `glm reshard` turns into the one file
/// `glm generate` reads; and the launch errors a user meets first.
#[test]
fn split_runs_reshard_and_launch_errors() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, CONFIG.replace("max_steps = 30", "max_steps = 3"))?;
    let c = cfg.to_str().ok_or("path")?;
    let (one, split) = (dir.path().join("one"), dir.path().join("split"));
    let base = ["train", "--config", c, "--quiet", "--no-samples", "--out"];
    let o = glm(&[&base[..], &[one.to_str().ok_or("path")?]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let args =
        [&base[..], &[split.to_str().ok_or("path")?, "--tp", "2", "--pp", "2", "--zero", "1", "--ranks", "local"]]
            .concat();
    let o = glm(&args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("tp 2 x pp 2 x dp 1") && err.contains("2 stages of [2, 2] layers"), "{err}");
    let (a, b) = (steps(&one), steps(&split));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        let (l, m) = (x["loss"].as_f64().ok_or("loss")?, y["loss"].as_f64().ok_or("loss")?);
        assert!((l - m).abs() <= 1e-5 * l.abs(), "loss {m} vs the single run's {l}");
    }
    let ckpt = split.join("checkpoints/step-00000003");
    assert!(ckpt.join("model-tp01-of-02-pp01-of-02.safetensors").exists());
    let merged = dir.path().join("merged");
    let o = glm(&["reshard", ckpt.to_str().ok_or("path")?, "--tp", "1", "--out", merged.to_str().ok_or("path")?]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = glm(&["generate", "--model", merged.to_str().ok_or("path")?, "--max-tokens", "4", "The"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let fails = |args: &[&str], want: &[&str]| -> Result<(), Box<dyn std::error::Error>> {
        let o = glm(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success() && !err.contains("panicked"), "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: `{w}` missing from: {err}");
        }
        Ok(())
    };
    let out = dir.path().join("x");
    let out = out.to_str().ok_or("path")?;
    fails(
        &["train", "--config", c, "--out", out, "--tp", "2", "--dp", "2"],
        &["4 ranks", "mpirun -np 4", "--ranks local"],
    )?;
    fails(&["train", "--config", c, "--out", out, "--tp", "3", "--ranks", "local"], &["3 ways", "4 heads"])?;
    fails(
        &["train", "--config", c, "--out", out, "--pp", "5", "--ranks", "local"],
        &["4 layers", "5 pipeline stages"],
    )?;
    // --resume where there is nothing to resume says so; --resume-or-start starts.
    fails(&["train", "--config", c, "--out", out, "--resume"], &["nothing to resume", "--resume-or-start"])?;
    let o = glm(&[
        "train",
        "--config",
        c,
        "--out",
        out,
        "--resume-or-start",
        "--max-steps",
        "1",
        "--quiet",
        "--no-samples",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success() && err.contains("starting a new run"), "{err}");
    let fresh = dir.path().join("y");
    fails(
        &["reshard", ckpt.to_str().ok_or("path")?, "--tp", "3", "--out", fresh.to_str().ok_or("path")?],
        &["3 ways"],
    )?;
    fails(&["reshard", out, "--tp", "2", "--out", merged.to_str().ok_or("path")?], &["x"])?;
    Ok(())
}

/// The checkpoint records what the matrix products ran on; a resume on other compute (here other
/// thread counts) continues and says so once, in the log too; a resume on the same says nothing.
#[test]
fn a_resume_on_other_compute_is_noted() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, CONFIG.replace("max_steps = 30", "max_steps = 3"))?;
    let (c, out) = (cfg.to_str().ok_or("path")?, dir.path().join("run"));
    let out = out.to_str().ok_or("path")?;
    let run = |threads: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_glm"))
            .args(["train", "--config", c, "--out", out, "--quiet", "--no-samples"])
            .args(extra)
            .env("RAYON_NUM_THREADS", threads)
            .output()
    };
    let o = run("2", &["--stop-at", "1"])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run("1", &["--resume", "--stop-at", "2"])?;
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success() && err.contains("resumed on other compute") && err.contains("2 threads"), "{err}");
    let events = std::fs::read_to_string(dir.path().join("run/events.jsonl"))?;
    assert!(events.contains("compute_changed"), "{events}");
    let o = run("1", &["--resume"])?;
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success() && !err.contains("other compute"), "{err}");
    Ok(())
}
