//! Recommender tests on real files: hand-made 8-dimensional clusters (shoes near e1, coffee
//! near e2) keep every ranking deterministic.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;

const NOW: u64 = 1_700_000_000;
const DAY: u64 = 86_400;
const DIM: usize = 8;
const T: &str = "acme";

/// A unit vector along `main`, tilted a little towards `wobble`.
fn unit(main: usize, wobble: usize) -> Vec<f32> {
    let mut v = [0.0; DIM];
    v[main] = 1.0;
    v[wobble] += 0.2;
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

const CATALOGUE: [(&str, &str, usize, usize); 6] = [
    ("shoe-a", "Trail running shoe", 0, 2),
    ("shoe-b", "Road running shoe", 0, 3),
    ("shoe-c", "Lightweight racing flat", 0, 4),
    ("coffee-a", "Ethiopian single-origin beans", 1, 5),
    ("coffee-b", "Espresso blend, dark roast", 1, 6),
    ("coffee-c", "Cold brew pouches", 1, 7),
];

fn catalogue(r: &Recommender, tenant: &str) {
    for (id, text, main, wobble) in CATALOGUE {
        r.upsert_item(tenant, id, text, json!({"cluster": main}), unit(main, wobble), NOW - 10 * DAY).unwrap();
    }
}

fn fresh() -> (tempfile::TempDir, Recommender) {
    let dir = tempfile::tempdir().unwrap();
    let r = Recommender::open(dir.path(), DIM).unwrap();
    catalogue(&r, T);
    (dir, r)
}

fn event(r: &Recommender, tenant: &str, user: &str, item: &str, name: &str, at: u64) -> Event {
    let new = NewEvent { user: user.into(), item: item.into(), event: name.into(), weight: None, at: Some(at) };
    r.record_event(tenant, new, NOW).unwrap()
}

fn query(user: &str, k: usize) -> Query {
    Query { user: user.into(), k, candidates: None, exclude_seen: false, diversity: 0.0, now: NOW }
}

fn unseen(user: &str, k: usize) -> Query {
    Query { exclude_seen: true, ..query(user, k) }
}

fn ids(rec: &Recommendation) -> Vec<&str> {
    rec.items.iter().map(|r| r.id.as_str()).collect()
}

fn tenant_dir(root: &Path, tenant: &str) -> PathBuf {
    root.join(tenant.bytes().map(|b| format!("{b:02x}")).collect::<String>())
}

#[test]
fn a_shoe_buyer_gets_an_unseen_shoe_first() {
    let (_dir, r) = fresh();
    event(&r, T, "u1", "shoe-a", "purchase", NOW - DAY);
    event(&r, T, "u1", "shoe-b", "purchase", NOW - DAY);
    let rec = r.recommend(T, &unseen("u1", 3)).unwrap();
    assert_eq!(ids(&rec), ["shoe-c", "coffee-a", "coffee-b"]);
    assert!(!rec.cold_start);
    assert_eq!(rec.history, ["shoe-a", "shoe-b"]);
    let top = &rec.items[0];
    assert!(top.similarity.unwrap() > 0.9, "{top:?}");
    assert_eq!(rec.items[1].similarity, Some(0.0), "orthogonal items are not similar");
    assert!(top.reason.starts_with("similar to \"") && top.reason.ends_with("running shoe\" you purchased"), "{top:?}");
    assert!(top.reason.ends_with("you purchased"), "shoe-c was bought by nobody, so it is not popular: {top:?}");
    assert!(rec.items[1].reason == "popular right now" || rec.items[1].reason == "new item", "{:?}", rec.items[1]);

    let seen = r.recommend(T, &query("u1", 2)).unwrap();
    assert_eq!(ids(&seen), ["shoe-a", "shoe-b"], "without exclude_seen the bought shoes rank too");
    assert!(seen.items[0].reason.ends_with(", popular right now"), "{:?}", seen.items[0]);
}

#[test]
fn a_new_event_changes_the_next_recommendation_at_once() {
    let (_dir, r) = fresh();
    event(&r, T, "u1", "shoe-a", "purchase", NOW - 30 * DAY);
    event(&r, T, "u1", "shoe-b", "purchase", NOW - 30 * DAY);
    assert_eq!(ids(&r.recommend(T, &unseen("u1", 1)).unwrap()), ["shoe-c"]);

    event(&r, T, "u1", "coffee-a", "purchase", NOW - 60);
    let rec = r.recommend(T, &unseen("u1", 3)).unwrap();
    assert_eq!(ids(&rec), ["coffee-b", "coffee-c", "shoe-c"], "the fresh coffee purchase outweighs month-old shoes");
    assert_eq!(rec.history[0], "coffee-a");
    assert!(rec.items[0].reason.contains("Ethiopian single-origin beans"), "{:?}", rec.items[0]);
}

#[test]
fn a_cold_start_gets_the_most_popular_item_first() {
    let (_dir, r) = fresh();
    let empty = r.recommend(T, &query("nobody", 6)).unwrap();
    assert!(empty.cold_start && empty.history.is_empty());
    assert!(empty.items.iter().all(|i| i.reason == "new item (no history for you yet)" && i.popularity == 0.0));

    event(&r, T, "u2", "coffee-b", "purchase", NOW - DAY);
    event(&r, T, "u3", "coffee-b", "view", NOW - DAY);
    event(&r, T, "u2", "shoe-a", "view", NOW - DAY);
    let rec = r.recommend(T, &query("newcomer", 6)).unwrap();
    assert!(rec.cold_start);
    assert!(rec.history.is_empty());
    assert_eq!(ids(&rec)[..2], ["coffee-b", "shoe-a"]);
    let top = &rec.items[0];
    assert_eq!((top.popularity, top.similarity), (1.0, None));
    assert_eq!(top.reason, "popular with other users (no history for you yet)");
    assert_eq!(rec.items[5].reason, "new item (no history for you yet)");
}

#[test]
fn candidates_restrict_the_output() {
    let (_dir, r) = fresh();
    event(&r, T, "u1", "shoe-a", "purchase", NOW - DAY);
    let only =
        Query { candidates: Some(vec!["coffee-a".into(), "shoe-c".into(), "coffee-a".into()]), ..query("u1", 10) };
    assert_eq!(ids(&r.recommend(T, &only).unwrap()), ["shoe-c", "coffee-a"]);
    let seen_only = Query { candidates: Some(vec!["shoe-a".into()]), ..unseen("u1", 10) };
    assert!(r.recommend(T, &seen_only).unwrap().items.is_empty());
}

#[test]
fn diversity_interleaves_the_clusters() {
    let (_dir, r) = fresh();
    event(&r, T, "u1", "shoe-a", "purchase", NOW - DAY);
    event(&r, T, "u1", "coffee-a", "view", NOW - DAY);
    let plain = r.recommend(T, &unseen("u1", 4)).unwrap();
    let cluster = |rec: &Recommendation| rec.items.iter().map(|i| i.id[..4].to_owned()).collect::<Vec<_>>();
    assert_eq!(cluster(&plain), ["shoe", "shoe", "coff", "coff"]);
    let diverse = r.recommend(T, &Query { diversity: 0.9, ..unseen("u1", 4) }).unwrap();
    assert_eq!(cluster(&diverse), ["shoe", "coff", "shoe", "coff"]);
    assert_eq!(diverse.items[0], plain.items[0], "the best item still comes first");
}

#[test]
fn tenants_never_see_each_other() {
    let (dir, r) = fresh();
    let odd = "../globex/ünïcode";
    r.upsert_item(odd, "shoe-a", "A different shoe", serde_json::Value::Null, unit(1, 2), NOW).unwrap();
    r.upsert_item(odd, "only-here", "Tea", serde_json::Value::Null, unit(0, 3), NOW).unwrap();
    event(&r, T, "u1", "shoe-a", "purchase", NOW - DAY);

    assert_eq!((r.item_count(T), r.item_count(odd), r.item_count("initech")), (6, 2, 0));
    assert_eq!(r.get_item(odd, "shoe-a").unwrap().text, "A different shoe");
    assert!(matches!(r.get_item(T, "only-here"), Err(RecommendError::NotFound { .. })));
    let other = r.recommend(odd, &query("u1", 5)).unwrap();
    assert!(other.cold_start, "u1's events live in acme");
    assert!(other.items.iter().all(|i| i.popularity == 0.0));
    let leak = Query { candidates: Some(vec!["coffee-a".into()]), ..query("u1", 5) };
    let err = r.recommend(odd, &leak).unwrap_err();
    assert!(matches!(err, RecommendError::Invalid { param: "candidates", .. }), "{err}");

    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names.len(), 2);
    assert!(names.iter().all(|n| n.bytes().all(|b| b.is_ascii_hexdigit())), "{names:?}");
    assert!(tenant_dir(dir.path(), odd).join("items.jsonl").is_file());
}

