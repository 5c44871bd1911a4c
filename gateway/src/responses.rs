//! OpenAI's Responses API, text subset: `POST /v1/responses` (a string or message items,
//! `instructions`, `text.format`, function `tools`, `previous_response_id`, typed
//! `response.*` stream events) and `GET /v1/responses/{id}` for stored responses.
//!
//! A request is rewritten into a chat completion request and validated as one, so both
//! APIs share every rule; the answer is read through the same [`ChoiceText`] as chat's.
//! Stored responses live under `<data>/responses/<hex tenant>/<id>.json`, with the
//! conversation that produced them (a later `previous_response_id` continues it).

use std::path::{Path, PathBuf};

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures::stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::answer::{ChoiceText, Piece};
use crate::engine::{Event, FinishReason, Prompt};
use crate::error::ApiError;
use crate::extract::{caller, read_json};
use crate::openai::{ChatCompletionRequest, ErrorResponse};
use crate::respond::{collect, count_tokens, sse_response, Envelope, Running};
use crate::state::AppState;
use crate::validate;

pub const RESPONSES_DIR: &str = "responses";

/// `POST /v1/responses` body (the text subset of OpenAI's).
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"model": "SmolLM2-135M-Instruct", "instructions": "Answer in one sentence.", "input": "What is a LoRA adapter?", "max_output_tokens": 64}))]
pub struct ResponsesRequest {
    pub model: String,
    /// A string (one user message) or a list of items: `{"role", "content"}` messages
    /// (content a string or `input_text` / `output_text` parts), `function_call` and
    /// `function_call_output` items.
    #[schema(value_type = Object)]
    pub input: Value,
    /// A system message put first.
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", "name", "schema", "strict"}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub text: Option<Value>,
    /// Function tools: `[{"type": "function", "name", "description", "parameters"}]`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "name"}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// Keep the response for `GET /v1/responses/{id}` and `previous_response_id` (default true).
    #[serde(default)]
    pub store: Option<bool>,
    /// Continue the conversation of a stored response.
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub user: Option<String>,
    /// Extension: a seed for sampling.
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

/// What is kept of a stored response: the response object and the chat messages it continued
/// (its own answer included), for `previous_response_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    response: Value,
    messages: Vec<Value>,
}

fn tenant_dir(data: &Path, tenant: &str) -> PathBuf {
    data.join(RESPONSES_DIR).join(hex::encode(tenant))
}

fn valid_id(id: &str) -> bool {
    id.starts_with("resp_") && id.len() <= 64 && id[5..].bytes().all(|b| b.is_ascii_alphanumeric())
}

fn load(data: &Path, tenant: &str, id: &str) -> Result<Stored, ApiError> {
    let missing = || ApiError::NotFound { message: format!("Response with id '{id}' not found.") };
    if !valid_id(id) {
        return Err(missing());
    }
    let bytes = std::fs::read(tenant_dir(data, tenant).join(format!("{id}.json"))).map_err(|_| missing())?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::Internal(format!("stored response {id} is unreadable: {e}")))
}

