//! The store through its public API, on real directories: isolation, durability, replicas.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;
use crate::chunk::{chunk, ChunkOptions};

const D: usize = 8;

/// A stand-in embedding: words hashed into D buckets, normalised.
fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0.0f32; D];
    for word in text.split_whitespace() {
        let word = word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();
        let h = word.bytes().fold(7usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        v[h % D] += 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        v[0] = 1.0;
        return v;
    }
    v.into_iter().map(|x| x / norm).collect()
}

fn add(kbs: &KnowledgeBases, tenant: &str, kb: &str, title: &str, text: &str) -> Result<DocInfo, KnowledgeError> {
    let chunks = chunk(text, &ChunkOptions { target_chars: 60, overlap_chars: 20 });
    let vectors = chunks.iter().map(|c| embed(&c.text)).collect();
    let doc = NewDocument {
        title: title.to_owned(),
        text: text.to_owned(),
        source: Some(format!("{title}.md")),
        format: Format::Markdown,
        metadata: serde_json::json!({"team": "ops"}),
    };
    kbs.add_document(tenant, kb, doc, chunks, vectors)
}

fn search(kbs: &KnowledgeBases, tenant: &str, kb: &str, query: &str) -> Vec<Hit> {
    kbs.search(tenant, kb, query, &embed(query), 5).unwrap()
}

fn is_not_found(r: Result<impl std::fmt::Debug, KnowledgeError>, expected: &str) -> bool {
    matches!(r, Err(KnowledgeError::NotFound { what, .. }) if what == expected)
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out.sort();
    out
}

fn age(path: &Path) {
    let old = SystemTime::now() - Duration::from_secs(3600);
    fs::File::open(path).unwrap().set_modified(old).unwrap();
}

const MANUAL: &str = "# Boilers\nThe boiler pressure must stay under two bar. Bleed the radiators each autumn.\n\
                      # Fuses\nThe fuse box is in the garage. Replace a blown fuse with the same rating.";

#[test]
fn the_store_can_be_shared_between_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<KnowledgeBases>();
}

#[test]
fn knowledge_bases_are_created_listed_and_deleted_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
    let first = kbs.create("acme", "Handbook").unwrap();
    let second = kbs.create("acme", "Policies").unwrap();
    let other = kbs.create("globex", "Secret plans").unwrap();
    assert!(disk::is_id(&first.id, "kb_"));
    assert_eq!((first.name.as_str(), first.tenant.as_str(), first.documents, first.chunks), ("Handbook", "acme", 0, 0));
    let names: Vec<String> = kbs.list("acme").into_iter().map(|kb| kb.name).collect();
    assert_eq!(names, ["Handbook", "Policies"], "oldest first");
    assert_eq!(kbs.get("acme", &first.id).unwrap(), first);

    // Another tenant's knowledge base is indistinguishable from a missing one.
    assert!(is_not_found(kbs.get("acme", &other.id), "knowledge base"));
    assert!(is_not_found(kbs.delete("acme", &other.id), "knowledge base"));
    assert!(is_not_found(add(&kbs, "acme", &other.id, "t", "text"), "knowledge base"));
    assert!(is_not_found(kbs.list_documents("acme", &other.id), "knowledge base"));
    assert!(is_not_found(kbs.search("acme", &other.id, "plans", &embed("plans"), 3), "knowledge base"));
    assert!(is_not_found(kbs.get("acme", "kb_00000000000000000000000000000000"), "knowledge base"));
    assert!(is_not_found(kbs.get("acme", "../../etc"), "knowledge base"));

    kbs.delete("acme", &first.id).unwrap();
    assert!(is_not_found(kbs.get("acme", &first.id), "knowledge base"));
    assert!(is_not_found(kbs.delete("acme", &first.id), "knowledge base"));
    assert!(!dir.path().join(&first.id).exists());
    assert_eq!(kbs.list("acme"), [second]);
    assert_eq!(kbs.list("globex").len(), 1);
    assert!(kbs.list("nobody").is_empty());
}

