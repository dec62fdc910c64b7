//! Debian's OpenBLAS for the big CPU matrix products, loaded at run time when the system has it
//! (`apt-get install libopenblas0-pthread`), so nothing is needed to build and the program runs
//! without it. On the 2-core machines measured here its sgemm runs 1.5-2x candle's `gemm` crate
//! (see docs/benchmarks.md). `linear` is the dense layer's x · Wᵀ (+ b) and `matmul` attention's
//! batched products, both with backward; their reference twins are candle's matmul.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::kernels::on_cpu_f32;

type Sgemm =
    unsafe extern "C" fn(i32, i32, i32, i32, i32, i32, f32, *const f32, i32, *const f32, i32, f32, *mut f32, i32);

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

struct Blas {
    sgemm: Sgemm,
    name: &'static str,
    _lib: libloading::Library,
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

fn blas() -> Option<&'static Blas> {
    BLAS.get_or_init(|| {
        // GLM_BLAS=off: candle's gemm even where OpenBLAS is installed (to rerun a run's numerics).
        if std::env::var("GLM_BLAS").is_ok_and(|v| v == "off") {
            return None;
        }
        for name in ["libopenblas.so.0", "libopenblas.so"] {
            // SAFETY: loading a system BLAS runs its initializers, which are designed for dlopen;
            // the symbol has the standard CBLAS signature.
            unsafe {
                let Ok(lib) = libloading::Library::new(name) else {
                    continue;
                };
                let Ok(sgemm) = lib.get::<Sgemm>(b"cblas_sgemm\0") else {
                    continue;
                };
                let sgemm = *sgemm;
                return Some(Blas { sgemm, name, _lib: lib });
            }
        }
        None
    })
    .as_ref()
}

/// The BLAS library in use, if any.
pub fn backend() -> Option<&'static str> {
    blas().map(|b| b.name)
}

/// The CPU's model name (/proc/cpuinfo).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// What the dense matrix products of this process run on — the library (and OpenBLAS's kernel
/// choice), the compute threads and the CPU — which decides their rounding: a run resumed on
/// other ones continues with gradients that differ in the last digits.
pub fn describe() -> String {
    let lib = match backend() {
        Some(name) => {
            let core = std::env::var("OPENBLAS_CORETYPE").map_or(String::new(), |c| format!(" ({c})"));
            format!("{name}{core}")
        }
        None => "candle gemm".to_string(),
    };
    format!("matmul {lib}, {} threads, {}", rayon::current_num_threads(), cpu_name())
}

/// Tune OpenBLAS through its environment before it loads; call at program start, before any thread
/// exists (the `glm` binary does). Settings the user already made are kept.
/// - `OPENBLAS_CORETYPE`: OpenBLAS 0.3.21 does not recognise recent Xeons and falls back to a
///   generic kernel (35-45 GFLOP/s here); the CPU's features pick SkylakeX (AVX-512) or Haswell
///   (AVX2) kernels instead (177-265 GFLOP/s measured on the 2-core dev machine).
/// - `OPENBLAS_THREAD_TIMEOUT=4`: its workers stop spinning almost at once after a call, leaving
///   the cores to the rayon threads of the other kernels.
/// - `RAYON_NUM_THREADS` (rayon's own default, the available parallelism): without it candle reads
///   /proc/cpuinfo on every CPU matmul to count cores (4.5% of a batched decode step's time).
pub fn configure_env() {
    let set = |k: &str, v: &str| {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    };
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl");
        let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        if avx512 {
            set("OPENBLAS_CORETYPE", "SkylakeX");
        } else if avx2 {
            set("OPENBLAS_CORETYPE", "Haswell");
        }
    }
    set("OPENBLAS_THREAD_TIMEOUT", "4");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    set("RAYON_NUM_THREADS", &threads.to_string());
}

/// Products smaller than this many multiply-adds stay on candle (call overhead dominates).
const MIN_MACS: usize = 1 << 18;

/// A batch of row-major matrices inside a storage slice: item i, row r, column c is at
/// `offset + i * batch_stride + r * ld + c`. Covers contiguous tensors and row-strided views such
/// as the KV cache's `narrow` over its buffers, without a copy.
#[derive(Debug, Clone, Copy)]
struct MatBatch {
    offset: usize,
    batch: usize,
    batch_stride: usize,
    rows: usize,
    cols: usize,
    ld: usize,
}

