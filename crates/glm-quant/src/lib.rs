//! GLM-130B's weight-only quantization (spec section 5), exactly as its kernels lay it out:
//!
//! - per output row (dim 0), symmetric absmax: `scale = max|W_row| / (2^(b-1) - 1)` (127 or 7),
//!   stored as f16; `q = round(W / scale)` (round half to even, as `torch.round`), in int8;
//! - INT4 packs two values per byte, **the even column in the high nibble, the odd column in the low
//!   nibble**, each sign-extended on extraction, so an INT4 weight is `[rows, cols / 2]` int8;
//! - dequantization is `W = q * scale[row]`; activations stay in floating point (W8A16 / W4A16).
//!
//! `QuantMatrix::matvec` is the decode kernel: one pass over the packed weights per token, the
//! dequantization folded into the dot product, rows split across threads. Its `_ref` twin
//! dequantizes the whole matrix and multiplies in f32.

pub mod checkpoint;
pub mod linear;

pub use checkpoint::{quantize_checkpoint, QuantCheckpoint, QuantReport};
pub use linear::{QuantFactory, QuantLinear};

use half::f16;
use rayon::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Shape(String),
    #[error("{0}")]
    Format(String),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    Int8,
    Int4,
}

impl Bits {
    pub fn from_u32(b: u32) -> Result<Self> {
        match b {
            8 => Ok(Self::Int8),
            4 => Ok(Self::Int4),
            _ => Err(Error::Format(format!("{b}-bit quantization is not supported (GLM-130B uses 8 or 4)"))),
        }
    }

    pub fn bits(self) -> u32 {
        match self {
            Self::Int8 => 8,
            Self::Int4 => 4,
        }
    }

    /// The largest quantized magnitude: 2^(b-1) - 1.
    pub fn qmax(self) -> f32 {
        ((1u32 << (self.bits() - 1)) - 1) as f32
    }

    /// Stored bytes per row of `cols` weights.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::Int8 => cols,
            Self::Int4 => cols / 2,
        }
    }
}

/// A quantized `[rows, cols]` weight: `data` holds `rows * bits.row_bytes(cols)` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    pub bits: Bits,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<i8>,
    pub scales: Vec<f16>,
}

/// Two int4 values in one byte: `hi` (even column) in the high nibble, `lo` (odd column) in the low.
#[inline(always)]
pub fn pack_nibbles(hi: i8, lo: i8) -> i8 {
    (((hi as u8) << 4) | (lo as u8 & 0x0f)) as i8
}

/// The (even, odd) column values of a packed byte, sign-extended.
#[inline(always)]
pub fn unpack_nibbles(b: i8) -> (i8, i8) {
    (b >> 4, (b << 4) >> 4)
}

