//! Parse, don't validate: OpenAI wire requests become `GenerationRequest`s (and embedding
//! requests `ValidatedEmbeddings`) once, here.

use serde_json::{Map, Value};

use serde_json::json;

use crate::answer::{AnswerShape, LogprobFormat, ToolMode};
use crate::engine::grammar::{Grammar, GrammarSpec};
use crate::engine::{GenerationRequest, Message, NativeTools, Prompt, Role, Sampling};
use crate::error::ApiError;
use crate::openai::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingInput, EmbeddingRequest, EncodingFormat,
    MessageContent, SamplingFields, StopParam, MAX_EMBEDDING_INPUTS,
};

/// Most choices one request may ask for.
pub const MAX_N: i64 = 16;
/// Most alternatives chat's `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// Most alternatives completions' `logprobs` may ask for (OpenAI's limit).
pub const MAX_TEXT_LOGPROBS: i64 = 5;

/// OpenAI allows at most this many stop sequences.
const MAX_STOPS: usize = 4;

/// A validated request plus the response options that do not reach the engine.
#[derive(Debug, Clone)]
pub struct Validated {
    pub model: String,
    pub generation: GenerationRequest,
    pub stream: bool,
    pub include_usage: bool,
    /// `n`, log-probabilities, `echo` and tool calls: how the answer is shaped.
    pub shape: AnswerShape,
}

/// What a request asks of decoding beyond sampling: a grammar, log-probabilities, `n`.
#[derive(Debug, Default)]
struct Decoding {
    grammar: Option<Grammar>,
    logprobs: Option<usize>,
    prompt_logprobs: bool,
    shape: AnswerShape,
    native: Option<NativeTools>,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionDef {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

/// Limits from configuration that every request is held to.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_tokens: usize,
    pub max_messages: usize,
}

pub fn chat(req: ChatCompletionRequest, limits: RequestLimits) -> Result<Validated, ApiError> {
    check_extra(&req.extra, false)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must contain at least one message", Some("messages".into())));
    }
    if req.messages.len() > limits.max_messages {
        return Err(ApiError::invalid(
            format!("messages has {} entries, more than the limit of {}", req.messages.len(), limits.max_messages),
            Some("messages".into()),
        ));
    }
    let tools = tools(req.tools.as_ref())?;
    let mode = tool_choice(req.tool_choice.as_ref(), &tools)?;
    let wire_messages = mode.as_ref().map(|_| req.messages.clone());
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        messages.push(message(i, m)?);
    }
    let mut decoding = Decoding::default();
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    if let (Some(mode), Some(wire)) = (&mode, wire_messages) {
        decoding.native = Some(native_tools(wire, &tools));
        with_tool_prompt(&mut messages, &tools);
        decoding.grammar = match mode {
            ToolMode::Named(name) => tools
                .iter()
                .find(|t| &t.name == name)
                .map(|t| Grammar { spec: GrammarSpec::JsonSchema(t.parameters.clone()), param: "tools".into() }),
            ToolMode::Required => {
                Some(Grammar { spec: GrammarSpec::JsonSchema(calls_schema(&tools, parallel)), param: "tools".into() })
            }
            ToolMode::Auto { .. } => None,
        };
        decoding.shape.tools = Some(mode.clone());
    }
    if let Some(grammar) = response_format(req.response_format.as_ref())? {
        if decoding.grammar.is_some() {
            return Err(ApiError::invalid(
                "response_format cannot be combined with a tool_choice that forces a call",
                Some("response_format".into()),
            ));
        }
        decoding.grammar = Some(grammar);
    }
    match (req.logprobs, req.top_logprobs) {
        (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
            return Err(ApiError::invalid(
                format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                Some("top_logprobs".into()),
            ))
        }
        (Some(true), k) => {
            decoding.logprobs = Some(k.unwrap_or(0) as usize);
            decoding.shape.logprobs = LogprobFormat::Chat;
        }
        (_, Some(_)) => {
            return Err(ApiError::invalid("top_logprobs requires logprobs to be true", Some("top_logprobs".into())))
        }
        _ => {}
    }
    let max_tokens = match (req.max_completion_tokens, req.sampling.max_tokens) {
        (Some(m), _) => Some(("max_completion_tokens", m)),
        (None, Some(m)) => Some(("max_tokens", m)),
        (None, None) => None,
    };
    finish(req.model, Prompt::Chat(messages), max_tokens, req.sampling, decoding, limits)
}

