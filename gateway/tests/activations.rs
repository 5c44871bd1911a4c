//! `--activations q8` over HTTP with the real model: 8-bit activations serve the same API, one
//! stream and a batch, and answer as llama.cpp does (not as the exact engine does, which is
//! why f32 is the default).

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
async fn eight_bit_activations_answer_like_llama_cpp_alone_and_in_a_batch() {
    let server = Server::start(&["--engine", "candle", "--activations", "q8"]);
    let exact = Server::start(&["--engine", "candle"]);
    let question = "What is the capital of France?";
    // Under the template's default system prompt, the exact engine answers "The capital of
    // France is Paris."; llama.cpp (llama-cpp-python 0.3.36, which rounds activations the same
    // way) answers the same prompt greedily with exactly the q8 answer below.
    assert!(ask(&exact, question).await.contains("Paris"));
    let alone = ask(&server, question).await;
    assert_eq!(alone, "L'Étoile, la Marseillaise, la femme,");
    // Eight at once share decode steps (the batched kernels): the same integer products,
    // summed in another order.
    let batch = futures::future::join_all((0..8).map(|_| ask(&server, question))).await;
    for answer in &batch {
        assert_eq!(answer, &alone, "q8 in a batch");
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