#[test]
fn rejected_input_stores_nothing() {
    let (dir, r) = fresh();
    event(&r, T, "u1", "shoe-a", "purchase", NOW - DAY);
    let files = |d: &Path| {
        let t = tenant_dir(d, T);
        (std::fs::read(t.join("items.jsonl")).unwrap(), std::fs::read(t.join("events.jsonl")).unwrap())
    };
    let before = files(dir.path());
    let before_rec = r.recommend(T, &query("u1", 6)).unwrap();

    let new = |item: &str, name: &str, weight: Option<f32>, at: Option<u64>| NewEvent {
        user: "u1".into(),
        item: item.into(),
        event: name.into(),
        weight,
        at,
    };
    let err = r.record_event(T, new("ghost", "view", None, None), NOW).unwrap_err();
    assert_eq!((err.code(), err.to_string()), ("not_found", "item 'ghost' not found".to_string()));
    for (bad, param) in [
        (new("shoe-a", "view", Some(0.0), None), "weight"),
        (new("shoe-a", "view", Some(-1.0), None), "weight"),
        (new("shoe-a", "view", Some(f32::NAN), None), "weight"),
        (new("shoe-a", "view", Some(100.5), None), "weight"),
        (new("shoe-a", "bookmark", None, None), "weight"),
        (new("shoe-a", "Buy!", Some(1.0), None), "event"),
        (new("shoe-a", "view", None, Some(NOW + 301)), "at"),
        (NewEvent { user: String::new(), ..new("shoe-a", "view", None, None) }, "user"),
    ] {
        let err = r.record_event(T, bad.clone(), NOW).unwrap_err();
        assert!(matches!(err, RecommendError::Invalid { param: p, .. } if p == param), "{bad:?}: {err}");
        assert_eq!(err.code(), "invalid_value");
    }
    let unknown = Query { candidates: Some(vec!["shoe-b".into(), "nope".into(), "nada".into()]), ..query("u1", 3) };
    let err = r.recommend(T, &unknown).unwrap_err();
    assert!(matches!(&err, RecommendError::Invalid { param: "candidates", message } if message.contains("'nope'")));
    for bad in [Query { k: 0, ..query("u1", 1) }, Query { diversity: 1.5, ..query("u1", 1) }] {
        assert_eq!(r.recommend(T, &bad).unwrap_err().code(), "invalid_value");
    }

    let item = |id: &str, text: &str, meta: serde_json::Value, v: Vec<f32>| r.upsert_item(T, id, text, meta, v, NOW);
    for (result, param) in [
        (item("shoe-a", "x", json!({}), vec![1.0; 7]), "vector"),
        (item("shoe-a", "x", json!({}), vec![f32::INFINITY; DIM]), "vector"),
        (item("shoe-a", "x", json!({}), vec![0.0; DIM]), "vector"),
        (item("shoe-a", "x", json!([1]), unit(0, 1)), "metadata"),
        (item("shoe-a", "  \n", json!({}), unit(0, 1)), "text"),
        (item("shoe-a", &"x".repeat(32 * 1024 + 1), json!({}), unit(0, 1)), "text"),
        (item("bad\nid", "x", json!({}), unit(0, 1)), "id"),
        (item(&"x".repeat(257), "x", json!({}), unit(0, 1)), "id"),
    ] {
        assert!(matches!(result, Err(RecommendError::Invalid { param: p, .. }) if p == param), "{param}: {result:?}");
    }
    let err = r.record_event("no-such-tenant", new("shoe-a", "view", None, None), NOW).unwrap_err();
    assert_eq!(err.code(), "not_found");
    assert!(!tenant_dir(dir.path(), "no-such-tenant").exists());

    assert_eq!(files(dir.path()), before);
    assert_eq!(r.recommend(T, &query("u1", 6)).unwrap(), before_rec);
    let reopened = Recommender::open(dir.path(), DIM).unwrap();
    assert_eq!(reopened.recommend(T, &query("u1", 6)).unwrap(), before_rec);
}

