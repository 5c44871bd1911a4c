//! The versioned adapter registry on local disk: register, resolve, promote, rollback, delete.

mod disk;
mod model;
pub mod release;
mod routing;
#[cfg(test)]
mod tests;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::{Mutex, MutexGuard};
use serde_json::Value;

use crate::error::{AdapterError, Result};
use crate::peft::{
    content_hash, validate_adapter_bytes, AdapterFiles, BaseModelShape, Limits, CONFIG_FILE, WEIGHTS_FILE,
};
use disk::{
    LockMode, Meta, ADAPTERS_DIR, ALIASES_FILE, MANIFEST_FILE, META_FILE, RELEASES_FILE, TMP_PREFIX, VERSIONS_DIR,
};

pub use model::{
    parse_model_ref, sticky_hash, validate_adapter_name, validate_alias_name, AdapterEntry, AdapterListing,
    AliasChange, AliasState, AuditAction, AuditRecord, Manifest, Resolved, Route, Selector, ShadowRule, Snapshot,
    Source, DEFAULT_ALIAS,
};
pub use release::{Decision, Evidence, Release, ReleasePolicy, ReleaseStatus};

/// Adapter versions and aliases, persisted under one directory and served from an
/// atomically swapped in-memory [`Snapshot`].
///
/// Layout under the root: `adapters/{name}/versions/{N}/` (the two PEFT files plus
/// `manifest.json`), `adapters/{name}/aliases.json`, `adapters/{name}/meta.json`, an
/// append-only `audit.jsonl`, the `generation` counter and the `.lock` file. Every state file
/// is replaced atomically and every version directory appears by a single rename, so a crash
/// never exposes half a version.
///
/// Any number of processes may open one root and write to it. A change holds an exclusive
/// OS lock on `.lock` (and this process's mutex) from reading the state it changes until the
/// change is on disk: it first reloads the snapshot if the `generation` counter moved, bumps
/// the counter, writes, and publishes. Readers never wait: requests read the in-memory
/// snapshot, and [`Registry::reload`] takes the lock shared, so it reads no half-done change.
/// Other processes notice a change by polling [`Registry::reload_if_changed`] (a one-line
/// file read) or on a Redis announcement.
pub struct Registry {
    root: PathBuf,
    shape: BaseModelShape,
    limits: Limits,
    current: ArcSwap<Snapshot>,
    /// Held for every change and reload in this process, outside the file lock, so a reload
    /// never replaces a newer snapshot that a local change published meanwhile.
    writer: Mutex<()>,
}

/// A change in progress: both locks held, and the snapshot as it is on disk now.
struct Change<'a> {
    _local: MutexGuard<'a, ()>,
    _file: disk::DirLock,
    snap: Arc<Snapshot>,
}

impl Registry {
    /// Opens (creating if needed) the registry at `root` and loads it from disk. Fails on
    /// state files that contradict each other rather than serving a guess.
    pub fn open(root: impl Into<PathBuf>, shape: BaseModelShape, limits: Limits) -> Result<Self> {
        let root = root.into();
        let adapters = root.join(ADAPTERS_DIR);
        fs::create_dir_all(&adapters).map_err(|e| AdapterError::io(&adapters, e))?;
        let snapshot = {
            // Leftovers of a crashed writer are only removed while no write can be in flight.
            let _lock = disk::lock(&root, LockMode::Exclusive)?;
            disk::empty_trash(&root);
            disk::remove_stale_temps(&root)?;
            disk::load_snapshot(&root)?
        };
        Ok(Self { root, shape, limits, current: ArcSwap::from_pointee(snapshot), writer: Mutex::new(()) })
    }

    /// The registry's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The base model every registered adapter was validated against.
    pub fn base_model(&self) -> &BaseModelShape {
        &self.shape
    }

    /// The limits applied to new versions.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The current state; cheap, and never changes under the caller.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Resolves a name and selector to one immutable version.
    pub fn resolve(&self, name: &str, selector: &Selector) -> Result<Manifest> {
        self.current.load().resolve(name, selector).cloned()
    }

