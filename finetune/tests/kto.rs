//! KTO on thumbs-only data: every support ticket got one answer, a label picked at random, and
//! a thumbs up when it was the right label and a thumbs down when not (`kto_tag`); no ticket has
//! a pair. One epoch of `--stage kto` on the default model must move the adapter toward the
//! desirable answers on held-out tickets: their reward rises above the undesirable ones'.

use std::process::Command;

mod common;

use common::{default_model, ticket_rows, Pick, INSTRUCTION, LABELS};

/// 240 tickets; half answered with the right label (thumbs up), half with another (thumbs down).
fn thumbs_only(n: usize) -> String {
    let mut pick = Pick::new(11);
    ticket_rows(n)
        .into_iter()
        .map(|(text, label)| {
            let right = pick.below(2) == 0;
            let answer = if right {
                label
            } else {
                let others: Vec<&str> = LABELS.iter().copied().filter(|l| *l != label).collect();
                others[pick.below(2)]
            };
            let row =
                serde_json::json!({"instruction": INSTRUCTION, "input": text, "output": answer, "kto_tag": right});
            format!("{row}\n")
        })
        .collect()
}

#[test]
fn kto_on_thumbs_only_feedback_moves_toward_the_desirable_answers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("thumbs.jsonl");
    std::fs::write(&data, thumbs_only(240)).unwrap();
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args(["train", "--stage", "kto", "--base", default_model().to_str().unwrap()])
        .args(["--dataset", data.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--epochs", "1", "--val-ratio", "0.15", "--save-steps", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("reward margin"), "the evaluation table shows KTO's figures:\n{stderr}");
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    let row = |name: &str| metrics["eval"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap();
    let (base, candidate) = (row("base"), row("candidate"));
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {r}"));
    eprintln!(
        "held-out KTO: base ranked {:.3} margin {:+.4} loss {:.4}; adapter ranked {:.3} margin {:+.4} loss {:.4}; \
         greedy accuracy {}/{} -> {}/{}",
        f(&base, "reward_accuracy"),
        f(&base, "reward_margin"),
        f(&base, "val_loss"),
        f(&candidate, "reward_accuracy"),
        f(&candidate, "reward_margin"),
        f(&candidate, "val_loss"),
        base["correct"],
        base["total"],
        candidate["correct"],
        candidate["total"],
    );
    // The base model is the reference: its rewards are 0 up to rounding (the reference was
    // scored in other batches, whose padding changes the order of additions).
    assert!(f(&base, "reward_margin").abs() < 1e-3, "{base}");
    // Desirable answers now score above undesirable ones, across held-out tickets.
    assert!(f(&candidate, "reward_margin") > 0.2, "{candidate}\n{stderr}");
    assert!(f(&candidate, "reward_accuracy") >= 0.7, "{candidate}\n{stderr}");
    assert!(f(&candidate, "reward_accuracy") >= f(&base, "reward_accuracy") + 0.15, "{candidate} vs {base}");
    assert!(f(&candidate, "val_loss") < f(&base, "val_loss"), "{candidate} vs {base}");
    let lineage: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("lineage.json")).unwrap()).unwrap();
    assert_eq!(lineage["stage"], "kto");
    assert_eq!(lineage["dataset"]["format"], "kto");
}