impl QuantMatrix {
    /// Quantize a row-major f32 matrix.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, bits: Bits) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(Error::Shape(format!("{} values for a [{rows}, {cols}] matrix", w.len())));
        }
        if bits == Bits::Int4 && !cols.is_multiple_of(2) {
            return Err(Error::Shape(format!("INT4 packs column pairs; {cols} columns is odd")));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::Format(format!("weight [{}, {}] is {}: cannot quantize", i / cols, i % cols, w[i])));
        }
        let qmax = bits.qmax();
        let rb = bits.row_bytes(cols);
        let mut data = vec![0i8; rows * rb];
        let mut scales = vec![f16::ZERO; rows];
        data.par_chunks_mut(rb.max(1)).zip(scales.par_iter_mut()).zip(w.par_chunks(cols.max(1))).for_each(
            |((out, scale), row)| {
                let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The scale is stored in f16 and q is computed against the stored value, as GLM-130B
                // does with its fp16 weights.
                *scale = f16::from_f32(absmax / qmax);
                let s = scale.to_f32();
                let q = |v: f32| if s > 0.0 { (v / s).round_ties_even().clamp(-qmax, qmax) as i8 } else { 0 };
                match bits {
                    Bits::Int8 => out.iter_mut().zip(row).for_each(|(o, &v)| *o = q(v)),
                    Bits::Int4 => {
                        out.iter_mut().zip(row.chunks_exact(2)).for_each(|(o, p)| *o = pack_nibbles(q(p[0]), q(p[1])))
                    }
                }
            },
        );
        Ok(Self { bits, rows, cols, data, scales })
    }

    /// Check that stored sizes agree (for matrices read from files).
    pub fn validate(&self) -> Result<()> {
        if self.bits == Bits::Int4 && !self.cols.is_multiple_of(2) {
            return Err(Error::Shape(format!("INT4 matrix with an odd column count {}", self.cols)));
        }
        let want = self.rows * self.bits.row_bytes(self.cols);
        if self.data.len() != want || self.scales.len() != self.rows {
            return Err(Error::Format(format!(
                "a [{}, {}] {}-bit matrix needs {want} bytes and {} scales, found {} and {}",
                self.rows,
                self.cols,
                self.bits.bits(),
                self.rows,
                self.data.len(),
                self.scales.len()
            )));
        }
        Ok(())
    }

    /// The quantized integers of row `r`, unpacked.
    pub fn row_q(&self, r: usize) -> Vec<i8> {
        let rb = self.bits.row_bytes(self.cols);
        let row = &self.data[r * rb..(r + 1) * rb];
        match self.bits {
            Bits::Int8 => row.to_vec(),
            Bits::Int4 => row
                .iter()
                .flat_map(|&b| {
                    let (hi, lo) = unpack_nibbles(b);
                    [hi, lo]
                })
                .collect(),
        }
    }

    /// Rows r0..r1 dequantized to f32, in parallel (the prefill path's weight tiles).
    pub fn dequantize_rows(&self, r0: usize, r1: usize) -> Vec<f32> {
        let mut out = vec![0f32; (r1 - r0) * self.cols];
        let rb = self.bits.row_bytes(self.cols);
        out.par_chunks_mut(self.cols.max(1)).enumerate().for_each(|(i, o)| {
            let r = r0 + i;
            let s = self.scales[r].to_f32();
            let row = &self.data[r * rb..(r + 1) * rb];
            match self.bits {
                Bits::Int8 => o.iter_mut().zip(row).for_each(|(o, &q)| *o = q as f32 * s),
                Bits::Int4 => o.chunks_exact_mut(2).zip(row).for_each(|(o, &b)| {
                    let (hi, lo) = unpack_nibbles(b);
                    (o[0], o[1]) = (hi as f32 * s, lo as f32 * s);
                }),
            }
        });
        out
    }

    /// The f32 matrix the quantized one stands for (the reference).
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows)
            .flat_map(|r| {
                let s = self.scales[r].to_f32();
                self.row_q(r).into_iter().map(move |q| q as f32 * s)
            })
            .collect()
    }

    /// y = W x for x [cols], y [rows]: the decode kernel.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.check_vec(x, y)?;
        let rb = self.bits.row_bytes(self.cols);
        let bits = self.bits;
        let dot = match bits {
            Bits::Int8 => kernels().i8,
            Bits::Int4 => kernels().i4,
        };
        let one = |(r, y): (usize, &mut f32)| *y = dot(&self.data[r * rb..(r + 1) * rb], x) * self.scales[r].to_f32();
        // Below ~1 MB of weights a thread hand-off costs more than the rows.
        if self.data.len() < PAR_MIN_BYTES {
            y.iter_mut().enumerate().for_each(one);
        } else {
            y.par_iter_mut().enumerate().with_min_len(64).for_each(one);
        }
        Ok(())
    }

    /// `matvec` by dequantizing first.
    pub fn matvec_ref(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.check_vec(x, y)?;
        let w = self.dequantize();
        for (r, y) in y.iter_mut().enumerate() {
            *y = w[r * self.cols..(r + 1) * self.cols].iter().zip(x).map(|(w, x)| w * x).sum();
        }
        Ok(())
    }

    fn check_vec(&self, x: &[f32], y: &[f32]) -> Result<()> {
        if x.len() != self.cols || y.len() != self.rows {
            return Err(Error::Shape(format!(
                "[{}, {}] matrix times {} values into {}",
                self.rows,
                self.cols,
                x.len(),
                y.len()
            )));
        }
        Ok(())
    }
}

/// Smallest matrix (bytes) whose matvec is split across threads.
const PAR_MIN_BYTES: usize = 1 << 20;

/// Independent lanes so the loops vectorize (int -> float conversion and FMA per lane).
const LANES: usize = 8;

/// The dot products, chosen once at run time: the same loops compiled for AVX2 + FMA when the CPU
/// has them (the build itself targets baseline x86-64), else the portable build.
struct Kernels {
    name: &'static str,
    i8: fn(&[i8], &[f32]) -> f32,
    i4: fn(&[i8], &[f32]) -> f32,
}

