//! Recommendation over HTTP: items (text embedded with the served embedding model) and
//! behaviour events go into the `recommend` crate's store; `POST /v1/recommend` ranks for a
//! user there and, with `model`, lets the model re-rank the top candidates and explain.

use ::recommend::{NewEvent, Query, RecommendError, Recommender};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{draft, embed, log_answer, message, TaskAnswer, TaskTimer};
use crate::engine::{GenerationRequest, Message, Prompt, Role, Sampling};
use crate::error::ApiError;
use crate::extract::{caller, read_json};
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::respond::{self, Envelope, Served};
use crate::state::AppState;

/// Candidates the model sees when it re-ranks.
pub const RERANK_TOP: usize = 8;
/// The re-ranking instruction; training examples from feedback carry it unchanged.
pub const SYSTEM: &str = "You recommend items. Reply with the id of the item the user most likely wants next, then a colon and a short reason.";

impl From<RecommendError> for ApiError {
    fn from(e: RecommendError) -> Self {
        match e {
            RecommendError::Invalid { param, message } => ApiError::invalid(message, Some(param.to_owned())),
            RecommendError::NotFound { what, id } => ApiError::NotFound { message: format!("no {what} `{id}`") },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

fn store(state: &AppState) -> Result<std::sync::Arc<Recommender>, ApiError> {
    state.recommender.get().cloned().ok_or_else(|| {
        ApiError::invalid(
            "recommendation needs an embedding model, and this server serves none (start it with --embed-model)",
            None,
        )
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    pub id: String,
    /// What the item is; embedded for similarity.
    pub text: String,
    /// A JSON object kept with the item.
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ItemResponse {
    pub id: String,
    /// `recommend.item`
    pub object: String,
    pub text: String,
    pub metadata: serde_json::Value,
    pub created: u64,
    pub updated: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventRequest {
    pub user: String,
    pub item: String,
    /// `view` (1), `click` (2), `add_to_cart`, `like`, `share`, `rating` (3), `purchase` (5), or any name with a `weight`.
    pub event: String,
    pub weight: Option<f32>,
    /// Unix seconds (default: now).
    pub timestamp: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventResponse {
    /// `recommend.event`
    pub object: String,
    pub user: String,
    pub item: String,
    pub event: String,
    pub weight: f32,
    pub timestamp: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    pub user: String,
    /// Items to return, 1 to 100 (default 10).
    pub k: Option<usize>,
    /// Rank only these item ids.
    pub candidates: Option<Vec<String>>,
    /// Leave out items the user already interacted with.
    #[serde(default)]
    pub exclude_seen: bool,
    /// 0 (none, default) to 1: trade score for variety (maximal marginal relevance).
    pub diversity: Option<f32>,
    /// A model (base or `<adapter>@<version|alias>`) that re-ranks the top candidates and explains its pick.
    pub model: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecommendedItem {
    pub id: String,
    pub score: f32,
    pub reason: String,
    pub similarity: Option<f32>,
    pub popularity: f32,
    pub recency: f32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecommendResponse {
    /// What `POST /v1/feedback` takes; a correction is the id of the item the user chose.
    pub id: String,
    /// `recommendation`
    pub object: String,
    pub created: u64,
    pub user: String,
    pub items: Vec<RecommendedItem>,
    /// True when the user has no history: the items are the popular ones.
    pub cold_start: bool,
    /// With `model`: the model's pick and reason (its item moved first).
    pub explanation: Option<String>,
    pub model: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/recommend/items",
    operation_id = "upsert_recommend_item",
    tag = "recommend",
    request_body = ItemRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Registered", body = ItemResponse),
        (status = 200, description = "Replaced (same id)", body = ItemResponse),
        (status = 400, description = "A bad id, blank text, metadata that is not an object, or no embedding model served", body = ErrorResponse),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse)
    )
)]
pub(crate) async fn upsert_item(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: ItemRequest = read_json(&req, payload, state.body_limit).await?;
    let rec = store(&state)?;
    super::required_text(&wire.id, "id", 256)?;
    super::required_text(&wire.text, "text", 32 * 1024)?;
    let metadata = wire.metadata.unwrap_or(serde_json::Value::Null);
    if !(metadata.is_object() || metadata.is_null()) {
        return Err(ApiError::invalid("metadata must be a JSON object", Some("metadata".to_owned())));
    }
    let vector = embed(&state, vec![wire.text.clone()], "text").await?.pop().unwrap_or_default();
    let tenant = caller(&req).tenant;
    let (item, new) =
        web::block(move || rec.upsert_item(&tenant, &wire.id, &wire.text, metadata, vector, super::now())).await??;
    let body = ItemResponse {
        id: item.id,
        object: "recommend.item".into(),
        text: item.text,
        metadata: item.metadata,
        created: item.created,
        updated: item.updated,
    };
    Ok(if new { HttpResponse::Created().json(body) } else { HttpResponse::Ok().json(body) })
}

#[utoipa::path(
    post,
    path = "/v1/recommend/events",
    operation_id = "record_recommend_event",
    tag = "recommend",
    request_body = EventRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Recorded durably; the next recommendation sees it", body = EventResponse),
        (status = 400, description = "A bad user or event name, a weight out of range, an unknown event without a weight, a time in the future", body = ErrorResponse),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "No such item", body = ErrorResponse)
    )
)]
pub(crate) async fn record_event(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: EventRequest = read_json(&req, payload, state.body_limit).await?;
    let rec = store(&state)?;
    let tenant = caller(&req).tenant;
    let event =
        NewEvent { user: wire.user, item: wire.item, event: wire.event, weight: wire.weight, at: wire.timestamp };
    let e = web::block(move || rec.record_event(&tenant, event, super::now())).await??;
    Ok(HttpResponse::Created().json(EventResponse {
        object: "recommend.event".into(),
        user: e.user,
        item: e.item,
        event: e.event,
        weight: e.weight,
        timestamp: e.at,
    }))
}

/// The re-ranking prompt: what the user did recently, then the candidates.
fn rerank_prompt(history: &[(String, String)], candidates: &[(String, String)]) -> Vec<Message> {
    let done: Vec<String> = history.iter().map(|(_, text)| format!("- {text}")).collect();
    let options: Vec<String> = candidates.iter().map(|(id, text)| format!("- {id}: {text}")).collect();
    let history = if done.is_empty() { "(nothing yet)".to_owned() } else { done.join("\n") };
    vec![
        message(Role::System, SYSTEM),
        message(Role::User, format!("The user recently liked:\n{history}\n\nCandidates:\n{}", options.join("\n"))),
    ]
}

#[utoipa::path(
    post,
    path = "/v1/recommend",
    operation_id = "recommend",
    tag = "tasks",
    request_body = RecommendRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Items for the user, best first, each with a reason", body = RecommendResponse),
        (status = 400, description = "A blank user, k or diversity out of range, an unknown candidate", body = ErrorResponse),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "An unknown model", body = ErrorResponse),
        (status = 429, description = "Rate or concurrency limit reached", body = ErrorResponse)
    )
)]
pub(crate) async fn recommend(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let timer = TaskTimer::start(&state, "recommend");
    let result = rank(&state, &req, payload).await;
    timer.finish(result, "ok")
}

