//! The finetune crate's one error enum, with stable codes the admin API and the CLI report.

use std::path::PathBuf;

/// Everything a training job can fail with. Jobs never panic on bad input: each failure here
/// ends the job with a message (and, for dataset problems, a written report).
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bad training settings: {detail}")]
    Config { detail: String },
    #[error("the base model could not be loaded: {detail}")]
    Model { detail: String },
    #[error("adapter: {detail}")]
    Adapter { detail: String },
    #[error("training failed: {detail}")]
    Training { detail: String },
    #[error("the job was cancelled at step {step}")]
    Cancelled { step: usize },
    #[error("registry: {detail}")]
    Registry { detail: String },
    /// The dataset or feedback source holds no records at all.
    #[error("the dataset has no records")]
    EmptyDataset,
    /// The first record of a dataset file fits none of the known formats.
    #[error("unknown dataset format: {detail}")]
    UnknownFormat { detail: String },
    /// Curation dropped every example; the report says why, and the CLI still writes it.
    #[error("curation kept no examples of {} records (dropped: {})", .report.input_records, .report.drop_summary())]
    NothingLeft { report: Box<crate::dataset::CurationReport> },
    /// Curation kept too few examples to train on (e.g. a file of one record repeated).
    #[error("curation kept {kept} example(s) of {} records, and training needs at least {need} (dropped: {})", .report.input_records, .report.drop_summary())]
    TooFewExamples { kept: usize, need: usize, report: Box<crate::dataset::CurationReport> },
    /// A dataset file that is neither a JSON array nor JSONL; `line` is the first bad line.
    #[error("{}: line {line}: {detail}", .path.display())]
    Json { path: PathBuf, line: usize, detail: String },
}

impl FinetuneError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Config { .. } => "bad_config",
            Self::Model { .. } => "model",
            Self::Adapter { .. } => "adapter",
            Self::Training { .. } => "training",
            Self::Cancelled { .. } => "cancelled",
            Self::Registry { .. } => "registry",
            Self::EmptyDataset => "empty_dataset",
            Self::UnknownFormat { .. } => "unknown_format",
            Self::NothingLeft { .. } => "nothing_left",
            Self::TooFewExamples { .. } => "too_few_examples",
            Self::Json { .. } => "invalid_json",
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

/// The shared files' failures keep their variants (and so their codes) here.
impl From<protocol::ProtocolError> for FinetuneError {
    fn from(e: protocol::ProtocolError) -> Self {
        use protocol::ProtocolError as P;
        match e {
            P::Io { path, source } => Self::Io { path, source },
            P::Json { path, line, detail } => Self::Json { path, line, detail },
            P::EmptyDataset => Self::EmptyDataset,
            P::UnknownFormat { detail } => Self::UnknownFormat { detail },
            P::CurationConfig { detail } => Self::Config { detail },
            P::NothingLeft { report } => Self::NothingLeft { report },
        }
    }
}
