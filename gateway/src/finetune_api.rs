//! The admin API for training jobs: start one (on reviewed feedback or a dataset file under the
//! import root), list them, follow one's loss curve (polling or SSE) and cancel it. Jobs live
//! in the queue the `finetune` sidecar runs (`protocol::jobs`, under `<data_dir>/finetune/`).

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use protocol::api::ObjectList;
use protocol::jobs::{DatasetRef, JobStatus, JobStore};
use protocol::params::TrainArgs;
use serde::Deserialize;

use crate::error::ApiError;
use crate::extract::read_json;
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::state::AppState;

/// The errors every job route answers with.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum JobErrors {
    #[response(status = 400, description = "Invalid request: a bad path segment, query or body", example = json!({"error": {"message": "invalid query string: invalid digit found in string", "type": "invalid_request_error", "param": null, "code": "invalid_value"}}))]
    Invalid(ErrorResponse),
    #[response(status = 401, description = "Missing or invalid bearer token", example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}))]
    Unauthorized(ErrorResponse),
    #[response(status = 403, description = "Not an admin", example = json!({"error": {"message": "this route needs an admin token", "type": "permission_error", "param": null, "code": "forbidden"}}))]
    NotAdmin(ErrorResponse),
    #[response(status = 404, description = "No such job", example = json!({"error": {"message": "no training job with id `ftjob-1`", "type": "invalid_request_error", "param": null, "code": "not_found"}}))]
    Unknown(ErrorResponse),
}

/// Where a job's examples come from.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DatasetRequest {
    /// Accepted feedback records.
    Feedback,
    /// A dataset file (alpaca, sharegpt, messages, preference or KTO; JSON or JSONL), relative
    /// to the import root.
    File { path: String },
    /// A dataset uploaded with `POST /admin/finetune/datasets`.
    Uploaded { id: String },
}

/// A training job to queue.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJobRequest {
    /// The adapter the result is registered under (as a new version, alias `candidate`).
    adapter: String,
    dataset: DatasetRequest,
    /// Hyper-parameters by their `finetune train` flag names with `_` (`lora_rank`,
    /// `learning_rate`, `epochs`, `batch_size`, `grad_accum`, `cutoff_len`, `val_ratio`,
    /// `seed`, `stage`, ...); unset ones keep their defaults.
    #[serde(default)]
    #[schema(value_type = Object)]
    params: serde_json::Value,
    /// Promote the result to `prod` when it beats the current version by this much.
    #[serde(default)]
    promote_margin: Option<f64>,
}

fn store(state: &AppState) -> JobStore {
    JobStore::under(&state.data_dir)
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound { message: format!("no training job with id `{id}`") }
}

/// The status with the step the running job's log has reached.
fn with_progress(store: &JobStore, mut status: JobStatus) -> JobStatus {
    if let Some(last) = store.log_after(&status.id, status.step).last() {
        status.step = last.step;
        if last.total_steps > 0 {
            status.total_steps = last.total_steps;
        }
    }
    status
}

