//! The embedding model behind `/v1/embeddings`: the loaded `SentenceEncoder` and the batcher
//! task that merges concurrent requests' inputs into one forward on a blocking thread.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Histogram;
use runtime::bert::SentenceEncoder;
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::validate::EmbedLimits;

/// How long the batcher waits, from a request's arrival, for others to join its forward.
pub const BATCH_WINDOW: Duration = Duration::from_millis(2);
/// Inputs past which the batcher stops waiting and runs the batch it has (a single request
/// larger than this runs alone; the encoder cuts every forward to its token budget anyway).
pub const MAX_BATCH_INPUTS: usize = 256;
/// Requests that may wait for the batcher; past it a request gets 429 rather than waiting.
const QUEUE_DEPTH: usize = 512;

/// The served embedding model; built once at start-up, shared by every worker.
pub struct Embeddings {
    /// The name clients use in `model`: the directory's name (`all-MiniLM-L6-v2`).
    pub id: String,
    /// Unix seconds when it was loaded (the model card's `created`).
    pub created: u64,
    encoder: Arc<SentenceEncoder>,
    batcher: Batcher,
}

impl Embeddings {
    /// Loads the model directory (blocking, about a second) and starts the batcher task; call
    /// inside the server's runtime, before it serves.
    pub fn start(dir: &Path, metrics: &Metrics) -> Result<Self, runtime::RuntimeError> {
        let encoder = Arc::new(SentenceEncoder::load(dir)?);
        let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or("embeddings").to_owned();
        let forward = {
            let encoder = encoder.clone();
            move |batch: Vec<Vec<u32>>| encoder.embed(&batch).map_err(|e| e.to_string())
        };
        let batcher = Batcher::spawn(forward, metrics.embedding_batch_size.clone());
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(Self { id, created, encoder, batcher })
    }

    pub fn limits(&self) -> EmbedLimits {
        EmbedLimits { dimension: self.encoder.dimension(), vocab_size: self.encoder.vocab_size() }
    }

    /// Most tokens of one input, `[CLS]` and `[SEP]` included.
    pub fn max_tokens(&self) -> usize {
        self.encoder.max_tokens()
    }

    /// The encoder, for tokenizing on a blocking thread.
    pub fn encoder(&self) -> Arc<SentenceEncoder> {
        self.encoder.clone()
    }

    /// Embeds one request's token lists in the batcher's next forward.
    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, ApiError> {
        self.batcher.run(inputs).await
    }
}