impl MatBatch {
    fn of(l: &Layout) -> Option<Self> {
        let (dims, stride) = (l.dims(), l.stride());
        let r = dims.len();
        if r < 2 || (dims[r - 1] > 1 && stride[r - 1] != 1) {
            return None;
        }
        let (rows, cols) = (dims[r - 2], dims[r - 1]);
        let ld = if rows > 1 { stride[r - 2] } else { cols };
        if ld < cols {
            return None;
        }
        // Leading dims must collapse into one batch dim with one stride (size-1 dims are free).
        let lead: Vec<(usize, usize)> =
            dims[..r - 2].iter().zip(&stride[..r - 2]).filter(|(d, _)| **d > 1).map(|(d, s)| (*d, *s)).collect();
        let batch = lead.iter().map(|(d, _)| d).product::<usize>();
        let batch_stride = lead.last().map(|(_, s)| *s).unwrap_or(0);
        for w in lead.windows(2) {
            if w[0].1 != w[1].1 * w[1].0 {
                return None;
            }
        }
        Some(Self { offset: l.start_offset(), batch, batch_stride, rows, cols, ld })
    }

    /// One past the last storage index it touches.
    fn end(&self) -> usize {
        if self.batch == 0 || self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset + (self.batch - 1) * self.batch_stride + (self.rows - 1) * self.ld + self.cols
    }
}

fn f32_storage<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("{what}: expected f32"),
    }
}

/// Whether x [m, k] · op(W) goes through `matvec::matvecs`: a few rows times a transposed matrix
/// (decoding's x · Wᵀ, one row per sequence of the batch).
fn small_rows(m: usize, ta: bool, tb: bool) -> bool {
    m <= crate::matvec::MAX_ROWS && !ta && tb
}

/// C[i] = op(A[i]) · op(B[i]) + beta · C[i] for every item of the batch, C contiguous
/// [batch, m, n]. Returns (m, n). A few rows times a transposed matrix (decoding's x · Wᵀ) are
/// matrix-vector products: `matvec::matvecs`, since sgemm would repack all of W on every call (and
/// OpenBLAS's sgemv wakes its own threads beside rayon's); they need no BLAS.
#[allow(clippy::too_many_arguments)]
fn gemm(
    a: &[f32],
    va: MatBatch,
    b: &[f32],
    vb: MatBatch,
    ta: bool,
    tb: bool,
    beta: f32,
    c: &mut [f32],
) -> Result<(usize, usize)> {
    let (m, k) = if ta { (va.cols, va.rows) } else { (va.rows, va.cols) };
    let (k2, n) = if tb { (vb.cols, vb.rows) } else { (vb.rows, vb.cols) };
    if k != k2 || va.batch != vb.batch || va.end() > a.len() || vb.end() > b.len() || c.len() != va.batch * m * n {
        candle_core::bail!("blas gemm: {va:?} x {vb:?} (ta={ta}, tb={tb}) into {} values does not fit", c.len())
    }
    let t = |f: bool| if f { TRANS } else { NO_TRANS };
    for i in 0..va.batch {
        let (pa, pb) = (va.offset + i * va.batch_stride, vb.offset + i * vb.batch_stride);
        if small_rows(m, ta, tb) && n > 0 {
            // A few rows times Wᵀ (decode): our matvec on rayon's threads (see `matvec`).
            let w = crate::matvec::Rows { data: &b[pb..], rows: n, cols: k, ld: vb.ld };
            let x = crate::matvec::Rows { data: &a[pa..], rows: m, cols: k, ld: va.ld };
            crate::matvec::matvecs(w, x, beta, &mut c[i * m * n..(i + 1) * m * n]);
            continue;
        }
        let Some(blas) = blas() else { candle_core::bail!("blas gemm: no BLAS library loaded") };
        // SAFETY: item i of A and B lies inside their storage (checked with `end` above), and the
        // i-th m x n block of c is in bounds (c.len() checked).
        unsafe {
            let (a, b, c) = (a.as_ptr().add(pa), b.as_ptr().add(pb), c.as_mut_ptr().add(i * m * n));
            let (lda, ldb) = (va.ld as i32, vb.ld as i32);
            {
                (blas.sgemm)(
                    ROW_MAJOR,
                    t(ta),
                    t(tb),
                    m as i32,
                    n as i32,
                    k as i32,
                    1.0,
                    a,
                    lda,
                    b,
                    ldb,
                    beta,
                    c,
                    n as i32,
                );
            }
        }
    }
    Ok((m, n))
}

/// C = op(A) · op(B) over the leading (batch) dims; C is a fresh contiguous [.., m, n]. Rank 2
/// is a batch of one.
#[derive(Clone, Copy)]
struct Gemm {
    ta: bool,
    tb: bool,
}

