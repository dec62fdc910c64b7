//! Training checkpoints: `checkpoints/step-NNNNNNNN/` holding
//!
//! - `model.safetensors`: the f32 master weights under the released names (so `glm` inference
//!   loads a training checkpoint directly),
//! - `optimizer.safetensors`: the AdamW moments,
//! - `state.json`: step, samples, data cursor, loss scaler, RNG seeds and counters, monitor window,
//!   interventions, the model config and the training-config hash,
//! - `manifest.json`, written last: each file's size and CRC-32.
//!
//! A tensor-parallel run of degree N writes `model-tpKK-of-NN.safetensors` and
//! `optimizer-tpKK-of-NN.safetensors` per TP rank instead (each rank's shards, cut by
//! `glm_dist::split`), and the manifest records N. A pipelined run of P stages writes
//! `model-tpKK-of-NN-ppSS-of-PP.safetensors` per (TP rank, stage): each stage's own tensors (the
//! tied word embeddings once, in the first stage's files), and the manifest records P too. Every rank writes its own files into the
//! temporary directory; after a barrier the first rank writes the state and the manifest and
//! renames the directory: a crash anywhere before that leaves the previous checkpoint the latest.
//! Loading at another degree merges and re-splits in memory, so a run resumes on any TP degree
//! (`glm reshard` rewrites the files).
//!
//! A checkpoint is written into `.tmp-step-N/`, every file fsynced, then the directory is renamed
//! into place and the parent fsynced: a crash leaves either the whole checkpoint or none. Loading
//! checks the manifest first, so a truncated or corrupted file is reported and the previous
//! checkpoint used instead.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use glm_dist::split::split_of;
use glm_model::StageSpec;

use crate::{Error, Result};

/// The parameter a checkpoint tensor belongs to (`exp_avg.NAME` and `exp_avg_sq.NAME` are NAME's moments).
fn param_name(name: &str) -> &str {
    name.strip_prefix("exp_avg_sq.").or_else(|| name.strip_prefix("exp_avg.")).unwrap_or(name)
}

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const MANIFEST_FILE: &str = "manifest.json";
const FORMAT: &str = "glm-train-checkpoint";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    crc32: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    step: u64,
    /// The tensor-parallel degree of the weight files (1: `model.safetensors`).
    #[serde(default = "one")]
    tp: usize,
    /// The pipeline degree of the weight files (1: no `-ppSS-of-PP` files).
    #[serde(default = "one")]
    pp: usize,
    files: BTreeMap<String, FileSum>,
}

fn one() -> usize {
    1
}

/// The file of `base` (`model.safetensors`, `optimizer.safetensors`) TP rank `k` of `tp` writes.
pub fn shard_file(base: &str, k: usize, tp: usize) -> String {
    stage_file(base, k, tp, 0, 1)
}

/// The file of `base` that TP rank `k` of `tp` of pipeline stage `s` of `pp` writes.
pub fn stage_file(base: &str, k: usize, tp: usize, s: usize, pp: usize) -> String {
    let stem = base.strip_suffix(".safetensors").unwrap_or(base);
    match (tp <= 1, pp <= 1) {
        (true, true) => base.to_string(),
        (false, true) => format!("{stem}-tp{k:02}-of-{tp:02}.safetensors"),
        _ => format!("{stem}-tp{k:02}-of-{tp:02}-pp{s:02}-of-{pp:02}.safetensors"),
    }
}

/// The tensor-parallel degree a checkpoint's weights were written at (from its manifest).
pub fn checkpoint_tp(dir: &Path) -> Result<usize> {
    Ok(checkpoint_layout(dir)?.0)
}

/// The (tensor, pipeline) degrees a checkpoint's weights were written at (from its manifest).
pub fn checkpoint_layout(dir: &Path) -> Result<(usize, usize)> {
    let m = read_manifest(dir)?;
    Ok((m.tp.max(1), m.pp.max(1)))
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let mp = dir.join(MANIFEST_FILE);
    let text = fs::read(&mp).map_err(|e| ctx(&mp, "no readable manifest (incomplete checkpoint?)", e))?;
    serde_json::from_slice(&text).map_err(|e| ctx(&mp, "corrupt manifest", e))
}

