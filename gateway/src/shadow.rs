//! Shadow traffic: a sampled share of an alias's requests is also answered by another version
//! when the engine has room. The shadow's answer is logged beside the served one
//! (`<data>/shadow/<adapter>.jsonl`) and never returned; `GET /admin/adapters/{name}/shadow`
//! compares them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use adapters::ShadowRule;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::engine::{Event, GenerationRequest};
use crate::error::ApiError;
use crate::extract::read_json;
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::state::AppState;

/// Under the data directory.
pub const SHADOW_DIR: &str = "shadow";

/// The served answer, sent by the request when it finishes.
#[derive(Debug, Clone)]
pub struct ServedAnswer {
    pub id: String,
    pub text: String,
    pub seconds: f64,
    pub tokens: usize,
}

/// A request the shadow rule picked, waiting to run.
pub(crate) struct Planned {
    pub name: String,
    pub alias: String,
    pub rule: ShadowRule,
    pub served: String,
}

/// One line of the shadow log: both answers of one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShadowRecord {
    pub at: u64,
    pub response_id: String,
    pub alias: String,
    /// `name@version` of each side.
    pub served: String,
    pub shadow: String,
    pub served_answer: String,
    pub shadow_answer: String,
    pub exact: bool,
    /// Cosine similarity of the two answers' embeddings, when an embedding model is loaded.
    pub similarity: Option<f32>,
    pub served_tokens: usize,
    pub shadow_tokens: usize,
    pub served_seconds: f64,
    pub shadow_seconds: f64,
    pub error: Option<String>,
}

/// Whether `key` (the request id) falls in the rule's sampled share: a stable hash, so every
/// replica samples the same requests.
pub(crate) fn sampled(rule: &ShadowRule, scope: &str, key: &str) -> bool {
    let point = adapters::registry::sticky_hash(&format!("shadow:{scope}"), key) as f64 / u64::MAX as f64;
    point < rule.share
}

/// Whether the gateway has room for a shadow row: at least half the concurrency slots free.
pub(crate) fn has_room(state: &AppState) -> bool {
    state.spare_slots() * 2 >= state.max_concurrent()
}

/// Whether another shadow may start: room, and fewer pending than half the slots (the engine
/// parks shadow rows while served rows run, so under steady load they wait).
pub(crate) fn may_start(state: &AppState) -> bool {
    has_room(state) && state.shadows_pending.load(Ordering::Relaxed) * 2 < state.max_concurrent().max(2)
}

/// A shadow that has had no token for this long (the engine kept it parked behind served
/// traffic) is dropped, freeing its memory.
const STALL: Duration = Duration::from_secs(30);

/// Counts a pending shadow until dropped.
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs the shadow generation in the background and logs it beside the served answer. It
/// takes no concurrency slot, and it is cancelled as soon as the gateway runs short of room,
/// so the served request is never refused or slowed for it beyond sharing engine steps.
pub(crate) fn spawn(
    state: Arc<AppState>,
    plan: Planned,
    request: GenerationRequest,
    served: oneshot::Receiver<ServedAnswer>,
) {
    state.shadows_pending.fetch_add(1, Ordering::Relaxed);
    let pending = Pending(state.shadows_pending.clone());
    tokio::spawn(async move {
        let _pending = pending;
        let started = Instant::now();
        let shadow_label = format!("{}@{}", plan.name, plan.rule.version);
        let outcome = run(&state, &plan, request).await;
        let shadow_seconds = started.elapsed().as_secs_f64();
        let (text, tokens, error) = match outcome {
            Ok(Some((text, tokens))) => (text, tokens, None),
            Ok(None) => {
                state.metrics.shadow_requests.with_label_values(&["dropped"]).inc();
                return;
            }
            Err(e) => (String::new(), 0, Some(e)),
        };
        // The served side may have failed or been abandoned; then there is nothing to compare.
        let Ok(answer) = served.await else { return };
        let similarity = match (&error, state.embeddings.get()) {
            (None, Some(e)) => similarity(e, &answer.text, &text).await,
            _ => None,
        };
        let record = ShadowRecord {
            at: crate::tasks::now(),
            response_id: answer.id,
            alias: plan.alias,
            served: plan.served,
            shadow: shadow_label,
            exact: error.is_none() && answer.text == text,
            served_answer: answer.text,
            shadow_answer: text,
            similarity,
            served_tokens: answer.tokens,
            shadow_tokens: tokens,
            served_seconds: answer.seconds,
            shadow_seconds,
            error,
        };
        let outcome = if record.error.is_some() { "failed" } else { "compared" };
        state.metrics.shadow_requests.with_label_values(&[outcome]).inc();
        let log = state.shadow_log.clone();
        let dir = state.data_dir.join(SHADOW_DIR);
        let name = plan.name;
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = log.append(&dir, &name, &record) {
                tracing::error!(error = %e, "cannot write the shadow log");
            }
        })
        .await;
    });
}

