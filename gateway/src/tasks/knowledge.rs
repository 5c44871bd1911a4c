//! Knowledge bases over HTTP (create, list, delete; add documents as JSON text or uploaded
//! files; list and delete documents; hybrid search) and `POST /v1/qa`, which answers from the
//! retrieved chunks only, with citations, and says the documents do not cover a question
//! when no chunk is relevant enough, without asking the model.

use ::knowledge::extract::Format;
use ::knowledge::store::{DocInfo, Hit, KbInfo, KnowledgeBases, NewDocument};
use ::knowledge::KnowledgeError;
use actix_multipart::Multipart;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{draft, embed, log_answer, message, TaskAnswer, TaskTimer};
use crate::engine::{GenerationRequest, Message, Prompt, Role, Sampling};
use crate::error::ApiError;
use crate::extract::{caller, read_json};
#[allow(unused_imports)]
use crate::openai::{ErrorResponse, Usage};
use crate::respond::{self, Envelope, Served};
use crate::state::AppState;

/// Largest uploaded file.
pub const MAX_UPLOAD: usize = 32 << 20;
/// Most chunks one document may have.
pub const MAX_CHUNKS: usize = 5_000;
/// Chunks the Q&A prompt shows the model by default.
pub const DEFAULT_QA_CHUNKS: usize = 4;
/// The cosine similarity (question vs chunk) a chunk needs to be used as evidence.
pub const DEFAULT_MIN_SIMILARITY: f32 = 0.35;
/// What Q&A answers when no chunk clears the threshold.
pub const NOT_IN_DOCUMENTS: &str = "The documents do not say.";
/// The Q&A instruction; training examples from feedback carry it unchanged.
pub const QA_SYSTEM: &str = "Answer the question using only the numbered documents. If they do not contain the answer, reply exactly: The documents do not say. Keep the answer short.";

