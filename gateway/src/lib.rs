//! Switchyard's gateway: the only crate that speaks HTTP and the OpenAI wire format.
//!
//! A request flows `server` (route, body limit) → `validate` (wire type into a typed
//! [`engine::GenerationRequest`]) → [`engine::Engine`] (a backend behind a trait: mistralrs today)
//! → `respond` (one JSON body or SSE events). Errors of every stage become [`error::ApiError`],
//! which alone turns them into HTTP answers in the OpenAI error shape.
//!
//! Main types: [`server::AppState`] (built once, shared by every worker), [`config::Settings`],
//! [`engine::Engine`]. This crate must never panic on client input, never answer a client
//! mistake with a 5xx, and never let a request wait without bound: past the concurrency limit
//! it answers 429.

pub mod adapter_cache;
pub mod admin;
pub mod answer;
pub mod auth;
pub mod config;
pub mod console;
pub mod embeddings;
pub mod engine;
pub mod error;
pub mod extract;
pub mod feedback;
pub mod feedback_api;
pub mod feedback_stream;
pub mod finetune_api;
pub mod labelling;
pub mod limits;
pub mod metrics;
pub mod middleware;
pub mod openai;
pub mod openapi_doc;
pub mod releases;
pub mod replicas;
pub mod respond;
pub mod responses;
pub mod routes;
pub mod server;
pub mod shadow;
pub mod state;
pub mod tasks;
pub mod validate;

/// Starts logging to stderr in the configured format; `RUST_LOG` overrides the level.
pub fn init_logging(format: config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,mistralrs_core=warn,mistralrs=warn,mistralrs_quant=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}