#[utoipa::path(
    post,
    path = "/admin/finetune/jobs",
    operation_id = "create_finetune_job",
    tag = "admin",
    request_body = CreateJobRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Queued; the `finetune` sidecar runs it", body = Object),
        (status = 400, description = "Invalid job", body = ErrorResponse, example = json!({"error": {"message": "--lora-rank must be in 1..=256, got 0", "type": "invalid_request_error", "param": "params", "code": "invalid_value"}})),
        JobErrors
    )
)]
pub(crate) async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    let body: CreateJobRequest = read_json(&req, payload, state.body_limit).await?;
    adapters::registry::validate_adapter_name(&body.adapter)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("adapter".into())))?;
    let params: TrainArgs =
        serde_json::from_value(if body.params.is_null() { serde_json::json!({}) } else { body.params })
            .map_err(|e| ApiError::invalid(format!("params: {e}"), Some("params".into())))?;
    // Values are checked now; the learning rate's default depends on the model and is set later.
    params.resolve(0).map_err(|e| ApiError::invalid(e, Some("params".into())))?;
    if body.promote_margin.is_some_and(|m| !m.is_finite() || m < 0.0) {
        return Err(ApiError::invalid("promote_margin must be a number >= 0", Some("promote_margin".into())));
    }
    let dataset = match body.dataset {
        DatasetRequest::Feedback => DatasetRef::Feedback,
        DatasetRequest::File { path } => {
            let Some(root) = state.import_root.clone() else {
                return Err(ApiError::Forbidden {
                    message: "dataset files are disabled: set SWITCHYARD_IMPORT_ROOT".into(),
                });
            };
            let missing = || {
                ApiError::invalid(
                    format!("no dataset file `{path}` under the import root"),
                    Some("dataset.path".into()),
                )
            };
            let full = adapters::peft::ensure_within(&root, std::path::Path::new(&path)).map_err(|_| missing())?;
            if !full.is_file() {
                return Err(missing());
            }
            DatasetRef::File { path: full }
        }
        DatasetRequest::Uploaded { id } => {
            let path = store(&state)
                .dataset_path(&id)
                .ok_or_else(|| ApiError::invalid(format!("no uploaded dataset `{id}`"), Some("dataset.id".into())))?;
            DatasetRef::File { path }
        }
    };
    let who = crate::extract::caller(&req).sub;
    let store = store(&state);
    let (adapter, margin) = (body.adapter, body.promote_margin);
    let status = web::block(move || store.create(&adapter, dataset, params, margin, &who))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Created().json(status))
}

#[utoipa::path(
    get,
    path = "/admin/finetune/jobs",
    operation_id = "list_finetune_jobs",
    tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, description = "Every job, newest first", body = Object), JobErrors)
)]
pub(crate) async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    let store = store(&state);
    let data: Vec<JobStatus> = store.list().into_iter().map(|s| with_progress(&store, s)).collect();
    Ok(HttpResponse::Ok().json(ObjectList::new(data)))
}

