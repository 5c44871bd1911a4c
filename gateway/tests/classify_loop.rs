//! The learning loop for `/v1/classify`, end to end on the default model: 60 support tickets
//! classified over HTTP into routing queues whose names mean nothing to the model, each
//! corrected through `/v1/feedback` and accepted by an admin; the `finetune` sidecar trains
//! an adapter on them (examples in the endpoint's own prompt format) and registers it as
//! `candidate`; then held-out tickets are classified through `/v1/classify` by the base model
//! and by the adapter, and the adapter must be clearly ahead.

mod common;

use common::{client, default_model, Server};
use finetune::job::CurateArgs;
use finetune::sidecar::SidecarConfig;
use protocol::params::TrainArgs;
use serde_json::{json, Value};
use std::time::Duration;

const TOKEN: &str = "classify-loop-admin";
/// Routing queues: billing, shipping and technical tickets, under names the model cannot guess.
const QUEUES: [&str; 3] = ["team-avon", "team-brook", "team-clyde"];
const TICKETS: [[&str; 8]; 3] = [
    [
        "I was charged twice for my order",
        "my invoice shows the wrong amount",
        "I need a refund for the last payment",
        "why did my card get billed again",
        "the subscription fee went up without notice",
        "please cancel the charge on my account",
        "I see an unknown payment on my statement",
        "the discount was not applied to my bill",
    ],
    [
        "my package has not arrived yet",
        "the tracking number does not work",
        "the parcel was delivered to the wrong address",
        "when will my order ship",
        "the courier left the box damaged",
        "delivery is three days late",
        "can I change the delivery address",
        "the shipment is stuck in customs",
    ],
    [
        "the app crashes when I open it",
        "I cannot log in to my account",
        "the page shows an error message",
        "the website is very slow today",
        "my password reset link is broken",
        "the update made the app freeze",
        "notifications stopped working on my phone",
        "the upload button does nothing",
    ],
];
const GREETINGS: [&str; 5] = ["Hi,", "Hello,", "Hey team,", "Dear support,", ""];
const CLOSINGS: [&str; 5] = ["Thanks.", "Please help.", "This is urgent.", "Regards.", ""];

/// `n` tickets with their queue, cycling the classes; cores `0..6` train, `6..8` are held out.
fn tickets(n: usize, held_out: bool, seed: u64) -> Vec<(String, &'static str)> {
    let mut state = seed;
    let mut pick = |k: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % k as u64) as usize
    };
    (0..n)
        .map(|i| {
            let class = i % 3;
            let core = if held_out { 6 + pick(2) } else { pick(6) };
            let parts = [GREETINGS[pick(5)], &format!("{}.", TICKETS[class][core]), CLOSINGS[pick(5)]];
            let text = parts.iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join(" ");
            (text, QUEUES[class])
        })
        .collect()
}

async fn classify(server: &Server, model: &str, text: &str) -> Value {
    let body = json!({"input": text, "labels": QUEUES, "model": model});
    let res = client().post(server.url("/v1/classify")).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

async fn admin(server: &Server, path: &str, body: Value) -> Value {
    let res = client().post(server.url(path)).bearer_auth(TOKEN).json(&body).send().await.unwrap();
    assert!(res.status().is_success(), "{path}: {}", res.status());
    res.json().await.unwrap()
}

async fn accuracy(server: &Server, model: &str, held_out: &[(String, &str)]) -> usize {
    let mut right = 0;
    for (text, want) in held_out {
        let got = classify(server, model, text).await;
        if got["results"][0]["label"] == *want {
            right += 1;
        }
    }
    right
}

#[tokio::test]
async fn classification_corrections_train_an_adapter_that_classifies_better() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let server = Server::start(&["--data-dir", &data.display().to_string(), "--admin-token", TOKEN]);
    let mut base_right_in_training = 0;
    for (text, queue) in tickets(60, false, 11) {
        let answer = classify(&server, common::MODEL_ID, &text).await;
        if answer["results"][0]["label"] == queue {
            base_right_in_training += 1;
        }
        let fb = json!({"response_id": answer["id"], "thumbs": if answer["results"][0]["label"] == queue { "up" } else { "down" }, "correction": queue});
        let res = client().post(server.url("/v1/feedback")).json(&fb).send().await.unwrap();
        assert_eq!(res.status(), 201);
        let record: Value = res.json().await.unwrap();
        admin(
            &server,
            &format!("/admin/feedback/{}/review", record["id"].as_str().unwrap()),
            json!({"action": "accept"}),
        )
        .await;
    }
    let cfg = SidecarConfig {
        data_dir: data.clone(),
        base: default_model(),
        gateway: server.base.clone(),
        admin_token: TOKEN.into(),
        redis_url: None,
        adapter: "ticket-router".into(),
        feedback_from: None,
        // Classification feedback only: an adapter for /v1/classify.
        feedback_task: Some("classify".into()),
        min_new_records: 60,
        poll: Duration::from_millis(200),
        promote_margin: None,
        args: TrainArgs { epochs: Some(4.0), learning_rate: Some(3e-3), val_ratio: Some(0.1), ..TrainArgs::default() },
        curate: CurateArgs::default(),
        once: true,
        progress: false,
    };
    tokio::task::spawn_blocking(move || finetune::sidecar::run(&cfg)).await.unwrap().unwrap();
    let res = client().get(server.url("/admin/finetune/jobs")).bearer_auth(TOKEN).send().await.unwrap();
    let jobs: Value = res.json().await.unwrap();
    assert_eq!(jobs["data"][0]["state"], "succeeded", "{jobs}");
    println!("training job: {}", jobs["data"][0]["metrics"]);

    let held_out = tickets(15, true, 99);
    let base = accuracy(&server, common::MODEL_ID, &held_out).await;
    let tuned = accuracy(&server, "ticket-router@candidate", &held_out).await;
    println!(
        "classification through /v1/classify, {} held-out tickets: base {base}/{n}, adapter {tuned}/{n} (base on the 60 training tickets: {base_right_in_training}/60)",
        held_out.len(),
        n = held_out.len()
    );
    assert!(tuned >= 12, "the adapter classifies most held-out tickets right: {tuned}/15");
    assert!(tuned >= base + 5, "the adapter is clearly ahead of the base model: {tuned} vs {base}");
}
