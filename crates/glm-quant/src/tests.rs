use super::*;

/// A seeded xorshift: tests do not need a crate for random numbers.
fn randoms(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

#[test]
fn nibbles_pack_like_glm_130b() {
    // Even column in the high nibble, odd column in the low one.
    assert_eq!(pack_nibbles(1, -2) as u8, 0x1e);
    assert_eq!(pack_nibbles(7, -7) as u8, 0x79);
    assert_eq!(pack_nibbles(-7, 7) as u8, 0x97);
    assert_eq!(pack_nibbles(0, 0), 0);
    for hi in -8..=7i8 {
        for lo in -8..=7i8 {
            assert_eq!(unpack_nibbles(pack_nibbles(hi, lo)), (hi, lo));
        }
    }
}

#[test]
fn a_worked_int4_row_is_byte_exact() -> Result<()> {
    // absmax 0.7 -> scale f16(0.1) = 0.099975586; q = [7, -7, 1, 2].
    let m = QuantMatrix::quantize(&[0.7, -0.7, 0.1, 0.2], 1, 4, Bits::Int4)?;
    assert_eq!(m.scales[0], f16::from_f32(0.1));
    assert_eq!(m.data.iter().map(|&b| b as u8).collect::<Vec<_>>(), vec![0x79, 0x12]);
    assert_eq!(m.row_q(0), vec![7, -7, 1, 2]);
    // Halves round to even, as torch.round: scale 7 / 7 = 1.
    let m = QuantMatrix::quantize(&[7.0, 2.5, 3.5, -2.5, 0.5, -1.5], 1, 6, Bits::Int4)?;
    assert_eq!(m.row_q(0), vec![7, 2, 4, -2, 0, -2]);
    let m8 = QuantMatrix::quantize(&[0.7, -0.7, 0.1, 0.2], 1, 4, Bits::Int8)?;
    assert_eq!(m8.data, vec![127, -127, 18, 36]); // 0.1 / f16(0.7 / 127) = 18.14, 0.2 / .. = 36.29
    Ok(())
}

#[test]
fn dequantized_weights_stay_within_one_step_of_absmax() -> Result<()> {
    let (rows, cols) = (23, 64);
    let mut w = randoms(rows * cols, 7);
    w[5 * cols..6 * cols].iter_mut().for_each(|v| *v = 0.0); // an all-zero row
    for bits in [Bits::Int8, Bits::Int4] {
        let m = QuantMatrix::quantize(&w, rows, cols, bits)?;
        m.validate()?;
        let d = m.dequantize();
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let absmax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            let step = absmax / bits.qmax();
            for (c, (&x, &y)) in row.iter().zip(&d[r * cols..(r + 1) * cols]).enumerate() {
                assert!((x - y).abs() <= step * 0.5 + absmax * 1e-3 + 1e-7, "{bits:?} [{r}, {c}]: {x} -> {y}");
            }
        }
    }
    Ok(())
}

/// How far `matvec` may be from `matvec_ref` for row r: each activation moves by at most half its
/// block's fixed-point step, times that weight, plus f32 rounding.
fn matvec_bound(m: &QuantMatrix, x: &[f32], r: usize) -> f32 {
    let a = kernels::Activations::new(x, m.bits, kernels::kernels().layout);
    let q = m.row_q(r);
    let s = m.scales[r].to_f32();
    let moved: f32 =
        q[..a.fast].iter().enumerate().map(|(j, &q)| (q as f32).abs() * a.scales[j / kernels::XBLOCK] * 0.5).sum();
    let magnitude: f32 = q.iter().zip(x).map(|(&q, &x)| (q as f32 * x).abs()).sum();
    s * (moved * 1.001 + magnitude * 1e-6)
}

#[test]
fn matvec_matches_its_reference() -> Result<()> {
    for (rows, cols) in [(37, 130), (1, 2), (5, 32), (300, 4096 + 6), (64, 5632)] {
        let w = randoms(rows * cols, rows as u64);
        let mut x = randoms(cols, 99);
        if cols > 1000 {
            x[700] = 300.0; // an outlier feature: only its own 128-column block gets a coarser step
        }
        for bits in [Bits::Int8, Bits::Int4] {
            let m = QuantMatrix::quantize(&w, rows, cols, bits)?;
            let (mut fast, mut slow) = (vec![0f32; rows], vec![0f32; rows]);
            m.matvec(&x, &mut fast)?;
            m.matvec_ref(&x, &mut slow)?;
            for (r, (a, b)) in fast.iter().zip(&slow).enumerate() {
                let bound = matvec_bound(&m, &x, r);
                assert!((a - b).abs() <= bound, "{bits:?} {rows}x{cols} row {r}: {a} vs {b} (bound {bound})");
            }
            // The bound is tight enough to mean something: far below the quantization error of W.
            let scale = slow.iter().fold(0f32, |a, v| a.max(v.abs()));
            let worst = (0..rows).map(|r| matvec_bound(&m, &x, r)).fold(0f32, f32::max);
            assert!(worst <= 2e-3 * scale.max(1.0), "{bits:?} {rows}x{cols}: bound {worst} vs outputs {scale}");
        }
    }
    Ok(())
}

