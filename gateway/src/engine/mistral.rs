//! The mistralrs backend: loads a local GGUF file or HF directory and streams generations.
//!
//! Prompts are rendered and tokenized once, then submitted as token ids, so the prompt the
//! context check saw is exactly the prompt the model runs. A logits processor counts sampled
//! tokens (true completion counts), applies per-request seeded sampling and `ignore_eos`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use candle_core::{Result as CandleResult, Tensor};
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, Model, ModelDType, NormalRequest, Request, RequestMessage,
    Response, SamplingParams, TextMessageRole, TextMessages, TextModelBuilder, TokenSource,
};
use tokio::sync::mpsc;

use super::sampling::choose;
use super::stop::StopFilter;
use super::{
    fit_to_context, Engine, EngineError, Event, FinishReason, Generation, GenerationRequest, ModelInfo, Prompt, Role,
    Sampling,
};

/// Context used when the model does not declare one.
const FALLBACK_CONTEXT: usize = 2048;

pub struct MistralEngine {
    model: Model,
    info: ModelInfo,
    eos_tokens: Vec<u32>,
}

/// Where the weights come from, decided from what is on disk.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Gguf { dir: PathBuf, file: String },
    HfDir(PathBuf),
}

impl ModelSource {
    /// Inspects `path`; a message naming the path when it is not a usable model.
    pub fn detect(path: &Path) -> Result<Self, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("model path {} cannot be read: {e}", path.display()))?;
        if meta.is_file() {
            std::fs::File::open(path).map_err(|e| format!("model file {} cannot be opened: {e}", path.display()))?;
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .ok_or_else(|| format!("model file {} has no usable name", path.display()))?
                .to_owned();
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
            let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
            return Ok(ModelSource::Gguf { dir, file });
        }
        for needed in ["config.json", "tokenizer.json"] {
            if !path.join(needed).is_file() {
                return Err(format!(
                    "model directory {} has no {needed} (expected an HF layout: config.json, *.safetensors, tokenizer.json)",
                    path.display()
                ));
            }
        }
        Ok(ModelSource::HfDir(path.to_path_buf()))
    }
}

impl MistralEngine {
    /// Loads the model; fails with a message that names the path.
    pub async fn load(path: &Path, id: String, max_seqs: usize, context_cap: Option<usize>) -> anyhow::Result<Self> {
        let source = ModelSource::detect(path).map_err(anyhow::Error::msg)?;
        let model = match &source {
            ModelSource::Gguf { dir, file } => {
                GgufModelBuilder::new(dir.to_string_lossy(), vec![file.clone()])
                    .with_token_source(TokenSource::None)
                    .with_force_cpu()
                    .with_max_num_seqs(max_seqs)
                    .build()
                    .await
            }
            ModelSource::HfDir(dir) => {
                TextModelBuilder::new(dir.to_string_lossy())
                    .with_token_source(TokenSource::None)
                    .with_dtype(ModelDType::F32)
                    .with_force_cpu()
                    .with_max_num_seqs(max_seqs)
                    .build()
                    .await
            }
        }
        .map_err(|e| anyhow::anyhow!("loading model {} failed: {e:#}", path.display()))?;

        let declared = model.max_sequence_length().ok().flatten().unwrap_or(FALLBACK_CONTEXT);
        let context_len = context_cap.map_or(declared, |cap| cap.min(declared));
        let eos_tokens = end_of_sequence_ids(&model).await;
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(Self { model, info: ModelInfo { id, context_len, created }, eos_tokens })
    }

    fn sampling_params(&self, sampling: &Sampling, max_len: usize) -> SamplingParams {
        let mut params = SamplingParams::deterministic();
        params.max_len = Some(max_len);
        params.frequency_penalty = sampling.frequency_penalty;
        params.presence_penalty = sampling.presence_penalty;
        if !sampling.stop.is_empty() {
            params.stop_toks = Some(mistralrs::StopTokens::Seqs(sampling.stop.clone()));
        }
        // Sampling proper happens in our processor (seeded, reproducible); mistralrs then takes
        // the argmax of the one-hot logits it returns.
        params
    }
}

/// Per-request logits processor: counts steps, and picks the token with the same sampler the
/// candle engine uses (EOS ban, seed); mistralrs then takes the argmax of the one-hot result.
struct StepProcessor {
    steps: Arc<AtomicUsize>,
    ban: Vec<u32>,
    /// Penalties cleared: mistralrs applies them before calling processors.
    sampling: Sampling,
    seed: u64,
}

impl CustomLogitsProcessor for StepProcessor {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> CandleResult<Tensor> {
        self.steps.fetch_add(1, Ordering::Relaxed);
        if self.ban.is_empty() && self.sampling.is_greedy() {
            return Ok(logits.clone());
        }
        let shape = logits.shape().clone();
        let mut values = logits.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let chosen = choose(&mut values, &self.sampling, self.seed, context.len(), &HashMap::new(), &self.ban);
        for (i, v) in values.iter_mut().enumerate() {
            *v = if i == chosen as usize { 0.0 } else { f32::NEG_INFINITY };
        }
        Tensor::from_vec(values, shape, logits.device())?.to_dtype(logits.dtype())
    }
}

