//! One training job from data to a PEFT adapter directory: load and curate the data (writing
//! the report), train with the LoRA layer that serves, evaluate base, `prod` and the candidate
//! on the held-out split, and write `adapter/`, `metrics.json` and `lineage.json` into the
//! output directory. Registration is separate ([`crate::register`]) so a failed job can never
//! touch the registry.

use std::path::{Path, PathBuf};

use adapters::{AdapterConfig, TargetModules};
use runtime::llama::{ChatModel, Llama, Runtime};
use runtime::lora::AdapterWeights;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::dataset::{
    self, CurationConfig, CurationReport, DatasetFormat, Example, FeedbackItem, FeedbackOptions, Target,
};
use crate::error::FinetuneError;
use crate::eval::{self, EvalRow, Probe};
use crate::train::batch::{Batch, Encoder, Seq};
use crate::train::params::LoraParams;
use crate::train::trainer::{EvalStats, Item, Outcome, Trainer};
use protocol::params::{Stage, TrainArgs};

/// Fewer curated examples than this is not a dataset worth an adapter version.
pub const MIN_EXAMPLES: usize = 4;

/// Where a job's examples come from.
pub enum Source {
    File(PathBuf),
    /// Feedback items (from the gateway's files or the Redis stream) and which to use.
    Feedback {
        items: Vec<FeedbackItem>,
        options: FeedbackOptions,
    },
}

/// Curation knobs that are not training hyper-parameters.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CurateArgs {
    /// Keep emails, phone numbers and ID numbers as they are (scrubbed by default).
    #[arg(long)]
    pub no_pii_scrub: bool,
    /// Jaccard similarity above which an example is a near duplicate (default 0.9; 0 disables).
    #[arg(long)]
    pub near_dup_threshold: Option<f64>,
    /// Drop answers longer than median + k·MAD tokens (default 6; 0 disables).
    #[arg(long)]
    pub outlier_mad: Option<f64>,
}

/// Everything a job needs.
pub struct JobInput {
    pub job_id: String,
    /// A GGUF file or an HF directory.
    pub base: PathBuf,
    pub source: Source,
    pub out: PathBuf,
    pub args: TrainArgs,
    pub curate: CurateArgs,
    /// Start from this adapter (DPO after SFT, or continuing a version) instead of zero.
    pub init_adapter: Option<PathBuf>,
    /// The version serving today, evaluated on the same held-out split: (label, directory).
    pub compare: Option<(String, PathBuf)>,
    pub progress: bool,
}

/// What a finished job produced.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    pub adapter_dir: PathBuf,
    pub report: CurationReport,
    pub outcome: Outcome,
    pub eval: Vec<EvalRow>,
    pub lineage: serde_json::Value,
    pub metrics: serde_json::Value,
}

impl JobResult {
    /// The candidate's evaluation row and the row it is compared with (`prod`, else `base`).
    pub fn candidate_and_incumbent(&self) -> (Option<&EvalRow>, Option<&EvalRow>) {
        let candidate = self.eval.iter().find(|r| r.name == "candidate");
        let incumbent = self
            .eval
            .iter()
            .find(|r| r.name.starts_with("prod"))
            .or_else(|| self.eval.iter().find(|r| r.name == "base"));
        (candidate, incumbent)
    }
}

fn err(e: candle_core::Error) -> FinetuneError {
    FinetuneError::Training { detail: e.to_string() }
}

fn sha256_file(path: &Path) -> Result<String, FinetuneError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| FinetuneError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| FinetuneError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The base model's identity: the GGUF file's hash, or the hash of an HF directory's config
/// and weight files.
pub fn base_model_hash(base: &Path) -> Result<String, FinetuneError> {
    if base.is_file() {
        return sha256_file(base);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(base)
        .map_err(|e| FinetuneError::io(base, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "safetensors") || p.file_name().is_some_and(|n| n == "config.json")
        })
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for f in files {
        hasher.update(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        hasher.update(sha256_file(&f)?.as_bytes());
    }
    Ok(hex::encode(hasher.finalize()))
}

/// This build of the code: package version and the running binary's hash.
fn code_version() -> serde_json::Value {
    let binary = std::env::current_exe().ok().and_then(|p| sha256_file(&p).ok());
    serde_json::json!({"package": format!("finetune {}", env!("CARGO_PKG_VERSION")), "binary_sha256": binary})
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), FinetuneError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| FinetuneError::Training { detail: e.to_string() })?;
    std::fs::write(path, bytes).map_err(|e| FinetuneError::io(path, e))
}

/// Writes the curation report as `report.json` and `report.md`.
pub fn write_report(out: &Path, report: &CurationReport) -> Result<(), FinetuneError> {
    std::fs::create_dir_all(out).map_err(|e| FinetuneError::io(out, e))?;
    write_json(&out.join("report.json"), report)?;
    let md = out.join("report.md");
    std::fs::write(&md, report.to_markdown()).map_err(|e| FinetuneError::io(&md, e))
}