    /// Resolves a user-facing model string such as `"bot"`, `"bot@7"` or `"bot@canary"`.
    pub fn resolve_model(&self, model: &str) -> Result<Manifest> {
        let (name, selector) = parse_model_ref(model);
        self.resolve(name, &selector)
    }

    /// Where a version's files live; `name` must already be a valid adapter name.
    pub fn version_dir(&self, name: &str, version: u64) -> PathBuf {
        version_path(&self.root, name, version)
    }

    /// Every adapter with its versions and aliases.
    pub fn list(&self) -> Vec<AdapterListing> {
        self.current.load().listing()
    }

    /// Validates the adapter in `staged_dir` and publishes it as the next version of `name`.
    /// The files are read once, so the bytes validated are the bytes stored.
    pub fn register(&self, name: &str, staged_dir: &Path, source: Source, actor: &str) -> Result<Manifest> {
        validate_adapter_name(name)?;
        let files = AdapterFiles::read(staged_dir, &self.limits)?;
        self.register_bytes(name, &files.config, &files.weights, source, actor)
    }

    /// Like [`Registry::register`] for files received in memory (multipart uploads). The
    /// bytes are validated and written straight into the registry's temp directory.
    pub fn register_from_bytes(
        &self,
        name: &str,
        config_json: &[u8],
        safetensors: &[u8],
        source: Source,
        actor: &str,
    ) -> Result<Manifest> {
        validate_adapter_name(name)?;
        self.register_bytes(name, config_json, safetensors, source, actor)
    }

    /// Points `alias` at `version`. With `expected_version`, succeeds only if the alias
    /// currently points there (compare-and-set). The previous target is kept for rollback.
    /// A release running on the alias stops (a manual move always wins).
    pub fn set_alias(
        &self,
        name: &str,
        alias: &str,
        version: u64,
        expected_version: Option<u64>,
        actor: &str,
    ) -> Result<AliasChange> {
        self.set_routes(name, alias, &[Route { version, weight: 1 }], expected_version, actor)
    }

    /// Splits `alias` between versions by weight (see [`AliasState::version_for`]); with
    /// `expected_version`, only if the alias's version is that now. One route with weight is
    /// a plain alias. A release running on the alias stops.
    pub fn set_routes(
        &self,
        name: &str,
        alias: &str,
        routes: &[Route],
        expected_version: Option<u64>,
        actor: &str,
    ) -> Result<AliasChange> {
        validate_adapter_name(name)?;
        validate_alias_name(alias)?;
        let change = self.begin()?;
        let mut entry = entry_of(&change.snap, name)?.clone();
        let (version, routes) = routing::normalise(&entry, name, routes)?;
        let current = entry.aliases.get(alias).cloned();
        let from = current.as_ref().map(|s| s.version);
        if let Some(expected) = expected_version {
            if from != Some(expected) {
                return Err(AdapterError::AliasConflict {
                    name: name.to_owned(),
                    alias: alias.to_owned(),
                    expected,
                    current: from,
                });
            }
        }
        let moved = AliasChange { adapter: name.to_owned(), alias: alias.to_owned(), from, to: version, routes };
        if current.as_ref().is_some_and(|s| s.version == version && s.routes == moved.routes) {
            // Nothing moves, so nothing is written, audited or pushed onto the history.
            return Ok(moved);
        }
        let state = entry.aliases.entry(alias.to_owned()).or_insert_with(|| AliasState::at(version));
        if let Some(previous) = from {
            state.remember(previous);
        }
        state.version = version;
        state.routes = moved.routes.clone();
        let overridden = release::override_active(&mut entry, alias, actor, disk::now_secs());
        let generation = self.bump(&change)?;
        disk::write_json_atomic(&self.adapter_dir(name).join(ALIASES_FILE), &entry.aliases)?;
        if overridden {
            disk::write_json_atomic(&self.adapter_dir(name).join(RELEASES_FILE), &entry.releases)?;
        }
        let (action, routes) = if moved.routes.is_empty() {
            (AuditAction::Promote, None)
        } else {
            (AuditAction::Route, Some(moved.routes.clone()))
        };
        self.audit_append(AuditRecord {
            alias: Some(alias.to_owned()),
            from,
            to: Some(version),
            routes,
            ..record(actor, action, name)
        });
        self.publish(&change, generation, name, entry);
        tracing::info!(adapter = name, alias, ?from, to = version, routes = ?moved.routes, actor, "alias moved");
        Ok(moved)
    }

