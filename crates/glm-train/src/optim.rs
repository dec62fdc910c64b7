//! AdamW over f32 master weights (torch.optim.AdamW's update, decoupled weight decay):
//!
//! ```text
//! g = grad * grad_scale            (grad_scale = clip coefficient / loss scale)
//! p = p - lr * wd * p              (decay params only: no biases, no LayerNorms)
//! m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g²
//! p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! On the CPU one fused pass per tensor updates p, m and v in place (`fused`); `AdamW::step_ref` is
//! the same update from tensor ops, which runs on every device and is the fused kernel's twin.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter's moments: host vectors for the fused CPU kernel, tensors otherwise.
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// Steps taken (for the bias corrections).
    pub t: u64,
    moments: Vec<Moments>,
}

/// The per-step constants of the update.
#[derive(Clone, Copy)]
struct Coefs {
    b1: f32,
    b2: f32,
    eps: f32,
    /// lr / (1 - b1^t)
    step: f32,
    /// 1 / sqrt(1 - b2^t)
    inv_bc2_sqrt: f32,
    /// 1 - lr * wd (1 without decay)
    keep: f32,
    grad_scale: f32,
}

impl AdamW {
    /// Zeroed moments for `params` (f32 master weights). `fused` picks the CPU kernel where it applies.
    pub fn new(cfg: AdamWConfig, params: &[Var], fused: bool) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| {
                if fused && p.device().is_cpu() {
                    let n = p.elem_count();
                    Ok(Moments::Host { m: vec![0.0; n], v: vec![0.0; n] })
                } else {
                    Ok(Moments::Device { m: p.zeros_like()?, v: p.zeros_like()? })
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, t: 0, moments })
    }

    fn coefs(&self, lr: f64, decay: bool, grad_scale: f64) -> Coefs {
        let t = self.t as i32;
        let c = &self.cfg;
        Coefs {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            eps: c.eps as f32,
            step: (lr / (1.0 - c.beta1.powi(t))) as f32,
            inv_bc2_sqrt: (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32,
            keep: if decay { (1.0 - lr * c.weight_decay) as f32 } else { 1.0 },
            grad_scale: grad_scale as f32,
        }
    }

    /// One update of every parameter. `grads[i]` may be any float dtype (it is read as f32).
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], decay: &[bool], lr: f64, grad_scale: f64) -> Result<()> {
        if params.len() != grads.len() || params.len() != decay.len() || params.len() != self.moments.len() {
            return Err(Error::Optim(format!(
                "{} parameters, {} gradients, {} decay flags, {} moment slots",
                params.len(),
                grads.len(),
                decay.len(),
                self.moments.len()
            )));
        }
        self.t += 1;
        for i in 0..params.len() {
            let c = self.coefs(lr, decay[i], grad_scale);
            let g = grads[i].to_dtype(DType::F32)?.contiguous()?;
            match &mut self.moments[i] {
                Moments::Host { m, v } => {
                    let op = FusedAdamW { c, m: RefCell::new(m), v: RefCell::new(v) };
                    params[i].as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Device { m, v } => {
                    let (nm, nv, np) = update_ref(params[i].as_tensor(), &g, m, v, c)?;
                    (*m, *v) = (nm, nv);
                    params[i].set(&np)?;
                }
            }
        }
        Ok(())
    }

    /// The moments as tensors named `exp_avg.NAME` / `exp_avg_sq.NAME` (checkpoints).
    pub fn state_tensors(&self, names: &[String], params: &[Var]) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * names.len());
        for ((name, mo), p) in names.iter().zip(&self.moments).zip(params) {
            let (m, v) = match mo {
                Moments::Host { m, v } => {
                    (Tensor::from_slice(m, p.shape(), p.device())?, Tensor::from_slice(v, p.shape(), p.device())?)
                }
                Moments::Device { m, v } => (m.clone(), v.clone()),
            };
            out.push((format!("exp_avg.{name}"), m));
            out.push((format!("exp_avg_sq.{name}"), v));
        }
        Ok(out)
    }

    /// Restore moments saved by `state_tensors`; `get` returns the tensor of a name.
    pub fn load_state(&mut self, names: &[String], get: impl Fn(&str) -> Result<Tensor>, t: u64) -> Result<()> {
        for (name, mo) in names.iter().zip(self.moments.iter_mut()) {
            let (m, v) = (get(&format!("exp_avg.{name}"))?, get(&format!("exp_avg_sq.{name}"))?);
            match mo {
                Moments::Host { m: hm, v: hv } => {
                    let (nm, nv) = (m.flatten_all()?.to_vec1::<f32>()?, v.flatten_all()?.to_vec1::<f32>()?);
                    if nm.len() != hm.len() || nv.len() != hv.len() {
                        return Err(Error::Optim(format!("optimizer state of {name} has the wrong size")));
                    }
                    (*hm, *hv) = (nm, nv);
                }
                Moments::Device { m: dm, v: dv } => {
                    if m.shape() != dm.shape() || v.shape() != dv.shape() {
                        return Err(Error::Optim(format!("optimizer state of {name} has the wrong shape")));
                    }
                    (*dm, *dv) = (m.to_device(dm.device())?, v.to_device(dv.device())?);
                }
            }
        }
        self.t = t;
        Ok(())
    }
}

