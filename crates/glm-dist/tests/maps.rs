//! The tensor-parallel maps and layers, forward and backward, on in-process worlds of 1, 2 and 4
//! ranks: Megatron's four conjugate maps against their definitions, the vocab-parallel cross
//! entropy against the dense loss, the factory's split checks, and column/row-parallel linears
//! against the dense linear they shard.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarBuilder;
use glm_dist::maps::{copy_to, copy_to_ref, gather_from, reduce_from, reduce_from_ref, scatter_to};
use glm_dist::split::{merge, shard, Split};
use glm_dist::tp::vocab_parallel_cross_entropy;
use glm_dist::{Error, Group, LocalComm, TpFactory};
use glm_model::{Config, Glm};
use glm_nn::{DenseFactory, LinearFactory, LinearSpec, ParallelRole, IGNORE_INDEX};

const WORLDS: [usize; 3] = [1, 2, 4];
const TIMEOUT: Duration = Duration::from_secs(30);

// ---- helpers ---------------------------------------------------------------------------------------

/// Runs `f` on every rank of a `world`-rank LocalComm with the world registered as a group; the
/// ranks' results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(Group) -> glm_dist::Result<T> + Send + Sync) -> Result<Vec<T>> {
    Ok(LocalComm::run(world, TIMEOUT, |comm| f(Group::register(comm)))?)
}

fn randn(shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1f32, shape, &Device::Cpu)?)
}

fn grad_of(grads: &GradStore, v: &Var, what: &str) -> glm_dist::Result<Tensor> {
    grads.get(v.as_tensor()).cloned().ok_or_else(|| Error::Comm(format!("no gradient for {what}")))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure!(a.dims() == b.dims(), "shape {:?} vs {:?}", a.dims(), b.dims());
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.max_all()?.to_scalar::<f64>()?)
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let scale = b.to_dtype(DType::F64)?.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(max_abs_diff(a, b)? / scale.max(1e-30))
}

fn same(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    let d = max_abs_diff(a, b)?;
    ensure!(d == 0.0, "{what}: differs by {d:e}, expected exactly equal");
    Ok(())
}

fn close(a: &Tensor, b: &Tensor, tol: f64, what: &str) -> Result<()> {
    let e = rel_err(a, b)?;
    ensure!(e <= tol, "{what}: relative error {e:.2e} > {tol:e}");
    Ok(())
}

/// Rank `rank`'s chunk of the last dim of `t`, of `world` equal chunks.
fn chunk_last(t: &Tensor, world: usize, rank: usize) -> Result<Tensor> {
    let len = t.dim(D::Minus1)?;
    Ok(t.narrow(t.rank() - 1, rank * len / world, len / world)?.contiguous()?)
}

/// The ranks' tensors summed in rank order (the order LocalComm reduces in).
fn sum_in_order(ts: &[Tensor]) -> Result<Tensor> {
    let mut acc = ts[0].clone();
    for t in &ts[1..] {
        acc = (acc + t)?;
    }
    Ok(acc)
}

// ---- 1-5: the four maps ----------------------------------------------------------------------------

/// `copy_to`: identity forward; backward all-reduces the ranks' (different) upstream gradients.
#[test]
fn copy_to_is_identity_forward_and_all_reduce_backward() -> Result<()> {
    for world in WORLDS {
        let x = randn(&[2, 3, 5])?;
        let rs = (0..world).map(|_| randn(&[2, 3, 5])).collect::<Result<Vec<_>>>()?;
        let out = on_ranks(world, |g| {
            let xv = Var::from_tensor(&x)?;
            let y = copy_to(xv.as_tensor(), g)?;
            let grads = (&y * &rs[g.rank()])?.sum_all()?.backward()?;
            Ok((y.detach(), grad_of(&grads, &xv, "x")?))
        })?;
        let want = sum_in_order(&rs)?;
        for (r, (y, gx)) in out.iter().enumerate() {
            same(y, &x, &format!("copy_to forward, world {world} rank {r}"))?;
            close(gx, &want, 1e-6, &format!("copy_to backward, world {world} rank {r}"))?;
            same(gx, &out[0].1, &format!("copy_to backward, world {world}: rank {r} vs rank 0"))?;
        }
        if world == 1 {
            let xv = Var::from_tensor(&x)?;
            let y = copy_to_ref(xv.as_tensor())?;
            let g = (&y * &rs[0])?.sum_all()?.backward()?;
            same(&out[0].0, &y, "copy_to vs copy_to_ref forward, world 1")?;
            same(&out[0].1, &grad_of(&g, &xv, "x")?, "copy_to vs copy_to_ref backward, world 1")?;
        }
    }
    Ok(())
}

