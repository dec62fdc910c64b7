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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// One step of a stage's run: compute an op, or one batched exchange with its neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Compute(Op),
    /// Posted together, waited for together: the send of a message (`Forward(mb)`: the activation
    /// of micro-batch mb, `Backward(mb)`: its gradient) to a stage, and the receive of one from a
    /// stage.
    Exchange {
        send: Option<(usize, Op)>,
        recv: Option<(usize, Op)>,
    },
}

/// Stage `rank`'s 1F1B order with its messages, paired as Megatron's `forward_backward_pipelining_
/// without_interleaving` pairs them: in the steady state each forward's send goes out with the
/// receive of a gradient (`send_forward_recv_backward`) and each backward's with the receive of
/// the next activation (`send_backward_recv_forward`), so a stage never waits on a send its
/// neighbour can only take after waiting on it. Deadlock-free even when a send completes only once
/// its receive is posted (MPI's rendezvous protocol for large messages; tested by [`rendezvous`]).
pub fn plan(stages: usize, rank: usize, m: usize) -> Result<Vec<Step>> {
    one_f_one_b(stages, rank, m)?; // checks the stage and the bound on held activations
    let (s, p) = (rank, stages);
    let warmup = (p - s - 1).min(m);
    let prev = |op: Op| (s > 0).then(|| (s - 1, op));
    let next = |op: Op| (s + 1 < p).then(|| (s + 1, op));
    let mut out = Vec::with_capacity(6 * m);
    let exchange = |out: &mut Vec<Step>, send: Option<(usize, Op)>, recv: Option<(usize, Op)>| {
        if send.is_some() || recv.is_some() {
            out.push(Step::Exchange { send, recv });
        }
    };
    for i in 0..warmup {
        exchange(&mut out, None, prev(Op::Forward(i)));
        out.push(Step::Compute(Op::Forward(i)));
        exchange(&mut out, next(Op::Forward(i)), None);
    }
    let steady = m - warmup;
    if steady > 0 {
        exchange(&mut out, None, prev(Op::Forward(warmup)));
    }
    for i in 0..steady {
        let f = warmup + i;
        out.push(Step::Compute(Op::Forward(f)));
        exchange(&mut out, next(Op::Forward(f)), next(Op::Backward(i)));
        out.push(Step::Compute(Op::Backward(i)));
        let then = if i + 1 < steady { prev(Op::Forward(f + 1)) } else { None };
        exchange(&mut out, prev(Op::Backward(i)), then);
    }
    for i in steady..m {
        exchange(&mut out, None, next(Op::Backward(i)));
        out.push(Step::Compute(Op::Backward(i)));
        exchange(&mut out, prev(Op::Backward(i)), None);
    }
    Ok(out)
}

/// Runs every stage's plan against the others where a send completes only while its receiver has
/// the matching receive posted (and a receive only while the sender has the send posted): the
/// strictest protocol an MPI library may use. An error names where the stages would deadlock.
pub fn rendezvous(plans: &[Vec<Step>]) -> Result<()> {
    let p = plans.len();
    let mut at = vec![0usize; p];
    // The parts of each stage's current exchange still outstanding: (send done, recv done).
    let mut done = vec![(false, false); p];
    let current = |at: &[usize], s: usize| plans[s].get(at[s]).copied();
    loop {
        let mut progressed = false;
        for s in 0..p {
            while let Some(Step::Compute(_)) = current(&at, s) {
                at[s] += 1;
                progressed = true;
            }
            // Each message is matched from its sender's side (the receiver's half is marked then).
            let Some(Step::Exchange { send, .. }) = current(&at, s) else { continue };
            if let (Some((to, msg)), false) = (send, done[s].0) {
                if let Some(Step::Exchange { recv: Some((from, want)), .. }) = current(&at, to) {
                    if from == s && want == msg && !done[to].1 {
                        done[s].0 = true;
                        done[to].1 = true;
                        progressed = true;
                    }
                }
            }
        }
        for s in 0..p {
            if let Some(Step::Exchange { send, recv }) = current(&at, s) {
                if (send.is_none() || done[s].0) && (recv.is_none() || done[s].1) {
                    at[s] += 1;
                    done[s] = (false, false);
                    progressed = true;
                }
            }
        }
        if (0..p).all(|s| at[s] == plans[s].len()) {
            return Ok(());
        }
        if !progressed {
            let stuck: Vec<String> =
                (0..p).filter_map(|s| current(&at, s).map(|st| format!("stage {s} at {st:?}"))).collect();
            return Err(Error::Layout(format!("the pipeline plans deadlock: {}", stuck.join(", "))));
        }
    }
}

/// What one stage's run of a schedule took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExecStats {
    /// Seconds from the first op to the last.
    pub wall: f64,
    /// Seconds inside the stage's forwards and backwards (the rest is waiting and copying).
    pub busy: f64,
    /// Bytes this stage sent (activations forward, gradients back; f32 on the wire).
    pub sent: usize,
    /// Micro-batches whose activations were held at once, at most (the schedule's count; a
    /// stage that keeps them can report what it saw).
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

