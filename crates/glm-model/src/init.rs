//! Seeded DeepNorm initialization (spec section 1): Xavier-normal with gain beta = (2L)^(-1/2) on the
//! FFN, v and output projections; plain Xavier-normal on q and k; embeddings N(0, sqrt(1/(3H)))
//! (GLM-130B's init_method_std 0.0052 at H = 12288); LayerNorm weights 1; every bias 0.
//! The same seed gives the same weights on every machine (a fixed-algorithm PRNG, no thread RNG).

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::Config;
use crate::weights::{param_table, ParamKind};
use crate::Result;

fn xavier_std(fan_in: usize, fan_out: usize, gain: f64) -> f64 {
    gain * (2.0 / (fan_in + fan_out) as f64).sqrt()
}

fn normal(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    // std > 0 and finite for every valid config.
    match Normal::new(0.0f32, std as f32) {
        Ok(d) => (0..n).map(|_| d.sample(rng)).collect(),
        Err(_) => vec![0.0; n],
    }
}

/// Every parameter of `cfg`, freshly initialized in f32, by checkpoint name.
pub fn init_weights(cfg: &Config, seed: u64, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (h, d, beta) = (cfg.hidden_size, cfg.head_dim(), cfg.deepnorm_beta());
    let mut out = HashMap::new();
    for p in param_table(cfg) {
        let n = p.numel() as usize;
        let data = match p.kind {
            ParamKind::Embedding | ParamKind::LmHead => normal(&mut rng, n, (1.0 / (3.0 * h as f64)).sqrt()),
            ParamKind::NormWeight => vec![1.0; n],
            ParamKind::NormBias | ParamKind::Bias => vec![0.0; n],
            ParamKind::LinearWeight => normal(&mut rng, n, xavier_std(p.shape[1], p.shape[0], beta)),
            ParamKind::QkvWeight => {
                // Rows are per-head interleaved: head j owns [q_j; k_j; v_j], D rows each. q and k
                // are plain Xavier over an H x H projection, v is DeepNorm-scaled.
                let (q, k, v) = (
                    normal(&mut rng, n / 3, xavier_std(h, h, 1.0)),
                    normal(&mut rng, n / 3, xavier_std(h, h, 1.0)),
                    normal(&mut rng, n / 3, xavier_std(h, h, beta)),
                );
                let block = d * h; // one head's D rows of H
                let mut w = Vec::with_capacity(n);
                for j in 0..cfg.num_heads {
                    for part in [&q, &k, &v] {
                        w.extend_from_slice(&part[j * block..(j + 1) * block]);
                    }
                }
                w
            }
        };
        out.insert(p.name.clone(), Tensor::from_vec(data, p.shape.as_slice(), device)?);
    }
    Ok(out)
}

/// Wrap tensors as trainable variables; `VarBuilder::from_varmap` then hands the model these
/// variables, so `loss.backward()` yields a gradient for every parameter.
pub fn var_map(tensors: HashMap<String, Tensor>) -> Result<VarMap> {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))?;
        for (name, t) in tensors {
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_deepnorm_scaled() -> Result<()> {
        let cfg = Config::tiny();
        let a = init_weights(&cfg, 7, &Device::Cpu)?;
        let b = init_weights(&cfg, 7, &Device::Cpu)?;
        let name = "transformer.layers.1.mlp.dense_4h_to_h.weight";
        let (wa, wb): (Vec<f32>, Vec<f32>) = (a[name].flatten_all()?.to_vec1()?, b[name].flatten_all()?.to_vec1()?);
        assert_eq!(wa, wb);
        let std = (wa.iter().map(|x| x * x).sum::<f32>() / wa.len() as f32).sqrt() as f64;
        let want = cfg.deepnorm_beta() * (2.0 / (128.0 + 384.0f64)).sqrt();
        assert!((std / want - 1.0).abs() < 0.05, "{std} vs {want}");
        // v rows of head 0 are beta-scaled relative to its q rows.
        let qkv: Vec<f32> = a["transformer.layers.0.attention.query_key_value.weight"].flatten_all()?.to_vec1()?;
        let rms = |s: &[f32]| (s.iter().map(|x| x * x).sum::<f32>() / s.len() as f32).sqrt();
        let block = cfg.head_dim() * cfg.hidden_size;
        let ratio = rms(&qkv[2 * block..3 * block]) / rms(&qkv[..block]);
        assert!((ratio as f64 / cfg.deepnorm_beta() - 1.0).abs() < 0.1, "{ratio}");
        Ok(())
    }
}
