//! Quantized linears against their reference, and a quantized model against full precision.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use glm_model::{init_weights, Config, Glm};
use glm_nn::{AttnLayout, DenseFactory};
use glm_quant::linear::quant_matmul_ref;
use glm_quant::{Bits, QuantFactory, QuantLinear, QuantMatrix};

fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
}

#[test]
fn quantized_linear_matches_its_reference_for_decode_and_prefill() -> Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (96, 64), &dev)?;
    let b = Tensor::randn(0f32, 1., 96, &dev)?;
    for bits in [Bits::Int8, Bits::Int4] {
        let q = QuantMatrix::quantize(&w.flatten_all()?.to_vec1()?, 96, 64, bits).map_err(candle_core::Error::wrap)?;
        let lin = QuantLinear::new(q.clone(), Some(b.clone()));
        // Up to 31 tokens run the integer kernel, whose activations are rounded to 16-bit fixed point
        // (half a step is 1/65534 of the block's largest; measured 2e-5 here); from 32 on, the
        // dequantized tiles and sgemm, exact to f32 rounding.
        for (shape, bound) in [((1, 1, 64), 1e-4), ((1, 3, 64), 1e-4), ((2, 7, 64), 1e-4), ((1, 33, 64), 1e-5)] {
            let x = Tensor::randn(0f32, 1., shape, &dev)?;
            let want = quant_matmul_ref(&x, &q)?.broadcast_add(&b)?;
            let e = rel(&lin.forward(&x)?, &want)?;
            assert!(e < bound, "{bits:?} {shape:?}: {e}");
        }
    }
    Ok(())
}

/// Logits of `tiny` (random DeepNorm init) with quantized block linears against f32. Measured:
/// INT8 0.02% and INT4 0.39% of the largest logit; the bounds leave 3x room. (A trained model is
/// issue 5's check.)
#[test]
fn a_quantized_model_stays_close_to_full_precision() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = Config::tiny();
    let w = init_weights(&cfg, 11, &dev).map_err(candle_core::Error::wrap)?;
    let build = |f: &dyn glm_nn::LinearFactory| {
        Glm::new(&cfg, VarBuilder::from_tensors(w.clone(), DType::F32, &dev), f).map_err(candle_core::Error::wrap)
    };
    let ids = Tensor::new(&[[5u32, 900, 17, 4000, 23, 8129, 8132, 77]], &dev)?;
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5, 6, 7]], &dev)?;
    let layout = AttnLayout::prefix_lm(&[6]);
    let dense = build(&DenseFactory)?.forward(&ids, &pos, &layout, None).map_err(candle_core::Error::wrap)?;
    for (bits, bound) in [(Bits::Int8, 6e-4), (Bits::Int4, 0.012)] {
        let m = build(&QuantFactory::quantize(bits))?;
        let q = m.forward(&ids, &pos, &layout, None).map_err(candle_core::Error::wrap)?;
        let e = rel(&q, &dense)?;
        eprintln!("{bits:?}: max |logit difference| / max |logit| = {e:.4}");
        assert!(e < bound, "{bits:?}: {e}");
    }
    Ok(())
}

#[test]
fn a_quantized_checkpoint_round_trips_and_is_byte_exact() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = Config::tiny();
    let w = init_weights(&cfg, 12, &dev)?;
    let dir = tempfile::tempdir()?;
    let dense_path = dir.path().join("model.safetensors");
    glm_checkpoint::save_atomic(&dense_path, &w)?;
    let ckpt = glm_checkpoint::Checkpoint::open(&[&dense_path])?;
    let out = dir.path().join("model-int4.safetensors");
    let r = glm_quant::quantize_checkpoint(&cfg, &ckpt, Bits::Int4, &out)?;
    assert_eq!((r.quantized, r.kept), (4 * cfg.num_layers, glm_model::param_table(&cfg).len() - 4 * cfg.num_layers));
    assert!(glm_quant::QuantCheckpoint::is_quantized(&out) && !glm_quant::QuantCheckpoint::is_quantized(&dense_path));
    // The stored bytes are the GLM-130B packing of the f32 weight.
    let name = "transformer.layers.2.mlp.dense_4h_to_h.weight";
    let bytes = std::fs::read(&out)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let stored: Vec<i8> = st.tensor(name)?.data().iter().map(|&b| b as i8).collect();
    let (rows, cols) = (w[name].dim(0)?, w[name].dim(1)?);
    let direct = QuantMatrix::quantize(&w[name].flatten_all()?.to_vec1()?, rows, cols, Bits::Int4)?;
    assert_eq!(stored, direct.data);
    // Loaded (no dense block weights built), the model stays close to the f32 one. Measured 0.4%.
    let q = glm_quant::QuantCheckpoint::open(&out)?;
    assert_eq!((q.bits, q.config.clone()), (Bits::Int4, cfg.clone()));
    let ids = Tensor::new(&[[5u32, 900, 17, 4000, 23, 8129, 8132, 77]], &dev)?;
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5, 6, 7]], &dev)?;
    let layout = AttnLayout::prefix_lm(&[6]);
    let dense = Glm::new(&cfg, VarBuilder::from_tensors(w, DType::F32, &dev), &DenseFactory)?;
    let e = rel(
        &q.model(DType::F32, &dev)?.forward(&ids, &pos, &layout, None)?,
        &dense.forward(&ids, &pos, &layout, None)?,
    )?;
    assert!(e < 0.012, "{e}");
    Ok(())
}

