//! The `Engine` trait: validated generation requests in, a stream of text events out.
//!
//! Handlers never talk to a backend directly; they hold `Arc<dyn Engine>`. Dropping a
//! [`Generation`] is the cancel: the backend notices the closed channel and frees the slot.

pub mod candle;
pub mod echo;
pub mod grammar;
pub mod mistral;
pub mod sampling;
pub mod stop;

use std::fmt;
use std::sync::Arc;

use adapters::BaseModelShape;
use runtime::lora::AdapterWeights;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Chat messages, rendered with the model's own chat template and a generation prompt.
    Chat(Vec<Message>),
    /// Raw text, tokenized as it is.
    Text(String),
}

/// Who speaks a chat message (shared with the chat template and training).
pub use runtime::llama::Role;

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// Sampling settings after validation; every value is in range.
/// The default is greedy with no stop sequences and no penalties.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    /// `None` or `Some(0.0)` means greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub ignore_eos: bool,
    /// Constrained decoding: the answer matches this grammar.
    pub grammar: Option<grammar::Grammar>,
    /// `Some(k)`: each sampled token's log-probability and the `k` most likely tokens
    /// ([`Event::Logprob`]).
    pub logprobs: Option<usize>,
    /// The prompt's own log-probabilities ([`Event::PromptLogprobs`], OpenAI's `echo`).
    pub prompt_logprobs: bool,
    /// A shadow row: it runs (prompt and decode) only in engine steps with no served work,
    /// so it never slows a served stream; it waits while served rows run.
    pub background: bool,
}

impl Sampling {
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_none_or(|t| t == 0.0)
    }
}

/// An adapter version resolved at admission; the request keeps it to its last token.
#[derive(Clone)]
pub struct AdapterHandle {
    pub name: String,
    pub version: u64,
    pub weights: Arc<AdapterWeights>,
}

impl fmt::Debug for AdapterHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// A request that passed validation; engines accept nothing else.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    /// `None`: the base model alone.
    pub adapter: Option<AdapterHandle>,
    /// `None`: generate until end of sequence or the context is full.
    pub max_tokens: Option<usize>,
    pub sampling: Sampling,
    /// The conversation and tools as OpenAI sent them, for a model whose chat template has its
    /// own tool format; engines whose template has none read `prompt` (the documented format).
    pub tools: Option<NativeTools>,
}

/// OpenAI-shaped `messages` (with `tool_calls` and `tool` turns) and `tools`, for a chat
/// template's own tool format, and each tool's parameters as a grammar: when nothing
/// constrains the answer (`tool_choice: "auto"`) they are still compiled, so that a schema
/// the grammar engine cannot read is refused like a forced one.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeTools {
    pub messages: serde_json::Value,
    pub tools: serde_json::Value,
    pub schemas: Vec<grammar::Grammar>,
}

/// Fixed continuations to score after one prompt (label scoring for classification): each
/// continuation is the assistant's whole answer, so its end-of-turn token is scored too.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    pub prompt: Prompt,
    pub adapter: Option<AdapterHandle>,
    pub continuations: Vec<String>,
}

/// What [`Engine::score`] found: per continuation, the summed log-probability of its tokens
/// (end of turn included) and how many tokens that was.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub prompt_tokens: usize,
    pub logprobs: Vec<f64>,
    pub tokens: Vec<usize>,
}

/// A token's log-probability under the logits the sampler saw (after penalties, before the
/// grammar's mask and the temperature), with the `k` most likely tokens at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    /// The token's bytes (a piece of a UTF-8 character stays a piece).
    pub bytes: Vec<u8>,
    /// `None` only for a prompt's first token, which nothing predicts.
    pub logprob: Option<f32>,
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One step of a running generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (may be empty when a token completes no character).
    Delta(String),
    /// The token just sampled, sent before its text (only when `logprobs` asked for it).
    Logprob(TokenLogprob),
    /// Every prompt token, sent once before the first sampled token (only when
    /// `prompt_logprobs` asked for it).
    PromptLogprobs(Vec<TokenLogprob>),
    /// The last event of a successful generation.
    /// `cached_tokens`: prompt tokens whose keys and values came from the prefix cache
    /// rather than being computed.
    Finished { reason: FinishReason, completion_tokens: usize, cached_tokens: usize },
    /// The generation failed after it started; no event follows.
    Failed(String),
}

