//! `finetune train` as a user runs it, on a tiny llama that the test writes itself: a labelled
//! task the adapter must learn, a job killed mid-run that resumes to the identical adapter, and
//! bad datasets that end with a clear error and a report.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LABELS: [&str; 3] = ["red", "blue", "green"];
const FILLER: &str = "a b c d e f g h i j k l m n o p q r s t u v w x y z the cat dog sat on mat";

/// Deterministic pseudo-random numbers for building data.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// `n` alpaca records: six filler words and a colour word; the answer is the colour.
fn colour_task(n: usize, seed: u64) -> String {
    let words: Vec<&str> = FILLER.split(' ').collect();
    let mut rng = Lcg(seed);
    let mut out = String::new();
    for i in 0..n {
        let label = LABELS[i % 3];
        let mut text: Vec<&str> = (0..6).map(|_| words[rng.next(words.len())]).collect();
        text.insert(rng.next(7), label);
        out.push_str(
            &serde_json::json!({"instruction": "what is it ?", "input": text.join(" "), "output": label}).to_string(),
        );
        out.push('\n');
    }
    out
}

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-llama");
    // A head of ±2: behind the final norm, the default ±0.3 cannot separate tokens much.
    runtime::testing::write_tiny_llama_with_head(&model, 3, 2.0).unwrap();
    model
}

fn finetune(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_finetune"));
    cmd.arg("train").args(args).env("RUST_LOG", "warn");
    cmd
}

