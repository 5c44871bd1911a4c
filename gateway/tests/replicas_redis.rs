//! Two gateway processes share one registry directory and a real Redis: a promote on one is
//! served by the other.

mod common;

use std::time::{Duration, Instant};

use common::{client, PrivateRedis, Server};
use serde_json::{json, Value};

const TOKEN: &str = "replica-token";

fn redis_url() -> String {
    std::env::var("SWITCHYARD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn start(model: &std::path::Path, data: &std::path::Path, imports: &std::path::Path) -> Server {
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--data-dir",
        &data.display().to_string(),
        "--admin-token",
        TOKEN,
        "--import-root",
        &imports.display().to_string(),
        "--redis-url",
        &redis_url(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Server::start_raw(&args)
}

async fn completion(server: &Server, model: &str) -> (u16, String) {
    let body = json!({"model": model, "prompt": "the cat sat on", "max_tokens": 12, "temperature": 1.5, "seed": 7, "ignore_eos": true});
    let res = client().post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    let v: Value = res.json().await.unwrap();
    (status, v["choices"][0]["text"].as_str().unwrap_or_default().to_owned())
}

async fn admin(server: &Server, method: reqwest::Method, path: &str, body: Value) -> u16 {
    client().request(method, server.url(path)).bearer_auth(TOKEN).json(&body).send().await.unwrap().status().as_u16()
}

/// Polls `server` until `model` answers `want`; returns how long that took.
async fn until_served(server: &Server, model: &str, want: &str) -> Duration {
    let started = Instant::now();
    loop {
        let (status, text) = completion(server, model).await;
        if status == 200 && text == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{model} on the second replica never answered with the new version"
        );
    }
}

#[tokio::test]
async fn a_promote_on_one_replica_is_served_by_the_other() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    let shape = runtime::testing::write_tiny_llama(&model, 5).unwrap();
    let imports = root.path().join("imports");
    runtime::testing::write_random_adapter(&imports.join("v1"), &shape, 4, 31, false).unwrap();
    runtime::testing::write_random_adapter(&imports.join("v2"), &shape, 4, 32, false).unwrap();
    let data = root.path().join("data");
    let a = start(&model, &data, &imports);
    let b = start(&model, &data, &imports);

    for v in ["v1", "v2"] {
        assert_eq!(admin(&a, reqwest::Method::POST, "/admin/adapters/bot/versions", json!({"path": v})).await, 201);
    }
    assert_eq!(admin(&a, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", json!({"version": 1})).await, 200);
    let (_, v1) = completion(&a, "bot@1").await;
    let (_, v2) = completion(&a, "bot@2").await;
    assert_ne!(v1, v2);
    // B learns of the new adapter and its alias from A's announcements.
    until_served(&b, "bot", &v1).await;

    assert_eq!(admin(&a, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", json!({"version": 2})).await, 200);
    let took = until_served(&b, "bot", &v2).await;
    eprintln!("promote on A served by B after {took:?}");
    assert_eq!(completion(&a, "bot").await.1, v2);
}

#[tokio::test]
async fn a_replica_that_missed_a_change_catches_up_when_redis_returns() {
    let port = common::free_port();
    let mut redis = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    let shape = runtime::testing::write_tiny_llama(&model, 6).unwrap();
    let imports = root.path().join("imports");
    runtime::testing::write_random_adapter(&imports.join("v1"), &shape, 4, 41, false).unwrap();
    runtime::testing::write_random_adapter(&imports.join("v2"), &shape, 4, 42, false).unwrap();
    let data = root.path().join("data");
    let start = || {
        let args: Vec<String> = [
            "--model",
            &model.display().to_string(),
            "--data-dir",
            &data.display().to_string(),
            "--admin-token",
            TOKEN,
            "--import-root",
            &imports.display().to_string(),
            "--redis-url",
            &url,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Server::start_raw(&args)
    };
    let (a, b) = (start(), start());
    for v in ["v1", "v2"] {
        assert_eq!(admin(&a, reqwest::Method::POST, "/admin/adapters/bot/versions", json!({"path": v})).await, 201);
    }
    assert_eq!(admin(&a, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", json!({"version": 1})).await, 200);
    let (_, v1) = completion(&a, "bot@1").await;
    let (_, v2) = completion(&a, "bot@2").await;
    until_served(&b, "bot", &v1).await;

    // Redis goes away; the promote lands on disk but nobody hears of it.
    redis.stop();
    assert_eq!(admin(&a, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", json!({"version": 2})).await, 200);
    assert_eq!(completion(&a, "bot").await.1, v2);
    assert_eq!(completion(&b, "bot").await, (200, v1.clone()), "B keeps serving while Redis is down");

    // Redis is back: B resubscribes, reloads, and serves the promoted version.
    let _redis = PrivateRedis::start(port);
    let took = until_served(&b, "bot", &v2).await;
    eprintln!("B caught up {took:?} after Redis returned");
}
