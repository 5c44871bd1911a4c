//! The adapter admin API: register versions, list them, move aliases, roll back, delete, audit.
//! Protected by the bearer token in `SWITCHYARD_ADMIN_TOKEN`.

use std::sync::Arc;

use actix_multipart::Multipart;
use actix_web::{web, HttpRequest, HttpResponse};
use adapters::{Registry, Source};
use futures::StreamExt;
use serde::Deserialize;

use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::server::{read_json, AppState};

/// Checks the admin bearer token and returns the registry.
fn authorize(state: &AppState, req: &HttpRequest) -> Result<Arc<Registry>, ApiError> {
    use actix_web::HttpMessage;
    let admin = req.extensions().get::<Principal>().is_some_and(|p| p.role == Role::Admin);
    if admin {
        return state.registry().ok_or(ApiError::NotReady);
    }
    let Some(expected) = state.admin_token.as_deref() else {
        return Err(ApiError::Forbidden { message: "the admin API is disabled: set SWITCHYARD_ADMIN_TOKEN".into() });
    };
    let given = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare every byte so the time taken does not tell how much of the token matched.
    let same = given.len() == expected.len() && given.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !same {
        return Err(ApiError::Unauthorized);
    }
    state.registry().ok_or(ApiError::NotReady)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    path: String,
}

/// Largest single upload part; the registry applies its own per-file limits after this.
const MAX_PART: usize = 512 << 20;

async fn create_version(
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
                "adapter_config.json" => config = Some(bytes),
                "adapter_model.safetensors" => weights = Some(bytes),
                other => {
                    return Err(ApiError::invalid(
                        format!("unexpected part {other:?}: send adapter_config.json and adapter_model.safetensors"),
                        Some(other.to_owned()),
                    ))
                }
            }
        }
        let (Some(config), Some(weights)) = (config, weights) else {
            return Err(ApiError::invalid("both adapter_config.json and adapter_model.safetensors are required", None));
        };
        let (reg, n) = (registry.clone(), name.clone());
        web::block(move || reg.register_from_bytes(&n, &config, &weights, Source::Upload, "admin"))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
    } else {
        let body: ImportBody = read_json(&req, payload, state.body_limit).await?;
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
    Ok(HttpResponse::Created().json(serde_json::json!({
        "name": manifest.name, "version": manifest.version, "sha256": manifest.sha256, "manifest": manifest,
    })))
}

async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": registry.list()})))
}

async fn show(state: web::Data<AppState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let name = path.into_inner();
    let listing = registry
        .list()
        .into_iter()
        .find(|l| l.name == name)
        .ok_or(adapters::AdapterError::AdapterNotFound { name })?;
    Ok(HttpResponse::Ok().json(listing))
}

async fn show_version(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, u64)>,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let (name, version) = path.into_inner();
    Ok(HttpResponse::Ok().json(registry.resolve(&name, &adapters::Selector::Version(version))?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    version: u64,
    #[serde(default)]
    expected_version: Option<u64>,
}

async fn promote(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let (name, alias) = path.into_inner();
    let body: PromoteBody = read_json(&req, payload, state.body_limit).await?;
    let change = registry.set_alias(&name, &alias, body.version, body.expected_version, "admin")?;
    state.announce(&name).await;
    Ok(HttpResponse::Ok().json(change))
}

async fn rollback(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let (name, alias) = path.into_inner();
    let change = registry.rollback(&name, &alias, "admin")?;
    state.announce(&name).await;
    Ok(HttpResponse::Ok().json(change))
}

async fn delete_version(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, u64)>,
) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let (name, version) = path.into_inner();
    let manifest = registry.delete_version(&name, version, "admin")?;
    state.announce(&name).await;
    Ok(HttpResponse::Ok().json(serde_json::json!({"deleted": true, "manifest": manifest})))
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    offset: usize,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    50
}

async fn audit(state: web::Data<AppState>, req: HttpRequest, page: web::Query<Page>) -> Result<HttpResponse, ApiError> {
    let registry = authorize(&state, &req)?;
    let limit = page.limit.clamp(1, 1000);
    let records = registry.audit(page.offset, limit)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "offset": page.offset, "data": records})))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/adapters", web::get().to(list))
        .route("/admin/adapters/{name}", web::get().to(show))
        .route("/admin/adapters/{name}/versions", web::post().to(create_version))
        .route("/admin/adapters/{name}/versions/{version}", web::get().to(show_version))
        .route("/admin/adapters/{name}/versions/{version}", web::delete().to(delete_version))
        .route("/admin/adapters/{name}/aliases/{alias}", web::put().to(promote))
        .route("/admin/adapters/{name}/aliases/{alias}/rollback", web::post().to(rollback))
        .route("/admin/audit", web::get().to(audit));
}