impl CustomOp2 for Gemm {
    fn name(&self) -> &'static str {
        "glm-blas-gemm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (Some(va), Some(vb)) = (MatBatch::of(l1), MatBatch::of(l2)) else {
            candle_core::bail!("blas gemm: unsupported strides {:?} / {:?}", l1.stride(), l2.stride())
        };
        let m = if self.ta { va.cols } else { va.rows };
        let n = if self.tb { vb.rows } else { vb.cols };
        // With beta = 0 both sgemm (OpenBLAS zeroes C itself, never reading it) and the matvec
        // path (m = 1) set every element.
        let mut c = crate::kernels::out_buf(va.batch * m * n);
        let (a, b) = (f32_storage(s1, self.name())?, f32_storage(s2, self.name())?);
        gemm(a, va, b, vb, self.ta, self.tb, 0.0, &mut c)?;
        let mut dims = l1.dims().to_vec();
        let r = dims.len();
        (dims[r - 2], dims[r - 1]) = (m, n);
        Ok((CpuStorage::F32(c), Shape::from(dims)))
    }
}

/// x [M, K] · w [N, K]ᵀ + b [N]: C starts as the bias rows and the GEMM adds into it (beta = 1),
/// saving a pass and an allocation per layer.
struct LinearBiasT;

impl CustomOp3 for LinearBiasT {
    fn name(&self) -> &'static str {
        "glm-blas-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some(vx), Some(vw)) = (MatBatch::of(l1), MatBatch::of(l2)) else {
            candle_core::bail!("blas linear: unsupported strides {:?} / {:?}", l1.stride(), l2.stride())
        };
        let (m, n) = (vx.rows, vw.rows);
        let bias = match (s3, l3.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) if b - a == n => &v[a..b],
            _ => candle_core::bail!("blas linear: expected a contiguous f32 bias of {n}"),
        };
        let mut c = Vec::with_capacity(m * n);
        for _ in 0..m {
            c.extend_from_slice(bias);
        }
        let (x, w) = (f32_storage(s1, self.name())?, f32_storage(s2, self.name())?);
        gemm(x, vx, w, vw, false, true, 1.0, &mut c)?;
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = matmul_grads(x, w, g, true)?;
        Ok((Some(dx), Some(dw), Some(g.sum(0)?)))
    }
}

/// x [M, K] · w [N, K]ᵀ (+ b [N]), through BLAS for big f32 products on the CPU when a BLAS is
/// present, otherwise through candle (`linear_ref`).
///
/// Up to `matvec::MAX_ROWS` rows always take `matvec::matvecs` (no BLAS needed), whatever the
/// size: each row's result is then the same alone or among others, which batched decoding relies on.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let rank2 = x.rank() == 2 && w.rank() == 2;
    let f32_cpu = on_cpu_f32(&[x, w]) && b.is_none_or(|b| on_cpu_f32(&[b]));
    let few = rank2 && small_rows(x.dim(0)?, false, true);
    let big = rank2 && x.dim(0)? * w.dim(0)? * w.dim(1)? >= MIN_MACS && blas().is_some();
    if !(f32_cpu && (few || big)) {
        return linear_ref(x, w, b);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBiasT),
        None => x.apply_op2(&w, Matmul { tb: true }),
    }
}

pub fn linear_ref(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Gradients of C = A · op(B) given G = dC: for op(B) = Bᵀ, dA = G B and dB = Gᵀ A; for
/// op(B) = B, dA = G Bᵀ and dB = Aᵀ G.
fn matmul_grads(a: &Tensor, b: &Tensor, g: &Tensor, tb: bool) -> Result<(Tensor, Tensor)> {
    if blas().is_none() {
        // The forward ran BLAS-free (a few rows through `matvecs`): candle's products.
        let (da, db) = if tb { (g.matmul(b)?, g.t()?.matmul(a)?) } else { (g.matmul(&b.t()?)?, a.t()?.matmul(g)?) };
        return Ok((da.reshape(a.shape())?, db.reshape(b.shape())?));
    }
    let g = g.contiguous()?;
    let gemm = |x: &Tensor, y: &Tensor, ta, tb| x.apply_op2_no_bwd(y, &Gemm { ta, tb });
    let (da, db) = if tb {
        (gemm(&g, b, false, false)?, gemm(&g, a, true, false)?)
    } else {
        (gemm(&g, b, false, true)?, gemm(a, &g, true, false)?)
    };
    Ok((da.reshape(a.shape())?, db.reshape(b.shape())?))
}

/// C = A · op(B) (over batches), differentiable in both: the dense layer's x · Wᵀ and attention's
/// q · kᵀ and p · v.
struct Matmul {
    tb: bool,
}

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "glm-blas-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        Gemm { ta: false, tb: self.tb }.cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = matmul_grads(a, b, g, self.tb)?;
        Ok((Some(da), Some(db)))
    }
}