#[test]
fn names_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
    for bad in ["", "   ", &"n".repeat(129)] {
        assert!(matches!(kbs.create("t", bad), Err(KnowledgeError::Invalid { param: "name", .. })), "{bad:?}");
    }
    assert!(kbs.create("t", &"é".repeat(128)).is_ok());
    assert_eq!(kbs.list("t").len(), 1);
}

#[test]
fn documents_are_added_listed_searched_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
    let kb = kbs.create("acme", "Handbook").unwrap().id;
    let manual = add(&kbs, "acme", &kb, "House manual", MANUAL).unwrap();
    let notes = add(&kbs, "acme", &kb, "Notes", "Garden hoses go in the shed over winter.").unwrap();
    assert!(disk::is_id(&manual.id, "doc_"));
    assert_eq!(
        (manual.chars, manual.format, manual.knowledge_base.as_str()),
        (MANUAL.chars().count(), Format::Markdown, kb.as_str())
    );
    assert_eq!(manual.metadata, serde_json::json!({"team": "ops"}));
    assert!(manual.chunks >= 2);
    let info = kbs.get("acme", &kb).unwrap();
    assert_eq!((info.documents, info.chunks), (2, manual.chunks + notes.chunks));
    assert_eq!(kbs.list_documents("acme", &kb).unwrap(), [manual.clone(), notes.clone()]);
    assert_eq!(kbs.get_document("acme", &kb, &notes.id).unwrap(), notes);

    let hits = search(&kbs, "acme", &kb, "Where is the fuse box?");
    let top = &hits[0];
    assert_eq!(
        (top.document_id.as_str(), top.title.as_str(), top.heading.as_deref()),
        (manual.id.as_str(), "House manual", Some("Fuses"))
    );
    assert_eq!(&MANUAL[top.start..top.end], top.text);
    assert!(top.text.contains("fuse box") && top.bm25.is_some());

    kbs.delete_document("acme", &kb, &manual.id).unwrap();
    assert!(is_not_found(kbs.get_document("acme", &kb, &manual.id), "document"));
    assert!(is_not_found(kbs.delete_document("acme", &kb, &manual.id), "document"));
    assert!(search(&kbs, "acme", &kb, "fuse box").iter().all(|h| h.document_id == notes.id));
    assert_eq!(kbs.get("acme", &kb).unwrap().chunks, notes.chunks);
    let left: Vec<String> = files_under(&dir.path().join(&kb).join("docs"));
    assert_eq!(left.len(), 2, "only the notes' .json and .vec: {left:?}");
}

#[test]
fn invalid_documents_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
    let kb = kbs.create("acme", "Handbook").unwrap().id;
    let generation = kbs.generation();
    let text = "Some text. More text.";
    let good = chunk(text, &ChunkOptions::default());
    let doc = |title: &str, text: &str| NewDocument {
        title: title.to_owned(),
        text: text.to_owned(),
        source: None,
        format: Format::Text,
        metadata: serde_json::Value::Null,
    };
    let moved = vec![Chunk { start: 1, ..good[0].clone() }];
    type Case<'a> = (&'a str, NewDocument, Vec<Chunk>, Vec<Vec<f32>>);
    let cases: Vec<Case> = vec![
        ("title", doc(" ", text), good.clone(), vec![embed(text)]),
        ("title", doc(&"t".repeat(513), text), good.clone(), vec![embed(text)]),
        ("text", doc("t", " \n"), vec![], vec![]),
        ("text", doc("t", text), vec![], vec![]),
        ("vectors", doc("t", text), good.clone(), vec![]),
        ("vectors", doc("t", text), good.clone(), vec![vec![0.5; D - 1]]),
        ("vectors", doc("t", text), good.clone(), vec![vec![f32::NAN; D]]),
        ("chunks", doc("t", text), moved, vec![embed(text)]),
    ];
    for (param, doc, chunks, vectors) in cases {
        match kbs.add_document("acme", &kb, doc, chunks, vectors) {
            Err(KnowledgeError::Invalid { param: p, .. }) => assert_eq!(p, param),
            other => panic!("expected Invalid({param}), got {other:?}"),
        }
    }
    assert!(files_under(&dir.path().join(&kb).join("docs")).is_empty());
    assert!(kbs.list_documents("acme", &kb).unwrap().is_empty());
    assert_eq!(kbs.generation(), generation, "nothing changed");
    assert!(add(&kbs, "acme", &kb, &"t".repeat(512), text).is_ok());
}

