//! Streaming responses as server-sent events, framed exactly as OpenAI's: each event one
//! `data: <json>\n\n`, the last `data: [DONE]\n\n`, nothing else. Dropping the body (the client
//! left) drops the request's receivers, and the engine cancels the request at its next step. With
//! n choices, their events interleave, each chunk carrying its choice's index; usage and [DONE]
//! follow the last choice's end.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use glm_infer::batch::Event;
use glm_infer::TokenLogprob;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{finish_reason, ApiError, Endpoint};
use crate::metrics::Metrics;
use crate::{infer_error, sse_event, Answer};

const DONE: &str = "data: [DONE]\n\n";

/// Every choice's events, tagged with its index.
type Tagged = futures_util::stream::BoxStream<'static, (usize, Event)>;

struct Stream {
    events: Tagged,
    answer: Answer,
    metrics: Arc<Metrics>,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Choices not finished yet.
    running: usize,
    first_token: bool,
    over: bool,
    /// Per choice: the character its next token's text starts at (completions' text_offset).
    offsets: Vec<usize>,
}

impl Stream {
    /// One chunk: `choices: [{index, text | delta, logprobs, finish_reason}]`; `logprobs` are
    /// those of the tokens behind `text` (None: a chunk without tokens).
    fn chunk(
        &mut self,
        index: usize,
        text: Option<&str>,
        scored: Option<&[TokenLogprob]>,
        finish: Option<&str>,
    ) -> Value {
        let logprobs = match (scored, self.offsets.get_mut(index)) {
            (Some(scored), Some(offset)) => self.answer.logprobs(scored, offset),
            _ => Value::Null,
        };
        let a = &self.answer;
        let choice = match a.endpoint {
            Endpoint::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            _ => json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish}),
        };
        a.envelope(self.object(), json!({"choices": [choice]}))
    }

    fn object(&self) -> &'static str {
        match self.answer.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            _ => "text_completion",
        }
    }

    /// What opens a choice: chat's role, or the echoed prompt.
    fn opening(&mut self, index: usize) -> Option<Bytes> {
        let a = &self.answer;
        match a.endpoint {
            Endpoint::Chat => {
                let delta = json!({"role": "assistant", "content": ""});
                let choice = json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": null});
                Some(sse_event(&a.envelope(self.object(), json!({"choices": [choice]}))).into())
            }
            _ if a.parsed.echo => {
                let prompt = a.prompt_of(index).to_string();
                Some(sse_event(&self.chunk(index, Some(&prompt), None, None)).into())
            }
            _ => None,
        }
    }

    /// A choice's end: its finish chunk; after the last choice, usage if asked and [DONE].
    fn finished(&mut self, index: usize, g: glm_infer::Generation) -> Bytes {
        self.completion_tokens += g.tokens.len();
        self.running = self.running.saturating_sub(1);
        let mut out = sse_event(&self.chunk(index, None, None, Some(finish_reason(g.stop))));
        if self.running == 0 {
            self.over = true;
            self.metrics.request_duration.observe(self.answer.arrived.elapsed().as_secs_f64());
            if self.answer.parsed.include_usage {
                let usage = Answer::usage(self.prompt_tokens, self.completion_tokens);
                out += &sse_event(&self.answer.envelope(self.object(), json!({"choices": [], "usage": usage})));
            }
            out += DONE;
        }
        Bytes::from(out)
    }

    /// The request failed: the error event and [DONE] (the other choices are dropped, and so
    /// cancelled, with the stream).
    fn failed(&mut self, e: ApiError) -> Bytes {
        self.over = true;
        self.metrics.request_duration.observe(self.answer.arrived.elapsed().as_secs_f64());
        Bytes::from(sse_event(&e.body()) + DONE)
    }

    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.over {
            return None;
        }
        loop {
            let bytes = match self.events.next().await {
                Some((i, Event::Started { prompt_tokens })) => {
                    if self.answer.first_of_prompt(i) {
                        self.prompt_tokens += prompt_tokens;
                    }
                    match self.opening(i) {
                        Some(b) => b,
                        None => continue,
                    }
                }
                Some((i, Event::Text { delta, logprobs, .. })) => {
                    if self.first_token {
                        self.first_token = false;
                        self.metrics.time_to_first_token.observe(self.answer.arrived.elapsed().as_secs_f64());
                    }
                    sse_event(&self.chunk(i, Some(&delta), Some(&logprobs), None)).into()
                }
                Some((i, Event::Done(Ok(g)))) => self.finished(i, g),
                Some((_, Event::Done(Err(e)))) => self.failed(infer_error(&e)),
                None => {
                    self.failed(ApiError::new(500, "server_error", "the engine stopped before the request finished"))
                }
            };
            return Some((Ok(bytes), self));
        }
    }
}

pub(crate) fn response(
    answer: Answer,
    receivers: Vec<mpsc::UnboundedReceiver<Event>>,
    metrics: Arc<Metrics>,
) -> Response {
    let running = receivers.len();
    let tagged = receivers.into_iter().enumerate().map(|(i, rx)| {
        futures_util::stream::unfold(rx, move |mut rx| async move { rx.recv().await.map(|e| ((i, e), rx)) }).boxed()
    });
    let events = futures_util::stream::select_all(tagged).boxed();
    let st = Stream {
        events,
        answer,
        metrics,
        prompt_tokens: 0,
        completion_tokens: 0,
        running,
        first_token: true,
        over: false,
        offsets: vec![0; running],
    };
    let body = Body::from_stream(futures_util::stream::unfold(st, Stream::next));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response()
}
