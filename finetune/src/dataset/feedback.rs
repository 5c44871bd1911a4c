//! Gateway feedback joined with reviews and logged completions, turned into examples.
//!
//! The source is `<data_dir>/feedback/` or the sidecar's inbox of stream entries; only
//! admin-accepted records train. The records, the join and the files are `protocol`'s.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use protocol::names::{self, REDACTED};
use protocol::{jsonl, CompletionRecord, CompletionText, Envelope, FeedbackRecord, ReviewJoin, ReviewRecord};
use protocol::{ReviewStatus, Thumbs};
use serde_json::Value;

use super::{normalize_text, DropReason, Dropped, Example, FeedbackRange, Message, Role, Target};
use crate::error::FinetuneError;
use protocol::dataset::{chat, Reject};

/// One feedback record with its review state and, when the log still has it, its completion.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackItem {
    pub feedback: FeedbackRecord,
    pub status: ReviewStatus,
    /// The reviewed correction, set only when accepted.
    pub accepted_correction: Option<String>,
    pub completion: Option<CompletionText>,
}

/// Feedback, reviews and completions arriving in any order, from files or a stream, joined.
#[derive(Debug, Default)]
pub struct FeedbackView {
    join: ReviewJoin,
    completions: HashMap<String, CompletionText>,
    skipped: usize,
}

impl FeedbackView {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a feedback record; a repeated id (a redelivered stream entry) is ignored.
    pub fn add_feedback(&mut self, record: FeedbackRecord) {
        self.join.add_feedback(record);
    }

    /// Adds a review; a later review of the same feedback replaces an earlier one.
    pub fn add_review(&mut self, review: ReviewRecord) {
        self.join.add_review(review);
    }

    /// Adds the completion that answered `response_id`.
    pub fn add_completion(&mut self, response_id: String, completion: CompletionText) {
        self.completions.insert(response_id, completion);
    }

    /// Adds a stream entry: a feedback record (with the completion the sidecar joined to it, if
    /// any) or a review.
    pub fn add_envelope(&mut self, envelope: Envelope) {
        match envelope {
            Envelope::Feedback(entry) => {
                let entry = *entry;
                if let Some(completion) = entry.completion {
                    self.add_completion(entry.record.response_id.clone(), completion);
                }
                self.add_feedback(entry.record);
            }
            Envelope::Review(review) => self.add_review(review),
        }
    }

    /// Whether some feedback refers to this response id (so its completion is worth keeping).
    pub fn wants_completion(&self, response_id: &str) -> bool {
        self.join.records().iter().any(|f| f.response_id == response_id)
    }

    /// Lines that could not be read: torn writes, foreign JSON.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Every feedback record in arrival order, joined with its review and completion.
    pub fn items(&self) -> Vec<FeedbackItem> {
        self.join
            .all()
            .map(|r| FeedbackItem {
                completion: self.completions.get(&r.feedback.response_id).cloned(),
                feedback: r.feedback,
                status: r.status,
                accepted_correction: r.accepted_correction,
            })
            .collect()
    }
}

/// Reads the gateway's feedback directory: `feedback.jsonl`, `reviews.jsonl` and the rotated
/// `completions-<n>.jsonl` logs. Missing files are empty; unreadable lines are counted in
/// [`FeedbackView::skipped`]. Only completions that some feedback refers to are kept.
pub fn read_feedback_dir(dir: &Path) -> Result<FeedbackView, FinetuneError> {
    // A directory that is not there is a mistake in the caller's path, not an empty log.
    std::fs::read_dir(dir).map_err(|e| FinetuneError::io(dir, e))?;
    let mut view = FeedbackView::new();
    view.skipped += jsonl::for_each(&dir.join(names::FEEDBACK_FILE), |f| view.add_feedback(f))?;
    view.skipped += jsonl::for_each(&dir.join(names::REVIEWS_FILE), |r| view.add_review(r))?;
    let wanted: HashSet<String> = view.join.records().iter().map(|f| f.response_id.clone()).collect();
    for (_, path) in names::completion_logs(dir).map_err(|e| FinetuneError::io(dir, e))? {
        view.skipped += jsonl::for_each(&path, |c: CompletionRecord| {
            if wanted.contains(&c.id) {
                let text = c.text();
                view.add_completion(c.id, text);
            }
        })?;
    }
    Ok(view)
}

