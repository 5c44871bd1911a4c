//! Switchyard's contract between processes: what the gateway, the `finetune` sidecar and Redis
//! exchange, typed once so that no side keeps a copy.
//!
//! It owns:
//! - [`records`]: the completion, feedback and review records ([`CompletionRecord`],
//!   [`FeedbackRecord`], [`ReviewRecord`], [`Thumbs`], [`ReviewStatus`], [`AnsweredBy`]) and
//!   [`ReviewJoin`], the one "last review wins" join of feedback with review decisions;
//! - [`envelope`]: [`Envelope`], the one tagged shape of every `switchyard:feedback` stream
//!   entry (and of the spool and inbox lines that hold such entries on disk);
//! - [`names`]: every Redis key, stream and group name and every shared file and directory name;
//! - [`jsonl`]: the JSONL appender (one write per line, optional fsync, a fresh line after a
//!   torn tail) and reader (skips any torn or foreign line with a warning, keeps every whole
//!   record);
//! - [`jobs`]: the on-disk training job queue ([`jobs::JobStore`], spec, status, loss curve);
//!   [`params`]: the job parameters ([`params::TrainArgs`], [`params::TrainConfig`]);
//! - [`dataset`]: dataset files in the layouts uploads may have, read into examples;
//! - [`api`]: the gateway's error body and the admin responses the sidecar reads.
//!
//! It must never run an HTTP server, import actix, or train: it is data, names and file I/O.
//! Changing a name or a field here changes a format on disk or in Redis; keep old data readable
//! or say so.

pub mod api;
pub mod dataset;
pub mod envelope;
pub mod error;
pub mod jobs;
pub mod jsonl;
pub mod names;
pub mod params;
pub mod records;

pub use envelope::{Envelope, FeedbackEntry};
pub use error::ProtocolError;
pub use records::{
    AnsweredBy, CompletionRecord, CompletionText, FeedbackRecord, ReviewJoin, ReviewRecord, ReviewStatus, Reviewed,
    Thumbs,
};
