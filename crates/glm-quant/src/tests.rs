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
            let m = QuantMatrix { bits, rows: 7, cols, groups: 1, data: w, scales: vec![f16::ONE; 7] };
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

/// How far `matmul_with(k, ..)` may be from `matvec_ref` for row r of a grouped matrix: per scale
/// group, each activation moves by at most half its block's fixed-point step (the blocks start
/// again at each group), times that weight and the group's scale, plus f32 rounding.
fn grouped_bound(m: &QuantMatrix, k: &kernels::Kernels, x: &[f32], r: usize) -> f32 {
    let (width, q) = (m.group_cols(), m.row_q(r));
    (0..m.groups)
        .map(|g| {
            let (xg, qg) = (&x[g * width..(g + 1) * width], &q[g * width..(g + 1) * width]);
            let a = kernels::Activations::new(xg, m.bits, k.layout);
            let moved: f32 = qg[..a.fast]
                .iter()
                .enumerate()
                .map(|(j, &q)| (q as f32).abs() * a.scales[j / kernels::XBLOCK] * 0.5)
                .sum();
            let magnitude: f32 = qg.iter().zip(xg).map(|(&q, &x)| (q as f32 * x).abs()).sum();
            m.scales[r * m.groups + g].to_f32() * (moved * 1.001 + magnitude * 2e-6)
        })
        .sum()
}

#[test]
fn quantize_grouped_gives_each_group_its_own_absmax_scale() -> Result<()> {
    let (rows, cols) = (9, 48);
    let mut w = randoms(rows * cols, 21);
    w[2 * cols + 12..2 * cols + 24].iter_mut().for_each(|v| *v = 0.0); // an all-zero group
    w[4 * cols + 30] = 40.0; // one group's outlier leaves the others' scales alone
    for bits in [Bits::Int8, Bits::Int4] {
        for groups in [1, 2, 4] {
            let m = QuantMatrix::quantize_grouped(&w, rows, cols, bits, groups)?;
            m.validate()?;
            assert_eq!((m.groups, m.scales.len(), m.data.len()), (groups, rows * groups, rows * bits.row_bytes(cols)));
            let width = cols / groups;
            for r in 0..rows {
                for g in 0..groups {
                    let part: Vec<f32> = w[r * cols + g * width..r * cols + (g + 1) * width].to_vec();
                    let absmax = part.iter().fold(0f32, |a, v| a.max(v.abs()));
                    assert_eq!(
                        m.scales[r * groups + g],
                        f16::from_f32(absmax / bits.qmax()),
                        "{bits:?} G{groups} [{r}, {g}]"
                    );
                    // The group is exactly what `quantize` makes of it alone: same scale, same rounding.
                    let alone = QuantMatrix::quantize(&part, 1, width, bits)?;
                    assert_eq!(
                        m.row_q(r)[g * width..(g + 1) * width],
                        alone.row_q(0)[..],
                        "{bits:?} G{groups} [{r}, {g}]"
                    );
                }
            }
            if groups == 1 {
                assert_eq!(m, QuantMatrix::quantize(&w, rows, cols, bits)?);
            }
        }
    }
    Ok(())
}

#[test]
fn grouped_matrices_dequantize_with_their_group_scales() -> Result<()> {
    let (rows, cols, groups) = (5, 40, 4);
    for bits in [Bits::Int8, Bits::Int4] {
        let m = QuantMatrix::quantize_grouped(&randoms(rows * cols, 4), rows, cols, bits, groups)?;
        let d = m.dequantize();
        for r in 0..rows {
            let q = m.row_q(r);
            for c in 0..cols {
                let s = m.scales[r * groups + c / 10].to_f32();
                assert_eq!(d[r * cols + c].to_bits(), (q[c] as f32 * s).to_bits(), "{bits:?} [{r}, {c}]");
            }
        }
        assert_eq!(m.dequantize_rows(1, 4), d[cols..4 * cols]);
    }
    Ok(())
}

