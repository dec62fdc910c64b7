//! The engine thread: owns the model's batch ([`glm_infer::batch::Engine`]), takes requests from
//! the bounded queue when the batch has room for them, and steps the batch. Compute runs here,
//! off the async runtime; events go back to each request's handler through its own channel.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use glm_infer::batch::{Engine, EngineOptions, Event, Prepared, Request, Sink};
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
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| serve(&mut engine, &mut queue, &metrics)));
        match r {
            Ok(()) => return,
            // A bug hit a request: its handlers see their channels close (a 500); the others
            // start over with a fresh engine.
            Err(_) => eprintln!("glm serve: the engine panicked; its running requests failed, restarting it"),
        }
    }
}

fn serve(engine: &mut Engine, queue: &mut mpsc::Receiver<Job>, metrics: &Metrics) {
    let mut held: Option<(Prepared, ChannelSink)> = None;
    loop {
        // Take requests while the batch has room (the queue is the waiting line).
        loop {
            if held.is_none() {
                let job = if engine.running() == 0 {
                    match queue.blocking_recv() {
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
        let made = engine.step();
        metrics.completion_tokens.fetch_add(made as u64, Relaxed);
        metrics.engine(engine.stats(), engine.running(), engine.reserved());
    }
}