/// The shadow's text and token count; `None` when it was dropped for load.
async fn run(
    state: &AppState,
    plan: &Planned,
    mut request: GenerationRequest,
) -> Result<Option<(String, usize)>, String> {
    let adapter = state.adapter_handle(&plan.name, plan.rule.version).await.map_err(|e| e.to_string())?;
    request.adapter = Some(adapter);
    request.sampling.background = true;
    let engine = state.engine.get().cloned().ok_or("the engine is not loaded")?;
    let mut generation = engine.generate(request).await.map_err(|e| e.to_string())?;
    let mut text = String::new();
    loop {
        let Ok(event) = tokio::time::timeout(STALL, generation.events.recv()).await else {
            return Ok(None);
        };
        let Some(event) = event else { break };
        if !has_room(state) {
            return Ok(None);
        }
        match event {
            Event::Delta(d) => text.push_str(&d),
            Event::Logprob(_) | Event::PromptLogprobs(_) => {}
            Event::Finished { completion_tokens, .. } => return Ok(Some((text, completion_tokens))),
            Event::Failed(msg) => return Err(msg),
        }
    }
    Err("the engine ended the shadow generation without finishing it".into())
}

async fn similarity(embeddings: &crate::embeddings::Embeddings, a: &str, b: &str) -> Option<f32> {
    let encoder = embeddings.encoder();
    let (a, b) = (a.to_owned(), b.to_owned());
    let ids = tokio::task::spawn_blocking(move || -> Option<Vec<Vec<u32>>> {
        Some(vec![encoder.tokenize(&a).ok()?.ids, encoder.tokenize(&b).ok()?.ids])
    })
    .await
    .ok()??;
    let vectors = embeddings.embed(ids).await.ok()?;
    let (x, y) = (vectors.first()?, vectors.get(1)?);
    // The vectors are L2-normalised: the dot product is the cosine.
    Some(x.iter().zip(y).map(|(a, b)| a * b).sum())
}

/// Appends shadow records, one file per adapter kept open, writers serialised.
#[derive(Default)]
pub struct ShadowLog {
    files: Mutex<std::collections::HashMap<String, protocol::jsonl::Appender>>,
}

impl ShadowLog {
    fn append(&self, dir: &std::path::Path, name: &str, record: &ShadowRecord) -> Result<(), String> {
        let mut files = self.files.lock();
        if !files.contains_key(name) {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            let file =
                protocol::jsonl::Appender::open(&dir.join(format!("{name}.jsonl"))).map_err(|e| e.to_string())?;
            files.insert(name.to_owned(), file);
        }
        let file = files.get_mut(name).ok_or("the shadow log was not opened")?;
        file.append(record, protocol::jsonl::Durability::Written).map(|_| ()).map_err(|e| e.to_string())
    }
}

/// One rule's comparison: how often the answers agree, and how the two sides differ.
#[derive(Debug, Default, Serialize)]
struct Report {
    alias: String,
    served: String,
    shadow: String,
    compared: u64,
    errors: u64,
    exact_match_rate: f64,
    mean_similarity: Option<f64>,
    mean_served_tokens: f64,
    mean_shadow_tokens: f64,
    mean_served_seconds: f64,
    mean_shadow_seconds: f64,
    #[serde(skip)]
    similarity_n: u64,
}

