//! Every knowledge base, durable under one root directory and indexed in memory.
//!
//! # Disk layout
//!
//! Under the root (the gateway passes `<data>/knowledge`):
//! - `<kb>/kb.json`: the knowledge base's id, name, tenant and creation time (seconds, and
//!   `created_ns` for ordering within a second; no counts). A
//!   knowledge base is created as a `.tmp-<token>/` directory holding `kb.json` and an empty
//!   `docs/`, then renamed into place, so it appears whole or not at all.
//! - `<kb>/docs/<doc>.vec`: the chunks' vectors, raw little-endian f32, chunks × dimension,
//!   written first;
//! - `<kb>/docs/<doc>.json`: `{"document": DocInfo, "created_ns": u64, "chunks": [Chunk, ...]}`,
//!   written second. The `.json` is the commit marker: a document exists once it is there.
//! - `generation`: a random token rewritten after every change, by whichever process made it.
//!
//! Every file is written under a unique `.tmp-` name, fsynced, renamed into place, and its
//! directory fsynced. Deleting a document removes its `.json` first (it is gone at once),
//! then its `.vec`. Deleting a knowledge base renames its directory to `.trash-<token>` and
//! then removes that. [`KnowledgeBases::open`] and [`KnowledgeBases::refresh`] remove trash,
//! and temp files and `.vec` files without a `.json` once they are older than ten minutes
//! (younger ones may be another process's write in progress).
//!
//! Several gateway processes may share the root. They never write the same file (ids are
//! random), so no lock is needed: each reads [`KnowledgeBases::generation`] and calls
//! [`KnowledgeBases::refresh`] when it changed, which loads new knowledge bases and documents
//! and drops deleted ones, document by document, skipping any file that vanishes mid-scan.
//!
//! Tenants only see their own knowledge bases: another tenant's id is
//! [`KnowledgeError::NotFound`], exactly like an absent one.

mod disk;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use self::disk::{DocFile, KbFile, LoadedDoc};
use crate::chunk::Chunk;
use crate::extract::Format;
use crate::index::{Batch, Index};
use crate::KnowledgeError;

/// The longest knowledge-base name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// The longest document title, in characters.
pub const MAX_TITLE_CHARS: usize = 512;

/// A knowledge base as callers see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KbInfo {
    /// `kb_` and 32 hex digits.
    pub id: String,
    pub name: String,
    pub tenant: String,
    /// Unix seconds.
    pub created: u64,
    pub documents: usize,
    pub chunks: usize,
}

/// A stored document as callers see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DocInfo {
    /// `doc_` and 32 hex digits.
    pub id: String,
    pub knowledge_base: String,
    pub title: String,
    /// The uploaded file's name.
    pub source: Option<String>,
    pub format: Format,
    /// Unix seconds.
    pub created: u64,
    /// Characters of the document's text.
    pub chars: usize,
    pub chunks: usize,
    pub metadata: serde_json::Value,
}

/// A document to add: its text (which the chunks are slices of) and what describes it.
#[derive(Debug, Clone)]
pub struct NewDocument {
    pub title: String,
    pub text: String,
    pub source: Option<String>,
    pub format: Format,
    pub metadata: serde_json::Value,
}

/// One search result: the chunk, where it came from, and how it scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub document_id: String,
    pub title: String,
    pub chunk_index: usize,
    pub text: String,
    pub start: usize,
    pub end: usize,
    pub heading: Option<String>,
    /// Reciprocal-rank fusion score (see [`crate::index`]).
    pub score: f32,
    /// Cosine similarity with the query vector.
    pub similarity: f32,
    /// BM25 score, when the keyword search returned this chunk.
    pub bm25: Option<f32>,
}

/// Every knowledge base under one root. `Send + Sync`; every method takes `&self`.
pub struct KnowledgeBases {
    root: PathBuf,
    dimension: usize,
    kbs: RwLock<HashMap<String, Arc<RwLock<Kb>>>>,
    /// The generation token read before the last full scan; a refresh that reads the same
    /// token has nothing to do.
    scanned: Mutex<Option<String>>,
    /// One refresh at a time (they would only duplicate work).
    refreshing: Mutex<()>,
}

