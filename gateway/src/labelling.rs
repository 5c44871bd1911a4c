//! Labelling queues: pending feedback worked by people with the labeller (or admin) role.
//!
//! A queue is a filter over pending feedback, written labelling rules shown beside every item,
//! whether each item is labelled twice (by two different people), and the share of labelled
//! items a second person reviews. Items are leased to one labeller at a time (two for a
//! double-labelled queue), so no two people get the same item unless the queue asks for it.
//! When an item's labels settle (one label; two that agree; or a reviewer's word) the decision
//! becomes the feedback's review, exactly as `POST /admin/feedback/{id}/review` would make it,
//! and training uses it from then on.
//!
//! Everything is one append-only file, `<data_dir>/labelling/labelling.jsonl`: queue
//! definitions (the last one of a name wins), leases and labels. Every replica reads on from
//! where it was before it answers, so they share queues, leases and decisions.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use actix_web::{web, HttpRequest, HttpResponse};
use parking_lot::Mutex;
use protocol::jsonl::{self, Appender, Durability};
use protocol::{ReviewStatus, Reviewed};
use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::error::ApiError;
use crate::extract::{caller, read_json};
use crate::feedback::{FeedbackFilter, FeedbackStore};
use crate::feedback_api::FeedbackItem;
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::state::AppState;
use crate::tasks::now;

const FILE: &str = "labelling.jsonl";
/// How long an item stays with the labeller it was given to.
const LEASE_SECONDS: u64 = 15 * 60;
/// Most items one `next` call hands out.
const MAX_BATCH: usize = 50;

/// A queue as an admin defines it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    /// The labelling rules, shown beside every item.
    pub rules: String,
    /// Which pending feedback the queue takes.
    #[serde(default)]
    pub filter: FeedbackFilter,
    /// Every item is labelled by two different people; when they disagree a third decides.
    #[serde(default)]
    pub double: bool,
    /// The share (0 to 1) of settled labels a second person reviews before they count.
    #[serde(default)]
    pub review_share: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Queue {
    name: String,
    #[serde(flatten)]
    spec: QueueSpec,
    by: String,
    at: u64,
}

/// Which step an item is at for the person asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Accept (optionally with an edited correction) or reject.
    Label,
    /// Agree or disagree with the first label.
    Review,
}

/// What a labeller decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LabelAction {
    Accept,
    Reject,
    Agree,
    Disagree,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Label {
    queue: String,
    feedback_id: String,
    by: String,
    stage: Stage,
    action: LabelAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correction: Option<String>,
    at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lease {
    queue: String,
    feedback_id: String,
    by: String,
    until: u64,
}

/// One line of the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Entry {
    Queue(Queue),
    Lease(Lease),
    Label(Label),
}

/// What is known of one item in one queue.
#[derive(Debug, Clone, Default)]
struct Item {
    labels: Vec<Label>,
    review: Option<Label>,
    leases: Vec<Lease>,
}

/// A settled item's review: accepted (with the correction to train on) or rejected.
type Settled = (ReviewStatus, Option<String>);

/// What an item needs next.
#[derive(Debug, Clone, PartialEq)]
enum Next {
    Label,
    Review,
    /// Settled: the review the feedback gets.
    Done(ReviewStatus, Option<String>),
}

/// Whether two people said the same: the same verdict and, to accept, the same correction.
fn same(a: &Label, b: &Label) -> bool {
    let norm = |l: &Label| l.correction.as_deref().map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned);
    a.action == b.action && (a.action == LabelAction::Reject || norm(a) == norm(b))
}

/// The decision a label stands for.
fn verdict(l: &Label) -> (ReviewStatus, Option<String>) {
    match l.action {
        LabelAction::Reject => (ReviewStatus::Rejected, None),
        _ => (ReviewStatus::Accepted, l.correction.clone()),
    }
}

