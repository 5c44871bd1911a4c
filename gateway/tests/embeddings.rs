//! `POST /v1/embeddings` over HTTP with all-MiniLM-L6-v2: vectors equal sentence-transformers'
//! (the committed fixture, made by `scripts/embed-reference.py`), both encodings, token-id
//! input, batching, the model list, metrics, and every bad input answered with a 4xx.

mod common;

use base64::Engine as _;
use common::{client, embed_model, metric_with, Server, EMBED_MODEL_ID};
use serde_json::{json, Value};

/// The embedding model beside the echo engine (no chat model to load).
fn start() -> Server {
    Server::start_raw(&["--engine".into(), "echo".into(), "--embed-model".into(), embed_model().display().to_string()])
}

async fn post(server: &Server, body: &Value) -> (u16, Value) {
    let res = client().post(server.url("/v1/embeddings")).json(body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

fn fixture() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/embeddings-reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (norm(a) * norm(b))
}

#[tokio::test]
async fn vectors_equal_sentence_transformers_in_both_encodings() {
    let server = start();
    let reference = fixture();
    let items = reference["items"].as_array().unwrap();
    assert_eq!(items.len(), 50);
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();

    let (status, body) = post(&server, &json!({"model": EMBED_MODEL_ID, "input": texts, "user": "u-1"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], EMBED_MODEL_ID);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 50);
    let mut worst = (0.0f64, "");
    for (i, (item, got)) in items.iter().zip(data).enumerate() {
        assert_eq!(got["object"], "embedding");
        assert_eq!(got["index"], i);
        let vector = floats(&got["embedding"]);
        assert_eq!(vector.len(), 384);
        let distance = cosine_distance(&vector, &floats(&item["embedding"]));
        assert!(distance <= 1e-4, "{:?}: cosine distance {distance} from sentence-transformers", item["text"]);
        if distance > worst.0 {
            worst = (distance, item["text"].as_str().unwrap());
        }
        // Cut inputs say so; the others carry no flag at all.
        assert_eq!(
            got.get("truncated").and_then(Value::as_bool).unwrap_or(false),
            item["truncated"].as_bool().unwrap()
        );
    }
    println!("largest cosine distance from sentence-transformers: {:.3e} ({:?})", worst.0, worst.1);
    let tokens: u64 = items.iter().map(|i| i["tokens"].as_u64().unwrap()).sum();
    assert_eq!(body["usage"], json!({"prompt_tokens": tokens, "total_tokens": tokens}));

    let (status, encoded) =
        post(&server, &json!({"model": EMBED_MODEL_ID, "input": texts, "encoding_format": "base64"})).await;
    assert_eq!(status, 200, "{encoded}");
    assert_eq!(encoded["usage"], body["usage"]);
    for (plain, packed) in data.iter().zip(encoded["data"].as_array().unwrap()) {
        let bytes = base64::engine::general_purpose::STANDARD.decode(packed["embedding"].as_str().unwrap()).unwrap();
        let decoded: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(decoded, floats(&plain["embedding"]));
    }
}

#[tokio::test]
async fn a_text_alone_or_in_a_batch_or_as_token_ids_gets_the_same_vector() {
    let server = start();
    let texts = ["A man is eating food.", "Two men pushed carts through the woods.", "東京は日本の首都です。"];
    let (_, batch) = post(&server, &json!({"model": EMBED_MODEL_ID, "input": texts})).await;
    let mut tokenizer = tokenizers::Tokenizer::from_file(embed_model().join("tokenizer.json")).unwrap();
    // The file pads and cuts to 128 for training; the server takes the word pieces alone.
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).unwrap();
    let mut lists = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let batched = floats(&batch["data"][i]["embedding"]);
        let (status, alone) = post(&server, &json!({"model": EMBED_MODEL_ID, "input": text})).await;
        assert_eq!(status, 200, "{alone}");
        assert_eq!(alone["data"].as_array().unwrap().len(), 1);
        assert!(cosine_distance(&floats(&alone["data"][0]["embedding"]), &batched) < 1e-6);
        let ids: Vec<u32> = tokenizer.encode(*text, false).unwrap().get_ids().to_vec();
        let (status, by_ids) = post(&server, &json!({"model": EMBED_MODEL_ID, "input": ids})).await;
        assert_eq!(status, 200, "{by_ids}");
        assert!(cosine_distance(&floats(&by_ids["data"][0]["embedding"]), &batched) < 1e-6);
        assert_eq!(by_ids["usage"], alone["usage"], "the server adds [CLS] and [SEP] to token ids");
        lists.push(ids);
    }
    let (status, by_lists) = post(&server, &json!({"model": EMBED_MODEL_ID, "input": lists})).await;
    assert_eq!(status, 200, "{by_lists}");
    assert_eq!(by_lists["usage"], batch["usage"]);
    for i in 0..texts.len() {
        let d = cosine_distance(&floats(&by_lists["data"][i]["embedding"]), &floats(&batch["data"][i]["embedding"]));
        assert!(d < 1e-6);
    }

    // Concurrent requests (merged by the batcher when they arrive together) each get their own.
    let requests = (0..12).map(|i| {
        let server = &server;
        async move { post(server, &json!({"model": EMBED_MODEL_ID, "input": [texts[i % 3], "filler"]})).await }
    });
    for (i, (status, body)) in futures::future::join_all(requests).await.into_iter().enumerate() {
        assert_eq!(status, 200, "{body}");
        let d = cosine_distance(&floats(&body["data"][0]["embedding"]), &floats(&batch["data"][i % 3]["embedding"]));
        assert!(d < 1e-6, "request {i}: {d}");
    }
}

