//! Training job parameters: every hyper-parameter as an optional override ([`TrainArgs`]: the
//! `finetune train` flags, LLaMA-Factory's names, and with the same field names the `params` of
//! the admin job API), and the resolved, validated set a run uses ([`TrainConfig`]).

use adapters::LoraModule;
use serde::{Deserialize, Serialize};

/// What a job optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Supervised fine-tuning: next-token loss on answer tokens.
    Sft,
    /// Direct preference optimisation on chosen/rejected pairs, against a frozen reference
    /// (the adapter training starts from, or the base model).
    Dpo,
    /// Kahneman-Tversky optimisation on answers marked desirable or undesirable (`kto_tag`,
    /// thumbs up / down) without a pair, against the same frozen reference as DPO.
    Kto,
}

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

/// Every knob of one training run. Serialised into the adapter's lineage, so a version says
/// exactly how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub stage: Stage,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    /// Modules that get LoRA pairs (every linear layer of the decoder by default).
    pub lora_target: Vec<LoraModule>,
    /// Scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// LoRA+: B matrices learn this many times faster than A (1 = plain LoRA).
    pub loraplus_lr_ratio: f64,
    pub learning_rate: f64,
    pub lr_scheduler: Schedule,
    /// Warm-up steps as a fraction of all steps (ignored when `warmup_steps` is set).
    pub warmup_ratio: f64,
    pub warmup_steps: Option<usize>,
    pub epochs: f64,
    /// Optimiser steps; overrides `epochs` when set.
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Prompt + answer tokens; longer examples are dropped by curation, not truncated.
    pub cutoff_len: usize,
    pub val_ratio: f64,
    pub max_samples: Option<usize>,
    /// Evaluate on the validation split every this many steps (0: once per epoch).
    pub eval_steps: usize,
    /// Stop after this many evaluations without a better validation loss (0: never).
    pub early_stopping_patience: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub save_steps: usize,
    pub seed: u64,
    /// DPO's and KTO's temperature on the log-ratio (LLaMA-Factory's `pref_beta`).
    pub dpo_beta: f64,
    /// KTO: weight of the desirable answers' loss.
    pub kto_chosen_weight: f64,
    /// KTO: weight of the undesirable answers' loss.
    pub kto_rejected_weight: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            stage: Stage::Sft,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_target: LoraModule::ALL.to_vec(),
            use_rslora: false,
            loraplus_lr_ratio: 1.0,
            learning_rate: 1e-3,
            lr_scheduler: Schedule::Cosine,
            warmup_ratio: 0.1,
            warmup_steps: None,
            epochs: 3.0,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            cutoff_len: 1024,
            val_ratio: 0.1,
            max_samples: None,
            eval_steps: 0,
            early_stopping_patience: 0,
            save_steps: 50,
            seed: 42,
            dpo_beta: 0.1,
            kto_chosen_weight: 1.0,
            kto_rejected_weight: 1.0,
        }
    }
}

/// The learning rate LoRA needs scales inversely with model size: LLaMA-Factory's 1e-4 is
/// tuned for 7B models, and on SmolLM2-135M a 216-row labelling task is learned at 1e-3 but
/// not at 1e-4. Used when the caller gives no `--learning-rate`.
pub fn default_learning_rate(base_params: usize) -> f64 {
    match base_params {
        p if p < 1_000_000_000 => 1e-3,
        p if p < 10_000_000_000 => 2e-4,
        _ => 1e-4,
    }
}

/// Parses `--lora-target`: `all` or a comma list of module names (`q_proj,v_proj`).
pub fn parse_targets(text: &str) -> Result<Vec<LoraModule>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("all") || text == "all-linear" {
        return Ok(LoraModule::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let module = LoraModule::from_name(name).ok_or_else(|| {
            let known: Vec<_> = LoraModule::ALL.iter().map(|m| m.name()).collect();
            format!("unknown LoRA target `{name}`; use `all` or some of {}", known.join(","))
        })?;
        if !out.contains(&module) {
            out.push(module);
        }
    }
    if out.is_empty() {
        return Err("--lora-target names no module".into());
    }
    Ok(out)
}

