//! One knowledge base's in-memory hybrid index: tantivy BM25 over chunk texts plus a dense
//! matrix of chunk vectors, fused by reciprocal rank.
//!
//! # The search rule
//!
//! With `m = max(50, 4k)` (at most the number of chunks): the keyword candidates are tantivy's
//! BM25 top `m` for the query, parsed leniently (default tokenizer, terms OR-ed, so stray
//! punctuation or operators in user text never fail); the vector candidates are the top `m`
//! chunks by dot product with the query vector, over every row by brute force (vectors are
//! L2-normalised, so the dot product is the cosine). Each candidate's fused score is
//! `Σ 1/(60 + rank)` over the lists it appears in (rank from 1). The top `k` by fused score are
//! returned, ties broken by higher similarity, then by insertion order. Every hit carries its
//! cosine similarity, and its BM25 score when the keyword list returned it.
//!
//! Nothing here is durable: [`crate::store`] rebuilds the index from disk at start-up. Each
//! change is one tantivy commit. After its first change an index keeps its tantivy writer (one
//! indexing, one merging and one bookkeeping thread) for the next, because making a writer
//! costs more than a small commit; a batch of 20,000 chunks or more gets a writer of up to four
//! indexing threads of its own, ended when the batch is committed.

use std::collections::HashMap;
use std::sync::Arc;

use tantivy::collector::TopDocs;
use tantivy::columnar::Column;
use tantivy::indexer::IndexWriterOptions;
use tantivy::query::QueryParser;
use tantivy::schema::{Field, NumericOptions, Schema, TEXT};
use tantivy::store::Compressor;
use tantivy::{IndexReader, IndexSettings, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use crate::chunk::Chunk;
use crate::KnowledgeError;

/// The constant of reciprocal-rank fusion (the usual 60 of Cormack et al.).
const RRF_K: f32 = 60.0;
/// The fewest candidates each list contributes to the fusion.
const MIN_CANDIDATES: usize = 50;
/// Indexing memory per tantivy writer thread (tantivy's floor is 15 MB).
const WRITER_BUDGET_PER_THREAD: usize = 64 << 20;
/// A batch this large gets more than one indexing thread.
const PARALLEL_BATCH: usize = 20_000;

/// One scored chunk from [`Index::search`].
#[derive(Debug, Clone, PartialEq)]
pub struct IndexHit {
    pub document_id: String,
    /// The index of the chunk within its document.
    pub chunk: usize,
    /// The fused reciprocal-rank score.
    pub score: f32,
    /// Cosine similarity with the query vector, always computed.
    pub similarity: f32,
    /// `None` when the keyword search did not return this chunk.
    pub bm25: Option<f32>,
}

/// A knowledge base's hybrid index. Not synchronised: the owner wraps it in a lock.
pub struct Index {
    dimension: usize,
    tantivy: tantivy::Index,
    reader: IndexReader,
    parser: QueryParser,
    text: Field,
    key_field: Field,
    doc_key_field: Field,
    /// Row-major, `rows.len() × dimension`.
    vectors: Vec<f32>,
    rows: Vec<Row>,
    row_of_key: HashMap<u64, usize>,
    documents: HashMap<Arc<str>, Document>,
    next_key: u64,
    /// Kept between changes once a change was made (one worker, one merge and one updater
    /// thread); see [`Index::release_writer`].
    writer: Option<IndexWriter>,
}

/// What a row of the matrix (and a tantivy document) is.
struct Row {
    document: Arc<str>,
    chunk: usize,
    /// The chunk's key in tantivy's `key` fast field; also the insertion order.
    key: u64,
}

struct Document {
    /// The value of the `doc_key` field on every chunk of the document, to delete them at once.
    key: u64,
    chunk_keys: Vec<u64>,
}

/// A document ready to go into the index: texts and their vectors, row-major.
pub(crate) struct Batch<'a> {
    pub document_id: &'a str,
    pub texts: Vec<&'a str>,
    pub vectors: &'a [f32],
}

