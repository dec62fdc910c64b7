//! The 1F1B pipeline schedule (Megatron's `forward_backward_pipelining_without_interleaving`,
//! DeepSpeed's PipeDream-Flush, what GLM-130B trained with): the order in which stage `rank` of
//! `stages` runs the forwards and backwards of `m` micro-batches.
//!
//! ```text
//! warmup   = min(stages - rank - 1, m)       forwards only
//! steady   = m - warmup                      one forward, then one backward, repeated
//! cooldown = warmup                          backwards only
//! ```
//!
//! A stage holds the activations of a micro-batch from its forward to its backward: never more
//! than `warmup + 1` at once (checked as the schedule is built), against `m` for GPipe's
//! all-forwards-first order. The bubble, the fraction of a step a stage idles, is
//! (stages - 1) / (m + stages - 1) when forward and backward each take one time unit per stage
//! ([`simulate`] measures it on the schedule itself).

use candle_core::{DType, Device, Shape, Tensor};

use crate::{Communicator, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Run micro-batch `mb` forward (after receiving its activation from the previous stage).
    Forward(usize),
    /// Run micro-batch `mb` backward (after receiving its gradient from the next stage).
    Backward(usize),
}

/// Stage `rank`'s 1F1B order over `m` micro-batches.
pub fn one_f_one_b(stages: usize, rank: usize, m: usize) -> Result<Vec<Op>> {
    if stages == 0 || rank >= stages {
        return Err(Error::Layout(format!("pipeline stage {rank} of {stages} does not exist")));
    }
    let warmup = (stages - rank - 1).min(m);
    let mut ops = Vec::with_capacity(2 * m);
    ops.extend((0..warmup).map(Op::Forward));
    for i in 0..m - warmup {
        ops.push(Op::Forward(warmup + i));
        ops.push(Op::Backward(i));
    }
    ops.extend((m - warmup..m).map(Op::Backward));
    let held = max_held(&ops);
    if held > warmup + 1 {
        return Err(Error::Layout(format!(
            "1F1B schedule of stage {rank}/{stages}: {held} activations held, the bound is {}",
            warmup + 1
        )));
    }
    Ok(ops)
}

/// The most micro-batches whose activations a stage holds at once (forward done, backward not).
pub fn max_held(ops: &[Op]) -> usize {
    let (mut live, mut most) = (0usize, 0usize);
    for op in ops {
        match op {
            Op::Forward(_) => live += 1,
            Op::Backward(_) => live = live.saturating_sub(1),
        }
        most = most.max(live);
    }
    most
}

/// What running every stage's schedule gives, each op taking `forward` or `backward` time units
/// and starting once its input has arrived (a forward needs the previous stage's forward of the
/// micro-batch, a backward the next stage's backward of it and its own forward).
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// When the last op of any stage ends.
    pub makespan: f64,
    /// Per stage: time idle within the makespan / makespan.
    pub bubble: Vec<f64>,
}

/// Runs the schedules `ops[s]` of all stages against each other; an error if they deadlock (a
/// stage waits for an op that never runs).
pub fn simulate(ops: &[Vec<Op>], forward: f64, backward: f64) -> Result<Simulation> {
    let p = ops.len();
    let m = ops.first().map_or(0, |o| o.len() / 2);
    let mut f_end = vec![vec![f64::NAN; m]; p];
    let mut b_end = vec![vec![f64::NAN; m]; p];
    let (mut next, mut clock, mut busy) = (vec![0usize; p], vec![0f64; p], vec![0f64; p]);
    loop {
        let mut progressed = false;
        for s in 0..p {
            while let Some(&op) = ops[s].get(next[s]) {
                let ready = match op {
                    Op::Forward(_) if s == 0 => Some(0.0),
                    Op::Forward(mb) => Some(f_end[s - 1][mb]).filter(|t| !t.is_nan()),
                    Op::Backward(mb) if s + 1 == p => Some(f_end[s][mb]).filter(|t| !t.is_nan()),
                    Op::Backward(mb) => Some(b_end[s + 1][mb]).filter(|t| !t.is_nan()),
                };
                let Some(ready) = ready else { break };
                let (cost, slot) = match op {
                    Op::Forward(mb) => (forward, &mut f_end[s][mb]),
                    Op::Backward(mb) => (backward, &mut b_end[s][mb]),
                };
                clock[s] = clock[s].max(ready) + cost;
                busy[s] += cost;
                *slot = clock[s];
                next[s] += 1;
                progressed = true;
            }
        }
        if next.iter().zip(ops).all(|(n, o)| *n == o.len()) {
            break;
        }
        if !progressed {
            let stuck: Vec<String> =
                (0..p).filter_map(|s| ops[s].get(next[s]).map(|op| format!("stage {s} at {op:?}"))).collect();
            return Err(Error::Layout(format!("the pipeline schedules deadlock: {}", stuck.join(", "))));
        }
    }
    let makespan = clock.iter().cloned().fold(0.0, f64::max);
    Ok(Simulation { makespan, bubble: busy.iter().map(|b| 1.0 - b / makespan.max(1e-12)).collect() })
}

