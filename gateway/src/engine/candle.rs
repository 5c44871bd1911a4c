//! The candle engine: one copy of the base weights, per-sequence LoRA adapters in the same
//! batch, KV caches, and continuous batching on a dedicated scheduler thread.
//!
//! Each request becomes a sequence that holds its adapter version (`Arc`) until its last token,
//! so an alias moving meanwhile never changes a running answer.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::rc::Rc;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use adapters::BaseModelShape;
use async_trait::async_trait;
use runtime::llama::{shared_prefix, ChatModel, ChatTemplate, KvCache, PrefixCache, Runtime, SeqInput, Workspace};
use runtime::lora::AdapterWeights;
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use super::grammar::{Constraint, Grammar, Grammars};
use super::sampling::{log_sum_exp, penalize, pick, top_k};
use super::stop::StopFilter;
use super::{
    choice_seed, fit_to_context, Engine, EngineError, Event, FinishReason, Generation, GenerationRequest, ModelInfo,
    Prompt, Sampling, ScoreRequest, Scores, TokenLogprob, TopLogprob,
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
    /// `None` when llguidance cannot read this tokenizer (structured output is then refused).
    grammars: Option<Arc<Grammars>>,
}

struct Job {
    tokens: Vec<u32>,
    adapter: Option<Arc<AdapterWeights>>,
    sampling: Sampling,
    seed: u64,
    max_tokens: usize,
    events: mpsc::UnboundedSender<Event>,
    /// Set for a scoring job: instead of sampling after the prompt, score these continuations.
    forced: Option<Forced>,
    /// The grammar's state for this row, when the answer is constrained.
    constraint: Option<Constraint>,
    /// Choices 1..n of an `n` request: each samples from a copy of this prompt's keys and
    /// values once the prompt is in.
    siblings: Vec<Sibling>,
}

/// One more choice of the same prompt: its seed, grammar state and event channel.
struct Sibling {
    seed: u64,
    constraint: Option<Constraint>,
    events: mpsc::UnboundedSender<Event>,
}

/// The continuations a scoring job reads after its prompt, and where their scores go.
struct Forced {
    continuations: Vec<Vec<u32>>,
    reply: oneshot::Sender<Result<Vec<f64>, String>>,
}

/// The scores of one scoring job, filled in as its continuations finish.
struct Pending {
    scores: Vec<f64>,
    left: usize,
    reply: Option<oneshot::Sender<Result<Vec<f64>, String>>>,
}

impl Pending {
    fn finish(&mut self, which: usize, logprob: f64) {
        self.scores[which] = logprob;
        self.left -= 1;
        if self.left == 0 {
            if let Some(reply) = self.reply.take() {
                let _ = reply.send(Ok(std::mem::take(&mut self.scores)));
            }
        }
    }

    fn fail(&mut self, error: &str) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Err(error.to_owned()));
        }
    }

    fn abandoned(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }
}

/// One continuation of a scoring job past its first token: a copy of the prompt's keys and
/// values, fed one forced token per step while the log-probability of the next adds up.
struct Fork {
    cache: KvCache,
    adapter: Option<Arc<AdapterWeights>>,
    tokens: Vec<u32>,
    /// The token this step feeds; its logits score `tokens[pos + 1]`.
    pos: usize,
    logprob: f64,
    which: usize,
    pending: Rc<RefCell<Pending>>,
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
    /// The prompt's log-probabilities so far (only with `prompt_logprobs`).
    prompt_logprobs: Vec<TokenLogprob>,
}

