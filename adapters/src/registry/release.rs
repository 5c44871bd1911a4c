//! Releases: a candidate version's weight on an alias stepped up on a schedule, then promoted
//! or rolled back, decided from live evidence by [`decide`] (Wilson score intervals).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model::{AdapterEntry, Route};
use super::routing::arrange;
use crate::error::{AdapterError, Result};

/// How a release proceeds; every field has a default, so `{"candidate": 4}` is a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleasePolicy {
    /// The version being released; the alias's current version is the baseline.
    pub candidate: u64,
    /// The candidate's weight in percent at each step, rising; the last is 100 (promotion).
    #[serde(default = "default_steps")]
    pub steps: Vec<u32>,
    /// The least time a step lasts before the release may move on.
    #[serde(default = "default_step_seconds")]
    pub step_seconds: u64,
    /// Judged answers (feedback) each version needs, and requests for error and latency
    /// checks, before the evidence can decide anything.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// Two-sided confidence of the Wilson intervals compared (0.8 to 0.999).
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// The most the candidate's judged-good rate may fall below the baseline's and still step
    /// up (an absolute share, 0 to 1).
    #[serde(default = "default_max_drop")]
    pub max_drop: f64,
    /// Roll back when the candidate's p95 time to first token exceeds the baseline's by this
    /// factor.
    #[serde(default = "default_max_ttft_ratio")]
    pub max_ttft_ratio: f64,
    /// ... and by at least this many seconds: a few milliseconds of scheduling noise on a
    /// fast model is not a regression.
    #[serde(default = "default_min_ttft_gap_seconds")]
    pub min_ttft_gap_seconds: f64,
}

fn default_steps() -> Vec<u32> {
    vec![5, 25, 50, 100]
}
fn default_step_seconds() -> u64 {
    600
}
fn default_min_samples() -> u64 {
    50
}
fn default_confidence() -> f64 {
    0.95
}
fn default_max_drop() -> f64 {
    0.05
}
fn default_max_ttft_ratio() -> f64 {
    1.5
}
fn default_min_ttft_gap_seconds() -> f64 {
    0.05
}

impl ReleasePolicy {
    /// Checks the policy's numbers; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(AdapterError::InvalidRelease { reason });
        if self.steps.is_empty() || self.steps.len() > 20 {
            return bad("`steps` must hold 1 to 20 weights".into());
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1]) || self.steps[0] == 0 {
            return bad("`steps` must rise strictly from above 0".into());
        }
        if self.steps.last() != Some(&100) {
            return bad("the last of `steps` must be 100 (the candidate serves everyone)".into());
        }
        if self.min_samples == 0 || self.min_samples > 1_000_000 {
            return bad("`min_samples` must be 1 to 1000000".into());
        }
        if !(0.8..=0.999).contains(&self.confidence) {
            return bad("`confidence` must be between 0.8 and 0.999".into());
        }
        if !(0.0..=1.0).contains(&self.max_drop) {
            return bad("`max_drop` must be between 0 and 1".into());
        }
        if !(self.max_ttft_ratio >= 1.0 && self.max_ttft_ratio.is_finite()) {
            return bad("`max_ttft_ratio` must be at least 1".into());
        }
        if !(0.0..=60.0).contains(&self.min_ttft_gap_seconds) {
            return bad("`min_ttft_gap_seconds` must be between 0 and 60".into());
        }
        if self.step_seconds > 30 * 86_400 {
            return bad("`step_seconds` must be at most 30 days".into());
        }
        Ok(())
    }

    /// The normal quantile for the two-sided confidence.
    fn z(&self) -> f64 {
        normal_quantile(1.0 - (1.0 - self.confidence) / 2.0)
    }
}

/// Where a release stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    Running,
    Paused,
    /// The candidate serves everyone.
    Promoted,
    /// The alias is back on the baseline.
    RolledBack,
    /// An admin moved the alias by hand; the release stopped there.
    Overridden,
}

impl ReleaseStatus {
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// One release of a candidate on an alias, as stored beside the adapter (`releases.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub alias: String,
    /// The version the alias served when the release started.
    pub baseline: u64,
    pub policy: ReleasePolicy,
    pub status: ReleaseStatus,
    /// Index into `policy.steps` of the weight serving now.
    pub step: usize,
    /// Unix seconds.
    pub started: u64,
    pub step_started: u64,
    pub updated: u64,
    /// Why the last decision was taken (or why none was), with its evidence.
    #[serde(default)]
    pub last: Value,
}

