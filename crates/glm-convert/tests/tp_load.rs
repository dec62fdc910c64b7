//! `load_model_tp`: a released checkpoint (the official code's fixtures, fixtures/import) loaded
//! one tensor-parallel rank at a time, each rank reading its part of every tensor, gives the
//! official logits on every rank: SAT fp16, SAT INT4/INT8 (whose row-parallel weights carry a scale
//! per original rank slice: cut into whole groups at TP 2, inside one group at TP 4) and ChatGLM-6B
//! Hugging Face folders (2-D RoPE, untied head).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use candle_core::{DType, Device, Tensor};
use glm_checkpoint::raw::{RawStore, SafetensorsFile};
use glm_convert::{load_model_tp, open};
use glm_dist::{Group, LocalComm};
use glm_model::{Config, SpecialTokens};
use glm_nn::AttnLayout;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/import")
}

/// The tiny GLM-130B of the fixtures (manifest.json `glm130b.config`).
fn sat_config() -> Config {
    Config {
        name: "tiny-sat".into(),
        max_seq_len: 64,
        special_tokens: SpecialTokens::from(150),
        ..Config::glm_arch("tiny-sat", 2, 64, 4, 128, 160)
    }
}

/// |a - b| / |b| (Frobenius norms).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let n = b.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(d / n)
}

fn io_tensor(io: &SafetensorsFile, key: &str, dtype: DType) -> Result<Tensor> {
    let info = io.info(key).ok_or_else(|| anyhow!("no {key}"))?;
    let bytes = io.read_rows(key, 0, info.rows())?;
    let dt = info.dtype.candle().ok_or_else(|| anyhow!("dtype"))?;
    Ok(Tensor::from_raw_buffer(&bytes, dt, &info.shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// `dir` at `tp` ranks: every rank's logits on every case of `io` within 1e-5 of `key`.
fn check(dir: &str, arch: Option<&Config>, io: &str, key: &str, tp: usize) -> Result<()> {
    let io = SafetensorsFile::open(&fixtures().join(io))?;
    let mut cases = Vec::new();
    for case in ["gmask", "mask", "batch"] {
        let ids = io_tensor(&io, &format!("input_ids.{case}"), DType::U32)?;
        let pos = io_tensor(&io, &format!("position_ids.{case}"), DType::U32)?;
        let prefix: Vec<i64> = io_tensor(&io, &format!("prefix_len.{case}"), DType::I64)?.to_vec1()?;
        let layout = AttnLayout::prefix_lm(&prefix.iter().map(|&p| p as usize).collect::<Vec<_>>());
        cases.push((case, ids, pos, layout, io_tensor(&io, &format!("{key}.{case}"), DType::F32)?));
    }
    let path = fixtures().join(dir);
    let logits: Vec<Vec<Tensor>> = LocalComm::run(tp, Duration::from_secs(60), |comm| {
        let g = Group::register(comm);
        let e = |e: glm_convert::Error| glm_dist::Error::Comm(e.to_string());
        let src = open(&path, arch).map_err(e)?;
        let model = load_model_tp(src.as_ref(), DType::F32, &Device::Cpu, g).map_err(e)?;
        cases.iter().map(|(_, ids, pos, layout, _)| Ok(model.forward(ids, pos, layout, None)?)).collect()
    })?;
    for (k, rank) in logits.iter().enumerate() {
        for ((case, .., want), got) in cases.iter().zip(rank) {
            let err = rel_err(got, want)?;
            ensure!(err < 1e-5, "{dir} at TP {tp}, rank {k}, {case}: {key} differ by {err:.3e}");
        }
    }
    println!("{dir} at TP {tp}: {key} on every rank");
    Ok(())
}

#[test]
fn released_checkpoints_give_the_official_logits_one_rank_at_a_time() -> Result<()> {
    let sat = sat_config();
    for tp in [2, 4] {
        check("sat_tp1", Some(&sat), "sat.io.safetensors", "logits", tp)?;
        check("sat_int4_tp2", Some(&sat), "sat.io.safetensors", "logits_int4", tp)?;
        check("sat_int8_tp2", Some(&sat), "sat.io.safetensors", "logits_int8", tp)?;
    }
    check("hf_safetensors", None, "chatglm.io.safetensors", "logits", 2)?;
    check("hf_int4", None, "chatglm.io.safetensors", "logits_int4", 2)?;
    Ok(())
}
