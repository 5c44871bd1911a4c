//! Checks for weighted routes and shadow rules before they are stored.

use super::model::{AdapterEntry, Route, ShadowRule};
use crate::error::{AdapterError, Result};

/// Most versions one alias may split between.
const MAX_ROUTES: usize = 8;

/// Validates `routes` against `entry` and returns the alias's version (the heaviest route,
/// the older on a tie) with the routes to store: sorted by version, and empty when only one
/// route carries weight (a plain alias).
pub(crate) fn normalise(entry: &AdapterEntry, name: &str, routes: &[Route]) -> Result<(u64, Vec<Route>)> {
    let bad = |reason: String| Err(AdapterError::InvalidRelease { reason });
    if routes.is_empty() || routes.len() > MAX_ROUTES {
        return bad(format!("`routes` must hold 1 to {MAX_ROUTES} versions"));
    }
    let mut sorted = routes.to_vec();
    sorted.sort_by_key(|r| r.version);
    if sorted.windows(2).any(|w| w[0].version == w[1].version) {
        return bad("`routes` names a version twice".into());
    }
    for r in &sorted {
        if !entry.versions.contains_key(&r.version) {
            return Err(AdapterError::VersionNotFound { name: name.to_owned(), version: r.version });
        }
        if r.weight > 1_000_000 {
            return bad(format!("route weight {} of version {} is over 1000000", r.weight, r.version));
        }
    }
    arrange(sorted)
        .ok_or_else(|| AdapterError::InvalidRelease { reason: "at least one route needs a weight above 0".into() })
}

/// The alias's version for checked `routes` (the heaviest, the older on a tie) and the routes
/// to store: sorted by version, and none when only one carries weight (a plain alias). `None`
/// when no route has weight.
pub(crate) fn arrange(mut routes: Vec<Route>) -> Option<(u64, Vec<Route>)> {
    routes.sort_by_key(|r| r.version);
    let heaviest = routes
        .iter()
        .filter(|r| r.weight > 0)
        .max_by(|a, b| a.weight.cmp(&b.weight).then(b.version.cmp(&a.version)))?
        .version;
    if routes.iter().filter(|r| r.weight > 0).count() == 1 {
        return Some((heaviest, Vec::new()));
    }
    Some((heaviest, routes))
}

/// A shadow rule must mirror to an existing version a share in (0, 1].
pub(crate) fn check_shadow(entry: &AdapterEntry, name: &str, rule: &ShadowRule) -> Result<()> {
    if !(rule.share > 0.0 && rule.share <= 1.0) {
        return Err(AdapterError::InvalidRelease {
            reason: format!("shadow `share` must be above 0 and at most 1, not {}", rule.share),
        });
    }
    if !entry.versions.contains_key(&rule.version) {
        return Err(AdapterError::VersionNotFound { name: name.to_owned(), version: rule.version });
    }
    Ok(())
}
