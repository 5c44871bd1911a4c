//! Item recommendation for applications: items registered with text, metadata and an
//! embedding, behaviour events (user, item, event, weight, time), and a ranking per user that
//! mixes similarity to the user's recent items with popularity and recency, each result with a
//! short human reason.
//!
//! Main types: [`Recommender`] (the store, `Send + Sync`, every method `&self`), [`Item`],
//! [`Event`] / [`NewEvent`], [`Query`] → [`Recommendation`] of [`Ranked`], [`RecommendError`].
//!
//! It must never speak HTTP or compute embeddings: the gateway embeds item text with
//! all-MiniLM-L6-v2 and passes the vector in. Tenants never see each other's items, events or
//! users: every call names its tenant and touches only that tenant's directory and memory.
//!
//! # Storage
//!
//! Per tenant, a directory `<root>/<hex of the tenant name's UTF-8 bytes>/` (so any name is a
//! safe path; names are 1..=127 bytes) holding:
//! - `items.jsonl`: one line per upsert, the [`Item`] plus its `vector` as given; the last line
//!   for an id wins, except that `created` stays the first registration's;
//! - `events.jsonl`: one [`Event`] per line.
//!
//! Both are appended through [`protocol::jsonl::Appender`] with fsync before a call returns Ok,
//! and read with [`protocol::jsonl::for_each_from`], which skips torn lines. Several gateway
//! replicas may append to the same files. Memory is a fold of the files in file order: a write
//! appends its line and then catches the tenant up from the byte offset it had reached, reading
//! its own line back with whatever others appended, so every process applies the same lines
//! in the same order. [`Recommender::refresh`] catches every tenant up (new tenant directories
//! included) and only stats the files when nothing changed; [`Recommender::open`] is a refresh
//! from offset 0. Memory per tenant: items (id → index, vectors L2-normalised in a row-major
//! matrix), each user's events sorted by time, and each item's popularity as a running decayed
//! sum relative to an anchor time, so a query costs O(items), not O(events).
//!
//! # Ranking
//!
//! With `d(t) = 0.5^((now − t) / 7 days)`, an event of weight `w` at time `t` counts `w·d(t)`.
//! - profile = normalise(Σ over the user's latest 50 events of `w·d(t)` × the item's vector);
//! - similarity(c) = max(0, cosine(profile, c)) (raw cosine clamped at 0, so unrelated items
//!   get 0 rather than 0.5 and the embedding's spread is kept);
//! - popularity(c) = ln(1 + Σ over all users' events on c of `w·d(t)`) / the same maximum over
//!   the tenant's items (0 when there are no events);
//! - recency(c) = 0.5^((now − c.created) / 30 days).
//!
//! A user with events scores `0.70·similarity + 0.20·popularity + 0.10·recency`; a user with
//! none (a cold start) scores `0.8·popularity + 0.2·recency`. Candidates are the query's ids or
//! every item; `exclude_seen` drops items the user has any event on. Results are sorted by
//! score (ties by id) and cut to `k`. With `diversity` d > 0, greedy MMR over the best
//! max(50, 10·k) instead picks next the item maximising `(1 − d)·score − d·max cosine to the
//! items already picked`, and the results come in pick order.
//!
//! Reasons: a user with events gets `similar to "<text of the history item closest to it, 60
//! chars at most>" you <purchased|viewed|…>`, plus `, popular right now` at popularity ≥ 0.5
//! (an item near no other history item, cosine < 0.3, gets "you <purchased|…> this before"
//! when it is itself in the history, else "popular right now", "new item" or "different from
//! your recent items"). A cold start gets "popular with other users (no history for you yet)",
//! or, for an item nobody has touched, "new item (no history for you yet)" ("from the
//! catalogue (no history for you yet)" once it is over 30 days old).

mod error;
mod model;
mod rank;
mod store;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

pub use error::RecommendError;
pub use model::{default_weight, Event, Item, NewEvent, Query, Ranked, Recommendation};
use store::Tenant;

/// Items, events and rankings for every tenant under one directory.
pub struct Recommender {
    root: PathBuf,
    dimension: usize,
    /// Keyed by the tenant's directory name.
    tenants: RwLock<HashMap<String, Arc<RwLock<Tenant>>>>,
}

impl Recommender {
    /// Opens (creating it if needed) the store at `root` for vectors of `dimension` values and
    /// reads every tenant in it.
    pub fn open(root: &Path, dimension: usize) -> Result<Self, RecommendError> {
        if dimension == 0 {
            return Err(RecommendError::invalid("dimension", "must be at least 1"));
        }
        std::fs::create_dir_all(root).map_err(|e| RecommendError::io(root, e))?;
        let recommender = Self { root: root.to_owned(), dimension, tenants: RwLock::new(HashMap::new()) };
        recommender.refresh()?;
        Ok(recommender)
    }

    /// Registers or replaces an item (same id: text/metadata/vector replaced, `created` kept).
    /// Returns the stored item and whether it was new.
    pub fn upsert_item(
        &self,
        tenant: &str,
        id: &str,
        text: &str,
        metadata: serde_json::Value,
        vector: Vec<f32>,
        now: u64,
    ) -> Result<(Item, bool), RecommendError> {
        let name = model::tenant_dir_name(tenant)?;
        model::check_item(id, text, &metadata, &vector, self.dimension)?;
        let tenant = self.tenant_for_write(&name)?;
        let mut t = tenant.write();
        t.catch_up()?;
        let created = t.index_of(id).map(|i| t.items[i].created);
        let item =
            Item { id: id.to_owned(), text: text.to_owned(), metadata, created: created.unwrap_or(now), updated: now };
        t.append_item(&item, &vector)?;
        t.catch_up()?;
        Ok((item, created.is_none()))
    }

