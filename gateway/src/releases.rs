//! Safe releases: the live evidence of every served version (requests, errors, time to first
//! token here; feedback from the feedback store), the controller that steps, promotes or rolls
//! back running releases with it, and the admin routes that start, pause and show them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use adapters::{Decision, Evidence, Release, ReleasePolicy, ReleaseStatus};
use parking_lot::Mutex;
use serde::Deserialize;

use crate::error::ApiError;
use crate::extract::read_json;
#[allow(unused_imports)]
use crate::openai::ErrorResponse;
use crate::state::AppState;
use crate::tasks::now;

/// Requests remembered per version; the oldest go first.
const KEPT_PER_VERSION: usize = 20_000;

/// One finished or failed generation of a version.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: u64,
    ok: bool,
    first_token_seconds: Option<f64>,
}

/// What each version (`name@version`) did lately, in this process.
#[derive(Default)]
pub struct ServedStats {
    versions: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl ServedStats {
    /// Counts one generation of `adapter` (`name@version`; the base is not counted).
    pub fn record(&self, adapter: &str, ok: bool, first_token_seconds: Option<f64>) {
        if adapter.is_empty() {
            return;
        }
        let mut versions = self.versions.lock();
        if !versions.contains_key(adapter) {
            versions.insert(adapter.to_owned(), VecDeque::new());
        }
        let Some(samples) = versions.get_mut(adapter) else { return };
        if samples.len() == KEPT_PER_VERSION {
            samples.pop_front();
        }
        samples.push_back(Sample { at: now(), ok, first_token_seconds });
    }

    /// Requests, errors and the p95 time to first token of `adapter` since `since`.
    fn fill(&self, adapter: &str, since: u64, e: &mut Evidence) {
        let versions = self.versions.lock();
        let Some(samples) = versions.get(adapter) else { return };
        let mut ttft = Vec::new();
        for s in samples.iter().filter(|s| s.at >= since) {
            e.requests += 1;
            e.errors += u64::from(!s.ok);
            ttft.extend(s.first_token_seconds);
        }
        e.ttft_samples = ttft.len() as u64;
        if !ttft.is_empty() {
            ttft.sort_by(f64::total_cmp);
            let rank = ((ttft.len() as f64 * 0.95).ceil() as usize).clamp(1, ttft.len());
            e.ttft_p95_seconds = Some(ttft[rank - 1]);
        }
    }
}

/// The evidence of a release's baseline and candidate since it started: this process's
/// requests, and the feedback every replica stored (read in one pass).
fn evidence(state: &AppState, name: &str, release: &Release) -> (Evidence, Evidence) {
    let labels = [format!("{name}@{}", release.baseline), format!("{name}@{}", release.policy.candidate)];
    let [mut baseline, mut candidate] = state.feedback.tally([&labels[0], &labels[1]], release.started);
    state.metrics.served.fill(&labels[0], release.started, &mut baseline);
    state.metrics.served.fill(&labels[1], release.started, &mut candidate);
    (baseline, candidate)
}

/// Runs every `tick`: decides each running release from its evidence. Decisions are applied
/// through the registry's compare-and-set on the release as read, so replicas that decide at
/// the same moment move it once.
pub(crate) fn spawn_controller(state: Arc<AppState>, tick: Duration) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(registry) = state.registry() else { continue };
            let snapshot = registry.snapshot();
            for name in snapshot.names() {
                let Some(entry) = snapshot.adapter(name) else { continue };
                for release in entry.releases.values().filter(|r| r.status == ReleaseStatus::Running) {
                    let (decision, evidence) = judge(&state, name, release);
                    if matches!(decision, Decision::Hold(_)) {
                        continue;
                    }
                    let (registry, name, seen) = (registry.clone(), name.to_owned(), release.clone());
                    let moved = tokio::task::spawn_blocking(move || {
                        registry
                            .advance_release(&name, &seen, &decision, evidence, "release-controller")
                            .map(|r| (name, r))
                    })
                    .await;
                    match moved {
                        Ok(Ok((name, Some(_)))) => state.announce(&name).await,
                        Ok(Ok((_, None))) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "release decision not applied"),
                        Err(e) => tracing::error!(error = %e, "release decision task failed"),
                    }
                }
            }
        }
    });
}

/// The decision on `release` now, with the evidence it rests on.
fn judge(state: &AppState, name: &str, release: &Release) -> (Decision, serde_json::Value) {
    let (baseline, candidate) = evidence(state, name, release);
    let decision = adapters::registry::release::decide(release, now(), &baseline, &candidate);
    let evidence = serde_json::json!({
        "baseline": {"version": release.baseline, "evidence": baseline},
        "candidate": {"version": release.policy.candidate, "evidence": candidate},
        "test": format!("Wilson score intervals at {} confidence", release.policy.confidence),
    });
    (decision, evidence)
}

/// `POST /admin/adapters/{name}/releases`: the alias to release on (default `prod`) and the
/// policy's fields beside it; only `candidate` is required.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(example = json!({"alias": "prod", "candidate": 4, "steps": [5, 25, 50, 100], "step_seconds": 600, "min_samples": 50, "confidence": 0.95, "max_drop": 0.05, "max_ttft_ratio": 1.5, "min_ttft_gap_seconds": 0.05}))]
pub(crate) struct StartRelease {
    alias: Option<String>,
    candidate: u64,
    steps: Option<Vec<u32>>,
    step_seconds: Option<u64>,
    min_samples: Option<u64>,
    confidence: Option<f64>,
    max_drop: Option<f64>,
    max_ttft_ratio: Option<f64>,
    min_ttft_gap_seconds: Option<f64>,
}

