//! The run's logs, one JSON object per line, flushed line by line:
//! `metrics.jsonl` (one per step: step, loss, lr, grad_norm, tokens_per_s, loss_scale, egs_alpha,
//! batch, per-group norms), `eval.jsonl` (validation) and `events.jsonl` (interventions, overflows,
//! rollbacks, resumes). `plots.svg` draws them. On resume, records past the restored step are dropped
//! (their work was lost with the process), so logs and plots describe the run that continues. The
//! logs are append-only otherwise: a kept line is never rewritten (its bytes stay as written), a log
//! with nothing to drop is not touched, and numbers are parsed exactly (serde_json's
//! `float_roundtrip`), so a record read back is the value that was logged.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use glm_plot::{Mark, Panel, Series, Style};
use serde_json::Value;

use crate::{Error, Result};

pub const METRICS: &str = "metrics.jsonl";
pub const EVAL: &str = "eval.jsonl";
pub const EVENTS: &str = "events.jsonl";
pub const PLOTS: &str = "plots.svg";

struct Log {
    path: PathBuf,
    /// None: records kept in memory only (ranks other than the first of a distributed run).
    file: Option<File>,
    records: Vec<Value>,
}

impl Log {
    /// Open `path`, keeping the records with step <= `keep_until` (none when None). Kept lines keep
    /// their bytes; the file is rewritten (atomically) only when a line goes.
    fn open(path: PathBuf, keep_until: Option<u64>) -> Result<Self> {
        let io = |e: std::io::Error| Error::Io(format!("{}: {e}", path.display()));
        let old = fs::read_to_string(&path).ok();
        let (mut kept, mut records) = (String::new(), Vec::new());
        if let (Some(text), Some(s)) = (&old, keep_until) {
            for line in text.lines() {
                // A torn last line (the process died mid-write) is dropped.
                let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
                if v["step"].as_u64().is_some_and(|x| x <= s) {
                    kept.push_str(line);
                    kept.push('\n');
                    records.push(v);
                }
            }
        }
        if old.as_deref() != Some(kept.as_str()) {
            glm_checkpoint::write_atomic(&path, kept.as_bytes()).map_err(io)?;
        }
        let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        Ok(Self { path, file: Some(file), records })
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            let line = format!("{v}\n");
            f.write_all(line.as_bytes()).map_err(|e| Error::Io(format!("{}: {e}", self.path.display())))?;
        }
        self.records.push(v);
        Ok(())
    }
}

pub struct Metrics {
    dir: PathBuf,
    steps: Log,
    evals: Log,
    events: Log,
}