#[test]
fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (kb, doc, before) = {
        let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
        let kb = kbs.create("acme", "Handbook").unwrap();
        let doc = add(&kbs, "acme", &kb.id, "House manual", MANUAL).unwrap();
        let gone = add(&kbs, "acme", &kb.id, "Gone", "Deleted before the restart.").unwrap();
        kbs.delete_document("acme", &kb.id, &gone.id).unwrap();
        let dropped = kbs.create("acme", "Dropped").unwrap();
        kbs.delete("acme", &dropped.id).unwrap();
        (kbs.get("acme", &kb.id).unwrap(), doc, search(&kbs, "acme", &kb.id, "boiler pressure"))
    };
    let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
    assert_eq!(kbs.list("acme"), std::slice::from_ref(&kb));
    assert_eq!(kbs.list_documents("acme", &kb.id).unwrap(), [doc]);
    assert_eq!(search(&kbs, "acme", &kb.id, "boiler pressure"), before);
    assert_eq!(before[0].heading.as_deref(), Some("Boilers"));
}

#[test]
fn a_second_process_sees_changes_after_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let a = KnowledgeBases::open(dir.path(), D).unwrap();
    let b = KnowledgeBases::open(dir.path(), D).unwrap();
    assert!(!b.refresh().unwrap(), "nothing happened yet");

    let generation = b.generation();
    let kb = a.create("acme", "Shared").unwrap();
    assert_ne!(b.generation(), generation);
    assert!(is_not_found(b.get("acme", &kb.id), "knowledge base"));
    assert!(b.refresh().unwrap());
    assert_eq!(b.get("acme", &kb.id).unwrap(), kb);

    let generation = b.generation();
    let doc = add(&a, "acme", &kb.id, "House manual", MANUAL).unwrap();
    assert_ne!(b.generation(), generation);
    assert!(b.refresh().unwrap());
    assert!(!b.refresh().unwrap(), "a second refresh has nothing to do");
    assert_eq!(b.list_documents("acme", &kb.id).unwrap(), std::slice::from_ref(&doc));
    assert_eq!(search(&b, "acme", &kb.id, "fuse box"), search(&a, "acme", &kb.id, "fuse box"));

    // Changes made through B reach A the same way, and B's own refresh finds nothing new.
    let notes = add(&b, "acme", &kb.id, "Notes", "The shed key hangs by the door.").unwrap();
    assert!(!b.refresh().unwrap());
    assert!(a.refresh().unwrap());
    assert_eq!(a.get("acme", &kb.id).unwrap().documents, 2);

    a.delete_document("acme", &kb.id, &doc.id).unwrap();
    assert!(b.refresh().unwrap());
    assert_eq!(b.list_documents("acme", &kb.id).unwrap(), [notes]);
    assert!(search(&b, "acme", &kb.id, "fuse box").iter().all(|h| h.document_id != doc.id));

    a.delete("acme", &kb.id).unwrap();
    assert!(b.refresh().unwrap());
    assert!(is_not_found(b.get("acme", &kb.id), "knowledge base"));
    assert!(b.list("acme").is_empty());
}