/// The alias and the policy of a start request; unknown fields are refused by name.
fn parse_start(mut body: serde_json::Value) -> Result<(String, ReleasePolicy), ApiError> {
    let alias = match body.as_object_mut().and_then(|o| o.remove("alias")) {
        None => adapters::registry::DEFAULT_ALIAS.to_owned(),
        Some(serde_json::Value::String(a)) => a,
        Some(_) => return Err(ApiError::invalid("`alias` must be a string", Some("alias".into()))),
    };
    let policy: ReleasePolicy =
        serde_json::from_value(body).map_err(|e| ApiError::invalid(e.to_string(), None::<String>))?;
    Ok((alias, policy))
}

/// A release with the decision its evidence supports now.
fn shown(state: &AppState, name: &str, release: &Release) -> serde_json::Value {
    let mut v = serde_json::to_value(release).unwrap_or_default();
    let (decision, evidence) = judge(state, name, release);
    let (verdict, why) = match &decision {
        Decision::Hold(w) => ("hold", w),
        Decision::StepUp(w) => ("step_up", w),
        Decision::Promote(w) => ("promote", w),
        Decision::RollBack(w) => ("roll_back", w),
    };
    v["weight"] = release.weight().into();
    v["now"] = serde_json::json!({"decision": verdict, "why": why, "evidence": evidence});
    v
}

#[utoipa::path(
    operation_id = "start_release",
    post,
    path = "/admin/adapters/{name}/releases",
    tag = "admin",
    params(("name" = String, Path)),
    request_body = StartRelease,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The release, started: the alias now splits between its version and the candidate at the first step's weight", body = Object),
        crate::admin::AdminErrors,
        (status = 409, description = "A release already runs on the alias, the alias is split, or it already serves the candidate", body = ErrorResponse, example = json!({"error": {"message": "a release is already running on alias \"prod\"; pause it or move the alias first", "type": "conflict_error", "param": null, "code": "release_state"}}))
    )
)]
pub(crate) async fn start(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let registry = crate::admin::authorize(&state, &req)?;
    let name = path.into_inner();
    let (alias, policy) = parse_start(read_json(&req, payload, state.body_limit).await?)?;
    let who = crate::extract::caller(&req).sub;
    let n = name.clone();
    let release = web::block(move || registry.start_release(&n, &alias, policy, &who)).await??;
    state.announce(&name).await;
    Ok(HttpResponse::Created().json(shown(&state, &name, &release)))
}

#[utoipa::path(
    operation_id = "list_releases",
    get,
    path = "/admin/adapters/{name}/releases",
    tag = "admin",
    params(("name" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The adapter's releases by alias, each with its policy, step, weight, last decision and the decision its live evidence supports now", body = Object),
        crate::admin::AdminErrors
    )
)]
pub(crate) async fn list(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let registry = crate::admin::authorize(&state, &req)?;
    let name = path.into_inner();
    let snapshot = registry.snapshot();
    let entry = snapshot.adapter(&name).ok_or(adapters::AdapterError::AdapterNotFound { name: name.clone() })?;
    let data: Vec<serde_json::Value> = entry.releases.values().map(|r| shown(&state, &name, r)).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}

#[utoipa::path(
    operation_id = "pause_or_resume_release",
    post,
    path = "/admin/adapters/{name}/releases/{alias}/{action}",
    tag = "admin",
    params(("name" = String, Path), ("alias" = String, Path), ("action" = String, Path, description = "`pause` or `resume`")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The release, paused (its weights hold) or running again", body = Object),
        crate::admin::AdminErrors,
        (status = 409, description = "No release is running on the alias", body = ErrorResponse, example = json!({"error": {"message": "no release is running on alias \"prod\"", "type": "conflict_error", "param": null, "code": "release_state"}}))
    )
)]
pub(crate) async fn pause(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let registry = crate::admin::authorize(&state, &req)?;
    let (name, alias, action) = path.into_inner();
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        _ => return Err(ApiError::NotFound { message: format!("no release action `{action}`: pause or resume") }),
    };
    let who = crate::extract::caller(&req).sub;
    let n = name.clone();
    let release = web::block(move || registry.pause_release(&n, &alias, paused, &who)).await??;
    state.announce(&name).await;
    Ok(HttpResponse::Ok().json(shown(&state, &name, &release)))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/adapters/{name}/releases", web::post().to(start))
        .route("/admin/adapters/{name}/releases", web::get().to(list))
        .route("/admin/adapters/{name}/releases/{alias}/{action}", web::post().to(pause));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_and_errors_count_since_the_release_started() {
        let stats = ServedStats::default();
        for i in 0..100 {
            stats.record("bot@2", i % 10 != 0, Some(f64::from(i) / 100.0));
        }
        stats.record("", false, None);
        let mut e = Evidence::default();
        stats.fill("bot@2", 0, &mut e);
        assert_eq!((e.requests, e.errors, e.ttft_samples), (100, 10, 100));
        assert_eq!(e.ttft_p95_seconds, Some(0.94));
        let mut later = Evidence::default();
        stats.fill("bot@2", now() + 10, &mut later);
        assert_eq!(later.requests, 0);
    }
}
