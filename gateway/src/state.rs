//! `AppState`, everything handlers share, built once before the server starts: the engine and
//! registry, admission (one slot per running generation), authentication of a request, and the
//! resolution of a `model` string to the base or one adapter version.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::adapter_cache::AdapterCache;
use crate::auth::{Principal, Role};
use crate::config::Settings;
use crate::engine::{AdapterHandle, Engine, GenerationRequest};
use crate::error::ApiError;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::respond::{Running, Served};
use crate::validate::RequestLimits;

/// Under the data directory: prompt templates, knowledge bases, recommendation items and events.
pub const TEMPLATES_DIR: &str = "templates";
pub const KNOWLEDGE_DIR: &str = "knowledge";
pub const RECOMMEND_DIR: &str = "recommend";

/// Everything handlers share; built once before the server starts.
pub struct AppState {
    pub(crate) engine: OnceLock<Arc<dyn Engine>>,
    /// The embedding model, set once before serving when one is configured.
    pub(crate) embeddings: OnceLock<crate::embeddings::Embeddings>,
    /// Opened once the engine is loaded, when it can serve adapters.
    registry: OnceLock<(Arc<adapters::Registry>, AdapterCache)>,
    pub admin_token: Option<String>,
    pub import_root: Option<std::path::PathBuf>,
    pub(crate) data_dir: std::path::PathBuf,
    /// The served base model's file or directory (what exports merge into).
    pub(crate) model_path: std::path::PathBuf,
    adapter_cache_bytes: usize,
    lora_dtype: runtime::lora::LoraDtype,
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
    /// Prompt templates for `/v1/generate`.
    pub(crate) templates: Arc<crate::tasks::templates::Templates>,
    /// Knowledge bases and the recommender, opened once the embedding model is loaded.
    pub(crate) knowledge: OnceLock<Arc<knowledge::store::KnowledgeBases>>,
    pub(crate) recommender: OnceLock<Arc<recommend::Recommender>>,
    /// Set once Redis is reachable: tells other replicas a knowledge base changed.
    knowledge_announcer: OnceLock<crate::replicas::Announcer>,
    max_concurrent: usize,
    pub(crate) shadow_log: Arc<crate::shadow::ShadowLog>,
    /// Shadow generations started and not yet ended.
    pub(crate) shadows_pending: Arc<std::sync::atomic::AtomicUsize>,
    /// Signs and checks console session cookies.
    pub(crate) sessions: crate::console::session::Sessions,
    pub(crate) labelling: Arc<crate::labelling::Labelling>,
}

/// What a model string resolved to: the engine, the adapter version (none for the base), and
/// the alias's shadow rule when it went through one.
struct Resolution {
    engine: Arc<dyn Engine>,
    adapter: Option<AdapterHandle>,
    shadow: Option<crate::shadow::Planned>,
}

