//! The OpenAI-compatible routes (chat, completions, embeddings, models, tokenize) and the
//! operational ones (health, readiness, metrics, the spec and its UI): thin handlers that
//! validate, admit and respond.

use actix_web::{web, HttpRequest, HttpResponse};
use utoipa::OpenApi;

use crate::engine::Prompt;
use crate::error::ApiError;
use crate::extract::{caller, read_json};
#[allow(unused_imports)]
use crate::openai::{ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ErrorResponse};
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage,
    EmbeddingVector, EncodingFormat, ModelCard, ModelKind, ModelList, TokenizeRequest, TokenizeResponse,
};
use crate::respond::{self, Envelope, Kind};
use crate::state::AppState;
use crate::validate::{self, Validated};

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The answer: one JSON object, or with `stream: true` server-sent events (`data: {chunk}` lines ending with `data: [DONE]`)", content((ChatCompletionResponse = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
        GenerationErrors
    )
)]
pub(crate) async fn chat_completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: ChatCompletionRequest = read_json(&req, payload, state.body_limit).await?;
    crate::extract::note_end_user(&req, wire.sampling.user.as_deref());
    answer(&state, &req, Kind::Chat, validate::chat(wire, state.limits)?).await
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = CompletionRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The completion: one JSON object, or with `stream: true` server-sent events of the same shape ending with `data: [DONE]`", content((CompletionResponse = "application/json"), (CompletionResponse = "text/event-stream"))),
        GenerationErrors
    )
)]
pub(crate) async fn completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: CompletionRequest = read_json(&req, payload, state.body_limit).await?;
    crate::extract::note_end_user(&req, wire.sampling.user.as_deref());
    answer(&state, &req, Kind::Text, validate::completion(wire, state.limits)?).await
}

/// The errors every generation route answers with, documented once for the OpenAPI spec.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum GenerationErrors {
    #[response(status = 400, description = "Invalid request", example = json!({"error": {"message": "messages must contain at least one message", "type": "invalid_request_error", "param": "messages", "code": "invalid_value"}}))]
    Invalid(ErrorResponse),
    #[response(status = 401, description = "Missing or invalid bearer token", example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}))]
    Unauthorized(ErrorResponse),
    #[response(status = 404, description = "Unknown model or adapter", example = json!({"error": {"message": "The model `gpt-9` does not exist or you do not have access to it.", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}))]
    UnknownModel(ErrorResponse),
    #[response(status = 413, description = "Body over the limit", example = json!({"error": {"message": "request body is larger than the limit of 4194304 bytes", "type": "invalid_request_error", "param": null, "code": "payload_too_large"}}))]
    TooLarge(ErrorResponse),
    #[response(status = 429, description = "Rate or concurrency limit reached (see Retry-After and x-ratelimit-* headers)", example = json!({"error": {"message": "rate limit reached for requests per minute; retry after the reset time", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}}))]
    Limited(ErrorResponse),
    #[response(status = 503, description = "Model not loaded yet, or draining", example = json!({"error": {"message": "the model is not loaded yet", "type": "server_error", "param": null, "code": "model_not_ready"}}))]
    NotReady(ErrorResponse),
}

async fn answer(state: &AppState, req: &HttpRequest, kind: Kind, v: Validated) -> Result<HttpResponse, ApiError> {
    let caller = caller(req);
    state.admit_caller(req, &caller).await?;
    let slot = if v.stream { state.limiter.stream_slot(&caller)? } else { None };
    let draft = crate::feedback::Draft {
        tenant: caller.tenant.clone(),
        sub: caller.sub.clone(),
        prompt: match &v.generation.prompt {
            Prompt::Chat(messages) => crate::feedback::messages_json(messages),
            Prompt::Text(t) => serde_json::Value::String(t.clone()),
        },
        params: {
            let s = &v.generation.sampling;
            serde_json::json!({
                "max_tokens": v.generation.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                "stop": s.stop, "frequency_penalty": s.frequency_penalty, "presence_penalty": s.presence_penalty,
            })
        },
    };
    let running = state.start_logged(req, &v.model, caller, v.generation, v.shape.n, draft, slot).await?;
    let envelope = Envelope::new(kind, v.model);
    if v.stream {
        Ok(crate::answer::streamed(envelope, running, v.shape, v.include_usage))
    } else {
        crate::answer::whole(envelope, running, v.shape).await
    }
}

