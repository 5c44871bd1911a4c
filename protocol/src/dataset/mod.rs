//! Dataset files as the gateway accepts them (`POST /admin/finetune/datasets`) and the sidecar
//! trains on them: the layouts LLaMA-Factory and OpenAI users have, read into normalised
//! [`Example`]s ([`formats`]), and curated into a train/validation split with a written report
//! ([`curate()`]: the sidecar before training, the gateway for a dataset's preview).
//!
//! Every record that does not become an example leaves a [`Dropped`] entry with a stable
//! reason code, so a report can say exactly what was left out and why.

pub mod curate;
pub mod formats;
mod near_dup;
mod pii;

pub use curate::{curate, scrub_pii, Curated, CurationConfig, CurationReport, FeedbackRange, TokenStats};
pub use formats::{chat, detect_format, load_file, message, parse_records, read_records, Loaded, RawRecord, Reject};
pub use pii::PiiCounts;

use serde::{Deserialize, Serialize};

/// Who speaks a chat message: in requests, logged completions, training examples and the
/// serving chat template (the runtime takes this type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The name chat templates see.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation; `content` is already normalised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
}

/// What the model should learn to produce after the prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Supervised fine-tuning: imitate this answer.
    Sft { answer: String },
    /// Preference optimisation (DPO and friends): prefer `chosen` over `rejected`.
    Preference { chosen: String, rejected: String },
    /// KTO: one answer labelled desirable or not.
    Kto { answer: String, desirable: bool },
}

impl Target {
    /// The same kind of target with every answer emptied; curation measures an answer's
    /// token count as the difference this makes, so chat-template overhead cancels out.
    pub fn emptied(&self) -> Self {
        match self {
            Self::Sft { .. } => Self::Sft { answer: String::new() },
            Self::Preference { .. } => Self::Preference { chosen: String::new(), rejected: String::new() },
            Self::Kto { desirable, .. } => Self::Kto { answer: String::new(), desirable: *desirable },
        }
    }

    fn texts_mut(&mut self) -> Vec<&mut String> {
        match self {
            Self::Sft { answer } | Self::Kto { answer, .. } => vec![answer],
            Self::Preference { chosen, rejected } => vec![chosen, rejected],
        }
    }
}

/// One normalised training example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// `line-7` or `record-7` for dataset files (1-based), the feedback id for feedback
    /// (`<id>:pref` for the preference pair made from a correction).
    pub id: String,
    /// An optional system message first, then alternating user/assistant turns ending with
    /// the user turn the target answers.
    pub prompt: Vec<Message>,
    pub target: Target,
}

impl Example {
    /// The content (not the id) in one unambiguous string: roles and texts separated by
    /// control characters that normalised text can never contain.
    pub fn canonical(&self) -> String {
        let mut out = String::new();
        for m in &self.prompt {
            out.push_str(m.role.as_str());
            out.push('\u{1f}');
            out.push_str(&m.content);
            out.push('\u{1e}');
        }
        match &self.target {
            Target::Sft { answer } => {
                out.push_str("sft\u{1f}");
                out.push_str(answer);
            }
            Target::Preference { chosen, rejected } => {
                out.push_str("preference\u{1f}");
                out.push_str(chosen);
                out.push('\u{1f}');
                out.push_str(rejected);
            }
            Target::Kto { answer, desirable } => {
                out.push_str(if *desirable { "kto+\u{1f}" } else { "kto-\u{1f}" });
                out.push_str(answer);
            }
        }
        out
    }

    /// Every text of the example: prompt contents, then answers.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        let answers: Vec<&str> = match &self.target {
            Target::Sft { answer } | Target::Kto { answer, .. } => vec![answer],
            Target::Preference { chosen, rejected } => vec![chosen, rejected],
        };
        self.prompt.iter().map(|m| m.content.as_str()).chain(answers)
    }

    /// Every text of the example (prompt contents, then answers), for in-place rewriting.
    pub fn texts_mut(&mut self) -> Vec<&mut String> {
        let mut texts: Vec<&mut String> = self.prompt.iter_mut().map(|m| &mut m.content).collect();
        texts.extend(self.target.texts_mut());
        texts
    }
}

/// The dataset layouts that LLaMA-Factory and OpenAI users already have, plus gateway feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DatasetFormat {
    /// `instruction` / `input` / `output` (+ `system`, `history`).
    #[serde(rename = "alpaca")]
    Alpaca,
    /// `conversations` with `from` / `value`.
    #[serde(rename = "sharegpt")]
    ShareGpt,
    /// OpenAI `messages` with `role` / `content`.
    #[serde(rename = "messages")]
    OpenAiMessages,
    /// `chosen` / `rejected` preference pairs.
    #[serde(rename = "preference")]
    Preference,
    /// An SFT-shaped record plus a boolean `kto_tag`.
    #[serde(rename = "kto")]
    Kto,
    /// Reviewed feedback joined with the logged completions.
    #[serde(rename = "feedback")]
    Feedback,
}

impl DatasetFormat {
    /// The stable name used in reports and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alpaca => "alpaca",
            Self::ShareGpt => "sharegpt",
            Self::OpenAiMessages => "messages",
            Self::Preference => "preference",
            Self::Kto => "kto",
            Self::Feedback => "feedback",
        }
    }
}

