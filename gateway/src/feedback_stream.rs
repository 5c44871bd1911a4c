//! Feedback shared through Redis: answered response ids (so any replica takes feedback on any
//! replica's answer), the one-per-user rule across replicas, and the `switchyard:feedback`
//! stream that the training sidecar reads with a consumer group (each record once, across
//! restarts), followed by review decisions. When Redis is down, entries go to an fsynced spool
//! file and are replayed, in order, once it is back; nothing acknowledged is lost. Keys, the
//! stream and its [`Envelope`] are `protocol`'s.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use protocol::jsonl::{self, Appender, Durability};
use protocol::names::{self, FEEDBACK_STREAM, STREAM_FIELD};
use protocol::{AnsweredBy, Envelope, FeedbackRecord, ReviewRecord};
use redis::AsyncCommands;

use crate::metrics::Metrics;

/// How long answered ids and one-per-user claims are kept in Redis.
const TTL_SECONDS: u64 = 30 * 24 * 3600;
const TIMEOUT: Duration = Duration::from_millis(250);
const REPLAY_EVERY: Duration = Duration::from_secs(1);

pub struct SharedFeedback {
    client: redis::Client,
    conn: OnceLock<redis::aio::ConnectionManager>,
    spool: PathBuf,
    /// Serialises spool appends and replays.
    spool_lock: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

async fn timed<T>(f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

impl SharedFeedback {
    /// Connects in the background and replays the spool whenever Redis is reachable.
    pub fn start(client: redis::Client, dir: &std::path::Path, metrics: Arc<Metrics>) -> Arc<Self> {
        let me = Arc::new(Self {
            client,
            conn: OnceLock::new(),
            spool: dir.join(names::SPOOL_FILE),
            spool_lock: tokio::sync::Mutex::new(()),
            metrics,
        });
        let task = me.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while task.conn.get().is_none() {
                match redis::aio::ConnectionManager::new(task.client.clone()).await {
                    Ok(c) => {
                        let _ = task.conn.set(c);
                    }
                    Err(e) => {
                        task.error("connect", &e.to_string());
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            loop {
                task.replay().await;
                tokio::time::sleep(REPLAY_EVERY).await;
            }
        });
        me
    }

    fn error(&self, op: &str, message: &str) {
        self.metrics.redis_errors.with_label_values(&[op]).inc();
        tracing::debug!(op, error = message, "Redis call for feedback failed");
    }

    fn conn(&self) -> Result<redis::aio::ConnectionManager, String> {
        self.conn.get().cloned().ok_or_else(|| "not connected".to_owned())
    }

    /// Records who answered `id`, for feedback arriving at another replica.
    pub async fn remember(&self, id: &str, by: &AnsweredBy) {
        let value = serde_json::to_string(by).unwrap_or_default();
        let result = match self.conn() {
            Ok(mut c) => timed(c.set_ex::<_, _, ()>(names::response_key(id), value, TTL_SECONDS)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.error("feedback_remember", &e);
        }
    }

    /// Who answered `id`, when another replica recorded it.
    pub async fn lookup(&self, id: &str) -> Option<AnsweredBy> {
        let mut c = self.conn().ok()?;
        match timed(c.get::<_, Option<String>>(names::response_key(id))).await {
            Ok(v) => v.and_then(|s| serde_json::from_str(&s).ok()),
            Err(e) => {
                self.error("feedback_lookup", &e);
                None
            }
        }
    }

    /// Claims the one feedback `sub` may give on `response_id`: `Some(true)` if this is the
    /// first, `Some(false)` if it was given (on any replica), `None` if Redis cannot say.
    pub async fn claim(&self, response_id: &str, sub: &str) -> Option<bool> {
        let mut c = self.conn().ok()?;
        let key = names::feedback_given_key(response_id, sub);
        let cmd = redis::cmd("SET").arg(&key).arg(1).arg("NX").arg("EX").arg(TTL_SECONDS).to_owned();
        match timed(cmd.query_async::<Option<String>>(&mut c)).await {
            Ok(v) => Some(v.is_some()),
            Err(e) => {
                self.error("feedback_claim", &e);
                None
            }
        }
    }

    /// Gives a claim back (the record could not be stored after all).
    pub async fn release(&self, response_id: &str, sub: &str) {
        if let Ok(mut c) = self.conn() {
            let _ = timed(c.del::<_, ()>(names::feedback_given_key(response_id, sub))).await;
        }
    }

    /// Adds a stored record to the stream, or to the spool when Redis does not take it.
    pub async fn publish(&self, record: &FeedbackRecord) {
        self.publish_envelope(Envelope::feedback(record.clone())).await;
    }

    /// Adds an admin's review decision to the stream, so the sidecar learns which records may
    /// be trained on.
    pub async fn publish_review(&self, review: &ReviewRecord) {
        self.publish_envelope(Envelope::Review(review.clone())).await;
    }

    async fn publish_envelope(&self, envelope: Envelope) {
        // Behind the spool lock, so an entry never overtakes older spooled ones.
        let _guard = self.spool_lock.lock().await;
        if self.spool_is_empty() {
            match self.xadd(&envelope).await {
                Ok(()) => return,
                Err(e) => self.error("feedback_publish", &e),
            }
        }
        if let Err(e) = self.append_spool(&envelope) {
            tracing::error!(error = %e, "feedback could not be spooled; it stays in {}", names::FEEDBACK_FILE);
        }
    }

    async fn xadd(&self, envelope: &Envelope) -> Result<(), String> {
        let mut c = self.conn()?;
        let json = envelope.to_json();
        timed(c.xadd::<_, _, _, _, String>(FEEDBACK_STREAM, "*", &[(STREAM_FIELD, json)])).await.map(|_| ())
    }

    fn spool_is_empty(&self) -> bool {
        std::fs::metadata(&self.spool).map_or(true, |m| m.len() == 0)
    }

    fn append_spool(&self, envelope: &Envelope) -> Result<(), protocol::ProtocolError> {
        Appender::open(&self.spool)?.append(envelope, Durability::Synced).map(|_| ())
    }

    /// Sends spooled entries in order; what is not sent stays spooled. Lines that are not a
    /// whole entry (a torn tail) are skipped with a warning and dropped at the next rewrite.
    async fn replay(&self) {
        let _guard = self.spool_lock.lock().await;
        if self.spool_is_empty() {
            return;
        }
        let spooled = match jsonl::read::<Envelope>(&self.spool) {
            Ok(spooled) => spooled,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the feedback spool");
                return;
            }
        };
        let mut sent = 0;
        for envelope in &spooled.records {
            match self.xadd(envelope).await {
                Ok(()) => sent += 1,
                Err(e) => {
                    self.error("feedback_replay", &e);
                    break;
                }
            }
        }
        if sent == 0 && spooled.skipped == 0 {
            return;
        }
        let left = &spooled.records[sent..];
        // Write-then-rename, so a crash here never loses the unsent tail.
        match jsonl::replace(&self.spool, left) {
            Ok(()) => tracing::info!(sent, left = left.len(), "replayed spooled feedback into Redis"),
            Err(e) => tracing::error!(error = %e, "cannot rewrite the feedback spool; records may be sent twice"),
        }
    }
}
