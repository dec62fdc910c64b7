//! `glm convert`: released checkpoints in and out (glm-convert), and `--check` of a download.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use glm_checkpoint::torch::TorchDtype;
use glm_convert::check::{read_sha_list, Status};
use glm_convert::{convert as run_convert, planned_bytes, Target};
use glm_quant::Bits;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::infer_cmd::proc_status_bytes;
use crate::ModelArgs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum To {
    /// Our safetensors (dense, or quantized with --quantize or from a quantized source).
    Safetensors,
    /// A SwissArmyTransformer folder (latest + <iteration>/mp_rank_XX_model_states.pt) at --tp ranks.
    Sat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutDtype {
    F16,
    Bf16,
    F32,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// A GLM-130B SAT folder (latest + mp_rank files), a ChatGLM-6B Hugging Face folder, a glm
    /// training checkpoint, or a .safetensors / torch file.
    src: PathBuf,
    /// Where to write: a .safetensors file, or a folder with --to sat.
    dst: Option<PathBuf>,
    /// Output format (default: safetensors).
    #[arg(long, value_enum, default_value = "safetensors")]
    to: To,
    /// Tensor-parallel ranks of a SAT output (GLM-130B: 8 for fp16/INT8, 4 for INT4).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Dense output dtype (default: as stored; quantized sources are dequantized to f16).
    #[arg(long, value_enum)]
    dtype: Option<OutDtype>,
    /// Quantize the block linears to INT8/INT4 (GLM-130B's per-row absmax; for SAT output, per
    /// rank as tools/convert_tp.py does).
    #[arg(long)]
    quantize: Option<u32>,
    /// Replace an existing SAT folder.
    #[arg(long)]
    force: bool,
    /// Only check SRC: each file present, whole and readable (sizes, tensor counts), nothing loaded.
    #[arg(long, conflicts_with = "dst")]
    check: bool,
    /// With --check: also compare SHA-256s with this list (`sha256sum` format: `<hex>  <file>`).
    #[arg(long, requires = "check")]
    sha256: Option<PathBuf>,
    /// Print --check's result as JSON.
    #[arg(long, requires = "check")]
    json: bool,
    /// The model's config, where the files do not say it (a SAT folder of another size, a bare file).
    #[command(flatten)]
    arch: ModelArgs,
}

impl ConvertArgs {
    fn arch(&self) -> Result<Option<glm_model::Config>> {
        Ok(if self.arch.preset.is_some() || self.arch.config.is_some() { Some(self.arch.resolve()?) } else { None })
    }
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    if a.check {
        return check(&a);
    }
    let Some(dst) = a.dst.clone() else {
        bail!("give a destination (a .safetensors file, or a folder with --to sat), or --check")
    };
    let arch = a.arch()?;
    let quantize = a.quantize.map(Bits::from_u32).transpose()?;
    let t0 = std::time::Instant::now();
    let src = glm_convert::open(&a.src, arch.as_ref()).with_context(|| format!("opening {}", a.src.display()))?;
    eprintln!(
        "{}: `{}` ({} layers, hidden {})",
        src.describe(),
        src.config().name,
        src.config().num_layers,
        src.config().hidden_size
    );
    let dtype = a.dtype.map(|d| match d {
        OutDtype::F16 => TorchDtype::F16,
        OutDtype::Bf16 => TorchDtype::BF16,
        OutDtype::F32 => TorchDtype::F32,
    });
    let target = match a.to {
        To::Sat => {
            if dtype.is_some_and(|d| d != TorchDtype::F16) {
                bail!("SAT checkpoints hold fp16 weights: drop --dtype");
            }
            Target::Sat { dir: dst.clone(), tp: a.tp, quantize, overwrite: a.force }
        }
        To::Safetensors => {
            if a.tp != 1 {
                bail!("--tp is for --to sat");
            }
            match (quantize.or(src.bits().filter(|_| dtype.is_none())), dtype) {
                (Some(_), Some(_)) if quantize.is_some() => bail!("--quantize and --dtype exclude each other"),
                (Some(bits), _) => Target::Quantized { path: dst.clone(), bits },
                (None, dtype) => Target::Safetensors { path: dst.clone(), dtype },
            }
        }
    };
    let total = planned_bytes(src.as_ref(), &target);
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
    pb.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = run_convert(src.as_ref(), &target, &mut |n| pb.inc(n))?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let mb = report.bytes as f64 / 1e6;
    println!(
        "wrote {} tensors, {:.1} MB in {:.2} s ({:.1} MB/s) to {}; peak RSS {:.1} MB",
        report.tensors,
        mb,
        secs,
        mb / secs.max(1e-9),
        dst.display(),
        proc_status_bytes("VmHWM:") as f64 / 1e6
    );
    Ok(())
}

fn check(a: &ConvertArgs) -> Result<()> {
    let sha = match &a.sha256 {
        Some(p) => read_sha_list(p)?,
        None => Default::default(),
    };
    let arch = a.arch()?;
    let r = glm_convert::check::check(&a.src, arch.as_ref(), &sha)?;
    if a.json {
        let files: Vec<serde_json::Value> = r
            .files
            .iter()
            .map(|f| {
                let (status, detail) = match &f.status {
                    Status::Ok => ("ok", String::new()),
                    Status::Missing => ("missing", String::new()),
                    Status::Bad(m) => ("bad", m.clone()),
                    Status::Mismatch { want, got } => ("sha256-mismatch", format!("want {want}, got {got}")),
                };
                serde_json::json!({"file": f.name, "bytes": f.bytes, "tensors": f.tensors, "sha256": f.sha256,
                                   "status": status, "detail": detail})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"path": a.src, "format": r.format, "ok": r.ok(), "files": files, "notes": r.notes})
        );
    } else {
        println!("{}: {}", a.src.display(), r.format);
        for f in &r.files {
            let size = f.bytes.map_or("-".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6));
            let tensors = f.tensors.map_or(String::new(), |n| format!("{n} tensors"));
            let status = match &f.status {
                Status::Ok if f.sha256.is_some() => "ok, sha256 matches".to_string(),
                Status::Ok => "ok".to_string(),
                Status::Missing => "MISSING".to_string(),
                Status::Bad(m) => format!("BAD: {m}"),
                Status::Mismatch { want, got } => format!("SHA-256 MISMATCH: want {want}, got {got}"),
            };
            println!("  {:<44} {:>12} {:>12}  {status}", f.name, size, tensors);
        }
        for n in &r.notes {
            println!("  note: {n}");
        }
        println!("{}", if r.ok() { "complete" } else { "PROBLEMS FOUND" });
    }
    if !r.ok() {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Args)]