/// One knowledge base in memory.
struct Kb {
    file: KbFile,
    docs: HashMap<String, StoredDoc>,
    index: Index,
    /// Set under the write lock when the knowledge base is deleted, so a write that raced
    /// with the delete sees it.
    deleted: bool,
}

struct StoredDoc {
    info: DocInfo,
    created_ns: u64,
    chunks: Vec<Chunk>,
}

impl Kb {
    fn info(&self) -> KbInfo {
        KbInfo {
            id: self.file.id.clone(),
            name: self.file.name.clone(),
            tenant: self.file.tenant.clone(),
            created: self.file.created,
            documents: self.docs.len(),
            chunks: self.index.len(),
        }
    }

    /// Adds documents read from disk that memory does not have yet, in one index commit.
    fn add_loaded(&mut self, loaded: Vec<LoadedDoc>) -> Result<bool, KnowledgeError> {
        let loaded: Vec<LoadedDoc> = loaded.into_iter().filter(|d| !self.docs.contains_key(&d.file.info.id)).collect();
        let batches: Vec<Batch> = loaded
            .iter()
            .map(|d| Batch {
                document_id: &d.file.info.id,
                texts: d.file.chunks.iter().map(|c| c.text.as_str()).collect(),
                vectors: &d.vectors,
            })
            .collect();
        self.index.add_batches(&batches)?;
        let added = !loaded.is_empty();
        for d in loaded {
            let stored = StoredDoc { info: d.file.info, created_ns: d.file.created_ns, chunks: d.file.chunks };
            self.docs.insert(stored.info.id.clone(), stored);
        }
        Ok(added)
    }
}

