//! Chat and text completion answers with every OpenAI option: `n` choices, log-probabilities,
//! `echo`, and tool calls. One [`ChoiceText`] per choice turns the engine's events into
//! pieces (content, a call, more arguments); the JSON answer is those pieces joined and the
//! streamed answer is those pieces sent as they come, so the two always agree.

use std::time::Instant;

use actix_web::HttpResponse;
use bytes::Bytes;
use futures::{stream, StreamExt};
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{Event, FinishReason, TokenLogprob};
use crate::error::ApiError;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChunkDelta,
    CompletionChoice, CompletionResponse, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta, Usage,
};
use crate::respond::{count_tokens, sse, sse_response, sse_text, Envelope, Kind, Running, FINGERPRINT};

/// How the model's text becomes tool calls.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// `tool_choice: {"function": {"name"}}`: the text is that function's arguments.
    Named(String),
    /// `tool_choice: "required"`: the text is a JSON list of `{"name", "arguments"}` (one
    /// object when parallel calls are off).
    Required,
    /// `tool_choice: "auto"`: `<tool_call>{"name", "arguments"}</tool_call>` blocks are calls,
    /// anything else is content.
    Auto { names: Vec<String> },
}

/// Which OpenAI shape log-probabilities take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobFormat {
    Off,
    /// `{"content": [{token, logprob, bytes, top_logprobs}]}`.
    Chat,
    /// `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`.
    Text,
}

/// Everything about an answer's shape that the engine does not need.
#[derive(Debug, Clone)]
pub struct AnswerShape {
    pub n: usize,
    pub logprobs: LogprobFormat,
    /// Completions' `echo`: the prompt text, sent before the answer.
    pub echo: Option<String>,
    pub tools: Option<ToolMode>,
}

impl Default for AnswerShape {
    fn default() -> Self {
        Self { n: 1, logprobs: LogprobFormat::Off, echo: None, tools: None }
    }
}

/// A piece of one choice's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Content(String),
    /// A new call: its id, name and the first of its arguments.
    Call {
        index: usize,
        id: String,
        name: String,
        arguments: String,
    },
    /// More arguments of call `index`.
    Arguments {
        index: usize,
        delta: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auto {
    /// The text so far could still open `<tool_call>`.
    Undecided,
    Content,
    Calls,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One choice's text on its way to pieces.
#[derive(Debug)]
pub struct ChoiceText {
    mode: Option<ToolMode>,
    raw: String,
    auto: Auto,
    calls: usize,
}

pub fn call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

impl ChoiceText {
    pub fn new(mode: Option<ToolMode>) -> Self {
        Self { mode, raw: String::new(), auto: Auto::Undecided, calls: 0 }
    }

    /// The model's text so far, as it wrote it.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    pub fn delta(&mut self, d: &str) -> Vec<Piece> {
        self.raw.push_str(d);
        match &self.mode {
            None => vec![Piece::Content(d.to_owned())],
            Some(ToolMode::Named(name)) => {
                if self.calls == 0 {
                    self.calls = 1;
                    vec![Piece::Call { index: 0, id: call_id(), name: name.clone(), arguments: d.to_owned() }]
                } else {
                    vec![Piece::Arguments { index: 0, delta: d.to_owned() }]
                }
            }
            Some(ToolMode::Required) => Vec::new(),
            Some(ToolMode::Auto { .. }) => match self.auto {
                Auto::Content => vec![Piece::Content(d.to_owned())],
                Auto::Calls => Vec::new(),
                Auto::Undecided => {
                    let t = self.raw.trim_start();
                    // A `<tool_call>` block, or (a template's own format) a bare JSON call:
                    // held back until the end decides.
                    if t.starts_with(OPEN) || t.starts_with('{') {
                        self.auto = Auto::Calls;
                        Vec::new()
                    } else if OPEN.starts_with(t) {
                        Vec::new()
                    } else {
                        self.auto = Auto::Content;
                        vec![Piece::Content(self.raw.clone())]
                    }
                }
            },
        }
    }

    /// The pieces held back until the end (buffered calls, or text that only looked like
    /// the start of one).
    pub fn finish(&mut self) -> Vec<Piece> {
        match &self.mode {
            None => Vec::new(),
            Some(ToolMode::Named(name)) => {
                if self.calls == 0 {
                    self.calls = 1;
                    vec![Piece::Call { index: 0, id: call_id(), name: name.clone(), arguments: String::new() }]
                } else {
                    Vec::new()
                }
            }
            Some(ToolMode::Required) => {
                let calls = match serde_json::from_str::<Value>(&self.raw) {
                    Ok(Value::Array(items)) => items.iter().filter_map(as_call).collect(),
                    Ok(one) => as_call(&one).into_iter().collect(),
                    Err(_) => Vec::new(),
                };
                self.pieces_of(calls)
            }
            Some(ToolMode::Auto { names }) => match self.auto {
                Auto::Content => Vec::new(),
                Auto::Undecided if self.raw.is_empty() => Vec::new(),
                Auto::Undecided => vec![Piece::Content(self.raw.clone())],
                Auto::Calls => {
                    let mut values: Vec<Value> =
                        blocks(&self.raw).iter().filter_map(|b| serde_json::from_str::<Value>(b).ok()).collect();
                    if values.is_empty() {
                        match serde_json::from_str::<Value>(self.raw.trim()) {
                            Ok(Value::Array(items)) => values = items,
                            Ok(one) => values.push(one),
                            Err(_) => {}
                        }
                    }
                    let calls: Vec<(String, String)> =
                        values.iter().filter_map(as_call).filter(|(name, _)| names.contains(name)).collect();
                    self.pieces_of(calls)
                }
            },
        }
    }

    /// Calls as pieces; when the text held none that parse, the text itself is the answer.
    fn pieces_of(&mut self, calls: Vec<(String, String)>) -> Vec<Piece> {
        if calls.is_empty() {
            return vec![Piece::Content(self.raw.clone())];
        }
        self.calls = calls.len();
        calls
            .into_iter()
            .enumerate()
            .map(|(index, (name, arguments))| Piece::Call { index, id: call_id(), name, arguments })
            .collect()
    }

    pub fn made_calls(&self) -> bool {
        self.calls > 0
    }
}

/// `{"name": "f", "arguments": {...}}` (arguments also as a JSON string) → name and arguments text.
fn as_call(v: &Value) -> Option<(String, String)> {
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "{}".to_owned(),
    };
    Some((name, arguments))
}