#[test]
fn a_reopened_store_sees_items_and_events() {
    let (dir, r) = fresh();
    event(&r, T, "u1", "shoe-a", "purchase", NOW - DAY);
    event(&r, T, "u2", "coffee-c", "like", NOW - 2 * DAY);
    let custom =
        NewEvent { user: "u1".into(), item: "coffee-a".into(), event: "wishlist".into(), weight: Some(0.5), at: None };
    assert_eq!(r.record_event(T, custom, NOW).unwrap().at, NOW);
    let before = r.recommend(T, &unseen("u1", 4)).unwrap();
    let item = r.get_item(T, "shoe-b").unwrap();
    drop(r);

    let r = Recommender::open(dir.path(), DIM).unwrap();
    assert_eq!(r.item_count(T), 6);
    assert_eq!(r.get_item(T, "shoe-b").unwrap(), item);
    assert_eq!(r.recommend(T, &unseen("u1", 4)).unwrap(), before);
    assert_eq!(before.history, ["shoe-a", "coffee-a"]);
    assert!(!r.refresh().unwrap(), "nothing changed since open");
}

#[test]
fn upserting_an_item_again_keeps_created_and_replaces_the_rest() {
    let (dir, r) = fresh();
    event(&r, T, "u1", "shoe-a", "purchase", NOW - DAY);
    let (item, new) = r.upsert_item(T, "coffee-c", "Trail shoe, green", json!({"v": 2}), unit(0, 7), NOW).unwrap();
    assert!(!new);
    assert_eq!((item.created, item.updated), (NOW - 10 * DAY, NOW));
    assert_eq!(r.get_item(T, "coffee-c").unwrap(), item);
    assert_eq!(r.item_count(T), 6);
    let rec = r.recommend(T, &unseen("u1", 3)).unwrap();
    assert!(ids(&rec)[..3].contains(&"coffee-c"), "the new vector sits among the shoes: {rec:?}");
    let r = Recommender::open(dir.path(), DIM).unwrap();
    assert_eq!(r.get_item(T, "coffee-c").unwrap(), item);
}