/// `reduce_from`: all-reduce forward; backward is the identity.
#[test]
fn reduce_from_is_all_reduce_forward_and_identity_backward() -> Result<()> {
    for world in WORLDS {
        let xs = (0..world).map(|_| randn(&[2, 3, 5])).collect::<Result<Vec<_>>>()?;
        let r = randn(&[2, 3, 5])?;
        let out = on_ranks(world, |g| {
            let xv = Var::from_tensor(&xs[g.rank()])?;
            let y = reduce_from(xv.as_tensor(), g)?;
            let grads = (&y * &r)?.sum_all()?.backward()?;
            Ok((y.detach(), grad_of(&grads, &xv, "x")?))
        })?;
        let want = sum_in_order(&xs)?;
        for (k, (y, gx)) in out.iter().enumerate() {
            close(y, &want, 1e-6, &format!("reduce_from forward, world {world} rank {k}"))?;
            same(y, &out[0].0, &format!("reduce_from forward, world {world}: rank {k} vs rank 0"))?;
            same(gx, &r, &format!("reduce_from backward, world {world} rank {k}"))?;
        }
        if world == 1 {
            let xv = Var::from_tensor(&xs[0])?;
            let y = reduce_from_ref(xv.as_tensor())?;
            let g = (&y * &r)?.sum_all()?.backward()?;
            same(&out[0].0, &y, "reduce_from vs reduce_from_ref forward, world 1")?;
            same(&out[0].1, &grad_of(&g, &xv, "x")?, "reduce_from vs reduce_from_ref backward, world 1")?;
        }
    }
    Ok(())
}

/// `gather_from`: the ranks' tensors concatenated along the last dim; backward keeps this rank's
/// chunk of the upstream gradient. Also from a non-contiguous (transposed) input.
#[test]
fn gather_from_concatenates_forward_and_chunks_backward() -> Result<()> {
    for world in WORLDS {
        for transposed in [false, true] {
            let xs = (0..world).map(|_| randn(&[2, 3, 4])).collect::<Result<Vec<_>>>()?;
            let r = randn(&[2, 3, 4 * world])?;
            let out = on_ranks(world, |g| {
                let x = &xs[g.rank()];
                // Transposed: the variable is (2, 4, 3) and the map reads a (2, 3, 4) view of it.
                let base = Var::from_tensor(&if transposed { x.transpose(1, 2)?.contiguous()? } else { x.clone() })?;
                let input = if transposed { base.as_tensor().transpose(1, 2)? } else { base.as_tensor().clone() };
                let y = gather_from(&input, g)?;
                let grads = (&y * &r)?.sum_all()?.backward()?;
                let gx = grad_of(&grads, &base, "x")?;
                Ok((y.detach(), if transposed { gx.transpose(1, 2)?.contiguous()? } else { gx }))
            })?;
            let want = Tensor::cat(&xs, 2)?;
            for (k, (y, gx)) in out.iter().enumerate() {
                let what = format!("gather_from world {world} rank {k} (transposed input: {transposed})");
                same(y, &want, &format!("{what} forward"))?;
                same(gx, &chunk_last(&r, world, k)?, &format!("{what} backward"))?;
            }
        }
    }
    Ok(())
}