/// Reads the sidecar's inbox: stream entries as it kept them. A missing inbox is empty;
/// unreadable lines are counted in [`FeedbackView::skipped`].
pub fn read_inbox(path: &Path) -> Result<FeedbackView, FinetuneError> {
    let mut view = FeedbackView::new();
    view.skipped += jsonl::for_each(path, |e| view.add_envelope(e))?;
    Ok(view)
}

/// Which feedback to train on; everything else is left out silently (it belongs to another
/// tenant, adapter or run, not to this dataset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedbackOptions {
    /// Only feedback on this adapter: `name` (any version), `name@version`, or `""` for the base.
    pub adapter: Option<String>,
    pub tenant: Option<String>,
    /// Only feedback created at or after this Unix time, for incremental runs.
    pub since: Option<u64>,
    /// Only feedback on answers of this application endpoint (`classify`, `qa`, `generate`,
    /// `recommend`), or `chat` for chat and text completions.
    pub task: Option<String>,
    /// KTO's view (`--stage kto`): a thumbs up (or a rating of 4+) tags the answer desirable, a
    /// thumbs down (or a rating of 2 or less) undesirable, and a correction gives a desirable
    /// correction and an undesirable original; no pairs are formed.
    pub kto: bool,
}

impl FeedbackOptions {
    fn selects(&self, f: &FeedbackRecord) -> bool {
        let adapter_ok = self
            .adapter
            .as_deref()
            .is_none_or(|want| f.adapter == want || f.adapter.split_once('@').is_some_and(|(name, _)| name == want));
        adapter_ok && self.tenant.as_deref().is_none_or(|t| f.tenant == t) && self.since.is_none_or(|s| f.created >= s)
    }

    /// Whether the answer came from the endpoint `task` names (an unknown answer passes here
    /// and is dropped later for having no completion).
    fn selects_task(&self, completion: Option<&CompletionText>) -> bool {
        match (self.task.as_deref(), completion) {
            (None, _) | (_, None) => true,
            (Some("chat"), Some(c)) => c.task.is_none(),
            (Some(want), Some(c)) => c.task.as_deref() == Some(want),
        }
    }
}

/// Examples made from feedback, with the records left out and the range used.
#[derive(Debug, Clone, Default)]
pub struct FeedbackExamples {
    pub examples: Vec<Example>,
    pub dropped: Vec<Dropped>,
    /// `None` when no record produced an example.
    pub range: Option<FeedbackRange>,
    /// Records `FeedbackOptions` did not select (not listed as drops).
    pub not_selected: usize,
}

/// Turns accepted feedback into examples. A correction gives an SFT example (`<id>`) and a
/// preference pair against the original answer (`<id>:pref`); a thumbs up or a rating of 4+
/// without one gives a desirable `kto_tag` example of the original answer (SFT trains on it as
/// on any answer). With [`FeedbackOptions::kto`], a thumbs down or a rating of 2 or less gives
/// an undesirable one, and a correction a desirable correction (`<id>`) and an undesirable
/// original (`<id>:kto`). Unreviewed and rejected records, and accepted ones with nothing to
/// learn or no usable completion, are dropped with reasons.
pub fn examples_from_feedback(items: &[FeedbackItem], opts: &FeedbackOptions) -> FeedbackExamples {
    let mut out = FeedbackExamples::default();
    let mut used: Vec<&FeedbackRecord> = Vec::new();
    for item in items {
        let f = &item.feedback;
        if !opts.selects(f) || !opts.selects_task(item.completion.as_ref()) {
            out.not_selected += 1;
            continue;
        }
        match from_item(item, opts.kto) {
            Ok(made) => {
                if made.iter().any(Result::is_ok) {
                    used.push(f);
                }
                for result in made {
                    match result {
                        Ok(ex) => out.examples.push(ex),
                        Err(d) => out.dropped.push(d),
                    }
                }
            }
            Err(r) => out.dropped.push(Dropped::new(&f.id, r.reason, r.detail)),
        }
    }
    // Ties go to the earliest arrival for `first` and the latest for `last`.
    let first = used.iter().min_by_key(|f| f.created);
    let last = used.iter().max_by_key(|f| f.created);
    if let (Some(first), Some(last)) = (first, last) {
        out.range = Some(FeedbackRange {
            count: used.len(),
            first_id: first.id.clone(),
            first_created: first.created,
            last_id: last.id.clone(),
            last_created: last.created,
        });
    }
    out
}