/// One wire message as the model reads it. Tool calls and tool results become text in the
/// documented `<tool_call>` / `<tool_response>` format.
fn message(i: usize, m: ChatMessage) -> Result<Message, ApiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => Role::System,
        "user" | "tool" => Role::User,
        "assistant" => Role::Assistant,
        "function" => {
            return Err(ApiError::unsupported(
                &format!("messages[{i}].role"),
                "role 'function' is deprecated and not supported; answer a tool call with role 'tool'",
            ))
        }
        other => {
            return Err(ApiError::invalid(
                format!("messages[{i}].role '{other}' is not one of system, developer, user, assistant, tool"),
                Some(format!("messages[{i}].role")),
            ))
        }
    };
    let text = match m.content {
        Some(MessageContent::Text(t)) => Some(t),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    _ => {
                        return Err(ApiError::unsupported(
                            &format!("messages[{i}].content[{j}]"),
                            format!("content part type '{}' is not supported; only text parts are", p.kind),
                        ))
                    }
                }
            }
            Some(text)
        }
        None => None,
    };
    let calls = m.tool_calls.unwrap_or_default();
    if !calls.is_empty() && m.role != "assistant" {
        return Err(ApiError::invalid(
            format!("messages[{i}].tool_calls is only allowed on assistant messages"),
            Some(format!("messages[{i}].tool_calls")),
        ));
    }
    let content = match (m.role.as_str(), text) {
        ("tool", text) => {
            if m.tool_call_id.as_deref().is_none_or(str::is_empty) {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_call_id is required on a tool message"),
                    Some(format!("messages[{i}].tool_call_id")),
                ));
            }
            format!("<tool_response>\n{}\n</tool_response>", text.unwrap_or_default())
        }
        ("assistant", text) if !calls.is_empty() => {
            let mut out = text.unwrap_or_default();
            for (j, c) in calls.iter().enumerate() {
                let arguments: Value = serde_json::from_str(&c.function.arguments).map_err(|e| {
                    ApiError::invalid(
                        format!("messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}"),
                        Some(format!("messages[{i}].tool_calls[{j}].function.arguments")),
                    )
                })?;
                if !out.is_empty() {
                    out.push('\n');
                }
                let call = json!({"name": c.function.name, "arguments": arguments});
                out.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
            }
            out
        }
        (_, Some(t)) => t,
        (_, None) => {
            return Err(ApiError::invalid(
                format!("messages[{i}].content is required"),
                Some(format!("messages[{i}].content")),
            ))
        }
    };
    Ok(Message { role, content })
}

/// `tools`: function definitions with names OpenAI accepts and JSON-schema parameters.
fn tools(value: Option<&Value>) -> Result<Vec<FunctionDef>, ApiError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("tools must be a list of function tools", Some("tools".into()))),
    };
    let bad = |at: String, why: &str| ApiError::invalid(format!("{at} {why}"), Some(at));
    let mut out: Vec<FunctionDef> = Vec::with_capacity(items.len());
    for (i, t) in items.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(format!("tools[{i}].type"), "must be 'function' (the only tool type served)"));
        }
        let Some(f) = t.get("function").and_then(Value::as_object) else {
            return Err(bad(format!("tools[{i}].function"), "must be an object with a name"));
        };
        let name = match f.get("name").and_then(Value::as_str) {
            Some(n) if valid_function_name(n) => n.to_owned(),
            _ => {
                return Err(bad(
                    format!("tools[{i}].function.name"),
                    "must be 1 to 64 letters, digits, underscores or dashes",
                ))
            }
        };
        if out.iter().any(|d| d.name == name) {
            return Err(bad(format!("tools[{i}].function.name"), "repeats the name of an earlier tool"));
        }
        let description = match f.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(_) => return Err(bad(format!("tools[{i}].function.description"), "must be a string")),
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(bad(format!("tools[{i}].function.parameters"), "must be a JSON schema object")),
        };
        out.push(FunctionDef { name, description, parameters });
    }
    Ok(out)
}

