//! Registry data types: manifests, aliases, snapshots, audit records and name rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{AdapterError, Result};

/// The alias a bare model name (`"support-bot"`) resolves to.
pub const DEFAULT_ALIAS: &str = "prod";

/// How many earlier versions an alias remembers for rollback.
const MAX_ALIAS_HISTORY: usize = 100;

/// Longest adapter or alias name accepted.
const MAX_NAME_LEN: usize = 64;

/// Everything recorded about one published version; stored as `manifest.json` beside its
/// files. Only `lineage` and `metrics` may change after publication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: u64,
    /// [`crate::content_hash`] of the version's two files.
    pub sha256: String,
    /// The base model this version was validated against.
    pub base_model: String,
    /// Unix seconds.
    pub created: u64,
    pub source: Source,
    pub rank: usize,
    pub alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules that carry weights, e.g. `["q_proj", "v_proj"]`.
    pub target_modules: Vec<String>,
    /// Both files together.
    pub size_bytes: u64,
    /// Where this version came from (parent version, dataset ids); set by training.
    #[serde(default)]
    pub lineage: Value,
    /// Evaluation results; may be filled in after publication.
    #[serde(default)]
    pub metrics: Value,
}

/// How a version entered the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Uploaded through the API.
    Upload,
    /// Copied from a directory on the server.
    Import { path: String },
    /// Produced by a fine-tuning job.
    Training { job_id: String },
}

/// Where an alias points now, and where it pointed before (oldest first) for rollback.
///
/// A routed alias splits its callers between `routes` by weight; `version` is then its
/// heaviest route (the older one on a tie), which is what compare-and-set, rollback and
/// callers without a routing key see. A shadow rule mirrors a share of its requests to
/// another version whose answers are logged, never returned.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AliasState {
    pub version: u64,
    #[serde(default)]
    pub history: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowRule>,
}

/// One version's share of a routed alias: callers are split in proportion to the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub version: u64,
    pub weight: u32,
}

/// Mirror `share` (0 to 1) of an alias's requests to `version`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowRule {
    pub version: u64,
    pub share: f64,
}

/// One adapter's versions and aliases.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdapterEntry {
    pub versions: BTreeMap<u64, Manifest>,
    pub aliases: BTreeMap<String, AliasState>,
    /// The number the next registered version gets; never decreases, so deleted numbers
    /// are never reused.
    pub next_version: u64,
    /// Releases by alias: running, paused, or how the last one ended.
    pub releases: BTreeMap<String, super::release::Release>,
}

/// An immutable view of the whole registry. Readers hold one for as long as they need a
/// consistent picture; writers publish a new one instead of mutating.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub(crate) adapters: BTreeMap<String, Arc<AdapterEntry>>,
    /// The registry's generation when this snapshot was read or written: every change bumps
    /// the counter on disk, so a differing number means another process changed something.
    pub(crate) generation: u64,
}

/// Which version of an adapter a model string asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Bare name: the [`DEFAULT_ALIAS`] alias.
    Default,
    /// `name@7`.
    Version(u64),
    /// `name@canary`.
    Alias(String),
}

/// The result of moving an alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasChange {
    pub adapter: String,
    pub alias: String,
    /// `None` when the alias did not exist before.
    pub from: Option<u64>,
    pub to: u64,
    /// The split the alias has now, when it is routed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
}

/// One adapter as the listing endpoint shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterListing {
    pub name: String,
    pub versions: Vec<Manifest>,
    pub aliases: BTreeMap<String, AliasState>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub releases: BTreeMap<String, super::release::Release>,
}

/// What an audit line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    Register,
    Promote,
    Rollback,
    Delete,
    /// An alias's weighted split was set.
    Route,
    /// A shadow rule was set or removed.
    Shadow,
    /// A release started, stepped, paused, resumed, promoted or rolled back
    /// (`detail.event` says which, with the evidence).
    Release,
}

/// One line of `audit.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix seconds.
    pub ts: u64,
    pub actor: String,
    pub action: AuditAction,
    pub adapter: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<Route>>,
    /// What else the change carries: a shadow rule, a release's step and its evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

/// Splits a user-facing model string: `"bot"`, `"bot@7"` or `"bot@canary"`. Names are not
/// checked here; [`Snapshot::resolve`] does that.
pub fn parse_model_ref(s: &str) -> (&str, Selector) {
    match s.split_once('@') {
        None => (s, Selector::Default),
        Some((name, sel)) => match sel.parse::<u64>() {
            Ok(v) if sel.bytes().all(|b| b.is_ascii_digit()) => (name, Selector::Version(v)),
            _ => (name, Selector::Alias(sel.to_owned())),
        },
    }
}