fn save(data: &Path, tenant: &str, id: &str, stored: &Stored) -> std::io::Result<()> {
    let dir = tenant_dir(data, tenant);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{id}.json"));
    let tmp = dir.join(format!(".{id}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(stored).map_err(std::io::Error::other)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Renames a chat parameter in an error to the Responses name it came from.
fn renamed(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidRequest { message, param, code } => {
            let param = param.map(|p| {
                for (from, to) in [
                    ("response_format.json_schema.", "text.format."),
                    ("response_format", "text.format"),
                    ("max_completion_tokens", "max_output_tokens"),
                    ("messages", "input"),
                ] {
                    if let Some(rest) = p.strip_prefix(from) {
                        return format!("{to}{rest}");
                    }
                }
                p
            });
            let message = message
                .replace("response_format.json_schema.", "text.format.")
                .replace("max_completion_tokens", "max_output_tokens");
            ApiError::InvalidRequest { message, param, code }
        }
        other => other,
    }
}

/// The request as chat messages, tools and format, in chat completion wire form.
fn to_chat(req: &ResponsesRequest, earlier: Vec<Value>) -> Result<(Value, Vec<Value>), ApiError> {
    let bad = |at: String, why: &str| ApiError::invalid(format!("{at} {why}"), Some(at));
    validate::check_fields(&req.extra, |key, value| {
        Some(match key {
            "truncation" => value.is_null() || value == "disabled",
            "reasoning" | "include" => value.is_null() || value.as_array().is_some_and(Vec::is_empty),
            "service_tier" => true,
            _ => return None,
        })
    })?;
    let mut messages: Vec<Value> = Vec::new();
    if let Some(i) = &req.instructions {
        messages.push(json!({"role": "system", "content": i}));
    }
    messages.extend(earlier);
    match &req.input {
        Value::String(s) if !s.is_empty() => messages.push(json!({"role": "user", "content": s})),
        Value::Array(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                let at = |f: &str| format!("input[{i}]{f}");
                match item.get("type").and_then(Value::as_str).unwrap_or("message") {
                    "message" => {
                        let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                        if !matches!(role, "user" | "system" | "developer" | "assistant") {
                            return Err(bad(at(".role"), "must be user, system, developer or assistant"));
                        }
                        let content = match item.get("content") {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Array(parts)) => {
                                let mut text = String::new();
                                for (j, p) in parts.iter().enumerate() {
                                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str))
                                    {
                                        (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                                        _ => {
                                            return Err(bad(
                                                at(&format!(".content[{j}]")),
                                                "must be an input_text or output_text part (only text is served)",
                                            ))
                                        }
                                    }
                                }
                                text
                            }
                            _ => return Err(bad(at(".content"), "must be a string or a list of text parts")),
                        };
                        messages.push(json!({"role": role, "content": content}));
                    }
                    "function_call" => {
                        let (Some(call_id), Some(name), Some(arguments)) = (
                            item.get("call_id").and_then(Value::as_str),
                            item.get("name").and_then(Value::as_str),
                            item.get("arguments").and_then(Value::as_str),
                        ) else {
                            return Err(bad(at(""), "(a function_call) needs call_id, name and arguments strings"));
                        };
                        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
                            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                        ]}));
                    }
                    "function_call_output" => {
                        let (Some(call_id), Some(output)) =
                            (item.get("call_id").and_then(Value::as_str), item.get("output").and_then(Value::as_str))
                        else {
                            return Err(bad(at(""), "(a function_call_output) needs call_id and output strings"));
                        };
                        messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
                    }
                    other => {
                        return Err(bad(
                            at(".type"),
                            &format!("'{other}' is not served; use message, function_call or function_call_output"),
                        ))
                    }
                }
            }
        }
        _ => return Err(bad("input".into(), "must be a non-empty string or a non-empty list of items")),
    }
    let mut chat = json!({"model": req.model, "messages": messages});
    if let Some(m) = req.max_output_tokens {
        chat["max_completion_tokens"] = json!(m);
    }
    for (k, v) in [("temperature", req.temperature.map(|v| json!(v))), ("top_p", req.top_p.map(|v| json!(v)))] {
        if let Some(v) = v {
            chat[k] = v;
        }
    }
    if let Some(seed) = req.seed {
        chat["seed"] = json!(seed);
    }
    if let Some(user) = &req.user {
        chat["user"] = json!(user);
    }
    if let Some(text) = req.text.as_ref().filter(|t| !t.is_null()) {
        match text.get("format") {
            None | Some(Value::Null) => {}
            Some(f) => {
                chat["response_format"] = match f.get("type").and_then(Value::as_str) {
                    Some("json_schema") => {
                        let mut js = Map::new();
                        for k in ["name", "schema", "strict", "description"] {
                            if let Some(v) = f.get(k) {
                                js.insert(k.into(), v.clone());
                            }
                        }
                        json!({"type": "json_schema", "json_schema": js})
                    }
                    _ => f.clone(),
                }
            }
        }
    }
    if let Some(tools) = req.tools.as_ref().filter(|t| !t.is_null()) {
        let Some(items) = tools.as_array() else { return Err(bad("tools".into(), "must be a list of function tools")) };
        let mut out = Vec::with_capacity(items.len());
        for (i, t) in items.iter().enumerate() {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad(format!("tools[{i}].type"), "must be 'function' (the only tool type served)"));
            }
            let mut f = Map::new();
            for k in ["name", "description", "parameters", "strict"] {
                if let Some(v) = t.get(k) {
                    f.insert(k.into(), v.clone());
                }
            }
            out.push(json!({"type": "function", "function": f}));
        }
        chat["tools"] = Value::Array(out);
    }
    if let Some(choice) = req.tool_choice.as_ref().filter(|c| !c.is_null()) {
        chat["tool_choice"] = match choice {
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Value::Null)}})
            }
            other => other.clone(),
        };
    }
    if let Some(p) = req.parallel_tool_calls {
        chat["parallel_tool_calls"] = json!(p);
    }
    let conversation = chat["messages"].as_array().cloned().unwrap_or_default();
    Ok((chat, conversation))
}

