//! Export over HTTP: an adapter version merged into the default model, written as an f32 GGUF
//! and an HF safetensors directory, each served by a second gateway as its base model, answers
//! 20 prompts with the same greedy tokens and log-probabilities (within 1e-3) as the adapter
//! served on the original base.

mod common;

use std::path::{Path, PathBuf};

use common::{client, Server};
use serde_json::{json, Value};

const TOKEN: &str = "export-admin-token";

fn start(model: &Path, data: &Path, imports: Option<&Path>) -> Server {
    let mut args: Vec<String> = ["--model", &model.display().to_string(), "--data-dir", &data.display().to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--admin-token".to_owned(), TOKEN.to_owned(), "--model-id".to_owned(), "m".to_owned()]);
    if let Some(dir) = imports {
        args.extend(["--import-root".to_owned(), dir.display().to_string()]);
    }
    Server::start_raw(&args)
}

async fn admin(server: &Server, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let res = client().request(method, server.url(path)).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

const PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "How do I boil an egg?",
    "Name a famous painter.",
    "What does a pump do?",
    "Explain photosynthesis briefly.",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "Translate 'good morning' to Spanish.",
    "What is a LoRA adapter?",
    "Suggest a name for a dog.",
    "What colour are bananas?",
    "Tell me a fun fact about space.",
    "How many legs does a spider have?",
    "What is the opposite of cold?",
    "Recommend a book for children.",
    "Say hello politely.",
];

/// One generated token: its text, log-probability, and the top alternatives with theirs.
type Scored = (String, f64, Vec<(String, f64)>);

/// Greedy answer of `model`: its tokens (as the log-probability entries' text) and their
/// log-probabilities with the top 5 alternatives.
async fn greedy(server: &Server, model: &str, prompt: &str) -> Vec<Scored> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
        "temperature": 0, "logprobs": true, "top_logprobs": 5});
    let res = client().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let top = t["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| (a["token"].as_str().unwrap().to_owned(), a["logprob"].as_f64().unwrap()))
                .collect();
            (t["token"].as_str().unwrap().to_owned(), t["logprob"].as_f64().unwrap(), top)
        })
        .collect()
}

/// Largest log-probability differences over the chosen tokens, and over the shared top
/// alternatives; panics when a greedy token differs.
fn compare(reference: &[Scored], got: &[Scored], what: &str) -> (f64, f64) {
    assert_eq!(
        reference.iter().map(|t| &t.0).collect::<Vec<_>>(),
        got.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "{what}: the greedy tokens differ"
    );
    let (mut chosen, mut alternatives): (f64, f64) = (0.0, 0.0);
    for (r, g) in reference.iter().zip(got) {
        chosen = chosen.max((r.1 - g.1).abs());
        for (tok, lp) in &r.2 {
            if let Some((_, other)) = g.2.iter().find(|(t, _)| t == tok) {
                alternatives = alternatives.max((lp - other).abs());
            }
        }
    }
    (chosen, alternatives)
}

#[tokio::test]
async fn exported_models_answer_like_the_adapter_on_its_base() {
    let root = tempfile::tempdir().unwrap();
    let imports = root.path().join("imports");
    let shape = adapters::BaseModelShape::smollm2_135m();
    runtime::testing::write_bench_adapter(&imports.join("v1"), &shape, 8, 7).unwrap();
    let data = root.path().join("data");
    let server = start(&common::default_model(), &data, Some(&imports));
    let (status, _) =
        admin(&server, reqwest::Method::POST, "/admin/adapters/bot/versions", json!({"path": "v1"})).await;
    assert_eq!(status, 201);

    let (status, manifest) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/adapters/bot/versions/1/export",
        json!({"formats": ["gguf-f32", "safetensors"]}),
    )
    .await;
    assert_eq!(status, 200, "{manifest}");
    assert_eq!(manifest["adapter"]["version"], 1, "{manifest}");
    let out = data.join("exports/bot-1");
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 5, "one GGUF and the HF directory's four files: {manifest}");
    for f in files {
        let path: PathBuf = out.join(f["path"].as_str().unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), f["size_bytes"].as_u64().unwrap(), "{f}");
    }

    // Bad requests get 400s and 404s.
    for (body, path, status) in [
        (json!({"formats": ["gguf-q2_k"]}), "/admin/adapters/bot/versions/1/export", 400),
        (json!({"formats": []}), "/admin/adapters/bot/versions/1/export", 400),
        (json!({"format": "gguf-f32"}), "/admin/adapters/bot/versions/1/export", 400),
        (json!({}), "/admin/adapters/bot/versions/9/export", 404),
        (json!({}), "/admin/adapters/nope/versions/1/export", 404),
    ] {
        let (got, err) = admin(&server, reqwest::Method::POST, path, body.clone()).await;
        assert_eq!(got, status, "{body} -> {err}");
        assert!(err["error"]["message"].is_string(), "{err}");
    }

    let mut reference = Vec::new();
    for p in PROMPTS {
        reference.push(greedy(&server, "bot@1", p).await);
    }
    let base_differs = {
        let mut n = 0;
        for (p, r) in PROMPTS.iter().zip(&reference) {
            let base = greedy(&server, "m", p).await;
            n += usize::from(base.iter().map(|t| &t.0).ne(r.iter().map(|t| &t.0)));
        }
        n
    };
    eprintln!("the adapter changes the greedy answer of {base_differs} of 20 prompts");
    assert!(base_differs >= 1, "the adapter must change some answer for the comparison to mean anything");
    drop(server);

    for (what, model) in [("f32 GGUF", out.join("model-f32.gguf")), ("safetensors", out.join("hf"))] {
        let served = start(&model, &root.path().join(format!("data-{}", what.len())), None);
        let (mut chosen, mut alternatives): (f64, f64) = (0.0, 0.0);
        for (p, r) in PROMPTS.iter().zip(&reference) {
            let (c, a) = compare(r, &greedy(&served, "m", p).await, what);
            (chosen, alternatives) = (chosen.max(c), alternatives.max(a));
        }
        eprintln!(
            "{what} served as the base: 20 of 20 greedy answers equal; largest log-probability difference \
             {chosen:.2e} on the chosen tokens, {alternatives:.2e} on the top-5 alternatives"
        );
        assert!(chosen < 1e-3 && alternatives < 1e-2, "{what}: {chosen} {alternatives}");
    }
}
