//! Task files in GLM-130B's YAML (spec section 7): `name`, `type` (`mul`, `gen`, `lm`), `path`
//! (relative to the data root), `file-pattern` (one glob, a list, or a map of group -> glob; each
//! matched file is one prompt/subset), `micro-batch-size`, `max_seq_length`, `use_task_mask`
//! ([gMASK] instead of [MASK]), generation settings (`num_beams`, `length_penalty`,
//! `no_repeat_ngram_size`, `min_gen_length`, `max_gen_length`, `sampling_strategy`) and
//! `generation_length` for language modelling. Keys may be spelled with `-` or `_`, as GLM-130B's
//! own files mix them. Unknown keys (custom modules' settings) are kept and ignored. `shots`
//! (ours) prepends that many solved examples of the same file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskType {
    /// Multiple choice: the log-likelihood of each choice.
    Mul,
    /// Generation, scored by exact match / F1 (or a module's own accuracy).
    Gen,
    /// Language modelling: perplexity and bits per byte over sliding windows.
    Lm,
}

/// `file-pattern` as GLM-130B writes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum FilePattern {
    One(String),
    List(Vec<String>),
    Groups(BTreeMap<String, String>),
}

fn default_batch() -> usize {
    1
}
fn default_seq() -> usize {
    2048
}
fn default_beams() -> usize {
    1
}
fn default_gen() -> usize {
    128
}
fn default_lm_len() -> usize {
    256
}
fn default_ngram() -> usize {
    3
}
fn default_lp() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaskConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: TaskType,
    pub path: String,
    #[serde(default)]
    pub module: Option<String>,
    #[serde(default)]
    pub file_pattern: Option<FilePattern>,
    #[serde(default = "default_batch")]
    pub micro_batch_size: usize,
    #[serde(default = "default_seq")]
    pub max_seq_length: usize,
    #[serde(default)]
    pub use_task_mask: bool,
    #[serde(default)]
    pub unidirectional: bool,
    #[serde(default, alias = "valid_metrics")]
    pub metrics: Vec<String>,
    #[serde(default)]
    pub sampling_strategy: Option<String>,
    #[serde(default = "default_beams")]
    pub num_beams: usize,
    #[serde(default = "default_lp")]
    pub length_penalty: f64,
    #[serde(default = "default_ngram")]
    pub no_repeat_ngram_size: usize,
    #[serde(default)]
    pub min_gen_length: usize,
    #[serde(default = "default_gen")]
    pub max_gen_length: usize,
    #[serde(default = "default_lm_len")]
    pub generation_length: usize,
    #[serde(default)]
    pub shots: usize,
    /// The file it came from.
    #[serde(skip)]
    pub source: PathBuf,
}

/// Mapping keys with `-` become `_`, recursively (GLM-130B writes both).
fn normalize_keys(v: serde_yaml::Value) -> serde_yaml::Value {
    use serde_yaml::Value;
    match v {
        Value::Mapping(m) => Value::Mapping(
            m.into_iter()
                .map(|(k, v)| {
                    let k = match k {
                        Value::String(s) => Value::String(s.replace('-', "_")),
                        k => k,
                    };
                    (k, normalize_keys(v))
                })
                .collect(),
        ),
        v => v,
    }
}