/// Every weight file of a checkpoint written at (tp, pp).
fn weight_files(tp: usize, pp: usize) -> Vec<String> {
    let mut out = Vec::new();
    for s in 0..pp.max(1) {
        for k in 0..tp.max(1) {
            for base in [MODEL_FILE, OPTIMIZER_FILE] {
                out.push(stage_file(base, k, tp, s, pp));
            }
        }
    }
    out
}

fn ctx(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!("{}: {what}: {e}", path.display()))
}

fn checksum(path: &Path) -> Result<FileSum> {
    let mut f = fs::File::open(path).map_err(|e| ctx(path, "cannot open", e))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| ctx(path, "cannot read", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum { bytes, crc32: h.finalize() })
}

fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| ctx(path, "cannot fsync", e))
}

fn sync_dir(path: &Path) -> Result<()> {
    // Directories can be fsynced on Unix; elsewhere this is best effort.
    match fs::File::open(path) {
        Ok(f) => {
            let _ = f.sync_all();
            Ok(())
        }
        Err(e) => Err(ctx(path, "cannot open directory", e)),
    }
}

fn write_tensors(p: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, p).map_err(|e| ctx(p, "cannot write", e))?;
    sync_file(p)
}

/// The manifest of the files in `tmp`, written last and synced with the directory.
fn write_manifest(tmp: &Path, step: u64, (tp, pp): (usize, usize), files: BTreeMap<String, FileSum>) -> Result<()> {
    let manifest = Manifest { format: FORMAT.into(), version: 1, step, tp, pp, files };
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| ctx(tmp, "manifest", e))?;
    let p = tmp.join(MANIFEST_FILE);
    fs::write(&p, text).map_err(|e| ctx(&p, "cannot write", e))?;
    sync_file(&p)?;
    sync_dir(tmp)
}

/// The checkpoints of one run.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub root: PathBuf,
}

impl Checkpoints {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn dir(&self, step: u64) -> PathBuf {
        self.root.join(format!("step-{step:08}"))
    }

    /// The step of a checkpoint directory (`step-00000062` -> 62).
    pub fn step_of(dir: &Path) -> Option<u64> {
        dir.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()
    }

    /// Complete-looking checkpoint directories, oldest first (not yet verified).
    pub fn list(&self) -> Vec<(u64, PathBuf)> {
        let Ok(rd) = fs::read_dir(&self.root) else { return Vec::new() };
        let mut out: Vec<(u64, PathBuf)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_prefix("step-")?;
                Some((Self::step_of(&e.path())?, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// Remove `.tmp-*` directories a killed save left behind.
    pub fn clean_temporaries(&self) -> Result<()> {
        let Ok(rd) = fs::read_dir(&self.root) else { return Ok(()) };
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                fs::remove_dir_all(e.path()).map_err(|x| ctx(&e.path(), "cannot remove a stale temporary", x))?;
            }
        }
        Ok(())
    }

    /// Write a checkpoint atomically and keep only the newest `keep`.
    pub fn save(
        &self,
        step: u64,
        model: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
        state: &[u8],
        keep: usize,
    ) -> Result<PathBuf> {
        self.save_sharded(step, model, optimizer, state, keep, None, (0, 1), (0, 1), true)
    }

    fn prune(&self, keep: usize) -> Result<()> {
        let all = self.list();
        for (_, p) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            fs::remove_dir_all(p).map_err(|e| ctx(p, "cannot delete an old checkpoint", e))?;
        }
        Ok(())
    }