impl Item {
    fn next(&self, queue: &Queue) -> Next {
        let needed = if queue.spec.double { 2 } else { 1 };
        if self.labels.len() < needed {
            return Next::Label;
        }
        let first = &self.labels[0];
        if let Some(review) = &self.review {
            return match (review.action, &review.correction) {
                (LabelAction::Agree, _) => {
                    let (s, c) = verdict(first);
                    Next::Done(s, c)
                }
                (_, Some(c)) if !c.trim().is_empty() => Next::Done(ReviewStatus::Accepted, Some(c.clone())),
                _ if first.action == LabelAction::Reject => Next::Done(ReviewStatus::Accepted, None),
                _ => Next::Done(ReviewStatus::Rejected, None),
            };
        }
        let agreed = !queue.spec.double || same(&self.labels[0], &self.labels[1]);
        let point = adapters::registry::sticky_hash(&format!("review:{}", queue.name), &first.feedback_id) as f64
            / u64::MAX as f64;
        let sampled = point < queue.spec.review_share;
        if !agreed || sampled {
            return Next::Review;
        }
        let (s, c) = verdict(first);
        Next::Done(s, c)
    }

    fn labelled_by(&self, sub: &str) -> bool {
        self.labels.iter().any(|l| l.by == sub)
    }

    fn leased_to(&self, sub: &str) -> bool {
        self.leases.iter().any(|l| l.by == sub)
    }

    fn live_leases_of_others(&self, sub: &str, at: u64) -> usize {
        self.leases.iter().filter(|l| l.by != sub && l.until > at).count()
    }
}

#[derive(Default)]
struct State {
    queues: BTreeMap<String, Queue>,
    /// (queue, feedback id) → item.
    items: HashMap<(String, String), Item>,
    read: u64,
}

impl State {
    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Queue(q) => {
                self.queues.insert(q.name.clone(), q);
            }
            Entry::Lease(l) => {
                let item = self.items.entry((l.queue.clone(), l.feedback_id.clone())).or_default();
                item.leases.retain(|x| x.by != l.by);
                item.leases.push(l);
            }
            Entry::Label(l) => {
                let item = self.items.entry((l.queue.clone(), l.feedback_id.clone())).or_default();
                item.leases.retain(|x| x.by != l.by);
                match l.stage {
                    Stage::Label if !item.labelled_by(&l.by) => item.labels.push(l),
                    Stage::Review if item.review.is_none() => item.review = Some(l),
                    _ => {}
                }
            }
        }
    }
}

/// What `next` hands out, and the settled items whose review is to be applied again.
pub struct Batch {
    items: Vec<QueueItem>,
    unapplied: Vec<(String, Settled)>,
}

/// The queues, their leases and labels.
pub struct Labelling {
    path: PathBuf,
    file: Mutex<Option<Appender>>,
    state: Mutex<State>,
}

/// A queue as listed, with its counts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueView {
    name: String,
    #[serde(flatten)]
    spec: QueueSpec,
    /// Pending feedback the queue takes that is not settled yet.
    pending: usize,
    /// Items with at least one label.
    labelled: usize,
    /// Items settled by the queue (their feedback reviewed).
    done: usize,
}

/// One item handed to a labeller: the feedback, the endpoint that answered, the prompt and
/// answer it is about, and what to do with it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueItem {
    feedback: Reviewed,
    task: Option<String>,
    completion: Option<protocol::CompletionText>,
    stage: Stage,
    /// For a review: the label being checked.
    first: Option<FirstLabel>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FirstLabel {
    labeller: String,
    action: LabelAction,
    correction: Option<String>,
}

/// One person's counts in a queue.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct LabellerStats {
    sub: String,
    labelled: usize,
    reviewed: usize,
    /// Labels compared with another person's (a double label's twin, or a review).
    compared: usize,
    /// The share of compared labels that agreed; `null` before any comparison.
    agreement: Option<f64>,
    #[serde(skip)]
    agreed: usize,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueStats {
    queue: String,
    labellers: Vec<LabellerStats>,
    /// Over every comparison in the queue; `null` before any.
    agreement: Option<f64>,
    compared: usize,
}

impl Labelling {
    pub fn open(data_dir: &std::path::Path) -> Self {
        let dir = data_dir.join("labelling");
        Self { path: dir.join(FILE), file: Mutex::new(None), state: Mutex::new(State::default()) }
    }

    /// Reads what this and other replicas appended since the last call.
    fn catch_up(&self, state: &mut State) -> Result<(), ApiError> {
        let mut entries = Vec::new();
        state.read = jsonl::for_each_from(&self.path, state.read, |e: Entry| entries.push(e))
            .map_err(|e| ApiError::Internal(format!("labelling log: {e}")))?;
        for e in entries {
            state.apply(e);
        }
        Ok(())
    }