impl TrainConfig {
    /// Checks every value; the message names the flag at fault.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be positive, got {v}"))
            }
        };
        if self.lora_rank == 0 || self.lora_rank > 256 {
            return Err(format!("--lora-rank must be in 1..=256, got {}", self.lora_rank));
        }
        positive("--lora-alpha", self.lora_alpha)?;
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(format!("--lora-dropout must be in [0, 1), got {}", self.lora_dropout));
        }
        if self.lora_target.is_empty() {
            return Err("--lora-target names no module".into());
        }
        positive("--loraplus-lr-ratio", self.loraplus_lr_ratio)?;
        positive("--learning-rate", self.learning_rate)?;
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(format!("--warmup-ratio must be in [0, 1), got {}", self.warmup_ratio));
        }
        if self.max_steps.is_none() {
            positive("--epochs", self.epochs)?;
        }
        if self.max_steps == Some(0) {
            return Err("--max-steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err("--batch-size and --grad-accum must be at least 1".into());
        }
        if self.weight_decay < 0.0 || !self.weight_decay.is_finite() {
            return Err(format!("--weight-decay must be >= 0, got {}", self.weight_decay));
        }
        positive("--max-grad-norm", self.max_grad_norm)?;
        if self.cutoff_len < 2 {
            return Err(format!("--cutoff-len must be at least 2, got {}", self.cutoff_len));
        }
        if !(0.0..1.0).contains(&self.val_ratio) {
            return Err(format!("--val-ratio must be in [0, 1), got {}", self.val_ratio));
        }
        if self.max_samples == Some(0) {
            return Err("--max-samples must be at least 1".into());
        }
        positive("--dpo-beta", self.dpo_beta)?;
        positive("--kto-chosen-weight", self.kto_chosen_weight)?;
        positive("--kto-rejected-weight", self.kto_rejected_weight)?;
        Ok(())
    }
}

/// Unset fields keep [`TrainConfig`]'s defaults (the learning rate's depends on model size).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// sft (default), dpo (preference pairs, e.g. corrections against the original answers) or
    /// kto (answers tagged desirable / undesirable, e.g. thumbs up / down without a pair).
    #[arg(long, value_enum)]
    pub stage: Option<Stage>,
    /// LoRA rank (default 8).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (default 16).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA path's input while training (default 0).
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// `all` (default: every linear layer of the decoder) or a comma list such as `q_proj,v_proj`.
    #[arg(long)]
    pub lora_target: Option<String>,
    /// Rank-stabilised LoRA: scale alpha/sqrt(r) instead of alpha/r (`--use-rslora` alone means true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,
    /// LoRA+: B matrices learn this many times faster than A (default 1, plain LoRA).
    #[arg(long)]
    pub loraplus_lr_ratio: Option<f64>,
    /// Peak learning rate (default 1e-3 below 1B parameters, 2e-4 below 10B, else 1e-4).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// linear, cosine (default) or constant, after warm-up.
    #[arg(long, value_enum)]
    pub lr_scheduler: Option<Schedule>,
    /// Warm-up as a share of all steps (default 0.1).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Warm-up steps (overrides --warmup-ratio).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Passes over the training split (default 3).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Optimiser steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch (default 4).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimiser step (default 1).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// AdamW weight decay (default 0).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Gradient clipping by global norm (default 1).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Longest prompt + answer in tokens; longer examples are dropped and reported (default 1024).
    #[arg(long)]
    pub cutoff_len: Option<usize>,
    /// Share of examples held out for validation (default 0.1).
    #[arg(long)]
    pub val_ratio: Option<f64>,
    /// Use at most this many examples (a seeded sample).
    #[arg(long)]
    pub max_samples: Option<usize>,
    /// Evaluate every N steps (default: once per epoch).
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Stop after N evaluations without a better validation loss (default: never).
    #[arg(long)]
    pub early_stopping_patience: Option<usize>,
    /// Checkpoint every N steps (default 50; 0: only at the end).
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Seed for initialisation, data order, dropout and the split (default 42).
    #[arg(long)]
    pub seed: Option<u64>,
    /// DPO's and KTO's beta (default 0.1).
    #[arg(long)]
    pub dpo_beta: Option<f64>,
    /// KTO: weight of the desirable answers' loss (default 1).
    #[arg(long)]
    pub kto_chosen_weight: Option<f64>,
    /// KTO: weight of the undesirable answers' loss (default 1; LLaMA-Factory's advice is to
    /// keep chosen·#desirable / rejected·#undesirable between 1 and 4/3).
    #[arg(long)]
    pub kto_rejected_weight: Option<f64>,
}

