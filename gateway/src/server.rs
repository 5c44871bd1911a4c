//! The HTTP server: shared state built once, thin handlers, and start-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix_web::dev::Service;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use utoipa::OpenApi;

use crate::adapter_cache::AdapterCache;
use crate::auth::{Principal, Role};
use crate::config::{EngineKind, Settings};
use crate::engine::candle::{CandleEngine, CandleOptions};
use crate::engine::mistral::{MistralEngine, ModelSource};
use crate::engine::{AdapterHandle, Engine, GenerationRequest, Prompt};
use crate::error::ApiError;
use crate::limits::{Limiter, Verdict};
use crate::metrics::Metrics;
#[allow(unused_imports)]
use crate::openai::{ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ErrorResponse};
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
};
use crate::respond::{self, Envelope, Kind, Running, Served};
use crate::validate::{self, RequestLimits, Validated};

/// Everything handlers share; built once before the server starts.
pub struct AppState {
    engine: OnceLock<Arc<dyn Engine>>,
    /// Opened once the engine is loaded, when it can serve adapters.
    registry: OnceLock<(Arc<adapters::Registry>, AdapterCache)>,
    pub admin_token: Option<String>,
    pub import_root: Option<std::path::PathBuf>,
    pub(crate) data_dir: std::path::PathBuf,
    adapter_cache_bytes: usize,
    lora_dtype: adapters::lora::LoraDtype,
    /// `None`: auth switched off explicitly.
    auth: Option<Arc<crate::auth::Authenticator>>,
    pub limiter: Arc<Limiter>,
    /// Set once Redis is reachable, when one is configured.
    announcer: OnceLock<crate::replicas::Announcer>,
    admission: Arc<Semaphore>,
    draining: AtomicBool,
    pub limits: RequestLimits,
    pub body_limit: usize,
    pub model_id: String,
    pub metrics: Arc<Metrics>,
    pub feedback: Arc<crate::feedback::FeedbackStore>,
}

