//! Counters for `GET /metrics`, in Prometheus' text format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use glm_infer::batch::EngineStats;

/// A sum and a count, for a mean over time (Prometheus summary without quantiles).
#[derive(Default)]
pub struct Summary {
    /// Microseconds.
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Summary {
    pub fn observe(&self, seconds: f64) {
        self.sum_us.fetch_add((seconds * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Mean in seconds (None before the first observation).
    pub fn mean(&self) -> Option<f64> {
        let n = self.count.load(Relaxed);
        (n > 0).then(|| self.sum_us.load(Relaxed) as f64 / 1e6 / n as f64)
    }
}

#[derive(Default)]
pub struct Metrics {
    /// (endpoint, status) -> requests answered.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub time_to_first_token: Summary,
    pub request_duration: Summary,
    pub queue_depth: AtomicU64,
    /// 1 while the engine holds a request taken from the queue that waits for room in the batch.
    pub held: AtomicU64,
    pub queue_capacity: AtomicU64,
    pub running: AtomicU64,
    pub kv_reserved_bytes: AtomicU64,
    pub kv_budget_bytes: AtomicU64,
    pub max_batch: AtomicU64,
    engine: Mutex<EngineStats>,
    /// Why the tensor-parallel ranks are gone (the server answers 503), once they are.
    ranks_down: Mutex<Option<String>>,
}

impl Metrics {
    pub fn request(&self, endpoint: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint, status)).or_default() += 1;
        }
    }

    pub fn set_ranks_down(&self, why: &str) {
        if let Ok(mut d) = self.ranks_down.lock() {
            d.get_or_insert_with(|| why.to_string());
        }
    }

    pub fn ranks_down(&self) -> Option<String> {
        self.ranks_down.lock().ok().and_then(|d| d.clone())
    }

    pub fn engine(&self, stats: EngineStats, running: usize, reserved: u64) {
        if let Ok(mut e) = self.engine.lock() {
            *e = stats;
        }
        self.running.store(running as u64, Relaxed);
        self.kv_reserved_bytes.store(reserved, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, f64)>| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let requests: Vec<(String, f64)> = match self.requests.lock() {
            Ok(m) => m.iter().map(|((e, c), n)| (format!("{{endpoint=\"{e}\",status=\"{c}\"}}"), *n as f64)).collect(),
            Err(_) => vec![],
        };
        metric("glm_requests_total", "counter", "Requests answered, by endpoint and HTTP status.", requests);
        let one = |v: &AtomicU64| vec![(String::new(), v.load(Relaxed) as f64)];
        metric("glm_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", one(&self.prompt_tokens));
        metric("glm_generation_tokens_total", "counter", "Tokens generated.", one(&self.completion_tokens));
        for (name, help, sm) in [
            ("glm_time_to_first_token_seconds", "From request to its first token.", &self.time_to_first_token),
            ("glm_request_duration_seconds", "From request to its last token.", &self.request_duration),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} summary");
            let _ = writeln!(s, "{name}_sum {}", sm.sum_us.load(Relaxed) as f64 / 1e6);
            let _ = writeln!(s, "{name}_count {}", sm.count.load(Relaxed));
        }
        let mut gauge = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Relaxed));
        };
        gauge("glm_queue_depth", "Requests waiting for a place in the batch.", &self.queue_depth);
        gauge("glm_queue_capacity", "Requests that may wait before new ones get 429.", &self.queue_capacity);
        gauge("glm_running_requests", "Requests in the running batch.", &self.running);
        gauge("glm_max_batch", "Most requests decoding together.", &self.max_batch);
        gauge("glm_kv_cache_reserved_bytes", "KV cache reserved by running requests.", &self.kv_reserved_bytes);
        gauge("glm_kv_cache_budget_bytes", "KV cache the running requests may reserve.", &self.kv_budget_bytes);
        let e = self.engine.lock().map(|e| *e).unwrap_or_default();
        for (name, help, v) in [
            ("glm_decode_steps_total", "Batched decode steps.", e.decode_steps),
            ("glm_decode_rows_total", "Rows over all decode steps (mean batch = rows / steps).", e.batched_rows),
            ("glm_prefill_tokens_total", "Context tokens run by prefills.", e.prefill_tokens),
            (
                "glm_prefill_shared_total",
                "Blocks started from a copy of another's prefill (n choices).",
                e.shared_prefills,
            ),
            ("glm_requests_finished_total", "Requests the engine finished.", e.finished),
            ("glm_requests_failed_total", "Requests that ended in an error (time limit included).", e.failed),
            ("glm_requests_cancelled_total", "Requests dropped because the client left.", e.cancelled),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        s
    }
}