#[utoipa::path(
    get,
    path = "/admin/finetune/jobs/{id}",
    operation_id = "show_finetune_job",
    tag = "admin",
    params(("id" = String, Path, description = "Job id (`ftjob-…`)")),
    security(("bearer" = [])),
    responses((status = 200, description = "The job's state, progress, version and evaluation", body = Object), JobErrors)
)]
pub(crate) async fn show(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    let store = store(&state);
    let id = path.into_inner();
    let status = store.status(&id).ok_or_else(|| not_found(&id))?;
    Ok(HttpResponse::Ok().json(with_progress(&store, status)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only steps after this one [default: 0].
    #[serde(default)]
    after: usize,
    /// Keep the response open and send each new step as a server-sent event until the job
    /// ends (`data: [DONE]`).
    #[serde(default)]
    stream: bool,
}

#[utoipa::path(
    get,
    path = "/admin/finetune/jobs/{id}/events",
    operation_id = "finetune_job_events",
    tag = "admin",
    params(("id" = String, Path, description = "Job id (`ftjob-…`)"), EventsQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The loss curve: one object per step (step, epoch, loss, lr, grad_norm, tokens_per_s, val_loss when evaluated); with `stream=true`, each step as a server-sent event until the job ends (`data: [DONE]`)", content((Object = "application/json"), (Object = "text/event-stream"))), JobErrors)
)]
pub(crate) async fn events(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    let store = store(&state);
    let id = path.into_inner();
    store.status(&id).ok_or_else(|| not_found(&id))?;
    if !query.stream {
        return Ok(HttpResponse::Ok().json(ObjectList::new(store.log_after(&id, query.after))));
    }
    let body = futures::stream::unfold((store, id, query.after, false), |(store, id, after, done)| async move {
        if done {
            return None;
        }
        loop {
            let steps = store.log_after(&id, after);
            if let Some(last) = steps.last() {
                let next = last.step;
                let text: String = steps
                    .iter()
                    .map(|s| format!("data: {}\n\n", serde_json::to_string(s).unwrap_or_default()))
                    .collect();
                return Some((Ok::<_, actix_web::Error>(web::Bytes::from(text)), (store, id, next, false)));
            }
            if store.status(&id).is_none_or(|s| s.state.is_finished()) {
                return Some((Ok(web::Bytes::from_static(b"data: [DONE]\n\n")), (store, id, after, true)));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(body))
}

#[utoipa::path(
    post,
    path = "/admin/finetune/jobs/{id}/cancel",
    operation_id = "cancel_finetune_job",
    tag = "admin",
    params(("id" = String, Path, description = "Job id (`ftjob-…`)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Cancelled (queued) or asked to stop at its next step (running)", body = Object),
        JobErrors,
        (status = 409, description = "The job already finished", body = ErrorResponse, example = json!({"error": {"message": "training job `ftjob-1` already finished (succeeded)", "type": "conflict_error", "param": null, "code": "conflict"}}))
    )
)]
pub(crate) async fn cancel(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    let store = store(&state);
    let id = path.into_inner();
    match store.cancel(&id) {
        None => Err(not_found(&id)),
        Some(Ok(status)) => Ok(HttpResponse::Ok().json(status)),
        Some(Err(status)) => Err(ApiError::Conflict {
            message: format!(
                "training job `{id}` already finished ({})",
                serde_json::to_value(status.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
            ),
        }),
    }
}

/// Largest dataset upload; datasets are streamed to disk, never held in memory whole.
const MAX_DATASET_BYTES: usize = 1 << 30;

#[utoipa::path(
    post,
    path = "/admin/finetune/datasets",
    operation_id = "upload_finetune_dataset",
    tag = "admin",
    request_body(content = String, content_type = "application/octet-stream", description = "The dataset file as it is: a JSON array or JSONL in the alpaca, sharegpt, messages, preference or KTO layout"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Stored: `id` (content-addressed), bytes, detected format, records, examples and records dropped while reading", body = Object),
        (status = 400, description = "Not a dataset", body = ErrorResponse, example = json!({"error": {"message": "upload: line 2: expected value at line 1 column 1", "type": "invalid_request_error", "param": null, "code": "invalid_json"}})),
        (status = 413, description = "Over 1 GiB", body = ErrorResponse, example = json!({"error": {"message": "request body is larger than the limit of 1073741824 bytes", "type": "invalid_request_error", "param": null, "code": "payload_too_large"}})),
        JobErrors
    )
)]
pub(crate) async fn upload(
    state: web::Data<AppState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    use futures::StreamExt;
    use sha2::Digest;
    use std::io::Write;
    crate::admin::require_admin(&state, &req)?;
    let dir = store(&state).datasets_dir();
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::Internal(format!("datasets directory: {e}")))?;
    let tmp = dir.join(format!(".upload-{}", uuid::Uuid::new_v4().simple()));
    let mut file = std::fs::File::create(&tmp).map_err(|e| ApiError::Internal(format!("dataset upload: {e}")))?;
    let (mut hasher, mut bytes) = (sha2::Sha256::new(), 0usize);
    let cleanup = |e: ApiError| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| cleanup(ApiError::invalid(format!("upload interrupted: {e}"), None)))?;
        bytes += chunk.len();
        if bytes > MAX_DATASET_BYTES {
            return Err(cleanup(ApiError::PayloadTooLarge { limit: MAX_DATASET_BYTES }));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(|e| cleanup(ApiError::Internal(format!("dataset upload: {e}"))))?;
    }
    file.sync_all().map_err(|e| cleanup(ApiError::Internal(format!("dataset upload: {e}"))))?;
    drop(file);
    let check = tmp.clone();
    let loaded = web::block(move || protocol::dataset::load_file(&check))
        .await
        .map_err(|e| cleanup(ApiError::Internal(e.to_string())))?;
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            let message = e.to_string().replace(&tmp.display().to_string(), "upload");
            return Err(cleanup(ApiError::InvalidRequest { message, param: None, code: e.code() }));
        }
    };
    let id = format!("{}{}", protocol::names::DATASET_ID_PREFIX, &hex::encode(hasher.finalize())[..16]);
    std::fs::rename(&tmp, dir.join(&id)).map_err(|e| cleanup(ApiError::Internal(format!("dataset upload: {e}"))))?;
    let summary = serde_json::json!({
        "id": id, "object": "dataset", "bytes": bytes, "format": loaded.format.as_str(),
        "records": loaded.records, "examples": loaded.examples.len(), "dropped": loaded.dropped.len(),
        "created": crate::tasks::now(),
    });
    // The listing reads this instead of parsing every dataset again; a lost summary only
    // makes the listing parse that file.
    let _ = std::fs::write(dir.join(format!("{id}{SUMMARY}")), summary.to_string());
    Ok(HttpResponse::Created().json(summary))
}