/// The output items of an answer: one message, or one item per function call.
fn output_items(pieces: &[Piece], msg_id: &str, status: &str) -> Vec<Value> {
    let mut text: Option<String> = None;
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for p in pieces {
        match p {
            Piece::Content(t) => text.get_or_insert_with(String::new).push_str(t),
            Piece::Call { id, name, arguments, .. } => calls.push((id.clone(), name.clone(), arguments.clone())),
            Piece::Arguments { index, delta } => {
                if let Some(c) = calls.get_mut(*index) {
                    c.2.push_str(delta);
                }
            }
        }
    }
    let mut out = Vec::new();
    if text.is_some() || calls.is_empty() {
        out.push(message_item(msg_id, &text.unwrap_or_default(), status));
    }
    for (id, name, arguments) in calls {
        out.push(call_item(&id, &name, &arguments, "completed"));
    }
    out
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": format!("fc_{}", &call_id[5.min(call_id.len())..]), "call_id": call_id,
           "name": name, "arguments": arguments, "status": status})
}

/// The chat messages an answer adds to the conversation (for `previous_response_id`).
fn answer_messages(output: &[Value]) -> Vec<Value> {
    output
        .iter()
        .map(|item| match item.get("type").and_then(Value::as_str) {
            Some("function_call") => json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}]}),
            _ => json!({"role": "assistant", "content": item["content"][0]["text"]}),
        })
        .collect()
}

/// The response object around `output`.
struct Frame {
    id: String,
    created_at: u64,
    model: String,
    req: ResponsesRequest,
}

impl Frame {
    fn response(&self, status: &str, output: Vec<Value>, usage: Option<Value>, incomplete: bool) -> Value {
        let format = self
            .req
            .text
            .as_ref()
            .and_then(|t| t.get("format"))
            .cloned()
            .filter(|f| !f.is_null())
            .unwrap_or_else(|| json!({"type": "text"}));
        json!({
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model, "output": output, "error": null,
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": self.req.instructions, "max_output_tokens": self.req.max_output_tokens,
            "temperature": self.req.temperature.unwrap_or(1.0), "top_p": self.req.top_p.unwrap_or(1.0),
            "text": {"format": format}, "tools": self.req.tools.clone().unwrap_or(json!([])),
            "tool_choice": self.req.tool_choice.clone().unwrap_or(json!("auto")),
            "parallel_tool_calls": self.req.parallel_tool_calls.unwrap_or(true),
            "previous_response_id": self.req.previous_response_id, "store": self.req.store.unwrap_or(true),
            "metadata": self.req.metadata.clone().unwrap_or(json!({})), "user": self.req.user,
            "truncation": "disabled", "reasoning": {"effort": null, "summary": null},
            "usage": usage,
        })
    }
}

fn usage_json(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
           "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
           "total_tokens": prompt + completion})
}

