//! The adapter admin API: register versions, list them, move aliases, roll back, delete, audit.
//! Protected by the bearer token in `SWITCHYARD_ADMIN_TOKEN`.

use std::sync::Arc;

use actix_multipart::Multipart;
use actix_web::{web, HttpRequest, HttpResponse};
use adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use adapters::{Registry, Source};
use futures::StreamExt;
use protocol::api::{AdapterListing, ObjectList, SetAlias, VersionCreated, JOB_ID_PART, LINEAGE_PART, METRICS_PART};
use serde::Deserialize;

use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::extract::read_json;
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::state::AppState;

/// The one admin check, for every admin route (adapters, feedback review, training jobs).
/// The middleware has already compared the bootstrap token (in constant time) and verified any
/// JWT or API key, so this only reads the principal it left on the request.
pub(crate) fn require_admin(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    use actix_web::HttpMessage;
    if req.extensions().get::<Principal>().is_some_and(|p| p.role == Role::Admin) {
        return Ok(());
    }
    if state.admin_token.is_none() && !state.has_auth() {
        return Err(ApiError::Forbidden { message: "the admin API is disabled: set SWITCHYARD_ADMIN_TOKEN".into() });
    }
    Err(ApiError::Unauthorized)
}

/// The admin check, then the registry (503 while the model loads, and on an engine that
/// serves no adapters).
pub(crate) fn authorize(state: &AppState, req: &HttpRequest) -> Result<Arc<Registry>, ApiError> {
    require_admin(state, req)?;
    state.registry().ok_or(ApiError::NotReady)
}

/// The errors every adapter admin route answers with, documented once for the OpenAPI spec.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub(crate) enum AdminErrors {
    #[response(status = 400, description = "Invalid request: a bad name, path segment, query or body", example = json!({"error": {"message": "invalid query string: invalid digit found in string", "type": "invalid_request_error", "param": null, "code": "invalid_value"}}))]
    Invalid(ErrorResponse),
    #[response(status = 401, description = "Missing or invalid bearer token", example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}))]
    Unauthorized(ErrorResponse),
    #[response(status = 403, description = "Not an admin", example = json!({"error": {"message": "this route needs an admin token", "type": "permission_error", "param": null, "code": "forbidden"}}))]
    NotAdmin(ErrorResponse),
    #[response(status = 404, description = "Unknown adapter, version or alias", example = json!({"error": {"message": "adapter \"bot\" does not exist", "type": "invalid_request_error", "param": null, "code": "adapter_not_found"}}))]
    Unknown(ErrorResponse),
    #[response(status = 503, description = "The model is still loading, or the engine serves no adapters", example = json!({"error": {"message": "the model is not loaded yet", "type": "server_error", "param": null, "code": "model_not_ready"}}))]
    NotReady(ErrorResponse),
}

/// Registers a version from a directory under `SWITCHYARD_IMPORT_ROOT`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// Relative to the import root; paths escaping it are refused.
    path: String,
}

/// Largest single upload part; the registry applies its own per-file limits after this.
const MAX_PART: usize = 512 << 20;