/// What a stage computes: `forward(mb, input)` returns the activation to send on (`input` is the
/// previous stage's, None on the first stage); `backward(mb, grad)` returns the gradient to send
/// back (`grad` is the next stage's, None on the last stage).
pub trait Stage {
    fn forward(&mut self, mb: usize, input: Option<Tensor>) -> Result<Tensor>;
    fn backward(&mut self, mb: usize, grad: Option<Tensor>) -> Result<Option<Tensor>>;
}

/// What one stage's run of a schedule took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExecStats {
    /// Seconds from the first op to the last.
    pub wall: f64,
    /// Seconds inside the stage's forwards and backwards (the rest is waiting and copying).
    pub busy: f64,
    /// Bytes this stage sent (activations forward, gradients back).
    pub sent: usize,
    /// Micro-batches whose activations were held at once, at most.
    pub max_held: usize,
}

impl ExecStats {
    /// The measured bubble: the fraction of the step this stage was not computing.
    pub fn bubble(&self) -> f64 {
        if self.wall > 0.0 {
            (1.0 - self.busy / self.wall).max(0.0)
        } else {
            0.0
        }
    }
}

/// Runs `ops` (this stage's 1F1B order) on the pipeline group `pp` (rank = stage): activations
/// go forward and gradients back as messages of `shape(mb)` (known to both sides: every rank
/// reads the same micro-batches). Sends are buffered and each receive waits for one message, so
/// the 1F1B order cannot deadlock.
pub fn execute(
    pp: &dyn Communicator,
    ops: &[Op],
    shape: &dyn Fn(usize) -> Shape,
    dtype: DType,
    dev: &Device,
    stage: &mut dyn Stage,
) -> Result<ExecStats> {
    let (s, p) = (pp.rank(), pp.size());
    let start = std::time::Instant::now();
    let mut stats = ExecStats { max_held: max_held(ops), ..Default::default() };
    let send = |t: &Tensor, to: usize, stats: &mut ExecStats| -> Result<()> {
        stats.sent += t.elem_count() * t.dtype().size_in_bytes();
        pp.send(t, to)
    };
    for &op in ops {
        match op {
            Op::Forward(mb) => {
                let input = if s > 0 { Some(pp.recv(&shape(mb), dtype, dev, s - 1)?) } else { None };
                let t0 = std::time::Instant::now();
                let out = stage.forward(mb, input)?;
                stats.busy += t0.elapsed().as_secs_f64();
                if s + 1 < p {
                    send(&out, s + 1, &mut stats)?;
                }
            }
            Op::Backward(mb) => {
                let grad = if s + 1 < p { Some(pp.recv(&shape(mb), dtype, dev, s + 1)?) } else { None };
                let t0 = std::time::Instant::now();
                let g = stage.backward(mb, grad)?;
                stats.busy += t0.elapsed().as_secs_f64();
                match g {
                    Some(g) if s > 0 => send(&g, s - 1, &mut stats)?,
                    None if s > 0 => {
                        return Err(Error::Stage(format!(
                            "pipeline stage {s}: micro-batch {mb} gave no input gradient"
                        )))
                    }
                    _ => {}
                }
            }
        }
    }
    stats.wall = start.elapsed().as_secs_f64();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: usize, m: usize) -> Vec<Vec<Op>> {
        (0..p).map(|s| one_f_one_b(p, s, m)).collect::<Result<_>>().unwrap_or_default()
    }

    /// A pipeline of y = 2x + stage per stage over the in-process backend: every stage's
    /// forwards and backwards see the values the schedule's order implies, at every size.
    #[test]
    fn stages_exchange_activations_and_gradients() -> Result<()> {
        use std::time::Duration;
        struct Affine {
            stage: f64,
            seen: Vec<(char, usize, f64)>,
        }
        impl Stage for Affine {
            fn forward(&mut self, mb: usize, input: Option<Tensor>) -> Result<Tensor> {
                let x = match input {
                    Some(t) => t,
                    None => Tensor::full(mb as f32, (2, 3), &Device::Cpu)?,
                };
                self.seen.push(('f', mb, x.flatten_all()?.to_vec1::<f32>()?[0] as f64));
                Ok(((x * 2.0)? + self.stage)?)
            }
            fn backward(&mut self, mb: usize, grad: Option<Tensor>) -> Result<Option<Tensor>> {
                let g = match grad {
                    Some(g) => g,
                    None => Tensor::ones((2, 3), DType::F32, &Device::Cpu)?,
                };
                self.seen.push(('b', mb, g.flatten_all()?.to_vec1::<f32>()?[0] as f64));
                Ok(Some((g * 2.0)?))
            }
        }
        for (p, m) in [(2, 4), (4, 8), (3, 2)] {
            let seen = crate::LocalComm::run(p, Duration::from_secs(20), |pp| {
                let ops = one_f_one_b(p, pp.rank(), m)?;
                let mut st = Affine { stage: pp.rank() as f64, seen: Vec::new() };
                execute(pp.as_ref(), &ops, &|_| Shape::from((2, 3)), DType::F32, &Device::Cpu, &mut st)?;
                Ok(st.seen)
            })?;
            for (s, seen) in seen.iter().enumerate() {
                for &(kind, mb, v) in seen {
                    // Stage s's input is mb through stages 0..s; its gradient is 2^(p-1-s).
                    let want = if kind == 'f' {
                        (0..s).fold(mb as f64, |x, k| 2.0 * x + k as f64)
                    } else {
                        2f64.powi((p - 1 - s) as i32)
                    };
                    assert_eq!(v, want, "p {p} m {m} stage {s} {kind}{mb}");
                }
                assert_eq!(seen.len(), 2 * m);
            }
        }
        Ok(())
    }

    #[test]
    fn warmup_steady_and_cooldown_counts() -> Result<()> {
        for p in [1, 2, 4, 8] {
            for m in [1, 2, 4, 8, 16] {
                for s in 0..p {
                    let ops = one_f_one_b(p, s, m)?;
                    let warmup = (p - s - 1).min(m);
                    // Every micro-batch once forward and once backward, forward first.
                    for mb in 0..m {
                        let f = ops.iter().position(|o| *o == Op::Forward(mb));
                        let b = ops.iter().position(|o| *o == Op::Backward(mb));
                        assert!(matches!((f, b), (Some(f), Some(b)) if f < b), "p {p} m {m} stage {s} mb {mb}");
                    }
                    assert!(ops[..warmup].iter().all(|o| matches!(o, Op::Forward(_))));
                    assert!(ops[2 * m - warmup..].iter().all(|o| matches!(o, Op::Backward(_))));
                    // Steady state alternates, starting with a forward.
                    for (i, o) in ops[warmup..2 * m - warmup].iter().enumerate() {
                        assert_eq!(matches!(o, Op::Forward(_)), i % 2 == 0, "p {p} m {m} stage {s}");
                    }
                    assert_eq!(max_held(&ops), (warmup + 1).min(m));
                }
            }
        }
        assert!(one_f_one_b(2, 2, 4).is_err());
        Ok(())
    }

    #[test]
    fn the_stages_never_deadlock_and_the_bubble_is_the_formula() -> Result<()> {
        for p in [2, 4, 8] {
            for m in [4, 8, 16] {
                let sim = simulate(&all(p, m), 1.0, 1.0)?;
                let want = (p - 1) as f64 / (m + p - 1) as f64;
                // Every stage is busy 2m units of a 2(m + p - 1) makespan.
                assert!((sim.makespan - 2.0 * (m + p - 1) as f64).abs() < 1e-9, "p {p} m {m}: {sim:?}");
                for b in &sim.bubble {
                    assert!((b - want).abs() < 1e-9, "p {p} m {m}: bubble {b} vs {want}");
                }
            }
        }
        // Backward twice the forward's cost (the usual ratio): still (p-1)/(m+p-1).
        let sim = simulate(&all(4, 8), 1.0, 2.0)?;
        assert!((sim.bubble[0] - 3.0 / 11.0).abs() < 1e-9, "{sim:?}");
        // A stage whose backward comes before the next stage's is a deadlock, reported.
        let mut bad = all(2, 2);
        bad[0] = vec![Op::Forward(0), Op::Backward(0), Op::Forward(1), Op::Backward(1)];
        bad[1] = vec![Op::Forward(1), Op::Backward(1), Op::Forward(0), Op::Backward(0)];
        assert!(simulate(&bad, 1.0, 1.0).is_err());
        Ok(())
    }
}