#[test]
fn scales_that_do_not_match_their_weights_are_refused() -> anyhow::Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.safetensors");
    let (weight, scales) = (vec![0u8; 4 * 8], vec![0u8; 2 * 3]); // 4 rows, 3 scales
    let views = vec![
        ("w".to_string(), TensorView::new(Dtype::U8, vec![4, 8], &weight)?),
        ("w_scale".to_string(), TensorView::new(Dtype::F16, vec![3], &scales)?),
    ];
    let meta = [("format", "glm-quant"), ("bits", "8"), ("config", &Config::tiny().to_json())]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::fs::write(&path, safetensors::tensor::serialize(views, Some(meta))?)?;
    let err = glm_quant::QuantCheckpoint::open(&path).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("w_scale") && err.contains("4 rows"), "{err}");
    // A dense file is not mistaken for a quantized one.
    std::fs::write(&path, b"not a checkpoint")?;
    assert!(glm_quant::QuantCheckpoint::open(&path).is_err());
    Ok(())
}

#[test]
fn the_tiled_prefill_matches_the_reference_across_tiles() -> Result<()> {
    let dev = Device::Cpu;
    // 2100 x 2048 weights span two 4M-value tiles.
    let w = Tensor::randn(0f32, 1., (2100, 2048), &dev)?;
    let x = Tensor::randn(0f32, 1., (2, 16, 2048), &dev)?; // 32 tokens: the sgemm path
    for bits in [Bits::Int8, Bits::Int4] {
        let q =
            QuantMatrix::quantize(&w.flatten_all()?.to_vec1()?, 2100, 2048, bits).map_err(candle_core::Error::wrap)?;
        let lin = QuantLinear::new(q.clone(), None);
        let e = rel(&lin.forward(&x)?, &quant_matmul_ref(&x, &q)?)?;
        assert!(e < 1e-5, "{bits:?}: {e}");
    }
    Ok(())
}

#[test]
fn a_grouped_linear_matches_its_reference_for_decode_and_prefill() -> Result<()> {
    let dev = Device::Cpu;
    // 2100 x 1024 weights in 4 groups of 256 columns span two tiles of the prefill path.
    let (rows, cols) = (2100, 1024);
    let w = Tensor::randn(0f32, 1., (rows, cols), &dev)?;
    for (bits, groups) in [(Bits::Int8, 2), (Bits::Int4, 4), (Bits::Int4, 8)] {
        let q = QuantMatrix::quantize_grouped(&w.flatten_all()?.to_vec1()?, rows, cols, bits, groups)
            .map_err(candle_core::Error::wrap)?;
        let lin = QuantLinear::new(q.clone(), None);
        for (tokens, bound) in [(1, 1e-4), (5, 1e-4), (40, 1e-5)] {
            let x = Tensor::randn(0f32, 1., (1, tokens, cols), &dev)?;
            let e = rel(&lin.forward(&x)?, &quant_matmul_ref(&x, &q)?)?;
            assert!(e < bound, "{bits:?} G{groups} {tokens} tokens: {e}");
        }
    }
    Ok(())
}

/// A model's weights for `write_quant_checkpoint`: the quantized block linears and the rest.
type Split = (Config, HashMap<String, QuantMatrix>, HashMap<String, Tensor>);

