//! Feedback capture: every completion the gateway returns is logged (append-only JSONL, rotated
//! by size), `POST /v1/feedback` stores what a user said about one answer (fsync before the
//! acknowledgement), and admins review corrections before training may use them. Everything
//! lives under `<data_dir>/feedback/` and is reloaded on start-up.
//!
//! Files: `completions-<n>.jsonl` (one [`CompletionRecord`] a line), `feedback.jsonl`
//! ([`FeedbackRecord`]s) and `reviews.jsonl` ([`ReviewRecord`]s; the last one for a feedback
//! id wins). A torn last line (a crash mid-write) is skipped with a warning, never fatal.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Whether completions are logged, and with what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogMode {
    /// Prompt and answer as they were.
    On,
    /// Nothing is written; feedback can still name the answers of this process's lifetime.
    Off,
    /// Message text is replaced by `[redacted]`; ids, models, parameters and usage remain.
    Redact,
}

/// One returned completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionRecord {
    pub id: String,
    pub created: u64,
    pub tenant: String,
    pub sub: String,
    /// The base model that served it.
    pub model: String,
    /// `name@version`, or empty for the base.
    pub adapter: String,
    /// Chat messages (`[{role, content}]`) or the raw prompt text.
    pub prompt: serde_json::Value,
    pub answer: String,
    pub finish_reason: String,
    /// Sampling parameters and limits as the request gave them.
    pub params: serde_json::Value,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Thumbs {
    Up,
    Down,
}

/// What a user said about one answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FeedbackRecord {
    /// `fb-…`
    pub id: String,
    /// Always `feedback`.
    pub object: String,
    pub response_id: String,
    pub created: u64,
    pub tenant: String,
    pub sub: String,
    pub model: String,
    pub adapter: String,
    pub thumbs: Option<Thumbs>,
    pub rating: Option<u8>,
    pub correction: Option<String>,
    pub comment: Option<String>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReviewStatus {
    Pending,
    Accepted,
    Rejected,
}

/// An admin's decision on one feedback record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ReviewRecord {
    pub feedback_id: String,
    pub status: ReviewStatus,
    /// The correction training will use (the user's, or the reviewer's edit of it).
    pub correction: Option<String>,
    pub reviewer: String,
    pub at: u64,
}

/// A feedback record with its review state, as the admin API lists it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Reviewed {
    #[serde(flatten)]
    pub feedback: FeedbackRecord,
    pub status: ReviewStatus,
    /// Set once reviewed: what training will use.
    pub accepted_correction: Option<String>,
}

/// A completion being generated; becomes a [`CompletionRecord`] when it finishes.
#[derive(Debug, Clone)]
pub struct Draft {
    pub tenant: String,
    pub sub: String,
    pub prompt: serde_json::Value,
    pub params: serde_json::Value,
}

/// Who answered: kept in memory for every logged response id.
#[derive(Debug, Clone)]
struct Answered {
    tenant: String,
    model: String,
    adapter: String,
}

struct Files {
    completions: Option<File>,
    completions_bytes: u64,
    completions_seq: u64,
    feedback: File,
    reviews: File,
}

struct State {
    responses: HashMap<String, Answered>,
    feedback: Vec<FeedbackRecord>,
    by_id: HashMap<String, usize>,
    /// (response id, sub): one feedback per user per answer.
    given: HashSet<(String, String)>,
    reviews: HashMap<String, ReviewRecord>,
}

pub struct FeedbackStore {
    dir: PathBuf,
    /// Set at start-up when Redis is configured.
    pub shared: std::sync::OnceLock<std::sync::Arc<crate::feedback_stream::SharedFeedback>>,
    mode: LogMode,
    rotate_bytes: u64,
    files: Mutex<Files>,
    state: Mutex<State>,
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Opens a log for appending; a torn last line (no newline) is closed first, so the next record
/// starts on a line of its own.
fn open_append(path: &Path) -> std::io::Result<File> {
    let mut file = OpenOptions::new().create(true).append(true).read(true).open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        use std::io::{Read, Seek, SeekFrom};
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            file.write_all(b"\n")?;
        }
    }
    Ok(file)
}

/// Every parseable line of a JSONL file; unparseable ones (a torn tail) are skipped and logged.
fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Vec<T>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(v) => out.push(v),
            Err(e) => {
                tracing::warn!(file = %path.display(), line = n + 1, error = %e, "skipping an unreadable feedback log line")
            }
        }
    }
    Ok(out)
}

/// Appends one JSON line; with `durable`, returns only after the data reached the disk.
fn append<T: Serialize>(file: &mut File, value: &T, durable: bool) -> std::io::Result<u64> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    file.write_all(&line)?;
    if durable {
        file.sync_data()?;
    }
    Ok(line.len() as u64)
}