#[test]
fn matmul_is_matvec_per_token() -> Result<()> {
    // Several tokens share one pass over the weights; each row of the result is that token's matvec.
    for (rows, cols, tokens) in [(200, 96, 5), (64, 40, 3), (300, 4096 + 6, 2)] {
        let w = randoms(rows * cols, 5);
        let x = randoms(tokens * cols, 6);
        for bits in [Bits::Int8, Bits::Int4] {
            let m = QuantMatrix::quantize(&w, rows, cols, bits)?;
            let mut y = vec![0f32; tokens * rows];
            m.matmul(&x, &mut y)?;
            for t in 0..tokens {
                let mut one = vec![0f32; rows];
                m.matvec(&x[t * cols..(t + 1) * cols], &mut one)?;
                assert_eq!(&y[t * rows..(t + 1) * rows], &one[..], "{bits:?} {rows}x{cols} token {t}");
            }
        }
    }
    let m = QuantMatrix::quantize(&randoms(8, 1), 2, 4, Bits::Int8)?;
    assert!(m.matmul(&[0.0; 7], &mut [0.0; 4]).is_err());
    assert!(m.matmul(&[0.0; 8], &mut [0.0; 3]).is_err());
    Ok(())
}

#[test]
fn a_non_finite_activation_gives_a_non_finite_product() -> Result<()> {
    let m = QuantMatrix::quantize(&randoms(4 * 256, 1), 4, 256, Bits::Int4)?;
    let mut x = randoms(256, 2);
    x[130] = f32::NAN;
    let mut y = vec![0f32; 4];
    m.matvec(&x, &mut y)?;
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
    Ok(())
}

#[test]
fn bad_inputs_are_errors() {
    assert!(QuantMatrix::quantize(&[1.0; 6], 2, 3, Bits::Int4).is_err()); // odd columns
    assert!(QuantMatrix::quantize(&[1.0; 5], 2, 3, Bits::Int8).is_err()); // wrong length
    let e = QuantMatrix::quantize(&[1.0, f32::NAN], 1, 2, Bits::Int8).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("[0, 1]"), "{e}");
    assert!(Bits::from_u32(3).is_err());
    let mut m = QuantMatrix::quantize(&[1.0; 8], 2, 4, Bits::Int4).expect("quantize");
    m.scales.pop();
    assert!(m.validate().is_err());
    let m = QuantMatrix::quantize(&[1.0; 8], 2, 4, Bits::Int8).expect("quantize");
    assert!(m.matvec(&[1.0; 3], &mut [0.0; 2]).is_err());
}

#[test]
fn every_kernel_build_agrees_with_the_portable_one() {
    // The integer sums are exact in all builds; only the order of the per-block f32 sums differs
    // (and the f32 tail past the last full chunk, which the builds cut at 32 or 64 columns).
    let builds = kernels::available();
    eprintln!("kernel builds on this CPU: {:?}", builds.iter().map(|k| k.name).collect::<Vec<_>>());
    for cols in [64, 160, 1024, 5632, 4096 + 96] {
        let mut x = randoms(cols, 3);
        x[cols / 3] *= 50.0;
        for bits in [Bits::Int8, Bits::Int4] {
            // Seven rows (a group of four, then three single ones), every byte value present.
            let stride = bits.row_bytes(cols);
            let w: Vec<i8> = (0..7 * stride).map(|i| (i * 37 % 256) as u8 as i8).collect();
            let m = QuantMatrix { bits, rows: 7, cols, data: w, scales: vec![f16::ONE; 7] };
            let results: Vec<Vec<f32>> = builds
                .iter()
                .map(|k| {
                    let a = kernels::Activations::new(&x, bits, k.layout);
                    let dot = if bits == Bits::Int8 { k.i8 } else { k.i4 };
                    let mut out = vec![0f32; 7];
                    dot(&m.data, stride, &a, &mut out);
                    let fb = bits.row_bytes(a.fast);
                    for (r, o) in out.iter_mut().enumerate() {
                        *o += kernels::dot_tail_f32(bits, &m.data[r * stride + fb..(r + 1) * stride], &x[a.fast..]);
                    }
                    out
                })
                .collect();
            let mut exact = vec![0f32; 7];
            m.matvec_ref(&x, &mut exact).expect("reference");
            for (k, got) in builds.iter().zip(&results) {
                for r in 0..7 {
                    // Same fixed-point activations, exact integer sums: the builds differ by f32
                    // summation order only; against f32, by the activation rounding.
                    let bound = matvec_bound(&m, &x, r);
                    let magnitude: f32 = m.row_q(r).iter().zip(&x).map(|(&q, &x)| (q as f32 * x).abs()).sum();
                    let (a, b) = (got[r], results[results.len() - 1][r]);
                    assert!(
                        (a - b).abs() <= 1e-5 * magnitude,
                        "{} vs portable, {bits:?} {cols} row {r}: {a} vs {b}",
                        k.name
                    );
                    assert!(
                        (a - exact[r]).abs() <= bound,
                        "{} vs f32, {bits:?} {cols} row {r}: {a} vs {}",
                        k.name,
                        exact[r]
                    );
                }
            }
        }
    }
}
