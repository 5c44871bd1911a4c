//! `POST /v1/classify`: each label's probability from the model's own log-probabilities of
//! that label as the whole answer (end of turn included) after a fixed instruction prompt,
//! all labels scored in one pass over the shared prompt, softmax over the labels.
//!
//! Long inputs keep their beginning: a text over `max_input_tokens` (default 512) is cut at
//! a character boundary until it fits, and the response says `truncated` with the input's
//! original token count.

use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{log_answer, message, model_or_base, TaskAnswer, TaskTimer};
use crate::auth::Principal;
use crate::engine::{Message, Prompt, Role};
use crate::error::ApiError;
use crate::extract::{caller, read_json};
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::respond::Served;
use crate::state::AppState;

/// Most inputs in one request.
pub const MAX_INPUTS: usize = 32;
/// Most labels in one request.
pub const MAX_LABELS: usize = 50;
/// The default cap on an input's tokens.
pub const DEFAULT_MAX_INPUT_TOKENS: usize = 512;
const MAX_LABEL_CHARS: usize = 100;
const MAX_DESCRIPTION_CHARS: usize = 500;
/// Inputs of one request scored at once (each holds a concurrency slot).
const PARALLEL_INPUTS: usize = 4;

/// The multi-label instruction: one yes/no question per label.
pub const SYSTEM_MULTI: &str = "You are a text classifier. Reply with yes or no, and nothing else.";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// One text, or a list of up to 32 (then the answer has one result list per text, under `data`).
    pub input: Input,
    /// The labels: names, or objects with a description the prompt shows the model.
    pub labels: Vec<Label>,
    /// The base model (default) or `<adapter>@<version|alias>`, such as a classification adapter trained from feedback.
    pub model: Option<String>,
    /// Score each label on its own (yes/no); probabilities then do not sum to 1.
    #[serde(default)]
    pub multi_label: bool,
    /// Tokens of an input kept (its beginning); 16 to 4096, default 512.
    pub max_input_tokens: Option<usize>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Label {
    Name(String),
    Described(DescribedLabel),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DescribedLabel {
    pub name: String,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LabelScore {
    pub label: String,
    /// Softmax over the labels' scores (multi-label: P(yes) for this label alone).
    pub probability: f64,
    /// The summed log-probability of the label's tokens as the answer.
    pub logprob: f64,
}

/// The classification of one input.
#[derive(Debug, Serialize, ToSchema)]
pub struct Classification {
    /// What `POST /v1/feedback` takes; a correction is the right label.
    pub id: String,
    pub index: usize,
    /// Labels, most probable first.
    pub results: Vec<LabelScore>,
    /// Whether the input was cut to `max_input_tokens`.
    pub truncated: bool,
    /// The input's tokens before any cut.
    pub input_tokens: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// One text in: `id` and `results` at the top. A list in: `object: "list"` and `data`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifyResponse {
    pub id: String,
    /// `classification` or `list`.
    pub object: String,
    pub created: u64,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<LabelScore>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<Classification>>,
    pub usage: ClassifyUsage,
}

/// A request that passed validation.
struct Checked {
    inputs: Vec<String>,
    many: bool,
    labels: Vec<(String, Option<String>)>,
    model: String,
    multi_label: bool,
    max_input_tokens: usize,
}

fn check(state: &AppState, wire: ClassifyRequest) -> Result<Checked, ApiError> {
    let invalid = |m: String, p: &str| ApiError::invalid(m, Some(p.to_owned()));
    let (inputs, many) = match wire.input {
        Input::One(t) => (vec![t], false),
        Input::Many(list) => (list, true),
    };
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(invalid(format!("input must hold 1 to {MAX_INPUTS} texts"), "input"));
    }
    if let Some(i) = inputs.iter().position(|t| t.trim().is_empty()) {
        let param = if many { format!("input[{i}]") } else { "input".to_owned() };
        return Err(invalid("input must not be empty".into(), &param));
    }
    let labels: Vec<(String, Option<String>)> = wire
        .labels
        .into_iter()
        .map(|l| match l {
            Label::Name(n) => (n.trim().to_owned(), None),
            Label::Described(d) => (d.name.trim().to_owned(), d.description.map(|s| s.trim().to_owned())),
        })
        .collect();
    let least = if wire.multi_label { 1 } else { 2 };
    if labels.len() < least || labels.len() > MAX_LABELS {
        return Err(invalid(format!("labels must hold {least} to {MAX_LABELS} labels"), "labels"));
    }
    for (i, (name, description)) in labels.iter().enumerate() {
        if name.is_empty() || name.chars().count() > MAX_LABEL_CHARS || name.contains('\n') {
            return Err(invalid(
                format!("a label is 1 to {MAX_LABEL_CHARS} characters on one line"),
                &format!("labels[{i}]"),
            ));
        }
        if description.as_ref().is_some_and(|d| d.chars().count() > MAX_DESCRIPTION_CHARS) {
            return Err(invalid(
                format!("a label description is at most {MAX_DESCRIPTION_CHARS} characters"),
                &format!("labels[{i}].description"),
            ));
        }
        if labels[..i].iter().any(|(other, _)| other.eq_ignore_ascii_case(name)) {
            return Err(invalid(format!("label `{name}` is given twice"), &format!("labels[{i}]")));
        }
    }
    let max_input_tokens = wire.max_input_tokens.unwrap_or(DEFAULT_MAX_INPUT_TOKENS);
    if !(16..=4096).contains(&max_input_tokens) {
        return Err(invalid("max_input_tokens must be between 16 and 4096".into(), "max_input_tokens"));
    }
    Ok(Checked {
        inputs,
        many,
        labels,
        model: model_or_base(state, wire.model)?,
        multi_label: wire.multi_label,
        max_input_tokens,
    })
}

/// The single-label prompt: the labels (with descriptions), then the text.
pub fn prompt(labels: &[(String, Option<String>)], text: &str) -> Vec<Message> {
    let list: Vec<String> = labels
        .iter()
        .map(|(name, d)| match d.as_deref().filter(|d| !d.is_empty()) {
            Some(d) => format!("- {name}: {d}"),
            None => format!("- {name}"),
        })
        .collect();
    vec![message(
        Role::User,
        format!(
            "Here is a text:\n{text}\n\nChoose the best label for it from this list:\n{}\nReply with the label only.",
            list.join("\n")
        ),
    )]
}

/// The multi-label prompt of one label.
fn prompt_multi(name: &str, description: Option<&str>, text: &str) -> Vec<Message> {
    let label = match description.filter(|d| !d.is_empty()) {
        Some(d) => format!("{name}: {d}"),
        None => name.to_owned(),
    };
    vec![
        message(Role::System, SYSTEM_MULTI),
        message(Role::User, format!("Label: {label}\n\nText:\n{text}\n\nDoes the label apply to the text?")),
    ]
}

/// Cuts `text` (keeping its beginning) until it has at most `max` tokens; returns the text,
/// whether it was cut, and its original token count.
async fn fit(state: &AppState, text: &str, max: usize) -> Result<(String, bool, usize), ApiError> {
    let engine = state.engine.get().cloned().ok_or(ApiError::NotReady)?;
    let count = |t: String| {
        let engine = engine.clone();
        async move { engine.tokenize(&Prompt::Text(t)).await.map(|ids| ids.len()) }
    };
    let original = count(text.to_owned()).await?;
    if original <= max {
        return Ok((text.to_owned(), false, original));
    }
    let chars: Vec<char> = text.chars().collect();
    let mut keep = chars.len() * max / original;
    loop {
        let cut: String = chars[..keep].iter().collect();
        let n = count(cut.clone()).await?;
        if n <= max || keep == 0 {
            return Ok((cut, true, original));
        }
        keep = keep * max / n * 95 / 100;
    }
}

/// Softmax of log-probabilities.
fn softmax(logprobs: &[f64]) -> Vec<f64> {
    let max = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logprobs.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Scores one input; logs it for feedback under its own id.
async fn classify_one(
    state: &AppState,
    caller: &Principal,
    c: &Checked,
    index: usize,
) -> Result<(Classification, usize, Served), ApiError> {
    let (text, truncated, input_tokens) = fit(state, &c.inputs[index], c.max_input_tokens).await?;
    let created = super::now();
    let id = format!("clf-{}", uuid::Uuid::new_v4().simple());
    let (mut results, prompt_tokens, served, messages) = if c.multi_label {
        let mut results = Vec::with_capacity(c.labels.len());
        let mut tokens = 0;
        let mut served = None;
        for (name, description) in &c.labels {
            let messages = prompt_multi(name, description.as_deref(), &text);
            let (scores, s) =
                state.score(&c.model, caller, Prompt::Chat(messages), vec!["yes".into(), "no".into()]).await?;
            tokens += scores.prompt_tokens;
            served = Some(s);
            let p = softmax(&scores.logprobs);
            results.push(LabelScore { label: name.clone(), probability: p[0], logprob: scores.logprobs[0] });
        }
        let served = served.ok_or_else(|| ApiError::Internal("no label was scored".into()))?;
        (results, tokens, served, prompt(&c.labels, &text))
    } else {
        let messages = prompt(&c.labels, &text);
        let names: Vec<String> = c.labels.iter().map(|(n, _)| n.clone()).collect();
        let (scores, served) = state.score(&c.model, caller, Prompt::Chat(messages.clone()), names.clone()).await?;
        let p = softmax(&scores.logprobs);
        let results = names
            .into_iter()
            .zip(p)
            .zip(&scores.logprobs)
            .map(|((label, probability), &logprob)| LabelScore { label, probability, logprob })
            .collect();
        (results, scores.prompt_tokens, served, messages)
    };
    results.sort_by(|a, b| b.probability.total_cmp(&a.probability).then_with(|| a.label.cmp(&b.label)));
    let answer = if c.multi_label {
        results.iter().filter(|r| r.probability >= 0.5).map(|r| r.label.as_str()).collect::<Vec<_>>().join(", ")
    } else {
        results[0].label.clone()
    };
    log_answer(
        state,
        caller,
        TaskAnswer {
            task: "classify",
            id: &id,
            created,
            served: &served,
            messages: &messages,
            answer: &answer,
            params: serde_json::json!({
                "labels": c.labels.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                "multi_label": c.multi_label,
                "truncated": truncated,
            }),
            prompt_tokens,
            completion_tokens: 0,
        },
    );
    Ok((Classification { id, index, results, truncated, input_tokens }, prompt_tokens, served))
}

#[utoipa::path(
    post,
    path = "/v1/classify",
    operation_id = "classify",
    tag = "tasks",
    request_body = ClassifyRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Labels with probabilities, most probable first; one list per input under `data` when `input` is a list", body = ClassifyResponse),
        (status = 400, description = "Invalid request: empty input, fewer than two labels, a label twice, an unknown field, or a chat engine that cannot score", body = ErrorResponse, example = json!({"error": {"message": "label `spam` is given twice", "type": "invalid_request_error", "param": "labels[2]", "code": "invalid_value"}})),
        (status = 401, description = "Missing or invalid bearer token", body = ErrorResponse),
        (status = 404, description = "Unknown model or adapter", body = ErrorResponse),
        (status = 413, description = "Body over the limit", body = ErrorResponse),
        (status = 429, description = "Rate or concurrency limit reached", body = ErrorResponse),
        (status = 503, description = "Model not loaded yet, or draining", body = ErrorResponse)
    )
)]
pub(crate) async fn classify(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let timer = TaskTimer::start(&state, "classify");
    let result = run(&state, &req, payload).await;
    timer.finish(result, "ok")
}

