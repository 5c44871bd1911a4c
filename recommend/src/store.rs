//! One tenant's files and the in-memory state folded from them, caught up by byte offset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use protocol::jsonl::{self, Appender, Durability};
use serde::{Deserialize, Serialize};

use crate::model::{check_vector, Event, Item};
use crate::rank::{decay, HALF_LIFE_S};
use crate::RecommendError;

const ITEMS_FILE: &str = "items.jsonl";
const EVENTS_FILE: &str = "events.jsonl";

/// Popularity sums are kept relative to an anchor time; an event this many half-lives after it
/// moves the anchor, so the stored sums never overflow.
const REBASE_HALF_LIVES: f64 = 64.0;

/// One line of `items.jsonl`: the item and its vector as the caller gave it.
#[derive(Deserialize)]
struct ItemLine {
    id: String,
    text: String,
    metadata: serde_json::Value,
    created: u64,
    updated: u64,
    vector: Vec<f32>,
}

#[derive(Serialize)]
struct ItemLineRef<'a> {
    id: &'a str,
    text: &'a str,
    metadata: &'a serde_json::Value,
    created: u64,
    updated: u64,
    vector: &'a [f32],
}

/// One event of a user, pointing at the item by index.
#[derive(Debug, Clone)]
pub(crate) struct UserEvent {
    pub item: usize,
    pub event: String,
    pub weight: f32,
    pub at: u64,
}

/// A tenant's items, events and popularity, plus where in its files it has read up to.
pub(crate) struct Tenant {
    dir: PathBuf,
    dimension: usize,
    pub items: Vec<Item>,
    index: HashMap<String, usize>,
    /// Row-major, one L2-normalised row per item, in `items` order.
    vectors: Vec<f32>,
    /// Each user's events, sorted by `at` (file order among equal times).
    users: HashMap<String, Vec<UserEvent>>,
    /// Per item: Σ weight · 2^((at − anchor) / half-life) over every user's events.
    pop_mass: Vec<f64>,
    pop_anchor: Option<u64>,
    /// Events read before their item's line (another replica appended both between our reads
    /// of the two files); applied once the item shows up.
    orphans: Vec<Event>,
    items_offset: u64,
    events_offset: u64,
    items_out: Option<Appender>,
    events_out: Option<Appender>,
}

impl Tenant {
    fn empty(dir: PathBuf, dimension: usize) -> Self {
        Self {
            dir,
            dimension,
            items: Vec::new(),
            index: HashMap::new(),
            vectors: Vec::new(),
            users: HashMap::new(),
            pop_mass: Vec::new(),
            pop_anchor: None,
            orphans: Vec::new(),
            items_offset: 0,
            events_offset: 0,
            items_out: None,
            events_out: None,
        }
    }

