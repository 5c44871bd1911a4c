//! HTTP for feedback: `POST /v1/feedback` for clients, and the admin review queue
//! (`GET /admin/feedback`, `POST /admin/feedback/{id}/review`).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

#[allow(unused_imports)]
use protocol::FeedbackRecord;
use protocol::{ReviewStatus, Reviewed, Thumbs};

use crate::error::ApiError;
use crate::extract::{caller, read_json};
use crate::feedback::FeedbackFilter;
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::state::AppState;

/// Most tags on one feedback record, and longest tag.
const MAX_TAGS: usize = 32;
const MAX_TAG_LEN: usize = 64;

/// Feedback on one answer: at least one of `thumbs`, `rating`, `correction`, `comment`, `tags`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The `id` of a chat or text completion this gateway returned.
    pub response_id: String,
    pub thumbs: Option<Thumbs>,
    /// 1 (worst) to 5 (best).
    pub rating: Option<u8>,
    /// What the answer should have been.
    pub correction: Option<String>,
    pub comment: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Redis lookups, 50 ms apart, for a response id this replica did not answer.
const LOOKUP_ATTEMPTS: usize = 10;

#[utoipa::path(
    post,
    path = "/v1/feedback",
    operation_id = "create_feedback",
    tag = "feedback",
    request_body = FeedbackRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Stored durably", body = FeedbackRecord),
        (status = 400, description = "Malformed or empty feedback", body = ErrorResponse, example = json!({"error": {"message": "rating must be between 1 and 5", "type": "invalid_request_error", "param": "rating", "code": "invalid_value"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}})),
        (status = 404, description = "No such response (or not the caller's tenant's)", body = ErrorResponse, example = json!({"error": {"message": "no response with id `chatcmpl-x`", "type": "invalid_request_error", "param": null, "code": "not_found"}})),
        (status = 409, description = "This caller already gave feedback on this response", body = ErrorResponse, example = json!({"error": {"message": "feedback on `chatcmpl-x` was already given", "type": "conflict_error", "param": null, "code": "conflict"}}))
    )
)]
pub(crate) async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: FeedbackRequest = read_json(&req, payload, state.body_limit).await?;
    if wire.response_id.trim().is_empty() {
        return Err(ApiError::invalid("response_id must name a response", Some("response_id".to_owned())));
    }
    if wire.rating.is_some_and(|r| !(1..=5).contains(&r)) {
        return Err(ApiError::invalid("rating must be between 1 and 5", Some("rating".to_owned())));
    }
    let blank = |s: &Option<String>| s.as_deref().is_none_or(|t| t.trim().is_empty());
    if wire.thumbs.is_none()
        && wire.rating.is_none()
        && blank(&wire.correction)
        && blank(&wire.comment)
        && wire.tags.is_empty()
    {
        return Err(ApiError::invalid(
            "feedback needs at least one of thumbs, rating, correction, comment or tags",
            None,
        ));
    }
    if wire.tags.len() > MAX_TAGS || wire.tags.iter().any(|t| t.trim().is_empty() || t.len() > MAX_TAG_LEN) {
        return Err(ApiError::invalid(
            format!("tags: at most {MAX_TAGS}, each 1 to {MAX_TAG_LEN} characters"),
            Some("tags".to_owned()),
        ));
    }
    let who = caller(&req);
    let store = state.feedback.clone();
    let response_id = wire.response_id.trim().to_owned();
    let shared = store.shared.get().cloned();
    if let Some(shared) = &shared {
        // An answer another replica gave, and the one-per-user rule across replicas.
        // The replica that answered records it in Redis just after its answer goes out, so an
        // id not there yet is asked for again for up to half a second before it is unknown.
        for attempt in 0..LOOKUP_ATTEMPTS {
            if store.knows(&who.tenant, &response_id) {
                break;
            }
            if let Some(by) = shared.lookup(&response_id).await.filter(|b| b.tenant == who.tenant) {
                store.remember(&response_id, &by);
                break;
            }
            if attempt + 1 < LOOKUP_ATTEMPTS {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        if store.knows(&who.tenant, &response_id) && shared.claim(&response_id, &who.sub).await == Some(false) {
            return Err(ApiError::Conflict { message: format!("feedback on `{response_id}` was already given") });
        }
    }
    let (sub, rid) = (who.sub.clone(), response_id.clone());
    // The store fsyncs before it answers: off the async workers.
    let stored = web::block(move || {
        store.add(
            &who.tenant,
            &who.sub,
            &response_id,
            wire.thumbs,
            wire.rating,
            wire.correction.filter(|c| !c.trim().is_empty()),
            wire.comment.filter(|c| !c.trim().is_empty()),
            wire.tags,
        )
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let record = match (stored, &shared) {
        (Ok(record), Some(shared)) => {
            shared.publish(&record).await;
            record
        }
        (Ok(record), None) => record,
        (Err(e), Some(shared)) => {
            if !matches!(e, ApiError::Conflict { .. }) {
                shared.release(&rid, &sub).await;
            }
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    Ok(HttpResponse::Created().json(record))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `pending`, `accepted` or `rejected`; all when absent.
    status: Option<ReviewStatus>,
    /// An adapter name (any version) or `name@version`.
    adapter: Option<String>,
    /// The application endpoint that answered (`classify`, `qa`, `generate`, `recommend`).
    task: Option<String>,
    /// One of the feedback's tags.
    tag: Option<String>,
    /// Exactly this rating (1-5).
    rating: Option<u8>,
    /// Given at or after (unix seconds).
    since: Option<u64>,
    /// Given before (unix seconds).
    until: Option<u64>,
    #[serde(default)]
    offset: usize,
    /// At most 1000 [default: 100].
    limit: Option<usize>,
}

/// A feedback record with its review state, the endpoint that answered, and the prompt and
/// answer it is about (when the completion log holds them).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FeedbackItem {
    #[serde(flatten)]
    pub(crate) reviewed: Reviewed,
    pub(crate) task: Option<String>,
    pub(crate) completion: Option<protocol::CompletionText>,
}

impl FeedbackItem {
    /// The items for `records`, with their completions looked up in one pass over the logs.
    pub(crate) fn for_records(store: &crate::feedback::FeedbackStore, records: Vec<Reviewed>) -> Vec<Self> {
        let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.feedback.response_id.as_str()).collect();
        let mut completions = store.completions(&ids);
        records
            .into_iter()
            .map(|reviewed| {
                let completion = completions.remove(&reviewed.feedback.response_id);
                let task = store.task_of(&reviewed.feedback.response_id);
                Self { reviewed, task, completion }
            })
            .collect()
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FeedbackList {
    /// Always `list`.
    object: String,
    data: Vec<FeedbackItem>,
}

#[utoipa::path(
    get,
    path = "/admin/feedback",
    operation_id = "list_feedback",
    tag = "admin",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Feedback with its review state and the answer it is about, oldest first", body = FeedbackList),
        (status = 400, description = "A bad query string", body = ErrorResponse, example = json!({"error": {"message": "invalid query string: invalid digit found in string", "type": "invalid_request_error", "param": null, "code": "invalid_value"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}})),
        (status = 403, description = "Not an admin", body = ErrorResponse, example = json!({"error": {"message": "this route needs an admin token", "type": "permission_error", "param": null, "code": "forbidden"}}))
    )
)]
pub(crate) async fn list(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    let q = query.into_inner();
    let limit = q.limit.unwrap_or(100).min(1000);
    let filter = FeedbackFilter {
        adapter: q.adapter,
        task: q.task,
        tag: q.tag,
        rating: q.rating,
        max_rating: None,
        thumbs: None,
        since: q.since,
        until: q.until,
    };
    let store = state.feedback.clone();
    let data = web::block(move || {
        let records = store.list(q.status, &filter, q.offset, limit);
        FeedbackItem::for_records(&store, records)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(FeedbackList { object: "list".into(), data }))
}

/// Accept (optionally with an edited correction) or reject one feedback record.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewRequest {
    /// `accept` or `reject`.
    action: ReviewAction,
    /// With `accept`: the correction to train on instead of the user's.
    correction: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReviewAction {
    Accept,
    Reject,
}

#[utoipa::path(
    post,
    path = "/admin/feedback/{id}/review",
    operation_id = "review_feedback",
    tag = "admin",
    params(("id" = String, Path, description = "Feedback id (`fb-…`)")),
    request_body = ReviewRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Reviewed; stored durably", body = Reviewed),
        (status = 400, description = "Malformed review", body = ErrorResponse, example = json!({"error": {"message": "a correction can only come with accept", "type": "invalid_request_error", "param": "correction", "code": "invalid_value"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}})),
        (status = 403, description = "Not an admin", body = ErrorResponse, example = json!({"error": {"message": "this route needs an admin token", "type": "permission_error", "param": null, "code": "forbidden"}})),
        (status = 404, description = "No such feedback", body = ErrorResponse, example = json!({"error": {"message": "no feedback with id `fb-x`", "type": "invalid_request_error", "param": null, "code": "not_found"}}))
    )
)]
pub(crate) async fn review(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    let wire: ReviewRequest = read_json(&req, payload, state.body_limit).await?;
    let status = match wire.action {
        ReviewAction::Accept => ReviewStatus::Accepted,
        ReviewAction::Reject => ReviewStatus::Rejected,
    };
    if matches!(wire.action, ReviewAction::Reject) && wire.correction.is_some() {
        return Err(ApiError::invalid("a correction can only come with accept", Some("correction".to_owned())));
    }
    let reviewer = caller(&req).sub;
    let store = state.feedback.clone();
    let id = path.into_inner();
    let (reviewed, record) =
        web::block(move || store.review(&id, status, wire.correction.filter(|c| !c.trim().is_empty()), &reviewer))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
    if let Some(shared) = state.feedback.shared.get() {
        shared.publish_review(&record).await;
    }
    Ok(HttpResponse::Ok().json(reviewed))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/feedback", web::post().to(create))
        .route("/admin/feedback", web::get().to(list))
        .route("/admin/feedback/{id}/review", web::post().to(review));
}