    /// Check a checkpoint against its manifest (sizes and CRC-32 of every file).
    pub fn verify(dir: &Path) -> Result<()> {
        let mp = dir.join(MANIFEST_FILE);
        let m = read_manifest(dir)?;
        if m.format != FORMAT {
            return Err(ctx(&mp, "not a training checkpoint", &m.format));
        }
        let mut wanted = vec![STATE_FILE.to_string()];
        wanted.extend(weight_files(m.tp, m.pp));
        for want in &wanted {
            let Some(sum) = m.files.get(want) else {
                return Err(ctx(&mp, "manifest does not list", want));
            };
            let p = dir.join(want);
            let got = checksum(&p)?;
            if got.bytes != sum.bytes {
                return Err(ctx(
                    &p,
                    "truncated or extended",
                    format!("{} bytes, manifest says {}", got.bytes, sum.bytes),
                ));
            }
            if got.crc32 != sum.crc32 {
                return Err(ctx(&p, "checksum mismatch (corrupt)", format!("{:08x} vs {:08x}", got.crc32, sum.crc32)));
            }
        }
        Ok(())
    }

    /// The newest checkpoint that verifies; each one that does not is passed to `report`.
    pub fn latest_good(&self, mut report: impl FnMut(&Path, &Error)) -> Option<(u64, PathBuf)> {
        for (step, dir) in self.list().into_iter().rev() {
            match Self::verify(&dir) {
                Ok(()) => return Some((step, dir)),
                Err(e) => report(&dir, &e),
            }
        }
        None
    }

    /// Tensors of one file of a verified checkpoint.
    pub fn load_tensors(dir: &Path, file: &str) -> Result<HashMap<String, Tensor>> {
        let p = dir.join(file);
        candle_core::safetensors::load(&p, &candle_core::Device::Cpu).map_err(|e| ctx(&p, "cannot load", e))
    }

    /// TP rank `tp.0` of `tp.1`'s shards of the tensors of `base` (`MODEL_FILE` or `OPTIMIZER_FILE`)
    /// of a verified checkpoint written at any degree: its own file when the degrees agree, else
    /// the full tensors merged from every file and cut again. Moments `exp_avg.NAME` are cut like NAME.
    pub fn load_shard(
        dir: &Path,
        base: &str,
        cfg: &glm_model::Config,
        tp: (usize, usize),
    ) -> Result<HashMap<String, Tensor>> {
        Self::load_stage(dir, base, cfg, tp, &StageSpec::whole(cfg))
    }

    /// `load_shard` of the tensors pipeline stage `stage` holds, from a checkpoint written at any
    /// (tp, pp) layout. The last stage's tied word embeddings come from the first stage's file.
    pub fn load_stage(
        dir: &Path,
        base: &str,
        cfg: &glm_model::Config,
        tp: (usize, usize),
        stage: &StageSpec,
    ) -> Result<HashMap<String, Tensor>> {
        let (saved_tp, saved_pp) = checkpoint_layout(dir)?;
        let held = |name: &str| stage.holds(cfg, param_name(name));
        if (saved_tp, saved_pp) == (tp.1, stage.stages) {
            let mut own = Self::load_tensors(dir, &stage_file(base, tp.0, tp.1, stage.index, stage.stages))?;
            if !stage.is_first() && stage.is_last() && cfg.tie_word_embeddings {
                let first = Self::load_tensors(dir, &stage_file(base, tp.0, tp.1, 0, stage.stages))?;
                own.extend(first.into_iter().filter(|(n, _)| stage.is_tied_copy(cfg, param_name(n))));
            }
            own.retain(|n, _| held(n));
            return Ok(own);
        }
        let mut out = HashMap::new();
        for (name, t) in Self::load_full(dir, base, cfg)?.into_iter().filter(|(n, _)| held(n)) {
            let split = split_of(cfg, param_name(&name));
            let s = glm_dist::split::shard(&t, split, tp.1, tp.0).map_err(|e| ctx(dir, &name, e))?;
            out.insert(name, s);
        }
        Ok(out)
    }

