//! y = W x + beta y for one f32 activation row: every decode step's dense products and the tied
//! output head (at `base`, 100 MB of the 144 MB an INT4 model reads per token). Memory-bound: one
//! pass over W, rows split over rayon's threads (the same pool as the quantized kernels, so no
//! second set of threads wakes per call, as OpenBLAS's sgemv does), four rows at a time sharing
//! each load of x, and the rows four below prefetched while these are summed. The AVX2 build is
//! chosen at run time; `matvec_ref` is its plain twin.
//!
//! [`matvecs`] is the same for a few rows (a decode step of several sequences, batched): W is read
//! from memory once, four rows at a time kept in cache while every activation row is dotted with
//! them, by the very same per-row code. So each row's result is bit for bit what `matvec` gives it
//! alone, whatever else is in the batch: batched greedy decoding picks the tokens it would alone.

use rayon::prelude::*;

/// Rows per unit of parallel work.
const GROUP: usize = 64;
/// Below this many weights one thread does it all (a hand-off costs more).
const PAR_MIN: usize = 1 << 16;

/// `y[r] = Σ_k w[r * ldw + k] x[k] + beta y[r]` for r < y.len(), k < x.len().
pub fn matvec(w: &[f32], ldw: usize, x: &[f32], beta: f32, y: &mut [f32]) {
    let (n, k) = (y.len(), x.len());
    assert!(ldw >= k && (n == 0 || w.len() >= (n - 1) * ldw + k), "matvec: {n} rows of {k} (ld {ldw}) in {}", w.len());
    let dot = dot_rows();
    let group = |(g, y): (usize, &mut [f32])| dot(&w[g * GROUP * ldw..], ldw, x, beta, y);
    if n * k < PAR_MIN {
        y.chunks_mut(GROUP).enumerate().for_each(group);
    } else {
        y.par_chunks_mut(GROUP).enumerate().for_each(group);
    }
}

/// Most activation rows `matvecs` takes (the decode batch); above, a GEMM reuses W better.
pub const MAX_ROWS: usize = 16;

/// A row-major f32 matrix view: `rows` rows of `cols` values, each `ld` apart.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl Rows<'_> {
    fn fits(&self) -> bool {
        self.ld >= self.cols && (self.rows == 0 || self.data.len() >= (self.rows - 1) * self.ld + self.cols)
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.ld..i * self.ld + self.cols]
    }
}

/// `y[t, r] = Σ_k w[r, k] x[t, k] + beta y[t, r]` for y [x.rows, w.rows] (row-major): x · Wᵀ for a
/// few activation rows, each row computed exactly as `matvec` computes it alone.
pub fn matvecs(w: Rows, x: Rows, beta: f32, y: &mut [f32]) {
    let (m, n, k) = (x.rows, w.rows, x.cols);
    assert!(
        w.fits() && x.fits() && w.cols == k && y.len() == m * n,
        "matvecs: [{m}, {k}] x [{n}, {}]ᵀ into {} values",
        w.cols,
        y.len()
    );
    if m == 1 {
        return matvec(w.data, w.ld, x.row(0), beta, y);
    }
    // Per group of W's rows, the results token by token ([t][row]), then scattered into y. Four
    // rows at a time stay in cache while every token is dotted with them, two tokens per pass.
    let (dot, dot2) = (dot_rows(), dot_rows_2());
    let mut part = vec![0f32; m * n];
    let group = |(g, out): (usize, &mut [f32])| {
        let (r0, len) = (g * GROUP, out.len() / m);
        for q in (0..len).step_by(4) {
            let rows = 4.min(len - q);
            let wq = &w.data[(r0 + q) * w.ld..];
            for t in (0..m - m % 2).step_by(2) {
                let (a, b) = out[t * len..].split_at_mut(len);
                dot2(wq, w.ld, [x.row(t), x.row(t + 1)], [&mut a[q..q + rows], &mut b[q..q + rows]]);
            }
            if m % 2 == 1 {
                let t = m - 1;
                dot(wq, w.ld, x.row(t), 0.0, &mut out[t * len + q..t * len + q + rows]);
            }
        }
    };
    if n * k * m < PAR_MIN {
        part.chunks_mut(GROUP * m).enumerate().for_each(group);
    } else {
        part.par_chunks_mut(GROUP * m).enumerate().for_each(group);
    }
    for (g, out) in part.chunks(GROUP * m).enumerate() {
        let (r0, len) = (g * GROUP, out.len() / m);
        for t in 0..m {
            let ys = &mut y[t * n + r0..t * n + r0 + len];
            for (y, &d) in ys.iter_mut().zip(&out[t * len..(t + 1) * len]) {
                *y = d + if beta == 0.0 { 0.0 } else { beta * *y };
            }
        }
    }
}