impl From<KnowledgeError> for ApiError {
    fn from(e: KnowledgeError) -> Self {
        match e {
            KnowledgeError::Invalid { param, message } => ApiError::invalid(message, Some(param.to_owned())),
            KnowledgeError::NotFound { what, id } => ApiError::NotFound { message: format!("no {what} `{id}`") },
            KnowledgeError::Unreadable { .. } => ApiError::InvalidRequest {
                message: e.to_string(),
                param: Some("file".to_owned()),
                code: "unreadable_document",
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

fn store(state: &AppState) -> Result<std::sync::Arc<KnowledgeBases>, ApiError> {
    state.knowledge.get().cloned().ok_or_else(|| {
        ApiError::invalid(
            "knowledge bases need an embedding model, and this server serves none (start it with --embed-model)",
            None,
        )
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKnowledgeBase {
    pub name: String,
}

/// A knowledge base as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct KnowledgeBase {
    pub id: String,
    /// `knowledge_base`
    pub object: String,
    pub name: String,
    pub created: u64,
    pub documents: usize,
    pub chunks: usize,
}

impl From<KbInfo> for KnowledgeBase {
    fn from(k: KbInfo) -> Self {
        Self {
            id: k.id,
            object: "knowledge_base".into(),
            name: k.name,
            created: k.created,
            documents: k.documents,
            chunks: k.chunks,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KnowledgeBaseList {
    pub object: String,
    pub data: Vec<KnowledgeBase>,
}

/// A document as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Document {
    pub id: String,
    /// `document`
    pub object: String,
    pub knowledge_base: String,
    pub title: String,
    /// The uploaded file's name.
    pub source: Option<String>,
    /// `text`, `markdown`, `html`, `pdf` or `docx`.
    pub format: String,
    pub created: u64,
    pub chars: usize,
    pub chunks: usize,
    pub metadata: serde_json::Value,
}

impl From<DocInfo> for Document {
    fn from(d: DocInfo) -> Self {
        Self {
            id: d.id,
            object: "document".into(),
            knowledge_base: d.knowledge_base,
            title: d.title,
            source: d.source,
            format: d.format.as_str().to_owned(),
            created: d.created,
            chars: d.chars,
            chunks: d.chunks,
            metadata: d.metadata,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DocumentList {
    pub object: String,
    pub data: Vec<Document>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    pub object: String,
    pub deleted: bool,
}

/// A document given as JSON text.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddDocument {
    pub title: String,
    pub text: String,
    /// `text` (default), `markdown` or `html`: how to read `text`.
    pub format: Option<String>,
    /// Any JSON object, kept with the document.
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub query: String,
    /// Chunks to return, 1 to 50 (default 5).
    pub k: Option<usize>,
}

/// A retrieved chunk.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoredChunk {
    pub document_id: String,
    pub title: String,
    /// The chunk's text.
    pub chunk: String,
    pub chunk_index: usize,
    /// Byte offsets of the chunk in the document's text.
    pub start: usize,
    pub end: usize,
    pub heading: Option<String>,
    /// Reciprocal-rank fusion of the keyword (BM25) and vector ranks.
    pub score: f32,
    /// Cosine similarity of the chunk and the query.
    pub similarity: f32,
    /// BM25 score, when the keyword search returned the chunk.
    pub bm25: Option<f32>,
}

impl From<Hit> for ScoredChunk {
    fn from(h: Hit) -> Self {
        Self {
            document_id: h.document_id,
            title: h.title,
            chunk: h.text,
            chunk_index: h.chunk_index,
            start: h.start,
            end: h.end,
            heading: h.heading,
            score: h.score,
            similarity: h.similarity,
            bm25: h.bm25,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResponse {
    pub object: String,
    pub data: Vec<ScoredChunk>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QaRequest {
    /// The knowledge base's id.
    pub knowledge_base: String,
    pub question: String,
    /// The base model (default) or `<adapter>@<version|alias>`.
    pub model: Option<String>,
    /// Chunks shown to the model, 1 to 10 (default 4).
    pub k: Option<usize>,
    /// Cosine similarity a chunk needs to count as evidence, 0 to 1 (default 0.35).
    pub min_similarity: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QaResponse {
    /// What `POST /v1/feedback` takes; a correction is the right answer.
    pub id: String,
    /// `qa.answer`
    pub object: String,
    pub created: u64,
    pub model: String,
    pub answer: String,
    /// False when no chunk was relevant enough and the answer is that the documents do not say.
    pub grounded: bool,
    /// The chunks the answer was drawn from, best first.
    pub citations: Vec<ScoredChunk>,
    pub finish_reason: String,
    pub usage: Usage,
}

#[utoipa::path(
    post,
    path = "/v1/knowledge-bases",
    operation_id = "create_knowledge_base",
    tag = "knowledge",
    request_body = CreateKnowledgeBase,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = KnowledgeBase),
        (status = 400, description = "A blank or overlong name, or no embedding model served", body = ErrorResponse),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse)
    )
)]
pub(crate) async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let wire: CreateKnowledgeBase = read_json(&req, payload, state.body_limit).await?;
    let kbs = store(&state)?;
    let tenant = caller(&req).tenant;
    let info = web::block(move || kbs.create(&tenant, &wire.name)).await??;
    state.announce_knowledge().await;
    Ok(HttpResponse::Created().json(KnowledgeBase::from(info)))
}

#[utoipa::path(
    get,
    path = "/v1/knowledge-bases",
    operation_id = "list_knowledge_bases",
    tag = "knowledge",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's tenant's knowledge bases, oldest first", body = KnowledgeBaseList),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse)
    )
)]
pub(crate) async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let kbs = store(&state)?;
    let data = kbs.list(&caller(&req).tenant).into_iter().map(KnowledgeBase::from).collect();
    Ok(HttpResponse::Ok().json(KnowledgeBaseList { object: "list".into(), data }))
}

#[utoipa::path(
    get,
    path = "/v1/knowledge-bases/{id}",
    operation_id = "show_knowledge_base",
    tag = "knowledge",
    params(("id" = String, Path, description = "Knowledge base id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The knowledge base", body = KnowledgeBase),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "No such knowledge base (or another tenant's)", body = ErrorResponse)
    )
)]
pub(crate) async fn show(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let kbs = store(&state)?;
    Ok(HttpResponse::Ok().json(KnowledgeBase::from(kbs.get(&caller(&req).tenant, &path)?)))
}

#[utoipa::path(
    delete,
    path = "/v1/knowledge-bases/{id}",
    operation_id = "delete_knowledge_base",
    tag = "knowledge",
    params(("id" = String, Path, description = "Knowledge base id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Deleted with its documents", body = Deleted),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "No such knowledge base (or another tenant's)", body = ErrorResponse)
    )
)]
pub(crate) async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let kbs = store(&state)?;
    let (tenant, id) = (caller(&req).tenant, path.into_inner());
    let gone = id.clone();
    web::block(move || kbs.delete(&tenant, &gone)).await??;
    state.announce_knowledge().await;
    Ok(HttpResponse::Ok().json(Deleted { id, object: "knowledge_base.deleted".into(), deleted: true }))
}

