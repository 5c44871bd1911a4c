//! The learning loop end to end, over HTTP against the real gateway: chat answers get feedback
//! with corrections, an admin accepts them, the `finetune` sidecar trains on them and registers
//! a new version as `candidate` (with metrics and lineage), and that version then serves. Run
//! with the embedded feedback files and with a real Redis stream; plus the admin job API.

mod common;

use common::{client, free_port, PrivateRedis, Server};
use finetune::job::CurateArgs;
use finetune::sidecar::SidecarConfig;
use protocol::params::TrainArgs;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const TOKEN: &str = "loop-admin-token";
const WORDS: [&str; 16] =
    ["a", "b", "c", "d", "the", "cat", "dog", "sat", "on", "mat", "red", "blue", "green", "hello", "world", "what"];

fn tiny_model(root: &Path) -> PathBuf {
    let model = root.join("tiny-llama");
    // A head of ±2: behind the final norm, the default ±0.3 cannot separate tokens much.
    runtime::testing::write_tiny_llama_with_head(&model, 3, 2.0).unwrap();
    model
}

fn start(model: &Path, data: &Path, extra: &[&str]) -> Server {
    let mut args: Vec<String> =
        ["--model", &model.display().to_string(), "--data-dir", &data.display().to_string(), "--admin-token", TOKEN]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start_raw(&args)
}

/// A distinct six-word prompt for each `i`.
fn prompt(i: usize) -> String {
    (0..6).map(|k| WORDS[(i * 7 + k * 5 + i / 3 + k * k) % WORDS.len()]).collect::<Vec<_>>().join(" ")
}

async fn chat(server: &Server, model: &str, text: &str) -> Value {
    let body =
        json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0});
    let resp = client().post(server.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn admin(server: &Server, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, server.url(path)).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Chats 24 times, corrects every answer to "paris" and accepts each correction.
async fn collect_feedback(server: &Server) {
    for i in 0..24 {
        let answer = chat(server, "tiny-llama", &prompt(i)).await;
        let id = answer["id"].as_str().unwrap();
        let fb = json!({"response_id": id, "thumbs": "down", "correction": "paris"});
        let resp = client().post(server.url("/v1/feedback")).json(&fb).send().await.unwrap();
        assert_eq!(resp.status(), 201);
        let record: Value = resp.json().await.unwrap();
        let (status, _) = admin(
            server,
            reqwest::Method::POST,
            &format!("/admin/feedback/{}/review", record["id"].as_str().unwrap()),
            Some(json!({"action": "accept"})),
        )
        .await;
        assert_eq!(status, 200);
    }
}

fn sidecar(server: &Server, data: &Path, model: &Path, redis: Option<String>) -> SidecarConfig {
    SidecarConfig {
        data_dir: data.to_owned(),
        base: model.to_owned(),
        gateway: server.base.clone(),
        admin_token: TOKEN.into(),
        redis_url: redis,
        adapter: "support-bot".into(),
        feedback_from: None,
        feedback_task: None,
        min_new_records: 20,
        poll: Duration::from_millis(200),
        promote_margin: None,
        args: TrainArgs { learning_rate: Some(1e-2), epochs: Some(10.0), val_ratio: Some(0.2), ..TrainArgs::default() },
        curate: CurateArgs::default(),
        once: true,
        progress: false,
    }
}

async fn run_sidecar(cfg: SidecarConfig) {
    tokio::task::spawn_blocking(move || finetune::sidecar::run(&cfg)).await.unwrap().unwrap();
}

/// The registered candidate: manifest with metrics and lineage, and it serves the correction.
async fn check_candidate(server: &Server) {
    let (status, jobs) = admin(server, reqwest::Method::GET, "/admin/finetune/jobs", None).await;
    assert_eq!(status, 200);
    let job = &jobs["data"][0];
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["version"], 1);
    let (_, adapter) = admin(server, reqwest::Method::GET, "/admin/adapters/support-bot", None).await;
    assert_eq!(adapter["aliases"]["candidate"]["version"], 1, "{adapter}");
    let typed: protocol::api::AdapterListing =
        serde_json::from_value(adapter.clone()).expect("the sidecar reads this body");
    assert_eq!(typed.aliases["candidate"].version, 1);
    assert!(adapter["aliases"].get("prod").is_none(), "no promotion policy: prod is left to an admin");
    let manifest = &adapter["versions"][0];
    assert_eq!(manifest["source"]["kind"], "training");
    assert_eq!(manifest["source"]["job_id"], job["id"]);
    let eval = manifest["metrics"]["eval"].as_array().unwrap();
    let row = |n: &str| eval.iter().find(|r| r["name"] == n).unwrap().clone();
    assert!(row("candidate")["val_loss"].as_f64().unwrap() < row("base")["val_loss"].as_f64().unwrap(), "{eval:?}");
    assert_eq!(manifest["lineage"]["dataset"]["format"], "feedback");
    assert_eq!(manifest["lineage"]["dataset"]["feedback"]["count"], 24, "{}", manifest["lineage"]);
    assert!(manifest["lineage"]["base_model"]["sha256"].as_str().is_some_and(|h| h.len() == 64));
    assert!(manifest["lineage"]["hyperparameters"]["lora_rank"].is_u64());
    // A prompt it never saw: the candidate answers with what the corrections taught it.
    let answer = chat(server, "support-bot@candidate", "hello the dog on a mat").await;
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap().trim().to_owned();
    assert_eq!(text, "paris", "{answer}");
    let base = chat(server, "tiny-llama", "hello the dog on a mat").await;
    assert_ne!(
        base["choices"][0]["message"]["content"].as_str().unwrap().trim(),
        "paris",
        "the base model does not say it by itself"
    );
}