/// The insides of every `<tool_call>…</tool_call>` block (an unclosed last one too).
fn blocks(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let body = &rest[start + OPEN.len()..];
        match body.find(CLOSE) {
            Some(end) => {
                out.push(body[..end].trim());
                rest = &body[end + CLOSE.len()..];
            }
            None => {
                out.push(body.trim());
                break;
            }
        }
    }
    out
}

/// Joins pieces into a message: content (if any) and calls.
fn join(pieces: &[Piece]) -> (Option<String>, Vec<ToolCall>) {
    let mut content: Option<String> = None;
    let mut calls: Vec<ToolCall> = Vec::new();
    for p in pieces {
        match p {
            Piece::Content(t) => content.get_or_insert_with(String::new).push_str(t),
            Piece::Call { id, name, arguments, .. } => calls.push(ToolCall {
                id: id.clone(),
                kind: "function".into(),
                function: FunctionCall { name: name.clone(), arguments: arguments.clone() },
            }),
            Piece::Arguments { index, delta } => {
                if let Some(c) = calls.get_mut(*index) {
                    c.function.arguments.push_str(delta);
                }
            }
        }
    }
    (content, calls)
}

fn token_text(t: &TokenLogprob) -> String {
    String::from_utf8_lossy(&t.bytes).into_owned()
}