pub struct ConvertBenchArgs {
    /// Layers of the benchmark model (hidden 2048, 16 heads, FFN 5632, vocabulary 8192: 14 layers
    /// are 1.44 GB in fp16).
    #[arg(long, default_value_t = 14)]
    layers: usize,
    /// Working folder (several copies of the model are written there; default: a temporary folder).
    #[arg(long)]
    work: Option<PathBuf>,
    /// GLM-130B's tools/convert_tp.py, run as the baseline (env GLM_CONVERT_TP).
    #[arg(long, env = "GLM_CONVERT_TP")]
    convert_tp: Option<PathBuf>,
    /// Python with torch for the baseline (env GLM_TORCH_PYTHON).
    #[arg(long, env = "GLM_TORCH_PYTHON", default_value = "python3")]
    torch_python: String,
    /// Skip the time-to-first-token measurement of `glm serve`.
    #[arg(long)]
    no_serve: bool,
    /// Keep the checkpoints written in --work.
    #[arg(long, requires = "work")]
    keep: bool,
}

/// A finished child process: wall seconds, peak RSS (from wait4), its output.
struct Run {
    secs: f64,
    peak_rss: u64,
    ok: bool,
    output: String,
}

fn run_measured(cmd: &mut std::process::Command) -> Result<Run> {
    use std::io::Read;
    use std::process::Stdio;
    // Earlier runs' dirty pages are flushed first, so no run pays for another's writeback.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t = std::time::Instant::now();
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("starting a benchmark process")?;
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    })
    .collect();
    let (mut status, mut ru): (libc::c_int, libc::rusage) = (0, unsafe { std::mem::zeroed() });
    // SAFETY: waits for our own child, writing into locals.
    let r = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    // Until the output is on disk: glm convert syncs its files, torch.save leaves them to the kernel.
    // SAFETY: as above.
    unsafe { libc::sync() };
    let secs = t.elapsed().as_secs_f64();
    if r < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let output = readers.into_iter().map(|h| h.join().unwrap_or_default()).collect::<Vec<_>>().join("");
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok(Run { secs, peak_rss: ru.ru_maxrss as u64 * 1024, ok, output })
}