async fn rank(state: &AppState, req: &HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let wire: RecommendRequest = read_json(req, payload, state.body_limit).await?;
    let rec = store(state)?;
    let who = caller(req);
    let k = wire.k.unwrap_or(10);
    let diversity = wire.diversity.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&diversity) {
        return Err(ApiError::invalid("diversity must be between 0 and 1", Some("diversity".to_owned())));
    }
    let model = match wire.model {
        Some(m) => Some(super::model_or_base(state, Some(m))?),
        None => None,
    };
    state.admit_caller(req, &who).await?;
    let query = Query {
        user: wire.user.clone(),
        k,
        candidates: wire.candidates,
        exclude_seen: wire.exclude_seen,
        diversity,
        now: super::now(),
    };
    let (tenant, r) = (who.tenant.clone(), rec.clone());
    let ranked = web::block(move || {
        // Other replicas' events first: a new event anywhere changes the next answer.
        r.refresh()?;
        r.recommend(&tenant, &query)
    })
    .await??;
    let text = |id: &str| rec.get_item(&who.tenant, id).map(|i| i.text).unwrap_or_default();
    let history: Vec<(String, String)> = ranked.history.iter().map(|id| (id.clone(), text(id))).collect();
    let top: Vec<(String, String)> =
        ranked.items.iter().take(RERANK_TOP).map(|i| (i.id.clone(), text(&i.id))).collect();
    let messages = rerank_prompt(&history, &top);
    let mut items: Vec<RecommendedItem> = ranked
        .items
        .into_iter()
        .map(|r| RecommendedItem {
            id: r.id,
            score: r.score,
            reason: r.reason,
            similarity: r.similarity,
            popularity: r.popularity,
            recency: r.recency,
        })
        .collect();
    let envelope = Envelope::task("rec", model.clone().unwrap_or_else(|| state.model_id.clone()));
    let params = serde_json::json!({
        "user": wire.user, "k": k, "exclude_seen": wire.exclude_seen, "diversity": diversity,
        "candidates": top.iter().map(|(id, _)| id).collect::<Vec<_>>(),
    });
    let mut explanation = None;
    match &model {
        Some(model) if !items.is_empty() => {
            let sampling = Sampling { stop: vec!["\n".into()], ..Sampling::default() };
            let log = draft(&who, "recommend", &messages, params);
            let request = GenerationRequest {
                prompt: Prompt::Chat(messages),
                adapter: None,
                max_tokens: Some(64),
                sampling,
                tools: None,
            };
            let mut running = state.start_logged(req, model, who.clone(), request, 1, log, None).await?;
            let done = respond::collect(&envelope, &mut running).await?;
            let said = done.text.trim().to_owned();
            // The model's pick moves first when it names one of the candidates.
            let picked =
                said.split([':', ' ', '\n']).next().unwrap_or_default().trim().trim_matches(['*', '"', '\'', '`']);
            if let Some(pos) = items.iter().take(RERANK_TOP).position(|i| i.id == picked) {
                let mut item = items.remove(pos);
                let why = said.split_once(':').map(|(_, r)| r.trim().to_owned()).filter(|r| !r.is_empty());
                if let Some(why) = &why {
                    item.reason = format!("{why} (picked by the model)");
                }
                items.insert(0, item);
            }
            explanation = Some(said);
        }
        _ => {
            let served = Served { model: state.model_id.clone(), adapter: String::new() };
            let answer = items.first().map(|i| i.id.clone()).unwrap_or_default();
            log_answer(
                state,
                &who,
                TaskAnswer {
                    task: "recommend",
                    id: &envelope.id,
                    created: envelope.created,
                    served: &served,
                    messages: &messages,
                    answer: &answer,
                    params,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                },
            );
        }
    }
    Ok(HttpResponse::Ok().json(RecommendResponse {
        id: envelope.id,
        object: "recommendation".into(),
        created: envelope.created,
        user: wire.user,
        items,
        cold_start: ranked.cold_start,
        explanation,
        model,
    }))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/recommend/items", web::post().to(upsert_item))
        .route("/v1/recommend/events", web::post().to(record_event))
        .route("/v1/recommend", web::post().to(recommend));
}
