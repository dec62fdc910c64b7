//! The quantized matvec kernel against the machine's read bandwidth, measured in the same run:
//!
//!     cargo run --release -p glm-quant --example matvec_speed -- ROWS COLS [CALLS] [MATRICES]
//!
//! MATRICES distinct copies are cycled so that, when their total exceeds the caches, the weights
//! stream from DRAM as in a decode step. `GLM_QUANT_KERNEL=avx2|portable` picks another build.

use glm_quant::{Bits, QuantMatrix};
use rayon::prelude::*;
use std::time::Instant;
fn bw() -> f64 {
    let v: Vec<f32> = vec![1.0; 128 << 20];
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: f32 = v
            .par_chunks(1 << 16)
            .map(|c| {
                let mut a = [0f32; 8];
                for x in c.chunks_exact(8) {
                    for l in 0..8 {
                        a[l] += x[l];
                    }
                }
                a.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best = best.max(512.0 * 1048576.0 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}
fn main() {
    println!("kernel build: {}", glm_quant::kernel_name());
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (rows, cols) = (args.first().copied().unwrap_or(4096), args.get(1).copied().unwrap_or(4096));
    let n = args.get(2).copied().unwrap_or(50);
    let mats = args.get(3).copied().unwrap_or(1);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect();
    let x: Vec<f32> = (0..cols).map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0).collect();
    println!("bandwidth {:.1} GB/s", bw());
    for bits in [Bits::Int8, Bits::Int4] {
        let m = QuantMatrix::quantize(&w, rows, cols, bits).unwrap();
        let ms: Vec<QuantMatrix> = (0..mats).map(|_| m.clone()).collect();
        let mut y = vec![0f32; rows];
        for m in &ms {
            m.matvec(&x, &mut y).unwrap();
        }
        let t = Instant::now();
        for i in 0..n {
            ms[i % mats].matvec(&x, &mut y).unwrap();
        }
        let s = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "{bits:?} {rows}x{cols} x{mats}: {:.1} us, {:.1} GMAC/s, {:.1} GB/s of weights",
            s * 1e6,
            (rows * cols) as f64 / s / 1e9,
            m.data.len() as f64 / s / 1e9
        );
    }
    println!("bandwidth {:.1} GB/s", bw());
}
