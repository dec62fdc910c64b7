//! Importing the release formats, against checkpoints and logits made by the official code
//! (fixtures/import, scripts/make_import_fixtures.py): every format loads and gives the official
//! logits, merging and splitting reproduce the official files bit for bit, and broken downloads
//! are clear errors.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Result};
use candle_core::{DType, Device, Tensor};
use glm_checkpoint::raw::{RawStore, SafetensorsFile};
use glm_checkpoint::torch::TorchFile;
use glm_convert::export::{convert, Target};
use glm_convert::{load_model, open, Source};
use glm_model::{Config, SpecialTokens};
use glm_nn::AttnLayout;
use glm_quant::Bits;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/import")
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glm-import-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let n = b.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(d / n)
}

struct Io(SafetensorsFile);

impl Io {
    fn open(name: &str) -> Result<Self> {
        Ok(Self(SafetensorsFile::open(&fixtures().join(name))?))
    }
    fn get(&self, key: &str, dtype: DType) -> Result<Tensor> {
        let info = self.0.info(key).ok_or_else(|| anyhow!("no {key}"))?;
        let bytes = self.0.read_rows(key, 0, info.rows())?;
        let dt = info.dtype.candle().ok_or_else(|| anyhow!("dtype"))?;
        Ok(Tensor::from_raw_buffer(&bytes, dt, &info.shape, &Device::Cpu)?.to_dtype(dtype)?)
    }
}

const CASES: [&str; 3] = ["gmask", "mask", "batch"];

/// The model's logits on every case of `io` against `key` (`logits`, `logits_int4`, ...).
fn check_logits(model: &glm_model::Glm, io: &str, key: &str, tol: f64, what: &str) -> Result<f64> {
    let io = Io::open(io)?;
    let mut worst = 0f64;
    for case in CASES {
        let ids = io.get(&format!("input_ids.{case}"), DType::U32)?;
        let pos = io.get(&format!("position_ids.{case}"), DType::U32)?;
        let prefix: Vec<i64> = io.get(&format!("prefix_len.{case}"), DType::I64)?.to_vec1()?;
        let layout = AttnLayout::prefix_lm(&prefix.iter().map(|&p| p as usize).collect::<Vec<_>>());
        let logits = model.forward(&ids, &pos, &layout, None)?;
        let err = rel_err(&logits, &io.get(&format!("{key}.{case}"), DType::F32)?)?;
        println!("{what} {case}: {key} rel err {err:.2e}");
        ensure!(err < tol, "{what} {case}: {key} differ by {err:.3e} (relative), tolerance {tol:.0e}");
        worst = worst.max(err);
    }
    Ok(worst)
}

#[test]
fn sat_fp16_at_every_degree_gives_the_official_logits() -> Result<()> {
    for tp in [1, 2, 4] {
        let src = open(&fixtures().join(format!("sat_tp{tp}")), Some(&sat_config()))?;
        ensure!(src.describe().contains(&format!("TP={tp}")), "{}", src.describe());
        for dtype in [DType::F32, DType::F64] {
            let model = load_model(src.as_ref(), dtype, &Device::Cpu)?;
            check_logits(&model, "sat.io.safetensors", "logits", 1e-5, &format!("SAT TP={tp} {dtype:?}"))?;
        }
    }
    Ok(())
}

/// The quantized model's own weights, dequantized, in a dense model (the `_ref` computation).
fn dequantized_model(src: &dyn Source) -> Result<glm_model::Glm> {
    let mut tensors = std::collections::HashMap::new();
    for p in glm_model::weights::param_table(src.config()) {
        let t = if glm_convert::source::is_quant(src, &p) {
            let q = src.quant(&p.name)?;
            Tensor::from_vec(q.dequantize(), (q.rows, q.cols), &Device::Cpu)?
        } else {
            let v = glm_convert::source::read_f32(src, &p)?;
            Tensor::from_vec(v, p.shape.as_slice(), &Device::Cpu)?
        };
        tensors.insert(p.name, t);
    }
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Ok(glm_model::Glm::new(src.config(), vb, &glm_nn::DenseFactory)?)
}

