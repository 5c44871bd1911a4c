//! Registry behaviour through its public API, on real files in temp directories.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;
use tempfile::TempDir;

use super::*;
use crate::test_support::{tiny_shape, write_tiny_adapter};
use crate::{BaseModelShape, LoraModule};

fn open(root: &Path) -> Registry {
    Registry::open(root, tiny_shape(), Limits::default()).unwrap()
}

/// A staged adapter for the tiny model; different seeds give different hashes.
fn staged(seed: u32) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_adapter(dir.path(), &tiny_shape(), 2, &[LoraModule::QProj, LoraModule::VProj], seed);
    dir
}

fn register(reg: &Registry, name: &str, seed: u32) -> Manifest {
    reg.register(name, staged(seed).path(), Source::Upload, "tester").unwrap()
}

/// Every path under `root` with file sizes, to compare disk state before and after.
fn disk_listing(root: &Path) -> Vec<(PathBuf, u64)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::metadata(&path).unwrap();
            out.push((path.strip_prefix(base).unwrap().to_path_buf(), if meta.is_dir() { 0 } else { meta.len() }));
            if meta.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn register_numbers_versions_from_one() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    let v1 = register(&reg, "bot", 1);
    let v2 = reg.register("bot", staged(2).path(), Source::Training { job_id: "job-9".into() }, "trainer").unwrap();
    assert_eq!((v1.version, v2.version), (1, 2));
    assert_ne!(v1.sha256, v2.sha256);
    assert_eq!(v2.source, Source::Training { job_id: "job-9".into() });
    assert_eq!((v2.rank, v2.alpha, v2.base_model.as_str()), (2, 4.0, "tiny-llama"));
    assert_eq!(v2.target_modules, vec!["q_proj", "v_proj"]);
    assert_eq!(crate::content_hash(&reg.version_dir("bot", 2)).unwrap(), v2.sha256);
    let on_disk: Manifest =
        serde_json::from_slice(&fs::read(reg.version_dir("bot", 2).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(on_disk, v2);
    let listing = reg.list();
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0].versions.iter().map(|m| m.version).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn register_from_bytes_stores_the_same_content() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    let stage = staged(5);
    let config = fs::read(stage.path().join("adapter_config.json")).unwrap();
    let weights = fs::read(stage.path().join("adapter_model.safetensors")).unwrap();
    let m = reg.register_from_bytes("up", &config, &weights, Source::Upload, "api").unwrap();
    assert_eq!(m.sha256, crate::content_hash(stage.path()).unwrap());
    let err = reg.register_from_bytes("up", &config, b"garbage", Source::Upload, "api").unwrap_err();
    assert_eq!(err.code(), "invalid_adapter");
}

#[test]
fn resolve_by_default_alias_version_and_named_alias() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    register(&reg, "bot", 2);
    assert_eq!(reg.resolve_model("bot").unwrap_err().code(), "alias_not_found");
    reg.set_alias("bot", "prod", 1, None, "ops").unwrap();
    reg.set_alias("bot", "canary", 2, None, "ops").unwrap();
    assert_eq!(reg.resolve_model("bot").unwrap().version, 1);
    assert_eq!(reg.resolve("bot", &Selector::Default).unwrap().version, 1);
    assert_eq!(reg.resolve_model("bot@2").unwrap().version, 2);
    assert_eq!(reg.resolve_model("bot@canary").unwrap().version, 2);
    assert_eq!(reg.resolve_model("bot@9").unwrap_err().code(), "version_not_found");
    assert_eq!(reg.resolve_model("bot@stable").unwrap_err().code(), "alias_not_found");
    assert_eq!(reg.resolve_model("nope").unwrap_err().code(), "adapter_not_found");
    assert_eq!(reg.resolve_model("../etc").unwrap_err().code(), "invalid_name");
}