impl Release {
    /// The candidate's weight in percent at the current step.
    pub fn weight(&self) -> u32 {
        self.policy.steps.get(self.step).copied().unwrap_or(100)
    }
}

/// What one version did since a release started: requests and their errors, and the judged
/// answers from feedback (thumbs, ratings, corrections of labelled answers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub requests: u64,
    pub errors: u64,
    /// Feedback records that say good or bad.
    pub judged: u64,
    pub good: u64,
    pub thumbs_up: u64,
    pub thumbs_down: u64,
    pub ratings: u64,
    pub mean_rating: Option<f64>,
    /// Judged answers a user corrected (a correction counts as a bad answer), and the share
    /// of judged answers that needed none: accuracy against corrections.
    pub corrected: u64,
    pub accuracy: Option<f64>,
    pub ttft_p95_seconds: Option<f64>,
    pub ttft_samples: u64,
}

/// What a release should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Hold(String),
    StepUp(String),
    Promote(String),
    RollBack(String),
}

/// Decides from the evidence of the baseline and the candidate since the release started.
///
/// Each rate gets a Wilson score interval at the policy's confidence. The candidate is rolled
/// back as soon as it is significantly worse: its judged-good interval lies wholly below the
/// baseline's, its error-rate interval wholly above, or its p95 time to first token is over
/// `max_ttft_ratio` times the baseline's (and `min_ttft_gap_seconds` above it). It steps up only after the step's time, with at
/// least `min_samples` judged answers on each side, when it is not significantly worse and
/// its good rate is within `max_drop` of the baseline's; stepping past the last weight is
/// the promotion.
pub fn decide(release: &Release, now: u64, baseline: &Evidence, candidate: &Evidence) -> Decision {
    let p = &release.policy;
    let z = p.z();
    let enough = |e: &Evidence| e.judged >= p.min_samples;
    if enough(baseline) && enough(candidate) {
        let (_, cand_hi) = wilson(candidate.good, candidate.judged, z);
        let (base_lo, _) = wilson(baseline.good, baseline.judged, z);
        if cand_hi < base_lo {
            return Decision::RollBack(format!(
                "judged-good rate {:.3} (interval up to {cand_hi:.3}) is below the baseline's {:.3} (interval from {base_lo:.3})",
                rate(candidate.good, candidate.judged),
                rate(baseline.good, baseline.judged)
            ));
        }
    }
    if baseline.requests >= p.min_samples && candidate.requests >= p.min_samples {
        let (cand_lo, _) = wilson(candidate.errors, candidate.requests, z);
        let (_, base_hi) = wilson(baseline.errors, baseline.requests, z);
        if cand_lo > base_hi {
            return Decision::RollBack(format!(
                "error rate {:.3} (interval from {cand_lo:.3}) is above the baseline's {:.3} (interval up to {base_hi:.3})",
                rate(candidate.errors, candidate.requests),
                rate(baseline.errors, baseline.requests)
            ));
        }
    }
    if baseline.ttft_samples >= p.min_samples && candidate.ttft_samples >= p.min_samples {
        if let (Some(b), Some(c)) = (baseline.ttft_p95_seconds, candidate.ttft_p95_seconds) {
            if c > b * p.max_ttft_ratio && c - b >= p.min_ttft_gap_seconds {
                return Decision::RollBack(format!(
                    "p95 time to first token {c:.3} s is over {} times the baseline's {b:.3} s (and {:.0} ms slower)",
                    p.max_ttft_ratio,
                    (c - b) * 1000.0
                ));
            }
        }
    }
    let waited = now.saturating_sub(release.step_started);
    if waited < p.step_seconds {
        return Decision::Hold(format!("step {} has run {waited} of {} s", release.step, p.step_seconds));
    }
    if !(enough(baseline) && enough(candidate)) {
        return Decision::Hold(format!(
            "waiting for {} judged answers on each version (baseline {}, candidate {})",
            p.min_samples, baseline.judged, candidate.judged
        ));
    }
    let (cand, base) = (rate(candidate.good, candidate.judged), rate(baseline.good, baseline.judged));
    if cand < base - p.max_drop {
        return Decision::Hold(format!(
            "judged-good rate {cand:.3} is more than {} below the baseline's {base:.3}, though not significantly",
            p.max_drop
        ));
    }
    let why = format!("judged-good rate {cand:.3} against the baseline's {base:.3}, not significantly worse");
    // The last step is 100%: reaching it is the promotion.
    if release.step + 2 >= p.steps.len() {
        Decision::Promote(why)
    } else {
        Decision::StepUp(why)
    }
}

