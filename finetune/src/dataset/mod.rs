//! Training data: dataset files and reviewed feedback as normalised, curated examples.
//!
//! The dataset file formats, the example types and curation are `protocol::dataset` (the
//! gateway checks uploads with the same reader and previews curation with the same code);
//! [`feedback`] reads gateway feedback, [`curate()`] turns the examples into a
//! train/validation split with a written report.
//!
//! Every record that does not become an example leaves a [`Dropped`] entry with a stable
//! reason code, so the report can say exactly what was left out and why.

pub mod feedback;

pub use feedback::{
    examples_from_feedback, read_feedback_dir, read_inbox, FeedbackExamples, FeedbackItem, FeedbackOptions,
    FeedbackView,
};
pub use protocol::dataset::{
    curate, detect_format, load_file, normalize_text, parse_records, read_records, Curated, CurationConfig,
    CurationReport, DatasetFormat, DropReason, Dropped, Example, FeedbackRange, Loaded, Message, PiiCounts, RawRecord,
    Role, Target, TokenStats,
};
