//! The server in-process on a tiny random model: the OpenAI shapes, exact SSE framing, a table of
//! malformed requests and their codes, auth, limits, the queue's 429, time limits, cancellation on
//! disconnect, batched = alone over HTTP, and a bounded load test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use glm_model::{init_weights, Config, Glm};
use glm_server::loadgen::{self, LoadOptions};
use glm_server::Options;
use glm_tokenizer::Tokenizer;
use serde_json::{json, Value};

struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), glm_server::Error>>,
}

impl Server {
    async fn start(f: impl FnOnce(Options) -> Options) -> Result<Self> {
        let cfg = Config::tiny();
        let w = init_weights(&cfg, 3, &Device::Cpu)?;
        let model = Glm::new(&cfg, VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), &glm_nn::DenseFactory)?;
        let opts = f(Options { max_tokens: 256, ..Options::new("tiny", cfg.max_seq_len) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let tok = Arc::new(Tokenizer::default_glm()?);
        let task = tokio::spawn(glm_server::serve(Arc::new(model), tok, opts, listener, async {
            let _ = rx.await;
        }));
        Ok(Self { base, stop: Some(tx), task })
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> Result<(u16, Value)> {
        let r = reqwest::Client::new().post(format!("{}{path}", self.base)).body(body).send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        let v = serde_json::from_str(&text).with_context(|| format!("{status}: not JSON: {text:?}"))?;
        Ok((status, v))
    }

    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let r = reqwest::get(format!("{}{path}", self.base)).await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    async fn metric(&self, name: &str) -> Result<f64> {
        let (_, text) = self.get("/metrics").await?;
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
        Ok(line.context(name.to_string())?[name.len() + 1..].parse()?)
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.task).await???;
        Ok(())
    }
}

/// The events of an SSE body, checking the framing: every event exactly `data: <line>\n\n`, the
/// last `data: [DONE]`.
fn sse_events(raw: &str) -> Result<Vec<Value>> {
    ensure!(raw.ends_with("data: [DONE]\n\n"), "no final [DONE]: {raw:?}");
    let mut out = Vec::new();
    let body = &raw[..raw.len() - "data: [DONE]\n\n".len()];
    for ev in body.split_terminator("\n\n") {
        let data = ev.strip_prefix("data: ").with_context(|| format!("not a data event: {ev:?}"))?;
        ensure!(!data.contains('\n'), "an event over several lines: {ev:?}");
        out.push(serde_json::from_str(data)?);
    }
    ensure!(body.is_empty() || body.ends_with("\n\n"));
    Ok(out)
}

async fn stream(s: &Server, path: &str, body: Value) -> Result<(reqwest::header::HeaderMap, Vec<Value>)> {
    let r = reqwest::Client::new().post(format!("{}{path}", s.base)).body(body.to_string()).send().await?;
    ensure!(r.status() == 200, "status {}", r.status());
    let headers = r.headers().clone();
    Ok((headers, sse_events(&r.text().await?)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_shapes_and_exact_sse_framing() -> Result<()> {
    let s = Server::start(|o| o).await?;
    let (code, health) = s.get("/health").await?;
    ensure!(code == 200 && health.contains("\"ok\""), "{code} {health}");
    let (code, models) = s.get("/v1/models").await?;
    let models: Value = serde_json::from_str(&models)?;
    ensure!(code == 200 && models["data"][0]["id"] == "tiny" && models["object"] == "list", "{models}");
    let (code, page) = s.get("/").await?;
    ensure!(code == 200 && page.contains("<html") || page.contains("<!doctype"), "playground: {code}");

    // A greedy completion, then the same streamed: the chunks add up to the same text.
    let req = json!({"model": "tiny", "prompt": "The capital of France is", "max_tokens": 12, "min_tokens": 12, "temperature": 0});
    let (code, full) = s.post("/v1/completions", req.to_string()).await?;
    ensure!(code == 200, "{full}");
    ensure!(full["object"] == "text_completion" && full["choices"][0]["finish_reason"] == "length", "{full}");
    ensure!(
        full["usage"]["completion_tokens"] == 12
            && full["usage"]["total_tokens"] == 12 + full["usage"]["prompt_tokens"].as_u64().unwrap_or(0)
    );
    let text = full["choices"][0]["text"].as_str().context("text")?.to_string();
    // Tiny temperatures are greedy (not a 500, not noise): the same text as temperature 0.
    for t in [1e-40, 1e-300] {
        let mut r = req.clone();
        r["temperature"] = json!(t);
        let (code, v) = s.post("/v1/completions", r.to_string()).await?;
        ensure!(code == 200 && v["choices"][0]["text"] == text.as_str(), "temperature {t}: {code} {v}");
    }
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (headers, events) = stream(&s, "/v1/completions", sreq).await?;
    ensure!(headers["content-type"].to_str()?.starts_with("text/event-stream"));
    let id = events[0]["id"].clone();
    ensure!(events.iter().all(|e| e["id"] == id && e["object"] == "text_completion" && e["model"] == "tiny"));
    let joined: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
    ensure!(joined == text, "streamed {joined:?}, whole {text:?}");
    let finishes: Vec<&Value> = events.iter().filter(|e| e["choices"][0]["finish_reason"].is_string()).collect();
    ensure!(finishes.len() == 1, "{events:?}");
    let last = events.last().context("no events")?;
    ensure!(last["choices"] == json!([]) && last["usage"]["completion_tokens"] == 12, "{last}");

    // Echo puts the prompt first.
    let mut ereq = req.clone();
    ereq["echo"] = json!(true);
    let (_, echoed) = s.post("/v1/completions", ereq.to_string()).await?;
    ensure!(echoed["choices"][0]["text"] == format!("The capital of France is{text}"));

    // Chat, whole and streamed: role first, then content deltas, then the finish.
    let chat = json!({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                      "max_tokens": 6, "temperature": 0});
    let (code, whole) = s.post("/v1/chat/completions", chat.to_string()).await?;
    ensure!(
        code == 200 && whole["object"] == "chat.completion" && whole["choices"][0]["message"]["role"] == "assistant",
        "{whole}"
    );
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    let (_, events) = stream(&s, "/v1/chat/completions", schat).await?;
    ensure!(events[0]["choices"][0]["delta"] == json!({"role": "assistant", "content": ""}), "{}", events[0]);
    ensure!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));
    let content: String = events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
    ensure!(content == whole["choices"][0]["message"]["content"].as_str().unwrap_or("-"), "{content:?} vs {whole}");

    // Infill: the spans sit where the blanks were, at code-point offsets.
    let (code, fill) =
        s.post("/v1/infill", json!({"prompt": "Der [MASK] saß auf der [sMASK]. 你好 [gMASK]", "max_tokens": 4, "min_tokens": 2, "temperature": 0}).to_string()).await?;
    ensure!(code == 200 && fill["object"] == "infill", "{fill}");
    let filled: Vec<char> = fill["text"].as_str().context("text")?.chars().collect();
    let blanks = fill["blanks"].as_array().context("blanks")?;
    ensure!(blanks.len() == 3, "{fill}");
    for (b, mask) in blanks.iter().zip(["[MASK]", "[sMASK]", "[gMASK]"]) {
        let (start, end) = (b["start"].as_u64().context("start")? as usize, b["end"].as_u64().context("end")? as usize);
        let span: String = filled[start..end].iter().collect();
        ensure!(span == b["text"].as_str().unwrap_or("-") && b["mask"] == mask, "{b} in {fill}");
    }
    let text: String = filled.iter().collect();
    ensure!(text.starts_with("Der ") && text.contains(" saß auf der ") && text.contains(". 你好"), "{text}");
    // A completion with a suffix fills the blank between.
    let (code, sfx) = s
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "The", "suffix": " sat.", "max_tokens": 3, "temperature": 0}).to_string(),
        )
        .await?;
    ensure!(code == 200 && sfx["choices"][0]["text"].is_string(), "{sfx}");
    s.stop().await
}

