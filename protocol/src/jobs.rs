//! The job queue on disk, shared by the gateway's admin API (which creates, lists and cancels
//! jobs) and the sidecar (which claims and runs them): one directory per job under
//! `<data_dir>/finetune/jobs/`, holding `spec.json`, `status.json` (replaced atomically), the
//! trainer's `train_log.jsonl`, the curation report and the adapter, plus a `cancel` marker.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::names;
use crate::params::TrainArgs;

/// Where a job's examples come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DatasetRef {
    /// Reviewed feedback (accepted records) the sidecar has collected.
    Feedback,
    /// A dataset file on the sidecar's machine.
    File { path: PathBuf },
}

/// What to train: written once when the job is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: String,
    pub created: u64,
    /// The adapter the result is registered under.
    pub adapter: String,
    pub dataset: DatasetRef,
    #[serde(default)]
    pub params: TrainArgs,
    /// Promote the candidate to `prod` when it beats the current version by this much.
    #[serde(default)]
    pub promote_margin: Option<f64>,
    /// Who asked (an admin's subject, or `sidecar` for feedback-triggered jobs).
    pub requested_by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// Where a job stands; the admin API serves it as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub object: String,
    pub adapter: String,
    pub state: JobState,
    pub created: u64,
    #[serde(default)]
    pub started: Option<u64>,
    #[serde(default)]
    pub finished: Option<u64>,
    #[serde(default)]
    pub step: usize,
    #[serde(default)]
    pub total_steps: usize,
    /// The registered version, once the job succeeded.
    #[serde(default)]
    pub version: Option<u64>,
    /// Whether the policy promoted it to `prod`.
    #[serde(default)]
    pub promoted: bool,
    /// The evaluation table (base, prod, candidate).
    #[serde(default)]
    pub metrics: serde_json::Value,
    #[serde(default)]
    pub error: Option<JobError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

/// One line of a job's `train_log.jsonl`: the trainer appends one per optimiser step, and the
/// admin API serves them as the loss curve.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    #[serde(default)]
    pub total_steps: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    /// DPO: share of pairs whose chosen answer gained on the rejected one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reward_accuracy: Option<f64>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Jobs under one directory.
#[derive(Debug, Clone)]
pub struct JobStore {
    root: PathBuf,
}

fn write_atomic(path: &Path, value: &impl Serialize) -> Result<(), ProtocolError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ProtocolError::io(path, e.into()))?;
    std::fs::write(&tmp, bytes).map_err(|e| ProtocolError::io(&tmp, e))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| ProtocolError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ProtocolError::io(path, e))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ProtocolError> {
    let bytes = std::fs::read(path).map_err(|e| ProtocolError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ProtocolError::Json {
        path: path.to_owned(),
        line: e.line(),
        detail: e.to_string(),
    })
}