#[test]
fn held_snapshot_keeps_its_version_while_alias_moves() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    register(&reg, "bot", 2);
    reg.set_alias("bot", "prod", 1, None, "ops").unwrap();
    let held = reg.snapshot();
    reg.set_alias("bot", "prod", 2, None, "ops").unwrap();
    assert_eq!(held.resolve("bot", &Selector::Default).unwrap().version, 1);
    assert_eq!(reg.snapshot().resolve("bot", &Selector::Default).unwrap().version, 2);
}

#[test]
fn promote_and_rollback_walk_the_history() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    for seed in 1..=3 {
        register(&reg, "bot", seed);
    }
    let first = reg.set_alias("bot", "prod", 1, None, "ops").unwrap();
    assert_eq!((first.from, first.to), (None, 1));
    reg.set_alias("bot", "prod", 2, None, "ops").unwrap();
    let change = reg.set_alias("bot", "prod", 3, Some(2), "ops").unwrap();
    assert_eq!((change.from, change.to), (Some(2), 3));
    let state = reg.snapshot().adapter("bot").unwrap().aliases["prod"].clone();
    assert_eq!(state, AliasState { version: 3, history: vec![1, 2], ..AliasState::default() });

    let back = reg.rollback("bot", "prod", "ops").unwrap();
    assert_eq!((back.from, back.to), (Some(3), 2));
    assert_eq!(reg.resolve_model("bot").unwrap().version, 2);
    assert_eq!(reg.rollback("bot", "prod", "ops").unwrap().to, 1);
    let err = reg.rollback("bot", "prod", "ops").unwrap_err();
    assert_eq!(err.code(), "no_rollback_target");
    assert_eq!(reg.resolve_model("bot").unwrap().version, 1);
    assert_eq!(reg.rollback("bot", "canary", "ops").unwrap_err().code(), "alias_not_found");
}

#[test]
fn promoting_to_the_current_version_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    reg.set_alias("bot", "prod", 1, None, "ops").unwrap();
    let audit_len = reg.audit(0, 100).unwrap().len();
    let change = reg.set_alias("bot", "prod", 1, Some(1), "ops").unwrap();
    assert_eq!((change.from, change.to), (Some(1), 1));
    assert!(reg.snapshot().adapter("bot").unwrap().aliases["prod"].history.is_empty());
    assert_eq!(reg.audit(0, 100).unwrap().len(), audit_len);
}

#[test]
fn rollback_skips_deleted_versions() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    for seed in 1..=3 {
        register(&reg, "bot", seed);
    }
    for v in 1..=3 {
        reg.set_alias("bot", "prod", v, None, "ops").unwrap();
    }
    reg.delete_version("bot", 2, "ops").unwrap();
    assert_eq!(reg.rollback("bot", "prod", "ops").unwrap().to, 1);
}

#[test]
fn compare_and_set_conflict_names_the_current_version() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    register(&reg, "bot", 2);
    reg.set_alias("bot", "prod", 1, None, "ops").unwrap();
    let err = reg.set_alias("bot", "prod", 2, Some(3), "ops").unwrap_err();
    assert_eq!(err.code(), "alias_conflict");
    assert!(err.to_string().contains("points to version 1"), "{err}");
    assert_eq!(reg.resolve_model("bot").unwrap().version, 1);
    let err = reg.set_alias("bot", "canary", 2, Some(1), "ops").unwrap_err();
    assert!(matches!(err, AdapterError::AliasConflict { current: None, .. }), "{err:?}");
    assert_eq!(reg.set_alias("bot", "prod", 7, None, "ops").unwrap_err().code(), "version_not_found");
    assert_eq!(reg.set_alias("bot", "prod", 2, Some(1), "ops").unwrap().to, 2);
}

