//! The crate's one error enum, with stable codes for the HTTP layer.

use std::path::{Path, PathBuf};

/// Everything a knowledge-base call can fail with. Messages are written for the person who
/// made the request; [`KnowledgeError::code`] is the stable string clients may match on.
#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    /// A request value is out of range or inconsistent; `param` names it.
    #[error("invalid {param}: {message}")]
    Invalid { param: &'static str, message: String },
    /// No such knowledge base or document, or it belongs to another tenant.
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    /// An uploaded file that cannot be turned into text.
    #[error("cannot read the {format} document: {detail}")]
    Unreadable { format: &'static str, detail: String },
    /// An operating-system error while touching `path`.
    #[error("i/o error on {path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The keyword index refused an operation (a bug or resource exhaustion, not bad input).
    #[error("search index error: {0}")]
    Index(String),
}

impl KnowledgeError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_value",
            Self::NotFound { .. } => "not_found",
            Self::Unreadable { .. } => "unreadable_document",
            Self::Io { .. } => "io_error",
            Self::Index(_) => "index_error",
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }

    pub(crate) fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { param, message: message.into() }
    }

    pub(crate) fn not_found(what: &'static str, id: &str) -> Self {
        Self::NotFound { what, id: id.to_owned() }
    }
}

impl From<tantivy::TantivyError> for KnowledgeError {
    fn from(e: tantivy::TantivyError) -> Self {
        Self::Index(e.to_string())
    }
}