impl Metrics {
    /// Open the logs of `dir`: with `resume_step`, records after it are dropped; without, they start empty.
    pub fn open(dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            steps: Log::open(dir.join(METRICS), resume_step)?,
            evals: Log::open(dir.join(EVAL), resume_step)?,
            events: Log::open(dir.join(EVENTS), resume_step)?,
        })
    }

    /// Logs kept in memory, writing nothing: every rank but the first of a distributed run.
    pub fn memory(dir: &Path) -> Self {
        let log = |name: &str| Log { path: dir.join(name), file: None, records: Vec::new() };
        Self { dir: dir.to_path_buf(), steps: log(METRICS), evals: log(EVAL), events: log(EVENTS) }
    }

    pub fn step(&mut self, v: Value) -> Result<()> {
        self.steps.push(v)
    }

    pub fn eval(&mut self, v: Value) -> Result<()> {
        self.evals.push(v)
    }

    pub fn event(&mut self, v: Value) -> Result<()> {
        self.events.push(v)
    }

    pub fn steps(&self) -> &[Value] {
        &self.steps.records
    }

    /// Draw loss, learning rate, gradient norms, loss scale, throughput and EGS alpha, with every
    /// intervention marked.
    pub fn plot(&self, title: &str) -> Result<PathBuf> {
        let xy = |recs: &[Value], key: &str| -> Vec<(f64, f64)> {
            recs.iter().filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?))).collect::<Vec<_>>()
        };
        let line = |name: &str, points| Series { name: name.into(), points, style: Style::Line };
        let dots = |name: &str, points| Series { name: name.into(), points, style: Style::Dots };
        let marks: Vec<Mark> = self
            .events
            .records
            .iter()
            .filter(|e| e["intervention"].as_bool().unwrap_or(false))
            .filter_map(|e| Some(Mark { x: e["step"].as_f64()?, label: e["action"].as_str().unwrap_or("").into() }))
            .collect();
        let s = &self.steps.records;
        let panel = |title: &str, y: &str, log_y, series| Panel {
            title: title.into(),
            x_label: "step".into(),
            y_label: y.into(),
            log_y,
            series,
            marks: marks.clone(),
        };
        let mut group_series = vec![line("global", xy(s, "grad_norm"))];
        if let Some(Value::Object(groups)) = s.last().map(|v| &v["grad_norms"]) {
            for g in groups.keys() {
                let pts = s.iter().filter_map(|v| Some((v["step"].as_f64()?, v["grad_norms"][g].as_f64()?))).collect();
                group_series.push(line(g, pts));
            }
        }
        let panels = vec![
            panel(
                "loss",
                "nats / token",
                false,
                vec![
                    line("train", xy(s, "loss")),
                    dots("held-out", xy(&self.evals.records, "val_loss")),
                    dots("unigram baseline", xy(&self.evals.records, "unigram_loss")),
                ],
            ),
            panel(
                "held-out bits per byte",
                "bits / byte",
                false,
                vec![dots("model", xy(&self.evals.records, "val_bpb"))],
            ),
            panel("learning rate", "lr", false, vec![line("lr", xy(s, "lr"))]),
            panel("gradient norm (before clipping)", "L2 norm", true, group_series),
            panel("loss scale", "scale", true, vec![line("loss scale", xy(s, "loss_scale"))]),
            panel("throughput", "tokens / s", false, vec![line("tokens/s", xy(s, "tokens_per_s"))]),
            panel(
                "EGS alpha and LR factor",
                "value",
                false,
                vec![line("egs_alpha", xy(s, "egs_alpha")), line("lr_scale", xy(s, "lr_scale"))],
            ),
            panel("global batch", "rows", false, vec![line("rows", xy(s, "batch"))]),
        ];
        let path = self.dir.join(PLOTS);
        glm_plot::write_svg(&path, title, &panels, 2).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resume keeps the lines before its step byte for byte (numbers included), drops the rest
    /// and a torn last line, and leaves a log with nothing to drop untouched.
    #[test]
    fn resume_keeps_lines_exactly_and_only_drops_the_lost_ones() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Io(e.to_string()))?;
        let path = dir.path().join(METRICS);
        let lines = [
            r#"{"step":1,"loss":9.164031982421875,"lr":1e-3}"#,
            r#"{"loss":0.30000000000000004,"step":2,"grad_norm":1.7976931348623157e308}"#,
            r#"{"step":3,"loss":5e-324}"#,
        ];
        let text = format!("{}\n{}\n{}\n{{\"step\":4,\"lo", lines[0], lines[1], lines[2]);
        fs::write(&path, &text).map_err(|e| Error::Io(e.to_string()))?;
        let m = Metrics::open(dir.path(), Some(2))?;
        let after = fs::read_to_string(&path).map_err(|e| Error::Io(e.to_string()))?;
        assert_eq!(after, format!("{}\n{}\n", lines[0], lines[1]));
        assert_eq!(m.steps()[0]["loss"].as_f64(), Some(9.164031982421875));
        assert_eq!(m.steps()[1]["loss"].as_f64(), Some(0.30000000000000004));
        drop(m);
        // Nothing to drop: not rewritten (same bytes, same inode).
        let ino = |p: &Path| fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0);
        let before = ino(&path);
        let mut m = Metrics::open(dir.path(), Some(10))?;
        assert_eq!(ino(&path), before);
        m.step(serde_json::json!({"step": 3, "loss": 1.0000000000000002}))?;
        let after = fs::read_to_string(&path).map_err(|e| Error::Io(e.to_string()))?;
        assert_eq!(after, format!("{}\n{}\n{{\"loss\":1.0000000000000002,\"step\":3}}\n", lines[0], lines[1]));
        Ok(())
    }
}
