//! Crash debris in every JSONL file the gateway and the sidecar read: a torn tail of random
//! bytes (cut inside a record, not UTF-8, garbage) appended to each one never stops the gateway
//! from restarting, nor the sidecar from reading feedback, and no complete record is lost.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{client, free_port, PrivateRedis, Server};
use finetune::sidecar::SidecarConfig;
use protocol::jobs::StepLog;
use protocol::jsonl::{Appender, Durability};
use protocol::names;
use protocol::{Envelope, ReviewStatus};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const TOKEN: &str = "torn-tails-admin-token";

fn start(model: &Path, data: &Path, redis: &str) -> Server {
    let args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--data-dir",
        &data.display().to_string(),
        "--admin-token",
        TOKEN,
        "--redis-url",
        redis,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Server::start_raw(&args)
}

async fn call(server: &Server, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method, server.url(path)).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    call(server, reqwest::Method::POST, path, Some(body)).await
}

/// One chat answer and a correction of it; returns (response id, feedback id).
async fn answer_and_correct(server: &Server, i: usize) -> (String, String) {
    let chat = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": format!("the cat {i}")}], "max_tokens": 3});
    let (status, answer) = post(server, "/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let (status, fb) =
        post(server, "/v1/feedback", json!({"response_id": id, "thumbs": "down", "correction": "paris"})).await;
    assert_eq!(status, 201, "{fb}");
    (id, fb["id"].as_str().unwrap().to_owned())
}

async fn review(server: &Server, feedback_id: &str, action: &str) {
    let (status, body) =
        post(server, &format!("/admin/feedback/{feedback_id}/review"), json!({"action": action})).await;
    assert_eq!(status, 200, "{body}");
}

/// What a crash mid-write leaves, and worse: the first part of a record cut inside a
/// multi-byte character, then random bytes (which may hold newlines of their own).
fn append_torn_tail(path: &Path, rng: &mut rand::rngs::StdRng) {
    assert!(path.is_file(), "{} exists before the crash", path.display());
    let mut tail = b"{\"id\": \"torn-\xc3".to_vec();
    tail.extend((0..rng.random_range(16..64)).map(|_| rng.random::<u8>()));
    tail.push(0xff);
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    std::io::Write::write_all(&mut file, &tail).unwrap();
}

/// Feedback ids with their review status, as the admin API lists them.
async fn statuses(server: &Server) -> Vec<(String, String)> {
    let (status, list) = call(server, reqwest::Method::GET, "/admin/feedback?limit=1000", None).await;
    assert_eq!(status, 200, "{list}");
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r["status"].as_str().unwrap().to_owned()))
        .collect()
}

fn sidecar(server: &Server, data: &Path, model: &Path, redis: Option<String>) -> SidecarConfig {
    SidecarConfig {
        data_dir: data.to_owned(),
        base: model.to_owned(),
        gateway: server.base.clone(),
        admin_token: TOKEN.into(),
        redis_url: redis,
        adapter: "bot".into(),
        feedback_from: None,
        feedback_task: None,
        // Read feedback only: never enough to queue a job.
        min_new_records: 1000,
        poll: Duration::from_millis(50),
        promote_margin: None,
        args: Default::default(),
        curate: Default::default(),
        once: true,
        progress: false,
    }
}

async fn run_sidecar(cfg: SidecarConfig) {
    tokio::task::spawn_blocking(move || finetune::sidecar::run(&cfg)).await.unwrap().unwrap();
}

async fn stream_entries(conn: &mut redis::aio::MultiplexedConnection) -> Vec<Envelope> {
    let reply: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(conn, names::FEEDBACK_STREAM).await.unwrap();
    reply.ids.iter().map(|e| Envelope::from_json(&e.get::<String>(names::STREAM_FIELD).unwrap()).unwrap()).collect()
}