    /// Mirrors a share of `alias`'s requests to another version, or stops mirroring (`None`).
    pub fn set_shadow(&self, name: &str, alias: &str, rule: Option<ShadowRule>, actor: &str) -> Result<AliasState> {
        validate_adapter_name(name)?;
        validate_alias_name(alias)?;
        let change = self.begin()?;
        let mut entry = entry_of(&change.snap, name)?.clone();
        if let Some(rule) = rule {
            routing::check_shadow(&entry, name, &rule)?;
        }
        let not_found = || AdapterError::AliasNotFound { name: name.to_owned(), alias: alias.to_owned() };
        let state = entry.aliases.get_mut(alias).ok_or_else(not_found)?;
        if state.shadow == rule {
            return Ok(state.clone());
        }
        state.shadow = rule;
        let state = state.clone();
        let generation = self.bump(&change)?;
        disk::write_json_atomic(&self.adapter_dir(name).join(ALIASES_FILE), &entry.aliases)?;
        self.audit_append(AuditRecord {
            alias: Some(alias.to_owned()),
            detail: Some(serde_json::json!({ "shadow": rule })),
            ..record(actor, AuditAction::Shadow, name)
        });
        self.publish(&change, generation, name, entry);
        Ok(state)
    }

    /// Starts releasing `policy.candidate` on `alias`: the alias is split between its current
    /// version and the candidate at the first step's weight.
    pub fn start_release(&self, name: &str, alias: &str, policy: ReleasePolicy, actor: &str) -> Result<Release> {
        validate_adapter_name(name)?;
        validate_alias_name(alias)?;
        policy.validate()?;
        let change = self.begin()?;
        let mut entry = entry_of(&change.snap, name)?.clone();
        let now = disk::now_secs();
        let release = release::start(&mut entry, name, alias, policy, now)?;
        let generation = self.bump(&change)?;
        disk::write_json_atomic(&self.adapter_dir(name).join(ALIASES_FILE), &entry.aliases)?;
        disk::write_json_atomic(&self.adapter_dir(name).join(RELEASES_FILE), &entry.releases)?;
        self.audit_append(release_record(
            actor,
            name,
            &release,
            serde_json::json!({"event": "started", "policy": release.policy, "weight": release.weight()}),
        ));
        self.publish(&change, generation, name, entry);
        tracing::info!(adapter = name, alias, candidate = release.policy.candidate, actor, "release started");
        Ok(release)
    }

    /// Pauses or resumes the release on `alias`; a paused release holds its weights.
    pub fn pause_release(&self, name: &str, alias: &str, paused: bool, actor: &str) -> Result<Release> {
        validate_adapter_name(name)?;
        validate_alias_name(alias)?;
        let change = self.begin()?;
        let mut entry = entry_of(&change.snap, name)?.clone();
        let release = release::pause(&mut entry, alias, paused, disk::now_secs())?;
        let generation = self.bump(&change)?;
        disk::write_json_atomic(&self.adapter_dir(name).join(RELEASES_FILE), &entry.releases)?;
        let event = if paused { "paused" } else { "resumed" };
        self.audit_append(release_record(actor, name, &release, serde_json::json!({"event": event})));
        self.publish(&change, generation, name, entry);
        Ok(release)
    }

