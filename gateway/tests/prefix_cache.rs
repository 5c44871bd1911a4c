//! Prompt prefix caching, over HTTP with the real model: a prompt that starts like an earlier
//! prompt or conversation copies those keys and values, reports them as OpenAI does
//! (`usage.prompt_tokens_details.cached_tokens`), and answers exactly as without the cache.

mod common;

use common::{client, metric, metric_with, sse_data, Server, MODEL_ID};
use serde_json::{json, Value};

const TOKEN: &str = "prefix-admin-token";

fn messages(turns: &[(&str, &str)]) -> Value {
    let mut all =
        vec![json!({"role": "system", "content": "You are a helpful assistant who answers in one sentence."})];
    all.extend(turns.iter().map(|(role, content)| json!({"role": role, "content": content})));
    Value::Array(all)
}

async fn chat(server: &Server, model: &str, messages: &Value) -> Value {
    let body = json!({"model": model, "messages": messages, "temperature": 0, "max_tokens": 24});
    let res = client().post(server.url("/v1/chat/completions")).json(&body).send().await.expect("request");
    assert_eq!(res.status(), 200);
    res.json().await.expect("json")
}

fn cached(body: &Value) -> u64 {
    body["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens: {body}"))
}

fn prompt_tokens(body: &Value) -> u64 {
    body["usage"]["prompt_tokens"].as_u64().unwrap()
}

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

#[tokio::test]
async fn repeated_shared_and_follow_up_prompts_reuse_their_prefix_and_answer_the_same() {
    let server = Server::start(&["--engine", "candle"]);
    let plain = Server::start(&["--engine", "candle", "--prefix-cache-mb", "0"]);
    let first = messages(&[("user", "What is the capital of France?")]);

    let a = chat(&server, MODEL_ID, &first).await;
    assert_eq!(cached(&a), 0, "nothing to reuse on a fresh server");
    // The same prompt again: every token but the last (its logits are the point) is copied.
    let again = chat(&server, MODEL_ID, &first).await;
    assert_eq!(cached(&again), prompt_tokens(&again) - 1);
    assert_eq!(content(&again), content(&a));

    // Another question under the same system prompt reuses the system prompt's tokens.
    let other = messages(&[("user", "Name a large animal that lives in the sea.")]);
    let b = chat(&server, MODEL_ID, &other).await;
    assert!(cached(&b) >= 15 && cached(&b) < prompt_tokens(&b), "{}", b["usage"]);
    let b_plain = chat(&plain, MODEL_ID, &other).await;
    assert_eq!(cached(&b_plain), 0, "--prefix-cache-mb 0 turns the cache off");
    assert_eq!(content(&b), content(&b_plain), "copied keys and values answer as computed ones do");

    // The next turn of the first chat starts with the whole first conversation, answer included.
    let follow_up =
        messages(&[("user", "What is the capital of France?"), ("assistant", content(&a)), ("user", "And of Italy?")]);
    let c = chat(&server, MODEL_ID, &follow_up).await;
    assert!(
        cached(&c) > prompt_tokens(&a),
        "the first answer's tokens were reused too: {} of {}",
        cached(&c),
        prompt_tokens(&c)
    );
    assert_eq!(content(&c), content(&chat(&plain, MODEL_ID, &follow_up).await));

    // Streams report it in their usage chunk as well.
    let body = json!({"model": MODEL_ID, "messages": first, "temperature": 0, "max_tokens": 8, "stream": true,
        "stream_options": {"include_usage": true}});
    let text =
        client().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap().text().await.unwrap();
    let usage = sse_data(&text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|c| !c["usage"].is_null())
        .expect("usage chunk")["usage"]
        .clone();
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"].as_u64().unwrap() - 1);

    let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let counted = metric_with(&page, "switchyard_cached_prompt_tokens_total", &[("model", MODEL_ID)]).unwrap();
    let reported =
        cached(&again) + cached(&b) + cached(&c) + usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(counted as u64, reported);
    assert!(metric(&page, "switchyard_prefix_cache_bytes").unwrap() > 0.0);
}

#[tokio::test]
async fn adapters_never_share_prefixes_and_concurrent_twins_compute_once() {
    let root = tempfile::tempdir().unwrap();
    let imports = root.path().join("imports");
    let shape = adapters::BaseModelShape::smollm2_135m();
    runtime::testing::write_random_adapter(&imports.join("v1"), &shape, 4, 10, false).unwrap();
    let server = Server::start(&[
        "--engine",
        "candle",
        "--admin-token",
        TOKEN,
        "--import-root",
        &imports.display().to_string(),
        "--data-dir",
        &root.path().join("data").display().to_string(),
    ]);
    let res = client()
        .post(server.url("/admin/adapters/bot/versions"))
        .bearer_auth(TOKEN)
        .json(&json!({"path": "v1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());

    let prompt = messages(&[("user", "Describe a lighthouse in one sentence.")]);
    let base = chat(&server, MODEL_ID, &prompt).await;
    assert_eq!(cached(&base), 0);
    // LoRA changes keys and values: the base model's prefix is no use to the adapter.
    let tuned = chat(&server, "bot@1", &prompt).await;
    assert_eq!(cached(&tuned), 0, "an adapter must not reuse the base model's keys and values");
    let tuned_again = chat(&server, "bot@1", &prompt).await;
    assert_eq!(cached(&tuned_again), prompt_tokens(&tuned_again) - 1);
    assert_eq!(content(&tuned_again), content(&tuned));

    // Sixteen identical new prompts at once: one computes the prompt, the others wait a step
    // and copy it; all answer alike.
    // (A system prompt of their own, so that nothing of theirs is cached beforehand.)
    let fresh = json!([{"role": "system", "content": "You write short poems."}, {"role": "user", "content": "Write one line about the sea at night."}]);
    let answers = futures::future::join_all((0..16).map(|_| chat(&server, MODEL_ID, &fresh))).await;
    let n = prompt_tokens(&answers[0]);
    let copied = answers.iter().filter(|a| cached(a) == n - 1).count();
    assert!(
        copied >= 15,
        "only {copied} of 16 twins copied the prompt: {:?}",
        answers.iter().map(cached).collect::<Vec<_>>()
    );
    assert!(answers.iter().all(|a| content(a) == content(&answers[0])));
}