#[test]
fn leftovers_of_interrupted_writes_are_removed_once_stale() {
    let dir = tempfile::tempdir().unwrap();
    let (kb, doc) = {
        let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
        let kb = kbs.create("acme", "Handbook").unwrap().id;
        (kb.clone(), add(&kbs, "acme", &kb, "Manual", MANUAL).unwrap())
    };
    let docs = dir.path().join(&kb).join("docs");
    // A crash between the .vec and the .json, a crash mid-write, a crash mid-delete.
    let orphan = docs.join("doc_0123456789abcdef0123456789abcdef.vec");
    let temp = docs.join(".tmp-0123-doc_x.json");
    let half_made_kb = dir.path().join(".tmp-0123");
    let trash = dir.path().join(".trash-0123");
    fs::write(&orphan, [0u8; D * 4]).unwrap();
    fs::write(&temp, b"{\"id\":").unwrap();
    fs::create_dir_all(half_made_kb.join("docs")).unwrap();
    fs::create_dir_all(trash.join("docs")).unwrap();
    // Young ones may be another process's write in progress: they stay.
    let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
    assert!(orphan.exists() && temp.exists() && half_made_kb.exists());
    assert!(!trash.exists(), "trash goes at once");
    for path in [&orphan, &temp, &half_made_kb] {
        age(path);
    }
    drop(kbs);
    let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
    assert!(!orphan.exists() && !temp.exists() && !half_made_kb.exists());
    assert_eq!(kbs.list_documents("acme", &kb).unwrap(), std::slice::from_ref(&doc), "committed documents stay");
    assert!(docs.join(format!("{}.vec", doc.id)).exists());
}

#[test]
fn damaged_files_are_skipped_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let (kb, keep, lose) = {
        let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
        let kb = kbs.create("acme", "Handbook").unwrap().id;
        let keep = add(&kbs, "acme", &kb, "Keep", MANUAL).unwrap();
        let lose = add(&kbs, "acme", &kb, "Lose", "A short note. Another sentence here.").unwrap();
        (kb, keep, lose)
    };
    let docs = dir.path().join(&kb).join("docs");
    fs::write(docs.join(format!("{}.vec", lose.id)), b"short").unwrap();
    fs::write(docs.join("doc_ffffffffffffffffffffffffffffffff.json"), b"{not json").unwrap();
    fs::create_dir_all(dir.path().join("kb_ffffffffffffffffffffffffffffffff")).unwrap();
    let kbs = KnowledgeBases::open(dir.path(), D).unwrap();
    assert_eq!(kbs.list_documents("acme", &kb).unwrap(), [keep]);
    assert_eq!(kbs.list("acme").len(), 1);
    // A different dimension makes every stored vector unusable, not the store.
    let other = KnowledgeBases::open(dir.path(), D * 2).unwrap();
    assert!(other.list_documents("acme", &kb).unwrap().is_empty());
}

#[test]
fn concurrent_writers_and_readers_agree_after_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let a = KnowledgeBases::open(dir.path(), D).unwrap();
    let b = KnowledgeBases::open(dir.path(), D).unwrap();
    let kb = a.create("acme", "Busy").unwrap().id;
    b.refresh().unwrap();
    std::thread::scope(|s| {
        for (n, store) in [&a, &b, &a, &b].into_iter().enumerate() {
            let kb = &kb;
            s.spawn(move || {
                for i in 0..5 {
                    add(store, "acme", kb, &format!("w{n} d{i}"), &format!("Writer {n} wrote note {i}. It is short."))
                        .unwrap();
                    store.refresh().unwrap();
                    search(store, "acme", kb, "note");
                }
            });
        }
    });
    a.refresh().unwrap();
    b.refresh().unwrap();
    let (in_a, in_b) = (a.list_documents("acme", &kb).unwrap(), b.list_documents("acme", &kb).unwrap());
    assert_eq!(in_a.len(), 20);
    assert_eq!(in_a, in_b);
    assert_eq!(a.get("acme", &kb).unwrap(), b.get("acme", &kb).unwrap());
}