/// The examples (or per-example drops) one accepted item gives, or why the item gives none.
fn from_item(item: &FeedbackItem, kto: bool) -> Result<Vec<Result<Example, Dropped>>, Reject> {
    let f = &item.feedback;
    match item.status {
        ReviewStatus::Pending => return Err(Reject::new(DropReason::Unreviewed, "not reviewed by an admin yet")),
        ReviewStatus::Rejected => return Err(Reject::new(DropReason::Rejected, "rejected in review")),
        ReviewStatus::Accepted => {}
    }
    let correction = item.accepted_correction.as_deref().map(normalize_text).filter(|c| !c.is_empty());
    let positive = f.thumbs == Some(Thumbs::Up) || (f.thumbs.is_none() && f.rating.is_some_and(|r| r >= 4));
    let negative = f.thumbs == Some(Thumbs::Down) || (f.thumbs.is_none() && f.rating.is_some_and(|r| r <= 2));
    if correction.is_none() && !positive && !(kto && negative) {
        let detail = if f.thumbs == Some(Thumbs::Down) {
            "thumbs down without a correction gives nothing to learn"
        } else {
            "no thumbs up, rating of 4 or more, or correction: nothing to learn"
        };
        return Err(Reject::new(DropReason::NothingToLearn, detail));
    }
    let completion = item.completion.as_ref().ok_or_else(|| {
        Reject::new(
            DropReason::NoCompletion,
            format!("completion `{}` is not in the logs (logging was off, or the log rotated away)", f.response_id),
        )
    })?;
    if is_redacted(&completion.prompt, &completion.answer) {
        return Err(Reject::new(DropReason::Redacted, format!("completion `{}` was logged redacted", f.response_id)));
    }
    let prompt = match &completion.prompt {
        Value::String(text) => {
            let text = normalize_text(text);
            if text.is_empty() {
                return Err(Reject::new(DropReason::Empty, "the prompt is empty"));
            }
            vec![Message::new(Role::User, text)]
        }
        turns => chat(turns, "prompt", None, Role::User)?,
    };
    let original = normalize_text(&completion.answer);
    let example = |id: String, target: Target| Example { id, prompt: prompt.clone(), target };
    let Some(correction) = correction else {
        if original.is_empty() {
            return Err(Reject::new(DropReason::Empty, "the original answer is empty"));
        }
        return Ok(vec![Ok(example(f.id.clone(), Target::Kto { answer: original, desirable: positive }))]);
    };
    if kto {
        let original = if original.is_empty() {
            Err(Dropped::new(format!("{}:kto", f.id), DropReason::Empty, "the original answer is empty"))
        } else if original == correction {
            Err(Dropped::new(
                format!("{}:kto", f.id),
                DropReason::NoSignal,
                "the correction equals the original answer",
            ))
        } else {
            Ok(example(format!("{}:kto", f.id), Target::Kto { answer: original, desirable: false }))
        };
        return Ok(vec![Ok(example(f.id.clone(), Target::Kto { answer: correction, desirable: true })), original]);
    }
    let pref_id = format!("{}:pref", f.id);
    let pair = if original.is_empty() {
        Err(Dropped::new(pref_id, DropReason::Empty, "the original answer is empty, so there is no rejected side"))
    } else if original == correction {
        Err(Dropped::new(pref_id, DropReason::NoSignal, "the correction equals the original answer"))
    } else {
        Ok(example(pref_id, Target::Preference { chosen: correction.clone(), rejected: original }))
    };
    Ok(vec![Ok(example(f.id.clone(), Target::Sft { answer: correction })), pair])
}

