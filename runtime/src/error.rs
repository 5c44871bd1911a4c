//! The runtime's one error type, with stable machine-readable codes.

use std::path::PathBuf;

use adapters::AdapterError;

/// Everything that can go wrong while loading a base model or running a step.
///
/// Loading an adapter's own files fails with the adapter format's error instead
/// ([`AdapterError`], through [`crate::lora::AdapterWeights::load_peft_dir`]): that is a bad
/// upload, not a runtime failure. [`RuntimeError::code`] is the stable string callers may
/// match on.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A base model file could not be loaded or does not describe a llama model.
    #[error("model {}: {reason}", path.display())]
    Model { path: PathBuf, reason: String },

    /// A tensor computation failed (shapes, devices); a bug or a corrupt model, never client input.
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),

    /// A step's input the runtime cannot run: an empty sequence, a cache too small, a token
    /// outside the vocabulary.
    #[error("invalid step: {reason}")]
    InvalidStep { reason: String },

    /// The matmul thread pool could not be started.
    #[error("cannot start the matmul thread pool: {0}")]
    ThreadPool(#[from] rayon::ThreadPoolBuildError),

    /// Writing a test model or adapter failed in the adapter format's own code.
    #[error(transparent)]
    Adapter(#[from] AdapterError),

    /// A merged-model export cannot be made: a missing base or adapter directory, an output
    /// directory that cannot be written, a format this base cannot be exported to.
    #[error("export: {}: {reason}", path.display())]
    Export { path: PathBuf, reason: String },

    /// An operating-system error while touching `path`.
    #[error("i/o error on {path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Convenience alias used throughout the crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

impl RuntimeError {
    /// Stable, documented error code; never change an existing string.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Model { .. } => "model_error",
            Self::Tensor(_) => "tensor_error",
            Self::InvalidStep { .. } => "invalid_step",
            Self::ThreadPool(_) => "thread_pool",
            Self::Adapter(e) => e.code(),
            Self::Export { .. } => "export_error",
            Self::Io { .. } => "io_error",
        }
    }

    pub(crate) fn model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Model { path: path.into(), reason: reason.into() }
    }

    pub(crate) fn invalid_step(reason: impl Into<String>) -> Self {
        Self::InvalidStep { reason: reason.into() }
    }

    pub(crate) fn export(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Export { path: path.into(), reason: reason.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        assert_eq!(RuntimeError::model("m.gguf", "no tensors").code(), "model_error");
        assert_eq!(RuntimeError::invalid_step("empty").code(), "invalid_step");
        assert_eq!(RuntimeError::export("out", "not writable").code(), "export_error");
        let e = RuntimeError::from(AdapterError::AdapterNotFound { name: "a".into() });
        assert_eq!(e.code(), "adapter_not_found");
        assert_eq!(e.to_string(), "adapter \"a\" not found");
    }
}
