//! Turns a running generation into an OpenAI answer: one JSON body, or SSE `data:` events.
//!
//! Both paths read the same event stream, so a streamed answer concatenates to exactly the
//! text of the non-streamed one.

use std::sync::Arc;
use std::time::Instant;

use actix_web::HttpResponse;
use bytes::Bytes;
use futures::stream;
use tokio::sync::OwnedSemaphorePermit;

use crate::engine::{Event, FinishReason, Generation};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::Usage;

pub(crate) const FINGERPRINT: &str = "switchyard";

/// Which OpenAI object family the answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// What a generation request resolved to, for the request metrics' labels (only resolved
/// names, so client input never becomes a label).
#[derive(Debug, Clone)]
pub struct Served {
    pub model: String,
    /// `name@version`, or empty for the base.
    pub adapter: String,
}

/// A generation admitted under a concurrency permit; both are released when this drops.
pub struct Running {
    pub generation: Generation,
    /// Choices 1..n of an `n` request (choice 0 is `generation`).
    pub more: Vec<Generation>,
    pub _permit: OwnedSemaphorePermit,
    pub metrics: Arc<Metrics>,
    pub model: String,
    pub started: Instant,
    /// The limiter to charge the tokens to, the caller, and its stream slot (freed on drop).
    pub limits: Option<(Arc<crate::limits::Limiter>, crate::auth::Principal, Option<crate::limits::StreamSlot>)>,
    pub served: Served,
    /// Where to log the finished completion (for feedback), with what is known up front.
    pub log: Option<(Arc<crate::feedback::FeedbackStore>, crate::feedback::Draft)>,
    /// How it went, for the release evidence of the version that served.
    pub outcome: Outcome,
    /// Told the answer when it finishes: a shadow generation compares against it.
    pub shadow: Option<tokio::sync::oneshot::Sender<crate::shadow::ServedAnswer>>,
}

/// What became of a generation, as releases count it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Outcome {
    pub first_token_seconds: Option<f64>,
    /// `Some(true)` finished, `Some(false)` failed, `None` abandoned (the client left).
    pub finished: Option<bool>,
}

impl Running {
    /// Notes the first generated text: time to first token, by the version that served.
    pub(crate) fn first_token(&mut self) {
        let secs = self.started.elapsed().as_secs_f64();
        self.metrics.time_to_first_token.with_label_values(&[&self.served.adapter]).observe(secs);
        self.outcome.first_token_seconds = Some(secs);
    }

    /// Notes that the engine failed this generation.
    pub(crate) fn failed(&mut self) {
        self.outcome.finished = Some(false);
    }

    /// Logs the finished completion when logging is wired up for it.
    pub(crate) fn log_completion(&mut self, envelope: &Envelope, answer: &str, finish_reason: &str, usage: &Usage) {
        self.outcome.finished = Some(true);
        if let Some(tx) = self.shadow.take() {
            let _ = tx.send(crate::shadow::ServedAnswer {
                id: envelope.id.clone(),
                text: answer.to_owned(),
                seconds: self.started.elapsed().as_secs_f64(),
                tokens: usage.completion_tokens,
            });
        }
        if let Some((store, draft)) = &self.log {
            store.log_completion(protocol::CompletionRecord {
                id: envelope.id.clone(),
                created: envelope.created,
                tenant: draft.tenant.clone(),
                sub: draft.sub.clone(),
                model: self.served.model.clone(),
                adapter: self.served.adapter.clone(),
                prompt: draft.prompt.clone(),
                answer: answer.to_owned(),
                finish_reason: finish_reason.to_owned(),
                params: draft.params.clone(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            });
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.metrics.active_generations.dec();
        if let Some(ok) = self.outcome.finished {
            self.metrics.served.record(&self.served.adapter, ok, self.outcome.first_token_seconds);
        }
    }
}

/// The identity shared by every chunk of one answer.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Envelope {
    /// A task's envelope: its own id prefix (`clf`, `qa`, `gen`, `rec`), logged as a chat answer.
    pub fn task(prefix: &str, model: String) -> Self {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { kind: Kind::Chat, id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()), created, model }
    }

    pub fn new(kind: Kind, model: String) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { kind, id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()), created, model }
    }
}

/// A whole generation: its text, why it ended and what it used (counted and logged).
pub struct Collected {
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
}

