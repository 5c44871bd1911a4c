//! The application endpoints: classification, templated generation, knowledge-base Q&A and
//! recommendation, and what they share. Every task answer is logged like a chat completion,
//! with the exact messages the endpoint sent the model, so `POST /v1/feedback` accepts its id
//! and the sidecar trains on corrections in the endpoint's own prompt format.

pub mod classify;
pub mod generate;
pub mod knowledge;
pub mod recommend;
pub mod templates;

use std::time::Instant;

use actix_web::web;

use crate::auth::Principal;
use crate::engine::{Message, Role};
use crate::error::ApiError;
use crate::respond::Served;
use crate::state::AppState;

/// Unix seconds now.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) use crate::feedback::messages_json;

pub(crate) fn message(role: Role, content: impl Into<String>) -> Message {
    Message { role, content: content.into() }
}

/// What a task answer is logged as: the id feedback names, the messages the model saw and
/// what it answered.
pub(crate) struct TaskAnswer<'a> {
    pub task: &'static str,
    pub id: &'a str,
    pub created: u64,
    pub served: &'a Served,
    pub messages: &'a [Message],
    pub answer: &'a str,
    pub params: serde_json::Value,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Logs a task answer that did not go through a `Running` generation (classification,
/// recommendation without a model, a Q&A answer the documents do not support).
pub(crate) fn log_answer(state: &AppState, caller: &Principal, a: TaskAnswer<'_>) {
    let mut params = a.params;
    if let Some(map) = params.as_object_mut() {
        map.insert("task".into(), a.task.into());
    }
    state.feedback.log_completion(protocol::CompletionRecord {
        id: a.id.to_owned(),
        created: a.created,
        tenant: caller.tenant.clone(),
        sub: caller.sub.clone(),
        model: a.served.model.clone(),
        adapter: a.served.adapter.clone(),
        prompt: messages_json(a.messages),
        answer: a.answer.to_owned(),
        finish_reason: "stop".into(),
        params,
        prompt_tokens: a.prompt_tokens,
        completion_tokens: a.completion_tokens,
    });
}

/// The draft a task's generation is logged with when it finishes.
pub(crate) fn draft(
    caller: &Principal,
    task: &'static str,
    messages: &[Message],
    mut params: serde_json::Value,
) -> crate::feedback::Draft {
    if let Some(map) = params.as_object_mut() {
        map.insert("task".into(), task.into());
    }
    crate::feedback::Draft {
        tenant: caller.tenant.clone(),
        sub: caller.sub.clone(),
        prompt: messages_json(messages),
        params,
    }
}

/// Counts a task request by outcome and times it.
pub(crate) struct TaskTimer<'a> {
    state: &'a AppState,
    task: &'static str,
    started: Instant,
}

impl<'a> TaskTimer<'a> {
    pub fn start(state: &'a AppState, task: &'static str) -> Self {
        Self { state, task, started: Instant::now() }
    }

    /// Records the outcome (`ok`, `error` or a task's own) and passes the result through.
    pub fn finish<T>(self, result: Result<T, ApiError>, outcome: &str) -> Result<T, ApiError> {
        let outcome = if result.is_ok() { outcome } else { "error" };
        self.state.metrics.task_requests.with_label_values(&[self.task, outcome]).inc();
        self.state.metrics.task_duration.with_label_values(&[self.task]).observe(self.started.elapsed().as_secs_f64());
        result
    }
}

/// Embeds texts with the served embedding model; a 400 naming `param` when none is served.
pub(crate) async fn embed(state: &AppState, texts: Vec<String>, param: &str) -> Result<Vec<Vec<f32>>, ApiError> {
    let Some(model) = state.embeddings.get() else {
        return Err(ApiError::invalid(
            "this needs an embedding model, and this server serves none (start it with --embed-model)",
            Some(param.to_owned()),
        ));
    };
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    let encoder = model.encoder();
    let tokens = web::block(move || texts.iter().map(|t| encoder.tokenize(t)).collect::<runtime::Result<Vec<_>>>())
        .await?
        .map_err(|e| ApiError::invalid(e.to_string(), Some(param.to_owned())))?;
    let count: usize = tokens.iter().map(|t| t.ids.len()).sum();
    state.metrics.embedding_inputs.with_label_values(&[&model.id]).inc_by(tokens.len() as u64);
    state.metrics.prompt_tokens.with_label_values(&[&model.id, ""]).inc_by(count as u64);
    model.embed(tokens.into_iter().map(|t| t.ids).collect()).await
}

/// The model a task runs on: the one named, or the served base model.
pub(crate) fn model_or_base(state: &AppState, model: Option<String>) -> Result<String, ApiError> {
    match model {
        Some(m) if m.trim().is_empty() => Err(ApiError::invalid("model must not be empty", Some("model".to_owned()))),
        Some(m) => Ok(m),
        None => Ok(state.model_id.clone()),
    }
}

/// A required, non-blank string field, at most `max` characters.
pub(crate) fn required_text(value: &str, param: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(format!("{param} must not be empty"), Some(param.to_owned())));
    }
    if value.chars().count() > max {
        return Err(ApiError::invalid(format!("{param} is longer than {max} characters"), Some(param.to_owned())));
    }
    Ok(())
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    classify::routes(cfg);
    generate::routes(cfg);
    knowledge::routes(cfg);
    recommend::routes(cfg);
    templates::routes(cfg);
}
