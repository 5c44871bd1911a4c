//! Dataset files (JSON array or JSONL) in the LLaMA-Factory and OpenAI layouts, read into examples.
//!
//! Alpaca, sharegpt, OpenAI messages, preference pairs and KTO; the array/JSONL choice and the
//! layout are both decided by content, never by the file name.

use std::path::Path;

use serde_json::{Map, Value};

use super::{normalize_text, DatasetFormat, DropReason, Dropped, Example, Message, Role, Target};
use crate::error::ProtocolError;

/// One record as it appears in the file, with the id examples and drops will carry.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    /// `line-N` for JSONL, `record-N` for a JSON array (1-based).
    pub id: String,
    pub value: Value,
}

/// A dataset file read into examples.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub format: DatasetFormat,
    /// Records in the file, kept or not.
    pub records: usize,
    pub examples: Vec<Example>,
    /// Records that did not become examples.
    pub dropped: Vec<Dropped>,
}

/// Reads a dataset file. The format is decided by the first record; records of another shape
/// are dropped with a reason rather than failing the whole file.
pub fn load_file(path: &Path) -> Result<Loaded, ProtocolError> {
    let bytes = std::fs::read(path).map_err(|e| ProtocolError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        ProtocolError::Json {
            path: path.to_owned(),
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
            detail: "the file is not UTF-8 text".into(),
        }
    })?;
    parse_records(read_records(&text, path)?)
}

/// Splits file text into records: a JSON array when the first non-blank character is `[`,
/// otherwise one JSON value per non-blank line. `path` only names the file in errors.
pub fn read_records(text: &str, path: &Path) -> Result<Vec<RawRecord>, ProtocolError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let json_error = |line: usize, detail: String| ProtocolError::Json { path: path.to_owned(), line, detail };
    if text.trim_start().starts_with('[') {
        return match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, value)| RawRecord { id: format!("record-{}", i + 1), value })
                .collect()),
            Ok(_) => Err(json_error(1, "expected a JSON array of records".into())),
            Err(e) => Err(json_error(e.line().max(1), without_position(&e))),
        };
    }
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(value) => records.push(RawRecord { id: format!("line-{}", i + 1), value }),
            Err(e) => {
                let detail = if records.is_empty() && serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()) {
                    "the file holds one JSON object over several lines; a dataset is a JSON array of records or one record per line (JSONL)".into()
                } else {
                    format!("{} (column {}); expected one JSON record per line", without_position(&e), e.column())
                };
                return Err(json_error(i + 1, detail));
            }
        }
    }
    Ok(records)
}

/// Detects the format from the first record and parses every record into an example or a drop.
pub fn parse_records(records: Vec<RawRecord>) -> Result<Loaded, ProtocolError> {
    let first = records.first().ok_or(ProtocolError::EmptyDataset)?;
    let format = detect_format(&first.value).ok_or_else(|| ProtocolError::UnknownFormat {
        detail: format!("{}: {}", first.id, describe_shape(&first.value)),
    })?;
    let mut loaded = Loaded { format, records: records.len(), examples: Vec::new(), dropped: Vec::new() };
    for RawRecord { id, value } in records {
        let parsed = match detect_format(&value) {
            Some(f) if f == format => parse_record(format, &value),
            Some(other) => Err(Reject::new(
                DropReason::FormatMismatch,
                format!("looks like {other}, but the dataset is {format} (decided by its first record)"),
            )),
            None => Err(Reject::new(DropReason::FormatMismatch, describe_shape(&value))),
        };
        match parsed {
            Ok((prompt, target)) => loaded.examples.push(Example { id, prompt, target }),
            Err(r) => loaded.dropped.push(Dropped::new(id, r.reason, r.detail)),
        }
    }
    Ok(loaded)
}