#[test]
fn delete_is_refused_while_aliased_then_allowed() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    register(&reg, "bot", 2);
    reg.set_alias("bot", "prod", 1, None, "ops").unwrap();
    reg.set_alias("bot", "canary", 1, None, "ops").unwrap();
    let err = reg.delete_version("bot", 1, "ops").unwrap_err();
    assert_eq!(err.code(), "version_in_use");
    assert!(matches!(&err, AdapterError::VersionInUse { aliases, .. } if aliases == &["canary", "prod"]), "{err:?}");
    assert!(reg.version_dir("bot", 1).is_dir());

    reg.set_alias("bot", "prod", 2, None, "ops").unwrap();
    reg.set_alias("bot", "canary", 2, None, "ops").unwrap();
    let deleted = reg.delete_version("bot", 1, "ops").unwrap();
    assert_eq!(deleted.version, 1);
    assert!(!reg.version_dir("bot", 1).exists());
    assert_eq!(reg.resolve_model("bot@1").unwrap_err().code(), "version_not_found");
    assert_eq!(reg.delete_version("bot", 1, "ops").unwrap_err().code(), "version_not_found");
    assert!(!root.path().join(".trash").read_dir().unwrap().any(|_| true), "trash is emptied");
}

#[test]
fn version_numbers_are_not_reused_after_delete() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    register(&reg, "bot", 2);
    reg.delete_version("bot", 2, "ops").unwrap();
    assert_eq!(register(&reg, "bot", 3).version, 3);
    reg.delete_version("bot", 3, "ops").unwrap();
    reg.delete_version("bot", 1, "ops").unwrap();
    drop(reg);
    let reg = open(root.path());
    assert!(reg.snapshot().adapter("bot").unwrap().versions.is_empty());
    assert_eq!(register(&reg, "bot", 4).version, 4);
}

#[test]
fn failed_registration_leaves_disk_and_snapshot_unchanged() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    let disk_before = disk_listing(root.path());
    let list_before = reg.list();

    // Invalid: an adapter shaped for another base model.
    let wrong = tempfile::tempdir().unwrap();
    write_tiny_adapter(wrong.path(), &BaseModelShape::smollm2_135m(), 2, &[LoraModule::QProj], 1);
    let err = reg.register("bot", wrong.path(), Source::Upload, "t").unwrap_err();
    assert_eq!(err.code(), "invalid_adapter");
    let err = reg.register("fresh", wrong.path(), Source::Upload, "t").unwrap_err();
    assert_eq!(err.code(), "invalid_adapter");
    assert_eq!(disk_listing(root.path()), disk_before);
    assert_eq!(reg.list(), list_before);

    // Valid, but the target directory is occupied: fails after staging, and must clean up.
    let occupied = reg.version_dir("bot", 2);
    fs::write(&occupied, b"not ours").unwrap();
    let disk_before = disk_listing(root.path());
    let err = reg.register("bot", staged(2).path(), Source::Upload, "t").unwrap_err();
    assert_eq!(err.code(), "registry_corrupt");
    assert_eq!(fs::read(&occupied).unwrap(), b"not ours");
    assert_eq!(disk_listing(root.path()), disk_before);
    assert_eq!(reg.list(), list_before);
    assert_eq!(reg.audit(0, 10).unwrap().len(), 1, "only the first registration is audited");
}

#[test]
fn reopen_keeps_versions_aliases_history_and_metrics() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    register(&reg, "bot", 2);
    register(&reg, "other", 3);
    reg.set_alias("bot", "prod", 1, None, "ops").unwrap();
    reg.set_alias("bot", "prod", 2, None, "ops").unwrap();
    reg.update_manifest_metrics("bot", 2, Some(json!({"parent": 1})), Some(json!({"loss": 0.5}))).unwrap();
    let before = reg.list();
    drop(reg);

    let reg = open(root.path());
    assert_eq!(reg.list(), before);
    assert_eq!(reg.snapshot().adapter("bot").unwrap().aliases["prod"].history, vec![1]);
    assert_eq!(reg.resolve_model("bot").unwrap().metrics, json!({"loss": 0.5}));
    assert_eq!(register(&reg, "bot", 4).version, 3);
}