    /// The full (unsharded) tensors of `base`, merged from the checkpoint's TP files and the
    /// union of its pipeline stages' files.
    pub fn load_full(dir: &Path, base: &str, cfg: &glm_model::Config) -> Result<HashMap<String, Tensor>> {
        let (saved, stages) = checkpoint_layout(dir)?;
        let mut out = HashMap::new();
        for s in 0..stages {
            let file = |k: usize| stage_file(base, k, saved, s, stages);
            let mut parts: Vec<HashMap<String, Tensor>> =
                (0..saved).map(|k| Self::load_tensors(dir, &file(k))).collect::<Result<_>>()?;
            if saved == 1 {
                out.extend(parts.remove(0));
                continue;
            }
            let names: Vec<String> = parts[0].keys().cloned().collect();
            for name in names {
                let pieces = parts
                    .iter_mut()
                    .enumerate()
                    .map(|(k, p)| p.remove(&name).ok_or_else(|| ctx(dir, &file(k), format!("lacks {name}"))))
                    .collect::<Result<Vec<_>>>()?;
                let split = split_of(cfg, param_name(&name));
                let t = glm_dist::split::merge(&pieces, split).map_err(|e| ctx(dir, &name, e))?;
                out.insert(name, t);
            }
        }
        Ok(out)
    }

    /// `save` by every rank of a distributed run (`world`; None: the only process): `writer`s (one
    /// per TP rank and stage) write their tensors, the world's first rank the state and the
    /// manifest, last. `tp` and `pp` are this rank's (index, degree).
    #[allow(clippy::too_many_arguments)]
    pub fn save_sharded(
        &self,
        step: u64,
        model: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
        state: &[u8],
        keep: usize,
        world: Option<&dyn glm_dist::Communicator>,
        tp: (usize, usize),
        pp: (usize, usize),
        writer: bool,
    ) -> Result<PathBuf> {
        let main = world.is_none_or(|w| w.rank() == 0);
        let sync = |what: &str| match world {
            Some(w) => w.barrier().map_err(|e| Error::Checkpoint(format!("saving step {step}: {what}: {e}"))),
            None => Ok(()),
        };
        let tmp = self.root.join(format!(".tmp-step-{step:08}"));
        if main {
            fs::create_dir_all(&self.root).map_err(|e| ctx(&self.root, "cannot create", e))?;
            if tmp.exists() {
                fs::remove_dir_all(&tmp).map_err(|e| ctx(&tmp, "cannot remove a stale temporary", e))?;
            }
            fs::create_dir_all(&tmp).map_err(|e| ctx(&tmp, "cannot create", e))?;
        }
        sync("waiting for the directory")?;
        if writer {
            for (base, tensors) in [(MODEL_FILE, model), (OPTIMIZER_FILE, optimizer)] {
                write_tensors(&tmp.join(stage_file(base, tp.0, tp.1, pp.0, pp.1)), tensors)?;
            }
        }
        sync("waiting for every rank's shards")?;
        let dst = self.dir(step);
        if main {
            let p = tmp.join(STATE_FILE);
            fs::write(&p, state).map_err(|e| ctx(&p, "cannot write", e))?;
            sync_file(&p)?;
            let mut files = BTreeMap::new();
            files.insert(STATE_FILE.to_string(), checksum(&p)?);
            for name in weight_files(tp.1, pp.1) {
                files.insert(name.clone(), checksum(&tmp.join(&name))?);
            }
            self.finish(step, &tmp, files, (tp.1, pp.1), keep)?;
        }
        sync("waiting for the manifest")?;
        Ok(dst)
    }