    /// Appends entries durably, then reads them (and anything before them) back in.
    fn append(&self, state: &mut State, entries: &[Entry]) -> Result<(), ApiError> {
        let internal = |e: protocol::ProtocolError| ApiError::Internal(format!("labelling log: {e}"));
        let mut file = self.file.lock();
        if file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| ApiError::Internal(format!("labelling directory: {e}")))?;
            }
            *file = Some(Appender::open(&self.path).map_err(internal)?);
        }
        let appender = file.as_mut().expect("opened above");
        for (i, e) in entries.iter().enumerate() {
            let durability = if i + 1 == entries.len() { Durability::Synced } else { Durability::Written };
            appender.append(e, durability).map_err(internal)?;
        }
        drop(file);
        self.catch_up(state)
    }

    fn queue<'a>(state: &'a State, name: &str) -> Result<&'a Queue, ApiError> {
        state
            .queues
            .get(name)
            .ok_or_else(|| ApiError::NotFound { message: format!("no labelling queue named `{name}`") })
    }

    /// Defines or redefines a queue.
    pub fn put(&self, name: &str, spec: QueueSpec, by: &str) -> Result<(), ApiError> {
        let mut state = self.state.lock();
        self.catch_up(&mut state)?;
        let queue = Queue { name: name.to_owned(), spec, by: by.to_owned(), at: now() };
        self.append(&mut state, &[Entry::Queue(queue)])
    }

    fn pending(feedback: &FeedbackStore, queue: &Queue) -> Vec<Reviewed> {
        feedback.list(Some(ReviewStatus::Pending), &queue.spec.filter, 0, usize::MAX)
    }

    pub fn list(&self, feedback: &FeedbackStore) -> Result<Vec<QueueView>, ApiError> {
        let mut state = self.state.lock();
        self.catch_up(&mut state)?;
        let mut out = Vec::new();
        for queue in state.queues.values() {
            let pending = Self::pending(feedback, queue)
                .iter()
                .filter(|r| {
                    state
                        .items
                        .get(&(queue.name.clone(), r.feedback.id.clone()))
                        .is_none_or(|i| !matches!(i.next(queue), Next::Done(..)))
                })
                .count();
            let items = state.items.iter().filter(|((q, _), _)| *q == queue.name).map(|(_, i)| i);
            let (mut labelled, mut done) = (0, 0);
            for item in items {
                labelled += usize::from(!item.labels.is_empty());
                done += usize::from(matches!(item.next(queue), Next::Done(..)));
            }
            out.push(QueueView { name: queue.name.clone(), spec: queue.spec.clone(), pending, labelled, done });
        }
        Ok(out)
    }

    /// Up to `limit` items for `sub`: those already given to them first, then reviews of
    /// other people's labels, then items to label, oldest first. Each is leased to them.
    /// Also returns the items found settled whose feedback is still pending (their review
    /// failed to apply), with the review to apply again.
    pub fn next(&self, feedback: &FeedbackStore, name: &str, sub: &str, limit: usize) -> Result<Batch, ApiError> {
        let mut state = self.state.lock();
        self.catch_up(&mut state)?;
        let queue = Self::queue(&state, name)?.clone();
        let at = now();
        let needed = if queue.spec.double { 2 } else { 1 };
        let mut chosen: Vec<(Reviewed, Stage)> = Vec::new();
        let mut leases = Vec::new();
        let mut unapplied = Vec::new();
        for r in Self::pending(feedback, &queue) {
            if chosen.len() >= limit {
                break;
            }
            let item = state.items.get(&(queue.name.clone(), r.feedback.id.clone())).cloned().unwrap_or_default();
            let stage = match item.next(&queue) {
                Next::Done(status, correction) => {
                    unapplied.push((r.feedback.id.clone(), (status, correction)));
                    continue;
                }
                Next::Label => Stage::Label,
                Next::Review => Stage::Review,
            };
            let mine = item.leased_to(sub) && !item.labelled_by(sub);
            let free = match stage {
                Stage::Label => {
                    !item.labelled_by(sub) && item.labels.len() + item.live_leases_of_others(sub, at) < needed
                }
                Stage::Review => !item.labelled_by(sub) && item.live_leases_of_others(sub, at) == 0,
            };
            if mine || free {
                leases.push(Entry::Lease(Lease {
                    queue: queue.name.clone(),
                    feedback_id: r.feedback.id.clone(),
                    by: sub.to_owned(),
                    until: at + LEASE_SECONDS,
                }));
                chosen.push((r, stage));
            }
        }
        if !leases.is_empty() {
            self.append(&mut state, &leases)?;
        }
        let firsts: Vec<Option<FirstLabel>> = chosen
            .iter()
            .map(|(r, stage)| {
                let item = state.items.get(&(queue.name.clone(), r.feedback.id.clone()))?;
                let first = item.labels.first().filter(|_| *stage == Stage::Review)?;
                Some(FirstLabel {
                    labeller: first.by.clone(),
                    action: first.action,
                    correction: first.correction.clone(),
                })
            })
            .collect();
        drop(state);
        let stages: Vec<Stage> = chosen.iter().map(|(_, s)| *s).collect();
        let items = FeedbackItem::for_records(feedback, chosen.into_iter().map(|(r, _)| r).collect());
        let items = items
            .into_iter()
            .zip(stages)
            .zip(firsts)
            .map(|((item, stage), first)| QueueItem {
                feedback: item.reviewed,
                task: item.task,
                completion: item.completion,
                stage,
                first,
            })
            .collect();
        Ok(Batch { items, unapplied })
    }

    /// Records `sub`'s label on an item given to them. Returns where the item stands and, once
    /// settled, the review the feedback gets (the caller applies it).
    pub fn decide(
        &self,
        name: &str,
        feedback_id: &str,
        sub: &str,
        action: LabelAction,
        correction: Option<String>,
    ) -> Result<(&'static str, Option<Settled>), ApiError> {
        let mut state = self.state.lock();
        self.catch_up(&mut state)?;
        let queue = Self::queue(&state, name)?.clone();
        let key = (queue.name.clone(), feedback_id.to_owned());
        let item = state.items.get(&key).cloned().unwrap_or_default();
        if !item.leased_to(sub) {
            return Err(ApiError::Conflict {
                message: format!(
                    "item `{feedback_id}` is not assigned to you in queue `{name}`; ask for the next items"
                ),
            });
        }
        let stage = match item.next(&queue) {
            Next::Done(..) => {
                return Err(ApiError::Conflict { message: format!("item `{feedback_id}` is already settled") })
            }
            Next::Label => Stage::Label,
            Next::Review => Stage::Review,
        };
        let fits = match stage {
            Stage::Label => matches!(action, LabelAction::Accept | LabelAction::Reject),
            Stage::Review => matches!(action, LabelAction::Agree | LabelAction::Disagree),
        };
        if !fits {
            let want = if stage == Stage::Label { "`accept` or `reject`" } else { "`agree` or `disagree`" };
            return Err(ApiError::invalid(format!("this item needs {want} now"), Some("action".to_owned())));
        }
        if item.labelled_by(sub) {
            return Err(ApiError::Conflict { message: format!("you already labelled `{feedback_id}`") });
        }
        let correction = correction.filter(|c| !c.trim().is_empty());
        if correction.is_some() && matches!(action, LabelAction::Reject | LabelAction::Agree) {
            return Err(ApiError::invalid(
                "a correction comes only with `accept` or `disagree`",
                Some("correction".to_owned()),
            ));
        }
        let label = Label {
            queue: queue.name.clone(),
            feedback_id: feedback_id.to_owned(),
            by: sub.to_owned(),
            stage,
            action,
            correction,
            at: now(),
        };
        self.append(&mut state, &[Entry::Label(label)])?;
        let item = state.items.get(&key).cloned().unwrap_or_default();
        Ok(match item.next(&queue) {
            Next::Done(status, correction) => ("settled", Some((status, correction))),
            Next::Label => ("awaiting_second_label", None),
            Next::Review => ("awaiting_review", None),
        })
    }

    /// Per-labeller counts and agreement in a queue.
    pub fn stats(&self, name: &str) -> Result<QueueStats, ApiError> {
        let mut state = self.state.lock();
        self.catch_up(&mut state)?;
        let queue = Self::queue(&state, name)?.clone();
        let mut by: BTreeMap<String, LabellerStats> = BTreeMap::new();
        let (mut compared, mut agreed) = (0, 0);
        let count = |sub: &str, ok: bool, by: &mut BTreeMap<String, LabellerStats>| {
            let s =
                by.entry(sub.to_owned()).or_insert_with(|| LabellerStats { sub: sub.to_owned(), ..Default::default() });
            s.compared += 1;
            s.agreed += usize::from(ok);
        };
        for ((q, _), item) in &state.items {
            if *q != queue.name {
                continue;
            }
            for l in &item.labels {
                by.entry(l.by.clone())
                    .or_insert_with(|| LabellerStats { sub: l.by.clone(), ..Default::default() })
                    .labelled += 1;
            }
            if let [a, b] = item.labels.as_slice() {
                let ok = same(a, b);
                count(&a.by, ok, &mut by);
                count(&b.by, ok, &mut by);
                compared += 1;
                agreed += usize::from(ok);
            }
            if let (Some(first), Some(review)) = (item.labels.first(), &item.review) {
                by.entry(review.by.clone())
                    .or_insert_with(|| LabellerStats { sub: review.by.clone(), ..Default::default() })
                    .reviewed += 1;
                let ok = review.action == LabelAction::Agree;
                count(&first.by, ok, &mut by);
                count(&review.by, ok, &mut by);
                compared += 1;
                agreed += usize::from(ok);
            }
        }
        let share = |a: usize, n: usize| (n > 0).then(|| a as f64 / n as f64);
        let labellers = by
            .into_values()
            .map(|mut s| {
                s.agreement = share(s.agreed, s.compared);
                s
            })
            .collect();
        Ok(QueueStats { queue: queue.name, labellers, agreement: share(agreed, compared), compared })
    }
}

