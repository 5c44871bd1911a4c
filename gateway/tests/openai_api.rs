//! End-to-end: the real gateway and the real SmolLM2 model, spoken to over HTTP.

mod common;

use common::{client, metric, sse_data, Server, MODEL_ID};
use futures::StreamExt;
use serde_json::{json, Value};

/// Runs a scenario once per engine, each against its own server.
macro_rules! on_every_engine {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn candle() {
                super::$name("candle").await
            }
            #[tokio::test]
            async fn mistralrs() {
                super::$name("mistralrs").await
            }
        }
    )*};
}

on_every_engine!(
    greedy_answer_names_paris_with_openai_shape,
    streamed_chunks_concatenate_to_the_whole_answer,
    usage_matches_the_tokenizer_count,
    stop_sequences_and_seeds_behave_like_openai,
    bad_input_gets_the_openai_error_shape,
    eight_concurrent_requests_all_complete,
    a_dropped_stream_frees_its_slot,
    models_health_and_ready
);

fn chat_body(question: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL_ID,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
        "max_tokens": 48,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

async fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let res = client().post(server.url(path)).json(body).send().await.expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.expect("json body"))
}

/// Collects a streamed answer: (text, finish_reason, usage, every parsed chunk).
async fn stream(server: &Server, path: &str, body: &Value) -> (String, String, Option<Value>, Vec<Value>) {
    let res = client().post(server.url(path)).json(body).send().await.expect("request");
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let body = res.text().await.expect("body");
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {body}");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("chunk json")).collect();
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = None;
    for c in &chunks {
        for choice in c["choices"].as_array().expect("choices") {
            if let Some(t) = choice["delta"]["content"].as_str().or(choice["text"].as_str()) {
                text.push_str(t);
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                finish = f.to_owned();
            }
        }
        if !c["usage"].is_null() {
            usage = Some(c["usage"].clone());
        }
    }
    (text, finish, usage, chunks)
}

async fn greedy_answer_names_paris_with_openai_shape(engine: &str) {
    let server = Server::start(&["--engine", engine]);
    let (status, body) =
        post(&server, "/v1/chat/completions", &chat_body("What is the capital of France?", json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let answer = body["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(answer.contains("Paris"), "answer: {answer}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL_ID);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(matches!(body["choices"][0]["finish_reason"].as_str(), Some("stop" | "length")));
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    let (_, again) =
        post(&server, "/v1/chat/completions", &chat_body("What is the capital of France?", json!({}))).await;
    assert_ne!(body["id"], again["id"], "every response has its own id");
    assert_eq!(again["choices"][0]["message"]["content"], body["choices"][0]["message"]["content"]);
}

async fn streamed_chunks_concatenate_to_the_whole_answer(engine: &str) {
    let server = Server::start(&["--engine", engine]);
    let req = chat_body("Name three colors of the rainbow.", json!({"max_tokens": 40}));
    let (_, whole) = post(&server, "/v1/chat/completions", &req).await;
    let mut streamed_req = req.clone();
    streamed_req["stream"] = json!(true);
    streamed_req["stream_options"] = json!({"include_usage": true});
    let (text, finish, usage, chunks) = stream(&server, "/v1/chat/completions", &streamed_req).await;
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(finish, whole["choices"][0]["finish_reason"].as_str().unwrap());
    // The same usage, except that the candle engine found the first request's prompt in its
    // prefix cache the second time.
    let (mut streamed_usage, mut whole_usage) = (usage.expect("usage chunk"), whole["usage"].clone());
    let cached = streamed_usage["prompt_tokens_details"]["cached_tokens"].as_u64();
    let expected = if engine == "candle" { streamed_usage["prompt_tokens"].as_u64().map(|n| n - 1) } else { Some(0) };
    assert_eq!(cached, expected, "{streamed_usage}");
    for u in [&mut streamed_usage, &mut whole_usage] {
        u.as_object_mut().unwrap().remove("prompt_tokens_details");
    }
    assert_eq!(streamed_usage, whole_usage);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));

    let text_req = json!({"model": MODEL_ID, "prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0,
        "ignore_eos": true});
    let (_, whole) = post(&server, "/v1/completions", &text_req).await;
    assert_eq!(whole["object"], "text_completion");
    let mut streamed = text_req.clone();
    streamed["stream"] = json!(true);
    let (text, finish, usage, _) = stream(&server, "/v1/completions", &streamed).await;
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(finish, "length");
    assert!(usage.is_none(), "usage only when include_usage is asked for");
    assert_eq!(whole["usage"]["completion_tokens"], 24);
}

async fn usage_matches_the_tokenizer_count(engine: &str) {
    let server = Server::start(&["--engine", engine]);
    let messages = json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]);
    let (status, body) = post(
        &server,
        "/v1/chat/completions",
        &json!({"model": MODEL_ID, "messages": messages, "temperature": 0, "max_tokens": 30}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, prompt) = post(&server, "/tokenize", &json!({"model": MODEL_ID, "messages": messages})).await;
    assert_eq!(body["usage"]["prompt_tokens"], prompt["count"]);
    let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
    let (_, completion) = post(&server, "/tokenize", &json!({"model": MODEL_ID, "prompt": answer})).await;
    let counted = completion["count"].as_u64().unwrap();
    let reported = body["usage"]["completion_tokens"].as_u64().unwrap();
    // The reported count includes the end-of-turn token that ended a `stop` answer.
    let eos = u64::from(body["choices"][0]["finish_reason"] == "stop");
    assert_eq!(reported, counted + eos, "answer {answer:?}");
    assert_eq!(body["usage"]["total_tokens"].as_u64().unwrap(), reported + prompt["count"].as_u64().unwrap());
}

