//! Safe releases over HTTP: a weighted split is sticky per user and says which version served,
//! a release rolls a worse candidate back and promotes a better one on simulated feedback with
//! the evidence in the audit log, and a shadow rule logs a second answer without touching the
//! served one.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{client, metric_with, Server};
use futures::StreamExt;
use serde_json::{json, Value};

const TOKEN: &str = "release-admin-token";
const HEADER: &str = "x-switchyard-served-version";
const WORDS: [&str; 12] = ["the", "cat", "dog", "sat", "on", "mat", "red", "blue", "green", "hello", "world", "what"];

struct Setup {
    _root: tempfile::TempDir,
    server: Server,
    data: PathBuf,
}

/// A tiny model, versions 1 and 3 of `bot` with B = 0 (they answer as the base does) and
/// version 2 with large random weights (it answers differently), `prod` on version 1.
async fn setup(extra: &[&str]) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    let shape = runtime::testing::write_tiny_llama_with_head(&model, 3, 2.0).unwrap();
    let imports = root.path().join("imports");
    runtime::testing::write_random_adapter(&imports.join("v1"), &shape, 4, 11, true).unwrap();
    runtime::testing::write_random_adapter(&imports.join("v2"), &shape, 8, 12, false).unwrap();
    runtime::testing::write_random_adapter(&imports.join("v3"), &shape, 4, 13, true).unwrap();
    let data = root.path().join("data");
    let mut args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--data-dir",
        &data.display().to_string(),
        "--admin-token",
        TOKEN,
        "--import-root",
        &imports.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let server = Server::start_raw(&args);
    for v in ["v1", "v2", "v3"] {
        let (status, body) =
            admin(&server, reqwest::Method::POST, "/admin/adapters/bot/versions", Some(json!({"path": v}))).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, _) =
        admin(&server, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", Some(json!({"version": 1}))).await;
    assert_eq!(status, 200);
    Setup { _root: root, server, data }
}

async fn admin(server: &Server, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, server.url(path)).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