/// Runs this stage's [`plan`] of `m` micro-batches on the pipeline group `pp` (rank = stage):
/// activations go forward and gradients back as messages of `shape(mb)` (known to both sides:
/// every rank reads the same micro-batches), each exchange batched as the plan pairs them.
pub fn execute(
    pp: &dyn Communicator,
    m: usize,
    shape: &dyn Fn(usize) -> Shape,
    dtype: DType,
    dev: &Device,
    stage: &mut dyn Stage,
) -> Result<ExecStats> {
    use std::collections::HashMap;
    let (s, p) = (pp.rank(), pp.size());
    let steps = plan(p, s, m)?;
    let start = std::time::Instant::now();
    let ops: Vec<Op> =
        steps.iter().filter_map(|st| if let Step::Compute(op) = st { Some(*op) } else { None }).collect();
    let mut stats = ExecStats { max_held: max_held(&ops), ..Default::default() };
    // Received and produced tensors by message, until their op or their send takes them.
    let (mut inbox, mut outbox): (HashMap<Op, Tensor>, HashMap<Op, Tensor>) = (HashMap::new(), HashMap::new());
    let missing = |what: &str, op: Op| Error::Stage(format!("pipeline stage {s}: no {what} for {op:?}"));
    for step in steps {
        match step {
            Step::Compute(op) => {
                let t0 = std::time::Instant::now();
                match op {
                    Op::Forward(mb) => {
                        let out = stage.forward(mb, inbox.remove(&op))?;
                        if s + 1 < p {
                            outbox.insert(op, out);
                        }
                    }
                    Op::Backward(mb) => match (stage.backward(mb, inbox.remove(&op))?, s > 0) {
                        (Some(g), true) => {
                            outbox.insert(op, g);
                        }
                        (None, true) => return Err(missing("input gradient", op)),
                        _ => {}
                    },
                }
                stats.busy += t0.elapsed().as_secs_f64();
            }
            Step::Exchange { send, recv } => {
                let out =
                    send.map(|(to, op)| outbox.remove(&op).map(|t| (t, to)).ok_or_else(|| missing("message", op)));
                let out = out.transpose()?;
                let mb = |op: Op| match op {
                    Op::Forward(mb) | Op::Backward(mb) => mb,
                };
                let want = recv.map(|(from, op)| (shape(mb(op)), from, op));
                let got = pp.send_recv(
                    out.as_ref().map(|(t, to)| (t, *to)),
                    want.as_ref().map(|(sh, from, _)| (sh, dtype, dev, *from)),
                )?;
                if let Some((t, _)) = &out {
                    stats.sent += t.elem_count() * 4;
                }
                if let (Some((_, _, op)), Some(t)) = (want, got) {
                    inbox.insert(op, t);
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
                let mut st = Affine { stage: pp.rank() as f64, seen: Vec::new() };
                execute(pp.as_ref(), m, &|_| Shape::from((2, 3)), DType::F32, &Device::Cpu, &mut st)?;
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

    /// The plans compute in 1F1B order, every message is sent once and received once, and no
    /// two stages wait on each other even under rendezvous sends; a plan that sends before its
    /// neighbour can receive is caught.
    #[test]
    fn the_plans_pair_messages_without_deadlock() -> Result<()> {
        for p in 1..=8 {
            for m in 1..=16 {
                let plans: Vec<Vec<Step>> = (0..p).map(|s| plan(p, s, m)).collect::<Result<_>>()?;
                for (s, pl) in plans.iter().enumerate() {
                    let ops: Vec<Op> =
                        pl.iter().filter_map(|st| if let Step::Compute(o) = st { Some(*o) } else { None }).collect();
                    assert_eq!(ops, one_f_one_b(p, s, m)?, "p {p} m {m} stage {s}");
                }
                rendezvous(&plans).map_err(|e| Error::Layout(format!("p {p} m {m}: {e}")))?;
            }
        }
        // Blocking sends in compute order (send each output right after computing it, then
        // receive): stage 0 sends its second activation while stage 1 sends its first gradient.
        let naive = |s: usize| -> Vec<Step> {
            let mut out = Vec::new();
            for op in one_f_one_b(2, s, 2).unwrap_or_default() {
                let (recv, send) = match (op, s) {
                    (Op::Forward(_), 0) => (None, Some((1, op))),
                    (Op::Forward(_), _) => (Some((0, op)), None),
                    (Op::Backward(_), 0) => (Some((1, op)), None),
                    (Op::Backward(_), _) => (None, Some((0, op))),
                };
                if recv.is_some() {
                    out.push(Step::Exchange { send: None, recv });
                }
                out.push(Step::Compute(op));
                if send.is_some() {
                    out.push(Step::Exchange { send, recv: None });
                }
            }
            out
        };
        assert!(rendezvous(&[naive(0), naive(1)]).is_err());
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
