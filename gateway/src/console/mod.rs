//! The web console at `/console`: one page and its assets, embedded in the binary, and the
//! sign-in that turns a token into a session cookie ([`session`]). Everything the page shows
//! it reads through the same HTTP API as any client, with the cookie and the CSRF header.

pub mod session;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::error::ApiError;
use crate::extract::read_json;
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::state::AppState;

/// Nothing from outside the gateway, no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// The page's files: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("api.js", "text/javascript; charset=utf-8", include_bytes!("../../console/api.js")),
    ("app.css", "text/css; charset=utf-8", include_bytes!("../../console/app.css")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../../console/app.js")),
    ("audit.js", "text/javascript; charset=utf-8", include_bytes!("../../console/audit.js")),
    ("charts.js", "text/javascript; charset=utf-8", include_bytes!("../../console/charts.js")),
    ("datasets.js", "text/javascript; charset=utf-8", include_bytes!("../../console/datasets.js")),
    ("dom.js", "text/javascript; charset=utf-8", include_bytes!("../../console/dom.js")),
    ("items.js", "text/javascript; charset=utf-8", include_bytes!("../../console/items.js")),
    ("labelling.js", "text/javascript; charset=utf-8", include_bytes!("../../console/labelling.js")),
    ("models.js", "text/javascript; charset=utf-8", include_bytes!("../../console/models.js")),
    ("playground.js", "text/javascript; charset=utf-8", include_bytes!("../../console/playground.js")),
    ("prom.js", "text/javascript; charset=utf-8", include_bytes!("../../console/prom.js")),
    ("review.js", "text/javascript; charset=utf-8", include_bytes!("../../console/review.js")),
    ("traffic.js", "text/javascript; charset=utf-8", include_bytes!("../../console/traffic.js")),
    ("training.js", "text/javascript; charset=utf-8", include_bytes!("../../console/training.js")),
];
const INDEX: &[u8] = include_bytes!("../../console/index.html");

/// A console response with the security headers every one of them carries.
fn secured(mut builder: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    builder
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"));
    builder
}

/// `GET /console` (and any page path under it): the page. It holds no data; it signs in
/// before it reads any.
async fn index() -> HttpResponse {
    secured(HttpResponse::Ok())
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .content_type("text/html; charset=utf-8")
        .body(INDEX)
}

/// `GET /console/assets/{file}`.
async fn asset(path: web::Path<String>) -> HttpResponse {
    match ASSETS.iter().find(|(name, _, _)| *name == path.as_str()) {
        Some((_, kind, bytes)) => secured(HttpResponse::Ok())
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .content_type(*kind)
            .body(*bytes),
        None => actix_web::ResponseError::error_response(&ApiError::NotFound {
            message: format!("no console asset `{}`", path.as_str()),
        }),
    }
}

/// `POST /console/session`: the token to sign in with.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    /// The admin token, an admin or labeller JWT, or an API key.
    token: String,
}

/// Who is signed in, and the CSRF token the page sends back in `x-csrf-token`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionInfo {
    sub: String,
    tenant: String,
    /// `admin` or `labeller`.
    role: String,
    csrf: String,
    /// Unix seconds.
    expires: u64,
}

impl From<&session::Session> for SessionInfo {
    fn from(s: &session::Session) -> Self {
        let role = match s.role {
            Role::Admin => "admin",
            Role::Labeller => "labeller",
            Role::User => "user",
        };
        Self { sub: s.sub.clone(), tenant: s.tenant.clone(), role: role.into(), csrf: s.csrf.clone(), expires: s.exp }
    }
}

/// The session the request's cookie holds, or 401.
fn current(state: &AppState, req: &HttpRequest) -> Result<session::Session, ApiError> {
    req.cookie(session::COOKIE).and_then(|c| state.sessions.check(c.value())).ok_or(ApiError::Unauthorized)
}

#[utoipa::path(
    post,
    path = "/console/session",
    operation_id = "console_sign_in",
    tag = "console",
    request_body = SignIn,
    responses(
        (status = 200, description = "Signed in: the session cookie (HttpOnly, SameSite=Strict) is set", body = SessionInfo),
        (status = 400, description = "Malformed body", body = ErrorResponse),
        (status = 401, description = "The token is not valid", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}})),
        (status = 403, description = "The token is valid but neither an admin's nor a labeller's", body = ErrorResponse, example = json!({"error": {"message": "the console is for admins and labellers", "type": "permission_error", "param": null, "code": "forbidden"}}))
    )
)]
pub(crate) async fn sign_in(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: SignIn = read_json(&req, payload, state.body_limit).await?;
    let token = body.token.trim();
    if token.is_empty() {
        return Err(ApiError::invalid("`token` is empty", Some("token".to_owned())));
    }
    let principal = state.principal_for(Some(&format!("Bearer {token}")))?;
    // With auth off every other token is the anonymous user: only the admin token signs in.
    if principal.role == Role::User {
        return Err(ApiError::Forbidden { message: "the console is for admins and labellers".into() });
    }
    let (session, cookie) = state.sessions.start(&principal)?;
    let max_age = session.exp.saturating_sub(session::now());
    Ok(secured(HttpResponse::Ok())
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .cookie(session::cookie(&req, cookie, max_age))
        .json(SessionInfo::from(&session)))
}

#[utoipa::path(
    get,
    path = "/console/session",
    operation_id = "console_session",
    tag = "console",
    responses(
        (status = 200, description = "The signed-in caller and the session's CSRF token", body = SessionInfo),
        (status = 401, description = "Not signed in, or the session expired", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}))
    )
)]
pub(crate) async fn show(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let session = current(&state, &req)?;
    Ok(secured(HttpResponse::Ok()).insert_header((header::CACHE_CONTROL, "no-store")).json(SessionInfo::from(&session)))
}

#[utoipa::path(
    delete,
    path = "/console/session",
    operation_id = "console_sign_out",
    tag = "console",
    params(("x-csrf-token" = String, Header, description = "The session's CSRF token")),
    responses(
        (status = 204, description = "Signed out: the cookie is cleared"),
        (status = 401, description = "Not signed in", body = ErrorResponse, example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}})),
        (status = 403, description = "Without the session's CSRF token", body = ErrorResponse, example = json!({"error": {"message": "a request signed in with a console session must carry its `x-csrf-token` header", "type": "permission_error", "param": null, "code": "forbidden"}}))
    )
)]
pub(crate) async fn sign_out(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    current(&state, &req)?.require_csrf(req.headers())?;
    Ok(secured(HttpResponse::NoContent()).cookie(session::cookie(&req, String::new(), 0)).finish())
}

#[utoipa::path(
    get,
    path = "/admin/metrics",
    operation_id = "admin_metrics",
    tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The Prometheus metrics, as `/metrics` gives them, for the console's traffic charts (`/metrics` may listen elsewhere)", content_type = "text/plain"),
        crate::admin::AdminErrors
    )
)]
pub(crate) async fn metrics(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(state.metrics.render()))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/console/session", web::post().to(sign_in))
        .route("/console/session", web::get().to(show))
        .route("/console/session", web::delete().to(sign_out))
        .route("/console/assets/{file}", web::get().to(asset))
        .route("/console", web::get().to(index))
        .route("/console/", web::get().to(index))
        .route("/console/{page}", web::get().to(index))
        .route("/admin/metrics", web::get().to(metrics));
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_console_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "index.html")
            .collect();
        on_disk.sort();
        let mut served: Vec<String> = super::ASSETS.iter().map(|(n, _, _)| (*n).to_owned()).collect();
        served.sort();
        assert_eq!(on_disk, served, "add new console files to ASSETS");
    }
}