/// A document read off the request: JSON text, or a multipart file (`file`, optional `title`
/// and `metadata` parts).
async fn read_document(state: &AppState, req: &HttpRequest, payload: web::Payload) -> Result<NewDocument, ApiError> {
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !content_type.starts_with("multipart/form-data") {
        let wire: AddDocument = read_json(req, payload, state.body_limit).await?;
        let format = match wire.format.as_deref() {
            None | Some("text") => Format::Text,
            Some("markdown") => Format::Markdown,
            Some("html") => Format::Html,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!(
                        "format `{other}` is not one of text, markdown, html (upload PDF and DOCX files as multipart)"
                    ),
                    Some("format".to_owned()),
                ))
            }
        };
        let metadata = metadata(wire.metadata)?;
        let text = if format == Format::Text {
            wire.text
        } else {
            ::knowledge::extract::extract(format, wire.text.as_bytes())?.text
        };
        return Ok(NewDocument { title: wire.title, text, source: None, format, metadata });
    }
    let mut form = Multipart::new(req.headers(), payload);
    let (mut file, mut title, mut meta) = (None, None, None);
    while let Some(field) = form.next().await {
        let mut field = field.map_err(|e| ApiError::invalid(format!("bad multipart body: {e}"), None))?;
        let (name, filename) = field
            .content_disposition()
            .map(|cd| (cd.get_name().unwrap_or_default().to_owned(), cd.get_filename().map(str::to_owned)))
            .unwrap_or_default();
        let part_type = field.content_type().map(|m| m.essence_str().to_owned());
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(format!("bad multipart body: {e}"), None))?;
            if bytes.len() + chunk.len() > MAX_UPLOAD {
                return Err(ApiError::PayloadTooLarge { limit: MAX_UPLOAD });
            }
            bytes.extend_from_slice(&chunk);
        }
        let utf8 = |b: Vec<u8>, p: &str| {
            String::from_utf8(b).map_err(|_| ApiError::invalid(format!("{p} is not UTF-8"), Some(p.to_owned())))
        };
        match name.as_str() {
            "file" => file = Some((filename, part_type, bytes)),
            "title" => title = Some(utf8(bytes, "title")?),
            "metadata" => {
                let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                    ApiError::invalid(format!("metadata is not JSON: {e}"), Some("metadata".to_owned()))
                })?;
                meta = Some(value);
            }
            other => {
                return Err(ApiError::invalid(
                    format!("unexpected part `{other}`: send `file`, and optionally `title` and `metadata`"),
                    Some(other.to_owned()),
                ))
            }
        }
    }
    let Some((filename, part_type, bytes)) = file else {
        return Err(ApiError::invalid("a multipart upload needs a `file` part", Some("file".to_owned())));
    };
    let format = Format::detect(filename.as_deref(), part_type.as_deref()).ok_or_else(|| ApiError::InvalidRequest {
        message: "unsupported file type: send .txt, .md, .html, .pdf or .docx (or set the part's content type)".into(),
        param: Some("file".to_owned()),
        code: "unsupported_file_type",
    })?;
    let extracted = web::block(move || ::knowledge::extract::extract(format, &bytes)).await??;
    let title = title
        .filter(|t| !t.trim().is_empty())
        .or(extracted.title)
        .or_else(|| filename.clone())
        .unwrap_or_else(|| "untitled".to_owned());
    Ok(NewDocument { title, text: extracted.text, source: filename, format, metadata: metadata(meta)? })
}

fn metadata(value: Option<serde_json::Value>) -> Result<serde_json::Value, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(serde_json::json!({})),
        Some(v @ serde_json::Value::Object(_)) => Ok(v),
        Some(_) => Err(ApiError::invalid("metadata must be a JSON object", Some("metadata".to_owned()))),
    }
}

