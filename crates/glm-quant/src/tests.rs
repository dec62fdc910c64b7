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

#[test]
fn matvec_matches_its_reference() -> Result<()> {
    for (rows, cols) in [(37, 130), (1, 2), (300, 4096 + 6)] {
        let w = randoms(rows * cols, rows as u64);
        let x = randoms(cols, 99);
        for bits in [Bits::Int8, Bits::Int4] {
            let m = QuantMatrix::quantize(&w, rows, cols, bits)?;
            let (mut fast, mut slow) = (vec![0f32; rows], vec![0f32; rows]);
            m.matvec(&x, &mut fast)?;
            m.matvec_ref(&x, &mut slow)?;
            let scale = slow.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-6);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() / scale < 1e-5, "{bits:?} {rows}x{cols}: {a} vs {b}");
            }
        }
    }
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
fn the_portable_and_the_dispatched_dot_products_agree() {
    let x = randoms(1030, 3);
    let q: Vec<i8> = randoms(1030, 4).iter().map(|v| (v * 30.0) as i8).collect();
    let (a, b) = (dot_i8_portable(&q, &x), (kernels().i8)(&q, &x));
    assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b} ({})", kernel_name());
    let (a, b) = (dot_i4_portable(&q[..515], &x), (kernels().i4)(&q[..515], &x));
    assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
}