impl AppState {
    pub fn new(settings: &Settings) -> std::io::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let feedback = crate::feedback::FeedbackStore::open(
            &settings.data_dir.join(protocol::names::FEEDBACK_DIR),
            settings.feedback_log,
            settings.feedback_rotate_bytes,
        )?;
        let templates = crate::tasks::templates::Templates::open(&settings.data_dir.join(TEMPLATES_DIR))?;
        Ok(Self {
            feedback: Arc::new(feedback),
            templates: Arc::new(templates),
            knowledge: OnceLock::new(),
            recommender: OnceLock::new(),
            knowledge_announcer: OnceLock::new(),
            engine: OnceLock::new(),
            embeddings: OnceLock::new(),
            registry: OnceLock::new(),
            admin_token: settings.admin_token.clone(),
            import_root: settings.import_root.clone(),
            data_dir: settings.data_dir.clone(),
            model_path: settings.model_path.clone(),
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
            max_concurrent: settings.max_concurrent,
            shadow_log: Arc::default(),
            shadows_pending: Arc::default(),
            labelling: Arc::new(crate::labelling::Labelling::open(&settings.data_dir)),
            sessions: crate::console::session::Sessions::new(
                settings.console_secret.as_deref(),
                settings.admin_token.as_deref(),
            ),
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
            let registry = adapters::Registry::open(
                self.data_dir.join(protocol::names::REGISTRY_DIR),
                shape.clone(),
                adapters::Limits::default(),
            )?;
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
    pub(crate) fn share_registry(self: &Arc<Self>, client: redis::Client) {
        let Some(registry) = self.registry() else { return };
        crate::replicas::follow(client.clone(), crate::replicas::REGISTRY_CHANNEL, registry);
        let state = self.clone();
        tokio::spawn(async move {
            let mut backoff = std::time::Duration::from_millis(100);
            loop {
                match crate::replicas::Announcer::connect(&client, crate::replicas::REGISTRY_CHANNEL).await {
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

    /// Opens the knowledge bases and the recommender for vectors of `dimension` floats (the
    /// embedding model's), and starts following other replicas' knowledge-base changes.
    pub(crate) fn open_applications(
        self: &Arc<Self>,
        dimension: usize,
        redis: Option<redis::Client>,
    ) -> anyhow::Result<()> {
        let dir = self.data_dir.join(KNOWLEDGE_DIR);
        let kbs = knowledge::store::KnowledgeBases::open(&dir, dimension)
            .map_err(|e| anyhow::anyhow!("the knowledge bases under {} cannot be opened: {e}", dir.display()))?;
        let kbs = Arc::new(kbs);
        let _ = self.knowledge.set(kbs.clone());
        let dir = self.data_dir.join(RECOMMEND_DIR);
        let rec = recommend::Recommender::open(&dir, dimension)
            .map_err(|e| anyhow::anyhow!("the recommendation store under {} cannot be opened: {e}", dir.display()))?;
        let _ = self.recommender.set(Arc::new(rec));
        let refresh: Arc<dyn crate::replicas::Refresh> = kbs;
        crate::replicas::watch(refresh.clone());
        if let Some(client) = redis {
            crate::replicas::follow(client.clone(), crate::replicas::KNOWLEDGE_CHANNEL, refresh);
            let state = self.clone();
            tokio::spawn(async move {
                if let Ok(a) = crate::replicas::Announcer::connect(&client, crate::replicas::KNOWLEDGE_CHANNEL).await {
                    let _ = state.knowledge_announcer.set(a);
                }
            });
        }
        Ok(())
    }

    /// Tells the other replicas that a knowledge base changed (they also notice by polling).
    pub async fn announce_knowledge(&self) {
        if let Some(a) = self.knowledge_announcer.get() {
            a.announce("knowledge").await;
        }
    }

    /// Whether callers authenticate with JWTs or API keys (rather than all being anonymous).
    pub fn has_auth(&self) -> bool {
        self.auth.is_some()
    }

    pub fn registry(&self) -> Option<Arc<adapters::Registry>> {
        self.registry.get().map(|(r, _)| r.clone())
    }

    /// Who is calling, for every route but the public ones (`None` there). With auth off every
    /// caller is an anonymous user; the bootstrap admin token is an admin either way. A request
    /// with no `Authorization` header but a console session cookie is that session's caller,
    /// and a state-changing one must carry the session's CSRF token.
    pub(crate) fn authenticate(&self, req: &actix_web::dev::ServiceRequest) -> Result<Option<Principal>, ApiError> {
        const PUBLIC: [&str; 6] = ["/health", "/ready", "/metrics", "/openapi.json", "/docs", "/console"];
        let path = req.path();
        if PUBLIC.iter().any(|p| path == *p || path.starts_with(&format!("{p}/"))) {
            return Ok(None);
        }
        let header = req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let session = header.is_none().then(|| req.cookie(crate::console::session::COOKIE)).flatten();
        let from_session = session.is_some();
        let principal = match (header, session) {
            (None, Some(cookie)) => {
                let session = self.sessions.check(cookie.value()).ok_or_else(|| {
                    self.metrics.auth_failures.with_label_values(&["bad_session"]).inc();
                    ApiError::Unauthorized
                })?;
                let safe = matches!(*req.method(), actix_web::http::Method::GET | actix_web::http::Method::HEAD);
                if !safe {
                    session.require_csrf(req.headers()).inspect_err(|_| {
                        self.metrics.auth_failures.with_label_values(&["csrf"]).inc();
                    })?;
                }
                session.principal()
            }
            _ => self.principal_for(header)?,
        };
        if path.starts_with("/admin") && principal.role != Role::Admin && (self.auth.is_some() || from_session) {
            self.metrics.auth_failures.with_label_values(&["not_admin"]).inc();
            return Err(ApiError::Forbidden { message: "this route needs an admin token".into() });
        }
        Ok(Some(principal))
    }

    /// The caller an `Authorization` header names: the bootstrap admin, an anonymous user with
    /// auth off, or whoever the JWT or API key says.
    pub(crate) fn principal_for(&self, header: Option<&str>) -> Result<Principal, ApiError> {
        let bearer = header.and_then(|h| h.strip_prefix("Bearer "));
        if bearer.zip(self.admin_token.as_deref()).is_some_and(|(given, token)| crate::auth::same_secret(given, token))
        {
            return Ok(Principal::plain("bootstrap-admin", "system", Role::Admin));
        }
        let Some(auth) = &self.auth else {
            return Ok(Principal::plain("anonymous", "default", Role::User));
        };
        auth.authenticate(header).map_err(|failure| {
            self.metrics.auth_failures.with_label_values(&[failure.as_str()]).inc();
            ApiError::Unauthorized
        })
    }

    /// Resolves `model` to the base alone or to one adapter version, once, at admission. A
    /// model outside the caller's list is "not found", as if it did not exist. `key` picks
    /// among a routed alias's versions (the same key, the same version).
    async fn resolve(&self, model: &str, caller: &Principal, key: &str) -> Result<Resolution, ApiError> {
        if !caller.may_use(model) {
            return Err(ApiError::ModelNotFound { model: model.to_owned() });
        }
        let engine = self.engine.get().cloned().ok_or(ApiError::NotReady)?;
        if model == self.model_id {
            return Ok(Resolution { engine, adapter: None, shadow: None });
        }
        let not_found = || ApiError::ModelNotFound { model: model.to_owned() };
        let (registry, _) = self.registry.get().ok_or_else(not_found)?;
        let snapshot = registry.snapshot();
        let (name, selector) = adapters::parse_model_ref(model);
        let resolved = snapshot.resolve_for(name, &selector, Some(key)).map_err(|e| {
            if e.is_not_found() || e.is_client_error() {
                not_found()
            } else {
                e.into()
            }
        })?;
        let (name, version) = (resolved.manifest.name.clone(), resolved.manifest.version);
        let shadow = resolved.shadow.zip(resolved.alias).map(|(rule, alias)| crate::shadow::Planned {
            name: name.clone(),
            alias: alias.to_owned(),
            rule,
            served: format!("{name}@{version}"),
        });
        let adapter = self.adapter_handle(&name, version).await?;
        Ok(Resolution { engine, adapter: Some(adapter), shadow })
    }

    /// Version `version` of adapter `name`, loaded (or from the cache).
    pub(crate) async fn adapter_handle(&self, name: &str, version: u64) -> Result<AdapterHandle, ApiError> {
        let (registry, cache) =
            self.registry.get().ok_or_else(|| ApiError::ModelNotFound { model: format!("{name}@{version}") })?;
        let weights = cache.get(name, version, registry.version_dir(name, version)).await?;
        Ok(AdapterHandle { name: name.to_owned(), version, weights })
    }

    /// Concurrency slots free now, and in all.
    pub(crate) fn spare_slots(&self) -> usize {
        self.admission.available_permits()
    }

    pub(crate) fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// From now on `/ready` answers 503, so a load balancer stops sending new requests.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.engine.get().is_some() && !self.draining.load(Ordering::Relaxed)
    }

    /// The embedding model, when `model` names it and the caller may use it. The chat model's
    /// id gets a 400 that says which model embeds; any other name is "not found".
    pub(crate) fn embeddings_for(
        &self,
        model: &str,
        caller: &Principal,
    ) -> Result<&crate::embeddings::Embeddings, ApiError> {
        let served = self.embeddings.get();
        if !caller.may_use(model) {
            return Err(ApiError::ModelNotFound { model: model.to_owned() });
        }
        match served {
            Some(e) if e.id == model => Ok(e),
            _ if model == self.model_id => Err(ApiError::invalid(
                match served {
                    Some(e) => format!("`{model}` is a chat model; embeddings are served by `{}`", e.id),
                    None => format!("`{model}` is a chat model, and this server serves no embedding model"),
                },
                Some("model".to_owned()),
            )),
            _ => Err(ApiError::ModelNotFound { model: model.to_owned() }),
        }
    }

    pub(crate) fn engine_for(&self, model: &str, caller: &Principal) -> Result<Arc<dyn Engine>, ApiError> {
        if model != self.model_id || !caller.may_use(model) {
            return Err(ApiError::ModelNotFound { model: model.to_owned() });
        }
        self.engine.get().cloned().ok_or(ApiError::NotReady)
    }

    /// Admits the caller against the rate limiter. The verdict rides on the request (a 429's
    /// too) so that the outer middleware adds the `x-ratelimit-*` headers to whatever answers.
    pub(crate) async fn admit_caller(&self, req: &actix_web::HttpRequest, caller: &Principal) -> Result<(), ApiError> {
        use actix_web::HttpMessage;
        let verdict = self.limiter.admit(caller).await.map_err(|(e, verdict)| {
            req.extensions_mut().insert(verdict);
            e
        })?;
        req.extensions_mut().insert(verdict);
        Ok(())
    }

    /// A concurrency slot, without waiting: 429 when none is free.
    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.admission.clone().try_acquire_owned().map_err(|_| {
            self.metrics.rejected_concurrency.with_label_values(&["concurrency"]).inc();
            ApiError::RateLimited {
                message: "too many requests are running; retry shortly".into(),
                code: "concurrency_limit_exceeded",
            }
        })
    }

    /// Scores fixed continuations after a prompt with `model` (the base, or an adapter
    /// version resolved once), under a concurrency slot like a generation.
    pub(crate) async fn score(
        &self,
        model: &str,
        caller: &Principal,
        prompt: crate::engine::Prompt,
        continuations: Vec<String>,
    ) -> Result<(crate::engine::Scores, Served), ApiError> {
        let Resolution { engine, adapter, .. } = self.resolve(model, caller, &caller_key(caller)).await?;
        let served = served(engine.as_ref(), adapter.as_ref());
        let _permit = self.permit()?;
        let scores = engine.score(crate::engine::ScoreRequest { prompt, adapter, continuations }).await?;
        self.metrics.prompt_tokens.with_label_values(&[model, &served.adapter]).inc_by(scores.prompt_tokens as u64);
        Ok((scores, served))
    }

    /// [`AppState::admit`], then: the answer is logged with `draft` when it finishes (so
    /// feedback can name it), its tokens are charged to `caller`, and the request's metrics
    /// are labelled with what it resolved to. `n` answers share the prompt (choice 0 is the
    /// one logged).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start_logged(
        &self,
        req: &actix_web::HttpRequest,
        model: &str,
        caller: Principal,
        request: GenerationRequest,
        n: usize,
        draft: crate::feedback::Draft,
        slot: Option<crate::limits::StreamSlot>,
    ) -> Result<Running, ApiError> {
        use actix_web::HttpMessage;
        let key = route_key(req, &caller);
        let request_id = req.extensions().get::<crate::extract::RequestId>().map(|r| r.0.clone());
        let (mut running, shadow) =
            self.admit(model, &caller, request, n, &key, request_id.as_deref().unwrap_or(&key)).await?;
        running.log = Some((self.feedback.clone(), draft));
        if let Some((plan, request)) = shadow {
            if crate::shadow::may_start(self) {
                let (tx, rx) = tokio::sync::oneshot::channel();
                running.shadow = Some(tx);
                if let Some(state) = req.app_data::<actix_web::web::Data<AppState>>() {
                    crate::shadow::spawn(state.clone().into_inner(), plan, request, rx);
                }
            } else {
                self.metrics.shadow_requests.with_label_values(&["skipped"]).inc();
            }
        }
        req.extensions_mut().insert(running.served.clone());
        running.limits = Some((self.limiter.clone(), caller, slot));
        Ok(running)
    }

    /// Takes a concurrency slot (or answers 429) and starts the generation (`n` of them on
    /// one prompt). Returns, when the alias has a shadow rule whose share `shadow_key` falls
    /// in, the rule and the request to mirror.
    async fn admit(
        &self,
        model: &str,
        caller: &Principal,
        mut request: GenerationRequest,
        n: usize,
        key: &str,
        shadow_key: &str,
    ) -> Result<(Running, Option<(crate::shadow::Planned, GenerationRequest)>), ApiError> {
        let Resolution { engine, adapter, shadow } = self.resolve(model, caller, key).await?;
        let served = served(engine.as_ref(), adapter.as_ref());
        let shadow = shadow
            .filter(|plan| crate::shadow::sampled(&plan.rule, &plan.served, shadow_key))
            .map(|plan| (plan, request.clone()));
        request.adapter = adapter;
        let permit = self.permit()?;
        let started = Instant::now();
        let mut generations = if n > 1 {
            engine.generate_n(request, n).await?.into_iter()
        } else {
            vec![engine.generate(request).await?].into_iter()
        };
        let generation = generations.next().ok_or(ApiError::NotReady)?;
        self.metrics.active_generations.inc();
        let running = Running {
            generation,
            more: generations.collect(),
            _permit: permit,
            metrics: self.metrics.clone(),
            model: model.to_owned(),
            started,
            limits: None,
            served,
            log: None,
            outcome: Default::default(),
            shadow: None,
        };
        Ok((running, shadow))
    }
}

/// Who is asking, for a routed alias's sticky choice: the request's `user` field, else the
/// authenticated subject, else (anonymous callers) the request id.
fn route_key(req: &actix_web::HttpRequest, caller: &Principal) -> String {
    use actix_web::HttpMessage;
    let ext = req.extensions();
    if let Some(user) = ext.get::<crate::extract::EndUser>() {
        return format!("user:{}/{}", caller.tenant, user.0);
    }
    if caller.sub != "anonymous" {
        return caller_key(caller);
    }
    ext.get::<crate::extract::RequestId>().map_or_else(|| uuid::Uuid::new_v4().to_string(), |r| format!("req:{}", r.0))
}

fn caller_key(caller: &Principal) -> String {
    format!("sub:{}/{}", caller.tenant, caller.sub)
}

/// What a request resolved to, for its metrics' labels.
fn served(engine: &dyn Engine, adapter: Option<&AdapterHandle>) -> Served {
    Served {
        model: engine.info().id.clone(),
        adapter: adapter.map_or(String::new(), |a| format!("{}@{}", a.name, a.version)),
    }
}
