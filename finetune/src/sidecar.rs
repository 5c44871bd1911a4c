//! The `finetune watch` sidecar: collects feedback (the gateway's files, or the Redis stream
//! through a consumer group into a durable inbox), queues a training job when enough new
//! accepted records exist, and runs queued jobs (its own and those admins start through the
//! gateway), registering each result as `candidate` through the gateway's admin API.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::jobs::{now, DatasetRef, JobError, JobSpec, JobState, JobStatus, JobStore};
use protocol::jsonl::{Appender, Durability};
use protocol::names::{self, FEEDBACK_STREAM, SIDECAR_CONSUMER, SIDECAR_GROUP, STREAM_FIELD};
use protocol::params::TrainArgs;
use protocol::{AnsweredBy, Envelope};

use crate::dataset::{self, FeedbackItem, FeedbackOptions, FeedbackView};
use crate::error::FinetuneError;
use crate::job::{self, CurateArgs, JobInput, Source};
use crate::register::{self, Gateway};

/// The sidecar's inbox under `<data_dir>/finetune/`: the stream entries it has taken from its
/// consumer group, each fsynced before it is acknowledged.
pub const INBOX_FILE: &str = "inbox.jsonl";
/// Feedback ids already trained into a registered version, under `<data_dir>/finetune/`.
const TRAINED_FILE: &str = "trained.json";

/// What the sidecar watches and how it trains.
pub struct SidecarConfig {
    /// The gateway's data directory (feedback files, registry, job queue).
    pub data_dir: PathBuf,
    pub base: PathBuf,
    pub gateway: String,
    pub admin_token: String,
    pub redis_url: Option<String>,
    /// The adapter feedback-triggered jobs train.
    pub adapter: String,
    /// Only feedback on answers of this model string (`name`, `name@7`, `""` for the base);
    /// all feedback when `None`.
    pub feedback_from: Option<String>,
    /// Only feedback on answers of this endpoint (`classify`, …, or `chat`); all when `None`.
    pub feedback_task: Option<String>,
    /// Accepted records not yet trained on that start a job.
    pub min_new_records: usize,
    pub poll: Duration,
    pub promote_margin: Option<f64>,
    pub args: TrainArgs,
    pub curate: CurateArgs,
    /// Stop once nothing is left to do (tests, cron); otherwise run until killed.
    pub once: bool,
    pub progress: bool,
}

/// Feedback read from the Redis stream, kept in an fsynced inbox before it is acknowledged:
/// an entry is acknowledged only once it is on disk, and a redelivered one (a crash between
/// the two) is recognised by its id.
struct Inbox {
    path: PathBuf,
    view: FeedbackView,
    client: redis::Client,
}

impl Inbox {
    fn open(dir: &Path, url: &str) -> Result<Self, FinetuneError> {
        std::fs::create_dir_all(dir).map_err(|e| FinetuneError::io(dir, e))?;
        let path = dir.join(INBOX_FILE);
        let view = dataset::read_inbox(&path)?;
        let client =
            redis::Client::open(url).map_err(|e| FinetuneError::Config { detail: format!("--redis-url: {e}") })?;
        Ok(Self { path, view, client })
    }

