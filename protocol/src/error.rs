//! The protocol crate's one error enum, with stable codes.

use std::path::PathBuf;

/// What reading or writing the shared files can fail with. A torn or foreign JSONL line is not
/// an error (it is skipped with a warning); these are the failures a caller must see.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A JSON file (a dataset, a job's spec or status) that does not parse; `line` is 1-based.
    #[error("{}: line {line}: {detail}", .path.display())]
    Json { path: PathBuf, line: usize, detail: String },
    /// The dataset holds no records at all.
    #[error("the dataset has no records")]
    EmptyDataset,
    /// The first record of a dataset file fits none of the known formats.
    #[error("unknown dataset format: {detail}")]
    UnknownFormat { detail: String },
    /// Curation settings that make no sense; the detail names the setting.
    #[error("bad training settings: {detail}")]
    CurationConfig { detail: String },
    /// Curation dropped every example; the report says why.
    #[error("curation kept no examples of {} records (dropped: {})", .report.input_records, .report.drop_summary())]
    NothingLeft { report: Box<crate::dataset::CurationReport> },
}

impl ProtocolError {
    /// A stable machine-readable code (the same strings `finetune` reports for these failures).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Json { .. } => "invalid_json",
            Self::EmptyDataset => "empty_dataset",
            Self::UnknownFormat { .. } => "unknown_format",
            Self::CurationConfig { .. } => "bad_config",
            Self::NothingLeft { .. } => "nothing_left",
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
