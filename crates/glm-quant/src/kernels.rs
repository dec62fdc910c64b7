//! The decode kernels: quantized rows times one activation vector.
//!
//! Converting every int4/int8 weight to f32 before its FMA costs ~20 instructions per 32 weights,
//! which made the INT4 matvec compute-bound at a third of the memory bandwidth. Here the activation
//! vector is rounded once per product to 16-bit fixed point, one scale per `XBLOCK` columns, and the
//! weights meet it in the integer unit, exact within a block; each block's sum is then scaled in
//! f32. The weights are used exactly as stored (W4A16 / W8A16, as in GLM-130B); the activations
//! lose at most half a step, `absmax(block) / 65278`, per element — finer than fp16's 2^-11
//! relative rounding for every element within 1/32 of its block's largest.
//!
//! Three builds, chosen at run time:
//! - `avx-vnni`: the weights as unsigned bytes (`w + 8` per nibble, `w + 128` for INT8, fixed up
//!   by `offset · Σx` per block) against the activations split into their high and low signed
//!   bytes, with `vpdpbusd` (32 products per instruction): 8 instructions per 64 INT4 weights;
//! - `avx2`: the weights sign-extended to i16 against the i16 activations with `vpmaddwd`
//!   (16 products): 16 instructions per 64 INT4 weights;
//! - `portable`: the same integer arithmetic in scalar Rust.
//!
//! `QuantMatrix::matvec_ref`, which dequantizes and multiplies in f32, is the twin all are tested
//! against, and they are tested against each other.

use crate::{unpack_nibbles, Bits};

/// Columns sharing one activation scale.
pub const XBLOCK: usize = 128;
/// The largest fixed-point activation: 127 · 256 + 127, so that its high and low bytes are both
/// in i8's range.
const QX: f32 = 32639.0;

/// How a kernel wants the activations laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// i16 values in chunks of 32 columns; for INT4 each chunk holds its 16 even columns, then its
    /// 16 odd ones (the high and low nibbles of 16 packed bytes).
    Words,
    /// Chunks of 64 columns as signed bytes: for INT8 `[hi 0..32][lo 0..32][hi 32..64][lo 32..64]`,
    /// for INT4 `[hi even][lo even][hi odd][lo odd]` (32 each), `x = 256 hi + lo`.
    Bytes,
}

impl Layout {
    /// Columns per kernel step; a row's last `cols % chunk` columns are done in f32.
    pub fn chunk(self) -> usize {
        match self {
            Self::Words => 32,
            Self::Bytes => 64,
        }
    }
}

/// An activation vector in 16-bit fixed point: `x[j] ≈ v[j] * scales[j / XBLOCK]` for the first
/// `fast` columns, laid out as `layout` says (`words` or `bytes`, the other one empty), with the
/// integer sum of each block's values (`sums`, for the `Bytes` kernels' offset fix-up).
#[derive(Debug, Clone)]
pub struct Activations {
    pub layout: Layout,
    pub words: Vec<i16>,
    pub bytes: Vec<i8>,
    pub sums: Vec<i32>,
    pub scales: Vec<f32>,
    pub fast: usize,
}

impl Activations {
    pub fn new(x: &[f32], bits: Bits, layout: Layout) -> Self {
        let chunk = layout.chunk();
        let fast = x.len() - x.len() % chunk;
        let mut v = vec![0i16; fast];
        let blocks = fast.div_ceil(XBLOCK);
        let (mut scales, mut sums) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        for (xb, vb) in x[..fast].chunks(XBLOCK).zip(v.chunks_mut(XBLOCK)) {
            // |x| compared as integer bits (vectorizes; NaN and inf sort above every finite value).
            // A non-finite activation makes its block's scale NaN, so the product is NaN as in f32.
            let bits_max = xb.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
            let s = if bits_max >= 0x7f80_0000 { f32::NAN } else { f32::from_bits(bits_max) / QX };
            scales.push(s);
            if s.is_nan() || s == 0.0 {
                sums.push(0);
                continue; // all zero (v stays 0) or non-finite (the NaN scale carries it)
            }
            let inv = 1.0 / s;
            // Round half to even by adding and removing 1.5 * 2^23, which compiles to two vector
            // adds where `round_ties_even` is a libm call on baseline x86-64.
            const MAGIC: f32 = 12_582_912.0;
            // SAFETY: every v in the block is finite with |v| <= absmax, so |v * inv| rounds to at
            // most QX (+ one f32 ulp): in range for i32 and for i16.
            let r = |v: f32| unsafe { ((v * inv + MAGIC) - MAGIC).to_int_unchecked::<i32>() } as i16;
            vb.iter_mut().zip(xb).for_each(|(o, &x)| *o = r(x));
            sums.push(vb.iter().map(|&v| v as i32).sum());
        }
        let (mut words, mut bytes) = (Vec::new(), Vec::new());
        match (layout, bits) {
            (Layout::Words, Bits::Int8) => words = v,
            (Layout::Words, Bits::Int4) => {
                words = vec![0i16; fast];
                for (o, v) in words.chunks_exact_mut(32).zip(v.chunks_exact(32)) {
                    for j in 0..16 {
                        (o[j], o[16 + j]) = (v[2 * j], v[2 * j + 1]);
                    }
                }
            }
            (Layout::Bytes, _) => {
                // v = 256 hi + lo with lo in [-128, 127]; |v| <= QX keeps hi in [-127, 127].
                let split = |v: i16| {
                    let lo = v as i8;
                    (((v as i32 - lo as i32) >> 8) as i8, lo)
                };
                bytes = vec![0i8; 2 * fast];
                for (o, v) in bytes.chunks_exact_mut(128).zip(v.chunks_exact(64)) {
                    for j in 0..32 {
                        // INT8: halves of 32 columns; INT4: even columns, then odd ones.
                        let (a, b) = match bits {
                            Bits::Int8 => (v[j], v[32 + j]),
                            Bits::Int4 => (v[2 * j], v[2 * j + 1]),
                        };
                        (o[j], o[32 + j]) = split(a);
                        (o[64 + j], o[96 + j]) = split(b);
                    }
                }
            }
        }
        Self { layout, words, bytes, sums, scales, fast }
    }
}

