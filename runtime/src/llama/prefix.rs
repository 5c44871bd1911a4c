//! Prompt prefix cache: the keys and values of recent prompts (and finished conversations), so
//! a prompt that starts like an earlier one (a shared system prompt, the next turn of a chat, a
//! retried request, many users of one template) copies that part of its KV cache instead of
//! computing it again. vLLM calls this automatic prefix caching; llama.cpp's server keeps a
//! slot's prompt for the same reason.
//!
//! Entries are keyed by the token sequence and the adapter that computed them: LoRA on q, k, v
//! (and on every layer below) changes the keys and values, so a prefix is only ever reused
//! under the very adapter version it was computed with. Entries hold a [`Weak`] to their
//! adapter: they do not keep its weights in memory, and while an entry exists no other adapter
//! can take its address.

use std::sync::{Arc, Weak};

use super::KvCache;
use crate::lora::AdapterWeights;

/// The KV of recent token sequences within a memory budget, least recently used out first.
#[derive(Debug)]
pub struct PrefixCache {
    budget: usize,
    used: usize,
    clock: u64,
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    tokens: Vec<u32>,
    adapter: Option<Weak<AdapterWeights>>,
    kv: KvCache,
    used_at: u64,
}

impl Entry {
    fn computed_with(&self, adapter: Option<&Arc<AdapterWeights>>) -> bool {
        match (&self.adapter, adapter) {
            (None, None) => true,
            (Some(w), Some(a)) => std::ptr::eq(w.as_ptr(), Arc::as_ptr(a)),
            _ => false,
        }
    }

    fn alive(&self) -> bool {
        self.adapter.as_ref().is_none_or(|w| w.strong_count() > 0)
    }

    fn bytes(&self) -> usize {
        self.tokens.len() * self.kv.bytes_per_token()
    }
}

/// Leading tokens two sequences share.
pub fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache that holds at most `budget_bytes` of keys and values; 0 turns it off.
    pub fn new(budget_bytes: usize) -> Self {
        Self { budget: budget_bytes, used: 0, clock: 0, entries: Vec::new() }
    }

    pub fn is_enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.used
    }

    /// Token sequences held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// How many leading tokens of `tokens` (computed with `adapter`) a restore would copy:
    /// the longest prefix any entry shares with them, leaving the last token to compute (its
    /// logits are what the caller is after).
    pub fn reusable(&self, tokens: &[u32], adapter: Option<&Arc<AdapterWeights>>) -> usize {
        let limit = tokens.len().saturating_sub(1);
        self.best(tokens, adapter).map_or(0, |(_, n)| n.min(limit))
    }

    fn best(&self, tokens: &[u32], adapter: Option<&Arc<AdapterWeights>>) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.computed_with(adapter))
            .map(|(i, e)| (i, shared_prefix(&e.tokens, tokens)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(_, n)| n)
    }

    /// Fills the empty `cache` with the longest cached prefix of `tokens` computed with
    /// `adapter` (never all of `tokens`, and no more than the cache has room for) and returns
    /// how many positions it copied; 0 when nothing matched.
    pub fn restore(&mut self, tokens: &[u32], adapter: Option<&Arc<AdapterWeights>>, cache: &mut KvCache) -> usize {
        if !cache.is_empty() {
            return 0;
        }
        let Some((i, shared)) = self.best(tokens, adapter) else { return 0 };
        let n = shared.min(tokens.len().saturating_sub(1)).min(cache.capacity());
        if n == 0 {
            return 0;
        }
        let now = self.tick();
        let entry = &mut self.entries[i];
        entry.used_at = now;
        cache.copy_prefix_from(&entry.kv, n);
        n
    }

    /// Whether [`store`](Self::store) would keep `positions` positions of `cache`.
    pub fn would_keep(&self, positions: usize, cache: &KvCache) -> bool {
        positions > 0 && positions * cache.bytes_per_token() <= self.budget / 2
    }

    /// Keeps the keys and values of `tokens`, which are the first positions of `cache`,
    /// computed with `adapter` (only as many as the cache holds). A sequence that an entry
    /// already covers only refreshes that entry; entries the new one covers are dropped.
    /// One sequence may take at most half the budget.
    pub fn store(&mut self, tokens: &[u32], adapter: Option<&Arc<AdapterWeights>>, cache: &KvCache) {
        let tokens = &tokens[..tokens.len().min(cache.len())];
        if !self.would_keep(tokens.len(), cache) {
            return;
        }
        let now = self.tick();
        // Entries of adapters that are gone can never match again.
        self.entries.retain(Entry::alive);
        if let Some(e) = self.entries.iter_mut().find(|e| e.computed_with(adapter) && e.tokens.starts_with(tokens)) {
            e.used_at = now;
            self.used = self.entries.iter().map(Entry::bytes).sum();
            return;
        }
        self.entries.retain(|e| !(e.computed_with(adapter) && tokens.starts_with(&e.tokens)));
        self.entries.push(Entry {
            tokens: tokens.to_vec(),
            adapter: adapter.map(Arc::downgrade),
            kv: cache.prefix(tokens.len()),
            used_at: now,
        });
        self.used = self.entries.iter().map(Entry::bytes).sum();
        while self.used > self.budget {
            let Some(oldest) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used_at).map(|(i, _)| i) else {
                break;
            };
            let gone = self.entries.swap_remove(oldest);
            self.used -= gone.bytes();
        }
    }
}
