//! What the training tests share: the default model's path and a generated labelling task.

#![allow(dead_code)]

use std::path::PathBuf;

pub fn default_model() -> PathBuf {
    let path = std::env::var_os("SWITCHYARD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.is_file(), "{} is missing: run scripts/fetch-models.sh first", path.display());
    path
}

pub const INSTRUCTION: &str = "Classify this support ticket as billing, shipping or technical. Answer with one word.";
pub const LABELS: [&str; 3] = ["billing", "shipping", "technical"];
pub const TICKETS: [(&str, [&str; 8]); 3] = [
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

/// A small seeded generator (an LCG), so the data is the same on every run.
pub struct Pick(u64);

impl Pick {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn below(&mut self, k: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % k as u64) as usize
    }
}

/// `n` tickets with their true labels, cycling through the labels.
pub fn ticket_rows(n: usize) -> Vec<(String, &'static str)> {
    let mut pick = Pick::new(5);
    (0..n)
        .map(|i| {
            let (label, cores) = TICKETS[i % 3];
            let parts = [
                GREETINGS[pick.below(6)].to_owned(),
                format!("{}.", cores[pick.below(8)]),
                CLOSINGS[pick.below(6)].to_owned(),
            ];
            (parts.iter().filter(|p| !p.is_empty()).cloned().collect::<Vec<_>>().join(" "), label)
        })
        .collect()
}

/// `n` alpaca rows: the ticket as input, its label as output.
pub fn tickets(n: usize) -> String {
    ticket_rows(n)
        .into_iter()
        .map(|(text, label)| {
            format!("{}\n", serde_json::json!({"instruction": INSTRUCTION, "input": text, "output": label}))
        })
        .collect()
}
