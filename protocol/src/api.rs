//! The gateway's HTTP bodies that another process reads or sends: the error body every route
//! answers with, and the admin API's registration, listing and alias bodies the sidecar uses.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use adapters::{AliasChange, AliasState, Manifest, Release, ReleasePolicy, Route, ShadowRule};

/// The body of every error answer: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// The multipart parts of `POST /admin/adapters/{name}/versions` besides the two PEFT files
/// (`adapters::peft::CONFIG_FILE`, `adapters::peft::WEIGHTS_FILE`): what a training job adds.
pub const LINEAGE_PART: &str = "lineage.json";
pub const METRICS_PART: &str = "metrics.json";
pub const JOB_ID_PART: &str = "job_id";

/// `POST /admin/adapters/{name}/versions` (201): the version just registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionCreated {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub manifest: Manifest,
}

impl From<Manifest> for VersionCreated {
    fn from(manifest: Manifest) -> Self {
        Self { name: manifest.name.clone(), version: manifest.version, sha256: manifest.sha256.clone(), manifest }
    }
}

/// `GET /admin/adapters/{name}`: one adapter with its versions and aliases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterListing {
    pub name: String,
    pub versions: Vec<Manifest>,
    pub aliases: BTreeMap<String, AliasState>,
    /// Releases by alias (running, paused, or how the last one ended).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub releases: BTreeMap<String, Release>,
}

impl From<adapters::AdapterListing> for AdapterListing {
    fn from(listing: adapters::AdapterListing) -> Self {
        Self { name: listing.name, versions: listing.versions, aliases: listing.aliases, releases: listing.releases }
    }
}

/// `PUT /admin/adapters/{name}/aliases/{alias}`: point the alias at `version`, or split it
/// between `routes` by weight (exactly one of the two); with `expected_version`, only if the
/// alias's version is that now (compare-and-set). Answered with an [`AliasChange`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>, example = json!([{"version": 3, "weight": 90}, {"version": 4, "weight": 10}]))]
    pub routes: Option<Vec<Route>>,
    #[serde(default)]
    pub expected_version: Option<u64>,
}

/// `PUT /admin/adapters/{name}/aliases/{alias}/shadow`: mirror `share` (0 to 1) of the
/// alias's requests to `version`; their answers are logged beside the served ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetShadow {
    pub version: u64,
    pub share: f64,
}

/// `{"object": "list", "data": [...]}`, the shape of every list the admin API answers with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectList<T> {
    /// Always `list`.
    pub object: String,
    pub data: Vec<T>,
}

impl<T> ObjectList<T> {
    pub fn new(data: Vec<T>) -> Self {
        Self { object: "list".into(), data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: u64) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "name": "bot", "version": version, "sha256": "ab", "base_model": "tiny", "created": 1,
            "source": {"kind": "training", "job_id": "ftjob-1"}, "rank": 4, "alpha": 8.0,
            "target_modules": ["q_proj"], "size_bytes": 10, "lineage": {"dataset": {"format": "feedback"}},
        }))
        .unwrap()
    }

    #[test]
    fn the_registry_listing_reads_back_as_the_typed_response() {
        let aliases = BTreeMap::from([(
            "candidate".to_owned(),
            AliasState { version: 2, history: vec![1], ..AliasState::default() },
        )]);
        let listing = adapters::AdapterListing {
            name: "bot".into(),
            versions: vec![manifest(1), manifest(2)],
            aliases,
            releases: Default::default(),
        };
        let wire = serde_json::to_value(&listing).unwrap();
        let typed: AdapterListing = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(typed.aliases["candidate"].version, 2);
        assert_eq!(serde_json::to_value(&typed).unwrap(), wire, "the same fields, both ways");
        assert_eq!(typed, AdapterListing::from(listing));
    }

    #[test]
    fn registration_and_alias_bodies_round_trip() {
        let created = VersionCreated::from(manifest(3));
        let wire = serde_json::to_value(&created).unwrap();
        assert_eq!((wire["name"].as_str(), wire["version"].as_u64()), (Some("bot"), Some(3)));
        assert_eq!(serde_json::from_value::<VersionCreated>(wire).unwrap(), created);
        let set = SetAlias { version: Some(3), routes: None, expected_version: None };
        assert_eq!(serde_json::to_value(&set).unwrap(), serde_json::json!({"version": 3, "expected_version": null}));
        let split: SetAlias = serde_json::from_value(
            serde_json::json!({"routes": [{"version": 3, "weight": 90}, {"version": 4, "weight": 10}]}),
        )
        .unwrap();
        assert_eq!(split.routes.unwrap()[1], Route { version: 4, weight: 10 });
        let change: AliasChange =
            serde_json::from_value(serde_json::json!({"adapter": "bot", "alias": "prod", "from": null, "to": 3}))
                .unwrap();
        assert_eq!((change.from, change.to), (None, 3));
        let err: ErrorResponse = serde_json::from_value(serde_json::json!(
            {"error": {"message": "no", "type": "conflict_error", "param": null, "code": "alias_conflict"}}
        ))
        .unwrap();
        assert_eq!((err.error.kind.as_str(), err.error.code.as_deref()), ("conflict_error", Some("alias_conflict")));
    }
}
