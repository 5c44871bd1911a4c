//! Operations: request ids, and SIGTERM draining in-flight streams before a clean exit.

mod common;

use common::{client, sse_data, Server, MODEL_ID};
use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let server = Server::start(&[]);
    let res = client().get(server.url("/v1/models")).header("x-request-id", "trace-abc-123").send().await.unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-abc-123");
    let res = client().get(server.url("/v1/models")).send().await.unwrap();
    let made = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made.len(), 32);
    // Errors carry one too.
    let res = client().get(server.url("/nope")).send().await.unwrap();
    assert!(res.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn sigterm_lets_a_running_stream_finish_then_exits_zero() {
    let mut server = Server::start(&["--shutdown-timeout", "60"]);
    let body = json!({"model": MODEL_ID, "prompt": "Tell me a story.", "max_tokens": 60, "temperature": 0,
        "ignore_eos": true, "stream": true});
    let res = client().post(server.url("/v1/completions")).json(&body).send().await.unwrap();
    let mut stream = res.bytes_stream();
    let mut raw = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    let reader = tokio::spawn(async move {
        while let Some(chunk) = stream.next().await {
            raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        raw
    });
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (status, server)
    });
    let raw = reader.await.unwrap();
    let (status, _server) = status.await.unwrap();
    let data = sse_data(&raw);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "the stream was cut: {raw}");
    let finish = data.iter().rev().nth(1).unwrap();
    assert!(finish.contains("\"finish_reason\":\"length\""), "{finish}");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn the_spec_and_swagger_ui_are_served_without_a_token() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 1).unwrap();
    let args: Vec<String> =
        ["--model", &model.display().to_string(), "--auth", "on", "--jwt-hs256-secret", "s3cret-for-docs-test"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let server = Server::start_raw(&args);
    let spec: serde_json::Value = client().get(server.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    assert!(
        spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"].is_object()
    );
    let page = client().get(server.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().to_lowercase().contains("swagger"));
    // Everything else still wants a token.
    assert_eq!(client().get(server.url("/v1/models")).send().await.unwrap().status(), 401);
}