impl TaskConfig {
    /// One task file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Task { file: path.to_path_buf(), msg };
        let raw: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
        // The group map of file-pattern keeps its keys as written: only the task's own keys are
        // normalized.
        let groups = raw.get("file-pattern").or_else(|| raw.get("file_pattern")).cloned();
        let mut v = normalize_keys(raw);
        if let (Some(g), serde_yaml::Value::Mapping(m)) = (groups, &mut v) {
            m.insert(serde_yaml::Value::String("file_pattern".into()), g);
        }
        let mut cfg: TaskConfig = serde_yaml::from_value(v).map_err(|e| bad(e.to_string()))?;
        cfg.source = path.to_path_buf();
        if cfg.micro_batch_size == 0 || cfg.max_seq_length < 8 || cfg.num_beams == 0 || cfg.generation_length == 0 {
            return Err(bad(
                "micro-batch-size, num_beams and generation_length must be >= 1, max_seq_length >= 8".into()
            ));
        }
        if cfg.unidirectional {
            return Err(bad(
                "unidirectional: true (a causal context) is not supported; the context is attended both ways".into(),
            ));
        }
        if let Some(s) = &cfg.sampling_strategy {
            if !matches!(s.as_str(), "BaseStrategy" | "BeamSearchStrategy") {
                return Err(bad(format!("sampling_strategy {s:?}: BaseStrategy (greedy) or BeamSearchStrategy")));
            }
        }
        Ok(cfg)
    }

    /// Every task file under the given files and directories (`*.yaml` / `*.yml`, sorted).
    pub fn load_all(paths: &[PathBuf]) -> Result<Vec<Self>> {
        let mut files = Vec::new();
        for p in paths {
            if p.is_dir() {
                let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                    .map_err(|e| Error::io(p, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                    .collect();
                found.sort();
                if found.is_empty() {
                    return Err(Error::Task { file: p.clone(), msg: "no .yaml task files in this directory".into() });
                }
                files.extend(found);
            } else {
                files.push(p.clone());
            }
        }
        files.iter().map(|f| Self::load(f)).collect()
    }

    /// Whether the generated text is judged by its first word (GLM-130B's LAMBADA module).
    pub fn first_word(&self) -> bool {
        self.module.as_deref().is_some_and(|m| m.to_ascii_lowercase().ends_with("lambada"))
    }

    /// The data files of each group: (group, files), groups in file order, files sorted.
    pub fn files(&self, data_root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
        let dir = data_root.join(&self.path);
        let patterns: Vec<(String, String)> = match &self.file_pattern {
            None => vec![("all".into(), "**/*.json*".into())],
            Some(FilePattern::One(p)) => vec![("all".into(), p.clone())],
            Some(FilePattern::List(ps)) => ps.iter().map(|p| ("all".into(), p.clone())).collect(),
            Some(FilePattern::Groups(m)) => m.iter().map(|(g, p)| (g.clone(), p.clone())).collect(),
        };
        let mut out: Vec<(String, Vec<PathBuf>)> = Vec::new();
        for (group, pat) in patterns {
            let full = dir.join(&pat);
            let full = full.to_string_lossy();
            let mut files: Vec<PathBuf> = glob::glob(&full)
                .map_err(|e| Error::Task { file: self.source.clone(), msg: format!("file-pattern {pat:?}: {e}") })?
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            match out.iter_mut().find(|(g, _)| *g == group) {
                Some((_, fs)) => fs.extend(files),
                None => out.push((group, files)),
            }
        }
        if out.iter().all(|(_, f)| f.is_empty()) {
            return Err(Error::Task {
                file: self.source.clone(),
                msg: format!("no data file matches its file-pattern under {} (set --data-root?)", dir.display()),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glm_130b_task_files_load_as_written() {
        // As in GLM-130B's tasks/: dashes and underscores mixed, groups of globs.
        let mmlu = "name: 'MMLU'\ntype: 'mul'\npath: 'MMLU'\nfile-pattern:\n  stem: \"stem/*.json\"\n  social-sciences: \"social_sciences/*.json\"\nmicro-batch-size: 32\n";
        let t = TaskConfig::parse(mmlu, Path::new("mmlu.yaml")).expect("mmlu");
        assert_eq!((t.kind, t.micro_batch_size, t.max_seq_length), (TaskType::Mul, 32, 2048));
        let Some(FilePattern::Groups(g)) = &t.file_pattern else { panic!("groups") };
        assert_eq!(g.get("social-sciences").map(String::as_str), Some("social_sciences/*.json"));
        let lambada = "name: \"LAMBADA\"\ntype: \"gen\"\nmodule: \"tasks.lambada.task.LAMBADA\"\npath: \"lambada/lambada\"\nfile-pattern:\n  test: \"**/test.jsonl\"\nsampling_strategy: \"BeamSearchStrategy\"\nnum_beams: 16\nmax_gen_length: 5\nuse_task_mask: true\nvalid_metrics: ['Accuracy']\n";
        let t = TaskConfig::parse(lambada, Path::new("lambada.yaml")).expect("lambada");
        assert!(t.first_word() && t.use_task_mask && t.num_beams == 16 && t.max_gen_length == 5);
        assert_eq!(t.metrics, vec!["Accuracy".to_string()]);
        let lm = "name: pile\ntype: lm\npath: pile\nfile_pattern: '*.jsonl'\ngeneration-length: 512\n";
        assert_eq!(TaskConfig::parse(lm, Path::new("pile.yaml")).expect("lm").generation_length, 512);
    }

    #[test]
    fn malformed_task_files_name_the_file() {
        for bad in [
            "name: x\ntype: classify\npath: p\n",
            "type: mul\npath: p\n",
            "name: [\n",
            "name: x\ntype: mul\npath: p\nmicro-batch-size: 0\n",
        ] {
            let e = TaskConfig::parse(bad, Path::new("bad.yaml")).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("bad.yaml"), "{bad:?}: {e}");
        }
    }
}
