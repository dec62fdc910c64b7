//! Behaviour beyond the fixtures: packed rows, checkpoints on disk, and bad input.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use glm_checkpoint::{save_atomic, Checkpoint};
use glm_model::{init_weights, Config, Glm, PositionEncoding};
use glm_nn::{AttnLayout, DenseFactory, Segment};

fn small(pe: PositionEncoding) -> Config {
    let base = if pe == PositionEncoding::Rope1d { Config::glm_130b() } else { Config::chatglm_6b() };
    Config {
        name: "test".into(),
        num_layers: 2,
        hidden_size: 64,
        num_heads: 4,
        ffn_hidden_size: 128,
        vocab_size: 160,
        max_seq_len: 64,
        special_tokens: glm_model::SpecialTokens::from(150),
        ..base
    }
}

fn model(cfg: &Config, seed: u64) -> Result<(Glm, HashMap<String, Tensor>)> {
    let w = init_weights(cfg, seed, &Device::Cpu)?;
    let vb = candle_nn::VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    Ok((Glm::new(cfg, vb, &DenseFactory)?, w))
}

/// Position ids of one sample: [1, T] (1-D) or [1, 2, T] (2-D, block positions after the prefix).
fn positions(cfg: &Config, len: usize, prefix: usize) -> Result<Tensor> {
    let p: Vec<i64> = (0..len as i64).collect();
    Ok(match cfg.position_encoding {
        PositionEncoding::Rope1d => Tensor::new(p, &Device::Cpu)?.reshape((1, len))?,
        PositionEncoding::Rope2d => {
            let blk: Vec<i64> = (0..len).map(|i| if i < prefix { 0 } else { (i - prefix + 1) as i64 }).collect();
            Tensor::new([p, blk].concat(), &Device::Cpu)?.reshape((1, 2, len))?
        }
    })
}