#[test]
fn metrics_update_leaves_files_and_hash_alone() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    let m = register(&reg, "bot", 1);
    let weights = fs::read(reg.version_dir("bot", 1).join("adapter_model.safetensors")).unwrap();
    let updated = reg.update_manifest_metrics("bot", 1, None, Some(json!({"win_rate": 0.6}))).unwrap();
    assert_eq!(updated.sha256, m.sha256);
    assert_eq!(updated.lineage, serde_json::Value::Null);
    assert_eq!(fs::read(reg.version_dir("bot", 1).join("adapter_model.safetensors")).unwrap(), weights);
    reg.verify_version("bot", 1).unwrap();
    assert_eq!(reg.update_manifest_metrics("bot", 9, None, None).unwrap_err().code(), "version_not_found");
}

#[test]
fn verify_detects_tampered_files() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    let config = reg.version_dir("bot", 1).join("adapter_config.json");
    let mut bytes = fs::read(&config).unwrap();
    bytes.push(b' ');
    fs::write(&config, bytes).unwrap();
    assert_eq!(reg.verify_version("bot", 1).unwrap_err().code(), "registry_corrupt");
}

#[test]
fn audit_is_newest_first_and_paginates() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    register(&reg, "bot", 2);
    reg.set_alias("bot", "prod", 1, None, "alice").unwrap();
    reg.set_alias("bot", "prod", 2, None, "bob").unwrap();
    reg.rollback("bot", "prod", "carol").unwrap();
    reg.delete_version("bot", 2, "dave").unwrap();

    let page = reg.audit(0, 2).unwrap();
    assert_eq!(page.iter().map(|r| r.action).collect::<Vec<_>>(), vec![AuditAction::Delete, AuditAction::Rollback]);
    assert_eq!((page[0].actor.as_str(), page[0].version), ("dave", Some(2)));
    assert_eq!((page[1].from, page[1].to, page[1].alias.as_deref()), (Some(2), Some(1), Some("prod")));
    let page = reg.audit(2, 2).unwrap();
    assert_eq!(page.iter().map(|r| r.actor.as_str()).collect::<Vec<_>>(), vec!["bob", "alice"]);
    assert_eq!((page[0].from, page[0].to), (Some(1), Some(2)));
    let page = reg.audit(4, 10).unwrap();
    assert_eq!(
        page.iter().map(|r| (r.action, r.version)).collect::<Vec<_>>(),
        vec![(AuditAction::Register, Some(2)), (AuditAction::Register, Some(1))]
    );
    assert!(reg.audit(6, 10).unwrap().is_empty());

    // A torn last line (crash mid-append) is skipped, not fatal.
    let mut f = fs::OpenOptions::new().append(true).open(root.path().join("audit.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, b"{\"ts\":1,\"act").unwrap();
    assert_eq!(reg.audit(0, 100).unwrap().len(), 6);
    register(&reg, "bot", 3);
    let all = reg.audit(0, 100).unwrap();
    assert_eq!((all.len(), all[0].action, all[0].version), (7, AuditAction::Register, Some(3)));
}

#[test]
fn invalid_names_are_rejected_before_touching_disk() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    let before = disk_listing(root.path());
    let stage = staged(2);
    for bad in ["../x", "a/b", "A@1", "", "bot@2"] {
        let err = reg.register(bad, stage.path(), Source::Upload, "t").unwrap_err();
        assert_eq!(err.code(), "invalid_name", "{bad}");
    }
    for bad_alias in ["7", "Prod", "../x", "a/b"] {
        let err = reg.set_alias("bot", bad_alias, 1, None, "t").unwrap_err();
        assert_eq!(err.code(), "invalid_name", "{bad_alias}");
    }
    assert_eq!(disk_listing(root.path()), before);
}