impl KnowledgeBases {
    /// Opens (creating if needed) the store under `root`: removes leftovers of interrupted
    /// writes, loads every knowledge base and builds their indexes.
    pub fn open(root: &Path, dimension: usize) -> Result<Self, KnowledgeError> {
        if dimension == 0 {
            return Err(KnowledgeError::invalid("dimension", "the vector dimension must be at least 1"));
        }
        std::fs::create_dir_all(root).map_err(|e| KnowledgeError::io(root, e))?;
        let store = Self {
            root: root.to_owned(),
            dimension,
            kbs: RwLock::new(HashMap::new()),
            scanned: Mutex::new(None),
            refreshing: Mutex::new(()),
        };
        if disk::read_generation(root).is_none() {
            disk::bump_generation(root)?;
        }
        store.refresh()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    pub fn create(&self, tenant: &str, name: &str) -> Result<KbInfo, KnowledgeError> {
        check_text("name", name, MAX_NAME_CHARS)?;
        let (created, created_ns) = disk::now();
        let file = KbFile {
            id: format!("kb_{}", disk::token()),
            name: name.to_owned(),
            tenant: tenant.to_owned(),
            created,
            created_ns,
        };
        disk::create_kb_dir(&self.root, &file)?;
        let kb = Kb { file, docs: HashMap::new(), index: Index::new(self.dimension)?, deleted: false };
        let info = kb.info();
        // A refresh may have loaded it from disk already; either copy is the same.
        self.kbs.write().entry(info.id.clone()).or_insert_with(|| Arc::new(RwLock::new(kb)));
        self.changed();
        Ok(info)
    }

    /// The tenant's knowledge bases, oldest first.
    pub fn list(&self, tenant: &str) -> Vec<KbInfo> {
        let mut list: Vec<(u64, KbInfo)> = self
            .kbs
            .read()
            .values()
            .filter_map(|kb| {
                let kb = kb.read();
                (kb.file.tenant == tenant && !kb.deleted).then(|| (kb.file.created_ns, kb.info()))
            })
            .collect();
        list.sort_by(|(a_ns, a), (b_ns, b)| (a.created, a_ns, &a.id).cmp(&(b.created, b_ns, &b.id)));
        list.into_iter().map(|(_, info)| info).collect()
    }

    pub fn get(&self, tenant: &str, id: &str) -> Result<KbInfo, KnowledgeError> {
        Ok(self.kb(tenant, id)?.read().info())
    }

    pub fn delete(&self, tenant: &str, id: &str) -> Result<(), KnowledgeError> {
        let kb = self.kb(tenant, id)?;
        let mut guard = kb.write();
        if guard.deleted {
            return Err(KnowledgeError::not_found("knowledge base", id));
        }
        // Gone already means another process deleted it: the outcome is the same.
        disk::remove_kb_dir(&self.root, id)?;
        guard.deleted = true;
        drop(guard);
        self.kbs.write().remove(id);
        self.changed();
        Ok(())
    }

    /// Validates, stores (vectors, then the record) and indexes a document. Nothing is stored
    /// when validation fails.
    pub fn add_document(
        &self,
        tenant: &str,
        kb: &str,
        doc: NewDocument,
        chunks: Vec<Chunk>,
        vectors: Vec<Vec<f32>>,
    ) -> Result<DocInfo, KnowledgeError> {
        let handle = self.kb(tenant, kb)?;
        self.validate(&doc, &chunks, &vectors)?;
        let (created, created_ns) = disk::now();
        let info = DocInfo {
            id: format!("doc_{}", disk::token()),
            knowledge_base: kb.to_owned(),
            title: doc.title,
            source: doc.source,
            format: doc.format,
            created,
            chars: doc.text.chars().count(),
            chunks: chunks.len(),
            metadata: doc.metadata,
        };
        let file = DocFile { info, created_ns, chunks };
        let docs_dir = self.root.join(kb).join(disk::DOCS_DIR);
        let json = disk::json_bytes(&file)?;
        let vec_name = format!("{}.vec", file.info.id);
        let json_name = format!("{}.json", file.info.id);
        let written = disk::write_atomic(&docs_dir, &vec_name, &disk::vector_bytes(&vectors))
            .and_then(|()| disk::write_atomic(&docs_dir, &json_name, &json));
        if let Err(e) = written {
            let _ = std::fs::remove_file(docs_dir.join(&vec_name));
            // The directory vanished: the knowledge base was deleted meanwhile.
            return Err(match e {
                KnowledgeError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                    KnowledgeError::not_found("knowledge base", kb)
                }
                e => e,
            });
        }

        let mut guard = handle.write();
        let indexed = if guard.deleted {
            Err(KnowledgeError::not_found("knowledge base", kb))
        } else if guard.index.contains(&file.info.id) {
            Ok(()) // A refresh loaded it from disk first.
        } else {
            guard.index.add(&file.info.id, &file.chunks, &vectors)
        };
        if let Err(e) = indexed {
            drop(guard);
            let _ = std::fs::remove_file(docs_dir.join(&json_name));
            let _ = std::fs::remove_file(docs_dir.join(&vec_name));
            return Err(e);
        }
        let info = file.info.clone();
        guard.docs.insert(info.id.clone(), StoredDoc { info: file.info, created_ns, chunks: file.chunks });
        drop(guard);
        self.changed();
        Ok(info)
    }

    /// The knowledge base's documents, oldest first.
    pub fn list_documents(&self, tenant: &str, kb: &str) -> Result<Vec<DocInfo>, KnowledgeError> {
        let handle = self.kb(tenant, kb)?;
        let guard = handle.read();
        let mut docs: Vec<&StoredDoc> = guard.docs.values().collect();
        docs.sort_by(|a, b| {
            (a.info.created, a.created_ns, &a.info.id).cmp(&(b.info.created, b.created_ns, &b.info.id))
        });
        Ok(docs.into_iter().map(|d| d.info.clone()).collect())
    }

    pub fn get_document(&self, tenant: &str, kb: &str, doc: &str) -> Result<DocInfo, KnowledgeError> {
        let handle = self.kb(tenant, kb)?;
        let guard = handle.read();
        guard.docs.get(doc).map(|d| d.info.clone()).ok_or_else(|| KnowledgeError::not_found("document", doc))
    }