impl AppState {
    pub fn new(settings: &Settings) -> std::io::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let feedback = crate::feedback::FeedbackStore::open(
            &settings.data_dir.join(protocol::names::FEEDBACK_DIR),
            settings.feedback_log,
            settings.feedback_rotate_bytes,
        )?;
        Ok(Self {
            feedback: Arc::new(feedback),
            engine: OnceLock::new(),
            registry: OnceLock::new(),
            admin_token: settings.admin_token.clone(),
            import_root: settings.import_root.clone(),
            data_dir: settings.data_dir.clone(),
            adapter_cache_bytes: settings.adapter_cache_bytes,
            lora_dtype: settings.lora_dtype,
            announcer: OnceLock::new(),
            auth: settings.auth.clone(),
            limiter: Arc::new(Limiter::new(
                settings.limits,
                settings.redis.clone(),
                settings.redis_failure,
                metrics.clone(),
            )),
            admission: Arc::new(Semaphore::new(settings.max_concurrent)),
            draining: AtomicBool::new(false),
            limits: RequestLimits { max_tokens: settings.max_tokens, max_messages: settings.max_messages },
            body_limit: settings.body_limit,
            model_id: settings.model_id.clone(),
            metrics,
        })
    }

    /// Installs the loaded engine (and, when it serves adapters, opens the registry); from
    /// now on `/ready` answers 200.
    pub fn set_engine(&self, engine: Arc<dyn Engine>) -> Result<(), adapters::AdapterError> {
        if let Some(shape) = engine.adapter_shape() {
            let mut shape = shape.clone();
            shape.name = self.model_id.clone();
            let registry =
                adapters::Registry::open(self.data_dir.join("registry"), shape.clone(), adapters::Limits::default())?;
            let _ = self.registry.set((
                Arc::new(registry),
                AdapterCache::new(self.adapter_cache_bytes, shape, self.lora_dtype, self.metrics.clone()),
            ));
        }
        let _ = self.engine.set(engine);
        Ok(())
    }

    /// Tells the other replicas that `adapter` changed (nothing to do without Redis).
    pub async fn announce(&self, adapter: &str) {
        if let Some(a) = self.announcer.get() {
            a.announce(adapter).await;
        }
    }

    /// With Redis: follow other replicas' changes, and connect the announcer (retrying in the
    /// background while Redis is unreachable).
    fn share_registry(self: &Arc<Self>, client: redis::Client) {
        let Some(registry) = self.registry() else { return };
        crate::replicas::follow(client.clone(), registry);
        let state = self.clone();
        tokio::spawn(async move {
            let mut backoff = std::time::Duration::from_millis(100);
            loop {
                match crate::replicas::Announcer::connect(&client).await {
                    Ok(a) => {
                        let _ = state.announcer.set(a);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "Redis unreachable for registry announcements")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        });
    }

    pub fn registry(&self) -> Option<Arc<adapters::Registry>> {
        self.registry.get().map(|(r, _)| r.clone())
    }

    /// Who is calling, for every route but the public ones (`None` there). With auth off every
    /// caller is an anonymous user; the bootstrap admin token is an admin either way.
    fn authenticate(&self, req: &actix_web::dev::ServiceRequest) -> Result<Option<Principal>, ApiError> {
        const PUBLIC: [&str; 5] = ["/health", "/ready", "/metrics", "/openapi.json", "/docs"];
        let path = req.path();
        if PUBLIC.iter().any(|p| path == *p || path.starts_with(&format!("{p}/"))) {
            return Ok(None);
        }
        let header = req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let bearer = header.and_then(|h| h.strip_prefix("Bearer "));
        if bearer.is_some() && bearer == self.admin_token.as_deref() {
            return Ok(Some(Principal::plain("bootstrap-admin", "system", Role::Admin)));
        }
        let Some(auth) = &self.auth else {
            return Ok(Some(Principal::plain("anonymous", "default", Role::User)));
        };
        let principal = auth.authenticate(header).map_err(|failure| {
            self.metrics.auth_failures.with_label_values(&[failure.as_str()]).inc();
            ApiError::Unauthorized
        })?;
        if path.starts_with("/admin") && principal.role != Role::Admin {
            self.metrics.auth_failures.with_label_values(&["not_admin"]).inc();
            return Err(ApiError::Forbidden { message: "this route needs an admin token".into() });
        }
        Ok(Some(principal))
    }

    /// Resolves `model` to the base alone or to one adapter version, once, at admission. A
    /// model outside the caller's list is "not found", as if it did not exist.
    async fn resolve(
        &self,
        model: &str,
        caller: &Principal,
    ) -> Result<(Arc<dyn Engine>, Option<AdapterHandle>), ApiError> {
        if !caller.may_use(model) {
            return Err(ApiError::ModelNotFound { model: model.to_owned() });
        }
        let engine = self.engine.get().cloned().ok_or(ApiError::NotReady)?;
        if model == self.model_id {
            return Ok((engine, None));
        }
        let not_found = || ApiError::ModelNotFound { model: model.to_owned() };
        let (registry, cache) = self.registry.get().ok_or_else(not_found)?;
        let manifest = registry.resolve_model(model).map_err(|e| {
            if e.is_not_found() || e.is_client_error() {
                not_found()
            } else {
                e.into()
            }
        })?;
        let weights =
            cache.get(&manifest.name, manifest.version, registry.version_dir(&manifest.name, manifest.version)).await?;
        Ok((engine, Some(AdapterHandle { name: manifest.name, version: manifest.version, weights })))
    }

    pub fn is_ready(&self) -> bool {
        self.engine.get().is_some() && !self.draining.load(Ordering::Relaxed)
    }

    fn engine_for(&self, model: &str, caller: &Principal) -> Result<Arc<dyn Engine>, ApiError> {
        if model != self.model_id || !caller.may_use(model) {
            return Err(ApiError::ModelNotFound { model: model.to_owned() });
        }
        self.engine.get().cloned().ok_or(ApiError::NotReady)
    }

    /// Takes a concurrency slot (or answers 429) and starts the generation.
    async fn admit(
        &self,
        model: &str,
        caller: &Principal,
        mut request: GenerationRequest,
    ) -> Result<Running, ApiError> {
        let (engine, adapter) = self.resolve(model, caller).await?;
        let served = Served {
            model: engine.info().id.clone(),
            adapter: adapter.as_ref().map_or(String::new(), |a| format!("{}@{}", a.name, a.version)),
        };
        request.adapter = adapter;
        let permit = self.admission.clone().try_acquire_owned().map_err(|_| {
            self.metrics.rejected_concurrency.with_label_values(&["concurrency"]).inc();
            ApiError::RateLimited {
                message: "too many requests are running; retry shortly".into(),
                code: "concurrency_limit_exceeded",
            }
        })?;
        let started = Instant::now();
        let generation = engine.generate(request).await?;
        self.metrics.active_generations.inc();
        Ok(Running {
            generation,
            _permit: permit,
            metrics: self.metrics.clone(),
            model: model.to_owned(),
            started,
            limits: None,
            served,
            log: None,
        })
    }
}

/// Reads a JSON body up to the configured limit and parses it into a wire type.
pub(crate) async fn read_json<T: DeserializeOwned>(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("could not read the request body: {e}"), None))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = (path != "." && !path.is_empty()).then_some(path);
        if inner.is_syntax() || inner.is_eof() {
            ApiError::InvalidRequest {
                message: format!("We could not parse the JSON body of your request: {inner}"),
                param: None,
                code: "invalid_json",
            }
        } else {
            ApiError::InvalidRequest { message: format!("invalid request body: {inner}"), param, code: "invalid_type" }
        }
    })
}

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