#[test]
fn an_event_through_one_instance_shows_in_another_after_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let a = Recommender::open(dir.path(), DIM).unwrap();
    let b = Recommender::open(dir.path(), DIM).unwrap();
    catalogue(&a, T);
    assert!(b.refresh().unwrap());
    assert!(!b.refresh().unwrap(), "a second look finds nothing new");
    assert_eq!(b.item_count(T), 6);

    event(&a, T, "u1", "shoe-a", "purchase", NOW - DAY);
    assert!(b.recommend(T, &query("u1", 3)).unwrap().cold_start, "b has not looked yet");
    assert!(b.refresh().unwrap());
    let from_b = b.recommend(T, &unseen("u1", 3)).unwrap();
    assert_eq!(from_b, a.recommend(T, &unseen("u1", 3)).unwrap());
    assert_eq!(from_b.items[0].id, "shoe-b");

    // Writes from both sides interleave; each instance counts every event exactly once.
    event(&b, T, "u1", "coffee-a", "purchase", NOW - 10);
    event(&a, T, "u2", "coffee-b", "purchase", NOW - 5);
    event(&b, T, "u3", "coffee-b", "view", NOW);
    assert!(a.refresh().unwrap(), "a has not read u3's view yet");
    assert!(!b.refresh().unwrap(), "b read a's event back with its own");
    for q in [unseen("u1", 6), query("u2", 6), query("newcomer", 6)] {
        assert_eq!(a.recommend(T, &q).unwrap(), b.recommend(T, &q).unwrap(), "{q:?}");
    }
    let c = Recommender::open(dir.path(), DIM).unwrap();
    assert_eq!(c.recommend(T, &query("newcomer", 6)).unwrap(), a.recommend(T, &query("newcomer", 6)).unwrap());
}

#[test]
fn a_torn_last_line_in_events_is_skipped() {
    let (dir, r) = fresh();
    event(&r, T, "u1", "shoe-a", "purchase", NOW - DAY);
    let before = r.recommend(T, &unseen("u1", 6)).unwrap();
    drop(r);
    let events = tenant_dir(dir.path(), T).join("events.jsonl");
    let mut file = std::fs::OpenOptions::new().append(true).open(&events).unwrap();
    file.write_all(b"{\"user\":\"u1\",\"item\":\"coffee-a\",\"event\":\"purch").unwrap();
    drop(file);

    let r = Recommender::open(dir.path(), DIM).unwrap();
    assert_eq!(r.recommend(T, &unseen("u1", 6)).unwrap(), before);
    event(&r, T, "u1", "coffee-b", "view", NOW);
    let after = r.recommend(T, &unseen("u1", 6)).unwrap();
    assert_eq!(after.history, ["shoe-a", "coffee-b"], "the new event counts, the torn one does not");
    assert!(ids(&after).contains(&"coffee-a"));
    let reopened = Recommender::open(dir.path(), DIM).unwrap();
    assert_eq!(reopened.recommend(T, &unseen("u1", 6)).unwrap(), after);
}