/// The reference: one plain dot product per row.
pub fn matvec_ref(w: &[f32], ldw: usize, x: &[f32], beta: f32, y: &mut [f32]) {
    for (r, y) in y.iter_mut().enumerate() {
        let row = &w[r * ldw..r * ldw + x.len()];
        let d: f32 = row.iter().zip(x).map(|(w, x)| w * x).sum();
        *y = d + if beta == 0.0 { 0.0 } else { beta * *y };
    }
}

type DotRows = fn(&[f32], usize, &[f32], f32, &mut [f32]);
/// Two tokens at once over up to 4 rows (beta = 0), each result as `DotRows` gives it.
type DotRows2 = fn(&[f32], usize, [&[f32]; 2], [&mut [f32]; 2]);

fn dot_rows_2() -> DotRows2 {
    static K: std::sync::OnceLock<DotRows2> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return avx2::dot_rows_2;
        }
        |w, ld, x, [a, b]| {
            matvec_ref(w, ld, x[0], 0.0, a);
            matvec_ref(w, ld, x[1], 0.0, b);
        }
    })
}

fn dot_rows() -> DotRows {
    static K: std::sync::OnceLock<DotRows> = std::sync::OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return avx2::dot_rows;
        }
        matvec_ref
    })
}

/// Horizontal sum of the 8 floats of an AVX register (for the kernels here and in glm-quant).
///
/// # Safety
/// The CPU must have AVX (every caller runs under `target_feature(enable = "avx2")`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::hsum256 as hsum;
    use std::arch::x86_64::*;

    /// R rows from `w` (stride ld) dotted with x: 8 columns per step, the tail in scalar.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows<const R: usize>(w: *const f32, ld: usize, x: &[f32]) -> [f32; R] {
        let k = x.len();
        let xp = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); R];
        let mut c = 0;
        while c + 8 <= k {
            // SAFETY: c + 8 <= k, and every row has k values from its start (checked by `matvec`).
            let xv = _mm256_loadu_ps(xp.add(c));
            for (r, acc) in acc.iter_mut().enumerate() {
                let row = w.add(r * ld);
                if c % 16 == 0 {
                    // A hint for the group's next rows; it never faults.
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(R * ld + c) as *const i8);
                }
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(c)), xv, *acc);
            }
            c += 8;
        }
        let mut out = acc.map(|a| hsum(a));
        for (r, o) in out.iter_mut().enumerate() {
            for (j, x) in x.iter().enumerate().skip(c) {
                *o += *w.add(r * ld + j) * x;
            }
        }
        out
    }

    /// `rows` for two activation rows at once: each (row, token) sum runs in the same order as
    /// `rows` alone (same steps, same tail), so the results are bit for bit the same.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows2<const R: usize>(w: *const f32, ld: usize, x: [&[f32]; 2]) -> [[f32; R]; 2] {
        let k = x[0].len();
        let (x0, x1) = (x[0].as_ptr(), x[1].as_ptr());
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        let mut c = 0;
        while c + 8 <= k {
            // SAFETY: c + 8 <= k for both rows of x (same length, checked by the caller), and every
            // row of w has k values from its start.
            let (xa, xb) = (_mm256_loadu_ps(x0.add(c)), _mm256_loadu_ps(x1.add(c)));
            let [a0, a1] = &mut acc;
            for (r, (s0, s1)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
                let row = w.add(r * ld);
                if c % 16 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(R * ld + c) as *const i8);
                }
                let wv = _mm256_loadu_ps(row.add(c));
                *s0 = _mm256_fmadd_ps(wv, xa, *s0);
                *s1 = _mm256_fmadd_ps(wv, xb, *s1);
            }
            c += 8;
        }
        let mut out = acc.map(|a| a.map(|v| hsum(v)));
        for (t, o) in out.iter_mut().enumerate() {
            for (r, o) in o.iter_mut().enumerate() {
                for (j, xv) in x[t].iter().enumerate().skip(c) {
                    *o += *w.add(r * ld + j) * xv;
                }
            }
        }
        out
    }

    pub fn dot_rows_2(w: &[f32], ld: usize, x: [&[f32]; 2], out: [&mut [f32]; 2]) {
        let (n, k) = (out[0].len(), x[0].len());
        assert!(
            n <= 4 && out[1].len() == n && x[1].len() == k && ld >= k && (n == 0 || w.len() >= (n - 1) * ld + k),
            "matvec rows out of bounds"
        );
        let [a, b] = out;
        // SAFETY: chosen only after is_x86_feature_detected!("avx2") and ("fma"); bounds checked.
        unsafe {
            if n == 4 {
                let [ra, rb] = rows2::<4>(w.as_ptr(), ld, x);
                a.copy_from_slice(&ra.map(|d| d + 0.0));
                b.copy_from_slice(&rb.map(|d| d + 0.0));
            } else {
                for i in 0..n {
                    let [ra, rb] = rows2::<1>(w.as_ptr().add(i * ld), ld, x);
                    (a[i], b[i]) = (ra[0] + 0.0, rb[0] + 0.0);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_rows_impl(w: &[f32], ld: usize, x: &[f32], beta: f32, y: &mut [f32]) {
        let p = w.as_ptr();
        let store = |y: &mut f32, d: f32| *y = d + if beta == 0.0 { 0.0 } else { beta * *y };
        let full = y.len() / 4 * 4;
        for (g, ys) in y[..full].chunks_exact_mut(4).enumerate() {
            let d = rows::<4>(p.add(4 * g * ld), ld, x);
            ys.iter_mut().zip(d).for_each(|(y, d)| store(y, d));
        }
        for (i, y) in y.iter_mut().enumerate().skip(full) {
            store(y, rows::<1>(p.add(i * ld), ld, x)[0]);
        }
    }

    pub fn dot_rows(w: &[f32], ld: usize, x: &[f32], beta: f32, y: &mut [f32]) {
        let n = y.len();
        assert!(ld >= x.len() && (n == 0 || w.len() >= (n - 1) * ld + x.len()), "matvec rows out of bounds");
        // SAFETY: chosen only after is_x86_feature_detected!("avx2") and ("fma"); bounds checked.
        unsafe { dot_rows_impl(w, ld, x, beta, y) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matvecs_is_matvec_per_row_bit_for_bit() {
        let val = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 300.0;
        for (m, n, k, ld) in [(2, 1, 1, 1), (3, 7, 13, 13), (5, 130, 100, 104), (16, 2000, 768, 768), (4, 5, 3, 8)] {
            let w: Vec<f32> = (0..n * ld).map(val).collect();
            let x: Vec<f32> = (0..m * k).map(|i| val(i + 17)).collect();
            for beta in [0.0, 1.0] {
                let init: Vec<f32> = (0..m * n).map(|i| val(i + 3)).collect();
                let mut y = init.clone();
                let (wr, xr) = (Rows { data: &w, rows: n, cols: k, ld }, Rows { data: &x, rows: m, cols: k, ld: k });
                matvecs(wr, xr, beta, &mut y);
                for t in 0..m {
                    let mut one = init[t * n..(t + 1) * n].to_vec();
                    matvec(&w, ld, &x[t * k..(t + 1) * k], beta, &mut one);
                    assert_eq!(&y[t * n..(t + 1) * n], &one[..], "{m}x{n}x{k} beta {beta} row {t}");
                }
            }
        }
    }

    #[test]
    fn matvec_matches_its_reference() {
        let val = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 300.0;
        for (n, k, ld) in [(1, 1, 1), (7, 13, 13), (130, 100, 104), (2000, 768, 768), (5, 3, 8)] {
            let w: Vec<f32> = (0..n * ld).map(val).collect();
            let x: Vec<f32> = (0..k).map(|i| val(i + 17)).collect();
            for beta in [0.0, 1.0] {
                let init: Vec<f32> = (0..n).map(|i| val(i + 3)).collect();
                let (mut a, mut b) = (init.clone(), init);
                matvec(&w, ld, &x, beta, &mut a);
                matvec_ref(&w, ld, &x, beta, &mut b);
                for (r, (a, b)) in a.iter().zip(&b).enumerate() {
                    let mag: f32 = (0..k).map(|j| (w[r * ld + j] * x[j]).abs()).sum::<f32>() + b.abs();
                    assert!((a - b).abs() <= 1e-5 * mag.max(1.0), "{n}x{k} beta {beta} row {r}: {a} vs {b}");
                }
            }
        }
    }
}
