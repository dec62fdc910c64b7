//! Rank 0's measurements: its log of a run's collectives cut into the trainer's steps, and the
//! machine it ran on.

use std::ops::Range;

use glm_dist::meter::{Event, Tally};

use super::*;

/// What rank 0 measured of one run.
#[derive(Debug, Clone)]
pub struct Measured {
    pub run: RunKind,
    pub ranks: usize,
    /// Per timed step: seconds as the trainer logs them (its `train_step`), seconds from one step to
    /// the next (what a run of many steps takes per step: the trainer's between-step work, such as
    /// agreeing on a stop, included), and seconds inside collectives.
    pub logged_s: Vec<f64>,
    pub step_s: Vec<f64>,
    pub comm_s: Vec<f64>,
    /// Collectives of the timed steps, summed, by (group, kind).
    pub tallies: BTreeMap<(String, Kind), Tally>,
    pub group_sizes: BTreeMap<String, usize>,
    /// How the log was cut into steps.
    pub partition: &'static str,
    pub losses: Vec<f64>,
    /// `Trainer::optimizer_bytes()`, the largest over the ranks.
    pub optimizer_bytes: u64,
    pub threads: usize,
}

/// (seconds, loss) of each step, from a run's `metrics.jsonl`.
fn step_log(out: &Path) -> Result<Vec<(f64, f64)>> {
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let f = |k: &str| v[k].as_f64().ok_or_else(|| anyhow!("{}: a step without {k}", path.display()));
            Ok((f("seconds")?, f("loss")?))
        })
        .collect()
}

/// Cuts rank 0's log of a run (`run()`: its steps, then validation and a checkpoint) into the
/// steps' calls. Every step makes the same calls in the same order, so the steps are the shortest
/// period c of the (group, kind) sequence such that its K·c calls reach into the last step and the
/// next call (validation's) starts after the steps. The steps laid end to end from `t0` by their
/// logged seconds are lower bounds of where each begins and ends (the trainer's work between steps
/// is not in them), so the true period passes both tests. When none does (a micro-batch without
/// scored tokens changes a step's calls), those time windows cut the log instead.
fn partition(events: &[Event], secs: &[f64], t0: Instant) -> (Vec<Range<usize>>, &'static str) {
    let k = secs.len();
    let mut bounds = vec![t0];
    for s in secs {
        let last = bounds[bounds.len() - 1];
        bounds.push(last + Duration::from_secs_f64(*s));
    }
    if events.is_empty() {
        return ((0..k).map(|_| 0..0).collect(), "no collectives");
    }
    let key = |e: &Event| (e.group, e.kind);
    for c in 1..=events.len().checked_div(k).unwrap_or(0) {
        let periodic = (c..k * c).all(|i| key(&events[i]) == key(&events[i - c]));
        let tail_after = events.get(k * c).is_none_or(|e| e.start >= bounds[k]);
        if periodic && events[k * c - 1].start >= bounds[k - 1] && tail_after {
            return ((0..k).map(|i| i * c..(i + 1) * c).collect(), "periodic");
        }
    }
    let first_at = |t: Instant| events.iter().position(|e| e.start >= t).unwrap_or(events.len());
    ((0..k).map(|i| first_at(bounds[i])..first_at(bounds[i + 1])).collect(), "time windows")
}

/// Rank 0's view of a finished run.
pub(super) fn measure(run: RunKind, out: &Path, stats: &Stats, t0: Instant, o: &DistBenchOpts) -> Result<Measured> {
    let log = step_log(out)?;
    if log.len() != o.warmup + o.steps {
        bail!("{}: {} steps logged, expected {}", out.display(), log.len(), o.warmup + o.steps);
    }
    let secs: Vec<f64> = log.iter().map(|s| s.0).collect();
    let events = stats.events();
    let (steps, how) = partition(events, &secs, t0);
    let end =
        |r: &Range<usize>| r.end.checked_sub(1).map(|i| events[i].start + Duration::from_secs_f64(events[i].seconds));
    let (mut step_s, mut comm_s, mut tallies) = (Vec::new(), Vec::new(), BTreeMap::new());
    for (k, r) in steps.iter().enumerate().skip(o.warmup) {
        // From the same point of the previous step: the last call's end.
        let period = match (k.checked_sub(1).and_then(|p| end(&steps[p])), end(r)) {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => secs[k],
        };
        step_s.push(period);
        comm_s.push(events[r.clone()].iter().fold(0.0, |a, e| a + e.seconds));
        for e in &events[r.clone()] {
            let label = stats.groups().get(e.group).map(|g| g.0.clone()).unwrap_or_default();
            let t: &mut Tally = tallies.entry((label, e.kind)).or_default();
            t.calls += 1;
            t.bytes += e.bytes;
            t.seconds += e.seconds;
        }
    }
    Ok(Measured {
        run,
        ranks: 1,
        logged_s: secs[o.warmup..].to_vec(),
        step_s,
        comm_s,
        tallies,
        group_sizes: stats.groups().iter().cloned().collect(),
        partition: how,
        losses: log.iter().map(|s| s.1).collect(),
        optimizer_bytes: 0,
        threads: rayon::current_num_threads(),
    })
}

/// The machine's logical CPUs (not this process's affinity: mpirun binds a rank to one).
pub(super) fn cores() -> usize {
    let listed = std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    if listed > 0 {
        listed
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

pub(super) use crate::cpu_name;

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t0: Instant, ms: u64, group: usize, kind: Kind) -> Event {
        Event { group, kind, bytes: 4, start: t0 + Duration::from_millis(ms), seconds: 0.001 }
    }

    #[test]
    fn steps_are_the_period_of_the_calls_and_the_tail_is_left_out() {
        let t0 = Instant::now();
        // 3 steps of 10 ms logged, 2 ms between steps (a stop flag agreed: world f64), then the
        // tail (validation: tp f32 calls; checkpoint: a barrier).
        let mut events = Vec::new();
        for k in 0..3u64 {
            let at = k * 12;
            events.push(ev(t0, at, 0, Kind::AllReduceF64));
            for i in 0..3 {
                events.push(ev(t0, at + 3 + i, 1, Kind::AllReduceF32));
            }
            events.push(ev(t0, at + 11, 1, Kind::AllReduceF64));
        }
        events.extend([
            ev(t0, 40, 1, Kind::AllReduceF32),
            ev(t0, 41, 1, Kind::AllReduceF32),
            ev(t0, 45, 0, Kind::Barrier),
        ]);
        let (steps, how) = partition(&events, &[0.010, 0.010, 0.010], t0);
        assert_eq!(how, "periodic");
        assert_eq!(steps, vec![0..5, 5..10, 10..15]);
        // A step whose calls differ: cut by time.
        events.remove(7);
        let (steps, how) = partition(&events, &[0.010, 0.010, 0.010], t0);
        assert_eq!(how, "time windows");
        assert_eq!(steps.len(), 3);
    }
}