impl Index {
    pub fn new(dimension: usize) -> Result<Self, KnowledgeError> {
        if dimension == 0 {
            return Err(KnowledgeError::invalid("dimension", "the vector dimension must be at least 1"));
        }
        let mut schema = Schema::builder();
        let text = schema.add_text_field("text", TEXT);
        let key_field = schema.add_u64_field("key", NumericOptions::default().set_fast());
        let doc_key_field = schema.add_u64_field("doc_key", NumericOptions::default().set_indexed());
        let settings = IndexSettings {
            docstore_compression: Compressor::None,
            docstore_compress_dedicated_thread: false,
            ..IndexSettings::default()
        };
        let tantivy = tantivy::Index::builder().schema(schema.build()).settings(settings).create_in_ram()?;
        let reader = tantivy.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        let parser = QueryParser::for_index(&tantivy, vec![text]);
        Ok(Self {
            dimension,
            tantivy,
            reader,
            parser,
            text,
            key_field,
            doc_key_field,
            vectors: Vec::new(),
            rows: Vec::new(),
            row_of_key: HashMap::new(),
            documents: HashMap::new(),
            next_key: 0,
            writer: None,
        })
    }

    /// Indexes a document's chunks with their vectors (one tantivy commit).
    pub fn add(&mut self, document_id: &str, chunks: &[Chunk], vectors: &[Vec<f32>]) -> Result<(), KnowledgeError> {
        if chunks.len() != vectors.len() {
            return Err(KnowledgeError::invalid(
                "vectors",
                format!("{} chunks but {} vectors", chunks.len(), vectors.len()),
            ));
        }
        let mut flat = Vec::with_capacity(vectors.len() * self.dimension);
        for (i, vector) in vectors.iter().enumerate() {
            self.check_vector("vectors", vector).map_err(|e| match e {
                KnowledgeError::Invalid { param, message } => {
                    KnowledgeError::Invalid { param, message: format!("vector {i}: {message}") }
                }
                other => other,
            })?;
            flat.extend_from_slice(vector);
        }
        let texts = chunks.iter().map(|c| c.text.as_str()).collect();
        self.add_batches(&[Batch { document_id, texts, vectors: &flat }])
    }