    pub fn delete_document(&self, tenant: &str, kb: &str, doc: &str) -> Result<(), KnowledgeError> {
        let handle = self.kb(tenant, kb)?;
        if !handle.read().docs.contains_key(doc) {
            return Err(KnowledgeError::not_found("document", doc));
        }
        let docs_dir = self.root.join(kb).join(disk::DOCS_DIR);
        for name in [format!("{doc}.json"), format!("{doc}.vec")] {
            let path = docs_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => disk::sync_dir(&docs_dir)?,
                // Another process deleted it (or its whole knowledge base) first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(KnowledgeError::io(&path, e)),
            }
        }
        let mut guard = handle.write();
        guard.docs.remove(doc);
        guard.index.remove(doc)?;
        drop(guard);
        self.changed();
        Ok(())
    }

    /// The `k` best chunks for a query (text for BM25, its embedding for similarity).
    pub fn search(
        &self,
        tenant: &str,
        kb: &str,
        query: &str,
        query_vector: &[f32],
        k: usize,
    ) -> Result<Vec<Hit>, KnowledgeError> {
        let handle = self.kb(tenant, kb)?;
        let guard = handle.read();
        let hits = guard.index.search(query, query_vector, k)?;
        Ok(hits
            .into_iter()
            .filter_map(|hit| {
                let doc = guard.docs.get(&hit.document_id)?;
                let chunk = doc.chunks.get(hit.chunk)?;
                Some(Hit {
                    title: doc.info.title.clone(),
                    chunk_index: hit.chunk,
                    text: chunk.text.clone(),
                    start: chunk.start,
                    end: chunk.end,
                    heading: chunk.heading.clone(),
                    score: hit.score,
                    similarity: hit.similarity,
                    bm25: hit.bm25,
                    document_id: hit.document_id,
                })
            })
            .collect())
    }

    /// A token that changes whenever any process changes the store on disk (read from
    /// `<root>/generation`; empty when that file cannot be read).
    pub fn generation(&self) -> String {
        disk::read_generation(&self.root).unwrap_or_default()
    }

    /// Brings memory up to date with the disk after another process changed it: new and
    /// deleted knowledge bases, added and deleted documents (document by document, not a
    /// rebuild). Returns whether anything changed in memory.
    pub fn refresh(&self) -> Result<bool, KnowledgeError> {
        let _one_at_a_time = self.refreshing.lock();
        // Read before scanning: a change that lands during the scan bumps it again, so the
        // next refresh looks again.
        let generation = disk::read_generation(&self.root);
        if generation.is_some() && *self.scanned.lock() == generation {
            return Ok(false);
        }
        disk::remove_leftovers(&self.root)?;
        let mut changed = false;
        let known: Vec<(String, Arc<RwLock<Kb>>)> =
            self.kbs.read().iter().map(|(id, kb)| (id.clone(), kb.clone())).collect();
        for (id, kb) in &known {
            if !disk::absent(&self.root.join(id).join(disk::KB_FILE)) {
                changed |= self.refresh_docs(id, kb)?;
            } else {
                kb.write().deleted = true;
                self.kbs.write().remove(id);
                changed = true;
            }
        }
        for (id, _) in disk::list_dir(&self.root)? {
            if disk::is_id(&id, "kb_") && !self.kbs.read().contains_key(&id) {
                if let Some(kb) = self.load_kb(&id)? {
                    self.kbs.write().entry(id).or_insert_with(|| Arc::new(RwLock::new(kb)));
                    changed = true;
                }
            }
        }
        *self.scanned.lock() = generation;
        Ok(changed)
    }

    /// Reads a whole knowledge base from disk; `None` when it vanished or is unreadable.
    fn load_kb(&self, id: &str) -> Result<Option<Kb>, KnowledgeError> {
        let dir = self.root.join(id);
        let Some(file) = disk::read_json::<KbFile>(&dir.join(disk::KB_FILE))? else { return Ok(None) };
        if file.id != id {
            tracing::warn!(dir = %dir.display(), named = file.id, "skipping a kb.json naming another id");
            return Ok(None);
        }
        let docs_dir = dir.join(disk::DOCS_DIR);
        let mut loaded = Vec::new();
        for doc in disk::committed_docs(&docs_dir)? {
            loaded.extend(disk::read_doc(&docs_dir, id, &doc, self.dimension)?);
        }
        let mut kb = Kb { file, docs: HashMap::new(), index: Index::new(self.dimension)?, deleted: false };
        kb.add_loaded(loaded)?;
        // Until something is written to it, a loaded knowledge base needs no writer threads.
        kb.index.release_writer()?;
        Ok(Some(kb))
    }

    /// Applies the documents added and deleted on disk since memory last looked.
    fn refresh_docs(&self, id: &str, kb: &RwLock<Kb>) -> Result<bool, KnowledgeError> {
        let docs_dir = self.root.join(id).join(disk::DOCS_DIR);
        let on_disk = disk::committed_docs(&docs_dir)?;
        let (new, gone) = {
            let guard = kb.read();
            let new: Vec<&String> = on_disk.iter().filter(|d| !guard.docs.contains_key(*d)).collect();
            let on_disk: std::collections::HashSet<&str> = on_disk.iter().map(String::as_str).collect();
            let gone: Vec<String> = guard
                .docs
                .keys()
                .filter(|d| !on_disk.contains(d.as_str()) && disk::absent(&docs_dir.join(format!("{d}.json"))))
                .cloned()
                .collect();
            (new, gone)
        };
        if new.is_empty() && gone.is_empty() {
            return Ok(false);
        }
        let mut loaded = Vec::new();
        for doc in new {
            loaded.extend(disk::read_doc(&docs_dir, id, doc, self.dimension)?);
        }
        let mut guard = kb.write();
        if guard.deleted {
            return Ok(false);
        }
        let gone: Vec<&str> = gone.iter().map(String::as_str).collect();
        guard.index.remove_many(&gone)?;
        let removed = gone.iter().filter(|d| guard.docs.remove(**d).is_some()).count();
        Ok(guard.add_loaded(loaded)? || removed > 0)
    }

    /// The tenant's knowledge base `id`; another tenant's is NotFound like an absent one.
    fn kb(&self, tenant: &str, id: &str) -> Result<Arc<RwLock<Kb>>, KnowledgeError> {
        let kb = self.kbs.read().get(id).cloned();
        kb.filter(|kb| {
            let kb = kb.read();
            kb.file.tenant == tenant && !kb.deleted
        })
        .ok_or_else(|| KnowledgeError::not_found("knowledge base", id))
    }

    fn validate(&self, doc: &NewDocument, chunks: &[Chunk], vectors: &[Vec<f32>]) -> Result<(), KnowledgeError> {
        check_text("title", &doc.title, MAX_TITLE_CHARS)?;
        if doc.text.trim().is_empty() {
            return Err(KnowledgeError::invalid("text", "the document has no text"));
        }
        if chunks.is_empty() {
            return Err(KnowledgeError::invalid("text", "the document has no text"));
        }
        if chunks.len() != vectors.len() {
            return Err(KnowledgeError::invalid(
                "vectors",
                format!("{} chunks but {} vectors", chunks.len(), vectors.len()),
            ));
        }
        for (i, chunk) in chunks.iter().enumerate() {
            if doc.text.get(chunk.start..chunk.end) != Some(chunk.text.as_str()) {
                return Err(KnowledgeError::invalid(
                    "chunks",
                    format!("chunk {i} is not the text at bytes {}..{}", chunk.start, chunk.end),
                ));
            }
        }
        for (i, vector) in vectors.iter().enumerate() {
            if vector.len() != self.dimension {
                return Err(KnowledgeError::invalid(
                    "vectors",
                    format!("vector {i} has {} floats, expected {}", vector.len(), self.dimension),
                ));
            }
            if !vector.iter().all(|x| x.is_finite()) {
                return Err(KnowledgeError::invalid("vectors", format!("vector {i} has a value that is not finite")));
            }
        }
        Ok(())
    }

    /// Tells other processes something changed. The change itself is already durable, so a
    /// failure here is a warning: they catch up at the next change.
    fn changed(&self) {
        if let Err(e) = disk::bump_generation(&self.root) {
            tracing::warn!(error = %e, "could not bump the knowledge-base generation; replicas see this change late");
        }
    }
}

/// 1..=`max` characters, not blank.
fn check_text(param: &'static str, value: &str, max: usize) -> Result<(), KnowledgeError> {
    if value.trim().is_empty() {
        return Err(KnowledgeError::invalid(param, "must not be blank"));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(KnowledgeError::invalid(param, format!("is {chars} characters; the limit is {max}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
