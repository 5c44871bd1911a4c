//! Grouped-query attention over the KV caches: register-blocked scores and weighted values
//! (with the AVX-512 kernels for heads of width 64) and the softmax between them.

use rayon::prelude::*;

use super::kv_cache::{KvCache, KEY_BLOCK};
use super::ops::exp_nonpositive;
use super::{Runtime, SeqInput, SharedMut};
use crate::kernels::axpy;

/// Query tokens per attention task during prefill.
const ATTN_CHUNK: usize = 16;

/// One kv head of one layer of one sequence's cache, seen by the query heads that share it.
struct GroupView<'a> {
    cache: &'a KvCache,
    layer: usize,
    group: usize,
    keys: usize,
    hd: usize,
}

/// The scores of `R` (scaled) query heads against one block of 16 key positions (`kb`:
/// component `d`'s 16 values at `d·16`), the partial sums in registers. `FUSED` sums with
/// FMAs (whole blocks); otherwise each product is rounded before it is added (the partial last
/// block, whose positions were once summed one by one that way: keeping their bits keeps
/// greedy answers as they were).
#[inline(always)]
fn score_block<const R: usize, const HD: usize, const FUSED: bool>(
    kb: &[f32],
    qs: &[[f32; HD]; R],
) -> [[f32; KEY_BLOCK]; R] {
    let mut acc = [[if FUSED { 0.0 } else { -0.0f32 }; KEY_BLOCK]; R];
    for d in 0..HD {
        let k: &[f32; KEY_BLOCK] = kb[d * KEY_BLOCK..(d + 1) * KEY_BLOCK].try_into().expect("a whole block");
        for r in 0..R {
            let qd = qs[r][d];
            for l in 0..KEY_BLOCK {
                acc[r][l] = if FUSED { qd.mul_add(k[l], acc[r][l]) } else { acc[r][l] + qd * k[l] };
            }
        }
    }
    acc
}