#[utoipa::path(
    post,
    path = "/v1/knowledge-bases/{id}/documents",
    operation_id = "add_document",
    tag = "knowledge",
    params(("id" = String, Path, description = "Knowledge base id")),
    request_body(content((AddDocument = "application/json"), (Object = "multipart/form-data")), description = "JSON `{title, text}`, or a multipart upload with a `file` part (.txt, .md, .html, .pdf, .docx) and optional `title` and `metadata` parts"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Split into chunks, embedded and indexed", body = Document),
        (status = 400, description = "A blank title or text, an unsupported or unreadable file, bad metadata", body = ErrorResponse, example = json!({"error": {"message": "unsupported file type: send .txt, .md, .html, .pdf or .docx (or set the part's content type)", "type": "invalid_request_error", "param": "file", "code": "unsupported_file_type"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "No such knowledge base (or another tenant's)", body = ErrorResponse),
        (status = 413, description = "Body or file over the limit", body = ErrorResponse)
    )
)]
pub(crate) async fn add_document(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let timer = TaskTimer::start(&state, "knowledge");
    let result = ingest(&state, &req, path.into_inner(), payload).await;
    timer.finish(result, "ingested")
}

async fn ingest(
    state: &AppState,
    req: &HttpRequest,
    kb: String,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let kbs = store(state)?;
    let tenant = caller(req).tenant;
    // An unknown knowledge base is a 404 before the upload is read and embedded.
    kbs.get(&tenant, &kb)?;
    let doc = read_document(state, req, payload).await?;
    super::required_text(&doc.title, "title", 512)?;
    if doc.text.trim().is_empty() {
        return Err(ApiError::invalid("the document has no text", Some("text".to_owned())));
    }
    let chunks = ::knowledge::chunk::chunk(&doc.text, &::knowledge::chunk::ChunkOptions::default());
    if chunks.len() > MAX_CHUNKS {
        return Err(ApiError::invalid(
            format!("the document makes {} chunks, more than the limit of {MAX_CHUNKS}", chunks.len()),
            Some("text".to_owned()),
        ));
    }
    // The title leads each chunk's vector text, so a chunk is found by what its document is about.
    let texts = chunks.iter().map(|c| format!("{}\n{}", doc.title, c.text)).collect();
    let vectors = embed(state, texts, "text").await?;
    let info = web::block(move || kbs.add_document(&tenant, &kb, doc, chunks, vectors)).await??;
    state.announce_knowledge().await;
    Ok(HttpResponse::Created().json(Document::from(info)))
}

#[utoipa::path(
    get,
    path = "/v1/knowledge-bases/{id}/documents",
    operation_id = "list_documents",
    tag = "knowledge",
    params(("id" = String, Path, description = "Knowledge base id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The knowledge base's documents", body = DocumentList),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "No such knowledge base (or another tenant's)", body = ErrorResponse)
    )
)]
pub(crate) async fn list_documents(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let kbs = store(&state)?;
    let data = kbs.list_documents(&caller(&req).tenant, &path)?.into_iter().map(Document::from).collect();
    Ok(HttpResponse::Ok().json(DocumentList { object: "list".into(), data }))
}

#[utoipa::path(
    delete,
    path = "/v1/knowledge-bases/{id}/documents/{doc}",
    operation_id = "delete_document",
    tag = "knowledge",
    params(("id" = String, Path, description = "Knowledge base id"), ("doc" = String, Path, description = "Document id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Deleted; its chunks leave the index", body = Deleted),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "No such knowledge base or document", body = ErrorResponse)
    )
)]
pub(crate) async fn delete_document(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let kbs = store(&state)?;
    let tenant = caller(&req).tenant;
    let (kb, doc) = path.into_inner();
    let id = doc.clone();
    web::block(move || kbs.delete_document(&tenant, &kb, &doc)).await??;
    state.announce_knowledge().await;
    Ok(HttpResponse::Ok().json(Deleted { id, object: "document.deleted".into(), deleted: true }))
}

/// The hybrid search behind both `search` and `qa`.
async fn retrieve(
    state: &AppState,
    tenant: &str,
    kb: &str,
    query: &str,
    k: usize,
) -> Result<Vec<ScoredChunk>, ApiError> {
    let kbs = store(state)?;
    kbs.get(tenant, kb)?;
    let vector = embed(state, vec![query.to_owned()], "query").await?.pop().unwrap_or_default();
    let (tenant, kb, query) = (tenant.to_owned(), kb.to_owned(), query.to_owned());
    let hits = web::block(move || kbs.search(&tenant, &kb, &query, &vector, k)).await??;
    Ok(hits.into_iter().map(ScoredChunk::from).collect())
}