    pub fn get_item(&self, tenant: &str, id: &str) -> Result<Item, RecommendError> {
        let not_found = || RecommendError::NotFound { what: "item", id: id.to_owned() };
        let Some(tenant) = self.tenant_for_read(&model::tenant_dir_name(tenant)?)? else { return Err(not_found()) };
        let t = tenant.read();
        t.index_of(id).map(|i| t.items[i].clone()).ok_or_else(not_found)
    }

    /// How many items the tenant has (0 for an unknown tenant, or one that cannot be read).
    pub fn item_count(&self, tenant: &str) -> usize {
        let found = model::tenant_dir_name(tenant).and_then(|name| self.tenant_for_read(&name));
        match found {
            Ok(Some(t)) => t.read().items.len(),
            Ok(None) => 0,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a recommendation tenant");
                0
            }
        }
    }

    /// Records one event; the item must exist (NotFound otherwise, nothing stored). Durable
    /// (fsynced) when Ok, and the next [`Self::recommend`] here already counts it.
    pub fn record_event(&self, tenant: &str, event: NewEvent, now: u64) -> Result<Event, RecommendError> {
        let name = model::tenant_dir_name(tenant)?;
        let event = model::resolve_event(event, now)?;
        let not_found = || RecommendError::NotFound { what: "item", id: event.item.clone() };
        let Some(tenant) = self.tenant_for_read(&name)? else { return Err(not_found()) };
        let mut t = tenant.write();
        t.catch_up()?;
        if t.index_of(&event.item).is_none() {
            return Err(not_found());
        }
        t.append_event(&event)?;
        t.catch_up()?;
        Ok(event)
    }

    /// Ranks items for `query.user`; see the crate docs for the formula.
    pub fn recommend(&self, tenant: &str, query: &Query) -> Result<Recommendation, RecommendError> {
        let name = model::tenant_dir_name(tenant)?;
        model::check_query(query)?;
        match self.tenant_for_read(&name)? {
            Some(tenant) => rank::rank(&tenant.read(), query),
            None => match query.candidates.as_deref() {
                Some([first, ..]) => Err(RecommendError::invalid("candidates", format!("unknown item id '{first}'"))),
                _ => Ok(Recommendation { items: Vec::new(), cold_start: true, history: Vec::new() }),
            },
        }
    }

    /// Reads what other processes appended to the shared files since this one last looked
    /// (tenants created meanwhile included); returns whether anything was new. When nothing
    /// changed it costs a directory listing and two `stat`s per tenant. A tenant that cannot
    /// be read does not stop the others; the first such error is returned after them.
    pub fn refresh(&self) -> Result<bool, RecommendError> {
        let entries = std::fs::read_dir(&self.root).map_err(|e| RecommendError::io(&self.root, e))?;
        let mut changed = false;
        let mut first_error = None;
        for entry in entries {
            let entry = entry.map_err(|e| RecommendError::io(&self.root, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            if !model::is_tenant_dir_name(&name) || !entry.path().is_dir() {
                continue;
            }
            let known = self.tenants.read().get(&name).cloned();
            let result = match known {
                Some(tenant) => catch_up_if_changed(&tenant),
                None => self.load(&name).map(|t| t.read().has_records()),
            };
            match result {
                Ok(c) => changed |= c,
                Err(e) => {
                    tracing::warn!(tenant_dir = %name, error = %e, "cannot catch up a recommendation tenant");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(changed), Err)
    }

    /// The tenant, creating its directory if it has none yet.
    fn tenant_for_write(&self, name: &str) -> Result<Arc<RwLock<Tenant>>, RecommendError> {
        if let Some(t) = self.tenants.read().get(name) {
            return Ok(t.clone());
        }
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| RecommendError::io(&dir, e))?;
        self.load(name)
    }

    /// The tenant, read from disk on first use (another replica may have created it); `None`
    /// when it has no directory.
    fn tenant_for_read(&self, name: &str) -> Result<Option<Arc<RwLock<Tenant>>>, RecommendError> {
        if let Some(t) = self.tenants.read().get(name) {
            return Ok(Some(t.clone()));
        }
        if !self.root.join(name).is_dir() {
            return Ok(None);
        }
        self.load(name).map(Some)
    }

    /// Reads a tenant's directory into memory; a racing loader's copy wins if it got there first.
    fn load(&self, name: &str) -> Result<Arc<RwLock<Tenant>>, RecommendError> {
        let loaded = Tenant::load(self.root.join(name), self.dimension)?;
        let mut tenants = self.tenants.write();
        Ok(tenants.entry(name.to_owned()).or_insert_with(|| Arc::new(RwLock::new(loaded))).clone())
    }
}

/// Catches a tenant up when its files grew, taking the write lock only then.
fn catch_up_if_changed(tenant: &RwLock<Tenant>) -> Result<bool, RecommendError> {
    if !tenant.read().files_changed()? {
        return Ok(false);
    }
    tenant.write().catch_up()
}
