//! Feedback over HTTP: every answer is logged, feedback names an answer of the caller's tenant
//! once, bad bodies are 4xx, admins review corrections, and all of it survives a restart.

mod common;

use common::{client, sse_data, Server};
use serde_json::{json, Value};

const SECRET: &str = "feedback-test-secret-0123456789";

fn mint(sub: &str, tenant: &str, role: &str) -> String {
    common::mint_token(SECRET, sub, tenant, role)
}

fn start(root: &std::path::Path, extra: &[&str]) -> Server {
    let model = root.join("tiny-llama");
    if !model.exists() {
        runtime::testing::write_tiny_llama(&model, 5).unwrap();
    }
    let mut args: Vec<String> = [
        "--model",
        &model.display().to_string(),
        "--data-dir",
        &root.join("data").display().to_string(),
        "--auth",
        "on",
        "--jwt-hs256-secret",
        SECRET,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start_raw(&args)
}

async fn post(server: &Server, path: &str, token: &str, body: Value) -> (u16, Value) {
    let res = client().post(server.url(path)).bearer_auth(token).json(&body).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn get(server: &Server, path: &str, token: &str) -> (u16, Value) {
    let res = client().get(server.url(path)).bearer_auth(token).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

fn completion_log(root: &std::path::Path) -> String {
    let dir = root.join("data").join(protocol::names::FEEDBACK_DIR);
    let mut text = String::new();
    for (_, path) in protocol::names::completion_logs(&dir).unwrap() {
        text.push_str(&std::fs::read_to_string(path).unwrap());
    }
    text
}

#[tokio::test]
async fn feedback_names_an_answer_once_is_reviewed_and_survives_a_restart() {
    let root = tempfile::tempdir().unwrap();
    let mut server = start(root.path(), &[]);
    let (alice, bob, admin) =
        (mint("alice", "acme", "user"), mint("bob", "globex", "user"), mint("root", "acme", "admin"));
    let chat = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "the cat sat"}], "max_tokens": 4, "temperature": 0});

    // One answer as JSON, one streamed; both are logged with their prompts.
    let (status, answer) = post(&server, "/v1/chat/completions", &alice, chat.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let id1 = answer["id"].as_str().unwrap().to_owned();
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let text = client()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&alice)
        .json(&streamed)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let first: Value = serde_json::from_str(&sse_data(&text)[0]).unwrap();
    let id2 = first["id"].as_str().unwrap().to_owned();
    let log = completion_log(root.path());
    assert!(log.contains(&id1) && log.contains(&id2) && log.contains("the cat sat"), "{log}");

    // Feedback on an answer: stored once per user, only within the answer's tenant.
    let (status, fb) = post(
        &server,
        "/v1/feedback",
        &alice,
        json!({"response_id": id1, "thumbs": "up", "rating": 5, "tags": ["helpful"]}),
    )
    .await;
    assert_eq!(status, 201, "{fb}");
    assert_eq!(
        (fb["object"].as_str(), fb["model"].as_str(), fb["tenant"].as_str()),
        (Some("feedback"), Some("tiny-llama"), Some("acme"))
    );
    let (status, body) = post(&server, "/v1/feedback", &alice, json!({"response_id": id1, "thumbs": "down"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")));
    let (status, _) = post(&server, "/v1/feedback", &bob, json!({"response_id": id1, "thumbs": "down"})).await;
    assert_eq!(status, 404, "another tenant's answer does not exist for bob");

    // Bad bodies: clear 4xx, never stored.
    let bad = [
        (json!({"response_id": "chatcmpl-nope", "thumbs": "up"}), 404, None),
        (json!({"response_id": id2, "rating": 7}), 400, Some("rating")),
        (json!({"response_id": id2}), 400, None),
        (json!({"response_id": id2, "thumbs": "sideways"}), 400, Some("thumbs")),
        (json!({"response_id": id2, "thumbs": "up", "extra": 1}), 400, None),
        (json!({"response_id": "", "thumbs": "up"}), 400, Some("response_id")),
        (json!({"response_id": id2, "tags": [""]}), 400, Some("tags")),
    ];
    for (body, want, param) in bad {
        let (status, err) = post(&server, "/v1/feedback", &alice, body.clone()).await;
        assert_eq!(status, want, "{body}: {err}");
        if let Some(p) = param {
            assert_eq!(err["error"]["param"], p, "{body}");
        }
    }
    let (status, fb2) = post(
        &server,
        "/v1/feedback",
        &alice,
        json!({"response_id": id2, "thumbs": "down", "correction": "The cat sat on the mat."}),
    )
    .await;
    assert_eq!(status, 201, "{fb2}");

    // The review queue: users may not see it; admins accept (with an edit) or reject.
    assert_eq!(get(&server, "/admin/feedback", &alice).await.0, 403);
    let (_, pending) = get(&server, "/admin/feedback?status=pending", &admin).await;
    assert_eq!(pending["data"].as_array().unwrap().len(), 2, "{pending}");
    let fb2_id = fb2["id"].as_str().unwrap();
    let (status, reviewed) = post(
        &server,
        &format!("/admin/feedback/{fb2_id}/review"),
        &admin,
        json!({"action": "accept", "correction": "The cat sat on the red mat."}),
    )
    .await;
    assert_eq!(status, 200, "{reviewed}");
    assert_eq!(reviewed["accepted_correction"], "The cat sat on the red mat.");
    let (status, _) = post(&server, "/admin/feedback/fb-missing/review", &admin, json!({"action": "reject"})).await;
    assert_eq!(status, 404);
    let (status, _) = post(
        &server,
        &format!("/admin/feedback/{}/review", fb["id"].as_str().unwrap()),
        &admin,
        json!({"action": "reject", "correction": "x"}),
    )
    .await;
    assert_eq!(status, 400);

    // A restart reloads answers, feedback and reviews from disk.
    assert!(server.terminate().success());
    let server = start(root.path(), &[]);
    let (status, _) = post(&server, "/v1/feedback", &alice, json!({"response_id": id1, "rating": 1})).await;
    assert_eq!(status, 409, "still a duplicate after the restart");
    let (_, accepted) = get(&server, "/admin/feedback?status=accepted", &admin).await;
    let accepted = accepted["data"].as_array().unwrap().clone();
    assert_eq!(accepted.len(), 1);
    assert_eq!(
        (accepted[0]["id"].as_str(), accepted[0]["accepted_correction"].as_str()),
        (Some(fb2_id), Some("The cat sat on the red mat."))
    );
}

#[tokio::test]
async fn redacted_logs_keep_no_message_text() {
    let root = tempfile::tempdir().unwrap();
    let server = start(root.path(), &["--feedback-log", "redact"]);
    let alice = mint("alice", "acme", "user");
    let chat = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "the red dog is mine"}], "max_tokens": 3});
    let (status, answer) = post(&server, "/v1/chat/completions", &alice, chat).await;
    assert_eq!(status, 200);
    let log = completion_log(root.path());
    assert!(
        log.contains(answer["id"].as_str().unwrap())
            && !log.contains("red dog")
            && log.contains(protocol::names::REDACTED),
        "{log}"
    );
    // Feedback still works on a redacted answer.
    let (status, _) = post(&server, "/v1/feedback", &alice, json!({"response_id": answer["id"], "thumbs": "up"})).await;
    assert_eq!(status, 201);
}
