//! The gateway's one error type and the one place errors become HTTP answers.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::engine::EngineError;
use crate::openai::{ErrorDetail, ErrorResponse};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The client sent something we will not serve; `param` names the field when there is one.
    #[error("{message}")]
    InvalidRequest { message: String, param: Option<String>, code: &'static str },
    #[error("The model `{model}` does not exist or you do not have access to it.")]
    ModelNotFound { model: String },
    #[error("{message}")]
    NotFound { message: String },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{message}")]
    RateLimited { message: String, code: &'static str },
    #[error("the model is not loaded yet")]
    NotReady,
    #[error("{message}")]
    Unavailable { message: String },
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{message}")]
    Forbidden { message: String },
    /// The request conflicts with what is stored (a duplicate).
    #[error("{message}")]
    Conflict { message: String },
    /// An adapter-registry error; its class picks the status.
    #[error("{0}")]
    Registry(#[from] adapters::AdapterError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        ApiError::InvalidRequest { message: message.into(), param: param.into(), code: "invalid_value" }
    }

    /// A field this server does not know, as OpenAI words it.
    pub fn unknown_parameter(key: &str) -> Self {
        ApiError::InvalidRequest {
            message: format!("Unrecognized request argument supplied: {key}"),
            param: Some(key.to_owned()),
            code: "unknown_parameter",
        }
    }

    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.to_owned()),
            code: "unsupported_parameter",
        }
    }

    /// Stable machine-readable code, the `code` field of the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { code, .. } => code,
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::NotFound { .. } => "not_found",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::RateLimited { code, .. } => code,
            ApiError::NotReady => "model_not_ready",
            ApiError::Unauthorized => "invalid_api_key",
            ApiError::Unavailable { .. } => "service_unavailable",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::Conflict { .. } => "conflict",
            ApiError::Registry(e) => e.code(),
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::ModelNotFound { .. }
            | ApiError::NotFound { .. }
            | ApiError::PayloadTooLarge { .. } => "invalid_request_error",
            ApiError::RateLimited { .. } => "rate_limit_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::Forbidden { .. } => "permission_error",
            ApiError::Conflict { .. } => "conflict_error",
            ApiError::Registry(e) => match e.class() {
                adapters::ErrorClass::Internal => "server_error",
                adapters::ErrorClass::Conflict => "conflict_error",
                _ => "invalid_request_error",
            },
            ApiError::NotReady | ApiError::Internal(_) | ApiError::Unavailable { .. } => "server_error",
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::ModelNotFound { .. } => Some("model".to_owned()),
            _ => None,
        }
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind().to_owned(),
                param: self.param(),
                code: Some(self.code().to_owned()),
            },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::PromptTooLong { .. } => ApiError::InvalidRequest {
                message: e.to_string(),
                param: Some("messages".to_owned()),
                code: "context_length_exceeded",
            },
            EngineError::MaxTokensTooLarge { .. } => ApiError::InvalidRequest {
                message: e.to_string(),
                param: Some("max_tokens".to_owned()),
                code: "context_length_exceeded",
            },
            EngineError::BadPrompt(_) => ApiError::invalid(e.to_string(), Some("messages".to_owned())),
            EngineError::Closed => ApiError::NotReady,
            EngineError::AdaptersUnsupported | EngineError::ScoringUnsupported => {
                ApiError::invalid(e.to_string(), Some("model".to_owned()))
            }
            EngineError::BadGrammar { ref param, .. } => ApiError::invalid(e.to_string(), Some(param.clone())),
            EngineError::Unsupported(_) => ApiError::invalid(e.to_string(), Some("model".to_owned())),
            EngineError::Backend(msg) => ApiError::Internal(msg),
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(format!("a blocking task failed: {e}"))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound { .. } | ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Registry(e) => match e.class() {
                adapters::ErrorClass::BadRequest => StatusCode::BAD_REQUEST,
                adapters::ErrorClass::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                adapters::ErrorClass::NotFound => StatusCode::NOT_FOUND,
                adapters::ErrorClass::Conflict => StatusCode::CONFLICT,
                adapters::ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if self.status_code().is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        HttpResponse::build(self.status_code()).json(self.body())
    }
}

/// Routes actix's own extractor failures into [`ApiError`], so they answer in the OpenAI shape
/// like every other error. A path segment that does not parse (`/versions/-1`) names nothing
/// that exists, so it is a 404; a bad query string or body is a 400 naming what failed.
pub fn extractor_configs(cfg: &mut actix_web::web::ServiceConfig) {
    use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
    use actix_web::web;
    cfg.app_data(web::PathConfig::default().error_handler(|e, req| {
        let PathError::Deserialize(inner) = &e else {
            return ApiError::invalid(e.to_string(), None).into();
        };
        ApiError::NotFound { message: format!("nothing at {}: {inner}", req.path()) }.into()
    }))
    .app_data(web::QueryConfig::default().error_handler(|e, _| {
        let message = match &e {
            QueryPayloadError::Deserialize(inner) => format!("invalid query string: {inner}"),
            other => format!("invalid query string: {other}"),
        };
        ApiError::InvalidRequest { message, param: None, code: "invalid_value" }.into()
    }))
    .app_data(web::JsonConfig::default().error_handler(|e, _| {
        match &e {
            JsonPayloadError::Overflow { limit } | JsonPayloadError::OverflowKnownLength { limit, .. } => {
                ApiError::PayloadTooLarge { limit: *limit }
            }
            JsonPayloadError::ContentType => ApiError::InvalidRequest {
                message: "the body must be JSON (content-type: application/json)".into(),
                param: None,
                code: "invalid_content_type",
            },
            other => ApiError::InvalidRequest {
                message: format!("We could not parse the JSON body of your request: {other}"),
                param: None,
                code: "invalid_json",
            },
        }
        .into()
    }));
}