/// Products per batch item below this many multiply-adds stay on candle.
const MIN_BATCH_MACS: usize = 1 << 14;

/// A [.., M, K] · op(B) over matching leading dims, with op(B) = Bᵀ for B [.., N, K] when `tb`
/// and B [.., K, N] otherwise: attention's scores (q · kᵀ) and context (p · v). Through BLAS for
/// f32 on the CPU when present and the items are big enough, otherwise candle (`matmul_ref`).
pub fn matmul(a: &Tensor, b: &Tensor, tb: bool) -> Result<Tensor> {
    let r = a.rank();
    let fits = r >= 3 && b.rank() == r && a.dims()[..r - 2] == b.dims()[..r - 2];
    if !(fits && on_cpu_f32(&[a, b]) && blas().is_some()) {
        return matmul_ref(a, b, tb);
    }
    let (m, k) = (a.dim(r - 2)?, a.dim(r - 1)?);
    let n = if tb { b.dim(r - 2)? } else { b.dim(r - 1)? };
    if m < 2 || m * n * k < MIN_BATCH_MACS {
        return matmul_ref(a, b, tb);
    }
    let view = |t: &Tensor| -> Result<Tensor> {
        match MatBatch::of(t.layout()) {
            Some(_) => Ok(t.clone()),
            None => t.contiguous(),
        }
    };
    view(a)?.apply_op2(&view(b)?, Matmul { tb })
}

pub fn matmul_ref(a: &Tensor, b: &Tensor, tb: bool) -> Result<Tensor> {
    if tb {
        a.matmul(&b.t()?)
    } else {
        a.matmul(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_twins, max_rel};
    use candle_core::{Device, Var};

    fn no_blas() -> bool {
        let none = backend().is_none();
        if none {
            eprintln!("no OpenBLAS on this machine: the BLAS path is not used, nothing to compare");
        }
        none
    }

    fn var(shape: &[usize]) -> Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 1., shape, &Device::Cpu)?)
    }

    #[test]
    fn blas_linear_matches_candle_forward_and_backward() -> Result<()> {
        if no_blas() {
            return Ok(());
        }
        let (x, w, b) = (var(&[96, 80])?, var(&[72, 80])?, var(&[72])?);
        check_twins(&linear(&x, &w, None)?, &linear_ref(&x, &w, None)?, &[&x, &w], 1e-5, 1e-5)?;
        // With the bias folded into the GEMM.
        check_twins(&linear(&x, &w, Some(&b))?, &linear_ref(&x, &w, Some(&b))?, &[&x, &w, &b], 1e-5, 1e-5)?;
        // One row (decoding) goes through `matvec`, bias included.
        let (x1, w1, b1) = (var(&[1, 512])?, var(&[1024, 512])?, var(&[1024])?);
        assert!(max_rel(&linear(&x1, &w1, Some(&b1))?, &linear_ref(&x1, &w1, Some(&b1))?)? < 1e-5);
        assert!(max_rel(&linear(&x1, &w1, None)?, &linear_ref(&x1, &w1, None)?)? < 1e-5);
        Ok(())
    }

    #[test]
    fn blas_batched_matmul_matches_candle_forward_and_backward() -> Result<()> {
        if no_blas() {
            return Ok(());
        }
        // Scores q kᵀ and context p v, as attention has them: [B, N, T, D].
        let (q, k) = (var(&[2, 3, 40, 32])?, var(&[2, 3, 48, 32])?);
        check_twins(&matmul(&q, &k, true)?, &matmul_ref(&q, &k, true)?, &[&q, &k], 1e-5, 1e-5)?;
        let (p, v) = (var(&[2, 3, 40, 48])?, var(&[2, 3, 48, 32])?);
        check_twins(&matmul(&p, &v, false)?, &matmul_ref(&p, &v, false)?, &[&p, &v], 1e-5, 1e-5)?;
        // A row-strided view (the KV cache's narrow over its buffer) is read in place.
        let buf = Tensor::randn(0f32, 1., (2, 3, 64, 32), &Device::Cpu)?;
        let kv = buf.narrow(2, 0, 48)?;
        assert!(MatBatch::of(kv.layout()).is_some() && !kv.is_contiguous());
        assert!(max_rel(&matmul(&q, &kv, true)?, &matmul_ref(&q, &kv, true)?)? < 1e-5);
        assert!(max_rel(&matmul(&p, &kv, false)?, &matmul_ref(&p, &kv, false)?)? < 1e-5);
        Ok(())
    }
}
