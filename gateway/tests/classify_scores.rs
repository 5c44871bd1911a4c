//! `/v1/classify`'s label log-probabilities equal the candle reference model's: the served
//! engine scores the shared prompt once and continues each label from a copy of its keys and
//! values; the reference runs prompt + label + end of turn from scratch for each label and
//! sums the log-softmax at the label's positions.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{client, default_model, Server};
use serde_json::{json, Value};

/// Σ log softmax(logits[p−1])[tokens[p]] over the continuation's positions, by the dense f32
/// reference (`dense`: the model's weights dequantized once).
fn reference_logprob(
    model: &runtime::llama::ChatModel,
    dense: &runtime::llama::Llama,
    prompt: &str,
    continuation: &str,
) -> f64 {
    let encode = |t: &str| model.tokenizer.encode(t, false).unwrap().get_ids().to_vec();
    let prompt_ids = encode(prompt);
    let all = encode(&format!("{prompt}{continuation}{}", model.template.eos_token()));
    assert!(all.starts_with(&prompt_ids), "the prompt tokenizes the same inside the whole");
    let input = Tensor::new(all.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = dense.forward_full(&input, None).unwrap().squeeze(0).unwrap().to_dtype(DType::F64).unwrap();
    let rows: Vec<Vec<f64>> = logits.to_vec2().unwrap();
    (prompt_ids.len()..all.len())
        .map(|p| {
            let row = &rows[p - 1];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            row[all[p] as usize] - lse
        })
        .sum()
}

#[tokio::test]
async fn label_logprobs_equal_the_reference_model() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let server = Server::start(&["--data-dir", &data.display().to_string()]);
    let labels = ["animals", "kitchen appliances", "x"];
    let text = "The cat sat on the mat and purred at the dog.";
    let res =
        client().post(server.url("/v1/classify")).json(&json!({"input": text, "labels": labels})).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    // The messages the endpoint sent, as the completion log keeps them.
    let dir = data.join(protocol::names::FEEDBACK_DIR);
    let mut logged = None;
    for (_, path) in protocol::names::completion_logs(&dir).unwrap() {
        for line in std::fs::read_to_string(path).unwrap().lines() {
            let record: Value = serde_json::from_str(line).unwrap();
            if record["id"] == body["id"] {
                logged = Some(record);
            }
        }
    }
    let logged = logged.expect("the classification is logged");
    assert_eq!(logged["params"]["task"], "classify");
    let model = runtime::llama::ChatModel::load(&default_model()).unwrap();
    let dense = model.model.to_dense().unwrap();
    let messages: Vec<(String, String)> = logged["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_owned(), m["content"].as_str().unwrap().to_owned()))
        .collect();
    let prompt = model.template.render(messages.iter().map(|(r, c)| (r.as_str(), c.as_str()))).unwrap();
    let mut worst: f64 = 0.0;
    for label in labels {
        let served = body["results"].as_array().unwrap().iter().find(|r| r["label"] == label).unwrap()["logprob"]
            .as_f64()
            .unwrap();
        let reference = reference_logprob(&model, &dense, &prompt, label);
        println!("{label}: served {served}, reference {reference}");
        worst = worst.max((served - reference).abs());
    }
    assert!(worst < 2e-3, "worst difference {worst}");
}
