//! Training hyper-parameters (LLaMA-Factory's names and defaults where they exist), validated
//! once, and the learning-rate schedule they imply.

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
    /// DPO's temperature on the log-ratio margin.
    pub dpo_beta: f64,
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
        Ok(())
    }

    /// LoRA's output scale.
    pub fn scale(&self) -> f64 {
        let r = self.lora_rank as f64;
        if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }
    }

    /// Examples per optimiser step.
    pub fn examples_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    /// Optimiser steps for `n` training examples.
    pub fn total_steps(&self, n: usize) -> usize {
        let per_epoch = n.div_ceil(self.examples_per_step()).max(1);
        match self.max_steps {
            Some(s) => s,
            None => ((self.epochs * per_epoch as f64).ceil() as usize).max(1),
        }
    }

    pub fn warmup(&self, total: usize) -> usize {
        self.warmup_steps.unwrap_or_else(|| (self.warmup_ratio * total as f64).ceil() as usize).min(total)
    }

    /// The learning rate of step `step` (0-based) out of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = self.warmup(total);
        if step < warmup {
            return self.learning_rate * (step + 1) as f64 / warmup as f64;
        }
        let span = (total - warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        match self.lr_scheduler {
            Schedule::Constant => self.learning_rate,
            Schedule::Linear => self.learning_rate * (1.0 - progress),
            Schedule::Cosine => self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay_to_zero() {
        let cfg = TrainConfig { learning_rate: 1.0, warmup_steps: Some(2), ..TrainConfig::default() };
        assert_eq!(cfg.lr_at(0, 10), 0.5);
        assert_eq!(cfg.lr_at(1, 10), 1.0);
        assert!((cfg.lr_at(2, 10) - 1.0).abs() < 1e-12, "cosine starts at the peak");
        assert!(cfg.lr_at(9, 10) < 0.05);
        let linear = TrainConfig { lr_scheduler: Schedule::Linear, ..cfg.clone() };
        assert!((linear.lr_at(6, 10) - 0.5).abs() < 1e-12);
        let constant = TrainConfig { lr_scheduler: Schedule::Constant, ..cfg };
        assert_eq!(constant.lr_at(9, 10), 1.0);
    }

    #[test]
    fn steps_follow_epochs_batch_and_accumulation() {
        let cfg = TrainConfig { batch_size: 4, grad_accum: 2, epochs: 3.0, ..TrainConfig::default() };
        assert_eq!(cfg.total_steps(20), 9, "ceil(20/8) = 3 steps an epoch");
        assert_eq!(TrainConfig { max_steps: Some(5), ..cfg }.total_steps(20), 5);
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
