//! The OpenAI request bodies, read field by field so that every bad value gets a 400 naming its
//! parameter (never a panic), and the error body OpenAI clients expect.

use glm_infer::batch::Task;
use glm_infer::{SamplingConfig, StopReason};
use serde_json::{json, Map, Value};

/// An error as OpenAI writes it: `{"error": {"message", "type", "param", "code"}}` with a status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, message: message.into(), param: None, code: None }
    }

    /// A 400 about parameter `param`.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.into()), ..Self::new(400, "invalid_request_error", message) }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// Which endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
    Infill,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
            Endpoint::Infill => "infill",
        }
    }
}

/// What the server allows a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most `max_tokens` (per blank for infill); also chat's default.
    pub max_tokens: usize,
    /// Most choices (`n`) per request.
    pub max_n: usize,
    /// Most choices over all prompts (prompts x n) per request: the queue's size.
    pub max_choices: usize,
    /// How chat messages become a prompt (the model's own format).
    pub chat_template: glm_infer::ChatTemplate,
}

/// A request read and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub model: Option<String>,
    /// One per prompt (completions take a list); choice k is generated from tasks[k / n].
    pub tasks: Vec<Task>,
    pub sampling: SamplingConfig,
    /// Choices: choice i is generated with seed + i.
    pub n: usize,
    /// `seed` was given (otherwise the server draws one).
    pub seeded: bool,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions: put the prompt before the text.
    pub echo: bool,
    /// Completions with `suffix`: the blank between prompt and suffix is what is returned.
    pub suffix: bool,
    /// Some(k): each token's log-probability with its k likeliest alternatives.
    pub logprobs: Option<usize>,
}