#[utoipa::path(
    post,
    path = "/admin/adapters/{name}/versions",
    tag = "admin",
    params(("name" = String, Path, description = "Adapter name")),
    request_body(content((Object = "multipart/form-data"), (ImportRequest = "application/json")), description = "Multipart with `adapter_config.json` and `adapter_model.safetensors` (a training job adds `lineage.json`, `metrics.json` and `job_id`), or JSON naming a directory under the import root"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The new version: name, version, sha256 and its manifest", body = Object),
        (status = 400, description = "Invalid request", body = ErrorResponse, example = json!({"error": {"message": "messages must contain at least one message", "type": "invalid_request_error", "param": "messages", "code": "invalid_value"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}})),
        (status = 403, description = "Not an admin", body = ErrorResponse, example = json!({"error": {"message": "this route needs an admin token", "type": "permission_error", "param": null, "code": "forbidden"}})),
        (status = 413, description = "Body over the limit", body = ErrorResponse, example = json!({"error": {"message": "request body is larger than the limit of 4194304 bytes", "type": "invalid_request_error", "param": null, "code": "payload_too_large"}})),
        (status = 503, description = "The model is still loading, or the engine serves no adapters", body = ErrorResponse, example = json!({"error": {"message": "the model is not loaded yet", "type": "server_error", "param": null, "code": "model_not_ready"}}))
    )
)]
pub(crate) async fn create_version(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let name = path.into_inner();
    let is_multipart = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let manifest = if is_multipart {
        let mut form = Multipart::new(req.headers(), payload);
        let (mut config, mut weights) = (None, None);
        // A training job also sends its lineage, metrics and job id with the files.
        let (mut lineage, mut metrics, mut job_id) = (None, None, None);
        while let Some(field) = form.next().await {
            let mut field = field.map_err(|e| ApiError::invalid(format!("bad multipart body: {e}"), None))?;
            let label = field
                .content_disposition()
                .and_then(|cd| cd.get_filename().map(str::to_owned).or_else(|| cd.get_name().map(str::to_owned)))
                .unwrap_or_default();
            let mut bytes = Vec::new();
            while let Some(chunk) = field.next().await {
                let chunk = chunk.map_err(|e| ApiError::invalid(format!("bad multipart body: {e}"), None))?;
                if bytes.len() + chunk.len() > MAX_PART {
                    return Err(ApiError::PayloadTooLarge { limit: MAX_PART });
                }
                bytes.extend_from_slice(&chunk);
            }
            match label.as_str() {
                CONFIG_FILE => config = Some(bytes),
                WEIGHTS_FILE => weights = Some(bytes),
                LINEAGE_PART | METRICS_PART => {
                    let value: serde_json::Value = serde_json::from_slice(&bytes)
                        .map_err(|e| ApiError::invalid(format!("{label} is not JSON: {e}"), Some(label.clone())))?;
                    if label == LINEAGE_PART {
                        lineage = Some(value)
                    } else {
                        metrics = Some(value)
                    }
                }
                JOB_ID_PART => {
                    let id = String::from_utf8(bytes).map_err(|_| ApiError::invalid("job_id is not UTF-8", Some("job_id".into())))?;
                    job_id = Some(id.trim().to_owned());
                }
                other => {
                    return Err(ApiError::invalid(
                        format!("unexpected part {other:?}: send adapter_config.json and adapter_model.safetensors (and optionally lineage.json, metrics.json, job_id)"),
                        Some(other.to_owned()),
                    ))
                }
            }
        }
        let (Some(config), Some(weights)) = (config, weights) else {
            return Err(ApiError::invalid("both adapter_config.json and adapter_model.safetensors are required", None));
        };
        let source = match job_id {
            Some(job_id) => Source::Training { job_id },
            None => Source::Upload,
        };
        let (reg, n) = (registry.clone(), name.clone());
        web::block(move || {
            let manifest = reg.register_from_bytes(&n, &config, &weights, source, "admin")?;
            if lineage.is_none() && metrics.is_none() {
                return Ok(manifest);
            }
            reg.update_manifest_metrics(&n, manifest.version, lineage, metrics)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??
    } else {
        let body: ImportRequest = read_json(&req, payload, state.body_limit).await?;
        let Some(root) = state.import_root.clone() else {
            return Err(ApiError::Forbidden { message: "imports are disabled: set SWITCHYARD_IMPORT_ROOT".into() });
        };
        let dir = adapters::peft::ensure_within(&root, std::path::Path::new(&body.path))?;
        let (reg, n, shown) = (registry.clone(), name.clone(), body.path.clone());
        web::block(move || reg.register(&n, &dir, Source::Import { path: shown }, "admin"))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
    };
    state.announce(&name).await;
    Ok(HttpResponse::Created().json(VersionCreated::from(manifest)))
}

#[utoipa::path(
    get,
    path = "/admin/adapters",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every adapter with its versions and aliases", body = Object),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}})),
        (status = 403, description = "Not an admin", body = ErrorResponse, example = json!({"error": {"message": "this route needs an admin token", "type": "permission_error", "param": null, "code": "forbidden"}})),
        (status = 503, description = "The model is still loading, or the engine serves no adapters", body = ErrorResponse, example = json!({"error": {"message": "the model is not loaded yet", "type": "server_error", "param": null, "code": "model_not_ready"}}))
    )
)]
pub(crate) async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    Ok(HttpResponse::Ok().json(ObjectList::new(registry.list().into_iter().map(AdapterListing::from).collect())))
}

