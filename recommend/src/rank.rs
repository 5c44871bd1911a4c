//! Scores candidates for a user (profile similarity, popularity, recency), reranks by MMR, and
//! writes each result's reason.

use std::collections::{HashMap, HashSet};

use crate::model::{past_tense, Query, Ranked, Recommendation};
use crate::store::{Tenant, UserEvent};
use crate::RecommendError;

/// Half-life of an event's weight, in the profile and in popularity.
pub(crate) const HALF_LIFE_S: f64 = 7.0 * 86_400.0;
/// Half-life of an item's recency.
pub(crate) const RECENCY_HALF_LIFE_S: f64 = 30.0 * 86_400.0;
/// How many of the user's latest events make the profile.
pub(crate) const PROFILE_EVENTS: usize = 50;

const W_SIMILARITY: f32 = 0.70;
const W_POPULARITY: f32 = 0.20;
const W_RECENCY: f32 = 0.10;
const COLD_POPULARITY: f32 = 0.8;
const COLD_RECENCY: f32 = 0.2;

/// At or above this popularity a reason adds "popular right now".
const POPULAR: f32 = 0.5;
/// Below this cosine to every history item, a reason does not claim the item is similar.
const SIMILAR: f32 = 0.3;
/// At or above this recency (about 30 days old or newer) an item counts as new.
const NEW: f32 = 0.5;
const REASON_TEXT_CHARS: usize = 60;
const HISTORY_SHOWN: usize = 5;
/// MMR reranks only the best `max(MMR_POOL_MIN, MMR_POOL_PER_RESULT · k)` candidates.
const MMR_POOL_MIN: usize = 50;
const MMR_POOL_PER_RESULT: usize = 10;

/// 0.5^(age / half_life).
pub(crate) fn decay(age_s: u64, half_life_s: f64) -> f64 {
    (-(age_s as f64) / half_life_s).exp2()
}

/// A candidate and the parts of its score.
struct Scored {
    item: usize,
    score: f32,
    similarity: Option<f32>,
    popularity: f32,
    recency: f32,
}

/// What the user's recent events say: the profile vector and each item's share of it.
struct Profile {
    /// L2-normalised (all zeros if the events cancel out).
    vector: Vec<f32>,
    /// Item → (decayed weight, the user's strongest event on it), most influential first.
    history: Vec<(usize, f64, String)>,
}

/// Ranks `query` over a tenant's items.
pub(crate) fn rank(tenant: &Tenant, query: &Query) -> Result<Recommendation, RecommendError> {
    let mut candidates = candidate_items(tenant, query)?;
    let events = tenant.user_events(&query.user);
    if query.exclude_seen {
        let seen: HashSet<usize> = events.iter().map(|e| e.item).collect();
        candidates.retain(|c| !seen.contains(c));
    }
    let popularity = tenant.popularity(query.now);
    let profile = (!events.is_empty()).then(|| profile(tenant, events, query.now));

    let mut scored: Vec<Scored> = candidates
        .iter()
        .map(|&item| {
            let age = query.now.saturating_sub(tenant.items[item].created);
            let recency = decay(age, RECENCY_HALF_LIFE_S) as f32;
            let popularity = popularity[item];
            match &profile {
                Some(p) => {
                    let similarity = dot(&p.vector, tenant.vector(item)).max(0.0);
                    let score = W_SIMILARITY * similarity + W_POPULARITY * popularity + W_RECENCY * recency;
                    Scored { item, score, similarity: Some(similarity), popularity, recency }
                }
                None => {
                    let score = COLD_POPULARITY * popularity + COLD_RECENCY * recency;
                    Scored { item, score, similarity: None, popularity, recency }
                }
            }
        })
        .collect();
    scored.sort_by(|a, b| {
        b.score.total_cmp(&a.score).then_with(|| tenant.items[a.item].id.cmp(&tenant.items[b.item].id))
    });
    let picked = if query.diversity > 0.0 {
        mmr(tenant, scored, query.k, query.diversity)
    } else {
        scored.truncate(query.k);
        scored
    };

    let items = picked
        .into_iter()
        .map(|s| Ranked {
            id: tenant.items[s.item].id.clone(),
            reason: reason(tenant, profile.as_ref(), &s),
            score: s.score,
            similarity: s.similarity,
            popularity: s.popularity,
            recency: s.recency,
        })
        .collect();
    let history = profile
        .as_ref()
        .map(|p| p.history.iter().take(HISTORY_SHOWN).map(|(i, ..)| tenant.items[*i].id.clone()).collect())
        .unwrap_or_default();
    Ok(Recommendation { items, cold_start: profile.is_none(), history })
}

