//! The default model (SmolLM2-135M-Instruct, Q4_1) learns a labelling task it cannot do out of
//! the box: support tickets into billing / shipping / technical, 240 rows built here, one
//! epoch at the default learning rate, evaluated on the held-out 10% by greedy answers from
//! the serving runtime.

use std::process::Command;

mod common;

use common::{default_model, tickets};

#[test]
fn the_default_model_learns_to_label_support_tickets() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tickets.jsonl");
    std::fs::write(&data, tickets(240)).unwrap();
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args([
            "train",
            "--base",
            default_model().to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(["--epochs", "1", "--val-ratio", "0.1", "--save-steps", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    let row = |name: &str| metrics["eval"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap();
    let (base, candidate) = (row("base"), row("candidate"));
    let acc = |r: &serde_json::Value| r["accuracy"].as_f64().unwrap();
    eprintln!(
        "held-out accuracy: base {}/{}, adapter {}/{}; {:.0} training tokens/s",
        base["correct"],
        base["total"],
        candidate["correct"],
        candidate["total"],
        metrics["train"]["tokens_per_s"].as_f64().unwrap()
    );
    assert!(candidate["total"].as_u64().unwrap() >= 20);
    assert!(acc(&base) <= 0.2, "the base model answers in sentences, not labels: {base}");
    assert!(acc(&candidate) >= 0.9, "{candidate}\n{stderr}");
}