#[utoipa::path(
    get,
    path = "/admin/adapters/{name}",
    tag = "admin",
    params(("name" = String, Path, description = "Adapter name")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One adapter with its versions and aliases", body = Object),
        AdminErrors
    )
)]
pub(crate) async fn show(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let name = path.into_inner();
    let listing =
        registry.list().into_iter().find(|l| l.name == name).ok_or(adapters::AdapterError::AdapterNotFound { name })?;
    Ok(HttpResponse::Ok().json(AdapterListing::from(listing)))
}

#[utoipa::path(
    get,
    path = "/admin/adapters/{name}/versions/{version}",
    tag = "admin",
    params(("name" = String, Path), ("version" = u64, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The version's manifest", body = Object),
        AdminErrors
    )
)]
pub(crate) async fn show_version(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, u64)>,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let (name, version) = path.into_inner();
    Ok(HttpResponse::Ok().json(registry.resolve(&name, &adapters::Selector::Version(version))?))
}

#[utoipa::path(
    put,
    path = "/admin/adapters/{name}/aliases/{alias}",
    tag = "admin",
    params(("name" = String, Path), ("alias" = String, Path)),
    request_body = SetAlias,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The alias change (adapter, alias, from, to, and the routes of a split alias)", body = Object),
        AdminErrors,
        (status = 409, description = "Conflict", body = ErrorResponse, example = json!({"error": {"message": "alias \"prod\" of adapter \"bot\" points to version 2, not 1", "type": "conflict_error", "param": null, "code": "alias_conflict"}}))
    )
)]
pub(crate) async fn promote(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let (name, alias) = path.into_inner();
    let body: SetAlias = read_json(&req, payload, state.body_limit).await?;
    let who = crate::extract::caller(&req).sub;
    // A change waits for other processes' changes (the registry's file lock): off the worker.
    let n = name.clone();
    let change = match (body.version, body.routes) {
        (Some(version), None) => {
            web::block(move || registry.set_alias(&n, &alias, version, body.expected_version, &who)).await??
        }
        (None, Some(routes)) => {
            web::block(move || registry.set_routes(&n, &alias, &routes, body.expected_version, &who)).await??
        }
        _ => {
            return Err(ApiError::invalid(
                "give either `version` or `routes` (a list of {\"version\", \"weight\"})",
                Some("version".to_owned()),
            ))
        }
    };
    state.announce(&name).await;
    Ok(HttpResponse::Ok().json(change))
}

#[utoipa::path(
    post,
    path = "/admin/adapters/{name}/aliases/{alias}/rollback",
    tag = "admin",
    params(("name" = String, Path), ("alias" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The alias change back to the previous version", body = Object),
        AdminErrors
    )
)]
pub(crate) async fn rollback(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let (name, alias) = path.into_inner();
    let n = name.clone();
    let change = web::block(move || registry.rollback(&n, &alias, "admin")).await??;
    state.announce(&name).await;
    Ok(HttpResponse::Ok().json(change))
}

#[utoipa::path(
    delete,
    path = "/admin/adapters/{name}/versions/{version}",
    tag = "admin",
    params(("name" = String, Path), ("version" = u64, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The deleted version's manifest", body = Object),
        AdminErrors,
        (status = 409, description = "Conflict", body = ErrorResponse, example = json!({"error": {"message": "alias \"prod\" of adapter \"bot\" points to version 2, not 1", "type": "conflict_error", "param": null, "code": "alias_conflict"}}))
    )
)]
pub(crate) async fn delete_version(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, u64)>,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let (name, version) = path.into_inner();
    let n = name.clone();
    let manifest = web::block(move || registry.delete_version(&n, version, "admin")).await??;
    state.announce(&name).await;
    Ok(HttpResponse::Ok().json(serde_json::json!({"deleted": true, "manifest": manifest})))
}

