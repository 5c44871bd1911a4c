//! `POST /v1/generate`: renders a template version with the request's variables and
//! generates the document with the chosen model, whole or streamed. The response carries the
//! template version and the sha256 of the rendered prompt (the user message).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use utoipa::ToSchema;

use super::templates::render;
use super::{draft, message, TaskTimer};
use crate::engine::{GenerationRequest, Prompt, Role, Sampling};
use crate::error::ApiError;
use crate::extract::{caller, read_json};
#[allow(unused_imports)]
use crate::openai::{ErrorResponse, Usage};
use crate::respond::{self, Envelope};
use crate::state::AppState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// `name`, `name@3` or `name@<alias>` (`latest` by default).
    pub template: String,
    /// A value for each declared variable (required ones must be given).
    #[serde(default)]
    pub variables: serde_json::Map<String, serde_json::Value>,
    /// Overrides the template's default model: the base or `<adapter>@<version|alias>`.
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TemplateRef {
    pub name: String,
    pub version: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GenerateResponse {
    /// What `POST /v1/feedback` takes; a correction is the edited document.
    pub id: String,
    /// `generation`
    pub object: String,
    pub created: u64,
    pub model: String,
    pub template: TemplateRef,
    /// sha256 (hex) of the rendered user message.
    pub prompt_sha256: String,
    pub text: String,
    pub finish_reason: String,
    pub usage: Usage,
}

/// The default completion budget when neither the request nor the template sets one.
const DEFAULT_MAX_TOKENS: usize = 512;

#[utoipa::path(
    post,
    path = "/v1/generate",
    operation_id = "generate",
    tag = "tasks",
    request_body = GenerateRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The generated document; with `stream: true` server-sent events: `generation.start` (template, prompt hash), `generation.delta`, `generation.done`, then `[DONE]`", content((GenerateResponse = "application/json"), (GenerateResponse = "text/event-stream"))),
        (status = 400, description = "A missing, extra or wrongly typed variable (named in `param`), or bad sampling values", body = ErrorResponse, example = json!({"error": {"message": "variable `customer` is required", "type": "invalid_request_error", "param": "variables.customer", "code": "invalid_value"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "Unknown template, version, alias or model", body = ErrorResponse),
        (status = 429, description = "Rate or concurrency limit reached", body = ErrorResponse),
        (status = 503, description = "Model not loaded yet, or draining", body = ErrorResponse)
    )
)]
pub(crate) async fn generate(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let timer = TaskTimer::start(&state, "generate");
    let result = run(&state, &req, payload).await;
    timer.finish(result, "ok")
}

async fn run(state: &AppState, req: &HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let wire: GenerateRequest = read_json(req, payload, state.body_limit).await?;
    let caller = caller(req);
    super::required_text(&wire.template, "template", 200)?;
    let template = state.templates.resolve(&caller.tenant, wire.template.trim())?;
    let rendered = render(&template, &wire.variables)?;
    let max_tokens = wire.max_tokens.or(template.defaults.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 || max_tokens > state.limits.max_tokens {
        return Err(ApiError::invalid(
            format!("max_tokens must be between 1 and {}", state.limits.max_tokens),
            Some("max_tokens".to_owned()),
        ));
    }
    let temperature = wire.temperature.or(template.defaults.temperature);
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::invalid("temperature must be between 0 and 2", Some("temperature".to_owned())));
    }
    let top_p = wire.top_p.or(template.defaults.top_p);
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::invalid("top_p must be in (0, 1]", Some("top_p".to_owned())));
    }
    let model = super::model_or_base(state, wire.model.or_else(|| template.model.clone()))?;
    let mut messages = Vec::new();
    if let Some(system) = &template.system {
        messages.push(message(Role::System, system.clone()));
    }
    messages.push(message(Role::User, rendered.clone()));
    let prompt_sha256 = hex::encode(sha2::Sha256::digest(rendered.as_bytes()));
    state.admit_caller(req, &caller).await?;
    let slot = if wire.stream { state.limiter.stream_slot(&caller)? } else { None };
    let sampling = Sampling { temperature, top_p, seed: wire.seed, ..Sampling::default() };
    let params = serde_json::json!({
        "template": template.name, "template_version": template.version, "prompt_sha256": prompt_sha256,
        "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": wire.seed,
    });
    let log = draft(&caller, "generate", &messages, params);
    let request = GenerationRequest {
        prompt: Prompt::Chat(messages),
        adapter: None,
        max_tokens: Some(max_tokens),
        sampling,
        tools: None,
    };
    let mut running = state.start_logged(req, &model, caller, request, 1, log, slot).await?;
    let envelope = Envelope::task("gen", model.clone());
    let template_ref = TemplateRef { name: template.name.clone(), version: template.version };
    if wire.stream {
        let first = serde_json::json!({
            "id": envelope.id, "object": "generation.start", "created": envelope.created, "model": model,
            "template": template_ref, "prompt_sha256": prompt_sha256,
        });
        return Ok(respond::streamed_task(envelope, running, first, "generation"));
    }
    let done = respond::collect(&envelope, &mut running).await?;
    Ok(HttpResponse::Ok().json(GenerateResponse {
        id: envelope.id,
        object: "generation".into(),
        created: envelope.created,
        model,
        template: template_ref,
        prompt_sha256,
        text: done.text,
        finish_reason: done.reason.as_str().into(),
        usage: done.usage,
    }))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/generate", web::post().to(generate));
}