/// Adapter names are `[a-z0-9][a-z0-9._-]{0,63}` without `..`: safe as a directory name and
/// unambiguous inside `name@selector`.
pub fn validate_adapter_name(name: &str) -> Result<()> {
    check_name("adapter", name)
}

/// Alias names follow adapter names, and may not be all digits (that would read as a
/// version in `name@7`).
pub fn validate_alias_name(alias: &str) -> Result<()> {
    check_name("alias", alias)?;
    if alias.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AdapterError::InvalidName {
            kind: "alias",
            name: alias.to_owned(),
            reason: "an all-digit alias would be read as a version number",
        });
    }
    Ok(())
}

fn check_name(kind: &'static str, name: &str) -> Result<()> {
    let fail = |reason| Err(AdapterError::InvalidName { kind, name: name.to_owned(), reason });
    let bytes = name.as_bytes();
    let Some(&first) = bytes.first() else {
        return fail("must not be empty");
    };
    if bytes.len() > MAX_NAME_LEN {
        return fail("must be at most 64 characters");
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return fail("must start with a lowercase letter or digit");
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-');
    if !bytes.iter().all(|&b| allowed(b)) {
        return fail("may contain only lowercase letters, digits, '.', '_' and '-'");
    }
    if name.contains("..") {
        return fail("must not contain '..'");
    }
    Ok(())
}

impl AdapterEntry {
    pub(crate) fn new() -> Self {
        Self { next_version: 1, ..Self::default() }
    }

    /// Aliases currently pointing, routing or mirroring to `version`.
    pub fn aliases_of(&self, version: u64) -> Vec<String> {
        self.aliases.iter().filter(|(_, s)| s.uses(version)).map(|(a, _)| a.clone()).collect()
    }
}

impl Snapshot {
    /// The on-disk generation this snapshot reflects.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// One adapter's entry.
    pub fn adapter(&self, name: &str) -> Option<&AdapterEntry> {
        self.adapters.get(name).map(Arc::as_ref)
    }

    /// Registered adapter names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.adapters.keys().map(String::as_str)
    }

    /// Resolves a name and selector against this snapshot. A request should call this
    /// once and keep the manifest, so a concurrent promote cannot change it mid-stream.
    /// A routed alias answers with its heaviest route; see [`Snapshot::resolve_for`].
    pub fn resolve(&self, name: &str, selector: &Selector) -> Result<&Manifest> {
        self.resolve_for(name, selector, None).map(|r| r.manifest)
    }

    /// Like [`Snapshot::resolve`], choosing among a routed alias's versions by `key` (the
    /// caller): the same key gets the same version while the weights hold, and a route whose
    /// weight grows keeps the keys it had. Also names the alias and its shadow rule.
    pub fn resolve_for(&self, name: &str, selector: &Selector, key: Option<&str>) -> Result<Resolved<'_>> {
        validate_adapter_name(name)?;
        let entry = self.adapter(name).ok_or_else(|| AdapterError::AdapterNotFound { name: name.to_owned() })?;
        let (version, alias) = match selector {
            Selector::Version(v) => (*v, None),
            Selector::Default => alias_version(entry, name, DEFAULT_ALIAS, key)?,
            Selector::Alias(alias) => {
                validate_alias_name(alias)?;
                alias_version(entry, name, alias, key)?
            }
        };
        let manifest = entry
            .versions
            .get(&version)
            .ok_or_else(|| AdapterError::VersionNotFound { name: name.to_owned(), version })?;
        let shadow = alias.and_then(|(_, s)| s.shadow).filter(|s| s.version != version);
        Ok(Resolved { manifest, alias: alias.map(|(a, _)| a), shadow })
    }

    /// Every adapter with its versions (ascending) and aliases.
    pub fn listing(&self) -> Vec<AdapterListing> {
        self.adapters
            .iter()
            .map(|(name, e)| AdapterListing {
                name: name.clone(),
                versions: e.versions.values().cloned().collect(),
                aliases: e.aliases.clone(),
                releases: e.releases.clone(),
            })
            .collect()
    }
}