#[utoipa::path(
    post,
    path = "/v1/responses",
    tag = "openai",
    request_body = ResponsesRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The response object, or with `stream: true` typed server-sent events (`response.created`, `response.output_text.delta`, `response.function_call_arguments.delta`, …, `response.completed`)", body = Object),
        (status = 400, description = "Invalid request (the parameter is named)", body = ErrorResponse, example = json!({"error": {"message": "text.format.name must be 1 to 64 letters, digits, underscores or dashes", "type": "invalid_request_error", "param": "text.format.name", "code": "invalid_value"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "Unknown model, adapter or previous response", body = ErrorResponse),
        (status = 413, description = "Body over the limit", body = ErrorResponse),
        (status = 429, description = "Rate or concurrency limit reached", body = ErrorResponse),
        (status = 503, description = "Model not loaded yet, or draining", body = ErrorResponse)
    )
)]
pub(crate) async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: ResponsesRequest = read_json(&req, payload, state.body_limit).await?;
    crate::extract::note_end_user(&req, wire.user.as_deref());
    let who = caller(&req);
    let earlier = match wire.previous_response_id.as_deref() {
        Some(prev) => {
            let data = state.data_dir.clone();
            let (tenant, prev) = (who.tenant.clone(), prev.to_owned());
            let stored = web::block(move || load(&data, &tenant, &prev)).await?.map_err(|e| match e {
                ApiError::NotFound { message } => ApiError::invalid(message, Some("previous_response_id".to_owned())),
                other => other,
            })?;
            // The earlier instructions are not carried over, as OpenAI does.
            stored.messages.into_iter().filter(|m| m["role"] != "system").collect()
        }
        None => Vec::new(),
    };
    let (chat, mut conversation) = to_chat(&wire, earlier)?;
    let chat: ChatCompletionRequest =
        serde_json::from_value(chat).map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))?;
    let v = validate::chat(chat, state.limits).map_err(renamed)?;
    state.admit_caller(&req, &who).await.map_err(renamed)?;
    let stream = wire.stream.unwrap_or(false);
    let slot = if stream { state.limiter.stream_slot(&who)? } else { None };
    let draft = crate::feedback::Draft {
        tenant: who.tenant.clone(),
        sub: who.sub.clone(),
        prompt: match &v.generation.prompt {
            Prompt::Chat(messages) => crate::feedback::messages_json(messages),
            Prompt::Text(t) => Value::String(t.clone()),
        },
        params: json!({"max_tokens": v.generation.max_tokens, "temperature": v.generation.sampling.temperature,
                       "top_p": v.generation.sampling.top_p, "seed": v.generation.sampling.seed}),
    };
    let tenant = who.tenant.clone();
    let mut running = state.start_logged(&req, &v.model, who, v.generation, 1, draft, slot).await.map_err(renamed)?;
    let mut envelope = Envelope::task("resp", v.model.clone());
    // OpenAI's response ids are `resp_…`.
    envelope.id = envelope.id.replacen("resp-", "resp_", 1);
    let frame = Frame { id: envelope.id.clone(), created_at: envelope.created, model: v.model, req: wire };
    let store = frame.req.store.unwrap_or(true).then(|| (state.data_dir.clone(), tenant));
    let mut text = ChoiceText::new(v.shape.tools);
    if stream {
        return Ok(streamed(envelope, running, frame, text, store, conversation));
    }
    // The whole text through the same pieces as the stream's (a tool call's decision needs
    // the end anyway).
    let done = collect(&envelope, &mut running).await?;
    let mut pieces = text.delta(&done.text);
    pieces.extend(text.finish());
    let cached = done.usage.prompt_tokens_details.as_ref().map_or(0, |d| d.cached_tokens);
    let usage = usage_json(done.usage.prompt_tokens, done.usage.completion_tokens, cached);
    let incomplete = done.reason == FinishReason::Length;
    let status = if incomplete { "incomplete" } else { "completed" };
    let output = output_items(&pieces, &format!("msg_{}", &frame.id[5..]), status);
    let response = frame.response(status, output.clone(), Some(usage), incomplete);
    if let Some((data, tenant)) = store {
        conversation.extend(answer_messages(&output));
        let stored = Stored { response: response.clone(), messages: conversation };
        let id = frame.id.clone();
        web::block(move || save(&data, &tenant, &id, &stored))
            .await?
            .map_err(|e| ApiError::Internal(format!("could not store the response: {e}")))?;
    }
    Ok(HttpResponse::Ok().json(response))
}

struct StreamState {
    envelope: Envelope,
    run: Running,
    frame: Frame,
    text: ChoiceText,
    store: Option<(PathBuf, String)>,
    conversation: Vec<Value>,
    queue: std::collections::VecDeque<Value>,
    seq: u64,
    started: bool,
    first_seen: bool,
    done: bool,
    /// The message item, once text has started: its id and text so far.
    message: Option<(String, String)>,
    /// Calls opened so far: output index, item id, call id, name, arguments.
    calls: Vec<(usize, String, String, String, String)>,
    outputs: usize,
}