/// Reads the whole generation, charges its tokens and logs it under the envelope's id.
pub async fn collect(envelope: &Envelope, run: &mut Running) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut first = true;
    while let Some(event) = run.generation.events.recv().await {
        match event {
            Event::Delta(d) => {
                if first {
                    run.first_token();
                    first = false;
                }
                text.push_str(&d)
            }
            Event::Logprob(_) | Event::PromptLogprobs(_) => {}
            Event::Finished { reason, completion_tokens, cached_tokens } => {
                let usage = Usage::new(run.generation.prompt_tokens, completion_tokens).with_cached(cached_tokens);
                count_tokens(run, &usage);
                run.log_completion(envelope, &text, reason.as_str(), &usage);
                return Ok(Collected { text, reason, usage });
            }
            Event::Failed(msg) => {
                run.failed();
                return Err(ApiError::Internal(msg));
            }
        }
    }
    run.failed();
    Err(ApiError::Internal("the engine ended the generation without finishing it".into()))
}

pub(crate) fn count_tokens(run: &Running, usage: &Usage) {
    if let Some((limiter, caller, _)) = &run.limits {
        limiter.charge(caller, usage.total_tokens as u64);
    }
    let labels = [run.model.as_str(), run.served.adapter.as_str()];
    run.metrics.prompt_tokens.with_label_values(&labels).inc_by(usage.prompt_tokens as u64);
    run.metrics.completion_tokens.with_label_values(&labels).inc_by(usage.completion_tokens as u64);
    if let Some(details) = &usage.prompt_tokens_details {
        run.metrics.cached_prompt_tokens.with_label_values(&labels).inc_by(details.cached_tokens as u64);
    }
}

/// A `text/event-stream` answer of `body`, unbuffered by caches and proxies.
pub fn sse_response<S>(body: S) -> HttpResponse
where
    S: futures::Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
{
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

pub(crate) fn sse_text(json: &str) -> String {
    format!("data: {json}\n\n")
}

pub(crate) fn sse(json: &str) -> Bytes {
    Bytes::from(sse_text(json))
}

/// Streams a task's generation (Q&A, templated generation) as server-sent events: `first`
/// (what the task knows before generating, such as citations), then `{id, object:
/// "<object>.delta", delta}` per piece of text, then `{id, object: "<object>.done",
/// finish_reason, usage}`, then `data: [DONE]`. The answer is logged under the envelope's id.
pub fn streamed_task(envelope: Envelope, run: Running, first: serde_json::Value, object: &'static str) -> HttpResponse {
    struct TaskSse {
        envelope: Envelope,
        run: Running,
        first: Option<serde_json::Value>,
        text: String,
        done: bool,
        pending: Vec<String>,
    }
    let state = TaskSse { envelope, run, first: Some(first), text: String::new(), done: false, pending: Vec::new() };
    let body = stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(frame) = s.pending.pop() {
                return Some((Ok::<_, actix_web::Error>(Bytes::from(frame)), s));
            }
            if s.done {
                return None;
            }
            if let Some(first) = s.first.take() {
                return Some((Ok(sse(&first.to_string())), s));
            }
            let Some(event) = s.run.generation.events.recv().await else {
                s.done = true;
                let err = ApiError::Internal("the engine ended the generation without finishing it".into());
                return Some((Ok(sse(&serde_json::to_string(&err.body()).unwrap_or_default())), s));
            };
            match event {
                Event::Delta(d) if d.is_empty() => continue,
                Event::Logprob(_) | Event::PromptLogprobs(_) => continue,
                Event::Delta(d) => {
                    if s.text.is_empty() {
                        s.run.first_token();
                    }
                    s.text.push_str(&d);
                    let frame =
                        serde_json::json!({"id": s.envelope.id, "object": format!("{object}.delta"), "delta": d});
                    return Some((Ok(sse(&frame.to_string())), s));
                }
                Event::Finished { reason, completion_tokens, cached_tokens } => {
                    let usage =
                        Usage::new(s.run.generation.prompt_tokens, completion_tokens).with_cached(cached_tokens);
                    count_tokens(&s.run, &usage);
                    s.run.log_completion(&s.envelope, &s.text, reason.as_str(), &usage);
                    s.done = true;
                    s.pending.push("data: [DONE]\n\n".to_owned());
                    let frame = serde_json::json!({
                        "id": s.envelope.id, "object": format!("{object}.done"),
                        "finish_reason": reason.as_str(), "usage": usage,
                    });
                    return Some((Ok(sse(&frame.to_string())), s));
                }
                Event::Failed(msg) => {
                    s.run.failed();
                    tracing::error!(error = %msg, "task generation failed mid-stream");
                    s.done = true;
                    let err = ApiError::Internal(msg);
                    return Some((Ok(sse(&serde_json::to_string(&err.body()).unwrap_or_default())), s));
                }
            }
        }
    });
    sse_response(body)
}