/// Chat's `logprobs.content` entries.
fn chat_logprobs(tokens: &[TokenLogprob]) -> Vec<Value> {
    tokens
        .iter()
        .map(|t| {
            json!({
                "token": token_text(t), "logprob": t.logprob.unwrap_or(0.0), "bytes": t.bytes,
                "top_logprobs": t.top.iter().map(|x| json!({
                    "token": String::from_utf8_lossy(&x.bytes), "logprob": x.logprob, "bytes": x.bytes,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Completions' logprobs object; `offset` is where the first token starts in the text.
fn text_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut texts = Vec::with_capacity(tokens.len());
    let mut lps = Vec::with_capacity(tokens.len());
    let mut tops = Vec::with_capacity(tokens.len());
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        let text = token_text(t);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        lps.push(t.logprob.map_or(Value::Null, |l| json!(l)));
        tops.push(match t.logprob {
            None => Value::Null,
            Some(_) => {
                let mut m = serde_json::Map::new();
                for x in &t.top {
                    m.insert(String::from_utf8_lossy(&x.bytes).into_owned(), json!(x.logprob));
                }
                Value::Object(m)
            }
        });
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// One choice as it runs: its pieces so far and its log-probabilities.
struct ChoiceRun {
    text: ChoiceText,
    pieces: Vec<Piece>,
    logprobs: Vec<TokenLogprob>,
    /// Log-probabilities not yet sent (streaming).
    unsent: Vec<TokenLogprob>,
    prompt_logprobs: Vec<TokenLogprob>,
    finish: Option<(FinishReason, usize, usize)>,
    /// Bytes of text sent so far (completions' `text_offset` when streaming).
    sent_len: usize,
}

impl ChoiceRun {
    fn new(mode: Option<ToolMode>) -> Self {
        Self {
            text: ChoiceText::new(mode),
            pieces: Vec::new(),
            logprobs: Vec::new(),
            unsent: Vec::new(),
            prompt_logprobs: Vec::new(),
            finish: None,
            sent_len: 0,
        }
    }

    fn finish_reason(&self) -> &'static str {
        match self.finish {
            Some((FinishReason::Stop, ..)) if self.text.made_calls() => "tool_calls",
            Some((reason, ..)) => reason.as_str(),
            None => "stop",
        }
    }
}

/// Every choice's events, tagged with the choice's index. Choice 0 stays in `run`.
fn merged(run: &mut Running) -> futures::stream::BoxStream<'static, (usize, Event)> {
    let mut receivers = vec![std::mem::replace(&mut run.generation.events, tokio::sync::mpsc::unbounded_channel().1)];
    receivers.extend(run.more.drain(..).map(|g| g.events));
    let streams =
        receivers.into_iter().enumerate().map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e)).boxed());
    stream::select_all(streams).boxed()
}

fn usage_of(run: &Running, choices: &[ChoiceRun]) -> Usage {
    let completion: usize = choices.iter().map(|c| c.finish.map_or(0, |f| f.1)).sum();
    let cached = choices.first().and_then(|c| c.finish).map_or(0, |f| f.2);
    Usage::new(run.generation.prompt_tokens, completion).with_cached(cached)
}

/// Reads every choice to its end and answers with one JSON body.
pub async fn whole(envelope: Envelope, mut run: Running, shape: AnswerShape) -> Result<HttpResponse, ApiError> {
    let n = shape.n.max(1);
    let mut choices: Vec<ChoiceRun> = (0..n).map(|_| ChoiceRun::new(shape.tools.clone())).collect();
    let mut events = merged(&mut run);
    let mut first = true;
    let mut left = n;
    while left > 0 {
        let Some((i, event)) = events.next().await else {
            return Err(ApiError::Internal("the engine ended the generation without finishing it".into()));
        };
        let c = &mut choices[i];
        match event {
            Event::Delta(d) => {
                if first {
                    run.first_token();
                    first = false;
                }
                let pieces = c.text.delta(&d);
                c.pieces.extend(pieces);
            }
            Event::Logprob(t) => c.logprobs.push(t),
            Event::PromptLogprobs(p) => c.prompt_logprobs = p,
            Event::Finished { reason, completion_tokens, cached_tokens } => {
                let pieces = c.text.finish();
                c.pieces.extend(pieces);
                c.finish = Some((reason, completion_tokens, cached_tokens));
                left -= 1;
            }
            Event::Failed(msg) => {
                run.failed();
                return Err(ApiError::Internal(msg));
            }
        }
    }
    let usage = usage_of(&run, &choices);
    count_tokens(&run, &usage);
    run.log_completion(&envelope, choices[0].text.raw(), choices[0].finish_reason(), &usage);
    // `echo` with several choices: every choice repeats the prompt (and its log-probabilities).
    let prompt_lp = choices.iter().map(|c| c.prompt_logprobs.clone()).find(|p| !p.is_empty()).unwrap_or_default();
    let body = match envelope.kind {
        Kind::Chat => serde_json::to_value(ChatCompletionResponse {
            id: envelope.id,
            object: "chat.completion".into(),
            created: envelope.created,
            model: envelope.model,
            choices: choices
                .iter()
                .enumerate()
                .map(|(index, c)| {
                    let (content, tool_calls) = join(&c.pieces);
                    let content = if tool_calls.is_empty() { Some(content.unwrap_or_default()) } else { content };
                    ChatChoice {
                        index,
                        message: AssistantMessage { role: "assistant".into(), content, tool_calls },
                        finish_reason: c.finish_reason().into(),
                        logprobs: (shape.logprobs == LogprobFormat::Chat)
                            .then(|| json!({"content": chat_logprobs(&c.logprobs), "refusal": null})),
                    }
                })
                .collect(),
            usage,
            system_fingerprint: FINGERPRINT.into(),
        }),
        Kind::Text => serde_json::to_value(CompletionResponse {
            id: envelope.id,
            object: "text_completion".into(),
            created: envelope.created,
            model: envelope.model,
            choices: choices
                .iter()
                .enumerate()
                .map(|(index, c)| {
                    let (content, _) = join(&c.pieces);
                    let echo = shape.echo.clone().unwrap_or_default();
                    let logprobs = (shape.logprobs == LogprobFormat::Text).then(|| {
                        let mut all = if shape.echo.is_some() { prompt_lp.clone() } else { Vec::new() };
                        all.extend(c.logprobs.iter().cloned());
                        text_logprobs(&all, 0)
                    });
                    CompletionChoice {
                        index,
                        text: format!("{echo}{}", content.unwrap_or_default()),
                        finish_reason: Some(c.finish_reason().into()),
                        logprobs,
                    }
                })
                .collect(),
            usage: Some(usage),
            system_fingerprint: FINGERPRINT.into(),
        }),
    };
    let body = body.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(body))
}

/// A chunk's delta for the pieces of one event.
fn chunk_delta(pieces: &[Piece], role: bool) -> ChunkDelta {
    let mut delta = ChunkDelta { role: role.then(|| "assistant".into()), ..ChunkDelta::default() };
    for p in pieces {
        match p {
            Piece::Content(t) => delta.content.get_or_insert_with(String::new).push_str(t),
            Piece::Call { index, id, name, arguments } => delta.tool_calls.push(ToolCallDelta {
                index: *index,
                id: Some(id.clone()),
                kind: Some("function".into()),
                function: FunctionCallDelta { name: Some(name.clone()), arguments: Some(arguments.clone()) },
            }),
            Piece::Arguments { index, delta: d } => delta.tool_calls.push(ToolCallDelta {
                index: *index,
                id: None,
                kind: None,
                function: FunctionCallDelta { name: None, arguments: Some(d.clone()) },
            }),
        }
    }
    delta
}

struct Sse {
    envelope: Envelope,
    run: Running,
    shape: AnswerShape,
    include_usage: bool,
    events: futures::stream::BoxStream<'static, (usize, Event)>,
    choices: Vec<ChoiceRun>,
    left: usize,
    /// Frames to send before reading more events, in order.
    queue: std::collections::VecDeque<String>,
    started: bool,
    done: bool,
    last: Option<Instant>,
}

impl Sse {
    fn frame<T: serde::Serialize>(value: &T) -> String {
        sse_text(&serde_json::to_string(value).unwrap_or_default())
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        Self::frame(&ChatCompletionChunk {
            id: self.envelope.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.envelope.created,
            model: self.envelope.model.clone(),
            choices,
            usage,
            system_fingerprint: FINGERPRINT.into(),
        })
    }

    fn text_chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        Self::frame(&CompletionResponse {
            id: self.envelope.id.clone(),
            object: "text_completion".into(),
            created: self.envelope.created,
            model: self.envelope.model.clone(),
            choices,
            usage,
            system_fingerprint: FINGERPRINT.into(),
        })
    }

    /// The opening frames: chat's role chunk per choice; completions' echoed prompt.
    fn open(&mut self) {
        for index in 0..self.choices.len() {
            let frame = match self.envelope.kind {
                Kind::Chat => self.chat_chunk(
                    vec![ChatChunkChoice {
                        index,
                        delta: ChunkDelta {
                            role: Some("assistant".into()),
                            content: Some(String::new()),
                            ..Default::default()
                        },
                        finish_reason: None,
                        logprobs: None,
                    }],
                    None,
                ),
                Kind::Text => match &self.shape.echo {
                    // The prompt goes out with the first token's log-probabilities, once known.
                    Some(_) if self.shape.logprobs == LogprobFormat::Text => continue,
                    Some(echo) => {
                        self.choices[index].sent_len = echo.len();
                        self.text_chunk(
                            vec![CompletionChoice { index, text: echo.clone(), finish_reason: None, logprobs: None }],
                            None,
                        )
                    }
                    None => continue,
                },
            };
            self.queue.push_back(frame);
        }
    }

    /// Frames for `pieces` of choice `index` (with the log-probabilities not sent yet).
    fn pieces(&mut self, index: usize, pieces: Vec<Piece>, finish: Option<&'static str>) {
        if pieces.is_empty() && finish.is_none() {
            return;
        }
        let unsent = std::mem::take(&mut self.choices[index].unsent);
        let frame = match self.envelope.kind {
            Kind::Chat => {
                let logprobs = (self.shape.logprobs == LogprobFormat::Chat && (!unsent.is_empty() || finish.is_none()))
                    .then(|| json!({"content": chat_logprobs(&unsent), "refusal": null}));
                let delta = chunk_delta(&pieces, false);
                self.chat_chunk(
                    vec![ChatChunkChoice { index, delta, finish_reason: finish.map(str::to_owned), logprobs }],
                    None,
                )
            }
            Kind::Text => {
                let (content, _) = join(&pieces);
                let mut text = content.unwrap_or_default();
                let mut lps = unsent;
                let c = &mut self.choices[index];
                // The echoed prompt leads the first frame when its log-probabilities go with it.
                if let (Some(echo), LogprobFormat::Text) = (&self.shape.echo, self.shape.logprobs) {
                    if !c.prompt_logprobs.is_empty() {
                        let mut all = std::mem::take(&mut c.prompt_logprobs);
                        all.append(&mut lps);
                        lps = all;
                        text = format!("{echo}{text}");
                    }
                }
                let logprobs = (self.shape.logprobs == LogprobFormat::Text).then(|| text_logprobs(&lps, c.sent_len));
                c.sent_len += text.len();
                self.text_chunk(
                    vec![CompletionChoice { index, text, finish_reason: finish.map(str::to_owned), logprobs }],
                    None,
                )
            }
        };
        self.queue.push_back(frame);
    }

    fn on_event(&mut self, index: usize, event: Event) -> Result<(), String> {
        match event {
            Event::Delta(d) if d.is_empty() => {}
            Event::Delta(d) => {
                let now = Instant::now();
                match self.last {
                    None => self.run.first_token(),
                    Some(prev) => self.run.metrics.inter_token_latency.observe((now - prev).as_secs_f64()),
                }
                self.last = Some(now);
                let pieces = self.choices[index].text.delta(&d);
                self.pieces(index, pieces, None);
            }
            Event::Logprob(t) => {
                self.choices[index].logprobs.push(t.clone());
                self.choices[index].unsent.push(t);
            }
            // The engine sends the prompt's log-probabilities once (with choice 0); every
            // choice echoes the prompt.
            Event::PromptLogprobs(p) => {
                if self.shape.echo.is_some() {
                    for c in &mut self.choices {
                        c.prompt_logprobs = p.clone();
                    }
                }
            }
            Event::Finished { reason, completion_tokens, cached_tokens } => {
                let pieces = self.choices[index].text.finish();
                self.choices[index].finish = Some((reason, completion_tokens, cached_tokens));
                let finish = self.choices[index].finish_reason();
                if self.envelope.kind == Kind::Chat && !pieces.is_empty() {
                    self.pieces(index, pieces, None);
                    self.pieces(index, Vec::new(), Some(finish));
                } else {
                    self.pieces(index, pieces, Some(finish));
                }
                self.left -= 1;
                if self.left == 0 {
                    let usage = usage_of(&self.run, &self.choices);
                    count_tokens(&self.run, &usage);
                    let c = &self.choices[0];
                    self.run.log_completion(&self.envelope, c.text.raw(), c.finish_reason(), &usage);
                    if self.include_usage {
                        let frame = match self.envelope.kind {
                            Kind::Chat => self.chat_chunk(Vec::new(), Some(usage)),
                            Kind::Text => self.text_chunk(Vec::new(), Some(usage)),
                        };
                        self.queue.push_back(frame);
                    }
                    self.queue.push_back("data: [DONE]\n\n".to_owned());
                    self.done = true;
                }
            }
            Event::Failed(msg) => {
                self.run.failed();
                return Err(msg);
            }
        }
        Ok(())
    }
}

/// Streams every choice as server-sent events ending with `data: [DONE]`. When the client
/// goes away actix drops this stream, which drops the generations and cancels them.
pub fn streamed(envelope: Envelope, mut run: Running, shape: AnswerShape, include_usage: bool) -> HttpResponse {
    let n = shape.n.max(1);
    let events = merged(&mut run);
    let choices = (0..n).map(|_| ChoiceRun::new(shape.tools.clone())).collect();
    let state = Sse {
        envelope,
        run,
        shape,
        include_usage,
        events,
        choices,
        left: n,
        queue: Default::default(),
        started: false,
        done: false,
        last: None,
    };
    let body = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(frame) = s.queue.pop_front() {
                return Some((Ok::<_, actix_web::Error>(Bytes::from(frame)), s));
            }
            if s.done {
                return None;
            }
            if !s.started {
                s.started = true;
                s.open();
                continue;
            }
            let failure = match s.events.next().await {
                Some((index, event)) => s.on_event(index, event).err(),
                None => Some("the engine ended the generation without finishing it".to_owned()),
            };
            if let Some(msg) = failure {
                tracing::error!(error = %msg, "generation failed mid-stream");
                s.done = true;
                let err = ApiError::Internal(msg);
                return Some((Ok(sse(&serde_json::to_string(&err.body()).unwrap_or_default())), s));
            }
        }
    });
    sse_response(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: Option<ToolMode>, deltas: &[&str]) -> (Option<String>, Vec<ToolCall>) {
        let mut t = ChoiceText::new(mode);
        let mut pieces = Vec::new();
        for d in deltas {
            pieces.extend(t.delta(d));
        }
        pieces.extend(t.finish());
        join(&pieces)
    }

    #[test]
    fn auto_streams_plain_text_and_parses_calls() {
        let names = vec!["get_weather".to_owned()];
        let (content, calls) = run(Some(ToolMode::Auto { names: names.clone() }), &["Hel", "lo"]);
        assert_eq!((content.as_deref(), calls.len()), (Some("Hello"), 0));
        let (content, calls) = run(
            Some(ToolMode::Auto { names: names.clone() }),
            &["<tool", "_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>"],
        );
        assert_eq!(content, None);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Oslo"}"#);
        // An unknown function is text, not a call.
        let (content, calls) =
            run(Some(ToolMode::Auto { names: names.clone() }), &["<tool_call>{\"name\": \"x\"}</tool_call>"]);
        assert!(calls.is_empty() && content.is_some());
        // A bare JSON call (Llama 3.1's own format) is a call too; other JSON is content.
        let (_, calls) = run(
            Some(ToolMode::Auto { names: names.clone() }),
            &[r#"{"name": "get_weather", "parameters": {"city": "Oslo"}}"#],
        );
        assert_eq!(calls[0].function.arguments, r#"{"city":"Oslo"}"#);
        let (content, calls) = run(Some(ToolMode::Auto { names }), &[r#"{"answer": 4}"#]);
        assert!(calls.is_empty() && content.as_deref() == Some(r#"{"answer": 4}"#));
    }

    #[test]
    fn named_streams_arguments_and_required_parses_a_list() {
        let (_, calls) = run(Some(ToolMode::Named("f".into())), &["{\"a\"", ":1}"]);
        assert_eq!((calls[0].function.name.as_str(), calls[0].function.arguments.as_str()), ("f", "{\"a\":1}"));
        let (_, calls) =
            run(Some(ToolMode::Required), &[r#"[{"name":"f","arguments":{"a":1}},{"name":"g","arguments":{}}]"#]);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].function.name, "g");
    }

    #[test]
    fn text_logprobs_offsets_follow_the_text() {
        let t = |s: &str, lp: Option<f32>| TokenLogprob {
            token: 0,
            bytes: s.as_bytes().to_vec(),
            logprob: lp,
            top: vec![],
        };
        let v = text_logprobs(&[t("Hi", None), t(" there", Some(-0.5))], 0);
        assert_eq!(v["text_offset"], json!([0, 2]));
        assert_eq!(v["token_logprobs"], json!([null, -0.5]));
    }
}