fn valid_function_name(n: &str) -> bool {
    (1..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `tool_choice` against the tools given; `None` when no tool may be called.
fn tool_choice(value: Option<&Value>, tools: &[FunctionDef]) -> Result<Option<ToolMode>, ApiError> {
    let param = || Some("tool_choice".to_owned());
    let mode = match value {
        None | Some(Value::Null) if tools.is_empty() => return Ok(None),
        None | Some(Value::Null) => ToolMode::Auto { names: tools.iter().map(|t| t.name.clone()).collect() },
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "auto" => {
            ToolMode::Auto { names: tools.iter().map(|t| t.name.clone()).collect() }
        }
        Some(Value::String(s)) if s == "required" => ToolMode::Required,
        Some(v @ Value::Object(_)) => {
            let name = v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (v.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => {
                    if !tools.iter().any(|t| t.name == name) {
                        return Err(ApiError::invalid(
                            format!("tool_choice names function '{name}', which is not in tools"),
                            param(),
                        ));
                    }
                    ToolMode::Named(name.to_owned())
                }
                _ => return Err(ApiError::invalid(
                    "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}",
                    param(),
                )),
            }
        }
        Some(_) => {
            return Err(ApiError::invalid("tool_choice must be none, auto, required or a named function", param()))
        }
    };
    if tools.is_empty() {
        return Err(ApiError::invalid("tool_choice is only allowed when tools are given", param()));
    }
    Ok(Some(mode))
}

/// The conversation as a template with its own tool format reads it (Hugging Face's
/// convention: OpenAI's messages with each call's `arguments` as an object) and the tools.
fn native_tools(wire: Vec<ChatMessage>, tools: &[FunctionDef]) -> NativeTools {
    let messages = wire
        .into_iter()
        .map(|m| {
            let content = match m.content {
                Some(MessageContent::Text(t)) => Value::String(t),
                Some(MessageContent::Parts(parts)) => {
                    Value::String(parts.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join(""))
                }
                None => Value::Null,
            };
            let role = if m.role == "developer" { "system".to_owned() } else { m.role };
            let mut out = json!({"role": role, "content": content});
            if let Some(calls) = m.tool_calls.filter(|c| !c.is_empty()) {
                out["tool_calls"] = calls
                    .into_iter()
                    .map(|c| {
                        let arguments =
                            serde_json::from_str(&c.function.arguments).unwrap_or(Value::String(c.function.arguments));
                        json!({"id": c.id, "type": "function",
                               "function": {"name": c.function.name, "arguments": arguments}})
                    })
                    .collect();
            }
            if let Some(id) = m.tool_call_id {
                out["tool_call_id"] = json!(id);
            }
            if let Some(name) = m.name {
                out["name"] = json!(name);
            }
            out
        })
        .collect();
    let schemas = tools
        .iter()
        .enumerate()
        .map(|(i, t)| Grammar {
            spec: GrammarSpec::JsonSchema(t.parameters.clone()),
            param: format!("tools[{i}].function.parameters"),
        })
        .collect();
    let tools = tools
        .iter()
        .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
        .collect();
    NativeTools { messages, tools, schemas }
}

/// The schema of a forced call: `{"name", "arguments"}` of one of the tools, in a list of
/// at least one when parallel calls are allowed.
fn calls_schema(tools: &[FunctionDef], parallel: bool) -> Value {
    let one: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let call = if one.len() == 1 { one[0].clone() } else { json!({"anyOf": one}) };
    if parallel {
        json!({"type": "array", "items": call, "minItems": 1})
    } else {
        call
    }
}

/// The tool definitions and the call format, in the system message (the served chat
/// template has no tool section of its own).
fn with_tool_prompt(messages: &mut Vec<Message>, tools: &[FunctionDef]) {
    let mut text = String::from("You can call functions. Their definitions, one JSON object per line:\n<tools>\n");
    for t in tools {
        let def = json!({"name": t.name, "description": t.description, "parameters": t.parameters});
        text.push_str(&def.to_string());
        text.push('\n');
    }
    text.push_str(
        "</tools>\nTo call a function, reply with only this, once per call:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>",
    );
    match messages.first_mut() {
        Some(m) if m.role == Role::System => {
            m.content = format!("{}\n\n{text}", m.content);
        }
        _ => messages.insert(0, Message { role: Role::System, content: text }),
    }
}

/// `response_format`: text (no grammar), `json_object`, or `json_schema`.
fn response_format(value: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(v) = value.filter(|v| !v.is_null()) else { return Ok(None) };
    let bad = |at: &str, why: String| ApiError::invalid(why, Some(at.to_owned()));
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar {
            spec: GrammarSpec::JsonSchema(json!({"type": "object"})),
            param: "response_format".into(),
        })),
        Some("json_schema") => {
            let Some(js) = v.get("json_schema").and_then(Value::as_object) else {
                return Err(bad(
                    "response_format.json_schema",
                    "response_format.json_schema must be an object with a name and a schema".into(),
                ));
            };
            match js.get("name").and_then(Value::as_str) {
                Some(n) if valid_function_name(n) => {}
                _ => {
                    return Err(bad(
                        "response_format.json_schema.name",
                        "response_format.json_schema.name must be 1 to 64 letters, digits, underscores or dashes"
                            .into(),
                    ))
                }
            }
            if js.get("strict").is_some_and(|s| !s.is_boolean() && !s.is_null()) {
                return Err(bad(
                    "response_format.json_schema.strict",
                    "response_format.json_schema.strict must be a boolean".into(),
                ));
            }
            let schema = match js.get("schema") {
                None | Some(Value::Null) => json!({}),
                Some(s @ Value::Object(_)) => s.clone(),
                Some(_) => {
                    return Err(bad(
                        "response_format.json_schema.schema",
                        "response_format.json_schema.schema must be a JSON schema object".into(),
                    ))
                }
            };
            Ok(Some(Grammar {
                spec: GrammarSpec::JsonSchema(schema),
                param: "response_format.json_schema.schema".into(),
            }))
        }
        _ => Err(bad("response_format.type", "response_format.type must be text, json_object or json_schema".into())),
    }
}