/// mistralrs does not expose its EOS ids, so find the usual end markers that the vocabulary
/// holds as single tokens.
async fn end_of_sequence_ids(model: &Model) -> Vec<u32> {
    const MARKERS: [&str; 6] =
        ["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>"];
    let mut ids = Vec::new();
    for marker in MARKERS {
        if let Ok(t) = model.tokenize(either::Either::Right(marker.to_owned()), None, false, false, None).await {
            if let [id] = t.as_slice() {
                ids.push(*id);
            }
        }
    }
    ids
}

fn text_messages(messages: &[super::Message]) -> TextMessages {
    messages.iter().fold(TextMessages::new(), |acc, m| {
        let role = match m.role {
            Role::System => TextMessageRole::System,
            Role::User => TextMessageRole::User,
            Role::Assistant => TextMessageRole::Assistant,
        };
        acc.add_message(role, &m.content)
    })
}

#[async_trait]
impl Engine for MistralEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    async fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let result = match prompt {
            Prompt::Chat(messages) => {
                self.model.tokenize(either::Either::Left(text_messages(messages)), None, true, true, None).await
            }
            Prompt::Text(text) => {
                self.model.tokenize(either::Either::Right(text.clone()), None, true, false, None).await
            }
        };
        result.map_err(|e| EngineError::BadPrompt(e.to_string()))
    }

    async fn generate(&self, request: GenerationRequest) -> Result<Generation, EngineError> {
        if request.adapter.is_some() {
            return Err(EngineError::AdaptersUnsupported);
        }
        super::only_plain(&request.sampling)?;
        let tokens = self.tokenize(&request.prompt).await?;
        let prompt_tokens = tokens.len();
        let budget = fit_to_context(prompt_tokens, request.max_tokens, self.info.context_len)?;

        let steps = Arc::new(AtomicUsize::new(0));
        let sampling = &request.sampling;
        let processor = StepProcessor {
            steps: steps.clone(),
            ban: if sampling.ignore_eos { self.eos_tokens.clone() } else { Vec::new() },
            sampling: Sampling { frequency_penalty: None, presence_penalty: None, ..sampling.clone() },
            seed: sampling.seed.unwrap_or_else(rand::random),
        };
        let (tx, mut rx) = mpsc::channel(64);
        let normal = NormalRequest {
            messages: RequestMessage::CompletionTokens(tokens),
            sampling_params: self.sampling_params(sampling, budget),
            response: tx,
            return_logprobs: false,
            is_streaming: true,
            id: 0,
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: Some(vec![Arc::new(processor)]),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        };
        let sender = self.model.inner().get_sender(None).map_err(|e| EngineError::Backend(e.to_string()))?;
        sender.send(Request::Normal(Box::new(normal))).await.map_err(|_| EngineError::Closed)?;

        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let mut filter = StopFilter::new(sampling.stop.clone());
        tokio::spawn(async move {
            // Ends when the generation finishes or when the consumer drops its receiver; dropping
            // `rx` here makes mistralrs cancel the sequence at its next step.
            while let Some(response) = rx.recv().await {
                let events = match response {
                    Response::CompletionChunk(chunk) => {
                        let mut events = Vec::new();
                        for choice in chunk.choices {
                            if filter.is_stopped() && choice.finish_reason.is_none() {
                                // We saw a stop sequence that mistralrs did not: end it here.
                                events.push(Event::Finished {
                                    reason: FinishReason::Stop,
                                    completion_tokens: steps.load(Ordering::Relaxed),
                                    cached_tokens: 0,
                                });
                                break;
                            }
                            let filtered = filter.push(&choice.text);
                            if !filtered.text.is_empty() {
                                events.push(Event::Delta(filtered.text));
                            }
                            if let Some(reason) = choice.finish_reason {
                                let tail = filter.finish();
                                if !tail.is_empty() {
                                    events.push(Event::Delta(tail));
                                }
                                let reason = if reason == "length" && !filter.is_stopped() {
                                    FinishReason::Length
                                } else {
                                    FinishReason::Stop
                                };
                                events.push(Event::Finished {
                                    reason,
                                    completion_tokens: steps.load(Ordering::Relaxed),
                                    cached_tokens: 0,
                                });
                            }
                        }
                        events
                    }
                    Response::InternalError(e) | Response::ValidationError(e) => {
                        vec![Event::Failed(e.to_string())]
                    }
                    Response::CompletionModelError(msg, _) | Response::ModelError(msg, _) => {
                        vec![Event::Failed(msg)]
                    }
                    other => vec![Event::Failed(format!("unexpected engine response {:?}", kind_of(&other)))],
                };
                for event in events {
                    let last = !matches!(event, Event::Delta(_));
                    if out_tx.send(event).is_err() || last {
                        return;
                    }
                }
            }
        });
        Ok(Generation { prompt_tokens, events: out_rx })
    }
}

fn kind_of(r: &Response) -> &'static str {
    match r {
        Response::Done(_) => "chat done",
        Response::Chunk(_) => "chat chunk",
        Response::CompletionDone(_) => "completion done",
        _ => "other",
    }
}