/// The completions shape of logprobs, checked against the choice's text: `tokens` of them, each
/// with at most `top` alternatives, none likelier than the likeliest alternative.
fn check_completion_logprobs(lp: &Value, text: &str, tokens: usize, top: usize) -> Result<()> {
    let toks: Vec<&str> = lp["tokens"].as_array().context("tokens")?.iter().filter_map(Value::as_str).collect();
    let lps: Vec<f64> =
        lp["token_logprobs"].as_array().context("token_logprobs")?.iter().filter_map(Value::as_f64).collect();
    let tops = lp["top_logprobs"].as_array().context("top_logprobs")?;
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().context("text_offset")?.iter().filter_map(Value::as_u64).collect();
    ensure!([lps.len(), tops.len(), offsets.len(), toks.len()] == [tokens; 4], "{tokens} tokens: {lp}");
    for (i, l) in lps.iter().enumerate() {
        let alts = tops[i].as_object().context("top_logprobs entry")?;
        ensure!(*l <= 0.0 && !alts.is_empty() && alts.len() <= top, "token {i}: {lp}");
        let best = alts.values().filter_map(Value::as_f64).fold(f64::NEG_INFINITY, f64::max);
        ensure!(*l <= best + 1e-6, "token {i} at {l} is likelier than the likeliest alternative {best}");
    }
    // Unless a token is part of a character, the tokens spell the text and the offsets count it.
    if !toks.iter().any(|t| t.starts_with("bytes:")) {
        ensure!(toks.concat() == text, "tokens {toks:?} vs text {text:?}");
        let mut at = 0;
        for (t, &o) in toks.iter().zip(&offsets) {
            ensure!(o == at, "offset {o}, expected {at}: {lp}");
            at += t.chars().count() as u64;
        }
    }
    Ok(())
}

