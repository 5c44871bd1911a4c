//! Every name that crosses a process boundary: Redis keys and streams, and the files and
//! directories the gateway and the sidecar share under the data directory.

use std::path::{Path, PathBuf};

/// The stream every feedback record and review decision is added to, as one [`crate::Envelope`]
/// per entry under the field [`STREAM_FIELD`].
pub const FEEDBACK_STREAM: &str = "switchyard:feedback";
/// The field of a [`FEEDBACK_STREAM`] entry that holds the envelope's JSON.
pub const STREAM_FIELD: &str = "record";
/// The sidecar's consumer group on [`FEEDBACK_STREAM`].
pub const SIDECAR_GROUP: &str = "finetune";
/// The sidecar's consumer name in that group. One stable name: what a crashed sidecar read but
/// never acknowledged stays pending under it, and the next start reads those entries first.
pub const SIDECAR_CONSUMER: &str = "finetune-sidecar";

/// Prefix of the key that says who answered a response ([`crate::AnsweredBy`]).
pub const RESPONSE_KEY_PREFIX: &str = "switchyard:response:";
/// Prefix of the key that claims the one feedback a user may give on one answer.
pub const FEEDBACK_GIVEN_KEY_PREFIX: &str = "switchyard:feedback-given:";

/// `switchyard:response:{id}`: who answered `id`, with what the completion log keeps.
pub fn response_key(response_id: &str) -> String {
    format!("{RESPONSE_KEY_PREFIX}{response_id}")
}

/// `switchyard:feedback-given:{response_id}:{sub}`: `sub` gave feedback on `response_id`.
pub fn feedback_given_key(response_id: &str, sub: &str) -> String {
    format!("{FEEDBACK_GIVEN_KEY_PREFIX}{response_id}:{sub}")
}

/// `<data_dir>/feedback/`: the gateway's completion logs, feedback, reviews and spool.
pub const FEEDBACK_DIR: &str = "feedback";
/// `<data_dir>/registry/`: the adapter registry (the gateway writes it; the sidecar may read it).
pub const REGISTRY_DIR: &str = "registry";
/// `<data_dir>/finetune/`: the job queue, uploaded datasets and the sidecar's own state.
pub const FINETUNE_DIR: &str = "finetune";

/// One [`crate::FeedbackRecord`] a line, fsynced before the gateway acknowledges it.
pub const FEEDBACK_FILE: &str = "feedback.jsonl";
/// One [`crate::ReviewRecord`] a line; the last one for a feedback id wins.
pub const REVIEWS_FILE: &str = "reviews.jsonl";
/// Envelopes the gateway could not add to the stream while Redis was down, oldest first.
pub const SPOOL_FILE: &str = "spool.jsonl";
/// What a completion log's file name starts with: `completions-<n>.jsonl`, `n` counting up as
/// the log rotates.
pub const COMPLETIONS_PREFIX: &str = "completions-";
const JSONL: &str = ".jsonl";

/// What replaces message text in a completion logged in `redact` mode.
pub const REDACTED: &str = "[redacted]";

/// `completions-<n>.jsonl`.
pub fn completions_file(n: u64) -> String {
    format!("{COMPLETIONS_PREFIX}{n}{JSONL}")
}

/// The `n` of `completions-<n>.jsonl`, or `None` for any other name.
pub fn completions_seq(file_name: &str) -> Option<u64> {
    file_name.strip_prefix(COMPLETIONS_PREFIX)?.strip_suffix(JSONL)?.parse().ok()
}

/// The completion logs in a feedback directory, oldest first. A missing directory has none.
pub fn completion_logs(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut logs: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| Some((completions_seq(p.file_name()?.to_str()?)?, p)))
        .collect();
    logs.sort();
    Ok(logs)
}

/// `<data_dir>/finetune/jobs/`: one directory per training job.
pub const JOBS_DIR: &str = "jobs";
/// `<data_dir>/finetune/datasets/`: uploaded dataset files, `ds-<hash>`.
pub const DATASETS_DIR: &str = "datasets";
/// A job's [`crate::jobs::JobSpec`], written once.
pub const JOB_SPEC_FILE: &str = "spec.json";
/// A job's [`crate::jobs::JobStatus`], replaced atomically.
pub const JOB_STATUS_FILE: &str = "status.json";
/// An empty file whose presence asks a job to stop.
pub const JOB_CANCEL_FILE: &str = "cancel";
/// The trainer's loss curve, one [`crate::jobs::StepLog`] a line.
pub const TRAIN_LOG_FILE: &str = "train_log.jsonl";

/// What every job id starts with.
pub const JOB_ID_PREFIX: &str = "ftjob-";
/// What every uploaded dataset's id starts with.
pub const DATASET_ID_PREFIX: &str = "ds-";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_log_names_round_trip_and_sort_by_number() {
        assert_eq!(completions_file(12), "completions-12.jsonl");
        assert_eq!(completions_seq("completions-12.jsonl"), Some(12));
        for other in ["completions-.jsonl", "completions-1.json", "feedback.jsonl", "completions-x.jsonl"] {
            assert_eq!(completions_seq(other), None, "{other}");
        }
        let dir = tempfile::tempdir().unwrap();
        for n in [10, 2, 1] {
            std::fs::write(dir.path().join(completions_file(n)), "").unwrap();
        }
        std::fs::write(dir.path().join(FEEDBACK_FILE), "").unwrap();
        let seqs: Vec<u64> = completion_logs(dir.path()).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(seqs, [1, 2, 10], "numeric order, not text order");
        assert!(completion_logs(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn keys_keep_their_shape() {
        assert_eq!(response_key("chatcmpl-1"), "switchyard:response:chatcmpl-1");
        assert_eq!(feedback_given_key("chatcmpl-1", "alice"), "switchyard:feedback-given:chatcmpl-1:alice");
    }
}