/// The update from tensor ops: (m, v, p) after one step.
fn update_ref(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, c: Coefs) -> Result<(Tensor, Tensor, Tensor)> {
    let g = (g * c.grad_scale as f64)?;
    let m = ((m * c.b1 as f64)? + (&g * (1.0 - c.b1 as f64))?)?;
    let v = ((v * c.b2 as f64)? + (g.sqr()? * (1.0 - c.b2 as f64))?)?;
    let denom = ((v.sqrt()? * c.inv_bc2_sqrt as f64)? + c.eps as f64)?;
    let p = ((p * c.keep as f64)? - ((&m / denom)? * c.step as f64)?)?;
    Ok((m, v, p))
}

/// One fused pass: p, m and v updated in place.
struct FusedAdamW<'a> {
    c: Coefs,
    m: RefCell<&'a mut Vec<f32>>,
    v: RefCell<&'a mut Vec<f32>>,
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "glm-adamw"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (p, g) = match (s1, s2, l1.contiguous_offsets(), l2.contiguous_offsets()) {
            (CpuStorage::F32(p), CpuStorage::F32(g), Some((a, b)), Some((c, d))) => (&mut p[a..b], &g[c..d]),
            _ => candle_core::bail!("adamw: parameter and gradient must be contiguous f32"),
        };
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if m.len() != p.len() || v.len() != p.len() || g.len() != p.len() {
            candle_core::bail!("adamw: {} params, {} grads, {} / {} moments", p.len(), g.len(), m.len(), v.len())
        }
        let c = self.c;
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let g = g[i] * c.grad_scale;
                    m[i] = c.b1 * m[i] + (1.0 - c.b1) * g;
                    v[i] = c.b2 * v[i] + (1.0 - c.b2) * g * g;
                    p[i] = p[i] * c.keep - c.step * m[i] / (v[i].sqrt() * c.inv_bc2_sqrt + c.eps);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const CFG: AdamWConfig = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

    /// Two steps by hand (f64) against both paths, with and without decay.
    #[test]
    fn matches_hand_computed_update_and_reference() -> Result<()> {
        let dev = Device::Cpu;
        let p0 = [0.5f32, -1.0, 2.0, 0.0, 3.0];
        let grads = [[0.1f32, -0.2, 0.3, 0.0, -4.0], [0.05, 0.1, -0.3, 1.0, 2.0]];
        let (lr, gs) = (0.01, 0.5);
        for decay in [true, false] {
            // Hand computation.
            let (mut p, mut m, mut v) = (p0.map(f64::from), [0f64; 5], [0f64; 5]);
            for (t, g) in grads.iter().enumerate() {
                let t = t as i32 + 1;
                for i in 0..5 {
                    let g = g[i] as f64 * gs;
                    if decay {
                        p[i] -= lr * 0.1 * p[i];
                    }
                    m[i] = 0.9 * m[i] + 0.1 * g;
                    v[i] = 0.95 * v[i] + 0.05 * g * g;
                    let (mh, vh) = (m[i] / (1.0 - 0.9f64.powi(t)), v[i] / (1.0 - 0.95f64.powi(t)));
                    p[i] -= lr * mh / (vh.sqrt() + 1e-8);
                }
            }
            for fused in [true, false] {
                let var = Var::from_slice(&p0, 5, &dev)?;
                let mut opt = AdamW::new(CFG, std::slice::from_ref(&var), fused)?;
                for g in &grads {
                    let g = Tensor::from_slice(g, 5, &dev)?;
                    opt.step(std::slice::from_ref(&var), &[g], &[decay], lr, gs)?;
                }
                let got = var.as_tensor().to_vec1::<f32>()?;
                for i in 0..5 {
                    assert!(
                        (got[i] as f64 - p[i]).abs() < 1e-6,
                        "decay {decay} fused {fused} [{i}]: {} vs {}",
                        got[i],
                        p[i]
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::from_slice(&[1f32, 2., 3.], 3, &dev)?;
        let mut a = AdamW::new(CFG, std::slice::from_ref(&var), true)?;
        a.step(std::slice::from_ref(&var), &[Tensor::new(&[1f32, -1., 0.5], &dev)?], &[true], 0.1, 1.0)?;
        let names = vec!["w".to_string()];
        let saved: std::collections::HashMap<String, Tensor> =
            a.state_tensors(&names, std::slice::from_ref(&var))?.into_iter().collect();
        let mut b = AdamW::new(CFG, std::slice::from_ref(&var), false)?;
        b.load_state(&names, |n| saved.get(n).cloned().ok_or_else(|| Error::Optim(n.into())), a.t)?;
        let again: std::collections::HashMap<String, Tensor> = b.state_tensors(&names, &[var])?.into_iter().collect();
        for (k, t) in &saved {
            assert_eq!(t.to_vec1::<f32>()?, again[k].to_vec1::<f32>()?);
        }
        Ok(())
    }
}
