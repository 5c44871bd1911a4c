//! The files of the knowledge-base store: names, atomic writes, reading back, and removing
//! what interrupted writes left behind.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::DocInfo;
use crate::chunk::Chunk;
use crate::KnowledgeError;

pub(super) const KB_FILE: &str = "kb.json";
pub(super) const DOCS_DIR: &str = "docs";
pub(super) const GENERATION_FILE: &str = "generation";
/// Files and directories being written start with this; nothing reads them.
pub(super) const TMP_PREFIX: &str = ".tmp-";
/// A deleted knowledge base's directory, renamed out of sight before it is removed.
pub(super) const TRASH_PREFIX: &str = ".trash-";
/// How old a temp file or an orphaned `.vec` must be before a scan removes it: younger ones
/// may be another process's write in progress.
pub(super) const STALE_AFTER: Duration = Duration::from_secs(10 * 60);

/// `<root>/<kb>/kb.json`: what a knowledge base is, without its counts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct KbFile {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub created: u64,
    /// Nanoseconds since the epoch, so lists keep creation order within a second.
    #[serde(default)]
    pub created_ns: u64,
}

/// `<root>/<kb>/docs/<doc>.json`: a document's record and its chunks; the commit marker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DocFile {
    #[serde(rename = "document")]
    pub info: DocInfo,
    /// Nanoseconds since the epoch, so lists keep creation order within a second.
    #[serde(default)]
    pub created_ns: u64,
    pub chunks: Vec<Chunk>,
}

/// Unix time in seconds and in nanoseconds.
pub(super) fn now() -> (u64, u64) {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (since.as_secs(), u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}

/// A fresh random token; also the unique part of every id and temp name.
pub(super) fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Whether `id` is `prefix` followed by 32 lowercase hex digits, as this store makes them.
/// Names found on disk are checked before they become paths or ids.
pub(super) fn is_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), KnowledgeError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| KnowledgeError::io(dir, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), KnowledgeError> {
    let mut f = File::create(path).map_err(|e| KnowledgeError::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| KnowledgeError::io(path, e))
}

/// Writes `dir/name` so that a crash leaves it either absent (or as it was) or whole: a
/// uniquely named temp file, fsync, rename, fsync of the directory.
pub(super) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), KnowledgeError> {
    let tmp = dir.join(format!("{TMP_PREFIX}{}-{name}", token()));
    let path = dir.join(name);
    write_synced(&tmp, bytes)?;
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(KnowledgeError::io(&path, e));
    }
    sync_dir(dir)
}

pub(super) fn json_bytes(value: &impl Serialize) -> Result<Vec<u8>, KnowledgeError> {
    let mut bytes = serde_json::to_vec(value).map_err(|e| KnowledgeError::invalid("metadata", e.to_string()))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Creates `<root>/<kb>/` with its `kb.json` and empty `docs/` as one rename, so no process
/// ever sees a half-made knowledge base.
pub(super) fn create_kb_dir(root: &Path, kb: &KbFile) -> Result<(), KnowledgeError> {
    let tmp = root.join(format!("{TMP_PREFIX}{}", token()));
    let made = (|| {
        fs::create_dir(&tmp).map_err(|e| KnowledgeError::io(&tmp, e))?;
        let docs = tmp.join(DOCS_DIR);
        fs::create_dir(&docs).map_err(|e| KnowledgeError::io(&docs, e))?;
        write_synced(&tmp.join(KB_FILE), &json_bytes(kb)?)?;
        sync_dir(&tmp)?;
        let dir = root.join(&kb.id);
        fs::rename(&tmp, &dir).map_err(|e| KnowledgeError::io(&dir, e))?;
        sync_dir(root)
    })();
    if made.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    made
}

/// Hides `<root>/<kb>/` with one rename, then removes it. `Ok(false)` when it was already gone.
pub(super) fn remove_kb_dir(root: &Path, kb: &str) -> Result<bool, KnowledgeError> {
    let dir = root.join(kb);
    let trash = root.join(format!("{TRASH_PREFIX}{}", token()));
    match fs::rename(&dir, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(KnowledgeError::io(&dir, e)),
    }
    sync_dir(root)?;
    if let Err(e) = fs::remove_dir_all(&trash) {
        tracing::warn!(path = %trash.display(), error = %e, "could not remove deleted knowledge base");
    }
    Ok(true)
}

/// Raw little-endian f32, row after row.
pub(super) fn vector_bytes(vectors: &[Vec<f32>]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(vectors.iter().map(|v| v.len() * 4).sum());
    for value in vectors.iter().flatten() {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// Reads a whole file; `None` when it does not exist (it may have vanished mid-scan).
pub(super) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, KnowledgeError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KnowledgeError::io(path, e)),
    }
}