/// What a model string resolved to.
#[derive(Debug, Clone, Copy)]
pub struct Resolved<'a> {
    pub manifest: &'a Manifest,
    /// The alias it went through, if any.
    pub alias: Option<&'a str>,
    /// The alias's shadow rule, unless it mirrors to the very version that serves.
    pub shadow: Option<ShadowRule>,
}

fn alias_version<'a>(
    entry: &'a AdapterEntry,
    name: &str,
    alias: &str,
    key: Option<&str>,
) -> Result<(u64, Option<(&'a str, &'a AliasState)>)> {
    let (alias, state) = entry
        .aliases
        .get_key_value(alias)
        .ok_or_else(|| AdapterError::AliasNotFound { name: name.to_owned(), alias: alias.to_owned() })?;
    let version = match key {
        Some(key) => state.version_for(&format!("{name}@{alias}"), key),
        None => state.version,
    };
    Ok((version, Some((alias.as_str(), state))))
}

impl AliasState {
    /// A plain alias at `version`.
    pub fn at(version: u64) -> Self {
        Self { version, ..Self::default() }
    }

    /// Remembers `previous` for rollback, keeping the newest [`MAX_ALIAS_HISTORY`].
    pub(crate) fn remember(&mut self, previous: u64) {
        self.history.push(previous);
        let excess = self.history.len().saturating_sub(MAX_ALIAS_HISTORY);
        self.history.drain(..excess);
    }

    /// Whether this alias can send a request to `version` (directly, by a route or as a shadow).
    pub fn uses(&self, version: u64) -> bool {
        self.version == version
            || self.routes.iter().any(|r| r.version == version)
            || self.shadow.is_some_and(|s| s.version == version)
    }

    /// The version serving `key`. Routes are laid out in ascending version order over
    /// [0, 1), and the key's hash picks a point there: raising the newest version's weight
    /// only moves keys towards it, never between older routes.
    pub fn version_for(&self, scope: &str, key: &str) -> u64 {
        let total: u64 = self.routes.iter().map(|r| u64::from(r.weight)).sum();
        if total == 0 {
            return self.version;
        }
        let point = ((u128::from(sticky_hash(scope, key)) * u128::from(total)) >> 64) as u64;
        let mut upto = 0;
        for r in &self.routes {
            upto += u64::from(r.weight);
            if point < upto {
                return r.version;
            }
        }
        self.version
    }
}

/// A stable 64-bit hash of `scope` and `key` (FNV-1a, then a finaliser that spreads nearby
/// keys), the same on every replica and every run.
pub fn sticky_hash(scope: &str, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in scope.bytes().chain([0]).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_refs_parse() {
        assert_eq!(parse_model_ref("support-bot"), ("support-bot", Selector::Default));
        assert_eq!(parse_model_ref("support-bot@7"), ("support-bot", Selector::Version(7)));
        assert_eq!(parse_model_ref("support-bot@canary"), ("support-bot", Selector::Alias("canary".into())));
        assert_eq!(parse_model_ref("a@+7"), ("a", Selector::Alias("+7".into())));
    }

    #[test]
    fn invalid_names_are_rejected() {
        for bad in ["../x", "a/b", "A@1", "", "Bot", "-x", ".x", "a..b", "a b", &"x".repeat(65)] {
            let err = validate_adapter_name(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_name", "{bad}");
        }
        for good in ["support-bot", "a", "0", "v1.2_x-y", &"x".repeat(64)] {
            validate_adapter_name(good).unwrap();
        }
        assert_eq!(validate_alias_name("12").unwrap_err().code(), "invalid_name");
        validate_alias_name("canary").unwrap();
        validate_alias_name("v2").unwrap();
    }

    #[test]
    fn audit_records_omit_absent_fields() {
        let rec = AuditRecord {
            ts: 1,
            actor: "ops".into(),
            action: AuditAction::Delete,
            adapter: "bot".into(),
            alias: None,
            from: None,
            to: None,
            version: Some(3),
            routes: None,
            detail: None,
        };
        let json = serde_json::to_string(&rec).unwrap();
        assert_eq!(json, r#"{"ts":1,"actor":"ops","action":"delete","adapter":"bot","version":3}"#);
    }

    #[test]
    fn source_serialises_with_kind_tag() {
        let s = serde_json::to_value(Source::Training { job_id: "j1".into() }).unwrap();
        assert_eq!(s, serde_json::json!({"kind": "training", "job_id": "j1"}));
        assert_eq!(serde_json::to_value(Source::Upload).unwrap(), serde_json::json!({"kind": "upload"}));
    }
}
