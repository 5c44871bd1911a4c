//! The training loop shared by SFT and DPO: seeded data order, micro-batches with gradient
//! accumulation, clipping, AdamW, evaluation with early stopping, checkpoints that a killed
//! job resumes from bit for bit, a progress bar, and a JSON line per step.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use runtime::llama::Llama;
use runtime::lora::AdapterWeights;
use serde::{Deserialize, Serialize};

use super::batch::{Batch, Seq};
use super::config::RunPlan;
use super::params::{AdamW, LoraParams};
use crate::error::FinetuneError;
use protocol::jobs::StepLog;
use protocol::jsonl::{Appender, Durability};
use protocol::names::TRAIN_LOG_FILE;
use protocol::params::TrainConfig;

/// One training or validation item.
#[derive(Debug, Clone)]
pub enum Item {
    Sft(Seq),
    /// A preference pair with the reference model's log-probabilities of both answers.
    Pair {
        chosen: Seq,
        rejected: Seq,
        ref_chosen: f32,
        ref_rejected: f32,
    },
    /// A KTO answer with its verdict, the same prompt with another item's answer (`kl`, whose
    /// log-ratio estimates the KL reference point) and the reference's log-probabilities of both.
    Kto {
        seq: Seq,
        kl: Seq,
        desirable: bool,
        ref_lp: f32,
        ref_kl: f32,
    },
}

impl Item {
    /// A KTO item before its reference scores and mismatched answer are filled in.
    pub fn kto(seq: Seq, desirable: bool) -> Self {
        Item::Kto { kl: seq.clone(), seq, desirable, ref_lp: 0.0, ref_kl: 0.0 }
    }

    /// What the step's loss is averaged over: answer tokens (SFT), pairs (DPO) or answers (KTO).
    fn weight(&self) -> usize {
        match self {
            Item::Sft(s) => s.answer_tokens(),
            Item::Pair { .. } | Item::Kto { .. } => 1,
        }
    }

    /// The sequences the item runs through the model, in the order their scores are used.
    pub fn scored(&self) -> Vec<&Seq> {
        match self {
            Item::Sft(s) => vec![s],
            Item::Pair { chosen, rejected, .. } => vec![chosen, rejected],
            Item::Kto { seq, kl, .. } => vec![seq, kl],
        }
    }
}

/// What a micro-batch's scores say besides its loss: DPO's β-scaled margins per pair, KTO's
/// rewards `β·(log p − log p_ref)` per answer with its verdict.
#[derive(Debug, Default)]
struct Scores {
    margins: Vec<f32>,
    rewards: Vec<(f32, bool)>,
}

/// Held-out loss and, for preference stages, the ranking figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalStats {
    /// Mean loss per answer token (SFT), pair (DPO) or answer (KTO).
    pub loss: f64,
    /// DPO: share of pairs ranked right. KTO: share of (desirable, undesirable) answer pairs
    /// whose desirable answer has the higher reward (ties count half).
    pub reward_accuracy: Option<f64>,
    /// DPO: mean β-scaled margin. KTO: mean reward of desirable answers minus that of
    /// undesirable ones.
    pub reward_margin: Option<f64>,
}