    /// Carries out a release decision taken on `seen` (the release as the decider read it):
    /// nothing happens if the release moved meanwhile (another replica decided first, or an
    /// admin stepped in). Returns the release afterwards, `None` when it was stale.
    pub fn advance_release(
        &self,
        name: &str,
        seen: &Release,
        decision: &release::Decision,
        evidence: serde_json::Value,
        actor: &str,
    ) -> Result<Option<Release>> {
        let change = self.begin()?;
        let mut entry = entry_of(&change.snap, name)?.clone();
        let Some((release, event)) = release::advance(&mut entry, seen, decision, evidence.clone(), disk::now_secs())
        else {
            return Ok(None);
        };
        let generation = self.bump(&change)?;
        disk::write_json_atomic(&self.adapter_dir(name).join(ALIASES_FILE), &entry.aliases)?;
        disk::write_json_atomic(&self.adapter_dir(name).join(RELEASES_FILE), &entry.releases)?;
        let state = &entry.aliases[&release.alias];
        self.audit_append(AuditRecord {
            from: Some(seen_version(&change.snap, name, &release.alias)),
            to: Some(state.version),
            routes: (!state.routes.is_empty()).then(|| state.routes.clone()),
            ..release_record(
                actor,
                name,
                &release,
                serde_json::json!({"event": event, "why": release.last.get("why"), "weight": release.weight(), "evidence": evidence}),
            )
        });
        self.publish(&change, generation, name, entry);
        tracing::info!(adapter = name, alias = %release.alias, event, "release decision");
        Ok(Some(release))
    }

    /// Moves `alias` back to the most recent earlier target that still exists. Rollback
    /// consumes history: rolling back twice goes two steps back, not back and forth.
    pub fn rollback(&self, name: &str, alias: &str, actor: &str) -> Result<AliasChange> {
        validate_adapter_name(name)?;
        validate_alias_name(alias)?;
        let change = self.begin()?;
        let mut entry = entry_of(&change.snap, name)?.clone();
        let not_found = || AdapterError::AliasNotFound { name: name.to_owned(), alias: alias.to_owned() };
        let state = entry.aliases.get_mut(alias).ok_or_else(not_found)?;
        let from = state.version;
        // A routed alias rolls back to a plain one, possibly its own heaviest route.
        let routed = !state.routes.is_empty();
        let to = loop {
            match state.history.pop() {
                Some(v) if (v != from || routed) && entry.versions.contains_key(&v) => break v,
                Some(_) => continue,
                None => return Err(AdapterError::NoRollbackTarget { name: name.to_owned(), alias: alias.to_owned() }),
            }
        };
        state.version = to;
        state.routes.clear();
        let overridden = release::override_active(&mut entry, alias, actor, disk::now_secs());
        let generation = self.bump(&change)?;
        disk::write_json_atomic(&self.adapter_dir(name).join(ALIASES_FILE), &entry.aliases)?;
        if overridden {
            disk::write_json_atomic(&self.adapter_dir(name).join(RELEASES_FILE), &entry.releases)?;
        }
        self.audit_append(AuditRecord {
            alias: Some(alias.to_owned()),
            from: Some(from),
            to: Some(to),
            ..record(actor, AuditAction::Rollback, name)
        });
        self.publish(&change, generation, name, entry);
        tracing::info!(adapter = name, alias, from, to, actor, "alias rolled back");
        Ok(AliasChange { adapter: name.to_owned(), alias: alias.to_owned(), from: Some(from), to, routes: Vec::new() })
    }

    /// Deletes a version that no alias points at. Requests that already resolved it keep
    /// whatever they loaded; its number is never handed out again.
    pub fn delete_version(&self, name: &str, version: u64, actor: &str) -> Result<Manifest> {
        validate_adapter_name(name)?;
        let change = self.begin()?;
        let mut entry = entry_of(&change.snap, name)?.clone();
        let manifest = entry
            .versions
            .remove(&version)
            .ok_or_else(|| AdapterError::VersionNotFound { name: name.to_owned(), version })?;
        let aliases = entry.aliases_of(version);
        if !aliases.is_empty() {
            return Err(AdapterError::VersionInUse { name: name.to_owned(), version, aliases });
        }
        let generation = self.bump(&change)?;
        // meta.json may be missing after a crash; without it a reload would derive the next
        // number from the remaining versions and could reuse this one.
        disk::write_json_atomic(&self.adapter_dir(name).join(META_FILE), &Meta { next_version: entry.next_version })?;
        disk::remove_dir_via_trash(&self.root, &self.version_dir(name, version), &format!("{name}-{version}"))?;
        self.audit_append(AuditRecord { version: Some(version), ..record(actor, AuditAction::Delete, name) });
        self.publish(&change, generation, name, entry);
        tracing::info!(adapter = name, version, actor, "version deleted");
        Ok(manifest)
    }