    /// Reads what the group has not yet acknowledged (ours from before a crash first, then
    /// new entries), joins feedback to the completion the gateway stored in Redis, appends it
    /// to the inbox, fsyncs, and acknowledges. Returns how many records arrived.
    fn pull(&mut self) -> Result<usize, FinetuneError> {
        let rerr = |e: redis::RedisError| FinetuneError::Registry { detail: format!("redis: {e}") };
        let mut conn = self.client.get_connection_with_timeout(Duration::from_secs(2)).map_err(rerr)?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(FEEDBACK_STREAM)
            .arg(SIDECAR_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query(&mut conn);
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(rerr(e));
            }
        }
        let mut total = 0;
        for start in ["0", ">"] {
            loop {
                let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(SIDECAR_GROUP)
                    .arg(SIDECAR_CONSUMER)
                    .arg("COUNT")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(FEEDBACK_STREAM)
                    .arg(start)
                    .query(&mut conn)
                    .map_err(rerr)?;
                let entries: Vec<redis::streams::StreamId> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
                if entries.is_empty() {
                    break;
                }
                let mut kept = Vec::new();
                for entry in &entries {
                    let parsed = entry.get::<String>(STREAM_FIELD).map(|json| Envelope::from_json(&json));
                    let mut envelope = match parsed {
                        Some(Ok(envelope)) => envelope,
                        // Acknowledged all the same: a foreign entry never becomes readable.
                        Some(Err(e)) => {
                            tracing::warn!(entry = %entry.id, error = %e, "skipping a stream entry that is not an envelope");
                            continue;
                        }
                        None => {
                            tracing::warn!(entry = %entry.id, "skipping a stream entry without a `{STREAM_FIELD}` field");
                            continue;
                        }
                    };
                    if let Envelope::Feedback(feedback) = &mut envelope {
                        let answered: Option<String> = redis::cmd("GET")
                            .arg(names::response_key(&feedback.record.response_id))
                            .query(&mut conn)
                            .map_err(rerr)?;
                        let by = answered.and_then(|s| serde_json::from_str::<AnsweredBy>(&s).ok());
                        feedback.completion = by.and_then(|b| b.completion());
                    }
                    kept.push(envelope);
                }
                let mut inbox = Appender::open(&self.path)?;
                for envelope in &kept {
                    inbox.append(envelope, Durability::Written)?;
                }
                inbox.sync()?;
                for envelope in kept {
                    self.view.add_envelope(envelope);
                }
                let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
                let _: usize = redis::cmd("XACK")
                    .arg(FEEDBACK_STREAM)
                    .arg(SIDECAR_GROUP)
                    .arg(&ids)
                    .query(&mut conn)
                    .map_err(rerr)?;
                total += entries.len();
                if start == "0" && entries.len() < 100 {
                    break;
                }
            }
        }
        Ok(total)
    }
}

/// Feedback ids already trained into a registered version (per adapter).
fn trained_path(data_dir: &Path) -> PathBuf {
    data_dir.join(names::FINETUNE_DIR).join(TRAINED_FILE)
}