impl FeedbackStore {
    /// Opens (or creates) `dir` and reloads what it holds.
    pub fn open(dir: &Path, mode: LogMode, rotate_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut responses = HashMap::new();
        let mut seq = 0;
        let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let n = p.file_name()?.to_str()?.strip_prefix("completions-")?.strip_suffix(".jsonl")?.parse().ok()?;
                Some((n, p))
            })
            .collect();
        names.sort();
        for (n, path) in &names {
            seq = seq.max(*n);
            for r in read_lines::<CompletionRecord>(path)? {
                responses.insert(r.id, Answered { tenant: r.tenant, model: r.model, adapter: r.adapter });
            }
        }
        let feedback: Vec<FeedbackRecord> = read_lines(&dir.join("feedback.jsonl"))?;
        let mut reviews = HashMap::new();
        for r in read_lines::<ReviewRecord>(&dir.join("reviews.jsonl"))? {
            reviews.insert(r.feedback_id.clone(), r);
        }
        let by_id = feedback.iter().enumerate().map(|(i, f)| (f.id.clone(), i)).collect();
        let given = feedback.iter().map(|f| (f.response_id.clone(), f.sub.clone())).collect();
        let current = dir.join(format!("completions-{seq}.jsonl"));
        let completions = match mode {
            LogMode::Off => None,
            _ => Some(open_append(&current)?),
        };
        let completions_bytes = std::fs::metadata(&current).map_or(0, |m| m.len());
        Ok(Self {
            dir: dir.to_owned(),
            shared: std::sync::OnceLock::new(),
            mode,
            rotate_bytes: rotate_bytes.max(1),
            files: Mutex::new(Files {
                completions,
                completions_bytes,
                completions_seq: seq,
                feedback: open_append(&dir.join("feedback.jsonl"))?,
                reviews: open_append(&dir.join("reviews.jsonl"))?,
            }),
            state: Mutex::new(State { responses, feedback, by_id, given, reviews }),
        })
    }

    pub fn mode(&self) -> LogMode {
        self.mode
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `id` is an answer this store knows, given to `tenant`.
    pub fn knows(&self, tenant: &str, id: &str) -> bool {
        self.state.lock().responses.get(id).is_some_and(|a| a.tenant == tenant)
    }

    /// Learns of an answer another replica gave.
    pub fn remember(&self, id: &str, tenant: &str, model: &str, adapter: &str) {
        self.state.lock().responses.insert(
            id.to_owned(),
            Answered { tenant: tenant.to_owned(), model: model.to_owned(), adapter: adapter.to_owned() },
        );
    }

    /// Records a finished completion. Written at once but not fsynced: losing the last few
    /// lines in a power cut loses only the ability to give feedback on those answers.
    pub fn log_completion(&self, mut record: CompletionRecord) {
        if self.mode == LogMode::Redact {
            redact(&mut record.prompt);
            record.answer = "[redacted]".into();
        }
        if let Some(shared) = self.shared.get().cloned() {
            let logged = self.mode != LogMode::Off;
            let (id, by) = (
                record.id.clone(),
                crate::feedback_stream::AnsweredBy {
                    tenant: record.tenant.clone(),
                    model: record.model.clone(),
                    adapter: record.adapter.clone(),
                    prompt: logged.then(|| record.prompt.clone()),
                    answer: logged.then(|| record.answer.clone()),
                },
            );
            tokio::spawn(async move { shared.remember(&id, &by).await });
        }
        self.state.lock().responses.insert(
            record.id.clone(),
            Answered { tenant: record.tenant.clone(), model: record.model.clone(), adapter: record.adapter.clone() },
        );
        if self.mode == LogMode::Off {
            return;
        }
        let mut files = self.files.lock();
        if files.completions_bytes >= self.rotate_bytes {
            files.completions_seq += 1;
            let next = self.dir.join(format!("completions-{}.jsonl", files.completions_seq));
            match open_append(&next) {
                Ok(f) => {
                    if let Some(old) = files.completions.replace(f) {
                        let _ = old.sync_all();
                    }
                    files.completions_bytes = 0;
                }
                Err(e) => tracing::error!(error = %e, file = %next.display(), "cannot rotate the completion log"),
            }
        }
        let Files { completions, completions_bytes, .. } = &mut *files;
        if let Some(file) = completions {
            match append(file, &record, false) {
                Ok(n) => *completions_bytes += n,
                Err(e) => tracing::error!(error = %e, "cannot write the completion log"),
            }
        }
    }

    /// Stores feedback on `response_id` for `caller`; durable when this returns `Ok`.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &self,
        tenant: &str,
        sub: &str,
        response_id: &str,
        thumbs: Option<Thumbs>,
        rating: Option<u8>,
        correction: Option<String>,
        comment: Option<String>,
        tags: Vec<String>,
    ) -> Result<FeedbackRecord, ApiError> {
        let answered = self
            .state
            .lock()
            .responses
            .get(response_id)
            .filter(|a| a.tenant == tenant)
            .cloned()
            .ok_or_else(|| ApiError::NotFound { message: format!("no response with id `{response_id}`") })?;
        let record = FeedbackRecord {
            id: format!("fb-{}", uuid::Uuid::new_v4().simple()),
            object: "feedback".into(),
            response_id: response_id.to_owned(),
            created: now(),
            tenant: tenant.to_owned(),
            sub: sub.to_owned(),
            model: answered.model,
            adapter: answered.adapter,
            thumbs,
            rating,
            correction,
            comment,
            tags,
        };
        // The duplicate check runs under the file lock, which orders writers, so two racing
        // requests cannot both be stored.
        let mut files = self.files.lock();
        if self.state.lock().given.contains(&(record.response_id.clone(), record.sub.clone())) {
            return Err(ApiError::Conflict { message: format!("feedback on `{response_id}` was already given") });
        }
        append(&mut files.feedback, &record, true)
            .map_err(|e| ApiError::Internal(format!("feedback not stored: {e}")))?;
        let mut state = self.state.lock();
        state.given.insert((record.response_id.clone(), record.sub.clone()));
        let index = state.feedback.len();
        state.by_id.insert(record.id.clone(), index);
        state.feedback.push(record.clone());
        Ok(record)
    }

    /// Feedback records with their review state, oldest first, optionally of one status.
    pub fn list(&self, status: Option<ReviewStatus>, offset: usize, limit: usize) -> Vec<Reviewed> {
        let state = self.state.lock();
        state
            .feedback
            .iter()
            .map(|f| {
                let review = state.reviews.get(&f.id);
                Reviewed {
                    feedback: f.clone(),
                    status: review.map_or(ReviewStatus::Pending, |r| r.status),
                    accepted_correction: review.and_then(|r| r.correction.clone()),
                }
            })
            .filter(|r| status.is_none_or(|s| r.status == s))
            .skip(offset)
            .take(limit)
            .collect()
    }

    /// Accepts (optionally with an edited correction) or rejects one record; durable on `Ok`.
    pub fn review(
        &self,
        id: &str,
        status: ReviewStatus,
        edited: Option<String>,
        reviewer: &str,
    ) -> Result<(Reviewed, ReviewRecord), ApiError> {
        let feedback = {
            let state = self.state.lock();
            let i = *state
                .by_id
                .get(id)
                .ok_or_else(|| ApiError::NotFound { message: format!("no feedback with id `{id}`") })?;
            state.feedback[i].clone()
        };
        if status == ReviewStatus::Pending {
            return Err(ApiError::invalid("a review accepts or rejects", Some("action".to_owned())));
        }
        let correction = match status {
            ReviewStatus::Accepted => edited.or_else(|| feedback.correction.clone()),
            _ => None,
        };
        let record =
            ReviewRecord { feedback_id: id.to_owned(), status, correction, reviewer: reviewer.to_owned(), at: now() };
        let mut files = self.files.lock();
        append(&mut files.reviews, &record, true).map_err(|e| ApiError::Internal(format!("review not stored: {e}")))?;
        self.state.lock().reviews.insert(id.to_owned(), record.clone());
        Ok((Reviewed { feedback, status, accepted_correction: record.correction.clone() }, record))
    }
}