impl StreamState {
    fn push(&mut self, kind: &str, mut body: Value) {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.queue.push_back(body);
    }

    fn msg_id(&self) -> String {
        format!("msg_{}", &self.frame.id[5..])
    }

    fn open_message(&mut self) {
        if self.message.is_some() {
            return;
        }
        let id = self.msg_id();
        let index = self.outputs;
        self.outputs += 1;
        self.push(
            "response.output_item.added",
            json!({"output_index": index, "item": {
            "type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}}),
        );
        self.push(
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
        );
        self.message = Some((id, String::new()));
    }

    fn on_pieces(&mut self, pieces: Vec<Piece>) {
        for p in pieces {
            match p {
                Piece::Content(t) => {
                    self.open_message();
                    let id = self.msg_id();
                    if let Some((_, text)) = self.message.as_mut() {
                        text.push_str(&t);
                    }
                    self.push(
                        "response.output_text.delta",
                        json!({"item_id": id, "output_index": 0,
                        "content_index": 0, "delta": t, "logprobs": []}),
                    );
                }
                Piece::Call { id: call_id, name, arguments, .. } => {
                    let index = self.outputs;
                    self.outputs += 1;
                    let item = call_item(&call_id, &name, "", "in_progress");
                    let item_id = item["id"].as_str().unwrap_or_default().to_owned();
                    self.push("response.output_item.added", json!({"output_index": index, "item": item}));
                    if !arguments.is_empty() {
                        self.push(
                            "response.function_call_arguments.delta",
                            json!({"item_id": item_id, "output_index": index, "delta": arguments}),
                        );
                    }
                    self.calls.push((index, item_id, call_id, name, arguments));
                }
                Piece::Arguments { index, delta } => {
                    if let Some(c) = self.calls.get_mut(index) {
                        c.4.push_str(&delta);
                        let (out, item_id) = (c.0, c.1.clone());
                        self.push(
                            "response.function_call_arguments.delta",
                            json!({"item_id": item_id, "output_index": out, "delta": delta}),
                        );
                    }
                }
            }
        }
    }

    /// Closes every open item and the response.
    fn close(&mut self, reason: FinishReason, usage: Value) {
        let mut output = Vec::new();
        let status = if reason == FinishReason::Length { "incomplete" } else { "completed" };
        if let Some((id, text)) = self.message.take() {
            self.push(
                "response.output_text.done",
                json!({"item_id": id, "output_index": 0, "content_index": 0,
                "text": text, "logprobs": []}),
            );
            self.push(
                "response.content_part.done",
                json!({"item_id": id, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}),
            );
            let item = message_item(&id, &text, status);
            self.push("response.output_item.done", json!({"output_index": 0, "item": item}));
            output.push(item);
        } else if self.calls.is_empty() {
            // An empty answer is still one (empty) message.
            self.open_message();
            return self.close(reason, usage);
        }
        for (index, item_id, call_id, name, arguments) in std::mem::take(&mut self.calls) {
            self.push(
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": index, "name": name, "arguments": arguments}),
            );
            let item = call_item(&call_id, &name, &arguments, "completed");
            self.push("response.output_item.done", json!({"output_index": index, "item": item}));
            output.push(item);
        }
        let incomplete = reason == FinishReason::Length;
        let response = self.frame.response(
            if incomplete { "incomplete" } else { "completed" },
            output.clone(),
            Some(usage),
            incomplete,
        );
        if let Some((data, tenant)) = self.store.take() {
            let mut messages = std::mem::take(&mut self.conversation);
            messages.extend(answer_messages(&output));
            let stored = Stored { response: response.clone(), messages };
            if let Err(e) = save(&data, &tenant, &self.frame.id, &stored) {
                tracing::error!(error = %e, id = %self.frame.id, "could not store a streamed response");
            }
        }
        let kind = if incomplete { "response.incomplete" } else { "response.completed" };
        self.push(kind, json!({"response": response}));
        self.done = true;
    }
}

fn event_frame(body: &Value) -> Bytes {
    let kind = body["type"].as_str().unwrap_or("message");
    Bytes::from(format!("event: {kind}\ndata: {body}\n\n"))
}

fn streamed(
    envelope: Envelope,
    run: Running,
    frame: Frame,
    text: ChoiceText,
    store: Option<(PathBuf, String)>,
    conversation: Vec<Value>,
) -> HttpResponse {
    let state = StreamState {
        envelope,
        run,
        frame,
        text,
        store,
        conversation,
        queue: Default::default(),
        seq: 0,
        started: false,
        first_seen: false,
        done: false,
        message: None,
        calls: Vec::new(),
        outputs: 0,
    };
    let body = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(body) = s.queue.pop_front() {
                return Some((Ok::<_, actix_web::Error>(event_frame(&body)), s));
            }
            if s.done {
                return None;
            }
            if !s.started {
                s.started = true;
                let r = s.frame.response("in_progress", Vec::new(), None, false);
                s.push("response.created", json!({"response": r.clone()}));
                s.push("response.in_progress", json!({"response": r}));
                continue;
            }
            match s.run.generation.events.recv().await {
                Some(Event::Delta(d)) if d.is_empty() => {}
                Some(Event::Delta(d)) => {
                    if !s.first_seen {
                        s.first_seen = true;
                        s.run.first_token();
                    }
                    let pieces = s.text.delta(&d);
                    s.on_pieces(pieces);
                }
                Some(Event::Logprob(_) | Event::PromptLogprobs(_)) => {}
                Some(Event::Finished { reason, completion_tokens, cached_tokens }) => {
                    let pieces = s.text.finish();
                    s.on_pieces(pieces);
                    let usage = crate::openai::Usage::new(s.run.generation.prompt_tokens, completion_tokens)
                        .with_cached(cached_tokens);
                    count_tokens(&s.run, &usage);
                    let raw = s.text.raw().to_owned();
                    s.run.log_completion(&s.envelope, &raw, reason.as_str(), &usage);
                    s.close(reason, usage_json(usage.prompt_tokens, completion_tokens, cached_tokens));
                }
                Some(Event::Failed(msg)) => {
                    s.run.failed();
                    tracing::error!(error = %msg, "response failed mid-stream");
                    let r = s.frame.response("failed", Vec::new(), None, false);
                    s.push("response.failed", json!({"response": r}));
                    s.done = true;
                }
                None => {
                    let r = s.frame.response("failed", Vec::new(), None, false);
                    s.push("response.failed", json!({"response": r}));
                    s.done = true;
                }
            }
        }
    });
    sse_response(body)
}

