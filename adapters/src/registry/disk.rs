//! On-disk layout and durable writes: atomic JSON files, version directories, the audit log.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::model::{
    validate_adapter_name, validate_alias_name, AdapterEntry, AliasState, AuditRecord, Manifest, Snapshot,
};
use super::release::Release;
use crate::error::{AdapterError, Result};

pub(crate) const ADAPTERS_DIR: &str = "adapters";
pub(crate) const VERSIONS_DIR: &str = "versions";
pub(crate) const MANIFEST_FILE: &str = "manifest.json";
pub(crate) const ALIASES_FILE: &str = "aliases.json";
pub(crate) const META_FILE: &str = "meta.json";
pub(crate) const RELEASES_FILE: &str = "releases.json";
pub(crate) const AUDIT_FILE: &str = "audit.jsonl";
pub(crate) const TRASH_DIR: &str = ".trash";
/// Held (flock) by a writer for the length of one change, shared by a reader loading a snapshot.
pub(crate) const LOCK_FILE: &str = ".lock";
/// A counter bumped by every change, so other processes can tell their snapshot is stale.
pub(crate) const GENERATION_FILE: &str = "generation";
/// Half-written directories start with this and are invisible to loading.
pub(crate) const TMP_PREFIX: &str = ".tmp";

/// `adapters/{name}/meta.json`: counters that must survive deleting every version.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub next_version: u64,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A name no other writer in this or another process will pick.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{}-{}-{nanos}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Makes a rename or create inside `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| AdapterError::io(dir, e))
}

/// Creates `path` with `bytes` and flushes it to disk.
pub(crate) fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| AdapterError::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| AdapterError::io(path, e))
}

/// Replaces `path` so that a crash leaves either the old or the new content: write
/// `path.tmp`, fsync, rename over `path`, fsync the directory.
pub(crate) fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| AdapterError::corrupt(path, e.to_string()))?;
    bytes.push(b'\n');
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write_file_synced(&tmp, &bytes)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(AdapterError::io(path, e));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Reads a JSON state file; a missing file is `None`, an unparsable one is corruption.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| AdapterError::corrupt(path, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AdapterError::io(path, e)),
    }
}

/// Moves `dir` out of sight with one rename, then deletes it. Once the rename is durable
/// the directory is gone as far as loading is concerned, even if the delete fails.
pub(crate) fn remove_dir_via_trash(root: &Path, dir: &Path, label: &str) -> Result<()> {
    let trash = root.join(TRASH_DIR);
    fs::create_dir_all(&trash).map_err(|e| AdapterError::io(&trash, e))?;
    let target = trash.join(format!("{label}-{}", unique_suffix()));
    fs::rename(dir, &target).map_err(|e| AdapterError::io(dir, e))?;
    sync_dir(dir.parent().unwrap_or(root))?;
    if let Err(e) = fs::remove_dir_all(&target) {
        tracing::warn!(path = %target.display(), error = %e, "could not empty registry trash");
    }
    Ok(())
}

/// Best-effort removal of trash left by a crash between rename and delete.
pub(crate) fn empty_trash(root: &Path) {
    let trash = root.join(TRASH_DIR);
    if trash.exists() {
        if let Err(e) = fs::remove_dir_all(&trash) {
            tracing::warn!(path = %trash.display(), error = %e, "could not empty registry trash");
        }
    }
}

/// An OS lock on the registry's lock file, released when dropped (or when the process dies).
pub(crate) struct DirLock {
    _file: File,
}

/// Whether a lock excludes every other holder or only writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    /// A writer: no other writer or reader at the same time.
    Exclusive,
    /// A reader: any number of readers, no writer.
    Shared,
}

/// Takes the registry's lock, creating the lock file if needed (readers that may not write
/// call [`lock_if_present`] instead). Blocks until the lock is free.
pub(crate) fn lock(root: &Path, mode: LockMode) -> Result<DirLock> {
    let path = root.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| AdapterError::io(&path, e))?;
    take(file, &path, mode)
}

/// A shared lock for a process that must not create files in the registry; `None` when no
/// writer ever created the lock file (then there is nothing to race with).
pub(crate) fn lock_if_present(root: &Path) -> Result<Option<DirLock>> {
    let path = root.join(LOCK_FILE);
    match File::open(&path) {
        Ok(file) => take(file, &path, LockMode::Shared).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AdapterError::io(&path, e)),
    }
}

fn take(file: File, path: &Path, mode: LockMode) -> Result<DirLock> {
    let locked = match mode {
        LockMode::Exclusive => file.lock(),
        LockMode::Shared => file.lock_shared(),
    };
    locked.map_err(|e| AdapterError::io(path, e))?;
    Ok(DirLock { _file: file })
}

