//! GLM-130B's weight-only quantization (spec section 5), exactly as its kernels lay it out:
//!
//! - per output row (dim 0), symmetric absmax: `scale = max|W_row| / (2^(b-1) - 1)` (127 or 7),
//!   stored as f16; `q = round(W / scale)` (round half to even, as `torch.round`), in int8;
//! - INT4 packs two values per byte, **the even column in the high nibble, the odd column in the low
//!   nibble**, each sign-extended on extraction, so an INT4 weight is `[rows, cols / 2]` int8;
//! - dequantization is `W = q * scale[row]`; activations keep 16 bits (W8A16 / W4A16).
//!
//! A matrix may also hold one scale per row **per input group** (`QuantMatrix::groups`): columns
//! `[g * cols / G, (g + 1) * cols / G)` of row r use `scale[r, g]`. That is what GLM-130B's
//! `convert_tp.py --quantization-bit-width` makes of the row-parallel layers (`attention.dense`,
//! `mlp.dense_4h_to_h`, split on the input dim, each rank's slice quantized on its own): merged,
//! the ranks' packed bytes are the ordinary packed rows and only the scales become `[rows, G]`.
//! `concat_cols` / `slice_cols` merge and cut such matrices exactly, without re-quantizing.
//!
//! `QuantMatrix::matmul` (and `matvec`, its one-token case) is the decode kernel: one pass over the
//! packed weights for all tokens, rows split across threads, the weights multiplied as stored in
//! the integer unit against activations rounded once to 16-bit fixed point (`kernels`), group by
//! group. Its `_ref` twin dequantizes the whole matrix and multiplies in f32.
//!
//! Under tensor parallelism (`tp`) each rank holds exact slices of these matrices (`shard`), and
//! `QuantCheckpoint::open_rank` reads only rank k's slices of a quantized file.

pub mod checkpoint;
pub mod kernels;
pub mod linear;
pub mod tp;

pub use checkpoint::{quantize_checkpoint, quantize_tensors, write_quant_checkpoint, QuantCheckpoint, QuantReport};
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

/// A quantized `[rows, cols]` weight: `data` holds `rows * bits.row_bytes(cols)` bytes, row by row;
/// `scales` holds `rows * groups` f16 values laid out `[rows, groups]`: columns
/// `[g * cols / groups, (g + 1) * cols / groups)` of row r are `q * scales[r * groups + g]`.
/// `groups` is 1 for GLM-130B's per-row scales; it divides `cols`, into even widths for INT4 (so a
/// packed byte never spans two groups).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    pub bits: Bits,
    pub rows: usize,
    pub cols: usize,
    pub groups: usize,
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

/// The columns of each of `groups` groups of `cols` columns, or why there is no such split.
pub(crate) fn group_width(bits: Bits, cols: usize, groups: usize) -> Result<usize> {
    if groups == 0 || !cols.is_multiple_of(groups) {
        return Err(Error::Shape(format!("{cols} columns do not split into {groups} equal scale groups")));
    }
    let width = cols / groups;
    if bits == Bits::Int4 && !width.is_multiple_of(2) {
        return Err(Error::Shape(if groups == 1 {
            format!("INT4 packs column pairs; {cols} columns is odd")
        } else {
            format!("INT4 packs column pairs; {cols} columns in {groups} scale groups are groups of an odd {width}")
        }));
    }
    Ok(width)
}