/// Beside each uploaded dataset: its upload answer, for the listing.
const SUMMARY: &str = ".summary.json";
/// Rows a dataset preview shows.
const PREVIEW_ROWS: usize = 20;

#[utoipa::path(
    get,
    path = "/admin/finetune/datasets",
    operation_id = "list_finetune_datasets",
    tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, description = "Uploaded datasets, newest first: id, bytes, format, records, examples, dropped, created", body = Object), JobErrors)
)]
pub(crate) async fn datasets(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    let dir = store(&state).datasets_dir();
    let data = web::block(move || {
        let mut out: Vec<serde_json::Value> = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else { return out };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(protocol::names::DATASET_ID_PREFIX) || name.contains('.') {
                continue;
            }
            let summary = std::fs::read(dir.join(format!("{name}{SUMMARY}")))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
            let summary = summary.or_else(|| {
                let loaded = protocol::dataset::load_file(&entry.path()).ok()?;
                Some(serde_json::json!({
                    "id": name, "object": "dataset", "bytes": entry.metadata().map_or(0, |m| m.len()),
                    "format": loaded.format.as_str(), "records": loaded.records,
                    "examples": loaded.examples.len(), "dropped": loaded.dropped.len(), "created": 0,
                }))
            });
            out.extend(summary);
        }
        out.sort_by_key(|v| std::cmp::Reverse(v["created"].as_u64().unwrap_or(0)));
        out
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(ObjectList::new(data)))
}

#[utoipa::path(
    get,
    path = "/admin/finetune/datasets/{id}",
    operation_id = "show_finetune_dataset",
    tag = "admin",
    params(("id" = String, Path, description = "Dataset id (`ds-…`)")),
    security(("bearer" = [])),
    responses((status = 200, description = "The first parsed rows (`rows`), and the curation a job with default settings would apply (`report`): dropped rows by reason, duplicates, PII scrubbed, token lengths (counted with the served model's tokenizer and chat template) and their histogram (`length_histogram`)", body = Object), JobErrors)
)]
pub(crate) async fn dataset(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    use protocol::dataset::Target;
    crate::admin::require_admin(&state, &req)?;
    let id = path.into_inner();
    let file = store(&state)
        .dataset_path(&id)
        .ok_or_else(|| ApiError::NotFound { message: format!("no dataset with id `{id}`") })?;
    let loaded = web::block(move || protocol::dataset::load_file(&file))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("dataset `{id}` no longer reads: {e}")))?;
    let engine = state.engine.get().cloned().ok_or(ApiError::NotReady)?;
    // Token counts as training measures them: the prompt through the chat template, plus the
    // longest answer. Curation also counts each example with its answers emptied (the answer's
    // share is the difference), so the counts are by content: prompts and answers apart.
    let answers_of = |t: &Target| -> Vec<String> {
        match t {
            Target::Sft { answer } | Target::Kto { answer, .. } => vec![answer.clone()],
            Target::Preference { chosen, rejected } => vec![chosen.clone(), rejected.clone()],
        }
    };
    let prompt_key = |ex: &protocol::dataset::Example| serde_json::to_string(&ex.prompt).unwrap_or_default();
    let mut prompts = std::collections::HashMap::new();
    let mut answers = std::collections::HashMap::from([(String::new(), 0usize)]);
    let mut scrubbed = loaded.examples.clone();
    protocol::dataset::scrub_pii(&mut scrubbed);
    for ex in &scrubbed {
        let key = prompt_key(ex);
        if let std::collections::hash_map::Entry::Vacant(slot) = prompts.entry(key) {
            let messages =
                ex.prompt.iter().map(|m| crate::engine::Message { role: m.role, content: m.content.clone() }).collect();
            slot.insert(
                engine.tokenize(&crate::engine::Prompt::Chat(messages)).await.map_or(usize::MAX / 2, |t| t.len()),
            );
        }
        for a in answers_of(&ex.target) {
            if let std::collections::hash_map::Entry::Vacant(slot) = answers.entry(a) {
                let text = crate::engine::Prompt::Text(slot.key().clone());
                slot.insert(engine.tokenize(&text).await.map_or(usize::MAX / 2, |t| t.len()));
            }
        }
    }
    let preview: Vec<&protocol::dataset::Example> = loaded.examples.iter().take(PREVIEW_ROWS).collect();
    let preview = serde_json::to_value(preview).unwrap_or_default();
    let defaults = protocol::params::TrainConfig::default();
    let config = protocol::dataset::CurationConfig {
        cutoff_len: defaults.cutoff_len,
        val_ratio: defaults.val_ratio,
        ..protocol::dataset::CurationConfig::default()
    };
    let (format, records, read_drops) = (loaded.format, loaded.records, loaded.dropped.len());
    let examples = loaded.examples.len();
    // Curation scrubs PII before it counts, so every text it counts was counted above.
    let count = |ex: &protocol::dataset::Example| {
        let prompt = prompts.get(&prompt_key(ex)).copied().unwrap_or(usize::MAX / 2);
        let longest =
            answers_of(&ex.target).iter().map(|a| answers.get(a).copied().unwrap_or(usize::MAX / 2)).max().unwrap_or(0);
        prompt + longest
    };
    let curated = protocol::dataset::curate(format, loaded.examples, loaded.dropped, &count, &config);
    let mut report = match curated {
        Ok(c) => {
            let lengths: Vec<usize> = c.train.iter().chain(&c.val).map(count).collect();
            let mut report = serde_json::to_value(&c.report).unwrap_or_default();
            report["length_histogram"] = histogram(&lengths, 10).into();
            report
        }
        Err(protocol::ProtocolError::NothingLeft { report }) => serde_json::to_value(&report).unwrap_or_default(),
        Err(e) => return Err(ApiError::invalid(e.to_string(), None::<String>)),
    };
    if report.get("length_histogram").is_none() {
        report["length_histogram"] = serde_json::json!([]);
    }
    let reasons = &report["dropped_by_reason"];
    let duplicates = ["duplicate", "near_duplicate"].iter().filter_map(|r| reasons[*r].as_u64()).sum::<u64>();
    report["duplicates"] = duplicates.into();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": id, "object": "dataset", "format": format.as_str(), "records": records, "examples": examples,
        "dropped": read_drops, "rows": preview, "report": report,
    })))
}