#[test]
fn an_event_read_before_its_item_counts_once_the_item_arrives() {
    let (dir, r) = fresh();
    let line = serde_json::to_string(&Event {
        user: "u9".into(),
        item: "late".into(),
        event: "purchase".into(),
        weight: 5.0,
        at: NOW - DAY,
    })
    .unwrap();
    let events = tenant_dir(dir.path(), T).join("events.jsonl");
    std::fs::write(&events, format!("{line}\n")).unwrap();
    assert!(r.refresh().unwrap());
    assert!(r.recommend(T, &query("u9", 1)).unwrap().cold_start, "the item is not known yet");
    r.upsert_item(T, "late", "Arrived late", serde_json::Value::Null, unit(2, 3), NOW).unwrap();
    let rec = r.recommend(T, &query("newcomer", 1)).unwrap();
    assert_eq!((rec.items[0].id.as_str(), rec.items[0].popularity), ("late", 1.0));
    assert_eq!(r.recommend(T, &query("u9", 1)).unwrap().history, ["late"]);
}

#[test]
fn reasons_cut_long_texts_and_name_the_event() {
    let (_dir, r) = fresh();
    let long = format!("Waterproof\nhiking boot {}", "with extra grip ".repeat(10));
    r.upsert_item(T, "boot", &long, serde_json::Value::Null, unit(0, 5), NOW).unwrap();
    let custom =
        NewEvent { user: "u1".into(), item: "boot".into(), event: "bookmark".into(), weight: Some(2.0), at: None };
    r.record_event(T, custom, NOW).unwrap();
    let rec = r.recommend(T, &unseen("u1", 1)).unwrap();
    let reason = &rec.items[0].reason;
    let quoted = reason.split('"').nth(1).unwrap();
    assert_eq!(quoted.chars().count(), 60);
    assert!(quoted.starts_with("Waterproof hiking boot with") && quoted.ends_with('…'), "{reason}");
    assert!(reason.ends_with("\" you interacted with"), "{reason}");
    assert_eq!(
        [default_weight("view"), default_weight("purchase"), default_weight("bookmark")],
        [Some(1.0), Some(5.0), None]
    );
}

#[test]
fn old_histories_do_not_underflow() {
    let (_dir, r) = fresh();
    event(&r, T, "u1", "coffee-a", "view", 1_000);
    let rec = r.recommend(T, &unseen("u1", 1)).unwrap();
    assert!(!rec.cold_start);
    assert_eq!(rec.items[0].id, "coffee-b");
    assert!(rec.items.iter().all(|i| i.score.is_finite() && i.popularity.is_finite()));

    // Years between two events move the popularity anchor; nothing overflows or goes NaN.
    event(&r, T, "u2", "coffee-c", "purchase", NOW - DAY);
    let cold = r.recommend(T, &query("newcomer", 6)).unwrap();
    assert_eq!((cold.items[0].id.as_str(), cold.items[0].popularity), ("coffee-c", 1.0));
    let coffee_a = cold.items.iter().find(|i| i.id == "coffee-a").unwrap();
    assert_eq!(coffee_a.popularity, 0.0, "a view decades ago has decayed away");
}

#[test]
fn the_recommender_can_be_shared_between_threads() {
    fn shared<T: Send + Sync>(_: &T) {}
    let (dir, r) = fresh();
    shared(&r);
    std::thread::scope(|s| {
        for n in 0..4 {
            let r = &r;
            s.spawn(move || event(r, T, &format!("u{n}"), "shoe-a", "view", NOW));
        }
    });
    let rec = r.recommend(T, &query("newcomer", 1)).unwrap();
    assert_eq!(rec.items[0].id, "shoe-a");
    let reopened = Recommender::open(dir.path(), DIM).unwrap();
    assert_eq!(reopened.recommend(T, &query("newcomer", 6)).unwrap(), r.recommend(T, &query("newcomer", 6)).unwrap());
}