/// `tiny`'s weights with the row-parallel linears (`attention.dense`, `mlp.dense_4h_to_h`) quantized
/// in `groups` groups per row, as GLM-130B's convert_tp.py leaves them, and the rest per row.
fn grouped_tiny(bits: Bits, seed: u64) -> anyhow::Result<Split> {
    let cfg = Config::tiny();
    let w = init_weights(&cfg, seed, &Device::Cpu)?;
    let (mut quantized, mut dense) = (HashMap::new(), HashMap::new());
    for p in glm_model::param_table(&cfg) {
        let t = &w[&p.name];
        if p.kind.quantizable() {
            let row_parallel = p.name.ends_with("attention.dense.weight") || p.name.ends_with("dense_4h_to_h.weight");
            // 2, 4 and 8 ranks in layers 0, 1 and 2, 2 again in layer 3.
            let layer: usize = p.name.split('.').nth(2).and_then(|i| i.parse().ok()).unwrap_or(0);
            let groups = if row_parallel { 2 << (layer % 3) } else { 1 };
            let m = QuantMatrix::quantize_grouped(&t.flatten_all()?.to_vec1()?, p.shape[0], p.shape[1], bits, groups)?;
            quantized.insert(p.name, m);
        } else {
            dense.insert(p.name, t.to_dtype(DType::F16)?);
        }
    }
    assert!(quantized.values().any(|m| m.groups == 8) && quantized.values().any(|m| m.groups == 2));
    Ok((cfg, quantized, dense))
}

#[test]
fn a_grouped_checkpoint_round_trips_and_gives_the_dequantized_models_logits() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    for bits in [Bits::Int8, Bits::Int4] {
        let (cfg, quantized, dense) = grouped_tiny(bits, 13)?;
        let out = dir.path().join(format!("grouped-int{}.safetensors", bits.bits()));
        let r = glm_quant::write_quant_checkpoint(&cfg, bits, &quantized, &dense, &out)?;
        assert_eq!((r.quantized, r.kept, r.bytes), (quantized.len(), dense.len(), std::fs::metadata(&out)?.len()));
        // The file holds [rows, G] scales for the grouped weights, [rows] for the others.
        let bytes = std::fs::read(&out)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        assert_eq!(st.tensor("transformer.layers.1.mlp.dense_4h_to_h.weight_scale")?.shape().len(), 2);
        assert_eq!(st.tensor("transformer.layers.1.mlp.dense_h_to_4h.weight_scale")?.shape(), [2 * 384]);
        // Read back: every matrix and tensor exactly as written.
        let q = glm_quant::QuantCheckpoint::open(&out)?;
        assert_eq!((q.bits, &q.config), (bits, &cfg));
        assert_eq!(q.quantized().len(), quantized.len());
        for (name, m) in &quantized {
            assert_eq!(q.quantized()[name].as_ref(), m, "{name}");
        }
        for (name, t) in &dense {
            let (a, b) = (q.dense()[name].to_dtype(DType::F32)?, t.to_dtype(DType::F32)?);
            assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?, "{name}");
        }
        // The model from the file against the dense model of the dequantized weights.
        let mut w: HashMap<String, Tensor> =
            dense.iter().map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
        for (name, m) in &quantized {
            w.insert(name.clone(), Tensor::from_vec(m.dequantize(), (m.rows, m.cols), &dev)?);
        }
        let reference = Glm::new(&cfg, VarBuilder::from_tensors(w, DType::F32, &dev), &DenseFactory)?;
        let model = q.model(DType::F32, &dev)?;
        // 40 tokens take the prefill path (dequantized tiles, sgemm): the reference up to f32
        // rounding (measured: equal). 8 tokens take the integer kernels (16-bit fixed-point
        // activations; measured 7.5e-7).
        for (tokens, bound) in [(40u32, 1e-6), (8, 1e-5)] {
            let ids =
                Tensor::new((0..tokens).map(|i| (i * 797 + 5) % 8000).collect::<Vec<u32>>(), &dev)?.unsqueeze(0)?;
            let pos = Tensor::new((0..tokens).collect::<Vec<u32>>(), &dev)?.unsqueeze(0)?;
            let layout = AttnLayout::prefix_lm(&[tokens as usize - 2]);
            let e = rel(&model.forward(&ids, &pos, &layout, None)?, &reference.forward(&ids, &pos, &layout, None)?)?;
            eprintln!("{bits:?}, {tokens} tokens: max |logit difference| / max |logit| = {e:.2e}");
            assert!(e < bound, "{bits:?} {tokens} tokens: {e}");
        }
    }
    Ok(())
}