/// The caller the auth middleware put on the request.
pub(crate) fn caller(req: &HttpRequest) -> Principal {
    use actix_web::HttpMessage;
    // The middleware always sets one on these routes; without it, the caller may use nothing.
    req.extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or(Principal { models: Some(Vec::new()), ..Principal::plain("anonymous", "default", Role::User) })
}

async fn answer(state: &AppState, req: &HttpRequest, kind: Kind, v: Validated) -> Result<HttpResponse, ApiError> {
    use actix_web::HttpMessage;
    let caller = caller(req);
    // The verdict rides on the request so that the outer middleware can add the headers to
    // whatever answer this becomes, a 429 included.
    let verdict = state.limiter.admit(&caller).await.map_err(|(e, verdict)| {
        req.extensions_mut().insert(verdict);
        e
    })?;
    req.extensions_mut().insert(verdict);
    let slot = if v.stream { state.limiter.stream_slot(&caller)? } else { None };
    let draft = crate::feedback::Draft {
        tenant: caller.tenant.clone(),
        sub: caller.sub.clone(),
        prompt: match &v.generation.prompt {
            Prompt::Chat(messages) => serde_json::Value::Array(
                messages.iter().map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content})).collect(),
            ),
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
    let mut running = state.admit(&v.model, &caller, v.generation).await?;
    running.log = Some((state.feedback.clone(), draft));
    req.extensions_mut().insert(running.served.clone());
    running.limits = Some((state.limiter.clone(), caller, slot));
    let envelope = Envelope::new(kind, v.model);
    if v.stream {
        Ok(respond::streamed(envelope, running, v.include_usage))
    } else {
        respond::whole(envelope, running).await
    }
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The base model and every adapter name that routes", body = ModelList),
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
            let chat = ChatCompletionRequest {
                model: wire.model,
                messages,
                max_completion_tokens: None,
                sampling: Default::default(),
                extra: Default::default(),
            };
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

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
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

