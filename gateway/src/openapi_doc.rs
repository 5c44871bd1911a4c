//! The OpenAPI document, generated from the handlers' annotations and the wire types. The
//! committed copy is `openapi/openapi.json`; `switchyard openapi` prints it and a test fails
//! when the two differ.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatMessage, ChunkDelta, CompletionChoice, CompletionRequest, CompletionResponse, ContentPart, Embedding,
    EmbeddingInput, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, EmbeddingVector, EncodingFormat, ErrorDetail,
    ErrorResponse, FunctionCall, FunctionCallDelta, MessageContent, ModelCard, ModelKind, ModelList,
    PromptTokensDetails, SamplingFields, StopParam, StreamOptions, TokenizeRequest, TokenizeResponse, ToolCall,
    ToolCallDelta, Usage,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchyard",
        description = "OpenAI-compatible gateway for local models and hot-swappable LoRA adapters.",
        license(name = "Apache-2.0")
    ),
    paths(
        crate::routes::chat_completions,
        crate::routes::completions,
        crate::responses::create,
        crate::responses::get,
        crate::routes::embeddings,
        crate::routes::list_models,
        crate::routes::tokenize,
        crate::routes::health,
        crate::routes::ready,
        crate::routes::metrics,
        crate::admin::create_version,
        crate::admin::list,
        crate::admin::show,
        crate::admin::show_version,
        crate::admin::promote,
        crate::admin::rollback,
        crate::admin::delete_version,
        crate::admin::audit,
        crate::admin::export,
        crate::releases::start,
        crate::releases::list,
        crate::releases::pause,
        crate::shadow::set,
        crate::shadow::remove,
        crate::shadow::show,
        crate::feedback_api::create,
        crate::feedback_api::list,
        crate::feedback_api::review,
        crate::labelling::list,
        crate::labelling::put,
        crate::labelling::next,
        crate::labelling::label,
        crate::labelling::stats,
        crate::console::sign_in,
        crate::console::show,
        crate::console::sign_out,
        crate::console::metrics,
        crate::finetune_api::upload,
        crate::finetune_api::params,
        crate::finetune_api::datasets,
        crate::finetune_api::dataset,
        crate::finetune_api::create,
        crate::finetune_api::list,
        crate::finetune_api::show,
        crate::finetune_api::events,
        crate::finetune_api::cancel,
        crate::tasks::classify::classify,
        crate::tasks::generate::generate,
        crate::tasks::templates::create,
        crate::tasks::templates::list,
        crate::tasks::templates::show,
        crate::tasks::templates::set_alias,
        crate::tasks::knowledge::create,
        crate::tasks::knowledge::list,
        crate::tasks::knowledge::show,
        crate::tasks::knowledge::delete,
        crate::tasks::knowledge::add_document,
        crate::tasks::knowledge::list_documents,
        crate::tasks::knowledge::delete_document,
        crate::tasks::knowledge::search,
        crate::tasks::knowledge::qa,
        crate::tasks::recommend::upsert_item,
        crate::tasks::recommend::record_event,
        crate::tasks::recommend::recommend,
    ),
    components(schemas(
        ChatCompletionRequest, CompletionRequest, SamplingFields, StopParam, MessageContent, ContentPart, ChatMessage,
        StreamOptions, ChatCompletionResponse, ChatChoice, AssistantMessage, Usage, PromptTokensDetails, ChatCompletionChunk,
        ChatChunkChoice, ChunkDelta, ToolCall, FunctionCall, ToolCallDelta, FunctionCallDelta,
        crate::responses::ResponsesRequest, CompletionResponse, CompletionChoice, ModelList, ModelCard, ModelKind, TokenizeRequest,
        TokenizeResponse, ErrorResponse, ErrorDetail, crate::admin::ImportRequest, protocol::api::SetAlias,
        protocol::api::SetShadow, crate::releases::StartRelease, crate::admin::ExportRequest,
        crate::feedback_api::FeedbackRequest, protocol::FeedbackRecord, protocol::Thumbs,
        crate::feedback_api::FeedbackList, protocol::Reviewed, protocol::ReviewStatus,
        crate::feedback_api::ReviewRequest, crate::feedback_api::ReviewAction, crate::feedback_api::FeedbackItem,
        protocol::CompletionText, crate::feedback::FeedbackFilter,
        crate::labelling::QueueSpec, crate::labelling::QueueView, crate::labelling::QueueList, crate::labelling::Stage,
        crate::labelling::LabelAction, crate::labelling::QueueItem, crate::labelling::FirstLabel,
        crate::labelling::LabellerStats, crate::labelling::QueueStats, crate::labelling::NextRequest,
        crate::labelling::QueueItems, crate::labelling::LabelRequest, crate::labelling::LabelOutcome,
        crate::console::SignIn, crate::console::SessionInfo,
        crate::finetune_api::CreateJobRequest, crate::finetune_api::ParamList, protocol::params::ParamSpec, crate::finetune_api::DatasetRequest,
        EmbeddingRequest, EmbeddingInput, EncodingFormat, EmbeddingResponse, Embedding, EmbeddingVector, EmbeddingUsage,
        crate::tasks::classify::ClassifyRequest, crate::tasks::classify::Input, crate::tasks::classify::Label,
        crate::tasks::classify::DescribedLabel, crate::tasks::classify::LabelScore, crate::tasks::classify::Classification,
        crate::tasks::classify::ClassifyUsage, crate::tasks::classify::ClassifyResponse,
        crate::tasks::generate::GenerateRequest, crate::tasks::generate::GenerateResponse, crate::tasks::generate::TemplateRef,
        crate::tasks::templates::CreateTemplate, crate::tasks::templates::VariableSpec, crate::tasks::templates::Variable,
        crate::tasks::templates::VarType, crate::tasks::templates::SamplingDefaults, crate::tasks::templates::TemplateVersion,
        crate::tasks::templates::TemplateListing, crate::tasks::templates::TemplateList,
        crate::tasks::templates::SetTemplateAlias,
        crate::tasks::knowledge::CreateKnowledgeBase, crate::tasks::knowledge::KnowledgeBase,
        crate::tasks::knowledge::KnowledgeBaseList, crate::tasks::knowledge::Document, crate::tasks::knowledge::DocumentList,
        crate::tasks::knowledge::Deleted, crate::tasks::knowledge::AddDocument, crate::tasks::knowledge::SearchRequest,
        crate::tasks::knowledge::ScoredChunk, crate::tasks::knowledge::SearchResponse, crate::tasks::knowledge::QaRequest,
        crate::tasks::knowledge::QaResponse,
        crate::tasks::recommend::ItemRequest, crate::tasks::recommend::ItemResponse, crate::tasks::recommend::EventRequest,
        crate::tasks::recommend::EventResponse, crate::tasks::recommend::RecommendRequest,
        crate::tasks::recommend::RecommendedItem, crate::tasks::recommend::RecommendResponse,
    )),
    modifiers(&Bearer),
    tags(
        (name = "openai", description = "OpenAI-compatible endpoints"),
        (name = "admin", description = "Adapter registry and feedback review (admin role)"),
        (name = "feedback", description = "What users say about answers, for training"),
        (name = "labelling", description = "Labelling queues: assignment, double labelling, review, agreement (labeller or admin role)"),
        (name = "console", description = "The web console's sign-in (session cookie and CSRF token)"),
        (name = "operations", description = "Health, readiness and metrics (no token)"),
        (name = "tasks", description = "Application endpoints: classification, templated generation, Q&A, recommendation"),
        (name = "templates", description = "Prompt templates for /v1/generate (admin role)"),
        (name = "knowledge", description = "Knowledge bases: documents, chunks, hybrid search"),
        (name = "recommend", description = "Recommendation items and behaviour events"),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT or API key").build(),
            ),
        );
    }
}

/// The spec as committed: pretty JSON with a trailing newline.
pub fn spec_json() -> String {
    let mut s = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_spec_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == super::spec_json(),
            "openapi/openapi.json is out of date: run `cargo run --release -p gateway -- openapi > openapi/openapi.json`"
        );
    }

    /// OpenAPI requires operation ids to be unique; handlers in different modules may share a
    /// function name (`scripts/test.sh` also runs a full external validator).
    #[test]
    fn operation_ids_are_unique() {
        let spec: serde_json::Value = serde_json::from_str(&super::spec_json()).unwrap();
        let mut seen = std::collections::HashSet::new();
        for (path, item) in spec["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap_or_default().to_owned();
                assert!(seen.insert(id.clone()), "{method} {path}: operationId `{id}` is used twice");
            }
        }
    }
}
