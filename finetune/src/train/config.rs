//! What a run's hyper-parameters imply for the loop: LoRA's scale, steps, warm-up and the
//! learning-rate schedule. The parameters themselves are `protocol::params`.

use protocol::params::{Schedule, TrainConfig};

/// The schedule a [`TrainConfig`] implies.
pub trait RunPlan {
    /// LoRA's output scale.
    fn scale(&self) -> f64;
    /// Examples per optimiser step.
    fn examples_per_step(&self) -> usize;
    /// Optimiser steps for `n` training examples.
    fn total_steps(&self, n: usize) -> usize;
    /// Warm-up steps out of `total`.
    fn warmup(&self, total: usize) -> usize;
    /// The learning rate of step `step` (0-based) out of `total`.
    fn lr_at(&self, step: usize, total: usize) -> f64;
}

impl RunPlan for TrainConfig {
    fn scale(&self) -> f64 {
        let r = self.lora_rank as f64;
        if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }
    }

    fn examples_per_step(&self) -> usize {
        self.batch_size * self.grad_accum
    }

    fn total_steps(&self, n: usize) -> usize {
        let per_epoch = n.div_ceil(self.examples_per_step()).max(1);
        match self.max_steps {
            Some(s) => s,
            None => ((self.epochs * per_epoch as f64).ceil() as usize).max(1),
        }
    }

    fn warmup(&self, total: usize) -> usize {
        self.warmup_steps.unwrap_or_else(|| (self.warmup_ratio * total as f64).ceil() as usize).min(total)
    }

    fn lr_at(&self, step: usize, total: usize) -> f64 {
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
}