impl GroupView<'_> {
    /// This group's keys at positions `pb·16 .. pb·16 + 16`: component `d`'s 16 values at
    /// `d·16` (one contiguous run of `head_dim · 16` floats).
    fn key_block(&self, pb: usize) -> &[f32] {
        let (k, stride) = self.keys_from_start();
        &k[pb * stride..][..self.hd * KEY_BLOCK]
    }

    fn value(&self, p: usize) -> &[f32] {
        let (v, stride) = self.values_from_start();
        &v[p * stride..][..self.hd]
    }

    /// `R` query heads of width `HD` (`q` is `R·HD`) over the group's keys into `dst` (`R·HD`).
    /// Scores are built 16 positions at a time with the `R` partial sums in registers, and the
    /// values 16 components at a time, so neither loop stores and reloads partial results.
    /// With AVX-512 and width 64, kernels do both halves 16 lanes a register, four key blocks a
    /// pass and all 64 value components a pass, with the same bits.
    fn attend<const R: usize, const HD: usize>(&self, q: &[f32], scale: f32, scores: &mut Vec<f32>, dst: &mut [f32]) {
        let keys = self.keys;
        if scores.len() < R * keys {
            scores.resize(R * keys, 0.0);
        }
        let mut qs = [[0f32; HD]; R];
        for (r, qr) in qs.iter_mut().enumerate() {
            for (d, v) in qr.iter_mut().enumerate() {
                *v = q[r * HD + d] * scale;
            }
        }
        let (k, k_stride) = self.keys_from_start();
        if !(HD == 64 && crate::kernels::attention_scores_64::<R>(k, k_stride, qs.as_flattened(), keys, scores)) {
            self.scores_portable::<R, HD>(&qs, scores);
        }
        let mut inv = [0f32; R];
        for (r, i) in inv.iter_mut().enumerate() {
            *i = 1.0 / softmax_numerators(&mut scores[r * keys..(r + 1) * keys]);
        }
        for (r, &i) in inv.iter().enumerate() {
            for sc in &mut scores[r * keys..(r + 1) * keys] {
                *sc *= i;
            }
        }
        let (v, v_stride) = self.values_from_start();
        if !(HD == 64 && crate::kernels::attention_values_64::<R>(v, v_stride, scores, keys, dst)) {
            self.values_portable::<R, HD>(scores, dst);
        }
    }

    /// This group's key blocks from the first on, and the floats from one block to the next.
    fn keys_from_start(&self) -> (&[f32], usize) {
        let at = self.cache.key_block(self.layer, 0) + self.group * self.hd * KEY_BLOCK;
        (&self.cache.k[at..], self.cache.kv_dim * KEY_BLOCK)
    }

    /// This group's values from position 0 on, and the floats from one position to the next.
    fn values_from_start(&self) -> (&[f32], usize) {
        (&self.cache.v[self.cache.at(self.layer, 0) + self.group * self.hd..], self.cache.kv_dim)
    }

    /// The scores of [`Self::attend`] with portable code (what the AVX-512 kernel matches bit
    /// for bit).
    fn scores_portable<const R: usize, const HD: usize>(&self, qs: &[[f32; HD]; R], scores: &mut [f32]) {
        let keys = self.keys;
        let whole = keys / KEY_BLOCK * KEY_BLOCK;
        for p0 in (0..whole).step_by(KEY_BLOCK) {
            for (r, a) in score_block::<R, HD, true>(self.key_block(p0 / KEY_BLOCK), qs).iter().enumerate() {
                scores[r * keys + p0..r * keys + p0 + KEY_BLOCK].copy_from_slice(a);
            }
        }
        // The last, partial block as a block too, with the same roundings as the scalar sums it
        // replaces: its memory is whole (blocks are allocated whole), and the lanes past `keys`
        // are computed and dropped. One 64-long chain of dependent adds per position took more
        // than half of attention's time at sixteen streams over HTTP.
        if whole < keys {
            for (r, a) in score_block::<R, HD, false>(self.key_block(whole / KEY_BLOCK), qs).iter().enumerate() {
                scores[r * keys + whole..(r + 1) * keys].copy_from_slice(&a[..keys - whole]);
            }
        }
    }

    /// The weighted values of [`Self::attend`] with portable code, 16 components a pass.
    fn values_portable<const R: usize, const HD: usize>(&self, scores: &[f32], dst: &mut [f32]) {
        let keys = self.keys;
        for d0 in (0..HD).step_by(KEY_BLOCK) {
            let mut acc = [[0f32; KEY_BLOCK]; R];
            for p in 0..keys {
                let v: &[f32; KEY_BLOCK] = self.value(p)[d0..d0 + KEY_BLOCK].try_into().expect("16 components");
                for r in 0..R {
                    let w = scores[r * keys + p];
                    for l in 0..KEY_BLOCK {
                        acc[r][l] = w.mul_add(v[l], acc[r][l]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                dst[r * HD + d0..r * HD + d0 + KEY_BLOCK].copy_from_slice(a);
            }
        }
    }

    /// The same for any number of heads and head width, with plain vector updates.
    fn attend_any(&self, rep: usize, q: &[f32], scale: f32, scores: &mut Vec<f32>, dst: &mut [f32]) {
        let (keys, hd) = (self.keys, self.hd);
        if scores.len() < rep * keys {
            scores.resize(rep * keys, 0.0);
        }
        let sc = &mut scores[..rep * keys];
        sc.fill(0.0);
        for p0 in (0..keys).step_by(KEY_BLOCK) {
            let (kb, width) = (self.key_block(p0 / KEY_BLOCK), KEY_BLOCK.min(keys - p0));
            for d in 0..hd {
                for (r, head) in sc.chunks_exact_mut(keys).enumerate() {
                    axpy(q[r * hd + d] * scale, &kb[d * KEY_BLOCK..d * KEY_BLOCK + width], &mut head[p0..p0 + width]);
                }
            }
        }
        let inv: Vec<f32> = sc.chunks_exact_mut(keys).map(|head| 1.0 / softmax_numerators(head)).collect();
        dst.fill(0.0);
        for p in 0..keys {
            let v = self.value(p);
            for (r, head) in dst.chunks_exact_mut(hd).enumerate() {
                axpy(sc[r * keys + p] * inv[r], v, head);
            }
        }
    }
}

/// Replaces scores by `exp(score - max)` and returns their sum (softmax without the division).
fn softmax_numerators(v: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for x in v.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let mut sums = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (s, &x) in sums.iter_mut().zip(c) {
            *s += x;
        }
    }
    sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Runtime {
    /// Grouped-query attention for every token of the step, reading keys and values from the
    /// caches (which already hold this step's tokens). Tasks are (sequence, kv head, chunk of
    /// queries) and write disjoint parts of `att`.
    pub(super) fn attention(
        &self,
        layer: usize,
        seqs: &[SeqInput<'_>],
        starts: &[usize],
        qkv: &[f32],
        wqkv: usize,
        att: &mut [f32],
    ) {
        let cfg = &self.config;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (dq, rep) = (nh * hd, nh / nkv);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut tasks = Vec::new();
        for (si, s) in seqs.iter().enumerate() {
            for g in 0..nkv {
                for c in (0..s.tokens.len()).step_by(ATTN_CHUNK) {
                    tasks.push((si, g, c, (c + ATTN_CHUNK).min(s.tokens.len())));
                }
            }
        }
        let out = SharedMut(att.as_mut_ptr());
        let work = |&(si, g, c0, c1): &(usize, usize, usize, usize)| {
            let s = &seqs[si];
            let cache = &*s.cache;
            // The cache already holds this step's keys, but its length still counts only the
            // tokens before the step (it moves on after the last layer).
            let base = cache.len;
            SCORES.with(|buf| {
                let mut scores = buf.borrow_mut();
                for j in c0..c1 {
                    let keys = base + j + 1;
                    if scores.len() < rep * keys {
                        scores.resize(rep * keys, 0.0);
                    }
                    let row = starts[si] + j;
                    let q0 = row * wqkv + g * rep * hd;
                    let q = &qkv[q0..q0 + rep * hd];
                    // SAFETY: row `row`, heads `g·rep .. (g+1)·rep` are written by this task
                    // only, and lie inside `att` (`n · dq` floats).
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.at(row * dq + g * rep * hd), rep * hd) };
                    let view = GroupView { cache, layer, group: g, keys, hd };
                    match (rep, hd) {
                        (1, 64) => view.attend::<1, 64>(q, scale, &mut scores, dst),
                        (2, 64) => view.attend::<2, 64>(q, scale, &mut scores, dst),
                        (3, 64) => view.attend::<3, 64>(q, scale, &mut scores, dst),
                        (4, 64) => view.attend::<4, 64>(q, scale, &mut scores, dst),
                        _ => view.attend_any(rep, q, scale, &mut scores, dst),
                    }
                }
            });
        };
        if tasks.len() == 1 {
            work(&tasks[0]);
        } else {
            tasks.par_iter().for_each(work);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::LlamaConfig;

    /// A two-layer cache of `capacity` positions for heads of width 64, filled with
    /// deterministic keys and values.
    fn filled_cache(num_heads: usize, num_kv_heads: usize, capacity: usize) -> KvCache {
        let cfg = LlamaConfig {
            vocab_size: 8,
            hidden_size: num_heads * 64,
            intermediate_size: 8,
            num_layers: 2,
            num_heads,
            num_kv_heads,
            head_dim: 64,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position: capacity,
        };
        let mut cache = KvCache::new(&cfg, capacity);
        let vals = crate::testing::values(cache.k.len(), 5, 1.0);
        cache.k.copy_from_slice(&vals);
        let vals = crate::testing::values(cache.v.len(), 6, 1.0);
        cache.v.copy_from_slice(&vals);
        cache
    }

    #[test]
    fn register_blocked_attention_equals_the_plain_one() {
        let cache = filled_cache(3, 1, 120);
        let q = crate::testing::values(3 * 64, 7, 1.0);
        // 37 keys: two whole blocks of 16 and a tail; 100: six blocks and a tail.
        for keys in [37, 100] {
            let view = GroupView { cache: &cache, layer: 1, group: 0, keys, hd: 64 };
            let (mut a, mut b) = (vec![0f32; 192], vec![0f32; 192]);
            let mut scratch = Vec::new();
            view.attend::<3, 64>(&q, 0.125, &mut scratch, &mut a);
            view.attend_any(3, &q, 0.125, &mut scratch, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "{keys} keys: {x} vs {y}");
            }
        }
    }

    fn attention_halves_match<const R: usize>(cache: &KvCache) {
        let q = crate::testing::values(R * 64, 11, 0.3);
        let mut qs = [[0f32; 64]; R];
        for (r, qr) in qs.iter_mut().enumerate() {
            qr.copy_from_slice(&q[r * 64..(r + 1) * 64]);
        }
        for keys in 1..=70 {
            let view = GroupView { cache, layer: 1, group: 1, keys, hd: 64 };
            let (mut fast, mut plain) = (vec![f32::NAN; R * keys], vec![f32::NAN; R * keys]);
            let (k, stride) = view.keys_from_start();
            let used = crate::kernels::attention_scores_64::<R>(k, stride, qs.as_flattened(), keys, &mut fast);
            view.scores_portable::<R, 64>(&qs, &mut plain);
            if !used {
                // No AVX-512 here: the portable loop is the only path, and this test has nothing to compare.
                return;
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&plain), "scores, {R} heads, {keys} keys");
            let w: Vec<f32> = plain.iter().map(|x| x * 0.01).collect();
            let (mut fast, mut plain) = (vec![f32::NAN; R * 64], vec![f32::NAN; R * 64]);
            let (v, stride) = view.values_from_start();
            assert!(crate::kernels::attention_values_64::<R>(v, stride, &w, keys, &mut fast));
            view.values_portable::<R, 64>(&w, &mut plain);
            assert_eq!(bits(&fast), bits(&plain), "values, {R} heads, {keys} keys");
        }
    }

    #[test]
    fn vector_attention_kernels_give_the_portable_bits() {
        // Capacity 75: the last block of the last layer is partial in positions but whole in
        // memory, as the kernels assume.
        let cache = filled_cache(4, 2, 75);
        attention_halves_match::<1>(&cache);
        attention_halves_match::<2>(&cache);
        attention_halves_match::<3>(&cache);
        attention_halves_match::<4>(&cache);
    }

    #[test]
    fn softmax_numerators_sum_to_the_total() {
        let mut v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want: Vec<f32> = v.iter().map(|x| (x - max).exp()).collect();
        let sum = softmax_numerators(&mut v);
        assert!((sum - want.iter().sum::<f32>()).abs() < 1e-5);
        for (g, w) in v.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6);
        }
    }
}