impl JobStore {
    /// The store under a data directory (`<data_dir>/finetune/jobs`).
    pub fn under(data_dir: &Path) -> Self {
        Self { root: data_dir.join(names::FINETUNE_DIR).join(names::JOBS_DIR) }
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Where uploaded datasets are kept (`<data_dir>/finetune/datasets/ds-<hash>`).
    pub fn datasets_dir(&self) -> PathBuf {
        self.root.with_file_name(names::DATASETS_DIR)
    }

    /// The file of an uploaded dataset, if `id` names one.
    pub fn dataset_path(&self, id: &str) -> Option<PathBuf> {
        let ok = id
            .strip_prefix(names::DATASET_ID_PREFIX)
            .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()));
        let path = self.datasets_dir().join(id);
        (ok && path.is_file()).then_some(path)
    }

    /// Queues a job; returns its status.
    pub fn create(
        &self,
        adapter: &str,
        dataset: DatasetRef,
        params: TrainArgs,
        promote_margin: Option<f64>,
        requested_by: &str,
    ) -> Result<JobStatus, ProtocolError> {
        let id = new_job_id();
        let spec = JobSpec {
            id: id.clone(),
            created: now(),
            adapter: adapter.to_owned(),
            dataset,
            params,
            promote_margin,
            requested_by: requested_by.to_owned(),
        };
        let tmp = self.root.join(format!(".tmp-{id}"));
        std::fs::create_dir_all(&tmp).map_err(|e| ProtocolError::io(&tmp, e))?;
        write_atomic(&tmp.join(names::JOB_SPEC_FILE), &spec)?;
        let status = JobStatus {
            id: id.clone(),
            object: "fine_tuning.job".into(),
            adapter: adapter.to_owned(),
            state: JobState::Queued,
            created: spec.created,
            started: None,
            finished: None,
            step: 0,
            total_steps: 0,
            version: None,
            promoted: false,
            metrics: serde_json::Value::Null,
            error: None,
        };
        write_atomic(&tmp.join(names::JOB_STATUS_FILE), &status)?;
        // The job appears whole or not at all.
        std::fs::rename(&tmp, self.dir(&id)).map_err(|e| ProtocolError::io(self.dir(&id), e))?;
        Ok(status)
    }

    pub fn spec(&self, id: &str) -> Result<JobSpec, ProtocolError> {
        read_json(&self.dir(id).join(names::JOB_SPEC_FILE))
    }

    /// `None` for an id that names no job (or a malformed id).
    pub fn status(&self, id: &str) -> Option<JobStatus> {
        if !valid_id(id) {
            return None;
        }
        read_json(&self.dir(id).join(names::JOB_STATUS_FILE)).ok()
    }

    pub fn set_status(&self, status: &JobStatus) -> Result<(), ProtocolError> {
        write_atomic(&self.dir(&status.id).join(names::JOB_STATUS_FILE), status)
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let mut jobs: Vec<JobStatus> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().filter(|n| valid_id(n)).and_then(|n| self.status(n)))
            .collect();
        jobs.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.id.cmp(&a.id)));
        jobs
    }

    /// Asks a job to stop. A queued job is cancelled at once; a running one stops at its next
    /// step (after a checkpoint). `None` for an unknown id; `Err` with the status for a job
    /// that already finished.
    pub fn cancel(&self, id: &str) -> Option<Result<JobStatus, JobStatus>> {
        let mut status = self.status(id)?;
        if status.state.is_finished() {
            return Some(Err(status));
        }
        let marker = self.dir(id).join(names::JOB_CANCEL_FILE);
        if std::fs::write(&marker, b"").is_err() {
            return Some(Err(status));
        }
        if status.state == JobState::Queued {
            status.state = JobState::Cancelled;
            status.finished = Some(now());
            let _ = self.set_status(&status);
        }
        Some(Ok(status))
    }

    pub fn cancel_requested(&self, id: &str) -> bool {
        self.dir(id).join(names::JOB_CANCEL_FILE).exists()
    }

    /// The training log's steps after `after`, for loss curves and following a job. A log that
    /// cannot be read has no steps; torn lines are skipped.
    pub fn log_after(&self, id: &str, after: usize) -> Vec<StepLog> {
        let mut steps = Vec::new();
        let path = self.dir(id).join(names::TRAIN_LOG_FILE);
        if let Err(e) = crate::jsonl::for_each(&path, |s: StepLog| {
            if s.step > after {
                steps.push(s)
            }
        }) {
            tracing::warn!(error = %e, "cannot read a training log");
        }
        steps
    }

    /// The oldest queued job, claimed (marked running) for this process.
    pub fn claim_next(&self) -> Option<(JobSpec, JobStatus)> {
        let mut queued: Vec<JobStatus> = self.list().into_iter().filter(|s| s.state == JobState::Queued).collect();
        queued.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        let mut status = queued.into_iter().next()?;
        let spec = self.spec(&status.id).ok()?;
        status.state = JobState::Running;
        status.started = Some(now());
        self.set_status(&status).ok()?;
        Some((spec, status))
    }
}

/// A fresh job id: `ftjob-` and 32 hex digits.
pub fn new_job_id() -> String {
    format!("{}{}", names::JOB_ID_PREFIX, uuid::Uuid::new_v4().simple())
}

/// Job ids are `ftjob-` and hex: nothing that could walk out of the jobs directory.
pub fn valid_id(id: &str) -> bool {
    id.strip_prefix(names::JOB_ID_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && rest.len() <= 64 && rest.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_are_created_claimed_cancelled_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::under(dir.path());
        let a = store.create("bot", DatasetRef::Feedback, TrainArgs::default(), None, "admin").unwrap();
        let b = store
            .create("bot", DatasetRef::File { path: "x.jsonl".into() }, TrainArgs::default(), Some(0.05), "admin")
            .unwrap();
        assert_eq!(store.list().len(), 2);
        assert_eq!(store.status(&a.id).unwrap().state, JobState::Queued);
        assert!(store.status("../../etc").is_none() && store.status("ftjob-zz").is_none());
        let cancelled = store.cancel(&b.id).unwrap().unwrap();
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert!(store.cancel(&b.id).unwrap().is_err(), "a finished job cannot be cancelled again");
        let (spec, running) = store.claim_next().unwrap();
        assert_eq!((spec.id.as_str(), running.state), (a.id.as_str(), JobState::Running));
        assert!(store.claim_next().is_none(), "nothing else is queued");
        assert!(store.cancel(&a.id).unwrap().is_ok() && store.cancel_requested(&a.id));
        assert!(valid_id(&new_job_id()));
    }

    #[test]
    fn the_loss_curve_skips_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::under(dir.path());
        let job = store.create("bot", DatasetRef::Feedback, TrainArgs::default(), None, "admin").unwrap();
        let path = store.dir(&job.id).join(names::TRAIN_LOG_FILE);
        let mut log = crate::jsonl::Appender::open(&path).unwrap();
        for step in 1..=3 {
            let line = StepLog {
                step,
                total_steps: 3,
                epoch: 1.0,
                loss: 1.0,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens: 1,
                tokens_per_s: 1.0,
                elapsed_s: 1.0,
                val_loss: None,
                reward_accuracy: None,
            };
            log.append(&line, crate::jsonl::Durability::Written).unwrap();
        }
        std::fs::write(&path, [std::fs::read(&path).unwrap(), b"{\"step\": 4, \xff".to_vec()].concat()).unwrap();
        let steps: Vec<usize> = store.log_after(&job.id, 1).iter().map(|s| s.step).collect();
        assert_eq!(steps, [2, 3]);
        assert!(store.log_after("ftjob-0", 0).is_empty(), "no job, no log");
    }
}
