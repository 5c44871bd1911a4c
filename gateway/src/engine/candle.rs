//! The candle engine: one copy of the base weights, per-sequence LoRA adapters in the same
//! batch, KV caches, and continuous batching on a dedicated scheduler thread.
//!
//! Each request becomes a sequence that holds its adapter version (`Arc`) until its last token,
//! so an alias moving meanwhile never changes a running answer.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use adapters::llama::{ChatModel, ChatTemplate, KvCache, Runtime, SeqInput, Workspace};
use adapters::lora::AdapterWeights;
use adapters::BaseModelShape;
use async_trait::async_trait;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::sampling::choose;
use crate::metrics::EngineMetrics;
use super::stop::StopFilter;
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
    cache: KvCache,
    /// Prompt tokens already in the cache.
    fed: usize,
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
    pub fn load(
        path: &Path,
        id: String,
        context_cap: Option<usize>,
        threads: usize,
        metrics: EngineMetrics,
    ) -> anyhow::Result<Self> {
        let ChatModel { model, tokenizer, template, eos_ids: eos } = ChatModel::load(path)?;
        // Packed weights and SIMD kernels with f32 activations (the candle `Llama` stays the
        // reference and the training model; it is dropped here).
        let runtime = Runtime::from_llama(&model, threads)?;
        drop(model);
        release_freed_memory();
        tracing::info!(weight_bytes = runtime.weight_bytes(), threads = runtime.threads(), isa = ?adapters::kernels::isa(), "candle engine packed");
        let context_len = context_cap.map_or(runtime.config.max_position, |c| c.min(runtime.config.max_position));
        let shape = runtime.config.shape(&id);
        let tokenizer = Arc::new(tokenizer);
        let (jobs, rx) = std_mpsc::channel();
        let thread_tokenizer = tokenizer.clone();
        std::thread::Builder::new()
            .name("candle-scheduler".into())
            .spawn({
                let metrics = metrics.clone();
                move || Scheduler { runtime, tokenizer: thread_tokenizer, eos, context_len, rx, metrics }.run()
            })?;
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(Self { info: ModelInfo { id, context_len, created }, tokenizer, template, shape, jobs, metrics })
    }
}

/// Returns the heap pages the loader freed to the OS (glibc keeps them otherwise, and the
/// resident set would count a dense copy of the embedding that no longer exists).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps; it touches no
    // live allocation.
    unsafe {
        libc::malloc_trim(0);
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
            Prompt::Chat(messages) => self.template.render(messages.iter().map(|m| (m.role.as_str(), m.content.as_str()))).map_err(EngineError::BadPrompt)?,
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
    runtime: Runtime,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    context_len: usize,
    rx: std_mpsc::Receiver<Job>,
    metrics: EngineMetrics,
}

/// Prompt tokens fed per step, across all sequences still reading their prompts. Bounds how
/// long running streams wait for a newcomer's prompt (chunked prefill).
const PREFILL_BUDGET: usize = 256;

impl Scheduler {
    fn run(self) {
        let mut ws = Workspace::default();
        let mut logits = Vec::new();
        // Sequences still reading their prompts, oldest first, and sequences decoding.
        let mut reading: VecDeque<Seq> = VecDeque::new();
        let mut decoding: Vec<Seq> = Vec::new();
        loop {
            // Block only when there is nothing to run.
            let mut incoming = Vec::new();
            if reading.is_empty() && decoding.is_empty() {
                match self.rx.recv() {
                    Ok(job) => incoming.push(job),
                    Err(_) => return,
                }
            }
            incoming.extend(self.rx.try_iter());
            for job in incoming {
                self.metrics.queue_depth.dec();
                reading.push_back(self.admit(job));
            }
            // Cancelled requests leave before they cost a step.
            reading.retain(|s| !s.job.events.is_closed());

            // This step: every decoding sequence's last token, then prompt chunks up to the budget.
            let mut budget = PREFILL_BUDGET;
            let mut chunks = Vec::new();
            for seq in reading.iter() {
                if budget == 0 {
                    break;
                }
                let take = (seq.job.tokens.len() - seq.fed).min(budget);
                budget -= take;
                chunks.push(take);
            }
            self.metrics.batch_size.observe((decoding.len() + chunks.len()) as f64);
            let result = {
                let mut inputs: Vec<SeqInput<'_>> = Vec::with_capacity(decoding.len() + chunks.len());
                for seq in decoding.iter_mut() {
                    let Seq { job, cache, next, .. } = seq;
                    inputs.push(SeqInput {
                        tokens: std::slice::from_ref(next),
                        cache,
                        adapter: job.adapter.as_deref(),
                        logits: true,
                    });
                }
                for (seq, &take) in reading.iter_mut().zip(&chunks) {
                    let Seq { job, cache, fed, .. } = seq;
                    inputs.push(SeqInput {
                        tokens: &job.tokens[*fed..*fed + take],
                        cache,
                        adapter: job.adapter.as_deref(),
                        logits: *fed + take == job.tokens.len(),
                    });
                }
                self.runtime.forward(&mut ws, &mut inputs, &mut logits)
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "engine step failed; failing its sequences");
                for seq in decoding.drain(..).chain(reading.drain(..chunks.len())) {
                    let _ = seq.job.events.send(Event::Failed(e.to_string()));
                }
                continue;
            }
            let vocab = self.runtime.config.vocab_size;
            let mut rows = logits.chunks_exact(vocab);
            let mut next_decoding = Vec::with_capacity(decoding.len() + chunks.len());
            for seq in decoding.drain(..) {
                if let Some(seq) = rows.next().and_then(|l| self.advance(seq, l.to_vec())) {
                    next_decoding.push(seq);
                }
            }
            for take in chunks {
                let Some(mut seq) = reading.pop_front() else { break };
                seq.fed += take;
                if seq.fed < seq.job.tokens.len() {
                    reading.push_front(seq);
                    break; // Only the last chunk of a step can stop mid-prompt.
                }
                if let Some(seq) = rows.next().and_then(|l| self.advance(seq, l.to_vec())) {
                    next_decoding.push(seq);
                }
            }
            decoding = next_decoding;
            // Sequences on the same adapter side by side: the runtime then reads each adapter's
            // LoRA weights once per step for all of them (a stable sort keeps arrival order
            // within an adapter).
            decoding.sort_by_key(|s| s.job.adapter.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize));
        }
    }

    /// A sequence for a job, with its KV cache sized once for the prompt and the whole budget.
    fn admit(&self, job: Job) -> Seq {
        let capacity = (job.tokens.len() + job.max_tokens).min(self.context_len).max(job.tokens.len());
        Seq {
            stop: StopFilter::new(job.sampling.stop.clone()),
            cache: KvCache::new(&self.runtime.config, capacity),
            job,
            fed: 0,
            next: 0,
            generated: 0,
            counts: HashMap::new(),
            decode_ids: Vec::new(),
            decode_prefix: String::new(),
            decode_index: 0,
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