/// A random fp16 model of `cfg` written as our safetensors, streamed (never whole in memory).
fn write_random_model(cfg: &glm_model::Config, path: &std::path::Path) -> Result<u64> {
    use glm_checkpoint::raw::SafetensorsWriter;
    use glm_model::weights::{param_table, ParamKind};
    let table = param_table(cfg);
    let entries: Vec<_> = table.iter().map(|p| (p.name.clone(), TorchDtype::F16, p.shape.clone())).collect();
    let meta = [("format".to_string(), "glm".to_string()), ("config".to_string(), cfg.to_json())].into_iter().collect();
    let mut w = SafetensorsWriter::create(path, &entries, &meta, false)?;
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = 0u64;
    for p in &table {
        let (base, spread) = match p.kind {
            ParamKind::NormWeight => (1.0f32, 0.02f32),
            _ => (0.0, 0.04),
        };
        let n = p.numel() as usize;
        for chunk in (0..n).step_by(1 << 22) {
            let m = (n - chunk).min(1 << 22);
            let mut buf = Vec::with_capacity(2 * m);
            for _ in 0..m {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                buf.extend(half::f16::from_f32(base + spread * u).to_le_bytes());
            }
            w.write(&buf)?;
            bytes += buf.len() as u64;
        }
    }
    w.finish()?;
    Ok(bytes)
}