/// Reads a JSON file; `None` when it is absent, or unparsable (with a warning: it is skipped).
pub(super) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, KnowledgeError> {
    let Some(bytes) = read_optional(path)? else { return Ok(None) };
    match serde_json::from_slice(&bytes) {
        Ok(value) => Ok(Some(value)),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable knowledge-base file");
            Ok(None)
        }
    }
}

/// A document as stored: its file and its vectors, row-major.
pub(super) struct LoadedDoc {
    pub file: DocFile,
    pub vectors: Vec<f32>,
}

/// Reads `<doc>.json` and `<doc>.vec`; `None` when either vanished or they do not fit together.
pub(super) fn read_doc(
    docs: &Path,
    kb: &str,
    doc: &str,
    dimension: usize,
) -> Result<Option<LoadedDoc>, KnowledgeError> {
    let json_path = docs.join(format!("{doc}.json"));
    let Some(file) = read_json::<DocFile>(&json_path)? else { return Ok(None) };
    let vec_path = docs.join(format!("{doc}.vec"));
    let Some(bytes) = read_optional(&vec_path)? else { return Ok(None) };
    let expected = file.chunks.len() * dimension * 4;
    let problem = if file.info.id != doc || file.info.knowledge_base != kb {
        Some(format!("it names document {:?} of {:?}", file.info.id, file.info.knowledge_base))
    } else if bytes.len() != expected {
        Some(format!(
            "{} vector bytes, expected {expected} ({} chunks × {dimension} floats)",
            bytes.len(),
            file.chunks.len()
        ))
    } else if file.chunks.len() != file.info.chunks {
        Some(format!("{} chunks stored, the record says {}", file.chunks.len(), file.info.chunks))
    } else {
        None
    };
    if let Some(problem) = problem {
        tracing::warn!(file = %json_path.display(), problem, "skipping a document that does not fit together");
        return Ok(None);
    }
    let vectors = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(Some(LoadedDoc { file, vectors }))
}

/// The names in a directory; a missing directory is empty (it may have vanished mid-scan).
pub(super) fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, KnowledgeError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(KnowledgeError::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(KnowledgeError::io(dir, e)),
        };
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, entry.path()));
        }
    }
    Ok(out)
}

/// The ids of the documents committed in a `docs/` directory (those with a `.json`).
pub(super) fn committed_docs(docs: &Path) -> Result<Vec<String>, KnowledgeError> {
    Ok(list_dir(docs)?
        .into_iter()
        .filter_map(|(name, _)| name.strip_suffix(".json").filter(|id| is_id(id, "doc_")).map(str::to_owned))
        .collect())
}

/// Removes trash, and temp files and orphaned `.vec` files older than [`STALE_AFTER`]:
/// what a crash left behind. Best effort: a failure is a warning and is retried next scan.
pub(super) fn remove_leftovers(root: &Path) -> Result<(), KnowledgeError> {
    for (name, path) in list_dir(root)? {
        if name.starts_with(TRASH_PREFIX) {
            remove_quietly(&path);
        } else if name.starts_with(TMP_PREFIX) {
            if is_stale(&path) {
                remove_quietly(&path);
            }
        } else if is_id(&name, "kb_") {
            let docs = path.join(DOCS_DIR);
            let entries = list_dir(&docs)?;
            let committed: std::collections::HashSet<&str> =
                entries.iter().filter_map(|(n, _)| n.strip_suffix(".json")).collect();
            for (entry, file) in &entries {
                let orphan = entry.strip_suffix(".vec").is_some_and(|id| !committed.contains(id));
                if (orphan || entry.starts_with(TMP_PREFIX)) && is_stale(file) {
                    // The .json may have landed since the listing: look again before removing.
                    let json = entry.strip_suffix(".vec").map(|id| docs.join(format!("{id}.json")));
                    if json.is_none_or(|j| absent(&j)) {
                        remove_quietly(file);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether `path` is certainly not there (an unreadable path is not taken for a deleted one).
pub(super) fn absent(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == ErrorKind::NotFound)
}

fn is_stale(path: &Path) -> bool {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|modified| modified.elapsed().is_ok_and(|age| age >= STALE_AFTER))
}

fn remove_quietly(path: &Path) {
    let removed = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => tracing::info!(path = %path.display(), "removed what an interrupted write left behind"),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove a leftover"),
    }
}

/// The token in `<root>/generation`; `None` when it cannot be read.
pub(super) fn read_generation(root: &Path) -> Option<String> {
    fs::read_to_string(root.join(GENERATION_FILE)).ok().map(|s| s.trim().to_owned())
}

/// Replaces `<root>/generation` with a fresh random token and returns it.
pub(super) fn bump_generation(root: &Path) -> Result<String, KnowledgeError> {
    let token = token();
    write_atomic(root, GENERATION_FILE, format!("{token}\n").as_bytes())?;
    Ok(token)
}
