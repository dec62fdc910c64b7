//! GLM-130B's weight-only quantization (spec section 5), exactly as its kernels lay it out:
//!
//! - per output row (dim 0), symmetric absmax: `scale = max|W_row| / (2^(b-1) - 1)` (127 or 7),
//!   stored as f16; `q = round(W / scale)` (round half to even, as `torch.round`), in int8;
//! - INT4 packs two values per byte, **the even column in the high nibble, the odd column in the low
//!   nibble**, each sign-extended on extraction, so an INT4 weight is `[rows, cols / 2]` int8;
//! - dequantization is `W = q * scale[row]`; activations keep 16 bits (W8A16 / W4A16).
//!
//! `QuantMatrix::matmul` (and `matvec`, its one-token case) is the decode kernel: one pass over the
//! packed weights for all tokens, rows split across threads, the weights multiplied as stored in
//! the integer unit against activations rounded once to 16-bit fixed point (`kernels`). Its `_ref`
//! twin dequantizes the whole matrix and multiplies in f32.

pub mod checkpoint;
pub mod kernels;
pub mod linear;

pub use checkpoint::{quantize_checkpoint, quantize_tensors, QuantCheckpoint, QuantReport};
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
                // (v / s) rounded half to even by adding and removing 1.5 * 2^23 (|v / s| <= 127.5
                // here): `round_ties_even` is a libm call on baseline x86-64.
                const MAGIC: f32 = 12_582_912.0;
                let q = |v: f32| if s > 0.0 { ((v / s + MAGIC) - MAGIC).clamp(-qmax, qmax) as i8 } else { 0 };
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

    /// y = W x for x [cols], y [rows]: the decode kernel (see `kernels`: x is rounded once to
    /// 16-bit fixed point per 128 columns, the weights are used as stored).
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.check_vec(x, y)?;
        self.matmul(x, y)
    }

    /// Y = X Wᵀ for X [tokens, cols] and Y [tokens, rows], row-major. Each group of output rows
    /// is read from memory once and multiplied with every token while it sits in cache, so a short
    /// prompt costs one pass over the weights, not one per token.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let tokens = x.len() / self.cols.max(1);
        if x.len() != tokens * self.cols || y.len() != tokens * self.rows {
            return Err(self.shape_error(x, y));
        }
        if tokens == 0 || self.rows == 0 {
            return Ok(());
        }
        let (rb, bits, cols) = (self.bits.row_bytes(self.cols), self.bits, self.cols);
        let k = kernels::kernels();
        let acts: Vec<kernels::Activations> =
            x.chunks_exact(cols.max(1)).map(|x| kernels::Activations::new(x, bits, k.layout)).collect();
        let dot = match bits {
            Bits::Int8 => k.i8,
            Bits::Int4 => k.i4,
        };
        let fast = acts[0].fast;
        let fast_bytes = bits.row_bytes(fast);
        // One group of output rows for every token: out[t * n + i] for its n rows.
        let group = |(g, out): (usize, &mut [f32])| {
            let r0 = g * ROW_GROUP;
            let n = out.len() / tokens;
            for (t, (a, out)) in acts.iter().zip(out.chunks_exact_mut(n)).enumerate() {
                dot(&self.data[r0 * rb..], rb, a, out);
                for (i, y) in out.iter_mut().enumerate() {
                    let r = r0 + i;
                    if fast < cols {
                        let row = &self.data[r * rb..(r + 1) * rb];
                        *y += kernels::dot_tail_f32(bits, &row[fast_bytes..], &x[t * cols + fast..(t + 1) * cols]);
                    }
                    *y *= self.scales[r].to_f32();
                }
            }
        };
        // Group g's block holds its rows for every token, so the blocks are consecutive chunks of
        // `tokens * ROW_GROUP` values (the last one shorter). For one token that is y itself.
        let mut grouped = vec![0f32; if tokens == 1 { 0 } else { tokens * self.rows }];
        let buf: &mut [f32] = if tokens == 1 { &mut *y } else { &mut grouped };
        if self.data.len() * tokens < PAR_MIN_BYTES {
            buf.chunks_mut(tokens * ROW_GROUP).enumerate().for_each(group);
        } else {
            buf.par_chunks_mut(tokens * ROW_GROUP).enumerate().for_each(group);
        }
        if tokens > 1 {
            for (g, block) in grouped.chunks(tokens * ROW_GROUP).enumerate() {
                let (r0, n) = (g * ROW_GROUP, block.len() / tokens);
                for (t, src) in block.chunks_exact(n).enumerate() {
                    y[t * self.rows + r0..t * self.rows + r0 + n].copy_from_slice(src);
                }
            }
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

    fn shape_error(&self, x: &[f32], y: &[f32]) -> Error {
        Error::Shape(format!("[{}, {}] matrix times {} values into {}", self.rows, self.cols, x.len(), y.len()))
    }

    fn check_vec(&self, x: &[f32], y: &[f32]) -> Result<()> {
        if x.len() != self.cols || y.len() != self.rows {
            return Err(self.shape_error(x, y));
        }
        Ok(())
    }
}

/// Smallest matrix (bytes) whose matvec is split across threads.
const PAR_MIN_BYTES: usize = 1 << 18;
/// Rows per unit of work in `matmul` (a multiple of the kernel's 4).
const ROW_GROUP: usize = 64;

/// Which dot-product build `matmul` uses ("avx-vnni", "avx2" or "portable"; see `kernels`).
pub fn kernel_name() -> &'static str {
    kernels::kernels().name
}

#[cfg(test)]
mod tests;