/// The query's candidates as item indices (deduplicated, in the given order), or every item.
fn candidate_items(tenant: &Tenant, query: &Query) -> Result<Vec<usize>, RecommendError> {
    let Some(ids) = &query.candidates else { return Ok((0..tenant.items.len()).collect()) };
    let mut seen = HashSet::new();
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        let item = tenant
            .index_of(id)
            .ok_or_else(|| RecommendError::invalid("candidates", format!("unknown item id '{id}'")))?;
        if seen.insert(item) {
            items.push(item);
        }
    }
    Ok(items)
}

/// The normalised sum of the latest events' decayed weights times their items' vectors.
fn profile(tenant: &Tenant, events: &[UserEvent], now: u64) -> Profile {
    let latest = &events[events.len().saturating_sub(PROFILE_EVENTS)..];
    // Decaying from the newest event rather than from `now` scales every weight by the same
    // factor, which normalising removes, and keeps an old history from underflowing to zero.
    let reference = latest.iter().map(|e| e.at).max().unwrap_or(now).min(now);
    let mut by_item: HashMap<usize, (f64, &UserEvent)> = HashMap::new();
    for e in latest {
        let w = f64::from(e.weight) * decay(reference.saturating_sub(e.at), HALF_LIFE_S);
        let entry = by_item.entry(e.item).or_insert((0.0, e));
        entry.0 += w;
        if e.weight >= entry.1.weight {
            entry.1 = e;
        }
    }
    let mut history: Vec<(usize, f64, String)> =
        by_item.into_iter().map(|(item, (w, strongest))| (item, w, strongest.event.clone())).collect();
    history.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| tenant.items[a.0].id.cmp(&tenant.items[b.0].id)));
    // Summed in history order, not hash order, so every process gets the same bits.
    let mut vector = vec![0.0f32; tenant.dimension()];
    for &(item, w, _) in &history {
        for (slot, x) in vector.iter_mut().zip(tenant.vector(item)) {
            *slot += w as f32 * x;
        }
    }
    let norm = dot(&vector, &vector).sqrt();
    if norm > 0.0 && norm.is_finite() {
        vector.iter_mut().for_each(|x| *x /= norm);
    } else {
        vector.iter_mut().for_each(|x| *x = 0.0);
    }
    Profile { vector, history }
}

/// Greedy maximal marginal relevance: next is the item maximising
/// (1 − d)·score − d·(max cosine to the items already picked).
fn mmr(tenant: &Tenant, mut pool: Vec<Scored>, k: usize, d: f32) -> Vec<Scored> {
    pool.truncate(MMR_POOL_MIN.max(MMR_POOL_PER_RESULT * k));
    let mut closest = vec![0.0f32; pool.len()];
    let mut picked = Vec::with_capacity(k);
    while picked.len() < k && !pool.is_empty() {
        // Pool order is score order, so the first maximum wins ties the way sorting would.
        let mut best = 0;
        let mut best_value = f32::NEG_INFINITY;
        for (i, s) in pool.iter().enumerate() {
            let value = (1.0 - d) * s.score - d * closest[i];
            if value > best_value {
                best = i;
                best_value = value;
            }
        }
        let chosen = pool.remove(best);
        closest.remove(best);
        let v = tenant.vector(chosen.item);
        for (c, s) in closest.iter_mut().zip(&pool) {
            *c = c.max(dot(v, tenant.vector(s.item)));
        }
        picked.push(chosen);
    }
    picked
}

/// One short sentence: why this item for this user.
fn reason(tenant: &Tenant, profile: Option<&Profile>, s: &Scored) -> String {
    let Some(profile) = profile else {
        return if s.popularity > 0.0 {
            "popular with other users (no history for you yet)".into()
        } else if s.recency >= NEW {
            "new item (no history for you yet)".into()
        } else {
            "from the catalogue (no history for you yet)".into()
        };
    };
    let candidate = tenant.vector(s.item);
    let closest = profile
        .history
        .iter()
        .filter(|(item, ..)| *item != s.item)
        .map(|(item, _, event)| (dot(tenant.vector(*item), candidate), *item, event))
        .fold(None, |best: Option<(f32, usize, &String)>, h| match best {
            Some(b) if b.0 >= h.0 => Some(b),
            _ => Some(h),
        });
    let popular = s.popularity >= POPULAR;
    let mut reason = match closest {
        Some((cosine, item, event)) if cosine >= SIMILAR => {
            format!("similar to \"{}\" you {}", snippet(&tenant.items[item].text), past_tense(event))
        }
        _ => match profile.history.iter().find(|(item, ..)| *item == s.item) {
            Some((_, _, event)) => format!("you {} this before", past_tense(event)),
            None if popular => return "popular right now".into(),
            None if s.recency >= NEW => "new item".into(),
            None => "different from your recent items".into(),
        },
    };
    if popular {
        reason.push_str(", popular right now");
    }
    reason
}

/// An item's text on one line, cut to [`REASON_TEXT_CHARS`] characters.
fn snippet(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= REASON_TEXT_CHARS {
        return line;
    }
    let mut cut: String = line.chars().take(REASON_TEXT_CHARS - 1).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