impl CandleEngine {
    /// The prompt as the model reads it: chat messages through the model's own template.
    fn render(&self, prompt: &Prompt) -> Result<String, EngineError> {
        match prompt {
            Prompt::Chat(messages) => self
                .template
                .render(messages.iter().map(|m| (m.role.as_str(), m.content.as_str())))
                .map_err(EngineError::BadPrompt),
            Prompt::Text(t) => Ok(t.clone()),
        }
    }

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
        let grammars = match Grammars::new(tokenizer.clone(), &eos, runtime.config.vocab_size) {
            Ok(g) => Some(Arc::new(g)),
            Err(e) => {
                tracing::warn!(error = %e, "structured output is off: the grammar engine cannot read this tokenizer");
                None
            }
        };
        let (jobs, rx) = std_mpsc::channel();
        let thread_tokenizer = tokenizer.clone();
        std::thread::Builder::new().name("candle-scheduler".into()).spawn({
            let metrics = metrics.clone();
            let grammars = grammars.clone();
            move || {
                let prefixes = PrefixCache::new(prefix_cache_bytes);
                Scheduler { runtime, tokenizer: thread_tokenizer, eos, context_len, rx, metrics, prefixes, grammars }
                    .run()
            }
        })?;
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(Self { info: ModelInfo { id, context_len, created }, tokenizer, template, shape, jobs, metrics, grammars })
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
        let text = self.render(prompt)?;
        self.encode(text).await
    }

    async fn generate(&self, request: GenerationRequest) -> Result<Generation, EngineError> {
        let mut one = self.generate_n(request, 1).await?;
        one.pop().ok_or(EngineError::Closed)
    }

    /// The prompt is read once; each further choice starts from a copy of its keys and values.
    async fn generate_n(&self, request: GenerationRequest, n: usize) -> Result<Vec<Generation>, EngineError> {
        // A template with its own tool format gets the tools and the conversation as OpenAI
        // sent them; otherwise the prompt carries them in the documented format.
        let tokens = match (&request.tools, self.template.speaks_tools()) {
            (Some(native), true) => {
                let text =
                    self.template.render_with_tools(&native.messages, &native.tools).map_err(EngineError::BadPrompt)?;
                self.encode(text).await?
            }
            _ => self.tokenize(&request.prompt).await?,
        };
        if tokens.is_empty() {
            return Err(EngineError::BadPrompt("the prompt has no tokens".into()));
        }
        let prompt_tokens = tokens.len();
        let max_tokens = fit_to_context(prompt_tokens, request.max_tokens, self.info.context_len)?;
        // Tool schemas nothing constrains to are compiled all the same (then cached), so a bad
        // one is a 400 here too; without a grammar engine there is nothing to check them with.
        if let (None, Some(native), Some(_)) = (&request.sampling.grammar, &request.tools, &self.grammars) {
            for schema in &native.schemas {
                self.constraints(schema, 1).await?;
            }
        }
        let constraints = match &request.sampling.grammar {
            Some(grammar) => self.constraints(grammar, n.max(1)).await?.into_iter().map(Some).collect(),
            None => (0..n.max(1)).map(|_| None).collect::<Vec<_>>(),
        };
        let seed = request.sampling.seed.unwrap_or_else(rand::random);
        let mut generations = Vec::with_capacity(n);
        let mut siblings = Vec::new();
        let mut first = None;
        for (i, constraint) in constraints.into_iter().enumerate() {
            let (events, rx) = mpsc::unbounded_channel();
            generations.push(Generation { prompt_tokens, events: rx });
            match i {
                0 => first = Some((events, constraint)),
                _ => siblings.push(Sibling { seed: choice_seed(seed, i), constraint, events }),
            }
        }
        let (events, constraint) = first.ok_or(EngineError::Closed)?;
        let job = Job {
            tokens,
            adapter: request.adapter.map(|a| a.weights),
            sampling: request.sampling,
            seed,
            max_tokens,
            events,
            forced: None,
            constraint,
            siblings,
        };
        self.jobs.send(job).map_err(|_| EngineError::Closed)?;
        self.metrics.queue_depth.inc();
        Ok(generations)
    }

    async fn score(&self, request: ScoreRequest) -> Result<Scores, EngineError> {
        if request.continuations.is_empty() {
            return Err(EngineError::BadPrompt("there is nothing to score".into()));
        }
        let text = self.render(&request.prompt)?;
        // A chat answer ends with the end-of-turn token: scoring it tells `yes` from `yes, but`.
        let end = match request.prompt {
            Prompt::Chat(_) => self.template.eos_token().to_owned(),
            Prompt::Text(_) => String::new(),
        };
        let tokenizer = self.tokenizer.clone();
        let continuations = request.continuations;
        let (prompt, continuations) = tokio::task::spawn_blocking(move || {
            let encode = |t: String| tokenizer.encode(t, false).map(|e| e.get_ids().to_vec());
            let prompt = encode(text.clone())?;
            let mut tails = Vec::with_capacity(continuations.len());
            for c in continuations {
                // Tokenized together with the prompt, as generation would have produced it;
                // alone only where the two merge across the boundary.
                let whole = encode(format!("{text}{c}{end}"))?;
                tails.push(match whole.strip_prefix(prompt.as_slice()) {
                    Some(tail) => tail.to_vec(),
                    None => encode(format!("{c}{end}"))?,
                });
            }
            Ok::<_, tokenizers::Error>((prompt, tails))
        })
        .await
        .map_err(|e| EngineError::Backend(e.to_string()))?
        .map_err(|e| EngineError::BadPrompt(e.to_string()))?;
        if prompt.is_empty() {
            return Err(EngineError::BadPrompt("the prompt has no tokens".into()));
        }
        if continuations.iter().any(Vec::is_empty) {
            return Err(EngineError::BadPrompt("a continuation has no tokens".into()));
        }
        let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
        fit_to_context(prompt.len(), Some(longest), self.info.context_len)?;
        let tokens = continuations.iter().map(Vec::len).collect();
        let prompt_tokens = prompt.len();
        let (reply, answer) = oneshot::channel();
        let (events, _events) = mpsc::unbounded_channel();
        let job = Job {
            tokens: prompt,
            adapter: request.adapter.map(|a| a.weights),
            sampling: Sampling::default(),
            seed: 0,
            max_tokens: 0,
            events,
            forced: Some(Forced { continuations, reply }),
            constraint: None,
            siblings: Vec::new(),
        };
        self.jobs.send(job).map_err(|_| EngineError::Closed)?;
        self.metrics.queue_depth.inc();
        let logprobs = answer.await.map_err(|_| EngineError::Closed)?.map_err(EngineError::Backend)?;
        Ok(Scores { prompt_tokens, logprobs, tokens })
    }
}