#[tokio::test]
async fn feedback_files_become_a_registered_candidate_that_serves() {
    let root = tempfile::tempdir().unwrap();
    let model = tiny_model(root.path());
    let data = root.path().join("data");
    let server = start(&model, &data, &[]);
    collect_feedback(&server).await;
    run_sidecar(sidecar(&server, &data, &model, None)).await;
    check_candidate(&server).await;
    // Nothing new was accepted since: a second pass queues nothing.
    run_sidecar(sidecar(&server, &data, &model, None)).await;
    let (_, jobs) = admin(&server, reqwest::Method::GET, "/admin/finetune/jobs", None).await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_sidecar_reads_the_redis_stream_once_and_trains_on_it() {
    let port = free_port();
    let _redis = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    let root = tempfile::tempdir().unwrap();
    let model = tiny_model(root.path());
    // The sidecar does not see the gateway's files: everything comes through Redis.
    let gateway_data = root.path().join("gateway");
    let server = start(&model, &gateway_data, &["--redis-url", &url]);
    collect_feedback(&server).await;
    let sidecar_data = root.path().join("sidecar");
    // With a promotion policy and no `prod` yet, the candidate must beat the base model.
    let mut cfg = sidecar(&server, &sidecar_data, &model, Some(url.clone()));
    cfg.promote_margin = Some(0.5);
    run_sidecar(cfg).await;
    // The registry is the gateway's; the job queue is the sidecar's own here.
    let status: Vec<Value> = std::fs::read_dir(sidecar_data.join("finetune/jobs"))
        .unwrap()
        .map(|e| serde_json::from_slice(&std::fs::read(e.unwrap().path().join("status.json")).unwrap()).unwrap())
        .collect();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0]["state"], "succeeded", "{}", status[0]);
    let inbox = std::fs::read_to_string(sidecar_data.join("finetune/inbox.jsonl")).unwrap();
    let lines: Vec<Value> = inbox.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 48, "24 feedback records and 24 reviews, each once");
    assert!(
        lines.iter().filter(|l| l.get("response_id").is_some()).all(|l| l["completion"]["answer"].is_string()),
        "feedback joined to its answer"
    );
    let (_, adapter) = admin(&server, reqwest::Method::GET, "/admin/adapters/support-bot", None).await;
    assert_eq!(adapter["aliases"]["candidate"]["version"], 1, "{adapter}");
    assert_eq!(
        adapter["aliases"]["prod"]["version"], 1,
        "the policy promoted it: {}",
        status[0]["metrics"]["decision"]
    );
    let answer = chat(&server, "support-bot", "hello the dog on a mat").await;
    assert_eq!(answer["choices"][0]["message"]["content"].as_str().unwrap().trim(), "paris");
    // A restarted sidecar reads nothing twice.
    run_sidecar(sidecar(&server, &sidecar_data, &model, Some(url))).await;
    assert_eq!(std::fs::read_to_string(sidecar_data.join("finetune/inbox.jsonl")).unwrap().lines().count(), 48);
}