/// Reads `body` for `endpoint`.
pub fn parse(endpoint: Endpoint, body: &[u8], limits: &Limits) -> Result<Parsed, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(400, "invalid_request_error", format!("the body is not valid JSON: {e}")).code("invalid_json")
    })?;
    let Value::Object(o) = v else {
        return Err(ApiError::new(400, "invalid_request_error", "the body must be a JSON object"));
    };
    let r = Reader { o: &o };
    let model = r.string("model")?;
    if endpoint != Endpoint::Infill && model.is_none() {
        return Err(ApiError::param("model", "you must provide a model parameter"));
    }
    let n = r.count("n")?.unwrap_or(1);
    if !(1..=limits.max_n).contains(&n) {
        return Err(ApiError::param(
            "n",
            format!("n must be between 1 and {} (the server's batch size)", limits.max_n),
        ));
    }
    if endpoint == Endpoint::Infill && n != 1 {
        return Err(ApiError::param("n", "infill returns one filling: n must be 1"));
    }
    if r.count("best_of")?.is_some_and(|b| b != n) {
        return Err(ApiError::param("best_of", "best_of is not supported (only best_of = n)"));
    }
    let logprobs = r.logprobs(endpoint)?;
    for name in ["presence_penalty", "frequency_penalty"] {
        if r.number(name)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::param(name, format!("{name} is not supported (only 0)")));
        }
    }
    if o.get("logit_bias").is_some_and(|b| !(b.is_null() || b.as_object().is_some_and(Map::is_empty))) {
        return Err(ApiError::param("logit_bias", "logit_bias is not supported"));
    }
    r.refuse_unsupported()?;
    let stream = r.bool("stream")?.unwrap_or(false);
    if stream && endpoint == Endpoint::Infill {
        return Err(ApiError::param("stream", "infill does not stream; leave stream unset"));
    }
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => Reader { o: so }.bool("include_usage")?.unwrap_or(false),
        Some(_) => return Err(ApiError::param("stream_options", "stream_options must be an object")),
    };

    let default_max = match endpoint {
        Endpoint::Completions => 16,
        Endpoint::Chat => limits.max_tokens,
        Endpoint::Infill => 32.min(limits.max_tokens),
    };
    let (max_name, max_tokens) = match (r.count("max_tokens")?, r.count("max_completion_tokens")?) {
        (Some(n), _) => ("max_tokens", n),
        (None, Some(n)) if endpoint == Endpoint::Chat => ("max_completion_tokens", n),
        _ => ("max_tokens", default_max),
    };
    if max_tokens > limits.max_tokens {
        return Err(ApiError::param(
            max_name,
            format!("{max_name} = {max_tokens} is over this server's limit of {}", limits.max_tokens),
        ));
    }
    let min_tokens = r.count("min_tokens")?.unwrap_or(0);
    if min_tokens > max_tokens {
        return Err(ApiError::param("min_tokens", format!("min_tokens {min_tokens} > {max_name} {max_tokens}")));
    }
    let temperature = r.number("temperature")?.unwrap_or(1.0);
    let top_p = r.number("top_p")?.unwrap_or(1.0);
    // The checks `glm generate` makes too, with the same messages (each names its parameter first).
    let top_p = glm_infer::sampling::check_user_params(temperature, top_p).map_err(|e| {
        let msg = match e {
            glm_infer::Error::Sampling(m) => m,
            other => other.to_string(),
        };
        ApiError::param(if msg.starts_with("temperature") { "temperature" } else { "top_p" }, msg)
    })?;
    let top_k = r.count("top_k")?.unwrap_or(0);
    let seed = match o.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => match (v.as_i64(), v.as_u64()) {
            (Some(i), _) => Some(i as u64),
            (_, Some(u)) => Some(u),
            _ => return Err(ApiError::param("seed", "seed must be an integer")),
        },
    };
    let stops = r.stops()?;
    let echo = r.bool("echo")?.unwrap_or(false);
    if echo && endpoint != Endpoint::Completions {
        return Err(ApiError::param("echo", "echo is for /v1/completions"));
    }
    if echo && logprobs.is_some() {
        return Err(ApiError::param(
            "echo",
            "echo with logprobs is not supported: a GLM prompt is a bidirectional context, so its tokens have no \
             left-to-right log-probabilities (score texts with `glm eval`)",
        ));
    }

    let (tasks, suffix) = match endpoint {
        Endpoint::Completions => {
            let prompts = r.prompts()?;
            if prompts.len() * n > limits.max_choices {
                return Err(ApiError::param(
                    "prompt",
                    format!(
                        "{} prompts x n = {n} is {} choices, over this server's limit of {} per request",
                        prompts.len(),
                        prompts.len() * n,
                        limits.max_choices
                    ),
                ));
            }
            match r.string("suffix")? {
                Some(suffix) if !suffix.is_empty() => {
                    if echo {
                        return Err(ApiError::param("echo", "echo cannot be combined with suffix"));
                    }
                    (prompts.into_iter().map(|p| Task::Fill { text: format!("{p}[MASK]{suffix}") }).collect(), true)
                }
                _ => (prompts.into_iter().map(|prompt| Task::Complete { prompt }).collect(), false),
            }
        }
        Endpoint::Chat => (vec![Task::Complete { prompt: r.messages(limits.chat_template)? }], false),
        Endpoint::Infill => {
            let text = r.string("prompt")?.ok_or_else(|| ApiError::param("prompt", "prompt (a string) is required"))?;
            if !stops.is_empty() {
                return Err(ApiError::param("stop", "infill takes no stop strings"));
            }
            (vec![Task::Fill { text }], false)
        }
    };
    if suffix && !stops.is_empty() {
        return Err(ApiError::param("stop", "stop strings cannot be combined with suffix"));
    }
    let sampling = SamplingConfig {
        temperature,
        top_k,
        top_p,
        seed: seed.unwrap_or(0),
        max_new_tokens: max_tokens,
        min_new_tokens: min_tokens,
    };
    let mut stops = stops;
    if endpoint == Endpoint::Chat {
        stops.push(glm_infer::CHAT_STOP.to_string());
    }
    Ok(Parsed {
        model,
        tasks,
        sampling,
        n,
        seeded: seed.is_some(),
        stops,
        stream,
        include_usage,
        echo,
        suffix,
        logprobs,
    })
}

/// OpenAI's finish_reason for why a block stopped.
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eop | StopReason::Eod | StopReason::StopString => "stop",
        StopReason::MaxNewTokens | StopReason::MaxSeqLen => "length",
    }
}