    /// Indexes several documents in one commit; the store's loading path. Vectors must already
    /// be valid; a document already present is an error and nothing is added.
    pub(crate) fn add_batches(&mut self, batches: &[Batch<'_>]) -> Result<(), KnowledgeError> {
        let mut total = 0;
        for batch in batches {
            if batch.vectors.len() != batch.texts.len() * self.dimension {
                return Err(KnowledgeError::invalid("vectors", "the vectors do not match the chunks"));
            }
            if self.documents.contains_key(batch.document_id)
                || batches.iter().filter(|b| b.document_id == batch.document_id).count() > 1
            {
                return Err(KnowledgeError::invalid(
                    "document",
                    format!("document {:?} is already indexed", batch.document_id),
                ));
            }
            total += batch.texts.len();
        }
        if total == 0 {
            return Ok(());
        }
        let mut writer = self.take_writer(total)?;
        let first_key = self.next_key;
        let mut key = first_key;
        for (n, batch) in batches.iter().enumerate() {
            let doc_key = first_key + (total + n) as u64;
            for text in &batch.texts {
                let mut doc = TantivyDocument::new();
                doc.add_text(self.text, text);
                doc.add_u64(self.key_field, key);
                doc.add_u64(self.doc_key_field, doc_key);
                writer.add_document(doc)?;
                key += 1;
            }
        }
        writer.commit()?;
        self.finish(writer, total)?;

        // The keyword index has them; now the rows, in the same key order.
        let mut key = first_key;
        self.vectors.reserve(total * self.dimension);
        for (n, batch) in batches.iter().enumerate() {
            let document: Arc<str> = Arc::from(batch.document_id);
            let mut chunk_keys = Vec::with_capacity(batch.texts.len());
            for chunk in 0..batch.texts.len() {
                self.row_of_key.insert(key, self.rows.len());
                self.rows.push(Row { document: document.clone(), chunk, key });
                chunk_keys.push(key);
                key += 1;
            }
            self.vectors.extend_from_slice(batch.vectors);
            self.documents.insert(document, Document { key: first_key + (total + n) as u64, chunk_keys });
        }
        self.next_key = first_key + (total + batches.len()) as u64;
        Ok(())
    }

    /// Drops a document's chunks; an absent document is a no-op.
    pub fn remove(&mut self, document_id: &str) -> Result<(), KnowledgeError> {
        self.remove_many(&[document_id])
    }

    /// Drops several documents in one commit.
    pub(crate) fn remove_many(&mut self, document_ids: &[&str]) -> Result<(), KnowledgeError> {
        let present: Vec<&str> = document_ids.iter().copied().filter(|id| self.documents.contains_key(*id)).collect();
        if present.is_empty() {
            return Ok(());
        }
        let mut writer = self.take_writer(0)?;
        for id in &present {
            if let Some(doc) = self.documents.get(*id) {
                writer.delete_term(Term::from_field_u64(self.doc_key_field, doc.key));
            }
        }
        writer.commit()?;
        self.finish(writer, 0)?;
        for id in present {
            let Some(doc) = self.documents.remove(id) else { continue };
            for key in doc.chunk_keys {
                if let Some(row) = self.row_of_key.remove(&key) {
                    self.swap_remove_row(row);
                }
            }
        }
        Ok(())
    }

    /// The number of chunks indexed.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn dimension(&self) -> usize {
        self.dimension
    }

    pub fn contains(&self, document_id: &str) -> bool {
        self.documents.contains_key(document_id)
    }