#[tokio::test]
async fn admins_start_follow_and_cancel_jobs_through_the_api() {
    let root = tempfile::tempdir().unwrap();
    let model = tiny_model(root.path());
    let data = root.path().join("data");
    let imports = root.path().join("imports");
    std::fs::create_dir_all(&imports).unwrap();
    let rows: String = (0..60).map(|i| format!("{}\n", json!({"instruction": prompt(i), "output": "paris"}))).collect();
    std::fs::write(imports.join("set.jsonl"), rows).unwrap();
    let server = start(&model, &data, &["--import-root", &imports.display().to_string()]);
    let jobs = "/admin/finetune/jobs";

    // Bad requests are refused before anything is queued.
    for (body, param) in [
        (
            json!({"adapter": "bot", "dataset": {"kind": "file", "path": "set.jsonl"}, "params": {"lora_rank": 0}}),
            "params",
        ),
        (
            json!({"adapter": "bot", "dataset": {"kind": "file", "path": "set.jsonl"}, "params": {"lora_rnak": 4}}),
            "params",
        ),
        (json!({"adapter": "bot", "dataset": {"kind": "file", "path": "missing.jsonl"}}), "dataset.path"),
        (json!({"adapter": "Bad Name!", "dataset": {"kind": "feedback"}}), "adapter"),
    ] {
        let (status, err) = admin(&server, reqwest::Method::POST, jobs, Some(body)).await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["param"], param, "{err}");
    }
    let (status, err) = admin(
        &server,
        reqwest::Method::POST,
        jobs,
        Some(json!({"adapter": "bot", "dataset": {"kind": "file", "path": "../outside.jsonl"}})),
    )
    .await;
    assert!(status == 400 || status == 403, "{err}");
    let (status, _) = admin(&server, reqwest::Method::GET, "/admin/finetune/jobs/ftjob-0000", None).await;
    assert_eq!(status, 404);
    let resp = client().get(server.url(jobs)).send().await.unwrap();
    assert_eq!(resp.status(), 401, "jobs need the admin token");

    // Datasets can also be uploaded; they are parsed before they are kept.
    let upload = |body: String| {
        let url = server.url("/admin/finetune/datasets");
        async move {
            let resp = client().post(url).bearer_auth(TOKEN).body(body).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, err) = upload("{\"instruction\": \"a\", \"output\": \"b\"}\nnot json\n".into()).await;
    assert_eq!((status, err["error"]["code"].as_str()), (400, Some("invalid_json")), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("line 2"), "{err}");
    let (status, uploaded) = upload(std::fs::read_to_string(imports.join("set.jsonl")).unwrap()).await;
    assert_eq!(status, 201, "{uploaded}");
    assert_eq!((uploaded["format"].as_str(), uploaded["examples"].as_u64()), (Some("alpaca"), Some(60)));
    let (status, err) = admin(
        &server,
        reqwest::Method::POST,
        jobs,
        Some(json!({"adapter": "bot", "dataset": {"kind": "uploaded", "id": "ds-0000000000000000"}})),
    )
    .await;
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("dataset.id")));

    // One job is cancelled while queued; the other runs.
    let (status, doomed) = admin(
        &server,
        reqwest::Method::POST,
        jobs,
        Some(json!({"adapter": "bot", "dataset": {"kind": "file", "path": "set.jsonl"}})),
    )
    .await;
    assert_eq!(status, 201);
    let path = format!("{jobs}/{}/cancel", doomed["id"].as_str().unwrap());
    let (status, cancelled) = admin(&server, reqwest::Method::POST, &path, None).await;
    assert_eq!((status, cancelled["state"].as_str()), (200, Some("cancelled")));
    let (status, _) = admin(&server, reqwest::Method::POST, &path, None).await;
    assert_eq!(status, 409, "a finished job cannot be cancelled");
    let params = json!({"learning_rate": 1e-2, "epochs": 3, "lora_rank": 4, "save_steps": 0});
    let (status, job) = admin(
        &server,
        reqwest::Method::POST,
        jobs,
        Some(json!({"adapter": "bot", "dataset": {"kind": "uploaded", "id": uploaded["id"]}, "params": params})),
    )
    .await;
    assert_eq!((status, job["state"].as_str()), (201, Some("queued")), "{job}");
    let id = job["id"].as_str().unwrap().to_owned();

    // Follow it over SSE while the sidecar runs it.
    let follow = {
        let url = server.url(&format!("{jobs}/{id}/events?stream=true"));
        tokio::spawn(async move { client().get(url).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap() })
    };
    run_sidecar(sidecar(&server, &data, &model, None)).await;
    let streamed = tokio::time::timeout(Duration::from_secs(30), follow)
        .await
        .expect("the event stream ends with the job")
        .unwrap();
    let events = common::sse_data(&streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let steps: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let (_, done) = admin(&server, reqwest::Method::GET, &format!("{jobs}/{id}"), None).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(steps.len(), done["total_steps"].as_u64().unwrap() as usize, "every step once");
    assert!(steps.iter().all(|s| s["loss"].is_f64()));
    let (_, curve) = admin(&server, reqwest::Method::GET, &format!("{jobs}/{id}/events?after=2"), None).await;
    assert_eq!(curve["data"][0]["step"], 3);
    let (_, listed) = admin(&server, reqwest::Method::GET, jobs, None).await;
    let states: Vec<&str> = listed["data"].as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap()).collect();
    assert_eq!(states.iter().filter(|s| **s == "succeeded").count(), 1);
    assert_eq!(states.iter().filter(|s| **s == "cancelled").count(), 1);
    let (_, adapter) = admin(&server, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(adapter["aliases"]["candidate"]["version"], 1);

    // A job whose data is bad fails with a reason and leaves the registry as it was.
    std::fs::write(
        imports.join("dups.jsonl"),
        format!("{}\n", json!({"instruction": "hi", "output": "paris"})).repeat(6),
    )
    .unwrap();
    let (_, bad) = admin(
        &server,
        reqwest::Method::POST,
        jobs,
        Some(json!({"adapter": "bot", "dataset": {"kind": "file", "path": "dups.jsonl"}})),
    )
    .await;
    run_sidecar(sidecar(&server, &data, &model, None)).await;
    let (_, failed) =
        admin(&server, reqwest::Method::GET, &format!("{jobs}/{}", bad["id"].as_str().unwrap()), None).await;
    assert_eq!(
        (failed["state"].as_str(), failed["error"]["code"].as_str()),
        (Some("failed"), Some("too_few_examples")),
        "{failed}"
    );
    let (_, after) = admin(&server, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(after["versions"].as_array().unwrap().len(), 1, "no version from a failed job");
    let report = data.join("finetune/jobs").join(bad["id"].as_str().unwrap()).join("report.json");
    assert!(report.is_file(), "the failed job still wrote its curation report");

    // Once a version serves as `prod`, the next job is evaluated against it too.
    let (status, _) =
        admin(&server, reqwest::Method::PUT, "/admin/adapters/bot/aliases/prod", Some(json!({"version": 1}))).await;
    assert_eq!(status, 200);
    let (_, second) = admin(
        &server,
        reqwest::Method::POST,
        jobs,
        Some(json!({"adapter": "bot", "dataset": {"kind": "file", "path": "set.jsonl"}, "params": params})),
    )
    .await;
    run_sidecar(sidecar(&server, &data, &model, None)).await;
    let (_, second) =
        admin(&server, reqwest::Method::GET, &format!("{jobs}/{}", second["id"].as_str().unwrap()), None).await;
    assert_eq!((second["state"].as_str(), second["version"].as_u64()), (Some("succeeded"), Some(2)), "{second}");
    let names: Vec<&str> =
        second["metrics"]["eval"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["base", "prod (v1)", "candidate"]);
    let (_, adapter) = admin(&server, reqwest::Method::GET, "/admin/adapters/bot", None).await;
    assert_eq!(
        (adapter["aliases"]["prod"]["version"].as_u64(), adapter["aliases"]["candidate"]["version"].as_u64()),
        (Some(1), Some(2)),
        "no policy: prod stays"
    );
}

#[tokio::test]
async fn a_promotion_margin_starts_a_release_on_prod_when_prod_serves() {
    let root = tempfile::tempdir().unwrap();
    let model = tiny_model(root.path());
    let imports = root.path().join("imports");
    // Version 1 changes nothing (B = 0): it scores as the base does.
    let shape = runtime::testing::tiny_llama_shape();
    runtime::testing::write_random_adapter(&imports.join("noop"), &shape, 4, 5, true).unwrap();
    let data = root.path().join("data");
    let server = start(&model, &data, &["--import-root", &imports.display().to_string()]);
    let (status, _) =
        admin(&server, reqwest::Method::POST, "/admin/adapters/support-bot/versions", Some(json!({"path": "noop"})))
            .await;
    assert_eq!(status, 201);
    let put = Some(json!({"version": 1}));
    assert_eq!(admin(&server, reqwest::Method::PUT, "/admin/adapters/support-bot/aliases/prod", put).await.0, 200);
    collect_feedback(&server).await;
    let mut cfg = sidecar(&server, &data, &model, None);
    cfg.promote_margin = Some(0.5);
    run_sidecar(cfg).await;

    // Offline evaluation started the release; prod is split, not moved.
    let (_, jobs) = admin(&server, reqwest::Method::GET, "/admin/finetune/jobs", None).await;
    let job = &jobs["data"][0];
    assert_eq!((job["state"].as_str(), job["version"].as_u64()), (Some("succeeded"), Some(2)), "{job}");
    assert_eq!(job["metrics"]["release_started"], true, "{}", job["metrics"]["decision"]);
    assert_eq!(job["promoted"], false);
    let (_, releases) = admin(&server, reqwest::Method::GET, "/admin/adapters/support-bot/releases", None).await;
    let release = &releases["data"][0];
    assert_eq!(
        (release["status"].as_str(), release["baseline"].as_u64(), release["policy"]["candidate"].as_u64()),
        (Some("running"), Some(1), Some(2)),
        "{release}"
    );
    let (_, adapter) = admin(&server, reqwest::Method::GET, "/admin/adapters/support-bot", None).await;
    assert_eq!(adapter["aliases"]["prod"]["version"], 1);
    assert_eq!(
        adapter["aliases"]["prod"]["routes"],
        json!([{"version": 1, "weight": 95}, {"version": 2, "weight": 5}])
    );
}
