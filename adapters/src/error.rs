//! The crate's one error type, with stable machine-readable codes for the HTTP layer.

use std::path::PathBuf;

/// Everything that can go wrong while reading, validating or registering adapters.
///
/// Messages are written for the person who uploaded the adapter or runs the gateway: they
/// name the tensor, field, file or alias involved. [`AdapterError::code`] is the stable
/// string clients may match on; [`AdapterError::class`] tells the HTTP layer which family of
/// status codes applies without this crate knowing anything about HTTP.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The adapter files are not a LoRA adapter we can serve on this base model.
    #[error("invalid adapter: {reason}")]
    InvalidAdapter { reason: String },

    /// The adapter declares a different base model than the one served here.
    #[error("base model mismatch: adapter was trained on {adapter_base:?}, this gateway serves {served:?}")]
    BaseMismatch { adapter_base: String, served: String },

    /// A file or the adapter's rank exceeds the configured [`crate::Limits`].
    #[error("adapter too large: {what} is {actual}, the limit is {limit}")]
    TooLarge { what: String, actual: u64, limit: u64 },

    /// An adapter or alias name outside `[a-z0-9][a-z0-9._-]{0,63}` (or otherwise unusable).
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName { kind: &'static str, name: String, reason: &'static str },

    /// No adapter with this name is registered.
    #[error("adapter {name:?} not found")]
    AdapterNotFound { name: String },

    /// The adapter exists but this version does not (never existed or was deleted).
    #[error("adapter {name:?} has no version {version}")]
    VersionNotFound { name: String, version: u64 },

    /// The adapter exists but has no such alias.
    #[error("adapter {name:?} has no alias {alias:?}")]
    AliasNotFound { name: String, alias: String },

    /// Compare-and-set on an alias failed: someone else moved it first.
    #[error("alias {alias:?} of adapter {name:?} points to {}, expected version {expected}", fmt_current(*.current))]
    AliasConflict { name: String, alias: String, expected: u64, current: Option<u64> },

    /// Rollback asked for, but the alias has no earlier version that still exists.
    #[error("alias {alias:?} of adapter {name:?} has no earlier version to roll back to")]
    NoRollbackTarget { name: String, alias: String },

    /// A version cannot be deleted while an alias points at it.
    #[error("version {version} of adapter {name:?} is in use by alias(es) {aliases:?}; move them first")]
    VersionInUse { name: String, version: u64, aliases: Vec<String> },

    /// Weighted routes, a shadow rule or a release policy that cannot be applied.
    #[error("invalid release settings: {reason}")]
    InvalidRelease { reason: String },

    /// The release cannot do that in its current state (none running, or one already is).
    #[error("{reason}")]
    ReleaseState { reason: String },

    /// A path given by a client resolves outside the directory it must stay within.
    #[error("path {path:?} is outside the allowed directory {root:?}")]
    PathEscape { path: PathBuf, root: PathBuf },

    /// Registry files on disk are unreadable or contradict each other.
    #[error("registry state at {path:?} is corrupt: {reason}")]
    CorruptState { path: PathBuf, reason: String },

    /// An operating-system error while touching `path`.
    #[error("i/o error on {path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which family of responses an error belongs to; the gateway maps each to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request or the uploaded files are wrong (400).
    BadRequest,
    /// The upload exceeds a configured limit (413).
    TooLarge,
    /// The named adapter, version or alias does not exist (404).
    NotFound,
    /// The request conflicts with the current state (409).
    Conflict,
    /// The server's own disk or state failed (500).
    Internal,
}

/// Convenience alias used throughout the crate.
pub type Result<T, E = AdapterError> = std::result::Result<T, E>;

impl AdapterError {
    /// Stable, documented error code; never change an existing string.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidAdapter { .. } => "invalid_adapter",
            Self::BaseMismatch { .. } => "base_mismatch",
            Self::TooLarge { .. } => "adapter_too_large",
            Self::InvalidName { .. } => "invalid_name",
            Self::AdapterNotFound { .. } => "adapter_not_found",
            Self::VersionNotFound { .. } => "version_not_found",
            Self::AliasNotFound { .. } => "alias_not_found",
            Self::AliasConflict { .. } => "alias_conflict",
            Self::NoRollbackTarget { .. } => "no_rollback_target",
            Self::VersionInUse { .. } => "version_in_use",
            Self::PathEscape { .. } => "path_escape",
            Self::InvalidRelease { .. } => "invalid_release",
            Self::ReleaseState { .. } => "release_state",
            Self::CorruptState { .. } => "registry_corrupt",
            Self::Io { .. } => "io_error",
        }
    }

    /// The response family for this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidAdapter { .. }
            | Self::BaseMismatch { .. }
            | Self::InvalidName { .. }
            | Self::InvalidRelease { .. }
            | Self::PathEscape { .. } => ErrorClass::BadRequest,
            Self::TooLarge { .. } => ErrorClass::TooLarge,
            Self::AdapterNotFound { .. } | Self::VersionNotFound { .. } | Self::AliasNotFound { .. } => {
                ErrorClass::NotFound
            }
            Self::AliasConflict { .. }
            | Self::NoRollbackTarget { .. }
            | Self::VersionInUse { .. }
            | Self::ReleaseState { .. } => ErrorClass::Conflict,
            Self::CorruptState { .. } | Self::Io { .. } => ErrorClass::Internal,
        }
    }

    /// True for unknown adapter, version or alias.
    pub fn is_not_found(&self) -> bool {
        self.class() == ErrorClass::NotFound
    }

    /// True when the request clashes with current registry state.
    pub fn is_conflict(&self) -> bool {
        self.class() == ErrorClass::Conflict
    }

    /// True when the caller sent something wrong (bad files, names or paths, or too large).
    pub fn is_client_error(&self) -> bool {
        matches!(self.class(), ErrorClass::BadRequest | ErrorClass::TooLarge)
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Self::InvalidAdapter { reason: reason.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::CorruptState { path: path.into(), reason: reason.into() }
    }
}

fn fmt_current(current: Option<u64>) -> String {
    match current {
        Some(v) => format!("version {v}"),
        None => "nothing (alias unset)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_classes_are_stable() {
        let e = AdapterError::VersionInUse { name: "a".into(), version: 2, aliases: vec!["prod".into()] };
        assert_eq!(e.code(), "version_in_use");
        assert!(e.is_conflict());
        let e = AdapterError::AliasNotFound { name: "a".into(), alias: "prod".into() };
        assert_eq!(e.code(), "alias_not_found");
        assert!(e.is_not_found());
        let e = AdapterError::invalid("x");
        assert!(e.is_client_error());
        assert_eq!(e.code(), "invalid_adapter");
    }

    #[test]
    fn alias_conflict_message_names_current_version() {
        let e = AdapterError::AliasConflict { name: "bot".into(), alias: "prod".into(), expected: 3, current: Some(5) };
        assert_eq!(e.to_string(), "alias \"prod\" of adapter \"bot\" points to version 5, expected version 3");
    }
}