/// Recognises the format of one record by its keys, or `None` when it fits none. Field types
/// are checked later, so a record with the right keys but bad values is dropped with a reason
/// that names the field instead of being called "unknown".
pub fn detect_format(record: &Value) -> Option<DatasetFormat> {
    let obj = record.as_object()?;
    let base = sft_shape(obj);
    if obj.contains_key("kto_tag") {
        base.map(|_| DatasetFormat::Kto)
    } else if obj.contains_key("chosen") && obj.contains_key("rejected") {
        Some(DatasetFormat::Preference)
    } else {
        base
    }
}

fn sft_shape(obj: &Map<String, Value>) -> Option<DatasetFormat> {
    if obj.contains_key("messages") {
        Some(DatasetFormat::OpenAiMessages)
    } else if obj.contains_key("conversations") {
        Some(DatasetFormat::ShareGpt)
    } else if obj.contains_key("instruction") && obj.contains_key("output") {
        Some(DatasetFormat::Alpaca)
    } else {
        None
    }
}

fn describe_shape(value: &Value) -> String {
    match value.as_object() {
        Some(obj) => {
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
            if obj.len() > keys.len() {
                keys.push("...");
            }
            format!(
                "fits no known format (keys: {}); expected alpaca (instruction/output), sharegpt (conversations), messages, preference (chosen/rejected) or kto (kto_tag)",
                keys.join(", ")
            )
        }
        None => format!("a record must be a JSON object, found {}", type_name(value)),
    }
}

/// Why one record could not become an example.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub reason: DropReason,
    pub detail: String,
}

impl Reject {
    pub fn new(reason: DropReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }

    fn schema(detail: impl Into<String>) -> Self {
        Self::new(DropReason::Schema, detail)
    }
}

fn parse_record(format: DatasetFormat, value: &Value) -> Result<(Vec<Message>, Target), Reject> {
    let obj = value.as_object().ok_or_else(|| Reject::schema("a record must be a JSON object"))?;
    match format {
        DatasetFormat::Alpaca | DatasetFormat::ShareGpt | DatasetFormat::OpenAiMessages => {
            let (prompt, answer) = parse_sft(format, obj)?;
            Ok((prompt, Target::Sft { answer }))
        }
        DatasetFormat::Kto => {
            let desirable = match obj.get("kto_tag") {
                Some(Value::Bool(b)) => *b,
                other => {
                    let found = other.map_or("nothing", type_name);
                    return Err(Reject::schema(format!("field `kto_tag` must be a boolean, found {found}")));
                }
            };
            let shape = sft_shape(obj)
                .ok_or_else(|| Reject::schema("a kto record needs an alpaca, sharegpt or messages shape"))?;
            let (prompt, answer) = parse_sft(shape, obj)?;
            Ok((prompt, Target::Kto { answer, desirable }))
        }
        DatasetFormat::Preference => parse_preference(obj),
        DatasetFormat::Feedback => Err(Reject::schema("feedback is not read from dataset files")),
    }
}

fn parse_sft(shape: DatasetFormat, obj: &Map<String, Value>) -> Result<(Vec<Message>, String), Reject> {
    match shape {
        DatasetFormat::Alpaca => {
            let prompt = alpaca_prompt(obj)?;
            let answer = req_str(obj, "output")?;
            if answer.is_empty() {
                return Err(Reject::new(DropReason::Empty, "field `output` is empty"));
            }
            Ok((prompt, answer))
        }
        _ => {
            let field = if shape == DatasetFormat::ShareGpt { "conversations" } else { "messages" };
            let system = opt_str(obj, "system")?;
            let mut prompt = chat(obj.get(field).unwrap_or(&Value::Null), field, system, Role::Assistant)?;
            let answer = prompt.pop().map(|m| m.content).unwrap_or_default();
            Ok((prompt, answer))
        }
    }
}

fn parse_preference(obj: &Map<String, Value>) -> Result<(Vec<Message>, Target), Reject> {
    let system = opt_str(obj, "system")?;
    let prompt = match ["conversations", "messages"].into_iter().find(|f| obj.contains_key(*f)) {
        Some(field) => chat(&obj[field], field, system, Role::User)?,
        None => alpaca_prompt(obj)?,
    };
    let chosen = reply(obj, "chosen")?;
    let rejected = reply(obj, "rejected")?;
    if chosen == rejected {
        return Err(Reject::new(DropReason::NoSignal, "`chosen` and `rejected` are the same answer"));
    }
    Ok((prompt, Target::Preference { chosen, rejected }))
}

