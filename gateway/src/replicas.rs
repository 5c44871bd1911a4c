//! How a replica learns that another process changed a store every replica shares on disk: the
//! adapter registry and the knowledge bases, each a [`Refresh`].
//!
//! Without Redis, each replica polls ([`watch`], every [`POLL`]) and refreshes when the store's
//! generation moved. With Redis, after a change one replica also publishes on the store's
//! channel and every replica (itself included) refreshes at once ([`follow`]); on every
//! (re)subscription a replica refreshes too, so one that missed messages while disconnected
//! catches up as soon as it is back.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;

/// Where replicas announce registry changes (the adapter's name is the message).
pub const REGISTRY_CHANNEL: &str = "switchyard:registry";
/// Where replicas announce knowledge-base changes.
pub const KNOWLEDGE_CHANNEL: &str = "switchyard:knowledge";

/// How often [`watch`] looks at a store's generation: a change elsewhere is served here within
/// this (plus the refresh itself).
pub const POLL: Duration = Duration::from_millis(200);

/// A store several replicas share on disk that can catch up with the others' changes.
pub trait Refresh: Send + Sync + 'static {
    /// What the logs call it.
    fn name(&self) -> &'static str;
    /// Reads what changed on disk, when its generation moved; true when something did. A
    /// failure keeps what is loaded.
    fn refresh(&self) -> Result<bool, String>;
}

impl Refresh for adapters::Registry {
    fn name(&self) -> &'static str {
        "adapter registry"
    }

    fn refresh(&self) -> Result<bool, String> {
        self.reload_if_changed().map_err(|e| e.to_string())
    }
}

impl Refresh for knowledge::store::KnowledgeBases {
    fn name(&self) -> &'static str {
        "knowledge bases"
    }

    fn refresh(&self) -> Result<bool, String> {
        knowledge::store::KnowledgeBases::refresh(self).map_err(|e| e.to_string())
    }
}

/// Refreshes `store` every [`POLL`] for as long as the process runs (each distinct failure
/// logged once).
pub fn watch(store: Arc<dyn Refresh>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_error = String::new();
        loop {
            tick.tick().await;
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.refresh()).await {
                Ok(Ok(changed)) => {
                    if changed {
                        tracing::debug!(store = store.name(), "changed on disk; refreshed");
                    }
                    last_error.clear();
                }
                Ok(Err(e)) if e != last_error => {
                    tracing::error!(error = %e, store = store.name(), "refresh failed; keeping what is loaded");
                    last_error = e;
                }
                Ok(Err(_)) => {}
                Err(e) => tracing::error!(error = %e, "store watch task failed"),
            }
        }
    });
}

/// Publishes changes on one channel; cheap to clone.
#[derive(Clone)]
pub struct Announcer {
    conn: redis::aio::ConnectionManager,
    channel: &'static str,
}

impl Announcer {
    pub async fn connect(client: &redis::Client, channel: &'static str) -> redis::RedisResult<Self> {
        Ok(Self { conn: redis::aio::ConnectionManager::new(client.clone()).await?, channel })
    }

    /// Tells every replica that `what` changed. A failure is logged, not returned: the change
    /// is already on disk, replicas poll it, and they refresh on their next reconnect.
    pub async fn announce(&self, what: &str) {
        let mut conn = self.conn.clone();
        if let Err(e) = conn.publish::<_, _, ()>(self.channel, what).await {
            tracing::warn!(error = %e, channel = self.channel, what, "could not publish a change; replicas catch up on reconnect");
        }
    }
}

/// Refreshes `store` whenever a replica announces a change on `channel` (and on every
/// (re)subscription), for as long as the process runs.
pub fn follow(client: redis::Client, channel: &'static str, store: Arc<dyn Refresh>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let listened = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(channel).await?;
                // Subscribed: whatever happened while we were away is on disk.
                refresh_now(&store).await;
                let mut messages = pubsub.on_message();
                while messages.next().await.is_some() {
                    refresh_now(&store).await;
                }
                Ok::<_, redis::RedisError>(())
            };
            match listened.await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => tracing::warn!(error = %e, channel, retry_in = ?backoff, "subscription lost"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

async fn refresh_now(store: &Arc<dyn Refresh>) {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.refresh()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, store = store.name(), "refresh failed; keeping what is loaded"),
        Err(e) => tracing::error!(error = %e, "store refresh task failed"),
    }
}
