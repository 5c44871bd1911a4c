//! Feedback capture: every completion the gateway returns is logged (append-only JSONL, rotated
//! by size), `POST /v1/feedback` stores what a user said about one answer (fsync before the
//! acknowledgement), and admins review corrections before training may use them. Everything
//! lives under `<data_dir>/feedback/` and is reloaded on start-up.
//!
//! Files: `completions-<n>.jsonl` (one [`CompletionRecord`] a line), `feedback.jsonl`
//! ([`FeedbackRecord`]s) and `reviews.jsonl` ([`ReviewRecord`]s; the last one for a feedback
//! id wins). The records, names and JSONL handling are `protocol`'s: a torn line of any kind
//! (a crash mid-write) is skipped with a warning, never fatal.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use protocol::jsonl::{self, Appender, Durability};
use protocol::names::{self, REDACTED};
use protocol::{CompletionRecord, FeedbackRecord, ReviewJoin, ReviewRecord, ReviewStatus, Reviewed, Thumbs};
use serde::Deserialize;

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

/// Chat messages as the completion log and training keep them: `[{role, content}]`.
pub fn messages_json(messages: &[crate::engine::Message]) -> serde_json::Value {
    serde_json::Value::Array(
        messages.iter().map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content})).collect(),
    )
}

/// Which feedback records a review listing or a labelling queue takes; every set field must
/// match.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackFilter {
    /// An adapter name (any version) or `name@version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// The application endpoint that answered (`classify`, `qa`, `generate`, `recommend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// One of the feedback's tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Exactly this rating (1-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rating: Option<u8>,
    /// Ratings up to this one (1-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rating: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbs: Option<Thumbs>,
    /// Given at or after (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Given before (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

impl FeedbackFilter {
    /// Whether `f` (answered by the endpoint `task`) passes.
    pub fn matches(&self, f: &FeedbackRecord, task: Option<&str>) -> bool {
        let adapter_ok = self
            .adapter
            .as_deref()
            .is_none_or(|a| f.adapter == a || f.adapter.split_once('@').is_some_and(|(name, _)| name == a));
        adapter_ok
            && self.task.as_deref().is_none_or(|t| task == Some(t))
            && self.tag.as_deref().is_none_or(|t| f.tags.iter().any(|x| x == t))
            && self.rating.is_none_or(|x| f.rating == Some(x))
            && self.max_rating.is_none_or(|m| f.rating.is_some_and(|r| r <= m))
            && self.thumbs.is_none_or(|t| f.thumbs == Some(t))
            && self.since.is_none_or(|s| f.created >= s)
            && self.until.is_none_or(|u| f.created < u)
    }
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
    /// The application endpoint that answered; `None` for chat and text completions.
    task: Option<String>,
}

struct Files {
    completions: Option<Appender>,
    completions_bytes: u64,
    completions_seq: u64,
    feedback: Appender,
    reviews: Appender,
}

struct State {
    responses: HashMap<String, Answered>,
    /// Feedback with its review decisions (the last one wins).
    join: ReviewJoin,
    /// (response id, sub): one feedback per user per answer.
    given: HashSet<(String, String)>,
    /// How far `feedback.jsonl` and `reviews.jsonl` have been read: other replicas sharing the
    /// data directory append to them too, and [`FeedbackStore::catch_up`] reads on from here.
    feedback_read: u64,
    reviews_read: u64,
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

fn io(e: protocol::ProtocolError) -> std::io::Error {
    std::io::Error::other(e)
}

impl FeedbackStore {
    /// Opens (or creates) `dir` and reloads what it holds.
    pub fn open(dir: &Path, mode: LogMode, rotate_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut responses = HashMap::new();
        let mut seq = 0;
        for (n, path) in names::completion_logs(dir)? {
            seq = seq.max(n);
            jsonl::for_each(&path, |r: CompletionRecord| {
                let task = r.task();
                responses.insert(r.id, Answered { tenant: r.tenant, model: r.model, adapter: r.adapter, task });
            })
            .map_err(io)?;
        }
        let mut state =
            State { responses, join: ReviewJoin::new(), given: HashSet::new(), feedback_read: 0, reviews_read: 0 };
        catch_up(dir, &mut state).map_err(io)?;
        let current = dir.join(names::completions_file(seq));
        let completions = match mode {
            LogMode::Off => None,
            _ => Some(Appender::open(&current).map_err(io)?),
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
                feedback: Appender::open(&dir.join(names::FEEDBACK_FILE)).map_err(io)?,
                reviews: Appender::open(&dir.join(names::REVIEWS_FILE)).map_err(io)?,
            }),
            state: Mutex::new(state),
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
    pub fn remember(&self, id: &str, by: &protocol::AnsweredBy) {
        self.state.lock().responses.insert(
            id.to_owned(),
            Answered {
                tenant: by.tenant.clone(),
                model: by.model.clone(),
                adapter: by.adapter.clone(),
                task: by.task.clone(),
            },
        );
    }

