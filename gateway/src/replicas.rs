//! How a replica learns that another process changed the shared registry.
//!
//! Every replica shares the registry directory. Without Redis, each one polls the registry's
//! generation counter ([`watch`], every [`POLL`]) and reloads when it moved. With Redis, after a
//! change one replica also publishes the adapter's name and every replica (itself included)
//! reloads at once; on every (re)subscription a replica reloads too, so one that missed
//! messages while disconnected catches up as soon as it is back.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;

const CHANNEL: &str = "switchyard:registry";
/// Where replicas announce knowledge-base changes.
pub const KNOWLEDGE_CHANNEL: &str = "switchyard:knowledge";

/// How often [`watch`] reads the generation counter: a change elsewhere is served here within
/// this (plus the reload itself).
pub const POLL: Duration = Duration::from_millis(200);

/// Polls the registry's generation counter for as long as the process runs and reloads the
/// snapshot when another process moved it. A failing reload keeps the previous snapshot and
/// is logged once per distinct error.
pub fn watch(registry: Arc<adapters::Registry>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_error = String::new();
        loop {
            tick.tick().await;
            let r = registry.clone();
            match tokio::task::spawn_blocking(move || r.reload_if_changed()).await {
                Ok(Ok(reloaded)) => {
                    if reloaded {
                        tracing::debug!("registry changed on disk; reloaded");
                    }
                    last_error.clear();
                }
                Ok(Err(e)) if e.to_string() != last_error => {
                    last_error = e.to_string();
                    tracing::error!(error = %e, "registry reload failed; keeping the previous snapshot");
                }
                Ok(Err(_)) => {}
                Err(e) => tracing::error!(error = %e, "registry watch task failed"),
            }
        }
    });
}

/// Publishes registry changes; cheap to clone.
#[derive(Clone)]
pub struct Announcer {
    conn: redis::aio::ConnectionManager,
    channel: &'static str,
}

impl Announcer {
    pub async fn connect(client: &redis::Client) -> redis::RedisResult<Self> {
        Ok(Self { conn: redis::aio::ConnectionManager::new(client.clone()).await?, channel: CHANNEL })
    }

    /// The same connection, announcing on another channel.
    pub fn on(self, channel: &'static str) -> Self {
        Self { channel, ..self }
    }

    /// Tells every replica that `adapter` changed. A failure is logged, not returned: the change
    /// is already on disk, and replicas reload on their next reconnect.
    pub async fn announce(&self, adapter: &str) {
        let mut conn = self.conn.clone();
        if let Err(e) = conn.publish::<_, _, ()>(self.channel, adapter).await {
            tracing::warn!(error = %e, adapter, "could not publish a registry change; replicas catch up on reconnect");
        }
    }
}

/// Reloads `registry` whenever any replica announces a change, for as long as the process runs.
pub fn follow(client: redis::Client, registry: Arc<adapters::Registry>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match listen(&client, &registry).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "registry subscription lost"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

async fn listen(client: &redis::Client, registry: &Arc<adapters::Registry>) -> redis::RedisResult<()> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(CHANNEL).await?;
    // Subscribed: whatever happened while we were away is on disk.
    reload(registry).await;
    let mut messages = pubsub.on_message();
    while let Some(msg) = messages.next().await {
        let adapter: String = msg.get_payload().unwrap_or_default();
        tracing::debug!(adapter, "registry change announced");
        reload(registry).await;
    }
    Ok(())
}

async fn reload(registry: &Arc<adapters::Registry>) {
    let registry = registry.clone();
    match tokio::task::spawn_blocking(move || registry.reload()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "registry reload failed; keeping the previous snapshot"),
        Err(e) => tracing::error!(error = %e, "registry reload task failed"),
    }
}

/// A store several replicas share on disk that can catch up with the others' changes.
pub trait Refresh: Send + Sync + 'static {
    /// What the logs call it.
    fn name(&self) -> &'static str;
    /// Reads what changed on disk; true when something did.
    fn refresh(&self) -> Result<bool, String>;
}

impl Refresh for knowledge::store::KnowledgeBases {
    fn name(&self) -> &'static str {
        "knowledge bases"
    }

    fn refresh(&self) -> Result<bool, String> {
        knowledge::store::KnowledgeBases::refresh(self).map_err(|e| e.to_string())
    }
}

/// Refreshes `store` every [`POLL`] for as long as the process runs (each failure logged once).
pub fn watch_store(store: Arc<dyn Refresh>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_error = String::new();
        loop {
            tick.tick().await;
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.refresh()).await {
                Ok(Ok(_)) => last_error.clear(),
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

/// Refreshes `store` whenever a replica announces a change on `channel` (and on every
/// (re)subscription), for as long as the process runs.
pub fn follow_store(client: redis::Client, channel: &'static str, store: Arc<dyn Refresh>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let listened = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(channel).await?;
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
