//! The recommend crate's one error enum, with stable codes.

use std::path::PathBuf;

use protocol::ProtocolError;

/// What a recommender call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RecommendError {
    /// An argument broke a rule; `param` names it (`id`, `vector`, `weight`, `candidates`, ...).
    #[error("invalid {param}: {message}")]
    Invalid { param: &'static str, message: String },
    /// The named thing (`item`) does not exist in this tenant.
    #[error("{what} '{id}' not found")]
    NotFound { what: &'static str, id: String },
    /// The disk failed under one of the store's files.
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A stored line is whole JSON but cannot belong to this store (a vector of another
    /// dimension: the data was written with another embedding model).
    #[error("corrupt recommendation store: {0}")]
    Corrupt(String),
}

impl RecommendError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_value",
            Self::NotFound { .. } => "not_found",
            Self::Io { .. } => "io_error",
            Self::Corrupt(_) => "corrupt_store",
        }
    }

    pub(crate) fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { param, message: message.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

impl From<ProtocolError> for RecommendError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Io { path, source } => Self::Io { path, source },
            other => Self::Corrupt(other.to_string()),
        }
    }
}