/// `out[i] = Σ_j w_ij x_j` over the fast columns of `out.len()` rows: row i starts at byte
/// `i * stride` of `w`, and only its first `bits.row_bytes(a.fast)` bytes are read.
pub type Dot = fn(w: &[i8], stride: usize, a: &Activations, out: &mut [f32]);

/// The bytes `Dot` reads, checked before any kernel runs.
fn check(bits: Bits, layout: Layout, w: &[i8], stride: usize, a: &Activations, rows: usize) {
    let fb = bits.row_bytes(a.fast);
    let need = if rows == 0 { 0 } else { (rows - 1) * stride + fb };
    let values = match layout {
        Layout::Words => a.words.len(),
        Layout::Bytes => a.bytes.len() / 2,
    };
    assert!(
        a.layout == layout
            && w.len() >= need
            && stride >= fb
            && values == a.fast
            && a.fast.is_multiple_of(layout.chunk())
            && a.scales.len() == a.fast.div_ceil(XBLOCK)
            && a.sums.len() == a.scales.len(),
        "{bits:?} dot: {} bytes for {rows} rows of stride {stride}, {} activations laid out {:?} for {layout:?}",
        w.len(),
        a.fast,
        a.layout
    );
}

/// One build of the dot products.
pub struct Kernels {
    pub name: &'static str,
    pub layout: Layout,
    pub i8: Dot,
    pub i4: Dot,
}

pub const PORTABLE: Kernels =
    Kernels { name: "portable", layout: Layout::Words, i8: dot_i8_portable, i4: dot_i4_portable };

/// Every build this CPU can run, fastest first.
pub fn available() -> Vec<&'static Kernels> {
    let mut all: Vec<&'static Kernels> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("avxvnni") {
            all.push(&x86::VNNI);
        }
        if has!("avx2") && has!("fma") {
            all.push(&x86::AVX2);
        }
    }
    all.push(&PORTABLE);
    all
}

/// The fastest build, chosen once; `GLM_QUANT_KERNEL=avx2|portable|...` picks another one this
/// CPU can run (for comparisons and bug reports).
pub fn kernels() -> &'static Kernels {
    static K: std::sync::OnceLock<&'static Kernels> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        let all = available();
        let wanted = std::env::var("GLM_QUANT_KERNEL").ok();
        all.iter().find(|k| Some(k.name) == wanted.as_deref()).copied().unwrap_or(all[0])
    })
}

pub fn dot_i8_portable(w: &[i8], stride: usize, a: &Activations, out: &mut [f32]) {
    check(Bits::Int8, Layout::Words, w, stride, a, out.len());
    for (i, o) in out.iter_mut().enumerate() {
        let row = &w[i * stride..i * stride + a.fast];
        *o = 0.0;
        for ((w, q), &s) in row.chunks(XBLOCK).zip(a.words.chunks(XBLOCK)).zip(&a.scales) {
            let sum: i32 = w.iter().zip(q).map(|(&w, &q)| w as i32 * q as i32).sum();
            *o += sum as f32 * s;
        }
    }
}

