//! Reports: every task's metrics per file, per group and overall (computed from summed counts, so
//! a group or task is weighted by its examples), with what is needed to reproduce them (the
//! command, the task files, the model's SHA-256, the seed). JSON for scripts, Markdown for people;
//! `compare` puts two reports side by side and flags the differences beyond a threshold.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::run::{metrics_of, FileScore};
use crate::task::{TaskConfig, TaskType};
use crate::{Error, Result};

/// One metric of a task (or of one group or file of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub metric: String,
    pub value: f64,
    pub examples: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub model: String,
    pub model_sha256: String,
    pub seed: u64,
    pub data_root: String,
    pub command: Vec<String>,
    /// Each task file as loaded: name, type, path, source file and its SHA-256.
    pub task_files: Vec<serde_json::Value>,
    /// Per task: metrics over all its files.
    pub tasks: Vec<Row>,
    pub groups: Vec<Row>,
    pub files: Vec<Row>,
    pub seconds: f64,
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn add(into: &mut BTreeMap<String, f64>, from: &BTreeMap<String, f64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// The rows of one task's file scores: per file, per group, overall.
pub fn task_rows(task: &TaskConfig, scores: &[FileScore]) -> (Vec<Row>, Vec<Row>, Vec<Row>) {
    let rows = |kind: TaskType, group: Option<&str>, file: Option<&str>, n: usize, sums: &BTreeMap<String, f64>| {
        metrics_of(kind, n, sums)
            .into_iter()
            .map(|(metric, value)| Row {
                task: task.name.clone(),
                group: group.map(str::to_string),
                file: file.map(str::to_string),
                metric,
                value,
                examples: n,
            })
            .collect::<Vec<_>>()
    };
    let (mut files, mut groups) = (Vec::new(), Vec::new());
    let mut by_group: Vec<(String, usize, BTreeMap<String, f64>)> = Vec::new();
    let (mut all_n, mut all) = (0, BTreeMap::new());
    for s in scores {
        files.extend(rows(task.kind, Some(&s.group), Some(&s.file), s.examples, &s.sums));
        match by_group.iter_mut().find(|(g, _, _)| *g == s.group) {
            Some((_, n, sums)) => {
                *n += s.examples;
                add(sums, &s.sums);
            }
            None => by_group.push((s.group.clone(), s.examples, s.sums.clone())),
        }
        all_n += s.examples;
        add(&mut all, &s.sums);
    }
    if by_group.len() > 1 {
        for (g, n, sums) in &by_group {
            groups.extend(rows(task.kind, Some(g), None, *n, sums));
        }
    }
    (rows(task.kind, None, None, all_n, &all), groups, files)
}

impl Report {
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "Model `{}` (SHA-256 `{}`), seed {}, data root `{}`, {:.1} s\n\n`{}`\n\n",
            self.model,
            &self.model_sha256[..self.model_sha256.len().min(16)],
            self.seed,
            self.data_root,
            self.seconds,
            self.command.join(" ")
        );
        s += "| task | group | metric | value | examples |\n|---|---|---|---:|---:|\n";
        let mut rows: Vec<&Row> = self.tasks.iter().collect();
        rows.extend(self.groups.iter());
        rows.sort_by(|a, b| {
            (a.task.as_str(), a.group.is_some(), &a.group).cmp(&(b.task.as_str(), b.group.is_some(), &b.group))
        });
        for r in rows {
            s += &format!(
                "| {} | {} | {} | {} | {} |\n",
                r.task,
                r.group.as_deref().unwrap_or("all"),
                r.metric,
                fmt_value(&r.metric, r.value),
                r.examples
            );
        }
        s
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::io(path, format!("not a glm eval report: {e}")))
    }
}

fn fmt_value(metric: &str, v: f64) -> String {
    if is_fraction(metric) {
        format!("{:.2}%", 100.0 * v)
    } else {
        format!("{v:.4}")
    }
}