/// Labellers and admins only.
fn labeller(state: &AppState, req: &HttpRequest) -> Result<String, ApiError> {
    use actix_web::HttpMessage;
    match req.extensions().get::<crate::auth::Principal>() {
        Some(p) if matches!(p.role, Role::Admin | Role::Labeller) => Ok(p.sub.clone()),
        Some(_) if state.has_auth() || state.admin_token.is_some() => {
            Err(ApiError::Forbidden { message: "the labelling queues need a labeller or admin token".into() })
        }
        _ => Err(ApiError::Unauthorized),
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid("a queue name is 1-64 of a-z, 0-9, `-` and `_`", Some("name".to_owned())))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    web::block(f).await.map_err(|e| ApiError::Internal(e.to_string()))?
}

/// The errors every labelling route answers with.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum LabellingErrors {
    #[response(status = 400, description = "Invalid request", example = json!({"error": {"message": "this item needs `agree` or `disagree` now", "type": "invalid_request_error", "param": "action", "code": "invalid_value"}}))]
    Invalid(ErrorResponse),
    #[response(status = 401, description = "Missing or invalid bearer token or session", example = json!({"error": {"message": "missing or invalid bearer token", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}))]
    Unauthorized(ErrorResponse),
    #[response(status = 403, description = "Neither a labeller nor an admin", example = json!({"error": {"message": "the labelling queues need a labeller or admin token", "type": "permission_error", "param": null, "code": "forbidden"}}))]
    Forbidden(ErrorResponse),
    #[response(status = 404, description = "No such queue or feedback", example = json!({"error": {"message": "no labelling queue named `triage`", "type": "invalid_request_error", "param": null, "code": "not_found"}}))]
    Unknown(ErrorResponse),
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueList {
    object: String,
    data: Vec<QueueView>,
}

