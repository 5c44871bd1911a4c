//! Parse, don't validate: OpenAI wire requests become `GenerationRequest`s (and embedding
//! requests `ValidatedEmbeddings`) once, here.

use serde_json::{Map, Value};

use crate::engine::{GenerationRequest, Message, Prompt, Role, Sampling};
use crate::error::ApiError;
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, EmbeddingInput, EmbeddingRequest, EncodingFormat, MessageContent,
    SamplingFields, StopParam, MAX_EMBEDDING_INPUTS,
};

/// OpenAI allows at most this many stop sequences.
const MAX_STOPS: usize = 4;

/// A validated request plus the response options that do not reach the engine.
#[derive(Debug, Clone)]
pub struct Validated {
    pub model: String,
    pub generation: GenerationRequest,
    pub stream: bool,
    pub include_usage: bool,
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
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].role"),
                    format!("role '{}' is not supported: this server does not run tools", m.role),
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role '{other}' is not one of system, developer, user, assistant"),
                    Some(format!("messages[{i}].role")),
                ))
            }
        };
        let content = match m.content {
            Some(MessageContent::Text(t)) => t,
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
                text
            }
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content is required"),
                    Some(format!("messages[{i}].content")),
                ))
            }
        };
        messages.push(Message { role, content });
    }
    let max_tokens = match (req.max_completion_tokens, req.sampling.max_tokens) {
        (Some(m), _) => Some(("max_completion_tokens", m)),
        (None, Some(m)) => Some(("max_tokens", m)),
        (None, None) => None,
    };
    finish(req.model, Prompt::Chat(messages), max_tokens, req.sampling, limits)
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
    finish(req.model, Prompt::Text(prompt), max_tokens, req.sampling, limits)
}

fn finish(
    model: String,
    prompt: Prompt,
    max_tokens: Option<(&str, i64)>,
    s: SamplingFields,
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
        if n != 1 {
            return Err(ApiError::unsupported("n", format!("n must be 1 (got {n}): one choice per request")));
        }
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
            sampling: Sampling {
                temperature,
                top_p,
                seed: s.seed.map(|v| v as u64),
                stop,
                frequency_penalty: frequency_penalty.map(|v| v as f32),
                presence_penalty: presence_penalty.map(|v| v as f32),
                ignore_eos: s.ignore_eos.unwrap_or(false),
            },
        },
        stream,
        include_usage: s.stream_options.is_some_and(|o| o.include_usage),
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
    for (key, value) in extra {
        let harmless = match key.as_str() {
            "store" | "metadata" | "service_tier" | "parallel_tool_calls" => true,
            "logprobs" => value.is_null() || value == &Value::Bool(false),
            "top_logprobs" => value.is_null(),
            "logit_bias" => value.is_null() || value.as_object().is_some_and(Map::is_empty),
            "response_format" => value.is_null() || value.get("type").and_then(Value::as_str) == Some("text"),
            "tools" | "functions" => value.is_null() || value.as_array().is_some_and(Vec::is_empty),
            "tool_choice" | "function_call" => value.is_null() || value == "none",
            "echo" if legacy => value.is_null() || value == &Value::Bool(false),
            "best_of" if legacy => value.is_null() || value == 1,
            "suffix" if legacy => value.is_null(),
            "audio" | "modalities" | "prediction" | "reasoning_effort" | "web_search_options" => false,
            _ => {
                return Err(ApiError::InvalidRequest {
                    message: format!("Unrecognized request argument supplied: {key}"),
                    param: Some(key.clone()),
                    code: "unknown_parameter",
                })
            }
        };
        if !harmless {
            return Err(ApiError::unsupported(key, format!("parameter '{key}' with this value is not supported")));
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
        return Err(ApiError::InvalidRequest {
            message: format!("Unrecognized request argument supplied: {key}"),
            param: Some(key.clone()),
            code: "unknown_parameter",
        });
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
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"n":2}), "n"),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}), "temperature"),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}), "tools"),
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