fn prompt(i: usize) -> String {
    (0..5).map(|k| WORDS[(i * 7 + k * 5 + i / 3 + k * k) % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

/// One completion of prompt `i`, sampled with seed `i` (the tiny model's greedy answer is the
/// same word whatever the weights; a seeded sample depends on the whole distribution, so it
/// shows which weights answered): (served version header, response id, text).
async fn complete(server: &Server, model: &str, user: &str, i: usize) -> (String, String, String) {
    let body = json!({"model": model, "prompt": prompt(i), "max_tokens": 6, "temperature": 1.5, "seed": i,
        "ignore_eos": true, "user": user});
    let res = client().post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let served = res.headers()[HEADER].to_str().unwrap().to_owned();
    let v: Value = res.json().await.unwrap();
    (served, v["id"].as_str().unwrap().to_owned(), v["choices"][0]["text"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_weighted_split_is_sticky_per_user_and_names_the_served_version() {
    let s = setup(&[]).await;
    let server = &s.server;
    let split = json!({"routes": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}], "expected_version": 1});
    let (status, change) =
        admin(server, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", Some(split.clone())).await;
    assert_eq!(status, 200, "{change}");
    assert_eq!((change["from"].as_u64(), change["to"].as_u64()), (Some(1), Some(1)));
    let (_, shown) = admin(server, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(shown["aliases"]["prod"]["routes"], split["routes"], "{shown}");

    // 1,000 requests from 200 users, 16 at a time.
    let served: Vec<(usize, String)> = futures::stream::iter(0..1000)
        .map(|i| async move {
            let user = format!("user-{}", i % 200);
            (i % 200, complete(server, "bot", &user, i).await.0)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut per_user: HashMap<usize, Vec<String>> = HashMap::new();
    for (user, version) in &served {
        per_user.entry(*user).or_default().push(version.clone());
    }
    assert_eq!(per_user.len(), 200);
    assert!(per_user.values().all(|v| v.iter().all(|x| x == &v[0])), "every user keeps one version");
    let on_candidate = served.iter().filter(|(_, v)| v == "bot@2").count();
    let share = on_candidate as f64 / served.len() as f64;
    eprintln!("90/10 split: {on_candidate} of 1000 requests ({share:.3}) served by bot@2");
    assert!((0.05..=0.15).contains(&share), "about 10% from the candidate, got {share}");
    assert!(served.iter().all(|(_, v)| v == "bot@1" || v == "bot@2"));

    // Raising the candidate's weight only moves users towards it.
    let was_on_2: Vec<usize> = per_user.iter().filter(|(_, v)| v[0] == "bot@2").map(|(u, _)| *u).collect();
    let half = json!({"routes": [{"version": 1, "weight": 50}, {"version": 2, "weight": 50}]});
    assert_eq!(admin(server, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", Some(half)).await.0, 200);
    for u in &was_on_2 {
        assert_eq!(complete(server, "bot", &format!("user-{u}"), 0).await.0, "bot@2");
    }

    // Streamed answers carry the header too; so does the base model's.
    let res = client()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "bot", "user": format!("user-{}", was_on_2[0]), "stream": true, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()[HEADER], "bot@2");
    let _ = res.text().await.unwrap();
    let base = complete(server, "tiny-llama", "anyone", 0).await.0;
    assert_eq!(base, "tiny-llama");

    // Metrics and the completion log carry the served version.
    let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metric_with(&page, "switchyard_completion_tokens_total", &[("adapter", "bot@2")]).unwrap() > 0.0);
    assert!(metric_with(&page, "switchyard_time_to_first_token_seconds_count", &[("adapter", "bot@1")]).unwrap() > 0.0);
    let log = std::fs::read_to_string(s.data.join("feedback/completions-0.jsonl")).unwrap();
    assert!(log.lines().any(|l| l.contains(r#""adapter":"bot@2""#)));

    // Bad splits get 400s and 404s naming the problem; compare-and-set still guards.
    let bad = [
        (json!({"routes": [{"version": 1, "weight": 0}]}), 400, "weight above 0"),
        (json!({"routes": [{"version": 1, "weight": 5}, {"version": 1, "weight": 5}]}), 400, "twice"),
        (json!({"routes": [{"version": 1, "weight": 5}, {"version": 9, "weight": 5}]}), 404, "version 9"),
        (json!({"version": 1, "routes": [{"version": 1, "weight": 5}]}), 400, "either"),
        (json!({}), 400, "either"),
        (json!({"routes": [{"version": 1, "weight": 5, "share": 2}]}), 400, "share"),
        (json!({"routes": [{"version": 2, "weight": 1}], "expected_version": 7}), 409, "version 7"),
    ];
    for (body, status, needle) in bad {
        let (got, err) =
            admin(server, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", Some(body.clone())).await;
        assert_eq!(got, status, "{body} -> {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(needle), "{body} -> {err}");
    }
    // A routed version cannot be deleted; the audit log has the split.
    let (status, err) = admin(server, reqwest::Method::DELETE, "/admin/adapters/bot/versions/2", None).await;
    assert_eq!(status, 409, "{err}");
    let (_, audit) = admin(server, reqwest::Method::GET, "/admin/audit", None).await;
    let route = audit["data"].as_array().unwrap().iter().find(|r| r["action"] == "route").unwrap();
    assert_eq!(route["routes"][1], json!({"version": 2, "weight": 50}), "{route}");
    assert_eq!(route["actor"], "bootstrap-admin");

    // Rollback of a split alias returns to its last plain version.
    let (status, back) = admin(server, reqwest::Method::POST, "/admin/adapters/bot/aliases/prod/rollback", None).await;
    assert_eq!(status, 200, "{back}");
    let (_, shown) = admin(server, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(shown["aliases"]["prod"]["version"], 1);
    assert!(shown["aliases"]["prod"].get("routes").is_none(), "{shown}");
}

/// Sends requests from fresh users and answers each with feedback: thumbs up when the answer is
/// the base model's (the right one), else thumbs down with the right answer as a correction.
/// Stops when the release ends; returns its last state.
async fn drive_release(server: &Server, expected: &[String], round: usize) -> Value {
    for batch in 0..60 {
        futures::stream::iter(0..16)
            .map(|k| async move {
                let i = batch * 16 + k;
                let user = format!("r{round}-user-{i}");
                let (_, id, text) = complete(server, "bot", &user, i % expected.len()).await;
                let right = &expected[i % expected.len()];
                let feedback = if &text == right {
                    json!({"response_id": id, "thumbs": "up"})
                } else {
                    json!({"response_id": id, "thumbs": "down", "correction": right})
                };
                let res = client().post(server.url("/v1/feedback")).json(&feedback).send().await.unwrap();
                assert_eq!(res.status(), 201);
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
        let (_, releases) = admin(server, reqwest::Method::GET, "/admin/adapters/bot/releases", None).await;
        let release = releases["data"][0].clone();
        if release["status"] != "running" {
            return release;
        }
        // The controller judges every 100 ms; give it a tick before more traffic.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    panic!("the release did not finish");
}

#[tokio::test]
async fn releases_roll_back_a_worse_candidate_and_promote_a_better_one() {
    let s = setup(&["--release-tick-ms", "100"]).await;
    let server = &s.server;
    let mut expected = Vec::new();
    let mut differs = 0;
    for i in 0..24 {
        let right = complete(server, "tiny-llama", "probe", i).await.2;
        differs += usize::from(complete(server, "bot@2", "probe", i).await.2 != right);
        expected.push(right);
    }
    assert!(differs >= 12, "version 2 answers differently on {differs} of 24 prompts");

    let policy = json!({"candidate": 2, "steps": [20, 50, 100], "step_seconds": 0, "min_samples": 15});
    let (status, started) =
        admin(server, reqwest::Method::POST, "/admin/adapters/bot/releases", Some(policy.clone())).await;
    assert_eq!(status, 201, "{started}");
    assert_eq!((started["alias"].as_str(), started["weight"].as_u64()), (Some("prod"), Some(20)));
    // A second release on the same alias is refused while this one runs.
    let (status, err) = admin(server, reqwest::Method::POST, "/admin/adapters/bot/releases", Some(policy)).await;
    assert_eq!((status, err["error"]["code"].as_str()), (409, Some("release_state")));

    let ended = drive_release(server, &expected, 1).await;
    assert_eq!(ended["status"], "rolled_back", "{ended}");
    let (_, shown) = admin(server, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(shown["aliases"]["prod"]["version"], 1);
    assert!(shown["aliases"]["prod"].get("routes").is_none());
    let (_, audit) = admin(server, reqwest::Method::GET, "/admin/audit?limit=100", None).await;
    let rolled = audit["data"].as_array().unwrap().iter().find(|r| r["detail"]["event"] == "rolled_back").unwrap();
    let cand = &rolled["detail"]["evidence"]["candidate"]["evidence"];
    let base = &rolled["detail"]["evidence"]["baseline"]["evidence"];
    eprintln!("rolled back: {}", rolled["detail"]);
    assert!(cand["judged"].as_u64().unwrap() >= 15 && base["judged"].as_u64().unwrap() >= 15, "{rolled}");
    assert!(cand["good"].as_u64().unwrap() * 2 < cand["judged"].as_u64().unwrap(), "{rolled}");
    assert_eq!(rolled["actor"], "release-controller");
    assert!(rolled["detail"]["why"].as_str().unwrap().contains("below the baseline"), "{rolled}");

    // The better candidate answers right as often as the baseline: it steps up and is promoted.
    let policy = json!({"candidate": 3, "steps": [20, 50, 100], "step_seconds": 0, "min_samples": 15});
    assert_eq!(admin(server, reqwest::Method::POST, "/admin/adapters/bot/releases", Some(policy)).await.0, 201);
    let ended = drive_release(server, &expected, 2).await;
    assert_eq!(ended["status"], "promoted", "{ended}");
    let (_, shown) = admin(server, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(shown["aliases"]["prod"]["version"], 3);
    let (_, audit) = admin(server, reqwest::Method::GET, "/admin/audit?limit=100", None).await;
    let events: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["detail"]["candidate"] == 3)
        .filter_map(|r| r["detail"]["event"].as_str())
        .collect();
    assert_eq!(events, ["promoted", "step", "started"], "newest first");
    assert_eq!(complete(server, "bot", "anyone", 0).await.0, "bot@3");

    // Pause holds a release; a manual move always wins over it.
    let policy = json!({"candidate": 1, "steps": [10, 100], "step_seconds": 0, "min_samples": 1});
    assert_eq!(admin(server, reqwest::Method::POST, "/admin/adapters/bot/releases", Some(policy)).await.0, 201);
    let (status, paused) = admin(server, reqwest::Method::POST, "/admin/adapters/bot/releases/prod/pause", None).await;
    assert_eq!((status, paused["status"].as_str()), (200, Some("paused")), "{paused}");
    let (status, moved) = admin(
        server,
        reqwest::Method::PUT,
        "/admin/adapters/bot/aliases/prod",
        Some(json!({"version": 3, "expected_version": 3})),
    )
    .await;
    assert_eq!(status, 200, "{moved}");
    let (_, releases) = admin(server, reqwest::Method::GET, "/admin/adapters/bot/releases", None).await;
    assert_eq!(releases["data"][0]["status"], "overridden", "{releases}");
    let (status, err) = admin(server, reqwest::Method::POST, "/admin/adapters/bot/releases/prod/resume", None).await;
    assert_eq!((status, err["error"]["code"].as_str()), (409, Some("release_state")));

    // Bad policies name the field.
    for (body, needle) in [
        (json!({"candidate": 2, "steps": [50, 20, 100]}), "steps"),
        (json!({"candidate": 2, "steps": [20, 50]}), "100"),
        (json!({"candidate": 2, "confidence": 2}), "confidence"),
        (json!({"candidate": 2, "min_samples": 0}), "min_samples"),
        (json!({"candidate": 2, "speed": 1}), "speed"),
    ] {
        let (status, err) =
            admin(server, reqwest::Method::POST, "/admin/adapters/bot/releases", Some(body.clone())).await;
        assert_eq!(status, 400, "{body} -> {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(needle), "{body} -> {err}");
    }
    let (status, _) =
        admin(server, reqwest::Method::POST, "/admin/adapters/bot/releases", Some(json!({"candidate": 9}))).await;
    assert_eq!(status, 404);
}

fn p50(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Sends requests 0..n with fixed request ids; returns (texts, seconds each).
async fn timed_answers(server: &Server, n: usize, tag: &str) -> (Vec<String>, Vec<f64>) {
    let (mut texts, mut secs) = (Vec::new(), Vec::new());
    for i in 0..n {
        let body = json!({"model": "bot", "prompt": prompt(i), "max_tokens": 8, "temperature": 1.5, "seed": i,
            "ignore_eos": true});
        let t = std::time::Instant::now();
        let res = client()
            .post(server.url("/v1/completions"))
            .header("x-request-id", format!("{tag}-{i}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let v: Value = res.json().await.unwrap();
        secs.push(t.elapsed().as_secs_f64());
        texts.push(v["choices"][0]["text"].as_str().unwrap().to_owned());
    }
    (texts, secs)
}

#[tokio::test]
async fn a_shadow_rule_logs_a_second_answer_and_changes_nothing_served() {
    let s = setup(&[]).await;
    let server = &s.server;
    let (plain, plain_secs) = timed_answers(server, 40, "warm").await;
    let (plain, plain_secs) = {
        let again = timed_answers(server, 40, "plain").await;
        assert_eq!(again.0, plain);
        (again.0, [plain_secs, again.1].concat())
    };
    let (status, alias) = admin(
        server,
        reqwest::Method::PUT,
        "/admin/adapters/bot/aliases/prod/shadow",
        Some(json!({"version": 2, "share": 0.5})),
    )
    .await;
    assert_eq!(status, 200, "{alias}");
    assert_eq!(alias["shadow"], json!({"version": 2, "share": 0.5}));
    let (shadowed, shadowed_secs) = timed_answers(server, 40, "shadowed").await;
    assert_eq!(shadowed, plain, "the served answers do not change");
    let (more, more_secs) = timed_answers(server, 40, "shadowed-again").await;
    assert_eq!(more, plain);
    let shadowed_secs = [shadowed_secs, more_secs].concat();
    eprintln!(
        "served latency p50 without a shadow {:.2} ms, with one {:.2} ms",
        p50(plain_secs) * 1e3,
        p50(shadowed_secs) * 1e3
    );

    // The log fills in the background; wait for every sampled pair.
    let sampled = (0..40)
        .flat_map(|i| [format!("shadowed-{i}"), format!("shadowed-again-{i}")])
        .filter(|id| {
            let rule = adapters::ShadowRule { version: 2, share: 0.5 };
            let point = adapters::registry::sticky_hash("shadow:bot@1", id) as f64 / u64::MAX as f64;
            point < rule.share
        })
        .count();
    assert!((20..=60).contains(&sampled), "{sampled} of 80 sampled");
    let mut report = Value::Null;
    for _ in 0..100 {
        report = admin(server, reqwest::Method::GET, "/admin/adapters/bot/shadow?records=100", None).await.1;
        if report["rules"][0]["compared"].as_u64() == Some(sampled as u64) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let rule = &report["rules"][0];
    assert_eq!(rule["compared"].as_u64(), Some(sampled as u64), "{report}");
    assert_eq!((rule["served"].as_str(), rule["shadow"].as_str()), (Some("bot@1"), Some("bot@2")));
    eprintln!("shadow report: {rule}");
    let records = report["records"].as_array().unwrap();
    for r in records {
        let i = plain.iter().position(|p| p == r["served_answer"].as_str().unwrap());
        assert!(i.is_some(), "the logged served answer is one the client got: {r}");
        assert_eq!(r["exact"], r["served_answer"] == r["shadow_answer"]);
    }
    // Each shadow answer is what version 2 answers on its own.
    let direct: Vec<String> = {
        let mut out = Vec::new();
        for i in 0..40 {
            let body = json!({"model": "bot@2", "prompt": prompt(i), "max_tokens": 8, "temperature": 1.5, "seed": i,
                "ignore_eos": true});
            let v: Value =
                client().post(server.url("/v1/completions")).json(&body).send().await.unwrap().json().await.unwrap();
            out.push(v["choices"][0]["text"].as_str().unwrap().to_owned());
        }
        out
    };
    assert!(records.iter().all(|r| direct.contains(&r["shadow_answer"].as_str().unwrap().to_owned())));
    assert!(rule["exact_match_rate"].as_f64().unwrap() < 0.5, "version 2 mostly disagrees: {rule}");

    // Removing the rule stops the mirroring; bad rules are refused.
    let (status, alias) = admin(server, reqwest::Method::DELETE, "/admin/adapters/bot/aliases/prod/shadow", None).await;
    assert_eq!(status, 200);
    assert!(alias.get("shadow").is_none(), "{alias}");
    for (body, status) in [
        (json!({"version": 2, "share": 0}), 400),
        (json!({"version": 2, "share": 1.5}), 400),
        (json!({"version": 9, "share": 0.5}), 404),
        (json!({"version": 2}), 400),
    ] {
        let got =
            admin(server, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod/shadow", Some(body.clone())).await;
        assert_eq!(got.0, status, "{body} -> {}", got.1);
    }
    let path: &Path = &s.data;
    assert!(path.join("shadow/bot.jsonl").is_file());
}