#[test]
fn sat_int4_int8_give_the_official_dequantized_logits() -> Result<()> {
    for (bits, key) in [(4, "logits_int4"), (8, "logits_int8")] {
        let src = open(&fixtures().join(format!("sat_int{bits}_tp2")), Some(&sat_config()))?;
        ensure!(src.bits().map(|b| b.bits()) == Some(bits));
        // Row-parallel weights keep one scale per rank slice.
        ensure!(src.quant_groups("transformer.layers.0.attention.dense.weight")? == 2);
        ensure!(src.quant("transformer.layers.1.mlp.dense_4h_to_h.weight")?.groups == 2);
        ensure!(src.quant("transformer.layers.1.mlp.dense_h_to_4h.weight")?.groups == 1);
        check_logits(
            &dequantized_model(src.as_ref())?,
            "sat.io.safetensors",
            key,
            1e-5,
            &format!("SAT INT{bits} ref"),
        )?;
        // The integer kernels round activations to 16-bit fixed point: close, not exact.
        let model = load_model(src.as_ref(), DType::F32, &Device::Cpu)?;
        check_logits(&model, "sat.io.safetensors", key, 1e-5, &format!("SAT INT{bits} kernels"))?;
    }
    Ok(())
}

#[test]
fn hugging_face_chatglm_gives_the_official_logits() -> Result<()> {
    for dir in ["hf_bin", "hf_safetensors"] {
        let src = open(&fixtures().join(dir), None)?;
        let cfg = src.config();
        ensure!(!cfg.tie_word_embeddings && cfg.rope_f16_inv_freq && cfg.residual_alpha == Some(56f64.sqrt()));
        ensure!(cfg.special_tokens.sop == 154 && cfg.special_tokens.gmask == 151);
        for dtype in [DType::F32, DType::F64] {
            let model = load_model(src.as_ref(), dtype, &Device::Cpu)?;
            check_logits(&model, "chatglm.io.safetensors", "logits", 1e-5, &format!("{dir} {dtype:?}"))?;
        }
    }
    for (bits, key) in [(4, "logits_int4"), (8, "logits_int8")] {
        let src = open(&fixtures().join(format!("hf_int{bits}")), None)?;
        ensure!(src.bits().map(|b| b.bits()) == Some(bits));
        check_logits(
            &dequantized_model(src.as_ref())?,
            "chatglm.io.safetensors",
            key,
            1e-5,
            &format!("hf INT{bits} ref"),
        )?;
        let model = load_model(src.as_ref(), DType::F32, &Device::Cpu)?;
        check_logits(&model, "chatglm.io.safetensors", key, 1e-5, &format!("hf INT{bits} kernels"))?;
    }
    Ok(())
}

/// Every tensor of two SAT folders' rank files: same names, dtypes, shapes and bytes.
fn same_sat(a: &Path, b: &Path, tp: usize) -> Result<()> {
    for k in 0..tp {
        let name = glm_convert::sat::rank_file(k);
        let ra = TorchFile::open(&a.join(std::fs::read_to_string(a.join("latest"))?.trim()).join(&name), &["module"])?;
        let rb = TorchFile::open(&b.join(std::fs::read_to_string(b.join("latest"))?.trim()).join(&name), &["module"])?;
        let skip = |n: &&str| !n.ends_with("inv_freq");
        let na: Vec<&str> = ra.names().filter(skip).collect();
        let mut nb: Vec<&str> = rb.names().filter(skip).collect();
        let mut sa = na.clone();
        sa.sort();
        nb.sort();
        ensure!(sa == nb, "{name}: tensor names differ: {sa:?} vs {nb:?}");
        for n in na {
            let (ta, tb) = (ra.get(n).unwrap(), rb.get(n).unwrap());
            ensure!(
                ta.dtype == tb.dtype && ta.shape == tb.shape,
                "{name} {n}: {:?} {:?} vs {:?} {:?}",
                ta.dtype,
                ta.shape,
                tb.dtype,
                tb.shape
            );
            ensure!(ra.read(n)? == rb.read(n)?, "{name} {n}: bytes differ");
        }
    }
    Ok(())
}