/// `bins` equal-width bins over `values`: `{min, max, count}`, `max` exclusive but for the last.
fn histogram(values: &[usize], bins: usize) -> Vec<serde_json::Value> {
    let (Some(&lo), Some(&hi)) = (values.iter().min(), values.iter().max()) else { return Vec::new() };
    let width = ((hi - lo) / bins + 1).max(1);
    let mut counts = vec![0usize; bins];
    for &v in values {
        counts[((v - lo) / width).min(bins - 1)] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, &n)| serde_json::json!({"min": lo + i * width, "max": lo + (i + 1) * width, "count": n}))
        .collect()
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ParamList {
    object: String,
    data: Vec<protocol::params::ParamSpec>,
}

#[utoipa::path(
    get,
    path = "/admin/finetune/params",
    operation_id = "finetune_params",
    tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, description = "Every training parameter a job's `params` may set: kind, default for the served base, valid range (the training configuration's own checks) and help", body = ParamList), JobErrors)
)]
pub(crate) async fn params(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    // The decoder's linear weights: what sets the default learning rate's size class.
    let base_params = state.engine.get().and_then(|e| e.adapter_shape().cloned()).map_or(0, |s| {
        let attention = s.hidden_size * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads);
        s.num_layers * (attention + 3 * s.hidden_size * s.intermediate_size)
    });
    Ok(HttpResponse::Ok().json(ParamList { object: "list".into(), data: protocol::params::param_specs(base_params) }))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/finetune/params", web::get().to(params))
        .route("/admin/finetune/datasets", web::post().to(upload))
        .route("/admin/finetune/datasets", web::get().to(datasets))
        .route("/admin/finetune/datasets/{id}", web::get().to(dataset))
        .route("/admin/finetune/jobs", web::post().to(create))
        .route("/admin/finetune/jobs", web::get().to(list))
        .route("/admin/finetune/jobs/{id}", web::get().to(show))
        .route("/admin/finetune/jobs/{id}/events", web::get().to(events))
        .route("/admin/finetune/jobs/{id}/cancel", web::post().to(cancel));
}
