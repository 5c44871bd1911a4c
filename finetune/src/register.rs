//! Registering a finished job's adapter through the gateway's admin API (the registry's one
//! writer, which also tells every replica), pointing `candidate` at it, and the promotion
//! policy: a candidate that beats `prod` offline by a configured margin starts a release on
//! `prod` (or becomes `prod` when there is none yet).

use std::path::{Path, PathBuf};
use std::time::Duration;

use adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use protocol::api::{AdapterListing, AliasChange, ErrorResponse, SetAlias, VersionCreated};
use protocol::api::{JOB_ID_PART, LINEAGE_PART, METRICS_PART};
use serde::de::DeserializeOwned;

use crate::error::FinetuneError;
use crate::job::JobResult;

/// The gateway's admin API.
pub struct Gateway {
    base: String,
    token: String,
    client: reqwest::blocking::Client,
}

/// What registration did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Registered {
    pub version: u64,
    /// `prod` moved to the candidate (it had no version before).
    pub promoted: bool,
    /// A release of the candidate started on `prod`: live evidence finishes it.
    pub released: bool,
    /// Why the policy did or did not promote.
    pub decision: String,
}

fn reg_err(detail: impl Into<String>) -> FinetuneError {
    FinetuneError::Registry { detail: detail.into() }
}

impl Gateway {
    pub fn new(base: &str, token: &str) -> Result<Self, FinetuneError> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| reg_err(e.to_string()))?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), token: token.to_owned(), client })
    }

    /// The success body as `T`, or the gateway's error message.
    fn read<T: DeserializeOwned>(resp: reqwest::blocking::Response) -> Result<T, FinetuneError> {
        let status = resp.status();
        let body = resp.bytes().map_err(|e| reg_err(format!("the gateway's answer ({status}) broke off: {e}")))?;
        if status.is_success() {
            serde_json::from_slice(&body)
                .map_err(|e| reg_err(format!("the gateway's answer ({status}) is not the expected body: {e}")))
        } else {
            let message = serde_json::from_slice::<ErrorResponse>(&body)
                .map_or_else(|_| String::from_utf8_lossy(&body).into_owned(), |b| b.error.message);
            Err(reg_err(format!("the gateway answered {status}: {message}")))
        }
    }

    /// The version an alias points at, if the adapter and alias exist.
    pub fn alias(&self, name: &str, alias: &str) -> Result<Option<u64>, FinetuneError> {
        let resp = self
            .client
            .get(format!("{}/admin/adapters/{name}", self.base))
            .bearer_auth(&self.token)
            .send()
            .map_err(|e| reg_err(e.to_string()))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let listing: AdapterListing = Self::read(resp)?;
        Ok(listing.aliases.get(alias).map(|a| a.version))
    }

    /// Uploads the adapter with its lineage and metrics as a new version of `name`.
    pub fn upload(&self, name: &str, result: &JobResult, job_id: &str) -> Result<u64, FinetuneError> {
        let read = |f: &str| -> Result<Vec<u8>, FinetuneError> {
            let p = result.adapter_dir.join(f);
            std::fs::read(&p).map_err(|e| FinetuneError::io(&p, e))
        };
        let part =
            |bytes: Vec<u8>, file: &str| reqwest::blocking::multipart::Part::bytes(bytes).file_name(file.to_owned());
        let form = reqwest::blocking::multipart::Form::new()
            .part(CONFIG_FILE, part(read(CONFIG_FILE)?, CONFIG_FILE))
            .part(WEIGHTS_FILE, part(read(WEIGHTS_FILE)?, WEIGHTS_FILE))
            .part(LINEAGE_PART, part(serde_json::to_vec(&result.lineage).unwrap_or_default(), LINEAGE_PART))
            .part(METRICS_PART, part(serde_json::to_vec(&result.metrics).unwrap_or_default(), METRICS_PART))
            .text(JOB_ID_PART, job_id.to_owned());
        let resp = self
            .client
            .post(format!("{}/admin/adapters/{name}/versions", self.base))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .map_err(|e| reg_err(e.to_string()))?;
        Ok(Self::read::<VersionCreated>(resp)?.version)
    }

    /// Points `alias` at `version`; with `expected`, only if it still points there.
    pub fn set_alias(
        &self,
        name: &str,
        alias: &str,
        version: u64,
        expected: Option<u64>,
    ) -> Result<AliasChange, FinetuneError> {
        let resp = self
            .client
            .put(format!("{}/admin/adapters/{name}/aliases/{alias}", self.base))
            .bearer_auth(&self.token)
            .json(&SetAlias { version: Some(version), routes: None, expected_version: expected })
            .send()
            .map_err(|e| reg_err(e.to_string()))?;
        Self::read(resp)
    }

    /// Registers the result, points `candidate` at it, and applies the promotion policy: with
    /// `promote_margin`, `prod` moves to the candidate when it beats the version `prod` served
    /// when the job started (or the base model, when there was none) by the margin — in
    /// accuracy for classification-style data, otherwise in validation loss. `prod` is moved
    /// by compare-and-set, so an admin's promotion meanwhile is never overwritten.
    pub fn register(
        &self,
        name: &str,
        result: &JobResult,
        job_id: &str,
        promote_margin: Option<f64>,
        prod_at_start: Option<u64>,
    ) -> Result<Registered, FinetuneError> {
        let version = self.upload(name, result, job_id)?;
        self.set_alias(name, "candidate", version, None)?;
        let (promote, decision) = decide(result, promote_margin);
        let prod = adapters::registry::DEFAULT_ALIAS;
        match (promote, prod_at_start) {
            (false, _) => Ok(Registered { version, promoted: false, released: false, decision }),
            // Nothing serves yet, so there is no live evidence to wait for.
            (true, None) => {
                self.set_alias(name, prod, version, None)?;
                Ok(Registered { version, promoted: true, released: false, decision })
            }
            // Offline evaluation starts the release; live evidence finishes it. An admin's
            // move meanwhile wins: then no release starts.
            (true, Some(at_start)) => {
                if self.alias(name, prod)? != Some(at_start) {
                    let decision = format!("{decision}; prod moved since the job started, so no release");
                    return Ok(Registered { version, promoted: false, released: false, decision });
                }
                self.start_release(name, prod, version)?;
                Ok(Registered { version, promoted: false, released: true, decision })
            }
        }
    }

    /// Starts a release of `version` on `alias` with the gateway's default policy.
    pub fn start_release(&self, name: &str, alias: &str, version: u64) -> Result<(), FinetuneError> {
        let resp = self
            .client
            .post(format!("{}/admin/adapters/{name}/releases", self.base))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({"alias": alias, "candidate": version}))
            .send()
            .map_err(|e| reg_err(e.to_string()))?;
        Self::read::<serde_json::Value>(resp).map(|_| ())
    }
}

