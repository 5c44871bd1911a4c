//! The one envelope of every entry on the `switchyard:feedback` stream (and of the lines of the
//! gateway's spool and the sidecar's inbox, which hold the same entries on disk).

use serde::{Deserialize, Serialize};

use crate::records::{CompletionText, FeedbackRecord, ReviewRecord};

/// One stream entry, told apart by its `kind` tag: `{"kind": "feedback", ...the record's
/// fields}` or `{"kind": "review", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Envelope {
    /// A stored feedback record (boxed: it is several times the size of a review).
    Feedback(Box<FeedbackEntry>),
    /// An admin's review decision on one.
    Review(ReviewRecord),
}

/// A feedback record, with the answer it rates once the sidecar has looked it up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackEntry {
    #[serde(flatten)]
    pub record: FeedbackRecord,
    /// Never sent by the gateway; the sidecar adds it (from [`crate::AnsweredBy`]) before it
    /// keeps the entry in its inbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<CompletionText>,
}

impl Envelope {
    pub fn feedback(record: FeedbackRecord) -> Self {
        Self::Feedback(Box::new(FeedbackEntry { record, completion: None }))
    }

    /// The JSON that goes into the stream entry's `record` field.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an envelope always serialises")
    }

    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{ReviewStatus, Thumbs};

    fn record() -> FeedbackRecord {
        FeedbackRecord {
            id: "fb-1".into(),
            object: "feedback".into(),
            response_id: "chatcmpl-1".into(),
            created: 7,
            tenant: "t".into(),
            sub: "u".into(),
            model: "m".into(),
            adapter: "bot@2".into(),
            thumbs: Some(Thumbs::Up),
            rating: Some(5),
            correction: None,
            comment: Some("thanks".into()),
            tags: vec!["a".into()],
        }
    }

    #[test]
    fn every_kind_round_trips_with_its_tag() {
        let review = ReviewRecord {
            feedback_id: "fb-1".into(),
            status: ReviewStatus::Accepted,
            correction: Some("better".into()),
            reviewer: "root".into(),
            at: 9,
        };
        let joined = Envelope::Feedback(Box::new(FeedbackEntry {
            record: record(),
            completion: Some(CompletionText {
                prompt: serde_json::json!([{"role": "user", "content": "q"}]),
                answer: "a".into(),
                task: Some("classify".into()),
            }),
        }));
        for (envelope, kind) in
            [(Envelope::feedback(record()), "feedback"), (joined, "feedback"), (Envelope::Review(review), "review")]
        {
            let json = envelope.to_json();
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(value["kind"], kind, "{json}");
            assert_eq!(Envelope::from_json(&json).unwrap(), envelope, "{json}");
        }
    }

    #[test]
    fn a_feedback_entry_keeps_the_record_fields_at_the_top_level() {
        let json = Envelope::feedback(record()).to_json();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!((value["response_id"].as_str(), value["object"].as_str()), (Some("chatcmpl-1"), Some("feedback")));
        assert!(value.get("completion").is_none(), "the gateway never sends one");
    }

    #[test]
    fn entries_without_a_known_kind_are_refused_not_guessed() {
        let untagged = serde_json::to_string(&record()).unwrap();
        assert!(Envelope::from_json(&untagged).is_err(), "no sniffing for keys");
        assert!(Envelope::from_json(r#"{"kind": "completion", "id": "x"}"#).is_err());
        assert!(Envelope::from_json(r#"{"kind": "review", "feedback_id": "fb-1"}"#).is_err(), "missing fields");
    }
}
