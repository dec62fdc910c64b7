//! Streaming responses as server-sent events, framed exactly as OpenAI's: each event one
//! `data: <json>\n\n`, the last `data: [DONE]\n\n`, nothing else. Dropping the body (the client
//! left) drops the request's receiver, and the engine cancels the request at its next step.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use glm_infer::batch::Event;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{finish_reason, ApiError, Endpoint};
use crate::metrics::Metrics;
use crate::{infer_error, sse_bytes, Answer};

const DONE: &str = "data: [DONE]\n\n";

struct Stream {
    rx: mpsc::UnboundedReceiver<Event>,
    answer: Answer,
    metrics: Arc<Metrics>,
    prompt_tokens: usize,
    first_token: bool,
    over: bool,
}

impl Stream {
    /// One chunk: `choices: [{index 0, text | delta, finish_reason}]`.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let a = &self.answer;
        let choice = match a.endpoint {
            Endpoint::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            _ => json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}),
        };
        json!({"id": a.id, "object": self.object(), "created": a.created, "model": a.model, "choices": [choice]})
    }

    fn object(&self) -> &'static str {
        match self.answer.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            _ => "text_completion",
        }
    }

    /// What opens the stream: chat's role, or the echoed prompt.
    fn opening(&self) -> Option<Bytes> {
        let a = &self.answer;
        match a.endpoint {
            Endpoint::Chat => {
                let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                Some(sse_bytes(&json!({"id": a.id, "object": self.object(), "created": a.created,
                                       "model": a.model, "choices": [choice]})))
            }
            _ if a.parsed.echo => Some(sse_bytes(&self.chunk(Some(&a.prompt), None))),
            _ => None,
        }
    }

    /// The closing events: the finish chunk, usage if asked, [DONE]; or the error and [DONE].
    fn closing(&self, result: Result<glm_infer::Generation, ApiError>) -> Bytes {
        self.metrics.request_duration.observe(self.answer.arrived.elapsed().as_secs_f64());
        let mut out = String::new();
        match result {
            Ok(g) => {
                out += &format!("data: {}\n\n", self.chunk(None, Some(finish_reason(g.stop))));
                if self.answer.parsed.include_usage {
                    let a = &self.answer;
                    let c = g.tokens.len();
                    let usage = json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": c,
                                       "total_tokens": self.prompt_tokens + c});
                    let v = json!({"id": a.id, "object": self.object(), "created": a.created, "model": a.model,
                                   "choices": [], "usage": usage});
                    out += &format!("data: {v}\n\n");
                }
            }
            Err(e) => out += &format!("data: {}\n\n", e.body()),
        }
        out += DONE;
        Bytes::from(out)
    }

    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Self)> {
        if self.over {
            return None;
        }
        loop {
            let bytes = match self.rx.recv().await {
                Some(Event::Started { prompt_tokens }) => {
                    self.prompt_tokens = prompt_tokens;
                    match self.opening() {
                        Some(b) => b,
                        None => continue,
                    }
                }
                Some(Event::Text { delta, .. }) => {
                    if self.first_token {
                        self.first_token = false;
                        self.metrics.time_to_first_token.observe(self.answer.arrived.elapsed().as_secs_f64());
                    }
                    sse_bytes(&self.chunk(Some(&delta), None))
                }
                Some(Event::Done(r)) => {
                    self.over = true;
                    self.closing(r.map_err(|e| infer_error(&e)))
                }
                None => {
                    self.over = true;
                    self.closing(Err(ApiError::new(
                        500,
                        "server_error",
                        "the engine stopped before the request finished",
                    )))
                }
            };
            return Some((Ok(bytes), self));
        }
    }
}

pub(crate) fn response(answer: Answer, rx: mpsc::UnboundedReceiver<Event>, metrics: Arc<Metrics>) -> Response {
    let st = Stream { rx, answer, metrics, prompt_tokens: 0, first_token: true, over: false };
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
