//! What a handler reads off a request besides its path and query: the JSON body, parsed into a
//! wire type with the failing field named, and the caller the auth middleware left on it.

use actix_web::{web, HttpRequest};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::auth::{Principal, Role};
use crate::error::ApiError;

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

/// The caller the auth middleware put on the request.
pub(crate) fn caller(req: &HttpRequest) -> Principal {
    use actix_web::HttpMessage;
    // The middleware always sets one on these routes; without it, the caller may use nothing.
    req.extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or(Principal { models: Some(Vec::new()), ..Principal::plain("anonymous", "default", Role::User) })
}

/// The request's id (`x-request-id`), put on the request by the outer middleware.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub String);

/// The end user a request names in its `user` field: a routed alias keeps each user on one
/// version.
#[derive(Debug, Clone)]
pub(crate) struct EndUser(pub String);

/// Notes the request's `user` field for routing (empty or absent: nothing).
pub(crate) fn note_end_user(req: &HttpRequest, user: Option<&str>) {
    use actix_web::HttpMessage;
    if let Some(u) = user.filter(|u| !u.is_empty()) {
        req.extensions_mut().insert(EndUser(u.to_owned()));
    }
}