impl Scores {
    fn stats(&self, loss: f64) -> EvalStats {
        if !self.margins.is_empty() {
            let n = self.margins.len() as f64;
            return EvalStats {
                loss,
                reward_accuracy: Some(self.margins.iter().filter(|m| **m > 0.0).count() as f64 / n),
                reward_margin: Some(self.margins.iter().map(|m| *m as f64).sum::<f64>() / n),
            };
        }
        let good: Vec<f64> = self.rewards.iter().filter(|r| r.1).map(|r| r.0 as f64).collect();
        let bad: Vec<f64> = self.rewards.iter().filter(|r| !r.1).map(|r| r.0 as f64).collect();
        if good.is_empty() || bad.is_empty() {
            return EvalStats { loss, reward_accuracy: None, reward_margin: None };
        }
        let mut above = 0.0;
        for g in &good {
            for b in &bad {
                above += if g > b {
                    1.0
                } else if g == b {
                    0.5
                } else {
                    0.0
                };
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        EvalStats {
            loss,
            reward_accuracy: Some(above / (good.len() * bad.len()) as f64),
            reward_margin: Some(mean(&good) - mean(&bad)),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub steps: usize,
    pub total_steps: usize,
    pub stopped_early: bool,
    pub best_step: Option<usize>,
    pub best_val_loss: Option<f64>,
    pub final_train_loss: f64,
    pub tokens_per_s: f64,
    pub train_seconds: f64,
    pub resumed_from: Option<usize>,
    /// The process's peak resident set so far (Linux `VmHWM`), in MiB.
    pub peak_rss_mib: Option<f64>,
}

/// Peak resident set of this process in MiB, where the kernel reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// What a checkpoint holds besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    fingerprint: String,
    opt_t: usize,
    best_step: Option<usize>,
    best_val_loss: Option<f64>,
    bad_evals: usize,
    tokens: usize,
    seconds: f64,
    last_loss: f64,
}

/// Runs the loop; `out` receives `checkpoints/`, `train_log.jsonl`. `fingerprint` identifies
/// the job (settings + data): a checkpoint of another job is never resumed.
pub struct Trainer<'a> {
    pub model: &'a Llama,
    pub cfg: &'a TrainConfig,
    pub out: &'a Path,
    pub fingerprint: String,
    /// Checked before every step; a cancelled job checkpoints and stops.
    pub cancel: &'a (dyn Fn() -> bool + Sync),
    /// Draw a progress bar (a terminal) or print a line per step.
    pub progress: bool,
}

fn err(e: candle_core::Error) -> FinetuneError {
    FinetuneError::Training { detail: e.to_string() }
}

/// The order of the training items in `epoch`: a Fisher-Yates shuffle driven by (seed, epoch).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for i in (1..n).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(i, (state % (i as u64 + 1)) as usize);
    }
    order
}

/// `-log σ(x)`, computed without overflow: `relu(-x) + log(1 + e^{-|x|})`.
fn neg_log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    x.neg()?.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

