//! Times each part of one layer and of the LM head of a preset on CPU (B=4, T=256), to see where
//! a forward goes: `cargo run --release --example parts [-- PRESET]` (default `small`). A profiling aid; the benchmark of record
//! is `glm bench forward`.
use candle_core::{DType, Device, Tensor};
use glm_nn::linear::linear_nd;
use std::time::Instant;

fn t<F: FnMut() -> candle_core::Result<Tensor>>(name: &str, mut f: F) -> candle_core::Result<()> {
    f()?;
    let n = 10;
    let s = Instant::now();
    for _ in 0..n {
        f()?;
    }
    println!("{name:40} {:8.2} ms", s.elapsed().as_secs_f64() * 1e3 / n as f64);
    Ok(())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> candle_core::Result<()> {
    glm_bench::keep_freed_memory();
    glm_nn::blas::configure_env();
    let dev = Device::Cpu;
    let preset = std::env::args().nth(1).unwrap_or_else(|| "small".into());
    let cfg = glm_model::Config::preset(&preset).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let (b, tt) = (4usize, 256usize);
    let (h, n, d, f, v) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim(), cfg.ffn_hidden_size, cfg.vocab_size);
    println!("{preset}: one layer and the LM head, B x T = {b} x {tt}");
    let x = Tensor::randn(0f32, 1., (b, tt, h), &dev)?;
    let wq = Tensor::randn(0f32, 0.02, (3 * h, h), &dev)?;
    let bq = Tensor::zeros(3 * h, DType::F32, &dev)?;
    let wu = Tensor::randn(0f32, 0.02, (2 * f, h), &dev)?;
    let bu = Tensor::zeros(2 * f, DType::F32, &dev)?;
    let wd = Tensor::randn(0f32, 0.02, (h, f), &dev)?;
    let e = Tensor::randn(0f32, 0.02, (v, h), &dev)?;
    let lnw = Tensor::ones(h, DType::F32, &dev)?;
    let lnb = Tensor::zeros(h, DType::F32, &dev)?;
    t("qkv linear", || linear_nd(&x, &wq, Some(&bq)))?;
    t("up linear", || linear_nd(&x, &wu, Some(&bu)))?;
    let u = linear_nd(&x, &wu, Some(&bu))?;
    t("geglu", || glm_nn::kernels::geglu(&u))?;
    let g = glm_nn::kernels::geglu(&u)?;
    t("down linear", || linear_nd(&g, &wd, None))?;
    t("head linear", || linear_nd(&x, &e, None))?;
    let x2 = x.reshape((b * tt, h))?;
    t("head through candle's gemm", || x2.matmul(&e.t()?))?;
    let big = Tensor::randn(0f32, 1., (b * tt, v), &dev)?;
    t("one pass over the logits (affine)", || big.affine(1.0, 1.0))?;
    let targets = Tensor::zeros(b * tt, DType::I64, &dev)?;
    t("cross entropy over the logits", || glm_nn::cross_entropy(&big, &targets))?;
    t("layer norm", || glm_nn::layer_norm(&x, &lnw, &lnb, 1e-5))?;
    t("residual alpha*a + y", || (&x * 3.0)? + &x)?;
    let qkv = linear_nd(&x, &wq, Some(&bq))?.reshape((b, tt, n, 3 * d))?;
    t("split heads (3 copies)", || {
        let q = qkv.narrow(3, 0, d)?.transpose(1, 2)?.contiguous()?;
        let k = qkv.narrow(3, d, d)?.transpose(1, 2)?.contiguous()?;
        qkv.narrow(3, 2 * d, d)?.transpose(1, 2)?.contiguous()?;
        q + k
    })?;
    let rope = glm_nn::Rope::new(d, 1, 10000.0, &dev)?;
    let pos = Tensor::arange(0i64, tt as i64, &dev)?.unsqueeze(0)?.repeat((b, 1))?;
    t("rope tables", || Ok(rope.tables(&pos, DType::F32)?.0))?;
    let (c, s) = rope.tables(&pos, DType::F32)?;
    let q = qkv.narrow(3, 0, d)?.transpose(1, 2)?.contiguous()?;
    t("rope apply (q)", || rope.apply(&q, &c, &s))?;
    t("scale q", || &q * 0.125)?;
    t("q k^T (candle)", || q.matmul(&q.t()?))?;
    t("q k^T", || glm_nn::blas::matmul(&q, &q, true))?;
    let sc = q.matmul(&q.t()?)?;
    let layout = glm_nn::AttnLayout::prefix_lm(&vec![tt / 2; b]);
    t("mask build", || layout.mask(0, tt, tt, &dev))?;
    let mask = layout.mask(0, tt, tt, &dev)?;
    t("masked softmax", || glm_nn::masked_softmax(&sc, &mask))?;
    t("masked softmax ref", || glm_nn::kernels::masked_softmax_ref(&sc, &mask))?;
    t("exp (candle)", || sc.exp())?;
    t("copy (candle)", || sc.affine(1.0, 0.0))?;
    let p = glm_nn::masked_softmax(&sc, &mask)?;
    t("p v (candle)", || p.matmul(&q))?;
    t("p v", || glm_nn::blas::matmul(&p, &q, false))?;
    let ctx = p.matmul(&q)?;
    t("merge heads", || ctx.transpose(1, 2)?.reshape((b, tt, h)))?;
    Ok(())
}