/// The alpaca prompt: optional system, `history` pairs, then instruction and input as one
/// user turn.
fn alpaca_prompt(obj: &Map<String, Value>) -> Result<Vec<Message>, Reject> {
    let instruction = opt_str(obj, "instruction")?.unwrap_or_default();
    let input = opt_str(obj, "input")?.unwrap_or_default();
    let user = match (instruction.is_empty(), input.is_empty()) {
        (true, true) => return Err(Reject::new(DropReason::Empty, "`instruction` and `input` are both empty")),
        (false, false) => format!("{instruction}\n{input}"),
        (false, true) => instruction,
        (true, false) => input,
    };
    let mut prompt = Vec::new();
    if let Some(system) = opt_str(obj, "system")?.filter(|s| !s.is_empty()) {
        prompt.push(Message::new(Role::System, system));
    }
    match obj.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(pairs)) => {
            for (i, pair) in pairs.iter().enumerate() {
                let texts = match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(u), Value::String(a)]) => [normalize_text(u), normalize_text(a)],
                    _ => {
                        return Err(Reject::schema(format!(
                            "`history[{i}]` must be a [user, assistant] pair of strings"
                        )))
                    }
                };
                if texts.iter().any(String::is_empty) {
                    return Err(Reject::new(DropReason::Empty, format!("`history[{i}]` has an empty turn")));
                }
                let [u, a] = texts;
                prompt.push(Message::new(Role::User, u));
                prompt.push(Message::new(Role::Assistant, a));
            }
        }
        Some(other) => {
            return Err(Reject::schema(format!("field `history` must be an array, found {}", type_name(other))))
        }
    }
    prompt.push(Message::new(Role::User, user));
    Ok(prompt)
}

/// A chosen/rejected answer: a string, or an assistant message object.
fn reply(obj: &Map<String, Value>, field: &str) -> Result<String, Reject> {
    let text = match obj.get(field) {
        Some(Value::String(s)) => normalize_text(s),
        Some(v @ Value::Object(_)) => {
            let m = message(v, field)?;
            if m.role != Role::Assistant {
                return Err(Reject::new(DropReason::BadRoles, format!("`{field}` must be an assistant message")));
            }
            m.content
        }
        Some(other) => {
            return Err(Reject::schema(format!(
                "field `{field}` must be a string or a message, found {}",
                type_name(other)
            )))
        }
        None => return Err(Reject::schema(format!("missing field `{field}`"))),
    };
    if text.is_empty() {
        return Err(Reject::new(DropReason::Empty, format!("`{field}` is empty")));
    }
    Ok(text)
}