/// A started generation. Dropping it cancels the work.
pub struct Generation {
    pub prompt_tokens: usize,
    pub events: mpsc::UnboundedReceiver<Event>,
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generation").field("prompt_tokens", &self.prompt_tokens).finish()
    }
}

/// Static facts about the model an engine serves.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub context_len: usize,
    pub created: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("prompt has {prompt_tokens} tokens, more than the model's context of {context_len}")]
    PromptTooLong { prompt_tokens: usize, context_len: usize },
    #[error(
        "max_tokens {max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the model's context of {context_len}"
    )]
    MaxTokensTooLarge { max_tokens: usize, prompt_tokens: usize, context_len: usize },
    #[error("the prompt could not be rendered: {0}")]
    BadPrompt(String),
    #[error("the engine failed: {0}")]
    Backend(String),
    #[error("this engine cannot apply LoRA adapters; serve the base with --engine candle")]
    AdaptersUnsupported,
    #[error("this engine cannot score labels; serve the model with --engine candle")]
    ScoringUnsupported,
    #[error("{param} cannot be used: {message}")]
    BadGrammar { param: String, message: String },
    #[error("{0} needs the candle engine; serve the model with --engine candle")]
    Unsupported(&'static str),
    #[error("the engine is shutting down")]
    Closed,
}

#[async_trait]
pub trait Engine: Send + Sync + 'static {
    fn info(&self) -> &ModelInfo;

    /// The shape LoRA adapters must have to run on this engine; `None` when it serves none.
    fn adapter_shape(&self) -> Option<&BaseModelShape> {
        None
    }

    /// Token ids of a prompt exactly as `generate` would feed them to the model.
    async fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError>;

    /// Admit a request: check it against the context, then start generating.
    async fn generate(&self, request: GenerationRequest) -> Result<Generation, EngineError>;

    /// `n` answers to one request (OpenAI's `n`), choice `i` seeded by [`choice_seed`]. This
    /// default runs `n` generations; the candle engine computes the prompt once.
    async fn generate_n(&self, request: GenerationRequest, n: usize) -> Result<Vec<Generation>, EngineError> {
        let seed = request.sampling.seed.unwrap_or_else(rand::random);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut one = request.clone();
            one.sampling.seed = Some(choice_seed(seed, i));
            out.push(self.generate(one).await?);
        }
        Ok(out)
    }

    /// Scores each continuation after the prompt, computing the prompt's keys and values once
    /// for all of them.
    async fn score(&self, request: ScoreRequest) -> Result<Scores, EngineError> {
        let _ = request;
        Err(EngineError::ScoringUnsupported)
    }
}

/// The seed of choice `i` of a request seeded with `seed`: choice 0 keeps the request's own
/// seed, so `n: 1` and `n: 4` start the same.
pub fn choice_seed(seed: u64, i: usize) -> u64 {
    if i == 0 {
        seed
    } else {
        seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
    }
}

/// Refuses what only the candle engine serves (grammars, log-probabilities).
pub fn only_plain(sampling: &Sampling) -> Result<(), EngineError> {
    if sampling.grammar.is_some() {
        return Err(EngineError::Unsupported("structured output (response_format, guided_*, tool_choice)"));
    }
    if sampling.logprobs.is_some() || sampling.prompt_logprobs {
        return Err(EngineError::Unsupported("logprobs"));
    }
    Ok(())
}

/// Checks a prompt and completion budget against the context; returns the budget to use.
pub fn fit_to_context(
    prompt_tokens: usize,
    max_tokens: Option<usize>,
    context_len: usize,
) -> Result<usize, EngineError> {
    if prompt_tokens >= context_len {
        return Err(EngineError::PromptTooLong { prompt_tokens, context_len });
    }
    let room = context_len - prompt_tokens;
    match max_tokens {
        None => Ok(room),
        Some(m) if m <= room => Ok(m),
        Some(max_tokens) => Err(EngineError::MaxTokensTooLarge { max_tokens, prompt_tokens, context_len }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_defaults_to_the_room_left() {
        assert_eq!(fit_to_context(10, None, 100).unwrap(), 90);
        assert_eq!(fit_to_context(10, Some(90), 100).unwrap(), 90);
    }

    #[test]
    fn budget_past_the_context_is_refused() {
        assert!(matches!(
            fit_to_context(10, Some(91), 100),
            Err(EngineError::MaxTokensTooLarge { max_tokens: 91, .. })
        ));
        assert!(matches!(fit_to_context(100, None, 100), Err(EngineError::PromptTooLong { .. })));
    }
}
