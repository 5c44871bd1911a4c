//! Switchyard's fine-tuning sidecar: turns feedback logs and uploaded datasets into new LoRA
//! adapter versions.
//!
//! It will own: reading feedback (JSONL files or a Redis stream), dataset formats (alpaca,
//! sharegpt, OpenAI messages, preference pairs), curation with a written report, LoRA training
//! with candle using the `adapters` crate's LoRA layer (the same code that serves), evaluation
//! against the serving version, and registration of the result as a `candidate` version.
//!
//! It must never serve user traffic, and never move a live alias except through the registry's
//! API. Today it holds only the dataset-format detection the training jobs will build on.

use serde_json::Value;

/// The dataset layouts that LLaMA-Factory and OpenAI users already have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    /// `instruction` / `input` / `output` (+ `system`, `history`).
    Alpaca,
    /// `conversations` with `from` / `value`.
    ShareGpt,
    /// OpenAI `messages` with `role` / `content`.
    OpenAiMessages,
    /// `chosen` / `rejected` preference pairs.
    Preference,
}

/// Recognises the format of one dataset record, or `None` when it fits none.
pub fn detect_format(record: &Value) -> Option<DatasetFormat> {
    let obj = record.as_object()?;
    if obj.contains_key("chosen") && obj.contains_key("rejected") {
        Some(DatasetFormat::Preference)
    } else if obj.get("messages").is_some_and(Value::is_array) {
        Some(DatasetFormat::OpenAiMessages)
    } else if obj.get("conversations").is_some_and(Value::is_array) {
        Some(DatasetFormat::ShareGpt)
    } else if obj.contains_key("instruction") && obj.contains_key("output") {
        Some(DatasetFormat::Alpaca)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recognises_each_format_and_rejects_others() {
        assert_eq!(detect_format(&json!({"instruction": "a", "output": "b"})), Some(DatasetFormat::Alpaca));
        assert_eq!(detect_format(&json!({"conversations": []})), Some(DatasetFormat::ShareGpt));
        assert_eq!(detect_format(&json!({"messages": []})), Some(DatasetFormat::OpenAiMessages));
        assert_eq!(detect_format(&json!({"chosen": "a", "rejected": "b"})), Some(DatasetFormat::Preference));
        assert_eq!(detect_format(&json!({"text": "x"})), None);
        assert_eq!(detect_format(&json!([1, 2])), None);
    }
}