/// Two SAT folders hold the same tensors, bit for bit (RoPE's inv_freq aside).
fn same_sat_tensors(a: &std::path::Path, b: &std::path::Path, tp: usize) -> Result<bool> {
    use glm_checkpoint::torch::TorchFile;
    let iter =
        |d: &std::path::Path| -> Result<PathBuf> { Ok(d.join(std::fs::read_to_string(d.join("latest"))?.trim())) };
    for k in 0..tp {
        let name = glm_convert::sat::rank_file(k);
        let (ra, rb) = (
            TorchFile::open(&iter(a)?.join(&name), &["module"])?,
            TorchFile::open(&iter(b)?.join(&name), &["module"])?,
        );
        for n in ra.names().filter(|n| !n.ends_with("inv_freq")) {
            if rb.get(n).is_none() || ra.read(n)? != rb.read(n)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// `glm bench convert`: SAT merges and splits of a 1-2 GB checkpoint by `glm convert` beside GLM-130B's
/// own tools/convert_tp.py (PyTorch) on the same files, each one's wall time, MB/s and peak RSS, and
/// the time from `glm serve --model <SAT folder>` to its first token beside the same model from our
/// safetensors.
pub fn bench_convert(a: ConvertBenchArgs) -> Result<()> {
    let tmp;
    let work = match &a.work {
        Some(w) => w.clone(),
        None => {
            tmp = TempDir::new("glm-bench-convert")?;
            tmp.0.clone()
        }
    };
    std::fs::create_dir_all(&work)?;
    let cfg = glm_model::Config {
        max_seq_len: 512,
        ..glm_model::Config::glm_arch(&format!("bench-{}l", a.layers), a.layers, 2048, 16, 5632, 8192)
    };
    let glm = std::env::current_exe()?;
    let src = work.join("src.safetensors");
    let t = std::time::Instant::now();
    let model_bytes = write_random_model(&cfg, &src)?;
    let mb = model_bytes as f64 / 1e6;
    println!(
        "model: {} ({} layers, hidden 2048, vocabulary 8192), {:.0} MB fp16, written in {:.1} s; CPU: {}",
        cfg.name,
        cfg.num_layers,
        mb,
        t.elapsed().as_secs_f64(),
        glm_bench::cpu_name()
    );
    let glm_convert = |args: &[&std::ffi::OsStr]| -> Result<Run> {
        let r = run_measured(std::process::Command::new(&glm).arg("convert").args(args))?;
        if !r.ok {
            bail!("glm convert failed: {}", r.output);
        }
        Ok(r)
    };
    let p = |x: &PathBuf| x.as_os_str().to_owned();
    let (sat2, sat1, sat4) = (work.join("sat_tp2"), work.join("glm_tp1"), work.join("glm_tp4"));
    for d in [&sat2, &sat1, &sat4] {
        let _ = std::fs::remove_dir_all(d);
    }
    let s = std::ffi::OsString::from;
    let split = glm_convert(&[&p(&src), &p(&sat2), &s("--to"), &s("sat"), &s("--tp"), &s("2")])?;
    let row = |what: &str, r: &Run| {
        println!(
            "{what:<44} {:>7.2} s {:>8.1} MB/s  peak RSS {:>7.1} MB ({:.2}x the model)",
            r.secs,
            mb / r.secs,
            r.peak_rss as f64 / 1e6,
            r.peak_rss as f64 / model_bytes as f64
        )
    };
    println!("{:<44} {:>9} {:>13}  peak RSS", "conversion", "wall", "throughput");
    row("glm convert: safetensors -> SAT TP=2", &split);
    let merge = glm_convert(&[&p(&sat2), &p(&sat1), &s("--to"), &s("sat"), &s("--tp"), &s("1")])?;
    row("glm convert: SAT TP=2 -> TP=1 (merge)", &merge);
    let up = glm_convert(&[&p(&sat2), &p(&sat4), &s("--to"), &s("sat"), &s("--tp"), &s("4")])?;
    row("glm convert: SAT TP=2 -> TP=4 (split)", &up);
    let merged = work.join("merged.safetensors");
    let to_st = glm_convert(&[&p(&sat2), &p(&merged)])?;
    row("glm convert: SAT TP=2 -> our safetensors", &to_st);
    match &a.convert_tp {
        Some(script) if script.is_file() => {
            for (target, ours, what) in [(1, &sat1, "SAT TP=2 -> TP=1 (merge)"), (4, &sat4, "SAT TP=2 -> TP=4 (split)")] {
                let out = work.join(format!("py_tp{target}"));
                let _ = std::fs::remove_dir_all(&out);
                let r = run_measured(
                    std::process::Command::new(&a.torch_python)
                        .arg(script)
                        .arg("--input-folder")
                        .arg(&sat2)
                        .arg("--output-folder")
                        .arg(&out)
                        .arg("--target-tp")
                        .arg(target.to_string()),
                )?;
                if !r.ok {
                    println!("convert_tp.py --target-tp {target} failed: {}", r.output.trim());
                    continue;
                }
                row(&format!("convert_tp.py (torch): {what}"), &r);
                let same = same_sat_tensors(&out, ours, target)?;
                println!("  same tensors as glm convert, bit for bit: {same}");
                let _ = std::fs::remove_dir_all(&out);
            }
        }
        _ => println!("convert_tp.py baseline skipped: give GLM-130B's tools/convert_tp.py with --convert-tp (and a torch in --torch-python)"),
    }
    if !a.no_serve {
        // Alternating runs from the page cache (the loaders are compared, not the disk); medians.
        let models = [("SAT TP=2 folder", &sat2), ("our safetensors", &merged)];
        let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); models.len()];
        for _ in 0..3 {
            for (i, (_, model)) in models.iter().enumerate() {
                warm(model)?;
                times[i].push(serve_first_token(&glm, model, &cfg.name)?);
            }
        }
        for ((what, _), t) in models.iter().zip(&mut times) {
            t.sort_by(|a, b| a.1.total_cmp(&b.1));
            let (load, first) = t[t.len() / 2];
            let all: Vec<String> = t.iter().map(|x| format!("{:.2}", x.1)).collect();
            println!(
                "glm serve --model {what:<16}: listening after {load:.2} s, first token after {first:.2} s (median of {}: {})",
                t.len(),
                all.join(", ")
            );
        }
    }
    if !a.keep {
        for d in [&sat2, &sat1, &sat4] {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_file(&merged);
        let _ = std::fs::remove_file(&src);
    }
    Ok(())
}

/// Seconds from starting `glm serve --model` to it listening, and to the first streamed token of
/// a completion.
fn serve_first_token(glm: &std::path::Path, model: &std::path::Path, name: &str) -> Result<(f64, f64)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let t = std::time::Instant::now();
    let mut child = std::process::Command::new(glm)
        .args(["serve", "--port", "0", "--model"])
        .arg(model)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("serve stderr")?;
    let stdout = child.stdout.take().context("serve stdout")?;
    let lines = BufReader::new(stderr).lines().chain(BufReader::new(stdout).lines());
    let mut addr = None;
    for line in lines {
        let line = line?;
        if let Some(a) = line.split("listening on http://").nth(1) {
            addr = Some(a.trim().to_string());
            break;
        }
    }
    let load = t.elapsed().as_secs_f64();
    let addr = match addr {
        Some(a) => a,
        None => {
            let _ = child.kill();
            bail!("glm serve --model {} did not start", model.display());
        }
    };
    let body = serde_json::json!({"model": name, "prompt": "The whale", "max_tokens": 1, "stream": true}).to_string();
    let mut s = std::net::TcpStream::connect(&addr)?;
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    let mut buf = [0u8; 4096];
    let mut got = String::new();
    while !got.contains("\"text\"") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let first = t.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    if !got.contains("\"text\"") {
        bail!("no token from glm serve: {got}");
    }
    Ok((load, first))
}

/// Reads every file under `path` once.
fn warm(path: &std::path::Path) -> Result<()> {
    use std::io::Read;
    if path.is_dir() {
        for e in std::fs::read_dir(path)?.flatten() {
            warm(&e.path())?;
        }
        return Ok(());
    }
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 16 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let d = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
