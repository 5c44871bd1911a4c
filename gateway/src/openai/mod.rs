//! OpenAI wire types: exactly what goes over HTTP, kept apart from the engine's domain types.
//!
//! Requests keep unknown fields in `extra` so validation can reject them by name (OpenAI answers
//! "Unrecognized request argument" rather than silently ignoring a parameter).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// `stop`: a single string or a list of strings.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StopParam {
    One(String),
    Many(Vec<String>),
}

/// Message content: a plain string or a list of typed parts (only `text` parts are served).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's calls (sent back in the next request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// One function call the model made.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema, PartialEq)]
pub struct ToolCall {
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON text (valid against the function's `parameters` when the
    /// call was forced by `tool_choice`).
    pub arguments: String,
}

/// A piece of a streamed tool call: the first piece of a call carries its `id` and name,
/// later ones more of `arguments`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct FunctionCallDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by chat and text completions.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct SamplingFields {
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopParam>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// vLLM extension: keep generating past the end-of-sequence token.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Accepted and ignored, as OpenAI does for end-user ids.
    #[serde(default)]
    pub user: Option<String>,
    /// vLLM extension: the answer is JSON valid against this schema (an object, or a string
    /// holding one).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub guided_json: Option<Value>,
    /// vLLM extension: the answer matches this regular expression.
    #[serde(default)]
    pub guided_regex: Option<Value>,
    /// vLLM extension: the answer is exactly one of these strings.
    #[serde(default)]
    #[schema(value_type = Option<Vec<String>>)]
    pub guided_choice: Option<Value>,
    /// vLLM extension: the answer matches this Lark grammar (llguidance's dialect).
    #[serde(default)]
    pub guided_grammar: Option<Value>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    /// {"name", "schema", "strict"}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// Function tools: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// `none`, `auto` (the default with tools), `required`, or `{"type": "function",
    /// "function": {"name"}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// With `required`: whether the model may call several functions (default true).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Return each answer token's log-probability.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`: the 0 to 20 most likely tokens at each position.
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    /// 0 to 5: each token's log-probability and that many most likely tokens.
    #[serde(default)]
    pub logprobs: Option<i64>,
    /// Return the prompt before the completion (with `logprobs`, the prompt's too).
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// As OpenAI reports it: how many prompt tokens were served from the prompt (prefix)
    /// cache instead of being computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }

    /// With `prompt_tokens_details.cached_tokens`, as generations report it.
    pub fn with_cached(self, cached_tokens: usize) -> Self {
        Self { prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }), ..self }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    /// `null` when the answer is tool calls.
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub finish_reason: String,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
}

/// Non-streamed chat answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub system_fingerprint: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChunkDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChunkDelta,
    pub finish_reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
}

/// One `data:` event of a streamed chat answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    pub system_fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub finish_reason: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
}

/// Non-streamed text completion, and (with `usage` absent until the end) each streamed event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    pub system_fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// Longest prompt plus completion, in tokens; for an embedding model, the most tokens of
    /// one input (longer inputs are cut).
    pub max_model_len: usize,
    /// What the model serves: `chat` (chat and text completions) or `embedding`
    /// (`/v1/embeddings`).
    pub kind: ModelKind,
    /// For an adapter: the base model it runs on (vLLM's field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For an adapter: the version this name resolves to now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Chat,
    Embedding,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// vLLM-compatible `POST /tokenize` body: either `prompt` or `messages`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct TokenizeRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

/// The body of every error answer, `{"error": {...}}`; `protocol`'s, because the sidecar reads it too.
pub use protocol::api::{ErrorDetail, ErrorResponse};

/// Most inputs one `POST /v1/embeddings` may carry (OpenAI's own limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// `POST /v1/embeddings` body.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[schema(example = json!({"model": "all-MiniLM-L6-v2", "input": ["How do I reset my password?", "Refund policy"]}))]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    /// `float` (the default) or `base64`: each vector's little-endian f32 bytes, base64-encoded.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Refused: the served models have a fixed width.
    #[serde(default)]
    #[schema(value_type = Option<i64>)]
    pub dimensions: Option<Value>,
    /// Accepted and ignored, as OpenAI does for end-user ids.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

/// `input`: a string, a list of strings, a list of token ids, or a list of token-id lists.
/// Token ids are the model's word pieces without `[CLS]`/`[SEP]`, which the server adds.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

impl<'de> Deserialize<'de> for EmbeddingInput {
    /// By hand rather than `untagged`, so that a wrong element is named (`input[3]`) instead
    /// of "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let id = |v: &Value, at: String| -> Result<u32, D::Error> {
            v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                D::Error::custom(format!("{at} must be a token id (an integer from 0 to {}), got {v}", u32::MAX))
            })
        };
        let expected = "a string, a list of strings, a list of token ids, or a list of token-id lists";
        match Value::deserialize(d)? {
            Value::String(s) => Ok(EmbeddingInput::Text(s)),
            Value::Array(items) => match items.first() {
                None => Ok(EmbeddingInput::Texts(Vec::new())),
                Some(Value::String(_)) => items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok(s),
                        other => Err(D::Error::custom(format!(
                            "input[{i}] must be a string like the items before it, got {other}"
                        ))),
                    })
                    .collect::<Result<_, _>>()
                    .map(EmbeddingInput::Texts),
                Some(Value::Number(_)) => items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| id(v, format!("input[{i}]")))
                    .collect::<Result<_, _>>()
                    .map(EmbeddingInput::Tokens),
                Some(Value::Array(_)) => items
                    .iter()
                    .enumerate()
                    .map(|(i, list)| match list {
                        Value::Array(ids) => {
                            ids.iter().enumerate().map(|(j, v)| id(v, format!("input[{i}][{j}]"))).collect()
                        }
                        other => Err(D::Error::custom(format!("input[{i}] must be a list of token ids, got {other}"))),
                    })
                    .collect::<Result<_, _>>()
                    .map(EmbeddingInput::TokenLists),
                Some(other) => Err(D::Error::custom(format!("input[0] must be a string or a token id, got {other}"))),
            },
            other => Err(D::Error::custom(format!("input must be {expected}, got {other}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// One vector: a list of floats, or with `encoding_format: base64` its little-endian f32 bytes
/// in base64.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

impl EmbeddingVector {
    /// The vector as OpenAI's `encoding_format: base64` sends it: little-endian f32 bytes.
    pub fn base64(vector: &[f32]) -> Self {
        use base64::Engine as _;
        let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
        EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Embedding {
    /// Always `embedding`.
    pub object: String,
    /// The input's position in the request.
    pub index: usize,
    pub embedding: EmbeddingVector,
    /// Present (and `true`) when the input was longer than the model's `max_model_len` tokens
    /// and its end was cut off before embedding, as sentence-transformers does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct EmbeddingUsage {
    /// Tokens the model ran, `[CLS]` and `[SEP]` included, after truncation.
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// `POST /v1/embeddings` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}