#[utoipa::path(
    get,
    path = "/v1/labelling/queues",
    operation_id = "list_labelling_queues",
    tag = "labelling",
    security(("bearer" = [])),
    responses((status = 200, description = "Every queue with its rules and counts", body = QueueList), LabellingErrors)
)]
pub(crate) async fn list(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    labeller(&state, &req)?;
    let (labelling, feedback) = (state.labelling.clone(), state.feedback.clone());
    let data = blocking(move || labelling.list(&feedback)).await?;
    Ok(HttpResponse::Ok().json(QueueList { object: "list".into(), data }))
}

#[utoipa::path(
    put,
    path = "/admin/labelling/queues/{name}",
    operation_id = "put_labelling_queue",
    tag = "labelling",
    params(("name" = String, Path, description = "Queue name (a-z, 0-9, `-`, `_`)")),
    request_body = QueueSpec,
    security(("bearer" = [])),
    responses((status = 200, description = "Defined; every queue as listed", body = QueueList), LabellingErrors)
)]
pub(crate) async fn put(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    crate::admin::require_admin(&state, &req)?;
    let name = path.into_inner();
    check_name(&name)?;
    let spec: QueueSpec = read_json(&req, payload, state.body_limit).await?;
    if spec.rules.trim().is_empty() {
        return Err(ApiError::invalid("`rules` are shown beside every item; write some", Some("rules".to_owned())));
    }
    if !(0.0..=1.0).contains(&spec.review_share) {
        return Err(ApiError::invalid("`review_share` must be between 0 and 1", Some("review_share".to_owned())));
    }
    let by = caller(&req).sub;
    let (labelling, feedback) = (state.labelling.clone(), state.feedback.clone());
    let data = blocking(move || {
        labelling.put(&name, spec, &by)?;
        labelling.list(&feedback)
    })
    .await?;
    Ok(HttpResponse::Ok().json(QueueList { object: "list".into(), data }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NextRequest {
    /// 1 to 50 [default: 10].
    limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueItems {
    object: String,
    /// The queue's rules, to show beside every item.
    rules: String,
    data: Vec<QueueItem>,
}

#[utoipa::path(
    post,
    path = "/v1/labelling/queues/{name}/next",
    operation_id = "next_labelling_items",
    tag = "labelling",
    params(("name" = String, Path, description = "Queue name")),
    request_body = NextRequest,
    security(("bearer" = [])),
    responses((status = 200, description = "Items assigned to the caller for 15 minutes: theirs already, then reviews, then new ones", body = QueueItems), LabellingErrors)
)]
pub(crate) async fn next(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let sub = labeller(&state, &req)?;
    let wire: NextRequest = read_json(&req, payload, state.body_limit).await?;
    let limit = wire.limit.unwrap_or(10);
    if !(1..=MAX_BATCH).contains(&limit) {
        return Err(ApiError::invalid(format!("`limit` must be 1 to {MAX_BATCH}"), Some("limit".to_owned())));
    }
    let name = path.into_inner();
    let (labelling, feedback) = (state.labelling.clone(), state.feedback.clone());
    let (rules, data) = blocking(move || {
        let Batch { items, unapplied } = labelling.next(&feedback, &name, &sub, limit)?;
        for (id, (status, correction)) in unapplied {
            if let Err(e) = feedback.review(&id, status, correction, &format!("labelling:{name}")) {
                tracing::warn!(error = %e, feedback = %id, "cannot apply a settled label");
            }
        }
        let rules = labelling.state.lock().queues.get(&name).map(|q| q.spec.rules.clone()).unwrap_or_default();
        Ok((rules, items))
    })
    .await?;
    Ok(HttpResponse::Ok().json(QueueItems { object: "list".into(), rules, data }))
}

/// A labeller's decision on one item.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    /// `accept` or `reject` to label; `agree` or `disagree` to review someone's label.
    action: LabelAction,
    /// With `accept`: the correction to train on instead of the user's. With `disagree`: the
    /// right answer (accepting with it).
    correction: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LabelOutcome {
    /// `settled` (the feedback is reviewed), `awaiting_second_label` or `awaiting_review`.
    status: String,
    /// Once settled: the feedback as reviewed.
    feedback: Option<Reviewed>,
}

#[utoipa::path(
    post,
    path = "/v1/labelling/queues/{name}/items/{feedback_id}",
    operation_id = "label_item",
    tag = "labelling",
    params(("name" = String, Path, description = "Queue name"), ("feedback_id" = String, Path, description = "Feedback id (`fb-…`)")),
    request_body = LabelRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Recorded durably; once the item settles its feedback is reviewed", body = LabelOutcome),
        LabellingErrors,
        (status = 409, description = "Not assigned to the caller, already labelled by them, or already settled", body = ErrorResponse, example = json!({"error": {"message": "item `fb-1` is not assigned to you in queue `triage`; ask for the next items", "type": "conflict_error", "param": null, "code": "conflict"}}))
    )
)]
pub(crate) async fn label(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let sub = labeller(&state, &req)?;
    let wire: LabelRequest = read_json(&req, payload, state.body_limit).await?;
    let (name, feedback_id) = path.into_inner();
    let (labelling, feedback) = (state.labelling.clone(), state.feedback.clone());
    let (status, record) = blocking(move || {
        if feedback.get(&feedback_id).is_none() {
            return Err(ApiError::NotFound { message: format!("no feedback with id `{feedback_id}`") });
        }
        let (status, settled) = labelling.decide(&name, &feedback_id, &sub, wire.action, wire.correction)?;
        let record = match settled {
            Some((decision, correction)) => {
                Some(feedback.review(&feedback_id, decision, correction, &format!("labelling:{name}"))?)
            }
            None => None,
        };
        Ok((status, record))
    })
    .await?;
    let reviewed = match record {
        Some((reviewed, record)) => {
            if let Some(shared) = state.feedback.shared.get() {
                shared.publish_review(&record).await;
            }
            Some(reviewed)
        }
        None => None,
    };
    Ok(HttpResponse::Ok().json(LabelOutcome { status: status.into(), feedback: reviewed }))
}