fn ids(tokens: &[u32]) -> Result<Tensor> {
    Ok(Tensor::new(tokens, &Device::Cpu)?.reshape((1, tokens.len()))?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn packed_samples_get_the_logits_they_get_alone() -> Result<()> {
    for pe in [PositionEncoding::Rope1d, PositionEncoding::Rope2d] {
        let cfg = small(pe);
        let (m, _) = model(&cfg, 3)?;
        let a: Vec<u32> = vec![5, 17, 99, 150, 154, 23, 42];
        let b: Vec<u32> = vec![7, 151, 154, 64, 11];
        let (pa, pb) = (4, 2);
        let alone_a = m.forward(&ids(&a)?, &positions(&cfg, a.len(), pa)?, &AttnLayout::prefix_lm(&[pa]), None)?;
        let alone_b = m.forward(&ids(&b)?, &positions(&cfg, b.len(), pb)?, &AttnLayout::prefix_lm(&[pb]), None)?;

        let row: Vec<u32> = a.iter().chain(&b).copied().collect();
        let last = positions(&cfg, a.len(), pa)?.rank() - 1;
        let pos = Tensor::cat(&[positions(&cfg, a.len(), pa)?, positions(&cfg, b.len(), pb)?], last)?;
        let layout = AttnLayout::packed(vec![vec![
            Segment { start: 0, len: a.len(), prefix: pa },
            Segment { start: a.len(), len: b.len(), prefix: pb },
        ]])?;
        let packed = m.forward(&ids(&row)?, &pos, &layout, None)?;
        let da = max_diff(&packed.narrow(1, 0, a.len())?, &alone_a)?;
        let db = max_diff(&packed.narrow(1, a.len(), b.len())?, &alone_b)?;
        ensure!(da < 1e-5 && db < 1e-5, "{pe:?}: packed vs alone differ by {da} / {db}");
        // And packing matters: without the block-diagonal layout sample b would see sample a.
        let unpacked = m.forward(&ids(&row)?, &pos, &AttnLayout::prefix_lm(&[pa]), None)?;
        ensure!(max_diff(&unpacked.narrow(1, a.len(), b.len())?, &alone_b)? > 1e-3);
    }
    Ok(())
}

#[test]
fn rows_with_different_prefixes_match_their_single_rows() -> Result<()> {
    let cfg = small(PositionEncoding::Rope1d);
    let (m, _) = model(&cfg, 4)?;
    let rows: [Vec<u32>; 2] = [vec![1, 2, 3, 151, 154, 9, 8, 7], vec![4, 5, 151, 154, 6, 7, 8, 9]];
    let prefix = [4usize, 3];
    let batch = Tensor::new(rows.concat(), &Device::Cpu)?.reshape((2, 8))?;
    let pos = Tensor::cat(&[positions(&cfg, 8, 0)?, positions(&cfg, 8, 0)?], 0)?;
    let both = m.forward(&batch, &pos, &AttnLayout::prefix_lm(&prefix), None)?;
    for r in 0..2 {
        let one = m.forward(&ids(&rows[r])?, &positions(&cfg, 8, 0)?, &AttnLayout::prefix_lm(&[prefix[r]]), None)?;
        ensure!(max_diff(&both.narrow(0, r, 1)?, &one)? < 1e-5, "row {r}");
    }
    Ok(())
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("glm-model-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d.join(name)
}

#[test]
fn checkpoint_roundtrip_and_load_errors() -> Result<()> {
    let cfg = small(PositionEncoding::Rope2d);
    let (m, w) = model(&cfg, 5)?;
    let path = tmp("chat.safetensors");
    glm_model::save_weights(&cfg, &path, &w)?;
    let loaded = Glm::from_checkpoint(&cfg, &Checkpoint::open(&[&path])?, DType::F32, &Device::Cpu, &DenseFactory)?;
    let x = ids(&[3, 4, 151, 154, 9])?;
    let (pos, layout) = (positions(&cfg, 5, 3)?, AttnLayout::prefix_lm(&[3]));
    ensure!(max_diff(&m.forward(&x, &pos, &layout, None)?, &loaded.forward(&x, &pos, &layout, None)?)? == 0.0);

    // A checkpoint for another config: the error names the tensor and both shapes.
    let other = Config { ffn_hidden_size: 96, ..cfg.clone() };
    let e = Glm::from_checkpoint(&other, &Checkpoint::open(&[&path])?, DType::F32, &Device::Cpu, &DenseFactory)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(e.contains("dense_h_to_4h.weight") && e.contains("[128, 64]") && e.contains("[96, 64]"), "{e}");
    ensure!(e.contains("chat.safetensors"), "{e}");

    // A missing tensor is named, and an incomplete checkpoint is never written.
    let mut partial = w.clone();
    partial.remove("lm_head.weight");
    let p2 = tmp("partial.safetensors");
    let e = glm_model::save_weights(&cfg, &p2, &partial).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("lm_head.weight") && !p2.exists(), "{e}");
    // Trained variables save the same way.
    let vm = glm_model::var_map(w.clone())?;
    glm_model::save_weights(&cfg, &tmp("vars.safetensors"), &glm_model::var_tensors(&vm)?)?;
    save_atomic(&p2, &partial)?;
    let e = Glm::from_checkpoint(&cfg, &Checkpoint::open(&[&p2])?, DType::F32, &Device::Cpu, &DenseFactory)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");

    // A truncated file is an error at open, naming the file.
    let bytes = std::fs::read(&path)?;
    let p3 = tmp("truncated.safetensors");
    std::fs::write(&p3, &bytes[..bytes.len() / 2])?;
    let e = Checkpoint::open(&[&p3]).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("truncated.safetensors"), "{e}");

    // Loading in bf16 works and stays close (norms and softmax run in f32).
    let half = Glm::from_checkpoint(&cfg, &Checkpoint::open(&[&path])?, DType::BF16, &Device::Cpu, &DenseFactory)?;
    let lh = half.forward(&x, &pos, &layout, None)?.to_dtype(DType::F32)?;
    let lf = m.forward(&x, &pos, &layout, None)?;
    let rel = max_diff(&lh, &lf)? / lf.abs()?.max_all()?.to_scalar::<f32>()?;
    ensure!(rel < 0.05, "bf16 vs f32 relative difference {rel}");
    Ok(())
}

#[test]
fn bad_inputs_are_clear_errors() -> Result<()> {
    let cfg = small(PositionEncoding::Rope1d);
    let (m, _) = model(&cfg, 6)?;
    let layout = AttnLayout::prefix_lm(&[2]);
    let err = |r: glm_model::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let e = err(m.forward(&ids(&[1, 2, 999])?, &positions(&cfg, 3, 0)?, &layout, None));
    ensure!(e.contains("token id 999") && e.contains("column 2"), "{e}");
    let e = err(m.forward(&ids(&[1, 2, 3])?, &positions(&cfg, 2, 0)?, &layout, None));
    ensure!(e.contains("position ids must be [1, 3]"), "{e}");
    let e = err(m.forward(&ids(&[1, 2, 3])?, &positions(&cfg, 3, 0)?, &AttnLayout::prefix_lm(&[1, 1]), None));
    ensure!(e.contains("layout has 2 rows"), "{e}");
    let e = err(m.forward(&Tensor::zeros(3, DType::U32, &Device::Cpu)?, &positions(&cfg, 3, 0)?, &layout, None));
    ensure!(e.contains("must be [B, T]"), "{e}");
    Ok(())
}

#[test]
fn config_file_roundtrip() -> Result<()> {
    let p = tmp("cfg.json");
    Config::chatglm_6b().save(&p)?;
    ensure!(Config::load(&p)? == Config::chatglm_6b());
    std::fs::write(&p, "{ not json")?;
    let e = Config::load(&p).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(e.contains("cfg.json") && e.contains("bad config JSON"), "{e}");
    Ok(())
}

#[test]
fn kv_cache_grows_forks_and_decodes_batches() -> Result<()> {
    use glm_model::KvCache;
    let cfg = small(PositionEncoding::Rope1d);
    let (m, _) = model(&cfg, 8)?;
    let (b, t, p) = (2usize, 40usize, 3usize);
    let toks: Vec<u32> = (0..b * t).map(|i| ((i * 37 + 5) % 150) as u32).collect();
    let ids = Tensor::new(toks.as_slice(), &Device::Cpu)?.reshape((b, t))?;
    let pos = Tensor::arange(0i64, t as i64, &Device::Cpu)?.unsqueeze(0)?.repeat((b, 1))?;
    let layout = AttnLayout::prefix_lm(&[p, p]);
    let full = m.forward(&ids, &pos, &layout, None)?;

    // Prefill 3 tokens (buffer of 16), then one at a time: the buffers grow at 16 and 32.
    let mut cache = KvCache::new(&cfg);
    let mut steps = vec![m.forward(&ids.narrow(1, 0, p)?, &pos.narrow(1, 0, p)?, &layout, Some(&mut cache))?];
    let mut fork = None;
    for i in p..t {
        steps.push(m.forward(&ids.narrow(1, i, 1)?, &pos.narrow(1, i, 1)?, &layout, Some(&mut cache))?);
        if i == 20 {
            fork = Some(cache.fork()?);
        }
    }
    let got = Tensor::cat(&steps, 1)?;
    ensure!(max_diff(&got, &full)? < 1e-4, "cached decoding differs by {}", max_diff(&got, &full)?);

    // The fork continues on its own: writing into it leaves the original cache untouched.
    let mut fork = fork.ok_or_else(|| anyhow::anyhow!("no fork"))?;
    ensure!(fork.len() == 21 && cache.len() == t);
    let other = Tensor::new(&[[7u32], [9]], &Device::Cpu)?;
    let fork_step = m.forward(&other, &pos.narrow(1, 21, 1)?, &layout, Some(&mut fork))?;
    let mut alt = toks.clone();
    alt[21] = 7;
    alt[t + 21] = 9;
    let alt_full = m.forward(&Tensor::new(alt.as_slice(), &Device::Cpu)?.reshape((b, t))?, &pos, &layout, None)?;
    ensure!(max_diff(&fork_step, &alt_full.narrow(1, 21, 1)?)? < 1e-4);
    // ... and the original still holds the first sequence: one more token matches a full forward.
    let next = Tensor::new(&[[11u32], [12]], &Device::Cpu)?;
    let step = m.forward(&next, &Tensor::new(&[[t as i64], [t as i64]], &Device::Cpu)?, &layout, Some(&mut cache))?;
    let ids41 = Tensor::cat(&[&ids, &next], 1)?;
    let pos41 = Tensor::arange(0i64, t as i64 + 1, &Device::Cpu)?.unsqueeze(0)?.repeat((b, 1))?;
    let full41 = m.forward(&ids41, &pos41, &layout, None)?;
    ensure!(max_diff(&step, &full41.narrow(1, t, 1)?)? < 1e-4);

    // A cache for another batch size is refused.
    let e = m
        .forward(
            &ids.narrow(0, 0, 1)?.narrow(1, 0, 1)?,
            &pos.narrow(0, 0, 1)?.narrow(1, 0, 1)?,
            &AttnLayout::prefix_lm(&[p]),
            Some(&mut cache),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(e.contains("KV cache holds batch 2"), "{e}");
    Ok(())
}

/// The model cut into pipeline stages (each built from only its own tensors, hidden states
/// handed on) gives the whole model's logits bit for bit, tied and untied heads, even and uneven
/// splits; a stage refuses input it cannot start from.
#[test]
fn pipeline_stages_chained_give_the_whole_models_logits() -> Result<()> {
    use glm_model::{StageInput, StageSpec};
    for pe in [PositionEncoding::Rope1d, PositionEncoding::Rope2d] {
        let cfg = Config { num_layers: 5, ..small(pe) };
        let (whole, w) = model(&cfg, 11)?;
        let tokens: Vec<u32> = vec![5, 17, 99, 150, 154, 23, 42];
        let (x, pos, layout) = (ids(&tokens)?, positions(&cfg, tokens.len(), 4)?, AttnLayout::prefix_lm(&[4]));
        let want = whole.forward(&x, &pos, &layout, None)?;
        for p in [2, 3, 5] {
            let stages = StageSpec::plan(cfg.num_layers, p)?;
            let mut h: Option<Tensor> = None;
            for st in &stages {
                let mine: HashMap<String, Tensor> =
                    w.iter().filter(|(n, _)| st.holds(&cfg, n)).map(|(n, t)| (n.clone(), t.clone())).collect();
                let vb = candle_nn::VarBuilder::from_tensors(mine, DType::F32, &Device::Cpu);
                let m = Glm::new_stage(&cfg, vb, &DenseFactory, st)?;
                let input = match &h {
                    None => StageInput::Ids(&x),
                    Some(h) => StageInput::Hidden(h),
                };
                let out = m.forward_stage(input, &pos, &layout, None, None)?;
                if !st.is_first() {
                    let e = m.forward_stage(StageInput::Ids(&x), &pos, &layout, None, None).err();
                    ensure!(e.is_some_and(|e| e.to_string().contains("no word embeddings")), "{st}");
                }
                h = Some(out);
            }
            let got = h.ok_or_else(|| anyhow::anyhow!("no stages"))?;
            ensure!(max_diff(&got, &want)? == 0.0, "{pe:?} pp {p}: {}", max_diff(&got, &want)?);
        }
    }
    Ok(())
}
