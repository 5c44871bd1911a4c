//! The candle engine: one copy of the base weights, per-sequence LoRA adapters in the same
//! batch, KV caches, and continuous batching on a dedicated scheduler thread.
//!
//! Each request becomes a sequence that holds its adapter version (`Arc`) until its last token,
//! so an alias moving meanwhile never changes a running answer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use adapters::llama::{Llama, Row, SeqCache};
use adapters::lora::AdapterWeights;
use adapters::BaseModelShape;
use async_trait::async_trait;
use candle_core::Tensor;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::sampling::choose;
use crate::metrics::EngineMetrics;
use super::stop::StopFilter;
use super::template::ChatTemplate;
use super::{
    fit_to_context, Engine, EngineError, Event, FinishReason, Generation, GenerationRequest, ModelInfo, Prompt,
    Sampling,
};

pub struct CandleEngine {
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    shape: BaseModelShape,
    jobs: std_mpsc::Sender<Job>,
    metrics: EngineMetrics,
}

struct Job {
    tokens: Vec<u32>,
    adapter: Option<Arc<AdapterWeights>>,
    sampling: Sampling,
    seed: u64,
    max_tokens: usize,
    events: mpsc::UnboundedSender<Event>,
}

/// A sequence the scheduler is running.
struct Seq {
    job: Job,
    cache: SeqCache,
    /// The last sampled token, fed at the next step.
    next: u32,
    generated: usize,
    counts: HashMap<u32, usize>,
    stop: StopFilter,
    decode_ids: Vec<u32>,
    decode_prefix: String,
    decode_index: usize,
}

impl CandleEngine {
    /// Loads a GGUF file or an HF directory and starts the scheduler thread.
    pub fn load(path: &Path, id: String, context_cap: Option<usize>, metrics: EngineMetrics) -> anyhow::Result<Self> {
        let (model, tokenizer, template, eos) = if path.is_file() {
            let (model, meta, tokenizer) = Llama::from_gguf(path)?;
            // Dense f32 weights: candle's quantized matmul quantizes activations to 8 bits,
            // and on this small model that noise flips greedy tokens between prefill and
            // decode. Dense weights keep every path exact and consistent.
            let model = model.to_dense()?;
            let template = ChatTemplate::new(meta.chat_template.as_deref(), meta.bos_token.clone(), &tokenizer, &meta.eos_token_ids)?;
            (model, tokenizer, template, meta.eos_token_ids)
        } else {
            let model = Llama::from_hf_dir(path)?;
            let tokenizer = Tokenizer::from_file(path.join("tokenizer.json"))
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.join("tokenizer.json").display()))?;
            let (template, eos) = ChatTemplate::from_hf_dir(path, &tokenizer)?;
            (model, tokenizer, template, eos)
        };
        let context_len = context_cap.map_or(model.config.max_position, |c| c.min(model.config.max_position));
        let shape = model.config.shape(&id);
        let tokenizer = Arc::new(tokenizer);
        let (jobs, rx) = std_mpsc::channel();
        let thread_tokenizer = tokenizer.clone();
        std::thread::Builder::new()
            .name("candle-scheduler".into())
            .spawn({
                let metrics = metrics.clone();
                move || Scheduler { model, tokenizer: thread_tokenizer, eos, context_len, rx, metrics }.run()
            })?;
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(Self { info: ModelInfo { id, context_len, created }, tokenizer, template, shape, jobs, metrics })
    }
}

