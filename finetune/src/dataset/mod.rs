//! Training data: dataset files and reviewed feedback as normalised, curated examples.
//!
//! The dataset file formats and the example types are `protocol::dataset` (the gateway checks
//! uploads with the same reader); [`feedback`] reads gateway feedback, [`curate()`] turns the
//! examples into a train/validation split with a written report.
//!
//! Every record that does not become an example leaves a [`Dropped`] entry with a stable
//! reason code, so the report can say exactly what was left out and why.

pub mod curate;
pub mod feedback;
mod near_dup;
mod pii;

pub use curate::{curate, Curated, CurationConfig, CurationReport, TokenStats};
pub use feedback::{
    examples_from_feedback, read_feedback_dir, read_inbox, FeedbackExamples, FeedbackItem, FeedbackOptions,
    FeedbackRange, FeedbackView,
};
pub use pii::PiiCounts;
pub use protocol::dataset::{
    detect_format, load_file, normalize_text, parse_records, read_records, DatasetFormat, DropReason, Dropped, Example,
    Loaded, Message, RawRecord, Role, Target,
};