/// Every streamed chunk's logprobs lists, joined in order (completions shape).
fn joined_logprobs(events: &[Value]) -> Value {
    let mut out = json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for e in events {
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            if let (Some(add), Some(to)) = (e["choices"][0]["logprobs"][key].as_array(), out[key].as_array_mut()) {
                to.extend(add.iter().cloned());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_come_whole_and_streamed_in_openai_shapes() -> Result<()> {
    let s = Server::start(|o| o).await?;
    let req = json!({"model": "tiny", "prompt": "The capital of France is", "max_tokens": 10, "min_tokens": 10,
                     "temperature": 0, "logprobs": 3});
    let (code, whole) = s.post("/v1/completions", req.to_string()).await?;
    ensure!(code == 200, "{whole}");
    let text = whole["choices"][0]["text"].as_str().context("text")?;
    check_completion_logprobs(&whole["choices"][0]["logprobs"], text, 10, 3)?;
    // Asking for logprobs changes nothing else.
    let mut plain = req.clone();
    plain["logprobs"] = json!(null);
    let (_, p) = s.post("/v1/completions", plain.to_string()).await?;
    ensure!(p["choices"][0]["text"] == text && p["choices"][0]["logprobs"].is_null(), "{p}");
    // Streamed: each chunk carries its tokens' logprobs; together they are the whole ones.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (_, events) = stream(&s, "/v1/completions", sreq).await?;
    ensure!(joined_logprobs(&events) == whole["choices"][0]["logprobs"], "{events:?} vs {whole}");
    for e in &events {
        let c = &e["choices"][0];
        if c["finish_reason"].is_string() {
            ensure!(c["logprobs"].is_null(), "{e}");
        } else {
            ensure!(
                c["logprobs"]["tokens"].as_array().is_some_and(|t| !t.is_empty()),
                "a text chunk without tokens: {e}"
            );
        }
    }
    // Sampled, with logprobs = 0: the chosen tokens only, and the draw is the one without logprobs.
    let sampled = json!({"model": "tiny", "prompt": "Once", "max_tokens": 8, "min_tokens": 8, "temperature": 1.0,
                         "seed": 11, "logprobs": 0});
    let (_, a) = s.post("/v1/completions", sampled.to_string()).await?;
    let mut b = sampled.clone();
    b["logprobs"] = json!(null);
    let (_, b) = s.post("/v1/completions", b.to_string()).await?;
    ensure!(a["choices"][0]["text"] == b["choices"][0]["text"], "{a} vs {b}");
    let lp = &a["choices"][0]["logprobs"];
    ensure!(lp["tokens"].as_array().is_some_and(|t| t.len() == 8), "{a}");
    ensure!(lp["top_logprobs"].as_array().is_some_and(|t| t.iter().all(|e| e == &json!({}))), "{a}");
    // A suffix's blank: the blank's tokens.
    let sfx = json!({"model": "tiny", "prompt": "The", "suffix": " sat.", "max_tokens": 3, "min_tokens": 3,
                     "temperature": 0, "logprobs": 1});
    let (code, f) = s.post("/v1/completions", sfx.to_string()).await?;
    ensure!(code == 200, "{f}");
    check_completion_logprobs(&f["choices"][0]["logprobs"], f["choices"][0]["text"].as_str().unwrap_or(""), 3, 1)?;

    // Chat: {content: [{token, logprob, bytes, top_logprobs}]}, whole and streamed.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "min_tokens": 6,
                      "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (code, whole) = s.post("/v1/chat/completions", chat.to_string()).await?;
    ensure!(code == 200, "{whole}");
    let content = whole["choices"][0]["logprobs"]["content"].as_array().context("content")?;
    ensure!(content.len() == 6, "{whole}");
    for c in content {
        let bytes: Vec<u8> =
            c["bytes"].as_array().context("bytes")?.iter().filter_map(|b| b.as_u64()).map(|b| b as u8).collect();
        let token = c["token"].as_str().context("token")?;
        ensure!(token.starts_with("bytes:") || token.as_bytes() == bytes, "{c}");
        ensure!(c["logprob"].as_f64().is_some_and(|l| l <= 0.0), "{c}");
        let top = c["top_logprobs"].as_array().context("top_logprobs")?;
        ensure!(top.len() == 2 && top.iter().all(|t| t["token"].is_string() && t["bytes"].is_array()), "{c}");
        ensure!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64(), "{c}");
    }
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    let (_, events) = stream(&s, "/v1/chat/completions", schat).await?;
    let streamed: Vec<Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array())
        .flat_map(|c| c.iter().cloned())
        .collect();
    ensure!(streamed == *content, "streamed {streamed:?}");
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_over_limit_requests_get_json_errors() -> Result<()> {
    let s = Server::start(|o| Options { max_body_bytes: 4096, max_prompt_tokens: 50, ..o }).await?;
    let ok = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b.to_string()
    };
    let chat = |messages: Value| json!({"model": "tiny", "messages": messages}).to_string();
    let with_chat = |k: &str, v: Value| {
        let mut b = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2});
        b[k] = v;
        b.to_string()
    };
    let table: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{not json".into(), 400, "not valid JSON"),
        ("/v1/completions", "[1, 2]".into(), 400, "JSON object"),
        ("/v1/completions", "".into(), 400, "not valid JSON"),
        ("/v1/completions", json!({"prompt": "x"}).to_string(), 400, "model"),
        ("/v1/completions", with("model", json!("gpt-4")), 404, "does not exist"),
        ("/v1/completions", with("prompt", json!(null)), 400, "prompt is required"),
        ("/v1/completions", with("prompt", json!(7)), 400, "prompt must be a string"),
        ("/v1/completions", with("prompt", json!([1, 2, 3])), 400, "token ids"),
        ("/v1/completions", with("prompt", json!(vec!["a"; 65])), 400, "65 choices, over this server's limit of 64"),
        ("/v1/completions", with("prompt", json!(["a", 5])), 400, "token ids"),
        ("/v1/completions", with("prompt", json!(["a", null])), 400, "array of strings"),
        ("/v1/completions", with("prompt", json!(["a", "word ".repeat(80)])), 400, "prompt 1 has"),
        ("/v1/completions", with("prompt", json!("")), 400, "empty prompt"),
        ("/v1/completions", with("prompt", json!("word ".repeat(80))), 400, "over this server's limit"),
        ("/v1/completions", with("max_tokens", json!(-1)), 400, "max_tokens"),
        ("/v1/completions", with("max_tokens", json!(1.5)), 400, "max_tokens"),
        ("/v1/completions", with("max_tokens", json!(100_000_000)), 400, "limit"),
        ("/v1/completions", with("max_tokens", json!("5")), 400, "max_tokens"),
        ("/v1/completions", with("temperature", json!(3)), 400, "temperature"),
        ("/v1/completions", with("temperature", json!("hot")), 400, "temperature"),
        ("/v1/completions", with("top_p", json!(0)), 400, "top_p"),
        ("/v1/completions", with("top_p", json!(2)), 400, "top_p must be in (0, 1] (1: off), got 2"),
        ("/v1/completions", with("top_k", json!(-3)), 400, "top_k"),
        ("/v1/completions", with("seed", json!("x")), 400, "seed"),
        ("/v1/completions", with("stop", json!(["a", "b", "c", "d", "e"])), 400, "stop"),
        ("/v1/completions", with("stop", json!(5)), 400, "stop"),
        ("/v1/completions", with("n", json!(0)), 400, "n must be between 1 and 8"),
        ("/v1/completions", with("n", json!(100)), 400, "n must be between 1 and 8"),
        ("/v1/completions", with("best_of", json!(3)), 400, "best_of"),
        ("/v1/completions", with("logprobs", json!(21)), 400, "between 0 and 20"),
        ("/v1/completions", with("logprobs", json!(-1)), 400, "logprobs"),
        ("/v1/completions", with("logprobs", json!(true)), 400, "a count"),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "Hi", "echo": true, "logprobs": 1}).to_string(),
            400,
            "bidirectional",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).to_string(),
            400,
            "needs logprobs: true",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 30})
                .to_string(),
            400,
            "top_logprobs must be between 0 and 20",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": 3}).to_string(),
            400,
            "logprobs must be true or false",
        ),
        ("/v1/infill", json!({"prompt": "a [MASK]", "logprobs": 2}).to_string(), 400, "infill does not return logprobs"),
        ("/v1/chat/completions", with_chat("tools", json!([{"type": "function"}])), 400, "tool calls are not supported"),
        ("/v1/chat/completions", with_chat("tool_choice", json!("auto")), 400, "tool calls"),
        ("/v1/chat/completions", with_chat("functions", json!([{"name": "f"}])), 400, "function calls"),
        ("/v1/chat/completions", with_chat("response_format", json!({"type": "json_object"})), 400, "JSON mode"),
        ("/v1/chat/completions", with_chat("modalities", json!(["text", "audio"])), 400, "text modality"),
        ("/v1/chat/completions", with_chat("audio", json!({"voice": "x"})), 400, "audio"),
        ("/v1/completions", with("presence_penalty", json!(0.5)), 400, "presence_penalty"),
        ("/v1/completions", with("stream", json!("yes")), 400, "stream"),
        ("/v1/completions", with("min_tokens", json!(9)), 400, "min_tokens"),
        ("/v1/completions", format!("{{\"model\":\"tiny\",\"prompt\":\"{}\"}}", "a".repeat(5000)), 413, "limit"),
        (
            "/v1/completions",
            String::from_utf8_lossy(b"{\"model\":\"tiny\",\"prompt\":\"\xff\xfe\"}").into_owned(),
            200,
            "",
        ),
        ("/v1/chat/completions", chat(json!([])), 400, "empty"),
        ("/v1/chat/completions", chat(json!("hi")), 400, "messages"),
        ("/v1/chat/completions", chat(json!([{"role": "tool", "content": "x"}])), 400, "role"),
        ("/v1/chat/completions", chat(json!([{"role": "user"}])), 400, "content"),
        (
            "/v1/chat/completions",
            chat(json!([{"role": "user", "content": [{"type": "image_url"}]}])),
            400,
            "text parts",
        ),
        ("/v1/chat/completions", chat(json!([1])), 400, "object"),
        ("/v1/infill", json!({"prompt": "no blanks here"}).to_string(), 400, "no [MASK]"),
        ("/v1/infill", json!({"prompt": "[gMASK] then text"}).to_string(), 400, "[gMASK]"),
        ("/v1/infill", json!({"prompt": "a [MASK]", "stream": true}).to_string(), 400, "stream"),
        ("/v1/infill", json!({"max_tokens": 3}).to_string(), 400, "prompt"),
        ("/v1/infill", json!({"prompt": "a [MASK]", "n": 2}).to_string(), 400, "n must be 1"),
        ("/v1/nothing", "{}".into(), 404, "no route"),
    ];
    for (path, body, code, msg) in &table {
        let (got, v) = s.post(path, body.clone()).await?;
        ensure!(got == *code, "{path} {body:.80}: {got} (wanted {code}): {v}");
        if *code != 200 {
            let m = v["error"]["message"].as_str().context("error.message")?;
            ensure!(m.contains(msg) && v["error"]["type"].is_string(), "{path} {body:.80}: {m:?} lacks {msg:?}");
        }
    }
    // Raw bytes that are not UTF-8 at all.
    let (code, v) = s.post("/v1/completions", b"\xff\xfe\x00garbage".to_vec()).await?;
    ensure!(code == 400 && v["error"]["message"].is_string());
    // Wrong method, unknown route.
    let r = reqwest::Client::new().get(format!("{}/v1/completions", s.base)).send().await?;
    ensure!(r.status() == 405 && r.json::<Value>().await?["error"]["message"].is_string());
    let (code, _) = s.get("/nope").await?;
    ensure!(code == 404);
    // The server still answers after all that, and the "off" values of refused features pass.
    let (code, _) = s.post("/v1/completions", ok.to_string()).await?;
    ensure!(code == 200);
    let off = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "tools": [],
                     "tool_choice": "none", "response_format": {"type": "text"}, "modalities": ["text"], "logprobs": false});
    let (code, v) = s.post("/v1/chat/completions", off.to_string()).await?;
    ensure!(code == 200, "{v}");
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_v1_only() -> Result<()> {
    let s = Server::start(|o| Options { api_key: Some("sekret".into()), ..o }).await?;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/models", s.base);
    ensure!(c.get(&url).send().await?.status() == 401);
    let wrong = c.get(&url).bearer_auth("nope").send().await?;
    ensure!(wrong.status() == 401 && wrong.json::<Value>().await?["error"]["type"] == "authentication_error");
    ensure!(c.get(&url).bearer_auth("sekret").send().await?.status() == 200);
    // Exactly `Bearer <key>`: spaces inside are part of the key (a trailing one never reaches the
    // server: HTTP strips a field value's surrounding whitespace, RFC 9110 5.5); a header that is
    // not ASCII or not Bearer is named as such, not as missing.
    let msg = |r: reqwest::Response| async move {
        let code = r.status().as_u16();
        Ok::<_, anyhow::Error>((code, r.json::<Value>().await?["error"]["message"].as_str().unwrap_or("").to_string()))
    };
    let (code, m) = msg(c.get(&url).header("Authorization", "Bearer  sekret").send().await?).await?;
    ensure!(code == 401 && m == "incorrect API key", "{code} {m}");
    let latin1 = reqwest::header::HeaderValue::from_bytes(b"Bearer s\xe9kret")?;
    let (code, m) = msg(c.get(&url).header("Authorization", latin1).send().await?).await?;
    ensure!(code == 401 && m.contains("not ASCII"), "{code} {m}");
    let (code, m) = msg(c.get(&url).header("Authorization", "Basic c2VrcmV0").send().await?).await?;
    ensure!(code == 401 && m.contains("must be Bearer"), "{code} {m}");
    let (code, _) = s.get("/health").await?;
    ensure!(code == 200);
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_with_retry_after_and_time_limits_answer_504() -> Result<()> {
    let s = Server::start(|o| Options { max_batch: 1, queue: 1, ..o }).await?;
    let body =
        json!({"model": "tiny", "prompt": "Hello", "max_tokens": 200, "min_tokens": 200, "temperature": 0}).to_string();
    let c = reqwest::Client::new();
    let sends = (0..6).map(|_| c.post(format!("{}/v1/completions", s.base)).body(body.clone()).send());
    let answers = futures_util::future::join_all(sends).await;
    let mut codes = Vec::new();
    for a in answers {
        let a = a?;
        if a.status() == 429 {
            ensure!(a
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.parse::<u64>().is_ok()));
            ensure!(a.json::<Value>().await?["error"]["code"] == "queue_full");
            codes.push(429);
        } else {
            codes.push(a.status().as_u16());
        }
    }
    ensure!(codes.contains(&429) && codes.contains(&200), "{codes:?}");
    s.stop().await?;

    let s = Server::start(|o| Options { request_timeout: Duration::from_millis(20), ..o }).await?;
    let t = Instant::now();
    let (code, v) = s
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "Hi", "max_tokens": 256, "min_tokens": 256}).to_string(),
        )
        .await?;
    ensure!(code == 504 && v["error"]["code"] == "timeout", "{code} {v}");
    ensure!(t.elapsed() < Duration::from_secs(10));
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_work() -> Result<()> {
    let s = Server::start(|o| o).await?;
    let body = json!({"model": "tiny", "prompt": "Hello", "max_tokens": 256, "min_tokens": 256, "stream": true});
    for streaming in [true, false] {
        let mut b = body.clone();
        b["stream"] = json!(streaming);
        let before = s.metric("glm_requests_cancelled_total").await?;
        let c = reqwest::Client::new();
        let req = c.post(format!("{}/v1/completions", s.base)).body(b.to_string()).send();
        // Give up on the request mid-way: the future (and its connection) is dropped.
        let _ = tokio::time::timeout(Duration::from_millis(150), async {
            let r = req.await?;
            let mut st = r.bytes_stream();
            use futures_util::StreamExt;
            while st.next().await.is_some() {}
            Ok::<_, reqwest::Error>(())
        })
        .await;
        drop(c);
        let t = Instant::now();
        loop {
            let cancelled = s.metric("glm_requests_cancelled_total").await?;
            let running = s.metric("glm_running_requests").await?;
            if cancelled > before && running == 0.0 {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "streaming {streaming}: not cancelled ({cancelled}, {running} running)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_the_text_they_get_alone() -> Result<()> {
    let s = Server::start(|o| o).await?;
    let prompts = ["The quick brown fox", "一个简单的句子", "Once upon a time", "A", "Rust is", "Paris"];
    let body = |p: &str, seed: Option<u64>| {
        let mut b = json!({"model": "tiny", "prompt": p, "max_tokens": 16, "min_tokens": 16, "temperature": 0});
        if let Some(seed) = seed {
            b["temperature"] = json!(1.0);
            b["seed"] = json!(seed);
        }
        b.to_string()
    };
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (code, v) = s.post("/v1/completions", body(p, (i % 2 == 1).then_some(i as u64))).await?;
        ensure!(code == 200);
        alone.push(v["choices"][0]["text"].clone());
    }
    let together = futures_util::future::join_all(
        prompts.iter().enumerate().map(|(i, p)| s.post("/v1/completions", body(p, (i % 2 == 1).then_some(i as u64)))),
    )
    .await;
    for (i, (r, a)) in together.into_iter().zip(&alone).enumerate() {
        let (_, v) = r?;
        ensure!(v["choices"][0]["text"] == *a, "prompt {i}: {} together, {a} alone", v["choices"][0]["text"]);
    }
    let rows = s.metric("glm_decode_rows_total").await?;
    let steps = s.metric("glm_decode_steps_total").await?;
    ensure!(rows > steps * 1.2, "no batching happened: {rows} rows in {steps} steps");
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_the_requests_with_seeds_seed_plus_i() -> Result<()> {
    let s = Server::start(|o| o).await?;
    let req = |n: usize, seed: u64| {
        json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 10, "min_tokens": 10, "temperature": 1.0,
               "seed": seed, "n": n})
    };
    let (code, three) = s.post("/v1/completions", req(3, 40).to_string()).await?;
    ensure!(code == 200, "{three}");
    let choices = three["choices"].as_array().context("choices")?;
    ensure!(choices.len() == 3 && three["usage"]["completion_tokens"] == 30, "{three}");
    for (i, c) in choices.iter().enumerate() {
        ensure!(c["index"] == i);
        let (_, one) = s.post("/v1/completions", req(1, 40 + i as u64).to_string()).await?;
        ensure!(c["text"] == one["choices"][0]["text"], "choice {i}: {c} vs {one}");
    }
    // Streamed, the choices interleave by index and add up to the same texts; one [DONE] at the end.
    let mut sreq = req(3, 40);
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (_, events) = stream(&s, "/v1/completions", sreq).await?;
    for (i, c) in choices.iter().enumerate() {
        let mine: Vec<&Value> = events.iter().filter(|e| e["choices"][0]["index"] == i).collect();
        let text: String = mine.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
        ensure!(json!(text) == c["text"], "choice {i} streamed {text:?}");
        ensure!(mine.iter().filter(|e| e["choices"][0]["finish_reason"].is_string()).count() == 1);
    }
    ensure!(events.last().is_some_and(|e| e["usage"]["completion_tokens"] == 30));
    // A batch of prompts: choice k is prompt k / n with seed + k % n, whole and streamed; usage
    // counts each prompt once.
    let batch = |stream: bool| {
        json!({"model": "tiny", "prompt": ["Once upon a time", "The weather today"], "max_tokens": 6, "min_tokens": 6,
               "temperature": 1.0, "seed": 5, "n": 2, "stream": stream, "stream_options": {"include_usage": true}})
    };
    let (code, whole) = s.post("/v1/completions", batch(false).to_string()).await?;
    ensure!(code == 200, "{whole}");
    let choices = whole["choices"].as_array().context("choices")?;
    ensure!(choices.len() == 4 && whole["usage"]["completion_tokens"] == 24, "{whole}");
    let mut prompt_tokens = 0;
    for (k, c) in choices.iter().enumerate() {
        let prompt = ["Once upon a time", "The weather today"][k / 2];
        let one = json!({"model": "tiny", "prompt": prompt, "max_tokens": 6, "min_tokens": 6, "temperature": 1.0,
                         "seed": 5 + (k % 2) as u64});
        let (_, one) = s.post("/v1/completions", one.to_string()).await?;
        ensure!(c["index"] == k && c["text"] == one["choices"][0]["text"], "choice {k}: {c} vs {one}");
        if k % 2 == 0 {
            prompt_tokens += one["usage"]["prompt_tokens"].as_u64().context("usage")?;
        }
    }
    ensure!(whole["usage"]["prompt_tokens"] == prompt_tokens, "{whole}: prompt tokens {prompt_tokens}");
    let (_, events) = stream(&s, "/v1/completions", batch(true)).await?;
    for (k, c) in choices.iter().enumerate() {
        let text: String = events
            .iter()
            .filter(|e| e["choices"][0]["index"] == k)
            .filter_map(|e| e["choices"][0]["text"].as_str())
            .collect();
        ensure!(json!(text) == c["text"], "streamed choice {k}: {text:?}");
    }
    ensure!(events
        .last()
        .is_some_and(|e| e["usage"]["prompt_tokens"] == prompt_tokens && e["usage"]["completion_tokens"] == 24));
    // Chat with n = 2: a role chunk per choice.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2, "stream": true});
    let (_, events) = stream(&s, "/v1/chat/completions", chat).await?;
    let roles = events.iter().filter(|e| e["choices"][0]["delta"]["role"] == "assistant").count();
    ensure!(roles == 2, "{events:?}");
    s.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_streaming_clients_for_a_fixed_time_see_no_errors() -> Result<()> {
    let s = Server::start(|o| o).await?;
    let o = LoadOptions {
        base: s.base.clone(),
        api_key: None,
        model: "tiny".into(),
        streams: 8,
        duration: Duration::from_secs(4),
        max_tokens: 24,
        prompts: vec!["Hello".into(), "你好，世界".into(), "The weather today".into()],
    };
    let r = loadgen::run(&o).await;
    ensure!(r.errors == 0, "{} of {} failed: {:?}", r.errors, r.requests, r.first_error);
    ensure!(r.requests >= 8 && r.tokens == 24 * r.requests as u64, "{r:?}");
    let (_, m) = s.get("/metrics").await?;
    ensure!(m.contains("glm_requests_total{endpoint=\"completions\",status=\"200\"}"), "{m}");
    s.stop().await
}