#[utoipa::path(
    post,
    path = "/v1/knowledge-bases/{id}/search",
    operation_id = "search_knowledge_base",
    tag = "knowledge",
    params(("id" = String, Path, description = "Knowledge base id")),
    request_body = SearchRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Chunks by fused rank, best first", body = SearchResponse),
        (status = 400, description = "A blank query or k out of range", body = ErrorResponse),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "No such knowledge base (or another tenant's)", body = ErrorResponse)
    )
)]
pub(crate) async fn search(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let timer = TaskTimer::start(&state, "search");
    let result = async {
        let wire: SearchRequest = read_json(&req, payload, state.body_limit).await?;
        super::required_text(&wire.query, "query", 4096)?;
        let k = wire.k.unwrap_or(5);
        if !(1..=50).contains(&k) {
            return Err(ApiError::invalid("k must be between 1 and 50", Some("k".to_owned())));
        }
        let data = retrieve(&state, &caller(&req).tenant, &path, &wire.query, k).await?;
        Ok(HttpResponse::Ok().json(SearchResponse { object: "list".into(), data }))
    }
    .await;
    timer.finish(result, "ok")
}

/// The Q&A prompt: the numbered chunks, then the question.
pub fn qa_prompt(citations: &[ScoredChunk], question: &str) -> Vec<Message> {
    let docs: Vec<String> =
        citations.iter().enumerate().map(|(i, c)| format!("[{}] {}\n{}", i + 1, c.title, c.chunk)).collect();
    vec![
        message(Role::System, QA_SYSTEM),
        message(Role::User, format!("Documents:\n{}\n\nQuestion: {question}", docs.join("\n\n"))),
    ]
}

#[utoipa::path(
    post,
    path = "/v1/qa",
    operation_id = "answer_question",
    tag = "tasks",
    request_body = QaRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The answer with citations; with `stream: true` server-sent events: `qa.start` (citations), `qa.delta`, `qa.done`, then `[DONE]`", content((QaResponse = "application/json"), (QaResponse = "text/event-stream"))),
        (status = 400, description = "A blank question, a value out of range, or no embedding model served", body = ErrorResponse),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "No such knowledge base, or an unknown model", body = ErrorResponse),
        (status = 429, description = "Rate or concurrency limit reached", body = ErrorResponse),
        (status = 503, description = "Model not loaded yet, or draining", body = ErrorResponse)
    )
)]
pub(crate) async fn qa(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let timer = TaskTimer::start(&state, "qa");
    let (result, outcome) = match answer(&state, &req, payload).await {
        Ok((response, grounded)) => (Ok(response), if grounded { "ok" } else { "not_in_documents" }),
        Err(e) => (Err(e), "error"),
    };
    timer.finish(result, outcome)
}