#[test]
fn row_parallel_ranks_concatenate_into_the_grouped_quantization() -> Result<()> {
    // convert_tp.py quantizes each row-parallel rank's column slice on its own: merged with
    // concat_cols, that is quantize_grouped of the whole matrix, byte for byte and scale for scale.
    for bits in [Bits::Int8, Bits::Int4] {
        for (rows, cols, ranks) in [(6, 64, 2), (70, 520, 4), (3, 12, 3)] {
            let w = randoms(rows * cols, (cols + ranks) as u64);
            let width = cols / ranks;
            let parts: Vec<QuantMatrix> = (0..ranks)
                .map(|g| {
                    let slice: Vec<f32> =
                        (0..rows).flat_map(|r| w[r * cols + g * width..r * cols + (g + 1) * width].to_vec()).collect();
                    QuantMatrix::quantize(&slice, rows, width, bits)
                })
                .collect::<Result<_>>()?;
            let merged = QuantMatrix::concat_cols(&parts.iter().collect::<Vec<_>>())?;
            assert_eq!(
                merged,
                QuantMatrix::quantize_grouped(&w, rows, cols, bits, ranks)?,
                "{bits:?} {rows}x{cols}/{ranks}"
            );
            // ... and cut back into exactly the ranks.
            for (g, p) in parts.iter().enumerate() {
                assert_eq!(&merged.slice_cols(g * width, (g + 1) * width)?, p);
            }
            // The merged product is the ranks' partial products summed (the row-parallel all-reduce),
            // bit for bit: each group runs exactly the rank's own kernel.
            let x = randoms(2 * cols, 5);
            let mut y = vec![0f32; 2 * rows];
            merged.matmul(&x, &mut y)?;
            let mut sum = vec![0f32; 2 * rows];
            for (g, p) in parts.iter().enumerate() {
                let xg: Vec<f32> =
                    (0..2).flat_map(|t| x[t * cols + g * width..t * cols + (g + 1) * width].to_vec()).collect();
                let mut part = vec![0f32; 2 * rows];
                p.matmul(&xg, &mut part)?;
                if g == 0 {
                    sum = part;
                } else {
                    sum.iter_mut().zip(&part).for_each(|(s, p)| *s += p);
                }
            }
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
    Ok(())
}

#[test]
fn slices_and_concatenations_round_trip_exactly() -> Result<()> {
    let (rows, cols) = (13, 96);
    for bits in [Bits::Int8, Bits::Int4] {
        for groups in [1, 2, 4] {
            let m = QuantMatrix::quantize_grouped(&randoms(rows * cols, 8), rows, cols, bits, groups)?;
            // Rows: column-parallel ranks, uneven cuts included.
            let cuts = [0, 4, 5, 13];
            let parts: Vec<QuantMatrix> = cuts.windows(2).map(|c| m.slice_rows(c[0], c[1])).collect::<Result<_>>()?;
            assert_eq!(QuantMatrix::concat_rows(&parts.iter().collect::<Vec<_>>())?, m);
            assert_eq!(m.slice_rows(0, rows)?, m);
            assert_eq!(m.slice_rows(3, 3)?.rows, 0);
            // Columns on group boundaries: one rank per group, or two groups per rank.
            let width = cols / groups;
            let per_group: Vec<QuantMatrix> =
                (0..groups).map(|g| m.slice_cols(g * width, (g + 1) * width)).collect::<Result<_>>()?;
            assert!(per_group.iter().all(|p| p.groups == 1 && p.cols == width));
            assert_eq!(QuantMatrix::concat_cols(&per_group.iter().collect::<Vec<_>>())?, m);
            assert_eq!(m.slice_cols(0, cols)?, m);
            if groups == 4 {
                let halves = [m.slice_cols(0, 48)?, m.slice_cols(48, 96)?];
                assert_eq!(halves[0].groups, 2);
                assert_eq!(QuantMatrix::concat_cols(&[&halves[0], &halves[1]])?, m);
            }
            // Inside one group: that group's scales, the same dequantized values.
            let inner = m.slice_cols(width / 2 - 4, width / 2 + 6)?;
            assert_eq!((inner.groups, inner.cols), (1, 10));
            let (d, di) = (m.dequantize(), inner.dequantize());
            for r in 0..rows {
                assert_eq!(di[r * 10..(r + 1) * 10], d[r * cols + width / 2 - 4..r * cols + width / 2 + 6]);
            }
        }
    }
    Ok(())
}

#[test]
fn restructuring_refuses_what_it_cannot_do_exactly() -> Result<()> {
    let m4 = QuantMatrix::quantize_grouped(&randoms(4 * 32, 2), 4, 32, Bits::Int4, 4)?; // groups of 8
    let err = |r: Result<QuantMatrix>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(m4.slice_cols(4, 12)).contains("scale groups"), "{}", err(m4.slice_cols(4, 12))); // straddles two groups
    assert!(err(m4.slice_cols(8, 20)).contains("scale groups")); // one whole group and part of the next
    assert!(err(m4.slice_cols(1, 4)).contains("pair")); // INT4 cut inside a byte
    assert!(m4.slice_cols(2, 6).is_ok() && m4.slice_cols(8, 24).is_ok());
    assert!(err(m4.slice_cols(4, 4)).contains("4..4")); // empty
    assert!(err(m4.slice_cols(0, 34)).contains("32 columns"));
    assert!(err(m4.slice_rows(2, 5)).contains("4 rows"));
    assert!(err(m4.slice_rows(3, 2)).contains("4 rows"));
    assert!(QuantMatrix::concat_rows(&[]).is_err() && QuantMatrix::concat_cols(&[]).is_err());
    let m8 = QuantMatrix::quantize_grouped(&randoms(4 * 32, 2), 4, 32, Bits::Int8, 4)?;
    assert!(err(QuantMatrix::concat_rows(&[&m4, &m8])).contains("part 1 is 8-bit"));
    assert!(err(QuantMatrix::concat_cols(&[&m4, &m8])).contains("part 1 is 8-bit"));
    let two = QuantMatrix::quantize_grouped(&randoms(4 * 32, 2), 4, 32, Bits::Int4, 2)?; // groups of 16
    assert!(err(QuantMatrix::concat_rows(&[&m4, &two])).contains("in 2 scale group"));
    assert!(err(QuantMatrix::concat_cols(&[&m4, &two])).contains("groups of 16"));
    let taller = QuantMatrix::quantize_grouped(&randoms(5 * 32, 2), 5, 32, Bits::Int4, 4)?;
    assert!(err(QuantMatrix::concat_cols(&[&m4, &taller])).contains("[5, 32]"));
    assert!(QuantMatrix::concat_rows(&[&m4, &taller])?.rows == 9);
    // Shapes that cannot be grouped.
    assert!(err(QuantMatrix::quantize_grouped(&[1.0; 24], 2, 12, Bits::Int8, 5)).contains("5 equal scale groups"));
    assert!(err(QuantMatrix::quantize_grouped(&[1.0; 24], 2, 12, Bits::Int4, 4)).contains("odd 3"));
    assert!(QuantMatrix::quantize_grouped(&[1.0; 24], 2, 12, Bits::Int8, 0).is_err());
    assert!(QuantMatrix::quantize_grouped(&[1.0; 24], 2, 12, Bits::Int8, 4).is_ok());
    let mut bad = m4.clone();
    bad.groups = 3;
    assert!(bad.validate().is_err());
    let mut x = vec![0f32; 4];
    assert!(bad.matvec(&[0.0; 32], &mut x).is_err() && bad.slice_rows(0, 1).is_err());
    bad.groups = 2; // divides, but the scales are for 4
    assert!(err(QuantMatrix::from_parts(bad.bits, 4, 32, 2, bad.data.clone(), bad.scales.clone()))
        .contains("needs 64 bytes and 8 scales"));
    assert!(QuantMatrix::from_parts(m4.bits, 4, 32, 4, m4.data.clone(), m4.scales.clone())? == m4);
    Ok(())
}

#[test]
fn grouped_matmul_of_every_kernel_build_matches_the_reference() -> Result<()> {
    // Group widths that are and are not multiples of the kernels' 32/64-column chunks and of the
    // 128-column activation blocks; rows past the 4-row kernel groups and the 64-row work units;
    // one token and several; big enough matrices for the parallel path.
    let builds = kernels::available();
    let mut checked = 0;
    for groups in [1, 2, 4] {
        for width in [96, 128, 130, 4096 / groups, 2] {
            let (rows, cols) = (if width >= 1024 { 70 } else { 133 }, width * groups);
            let w = randoms(rows * cols, (width * groups) as u64);
            for bits in [Bits::Int8, Bits::Int4] {
                let m = QuantMatrix::quantize_grouped(&w, rows, cols, bits, groups)?;
                for tokens in [1, 3] {
                    let mut x = randoms(tokens * cols, 17 + tokens as u64);
                    x[cols / 3] *= 40.0; // an outlier: only its own group's block gets a coarser step
                    let mut want = vec![0f32; tokens * rows];
                    for (x, y) in x.chunks_exact(cols).zip(want.chunks_exact_mut(rows)) {
                        m.matvec_ref(x, y)?;
                    }
                    for k in &builds {
                        let mut got = vec![0f32; tokens * rows];
                        m.matmul_with(k, &x, &mut got)?;
                        for t in 0..tokens {
                            let xt = &x[t * cols..(t + 1) * cols];
                            for r in 0..rows {
                                let (a, b) = (got[t * rows + r], want[t * rows + r]);
                                let bound = grouped_bound(&m, k, xt, r);
                                assert!(
                                    (a - b).abs() <= bound,
                                    "{} {bits:?} G{groups} width {width} token {t} row {r}: {a} vs {b} (bound {bound})",
                                    k.name
                                );
                            }
                            if tokens > 1 {
                                // Several tokens: each is exactly its own matvec.
                                let mut one = vec![0f32; rows];
                                m.matmul_with(k, xt, &mut one)?;
                                assert_eq!(
                                    got[t * rows..(t + 1) * rows],
                                    one[..],
                                    "{} {bits:?} G{groups} {width}",
                                    k.name
                                );
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    eprintln!("{checked} grouped products on {:?}", builds.iter().map(|k| k.name).collect::<Vec<_>>());
    Ok(())
}