impl Trainer<'_> {
    /// The summed loss of `items` (a micro-batch) and what its scores say.
    fn loss_sum(&self, adapter: Option<&AdapterWeights>, items: &[&Item]) -> candle_core::Result<(Tensor, Scores)> {
        let msg = |e: FinetuneError| candle_core::Error::Msg(e.to_string());
        let seqs: Vec<&Seq> = items.iter().flat_map(|i| i.scored()).collect();
        match items.first() {
            Some(Item::Pair { .. }) => {
                let refs: Vec<f32> = items
                    .iter()
                    .flat_map(|i| match i {
                        Item::Pair { ref_chosen, ref_rejected, .. } => vec![*ref_chosen, *ref_rejected],
                        _ => Vec::new(),
                    })
                    .collect();
                let batch = Batch::new(&seqs).map_err(msg)?;
                let lp = batch.sequence_logprobs(&batch.token_logprobs(self.model, adapter)?)?;
                let k = seqs.len() / 2;
                let diff = (lp - Tensor::from_vec(refs, k * 2, &Device::Cpu)?)?.reshape((k, 2))?;
                let margin = ((diff.narrow(1, 0, 1)? - diff.narrow(1, 1, 1)?)? * self.cfg.dpo_beta)?;
                let margins = margin.flatten_all()?.to_vec1::<f32>()?;
                Ok((neg_log_sigmoid(&margin)?.sum_all()?, Scores { margins, ..Scores::default() }))
            }
            Some(Item::Kto { .. }) => self.kto_loss(adapter, items),
            _ => {
                let batch = Batch::new(&seqs).map_err(msg)?;
                Ok((batch.token_logprobs(self.model, adapter)?.sum_all()?.neg()?, Scores::default()))
            }
        }
    }

    /// KTO (Ethayarajh et al. 2024, as TRL and LLaMA-Factory compute it): with the log-ratio
    /// `r = log p(y|x) − log p_ref(y|x)` and the reference point `z = max(0, mean r_kl)` over the
    /// micro-batch's mismatched answers (no gradient), a desirable answer costs
    /// `w_d·(1 − σ(β(r − z)))` and an undesirable one `w_u·(1 − σ(β(z − r)))`.
    fn kto_loss(&self, adapter: Option<&AdapterWeights>, items: &[&Item]) -> candle_core::Result<(Tensor, Scores)> {
        let msg = |e: FinetuneError| candle_core::Error::Msg(e.to_string());
        let (mut seqs, mut kls, mut refs, mut kl_refs, mut signs, mut weights, mut flags) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for item in items {
            if let Item::Kto { seq, kl, desirable, ref_lp, ref_kl } = item {
                seqs.push(seq);
                kls.push(kl);
                refs.push(*ref_lp);
                kl_refs.push(*ref_kl);
                signs.push(if *desirable { 1f32 } else { -1.0 });
                weights.push(if *desirable { self.cfg.kto_chosen_weight } else { self.cfg.kto_rejected_weight } as f32);
                flags.push(*desirable);
            }
        }
        let k = seqs.len();
        let dev = Device::Cpu;
        let kl_batch = Batch::new(&kls).map_err(msg)?;
        let kl_lp = kl_batch.sequence_logprobs(&kl_batch.token_logprobs(self.model, adapter)?)?.detach();
        let kl_ratio = kl_lp.to_vec1::<f32>()?.iter().zip(&kl_refs).map(|(a, b)| a - b).sum::<f32>() / k.max(1) as f32;
        let z = kl_ratio.max(0.0) as f64;
        let batch = Batch::new(&seqs).map_err(msg)?;
        let lp = batch.sequence_logprobs(&batch.token_logprobs(self.model, adapter)?)?;
        let ratio = (lp - Tensor::from_vec(refs, k, &dev)?)?;
        let rewards: Vec<(f32, bool)> =
            (ratio.to_vec1::<f32>()?.iter().map(|r| r * self.cfg.dpo_beta as f32)).zip(flags).collect();
        // 1 − σ(x) = σ(−x) = exp(−(−log σ(−x))), from ops that back-propagate.
        let x = ((ratio - z)? * self.cfg.dpo_beta)?.mul(&Tensor::from_vec(signs, k, &dev)?)?;
        let loss = neg_log_sigmoid(&x.neg()?)?.neg()?.exp()?.mul(&Tensor::from_vec(weights, k, &dev)?)?;
        Ok((loss.sum_all()?, Scores { rewards, ..Scores::default() }))
    }

    /// Held-out loss and ranking figures of the weights being trained.
    pub fn evaluate(&self, params: &LoraParams, val: &[Item]) -> Result<EvalStats, FinetuneError> {
        self.evaluate_adapter(Some(&params.adapter(false)), val)
    }

    /// The same for any adapter (the base model with `None`, or the version serving today).
    pub fn evaluate_adapter(&self, adapter: Option<&AdapterWeights>, val: &[Item]) -> Result<EvalStats, FinetuneError> {
        let (mut sum, mut weight, mut scores) = (0.0, 0usize, Scores::default());
        let refs: Vec<&Item> = val.iter().collect();
        for chunk in refs.chunks(self.cfg.batch_size.max(1)) {
            let (loss, s) = self.loss_sum(adapter, chunk).map_err(err)?;
            sum += loss.to_scalar::<f32>().map_err(err)? as f64;
            weight += chunk.iter().map(|i| i.weight()).sum::<usize>();
            scores.margins.extend(s.margins);
            scores.rewards.extend(s.rewards);
        }
        Ok(scores.stats(sum / weight.max(1) as f64))
    }

    /// Trains `params` on `train`, evaluating on `val`. Resumes from `out/checkpoints` when it
    /// holds a checkpoint of this job. On return `params` holds the best weights seen on the
    /// validation set (the last ones when there is none).
    pub fn run(&self, params: &LoraParams, train: &[Item], val: &[Item]) -> Result<Outcome, FinetuneError> {
        let cfg = self.cfg;
        if train.is_empty() {
            return Err(FinetuneError::Training { detail: "no training examples".into() });
        }
        std::fs::create_dir_all(self.out).map_err(|e| FinetuneError::io(self.out, e))?;
        let total = cfg.total_steps(train.len());
        let per_epoch = train.len().div_ceil(cfg.examples_per_step()).max(1);
        let mut opt = AdamW::new(params.vars(cfg.loraplus_lr_ratio), cfg.weight_decay)?;
        let mut state = TrainerState {
            step: 0,
            fingerprint: self.fingerprint.clone(),
            opt_t: 0,
            best_step: None,
            best_val_loss: None,
            bad_evals: 0,
            tokens: 0,
            seconds: 0.0,
            last_loss: f64::NAN,
        };
        let mut best: Option<Vec<Tensor>> = None;
        let resumed_from = match load_checkpoint(self.out, &self.fingerprint)? {
            Some((saved, values, opt_state, best_values)) => {
                params.restore(&values)?;
                opt.restore(opt_state, saved.opt_t)?;
                best = best_values;
                state = saved;
                Some(state.step)
            }
            None => None,
        };
        let log_path = self.out.join(TRAIN_LOG_FILE);
        truncate_log(&log_path, state.step)?;
        let mut log = Appender::open(&log_path)?;
        let bar = Progress::new(total as u64, state.step as u64, self.progress);
        if let Some(step) = resumed_from {
            bar.line(&format!("resuming from the checkpoint at step {step}"));
        }
        let vars = params.vars(cfg.loraplus_lr_ratio);
        let mut order_epoch = usize::MAX;
        let mut order = Vec::new();
        let mut stopped_early = false;
        let mut step = state.step;
        while step < total {
            if (self.cancel)() {
                save_checkpoint(self.out, &state, params, &opt, best.as_deref())?;
                bar.finish();
                return Err(FinetuneError::Cancelled { step });
            }
            let started = Instant::now();
            let epoch = step / per_epoch;
            if epoch != order_epoch {
                order = epoch_order(train.len(), cfg.seed, epoch);
                order_epoch = epoch;
            }
            let within = step % per_epoch;
            let lo = (within * cfg.examples_per_step()).min(train.len());
            let hi = ((within + 1) * cfg.examples_per_step()).min(train.len());
            let items: Vec<&Item> = order[lo..hi].iter().map(|&i| &train[i]).collect();
            let weight: usize = items.iter().map(|i| i.weight()).sum::<usize>().max(1);
            let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
            let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
            for (k, chunk) in items.chunks(cfg.batch_size).enumerate() {
                params.reseed_dropout(cfg.seed ^ ((step as u64) << 16 | k as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
                let adapter = params.adapter(true);
                let (loss, _) = self.loss_sum(Some(&adapter), chunk).map_err(err)?;
                loss_sum += loss.to_scalar::<f32>().map_err(err)? as f64;
                tokens += chunk.iter().flat_map(|i| i.scored()).map(|s| s.ids.len()).sum::<usize>();
                let store = (loss / weight as f64).map_err(err)?.backward().map_err(err)?;
                for (g, (var, _)) in grads.iter_mut().zip(&vars) {
                    if let Some(new) = store.get(var.as_tensor()) {
                        *g = Some(match g.take() {
                            Some(old) => (old + new).map_err(err)?,
                            None => new.clone(),
                        });
                    }
                }
            }
            let grads: Vec<Tensor> = grads
                .into_iter()
                .zip(&vars)
                .map(|(g, (v, _))| g.map_or_else(|| v.as_tensor().zeros_like().map_err(err), Ok))
                .collect::<Result<_, _>>()?;
            let mut norm_sq = 0.0f64;
            for g in &grads {
                norm_sq += g.sqr().map_err(err)?.sum_all().map_err(err)?.to_scalar::<f32>().map_err(err)? as f64;
            }
            let grad_norm = norm_sq.sqrt();
            let loss = loss_sum / weight as f64;
            if !loss.is_finite() || !grad_norm.is_finite() {
                return Err(FinetuneError::Training { detail: format!("the loss diverged at step {step} (loss {loss}, gradient norm {grad_norm}); lower --learning-rate") });
            }
            let grads = if grad_norm > cfg.max_grad_norm {
                let s = cfg.max_grad_norm / grad_norm;
                grads.iter().map(|g| (g * s).map_err(err)).collect::<Result<Vec<_>, _>>()?
            } else {
                grads
            };
            let lr = cfg.lr_at(step, total);
            opt.step(&grads, lr)?;
            step += 1;
            let seconds = started.elapsed().as_secs_f64();
            state.tokens += tokens;
            state.seconds += seconds;
            state.last_loss = loss;
            state.step = step;
            state.opt_t = opt.t;
            let mut entry = StepLog {
                step,
                total_steps: total,
                epoch: step as f64 / per_epoch as f64,
                loss,
                lr,
                grad_norm,
                tokens,
                tokens_per_s: tokens as f64 / seconds.max(1e-9),
                elapsed_s: state.seconds,
                val_loss: None,
                reward_accuracy: None,
            };
            let eval_due = !val.is_empty()
                && (step == total
                    || if cfg.eval_steps > 0 {
                        step.is_multiple_of(cfg.eval_steps)
                    } else {
                        step.is_multiple_of(per_epoch)
                    });
            if eval_due {
                let stats = self.evaluate(params, val)?;
                let (val_loss, acc) = (stats.loss, stats.reward_accuracy);
                entry.val_loss = Some(val_loss);
                entry.reward_accuracy = acc;
                if state.best_val_loss.is_none_or(|b| val_loss < b) {
                    state.best_val_loss = Some(val_loss);
                    state.best_step = Some(step);
                    state.bad_evals = 0;
                    best = Some(params.snapshot()?);
                } else {
                    state.bad_evals += 1;
                }
                bar.line(&format!(
                    "step {step}: validation loss {val_loss:.4}{}",
                    acc.map_or(String::new(), |a| format!(", reward accuracy {a:.3}"))
                ));
            }
            log.append(&entry, Durability::Written)?;
            bar.step(&entry);
            if cfg.early_stopping_patience > 0 && state.bad_evals >= cfg.early_stopping_patience {
                bar.line(&format!(
                    "early stopping at step {step}: no better validation loss in {} evaluations",
                    state.bad_evals
                ));
                stopped_early = true;
                break;
            }
            if cfg.save_steps > 0 && step.is_multiple_of(cfg.save_steps) && step < total {
                save_checkpoint(self.out, &state, params, &opt, best.as_deref())?;
            }
        }
        bar.finish();
        log.sync()?;
        if let Some(values) = &best {
            params.restore(values)?;
        }
        Ok(Outcome {
            steps: step,
            total_steps: total,
            stopped_early,
            best_step: state.best_step,
            best_val_loss: state.best_val_loss,
            final_train_loss: state.last_loss,
            tokens_per_s: state.tokens as f64 / state.seconds.max(1e-9),
            train_seconds: state.seconds,
            resumed_from,
            peak_rss_mib: peak_rss_mib(),
        })
    }
}

fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Writes `checkpoints/step-N` through a temporary directory and one rename, then removes
/// older ones: a kill at any moment leaves the previous checkpoint or the new one, whole.
fn save_checkpoint(
    out: &Path,
    state: &TrainerState,
    params: &LoraParams,
    opt: &AdamW,
    best: Option<&[Tensor]>,
) -> Result<(), FinetuneError> {
    let root = checkpoint_dir(out);
    std::fs::create_dir_all(&root).map_err(|e| FinetuneError::io(&root, e))?;
    let tmp = root.join(format!("tmp-{}", state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| FinetuneError::io(&tmp, e))?;
    let mut tensors = std::collections::HashMap::new();
    for (i, t) in params.snapshot()?.into_iter().enumerate() {
        tensors.insert(format!("param.{i}"), t);
    }
    for (i, t) in opt.state().into_iter().enumerate() {
        tensors.insert(format!("opt.{i}"), t);
    }
    for (i, t) in best.unwrap_or_default().iter().enumerate() {
        tensors.insert(format!("best.{i}"), t.clone());
    }
    let file = tmp.join("state.safetensors");
    candle_core::safetensors::save(&tensors, &file).map_err(err)?;
    let json = tmp.join("trainer.json");
    std::fs::write(&json, serde_json::to_vec_pretty(state).unwrap_or_default())
        .map_err(|e| FinetuneError::io(&json, e))?;
    for f in [&file, &json] {
        std::fs::File::open(f).and_then(|f| f.sync_all()).map_err(|e| FinetuneError::io(f, e))?;
    }
    let final_dir = root.join(format!("step-{}", state.step));
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| FinetuneError::io(&final_dir, e))?;
    for (step, dir) in list_checkpoints(&root) {
        if step != state.step {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(())
}

fn list_checkpoints(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| Some((p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()?, p)))
        .collect();
    out.sort();
    out
}

type Loaded = (TrainerState, Vec<Tensor>, Vec<Tensor>, Option<Vec<Tensor>>);

/// The newest checkpoint of this job, if any. A checkpoint of another job is an error: the
/// output directory belongs to that job.
fn load_checkpoint(out: &Path, fingerprint: &str) -> Result<Option<Loaded>, FinetuneError> {
    let Some((_, dir)) = list_checkpoints(&checkpoint_dir(out)).pop() else {
        return Ok(None);
    };
    let json = dir.join("trainer.json");
    let text = std::fs::read(&json).map_err(|e| FinetuneError::io(&json, e))?;
    let state: TrainerState = serde_json::from_slice(&text)
        .map_err(|e| FinetuneError::Training { detail: format!("{}: {e}", json.display()) })?;
    if state.fingerprint != fingerprint {
        return Err(FinetuneError::Config {
            detail: format!(
                "{} holds a checkpoint of a different job (other settings or data); use another --out",
                out.display()
            ),
        });
    }
    let tensors = candle_core::safetensors::load(dir.join("state.safetensors"), &Device::Cpu).map_err(err)?;
    let take = |prefix: &str| -> Vec<Tensor> {
        let mut v: Vec<(usize, Tensor)> =
            tensors.iter().filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.parse().ok()?, t.clone()))).collect();
        v.sort_by_key(|(i, _)| *i);
        v.into_iter().map(|(_, t)| t).collect()
    };
    let best = take("best.");
    Ok(Some((state, take("param."), take("opt."), (!best.is_empty()).then_some(best))))
}