#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "openai",
    request_body = EmbeddingRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One vector per input, in order (L2-normalised; inputs past `max_model_len` tokens are cut and marked `truncated`)", body = EmbeddingResponse),
        EmbeddingErrors
    )
)]
pub(crate) async fn embeddings(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    use actix_web::HttpMessage;
    let wire: EmbeddingRequest = read_json(&req, payload, state.body_limit).await?;
    let caller = caller(&req);
    let model = state.embeddings_for(&wire.model, &caller)?;
    let v = validate::embeddings(wire, model.limits())?;
    state.admit_caller(&req, &caller).await?;
    // Tokenizing a few MB of text takes a while: not on the actix worker.
    let encoder = model.encoder();
    let tokens = web::block(move || -> runtime::Result<Vec<runtime::bert::Tokens>> {
        match v.inputs {
            validate::EmbedInputs::Texts(texts) => texts.iter().map(|t| encoder.tokenize(t)).collect(),
            validate::EmbedInputs::Tokens(lists) => Ok(lists.iter().map(|ids| encoder.wrap(ids)).collect()),
        }
    })
    .await?
    .map_err(|e| ApiError::invalid(e.to_string(), Some("input".to_owned())))?;
    let prompt_tokens: usize = tokens.iter().map(|t| t.ids.len()).sum();
    let truncated: Vec<bool> = tokens.iter().map(|t| t.truncated).collect();
    let vectors = model.embed(tokens.into_iter().map(|t| t.ids).collect()).await?;
    state.limiter.charge(&caller, prompt_tokens as u64);
    state.metrics.embedding_inputs.with_label_values(&[&model.id]).inc_by(vectors.len() as u64);
    state.metrics.prompt_tokens.with_label_values(&[&model.id, ""]).inc_by(prompt_tokens as u64);
    req.extensions_mut().insert(respond::Served { model: model.id.clone(), adapter: String::new() });
    let data = vectors
        .into_iter()
        .zip(truncated)
        .enumerate()
        .map(|(index, (vector, truncated))| Embedding {
            object: "embedding".into(),
            index,
            embedding: match v.encoding {
                EncodingFormat::Float => EmbeddingVector::Float(vector),
                EncodingFormat::Base64 => EmbeddingVector::base64(&vector),
            },
            truncated,
        })
        .collect();
    Ok(HttpResponse::Ok().json(EmbeddingResponse {
        object: "list".into(),
        data,
        model: model.id.clone(),
        usage: EmbeddingUsage { prompt_tokens, total_tokens: prompt_tokens },
    }))
}

/// What `/v1/embeddings` answers besides 200, documented once for the OpenAPI spec.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum EmbeddingErrors {
    #[response(status = 400, description = "Invalid request: empty input, an empty string or token list, more than 2048 inputs, a token id outside the vocabulary, `dimensions`, an unknown parameter, or a chat model", example = json!({"error": {"message": "dimensions is not supported: all-MiniLM-L6-v2 has a fixed width of 384; leave dimensions out", "type": "invalid_request_error", "param": "dimensions", "code": "unsupported_parameter"}}))]
    Invalid(ErrorResponse),
    #[response(status = 401, description = "Missing or invalid bearer token", example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}))]
    Unauthorized(ErrorResponse),
    #[response(status = 404, description = "Unknown embedding model (or embeddings are off)", example = json!({"error": {"message": "The model `text-embedding-3-small` does not exist or you do not have access to it.", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}))]
    UnknownModel(ErrorResponse),
    #[response(status = 413, description = "Body over the limit", example = json!({"error": {"message": "request body is larger than the limit of 4194304 bytes", "type": "invalid_request_error", "param": null, "code": "payload_too_large"}}))]
    TooLarge(ErrorResponse),
    #[response(status = 429, description = "Rate limit reached, or too many embedding requests waiting", example = json!({"error": {"message": "too many embedding requests are waiting; retry shortly", "type": "rate_limit_error", "param": null, "code": "concurrency_limit_exceeded"}}))]
    Limited(ErrorResponse),
    #[response(status = 500, description = "The forward failed (a bug or a corrupt model, never client input)", example = json!({"error": {"message": "internal error: tensor computation failed", "type": "server_error", "param": null, "code": "internal_error"}}))]
    Failed(ErrorResponse),
    #[response(status = 503, description = "Draining", example = json!({"error": {"message": "embeddings are stopping", "type": "server_error", "param": null, "code": "service_unavailable"}}))]
    Stopping(ErrorResponse),
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The base model, every adapter name that routes, and the embedding model, each with its `kind`", body = ModelList),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}))
    )
)]
pub(crate) async fn list_models(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = caller(&req);
    let mut data = Vec::new();
    if let Some(engine) = state.engine.get() {
        let info = engine.info();
        let card = |id: String, created: u64, parent: Option<String>, version: Option<u64>| ModelCard {
            id,
            object: "model".into(),
            created,
            owned_by: "switchyard".into(),
            max_model_len: info.context_len,
            kind: ModelKind::Chat,
            parent,
            version,
        };
        data.push(card(info.id.clone(), info.created, None, None));
        if let Some(registry) = state.registry() {
            for adapter in registry.list() {
                let parent = Some(info.id.clone());
                for (alias, a) in &adapter.aliases {
                    let created = adapter.versions.iter().find(|m| m.version == a.version).map_or(0, |m| m.created);
                    if alias == adapters::registry::DEFAULT_ALIAS {
                        data.push(card(adapter.name.clone(), created, parent.clone(), Some(a.version)));
                    }
                    data.push(card(format!("{}@{alias}", adapter.name), created, parent.clone(), Some(a.version)));
                }
                for m in &adapter.versions {
                    data.push(card(
                        format!("{}@{}", adapter.name, m.version),
                        m.created,
                        parent.clone(),
                        Some(m.version),
                    ));
                }
            }
        }
    }
    if let Some(e) = state.embeddings.get() {
        data.push(ModelCard {
            id: e.id.clone(),
            object: "model".into(),
            created: e.created,
            owned_by: "switchyard".into(),
            max_model_len: e.max_tokens(),
            kind: ModelKind::Embedding,
            parent: None,
            version: None,
        });
    }
    data.retain(|card| caller.may_use(&card.id));
    Ok(HttpResponse::Ok().json(ModelList { object: "list".into(), data }))
}

