//! A load generator for the server: `streams` clients, each sending streamed completions one
//! after another for a fixed time, checking every response's SSE framing. Used by the load test
//! and by `glm bench serve` (aggregate tokens/s, time to first token, gaps between tokens).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `http://host:port`.
    pub base: String,
    pub api_key: Option<String>,
    pub model: String,
    pub streams: usize,
    /// New requests start until then; the ones running are waited for.
    pub duration: Duration,
    /// Each request generates exactly this many tokens (min_tokens = max_tokens).
    pub max_tokens: usize,
    /// Client i sends prompts[(i + k) % len] as its k-th request.
    pub prompts: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub streams: usize,
    pub requests: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// Completion tokens of the successful requests (from their usage chunks).
    pub tokens: u64,
    pub seconds: f64,
    /// Time to the first text chunk, per successful request, in seconds.
    pub ttft: Vec<f64>,
    /// Gaps between consecutive text chunks of a request, over all successful requests, seconds.
    pub itl: Vec<f64>,
}

impl LoadReport {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }

    /// The q-quantile of the time to first token (q in [0, 1]), seconds.
    pub fn ttft_quantile(&self, q: f64) -> f64 {
        quantile(&self.ttft, q)
    }

    /// The q-quantile of the gaps between tokens, seconds.
    pub fn itl_quantile(&self, q: f64) -> f64 {
        quantile(&self.itl, q)
    }
}

/// The q-quantile (q in [0, 1], nearest rank) of `v`; NaN when empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut t = v.to_vec();
    t.sort_by(f64::total_cmp);
    match t.len() {
        0 => f64::NAN,
        n => t[((n - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize],
    }
}

/// What one successful request saw.
struct Seen {
    tokens: u64,
    ttft: f64,
    gaps: Vec<f64>,
}

/// One streamed completion, or what was wrong.
async fn one(client: &reqwest::Client, o: &LoadOptions, prompt: &str) -> Result<Seen, String> {
    let body = json!({"model": o.model, "prompt": prompt, "max_tokens": o.max_tokens, "min_tokens": o.max_tokens,
                      "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let mut req = client.post(format!("{}/v1/completions", o.base)).body(body.to_string());
    req = req.header("content-type", "application/json");
    if let Some(k) = &o.api_key {
        req = req.bearer_auth(k);
    }
    let start = Instant::now();
    let resp = req.send().await.map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {text}"));
    }
    let (mut buf, mut stream) = (Vec::<u8>::new(), resp.bytes_stream());
    let (mut ttft, mut tokens, mut done, mut finished) = (None, None, false, false);
    let (mut gaps, mut last_text) = (Vec::new(), None::<Instant>);
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| format!("body: {e}"))?);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = std::str::from_utf8(&event[..end]).map_err(|_| "an event is not UTF-8".to_string())?;
            let data = text.strip_prefix("data: ").ok_or_else(|| format!("not a data event: {text:?}"))?;
            if done {
                return Err(format!("an event after [DONE]: {text:?}"));
            }
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("bad JSON {data:?}: {e}"))?;
            if v.get("error").is_some() {
                return Err(format!("error event: {data}"));
            }
            if let Some(n) = v.pointer("/usage/completion_tokens").and_then(Value::as_u64) {
                tokens = Some(n);
            }
            let choice = v.pointer("/choices/0");
            if choice.and_then(|c| c["text"].as_str()).is_some_and(|t| !t.is_empty()) {
                let now = Instant::now();
                ttft.get_or_insert((now - start).as_secs_f64());
                if let Some(t) = last_text.replace(now) {
                    gaps.push((now - t).as_secs_f64());
                }
            }
            finished |= choice.is_some_and(|c| c["finish_reason"].is_string());
        }
    }
    if !(done && finished && buf.is_empty()) {
        return Err(format!("incomplete stream (done {done}, finished {finished}, {} bytes left)", buf.len()));
    }
    let tokens = tokens.ok_or("no usage chunk")?;
    Ok(Seen { tokens, ttft: ttft.unwrap_or_else(|| start.elapsed().as_secs_f64()), gaps })
}

/// Runs the load and reports it.
pub async fn run(o: &LoadOptions) -> LoadReport {
    let client = reqwest::Client::new();
    let start = Instant::now();
    let stop = start + o.duration;
    let workers = (0..o.streams).map(|i| {
        let (client, o) = (client.clone(), o.clone());
        async move {
            let mut r = LoadReport::default();
            let mut k = 0;
            while Instant::now() < stop {
                let prompt = o.prompts.get((i + k) % o.prompts.len().max(1)).map_or("Hello", String::as_str);
                k += 1;
                r.requests += 1;
                match one(&client, &o, prompt).await {
                    Ok(seen) => {
                        r.tokens += seen.tokens;
                        r.ttft.push(seen.ttft);
                        r.itl.extend(seen.gaps);
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert(e);
                    }
                }
            }
            r
        }
    });
    let parts = futures_util::future::join_all(workers).await;
    let mut total = LoadReport { streams: o.streams, seconds: start.elapsed().as_secs_f64(), ..Default::default() };
    for p in parts {
        total.requests += p.requests;
        total.errors += p.errors;
        total.tokens += p.tokens;
        total.ttft.extend(p.ttft);
        total.itl.extend(p.itl);
        if total.first_error.is_none() {
            total.first_error = p.first_error;
        }
    }
    total
}