    /// Replaces a version's `lineage` and/or `metrics`, the only manifest fields that may
    /// change after publication; files and hash stay as they are.
    pub fn update_manifest_metrics(
        &self,
        name: &str,
        version: u64,
        lineage: Option<Value>,
        metrics: Option<Value>,
    ) -> Result<Manifest> {
        validate_adapter_name(name)?;
        let change = self.begin()?;
        let mut entry = entry_of(&change.snap, name)?.clone();
        let manifest = entry
            .versions
            .get_mut(&version)
            .ok_or_else(|| AdapterError::VersionNotFound { name: name.to_owned(), version })?;
        if let Some(lineage) = lineage {
            manifest.lineage = lineage;
        }
        if let Some(metrics) = metrics {
            manifest.metrics = metrics;
        }
        let manifest = manifest.clone();
        let generation = self.bump(&change)?;
        disk::write_json_atomic(&self.version_dir(name, version).join(MANIFEST_FILE), &manifest)?;
        self.publish(&change, generation, name, entry);
        Ok(manifest)
    }

    /// Audit records, newest first, skipping `offset` and returning at most `limit`.
    pub fn audit(&self, offset: usize, limit: usize) -> Result<Vec<AuditRecord>> {
        let records = disk::read_audit(&self.root)?;
        Ok(records.into_iter().rev().skip(offset).take(limit).collect())
    }

    /// Re-reads everything from disk; replicas call this when another one changed state. It
    /// waits for a change in progress to finish, never for readers.
    pub fn reload(&self) -> Result<()> {
        let _guard = self.writer.lock();
        let _lock = disk::lock(&self.root, LockMode::Shared)?;
        let snapshot = disk::load_snapshot(&self.root)?;
        self.current.store(Arc::new(snapshot));
        Ok(())
    }

