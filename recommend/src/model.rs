//! The records the recommender stores and answers with, and the checks every input passes.

use serde::{Deserialize, Serialize};

use crate::RecommendError;

/// Longest item id and user id, in characters.
pub const MAX_ID_CHARS: usize = 256;
/// Longest item text, in bytes.
pub const MAX_TEXT_BYTES: usize = 32 * 1024;
/// Longest event name, in characters.
pub const MAX_EVENT_CHARS: usize = 64;
/// Largest event weight.
pub const MAX_WEIGHT: f32 = 100.0;
/// How far in the future an event's `at` may lie (clock skew between replicas).
pub const FUTURE_SLACK_S: u64 = 5 * 60;
/// Most results one query may ask for.
pub const MAX_K: usize = 100;
/// Most candidate ids one query may name.
pub const MAX_CANDIDATES: usize = 1000;

/// A registered item, as callers see it (the vector stays inside the store).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Item {
    pub id: String,
    pub text: String,
    /// A JSON object, or null.
    pub metadata: serde_json::Value,
    /// Unix seconds of the first registration; an update keeps it.
    pub created: u64,
    /// Unix seconds of the latest registration.
    pub updated: u64,
}

/// One stored behaviour event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub user: String,
    pub item: String,
    pub event: String,
    pub weight: f32,
    /// Unix seconds.
    pub at: u64,
}

/// An event as a caller reports it; [`crate::Recommender::record_event`] fills in the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub user: String,
    pub item: String,
    pub event: String,
    /// Defaults to [`default_weight`] of the event name.
    pub weight: Option<f32>,
    /// Unix seconds; defaults to now.
    pub at: Option<u64>,
}

/// The weight of a built-in event name: `view` 1, `click` 2, `add_to_cart`, `like`, `share`
/// and `rating` 3, `purchase` 5. Any other name needs an explicit weight (for `rating`, pass
/// the stars to weigh a five-star rating above a two-star one).
pub fn default_weight(event: &str) -> Option<f32> {
    match event {
        "view" => Some(1.0),
        "click" => Some(2.0),
        "add_to_cart" | "like" | "share" | "rating" => Some(3.0),
        "purchase" => Some(5.0),
        _ => None,
    }
}

/// What to rank, for whom.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub user: String,
    /// How many results, 1..=100.
    pub k: usize,
    /// Rank only these item ids (1..=1000, all known); `None` ranks every item of the tenant.
    pub candidates: Option<Vec<String>>,
    /// Drop items the user has any event on.
    pub exclude_seen: bool,
    /// 0..=1; above 0, results are picked by MMR with this weight on dissimilarity.
    pub diversity: f32,
    /// Unix seconds the decays are computed at.
    pub now: u64,
}

/// One recommended item and the parts of its score.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ranked {
    pub id: String,
    pub score: f32,
    /// A short sentence a person can read: why this item.
    pub reason: String,
    /// Cosine between the user's profile and the item, clamped at 0; `None` for a cold start.
    pub similarity: Option<f32>,
    /// 0..=1, 1 for the tenant's most popular item.
    pub popularity: f32,
    /// 0..=1, halving every 30 days since the item was first registered.
    pub recency: f32,
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recommendation {
    pub items: Vec<Ranked>,
    /// The user has no events: the ranking is popularity and recency only.
    pub cold_start: bool,
    /// The user's recent item ids that drove the ranking, most influential first, at most 5.
    pub history: Vec<String>,
}

/// How a reason says what the user did with an item.
pub(crate) fn past_tense(event: &str) -> &'static str {
    match event {
        "view" => "viewed",
        "click" => "clicked",
        "add_to_cart" => "added to your cart",
        "like" => "liked",
        "share" => "shared",
        "purchase" => "purchased",
        "rating" => "rated",
        _ => "interacted with",
    }
}

pub(crate) fn check_id(param: &'static str, id: &str) -> Result<(), RecommendError> {
    let chars = id.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS {
        return Err(RecommendError::invalid(param, format!("must be 1 to {MAX_ID_CHARS} characters, got {chars}")));
    }
    if id.chars().any(char::is_control) {
        return Err(RecommendError::invalid(param, "must not contain control characters"));
    }
    Ok(())
}

pub(crate) fn check_user(user: &str) -> Result<(), RecommendError> {
    let chars = user.chars().count();
    if chars == 0 || chars > MAX_ID_CHARS {
        return Err(RecommendError::invalid("user", format!("must be 1 to {MAX_ID_CHARS} characters, got {chars}")));
    }
    Ok(())
}