async fn stop_sequences_and_seeds_behave_like_openai(engine: &str) {
    let server = Server::start(&["--engine", engine]);
    let base = json!({"model": MODEL_ID, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 30, "temperature": 0});
    let (_, free) = post(&server, "/v1/completions", &base).await;
    let free_text = free["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(free_text.contains(" 8"), "counting continues: {free_text:?}");
    let mut stopped = base.clone();
    stopped["stop"] = json!([" 8", "zzz"]);
    let (_, cut) = post(&server, "/v1/completions", &stopped).await;
    let cut_text = cut["choices"][0]["text"].as_str().unwrap();
    assert_eq!(cut_text, &free_text[..free_text.find(" 8").unwrap()]);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let (streamed, finish, _, _) = stream(&server, "/v1/completions", &stopped).await;
    assert_eq!((streamed.as_str(), finish.as_str()), (cut_text, "stop"));

    let sampled = json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 24,
        "temperature": 1.0, "top_p": 0.95, "seed": 1234});
    let (_, a) = post(&server, "/v1/completions", &sampled).await;
    let (_, b) = post(&server, "/v1/completions", &sampled).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"], "same seed, same text");
}

async fn bad_input_gets_the_openai_error_shape(engine: &str) {
    let server = Server::start(&["--engine", engine, "--context-len", "256", "--body-limit", "4096"]);
    let user = json!([{"role": "user", "content": "hi"}]);
    let long_prompt = "word ".repeat(1000);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, "invalid_json"),
        ("/v1/chat/completions", json!({"model": MODEL_ID, "messages": "hi"}).to_string(), 400, "invalid_type"),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "max_tokens": "ten"}).to_string(),
            400,
            "invalid_type",
        ),
        ("/v1/chat/completions", json!({"model": "gpt-9", "messages": user}).to_string(), 404, "model_not_found"),
        ("/v1/chat/completions", json!({"model": MODEL_ID, "messages": []}).to_string(), 400, "invalid_value"),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "max_tokens": 0}).to_string(),
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "max_tokens": 1000}).to_string(),
            400,
            "context_length_exceeded",
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": long_prompt.clone()}).to_string(),
            413,
            "payload_too_large",
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": "word ".repeat(300)}).to_string(),
            400,
            "context_length_exceeded",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "n": 17}).to_string(),
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "logprobs": true, "top_logprobs": 21}).to_string(),
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "best_of_luck": 1}).to_string(),
            400,
            "unknown_parameter",
        ),
        ("/v1/completions", json!({"model": MODEL_ID, "prompt": ["a", "b"]}).to_string(), 400, "unsupported_parameter"),
        ("/v1/nothing-here", "{}".into(), 404, "not_found"),
    ];
    for (path, body, status, code) in cases {
        let res = client()
            .post(server.url(path))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("request");
        assert_eq!(res.status().as_u16(), status, "{path} {body:.80}");
        let err: Value = res.json().await.expect("error body is JSON");
        let detail = &err["error"];
        assert_eq!(detail["code"], code, "{path} {body:.80} -> {err}");
        assert!(detail["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(detail["type"].is_string() && detail.get("param").is_some(), "{err}");
    }
    // The server is still healthy after all of that.
    let ok = client().get(server.url("/health")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

async fn eight_concurrent_requests_all_complete(engine: &str) {
    let server = Server::start(&["--engine", engine]);
    let questions = [
        "capital of France",
        "capital of Spain",
        "capital of Italy",
        "capital of Japan",
        "capital of Peru",
        "capital of Egypt",
        "capital of Canada",
        "capital of Kenya",
    ];
    let requests = questions.iter().enumerate().map(|(i, q)| {
        let body = chat_body(&format!("What is the {q}?"), json!({"max_tokens": 24, "stream": i % 2 == 0}));
        let url = server.url("/v1/chat/completions");
        async move {
            let res = client().post(url).json(&body).send().await.expect("request");
            (res.status().as_u16(), res.text().await.expect("body"))
        }
    });
    let results = futures::future::join_all(requests).await;
    for (status, body) in results {
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("finish_reason\":\"stop") || body.contains("finish_reason\":\"length"), "{body}");
    }
}

async fn a_dropped_stream_frees_its_slot(engine: &str) {
    let server = Server::start(&["--engine", engine, "--max-concurrent", "1"]);
    let long = json!({"model": MODEL_ID, "prompt": "Write a very long story.", "max_tokens": 3000,
        "ignore_eos": true, "stream": true});
    let res = client().post(server.url("/v1/completions")).json(&long).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));

    // The one slot is taken: a second request is refused at once, not queued.
    let (status, err) =
        post(&server, "/v1/completions", &json!({"model": MODEL_ID, "prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(status, 429, "{err}");
    assert_eq!(err["error"]["code"], "concurrency_limit_exceeded");

    drop(body);
    // 3000 tokens would take minutes; the slot must come back as soon as the server sees the
    // closed connection. Watch the gauge rather than sleeping.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if metric(&page, "switchyard_active_generations") == Some(0.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot still held 30 s after the client left:\n{page}");
        tokio::task::yield_now().await;
    }
    let (status, body) =
        post(&server, "/v1/completions", &json!({"model": MODEL_ID, "prompt": "hi", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{body}");
}

async fn models_health_and_ready(engine: &str) {
    let server = Server::start(&["--engine", engine]);
    let models: Value = client().get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL_ID);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], 8192);
    for path in ["/health", "/ready"] {
        assert_eq!(client().get(server.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
}

#[test]
fn a_missing_model_stops_start_up_naming_the_path() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--port", "0", "--auth", "off", "--model", "/nonexistent/dir/model.gguf"])
        .output()
        .expect("run switchyard");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/dir/model.gguf"), "{stderr}");
}