#[test]
fn merge_and_split_reproduce_convert_tp_bit_for_bit() -> Result<()> {
    let d = tmp("split");
    let cfg = sat_config();
    // TP=4 -> TP=2 and TP=1 directly, and through our safetensors, against convert_tp.py's files.
    let tp4 = open(&fixtures().join("sat_tp4"), Some(&cfg))?;
    for tp in [1, 2] {
        let out = d.join(format!("from4_tp{tp}"));
        convert(tp4.as_ref(), &Target::Sat { dir: out.clone(), tp, quantize: None, overwrite: false }, &mut |_| {})?;
        same_sat(&out, &fixtures().join(format!("sat_tp{tp}")), tp)?;
    }
    let merged = d.join("merged.safetensors");
    convert(tp4.as_ref(), &Target::Safetensors { path: merged.clone(), dtype: None }, &mut |_| {})?;
    // Our file says what it is: no config needed, and its checksum holds.
    let st = SafetensorsFile::open(&merged)?;
    ensure!(st.metadata()["data_sha256"] == st.data_sha256()?);
    let back = open(&merged, None)?;
    convert(
        back.as_ref(),
        &Target::Sat { dir: d.join("back_tp4"), tp: 4, quantize: None, overwrite: false },
        &mut |_| {},
    )?;
    same_sat(&d.join("back_tp4"), &fixtures().join("sat_tp4"), 4)?;
    // Merge -> split -> merge is bit-identical.
    let again = d.join("again.safetensors");
    convert(
        open(&d.join("back_tp4"), None)?.as_ref(),
        &Target::Safetensors { path: again.clone(), dtype: None },
        &mut |_| {},
    )?;
    let (a, b) = (SafetensorsFile::open(&merged)?, SafetensorsFile::open(&again)?);
    for n in a.names() {
        let rows = a.info(&n).unwrap().rows();
        ensure!(a.read_rows(&n, 0, rows)? == b.read_rows(&n, 0, rows)?, "{n} changed in merge -> split -> merge");
    }
    // An existing destination is kept unless asked.
    let e = convert(
        back.as_ref(),
        &Target::Sat { dir: d.join("back_tp4"), tp: 4, quantize: None, overwrite: false },
        &mut |_| {},
    );
    ensure!(e.is_err_and(|e| e.to_string().contains("--force")));
    Ok(())
}

