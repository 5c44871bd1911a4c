//! Rate limits over HTTP: 429 at exactly the configured count with OpenAI's headers, token and
//! stream limits, and one shared limit across two replicas through a real Redis that is
//! stopped and restarted while requests continue.

mod common;

use common::{client, metric, PrivateRedis, Server, MODEL_ID};
use futures::StreamExt;
use serde_json::{json, Value};

fn tiny(root: &std::path::Path) -> std::path::PathBuf {
    let model = root.join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 2).unwrap();
    model
}

fn start(model: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = vec!["--model".to_owned(), model.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start_raw(&args)
}

async fn complete(server: &Server, max_tokens: u32) -> reqwest::Response {
    let body = json!({"model": "tiny-llama", "prompt": "the cat", "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0});
    client().post(server.url("/v1/completions")).json(&body).send().await.unwrap()
}

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn requests_per_minute_refuse_exactly_past_the_limit() {
    let root = tempfile::tempdir().unwrap();
    let server = start(&tiny(root.path()), &["--rate-limit-rpm", "3"]);
    for remaining in ["2", "1", "0"] {
        let res = complete(&server, 1).await;
        assert_eq!(res.status(), 200);
        assert_eq!(header(&res, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&res, "x-ratelimit-remaining-requests"), remaining);
        assert!(header(&res, "x-ratelimit-reset-requests").ends_with('s'));
    }
    let res = complete(&server, 1).await;
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "x-ratelimit-remaining-requests"), "0");
    let retry: u64 = header(&res, "retry-after").parse().expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn tokens_per_minute_count_prompt_and_completion() {
    let root = tempfile::tempdir().unwrap();
    let server = start(&tiny(root.path()), &["--rate-limit-tpm", "40"]);
    let first = complete(&server, 20).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "40");
    let usage: Value = first.json().await.unwrap();
    let used = usage["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(used, 22, "2 prompt + 20 completion tokens");
    // 22 of 40 used: one more request is admitted (and brings the window to 44)...
    let second = complete(&server, 20).await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-ratelimit-remaining-tokens"), "18");
    // ...and then the budget is spent.
    let third = complete(&server, 1).await;
    assert_eq!(third.status(), 429);
    assert_eq!(header(&third, "x-ratelimit-remaining-tokens"), "0");
}

#[tokio::test]
async fn concurrent_streams_per_key_are_capped() {
    // The real model: a 2000-token stream lasts far longer than this test.
    let server = Server::start(&["--max-streams-per-key", "1"]);
    let long =
        json!({"model": MODEL_ID, "prompt": "Tell a story.", "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let res = client().post(server.url("/v1/completions")).json(&long).send().await.unwrap();
    let mut held = res.bytes_stream();
    held.next().await.unwrap().unwrap();
    let second = client().post(server.url("/v1/completions")).json(&long).send().await.unwrap();
    assert_eq!(second.status(), 429);
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["code"], "stream_limit_exceeded");
    // Non-streamed requests do not take stream slots.
    let short = json!({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1});
    assert_eq!(client().post(server.url("/v1/completions")).json(&short).send().await.unwrap().status(), 200);
    drop(held);
}

#[tokio::test]
async fn two_replicas_share_one_limit_and_survive_a_redis_restart() {
    let port = common::free_port();
    let mut redis = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    let root = tempfile::tempdir().unwrap();
    let model = tiny(root.path());
    let a = start(
        &model,
        &["--rate-limit-rpm", "6", "--redis-url", &url, "--data-dir", &root.path().join("a").display().to_string()],
    );
    let b = start(
        &model,
        &["--rate-limit-rpm", "6", "--redis-url", &url, "--data-dir", &root.path().join("b").display().to_string()],
    );
    // Wait until both replicas count in Redis (their connection is made in the background).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut shared = false;
    while !shared {
        let res = complete(&a, 1).await;
        assert_eq!(res.status(), 200);
        shared = header(&res, "x-ratelimit-remaining-requests") == "5";
        assert!(std::time::Instant::now() < deadline, "replica A never used Redis");
    }
    // One window for both: 5 left, spread over both replicas, then A is refused.
    for server in [&b, &a, &b, &a, &b] {
        assert_eq!(complete(server, 1).await.status(), 200);
    }
    assert_eq!(complete(&a, 1).await.status(), 429);
    assert_eq!(complete(&b, 1).await.status(), 429);

    // Redis stops: both keep answering under their local limits; nothing is a 5xx.
    redis.stop();
    for server in [&a, &b, &a, &b] {
        let status = complete(server, 1).await.status().as_u16();
        assert!(status == 200 || status == 429, "got {status} while Redis was down");
    }
    let page = client().get(b.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metric(&page, "switchyard_redis_errors_total{op=\"limit\"}").is_some_and(|v| v >= 1.0), "{page}");

    // Redis returns (empty: it keeps nothing on disk) and the replicas go on counting there.
    let _redis = PrivateRedis::start(port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let res = complete(&b, 1).await;
        let status = res.status().as_u16();
        assert!(status == 200 || status == 429, "got {status} after Redis returned");
        // A fresh shared window shows 5 remaining after its first request.
        if status == 200 && header(&res, "x-ratelimit-remaining-requests") == "5" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "replica B never counted in Redis again");
    }
}

/// Tokens per minute through Redis: both replicas charge one shared window (requests and
/// tokens are checked in one script call), so the first 429 comes once the tokens used on
/// both together reach the limit, not once each replica has used it alone.
#[tokio::test]
async fn two_replicas_share_one_token_window() {
    let port = common::free_port();
    let _redis = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    let root = tempfile::tempdir().unwrap();
    let model = tiny(root.path());
    let limit = 60u64;
    let args = |dir: &str| {
        vec![
            "--rate-limit-tpm".to_owned(),
            limit.to_string(),
            "--rate-limit-rpm".to_owned(),
            "1000".to_owned(),
            "--redis-url".to_owned(),
            url.clone(),
            "--data-dir".to_owned(),
            root.path().join(dir).display().to_string(),
        ]
    };
    let a = start(&model, &args("a").iter().map(String::as_str).collect::<Vec<_>>());
    let b = start(&model, &args("b").iter().map(String::as_str).collect::<Vec<_>>());
    // Both replicas count in Redis once a request shows the shared request window.
    for server in [&a, &b] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let res = complete(server, 1).await;
            assert_eq!(res.status(), 200);
            if header(&res, "x-ratelimit-limit-requests") == "1000"
                && header(&res, "x-ratelimit-remaining-requests") != "999"
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "a replica never used Redis");
        }
    }
    // Alternate replicas until one refuses; count what was used (warm-up requests included,
    // read back from the shared window itself).
    let first = complete(&a, 1).await;
    assert_eq!(first.status(), 200);
    let mut used = limit - header(&first, "x-ratelimit-remaining-tokens").parse::<u64>().unwrap();
    let first: Value = first.json().await.unwrap();
    used += first["usage"]["total_tokens"].as_u64().unwrap();
    let mut per_request = 0;
    let mut refused = None;
    for (i, server) in [&b, &a].iter().cycle().take(40).enumerate() {
        let res = complete(server, 5).await;
        if res.status() == 429 {
            refused = Some(i);
            break;
        }
        let usage: Value = res.json().await.unwrap();
        per_request = usage["usage"]["total_tokens"].as_u64().unwrap();
        used += per_request;
    }
    assert!(refused.is_some(), "never refused after {used} tokens");
    // Charges land just after each answer, so the window may trail by one request.
    assert!(
        used >= limit && used < limit + 2 * per_request,
        "refused after {used} tokens for a shared limit of {limit}"
    );
}