fn kernels() -> &'static Kernels {
    static K: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Kernels { name: "avx2+fma", i8: avx2::dot_i8, i4: avx2::dot_i4 };
        }
        Kernels { name: "portable", i8: dot_i8_portable, i4: dot_i4_portable }
    })
}

/// Which dot-product build `matvec` uses ("avx2+fma" or "portable").
pub fn kernel_name() -> &'static str {
    kernels().name
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_i8_impl(q: &[i8], x: &[f32]) -> f32 {
        super::dot_i8_body(q, x)
    }

    /// 16 bytes (32 weights) per iteration: sign-extend to i16, split the nibbles with 16-bit
    /// arithmetic shifts, interleave them back into column order, widen to f32 and FMA with x. (The
    /// compiler does not vectorize the portable loop: AVX2 has no 8-bit shifts.)
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_i4_impl(p: &[i8], x: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let blocks = p.len() / 16;
        let (mut a0, mut a1, mut a2, mut a3) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        for i in 0..blocks {
            // SAFETY: bytes 16i..16i+16 of p and floats 32i..32i+32 of x are in bounds
            // (x.len() == 2 p.len(), checked by the caller).
            let bytes = _mm_loadu_si128(p.as_ptr().add(16 * i) as *const __m128i);
            let v = _mm256_cvtepi8_epi16(bytes); // lane j = byte j
            let hi = _mm256_srai_epi16::<4>(v); // column 2j
            let lo = _mm256_srai_epi16::<12>(_mm256_slli_epi16::<12>(v)); // column 2j + 1
            let a = _mm256_unpacklo_epi16(hi, lo); // columns 0-7 | 16-23
            let b = _mm256_unpackhi_epi16(hi, lo); // columns 8-15 | 24-31
            let f = |h: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(h));
            let xp = x.as_ptr().add(32 * i);
            a0 = _mm256_fmadd_ps(f(_mm256_castsi256_si128(a)), _mm256_loadu_ps(xp), a0);
            a1 = _mm256_fmadd_ps(f(_mm256_castsi256_si128(b)), _mm256_loadu_ps(xp.add(8)), a1);
            a2 = _mm256_fmadd_ps(f(_mm256_extracti128_si256::<1>(a)), _mm256_loadu_ps(xp.add(16)), a2);
            a3 = _mm256_fmadd_ps(f(_mm256_extracti128_si256::<1>(b)), _mm256_loadu_ps(xp.add(24)), a3);
        }
        let sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        lanes.iter().sum::<f32>() + super::dot_i4_body(&p[16 * blocks..], &x[32 * blocks..])
    }

    pub fn dot_i8(q: &[i8], x: &[f32]) -> f32 {
        // SAFETY: chosen only after is_x86_feature_detected!("avx2") and ("fma").
        unsafe { dot_i8_impl(q, x) }
    }

    pub fn dot_i4(p: &[i8], x: &[f32]) -> f32 {
        assert!(x.len() >= 2 * p.len(), "dot_i4: {} packed bytes, {} activations", p.len(), x.len());
        // SAFETY: CPU features as above; lengths checked.
        unsafe { dot_i4_impl(p, x) }
    }
}

fn dot_i8_portable(q: &[i8], x: &[f32]) -> f32 {
    dot_i8_body(q, x)
}

fn dot_i4_portable(p: &[i8], x: &[f32]) -> f32 {
    dot_i4_body(p, x)
}

#[inline(always)]
fn dot_i8_body(q: &[i8], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (qc, xc) = (q.chunks_exact(LANES), x.chunks_exact(LANES));
    let tail: f32 = qc.remainder().iter().zip(xc.remainder()).map(|(&q, &x)| q as f32 * x).sum();
    for (q, x) in qc.zip(xc) {
        for l in 0..LANES {
            acc[l] += q[l] as f32 * x[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn dot_i4_body(packed: &[i8], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (pc, xc) = (packed.chunks_exact(LANES / 2), x.chunks_exact(LANES));
    let tail: f32 = pc
        .remainder()
        .iter()
        .zip(xc.remainder().chunks_exact(2))
        .map(|(&b, x)| {
            let (hi, lo) = unpack_nibbles(b);
            hi as f32 * x[0] + lo as f32 * x[1]
        })
        .sum();
    for (p, x) in pc.zip(xc) {
        for j in 0..LANES / 2 {
            let (hi, lo) = unpack_nibbles(p[j]);
            acc[2 * j] += hi as f32 * x[2 * j];
            acc[2 * j + 1] += lo as f32 * x[2 * j + 1];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests;