/// Starts a release on `alias` of `entry` (the caller validated the policy).
pub(crate) fn start(
    entry: &mut AdapterEntry,
    name: &str,
    alias: &str,
    policy: ReleasePolicy,
    now: u64,
) -> Result<Release> {
    let conflict = |reason: String| Err(AdapterError::ReleaseState { reason });
    if !entry.versions.contains_key(&policy.candidate) {
        return Err(AdapterError::VersionNotFound { name: name.to_owned(), version: policy.candidate });
    }
    let Some(state) = entry.aliases.get(alias) else {
        return Err(AdapterError::AliasNotFound { name: name.to_owned(), alias: alias.to_owned() });
    };
    if entry.releases.get(alias).is_some_and(|r| r.status.is_active()) {
        return conflict(format!("a release is already running on alias {alias:?}; pause it or move the alias first"));
    }
    if !state.routes.is_empty() {
        return conflict(format!("alias {alias:?} is split between versions; point it at one version first"));
    }
    if state.version == policy.candidate {
        return conflict(format!("alias {alias:?} already serves version {}", policy.candidate));
    }
    let release = Release {
        alias: alias.to_owned(),
        baseline: state.version,
        policy,
        status: ReleaseStatus::Running,
        step: 0,
        started: now,
        step_started: now,
        updated: now,
        last: serde_json::json!({"event": "started"}),
    };
    set_weight(entry, &release);
    entry.releases.insert(alias.to_owned(), release.clone());
    Ok(release)
}

/// Pauses or resumes the active release on `alias`.
pub(crate) fn pause(entry: &mut AdapterEntry, alias: &str, paused: bool, now: u64) -> Result<Release> {
    let release =
        entry.releases.get_mut(alias).filter(|r| r.status.is_active()).ok_or_else(|| AdapterError::ReleaseState {
            reason: format!("no release is running on alias {alias:?}"),
        })?;
    release.status = if paused { ReleaseStatus::Paused } else { ReleaseStatus::Running };
    release.updated = now;
    Ok(release.clone())
}

/// Applies `decision` to the release `seen` described, unless it changed since (then `None`).
/// Returns the release afterwards and the audit event's name.
pub(crate) fn advance(
    entry: &mut AdapterEntry,
    seen: &Release,
    decision: &Decision,
    evidence: Value,
    now: u64,
) -> Option<(Release, &'static str)> {
    let current = entry.releases.get(&seen.alias)?;
    if current != seen || current.status != ReleaseStatus::Running {
        return None;
    }
    let mut release = current.clone();
    let (event, why) = match decision {
        Decision::Hold(_) => return None,
        Decision::StepUp(why) => {
            release.step += 1;
            release.step_started = now;
            ("step", why)
        }
        Decision::Promote(why) => {
            release.status = ReleaseStatus::Promoted;
            ("promoted", why)
        }
        Decision::RollBack(why) => {
            release.status = ReleaseStatus::RolledBack;
            ("rolled_back", why)
        }
    };
    release.updated = now;
    release.last = serde_json::json!({"event": event, "why": why, "evidence": evidence});
    let state = entry.aliases.get_mut(&release.alias)?;
    let previous = state.version;
    match release.status {
        ReleaseStatus::Promoted | ReleaseStatus::RolledBack => {
            let to =
                if release.status == ReleaseStatus::Promoted { release.policy.candidate } else { release.baseline };
            if previous != to || !state.routes.is_empty() {
                state.remember(previous);
            }
            state.version = to;
            state.routes.clear();
        }
        _ => set_weight(entry, &release),
    }
    entry.releases.insert(release.alias.clone(), release.clone());
    Some((release, event))
}

/// Marks an active release on `alias` overridden by `actor`; true when there was one.
pub(crate) fn override_active(entry: &mut AdapterEntry, alias: &str, actor: &str, now: u64) -> bool {
    match entry.releases.get_mut(alias) {
        Some(r) if r.status.is_active() => {
            r.status = ReleaseStatus::Overridden;
            r.updated = now;
            r.last = serde_json::json!({"event": "overridden", "by": actor});
            true
        }
        _ => false,
    }
}