/// Typed access to the body's fields; null counts as absent.
struct Reader<'a> {
    o: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.o.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::param(name, format!("{name} must be a string"))),
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::param(name, format!("{name} must be true or false"))),
        }
    }

    fn number(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(ApiError::param(name, format!("{name} must be a number"))),
            },
        }
    }

    /// A non-negative integer (a whole float such as 5.0 is taken too).
    fn count(&self, name: &str) -> Result<Option<usize>, ApiError> {
        let bad = || ApiError::param(name, format!("{name} must be an integer >= 0"));
        match self.get(name) {
            None => Ok(None),
            Some(v) => match (v.as_u64(), v.as_f64()) {
                (Some(u), _) => usize::try_from(u).map(Some).map_err(|_| bad()),
                (None, Some(f)) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(Some(f as usize)),
                _ => Err(bad()),
            },
        }
    }

    /// Fields that would change what the answer means, which this server cannot honour: a 400
    /// rather than an answer that silently ignores them. Their "off" values pass.
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        let off = |name: &str, v: &Value| match (name, v) {
            ("tools" | "functions", Value::Array(a)) => a.is_empty(),
            ("tool_choice" | "function_call", Value::String(s)) => s == "none",
            ("response_format", Value::Object(f)) => f.get("type").and_then(Value::as_str) == Some("text"),
            ("modalities", Value::Array(m)) => m.iter().all(|x| x == "text"),
            _ => false,
        };
        for (name, why) in [
            ("tools", "tool calls are not supported (GLM-130B and ChatGLM-6B were not trained for them)"),
            ("tool_choice", "tool calls are not supported"),
            ("functions", "function calls are not supported"),
            ("function_call", "function calls are not supported"),
            ("response_format", "only response_format {\"type\": \"text\"} is supported (no JSON mode)"),
            ("modalities", "only the text modality is supported"),
            ("audio", "audio output is not supported"),
        ] {
            if self.get(name).is_some_and(|v| !off(name, v)) {
                return Err(ApiError::param(name, why));
            }
        }
        Ok(())
    }

    /// Completions: `logprobs` = k alternatives (0..=20). Chat: `logprobs` true, with
    /// `top_logprobs` = k (0..=20).
    fn logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
        let most = glm_infer::logprobs::MAX_TOP_LOGPROBS;
        let within = |name: &str, k: usize| match k <= most {
            true => Ok(k),
            false => Err(ApiError::param(name, format!("{name} must be between 0 and {most}, got {k}"))),
        };
        match endpoint {
            Endpoint::Completions => match self.get("logprobs") {
                None | Some(Value::Bool(false)) => Ok(None),
                Some(Value::Bool(true)) => {
                    Err(ApiError::param("logprobs", format!("logprobs on /v1/completions is a count (0 to {most})")))
                }
                Some(_) => Ok(Some(within("logprobs", self.count("logprobs")?.unwrap_or(0))?)),
            },
            Endpoint::Chat => {
                let top = self.count("top_logprobs")?;
                match (self.bool("logprobs")?.unwrap_or(false), top) {
                    (true, k) => Ok(Some(within("top_logprobs", k.unwrap_or(0))?)),
                    (false, Some(_)) => Err(ApiError::param("top_logprobs", "top_logprobs needs logprobs: true")),
                    (false, None) => Ok(None),
                }
            }
            Endpoint::Infill => match self.get("logprobs") {
                None | Some(Value::Bool(false)) => Ok(None),
                Some(_) => Err(ApiError::param("logprobs", "infill does not return logprobs")),
            },
        }
    }

    fn stops(&self) -> Result<Vec<String>, ApiError> {
        let bad = || ApiError::param("stop", "stop must be a string or an array of up to 4 strings");
        let stops = match self.get("stop") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.len() <= 4 => {
                a.iter().map(|s| s.as_str().map(str::to_string).ok_or_else(bad)).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(bad()),
        };
        Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// A string, or an array of strings (a batch of prompts).
    fn prompts(&self) -> Result<Vec<String>, ApiError> {
        match self.get("prompt") {
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) if a.is_empty() => Err(ApiError::param("prompt", "prompt is an empty array")),
            Some(Value::Array(a)) => a
                .iter()
                .map(|p| match p {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(_) | Value::Array(_) => {
                        Err(ApiError::param("prompt", "prompts as token ids are not supported; send text"))
                    }
                    _ => Err(ApiError::param("prompt", "prompt must be a string or an array of strings")),
                })
                .collect(),
            None => Err(ApiError::param("prompt", "prompt is required")),
            Some(_) => Err(ApiError::param("prompt", "prompt must be a string")),
        }
    }

    /// The conversation as one prompt in the model's chat format.
    fn messages(&self, template: glm_infer::ChatTemplate) -> Result<String, ApiError> {
        let Some(Value::Array(msgs)) = self.get("messages") else {
            return Err(ApiError::param("messages", "messages must be an array of {role, content}"));
        };
        if msgs.is_empty() {
            return Err(ApiError::param("messages", "messages is empty"));
        }
        let mut turns = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let at = format!("messages[{i}]");
            let Value::Object(m) = m else { return Err(ApiError::param(&at, format!("{at} must be an object"))) };
            let role = match m.get("role").and_then(Value::as_str) {
                Some(r @ ("system" | "developer" | "user" | "assistant")) => r,
                Some(r) => return Err(ApiError::param(&at, format!("{at}.role {r:?} is not supported"))),
                None => return Err(ApiError::param(&at, format!("{at}.role is required"))),
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(ApiError::param(&at, format!("{at}.content: only text parts are supported"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                _ => return Err(ApiError::param(&at, format!("{at}.content must be a string"))),
            };
            turns.push((if role == "developer" { "system" } else { role }, content));
        }
        Ok(template.prompt(turns.iter().map(|(r, c)| (*r, c.as_str()))))
    }
}