pub(crate) fn check_item(
    id: &str,
    text: &str,
    metadata: &serde_json::Value,
    vector: &[f32],
    dimension: usize,
) -> Result<(), RecommendError> {
    check_id("id", id)?;
    if text.trim().is_empty() {
        return Err(RecommendError::invalid("text", "must not be blank"));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(RecommendError::invalid(
            "text",
            format!("must be at most {MAX_TEXT_BYTES} bytes, got {}", text.len()),
        ));
    }
    if !(metadata.is_object() || metadata.is_null()) {
        return Err(RecommendError::invalid("metadata", "must be a JSON object or null"));
    }
    check_vector(vector, dimension).map_err(|message| RecommendError::invalid("vector", message))
}

/// Why `vector` cannot be stored, if it cannot.
pub(crate) fn check_vector(vector: &[f32], dimension: usize) -> Result<(), String> {
    if vector.len() != dimension {
        return Err(format!("must have {dimension} values, got {}", vector.len()));
    }
    if !vector.iter().all(|x| x.is_finite()) {
        return Err("must hold finite numbers only".into());
    }
    if vector.iter().all(|&x| x == 0.0) {
        return Err("must not be all zeros".into());
    }
    Ok(())
}

/// Validates a reported event and fills in its defaults.
pub(crate) fn resolve_event(new: NewEvent, now: u64) -> Result<Event, RecommendError> {
    check_user(&new.user)?;
    check_id("item", &new.item)?;
    let chars = new.event.chars().count();
    if chars == 0 || chars > MAX_EVENT_CHARS {
        return Err(RecommendError::invalid(
            "event",
            format!("must be 1 to {MAX_EVENT_CHARS} characters, got {chars}"),
        ));
    }
    if !new.event.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '.' | '-')) {
        return Err(RecommendError::invalid("event", "may hold only a-z, 0-9, '_', '.' and '-'"));
    }
    let weight = match new.weight.or_else(|| default_weight(&new.event)) {
        Some(w) => w,
        None => {
            let message = format!("'{}' is not a built-in event; give it a weight", new.event);
            return Err(RecommendError::invalid("weight", message));
        }
    };
    if !(weight.is_finite() && weight > 0.0 && weight <= MAX_WEIGHT) {
        return Err(RecommendError::invalid(
            "weight",
            format!("must be above 0 and at most {MAX_WEIGHT}, got {weight}"),
        ));
    }
    let at = new.at.unwrap_or(now);
    if at > now.saturating_add(FUTURE_SLACK_S) {
        return Err(RecommendError::invalid("at", format!("{at} is more than {FUTURE_SLACK_S} s in the future")));
    }
    Ok(Event { user: new.user, item: new.item, event: new.event, weight, at })
}

/// Checks a query's shape; whether its candidates exist is the store's to say.
pub(crate) fn check_query(query: &Query) -> Result<(), RecommendError> {
    check_user(&query.user)?;
    if query.k == 0 || query.k > MAX_K {
        return Err(RecommendError::invalid("k", format!("must be 1 to {MAX_K}, got {}", query.k)));
    }
    if !(query.diversity.is_finite() && (0.0..=1.0).contains(&query.diversity)) {
        return Err(RecommendError::invalid("diversity", format!("must be 0 to 1, got {}", query.diversity)));
    }
    if let Some(candidates) = &query.candidates {
        if candidates.is_empty() || candidates.len() > MAX_CANDIDATES {
            let message = format!("must name 1 to {MAX_CANDIDATES} items, got {}", candidates.len());
            return Err(RecommendError::invalid("candidates", message));
        }
    }
    Ok(())
}

/// The directory name of a tenant: the hex of its UTF-8 bytes, so any name is a safe path.
pub(crate) fn tenant_dir_name(tenant: &str) -> Result<String, RecommendError> {
    // Hex doubles the length and a file name holds at most 255 bytes.
    if tenant.is_empty() || tenant.len() > 127 {
        return Err(RecommendError::invalid("tenant", format!("must be 1 to 127 bytes, got {}", tenant.len())));
    }
    Ok(tenant.bytes().map(|b| format!("{b:02x}")).collect())
}

/// Whether a directory name is one [`tenant_dir_name`] could have made.
pub(crate) fn is_tenant_dir_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 254
        && name.len().is_multiple_of(2)
        && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