    /// Reloads when another process changed the registry since this snapshot was read (the
    /// generation counter on disk moved); cheap enough to poll. True when it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool> {
        if disk::read_generation(&self.root)? == self.current.load().generation {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Recomputes a version's content hash and compares it with its manifest.
    pub fn verify_version(&self, name: &str, version: u64) -> Result<()> {
        let manifest = self.resolve(name, &Selector::Version(version))?;
        let dir = self.version_dir(name, version);
        let actual = content_hash(&dir)?;
        if actual != manifest.sha256 {
            return Err(AdapterError::corrupt(
                dir,
                format!("content hash is {actual}, manifest says {}", manifest.sha256),
            ));
        }
        Ok(())
    }

    fn adapter_dir(&self, name: &str) -> PathBuf {
        self.root.join(ADAPTERS_DIR).join(name)
    }

    fn register_bytes(
        &self,
        name: &str,
        config: &[u8],
        weights: &[u8],
        source: Source,
        actor: &str,
    ) -> Result<Manifest> {
        // Validation is the slow part and touches nothing, so it runs before taking the lock.
        let validated = validate_adapter_bytes(config, weights, &self.shape, &self.limits)?;
        let change = self.begin()?;
        let mut entry = change.snap.adapter(name).cloned().unwrap_or_else(AdapterEntry::new);
        let version = entry.next_version;
        let manifest = Manifest {
            name: name.to_owned(),
            version,
            sha256: validated.sha256,
            base_model: self.shape.name.clone(),
            created: disk::now_secs(),
            source,
            rank: validated.config.r,
            alpha: validated.config.lora_alpha,
            use_rslora: validated.config.use_rslora,
            target_modules: validated.modules.iter().map(|m| m.name().to_owned()).collect(),
            size_bytes: validated.size_bytes,
            lineage: Value::Null,
            metrics: Value::Null,
        };
        let generation = self.bump(&change)?;
        self.write_version(&manifest, config, weights)?;
        self.audit_append(AuditRecord { version: Some(version), ..record(actor, AuditAction::Register, name) });
        entry.versions.insert(version, manifest.clone());
        entry.next_version = version + 1;
        self.publish(&change, generation, name, entry);
        tracing::info!(adapter = name, version, sha256 = %manifest.sha256, actor, "version registered");
        Ok(manifest)
    }

    /// Stages the version in a temp directory, renames it into place and records the next
    /// version number. On error, removes whatever it created so disk matches the snapshot.
    fn write_version(&self, manifest: &Manifest, config: &[u8], weights: &[u8]) -> Result<()> {
        let adapter_dir = self.adapter_dir(&manifest.name);
        let paths = VersionPaths {
            new_adapter: fs::symlink_metadata(&adapter_dir).is_err(),
            versions_dir: adapter_dir.join(VERSIONS_DIR),
            final_dir: self.version_dir(&manifest.name, manifest.version),
            tmp_dir: adapter_dir.join(VERSIONS_DIR).join(format!(
                "{TMP_PREFIX}-{}-{}",
                manifest.version,
                disk::unique_suffix()
            )),
            adapter_dir,
        };
        let mut renamed = false;
        let result = self.try_write_version(&paths, manifest, config, weights, &mut renamed);
        if result.is_err() {
            let _ = fs::remove_dir_all(&paths.tmp_dir);
            if renamed {
                let _ = fs::remove_dir_all(&paths.final_dir);
            }
            if paths.new_adapter {
                let _ = fs::remove_dir_all(&paths.adapter_dir);
            }
        }
        result
    }

    fn try_write_version(
        &self,
        paths: &VersionPaths,
        manifest: &Manifest,
        config: &[u8],
        weights: &[u8],
        renamed: &mut bool,
    ) -> Result<()> {
        let tmp = &paths.tmp_dir;
        let manifest_json =
            serde_json::to_vec_pretty(manifest).map_err(|e| AdapterError::corrupt(tmp, e.to_string()))?;
        fs::create_dir_all(tmp).map_err(|e| AdapterError::io(tmp, e))?;
        disk::write_file_synced(&tmp.join(CONFIG_FILE), config)?;
        disk::write_file_synced(&tmp.join(WEIGHTS_FILE), weights)?;
        disk::write_file_synced(&tmp.join(MANIFEST_FILE), &manifest_json)?;
        disk::sync_dir(tmp)?;
        // rename(2) would silently replace an empty directory; never overwrite anything.
        if fs::symlink_metadata(&paths.final_dir).is_ok() {
            return Err(AdapterError::corrupt(&paths.final_dir, "already exists but is not a registered version"));
        }
        fs::rename(tmp, &paths.final_dir).map_err(|e| AdapterError::io(&paths.final_dir, e))?;
        *renamed = true;
        disk::sync_dir(&paths.versions_dir)?;
        if paths.new_adapter {
            disk::sync_dir(&paths.adapter_dir)?;
            disk::sync_dir(&self.root.join(ADAPTERS_DIR))?;
        }
        let meta = Meta { next_version: manifest.version + 1 };
        disk::write_json_atomic(&paths.adapter_dir.join(META_FILE), &meta)
    }

    /// The change is already durable when this runs, so a failed audit write is logged
    /// loudly rather than reported as a failed change.
    fn audit_append(&self, record: AuditRecord) {
        if let Err(e) = disk::append_audit(&self.root, &record) {
            tracing::error!(error = %e, ?record, "could not append to the registry audit log");
        }
    }

    /// Takes this process's mutex and the exclusive file lock, then makes sure the snapshot
    /// the change starts from is what is on disk (another process may have written since).
    fn begin(&self) -> Result<Change<'_>> {
        let local = self.writer.lock();
        let file = disk::lock(&self.root, LockMode::Exclusive)?;
        let current = self.current.load_full();
        let snap = if disk::read_generation(&self.root)? == current.generation {
            current
        } else {
            let fresh = Arc::new(disk::load_snapshot(&self.root)?);
            self.current.store(fresh.clone());
            fresh
        };
        Ok(Change { _local: local, _file: file, snap })
    }