    /// The `k` best chunks for a query by the rule in the module documentation.
    pub fn search(&self, query: &str, query_vector: &[f32], k: usize) -> Result<Vec<IndexHit>, KnowledgeError> {
        self.check_vector("query_vector", query_vector)?;
        if k == 0 || self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let m = MIN_CANDIDATES.max(k.saturating_mul(4)).min(self.rows.len());
        let similarities = self.similarities(query_vector);

        // Fused score and BM25 per candidate row.
        let mut fused: HashMap<usize, (f32, Option<f32>)> = HashMap::with_capacity(2 * m);
        for (rank, row) in top_rows(&similarities, m).into_iter().enumerate() {
            fused.entry(row).or_default().0 += 1.0 / (RRF_K + (rank + 1) as f32);
        }
        for (rank, (row, bm25)) in self.keyword_rows(query, m)?.into_iter().enumerate() {
            let entry = fused.entry(row).or_default();
            entry.0 += 1.0 / (RRF_K + (rank + 1) as f32);
            entry.1 = Some(bm25);
        }
        let mut ranked: Vec<(usize, f32, Option<f32>)> = fused.into_iter().map(|(row, (s, b))| (row, s, b)).collect();
        ranked.sort_unstable_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then(similarities[b.0].total_cmp(&similarities[a.0]))
                .then(self.rows[a.0].key.cmp(&self.rows[b.0].key))
        });
        ranked.truncate(k);
        Ok(ranked
            .into_iter()
            .map(|(row, score, bm25)| IndexHit {
                document_id: self.rows[row].document.to_string(),
                chunk: self.rows[row].chunk,
                score,
                similarity: similarities[row],
                bm25,
            })
            .collect())
    }

    fn check_vector(&self, param: &'static str, vector: &[f32]) -> Result<(), KnowledgeError> {
        if vector.len() != self.dimension {
            return Err(KnowledgeError::invalid(
                param,
                format!("expected {} floats, got {}", self.dimension, vector.len()),
            ));
        }
        if !vector.iter().all(|x| x.is_finite()) {
            return Err(KnowledgeError::invalid(param, "every value must be a finite number"));
        }
        Ok(())
    }

    /// Dot product of the query with every row.
    fn similarities(&self, query: &[f32]) -> Vec<f32> {
        self.vectors.chunks_exact(self.dimension).map(|row| dot(row, query)).collect()
    }

    /// Rows of the BM25 top `m`, best first, with their scores.
    fn keyword_rows(&self, query: &str, m: usize) -> Result<Vec<(usize, f32)>, KnowledgeError> {
        let (query, _errors) = self.parser.parse_query_lenient(query);
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(m).order_by_score())?;
        let mut columns: HashMap<u32, Column<u64>> = HashMap::new();
        let mut rows = Vec::with_capacity(top.len());
        for (score, address) in top {
            let column = match columns.get(&address.segment_ord) {
                Some(column) => column,
                None => {
                    let column = searcher.segment_reader(address.segment_ord).fast_fields().u64("key")?;
                    columns.entry(address.segment_ord).or_insert(column)
                }
            };
            if let Some(row) = column.first(address.doc_id).and_then(|key| self.row_of_key.get(&key)) {
                rows.push((*row, score));
            }
        }
        Ok(rows)
    }

    /// The writer for one change: the kept single-threaded one, or for a big batch a
    /// many-threaded one made for it (after dropping the kept one: tantivy allows one writer
    /// per index). A change that fails drops its writer, which discards what it had added.
    fn take_writer(&mut self, chunks: usize) -> Result<IndexWriter, KnowledgeError> {
        if chunks < PARALLEL_BATCH {
            if let Some(writer) = self.writer.take() {
                return Ok(writer);
            }
        }
        self.writer = None;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = if chunks >= PARALLEL_BATCH { cores.clamp(1, 4) } else { 1 };
        let options = IndexWriterOptions::builder()
            .num_worker_threads(threads)
            .memory_budget_per_thread(WRITER_BUDGET_PER_THREAD)
            .num_merge_threads(1)
            .build();
        Ok(self.tantivy.writer_with_options(options)?)
    }

    /// After a commit: keeps a small change's writer for the next one (making a writer costs
    /// more than the commit), lets a big batch's writer finish its merges and end its threads,
    /// and shows the change to searches.
    fn finish(&mut self, writer: IndexWriter, chunks: usize) -> Result<(), KnowledgeError> {
        if chunks < PARALLEL_BATCH {
            self.writer = Some(writer);
        } else {
            writer.wait_merging_threads()?;
        }
        self.reader.reload()?;
        Ok(())
    }

    /// Ends the kept writer and its threads (after letting its merges finish); the next change
    /// makes a new one. For an index that is now only searched.
    pub(crate) fn release_writer(&mut self) -> Result<(), KnowledgeError> {
        if let Some(writer) = self.writer.take() {
            writer.wait_merging_threads()?;
            self.reader.reload()?;
        }
        Ok(())
    }

    /// Removes a row by moving the last row into its place.
    fn swap_remove_row(&mut self, row: usize) {
        let last = self.rows.len() - 1;
        if row != last {
            let d = self.dimension;
            self.vectors.copy_within(last * d..(last + 1) * d, row * d);
            self.row_of_key.insert(self.rows[last].key, row);
        }
        self.rows.swap_remove(row);
        self.vectors.truncate(self.rows.len() * self.dimension);
    }
}

/// The `m` rows with the highest similarity, best first (ties by row).
fn top_rows(similarities: &[f32], m: usize) -> Vec<usize> {
    let by_similarity = |a: &usize, b: &usize| similarities[*b].total_cmp(&similarities[*a]).then(a.cmp(b));
    let mut rows: Vec<usize> = (0..similarities.len()).collect();
    if m < rows.len() {
        rows.select_nth_unstable_by(m, by_similarity);
        rows.truncate(m);
    }
    rows.sort_unstable_by(by_similarity);
    rows
}