/// `scatter_to`: this rank's chunk of the last dim; backward all-gathers the chunks' gradients.
#[test]
fn scatter_to_chunks_forward_and_all_gathers_backward() -> Result<()> {
    for world in WORLDS {
        let x = randn(&[2, 3, 4 * world])?;
        let rs = (0..world).map(|_| randn(&[2, 3, 4])).collect::<Result<Vec<_>>>()?;
        let out = on_ranks(world, |g| {
            let xv = Var::from_tensor(&x)?;
            let y = scatter_to(xv.as_tensor(), g)?;
            let grads = (&y * &rs[g.rank()])?.sum_all()?.backward()?;
            Ok((y.detach(), grad_of(&grads, &xv, "x")?))
        })?;
        let want_grad = Tensor::cat(&rs, 2)?;
        for (k, (y, gx)) in out.iter().enumerate() {
            same(y, &chunk_last(&x, world, k)?, &format!("scatter_to forward, world {world} rank {k}"))?;
            same(gx, &want_grad, &format!("scatter_to backward, world {world} rank {k}"))?;
        }
        // A last dim that does not divide among the ranks is an error, not a silent truncation.
        if world > 1 {
            let odd = randn(&[2, 4 * world + 1])?;
            let errs = on_ranks(world, |g| Ok(scatter_to(&odd, g).err().map(|e| e.to_string())))?;
            for e in errs {
                let e = e.with_context(|| format!("scatter_to of an indivisible last dim at world {world}"))?;
                ensure!(e.contains("cannot split the last dim"), "unexpected error: {e}");
            }
        }
    }
    Ok(())
}

/// The pairs are conjugate: gather_from ∘ scatter_to and scatter_to ∘ gather_from are the identity,
/// and gradients come back unchanged through both.
#[test]
fn gather_and_scatter_are_conjugate() -> Result<()> {
    for world in WORLDS {
        // Replicated x through scatter then gather: x back, gradient r (the same on all ranks).
        let x = randn(&[3, 4 * world])?;
        let r = randn(&[3, 4 * world])?;
        // Rank-local x_k through gather then scatter: x_k back, gradient r_k.
        let xs = (0..world).map(|_| randn(&[3, 4])).collect::<Result<Vec<_>>>()?;
        let rs = (0..world).map(|_| randn(&[3, 4])).collect::<Result<Vec<_>>>()?;
        let out = on_ranks(world, |g| {
            let xv = Var::from_tensor(&x)?;
            let y = gather_from(&scatter_to(xv.as_tensor(), g)?, g)?;
            let gx = grad_of(&(&y * &r)?.sum_all()?.backward()?, &xv, "x")?;
            let lv = Var::from_tensor(&xs[g.rank()])?;
            let z = scatter_to(&gather_from(lv.as_tensor(), g)?, g)?;
            let gl = grad_of(&(&z * &rs[g.rank()])?.sum_all()?.backward()?, &lv, "x_k")?;
            Ok((y.detach(), gx, z.detach(), gl))
        })?;
        for (k, (y, gx, z, gl)) in out.iter().enumerate() {
            let what = format!("world {world} rank {k}");
            same(y, &x, &format!("gather_from(scatter_to(x)) forward, {what}"))?;
            same(gx, &r, &format!("gather_from(scatter_to(x)) backward, {what}"))?;
            same(z, &xs[k], &format!("scatter_to(gather_from(x)) forward, {what}"))?;
            same(gl, &rs[k], &format!("scatter_to(gather_from(x)) backward, {what}"))?;
        }
    }
    Ok(())
}

// ---- 6: vocab-parallel cross entropy ---------------------------------------------------------------

const VOCAB: usize = 16;

/// Loss and gradient of the full logits (B, T, VOCAB), or the error message.
type CeOut = std::result::Result<(f64, Option<Tensor>), String>;

