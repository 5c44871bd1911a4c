//! Token choice from logits: greedy, or temperature + top-p with a per-request seed, plus
//! OpenAI's frequency and presence penalties.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Sampling;
pub use runtime::llama::argmax_of as argmax;

/// Picks the next token for one sequence: [`penalize`], then [`pick`].
pub fn choose(
    logits: &mut [f32],
    sampling: &Sampling,
    seed: u64,
    position: usize,
    counts: &HashMap<u32, usize>,
    banned: &[u32],
) -> u32 {
    penalize(logits, sampling, counts);
    pick(logits, sampling, seed, position, banned)
}

/// OpenAI's frequency and presence penalties, applied to the logits in place. The logits
/// after this are the ones `logprobs` report.
pub fn penalize(logits: &mut [f32], sampling: &Sampling, counts: &HashMap<u32, usize>) {
    let freq = sampling.frequency_penalty.unwrap_or(0.0);
    let presence = sampling.presence_penalty.unwrap_or(0.0);
    if freq != 0.0 || presence != 0.0 {
        for (&tok, &n) in counts {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l -= freq * n as f32 + presence;
            }
        }
    }
}

/// Picks a token from (penalized, masked) logits. `position` (tokens so far) is mixed into
/// the seed so that a seeded request replays exactly, whatever else shares its batch.
pub fn pick(logits: &mut [f32], sampling: &Sampling, seed: u64, position: usize, banned: &[u32]) -> u32 {
    for &t in banned {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    if sampling.is_greedy() {
        return argmax(logits);
    }
    let mut rng = StdRng::seed_from_u64(seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    sample_top_p(logits, sampling.temperature.unwrap_or(1.0), sampling.top_p.unwrap_or(1.0), &mut rng) as u32
}

/// `log softmax(logits)`'s normaliser: the log of the sum of exponentials, in f64.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln()
}

/// The `k` largest logits' indices, largest first (ties: the lower index first).
pub fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return Vec::new();
    }
    for (i, &l) in logits.iter().enumerate() {
        if best.len() == k && l <= best[k - 1].0 {
            continue;
        }
        let at = best.partition_point(|&(v, _)| v >= l);
        best.insert(at, (l, i as u32));
        best.truncate(k);
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// Samples an index from `softmax(logits / temperature)` restricted to the top-p nucleus.
fn sample_top_p(logits: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> usize {
    let t = temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> =
        logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i, ((l - max) / t).exp())).collect();
    if probs.is_empty() {
        return 0;
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (n, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept as f64 >= top_p {
            cut = n + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f32 = probs.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f32>() * mass;
    for (i, p) in &probs {
        draw -= p;
        if draw <= 0.0 {
            return *i;
        }
    }
    probs[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: Option<f64>) -> Sampling {
        Sampling {
            temperature,
            top_p: None,
            seed: None,
            stop: vec![],
            frequency_penalty: None,
            presence_penalty: None,
            ignore_eos: false,
            ..Sampling::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_respects_bans() {
        let mut l = vec![0.1, 3.0, 2.0];
        assert_eq!(choose(&mut l, &sampling(None), 0, 0, &HashMap::new(), &[]), 1);
        let mut l = vec![0.1, 3.0, 2.0];
        assert_eq!(choose(&mut l, &sampling(Some(0.0)), 0, 0, &HashMap::new(), &[1]), 2);
    }

    #[test]
    fn top_k_orders_and_log_sum_exp_normalises() {
        let l = vec![1.0, 3.0, 2.0, 3.0];
        assert_eq!(top_k(&l, 3), vec![1, 3, 2]);
        assert!(top_k(&l, 0).is_empty());
        let total: f64 = l.iter().map(|&x| (x as f64 - log_sum_exp(&l)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_seed_replays_and_top_p_cuts_the_tail() {
        let logits = vec![5.0, 4.9, -10.0, -10.0];
        let s = Sampling { top_p: Some(0.9), ..sampling(Some(1.0)) };
        let picks: Vec<u32> = (0..50).map(|p| choose(&mut logits.clone(), &s, 7, p, &HashMap::new(), &[])).collect();
        let again: Vec<u32> = (0..50).map(|p| choose(&mut logits.clone(), &s, 7, p, &HashMap::new(), &[])).collect();
        assert_eq!(picks, again);
        assert!(picks.iter().all(|&t| t < 2));
        assert!(picks.contains(&0) && picks.contains(&1));
    }
}