#[derive(Debug, Deserialize)]
pub(crate) struct Page {
    #[serde(default)]
    offset: usize,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    50
}

#[utoipa::path(
    get,
    path = "/admin/audit",
    tag = "admin",
    params(("offset" = Option<usize>, Query), ("limit" = Option<usize>, Query)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Audit records, newest first", body = Object),
        AdminErrors
    )
)]
pub(crate) async fn audit(
    state: web::Data<AppState>,
    req: HttpRequest,
    page: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let limit = page.limit.clamp(1, 1000);
    let records = registry.audit(page.offset, limit)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "offset": page.offset, "data": records})))
}

/// `POST /admin/adapters/{name}/versions/{version}/export`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportRequest {
    /// Any of `safetensors`, `gguf-f32`, `gguf-f16`, `gguf-q8_0`, `gguf-q4_1` (default
    /// `["safetensors", "gguf-f16"]`).
    #[serde(default)]
    formats: Option<Vec<String>>,
}

/// Exports run one at a time: each reads the whole base model.
static EXPORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[utoipa::path(
    operation_id = "export_version",
    post,
    path = "/admin/adapters/{name}/versions/{version}/export",
    tag = "admin",
    params(("name" = String, Path), ("version" = u64, Path)),
    request_body = ExportRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The export's manifest: the adapter version, the base model's hash and every file written under `<data-dir>/exports/<name>-<version>/` with its format, sha256 and size; the directory or GGUF can be served with `--model`", body = Object),
        AdminErrors
    )
)]
pub(crate) async fn export(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, u64)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let (name, version) = path.into_inner();
    let body: ExportRequest = read_json(&req, payload, state.body_limit).await?;
    let formats = body
        .formats
        .unwrap_or_else(|| vec!["safetensors".into(), "gguf-f16".into()])
        .iter()
        .map(|f| f.parse::<runtime::export::ExportFormat>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::invalid(e, Some("formats".to_owned())))?;
    if formats.is_empty() {
        return Err(ApiError::invalid("`formats` must name at least one format", Some("formats".to_owned())));
    }
    let gguf = formats.iter().any(|f| matches!(f, runtime::export::ExportFormat::Gguf(_)));
    if gguf && !state.model_path.is_file() {
        return Err(ApiError::invalid(
            "GGUF exports copy the base model's GGUF metadata, and this gateway serves an HF directory",
            Some("formats".to_owned()),
        ));
    }
    let manifest = registry.resolve(&name, &adapters::Selector::Version(version))?;
    let adapter_dir = registry.version_dir(&name, version);
    let out = state.data_dir.join(EXPORTS_DIR).join(format!("{name}-{version}"));
    let base = state.model_path.clone();
    let info = serde_json::json!({"adapter": name, "version": version, "adapter_sha256": manifest.sha256,
        "base_model": manifest.base_model});
    let _one_at_a_time = EXPORTS.lock().await;
    let report = web::block(move || runtime::export::export(&base, &adapter_dir, &out, &formats, info))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("export failed: {e}")))?;
    let manifest: serde_json::Value = std::fs::read(&report.manifest)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ApiError::Internal("the export's manifest is unreadable".into()))?;
    Ok(HttpResponse::Ok().json(manifest))
}

/// Under the data directory: merged exports, one directory per adapter version.
pub const EXPORTS_DIR: &str = "exports";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/adapters", web::get().to(list))
        .route("/admin/adapters/{name}", web::get().to(show))
        .route("/admin/adapters/{name}/versions", web::post().to(create_version))
        .route("/admin/adapters/{name}/versions/{version}", web::get().to(show_version))
        .route("/admin/adapters/{name}/versions/{version}", web::delete().to(delete_version))
        .route("/admin/adapters/{name}/aliases/{alias}", web::put().to(promote))
        .route("/admin/adapters/{name}/aliases/{alias}/rollback", web::post().to(rollback))
        .route("/admin/adapters/{name}/versions/{version}/export", web::post().to(export))
        .route("/admin/audit", web::get().to(audit));
}