/// The gateway's redact mode replaces every text with [`REDACTED`].
fn is_redacted(prompt: &Value, answer: &str) -> bool {
    let prompt_redacted = match prompt {
        Value::String(s) => s == REDACTED,
        Value::Array(items) => items.iter().any(|m| m.get("content").and_then(Value::as_str) == Some(REDACTED)),
        _ => false,
    };
    prompt_redacted || answer == REDACTED
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feedback(
        id: &str,
        response: &str,
        thumbs: Option<&str>,
        correction: Option<&str>,
        created: u64,
    ) -> FeedbackRecord {
        serde_json::from_value(json!({"id": id, "object": "feedback", "response_id": response, "created": created,
               "tenant": "t", "sub": "u", "model": "m", "adapter": "bot@3", "thumbs": thumbs, "rating": null,
               "correction": correction, "comment": null, "tags": []}))
        .unwrap()
    }

    fn review(id: &str, status: &str, correction: Option<&str>) -> ReviewRecord {
        serde_json::from_value(
            json!({"feedback_id": id, "status": status, "correction": correction, "reviewer": "admin", "at": 5}),
        )
        .unwrap()
    }

    fn completion(id: &str, prompt: Value, answer: &str) -> CompletionRecord {
        serde_json::from_value(json!({"id": id, "created": 1, "tenant": "t", "sub": "u", "model": "m",
               "adapter": "bot@3", "prompt": prompt, "answer": answer, "finish_reason": "stop", "params": {},
               "prompt_tokens": 3, "completion_tokens": 1}))
        .unwrap()
    }

    fn text(prompt: Value, answer: &str) -> CompletionText {
        CompletionText { prompt, answer: answer.into(), task: None }
    }

    fn chat_prompt(q: &str) -> Value {
        json!([{"role": "system", "content": "be kind"}, {"role": "user", "content": q}])
    }

    fn write_lines<T: serde::Serialize>(path: &Path, values: &[T], tail: &str) {
        let mut text: String = values.iter().map(|v| serde_json::to_string(v).unwrap() + "\n").collect();
        text.push_str(tail);
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn directory_join_last_review_wins_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        write_lines(
            &dir.path().join(names::FEEDBACK_FILE),
            &[
                feedback("fb-1", "r1", Some("down"), Some("the fix"), 10),
                feedback("fb-2", "r2", Some("up"), None, 20),
                feedback("fb-3", "r3", Some("up"), None, 30),
                feedback("fb-4", "r4", Some("down"), None, 40),
            ],
            "{\"id\": \"fb-torn",
        );
        write_lines(
            &dir.path().join(names::REVIEWS_FILE),
            &[
                review("fb-1", "rejected", None),
                review("fb-1", "accepted", Some("the reviewed fix")),
                review("fb-2", "accepted", None),
                review("fb-3", "accepted", None),
                review("fb-3", "rejected", None),
                review("fb-4", "accepted", None),
            ],
            "",
        );
        write_lines(
            &dir.path().join(names::completions_file(0)),
            &[
                completion("r1", chat_prompt("q1"), "wrong"),
                completion("other", json!("x"), "y"),
                completion("r4", json!("p4"), "bad"),
            ],
            "",
        );
        write_lines(
            &dir.path().join(names::completions_file(1)),
            &[completion("r2", json!("raw prompt"), "right")],
            "{\"id\":",
        );
        let view = read_feedback_dir(dir.path()).unwrap();
        assert_eq!(view.skipped(), 2, "one torn feedback line, one torn completion line");
        let items = view.items();
        assert_eq!(items.len(), 4);
        assert_eq!(items[0].status, ReviewStatus::Accepted, "the last review wins");
        assert_eq!(items[0].accepted_correction.as_deref(), Some("the reviewed fix"));
        assert_eq!(items[2].status, ReviewStatus::Rejected);
        assert!(items[1].completion.is_some(), "joined from a rotated log by response id");

        let out = examples_from_feedback(&items, &FeedbackOptions::default());
        let ids: Vec<&str> = out.examples.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["fb-1", "fb-1:pref", "fb-2"]);
        assert_eq!(out.examples[0].prompt, [Message::new(Role::System, "be kind"), Message::new(Role::User, "q1")]);
        assert_eq!(out.examples[0].target, Target::Sft { answer: "the reviewed fix".into() });
        assert_eq!(
            out.examples[1].target,
            Target::Preference { chosen: "the reviewed fix".into(), rejected: "wrong".into() }
        );
        assert_eq!(out.examples[2].prompt, [Message::new(Role::User, "raw prompt")]);
        assert_eq!(out.examples[2].target, Target::Kto { answer: "right".into(), desirable: true });
        let drops: Vec<(&str, DropReason)> = out.dropped.iter().map(|d| (d.id.as_str(), d.reason)).collect();
        assert_eq!(drops, [("fb-3", DropReason::Rejected), ("fb-4", DropReason::NothingToLearn)]);
        assert!(out.dropped[1].detail.contains("thumbs down"));
        let range = out.range.unwrap();
        assert_eq!(
            (range.count, range.first_id.as_str(), range.last_id.as_str(), range.last_created),
            (2, "fb-1", "fb-2", 20)
        );

        // KTO's view: thumbs down is an undesirable answer, a correction no pair.
        let kto = examples_from_feedback(&items, &FeedbackOptions { kto: true, ..Default::default() });
        let got: Vec<(&str, &Target)> = kto.examples.iter().map(|e| (e.id.as_str(), &e.target)).collect();
        assert_eq!(
            got,
            [
                ("fb-1", &Target::Kto { answer: "the reviewed fix".into(), desirable: true }),
                ("fb-1:kto", &Target::Kto { answer: "wrong".into(), desirable: false }),
                ("fb-2", &Target::Kto { answer: "right".into(), desirable: true }),
                ("fb-4", &Target::Kto { answer: "bad".into(), desirable: false }),
            ]
        );
        let drops: Vec<(&str, DropReason)> = kto.dropped.iter().map(|d| (d.id.as_str(), d.reason)).collect();
        assert_eq!(drops, [("fb-3", DropReason::Rejected)]);
    }

    #[test]
    fn pending_missing_and_redacted_completions_are_dropped() {
        let mut view = FeedbackView::new();
        view.add_feedback(feedback("fb-p", "r1", Some("up"), None, 1));
        view.add_feedback(feedback("fb-m", "gone", Some("up"), None, 2));
        view.add_feedback(feedback("fb-r", "r3", None, None, 3));
        view.add_review(review("fb-m", "accepted", None));
        view.add_review(review("fb-r", "accepted", Some("better")));
        view.add_completion("r1".into(), text(chat_prompt("q"), "a"));
        view.add_completion("r3".into(), text(json!([{"role": "user", "content": REDACTED}]), REDACTED));
        let out = examples_from_feedback(&view.items(), &FeedbackOptions::default());
        assert!(out.examples.is_empty() && out.range.is_none());
        let drops: Vec<&str> = out.dropped.iter().map(|d| d.reason.code()).collect();
        assert_eq!(drops, ["unreviewed", "no_completion", "redacted"]);
    }

    #[test]
    fn inbox_entries_embed_completions_and_filters_select() {
        let dir = tempfile::tempdir().unwrap();
        let mut fb = feedback("fb-1", "r1", None, None, 100);
        fb.rating = Some(5);
        let entry = Envelope::Feedback(Box::new(protocol::FeedbackEntry {
            record: fb,
            completion: Some(text(chat_prompt("q"), "a")),
        }));
        let untagged = serde_json::to_string(&feedback("fb-2", "r2", Some("up"), None, 1)).unwrap();
        // A redelivered entry, an entry without a kind, and a torn tail.
        write_lines(
            &dir.path().join("inbox.jsonl"),
            &[entry.clone(), entry, Envelope::Review(review("fb-1", "accepted", None))],
            &format!("{untagged}\n{{\"kind\": \"feedback\", \"id\": \"fb-3"),
        );
        let view = read_inbox(&dir.path().join("inbox.jsonl")).unwrap();
        assert_eq!((view.items().len(), view.skipped()), (1, 2));
        assert_eq!(read_inbox(&dir.path().join("missing.jsonl")).unwrap().items().len(), 0);
        assert!(view.wants_completion("r1") && !view.wants_completion("r9"));
        let items = view.items();
        let all =
            examples_from_feedback(&items, &FeedbackOptions { adapter: Some("bot".into()), ..Default::default() });
        assert_eq!(all.examples.len(), 1, "rating 5 counts as positive; `bot` matches bot@3");
        for opts in [
            FeedbackOptions { adapter: Some("bot@2".into()), ..Default::default() },
            FeedbackOptions { tenant: Some("other".into()), ..Default::default() },
            FeedbackOptions { since: Some(101), ..Default::default() },
            FeedbackOptions { task: Some("classify".into()), ..Default::default() },
        ] {
            let out = examples_from_feedback(&items, &opts);
            assert_eq!((out.examples.len(), out.dropped.len(), out.not_selected), (0, 0, 1), "{opts:?}");
        }
        let chat = examples_from_feedback(&items, &FeedbackOptions { task: Some("chat".into()), ..Default::default() });
        assert_eq!(chat.examples.len(), 1, "a chat answer has no task");
    }

    #[test]
    fn a_task_filter_keeps_that_endpoints_answers_only() {
        let mut view = FeedbackView::default();
        for (id, task) in [("1", Some("classify")), ("2", Some("qa")), ("3", None)] {
            view.add_feedback(feedback(&format!("fb-{id}"), &format!("r{id}"), Some("up"), None, 1));
            view.add_review(review(&format!("fb-{id}"), "accepted", None));
            let mut t = text(chat_prompt("q"), "a");
            t.task = task.map(str::to_owned);
            view.add_completion(format!("r{id}"), t);
        }
        let ids = |task: &str| -> Vec<String> {
            let opts = FeedbackOptions { task: Some(task.into()), ..Default::default() };
            examples_from_feedback(&view.items(), &opts).examples.into_iter().map(|e| e.id).collect()
        };
        assert_eq!(ids("classify"), ["fb-1"]);
        assert_eq!(ids("qa"), ["fb-2"]);
        assert_eq!(ids("chat"), ["fb-3"]);
    }

    #[test]
    fn a_correction_equal_to_the_answer_gives_sft_only() {
        let mut view = FeedbackView::new();
        view.add_feedback(feedback("fb-1", "r1", Some("down"), Some("same"), 1));
        view.add_review(review("fb-1", "accepted", Some("same\r\n")));
        view.add_completion("r1".into(), text(json!([{"role": "assistant", "content": "hi"}]), "same"));
        let out = examples_from_feedback(&view.items(), &FeedbackOptions::default());
        assert_eq!(out.dropped[0].reason, DropReason::BadRoles, "a prompt must end with the user");
        view.add_completion("r1".into(), text(chat_prompt("q"), "same"));
        let out = examples_from_feedback(&view.items(), &FeedbackOptions::default());
        assert_eq!(out.examples.len(), 1);
        assert_eq!((out.dropped[0].id.as_str(), out.dropped[0].reason), ("fb-1:pref", DropReason::NoSignal));
    }

    #[test]
    fn a_missing_directory_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(read_feedback_dir(&dir.path().join("nope")), Err(FinetuneError::Io { .. })));
        assert!(read_feedback_dir(dir.path()).unwrap().items().is_empty());
    }
}