async fn run(state: &AppState, req: &HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    use actix_web::HttpMessage;
    let wire: ClassifyRequest = read_json(req, payload, state.body_limit).await?;
    let caller = caller(req);
    let c = check(state, wire)?;
    state.admit_caller(req, &caller).await?;
    let outcomes: Vec<Result<(Classification, usize, Served), ApiError>> = futures::stream::iter(0..c.inputs.len())
        .map(|i| classify_one(state, &caller, &c, i))
        .buffered(PARALLEL_INPUTS)
        .collect()
        .await;
    let mut data = Vec::with_capacity(outcomes.len());
    let mut prompt_tokens = 0;
    let mut served = None;
    for outcome in outcomes {
        let (classification, tokens, s) = outcome?;
        prompt_tokens += tokens;
        served = Some(s);
        data.push(classification);
    }
    state.limiter.charge(&caller, prompt_tokens as u64);
    if let Some(s) = served {
        req.extensions_mut().insert(s);
    }
    let usage = ClassifyUsage { prompt_tokens, total_tokens: prompt_tokens };
    let created = super::now();
    let body = if c.many {
        ClassifyResponse {
            id: format!("clf-{}", uuid::Uuid::new_v4().simple()),
            object: "list".into(),
            created,
            model: c.model,
            results: None,
            truncated: None,
            input_tokens: None,
            data: Some(data),
            usage,
        }
    } else {
        let one = data.pop().ok_or_else(|| ApiError::Internal("no input was classified".into()))?;
        ClassifyResponse {
            id: one.id,
            object: "classification".into(),
            created,
            model: c.model,
            results: Some(one.results),
            truncated: Some(one.truncated),
            input_tokens: Some(one.input_tokens),
            data: None,
            usage,
        }
    };
    Ok(HttpResponse::Ok().json(body))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/classify", web::post().to(classify));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[-1.0, -3.0, -0.5]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[2] > p[0] && p[0] > p[1]);
    }

    #[test]
    fn the_prompt_lists_labels_with_descriptions() {
        let m = prompt(&[("a".into(), Some("first".into())), ("b".into(), None)], "hello");
        assert_eq!(m.len(), 1, "no system message: the model's own default leads");
        assert_eq!(
            m[0].content,
            "Here is a text:\nhello\n\nChoose the best label for it from this list:\n- a: first\n- b\nReply with the label only."
        );
    }
}