#[utoipa::path(
    get,
    path = "/v1/labelling/queues/{name}/stats",
    operation_id = "labelling_stats",
    tag = "labelling",
    params(("name" = String, Path, description = "Queue name")),
    security(("bearer" = [])),
    responses((status = 200, description = "Per-labeller counts and agreement rates", body = QueueStats), LabellingErrors)
)]
pub(crate) async fn stats(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    labeller(&state, &req)?;
    let labelling = state.labelling.clone();
    let name = path.into_inner();
    let stats = blocking(move || labelling.stats(&name)).await?;
    Ok(HttpResponse::Ok().json(stats))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/labelling/queues", web::get().to(list))
        .route("/admin/labelling/queues/{name}", web::put().to(put))
        .route("/v1/labelling/queues/{name}/next", web::post().to(next))
        .route("/v1/labelling/queues/{name}/items/{feedback_id}", web::post().to(label))
        .route("/v1/labelling/queues/{name}/stats", web::get().to(stats));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(double: bool, review_share: f64) -> Queue {
        Queue {
            name: "q".into(),
            spec: QueueSpec { rules: "r".into(), filter: FeedbackFilter::default(), double, review_share },
            by: "admin".into(),
            at: 0,
        }
    }

    fn label(by: &str, stage: Stage, action: LabelAction, correction: Option<&str>) -> Label {
        Label {
            queue: "q".into(),
            feedback_id: "fb-1".into(),
            by: by.into(),
            stage,
            action,
            correction: correction.map(str::to_owned),
            at: 0,
        }
    }

    #[test]
    fn one_label_settles_a_single_queue_and_two_that_agree_a_double_one() {
        let mut item = Item::default();
        assert_eq!(item.next(&queue(false, 0.0)), Next::Label);
        item.labels.push(label("ann", Stage::Label, LabelAction::Accept, Some("fixed")));
        assert_eq!(item.next(&queue(false, 0.0)), Next::Done(ReviewStatus::Accepted, Some("fixed".into())));
        assert_eq!(item.next(&queue(true, 0.0)), Next::Label);
        assert_eq!(item.next(&queue(false, 1.0)), Next::Review, "every label reviewed at share 1");
        item.labels.push(label("bob", Stage::Label, LabelAction::Accept, Some(" fixed ")));
        assert_eq!(item.next(&queue(true, 0.0)), Next::Done(ReviewStatus::Accepted, Some("fixed".into())));
    }

    #[test]
    fn disagreement_goes_to_a_reviewer_whose_word_settles_it() {
        let mut item = Item::default();
        item.labels.push(label("ann", Stage::Label, LabelAction::Accept, Some("a")));
        item.labels.push(label("bob", Stage::Label, LabelAction::Reject, None));
        let q = queue(true, 0.0);
        assert_eq!(item.next(&q), Next::Review);
        item.review = Some(label("cy", Stage::Review, LabelAction::Disagree, None));
        assert_eq!(item.next(&q), Next::Done(ReviewStatus::Rejected, None));
        item.review = Some(label("cy", Stage::Review, LabelAction::Disagree, Some("b")));
        assert_eq!(item.next(&q), Next::Done(ReviewStatus::Accepted, Some("b".into())));
        item.review = Some(label("cy", Stage::Review, LabelAction::Agree, None));
        assert_eq!(item.next(&q), Next::Done(ReviewStatus::Accepted, Some("a".into())));
    }
}