/// Eight independent accumulators so the compiler can keep a SIMD register per lane group.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; 8];
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    const D: usize = 8;

    fn basis(i: usize) -> Vec<f32> {
        let mut v = vec![0.0; D];
        v[i % D] = 1.0;
        v
    }

    fn chunks(texts: &[&str]) -> Vec<Chunk> {
        let mut at = 0;
        texts
            .iter()
            .map(|t| {
                at += t.len() + 1;
                Chunk { text: (*t).to_owned(), start: at - t.len() - 1, end: at - 1, heading: None }
            })
            .collect()
    }

    fn ids(hits: &[IndexHit]) -> Vec<(&str, usize)> {
        hits.iter().map(|h| (h.document_id.as_str(), h.chunk)).collect()
    }

    /// Three chunks: one only the keywords find, one only the vector finds, one neither.
    fn three() -> Index {
        let mut index = Index::new(D).unwrap();
        let texts = ["the quick brown fox jumps", "lorem ipsum dolor sit amet", "nothing to see here"];
        index.add("a", &chunks(&texts), &[basis(0), basis(1), basis(2)]).unwrap();
        index
    }

    #[test]
    fn a_keyword_only_match_and_a_vector_only_match_both_surface() {
        let mut index = three();
        // Filler close to neither, so the keyword match is not among the vector candidates.
        let filler: Vec<String> = (0..60).map(|i| format!("filler text number {i}")).collect();
        let filler: Vec<&str> = filler.iter().map(String::as_str).collect();
        let vectors = vec![vec![0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0]; 60];
        index.add("filler", &chunks(&filler), &vectors).unwrap();
        let hits = index.search("fox", &basis(1), 2).unwrap();
        let keyword = hits.iter().find(|h| (h.document_id.as_str(), h.chunk) == ("a", 0)).unwrap();
        let vector = hits.iter().find(|h| (h.document_id.as_str(), h.chunk) == ("a", 1)).unwrap();
        assert_eq!((keyword.score, keyword.similarity), (1.0 / 61.0, 0.0));
        assert!(keyword.bm25.is_some_and(|s| s > 0.0));
        assert_eq!((vector.score, vector.similarity, vector.bm25), (1.0 / 61.0, 1.0, None));
        // Equal fused scores: the more similar one leads, and both lead the filler.
        assert_eq!(ids(&hits[..2]), [("a", 1), ("a", 0)]);
    }

    #[test]
    fn fusion_prefers_a_chunk_both_lists_rank_well() {
        let mut index = Index::new(D).unwrap();
        let texts = ["apple apple apple", "apple banana", "cherry", "durian"];
        let q = [0.6, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let away = vec![-0.6, -0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let vectors = vec![away, vec![0.0, 0.8, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0], basis(1), basis(4)];
        index.add("d", &chunks(&texts), &vectors).unwrap();
        let hits = index.search("apple", &q, 4).unwrap();
        // Chunk 1 is 2nd by BM25 and 2nd by vector: 2/62 beats chunk 2 (1st by vector only)
        // and chunk 0 (1st by BM25, 4th and last by vector).
        assert_eq!(ids(&hits)[0], ("d", 1));
        assert!((hits[0].score - 2.0 / 62.0).abs() < 1e-6, "{hits:?}");
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        let first_bm25 = hits.iter().find(|h| h.chunk == 0).unwrap();
        assert!((first_bm25.score - (1.0 / 61.0 + 1.0 / 64.0)).abs() < 1e-6, "{hits:?}");
    }

    #[test]
    fn punctuation_and_operators_in_queries_never_fail() {
        let index = three();
        for query in ["", "?", "\"unclosed", "AND(", "fox AND(", "title:fox", "-", "***", "a:b:c", "fox^"] {
            let hits = index.search(query, &basis(2), 3).unwrap();
            assert_eq!(hits.len(), 3, "{query:?}");
            if !query.contains("fox") {
                assert_eq!(hits[0].chunk, 2, "the vector leads for {query:?}");
            }
        }
    }

    #[test]
    fn remove_drops_a_document_and_keeps_the_others_rows_right() {
        let mut index = Index::new(D).unwrap();
        index.add("a", &chunks(&["alpha one", "alpha two"]), &[basis(0), basis(1)]).unwrap();
        index.add("b", &chunks(&["beta one"]), &[basis(2)]).unwrap();
        index.add("c", &chunks(&["gamma one", "gamma two"]), &[basis(3), basis(4)]).unwrap();
        assert_eq!(index.len(), 5);
        index.remove("a").unwrap();
        index.remove("missing").unwrap();
        assert_eq!(index.len(), 3);
        assert!(!index.contains("a"));
        assert!(index.search("alpha", &basis(0), 10).unwrap().iter().all(|h| h.document_id != "a"));
        // The rows moved into the removed ones' places still carry their own vectors.
        for (doc, chunk, v) in [("b", 0, 2), ("c", 0, 3), ("c", 1, 4)] {
            let hits = index.search("", &basis(v), 1).unwrap();
            assert_eq!((ids(&hits)[0], hits[0].similarity), ((doc, chunk), 1.0));
        }
        let hits = index.search("gamma", &basis(7), 10).unwrap();
        assert_eq!(hits.iter().filter(|h| h.bm25.is_some()).count(), 2);
        index.remove("c").unwrap();
        index.remove("b").unwrap();
        assert!(index.is_empty());
        assert!(index.search("gamma", &basis(0), 3).unwrap().is_empty());
    }

    #[test]
    fn wrong_dimensions_and_bad_values_are_invalid() {
        let mut index = three();
        let invalid = |r: Result<_, KnowledgeError>| matches!(r, Err(KnowledgeError::Invalid { .. }));
        assert!(invalid(index.add("x", &chunks(&["x"]), &[vec![1.0; D + 1]]).map(|_| ())));
        assert!(invalid(index.add("x", &chunks(&["x"]), &[vec![f32::NAN; D]]).map(|_| ())));
        assert!(invalid(index.add("x", &chunks(&["x", "y"]), &[basis(0)]).map(|_| ())));
        assert!(invalid(index.add("a", &chunks(&["again"]), &[basis(0)]).map(|_| ())));
        assert!(invalid(index.search("fox", &[1.0; D - 1], 3).map(|_| ())));
        assert!(invalid(index.search("fox", &[f32::INFINITY; D], 3).map(|_| ())));
        assert!(invalid(Index::new(0).map(|_| ())));
        assert_eq!(index.len(), 3, "nothing was added");
        assert!(index.search("fox", &basis(0), 0).unwrap().is_empty());
    }

    #[test]
    fn vector_candidates_are_the_true_nearest_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut index = Index::new(16).unwrap();
        let mut all = Vec::new();
        for d in 0..20 {
            let vectors: Vec<Vec<f32>> = (0..50)
                .map(|_| {
                    let v: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    v.into_iter().map(|x| x / norm).collect()
                })
                .collect();
            let texts: Vec<String> = (0..50).map(|c| format!("doc {d} chunk {c}")).collect();
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            index.add(&format!("d{d}"), &chunks(&texts), &vectors).unwrap();
            all.extend(vectors.into_iter().enumerate().map(|(c, v)| (format!("d{d}"), c, v)));
        }
        let (doc, chunk, query) = &all[777];
        let hits = index.search("", query, 5).unwrap();
        assert_eq!((hits[0].document_id.as_str(), hits[0].chunk), (doc.as_str(), *chunk));
        assert!((hits[0].similarity - 1.0).abs() < 1e-5);
        let mut best: Vec<f32> = all.iter().map(|(_, _, v)| dot(v, query)).collect();
        best.sort_by(|a, b| b.total_cmp(a));
        let got: Vec<f32> = hits.iter().map(|h| h.similarity).collect();
        assert_eq!(got, best[..5]);
    }
}