pub fn dot_i4_portable(w: &[i8], stride: usize, a: &Activations, out: &mut [f32]) {
    check(Bits::Int4, Layout::Words, w, stride, a, out.len());
    for (i, o) in out.iter_mut().enumerate() {
        let row = &w[i * stride..i * stride + a.fast / 2];
        *o = 0.0;
        for ((w, q), &s) in row.chunks(XBLOCK / 2).zip(a.words.chunks(XBLOCK)).zip(&a.scales) {
            let mut sum = 0i32;
            for (w, q) in w.chunks_exact(16).zip(q.chunks_exact(32)) {
                for j in 0..16 {
                    let (hi, lo) = unpack_nibbles(w[j]);
                    sum += hi as i32 * q[j] as i32 + lo as i32 * q[16 + j] as i32;
                }
            }
            *o += sum as f32 * s;
        }
    }
}

/// `Σ w_j x_j` in f32 for the columns past the last full chunk (and the exact reference shape).
pub fn dot_tail_f32(bits: Bits, row: &[i8], x: &[f32]) -> f32 {
    match bits {
        Bits::Int8 => row.iter().zip(x).map(|(&q, &x)| q as f32 * x).sum(),
        Bits::Int4 => row
            .iter()
            .zip(x.chunks_exact(2))
            .map(|(&b, x)| {
                let (hi, lo) = unpack_nibbles(b);
                hi as f32 * x[0] + lo as f32 * x[1]
            })
            .sum(),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{check, Activations, Kernels, Layout, XBLOCK};
    use crate::Bits;
    use glm_nn::matvec::hsum256 as hsum;
    use std::arch::x86_64::*;

    pub const AVX2: Kernels = Kernels { name: "avx2", layout: Layout::Words, i8: avx2::<false>, i4: avx2::<true> };
    pub const VNNI: Kernels = Kernels { name: "avx-vnni", layout: Layout::Bytes, i8: vnni::<false>, i4: vnni::<true> };

    /// `R` rows at once, so each activation load serves R rows, with `vpmaddwd`: 32 columns of a
    /// row become 8 i32 lanes of pairwise products with the i16 activations.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows_words<const R: usize, const INT4: bool>(w: *const i8, stride: usize, a: &Activations) -> [f32; R] {
        let q = a.words.as_ptr();
        let mut total = [_mm256_setzero_ps(); R];
        for (b, &s) in a.scales.iter().enumerate() {
            let (c0, c1) = (b * XBLOCK, ((b + 1) * XBLOCK).min(a.fast));
            let mut acc = [_mm256_setzero_si256(); R];
            let mut c = c0;
            while c < c1 {
                // SAFETY (all loads): c + 32 <= a.fast == a.words.len(), and each row's bytes up to
                // row_bytes(a.fast) are in bounds (`check`).
                let x0 = _mm256_loadu_si256(q.add(c) as *const __m256i);
                let x1 = _mm256_loadu_si256(q.add(c + 16) as *const __m256i);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = w.add(r * stride);
                    // The same columns of the row R below, read by the next group: DRAM's latency
                    // hidden behind this group's work (a hint; it never faults).
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(R * stride + if INT4 { c / 2 } else { c }));
                    let (p0, p1) = if INT4 {
                        // 16 bytes = 32 columns: the high nibble (even column) is an arithmetic
                        // shift right by 4 of the sign-extended byte, the low one (odd column) a
                        // shift left by 12 then right by 12.
                        let v = _mm256_cvtepi8_epi16(_mm_loadu_si128(row.add(c / 2) as *const __m128i));
                        let lo = _mm256_srai_epi16::<12>(_mm256_slli_epi16::<12>(v));
                        (_mm256_madd_epi16(_mm256_srai_epi16::<4>(v), x0), _mm256_madd_epi16(lo, x1))
                    } else {
                        let w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(row.add(c) as *const __m128i));
                        let w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(row.add(c + 16) as *const __m128i));
                        (_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1))
                    };
                    *acc = _mm256_add_epi32(*acc, _mm256_add_epi32(p0, p1));
                }
                c += 32;
            }
            let sv = _mm256_set1_ps(s);
            for (t, acc) in total.iter_mut().zip(acc) {
                *t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), sv, *t);
            }
        }
        total.map(|t| hsum(t))
    }

    /// `R` rows at once with `vpdpbusd` (unsigned bytes times signed bytes, four products into
    /// each i32 lane). The weights become unsigned by flipping their sign bits (`w + 8` per nibble,
    /// `w + 128` per byte); the activations arrive as high and low signed bytes. Per block:
    /// `Σ w x = 256 Σ u·hi + Σ u·lo - offset · Σ x`, all in exact integers.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    #[inline]
    unsafe fn rows_bytes<const R: usize, const INT4: bool>(w: *const i8, stride: usize, a: &Activations) -> [f32; R] {
        let x = a.bytes.as_ptr();
        let flip = _mm256_set1_epi8(if INT4 { 0x88u8 as i8 } else { 0x80u8 as i8 });
        let nib = _mm256_set1_epi8(0x0f);
        let offset = if INT4 { 8 } else { 128 };
        let mut total = [_mm256_setzero_ps(); R];
        for (b, &s) in a.scales.iter().enumerate() {
            let (c0, c1) = (b * XBLOCK, ((b + 1) * XBLOCK).min(a.fast));
            let (mut hi, mut lo) = ([_mm256_setzero_si256(); R], [_mm256_setzero_si256(); R]);
            let mut c = c0;
            while c < c1 {
                // SAFETY (all loads): 64 columns = 128 activation bytes from 2c, c + 64 <= a.fast
                // == a.bytes.len() / 2; each row's bytes up to row_bytes(a.fast) are in bounds.
                let xp = x.add(2 * c);
                let xh0 = _mm256_loadu_si256(xp as *const __m256i);
                let xl0 = _mm256_loadu_si256(xp.add(32) as *const __m256i);
                let xh1 = _mm256_loadu_si256(xp.add(64) as *const __m256i);
                let xl1 = _mm256_loadu_si256(xp.add(96) as *const __m256i);
                for r in 0..R {
                    let row = w.add(r * stride);
                    let (u0, u1) = if INT4 {
                        // 32 bytes = 64 columns: high nibbles (even columns), low nibbles (odd).
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(R * stride + c / 2));
                        let v = _mm256_xor_si256(_mm256_loadu_si256(row.add(c / 2) as *const __m256i), flip);
                        (_mm256_and_si256(_mm256_srli_epi16::<4>(v), nib), _mm256_and_si256(v, nib))
                    } else {
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(R * stride + c));
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(R * stride + c + 32));
                        let u0 = _mm256_xor_si256(_mm256_loadu_si256(row.add(c) as *const __m256i), flip);
                        let u1 = _mm256_xor_si256(_mm256_loadu_si256(row.add(c + 32) as *const __m256i), flip);
                        (u0, u1)
                    };
                    hi[r] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(hi[r], u0, xh0), u1, xh1);
                    lo[r] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(lo[r], u0, xl0), u1, xl1);
                }
                c += 64;
            }
            let sv = _mm256_set1_ps(s);
            let fix = _mm256_setr_epi32(offset * a.sums[b], 0, 0, 0, 0, 0, 0, 0);
            for r in 0..R {
                let sum = _mm256_sub_epi32(_mm256_add_epi32(_mm256_slli_epi32::<8>(hi[r]), lo[r]), fix);
                total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), sv, total[r]);
            }
        }
        total.map(|t| hsum(t))
    }

    /// Groups of four rows, then the rest one at a time.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn words<const INT4: bool>(w: &[i8], stride: usize, a: &Activations, out: &mut [f32]) {
        let (p, full) = (w.as_ptr(), out.len() / 4 * 4);
        for (g, o) in out[..full].chunks_exact_mut(4).enumerate() {
            o.copy_from_slice(&rows_words::<4, INT4>(p.add(4 * g * stride), stride, a));
        }
        for (i, o) in out.iter_mut().enumerate().skip(full) {
            *o = rows_words::<1, INT4>(p.add(i * stride), stride, a)[0];
        }
    }

    /// As `words`, for the `vpdpbusd` rows.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    unsafe fn bytes<const INT4: bool>(w: &[i8], stride: usize, a: &Activations, out: &mut [f32]) {
        let (p, full) = (w.as_ptr(), out.len() / 4 * 4);
        for (g, o) in out[..full].chunks_exact_mut(4).enumerate() {
            o.copy_from_slice(&rows_bytes::<4, INT4>(p.add(4 * g * stride), stride, a));
        }
        for (i, o) in out.iter_mut().enumerate().skip(full) {
            *o = rows_bytes::<1, INT4>(p.add(i * stride), stride, a)[0];
        }
    }

    fn bits<const INT4: bool>() -> Bits {
        if INT4 {
            Bits::Int4
        } else {
            Bits::Int8
        }
    }

    // SAFETY (both): listed by `available` only after is_x86_feature_detected! found the features
    // they are compiled for; `check` bounds every load.
    fn avx2<const INT4: bool>(w: &[i8], stride: usize, a: &Activations, out: &mut [f32]) {
        check(bits::<INT4>(), Layout::Words, w, stride, a, out.len());
        unsafe { words::<INT4>(w, stride, a, out) }
    }

    fn vnni<const INT4: bool>(w: &[i8], stride: usize, a: &Activations, out: &mut [f32]) {
        check(bits::<INT4>(), Layout::Bytes, w, stride, a, out.len());
        unsafe { bytes::<INT4>(w, stride, a, out) }
    }
}
