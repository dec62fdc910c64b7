//! `glm serve` as scripts run it: `--port 0` prints the address, `/health` answers once the model
//! is loaded, SIGTERM stops it cleanly. Then, against the running binary, the official `openai`
//! Python client (env GLM_OPENAI_PYTHON: a Python with `openai`) and the playground page in
//! headless Chromium (playwright-core in crates/glm-server/tests/e2e, Debian's chromium). `.ci/run`
//! installs both and sets GLM_REQUIRE_E2E=1, which turns a missing one into a failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn glm(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_glm")).args(args).output().expect("run glm");
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into())
}

const CONFIG: &str = "max_steps = 2\n[objective]\nseq_len = 64\n[batch]\nmicro_batch = 2\nglobal = 2\nramp_start = 2\n[eval]\nevery = 0\nrows = 2\n";

fn required() -> bool {
    std::env::var("GLM_REQUIRE_E2E").is_ok_and(|v| v == "1")
}

/// Starts `glm serve --port 0` and reads its address from stderr.
fn serve(model: &str, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm"))
        .args(["serve", "--model", model, "--port", "0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start glm serve");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.expect("stderr line");
        if let Some(a) = line.split("listening on ").nth(1) {
            addr = Some(a.trim().to_string());
            break;
        }
    }
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr.expect("glm serve printed no address"))
}

/// A plain HTTP/1.1 GET (`Connection: close`): (status, body).
fn get(url: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n")?.1.to_string()))
}

fn stop(mut child: Child) {
    #[cfg(unix)]
    {
        let pid = child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(status.success(), "glm serve exited with {status} on SIGTERM");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    panic!("glm serve did not stop on SIGTERM");
}

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../glm-server/tests/e2e")
}

/// Runs an end-to-end script if its tools are there; skipped with a note (or failed under
/// GLM_REQUIRE_E2E=1) when they are not.
fn run_script(what: &str, program: Option<String>, args: &[&str], ready: bool) {
    let Some(program) = program.filter(|_| ready) else {
        assert!(!required(), "{what}: its tools are missing and GLM_REQUIRE_E2E=1");
        eprintln!("note: {what} skipped (tools missing; .ci/run installs them)");
        return;
    };
    let o = Command::new(&program).args(args).output().unwrap_or_else(|e| panic!("{what}: running {program}: {e}"));
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{what} failed:\n{out}\n{err}");
    eprintln!("{what}:\n{out}");
}

#[test]
fn serve_answers_the_openai_client_and_the_playground_then_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().to_string();
    std::fs::write(d("t.toml"), CONFIG).unwrap();
    let (ok, err) = glm(&["train", "--config", &d("t.toml"), "--out", &d("run"), "--quiet", "--no-samples"]);
    assert!(ok, "{err}");
    let (ok, err) = glm(&["quantize", "--bits", "4", &d("run/checkpoints/step-00000002"), &d("int4.safetensors")]);
    assert!(ok, "{err}");

    let (child, addr) = serve(&d("int4.safetensors"), &["--api-key", "test-key", "--max-tokens", "2048"]);
    let base = addr.clone();
    assert!(addr.starts_with("http://127.0.0.1:"), "binds loopback by default: {addr}");
    let (code, body) = get(&format!("{base}/health")).expect("curl /health");
    assert!(code == 200 && body.contains("\"ok\""), "{code} {body}");
    let (code, _) = get(&format!("{base}/v1/models")).expect("curl");
    assert_eq!(code, 401, "the API key guards /v1");

    let python = std::env::var("GLM_OPENAI_PYTHON").ok();
    let has_openai = python
        .as_ref()
        .is_some_and(|p| Command::new(p).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success()));
    let script = e2e_dir().join("openai_client.py").to_string_lossy().to_string();
    run_script("openai client conformance", python, &[&script, &base, "test-key"], has_openai);

    let e2e = e2e_dir();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let ready = e2e.join("node_modules/playwright-core").is_dir() && Path::new(&chromium).exists();
    let page = e2e.join("playground.mjs").to_string_lossy().to_string();
    let shot = d("playground.png");
    run_script("playground in headless Chromium", Some("node".into()), &[&page, &base, "test-key", &shot], ready);
    stop(child);

    // Tensor-parallel: the INT4 file served by 2 ranks (threads here; scripts/mpi-tests.sh runs
    // them as MPI processes), rank 0 driving the others: the same client conformance.
    let tp = ["--api-key", "test-key", "--max-tokens", "2048", "--tp", "2", "--ranks", "local"];
    let (child, base) = serve(&d("int4.safetensors"), &tp);
    let (code, body) = get(&format!("{base}/health")).expect("curl /health");
    assert!(code == 200 && body.contains("\"ok\""), "{code} {body}");
    run_script(
        "openai client conformance, --tp 2",
        std::env::var("GLM_OPENAI_PYTHON").ok(),
        &[&script, &base, "test-key"],
        has_openai,
    );
    stop(child);

    // Bad options fail before serving, with a clear message.
    let (ok, err) = glm(&["serve", "--model", &d("int4.safetensors"), "--port", "0", "--max-batch", "0"]);
    assert!(!ok && err.contains("max_batch"), "{err}");
    let (ok, err) = glm(&["serve", "--model", &d("int4.safetensors"), "--port", "0", "--max-prompt-tokens", "0"]);
    assert!(!ok && err.contains("max_prompt_tokens must be at least 1"), "{err}");
    let (ok, err) = glm(&["serve", "--model", &d("missing.safetensors"), "--port", "0"]);
    assert!(!ok && err.contains("missing.safetensors"), "{err}");
}
