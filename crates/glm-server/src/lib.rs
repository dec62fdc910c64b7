//! `glm serve`: an OpenAI-compatible HTTP server for GLM models.
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions` (OpenAI's request and response shapes,
//!   `stream: true` as server-sent events), `GET /v1/models`, `GET /v1/models/{id}`;
//! - `POST /v1/infill`: text with [MASK] / [sMASK] blanks (and a final [gMASK]) -> the filled text
//!   and where each span is; `/v1/completions` with a `suffix` fills the blank between the two;
//! - `GET /health`, `GET /metrics` (Prometheus text), `GET /` (the playground page).
//!
//! Requests go through a bounded queue (full: 429 with Retry-After) into the continuous-batching
//! engine ([`glm_infer::batch`]) on its own thread; a client that disconnects cancels its work.
//! Every malformed or over-limit request gets a JSON 4xx (`api::ApiError`).

pub mod api;
pub mod loadgen;
mod logprobs;
pub mod metrics;
mod sse;
mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use glm_infer::batch::{EngineOptions, Event, Request, Task};
use glm_infer::{Error as InferError, Generation, TokenLogprob};
use glm_model::Glm;
use glm_tokenizer::Tokenizer;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use api::{ApiError, Endpoint, Limits, Parsed};
use metrics::Metrics;
use worker::Job;

const PLAYGROUND: &str = include_str!("../assets/playground.html");

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The id clients name the model by.
    pub model_name: String,
    /// Required as `Authorization: Bearer <key>` on /v1/* when set.
    pub api_key: Option<String>,
    pub max_batch: usize,
    pub kv_budget_bytes: u64,
    /// Requests that may wait for a place in the batch; more get 429.
    pub queue: usize,
    pub max_body_bytes: usize,
    pub max_prompt_tokens: usize,
    /// Most `max_tokens` a request may ask (per blank for infill).
    pub max_tokens: usize,
    /// From arrival to the last token.
    pub request_timeout: Duration,
    /// Prefill work per engine step, in tokens (`EngineOptions::prefill_chunk`; 0: no bound).
    pub prefill_chunk: usize,
}

impl Options {
    /// Defaults for a model: 8 rows, 1 GiB of KV cache, 64 waiting, 1 MiB bodies, prompts up to
    /// the model's max_seq_len, 1024 tokens, 5 minutes, prefill chunks of 256 tokens.
    pub fn new(model_name: impl Into<String>, max_seq_len: usize) -> Self {
        Self {
            model_name: model_name.into(),
            api_key: None,
            max_batch: 8,
            kv_budget_bytes: 1 << 30,
            queue: 64,
            max_body_bytes: 1 << 20,
            max_prompt_tokens: max_seq_len,
            max_tokens: 1024,
            request_timeout: Duration::from_secs(300),
            prefill_chunk: 256,
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), Error> {
        let zero: Vec<&str> = [
            ("max_batch", self.max_batch),
            ("queue", self.queue),
            ("max_tokens", self.max_tokens),
            ("max_prompt_tokens", self.max_prompt_tokens),
        ]
        .into_iter()
        .filter(|(_, v)| *v == 0)
        .map(|(n, _)| n)
        .collect();
        if !zero.is_empty() {
            return Err(Error::Options(format!("{} must be at least 1", zero.join(", "))));
        }
        if self.max_batch > glm_infer::batch::MAX_BATCH {
            return Err(Error::Options(format!(
                "max_batch {} is over {} (beyond it a batched row is no longer computed exactly as alone)",
                self.max_batch,
                glm_infer::batch::MAX_BATCH
            )));
        }
        if self.kv_budget_bytes == 0 || self.max_body_bytes == 0 || self.request_timeout.is_zero() {
            return Err(Error::Options("the KV-cache budget, body limit and time limit must be > 0".into()));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad server options: {0}")]
    Options(String),
    #[error("the model cannot generate: {0}")]
    Model(#[from] InferError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the tensor-parallel ranks are gone: {0}")]
    Ranks(String),
}

struct AppState {
    opts: Options,
    tok: Arc<Tokenizer>,
    queue: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    max_seq_len: usize,
    created: u64,
    next_id: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The server's state and the engine's end of the queue (checked options, a model that generates).
fn state(model: &Glm, tok: Arc<Tokenizer>, opts: Options) -> Result<(Arc<AppState>, mpsc::Receiver<Job>), Error> {
    opts.validate()?;
    glm_infer::Generator::new(model, &tok)?; // the special tokens are there
    let (tx, rx) = mpsc::channel(opts.queue);
    let metrics = Arc::new(Metrics::default());
    metrics.queue_capacity.store(opts.queue as u64, Relaxed);
    metrics.kv_budget_bytes.store(opts.kv_budget_bytes, Relaxed);
    metrics.max_batch.store(opts.max_batch as u64, Relaxed);
    let state = Arc::new(AppState {
        max_seq_len: model.config().max_seq_len,
        opts,
        tok,
        queue: tx,
        metrics,
        created: unix_now(),
        next_id: AtomicU64::new(0),
    });
    Ok((state, rx))
}

fn engine_options(o: &Options) -> EngineOptions {
    EngineOptions { max_batch: o.max_batch, kv_budget_bytes: o.kv_budget_bytes, prefill_chunk: o.prefill_chunk }
}

/// The HTTP side until `shutdown` resolves; the queue's sender goes with the router.
async fn http(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    // No Nagle: each SSE event goes out when written, not after the client's delayed ACK (~40 ms).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Serves `model` on `listener` until `shutdown` resolves. The engine runs on its own thread.
pub async fn serve(
    model: Arc<Glm>,
    tok: Arc<Tokenizer>,
    opts: Options,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (state, rx) = state(&model, tok.clone(), opts)?;
    let (m, t, mt, eo) = (model.clone(), tok, state.metrics.clone(), engine_options(&state.opts));
    let engine = std::thread::Builder::new().name("glm-engine".into()).spawn(move || worker::run(m, t, eo, rx, mt))?;
    let served = http(state, listener, shutdown).await;
    // The router (and with it the queue's sender) is gone: the engine thread ends.
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    Ok(served?)
}

/// Tensor-parallel serving, rank 0's side: the HTTP server runs on a thread of its own (with its
/// runtime) and the engine on the calling thread — the rank's, where its communicator lives —
/// every model call sent to the follower ranks through `mirror` first, so all ranks run their
/// shard of the same ragged batch. The followers are checked every `ping` while idle; once they
/// are gone the running requests end with the error, the server answers 503 for `grace`, then
/// stops and returns the error. Returns Ok when `shutdown` resolves (the followers are told to
/// stop).
#[allow(clippy::too_many_arguments)]
pub fn serve_driver(
    model: &Glm,
    tok: Arc<Tokenizer>,
    opts: Options,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mirror: &dyn glm_infer::mirror::Mirror,
    ping: Duration,
    grace: Duration,
) -> Result<(), Error> {
    let (state, rx) = state(model, tok.clone(), opts)?;
    let (metrics, eo) = (state.metrics.clone(), engine_options(&state.opts));
    let down = metrics.clone();
    let shutdown = async move {
        let gone = async {
            while down.ranks_down().is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(grace).await;
        };
        tokio::select! { _ = shutdown => {}, _ = gone => {} }
    };
    listener.set_nonblocking(true)?;
    let server = std::thread::Builder::new().name("glm-http".into()).spawn(move || -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move { http(state, TcpListener::from_std(listener)?, shutdown).await })
    })?;
    worker::drive(model, &tok, eo, rx, metrics.clone(), mirror, ping);
    let _ = mirror.call(&glm_infer::mirror::Call::Stop);
    match server.join() {
        Ok(r) => r?,
        Err(_) => return Err(Error::Io(std::io::Error::other("the HTTP thread panicked"))),
    }
    match metrics.ranks_down() {
        Some(why) => Err(Error::Ranks(why)),
        None => Ok(()),
    }
}

fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/infill", post(infill))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(playground))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.opts.max_body_bytes))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(Duration::from_secs(60)))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            error_response(&ApiError::new(500, "server_error", "internal error"))
        }))
        .with_state(state)
}

pub(crate) fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

/// Constant-time comparison of the key a client sent.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &s.opts.api_key {
        let header = req.headers().get(header::AUTHORIZATION);
        let sent = header.and_then(|v| v.to_str().ok());
        // Exactly `Bearer <key>`: no spaces around the key (clients send none), compared in
        // constant time.
        let ok = sent.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|k| same_key(k, key));
        if !ok {
            let msg = match (header, sent) {
                (None, _) => "missing API key: send Authorization: Bearer <key>",
                (Some(_), None) => "the Authorization header is not ASCII text: send Authorization: Bearer <key>",
                (Some(_), Some(v)) if !v.starts_with("Bearer ") => "the Authorization header must be Bearer <key>",
                _ => "incorrect API key",
            };
            let mut r = error_response(&ApiError::new(401, "authentication_error", msg).code("invalid_api_key"));
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

async fn not_found(req: HttpRequest) -> Response {
    let msg = format!("no route for {} {}", req.method(), req.uri().path());
    error_response(&ApiError::new(404, "invalid_request_error", msg).code("unknown_url"))
}

async fn method_not_allowed(req: HttpRequest) -> Response {
    let msg = format!("{} is not allowed on {}", req.method(), req.uri().path());
    error_response(&ApiError::new(405, "invalid_request_error", msg))
}

async fn playground() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PLAYGROUND).into_response()
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    match s.metrics.ranks_down() {
        None => Json(json!({"status": "ok", "model": s.opts.model_name})).into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "ranks_down", "model": s.opts.model_name, "error": why})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    // In the channel, plus the one the engine holds while it waits for room.
    let depth = s.opts.queue.saturating_sub(s.queue.capacity()) as u64 + s.metrics.held.load(Relaxed);
    s.metrics.queue_depth.store(depth, Relaxed);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

fn model_object(s: &AppState) -> Value {
    json!({"id": s.opts.model_name, "object": "model", "created": s.created, "owned_by": "glm-rs"})
}

async fn list_models(State(s): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [model_object(&s)]})).into_response()
}

async fn get_model(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id == s.opts.model_name {
        Json(model_object(&s)).into_response()
    } else {
        error_response(&model_not_found(&s, &id))
    }
}

fn model_not_found(s: &AppState, id: &str) -> ApiError {
    let msg = format!("the model `{id}` does not exist; this server serves `{}`", s.opts.model_name);
    ApiError { param: Some("model".into()), ..ApiError::new(404, "invalid_request_error", msg).code("model_not_found") }
}

async fn completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(s, Endpoint::Completions, body).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(s, Endpoint::Chat, body).await
}

async fn infill(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(s, Endpoint::Infill, body).await
}

async fn handle(s: Arc<AppState>, ep: Endpoint, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let resp = match generate(&s, ep, body, arrived).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    s.metrics.request(ep.name(), resp.status().as_u16());
    resp
}

/// Status and message for an error of the engine.
fn infer_error(e: &InferError) -> ApiError {
    match e {
        InferError::Timeout => ApiError::new(504, "timeout", e.to_string()).code("timeout"),
        InferError::Ranks(_) => ApiError::new(503, "server_error", e.to_string()).code("ranks_down"),
        InferError::EmptyPrompt | InferError::NoMask(_) | InferError::Input(_) | InferError::Sampling(_) => {
            ApiError::new(400, "invalid_request_error", e.to_string())
        }
        InferError::TooLong { .. } => {
            ApiError::new(400, "invalid_request_error", e.to_string()).code("context_length_exceeded")
        }
        InferError::MissingToken { .. } => ApiError::new(400, "invalid_request_error", e.to_string()),
        InferError::Context { source, .. } if !matches!(**source, InferError::Model(_) | InferError::Candle(_)) => {
            infer_error(source)
        }
        _ => ApiError::new(500, "server_error", e.to_string()),
    }
}

/// What one request needs to answer: its parse, ids and the moment it arrived.
pub(crate) struct Answer {
    pub parsed: Parsed,
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub arrived: Instant,
    /// The text of each prompt (choice k is from prompts[k / n]).
    pub prompts: Vec<String>,
    pub tok: Arc<Tokenizer>,
}

async fn generate(
    s: &Arc<AppState>,
    ep: Endpoint,
    body: Result<Bytes, BytesRejection>,
    arrived: Instant,
) -> Result<Response, ApiError> {
    if let Some(why) = s.metrics.ranks_down() {
        return Err(ApiError::new(503, "server_error", format!("the tensor-parallel ranks are gone: {why}")));
    }
    let body = body.map_err(|e| {
        let status = e.status().as_u16();
        let msg = if status == 413 {
            format!("the body is over this server's limit of {} bytes", s.opts.max_body_bytes)
        } else {
            format!("could not read the body: {e}")
        };
        ApiError::new(if status == 413 { 413 } else { 400 }, "invalid_request_error", msg)
    })?;
    let limits = Limits {
        max_tokens: s.opts.max_tokens,
        max_n: s.opts.max_batch,
        max_choices: s.opts.queue,
        chat_template: glm_infer::ChatTemplate::for_tokenizer(&s.tok),
    };
    let parsed = api::parse(ep, &body, &limits)?;
    if let Some(m) = parsed.model.as_deref().filter(|m| *m != s.opts.model_name) {
        return Err(model_not_found(s, m));
    }
    let param = if ep == Endpoint::Chat { "messages" } else { "prompt" };
    let prompts: Vec<String> = parsed
        .tasks
        .iter()
        .map(|t| match t {
            Task::Complete { prompt } => prompt.clone(),
            Task::Fill { text } => text.clone(),
        })
        .collect();
    for (i, prompt) in prompts.iter().enumerate() {
        let which = if prompts.len() > 1 { format!("prompt {i}") } else { "the prompt".to_string() };
        let n = s.tok.encode(prompt).len();
        if n > s.opts.max_prompt_tokens {
            let msg = format!("{which} has {n} tokens, over this server's limit of {}", s.opts.max_prompt_tokens);
            return Err(ApiError::param(param, msg).code("context_length_exceeded"));
        }
        if n + 2 > s.max_seq_len {
            let msg =
                format!("{which} has {n} tokens; with [gMASK] and <sop> it is over the model's {}", s.max_seq_len);
            return Err(ApiError::param(param, msg).code("context_length_exceeded"));
        }
    }
    let serial = s.next_id.fetch_add(1, Relaxed);
    let mut sampling = parsed.sampling;
    if !parsed.seeded {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        sampling.seed = (serial << 32) ^ nanos as u64 ^ 0x9e37_79b9_7f4a_7c15;
    }
    // One job per choice: choice k = prompt k / n with seed + k % n. If the queue cannot take them
    // all, the ones queued are dropped with their receivers (the engine skips closed requests).
    let mut receivers = Vec::with_capacity(parsed.tasks.len() * parsed.n);
    let mut sent = Ok(());
    for (task, i) in parsed.tasks.iter().flat_map(|t| (0..parsed.n).map(move |i| (t, i))) {
        let request = Request {
            task: task.clone(),
            sampling: glm_infer::SamplingConfig { seed: sampling.seed.wrapping_add(i as u64), ..sampling },
            stops: parsed.stops.clone(),
            deadline: Some(arrived + s.opts.request_timeout),
            logprobs: parsed.logprobs,
        };
        let (events, rx) = mpsc::unbounded_channel();
        sent = s.queue.try_send(Job { request, events });
        if sent.is_err() {
            break;
        }
        receivers.push(rx);
    }
    match sent {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            let mean = s.metrics.request_duration.mean().unwrap_or(1.0);
            let waves = s.opts.queue as f64 / s.opts.max_batch as f64 + 1.0;
            let wait = (mean * waves).ceil().clamp(1.0, 60.0) as u64;
            let msg = format!("the server is busy ({} requests waiting); retry in {wait} s", s.opts.queue);
            let mut r = error_response(&ApiError::new(429, "rate_limit_exceeded", msg).code("queue_full"));
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
            return Ok(r);
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return Err(ApiError::new(503, "server_error", "the engine has stopped"));
        }
    }
    let prefix = match ep {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
        Endpoint::Infill => "infill",
    };
    let answer = Answer {
        parsed,
        endpoint: ep,
        id: format!("{prefix}-{:x}{serial:06x}", s.created),
        created: unix_now(),
        model: s.opts.model_name.clone(),
        arrived,
        prompts,
        tok: s.tok.clone(),
    };
    if answer.parsed.stream {
        return Ok(sse::response(answer, receivers, s.metrics.clone()));
    }
    let results = futures_util::future::join_all(receivers.into_iter().map(|rx| collect(rx, arrived))).await;
    let (mut generations, mut prompt_tokens, mut ttft) = (Vec::new(), 0, None::<Duration>);
    for (k, r) in results.into_iter().enumerate() {
        let Collected { generation: g, prompt_tokens: n, first_text: t, logprobs } = r?;
        if answer.first_of_prompt(k) {
            prompt_tokens += n;
        }
        ttft = match (ttft, t) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        generations.push((g, logprobs));
    }
    if let Some(t) = ttft {
        s.metrics.time_to_first_token.observe(t.as_secs_f64());
    }
    s.metrics.request_duration.observe(arrived.elapsed().as_secs_f64());
    Ok(Json(answer.body(&generations, prompt_tokens)).into_response())
}

/// One choice, whole.
struct Collected {
    generation: Generation,
    prompt_tokens: usize,
    /// When its first text came.
    first_text: Option<Duration>,
    /// Its tokens' log-probabilities, when asked.
    logprobs: Vec<TokenLogprob>,
}

/// Waits for one choice's end.
async fn collect(mut rx: mpsc::UnboundedReceiver<Event>, arrived: Instant) -> Result<Collected, ApiError> {
    let (mut prompt_tokens, mut first, mut scored) = (0, None, Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Started { prompt_tokens: n } => prompt_tokens = n,
            Event::Text { logprobs, .. } => {
                first.get_or_insert(arrived.elapsed());
                scored.extend(logprobs);
            }
            Event::Done(r) => {
                let generation = r.map_err(|e| infer_error(&e))?;
                return Ok(Collected { generation, prompt_tokens, first_text: first, logprobs: scored });
            }
        }
    }
    Err(ApiError::new(500, "server_error", "the engine stopped before the request finished"))
}

impl Answer {
    /// A response object: id, `object`, created and model, then `fields`.
    pub(crate) fn envelope(&self, object: &str, fields: Value) -> Value {
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model});
        if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
            o.extend(f);
        }
        v
    }

    /// The prompt of choice k.
    pub(crate) fn prompt_of(&self, k: usize) -> &str {
        self.prompts.get(k / self.parsed.n.max(1)).map_or("", String::as_str)
    }

    /// Whether choice k is its prompt's first (usage counts each prompt once).
    pub(crate) fn first_of_prompt(&self, k: usize) -> bool {
        k.is_multiple_of(self.parsed.n.max(1))
    }

    /// The returned text of choice k: the continuation (after the prompt when echoing), or the
    /// suffix blank.
    fn text(&self, k: usize, g: &Generation) -> String {
        let span = g.spans.first().map(|s| s.text.clone()).unwrap_or_default();
        if self.parsed.echo {
            format!("{}{span}", self.prompt_of(k))
        } else {
            span
        }
    }

    /// Usage of a request: each prompt once, the tokens of every choice.
    pub(crate) fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
        let c = completion_tokens;
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c})
    }

    /// A choice's `logprobs`: null unless asked; `offset` is where `scored`'s text starts.
    pub(crate) fn logprobs(&self, scored: &[TokenLogprob], offset: &mut usize) -> Value {
        match (self.parsed.logprobs, self.endpoint) {
            (None, _) => Value::Null,
            (Some(_), Endpoint::Chat) => logprobs::chat(&self.tok, scored),
            (Some(_), _) => logprobs::completion(&self.tok, scored, offset),
        }
    }

    /// The whole (non-streamed) response body, one choice per generation.
    fn body(&self, gens: &[(Generation, Vec<TokenLogprob>)], prompt_tokens: usize) -> Value {
        let usage = Self::usage(prompt_tokens, gens.iter().map(|(g, _)| g.tokens.len()).sum());
        let choices = |chat: bool| -> Vec<Value> {
            let choice = |(i, (g, scored)): (usize, &(Generation, Vec<TokenLogprob>))| {
                let finish = api::finish_reason(g.stop);
                let logprobs = self.logprobs(scored, &mut 0);
                match chat {
                    true => json!({"index": i, "message": {"role": "assistant", "content": self.text(i, g)},
                                   "logprobs": logprobs, "finish_reason": finish}),
                    false => {
                        json!({"index": i, "text": self.text(i, g), "logprobs": logprobs, "finish_reason": finish})
                    }
                }
            };
            gens.iter().enumerate().map(choice).collect()
        };
        match (self.endpoint, gens.first().map(|(g, _)| g)) {
            (Endpoint::Completions, _) => {
                self.envelope("text_completion", json!({"choices": choices(false), "usage": usage}))
            }
            (Endpoint::Chat, _) => self.envelope("chat.completion", json!({"choices": choices(true), "usage": usage})),
            (Endpoint::Infill, None) => ApiError::new(500, "server_error", "no filling").body(),
            (Endpoint::Infill, Some(g)) => {
                let masks = mask_names(self.prompt_of(0));
                let blanks: Vec<Value> = g
                    .spans
                    .iter()
                    .enumerate()
                    .map(|(i, sp)| {
                        let start = g.text.get(..sp.start).map_or(0, |t| t.chars().count());
                        let end = start + sp.text.chars().count();
                        json!({"index": i, "mask": masks.get(i).copied().unwrap_or("[MASK]"), "text": sp.text,
                               "start": start, "end": end, "finish_reason": api::finish_reason(sp.stop)})
                    })
                    .collect();
                self.envelope("infill", json!({"text": g.text, "blanks": blanks, "usage": usage}))
            }
        }
    }
}

/// The mask tokens of a text in order ([MASK], [sMASK], [gMASK]).
fn mask_names(text: &str) -> Vec<&'static str> {
    let mut found: Vec<(usize, &'static str)> = ["[MASK]", "[sMASK]", "[gMASK]"]
        .into_iter()
        .flat_map(|m| text.match_indices(m).map(move |(i, _)| (i, m)))
        .collect();
    found.sort();
    found.into_iter().map(|(_, m)| m).collect()
}

/// One server-sent event carrying `v`.
pub(crate) fn sse_event(v: &Value) -> String {
    format!("data: {v}\n\n")
}