fn run(args: &[&str]) -> Output {
    finetune(args).output().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn training_writes_an_adapter_with_its_report_step_log_metrics_and_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("colours.jsonl");
    std::fs::write(&data, colour_task(300, 1)).unwrap();
    let out = dir.path().join("out");
    let o = run(&[
        "--base",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--learning-rate",
        "1e-2",
        "--epochs",
        "5",
        "--val-ratio",
        "0.1",
        "--seed",
        "7",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("loss") && stderr.contains("| candidate |"),
        "progress and an evaluation table are shown: {stderr}"
    );

    let metrics = json(&out.join("metrics.json"));
    let row = |name: &str| metrics["eval"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap();
    let (base, candidate) = (row("base"), row("candidate"));
    let (base_acc, cand_acc) = (base["accuracy"].as_f64().unwrap(), candidate["accuracy"].as_f64().unwrap());
    eprintln!(
        "held-out accuracy: base {base_acc:.3}, candidate {cand_acc:.3}; val loss {} -> {}",
        base["val_loss"], candidate["val_loss"]
    );
    assert_eq!(metrics["classification"], true);
    assert_eq!(candidate["total"], 30, "10% of 300 held out");
    // A two-layer random model cannot route a word from the prompt to the answer (the real
    // model's labelled task is in `labelled_task.rs`), but it learns the answers' form.
    assert!(cand_acc >= base_acc, "base {base_acc}, candidate {cand_acc}");
    let (base_loss, cand_loss) = (base["val_loss"].as_f64().unwrap(), candidate["val_loss"].as_f64().unwrap());
    assert!(cand_loss * 4.0 < base_loss, "validation loss {base_loss} -> {cand_loss}\n{stderr}");

    // A PEFT directory the registry would accept, a report, a step log and lineage.
    let shape = runtime::testing::tiny_llama_shape();
    let checked = adapters::validate_adapter_dir(&out.join("adapter"), &shape, &adapters::Limits::default()).unwrap();
    assert_eq!((checked.config.r, checked.config.lora_alpha, checked.modules.len()), (8, 16.0, 7));
    let report = json(&out.join("report.json"));
    assert_eq!(
        (report["format"].as_str(), report["train"].as_u64(), report["val"].as_u64()),
        (Some("alpaca"), Some(270), Some(30))
    );
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(out.join(protocol::names::TRAIN_LOG_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 5 * 270usize.div_ceil(4), "one line per step");
    assert!(steps.iter().all(|s| s["loss"].is_f64() && s["lr"].is_f64() && s["tokens_per_s"].is_f64()));
    assert_eq!(steps.iter().filter(|s| s["val_loss"].is_f64()).count(), 5, "evaluated once an epoch");
    let lineage = json(&out.join("lineage.json"));
    assert_eq!(lineage["dataset"]["hash"], report["dataset_hash"]);
    assert_eq!(lineage["hyperparameters"]["learning_rate"], 1e-2);
    assert!(lineage["base_model"]["sha256"].as_str().is_some_and(|h| h.len() == 64));
}

#[test]
fn a_killed_job_resumes_from_its_checkpoint_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("colours.jsonl");
    std::fs::write(&data, colour_task(200, 2)).unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "--base",
            model.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "300",
            "--save-steps",
            "10",
            "--batch-size",
            "16",
            "--lora-dropout",
            "0.1",
            "--grad-accum",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let straight = dir.path().join("straight");
    let o = finetune(&args(&straight).iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let resumed = dir.path().join("resumed");
    let mut child = finetune(&args(&resumed).iter().map(String::as_str).collect::<Vec<_>>())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = resumed.join("checkpoints");
    // Kill it as soon as a checkpoint past step 20 exists (it cannot have finished: 300 steps).
    loop {
        let past_20 = std::fs::read_dir(&checkpoints).into_iter().flatten().filter_map(|e| e.ok()).any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= 20)
        });
        if past_20 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the job ended before a checkpoint was seen");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!resumed.join("adapter").exists(), "killed before it finished");

    let o = finetune(&args(&resumed).iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("resuming from the checkpoint at step"), "{stderr}");
    let a = std::fs::read(straight.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed job produced a different adapter");
    let log_steps: Vec<u64> = std::fs::read_to_string(resumed.join(protocol::names::TRAIN_LOG_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(log_steps, (1..=300).collect::<Vec<_>>(), "the step log has each step once");
}

#[test]
fn bad_datasets_end_with_a_clear_error_and_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let case = |name: &str, body: &str, extra: &[&str]| -> (String, PathBuf) {
        let data = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&data, body).unwrap();
        let out = dir.path().join(name);
        let mut args = vec![
            "--base",
            model.to_str().unwrap(),
            "--dataset",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(!o.status.success(), "{name}: the job must fail");
        assert!(!out.join("adapter").exists(), "{name}: no adapter");
        (String::from_utf8_lossy(&o.stderr).into_owned(), out)
    };
    let (err, _) = case("empty", "", &[]);
    assert!(err.contains("[empty_dataset]"), "{err}");
    let (err, _) = case("schema", "{\"text\": \"no known layout\"}\n", &[]);
    assert!(err.contains("[unknown_format]"), "{err}");
    let (err, _) = case("garbage", "{\"instruction\": \"a\", \"output\": \"b\"}\nnot json\n", &[]);
    assert!(err.contains("[invalid_json]") && err.contains('2'), "the bad line is named: {err}");
    let dup = "{\"instruction\": \"what is it\", \"output\": \"red\"}\n".repeat(5);
    let (err, out) = case("duplicates", &dup, &[]);
    assert!(err.contains("[too_few_examples]"), "{err}");
    let report = json(&out.join("report.json"));
    assert_eq!(report["dropped_by_reason"]["duplicate"], 4, "{report}");
    let (err, out) = case("too-long", &colour_task(10, 3), &["--cutoff-len", "5"]);
    assert!(err.contains("[nothing_left]"), "{err}");
    assert_eq!(json(&out.join("report.json"))["dropped_by_reason"]["too_long"], 10);
    let (err, _) = case("bad-flag", &colour_task(10, 3), &["--val-ratio", "2"]);
    assert!(err.contains("--val-ratio"), "{err}");
}

#[test]
fn dpo_on_preference_pairs_prefers_the_chosen_answers() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let words: Vec<&str> = FILLER.split(' ').collect();
    let mut rng = Lcg(9);
    // Corrections against the answers they replaced: always prefer "yes" to a random word.
    let rows: String = (0..120)
        .map(|_| {
            let prompt: Vec<&str> = (0..5).map(|_| words[rng.next(words.len())]).collect();
            let rejected = words[rng.next(words.len())];
            format!("{}\n", serde_json::json!({"instruction": prompt.join(" "), "chosen": "yes", "rejected": rejected}))
        })
        .collect();
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, rows).unwrap();
    let out = dir.path().join("dpo");
    let o = run(&[
        "--base",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--stage",
        "dpo",
        "--learning-rate",
        "5e-3",
        "--epochs",
        "3",
        "--val-ratio",
        "0.2",
        "--dpo-beta",
        "0.1",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let metrics = json(&out.join("metrics.json"));
    let row = |name: &str| metrics["eval"].as_array().unwrap().iter().find(|r| r["name"] == name).cloned().unwrap();
    let (base, candidate) = (row("base"), row("candidate"));
    // The base model is the reference: its DPO loss is ln 2 and it ranks no pair either way.
    assert!((base["val_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-3, "{base}");
    let (loss, ranked) = (candidate["val_loss"].as_f64().unwrap(), candidate["reward_accuracy"].as_f64().unwrap());
    eprintln!("DPO held-out: loss {loss:.4} (ln 2 = 0.6931 before), pairs ranked right {ranked:.3}");
    assert!(loss < 0.3 && ranked >= 0.9, "{candidate}\n{stderr}");
    assert_eq!(json(&out.join("lineage.json"))["stage"], "dpo");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join(protocol::names::TRAIN_LOG_FILE)).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    assert!(first["loss"].as_f64().unwrap() > 0.6, "DPO starts at ln 2: {first}");
}

#[test]
fn a_cancelled_job_checkpoints_and_a_rerun_finishes_it() {
    use finetune::job::{self, CurateArgs, JobInput, Source};
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = dir.path().join("colours.jsonl");
    std::fs::write(&data, colour_task(60, 4)).unwrap();
    let out = dir.path().join("out");
    let input = || JobInput {
        job_id: "ftjob-1".into(),
        base: model.clone(),
        source: Source::File(data.clone()),
        out: out.clone(),
        args: protocol::params::TrainArgs { max_steps: Some(20), save_steps: Some(0), ..Default::default() },
        curate: CurateArgs::default(),
        init_adapter: None,
        compare: None,
        progress: false,
    };
    // The admin's cancel arrives while step 6 is due.
    let checks = std::sync::atomic::AtomicUsize::new(0);
    let cancel = || checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 6;
    match job::run(input(), &cancel) {
        Err(finetune::FinetuneError::Cancelled { step }) => assert_eq!(step, 6),
        other => panic!("expected a cancellation, got {:?}", other.map(|r| r.outcome)),
    }
    assert!(out.join("checkpoints/step-6").is_dir(), "a cancelled job keeps its progress");
    assert!(!out.join("adapter").exists());
    let done = job::run(input(), &|| false).unwrap();
    assert_eq!((done.outcome.resumed_from, done.outcome.steps), (Some(6), 20));
}