/// vLLM's `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`; at most one.
fn guided(s: &SamplingFields) -> Result<Option<Grammar>, ApiError> {
    let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    let named: Vec<&str> = [
        ("guided_json", &s.guided_json),
        ("guided_regex", &s.guided_regex),
        ("guided_choice", &s.guided_choice),
        ("guided_grammar", &s.guided_grammar),
    ]
    .into_iter()
    .filter(|(_, v)| given(v))
    .map(|(n, _)| n)
    .collect();
    if named.len() > 1 {
        return Err(ApiError::invalid(
            format!(
                "only one of guided_json, guided_regex, guided_choice, guided_grammar may be given, not {}",
                named.join(" and ")
            ),
            Some(named[1].to_owned()),
        ));
    }
    let Some(&param) = named.first() else { return Ok(None) };
    let bad = |why: &str| ApiError::invalid(format!("{param} {why}"), Some(param.to_owned()));
    let spec = match param {
        "guided_json" => match s.guided_json.as_ref() {
            Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                Ok(v @ Value::Object(_)) => GrammarSpec::JsonSchema(v),
                _ => return Err(bad("must be a JSON schema object, or a string holding one")),
            },
            Some(v @ Value::Object(_)) => GrammarSpec::JsonSchema(v.clone()),
            _ => return Err(bad("must be a JSON schema object, or a string holding one")),
        },
        "guided_regex" => match s.guided_regex.as_ref() {
            Some(Value::String(rx)) if !rx.is_empty() => GrammarSpec::Regex(rx.clone()),
            _ => return Err(bad("must be a non-empty regular expression")),
        },
        "guided_grammar" => match s.guided_grammar.as_ref() {
            Some(Value::String(g)) if !g.trim().is_empty() => GrammarSpec::Lark(g.clone()),
            _ => return Err(bad("must be a non-empty Lark grammar")),
        },
        _ => match s.guided_choice.as_ref() {
            Some(Value::Array(items)) if !items.is_empty() => {
                let mut choices = Vec::with_capacity(items.len());
                for (i, c) in items.iter().enumerate() {
                    match c.as_str() {
                        Some(c) if !c.is_empty() => choices.push(c.to_owned()),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("guided_choice[{i}] must be a non-empty string"),
                                Some(format!("guided_choice[{i}]")),
                            ))
                        }
                    }
                }
                GrammarSpec::Choice(choices)
            }
            _ => return Err(bad("must be a non-empty list of strings")),
        },
    };
    Ok(Some(Grammar { spec, param: param.to_owned() }))
}