/// The request's id: a sane `x-request-id` from the client, or a new one.
fn request_id(req: &actix_web::dev::ServiceRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Binds, prints the address, loads the model, prints `ready`, and serves until stopped.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Check the model path before binding, so a typo fails fast with the path in the message.
    if settings.engine != EngineKind::Echo {
        ModelSource::detect(&settings.model_path).map_err(anyhow::Error::msg)?;
    }
    let state = web::Data::new(AppState::new(&settings).map_err(|e| {
        anyhow::anyhow!(
            "the feedback store under {} cannot be opened: {e}",
            settings.data_dir.join(protocol::names::FEEDBACK_DIR).display()
        )
    })?);
    let app_state = state.clone();
    let metrics_here = settings.metrics_listen.is_none();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            // Authentication runs inside the request metrics, so refusals are counted too.
            .wrap_fn(|req, srv| {
                use actix_web::HttpMessage;
                let decision = match req.app_data::<web::Data<AppState>>() {
                    Some(state) => state.authenticate(&req),
                    None => Err(ApiError::Internal("application state missing".into())),
                };
                match decision {
                    Ok(principal) => {
                        if let Some(p) = principal {
                            req.extensions_mut().insert(p);
                        }
                        futures::future::Either::Left(srv.call(req))
                    }
                    Err(e) => {
                        let response = actix_web::ResponseError::error_response(&e);
                        futures::future::Either::Right(futures::future::ready(Ok(req.into_response(response))))
                    }
                }
            })
            .wrap_fn(|req, srv| {
                use tracing::Instrument;
                let route = req.match_pattern().unwrap_or_else(|| "unmatched".to_owned());
                let started = Instant::now();
                let metrics = req.app_data::<web::Data<AppState>>().map(|s| s.metrics.clone());
                let request_id = request_id(&req);
                let span = tracing::info_span!("request", request_id = %request_id, method = %req.method(), path = %req.path());
                let fut = span.in_scope(|| srv.call(req));
                async move {
                    let mut res = fut.await?;
                    let status = res.status().as_u16();
                    if let Some(m) = metrics {
                        let served = {
                            use actix_web::HttpMessage;
                            res.request().extensions().get::<Served>().cloned()
                        };
                        let (model, adapter) = served.map_or((String::new(), String::new()), |s| (s.model, s.adapter));
                        m.requests.with_label_values(&[&route, &status.to_string(), &model, &adapter]).inc();
                        m.request_duration.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
                    }
                    let verdict = {
                        use actix_web::HttpMessage;
                        res.request().extensions().get::<Verdict>().copied()
                    };
                    if let Some(verdict) = verdict {
                        crate::limits::add_headers(res.headers_mut(), &verdict);
                        if status == 429 {
                            let wait = [verdict.requests, verdict.tokens]
                                .into_iter()
                                .flatten()
                                .filter(|s| s.remaining == 0)
                                .map(|s| s.reset.as_secs_f64().ceil() as u64)
                                .max()
                                .unwrap_or(1)
                                .max(1);
                            res.headers_mut().insert(actix_web::http::header::RETRY_AFTER, wait.into());
                        }
                    }
                    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&request_id) {
                        res.headers_mut().insert(actix_web::http::header::HeaderName::from_static("x-request-id"), v);
                    }
                    tracing::info!(status, ms = started.elapsed().as_millis() as u64, "answered");
                    Ok(res)
                }
                .instrument(span)
            })
            .configure(|cfg| routes(cfg, metrics_here))
            .configure(crate::admin::routes)
            .configure(crate::feedback_api::routes)
            .configure(crate::finetune_api::routes)
            .default_service(web::to(not_found))
    })
    .workers(settings.http_workers)
    .shutdown_timeout(settings.shutdown_timeout)
    // Signals are ours: `/ready` must turn false the moment draining starts.
    .disable_signals()
    .bind((settings.host.as_str(), settings.port))
    .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", settings.host, settings.port))?;
    for addr in server.addrs() {
        println!("switchyard listening on http://{addr}");
    }
    let metrics_server = match &settings.metrics_listen {
        Some(addr) => {
            let metrics_state = state.clone();
            let server = HttpServer::new(move || {
                App::new().app_data(metrics_state.clone()).route("/metrics", web::get().to(metrics))
            })
            .workers(1)
            .disable_signals()
            .bind(addr.as_str())
            .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr} (SWITCHYARD_METRICS_LISTEN): {e}"))?;
            for addr in server.addrs() {
                println!("switchyard metrics on http://{addr}/metrics");
            }
            Some(server.run())
        }
        None => None,
    };
    let server = server.run();
    let handle = server.handle();
    // The metrics listener runs beside the API server and stops when it stops.
    let metrics_handle = metrics_server.map(|m| {
        let h = m.handle();
        tokio::spawn(m);
        h
    });
    state.limiter.connect();
    if let Some(client) = settings.redis.clone() {
        let shared = crate::feedback_stream::SharedFeedback::start(client, state.feedback.dir(), state.metrics.clone());
        let _ = state.feedback.shared.set(shared);
    }
    let drain_state = state.clone();
    let drain_handle = handle.clone();
    tokio::spawn(async move {
        wait_for_stop_signal().await;
        drain_state.draining.store(true, Ordering::Relaxed);
        tracing::info!("stop signal: draining in-flight requests, then exiting");
        drain_handle.stop(true).await;
    });

    let loader_state = state.clone();
    tokio::spawn(async move {
        let loaded: anyhow::Result<Arc<dyn Engine>> = match settings.engine {
            EngineKind::Candle => {
                let (path, id) = (settings.model_path.clone(), settings.model_id.clone());
                let options = CandleOptions {
                    context_cap: settings.context_len,
                    threads: settings.threads,
                    prefix_cache_bytes: settings.prefix_cache_bytes,
                    activations: settings.activations,
                };
                let metrics = loader_state.metrics.engine.clone();
                tokio::task::spawn_blocking(move || CandleEngine::load(&path, id, options, metrics))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r)
                    .map(|e| Arc::new(e) as Arc<dyn Engine>)
            }
            EngineKind::Echo => {
                Ok(Arc::new(crate::engine::echo::EchoEngine::new(settings.model_id.clone(), settings.context_len))
                    as Arc<dyn Engine>)
            }
            EngineKind::Mistralrs => MistralEngine::load(
                &settings.model_path,
                settings.model_id.clone(),
                settings.max_concurrent,
                settings.context_len,
            )
            .await
            .map(|e| Arc::new(e) as Arc<dyn Engine>),
        };
        match loaded {
            Ok(engine) => {
                tracing::info!(model = %settings.model_id, context = engine.info().context_len, "model loaded");
                if let Err(e) = loader_state.set_engine(engine) {
                    eprintln!("error: the adapter registry cannot be opened: {e}");
                    handle.stop(false).await;
                    std::process::exit(1);
                }
                if let Some(client) = settings.redis.clone() {
                    loader_state.clone().into_inner().share_registry(client);
                }
                println!("switchyard ready");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "model failed to load; stopping");
                eprintln!("error: {e:#}");
                handle.stop(false).await;
                std::process::exit(1);
            }
        }
    });
    server.await?;
    if let Some(h) = metrics_handle {
        h.stop(true).await;
    }
    Ok(())
}