#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "openai",
    request_body = TokenizeRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Token ids as the model will see them", body = TokenizeResponse),
        (status = 400, description = "Invalid request", body = ErrorResponse, example = json!({"error": {"message": "messages must contain at least one message", "type": "invalid_request_error", "param": "messages", "code": "invalid_value"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}})),
        (status = 404, description = "Unknown model or adapter", body = ErrorResponse, example = json!({"error": {"message": "The model `gpt-9` does not exist or you do not have access to it.", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}))
    )
)]
pub(crate) async fn tokenize(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: TokenizeRequest = read_json(&req, payload, state.body_limit).await?;
    let engine = state.engine_for(&wire.model, &caller(&req))?;
    let prompt = match (wire.prompt, wire.messages) {
        (Some(p), None) => Prompt::Text(p),
        (None, Some(messages)) => {
            let chat = ChatCompletionRequest { model: wire.model, messages, ..Default::default() };
            validate::chat(chat, state.limits)?.generation.prompt
        }
        _ => return Err(ApiError::invalid("give exactly one of prompt or messages", Some("prompt".into()))),
    };
    let tokens = engine.tokenize(&prompt).await?;
    Ok(HttpResponse::Ok().json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: engine.info().context_len,
        tokens,
    }))
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "The process is alive", body = Object, example = json!({"status": "ok"}))
    )
)]
pub(crate) async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "The model is loaded and the gateway is not draining", body = Object, example = json!({"status": "ready"})),
        (status = 503, description = "Model not loaded yet, or draining", body = ErrorResponse, example = json!({"error": {"message": "the model is not loaded yet", "type": "server_error", "param": null, "code": "model_not_ready"}}))
    )
)]
pub(crate) async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if state.is_ready() {
        Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
    } else {
        Err(ApiError::NotReady)
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain")
    )
)]
pub(crate) async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render())
}

async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(crate::openapi_doc::spec_json())
}

async fn docs_redirect() -> HttpResponse {
    HttpResponse::Found().insert_header(("Location", "/docs/")).finish()
}

pub(crate) async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound { message: format!("no route for {} {}", req.method(), req.path()) })
}

/// Registers every route on an app; shared by the server and tests.
/// The API routes; `/metrics` among them unless it has its own listen address.
pub fn routes(cfg: &mut web::ServiceConfig, metrics_here: bool) {
    if metrics_here {
        cfg.route("/metrics", web::get().to(metrics));
    }
    cfg.route("/v1/chat/completions", web::post().to(chat_completions))
        .route("/v1/completions", web::post().to(completions))
        .route("/v1/responses", web::post().to(crate::responses::create))
        .route("/v1/responses/{id}", web::get().to(crate::responses::get))
        .route("/v1/embeddings", web::post().to(embeddings))
        .route("/v1/models", web::get().to(list_models))
        .route("/tokenize", web::post().to(tokenize))
        .route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/openapi.json", web::get().to(openapi_json))
        .service(
            utoipa_swagger_ui::SwaggerUi::new("/docs/{_:.*}")
                .url("/docs/openapi.json", crate::openapi_doc::ApiDoc::openapi()),
        )
        .route("/docs", web::get().to(docs_redirect));
}