fn report(records: &[ShadowRecord]) -> Vec<Report> {
    let mut by: BTreeMap<(String, String, String), Report> = BTreeMap::new();
    for r in records {
        let key = (r.alias.clone(), r.served.clone(), r.shadow.clone());
        let rep = by.entry(key).or_insert_with(|| Report {
            alias: r.alias.clone(),
            served: r.served.clone(),
            shadow: r.shadow.clone(),
            ..Report::default()
        });
        if r.error.is_some() {
            rep.errors += 1;
            continue;
        }
        rep.compared += 1;
        rep.exact_match_rate += f64::from(u8::from(r.exact));
        if let Some(s) = r.similarity {
            *rep.mean_similarity.get_or_insert(0.0) += f64::from(s);
            rep.similarity_n += 1;
        }
        rep.mean_served_tokens += r.served_tokens as f64;
        rep.mean_shadow_tokens += r.shadow_tokens as f64;
        rep.mean_served_seconds += r.served_seconds;
        rep.mean_shadow_seconds += r.shadow_seconds;
    }
    by.into_values()
        .map(|mut r| {
            let n = r.compared.max(1) as f64;
            r.exact_match_rate /= n;
            r.mean_served_tokens /= n;
            r.mean_shadow_tokens /= n;
            r.mean_served_seconds /= n;
            r.mean_shadow_seconds /= n;
            if let Some(s) = r.mean_similarity.as_mut() {
                *s /= r.similarity_n.max(1) as f64;
            }
            r
        })
        .collect()
}

#[utoipa::path(
    operation_id = "set_shadow",
    put,
    path = "/admin/adapters/{name}/aliases/{alias}/shadow",
    tag = "admin",
    params(("name" = String, Path), ("alias" = String, Path)),
    request_body = protocol::api::SetShadow,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The alias with its shadow rule", body = Object),
        crate::admin::AdminErrors
    )
)]
pub(crate) async fn set(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let registry = crate::admin::authorize(&state, &req)?;
    let (name, alias) = path.into_inner();
    let body: protocol::api::SetShadow = read_json(&req, payload, state.body_limit).await?;
    let who = crate::extract::caller(&req).sub;
    let rule = ShadowRule { version: body.version, share: body.share };
    let n = name.clone();
    let alias_state = web::block(move || registry.set_shadow(&n, &alias, Some(rule), &who)).await??;
    state.announce(&name).await;
    Ok(HttpResponse::Ok().json(alias_state))
}

#[utoipa::path(
    operation_id = "remove_shadow",
    delete,
    path = "/admin/adapters/{name}/aliases/{alias}/shadow",
    tag = "admin",
    params(("name" = String, Path), ("alias" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The alias without a shadow rule", body = Object),
        crate::admin::AdminErrors
    )
)]
pub(crate) async fn remove(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let registry = crate::admin::authorize(&state, &req)?;
    let (name, alias) = path.into_inner();
    let who = crate::extract::caller(&req).sub;
    let n = name.clone();
    let alias_state = web::block(move || registry.set_shadow(&n, &alias, None, &who)).await??;
    state.announce(&name).await;
    Ok(HttpResponse::Ok().json(alias_state))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReportQuery {
    /// Also return the last this many records (0 to 1000).
    #[serde(default)]
    records: usize,
}

#[utoipa::path(
    operation_id = "shadow_report",
    get,
    path = "/admin/adapters/{name}/shadow",
    tag = "admin",
    params(("name" = String, Path), ("records" = Option<usize>, Query, description = "Also return the last this many logged pairs (at most 1000)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Per shadow rule: requests compared, exact-match rate, mean embedding similarity, mean lengths and latencies of both sides, errors; with the last records when asked", body = Object),
        crate::admin::AdminErrors
    )
)]
pub(crate) async fn show(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<ReportQuery>,
) -> Result<HttpResponse, ApiError> {
    let registry = crate::admin::authorize(&state, &req)?;
    let name = path.into_inner();
    if registry.snapshot().adapter(&name).is_none() {
        adapters::registry::validate_adapter_name(&name)?;
        return Err(adapters::AdapterError::AdapterNotFound { name }.into());
    }
    let file = state.data_dir.join(SHADOW_DIR).join(format!("{name}.jsonl"));
    let records = web::block(move || -> Result<Vec<ShadowRecord>, String> {
        match std::fs::metadata(&file) {
            Ok(_) => protocol::jsonl::read::<ShadowRecord>(&file).map(|r| r.records).map_err(|e| e.to_string()),
            Err(_) => Ok(Vec::new()),
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(ApiError::Internal)?;
    let keep = query.records.min(1000);
    let last = &records[records.len().saturating_sub(keep)..];
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({"object": "shadow_report", "rules": report(&records), "records": last})))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/adapters/{name}/aliases/{alias}/shadow", web::put().to(set))
        .route("/admin/adapters/{name}/aliases/{alias}/shadow", web::delete().to(remove))
        .route("/admin/adapters/{name}/shadow", web::get().to(show));
}