    /// The application endpoint that answered `response_id` (`classify`, `qa`, ...), if one did.
    pub fn task_of(&self, response_id: &str) -> Option<String> {
        self.state.lock().responses.get(response_id).and_then(|a| a.task.clone())
    }

    /// The logged prompt and answer of each of `ids` the completion logs hold, read newest
    /// log first and stopping once all are found (the console shows them beside feedback).
    pub fn completions(&self, ids: &HashSet<&str>) -> HashMap<String, protocol::CompletionText> {
        let mut found = HashMap::new();
        if ids.is_empty() || self.mode == LogMode::Off {
            return found;
        }
        let Ok(mut logs) = names::completion_logs(&self.dir) else { return found };
        logs.sort_by_key(|l| std::cmp::Reverse(l.0));
        for (_, path) in logs {
            let read = jsonl::for_each(&path, |r: CompletionRecord| {
                if ids.contains(r.id.as_str()) {
                    found.insert(r.id.clone(), r.text());
                }
            });
            if let Err(e) = read {
                tracing::warn!(error = %e, "cannot read a completion log");
            }
            if found.len() == ids.len() {
                break;
            }
        }
        found
    }

    /// Records a finished completion. Written at once but not fsynced: losing the last few
    /// lines in a power cut loses only the ability to give feedback on those answers.
    pub fn log_completion(&self, mut record: CompletionRecord) {
        if self.mode == LogMode::Redact {
            redact(&mut record.prompt);
            record.answer = REDACTED.into();
        }
        if let Some(shared) = self.shared.get().cloned() {
            let logged = self.mode != LogMode::Off;
            let (id, by) = (
                record.id.clone(),
                protocol::AnsweredBy {
                    tenant: record.tenant.clone(),
                    model: record.model.clone(),
                    adapter: record.adapter.clone(),
                    prompt: logged.then(|| record.prompt.clone()),
                    answer: logged.then(|| record.answer.clone()),
                    task: record.task(),
                },
            );
            tokio::spawn(async move { shared.remember(&id, &by).await });
        }
        self.state.lock().responses.insert(
            record.id.clone(),
            Answered {
                tenant: record.tenant.clone(),
                model: record.model.clone(),
                adapter: record.adapter.clone(),
                task: record.task(),
            },
        );
        if self.mode == LogMode::Off {
            return;
        }
        let mut files = self.files.lock();
        if files.completions_bytes >= self.rotate_bytes {
            files.completions_seq += 1;
            let next = self.dir.join(names::completions_file(files.completions_seq));
            match Appender::open(&next) {
                Ok(f) => {
                    if let Some(old) = files.completions.replace(f) {
                        let _ = old.sync();
                    }
                    files.completions_bytes = 0;
                }
                Err(e) => tracing::error!(error = %e, file = %next.display(), "cannot rotate the completion log"),
            }
        }
        let Files { completions, completions_bytes, .. } = &mut *files;
        if let Some(file) = completions {
            match file.append(&record, Durability::Written) {
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
        files
            .feedback
            .append(&record, Durability::Synced)
            .map_err(|e| ApiError::Internal(format!("feedback not stored: {e}")))?;
        let mut state = self.state.lock();
        state.given.insert((record.response_id.clone(), record.sub.clone()));
        state.join.add_feedback(record.clone());
        Ok(record)
    }

    /// What the feedback since `since` (unix seconds) says about answers of each of `adapters`
    /// (`name@version`), in order: thumbs up, a rating of 4 or 5, are good; thumbs down, a
    /// rating of 1 or 2, or a correction are bad. Reads what other replicas appended first.
    pub fn tally<const N: usize>(&self, adapters: [&str; N], since: u64) -> [adapters::Evidence; N] {
        let mut state = self.state.lock();
        self.catch_up_locked(&mut state);
        let mut out: [adapters::Evidence; N] = std::array::from_fn(|_| adapters::Evidence::default());
        let mut rating_sums = [0u64; N];
        for r in state.join.all().filter(|r| r.feedback.created >= since) {
            let f = &r.feedback;
            let Some(i) = adapters.iter().position(|a| *a == f.adapter) else { continue };
            let e = &mut out[i];
            let corrected = f.correction.as_deref().is_some_and(|c| !c.trim().is_empty());
            e.thumbs_up += u64::from(f.thumbs == Some(Thumbs::Up));
            e.thumbs_down += u64::from(f.thumbs == Some(Thumbs::Down));
            if let Some(rating) = f.rating {
                e.ratings += 1;
                rating_sums[i] += u64::from(rating);
            }
            let verdict = if corrected || f.thumbs == Some(Thumbs::Down) || f.rating.is_some_and(|r| r <= 2) {
                Some(false)
            } else if f.thumbs == Some(Thumbs::Up) || f.rating.is_some_and(|r| r >= 4) {
                Some(true)
            } else {
                None
            };
            if let Some(good) = verdict {
                e.judged += 1;
                e.good += u64::from(good);
                e.corrected += u64::from(corrected);
            }
        }
        for (e, sum) in out.iter_mut().zip(rating_sums) {
            if e.ratings > 0 {
                e.mean_rating = Some(sum as f64 / e.ratings as f64);
            }
            if e.judged > 0 {
                e.accuracy = Some(1.0 - e.corrected as f64 / e.judged as f64);
            }
        }
        out
    }

    /// Feedback records with their review state, oldest first, optionally of one status, that
    /// pass `filter`.
    pub fn list(
        &self,
        status: Option<ReviewStatus>,
        filter: &FeedbackFilter,
        offset: usize,
        limit: usize,
    ) -> Vec<Reviewed> {
        let mut state = self.state.lock();
        self.catch_up_locked(&mut state);
        let State { join, responses, .. } = &*state;
        join.all()
            .filter(|r| status.is_none_or(|s| r.status == s))
            .filter(|r| {
                let task = responses.get(&r.feedback.response_id).and_then(|a| a.task.as_deref());
                filter.matches(&r.feedback, task)
            })
            .skip(offset)
            .take(limit)
            .collect()
    }

    /// One record with its review state.
    pub fn get(&self, id: &str) -> Option<Reviewed> {
        let mut state = self.state.lock();
        if state.join.get(id).is_none() {
            self.catch_up_locked(&mut state);
        }
        state.join.get(id).map(|f| state.join.reviewed(f))
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
            let mut state = self.state.lock();
            if state.join.get(id).is_none() {
                // Perhaps another replica took it: read what they appended since.
                self.catch_up_locked(&mut state);
            }
            state.join.get(id).cloned()
        }
        .ok_or_else(|| ApiError::NotFound { message: format!("no feedback with id `{id}`") })?;
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
        files
            .reviews
            .append(&record, Durability::Synced)
            .map_err(|e| ApiError::Internal(format!("review not stored: {e}")))?;
        self.state.lock().join.add_review(record.clone());
        Ok((Reviewed { feedback, status, accepted_correction: record.correction.clone() }, record))
    }
}

impl FeedbackStore {
    /// Reads the feedback and reviews other processes appended since the last read; a failure
    /// is logged and leaves what is known as it was.
    fn catch_up_locked(&self, state: &mut State) {
        if let Err(e) = catch_up(&self.dir, state) {
            tracing::warn!(error = %e, "cannot read other replicas' feedback");
        }
    }
}

/// Adds the whole records appended to `feedback.jsonl` and `reviews.jsonl` since `state` last
/// read them. This process's own records come round again and change nothing: feedback is
/// keyed by id, and reviews replay in file order, so the last one in the file wins.
fn catch_up(dir: &Path, state: &mut State) -> Result<(), protocol::ProtocolError> {
    let State { join, given, feedback_read, reviews_read, .. } = state;
    *feedback_read = jsonl::for_each_from(&dir.join(names::FEEDBACK_FILE), *feedback_read, |f: FeedbackRecord| {
        given.insert((f.response_id.clone(), f.sub.clone()));
        join.add_feedback(f);
    })?;
    *reviews_read = jsonl::for_each_from(&dir.join(names::REVIEWS_FILE), *reviews_read, |r| join.add_review(r))?;
    Ok(())
}

/// Replaces every string under a `content` key (chat) or a bare string (raw prompt).
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => *s = REDACTED.into(),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        serde_json::Value::Object(map) => {
            if let Some(c) = map.get_mut("content") {
                *c = serde_json::Value::String(REDACTED.into());
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
            .filter(|e| names::completions_seq(&e.file_name().to_string_lossy()).is_some())
            .collect();
        assert!(files.len() >= 2, "the log rotated");
        store.add("t", "u", "r3", Some(Thumbs::Up), None, None, None, vec![]).unwrap();
        drop(store);
        // A crash mid-line leaves a torn tail.
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.path().join(names::FEEDBACK_FILE)).unwrap();
        std::io::Write::write_all(&mut f, b"{\"id\": \"fb-torn\xff").unwrap();
        let store = FeedbackStore::open(dir.path(), LogMode::On, 300).unwrap();
        assert_eq!(store.list(None, &FeedbackFilter::default(), 0, 10).len(), 1);
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
        let text = std::fs::read_to_string(dir.path().join(names::completions_file(0))).unwrap();
        assert!(!text.contains("a@b.c") && text.contains(REDACTED) && text.contains("\"role\":\"user\""), "{text}");
    }
}