/// Parameters of the base model (for the default learning rate).
fn parameter_count(model: &Llama) -> usize {
    let c = &model.config;
    let shape = c.shape("base");
    let per_layer: usize = adapters::LoraModule::ALL
        .iter()
        .map(|&m| {
            let (i, o) = shape.dims(m);
            i * o
        })
        .sum();
    per_layer * c.num_layers + 2 * c.vocab_size * c.hidden_size
}

/// Runs the job; on success `out` holds `adapter/`, `report.json`, `report.md`,
/// `train_log.jsonl`, `metrics.json` and `lineage.json`.
pub fn run(input: JobInput, cancel: &(dyn Fn() -> bool + Sync)) -> Result<JobResult, FinetuneError> {
    let out = &input.out;
    std::fs::create_dir_all(out).map_err(|e| FinetuneError::io(out, e))?;
    let ChatModel { model, tokenizer, template, eos_ids } =
        ChatModel::load(&input.base).map_err(|e| FinetuneError::Model { detail: e.to_string() })?;
    let cfg = input.args.resolve(parameter_count(&model)).map_err(|detail| FinetuneError::Config { detail })?;
    let eos = *eos_ids
        .first()
        .ok_or_else(|| FinetuneError::Model { detail: "the model names no end-of-turn token".into() })?;
    let encoder = Encoder { tokenizer: &tokenizer, template: &template, eos };

    // Data: load, curate, report.
    let (format, examples, early, feedback_range) = match &input.source {
        Source::File(path) => {
            let loaded = dataset::load_file(path)?;
            (loaded.format, loaded.examples, loaded.dropped, None)
        }
        Source::Feedback { items, options } => {
            let options = FeedbackOptions { kto: cfg.stage == Stage::Kto, ..options.clone() };
            let fb = dataset::examples_from_feedback(items, &options);
            (DatasetFormat::Feedback, fb.examples, fb.dropped, fb.range)
        }
    };
    let curation = CurationConfig {
        cutoff_len: cfg.cutoff_len,
        near_dup_threshold: input.curate.near_dup_threshold.unwrap_or(CurationConfig::default().near_dup_threshold),
        outlier_mad: input.curate.outlier_mad.unwrap_or(CurationConfig::default().outlier_mad),
        scrub_pii: !input.curate.no_pii_scrub,
        val_ratio: cfg.val_ratio,
        seed: cfg.seed,
        max_samples: cfg.max_samples,
        ..CurationConfig::default()
    };
    let count = |ex: &Example| -> usize {
        let prompt = encoder.prompt_ids(&ex.prompt).map(|p| p.len()).unwrap_or(usize::MAX / 2);
        let answers: Vec<&str> = match &ex.target {
            Target::Sft { answer } | Target::Kto { answer, .. } => vec![answer],
            Target::Preference { chosen, rejected } => vec![chosen, rejected],
        };
        prompt
            + answers
                .iter()
                .map(|a| encoder.answer_ids(a).map(|v| v.len()).unwrap_or(usize::MAX / 2))
                .max()
                .unwrap_or(0)
    };
    let curated = match dataset::curate(format, examples, early, &count, &curation).map_err(FinetuneError::from) {
        Ok(mut c) => {
            c.report.feedback = feedback_range.clone();
            c
        }
        Err(FinetuneError::NothingLeft { mut report }) => {
            report.feedback = feedback_range;
            write_report(out, &report)?;
            return Err(FinetuneError::NothingLeft { report });
        }
        Err(e) => return Err(e),
    };
    write_report(out, &curated.report)?;
    let kept = curated.train.len() + curated.val.len();
    if kept < MIN_EXAMPLES {
        return Err(FinetuneError::TooFewExamples { kept, need: MIN_EXAMPLES, report: Box::new(curated.report) });
    }

    // Items for the stage.
    let to_items = |examples: &[Example]| -> Result<Vec<(Item, Option<Probe>)>, FinetuneError> {
        let mut items = Vec::new();
        for ex in examples {
            let prompt = encoder
                .prompt_ids(&ex.prompt)
                .map_err(|detail| FinetuneError::Training { detail: format!("{}: {detail}", ex.id) })?;
            let seq = |answer: &str| {
                encoder
                    .seq(&prompt, answer)
                    .map_err(|detail| FinetuneError::Training { detail: format!("{}: {detail}", ex.id) })
            };
            match (&ex.target, cfg.stage) {
                (Target::Sft { answer }, Stage::Sft) | (Target::Kto { answer, desirable: true }, Stage::Sft) => {
                    items.push((
                        Item::Sft(seq(answer)?),
                        Some(Probe { prompt: prompt.clone(), expected: answer.clone() }),
                    ));
                }
                (Target::Preference { chosen, rejected }, Stage::Dpo) => {
                    items.push((
                        Item::Pair {
                            chosen: seq(chosen)?,
                            rejected: seq(rejected)?,
                            ref_chosen: 0.0,
                            ref_rejected: 0.0,
                        },
                        None,
                    ));
                }
                // KTO learns from every answer with a verdict: tagged ones, plain answers
                // (desirable) and both sides of a pair.
                (Target::Kto { answer, desirable }, Stage::Kto) => {
                    let probe = desirable.then(|| Probe { prompt: prompt.clone(), expected: answer.clone() });
                    items.push((Item::kto(seq(answer)?, *desirable), probe));
                }
                (Target::Sft { answer }, Stage::Kto) => items.push((Item::kto(seq(answer)?, true), None)),
                (Target::Preference { chosen, rejected }, Stage::Kto) => {
                    items.push((Item::kto(seq(chosen)?, true), None));
                    items.push((Item::kto(seq(rejected)?, false), None));
                }
                _ => {}
            }
        }
        Ok(items)
    };
    let train_items: Vec<Item> = to_items(&curated.train)?.into_iter().map(|(item, _)| item).collect();
    let (val_items, val_probes): (Vec<Item>, Vec<Option<Probe>>) = to_items(&curated.val)?.into_iter().unzip();
    if train_items.is_empty() {
        let wanted = match cfg.stage {
            Stage::Sft => "answers (SFT examples, thumbs up, accepted corrections or desirable KTO records)",
            Stage::Dpo => "preference pairs (chosen/rejected, or corrections of an answer)",
            Stage::Kto => "answers with a verdict (kto_tag records, thumbs up / down, corrections)",
        };
        return Err(FinetuneError::Config {
            detail: format!("the curated training split has no {wanted}; see {}", out.join("report.md").display()),
        });
    }

    // Model and weights to train.
    let train_model = model.for_training().map_err(|e| FinetuneError::Model { detail: e.to_string() })?;
    drop(model);
    let shape = train_model.config.shape("base");
    let params = match &input.init_adapter {
        Some(dir) => LoraParams::from_peft(dir, &shape, cfg.lora_dropout, cfg.seed)?,
        None => LoraParams::init(
            &shape,
            &cfg.lora_target,
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.use_rslora,
            cfg.lora_dropout,
            cfg.seed,
        )?,
    };
    let (train_items, val_items) = if cfg.stage == Stage::Sft {
        (train_items, val_items)
    } else {
        let reference = params.adapter(false);
        (with_reference(&train_model, &reference, train_items)?, with_reference(&train_model, &reference, val_items)?)
    };
    let fingerprint = {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&cfg).unwrap_or_default());
        h.update(curated.report.dataset_hash.as_bytes());
        h.update(input.init_adapter.as_ref().map(|p| p.display().to_string()).unwrap_or_default().as_bytes());
        hex::encode(h.finalize())
    };
    let trainer = Trainer { model: &train_model, cfg: &cfg, out, fingerprint, cancel, progress: input.progress };
    let outcome = trainer.run(&params, &train_items, &val_items)?;

    // Evaluation on the held-out split.
    let compare = match &input.compare {
        Some((label, dir)) => Some((
            label.clone(),
            AdapterWeights::load_peft_dir(dir, &shape, &candle_core::Device::Cpu)
                .map_err(|e| FinetuneError::Adapter { detail: e.to_string() })?,
        )),
        None => None,
    };
    let candidate = params.served()?;
    let probes: Vec<Probe> = val_probes.into_iter().flatten().collect();
    let answers: Vec<&str> = probes.iter().map(|p| p.expected.as_str()).collect();
    let answer_tokens: Vec<usize> =
        probes.iter().map(|p| encoder.answer_ids(&p.expected).map_or(usize::MAX, |v| v.len() - 1)).collect();
    let classify = cfg.stage != Stage::Dpo && eval::is_classification(&answers, &answer_tokens);
    let runtime = if classify {
        Some(Runtime::from_llama(&train_model, 0).map_err(|e| FinetuneError::Model { detail: e.to_string() })?)
    } else {
        None
    };
    let max_new = answer_tokens.iter().copied().max().unwrap_or(1) + 2;
    let mut rows = Vec::new();
    let mut candidates: Vec<(String, Option<&AdapterWeights>)> = vec![("base".into(), None)];
    if let Some((label, w)) = &compare {
        candidates.push((label.clone(), Some(w)));
    }
    candidates.push(("candidate".into(), Some(&candidate)));
    for (name, adapter) in candidates {
        let stats = if val_items.is_empty() {
            EvalStats { loss: f64::NAN, reward_accuracy: None, reward_margin: None }
        } else {
            trainer.evaluate_adapter(adapter, &val_items)?
        };
        let (val_loss, reward_accuracy, reward_margin) = (stats.loss, stats.reward_accuracy, stats.reward_margin);
        let (accuracy, correct, total) = match &runtime {
            Some(rt) => {
                let (c, t) = eval::accuracy(rt, adapter, &tokenizer, &eos_ids, &probes, max_new)?;
                (Some(c as f64 / t.max(1) as f64), Some(c), Some(t))
            }
            None => (None, None, None),
        };
        let perplexity = if cfg.stage == Stage::Sft { val_loss.exp() } else { f64::NAN };
        rows.push(EvalRow { name, val_loss, perplexity, accuracy, correct, total, reward_accuracy, reward_margin });
    }
    if input.progress {
        eprintln!("\nheld-out evaluation ({} examples):\n{}", curated.val.len(), eval::table(&rows));
    }

    // The adapter directory, metrics and lineage.
    let adapter_dir = out.join("adapter");
    let targets = TargetModules::List(params.targets().iter().map(|m| m.name().to_owned()).collect());
    let mut config = AdapterConfig::new(params.rank, params.alpha, targets);
    config.use_rslora = params.use_rslora;
    config.lora_dropout = cfg.lora_dropout as f64;
    config.base_model_name_or_path = Some(input.base.display().to_string());
    let values = params.snapshot()?;
    let _ = std::fs::remove_dir_all(&adapter_dir);
    adapters::write_adapter_dir(&adapter_dir, &config, &params.peft_tensors(&values)?)
        .map_err(|e| FinetuneError::Adapter { detail: e.to_string() })?;
    let metrics = serde_json::json!({
        "eval": rows,
        "held_out_examples": curated.val.len(),
        "classification": classify,
        "train": outcome,
    });
    let lineage = serde_json::json!({
        "job_id": input.job_id,
        "stage": cfg.stage,
        "dataset": {
            "source": match &input.source { Source::File(p) => p.display().to_string(), Source::Feedback { .. } => "feedback".into() },
            "format": format.as_str(),
            "hash": curated.report.dataset_hash,
            "train_examples": curated.train.len(),
            "val_examples": curated.val.len(),
            "feedback": curated.report.feedback,
        },
        "base_model": {"path": input.base.display().to_string(), "sha256": base_model_hash(&input.base)?},
        "init_adapter": input.init_adapter.as_ref().map(|p| p.display().to_string()),
        "compared_with": input.compare.as_ref().map(|(l, _)| l.clone()),
        "hyperparameters": cfg,
        "code": code_version(),
    });
    write_json(&out.join("metrics.json"), &metrics)?;
    write_json(&out.join("lineage.json"), &lineage)?;
    Ok(JobResult { adapter_dir, report: curated.report, outcome, eval: rows, lineage, metrics })
}