#[async_trait]
impl Engine for CandleEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn adapter_shape(&self) -> Option<&BaseModelShape> {
        Some(&self.shape)
    }

    async fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let text = match prompt {
            Prompt::Chat(messages) => self.template.render(messages).map_err(EngineError::BadPrompt)?,
            Prompt::Text(t) => t.clone(),
        };
        let tokenizer = self.tokenizer.clone();
        let encoding = tokio::task::spawn_blocking(move || tokenizer.encode(text, false))
            .await
            .map_err(|e| EngineError::Backend(e.to_string()))?
            .map_err(|e| EngineError::BadPrompt(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    async fn generate(&self, request: GenerationRequest) -> Result<Generation, EngineError> {
        let tokens = self.tokenize(&request.prompt).await?;
        if tokens.is_empty() {
            return Err(EngineError::BadPrompt("the prompt has no tokens".into()));
        }
        let prompt_tokens = tokens.len();
        let max_tokens = fit_to_context(prompt_tokens, request.max_tokens, self.info.context_len)?;
        let (events, rx) = mpsc::unbounded_channel();
        let seed = request.sampling.seed.unwrap_or_else(rand::random);
        let job = Job {
            tokens,
            adapter: request.adapter.map(|a| a.weights),
            sampling: request.sampling,
            seed,
            max_tokens,
            events,
        };
        self.jobs.send(job).map_err(|_| EngineError::Closed)?;
        self.metrics.queue_depth.inc();
        Ok(Generation { prompt_tokens, events: rx })
    }
}

struct Scheduler {
    model: Llama,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    context_len: usize,
    rx: std_mpsc::Receiver<Job>,
    metrics: EngineMetrics,
}

impl Scheduler {
    fn run(self) {
        let mut active: Vec<Seq> = Vec::new();
        loop {
            // Block only when there is nothing to run.
            let mut incoming = Vec::new();
            if active.is_empty() {
                match self.rx.recv() {
                    Ok(job) => incoming.push(job),
                    Err(_) => return,
                }
            }
            incoming.extend(self.rx.try_iter());
            for job in incoming {
                self.metrics.queue_depth.dec();
                if let Some(seq) = self.prefill(job) {
                    active.push(seq);
                }
            }
            if !active.is_empty() {
                self.metrics.batch_size.observe(active.len() as f64);
                active = self.decode_step(active);
            }
        }
    }

    fn prefill(&self, job: Job) -> Option<Seq> {
        let mut cache = SeqCache::new(self.model.config.num_layers);
        let result = Tensor::new(job.tokens.as_slice(), self.model.device())
            .and_then(|t| t.unsqueeze(0))
            .map_err(adapters::AdapterError::from)
            .and_then(|input| {
                let row = Row { adapter: job.adapter.as_deref() };
                self.model.forward_cached(&input, &[row], &mut [&mut cache], true)
            });
        let logits = match result.and_then(|l| Ok(l.squeeze(0)?.to_vec1::<f32>()?)) {
            Ok(l) => l,
            Err(e) => {
                let _ = job.events.send(Event::Failed(e.to_string()));
                return None;
            }
        };
        let seq = Seq {
            stop: StopFilter::new(job.sampling.stop.clone()),
            job,
            cache,
            next: 0,
            generated: 0,
            counts: HashMap::new(),
            decode_ids: Vec::new(),
            decode_prefix: String::new(),
            decode_index: 0,
        };
        self.advance(seq, logits)
    }

    /// One decode step for every active sequence, grouped by adapter so each adapter's rows
    /// are contiguous.
    fn decode_step(&self, mut active: Vec<Seq>) -> Vec<Seq> {
        active.sort_by_key(|s| s.job.adapter.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize));
        let tokens: Vec<u32> = active.iter().map(|s| s.next).collect();
        let held: Vec<Option<Arc<AdapterWeights>>> = active.iter().map(|s| s.job.adapter.clone()).collect();
        let rows: Vec<Row<'_>> = held.iter().map(|a| Row { adapter: a.as_deref() }).collect();
        let mut caches: Vec<SeqCache> = active.iter_mut().map(|s| std::mem::replace(&mut s.cache, SeqCache::new(0))).collect();
        let result = {
            let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
            Tensor::new(tokens.as_slice(), self.model.device())
                .and_then(|t| t.unsqueeze(1))
                .map_err(adapters::AdapterError::from)
                .and_then(|input| self.model.forward_cached(&input, &rows, &mut refs, true))
                .and_then(|l| Ok(l.to_vec2::<f32>()?))
        };
        drop(rows);
        for (seq, cache) in active.iter_mut().zip(caches) {
            seq.cache = cache;
        }
        match result {
            Ok(rows) => active.into_iter().zip(rows).filter_map(|(seq, logits)| self.advance(seq, logits)).collect(),
            Err(e) => {
                tracing::error!(error = %e, "decode step failed; failing its sequences");
                for seq in active {
                    let _ = seq.job.events.send(Event::Failed(e.to_string()));
                }
                Vec::new()
            }
        }
    }

    /// Samples from `logits`, emits the text, and keeps the sequence if it goes on.
    fn advance(&self, mut seq: Seq, mut logits: Vec<f32>) -> Option<Seq> {
        let banned: &[u32] = if seq.job.sampling.ignore_eos { &self.eos } else { &[] };
        let position = seq.cache.len();
        let token = choose(&mut logits, &seq.job.sampling, seq.job.seed, position, &seq.counts, banned);
        seq.generated += 1;
        *seq.counts.entry(token).or_default() += 1;
        let finish = |seq: &mut Seq, reason: FinishReason| {
            let tail = seq.stop.finish();
            if !tail.is_empty() {
                let _ = seq.job.events.send(Event::Delta(tail));
            }
            let _ = seq.job.events.send(Event::Finished { reason, completion_tokens: seq.generated });
        };
        if self.eos.contains(&token) && !seq.job.sampling.ignore_eos {
            finish(&mut seq, FinishReason::Stop);
            return None;
        }
        let piece = tokenizers::tokenizer::step_decode_stream(
            &self.tokenizer,
            vec![token],
            true,
            &mut seq.decode_ids,
            &mut seq.decode_prefix,
            &mut seq.decode_index,
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        let filtered = seq.stop.push(&piece);
        if !filtered.text.is_empty() && seq.job.events.send(Event::Delta(filtered.text)).is_err() {
            return None; // The client went away: drop the sequence and its cache.
        }
        if filtered.stopped {
            let _ = seq.job.events.send(Event::Finished { reason: FinishReason::Stop, completion_tokens: seq.generated });
            return None;
        }
        if seq.generated >= seq.job.max_tokens || seq.cache.len() + 1 >= self.context_len {
            finish(&mut seq, FinishReason::Length);
            return None;
        }
        if seq.job.events.is_closed() {
            return None;
        }
        seq.next = token;
        Some(seq)
    }
}