/// The generation on disk; 0 before the first change.
pub(crate) fn read_generation(root: &Path) -> Result<u64> {
    let path = root.join(GENERATION_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| AdapterError::corrupt(&path, format!("not a number: {text:?}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(AdapterError::io(&path, e)),
    }
}

/// Replaces the generation counter; only a writer holding the exclusive lock calls this.
pub(crate) fn write_generation(root: &Path, generation: u64) -> Result<()> {
    let path = root.join(GENERATION_FILE);
    let tmp = root.join(format!("{GENERATION_FILE}.tmp"));
    write_file_synced(&tmp, format!("{generation}\n").as_bytes())?;
    fs::rename(&tmp, &path).map_err(|e| AdapterError::io(&path, e))?;
    sync_dir(root)
}

/// Removes half-written version directories that a crashed writer left behind. Only a writer
/// holding the exclusive lock may call this: then no write is in progress anywhere.
pub(crate) fn remove_stale_temps(root: &Path) -> Result<()> {
    for (name, adapter_dir) in list_dir(&root.join(ADAPTERS_DIR))? {
        if name.starts_with(TMP_PREFIX) || !adapter_dir.is_dir() {
            continue;
        }
        for (entry, path) in list_dir(&adapter_dir.join(VERSIONS_DIR))? {
            if entry.starts_with(TMP_PREFIX) {
                if let Err(e) = fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove a half-written version");
                }
            }
        }
    }
    Ok(())
}

/// Reads the whole registry under `root` into a fresh snapshot. The caller holds the lock
/// (shared or exclusive), so no change is half-done while it reads.
pub(crate) fn load_snapshot(root: &Path) -> Result<Snapshot> {
    let adapters_dir = root.join(ADAPTERS_DIR);
    let mut snapshot = Snapshot { generation: read_generation(root)?, ..Snapshot::default() };
    for (name, path) in list_dir(&adapters_dir)? {
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        if validate_adapter_name(&name).is_err() || !path.is_dir() {
            tracing::warn!(path = %path.display(), "ignoring unexpected entry in registry");
            continue;
        }
        if let Some(entry) = load_entry(&name, &path)? {
            snapshot.adapters.insert(name, Arc::new(entry));
        }
    }
    Ok(snapshot)
}

fn load_entry(name: &str, dir: &Path) -> Result<Option<AdapterEntry>> {
    let meta: Option<Meta> = read_json(&dir.join(META_FILE))?;
    let aliases_path = dir.join(ALIASES_FILE);
    let aliases: BTreeMap<String, AliasState> = read_json(&aliases_path)?.unwrap_or_default();
    let releases: BTreeMap<String, Release> = read_json(&dir.join(RELEASES_FILE))?.unwrap_or_default();
    let mut versions = BTreeMap::new();
    for (file_name, path) in list_dir(&dir.join(VERSIONS_DIR))? {
        if file_name.starts_with(TMP_PREFIX) {
            continue;
        }
        let version = match file_name.parse::<u64>() {
            Ok(v) if file_name.bytes().all(|b| b.is_ascii_digit()) => v,
            _ => {
                tracing::warn!(path = %path.display(), "ignoring unexpected entry in registry");
                continue;
            }
        };
        let manifest_path = path.join(MANIFEST_FILE);
        let manifest: Manifest = read_json(&manifest_path)?
            .ok_or_else(|| AdapterError::corrupt(&path, format!("version directory has no {MANIFEST_FILE}")))?;
        if manifest.name != name || manifest.version != version {
            return Err(AdapterError::corrupt(
                &manifest_path,
                format!("manifest says {}@{}", manifest.name, manifest.version),
            ));
        }
        versions.insert(version, manifest);
    }
    for (alias, state) in &aliases {
        let missing = state
            .routes
            .iter()
            .map(|r| r.version)
            .chain(state.shadow.map(|s| s.version))
            .find(|v| !versions.contains_key(v));
        if let Some(v) = missing {
            return Err(AdapterError::corrupt(
                &aliases_path,
                format!("alias {alias:?} routes to version {v}, which does not exist"),
            ));
        }
        if validate_alias_name(alias).is_err() || !versions.contains_key(&state.version) {
            return Err(AdapterError::corrupt(
                &aliases_path,
                format!("alias {alias:?} points to version {}, which does not exist", state.version),
            ));
        }
    }
    if meta.is_none() && versions.is_empty() && aliases.is_empty() {
        return Ok(None);
    }
    // A crash between publishing a version and writing meta.json leaves meta behind.
    let after_max = versions.keys().next_back().map_or(1, |v| v + 1);
    let next_version = meta.map_or(1, |m| m.next_version).max(after_max);
    Ok(Some(AdapterEntry { versions, aliases, next_version, releases }))
}

fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AdapterError::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| AdapterError::io(dir, e))?;
        match entry.file_name().into_string() {
            Ok(name) => out.push((name, entry.path())),
            Err(raw) => {
                tracing::warn!(name = ?raw, dir = %dir.display(), "ignoring non-UTF-8 name in registry")
            }
        }
    }
    Ok(out)
}

/// Appends one record as a single write so concurrent readers never see half a line
/// (except after a crash, which [`read_audit`] tolerates).
pub(crate) fn append_audit(root: &Path, record: &AuditRecord) -> Result<()> {
    let path = root.join(AUDIT_FILE);
    let json = serde_json::to_vec(record).map_err(|e| AdapterError::corrupt(&path, e.to_string()))?;
    let mut f =
        OpenOptions::new().create(true).read(true).append(true).open(&path).map_err(|e| AdapterError::io(&path, e))?;
    // After a torn write the file lacks its final newline; start a fresh line so this
    // record is not glued onto the broken one.
    let mut line = Vec::with_capacity(json.len() + 2);
    if !ends_with_newline(&mut f).map_err(|e| AdapterError::io(&path, e))? {
        line.push(b'\n');
    }
    line.extend_from_slice(&json);
    line.push(b'\n');
    f.write_all(&line).and_then(|()| f.sync_data()).map_err(|e| AdapterError::io(&path, e))
}

/// True for an empty file or one whose last byte is a newline.
fn ends_with_newline(f: &mut File) -> std::io::Result<bool> {
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// All audit records, oldest first, skipping a torn last line.
pub(crate) fn read_audit(root: &Path) -> Result<Vec<AuditRecord>> {
    let path = root.join(AUDIT_FILE);
    // Lossy, because a torn final line may end inside a multi-byte character.
    let text = match fs::read(&path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AdapterError::io(&path, e)),
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| match serde_json::from_str(l) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "skipping unreadable audit line");
                None
            }
        })
        .collect())
}