    /// Reads a tenant's files from the start.
    pub fn load(dir: PathBuf, dimension: usize) -> Result<Self, RecommendError> {
        let mut tenant = Self::empty(dir, dimension);
        tenant.catch_up()?;
        Ok(tenant)
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub fn vector(&self, item: usize) -> &[f32] {
        &self.vectors[item * self.dimension..(item + 1) * self.dimension]
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The user's events, oldest first; empty for a user without any.
    pub fn user_events(&self, user: &str) -> &[UserEvent] {
        self.users.get(user).map_or(&[], Vec::as_slice)
    }

    /// Every item's popularity at `now`: ln(1 + decayed weight) over the tenant's maximum.
    pub fn popularity(&self, now: u64) -> Vec<f32> {
        let Some(anchor) = self.pop_anchor else { return vec![0.0; self.items.len()] };
        // Events after `now` count fully, as they do in the user profile.
        let factor = decay(now.saturating_sub(anchor), HALF_LIFE_S);
        let raw: Vec<f64> = self.pop_mass.iter().map(|m| (m * factor).ln_1p()).collect();
        let max = raw.iter().copied().fold(0.0, f64::max);
        if max <= 0.0 || !max.is_finite() {
            return vec![0.0; raw.len()];
        }
        raw.iter().map(|r| (r / max) as f32).collect()
    }

    /// Whether anything was read from the files so far.
    pub fn has_records(&self) -> bool {
        self.items_offset > 0 || self.events_offset > 0
    }

    /// Whether either file holds bytes this tenant has not read (or was cut shorter).
    pub fn files_changed(&self) -> Result<bool, RecommendError> {
        for (name, offset) in [(ITEMS_FILE, self.items_offset), (EVENTS_FILE, self.events_offset)] {
            if file_len(&self.dir.join(name))? != offset {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Reads whatever was appended to the files since the last call; returns whether anything
    /// was. A file that shrank was rewritten by someone: the tenant is read again from scratch.
    pub fn catch_up(&mut self) -> Result<bool, RecommendError> {
        let items_path = self.dir.join(ITEMS_FILE);
        let events_path = self.dir.join(EVENTS_FILE);
        if file_len(&items_path)? < self.items_offset || file_len(&events_path)? < self.events_offset {
            tracing::warn!(dir = %self.dir.display(), "a recommendation file shrank; reading the tenant again");
            *self = Self::empty(std::mem::take(&mut self.dir), self.dimension);
        }
        let mut lines = Vec::new();
        let items_end = jsonl::for_each_from(&items_path, self.items_offset, |l: ItemLine| lines.push(l))?;
        if let Some(bad) = lines.iter().find_map(|l| check_vector(&l.vector, self.dimension).err().map(|e| (l, e))) {
            let (line, message) = bad;
            let path = items_path.display();
            return Err(RecommendError::Corrupt(format!("{path}: item '{}': vector {message}", line.id)));
        }
        let mut changed = items_end != self.items_offset;
        for line in lines {
            self.apply_item(line);
        }
        self.items_offset = items_end;

        for event in std::mem::take(&mut self.orphans) {
            self.apply_event(event);
        }
        let mut events = Vec::new();
        let events_end = jsonl::for_each_from(&events_path, self.events_offset, |e: Event| events.push(e))?;
        changed |= events_end != self.events_offset;
        for event in events {
            self.apply_event(event);
        }
        self.events_offset = events_end;
        Ok(changed)
    }

    /// Appends one item line, fsynced. Memory changes only when [`Self::catch_up`] reads it back,
    /// so this process and its peers fold the file in the same order.
    pub fn append_item(&mut self, item: &Item, vector: &[f32]) -> Result<(), RecommendError> {
        let line = ItemLineRef {
            id: &item.id,
            text: &item.text,
            metadata: &item.metadata,
            created: item.created,
            updated: item.updated,
            vector,
        };
        let out = open_appender(&mut self.items_out, &self.dir.join(ITEMS_FILE))?;
        out.append(&line, Durability::Synced)?;
        Ok(())
    }

    /// Appends one event line, fsynced; see [`Self::append_item`].
    pub fn append_event(&mut self, event: &Event) -> Result<(), RecommendError> {
        let out = open_appender(&mut self.events_out, &self.dir.join(EVENTS_FILE))?;
        out.append(event, Durability::Synced)?;
        Ok(())
    }

    fn apply_item(&mut self, line: ItemLine) {
        let norm = line.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        let row = line.vector.iter().map(|x| x / norm);
        match self.index.get(&line.id) {
            Some(&i) => {
                let item = &mut self.items[i];
                item.text = line.text;
                item.metadata = line.metadata;
                item.updated = line.updated;
                let dimension = self.dimension;
                for (slot, x) in self.vectors[i * dimension..(i + 1) * dimension].iter_mut().zip(row) {
                    *slot = x;
                }
            }
            None => {
                self.vectors.extend(row);
                self.index.insert(line.id.clone(), self.items.len());
                let ItemLine { id, text, metadata, created, updated, .. } = line;
                self.items.push(Item { id, text, metadata, created, updated });
                self.pop_mass.push(0.0);
            }
        }
    }

    fn apply_event(&mut self, event: Event) {
        let Some(item) = self.index_of(&event.item) else {
            self.orphans.push(event);
            return;
        };
        let mut anchor = *self.pop_anchor.get_or_insert(event.at);
        if event.at.saturating_sub(anchor) as f64 > REBASE_HALF_LIVES * HALF_LIFE_S {
            let shrink = decay(event.at - anchor, HALF_LIFE_S);
            self.pop_mass.iter_mut().for_each(|m| *m *= shrink);
            anchor = event.at;
            self.pop_anchor = Some(anchor);
        }
        let offset = (event.at as f64 - anchor as f64) / HALF_LIFE_S;
        self.pop_mass[item] += f64::from(event.weight) * offset.exp2();

        let list = self.users.entry(event.user).or_default();
        let at = event.at;
        let position = list.partition_point(|e| e.at <= at);
        list.insert(position, UserEvent { item, event: event.event, weight: event.weight, at });
    }
}

fn open_appender<'a>(slot: &'a mut Option<Appender>, path: &Path) -> Result<&'a mut Appender, RecommendError> {
    match slot {
        Some(out) => Ok(out),
        None => Ok(slot.insert(Appender::open(path)?)),
    }
}

fn file_len(path: &Path) -> Result<u64, RecommendError> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(RecommendError::io(path, e)),
    }
}
