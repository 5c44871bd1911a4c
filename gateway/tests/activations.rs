//! `--activations q8` over HTTP with the real model: 8-bit activations serve the same API, one
//! stream and a batch, with answers that still make sense (they need not equal the exact
//! engine's, which is why f32 is the default).

mod common;

use common::{client, Server, MODEL_ID};
use serde_json::{json, Value};

async fn ask(server: &Server, question: &str) -> String {
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 16});
    let res = client().post(server.url("/v1/chat/completions")).json(&body).send().await.expect("request");
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("json");
    body["choices"][0]["message"]["content"].as_str().expect("content").to_owned()
}

#[tokio::test]
async fn eight_bit_activations_answer_one_stream_and_a_batch_sensibly() {
    let server = Server::start(&["--engine", "candle", "--activations", "q8"]);
    let exact = Server::start(&["--engine", "candle"]);
    let question = "What is the capital of France?";
    let alone = ask(&server, question).await;
    assert!(alone.contains("Paris"), "q8 answered {alone:?}");
    assert!(ask(&exact, question).await.contains("Paris"));
    // Eight at once share decode steps (the batched kernels).
    let batch = futures::future::join_all((0..8).map(|_| ask(&server, question))).await;
    for answer in &batch {
        assert!(answer.contains("Paris"), "q8 in a batch answered {answer:?}");
    }
}

#[test]
fn an_unknown_activation_precision_stops_start_up_with_its_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--engine", "echo", "--auth", "off", "--activations", "int4"])
        .output()
        .expect("run switchyard");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("int4") && err.contains("expected f32 or q8"), "{err}");
}