#[test]
fn reload_picks_up_another_writer_and_ignores_temp_dirs() {
    let root = tempfile::tempdir().unwrap();
    let writer = open(root.path());
    let reader = open(root.path());
    register(&writer, "bot", 1);
    writer.set_alias("bot", "prod", 1, None, "ops").unwrap();
    assert_eq!(reader.resolve_model("bot").unwrap_err().code(), "adapter_not_found");

    // Half-finished work from a crashed writer must not appear or break loading.
    fs::create_dir_all(writer.version_dir("bot", 1).with_file_name(".tmp-2-crashed")).unwrap();
    fs::create_dir_all(root.path().join("adapters").join(".tmp-upload")).unwrap();
    reader.reload().unwrap();
    assert_eq!(reader.resolve_model("bot").unwrap().version, 1);
    assert_eq!(reader.list(), writer.list());
}

#[test]
fn alias_pointing_at_a_missing_version_fails_open() {
    let root = tempfile::tempdir().unwrap();
    let reg = open(root.path());
    register(&reg, "bot", 1);
    reg.set_alias("bot", "prod", 1, None, "ops").unwrap();
    drop(reg);
    let aliases = root.path().join("adapters/bot/aliases.json");
    fs::write(&aliases, br#"{"prod": {"version": 5, "history": []}}"#).unwrap();
    let err = Registry::open(root.path(), tiny_shape(), Limits::default()).err().unwrap();
    assert_eq!(err.code(), "registry_corrupt");
    assert!(err.to_string().contains("version 5"), "{err}");
}

/// Two registries opened on one root stand for two processes: their changes serialise on the
/// file lock, each starts from the other's latest state, and the result verifies.
#[test]
fn two_writers_on_one_root_never_collide() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (open(root.path()), open(root.path()));
    let first = register(&a, "bot", 0);
    a.set_alias("bot", "prod", first.version, None, "ops").unwrap();
    let staged: Vec<TempDir> = (0..4).map(staged).collect();
    std::thread::scope(|s| {
        for (t, reg) in [&a, &b, &a, &b].into_iter().enumerate() {
            let staged = &staged;
            s.spawn(move || {
                for i in 0..10 {
                    let m = reg.register("bot", staged[(t + i) % 4].path(), Source::Upload, "t").unwrap();
                    // Compare-and-set against this writer's view, which may be stale: either it
                    // moves from exactly that version or it reports the version it found.
                    let seen = reg.snapshot().adapter("bot").unwrap().aliases["prod"].version;
                    match reg.set_alias("bot", "prod", m.version, Some(seen), "t") {
                        Ok(change) => assert_eq!(change.from, Some(seen)),
                        Err(AdapterError::AliasConflict { current, .. }) => assert_ne!(current, Some(seen)),
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    assert_eq!(verify(root.path()).unwrap(), Vec::<String>::new());
    let on_disk = read_snapshot(root.path()).unwrap();
    let entry = on_disk.adapter("bot").unwrap();
    assert_eq!(entry.versions.keys().copied().collect::<Vec<_>>(), (1..=41).collect::<Vec<_>>());
    assert_eq!(entry.next_version, 42);
    let audit = a.audit(0, 1000).unwrap();
    assert_eq!(audit.iter().filter(|r| r.action == AuditAction::Register).count(), 41);
    // Moves of prod chain: each starts where the one before it ended.
    let moves: Vec<&AuditRecord> = audit.iter().rev().filter(|r| r.alias.as_deref() == Some("prod")).collect();
    for pair in moves.windows(2) {
        assert_eq!(pair[1].from, pair[0].to);
    }
    // Each process catches up by polling the generation counter.
    for reg in [&a, &b] {
        reg.reload_if_changed().unwrap();
        assert_eq!(reg.list(), on_disk.listing());
        assert!(!reg.reload_if_changed().unwrap(), "nothing changed since");
    }
}

/// A process that only reads never creates files in the registry.
#[test]
fn reading_a_snapshot_writes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nothing-here");
    assert!(read_snapshot(&missing).unwrap().listing().is_empty());
    assert!(!missing.exists());
    let reg = open(root.path());
    register(&reg, "bot", 1);
    let before = disk_listing(root.path());
    assert_eq!(read_snapshot(root.path()).unwrap().listing(), reg.list());
    assert_eq!(disk_listing(root.path()), before);
}