    /// Moves the generation on before the first byte of a change is written, so that another
    /// process polling it reloads (and, through the shared lock, waits for the change to end).
    /// A change that then fails has cost the others one needless reload.
    fn bump(&self, change: &Change<'_>) -> Result<u64> {
        let generation = change.snap.generation + 1;
        disk::write_generation(&self.root, generation)?;
        Ok(generation)
    }

    fn publish(&self, change: &Change<'_>, generation: u64, name: &str, entry: AdapterEntry) {
        let mut next = (*change.snap).clone();
        next.generation = generation;
        next.adapters.insert(name.to_owned(), Arc::new(entry));
        self.current.store(Arc::new(next));
    }
}

/// Reads the registry at `root` without writing anything there (not even the lock file): for
/// processes that only look, such as the training sidecar. Waits for a change in progress.
pub fn read_snapshot(root: &Path) -> Result<Snapshot> {
    let _lock = disk::lock_if_present(root)?;
    disk::load_snapshot(root)
}

/// Where version `version` of adapter `name` lives under the registry at `root`.
pub fn version_path(root: &Path, name: &str, version: u64) -> PathBuf {
    root.join(ADAPTERS_DIR).join(name).join(VERSIONS_DIR).join(version.to_string())
}

/// Checks the whole registry at `root`: it loads (every alias points at an existing version,
/// every manifest matches its directory) and every version's files hash to its manifest.
/// Returns one line per problem found; empty means it verifies.
pub fn verify(root: &Path) -> Result<Vec<String>> {
    let snapshot = read_snapshot(root)?;
    let mut problems = Vec::new();
    for (name, entry) in &snapshot.adapters {
        for (version, manifest) in &entry.versions {
            match content_hash(&version_path(root, name, *version)) {
                Ok(hash) if hash == manifest.sha256 => {}
                Ok(hash) => {
                    problems.push(format!("{name}@{version}: files hash to {hash}, manifest says {}", manifest.sha256))
                }
                Err(e) => problems.push(format!("{name}@{version}: {e}")),
            }
        }
        if let Some(max) = entry.versions.keys().next_back() {
            if entry.next_version <= *max {
                problems.push(format!("{name}: next version {} is not above {max}", entry.next_version));
            }
        }
    }
    Ok(problems)
}

/// Where one registration writes, and whether it created the adapter's directory.
struct VersionPaths {
    adapter_dir: PathBuf,
    versions_dir: PathBuf,
    tmp_dir: PathBuf,
    final_dir: PathBuf,
    new_adapter: bool,
}

/// The gateway shares one registry across worker threads.
fn _assert_registry_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Registry>();
}

fn entry_of<'a>(snap: &'a Snapshot, name: &str) -> Result<&'a AdapterEntry> {
    snap.adapter(name).ok_or_else(|| AdapterError::AdapterNotFound { name: name.to_owned() })
}

fn record(actor: &str, action: AuditAction, adapter: &str) -> AuditRecord {
    AuditRecord {
        ts: disk::now_secs(),
        actor: actor.to_owned(),
        action,
        adapter: adapter.to_owned(),
        alias: None,
        from: None,
        to: None,
        version: None,
        routes: None,
        detail: None,
    }
}

fn release_record(actor: &str, name: &str, release: &Release, detail: serde_json::Value) -> AuditRecord {
    let mut detail = detail;
    if let Some(obj) = detail.as_object_mut() {
        obj.insert("candidate".into(), release.policy.candidate.into());
        obj.insert("baseline".into(), release.baseline.into());
        obj.insert("status".into(), serde_json::to_value(release.status).unwrap_or_default());
    }
    AuditRecord {
        alias: Some(release.alias.clone()),
        detail: Some(detail),
        ..record(actor, AuditAction::Release, name)
    }
}

/// The version an alias had in the snapshot a change started from.
fn seen_version(snap: &Snapshot, name: &str, alias: &str) -> u64 {
    snap.adapter(name).and_then(|e| e.aliases.get(alias)).map_or(0, |s| s.version)
}