fn load_trained(data_dir: &Path) -> HashSet<String> {
    std::fs::read(trained_path(data_dir)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn save_trained(data_dir: &Path, ids: &HashSet<String>) -> Result<(), FinetuneError> {
    let path = trained_path(data_dir);
    let tmp = path.with_extension("json.tmp");
    let mut sorted: Vec<&String> = ids.iter().collect();
    sorted.sort();
    std::fs::write(&tmp, serde_json::to_vec(&sorted).unwrap_or_default()).map_err(|e| FinetuneError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| FinetuneError::io(&path, e))
}

/// Runs the sidecar until killed (or, with `once`, until nothing is left to do).
pub fn run(cfg: &SidecarConfig) -> Result<(), FinetuneError> {
    let store = JobStore::under(&cfg.data_dir);
    let mut inbox = match &cfg.redis_url {
        Some(url) => Some(Inbox::open(&cfg.data_dir.join(names::FINETUNE_DIR), url)?),
        None => None,
    };
    let gateway = Gateway::new(&cfg.gateway, &cfg.admin_token)?;
    let options = FeedbackOptions {
        adapter: cfg.feedback_from.clone(),
        task: cfg.feedback_task.clone(),
        ..FeedbackOptions::default()
    };
    loop {
        let items: Vec<FeedbackItem> = match inbox.as_mut() {
            Some(inbox) => {
                match inbox.pull() {
                    Ok(n) if n > 0 => tracing::info!(records = n, "feedback read from the stream"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot read the feedback stream; using what the inbox holds"),
                }
                inbox.view.items()
            }
            None => {
                let dir = cfg.data_dir.join(names::FEEDBACK_DIR);
                if dir.exists() {
                    dataset::read_feedback_dir(&dir)?.items()
                } else {
                    Vec::new()
                }
            }
        };
        let trained = load_trained(&cfg.data_dir);
        let usable = dataset::examples_from_feedback(&items, &options);
        let fresh: HashSet<&str> = usable
            .examples
            .iter()
            .map(|e| e.id.split(':').next().unwrap_or(&e.id))
            .filter(|id| !trained.contains(*id))
            .collect();
        let busy = store.list().iter().any(|j| !j.state.is_finished() && j.adapter == cfg.adapter);
        if fresh.len() >= cfg.min_new_records.max(1) && !busy {
            let job =
                store.create(&cfg.adapter, DatasetRef::Feedback, cfg.args.clone(), cfg.promote_margin, "sidecar")?;
            tracing::info!(job = %job.id, new_records = fresh.len(), "enough new accepted feedback: training job queued");
        }
        let mut ran = false;
        while let Some((spec, status)) = store.claim_next() {
            ran = true;
            run_job(cfg, &store, &gateway, spec, status, &items, &options);
        }
        if cfg.once && !ran {
            return Ok(());
        }
        if !ran {
            std::thread::sleep(cfg.poll);
        }
    }
}

/// Runs one claimed job to its end and records the outcome in its status.
fn run_job(
    cfg: &SidecarConfig,
    store: &JobStore,
    gateway: &Gateway,
    spec: JobSpec,
    mut status: JobStatus,
    items: &[FeedbackItem],
    options: &FeedbackOptions,
) {
    tracing::info!(job = %spec.id, adapter = %spec.adapter, "training job started");
    let source = match &spec.dataset {
        DatasetRef::Feedback => Source::Feedback { items: items.to_vec(), options: options.clone() },
        DatasetRef::File { path } => Source::File(path.clone()),
    };
    let prod =
        register::alias_dir(&cfg.data_dir.join(names::REGISTRY_DIR), &spec.adapter, adapters::registry::DEFAULT_ALIAS);
    let input = JobInput {
        job_id: spec.id.clone(),
        base: cfg.base.clone(),
        source,
        out: store.dir(&spec.id),
        args: spec.params.clone(),
        curate: cfg.curate.clone(),
        init_adapter: None,
        compare: prod.as_ref().map(|(v, dir)| (format!("prod (v{v})"), dir.clone())),
        progress: cfg.progress,
    };
    let id = spec.id.clone();
    let outcome = job::run(input, &|| store.cancel_requested(&id)).and_then(|result| {
        let registered =
            gateway.register(&spec.adapter, &result, &spec.id, spec.promote_margin, prod.as_ref().map(|(v, _)| *v))?;
        Ok((result, registered))
    });
    status.finished = Some(now());
    match outcome {
        Ok((result, registered)) => {
            status.state = JobState::Succeeded;
            status.version = Some(registered.version);
            status.promoted = registered.promoted;
            status.step = result.outcome.steps;
            status.total_steps = result.outcome.total_steps;
            status.metrics = serde_json::json!({
                "eval": result.eval, "decision": registered.decision, "release_started": registered.released,
                "train": result.outcome,
            });
            if spec.dataset == DatasetRef::Feedback {
                let mut trained = load_trained(&cfg.data_dir);
                let usable = dataset::examples_from_feedback(items, options);
                trained.extend(usable.examples.iter().map(|e| e.id.split(':').next().unwrap_or(&e.id).to_owned()));
                if let Err(e) = save_trained(&cfg.data_dir, &trained) {
                    tracing::error!(error = %e, "cannot record which feedback was trained on");
                }
            }
            tracing::info!(job = %spec.id, version = registered.version, promoted = registered.promoted, "training job registered a candidate");
        }
        Err(FinetuneError::Cancelled { step }) => {
            status.state = JobState::Cancelled;
            status.step = step;
            tracing::info!(job = %spec.id, step, "training job cancelled");
        }
        Err(e) => {
            status.state = JobState::Failed;
            status.error = Some(JobError { code: e.code().to_owned(), message: e.to_string() });
            tracing::warn!(job = %spec.id, error = %e, "training job failed");
        }
    }
    if let Err(e) = store.set_status(&status) {
        tracing::error!(job = %spec.id, error = %e, "cannot write the job's status");
    }
}