#[tokio::test]
async fn models_list_the_embedding_model_with_its_kind_and_metrics_count_it() {
    let server = start();
    let models: Value = client().get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let data = models["data"].as_array().unwrap();
    let card = |id: &str| data.iter().find(|c| c["id"] == id).cloned().unwrap_or_else(|| panic!("{id} in {models}"));
    assert_eq!(card(EMBED_MODEL_ID)["kind"], "embedding");
    assert_eq!(card(EMBED_MODEL_ID)["max_model_len"], 256);
    assert_eq!(card("echo")["kind"], "chat");

    let (status, body) = post(&server, &json!({"model": EMBED_MODEL_ID, "input": ["one", "two", "three"]})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(&server, &json!({"model": EMBED_MODEL_ID, "input": []})).await;
    assert_eq!(status, 400);
    let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let route = ("route", "/v1/embeddings");
    let model = ("model", EMBED_MODEL_ID);
    assert_eq!(metric_with(&page, "switchyard_requests_total", &[route, ("status", "200"), model]), Some(1.0));
    assert_eq!(metric_with(&page, "switchyard_requests_total", &[route, ("status", "400"), ("model", "")]), Some(1.0));
    assert_eq!(metric_with(&page, "switchyard_embedding_inputs_total", &[model]), Some(3.0), "{page}");
    assert_eq!(
        metric_with(&page, "switchyard_prompt_tokens_total", &[model]),
        body["usage"]["prompt_tokens"].as_f64(),
        "{page}"
    );
    assert_eq!(metric_with(&page, "switchyard_embedding_batch_size_sum", &[]), Some(3.0), "{page}");
}

#[tokio::test]
async fn every_bad_input_gets_a_4xx_in_the_openai_shape() {
    let server = start();
    let m = EMBED_MODEL_ID;
    let many = vec!["x"; 2049];
    let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
        (json!({"model": m, "input": []}), 400, Some("input"), "invalid_value"),
        (json!({"model": m, "input": ""}), 400, Some("input"), "invalid_value"),
        (json!({"model": m, "input": ["a", ""]}), 400, Some("input[1]"), "invalid_value"),
        (json!({"model": m, "input": [[101], []]}), 400, Some("input[1]"), "invalid_value"),
        (json!({"model": m, "input": many}), 400, Some("input"), "invalid_value"),
        (json!({"model": m, "input": [5, 30522]}), 400, Some("input[1]"), "invalid_value"),
        (json!({"model": m, "input": [[5], [6, 99999]]}), 400, Some("input[1][1]"), "invalid_value"),
        (json!({"model": m, "input": [1, -2]}), 400, Some("input"), "invalid_type"),
        (json!({"model": m, "input": ["a", 1]}), 400, Some("input"), "invalid_type"),
        (json!({"model": m, "input": [1.5]}), 400, Some("input"), "invalid_type"),
        (json!({"model": m, "input": {"text": "a"}}), 400, Some("input"), "invalid_type"),
        (json!({"model": m, "input": null}), 400, Some("input"), "invalid_type"),
        (json!({"model": m}), 400, None, "invalid_type"),
        (json!({"model": m, "input": "a", "dimensions": 128}), 400, Some("dimensions"), "unsupported_parameter"),
        (json!({"model": m, "input": "a", "encoding_format": "int8"}), 400, Some("encoding_format"), "invalid_type"),
        (json!({"model": m, "input": "a", "truncate": "END"}), 400, Some("truncate"), "unknown_parameter"),
        (json!({"model": "echo", "input": "a"}), 400, Some("model"), "invalid_value"),
        (json!({"model": "text-embedding-3-small", "input": "a"}), 404, Some("model"), "model_not_found"),
    ];
    for (body, status, param, code) in cases {
        let (got, answer) = post(&server, &body).await;
        let shown = body.to_string();
        let shown = &shown[..shown.len().min(120)];
        assert_eq!(got, status, "{shown}: {answer}");
        assert_eq!(answer["error"]["param"].as_str(), param, "{shown}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{shown}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{shown}: {answer}");
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
    }
    let res = client()
        .post(server.url("/v1/embeddings"))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "invalid_json");
    // Nothing above reached the model, and the server still answers.
    let (status, _) = post(&server, &json!({"model": m, "input": "still here"})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn with_embeddings_off_the_model_is_not_found_and_not_listed() {
    let server = Server::start_raw(&["--engine".into(), "echo".into(), "--embed-model".into(), "off".into()]);
    let (status, body) = post(&server, &json!({"model": EMBED_MODEL_ID, "input": "a"})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    let models: Value = client().get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert!(models["data"].as_array().unwrap().iter().all(|c| c["kind"] == "chat"), "{models}");
}

#[test]
fn a_bad_embed_model_path_stops_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    for path in [dir.path().join("missing"), dir.path().to_owned()] {
        if path == dir.path() {
            // A directory with a config.json but no weights gets past the settings check and
            // fails when loading, still naming the setting.
            std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["serve", "--port", "0", "--auth", "off", "--engine", "echo", "--embed-model"])
            .arg(&path)
            .env_remove("SWITCHYARD_EMBED_MODEL")
            .output()
            .expect("run switchyard");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("embed_model") && stderr.contains(&*path.to_string_lossy()), "{stderr}");
    }
}