impl QuantMatrix {
    /// Quantize a row-major f32 matrix, one scale per row.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, bits: Bits) -> Result<Self> {
        Self::quantize_grouped(w, rows, cols, bits, 1)
    }

    /// Quantize a row-major f32 matrix with one scale per row per group of `cols / groups` columns:
    /// each group is quantized as `quantize` quantizes a row, against its own absmax.
    pub fn quantize_grouped(w: &[f32], rows: usize, cols: usize, bits: Bits, groups: usize) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(Error::Shape(format!("{} values for a [{rows}, {cols}] matrix", w.len())));
        }
        let width = group_width(bits, cols, groups)?;
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::Format(format!("weight [{}, {}] is {}: cannot quantize", i / cols, i % cols, w[i])));
        }
        let qmax = bits.qmax();
        let (rb, gb) = (bits.row_bytes(cols), bits.row_bytes(width));
        let mut data = vec![0i8; rows * rb];
        let mut scales = vec![f16::ZERO; rows * groups];
        data.par_chunks_mut(rb.max(1)).zip(scales.par_chunks_mut(groups)).zip(w.par_chunks(cols.max(1))).for_each(
            |((out, scales), row)| {
                for ((out, scale), part) in out.chunks_mut(gb.max(1)).zip(scales).zip(row.chunks(width.max(1))) {
                    let absmax = part.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // The scale is stored in f16 and q is computed against the stored value, as
                    // GLM-130B does with its fp16 weights.
                    *scale = f16::from_f32(absmax / qmax);
                    let s = scale.to_f32();
                    // (v / s) rounded half to even by adding and removing 1.5 * 2^23 (|v / s| <=
                    // 127.5 here): `round_ties_even` is a libm call on baseline x86-64.
                    const MAGIC: f32 = 12_582_912.0;
                    let q = |v: f32| if s > 0.0 { ((v / s + MAGIC) - MAGIC).clamp(-qmax, qmax) as i8 } else { 0 };
                    match bits {
                        Bits::Int8 => out.iter_mut().zip(part).for_each(|(o, &v)| *o = q(v)),
                        Bits::Int4 => out
                            .iter_mut()
                            .zip(part.chunks_exact(2))
                            .for_each(|(o, p)| *o = pack_nibbles(q(p[0]), q(p[1]))),
                    }
                }
            },
        );
        Ok(Self { bits, rows, cols, groups, data, scales })
    }

    /// A matrix from its stored parts (packed bytes, `[rows, groups]` scales), checked.
    pub fn from_parts(
        bits: Bits,
        rows: usize,
        cols: usize,
        groups: usize,
        data: Vec<i8>,
        scales: Vec<f16>,
    ) -> Result<Self> {
        let m = Self { bits, rows, cols, groups, data, scales };
        m.validate()?;
        Ok(m)
    }

    /// Check that stored sizes agree (for matrices read from files or built by hand).
    pub fn validate(&self) -> Result<()> {
        group_width(self.bits, self.cols, self.groups)?;
        let want = self.rows * self.bits.row_bytes(self.cols);
        if self.data.len() != want || self.scales.len() != self.rows * self.groups {
            return Err(Error::Format(format!(
                "a [{}, {}] {}-bit matrix with {} scale group(s) per row needs {want} bytes and {} scales, \
                 found {} and {}",
                self.rows,
                self.cols,
                self.bits.bits(),
                self.groups,
                self.rows * self.groups,
                self.data.len(),
                self.scales.len()
            )));
        }
        Ok(())
    }

    /// Columns per scale group (`cols / groups`).
    pub fn group_cols(&self) -> usize {
        self.cols / self.groups.max(1)
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
        let (rb, groups, width) = (self.bits.row_bytes(self.cols), self.groups, self.group_cols().max(1));
        let gb = self.bits.row_bytes(width).max(1);
        out.par_chunks_mut(self.cols.max(1)).enumerate().for_each(|(i, o)| {
            let r = r0 + i;
            let row = &self.data[r * rb..(r + 1) * rb];
            let scales = &self.scales[r * groups..(r + 1) * groups];
            for ((o, row), s) in o.chunks_mut(width).zip(row.chunks(gb)).zip(scales) {
                let s = s.to_f32();
                match self.bits {
                    Bits::Int8 => o.iter_mut().zip(row).for_each(|(o, &q)| *o = q as f32 * s),
                    Bits::Int4 => o.chunks_exact_mut(2).zip(row).for_each(|(o, &b)| {
                        let (hi, lo) = unpack_nibbles(b);
                        (o[0], o[1]) = (hi as f32 * s, lo as f32 * s);
                    }),
                }
            }
        });
        out
    }

    /// The f32 matrix the quantized one stands for (the reference).
    pub fn dequantize(&self) -> Vec<f32> {
        let (groups, width) = (self.groups, self.group_cols().max(1));
        (0..self.rows)
            .flat_map(|r| {
                let scales = &self.scales[r * groups..(r + 1) * groups];
                self.row_q(r).into_iter().enumerate().map(move |(c, q)| q as f32 * scales[c / width].to_f32())
            })
            .collect()
    }

    /// y = W x for x [cols], y [rows]: the decode kernel (see `kernels`: x is rounded once to
    /// 16-bit fixed point per 128 columns of each scale group, the weights are used as stored).
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.check_vec(x, y)?;
        self.matmul(x, y)
    }

    /// Y = X Wᵀ for X [tokens, cols] and Y [tokens, rows], row-major. Each group of output rows
    /// is read from memory once and multiplied with every token while it sits in cache, so a short
    /// prompt costs one pass over the weights, not one per token.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.matmul_with(kernels::kernels(), x, y)
    }

    /// `matmul` on one given build of the dot kernels (one of `kernels::available()`).
    ///
    /// Scale group by scale group, each token's slice of x becomes its own fixed-point activations,
    /// and the kernel runs over that group's bytes of each row (the row stride unchanged); the
    /// columns past the kernel's last full chunk in the group are done in f32; the group's sum is
    /// scaled by its scale and added to the row's result.
    pub fn matmul_with(&self, k: &kernels::Kernels, x: &[f32], y: &mut [f32]) -> Result<()> {
        let tokens = x.len() / self.cols.max(1);
        if x.len() != tokens * self.cols || y.len() != tokens * self.rows {
            return Err(self.shape_error(x, y));
        }
        self.validate()?;
        if tokens == 0 || self.rows == 0 {
            return Ok(());
        }
        let (rb, bits, cols, groups) = (self.bits.row_bytes(self.cols), self.bits, self.cols, self.groups);
        let width = self.group_cols();
        let gb = bits.row_bytes(width);
        // Token t's group g is acts[t * groups + g].
        let acts: Vec<kernels::Activations> =
            x.chunks_exact(width.max(1)).map(|x| kernels::Activations::new(x, bits, k.layout)).collect();
        let dot = match bits {
            Bits::Int8 => k.i8,
            Bits::Int4 => k.i4,
        };
        let fast = acts[0].fast;
        let fast_bytes = bits.row_bytes(fast);
        // With several scale groups, a few rows at a time go through all their groups, so each row
        // is still read from start to end while it streams in (one pass of the kernel per group
        // down all 64 rows would jump back to each row once per group). One group: all rows at once.
        let stripe = if groups == 1 { ROW_GROUP } else { GROUPED_STRIPE };
        // One block of output rows for every token: out[t * n + i] for its n rows.
        let block = |(b, out): (usize, &mut [f32])| {
            let r0 = b * ROW_GROUP;
            let n = out.len() / tokens;
            let mut scratch = [0f32; ROW_GROUP];
            for s0 in (0..n).step_by(stripe) {
                let m = stripe.min(n - s0);
                for (t, (acts, out)) in acts.chunks_exact(groups).zip(out.chunks_exact_mut(n)).enumerate() {
                    let out = &mut out[s0..s0 + m];
                    for (g, a) in acts.iter().enumerate() {
                        // The first scale group writes the results, the others a scratch row added
                        // to them.
                        let part = if g == 0 { &mut *out } else { &mut scratch[..m] };
                        dot(&self.data[(r0 + s0) * rb + g * gb..], rb, a, part);
                        for (i, y) in part.iter_mut().enumerate() {
                            let r = r0 + s0 + i;
                            if fast < width {
                                let row = &self.data[r * rb + g * gb..r * rb + (g + 1) * gb];
                                let xg = &x[t * cols + g * width + fast..t * cols + (g + 1) * width];
                                *y += kernels::dot_tail_f32(bits, &row[fast_bytes..], xg);
                            }
                            *y *= self.scales[r * groups + g].to_f32();
                        }
                        if g > 0 {
                            out.iter_mut().zip(&scratch[..m]).for_each(|(y, p)| *y += p);
                        }
                    }
                }
            }
        };
        // Block b holds its rows for every token, so the blocks are consecutive chunks of
        // `tokens * ROW_GROUP` values (the last one shorter). For one token that is y itself.
        let mut blocked = vec![0f32; if tokens == 1 { 0 } else { tokens * self.rows }];
        let buf: &mut [f32] = if tokens == 1 { &mut *y } else { &mut blocked };
        if self.data.len() * tokens < PAR_MIN_BYTES {
            buf.chunks_mut(tokens * ROW_GROUP).enumerate().for_each(block);
        } else {
            buf.par_chunks_mut(tokens * ROW_GROUP).enumerate().for_each(block);
        }
        if tokens > 1 {
            for (b, chunk) in blocked.chunks(tokens * ROW_GROUP).enumerate() {
                let (r0, n) = (b * ROW_GROUP, chunk.len() / tokens);
                for (t, src) in chunk.chunks_exact(n).enumerate() {
                    y[t * self.rows + r0..t * self.rows + r0 + n].copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    /// `matvec` by dequantizing first.
    pub fn matvec_ref(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.check_vec(x, y)?;
        self.validate()?;
        let w = self.dequantize();
        for (r, y) in y.iter_mut().enumerate() {
            *y = w[r * self.cols..(r + 1) * self.cols].iter().zip(x).map(|(w, x)| w * x).sum();
        }
        Ok(())
    }

    /// Rows `r0..r1`, bytes and scales copied (a column-parallel rank's slice).
    pub fn slice_rows(&self, r0: usize, r1: usize) -> Result<Self> {
        self.validate()?;
        if r0 > r1 || r1 > self.rows {
            return Err(Error::Shape(format!("rows {r0}..{r1} of a matrix of {} rows", self.rows)));
        }
        let (rb, groups) = (self.bits.row_bytes(self.cols), self.groups);
        Ok(Self {
            rows: r1 - r0,
            data: self.data[r0 * rb..r1 * rb].to_vec(),
            scales: self.scales[r0 * groups..r1 * groups].to_vec(),
            ..*self
        })
    }

    /// The rows of `parts` one after the other (same bits, columns and scale groups): column-parallel
    /// ranks merged.
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Result<Self> {
        let first = parts.first().ok_or_else(|| Error::Shape("concat_rows of no matrices".into()))?;
        for (i, p) in parts.iter().enumerate() {
            p.validate().map_err(|e| Error::Shape(format!("concat_rows, part {i}: {e}")))?;
            if (p.bits, p.cols, p.groups) != (first.bits, first.cols, first.groups) {
                return Err(Error::Shape(format!(
                    "concat_rows: part {i} is {}-bit with {} columns in {} scale group(s), part 0 {}-bit with {} \
                     columns in {}",
                    p.bits.bits(),
                    p.cols,
                    p.groups,
                    first.bits.bits(),
                    first.cols,
                    first.groups
                )));
            }
        }
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
            scales: parts.iter().flat_map(|p| p.scales.iter().copied()).collect(),
            ..**first
        })
    }

    /// The columns of `parts` side by side (same bits and rows, equal scale-group widths; the groups
    /// add up): row-parallel ranks merged, each rank's scale groups becoming groups of the whole.
    pub fn concat_cols(parts: &[&QuantMatrix]) -> Result<Self> {
        let first = parts.first().ok_or_else(|| Error::Shape("concat_cols of no matrices".into()))?;
        for (i, p) in parts.iter().enumerate() {
            p.validate().map_err(|e| Error::Shape(format!("concat_cols, part {i}: {e}")))?;
            if (p.bits, p.rows, p.group_cols()) != (first.bits, first.rows, first.group_cols()) {
                return Err(Error::Shape(format!(
                    "concat_cols: part {i} is {}-bit [{}, {}] in scale groups of {} columns, part 0 {}-bit [{}, {}] \
                     in groups of {}",
                    p.bits.bits(),
                    p.rows,
                    p.cols,
                    p.group_cols(),
                    first.bits.bits(),
                    first.rows,
                    first.cols,
                    first.group_cols()
                )));
            }
        }
        let rows = first.rows;
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        let mut scales = Vec::with_capacity(parts.iter().map(|p| p.scales.len()).sum());
        for r in 0..rows {
            for p in parts {
                let rb = p.bits.row_bytes(p.cols);
                data.extend_from_slice(&p.data[r * rb..(r + 1) * rb]);
                scales.extend_from_slice(&p.scales[r * p.groups..(r + 1) * p.groups]);
            }
        }
        Ok(Self {
            bits: first.bits,
            rows,
            cols: parts.iter().map(|p| p.cols).sum(),
            groups: parts.iter().map(|p| p.groups).sum(),
            data,
            scales,
        })
    }

    /// Columns `c0..c1`, bytes and scales copied (a row-parallel rank's slice). The range must be a
    /// union of whole scale groups (the result keeps those groups) or lie inside one group (the
    /// result has that group's scales, `groups = 1`); for INT4 it must start and end on even
    /// columns.
    pub fn slice_cols(&self, c0: usize, c1: usize) -> Result<Self> {
        self.validate()?;
        if c0 >= c1 || c1 > self.cols {
            return Err(Error::Shape(format!("columns {c0}..{c1} of a matrix of {} columns", self.cols)));
        }
        let width = self.group_cols();
        let (g0, g1) = if c0.is_multiple_of(width) && c1.is_multiple_of(width) {
            (c0 / width, c1 / width)
        } else if c0 / width == (c1 - 1) / width {
            (c0 / width, c0 / width + 1)
        } else {
            return Err(Error::Shape(format!(
                "columns {c0}..{c1} neither cover whole scale groups nor lie inside one (groups of {width} columns)"
            )));
        };
        if self.bits == Bits::Int4 && !(c0.is_multiple_of(2) && c1.is_multiple_of(2)) {
            return Err(Error::Shape(format!("INT4 packs column pairs; columns {c0}..{c1} cut a pair")));
        }
        let (rb, groups) = (self.bits.row_bytes(self.cols), self.groups);
        let (b0, b1) = (self.bits.row_bytes(c0), self.bits.row_bytes(c1));
        let data = (0..self.rows).flat_map(|r| self.data[r * rb + b0..r * rb + b1].iter().copied()).collect();
        let scales =
            (0..self.rows).flat_map(|r| self.scales[r * groups + g0..r * groups + g1].iter().copied()).collect();
        Ok(Self { bits: self.bits, rows: self.rows, cols: c1 - c0, groups: g1 - g0, data, scales })
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
/// Rows taken through all their scale groups at a time in `matmul` (a multiple of the kernel's 4,
/// dividing `ROW_GROUP`).
const GROUPED_STRIPE: usize = 4;

/// Which dot-product build `matmul` uses ("avx-vnni", "avx2" or "portable"; see `kernels`).
pub fn kernel_name() -> &'static str {
    kernels::kernels().name
}

#[cfg(test)]
mod tests;