async fn answer(state: &AppState, req: &HttpRequest, payload: web::Payload) -> Result<(HttpResponse, bool), ApiError> {
    let wire: QaRequest = read_json(req, payload, state.body_limit).await?;
    let who = caller(req);
    super::required_text(&wire.question, "question", 4096)?;
    super::required_text(&wire.knowledge_base, "knowledge_base", 128)?;
    let k = wire.k.unwrap_or(DEFAULT_QA_CHUNKS);
    if !(1..=10).contains(&k) {
        return Err(ApiError::invalid("k must be between 1 and 10", Some("k".to_owned())));
    }
    let min = wire.min_similarity.unwrap_or(DEFAULT_MIN_SIMILARITY);
    if !(0.0..=1.0).contains(&min) {
        return Err(ApiError::invalid("min_similarity must be between 0 and 1", Some("min_similarity".to_owned())));
    }
    let max_tokens = wire.max_tokens.unwrap_or(256);
    if max_tokens == 0 || max_tokens > state.limits.max_tokens {
        return Err(ApiError::invalid(
            format!("max_tokens must be between 1 and {}", state.limits.max_tokens),
            Some("max_tokens".to_owned()),
        ));
    }
    if wire.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err(ApiError::invalid("temperature must be between 0 and 2", Some("temperature".to_owned())));
    }
    let model = super::model_or_base(state, wire.model)?;
    state.admit_caller(req, &who).await?;
    let hits = retrieve(state, &who.tenant, &wire.knowledge_base, &wire.question, k).await?;
    let citations: Vec<ScoredChunk> = hits.iter().filter(|h| h.similarity >= min).cloned().collect();
    let params = serde_json::json!({
        "knowledge_base": wire.knowledge_base, "k": k, "min_similarity": min, "max_tokens": max_tokens,
        "temperature": wire.temperature,
        "citations": citations.iter().map(|c| serde_json::json!({"document_id": c.document_id, "chunk_index": c.chunk_index})).collect::<Vec<_>>(),
    });
    if citations.is_empty() {
        // Nothing relevant: say so without asking the model. Logged with the prompt the
        // model would have seen, so a correction still teaches it.
        let envelope = Envelope::task("qa", model.clone());
        let messages = qa_prompt(&hits, &wire.question);
        let served = Served { model: state.model_id.clone(), adapter: String::new() };
        log_answer(
            state,
            &who,
            TaskAnswer {
                task: "qa",
                id: &envelope.id,
                created: envelope.created,
                served: &served,
                messages: &messages,
                answer: NOT_IN_DOCUMENTS,
                params,
                prompt_tokens: 0,
                completion_tokens: 0,
            },
        );
        let usage = Usage::new(0, 0);
        if wire.stream {
            let frames = [
                serde_json::json!({"id": envelope.id, "object": "qa.start", "created": envelope.created, "model": model, "citations": [], "grounded": false}),
                serde_json::json!({"id": envelope.id, "object": "qa.delta", "delta": NOT_IN_DOCUMENTS}),
                serde_json::json!({"id": envelope.id, "object": "qa.done", "finish_reason": "stop", "usage": usage}),
            ];
            let mut body: String = frames.iter().map(|f| format!("data: {f}\n\n")).collect();
            body.push_str("data: [DONE]\n\n");
            let body = futures::stream::once(async move { Ok(bytes::Bytes::from(body)) });
            return Ok((respond::sse_response(body), false));
        }
        return Ok((
            HttpResponse::Ok().json(QaResponse {
                id: envelope.id,
                object: "qa.answer".into(),
                created: envelope.created,
                model,
                answer: NOT_IN_DOCUMENTS.into(),
                grounded: false,
                citations: Vec::new(),
                finish_reason: "stop".into(),
                usage,
            }),
            false,
        ));
    }
    let messages = qa_prompt(&citations, &wire.question);
    let slot = if wire.stream { state.limiter.stream_slot(&who)? } else { None };
    let log = draft(&who, "qa", &messages, params);
    let sampling = Sampling { temperature: wire.temperature, ..Sampling::default() };
    let request = GenerationRequest {
        prompt: Prompt::Chat(messages),
        adapter: None,
        max_tokens: Some(max_tokens),
        sampling,
        tools: None,
    };
    let mut running = state.start_logged(req, &model, who, request, 1, log, slot).await?;
    let envelope = Envelope::task("qa", model.clone());
    if wire.stream {
        let first = serde_json::json!({
            "id": envelope.id, "object": "qa.start", "created": envelope.created, "model": model,
            "citations": citations, "grounded": true,
        });
        return Ok((respond::streamed_task(envelope, running, first, "qa"), true));
    }
    let done = respond::collect(&envelope, &mut running).await?;
    Ok((
        HttpResponse::Ok().json(QaResponse {
            id: envelope.id,
            object: "qa.answer".into(),
            created: envelope.created,
            model,
            answer: done.text.trim().to_owned(),
            grounded: true,
            citations,
            finish_reason: done.reason.as_str().into(),
            usage: done.usage,
        }),
        true,
    ))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/knowledge-bases", web::post().to(create))
        .route("/v1/knowledge-bases", web::get().to(list))
        .route("/v1/knowledge-bases/{id}", web::get().to(show))
        .route("/v1/knowledge-bases/{id}", web::delete().to(delete))
        .route("/v1/knowledge-bases/{id}/documents", web::post().to(add_document))
        .route("/v1/knowledge-bases/{id}/documents", web::get().to(list_documents))
        .route("/v1/knowledge-bases/{id}/documents/{doc}", web::delete().to(delete_document))
        .route("/v1/knowledge-bases/{id}/search", web::post().to(search))
        .route("/v1/qa", web::post().to(qa));
}