/// Drops log lines past `step` (written after the checkpoint a resumed job starts from).
fn truncate_log(path: &Path, step: usize) -> Result<(), FinetuneError> {
    if !path.exists() {
        return Ok(());
    }
    let mut kept = Vec::new();
    protocol::jsonl::for_each(path, |s: StepLog| {
        if s.step <= step {
            kept.push(s)
        }
    })?;
    Ok(protocol::jsonl::replace(path, &kept)?)
}

/// A progress bar on a terminal; otherwise one plain line per step on stderr.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
}

impl Progress {
    fn new(total: u64, done: u64, enabled: bool) -> Self {
        use std::io::IsTerminal;
        if !enabled {
            return Self { bar: None, plain: false };
        }
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total).with_position(done);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} steps {msg} eta {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Self { bar: Some(bar), plain: false }
        } else {
            Self { bar: None, plain: true }
        }
    }

    fn step(&self, s: &StepLog) {
        let msg = format!("loss {:.4} · lr {:.2e} · {:.0} tok/s", s.loss, s.lr, s.tokens_per_s);
        match &self.bar {
            Some(bar) => {
                bar.set_message(msg.clone());
                bar.println(format!("step {:>5}  epoch {:.2}  {msg}  grad-norm {:.3}", s.step, s.epoch, s.grad_norm));
                bar.set_position(s.step as u64);
            }
            None if self.plain => {
                eprintln!("step {:>5}  epoch {:.2}  {msg}  grad-norm {:.3}", s.step, s.epoch, s.grad_norm)
            }
            None => {}
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if self.plain => eprintln!("{text}"),
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 1, 0));
        assert_ne!(a, epoch_order(50, 1, 1));
        assert_ne!(a, epoch_order(50, 2, 0));
    }

    #[test]
    fn neg_log_sigmoid_is_stable() {
        let x = Tensor::new(&[-100f32, 0.0, 100.0], &Device::Cpu).unwrap();
        let y = neg_log_sigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (y[0] - 100.0).abs() < 1e-3 && (y[1] - std::f32::consts::LN_2).abs() < 1e-6 && y[2].abs() < 1e-6,
            "{y:?}"
        );
    }
}
