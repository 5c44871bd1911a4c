//! The console's server side over HTTP: the page and its assets with a strict CSP, sign-in to
//! a session cookie, CSRF on every state change, the labeller role kept off admin routes, and
//! the labelling queues (assignment, double labelling, review, agreement) ending in reviewed
//! feedback. A tiny deterministic model written by the test answers.

mod common;

use common::{client, Server};
use reqwest::header::{COOKIE, SET_COOKIE};
use reqwest::Method;
use serde_json::{json, Value};

const SECRET: &str = "console-test-secret-0123456789abc";
const ADMIN: &str = "console-admin-token";

fn mint(sub: &str, role: &str) -> String {
    common::mint_token(SECRET, sub, "acme", role)
}

fn start(root: &std::path::Path) -> Server {
    let model = root.join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 5).unwrap();
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--data-dir",
        &root.join("data").display().to_string(),
        "--auth",
        "on",
        "--jwt-hs256-secret",
        SECRET,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Server::start_with_env(&args, &[("SWITCHYARD_ADMIN_TOKEN", ADMIN)])
}

/// A signed-in console session: its cookie and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
    info: Value,
}

async fn sign_in(server: &Server, token: &str) -> Result<Session, (u16, Value)> {
    let res = client().post(server.url("/console/session")).json(&json!({"token": token})).send().await.unwrap();
    let status = res.status().as_u16();
    let set = res.headers().get(SET_COOKIE).map(|v| v.to_str().unwrap().to_owned());
    let body: Value = res.json().await.unwrap();
    if status != 200 {
        return Err((status, body));
    }
    let set = set.expect("a session cookie");
    let lower = set.to_ascii_lowercase();
    assert!(lower.contains("httponly") && lower.contains("samesite=strict") && lower.contains("path=/"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    Ok(Session { cookie, csrf: body["csrf"].as_str().unwrap().to_owned(), info: body })
}

/// A request with the session's cookie, and its CSRF header when `csrf`.
async fn call(
    server: &Server,
    s: &Session,
    method: Method,
    path: &str,
    body: Option<Value>,
    csrf: bool,
) -> (u16, Value) {
    let mut req = client().request(method, server.url(path)).header(COOKIE, &s.cookie);
    if csrf {
        req = req.header("x-csrf-token", &s.csrf);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn bearer(server: &Server, token: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, server.url(path)).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_needs_a_session_and_its_csrf_token_and_keeps_labellers_out_of_admin() {
    let root = tempfile::tempdir().unwrap();
    let server = start(root.path());

    // The page and its assets: served to anyone (they hold no data), each with the CSP.
    for path in ["/console", "/console/", "/console/review", "/console/assets/app.js", "/console/assets/app.css"] {
        let res = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let csp = res.headers().get("content-security-policy").expect("CSP").to_str().unwrap().to_owned();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("http"), "nothing inline or from outside: {csp}");
        assert_eq!(res.headers().get("x-frame-options").unwrap(), "DENY");
        assert_eq!(res.headers().get("x-content-type-options").unwrap(), "nosniff");
    }
    let page = client().get(server.url("/console")).send().await.unwrap().text().await.unwrap();
    assert!(!page.contains("<script>") && !page.contains(" style=") && !page.contains("onclick"), "no inline code");
    assert!(!page.contains("http://") && !page.contains("https://"), "nothing loaded from outside");
    let res = client().get(server.url("/console/assets/nope.js")).send().await.unwrap();
    assert_eq!(res.status(), 404);

    // Nothing without signing in.
    let res = client().get(server.url("/console/session")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    for path in ["/admin/adapters", "/admin/feedback", "/admin/metrics", "/v1/labelling/queues"] {
        let res = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
    }
    let res = client().get(server.url("/admin/adapters")).header(COOKIE, "switchyard_session=forged.cookie.value");
    assert_eq!(res.send().await.unwrap().status(), 401, "a forged cookie");

    // Sign-in: bad tokens, a user token, an admin token.
    let (status, err) = sign_in(&server, "not-a-token").await.err().unwrap();
    assert_eq!((status, err["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{err}");
    let (status, err) = sign_in(&server, "").await.err().unwrap();
    assert_eq!(status, 400, "{err}");
    let (status, err) = sign_in(&server, &mint("user-1", "user")).await.err().unwrap();
    assert_eq!(status, 403, "{err}");
    let res =
        client().post(server.url("/console/session")).json(&json!({"token": ADMIN, "extra": 1})).send().await.unwrap();
    assert_eq!(res.status(), 400, "unknown fields are refused");
    let admin = sign_in(&server, ADMIN).await.unwrap();
    assert_eq!(admin.info["role"], "admin");
    let (status, me) = call(&server, &admin, Method::GET, "/console/session", None, false).await;
    assert_eq!((status, me["csrf"].as_str()), (200, Some(admin.csrf.as_str())));

    // Reads need only the cookie; changes need the CSRF token too.
    let (status, _) = call(&server, &admin, Method::GET, "/admin/adapters", None, false).await;
    assert_eq!(status, 200);
    let res = client().get(server.url("/admin/metrics")).header(COOKIE, &admin.cookie).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.text().await.unwrap().contains("switchyard_requests_total"));
    let queue = json!({"rules": "Accept only corrections that are factually right."});
    let (status, err) =
        call(&server, &admin, Method::PUT, "/admin/labelling/queues/triage", Some(queue.clone()), false).await;
    assert_eq!(status, 403, "no state change without the CSRF token: {err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("x-csrf-token"), "{err}");
    let (status, listed) = call(&server, &admin, Method::GET, "/v1/labelling/queues", None, false).await;
    assert_eq!((status, listed["data"].as_array().unwrap().len()), (200, 0), "nothing was created");
    let mut wrong = Session { cookie: admin.cookie.clone(), csrf: "0".repeat(64), info: Value::Null };
    let (status, _) =
        call(&server, &wrong, Method::PUT, "/admin/labelling/queues/triage", Some(queue.clone()), true).await;
    assert_eq!(status, 403, "a wrong CSRF token");
    wrong.csrf = sign_in(&server, ADMIN).await.unwrap().csrf;
    let (status, _) =
        call(&server, &wrong, Method::PUT, "/admin/labelling/queues/triage", Some(queue.clone()), true).await;
    assert_eq!(status, 403, "another session's CSRF token");
    let (status, listed) =
        call(&server, &admin, Method::PUT, "/admin/labelling/queues/triage", Some(queue), true).await;
    assert_eq!((status, listed["data"][0]["name"].as_str()), (200, Some("triage")), "{listed}");

    // A labeller: the queues, but no admin route, by cookie or by bearer.
    let labeller_token = mint("lee", "labeller");
    let labeller = sign_in(&server, &labeller_token).await.unwrap();
    assert_eq!(labeller.info["role"], "labeller");
    let (status, _) = call(&server, &labeller, Method::GET, "/v1/labelling/queues", None, false).await;
    assert_eq!(status, 200);
    for path in ["/admin/adapters", "/admin/feedback", "/admin/audit", "/admin/metrics", "/admin/finetune/jobs"] {
        let (status, _) = call(&server, &labeller, Method::GET, path, None, false).await;
        assert_eq!(status, 403, "{path} by session");
        let (status, _) = bearer(&server, &labeller_token, Method::GET, path, None).await;
        assert_eq!(status, 403, "{path} by bearer");
    }
    let body = json!({"rules": "x"});
    let (status, _) = call(&server, &labeller, Method::PUT, "/admin/labelling/queues/mine", Some(body), true).await;
    assert_eq!(status, 403);
    let (status, _) = bearer(&server, &mint("user-1", "user"), Method::GET, "/v1/labelling/queues", None).await;
    assert_eq!(status, 403, "users do not label");

    // Signing out needs the CSRF token and clears the cookie.
    let res = client().delete(server.url("/console/session")).header(COOKIE, &admin.cookie).send().await.unwrap();
    assert_eq!(res.status(), 403);
    let res = client()
        .delete(server.url("/console/session"))
        .header(COOKIE, &admin.cookie)
        .header("x-csrf-token", &admin.csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let cleared = res.headers().get(SET_COOKIE).unwrap().to_str().unwrap().to_owned();
    assert!(cleared.starts_with("switchyard_session=;") && cleared.contains("Max-Age=0"), "{cleared}");
}

/// Answers `n` prompts as `user` and gives each answer a thumbs-down with a correction.
async fn feedback(server: &Server, user: &str, n: usize) -> Vec<String> {
    let token = mint(user, "user");
    let mut ids = Vec::new();
    for i in 0..n {
        let body = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": format!("question {i} from {user}")}], "max_tokens": 4});
        let (status, answer) = bearer(server, &token, Method::POST, "/v1/chat/completions", Some(body)).await;
        assert_eq!(status, 200, "{answer}");
        let body = json!({"response_id": answer["id"], "thumbs": "down", "correction": format!("fixed {i}"), "tags": ["support"]});
        let (status, fb) = bearer(server, &token, Method::POST, "/v1/feedback", Some(body)).await;
        assert_eq!(status, 201, "{fb}");
        ids.push(fb["id"].as_str().unwrap().to_owned());
    }
    ids
}

fn ids(items: &Value) -> Vec<String> {
    items["data"].as_array().unwrap().iter().map(|i| i["feedback"]["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelling_queues_assign_double_label_review_and_settle_feedback() {
    let root = tempfile::tempdir().unwrap();
    let server = start(root.path());
    let made = feedback(&server, "user-1", 6).await;
    let (ann, bob, cy) = (mint("ann", "labeller"), mint("bob", "labeller"), mint("cy", "labeller"));
    let post = |token: &String, path: String, body: Value| {
        let (server, token) = (&server, token.clone());
        async move { bearer(server, &token, Method::POST, &path, Some(body)).await }
    };

    // The review listing shows what each feedback is about and filters.
    let (status, list) = bearer(&server, ADMIN, Method::GET, "/admin/feedback?status=pending&tag=support", None).await;
    assert_eq!((status, list["data"].as_array().unwrap().len()), (200, 6), "{list}");
    let first = &list["data"][0];
    assert_eq!(first["completion"]["prompt"][0]["content"], "question 0 from user-1", "{first}");
    assert!(first["completion"]["answer"].is_string(), "{first}");
    let (_, none) = bearer(&server, ADMIN, Method::GET, "/admin/feedback?tag=billing", None).await;
    assert_eq!(none["data"].as_array().unwrap().len(), 0);
    let (status, _) = bearer(&server, ADMIN, Method::GET, "/admin/feedback?rating=x", None).await;
    assert_eq!(status, 400);

    // Bad queues.
    for (body, param) in
        [(json!({"rules": " "}), "rules"), (json!({"rules": "r", "review_share": 1.5}), "review_share")]
    {
        let (status, err) = bearer(&server, ADMIN, Method::PUT, "/admin/labelling/queues/q", Some(body)).await;
        assert_eq!((status, err["error"]["param"].as_str()), (400, Some(param)), "{err}");
    }
    let (status, _) =
        bearer(&server, ADMIN, Method::PUT, "/admin/labelling/queues/Bad%20Name", Some(json!({"rules": "r"}))).await;
    assert_eq!(status, 400);
    let (status, _) =
        bearer(&server, ADMIN, Method::PUT, "/admin/labelling/queues/q", Some(json!({"rules": "r", "typo": 1}))).await;
    assert_eq!(status, 400);
    let (status, _) = post(&ann, "/v1/labelling/queues/none/next".into(), json!({})).await;
    assert_eq!(status, 404);

    // A single-label queue over the first three: no two labellers get the same item.
    let mut single = json!({"rules": "Accept a correction only if it is right.", "filter": {"tag": "support"}});
    single["filter"]["until"] = json!(u64::MAX);
    let (status, _) = bearer(&server, ADMIN, Method::PUT, "/admin/labelling/queues/single", Some(single)).await;
    assert_eq!(status, 200);
    let (status, a) = post(&ann, "/v1/labelling/queues/single/next".into(), json!({"limit": 4})).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["rules"], "Accept a correction only if it is right.");
    let (_, b) = post(&bob, "/v1/labelling/queues/single/next".into(), json!({"limit": 4})).await;
    let (a_ids, b_ids) = (ids(&a), ids(&b));
    assert_eq!((a_ids.len(), b_ids.len()), (4, 2), "six items, four to ann, the other two to bob");
    assert!(a_ids.iter().all(|i| !b_ids.contains(i)), "disjoint: {a_ids:?} {b_ids:?}");
    assert!(a["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["stage"] == "label" && i["completion"]["answer"].is_string()));
    let (_, again) = post(&ann, "/v1/labelling/queues/single/next".into(), json!({"limit": 10})).await;
    assert_eq!(ids(&again), a_ids, "asking again gives the same items back");

    // Labels: the wrong person, the wrong action, a reject with a correction, then real ones.
    let item = |id: &str| format!("/v1/labelling/queues/single/items/{id}");
    let (status, _) = post(&bob, item(&a_ids[0]), json!({"action": "accept"})).await;
    assert_eq!(status, 409, "not assigned to bob");
    let (status, _) = post(&ann, item(&a_ids[0]), json!({"action": "agree"})).await;
    assert_eq!(status, 400, "a label, not a review");
    let (status, _) = post(&ann, item(&a_ids[0]), json!({"action": "reject", "correction": "x"})).await;
    assert_eq!(status, 400);
    let (status, out) = post(&ann, item(&a_ids[0]), json!({"action": "accept", "correction": "edited answer"})).await;
    assert_eq!((status, out["status"].as_str()), (200, Some("settled")), "{out}");
    assert_eq!(out["feedback"]["status"], "accepted");
    assert_eq!(out["feedback"]["accepted_correction"], "edited answer");
    let (_, out) = post(&ann, item(&a_ids[1]), json!({"action": "reject"})).await;
    assert_eq!(out["feedback"]["status"], "rejected", "{out}");
    let (status, _) = post(&ann, item(&a_ids[1]), json!({"action": "accept"})).await;
    assert_eq!(status, 409, "already settled");
    let (_, reviewed) = bearer(&server, ADMIN, Method::GET, "/admin/feedback?status=accepted", None).await;
    assert_eq!(ids_of_feedback(&reviewed), vec![a_ids[0].clone()], "the queue's decision is the feedback's review");

    // A double-labelled queue over the rest, every settled label reviewed (share 1): ann and bob
    // both label each item; where they disagree, or for the review, cy decides.
    let rest: Vec<String> = made.iter().filter(|id| !a_ids[..2].contains(id)).cloned().collect();
    let double = json!({"rules": "Two people check each correction.", "double": true, "review_share": 0.0});
    bearer(&server, ADMIN, Method::PUT, "/admin/labelling/queues/double", Some(double)).await;
    let dq = |id: &str| format!("/v1/labelling/queues/double/items/{id}");
    let (_, a) = post(&ann, "/v1/labelling/queues/double/next".into(), json!({"limit": 50})).await;
    let (_, b) = post(&bob, "/v1/labelling/queues/double/next".into(), json!({"limit": 50})).await;
    let (_, c) = post(&cy, "/v1/labelling/queues/double/next".into(), json!({"limit": 50})).await;
    let mut a_sorted = ids(&a);
    a_sorted.sort();
    let mut rest_sorted = rest.clone();
    rest_sorted.sort();
    assert_eq!(a_sorted, rest_sorted, "double labelling: ann gets every unsettled item");
    assert_eq!(ids(&a), ids(&b), "and so does bob");
    assert!(ids(&c).is_empty(), "but no third person while two hold them");
    // Agree on the first two (the same correction), disagree on the third.
    for id in &rest[..2] {
        let (_, out) = post(&ann, dq(id), json!({"action": "accept", "correction": "same"})).await;
        assert_eq!(out["status"], "awaiting_second_label", "{out}");
        let (_, out) = post(&bob, dq(id), json!({"action": "accept", "correction": " same "})).await;
        assert_eq!((out["status"].as_str(), out["feedback"]["status"].as_str()), (Some("settled"), Some("accepted")));
    }
    post(&ann, dq(&rest[2]), json!({"action": "accept"})).await;
    let (_, out) = post(&bob, dq(&rest[2]), json!({"action": "reject"})).await;
    assert_eq!(out["status"], "awaiting_review", "{out}");
    let (_, c) = post(&cy, "/v1/labelling/queues/double/next".into(), json!({"limit": 50})).await;
    assert_eq!(ids(&c), vec![rest[2].clone()], "the disagreement goes to a third person");
    assert_eq!(c["data"][0]["stage"], "review");
    assert_eq!(
        (c["data"][0]["first"]["labeller"].as_str(), c["data"][0]["first"]["action"].as_str()),
        (Some("ann"), Some("accept"))
    );
    let (_, a_again) = post(&ann, "/v1/labelling/queues/double/next".into(), json!({"limit": 50})).await;
    assert!(!ids(&a_again).contains(&rest[2]), "a labeller never reviews an item they labelled");
    let (_, out) = post(&cy, dq(&rest[2]), json!({"action": "disagree"})).await;
    assert_eq!(
        (out["status"].as_str(), out["feedback"]["status"].as_str()),
        (Some("settled"), Some("rejected")),
        "{out}"
    );

    // Agreement: ann and bob agreed on 2 of 3; cy disagreed with ann's label once.
    let (status, stats) = bearer(&server, &ann, Method::GET, "/v1/labelling/queues/double/stats", None).await;
    assert_eq!(status, 200, "{stats}");
    let row = |sub: &str| stats["labellers"].as_array().unwrap().iter().find(|r| r["sub"] == sub).unwrap().clone();
    assert_eq!((row("ann")["labelled"].as_u64(), row("ann")["compared"].as_u64()), (Some(3), Some(4)), "{stats}");
    assert_eq!(row("ann")["agreement"].as_f64(), Some(0.5));
    assert_eq!(row("bob")["agreement"].as_f64().map(|a| (a * 1000.0).round()), Some(667.0));
    assert_eq!((row("cy")["reviewed"].as_u64(), row("cy")["agreement"].as_f64()), (Some(1), Some(0.0)));
    assert_eq!((stats["compared"].as_u64(), stats["agreement"].as_f64()), (Some(4), Some(0.5)));
    let (_, queues) = bearer(&server, &cy, Method::GET, "/v1/labelling/queues", None).await;
    let double = queues["data"].as_array().unwrap().iter().find(|q| q["name"] == "double").unwrap().clone();
    assert_eq!((double["done"].as_u64(), double["labelled"].as_u64()), (Some(3), Some(3)), "{double}");

    // Everything survives a restart: the file is the truth.
    drop(server);
    let server = Server::start_with_env(
        &[
            "--model".to_owned(),
            root.path().join("tiny-llama").display().to_string(),
            "--data-dir".to_owned(),
            root.path().join("data").display().to_string(),
            "--auth".to_owned(),
            "on".to_owned(),
            "--jwt-hs256-secret".to_owned(),
            SECRET.to_owned(),
        ],
        &[("SWITCHYARD_ADMIN_TOKEN", ADMIN)],
    );
    let (_, again) = bearer(&server, &cy, Method::GET, "/v1/labelling/queues/double/stats", None).await;
    assert_eq!(again, stats);
}

fn ids_of_feedback(list: &Value) -> Vec<String> {
    list["data"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_preview_shows_rows_and_the_curation_a_job_would_apply() {
    let root = tempfile::tempdir().unwrap();
    let server = start(root.path());
    let mut rows: String = (0..12)
        .map(|i| format!("{}\n", json!({"instruction": format!("Say hello number {i}"), "output": "Hello there!"})))
        .collect();
    rows.push_str(&format!("{}\n", json!({"instruction": "Say hello number 3", "output": "Hello there!"})));
    rows.push_str(&format!("{}\n", json!({"instruction": "mail me at ann@example.com", "output": "Sure."})));
    rows.push_str("{\"unrelated\": 1}\n");
    let res = client().post(server.url("/admin/finetune/datasets")).bearer_auth(ADMIN).body(rows).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let uploaded: Value = res.json().await.unwrap();
    let id = uploaded["id"].as_str().unwrap();

    let (status, list) = bearer(&server, ADMIN, Method::GET, "/admin/finetune/datasets", None).await;
    assert_eq!((status, list["data"][0]["id"].as_str()), (200, Some(id)), "{list}");
    assert_eq!(list["data"][0]["examples"], 14);
    let (status, shown) = bearer(&server, ADMIN, Method::GET, &format!("/admin/finetune/datasets/{id}"), None).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!((shown["format"].as_str(), shown["records"].as_u64()), (Some("alpaca"), Some(15)));
    assert_eq!(shown["rows"].as_array().unwrap().len(), 14);
    assert_eq!(shown["rows"][0]["target"]["answer"], "Hello there!");
    let report = &shown["report"];
    assert_eq!(report["dropped_by_reason"]["duplicate"], 1, "{report}");
    assert_eq!(report["duplicates"], 1);
    assert_eq!(report["pii"]["email"], 1);
    assert_eq!(report["kept"], 13, "{report}");
    let bins = report["length_histogram"].as_array().unwrap();
    assert_eq!(bins.iter().map(|b| b["count"].as_u64().unwrap()).sum::<u64>(), 13, "{bins:?}");
    assert!(report["tokens"]["min"].as_u64().unwrap() > 3, "counted with the model's tokenizer: {report}");
    let (status, _) = bearer(&server, ADMIN, Method::GET, "/admin/finetune/datasets/ds-0000000000000000", None).await;
    assert_eq!(status, 404);
    let (status, _) = bearer(&server, ADMIN, Method::GET, "/admin/finetune/datasets/..%2Fsecret", None).await;
    assert_eq!(status, 404);

    // The training form's description: kinds, defaults and ranges.
    let (status, params) = bearer(&server, ADMIN, Method::GET, "/admin/finetune/params", None).await;
    assert_eq!(status, 200);
    let rank = params["data"].as_array().unwrap().iter().find(|p| p["name"] == "lora_rank").unwrap().clone();
    assert_eq!(
        (rank["kind"].as_str(), rank["default"].as_u64(), rank["max"].as_f64()),
        (Some("int"), Some(8), Some(256.0))
    );
}