/// A one-tensor quantized file: weight `w` (U8, `shape`) beside `w_scale` (`scale_dtype`,
/// `scale_shape`), and the error opening it.
fn open_error(bits: u32, shape: Vec<usize>, scale_dtype: safetensors::Dtype, scale_shape: Vec<usize>) -> String {
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.safetensors");
    let weight = vec![0u8; shape.iter().product()];
    let scales = vec![0u8; scale_shape.iter().product::<usize>() * scale_dtype.bitsize() / 8];
    let views = vec![
        ("w".to_string(), TensorView::new(safetensors::Dtype::U8, shape, &weight).expect("view")),
        ("w_scale".to_string(), TensorView::new(scale_dtype, scale_shape, &scales).expect("view")),
    ];
    let meta = [("format", "glm-quant".to_string()), ("bits", bits.to_string()), ("config", Config::tiny().to_json())]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    std::fs::write(&path, safetensors::tensor::serialize(views, Some(meta)).expect("serialize")).expect("write");
    glm_quant::QuantCheckpoint::open(&path).err().map(|e| e.to_string()).unwrap_or_default()
}

#[test]
fn grouped_scales_that_do_not_fit_their_weights_are_refused() {
    use safetensors::Dtype::{F16, F32};
    // [4 rows, 8 bytes]: INT8 8 columns, INT4 16 columns.
    for (bits, scale_dtype, scale_shape, why) in [
        (8, F16, vec![3, 2], "4 rows"),               // wrong rows
        (8, F16, vec![2, 4], "4 rows"),               // transposed
        (8, F16, vec![4, 3], "3 equal scale groups"), // G does not divide the columns
        (8, F16, vec![4, 0], "0 equal scale groups"), // no groups
        (4, F16, vec![4, 16], "odd 1"),               // INT4 groups of one column
        (8, F32, vec![4, 2], "not F16"),              // not f16
        (8, F16, vec![4, 2, 1], "1 or 2 dimensions"), // three dimensions
    ] {
        let e = open_error(bits, vec![4, 8], scale_dtype, scale_shape.clone());
        // The message names both tensors and both shapes, and why.
        let scale = format!("{scale_shape:?}");
        assert!(
            e.contains("w_scale") && e.contains("the weight w [4, 8]") && e.contains(&scale) && e.contains(why),
            "{e}"
        );
    }
    // The ones that fit: per row ([4] or [4, 1]) and grouped.
    for (bits, scale_shape) in [(8, vec![4]), (8, vec![4, 1]), (8, vec![4, 8]), (4, vec![4, 8]), (4, vec![4, 2])] {
        assert_eq!(open_error(bits, vec![4, 8], F16, scale_shape.clone()), "", "{bits} {scale_shape:?}");
    }
}

#[test]
fn writing_a_checkpoint_checks_every_tensor_first() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("q.safetensors");
    let (cfg, quantized, dense) = grouped_tiny(Bits::Int4, 3)?;
    let name = "transformer.layers.0.attention.query_key_value.weight";
    let fails = |q: &HashMap<String, QuantMatrix>, d: &HashMap<String, Tensor>, bits: Bits| {
        let e =
            glm_quant::write_quant_checkpoint(&cfg, bits, q, d, &out).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!out.exists(), "nothing is written when {e}");
        e
    };
    let mut q = quantized.clone();
    q.remove(name);
    assert!(fails(&q, &dense, Bits::Int4).contains(&format!("{name}: missing from the quantized weights")));
    let mut d = dense.clone();
    d.insert(name.to_string(), Tensor::zeros((384, 128), DType::F16, &Device::Cpu)?);
    assert!(fails(&q, &d, Bits::Int4).contains("among the dense tensors"));
    let mut d = dense.clone();
    d.remove("transformer.final_layernorm.bias");
    assert!(
        fails(&quantized, &d, Bits::Int4).contains("transformer.final_layernorm.bias: missing from the dense tensors")
    );
    let mut d = dense.clone();
    d.insert("transformer.final_layernorm.bias".into(), Tensor::zeros(127, DType::F16, &Device::Cpu)?);
    assert!(fails(&quantized, &d, Bits::Int4).contains("shape [127], the model's table says [128]"));
    assert!(fails(&quantized, &dense, Bits::Int8).contains("a 4-bit [384, 128] matrix, the checkpoint is 8-bit"));
    let mut q = quantized.clone();
    q.insert(name.to_string(), quantized[name].slice_rows(0, 383)?);
    assert!(fails(&q, &dense, Bits::Int4).contains("[383, 128]"));
    let mut q = quantized.clone();
    q.insert("transformer.layers.9.mlp.dense_4h_to_h.weight".into(), quantized[name].clone());
    assert!(fails(&q, &dense, Bits::Int4)
        .contains("the model does not have: transformer.layers.9.mlp.dense_4h_to_h.weight"));
    glm_quant::write_quant_checkpoint(&cfg, Bits::Int4, &quantized, &dense, &out)?;
    Ok(())
}