impl std::fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a record or example was left out; [`DropReason::code`] is stable for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// A field is missing, has the wrong type, or names an unsupported role.
    Schema,
    /// The record has another shape than the dataset's (decided by its first record).
    FormatMismatch,
    /// The prompt or an answer is empty after normalisation.
    Empty,
    /// Turns do not alternate user/assistant, or the conversation ends on the wrong side.
    BadRoles,
    /// A preference pair whose two answers are the same.
    NoSignal,
    Duplicate,
    NearDuplicate,
    /// Prompt plus answer exceed `cutoff_len` tokens.
    TooLong,
    /// The answer has fewer than `min_answer_tokens` tokens.
    TooShort,
    /// The answer is far longer than the dataset's typical answer.
    Outlier,
    /// Cut by `max_samples`.
    OverMaxSamples,
    /// Feedback an admin has not reviewed yet.
    Unreviewed,
    /// Feedback an admin rejected.
    Rejected,
    /// Accepted feedback that says nothing trainable (thumbs down without a correction).
    NothingToLearn,
    /// Feedback whose completion is not in the logs.
    NoCompletion,
    /// Feedback whose completion was logged redacted.
    Redacted,
}

impl DropReason {
    /// Stable code; never change an existing string.
    pub fn code(self) -> &'static str {
        match self {
            Self::Schema => "schema",
            Self::FormatMismatch => "format_mismatch",
            Self::Empty => "empty",
            Self::BadRoles => "bad_roles",
            Self::NoSignal => "no_signal",
            Self::Duplicate => "duplicate",
            Self::NearDuplicate => "near_duplicate",
            Self::TooLong => "too_long",
            Self::TooShort => "too_short",
            Self::Outlier => "outlier",
            Self::OverMaxSamples => "over_max_samples",
            Self::Unreviewed => "unreviewed",
            Self::Rejected => "rejected",
            Self::NothingToLearn => "nothing_to_learn",
            Self::NoCompletion => "no_completion",
            Self::Redacted => "redacted",
        }
    }
}

impl Serialize for DropReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

/// A record or example left out of the dataset, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dropped {
    pub id: String,
    pub reason: DropReason,
    /// For the person reading the report: which field, which duplicate, how long.
    pub detail: String,
}

impl Dropped {
    pub fn new(id: impl Into<String>, reason: DropReason, detail: impl Into<String>) -> Self {
        Self { id: id.into(), reason, detail: detail.into() }
    }
}

/// Normalises one text the same way for every source: CRLF and lone CR become LF, control
/// characters other than newline and tab (and byte-order marks) are removed, runs of more
/// than two blank lines shrink to two, and the ends are trimmed.
pub fn normalize_text(text: &str) -> String {
    let unified = text.replace("\r\n", "\n").replace('\r', "\n");
    let cleaned: String =
        unified.chars().filter(|&c| c == '\n' || c == '\t' || !(c.is_control() || c == '\u{feff}')).collect();
    let mut out = String::with_capacity(cleaned.len());
    let mut blank_run = 0;
    for (i, line) in cleaned.split('\n').enumerate() {
        let blank = line.trim().is_empty();
        if blank {
            blank_run += 1;
            if blank_run > 2 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        if i > 0 {
            out.push('\n');
        }
        if !blank {
            out.push_str(line);
        }
    }
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_unifies_newlines_strips_controls_and_collapses_blank_lines() {
        assert_eq!(normalize_text("  a\r\nb\rc\u{0}\u{7}d\te  "), "a\nb\ncd\te");
        assert_eq!(normalize_text("a\n\n\n\n\n\nb"), "a\n\n\nb", "at most two blank lines remain");
        assert_eq!(normalize_text("a\n\n\nb"), "a\n\n\nb", "two blank lines are kept");
        assert_eq!(normalize_text("a\n  \n \t\n\n b"), "a\n\n\n b");
        assert_eq!(normalize_text("\u{feff}\u{1b}[0m"), "[0m");
        assert_eq!(normalize_text(" \n\t "), "");
    }

    #[test]
    fn codes_and_names_are_what_reports_print() {
        assert_eq!(serde_json::to_value(DropReason::NearDuplicate).unwrap(), "near_duplicate");
        assert_eq!(
            serde_json::to_value(DatasetFormat::OpenAiMessages).unwrap(),
            DatasetFormat::OpenAiMessages.as_str()
        );
        assert_eq!(DatasetFormat::ShareGpt.to_string(), "sharegpt");
    }

    #[test]
    fn canonical_form_separates_fields_unambiguously() {
        let a = Example {
            id: "1".into(),
            prompt: vec![Message::new(Role::User, "ab")],
            target: Target::Sft { answer: "c".into() },
        };
        let b = Example {
            id: "2".into(),
            prompt: vec![Message::new(Role::User, "a")],
            target: Target::Sft { answer: "bc".into() },
        };
        assert_ne!(a.canonical(), b.canonical());
        let mut c = a.clone();
        c.id = "other".into();
        assert_eq!(a.canonical(), c.canonical(), "ids are not content");
    }
}