#[tokio::test]
async fn torn_tails_of_random_bytes_never_stop_a_restart_or_lose_a_record() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny-llama");
    runtime::testing::write_tiny_llama(&model, 5).unwrap();
    let data = root.path().join("data");
    let feedback_dir = data.join(names::FEEDBACK_DIR);
    // Redis is configured but down at first, so every stream entry is spooled.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");

    let mut server = start(&model, &data, &url);
    let mut answers = Vec::new();
    for i in 0..4 {
        answers.push(answer_and_correct(&server, i).await);
    }
    review(&server, &answers[0].1, "accept").await;
    review(&server, &answers[1].1, "accept").await;
    review(&server, &answers[2].1, "reject").await;
    review(&server, &answers[3].1, "accept").await;
    review(&server, &answers[3].1, "reject").await;
    let spooled = protocol::jsonl::read::<Envelope>(&feedback_dir.join(names::SPOOL_FILE)).unwrap();
    assert_eq!(spooled.records.len(), 9, "4 records and 5 reviews wait for Redis");
    // A job with a loss curve, as the trainer leaves it (cancelled, so no sidecar runs it).
    let (status, job) =
        post(&server, "/admin/finetune/jobs", json!({"adapter": "bot", "dataset": {"kind": "feedback"}})).await;
    assert_eq!(status, 201, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    let (status, _) = post(&server, &format!("/admin/finetune/jobs/{job_id}/cancel"), json!({})).await;
    assert_eq!(status, 200);
    let train_log = data.join(names::FINETUNE_DIR).join(names::JOBS_DIR).join(&job_id).join(names::TRAIN_LOG_FILE);
    let mut log = Appender::open(&train_log).unwrap();
    for step in 1..=3 {
        let line = StepLog {
            step,
            total_steps: 3,
            epoch: step as f64 / 3.0,
            loss: 2.5 / step as f64,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens: 10,
            tokens_per_s: 100.0,
            elapsed_s: step as f64,
            val_loss: None,
            reward_accuracy: None,
        };
        log.append(&line, Durability::Synced).unwrap();
    }
    assert!(server.terminate().success());

    // The crash: every file the gateway reads gets a torn tail.
    let gateway_files: Vec<PathBuf> = vec![
        feedback_dir.join(names::completions_file(0)),
        feedback_dir.join(names::FEEDBACK_FILE),
        feedback_dir.join(names::REVIEWS_FILE),
        feedback_dir.join(names::SPOOL_FILE),
        train_log.clone(),
    ];
    for path in &gateway_files {
        append_torn_tail(path, &mut rng);
    }

    // It restarts, with every record, and says what it skipped.
    let _redis = PrivateRedis::start(port);
    let server = start(&model, &data, &url);
    let want: Vec<(String, String)> = answers
        .iter()
        .zip(["accepted", "accepted", "rejected", "rejected"])
        .map(|((_, fb), s)| (fb.clone(), s.to_owned()))
        .collect();
    assert_eq!(statuses(&server).await, want, "every feedback record and the last review of each");
    for (response_id, _) in &answers {
        let (status, body) = post(&server, "/v1/feedback", json!({"response_id": response_id, "thumbs": "up"})).await;
        assert_eq!(status, 409, "the answer and its feedback are both known again: {body}");
    }
    let (status, curve) =
        call(&server, reqwest::Method::GET, &format!("/admin/finetune/jobs/{job_id}/events"), None).await;
    assert_eq!(status, 200);
    let steps: Vec<u64> = curve["data"].as_array().unwrap().iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3], "{curve}");
    // New records go on fresh lines after the debris.
    let fifth = answer_and_correct(&server, 4).await;
    review(&server, &fifth.1, "accept").await;
    answers.push(fifth);

    // The spool drains into the stream in order, its debris left behind.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut entries = stream_entries(&mut conn).await;
    while entries.len() < 11 {
        assert!(Instant::now() < deadline, "the spool never drained: {} entries", entries.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
        entries = stream_entries(&mut conn).await;
    }
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| match e {
            Envelope::Feedback(_) => "feedback",
            Envelope::Review(_) => "review",
        })
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "feedback").count(), 5, "{kinds:?}");
    assert_eq!(kinds.len(), 11, "4 + 5 spooled, then 1 + 1 new: {kinds:?}");
    assert_eq!(std::fs::read(feedback_dir.join(names::SPOOL_FILE)).unwrap(), b"", "spool emptied");
    let stderr = server.stderr();
    assert!(stderr.contains("skipping a line that is not a whole record"), "the skips are reported:\n{stderr}");

    // The sidecar reads the gateway's files, debris and all ...
    let view = finetune::dataset::read_feedback_dir(&feedback_dir).unwrap();
    let items = view.items();
    let got: Vec<(&str, ReviewStatus, bool)> =
        items.iter().map(|i| (i.feedback.id.as_str(), i.status, i.completion.is_some())).collect();
    use ReviewStatus::{Accepted, Rejected};
    let expected: Vec<(&str, ReviewStatus, bool)> = answers
        .iter()
        .zip([Accepted, Accepted, Rejected, Rejected, Accepted])
        .map(|((_, fb), s)| (fb.as_str(), s, true))
        .collect();
    assert_eq!(got, expected, "every record, its last review and its logged completion");
    assert!(view.skipped() >= 3, "the torn lines of three files: {}", view.skipped());
    run_sidecar(sidecar(&server, &data, &model, None)).await;

    // ... and the stream into its inbox, which survives debris of its own.
    let sidecar_data = root.path().join("sidecar");
    let inbox = sidecar_data.join(names::FINETUNE_DIR).join(finetune::sidecar::INBOX_FILE);
    run_sidecar(sidecar(&server, &sidecar_data, &model, Some(url.clone()))).await;
    append_torn_tail(&inbox, &mut rng);
    run_sidecar(sidecar(&server, &sidecar_data, &model, Some(url.clone()))).await;
    let view = finetune::dataset::read_inbox(&inbox).unwrap();
    let items = view.items();
    let got: Vec<(&str, ReviewStatus)> = items.iter().map(|i| (i.feedback.id.as_str(), i.status)).collect();
    let expected: Vec<(&str, ReviewStatus)> = expected.iter().map(|(id, s, _)| (*id, *s)).collect();
    assert_eq!(got, expected, "every stream entry, kept once");
    assert!(view.skipped() >= 1);
    assert!(items[4].completion.is_some(), "an answer given while Redis was up is joined to its feedback in the inbox");

    // A last restart reads the files the gateway appended to after the debris.
    let mut server = server;
    assert!(server.terminate().success());
    let server = start(&model, &data, &url);
    let want: Vec<(String, String)> = expected
        .iter()
        .map(|(id, s)| (id.to_string(), if *s == Accepted { "accepted" } else { "rejected" }.to_owned()))
        .collect();
    assert_eq!(statuses(&server).await, want);
}