pub fn completion(req: CompletionRequest, limits: RequestLimits) -> Result<Validated, ApiError> {
    check_extra(&req.extra, true)?;
    let prompt = match req.prompt {
        Value::String(s) => s,
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_owned()
        }
        Value::Array(_) => {
            return Err(ApiError::unsupported(
                "prompt",
                "prompt must be one string; batches of prompts and token arrays are not supported",
            ))
        }
        _ => return Err(ApiError::invalid("prompt must be a string", Some("prompt".into()))),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt must not be empty", Some("prompt".into())));
    }
    let max_tokens = req.sampling.max_tokens.map(|m| ("max_tokens", m));
    let mut decoding = Decoding::default();
    match req.logprobs {
        Some(k) if !(0..=MAX_TEXT_LOGPROBS).contains(&k) => {
            return Err(ApiError::invalid(
                format!("logprobs must be between 0 and {MAX_TEXT_LOGPROBS}, got {k}"),
                Some("logprobs".into()),
            ))
        }
        Some(k) => {
            decoding.logprobs = Some(k as usize);
            decoding.shape.logprobs = LogprobFormat::Text;
        }
        None => {}
    }
    if req.echo == Some(true) {
        decoding.prompt_logprobs = decoding.logprobs.is_some();
        decoding.shape.echo = Some(prompt.clone());
    }
    finish(req.model, Prompt::Text(prompt), max_tokens, req.sampling, decoding, limits)
}