#[test]
fn quantized_export_is_convert_tp_s_own_bits() -> Result<()> {
    let d = tmp("quant");
    let cfg = sat_config();
    let tp1 = open(&fixtures().join("sat_tp1"), Some(&cfg))?;
    for bits in [Bits::Int4, Bits::Int8] {
        let b = bits.bits();
        // fp16 TP=1 -> quantized TP=2, as convert_tp.py --quantization-bit-width does.
        let out = d.join(format!("int{b}"));
        convert(
            tp1.as_ref(),
            &Target::Sat { dir: out.clone(), tp: 2, quantize: Some(bits), overwrite: false },
            &mut |_| {},
        )?;
        same_sat(&out, &fixtures().join(format!("sat_int{b}_tp2")), 2)?;
        // Official INT TP=2 -> our quantized file (no re-quantizing) -> TP=2 again: the same bits.
        let q = open(&fixtures().join(format!("sat_int{b}_tp2")), Some(&cfg))?;
        let file = d.join(format!("int{b}.safetensors"));
        convert(q.as_ref(), &Target::Quantized { path: file.clone(), bits }, &mut |_| {})?;
        let ours = open(&file, None)?;
        ensure!(ours.quant_groups("transformer.layers.0.attention.dense.weight")? == 2);
        let back = d.join(format!("int{b}_back"));
        convert(
            ours.as_ref(),
            &Target::Sat { dir: back.clone(), tp: 2, quantize: None, overwrite: false },
            &mut |_| {},
        )?;
        same_sat(&back, &fixtures().join(format!("sat_int{b}_tp2")), 2)?;
        // The file loads through the existing quantized-checkpoint loader as well.
        let qc = glm_quant::QuantCheckpoint::open(&file)?;
        let model = qc.model(DType::F32, &Device::Cpu)?;
        check_logits(&model, "sat.io.safetensors", &format!("logits_int{b}"), 1e-5, "glm-quant file")?;
        // Per-rank scales cannot be cut into a degree that splits a scale group.
        let e = convert(
            ours.as_ref(),
            &Target::Sat { dir: d.join("x"), tp: 1, quantize: None, overwrite: false },
            &mut |_| {},
        );
        ensure!(e.is_err_and(|e| e.to_string().contains("scales")), "TP=1 from per-rank scales must fail");
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn err_of(r: glm_convert::Result<Box<dyn Source>>) -> String {
    match r {
        Ok(s) => panic!("expected an error, opened {}", s.describe()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_downloads_are_clear_errors() -> Result<()> {
    let d = tmp("broken");
    let cfg = sat_config();
    // A rank in the middle missing, and the last rank missing (only the shapes can tell).
    for (k, want) in [(1, "mp_rank_01_model_states.pt"), (3, "missing mp_rank_03_model_states.pt")] {
        let dir = d.join(format!("gone{k}"));
        copy_dir(&fixtures().join("sat_tp4"), &dir);
        std::fs::remove_file(dir.join("49300").join(glm_convert::sat::rank_file(k)))?;
        let e = err_of(open(&dir, Some(&cfg)));
        ensure!(e.contains(want), "{e}");
    }
    // A truncated rank: named, before anything is loaded.
    let dir = d.join("cut");
    copy_dir(&fixtures().join("sat_tp2"), &dir);
    let f = dir.join("49300").join("mp_rank_01_model_states.pt");
    let len = std::fs::metadata(&f)?.len();
    std::fs::OpenOptions::new().write(true).open(&f)?.set_len(len / 2)?;
    let e = err_of(open(&dir, Some(&cfg)));
    ensure!(e.contains("mp_rank_01_model_states.pt") && e.contains("truncated"), "{e}");
    // No `latest`, or a `latest` naming no folder.
    let dir = d.join("nolatest");
    copy_dir(&fixtures().join("sat_tp2"), &dir);
    std::fs::write(dir.join("latest"), "12")?;
    ensure!(err_of(open(&dir, Some(&cfg))).contains("iteration `12`"));
    // A shard named in the index missing.
    let dir = d.join("hf");
    copy_dir(&fixtures().join("hf_bin"), &dir);
    std::fs::remove_file(dir.join("pytorch_model-00003-of-00004.bin"))?;
    let e = err_of(open(&dir, None));
    ensure!(e.contains("pytorch_model-00003-of-00004.bin") && e.contains("missing"), "{e}");
    // A wrong config: the shapes say so, naming the tensor.
    let wrong = Config { ffn_hidden_size: 96, ..cfg.clone() };
    let e = err_of(open(&fixtures().join("sat_tp2"), Some(&wrong)));
    ensure!(e.contains("dense_h_to_4h") && e.contains("expected"), "{e}");
    let e = err_of(open(&fixtures().join("sat_tp2"), Some(&Config { num_layers: 3, ..cfg.clone() })));
    ensure!(e.contains("transformer.layers.2") && e.contains("missing"), "{e}");
    let dir = d.join("hfcfg");
    copy_dir(&fixtures().join("hf_bin"), &dir);
    let text = std::fs::read_to_string(dir.join("config.json"))?.replace("\"num_layers\": 2", "\"num_layers\": 1");
    std::fs::write(dir.join("config.json"), text)?;
    let e = err_of(open(&dir, None));
    ensure!(e.contains("transformer.layers.1") && e.contains("does not have"), "{e}");
    // An int4 file read as int8 (and the reverse): wrong packed shapes.
    let dir = d.join("int4as8");
    copy_dir(&fixtures().join("hf_int4"), &dir);
    let text =
        std::fs::read_to_string(dir.join("config.json"))?.replace("\"quantization_bit\": 4", "\"quantization_bit\": 8");
    std::fs::write(dir.join("config.json"), text)?;
    let e = err_of(open(&dir, None));
    ensure!(e.contains("query_key_value.weight") && e.contains("[192, 32]") && e.contains("[192, 64]"), "{e}");
    // Not a model folder at all.
    let e = err_of(open(&d, None));
    ensure!(e.contains("not a checkpoint folder"), "{e}");
    Ok(())
}

#[test]
fn released_configs_map_to_ours() -> Result<()> {
    let read = |n: &str| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(fixtures().join("configs").join(n))?)?)
    };
    let p = Path::new("config.json");
    let (v11, bits) = glm_convert::hf::config_from_hf(&read("chatglm-6b-v1.1.config.json")?, p)?;
    ensure!(bits.is_none());
    // The release is our preset, with its f16 RoPE frequencies; 28 layers need no alpha override.
    ensure!(Config { rope_f16_inv_freq: false, ..v11.clone() } == Config::chatglm_6b(), "{v11:?}");
    let (old, _) = glm_convert::hf::config_from_hf(&read("chatglm-6b-pre-2023-04.config.json")?, p)?;
    ensure!(old.vocab_size == 150528 && old.special_tokens == SpecialTokens::from(150000), "{old:?}");
    let mut bad = read("chatglm-6b-v1.1.config.json")?;
    bad["model_type"] = "chatglm2".into();
    ensure!(glm_convert::hf::config_from_hf(&bad, p).unwrap_err().to_string().contains("chatglm2"));
    let mut bad = read("chatglm-6b-v1.1.config.json")?;
    bad["quantization_bit"] = 3.into();
    ensure!(glm_convert::hf::config_from_hf(&bad, p).is_err());
    Ok(())
}

/// GLM-130B's own code serves what we export: a model made here, written as a SAT folder, loaded
/// by SwissArmyTransformer's `load_checkpoint` into its `GLM130B` (scripts/sat_logits.py), gives
/// the logits we give. Needs a Python with torch (`GLM_SAT_PYTHON`) and SAT 0.4.12
/// (`GLM_SAT_SITE`, a `pip install --target` folder); skipped with a note without them, unless
/// `GLM_REQUIRE_SAT=1` (CI) makes that a failure.
#[test]
fn official_sat_code_serves_our_export() -> Result<()> {
    let (Ok(py), Ok(site)) = (std::env::var("GLM_SAT_PYTHON"), std::env::var("GLM_SAT_SITE")) else {
        ensure!(
            std::env::var("GLM_REQUIRE_SAT").is_err(),
            "GLM_REQUIRE_SAT=1 but GLM_SAT_PYTHON / GLM_SAT_SITE are not set"
        );
        eprintln!("note: GLM_SAT_PYTHON / GLM_SAT_SITE not set; the official SAT code was not run on our export");
        return Ok(());
    };
    let d = tmp("official");
    let cfg = sat_config();
    // A model made here (DeepNorm init), its weights rounded to fp16 as a SAT folder holds them.
    let w = glm_model::init_weights(&cfg, 11, &Device::Cpu)?;
    let w: std::collections::HashMap<String, Tensor> =
        w.into_iter().map(|(k, v)| Ok((k, v.to_dtype(DType::F16)?.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
    let file = d.join("model.safetensors");
    glm_model::save_weights(&cfg, &file, &w)?;
    let src = open(&file, Some(&cfg))?;
    let sat = d.join("sat");
    convert(src.as_ref(), &Target::Sat { dir: sat.clone(), tp: 1, quantize: None, overwrite: false }, &mut |_| {})?;
    let out = d.join("official.safetensors");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/sat_logits.py");
    let run = std::process::Command::new(&py)
        .arg(&script)
        .arg(&sat)
        .arg(fixtures().join("sat.io.safetensors"))
        .arg(&out)
        .env("PYTHONPATH", &site)
        .env("OMP_NUM_THREADS", "1")
        .output()?;
    ensure!(run.status.success(), "sat_logits.py failed: {}", String::from_utf8_lossy(&run.stderr));
    // Ours, from the same SAT folder.
    let model = load_model(open(&sat, None)?.as_ref(), DType::F32, &Device::Cpu)?;
    let io = Io::open("sat.io.safetensors")?;
    let official = SafetensorsFile::open(&out)?;
    for case in CASES {
        let ids = io.get(&format!("input_ids.{case}"), DType::U32)?;
        let pos = io.get(&format!("position_ids.{case}"), DType::U32)?;
        let prefix: Vec<i64> = io.get(&format!("prefix_len.{case}"), DType::I64)?.to_vec1()?;
        let layout = AttnLayout::prefix_lm(&prefix.iter().map(|&p| p as usize).collect::<Vec<_>>());
        let ours = model.forward(&ids, &pos, &layout, None)?;
        let key = format!("logits.{case}");
        let info = official.info(&key).ok_or_else(|| anyhow!("no {key}"))?;
        let theirs =
            Tensor::from_raw_buffer(&official.read_rows(&key, 0, info.rows())?, DType::F32, &info.shape, &Device::Cpu)?;
        let err = rel_err(&ours, &theirs)?;
        println!("official SAT code on our export, {case}: rel err {err:.2e}");
        ensure!(err < 1e-5, "{case}: the official code's logits differ by {err:.3e}");
    }
    Ok(())
}
