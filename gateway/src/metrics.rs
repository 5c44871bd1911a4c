//! Every metric the gateway exports, defined once with its help text; names share `switchyard_`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The metrics an engine reports from its own thread (cheap clones of the registered ones).
#[derive(Clone)]
pub struct EngineMetrics {
    pub batch_size: Histogram,
    pub queue_depth: IntGauge,
    /// Bytes of keys and values the prefix cache holds.
    pub prefix_cache_bytes: IntGauge,
    /// Time to compile a grammar (JSON schema, regex, choice) not in the grammar cache.
    pub grammar_compile_seconds: Histogram,
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub active_generations: IntGauge,
    pub prompt_tokens: IntCounterVec,
    pub completion_tokens: IntCounterVec,
    pub cached_prompt_tokens: IntCounterVec,
    /// By `adapter`: the version that served (`name@version`, empty for the base).
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: Histogram,
    pub rejected_concurrency: IntCounterVec,
    /// Adapter cache events: `hit`, `miss`, `eviction`.
    pub adapter_cache: IntCounterVec,
    pub adapter_load_seconds: Histogram,
    pub auth_failures: IntCounterVec,
    pub redis_errors: IntCounterVec,
    /// Inputs embedded, by model (their tokens count in `prompt_tokens`).
    pub embedding_inputs: IntCounterVec,
    /// Inputs in each forward of the embedding batcher (several requests' when merged).
    pub embedding_batch_size: Histogram,
    /// Application task requests (`classify`, `qa`, `generate`, `recommend`, `search`, and
    /// `knowledge` for document ingestion), by outcome (`ok`, `error`, `ingested`, and Q&A's
    /// `not_in_documents`).
    pub task_requests: IntCounterVec,
    pub task_duration: HistogramVec,
    /// Shadow generations by outcome: `compared`, `skipped` (no spare capacity at the start),
    /// `dropped` (load rose while it ran), `failed`.
    pub shadow_requests: IntCounterVec,
    pub engine: EngineMetrics,
    /// Each adapter version's recent requests, errors and first-token times: release evidence.
    pub served: crate::releases::ServedStats,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "switchyard_requests_total",
                "HTTP requests answered, by route, status, and the model and adapter version they resolved to",
            ),
            &["route", "status", "model", "adapter"],
        )
        .expect("metric definition is valid");
        let request_duration = HistogramVec::new(
            HistogramOpts::new("switchyard_request_duration_seconds", "Time from request to the end of the response")
                .buckets(vec![0.001, 0.005, 0.02, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
            &["route"],
        )
        .expect("metric definition is valid");
        let active_generations =
            IntGauge::new("switchyard_active_generations", "Generations admitted and not yet finished or cancelled")
                .expect("metric definition is valid");
        let prompt_tokens = IntCounterVec::new(
            Opts::new(
                "switchyard_prompt_tokens_total",
                "Prompt tokens processed, by model and the adapter version that served",
            ),
            &["model", "adapter"],
        )
        .expect("metric definition is valid");
        let completion_tokens = IntCounterVec::new(
            Opts::new(
                "switchyard_completion_tokens_total",
                "Completion tokens generated, by model and the adapter version that served",
            ),
            &["model", "adapter"],
        )
        .expect("metric definition is valid");
        let cached_prompt_tokens = IntCounterVec::new(
            Opts::new(
                "switchyard_cached_prompt_tokens_total",
                "Prompt tokens served from the prefix cache instead of computed, by model and adapter version",
            ),
            &["model", "adapter"],
        )
        .expect("metric definition is valid");
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_time_to_first_token_seconds",
                "Time from admission to the first generated text, by the adapter version that served",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["adapter"],
        )
        .expect("metric definition is valid");
        let inter_token_latency = Histogram::with_opts(
            HistogramOpts::new("switchyard_inter_token_latency_seconds", "Time between consecutive streamed deltas")
                .buckets(vec![0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )
        .expect("metric definition is valid");
        let rejected_concurrency = IntCounterVec::new(
            Opts::new(
                "switchyard_rejected_total",
                "Requests refused before generation, by reason (concurrency, requests, tokens, streams)",
            ),
            &["reason"],
        )
        .expect("metric definition is valid");
        let adapter_cache = IntCounterVec::new(
            Opts::new(
                "switchyard_adapter_cache_total",
                "Adapter cache lookups and evictions, by event (hit, miss, eviction)",
            ),
            &["event"],
        )
        .expect("metric definition is valid");
        let adapter_load_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_adapter_load_seconds",
                "Time to load an adapter version from disk into memory",
            )
            .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )
        .expect("metric definition is valid");
        let auth_failures = IntCounterVec::new(
            Opts::new("switchyard_auth_failures_total", "Requests refused by authentication, by reason"),
            &["reason"],
        )
        .expect("metric definition is valid");
        let redis_errors = IntCounterVec::new(
            Opts::new("switchyard_redis_errors_total", "Redis calls that failed or timed out, by operation"),
            &["op"],
        )
        .expect("metric definition is valid");
        let embedding_inputs = IntCounterVec::new(
            Opts::new(
                "switchyard_embedding_inputs_total",
                "Inputs (texts or token lists) embedded, by model; their tokens count in switchyard_prompt_tokens_total",
            ),
            &["model"],
        )
        .expect("metric definition is valid");
        let embedding_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_embedding_batch_size",
                "Inputs in each forward of the embedding batcher, concurrent requests merged",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 2048.0]),
        )
        .expect("metric definition is valid");
        let task_requests = IntCounterVec::new(
            Opts::new("switchyard_task_requests_total", "Application task requests answered, by task and outcome"),
            &["task", "outcome"],
        )
        .expect("metric definition is valid");
        let task_duration = HistogramVec::new(
            HistogramOpts::new("switchyard_task_duration_seconds", "Time an application task took, by task")
                .buckets(vec![0.001, 0.005, 0.02, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
            &["task"],
        )
        .expect("metric definition is valid");
        let shadow_requests = IntCounterVec::new(
            Opts::new(
                "switchyard_shadow_requests_total",
                "Shadow generations, by outcome (compared, skipped under load, dropped under load, failed)",
            ),
            &["outcome"],
        )
        .expect("metric definition is valid");
        let engine = EngineMetrics {
            batch_size: Histogram::with_opts(
                HistogramOpts::new("switchyard_batch_size", "Sequences in each decode step of the engine")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            )
            .expect("metric definition is valid"),
            queue_depth: IntGauge::new(
                "switchyard_queue_depth",
                "Admitted requests waiting for their prompt to be processed",
            )
            .expect("metric definition is valid"),
            prefix_cache_bytes: IntGauge::new(
                "switchyard_prefix_cache_bytes",
                "Bytes of prompt keys and values the prefix cache holds",
            )
            .expect("metric definition is valid"),
            grammar_compile_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "switchyard_grammar_compile_seconds",
                    "Time to compile a structured-output grammar that was not cached",
                )
                .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )
            .expect("metric definition is valid"),
        };
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(active_generations.clone()),
            Box::new(prompt_tokens.clone()),
            Box::new(completion_tokens.clone()),
            Box::new(cached_prompt_tokens.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(inter_token_latency.clone()),
            Box::new(rejected_concurrency.clone()),
            Box::new(adapter_cache.clone()),
            Box::new(adapter_load_seconds.clone()),
            Box::new(auth_failures.clone()),
            Box::new(redis_errors.clone()),
            Box::new(embedding_inputs.clone()),
            Box::new(embedding_batch_size.clone()),
            Box::new(task_requests.clone()),
            Box::new(task_duration.clone()),
            Box::new(shadow_requests.clone()),
            Box::new(engine.batch_size.clone()),
            Box::new(engine.queue_depth.clone()),
            Box::new(engine.prefix_cache_bytes.clone()),
            Box::new(engine.grammar_compile_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            request_duration,
            active_generations,
            prompt_tokens,
            completion_tokens,
            cached_prompt_tokens,
            time_to_first_token,
            inter_token_latency,
            rejected_concurrency,
            adapter_cache,
            adapter_load_seconds,
            auth_failures,
            redis_errors,
            embedding_inputs,
            embedding_batch_size,
            task_requests,
            task_duration,
            shadow_requests,
            engine,
            served: Default::default(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
