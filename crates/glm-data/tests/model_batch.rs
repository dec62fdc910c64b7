//! Batches from the embedded corpus drive the real model: shapes, positions and the attention
//! layout are what `Glm::forward` takes, and a packed sample's logits equal those of the sample
//! run alone (no attention across packed samples, positions restart per sample).

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use glm_data::{corpus, objective_ids, Batcher, Instructions, Mode, ObjectiveConfig, PositionKind, TokenStream};
use glm_model::{init_weights, Config, Glm, PositionEncoding};
use glm_nn::{cross_entropy, AttnLayout, DenseFactory};
use glm_tokenizer::Tokenizer;

fn setup(positions: PositionKind, seq_len: usize) -> (Glm, Batcher) {
    let tok = Tokenizer::default_glm().unwrap();
    let mut cfg = Config::tiny();
    if positions == PositionKind::TwoD {
        cfg.position_encoding = PositionEncoding::Rope2d;
    }
    cfg.validate().unwrap();
    // The embedded tokenizer's specials are the tiny preset's.
    assert_eq!(tok.vocab_size(), cfg.vocab_size);
    assert_eq!(tok.specials().mask, Some(cfg.special_tokens.mask));
    assert_eq!(tok.specials().sop, Some(cfg.special_tokens.sop));
    let w = init_weights(&cfg, 1, &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let model = Glm::new(&cfg, vb, &DenseFactory).unwrap();
    let hash = glm_data::content_hash(glm_tokenizer::DEFAULT_TOKENIZER_JSON.as_bytes());
    let heldout = corpus::shard(&tok, &hash, corpus::Split::Heldout).unwrap();
    let stream = TokenStream::new(vec![Arc::clone(&heldout)], glm_data::eod_id(&tok).unwrap(), 1, 0, 1).unwrap();
    let ins = Instructions::from_records(&tok, &corpus::instructions().unwrap()[..200], 1).unwrap();
    let ocfg = ObjectiveConfig { seq_len, positions, mip_token_share: 0.2, ..ObjectiveConfig::default() };
    (model, Batcher::new(ocfg, objective_ids(&tok).unwrap(), stream, Some(ins), 1, 0).unwrap())
}

#[test]
fn packed_samples_give_the_logits_of_each_sample_alone() {
    for positions in [PositionKind::OneD, PositionKind::TwoD] {
        let (model, mut batcher) = setup(positions, 256);
        let mut modes = std::collections::HashSet::new();
        for _ in 0..12 {
            let batch = batcher.next_batch(1);
            let row = &batch.rows[0];
            modes.insert(row.mode);
            let (ids, pos, targets, layout) = batch.tensors(&Device::Cpu).unwrap();
            let logits = model.forward(&ids, &pos, &layout, None).unwrap(); // [1, T, V]
            let loss = cross_entropy(&logits, &targets).unwrap().to_scalar::<f32>().unwrap();
            // At initialization the loss is near ln(V) = 9.01.
            assert!((loss - 8192f32.ln()).abs() < 1.0, "{positions:?} {:?}: loss {loss}", row.mode);
            for seg in &row.segments {
                let r = seg.start..seg.start + seg.len;
                let ids1 = Tensor::new(&row.tokens[r.clone()], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
                let pos1 = match &row.block_positions {
                    None => Tensor::new(&row.positions[r.clone()], &Device::Cpu).unwrap().unsqueeze(0).unwrap(),
                    Some(b) => {
                        let both = [&row.positions[r.clone()], &b[r.clone()]].concat();
                        Tensor::from_vec(both, (1, 2, seg.len), &Device::Cpu).unwrap()
                    }
                };
                let alone = model.forward(&ids1, &pos1, &AttnLayout::prefix_lm(&[seg.prefix]), None).unwrap();
                let packed = logits.i((.., r, ..)).unwrap();
                let diff = (alone - packed).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "{positions:?} {:?}: sample at {} differs by {diff}", row.mode, seg.start);
            }
        }
        assert!(modes.contains(&Mode::Mask) && modes.contains(&Mode::Gmask), "{modes:?}");
    }
}
