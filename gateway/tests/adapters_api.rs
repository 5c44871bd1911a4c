//! Adapters over HTTP: register versions, route by name / version / alias, promote, roll back,
//! reject bad uploads without touching the registry, and keep aliases across a restart.

mod common;

use std::path::Path;

use common::{client, Server};
use serde_json::{json, Value};

const TOKEN: &str = "test-admin-token";

fn start(model: &Path, data: &Path, imports: &Path) -> Server {
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--engine",
        "candle",
        "--data-dir",
        &data.display().to_string(),
        "--admin-token",
        TOKEN,
        "--import-root",
        &imports.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Server::start_raw(&args)
}

async fn upload(server: &Server, name: &str, dir: &Path) -> reqwest::Response {
    let form = reqwest::multipart::Form::new()
        .part(
            "adapter_config.json",
            reqwest::multipart::Part::bytes(std::fs::read(dir.join("adapter_config.json")).unwrap())
                .file_name("adapter_config.json"),
        )
        .part(
            "adapter_model.safetensors",
            reqwest::multipart::Part::bytes(std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
                .file_name("adapter_model.safetensors"),
        );
    client()
        .post(server.url(&format!("/admin/adapters/{name}/versions")))
        .bearer_auth(TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

async fn admin(server: &Server, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, server.url(path)).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn answer(server: &Server, model: &str) -> (u16, String) {
    // Seeded sampling: the text depends on the whole distribution, so any adapter shows.
    let body = json!({"model": model, "prompt": "the cat sat on", "max_tokens": 12, "temperature": 1.5, "seed": 7, "ignore_eos": true});
    answer_body(server, &body).await
}

#[tokio::test]
async fn versions_aliases_promote_rollback_and_restart() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    let shape = runtime::testing::write_tiny_llama(&model, 3).unwrap();
    let imports = root.path().join("imports");
    let data = root.path().join("data");
    runtime::testing::write_random_adapter(&imports.join("v1"), &shape, 4, 10, false).unwrap();
    runtime::testing::write_random_adapter(&imports.join("v2"), &shape, 4, 20, false).unwrap();
    let server = start(&model, &data, &imports);

    // The admin API wants the token.
    let res = client().get(server.url("/admin/adapters")).send().await.unwrap();
    assert_eq!(res.status(), 401);

    // Version 1 by upload, version 2 by import from the import root.
    let res = upload(&server, "bot", &imports.join("v1")).await;
    assert_eq!(res.status(), 201);
    let v1: Value = res.json().await.unwrap();
    assert_eq!((v1["name"].as_str(), v1["version"].as_u64()), (Some("bot"), Some(1)));
    assert_eq!(v1["sha256"].as_str().unwrap().len(), 64);
    let (status, v2) =
        admin(&server, reqwest::Method::POST, "/admin/adapters/bot/versions", Some(json!({"path": "v2"}))).await;
    assert_eq!((status, v2["version"].as_u64()), (201, Some(2)));

    // Routing: base, exact versions; no `prod` alias yet, so the bare name is unknown.
    let (_, base) = answer(&server, "tiny-llama").await;
    let (s1, at1) = answer(&server, "bot@1").await;
    let (s2, at2) = answer(&server, "bot@2").await;
    assert_eq!((s1, s2), (200, 200));
    assert_ne!(at1, base, "an adapter changes the answer");
    assert_ne!(at1, at2, "two versions, two answers");
    assert_eq!(answer(&server, "bot").await.0, 404);
    assert_eq!(answer(&server, "bot@9").await.0, 404);

    // Promote, compare-and-set, roll back.
    let (status, _) =
        admin(&server, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", Some(json!({"version": 1}))).await;
    assert_eq!(status, 200);
    assert_eq!(answer(&server, "bot").await.1, at1);
    let (status, err) = admin(
        &server,
        reqwest::Method::PUT,
        "/admin/adapters/bot/aliases/prod",
        Some(json!({"version": 2, "expected_version": 2})),
    )
    .await;
    assert_eq!(status, 409, "{err}");
    let (status, _) = admin(
        &server,
        reqwest::Method::PUT,
        "/admin/adapters/bot/aliases/prod",
        Some(json!({"version": 2, "expected_version": 1})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer(&server, "bot").await.1, at2);
    assert_eq!(answer(&server, "bot@prod").await.1, at2);
    let (status, change) =
        admin(&server, reqwest::Method::POST, "/admin/adapters/bot/aliases/prod/rollback", None).await;
    assert_eq!((status, change["to"].as_u64()), (200, Some(1)));
    assert_eq!(answer(&server, "bot").await.1, at1);

    // Bad uploads are refused with the registry unchanged.
    let bad = root.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(imports.join("v1/adapter_config.json"), bad.join("adapter_config.json")).unwrap();
    std::fs::write(bad.join("adapter_model.safetensors"), b"not a safetensors file").unwrap();
    let res = upload(&server, "bot", &bad).await;
    assert_eq!(res.status(), 400);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_adapter");
    // An adapter made for another base (different hidden size) is refused the same way.
    let mut other = shape.clone();
    other.hidden_size = 48;
    other.name = "other-llama".into();
    runtime::testing::write_random_adapter(&root.path().join("other"), &other, 4, 99, false).unwrap();
    let res = upload(&server, "bot", &root.path().join("other")).await;
    assert_eq!(res.status(), 400);
    let err: Value = res.json().await.unwrap();
    assert!(matches!(err["error"]["code"].as_str(), Some("invalid_adapter" | "base_mismatch")), "{err}");
    let (_, escape) =
        admin(&server, reqwest::Method::POST, "/admin/adapters/bot/versions", Some(json!({"path": "../data"}))).await;
    assert_eq!(escape["error"]["code"], "path_escape", "{escape}");
    let (_, listing) = admin(&server, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(listing["versions"].as_array().unwrap().len(), 2, "{listing}");

    // A version an alias points to cannot be deleted.
    let (status, _) = admin(&server, reqwest::Method::DELETE, "/admin/adapters/bot/versions/1", None).await;
    assert_eq!(status, 409);

    // /v1/models lists the adapter under every name that routes, with its parent.
    let models: Value = client().get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    for id in ["tiny-llama", "bot", "bot@prod", "bot@1", "bot@2"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    let bot = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "bot").unwrap();
    assert_eq!((bot["parent"].as_str(), bot["version"].as_u64()), (Some("tiny-llama"), Some(1)));

    // The audit log, newest first.
    let (_, audit) = admin(&server, reqwest::Method::GET, "/admin/audit?limit=2", None).await;
    assert_eq!(audit["data"][0]["action"], "rollback", "{audit}");

    // A restart reloads versions and aliases from disk.
    drop(server);
    let server = start(&model, &data, &imports);
    assert_eq!(answer(&server, "bot").await.1, at1);
    assert_eq!(answer(&server, "bot@2").await.1, at2);
}

/// actix's own extractors (path, query) fail in the OpenAI error shape like every handler, and
/// the admin check is the same on every admin route.
#[tokio::test]
async fn extractor_errors_come_in_the_openai_shape() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 5).unwrap();
    let imports = root.path().join("imports");
    std::fs::create_dir_all(&imports).unwrap();
    let server = start(&model, &root.path().join("data"), &imports);
    for (path, status, code) in [
        ("/admin/adapters/x/versions/-1", 404, "not_found"),
        ("/admin/adapters/x/versions/99999999999999999999999", 404, "not_found"),
        ("/admin/audit?offset=-1", 400, "invalid_value"),
        ("/admin/audit?limit=many", 400, "invalid_value"),
        ("/admin/feedback?limit=-5", 400, "invalid_value"),
        ("/admin/finetune/jobs/ftjob-1/events?after=x", 400, "invalid_value"),
    ] {
        let res = client().get(server.url(path)).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{path}");
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/json"), "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{path}: {body}");
    }
    // Every admin route answers a wrong token with 401 and a missing one likewise.
    for path in ["/admin/adapters", "/admin/audit", "/admin/feedback", "/admin/finetune/jobs"] {
        let res = client().get(server.url(path)).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(res.status().as_u16(), 401, "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key", "{path}");
    }
}

/// The admin check does not depend on the engine: on one that serves no adapters (echo), the
/// feedback-review and training-job routes work and only the adapter routes answer 503.
#[tokio::test]
async fn admin_routes_without_adapters_still_authorize() {
    let root = tempfile::tempdir().unwrap();
    let args: Vec<String> =
        ["--engine", "echo", "--data-dir", &root.path().join("data").display().to_string(), "--admin-token", TOKEN]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let server = Server::start_raw(&args);
    for (path, status) in [("/admin/feedback", 200), ("/admin/finetune/jobs", 200), ("/admin/adapters", 503)] {
        let (got, body) = admin(&server, reqwest::Method::GET, path, None).await;
        assert_eq!(got, status, "{path}: {body}");
        let res = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 401, "{path} without the token");
    }
}

/// A request resolves its adapter version once: a promote while it streams does not change it.
#[tokio::test]
async fn a_running_request_keeps_its_version_across_a_promote() {
    use futures::StreamExt;
    let root = tempfile::tempdir().unwrap();
    let shape = adapters::BaseModelShape::smollm2_135m();
    let imports = root.path().join("imports");
    runtime::testing::write_random_adapter(&imports.join("v1"), &shape, 4, 10, false).unwrap();
    runtime::testing::write_random_adapter(&imports.join("v2"), &shape, 4, 20, false).unwrap();
    let server = start(&common::default_model(), &root.path().join("data"), &imports);
    for v in ["v1", "v2"] {
        let (status, _) =
            admin(&server, reqwest::Method::POST, "/admin/adapters/bot/versions", Some(json!({"path": v}))).await;
        assert_eq!(status, 201);
    }
    admin(&server, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", Some(json!({"version": 1}))).await;
    let request = |model: &str, stream: bool| {
        json!({"model": model, "prompt": "Once upon a time", "max_tokens": 120,
        "temperature": 1.0, "seed": 3, "ignore_eos": true, "stream": stream})
    };
    let (_, v1) = answer_body(&server, &request("bot@1", false)).await;
    let (_, v2) = answer_body(&server, &request("bot@2", false)).await;
    assert_ne!(v1, v2);

    // Start streaming `bot` (prod = 1), promote prod to 2 after the first chunk, read the rest.
    let res = client().post(server.url("/v1/completions")).json(&request("bot", true)).send().await.unwrap();
    let mut body = res.bytes_stream();
    let mut raw = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    let (status, _) =
        admin(&server, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", Some(json!({"version": 2}))).await;
    assert_eq!(status, 200);
    while let Some(chunk) = body.next().await {
        raw.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let streamed: String = common::sse_data(&raw)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(streamed, v1, "the running request switched versions mid-answer");
    // New requests get the promoted version.
    assert_eq!(answer_body(&server, &request("bot", false)).await.1, v2);
}

async fn answer_body(server: &Server, body: &Value) -> (u16, String) {
    let res = client().post(server.url("/v1/completions")).json(body).send().await.unwrap();
    let status = res.status().as_u16();
    let v: Value = res.json().await.unwrap();
    (status, v["choices"][0]["text"].as_str().unwrap_or_default().to_owned())
}

/// Loaded versions live under a memory budget; the least recently used one is evicted first.
#[tokio::test]
async fn the_adapter_cache_evicts_least_recently_used_versions() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    let shape = runtime::testing::write_tiny_llama(&model, 3).unwrap();
    let imports = root.path().join("imports");
    for (i, name) in ["a", "b"].iter().enumerate() {
        runtime::testing::write_random_adapter(&imports.join(name), &shape, 4, 50 + i as u64, false).unwrap();
    }
    // A budget of 0 MiB holds exactly the version in use.
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--data-dir",
        &root.path().join("data").display().to_string(),
        "--admin-token",
        TOKEN,
        "--import-root",
        &imports.display().to_string(),
        "--adapter-cache-mb",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::start_raw(&args);
    for name in ["a", "b"] {
        let (status, _) = admin(
            &server,
            reqwest::Method::POST,
            &format!("/admin/adapters/{name}/versions"),
            Some(json!({"path": name})),
        )
        .await;
        assert_eq!(status, 201);
    }
    for model in ["a@1", "b@1", "b@1", "a@1"] {
        assert_eq!(answer(&server, model).await.0, 200);
    }
    let page = client().get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let count = |event: &str| common::metric(&page, &format!("switchyard_adapter_cache_total{{event=\"{event}\"}}"));
    assert_eq!((count("miss"), count("hit"), count("eviction")), (Some(3.0), Some(1.0), Some(2.0)), "{page}");
}