fn is_fraction(metric: &str) -> bool {
    matches!(metric, "Accuracy" | "EM" | "F1")
}

/// Per task and metric: A, B, B - A; flagged (`!`) when |B - A| exceeds `threshold` (absolute for
/// accuracy/EM/F1, relative for perplexity and bits per byte). Returns the Markdown table and
/// the number of flagged rows.
pub fn compare(a: &Report, b: &Report, threshold: f64) -> (String, usize) {
    let mut s = format!(
        "A: `{}` ({}), B: `{}` ({}), threshold {threshold}\n\n| task | metric | A | B | B - A | |\n|---|---|---:|---:|---:|---|\n",
        a.model,
        &a.model_sha256[..a.model_sha256.len().min(12)],
        b.model,
        &b.model_sha256[..b.model_sha256.len().min(12)]
    );
    let mut flagged = 0;
    for ra in &a.tasks {
        let Some(rb) = b.tasks.iter().find(|r| r.task == ra.task && r.metric == ra.metric) else {
            s += &format!("| {} | {} | {} | missing | | |\n", ra.task, ra.metric, fmt_value(&ra.metric, ra.value));
            continue;
        };
        let d = rb.value - ra.value;
        let off = if is_fraction(&ra.metric) { d.abs() } else { d.abs() / ra.value.abs().max(1e-12) };
        let flag = off > threshold;
        flagged += flag as usize;
        let delta = if is_fraction(&ra.metric) { format!("{:+.2} pts", 100.0 * d) } else { format!("{d:+.4}") };
        s += &format!(
            "| {} | {} | {} | {} | {delta} | {} |\n",
            ra.task,
            ra.metric,
            fmt_value(&ra.metric, ra.value),
            fmt_value(&rb.metric, rb.value),
            if flag { "!" } else { "" }
        );
    }
    (s, flagged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(acc: f64, bpb: f64) -> Report {
        let row = |metric: &str, value| Row {
            task: "t".into(),
            group: None,
            file: None,
            metric: metric.into(),
            value,
            examples: 10,
        };
        Report {
            model: "m".into(),
            model_sha256: "ab".repeat(32),
            seed: 1,
            data_root: ".".into(),
            command: vec!["glm".into(), "eval".into()],
            task_files: vec![],
            tasks: vec![row("Accuracy", acc), row("BPB", bpb)],
            groups: vec![],
            files: vec![],
            seconds: 1.0,
        }
    }

    #[test]
    fn groups_and_tasks_are_weighted_by_examples() {
        let task = TaskConfig::parse("name: t\ntype: mul\npath: p\n", Path::new("t.yaml")).expect("task");
        let f = |g: &str, n: usize, c: f64| FileScore {
            group: g.into(),
            file: format!("{g}.jsonl"),
            examples: n,
            sums: [("correct".to_string(), c)].into_iter().collect(),
        };
        let (tasks, groups, files) = task_rows(&task, &[f("a", 10, 5.0), f("b", 30, 30.0)]);
        assert_eq!(files.len(), 2);
        assert_eq!(groups.iter().map(|r| r.value).collect::<Vec<_>>(), vec![0.5, 1.0]);
        assert_eq!((tasks[0].value, tasks[0].examples), (35.0 / 40.0, 40));
    }

    #[test]
    fn comparisons_flag_what_moved_beyond_the_threshold() {
        let (table, flagged) = compare(&report(0.50, 1.00), &report(0.47, 1.01), 0.02);
        assert_eq!(flagged, 1, "{table}"); // accuracy moved 3 points; BPB 1% (relative)
        assert!(table.contains("-3.00 pts") && table.contains("| ! |"), "{table}");
        let r = report(0.5, 1.0);
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parse");
        assert_eq!(back.tasks, r.tasks);
        assert!(r.to_markdown().contains("| t | all | Accuracy | 50.00% | 10 |"));
    }
}