fn finish(
    model: String,
    prompt: Prompt,
    max_tokens: Option<(&str, i64)>,
    s: SamplingFields,
    mut decoding: Decoding,
    limits: RequestLimits,
) -> Result<Validated, ApiError> {
    if model.trim().is_empty() {
        return Err(ApiError::invalid("model must not be empty", Some("model".into())));
    }
    let max_tokens = match max_tokens {
        None => None,
        Some((name, m)) if m < 1 => {
            return Err(ApiError::invalid(format!("{name} must be at least 1, got {m}"), Some(name.into())))
        }
        Some((name, m)) if m as u64 > limits.max_tokens as u64 => {
            return Err(ApiError::invalid(
                format!("{name} is {m}, more than this server's limit of {}", limits.max_tokens),
                Some(name.into()),
            ))
        }
        Some((_, m)) => Some(m as usize),
    };
    if let Some(n) = s.n {
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid(format!("n must be between 1 and {MAX_N}, got {n}"), Some("n".into())));
        }
        decoding.shape.n = n as usize;
    }
    if let Some(grammar) = guided(&s)? {
        if decoding.grammar.is_some() {
            return Err(ApiError::invalid(
                format!("{} cannot be combined with response_format or a forced tool call", grammar.param),
                Some(grammar.param),
            ));
        }
        decoding.grammar = Some(grammar);
    }
    if decoding.grammar.is_some() && s.ignore_eos == Some(true) {
        return Err(ApiError::invalid(
            "ignore_eos cannot be combined with structured output: the grammar decides where the answer ends",
            Some("ignore_eos".into()),
        ));
    }
    let temperature = in_range("temperature", s.temperature, 0.0, 2.0)?;
    let top_p = in_range("top_p", s.top_p, 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(ApiError::invalid("top_p must be greater than 0", Some("top_p".into())));
    }
    let frequency_penalty = in_range("frequency_penalty", s.frequency_penalty, -2.0, 2.0)?;
    let presence_penalty = in_range("presence_penalty", s.presence_penalty, -2.0, 2.0)?;
    let stop = match s.stop {
        None => Vec::new(),
        Some(StopParam::One(s)) => vec![s],
        Some(StopParam::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            format!("stop has {} sequences; at most {MAX_STOPS} are allowed", stop.len()),
            Some("stop".into()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop sequences must not be empty", Some("stop".into())));
    }
    let stream = s.stream.unwrap_or(false);
    if s.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options is only allowed when stream is true",
            Some("stream_options".into()),
        ));
    }
    Ok(Validated {
        model,
        generation: GenerationRequest {
            prompt,
            adapter: None,
            max_tokens,
            tools: decoding.native,
            sampling: Sampling {
                temperature,
                top_p,
                seed: s.seed.map(|v| v as u64),
                stop,
                frequency_penalty: frequency_penalty.map(|v| v as f32),
                presence_penalty: presence_penalty.map(|v| v as f32),
                ignore_eos: s.ignore_eos.unwrap_or(false),
                grammar: decoding.grammar,
                logprobs: decoding.logprobs,
                prompt_logprobs: decoding.prompt_logprobs,
                background: false,
            },
        },
        stream,
        include_usage: s.stream_options.is_some_and(|o| o.include_usage),
        shape: decoding.shape,
    })
}

fn in_range(name: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(ApiError::invalid(format!("{name} must be between {lo} and {hi}, got {x}"), Some(name.into())))
        }
        other => Ok(other),
    }
}

/// Rejects fields we do not know, and fields we know but do not serve when they would change
/// the answer. Fields that never change the answer are accepted and ignored.
fn check_extra(extra: &Map<String, Value>, legacy: bool) -> Result<(), ApiError> {
    check_fields(extra, |key, value| {
        Some(match key {
            "store" | "metadata" | "service_tier" => true,
            "logit_bias" => value.is_null() || value.as_object().is_some_and(Map::is_empty),
            "functions" => value.is_null() || value.as_array().is_some_and(Vec::is_empty),
            "function_call" => value.is_null() || value == "none",
            "best_of" if legacy => value.is_null() || value == 1,
            "suffix" if legacy => value.is_null(),
            "audio" | "modalities" | "prediction" | "reasoning_effort" | "web_search_options" => false,
            _ => return None,
        })
    })
}

/// Checks the fields a wire type did not name: `known(key, value)` is `Some(true)` for a field
/// accepted and ignored (it never changes the answer), `Some(false)` for one known but not
/// served with this value, and `None` for one this server does not know (OpenAI's
/// "Unrecognized request argument").
pub(crate) fn check_fields(
    extra: &Map<String, Value>,
    known: impl Fn(&str, &Value) -> Option<bool>,
) -> Result<(), ApiError> {
    for (key, value) in extra {
        match known(key, value) {
            None => return Err(ApiError::unknown_parameter(key)),
            Some(false) => {
                return Err(ApiError::unsupported(key, format!("parameter '{key}' with this value is not supported")))
            }
            Some(true) => {}
        }
    }
    Ok(())
}

/// What an embedding model accepts; from the loaded model.
#[derive(Debug, Clone, Copy)]
pub struct EmbedLimits {
    /// The model's fixed width.
    pub dimension: usize,
    /// Token ids are below this.
    pub vocab_size: usize,
}

