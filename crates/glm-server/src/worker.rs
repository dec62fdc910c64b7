//! The engine thread: owns the model's batch ([`glm_infer::batch::Engine`]), takes requests from
//! the bounded queue when the batch has room for them, and steps the batch. Compute runs here,
//! off the async runtime; events go back to each request's handler through its own channel.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glm_infer::batch::{Engine, EngineOptions, Event, Prepared, Request, Sink};
use glm_infer::mirror::Mirror;
use glm_infer::{Error, Generator};
use glm_model::Glm;
use glm_tokenizer::Tokenizer;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// A request waiting in the queue, with where its events go.
pub struct Job {
    pub request: Request,
    pub events: mpsc::UnboundedSender<Event>,
}

struct ChannelSink(mpsc::UnboundedSender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Runs until every sender of `queue` is gone and the batch is empty.
pub fn run(
    model: Arc<Glm>,
    tok: Arc<Tokenizer>,
    opts: EngineOptions,
    mut queue: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    loop {
        let gen = match Generator::new(&model, &tok) {
            Ok(g) => g,
            Err(e) => {
                // Checked before the server starts; if it ever fails, refuse every request.
                while let Some(job) = queue.blocking_recv() {
                    let _ = job.events.send(Event::Done(Err(Error::Input(format!("the model cannot generate: {e}")))));
                }
                return;
            }
        };
        let Ok(mut engine) = Engine::new(gen, opts) else { return };
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| serve(&mut engine, &mut queue, &metrics, None)));
        match r {
            Ok(()) => return,
            // A bug hit a request: its handlers see their channels close (a 500); the others
            // start over with a fresh engine.
            Err(_) => eprintln!("glm serve: the engine panicked; its running requests failed, restarting it"),
        }
    }
}

/// The driver of tensor-parallel serving: `run`'s loop on the calling thread (the rank's own,
/// where its communicator lives), every model call sent to the follower ranks through `mirror`.
/// While idle it checks the followers every `ping`; once they are gone the running requests have
/// failed, `metrics.ranks_down` is set (the server answers 503) and queued requests fail.
pub fn drive(
    model: &Glm,
    tok: &Tokenizer,
    opts: EngineOptions,
    mut queue: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    mirror: &dyn Mirror,
    ping: Duration,
) {
    let engine = Generator::new(model, tok).and_then(|g| Engine::new(g.with_mirror(mirror), opts));
    match engine {
        Ok(mut engine) => serve(&mut engine, &mut queue, &metrics, Some((mirror, ping))),
        Err(e) => metrics.set_ranks_down(&why(&e)),
    }
    // Gone or done: whatever still arrives fails.
    while let Some(job) = queue.blocking_recv() {
        let why = metrics.ranks_down().unwrap_or_else(|| "the engine has stopped".into());
        let _ = job.events.send(Event::Done(Err(Error::Ranks(why))));
    }
}

/// What went wrong with the ranks, without the error's own prefix.
fn why(e: &Error) -> String {
    match e {
        Error::Ranks(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Waits for the next job: blocking, or (driving followers) polling and pinging them every
/// `ping` while none comes. None when the queue is closed or the followers are gone.
fn next_job(
    queue: &mut mpsc::Receiver<Job>,
    metrics: &Metrics,
    health: Option<(&dyn Mirror, Duration)>,
) -> Option<Job> {
    let Some((mirror, ping)) = health else { return queue.blocking_recv() };
    let mut last = Instant::now();
    loop {
        match queue.try_recv() {
            Ok(j) => return Some(j),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        if last.elapsed() >= ping {
            if let Err(e) = mirror.check() {
                metrics.set_ranks_down(&why(&e));
                return None;
            }
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn serve(
    engine: &mut Engine,
    queue: &mut mpsc::Receiver<Job>,
    metrics: &Metrics,
    health: Option<(&dyn Mirror, Duration)>,
) {
    let mut held: Option<(Prepared, ChannelSink)> = None;
    loop {
        // Take requests while the batch has room (the queue is the waiting line).
        loop {
            if held.is_none() {
                let job = if engine.running() == 0 {
                    match next_job(queue, metrics, health) {
                        Some(j) => j,
                        None => return,
                    }
                } else {
                    match queue.try_recv() {
                        Ok(j) => j,
                        Err(_) => break,
                    }
                };
                let mut sink = ChannelSink(job.events);
                if sink.is_closed() {
                    continue;
                }
                if job.request.deadline.is_some_and(|d| Instant::now() >= d) {
                    sink.send(Event::Done(Err(Error::Timeout)));
                    continue;
                }
                match engine.prepare(job.request) {
                    Ok(p) => held = Some((p, sink)),
                    Err(e) => {
                        sink.send(Event::Done(Err(e)));
                        continue;
                    }
                }
            }
            match held.take() {
                Some((p, sink)) if engine.fits(&p) => {
                    if !sink.is_closed() {
                        metrics.prompt_tokens.fetch_add(p.prompt_tokens() as u64, Relaxed);
                        engine.admit(p, Box::new(sink));
                    }
                }
                Some((_, mut sink)) if engine.running() == 0 => {
                    // Cannot happen (prepare refuses what the empty batch cannot take); never spin.
                    sink.send(Event::Done(Err(Error::Input("the request does not fit the batch".into()))));
                }
                other => {
                    held = other;
                    break;
                }
            }
        }
        metrics.held.store(held.is_some() as u64, Relaxed);
        let failed = engine.stats().failed;
        let made = engine.step();
        metrics.completion_tokens.fetch_add(made as u64, Relaxed);
        metrics.engine(engine.stats(), engine.running(), engine.reserved());
        // A failure may be the followers': check them before taking more work.
        if let Some((mirror, _)) = health.filter(|_| engine.stats().failed > failed) {
            if let Err(e) = mirror.check() {
                metrics.set_ranks_down(&why(&e));
                if let Some((_, mut sink)) = held.take() {
                    sink.send(Event::Done(Err(Error::Ranks(why(&e)))));
                }
                // Every call now fails at once: the running requests end with the error.
                for _ in 0..1000 {
                    if engine.running() == 0 {
                        break;
                    }
                    engine.step();
                }
                metrics.engine(engine.stats(), engine.running(), engine.reserved());
                return;
            }
        }
    }
}