impl CandleEngine {
    /// Token ids of a rendered prompt, off the async workers.
    async fn encode(&self, text: String) -> Result<Vec<u32>, EngineError> {
        let tokenizer = self.tokenizer.clone();
        let encoding = tokio::task::spawn_blocking(move || tokenizer.encode(text, false))
            .await
            .map_err(|e| EngineError::Backend(e.to_string()))?
            .map_err(|e| EngineError::BadPrompt(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `n` fresh states of one grammar, compiled (or taken from the cache) off the async
    /// workers; a grammar that does not compile is the client's error.
    async fn constraints(&self, grammar: &Grammar, n: usize) -> Result<Vec<Constraint>, EngineError> {
        let Grammar { spec, param } = grammar.clone();
        let Some(grammars) = self.grammars.clone() else {
            return Err(EngineError::BadGrammar {
                param,
                message: "this model's tokenizer cannot be read by the grammar engine".into(),
            });
        };
        let compile_seconds = self.metrics.grammar_compile_seconds.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let (first, took) = grammars.compile(&spec)?;
            if let Some(took) = took {
                compile_seconds.observe(took);
            }
            let mut out: Vec<Constraint> = (1..n).map(|_| first.fork()).collect();
            out.insert(0, first);
            Ok::<_, String>(out)
        })
        .await
        .map_err(|e| EngineError::Backend(e.to_string()))?;
        compiled.map_err(|message| EngineError::BadGrammar { param, message })
    }
}

struct Scheduler {
    grammars: Option<Arc<Grammars>>,
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

/// Shadow (background) rows run only in steps with no served work at all, and these bound
/// such a step, so a served request that arrives during one waits little for it.
const BACKGROUND_PREFILL_BUDGET: usize = 64;
const BACKGROUND_ROWS: usize = 8;

impl Scheduler {
    fn run(mut self) {
        let mut ws = Workspace::default();
        let mut logits = Vec::new();
        // Sequences still reading their prompts, oldest first, and sequences decoding.
        let mut reading: VecDeque<Seq> = VecDeque::new();
        let mut decoding: Vec<Seq> = Vec::new();
        // Continuations of scoring jobs past their first token.
        let mut forks: Vec<Fork> = Vec::new();
        loop {
            // Block only when there is nothing to run.
            let mut incoming = Vec::new();
            if reading.is_empty() && decoding.is_empty() && forks.is_empty() {
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
            reading.retain(|s| !s.job.events.is_closed() && s.job.forced.as_ref().is_none_or(|f| !f.reply.is_closed()));
            forks.retain(|f| !f.pending.borrow().abandoned());

            // This step: every decoding sequence's last token, then prompt chunks up to the budget.
            // Shadow rows take part only when nothing served would run: a served stream never
            // shares a step with one, so it is never slowed by it. The others wait, parked.
            let served_decoding = decoding.iter().any(|s| !s.job.sampling.background) || !forks.is_empty();
            let chunks = self.plan_prompts(&mut reading, !served_decoding);
            let background_only = !served_decoding && reading.iter().all(|s| s.take == 0 || s.job.sampling.background);
            let mut parked = Vec::new();
            if !background_only && decoding.iter().any(|s| s.job.sampling.background) {
                let (served, shadow): (Vec<Seq>, Vec<Seq>) =
                    decoding.drain(..).partition(|s| !s.job.sampling.background);
                decoding = served;
                parked = shadow;
            } else if decoding.len() > BACKGROUND_ROWS {
                parked = decoding.split_off(BACKGROUND_ROWS);
            }
            self.metrics.batch_size.observe((decoding.len() + forks.len() + chunks) as f64);
            let result = {
                let mut inputs: Vec<SeqInput<'_>> = Vec::with_capacity(decoding.len() + forks.len() + chunks);
                for seq in decoding.iter_mut() {
                    let Seq { job, cache, next, .. } = seq;
                    inputs.push(SeqInput {
                        tokens: std::slice::from_ref(next),
                        cache,
                        adapter: job.adapter.as_deref(),
                        logits: true,
                        all_logits: false,
                    });
                }
                for fork in forks.iter_mut() {
                    inputs.push(SeqInput {
                        tokens: std::slice::from_ref(&fork.tokens[fork.pos]),
                        cache: &mut fork.cache,
                        adapter: fork.adapter.as_deref(),
                        logits: true,
                        all_logits: false,
                    });
                }
                for seq in reading.iter_mut().filter(|s| s.take > 0) {
                    let Seq { job, cache, fed, take, .. } = seq;
                    inputs.push(SeqInput {
                        tokens: &job.tokens[*fed..*fed + *take],
                        cache,
                        adapter: job.adapter.as_deref(),
                        logits: *fed + *take == job.tokens.len(),
                        all_logits: job.sampling.prompt_logprobs,
                    });
                }
                self.runtime.forward(&mut ws, &mut inputs, &mut logits)
            };
            if let Err(e) = result {
                decoding.append(&mut parked);
                tracing::error!(error = %e, "engine step failed; failing its sequences");
                let (failed, waiting): (Vec<Seq>, Vec<Seq>) = reading.drain(..).partition(|s| s.take > 0);
                reading = waiting.into();
                for seq in decoding.drain(..).chain(failed) {
                    match seq.job.forced {
                        Some(forced) => {
                            let _ = forced.reply.send(Err(e.to_string()));
                        }
                        None => {
                            let _ = seq.job.events.send(Event::Failed(e.to_string()));
                        }
                    }
                }
                for fork in forks.drain(..) {
                    fork.pending.borrow_mut().fail(&e.to_string());
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
            // Parked rows go first, so the next background-only step takes the ones that waited.
            if !parked.is_empty() {
                parked.append(&mut next_decoding);
                next_decoding = parked;
            }
            let mut next_forks = Vec::with_capacity(forks.len());
            for mut fork in forks.drain(..) {
                let Some(l) = rows.next() else { break };
                fork.pos += 1;
                fork.logprob += log_softmax_at(l, fork.tokens[fork.pos]);
                if fork.pos + 1 == fork.tokens.len() {
                    fork.pending.borrow_mut().finish(fork.which, fork.logprob);
                } else {
                    next_forks.push(fork);
                }
            }
            forks = next_forks;
            let mut still_reading = VecDeque::with_capacity(reading.len());
            for mut seq in reading.drain(..) {
                if seq.take == 0 {
                    still_reading.push_back(seq);
                    continue;
                }
                let take = std::mem::take(&mut seq.take);
                let completes = seq.fed + take == seq.job.tokens.len();
                if seq.job.sampling.prompt_logprobs {
                    // Row j predicts prompt token fed + j + 1; the prompt's last row is sampled.
                    let predicting = if completes { take - 1 } else { take };
                    for j in 0..predicting {
                        let Some(l) = rows.next() else { break };
                        let next = seq.job.tokens[seq.fed + j + 1];
                        let entry = self.logprob(l, next, seq.job.sampling.logprobs.unwrap_or(0));
                        seq.prompt_logprobs.push(entry);
                    }
                }
                seq.fed += take;
                if !completes {
                    still_reading.push_back(seq);
                    continue;
                }
                // The whole prompt is in: later prompts that start the same way copy it.
                self.prefixes.store(&seq.job.tokens, seq.job.adapter.as_ref(), &seq.cache);
                let Some(l) = rows.next() else { continue };
                if seq.job.forced.is_some() {
                    forks.extend(self.fork(seq, l));
                    continue;
                }
                if seq.job.sampling.prompt_logprobs {
                    let first = seq.job.tokens[0];
                    let mut all = vec![TokenLogprob {
                        token: first,
                        bytes: self.token_bytes(first),
                        logprob: None,
                        top: Vec::new(),
                    }];
                    all.append(&mut seq.prompt_logprobs);
                    let _ = seq.job.events.send(Event::PromptLogprobs(all));
                }
                for sibling in std::mem::take(&mut seq.job.siblings) {
                    let choice = self.sibling(&seq, sibling);
                    if let Some(choice) = self.advance(choice, &mut l.to_vec()) {
                        next_decoding.push(choice);
                    }
                }
                if let Some(seq) = self.advance(seq, l) {
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
    /// budget, and returns how many take part; shadow prompts only when the step is `idle`.
    /// A prompt that has not started first copies what the prefix cache holds of it; one
    /// that shares more with an earlier prompt that completes this step waits one step and
    /// copies that instead of computing it twice.
    fn plan_prompts(&mut self, reading: &mut VecDeque<Seq>, idle: bool) -> usize {
        let mut budget = PREFILL_BUDGET;
        let mut chunks = 0;
        for seq in reading.iter_mut() {
            seq.take = 0;
        }
        // Served prompts first; shadow rows read only in a step with no served work (`idle`:
        // nothing served decodes, and no served prompt reads), with a smaller budget.
        for background in [false, true] {
            if background {
                if !idle || chunks > 0 || reading.iter().any(|s| !s.job.sampling.background) {
                    break;
                }
                budget = BACKGROUND_PREFILL_BUDGET;
            }
            for i in 0..reading.len() {
                if budget == 0 {
                    break;
                }
                let (earlier, rest) = reading.make_contiguous().split_at_mut(i);
                let seq = &mut rest[0];
                if seq.job.sampling.background != background {
                    continue;
                }
                // A prompt whose log-probabilities are asked for computes every position.
                if seq.fed == 0 && self.prefixes.is_enabled() && !seq.job.sampling.prompt_logprobs {
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
            prompt_logprobs: Vec::new(),
        }
    }

    /// Another choice of `seq`'s prompt, with a copy of the prompt's keys and values.
    fn sibling(&self, seq: &Seq, sibling: Sibling) -> Seq {
        let Sibling { seed, constraint, events } = sibling;
        let job = Job {
            tokens: seq.job.tokens.clone(),
            adapter: seq.job.adapter.clone(),
            sampling: seq.job.sampling.clone(),
            seed,
            max_tokens: seq.job.max_tokens,
            events,
            forced: None,
            constraint,
            siblings: Vec::new(),
        };
        let mut choice = self.admit(job);
        choice.cache.copy_prefix_from(&seq.cache, seq.cache.len());
        choice.fed = seq.fed;
        choice.cached = seq.cached;
        choice
    }

    /// A token's bytes, from the grammar engine's trie (or the tokenizer's decoding).
    fn token_bytes(&self, token: u32) -> Vec<u8> {
        match &self.grammars {
            Some(g) => g.token_bytes(token),
            None => self.tokenizer.decode(&[token], false).unwrap_or_default().into_bytes(),
        }
    }

    /// `token`'s log-probability under `logits` and the `k` most likely tokens.
    fn logprob(&self, logits: &[f32], token: u32, k: usize) -> TokenLogprob {
        let (lse, top) = self.top_logprobs(logits, k);
        self.token_logprob(logits, lse, token, top)
    }

    /// `log_sum_exp(logits)` and the `k` most likely tokens with their log-probabilities.
    fn top_logprobs(&self, logits: &[f32], k: usize) -> (f64, Vec<TopLogprob>) {
        let lse = log_sum_exp(logits);
        let top = top_k(logits, k)
            .into_iter()
            .map(|t| TopLogprob {
                token: t,
                bytes: self.token_bytes(t),
                logprob: (logits[t as usize] as f64 - lse) as f32,
            })
            .collect();
        (lse, top)
    }

    /// `token`'s entry, given the normaliser and top list of the logits it came from.
    fn token_logprob(&self, logits: &[f32], lse: f64, token: u32, top: Vec<TopLogprob>) -> TokenLogprob {
        let logprob = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| (l as f64 - lse) as f32);
        TokenLogprob { token, bytes: self.token_bytes(token), logprob: Some(logprob), top }
    }

    /// A scoring job whose prompt is in: each continuation's first token is scored from the
    /// prompt's own logits, and each longer one goes on as a [`Fork`] with a copy of the
    /// prompt's keys and values.
    fn fork(&self, seq: Seq, logits: &[f32]) -> Vec<Fork> {
        let Some(Forced { continuations, reply }) = seq.job.forced else { return Vec::new() };
        let pending = Rc::new(RefCell::new(Pending {
            scores: vec![0.0; continuations.len()],
            left: continuations.len(),
            reply: Some(reply),
        }));
        let mut forks = Vec::new();
        for (which, tokens) in continuations.into_iter().enumerate() {
            let logprob = log_softmax_at(logits, tokens[0]);
            if tokens.len() == 1 {
                pending.borrow_mut().finish(which, logprob);
                continue;
            }
            let mut cache = KvCache::new(&self.runtime.config, seq.cache.len() + tokens.len());
            cache.copy_prefix_from(&seq.cache, seq.cache.len());
            forks.push(Fork {
                cache,
                adapter: seq.job.adapter.clone(),
                tokens,
                pos: 0,
                logprob,
                which,
                pending: pending.clone(),
            });
        }
        forks
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
        penalize(logits, &seq.job.sampling, &seq.counts);
        // Log-probabilities are read from the penalized logits, before the grammar's mask and
        // the temperature (the chosen token is never masked, so its logit is still there after).
        let report = seq.job.sampling.logprobs.map(|k| self.top_logprobs(logits, k));
        if let Some(constraint) = seq.job.constraint.as_mut() {
            if let Err(e) = constraint.mask(logits) {
                let _ = seq.job.events.send(Event::Failed(format!("the grammar failed: {e}")));
                return false;
            }
        }
        let token = pick(logits, &seq.job.sampling, seq.job.seed, position, banned);
        if let Some(constraint) = seq.job.constraint.as_mut() {
            if let Err(e) = constraint.accept(token) {
                let _ = seq.job.events.send(Event::Failed(format!("the grammar failed: {e}")));
                return false;
            }
        }
        let is_eos = self.eos.contains(&token) && !seq.job.sampling.ignore_eos;
        if let Some((lse, top)) = report {
            if !is_eos {
                let _ = seq.job.events.send(Event::Logprob(self.token_logprob(logits, lse, token, top)));
            }
        }
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
        if is_eos {
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
        // A grammar that is complete with nothing allowed after it ends the answer here.
        if seq.job.constraint.as_ref().is_some_and(Constraint::is_stopped) {
            finish(seq, FinishReason::Stop);
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

/// `log softmax(logits)[token]`, in f64 so long label sums keep their precision.
fn log_softmax_at(logits: &[f32], token: u32) -> f64 {
    logits.get(token as usize).map_or(f64::NEG_INFINITY, |&l| l as f64 - log_sum_exp(logits))
}

/// Whether two sequences run on the same adapter version (or both on the base).
fn same_adapter(a: &Seq, b: &Seq) -> bool {
    match (&a.job.adapter, &b.job.adapter) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}