/// One training parameter as a form shows it: its kind, default, valid range (the same bounds
/// [`TrainConfig::validate`] enforces; a test keeps them in step) and what it does.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ParamSpec {
    /// The field name in a job's `params` (and `--` + it with `-` is the CLI flag).
    pub name: &'static str,
    /// `int`, `float`, `choice`, `bool` or `string`.
    pub kind: &'static str,
    /// `null`: unset (the parameter is optional).
    #[schema(value_type = Object)]
    pub default: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// `min` itself is not allowed (the value must be above it).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub min_exclusive: bool,
    /// `max` itself is not allowed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub max_exclusive: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<&'static str>,
    pub help: &'static str,
}

/// Every parameter of [`TrainArgs`], with the defaults for a base model of `base_params`
/// parameters (the learning rate's depends on it).
pub fn param_specs(base_params: usize) -> Vec<ParamSpec> {
    use serde_json::{json, Value};
    let d = TrainConfig { learning_rate: default_learning_rate(base_params), ..TrainConfig::default() };
    let spec = |name, kind, default: Value, help| ParamSpec {
        name,
        kind,
        default,
        min: None,
        max: None,
        min_exclusive: false,
        max_exclusive: false,
        choices: Vec::new(),
        help,
    };
    let range = |s: ParamSpec, min: f64, max: Option<f64>| ParamSpec { min: Some(min), max, ..s };
    let above = |s: ParamSpec, min: f64| ParamSpec { min: Some(min), min_exclusive: true, ..s };
    let unit = |s: ParamSpec| ParamSpec { min: Some(0.0), max: Some(1.0), max_exclusive: true, ..s };
    let choice = |s: ParamSpec, choices: Vec<&'static str>| ParamSpec { choices, ..s };
    vec![
        choice(
            spec(
                "stage",
                "choice",
                json!("sft"),
                "What the job optimises: sft (answers), dpo (preference pairs) or kto (thumbs up / down).",
            ),
            vec!["sft", "dpo", "kto"],
        ),
        range(spec("lora_rank", "int", json!(d.lora_rank), "LoRA rank."), 1.0, Some(256.0)),
        above(
            spec("lora_alpha", "float", json!(d.lora_alpha), "LoRA alpha (the update is scaled by alpha / rank)."),
            0.0,
        ),
        unit(spec("lora_dropout", "float", json!(d.lora_dropout), "Dropout on the LoRA path's input while training.")),
        spec(
            "lora_target",
            "string",
            json!("all"),
            "`all` (every linear layer of the decoder) or a comma list such as q_proj,v_proj.",
        ),
        spec("use_rslora", "bool", json!(d.use_rslora), "Rank-stabilised LoRA: scale alpha / sqrt(rank)."),
        above(
            spec(
                "loraplus_lr_ratio",
                "float",
                json!(d.loraplus_lr_ratio),
                "LoRA+: B matrices learn this many times faster than A (1: plain LoRA).",
            ),
            0.0,
        ),
        above(spec("learning_rate", "float", json!(d.learning_rate), "Peak learning rate."), 0.0),
        choice(
            spec("lr_scheduler", "choice", json!("cosine"), "How the learning rate moves after warm-up."),
            vec!["linear", "cosine", "constant"],
        ),
        unit(spec("warmup_ratio", "float", json!(d.warmup_ratio), "Warm-up as a share of all steps.")),
        range(spec("warmup_steps", "int", Value::Null, "Warm-up steps (overrides the ratio)."), 0.0, None),
        above(spec("epochs", "float", json!(d.epochs), "Passes over the training split."), 0.0),
        range(spec("max_steps", "int", Value::Null, "Optimiser steps (overrides epochs)."), 1.0, None),
        range(spec("batch_size", "int", json!(d.batch_size), "Examples per micro-batch."), 1.0, None),
        range(spec("grad_accum", "int", json!(d.grad_accum), "Micro-batches per optimiser step."), 1.0, None),
        range(spec("weight_decay", "float", json!(d.weight_decay), "AdamW weight decay."), 0.0, None),
        above(spec("max_grad_norm", "float", json!(d.max_grad_norm), "Gradient clipping by global norm."), 0.0),
        range(
            spec(
                "cutoff_len",
                "int",
                json!(d.cutoff_len),
                "Longest prompt + answer in tokens; longer examples are dropped and reported.",
            ),
            2.0,
            None,
        ),
        unit(spec("val_ratio", "float", json!(d.val_ratio), "Share of examples held out for validation.")),
        range(spec("max_samples", "int", Value::Null, "Use at most this many examples (a seeded sample)."), 1.0, None),
        range(spec("eval_steps", "int", json!(d.eval_steps), "Evaluate every N steps (0: once per epoch)."), 0.0, None),
        range(
            spec(
                "early_stopping_patience",
                "int",
                json!(d.early_stopping_patience),
                "Stop after N evaluations without a better validation loss (0: never).",
            ),
            0.0,
            None,
        ),
        range(
            spec("save_steps", "int", json!(d.save_steps), "Checkpoint every N steps (0: only at the end)."),
            0.0,
            None,
        ),
        range(
            spec("seed", "int", json!(d.seed), "Seed for initialisation, data order, dropout and the split."),
            0.0,
            None,
        ),
        above(spec("dpo_beta", "float", json!(d.dpo_beta), "DPO's and KTO's beta."), 0.0),
        above(
            spec("kto_chosen_weight", "float", json!(d.kto_chosen_weight), "KTO: weight of the desirable answers."),
            0.0,
        ),
        above(
            spec(
                "kto_rejected_weight",
                "float",
                json!(d.kto_rejected_weight),
                "KTO: weight of the undesirable answers.",
            ),
            0.0,
        ),
    ]
}

