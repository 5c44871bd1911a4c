//! `/metrics` after known traffic: the counters moved by exactly the right amounts.

mod common;

use common::{client, metric_with, Server};
use serde_json::{json, Value};

#[tokio::test]
async fn counters_move_by_the_traffic_sent() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 4).unwrap();
    let server = Server::start_raw(&["--model".into(), model.display().to_string()]);
    let body = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "the cat sat"}],
        "max_tokens": 5, "ignore_eos": true, "temperature": 0});
    let mut prompt_tokens = 0;
    for _ in 0..3 {
        let v: Value =
            client().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap().json().await.unwrap();
        prompt_tokens += v["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text =
        client().post(server.url("/v1/chat/completions")).json(&streamed).send().await.unwrap().text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let bad = client()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "tiny-llama", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let unknown = client()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let route = ("route", "/v1/chat/completions");
    let get = |name: &str, labels: &[(&str, &str)]| metric_with(&page, name, labels);
    assert_eq!(
        get("switchyard_requests_total", &[route, ("status", "200"), ("model", "tiny-llama"), ("adapter", "")]),
        Some(4.0),
        "{page}"
    );
    // Refused requests never resolved a model, so no client input becomes a label.
    assert_eq!(get("switchyard_requests_total", &[route, ("status", "400"), ("model", "")]), Some(1.0));
    assert_eq!(get("switchyard_requests_total", &[route, ("status", "404"), ("model", "")]), Some(1.0));
    assert_eq!(get("switchyard_completion_tokens_total", &[("model", "tiny-llama")]), Some(20.0));
    assert_eq!(
        get("switchyard_prompt_tokens_total", &[("model", "tiny-llama")]),
        Some((prompt_tokens + prompt_tokens / 3) as f64)
    );
    assert_eq!(get("switchyard_time_to_first_token_seconds_count", &[]), Some(4.0));
    assert_eq!(
        get("switchyard_inter_token_latency_seconds_count", &[]),
        Some(4.0),
        "one streamed answer of 5 deltas has 4 gaps"
    );
    assert!(get("switchyard_batch_size_count", &[]).is_some_and(|n| n >= 4.0));
    assert_eq!(get("switchyard_queue_depth", &[]), Some(0.0));
    assert_eq!(get("switchyard_active_generations", &[]), Some(0.0));
    assert!(get("switchyard_request_duration_seconds_count", &[route]).is_some_and(|n| n == 6.0));
}

/// `--metrics-listen` moves `/metrics` to its own address: the API port no longer has it,
/// and the page counts the API port's traffic. The echo engine needs no model.
#[tokio::test]
async fn metrics_can_have_their_own_listen_address() {
    let port = common::free_port();
    let server =
        Server::start_raw(&["--engine".into(), "echo".into(), "--metrics-listen".into(), format!("127.0.0.1:{port}")]);
    let body = json!({"model": "echo", "messages": [{"role": "user", "content": "say these four words"}]});
    let v: Value =
        client().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "say these four words");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let on_api = client().get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(on_api.status(), 404);
    let page = client().get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap();
    let route = ("route", "/v1/chat/completions");
    assert_eq!(
        metric_with(&page, "switchyard_requests_total", &[route, ("status", "200"), ("model", "echo")]),
        Some(1.0),
        "{page}"
    );
}