/// A validated `POST /v1/embeddings`: non-empty inputs, at most [`MAX_EMBEDDING_INPUTS`].
#[derive(Debug, Clone)]
pub struct ValidatedEmbeddings {
    pub model: String,
    pub inputs: EmbedInputs,
    pub encoding: EncodingFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInputs {
    Texts(Vec<String>),
    /// Word-piece ids, each below the model's vocabulary size.
    Tokens(Vec<Vec<u32>>),
}

impl EmbedInputs {
    pub fn len(&self) -> usize {
        match self {
            EmbedInputs::Texts(t) => t.len(),
            EmbedInputs::Tokens(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn embeddings(req: EmbeddingRequest, limits: EmbedLimits) -> Result<ValidatedEmbeddings, ApiError> {
    if let Some(key) = req.extra.keys().next() {
        return Err(ApiError::unknown_parameter(key));
    }
    if req.dimensions.as_ref().is_some_and(|d| !d.is_null()) {
        return Err(ApiError::unsupported(
            "dimensions",
            format!(
                "dimensions is not supported: {} has a fixed width of {}; leave dimensions out",
                req.model, limits.dimension
            ),
        ));
    }
    // A single string or id list is named `input`; an item of a list `input[i]`.
    let (inputs, single) = match req.input {
        EmbeddingInput::Text(t) => (EmbedInputs::Texts(vec![t]), true),
        EmbeddingInput::Texts(t) => (EmbedInputs::Texts(t), false),
        EmbeddingInput::Tokens(ids) => (EmbedInputs::Tokens(vec![ids]), true),
        EmbeddingInput::TokenLists(lists) => (EmbedInputs::Tokens(lists), false),
    };
    let name = |i: usize| if single { "input".to_owned() } else { format!("input[{i}]") };
    if inputs.is_empty() {
        return Err(ApiError::invalid("input must contain at least one string or token list", Some("input".into())));
    }
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::invalid(
            format!("input has {} items, more than the limit of {MAX_EMBEDDING_INPUTS}", inputs.len()),
            Some("input".into()),
        ));
    }
    match &inputs {
        EmbedInputs::Texts(texts) => {
            if let Some(i) = texts.iter().position(String::is_empty) {
                return Err(ApiError::invalid(format!("{} must not be an empty string", name(i)), Some(name(i))));
            }
        }
        EmbedInputs::Tokens(lists) => {
            for (i, ids) in lists.iter().enumerate() {
                if ids.is_empty() {
                    return Err(ApiError::invalid(format!("{} must not be an empty list", name(i)), Some(name(i))));
                }
                if let Some(j) = ids.iter().position(|&id| id as usize >= limits.vocab_size) {
                    let at = if single { format!("input[{j}]") } else { format!("input[{i}][{j}]") };
                    return Err(ApiError::invalid(
                        format!("{at} is {}, not a token id of this model (0 to {})", ids[j], limits.vocab_size - 1),
                        Some(at),
                    ));
                }
            }
        }
    }
    let encoding = req.encoding_format.unwrap_or_default();
    Ok(ValidatedEmbeddings { model: req.model, inputs, encoding })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: RequestLimits = RequestLimits { max_tokens: 4096, max_messages: 8 };

    fn chat_json(v: Value) -> Result<Validated, ApiError> {
        chat(serde_json::from_value(v).expect("wire shape"), LIMITS)
    }

    #[test]
    fn a_plain_chat_request_validates() {
        let v = chat_json(json!({"model":"m","messages":[{"role":"user","content":"hi"}],
            "max_tokens":5,"stop":"x","stream":true,"stream_options":{"include_usage":true}}))
        .unwrap();
        assert_eq!(v.generation.max_tokens, Some(5));
        assert_eq!(v.generation.sampling.stop, vec!["x".to_string()]);
        assert!(v.stream && v.include_usage);
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let v = chat_json(json!({"model":"m","messages":[{"role":"user","content":"hi"}],
            "max_tokens":5,"max_completion_tokens":7}))
        .unwrap();
        assert_eq!(v.generation.max_tokens, Some(7));
    }

    #[test]
    fn bad_values_name_their_param() {
        for (body, param) in [
            (json!({"model":"m","messages":[]}), "messages"),
            (json!({"model":"m","messages":[{"role":"robot","content":"x"}]}), "messages[0].role"),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}), "max_tokens"),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"n":17}), "n"),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":21,"logprobs":true}),
                "top_logprobs",
            ),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":2}), "top_logprobs"),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"schema":{}}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"xml"}}),
                "response_format.type",
            ),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"guided_choice":["a",""]}),
                "guided_choice[1]",
            ),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"guided_regex":"a","guided_choice":["a"]}),
                "guided_choice",
            ),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":"required"}), "tool_choice"),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}}),
                "tool_choice",
            ),
            (json!({"model":"m","messages":[{"role":"tool","content":"x"}]}), "messages[0].tool_call_id"),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}), "temperature"),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}),
                "tools[0].function",
            ),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"frobnicate":1}), "frobnicate"),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{}}), "stream_options"),
        ] {
            let err = chat_json(body).unwrap_err();
            assert_eq!(err.body().error.param.as_deref(), Some(param), "{err}");
        }
    }

    #[test]
    fn completion_prompt_must_be_one_string() {
        let ok: CompletionRequest = serde_json::from_value(json!({"model":"m","prompt":["a"]})).unwrap();
        assert!(completion(ok, LIMITS).is_ok());
        let many: CompletionRequest = serde_json::from_value(json!({"model":"m","prompt":["a","b"]})).unwrap();
        assert_eq!(completion(many, LIMITS).unwrap_err().code(), "unsupported_parameter");
    }

    fn embed_json(v: Value) -> Result<ValidatedEmbeddings, ApiError> {
        let limits = EmbedLimits { dimension: 384, vocab_size: 100 };
        embeddings(serde_json::from_value(v).map_err(|e| ApiError::invalid(e.to_string(), None))?, limits)
    }

    #[test]
    fn embedding_inputs_of_every_shape_validate() {
        let texts = |v: ValidatedEmbeddings| v.inputs;
        assert_eq!(
            texts(embed_json(json!({"model":"e","input":"hi"})).unwrap()),
            EmbedInputs::Texts(vec!["hi".into()])
        );
        assert_eq!(
            texts(embed_json(json!({"model":"e","input":["a","b"],"user":"u"})).unwrap()),
            EmbedInputs::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            texts(embed_json(json!({"model":"e","input":[1,2]})).unwrap()),
            EmbedInputs::Tokens(vec![vec![1, 2]])
        );
        let v = embed_json(json!({"model":"e","input":[[1],[2,3]],"encoding_format":"base64"})).unwrap();
        assert_eq!((v.inputs, v.encoding), (EmbedInputs::Tokens(vec![vec![1], vec![2, 3]]), EncodingFormat::Base64));
    }

    #[test]
    fn bad_embedding_requests_name_their_param() {
        let many: Vec<String> = vec!["x".into(); MAX_EMBEDDING_INPUTS + 1];
        for (body, param) in [
            (json!({"model":"e","input":[]}), "input"),
            (json!({"model":"e","input":""}), "input"),
            (json!({"model":"e","input":["a",""]}), "input[1]"),
            (json!({"model":"e","input":[[1],[]]}), "input[1]"),
            (json!({"model":"e","input":[1,100]}), "input[1]"),
            (json!({"model":"e","input":[[1],[2,100]]}), "input[1][1]"),
            (json!({"model":"e","input":many}), "input"),
            (json!({"model":"e","input":"a","dimensions":128}), "dimensions"),
            (json!({"model":"e","input":"a","truncate":true}), "truncate"),
        ] {
            let err = embed_json(body.clone()).unwrap_err();
            assert_eq!(err.body().error.param.as_deref(), Some(param), "{body}: {err}");
        }
        for body in [
            json!({"model":"e","input":["a",1]}),
            json!({"model":"e","input":[1,-2]}),
            json!({"model":"e","input":{"text":"a"}}),
            json!({"model":"e","input":"a","encoding_format":"int8"}),
        ] {
            let err = serde_json::from_value::<EmbeddingRequest>(body.clone()).unwrap_err().to_string();
            assert!(err.contains("input") || err.contains("int8"), "{body}: {err}");
        }
    }
}