/// One request waiting for the batcher.
struct Job {
    inputs: Vec<Vec<u32>>,
    arrived: Instant,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// The handle of the batcher task (an actor owning the queue): requests go in, each gets its
/// own vectors back.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the task. `forward` runs on a blocking thread, one batch at a time, and returns
    /// one vector per input in order.
    pub fn spawn<F>(forward: F, batch_size: Histogram) -> Self
    where
        F: Fn(Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, String> + Send + Sync + 'static,
    {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(batch_loop(rx, Arc::new(forward), batch_size));
        Self { queue }
    }

    /// Queues `inputs` and waits for their vectors; 429 when the queue is full.
    pub async fn run(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.queue.try_send(Job { inputs, arrived: Instant::now(), reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::RateLimited {
                message: "too many embedding requests are waiting; retry shortly".into(),
                code: "concurrency_limit_exceeded",
            },
            mpsc::error::TrySendError::Closed(_) => ApiError::Unavailable { message: "embeddings are stopping".into() },
        })?;
        answer
            .await
            .map_err(|_| ApiError::Internal("the embedding batcher stopped".into()))?
            .map_err(ApiError::Internal)
    }
}

/// Collects the requests that arrive within [`BATCH_WINDOW`] of the first (or up to
/// [`MAX_BATCH_INPUTS`] inputs), runs them as one forward, and splits the vectors. Requests
/// that queued while a forward ran are older than the window and go at once.
async fn batch_loop<F>(mut rx: mpsc::Receiver<Job>, forward: Arc<F>, batch_size: Histogram)
where
    F: Fn(Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, String> + Send + Sync + 'static,
{
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let deadline = tokio::time::Instant::from_std(first.arrived + BATCH_WINDOW);
        let mut count = first.inputs.len();
        let mut jobs = vec![first];
        while count < MAX_BATCH_INPUTS {
            // `timeout_at` polls `recv` before the clock, so what is already queued joins even
            // when the window has passed.
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) if count + job.inputs.len() > MAX_BATCH_INPUTS => {
                    carried = Some(job);
                    break;
                }
                Ok(Some(job)) => {
                    count += job.inputs.len();
                    jobs.push(job);
                }
                Ok(None) | Err(_) => break,
            }
        }
        // A client that left no longer needs its forward.
        jobs.retain(|job| !job.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let sizes: Vec<usize> = jobs.iter().map(|job| job.inputs.len()).collect();
        let batch: Vec<Vec<u32>> = jobs.iter_mut().flat_map(|job| std::mem::take(&mut job.inputs)).collect();
        batch_size.observe(batch.len() as f64);
        let expected = batch.len();
        let run = forward.clone();
        let result = tokio::task::spawn_blocking(move || run(batch))
            .await
            .unwrap_or_else(|e| Err(format!("the embedding forward failed: {e}")))
            .and_then(|vectors| {
                if vectors.len() == expected {
                    Ok(vectors)
                } else {
                    Err(format!("the embedding forward returned {} vectors for {expected} inputs", vectors.len()))
                }
            });
        match result {
            Ok(vectors) => {
                let mut vectors = vectors.into_iter();
                for (job, n) in jobs.into_iter().zip(sizes) {
                    let _ = job.reply.send(Ok(vectors.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// A batcher whose forward returns each input's first id as a one-float vector and records
    /// the size of every forward.
    fn recording() -> (Batcher, Arc<Mutex<Vec<usize>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let forward = move |batch: Vec<Vec<u32>>| {
            seen.lock().push(batch.len());
            Ok(batch.iter().map(|ids| vec![ids[0] as f32]).collect())
        };
        (Batcher::spawn(forward, Metrics::new().embedding_batch_size.clone()), calls)
    }

    #[tokio::test]
    async fn requests_queued_together_run_as_one_forward_and_get_their_own_vectors() {
        let (batcher, calls) = recording();
        // On this single-threaded runtime all three are queued before the batcher task runs.
        let (a, b, c) =
            tokio::join!(batcher.run(vec![vec![1]]), batcher.run(vec![vec![2], vec![3]]), batcher.run(vec![vec![4]]));
        assert_eq!(a.unwrap(), vec![vec![1.0]]);
        assert_eq!(b.unwrap(), vec![vec![2.0], vec![3.0]]);
        assert_eq!(c.unwrap(), vec![vec![4.0]]);
        assert_eq!(*calls.lock(), vec![4]);
    }

    #[tokio::test]
    async fn a_request_that_would_overflow_the_batch_waits_for_the_next_forward() {
        let (batcher, calls) = recording();
        let big = vec![vec![7]; MAX_BATCH_INPUTS - 1];
        let (a, b) = tokio::join!(batcher.run(big), batcher.run(vec![vec![8], vec![9]]));
        assert_eq!(a.unwrap().len(), MAX_BATCH_INPUTS - 1);
        assert_eq!(b.unwrap(), vec![vec![8.0], vec![9.0]]);
        assert_eq!(*calls.lock(), vec![MAX_BATCH_INPUTS - 1, 2]);
    }

    #[tokio::test]
    async fn a_failed_forward_fails_every_request_in_it() {
        let batcher = Batcher::spawn(|_| Err("boom".to_owned()), Metrics::new().embedding_batch_size.clone());
        let (a, b) = tokio::join!(batcher.run(vec![vec![1]]), batcher.run(vec![vec![2]]));
        assert_eq!(a.unwrap_err().code(), "internal_error");
        assert_eq!(b.unwrap_err().code(), "internal_error");
    }
}
