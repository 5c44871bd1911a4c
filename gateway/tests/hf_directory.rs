//! A tiny HF-layout llama that the test writes itself, served through the gateway.

mod common;

use common::{client, Server};
use serde_json::{json, Value};

#[tokio::test]
async fn an_hf_directory_serves_through_the_candle_engine() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 11).unwrap();
    let server =
        Server::start_raw(&["--model".into(), model.display().to_string(), "--engine".into(), "candle".into()]);
    let models: Value = client().get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-llama");
    assert_eq!(models["data"][0]["max_model_len"], 256);
    let body = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "the cat sat on the mat"}],
        "max_tokens": 6, "temperature": 0, "ignore_eos": true});
    let res = client().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let first: Value = res.json().await.unwrap();
    assert_eq!(first["usage"]["completion_tokens"], 6);
    assert_eq!(first["choices"][0]["finish_reason"], "length");
    // Random weights, but deterministic: the same request gives the same words.
    let again: Value =
        client().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(first["choices"][0]["message"]["content"], again["choices"][0]["message"]["content"]);
    let tokens: Value = client()
        .post(server.url("/tokenize"))
        .json(&json!({"model": "tiny-llama", "prompt": "the cat sat"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tokens["count"], 3);
}