impl TrainArgs {
    /// The settings for a base model of `base_params` parameters, validated.
    pub fn resolve(&self, base_params: usize) -> Result<TrainConfig, String> {
        let d = TrainConfig { learning_rate: default_learning_rate(base_params), ..TrainConfig::default() };
        let cfg = TrainConfig {
            stage: self.stage.unwrap_or(d.stage),
            lora_rank: self.lora_rank.unwrap_or(d.lora_rank),
            lora_alpha: self.lora_alpha.unwrap_or(d.lora_alpha),
            lora_dropout: self.lora_dropout.unwrap_or(d.lora_dropout),
            lora_target: match &self.lora_target {
                Some(t) => parse_targets(t)?,
                None => d.lora_target,
            },
            use_rslora: self.use_rslora.unwrap_or(d.use_rslora),
            loraplus_lr_ratio: self.loraplus_lr_ratio.unwrap_or(d.loraplus_lr_ratio),
            learning_rate: self.learning_rate.unwrap_or(d.learning_rate),
            lr_scheduler: self.lr_scheduler.unwrap_or(d.lr_scheduler),
            warmup_ratio: self.warmup_ratio.unwrap_or(d.warmup_ratio),
            warmup_steps: self.warmup_steps.or(d.warmup_steps),
            epochs: self.epochs.unwrap_or(d.epochs),
            max_steps: self.max_steps.or(d.max_steps),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            grad_accum: self.grad_accum.unwrap_or(d.grad_accum),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            max_grad_norm: self.max_grad_norm.unwrap_or(d.max_grad_norm),
            cutoff_len: self.cutoff_len.unwrap_or(d.cutoff_len),
            val_ratio: self.val_ratio.unwrap_or(d.val_ratio),
            max_samples: self.max_samples.or(d.max_samples),
            eval_steps: self.eval_steps.unwrap_or(d.eval_steps),
            early_stopping_patience: self.early_stopping_patience.unwrap_or(d.early_stopping_patience),
            save_steps: self.save_steps.unwrap_or(d.save_steps),
            seed: self.seed.unwrap_or(d.seed),
            dpo_beta: self.dpo_beta.unwrap_or(d.dpo_beta),
            kto_chosen_weight: self.kto_chosen_weight.unwrap_or(d.kto_chosen_weight),
            kto_rejected_weight: self.kto_rejected_weight.unwrap_or(d.kto_rejected_weight),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_defaults_follow_model_size() {
        let small = TrainArgs::default().resolve(135_000_000).unwrap();
        assert_eq!((small.lora_rank, small.lora_alpha, small.batch_size, small.epochs), (8, 16.0, 4, 3.0));
        assert_eq!(small.learning_rate, 1e-3);
        assert_eq!(TrainArgs::default().resolve(7_000_000_000).unwrap().learning_rate, 2e-4);
        let args: TrainArgs = serde_json::from_value(
            serde_json::json!({"lora_rank": 4, "lora_target": "q_proj,v_proj", "learning_rate": 5e-4}),
        )
        .unwrap();
        let cfg = args.resolve(135_000_000).unwrap();
        assert_eq!((cfg.lora_rank, cfg.lora_target.len(), cfg.learning_rate), (4, 2, 5e-4));
        assert!(serde_json::from_value::<TrainArgs>(serde_json::json!({"lora_rnak": 4})).is_err(), "typos are refused");
        assert!(TrainArgs { batch_size: Some(0), ..TrainArgs::default() }
            .resolve(1)
            .unwrap_err()
            .contains("--batch-size"));
    }

    #[test]
    fn the_form_s_ranges_are_the_validation_s() {
        let specs = param_specs(135_000_000);
        let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
        let every = serde_json::to_value(TrainArgs::default()).unwrap();
        assert_eq!(names.len(), every.as_object().unwrap().len(), "one spec per parameter");
        let resolves = |name: &str, v: serde_json::Value| {
            let args: TrainArgs = serde_json::from_value(serde_json::json!({ name: v })).unwrap();
            args.resolve(135_000_000).is_ok()
        };
        for s in &specs {
            assert!(every.get(s.name).is_some(), "{} is a parameter", s.name);
            if !s.default.is_null() {
                assert!(resolves(s.name, s.default.clone()), "{}'s default is valid", s.name);
            }
            let num = |x: f64| if s.kind == "int" { serde_json::json!(x as u64) } else { serde_json::json!(x) };
            let step = if s.kind == "int" { 1.0 } else { 1e-3 };
            if let Some(min) = s.min {
                assert_eq!(resolves(s.name, num(min)), !s.min_exclusive, "{} at its min", s.name);
                assert!(resolves(s.name, num(min + step)), "{} just above its min", s.name);
                if min >= step {
                    assert!(!resolves(s.name, num(min - step)), "{} below its min", s.name);
                }
            }
            if let Some(max) = s.max {
                assert_eq!(resolves(s.name, num(max)), !s.max_exclusive, "{} at its max", s.name);
                assert!(resolves(s.name, num(max - step)), "{} just below its max", s.name);
                assert!(!resolves(s.name, num(max + step)), "{} above its max", s.name);
            }
            for c in &s.choices {
                assert!(resolves(s.name, serde_json::json!(c)), "{} = {c}", s.name);
            }
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[test]
    fn flags_parse_with_llama_factory_names() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "finetune",
            "--use-rslora",
            "--lora-target",
            "q_proj,v_proj",
            "--grad-accum",
            "2",
            "--cutoff-len",
            "512",
        ])
        .unwrap();
        let cfg = cli.args.resolve(1).unwrap();
        assert!(cfg.use_rslora);
        assert_eq!((cfg.lora_target.len(), cfg.grad_accum, cfg.cutoff_len), (2, 2, 512));
        assert!(
            !Cli::try_parse_from(["finetune", "--use-rslora", "false"]).unwrap().args.resolve(1).unwrap().use_rslora
        );
        assert!(Cli::try_parse_from(["finetune", "--lora-rank", "eight"]).is_err());
    }

    #[test]
    fn targets_and_bad_values_are_named() {
        assert_eq!(parse_targets("all").unwrap().len(), 7);
        assert_eq!(parse_targets("q_proj, v_proj,q_proj").unwrap(), vec![LoraModule::QProj, LoraModule::VProj]);
        assert!(parse_targets("qproj").unwrap_err().contains("qproj"));
        let bad = TrainConfig { val_ratio: 1.5, ..TrainConfig::default() };
        assert!(bad.validate().unwrap_err().contains("--val-ratio"));
        assert!(TrainConfig { lora_rank: 0, ..TrainConfig::default() }.validate().unwrap_err().contains("--lora-rank"));
        assert!(TrainConfig::default().validate().is_ok());
    }
}
