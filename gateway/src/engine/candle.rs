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

use adapters::BaseModelShape;
use async_trait::async_trait;
use runtime::llama::{shared_prefix, ChatModel, ChatTemplate, KvCache, PrefixCache, Runtime, SeqInput, Workspace};
use runtime::lora::AdapterWeights;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use super::sampling::choose;
use super::stop::StopFilter;
use super::{
    fit_to_context, Engine, EngineError, Event, FinishReason, Generation, GenerationRequest, ModelInfo, Prompt,
    Sampling,
};
use crate::metrics::EngineMetrics;

/// How the candle engine runs, beyond the model file.
#[derive(Debug, Clone, Default)]
pub struct CandleOptions {
    /// Cap on the model's context length.
    pub context_cap: Option<usize>,
    /// Threads for the matmuls (0: every core).
    pub threads: usize,
    /// Memory for the prompt prefix cache, in bytes (0: off).
    pub prefix_cache_bytes: usize,
    /// What decode steps multiply the packed weights against (f32: exact).
    pub activations: runtime::kernels::Activations,
}

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
    /// `job.tokens` is the prompt, then every sampled token once it is fed: the tokens whose
    /// keys and values `cache` holds, in order.
    job: Job,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    fed: usize,
    /// Prompt tokens copied from the prefix cache rather than computed.
    cached: usize,
    /// Prompt tokens this step feeds (0: none this step).
    take: usize,
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
    pub fn load(path: &Path, id: String, options: CandleOptions, metrics: EngineMetrics) -> anyhow::Result<Self> {
        let CandleOptions { context_cap, threads, prefix_cache_bytes, activations } = options;
        let ChatModel { model, tokenizer, template, eos_ids: eos } = ChatModel::load(path)?;
        // Packed weights and SIMD kernels, with f32 activations unless told otherwise (the
        // candle `Llama` stays the reference and the training model; it is dropped here).
        let mut runtime = Runtime::from_llama(&model, threads)?;
        runtime.set_activations(activations);
        drop(model);
        release_freed_memory();
        tracing::info!(weight_bytes = runtime.weight_bytes(), threads = runtime.threads(), isa = ?runtime::kernels::isa(), ?activations, "candle engine packed");
        let context_len = context_cap.map_or(runtime.config.max_position, |c| c.min(runtime.config.max_position));
        let shape = runtime.config.shape(&id);
        let tokenizer = Arc::new(tokenizer);
        let (jobs, rx) = std_mpsc::channel();
        let thread_tokenizer = tokenizer.clone();
        std::thread::Builder::new().name("candle-scheduler".into()).spawn({
            let metrics = metrics.clone();
            move || {
                let prefixes = PrefixCache::new(prefix_cache_bytes);
                Scheduler { runtime, tokenizer: thread_tokenizer, eos, context_len, rx, metrics, prefixes }.run()
            }
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
            Prompt::Chat(messages) => self
                .template
                .render(messages.iter().map(|m| (m.role.as_str(), m.content.as_str())))
                .map_err(EngineError::BadPrompt)?,
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
    prefixes: PrefixCache,
}

/// A prompt waits a step for an earlier prompt that finishes this step, rather than computing
/// the same leading tokens beside it, when that saves at least this many tokens.
const PREFIX_WAIT_MIN: usize = 16;

/// Prompt tokens fed per step, across all sequences still reading their prompts. Bounds how
/// long running streams wait for a newcomer's prompt (chunked prefill).
const PREFILL_BUDGET: usize = 256;

impl Scheduler {
    fn run(mut self) {
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
            let chunks = self.plan_prompts(&mut reading);
            self.metrics.batch_size.observe((decoding.len() + chunks) as f64);
            let result = {
                let mut inputs: Vec<SeqInput<'_>> = Vec::with_capacity(decoding.len() + chunks);
                for seq in decoding.iter_mut() {
                    let Seq { job, cache, next, .. } = seq;
                    inputs.push(SeqInput {
                        tokens: std::slice::from_ref(next),
                        cache,
                        adapter: job.adapter.as_deref(),
                        logits: true,
                    });
                }
                for seq in reading.iter_mut().filter(|s| s.take > 0) {
                    let Seq { job, cache, fed, take, .. } = seq;
                    inputs.push(SeqInput {
                        tokens: &job.tokens[*fed..*fed + *take],
                        cache,
                        adapter: job.adapter.as_deref(),
                        logits: *fed + *take == job.tokens.len(),
                    });
                }
                self.runtime.forward(&mut ws, &mut inputs, &mut logits)
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "engine step failed; failing its sequences");
                let (failed, waiting): (Vec<Seq>, Vec<Seq>) = reading.drain(..).partition(|s| s.take > 0);
                reading = waiting.into();
                for seq in decoding.drain(..).chain(failed) {
                    let _ = seq.job.events.send(Event::Failed(e.to_string()));
                }
                continue;
            }
            let vocab = self.runtime.config.vocab_size;
            let mut rows = logits.chunks_exact_mut(vocab);
            let mut next_decoding = Vec::with_capacity(decoding.len() + chunks);
            for seq in decoding.drain(..) {
                if let Some(seq) = rows.next().and_then(|l| self.advance(seq, l)) {
                    next_decoding.push(seq);
                }
            }
            let mut still_reading = VecDeque::with_capacity(reading.len());
            for mut seq in reading.drain(..) {
                if seq.take == 0 {
                    still_reading.push_back(seq);
                    continue;
                }
                seq.fed += std::mem::take(&mut seq.take);
                if seq.fed < seq.job.tokens.len() {
                    still_reading.push_back(seq);
                    continue;
                }
                // The whole prompt is in: later prompts that start the same way copy it.
                self.prefixes.store(&seq.job.tokens, seq.job.adapter.as_ref(), &seq.cache);
                if let Some(seq) = rows.next().and_then(|l| self.advance(seq, l)) {
                    next_decoding.push(seq);
                }
            }
            reading = still_reading;
            self.metrics.prefix_cache_bytes.set(self.prefixes.bytes() as i64);
            decoding = next_decoding;
            // Sequences on the same adapter side by side: the runtime then reads each adapter's
            // LoRA weights once per step for all of them (a stable sort keeps arrival order
            // within an adapter).
            decoding.sort_by_key(|s| s.job.adapter.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize));
        }
    }

    /// Sets each reading sequence's `take` for this step, oldest first, within the prefill
    /// budget, and returns how many take part. A prompt that has not started first copies
    /// what the prefix cache holds of it; one that shares more with an earlier prompt that
    /// completes this step waits one step and copies that instead of computing it twice.
    fn plan_prompts(&mut self, reading: &mut VecDeque<Seq>) -> usize {
        let mut budget = PREFILL_BUDGET;
        let mut chunks = 0;
        for i in 0..reading.len() {
            let (earlier, rest) = reading.make_contiguous().split_at_mut(i);
            let seq = &mut rest[0];
            seq.take = 0;
            if budget == 0 {
                continue;
            }
            if seq.fed == 0 && self.prefixes.is_enabled() {
                let adapter = seq.job.adapter.as_ref();
                let from_cache = self.prefixes.reusable(&seq.job.tokens, adapter);
                let limit = seq.job.tokens.len() - 1;
                let from_earlier = earlier
                    .iter()
                    .filter(|e| e.take > 0 && e.fed + e.take == e.job.tokens.len() && same_adapter(e, seq))
                    .filter(|e| self.prefixes.would_keep(e.job.tokens.len(), &e.cache))
                    .map(|e| shared_prefix(&e.job.tokens, &seq.job.tokens).min(limit))
                    .max()
                    .unwrap_or(0);
                if from_earlier >= from_cache + PREFIX_WAIT_MIN {
                    continue;
                }
                if from_cache > 0 {
                    let n = self.prefixes.restore(&seq.job.tokens, adapter, &mut seq.cache);
                    seq.fed = n;
                    seq.cached = n;
                }
            }
            seq.take = (seq.job.tokens.len() - seq.fed).min(budget);
            budget -= seq.take;
            chunks += 1;
        }
        chunks
    }

    /// A sequence for a job, with its KV cache sized once for the prompt and the whole budget.
    fn admit(&self, job: Job) -> Seq {
        let capacity = (job.tokens.len() + job.max_tokens).min(self.context_len).max(job.tokens.len());
        Seq {
            stop: StopFilter::new(job.sampling.stop.clone()),
            cache: KvCache::new(&self.runtime.config, capacity),
            job,
            fed: 0,
            cached: 0,
            take: 0,
            next: 0,
            generated: 0,
            counts: HashMap::new(),
            decode_ids: Vec::new(),
            decode_prefix: String::new(),
            decode_index: 0,
        }
    }

    /// Samples from `logits`, emits the text, and keeps the sequence if it goes on. A
    /// sequence that ends leaves its conversation so far in the prefix cache (the next turn
    /// of a chat starts with it).
    fn advance(&mut self, mut seq: Seq, logits: &mut [f32]) -> Option<Seq> {
        if self.sample(&mut seq, logits) {
            seq.job.tokens.push(seq.next);
            return Some(seq);
        }
        self.prefixes.store(&seq.job.tokens, seq.job.adapter.as_ref(), &seq.cache);
        None
    }

    /// Samples the next token into `seq.next` and emits its text; false when the sequence
    /// is done (its last event sent) or its client went away.
    fn sample(&self, seq: &mut Seq, logits: &mut [f32]) -> bool {
        let banned: &[u32] = if seq.job.sampling.ignore_eos { &self.eos } else { &[] };
        let position = seq.cache.len();
        let token = choose(logits, &seq.job.sampling, seq.job.seed, position, &seq.counts, banned);
        seq.generated += 1;
        *seq.counts.entry(token).or_default() += 1;
        let finished = |seq: &Seq, reason: FinishReason| Event::Finished {
            reason,
            completion_tokens: seq.generated,
            cached_tokens: seq.cached,
        };
        let finish = |seq: &mut Seq, reason: FinishReason| {
            let tail = seq.stop.finish();
            if !tail.is_empty() {
                let _ = seq.job.events.send(Event::Delta(tail));
            }
            let _ = seq.job.events.send(finished(seq, reason));
        };
        if self.eos.contains(&token) && !seq.job.sampling.ignore_eos {
            finish(seq, FinishReason::Stop);
            return false;
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
            return false; // The client went away: drop the sequence and its cache.
        }
        if filtered.stopped {
            let _ = seq.job.events.send(finished(seq, FinishReason::Stop));
            return false;
        }
        if seq.generated >= seq.job.max_tokens || seq.cache.len() + 1 >= self.context_len {
            finish(seq, FinishReason::Length);
            return false;
        }
        if seq.job.events.is_closed() {
            return false;
        }
        seq.next = token;
        true
    }
}

/// Whether two sequences run on the same adapter version (or both on the base).
fn same_adapter(a: &Seq, b: &Seq) -> bool {
    match (&a.job.adapter, &b.job.adapter) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}