/// Parses a list of chat turns into a prompt: the system text (top-level `system` and any
/// leading system turns) first, then turns alternating user/assistant from a user turn to
/// one spoken by `last`.
pub fn chat(turns: &Value, field: &str, system: Option<String>, last: Role) -> Result<Vec<Message>, Reject> {
    let items = match turns {
        Value::Array(items) => items,
        Value::Null => return Err(Reject::schema(format!("missing field `{field}`"))),
        other => return Err(Reject::schema(format!("field `{field}` must be an array, found {}", type_name(other)))),
    };
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let m = message(item, &format!("{field}[{i}]"))?;
        if m.content.is_empty() {
            return Err(Reject::new(DropReason::Empty, format!("`{field}[{i}]` has empty content")));
        }
        messages.push(m);
    }
    let leading = messages.iter().take_while(|m| m.role == Role::System).count();
    let mut system_parts: Vec<String> = system.into_iter().filter(|s| !s.is_empty()).collect();
    system_parts.extend(messages.drain(..leading).map(|m| m.content));
    if messages.is_empty() {
        return Err(Reject::new(DropReason::Empty, format!("`{field}` has no user or assistant turns")));
    }
    for (i, m) in messages.iter().enumerate() {
        let expected = if i % 2 == 0 { Role::User } else { Role::Assistant };
        if m.role != expected {
            let at = i + leading;
            let detail = match m.role {
                Role::System => format!("`{field}[{at}]`: a system message may only come first"),
                _ => format!(
                    "`{field}[{at}]` is {} but {} was expected; turns must alternate",
                    m.role.as_str(),
                    expected.as_str()
                ),
            };
            return Err(Reject::new(DropReason::BadRoles, detail));
        }
    }
    if messages.last().map(|m| m.role) != Some(last) {
        let detail = match last {
            Role::Assistant => format!("the last turn of `{field}` must be the assistant's answer"),
            _ => format!("the last turn of `{field}` must be the user's (the answers are `chosen`/`rejected`)"),
        };
        return Err(Reject::new(DropReason::BadRoles, detail));
    }
    let mut prompt = Vec::with_capacity(messages.len() + 1);
    if !system_parts.is_empty() {
        prompt.push(Message::new(Role::System, system_parts.join("\n\n")));
    }
    prompt.extend(messages);
    Ok(prompt)
}

/// One `{from, value}` or `{role, content}` message; OpenAI content-part arrays count when
/// every part is text.
pub fn message(value: &Value, at: &str) -> Result<Message, Reject> {
    let obj = value
        .as_object()
        .ok_or_else(|| Reject::schema(format!("`{at}` must be a message object, found {}", type_name(value))))?;
    let (role_key, content_key) = if obj.contains_key("from") { ("from", "value") } else { ("role", "content") };
    let role = match obj.get(role_key) {
        Some(Value::String(r)) => match r.to_ascii_lowercase().as_str() {
            "human" | "user" => Role::User,
            "gpt" | "assistant" => Role::Assistant,
            "system" => Role::System,
            other => return Err(Reject::schema(format!("`{at}.{role_key}` is the unsupported role `{other}`"))),
        },
        Some(other) => {
            return Err(Reject::schema(format!("`{at}.{role_key}` must be a string, found {}", type_name(other))))
        }
        None => return Err(Reject::schema(format!("`{at}` has no `from` or `role`"))),
    };
    let content = match obj.get(content_key) {
        Some(Value::String(s)) => normalize_text(s),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    _ => return Err(Reject::schema(format!("`{at}.{content_key}[{i}]` is not a text part"))),
                }
            }
            normalize_text(&texts.join("\n"))
        }
        Some(other) => {
            return Err(Reject::schema(format!("`{at}.{content_key}` must be a string, found {}", type_name(other))))
        }
        None => return Err(Reject::schema(format!("`{at}` has no `{content_key}`"))),
    };
    Ok(Message { role, content })
}

/// A string field, normalised; absent and `null` are `None`.
fn opt_str(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, Reject> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(normalize_text(s))),
        Some(other) => Err(Reject::schema(format!("field `{field}` must be a string, found {}", type_name(other)))),
    }
}

fn req_str(obj: &Map<String, Value>, field: &str) -> Result<String, Reject> {
    opt_str(obj, field)?.ok_or_else(|| Reject::schema(format!("missing field `{field}`")))
}

pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_json's message without its "at line L column C" tail, which the error reports itself.
fn without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Result<Loaded, ProtocolError> {
        parse_records(read_records(text, Path::new("data.jsonl"))?)
    }

    fn jsonl(values: &[Value]) -> String {
        values.iter().map(|v| v.to_string() + "\n").collect()
    }

    fn sft(ex: &Example) -> &str {
        match &ex.target {
            Target::Sft { answer } => answer,
            other => panic!("not sft: {other:?}"),
        }
    }

    #[test]
    fn alpaca_from_a_json_array_with_system_input_and_history() {
        let text = json!([
            {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be brief.",
             "history": [["hi", "hello there"]]},
            {"instruction": "Say hi\r\n", "input": "", "output": " hi "}
        ])
        .to_string();
        let loaded = parse(&text).unwrap();
        assert_eq!((loaded.format, loaded.records, loaded.dropped.len()), (DatasetFormat::Alpaca, 2, 0));
        let ex = &loaded.examples[0];
        assert_eq!(ex.id, "record-1");
        let roles: Vec<Role> = ex.prompt.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::User]);
        assert_eq!(ex.prompt[3].content, "Translate\nbonjour");
        assert_eq!(sft(ex), "hello");
        assert_eq!((loaded.examples[1].prompt[0].content.as_str(), sft(&loaded.examples[1])), ("Say hi", "hi"));
    }

    #[test]
    fn sharegpt_from_jsonl_with_role_content_keys_and_blank_lines() {
        let text = format!(
            "{}\n\n{}",
            json!({"system": "sys", "conversations": [
                {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}),
            json!({"conversations": [{"role": "system", "content": "s2"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        );
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.format, DatasetFormat::ShareGpt);
        let ex = &loaded.examples[0];
        assert_eq!((ex.id.as_str(), ex.prompt.len(), sft(ex)), ("line-1", 4, "a2"));
        assert_eq!(ex.prompt[0], Message::new(Role::System, "sys"));
        assert_eq!(ex.prompt[3], Message::new(Role::User, "q2"));
        let ex = &loaded.examples[1];
        assert_eq!(ex.id, "line-3", "ids count blank lines so they point at the file");
        assert_eq!(ex.prompt, [Message::new(Role::System, "s2"), Message::new(Role::User, "q")]);
    }

    #[test]
    fn openai_messages_with_text_parts() {
        let text = jsonl(&[json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "text", "text": "here"}]},
            {"role": "assistant", "content": "ok"}]})]);
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.format, DatasetFormat::OpenAiMessages);
        assert_eq!(loaded.examples[0].prompt, [Message::new(Role::User, "look\nhere")]);
    }

    #[test]
    fn sharegpt_that_does_not_alternate_or_ends_with_the_user_is_dropped() {
        let text = jsonl(&[
            json!({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]}),
            json!({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]}),
            json!({"conversations": [{"from": "gpt", "value": "a"}]}),
            json!({"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "c"}]}),
            json!({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}),
        ]);
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.examples.len(), 1);
        assert_eq!(loaded.examples[0].id, "line-5");
        assert!(loaded.dropped.iter().all(|d| d.reason == DropReason::BadRoles), "{:?}", loaded.dropped);
        assert!(loaded.dropped[0].detail.contains("conversations[1]"), "{}", loaded.dropped[0].detail);
        assert!(loaded.dropped[3].detail.contains("system"), "{}", loaded.dropped[3].detail);
    }

    #[test]
    fn preference_in_alpaca_and_conversation_styles() {
        let text = jsonl(&[
            json!({"instruction": "q", "chosen": "good", "rejected": "bad"}),
            json!({"conversations": [{"from": "human", "value": "q"}],
                   "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}),
            json!({"messages": [{"role": "user", "content": "q"}],
                   "chosen": {"role": "assistant", "content": "same"}, "rejected": "same"}),
            json!({"instruction": "q", "chosen": {"from": "human", "value": "x"}, "rejected": "bad"}),
        ]);
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.format, DatasetFormat::Preference);
        assert_eq!(loaded.examples.len(), 2);
        for ex in &loaded.examples {
            assert_eq!(ex.prompt, [Message::new(Role::User, "q")]);
            assert_eq!(ex.target, Target::Preference { chosen: "good".into(), rejected: "bad".into() });
        }
        let reasons: Vec<DropReason> = loaded.dropped.iter().map(|d| d.reason).collect();
        assert_eq!(reasons, [DropReason::NoSignal, DropReason::BadRoles]);
    }

    #[test]
    fn kto_records_carry_their_tag() {
        let text = jsonl(&[
            json!({"instruction": "q", "output": "a", "kto_tag": true}),
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "kto_tag": false}),
            json!({"instruction": "q", "output": "a", "kto_tag": "yes"}),
        ]);
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.format, DatasetFormat::Kto);
        assert_eq!(loaded.examples[0].target, Target::Kto { answer: "a".into(), desirable: true });
        assert_eq!(loaded.examples[1].target, Target::Kto { answer: "b".into(), desirable: false });
        assert_eq!(loaded.dropped[0].reason, DropReason::Schema);
        assert!(loaded.dropped[0].detail.contains("kto_tag"));
    }

    #[test]
    fn mixed_shapes_bad_types_and_empty_texts_are_dropped_with_reasons() {
        let text = jsonl(&[
            json!({"instruction": "q", "output": "a"}),
            json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
            json!({"text": "free text"}),
            json!(42),
            json!({"instruction": "q", "output": 7}),
            json!({"instruction": ["q"], "output": "a"}),
            json!({"instruction": "q", "output": " \n\u{0} "}),
            json!({"instruction": "", "input": null, "output": "a"}),
            json!({"instruction": "q", "output": "a", "history": [["only one"]]}),
        ]);
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.examples.len(), 1);
        let got: Vec<(&str, &str)> = loaded.dropped.iter().map(|d| (d.id.as_str(), d.reason.code())).collect();
        assert_eq!(
            got,
            [
                ("line-2", "format_mismatch"),
                ("line-3", "format_mismatch"),
                ("line-4", "format_mismatch"),
                ("line-5", "schema"),
                ("line-6", "schema"),
                ("line-7", "empty"),
                ("line-8", "empty"),
                ("line-9", "schema"),
            ]
        );
        assert!(loaded.dropped[0].detail.contains("sharegpt"), "{}", loaded.dropped[0].detail);
        assert!(loaded.dropped[3].detail.contains("`output`"), "{}", loaded.dropped[3].detail);
        assert!(loaded.dropped[4].detail.contains("`instruction`"), "{}", loaded.dropped[4].detail);
    }

    #[test]
    fn empty_unknown_and_garbage_files_are_errors() {
        assert!(matches!(parse(""), Err(ProtocolError::EmptyDataset)));
        assert!(matches!(parse("\n  \n"), Err(ProtocolError::EmptyDataset)));
        assert!(matches!(parse("[]"), Err(ProtocolError::EmptyDataset)));
        match parse("{\"text\": \"x\"}\n") {
            Err(ProtocolError::UnknownFormat { detail }) => {
                assert!(detail.contains("line-1") && detail.contains("text"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        let garbage = format!(
            "{}\n{}\nthis is not json\n",
            json!({"instruction": "q", "output": "a"}),
            json!({"instruction": "q", "output": "b"})
        );
        match parse(&garbage) {
            Err(ProtocolError::Json { line, path, .. }) => assert_eq!((line, path.to_str()), (3, Some("data.jsonl"))),
            other => panic!("{other:?}"),
        }
        match parse("[\n{\"instruction\": \"q\", \"output\": \"a\"},\n{oops}\n]") {
            Err(ProtocolError::Json { line, .. }) => assert_eq!(line, 3),
            other => panic!("{other:?}"),
        }
        match parse("{\n  \"instruction\": \"q\",\n  \"output\": \"a\"\n}\n") {
            Err(ProtocolError::Json { line, detail, .. }) => {
                assert!(line == 1 && detail.contains("several lines"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn load_file_decides_by_content_and_rejects_non_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.json");
        std::fs::write(
            &path,
            jsonl(&[json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})]),
        )
        .unwrap();
        let loaded = load_file(&path).unwrap();
        assert_eq!((loaded.format, loaded.examples[0].id.as_str()), (DatasetFormat::OpenAiMessages, "line-1"));
        std::fs::write(&path, b"{\"instruction\": \"q\", \"output\": \"a\"}\n{\"instruction\": \"\xff\"}\n").unwrap();
        assert!(matches!(load_file(&path), Err(ProtocolError::Json { line: 2, .. })));
        assert!(matches!(load_file(&dir.path().join("missing.jsonl")), Err(ProtocolError::Io { .. })));
    }
}