/// Replaces every string under a `content` key (chat) or a bare string (raw prompt).
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => *s = "[redacted]".into(),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        serde_json::Value::Object(map) => {
            if let Some(c) = map.get_mut("content") {
                *c = serde_json::Value::String("[redacted]".into());
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, tenant: &str) -> CompletionRecord {
        CompletionRecord {
            id: id.into(),
            created: 1,
            tenant: tenant.into(),
            sub: "u".into(),
            model: "m".into(),
            adapter: String::new(),
            prompt: serde_json::json!([{"role": "user", "content": "my email is a@b.c"}]),
            answer: "ok".into(),
            finish_reason: "stop".into(),
            params: serde_json::json!({}),
            prompt_tokens: 3,
            completion_tokens: 1,
        }
    }

    #[test]
    fn logs_rotate_and_reload_and_a_torn_tail_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = FeedbackStore::open(dir.path(), LogMode::On, 300).unwrap();
        for i in 0..5 {
            store.log_completion(record(&format!("r{i}"), "t"));
        }
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("completions-"))
            .collect();
        assert!(files.len() >= 2, "the log rotated");
        store.add("t", "u", "r3", Some(Thumbs::Up), None, None, None, vec![]).unwrap();
        drop(store);
        // A crash mid-line leaves a torn tail.
        let mut f = open_append(&dir.path().join("feedback.jsonl")).unwrap();
        f.write_all(b"{\"id\": \"fb-torn").unwrap();
        let store = FeedbackStore::open(dir.path(), LogMode::On, 300).unwrap();
        assert_eq!(store.list(None, 0, 10).len(), 1);
        assert!(matches!(
            store.add("t", "u", "r3", Some(Thumbs::Up), None, None, None, vec![]),
            Err(ApiError::Conflict { .. })
        ));
        assert!(
            store.add("t", "u", "r4", None, Some(2), None, None, vec![]).is_ok(),
            "ids from rotated files are known"
        );
    }

    #[test]
    fn redaction_keeps_structure_but_no_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = FeedbackStore::open(dir.path(), LogMode::Redact, 1 << 20).unwrap();
        store.log_completion(record("r1", "t"));
        let text = std::fs::read_to_string(dir.path().join("completions-0.jsonl")).unwrap();
        assert!(!text.contains("a@b.c") && text.contains("[redacted]") && text.contains("\"role\":\"user\""), "{text}");
    }
}
