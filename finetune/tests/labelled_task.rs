//! The default model (SmolLM2-135M-Instruct, Q4_1) learns a labelling task it cannot do out of
//! the box: support tickets into billing / shipping / technical, 240 rows built here, one
//! epoch at the default learning rate, evaluated on the held-out 10% by greedy answers from
//! the serving runtime.

use std::path::PathBuf;
use std::process::Command;

fn default_model() -> PathBuf {
    let path = std::env::var_os("SWITCHYARD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.is_file(), "{} is missing: run scripts/fetch-models.sh first", path.display());
    path
}

const TICKETS: [(&str, [&str; 8]); 3] = [
    (
        "billing",
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
    ),
    (
        "shipping",
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
    ),
    (
        "technical",
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
    ),
];
const GREETINGS: [&str; 6] = ["Hi,", "Hello,", "Hey team,", "Good morning,", "Dear support,", ""];
const CLOSINGS: [&str; 6] = ["Thanks.", "Please help.", "Any idea?", "This is urgent.", "Regards.", ""];

fn tickets(n: usize) -> String {
    let mut state = 5u64;
    let mut pick = |k: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % k as u64) as usize
    };
    let mut out = String::new();
    for i in 0..n {
        let (label, cores) = TICKETS[i % 3];
        let parts = [GREETINGS[pick(6)].to_owned(), format!("{}.", cores[pick(8)]), CLOSINGS[pick(6)].to_owned()];
        let text = parts.iter().filter(|p| !p.is_empty()).cloned().collect::<Vec<_>>().join(" ");
        let row = serde_json::json!({
            "instruction": "Classify this support ticket as billing, shipping or technical. Answer with one word.",
            "input": text, "output": label,
        });
        out.push_str(&format!("{row}\n"));
    }
    out
}

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
