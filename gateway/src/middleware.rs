//! The two middlewares every request passes through: `observe` (outermost: request id, log
//! span, request metrics, rate-limit headers) and `authenticate` inside it, so refusals are
//! observed too.

use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpMessage};
use tracing::Instrument;

use crate::error::ApiError;
use crate::limits::Verdict;
use crate::respond::Served;
use crate::state::AppState;

/// The response header naming the version that answered.
pub const SERVED_VERSION: &str = "x-switchyard-served-version";

/// Puts the caller's `Principal` on the request, or answers 401/403 in the OpenAI shape.
pub async fn authenticate<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, Error> {
    let decision = match req.app_data::<web::Data<AppState>>() {
        Some(state) => state.authenticate(&req),
        None => Err(ApiError::Internal("application state missing".into())),
    };
    match decision {
        Ok(principal) => {
            if let Some(p) = principal {
                req.extensions_mut().insert(p);
            }
            next.call(req).await.map(ServiceResponse::map_into_left_body)
        }
        Err(e) => {
            let response = actix_web::ResponseError::error_response(&e);
            Ok(req.into_response(response).map_into_right_body())
        }
    }
}

/// Gives the request an id and a log span, counts it by route, status, model and adapter, and
/// adds the limiter's `x-ratelimit-*` headers (and `Retry-After` on a 429) to whatever answered.
pub async fn observe<B: MessageBody>(req: ServiceRequest, next: Next<B>) -> Result<ServiceResponse<B>, Error> {
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let metrics = req.app_data::<web::Data<AppState>>().map(|s| s.metrics.clone());
    let request_id = request_id(&req);
    let span = tracing::info_span!("request", request_id = %request_id, method = %req.method(), path = %req.path());
    req.extensions_mut().insert(crate::extract::RequestId(request_id.clone()));
    let fut = span.in_scope(|| next.call(req));
    async move {
        let mut res = fut.await?;
        let status = res.status().as_u16();
        let served = res.request().extensions().get::<Served>().cloned();
        if let Some(s) = &served {
            // Which version answered: `name@version`, or the base model's id.
            let version = if s.adapter.is_empty() { &s.model } else { &s.adapter };
            if let Ok(v) = actix_web::http::header::HeaderValue::from_str(version) {
                res.headers_mut().insert(actix_web::http::header::HeaderName::from_static(SERVED_VERSION), v);
            }
        }
        if let Some(m) = metrics {
            let (model, adapter) = served.map_or((String::new(), String::new()), |s| (s.model, s.adapter));
            m.requests.with_label_values(&[&route, &status.to_string(), &model, &adapter]).inc();
            m.request_duration.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
        }
        let verdict = res.request().extensions().get::<Verdict>().copied();
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
    .await
}

/// The request's id: a sane `x-request-id` from the client, or a new one.
fn request_id(req: &actix_web::dev::ServiceRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned)
}
