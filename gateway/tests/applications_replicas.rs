//! Two gateway replicas sharing one data directory, without Redis and then with it: a
//! knowledge-base change made through one is served by the other within a second, a
//! recommendation event recorded through one changes the other's next answer at once, and a
//! template created through one generates through the other.

mod common;

use common::{client, embed_model, free_port, PrivateRedis, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const ADMIN: &str = "replicas-admin";

fn start(data: &std::path::Path, redis: Option<&str>) -> Server {
    let (embed, data) = (embed_model().display().to_string(), data.display().to_string());
    let mut args = vec!["--embed-model", &embed, "--data-dir", &data, "--admin-token", ADMIN];
    if let Some(url) = redis {
        args.extend(["--redis-url", url]);
    }
    Server::start(&args)
}

/// Posts as an anonymous user (tenant `default`), or as the admin on `/admin` routes.
async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let mut req = client().post(server.url(path)).json(&body);
    if path.starts_with("/admin") {
        req = req.bearer_auth(ADMIN);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn get(server: &Server, path: &str) -> (u16, Value) {
    let res = client().get(server.url(path)).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

/// Polls `server` until `done` holds for its answer to `path`; the time it took.
async fn served_within(server: &Server, path: &str, done: impl Fn(u16, &Value) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = get(server, path).await;
        if done(status, &body) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{path} never changed on the other replica: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn two_replicas_share(redis: Option<&str>) {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let a = start(&data, redis);
    let b = start(&data, redis);
    // A knowledge base made on A, with a document, is searchable on B.
    let (status, kb) = post(&a, "/v1/knowledge-bases", json!({"name": "shared"})).await;
    assert_eq!(status, 201, "{kb}");
    let kb = kb["id"].as_str().unwrap().to_owned();
    let docs = format!("/v1/knowledge-bases/{kb}/documents");
    let (status, doc) =
        post(&a, &docs, json!({"title": "Boiler", "text": "The boiler is serviced every October by the landlord."}))
            .await;
    assert_eq!(status, 201, "{doc}");
    let took =
        served_within(&b, &docs, |s, body| s == 200 && body["data"].as_array().is_some_and(|d| d.len() == 1)).await;
    assert!(took < Duration::from_secs(1), "the document reached the other replica in {took:?}");
    let (status, hits) =
        post(&b, &format!("/v1/knowledge-bases/{kb}/search"), json!({"query": "when is the boiler serviced"})).await;
    assert_eq!(status, 200, "{hits}");
    assert_eq!(hits["data"][0]["document_id"], doc["id"]);
    // Deleted on B, gone on A.
    let res = client().delete(b.url(&format!("{docs}/{}", doc["id"].as_str().unwrap()))).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let took =
        served_within(&a, &docs, |s, body| s == 200 && body["data"].as_array().is_some_and(|d| d.is_empty())).await;
    assert!(took < Duration::from_secs(1), "the deletion reached the other replica in {took:?}");

    // Recommendation: items and an event through A change B's very next answer.
    for (id, text) in
        [("tea-green", "Green tea leaves"), ("tea-black", "Black tea leaves"), ("bike-helmet", "Cycling helmet")]
    {
        let (status, _) = post(&a, "/v1/recommend/items", json!({"id": id, "text": text})).await;
        assert_eq!(status, 201);
    }
    let (status, _) =
        post(&a, "/v1/recommend/events", json!({"user": "kim", "item": "tea-green", "event": "purchase"})).await;
    assert_eq!(status, 201);
    let (status, rec) = post(&b, "/v1/recommend", json!({"user": "kim", "k": 2, "exclude_seen": true})).await;
    assert_eq!(status, 200, "{rec}");
    assert_eq!(
        (rec["cold_start"].as_bool(), rec["items"][0]["id"].as_str()),
        (Some(false), Some("tea-black")),
        "{rec}"
    );

    // A template made through A renders through B.
    let (status, t) = post(
        &a,
        "/admin/templates",
        json!({"name": "hello", "template": "Say hello to {{ who }}.", "variables": ["who"]}),
    )
    .await;
    assert_eq!(status, 201, "{t}");
    let (status, g) =
        post(&b, "/v1/generate", json!({"template": "hello", "variables": {"who": "Kim"}, "max_tokens": 4})).await;
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["template"]["version"], 1);
}

#[tokio::test]
async fn replicas_share_applications_through_files() {
    two_replicas_share(None).await;
}

#[tokio::test]
async fn replicas_share_applications_with_redis() {
    let port = free_port();
    let _redis = PrivateRedis::start(port);
    two_replicas_share(Some(&format!("redis://127.0.0.1:{port}"))).await;
}
