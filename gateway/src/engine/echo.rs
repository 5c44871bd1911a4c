//! The echo engine: no model, answers at once with the prompt's last message, one word per
//! token. It exists to measure the gateway's own cost (auth, limits, routing, JSON, SSE) with
//! the model taken out of the picture, and to try clients against a server that needs no
//! weights.

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    fit_to_context, Engine, EngineError, Event, FinishReason, Generation, GenerationRequest, ModelInfo, Prompt,
};

pub struct EchoEngine {
    info: ModelInfo,
}

impl EchoEngine {
    pub fn new(id: String, context_len: Option<usize>) -> Self {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { info: ModelInfo { id, context_len: context_len.unwrap_or(4096), created } }
    }

    fn words(prompt: &Prompt) -> Vec<String> {
        let text = match prompt {
            Prompt::Chat(messages) => messages.last().map(|m| m.content.as_str()).unwrap_or_default(),
            Prompt::Text(t) => t.as_str(),
        };
        text.split_whitespace().map(str::to_owned).collect()
    }
}

#[async_trait]
impl Engine for EchoEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// One token per whitespace-separated word of the whole prompt.
    async fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let count = match prompt {
            Prompt::Chat(messages) => messages.iter().map(|m| m.content.split_whitespace().count() + 1).sum(),
            Prompt::Text(t) => t.split_whitespace().count(),
        };
        Ok((0..count as u32).collect())
    }

    async fn generate(&self, request: GenerationRequest) -> Result<Generation, EngineError> {
        if request.adapter.is_some() {
            return Err(EngineError::AdaptersUnsupported);
        }
        super::only_plain(&request.sampling)?;
        let prompt_tokens = self.tokenize(&request.prompt).await?.len().max(1);
        let budget = fit_to_context(prompt_tokens, request.max_tokens, self.info.context_len)?;
        let words = Self::words(&request.prompt);
        let (events, rx) = mpsc::unbounded_channel();
        let take = words.len().min(budget);
        for (i, w) in words.iter().take(take).enumerate() {
            let _ = events.send(Event::Delta(if i == 0 { w.clone() } else { format!(" {w}") }));
        }
        let reason = if take < words.len() { FinishReason::Length } else { FinishReason::Stop };
        let _ = events.send(Event::Finished { reason, completion_tokens: take, cached_tokens: 0 });
        Ok(Generation { prompt_tokens, events: rx })
    }
}