    /// `src` (a checkpoint at any tensor/pipeline layout) rewritten at `tp` x `pp` (stages balanced
    /// as `StageSpec::plan` cuts them) into the checkpoint directory `dst`, atomically; (1, 1) is
    /// the single-file layout that `glm` inference reads. Tensors are copied, never recomputed:
    /// a round trip is bit for bit.
    pub fn reshard(src: &Path, dst: &Path, cfg: &glm_model::Config, tp: usize, pp: usize) -> Result<()> {
        Self::verify(src)?;
        if dst.exists() {
            return Err(ctx(dst, "already exists", "choose another output or remove it"));
        }
        glm_dist::split::check_tp(cfg, tp).map_err(|e| Error::Config(e.to_string()))?;
        let stages = StageSpec::plan(cfg.num_layers, pp)?;
        let m = read_manifest(src)?;
        let parent = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = dst.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "resharded".into());
        let tmp = parent.join(format!(".tmp-{name}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| ctx(&tmp, "cannot remove a stale temporary", e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| ctx(&tmp, "cannot create", e))?;
        let mut files = BTreeMap::new();
        for base in [MODEL_FILE, OPTIMIZER_FILE] {
            let full = Self::load_full(src, base, cfg)?;
            for st in &stages {
                let mine: Vec<(&String, &Tensor)> = full
                    .iter()
                    .filter(|(n, _)| st.holds(cfg, param_name(n)) && !st.is_tied_copy(cfg, param_name(n)))
                    .collect();
                for k in 0..tp {
                    let mut part = HashMap::with_capacity(mine.len());
                    for (n, t) in &mine {
                        let split = split_of(cfg, param_name(n));
                        let s = glm_dist::split::shard(t, split, tp, k).map_err(|e| ctx(src, n, e))?;
                        part.insert((*n).clone(), s);
                    }
                    let file = stage_file(base, k, tp, st.index, pp);
                    write_tensors(&tmp.join(&file), &part)?;
                    files.insert(file.clone(), checksum(&tmp.join(&file))?);
                }
            }
        }
        let state = tmp.join(STATE_FILE);
        fs::copy(src.join(STATE_FILE), &state).map_err(|e| ctx(&state, "cannot write", e))?;
        sync_file(&state)?;
        files.insert(STATE_FILE.to_string(), checksum(&state)?);
        write_manifest(&tmp, m.step, (tp, pp), files)?;
        fs::rename(&tmp, dst).map_err(|e| ctx(dst, "cannot rename into place", e))?;
        sync_dir(parent)
    }

    /// Writes the manifest, renames `tmp` into place and prunes.
    fn finish(
        &self,
        step: u64,
        tmp: &Path,
        files: BTreeMap<String, FileSum>,
        layout: (usize, usize),
        keep: usize,
    ) -> Result<PathBuf> {
        write_manifest(tmp, step, layout, files)?;
        let dst = self.dir(step);
        if dst.exists() {
            // Re-saving a step (after a rollback): the old copy goes first.
            fs::remove_dir_all(&dst).map_err(|e| ctx(&dst, "cannot replace", e))?;
        }
        fs::rename(tmp, &dst).map_err(|e| ctx(&dst, "cannot rename into place", e))?;
        sync_dir(&self.root)?;
        self.prune(keep)?;
        Ok(dst)
    }

    pub fn load_state(dir: &Path) -> Result<Vec<u8>> {
        let p = dir.join(STATE_FILE);
        fs::read(&p).map_err(|e| ctx(&p, "cannot read", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensors(v: f32) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        m.insert("w".to_string(), Tensor::full(v, (64, 64), &Device::Cpu)?);
        Ok(m)
    }

    #[test]
    fn saves_atomically_keeps_k_and_detects_truncation() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|e| Error::Checkpoint(e.to_string()))?;
        let c = Checkpoints::new(tmp.path().join("checkpoints"));
        for step in [10, 20, 30] {
            c.save(step, &tensors(step as f32)?, &tensors(0.0)?, b"{}", 2)?;
        }
        let steps: Vec<u64> = c.list().iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, vec![20, 30]);
        assert_eq!(c.latest_good(|_, _| {}).map(|x| x.0), Some(30));
        // Truncate the newest model file: reported, and step 20 is used.
        let p = c.dir(30).join(MODEL_FILE);
        let len = fs::metadata(&p).map_err(|e| Error::Checkpoint(e.to_string()))?.len();
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(len / 2))
            .map_err(|e| Error::Checkpoint(e.to_string()))?;
        let mut reports = Vec::new();
        assert_eq!(c.latest_good(|d, e| reports.push(format!("{}: {e}", d.display()))).map(|x| x.0), Some(20));
        assert!(reports[0].contains("truncated"), "{reports:?}");
        // A flipped byte is a checksum mismatch.
        let p = c.dir(20).join(STATE_FILE);
        fs::write(&p, b"{]").map_err(|e| Error::Checkpoint(e.to_string()))?;
        assert!(Checkpoints::verify(&c.dir(20)).is_err());
        Ok(())
    }
}