/// Splits the release's alias between baseline and candidate at the current step's weight.
fn set_weight(entry: &mut AdapterEntry, release: &Release) {
    let w = release.weight();
    let routes = vec![
        Route { version: release.baseline, weight: 100 - w },
        Route { version: release.policy.candidate, weight: w },
    ];
    // The candidate's weight is above 0 (policies are checked), so there is a heaviest route.
    if let (Some(state), Some((version, routes))) = (entry.aliases.get_mut(&release.alias), arrange(routes)) {
        state.version = version;
        state.routes = routes;
    }
}

fn rate(k: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        k as f64 / n as f64
    }
}

/// The Wilson score interval of `k` successes in `n` trials at normal quantile `z`.
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (n, p) = (n as f64, k as f64 / n as f64);
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// The standard normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] =
        [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(step: usize) -> Release {
        Release {
            alias: "prod".into(),
            baseline: 1,
            policy: ReleasePolicy {
                candidate: 2,
                steps: vec![10, 50, 100],
                step_seconds: 10,
                min_samples: 20,
                confidence: 0.95,
                max_drop: 0.05,
                max_ttft_ratio: 1.5,
                min_ttft_gap_seconds: 0.05,
            },
            status: ReleaseStatus::Running,
            step,
            started: 0,
            step_started: 0,
            updated: 0,
            last: Value::Null,
        }
    }

    fn judged(good: u64, judged: u64) -> Evidence {
        Evidence { requests: judged, judged, good, ..Evidence::default() }
    }

    #[test]
    fn quantiles_and_intervals_match_known_values() {
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-5);
        assert!((normal_quantile(0.995) - 2.575829).abs() < 1e-5);
        assert!((normal_quantile(0.01) + 2.326348).abs() < 1e-5);
        // Wilson's 95% interval for 8 of 10: (0.490, 0.943).
        let (lo, hi) = wilson(8, 10, 1.959964);
        assert!((lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3, "{lo} {hi}");
        assert_eq!(wilson(0, 0, 1.96), (0.0, 1.0));
    }

    #[test]
    fn a_clearly_worse_candidate_is_rolled_back_at_once() {
        let d = decide(&release(0), 1, &judged(28, 30), &judged(3, 25));
        assert!(matches!(d, Decision::RollBack(_)), "{d:?}");
    }

    #[test]
    fn a_good_candidate_waits_for_time_and_samples_then_steps_and_promotes() {
        assert!(matches!(decide(&release(0), 5, &judged(18, 20), &judged(19, 20)), Decision::Hold(_)));
        assert!(matches!(decide(&release(0), 11, &judged(18, 20), &judged(5, 10)), Decision::Hold(_)));
        assert!(matches!(decide(&release(0), 11, &judged(18, 20), &judged(19, 20)), Decision::StepUp(_)));
        assert!(matches!(decide(&release(1), 11, &judged(18, 20), &judged(19, 20)), Decision::Promote(_)));
    }

    #[test]
    fn errors_and_slow_first_tokens_roll_back() {
        let base = Evidence { requests: 100, errors: 1, ..judged(18, 20) };
        let cand = Evidence { requests: 100, errors: 30, ..judged(18, 20) };
        assert!(matches!(decide(&release(0), 11, &base, &cand), Decision::RollBack(r) if r.contains("error rate")));
        let base = Evidence { ttft_samples: 50, ttft_p95_seconds: Some(0.1), ..judged(18, 20) };
        let cand = Evidence { ttft_samples: 50, ttft_p95_seconds: Some(0.2), ..judged(18, 20) };
        assert!(matches!(decide(&release(0), 11, &base, &cand), Decision::RollBack(r) if r.contains("first token")));
        // Twice as slow but only 6 ms slower: noise on a fast model, not a regression.
        let base = Evidence { ttft_samples: 50, ttft_p95_seconds: Some(0.007), ..judged(18, 20) };
        let cand = Evidence { ttft_samples: 50, ttft_p95_seconds: Some(0.013), ..judged(18, 20) };
        assert!(matches!(decide(&release(0), 11, &base, &cand), Decision::StepUp(_)));
    }

    #[test]
    fn policies_are_checked() {
        let mut p = release(0).policy;
        p.validate().unwrap();
        p.steps = vec![10, 5, 100];
        assert_eq!(p.validate().unwrap_err().code(), "invalid_release");
        p.steps = vec![10, 50];
        assert!(p.validate().unwrap_err().to_string().contains("100"));
        let p: ReleasePolicy = serde_json::from_value(serde_json::json!({"candidate": 3})).unwrap();
        assert_eq!((p.steps.len(), p.min_samples), (4, 50));
        p.validate().unwrap();
    }
}