#[utoipa::path(
    get,
    path = "/v1/responses/{id}",
    tag = "openai",
    params(("id" = String, Path, description = "A response id (`resp_…`) created with `store` on")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The stored response object", body = Object),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "No such response for this tenant", body = ErrorResponse, example = json!({"error": {"message": "Response with id 'resp_x' not found.", "type": "invalid_request_error", "param": null, "code": "not_found"}}))
    )
)]
pub(crate) async fn get(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let who = caller(&req);
    let data = state.data_dir.clone();
    let id = id.into_inner();
    let stored = web::block(move || load(&data, &who.tenant, &id)).await??;
    Ok(HttpResponse::Ok().json(stored.response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(v: Value) -> ResponsesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn items_become_chat_messages() {
        let r = request(json!({"model": "m", "instructions": "Be brief.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
        ], "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
           "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}],
           "tool_choice": {"type": "function", "name": "w"}}));
        let (chat, _) = to_chat(&r, Vec::new()).unwrap();
        assert_eq!(chat["messages"][0]["role"], "system");
        assert_eq!(chat["messages"][2]["tool_calls"][0]["function"]["name"], "w");
        assert_eq!(chat["messages"][3]["role"], "tool");
        assert_eq!(chat["response_format"]["json_schema"]["name"], "x");
        assert_eq!(chat["tools"][0]["function"]["name"], "w");
        assert_eq!(chat["tool_choice"]["function"]["name"], "w");
    }

    #[test]
    fn bad_items_are_named() {
        let r = request(json!({"model": "m", "input": [{"type": "image", "url": "x"}]}));
        let e = to_chat(&r, Vec::new()).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("input[0].type"));
        let r = request(json!({"model": "m", "input": "hi", "frobnicate": 1}));
        assert_eq!(to_chat(&r, Vec::new()).unwrap_err().body().error.param.as_deref(), Some("frobnicate"));
        assert!(!valid_id("resp_../x") && valid_id("resp_abc123"));
    }
}