/// Scores every sequence a preference item compares under the reference (the adapter training
/// starts from), once, before training: both answers of a DPO pair; a KTO answer and its
/// mismatched answer, whose log-ratio estimates the KL term. KTO items get their mismatched
/// answer here: the next item's answer after this item's prompt, as LLaMA-Factory does.
fn with_reference(model: &Llama, reference: &AdapterWeights, mut items: Vec<Item>) -> Result<Vec<Item>, FinetuneError> {
    let n = items.len();
    let answers: Vec<Vec<u32>> = items
        .iter()
        .map(|i| match i {
            Item::Kto { seq, .. } => seq.ids[seq.answer_start..].to_vec(),
            _ => Vec::new(),
        })
        .collect();
    for (k, item) in items.iter_mut().enumerate() {
        if let Item::Kto { seq, kl, .. } = item {
            let mut ids = seq.ids[..seq.answer_start].to_vec();
            ids.extend(&answers[(k + 1) % n]);
            *kl = Seq { ids, answer_start: seq.answer_start };
        }
    }
    for chunk in items.chunks_mut(8) {
        let seqs: Vec<&Seq> = chunk.iter().flat_map(|i| i.scored()).collect();
        let batch = Batch::new(&seqs)?;
        let lp = batch
            .sequence_logprobs(&batch.token_logprobs(model, Some(reference)).map_err(err)?)
            .map_err(err)?
            .to_vec1::<f32>()
            .map_err(err)?;
        let mut lp = lp.into_iter();
        for item in chunk.iter_mut() {
            match item {
                Item::Pair { ref_chosen, ref_rejected, .. } => {
                    *ref_chosen = lp.next().unwrap_or_default();
                    *ref_rejected = lp.next().unwrap_or_default();
                }
                Item::Kto { ref_lp, ref_kl, .. } => {
                    *ref_lp = lp.next().unwrap_or_default();
                    *ref_kl = lp.next().unwrap_or_default();
                }
                Item::Sft(_) => {}
            }
        }
    }
    Ok(items)
}
