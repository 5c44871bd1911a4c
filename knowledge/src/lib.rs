//! Knowledge bases for document Q&A: uploaded documents become text, the text becomes
//! overlapping chunks, the chunks are stored durably with their embeddings, and a query finds
//! the best chunks by hybrid search (BM25 keyword scores fused with vector similarity by
//! reciprocal rank).
//!
//! It owns:
//! - [`extract`]: file bytes ([`Format`]: text, Markdown, HTML, PDF, DOCX) to [`Extracted`]
//!   text and title, never panicking on hostile input;
//! - [`chunk`]: text to [`Chunk`]s that respect headings and sentences ([`ChunkOptions`]);
//! - [`index`]: one knowledge base's in-memory [`Index`] (tantivy in RAM plus a vector matrix)
//!   and the fusion rule;
//! - [`store`]: [`KnowledgeBases`], every knowledge base durable under one directory, shared
//!   by several gateway processes ([`KnowledgeBases::refresh`]), with [`KbInfo`], [`DocInfo`],
//!   [`NewDocument`] and [`Hit`];
//! - [`KnowledgeError`], the one error type, with stable [`KnowledgeError::code`]s.
//!
//! It must never speak HTTP or compute embeddings: the gateway embeds chunk texts and queries
//! (all-MiniLM-L6-v2, 384 floats, L2-normalised) and hands the vectors in. It must never let a
//! tenant see, or tell apart from absent, another tenant's knowledge base.

pub mod chunk;
mod error;
pub mod extract;
pub mod index;
pub mod store;

pub use chunk::{Chunk, ChunkOptions};
pub use error::KnowledgeError;
pub use extract::{Extracted, Format};
pub use index::{Index, IndexHit};
pub use store::{DocInfo, Hit, KbInfo, KnowledgeBases, NewDocument};