/// Whether the policy promotes, and why.
pub fn decide(result: &JobResult, margin: Option<f64>) -> (bool, String) {
    let Some(margin) = margin else {
        return (false, "no promotion policy: an admin promotes candidates".into());
    };
    let (Some(candidate), Some(incumbent)) = result.candidate_and_incumbent() else {
        return (false, "no held-out evaluation to decide on".into());
    };
    match (candidate.accuracy, incumbent.accuracy) {
        (Some(c), Some(i)) => {
            let ok = c >= i + margin;
            (ok, format!("accuracy {c:.3} vs {} {i:.3} (margin {margin})", incumbent.name))
        }
        _ if candidate.val_loss.is_finite() && incumbent.val_loss.is_finite() => {
            let ok = candidate.val_loss <= incumbent.val_loss - margin;
            (
                ok,
                format!(
                    "validation loss {:.4} vs {} {:.4} (margin {margin})",
                    candidate.val_loss, incumbent.name, incumbent.val_loss
                ),
            )
        }
        _ => (false, "no comparable metric".into()),
    }
}

/// The directory of the version `alias` points at, read from a registry root this process may
/// only read (the gateway's admin API is its one way to write).
pub fn alias_dir(registry_root: &Path, name: &str, alias: &str) -> Option<(u64, PathBuf)> {
    let snapshot = adapters::registry::read_snapshot(registry_root).ok()?;
    let manifest = snapshot.resolve(name, &adapters::Selector::Alias(alias.to_owned())).ok()?;
    Some((manifest.version, adapters::registry::version_path(registry_root, name, manifest.version)))
}