fn dense_ce(logits: &Tensor, targets: &Tensor) -> Result<CeOut> {
    let lv = Var::from_tensor(logits)?;
    let loss = match glm_nn::cross_entropy(lv.as_tensor(), targets) {
        Ok(l) => l,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let grads = loss.backward()?;
    Ok(Ok((loss.to_scalar::<f32>()? as f64, grads.get(lv.as_tensor()).cloned())))
}

/// Every rank's loss and gradient of its column block (the gradient `None` where the loss has none).
fn tp_ce(logits: &Tensor, targets: &Tensor, world: usize) -> Result<Vec<CeOut>> {
    on_ranks(world, |g| {
        let per = VOCAB / world;
        let start = g.rank() * per;
        let lv = Var::from_tensor(&logits.narrow(2, start, per)?.contiguous()?)?;
        let loss = match vocab_parallel_cross_entropy(lv.as_tensor(), targets, (start, start + per, VOCAB), g) {
            Ok(l) => l,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let grads = loss.backward()?;
        Ok(Ok((loss.to_scalar::<f32>()? as f64, grads.get(lv.as_tensor()).cloned())))
    })
}

/// The vocab-parallel loss equals the dense one on the full logits, and the ranks' gradients,
/// merged, equal the dense gradient: ignored rows, targets on every rank's block edges, large
/// logits (the max shift), all rows ignored (loss 0), and out-of-vocabulary targets (an error).
#[test]
fn vocab_parallel_cross_entropy_matches_dense() -> Result<()> {
    let dev = Device::Cpu;
    // Rows 0..10 as (2, 5): the block edges of every world (0, 3, 4, 7, 8, 11, 12, 15) and two ignored.
    let edges = [0i64, 3, 4, 7, IGNORE_INDEX, 8, 11, 12, 15, IGNORE_INDEX];
    let targets = Tensor::new(&edges, &dev)?.reshape((2, 5))?;
    let all_ignored = Tensor::full(IGNORE_INDEX, (2, 5), &dev)?;
    let base = randn(&[2, 5, VOCAB])?;
    for world in WORLDS {
        // x100 puts logits past 88, where exp overflows f32 without the max shift.
        // The gradient's f32 rounding grows with the logits' magnitude (an ulp of 300 is 3e-5): x100
        // is held to 5e-5 (seen: up to 1.5e-5), x1 and x30 to 1e-5 (seen: 6e-8 and 2e-6).
        for (scale, tol_grad) in [(1.0, 1e-5), (30.0, 1e-5), (100.0, 5e-5)] {
            let logits = (&base * scale)?;
            let what = format!("world {world}, logits x{scale}");
            let (want_loss, want_grad) = dense_ce(&logits, &targets)?.map_err(anyhow::Error::msg)?;
            let want_grad = want_grad.context("dense loss: no gradient")?;
            ensure!(want_loss.is_finite() && want_loss > 0.0, "{what}: dense loss {want_loss}");
            let ranks = tp_ce(&logits, &targets, world)?;
            let mut parts = Vec::new();
            for (k, r) in ranks.into_iter().enumerate() {
                let (loss, grad) = r.map_err(|e| anyhow::anyhow!("{what} rank {k}: {e}"))?;
                let err = (loss - want_loss).abs() / want_loss.abs();
                ensure!(err <= 1e-6, "{what} rank {k}: loss {loss} vs dense {want_loss} (rel {err:.2e})");
                parts.push(grad.with_context(|| format!("{what} rank {k}: no gradient"))?);
            }
            let merged = Tensor::cat(&parts, 2)?;
            close(&merged, &want_grad, tol_grad, &format!("{what}: merged logits gradient"))?;
            // Ignored rows get no gradient at all.
            for (i, &t) in edges.iter().enumerate() {
                if t == IGNORE_INDEX {
                    let row = merged.reshape((10, VOCAB))?.get(i)?;
                    let m = row.abs()?.max(0)?.to_scalar::<f32>()?;
                    ensure!(m == 0.0, "{what}: ignored row {i} has gradient {m}");
                }
            }
        }

        // Every row ignored: loss 0 on every rank, and no gradient (or a zero one).
        let ranks = tp_ce(&base, &all_ignored, world)?;
        for (k, r) in ranks.into_iter().enumerate() {
            let (loss, grad) = r.map_err(|e| anyhow::anyhow!("all ignored, world {world} rank {k}: {e}"))?;
            ensure!(loss == 0.0, "all ignored, world {world} rank {k}: loss {loss}");
            if let Some(g) = grad {
                let m = g.abs()?.max_all()?.to_scalar::<f32>()?;
                ensure!(m == 0.0, "all ignored, world {world} rank {k}: gradient {m}");
            }
        }
        let dense = dense_ce(&base, &all_ignored)?.map_err(anyhow::Error::msg)?;
        ensure!(dense.0 == 0.0, "the dense loss of all-ignored rows is {}", dense.0);

        // A target past the vocabulary (or negative, other than IGNORE_INDEX) is an error naming it.
        for bad in [VOCAB as i64, VOCAB as i64 + 5, -1] {
            let mut t = edges;
            t[6] = bad;
            let t = Tensor::new(&t, &dev)?.reshape((2, 5))?;
            for (k, r) in tp_ce(&base, &t, world)?.into_iter().enumerate() {
                let e = match r {
                    Err(e) => e,
                    Ok((loss, _)) => anyhow::bail!("target {bad}, world {world} rank {k}: accepted, loss {loss}"),
                };
                ensure!(
                    e.contains(&format!("target {bad}")) && e.contains("vocabulary") && e.contains(&VOCAB.to_string()),
                    "target {bad}, world {world} rank {k}: the error does not name it: {e}"
                );
            }
            ensure!(dense_ce(&base, &t)?.is_err(), "the dense loss accepts target {bad}");
        }
    }
    Ok(())
}

/// Masked vocabulary columns (logit -inf, e.g. a padded vocabulary) that are never a target: the
/// dense loss stays finite, and so must the vocab-parallel one. Each rank's first column is masked:
/// the column a rank gathers (and multiplies by 0) for the rows whose target it does not hold,
/// ignored rows included.
#[test]
fn vocab_parallel_cross_entropy_with_masked_columns() -> Result<()> {
    let dev = Device::Cpu;
    let masked = [0usize, 4, 8, 12]; // the first column of every rank's block at worlds 1, 2 and 4
    let mut v = randn(&[2, 5, VOCAB])?.flatten_all()?.to_vec1::<f32>()?;
    for row in v.chunks_mut(VOCAB) {
        for &c in &masked {
            row[c] = f32::NEG_INFINITY;
        }
    }
    let logits = Tensor::from_vec(v, (2, 5, VOCAB), &dev)?;
    let targets = Tensor::new(&[1i64, 3, 5, 7, IGNORE_INDEX, 9, 11, 13, 15, 2], &dev)?.reshape((2, 5))?;
    let (want_loss, want_grad) = dense_ce(&logits, &targets)?.map_err(anyhow::Error::msg)?;
    let want_grad = want_grad.context("dense loss: no gradient")?;
    ensure!(want_loss.is_finite(), "the dense loss is {want_loss}");
    for world in WORLDS {
        let mut parts = Vec::new();
        for (k, r) in tp_ce(&logits, &targets, world)?.into_iter().enumerate() {
            let (loss, grad) = r.map_err(|e| anyhow::anyhow!("world {world} rank {k}: {e}"))?;
            let err = (loss - want_loss).abs() / want_loss.abs();
            ensure!(err <= 1e-6, "masked columns, world {world} rank {k}: loss {loss} vs dense {want_loss}");
            parts.push(grad.with_context(|| format!("world {world} rank {k}: no gradient"))?);
        }
        close(&Tensor::cat(&parts, 2)?, &want_grad, 1e-5, &format!("masked columns, world {world}: gradient"))?;
    }
    Ok(())
}

// ---- 7: invalid splits ------------------------------------------------------------------------------

/// A config that splits 1, 2 and 4 ways: 4 heads, hidden 32, FFN 64, vocabulary 64, one layer.
fn small_cfg() -> Config {
    Config::glm_arch("tp-test", 1, 32, 4, 64, 64)
}

/// Builds the model under a `world`-way TpFactory on every rank (zero weights): Ok, or each rank's
/// error message.
fn build_tp(cfg: &Config, world: usize) -> Result<Vec<std::result::Result<(), String>>> {
    on_ranks(world, |g| {
        let built = TpFactory::new(cfg, g, Box::new(DenseFactory)).map_err(|e| e.to_string()).and_then(|f| {
            Glm::new(cfg, VarBuilder::zeros(DType::F32, &Device::Cpu), &f).map(|_| ()).map_err(|e| e.to_string())
        });
        Ok(built)
    })
}

fn expect_error(results: Vec<std::result::Result<(), String>>, keys: &[&str], what: &str) -> Result<()> {
    for (k, r) in results.into_iter().enumerate() {
        let Err(e) = r else { anyhow::bail!("{what}: rank {k} built without error") };
        for key in keys {
            ensure!(e.contains(key), "{what}: rank {k}'s error does not mention {key:?}: {e}");
        }
    }
    Ok(())
}

/// An invalid tensor-parallel split is refused with an error naming the dimension: through
/// `TpFactory::new` + `Glm::new` (heads, vocabulary, FFN) and through `LinearFactory::make` /
/// `vocab` (a row linear's input, a column linear's output, a vocabulary table's rows).
#[test]
fn invalid_splits_name_the_dimension() -> Result<()> {
    // The valid config builds at every degree.
    for world in WORLDS {
        for (k, r) in build_tp(&small_cfg(), world)?.into_iter().enumerate() {
            r.map_err(|e| anyhow::anyhow!("world {world} rank {k}: a valid split was refused: {e}"))?;
        }
    }
    // 4 heads, 3 ways.
    expect_error(build_tp(&small_cfg(), 3)?, &["3 ways", "4 heads"], "4 heads at tp 3")?;
    // A vocabulary of 66, 4 ways (heads, hidden and FFN divide).
    let cfg = Config { vocab_size: 66, ..small_cfg() };
    expect_error(build_tp(&cfg, 4)?, &["4 ways", "vocabulary", "66"], "vocabulary 66 at tp 4")?;
    // FFN 66, 4 ways.
    let cfg = Config { ffn_hidden_size: 66, ..small_cfg() };
    expect_error(build_tp(&cfg, 4)?, &["4 ways", "FFN", "66"], "FFN 66 at tp 4")?;

    // The factory itself, past a valid config: each linear checks its own split.
    let msgs = on_ranks(4, |g| {
        let f = TpFactory::new(&small_cfg(), g, Box::new(DenseFactory))?;
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let spec = |name, in_dim, out_dim, role| LinearSpec { name, in_dim, out_dim, bias: true, role };
        let err = |r: candle_core::Result<Box<dyn glm_nn::Linear>>| r.err().map(|e| e.to_string());
        Ok([
            err(f.make(&vb, spec("row_in", 6, 8, ParallelRole::Row))),
            err(f.make(&vb, spec("col_out", 8, 6, ParallelRole::Column { chunks: 1 }))),
            // 12 divides by 4 but its two GeGLU halves of 6 do not.
            err(f.make(&vb, spec("glu_out", 8, 12, ParallelRole::Column { chunks: 2 }))),
            f.vocab(&vb, "emb", 10, 8).err().map(|e| e.to_string()),
            // Replicated linears are not split: any shape goes.
            err(f.make(&vb, spec("rep", 7, 5, ParallelRole::Replicated))),
        ])
    })?;
    for (k, [row, col, glu, vocab, rep]) in msgs.into_iter().enumerate() {
        let check = |e: Option<String>, keys: &[&str], what: &str| -> Result<()> {
            let e = e.with_context(|| format!("rank {k}: {what} was accepted"))?;
            for key in keys {
                ensure!(e.contains(key), "rank {k}: {what}: the error does not mention {key:?}: {e}");
            }
            Ok(())
        };
        check(row, &["row_in", "6 input features", "4 ways"], "a row linear of 6 inputs at tp 4")?;
        check(col, &["col_out", "6 output features", "4 ways"], "a column linear of 6 outputs at tp 4")?;
        check(glu, &["glu_out", "output features", "4 ways"], "a GeGLU column linear of 2 x 6 outputs at tp 4")?;
        check(vocab, &["emb", "vocabulary of 10", "4 ways"], "a vocabulary of 10 at tp 4")?;
        ensure!(rep.is_none(), "rank {k}: a replicated linear was refused: {rep:?}");
    }
    Ok(())
}

// ---- 8: column/row-parallel linears against the dense linear ---------------------------------------

/// `t`'s last dim cut like the rows of a weight of split `split` (a column-parallel output).
fn shard_last(t: &Tensor, split: Split, world: usize, rank: usize) -> Result<Tensor> {
    let last = t.rank() - 1;
    Ok(shard(&t.transpose(0, last)?.contiguous()?, split, world, rank)?.transpose(0, last)?.contiguous()?)
}

/// Dense reference: output, and the gradients of the input, weight and bias of sum(y * r).
struct DenseRun {
    y: Tensor,
    gx: Tensor,
    gw: Tensor,
    gb: Tensor,
}

fn dense_run(x: &Tensor, w: &Tensor, b: &Tensor, r: &Tensor, spec: LinearSpec) -> Result<DenseRun> {
    let (xv, wv, bv) = (Var::from_tensor(x)?, Var::from_tensor(w)?, Var::from_tensor(b)?);
    let map = HashMap::from([
        (format!("{}.weight", spec.name), wv.as_tensor().clone()),
        (format!("{}.bias", spec.name), bv.as_tensor().clone()),
    ]);
    let lin = DenseFactory.make(&VarBuilder::from_tensors(map, DType::F32, &Device::Cpu), spec)?;
    let y = lin.forward(xv.as_tensor())?;
    let grads = (&y * r)?.sum_all()?.backward()?;
    Ok(DenseRun {
        y: y.detach(),
        gx: grad_of(&grads, &xv, "x")?,
        gw: grad_of(&grads, &wv, "w")?,
        gb: grad_of(&grads, &bv, "b")?,
    })
}

/// Column { chunks: 1 } (QKV: contiguous rows), Column { chunks: 2 } (GeGLU's halves cut per rank)
/// and Row (contiguous input columns, the bias added once after the reduction), built by
/// `TpFactory` over `DenseFactory` from `split::shard`ed weights, equal the dense linear: the
/// output, and the gradients of the input, the weight (shards merged) and the bias.
#[test]
fn parallel_linears_match_dense() -> Result<()> {
    let cfg = small_cfg();
    let (b_, t_, inp) = (2, 3, 8);
    for world in WORLDS {
        // Column linears: x replicated, each rank's output columns (and upstream gradient) its shard.
        for (chunks, split, out) in [(1, Split::Rows, 12), (2, Split::GluRows, 16)] {
            let spec =
                LinearSpec { name: "p", in_dim: inp, out_dim: out, bias: true, role: ParallelRole::Column { chunks } };
            let (x, w, b, r) = (randn(&[b_, t_, inp])?, randn(&[out, inp])?, randn(&[out])?, randn(&[b_, t_, out])?);
            let want = dense_run(&x, &w, &b, &r, spec)?;
            let ranks = on_ranks(world, |g| {
                let k = g.rank();
                let wv = Var::from_tensor(&shard(&w, split, world, k)?)?;
                let bv = Var::from_tensor(&shard(&b, split, world, k)?)?;
                let map = HashMap::from([
                    ("p.weight".to_string(), wv.as_tensor().clone()),
                    ("p.bias".to_string(), bv.as_tensor().clone()),
                ]);
                let f = TpFactory::new(&cfg, g, Box::new(DenseFactory))?;
                let lin = f.make(&VarBuilder::from_tensors(map, DType::F32, &Device::Cpu), spec)?;
                let xv = Var::from_tensor(&x)?;
                let y = lin.forward(xv.as_tensor())?;
                let rk = shard_last(&r, split, world, k).map_err(|e| Error::Comm(e.to_string()))?;
                let grads = (&y * &rk)?.sum_all()?.backward()?;
                Ok((y.detach(), grad_of(&grads, &xv, "x")?, grad_of(&grads, &wv, "w")?, grad_of(&grads, &bv, "b")?))
            })?;
            let what = format!("Column {{ chunks: {chunks} }}, world {world}");
            for (k, (y, gx, _, _)) in ranks.iter().enumerate() {
                close(y, &shard_last(&want.y, split, world, k)?, 1e-5, &format!("{what} rank {k}: output"))?;
                close(gx, &want.gx, 1e-5, &format!("{what} rank {k}: input gradient"))?;
                same(gx, &ranks[0].1, &format!("{what}: input gradient of rank {k} vs rank 0"))?;
            }
            let gw = merge(&ranks.iter().map(|p| p.2.clone()).collect::<Vec<_>>(), split)?;
            let gb = merge(&ranks.iter().map(|p| p.3.clone()).collect::<Vec<_>>(), split)?;
            close(&gw, &want.gw, 1e-5, &format!("{what}: weight gradient (merged)"))?;
            close(&gb, &want.gb, 1e-5, &format!("{what}: bias gradient (merged)"))?;
        }

        // Row linear: each rank reads its chunk of x's features; the output (and the upstream
        // gradient) is whole on every rank.
        let (inp, out) = (12, 6);
        let spec = LinearSpec { name: "p", in_dim: inp, out_dim: out, bias: true, role: ParallelRole::Row };
        let (x, w, b, r) = (randn(&[b_, t_, inp])?, randn(&[out, inp])?, randn(&[out])?, randn(&[b_, t_, out])?);
        // A bias well away from 0, so that adding it on every rank before the reduction would show.
        let b = (b + 3.0)?;
        let want = dense_run(&x, &w, &b, &r, spec)?;
        let ranks = on_ranks(world, |g| {
            let k = g.rank();
            let wv = Var::from_tensor(&shard(&w, Split::Cols, world, k)?)?;
            let bv = Var::from_tensor(&b)?;
            let map = HashMap::from([
                ("p.weight".to_string(), wv.as_tensor().clone()),
                ("p.bias".to_string(), bv.as_tensor().clone()),
            ]);
            let f = TpFactory::new(&cfg, g, Box::new(DenseFactory))?;
            let lin = f.make(&VarBuilder::from_tensors(map, DType::F32, &Device::Cpu), spec)?;
            let xk = chunk_last(&x, world, k).map_err(|e| Error::Comm(e.to_string()))?;
            let xv = Var::from_tensor(&xk)?;
            let y = lin.forward(xv.as_tensor())?;
            let grads = (&y * &r)?.sum_all()?.backward()?;
            Ok((y.detach(), grad_of(&grads, &xv, "x")?, grad_of(&grads, &wv, "w")?, grad_of(&grads, &bv, "b")?))
        })?;
        let what = format!("Row, world {world}");
        for (k, (y, _, _, gb)) in ranks.iter().enumerate() {
            close(y, &want.y, 1e-5, &format!("{what} rank {k}: output"))?;
            same(y, &ranks[0].0, &format!("{what}: output of rank {k} vs rank 0"))?;
            close(gb, &want.gb, 1e-5, &format!("{what} rank {k}: bias gradient"))?;
        }
        let gx = Tensor::cat(&ranks.iter().map(|p| p.1.clone()).collect::<Vec<_>>(), 2)?;
        let gw = merge(&ranks.iter().map(|p| p.2.clone()).collect::<Vec<_>>(), Split::Cols)?;
        close(&gx, &want.gx, 1e-5, &format!("{what}: input gradient (chunks joined)"))?;
        close(&gw, &want.gw, 1e-5, &format!("{what}: weight gradient (merged)"))?;
    }
    Ok(())
}
