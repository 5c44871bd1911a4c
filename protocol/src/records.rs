//! The feedback records the gateway writes and the sidecar trains on, and the one join of
//! feedback with review decisions (the last review of a record wins).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One returned completion (a line of `completions-<n>.jsonl`).
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

impl CompletionRecord {
    /// The part training needs.
    pub fn text(&self) -> CompletionText {
        CompletionText { prompt: self.prompt.clone(), answer: self.answer.clone(), task: self.task() }
    }

    /// The application endpoint that answered (`classify`, `qa`, `generate`, `recommend`, as
    /// `params.task` says); `None` for chat and text completions.
    pub fn task(&self) -> Option<String> {
        self.params.get("task").and_then(|t| t.as_str()).map(str::to_owned)
    }
}

/// The part of a logged completion that training needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompletionText {
    /// Chat messages (`[{role, content}]`) or the raw prompt of `/v1/completions`.
    #[schema(value_type = Object)]
    pub prompt: serde_json::Value,
    pub answer: String,
    /// The application endpoint that answered; `None` for chat and text completions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// Who answered a response, as stored under [`crate::names::response_key`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnsweredBy {
    pub tenant: String,
    pub model: String,
    pub adapter: String,
    /// The messages and answer as the completion log keeps them (redacted in `redact` mode,
    /// absent with logging off), so the training sidecar can join feedback to what it rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// The application endpoint that answered; `None` for chat and text completions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

impl AnsweredBy {
    /// The logged completion, when logging kept one.
    pub fn completion(&self) -> Option<CompletionText> {
        let answer = self.answer.clone()?;
        Some(CompletionText { prompt: self.prompt.clone().unwrap_or_default(), answer, task: self.task.clone() })
    }
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Reviewed {
    #[serde(flatten)]
    pub feedback: FeedbackRecord,
    pub status: ReviewStatus,
    /// Set once reviewed: what training will use.
    pub accepted_correction: Option<String>,
}

/// Feedback records joined with review decisions that arrive in any order, from files or a
/// stream. Records keep the order they first arrived in (a repeated id, such as a redelivered
/// stream entry, is ignored); the last review of a record wins.
#[derive(Debug, Clone, Default)]
pub struct ReviewJoin {
    feedback: Vec<FeedbackRecord>,
    index: HashMap<String, usize>,
    reviews: HashMap<String, ReviewRecord>,
}

impl ReviewJoin {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a record; returns false (and keeps the first) when its id is already here.
    pub fn add_feedback(&mut self, record: FeedbackRecord) -> bool {
        if self.index.contains_key(&record.id) {
            return false;
        }
        self.index.insert(record.id.clone(), self.feedback.len());
        self.feedback.push(record);
        true
    }

    /// Adds a review decision; it replaces any earlier one of the same record.
    pub fn add_review(&mut self, review: ReviewRecord) {
        self.reviews.insert(review.feedback_id.clone(), review);
    }

    pub fn get(&self, id: &str) -> Option<&FeedbackRecord> {
        self.index.get(id).map(|&i| &self.feedback[i])
    }

    /// Every record, in arrival order.
    pub fn records(&self) -> &[FeedbackRecord] {
        &self.feedback
    }

    /// One record with its review state.
    pub fn reviewed(&self, record: &FeedbackRecord) -> Reviewed {
        let review = self.reviews.get(&record.id);
        let status = review.map_or(ReviewStatus::Pending, |r| r.status);
        Reviewed {
            feedback: record.clone(),
            status,
            accepted_correction: review
                .filter(|r| r.status == ReviewStatus::Accepted)
                .and_then(|r| r.correction.clone()),
        }
    }

    /// Every record with its review state, in arrival order.
    pub fn all(&self) -> impl Iterator<Item = Reviewed> + '_ {
        self.feedback.iter().map(|f| self.reviewed(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn feedback(id: &str) -> FeedbackRecord {
        FeedbackRecord {
            id: id.into(),
            object: "feedback".into(),
            response_id: format!("r-{id}"),
            created: 1,
            tenant: "t".into(),
            sub: "u".into(),
            model: "m".into(),
            adapter: String::new(),
            thumbs: Some(Thumbs::Down),
            rating: None,
            correction: Some("fix".into()),
            comment: None,
            tags: vec![],
        }
    }

    fn review(id: &str, status: ReviewStatus, correction: Option<&str>) -> ReviewRecord {
        ReviewRecord {
            feedback_id: id.into(),
            status,
            correction: correction.map(str::to_owned),
            reviewer: "admin".into(),
            at: 2,
        }
    }

    #[test]
    fn the_last_review_wins_and_a_repeated_record_is_ignored() {
        let mut join = ReviewJoin::new();
        // A review may arrive before its record (two stream readers, or files read in any order).
        join.add_review(review("fb-2", ReviewStatus::Accepted, Some("early")));
        assert!(join.add_feedback(feedback("fb-1")));
        assert!(join.add_feedback(feedback("fb-2")));
        let mut changed = feedback("fb-1");
        changed.comment = Some("redelivered".into());
        assert!(!join.add_feedback(changed), "the first arrival is kept");
        join.add_review(review("fb-1", ReviewStatus::Accepted, Some("reviewed fix")));
        join.add_review(review("fb-1", ReviewStatus::Rejected, None));
        join.add_review(review("fb-2", ReviewStatus::Rejected, None));
        join.add_review(review("fb-2", ReviewStatus::Accepted, Some("final")));
        let all: Vec<Reviewed> = join.all().collect();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].feedback.comment.as_deref(), all[0].status), (None, ReviewStatus::Rejected));
        assert_eq!(all[0].accepted_correction, None, "a rejected record has nothing to train on");
        assert_eq!((all[1].status, all[1].accepted_correction.as_deref()), (ReviewStatus::Accepted, Some("final")));
        assert!(join.get("fb-3").is_none());
        assert_eq!(join.reviewed(&feedback("fb-3")).status, ReviewStatus::Pending);
    }

    #[test]
    fn the_wire_shape_is_the_one_on_disk() {
        let json = serde_json::to_value(feedback("fb-1")).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys.len(),
            13,
            "id, object, response_id, created, tenant, sub, model, adapter, thumbs, rating, correction, comment, tags: {keys:?}"
        );
        assert_eq!(json["thumbs"], "down");
        let reviewed =
            Reviewed { feedback: feedback("fb-1"), status: ReviewStatus::Accepted, accepted_correction: None };
        let flat = serde_json::to_value(&reviewed).unwrap();
        assert_eq!((flat["id"].as_str(), flat["status"].as_str()), (Some("fb-1"), Some("accepted")));
        assert_eq!(serde_json::from_value::<Reviewed>(flat).unwrap(), reviewed);
        let by = AnsweredBy {
            tenant: "t".into(),
            model: "m".into(),
            adapter: String::new(),
            prompt: None,
            answer: None,
            task: None,
        };
        assert_eq!(serde_json::to_string(&by).unwrap(), r#"{"tenant":"t","model":"m","adapter":""}"#);
        assert!(by.completion().is_none(), "logging was off");
    }
}
